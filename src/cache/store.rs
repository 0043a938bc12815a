//! The bounded response store: a moka cache weighed in bytes, with tags, `Vary` and purges.
//! It is what makes hits cheap and invalidation exact: it never stays above its byte bound,
//! never serves an entry past its life or one a write has invalidated, and never serves the
//! wrong answer on a hash collision. [`Store`] says how each of those holds.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use prometheus::{IntCounter, Registry};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::deadlines::Deadlines;
use super::entry::{CachedResponse, Freshness, StoredResponse};
use super::fill::FillLock;
use super::key::normalize_path;
use super::shared::{Found, Generations, Localize, Routed, SharedTier, Windows};
use super::stats::Gauges;
use super::tags::{Removed, TagIndex};
use super::vary::{variant_key, Vary};

/// An upper bound on any entry's life, far above real ttls, so a configuration mistake
/// cannot overflow the deadline arithmetic.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// Due entries an insert removes on its way (more than one, so the sweep outpaces inserts).
const SWEEP_PER_INSERT: usize = 8;

/// Due entries one step of a sweep removes before it lets go of the lock.
const SWEEP_STEP: usize = 1024;

/// How often [`Store::spawn_sweeper`]'s task looks for entries past their life.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// What moka holds under a key hash: one packed block, either an answer or, under the
/// primary key of a varying resource, the marker naming the request headers that select its
/// variant (kept in the same cache so it is bounded and purged with the variants). One
/// word, like the block's handle: see [`StoredResponse`].
#[derive(Clone)]
pub(crate) struct Slot(StoredResponse);

impl Slot {
    fn key(&self) -> &str {
        self.0.key()
    }

    /// The answer it holds; `None` for a `Vary` marker.
    fn response(&self) -> Option<&StoredResponse> {
        (!self.0.is_vary_marker()).then_some(&self.0)
    }

    /// When the slot is of no use any more (past ttl and both stale windows; a marker
    /// carries the timing of the variant it was stored with).
    fn deadline(&self) -> Instant {
        Deadlines::deadline(self.0.timing().stored_at, self.0.lifetime(), MAX_LIFETIME)
    }

    fn weight(&self) -> u32 {
        let key = u32::try_from(self.key().len()).unwrap_or(u32::MAX);
        self.0.weight().saturating_add(key)
    }
}

/// The response cache. Cheap to clone: every clone is a handle on the same cache.
///
/// Invariants: the weighted size never stays above `max_bytes` (moka evicts the least
/// valuable entries first); `get` refuses anything past ttl + its longer stale window on
/// tokio's clock, and the store's own sweep (see `Deadlines`) removes such entries, in
/// bounded steps, on inserts, from [`Store::spawn_sweeper`]'s task and in
/// [`Store::run_pending_tasks`]; once `invalidate_tags`, `purge_*` return, no lookup yields
/// an entry they removed. Hits share the stored block, never copy.
///
/// moka is keyed by a 32-bit hash of the cache key, and each entry carries its full key:
/// a lookup whose key differs from the stored one is a miss, so a collision costs one
/// entry its place and never serves the wrong answer. Storing, invalidating and purging
/// change the cache and the tag index under one lock and bump the invalidation epoch
/// there, so an answer fetched before a write either lands before the write's invalidation
/// (and is removed by it) or sees the bumped epoch and is not stored, unless every bump
/// since named tags it does not carry (the invalidation would not have removed it either).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Cache<u32, Slot>,
    /// Changed only together with `entries`, under this lock (see [`Store`]).
    tags: Mutex<Locked>,
    /// Entries moka dropped, queued by the eviction listener and forgotten by the index the
    /// next time it is locked. The listener may run inside a cache call made under `tags`,
    /// so it must not take that lock itself.
    removed: Arc<Mutex<Vec<Removed>>>,
    /// Keys and tags are hashed with one per-process random key.
    hasher: RandomState,
    /// Numbers each stored value (kept in its block, shown by its `Debug`).
    serial: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bumped by every invalidation and purge. A response fetched across a bump may predate
    /// the write that caused it, so [`Store::insert`] refuses it (see [`Store::epoch`])
    /// unless the bumps since were all tag invalidations of other tags ([`Bumps`]).
    epoch: AtomicU64,
    /// With `cache.shared`: the tier in Redis behind this one (see [`Store::get_shared`]).
    shared: std::sync::OnceLock<SharedTier>,
}

/// What a fetch carries from before it asked the upstream to where its answer is stored:
/// the memory store's invalidation epoch and, with a shared tier, the generations its entry
/// was looked up under. An invalidation on this replica (epoch) or any other (generations)
/// since then keeps the answer out of the store it concerns.
#[derive(Debug, Clone)]
pub struct Since {
    epoch: u64,
    shared: Option<Generations>,
}

impl Since {
    /// The memory store's epoch it carries (also what keys merged fetches).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the shared tier's generations were read for this fetch (its lookup reached
    /// Redis): only then may the fetch be merged with other replicas' (see [`Store::take_fill`]).
    pub fn looked_up_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The shared tier's generations read for this fetch, if any.
    pub(super) fn generations(&self) -> Option<&Generations> {
        self.shared.as_ref()
    }
}

/// What the store's lock guards: the tag index, the queue of deadlines and the last bumps.
struct Locked {
    index: TagIndex,
    deadlines: Deadlines,
    bumps: Bumps,
}

/// The epoch bumps kept to judge an answer fetched across them: with writes every second
/// across a fleet, and fetches that wait for budget, most answers of a busy replica cross a
/// bump that concerned another key; refusing them all threw the answer away (memory and the
/// shared tier) and made the next read fetch it again.
const BUMPS_KEPT: usize = 256;

/// The last [`BUMPS_KEPT`] epoch bumps, oldest first: the epoch each made and the tag hashes
/// it named, none for a purge (of a path, of changed routes, of all), which may remove any
/// entry.
#[derive(Default)]
struct Bumps {
    recent: std::collections::VecDeque<(u64, Box<[u32]>)>,
}

impl Bumps {
    fn push(&mut self, epoch: u64, named: Box<[u32]>) {
        if self.recent.len() == BUMPS_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((epoch, named));
    }

    /// Whether an answer carrying `tags`, fetched at epoch `since`, may be stored at epoch
    /// `now`: every bump between is still kept and was a tag invalidation naming none of
    /// `tags`. (A 32-bit collision of tags refuses one answer too many, never one too few.)
    fn spare(&self, since: u64, now: u64, tags: &[u32]) -> bool {
        if since == now {
            return true;
        }
        let mut next = since + 1;
        for (epoch, named) in self.recent.iter().filter(|(e, _)| *e > since) {
            if *epoch != next || named.is_empty() || named.iter().any(|t| tags.contains(t)) {
                return false;
            }
            next += 1;
        }
        next == now + 1
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Index updates never panic midway (they only insert into and remove from maps), so a
    // poisoned lock still guards a consistent index.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// A store bounded by `max_bytes`, registering its metrics on `registry`.
    pub fn new(max_bytes: u64, registry: &Registry) -> Result<Store, prometheus::Error> {
        let evictions = IntCounter::new(
            "cxgate_cache_evictions_total",
            "Cache entries evicted to stay within cache.max_bytes",
        )?;
        let removed: Arc<Mutex<Vec<Removed>>> = Arc::default();
        let listener_removed = Arc::clone(&removed);
        let listener_evictions = evictions.clone();
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &u32, slot: &Slot| slot.weight())
            .eviction_listener(move |key: Arc<u32>, slot: Slot, cause| {
                if cause == RemovalCause::Size {
                    listener_evictions.inc();
                }
                if let Some(r) = slot.response() {
                    let tags: Vec<u32> = r.tag_hashes().collect();
                    if !tags.is_empty() {
                        lock(&listener_removed).push(Removed { key: *key, tags });
                    }
                }
            })
            .build();

        registry.register(Box::new(evictions.clone()))?;
        if let Err(e) = Gauges::new(entries.clone()).and_then(|g| registry.register(Box::new(g))) {
            // Leave the registry as we found it, so a retry can register again.
            let _ = registry.unregister(Box::new(evictions));
            return Err(e);
        }
        Ok(Store {
            inner: Arc::new(Inner {
                entries,
                tags: Mutex::new(Locked {
                    index: TagIndex::default(),
                    deadlines: Deadlines::new(Instant::now()),
                    bumps: Bumps::default(),
                }),
                removed,
                hasher: RandomState::new(),
                serial: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
                shared: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Keys and tags as 32-bit hashes: every entry holds several (its moka key, a queued
    /// deadline, its tag registrations), and half their width is about 20 bytes per entry.
    /// A collision of keys costs one entry its place (the full key is compared on lookup);
    /// one of tags makes an invalidation drop an entry too many. At a million entries about
    /// a hundred pairs collide.
    fn hash(&self, text: &str) -> u32 {
        // The low half of a keyed 64-bit hash is as evenly spread as the whole.
        self.inner.hasher.hash_one(text) as u32
    }

    /// The tag index and deadlines, after the index forgot whatever moka dropped since it
    /// was last locked. A removed entry's registrations stay when its key holds a newer
    /// value: that value registered the tags again (its key's tags come from the same
    /// route), and the lock orders that registration before this check.
    fn index(&self) -> MutexGuard<'_, Locked> {
        let mut locked = lock(&self.inner.tags);
        let removed = std::mem::take(&mut *lock(&self.inner.removed));
        for r in &removed {
            if !self.inner.entries.contains_key(&r.key) {
                locked.index.unregister(r.key, &r.tags);
            }
        }
        locked
    }

    /// Removes up to `max` entries whose deadline has passed, with the lock held; returns
    /// whether more may be due. Keys whose value was replaced are queued again at the new
    /// value's deadline; keys no longer held are dropped.
    fn sweep_step(&self, locked: &mut Locked, max: usize) -> bool {
        let now = Instant::now();
        let mut due = Vec::new();
        locked.deadlines.pop_due(now, max, &mut due);
        for hash in &due {
            let Some(slot) = self.inner.entries.get(hash) else {
                continue;
            };
            let deadline = slot.deadline();
            if deadline <= now {
                self.inner.entries.invalidate(hash);
            } else {
                locked.deadlines.push(deadline, *hash);
            }
        }
        // Entries evicted or purged before their deadline leave their key queued; once the
        // queue holds twice the entries, drop those (amortised: the queue doubled since).
        let held = usize::try_from(self.inner.entries.entry_count()).unwrap_or(usize::MAX);
        if locked.deadlines.len() > held.saturating_mul(2).saturating_add(4096) {
            let entries = &self.inner.entries;
            locked.deadlines.retain(|hash| entries.contains_key(&hash));
        }
        due.len() == max
    }

    /// Removes every entry past its life, [`SWEEP_STEP`] at a time, letting go of the lock
    /// between steps.
    async fn sweep(&self) {
        loop {
            let more = {
                let mut locked = self.index();
                self.sweep_step(&mut locked, SWEEP_STEP)
            };
            if !more {
                return;
            }
            tokio::task::yield_now().await;
        }
    }

    /// Starts the task that removes entries past their life every few seconds, so their
    /// memory is returned even when nothing is inserted. It ends when the store is dropped.
    pub fn spawn_sweeper(&self) -> JoinHandle<()> {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                Store { inner }.sweep().await;
            }
        })
    }

    /// The slot stored for exactly `key` (not another key with the same hash).
    fn lookup(&self, key: &str) -> Option<Slot> {
        let slot = self.inner.entries.get(&self.hash(key))?;
        (slot.key() == key).then_some(slot)
    }

    /// The usable entry for primary key `key` that suits `req_headers` (its `Vary` variant).
    fn find(&self, key: &str, req_headers: &HeaderMap) -> Option<StoredResponse> {
        let found = match self.lookup(key) {
            Some(slot) => match slot.0.vary_names() {
                Some(names) => self.lookup(&variant_key(key, &names, req_headers)),
                None => Some(slot),
            },
            None => None,
        };
        let now = Instant::now();
        found
            .and_then(|slot| slot.response().cloned())
            .filter(|r| r.freshness(now).is_usable())
    }

    /// The entry for primary key `key` that suits a request with `req_headers` (its `Vary`
    /// variant), if one is stored and still usable (fresh or within a stale window).
    pub async fn get(&self, key: &str, req_headers: &HeaderMap) -> Option<StoredResponse> {
        let usable = self.find(key, req_headers);
        let counter = if usable.is_some() {
            &self.inner.hits
        } else {
            &self.inner.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        usable
    }

    /// The entry [`Store::get`] would find, if it is still fresh at `now` (with how long it
    /// stays so), counted as a hit; nothing is counted when there is none, as the caller
    /// then looks again with `get`.
    pub fn get_fresh(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        now: Instant,
    ) -> Option<(StoredResponse, Duration)> {
        let entry = self.find(key, req_headers)?;
        let Freshness::Fresh { remaining } = entry.freshness(now) else {
            return None;
        };
        self.inner.hits.fetch_add(1, Ordering::Relaxed);
        Some((entry, remaining))
    }

    /// [`Store::get`] without counting a hit or a miss: a second look by a request whose
    /// first lookup was counted (a miss that waited for budget looks again before calling),
    /// so `/admin/status` counts each request once.
    pub fn recheck(&self, key: &str, req_headers: &HeaderMap) -> Option<StoredResponse> {
        self.find(key, req_headers)
    }

    /// The invalidation epoch. Read it before asking the upstream and hand it to
    /// [`Store::insert`]: an answer that was in flight while a write invalidated or a purge
    /// ran is then never stored, since it may show the data from before the write.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    /// What a fetch starting now carries to [`Store::insert_fetched`]: the epoch alone (see
    /// [`Store::get_shared`] for the shared tier's part).
    pub fn since(&self) -> Since {
        Since {
            epoch: self.epoch(),
            shared: None,
        }
    }

    /// Puts the shared tier behind this store (once; later calls are ignored).
    pub fn attach_shared(&self, tier: SharedTier) {
        let _ = self.inner.shared.set(tier);
    }

    /// The shared tier, when one is attached.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.inner.shared.get()
    }

    /// After memory had nothing fresh for `key`: the shared tier's entry for it, stored in
    /// memory first (in this replica's form), and what a fetch must carry
    /// if the entry does not do (its generations, for the tags `tags` and the key's path).
    /// Without a tier, or with Redis unreachable, no entry and the epoch alone: the answer is
    /// then stored in memory only. An entry of another `Vary` variant than `req_headers`
    /// select is not used; nor is one that an invalidation on this replica overtook while it
    /// was read. The entry claims no more than `routed`'s windows, the route's (its form is
    /// made by `routed` too).
    pub async fn get_shared(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        tags: &[String],
        routed: &Routed<'_>,
    ) -> (Option<StoredResponse>, Since) {
        let mut since = self.since();
        let Some(tier) = self.inner.shared.get() else {
            return (None, since);
        };
        let Some((found, generations)) = tier.lookup(key, tags, routed.windows).await else {
            return (None, since);
        };
        since.shared = Some(generations);
        let Some(found) = found else {
            return (None, since);
        };
        let adopted = self
            .adopt(key, req_headers, found, since.epoch, routed)
            .await;
        (adopted, since)
    }

    /// An entry read from the shared tier, made this replica's by `local`, stored in memory
    /// (weighed as it is kept) and found there again for a request with `req_headers`: `None`
    /// when it is another `Vary` variant than those select, or an invalidation on this
    /// replica ran since `epoch`.
    pub(super) async fn adopt(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        found: Found,
        epoch: u64,
        local: &dyn Localize,
    ) -> Option<StoredResponse> {
        let selected = match Vary::of(&found.value.headers) {
            Vary::Any => return None,
            Vary::None => key.to_string(),
            Vary::Headers(names) => variant_key(key, &names, req_headers),
        };
        if selected != found.storage_key {
            return None;
        }
        if local.refuses(&found.value.headers, &found.value.body) {
            if let Some(tier) = self.inner.shared.get() {
                tier.holds_token(key);
            }
            return None;
        }
        let mut value = found.value;
        if let Some((headers, body)) = local.localize(&value.headers, &value.body) {
            value.headers = headers;
            value.body = body;
        }
        if !self
            .insert_since(key.to_string(), req_headers, value, epoch)
            .await
        {
            return None;
        }
        self.find(key, req_headers)
    }

    /// `since` with the shared tier's generations read now, if it has none yet and a tier is
    /// attached: for a fetch about to ask the upstream that no lookup preceded (`bounds`:
    /// the route's windows).
    pub async fn with_generations(
        &self,
        since: Since,
        key: &str,
        tags: &[String],
        bounds: Windows,
    ) -> Since {
        match (self.inner.shared.get(), &since.shared) {
            (Some(tier), None) => Since {
                shared: tier.generations(key, tags, bounds).await,
                ..since
            },
            _ => since,
        }
    }

    /// Stores a fetched answer in memory as [`Store::insert_since`] does and, once stored
    /// there, in the shared tier when `since` carries its generations (the write is refused
    /// there if an invalidation on any replica moved them). `neutral`: the answer's headers
    /// and body in the form the tier keeps, when they differ from `value`'s (this replica's
    /// own form; see [`Localize`]). The shared write waits here at most the short call bound
    /// and goes on off the request path (see [`SharedTier::write_behind`]), and `lock`,
    /// this replica's fill lock of the key, is released once it is done (at once when
    /// nothing is written). Returns whether memory took it.
    pub async fn insert_fetched(
        &self,
        key: String,
        req_headers: &HeaderMap,
        value: CachedResponse,
        neutral: Option<(HeaderMap, Bytes)>,
        since: &Since,
        lock: Option<FillLock>,
    ) -> bool {
        let Some((tier, generations)) = self.inner.shared.get().zip(since.shared.as_ref()) else {
            let stored = self
                .insert_since(key, req_headers, value, since.epoch)
                .await;
            if let Some(lock) = lock {
                lock.release().await;
            }
            return stored;
        };
        let storage_key = match Vary::of(&value.headers) {
            Vary::Headers(names) => variant_key(&key, &names, req_headers),
            _ => key.clone(),
        };
        let mut shared = value.clone();
        if let Some((headers, body)) = neutral {
            shared.headers = headers;
            shared.body = body;
        }
        let stored = self
            .insert_since(key.clone(), req_headers, value, since.epoch)
            .await;
        if stored {
            tier.write_behind(key, storage_key, shared, generations.clone(), lock)
                .await;
        } else if let Some(lock) = lock {
            lock.release().await;
        }
        stored
    }

    /// Called with the index locked, which orders it against every insert; `named` holds the
    /// tag hashes of a tag invalidation, none for a purge.
    fn bump_epoch(&self, locked: &mut Locked, named: Box<[u32]>) {
        let epoch = self.inner.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        locked.bumps.push(epoch, named);
    }

    /// [`Store::insert_since`] from now: for values that were not fetched across a write.
    pub async fn insert(
        &self,
        key: String,
        req_headers: &HeaderMap,
        value: CachedResponse,
    ) -> bool {
        self.insert_since(key, req_headers, value, self.epoch())
            .await
    }

    /// Stores `value` under primary key `key`, or under its variant when the response
    /// carries `Vary`, unless an invalidation ran since `epoch` (see [`Store::epoch`]); returns
    /// whether it was stored. Responses with `Vary: *`, and ones already past every window,
    /// are not stored. It never waits: the future is ready at its first poll.
    pub async fn insert_since(
        &self,
        key: String,
        req_headers: &HeaderMap,
        value: CachedResponse,
        epoch: u64,
    ) -> bool {
        if !value.freshness(Instant::now()).is_usable() {
            return false;
        }
        let vary = match Vary::of(&value.headers) {
            Vary::Any => return false,
            Vary::None => None,
            Vary::Headers(names) => Some(names),
        };
        let storage_key = match &vary {
            Some(names) => variant_key(&key, names, req_headers),
            None => key.clone(),
        };
        let tags: Vec<u32> = value.tags.iter().map(|t| self.hash(t)).collect();
        let serial = self.inner.serial.fetch_add(1, Ordering::Relaxed);
        let Some(stored) = StoredResponse::pack(&storage_key, &value, &tags, serial) else {
            return false;
        };
        // moka takes an entry heavier than the whole cache and drops it at once: it was never
        // stored, and saying so keeps `Cache-Status` honest.
        let capacity = self.inner.entries.policy().max_capacity();
        if capacity.is_some_and(|max| u64::from(stored.weight()) > max) {
            return false;
        }

        let mut locked = self.index();
        if !locked.bumps.spare(epoch, self.epoch(), &tags) {
            return false;
        }
        self.sweep_step(&mut locked, SWEEP_PER_INSERT);
        if let Some(names) = vary {
            // Overwrites a plain entry of a resource that started to vary.
            let Some(marker) =
                StoredResponse::pack_vary_marker(&key, &names, value.timing(), serial)
            else {
                return false;
            };
            self.put(&mut locked, self.hash(&key), Slot(marker));
        }
        let hash = self.hash(&storage_key);
        self.put(&mut locked, hash, Slot(stored));
        locked.index.register(hash, tags.into_iter());
        true
    }

    /// Stores `slot` under `hash` and queues its deadline, with the lock held. A key already
    /// held is queued already, at or before its old deadline (the sweep queues it again if
    /// it lives on), so it is queued again only when the new value's life ends sooner.
    fn put(&self, locked: &mut Locked, hash: u32, slot: Slot) {
        let deadline = slot.deadline();
        let queued = self
            .inner
            .entries
            .get(&hash)
            .is_some_and(|old| old.deadline() <= deadline);
        self.inner.entries.insert(hash, slot);
        if !queued {
            locked.deadlines.push(deadline, hash);
        }
    }

    /// Removes every entry carrying any of `tags`; returns how many keys were invalidated.
    /// The effect is complete when the future is first polled; it never waits.
    pub async fn invalidate_tags(&self, tags: &[String]) -> u64 {
        let mut locked = self.index();
        let named: Box<[u32]> = tags.iter().map(|t| self.hash(t)).collect();
        self.bump_epoch(&mut locked, named.clone());
        let keys = locked.index.revoke(named.iter().copied());
        for key in &keys {
            self.inner.entries.invalidate(key);
        }
        keys.len() as u64
    }

    /// Removes every entry of `path` (normalised): any query, any variant.
    pub async fn purge_path(&self, path: &str) -> u64 {
        let mut locked = self.index();
        self.bump_epoch(&mut locked, Box::default());
        let path = normalize_path(path);
        let keys: Vec<Arc<u32>> = self
            .inner
            .entries
            .iter()
            .filter(|(_, slot)| key_path(slot.key()) == Some(path))
            .map(|(key, _)| key)
            .collect();
        let now = Instant::now();
        let mut purged = 0;
        for key in keys {
            // One past its life (not swept yet) goes too but was not a stored answer.
            if let Some(slot) = self.inner.entries.remove(&*key) {
                purged += u64::from(slot.response().is_some() && slot.deadline() > now);
            }
        }
        purged
    }

    /// Removes every entry whose method and path (normalised, no query) `doomed` selects;
    /// returns how many responses were removed. Used when a reload changes a route's rules.
    pub async fn purge_where(&self, doomed: impl Fn(&str, &str) -> bool) -> u64 {
        let mut locked = self.index();
        self.bump_epoch(&mut locked, Box::default());
        let keys: Vec<Arc<u32>> = self
            .inner
            .entries
            .iter()
            .filter(|(_, slot)| {
                let key = slot.key();
                let method = key.split_once(' ').map_or("", |(m, _)| m);
                key_path(key).is_some_and(|path| doomed(method, path))
            })
            .map(|(key, _)| key)
            .collect();
        let now = Instant::now();
        let mut purged = 0;
        for key in keys {
            // One past its life (not swept yet) goes too but was not a stored answer.
            if let Some(slot) = self.inner.entries.remove(&*key) {
                purged += u64::from(slot.response().is_some() && slot.deadline() > now);
            }
        }
        purged
    }

    /// Removes every entry; returns how many responses were stored.
    pub async fn purge_all(&self) -> u64 {
        let mut locked = self.index();
        self.bump_epoch(&mut locked, Box::default());
        let now = Instant::now();
        let count = self
            .inner
            .entries
            .iter()
            .filter(|(_, slot)| slot.response().is_some() && slot.deadline() > now)
            .count() as u64;
        // moka guarantees lookups never return an entry stored before this call.
        self.inner.entries.invalidate_all();
        // invalidate_all is lazy: run the maintenance now so the eviction listener queues
        // the purged keys for the tag index, and a later tag purge does not count them.
        self.inner.entries.run_pending_tasks();
        count
    }

    /// Entries held (responses and `Vary` markers) now. moka only counts in its maintenance,
    /// so that runs first: an entry just stored is counted (a status read costs that).
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.entry_count()
    }

    /// Bytes charged against `max_bytes` now, after moka's maintenance as for
    /// [`Store::entry_count`].
    pub fn weighted_bytes(&self) -> u64 {
        self.inner.entries.run_pending_tasks();
        self.inner.entries.weighted_size()
    }

    /// For `/admin/status`: entries, bytes, hits, misses and hit ratio (0 before any lookup).
    pub fn stats_json(&self) -> serde_json::Value {
        let hits = self.inner.hits.load(Ordering::Relaxed);
        let misses = self.inner.misses.load(Ordering::Relaxed);
        let lookups = hits + misses;
        let hit_ratio = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        json!({
            "entries": self.entry_count(),
            "bytes": self.weighted_bytes(),
            "hits": hits,
            "misses": misses,
            "hit_ratio": hit_ratio,
        })
    }

    /// Runs moka's pending maintenance (evictions, counts) and lets the tag index forget
    /// what it removed; for tests, benchmarks and shutdown.
    pub async fn run_pending_tasks(&self) {
        self.sweep().await;
        self.inner.entries.run_pending_tasks();
        drop(self.index());
    }

    #[cfg(test)]
    fn tag_registrations(&self) -> usize {
        self.index().index.len()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.entry_count())
            .field("bytes", &self.weighted_bytes())
            .finish_non_exhaustive()
    }
}

/// The path part of a stored key (`METHOD path[?query][\nvariant...]`).
pub(super) fn key_path(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once(' ')?;
    let end = rest.find(['?', '\n']).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
