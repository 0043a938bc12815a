//! The shared record of calls in flight, as the upstream's `X-RateLimit-Remaining` is spent
//! across replicas: a replica killed (`kill -9`) with calls out stops holding the others'
//! allowance within seconds, and a record Redis brings back from an older snapshot does not
//! hold calls that have long landed. Real processes, a real `redis-server` the test starts.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use cxgate::sim::{Faults, SimOptions};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};

use common::replicas::{start_replicas, Replicas, Setup};
use common::{free_port, Proc, KEY};

/// Where the simulator is slow: contacts whose id starts with 9.
const SLOW: &str = "/12345/inbox/contact/twitter/9";

fn contact(n: usize) -> String {
    format!("/12345/inbox/contact/twitter/{n}")
}

/// A GET with the test client's key to `addr`; `None` when nothing answered.
async fn get(c: &Replicas, addr: &str, path: &str) -> Option<StatusCode> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(format!("http://{addr}{path}"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = c.http.request(req).await.ok()?;
    let status = answer.status();
    let _ = answer.into_body().collect().await;
    Some(status)
}

fn replica(c: &Replicas, i: usize) -> String {
    c.replicas[i].addr.to_string()
}

/// Waits until the simulator has `n` calls in flight (answering none yet).
async fn sim_in_flight(c: &Replicas, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.sim.stats()["in_flight"].as_u64() != Some(n) {
        assert!(
            Instant::now() < deadline,
            "expected {n} calls in flight at the simulator, saw {}",
            c.sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends misses to `addr` until `want` are answered 200 or `limit` passes; how many were.
async fn served_within(
    c: &Replicas,
    addr: &str,
    first: usize,
    want: usize,
    limit: Duration,
) -> usize {
    let started = Instant::now();
    let (mut ok, mut n) = (0, first);
    while ok < want && started.elapsed() < limit {
        if get(c, addr, &contact(n)).await == Some(StatusCode::OK) {
            ok += 1;
            n += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    ok
}

const BUDGET: &str = "limit = 100000\nperiod = \"1s\"\nburst = 10000\nmax_wait = \"0s\"";

/// Three replicas, one of them the real binary: it sends six calls to a slow upstream (20 s,
/// inside its 30 s `upstream.timeout`) and is killed with `kill -9` while they are out. The
/// upstream never counted them, so its whole `Remaining` is the others' again: they may
/// spend it within seconds (the killed replica's lease), not one upstream timeout later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_with_calls_out_stops_counting_within_seconds() {
    let mut setup = Setup::new(2);
    setup.budget = BUDGET;
    setup.sim = SimOptions {
        rate_limit: Some("10/1h".parse().expect("valid rate limit")),
        faults: Faults {
            latency_ms: 20_000,
            path_prefix: Some(SLOW.into()),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    let live = replica(&c, 0);
    assert_eq!(
        get(&c, &live, &contact(100)).await,
        Some(StatusCode::OK),
        "a first call, which learns that 9 remain"
    );
    // The third replica: the real binary on replica 0's configuration, with a 30 s upstream
    // timeout, so its record of calls out would last past 30 s on a timeout-long lease.
    let dir = common::temp_dir("killed-replica");
    let token = dir.join("token.json");
    std::fs::copy(c.dirs[0].join("token.json"), &token).expect("copy the token file");
    let (port, admin) = (free_port(), free_port());
    let config = std::fs::read_to_string(c.dirs[0].join("cxgate.toml"))
        .expect("replica 0's config")
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        )
        .replacen(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:{admin}\""),
            1,
        )
        .replace("timeout = \"2s\"", "timeout = \"30s\"")
        .replace("request_timeout = \"5s\"", "request_timeout = \"40s\"")
        .replace(
            &c.dirs[0].join("token.json").display().to_string(),
            &token.display().to_string(),
        );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, &config).expect("write the binary's config");
    let mut proc = Proc::spawn(&["run", "--config", path.to_str().expect("utf-8")], &dir);
    let doomed = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while get(&c, &doomed, "/me/accounts").await.is_none() {
        assert!(
            proc.exited().is_none() && Instant::now() < deadline,
            "expected the binary replica to start: {}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let slow: Vec<_> = (0..6)
        .map(|i| {
            let (http, url) = (
                c.http.clone(),
                format!("http://{doomed}{}", contact(900 + i)),
            );
            tokio::spawn(async move {
                let req = Request::builder()
                    .uri(url)
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let _ = http.request(req).await;
            })
        })
        .collect();
    // /me/accounts was one call too (the first on that route): 8 remain, 6 of them out.
    sim_in_flight(&c, 6).await;
    proc.signal("KILL");
    let killed = Instant::now();
    for task in slow {
        let _ = task.await;
    }
    // Within the lease's seconds, the live replica spends all 8 the upstream has left.
    let served = served_within(&c, &live, 101, 8, Duration::from_secs(10)).await;
    assert_eq!(
        served,
        8,
        "expected the 8 calls the upstream has left served on the live replica within 10 s \
         of the kill, saw {served} in {:?} (the killed replica's 6 calls out still counted)",
        killed.elapsed()
    );
    let stats = c.sim.stats();
    assert_eq!(
        stats["rate_limited"], 0,
        "expected no upstream limit answer, saw {stats}"
    );
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
    c.stop().await;
}

/// A record of calls out that Redis brings back from an older snapshot (here `DUMP` while
/// five calls were out, `RESTORE` with its own expiry once they had landed) counts calls
/// that have long landed: its replica's next word bases it again on its own count, so the
/// one call the upstream has left goes, instead of the five phantom calls holding it for as
/// long as the replica keeps renewing the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_calls_out_restored_from_an_older_snapshot_is_not_believed() {
    let mut setup = Setup::new(2);
    setup.budget = BUDGET;
    setup.sim = SimOptions {
        rate_limit: Some("8/1h".parse().expect("valid rate limit")),
        faults: Faults {
            latency_ms: 1000,
            path_prefix: Some(SLOW.into()),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let Some(c) = start_replicas(setup).await else {
        return;
    };
    let r0 = replica(&c, 0);
    assert_eq!(get(&c, &r0, &contact(100)).await, Some(StatusCode::OK));
    let slow: Vec<_> = (0..5)
        .map(|i| {
            let (http, url) = (c.http.clone(), format!("http://{r0}{}", contact(900 + i)));
            tokio::spawn(async move {
                let req = Request::builder()
                    .uri(url)
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                http.request(req).await.map(|a| a.status()).ok()
            })
        })
        .collect();
    sim_in_flight(&c, 5).await;
    let key = c.key("budget:in_flight");
    let mut conn = c.conn().await;
    let snapshot: Vec<u8> = redis::cmd("DUMP")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("DUMP the record of calls out");
    let expires: i64 = redis::cmd("PEXPIRETIME")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("PEXPIRETIME");
    for task in slow {
        assert_eq!(
            task.await.expect("slow call"),
            Some(StatusCode::OK),
            "expected the slow calls answered"
        );
    }
    // One more call after the snapshot: 1 remains.
    assert_eq!(get(&c, &r0, &contact(101)).await, Some(StatusCode::OK));
    let _: () = redis::cmd("RESTORE")
        .arg(&key)
        .arg(expires)
        .arg(&snapshot)
        .arg("REPLACE")
        .arg("ABSTTL")
        .query_async(&mut conn)
        .await
        .expect("RESTORE the older record");
    let restored: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(
        restored, 1,
        "expected the older record back (its lease not yet over: the machine was too slow)"
    );
    let served = served_within(&c, &r0, 102, 1, Duration::from_secs(6)).await;
    assert_eq!(
        served, 1,
        "expected the one call the upstream has left served, not held by the restored \
         record's five landed calls"
    );
    let stats = c.sim.stats();
    assert_eq!(
        stats["rate_limited"], 0,
        "expected no upstream limit answer, saw {stats}"
    );
    c.stop().await;
}
