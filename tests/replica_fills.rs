//! Misses merged across replicas when the call they wait on fails: three real replicas with
//! the shared cache tier, their own `redis-server` (a free loopback port, stopped by its
//! process id) and the simulator. A replica waiting on another's fill lock is that call's
//! follower, and a follower is never worse off than alone: it takes the leader's failure
//! as soon as the leader has it, as the leader's own replica's followers do, rather than
//! take the call over once the lock goes, one replica after another, each paying the
//! failure's full time again. Without `redis-server` on PATH the tests skip loudly, except
//! under `CI=true`.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use common::replicas::{start_replicas, Replicas, Setup};
use common::KEY;
use cxgate::sim::Faults;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One GET of `path` on `replica`: its status and when it answered, from `start`.
async fn timed_get(
    c: &Replicas,
    replica: usize,
    path: &str,
    start: Instant,
) -> (StatusCode, Duration) {
    let req = Request::builder()
        .uri(format!("http://{}{path}", c.replicas[replica].addr))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(15), c.http.request(req))
        .await
        .expect("expected an answer within 15 s")
        .expect("expected the replica to answer");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    (status, start.elapsed())
}

/// Upstream calls the simulator saw for `method_path`.
fn calls(c: &Replicas, method_path: &str) -> u64 {
    let stats = c.sim.stats();
    stats["by_route"].as_object().map_or(0, |by_route| {
        by_route
            .iter()
            .filter(|(k, _)| k.trim_end_matches('/') == method_path)
            .map(|(_, v)| v.as_u64().unwrap_or(0))
            .sum()
    })
}

/// A read on replica 0 leads; 300 ms later the same read on replicas 1 and 2 (waiting on
/// its fill lock) and on replica 0 (merged there). Every answer and when it came.
async fn leader_and_followers(c: &Replicas, path: &str) -> Vec<(StatusCode, Duration)> {
    let start = Instant::now();
    let leader = timed_get(c, 0, path, start);
    let followers = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        tokio::join!(
            timed_get(c, 0, path, start),
            timed_get(c, 1, path, start),
            timed_get(c, 2, path, start)
        )
    };
    let (leader, (local, second, third)) = tokio::join!(leader, followers);
    vec![leader, local, second, third]
}

/// The leader's upstream answers 500 after 1 s, then (another key) does not answer within
/// the upstream timeout (2 s): each time the followers on the other replicas answer what
/// the leader answered, when it did, and the upstream sees one call. Before, the lock's
/// release sent them upstream one replica after the other: three calls, the last follower
/// answering two seconds after the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_on_other_replicas_take_a_failed_leaders_answer_at_once() {
    let _one = SERIAL.lock().await;
    let Some(c) = start_replicas(Setup {
        cache: "shared = true",
        ..Setup::new(3)
    })
    .await
    else {
        return;
    };
    for (service, latency_ms, error_rate, expected) in [
        ("failing", 1000, 1.0, StatusCode::INTERNAL_SERVER_ERROR),
        ("hanging", 4000, 0.0, StatusCode::GATEWAY_TIMEOUT),
    ] {
        let prefix = format!("/12345/inbox/contact/{service}/");
        c.sim.set_faults(Faults {
            latency_ms,
            error_rate,
            error_status: 500,
            path_prefix: Some(prefix.clone()),
            ..Faults::default()
        });
        let path = format!("{prefix}1");
        let answers = leader_and_followers(&c, &path).await;
        let leader_done = answers[0].1;
        for (i, (status, at)) in answers.iter().enumerate() {
            assert_eq!(
                *status, expected,
                "{service}: expected read {i} to answer the leader's {expected}, saw {answers:?}"
            );
            assert!(
                *at <= leader_done + Duration::from_secs(1),
                "{service}: expected read {i} answered with the leader (at {leader_done:?}), \
                 not after a call of its own: {answers:?}"
            );
        }
        assert_eq!(
            calls(&c, &format!("GET {path}")),
            1,
            "{service}: expected one upstream call for the four reads, saw: {answers:?}"
        );
        println!("{service}: {answers:?}");
    }
    c.sim.set_faults(Faults::default());
    // A read after the failure is no follower of it: it makes its own call.
    let path = "/12345/inbox/contact/failing/1";
    let (status, _) = timed_get(&c, 1, path, Instant::now()).await;
    assert_eq!(status, StatusCode::OK, "expected a later read to call anew");
    assert_eq!(calls(&c, &format!("GET {path}")), 2);
    c.stop().await;
}
