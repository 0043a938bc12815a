//! `TokenError`: everything that can go wrong holding, refreshing or storing the token.
//!
//! No variant carries token text: file parse errors keep only the position (serde_json's
//! message may quote the input), and OAuth errors keep only the short RFC 6749 error code.
//! The proxy maps any error from `TokenManager::current` to 503 `token_unavailable`.

use std::path::PathBuf;
use std::sync::Arc;

/// Why no token can be had, loaded, refreshed or stored.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("no token source configured: set token.file or token.access_token_env")]
    NoSource,
    #[error("token.file is required for this command")]
    NoFile,
    #[error("[token.oauth] is required for this command")]
    NoOAuth,
    #[error("environment variable {name} is not set or empty")]
    MissingEnv { name: String },
    #[error("environment variable {name} is not a whole number of seconds")]
    BadEnvNumber { name: String },
    #[error("cannot read token file {path}: {source}{hint}", path = path.display(), hint = read_hint(source))]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} is not valid JSON of the expected shape (line {line}, column {column})", path = path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
    },
    #[error("token file {path} is not a regular file", path = path.display())]
    NotAFile { path: PathBuf },
    #[error("token file {path} is larger than {limit} bytes; a token record is well under that", path = path.display(), limit = super::file::MAX_FILE_BYTES)]
    TooLarge { path: PathBuf },
    #[error("the access token cannot be sent upstream (longer than {limit} bytes, or holding spaces, CR, LF or other controls)", limit = super::file::MAX_TOKEN_BYTES)]
    Unsendable,
    #[error("token file {path} has an empty access_token", path = path.display())]
    EmptyAccessToken { path: PathBuf },
    #[error("token file {path}: expires_at is not an RFC 3339 time", path = path.display())]
    BadExpiry { path: PathBuf },
    #[error("cannot write token file {path}: {source}", path = path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the access token expired and no new one could be obtained")]
    Expired,
    /// The upstream refused the token in force and no refresh has produced a newer one.
    #[error("the upstream refused the held token and no newer one is available")]
    RefusedNoNewer,
    /// The upstream refused a token fresh from a refresh too.
    #[error("the upstream refused a freshly refreshed token too")]
    RefusedFresh,
    #[error("the token cannot be refreshed: no [token.oauth] or no refresh token")]
    NotRefreshable,
    #[error("re-authorisation needed: refresh token refused (invalid_grant)")]
    InvalidGrant,
    /// `invalid_grant` to an authorisation code: it was used already, expired or was issued
    /// for another client or redirect URI.
    #[error(
        "the authorisation code was refused (invalid_grant): a code works once and only for a \
         few minutes; authorise again in the browser and run `cxgate token init --code` with \
         the new code (and the same --redirect-uri it was issued for)"
    )]
    CodeRefused,
    /// A gateway key would travel upstream in the token (an operator pasted a client's key
    /// where the CX Social token goes, or a tampered record or an answer carries one, whole
    /// or as a part).
    #[error(
        "{what}: its access or refresh token holds a client's gateway key (it or a part of it \
         has the SHA-256 of a clients[].key_sha256); a gateway key never travels upstream: put \
         the CX Social token there"
    )]
    ClientKey { what: String },
    #[error("token_url is not a valid http(s) URL")]
    BadTokenUrl,
    #[error("token endpoint unreachable: {0}")]
    Http(#[source] hyper_util::client::legacy::Error),
    #[error("token endpoint answer could not be read: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("token endpoint did not answer in time")]
    Timeout,
    #[error("token endpoint answered HTTP {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Rejected { status: u16, code: Option<String> },
    #[error("token endpoint answer is not a token: {reason}")]
    BadAnswer { reason: &'static str },
    #[error(
        "the upstream refuses freshly refreshed tokens too; the next refresh waits out a backoff"
    )]
    RefusedUpstream,
    #[error(
        "the upstream refuses the held token and it cannot be refreshed (a static token, or no \
         refresh token): replace it; ready again once a call with it succeeds"
    )]
    RefusedNotRefreshable,
    #[error("the refresh task ended without an outcome")]
    RefreshAborted,
    #[error("another replica's token refresh did not finish in time")]
    SharedRefreshStalled,
    #[error("cannot register token metrics: {0}")]
    Metrics(#[source] prometheus::Error),
    /// One refresh outcome shared by every caller that waited for it.
    #[error(transparent)]
    Shared(Arc<TokenError>),
}

impl TokenError {
    /// True when the token file does not exist (yet): `cxgate token init` writes it.
    pub fn is_missing_file(&self) -> bool {
        matches!(self, TokenError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }

    /// True when the refresh token was refused and a person must authorise again.
    pub fn needs_reauthorisation(&self) -> bool {
        match self {
            TokenError::InvalidGrant => true,
            TokenError::Shared(inner) => inner.needs_reauthorisation(),
            _ => false,
        }
    }
}

/// What to do about a token file that cannot be read: a missing one is made once with
/// `cxgate token init`.
fn read_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::NotFound => {
            "; create it once with `cxgate token init --config FILE` (from CX_ACCESS_TOKEN, \
             or --code CODE to exchange an authorisation code)"
        }
        std::io::ErrorKind::PermissionDenied => {
            "; the gateway's user must be able to read and write it"
        }
        _ => "",
    }
}
