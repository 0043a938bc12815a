//! A refused refresh token's fallback, on the real binary and its own `redis-server` on a
//! free loopback port (stopped by its process id): the request that found the refusal is
//! answered by the fallback, and no "re-authorisation needed" is said while a fallback
//! works. Without `redis-server` on PATH the test skips loudly, except under `CI=true`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use common::{ACCESS, KEY, REFRESH};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
