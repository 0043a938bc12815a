//! Fills merged across replicas: identical misses in flight on different replicas make one
//! upstream call, as [`super::Merger`] makes one within a replica, so scaling out does not
//! multiply cold fetches. [`FillLock`] says how the lock is taken, waited for and taken over.

use std::time::Duration;

use http::HeaderMap;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::entry::StoredResponse;
use super::shared::{Localize, SharedTier};
use super::store::{Since, Store};

/// A lock lives this long unless its holder extends it, so a replica that dies mid-fetch
/// holds the others back for at most this.
pub const LOCK_TTL: Duration = Duration::from_secs(2);
/// The holder extends its lock this often while its fetch runs.
const EXTEND_EVERY: Duration = Duration::from_millis(500);
/// How often a waiting replica looks for the shared entry (one `MGET` per key waited for,
/// not per request: the requests waiting on one replica are merged there first).
const POLL_EVERY: Duration = Duration::from_millis(10);

/// How a miss takes part in the replicas' fill of its key.
#[derive(Debug)]
pub enum Fill {
    /// This replica fetches for all: release the lock once the answer is shared.
    Holder(FillLock),
    /// Another replica's fetch filled the shared entry; it is in memory now.
    Filled(StoredResponse),
    /// Fetch alone: no shared tier, Redis could not say, or the wait ran out.
    Alone,
}

/// The fill lock of one key, held by this replica; dropping it releases it too (in a task).
///
/// The replica whose miss comes first takes a short lock per cache key in Redis (`SET NX
/// PX`, extended while its fetch runs, deleted once its answer is in the shared tier); the
/// others poll the shared entry until it appears, and take the lock over when it goes
/// without one (the holder died and its lock expired, or its answer was not storable). Redis
/// slow or gone, or a wait that runs out: the caller fetches alone, merged with its own
/// replica's requests only. Lock keys are cache keys (which never hold a token); their
/// values are replica ids.
#[derive(Debug)]
pub struct FillLock {
    tier: SharedTier,
    lock: String,
    value: String,
    keeper: JoinHandle<()>,
    released: bool,
}

impl SharedTier {
    fn lock_key(&self, key: &str) -> String {
        self.redis().key(&format!("cache:lock:{key}"))
    }

    /// Takes the fill lock of `key`: `Some` when taken, `None` when another holds it, an
    /// error when Redis cannot say.
    async fn try_lock(&self, key: &str) -> Result<Option<FillLock>, crate::replicas::Unavailable> {
        let lock = self.lock_key(key);
        // The replica's id, and a random part that tells its fills of one key apart.
        let value = format!("{}:{:016x}", self.redis().id(), fastrand::u64(..));
        if !self
            .redis()
            .try_lock("cache", &lock, &value, LOCK_TTL)
            .await?
        {
            return Ok(None);
        }
        let keeper = tokio::spawn(keep(self.clone(), lock.clone(), value.clone()));
        Ok(Some(FillLock {
            tier: self.clone(),
            lock,
            value,
            keeper,
            released: false,
        }))
    }
}

/// Extends the lock while the fetch runs; aborted when the lock is released.
async fn keep(tier: SharedTier, lock: String, value: String) {
    loop {
        tokio::time::sleep(EXTEND_EVERY).await;
        if !tier
            .redis()
            .extend_lock("cache", &lock, &value, LOCK_TTL)
            .await
        {
            // Lost (Redis away, or it expired under a stalled holder): another replica may
            // fetch too, which costs one call and never a wrong answer.
            return;
        }
    }
}

impl FillLock {
    /// Lets the waiting replicas go: call it once the answer is in the shared tier (or is
    /// known not to go there), so they find it rather than fetch themselves.
    pub async fn release(mut self) {
        self.keeper.abort();
        self.released = true;
        self.tier
            .redis()
            .release_lock("cache", &self.lock, &self.value)
            .await;
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        self.keeper.abort();
        if self.released {
            return;
        }
        // A fetch cancelled or panicked with the lock held: release it rather than make the
        // others wait for its expiry.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (tier, lock, value) = (self.tier.clone(), self.lock.clone(), self.value.clone());
            runtime.spawn(async move { tier.redis().release_lock("cache", &lock, &value).await });
        }
    }
}

impl Store {
    /// For a miss of `key` about to go upstream with `since` from its shared lookup: takes
    /// the replicas' fill lock, or waits (at most `patience`, calling `waiting` once when it
    /// starts) for the replica holding it to share its answer, taking the lock over if that
    /// replica goes without sharing one. [`Fill::Alone`] when `since` has no generations
    /// (no shared lookup was made, or Redis could not answer it). An entry taken from the
    /// tier is made this replica's by `local`.
    pub async fn fill_across(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        patience: Duration,
        waiting: impl FnOnce(),
        local: &dyn Localize,
    ) -> Fill {
        let Some(tier) = self.shared().filter(|_| since.looked_up_shared()) else {
            return Fill::Alone;
        };
        let deadline = Instant::now() + patience;
        let lock_key = tier.lock_key(key);
        let mut waiting = Some(waiting);
        loop {
            match tier.try_lock(key).await {
                Err(_) => return Fill::Alone,
                Ok(Some(lock)) => {
                    // The holder before may have shared its answer between this replica's
                    // lookup and now: one more look saves a second call.
                    if let Some((Some(found), _)) = tier.peek(key, &lock_key).await {
                        if let Some(entry) = self
                            .adopt(key, req_headers, found, since.epoch(), local)
                            .await
                        {
                            lock.release().await;
                            return Fill::Filled(entry);
                        }
                    }
                    return Fill::Holder(lock);
                }
                Ok(None) => {}
            }
            if let Some(waiting) = waiting.take() {
                waiting();
            }
            loop {
                if Instant::now() + POLL_EVERY > deadline {
                    return Fill::Alone;
                }
                tokio::time::sleep(POLL_EVERY).await;
                let Some((found, held)) = tier.peek(key, &lock_key).await else {
                    return Fill::Alone;
                };
                if let Some(found) = found {
                    if let Some(entry) = self
                        .adopt(key, req_headers, found, since.epoch(), local)
                        .await
                    {
                        return Fill::Filled(entry);
                    }
                    if self.epoch() != since.epoch() {
                        // Invalidated here meanwhile: nothing fetched before may be stored.
                        return Fill::Alone;
                    }
                }
                if !held {
                    break;
                }
            }
        }
    }
}
