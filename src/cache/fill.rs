//! Fills merged across replicas: identical misses in flight on different replicas make one
//! upstream call, as [`super::Merger`] makes one within a replica, so scaling out does not
//! multiply cold fetches. [`FillLock`] says how the lock is taken, waited for and taken over;
//! `super::outcome` what a failed fill leaves for the replicas that waited on it.

use std::time::Duration;

use http::HeaderMap;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::entry::StoredResponse;
use super::lua::RELEASE_FAILED;
use super::outcome::{self, Failure, NOTE_TTL};
use super::shared::{Found, Generations, Localize, SharedTier};
use super::store::{Since, Store};
use crate::replicas::{Unavailable, PATIENT_CALL_TIMEOUT};

/// A lock lives this long unless its holder extends it, so a replica that dies mid-fetch
/// holds the others back for at most this.
pub const LOCK_TTL: Duration = Duration::from_secs(2);
/// The holder extends its lock this often while its fetch runs.
const EXTEND_EVERY: Duration = Duration::from_millis(500);
/// How often a waiting replica looks for the shared entry (one read per key waited for,
/// not per request: the requests waiting on one replica are merged there first).
const POLL_EVERY: Duration = Duration::from_millis(10);
/// How often a miss queued for its budget looks whether another replica started the call:
/// seldom, as a queue may last seconds, and the queue goes on meanwhile.
const QUEUED_POLL: Duration = Duration::from_millis(50);
/// How long a queued miss's note ([`Store::note_queued`]) stands past the time its cells are
/// booked for: time for that miss, let through then, to take the fill lock.
const NOTE_GRACE: Duration = Duration::from_millis(250);

/// Where the other replicas' fills of a key leave a miss before it asks its budget.
#[derive(Debug)]
pub enum Fill {
    /// Another replica's call filled the shared entry; it is in memory now.
    Filled(StoredResponse),
    /// No replica is calling upstream for the key: the miss asks its own budget.
    Free,
    /// Fetch alone: no shared tier, Redis could not say, or the wait ran out.
    Alone,
    /// The other replica's call this miss waited on failed (in this replica's form): the
    /// miss answers with that, as a merged follower takes its leader's failure.
    Failed(Failure),
}

/// What taking the fill lock gives a miss its budget let through.
#[derive(Debug)]
pub enum Take {
    /// This replica calls for all: release the lock once the answer is shared.
    Holder(FillLock),
    /// Another replica's answer was shared meanwhile; it is in memory now.
    Filled(StoredResponse),
    /// Another replica took the lock first and is calling now: give the budget back and
    /// wait for its answer ([`Store::await_fill`]).
    Busy,
    /// Fetch alone: Redis could not say.
    Alone,
}

/// The fill lock of one key, held by this replica; dropping it releases it too (in a task).
///
/// The lock means "this replica is calling upstream for the key": a miss takes it (`SET NX
/// PX`, extended while its call runs, deleted once its answer is in the shared tier) only
/// once its budget let it through, never while it queues. A miss that finds it held before
/// asking its budget, or sees it taken while it queues (giving its queued cells back), or
/// finds it taken once admitted (giving its cells back), polls the shared entry until it
/// appears. A holder whose call failed releases the lock with a note of the failure, which
/// the misses that waited on that lock take ([`Fill::Failed`]), as local followers take
/// their leader's; when the lock goes without either (the holder died and its lock expired,
/// or its answer was not storable) the misses ask their own budgets at once, and the first
/// let through takes the lock for the others. Redis gone, a call slower
/// than [`PATIENT_CALL_TIMEOUT`] to take the lock, or a wait that runs out: the caller
/// fetches alone, merged with its own replica's requests only. A waiter whose look timed
/// out looks again until its deadline: a slow Redis costs it time, not a call. Lock keys are cache keys (which never hold a token); their values are replica ids.
#[derive(Debug)]
pub struct FillLock {
    tier: SharedTier,
    lock: String,
    /// Where a failure of this fill is noted for its waiters.
    note: String,
    value: String,
    keeper: JoinHandle<()>,
    released: bool,
}

impl SharedTier {
    fn lock_key(&self, key: &str) -> String {
        self.redis().key(&format!("cache:lock:{key}"))
    }

    /// The note that a miss of `key` queues for budget on some replica (see
    /// [`Store::note_queued`]).
    fn queued_key(&self, key: &str) -> String {
        self.redis().key(&format!("cache:queued:{key}"))
    }

    /// The note a failed fill of `key` leaves for its waiters (see `super::outcome`).
    fn failed_key(&self, key: &str) -> String {
        self.redis().key(&format!("cache:failed:{key}"))
    }

    /// The failure the fill of `key` whose lock held `holder` ended in, in this replica's
    /// form (`local`); `None` when it left no note of one (or one this replica refuses to
    /// serve), or Redis cannot say: the miss then takes the fill over.
    async fn failure_of(&self, key: &str, holder: &[u8], local: &dyn Localize) -> Option<Failure> {
        let noted = self.failed_key(key);
        let max = self.max_entry_bytes();
        let note: Vec<u8> = self
            .redis()
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                // Bounded: a planted note the size of Redis's memory is never transferred.
                redis::cmd("GETRANGE")
                    .arg(&noted)
                    .arg(0)
                    .arg(max)
                    .query_async(&mut c)
                    .await
            })
            .await
            .ok()?;
        match outcome::decode(&note, holder)? {
            Failure::Answered {
                status,
                headers,
                body,
            } => {
                if local.refuses(&headers, &body) {
                    self.holds_token(key);
                    return None;
                }
                let (headers, body) = local.localize(&headers, &body).unwrap_or((headers, body));
                Some(Failure::Answered {
                    status,
                    headers,
                    body,
                })
            }
            other => Some(other),
        }
    }

    /// Takes the fill lock of `key`: `Some` when taken, `None` when another holds it, an
    /// error when Redis cannot say.
    async fn try_lock(&self, key: &str) -> Result<Option<FillLock>, Unavailable> {
        let lock = self.lock_key(key);
        // The replica's id, and a random part that tells its fills of one key apart.
        let value = format!("{}:{:016x}", self.redis().id(), fastrand::u64(..));
        let taken = self
            .redis()
            .try_lock("cache", &lock, &value, LOCK_TTL, PATIENT_CALL_TIMEOUT)
            .await;
        match taken {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(why) => {
                // A slow Redis may still take it after this side gave up: a release sent
                // after it on the same connection deletes it then, so no one waits for a
                // lock nobody holds.
                if why.is_slow() {
                    let tier = self.clone();
                    tokio::spawn(async move {
                        tier.redis()
                            .release_lock("cache", &lock, &value, PATIENT_CALL_TIMEOUT)
                            .await;
                    });
                }
                return Err(why);
            }
        }
        let keeper = tokio::spawn(keep(self.clone(), lock.clone(), value.clone()));
        Ok(Some(FillLock {
            tier: self.clone(),
            lock,
            note: self.failed_key(key),
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
            .extend_lock("cache", &lock, &value, LOCK_TTL, PATIENT_CALL_TIMEOUT)
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
            .release_lock("cache", &self.lock, &self.value, PATIENT_CALL_TIMEOUT)
            .await;
    }

    /// Lets the waiting replicas go with the failure this fill's call ended in: the lock is
    /// released and the note left in one step, so each waiter answers with it at once
    /// rather than call again (see `super::outcome`). A note over the entry bound, or one
    /// Redis does not take, is no note: the lock is released plainly.
    pub async fn release_failed(mut self, failure: &Failure) {
        let Some(note) = outcome::encode(&self.value, failure, self.tier.max_entry_bytes()) else {
            return self.release().await;
        };
        self.keeper.abort();
        let (lock, noted, value) = (self.lock.clone(), self.note.clone(), self.value.clone());
        let life = NOTE_TTL.as_millis().to_string();
        let released = self
            .tier
            .redis()
            .run_within("cache", PATIENT_CALL_TIMEOUT, |mut c| async move {
                RELEASE_FAILED
                    .key(&lock)
                    .key(&noted)
                    .arg(&value)
                    .arg(note)
                    .arg(&life)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        if released.is_ok() {
            self.released = true;
        } else {
            self.release().await;
        }
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
            runtime.spawn(async move {
                tier.redis()
                    .release_lock("cache", &lock, &value, PATIENT_CALL_TIMEOUT)
                    .await;
            });
        }
    }
}

impl Store {
    /// The shared tier, when `since` says this miss was looked up there (only such a miss
    /// merges with other replicas': without a lookup Redis could not answer).
    fn fill_tier<'a>(&'a self, since: &'a Since) -> Option<(&'a SharedTier, &'a Generations)> {
        self.shared().zip(since.generations())
    }

    /// The shared entry `found` of `key`, taken into memory for a request with
    /// `req_headers`; `Err(())` when an invalidation ran here since `since` (nothing fetched
    /// before it may be taken or stored), `Ok(None)` when it is another variant.
    async fn take_found(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        found: Found,
        since: &Since,
        local: &dyn Localize,
    ) -> Result<Option<StoredResponse>, ()> {
        if let Some(entry) = self
            .adopt(key, req_headers, found, since.epoch(), local)
            .await
        {
            return Ok(Some(entry));
        }
        if self.epoch() == since.epoch() {
            Ok(None)
        } else {
            Err(())
        }
    }

    /// For a miss of `key` about to ask its budget (with `since` from its shared lookup):
    /// while another replica holds the key's fill lock (it is calling upstream for the key),
    /// waits for the answer it shares, until `deadline`, calling `waiting` once when it
    /// starts to wait. [`Fill::Free`] when no replica is calling (or the holder went without
    /// sharing an answer this request can take): the miss asks its own budget.
    pub async fn await_fill(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        deadline: Instant,
        waiting: impl FnOnce(),
        local: &dyn Localize,
    ) -> Fill {
        let Some((tier, generations)) = self.fill_tier(since) else {
            return Fill::Alone;
        };
        let lock_key = tier.lock_key(key);
        let mut waiting = Some(waiting);
        // The fill last seen holding the lock: its failure, noted as it goes, is this
        // miss's too.
        let mut holder: Option<Vec<u8>> = None;
        loop {
            let (found, held) = match tier.peek(key, &lock_key, generations).await {
                Ok(seen) => seen,
                // Slow, not gone: look again until the deadline rather than fetch alone.
                Err(why) if why.is_slow() && tier.redis().is_up() => {
                    (None, Some(holder.clone().unwrap_or_default()))
                }
                Err(_) => return Fill::Alone,
            };
            if let Some(found) = found {
                match self.take_found(key, req_headers, found, since, local).await {
                    Ok(Some(entry)) => {
                        tier.count_filled();
                        return Fill::Filled(entry);
                    }
                    Ok(None) => {}
                    Err(()) => return Fill::Alone,
                }
            }
            if let Some(ended) = holder.as_deref().filter(|h| held.as_deref() != Some(*h)) {
                if let Some(failure) = tier.failure_of(key, ended, local).await {
                    return Fill::Failed(failure);
                }
            }
            let Some(held) = held else {
                return Fill::Free;
            };
            holder = Some(held);
            if let Some(waiting) = waiting.take() {
                waiting();
            }
            if Instant::now() + POLL_EVERY > deadline {
                return Fill::Alone;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Resolves, while a miss of `key` queues for its budget, once another replica has
    /// started calling upstream for the key (it holds the fill lock: `None`, wait for it
    /// with [`Store::await_fill`]) or its answer is in the shared tier (`Some`, in memory
    /// now). Looks once per [`QUEUED_POLL`]; never resolves when Redis cannot say.
    pub async fn fill_started(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        local: &dyn Localize,
    ) -> Option<StoredResponse> {
        let Some((tier, generations)) = self.fill_tier(since) else {
            return std::future::pending().await;
        };
        let lock_key = tier.lock_key(key);
        loop {
            tokio::time::sleep(QUEUED_POLL).await;
            let (found, held) = match tier.peek(key, &lock_key, generations).await {
                Ok(seen) => seen,
                Err(why) if why.is_slow() && tier.redis().is_up() => continue,
                Err(_) => return std::future::pending().await,
            };
            if let Some(found) = found {
                match self.take_found(key, req_headers, found, since, local).await {
                    Ok(Some(entry)) => {
                        tier.count_filled();
                        return Some(entry);
                    }
                    Ok(None) => {}
                    // Nothing taken; the budget wait goes on and decides.
                    Err(()) => return std::future::pending().await,
                }
            }
            if held.is_some() {
                return None;
            }
        }
    }

    /// Notes in Redis that a miss of `key` (with `since` from its shared lookup) queues for
    /// budget on this replica with its cells booked on the global share for `at`: it calls
    /// then, under the fill lock. The note (`SET NX PX`) lasts until `at` and a grace for
    /// taking the lock; the first queued miss's stands. The same miss on another replica
    /// whose own wait reaches `at` follows it rather than book cells of its own
    /// ([`Store::queued_for`]), and one its budget refuses waits for this one's call
    /// ([`Store::await_queued_fill`]) rather than answer 429 for a read the fleet is about
    /// to fetch anyway.
    pub async fn note_queued(&self, key: &str, since: &Since, at: Instant) {
        let Some((tier, _)) = self.fill_tier(since) else {
            return;
        };
        let ttl = at.saturating_duration_since(Instant::now());
        if ttl < Duration::from_millis(1) {
            return;
        }
        let ttl = ttl + NOTE_GRACE;
        let queued = tier.queued_key(key);
        let value = tier.redis().id().to_owned();
        let _ = tier
            .redis()
            .try_lock("cache", &queued, &value, ttl, PATIENT_CALL_TIMEOUT)
            .await;
    }

    /// For a miss of `key` about to ask its budget (with `since` from its shared lookup):
    /// the time the same miss noted queued on a replica ([`Store::note_queued`]) has its
    /// cells booked for, `None` when none is noted (or Redis cannot say). A miss whose own
    /// `max_wait` reaches it follows that call ([`Store::follow_queued`]): alone it would
    /// book cells behind that call's, go no sooner, and spend them for nothing once its
    /// answer came.
    pub async fn queued_for(&self, key: &str, since: &Since) -> Option<Instant> {
        let (tier, _) = self.fill_tier(since)?;
        let left = tier
            .redis()
            .lock_left("cache", &tier.queued_key(key), PATIENT_CALL_TIMEOUT)
            .await
            .ok()??;
        Some(Instant::now() + left.saturating_sub(NOTE_GRACE))
    }

    /// Waits for the answer of the miss of `key` noted queued with its cells booked for
    /// `at` ([`Store::queued_for`]): its shared entry, or once it holds the fill lock, the
    /// entry it shares until `fill_deadline`. `None` when nothing comes (it was refused, or
    /// its answer not shared): the miss asks its own budget.
    pub async fn follow_queued(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        at: Instant,
        fill_deadline: Instant,
        local: &dyn Localize,
    ) -> Option<StoredResponse> {
        let (tier, generations) = self.fill_tier(since)?;
        let lock_key = tier.lock_key(key);
        let gone = (at + NOTE_GRACE).min(fill_deadline);
        loop {
            let (found, held) = match tier.peek(key, &lock_key, generations).await {
                Ok(seen) => seen,
                Err(why) if why.is_slow() && tier.redis().is_up() => (None, None),
                Err(_) => return None,
            };
            if let Some(found) = found {
                return match self.take_found(key, req_headers, found, since, local).await {
                    Ok(Some(entry)) => {
                        tier.count_filled();
                        Some(entry)
                    }
                    Ok(None) | Err(()) => None,
                };
            }
            if held.is_some() {
                return match self
                    .await_fill(key, req_headers, since, fill_deadline, || {}, local)
                    .await
                {
                    Fill::Filled(entry) => Some(entry),
                    // The queued call failed: this miss asks on its own terms, as alone.
                    Fill::Free | Fill::Alone | Fill::Failed(_) => None,
                };
            }
            if Instant::now() + POLL_EVERY > gone {
                return None;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// For a miss of `key` its own budget refused: while a miss of the key is noted as
    /// queued on a replica ([`Store::note_queued`]), waits until `budget_deadline` (when
    /// this miss's own `max_wait` ends) for that one to be let through, and then for its
    /// call's answer under the fill lock until `fill_deadline`; the shared entry, in memory
    /// now, or `None` when no such call comes (the refusal stands).
    pub async fn await_queued_fill(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        budget_deadline: Instant,
        fill_deadline: Instant,
        local: &dyn Localize,
    ) -> Option<StoredResponse> {
        let (tier, generations) = self.fill_tier(since)?;
        let queued = tier.queued_key(key);
        loop {
            let (found, noted) = match tier.peek(key, &queued, generations).await {
                Ok(seen) => seen,
                Err(why) if why.is_slow() && tier.redis().is_up() => (None, Some(Vec::new())),
                Err(_) => return None,
            };
            if let Some(found) = found {
                match self.take_found(key, req_headers, found, since, local).await {
                    Ok(Some(entry)) => {
                        tier.count_filled();
                        return Some(entry);
                    }
                    Ok(None) => return None,
                    Err(()) => return None,
                }
            }
            // Noted no more (let through, or refused), or this miss's wait is over: what
            // is left is a call under the fill lock, if one runs.
            if noted.is_none() || Instant::now() + POLL_EVERY > budget_deadline {
                break;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        let deadline = fill_deadline.max(budget_deadline);
        match self
            .await_fill(key, req_headers, since, deadline, || {}, local)
            .await
        {
            Fill::Filled(entry) => Some(entry),
            // Its own budget refused this miss: that refusal stands, whatever the call did.
            Fill::Free | Fill::Alone | Fill::Failed(_) => None,
        }
    }

    /// For a miss of `key` its budget let through: takes the fill lock, so the other
    /// replicas wait for this one's call instead of making their own.
    pub async fn take_fill(
        &self,
        key: &str,
        req_headers: &HeaderMap,
        since: &Since,
        local: &dyn Localize,
    ) -> Take {
        let Some((tier, generations)) = self.fill_tier(since) else {
            return Take::Alone;
        };
        match tier.try_lock(key).await {
            Err(_) => Take::Alone,
            Ok(None) => Take::Busy,
            Ok(Some(lock)) => {
                // The holder before may have shared its answer between this replica's
                // lookup and now: one more look saves a second call.
                if let Ok((Some(found), _)) = tier.peek(key, &tier.lock_key(key), generations).await
                {
                    if let Ok(Some(entry)) =
                        self.take_found(key, req_headers, found, since, local).await
                    {
                        tier.count_filled();
                        lock.release().await;
                        return Take::Filled(entry);
                    }
                }
                Take::Holder(lock)
            }
        }
    }
}
