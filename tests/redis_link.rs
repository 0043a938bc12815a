//! One replica's link to Redis failing while the other replicas reach it: cut off for
//! longer than a burst and a wait (what it spent alone must not go on top of what the
//! others spent), a connection that stays open and carries nothing (it must be replaced),
//! and invalidations queued meanwhile (sent in order, off the health probe).
//!
//! Replicas run in this process (the library entry, as `cxgate run` starts them) in front
//! of one simulator; the Redis is the test's own `redis-server` on a free loopback port,
//! and the replica under test reaches it through a relay the test cuts or silences
//! (`common::replicas::SlowLink`). Without `redis-server` on PATH the tests skip loudly,
//! except under `CI=true`. One test at a time: the budget figures are timing figures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use common::replicas::{start_replicas, Replicas, Setup};
use common::{Answer, KEY};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A request to replica `i`'s client listener (`admin`: its admin listener) as the test
/// client.
async fn send(
    c: &Replicas,
    i: usize,
    admin: bool,
    method: Method,
    path: &str,
    body: &str,
) -> Answer {
    let (addr, content_type) = match admin {
        true => (c.replicas[i].admin_addr, "application/json"),
        false => (c.replicas[i].addr, "application/x-www-form-urlencoded"),
    };
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.http.request(req))
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

async fn get(c: &Replicas, i: usize, path: &str) -> Answer {
    send(c, i, false, Method::GET, path, "").await
}

/// A GET on replica `i` under load: its status, `None` when nothing came back within 20 s
/// (a machine loaded past what the test offers may starve a request).
async fn load_get(c: &Replicas, i: usize, path: &str) -> Option<StatusCode> {
    let req = Request::builder()
        .uri(format!("http://{}{path}", c.replicas[i].addr))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), c.http.request(req)).await;
    let resp = resp.ok()?.ok()?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Some(status)
}

/// The `redis` section of replica `i`'s `/admin/status`.
async fn redis_status(c: &Replicas, i: usize) -> serde_json::Value {
    send(c, i, true, Method::GET, "/admin/status", "")
        .await
        .json()["redis"]
        .clone()
}

/// Waits up to `limit` for replica `i`'s Redis to be shown `reachable` (or not).
async fn reachable_within(c: &Replicas, i: usize, reachable: bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if redis_status(c, i).await["reachable"] == reachable {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The sum of a metric's samples on replica `i` whose line starts with `series`.
async fn counted(c: &Replicas, i: usize, series: &str) -> f64 {
    let text = send(c, i, true, Method::GET, "/metrics", "").await;
    cxgate_testkit::metrics::sum(&String::from_utf8_lossy(&text.body), series)
}

/// Redis's own clock, in ms.
async fn redis_now_ms(conn: &mut cxgate::replicas::Conn) -> u64 {
    let (s, us): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    s * 1000 + us / 1000
}

/// Three replicas, one budget of 200 calls per 10 s (burst 20, no wait), ten times
/// over-asked; replica 0 is cut off from Redis alone for 8 s, eight times its burst, while
/// the other two go on spending the shared count. Over the run the upstream
/// sees no more than the budget allows: replica 0 hands back every cell it booked alone,
/// and the fleet pays them off. It used to hand back only what was still ahead of its
/// clock (at most a burst and a wait), and the calls it sent before that went on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_alone_hands_back_all_it_spent_alone() {
    let _one = SERIAL.lock().await;
    let (limit, period_s, burst) = (200u32, 10u64, 20u32);
    let budget =
        format!("limit = {limit}\nperiod = \"{period_s}s\"\nburst = {burst}\nmax_wait = \"0s\"");
    let Some(c) = start_replicas(Setup {
        budget: &budget,
        slow: Some(0),
        ..Setup::new(3)
    })
    .await
    else {
        return;
    };
    let c = Arc::new(c);
    let before = c.sim.stats()["requests_total"].as_u64().unwrap_or(0);
    let run = Duration::from_secs(15);
    let started = Instant::now();
    let cutter = {
        let c = c.clone();
        tokio::spawn(async move {
            let link = c.slow_link.as_ref().expect("replica 0's link");
            tokio::time::sleep(Duration::from_secs(1)).await;
            link.set_cut(true);
            let down = reachable_within(&c, 0, false, Duration::from_secs(5)).await;
            tokio::time::sleep_until(started + Duration::from_secs(9)).await;
            link.set_cut(false);
            down
        })
    };
    // Each replica's upstream calls, every second: which one spent what, and when.
    let sampler = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut rows = Vec::new();
            while started.elapsed() < run + Duration::from_secs(1) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let mut row = Vec::new();
                for i in 0..3 {
                    row.push(counted(&c, i, "cxgate_upstream_requests_total").await as u64);
                }
                rows.push(row);
            }
            rows
        })
    };
    let mut drivers = tokio::task::JoinSet::new();
    // A sender per replica, a distinct uncached read every 25 ms each, none waiting for the
    // last: about 120 requests a second against a budget of 20.
    for sender in 0..3usize {
        let c = c.clone();
        drivers.spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(Duration::from_millis(25));
            let mut i = 0u64;
            while started.elapsed() < run {
                every.tick().await;
                let c = c.clone();
                let path = format!("/12345/inbox/contact/alone{sender}/{i}");
                requests.spawn(async move { load_get(&c, sender, &path).await });
                i += 1;
            }
            let mut seen = [0u64; 3];
            while let Some(status) = requests.join_next().await {
                match status.expect("request task") {
                    Some(StatusCode::OK) => seen[0] += 1,
                    Some(StatusCode::TOO_MANY_REQUESTS) => seen[1] += 1,
                    _ => seen[2] += 1,
                }
            }
            seen
        });
    }
    let mut seen = [0u64; 3];
    while let Some(counts) = drivers.join_next().await {
        for (total, n) in seen.iter_mut().zip(counts.expect("driver task")) {
            *total += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = c.sim.stats()["requests_total"].as_u64().unwrap_or(0) - before;
    let allowance = f64::from(burst) + f64::from(limit) / period_s as f64 * elapsed;
    let was_down = cutter.await.expect("cutter task");
    let rows = sampler.await.expect("sampler task");
    println!("upstream calls by replica, each second: {rows:?}");
    let mut errors = Vec::new();
    for i in 0..3 {
        errors.push(counted(&c, i, "cxgate_redis_errors_total").await);
    }
    println!("Redis calls failed or past their bound, per replica: {errors:?}");
    println!(
        "replica 0 cut off from 1 s to 9 s: {calls} upstream calls in {elapsed:.2} s vs \
         allowance {allowance:.1}; answered 200: {}, 429: {}, other: {}",
        seen[0], seen[1], seen[2]
    );
    assert!(
        was_down,
        "expected replica 0 to see Redis gone while cut off"
    );
    assert!(
        reachable_within(&c, 0, true, Duration::from_secs(5)).await,
        "expected replica 0 back on Redis after the cut"
    );
    // A loaded machine may time some requests out (counted as other): each is a call the
    // upstream saw, counted in `calls` all the same.
    assert!(
        seen[0] as f64 >= allowance / 2.0,
        "expected the budget mostly used, saw {} answered of {allowance:.1} allowed",
        seen[0]
    );
    // One cell of slack: the allowance is continuous, the calls are whole.
    assert!(
        calls as f64 <= allowance + 1.0,
        "expected at most {allowance:.1} upstream calls, saw {calls}: what replica 0 spent \
         alone went on top of the shared budget"
    );
    match Arc::try_unwrap(c) {
        Ok(c) => c.stop().await,
        Err(_) => panic!("every task has ended, so nothing else holds the replicas"),
    }
}

/// Replica 0's connections to Redis go silent (the relay keeps them open and forwards
/// nothing more, either way) while new ones would be relayed as before: after its budget
/// call's second it answers on its local share, and then, instead of asking on the silent
/// connection forever, it dials a new one and is back on the shared budget within
/// seconds (its answers show the whole limit again, not its part of it). It used to stay
/// on its local share for as long as the connection stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_to_redis_is_replaced() {
    let _one = SERIAL.lock().await;
    let Some(c) = start_replicas(Setup {
        budget: "limit = 1000\nperiod = \"1s\"\nburst = 1000\nmax_wait = \"1s\"",
        slow: Some(0),
        ..Setup::new(2)
    })
    .await
    else {
        return;
    };
    let link = c.slow_link.as_ref().expect("replica 0's link");
    let shared = get(&c, 0, "/12345/inbox/contact/quiet/0").await;
    assert_eq!(
        (shared.status, shared.header("x-ratelimit-limit")),
        (StatusCode::OK, "1000"),
        "expected replica 0 on the shared budget of 1000 first"
    );
    let dialled = link.connections();
    let errors = counted(&c, 0, "cxgate_redis_errors_total").await;
    link.silence_open_connections();
    let alone = get(&c, 0, "/12345/inbox/contact/quiet/1").await;
    assert_eq!(
        (alone.status, alone.header("x-ratelimit-limit")),
        (StatusCode::OK, "500"),
        "expected replica 0 answered on its local share (1000 / 2) once its budget call \
         found no answer"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 2;
    let back = loop {
        let answer = get(&c, 0, &format!("/12345/inbox/contact/quiet/{n}")).await;
        n += 1;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "expected every read answered"
        );
        if answer.header("x-ratelimit-limit") == "1000" {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let status = redis_status(&c, 0).await;
    assert!(
        back && status["reachable"] == true,
        "expected replica 0 back on the shared budget within 15 s of its connection going \
         silent, saw {status}"
    );
    assert!(
        link.connections() > dialled,
        "expected a new connection dialled to Redis"
    );
    let after = counted(&c, 0, "cxgate_redis_errors_total").await;
    assert!(
        after > errors,
        "expected the calls unanswered on the silent connection counted in \
         cxgate_redis_errors_total ({errors} before, {after} after)"
    );
    c.stop().await;
}

/// The path each invalidation published so far names, in the order they were numbered.
async fn published_paths(c: &Replicas, conn: &mut cxgate::replicas::Conn) -> Vec<String> {
    let seq: Option<String> = redis::cmd("GET")
        .arg(c.key("invalidate:seq"))
        .query_async(conn)
        .await
        .expect("GET the count");
    let count: u64 = seq
        .and_then(|s| s.split(' ').nth(1).and_then(|n| n.parse().ok()))
        .unwrap_or(0);
    let mut paths = Vec::new();
    for n in 1..=count {
        let copy: Option<String> = redis::cmd("GET")
            .arg(c.key(&format!("invalidate:log:{n}")))
            .query_async(conn)
            .await
            .expect("GET a copy");
        let message: serde_json::Value =
            serde_json::from_str(&copy.unwrap_or_default()).unwrap_or_default();
        if let Some(path) = message["what"]["path"].as_str() {
            paths.push(path.to_string());
        }
    }
    paths
}

/// Twelve purges made on a replica cut off from Redis are queued; a replica listed as
/// listening that never acknowledges (killed without leaving) makes each take its 500 ms
/// when they are sent. They go out in the order they were made, a purge made while they
/// are still going out goes after them, and the health probe keeps its pace meanwhile
/// (its key, renewed for 10 s at every probe, never falls below 6 s). They used to be sent
/// from inside the probe, which stopped for the whole six seconds, and the purge made
/// meanwhile went out before the older ones still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_invalidations_go_out_in_order_off_the_probe() {
    let _one = SERIAL.lock().await;
    let Some(c) = start_replicas(Setup {
        slow: Some(0),
        ..Setup::new(1)
    })
    .await
    else {
        return;
    };
    let link = c.slow_link.as_ref().expect("replica 0's link");
    let mut conn = c.conn().await;
    assert!(
        reachable_within(&c, 0, true, Duration::from_secs(5)).await,
        "expected the replica on Redis at first"
    );
    link.set_cut(true);
    assert!(
        reachable_within(&c, 0, false, Duration::from_secs(5)).await,
        "expected the replica to see Redis gone"
    );
    let queued = 12;
    for i in 0..queued {
        let body = format!("{{\"path\":\"/q/{i}\"}}");
        let answer = send(&c, 0, true, Method::POST, "/admin/purge", &body).await;
        assert_eq!(
            answer.json()["invalidation"],
            "queued",
            "expected purge {i} queued while Redis is away"
        );
    }
    let phantom = format!("phantom0 {}\n", redis_now_ms(&mut conn).await + 19_000);
    let () = redis::cmd("SET")
        .arg(c.key("replicas"))
        .arg(phantom)
        .query_async(&mut conn)
        .await
        .expect("list a replica that never acknowledges");
    link.set_cut(false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while published_paths(&c, &mut conn).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "expected the queued purges sent once Redis is back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = "{\"path\":\"/q/late\"}";
    let late = send(&c, 0, true, Method::POST, "/admin/purge", body).await;
    assert_eq!(late.status, StatusCode::OK, "expected the late purge taken");
    let probe_key = {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(c.key("probe:*"))
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        assert_eq!(keys.len(), 1, "expected one probe key, saw {keys:?}");
        keys[0].clone()
    };
    let mut lowest = i64::MAX;
    let deadline = Instant::now() + Duration::from_secs(30);
    let paths = loop {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&probe_key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        lowest = lowest.min(ttl);
        let paths = published_paths(&c, &mut conn).await;
        if paths.len() > queued || Instant::now() >= deadline {
            break paths;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut expected: Vec<String> = (0..queued).map(|i| format!("/q/{i}")).collect();
    expected.push("/q/late".to_string());
    assert_eq!(
        paths, expected,
        "expected every queued purge published once, in order, and the late one after them"
    );
    assert!(
        lowest >= 6_000,
        "expected the probe to renew its 10 s key at least every 4 s while the queue went \
         out, saw it down to {lowest} ms"
    );
    // The last one leaves the queue once its wait for acknowledgements is over.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = redis_status(&c, 0).await;
    while status["invalidations_queued"] != 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = redis_status(&c, 0).await;
    }
    assert_eq!(
        status["invalidations_queued"], 0,
        "expected nothing left queued, saw {status}"
    );
    c.stop().await;
}
