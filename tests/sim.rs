//! Black-box tests of the simulated CX Social API: each test starts its own simulator on
//! 127.0.0.1:0 and talks HTTP to it, as the gateway will.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cxgate::sim::{self, Faults, RateLimit, SimHandle, SimOptions};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

struct Peer {
    sim: SimHandle,
    http: Client<HttpConnector, Full<Bytes>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
    fn header(&self, name: &str) -> String {
        let value = self.headers.get(name).and_then(|v| v.to_str().ok());
        value.unwrap_or("").to_owned()
    }
}

async fn start(opts: SimOptions) -> Peer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = sim::spawn(listener, opts)
        .await
        .expect("spawn the simulator");
    let http = Client::builder(TokioExecutor::new()).build_http();
    Peer { sim, http }
}

impl Peer {
    /// `target` is a path (joined to the base) or an absolute URL.
    async fn try_send(
        &self,
        method: Method,
        target: &str,
        token: Option<&str>,
        form: Option<&str>,
    ) -> Result<Answer, String> {
        let uri = if target.starts_with("http") {
            target.to_owned()
        } else {
            format!("{}{target}", self.sim.base_url())
        };
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let body = Full::new(Bytes::from(form.unwrap_or("").to_owned()));
        let req = req.body(body).map_err(|e| e.to_string())?;
        let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            bytes,
        })
    }

    async fn send(
        &self,
        method: Method,
        target: &str,
        token: Option<&str>,
        form: Option<&str>,
    ) -> Answer {
        match self.try_send(method, target, token, form).await {
            Ok(answer) => answer,
            Err(e) => panic!("expected an answer to {target}, saw error {e}"),
        }
    }

    async fn get(&self, target: &str) -> Answer {
        self.send(Method::GET, target, Some("sim-token"), None)
            .await
    }
}

fn assert_error(answer: &Answer, status: u16, error_type: &str) {
    let body = answer.json();
    assert_eq!(
        answer.status.as_u16(),
        status,
        "expected HTTP {status}, saw {} {body}",
        answer.status
    );
    assert_eq!(
        body["meta"]["code"], status,
        "expected meta.code {status}, saw {body}"
    );
    assert_eq!(
        body["meta"]["error_type"], error_type,
        "expected {error_type}, saw {body}"
    );
}

fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[tokio::test]
async fn envelope_stable_data_and_routing() {
    let peer = start(SimOptions::default()).await;
    let me = peer.get("/me").await;
    let body = me.json();
    assert_eq!(
        me.status,
        StatusCode::OK,
        "expected 200 for /me, saw {body}"
    );
    assert_eq!(body["meta"]["code"], 200, "expected envelope, saw {body}");
    for field in ["id", "name", "email", "language", "timezone"] {
        assert!(
            !body["response"][field].is_null(),
            "expected /me.{field}, saw {body}"
        );
    }
    assert_eq!(
        peer.get("/me/").await.bytes,
        me.bytes,
        "expected /me/ to equal /me"
    );
    let accounts = peer.get("/me/accounts").await.json();
    let ids: Vec<&Value> = accounts["response"]["data"]
        .as_array()
        .map(|a| a.iter().map(|x| &x["id"]).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [&json!(12345), &json!(23456), &json!(34567)],
        "saw {accounts}"
    );
    let path = "/12345/inbox/mention/123451/12345000042";
    let (a, b) = (peer.get(path).await, peer.get(path).await);
    assert_eq!(
        a.status,
        StatusCode::OK,
        "expected the mention, saw {}",
        a.json()
    );
    assert_eq!(a.bytes, b.bytes, "expected the same mention body twice");
    assert_eq!(a.json()["response"]["unique_id"], "123451_12345000042");
    for kind in ["topics", "users", "tags", "teams"] {
        let list = peer.get(&format!("/12345/settings/{kind}")).await.json();
        assert!(
            list["response"]["count"].as_u64() > Some(0),
            "expected {kind} listed, saw {list}"
        );
    }
    assert_error(&peer.get("/12345/nothing/here").await, 404, "not_found");
    assert_error(
        &peer.get("/abc/inbox/mentions").await,
        400,
        "invalid_request",
    );
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn paging_links_are_absolute_and_carry_the_token() {
    let peer = start(SimOptions::default()).await;
    let first = peer
        .get("/12345/inbox/mentions?limit=50&topic_ids=123452")
        .await
        .json();
    let next = first["response"]["paging"]["next_url"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let prefix = format!("{}/12345/inbox/mentions?", peer.sim.base_url());
    assert!(
        next.starts_with(&prefix),
        "expected next_url under {prefix}, saw {next}"
    );
    assert!(
        next.contains("access_token=sim-token"),
        "expected the token in {next}"
    );
    assert!(
        first["response"]["paging"]["prev_url"].is_null(),
        "expected no prev on page 1"
    );
    let data = first["response"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(data.len(), 50, "expected 50 mentions");
    assert!(
        data.iter().all(|m| m["topic"]["id"] == 123452),
        "expected topic filter honoured"
    );
    // Following the link as given (token in the query, no header) reaches page 2.
    let second = peer.send(Method::GET, &next, None, None).await.json();
    let (a, b) = (&data[0]["id"], &second["response"]["data"][0]["id"]);
    assert!(
        b.is_string() && a != b,
        "expected page 2 to differ, saw {a} then {b}"
    );
    assert!(
        second["response"]["paging"]["prev_url"].is_string(),
        "expected prev on page 2"
    );
    for limit in ["0", "201", "x"] {
        assert_error(
            &peer
                .get(&format!("/12345/inbox/mentions?limit={limit}"))
                .await,
            400,
            "invalid_request",
        );
    }
    peer.sim.shutdown().await;
}

#[tokio::test]
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

#[tokio::test]
async fn rate_limit_per_lineage_with_headers() {
    let rate_limit = Some(RateLimit {
        limit: 3,
        period: Duration::from_millis(600),
    });
    let peer = start(SimOptions {
        rate_limit,
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
    assert_error(&limited, 429, "rate_limited");
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
        "rate_limited",
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
        assert_error(&forced, 429, "rate_limited");
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
    assert_error(&set(json!({"latency": 3})).await, 400, "invalid_request");
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

#[tokio::test]
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
        json!({"sim-token": 2, "other": 1}),
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

/// Polls the stats until `key` has `want` (the in-flight gauge drops when the server lets go
/// of a body, a moment after the client has read it).
async fn eventually(sim: &SimHandle, key: &str, want: u64) {
    for _ in 0..100 {
        if sim.stats()[key] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected stats.{key} == {want}, saw {}", sim.stats());
}

#[tokio::test]
async fn writes_are_visible_to_later_reads() {
    let peer = start(SimOptions::default()).await;
    let path = "/12345/inbox/mention/123452/12345000499";
    let updates = form(&[(
        "updates",
        r#"{"status":"closed","tags":["vip"],"note":"called back"}"#,
    )]);
    let posted = peer
        .send(Method::POST, path, Some("sim-token"), Some(&updates))
        .await;
    assert_eq!(
        posted.status,
        StatusCode::OK,
        "expected the update accepted, saw {}",
        posted.json()
    );
    let read = peer.get(path).await.json();
    let seen = (
        &read["response"]["status"],
        &read["response"]["tags"],
        &read["response"]["notes"],
    );
    assert_eq!(
        seen,
        (&json!("closed"), &json!(["vip"]), &json!(["called back"])),
        "saw {read}"
    );
    let listed = peer.get("/12345/inbox/mentions?limit=1").await.json();
    assert_eq!(
        listed["response"]["data"][0]["status"], "closed",
        "expected the list to show it, saw {listed}"
    );

    let contact = "/12345/inbox/contact/twitter/42";
    let crm = form(&[("email", "new@example.com")]);
    assert_eq!(
        peer.send(Method::POST, contact, Some("sim-token"), Some(&crm))
            .await
            .status,
        StatusCode::OK
    );
    let read = peer.get(contact).await.json();
    assert_eq!(
        read["response"]["crm"]["email"], "new@example.com",
        "saw {read}"
    );

    let added = peer
        .send(
            Method::POST,
            "/12345/inbox/add",
            Some("sim-token"),
            Some(&form(&[("message", "hello")])),
        )
        .await
        .json();
    let id = added["response"]["id"].as_str().unwrap_or("");
    let read = peer
        .get(&format!("/12345/inbox/mention/123451/{id}"))
        .await
        .json();
    assert_eq!(
        read["response"]["message"]["content"], "hello",
        "expected the added message, saw {read}"
    );
    let draft = peer
        .send(
            Method::POST,
            "/12345/publisher/add/",
            Some("sim-token"),
            Some(&form(&[("message", "hi")])),
        )
        .await
        .json();
    assert_eq!(
        draft["response"]["status"], "awaiting_approval",
        "saw {draft}"
    );
    assert_eq!(peer.sim.stats()["writes"], 4, "saw {}", peer.sim.stats());
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn h2c_insights_latency_and_shutdown() {
    let opts = SimOptions {
        insights_latency: Duration::from_millis(150),
        ..SimOptions::default()
    };
    let peer = start(opts).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!(
        "{}/12345/insights/mentions/volume?access_token=sim-token",
        peer.sim.base_url()
    ))
    .body(Full::new(Bytes::new()))
    .expect("request");
    let started = Instant::now();
    let resp = h2.request(req).await.expect("an h2c answer");
    assert_eq!(resp.version(), http::Version::HTTP_2, "expected HTTP/2");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "expected insights to be slow"
    );
    let addr = peer.sim.addr;
    peer.sim.shutdown().await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "expected no listener after shutdown");
}
