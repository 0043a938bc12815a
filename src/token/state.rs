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
    pub last_failure: Option<(Instant, Arc<TokenError>)>,
    /// The newest token could not be written to the file.
    pub unsaved: bool,
    /// The stamp of the token file as this process last read or wrote it.
    pub file_stamp: Option<Stamp>,
    /// The refresh in progress, if any; its waiters share its outcome.
    pub flight: Option<watch::Receiver<Option<Outcome>>>,
    /// The last token pair known to work: one the upstream accepted, or one fresh from
    /// this replica's own refresh. A shared record that turns out bad falls back to it.
    pub trusted: Option<TokenRecord>,
    /// The generation `trusted` was taken from (so a call accepted does not copy it again).
    pub trusted_generation: u64,
    /// The token held came from the shared record and the upstream has not accepted it yet
    /// (the token file's mark, `record.adopted`, says so across a restart).
    pub adopted: bool,
    /// Refresh tokens the token endpoint refused to this replica: never restored.
    pub dead: Vec<Secret>,
}

impl State {
    pub fn new(record: TokenRecord, now: Instant) -> State {
        let expires = record.expires_at.map(|at| to_instant(at, now));
        let adopted = record.adopted;
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
            last_failure: None,
            unsaved: false,
            file_stamp: None,
            flight: None,
            trusted: None,
            trusted_generation: 0,
            adopted,
            dead: Vec::new(),
        }
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
        self.last_failure = None;
        self.adopted = self.record.adopted;
    }

    /// Trusts the token held now (the upstream took it, or the token endpoint just gave it).
    /// A mark in the token file stays until the file is rewritten without it.
    pub fn trust(&mut self) {
        if self.trusted_generation != self.generation {
            self.trusted = Some(self.record.clone());
            self.trusted_generation = self.generation;
        }
        self.adopted = false;
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
            .trusted
            .as_ref()
            .is_some_and(|t| t.refresh.as_ref() == Some(refresh))
        {
            self.trusted = None;
        }
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
