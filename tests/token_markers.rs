//! The shared token's spent and refused markers, planted by an outside tester with write
//! access to the replicas' Redis (and a refused refresh token's fallback): two real
//! replicas in this process, or the real binary, and their own `redis-server` on a free
//! loopback port (stopped by its process id). A marker about a refresh token a replica
//! proved itself, set by no replica it knows, is put to the test by one refresh instead of
//! believed, and counted as the repair it is; one from a listed replica is believed, and
//! deleting it recovers; a refused refresh token's fallback answers the request that found
//! it, and no "re-authorisation needed" is said while a fallback works. Without
//! `redis-server` on PATH the tests skip loudly, except under `CI=true`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use common::replicas::{start_replicas, Replicas, Setup};
use common::{ACCESS, KEY, REFRESH};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Two replicas in front of one simulator and one Redis, from the same token file.
async fn pair() -> Option<Replicas> {
    start_replicas(Setup {
        workers: false,
        prefix: "cxm",
        dir: "markers",
        ..Setup::new(2)
    })
    .await
}

async fn send(p: &Replicas, url: String) -> (StatusCode, String) {
    let req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), p.http.request(req))
        .await
        .expect("expected an answer within 10 s")
        .expect("expected the replica to answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One uncached call through replica `i`: its status and body.
async fn serves(p: &Replicas, i: usize, tag: &str) -> (StatusCode, String) {
    let url = format!(
        "http://{}/12345/inbox/contact/twitter/{tag}",
        p.replicas[i].addr
    );
    send(p, url).await
}

async fn admin(p: &Replicas, i: usize, path: &str) -> (StatusCode, String) {
    send(p, format!("http://{}{path}", p.replicas[i].admin_addr)).await
}

/// The value of the series `series` (name and labels exactly) on replica `i`.
async fn metric(p: &Replicas, i: usize, series: &str) -> Option<f64> {
    let (_, text) = admin(p, i, "/metrics").await;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn reused(p: &Replicas) -> u64 {
    p.sim.stats()["refresh_reuse_rejected"]
        .as_u64()
        .unwrap_or(0)
}

fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn set(p: &Replicas, key: &str, value: &str) {
    let mut redis = p.conn().await;
    let () = redis::cmd("SET")
        .arg(p.key(key))
        .arg(value)
        .query_async(&mut redis)
        .await
        .expect("plant a marker");
}

/// Waits until a token record is stored and both replicas are listed as listening.
async fn settled(p: &Replicas) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut redis = p.conn().await;
        let record: Option<String> = redis::cmd("GET")
            .arg(p.key("token"))
            .query_async(&mut redis)
            .await
            .expect("read the record");
        let listed: Option<String> = redis::cmd("GET")
            .arg(p.key("replicas"))
            .query_async(&mut redis)
            .await
            .expect("read the registry");
        let ids: Vec<String> = listed
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').next().map(str::to_string))
            .collect();
        if record.is_some() && ids.len() == 2 {
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "expected a token record and both replicas listed (setup)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The outside tester's M3: `token:spent:<sha256 of the refresh token>` and
/// `token:refused` planted for the refresh token both replicas hold from their token files
/// (proven: no replica spent it, the endpoint refused it to none). With every access token
/// revoked, the next request must refresh: the replica tries the refresh token once under
/// the refresh lock instead of believing markers no replica it knows set, the endpoint
/// takes it, the request is served, and each marker counts as a repair. Before, the
/// replica went to re-authorisation (503) on the markers alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_markers_for_a_proven_refresh_token_are_tried_not_believed() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    settled(&p).await;
    let digest = sha256_hex(REFRESH);
    set(&p, &format!("token:spent:{digest}"), "1").await;
    set(&p, "token:refused", &digest).await;
    p.sim.revoke_all();
    let (status, body) = serves(&p, 0, "after-markers").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "expected the request served after one refresh with the proven refresh token, saw \
         {body}"
    );
    assert_eq!(admin(&p, 0, "/readyz").await.0, StatusCode::OK);
    for key in ["token:spent", "token:refused"] {
        let series = format!("cxgate_redis_repairs_total{{key=\"{key}\"}}");
        assert_eq!(
            metric(&p, 0, &series).await,
            Some(1.0),
            "expected the disproved marker counted in {series}"
        );
    }
    // The other replica held the same refresh token, now spent by replica 0 (whose own
    // marker says so): it takes replica 0's token rather than presenting it again.
    assert_eq!(serves(&p, 1, "other").await.0, StatusCode::OK);
    assert_eq!(reused(&p), 0, "expected no refresh token presented twice");
    p.stop().await;
}

/// A spent marker whose value names a listed replica is believed (presenting a rotated
/// refresh token again would be a reuse): the replica needs re-authorisation and says so,
/// and never presents the token, not even alone while Redis is away and the marker cannot
/// be looked at. Deleting the marker recovers: the next request refreshes and is served.
/// Before, the replica stayed at 503 until `cxgate token init`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_from_a_listed_replica_is_believed_and_deleting_it_recovers() {
    let _one = SERIAL.lock().await;
    let Some(mut p) = pair().await else {
        return;
    };
    let ids = settled(&p).await;
    let key = format!("token:spent:{}", sha256_hex(REFRESH));
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis();
    set(&p, &key, &format!("{} {ms}", ids[0])).await;
    p.sim.revoke_all();
    let refreshes = p.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
    let (status, _) = serves(&p, 0, "believed").await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "expected a marker from a listed replica believed (setup)"
    );
    assert_eq!(
        p.sim.stats()["token_refreshes"].as_u64().unwrap_or(0),
        refreshes,
        "expected the refresh token a listed replica marked spent never presented"
    );
    // Redis away: the marker cannot be looked at, and the token is not presented alone.
    p.redis.stop();
    let up = "cxgate_redis_up";
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&p, 0, up).await != Some(0.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        serves(&p, 0, "away").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        p.sim.stats()["token_refreshes"].as_u64().unwrap_or(0),
        refreshes,
        "expected the marked refresh token not presented while Redis is away"
    );
    p.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    while metric(&p, 0, up).await != Some(1.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut redis = p.conn().await;
    let _: i64 = redis::cmd("DEL")
        .arg(p.key(&key))
        .query_async(&mut redis)
        .await
        .expect("delete the marker");
    // Past the one-second reuse of a failed refresh.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, body) = serves(&p, 0, "deleted").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "expected deleting the marker to recover, saw {body}"
    );
    assert_eq!(reused(&p), 0, "expected no refresh token presented twice");
    p.stop().await;
}

/// A token the upstream accepts as well as [`ACCESS`], with a refresh token the token
/// endpoint does not know: the planted record of the M5 test.
const PLANTED: &str = "planted-access-0001";
const BOGUS_REFRESH: &str = "bogus-refresh-planted";

/// The outside tester's M5, on the real binary and its own Redis: a planted record whose
/// access token the upstream takes and whose refresh token is bogus is adopted; then every
/// access token is revoked. The next request refreshes with the bogus refresh token, is
/// refused (`invalid_grant`), and falls back to the refresh token the replica proved: that
/// request itself must be answered (it waits for the fallback), and since the fallback
/// works, "re-authorisation needed" is never said. Before, the request got a 503 (the
/// fallback put back an access token without refreshing, which the upstream refused too),
/// the replica recovered a second later, and an ERROR said re-authorisation was needed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_shared_refresh_token_falls_back_within_the_request_and_says_no_reauthorisation() {
    let _one = SERIAL.lock().await;
    let Some(redis) = cxgate_testkit::redis::RedisServer::start_or_skip("the fallback test") else {
        return;
    };
    std::env::set_var(common::SECRET_ENV, common::CLIENT_SECRET);
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    let sim = common::spawn_sim(cxgate::sim::SimOptions {
        access_tokens: vec![ACCESS.to_string(), PLANTED.to_string()],
        refresh_tokens: vec![REFRESH.to_string(), "planted-refresh-0001".to_string()],
        client_secret: common::CLIENT_SECRET.to_string(),
        ..cxgate::sim::SimOptions::default()
    })
    .await;
    let base = sim.base_url();
    let dir = common::temp_dir("fallback-request");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3600))
        .expect("token file");
    let (port, admin_port) = (common::free_port(), common::free_port());
    let prefix = format!("cxf{:08x}", fastrand::u32(..));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         [upstream]\nbase_url = \"{base}\"\n\
         [token]\nfile = \"{}\"\n\
         [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{}\"\n\
         [budget]\nlimit = 100000\nperiod = \"1s\"\nburst = 10000\nbackend = \"redis\"\nredis_url_env = \"{url_env}\"\nkey_prefix = \"{prefix}\"\n\
         {}\n{}\n",
        token_file.display(),
        common::SECRET_ENV,
        common::client_toml("test", KEY, "scopes = [\"read\"]"),
        common::ROUTES,
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, config).expect("write config");
    let proc = common::Proc::spawn(&["run", "--config", path.to_str().expect("utf-8")], &dir);
    let mut conn = common::replicas::redis_options(&redis)
        .open(&redis.url())
        .await
        .expect("connect to the test redis-server");
    let key = format!("{{{prefix}}}:token");
    let deadline = Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let text: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("read the record");
        if let Some(text) = text {
            break serde_json::from_str::<serde_json::Value>(&text).expect("record JSON");
        }
        assert!(
            Instant::now() < deadline,
            "expected the gateway to store its token record:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut token = serde_json::json!({"access_token": PLANTED, "refresh_token": BOGUS_REFRESH,
                                       "expires_at": "2098-01-01T00:00:00Z"});
    if !stored["token"]["initialised_at"].is_null() {
        token["initialised_at"] = stored["token"]["initialised_at"].clone();
    }
    let version = stored["version"].as_u64().expect("version");
    let record = serde_json::json!({"version": version + 1, "by": "tamper", "token": token});
    let () = redis::cmd("SET")
        .arg(&key)
        .arg(record.to_string())
        .query_async(&mut conn)
        .await
        .expect("plant the record");
    let adopted = || {
        std::fs::read_to_string(&token_file)
            .unwrap_or_default()
            .contains(PLANTED)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !adopted() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        adopted(),
        "expected the planted record adopted (setup):\n{}",
        proc.output()
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let get = |tag: &str| {
        let req = Request::get(format!(
            "http://127.0.0.1:{port}/12345/inbox/contact/twitter/{tag}"
        ))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
        let client = client.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
                .await
                .expect("an answer within 10 s")
                .expect("an answer");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    assert_eq!(
        get("planted").await.0,
        StatusCode::OK,
        "setup: planted token taken"
    );
    sim.revoke_all();
    let (status, body) = get("revoked").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "expected the request that found the bogus refresh token answered after the \
         fallback, saw {body}:\n{}",
        proc.output()
    );
    let log = proc.output();
    assert!(
        !log.contains("re-authorisation needed"),
        "expected no \"re-authorisation needed\" while the fallback works:\n{log}"
    );
    drop(proc);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
