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
use super::lua::{BUMP_ALL, INVALIDATE, RAISE, READ, WRITE};
use crate::replicas::{
    Invalidation, Redis, Unavailable, BACKGROUND_CALL_TIMEOUT, CALL_TIMEOUT, PATIENT_CALL_TIMEOUT,
};

/// The longest generation read: a counter's decimal digits (a longer value is junk and
/// reads as missing, which only makes a write look stale and be refused; the global one
/// reads as not a count, and is replaced).
const MAX_GENERATION_BYTES: usize = 32;

/// How long a group's generation outlives its last bump: far longer than any fetch takes,
/// so no write looked up before the bump can see the generation vanish and pass.
const GENERATION_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Writes to the tier in flight at once, at most: on a Redis slow enough to hold them all
/// for their bound, further answers stay in their replica's memory rather than pile up.
const WRITES_IN_FLIGHT: usize = 128;

/// Leads every stored entry; anything else under an entry key is not read. The digit is
/// the format: `cxg3` entries hold the neutral form (see [`Localize`]) and their body's
/// length.
const MAGIC: &[u8; 4] = b"cxg3";

/// What leads an entry of any format (`cxg` and a digit): `cxg1` led the first, whose
/// links named the writing replica's own base; `cxg2` did not carry its body's length.
/// Another version's entries are passed over (a miss, overwritten by the next fill), never
/// read: during a rolling upgrade across a format change each version fills and serves its
/// own, and the others' expire.
const FORMAT_PREFIX: &[u8; 3] = b"cxg";

/// Why [`decode`] refuses an entry of another format than [`MAGIC`]'s.
const OTHER_FORMAT: &str = "an entry of another format";

/// How far ahead of this replica's clock an entry's fetched time may be and still be read
/// (as fetched now): replicas' clocks differ by that much at most where NTP runs. Past it
/// the entry is refused: an entry stamped in the future would never age.
const CLOCK_SKEW: Duration = Duration::from_secs(2);

/// The reading replica's route's windows: the most an entry read from the tier may claim,
/// whatever its writer (or anyone else who can write to Redis) put in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// How a replica takes an entry from the shared tier into its own form. Replicas may have
/// different public bases, so the tier keeps every answer in one form none of them serves
/// (its links at the upstream's own base), and each replica moves them to its base once,
/// as the entry enters its memory, so memory hits cost what they cost without the tier.
pub trait Localize: Sync {
    /// `headers` and `body` as this replica serves them; `None` when they stay as they are.
    fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)>;
    /// Whether an entry read from the tier must not be served at all: it holds a token
    /// this replica holds, which no replica writes there (every answer is redacted before
    /// it is stored), so someone else wrote it.
    fn refuses(&self, headers: &HeaderMap, body: &Bytes) -> bool {
        let _ = (headers, body);
        false
    }
}

/// A [`Localize`] with the reading route's own [`Windows`]: what a read hands the store.
/// The windows bound what an entry read from the tier may claim: [`decode`] cuts an
/// entry's to them (on the lookup, and on each look of a fill wait, through the
/// [`Generations`] the lookup read), so a replica whose table says less than the
/// writer's serves and keeps the entry no longer than its own say.
pub struct Routed<'a> {
    pub local: &'a dyn Localize,
    pub windows: Windows,
    /// The tokens this replica holds (access, refresh, the ones it still accepts answers
    /// for): an entry holding one in any spelling is refused ([`Localize::refuses`]).
    pub secrets: &'a [&'a str],
}

impl Localize for Routed<'_> {
    fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)> {
        self.local.localize(headers, body)
    }

    fn refuses(&self, headers: &HeaderMap, body: &Bytes) -> bool {
        use crate::upstream::hidden::hides_secret;
        hides_secret(body, self.secrets)
            || headers.iter().any(|(name, value)| {
                hides_secret(value.as_bytes(), self.secrets)
                    || hides_secret(name.as_str().as_bytes(), self.secrets)
            })
    }
}

/// The generations an entry was looked up under: the global one (bumped by a full purge) and
/// one per group (each tag, and the entry's path). A write passes only while all still hold,
/// so an answer fetched before an invalidation that ran meanwhile on any replica is not
/// stored; one written before it is in the group's set, and the invalidation deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generations {
    global: u64,
    groups: Vec<(String, String)>,
    /// The route's windows at the lookup: what an entry read later for it may claim.
    bounds: Windows,
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
/// [`READ`] call); an answer fetched upstream is written for every replica by a script that first
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
    /// The highest global generation this replica has seen (read, bumped, or heard of): a
    /// generation only goes forward, so an entry written before a purge stays retired when
    /// Redis loses or resets the counter, and the counter is put back (see [`RAISE`]).
    highest: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Whether the log said that the global generation went back (until it is seen whole).
    told_behind: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// A [`RAISE`] is on its way: the reads that see the generation behind meanwhile do not
    /// send one each.
    raising: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The last call that failed: when, and why (as [`Unavailable`] shows it).
    last_error: std::sync::Arc<std::sync::Mutex<Option<(SystemTime, String)>>>,
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

/// Every `cxgate_cache_shared_lookups_total` result.
const LOOKUP_RESULTS: &[&str] = &["hit", "miss", "other_format", "invalid", "error", "filled"];
/// Every `cxgate_cache_shared_writes_total` result.
const WRITE_RESULTS: &[&str] = &["stored", "invalidated", "too_large", "error"];

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
                 other_format: an entry of another cxgate version passed over, invalid: an \
                 unreadable, implausible or oversized entry passed over, error; filled: \
                 misses answered afterwards from another replica's fill).",
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
        for result in LOOKUP_RESULTS {
            lookups.with_label_values(&[result]);
        }
        for result in WRITE_RESULTS {
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
            highest: std::sync::Arc::default(),
            told_behind: std::sync::Arc::default(),
            raising: std::sync::Arc::default(),
            last_error: std::sync::Arc::default(),
        }
    }

    /// What `/admin/status` shows of the tier: on, whether Redis answers, the lookups and
    /// writes by result (as the metrics count them), the entry bound, and the last failed
    /// call. How many entries and bytes Redis holds is not shown: only a scan of the
    /// keyspace could tell, which no replica runs.
    pub fn status(&self) -> serde_json::Value {
        let by_result = |counter: &IntCounterVec, results: &[&str]| {
            results
                .iter()
                .map(|r| {
                    let n = counter.with_label_values(&[r]).get();
                    (r.to_string(), serde_json::Value::from(n))
                })
                .collect::<serde_json::Map<_, _>>()
        };
        let last = self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "enabled": true,
            "redis_reachable": self.redis.is_up(),
            "max_entry_bytes": self.max_entry_bytes,
            "lookups": by_result(&self.lookups, LOOKUP_RESULTS),
            "writes": by_result(&self.writes, WRITE_RESULTS),
            "last_error": last.as_ref().map(|(_, why)| why.clone()),
            "last_error_at": last
                .map(|(at, _)| humantime::format_rfc3339_seconds(at).to_string()),
        })
    }

    /// Remembers a failed call for [`SharedTier::status`].
    fn failed(&self, why: &Unavailable) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((SystemTime::now(), why.to_string()));
    }

    /// Loads the tier's scripts into Redis, so the first lookups do not each pay the three
    /// round trips of a script Redis does not know yet (`NOSCRIPT`, load, call again): on a
    /// slow Redis those overran the lookup's bound. A failure is left to the calls, which
    /// load a script themselves when Redis lost it (a restart).
    pub async fn preload(&self) {
        let _ = self
            .redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                for script in [&*READ, &*WRITE, &*INVALIDATE, &*BUMP_ALL, &*RAISE] {
                    script.prepare_invoke().load_async(&mut c).await?;
                }
                Ok(())
            })
            .await;
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
    /// path), read at once; the entry claims no more than `bounds`, the route's windows.
    /// `None` when Redis is down, slow or refuses: memory only then.
    pub async fn lookup(
        &self,
        key: &str,
        tags: &[String],
        bounds: Windows,
    ) -> Option<(Option<Found>, Generations)> {
        let Some((entry, generations)) = self.read(key, tags, true, bounds).await else {
            self.lookups.with_label_values(&["error"]).inc();
            return None;
        };
        let found = match entry {
            Entry::Absent => None,
            Entry::Oversized(size) => {
                let why = if size == "-1" {
                    "a key of another type than a string".to_string()
                } else {
                    format!("{size} bytes, over cache.shared_max_entry_bytes")
                };
                self.invalid(key, &why);
                return Some((None, generations));
            }
            Entry::Read(blob) => match decode(&blob, &bounds) {
                // Written before the last full purge: gone for every reader.
                Ok((written_under, found)) => {
                    (written_under == generations.global).then_some(found)
                }
                Err(OTHER_FORMAT) => {
                    if !self
                        .told_format
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::info!(
                            key,
                            "passing over shared cache entries of another format (another \
                             cxgate version wrote them, as in a rolling upgrade): each version \
                             fills and serves its own, the others' expire; counted in \
                             cxgate_cache_shared_lookups_total{{result=\"other_format\"}}"
                        );
                    }
                    self.lookups.with_label_values(&["other_format"]).inc();
                    return Some((None, generations));
                }
                Err(why) => {
                    self.invalid(key, why);
                    return Some((None, generations));
                }
            },
        };
        let usable = found.filter(|f| f.value.freshness(Instant::now()).is_usable());
        let result = if usable.is_some() { "hit" } else { "miss" };
        self.lookups.with_label_values(&[result]).inc();
        Some((usable, generations))
    }

    /// Counts an entry of `key` passed over as invalid (also as a repair of the key: it is
    /// fetched again and overwritten), and says so once per incident.
    fn invalid(&self, key: &str, why: &str) {
        self.lookups.with_label_values(&["invalid"]).inc();
        self.redis.repaired(
            &self.entry_key(key),
            &format!(
                "passing over an invalid shared cache entry ({why}: damaged, or written by \
                 someone else than a replica): the key is fetched again and the entry \
                 overwritten; counted in cxgate_cache_shared_lookups_total{{result=\"invalid\"}}"
            ),
        );
    }

    /// Counts an entry of `key` refused because it holds a token this replica holds (see
    /// [`Localize::refuses`]): invalid, and a repair of the key.
    pub(super) fn holds_token(&self, key: &str) {
        self.invalid(
            key,
            "it holds a token this gateway holds, which no replica stores",
        );
    }

    /// Counts a miss looked up here that another replica's fill then answered.
    pub(super) fn count_filled(&self) {
        self.lookups.with_label_values(&["filled"]).inc();
    }

    /// The largest entry read or written, in bytes (a fill's failure note too).
    pub(super) fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// The Redis handle, for the fill lock kept beside the entries (see `fill`).
    pub(super) fn redis(&self) -> &Redis {
        &self.redis
    }

    /// In one call: the entry under primary key `key` if it is fresh, was written since the
    /// last full purge and claims no more than `since`'s bounds, and the value of the Redis
    /// key `lock` while it exists (which fill of the key holds it). Not counted as a lookup: a replica waiting for another's fill polls
    /// with it. An error when Redis cannot say (see [`Unavailable::is_slow`] for one that
    /// may answer the next look).
    pub(super) async fn peek(
        &self,
        key: &str,
        lock: &str,
        since: &Generations,
    ) -> Result<(Option<Found>, Option<Vec<u8>>), Unavailable> {
        let keys = vec![self.entry_key(key), self.global_key()];
        let (entry, mut values) = self.read_bounded(keys, Some(lock)).await?;
        let (global, held) = (values.next().flatten(), values.next().flatten());
        let global = self.seen_global(global);
        let found = match entry {
            Entry::Read(blob) => decode(&blob, &since.bounds).ok(),
            _ => None,
        }
        .filter(|(written_under, _)| *written_under == global)
        .map(|(_, found)| found)
        .filter(|f| {
            matches!(
                f.value.freshness(Instant::now()),
                super::entry::Freshness::Fresh { .. }
            )
        });
        Ok((found, held))
    }

    /// The generations alone, for a fetch that was not preceded by a lookup (a background
    /// revalidation); `None` when Redis cannot say.
    pub async fn generations(
        &self,
        key: &str,
        tags: &[String],
        bounds: Windows,
    ) -> Option<Generations> {
        self.read(key, tags, false, bounds).await.map(|(_, g)| g)
    }

    /// One call: the entry (when `with_entry`), the global generation and the groups'.
    async fn read(
        &self,
        key: &str,
        tags: &[String],
        with_entry: bool,
        bounds: Windows,
    ) -> Option<(Entry, Generations)> {
        let groups = groups(key, tags);
        let mut keys = Vec::with_capacity(groups.len() + 2);
        // Without an entry to read, the script reads a key no entry is stored under.
        keys.push(if with_entry {
            self.entry_key(key)
        } else {
            self.redis.key("cache:no-entry")
        });
        keys.push(self.global_key());
        keys.extend(groups.iter().map(|g| self.generation_key(g)));
        let (entry, mut values) = self.read_bounded(keys, None).await.ok()?;
        let global = self.seen_global(values.next().flatten());
        let generations = Generations {
            global,
            groups: groups.into_iter().zip(values.map(generation)).collect(),
            bounds,
        };
        Some((entry, generations))
    }

    /// One [`READ`] of `keys` (the entry, the global generation, then generations), each
    /// generation within [`MAX_GENERATION_BYTES`], and then, with `lock`, whether that fill
    /// lock is held (a lock planted with no expiry or one past the lease is deleted and
    /// answers as not held: see [`READ`]): the entry, then the others' values in order, the
    /// lock's last. An error when Redis cannot say (down, slow, refusing, or an answer of
    /// the wrong length).
    async fn read_bounded(
        &self,
        keys: Vec<String>,
        lock: Option<&str>,
    ) -> Result<(Entry, std::vec::IntoIter<Option<Vec<u8>>>), Unavailable> {
        let expected = keys.len() + 1 + usize::from(lock.is_some());
        let mut args = vec![
            self.max_entry_bytes.to_string(),
            MAX_GENERATION_BYTES.to_string(),
        ];
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
            .await
            .inspect_err(|e| self.failed(e))?;
        if values.len() != expected {
            return Err(Unavailable::Command(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "the shared cache read answered another count of values than it was asked",
            ))));
        }
        let mut values = values.into_iter();
        let entry = match (values.next().flatten(), values.next().flatten()) {
            (Some(blob), _) => Entry::Read(blob),
            (None, Some(size)) => Entry::Oversized(String::from_utf8_lossy(&size).into_owned()),
            (None, None) => Entry::Absent,
        };
        Ok((entry, values))
    }

    /// The global generation as it counts here: what Redis holds (`raw`; absent is 0), or
    /// the highest this replica has seen when Redis holds less or something that is not a
    /// count (the key was lost, evicted, reset or overwritten). Then Redis is put back to
    /// that, in the background, and the log says so once per such incident.
    fn seen_global(&self, raw: Option<Vec<u8>>) -> u64 {
        use std::sync::atomic::Ordering;
        let observed = match raw {
            None => Some(0),
            Some(b) => std::str::from_utf8(&b)
                .ok()
                .filter(|t| !t.is_empty() && t.len() <= 15 && t.bytes().all(|c| c.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok()),
        };
        let highest = self
            .highest
            .fetch_max(observed.unwrap_or(0), Ordering::AcqRel)
            .max(observed.unwrap_or(0));
        if observed == Some(highest) {
            self.told_behind.store(false, Ordering::Relaxed);
            return highest;
        }
        if !self.told_behind.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                highest,
                seen = observed.map_or_else(|| "not a count".to_string(), |g| g.to_string()),
                "the shared cache's global generation went back (lost, evicted or overwritten \
                 in Redis): entries purged before stay retired, and Redis is set back to the \
                 highest generation this replica has seen"
            );
        }
        if !self.raising.swap(true, Ordering::AcqRel) {
            let tier = self.clone();
            tokio::spawn(async move {
                let _ = tier.raise_global(highest).await;
                tier.raising.store(false, Ordering::Release);
            });
        }
        highest
    }

    /// Runs [`RAISE`] with `floor`: the generation Redis holds afterwards, remembered here.
    async fn raise_global(&self, floor: u64) -> Result<u64, Unavailable> {
        let (now, _set) = self.move_global(&RAISE, floor).await?;
        Ok(now)
    }

    /// Runs `script` (one of [`RAISE`] and [`BUMP_ALL`]) on the global generation with
    /// `floor`: the generation Redis holds afterwards, remembered here, and the script's flag.
    async fn move_global(
        &self,
        script: &'static redis::Script,
        floor: u64,
    ) -> Result<(u64, u64), Unavailable> {
        let global = self.global_key();
        let (now, flag): (u64, u64) = self
            .redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                script
                    .key(&global)
                    .arg(floor)
                    .invoke_async::<(u64, u64)>(&mut c)
                    .await
            })
            .await?;
        self.highest
            .fetch_max(now, std::sync::atomic::Ordering::AcqRel);
        Ok((now, flag))
    }

    /// Learns the global generation from Redis (after another replica's full purge, whose
    /// bump this replica did not see), putting it back there if it went behind what this
    /// replica had seen: a purge heard of is never undone by a lost key.
    pub async fn learn_global(&self) {
        let highest = self.highest.load(std::sync::atomic::Ordering::Acquire);
        let _ = self.raise_global(highest).await;
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
        let global = since.global.to_string();
        let Some(blob) = encode(storage_key, value, &global, self.max_entry_bytes) else {
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
        args.push(global.into_bytes());
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
            Err(e) => {
                self.failed(&e);
                "error"
            }
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
            Invalidation::All => return self.bump_global().await.map(|_| 0),
        };
        if groups.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = groups
            .iter()
            .flat_map(|g| [self.generation_key(g), self.set_key(g)])
            .collect();
        let kept = GENERATION_KEPT.as_millis().to_string();
        let entries = self.entry_key("");
        let (removed, replaced): (u64, u64) = self
            .redis
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                let mut call = INVALIDATE.prepare_invoke();
                for k in &keys {
                    call.key(k);
                }
                call.arg(&kept)
                    .arg(&entries)
                    .invoke_async::<(u64, u64)>(&mut c)
                    .await
            })
            .await
            .inspect_err(|e| self.failed(e))?;
        if replaced > 0 {
            self.redis.repaired(
                &self.global_key(),
                &format!(
                    "replaced {replaced} shared cache generations or sets of the wrong type in \
                     Redis (written by someone else than a replica) invalidating {what:?}"
                ),
            );
        }
        Ok(removed)
    }

    /// Bumps the global generation past both Redis's and the highest seen here (see
    /// [`BUMP_ALL`]); the new one is remembered.
    async fn bump_global(&self) -> Result<u64, Unavailable> {
        let floor = self.highest.load(std::sync::atomic::Ordering::Acquire);
        let (now, replaced) = self.move_global(&BUMP_ALL, floor).await?;
        if replaced > 0 {
            self.redis.repaired(
                &self.global_key(),
                &format!(
                    "replaced the shared cache's global generation in Redis (now {now}): it \
                     held something else than a count (written by someone else than a replica)"
                ),
            );
        }
        Ok(now)
    }
}

/// What [`READ`] found under an entry key.
enum Entry {
    Absent,
    /// Over the bound (its size in bytes, or `-1` for a key of another type): not read.
    Oversized(String),
    Read(Vec<u8>),
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
/// stamped ahead of this replica's clock by up to [`CLOCK_SKEW`] counts as just stored,
/// one stamped further ahead is refused (`None`): it would never age.
fn local_instant(millis: i64) -> Option<Instant> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let stamped = Duration::from_millis(u64::try_from(millis).ok()?);
    if stamped > now + CLOCK_SKEW {
        return None;
    }
    let age = now.saturating_sub(stamped);
    let here = Instant::now();
    Some(here.checked_sub(age).unwrap_or(here))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The entry as stored in Redis: [`MAGIC`], the global generation it was written under,
/// stored-at (Unix ms), the three windows (ms), the status, then the storage key, the tags,
/// the headers (each length-prefixed), the body's length and the body. What the memory entry keeps, nothing
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
        + 4
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
    out.put_u32_le(u32::try_from(value.body.len()).ok()?);
    out.put_slice(&value.body);
    Some(out)
}

/// Reads what [`encode`] wrote, checking every part (anyone who may write to Redis may write
/// anything there): the global generation it was written under, and the entry. Refused: a
/// status the gateway does not store, a body of another length than the entry says, a
/// fetched time in the future; windows longer than `bounds` (the reading route's) are cut
/// to them, so no entry outlives what the route allows.
fn decode(blob: &[u8], bounds: &Windows) -> Result<(u64, Found), &'static str> {
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
    let global = Some(global.as_str())
        .filter(|g| !g.is_empty() && g.bytes().all(|c| c.is_ascii_digit()))
        .and_then(|g| g.parse::<u64>().ok())
        .ok_or("a generation that is not a count")?;
    let stored_millis = take(&mut at, 8)?.get_i64_le();
    let stored_at = local_instant(stored_millis).ok_or("a fetched time in the future")?;
    let mut windows = take(&mut at, 12)?;
    let mut window =
        |bound: Duration| Duration::from_millis(u64::from(windows.get_u32_le())).min(bound);
    let ttl = window(bounds.ttl);
    let swr = window(bounds.stale_while_revalidate);
    let sie = window(bounds.stale_if_error);
    let status =
        StatusCode::from_u16(take(&mut at, 2)?.get_u16_le()).map_err(|_| "invalid status")?;
    if !super::entry::stored_status(status) {
        return Err("a status the gateway does not store");
    }
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
    let length = take(&mut at, 4)?.get_u32_le() as usize;
    if at.remaining() != length {
        return Err("a body of another length than the entry says");
    }
    if status == StatusCode::NO_CONTENT && length > 0 {
        return Err("a 204 with a body");
    }
    let value = CachedResponse {
        status,
        headers,
        body: at,
        tags: tags.into_boxed_slice(),
        stored_at,
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

    /// Windows longer than any test entry's: nothing is cut.
    const WIDE: Windows = Windows {
        ttl: Duration::from_secs(86_400),
        stale_while_revalidate: Duration::from_secs(86_400),
        stale_if_error: Duration::from_secs(86_400),
    };

    #[tokio::test]
    async fn an_entry_survives_the_round_trip_with_its_age() {
        let mut e = entry();
        e.stored_at = Instant::now() - Duration::from_secs(30);
        let blob = encode("GET /me", &e, "4", 1 << 20).expect("encodes");
        let (global, found) = decode(&blob, &WIDE).expect("decodes");
        assert_eq!(global, 4);
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
        // Every cut leaves a part unreadable, the body's last byte too.
        for cut in [0, 3, 10, 40, blob.len() - 9, blob.len() - 1] {
            assert!(
                decode(&blob[..cut], &WIDE).is_err(),
                "expected a cut at {cut} refused"
            );
        }
        let mut wrong = blob.clone();
        wrong[0] = b'x';
        assert_eq!(decode(&wrong, &WIDE).err(), Some("not a cxgate entry"));
    }

    #[tokio::test]
    async fn entries_of_other_formats_are_told_apart_and_not_read() {
        for magic in [b"cxg1", b"cxg2", b"cxg4"] {
            let mut other = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
            other[..4].copy_from_slice(magic);
            assert_eq!(
                decode(&other, &WIDE).err(),
                Some(OTHER_FORMAT),
                "expected {magic:?} passed over as another format"
            );
        }
    }

    /// Where the fields after the generation start in an encoded entry of generation `g`.
    fn stamp_at(global: &str) -> usize {
        4 + 2 + global.len()
    }

    #[tokio::test]
    async fn an_entry_claims_no_more_than_the_route_allows() {
        let blob = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
        let route = Windows {
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::from_secs(2),
            stale_if_error: Duration::ZERO,
        };
        let (_, found) = decode(&blob, &route).expect("decodes");
        let v = found.value;
        assert_eq!(
            (v.ttl, v.stale_while_revalidate, v.stale_if_error),
            (
                route.ttl,
                route.stale_while_revalidate,
                route.stale_if_error
            ),
            "expected the entry's windows (600 s, 60 s, 3600 s) cut to the route's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_entry_fetched_in_the_future_is_refused_and_a_near_one_is_just_fetched() {
        let blob = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
        let at = stamp_at("0");
        let now = i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_millis(),
        )
        .expect("millis");
        let mut far = blob.clone();
        far[at..at + 8].copy_from_slice(&(now + 10 * 365 * 86_400_000).to_le_bytes());
        assert_eq!(
            decode(&far, &WIDE).err(),
            Some("a fetched time in the future")
        );
        let mut near = blob.clone();
        near[at..at + 8].copy_from_slice(&(now + 500).to_le_bytes());
        let (_, found) = decode(&near, &WIDE).expect("a stamp within the skew decodes");
        assert_eq!(found.value.age(Instant::now()), Duration::ZERO);
    }

    #[tokio::test]
    async fn only_statuses_the_gateway_stores_are_read() {
        let blob = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
        let at = stamp_at("0") + 8 + 12;
        for (status, read) in [(200u16, true), (203, true), (500, false), (302, false)]
            .into_iter()
            .chain([(304, false), (101, false), (999, false), (204, false)])
        {
            let mut planted = blob.clone();
            planted[at..at + 2].copy_from_slice(&status.to_le_bytes());
            assert_eq!(
                decode(&planted, &WIDE).is_ok(),
                read,
                "status {status}: expected read {read}, saw {:?}",
                decode(&planted, &WIDE).err()
            );
        }
        // A 204 the gateway stored has no body: that one is read.
        let mut empty = entry();
        empty.status = StatusCode::NO_CONTENT;
        empty.body = Bytes::new();
        let blob = encode("GET /me", &empty, "0", 1 << 20).expect("encodes");
        assert!(decode(&blob, &WIDE).is_ok(), "expected an empty 204 read");
    }

    #[tokio::test]
    async fn a_body_of_another_length_than_the_entry_says_is_refused() {
        let blob = encode("GET /me", &entry(), "0", 1 << 20).expect("encodes");
        let mut longer = blob.clone();
        longer.push(b' ');
        for (what, planted) in [("cut", &blob[..blob.len() - 1]), ("longer", &longer[..])] {
            assert_eq!(
                decode(planted, &WIDE).err(),
                Some("a body of another length than the entry says"),
                "expected a body {what} by one byte refused"
            );
        }
    }

    #[tokio::test]
    async fn a_generation_that_is_not_a_count_is_refused() {
        let blob = encode("GET /me", &entry(), "x1", 1 << 20).expect("encodes");
        assert_eq!(
            decode(&blob, &WIDE).err(),
            Some("a generation that is not a count")
        );
    }
}
