//! The second outside attack's findings, end to end: admin requests a browser could be made
//! to send from another site or through a rebound name, account ids in paths no route
//! matches exactly, cache counts at scrape time, `Set-Cookie2`, links in `Link` and
//! `Content-Location`, one client holding every concurrency permit, and contradictory
//! upstream rate fields.
//!
//! The upstream here is a small server of the test's own whose answers carry the headers
//! under test; the simulator still serves the token endpoint.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::TokioExecutor;

use super::common::{self, Answer, Env, ACCESS, KEY};
use cxgate::sim::SimOptions;

const LIMITED_KEY: &str = "limited-key";
const OTHER_KEY: &str = "other-key";

const ROUTES: &str = r#"
[[routes]]
match = "GET /me"
ttl = "10m"

[[routes]]
match = "GET /cookie2"
ttl = "10m"

[[routes]]
match = "GET /links"
ttl = "10m"

[[routes]]
match = "GET /v2/{account_id}/data"
ttl = "10m"
"#;

/// What the test upstream saw, and the gate that holds `/slow` answers.
#[derive(Default)]
struct Upstream {
    targets: Mutex<Vec<String>>,
    slow_in_flight: AtomicUsize,
    release: tokio::sync::Notify,
}

impl Upstream {
    fn count(&self, path: &str) -> usize {
        let seen = self.targets.lock().expect("targets");
        seen.iter()
            .filter(|t| t.split('?').next() == Some(path))
            .count()
    }

    fn saw(&self, needle: &str) -> Vec<String> {
        let seen = self.targets.lock().expect("targets");
        seen.iter()
            .filter(|t| t.contains(needle))
            .cloned()
            .collect()
    }
}

/// Starts the test upstream on a free loopback port; returns its base URL.
async fn upstream() -> (String, Arc<Upstream>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let state = Arc::new(Upstream::default());
    let (shared, own) = (state.clone(), base.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (state, base) = (shared.clone(), own.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (state, base) = (state.clone(), base.clone());
                async move { Ok::<_, std::convert::Infallible>(answer(&state, &base, req).await) }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, state)
}

async fn answer(
    state: &Upstream,
    base: &str,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let target = req.uri().to_string();
    state.targets.lock().expect("targets").push(target);
    let mut resp = Response::builder().header("content-type", "application/json");
    match req.uri().path() {
        "/cookie2" => resp = resp.header("set-cookie2", "sid=one-clients; Version=1"),
        "/links" => {
            resp = resp
                .header(
                    "link",
                    format!(
                        "<{base}/links?page=2&access_token={ACCESS}>; rel=\"next\", \
                         <{base}/links?page=0>; rel=\"prev\""
                    ),
                )
                .header("content-location", format!("{base}/links?page=1"))
        }
        "/nonsense" => {
            resp = resp
                .header("x-ratelimit-limit", "0")
                .header("x-ratelimit-remaining", "5")
        }
        "/slow" => {
            state.slow_in_flight.fetch_add(1, Ordering::SeqCst);
            let released = state.release.notified();
            let _ = tokio::time::timeout(Duration::from_secs(10), released).await;
            state.slow_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        _ => {}
    }
    resp.body(Full::new(Bytes::from_static(
        br#"{"meta":{"code":200},"response":{"id":7}}"#,
    )))
    .expect("static response")
}

async fn start(server_extra: &str) -> (Env, Arc<Upstream>) {
    let (base, up) = upstream().await;
    let clients = [
        common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml(
            "limited",
            LIMITED_KEY,
            "scopes = [\"read\", \"write\"]\naccounts = [12345]",
        ),
        common::client_toml("other", OTHER_KEY, "scopes = [\"read\"]"),
    ]
    .concat();
    let server = format!("admin_hosts = [\"gw.internal\"]\n{server_extra}");
    let env = common::start_custom(
        SimOptions::default(),
        &server,
        Some(&base),
        &clients,
        ROUTES,
    )
    .await;
    (env, up)
}

async fn get_as(env: &Env, key: &str, path: &str) -> Answer {
    let auth = format!("Bearer {key}");
    env.send(Method::GET, &env.url(path), &[("authorization", &auth)], "")
        .await
}

fn assert_envelope(a: &Answer, status: u16, what: &str) {
    assert_eq!(
        a.status.as_u16(),
        status,
        "{what}: expected {status}, saw {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let v = a.json();
    assert!(
        v["error"].is_string() && v["error_description"].is_string(),
        "{what}: expected the error envelope, saw {v}"
    );
}

// ---------------------------------------------------------------------------------------
// Admin: cross-site requests and rebound names
// ---------------------------------------------------------------------------------------

/// What is sent: a description, the headers, the body.
type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);

#[tokio::test]
async fn admin_posts_a_browser_could_send_cross_site_are_refused() {
    let (env, _up) = start("").await;
    let purge = env.admin_url("/admin/purge");
    let own_origin = format!("http://{}", env.gw.admin_addr);
    let json = ("content-type", "application/json");
    let cases: Vec<Case> = vec![
        (
            "a foreign Origin",
            vec![json, ("origin", "http://evil.example")],
            r#"{"all":true}"#,
        ),
        (
            "Origin null",
            vec![json, ("origin", "null")],
            r#"{"all":true}"#,
        ),
        (
            "Sec-Fetch-Site cross-site",
            vec![json, ("sec-fetch-site", "cross-site")],
            r#"{"all":true}"#,
        ),
        (
            "Sec-Fetch-Site same-site",
            vec![json, ("sec-fetch-site", "same-site")],
            r#"{"all":true}"#,
        ),
        (
            "a form body",
            vec![("content-type", "application/x-www-form-urlencoded")],
            r#"{"all":true}"#,
        ),
        (
            "text/plain",
            vec![("content-type", "text/plain")],
            r#"{"all":true}"#,
        ),
        ("no Content-Type", vec![], r#"{"all":true}"#),
    ];
    for (what, headers, body) in &cases {
        let a = env.send(Method::POST, &purge, headers, body).await;
        assert_envelope(&a, 403, &format!("POST /admin/purge with {what}"));
    }
    for path in ["/admin/reload", "/admin/budget/resume"] {
        let a = env
            .send(
                Method::POST,
                &env.admin_url(path),
                &[("origin", "http://evil.example")],
                "",
            )
            .await;
        assert_envelope(&a, 403, &format!("POST {path} from a foreign Origin"));
        let a = env
            .send(
                Method::POST,
                &env.admin_url(path),
                &[("content-type", "text/plain")],
                "",
            )
            .await;
        assert_envelope(&a, 403, &format!("POST {path} as text/plain"));
    }
    // What an operator's curl or the listener's own page sends still works.
    let a = env
        .send(
            Method::POST,
            &purge,
            &[
                json,
                ("origin", &own_origin),
                ("sec-fetch-site", "same-origin"),
            ],
            r#"{"all":true}"#,
        )
        .await;
    assert_eq!(
        a.status, 200,
        "expected a same-origin JSON purge to work, saw {a:?}"
    );
    let a = env
        .send(
            Method::POST,
            &env.admin_url("/admin/budget/resume"),
            &[],
            "",
        )
        .await;
    assert_eq!(
        a.status, 200,
        "expected a bare POST from curl to work, saw {a:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_reads_under_a_rebound_name_are_refused() {
    let (env, _up) = start("").await;
    let port = env.gw.admin_addr.port();
    for path in ["/metrics", "/admin/status", "/"] {
        for host in [
            format!("evil.example:{port}"),
            format!("127.0.0.1.nip.io:{port}"),
            format!("localhost.evil.example:{port}"),
            "evil.example".to_string(),
        ] {
            let a = env
                .send(Method::GET, &env.admin_url(path), &[("host", &host)], "")
                .await;
            assert_envelope(&a, 421, &format!("GET {path} with Host {host}"));
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("gw.internal:{port}"),
            format!("[::1]:{port}"),
        ] {
            let a = env
                .send(Method::GET, &env.admin_url(path), &[("host", &host)], "")
                .await;
            assert_eq!(
                a.status,
                200,
                "expected GET {path} with Host {host} served, saw {} {:?}",
                a.status,
                String::from_utf8_lossy(&a.body)
            );
        }
    }
    // Scraping by IP, as Prometheus does, and probes under any name.
    assert!(env.metrics().await.contains("cxgate_requests_total"));
    let a = env
        .send(
            Method::GET,
            &env.admin_url("/healthz"),
            &[("host", "cxgate-svc:9090")],
            "",
        )
        .await;
    assert_eq!(
        a.status, 200,
        "expected /healthz under a service name, saw {a:?}"
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Account ids wherever a route names them
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn an_account_past_the_first_segment_is_checked_whether_or_not_a_route_matches() {
    let (env, up) = start("").await;
    let auth = format!("Bearer {LIMITED_KEY}");
    let allowed = get_as(&env, LIMITED_KEY, "/v2/12345/data").await;
    assert_eq!(
        allowed.status, 200,
        "expected its own account served, saw {allowed:?}"
    );
    let allowed = get_as(&env, LIMITED_KEY, "/V2/12345/Data").await;
    assert_eq!(
        allowed.status, 200,
        "expected its own account in any case, saw {allowed:?}"
    );
    for path in [
        "/v2/999/data",
        "/V2/999/data",
        "/v2/999/data;x",
        "/v2/999/data%20",
        "/v2/999/Data",
        "/v2/999/data/x",
        "/v2/999",
        "/v2;x/999/data",
        "/v2%20/999/data",
    ] {
        let a = get_as(&env, LIMITED_KEY, path).await;
        assert!(
            a.status == 403 || a.status == 400,
            "GET {path}: expected 403 (or 400), saw {} {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        assert_envelope(&a, a.status.as_u16(), &format!("GET {path}"));
    }
    for method in [Method::PUT, Method::POST, Method::DELETE] {
        let a = env
            .send(
                method.clone(),
                &env.url("/v2/999/data"),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                "{}",
            )
            .await;
        assert_envelope(&a, 403, &format!("{method} /v2/999/data"));
    }
    let leaked = up.saw("999");
    assert!(
        leaked.is_empty(),
        "expected nothing for account 999 upstream, saw {leaked:?}"
    );
    // A client without an account list still reaches every account.
    let a = get_as(&env, KEY, "/V2/999/data").await;
    assert_eq!(
        a.status, 200,
        "expected an unrestricted client served, saw {a:?}"
    );
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// Cache counts, cookies, links
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn cache_counts_are_true_right_after_a_store() {
    let (env, _up) = start("").await;
    let a = env.get("/me").await;
    assert_eq!(a.status, 200, "expected /me, saw {a:?}");
    let metrics = env.metrics().await;
    assert!(
        metrics.lines().any(|l| l == "cxgate_cache_entries 1"),
        "expected cxgate_cache_entries 1 at once, saw {:?}",
        metrics
            .lines()
            .filter(|l| l.starts_with("cxgate_cache_"))
            .collect::<Vec<_>>()
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await
        .json();
    assert_eq!(
        status["cache"]["entries"], 1,
        "expected /admin/status to count the entry, saw {}",
        status["cache"]
    );
    assert!(
        status["cache"]["bytes"].as_u64().is_some_and(|b| b > 0),
        "expected cache bytes above 0, saw {}",
        status["cache"]
    );
    env.stop().await;
}

#[tokio::test]
async fn answers_setting_a_cookie2_are_never_stored() {
    let (env, up) = start("").await;
    for _ in 0..2 {
        let a = env.get("/cookie2").await;
        assert_eq!(a.status, 200, "expected /cookie2, saw {a:?}");
        assert!(
            !a.header("cache-status").contains("hit"),
            "expected no hit for a cookie-setting answer, saw {:?}",
            a.header("cache-status")
        );
    }
    let other = get_as(&env, OTHER_KEY, "/cookie2").await;
    assert_eq!(other.status, 200);
    assert_eq!(
        up.count("/cookie2"),
        3,
        "expected every request for a Set-Cookie2 answer to go upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn link_and_content_location_point_at_the_gateway() {
    let (env, _up) = start("").await;
    let public = env.url("");
    for round in ["miss", "hit"] {
        let a = env.get("/links").await;
        assert_eq!(a.status, 200, "{round}: expected /links, saw {a:?}");
        assert_eq!(
            a.header("link"),
            format!("<{public}/links?page=2>; rel=\"next\", <{public}/links?page=0>; rel=\"prev\""),
            "{round}: expected Link moved to the gateway, without the access token"
        );
        assert_eq!(
            a.header("content-location"),
            format!("{public}/links?page=1"),
            "{round}: expected Content-Location moved to the gateway"
        );
    }
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// One client with every permit; nonsense limits
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn hits_are_served_while_one_client_holds_every_permit() {
    let (env, up) = start("max_concurrency = 2").await;
    let warm = get_as(&env, OTHER_KEY, "/me").await;
    assert_eq!(warm.status, 200, "expected /me warmed, saw {warm:?}");
    let slow = async {
        let (a, b) = tokio::join!(
            get_as(&env, KEY, "/slow?n=1"),
            get_as(&env, KEY, "/slow?n=2")
        );
        (a.status, b.status)
    };
    let others = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while up.slow_in_flight.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "expected two slow calls upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let hit = get_as(&env, OTHER_KEY, "/me").await;
        let miss = get_as(&env, KEY, "/slow?n=3").await;
        up.release.notify_waiters();
        (hit, miss)
    };
    let (held, (hit, miss)) = tokio::join!(slow, others);
    assert_eq!(
        hit.status,
        200,
        "expected another client's cache hit served while every permit is held, saw {} {:?}",
        hit.status,
        String::from_utf8_lossy(&hit.body)
    );
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected a hit, saw {:?}",
        hit.header("cache-status")
    );
    assert_envelope(&miss, 503, "a third call upstream beyond max_concurrency");
    assert_eq!(
        held,
        (StatusCode::OK, StatusCode::OK),
        "expected both slow calls to finish"
    );
    env.stop().await;
}

#[tokio::test]
async fn contradictory_upstream_limits_are_neither_obeyed_nor_shown() {
    let (env, _up) = start("").await;
    let mut seen = HashMap::new();
    for path in ["/nonsense", "/nonsense?again=1", "/me"] {
        let a = env.get(path).await;
        assert_eq!(a.status, 200, "expected {path} served, saw {a:?}");
        let limit: u64 = a.header("x-ratelimit-limit").parse().unwrap_or(0);
        let remaining: u64 = a
            .header("x-ratelimit-remaining")
            .parse()
            .unwrap_or(u64::MAX);
        assert!(
            limit >= 1 && remaining <= limit,
            "{path}: expected a limit of at least 1 and no more remaining than it, saw \
             limit {limit} remaining {remaining}"
        );
        seen.insert(path, (limit, remaining));
    }
    env.stop().await;
}
