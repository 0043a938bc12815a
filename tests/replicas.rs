//! Several gateway replicas sharing one Redis (CONTRACT 6): one budget, one token, and
//! invalidations that reach every replica; and what happens when Redis goes away.
//!
//! Each test starts its own `redis-server` on a free loopback port (nothing saved to disk)
//! and stops it by its process id, never the machine's own Redis. Without `redis-server`
//! on PATH the tests skip with a loud message, except under `CI=true`, where they fail.
//! The tests take a lock so they run one at a time: the budget figures are timing figures,
//! and two cores shared by three replicas per test are enough contention already.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use common::redis_server::RedisServer;
use common::{client_toml, Answer, ACCESS, CLIENT_SECRET, KEY, REFRESH, ROUTES, SECRET_ENV};
use cxgate::sim::{SimHandle, SimOptions};
use cxgate::Running;

/// One test at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A direct connection to the test Redis, to look at what the replicas stored.
async fn conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to the test redis-server")
}

/// A simulator, a Redis and `n` replicas in front of both.
struct Cluster {
    sim: SimHandle,
    redis: RedisServer,
    replicas: Vec<Running>,
    dirs: Vec<PathBuf>,
    prefix: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// Starts the cluster; `budget` holds the `[budget]` lines other than the backend ones.
async fn cluster(n: usize, mut sim: SimOptions, budget: &str) -> Option<Cluster> {
    let redis = RedisServer::start_or_skip("the replica tests")?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    sim.access_tokens = vec![ACCESS.to_string()];
    sim.refresh_tokens = vec![REFRESH.to_string()];
    sim.client_secret = CLIENT_SECRET.to_string();
    let ttl = sim.token_ttl;
    let sim = common::spawn_sim(sim).await;
    let base = sim.base_url();
    let prefix = format!("cxt{:08x}", fastrand::u32(..));
    let clients = client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let dir = common::temp_dir(&format!("replica-{i}"));
        // Every replica starts from a copy of the same token file, as an operator would.
        let token_file = dir.join("token.json");
        cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, ttl).expect("token file");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"1s\"\n\
             [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
             [token]\nfile = \"{}\"\nrefresh_before = \"1s\"\n\
             [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
             [budget]\n{budget}\nbackend = \"redis\"\nredis_url_env = \"{url_env}\"\nkey_prefix = \"{prefix}\"\nreplicas = {n}\n\
             {clients}\n{ROUTES}\n",
            token_file.display()
        );
        let path = dir.join("cxgate.toml");
        std::fs::write(&path, &text).expect("write config");
        let cfg = cxgate::config::load(&path)
            .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}\n{text}", e.lines()));
        replicas.push(
            cxgate::start(cfg, Some(path))
                .await
                .expect("replica starts"),
        );
        dirs.push(dir);
    }
    Some(Cluster {
        sim,
        redis,
        replicas,
        dirs,
        prefix,
        http: Client::builder(TokioExecutor::new()).build_http(),
    })
}

impl Cluster {
    async fn send(&self, method: Method, url: String, body: &str) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .expect("expected an answer within 10 s")
            .expect("expected the replica to answer");
        let (parts, body) = resp.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.expect("body").to_bytes(),
        }
    }

    async fn get(&self, replica: usize, path: &str) -> Answer {
        let url = format!("http://{}{path}", self.replicas[replica].addr);
        self.send(Method::GET, url, "").await
    }

    async fn post(&self, replica: usize, path: &str, body: &str) -> Answer {
        let url = format!("http://{}{path}", self.replicas[replica].addr);
        self.send(Method::POST, url, body).await
    }

    async fn admin(&self, replica: usize, method: Method, path: &str, body: &str) -> Answer {
        let url = format!("http://{}{path}", self.replicas[replica].admin_addr);
        self.send(method, url, body).await
    }

    /// A metric's value on one replica (first sample whose line starts with `name`).
    async fn metric(&self, replica: usize, name: &str) -> Option<f64> {
        let text = self.admin(replica, Method::GET, "/metrics", "").await;
        String::from_utf8_lossy(&text.body)
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    fn upstream_total(&self) -> u64 {
        self.sim.stats()["requests_total"].as_u64().unwrap_or(0)
    }

    async fn stop(self) {
        for r in &self.replicas {
            r.shutdown();
        }
        for r in self.replicas {
            r.stopped().await;
        }
        self.sim.shutdown().await;
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        drop(self.redis);
    }
}

/// Three replicas under concurrent load spend one budget: the upstream sees at most what
/// the budget allows over the run, and no less than 98 % of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget() {
    let _one = SERIAL.lock().await;
    let (limit, period_s, burst) = (200u32, 10u64, 20u32);
    let budget =
        format!("limit = {limit}\nperiod = \"{period_s}s\"\nburst = {burst}\nmax_wait = \"1s\"");
    let Some(c) = cluster(3, SimOptions::default(), &budget).await else {
        return;
    };
    let c = Arc::new(c);
    let before = c.upstream_total();
    let run = Duration::from_secs(8);
    let tick = Duration::from_millis(15);
    let started = Instant::now();
    let mut drivers = tokio::task::JoinSet::new();
    // Four senders per replica, each firing a distinct uncached read every tick without
    // waiting for earlier answers: about 800 requests/s offered against a budget of 20/s.
    for sender in 0..12usize {
        let c = c.clone();
        drivers.spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(tick);
            let mut i = 0u64;
            while started.elapsed() < run {
                every.tick().await;
                let c = c.clone();
                let path = format!("/12345/inbox/contact/load{sender}/{i}");
                requests.spawn(async move { c.get(sender % 3, &path).await.status });
                i += 1;
            }
            let mut seen = (0u64, 0u64, 0u64);
            while let Some(status) = requests.join_next().await {
                match status.expect("request task") {
                    StatusCode::OK => seen.0 += 1,
                    StatusCode::TOO_MANY_REQUESTS => seen.1 += 1,
                    _ => seen.2 += 1,
                }
            }
            seen
        });
    }
    let (mut ok, mut refused, mut other) = (0, 0, 0);
    while let Some(seen) = drivers.join_next().await {
        let seen = seen.expect("driver task");
        ok += seen.0;
        refused += seen.1;
        other += seen.2;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = c.upstream_total() - before;
    let allowance = f64::from(burst) + f64::from(limit) / period_s as f64 * elapsed;
    let accuracy = calls as f64 / allowance;
    println!(
        "three replicas, shared budget {limit}/{period_s}s burst {burst}: {calls} upstream calls \
         in {elapsed:.2} s vs allowance {allowance:.1} (accuracy {:.2} %); answered 200: {ok}, \
         429: {refused}, other: {other}",
        accuracy * 100.0
    );
    let up: Vec<Option<f64>> = futures_all(&c, "cxgate_redis_up").await;
    assert!(
        up.iter().all(|v| *v == Some(1.0)),
        "expected cxgate_redis_up 1 on every replica, saw {up:?}"
    );
    assert_eq!(other, 0, "expected only 200 and 429 answers");
    assert_eq!(
        calls, ok,
        "expected every upstream call to answer one 200, saw {calls} calls and {ok} 200s"
    );
    // One cell of slack: the allowance is continuous, the calls are whole.
    assert!(
        calls as f64 <= allowance + 1.0,
        "expected at most {allowance:.1} upstream calls, saw {calls}"
    );
    assert!(
        accuracy >= 0.98,
        "expected at least 98 % of the allowance {allowance:.1} used, saw {calls}"
    );
    match Arc::try_unwrap(c) {
        Ok(c) => c.stop().await,
        Err(_) => panic!("every driver has ended, so nothing else holds the cluster"),
    }
}

async fn futures_all(c: &Cluster, metric: &str) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for i in 0..c.replicas.len() {
        out.push(c.metric(i, metric).await);
    }
    out
}

/// Three replicas with 3-second tokens that rotate their refresh token on every use, for
/// 20 seconds of traffic: every request succeeds, no refresh token is ever presented twice,
/// and every replica ends on the token Redis holds, in memory and in its own file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_tokens_are_refreshed_once_per_expiry() {
    let _one = SERIAL.lock().await;
    let sim = SimOptions {
        token_ttl: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(3, sim, budget).await else {
        return;
    };
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(20) {
        let replica = (i % 3) as usize;
        let a = c
            .get(replica, &format!("/12345/inbox/contact/rot/{i}"))
            .await;
        *statuses.entry(a.status.as_u16()).or_insert(0u64) += 1;
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = c.sim.stats();
    let refreshes = stats["token_refreshes"].as_u64().unwrap_or(0);
    let reused = stats["refresh_reuse_rejected"].as_u64().unwrap_or(0);
    let mut ok_by_replica = Vec::new();
    let mut errors = 0.0;
    for r in 0..3 {
        let text = c.admin(r, Method::GET, "/metrics", "").await;
        let text = String::from_utf8_lossy(&text.body).into_owned();
        let value = |needle: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(needle))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        };
        ok_by_replica.push(value("cxgate_token_refreshes_total{result=\"ok\"}"));
        errors += value("cxgate_token_refreshes_total{result=\"error\"}");
    }
    println!(
        "20 s of 3-second rotating tokens on three replicas: {refreshes} refreshes at the \
         endpoint (per replica {ok_by_replica:?}), {reused} refused reuses, answers {statuses:?}"
    );
    assert_eq!(reused, 0, "expected no refresh token presented twice");
    assert_eq!(errors, 0.0, "expected no failed refresh on any replica");
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "expected every request answered 200, saw {statuses:?}"
    );
    // Each token is refreshed between one and two seconds into its three-second life
    // (`refresh_before = 1s`; the file's expiry is whole seconds), so 20 s need 10 to 20.
    assert!(
        (9..=21).contains(&refreshes),
        "expected one refresh per token lifetime (10 to 20 in 20 s), saw {refreshes}"
    );
    let total_ok: f64 = ok_by_replica.iter().sum();
    assert_eq!(
        total_ok, refreshes as f64,
        "expected every endpoint refresh made by exactly one replica, saw {ok_by_replica:?} for {refreshes}"
    );

    // Every replica ends on the token Redis holds, in its own file too (allowing a
    // refresh that is in flight right now to land).
    let mut redis = conn(&c.redis).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let record: Option<String> = redis::cmd("GET")
            .arg(format!("{}:token", c.prefix))
            .query_async(&mut redis)
            .await
            .expect("read the token record");
        let record: serde_json::Value =
            serde_json::from_str(&record.expect("expected a shared token record"))
                .expect("record is JSON");
        let shared = record["token"]["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let files: Vec<String> = c
            .dirs
            .iter()
            .map(|d| {
                let text = std::fs::read_to_string(d.join("token.json")).expect("token file");
                let v: serde_json::Value = serde_json::from_str(&text).expect("token file JSON");
                v["access_token"].as_str().unwrap_or_default().to_string()
            })
            .collect();
        if files.iter().all(|f| *f == shared) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected every token file to hold the shared token (version {}), saw {} of 3 matching",
            record["version"],
            files.iter().filter(|f| **f == shared).count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}

/// A purge on one replica, and a write through another, reach every replica's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_invalidations_reach_every_replica() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(3, SimOptions::default(), budget).await else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/42";
    for r in 0..3 {
        for path in ["/me", contact] {
            let first = c.get(r, path).await;
            assert_eq!(first.status, StatusCode::OK, "expected 200 for {path}");
            let again = c.get(r, path).await;
            assert!(
                again.header("cache-status").contains("hit"),
                "expected replica {r} to hold {path}, saw {:?}",
                again.header("cache-status")
            );
        }
    }
    let purged = c
        .admin(0, Method::POST, "/admin/purge", r#"{"tags":["me"]}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    let written = c.post(1, contact, "note=hello").await;
    assert!(
        written.status.is_success(),
        "expected the write to succeed, saw {}",
        written.status
    );
    for r in 0..3 {
        for path in ["/me", contact] {
            let status = eventually_miss(&c, r, path).await;
            assert!(
                status.contains("fwd=uri-miss"),
                "expected replica {r} to have dropped {path} within 1 s, saw {status:?}"
            );
        }
    }
    c.stop().await;
}

/// Polls a path on a replica until it is not a hit (at most 1 s); returns the last status.
async fn eventually_miss(c: &Cluster, replica: usize, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let a = c.get(replica, path).await;
        let status = a.header("cache-status").to_string();
        if !status.contains("hit") || Instant::now() >= deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Redis killed under load: every replica keeps answering (no request fails), says so in
/// `cxgate_redis_up`, and goes back to the shared budget and channel when Redis returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_answering_without_redis_and_recover() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 3000\nperiod = \"10s\"\nburst = 300\nmax_wait = \"1s\"";
    let Some(c) = cluster(3, SimOptions::default(), budget).await else {
        return;
    };
    let c = Arc::new(tokio::sync::RwLock::new(c));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for sender in 0..3usize {
        let (c, stop) = (c.clone(), stop.clone());
        load.spawn(async move {
            let mut statuses = std::collections::BTreeMap::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let path = format!("/12345/inbox/contact/outage{sender}/{i}");
                let status = c.read().await.get(sender, &path).await.status.as_u16();
                *statuses.entry(status).or_insert(0u64) += 1;
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            statuses
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.write().await.redis.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down: Vec<Option<f64>> = futures_all(&*c.read().await, "cxgate_redis_up").await;
    // A purge while Redis is away is queued, and reaches the others once it is back.
    {
        let c = c.read().await;
        for r in 0..3 {
            assert_eq!(c.get(r, "/me").await.status, StatusCode::OK, "expected /me");
        }
        let purged = c
            .admin(0, Method::POST, "/admin/purge", r#"{"path":"/me"}"#)
            .await;
        assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.write().await.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut up = Vec::new();
    while Instant::now() < deadline {
        up = futures_all(&*c.read().await, "cxgate_redis_up").await;
        if up.iter().all(|v| *v == Some(1.0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(seen) = load.join_next().await {
        for (status, n) in seen.expect("load task") {
            *statuses.entry(status).or_insert(0) += n;
        }
    }
    println!("answers across the outage: {statuses:?}; redis_up while down {down:?}, after {up:?}");
    assert!(
        down.iter().all(|v| *v == Some(0.0)),
        "expected cxgate_redis_up 0 on every replica while Redis is down, saw {down:?}"
    );
    assert!(
        up.iter().all(|v| *v == Some(1.0)),
        "expected cxgate_redis_up 1 on every replica within 4 s of Redis returning, saw {up:?}"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "expected every request answered 200 across the outage, saw {statuses:?}"
    );
    let c = match Arc::try_unwrap(c) {
        Ok(c) => c.into_inner(),
        Err(_) => panic!("every load task has ended, so nothing else holds the cluster"),
    };
    // Back on the shared budget: an admission writes the global key again.
    let mut redis = conn(&c.redis).await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:budget:global", c.prefix))
        .query_async(&mut redis)
        .await
        .expect("clear the budget key");
    assert_eq!(
        c.get(1, "/12345/inbox/contact/after/1").await.status,
        StatusCode::OK,
        "expected an answer after recovery"
    );
    let key: Option<String> = redis::cmd("GET")
        .arg(format!("{}:budget:global", c.prefix))
        .query_async(&mut redis)
        .await
        .expect("read the budget key");
    assert!(
        key.is_some(),
        "expected the admission after recovery to book on the shared budget"
    );
    // The purge made while Redis was away reached the other replicas once it returned
    // (queued and sent, or by the full drop that follows a lost subscription).
    for r in 1..3 {
        let status = eventually_miss(&c, r, "/me").await;
        assert!(
            status.contains("fwd=uri-miss"),
            "expected replica {r} to have dropped /me after recovery, saw {status:?}"
        );
    }
    c.stop().await;
}

/// `budget.backend = "redis"` is accepted with a URL variable, and refused without one
/// (naming the key), as is a key prefix that would split the deployment's keys.
#[test]
fn redis_backend_config_is_checked() {
    let base =
        "[upstream]\nbase_url = \"https://api.engagor.com\"\n[token]\naccess_token_env = \"X\"\n";
    let good = format!(
        "{base}[budget]\nbackend = \"redis\"\nredis_url_env = \"CXGATE_REDIS_URL\"\nreplicas = 3\n"
    );
    let cfg = cxgate::config::parse(&good)
        .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}", e.lines()));
    assert_eq!(
        (
            cfg.budget.backend,
            cfg.budget.replicas.get(),
            cfg.budget.key_prefix.as_str()
        ),
        (cxgate::config::Backend::Redis, 3, "cxgate"),
        "expected the redis backend, 3 replicas and the default prefix"
    );
    let lines = |text: String| match cxgate::config::parse(&text) {
        Ok(_) => Vec::new(),
        Err(e) => e.lines(),
    };
    let missing = lines(format!("{base}[budget]\nbackend = \"redis\"\n"));
    assert!(
        missing.len() == 1
            && missing[0].starts_with("budget.backend:")
            && missing[0].contains("redis_url_env"),
        "expected one problem naming budget.backend and redis_url_env, saw {missing:?}"
    );
    let spaced = lines(format!(
        "{base}[budget]\nbackend = \"redis\"\nredis_url_env = \"U\"\nkey_prefix = \"a b\"\n"
    ));
    assert!(
        spaced.len() == 1 && spaced[0].starts_with("budget.key_prefix:"),
        "expected one problem naming budget.key_prefix, saw {spaced:?}"
    );
}

/// An upstream 429 seen by one replica pauses all of them (CONTRACT 3.5, shared through
/// Redis): the others answer 429 with Retry-After and send the upstream nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_429_on_one_replica_pauses_them_all() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"0s\"";
    let Some(c) = cluster(3, SimOptions::default(), budget).await else {
        return;
    };
    c.sim.set_faults(cxgate::sim::Faults {
        force_429: Some(cxgate::sim::Force429 {
            count: 1,
            retry_after: 5,
        }),
        ..cxgate::sim::Faults::default()
    });
    let first = c.get(0, "/12345/inbox/contact/twitter/1").await;
    assert_eq!(
        first.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the upstream's forced 429 through replica 0, saw {}",
        first.status
    );
    let before = c.upstream_total();
    for replica in 1..3 {
        let path = format!("/12345/inbox/contact/twitter/{}", 10 + replica);
        let answer = c.get(replica, &path).await;
        let retry_after: u64 = answer
            .headers
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert!(
            answer.status == StatusCode::TOO_MANY_REQUESTS && (1..=5).contains(&retry_after),
            "replica {replica}: expected 429 with Retry-After 1..=5 while the upstream pause \
             holds, saw {} with Retry-After {retry_after}",
            answer.status
        );
    }
    assert_eq!(
        c.upstream_total(),
        before,
        "expected nothing sent upstream by the paused replicas"
    );
    c.stop().await;
}
