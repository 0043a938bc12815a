//! The route tables the replicas run, announced in Redis, so a write through one replica
//! can invalidate what a replica on another table tagged (README "Rolling reloads and
//! upgrades").
//!
//! Each replica announces its table's name and text (opaque here) under `table:<name>`,
//! listed in `tables` (a line `<name> <end in Unix ms>` each, on Redis's clock), again
//! every [`ANNOUNCE_EVERY`], for as long as an entry stored under it can live: a table is
//! known to the others for as long as anything it tagged may still be served. Only the
//! commands the README's ACL grants already are used (strings, `TIME`, scripts). What is
//! read back is bounded: at most [`MAX_TABLES`] names, and texts of at most
//! [`MAX_TABLE_BYTES`].

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::{Redis, Unavailable};

/// Announces a table (KEYS: the list of tables, the table's text; ARGV: its name, its
/// text, how long it lasts in ms, how many tables the list keeps) for at least that long,
/// drops the announcements that ended, and keeps the others that end last; returns how
/// many live ones it left out for the bound. A list or text of another type reads as
/// empty (`pcall`): whatever else is in Redis, the announcement goes on.
static ANNOUNCE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = now + tonumber(ARGV[3])
local list = redis.pcall('GET', KEYS[1])
if type(list) ~= 'string' then list = '' end
local others = {}
for name, at in string.gmatch(list, '(%S+) (%d+)\n') do
  at = tonumber(at)
  if name == ARGV[1] then
    if at > ends then ends = at end
  elseif at > now then
    others[#others + 1] = {name, at}
  end
end
table.sort(others, function(a, b) return a[2] > b[2] end)
local keep = tonumber(ARGV[4]) - 1
local lines = {ARGV[1] .. ' ' .. string.format('%.0f', ends) .. '\n'}
local last = ends
for i = 1, math.min(#others, keep) do
  lines[#lines + 1] = others[i][1] .. ' ' .. string.format('%.0f', others[i][2]) .. '\n'
  if others[i][2] > last then last = others[i][2] end
end
redis.call('SET', KEYS[1], table.concat(lines), 'PX', string.format('%.0f', last - now))
redis.call('SET', KEYS[2], ARGV[2], 'PX', string.format('%.0f', ends - now))
return math.max(#others - keep, 0)
",
    )
});

/// The tables announced now, in the list's order (KEYS[1]: the list; ARGV: how many at
/// most, the longest text returned, the text keys' prefix, then the names the caller
/// knows already): name and text in pairs, the text left out (nil) for a known name, a
/// missing one and one over the bound.
static LIVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local list = redis.pcall('GET', KEYS[1])
if type(list) ~= 'string' then list = '' end
local known = {}
for i = 4, #ARGV do known[ARGV[i]] = true end
local out = {}
local n = 0
for name, at in string.gmatch(list, '(%S+) (%d+)\n') do
  if n >= tonumber(ARGV[1]) then break end
  if tonumber(at) > now then
    n = n + 1
    local text = false
    if not known[name] then
      text = redis.pcall('GET', ARGV[3] .. name)
      if type(text) ~= 'string' or #text > tonumber(ARGV[2]) then text = false end
    end
    out[#out + 1] = name
    out[#out + 1] = text
  end
end
return out
",
    )
});

/// How often a replica announces its table again.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// The most tables listed, and read by a write: more are live only after more than this
/// many different tables ran within one entry life, and then those ending soonest are
/// left out (said once).
pub const MAX_TABLES: usize = 32;

/// The longest table text read (a route table of a few hundred routes is a few KB).
pub const MAX_TABLE_BYTES: usize = 256 << 10;

/// A table as this replica announces it.
#[derive(Debug, Clone)]
pub struct Table {
    /// Short and unique per distinct table (a digest of `text`).
    pub name: String,
    pub text: String,
    /// How long an entry stored under it can live.
    pub lasts: Duration,
}

/// What a replica announces now (a reload changes it).
pub type Current = Arc<dyn Fn() -> Table + Send + Sync>;

impl Redis {
    fn tables_key(&self) -> String {
        self.key("tables")
    }

    fn table_key(&self, name: &str) -> String {
        self.key(&format!("table:{name}"))
    }

    /// Announces `table` for its life from now plus two rounds of announcing, so it stays
    /// known between one announcement and the next.
    pub async fn announce_table(&self, table: &Table) -> Result<(), Unavailable> {
        let keys = [self.tables_key(), self.table_key(&table.name)];
        let lasts = table.lasts.saturating_add(ANNOUNCE_EVERY * 2);
        let millis = u64::try_from(lasts.as_millis())
            .unwrap_or(u64::MAX)
            .to_string();
        let (name, text) = (table.name.clone(), table.text.clone());
        let left_out = self
            .run("publish", |mut c| async move {
                ANNOUNCE
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(&name)
                    .arg(&text)
                    .arg(&millis)
                    .arg(MAX_TABLES)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await?;
        let over = left_out > 0;
        if over && !self.inner.tables_over.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                left_out,
                max = MAX_TABLES,
                "more route tables are live than are listed (many reloads within one entry \
                 life): writes miss entries stored under the ones left out, which end soonest"
            );
        } else if !over {
            self.inner.tables_over.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The names of the tables announced now (at most [`MAX_TABLES`]), each with its text
    /// unless its name is in `known` or the text is missing or over [`MAX_TABLE_BYTES`].
    pub async fn live_tables(
        &self,
        known: &[String],
    ) -> Result<Vec<(String, Option<Vec<u8>>)>, Unavailable> {
        let index = self.tables_key();
        let prefix = self.table_key("");
        let known = known.to_vec();
        let answer = self
            .run("publish", |mut c| async move {
                let mut call = LIVE.key(&index);
                call.arg(MAX_TABLES)
                    .arg(MAX_TABLE_BYTES)
                    .arg(&prefix)
                    .arg(&known);
                call.invoke_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await?;
        let live = answer
            .chunks_exact(2)
            .filter_map(|pair| {
                let name = String::from_utf8(pair[0].clone()?).ok()?;
                Some((name, pair[1].clone()))
            })
            .collect();
        Ok(live)
    }

    /// Announces what `current` gives every [`ANNOUNCE_EVERY`] from now (the caller made
    /// the first announcement); stops with the other background tasks ([`Redis::stop`]).
    pub fn spawn_announcer(&self, current: Current) {
        let redis = self.clone();
        let task = tokio::spawn(async move {
            let first = tokio::time::Instant::now() + ANNOUNCE_EVERY;
            let mut every = tokio::time::interval_at(first, ANNOUNCE_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                if let Err(e) = redis.announce_table(&current()).await {
                    tracing::debug!(error = %e, "the route table could not be announced");
                }
            }
        });
        self.remember(task);
    }
}
