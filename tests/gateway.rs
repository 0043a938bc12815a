//! End-to-end checks of the gateway's foundation: forwarding, what it refuses, how upstream
//! failures and overload look on the wire, HTTP/2, anonymous mode and the admin listener.
//! Every gateway runs on 127.0.0.1:0 in front of the simulator (or a recording upstream).
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use common::{recording_upstream, Answer, Env, RawAnswer, ACCESS, KEY, REFRESH, ROUTES};
use cxgate::sim::{Faults, SimOptions};

fn bearer() -> String {
    format!("Bearer {KEY}")
}

/// An HTTP/1.1 request written byte for byte, with the test key and `Connection: close`.
fn raw_request(method: &str, target: &str, extra_headers: &str) -> Vec<u8> {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n\
         Connection: close\r\n{extra_headers}\r\n"
    )
    .into_bytes()
}

/// The gateway's own error: status, the CX Social envelope and a request id.
fn assert_envelope(answer: &Answer, status: u16, error_type: &str, what: &str) {
    let body = answer.json();
    assert_eq!(
        (
            answer.status.as_u16(),
            &body["meta"]["code"],
            &body["meta"]["error_type"]
        ),
        (status, &Value::from(status), &Value::from(error_type)),
        "{what}: expected {status} {error_type} in the envelope, saw {} {body}",
        answer.status
    );
    assert!(
        !answer.header("x-request-id").is_empty(),
        "{what}: expected an X-Request-Id, saw headers {:?}",
        answer.headers
    );
}

fn assert_raw_envelope(answer: &RawAnswer, status: u16, error_type: &str, what: &str) {
    let text = String::from_utf8_lossy(&answer.bytes);
    assert_eq!(
        answer.status(),
        Some(status),
        "{what}: expected status {status}, saw {text:?}"
    );
    let body = answer.json();
    assert_eq!(
        (&body["meta"]["code"], &body["meta"]["error_type"]),
        (&Value::from(status), &Value::from(error_type)),
        "{what}: expected envelope {status} {error_type}, saw {body}"
    );
    assert!(
        answer.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "{what}: expected an X-Request-Id, saw {text:?}"
    );
}

/// The simulator's `by_token` counters.
fn tokens_seen(env: &Env) -> serde_json::Map<String, Value> {
    env.sim.stats()["by_token"]
        .as_object()
        .cloned()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// 1. Forwarding
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn me_is_forwarded_in_the_envelope_with_the_held_token_only() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let first = env.get("/me").await;
    assert_eq!(first.status, 200, "expected 200 for /me, saw {first:?}");
    let body = first.json();
    assert_eq!(
        (&body["meta"]["code"], &body["response"]["id"]),
        (&Value::from(200), &Value::from(4242)),
        "expected the CX Social envelope with the user 4242, saw {body}"
    );
    let generated = first.header("x-request-id").to_string();
    assert!(
        !generated.is_empty(),
        "expected a generated X-Request-Id, saw {:?}",
        first.headers
    );

    let auth = bearer();
    let echoed = env
        .send(
            Method::GET,
            &env.url("/me"),
            &[("authorization", &auth), ("x-request-id", "client-rid-42")],
            "",
        )
        .await;
    assert_eq!(
        echoed.header("x-request-id"),
        "client-rid-42",
        "expected the client's X-Request-Id echoed, saw {:?}",
        echoed.headers
    );

    let tokens = tokens_seen(&env);
    assert_eq!(
        tokens.keys().cloned().collect::<Vec<_>>(),
        vec![cxgate::sim::token_hash(ACCESS)],
        "expected the upstream to see only the held token, saw by_token {tokens:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_query_key_is_accepted_and_never_forwarded() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let url = env.url(&format!("/me/permissions?access_token={KEY}&x=1"));
    let answer = env.send(Method::GET, &url, &[], "").await;
    assert_eq!(
        answer.status, 200,
        "expected 200 with the key in the query, saw {answer:?}"
    );
    let stats = env.sim.stats();
    let seen = stats.to_string();
    assert!(
        !seen.contains(KEY),
        "expected no trace of the client key upstream, saw stats {seen}"
    );
    let tokens = tokens_seen(&env);
    assert_eq!(
        (
            tokens.len(),
            tokens
                .get(&cxgate::sim::token_hash(ACCESS))
                .and_then(Value::as_u64)
        ),
        (1, Some(1)),
        "expected one upstream call with the held token, saw by_token {tokens:?}"
    );
    assert_eq!(
        env.upstream_count("GET /me/permissions"),
        1,
        "expected the call to reach the upstream once, saw {}",
        stats["by_route"]
    );
    env.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_and_the_query_key_stay_on_their_side() {
    let (base, seen, upstream) = recording_upstream().await;
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env = common::start_custom(SimOptions::default(), "", Some(&base), &clients, "").await;
    let request = format!(
        "GET /me/permissions?x=1&access_token={KEY} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Connection: x-foo, close\r\nx-foo: client-hop\r\nKeep-Alive: timeout=9\r\n\
         Accept-Language: nl\r\nx-e2e: yes\r\nX-Request-Id: rid-hop-1\r\n\r\n"
    );
    let answer = common::raw_exchange(env.gw.addr, request.as_bytes()).await;
    let text = String::from_utf8_lossy(&answer.bytes).into_owned();
    assert_eq!(answer.status(), Some(200), "expected 200, saw {text:?}");

    let seen = seen.lock().expect("log lock").clone();
    assert_eq!(seen.len(), 1, "expected one upstream request, saw {seen:?}");
    let up = &seen[0];
    assert_eq!(
        up.target, "/me/permissions?x=1",
        "expected the access_token parameter removed upstream, saw target {:?}",
        up.target
    );
    let header = |name: &str| {
        up.headers
            .get(name)
            .map(|v| v.to_str().unwrap_or("?").to_string())
    };
    assert_eq!(
        header("authorization"),
        Some(format!("Bearer {ACCESS}")),
        "expected the held token upstream, saw {:?}",
        up.headers
    );
    assert_eq!(
        (header("x-foo"), header("keep-alive")),
        (None, None),
        "expected hop-by-hop headers removed upstream, saw {:?}",
        up.headers
    );
    assert!(
        !header("connection").unwrap_or_default().contains("x-foo"),
        "expected the client's Connection header not forwarded, saw {:?}",
        up.headers
    );
    // End-to-end headers the API reads pass; any other stays behind (the allowlist).
    assert_eq!(
        (
            header("accept-language"),
            header("x-e2e"),
            header("x-request-id")
        ),
        (Some("nl".into()), None, Some("rid-hop-1".into())),
        "expected allowlisted headers and the request id forwarded, others not, saw {:?}",
        up.headers
    );
    assert!(
        !format!("{:?}", up.headers).contains(KEY),
        "expected the client key nowhere upstream, saw {:?}",
        up.headers
    );

    assert_eq!(
        (answer.header("x-bar"), answer.header("keep-alive")),
        (None, None),
        "expected the upstream's hop-by-hop headers removed, saw {text:?}"
    );
    assert!(
        !answer
            .header("connection")
            .unwrap_or_default()
            .contains("x-bar"),
        "expected the upstream's Connection header not returned, saw {text:?}"
    );
    assert_eq!(
        (answer.header("x-end-to-end"), answer.header("x-request-id")),
        (Some("kept".into()), Some("rid-hop-1".into())),
        "expected the end-to-end header and the request id returned, saw {text:?}"
    );
    env.stop().await;
    upstream.abort();
}

#[tokio::test]
async fn paging_links_point_at_the_gateway_without_any_token() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let page = env.get("/12345/inbox/mentions?limit=2").await;
    assert_eq!(page.status, 200, "expected 200 for mentions, saw {page:?}");
    let text = String::from_utf8_lossy(&page.body).into_owned();
    assert!(
        !text.contains(ACCESS) && !text.contains(REFRESH),
        "expected no token text in the body, saw {text}"
    );
    let body = page.json();
    let next = body
        .pointer("/response/paging/next_url")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("expected response.paging.next_url, saw {body}"));
    let prefix = format!("http://{}/12345/inbox/mentions?", env.gw.addr);
    assert!(
        next.starts_with(&prefix),
        "expected next_url under {prefix}, saw {next}"
    );
    assert!(
        !next.contains("access_token"),
        "expected no access_token in next_url, saw {next}"
    );
    let path = &next[format!("http://{}", env.gw.addr).len()..];
    let second = env.get(path).await;
    assert_eq!(
        second.status, 200,
        "expected the rewritten next_url to work through the gateway, saw {second:?}"
    );
    assert_ne!(
        second.body, page.body,
        "expected the second page to differ from the first"
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Bad input: refused with the right envelope, and nothing reaches the upstream
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn foreign_targets_connect_and_dot_segments_are_refused_before_the_upstream() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let before = env.upstream_total();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "absolute-form for another host",
            raw_request("GET", "http://evil.example/me", ""),
        ),
        (
            "CONNECT",
            format!(
                "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\
                 Authorization: Bearer {KEY}\r\n\r\n"
            )
            .into_bytes(),
        ),
        ("raw dot-segment", raw_request("GET", "/me/../x", "")),
        ("encoded dot-segment", raw_request("GET", "/%2e%2e/x", "")),
        ("mixed dot-segment", raw_request("GET", "/.%2E/x", "")),
    ];
    for (what, request) in cases {
        let answer = common::raw_exchange(env.gw.addr, &request).await;
        assert_raw_envelope(&answer, 400, "bad_request", what);
    }
    assert_eq!(
        env.upstream_total(),
        before,
        "expected zero upstream calls for refused targets, saw {}",
        env.sim.stats()["by_route"]
    );
    // The refusal is about other hosts: the gateway's own address in absolute form is fine.
    let own = format!("http://{}/me", env.gw.addr);
    let answer = common::raw_exchange(env.gw.addr, &raw_request("GET", &own, "")).await;
    assert_eq!(
        answer.status(),
        Some(200),
        "expected the gateway's own absolute-form target served, saw {:?}",
        String::from_utf8_lossy(&answer.bytes)
    );
    env.stop().await;
}

#[tokio::test]
async fn bodies_over_max_body_bytes_get_413_with_or_without_content_length() {
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env = common::start_custom(
        SimOptions::default(),
        "max_body_bytes = \"1KiB\"",
        None,
        &clients,
        ROUTES,
    )
    .await;
    let path = "/12345/inbox/contact/twitter/abc";
    let before = env.upstream_total();

    let big = format!("note={}", "a".repeat(2048));
    let answer = env.post_form(path, &big).await;
    assert_envelope(
        &answer,
        413,
        "payload_too_large",
        "2 KiB body with Content-Length",
    );

    let chunk = "b".repeat(1024);
    let mut chunked = raw_request(
        "POST",
        path,
        "Content-Type: application/x-www-form-urlencoded\r\nTransfer-Encoding: chunked\r\n",
    );
    chunked.extend_from_slice(format!("400\r\n{chunk}\r\n400\r\n{chunk}\r\n0\r\n\r\n").as_bytes());
    let answer = common::raw_exchange(env.gw.addr, &chunked).await;
    assert_raw_envelope(&answer, 413, "payload_too_large", "2 KiB chunked body");
    assert_eq!(
        env.upstream_total(),
        before,
        "expected zero upstream calls for oversized bodies, saw {}",
        env.sim.stats()["by_route"]
    );

    // A body under the limit still goes through.
    let small = format!("note={}", "c".repeat(500));
    let answer = env.post_form(path, &small).await;
    assert_ne!(
        answer.status, 413,
        "expected a 505-byte body accepted, saw {answer:?}"
    );
    assert_eq!(
        env.upstream_total(),
        before + 1,
        "expected the small body forwarded once"
    );
    env.stop().await;
}

#[tokio::test]
async fn unknown_and_missing_keys_get_401_and_reach_nothing() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let before = env.upstream_total();
    let url = env.url("/me");
    let unknown = env
        .send(
            Method::GET,
            &url,
            &[("authorization", "Bearer not-a-key")],
            "",
        )
        .await;
    assert_envelope(&unknown, 401, "unauthorized", "unknown key");
    let missing = env.send(Method::GET, &url, &[], "").await;
    assert_envelope(&missing, 401, "unauthorized", "missing key");
    let query = env
        .send(Method::GET, &env.url("/me?access_token=not-a-key"), &[], "")
        .await;
    assert_envelope(&query, 401, "unauthorized", "unknown key in the query");
    assert_eq!(
        env.upstream_total(),
        before,
        "expected zero upstream calls without a valid key, saw {}",
        env.sim.stats()["by_route"]
    );
    env.stop().await;
}

#[tokio::test]
async fn malformed_http_is_refused_quickly_and_the_gateway_keeps_serving() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let before = env.upstream_total();
    let garbage: [&[u8]; 3] = [
        b"THIS IS NOT HTTP\x00\x01\x02\r\n\r\n",
        b"GET /me HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /me HTTP/1.1\r\nHost: x\r\nBroken header line\r\n\r\n",
    ];
    for bytes in garbage {
        let answer = common::raw_exchange(env.gw.addr, bytes).await;
        let text = String::from_utf8_lossy(&answer.bytes).into_owned();
        assert!(
            !answer.timed_out,
            "expected an answer or a close for {:?}, the connection hung (saw {text:?})",
            String::from_utf8_lossy(bytes)
        );
        let status = answer.status();
        assert!(
            answer.bytes.is_empty() || status.is_some_and(|s| (400..500).contains(&s)),
            "expected a 4xx or a closed connection for {:?}, saw {text:?}",
            String::from_utf8_lossy(bytes)
        );
    }
    assert_eq!(
        env.upstream_total(),
        before,
        "expected nothing of the garbage upstream"
    );
    let after = env.get("/me").await;
    assert_eq!(
        after.status, 200,
        "expected the gateway to serve after garbage, saw {after:?}"
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Upstream failures
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_upstream_nobody_listens_on_gets_502() {
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env =
        common::start_custom(SimOptions::default(), "", Some(&closed), &clients, ROUTES).await;
    let started = Instant::now();
    let answer = env.get("/me").await;
    assert_envelope(&answer, 502, "upstream_unreachable", "closed upstream port");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "expected a refused connect to fail fast, took {:?}",
        started.elapsed()
    );
    env.stop().await;
}

#[tokio::test]
async fn an_upstream_that_went_away_gets_502() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let ok = env.get("/me/permissions").await;
    assert_eq!(
        ok.status, 200,
        "expected 200 while the upstream is up, saw {ok:?}"
    );
    let Env { sim, gw, dir, http } = env;
    sim.shutdown().await;
    let req = Request::get(format!("http://{}/me/permissions", gw.addr))
        .header("authorization", bearer())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), http.request(req))
        .await
        .expect("gateway answered within 5 s")
        .expect("gateway request");
    let (parts, body) = resp.into_parts();
    let answer = Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    };
    assert_envelope(&answer, 502, "upstream_unreachable", "stopped upstream");
    gw.shutdown();
    gw.stopped().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_slower_than_the_timeout_gets_504() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(Faults {
        latency_ms: 3000,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let started = tokio::time::Instant::now();
    let answer = env.get("/me/permissions").await;
    let took = started.elapsed();
    assert_envelope(
        &answer,
        504,
        "upstream_timeout",
        "3 s upstream, 2 s timeout",
    );
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2900),
        "expected the answer at upstream.timeout (2 s), saw it after {took:?}"
    );
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. Overload
// ---------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn requests_beyond_max_concurrency_get_503_at_once() {
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env = common::start_custom(
        SimOptions::default(),
        "max_concurrency = 2",
        None,
        &clients,
        ROUTES,
    )
    .await;
    // One answer first, so the upstream's remaining count is known: until then one call
    // goes alone and the two slow ones could not be in flight together.
    assert_eq!(
        env.get("/me/accounts").await.status,
        StatusCode::OK,
        "warm-up read"
    );
    let warmed = env.upstream_total();
    env.sim.set_faults(Faults {
        latency_ms: 1200,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let slow_a = env.get("/me/permissions?n=1");
    let slow_b = env.get("/me/permissions?n=2");
    let third = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while env.sim.stats()["in_flight"].as_u64() != Some(2) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected two slow requests in flight upstream, saw {}",
                env.sim.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = tokio::time::Instant::now();
        let answer = env.get("/me").await;
        (answer, started.elapsed(), env.upstream_total() - warmed)
    };
    let (a, b, (over, took, upstream_then)) = tokio::join!(slow_a, slow_b, third);
    assert_envelope(&over, 503, "overloaded", "third concurrent request");
    assert!(
        took < Duration::from_millis(500),
        "expected the 503 at once, it took {took:?}"
    );
    assert_eq!(
        upstream_then, 2,
        "expected the refused request to reach nothing, saw {} upstream calls",
        upstream_then
    );
    assert_eq!(
        (a.status, b.status),
        (StatusCode::OK, StatusCode::OK),
        "expected both slow requests to finish with 200"
    );
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. HTTP/2 prior knowledge, 6. anonymous mode
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::get(env.url("/me"))
        .header("authorization", bearer())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.request(req))
        .await
        .expect("h2c answer within 5 s")
        .expect("h2c request");
    assert_eq!(
        (resp.version(), resp.status()),
        (http::Version::HTTP_2, StatusCode::OK),
        "expected an HTTP/2 200, saw {:?} {}",
        resp.version(),
        resp.status()
    );
    assert!(
        resp.headers().contains_key("x-request-id"),
        "expected X-Request-Id over h2, saw {:?}",
        resp.headers()
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let json: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(
        json["response"]["id"], 4242,
        "expected /me over h2c, saw {json}"
    );
    env.stop().await;
}

#[tokio::test]
async fn anonymous_mode_on_loopback_serves_without_a_key() {
    let env = common::start_with(SimOptions::default(), "", ROUTES).await;
    let answer = env.send(Method::GET, &env.url("/me"), &[], "").await;
    assert_eq!(
        answer.status, 200,
        "expected anonymous /me to be served, saw {answer:?}"
    );
    assert_eq!(
        answer.json()["response"]["id"],
        4242,
        "expected the /me body"
    );
    let tokens = tokens_seen(&env);
    assert_eq!(
        tokens.keys().cloned().collect::<Vec<_>>(),
        vec![cxgate::sim::token_hash(ACCESS)],
        "expected the held token upstream, saw {tokens:?}"
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// 7. Admin listener
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn admin_probes_metrics_and_status() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    for path in ["/me", "/me", "/me/permissions"] {
        let a = env.get(path).await;
        assert_eq!(a.status, 200, "expected 200 for {path}, saw {a:?}");
    }
    for probe in ["/healthz", "/readyz"] {
        let a = env.send(Method::GET, &env.admin_url(probe), &[], "").await;
        assert_eq!(a.status, 200, "expected {probe} 200, saw {a:?}");
    }

    let metrics = env.metrics().await;
    for name in [
        "cxgate_requests_total",
        "cxgate_request_duration_seconds",
        "cxgate_upstream_requests_total",
        "cxgate_upstream_duration_seconds",
        "cxgate_build_info",
        "process_resident_memory_bytes",
        "route=\"GET /me\"",
        "route=\"other\"",
    ] {
        assert!(
            metrics.contains(name),
            "expected {name} in /metrics, saw:\n{metrics}"
        );
    }
    for raw in ["route=\"/me\"", "route=\"/me/permissions\""] {
        assert!(
            !metrics.contains(raw),
            "expected no raw path label {raw} in /metrics, saw:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains(ACCESS),
        "expected no token text in /metrics"
    );

    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    assert_eq!(
        status.status, 200,
        "expected /admin/status 200, saw {status:?}"
    );
    let text = String::from_utf8_lossy(&status.body).into_owned();
    assert!(
        !text.contains(ACCESS) && !text.contains(REFRESH),
        "expected no token text in /admin/status, saw {text}"
    );
    let json = status.json();
    assert_eq!(
        json["version"],
        env!("CARGO_PKG_VERSION"),
        "expected the version in /admin/status, saw {json}"
    );
    let has_uptime = json
        .as_object()
        .is_some_and(|o| o.keys().any(|k| k.starts_with("uptime")));
    assert!(has_uptime, "expected an uptime field, saw {json}");
    for part in ["token", "budget", "cache", "upstream"] {
        assert!(
            json[part].is_object(),
            "expected an object at {part} in /admin/status, saw {json}"
        );
    }
    env.stop().await;
}

/// An upstream that answers every call with the status named by its `s` query parameter.
async fn status_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let (base, _seen, task) = common::scripted_upstream(std::sync::Arc::new(|seen| {
        let code = seen
            .target
            .split_once("?s=")
            .and_then(|(_, s)| s.parse::<u16>().ok())
            .unwrap_or(200);
        common::Reply::json(r#"{"meta":{"code":0}}"#).status(code)
    }))
    .await;
    (base, task)
}

#[tokio::test]
async fn upstream_statuses_outside_the_http_range_share_one_metric_label() {
    let (base, upstream) = status_upstream().await;
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env = common::start_custom(SimOptions::default(), "", Some(&base), &clients, "").await;
    for code in (600..640).chain([200, 404, 999]) {
        let answer = env.get(&format!("/me/permissions?s={code}")).await;
        assert!(
            answer.status.as_u16() >= 100,
            "expected an answer for upstream status {code}, saw {}",
            answer.status
        );
    }
    let text = env.metrics().await;
    // Such an answer is malformed: the upstream's call counts as `error`, the client's
    // answer as the gateway's 502.
    for (metric, label) in [
        ("cxgate_upstream_requests_total{", "error"),
        ("cxgate_requests_total{", "502"),
    ] {
        let mut labels: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with(metric))
            .filter_map(|l| l.split("status=\"").nth(1)?.split('"').next())
            .collect();
        labels.sort_unstable();
        labels.dedup();
        assert!(
            labels.contains(&label),
            "{metric}: expected statuses outside 100-599 labelled `{label}`, saw {labels:?}"
        );
        assert!(
            !labels
                .iter()
                .any(|l| l.starts_with('6') || l.starts_with('9')),
            "{metric}: expected no label of a status outside 100-599, saw {labels:?}"
        );
    }
    env.stop().await;
    upstream.abort();
}
