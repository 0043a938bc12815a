//! Access tokens, the OAuth token endpoint and the rate limit.

use std::time::Duration;

use super::support::*;
use cxgate::sim::{RateLimit, SimOptions};
use http::{Method, StatusCode};
use serde_json::json;

// Paused: the 300 ms token outlives the first reads however busy the machine is.
#[tokio::test(start_paused = true)]
async fn tokens_unknown_expired_revoked() {
    let opts = SimOptions {
        token_ttl: Duration::from_millis(300),
        ..SimOptions::default()
    };
    let peer = start(opts).await;
    assert_error(
        &peer.send(Method::GET, "/me", Some("nope"), None).await,
        401,
        "invalid_token",
    );
    assert_error(
        &peer.send(Method::GET, "/me", None, None).await,
        401,
        "invalid_token",
    );
    assert_eq!(
        peer.get("/me").await.status,
        StatusCode::OK,
        "expected seed token valid"
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_error(&peer.get("/me").await, 401, "invalid_token");
    assert_eq!(
        peer.sim.stats()["unauthorized"],
        3,
        "saw {}",
        peer.sim.stats()
    );
    peer.sim.shutdown().await;

    let peer = start(SimOptions::default()).await;
    let revoked = peer
        .send(Method::POST, "/_sim/revoke", None, None)
        .await
        .json();
    assert_eq!(
        revoked["revoked"], 1,
        "expected the seed token revoked, saw {revoked}"
    );
    assert_error(&peer.get("/me").await, 401, "invalid_token");
    let grant = form(&[
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
        ("grant_type", "refresh_token"),
        ("refresh_token", "sim-refresh"),
    ]);
    let fresh = peer
        .send(Method::POST, "/oauth/access_token", None, Some(&grant))
        .await;
    assert_eq!(
        fresh.status,
        StatusCode::OK,
        "expected refresh to survive revocation, saw {}",
        fresh.json()
    );
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn oauth_grants_and_refresh_rotation() {
    let peer = start(SimOptions::default()).await;
    let refresh = |token: &str| {
        form(&[
            ("client_id", "sim-client"),
            ("client_secret", "sim-secret"),
            ("grant_type", "refresh_token"),
            ("refresh_token", token),
        ])
    };
    let first = peer
        .send(
            Method::POST,
            "/oauth/access_token/",
            None,
            Some(&refresh("sim-refresh")),
        )
        .await;
    let issued = first.json();
    assert_eq!(
        first.status,
        StatusCode::OK,
        "expected a refresh, saw {issued}"
    );
    for field in ["access_token", "expires_in", "refresh_token", "scope"] {
        assert!(!issued[field].is_null(), "expected {field} in {issued}");
    }
    let scope = issued["scope"].as_str().unwrap_or_default();
    assert!(
        scope.split(' ').any(|s| s == "identify"),
        "expected the space-separated scope to include identify, saw {scope:?}"
    );
    let access = issued["access_token"].as_str().unwrap_or("");
    assert_eq!(
        peer.send(Method::GET, "/me", Some(access), None)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        peer.get("/me").await.status,
        StatusCode::OK,
        "expected the old token to live on"
    );
    let reused = peer
        .send(
            Method::POST,
            "/oauth/access_token",
            None,
            Some(&refresh("sim-refresh")),
        )
        .await;
    assert_error(&reused, 400, "invalid_grant");
    let rotated = issued["refresh_token"].as_str().unwrap_or("");
    let second = peer
        .send(
            Method::POST,
            "/oauth/access_token",
            None,
            Some(&refresh(rotated)),
        )
        .await;
    assert_eq!(
        second.status,
        StatusCode::OK,
        "expected the rotated token to work once"
    );
    // Authorisation code grant as a GET with query parameters, as public clients do.
    let code = "/oauth/access_token?client_id=sim-client&client_secret=sim-secret&grant_type=authorization_code&code=sim-code";
    assert_eq!(
        peer.send(Method::GET, code, None, None).await.status,
        StatusCode::OK
    );
    assert_error(
        &peer.send(Method::GET, code, None, None).await,
        400,
        "invalid_grant",
    );
    let wrong = code.replace("sim-secret", "guess");
    assert_error(
        &peer.send(Method::GET, &wrong, None, None).await,
        401,
        "invalid_client",
    );
    let odd = code.replace("authorization_code", "password");
    assert_error(
        &peer.send(Method::GET, &odd, None, None).await,
        400,
        "unsupported_grant_type",
    );
    let stats = peer.sim.stats();
    let seen = (
        &stats["token_refreshes"],
        &stats["refresh_reuse_rejected"],
        &stats["token_grants"],
    );
    assert_eq!(
        seen,
        (&json!(2), &json!(1), &json!(1)),
        "expected 2 refreshes, 1 reuse, 1 grant; saw {stats}"
    );
    peer.sim.shutdown().await;
}

// Paused: the calls fall in one 600 ms window however busy the machine is.
#[tokio::test(start_paused = true)]
async fn rate_limit_per_lineage_with_headers() {
    let rate_limit = Some(RateLimit {
        limit: 3,
        period: Duration::from_millis(600),
    });
    let peer = start(SimOptions {
        rate_limit,
        rate_limit_status: 429,
        ..SimOptions::default()
    })
    .await;
    for expected in ["2", "1", "0"] {
        let ok = peer.get("/me").await;
        assert_eq!(ok.status, StatusCode::OK);
        assert_eq!(ok.header("x-ratelimit-limit"), "3");
        assert_eq!(
            ok.header("x-ratelimit-remaining"),
            expected,
            "remaining after a call"
        );
        assert!(
            ok.header("x-ratelimit-reset")
                .parse::<u64>()
                .is_ok_and(|t| t > 1_700_000_000),
            "expected Unix reset"
        );
    }
    let limited = peer.get("/me").await;
    assert_error(&limited, 429, "rate_limit_reached");
    assert_eq!(
        limited.header("retry-after"),
        "1",
        "expected Retry-After rounded up to 1 s"
    );
    // A refresh keeps the lineage, so the new token is limited too; the token endpoint is not.
    let grant = form(&[
        ("client_id", "sim-client"),
        ("client_secret", "sim-secret"),
        ("grant_type", "refresh_token"),
        ("refresh_token", "sim-refresh"),
    ]);
    let issued = peer
        .send(Method::POST, "/oauth/access_token", None, Some(&grant))
        .await
        .json();
    let access = issued["access_token"].as_str().unwrap_or("");
    assert_error(
        &peer.send(Method::GET, "/me", Some(access), None).await,
        429,
        "rate_limit_reached",
    );
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(
        peer.get("/me").await.status,
        StatusCode::OK,
        "expected a new window"
    );
    assert_eq!(
        peer.sim.stats()["rate_limited"],
        2,
        "saw {}",
        peer.sim.stats()
    );
    peer.sim.shutdown().await;
}

/// By default the simulator answers over the limit as the real API does: HTTP 400 with a
/// top-level `"error": "rate_limit_reached"`, `X-RateLimit-Remaining: 0`, no Retry-After,
/// and the reset header only on every other refusal.
#[tokio::test]
async fn over_the_limit_is_a_400_rate_limit_reached_by_default() {
    let peer = start(SimOptions {
        rate_limit: Some("1/1h".parse().expect("valid rate limit")),
        ..SimOptions::default()
    })
    .await;
    assert_eq!(peer.get("/me").await.status, StatusCode::OK);
    let mut resets = Vec::new();
    for n in 0..4 {
        let limited = peer.get("/me").await;
        assert_error(&limited, 400, "rate_limit_reached");
        assert_eq!(
            limited.header("x-ratelimit-remaining"),
            "0",
            "refusal {n}: expected Remaining 0"
        );
        assert_eq!(
            limited.header("retry-after"),
            "",
            "refusal {n}: expected no Retry-After from the real API's form"
        );
        resets.push(!limited.header("x-ratelimit-reset").is_empty());
    }
    assert_eq!(
        resets,
        [true, false, true, false],
        "expected the reset header on every other refusal"
    );
    peer.sim.shutdown().await;
}

/// As the API: the token may be a field of a form body (a browser client sends it so), and
/// a JSON body is refused with a 400, since the API takes form bodies only.
#[tokio::test]
async fn form_body_token_accepted_json_body_refused() {
    let peer = start(SimOptions::default()).await;
    let body = form(&[
        ("access_token", "sim-token"),
        ("mentions", r#"[{"message":"from a browser"}]"#),
    ]);
    let added = peer
        .send(Method::POST, "/12345/inbox/add", None, Some(&body))
        .await;
    assert_eq!(
        added.status,
        StatusCode::OK,
        "expected the form-body token to authenticate, saw {:?}",
        String::from_utf8_lossy(&added.bytes)
    );
    let req = http::Request::post(format!("{}/12345/inbox/add", peer.sim.base_url()))
        .header("authorization", "Bearer sim-token")
        .header("content-type", "application/json; charset=utf-8")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            r#"{"message":"as JSON"}"#,
        )))
        .expect("request");
    let resp = peer.http.request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    assert_eq!(status, 400, "expected a JSON body refused, saw {body}");
    assert_eq!(body["error"], "invalid_request", "saw {body}");
    assert_eq!(body["meta"]["code"], 400, "saw {body}");
    peer.sim.shutdown().await;
}
