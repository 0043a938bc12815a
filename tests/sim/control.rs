//! Faults and stats, through `/_sim/*` and the handle.

use std::time::{Duration, Instant};

use super::support::*;
use bytes::Bytes;
use cxgate::sim::{token_hash, Faults, SimOptions};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};

#[tokio::test]
async fn faults_each_kind() {
    let peer = start(SimOptions::default()).await;
    let p = &peer;
    let set = move |faults: Value| async move {
        let body = faults.to_string();
        p.send(Method::POST, "/_sim/faults", None, Some(&body))
            .await
    };
    let started = Instant::now();
    assert_eq!(set(json!({"latency_ms": 150})).await.status, StatusCode::OK);
    peer.get("/me").await;
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "expected 150 ms latency, took {:?}",
        started.elapsed()
    );

    set(json!({"error_rate": 1.0, "error_status": 502, "path_prefix": "/12345/"})).await;
    assert_error(&peer.get("/12345/settings/tags").await, 502, "server_error");
    assert_eq!(
        peer.get("/me").await.status,
        StatusCode::OK,
        "expected path_prefix to spare /me"
    );

    set(json!({"drop_rate": 1.0})).await;
    let dropped = peer
        .try_send(Method::GET, "/me", Some("sim-token"), None)
        .await;
    assert!(
        dropped.is_err(),
        "expected a dropped connection, saw status {:?}",
        dropped.map(|a| a.status)
    );

    set(json!({"slow_body_ms": 300})).await;
    let started = Instant::now();
    let slow = peer.get("/me").await;
    assert_eq!(slow.json()["meta"]["code"], 200, "expected a whole body");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "expected a 300 ms body, took {:?}",
        started.elapsed()
    );

    set(json!({"force_429": {"count": 2, "retry_after": 5}, "force_401": {"count": 1}})).await;
    assert_error(&peer.get("/me").await, 401, "invalid_token");
    for _ in 0..2 {
        let forced = peer.get("/me").await;
        assert_error(&forced, 429, "rate_limit_reached");
        assert_eq!(forced.header("retry-after"), "5");
    }
    assert_eq!(
        peer.get("/me").await.status,
        StatusCode::OK,
        "expected forced answers used up"
    );

    set(json!({"token_endpoint_down": true})).await;
    assert_error(
        &peer
            .send(Method::POST, "/oauth/access_token", None, Some(""))
            .await,
        503,
        "temporarily_unavailable",
    );
    assert_error(&set(json!({"error_rate": 3})).await, 400, "invalid_request");
    assert_error(
        &set(json!({"latency_secs": 3})).await,
        400,
        "invalid_request",
    );
    assert_error(
        &set(json!({"latency": "soon"})).await,
        400,
        "invalid_request",
    );
    let cleared = peer
        .send(Method::DELETE, "/_sim/faults", None, None)
        .await
        .json();
    assert_eq!(
        cleared["token_endpoint_down"], false,
        "expected faults cleared, saw {cleared}"
    );
    let stats = peer.sim.stats();
    assert_eq!(
        stats["faults_injected"], 8,
        "expected 8 faulted requests, saw {stats}"
    );
    peer.sim.shutdown().await;
}

// Paused: the five calls are in flight together before the 300 ms pass, however busy
// the machine.
#[tokio::test(start_paused = true)]
async fn stats_count_routes_tokens_and_concurrency() {
    let peer = start(SimOptions::default()).await;
    peer.get("/me").await;
    peer.get("/me?limit=1").await;
    peer.send(Method::GET, "/me", Some("other"), None).await;
    let stats: Value = peer
        .send(Method::GET, "/_sim/stats", None, None)
        .await
        .json();
    assert_eq!(
        stats["requests_total"], 3,
        "expected /_sim/* uncounted, saw {stats}"
    );
    assert_eq!(stats["by_route"]["GET /me"], 3, "saw {stats}");
    assert_eq!(
        stats["by_token"],
        json!({token_hash("sim-token"): 2, token_hash("other"): 1}),
        "saw {stats}"
    );

    peer.sim.set_faults(Faults {
        latency_ms: 300,
        ..Faults::default()
    });
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..5 {
        let http = peer.http.clone();
        let uri = format!("{}/me?access_token=sim-token", peer.sim.base_url());
        calls.spawn(async move {
            let req = Request::get(uri)
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            http.request(req)
                .await
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        });
    }
    while let Some(done) = calls.join_next().await {
        let status = done.map_err(|e| e.to_string()).and_then(|r| r);
        assert_eq!(
            status,
            Ok(StatusCode::OK),
            "expected 200 from each concurrent call"
        );
    }
    assert_eq!(
        peer.sim.stats()["max_in_flight"],
        5,
        "saw {}",
        peer.sim.stats()
    );
    eventually(&peer.sim, "in_flight", 0).await;
    peer.send(Method::POST, "/_sim/stats/reset", None, None)
        .await;
    let stats = peer.sim.stats();
    assert_eq!(
        (&stats["requests_total"], &stats["by_route"]),
        (&json!(0), &json!({})),
        "saw {stats}"
    );
    peer.sim.shutdown().await;
}
