//! Refreshing: ahead of expiry, single flight, rotation, backoff, re-authorisation.

use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);

use super::*;
use crate::token::file;
use crate::token::*;

#[tokio::test(start_paused = true)]
async fn the_refresher_renews_ahead_of_expiry() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;
    let refresher = tokens.spawn_refresher();

    tokio::time::advance(49 * MINUTE).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        server.state().calls,
        0,
        "expected no refresh 11 minutes before expiry"
    );
    assert_eq!(
        generation(&tokens),
        1,
        "expected the first token still in use"
    );

    tokio::time::advance(2 * MINUTE).await;
    eventually("a refresh 10 minutes before expiry", || {
        generation(&tokens) == 2
    })
    .await;
    let current = tokens.current().expect("a usable token");
    assert_eq!(
        current.access.expose(),
        "access-token-0001",
        "expected the new token"
    );
    let on_disk = file::read(&dir.file())
        .await
        .expect("reading the token file");
    assert_eq!(
        on_disk.refresh.as_ref().map(Secret::expose),
        Some("refresh-token-0001"),
        "expected the rotated refresh token on disk"
    );
    assert_eq!(
        refreshes(&registry, "ok"),
        1,
        "expected one ok refresh counted"
    );
    let status = tokens.status_json();
    assert!(
        status["last_refresh"].is_string(),
        "expected a last_refresh time in {status}"
    );
    refresher.abort();
}

/// A held token no request can carry (a tab in it) is refreshed at once, not at its expiry.
#[tokio::test(start_paused = true)]
async fn an_unsendable_token_is_refreshed_at_once() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "sim\ttoken",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;
    let refresher = tokens.spawn_refresher();
    eventually("a refresh in place of the unsendable token", || {
        generation(&tokens) == 2
    })
    .await;
    assert_eq!(server.state().calls, 1, "expected one refresh");
    let current = tokens.current().expect("a usable token");
    assert_eq!(current.access.expose(), "access-token-0001");
    refresher.abort();
}

/// A token living less than twice `refresh_before` is refreshed half its lifetime ahead,
/// and that is warned about once for the token, not on every look at the schedule.
#[tokio::test(start_paused = true)]
async fn a_shortened_lead_is_warned_once_per_token() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(100 * SECOND),
    );
    let server = TokenServer::start("refresh-0", 100).await;
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;
    let refresher = tokens.spawn_refresher();
    tokio::time::advance(40 * SECOND).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        server.state().calls,
        0,
        "expected no refresh before half the life"
    );
    assert_eq!(
        tokens.inner.lock().lead_warned,
        1,
        "expected the first token warned"
    );
    eventually("a refresh at half the lifetime", || {
        generation(&tokens) == 2
    })
    .await;
    eventually("the new token warned", || {
        tokens.inner.lock().lead_warned == 2
    })
    .await;
    refresher.abort();
}

#[tokio::test(start_paused = true)]
async fn rotating_refresh_tokens_are_never_reused() {
    let dir = TempDir::new();
    write_token(&dir.file(), "access-0", Some("refresh-0"), Some(2 * MINUTE));
    let server = TokenServer::start("refresh-0", 120).await;
    let registry = prometheus::Registry::new();
    let tokens = manager(
        server.settings(dir.file(), 30 * Duration::from_secs(1)),
        &registry,
    )
    .await;
    let refresher = tokens.spawn_refresher();
    // Rejections arriving now and then race the refresher; neither may spend a token twice.
    for round in 0..30u64 {
        tokio::time::sleep(Duration::from_secs(45)).await;
        if round % 3 == 0 {
            let seen = generation(&tokens);
            let _ = tokens.refresh_after_rejection(seen).await;
        }
    }
    let (issued, reused) = {
        let state = server.state();
        (state.issued, state.reuse_seen)
    };
    assert!(
        issued >= 15,
        "expected at least 15 refreshes in 22 minutes, saw {issued}"
    );
    assert!(!reused, "expected no refresh token to be presented twice");
    assert_eq!(
        refreshes(&registry, "error"),
        0,
        "expected no failed refresh"
    );
    assert_eq!(
        tokens.readiness(),
        Ok(()),
        "expected ready after many rotations"
    );
    refresher.abort();
    // Let a refresh the refresher may have started finish before reading the file.
    eventually("every issued token published", || {
        server.state().issued + 1 == generation(&tokens)
    })
    .await;

    // The file holds the live refresh token: a restarted gateway can refresh with it.
    let restarted = manager(
        server.settings(dir.file(), MINUTE),
        &prometheus::Registry::new(),
    )
    .await;
    let again = restarted.refresh_after_rejection(1).await;
    assert!(
        again.is_ok(),
        "expected the stored refresh token to work, saw {again:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn fifty_rejections_of_one_generation_make_one_refresh() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    server.state().delay = Duration::from_millis(200);
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;

    let callers: Vec<_> = (0..50)
        .map(|_| {
            let tokens = tokens.clone();
            tokio::spawn(async move { tokens.refresh_after_rejection(1).await })
        })
        .collect();
    for caller in callers {
        let got = caller.await.expect("caller task");
        let got = got.expect("every caller gets the new token");
        // Published means saved: the file already holds what callers were handed.
        let on_disk = std::fs::read(dir.file()).expect("reading the token file");
        assert!(
            String::from_utf8_lossy(&on_disk).contains("access-token-0001"),
            "expected the new token on disk before any caller got it"
        );
        assert_eq!(got.generation, 2, "expected generation 2");
        assert_eq!(
            got.access.expose(),
            "access-token-0001",
            "expected the one new token"
        );
    }
    assert_eq!(
        server.state().calls,
        1,
        "expected exactly one call to the token endpoint"
    );
    assert_eq!(
        refreshes(&registry, "ok"),
        1,
        "expected one ok refresh counted"
    );

    // A late report about the old generation gets the new token without another call.
    let late = tokens
        .refresh_after_rejection(1)
        .await
        .expect("the newer token");
    assert_eq!(
        late.generation, 2,
        "expected the newer generation for a stale report"
    );
    assert_eq!(
        server.state().calls,
        1,
        "expected no call for a stale report"
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_gives_up_does_not_abort_the_refresh() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    server.state().delay = Duration::from_secs(2);
    let tokens = manager(
        server.settings(dir.file(), 10 * MINUTE),
        &prometheus::Registry::new(),
    )
    .await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        tokens.refresh_after_rejection(1),
    )
    .await;
    assert!(gave_up.is_err(), "expected the caller to time out first");
    eventually("the refresh to finish anyway", || generation(&tokens) == 2).await;
    let on_disk = file::read(&dir.file())
        .await
        .expect("reading the token file");
    assert_eq!(
        on_disk.access.expose(),
        "access-token-0001",
        "expected the new token saved"
    );
}

#[tokio::test(start_paused = true)]
async fn server_errors_are_retried_with_backoff_while_the_old_token_serves() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(20 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    server.state().fail_next.extend([503, 500, 502, 503]);
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;
    let refresher = tokens.spawn_refresher();

    tokio::time::advance(10 * MINUTE).await;
    eventually("two failed attempts", || server.state().calls >= 2).await;
    let current = tokens.current().expect("the old token stays usable");
    assert_eq!(
        current.access.expose(),
        "access-0",
        "expected the old token meanwhile"
    );
    assert_eq!(
        tokens.readiness(),
        Ok(()),
        "expected ready while the old token is valid"
    );

    eventually("a successful refresh", || generation(&tokens) == 2).await;
    let arrivals = server.state().arrivals.clone();
    assert_eq!(arrivals.len(), 5, "expected 4 failures and 1 success");
    let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, pair) in gaps.windows(2).enumerate() {
        assert!(
            pair[1] >= pair[0],
            "expected growing gaps, gap {} < gap {i}: {gaps:?}",
            i + 1
        );
    }
    assert!(
        gaps[0] >= Duration::from_millis(500) && gaps[3] >= Duration::from_secs(4),
        "expected backoff of 0.5-1 s growing to 4-8 s, saw {gaps:?}"
    );
    assert_eq!(
        refreshes(&registry, "error"),
        4,
        "expected 4 errors counted"
    );
    assert_eq!(refreshes(&registry, "ok"), 1, "expected 1 ok counted");
    assert_eq!(
        tokens.status_json()["refresh_failures"],
        0,
        "expected failures reset"
    );
    refresher.abort();
}

#[tokio::test(start_paused = true)]
async fn a_refused_refresh_token_needs_reauthorisation() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("revoked-refresh"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("some-other-refresh", 3600).await;
    let registry = prometheus::Registry::new();
    let tokens = manager(server.settings(dir.file(), 10 * MINUTE), &registry).await;
    let refresher = tokens.spawn_refresher();

    let got = tokens.refresh_after_rejection(1).await;
    assert!(
        got.as_ref().is_err_and(TokenError::needs_reauthorisation),
        "expected invalid_grant, saw {got:?}"
    );
    assert_eq!(
        tokens.readiness(),
        Err("re-authorisation needed: refresh token refused (invalid_grant)".to_string()),
        "expected readiness to name the reason"
    );
    assert_eq!(
        tokens.status_json()["needs_reauthorisation"],
        true,
        "expected the flag in status"
    );
    assert_eq!(
        refreshes(&registry, "error"),
        1,
        "expected the refusal counted as an error"
    );
    tokio::time::advance(5 * MINUTE).await;
    let again = tokens.refresh_after_rejection(1).await;
    assert!(
        matches!(again, Err(TokenError::InvalidGrant)),
        "expected InvalidGrant, saw {again:?}"
    );
    assert_eq!(
        server.state().calls,
        1,
        "expected no second try with a refused token"
    );

    // A person authorises again (`cxgate token init`); the running gateway picks it up.
    write_token(
        &dir.file(),
        "access-new",
        Some("some-other-refresh"),
        Some(60 * MINUTE),
    );
    eventually("the new token file to be adopted", || {
        tokens.readiness().is_ok()
    })
    .await;
    let current = tokens.current().expect("the re-authorised token");
    assert_eq!(
        current.access.expose(),
        "access-new",
        "expected the re-authorised token"
    );
    refresher.abort();
}

#[tokio::test(start_paused = true)]
async fn enveloped_answers_and_get_requests_work() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    server.state().envelope = true;
    let mut settings = server.settings(dir.file(), 10 * MINUTE);
    settings.oauth = Some(server.oauth(OAuthMethod::Get));
    let tokens = manager(settings, &prometheus::Registry::new()).await;
    let got = tokens
        .refresh_after_rejection(1)
        .await
        .expect("an enveloped answer is accepted");
    assert_eq!(
        got.access.expose(),
        "access-token-0001",
        "expected the enveloped token"
    );

    let (method, query, form) = server.state().seen[0].clone();
    assert_eq!(method, "GET", "expected a GET");
    assert!(form.is_empty(), "expected no body on GET, saw {form:?}");
    let has = |k: &str, v: &str| query.iter().any(|(a, b)| a == k && b == v);
    assert!(
        has("grant_type", "refresh_token")
            && has("refresh_token", "refresh-0")
            && has("client_id", "cid"),
        "expected the grant in the query, saw {:?}",
        query.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
}

#[tokio::test(start_paused = true)]
async fn post_requests_carry_a_form() {
    let dir = TempDir::new();
    write_token(
        &dir.file(),
        "access-0",
        Some("refresh-0"),
        Some(60 * MINUTE),
    );
    let server = TokenServer::start("refresh-0", 3600).await;
    let tokens = manager(
        server.settings(dir.file(), 10 * MINUTE),
        &prometheus::Registry::new(),
    )
    .await;
    tokens.refresh_after_rejection(1).await.expect("a refresh");
    let (method, query, form) = server.state().seen[0].clone();
    assert_eq!(method, "POST", "expected a POST");
    assert!(query.is_empty(), "expected no query on POST");
    let keys: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        ["grant_type", "refresh_token", "client_id", "client_secret"],
        "expected the RFC 6749 form fields"
    );
    let held: Vec<String> = tokens
        .secrets()
        .iter()
        .map(|s| s.expose().to_string())
        .collect();
    assert!(
        held.contains(&"access-0".to_string()) && held.contains(&"access-token-0001".to_string()),
        "expected the new and the just-replaced token among the secrets"
    );
}
