//! Loading a token, a static token, expiry, and `cxgate token init`.

use std::time::{Duration, SystemTime};

use super::*;
use crate::token::file;
use crate::token::*;

#[tokio::test(start_paused = true)]
async fn a_token_file_is_loaded_and_reported_without_secrets() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "file-access-token",
        Some("file-refresh-token"),
        Some(60 * MINUTE),
    );
    let settings = TokenSettings {
        file: Some(dir.file()),
        access_token_env: None,
        refresh_before: 10 * MINUTE,
        oauth: None,
        client_keys: Vec::new(),
    };
    let registry = prometheus::Registry::new();
    let tokens = manager(settings, &registry).await;
    let current = tokens.current().expect("a usable token");
    assert_eq!(
        current.access.expose(),
        "file-access-token",
        "expected the file's token"
    );
    assert_eq!(current.generation, 1, "expected generation 1");
    assert_eq!(tokens.readiness(), Ok(()), "expected ready");

    let status = tokens.status_json();
    let text = format!("{status} {tokens:?}");
    assert!(
        !text.contains("file-access-token") && !text.contains("file-refresh-token"),
        "expected no token text in status or Debug, saw {text}"
    );
    let left = status["expires_in_s"].as_i64().unwrap_or(-1);
    assert!(
        (3590..=3600).contains(&left),
        "expected about 3600 s left, saw {left}"
    );
    assert_eq!(status["source"], "file", "expected source file in {status}");
    assert_eq!(
        status["last_refresh"],
        serde_json::Value::Null,
        "expected no refresh yet"
    );

    let secrets: Vec<String> = tokens
        .secrets()
        .iter()
        .map(|s| s.expose().to_string())
        .collect();
    assert_eq!(
        secrets,
        ["file-access-token", "file-refresh-token"],
        "expected both tokens"
    );

    let gauge: Vec<f64> = registry
        .gather()
        .iter()
        .filter(|f| f.name() == "cxgate_token_expiry_seconds")
        .flat_map(|f| {
            f.get_metric()
                .iter()
                .map(|m| m.get_gauge().get_value())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(
        gauge.len() == 1 && (3590.0..=3600.0).contains(&gauge[0]),
        "expected one expiry sample near 3600, saw {gauge:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_static_token_from_the_environment_is_never_refreshed() {
    let settings = TokenSettings {
        file: None,
        access_token_env: Some("MY_STATIC_TOKEN".to_string()),
        refresh_before: 10 * MINUTE,
        oauth: None,
        client_keys: Vec::new(),
    };
    let env = |name: &str| (name == "MY_STATIC_TOKEN").then(|| "static-token-value".to_string());
    let registry = prometheus::Registry::new();
    let tokens = TokenManager::load_with(settings.clone(), client(), Some(&registry), &env)
        .await
        .expect("loading a static token");
    let current = tokens.current().expect("a usable token");
    assert_eq!(
        current.access.expose(),
        "static-token-value",
        "expected the env token"
    );
    assert_eq!(
        tokens.status_json()["expires_in_s"],
        serde_json::Value::Null,
        "expected no expiry"
    );
    let refreshed = tokens.refresh_after_rejection(current.generation).await;
    assert!(
        matches!(refreshed, Err(TokenError::NotRefreshable)),
        "expected NotRefreshable, saw {refreshed:?}"
    );
    let ended = tokio::time::timeout(Duration::from_secs(1), tokens.spawn_refresher()).await;
    assert!(
        ended.is_ok(),
        "expected the refresher to end at once for a static token"
    );

    let missing = TokenManager::load_with(settings, client(), None, &|_| None).await;
    assert!(
        matches!(missing, Err(TokenError::MissingEnv { ref name }) if name == "MY_STATIC_TOKEN"),
        "expected MissingEnv naming the variable, saw {missing:?}"
    );
    let none = TokenSettings {
        access_token_env: None,
        ..tokens_settings_without_source()
    };
    let none = TokenManager::load_with(none, client(), None, &|_| None).await;
    assert!(
        matches!(none, Err(TokenError::NoSource)),
        "expected NoSource, saw {none:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_unrefreshable_token_is_unavailable() {
    let dir = TempDir::new();
    write_token(&dir.file(), "access-0", None, Some(MINUTE));
    let settings = TokenSettings {
        file: Some(dir.file()),
        ..tokens_settings_without_source()
    };
    let tokens = manager(settings, &prometheus::Registry::new()).await;
    assert!(
        tokens.current().is_ok(),
        "expected the token usable for a minute"
    );
    tokio::time::advance(2 * MINUTE).await;
    let got = tokens.current();
    assert!(
        matches!(got, Err(TokenError::Expired)),
        "expected Expired, saw {got:?}"
    );
    assert!(
        tokens.readiness().is_err(),
        "expected not ready with an expired token"
    );
    let left = tokens.status_json()["expires_in_s"].as_i64().unwrap_or(0);
    assert!(left < 0, "expected negative seconds left, saw {left}");
}

#[tokio::test]
async fn token_init_from_the_environment_writes_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new();
    let settings = TokenSettings {
        file: Some(dir.file()),
        ..tokens_settings_without_source()
    };
    let env = |name: &str| match name {
        "CX_ACCESS_TOKEN" => Some("init-access".to_string()),
        "CX_REFRESH_TOKEN" => Some("init-refresh".to_string()),
        "CX_EXPIRES_IN" => Some("3600".to_string()),
        _ => None,
    };
    let path = init::init_from_lookup(&settings, &env)
        .await
        .expect("token init");
    assert_eq!(path, dir.file(), "expected the configured path back");
    let mode = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600, "expected mode 0600, saw {mode:o}");
    let stored = file::read(&path).await.expect("reading the written file");
    assert_eq!(
        stored.access.expose(),
        "init-access",
        "expected the access token"
    );
    assert_eq!(
        stored.refresh.as_ref().map(Secret::expose),
        Some("init-refresh"),
        "expected the refresh token"
    );
    let left = stored
        .expires_at
        .and_then(|t| t.duration_since(SystemTime::now()).ok());
    assert!(
        left.is_some_and(|d| d > Duration::from_secs(3500)),
        "expected about an hour left, saw {left:?}"
    );

    let missing = init::init_from_lookup(&settings, &|_| None).await;
    assert!(
        matches!(missing, Err(TokenError::MissingEnv { ref name }) if name == "CX_ACCESS_TOKEN"),
        "expected MissingEnv(CX_ACCESS_TOKEN), saw {missing:?}"
    );
    let bad = |name: &str| match name {
        "CX_ACCESS_TOKEN" => Some("a".to_string()),
        "CX_EXPIRES_IN" => Some("an hour".to_string()),
        _ => None,
    };
    let bad = init::init_from_lookup(&settings, &bad).await;
    assert!(
        matches!(bad, Err(TokenError::BadEnvNumber { .. })),
        "expected BadEnvNumber, saw {bad:?}"
    );
    let no_file = init::init_from_lookup(&tokens_settings_without_source(), &env).await;
    assert!(
        matches!(no_file, Err(TokenError::NoFile)),
        "expected NoFile, saw {no_file:?}"
    );
}

#[tokio::test]
async fn token_init_exchanges_an_authorisation_code() {
    let dir = TempDir::new();
    let server = TokenServer::start("unused", 3600).await;
    let settings = server.settings(dir.file(), 10 * MINUTE);
    let http = client();
    let path = init::init_from_code_with(
        &settings,
        &http,
        endpoint::GOOD_CODE,
        Some("https://me/cb"),
        &endpoint::env,
    )
    .await
    .expect("exchanging a good code");
    let stored = file::read(&path).await.expect("reading the written file");
    assert_eq!(
        stored.access.expose(),
        "access-token-0001",
        "expected the issued token"
    );
    let (_, _, form) = server.state().seen[0].clone();
    assert!(
        form.iter()
            .any(|(k, v)| k == "grant_type" && v == "authorization_code"),
        "expected an authorization_code grant"
    );
    let bad = init::init_from_code_with(&settings, &http, "wrong", None, &endpoint::env).await;
    assert!(
        matches!(bad, Err(TokenError::CodeRefused)),
        "expected the code named as refused, saw {bad:?}"
    );
    let said = bad.unwrap_err().to_string();
    assert!(
        said.contains("authorisation code was refused")
            && !said.contains("refresh token")
            && said.contains("cxgate token init --code"),
        "expected the code, not a refresh token, named with what to do, saw {said}"
    );
}
