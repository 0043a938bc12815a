//! OAuth 2.0 as CX Social does it: expiring access tokens, one-use authorisation codes and
//! rotating one-use refresh tokens, plus the token endpoint that issues them, so the
//! gateway's refresh is tested against the rules that make it hard. [`Tokens`] holds the
//! invariants.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use http::StatusCode;
use serde_json::json;
use tokio::time::Instant;

use super::lock;
use super::reply::{self, Reply};
use super::stats::{Counter, Stats};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    Unknown,
    Expired,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum GrantError {
    #[error("unknown client_id or wrong client_secret")]
    InvalidClient,
    #[error("missing parameter {0}")]
    Missing(&'static str),
    #[error("grant_type {0:?} is not supported")]
    UnsupportedGrantType(String),
    #[error("the authorisation code is unknown or was already used")]
    BadCode,
    #[error("the refresh token was already used")]
    RefreshReused,
    #[error("the refresh token is unknown")]
    UnknownRefresh,
}

impl GrantError {
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            GrantError::InvalidClient => (StatusCode::UNAUTHORIZED, "invalid_client"),
            GrantError::Missing(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            GrantError::UnsupportedGrantType(_) => {
                (StatusCode::BAD_REQUEST, "unsupported_grant_type")
            }
            GrantError::BadCode | GrantError::RefreshReused | GrantError::UnknownRefresh => {
                (StatusCode::BAD_REQUEST, "invalid_grant")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issued {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: u64,
}

struct Access {
    lineage: u64,
    expires_at: Instant,
}

struct Refresh {
    lineage: u64,
    used: bool,
}

struct Inner {
    access: HashMap<String, Access>,
    refresh: HashMap<String, Refresh>,
    codes: HashSet<String>,
    next_lineage: u64,
    rng: fastrand::Rng,
}

/// Every token and code the simulator issued.
///
/// Invariants: every token belongs to a grant lineage (a seed token, or one authorisation
/// code); a refresh keeps the lineage, so the rate limit follows the grant, not the token.
/// A refresh token works once: its second use is refused with `invalid_grant`. A refresh does
/// not revoke the previous access token; it lives until its own expiry. Revocation removes
/// access tokens only. All state sits behind one std Mutex held briefly.
pub(crate) struct Tokens {
    ttl: Duration,
    client_id: String,
    client_secret: String,
    inner: Mutex<Inner>,
}

/// What a token request carries, from its query string or form body.
#[derive(Debug, Default)]
pub(crate) struct GrantRequest {
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
    pub grant_type: Option<String>,
    pub code: Option<String>,
    pub refresh_token: Option<String>,
}

impl GrantRequest {
    /// Later pairs do not override earlier ones, so pass the body before the query.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut req = GrantRequest::default();
        for (key, value) in pairs {
            let slot = match key {
                "client_id" => &mut req.client_id,
                "client_secret" => &mut req.client_secret,
                "grant_type" => &mut req.grant_type,
                "code" => &mut req.code,
                "refresh_token" => &mut req.refresh_token,
                _ => continue,
            };
            slot.get_or_insert_with(|| value.to_owned());
        }
        req
    }
}

impl Tokens {
    /// Seeds: access token `i` and refresh token `i` share lineage `i`; extra refresh tokens
    /// get lineages of their own.
    pub fn new(opts: &super::SimOptions, now: Instant) -> Self {
        let mut inner = Inner {
            access: HashMap::new(),
            refresh: HashMap::new(),
            codes: opts.auth_codes.iter().cloned().collect(),
            next_lineage: 0,
            rng: fastrand::Rng::new(),
        };
        let seeds = opts.access_tokens.len().max(opts.refresh_tokens.len());
        for i in 0..seeds {
            let lineage = i as u64;
            if let Some(token) = opts.access_tokens.get(i) {
                let expires_at = now + opts.token_ttl;
                inner.access.insert(
                    token.clone(),
                    Access {
                        lineage,
                        expires_at,
                    },
                );
            }
            if let Some(token) = opts.refresh_tokens.get(i) {
                let entry = Refresh {
                    lineage,
                    used: false,
                };
                inner.refresh.insert(token.clone(), entry);
            }
        }
        inner.next_lineage = seeds as u64;
        Tokens {
            ttl: opts.token_ttl,
            client_id: opts.client_id.clone(),
            client_secret: opts.client_secret.clone(),
            inner: Mutex::new(inner),
        }
    }

    /// The lineage of a usable access token.
    pub fn authorize(&self, token: &str, now: Instant) -> Result<u64, AuthError> {
        let inner = lock(&self.inner);
        match inner.access.get(token) {
            None => Err(AuthError::Unknown),
            Some(a) if now >= a.expires_at => Err(AuthError::Expired),
            Some(a) => Ok(a.lineage),
        }
    }

    /// Revokes every access token; refresh tokens stay usable. Answers how many went.
    pub fn revoke_all(&self) -> usize {
        let mut inner = lock(&self.inner);
        let n = inner.access.len();
        inner.access.clear();
        n
    }

    pub fn add_code(&self, code: &str) {
        lock(&self.inner).codes.insert(code.to_owned());
    }

    pub fn grant(&self, req: &GrantRequest, now: Instant) -> Result<Issued, GrantError> {
        let client_ok = req.client_id.as_deref() == Some(self.client_id.as_str())
            && req.client_secret.as_deref() == Some(self.client_secret.as_str());
        if !client_ok {
            return Err(GrantError::InvalidClient);
        }
        let grant_type = req
            .grant_type
            .as_deref()
            .ok_or(GrantError::Missing("grant_type"))?;
        let mut inner = lock(&self.inner);
        let lineage = match grant_type {
            "authorization_code" => {
                let code = req.code.as_deref().ok_or(GrantError::Missing("code"))?;
                if !inner.codes.remove(code) {
                    return Err(GrantError::BadCode);
                }
                inner.next_lineage += 1;
                inner.next_lineage
            }
            "refresh_token" => {
                let presented = req
                    .refresh_token
                    .as_deref()
                    .ok_or(GrantError::Missing("refresh_token"))?;
                let entry = inner
                    .refresh
                    .get_mut(presented)
                    .ok_or(GrantError::UnknownRefresh)?;
                if entry.used {
                    return Err(GrantError::RefreshReused);
                }
                entry.used = true;
                entry.lineage
            }
            other => return Err(GrantError::UnsupportedGrantType(other.to_owned())),
        };
        let issued = Issued {
            access_token: format!("sim-at-{}", random_token(&mut inner.rng)),
            refresh_token: format!("sim-rt-{}", random_token(&mut inner.rng)),
            expires_in: self.ttl.as_secs(),
        };
        let expires_at = now + self.ttl;
        let access = Access {
            lineage,
            expires_at,
        };
        inner.access.insert(issued.access_token.clone(), access);
        let refresh = Refresh {
            lineage,
            used: false,
        };
        inner.refresh.insert(issued.refresh_token.clone(), refresh);
        Ok(issued)
    }
}

fn random_token(rng: &mut fastrand::Rng) -> String {
    (0..32).map(|_| rng.alphanumeric()).collect()
}

/// Answers a token request: plain JSON on success; on failure the CX Social error envelope
/// with the RFC 6749 `error`/`error_description` fields beside it, so clients expecting
/// either shape can read it.
pub(crate) fn token_endpoint(tokens: &Tokens, stats: &Stats, req: &GrantRequest) -> Reply {
    let refresh = req.grant_type.as_deref() == Some("refresh_token");
    match tokens.grant(req, Instant::now()) {
        Ok(issued) => {
            stats.incr(if refresh {
                Counter::TokenRefreshes
            } else {
                Counter::TokenGrants
            });
            reply::json(
                StatusCode::OK,
                &json!({
                    "access_token": issued.access_token,
                    "expires_in": issued.expires_in,
                    "refresh_token": issued.refresh_token,
                    "scope": super::data::SCOPES.join(" "),
                }),
            )
        }
        Err(err) => {
            if err == GrantError::RefreshReused {
                stats.incr(Counter::RefreshReuseRejected);
            }
            let (status, kind) = err.status_and_type();
            let message = err.to_string();
            reply::json(
                status,
                &json!({
                    "meta": {"code": status.as_u16(), "error_type": kind, "error_message": message},
                    "error": kind,
                    "error_description": message,
                }),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimOptions;

    fn request(grant_type: &str, code: Option<&str>, refresh: Option<&str>) -> GrantRequest {
        GrantRequest {
            client_id: Some("sim-client".into()),
            client_secret: Some("sim-secret".into()),
            grant_type: Some(grant_type.into()),
            code: code.map(Into::into),
            refresh_token: refresh.map(Into::into),
        }
    }

    #[test]
    fn seed_tokens_expire_after_ttl() {
        let now = Instant::now();
        let opts = SimOptions {
            token_ttl: Duration::from_secs(60),
            ..SimOptions::default()
        };
        let tokens = Tokens::new(&opts, now);
        assert_eq!(tokens.authorize("sim-token", now), Ok(0));
        let later = now + Duration::from_secs(60);
        assert_eq!(
            tokens.authorize("sim-token", later),
            Err(AuthError::Expired)
        );
        assert_eq!(tokens.authorize("nope", now), Err(AuthError::Unknown));
    }

    #[test]
    fn refresh_rotates_keeps_lineage_and_works_once() {
        let now = Instant::now();
        let tokens = Tokens::new(&SimOptions::default(), now);
        let first = tokens
            .grant(&request("refresh_token", None, Some("sim-refresh")), now)
            .expect("first use of the seed refresh token");
        assert_eq!(
            tokens.authorize(&first.access_token, now),
            Ok(0),
            "same lineage"
        );
        assert_eq!(
            tokens.authorize("sim-token", now),
            Ok(0),
            "old token still valid"
        );
        let again = tokens.grant(&request("refresh_token", None, Some("sim-refresh")), now);
        assert_eq!(again, Err(GrantError::RefreshReused));
        let next = tokens.grant(
            &request("refresh_token", None, Some(&first.refresh_token)),
            now,
        );
        assert!(
            next.is_ok(),
            "expected the rotated refresh token to work, saw {next:?}"
        );
    }

    #[test]
    fn codes_are_single_use_and_client_is_checked() {
        let now = Instant::now();
        let tokens = Tokens::new(&SimOptions::default(), now);
        tokens.add_code("c1");
        let issued = tokens.grant(&request("authorization_code", Some("c1"), None), now);
        let lineage = issued.map(|i| tokens.authorize(&i.access_token, now));
        assert!(
            matches!(lineage, Ok(Ok(l)) if l > 0),
            "expected new lineage, saw {lineage:?}"
        );
        let again = tokens.grant(&request("authorization_code", Some("c1"), None), now);
        assert_eq!(again, Err(GrantError::BadCode));
        let mut wrong = request("authorization_code", Some("c1"), None);
        wrong.client_secret = Some("guess".into());
        assert_eq!(tokens.grant(&wrong, now), Err(GrantError::InvalidClient));
        let odd = tokens.grant(&request("password", None, None), now);
        assert_eq!(
            odd,
            Err(GrantError::UnsupportedGrantType("password".into()))
        );
        assert_eq!(
            tokens.revoke_all(),
            2,
            "expected seed + granted token revoked"
        );
    }
}
