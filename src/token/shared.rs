//! The token shared by every replica (`budget.backend = "redis"`): one record in Redis,
//! refreshed under a lock by one replica at a time, so a rotating refresh token is spent
//! once while Redis is reachable. README "The Redis link, the shared token and
//! invalidations, in detail" has the protocol and what losing Redis costs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use ::redis::Script;
use serde_json::{json, Value};
use tokio::time::Instant;
use tracing::{info, warn};

use super::error::TokenError;
use super::file::{self, TokenRecord};
use super::refresh::Inner;
use super::state::{to_instant, Source};
use crate::replicas::{Redis, Unavailable, PATIENT_CALL_TIMEOUT};

/// Bound on each Redis call of the shared token, past the budget's [`crate::replicas::CALL_TIMEOUT`]
/// and not held back while Redis is merely slow ([`Redis::is_prompt`]): a refresh that gives
/// up on a late Redis refreshes alone, and with refresh tokens that rotate on every use it
/// then presents one another replica already spent, which the endpoint refuses (503s until
/// the record is adopted). Refreshes are rare and off the request path, so they wait
/// instead; only a Redis that is down, or slower than this, means refreshing alone.
pub(super) const PATIENT: Duration = PATIENT_CALL_TIMEOUT;

/// The lock lives this long unless its holder extends it, so a replica that dies mid-refresh
/// blocks the others for at most this.
const LOCK_TTL: Duration = Duration::from_secs(5);
/// The holder extends the lock this often while its exchange is in flight.
const LOCK_EXTEND_EVERY: Duration = Duration::from_millis(1500);
/// How often a replica waiting for another's refresh looks at the record.
const WAIT_POLL: Duration = Duration::from_millis(100);
/// A replica gives up waiting for another's refresh after this (its refresher retries).
const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// How often the watcher compares the record with the replica's token.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// The highest record version: the write script compares versions as Lua numbers, exact
/// up to 2^53, so a record beyond it (a tampered one; honest writers count up by one) is
/// refused rather than counted on, and no version ever wraps.
const MAX_VERSION: u64 = (1 << 53) - 1;
/// How many of the watcher's looks pass between its reads of which replicas are listed
/// (whose spent and refused markers are believed, see `markers`): well within the time a
/// replica stays listed, so every live one is seen.
const LISTED_EVERY: u32 = 4;
/// How far ahead of this replica's clock a time read from a record or a token file may lie
/// and still be believed (replicas' clocks differ by less): a later `written_at` or
/// `initialised_at` is a tampered or broken one, and would outrank every honest repair.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Whether `at` lies further ahead of `now` than [`CLOCK_SKEW`].
pub(crate) fn from_the_future(at: Option<SystemTime>, now: SystemTime) -> bool {
    at.is_some_and(|at| at > now + CLOCK_SKEW)
}

/// A token's epoch as this replica believes it (see `TokenRecord::initialised_at`): one
/// from the future counts as none. `None` orders before every time, so a token that no
/// repair ever stamped is of the oldest epoch.
fn epoch(record: &TokenRecord, now: SystemTime) -> Option<SystemTime> {
    record
        .initialised_at
        .filter(|at| !from_the_future(Some(*at), now))
}

/// Replaces the record: as the lock holder (ARGV[2] = its id), or with no lock held when
/// the stored version is still ARGV[3].
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if ARGV[2] ~= '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
else
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  local cur = redis.call('GET', KEYS[1])
  local v = 0
  if cur then
    local ok, d = pcall(cjson.decode, cur)
    if ok and type(d) == 'table' then v = tonumber(d['version']) or 0 end
  end
  if v ~= tonumber(ARGV[3]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1])
return 1
"#,
    )
});

/// A record as stored in Redis.
struct Stored {
    version: u64,
    record: TokenRecord,
    /// When the record was written (its `written_at`, Unix milliseconds), if it says.
    written_at: Option<SystemTime>,
    /// A digest of the record's text (never 0): tells one bad record from another.
    fingerprint: u64,
}

/// The Redis side of a shared token; one per [`Inner`].
pub(crate) struct SharedToken {
    pub(super) redis: Redis,
    record_key: String,
    lock_key: String,
    /// `<prefix>:token:refused`: a digest of the last refresh token the token endpoint
    /// refused, so no replica presents it again (see `markers`).
    pub(super) refused_key: String,
    /// The record version this replica's token came from or went to (0: none yet).
    seen: AtomicU64,
    /// This replica's token is one the others have not seen (refreshed alone while Redis
    /// was away, or put in its token file by an operator): offer it.
    pub(crate) unshared: AtomicBool,
    /// `<prefix>:token:spent:<digest>`: a refresh token some replica's refresh spent: no
    /// replica presents one again, a fallback included (see `markers`).
    pub(super) spent_prefix: String,
    /// Digests of refresh tokens presented while Redis was away, marked spent once it is back.
    pub(super) spent_alone: std::sync::Mutex<Vec<String>>,
    /// The markers this replica set and the writers it saw listed (see `markers`).
    pub(super) known: super::markers::Known,
    /// The fingerprint of the bad record last warned about (0: none since a good one), so a
    /// bad record is warned about once per incident, not per poll: a good record adopted,
    /// written or matching this replica's token ends the incident.
    warned: AtomicU64,
    /// The fingerprint of the record read last when it was unreadable (0: it was not), so
    /// one planted text is counted once while it stays, and warned once per text.
    unreadable: AtomicU64,
}

impl SharedToken {
    pub(crate) fn new(redis: Redis) -> SharedToken {
        SharedToken {
            record_key: redis.key("token"),
            lock_key: redis.key("token:lock"),
            refused_key: redis.key("token:refused"),
            spent_prefix: redis.key("token:spent"),
            redis,
            seen: AtomicU64::new(0),
            unshared: AtomicBool::new(false),
            spent_alone: std::sync::Mutex::new(Vec::new()),
            known: super::markers::Known::default(),
            warned: AtomicU64::new(0),
            unreadable: AtomicU64::new(0),
        }
    }

    async fn read(&self) -> Result<Option<Stored>, Unavailable> {
        let key = self.record_key.clone();
        let text: Result<Option<String>, Unavailable> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await;
        let text = match text {
            // Another type than the record's string is no record: it goes, so the next
            // write (this replica's token, offered as after Redis restarted empty) puts the
            // record back; meanwhile there is none.
            Err(err) if err.is_wrong_type() => {
                let key = self.record_key.clone();
                let _: Result<i64, _> = self
                    .redis
                    .run_within("token", PATIENT, |mut c| async move {
                        ::redis::cmd("DEL").arg(&key).query_async(&mut c).await
                    })
                    .await;
                self.redis.repaired(
                    &self.record_key,
                    "the shared token record holds another type than a string (WRONGTYPE); \
                     it was deleted, and this replica's token is offered in its place",
                );
                return Ok(None);
            }
            other => other?,
        };
        let Some(text) = text else {
            return Ok(None);
        };
        // A record larger than a token file may be is not one (and could not be written to
        // this replica's file): it is unreadable, so it is never adopted.
        let fits = text.len() as u64 <= file::MAX_FILE_BYTES;
        let fingerprint = {
            let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(&d.as_ref()[..8]);
            u64::from_le_bytes(first).max(1)
        };
        let parsed = fits.then(|| {
            serde_json::from_str::<Value>(&text).ok().and_then(|v| {
                let version = v.get("version")?.as_u64()?;
                let token = serde_json::to_vec(v.get("token")?).ok()?;
                let record = file::decode(&token, std::path::Path::new(&self.record_key)).ok()?;
                let written_at = v
                    .get("written_at")
                    .and_then(Value::as_u64)
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms));
                Some(Stored {
                    version,
                    record,
                    written_at,
                    fingerprint,
                })
            })
        });
        let parsed = parsed.flatten();
        // Only the shape is logged (the text may hold a token), once per planted value: the
        // watcher reads every second, so the same text found again is the same incident,
        // and another text (planted again after the repair, or changed) a new one.
        let unreadable = if parsed.is_none() { fingerprint } else { 0 };
        let before = self.unreadable.swap(unreadable, Ordering::AcqRel);
        if parsed.is_none() && before != fingerprint {
            self.redis.repaired_value(
                &self.record_key,
                fingerprint,
                "the shared token record is unreadable; it will be replaced",
            );
        }
        Ok(parsed)
    }

    fn encode(&self, version: u64, record: &TokenRecord) -> Option<String> {
        // The mark is this replica's note about its own file, never part of the record.
        let unmarked = TokenRecord {
            adopted: false,
            ..record.clone()
        };
        let token: Value = serde_json::from_slice(&file::encode(&unmarked).ok()?).ok()?;
        let written_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Some(
            json!({"version": version, "by": self.redis.id(), "written_at": written_at, "token": token})
                .to_string(),
        )
    }

    /// Writes `record` as `version`, as lock holder or by compare-and-set on `expected`.
    async fn put(
        &self,
        version: u64,
        record: &TokenRecord,
        holder: bool,
        expected: u64,
    ) -> Result<bool, Unavailable> {
        let Some(text) = self.encode(version, record) else {
            return Ok(false);
        };
        let keys = [self.record_key.clone(), self.lock_key.clone()];
        let owner = if holder { self.redis.id() } else { "" }.to_string();
        let written: i64 = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                PUT.key(&keys[0])
                    .key(&keys[1])
                    .arg(&text)
                    .arg(&owner)
                    .arg(expected)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if written == 1 {
            self.seen.store(version, Ordering::Release);
            self.incident_over();
            // What was unreadable is replaced: the same text planted again is repaired
            // (and counted) again, though warned about only once.
            self.unreadable.store(0, Ordering::Release);
        }
        Ok(written == 1)
    }

    /// Whether `st` is a bad record not warned about yet in this incident (and notes it).
    fn first_warning(&self, st: &Stored) -> bool {
        self.warned.swap(st.fingerprint, Ordering::AcqRel) != st.fingerprint
    }

    /// A good record is in place: the next bad one is a new incident, warned about at once.
    fn incident_over(&self) {
        self.warned.store(0, Ordering::Release);
    }

    async fn try_lock(&self) -> Result<bool, Unavailable> {
        let taken = self
            .redis
            .try_lock("token", &self.lock_key, self.redis.id(), LOCK_TTL, PATIENT)
            .await?;
        if !taken {
            self.bound_lock().await;
        }
        Ok(taken)
    }

    /// A lock with no expiry, or a longer one than any holder sets, is a stray or tampered
    /// key that would block every refresh forever: it gets the holders' expiry. Setting it
    /// on a real holder's lock is harmless (its keeper extends it the same way).
    async fn bound_lock(&self) {
        let key = self.lock_key.clone();
        let ttl: Result<i64, _> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("PTTL").arg(&key).query_async(&mut c).await
            })
            .await;
        let limit = i64::try_from(millis(LOCK_TTL)).unwrap_or(i64::MAX);
        if !matches!(ttl, Ok(t) if t == -1 || t > limit) {
            return;
        }
        let key = self.lock_key.clone();
        let bounded: Result<i64, _> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("PEXPIRE")
                    .arg(&key)
                    .arg(millis(LOCK_TTL))
                    .query_async(&mut c)
                    .await
            })
            .await;
        if matches!(bounded, Ok(1)) {
            self.redis.repaired(
                &self.lock_key,
                "the token refresh lock had no bounded expiry; it now expires like any holder's",
            );
        }
    }

    /// Keeps the lock alive while the exchange runs; aborted when it ends.
    fn spawn_keeper(&self) -> tokio::task::JoinHandle<()> {
        let (redis, key) = (self.redis.clone(), self.lock_key.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(LOCK_EXTEND_EVERY).await;
                if !redis
                    .extend_lock("token", &key, redis.id(), LOCK_TTL, PATIENT)
                    .await
                {
                    warn!(
                        "token refresh lock could not be extended; another replica may refresh too"
                    );
                    return;
                }
            }
        })
    }

    async fn release(&self) {
        self.redis
            .release_lock("token", &self.lock_key, self.redis.id(), PATIENT)
            .await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whether a record expiring at `theirs` is alive at `now` and expires later than a dead
/// token expiring at `mine` (a record without expiry counts as later; a dead token without
/// one is outlived by any live record).
fn outlives(theirs: Option<SystemTime>, mine: Option<SystemTime>, now: SystemTime) -> bool {
    match (theirs, mine) {
        (Some(t), _) if t <= now => false,
        (None, _) | (_, None) => true,
        (Some(t), Some(m)) => t > m,
    }
}

/// Whether `a` expires strictly later than `b` (a token without expiry is never later).
fn later(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a > b,
        (Some(_), None) | (None, _) => false,
    }
}

/// The version after `version`, if it can be counted (see [`MAX_VERSION`]).
fn next_version(version: u64) -> Option<u64> {
    version.checked_add(1).filter(|v| *v <= MAX_VERSION)
}

/// Whether the token this replica holds can be used: not expired, sendable, and neither
/// refused by the upstream nor waiting for re-authorisation. Only then does it outrank a
/// record that expires sooner (an operator's corrected record replaces a token that stopped
/// working, whatever their expiries).
fn usable(state: &super::state::State) -> bool {
    !state.reauth
        && !state.refresh_dead()
        && state.refused == 0
        && super::state::current_of(state).is_ok_and(|c| file::sendable(c.access.expose()))
}

/// Why a stored record must not replace `mine`, if it must not: a record anyone with
/// access to Redis can write is checked like an answer from the token endpoint before it
/// reaches this replica's memory and token file. `mine_usable`: see [`usable`]. The
/// version rule only protects a usable token: after Redis restarts empty, versions start
/// again, and a replica whose token is dead takes a live record that expires later than
/// its own whatever its version, rather than answering 503 until the count passes its own.
fn refused(
    st: &Stored,
    mine: &TokenRecord,
    mine_usable: bool,
    seen: u64,
    now: SystemTime,
) -> Option<&'static str> {
    if st.version > MAX_VERSION {
        return Some("its version is beyond what a record can count");
    }
    if from_the_future(st.written_at, now) {
        return Some("its written_at lies in the future: the record is not trusted");
    }
    if from_the_future(st.record.initialised_at, now) {
        return Some("its initialised_at lies in the future: the record is not trusted");
    }
    // An operator's repair starts a newer epoch, which replaces a working token whatever
    // the expiries say (the token it repairs may well expire later); a record from before
    // the repair this replica's working token descends from never replaces it.
    let (theirs, ours) = (st.record.initialised_at, epoch(mine, now));
    if mine_usable && theirs < ours {
        return Some(
            "it is older than the operator's repair this replica's valid token comes from \
             (its initialised_at is earlier)",
        );
    }
    let repair = theirs > ours;
    if mine_usable && st.record.expires_at.is_none() && mine.expires_at.is_some() {
        return Some("it says nothing of when it expires and this replica's valid token does");
    }
    if mine_usable && st.record.expires_at.is_some_and(|at| at <= now) {
        return Some("it has already expired and this replica's token is valid");
    }
    if mine_usable && !repair && later(mine.expires_at, st.record.expires_at) {
        return Some("it expires sooner than this replica's valid token");
    }
    if !file::sendable(st.record.access.expose()) {
        return Some("its access token cannot be sent upstream");
    }
    if st
        .record
        .refresh
        .as_ref()
        .is_some_and(|r| !file::sendable(r.expose()))
    {
        return Some("its refresh token cannot be sent upstream");
    }
    if mine.refresh.is_some()
        && !st
            .record
            .refresh
            .as_ref()
            .is_some_and(|r| file::sendable(r.expose()))
    {
        return Some("it has no usable refresh token and this replica holds one");
    }
    if file::encode(&st.record).is_err() {
        return Some("it would not fit in a token file");
    }
    if st.version <= seen && st.record.access != mine.access {
        if mine_usable {
            return Some("its version does not move forward");
        }
        // After Redis restarts empty, versions start again: a replica whose token is dead
        // takes a live record that outlives its own rather than answering 503 until the
        // count passes its own.
        if !outlives(st.record.expires_at, mine.expires_at, now) {
            return Some("its version does not move forward and it does not outlive this replica's unusable token");
        }
    }
    None
}

impl Inner {
    /// A refresh when the token is shared (see the module docs).
    pub(crate) async fn refresh_shared(&self, shared: &SharedToken) -> Result<(), TokenError> {
        let started = Instant::now();
        loop {
            match shared.read().await {
                Err(_) => return self.refresh_alone(shared).await,
                Ok(Some(st)) if self.worth_adopting(&st) => {
                    if self.adopt(shared, st).await {
                        return Ok(());
                    }
                }
                Ok(_) => {}
            }
            match shared.try_lock().await {
                Err(_) => return self.refresh_alone(shared).await,
                Ok(true) => return self.refresh_holding_lock(shared).await,
                Ok(false) => {}
            }
            if started.elapsed() > WAIT_LIMIT {
                return Err(TokenError::SharedRefreshStalled);
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }

    /// Whether a record holds another token that may replace this replica's: one that
    /// expires no sooner, one of a newer epoch (an operator's repair), or any when this
    /// replica's own came from the record and the upstream has not taken it (a restored
    /// record expires sooner than a tampered one).
    fn worth_adopting(&self, st: &Stored) -> bool {
        let state = self.lock();
        let now = SystemTime::now();
        st.record.access != state.record.access
            && (state.adopted
                || !later(state.record.expires_at, st.record.expires_at)
                || epoch(&st.record, now) > epoch(&state.record, now))
    }

    /// Whether `refresh` is the refresh token this replica proved itself (it refreshed
    /// with it, or `cxgate token init` wrote it) and the endpoint never refused to it.
    fn proved(&self, refresh: &super::Secret) -> bool {
        let state = self.lock();
        !state.dead.contains(refresh)
            && state.proven.as_ref().and_then(|p| p.refresh.as_ref()) == Some(refresh)
    }

    /// The held refresh token cannot be presented (`why`): a token pair held before is
    /// taken back if one still works ([`Inner::recover`]); else this replica needs
    /// re-authorisation. Releases the refresh lock either way.
    async fn recover_or_reauthorise(
        &self,
        shared: &SharedToken,
        version: Option<u64>,
        why: &str,
    ) -> Result<(), TokenError> {
        if let Some(outcome) = self.recover(shared, version).await {
            shared.release().await;
            return outcome;
        }
        {
            let mut state = self.lock();
            state.failures += 1;
            state.reauth = true;
            // Decided on a marker, not on the endpoint's answer to this replica: a later
            // refresh looks again, so a marker deleted (or expired) ends it.
            state.held_back = true;
        }
        warn!(
            "re-authorisation needed: {why}; authorise again and run `cxgate token init` \
             (or, if no replica set that marker, delete it)"
        );
        shared.release().await;
        Err(TokenError::InvalidGrant)
    }

    async fn refresh_holding_lock(&self, shared: &SharedToken) -> Result<(), TokenError> {
        // Another replica may have written its record between our read and our lock.
        let (version, stored_epoch) = match shared.read().await {
            Ok(Some(st)) if self.worth_adopting(&st) => {
                let (version, at) = (st.version, epoch(&st.record, SystemTime::now()));
                if self.adopt(shared, st).await {
                    shared.release().await;
                    return Ok(());
                }
                (Some(version), at)
            }
            Ok(st) => (
                st.as_ref().map(|s| s.version),
                st.and_then(|s| epoch(&s.record, SystemTime::now())),
            ),
            Err(_) => (None, None),
        };
        // A refresh token another replica already had refused is not presented again: this
        // replica needs re-authorisation as much as that one did. About a refresh token
        // this replica proved, only a marker from a replica it knows is believed; any other
        // is put to the test by this one refresh (see `markers`).
        let (spent, generation) = {
            let state = self.lock();
            (state.record.refresh.clone(), state.generation)
        };
        let mut doubted = Vec::new();
        if let Some(spent) = &spent {
            let proved = self.proved(spent);
            let refused_believed = match shared.refused_marker(spent).await.ok().flatten() {
                Some(marker) => shared.weigh(marker, proved, &mut doubted).await,
                None => false,
            };
            if refused_believed {
                self.lock().bury(spent);
                return self
                    .recover_or_reauthorise(
                        shared,
                        version,
                        "another replica's refresh with this refresh token was refused \
                         (invalid_grant)",
                    )
                    .await;
            }
            // Another replica's refresh already spent it: presenting it again would be a
            // reuse. That refresh's record is the successor, whatever its expiry says (it
            // is stored to the second, so it can look older than this replica's token).
            let spent_believed = match shared.spent_marker(spent).await.ok().flatten() {
                Some(marker) => shared.weigh(marker, proved, &mut doubted).await,
                None => false,
            };
            if spent_believed {
                self.lock().bury(spent);
                if let Some(outcome) = self.take_successor(shared, spent).await {
                    shared.release().await;
                    return outcome;
                }
                return self
                    .recover_or_reauthorise(
                        shared,
                        version,
                        "another replica already refreshed with this refresh token and its \
                         token could not be taken from the shared record",
                    )
                    .await;
            }
        }
        let keeper = shared.spawn_keeper();
        let result = self.exchange().await;
        keeper.abort();
        if let (Ok(()), Some(spent)) = (&result, &spent) {
            shared.mark_spent(spent).await;
            for marker in &doubted {
                shared.disproved(marker);
            }
        }
        if let (Err(err), Some(spent)) = (&result, &spent) {
            // Recorded before the lock goes, so the next holder sees it.
            if err.needs_reauthorisation() {
                shared.mark_refused(spent).await;
                if let Some(outcome) = self.recover(shared, version).await {
                    shared.release().await;
                    return outcome;
                }
                super::refresh::say_reauthorisation(generation);
            }
        }
        if result.is_ok() {
            let record = self.lock().record.clone();
            let next = next_version(version.unwrap_or(shared.seen.load(Ordering::Acquire)));
            // A token of an older epoch than the record's (one this replica would not
            // adopt: no refresh token, say) is not written over an operator's repair.
            let older = stored_epoch > epoch(&record, SystemTime::now());
            let put = match next {
                Some(next) if !older => shared.put(next, &record, true, 0).await,
                _ => Ok(false),
            };
            match put {
                Ok(true) => shared.unshared.store(false, Ordering::Release),
                Ok(false) | Err(_) => {
                    warn!("refreshed token could not be stored for the other replicas; offering it when possible");
                    shared.unshared.store(true, Ordering::Release);
                }
            }
        }
        shared.release().await;
        result
    }

    /// Redis is unreachable: refresh as a single gateway would, and remember to offer it.
    async fn refresh_alone(&self, shared: &SharedToken) -> Result<(), TokenError> {
        // Held back by a marker another replica set: without Redis it cannot be looked at
        // again, and presenting a token a replica spent would be a reuse.
        if self.lock().held_back {
            return Err(TokenError::InvalidGrant);
        }
        warn!("shared token store unreachable; refreshing from this replica's own token file");
        let spent = self.lock().record.refresh.clone();
        let result = self.refresh_local().await;
        if result.is_ok() {
            if let Some(spent) = &spent {
                shared.spent_while_away(spent);
            }
            shared.unshared.store(true, Ordering::Release);
        }
        result
    }

    /// The refresh token held was spent by another replica's refresh: takes the record
    /// stored when it holds another refresh token (`None` when it does not, or is refused).
    async fn take_successor(
        &self,
        shared: &SharedToken,
        spent: &super::Secret,
    ) -> Option<Result<(), TokenError>> {
        let st = shared.read().await.ok()??;
        if st.record.refresh.as_ref() == Some(spent) {
            return None;
        }
        let version = st.version;
        if !self.adopt(shared, st).await {
            return None;
        }
        info!(
            version,
            "the refresh token held was already spent by another replica's refresh: took \
             the token that refresh stored instead of presenting it again"
        );
        Some(Ok(()))
    }

    /// The token endpoint refused (`invalid_grant`) the refresh token held, and it came from
    /// the shared record (the token file's mark): a record anyone with access to Redis can
    /// write, and an access token the upstream took proves nothing of its refresh token.
    /// Goes back to a pair held before it whose refresh token no replica has presented since
    /// (a rotated refresh token presented twice is refused, and an endpoint that detects
    /// reuse may revoke the whole grant, the others' newer tokens with it): the ones other
    /// replicas' records brought since this replica's last refresh, newest first, then the
    /// last one it proved ([`State::proven`](super::state::State), else the token file's
    /// `.prev`). Failing that, takes the record now stored when it holds another refresh
    /// token (a replica recovered first). Called holding the refresh lock; `None` when the
    /// refresh token held was this replica's own, or nothing is left to go back to (a real
    /// re-authorisation).
    async fn recover(
        &self,
        shared: &SharedToken,
        version: Option<u64>,
    ) -> Option<Result<(), TokenError>> {
        let (rejected, mut candidates, marked) = {
            let state = self.lock();
            let mut candidates: Vec<(TokenRecord, bool)> = state
                .superseded
                .iter()
                .rev()
                .map(|r| (r.clone(), false))
                .collect();
            candidates.extend(state.proven.clone().map(|r| (r, true)));
            (
                state.record.access.clone(),
                candidates,
                state.record.adopted,
            )
        };
        if !marked {
            return None;
        }
        let Source::File(path) = &self.source else {
            return None;
        };
        if !candidates.iter().any(|(_, proven)| *proven) {
            if let Ok((record, _)) = file::read_stamped(&file::previous_path(path)).await {
                if !record.adopted {
                    candidates.push((record, true));
                }
            }
        }
        let mut passed_over = 0;
        for (record, _) in candidates {
            let Some(refresh) = record.refresh.clone() else {
                continue;
            };
            let usable = {
                let state = self.lock();
                file::sendable(record.access.expose())
                    && file::sendable(refresh.expose())
                    && !state.dead.contains(&refresh)
            };
            if !usable {
                continue;
            }
            // Never presented on a guess: a Redis that does not say counts as spent.
            if shared.was_spent(&refresh).await != Some(false) {
                passed_over += 1;
                continue;
            }
            match self.restore(shared, version, record).await {
                Err(err) if err.needs_reauthorisation() => continue,
                outcome => return Some(outcome),
            }
        }
        if passed_over > 0 {
            warn!(
                passed_over,
                "the refresh token held came from the shared record and was refused \
                 (invalid_grant); refresh tokens held before it were presented since by a \
                 replica's refresh, so they are not presented again"
            );
        }
        let dead = self.lock().dead.clone();
        match shared.read().await {
            Ok(Some(st))
                if st.record.access != rejected
                    && st
                        .record
                        .refresh
                        .as_ref()
                        .is_some_and(|r| !dead.contains(r)) =>
            {
                let version = st.version;
                if self.adopt(shared, st).await {
                    warn!(
                        version,
                        "the refresh token held came from the shared record and was refused \
                         (invalid_grant); took the newer record another replica stored"
                    );
                    return Some(Ok(()));
                }
                None
            }
            _ => None,
        }
    }

    /// Installs `record`, a pair held before the refused one, refreshes with its refresh
    /// token at once, and offers the result as the next version so the other replicas
    /// recover too. Always refreshed, a proven pair too: the caller was refreshing (an
    /// upstream 401, or a token about to expire), so the access token it held before may be
    /// refused as well (every access token revoked), and the request waiting on this
    /// refresh is replayed once, with what this gives it. The new pair reaches the token
    /// file through the refresh.
    async fn restore(
        &self,
        shared: &SharedToken,
        version: Option<u64>,
        record: TokenRecord,
    ) -> Result<(), TokenError> {
        if !matches!(self.source, Source::File(_)) {
            return Err(TokenError::NotRefreshable);
        }
        let record = TokenRecord {
            adopted: false,
            ..record
        };
        let now = Instant::now();
        let expires = record.expires_at.map(|at| to_instant(at, now));
        let rejected_version = version.unwrap_or(shared.seen.load(Ordering::Acquire));
        {
            let mut state = self.lock();
            state.replace(record.clone(), expires, now);
            state.refreshed_at = Some(now);
        }
        let Some(refresh) = &record.refresh else {
            return Err(TokenError::NotRefreshable);
        };
        let keeper = shared.spawn_keeper();
        let refreshed = self.exchange().await;
        keeper.abort();
        if refreshed.is_ok() {
            shared.mark_spent(refresh).await;
        }
        if let Err(err) = refreshed {
            if err.needs_reauthorisation() {
                shared.mark_refused(refresh).await;
            }
            return Err(err);
        }
        let (offer, generation) = {
            let state = self.lock();
            (state.record.clone(), state.generation)
        };
        let put = match next_version(rejected_version) {
            Some(next) => shared.put(next, &offer, true, 0).await,
            None => Ok(false),
        };
        let offered = matches!(put, Ok(true));
        shared.unshared.store(!offered, Ordering::Release);
        warn!(
            version = rejected_version,
            generation,
            offered,
            "shared token record rejected: the token endpoint refused its refresh token \
             (invalid_grant); back to a refresh token this replica held before it, which no \
             replica presented since, offered to the other replicas"
        );
        Ok(())
    }

    /// Installs another replica's token: own token file first, then memory. A record that
    /// fails [`refused`] is left alone (and said so once per version).
    async fn adopt(&self, shared: &SharedToken, st: Stored) -> bool {
        let (mine, mine_usable, dead) = {
            let state = self.lock();
            // A token taken from the record that the upstream has not accepted yet does not
            // outrank a record expiring sooner: it may be the tampered one a replica replaced.
            let dead = st
                .record
                .refresh
                .as_ref()
                .is_some_and(|r| state.dead.contains(r));
            (state.record.clone(), usable(&state) && !state.adopted, dead)
        };
        let seen = shared.seen.load(Ordering::Acquire);
        let reason = if self.holds_client_key(&st.record) {
            Some("its access or refresh token holds a client's gateway key, which never travels upstream")
        } else if dead {
            Some("its refresh token was refused by the token endpoint or spent already")
        } else {
            refused(&st, &mine, mine_usable, seen, SystemTime::now())
        };
        if let Some(reason) = reason {
            if shared.first_warning(&st) {
                warn!(
                    version = st.version,
                    reason, "shared token record not adopted"
                );
            }
            return false;
        }
        // Marked in the file, so a restart before the upstream accepts it keeps the fallback.
        let record = TokenRecord {
            adopted: true,
            ..st.record
        };
        let mut stamp = None;
        if let Source::File(path) = &self.source {
            match file::persist(path, &record).await {
                Ok(written) => stamp = Some(written),
                Err(err) => {
                    warn!(error = %err, "shared token could not be saved to this replica's token file")
                }
            }
        }
        let now = Instant::now();
        let mut state = self.lock();
        shared.seen.store(st.version, Ordering::Release);
        shared.incident_over();
        if state.record.access == record.access {
            // The file now holds the record, marked: memory holds its refresh token too.
            if let Some(stamp) = stamp {
                state.supersede(&record);
                state.record.refresh = record.refresh;
                state.record.adopted = true;
                state.file_stamp = Some(stamp);
            }
            return true;
        }
        state.supersede(&record);
        // The refresh token held is replaced by one this replica has not used: say so when
        // it was the proven one (once per switch, not at every adoption), and where it stays.
        let proven_refresh = state.proven.as_ref().and_then(|p| p.refresh.clone());
        if proven_refresh.is_some()
            && state.record.refresh == proven_refresh
            && record.refresh != proven_refresh
        {
            info!(
                version = st.version,
                "the refresh token held is replaced by the shared record's, which this replica \
                 has not used yet: the last one it proved stays in memory and in the token \
                 file's .prev until a refresh with the new one succeeds, and is gone back to \
                 should the token endpoint refuse the new one"
            );
        }
        let expires = record.expires_at.map(|at| to_instant(at, now));
        state.replace(record, expires, now);
        state.refreshed_at = Some(now);
        state.last_refresh = Some(SystemTime::now());
        if let Some(stamp) = stamp {
            state.file_stamp = Some(stamp);
            state.unsaved = false;
        }
        info!(
            generation = state.generation,
            version = st.version,
            "using the token another replica refreshed"
        );
        true
    }

    /// Brings this replica and the record together: adopts a newer record, or offers this
    /// replica's token when the record is missing, older, or was missed while Redis was away.
    pub(crate) async fn reconcile(&self) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        // A refresh in flight settles the record itself.
        if self.lock().flight.is_some() {
            return;
        }
        let Ok(stored) = shared.read().await else {
            return;
        };
        shared.mark_spent_while_away().await;
        let (record, flying) = {
            let state = self.lock();
            (state.record.clone(), state.flight.is_some())
        };
        if flying {
            return;
        }
        match stored {
            // A dead token is not offered to an empty store: a replica that restarted with
            // a live one would have to wait for the dead one to be replaced.
            None if !usable(&self.lock()) => {}
            None => {
                if let Ok(true) = shared.put(1, &record, false, 0).await {
                    shared.unshared.store(false, Ordering::Release);
                    info!("shared token record created from this replica's token");
                }
            }
            Some(st) if st.version > MAX_VERSION => {
                if shared.first_warning(&st) {
                    warn!(
                        version = st.version,
                        "shared token record not adopted: its version is beyond what a record \
                         can count; write a corrected record (or delete it) to share tokens again"
                    );
                }
            }
            Some(st) if st.record.access == record.access => {
                shared.seen.store(st.version, Ordering::Release);
                shared.unshared.store(false, Ordering::Release);
                shared.incident_over();
                // The same token stamped with a newer epoch (a reload took a token file
                // written by hand, and stamped it in memory only): its refreshes carry it on.
                let now = SystemTime::now();
                if epoch(&st.record, now) > epoch(&record, now) {
                    let mut state = self.lock();
                    if state.record.access == st.record.access {
                        state.record.initialised_at = st.record.initialised_at;
                    }
                }
            }
            Some(st) => {
                // Epochs decide first (see `TokenRecord::initialised_at`): a record of a
                // newer one is an operator's repair, adopted and never pushed back out; a
                // token of a newer one than the record's is a repair the others have not
                // got, offered. A token this replica adopted and the upstream has not taken
                // is never offered: it may be the tampered record's.
                // Within one epoch only a token the others have not seen is offered over
                // the record (refreshed alone while Redis was away). Comparing expiries is
                // for the first meeting alone (a replica started on a fresh file):
                // afterwards it would push a bad record back over a repair.
                // Times from the future are believed from neither side: a record claiming
                // one is refused by `adopt` (and never outranks the file), a file claiming
                // one repairs nothing.
                let first_meeting = shared.seen.load(Ordering::Acquire) == 0;
                let now = SystemTime::now();
                if (from_the_future(st.written_at, now)
                    || from_the_future(st.record.initialised_at, now))
                    && shared.first_warning(&st)
                {
                    warn!(
                        version = st.version,
                        "shared token record not trusted: its written_at or initialised_at \
                         lies in the future"
                    );
                }
                let adopted = self.lock().adopted;
                let ours = epoch(&record, now);
                let theirs = epoch(&st.record, now);
                let ours_newer = !adopted
                    && match ours.cmp(&theirs) {
                        // A repair the upstream refused is no repair: not offered (the
                        // others may be falling back from it).
                        std::cmp::Ordering::Greater => usable(&self.lock()),
                        std::cmp::Ordering::Less => false,
                        std::cmp::Ordering::Equal => {
                            shared.unshared.load(Ordering::Acquire)
                                || (first_meeting
                                    && (from_the_future(st.written_at, now)
                                        || later(record.expires_at, st.record.expires_at)))
                        }
                    };
                let next = next_version(st.version);
                if !ours_newer {
                    self.adopt(shared, st).await;
                } else if let Some(next) = next {
                    if let Ok(true) = shared.put(next, &record, false, st.version).await {
                        shared.unshared.store(false, Ordering::Release);
                        info!(
                            version = next,
                            "offered this replica's newer token to the other replicas"
                        );
                    }
                }
            }
        }
    }
}

/// The watcher: reconciles with the record every [`WATCH_EVERY`] while Redis is up, and
/// every [`LISTED_EVERY`] looks notes which replicas are listed.
pub(crate) async fn watch(inner: Arc<Inner>) {
    let mut looks = 0u32;
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(shared) = inner.shared.get().filter(|s| s.redis.is_prompt()) else {
            continue;
        };
        inner.reconcile().await;
        looks = looks.wrapping_add(1);
        if looks % LISTED_EVERY == 1 {
            shared.learn_listed().await;
        }
    }
}
