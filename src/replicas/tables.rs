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

/// Reads the list of tables (KEYS[1]) into `members` ({name, end in ms}) and returns how
/// many junk lines it passed over (`junk`): the list is read only when `STRLEN` says it is
/// within ARGV[1] bytes (another type, or a longer one, is junk as a whole), and each line
/// on its own, so one bad member costs only itself. A line is junk when it is longer than
/// a member can be, its name is not up to 64 letters and digits, or its end is not a
/// number of ms at most ARGV[2] ms ahead (a planted end years away would keep it listed).
/// Lines are cut at `\n` first, so the work is linear in the list's size.
const READ_LIST: &str = r"
local function read_list(now, max_bytes, max_ahead)
  local members, junk = {}, 0
  local size = redis.pcall('STRLEN', KEYS[1])
  if type(size) ~= 'number' then return members, 1 end
  if size > max_bytes then return members, 1 end
  local list = redis.call('GET', KEYS[1])
  if type(list) ~= 'string' then return members, 0 end
  for line in string.gmatch(list, '([^\n]*)\n') do
    local name, at
    if #line <= 96 then name, at = string.match(line, '^(%w+) (%d+)$') end
    if name and #name <= 64 and #at <= 15 and tonumber(at) <= now + max_ahead then
      members[#members + 1] = {name, tonumber(at)}
    else
      junk = junk + 1
    end
  end
  local rest = string.match(list, '[^\n]+$')
  if rest then junk = junk + 1 end
  return members, junk
end
";

/// Announces a table (KEYS: the list of tables, the table's text; ARGV: the list's bound
/// in bytes, the furthest end in ms a member may have, its name, its text, how long it
/// lasts in ms, how many tables the list keeps) for at least that long, drops the
/// announcements that ended and the junk, and keeps the others that end last; returns how
/// many live ones it left out for the bound and how many junk lines it dropped. Whatever
/// else is in Redis, the announcement goes on, and the list is written clean.
static ANNOUNCE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{READ_LIST}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends = now + tonumber(ARGV[5])
local members, junk = read_list(now, tonumber(ARGV[1]), tonumber(ARGV[2]))
local others = {{}}
for _, m in ipairs(members) do
  local name, at = m[1], m[2]
  if name == ARGV[3] then
    if at > ends then ends = at end
  elseif at > now then
    others[#others + 1] = {{name, at}}
  end
end
table.sort(others, function(a, b) return a[2] > b[2] end)
local keep = tonumber(ARGV[6]) - 1
local lines = {{ARGV[3] .. ' ' .. string.format('%.0f', ends) .. '\n'}}
local last = ends
for i = 1, math.min(#others, keep) do
  lines[#lines + 1] = others[i][1] .. ' ' .. string.format('%.0f', others[i][2]) .. '\n'
  if others[i][2] > last then last = others[i][2] end
end
redis.call('SET', KEYS[1], table.concat(lines), 'PX', string.format('%.0f', last - now))
redis.call('SET', KEYS[2], ARGV[4], 'PX', string.format('%.0f', ends - now))
return {{math.max(#others - keep, 0), junk}}
"
    ))
});

/// The tables announced now, in the list's order (KEYS[1]: the list; ARGV: the list's
/// bound in bytes, the furthest end a member may have, how many tables at most, the
/// longest text returned, the text keys' prefix, then the names the caller knows
/// already): how many junk lines the list held, then name and text in pairs, the text
/// left out (nil) for a known name, a missing one and one over the bound (`STRLEN` first:
/// a text over it is never read).
static LIVE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{READ_LIST}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local members, junk = read_list(now, tonumber(ARGV[1]), tonumber(ARGV[2]))
local known = {{}}
for i = 6, #ARGV do known[ARGV[i]] = true end
local out = {{tostring(junk)}}
local n = 0
for _, m in ipairs(members) do
  local name, at = m[1], m[2]
  if n >= tonumber(ARGV[3]) then break end
  if at > now then
    n = n + 1
    local text = false
    if not known[name] then
      local key = ARGV[5] .. name
      local size = redis.pcall('STRLEN', key)
      if type(size) == 'number' and size <= tonumber(ARGV[4]) then
        text = redis.call('GET', key)
        if type(text) ~= 'string' then text = false end
      end
    end
    out[#out + 1] = name
    out[#out + 1] = text
  end
end
return out
"
    ))
});

/// How often a replica announces its table again.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(10);

/// The most tables listed, and read by a write: more are live only after more than this
/// many different tables ran within one entry life, and then those ending soonest are
/// left out (said once).
pub const MAX_TABLES: usize = 32;

/// The longest table text read (a route table of a few hundred routes is a few KB).
pub const MAX_TABLE_BYTES: usize = 256 << 10;

/// The longest list of tables read: [`MAX_TABLES`] lines of a 16-digit name and an end in
/// ms take under 1.2 KB; a longer list is junk as a whole (and written clean by the next
/// announcement), since parsing it would hold Redis up.
pub const MAX_LIST_BYTES: usize = MAX_TABLES * 128;

/// The furthest ahead a listed table may end: a member claiming a later end is junk (it
/// would stay listed for years), and a replica's own announcement is cut to it.
pub const MAX_AHEAD: Duration = Duration::from_secs(400 * 24 * 3600);

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
        let lasts = table
            .lasts
            .saturating_add(ANNOUNCE_EVERY * 2)
            .min(MAX_AHEAD);
        let millis = u64::try_from(lasts.as_millis())
            .unwrap_or(u64::MAX)
            .to_string();
        let (name, text) = (table.name.clone(), table.text.clone());
        let (left_out, junk) = self
            .run("publish", |mut c| async move {
                ANNOUNCE
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(MAX_LIST_BYTES)
                    .arg(MAX_AHEAD.as_millis().to_string())
                    .arg(&name)
                    .arg(&text)
                    .arg(&millis)
                    .arg(MAX_TABLES)
                    .invoke_async::<(i64, i64)>(&mut c)
                    .await
            })
            .await?;
        self.saw_junk(junk);
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
                call.arg(MAX_LIST_BYTES)
                    .arg(MAX_AHEAD.as_millis().to_string())
                    .arg(MAX_TABLES)
                    .arg(MAX_TABLE_BYTES)
                    .arg(&prefix)
                    .arg(&known);
                call.invoke_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await?;
        let mut answer = answer.into_iter();
        let junk = answer
            .next()
            .flatten()
            .and_then(|n| std::str::from_utf8(&n).ok()?.parse::<i64>().ok())
            .unwrap_or_default();
        self.saw_junk(junk);
        let answer: Vec<Option<Vec<u8>>> = answer.collect();
        let live = answer
            .chunks_exact(2)
            .filter_map(|pair| {
                let name = String::from_utf8(pair[0].clone()?).ok()?;
                Some((name, pair[1].clone()))
            })
            .collect();
        Ok(live)
    }

    /// Says once per incident that the list of tables held junk (it was dropped): the
    /// next read that finds none ends the incident.
    fn saw_junk(&self, junk: i64) {
        if junk > 0 {
            if !self.inner.tables_junk.swap(true, Ordering::Relaxed) {
                self.repaired(
                    &self.tables_key(),
                    &format!(
                        "the list of route tables in Redis holds {junk} lines no replica wrote \
                         (too long, malformed, or ending too far ahead): they are ignored, and \
                         the next announcement writes the list clean"
                    ),
                );
            }
        } else {
            self.inner.tables_junk.store(false, Ordering::Relaxed);
        }
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
