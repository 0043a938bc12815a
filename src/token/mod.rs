//! The one upstream OAuth token: loaded once, handed out with a generation so a 401 to that
//! generation makes one refresh for all callers, renewed `refresh_before` ahead of expiry,
//! and on disk before it is used. Token text only ever lives in [`Secret`] (logs carry
//! generations); the module takes plain [`TokenSettings`] and values the caller read from
//! the environment, and knows nothing of the cache, the budget, the proxy or the config.
//!
//! ```no_run
//! # async fn demo(settings: cxgate::token::TokenSettings, client: cxgate::upstream::HttpClient)
//! # -> Result<(), cxgate::token::TokenError> {
//! let registry = prometheus::Registry::new();
//! let secrets = |name: &str| (name == "CX_ACCESS_TOKEN").then(|| "token-text".to_string());
//! let tokens = cxgate::token::TokenManager::load(settings, client, &registry, &secrets).await?;
//! let _refresher = tokens.spawn_refresher();
//! let token = tokens.current()?; // send token.access.expose() upstream
//! // ... the upstream said 401:
//! let token = tokens.refresh_after_rejection(token.generation).await?;
//! # let _ = token; Ok(()) }
//! ```

mod error;
mod file;
mod init;
mod markers;
mod metrics;
mod oauth;
mod refresh;
mod secret;
mod shared;
mod state;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

pub use error::TokenError;
pub use file::holds_client_key;
pub use file::inspect as inspect_file;
/// Whether a token can travel upstream in `Authorization` as is (visible ASCII only, as
/// RFC 6750 tokens are): the one test readiness, token loading and the request path share.
pub(crate) use file::sendable;
pub use file::{expired_warning, unsendable_env_warning, unsendable_warning};
pub use init::{
    init_from_code, init_from_lookup, ACCESS_TOKEN_VAR, EXPIRES_IN_VAR, REFRESH_TOKEN_VAR,
};
pub use secret::Secret;

use crate::upstream::HttpClient;
use metrics::ExpirySource;
use refresh::Inner;
use state::{Source, State};

/// Where the token comes from and how it is renewed (filled from `[token]`).
#[derive(Debug, Clone)]
pub struct TokenSettings {
    /// The token file; takes precedence over `access_token_env` when both are set.
    pub file: Option<PathBuf>,
    /// The name of an environment variable holding a static, never refreshed token.
    pub access_token_env: Option<String>,
    /// Refresh this long before the token expires.
    pub refresh_before: Duration,
    /// Without it the token is never refreshed.
    pub oauth: Option<OAuthSettings>,
    /// The SHA-256 digests of the clients' gateway keys (`clients[].key_sha256`): no token
    /// holding one is written by `cxgate token init` (a running manager takes its own from
    /// [`TokenManager::set_client_keys`]).
    pub client_keys: Vec<[u8; 32]>,
}

/// The OAuth token endpoint (filled from `[token.oauth]`).
#[derive(Debug, Clone)]
pub struct OAuthSettings {
    pub token_url: String,
    pub client_id: String,
    /// The name of the environment variable that holds the client secret.
    pub client_secret_env: String,
    pub method: OAuthMethod,
}

/// How grant parameters are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OAuthMethod {
    /// RFC 6749: an `application/x-www-form-urlencoded` POST body.
    #[default]
    Post,
    /// Query parameters on a GET, as CX Social's own examples do.
    Get,
}

/// The token to use now, and its generation (to report a rejection of exactly it).
#[derive(Debug, Clone)]
pub struct Current {
    pub access: Secret,
    pub generation: u64,
}

/// The shared token holder. Clones share one state.
#[derive(Clone)]
pub struct TokenManager {
    inner: Arc<Inner>,
}

impl fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenManager")
            .field("generation", &self.inner.lock().generation)
            .finish_non_exhaustive()
    }
}

/// Where the token module finds the values its settings name by environment variable
/// (a static token, the OAuth client secret): read once by the caller, never here.
pub type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

impl TokenManager {
    /// Loads the token and registers the token metrics on `registry`; `secrets` has the
    /// values of the variables `settings` names.
    pub async fn load(
        settings: TokenSettings,
        client: HttpClient,
        registry: &prometheus::Registry,
        secrets: Lookup<'_>,
    ) -> Result<TokenManager, TokenError> {
        Self::load_with(settings, client, Some(registry), secrets).await
    }

    /// `load`, with the metrics registry optional for tests.
    pub(crate) async fn load_with(
        settings: TokenSettings,
        client: HttpClient,
        registry: Option<&prometheus::Registry>,
        env: Lookup<'_>,
    ) -> Result<TokenManager, TokenError> {
        let mut stamp = None;
        let (source, record) = match (&settings.file, &settings.access_token_env) {
            (Some(path), _) => {
                if let Ok(Some(warning)) = file::inspect(path) {
                    tracing::warn!("token.file: {warning}");
                }
                let (record, read) = file::read_stamped(path).await?;
                stamp = Some(read);
                (Source::File(path.clone()), record)
            }
            (None, Some(name)) => {
                let token =
                    env(name).ok_or_else(|| TokenError::MissingEnv { name: name.clone() })?;
                let record = file::TokenRecord {
                    access: Secret::new(token),
                    refresh: None,
                    expires_at: None,
                    scope: None,
                    initialised_at: None,
                    adopted: false,
                };
                (Source::Env, record)
            }
            (None, None) => return Err(TokenError::NoSource),
        };
        // A static token is never refreshed, so OAuth settings do not apply to it.
        let oauth = match source {
            Source::File(_) => settings.oauth,
            Source::Env => None,
        };
        let client_secret = match &oauth {
            Some(o) => Some(Secret::new(env(&o.client_secret_env).ok_or_else(|| {
                TokenError::MissingEnv {
                    name: o.client_secret_env.clone(),
                }
            })?)),
            None => None,
        };
        let mut state = State::new(record, tokio::time::Instant::now());
        state.file_stamp = stamp;
        let generation = state.generation;
        let mut inner = Inner {
            source,
            refresh_before: settings.refresh_before,
            oauth,
            client_secret,
            client,
            state: Mutex::new(state),
            metrics: None,
            shared: std::sync::OnceLock::new(),
            wake: tokio::sync::Notify::new(),
            client_keys: std::sync::RwLock::new(Arc::new(crate::auth::Clients::none())),
        };
        let mut registered = Ok(());
        let inner = match registry {
            // The expiry collector needs a link back to the state it reports on.
            Some(registry) => Arc::new_cyclic(|weak| {
                match metrics::register(registry, weak.clone()) {
                    Ok(handles) => inner.metrics = Some(handles),
                    Err(err) => registered = Err(err),
                }
                inner
            }),
            None => Arc::new(inner),
        };
        registered?;
        if !file::sendable(inner.lock().record.access.expose()) {
            let next = if inner.refreshable(&inner.lock()) {
                "a refresh is tried at once"
            } else {
                "no refresh is possible (no OAuth or no refresh token); write a corrected token file"
            };
            tracing::warn!(
                "the upstream token loaded cannot be sent upstream (longer than 4096 bytes, \
                 or holding spaces, tabs, controls or non-ASCII): /readyz reports not ready and requests \
                 answer 503 until a new token replaces it; {next}"
            );
        }
        tracing::info!(generation, "upstream token loaded");
        Ok(TokenManager { inner })
    }

    /// The token to send now; Err when none is usable (expired and not renewed).
    pub fn current(&self) -> Result<Current, TokenError> {
        self.inner.current()
    }

    /// The upstream rejected `generation`: refresh once for every caller reporting it.
    /// Callers holding an older generation get the newer token without a refresh.
    ///
    /// When the generation refused was itself fresh from a refresh (the upstream refuses
    /// new tokens too), refreshing on every request would only burn refresh grants: the
    /// next refresh waits out a backoff (1 s, doubling to 5 min) and callers get
    /// [`TokenError::RefusedUpstream`] until then.
    pub async fn refresh_after_rejection(&self, generation: u64) -> Result<Current, TokenError> {
        {
            let mut state = self.inner.lock();
            if state.generation != generation {
                return state::current_of(&state);
            }
            count_refusal(&mut state, generation);
            if state.refused >= 2 {
                let now = tokio::time::Instant::now();
                match state.refused_retry_at {
                    Some(at) if now < at => return Err(TokenError::RefusedUpstream),
                    _ => state.refused_retry_at = Some(now + refusal_backoff(state.refused)),
                }
            }
        }
        self.inner.refresh(generation, false).await
    }

    /// The upstream refused `generation` and no refresh is to follow now (the request
    /// replayed with a fresh token was refused again).
    pub fn refused(&self, generation: u64) {
        let mut state = self.inner.lock();
        if state.generation == generation {
            count_refusal(&mut state, generation);
            if state.refused >= 2 && state.refused_retry_at.is_none() {
                let backoff = refusal_backoff(state.refused);
                state.refused_retry_at = Some(tokio::time::Instant::now() + backoff);
            }
        }
    }

    /// The upstream accepted `generation`: refusals are over.
    pub fn accepted(&self, generation: u64) {
        let mut state = self.inner.lock();
        if state.generation != generation {
            return;
        }
        if state.refused > 0 {
            state.refused = 0;
            // A later refusal of this same generation is a new one and counts again, or a
            // token that cannot be refreshed would be refused with `/readyz` still ready.
            state.refused_generation = 0;
            state.refused_retry_at = None;
        }
        // Its access token only: a token taken from the shared record keeps its mark in the
        // token file, and `.prev` the last proven file, until a refresh proves its refresh
        // token (an accepted call says nothing of that one).
        if state.proven_generation != generation || state.adopted {
            state.trust();
        }
    }

    /// Reads the token file again and adopts its token when someone replaced it since this
    /// process last read or wrote it (an operator's `cxgate token init`), as a restart
    /// would; returns the new generation then, `None` when nothing changed (or a refresh
    /// is rewriting the file right now). A file that cannot be read or decoded is an error
    /// and the token held stays. Does nothing for a static token.
    pub async fn reread_file(&self) -> Result<Option<u64>, TokenError> {
        self.inner.reread_file().await
    }

    /// Sets the clients whose gateway keys no token may hold (at start, before
    /// [`TokenManager::share_through`], and on reload): the very set requests authenticate
    /// against, so a key a client has proven is searched in its base64 and hex spellings
    /// in every token taken from the token file, the OAuth endpoint or the shared record,
    /// as in every forwarded request. Err when the token held holds one of them (the keys
    /// are set all the same): it must not be sent upstream.
    pub fn set_client_keys(&self, keys: Arc<crate::auth::Clients>) -> Result<(), TokenError> {
        *self
            .inner
            .client_keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        let held = self.inner.lock().record.clone();
        if self.inner.holds_client_key(&held) {
            return Err(TokenError::ClientKey {
                what: match &self.inner.source {
                    Source::File(path) => format!("token file {}", path.display()),
                    Source::Env => "token.access_token_env".to_string(),
                },
            });
        }
        Ok(())
    }

    /// The clients set by [`TokenManager::set_client_keys`]: the gateway authenticates
    /// requests against these, so a key proven by a request is known here at once.
    pub fn clients(&self) -> Arc<crate::auth::Clients> {
        self.inner.clients()
    }

    /// Starts the background refresher (ends at once for a static token).
    pub fn spawn_refresher(&self) -> tokio::task::JoinHandle<()> {
        let inner = Arc::clone(&self.inner);
        if inner.shared.get().is_none() {
            return tokio::spawn(refresh::run(inner));
        }
        tokio::spawn(async move {
            tokio::join!(refresh::run(inner.clone()), shared::watch(inner));
        })
    }

    /// Shares the token with the other replicas through `redis` (README "Running several replicas"; see `shared`):
    /// adopts the stored token if it is newer than this replica's, or stores this one. Call
    /// it before [`TokenManager::spawn_refresher`]. A static token is not shared.
    pub async fn share_through(&self, redis: crate::replicas::Redis) {
        if matches!(self.inner.source, Source::Env) {
            return;
        }
        if self
            .inner
            .shared
            .set(shared::SharedToken::new(redis))
            .is_ok()
        {
            self.inner.reconcile().await;
        }
    }

    /// Ok when a usable token is held and no re-authorisation is pending.
    pub fn readiness(&self) -> Result<(), String> {
        let state = self.inner.lock();
        if state.reauth {
            return Err(TokenError::InvalidGrant.to_string());
        }
        // A token the upstream refused although it was fresh from a refresh: every request
        // answers 503 until a later refresh (after the backoff) is taken, so not ready.
        if refusing_fresh_tokens(&state) {
            return Err(TokenError::RefusedUpstream.to_string());
        }
        // A token that cannot be refreshed (a static one) and that the upstream refused:
        // every request answers 503 until a call with it succeeds (`accepted`), so not ready.
        if state.refused > 0
            && state.refused_generation == state.generation
            && !self.inner.refreshable(&state)
        {
            return Err(TokenError::RefusedNotRefreshable.to_string());
        }
        match state::current_of(&state) {
            Ok(current) if !file::sendable(current.access.expose()) => {
                Err(TokenError::Unsendable.to_string())
            }
            Ok(_) => Ok(()),
            Err(err) => Err(match &state.last_failure {
                Some((_, last)) => format!("{err}; last refresh attempt: {last}"),
                None => err.to_string(),
            }),
        }
    }

    /// The token's state for `/admin/status`; holds no secret.
    pub fn status_json(&self) -> serde_json::Value {
        let seconds_left = self.inner.seconds_left();
        // The same reason `/readyz` gives, so a held token that cannot be sent (a space in
        // it) is named here too, not only by a 503.
        let unusable = self.readiness().err();
        let state = self.inner.lock();
        json!({
            "source": match self.inner.source { Source::File(_) => "file", Source::Env => "env" },
            "generation": state.generation,
            "expires_in_s": seconds_left.map(|s| s.floor() as i64),
            "expires_at": state.record.expires_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "last_refresh": state.last_refresh.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "refresh_failures": state.failures,
            "needs_reauthorisation": state.reauth,
            "refreshable": self.inner.refreshable(&state),
            "saved": !state.unsaved,
            "usable": unusable.is_none(),
            "upstream_refusals": state.refused,
            "last_error": match (&state.last_failure, refusing_fresh_tokens(&state)) {
                (_, true) => Some(TokenError::RefusedUpstream.to_string()),
                (Some((_, e)), false) => Some(e.to_string()),
                (None, false) => unusable,
            },
        })
    }

    /// Every token this gateway holds or held since start, for redaction of upstream
    /// bodies.
    pub fn secrets(&self) -> Vec<Secret> {
        let state = self.inner.lock();
        std::iter::once(state.record.access.clone())
            .chain(state.record.refresh.clone())
            .chain(state.held.iter().cloned())
            .collect()
    }
}

/// The token held now was refused by the upstream although it came fresh from a refresh
/// (two generations in a row refused, the latest being the one held): requests answer 503
/// until a later refresh, after the backoff, brings one the upstream takes.
fn refusing_fresh_tokens(state: &state::State) -> bool {
    state.refused >= 2 && state.refused_generation == state.generation
}

/// Counts one refused generation once, however many requests report it.
fn count_refusal(state: &mut state::State, generation: u64) {
    if state.refused_generation != generation {
        state.refused_generation = generation;
        state.refused = state.refused.saturating_add(1);
        state.refused_retry_at = None;
    }
}

/// How long refreshes wait after the `refused`-th consecutive refused generation (2 or
/// more): 1 s, doubling, at most 5 minutes.
fn refusal_backoff(refused: u32) -> std::time::Duration {
    let doublings = refused.saturating_sub(2).min(9);
    std::time::Duration::from_secs(1u64 << doublings).min(std::time::Duration::from_secs(300))
}
