//! The shared cache tier: entries in the replicas' Redis, behind each replica's memory store,
//! so an answer one replica fetched serves them all and a restarted replica starts warm.
//! [`SharedTier`] says how reads, writes and invalidations stay exact.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use prometheus::{IntCounterVec, Opts, Registry};
use tokio::time::Instant;

use super::entry::CachedResponse;
use super::fill::FillLock;
use super::key::normalize_path;
use crate::replicas::{
    Invalidation, Redis, Unavailable, BACKGROUND_CALL_TIMEOUT, CALL_TIMEOUT, PATIENT_CALL_TIMEOUT,
};

/// Stores an entry only when no generation it was looked up under has moved since
/// (KEYS: the entry, the global generation, n group generations, n group sets; ARGV: the
/// entry, its expiry in ms, then the expected generations in the same order), and records it
/// in its groups' sets, which live at least as long as it does.
static WRITE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = (#KEYS - 2) / 2
for i = 0, n do
  if (redis.call('GET', KEYS[2 + i]) or '0') ~= ARGV[3 + i] then return 0 end
end
local px = tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
for i = 1, n do
  local set = KEYS[2 + n + i]
  redis.call('SADD', set, KEYS[1])
  if redis.call('PTTL', set) < px then redis.call('PEXPIRE', set, px) end
end
return 1
",
    )
});

/// Bumps each group's generation and deletes its entries (KEYS: generation and set, in
/// pairs; ARGV[1]: how long a generation is kept, in ms); returns the entries deleted.
static INVALIDATE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local removed = 0
for i = 1, #KEYS, 2 do
  redis.call('INCRBY', KEYS[i], 1)
  redis.call('PEXPIRE', KEYS[i], ARGV[1])
  for _, entry in ipairs(redis.call('SMEMBERS', KEYS[i + 1])) do
    removed = removed + redis.call('DEL', entry)
  end
  redis.call('DEL', KEYS[i + 1])
end
return removed
",
    )
});

/// Reads values each within its bound (KEYS: the values' keys, then optionally a fill lock;
/// ARGV: how many values, each one's longest length in bytes, then the lock's lease in ms):
/// `STRLEN` first, so a value over its bound (or of another type) is never read and answers
/// as missing. The lock answers `'1'` while held; one planted with no expiry or with one
/// past the lease (no replica sets such a lock: a holder sets and extends it to the lease)
/// is treated as expired and deleted, so it holds nobody back: waiting it out would spend
/// the waiting request's whole `max_wait`, and the budget would then refuse it.
static READ: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local n = tonumber(ARGV[1])
local out = {}
for i = 1, n do
  local value = false
  local size = redis.pcall('STRLEN', KEYS[i])
  if type(size) == 'number' and size <= tonumber(ARGV[1 + i]) then
    value = redis.call('GET', KEYS[i])
  end
  out[i] = value
end
if #KEYS > n then
  local lock, lease = KEYS[n + 1], tonumber(ARGV[n + 2])
  local ttl = redis.call('PTTL', lock)
  local held = false
  if ttl == -1 or ttl > lease then
    redis.call('DEL', lock)
  elseif ttl > 0 then
    held = '1'
  end
  out[n + 1] = held
end
return out
",
    )
});

/// The longest generation read: a counter's decimal digits (a longer value is junk and
/// reads as missing, which only makes a write look stale and be refused).
const MAX_GENERATION_BYTES: usize = 32;

/// How long a group's generation outlives its last bump: far longer than any fetch takes,
/// so no write looked up before the bump can see the generation vanish and pass.
const GENERATION_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Writes to the tier in flight at once, at most: on a Redis slow enough to hold them all
/// for their bound, further answers stay in their replica's memory rather than pile up.
const WRITES_IN_FLIGHT: usize = 128;

/// Leads every stored entry; anything else under an entry key is not read. The digit is
/// the format: `cxg2` entries hold the neutral form (see [`Localize`]).
const MAGIC: &[u8; 4] = b"cxg2";

/// What leads an entry of any format (`cxg` and a digit): `cxg1` led the first, whose
/// links named the writing replica's own base. Another version's entries are passed over
/// (a miss, overwritten by the next fill), never read: during a rolling upgrade across a
/// format change each version fills and serves its own, and the others' expire.
const FORMAT_PREFIX: &[u8; 3] = b"cxg";

/// Why [`decode`] refuses an entry of another format than [`MAGIC`]'s.
const OTHER_FORMAT: &str = "an entry of another format";

/// How a replica takes an entry from the shared tier into its own form. Replicas may have
/// different public bases, so the tier keeps every answer in one form none of them serves
/// (its links at the upstream's own base), and each replica moves them to its base once,
/// as the entry enters its memory, so memory hits cost what they cost without the tier.
pub trait Localize: Sync {
    /// `headers` and `body` as this replica serves them; `None` when they stay as they are.
    fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)>;

    /// This replica's own windows for the entry (its route's): a replica whose table says
    /// less than the writer's serves and keeps the entry no longer than its own say.
    fn windows(&self) -> Option<Windows> {
        None
    }
}

/// A route's ttl and stale windows, as one replica's table gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

impl Windows {
    /// `value`'s windows cut to these where these are shorter.
    pub fn cut(&self, value: &mut CachedResponse) {
        value.ttl = value.ttl.min(self.ttl);
        value.stale_while_revalidate = value
            .stale_while_revalidate
            .min(self.stale_while_revalidate);
        value.stale_if_error = value.stale_if_error.min(self.stale_if_error);
    }
}

/// A [`Localize`] with the route's own [`Windows`]: what a read hands the store.
pub struct Routed<'a> {
    pub local: &'a dyn Localize,
    pub windows: Windows,
}

impl Localize for Routed<'_> {
    fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)> {
        self.local.localize(headers, body)
    }

    fn windows(&self) -> Option<Windows> {
        Some(self.windows)
    }
}

/// The generations an entry was looked up under: the global one (bumped by a full purge) and
/// one per group (each tag, and the entry's path). A write passes only while all still hold,
/// so an answer fetched before an invalidation that ran meanwhile on any replica is not
/// stored; one written before it is in the group's set, and the invalidation deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generations {
    global: String,
    groups: Vec<(String, String)>,
}

/// One entry read from the shared tier, as the memory store takes it.
pub struct Found {
    pub value: CachedResponse,
    /// The key it was stored under: the primary key, or the variant its writer selected.
    pub storage_key: String,
}

/// The shared tier of one replica. Cheap to clone.
///
/// A miss in memory reads Redis once (the entry and the generations that guard it, one
/// `MGET`); an answer fetched upstream is written for every replica by a script that first
/// checks those generations. Invalidations bump them, so a read in flight elsewhere across a
/// write or purge is never stored (see [`Generations`]). Every call is one bounded Redis call
/// and any failure means "memory only": the caller falls back, never waits longer. Calls on
/// the request path are bounded by [`PATIENT_CALL_TIMEOUT`], since giving up on a slow Redis
/// costs an upstream call; a fetched answer is written off the request path
/// ([`SharedTier::write_behind`]), so it lands when a slow Redis catches up.
#[derive(Clone)]
pub struct SharedTier {
    redis: Redis,
    max_entry_bytes: usize,
    writing: std::sync::Arc<tokio::sync::Semaphore>,
    lookups: IntCounterVec,
    writes: IntCounterVec,
    /// Whether the log said once that entries of another format are passed over.
    told_format: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTier")
            .field("max_entry_bytes", &self.max_entry_bytes)
            .finish_non_exhaustive()
    }
}

/// The groups of an entry: its tags and its path, each a set and a generation in Redis.
fn groups(key: &str, tags: &[String]) -> Vec<String> {
    let mut groups: Vec<String> = tags.iter().map(|t| format!("tag:{t}")).collect();
    if let Some(path) = super::store::key_path(key) {
        groups.push(format!("path:{path}"));
    }
    groups
}

/// The shared tier's counters, `cxgate_cache_shared_lookups_total{result}` and
/// `cxgate_cache_shared_writes_total{result}`: registered on every gateway, every result at 0,
/// so a scrape and the dashboard see them whether the tier is on or not.
#[derive(Clone)]
pub struct SharedMetrics {
    lookups: IntCounterVec,
    writes: IntCounterVec,
}

impl SharedMetrics {
    /// Registers both counters on `registry`.
    pub fn register(registry: &Registry) -> Result<SharedMetrics, prometheus::Error> {
        let lookups = IntCounterVec::new(
            Opts::new(
                "cxgate_cache_shared_lookups_total",
                "Memory misses looked up in the shared cache tier, by result (hit, miss, \
                 other_format: an entry of another cxgate version passed over, error).",
            ),
            &["result"],
        )?;
        let writes = IntCounterVec::new(
            Opts::new(
                "cxgate_cache_shared_writes_total",
                "Answers offered to the shared cache tier, by result (stored, invalidated, \
                 too_large, error).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(lookups.clone()))?;
        registry.register(Box::new(writes.clone()))?;
        for result in ["hit", "miss", "other_format", "error"] {
            lookups.with_label_values(&[result]);
        }
        for result in ["stored", "invalidated", "too_large", "error"] {
            writes.with_label_values(&[result]);
        }
        Ok(SharedMetrics { lookups, writes })
    }
}

impl SharedTier {
    /// The tier on `redis`, refusing entries over `max_entry_bytes` once encoded, counting
    /// on `metrics`.
    pub fn new(redis: Redis, max_entry_bytes: u64, metrics: SharedMetrics) -> SharedTier {
        SharedTier {
            redis,
            max_entry_bytes: usize::try_from(max_entry_bytes).unwrap_or(usize::MAX),
            writing: std::sync::Arc::new(tokio::sync::Semaphore::new(WRITES_IN_FLIGHT)),
            lookups: metrics.lookups,
            writes: metrics.writes,
            told_format: std::sync::Arc::default(),
        }
    }

    fn entry_key(&self, key: &str) -> String {
        self.redis.key(&format!("cache:entry:{key}"))
    }

    fn generation_key(&self, group: &str) -> String {
        self.redis.key(&format!("cache:gen:{group}"))
    }

    fn set_key(&self, group: &str) -> String {
        self.redis.key(&format!("cache:set:{group}"))
    }

    fn global_key(&self) -> String {
        self.redis.key("cache:gen")
    }

    /// The entry under primary key `key` and the generations of its groups (`tags` and its
    /// path), read at once. `None` when Redis is down, slow or refuses: memory only then.
    pub async fn lookup(&self, key: &str, tags: &[String]) -> Option<(Option<Found>, Generations)> {
        let Some((entry, generations)) = self.read(key, tags, true).await else {
            self.lookups.with_label_values(&["error"]).inc();
            return None;
        };
        let found = match entry.map(|e| decode(&e)) {
            None => None,
            Some(Ok((written_under, found))) => {
                // Written before the last full purge: gone for every reader.
                (written_under == generations.global).then_some(found)
            }
            Some(Err(OTHER_FORMAT)) => {
                if !self
                    .told_format
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::info!(
                        key,
                        "passing over shared cache entries of another format (another cxgate \
                         version wrote them, as in a rolling upgrade): each version fills and \
                         serves its own, the others' expire; counted in \
                         cxgate_cache_shared_lookups_total{{result=\"other_format\"}}"
                    );
                }
                self.lookups.with_label_values(&["other_format"]).inc();
                return Some((None, generations));
            }
            Some(Err(why)) => {
                tracing::warn!(why, "ignoring an unreadable shared cache entry");
                None
            }
        };
        let usable = found.filter(|f| f.value.freshness(Instant::now()).is_usable());
        let result = if usable.is_some() { "hit" } else { "miss" };
        self.lookups.with_label_values(&[result]).inc();
        Some((usable, generations))
    }

    /// The Redis handle, for the fill lock kept beside the entries (see `fill`).
    pub(super) fn redis(&self) -> &Redis {
        &self.redis
    }

    /// In one `MGET`: the entry under primary key `key` if it is fresh and was written
    /// since the last full purge, and whether the Redis key `lock` exists. Not counted as a
    /// lookup: a replica waiting for another's fill polls with it. An error when Redis
    /// cannot say (see [`Unavailable::is_slow`] for one that may answer the next look).
    pub(super) async fn peek(
        &self,
        key: &str,
        lock: &str,
    ) -> Result<(Option<Found>, bool), Unavailable> {
        let keys = vec![self.entry_key(key), self.global_key()];
        let bounds = [self.max_entry_bytes, MAX_GENERATION_BYTES];
        let mut values = self.bounded_get(keys, &bounds, Some(lock)).await?;
        let (entry, global, held) = (
            values.next().flatten(),
            values.next().flatten(),
            values.next().flatten(),
        );
        let global = generation(global);
        let found = entry
            .and_then(|e| decode(&e).ok())
            .filter(|(written_under, _)| *written_under == global)
            .map(|(_, found)| found)
            .filter(|f| {
                matches!(
                    f.value.freshness(Instant::now()),
                    super::entry::Freshness::Fresh { .. }
                )
            });
        Ok((found, held.is_some()))
    }

    /// The generations alone, for a fetch that was not preceded by a lookup (a background
    /// revalidation); `None` when Redis cannot say.
    pub async fn generations(&self, key: &str, tags: &[String]) -> Option<Generations> {
        self.read(key, tags, false).await.map(|(_, g)| g)
    }

    /// One `MGET`: the entry (when `with_entry`), the global generation and the groups'.
    async fn read(
        &self,
        key: &str,
        tags: &[String],
        with_entry: bool,
    ) -> Option<(Option<Vec<u8>>, Generations)> {
        let groups = groups(key, tags);
        let mut keys = Vec::with_capacity(groups.len() + 2);
        if with_entry {
            keys.push(self.entry_key(key));
        }
        keys.push(self.global_key());
        keys.extend(groups.iter().map(|g| self.generation_key(g)));
        let mut bounds = vec![MAX_GENERATION_BYTES; keys.len()];
        if with_entry {
            bounds[0] = self.max_entry_bytes;
        }
        let mut values = self.bounded_get(keys, &bounds, None).await.ok()?;
        let entry = if with_entry {
            values.next().flatten()
        } else {
            None
        };
        let global = generation(values.next().flatten());
        let generations = Generations {
            global,
            groups: groups.into_iter().zip(values.map(generation)).collect(),
        };
        Some((entry, generations))
    }

    /// Loads the read script into Redis (`SCRIPT LOAD`), so a lookup's `EVALSHA` finds it:
    /// one round trip, as the `MGET` it replaced. Failing costs nothing but that: the first
    /// lookup loads it then (and so after a Redis restart, which empties its script cache).
    pub async fn load_scripts(&self) {
        let loaded = self
            .redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                READ.prepare_invoke().load_async(&mut c).await
            })
            .await;
        if let Err(e) = loaded {
            tracing::debug!(error = %e, "the shared tier's read script could not be loaded yet");
        }
    }

    /// One call reading `keys`, each within its bound in `bounds` (a value over it reads as
    /// missing), and then, with `lock`, whether that fill lock is held (see [`READ`]): the
    /// values in order, the lock's last. An error when Redis cannot say (down, slow,
    /// refusing, or an answer of the wrong length).
    async fn bounded_get(
        &self,
        keys: Vec<String>,
        bounds: &[usize],
        lock: Option<&str>,
    ) -> Result<std::vec::IntoIter<Option<Vec<u8>>>, Unavailable> {
        let expected = keys.len() + usize::from(lock.is_some());
        let mut args = vec![keys.len().to_string()];
        args.extend(bounds.iter().map(ToString::to_string));
        let mut keys = keys;
        if let Some(lock) = lock {
            keys.push(lock.to_string());
            args.push(super::fill::LOCK_TTL.as_millis().to_string());
        }
        let values = self
            .redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                let mut call = READ.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                for a in &args {
                    call.arg(a);
                }
                call.invoke_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await?;
        if values.len() != expected {
            return Err(Unavailable::Command(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the read script answered another count of values than it was asked",
            ))));
        }
        Ok(values.into_iter())
    }

    /// Writes `value` (stored under `storage_key` for primary key `key`, in the neutral form
    /// every replica localizes: see [`Localize`]) for every replica,
    /// unless a generation in `since` moved, its tags are not the ones looked up, or it is over
    /// the bound. Its Redis expiry is the end of its longer stale window.
    pub async fn write(
        &self,
        key: &str,
        storage_key: &str,
        value: &CachedResponse,
        since: &Generations,
    ) {
        let expected = groups(key, &value.tags);
        if expected.len() != since.groups.len()
            || expected.iter().zip(&since.groups).any(|(g, (s, _))| g != s)
        {
            // The route's tags changed between the lookup and the answer (a reload).
            self.writes.with_label_values(&["invalidated"]).inc();
            return;
        }
        let Some(blob) = encode(storage_key, value, &since.global, self.max_entry_bytes) else {
            self.writes.with_label_values(&["too_large"]).inc();
            return;
        };
        let left = value
            .lifetime()
            .saturating_sub(value.age(Instant::now()))
            .as_millis();
        if left == 0 {
            return;
        }
        let mut keys = vec![self.entry_key(key), self.global_key()];
        keys.extend(since.groups.iter().map(|(g, _)| self.generation_key(g)));
        keys.extend(since.groups.iter().map(|(g, _)| self.set_key(g)));
        let mut args: Vec<Vec<u8>> = vec![blob, left.to_string().into_bytes()];
        args.push(since.global.clone().into_bytes());
        args.extend(since.groups.iter().map(|(_, gen)| gen.clone().into_bytes()));
        let stored = self
            .redis
            .run_within("cache", BACKGROUND_CALL_TIMEOUT, |mut c| async move {
                let mut call = WRITE.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                for a in &args {
                    call.arg(a.as_slice());
                }
                call.invoke_async::<i64>(&mut c).await
            })
            .await;
        let result = match stored {
            Ok(1) => "stored",
            Ok(_) => "invalidated",
            Err(_) => "error",
        };
        self.writes.with_label_values(&[result]).inc();
    }

    /// [`SharedTier::write`] in a task of its own, then `lock` (this replica's fill of the
    /// key) released, waited for here up to [`CALL_TIMEOUT`]: on a healthy Redis the entry
    /// is there for every replica before the client has its answer, and on a slow one the
    /// client does not wait for it, while the replicas waiting on the lock find the entry
    /// once it has landed. With [`WRITES_IN_FLIGHT`] writes already out the answer stays in
    /// this replica's memory (counted as an error).
    pub(super) async fn write_behind(
        &self,
        key: String,
        storage_key: String,
        value: CachedResponse,
        since: Generations,
        lock: Option<FillLock>,
    ) {
        let Ok(permit) = self.writing.clone().try_acquire_owned() else {
            self.writes.with_label_values(&["error"]).inc();
            tracing::debug!(
                key,
                "shared cache writes backed up: this answer stays in memory"
            );
            if let Some(lock) = lock {
                tokio::spawn(lock.release());
            }
            return;
        };
        let tier = self.clone();
        let written = tokio::spawn(async move {
            tier.write(&key, &storage_key, &value, &since).await;
            drop(permit);
            if let Some(lock) = lock {
                lock.release().await;
            }
        });
        // Past the bound the task goes on by itself (a timeout drops the handle, not the task).
        let _ = tokio::time::timeout(CALL_TIMEOUT, written).await;
    }

    /// Removes what `what` names from the shared tier: a tag's or a path's entries (bumping
    /// their generations), or every entry (bumping the global generation, which retires
    /// every entry written before it). Returns how many entries were deleted (0 for all).
    pub async fn invalidate(&self, what: &Invalidation) -> Result<u64, Unavailable> {
        let groups: Vec<String> = match what {
            Invalidation::Tags(tags) => tags.iter().map(|t| format!("tag:{t}")).collect(),
            Invalidation::Path(path) => vec![format!("path:{}", normalize_path(path))],
            Invalidation::All => {
                let global = self.global_key();
                return self
                    .redis
                    .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                        redis::cmd("INCRBY")
                            .arg(&global)
                            .arg(1)
                            .query_async::<i64>(&mut c)
                            .await
                    })
                    .await
                    .map(|_| 0);
            }
        };
        if groups.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = groups
            .iter()
            .flat_map(|g| [self.generation_key(g), self.set_key(g)])
            .collect();
        let kept = GENERATION_KEPT.as_millis().to_string();
        self.redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                let mut call = INVALIDATE.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                call.arg(&kept).invoke_async::<u64>(&mut c).await
            })
            .await
    }
}

/// Milliseconds since the Unix epoch of `at` (tokio's clock), by the wall clock now: what
/// another replica can turn back into an age.
fn wall_millis(at: Instant) -> i64 {
    let age = Instant::now().saturating_duration_since(at);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(now.saturating_sub(age).as_millis()).unwrap_or(i64::MAX)
}

/// The instant on tokio's clock that is as old as wall-clock `millis` is now; an entry
/// stamped ahead of this replica's clock counts as just stored.
fn local_instant(millis: i64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamped = Duration::from_millis(u64::try_from(millis).unwrap_or(0));
    let age = now.saturating_sub(stamped);
    let here = Instant::now();
    here.checked_sub(age).unwrap_or(here)
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The entry as stored in Redis: [`MAGIC`], the global generation it was written under,
/// stored-at (Unix ms), the three windows (ms), the status, then the storage key, the tags,
/// the headers (each length-prefixed) and the body. What the memory entry keeps, nothing
/// more, in the neutral form ([`Localize`]): its headers are the stored ones, so no token
/// or cookie is in it. `None` when it would exceed `max` bytes.
fn encode(storage_key: &str, value: &CachedResponse, global: &str, max: usize) -> Option<Vec<u8>> {
    let headers: Vec<(&HeaderName, &HeaderValue)> = value.stored_headers().collect();
    let size = 4
        + 2
        + global.len()
        + 8
        + 12
        + 2
        + 4
        + storage_key.len()
        + 2
        + value.tags.iter().map(|t| 2 + t.len()).sum::<usize>()
        + 2
        + headers
            .iter()
            .map(|(n, v)| 2 + n.as_str().len() + 4 + v.len())
            .sum::<usize>()
        + value.body.len();
    if size > max {
        return None;
    }
    let mut out = Vec::with_capacity(size);
    out.put_slice(MAGIC);
    out.put_u16_le(u16::try_from(global.len()).ok()?);
    out.put_slice(global.as_bytes());
    out.put_i64_le(wall_millis(value.stored_at));
    for window in [
        value.ttl,
        value.stale_while_revalidate,
        value.stale_if_error,
    ] {
        out.put_u32_le(millis(window));
    }
    out.put_u16_le(value.status.as_u16());
    out.put_u32_le(u32::try_from(storage_key.len()).ok()?);
    out.put_slice(storage_key.as_bytes());
    out.put_u16_le(u16::try_from(value.tags.len()).ok()?);
    for tag in &value.tags {
        out.put_u16_le(u16::try_from(tag.len()).ok()?);
        out.put_slice(tag.as_bytes());
    }
    out.put_u16_le(u16::try_from(headers.len()).ok()?);
    for (name, v) in headers {
        out.put_u16_le(u16::try_from(name.as_str().len()).ok()?);
        out.put_slice(name.as_str().as_bytes());
        out.put_u32_le(u32::try_from(v.len()).ok()?);
        out.put_slice(v.as_bytes());
    }
    out.put_slice(&value.body);
    Some(out)
}

/// Reads what [`encode`] wrote, checking every part (anyone who may write to Redis may write
/// anything there): the global generation it was written under, and the entry.
fn decode(blob: &[u8]) -> Result<(String, Found), &'static str> {
    let mut at = Bytes::copy_from_slice(blob);
    let take = |at: &mut Bytes, n: usize| -> Result<Bytes, &'static str> {
        if at.remaining() < n {
            return Err("entry cut short");
        }
        Ok(at.split_to(n))
    };
    let text = |b: Bytes| String::from_utf8(b.to_vec()).map_err(|_| "text that is not UTF-8");
    match take(&mut at, 4)?.as_ref() {
        magic if magic == MAGIC => {}
        [c, x, g, digit] if [*c, *x, *g] == *FORMAT_PREFIX && digit.is_ascii_digit() => {
            return Err(OTHER_FORMAT)
        }
        _ => return Err("not a cxgate entry"),
    }
    let n = usize::from(take(&mut at, 2)?.get_u16_le());
    let global = text(take(&mut at, n)?)?;
    let stored_millis = take(&mut at, 8)?.get_i64_le();
    let mut windows = take(&mut at, 12)?;
    let mut window = || Duration::from_millis(u64::from(windows.get_u32_le()));
    let (ttl, swr, sie) = (window(), window(), window());
    let status =
        StatusCode::from_u16(take(&mut at, 2)?.get_u16_le()).map_err(|_| "invalid status")?;
    let n = take(&mut at, 4)?.get_u32_le() as usize;
    let storage_key = text(take(&mut at, n)?)?;
    let count = take(&mut at, 2)?.get_u16_le();
    let mut tags = Vec::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        let n = usize::from(take(&mut at, 2)?.get_u16_le());
        tags.push(text(take(&mut at, n)?)?);
    }
    let count = take(&mut at, 2)?.get_u16_le();
    let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
    for _ in 0..count {
        let n = usize::from(take(&mut at, 2)?.get_u16_le());
        let name = HeaderName::from_bytes(&take(&mut at, n)?).map_err(|_| "invalid header")?;
        let n = take(&mut at, 4)?.get_u32_le() as usize;
        let value =
            HeaderValue::from_maybe_shared(take(&mut at, n)?).map_err(|_| "invalid header")?;
        headers.append(name, value);
    }
    let value = CachedResponse {
        status,
        headers,
        body: at,
        tags: tags.into_boxed_slice(),
        stored_at: local_instant(stored_millis),
        ttl,
        stale_while_revalidate: swr,
        stale_if_error: sie,
    };
    Ok((global, Found { value, storage_key }))
}

/// A generation counter as read from Redis: a missing key is generation 0.
fn generation(value: Option<Vec<u8>>) -> String {
    value.map_or_else(|| "0".to_string(), |b| String::from_utf8_lossy(&b).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> CachedResponse {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert(
            "date",
            HeaderValue::from_static("Tue, 24 Nov 2026 09:00:00 GMT"),
        );
        CachedResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{\"id\":1}"),
            tags: vec!["me".to_owned(), "account:7".to_owned()].into_boxed_slice(),
            stored_at: Instant::now(),
            ttl: Duration::from_secs(600),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(3600),
        }
    }

    #[tokio::test]
    async fn an_entry_survives_the_round_trip_with_its_age() {
        let mut e = entry();
        e.stored_at = Instant::now() - Duration::from_secs(30);
        let blob = encode("GET /me", &e, "4", 1 << 20).expect("encodes");
        let (global, found) = decode(&blob).expect("decodes");
        assert_eq!(global, "4");
        assert_eq!(found.storage_key, "GET /me");
        let v = found.value;
        assert_eq!((v.status, &v.body, &v.tags), (e.status, &e.body, &e.tags));
        assert_eq!(
            (v.ttl, v.stale_while_revalidate, v.stale_if_error),
            (e.ttl, e.stale_while_revalidate, e.stale_if_error)
        );
        let age = v.age(Instant::now()).as_secs_f64();
        assert!(
            (29.0..32.0).contains(&age),
            "expected the age to stay about 30 s, saw {age}"
        );
        assert_eq!(v.headers.get("content-type"), e.headers.get("content-type"));
        assert!(
            v.headers.get("date").is_none(),
            "expected only the stored headers, saw {:?}",
            v.headers
        );
    }

    #[tokio::test]
    async fn an_entry_over_the_bound_is_not_encoded() {
        let e = entry();
        let size = encode("GET /me", &e, "0", 1 << 20).expect("encodes").len();
        assert!(
            encode("GET /me", &e, "0", size).is_some(),
            "exactly the bound fits"
        );
        assert!(
            encode("GET /me", &e, "0", size - 1).is_none(),
            "one byte over does not"
        );
    }

    #[tokio::test]
    async fn damaged_entries_are_refused_not_trusted() {
        let blob = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
        // Every cut before the body (the last 8 bytes) leaves a part unreadable.
        for cut in [0, 3, 10, 40, blob.len() - 9] {
            assert!(
                decode(&blob[..cut]).is_err(),
                "expected a cut at {cut} refused"
            );
        }
        let mut wrong = blob.clone();
        wrong[0] = b'x';
        assert_eq!(decode(&wrong).err(), Some("not a cxgate entry"));
    }

    #[tokio::test]
    async fn entries_of_other_formats_are_told_apart_and_not_read() {
        for magic in [b"cxg1", b"cxg3"] {
            let mut other = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
            other[..4].copy_from_slice(magic);
            assert_eq!(
                decode(&other).err(),
                Some(OTHER_FORMAT),
                "expected {magic:?} passed over as another format"
            );
        }
    }
}
