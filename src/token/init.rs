//! `cxgate token init`: write the token file a running gateway will load, from the token
//! values in the environment or from an authorisation code exchanged at the OAuth endpoint.
//! Either way the file is written atomically with mode 0600, exactly as a refresh writes it,
//! and a running gateway that needs re-authorisation picks the new file up by itself.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::error::TokenError;
use super::file::{self, TokenRecord};
use super::oauth::{self, Grant};
use super::secret::Secret;
use super::{Lookup, TokenSettings};
use crate::upstream::HttpClient;

/// The access token to store.
pub const ACCESS_TOKEN_VAR: &str = "CX_ACCESS_TOKEN";
/// The refresh token to store (optional).
pub const REFRESH_TOKEN_VAR: &str = "CX_REFRESH_TOKEN";
/// Seconds until the access token expires (optional; unknown expiry when absent).
pub const EXPIRES_IN_VAR: &str = "CX_EXPIRES_IN";

/// Writes the token file from the values of `CX_ACCESS_TOKEN`, `CX_REFRESH_TOKEN` and
/// `CX_EXPIRES_IN` that `env` holds: for the "Authorise Myself" token of the developer
/// portal, or tokens obtained elsewhere.
pub async fn init_from_lookup(
    settings: &TokenSettings,
    env: Lookup<'_>,
) -> Result<PathBuf, TokenError> {
    let path = settings.file.clone().ok_or(TokenError::NoFile)?;
    let access = env(ACCESS_TOKEN_VAR).ok_or_else(|| TokenError::MissingEnv {
        name: ACCESS_TOKEN_VAR.to_string(),
    })?;
    let expires_in = match env(EXPIRES_IN_VAR) {
        Some(text) => Some(
            text.trim()
                .parse::<u64>()
                .map_err(|_| TokenError::BadEnvNumber {
                    name: EXPIRES_IN_VAR.to_string(),
                })?,
        ),
        None => None,
    };
    let record = TokenRecord {
        access: Secret::new(access),
        refresh: env(REFRESH_TOKEN_VAR).map(Secret::new),
        expires_at: expires_in.and_then(|s| SystemTime::now().checked_add(Duration::from_secs(s))),
        scope: None,
        initialised_at: Some(SystemTime::now()),
        adopted: false,
    };
    // A client's key pasted into the CX Social token would be sent upstream on every call.
    if file::record_holds_key(&record, settings.client_keys.as_slice()) {
        return Err(TokenError::ClientKey {
            what: format!("${ACCESS_TOKEN_VAR} or ${REFRESH_TOKEN_VAR}"),
        });
    }
    make_parent(&path)?;
    file::persist(&path, &record).await?;
    tracing::info!(path = %path.display(), "token file written");
    Ok(path)
}

/// Creates the token file's directory (private: mode 0700) when it does not exist yet, so
/// the first `cxgate token init` needs no separate `mkdir`.
fn make_parent(path: &std::path::Path) -> Result<(), TokenError> {
    let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    else {
        return Ok(());
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Exchanges an authorisation code at `[token.oauth]`'s endpoint and writes the token file.
pub async fn init_from_code(
    settings: &TokenSettings,
    client: HttpClient,
    code: &str,
    redirect_uri: Option<&str>,
    secrets: Lookup<'_>,
) -> Result<PathBuf, TokenError> {
    init_from_code_with(settings, &client, code, redirect_uri, secrets).await
}

pub(crate) async fn init_from_code_with(
    settings: &TokenSettings,
    client: &HttpClient,
    code: &str,
    redirect_uri: Option<&str>,
    env: Lookup<'_>,
) -> Result<PathBuf, TokenError> {
    let path = settings.file.clone().ok_or(TokenError::NoFile)?;
    let oauth = settings.oauth.as_ref().ok_or(TokenError::NoOAuth)?;
    let secret = env(&oauth.client_secret_env).ok_or_else(|| TokenError::MissingEnv {
        name: oauth.client_secret_env.clone(),
    })?;
    // Before the exchange: a single-use code must not be spent on a file that cannot be made.
    make_parent(&path)?;
    let grant = Grant::Code { code, redirect_uri };
    let granted = oauth::exchange(client, oauth, &Secret::new(secret), grant)
        .await
        .map_err(|e| match e {
            // The refused grant here is the code, not a refresh token.
            TokenError::InvalidGrant => TokenError::CodeRefused,
            other => other,
        })?;
    let record = TokenRecord {
        access: granted.access,
        refresh: granted.refresh,
        expires_at: granted
            .expires_in
            .and_then(|d| SystemTime::now().checked_add(d)),
        scope: granted.scope,
        initialised_at: Some(SystemTime::now()),
        adopted: false,
    };
    if file::record_holds_key(&record, settings.client_keys.as_slice()) {
        return Err(TokenError::ClientKey {
            what: "the token endpoint's answer to the code".to_string(),
        });
    }
    file::persist(&path, &record).await?;
    tracing::info!(path = %path.display(), "token file written from an authorisation code");
    Ok(path)
}
