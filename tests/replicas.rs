//! Several gateway replicas sharing one Redis: one budget, one token, and
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
use tokio::time::Instant;

use common::redis_server::{Kind, RedisServer};
use common::replicas::{start_replicas, Replicas, Setup};
use common::{client_toml, Answer, ACCESS, KEY, REFRESH, ROUTES};
use cxgate::sim::SimOptions;

/// One test at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A direct connection to the test Redis (TLS, ACL user or cluster as the replicas use it),
/// to look at what the replicas stored.
async fn conn(redis: &RedisServer) -> cxgate::replicas::Conn {
    options(redis)
        .open(&redis.url())
        .await
        .expect("connect to the test redis-server")
}

fn options(redis: &RedisServer) -> cxgate::replicas::Options {
    common::replicas::redis_options(redis)
}

/// A key of the test deployment, as the replicas name it (one cluster hash slot).
fn key(c: &Cluster, suffix: &str) -> String {
    c.key(suffix)
}

/// A simulator, a Redis and `n` replicas in front of both (`common::replicas`).
type Cluster = Replicas;

/// Starts the cluster; `budget` holds the `[budget]` lines other than the backend ones.
async fn cluster(n: usize, sim: SimOptions, budget: &str) -> Option<Cluster> {
    cluster_on(Kind::Plain, n, sim, budget).await
}

/// [`cluster`] on a Redis of `kind` (TLS, ACL user, Redis Cluster).
async fn cluster_on(kind: Kind, n: usize, sim: SimOptions, budget: &str) -> Option<Cluster> {
    start_replicas(Setup {
        kind,
        sim,
        budget,
        ..Setup::new(n)
    })
    .await
}

/// [`cluster`] with the shared cache tier on (`cache.shared = true`) and a budget that never
/// refuses, so every upstream call the tests count is a cache decision.
async fn shared_cluster(n: usize, sim: SimOptions) -> Option<Cluster> {
    shared_cluster_routed(n, sim, ROUTES).await
}

/// [`shared_cluster`] with the route table `routes` in place of [`ROUTES`].
async fn shared_cluster_routed(n: usize, sim: SimOptions, routes: &str) -> Option<Cluster> {
    start_replicas(Setup {
        sim,
        cache: "shared = true",
        routes,
        ..Setup::new(n)
    })
    .await
}

impl Cluster {
    async fn send(&self, method: Method, url: String, body: &str) -> Answer {
        self.send_as(method, url, body, KEY).await
    }

    /// [`Cluster::send`] with the client key `key`.
    async fn send_as(&self, method: Method, url: String, body: &str, key: &str) -> Answer {
        // The admin listener takes JSON only (a form is what a cross-site page could send).
        let content_type = if url.contains("/admin/") {
            "application/json"
        } else {
            "application/x-www-form-urlencoded"
        };
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", content_type)
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

    /// A GET on one replica as the client with key `key`.
    async fn get_as(&self, replica: usize, path: &str, key: &str) -> Answer {
        let url = format!("http://{}{path}", self.replicas[replica].addr);
        self.send_as(Method::GET, url, "", key).await
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
}

/// Three replicas under concurrent load spend one budget: the upstream sees at most what
/// the budget allows over the run, and no less than 98 % of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget() {
    shared_budget_suite(Kind::Plain).await;
}

/// One replica's Redis answers late, 150 to 300 ms (past the 100 ms call bound, far within
/// a second), for half a second in every second, while the other two reach it at once: the
/// three replicas still spend one budget, never more. The late replica used to take its
/// local share (limit / replicas) at each late answer until the probe saw Redis prompt
/// again, on top of what the shared count let the others spend, and the debt it handed
/// back on return was cut off by the others' next bookings: 213 and 215 upstream calls
/// against an allowance of 200. At least 90 % of the allowance is used: on a loaded
/// machine an answer may still come more than a second late, which rightly moves the
/// replica to its local share for a while (spending less, never more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_redis_on_one_replica_never_lets_the_replicas_overspend() {
    let lateness = Lateness {
        late: |spell| Duration::from_millis(150 + 50 * (spell % 4)),
        late_for: Duration::from_millis(500),
        prompt_for: Duration::from_millis(500),
    };
    shared_budget_run(Kind::Plain, Some(lateness), 0.9).await;
}

async fn shared_budget_suite(kind: Kind) {
    shared_budget_run(kind, None, 0.98).await;
}

/// How [`shared_budget_run`] makes replica 0's Redis late: spells of `late_for` (spell `i`
/// late by `late(i)`) after `prompt_for` each, while one more fits in the run.
#[derive(Clone, Copy)]
struct Lateness {
    late: fn(u64) -> Duration,
    late_for: Duration,
    prompt_for: Duration,
}

/// [`shared_budget_suite`], with replica 0's Redis late as `lateness` says, and at least
/// `accuracy_floor` of the allowance used.
async fn shared_budget_run(kind: Kind, lateness: Option<Lateness>, accuracy_floor: f64) {
    let _one = SERIAL.lock().await;
    let (limit, period_s, burst) = (200u32, 10u64, 20u32);
    let budget =
        format!("limit = {limit}\nperiod = \"{period_s}s\"\nburst = {burst}\nmax_wait = \"1s\"");
    let Some(c) = start_replicas(Setup {
        kind,
        budget: &budget,
        slow: lateness.map(|_| 0),
        ..Setup::new(3)
    })
    .await
    else {
        return;
    };
    let c = Arc::new(c);
    let before = c.upstream_total();
    let run = Duration::from_secs(8);
    let tick = Duration::from_millis(30);
    let started = Instant::now();
    let lateness = lateness.map(|l| {
        let c = c.clone();
        tokio::spawn(async move {
            let link = c.slow_link.as_ref().expect("the slow replica's link");
            let mut spell = 0u64;
            while started.elapsed() + l.prompt_for + l.late_for <= run {
                tokio::time::sleep(l.prompt_for).await;
                link.set_delay((l.late)(spell));
                tokio::time::sleep(l.late_for).await;
                link.set_delay(Duration::ZERO);
                spell += 1;
            }
            (spell, link.held())
        })
    });
    let mut drivers = tokio::task::JoinSet::new();
    // Two senders per replica, each firing a distinct uncached read every tick without
    // waiting for earlier answers: about 200 requests/s offered against a budget of 20/s,
    // ten times over, yet light enough that a busy machine does not starve the replicas'
    // Redis calls for a second (which would rightly fall back to local budgets).
    for sender in 0..6usize {
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
    if let Some(lateness) = lateness {
        let (spells, held) = lateness.await.expect("lateness task");
        println!("replica 0's Redis late in {spells} spells, {held} writes held back");
        assert!(
            spells >= 3 && held >= 5,
            "expected replica 0's Redis late throughout, saw {spells} spells and {held} writes held"
        );
    }
    let accuracy = calls as f64 / allowance;
    // Each Redis call past its bound (or failed) may have put its replica on its divided
    // local ledger for a while: on a machine at load 10 and more, runs that missed the
    // bounds below had 11 to 115 of them across the replicas, runs with none met them
    // exactly. Shown, so a miss says whether it was the fallback's.
    let mut errors = Vec::new();
    for i in 0..c.replicas.len() {
        let text = c.admin(i, Method::GET, "/metrics", "").await;
        let text = String::from_utf8_lossy(&text.body).into_owned();
        errors.push(cxgate_testkit::metrics::sum(
            &text,
            "cxgate_redis_errors_total",
        ));
        // Which calls, and how often Redis was seen down.
        let ops: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("cxgate_redis_errors_total{") && !l.ends_with(" 0"))
            .map(|l| {
                l.trim_start_matches("cxgate_redis_errors_total")
                    .to_string()
            })
            .collect();
        if !ops.is_empty() {
            println!("replica {i}: Redis errors {ops:?}");
        }
    }
    let errors = format!("Redis calls failed or past their bound, per replica: {errors:?}");
    println!(
        "three replicas, shared budget {limit}/{period_s}s burst {burst}: {calls} upstream calls \
         in {elapsed:.2} s vs allowance {allowance:.1} (accuracy {:.2} %); answered 200: {ok}, \
         429: {refused}, other: {other}; {errors}",
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
        "expected at most {allowance:.1} upstream calls, saw {calls} ({errors})"
    );
    assert!(
        accuracy >= accuracy_floor,
        "expected at least {:.0} % of the allowance {allowance:.1} used, saw {calls} ({errors})",
        accuracy_floor * 100.0
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
    shared_token_suite(Kind::Plain).await;
}

async fn shared_token_suite(kind: Kind) {
    let _one = SERIAL.lock().await;
    let sim = SimOptions {
        token_ttl: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster_on(kind, 3, sim, budget).await else {
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
            .arg(key(&c, "token"))
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
    invalidation_suite(Kind::Plain).await;
}

async fn invalidation_suite(kind: Kind) {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster_on(kind, 3, SimOptions::default(), budget).await else {
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
    let written = c
        .post(1, contact, "updates=%7B%22note%22%3A%22hello%22%7D")
        .await;
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
    // Each publisher waited for the listed replicas, wherever they subscribed (on a
    // cluster, other nodes than the one that took the message): none went out "alone".
    for r in [0, 1] {
        let ack = "cxgate_redis_invalidations_total{result=\"acknowledged\"}";
        let alone = "cxgate_redis_invalidations_total{result=\"alone\"}";
        let (acked, alone) = (counted(&c, r, ack).await, counted(&c, r, alone).await);
        assert!(
            acked >= 1.0 && alone == 0.0,
            "expected replica {r}'s invalidation acknowledged by the others, not published \
             alone; saw acknowledged {acked}, alone {alone}"
        );
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
    outage_suite(Kind::Plain).await;
}

async fn outage_suite(kind: Kind) {
    let _one = SERIAL.lock().await;
    let budget = "limit = 3000\nperiod = \"10s\"\nburst = 300\nmax_wait = \"1s\"";
    let Some(c) = cluster_on(kind, 3, SimOptions::default(), budget).await else {
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
    // On a cluster: the node that holds the deployment's slot (the others go on serving).
    let slot_key = format!("{{{}}}:budget:global", c.read().await.prefix);
    c.write().await.redis.stop_owner_of(&slot_key);
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
        .arg(key(&c, "budget:global"))
        .query_async(&mut redis)
        .await
        .expect("clear the budget key");
    assert_eq!(
        c.get(1, "/12345/inbox/contact/after/1").await.status,
        StatusCode::OK,
        "expected an answer after recovery"
    );
    let key: Option<String> = redis::cmd("GET")
        .arg(key(&c, "budget:global"))
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

/// At a cold start only one replica sends the call that learns what the upstream has left
/// (a marker in Redis says whose it is); the others wait for its answer instead of each
/// sending a call of their own blind, then go on the count it taught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_a_cold_start_one_replica_learns_the_count_for_all() {
    let _one = SERIAL.lock().await;
    let sim = SimOptions {
        rate_limit: Some("100/1h".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"5s\"";
    let Some(c) = cluster(3, sim, budget).await else {
        return;
    };
    // The learning call takes its time upstream, so the others all ask while it is out.
    c.sim.set_faults(cxgate::sim::Faults {
        latency_ms: 400,
        ..cxgate::sim::Faults::default()
    });
    c.sim.reset_stats();
    let (a, b, d) = tokio::join!(
        c.get(0, "/12345/inbox/contact/twitter/1"),
        c.get(1, "/12345/inbox/contact/twitter/2"),
        c.get(2, "/12345/inbox/contact/twitter/3"),
    );
    let statuses = [a.status, b.status, d.status];
    // A starved machine can time the slow upstream call out (504); the budget itself must
    // never refuse here: every waiter's max_wait covers the learning call.
    assert!(
        statuses.contains(&StatusCode::OK)
            && statuses
                .iter()
                .all(|s| *s == StatusCode::OK || *s == StatusCode::GATEWAY_TIMEOUT),
        "expected every replica served once the count was learnt, saw {statuses:?}"
    );
    let stats = c.sim.stats();
    assert!(
        matches!(stats["max_in_flight"].as_u64(), Some(1 | 2)),
        "expected the learning call alone, then the other two (at most two out at once, not \
         three blind first calls), saw {stats}"
    );
    c.stop().await;
}

/// An upstream 429 seen by one replica pauses all of them (shared through
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
        // Every field of the refusal tells the same story: nothing left until Retry-After.
        let field = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string()
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let reset: u64 = field("x-ratelimit-reset").parse().unwrap_or(0);
        let current = field("ratelimit");
        assert!(
            field("x-ratelimit-remaining") == "0"
                && reset + 1 >= now + retry_after
                && reset <= now + retry_after + 1
                && current.ends_with(&format!(";r=0;t={retry_after}")),
            "replica {replica}: expected X-RateLimit-Remaining 0, X-RateLimit-Reset near now + \
             {retry_after} (now {now}) and RateLimit r=0;t={retry_after}, saw remaining {:?}, \
             reset {reset}, RateLimit {current:?}",
            field("x-ratelimit-remaining")
        );
    }
    assert_eq!(
        c.upstream_total(),
        before,
        "expected nothing sent upstream by the paused replicas"
    );
    c.stop().await;
}

/// An upstream 429 that names only `Retry-After` pauses every replica for that long and no
/// longer: the shared "nothing left" marker ends with the pause, not a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_bounds_the_shared_pause_on_every_replica() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"0s\"";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    c.sim.set_faults(cxgate::sim::Faults {
        force_429: Some(cxgate::sim::Force429 {
            count: 1,
            retry_after: 1,
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
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for replica in 0..2 {
        let path = format!("/12345/inbox/contact/twitter/{}", 20 + replica);
        let answer = c.get(replica, &path).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "replica {replica}: expected 200 once the upstream's Retry-After of 1 s has \
             passed, saw {} with Retry-After {:?}",
            answer.status,
            answer.headers.get("retry-after")
        );
    }
    c.stop().await;
}

/// The budget, token, invalidation and outage suites on a Redis as operators run it: TLS
/// with a test CA (`budget.redis_ca_file`) and an ACL user whose password is in the URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_over_tls_with_an_acl_user() {
    shared_budget_suite(Kind::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_tokens_are_refreshed_once_per_expiry_over_tls_with_an_acl_user() {
    shared_token_suite(Kind::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_invalidations_reach_every_replica_over_tls_with_an_acl_user() {
    invalidation_suite(Kind::Tls).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_answering_without_redis_and_recover_over_tls_with_an_acl_user() {
    outage_suite(Kind::Tls).await;
}

/// The same suites with an ACL user (`redis://user:password@host/`) over plain TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_with_an_acl_user() {
    shared_budget_suite(Kind::Acl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_tokens_are_refreshed_once_per_expiry_with_an_acl_user() {
    shared_token_suite(Kind::Acl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_invalidations_reach_every_replica_with_an_acl_user() {
    invalidation_suite(Kind::Acl).await;
}

/// The same suites on a three-node Redis Cluster (`budget.redis_cluster = true`): every key
/// in one hash slot, so the scripts run there unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_on_a_redis_cluster() {
    shared_budget_suite(Kind::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_tokens_are_refreshed_once_per_expiry_on_a_redis_cluster() {
    shared_token_suite(Kind::Cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_invalidations_reach_every_replica_on_a_redis_cluster() {
    invalidation_suite(Kind::Cluster).await;
}

/// Killing the cluster node that holds the deployment's slot is a short outage: every
/// replica falls back to its local share and answers, then returns to the shared budget
/// and channel when the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_cluster_node_of_the_slot_falls_back_and_returns() {
    outage_suite(Kind::Cluster).await;
}

/// The ACL user and password in the URL never show: not in `/metrics`, not in
/// `/admin/status`, not in the log of the real binary, which names the server with them
/// masked. The replica is connected (TLS to the test CA, the ACL user), so they were used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_user_and_password_never_show_in_logs_metrics_or_status() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100";
    let Some(c) = cluster_on(Kind::Tls, 1, SimOptions::default(), budget).await else {
        return;
    };
    // Allowing for a slow TLS handshake on a busy machine (the probe retries every 250 ms).
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.metric(0, "cxgate_redis_up").await != Some(1.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        c.metric(0, "cxgate_redis_up").await,
        Some(1.0),
        "expected the replica connected over TLS as the ACL user within 5 s"
    );
    assert_eq!(c.get(0, "/me").await.status, StatusCode::OK, "expected /me");
    let password = c.redis.password().to_string();
    let user = common::redis_server::ACL_USER;
    let metrics = c.admin(0, Method::GET, "/metrics", "").await;
    let status = c.admin(0, Method::GET, "/admin/status", "").await;
    for (what, answer) in [("/metrics", &metrics), ("/admin/status", &status)] {
        let text = String::from_utf8_lossy(&answer.body);
        assert_eq!(answer.status, StatusCode::OK, "expected {what} answered");
        assert!(
            !text.contains(&password) && !text.contains(user),
            "expected neither the Redis password nor the user name in {what}, saw {text}"
        );
    }
    // The real binary on the same configuration (its own ports): its log.
    let path = c.dirs[0].join("cxgate.toml");
    let mut proc = common::Proc::spawn(
        &["run", "--config", path.to_str().expect("utf-8")],
        &c.dirs[0],
    );
    let masked = format!("rediss://***@127.0.0.1:{}/", c.redis.port);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !proc.output().contains(&masked) && Instant::now() < deadline {
        assert!(
            proc.exited().is_none(),
            "expected cxgate to keep running:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(proc);
    let log = std::fs::read_to_string(c.dirs[0].join("cxgate.log")).unwrap_or_default();
    assert!(
        log.contains(&masked),
        "expected the log to name the Redis server as {masked}, saw:\n{log}"
    );
    assert!(
        !log.contains(&password) && !log.contains(user),
        "expected neither the Redis password nor the user name in the log, saw:\n{log}"
    );
    c.stop().await;
}

/// A Redis whose certificate the replica cannot verify (here: the test CA not given) is
/// treated as unreachable: the replica starts, answers on its local share and says so in
/// `cxgate_redis_up`; it never falls back to an unverified connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_certificate_that_does_not_verify_means_the_local_fallback() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100";
    let setup = Setup {
        kind: Kind::Tls,
        budget,
        trust_ca: false,
        ..Setup::new(2)
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    for r in 0..2 {
        let path = format!("/12345/inbox/contact/untrusted/{r}");
        assert_eq!(
            c.get(r, &path).await.status,
            StatusCode::OK,
            "expected replica {r} to answer on its local share"
        );
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let up = futures_all(&c, "cxgate_redis_up").await;
    assert!(
        up.iter().all(|v| *v == Some(0.0)),
        "expected cxgate_redis_up 0 with an unverifiable certificate, saw {up:?}"
    );
    let errors = futures_all(&c, "cxgate_redis_errors_total{op=\"ping\"}").await;
    assert!(
        errors.iter().all(|v| v.unwrap_or(0.0) >= 1.0),
        "expected the failed connections counted, saw {errors:?}"
    );
    // Nothing was written to Redis by either replica.
    let mut redis = conn(&c.redis).await;
    let token: Option<String> = redis::cmd("GET")
        .arg(key(&c, "token"))
        .query_async(&mut redis)
        .await
        .expect("read the token record");
    assert_eq!(
        token, None,
        "expected no token record written over an unverified link"
    );
    c.stop().await;
}

/// `budget.redis_ca_file` and `budget.redis_cluster` are read (off by default), and a key
/// prefix with braces, which would break the one-slot hash tag, is refused.
#[test]
fn redis_tls_and_cluster_settings_are_read_and_braces_refused() {
    let base =
        "[upstream]\nbase_url = \"https://api.engagor.com\"\n[token]\naccess_token_env = \"X\"\n\
                [budget]\nbackend = \"redis\"\nredis_url_env = \"CXGATE_REDIS_URL\"\n";
    let plain = cxgate::config::parse(base)
        .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}", e.lines()));
    assert_eq!(
        (plain.budget.redis_ca_file, plain.budget.redis_cluster),
        (None, false),
        "expected no CA file and no cluster by default"
    );
    let set = cxgate::config::parse(&format!(
        "{base}redis_ca_file = \"/etc/cxgate/redis-ca.pem\"\nredis_cluster = true\n"
    ))
    .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}", e.lines()));
    assert_eq!(
        (set.budget.redis_ca_file, set.budget.redis_cluster),
        (Some(PathBuf::from("/etc/cxgate/redis-ca.pem")), true),
        "expected the CA file and cluster mode read"
    );
    let braced = match cxgate::config::parse(&format!("{base}key_prefix = \"{{app}}\"\n")) {
        Ok(_) => Vec::new(),
        Err(e) => e.lines(),
    };
    assert!(
        braced.len() == 1 && braced[0].starts_with("budget.key_prefix:"),
        "expected one problem naming budget.key_prefix, saw {braced:?}"
    );
}

/// A Redis URL variable with several URLs is refused unless `budget.redis_cluster` is set
/// (a typo there would otherwise silently use one node), naming the variable.
#[tokio::test]
async fn several_redis_urls_need_cluster_mode() {
    std::env::set_var(
        "CXGATE_TEST_SEVERAL_URLS",
        "redis://127.0.0.1:1/,redis://127.0.0.1:2/",
    );
    let registry = prometheus::Registry::new();
    let single = cxgate::replicas::Redis::connect("CXGATE_TEST_SEVERAL_URLS", "t", &registry).await;
    let err = single.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err.contains("$CXGATE_TEST_SEVERAL_URLS") && err.contains("budget.redis_cluster"),
        "expected the several URLs refused naming the variable and budget.redis_cluster, saw {err:?}"
    );
}

/// The README's ACL line is enough for a cluster: replicas reaching a Redis Cluster as a
/// user with exactly those rights (the cluster client also asks for the slot map) count
/// Redis up, no node logs a refused command or key or channel, and the token and
/// invalidation suites pass. (The budget suite's figures are timing figures; its script is
/// run by every admission here too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_acl_rights_suffice_on_a_redis_cluster() {
    {
        let _one = SERIAL.lock().await;
        let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
        let Some(c) = cluster_on(Kind::ClusterAcl, 2, SimOptions::default(), budget).await else {
            return;
        };
        for r in 0..2 {
            assert_eq!(c.get(r, "/me").await.status, StatusCode::OK);
        }
        let purged = c
            .admin(0, Method::POST, "/admin/purge", r#"{"tags":["me"]}"#)
            .await;
        assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
        for r in 0..2 {
            let up = metric_becomes(&c, r, "cxgate_redis_up", 1.0, Duration::from_secs(5)).await;
            assert_eq!(
                up,
                Some(1.0),
                "replica {r}: expected Redis up as the ACL user"
            );
        }
        let status = eventually_miss(&c, 1, "/me").await;
        assert!(
            !status.contains("hit"),
            "expected the purge heard, saw {status:?}"
        );
        for port in c.redis.ports() {
            let log = c.redis.acl_log(port);
            assert!(
                log.trim().is_empty(),
                "expected no refusal in node {port}'s ACL LOG, saw:\n{log}"
            );
        }
        c.stop().await;
    }
    shared_token_suite(Kind::ClusterAcl).await;
    invalidation_suite(Kind::ClusterAcl).await;
}

/// A real failover: the primary holding the deployment's slot is killed and its replica is
/// promoted by the cluster. Nothing is restarted; the replica answers every request
/// throughout, on its local share while the slot has no primary, and returns to the shared
/// budget once the cluster has promoted the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_is_a_short_outage() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 3000\nperiod = \"10s\"\nburst = 300\nmax_wait = \"1s\"";
    let Some(mut c) = cluster_on(Kind::Cluster, 1, SimOptions::default(), budget).await else {
        return;
    };
    let slot_key = key(&c, "budget:global");
    c.redis
        .add_replica_for(&slot_key)
        .expect("a replica for the slot's primary");
    assert_eq!(c.get(0, "/me").await.status, StatusCode::OK, "expected /me");
    c.redis.stop_owner_of(&slot_key);
    let started = Instant::now();
    let (mut went_down, mut came_back) = (None, None);
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(20) && came_back.is_none() {
        let path = format!("/12345/inbox/contact/failover/{i}");
        i += 1;
        *statuses
            .entry(c.get(0, &path).await.status.as_u16())
            .or_insert(0u32) += 1;
        let up = c.metric(0, "cxgate_redis_up").await;
        if up == Some(0.0) && went_down.is_none() {
            went_down = Some(started.elapsed());
        }
        if up == Some(1.0) && went_down.is_some() {
            came_back = Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "cluster failover: down at {went_down:?}, back at {came_back:?}, answers {statuses:?}"
    );
    assert!(
        went_down.is_some(),
        "expected cxgate_redis_up 0 while the slot had no primary"
    );
    assert!(
        came_back.is_some(),
        "expected cxgate_redis_up 1 within 20 s, once the replica was promoted"
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "expected every request answered 200 across the failover, saw {statuses:?}"
    );
    // Back on the shared budget, on the promoted node.
    let mut redis = conn(&c.redis).await;
    let _: () = redis::cmd("DEL")
        .arg(&slot_key)
        .query_async(&mut redis)
        .await
        .expect("clear the budget key");
    let _ = c.get(0, "/12345/inbox/contact/after-failover/1").await;
    let booked: Option<String> = redis::cmd("GET")
        .arg(&slot_key)
        .query_async(&mut redis)
        .await
        .expect("read the budget key");
    assert!(
        booked.is_some(),
        "expected the admission after the failover booked in Redis"
    );
    c.stop().await;
}

/// The token file of replica `i`, as JSON.
fn token_file(c: &Cluster, i: usize) -> serde_json::Value {
    let text = std::fs::read_to_string(c.dirs[i].join("token.json")).expect("token file");
    serde_json::from_str(&text).expect("token file JSON")
}

async fn set_record(c: &Cluster, version: u64, token: serde_json::Value) {
    let mut redis = conn(&c.redis).await;
    let record = serde_json::json!({"version": version, "by": "operator", "token": token});
    let () = redis::cmd("SET")
        .arg(key(c, "token"))
        .arg(record.to_string())
        .query_async(&mut redis)
        .await
        .expect("write the token record");
}

async fn record_access(c: &Cluster) -> String {
    let mut redis = conn(&c.redis).await;
    let text: String = redis::cmd("GET")
        .arg(key(c, "token"))
        .query_async(&mut redis)
        .await
        .expect("read the token record");
    let v: serde_json::Value = serde_json::from_str(&text).expect("record JSON");
    v["token"]["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Longer than the replicas' one-second watch of the record, twice over: how long a test
/// waits to show that a record is *not* taken. A record that is taken is waited for with
/// [`eventually`] instead.
const WATCHES: Duration = Duration::from_millis(2500);

/// Polls `done` every 50 ms for up to `limit`; true once it holds. For what the replicas do
/// on their own time (adopting a record), so a test waits as long as that takes and no more.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// Whether every replica's token file holds `access`.
fn files_hold(c: &Cluster, access: &str) -> bool {
    (0..c.dirs.len()).all(|i| token_file(c, i)["access_token"] == access)
}

/// Every replica kept its own token after `what` (a record it must not adopt, say): its
/// token file holds [`ACCESS`] and `/me/permissions` answers 200 there.
async fn assert_keeps_own_token(c: &Cluster, what: &str) {
    for i in 0..c.replicas.len() {
        assert_eq!(
            token_file(c, i)["access_token"].as_str(),
            Some(ACCESS),
            "replica {i}: expected its own token in its file after {what}"
        );
        let answer = c.get(i, "/me/permissions").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "replica {i}: expected it to serve on its own token after {what}, saw {answer:?}"
        );
    }
}

/// A tampered record is checked before it is adopted; a record without a refresh token
/// never reaches a token file that has one; the previous file is kept beside the new one;
/// and an operator's corrected record is not pushed back out by a replica holding the bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_token_record_is_checked_and_a_repair_sticks() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let good = token_file(&c, 0);
    let far = "2099-01-01T00:00:00Z";

    // No refresh token, a later expiry, a higher version: refused, files untouched.
    set_record(
        &c,
        50,
        serde_json::json!({"access_token": "no-refresh-access", "expires_at": far}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    for i in 0..2 {
        let file = token_file(&c, i);
        assert_eq!(
            (
                file["access_token"].as_str(),
                file["refresh_token"].as_str()
            ),
            (Some(ACCESS), Some(REFRESH)),
            "replica {i}: expected its token file kept (a record without a refresh token must \
             not replace one that has it)"
        );
    }
    // An access token with CR/LF in it cannot be sent: refused too.
    set_record(
        &c,
        51,
        serde_json::json!({"access_token": "bad\r\naccess", "refresh_token": "r", "expires_at": far}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    assert_keeps_own_token(&c, "a record with CR/LF in its access token").await;

    // A well-formed record cannot be told from a real one, so it is adopted, and the
    // previous file is kept beside the new one.
    set_record(
        &c,
        60,
        serde_json::json!({"access_token": "other-access", "refresh_token": "other-refresh", "expires_at": far}),
    )
    .await;
    eventually(Duration::from_secs(10), || {
        files_hold(&c, "other-access")
            && (0..2).all(|i| {
                std::fs::read_to_string(c.dirs[i].join("token.json.prev"))
                    .is_ok_and(|t| t.contains(REFRESH))
            })
    })
    .await;
    for i in 0..2 {
        let prev = c.dirs[i].join("token.json.prev");
        let text = std::fs::read_to_string(&prev).unwrap_or_default();
        assert!(
            token_file(&c, i)["access_token"] == "other-access" && text.contains(REFRESH),
            "replica {i}: expected the record adopted and the previous file (with the real \
             refresh token) kept as {}",
            prev.display()
        );
    }

    // The operator writes the real token back: every replica takes it (a token adopted
    // from the record and never taken upstream does not outrank one that expires sooner),
    // and none pushes the one with the later expiry over it again.
    set_record(&c, 61, good.clone()).await;
    eventually(Duration::from_secs(10), || files_hold(&c, ACCESS)).await;
    // Taken: now long enough for a replica holding the bad token to push it back, if it did.
    tokio::time::sleep(WATCHES).await;
    let stored = record_access(&c).await;
    assert_eq!(
        stored, ACCESS,
        "expected the operator's corrected record to stick, saw the record holding {stored:?}"
    );
    for i in 0..2 {
        assert_eq!(
            token_file(&c, i)["access_token"].as_str(),
            Some(ACCESS),
            "replica {i}: expected the corrected token in its file"
        );
    }
    let answer = c.get(1, "/me/permissions").await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the repaired replicas to serve, saw {answer:?}"
    );
    c.stop().await;
}

/// Redis's own clock, in µs, as the budget script reads it.
async fn redis_now_us(c: &Cluster) -> u64 {
    let mut redis = conn(&c.redis).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(&mut redis)
        .await
        .expect("redis TIME");
    secs * 1_000_000 + micros
}

/// Values read from Redis are bounded like the upstream's own: a pause or a budget state
/// years ahead is cut back, and a refresh lock without expiry does not block refreshes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_read_from_redis_are_bounded() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    let ten_years_us: u64 = 10 * 365 * 24 * 3600 * 1_000_000;

    let ahead = redis_now_us(&c).await + ten_years_us;
    let () = redis::cmd("SET")
        .arg(key(&c, "budget:pause"))
        .arg(ahead.to_string())
        .query_async(&mut redis)
        .await
        .expect("write a pause ten years ahead");
    // Before any request cuts it back, the status shows the pause as admission will cut it.
    let status = c.admin(1, Method::GET, "/admin/status", "").await.json();
    let shown = status["budget"]["upstream"]["paused_for_s"].as_f64();
    let paused = c.get(0, "/12345/inbox/mentions?bounded=1").await;
    let retry: u64 = paused.header("retry-after").parse().unwrap_or(u64::MAX);
    assert!(
        paused.status == StatusCode::TOO_MANY_REQUESTS && retry <= 24 * 3600,
        "expected 429 with a Retry-After of at most a day for a pause years ahead, saw {} \
         Retry-After {:?}",
        paused.status,
        paused.header("retry-after")
    );
    assert!(
        shown.is_some_and(|s| (s - retry as f64).abs() <= 5.0),
        "expected the status to show the pause the 429 says (Retry-After {retry}), saw {}",
        status["budget"]["upstream"]
    );
    let () = redis::cmd("DEL")
        .arg(key(&c, "budget:pause"))
        .query_async(&mut redis)
        .await
        .expect("end the pause");

    let ahead = redis_now_us(&c).await + ten_years_us;
    let () = redis::cmd("SET")
        .arg(key(&c, "budget:global"))
        .arg(ahead.to_string())
        .query_async(&mut redis)
        .await
        .expect("write a budget state ten years ahead");
    let first = c.get(1, "/12345/inbox/mentions?bounded=2").await;
    let retry: u64 = first.header("retry-after").parse().unwrap_or(0);
    assert!(
        first.status == StatusCode::OK || retry <= 60,
        "expected a budget state years ahead cut back to what the shares can book, saw {} \
         Retry-After {:?}",
        first.status,
        first.header("retry-after")
    );

    let () = redis::cmd("DEL")
        .arg(key(&c, "budget:global"))
        .query_async(&mut redis)
        .await
        .expect("clear the budget state");

    // A lock nobody will ever release: the next refresh must still happen.
    let () = redis::cmd("SET")
        .arg(key(&c, "token:lock"))
        .arg("ghost")
        .query_async(&mut redis)
        .await
        .expect("write a lock without expiry");
    let before = c.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
    c.sim.set_faults(cxgate::sim::Faults {
        force_401: Some(cxgate::sim::Force401 { count: 1 }),
        ..cxgate::sim::Faults::default()
    });
    let _ = c.get(0, "/me/permissions").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = c.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
        if now > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected a refresh despite a lock without expiry, saw none in 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}

/// A count of calls in flight no share could have booked (a tampered `budget:in_flight`
/// of a hundred million) is not believed: the replicas go on admitting rather than answer
/// 429 until the key expires five minutes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implausible_count_of_calls_in_flight_is_not_believed() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 600\nperiod = \"1m\"\nburst = 20";
    let sim = SimOptions {
        rate_limit: Some("1000/1h".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let Some(c) = cluster(2, sim, budget).await else {
        return;
    };
    // The first answer teaches the replicas what the upstream has left.
    let first = c.get(0, "/12345/inbox/mentions?flight=0").await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "expected the first call through"
    );
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("SET")
        .arg(key(&c, "budget:in_flight"))
        .arg("100000000")
        .arg("PX")
        .arg(300_000)
        .query_async(&mut redis)
        .await
        .expect("write a tampered count of calls in flight");
    for i in 0..2 {
        let answer = c
            .get(i, &format!("/12345/inbox/mentions?flight={}", i + 1))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "replica {i}: expected the call admitted despite the tampered count, saw \
             Retry-After {:?}",
            answer.header("retry-after")
        );
    }
    c.stop().await;
}

/// `POST /admin/budget/resume` on one replica ends the pause on every replica (the shared
/// record and each replica's own copy), and `/admin/status` shows the pause in force on a
/// replica that only holds it through Redis, with where it comes from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_one_replica_ends_the_pause_on_all_and_status_shows_it() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"0s\"";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    c.sim.set_faults(cxgate::sim::Faults {
        force_429: Some(cxgate::sim::Force429 {
            count: 1,
            retry_after: 60,
        }),
        ..cxgate::sim::Faults::default()
    });
    let first = c.get(0, "/12345/inbox/contact/twitter/1").await;
    assert_eq!(
        first.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the upstream's forced 429 through replica 0"
    );
    // Replica 1 holds the pause only through Redis; its status must say so.
    let mut refused = StatusCode::OK;
    for _ in 0..20 {
        refused = c.get(1, "/12345/inbox/contact/twitter/2").await.status;
        if refused == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        refused,
        StatusCode::TOO_MANY_REQUESTS,
        "expected replica 1 paused too"
    );
    let status = c.admin(1, Method::GET, "/admin/status", "").await.json();
    let upstream = &status["budget"]["upstream"];
    assert!(
        upstream["paused_for_s"].as_f64().is_some_and(|s| s > 30.0)
            && upstream["pause_source"] == "shared"
            && status["upstream"]["paused_for_s"]
                .as_f64()
                .is_some_and(|s| s > 30.0),
        "expected replica 1's status to show the shared pause in force, saw {status}"
    );
    let page = c.admin(1, Method::GET, "/", "").await;
    let page = String::from_utf8_lossy(&page.body).into_owned();
    assert!(
        page.contains("held in Redis for every replica"),
        "expected the status page to show the shared pause and its source"
    );
    let local = c.admin(0, Method::GET, "/admin/status", "").await.json();
    assert_eq!(
        local["budget"]["upstream"]["pause_source"], "local+shared",
        "expected replica 0 to show its own pause, also held in Redis, saw {local}"
    );

    // The operator resumes on replica 1: replica 0, which saw the 429 itself, goes on too.
    let resumed = c.admin(1, Method::POST, "/admin/budget/resume", "").await;
    assert_eq!(
        resumed.status,
        StatusCode::OK,
        "expected the resume accepted"
    );
    for replica in [0, 1] {
        let path = format!("/12345/inbox/contact/twitter/{}", 30 + replica);
        let answer = c.get(replica, &path).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "replica {replica}: expected the pause ended everywhere by the resume, saw {} {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        let status = c
            .admin(replica, Method::GET, "/admin/status", "")
            .await
            .json();
        assert!(
            status["budget"]["upstream"]["paused_for_s"].is_null()
                && status["budget"]["upstream"]["pause_source"].is_null(),
            "replica {replica}: expected no pause in status after the resume, saw {status}"
        );
    }
    c.stop().await;
}

/// A record that has already expired, or expires sooner than the valid token a replica
/// holds, is not adopted over it; nor is one whose version is beyond counting (u64::MAX),
/// which no replica may count on from (no version wraps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_sooner_or_uncountable_token_record_is_not_adopted() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let soon =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(120))
            .to_string();
    let far = "2099-01-01T00:00:00Z".to_string();
    let cases = [
        (
            70,
            "expired-access",
            "2001-01-01T00:00:00Z".to_string(),
            "already expired",
        ),
        (
            71,
            "sooner-access",
            soon,
            "expiring sooner than the held token",
        ),
        (u64::MAX, "max-access", far, "at version u64::MAX"),
    ];
    for (version, access, expires_at, what) in cases {
        set_record(
            &c,
            version,
            serde_json::json!({"access_token": access, "refresh_token": "other-refresh", "expires_at": expires_at}),
        )
        .await;
        tokio::time::sleep(WATCHES).await;
        assert_keeps_own_token(&c, &format!("a record {what}")).await;
    }
    c.stop().await;
}

/// A record claiming to be written in the future (so that it would outrank every later
/// `cxgate token init`) is not trusted, nor is one that says nothing of its expiry over a
/// valid token that does: neither is adopted, and the replicas keep serving on their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_record_from_the_future_or_without_expiry_is_not_adopted() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    let future = serde_json::json!({
        "version": 80,
        "by": "operator",
        "written_at": 4_102_444_800_000_u64,
        "token": {"access_token": "future-access", "refresh_token": "future-refresh", "expires_at": "2099-01-01T00:00:00Z"},
    });
    let () = redis::cmd("SET")
        .arg(key(&c, "token"))
        .arg(future.to_string())
        .query_async(&mut redis)
        .await
        .expect("write the token record");
    tokio::time::sleep(WATCHES).await;
    assert_keeps_own_token(&c, "a record written in 2100").await;
    set_record(
        &c,
        81,
        serde_json::json!({"access_token": "ageless-access", "refresh_token": "ageless-refresh"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    assert_keeps_own_token(&c, "a record without expires_at").await;
    c.stop().await;
}

/// One replica's `/metrics` value of `name` once it equals `want`, polled for at most
/// `limit`; the last value seen otherwise.
async fn metric_becomes(
    c: &Cluster,
    replica: usize,
    name: &str,
    want: f64,
    limit: Duration,
) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = c.metric(replica, name).await;
        if seen == Some(want) || Instant::now() >= deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis user without rights on the invalidation channel: no replica counts Redis as
/// up (the probe publishes as the invalidations do, and a subscription counts only once
/// it carries the replica's own message), the gauge stays down rather than flapping,
/// `/admin/status` says why, and once the rights are back every replica drops the cache
/// it kept while it could not hear the others' purges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_channel_rights_is_not_counted_as_listening() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    for r in 0..2 {
        assert_eq!(c.get(r, "/me").await.status, StatusCode::OK);
        let again = c.get(r, "/me").await;
        assert!(
            again.header("cache-status").contains("hit"),
            "expected replica {r} to hold /me"
        );
    }
    let acl = |rule: &'static str| {
        let redis = &c.redis;
        async move {
            let mut conn = conn(redis).await;
            let () = redis::cmd("ACL")
                .arg("SETUSER")
                .arg("default")
                .arg(rule)
                .query_async(&mut conn)
                .await
                .expect("ACL SETUSER");
        }
    };
    acl("resetchannels").await;
    for r in 0..2 {
        let up = metric_becomes(&c, r, "cxgate_redis_up", 0.0, Duration::from_secs(5)).await;
        assert_eq!(
            up,
            Some(0.0),
            "replica {r}: expected cxgate_redis_up 0 without channel rights"
        );
    }
    // Down and staying down: no flapping between the probe and the refused publication.
    let purged = c
        .admin(0, Method::POST, "/admin/purge", r#"{"tags":["me"]}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    for _ in 0..8 {
        for r in 0..2 {
            assert_eq!(
                c.metric(r, "cxgate_redis_up").await,
                Some(0.0),
                "replica {r}: expected cxgate_redis_up to stay 0 while channel rights are missing"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let status = c.admin(1, Method::GET, "/admin/status", "").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).expect("status JSON");
    let redis = &status["redis"];
    assert!(
        redis["backend"] == "redis"
            && redis["reachable"] == false
            && redis["invalidations_heard"] == false
            && redis["last_error"].as_str().is_some_and(|e| !e.is_empty())
            && redis["channel_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
            && redis["since"].is_string(),
        "expected /admin/status to show Redis unreachable since a time, the channel unheard, \
         and why, saw {redis}"
    );
    acl("allchannels").await;
    for r in 0..2 {
        let up = metric_becomes(&c, r, "cxgate_redis_up", 1.0, Duration::from_secs(5)).await;
        assert_eq!(
            up,
            Some(1.0),
            "replica {r}: expected cxgate_redis_up 1 once channel rights are back"
        );
    }
    let status = eventually_miss(&c, 1, "/me").await;
    assert!(
        !status.contains("hit"),
        "expected replica 1 to drop the /me it kept while it could not hear the purge, saw \
         {status:?}"
    );
    c.stop().await;
}

/// After Redis restarts empty, versions start again. A replica whose own token the
/// upstream refuses adopts the record another replica (or an operator) writes, whatever
/// its version, rather than answering 503 until the version passes the one it saw last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_dead_token_adopts_a_record_of_a_lower_version() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(mut c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    // Both replicas adopt a token the upstream does not know, at a high version.
    set_record(
        &c,
        10,
        serde_json::json!({"access_token": "stale-access", "refresh_token": "stale-refresh",
                           "expires_at": "2098-01-01T00:00:00Z"}),
    )
    .await;
    eventually(Duration::from_secs(10), || files_hold(&c, "stale-access")).await;
    for i in 0..2 {
        assert_eq!(
            token_file(&c, i)["access_token"].as_str(),
            Some("stale-access"),
            "replica {i}: expected the version-10 record adopted"
        );
    }
    // Redis restarts empty; the working token comes back as version 2.
    c.redis.stop();
    c.redis.restart();
    let mut good = token_file(&c, 0);
    good["access_token"] = ACCESS.into();
    good["refresh_token"] = REFRESH.into();
    good["expires_at"] = "2099-01-01T00:00:00Z".into();
    set_record(&c, 2, good).await;
    for r in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = c.get(r, "/me").await;
        while last.status != StatusCode::OK && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(300)).await;
            last = c.get(r, "/me").await;
        }
        assert_eq!(
            last.status,
            StatusCode::OK,
            "replica {r}: expected the version-2 record adopted once its own token was \
             refused, saw {last:?}"
        );
        // The working token, or one the upstream issued for its refresh token: a replica
        // whose refused token sent it to refresh just as the record arrived refreshes with
        // the record's refresh token (seen once in a full run), which is as good.
        let held = token_file(&c, r)["access_token"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            held == ACCESS || held.starts_with("sim-at-"),
            "replica {r}: expected the working token (or its refreshed successor) in its \
             file, saw {held:?}"
        );
    }
    c.stop().await;
}

/// A record holding a token no upstream would take (a 100 KB access token, a refresh token
/// longer than any real one) is not adopted: every replica keeps its own token, its token
/// file stays one a restart loads, and it stays ready and serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_token_record_is_not_adopted() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let far = "2099-01-01T00:00:00Z";
    let cases = [
        (
            80,
            serde_json::json!({"access_token": "a".repeat(100_000), "refresh_token": "other-refresh", "expires_at": far}),
            "a 100 KB access token",
        ),
        (
            81,
            serde_json::json!({"access_token": "long-refresh-access", "refresh_token": "r".repeat(5_000), "expires_at": far}),
            "a 5000-byte refresh token",
        ),
    ];
    for (version, token, what) in cases {
        set_record(&c, version, token).await;
        tokio::time::sleep(WATCHES).await;
        assert_keeps_own_token(&c, &format!("a record with {what}")).await;
        for i in 0..2 {
            cxgate::token::inspect_file(&c.dirs[i].join("token.json"))
                .expect("expected the token file to stay one a restart loads");
            let ready = c.admin(i, Method::GET, "/readyz", "").await;
            assert_eq!(
                ready.status,
                StatusCode::OK,
                "replica {i}: expected ready on its own token after a record with {what}"
            );
        }
    }
    c.stop().await;
}

/// An operator's repair survives a restart: a dead (but not expired) record every replica
/// adopted, then `cxgate token init` on one replica with no expiry, then a restart of that
/// replica. The file written after the record wins at start and is stored for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_init_after_the_record_wins_at_restart() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(mut c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    // A dead record, written now with a far expiry: both replicas take it.
    let written_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let record = serde_json::json!({
        "version": 90,
        "by": "operator",
        "written_at": written_at,
        "token": {"access_token": "dead-access", "refresh_token": "dead-refresh", "expires_at": "2099-01-01T00:00:00Z"},
    });
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("SET")
        .arg(key(&c, "token"))
        .arg(record.to_string())
        .query_async(&mut redis)
        .await
        .expect("write the token record");
    eventually(Duration::from_secs(10), || files_hold(&c, "dead-access")).await;
    assert_eq!(
        token_file(&c, 0)["access_token"].as_str(),
        Some("dead-access"),
        "expected the dead record adopted first (the setup of this test)"
    );

    // The operator repairs replica 0's file with `token init` (no expiry) and restarts it.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let config = c.dirs[0].join("cxgate.toml");
    let cfg = cxgate::config::load(&config).expect("config");
    std::env::set_var("CX_ACCESS_TOKEN", ACCESS);
    std::env::set_var("CX_REFRESH_TOKEN", REFRESH);
    std::env::remove_var("CX_EXPIRES_IN");
    cxgate::token_init(&cfg, None, None)
        .await
        .expect("token init writes the file");
    std::env::remove_var("CX_ACCESS_TOKEN");
    std::env::remove_var("CX_REFRESH_TOKEN");
    let old = c.replicas.remove(0);
    old.shutdown();
    old.stopped().await;
    let cfg = cxgate::config::load(&config).expect("config");
    let restarted = cxgate::start(cfg, Some(config), cxgate::Options::with_workers())
        .await
        .expect("replica restarts");
    c.replicas.insert(0, restarted);
    tokio::time::sleep(WATCHES).await;

    assert_eq!(
        token_file(&c, 0)["access_token"].as_str(),
        Some(ACCESS),
        "expected the repaired token file kept at restart, not replaced by the older record"
    );
    let stored: String = redis::cmd("GET")
        .arg(key(&c, "token"))
        .query_async(&mut redis)
        .await
        .expect("read the token record");
    let stored: serde_json::Value = serde_json::from_str(&stored).expect("record JSON");
    assert_eq!(
        stored["token"]["access_token"].as_str(),
        Some(ACCESS),
        "expected the repaired token stored for the other replicas, saw version {}",
        stored["version"]
    );
    let answer = c.get(0, "/me/permissions").await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the restarted replica to serve on the repaired token"
    );
    c.stop().await;
}

/// `/admin/status` and a resume report what is in force in Redis: a pause key holding
/// garbage is no pause (a resume says it was not paused), and a shared allowance used up
/// shows as allowance 0 with the shared pause, matching the 429s it causes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_resume_report_what_redis_holds_in_force() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"0s\"";
    let Some(c) = cluster(1, SimOptions::default(), budget).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("SET")
        .arg(key(&c, "budget:pause"))
        .arg("not-a-number")
        .query_async(&mut redis)
        .await
        .expect("write the pause key");
    let ok = c.get(0, "/12345/inbox/contact/twitter/1").await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "expected a garbage pause key not to pause"
    );
    let resumed = c
        .admin(0, Method::POST, "/admin/budget/resume", "")
        .await
        .json();
    assert_eq!(
        resumed["was_paused"], false,
        "expected a resume over a garbage pause key to say no pause was in force, saw {resumed}"
    );

    let () = redis::cmd("SET")
        .arg(key(&c, "budget:upstream_left"))
        .arg("0")
        .arg("PX")
        .arg(30_000)
        .query_async(&mut redis)
        .await
        .expect("write the shared allowance");
    let refused = c.get(0, "/12345/inbox/contact/twitter/2").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the used-up shared allowance to refuse"
    );
    let status = c.admin(0, Method::GET, "/admin/status", "").await.json();
    let upstream = &status["budget"]["upstream"];
    assert!(
        upstream["allowance"] == 0
            && upstream["pause_source"] == "shared"
            && upstream["paused_for_s"].as_f64().is_some_and(|s| s > 20.0),
        "expected status to show allowance 0 and the shared pause in force, saw {upstream}"
    );
    let resumed = c
        .admin(0, Method::POST, "/admin/budget/resume", "")
        .await
        .json();
    assert_eq!(
        resumed["was_paused"], true,
        "expected a resume over a used-up shared allowance to say it was paused, saw {resumed}"
    );
    c.stop().await;
}

/// A refresh token a replica's refresh spent is not presented again by any replica: the
/// refresh notes it in Redis (`token:spent:<digest>`), so a record planted with it (a dead
/// access token with the spent refresh token) costs no reuse at the token endpoint, and
/// both replicas go back to the token they knew to work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_refresh_token_is_never_presented_again_across_replicas() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    // One refresh spends REFRESH, so presenting it again is refused as a reuse.
    c.sim.set_faults(cxgate::sim::Faults {
        force_401: Some(cxgate::sim::Force401 { count: 1 }),
        ..cxgate::sim::Faults::default()
    });
    let first = c.get(0, "/me/permissions").await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "expected the 401 replay to work"
    );
    tokio::time::sleep(WATCHES).await;
    // A record both replicas take: a dead access token with the spent refresh token.
    set_record(
        &c,
        100,
        serde_json::json!({"access_token": "dead-access", "refresh_token": REFRESH, "expires_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    eventually(Duration::from_secs(10), || files_hold(&c, "dead-access")).await;
    for i in 0..2 {
        assert_eq!(
            token_file(&c, i)["access_token"].as_str(),
            Some("dead-access"),
            "replica {i}: expected the dead record adopted (the setup of this test)"
        );
    }
    let reuse = || {
        c.sim.stats()["refresh_reuse_rejected"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = reuse();
    let (a, b) = tokio::join!(c.get(0, "/me/permissions"), async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        c.get(1, "/me/permissions").await
    });
    assert!(
        a.status == StatusCode::OK && b.status == StatusCode::OK,
        "expected both back on their working token, saw {} and {}",
        a.status,
        b.status
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let presented = reuse() - before;
    assert_eq!(
        presented, 0,
        "expected the spent refresh token never presented again, saw {presented} reuse(s)"
    );
    for i in 0..2 {
        let status = c.admin(i, Method::GET, "/admin/status", "").await.json();
        assert_eq!(
            status["token"]["needs_reauthorisation"], false,
            "replica {i}: expected no re-authorisation needed, saw {}",
            status["token"]
        );
    }
    c.stop().await;
}

/// Upstream calls for `method path` so far (the simulator counts raw paths; a trailing
/// slash counts as the same path).
fn calls(c: &Cluster, method_path: &str) -> u64 {
    let stats = c.sim.stats();
    let Some(by_route) = stats["by_route"].as_object() else {
        return 0;
    };
    by_route
        .iter()
        .filter(|(k, _)| k.trim_end_matches('/') == method_path)
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum()
}

/// The shared tier's entry for `path` (a GET without query), as Redis holds it.
async fn shared_entry(c: &Cluster, path: &str) -> Option<Vec<u8>> {
    let mut redis = conn(&c.redis).await;
    redis::cmd("GET")
        .arg(key(c, &format!("cache:entry:GET {path}")))
        .query_async(&mut redis)
        .await
        .expect("read the shared entry")
}

/// Polls a path on a replica until it no longer answers from its own memory's entry (a
/// fetch, or another replica's newer answer through the shared tier); at most 1 s.
async fn eventually_not_old(c: &Cluster, replica: usize, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let status = c
            .get(replica, path)
            .await
            .header("cache-status")
            .to_string();
        let old = status.contains("hit") && !status.contains("detail=shared");
        if !old || Instant::now() >= deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A read filled through one replica is a hit on another with no upstream call, from an
/// entry in Redis that expires with its longest stale window and carries no token; a
/// replica restarted with an empty memory answers from it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_filled_on_one_replica_is_a_hit_on_another_and_after_a_restart() {
    let _one = SERIAL.lock().await;
    let Some(mut c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let first = c.get(0, "/me").await;
    assert_eq!(first.status, StatusCode::OK, "expected /me answered");
    assert_eq!(
        calls(&c, "GET /me"),
        1,
        "expected one upstream call for the fill"
    );
    let other = c.get(1, "/me").await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(
        other.body, first.body,
        "expected the same answer on replica 1"
    );
    assert!(
        other.header("cache-status").contains("hit")
            && other.header("cache-status").contains("detail=shared"),
        "expected a shared hit on replica 1, saw {:?}",
        other.header("cache-status")
    );
    assert_eq!(
        calls(&c, "GET /me"),
        1,
        "expected no upstream call for replica 1"
    );
    // Now in replica 1's memory: a plain hit, no second lookup in Redis.
    let again = c.get(1, "/me").await;
    assert!(
        again.header("cache-status").starts_with("cxgate; hit")
            && !again.header("cache-status").contains("shared"),
        "expected a memory hit, saw {:?}",
        again.header("cache-status")
    );
    assert_eq!(
        c.metric(1, "cxgate_cache_shared_lookups_total{result=\"hit\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        c.metric(0, "cxgate_cache_shared_writes_total{result=\"stored\"}")
            .await,
        Some(1.0)
    );

    let entry = shared_entry(&c, "/me")
        .await
        .expect("expected /me in the shared tier");
    let text = String::from_utf8_lossy(&entry);
    assert!(
        !text.contains(ACCESS) && !text.contains(KEY),
        "expected no upstream token and no client key in the shared entry"
    );
    let mut redis = conn(&c.redis).await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(key(&c, "cache:entry:GET /me"))
        .query_async(&mut redis)
        .await
        .expect("PTTL");
    // ttl 10m + the longer of 1m and 1h: 70 minutes from the fill.
    let lifetime = 70 * 60 * 1000;
    assert!(
        (lifetime - 60_000..=lifetime).contains(&pttl),
        "expected the Redis expiry at the end of the stale-if-error window, saw {pttl} ms"
    );

    c.restart_replica(0).await;
    let warm = c.get(0, "/me").await;
    assert_eq!(warm.status, StatusCode::OK);
    assert!(
        warm.header("cache-status").contains("detail=shared"),
        "expected the restarted replica to answer from the shared tier, saw {:?}",
        warm.header("cache-status")
    );
    let age: u64 = warm.header("age").parse().unwrap_or(u64::MAX);
    assert!(
        age < 60,
        "expected the entry's own age (seconds since the fill), saw {age}"
    );
    assert_eq!(
        calls(&c, "GET /me"),
        1,
        "expected no upstream call after the restart"
    );
    c.stop().await;
}

/// The shared tier's entries, as Redis holds them: key and value.
async fn shared_entries(c: &Cluster) -> Vec<(String, Vec<u8>)> {
    let mut redis = conn(&c.redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(key(c, "cache:entry:*"))
        .query_async(&mut redis)
        .await
        .expect("list the shared entries");
    let mut entries = Vec::new();
    for k in keys {
        let value: Vec<u8> = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut redis)
            .await
            .expect("read a shared entry");
        entries.push((k, value));
    }
    entries
}

/// Every `from` in `bytes` replaced by `to`.
fn replaced(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// Replicas with different public bases (here each derives its own from its listen
/// address) share entries all the same: the tier keeps a page's links at the upstream's
/// base, and each replica moves them to its own as it takes the entry, so a page filled
/// through one is served by the other with its own links and no upstream call. An entry of
/// the format before, which held the writer's links, is passed over, never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_different_public_bases_share_pages_with_their_own_links() {
    let _one = SERIAL.lock().await;
    let Some(mut c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let page = "/12345/inbox/mentions?limit=2";
    let base = |c: &Cluster, i: usize| format!("http://{}", c.replicas[i].addr);
    let next = |a: &Answer| {
        a.json()["response"]["paging"]["next_url"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let (base0, base1) = (base(&c, 0), base(&c, 1));
    assert_ne!(base0, base1, "expected the replicas on bases of their own");
    let first = c.get(0, page).await;
    assert_eq!(
        first.status,
        StatusCode::OK,
        "expected the page through replica 0"
    );
    let link0 = next(&first);
    assert!(
        link0.starts_with(&format!("{base0}/12345/inbox/mentions?")),
        "expected replica 0's paging link on its own base {base0}, saw {link0:?}"
    );

    let other = c.get(1, page).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "expected the page through replica 1"
    );
    assert!(
        other.header("cache-status").contains("detail=shared"),
        "expected replica 1 to answer from the shared tier, saw {:?}",
        other.header("cache-status")
    );
    assert_eq!(
        next(&other),
        link0.replacen(&base0, &base1, 1),
        "expected replica 1's paging link on its own base {base1}, the rest as replica 0's"
    );
    assert_eq!(
        calls(&c, "GET /12345/inbox/mentions"),
        1,
        "expected one upstream call for both replicas"
    );
    let again = c.get(1, page).await;
    assert!(
        again.header("cache-status").starts_with("cxgate; hit")
            && !again.header("cache-status").contains("shared")
            && again.body == other.body,
        "expected the same page from replica 1's memory, saw {:?}",
        again.header("cache-status")
    );

    // What Redis holds names neither replica's base: the upstream's, with no token.
    let entries = shared_entries(&c).await;
    let (entry_key, entry) = entries
        .iter()
        .find(|(k, _)| k.contains("/12345/inbox/mentions"))
        .expect("expected the page in the shared tier");
    let text = String::from_utf8_lossy(entry);
    let upstream = c.sim.base_url();
    assert!(
        text.contains(&format!("{upstream}/12345/inbox/mentions?"))
            && !text.contains(&base0)
            && !text.contains(&base1)
            && !text.contains(ACCESS)
            && !text.contains("access_token"),
        "expected the shared entry's links on the upstream's base without a token, saw {text}"
    );

    // An entry of the format before: replica 0's links, under the old marker.
    let old = replaced(&replaced(entry, "cxg3", "cxg1"), &upstream, &base0);
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("SET")
        .arg(entry_key)
        .arg(old)
        .arg("PX")
        .arg(60_000)
        .query_async(&mut redis)
        .await
        .expect("write an entry of the old format");
    c.restart_replica(1).await;
    let base1 = base(&c, 1);
    let fresh = c.get(1, page).await;
    assert_eq!(
        fresh.status,
        StatusCode::OK,
        "expected the page after the restart"
    );
    assert!(
        fresh.header("cache-status").contains("fwd=uri-miss"),
        "expected the old entry passed over (a miss), saw {:?}",
        fresh.header("cache-status")
    );
    assert!(
        next(&fresh).starts_with(&format!("{base1}/")),
        "expected the restarted replica's own links, saw {:?}",
        next(&fresh)
    );
    assert_eq!(
        calls(&c, "GET /12345/inbox/mentions"),
        2,
        "expected the miss to go upstream"
    );
    c.stop().await;
}

/// A write through one replica removes the entry from the other's memory and from the
/// shared tier; purges by path, tag and all remove shared entries too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_purges_remove_shared_entries() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/42";
    assert_eq!(c.get(0, contact).await.status, StatusCode::OK);
    assert!(c
        .get(1, contact)
        .await
        .header("cache-status")
        .contains("shared"));
    assert!(
        shared_entry(&c, contact).await.is_some(),
        "expected the contact shared"
    );
    let written = c
        .post(1, contact, "updates=%7B%22note%22%3A%22hello%22%7D")
        .await;
    assert!(written.status.is_success(), "expected the write to succeed");
    assert!(
        shared_entry(&c, contact).await.is_none(),
        "expected the write to remove the shared entry before it answered"
    );
    let before = calls(&c, &format!("GET {contact}"));
    for r in 0..2 {
        let status = eventually_not_old(&c, r, contact).await;
        assert!(
            status.contains("fwd=uri-miss") || status.contains("detail=shared"),
            "expected replica {r} to drop {contact} after the write, saw {status:?}"
        );
    }
    assert_eq!(
        calls(&c, &format!("GET {contact}")),
        before + 1,
        "expected one replica to fetch anew and the other to take its answer from Redis"
    );

    for (purge, path) in [
        (r#"{"path":"/me"}"#, "/me"),
        (r#"{"tags":["accounts"]}"#, "/me/accounts"),
        (r#"{"all":true}"#, "/me"),
    ] {
        assert_eq!(c.get(0, path).await.status, StatusCode::OK);
        let before = calls(&c, &format!("GET {path}"));
        assert!(c.get(1, path).await.header("cache-status").contains("hit"));
        assert_eq!(
            calls(&c, &format!("GET {path}")),
            before,
            "expected {path} shared"
        );
        let purged = c.admin(1, Method::POST, "/admin/purge", purge).await;
        assert_eq!(purged.status, StatusCode::OK, "expected {purge} accepted");
        if !purge.contains("all") {
            // A full purge retires entries by generation; the others are deleted.
            assert!(
                shared_entry(&c, path).await.is_none(),
                "expected {path} deleted"
            );
        }
        for r in 0..2 {
            let status = eventually_not_old(&c, r, path).await;
            assert!(
                status.contains("fwd=uri-miss") || status.contains("detail=shared"),
                "expected replica {r} to drop {path} after {purge}, saw {status:?}"
            );
        }
        assert_eq!(
            calls(&c, &format!("GET {path}")),
            before + 1,
            "expected one fetch after {purge}, shared with the other replica"
        );
    }
    c.stop().await;
}

/// An invalidation while a read is in flight on another replica keeps that read's answer
/// (fetched before it) out of the shared tier: made through a replica, and as Redis holds it
/// before the replica doing the read has heard of it (only the generations moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_fetched_across_an_invalidation_is_not_shared() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 1500;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let Some(c) = shared_cluster(2, sim).await else {
        return;
    };
    let slow = "/12345/inbox/contact/slow/1";
    let purge = r#"{"tags":["contact:12345/slow/1"]}"#;
    let (read, purged) = tokio::join!(c.get(0, slow), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        c.admin(1, Method::POST, "/admin/purge", purge).await
    });
    assert_eq!(purged.status, StatusCode::OK);
    assert_eq!(read.status, StatusCode::OK, "expected the read answered");
    assert!(
        shared_entry(&c, slow).await.is_none(),
        "expected the answer fetched across the purge kept out of the shared tier"
    );

    // Another replica's invalidation that reached Redis, but not yet this replica's memory.
    let slow = "/12345/inbox/contact/slow/2";
    let mut redis = conn(&c.redis).await;
    let generation = key(&c, "cache:gen:tag:contact:12345/slow/2");
    let (read, ()) = tokio::join!(c.get(0, slow), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _: i64 = redis::cmd("INCRBY")
            .arg(&generation)
            .arg(1)
            .query_async(&mut redis)
            .await
            .expect("bump the generation");
    });
    assert_eq!(read.status, StatusCode::OK, "expected the read answered");
    assert!(
        shared_entry(&c, slow).await.is_none(),
        "expected the answer fetched across the bump kept out of the shared tier"
    );
    assert_eq!(
        c.metric(
            0,
            "cxgate_cache_shared_writes_total{result=\"invalidated\"}"
        )
        .await,
        Some(1.0),
        "expected the write refused by the generation check"
    );
    let next = c.get(1, slow).await;
    assert!(
        next.header("cache-status").contains("fwd=uri-miss"),
        "expected replica 1 to fetch anew, saw {:?}",
        next.header("cache-status")
    );
    c.stop().await;
}

/// Redis slow or gone: each replica serves from its own memory (hits do not wait for
/// Redis at all, misses go upstream), no client sees an error; once Redis is back the
/// shared tier is used again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_replicas_serve_from_memory_and_share_again_after() {
    let _one = SERIAL.lock().await;
    let Some(mut c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    for r in 0..2 {
        assert_eq!(c.get(r, "/me").await.status, StatusCode::OK);
    }
    // A Redis that hangs for 3 s: a memory hit answers as if it were not there.
    let mut blocker = conn(&c.redis).await;
    let hang = tokio::spawn(async move {
        let _: redis::RedisResult<i64> = redis::cmd("EVAL")
            .arg(
                "local s = tonumber(redis.call('TIME')[1]) \
                 while tonumber(redis.call('TIME')[1]) - s < 3 do end return 1",
            )
            .arg(0)
            .query_async(&mut blocker)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let hit = c.get(0, "/me").await;
    let hit_took = started.elapsed();
    assert!(hit.header("cache-status").starts_with("cxgate; hit"));
    assert!(
        hit_took < Duration::from_secs(1),
        "expected a memory hit at once, took {hit_took:?}"
    );
    let started = Instant::now();
    let miss = c.get(0, "/12345/inbox/contact/hang/1").await;
    let miss_took = started.elapsed();
    assert_eq!(
        miss.status,
        StatusCode::OK,
        "expected a miss answered while Redis hangs"
    );
    assert!(
        miss_took < Duration::from_secs(2),
        "expected a miss delayed by one bounded Redis call at most, took {miss_took:?}"
    );
    let _ = hang.await;
    println!("while Redis hung: memory hit {hit_took:?}, miss {miss_took:?}");

    c.redis.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for r in 0..2 {
        let a = c.get(r, "/me").await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "expected replica {r} to answer without Redis"
        );
        assert!(
            a.header("cache-status").starts_with("cxgate; hit"),
            "expected replica {r} to serve /me from memory, saw {:?}",
            a.header("cache-status")
        );
        let path = format!("/12345/inbox/contact/gone/{r}");
        assert_eq!(
            c.get(r, &path).await.status,
            StatusCode::OK,
            "expected {path}"
        );
    }
    assert!(
        c.metric(0, "cxgate_cache_shared_lookups_total{result=\"error\"}")
            .await
            >= Some(1.0)
    );

    c.redis.restart();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline
        && futures_all(&c, "cxgate_redis_up")
            .await
            .iter()
            .any(|v| *v != Some(1.0))
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let back = "/12345/inbox/contact/back/1";
    assert_eq!(c.get(0, back).await.status, StatusCode::OK);
    let shared = c.get(1, back).await;
    assert!(
        shared.header("cache-status").contains("detail=shared"),
        "expected the shared tier used again once Redis is back, saw {:?}",
        shared.header("cache-status")
    );
    assert_eq!(
        calls(&c, &format!("GET {back}")),
        1,
        "expected one upstream call"
    );
    c.stop().await;
}

/// `cache.shared` needs the Redis backend, and is off by default.
#[test]
fn the_shared_cache_needs_redis() {
    let base =
        "[upstream]\nbase_url = \"https://api.engagor.com\"\n[token]\naccess_token_env = \"X\"\n";
    let cfg = cxgate::config::parse(base).expect("a valid config");
    assert!(!cfg.cache.shared, "expected the shared tier off by default");
    let refused = match cxgate::config::parse(&format!("{base}[cache]\nshared = true\n")) {
        Ok(_) => Vec::new(),
        Err(e) => e.lines(),
    };
    assert!(
        refused.len() == 1 && refused[0].starts_with("cache.shared:"),
        "expected one problem naming cache.shared, saw {refused:?}"
    );
    let good = format!(
        "{base}[cache]\nshared = true\nshared_max_entry_bytes = \"64KiB\"\n[budget]\nbackend = \"redis\"\nredis_url_env = \"U\"\n"
    );
    let cfg = cxgate::config::parse(&good)
        .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}", e.lines()));
    assert_eq!(
        (cfg.cache.shared, cfg.cache.shared_max_entry_bytes),
        (true, 64 << 10)
    );
}

/// A reload that changes a route's caching rules retires the shared entries (stored under
/// the old rules) for every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_routes_retires_shared_entries() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    assert_eq!(c.get(0, "/me").await.status, StatusCode::OK);
    assert!(
        shared_entry(&c, "/me").await.is_some(),
        "expected /me shared"
    );
    let path = c.dirs[0].join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let changed = text.replacen("ttl = \"10m\"", "ttl = \"9m\"", 1);
    assert_ne!(changed, text, "expected the /me route's ttl in the file");
    std::fs::write(&path, changed).expect("write config");
    let reloaded = c.admin(0, Method::POST, "/admin/reload", "").await;
    assert_eq!(
        reloaded.status,
        StatusCode::OK,
        "expected the reload accepted"
    );
    let other = c.get(1, "/me").await;
    assert!(
        other.header("cache-status").contains("fwd=uri-miss"),
        "expected the entry stored under the old rules not served, saw {:?}",
        other.header("cache-status")
    );
    c.stop().await;
}

/// Reads `path` on a replica until its body holds `text` (at most 1 s: a write through
/// another replica reaches this one's memory by message); the last answer's
/// `Cache-Status` and body.
async fn eventually_shows(c: &Cluster, replica: usize, path: &str, text: &str) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let answer = c.get(replica, path).await;
        let body = String::from_utf8_lossy(&answer.body).into_owned();
        if body.contains(text) || Instant::now() >= deadline {
            return (answer.header("cache-status").to_string(), body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads `path` on a replica until it is a hit there (at most 1 s).
async fn eventually_cached(c: &Cluster, replica: usize, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let status = c
            .get(replica, path)
            .await
            .header("cache-status")
            .to_string();
        if status.contains("hit") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {path} cached on replica {replica}, saw {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A rolling reload that renames a tag: replica 1 runs the new route table, replica 0 still
/// the old. A write through either drops what both stored under their own tag names (in
/// Redis and in each replica's memory), so neither serves the contact as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_rolling_reload_drops_what_either_table_tagged() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/42";
    for r in 0..2 {
        assert_eq!(c.get(r, contact).await.status, StatusCode::OK);
    }
    let path = c.dirs[1].join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let renamed = text.replace("contact:{account_id}", "person:{account_id}");
    assert_eq!(
        renamed.matches("person:").count(),
        2,
        "expected the contact tag renamed in its read and its write route"
    );
    std::fs::write(&path, renamed).expect("write config");
    let reloaded = c.admin(1, Method::POST, "/admin/reload", "").await;
    assert_eq!(
        reloaded.status,
        StatusCode::OK,
        "expected only replica 1 reloaded, saw {:?}",
        reloaded.body
    );
    for (writer, note) in [(1, "through-the-new-table"), (0, "through-the-old-table")] {
        for r in 0..2 {
            eventually_cached(&c, r, contact).await;
        }
        let updates = format!("updates=%7B%22note%22%3A%22{note}%22%7D");
        let written = c.post(writer, contact, &updates).await;
        assert!(
            written.status.is_success(),
            "expected the write through replica {writer} to succeed, saw {}",
            written.status
        );
        // Replica 1 reads first: it fetches and shares its answer under its table's tags,
        // and replica 0 takes that entry, so the next write through replica 0 must drop an
        // entry its own table did not tag, in its own memory too.
        for r in [1, 0] {
            let (status, body) = eventually_shows(&c, r, contact, note).await;
            assert!(
                body.contains(note),
                "expected replica {r} to show the write through replica {writer} ({note}), \
                 saw {status:?} with {body}"
            );
        }
    }
    c.stop().await;
}

/// A shared entry another cxgate version wrote in another format (`cxg1`) is passed over:
/// the read fetches, the entry is never served, and the lookup counts as `other_format`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_entry_of_another_format_is_passed_over_and_counted() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(1, SimOptions::default()).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    redis::cmd("SET")
        .arg(key(&c, "cache:entry:GET /me"))
        .arg(b"cxg1 an entry of the first format".as_slice())
        .arg("PX")
        .arg(60_000)
        .query_async::<()>(&mut redis)
        .await
        .expect("store an entry of the first format");
    let read = c.get(0, "/me").await;
    assert_eq!(read.status, StatusCode::OK);
    assert!(
        read.header("cache-status").contains("fwd=uri-miss"),
        "expected the old entry passed over and /me fetched, saw {:?}",
        read.header("cache-status")
    );
    assert_eq!(calls(&c, "GET /me"), 1, "expected one upstream call");
    let counted = c
        .metric(
            0,
            "cxgate_cache_shared_lookups_total{result=\"other_format\"}",
        )
        .await;
    assert_eq!(
        counted,
        Some(1.0),
        "expected the lookup counted as other_format"
    );
    c.stop().await;
}

/// `n` reads of `path` sent at once, alternating over the replicas, each in its own task.
fn spawn_reads(c: &Cluster, path: &str, n: usize) -> Vec<tokio::task::JoinHandle<Answer>> {
    (0..n)
        .map(|i| {
            let http = c.http.clone();
            let url = format!("http://{}{path}", c.replicas[i % c.replicas.len()].addr);
            tokio::spawn(async move {
                let req = Request::builder()
                    .uri(url)
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
                    .await
                    .expect("expected an answer within 10 s")
                    .expect("expected the replica to answer");
                let (parts, body) = resp.into_parts();
                Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: body.collect().await.expect("body").to_bytes(),
                }
            })
        })
        .collect()
}

/// The answers of [`spawn_reads`], in order.
async fn answers(reads: Vec<tokio::task::JoinHandle<Answer>>) -> Vec<Answer> {
    let mut out = Vec::new();
    for read in reads {
        out.push(read.await.expect("read task"));
    }
    out
}

/// `n` concurrent reads of `path`, alternating over the replicas; their answers in order.
async fn concurrent_reads(c: &Cluster, path: &str, n: usize) -> Vec<Answer> {
    answers(spawn_reads(c, path, n)).await
}

/// Every key of the test deployment in Redis, with its value when it is a string.
async fn deployment_keys(c: &Cluster) -> Vec<(String, Option<Vec<u8>>)> {
    let mut redis = conn(&c.redis).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(key(c, "*"))
        .query_async(&mut redis)
        .await
        .expect("KEYS");
    let mut out = Vec::new();
    for k in keys {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&k)
            .query_async(&mut redis)
            .await
            .unwrap_or(None);
        out.push((k, value));
    }
    out
}

/// A replica's Cache-Status that says it took another replica's fill from Redis.
fn collapsed_into_shared(status: &str) -> bool {
    status.contains("collapsed") && status.contains("detail=shared")
}

/// Identical cold misses in flight on two replicas make one upstream call: one replica
/// takes the key's fill lock in Redis and fetches, the other waits for the entry it shares.
/// While the fill runs, its lock (a cache key, the replica's id) holds no token or key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_misses_on_two_replicas_make_one_upstream_call() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 600;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let Some(c) = shared_cluster(2, sim).await else {
        return;
    };
    let path = "/12345/inbox/contact/slow/7";
    let lock = key(&c, &format!("cache:lock:GET {path}"));
    let (answers, lock_seen) = tokio::join!(concurrent_reads(&c, path, 20), async {
        let mut redis = conn(&c.redis).await;
        // Until the lock is seen: the fill holds it for its 600 ms upstream call from
        // whenever the busy machine gets to it, so the bound is only for a lock never taken.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let held: Option<String> = redis::cmd("GET")
                .arg(&lock)
                .query_async(&mut redis)
                .await
                .expect("read the fill lock");
            if held.is_some() || Instant::now() >= deadline {
                return held;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let statuses: Vec<String> = answers
        .iter()
        .map(|a| a.header("cache-status").to_string())
        .collect();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(
            a.status,
            StatusCode::OK,
            "expected read {i} answered, saw {} {:?}",
            a.status,
            a.body
        );
        assert_eq!(
            a.body, answers[0].body,
            "expected read {i} to see the same answer"
        );
    }
    assert_eq!(
        calls(&c, &format!("GET {path}")),
        1,
        "expected one upstream call for 20 reads over two replicas; Cache-Status: {statuses:?}"
    );
    assert!(
        statuses.iter().any(|s| collapsed_into_shared(s)),
        "expected the waiting replica's reads collapsed into the shared fill, saw {statuses:?}"
    );
    // The waiting replica's lookup found nothing, and the fill answered it: told apart.
    let mut filled = 0.0;
    for replica in 0..2 {
        let name = "cxgate_cache_shared_lookups_total{result=\"filled\"}";
        filled += c.metric(replica, name).await.unwrap_or(0.0);
    }
    assert!(
        filled >= 1.0,
        "expected the misses answered by the other replica's fill counted as filled, saw {filled}"
    );
    let held = lock_seen.expect("expected the fill lock held while the fetch ran");
    assert!(
        !held.contains(ACCESS) && !held.contains(KEY) && !held.contains(REFRESH),
        "expected no token or key in the lock's value, saw {held:?}"
    );
    // The shared token record holds the token by design; the cache's keys never do.
    let cache_keys: Vec<_> = deployment_keys(&c)
        .await
        .into_iter()
        .filter(|(k, _)| k.contains("}:cache:"))
        .collect();
    assert!(
        cache_keys.iter().any(|(k, _)| k.contains("cache:entry:")),
        "expected the shared entry among the cache keys, saw {cache_keys:?}"
    );
    for (k, value) in cache_keys {
        let text = String::from_utf8_lossy(value.as_deref().unwrap_or_default()).into_owned();
        for secret in [ACCESS, REFRESH, KEY] {
            assert!(
                !k.contains(secret) && !text.contains(secret),
                "expected no token or client key in Redis key {k:?} or its value"
            );
        }
        assert!(
            !k.contains("cache:lock:"),
            "expected the fill lock released once its answer was shared, saw {k:?}"
        );
    }
    c.stop().await;
}

/// Short-lived routes for the expiry test: a contact past its ttl is fetched again (its
/// stale-if-error window keeps the old answer meanwhile), `/me` past its ttl is answered
/// stale and refreshed in the background.
const SHORT_ROUTES: &str = r#"
[[routes]]
match = "GET /me"
ttl = "3s"
stale_while_revalidate = "30s"
tags = ["me"]

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "3s"
stale_if_error = "30s"
tags = ["contact:{account_id}/{service}/{service_id}"]
"#;

/// Polls `path` on `replica` until it answers a fresh hit (at most 5 s); its last
/// `Cache-Status`.
async fn eventually_fresh(c: &Cluster, replica: usize, path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = c
            .get(replica, path)
            .await
            .header("cache-status")
            .to_string();
        if (status.contains("hit") && !status.contains("stale")) || Instant::now() >= deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Once every replica holds an entry (one fill, then shared hits), its expiry costs the
/// fleet one upstream call, not one per replica: reads past the ttl on all of them at once
/// merge into one refetch through the fill lock, and a stale-while-revalidate entry is
/// refreshed once in the background for all, with a replica just restarted among them too.
/// An entry a replica took from the shared tier keeps the age it had there, so its ttl ends
/// when the shared entry's does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_costs_the_fleet_one_call_not_one_per_replica() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    // Long enough for the replicas' reads past the ttl to overlap the refetch.
    sim.faults.latency_ms = 300;
    let Some(mut c) = shared_cluster_routed(3, sim, SHORT_ROUTES).await else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/77";
    for path in ["/me", contact] {
        assert_eq!(c.get(0, path).await.status, StatusCode::OK);
    }
    // A second later the other replicas take them from the shared tier, a second old.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for path in ["/me", contact] {
        for r in 1..3 {
            let hit = c.get(r, path).await;
            let status = hit.header("cache-status").to_string();
            let age: u64 = hit.header("age").parse().unwrap_or(0);
            assert!(
                status.contains("detail=shared") && age >= 1,
                "expected replica {r} to take {path} from the shared tier with the age it had \
                 there, saw {status:?}, Age {age}"
            );
        }
    }
    for path in ["GET /me", &format!("GET {contact}")] {
        assert_eq!(calls(&c, path), 1, "expected one fill of {path}");
    }
    // Past the ttl on every replica: memory and the shared tier hold the same stale entry.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let reads = spawn_reads(&c, contact, 12);
    let refreshes = spawn_reads(&c, "/me", 12);
    let (reads, refreshes) = (answers(reads).await, answers(refreshes).await);
    for a in reads.iter().chain(&refreshes) {
        assert_eq!(a.status, StatusCode::OK, "expected every read answered");
    }
    let stale: Vec<&str> = refreshes.iter().map(|a| a.header("cache-status")).collect();
    assert!(
        stale.iter().any(|s| s.contains("stale")),
        "expected /me answered stale while it is refreshed, saw {stale:?}"
    );
    for r in 0..3 {
        for path in ["/me", contact] {
            let status = eventually_fresh(&c, r, path).await;
            assert!(
                status.contains("hit") && !status.contains("stale"),
                "expected replica {r} to answer {path} fresh after the refetch, saw {status:?}"
            );
        }
    }
    assert_eq!(
        calls(&c, &format!("GET {contact}")),
        2,
        "expected one refetch of the expired contact for the three replicas"
    );
    assert_eq!(
        calls(&c, "GET /me"),
        2,
        "expected one background refresh of /me for the three replicas"
    );

    // A replica restarted once both are past their ttl again starts with an empty memory:
    // it sees the shared entries as old as they are (stale, not just stored), and its reads
    // merge with the others' into one refetch and one refresh, as before.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    c.restart_replica(2).await;
    let restarted = c.get(2, "/me").await;
    assert!(
        restarted.header("cache-status").contains("stale"),
        "expected the restarted replica to answer /me stale from the shared tier, saw {:?}",
        restarted.header("cache-status")
    );
    let reads = spawn_reads(&c, contact, 12);
    let refreshes = spawn_reads(&c, "/me", 12);
    for a in answers(reads).await.iter().chain(&answers(refreshes).await) {
        assert_eq!(a.status, StatusCode::OK, "expected every read answered");
    }
    for r in 0..3 {
        for path in ["/me", contact] {
            let status = eventually_fresh(&c, r, path).await;
            assert!(
                status.contains("hit") && !status.contains("stale"),
                "expected replica {r} to answer {path} fresh after the restart, saw {status:?}"
            );
        }
    }
    assert_eq!(
        (calls(&c, &format!("GET {contact}")), calls(&c, "GET /me")),
        (3, 3),
        "expected one refetch and one refresh for the fleet with a restarted replica in it"
    );
    c.stop().await;
}

/// The key of a client with a one-call share of the budget, and a long `max_wait`.
const SLOW_KEY: &str = "slow-key-0001";
/// The key of a client on the global share alone, with a short `max_wait`.
const FAST_KEY: &str = "fast-key-0001";

/// A read queued for its own client's budget on one replica is not calling upstream, so it
/// holds no fill lock: the same read on another replica, whose client's budget lets it go
/// at once, makes the call itself as it would alone (answered as its own stored miss, not
/// collapsed), and the queued read takes that answer from the shared tier at once instead
/// of waiting out its queue. One upstream call in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_queued_for_budget_on_one_replica_does_not_hold_back_another() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 300;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let slow = "scopes = [\"read\"]\nlimit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"5s\"";
    let clients = client_toml("slow", SLOW_KEY, slow)
        + &client_toml("fast", FAST_KEY, "scopes = [\"read\"]\nmax_wait = \"2s\"");
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let setup = Setup {
        sim,
        budget,
        cache: "shared = true",
        more_clients: &clients,
        ..Setup::new(2)
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    let path = "/12345/inbox/contact/slow/31";
    // The slow client spends its one cell on replica 0: its next call waits about 4 s.
    let first = c.get_as(0, "/12345/inbox/contact/slow/30", SLOW_KEY).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let spent = Instant::now();
    let (http, url) = (
        c.http.clone(),
        format!("http://{}{path}", c.replicas[0].addr),
    );
    let queued = tokio::spawn(async move {
        let req = Request::builder()
            .uri(url)
            .header("authorization", format!("Bearer {SLOW_KEY}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = http.request(req).await.expect("replica 0 answers");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        let answered = spent.elapsed();
        (
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            },
            answered,
        )
    });
    // Until the slow read's flight stands on replica 0, queued for its client's budget.
    let in_flight = || {
        c.replicas[0]
            .gateway
            .upstream_status(&serde_json::Value::Null)["merges_in_flight"]
            == 1
    };
    assert!(
        eventually(Duration::from_secs(5), in_flight).await,
        "expected the slow read in flight on replica 0"
    );
    let asked = Instant::now();
    let fast = c.get_as(1, path, FAST_KEY).await;
    let took = asked.elapsed();
    let fast_status = fast.header("cache-status").to_string();
    assert_eq!(fast.status, StatusCode::OK, "{:?}", fast.body);
    assert!(
        took < Duration::from_secs(2),
        "expected the fast read answered on its own budget, as alone (one 300 ms call), not \
         after the slow read's queue of about 4 s; took {took:?}, Cache-Status {fast_status:?}"
    );
    assert_eq!(
        fast_status, "cxgate; fwd=uri-miss; fwd-status=200; stored",
        "expected the fast read to say it made the call and stored its answer"
    );
    let (slow, answered) = queued.await.expect("slow read task");
    let slow_status = slow.header("cache-status").to_string();
    assert_eq!(slow.status, StatusCode::OK, "{:?}", slow.body);
    assert_eq!(
        slow.body, fast.body,
        "expected the slow read served the same answer"
    );
    assert!(
        collapsed_into_shared(&slow_status),
        "expected the queued slow read collapsed into the fast read's fill, saw {slow_status:?}"
    );
    assert!(
        answered < Duration::from_secs(3),
        "expected the queued slow read to take the fill once shared, well before its cell \
         came back about 4 s after it was spent; answered after {answered:?}"
    );
    assert_eq!(
        calls(&c, &format!("GET {path}")),
        1,
        "expected one upstream call for both reads"
    );
    println!(
        "fast read on replica 1 answered in {took:?} ({fast_status}); the queued slow read \
         on replica 0 {answered:?} after its cell was spent ({slow_status})"
    );
    c.stop().await;
}

/// A replica that dies holding a fill lock (here: a lock left in Redis by a replica that
/// never shares an answer nor releases it) holds the others back only until it expires:
/// then one of them takes the fill over and the rest take its answer, with no client error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_fill_holder_is_taken_over_when_its_lock_expires() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 300;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let Some(c) = shared_cluster(2, sim).await else {
        return;
    };
    let path = "/12345/inbox/contact/slow/8";
    let mut redis = conn(&c.redis).await;
    let _: Option<String> = redis::cmd("SET")
        .arg(key(&c, &format!("cache:lock:GET {path}")))
        .arg("a-replica-that-died:0")
        .arg("NX")
        .arg("PX")
        .arg(1500)
        .query_async(&mut redis)
        .await
        .expect("leave a dead holder's lock");
    let started = Instant::now();
    let answers = concurrent_reads(&c, path, 20).await;
    let took = started.elapsed();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(
            a.status,
            StatusCode::OK,
            "expected read {i} answered after the takeover, saw {} {:?}",
            a.status,
            a.body
        );
    }
    let statuses: Vec<&str> = answers.iter().map(|a| a.header("cache-status")).collect();
    assert_eq!(
        calls(&c, &format!("GET {path}")),
        1,
        "expected one upstream call, by the replica that took the fill over; saw {statuses:?}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "expected the reads held back until the dead holder's lock expired, took {took:?}"
    );
    println!("20 reads behind a dead holder's 1.5 s lock answered after {took:?}");
    c.stop().await;
}

/// Redis killed while one replica fetches and the other waits for its fill: the waiting
/// replica fetches on its own (merging its own requests still), every read is answered,
/// and the failed calls are counted in `cxgate_redis_errors_total{op="cache"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_lost_while_waiting_for_a_fill_means_fetching_alone() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 1500;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let Some(mut c) = shared_cluster(2, sim).await else {
        return;
    };
    let path = "/12345/inbox/contact/slow/9";
    let before: f64 = futures_all(&c, "cxgate_redis_errors_total{op=\"cache\"}")
        .await
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .sum();
    let reads = spawn_reads(&c, path, 20);
    // Let both replicas get as far as the lock (one holds it, one polls), then kill Redis.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        reads.iter().all(|r| !r.is_finished()),
        "expected the slow reads still in flight"
    );
    c.redis.stop();
    let answers = answers(reads).await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(
            a.status,
            StatusCode::OK,
            "expected read {i} answered without Redis, saw {} {:?}",
            a.status,
            a.body
        );
    }
    let made = calls(&c, &format!("GET {path}"));
    assert!(
        (1..=2).contains(&made),
        "expected at most one upstream call per replica, saw {made}"
    );
    let after: f64 = futures_all(&c, "cxgate_redis_errors_total{op=\"cache\"}")
        .await
        .iter()
        .map(|v| v.unwrap_or(0.0))
        .sum();
    assert!(
        after > before,
        "expected the lost fill counted as a cache Redis error ({before} before, {after} after)"
    );
    c.stop().await;
}

/// Keeps the test Redis paused (`CLIENT PAUSE`) `ms` at a time, back to back, from a
/// connection of its own until `stop` is set: every call waits up to `ms` for its answer,
/// as on a machine too loaded to run Redis promptly.
fn keep_pausing(
    c: &Cluster,
    ms: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    let options = options(&c.redis);
    let url = c.redis.url();
    tokio::spawn(async move {
        let mut redis = options.open(&url).await.expect("connect to pause Redis");
        let mut pauses = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            let paused: redis::RedisResult<()> = redis::cmd("CLIENT")
                .arg("PAUSE")
                .arg(ms)
                .query_async(&mut redis)
                .await;
            if paused.is_ok() {
                pauses += 1;
            }
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        pauses
    })
}

/// A Redis that answers late (paused 200 ms at a time, back to back: past the 100 ms bound
/// that moves the budget to its local share, within the 500 ms the token waits) does not
/// make a replica refresh the shared token alone. With refresh tokens that rotate on every
/// use, a refresh alone presents the refresh token another replica's refresh already spent:
/// the endpoint refuses it and the replica answers 503 until it adopts the others' token.
/// Under load 13-15 the Redis Cluster variant of the rotating-token suite saw exactly that
/// in two runs of three (2 refused reuses, 12 and 75 answers 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_redis_does_not_make_a_replica_refresh_the_token_alone() {
    let _one = SERIAL.lock().await;
    let sim = SimOptions {
        token_ttl: Duration::from_secs(3),
        ..SimOptions::default()
    };
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(3, sim, budget).await else {
        return;
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pausing = keep_pausing(&c, 150, stop.clone());
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0u64;
    let mut other = None;
    while started.elapsed() < Duration::from_secs(12) {
        let a = c
            .get((i % 3) as usize, &format!("/12345/inbox/contact/late/{i}"))
            .await;
        *statuses.entry(a.status.as_u16()).or_insert(0u64) += 1;
        if a.status != StatusCode::OK && other.is_none() {
            other = Some(String::from_utf8_lossy(&a.body).into_owned());
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let pauses = pausing.await.expect("pausing task");
    let stats = c.sim.stats();
    let refreshes = stats["token_refreshes"].as_u64().unwrap_or(0);
    let reused = stats["refresh_reuse_rejected"].as_u64().unwrap_or(0);
    println!(
        "12 s of 3-second rotating tokens on three replicas, Redis paused {pauses} times for \
         150 ms: {refreshes} refreshes, {reused} refused reuses, answers {statuses:?}, first \
         other {other:?}"
    );
    assert!(
        pauses >= 10,
        "expected Redis paused throughout, saw {pauses} pauses"
    );
    let mut failed = Vec::new();
    for r in 0..3 {
        let text = c.admin(r, Method::GET, "/metrics", "").await;
        let text = String::from_utf8_lossy(&text.body).into_owned();
        let errors = text
            .lines()
            .find(|l| l.starts_with("cxgate_token_refreshes_total{result=\"error\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        failed.push(errors.unwrap_or(0.0));
    }
    assert_eq!(
        reused, 0,
        "expected no refresh token presented twice: a late Redis made a replica refresh alone \
         (answers {statuses:?})"
    );
    assert!(
        failed.iter().all(|n| *n == 0.0),
        "expected no failed refresh on any replica, saw {failed:?}"
    );
    // Not asserted: every answer 200. A refresh that waits for a Redis paused half the time
    // can outlast the 1 s lead these 3-second tokens get (`refresh_before`), and requests
    // in that gap are answered 503 `token_unavailable` (13 to 18 of ~170 here, against 94
    // when a replica refreshed alone and was refused).
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "expected answers, saw {statuses:?}"
    );
    c.stop().await;
}

/// A Redis slower than the 100 ms call bound (paused 200 ms at a time, back to back) costs
/// the replicas latency, not upstream calls: cold reads of a key spread over three replicas
/// make one upstream call, every read is answered, each replica then answers the key from
/// memory, and no replica counts Redis as down meanwhile. (One slow answer used to mark
/// Redis down for the replica, whose fetches then stayed in its memory only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_costs_latency_not_upstream_calls() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 300;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let Some(c) = shared_cluster(3, sim).await else {
        return;
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pausing = keep_pausing(&c, 200, stop.clone());
    let mut seen = Vec::new();
    for round in 0..3 {
        let path = format!("/12345/inbox/contact/slow/{}", 40 + round);
        let answers = concurrent_reads(&c, &path, 30).await;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(
                a.status,
                StatusCode::OK,
                "expected round {round} read {i} answered on a slow Redis, saw {} {:?}",
                a.status,
                a.body
            );
        }
        // Then once more on each replica, one after another.
        for replica in 0..3 {
            let a = c.get(replica, &path).await;
            assert_eq!(
                a.status,
                StatusCode::OK,
                "expected the later read on replica {replica} answered, saw {} {:?}",
                a.status,
                a.body
            );
        }
        let statuses: Vec<String> = answers
            .iter()
            .map(|a| a.header("cache-status").to_string())
            .collect();
        seen.push((calls(&c, &format!("GET {path}")), statuses));
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let pauses = pausing.await.expect("pausing task");
    assert!(
        pauses >= 3,
        "expected Redis kept paused, saw {pauses} pauses"
    );
    for (round, (made, statuses)) in seen.iter().enumerate() {
        assert_eq!(
            *made, 1,
            "expected round {round}'s 33 reads over three replicas to make one upstream call \
             on a slow Redis, saw {made}; Cache-Status: {statuses:?}"
        );
    }
    let down: Vec<Option<f64>> =
        futures_all(&c, "cxgate_cache_shared_lookups_total{result=\"error\"}").await;
    assert!(
        down.iter().all(|v| *v == Some(0.0)),
        "expected no shared lookup given up on a slow Redis, saw {down:?}"
    );
    c.stop().await;
}

/// Redis killed by its process id under load on three replicas with the shared cache tier,
/// then started again on its port: no client sees an error, every replica shows the
/// fallback (`cxgate_redis_up` 0, shared lookups counted as errors) and keeps answering from
/// memory and the upstream, and within seconds of Redis returning a read filled through one
/// replica is a shared hit on the next again. The load reads each new key on two replicas in
/// turn, so it tells at every moment whether the shared tier is in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_tier_survives_redis_killed_under_load_and_returns() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(3, SimOptions::default()).await else {
        return;
    };
    let c = Arc::new(tokio::sync::RwLock::new(c));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let t0 = Instant::now();
    let mut load = tokio::task::JoinSet::new();
    for sender in 0..3usize {
        let (c, stop) = (c.clone(), stop.clone());
        load.spawn(async move {
            let mut statuses = std::collections::BTreeMap::new();
            // When the second read of a new key, on the next replica, came from the tier.
            let mut second_reads: Vec<(Duration, bool)> = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let fresh = format!("/12345/inbox/contact/killed{sender}/{i}");
                let hot = format!("/12345/inbox/contact/hot/{}", i % 20);
                let first = (sender + i as usize) % 3;
                let second = (first + 1) % 3;
                let c = c.read().await;
                for (replica, path) in [(first, &fresh), (second, &fresh), (second, &hot)] {
                    let a = c.get(replica, path).await;
                    *statuses.entry(a.status.as_u16()).or_insert(0u64) += 1;
                    if replica == second && path == &fresh {
                        let shared = a.header("cache-status").contains("detail=shared");
                        second_reads.push((t0.elapsed(), shared));
                    }
                }
                drop(c);
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (statuses, second_reads)
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let errors_before = futures_all(&*c.read().await, SHARED_ERRORS).await;
    c.write().await.redis.stop();
    let killed = t0.elapsed();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let down = futures_all(&*c.read().await, "cxgate_redis_up").await;
    let errors_down = futures_all(&*c.read().await, SHARED_ERRORS).await;
    c.write().await.redis.restart();
    let restarted = t0.elapsed();
    // Load on for a while after Redis is back, so the tier's return shows in the reads.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let up = futures_all(&*c.read().await, "cxgate_redis_up").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut statuses = std::collections::BTreeMap::new();
    let mut second_reads = Vec::new();
    while let Some(seen) = load.join_next().await {
        let (s, r) = seen.expect("load task");
        for (status, n) in s {
            *statuses.entry(status).or_insert(0) += n;
        }
        second_reads.extend(r);
    }
    second_reads.sort_by_key(|(at, _)| *at);
    let shared_before = second_reads.iter().filter(|(at, _)| *at < killed);
    let back_at = second_reads
        .iter()
        .filter(|(at, shared)| *at > restarted && *shared)
        .map(|(at, _)| *at - restarted)
        .next();
    let shared_last_second = second_reads
        .iter()
        .filter(|(at, _)| *at > restarted + Duration::from_secs(4))
        .collect::<Vec<_>>();
    println!(
        "answers {statuses:?}; redis_up while down {down:?}, after {up:?}; shared-lookup \
         errors {errors_before:?} -> {errors_down:?}; second reads {} before the kill, the \
         tier back {back_at:?} after the restart",
        shared_before.clone().count()
    );
    assert_eq!(
        statuses.keys().copied().collect::<Vec<_>>(),
        vec![200],
        "expected every read answered 200 across the outage, saw {statuses:?}"
    );
    assert!(
        shared_before.clone().all(|(_, shared)| *shared),
        "expected every second read a shared hit before the kill, saw {:?}",
        shared_before.collect::<Vec<_>>()
    );
    assert!(
        down.iter().all(|v| *v == Some(0.0)),
        "expected cxgate_redis_up 0 on every replica while Redis is down, saw {down:?}"
    );
    assert!(
        errors_down
            .iter()
            .zip(&errors_before)
            .all(|(down, before)| down.unwrap_or(0.0) > before.unwrap_or(0.0)),
        "expected shared lookups counted as errors on every replica while Redis is down, \
         {errors_before:?} before, {errors_down:?} after"
    );
    assert!(
        up.iter().all(|v| *v == Some(1.0)),
        "expected cxgate_redis_up 1 on every replica within 5 s of Redis returning, saw {up:?}"
    );
    assert!(
        back_at.is_some_and(|t| t < Duration::from_secs(4)),
        "expected a second read to be a shared hit within 4 s of Redis returning, saw {back_at:?}"
    );
    assert!(
        !shared_last_second.is_empty() && shared_last_second.iter().all(|(_, shared)| *shared),
        "expected every second read a shared hit again from 4 s after the restart, saw \
         {shared_last_second:?}"
    );
    let c = match Arc::try_unwrap(c) {
        Ok(c) => c.into_inner(),
        Err(_) => panic!("every load task has ended, so nothing else holds the cluster"),
    };
    c.stop().await;
}

/// Shared lookups Redis could not answer, on one replica.
const SHARED_ERRORS: &str = "cxgate_cache_shared_lookups_total{result=\"error\"}";

/// Whether `file` holds what a fallback to the working token leaves: the working refresh
/// token spent on one refresh (the fallback refreshes with the pair it goes back to, so the
/// request that found the refusal is replayed with a fresh token), never the made-up pair.
fn refreshed_from_working(file: &serde_json::Value) -> bool {
    let access = file["access_token"].as_str().unwrap_or("made-up");
    let refresh = file["refresh_token"].as_str().unwrap_or("made-up");
    !access.starts_with("made-up") && !refresh.starts_with("made-up") && refresh != REFRESH
}

/// The version of the shared token record.
async fn record_version(c: &Cluster) -> u64 {
    let mut redis = conn(&c.redis).await;
    let text: String = redis::cmd("GET")
        .arg(key(c, "token"))
        .query_async(&mut redis)
        .await
        .expect("read the token record");
    let v: serde_json::Value = serde_json::from_str(&text).expect("record JSON");
    v["version"].as_u64().expect("a record version")
}

/// A well-formed record with made-up tokens, written over the real one as the next version
/// with a later expiry, is adopted (it cannot be told from a real one), but it does not
/// destroy a working state: once the upstream refuses its token and the token endpoint its
/// refresh token, the replica goes back to the token it knew to work, restores it to its
/// file and offers it as the next version, and the other replica recovers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_token_record_that_fails_upstream_falls_back_to_the_working_token() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let answer = c.get(0, "/me/permissions").await;
    assert_eq!(answer.status, StatusCode::OK, "a first call with the token");
    tokio::time::sleep(WATCHES).await;
    let version = record_version(&c).await;
    set_record(
        &c,
        version + 1,
        serde_json::json!({"access_token": "made-up-access", "refresh_token": "made-up-refresh", "expires_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    for i in 0..2 {
        assert_eq!(
            token_file(&c, i)["access_token"].as_str(),
            Some("made-up-access"),
            "replica {i}: expected the tampered record adopted (the setup of this test)"
        );
    }
    let answer = c.get(0, "/12345/inbox/contact/twitter/after-tamper").await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the replica back on its working token, saw {answer:?}"
    );
    tokio::time::sleep(WATCHES).await;
    let stored = record_access(&c).await;
    let now = record_version(&c).await;
    assert!(
        !stored.starts_with("made-up") && now > version + 1,
        "expected the working token's successor offered back as a newer record, saw version \
         {now} holding {stored:?}"
    );
    for i in 0..2 {
        let file = token_file(&c, i);
        assert!(
            refreshed_from_working(&file) && file["access_token"].as_str() == Some(&*stored),
            "replica {i}: expected the working token's successor in its file, saw {file}"
        );
        let ready = c.admin(i, Method::GET, "/readyz", "").await;
        assert_eq!(
            ready.status,
            StatusCode::OK,
            "replica {i}: expected ready, saw {ready:?}"
        );
        let answer = c.get(i, "/12345/inbox/contact/twitter/recovered").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "replica {i}: expected requests served, saw {answer:?}"
        );
    }
    c.stop().await;
}

/// A replica that never made a call before a tampered record reached it has no working
/// token in memory: it goes back to the one its token file held before (`token.json.prev`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_call_falls_back_to_its_previous_token_file() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(1, SimOptions::default(), budget).await else {
        return;
    };
    tokio::time::sleep(WATCHES).await;
    let version = record_version(&c).await;
    set_record(
        &c,
        version + 1,
        serde_json::json!({"access_token": "made-up-access", "refresh_token": "made-up-refresh", "expires_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    assert_eq!(
        token_file(&c, 0)["access_token"].as_str(),
        Some("made-up-access"),
        "expected the tampered record adopted (the setup of this test)"
    );
    let answer = c.get(0, "/me/permissions").await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the replica back on its previous token file's token, saw {answer:?}"
    );
    let file = token_file(&c, 0);
    assert!(
        refreshed_from_working(&file),
        "expected the previous token's successor in the file, saw {file}"
    );
    assert_eq!(
        Some(record_access(&c).await.as_str()),
        file["access_token"].as_str(),
        "expected it offered back"
    );
    c.stop().await;
}

/// The tampered record's token reached the token file, and the gateway restarted before any
/// request showed it bad: the file says its token came from the record unaccepted, so the
/// restarted gateway still goes back to `token.json.prev` and its first request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_token_adopted_before_a_restart_still_falls_back_to_the_previous_file() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    // (A record with no expiry is not adopted over a token that has one at all: see
    // `a_token_record_from_the_future_or_without_expiry_is_not_adopted`.)
    let tampered = [
        serde_json::json!({"access_token": "made-up-access", "refresh_token": "made-up-refresh", "expires_at": "2099-01-01T00:00:00Z"}),
    ];
    for token in tampered {
        let Some(mut c) = cluster(1, SimOptions::default(), budget).await else {
            return;
        };
        tokio::time::sleep(WATCHES).await;
        let version = record_version(&c).await;
        set_record(&c, version + 1, token.clone()).await;
        assert!(
            eventually(Duration::from_secs(10), || token_file(&c, 0)
                ["access_token"]
                == "made-up-access")
            .await,
            "{token}: expected the tampered record adopted (the setup of this test)"
        );
        c.restart_replica(0).await;
        let answer = c.get(0, "/me/permissions").await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{token}: expected the restarted replica back on its previous token file's token, \
             saw {answer:?}"
        );
        let file = token_file(&c, 0);
        assert!(
            refreshed_from_working(&file),
            "{token}: expected the previous token's successor in the file, saw {file}"
        );
        let ready = c.admin(0, Method::GET, "/readyz", "").await;
        assert_eq!(ready.status, StatusCode::OK, "{token}: saw {ready:?}");
        assert_eq!(
            Some(record_access(&c).await.as_str()),
            file["access_token"].as_str(),
            "expected it offered back"
        );
        c.stop().await;
    }
}

/// A token adopted from the record keeps its mark in the token file when the upstream
/// accepts it (that proves its access token, not its refresh token) and `.prev` keeps the
/// last proven file, never a marked copy; the mark goes once this replica's own refresh
/// with the adopted refresh token succeeds: after a restart it is a working token like any
/// other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_token_is_unmarked_in_the_token_file_once_its_refresh_token_works() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let sim = SimOptions {
        token_ttl: Duration::from_secs(8),
        ..SimOptions::default()
    };
    let Some(c) = cluster(2, sim, budget).await else {
        return;
    };
    // Both tokens live 8 s and are refreshed 1 s ahead: one replica refreshes, the other
    // adopts its token from the record.
    let answer = c.get(0, "/me/permissions").await;
    assert_eq!(answer.status, StatusCode::OK, "a first call with the token");
    let marked = |i: usize| {
        let file = token_file(&c, i);
        file["access_token"] != ACCESS && file["adopted_unconfirmed"] == true
    };
    assert!(
        eventually(Duration::from_secs(20), || marked(0) || marked(1)).await,
        "expected a replica to adopt the other's refreshed token, marked: {} {}",
        token_file(&c, 0),
        token_file(&c, 1)
    );
    let i = usize::from(marked(1));
    let adopted = token_file(&c, i)["access_token"].clone();
    let answer = c.get(i, "/12345/inbox/contact/twitter/adopted").await;
    assert_eq!(answer.status, StatusCode::OK, "saw {answer:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let file = token_file(&c, i);
    let prev = std::fs::read_to_string(c.dirs[i].join("token.json.prev")).unwrap_or_default();
    assert!(
        (file["access_token"] != adopted || file["adopted_unconfirmed"] == true)
            && !prev.contains("adopted_unconfirmed"),
        "expected the mark kept after a call the upstream took (its refresh token is not \
         proven yet) and no marked copy in .prev: {file} / {prev}"
    );
    // An upstream 401 makes replica i refresh with the adopted refresh token (unless the
    // other replica's scheduled refresh came first, when it adopts that: tried again).
    let mut unmarked = false;
    for attempt in 0..5 {
        c.sim.set_faults(cxgate::sim::Faults {
            force_401: Some(cxgate::sim::Force401 { count: 1 }),
            ..cxgate::sim::Faults::default()
        });
        let answer = c
            .get(i, &format!("/12345/inbox/contact/twitter/refresh{attempt}"))
            .await;
        assert_eq!(answer.status, StatusCode::OK, "saw {answer:?}");
        unmarked = eventually(Duration::from_secs(2), || {
            let file = token_file(&c, i);
            file["access_token"] != adopted && file.get("adopted_unconfirmed").is_none()
        })
        .await;
        if unmarked {
            break;
        }
    }
    assert!(
        unmarked,
        "expected the mark gone once replica {i}'s own refresh replaced the adopted token: {}",
        token_file(&c, i)
    );
    c.stop().await;
}

/// 100 KB of junk in the list of route tables the replicas announce (`{prefix}:tables`)
/// costs nothing: the list is read only within its bound, so no script holds Redis up, no
/// replica marks Redis down, a write through one replica still drops what the other
/// stored, and the next announcement writes the list clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_list_of_route_tables_is_dropped_and_writes_still_invalidate() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/43";
    let list_key = key(&c, "tables");
    let mut redis = conn(&c.redis).await;
    let list: Option<String> = redis::cmd("GET")
        .arg(&list_key)
        .query_async(&mut redis)
        .await
        .expect("read the list of tables");
    let list = list.expect("expected the replicas' route table announced");
    let junk = format!("{list}{}", "x".repeat(100 * 1024));
    redis::cmd("SET")
        .arg(&list_key)
        .arg(&junk)
        .arg("PX")
        .arg(600_000)
        .query_async::<()>(&mut redis)
        .await
        .expect("plant junk in the list of tables");
    for r in 0..2 {
        assert_eq!(c.get(r, contact).await.status, StatusCode::OK);
        eventually_cached(&c, r, contact).await;
    }
    let written = c
        .post(0, contact, "updates=%7B%22note%22%3A%22after-junk%22%7D")
        .await;
    assert!(
        written.status.is_success(),
        "expected the write to succeed, saw {}",
        written.status
    );
    for r in [1, 0] {
        let (status, body) = eventually_shows(&c, r, contact, "after-junk").await;
        assert!(
            body.contains("after-junk"),
            "expected replica {r} to show the write despite the junk, saw {status:?} with {body}"
        );
    }
    for r in 0..2 {
        assert_eq!(
            c.metric(r, "cxgate_redis_up").await,
            Some(1.0),
            "replica {r}: expected Redis still counted up with junk in the list of tables"
        );
    }
    // Announcements come every 10 s: the next one leaves a list within its bound.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let size: usize = redis::cmd("STRLEN")
            .arg(&list_key)
            .query_async(&mut redis)
            .await
            .expect("STRLEN of the list");
        if size <= cxgate::replicas::MAX_LIST_BYTES {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected the next announcement to write the list clean, still {size} bytes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.stop().await;
}

/// A fill lock planted with no expiry, or with one far past a lock's lease (no replica
/// sets either), counts as expired: the first miss that looks at it deletes it, every read
/// is answered (none waits out its `max_wait` behind it and is refused), and no lock is
/// left without a lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_fill_lock_without_expiry_counts_as_expired() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    for (path, expiry) in [
        ("/12345/inbox/contact/twitter/planted-1", None),
        ("/12345/inbox/contact/twitter/planted-2", Some(3_600_000)),
    ] {
        let lock = key(&c, &format!("cache:lock:GET {path}"));
        let mut set = redis::cmd("SET");
        set.arg(&lock).arg("planted:0");
        if let Some(px) = expiry {
            set.arg("PX").arg(px);
        }
        set.query_async::<()>(&mut redis)
            .await
            .expect("plant a fill lock");
        let answers = concurrent_reads(&c, path, 6).await;
        for (i, a) in answers.iter().enumerate() {
            assert_eq!(
                a.status,
                StatusCode::OK,
                "{path}: expected read {i} answered, saw {} {:?}",
                a.status,
                a.body
            );
        }
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&lock)
            .query_async(&mut redis)
            .await
            .expect("PTTL of the lock");
        let lease = i64::try_from(cxgate::cache::LOCK_TTL.as_millis()).expect("lease in ms");
        assert!(
            ttl == -2 || (0..=lease).contains(&ttl),
            "{path}: expected the planted lock gone or within its {lease} ms lease, saw PTTL {ttl}"
        );
    }
    c.stop().await;
}

/// A write answered on one replica has been applied by every other replica before the
/// client has the answer: a read sent to another replica right after it never serves the
/// copy that replica held in memory, over many rounds (each writer in turn, both readers).
/// The writers count the publications as acknowledged. The readers are kept busy with
/// unrelated invalidations published just before each write, which widens the moment
/// between a message's arrival and its application that an unacknowledged write would race.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_on_another_replica_right_after_a_write_never_sees_the_old_data() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(3, SimOptions::default()).await else {
        return;
    };
    let rounds = 30;
    let mut stale = Vec::new();
    for round in 0..rounds {
        let contact = format!("/12345/inbox/contact/facebook/{}", 1000 + round);
        for r in 0..3 {
            eventually_cached(&c, r, &contact).await;
        }
        let note = format!("round-{round}-written");
        let writer = round % 3;
        // The other replicas busy with a run of unrelated invalidations (as under a burst of
        // writes elsewhere), so theirs of this write is applied a moment after it arrives.
        let mut flood = redis::pipe();
        for i in 0..300 {
            let message = serde_json::json!({"from": "elsewhere", "what": {"tags": [format!("flood:{round}:{i}")]}});
            flood
                .cmd("PUBLISH")
                .arg(key(&c, "invalidate"))
                .arg(message.to_string())
                .ignore();
        }
        let mut redis = conn(&c.redis).await;
        let () = flood
            .query_async(&mut redis)
            .await
            .expect("publish the unrelated invalidations");
        let written = c
            .post(
                writer,
                &contact,
                &format!("updates=%7B%22note%22%3A%22{note}%22%7D"),
            )
            .await;
        assert!(
            written.status.is_success(),
            "expected the write of round {round} to succeed, saw {}",
            written.status
        );
        for reader in (0..3).filter(|r| *r != writer) {
            let read = c.get(reader, &contact).await;
            if !String::from_utf8_lossy(&read.body).contains(&note) {
                stale.push((round, reader, read.header("cache-status").to_string()));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "expected no read right after a write to show the old contact, saw {} of {} \
         (round, reader, Cache-Status): {stale:?}",
        stale.len(),
        rounds * 2
    );
    let mut acknowledged = 0.0;
    for r in 0..3 {
        acknowledged += c
            .metric(
                r,
                "cxgate_redis_invalidations_total{result=\"acknowledged\"}",
            )
            .await
            .unwrap_or(0.0);
    }
    assert!(
        acknowledged >= rounds as f64,
        "expected every write's invalidation acknowledged by the other replicas, saw \
         {acknowledged} of {rounds}"
    );
    c.stop().await;
}

/// A replica whose table gives a route a shorter ttl than the replica that shared an entry
/// does not serve that entry past its own ttl: it fetches anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_entry_is_served_no_longer_than_the_readers_own_ttl() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let path = c.dirs[1].join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let shorter = text.replace("ttl = \"5m\"\nstale_if_error = \"30m\"", "ttl = \"1s\"");
    assert_ne!(shorter, text, "expected the contact route's ttl shortened");
    std::fs::write(&path, shorter).expect("write config");
    let reloaded = c.admin(1, Method::POST, "/admin/reload", "").await;
    assert_eq!(
        reloaded.status,
        StatusCode::OK,
        "expected replica 1 reloaded"
    );
    let contact = "/12345/inbox/contact/twitter/77";
    let first = c.get(0, contact).await;
    assert!(
        first.header("cache-status").contains("stored"),
        "expected replica 0 to fetch and store, saw {:?}",
        first.header("cache-status")
    );
    // Past replica 1's own ttl (1 s), well within replica 0's (5 min).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = calls(&c, &format!("GET {contact}"));
    let read = c.get(1, contact).await;
    let status = read.header("cache-status").to_string();
    assert!(
        !status.contains("hit"),
        "expected replica 1 not to serve the shared entry past its own 1 s ttl, saw {status:?}"
    );
    assert_eq!(
        calls(&c, &format!("GET {contact}")),
        before + 1,
        "expected replica 1 to fetch the contact anew"
    );
    c.stop().await;
}

/// A purge by tag on a replica whose table renamed the tag drops the entries the other
/// table tagged for the same resource too: in Redis, in the other replica's memory, and in
/// its own memory, where the entry it took from Redis carries the other table's tags.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_by_tag_drops_what_another_table_tagged_for_the_same_resource() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let path = c.dirs[1].join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("read config");
    let renamed = text.replace("contact:{account_id}", "contactv2:{account_id}");
    assert_eq!(
        renamed.matches("contactv2:").count(),
        2,
        "expected the tag renamed"
    );
    std::fs::write(&path, renamed).expect("write config");
    let reloaded = c.admin(1, Method::POST, "/admin/reload", "").await;
    assert_eq!(
        reloaded.status,
        StatusCode::OK,
        "expected replica 1 reloaded"
    );
    let contact = "/12345/inbox/contact/twitter/91";
    assert_eq!(c.get(0, contact).await.status, StatusCode::OK);
    for r in 0..2 {
        eventually_cached(&c, r, contact).await;
    }
    let purged = c
        .admin(
            1,
            Method::POST,
            "/admin/purge",
            r#"{"tags":["contactv2:12345/twitter/91"]}"#,
        )
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    let body: serde_json::Value = serde_json::from_slice(&purged.body).expect("JSON");
    assert!(
        body["purged"].as_u64() >= Some(1),
        "expected the purge to count replica 1's own copy, saw {body}"
    );
    assert!(
        shared_entry(&c, contact).await.is_none(),
        "expected the shared entry, tagged by replica 0's table, deleted"
    );
    for r in 0..2 {
        let status = c.get(r, contact).await.header("cache-status").to_string();
        assert!(
            !status.contains("hit") || status.contains("detail=shared"),
            "expected replica {r} to have dropped its copy, saw {status:?}"
        );
    }
    c.stop().await;
}

/// Where an entry's fetched time (Unix ms, then its three windows and its status) starts in
/// the shared tier's encoding: after the marker and the global generation it was written under.
fn stamp_at(entry: &[u8]) -> usize {
    6 + usize::from(u16::from_le_bytes([entry[4], entry[5]]))
}

/// Now on the wall clock, in Unix milliseconds.
fn unix_millis() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(now.as_millis()).expect("millis")
}

/// Fills `path` through replica 0 and returns its shared entry as Redis holds it.
async fn filled(c: &Cluster, path: &str) -> Vec<u8> {
    let answer = c.get(0, path).await;
    assert_eq!(answer.status, StatusCode::OK, "expected {path} answered");
    shared_entry(c, path)
        .await
        .unwrap_or_else(|| panic!("expected {path} in the shared tier"))
}

/// Stores `value` under `path`'s shared entry key, with no Redis expiry.
async fn plant(c: &Cluster, path: &str, value: &[u8]) {
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("SET")
        .arg(key(c, &format!("cache:entry:GET {path}")))
        .arg(value)
        .query_async(&mut redis)
        .await
        .expect("plant a shared entry");
}

/// Reads `path` on replica 1 (whose memory does not hold it) and expects it fetched anew,
/// not served from what was planted in Redis: `what` says what was planted. What it saw
/// otherwise, so one run shows every case that fails.
async fn refetched(c: &Cluster, path: &str, what: &str) -> Result<(), String> {
    let before = calls(c, "GET /me");
    let read = c.get(1, path).await;
    let status = read.header("cache-status").to_string();
    if read.status != StatusCode::OK || !status.contains("fwd=uri-miss") {
        return Err(format!(
            "{what}: expected the planted entry passed over and {path} fetched, saw {} {status:?}",
            read.status
        ));
    }
    let after = calls(c, "GET /me");
    if after != before + 1 {
        return Err(format!(
            "{what}: expected one upstream call, saw {}",
            after - before
        ));
    }
    Ok(())
}

/// What the shared tier reads from Redis is bounded as an upstream answer is: an entry's
/// windows are cut to the reading route's (a ttl of 2^32-1 ms on a 10-minute route), one
/// fetched in the future (which would never age) is refused, and so are a status the gateway
/// never stores, a body cut short by a byte, and an entry over `shared_max_entry_bytes`
/// (never read: Redis measures it first). Each is counted as invalid, and Redis stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_read_from_the_shared_tier_are_bounded_and_checked() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let mut failed = Vec::new();
    // Fetched two hours ago with every window at its most: a route of 10 min + 1 h is over.
    let path = "/me?case=windows";
    let mut entry = filled(&c, path).await;
    let at = stamp_at(&entry);
    entry[at..at + 8].copy_from_slice(&(unix_millis() - 2 * 3_600_000).to_le_bytes());
    for window in 0..3 {
        let w = at + 8 + 4 * window;
        entry[w..w + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    }
    plant(&c, path, &entry).await;
    failed.extend(refetched(&c, path, "windows of 2^32-1 ms").await.err());

    let path = "/me?case=future";
    let mut entry = filled(&c, path).await;
    let at = stamp_at(&entry);
    let future = unix_millis() + 10 * 365 * 86_400_000;
    entry[at..at + 8].copy_from_slice(&future.to_le_bytes());
    plant(&c, path, &entry).await;
    failed.extend(
        refetched(&c, path, "a fetched time ten years ahead")
            .await
            .err(),
    );

    let path = "/me?case=cut";
    let entry = filled(&c, path).await;
    plant(&c, path, &entry[..entry.len() - 1]).await;
    failed.extend(refetched(&c, path, "a body cut by one byte").await.err());

    let path = "/me?case=huge";
    let mut entry = filled(&c, path).await;
    entry.extend(std::iter::repeat_n(b' ', 2 << 20));
    plant(&c, path, &entry).await;
    failed.extend(refetched(&c, path, "an entry of 2 MiB").await.err());

    // 101 last: a gateway that served it left the connection hanging.
    for status in [500u16, 302, 304, 999, 101] {
        if status == 101 {
            eprintln!("failed before the 101 case: {failed:#?}");
        }
        let path = format!("/me?case=status{status}");
        let mut entry = filled(&c, &path).await;
        let at = stamp_at(&entry) + 8 + 12;
        entry[at..at + 2].copy_from_slice(&status.to_le_bytes());
        plant(&c, &path, &entry).await;
        let what = format!("status {status}");
        failed.extend(refetched(&c, &path, &what).await.err());
    }

    let invalid = c
        .metric(1, "cxgate_cache_shared_lookups_total{result=\"invalid\"}")
        .await;
    if invalid != Some(8.0) {
        failed.push(format!(
            "expected every planted entry but the one with long windows counted invalid (8), \
             saw {invalid:?}"
        ));
    }
    let up = c.metric(1, "cxgate_redis_up").await;
    if up != Some(1.0) {
        failed.push(format!("expected Redis up on replica 1, saw {up:?}"));
    }
    assert!(failed.is_empty(), "{failed:#?}");
    c.stop().await;
}

/// An entry in Redis that holds the token the replicas hold is none a replica wrote (every
/// answer is redacted before it is stored), so it is refused as an upstream answer holding
/// one would be: passed over, counted invalid, fetched anew, and the token never reaches
/// the client, spelled raw or percent-encoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_entry_holding_the_held_token_is_never_served() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let encoded: String = ACCESS.bytes().map(|b| format!("%{b:02X}")).collect();
    let mut failed = Vec::new();
    for (case, spelled) in [("raw", ACCESS.to_string()), ("encoded", encoded)] {
        let path = format!("/me?case=token-{case}");
        let mut entry = filled(&c, &path).await;
        // Same length in place of the end of the body, so the entry stays well formed.
        let at = entry.len() - spelled.len() - 2;
        entry[at..at + spelled.len()].copy_from_slice(spelled.as_bytes());
        plant(&c, &path, &entry).await;
        let read = c.get(1, &path).await;
        let body = String::from_utf8_lossy(&read.body);
        if body.contains(ACCESS) || body.contains(&spelled) {
            failed.push(format!("{case}: the held token reached the client: {body}"));
        }
        let status = read.header("cache-status").to_string();
        if read.status != StatusCode::OK || !status.contains("fwd=uri-miss") {
            failed.push(format!(
                "{case}: expected the planted entry passed over and {path} fetched, saw {} \
                 {status:?}",
                read.status
            ));
        }
    }
    let invalid = c
        .metric(1, "cxgate_cache_shared_lookups_total{result=\"invalid\"}")
        .await;
    // Each look of the read (the lookup, then the fill wait's) counts what it passes over.
    if invalid.is_none_or(|n| n < 2.0) {
        failed.push(format!(
            "expected both planted entries counted invalid, saw {invalid:?}"
        ));
    }
    assert!(failed.is_empty(), "{failed:#?}");
    c.stop().await;
}

/// A purge or a write deletes only the entries of its groups: a key that is not one of this
/// deployment's entries, added to a group's set in Redis, is left alone (another prefix's
/// key, the budget's, the generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_delete_only_this_deployments_entries_whatever_a_set_lists() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(1, SimOptions::default()).await else {
        return;
    };
    filled(&c, "/me").await;
    let victims = [
        "{other}:precious".to_string(),
        "unrelated".to_string(),
        key(&c, "budget:planted"),
        key(&c, "cache:gen"),
        key(&c, "cache:entryish"),
    ];
    let mut redis = conn(&c.redis).await;
    for victim in &victims {
        let () = redis::cmd("SET")
            .arg(victim)
            .arg("7")
            .query_async(&mut redis)
            .await
            .expect("plant a key");
        let _: i64 = redis::cmd("SADD")
            .arg(key(&c, "cache:set:tag:me"))
            .arg(victim)
            .query_async(&mut redis)
            .await
            .expect("list it in the tag's set");
    }
    let purged = c
        .admin(0, Method::POST, "/admin/purge", r#"{"tags":["me"]}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    assert!(
        shared_entry(&c, "/me").await.is_none(),
        "expected the tag's own entry deleted"
    );
    for victim in &victims {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(victim)
            .query_async(&mut redis)
            .await
            .expect("EXISTS");
        assert_eq!(exists, 1, "expected {victim} left alone by the purge");
    }
    c.stop().await;
}

/// A purge of everything stays done when Redis loses the global generation afterwards:
/// neither the replica that purged nor one that heard of it serves an entry written before
/// it, and the generation is put back in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_purge_is_not_undone_by_losing_the_generation() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    // One path per replica to read afterwards: the first read fetches and shares anew.
    filled(&c, "/me").await;
    filled(&c, "/me/accounts").await;
    assert!(c.get(1, "/me").await.header("cache-status").contains("hit"));
    let purged = c
        .admin(0, Method::POST, "/admin/purge", r#"{"all":true}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    // Replica 1 heard of it once its memory is empty (it learns the generation first).
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.metric(1, "cxgate_cache_entries").await != Some(0.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        shared_entry(&c, "/me").await.is_some(),
        "expected the purged entry still in Redis (retired by generation)"
    );
    let mut redis = conn(&c.redis).await;
    let gen = key(&c, "cache:gen");
    let _: i64 = redis::cmd("DEL")
        .arg(&gen)
        .query_async(&mut redis)
        .await
        .expect("DEL");
    for (replica, path) in [(1, "/me"), (0, "/me/accounts")] {
        let read = c.get(replica, path).await;
        assert!(
            read.header("cache-status").contains("fwd=uri-miss"),
            "expected replica {replica} not to serve the purged entry of {path}, saw {:?}",
            read.header("cache-status")
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut back: Option<String> = None;
    while Instant::now() < deadline {
        back = redis::cmd("GET")
            .arg(&gen)
            .query_async(&mut redis)
            .await
            .expect("GET");
        if back.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        back.as_deref(),
        Some("1"),
        "expected the generation put back"
    );
    c.stop().await;
}

/// A global generation of the wrong type in Redis (a hash) is replaced by the next purge of
/// everything, which counts no Redis error: the replica stays on Redis, and the purge holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_of_the_wrong_type_is_replaced_not_an_outage() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    let gen = key(&c, "cache:gen");
    let _: i64 = redis::cmd("HSET")
        .arg(&gen)
        .arg("a")
        .arg("b")
        .query_async(&mut redis)
        .await
        .expect("HSET");
    // Shared or not (its write may race the generation's repair), it is in memory.
    assert_eq!(c.get(0, "/me").await.status, StatusCode::OK);
    let purged = c
        .admin(0, Method::POST, "/admin/purge", r#"{"all":true}"#)
        .await;
    assert_eq!(purged.status, StatusCode::OK, "expected the purge accepted");
    // Probes run every 250 ms while Redis is marked down: a few of them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let kind: String = redis::cmd("TYPE")
        .arg(&gen)
        .query_async(&mut redis)
        .await
        .expect("TYPE");
    assert_eq!(
        kind, "string",
        "expected the generation replaced by a count"
    );
    for replica in 0..2 {
        assert_eq!(
            c.metric(replica, "cxgate_redis_errors_total{op=\"cache\"}")
                .await,
            Some(0.0),
            "expected no Redis error on replica {replica}"
        );
        assert_eq!(c.metric(replica, "cxgate_redis_up").await, Some(1.0));
    }
    let read = c.get(1, "/me").await;
    assert!(
        read.header("cache-status").contains("fwd=uri-miss"),
        "expected the purged entry not served, saw {:?}",
        read.header("cache-status")
    );
    c.stop().await;
}

/// A read its shared budget refuses on one replica (the global queue is longer than its
/// max_wait) while the same read queues on another replica, whose cell comes within the
/// refused read's max_wait, takes that replica's fill from the shared tier: it is not
/// answered 429 for a read the fleet fetches anyway. One upstream call for the key; a read
/// of a key no replica is fetching is still refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_refused_on_one_replica_takes_the_fill_of_one_queued_on_another() {
    let _one = SERIAL.lock().await;
    let mut sim = SimOptions::default();
    sim.faults.latency_ms = 200;
    sim.faults.path_prefix = Some("/12345/inbox/contact/slow/".to_string());
    let setup = Setup {
        sim,
        budget: "limit = 1\nperiod = \"1s\"\nburst = 1\nmax_wait = \"2s\"",
        cache: "shared = true",
        ..Setup::new(2)
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    let first = c.get_as(0, "/12345/inbox/contact/slow/40", KEY).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    // On replica 0, contact 41 queues for the next cell (about 1 s away) and contact 42 for
    // the one after (about 2 s away): the shared queue is then as long as a max_wait.
    let path = "/12345/inbox/contact/slow/41";
    let mut queued = Vec::new();
    for n in [41, 42] {
        let (http, url) = (
            c.http.clone(),
            format!("http://{}/12345/inbox/contact/slow/{n}", c.replicas[0].addr),
        );
        queued.push(tokio::spawn(async move {
            let req = Request::builder()
                .uri(url)
                .header("authorization", format!("Bearer {KEY}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = http.request(req).await.expect("replica 0 answers");
            resp.status()
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Alone, a read on replica 1 now waits past its 2 s and is refused at once...
    let alone = c.get_as(1, "/12345/inbox/contact/slow/43", KEY).await;
    assert_eq!(
        alone.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected a read of a key no replica fetches refused, saw {} {:?}",
        alone.status,
        alone.body
    );
    // ... but the read replica 0 has queued is answered with replica 0's fill.
    let asked = Instant::now();
    let taken = c.get_as(1, path, KEY).await;
    let took = asked.elapsed();
    let status = taken.header("cache-status").to_string();
    assert_eq!(
        taken.status,
        StatusCode::OK,
        "expected the read queued on replica 0 answered on replica 1 too, saw {} {:?} after \
         {took:?}",
        taken.status,
        taken.body
    );
    assert!(
        collapsed_into_shared(&status),
        "expected replica 1's read collapsed into replica 0's fill, saw {status:?}"
    );
    for q in queued {
        assert_eq!(q.await.expect("queued read"), StatusCode::OK);
    }
    assert_eq!(
        calls(&c, &format!("GET {path}")),
        1,
        "expected one upstream call for {path}"
    );
    c.stop().await;
}

/// A read on one replica whose identical read queues on another, its cell booked on the
/// shared global share within the first read's max_wait, follows that call (the
/// `cache:queued:<key>` note) and books no cell of its own: one of its own, behind the
/// queued one's, would only push the shared queue back and be spent for nothing once the
/// queued call's answer came. Measured by a third read, of another key, on the same
/// replica: it fits in its max_wait only behind the two cells actually used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_behind_one_queued_on_another_replica_books_no_cell_of_its_own() {
    let _one = SERIAL.lock().await;
    let setup = Setup {
        budget: "limit = 1\nperiod = \"2s\"\nburst = 1\nmax_wait = \"5s\"",
        cache: "shared = true",
        ..Setup::new(2)
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    let first = c.get_as(0, "/12345/inbox/contact/twitter/60", KEY).await;
    assert_eq!(first.status, StatusCode::OK, "{:?}", first.body);
    let get = |replica: usize, n: u32| {
        let (http, url) = (
            c.http.clone(),
            format!(
                "http://{}/12345/inbox/contact/twitter/{n}",
                c.replicas[replica].addr
            ),
        );
        tokio::spawn(async move {
            let req = Request::builder()
                .uri(url)
                .header("authorization", format!("Bearer {KEY}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let resp = http.request(req).await.expect("the replica answers");
            let status = resp.status();
            let cache = resp
                .headers()
                .get("cache-status")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            (status, cache)
        })
    };
    // Contact 61 queues on replica 0 for the next cell, about 2 s away; 300 ms later the
    // same read on replica 1.
    let queued = get(0, 61);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let behind = get(1, 61);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The next cell is then about 3.4 s away, within 5 s; with a cell booked for the read
    // behind, it would be 5.4 s away, and this read refused at once.
    let other = c.get_as(1, "/12345/inbox/contact/twitter/62", KEY).await;
    assert_eq!(
        other.status,
        StatusCode::OK,
        "expected a read of another key on the cell after contact 61's, saw {} {:?}",
        other.status,
        other.body
    );
    let (status, _) = queued.await.expect("queued read");
    assert_eq!(status, StatusCode::OK, "the read queued on replica 0");
    let (status, cache) = behind.await.expect("read behind it");
    assert_eq!(status, StatusCode::OK, "the read behind it on replica 1");
    assert!(
        collapsed_into_shared(&cache),
        "expected replica 1's read of contact 61 collapsed into replica 0's fill, saw \
         {cache:?}"
    );
    assert_eq!(
        calls(&c, "GET /12345/inbox/contact/twitter/61"),
        1,
        "expected one upstream call for contact 61"
    );
    c.stop().await;
}

/// A metric's value on one replica, 0 when absent.
async fn counted(c: &Cluster, replica: usize, series: &str) -> f64 {
    c.metric(replica, series).await.unwrap_or(0.0)
}

/// Writes a note to `path` through `replica`; the write must succeed.
async fn write_note(c: &Cluster, replica: usize, path: &str, note: &str) {
    let written = c
        .post(
            replica,
            path,
            &format!("updates=%7B%22note%22%3A%22{note}%22%7D"),
        )
        .await;
    assert!(
        written.status.is_success(),
        "expected the write of {note} through replica {replica} to succeed, saw {}",
        written.status
    );
}

/// A write waits for the replicas that are listening, not for what PUBLISH counts: a
/// `redis-cli SUBSCRIBE` left open on the channel (or a replica of a version that never
/// acknowledges) is not waited for, so every write is acknowledged at once; a replica the
/// registry lists that does not answer (one killed without leaving) is counted as not
/// acknowledging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_subscriber_on_the_channel_is_not_waited_for() {
    let _one = SERIAL.lock().await;
    let Some(c) = cluster(
        2,
        SimOptions::default(),
        "limit = 100000\nperiod = \"1s\"\nburst = 10000",
    )
    .await
    else {
        return;
    };
    // Another client on the invalidation channel, as `redis-cli SUBSCRIBE` would be.
    let client = redis::Client::open(c.redis.url()).expect("client");
    let mut stray = client.get_async_pubsub().await.expect("pubsub");
    stray
        .subscribe(key(&c, "invalidate"))
        .await
        .expect("subscribe the stray client");
    let writes = 5;
    let started = Instant::now();
    for i in 0..writes {
        write_note(
            &c,
            0,
            "/12345/inbox/contact/twitter/77",
            &format!("stray-{i}"),
        )
        .await;
    }
    let took = started.elapsed();
    let ack = "cxgate_redis_invalidations_total{result=\"acknowledged\"}";
    let unack = "cxgate_redis_invalidations_total{result=\"unacknowledged\"}";
    let (acknowledged, unacknowledged) = (counted(&c, 0, ack).await, counted(&c, 0, unack).await);
    assert!(
        acknowledged == writes as f64 && unacknowledged == 0.0,
        "expected all {writes} writes acknowledged by the one other replica, the stray \
         subscriber not waited for; saw acknowledged {acknowledged}, unacknowledged \
         {unacknowledged} (the writes took {took:?})"
    );
    // A replica the registry lists but that never answers is waited for, and counted.
    let now_ms = redis_now_us(&c).await / 1000;
    let mut redis = conn(&c.redis).await;
    let list: Option<String> = redis::cmd("GET")
        .arg(key(&c, "replicas"))
        .query_async(&mut redis)
        .await
        .expect("read the registry");
    let listed = list.unwrap_or_default();
    assert_eq!(
        listed.lines().count(),
        2,
        "expected both replicas in the registry, saw {listed:?}"
    );
    let () = redis::cmd("SET")
        .arg(key(&c, "replicas"))
        .arg(format!("{listed}ghost-1 {}\n", now_ms + 8_000))
        .query_async(&mut redis)
        .await
        .expect("plant a silent replica");
    write_note(&c, 0, "/12345/inbox/contact/twitter/77", "ghost").await;
    let unacknowledged = counted(&c, 0, unack).await;
    assert_eq!(
        unacknowledged, 1.0,
        "expected the write counted as unacknowledged by the listed replica that never answers"
    );
    drop(stray);
    c.stop().await;
}

/// The outside tester's registry finding: `{prefix}:replicas` replaced by a value no
/// replica writes made every write `alone` (unwaited) until the replicas wrote themselves
/// in again, up to 2 s later. A publication that finds the registry without its own live
/// entry waits for the replicas listed at its last heartbeat too: the other replica's
/// acknowledgement is awaited and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_registry_does_not_make_a_write_go_unwaited() {
    let _one = SERIAL.lock().await;
    let Some(c) = cluster(
        2,
        SimOptions::default(),
        "limit = 100000\nperiod = \"1s\"\nburst = 10000",
    )
    .await
    else {
        return;
    };
    let mut redis = conn(&c.redis).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list: Option<String> = redis::cmd("GET")
            .arg(key(&c, "replicas"))
            .query_async(&mut redis)
            .await
            .expect("read the registry");
        if list.unwrap_or_default().lines().count() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected both replicas listed (setup)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // One heartbeat of each replica with the other listed.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let () = redis::cmd("SET")
        .arg(key(&c, "replicas"))
        .arg("planted")
        .query_async(&mut redis)
        .await
        .expect("plant a registry");
    write_note(&c, 0, "/12345/inbox/contact/twitter/78", "registry").await;
    let alone = "cxgate_redis_invalidations_total{result=\"alone\"}";
    let ack = "cxgate_redis_invalidations_total{result=\"acknowledged\"}";
    assert_eq!(
        (counted(&c, 0, alone).await, counted(&c, 0, ack).await),
        (0.0, 1.0),
        "expected the write to wait for the other replica's acknowledgement (alone, \
         acknowledged)"
    );
    c.stop().await;
}

/// What an operator sees of the shared tier: `POST /admin/purge` says how many shared
/// entries it deleted beside this replica's own, and `/admin/status` (and the status
/// page) has a section for the tier with its lookups and writes by result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_and_status_report_the_shared_tier() {
    let _one = SERIAL.lock().await;
    let Some(c) = shared_cluster(2, SimOptions::default()).await else {
        return;
    };
    let first = c.get(0, "/me").await;
    assert_eq!(first.status, StatusCode::OK, "expected /me answered");
    let deadline = Instant::now() + Duration::from_secs(2);
    while shared_entry(&c, "/me").await.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let shared = c.get(1, "/me").await;
    assert!(
        shared.header("cache-status").contains("detail=shared"),
        "expected replica 1 to answer /me from the shared tier, saw {:?}",
        shared.header("cache-status")
    );
    let status = c.admin(1, Method::GET, "/admin/status", "").await;
    let status: serde_json::Value = serde_json::from_slice(&status.body).expect("status JSON");
    let tier = &status["shared_cache"];
    assert!(
        tier["enabled"] == true
            && tier["redis_reachable"] == true
            && tier["lookups"]["hit"].as_u64() >= Some(1)
            && tier["writes"].is_object(),
        "expected a shared_cache section with the hit counted, saw {tier}"
    );
    let page = c.admin(1, Method::GET, "/", "").await;
    let page = String::from_utf8_lossy(&page.body);
    assert!(
        page.contains("Shared cache tier") && page.contains("shared_cache"),
        "expected the status page to show the shared tier"
    );
    // Replica 0 holds /me in memory and in Redis; replica 1 too, now. Purge on 1.
    let purged = c
        .admin(1, Method::POST, "/admin/purge", r#"{"tags":["me"]}"#)
        .await;
    let answer: serde_json::Value = serde_json::from_slice(&purged.body).expect("purge JSON");
    assert!(
        answer["purged"] == 1 && answer["shared"] == "removed" && answer["shared_purged"] == 1,
        "expected one entry purged from memory and one from the shared tier, saw {answer}"
    );
    assert!(
        shared_entry(&c, "/me").await.is_none(),
        "expected the shared entry gone"
    );
    let all = c
        .admin(0, Method::POST, "/admin/purge", r#"{"all":true}"#)
        .await;
    let answer: serde_json::Value = serde_json::from_slice(&all.body).expect("purge JSON");
    assert!(
        answer["shared"] == "retired" && answer["shared_purged"].is_null(),
        "expected a full purge to retire the shared tier without a count, saw {answer}"
    );
    c.stop().await;
}

/// A frozen Redis (`CLIENT PAUSE`): a write is answered with its invalidation queued; the
/// other replica serves its memory copy meanwhile, and once Redis answers again the
/// queued invalidation reaches it, under the id it was first published with (counted as
/// acknowledged when sent again), and its next read shows the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_redis_is_frozen_reaches_the_others_when_it_answers() {
    let _one = SERIAL.lock().await;
    let Some(c) = cluster(
        2,
        SimOptions::default(),
        "limit = 100000\nperiod = \"1s\"\nburst = 10000",
    )
    .await
    else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/88";
    eventually_cached(&c, 1, contact).await;
    let mut redis = conn(&c.redis).await;
    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3_000)
        .arg("ALL")
        .query_async(&mut redis)
        .await
        .expect("pause the test redis-server");
    write_note(&c, 0, contact, "frozen").await;
    let queued = counted(&c, 0, "cxgate_redis_invalidations_total{result=\"queued\"}").await;
    assert_eq!(queued, 1.0, "expected the write's invalidation queued");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut body = String::new();
    while Instant::now() < deadline {
        body = String::from_utf8_lossy(&c.get(1, contact).await.body).into_owned();
        if body.contains("frozen") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("frozen"),
        "expected replica 1 to show the write once Redis answers, saw {body}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let ack = "cxgate_redis_invalidations_total{result=\"acknowledged\"}";
    while counted(&c, 0, ack).await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        counted(&c, 0, ack).await,
        1.0,
        "expected the queued invalidation acknowledged once sent again"
    );
    c.stop().await;
}

/// The subscriptions killed (`CLIENT KILL TYPE pubsub`) and a write made while they come
/// back: the other replica replays what it missed from the copies Redis keeps, so it drops
/// the written contact and keeps what no write touched, rather than its whole cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_subscription_replays_what_it_missed_and_keeps_the_rest() {
    let _one = SERIAL.lock().await;
    let Some(c) = cluster(
        2,
        SimOptions::default(),
        "limit = 100000\nperiod = \"1s\"\nburst = 10000",
    )
    .await
    else {
        return;
    };
    let contact = "/12345/inbox/contact/twitter/99";
    eventually_cached(&c, 1, contact).await;
    eventually_cached(&c, 1, "/me").await;
    let mut redis = conn(&c.redis).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut redis)
        .await
        .expect("kill the subscriptions");
    assert!(
        killed >= 2,
        "expected both replicas' subscriptions killed, saw {killed}"
    );
    write_note(&c, 0, contact, "missed").await;
    let (status, body) = eventually_shows(&c, 1, contact, "missed").await;
    assert!(
        body.contains("missed"),
        "expected replica 1 to drop the written contact, saw {status:?} {body}"
    );
    // Back to listening (cxgate_redis_up 1), and /me still held.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counted(&c, 1, "cxgate_redis_up").await < 1.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let me = c.get(1, "/me").await;
    assert!(
        me.header("cache-status").contains("hit"),
        "expected replica 1 to keep /me, which no write touched, saw {:?}",
        me.header("cache-status")
    );
    c.stop().await;
}

/// A TCP proxy in front of the Redis on `target`: its port, and a switch. Once switched,
/// the subscriptions (connections that sent `SUBSCRIBE`) open at that moment carry nothing
/// more either way and stay open, as a connection a firewall or NAT dropped without a
/// word; every other connection, and those made later, pass. Stops with the test's runtime.
async fn silencing_proxy(target: u16) -> (u16, impl Fn()) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let port = listener.local_addr().expect("proxy address").port();
    // Connections are numbered from 1; those numbered below `silence` are silenced.
    let silence = Arc::new(AtomicU64::new(0));
    let made = Arc::new(AtomicU64::new(0));
    let (silenced, counter) = (silence.clone(), made.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let number = counter.fetch_add(1, Ordering::AcqRel) + 1;
            let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                continue;
            };
            let pubsub = Arc::new(AtomicBool::new(false));
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let quiet = {
                let (silence, pubsub) = (silenced.clone(), pubsub.clone());
                move || pubsub.load(Ordering::Acquire) && number < silence.load(Ordering::Acquire)
            };
            let (up_quiet, down_quiet) = (quiet.clone(), quiet);
            let marks = pubsub.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = client_read.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if buf[..n]
                        .windows(9)
                        .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                    {
                        marks.store(true, Ordering::Release);
                    }
                    if !up_quiet() && server_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if !down_quiet() && client_write.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let switch = move || silence.store(made.load(Ordering::Acquire) + 1, Ordering::Release);
    (port, switch)
}

/// A subscription that stops carrying messages while its connection stays open (dropped
/// by a firewall without a word): the replica notices from the probe that a publication
/// was made that it did not hear, resubscribes and replays it, so a write through another
/// replica reaches it within seconds, not once the connection times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_subscription_is_noticed_and_what_it_missed_replayed() {
    let _one = SERIAL.lock().await;
    let Some(mut c) = cluster(
        2,
        SimOptions::default(),
        "limit = 100000\nperiod = \"1s\"\nburst = 10000",
    )
    .await
    else {
        return;
    };
    // Replica 1 reaches Redis through the proxy.
    let (port, silence) = silencing_proxy(c.redis.port).await;
    let env = format!("CXGATE_TEST_REDIS_PROXY_{port}");
    std::env::set_var(&env, format!("redis://127.0.0.1:{port}/"));
    let path = c.dirs[1].join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("read the config");
    let direct = format!("redis_url_env = \"CXGATE_TEST_REDIS_URL_{}\"", c.redis.port);
    assert!(
        text.contains(&direct),
        "expected the config to name {direct}"
    );
    std::fs::write(
        &path,
        text.replace(&direct, &format!("redis_url_env = \"{env}\"")),
    )
    .expect("write the config");
    c.restart_replica(1).await;
    let contact = "/12345/inbox/contact/twitter/111";
    eventually_cached(&c, 1, contact).await;
    eventually_cached(&c, 1, "/me").await;
    // Replica 1's subscription goes quiet; its commands still pass.
    silence();
    write_note(&c, 0, contact, "unheard").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = String::new();
    while Instant::now() < deadline {
        body = String::from_utf8_lossy(&c.get(1, contact).await.body).into_owned();
        if body.contains("unheard") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        body.contains("unheard"),
        "expected replica 1 to notice its silent subscription and drop the written contact \
         within 10 s, saw {body}"
    );
    let me = c.get(1, "/me").await;
    assert!(
        me.header("cache-status").contains("hit"),
        "expected replica 1 to keep /me, which no write touched, saw {:?}",
        me.header("cache-status")
    );
    c.stop().await;
}

/// A count of invalidations planted past what the replicas number and read (2^64 - 1, or
/// near it: the next number overflows a `u64`) does not silence the channel: the next
/// write's publication starts a new epoch, the other replica hears it and no longer serves
/// what the write replaced, and the repair is counted under `invalidate:seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_of_invalidations_planted_past_range_starts_a_new_epoch() {
    let _one = SERIAL.lock().await;
    let budget = "limit = 100000\nperiod = \"1s\"\nburst = 10000";
    let Some(c) = cluster(2, SimOptions::default(), budget).await else {
        return;
    };
    let seq_key = key(&c, "invalidate:seq");
    let mut redis = conn(&c.redis).await;
    for (round, planted) in ["1 18446744073709551615", "1 18446744073709551000"]
        .into_iter()
        .enumerate()
    {
        let () = redis::cmd("SET")
            .arg(&seq_key)
            .arg(planted)
            .arg("PX")
            .arg(600_000)
            .query_async(&mut redis)
            .await
            .expect("plant the count of invalidations");
        // Whatever the replicas make of the planted count by themselves (a probe reads it)
        // is over before the contact is cached.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let contact = format!("/12345/inbox/contact/twitter/{}", 880 + round);
        for r in 0..2 {
            eventually_cached(&c, r, &contact).await;
        }
        let note = format!("after-planted-count-{round}");
        let written = c
            .post(
                0,
                &contact,
                &format!("updates=%7B%22note%22%3A%22{note}%22%7D"),
            )
            .await;
        assert!(
            written.status.is_success(),
            "expected the write to succeed, saw {}",
            written.status
        );
        let (status, body) = eventually_shows(&c, 1, &contact, &note).await;
        assert!(
            body.contains(&note),
            "round {round} ({planted:?} planted): expected replica 1 to stop serving what the \
             write on replica 0 replaced, saw {status:?} with {body}"
        );
        let now: String = redis::cmd("GET")
            .arg(&seq_key)
            .query_async(&mut redis)
            .await
            .expect("read the count of invalidations");
        let count = now.split_once(' ').and_then(|(_, n)| n.parse::<u64>().ok());
        assert!(
            count.is_some_and(|n| n <= 1 << 53),
            "expected the count numbered anew in a new epoch, saw {now:?}"
        );
        let repairs = c
            .metric(0, "cxgate_redis_repairs_total{key=\"invalidate:seq\"}")
            .await
            .unwrap_or(0.0);
        assert!(
            repairs >= (round + 1) as f64,
            "round {round}: expected the planted count counted as a repair, saw {repairs}"
        );
    }
    let acknowledged = c
        .metric(
            0,
            "cxgate_redis_invalidations_total{result=\"acknowledged\"}",
        )
        .await
        .unwrap_or(0.0);
    assert!(
        acknowledged >= 2.0,
        "expected both writes' invalidations acknowledged by replica 1, saw {acknowledged}"
    );
    c.stop().await;
}
