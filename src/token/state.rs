//! The token state every handle shares: the token, its generation and what is known about
//! refreshing it. Decisions run on tokio's clock, so tests can pause and advance time, and a
//! 401 is reported against the generation that earned it, so stale reports never cause a
//! second refresh ([`State`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio::time::Instant;

use super::error::TokenError;
use super::file::{Stamp, TokenRecord};
use super::secret::Secret;
use super::Current;

pub(crate) type Outcome = Result<(), Arc<TokenError>>;

/// Where the token came from.
pub(crate) enum Source {
    File(PathBuf),
    Env,
}

/// The token and what is known about refreshing it, behind the manager's lock.
///
/// Expiry is kept twice: as wall-clock time (`record.expires_at`) for the file and status,
/// and on tokio's clock (`expires`) for every decision.
pub(crate) struct State {
    pub record: TokenRecord,
    /// `record.expires_at` on tokio's clock, which the tests can pause and advance.
    pub expires: Option<Instant>,
    /// When this token was obtained (loaded or refreshed).
    pub obtained: Instant,
    /// Grows by one each time a new token is installed (refresh or re-read file); a 401 is
    /// reported against the generation that earned it, so stale reports never cause a
    /// second refresh.
    pub generation: u64,
    /// The tokens just replaced: answers to requests sent with them may still arrive.
    pub previous: Vec<Secret>,
    /// Every access and refresh token held since start (the current ones excepted), so an
    /// upstream that echoes an old one is still redacted. Two per refresh: small.
    pub held: Vec<Secret>,
    /// Consecutive generations the upstream refused (401): 2 or more means a token fresh
    /// from a refresh was refused too, and refreshes back off.
    pub refused: u32,
    /// The generation last counted in `refused`.
    pub refused_generation: u64,
    /// While refreshes back off: when the next one may run.
    pub refused_retry_at: Option<Instant>,
    pub last_refresh: Option<SystemTime>,
    pub refreshed_at: Option<Instant>,
    /// The generation last warned about refreshing earlier than `refresh_before` asks.
    pub lead_warned: u64,
    /// Consecutive failed refreshes.
    pub failures: u64,
    pub reauth: bool,
    /// `reauth` was decided on another replica's spent or refused marker, not on the token
    /// endpoint's answer to this replica: a refresh may still look again (and finding the
    /// marker gone, try), so deleting a marker no replica set recovers.
    pub held_back: bool,
    pub last_failure: Option<(Instant, Arc<TokenError>)>,
    /// The newest token could not be written to the file.
    pub unsaved: bool,
    /// The stamp of the token file as this process last read or wrote it.
    pub file_stamp: Option<Stamp>,
    /// The refresh in progress, if any; its waiters share its outcome.
    pub flight: Option<watch::Receiver<Option<Outcome>>>,
    /// The last token pair whose refresh token this replica knows to work: fresh from its
    /// own refresh, restored by a fallback, or loaded from a token file that did not come
    /// from the shared record (`cxgate token init`, a file taken on reload). An access token
    /// the upstream accepts proves the access token only, so a record taken from Redis never
    /// becomes this until this replica's refresh with its refresh token succeeds: a refresh
    /// with an adopted refresh token that the endpoint refuses falls back to it.
    pub proven: Option<TokenRecord>,
    /// The generation `proven` was taken from (so a call accepted does not copy it again).
    pub proven_generation: u64,
    /// Token pairs held since `proven` and replaced by a record adopted from Redis, newest
    /// last (a few): another replica's refresh products this replica never presented,
    /// tried (newest first) before `proven` when a later record's refresh token is refused.
    pub superseded: Vec<TokenRecord>,
    /// The token held came from the shared record and the upstream has not accepted it yet
    /// (a restart on a file marked `record.adopted` starts so).
    pub adopted: bool,
    /// Refresh tokens the token endpoint refused to this replica, or another replica's
    /// refresh spent: never restored, and a record holding one is not adopted.
    pub dead: Vec<Secret>,
}

impl State {
    pub fn new(record: TokenRecord, now: Instant) -> State {
        let expires = record.expires_at.map(|at| to_instant(at, now));
        let adopted = record.adopted;
        let proven = (!record.adopted).then(|| record.clone());
        State {
            record,
            expires,
            obtained: now,
            generation: 1,
            previous: Vec::new(),
            held: Vec::new(),
            refused: 0,
            refused_generation: 0,
            refused_retry_at: None,
            last_refresh: None,
            refreshed_at: None,
            lead_warned: 0,
            failures: 0,
            reauth: false,
            held_back: false,
            last_failure: None,
            unsaved: false,
            file_stamp: None,
            flight: None,
            proven_generation: if proven.is_some() { 1 } else { 0 },
            proven,
            superseded: Vec::new(),
            adopted,
            dead: Vec::new(),
        }
    }

    /// Whether the refresh token held is one the token endpoint refused to this replica.
    pub fn refresh_dead(&self) -> bool {
        self.record
            .refresh
            .as_ref()
            .is_some_and(|r| self.dead.contains(r))
    }

    /// Keeps the pair held before a record from Redis replaces it (see `superseded`).
    pub fn supersede(&mut self, incoming: &TokenRecord) {
        if self.record.refresh.is_none()
            || self.record.refresh == incoming.refresh
            || self
                .superseded
                .iter()
                .any(|r| r.refresh == self.record.refresh)
            || self
                .proven
                .as_ref()
                .is_some_and(|p| p.refresh == self.record.refresh)
        {
            return;
        }
        if self.superseded.len() >= 4 {
            self.superseded.remove(0);
        }
        self.superseded.push(self.record.clone());
    }

    /// Installs a new token as the next generation.
    pub fn replace(&mut self, record: TokenRecord, expires: Option<Instant>, now: Instant) {
        let old = std::mem::replace(&mut self.record, record);
        self.previous = std::iter::once(old.access).chain(old.refresh).collect();
        for secret in &self.previous {
            if !self.held.contains(secret) {
                self.held.push(secret.clone());
            }
        }
        self.expires = expires;
        self.obtained = now;
        self.generation += 1;
        self.failures = 0;
        self.reauth = false;
        self.held_back = false;
        self.last_failure = None;
        self.adopted = self.record.adopted;
    }

    /// The upstream took the token held now, or the token endpoint just gave it: its access
    /// token is no longer in doubt. Its refresh token is proven only when the record did not
    /// come from the shared record ([`State::prove`]).
    pub fn trust(&mut self) {
        self.adopted = false;
        self.prove();
    }

    /// Keeps the token held as the proven pair, unless it came from the shared record
    /// (`record.adopted`: its refresh token was never spent by this replica).
    pub fn prove(&mut self) {
        if !self.record.adopted && self.proven_generation != self.generation {
            self.proven = Some(self.record.clone());
            self.proven_generation = self.generation;
            self.superseded.clear();
        }
    }

    /// Remembers a refresh token the token endpoint refused (a few: one per incident).
    pub fn bury(&mut self, refresh: &Secret) {
        if !self.dead.contains(refresh) {
            if self.dead.len() >= 8 {
                self.dead.remove(0);
            }
            self.dead.push(refresh.clone());
        }
        if self
            .proven
            .as_ref()
            .is_some_and(|t| t.refresh.as_ref() == Some(refresh))
        {
            self.proven = None;
        }
        self.superseded
            .retain(|r| r.refresh.as_ref() != Some(refresh));
    }
}

/// Maps a wall-clock expiry onto tokio's clock as "now plus what is left".
pub(crate) fn to_instant(at: SystemTime, now: Instant) -> Instant {
    match at.duration_since(SystemTime::now()) {
        Ok(left) => now.checked_add(left).unwrap_or(now),
        Err(past) => now.checked_sub(past.duration()).unwrap_or(now),
    }
}

pub(crate) fn current_of(state: &State) -> Result<Current, TokenError> {
    if let Some(expires) = state.expires {
        if Instant::now() >= expires {
            return Err(if state.reauth {
                TokenError::InvalidGrant
            } else {
                TokenError::Expired
            });
        }
    }
    Ok(Current {
        access: state.record.access.clone(),
        generation: state.generation,
    })
}
