//! Which replicas are listening, and what was published: the registry a writer waits on,
//! and the sequence a replica checks to know it missed nothing (README "The Redis link,
//! the shared token and invalidations, in detail").
//!
//! **The registry** (`replicas`): a line `<replica id> <end in Unix ms>` per replica whose
//! invalidation channel works, written by the replica itself every [`JOIN_EVERY`] for
//! [`JOIN_LASTS`] (on Redis's clock), and removed by it when it stops. A write's invalidation
//! is published by a script that reads the registry in the same step, so the writer waits
//! for exactly the replicas that were listening when the message went out: not for another
//! client subscribed to the channel, not only those of one cluster node, and not for a
//! replica of a version that never answers (it is not listed).
//!
//! **The sequence** (`invalidate:seq`, `<epoch> <count>`): the same script counts every
//! publication, puts its number in the message, and keeps the message for [`LOG_KEPT`]
//! under `invalidate:log:<number>`. A replica remembers the highest number it heard; when
//! its subscription comes back it replays what it missed from those copies, and drops its
//! whole cache only when it cannot (too many, expired, or the count was lost and started a
//! new epoch). The health probe reads the count too: a replica that did not hear a
//! publication a second after it was made takes its subscription for stalled (a
//! connection a firewall dropped without a word, say), and resubscribes and replays.
//!
//! Plain strings and scripts only, like the route tables: the README's ACL needs no other
//! right. What is read back is bounded ([`MAX_MEMBERS_BYTES`], [`MAX_REPLAY`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{lock, Redis, Unavailable, PATIENT_CALL_TIMEOUT};

/// How often a listening replica writes itself into the registry again.
pub const JOIN_EVERY: Duration = Duration::from_secs(2);

/// How long one entry in the registry lasts: a replica that died without leaving is
/// waited for (and counted as not acknowledging) for at most this long.
pub const JOIN_LASTS: Duration = Duration::from_secs(10);

/// The most replicas listed; beyond it those whose entries end soonest are left out.
pub const MAX_REPLICAS: usize = 64;

/// The longest registry read: [`MAX_REPLICAS`] lines of at most 96 bytes.
pub const MAX_MEMBERS_BYTES: usize = MAX_REPLICAS * 96;

/// How long each published message is kept for replicas that missed it.
pub const LOG_KEPT: Duration = Duration::from_secs(300);

/// How long the count of publications outlives the last one (then a new epoch starts).
const SEQ_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// The most missed messages a replica replays; more, and it drops its whole cache.
pub const MAX_REPLAY: u64 = 1024;

/// The highest number a publication gets (2^53): the scripts count in Lua's doubles, exact
/// up to here, and every replica reads it as a `u64`. A count found at or past it (only a
/// value planted in Redis gets there) is treated as lost: the next publication starts a new
/// epoch, and a count read above it reads as no count.
pub const MAX_SEQ: u64 = 1 << 53;

/// Reads the registry (KEYS[1]) into `members` ({id, end in ms}): only entries still live
/// and ending at most `max_ahead` ms from now (one planted years ahead would make every
/// write wait); a list over `max_bytes` or of another type reads as empty.
const READ_MEMBERS: &str = r"
local function read_members(now, max_bytes, max_ahead)
  local members = {}
  local size = redis.pcall('STRLEN', KEYS[1])
  if type(size) ~= 'number' or size > max_bytes then return members end
  local list = redis.call('GET', KEYS[1])
  if type(list) ~= 'string' then return members end
  for line in string.gmatch(list, '([^\n]*)\n') do
    local id, at
    if #line <= 96 then id, at = string.match(line, '^([%w%-]+) (%d+)$') end
    if id and #id <= 64 and #at <= 15 then
      local ends = tonumber(at)
      if ends > now and ends <= now + max_ahead then members[#members + 1] = {id, ends} end
    end
  end
  return members
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Writes replica ARGV[1] into the registry (KEYS[1]) until ARGV[2] ms from now, or takes
/// it out (ARGV[2] = 0); ARGV[3]: the list's bound in bytes, ARGV[4]: how many it keeps,
/// ARGV[5]: the furthest end in ms. Drops what ended; returns the others live, each as its
/// id and the ms its entry has left.
static JOIN: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{READ_MEMBERS}
local members = read_members(now, tonumber(ARGV[3]), tonumber(ARGV[5]))
local others = {{}}
for _, m in ipairs(members) do
  if m[1] ~= ARGV[1] then others[#others + 1] = m end
end
table.sort(others, function(a, b) return a[2] > b[2] end)
local lines, last, keep = {{}}, now, tonumber(ARGV[4])
if tonumber(ARGV[2]) > 0 then
  local ends = now + tonumber(ARGV[2])
  lines[1] = ARGV[1] .. ' ' .. string.format('%.0f', ends) .. '\n'
  last = ends
  keep = keep - 1
end
for i = 1, math.min(#others, keep) do
  lines[#lines + 1] = others[i][1] .. ' ' .. string.format('%.0f', others[i][2]) .. '\n'
  if others[i][2] > last then last = others[i][2] end
end
if #lines == 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], table.concat(lines), 'PX', string.format('%.0f', last - now))
end
local out = {{}}
for i = 1, math.min(#others, keep) do
  out[#out + 1] = others[i][1]
  out[#out + 1] = string.format('%.0f', others[i][2] - now)
end
return out
"
    ))
});

/// Publishes one invalidation (KEYS[1]: the registry, KEYS[2]: the count; ARGV: the
/// channel, the message's JSON without its closing brace, the publisher's id, the
/// registry's bound, the furthest end, the log keys' prefix, how long a copy is kept, how
/// long the count is kept): numbers it, keeps a copy, publishes it, and returns its number,
/// the epoch, whether the count found was unusable ('1': there, but not `<epoch> <count>`
/// or a count past [`MAX_SEQ`]; a new epoch was started), whether the publisher itself was
/// listed ('1'), and the ids of the other replicas listed as listening.
static PUBLISH: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"{READ_MEMBERS}
local raw = redis.pcall('GET', KEYS[2])
local epoch, seq
if type(raw) == 'string' and #raw <= 40 then epoch, seq = string.match(raw, '^(%d+) (%d+)$') end
if seq and (#seq > 16 or tonumber(seq) >= {MAX_SEQ}) then epoch = nil end
local repaired = '0'
if not epoch then
  if raw then repaired = '1' end
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  seq = 0
end
seq = tonumber(seq) + 1
local n = string.format('%.0f', seq)
redis.call('SET', KEYS[2], epoch .. ' ' .. n, 'PX', ARGV[8])
local message = ARGV[2] .. ',"seq":' .. n .. ',"epoch":"' .. epoch .. '"}}'
redis.call('SET', ARGV[6] .. n, message, 'PX', ARGV[7])
redis.call('PUBLISH', ARGV[1], message)
local out = {{n, epoch, repaired, '0'}}
for _, m in ipairs(read_members(now, tonumber(ARGV[4]), tonumber(ARGV[5]))) do
  if m[1] ~= ARGV[3] then out[#out + 1] = m[1] else out[4] = '1' end
end
return out
"#
    ))
});

/// The ids listed in the registry (KEYS[1]) as live now; ARGV: the list's bound in bytes,
/// the furthest end in ms.
static LISTED: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r"{READ_MEMBERS}
local out = {{}}
for _, m in ipairs(read_members(now, tonumber(ARGV[1]), tonumber(ARGV[2]))) do
  out[#out + 1] = m[1]
end
return out
"
    ))
});

/// The count of publications (KEYS[1]) and the copies numbered ARGV[2] up to it, at most
/// ARGV[3] of them (ARGV[1]: the log keys' prefix): the epoch and the count (both false
/// when there is none, or it is past [`MAX_SEQ`]), then each copy (false when it expired).
/// None past ARGV[3].
static CATCH_UP: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r"
local raw = redis.pcall('GET', KEYS[1])
local epoch, seq
if type(raw) == 'string' and #raw <= 40 then epoch, seq = string.match(raw, '^(%d+) (%d+)$') end
if seq and (#seq > 16 or tonumber(seq) > {MAX_SEQ}) then epoch = nil end
if not epoch then return {{false, false}} end
local out = {{epoch, seq}}
local from, upto = tonumber(ARGV[2]), tonumber(seq)
if upto - from + 1 > tonumber(ARGV[3]) then return out end
for i = from, upto do
  local copy = redis.pcall('GET', ARGV[1] .. string.format('%.0f', i))
  if type(copy) ~= 'string' then copy = false end
  out[#out + 1] = copy
end
return out
"
    ))
});

/// Where the count of publications stands: the epoch (a new one whenever the count was lost
/// and starts again) and the number of the last publication. Before the first publication
/// there is no count: the epoch is empty and the number 0, and whatever epoch the first
/// starts is numbered from 1, so nothing published can be missed unseen.
pub type Position = (String, u64);

/// The position before anything was published.
pub(super) fn nothing_published() -> Position {
    (String::new(), 0)
}

/// What this replica's last heartbeat saw: until when its own entry lasts, and the others
/// listed then with the ends of their entries (on tokio's clock).
pub(super) struct Heartbeat {
    pub own_end: tokio::time::Instant,
    pub others: Vec<(String, tokio::time::Instant)>,
}

/// One publication as [`PUBLISH`] made it.
pub(super) struct Published {
    /// The other replicas listed as listening when it went out.
    pub others: Vec<String>,
    /// Whether the publisher itself was listed then: a registry that lost a live entry
    /// (emptied, or replaced by a value no replica wrote) names nobody to wait for.
    pub listed_self: bool,
}

/// What [`Redis::missed`] found.
pub(super) enum Missed {
    /// The count as it stands now, and the copies after the replica's last (in order;
    /// `None` for one that expired). Empty when nothing was missed.
    Copies(Position, Vec<Option<Vec<u8>>>),
    /// Too many were missed to replay, or the count is gone: nothing can be proven.
    Unknown(Option<Position>),
}

impl Redis {
    fn members_key(&self) -> String {
        self.key("replicas")
    }

    pub(super) fn seq_key(&self) -> String {
        self.key("invalidate:seq")
    }

    fn log_prefix(&self) -> String {
        self.key("invalidate:log:")
    }

    /// Writes this replica into the registry for [`JOIN_LASTS`] (`lasts` 0: takes it out).
    async fn set_membership(&self, lasts: Duration) -> Result<(), Unavailable> {
        let (key, id) = (self.members_key(), self.inner.id.clone());
        let others = self
            .run_within("publish", PATIENT_CALL_TIMEOUT, |mut c| async move {
                JOIN.key(&key)
                    .arg(&id)
                    .arg(u64::try_from(lasts.as_millis()).unwrap_or(u64::MAX))
                    .arg(MAX_MEMBERS_BYTES)
                    .arg(MAX_REPLICAS)
                    .arg(JOIN_LASTS.as_millis() as u64 * 2)
                    .invoke_async::<Vec<String>>(&mut c)
                    .await
            })
            .await?;
        if lasts > Duration::ZERO {
            let now = tokio::time::Instant::now();
            let live: Vec<(String, tokio::time::Instant)> = others
                .chunks(2)
                .filter_map(|pair| {
                    let left = pair.get(1)?.parse::<u64>().ok()?;
                    Some((pair[0].clone(), now + Duration::from_millis(left)))
                })
                .collect();
            self.inner.others_live.store(live.len(), Ordering::Relaxed);
            *lock(&self.inner.last_join) = Some(Heartbeat {
                own_end: now + lasts,
                others: live,
            });
        }
        Ok(())
    }

    /// Says in the registry that this replica listens, for [`JOIN_LASTS`].
    pub(super) async fn join(&self) -> Result<(), Unavailable> {
        self.set_membership(JOIN_LASTS).await
    }

    /// The replicas listed in the registry as listening now (this one included when it
    /// is), each call under `op` in `cxgate_redis_errors_total`.
    pub async fn listed(&self, op: &'static str) -> Result<Vec<String>, Unavailable> {
        let key = self.members_key();
        self.run_within(op, PATIENT_CALL_TIMEOUT, |mut c| async move {
            LISTED
                .key(&key)
                .arg(MAX_MEMBERS_BYTES)
                .arg(JOIN_LASTS.as_millis() as u64 * 2)
                .invoke_async::<Vec<String>>(&mut c)
                .await
        })
        .await
    }

    /// Takes this replica out of the registry (at shutdown), so no write waits for it.
    pub async fn leave(&self) {
        if self.is_up() {
            let _ = self.set_membership(Duration::ZERO).await;
        }
    }

    /// Publishes `head` (a message's JSON without its closing brace) on the invalidation
    /// channel through [`PUBLISH`], within [`PATIENT_CALL_TIMEOUT`].
    pub(super) async fn publish_numbered(&self, head: String) -> Result<Published, Unavailable> {
        let keys = [self.members_key(), self.seq_key()];
        let (channel, id, log) = (
            self.key("invalidate"),
            self.inner.id.clone(),
            self.log_prefix(),
        );
        let answer = self
            .run_within("publish", PATIENT_CALL_TIMEOUT, |mut c| async move {
                PUBLISH
                    .key(&keys[0])
                    .key(&keys[1])
                    .arg(&channel)
                    .arg(&head)
                    .arg(&id)
                    .arg(MAX_MEMBERS_BYTES)
                    .arg(JOIN_LASTS.as_millis() as u64 * 2)
                    .arg(&log)
                    .arg(LOG_KEPT.as_millis() as u64)
                    .arg(SEQ_KEPT.as_millis() as u64)
                    .invoke_async::<Vec<String>>(&mut c)
                    .await
            })
            .await?;
        // Its number and epoch, whether the count found was unusable, then the others listed.
        if answer.get(2).is_some_and(|r| r == "1") {
            self.repaired(
                &self.seq_key(),
                &format!(
                    "the count of invalidations was not `<epoch> <count>` with a count up to \
                     {MAX_SEQ}, which the replicas could not number or read: a new epoch was \
                     started, and every replica drops what it cannot prove fresh"
                ),
            );
        }
        let listed_self = answer.get(3).is_some_and(|l| l == "1");
        Ok(Published {
            others: answer.into_iter().skip(4).collect(),
            listed_self,
        })
    }

    /// The copies of what was published after `since` (at most [`MAX_REPLAY`]).
    pub(super) async fn missed(&self, since: &Position) -> Result<Missed, Unavailable> {
        let (key, log) = (self.seq_key(), self.log_prefix());
        let from = since.1.saturating_add(1);
        let answer = self
            .run_within("publish", PATIENT_CALL_TIMEOUT, |mut c| async move {
                CATCH_UP
                    .key(&key)
                    .arg(&log)
                    .arg(from)
                    .arg(MAX_REPLAY)
                    .invoke_async::<Vec<Option<Vec<u8>>>>(&mut c)
                    .await
            })
            .await?;
        let mut answer = answer.into_iter();
        let text = |v: Option<Vec<u8>>| v.and_then(|b| String::from_utf8(b).ok());
        let epoch = answer.next().and_then(text);
        let seq = answer
            .next()
            .and_then(text)
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n <= MAX_SEQ);
        let (Some(epoch), Some(seq)) = (epoch, seq) else {
            // No count: nothing was published, unless one was there and got lost.
            return Ok(match since.0.is_empty() {
                true => Missed::Copies(nothing_published(), Vec::new()),
                false => Missed::Unknown(None),
            });
        };
        let now = (epoch, seq);
        if !since.0.is_empty() && now.0 != since.0 {
            return Ok(Missed::Unknown(Some(now)));
        }
        if seq <= since.1 {
            return Ok(Missed::Copies(now, Vec::new()));
        }
        let copies: Vec<Option<Vec<u8>>> = answer.collect();
        if copies.len() as u64 != seq - since.1 {
            return Ok(Missed::Unknown(Some(now)));
        }
        Ok(Missed::Copies(now, copies))
    }

    /// Where the count stands now (`None` when Redis cannot say).
    pub(super) async fn position(&self) -> Option<Position> {
        // Asked from past any number, so no copy is read.
        match self.missed(&(String::new(), u64::MAX - 1)).await {
            Ok(Missed::Unknown(now)) => Some(now.unwrap_or_else(nothing_published)),
            Ok(Missed::Copies(now, _)) => Some(now),
            Err(_) => None,
        }
    }
}

/// Reads `<epoch> <count>` as the probe returns it.
pub(super) fn parse_position(raw: &[u8]) -> Option<Position> {
    let text = std::str::from_utf8(raw).ok()?;
    let (epoch, seq) = text.split_once(' ')?;
    if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let seq = seq.parse().ok().filter(|n| *n <= MAX_SEQ)?;
    Some((epoch.to_string(), seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_past_what_is_numbered_reads_as_none() {
        assert_eq!(parse_position(b"17 42"), Some(("17".to_string(), 42)));
        let top = format!("1 {MAX_SEQ}");
        assert_eq!(
            parse_position(top.as_bytes()),
            Some(("1".to_string(), MAX_SEQ))
        );
        for raw in [
            format!("1 {}", MAX_SEQ + 1),
            "1 18446744073709551615".to_string(),
            "1 18446744073709551616".to_string(),
            "x 1".to_string(),
        ] {
            assert_eq!(parse_position(raw.as_bytes()), None, "{raw}");
        }
    }
}
