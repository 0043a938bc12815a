//! The single-flight refresh and the background refresher. Refresh tokens rotate and work
//! once, so one exchange at a time spends the refresh token, saves the answer to the token
//! file, and only then publishes it; a caller that gives up cannot abort it halfway.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::error::TokenError;
use super::file::{self, TokenRecord};
use super::metrics::{ExpirySource, TokenMetrics};
use super::oauth::{self, Grant};
use super::secret::Secret;
use super::state::{current_of, to_instant, Outcome, Source, State};
use super::{Current, OAuthSettings};
use crate::upstream::HttpClient;

/// After a failed refresh, rejection-triggered refreshes reuse the failure for this long
/// instead of calling the endpoint again: many 401s must not become many token calls.
const FAILURE_COOLDOWN: Duration = Duration::from_secs(1);
/// A freshly refreshed token is not refreshed again sooner than this, whatever its lifetime.
const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);
/// The refresher re-reads its plan at least this often, so state changes made elsewhere
/// (a 401-triggered refresh, a re-authorisation) are noticed without a wake-up channel.
const IDLE_TICK: Duration = Duration::from_secs(60);
/// How often an unrefreshable token's file is re-read to pick up `cxgate token init`.
pub(crate) const FILE_POLL: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_CAP: Duration = Duration::from_secs(300);
/// Once the token has expired, clients get 503 until a refresh works: retry more eagerly.
const BACKOFF_CAP_EXPIRED: Duration = Duration::from_secs(30);

pub(crate) struct Inner {
    pub source: Source,
    pub refresh_before: Duration,
    pub oauth: Option<OAuthSettings>,
    pub client_secret: Option<Secret>,
    pub client: HttpClient,
    pub state: Mutex<State>,
    pub metrics: Option<TokenMetrics>,
    /// Set when the token is shared with other replicas through Redis (see `shared`).
    pub shared: std::sync::OnceLock<super::shared::SharedToken>,
    /// Wakes the refresher when a token is installed from elsewhere (a reload), so a token
    /// that must be refreshed at once is not left until the refresher's next look.
    pub wake: tokio::sync::Notify,
    /// The clients' gateway keys, the set the request path searches (their digests, and
    /// the spellings of every key a client has proven): no token holding one is taken
    /// from a token file, the OAuth endpoint or the shared record, since it would carry a
    /// key upstream.
    pub client_keys: std::sync::RwLock<Arc<crate::auth::Clients>>,
}

impl ExpirySource for Inner {
    fn seconds_left(&self) -> Option<f64> {
        let expires = self.lock().expires?;
        let now = Instant::now();
        Some(if expires >= now {
            (expires - now).as_secs_f64()
        } else {
            -(now - expires).as_secs_f64()
        })
    }
}

impl Inner {
    /// The state sits behind a std `Mutex`: every critical section is a few field reads or
    /// writes and none spans an `.await`. A poisoned lock is recovered because no section can
    /// leave the fields half-updated (they are assigned after all fallible work is done).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `record`'s access or refresh token holds one of the clients' gateway keys.
    pub fn holds_client_key(&self, record: &TokenRecord) -> bool {
        let keys = self.clients();
        file::record_holds_key(record, &*keys)
    }

    /// The clients' keys tokens are held against (see [`Inner::client_keys`]).
    pub fn clients(&self) -> Arc<crate::auth::Clients> {
        self.client_keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Whether a refresh can be attempted at all (OAuth configured and a refresh token).
    pub fn refreshable(&self, state: &State) -> bool {
        self.oauth.is_some() && self.client_secret.is_some() && state.record.refresh.is_some()
    }

    pub fn current(&self) -> Result<Current, TokenError> {
        let state = self.lock();
        current_of(&state)
    }

    /// Refreshes unless the token already moved past `seen`.
    /// `force` skips the failure cooldown (the refresher keeps its own backoff).
    ///
    /// Invariants:
    /// - At most one refresh runs at a time. It runs in a spawned task that owns everything it
    ///   needs, so a caller that gives up (client hung up, timeout) cannot abort it between
    ///   "the endpoint consumed the old refresh token" and "the new one is saved".
    /// - The new token is written to the token file before it is published in memory (see
    ///   [`Inner::exchange`]).
    /// - Every waiter of a flight gets the flight's outcome; nobody starts a second exchange
    ///   with the refresh token the first one is spending.
    pub async fn refresh(self: &Arc<Self>, seen: u64, force: bool) -> Result<Current, TokenError> {
        let mut outcome = {
            let mut state = self.lock();
            if state.generation != seen {
                return current_of(&state);
            }
            // A flight whose task died without an outcome (it panicked) is replaced.
            match state.flight.as_ref().filter(|rx| rx.has_changed().is_ok()) {
                Some(rx) => rx.clone(),
                None => {
                    if !self.refreshable(&state) {
                        return Err(TokenError::NotRefreshable);
                    }
                    if state.reauth && !state.held_back {
                        return Err(TokenError::InvalidGrant);
                    }
                    if let Some((at, err)) = &state.last_failure {
                        if !force && at.elapsed() < FAILURE_COOLDOWN {
                            return Err(TokenError::Shared(Arc::clone(err)));
                        }
                    }
                    let (tx, rx) = watch::channel(None);
                    state.flight = Some(rx.clone());
                    let inner = Arc::clone(self);
                    tokio::spawn(async move { inner.fly(tx).await });
                    rx
                }
            }
        };
        let result = outcome
            .wait_for(Option::is_some)
            .await
            .map_err(|_| TokenError::RefreshAborted)?
            .clone();
        match result {
            Some(Ok(())) => self.current(),
            Some(Err(err)) => Err(TokenError::Shared(err)),
            None => Err(TokenError::RefreshAborted),
        }
    }

    async fn fly(self: Arc<Self>, tx: watch::Sender<Option<Outcome>>) {
        let outcome = self.refresh_once().await.map_err(Arc::new);
        {
            let mut state = self.lock();
            state.flight = None;
            if let Err(err) = &outcome {
                state.last_failure = Some((Instant::now(), Arc::clone(err)));
            }
        }
        tx.send_replace(Some(outcome));
    }

    /// One refresh: through the other replicas' lock when the token is shared, else alone.
    async fn refresh_once(&self) -> Result<(), TokenError> {
        match self.shared.get() {
            Some(shared) => self.refresh_shared(shared).await,
            None => self.refresh_local().await,
        }
    }

    /// [`Inner::exchange`] with nothing to fall back to: an `invalid_grant` means
    /// re-authorisation, said as the error it is.
    pub(crate) async fn refresh_local(&self) -> Result<(), TokenError> {
        let generation = self.lock().generation;
        let result = self.exchange().await;
        if let Err(err) = &result {
            if err.needs_reauthorisation() {
                say_reauthorisation(generation);
            }
        }
        result
    }

    /// One exchange: spend the refresh token, save the answer, then publish it. An
    /// `invalid_grant` marks the replica as needing re-authorisation but is not said: a
    /// caller with a fallback (a pair held before) tries it first, and says it only when
    /// nothing worked ([`say_reauthorisation`]).
    ///
    /// A crash leaves the whole old file or the whole new one; only a crash in the few
    /// milliseconds between the endpoint's answer and the rename leaves the old, already
    /// spent refresh token, which no client of a rotate-once endpoint can avoid.
    pub(crate) async fn exchange(&self) -> Result<(), TokenError> {
        let (Some(oauth), Some(secret)) = (&self.oauth, &self.client_secret) else {
            return Err(TokenError::NotRefreshable);
        };
        let (spent, scope, epoch, generation) = {
            let state = self.lock();
            let record = &state.record;
            (
                record.refresh.clone(),
                record.scope.clone(),
                record.initialised_at,
                state.generation,
            )
        };
        let Some(spent) = spent else {
            return Err(TokenError::NotRefreshable);
        };
        let granted = oauth::exchange(&self.client, oauth, secret, Grant::Refresh(&spent)).await;
        let granted = match granted {
            Ok(granted) => granted,
            Err(err) => {
                self.count(false);
                let mut state = self.lock();
                state.failures += 1;
                if err.needs_reauthorisation() {
                    state.reauth = true;
                    state.held_back = false;
                    state.bury(&spent);
                    info!(
                        generation,
                        "the token endpoint refused the refresh token held (invalid_grant)"
                    );
                } else {
                    let failures = state.failures;
                    warn!(generation, failures, error = %err, "token refresh failed; will retry");
                }
                return Err(err);
            }
        };

        let wall = SystemTime::now();
        let now = Instant::now();
        let record = TokenRecord {
            access: granted.access,
            // Without a new refresh token the endpoint does not rotate: keep the old one.
            refresh: granted.refresh.or(Some(spent)),
            expires_at: granted.expires_in.and_then(|d| wall.checked_add(d)),
            scope: granted.scope.or(scope),
            // A refresh continues the lineage: its epoch stays the operator's last repair.
            initialised_at: epoch,
            adopted: false,
        };
        // The old refresh token is spent, but an answer holding a gateway key must not be
        // used or kept: sending it would hand a client's key to the upstream.
        if self.holds_client_key(&record) {
            self.count(false);
            self.lock().failures += 1;
            let err = TokenError::ClientKey {
                what: format!("the token endpoint's answer (generation {generation})"),
            };
            error!(generation, error = %err, "refreshed token not taken");
            return Err(err);
        }
        let (mut saved, mut stamp) = (true, None);
        if let Source::File(path) = &self.source {
            match file::persist(path, &record).await {
                Ok(written) => stamp = Some(written),
                Err(err) => {
                    // The endpoint already consumed the old refresh token, so dropping the
                    // new one would lose the credential for good: use it, and say loudly
                    // that a restart would need re-authorisation.
                    saved = false;
                    error!(
                        generation,
                        error = %err,
                        "refreshed token could not be saved; a restart now needs re-authorisation"
                    );
                }
            }
        }
        let expires = granted.expires_in.and_then(|d| now.checked_add(d));
        let new_generation = {
            let mut state = self.lock();
            state.replace(record, expires, now);
            state.last_refresh = Some(wall);
            state.refreshed_at = Some(now);
            state.unsaved = !saved;
            if saved {
                state.file_stamp = stamp;
            }
            state.trust();
            state.generation
        };
        self.count(true);
        info!(
            generation = new_generation,
            expires_in_s = granted.expires_in.map(|d| d.as_secs()),
            "access token refreshed"
        );
        Ok(())
    }

    fn count(&self, ok: bool) {
        if let Some(metrics) = &self.metrics {
            if ok {
                metrics.ok.inc();
            } else {
                metrics.error.inc();
            }
        }
    }

    /// [`Inner::reread_file`] for the refresher's poll: a file that cannot be read or
    /// decoded is logged, and the token held stays.
    pub async fn reload_if_changed(&self) {
        if let Err(err) = self.reread_file().await {
            warn!(error = %err, "token file could not be re-read");
        }
    }

    /// Adopts the token file's content if someone replaced it (`cxgate token init`), as a
    /// restart would load it; returns the new generation when it did. Only a file that
    /// differs from what this process last loaded or saved counts: after a failed save the
    /// file still holds an older token, which must not come back. A file that cannot be
    /// read or decoded is an error, and the token held stays.
    pub async fn reread_file(&self) -> Result<Option<u64>, TokenError> {
        let Source::File(path) = &self.source else {
            return Ok(None);
        };
        let (record, stamp) = file::read_stamped(path).await?;
        if self.holds_client_key(&record) {
            return Err(TokenError::ClientKey {
                what: format!("token file {}", path.display()),
            });
        }
        let now = Instant::now();
        let mut state = self.lock();
        // During a refresh the file is about to change anyway; look again next time.
        if state.file_stamp.as_ref() == Some(&stamp) || state.flight.is_some() {
            return Ok(None);
        }
        state.file_stamp = Some(stamp);
        // The same tokens with another expiry (`token init` run again with a new
        // `CX_EXPIRES_IN`) change when the token must be refreshed: taken too.
        if record.access == state.record.access
            && record.refresh == state.record.refresh
            && record.expires_at == state.record.expires_at
        {
            return Ok(None);
        }
        // An operator's repair starts a new epoch that every replica adopts (see `shared`):
        // the file's `initialised_at` when `token init` wrote it after the epoch held, else
        // now (a file written by hand, or one claiming a time from the future).
        let mut record = record;
        let wall = SystemTime::now();
        let held = state
            .record
            .initialised_at
            .filter(|at| !super::shared::from_the_future(Some(*at), wall));
        if record
            .initialised_at
            .is_none_or(|at| Some(at) <= held || super::shared::from_the_future(Some(at), wall))
        {
            record.initialised_at =
                Some(wall.max(held.map_or(wall, |h| h + Duration::from_millis(1))));
        }
        let expires = record.expires_at.map(|at| to_instant(at, now));
        state.replace(record, expires, now);
        // An operator's file holds a refresh token as a `token init` does (one copied from
        // another replica's marked file stays unproven).
        state.prove();
        // Taken as a restart would take it: a token that cannot be sent is refreshed at once,
        // however recently the one before it was refreshed.
        state.refreshed_at = None;
        self.wake.notify_one();
        // An operator's repair: the other replicas must get it, not undo it.
        if let Some(shared) = self.shared.get() {
            shared
                .unshared
                .store(true, std::sync::atomic::Ordering::Release);
        }
        info!(
            generation = state.generation,
            "token file changed on disk; using its token"
        );
        Ok(Some(state.generation))
    }
}

/// Says that the token endpoint refused the refresh token and nothing else worked.
pub(crate) fn say_reauthorisation(generation: u64) {
    error!(
        generation,
        "re-authorisation needed: the token endpoint refused the refresh token \
         (invalid_grant); authorise again and run `cxgate token init`"
    );
}

enum Plan {
    Stop,
    Idle,
    WatchFile,
    RefreshAt { at: Instant, generation: u64 },
}

fn plan(inner: &Inner) -> Plan {
    if matches!(inner.source, Source::Env) {
        return Plan::Stop;
    }
    let mut state = inner.lock();
    if state.reauth || !inner.refreshable(&state) {
        return Plan::WatchFile;
    }
    // A token no request can carry is worth nothing until it expires: replace it now. Only
    // once: an upstream that grants unsendable tokens is not asked again every second.
    if state.refreshed_at.is_none() && !super::file::sendable(state.record.access.expose()) {
        return Plan::RefreshAt {
            at: Instant::now(),
            generation: state.generation,
        };
    }
    let Some(expires) = state.expires else {
        // No known expiry: only an upstream 401 can tell; refresh_after_rejection handles it.
        return Plan::Idle;
    };
    // Refresh `refresh_before` ahead, but never more than half the token's lifetime ahead,
    // or a short-lived token would be refreshed again the moment it arrives.
    let lifetime = expires.saturating_duration_since(state.obtained);
    let lead = inner.refresh_before.min(lifetime / 2);
    if lead < inner.refresh_before && state.lead_warned != state.generation {
        state.lead_warned = state.generation;
        warn!(
            generation = state.generation,
            lifetime_s = lifetime.as_secs(),
            refresh_before_s = inner.refresh_before.as_secs(),
            lead_s = lead.as_secs(),
            "token lives less than twice token.refresh_before: refreshed half its lifetime \
             ahead instead, so a short-lived token is not refreshed the moment it arrives"
        );
    }
    let mut at = expires.checked_sub(lead).unwrap_or(expires);
    if let Some(last) = state.refreshed_at {
        at = at.max(last + MIN_REFRESH_GAP);
    }
    Plan::RefreshAt {
        at,
        generation: state.generation,
    }
}

/// The delay before retry number `attempt` (1-based): exponential with equal jitter,
/// capped, and while the token is still valid never more than half its remaining life.
fn retry_delay(attempt: u32, remaining: Option<Duration>) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = match remaining {
        Some(left) if !left.is_zero() => BACKOFF_CAP.min((left / 2).max(BACKOFF_BASE)),
        _ => BACKOFF_CAP_EXPIRED,
    };
    let full = exp.min(cap);
    let half = full / 2;
    half + half.mul_f64(fastrand::f64())
}

/// The background refresher; ends only for a static token.
pub(crate) async fn run(inner: Arc<Inner>) {
    let mut attempt: u32 = 0;
    loop {
        match plan(&inner) {
            Plan::Stop => return,
            Plan::Idle => {
                nap(&inner, Instant::now() + IDLE_TICK).await;
            }
            Plan::WatchFile => {
                // Woken, the file was just read again (a reload): plan afresh.
                if !nap(&inner, Instant::now() + FILE_POLL).await {
                    inner.reload_if_changed().await;
                }
                // Held back by another replica's marker only: look whether it still stands.
                let again = {
                    let state = inner.lock();
                    (state.reauth && state.held_back).then_some(state.generation)
                };
                if let Some(generation) = again {
                    let _ = inner.refresh(generation, true).await;
                }
            }
            Plan::RefreshAt { at, generation } => {
                let now = Instant::now();
                if at > now {
                    nap(&inner, at.min(now + IDLE_TICK)).await;
                    continue;
                }
                match inner.refresh(generation, true).await {
                    Ok(_) => attempt = 0,
                    Err(err) if err.needs_reauthorisation() => attempt = 0,
                    Err(_) => {
                        attempt = attempt.saturating_add(1);
                        let remaining = inner
                            .lock()
                            .expires
                            .map(|e| e.saturating_duration_since(Instant::now()));
                        let delay = retry_delay(attempt, remaining);
                        nap(&inner, Instant::now() + delay).await;
                    }
                }
            }
        }
    }
}

/// Sleeps until `until` or until a new token is installed from elsewhere; true when woken.
async fn nap(inner: &Inner, until: Instant) -> bool {
    tokio::select! {
        () = tokio::time::sleep_until(until) => false,
        () = inner.wake.notified() => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_and_respects_the_caps() {
        let long = Some(Duration::from_secs(3600));
        for attempt in 1..=12u32 {
            let full = BACKOFF_BASE
                .saturating_mul(1 << (attempt - 1))
                .min(BACKOFF_CAP);
            for _ in 0..50 {
                let d = retry_delay(attempt, long);
                assert!(
                    d >= full / 2 && d <= full,
                    "attempt {attempt}: expected between {:?} and {full:?}, saw {d:?}",
                    full / 2
                );
            }
        }
        let short = retry_delay(20, Some(Duration::from_secs(10)));
        assert!(
            short <= Duration::from_secs(5),
            "expected at most half the remaining 10 s, saw {short:?}"
        );
        let expired = retry_delay(20, None);
        assert!(
            expired <= BACKOFF_CAP_EXPIRED,
            "expected at most {BACKOFF_CAP_EXPIRED:?} once expired, saw {expired:?}"
        );
        let spread: std::collections::HashSet<u128> =
            (0..20).map(|_| retry_delay(5, long).as_nanos()).collect();
        assert!(spread.len() > 1, "expected jitter to vary the delay");
    }
}
