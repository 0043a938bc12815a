//! The bounded response store: a moka cache weighed in bytes, with tags, `Vary` and purges.
//!
//! Invariants: the weighted size never stays above `max_bytes` (moka evicts the least
//! valuable entries first); an entry lives in moka for ttl + its longer stale window and
//! `get` also refuses anything past that on tokio's clock; once `invalidate_tags`, `purge_*`
//! return, no lookup yields an entry they removed. Hits share the stored `Arc`, never copy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::header::HeaderName;
use http::HeaderMap;
use moka::future::Cache;
use moka::notification::RemovalCause;
use moka::Expiry;
use prometheus::{IntCounter, Registry};
use serde_json::json;
use tokio::time::Instant;

use super::entry::CachedResponse;
use super::key::normalize_path;
use super::stats::Gauges;
use super::tags::{Revoked, TagIndex};
use super::vary::{variant_key, Vary};

/// An upper bound on any entry's life in moka, far above real ttls, so a configuration
/// mistake cannot overflow moka's clock arithmetic.
const MAX_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// What moka holds under a key.
#[derive(Clone)]
pub(crate) enum Slot {
    Response {
        response: Arc<CachedResponse>,
        revoked: Revoked,
    },
    /// Under the primary key of a varying resource: the request headers that select its
    /// variant. Kept in the same cache so it is bounded and purged with the variants.
    Vary {
        names: Arc<[HeaderName]>,
        lifetime: Duration,
    },
}

impl Slot {
    fn lifetime(&self) -> Duration {
        match self {
            Slot::Response { response, .. } => response.lifetime(),
            Slot::Vary { lifetime, .. } => *lifetime,
        }
        .min(MAX_LIFETIME)
    }

    fn weight(&self, key: &str) -> u32 {
        let own = match self {
            Slot::Response { response, .. } => response.weight(),
            Slot::Vary { names, .. } => {
                let names: usize = names.iter().map(|n| n.as_str().len()).sum();
                u32::try_from(64 + names).unwrap_or(u32::MAX)
            }
        };
        own.saturating_add(u32::try_from(key.len()).unwrap_or(u32::MAX))
    }
}

/// Entries expire by their own lifetime, reset when a key is overwritten.
struct Lifetime;

impl Expiry<String, Slot> for Lifetime {
    fn expire_after_create(
        &self,
        _: &String,
        slot: &Slot,
        _: std::time::Instant,
    ) -> Option<Duration> {
        Some(slot.lifetime())
    }

    fn expire_after_update(
        &self,
        _: &String,
        slot: &Slot,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(slot.lifetime())
    }
}

/// The response cache. Cheap to clone: every clone is a handle on the same cache.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Cache<String, Slot>,
    /// Shared with the eviction listener, which unregisters whatever moka drops.
    tags: Arc<Mutex<TagIndex>>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Bumped by every invalidation and purge. A response fetched across a bump may predate
    /// the write that caused it, so [`Store::insert`] refuses it (see [`Store::epoch`]).
    epoch: AtomicU64,
}

fn lock(tags: &Mutex<TagIndex>) -> MutexGuard<'_, TagIndex> {
    // Index updates never panic midway (they only insert into and remove from maps), so a
    // poisoned lock still guards a consistent index.
    tags.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// A store bounded by `max_bytes`, registering its metrics on `registry`.
    pub fn new(max_bytes: u64, registry: &Registry) -> Result<Store, prometheus::Error> {
        let evictions = IntCounter::new(
            "cxgate_cache_evictions_total",
            "Cache entries evicted to stay within cache.max_bytes",
        )?;
        let tags = Arc::new(Mutex::new(TagIndex::default()));
        let listener_tags = Arc::clone(&tags);
        let listener_evictions = evictions.clone();
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &String, slot: &Slot| slot.weight(key))
            .expire_after(Lifetime)
            .eviction_listener(move |key: Arc<String>, slot: Slot, cause| {
                if cause == RemovalCause::Size {
                    listener_evictions.inc();
                }
                if let Slot::Response { response, revoked } = &slot {
                    lock(&listener_tags).unregister(&key, &response.tags, revoked);
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
                tags,
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                epoch: AtomicU64::new(0),
            }),
        })
    }

    /// The entry for primary key `key` that suits a request with `req_headers` (its `Vary`
    /// variant), if one is stored and still usable (fresh or within a stale window).
    pub async fn get(&self, key: &str, req_headers: &HeaderMap) -> Option<Arc<CachedResponse>> {
        let found = match self.inner.entries.get(key).await {
            Some(Slot::Vary { names, .. }) => {
                let variant = variant_key(key, &names, req_headers);
                self.inner.entries.get(&variant).await
            }
            other => other,
        };
        let now = Instant::now();
        let usable = match found {
            Some(Slot::Response { response, revoked })
                if !revoked.is_set() && response.freshness(now).is_usable() =>
            {
                Some(response)
            }
            _ => None,
        };
        let counter = if usable.is_some() {
            &self.inner.hits
        } else {
            &self.inner.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        usable
    }

    /// The invalidation epoch. Read it before asking the upstream and hand it to
    /// [`Store::insert`]: an answer that was in flight while a write invalidated or a purge
    /// ran is then never stored, since it may show the data from before the write.
    pub fn epoch(&self) -> u64 {
        self.inner.epoch.load(Ordering::Acquire)
    }

    fn bump_epoch(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
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
    /// are not stored.
    ///
    /// Dropping this future midway can leave a tag registration without a value; that only
    /// makes a later `invalidate_tags` count one key too many. Calling it from the merged
    /// fetch task, which no client can cancel, avoids even that.
    pub async fn insert_since(
        &self,
        key: String,
        req_headers: &HeaderMap,
        value: CachedResponse,
        epoch: u64,
    ) -> bool {
        if !value.freshness(Instant::now()).is_usable() || self.epoch() != epoch {
            return false;
        }
        let entries = &self.inner.entries;
        let storage_key = match Vary::of(&value.headers) {
            Vary::Any => return false,
            Vary::None => key,
            Vary::Headers(names) => {
                let variant = variant_key(&key, &names, req_headers);
                let lifetime = value.lifetime();
                // Overwrites a plain entry of a resource that started to vary.
                entries.insert(key, Slot::Vary { names, lifetime }).await;
                variant
            }
        };

        let revoked = Revoked::default();
        let tagged = !value.tags.is_empty();
        // Register before inserting: an invalidation that runs in between then flags this
        // value, and `get` refuses it even though it reaches moka after the invalidation.
        if tagged {
            lock(&self.inner.tags).register(&storage_key, &value.tags, &revoked);
        }
        let slot = Slot::Response {
            response: Arc::new(value),
            revoked: revoked.clone(),
        };
        entries.insert(storage_key.clone(), slot).await;
        if revoked.is_set() || self.epoch() != epoch {
            // It was invalidated, or a purge ran, while on its way in: drop it again.
            entries.invalidate(&storage_key).await;
            return false;
        }
        true
    }

    /// Removes every entry carrying any of `tags`; returns how many keys were invalidated.
    /// The effect is complete at the first poll, before the first `.await`.
    pub async fn invalidate_tags(&self, tags: &[String]) -> u64 {
        // The flags are set under the lock, so from here on `get` refuses these entries
        // even before moka has removed them.
        self.bump_epoch();
        let keys = lock(&self.inner.tags).revoke(tags);
        for key in &keys {
            self.inner.entries.invalidate(key).await;
        }
        keys.len() as u64
    }

    /// Removes every entry of `path` (normalised): any query, any variant.
    pub async fn purge_path(&self, path: &str) -> u64 {
        self.bump_epoch();
        let path = normalize_path(path);
        let keys: Vec<Arc<String>> = self
            .inner
            .entries
            .iter()
            .filter(|(key, _)| key_path(key) == Some(path))
            .map(|(key, _)| key)
            .collect();
        let mut purged = 0;
        for key in keys {
            if let Some(Slot::Response { .. }) = self.inner.entries.remove(key.as_str()).await {
                purged += 1;
            }
        }
        purged
    }

    /// Removes every entry; returns how many responses were stored.
    pub async fn purge_all(&self) -> u64 {
        self.bump_epoch();
        let count = self
            .inner
            .entries
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Response { .. }))
            .count() as u64;
        // moka guarantees lookups never return an entry stored before this call.
        self.inner.entries.invalidate_all();
        // invalidate_all is lazy: run the maintenance now so the eviction listener drops the
        // purged keys from the tag index, and a later tag purge does not count them again.
        self.inner.entries.run_pending_tasks().await;
        count
    }

    /// Entries held (responses and `Vary` markers); moka updates it in its maintenance.
    pub fn entry_count(&self) -> u64 {
        self.inner.entries.entry_count()
    }

    /// Bytes charged against `max_bytes`; moka updates it in its maintenance.
    pub fn weighted_bytes(&self) -> u64 {
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

    /// Runs moka's pending maintenance (evictions, counts); for tests and shutdown.
    pub async fn run_pending_tasks(&self) {
        self.inner.entries.run_pending_tasks().await;
    }

    #[cfg(test)]
    fn tag_registrations(&self) -> usize {
        lock(&self.inner.tags).len()
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
fn key_path(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once(' ')?;
    let end = rest.find(['?', '\n']).unwrap_or(rest.len());
    Some(&rest[..end])
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
