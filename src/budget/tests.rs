//! Behaviour of the whole budget on tokio's paused clock: no test sleeps for real.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus::Registry;
use tokio::time::{advance, Instant};

use super::*;

fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("test values are positive")
}

fn share(limit: u32, period_ms: u64, burst: u32) -> Share {
    Share {
        limit: n(limit),
        period: Duration::from_millis(period_ms),
        burst: n(burst),
    }
}

fn client(name: &str, share: Option<Share>, priority: Priority) -> ClientSpec {
    ClientSpec {
        name: name.to_owned(),
        share,
        max_wait: None,
        priority,
    }
}

fn spec(global: Share, max_wait_ms: u64, clients: Vec<ClientSpec>) -> BudgetSpec {
    BudgetSpec {
        global,
        max_wait: Duration::from_millis(max_wait_ms),
        batch_reserve: 0.0,
        clients,
    }
}

fn budget(spec: BudgetSpec) -> Budget {
    Budget::new(spec, &Registry::new()).expect("a fresh registry takes the metrics")
}

/// Global cells usable by an interactive caller right now.
fn global_left(b: &Budget) -> u64 {
    b.status_json()["global"]["remaining"]
        .as_u64()
        .expect("status has global.remaining")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admits_never_exceed_the_burst() {
    // 5 per hour: no cell comes back while the test runs on the real clock.
    let b = budget(spec(share(5, 3_600_000, 5), 0, vec![]));
    let start = Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = (0..100)
        .map(|i| {
            let (b, start) = (b.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                b.admit(&format!("c{}", i % 7), n(1)).await
            })
        })
        .collect();
    let mut admitted = 0;
    for task in tasks {
        match task.await.expect("admit task does not panic") {
            Ok(_) => admitted += 1,
            Err(r) => assert_eq!(
                r.budget,
                Which::Global,
                "expected global refusals, saw {r:?}"
            ),
        }
    }
    assert_eq!(
        admitted, 5,
        "expected exactly the burst of 5 admitted, saw {admitted}"
    );
}

#[tokio::test(start_paused = true)]
async fn equal_shares_split_an_overload_evenly() {
    // Global 10/s; each client's share is half of it. Both offer 100/s (10x their share) in
    // lockstep, "a" always first: without the shares "a" would win every freed cell.
    let clients = vec![
        client("a", Some(share(5, 1000, 5)), Priority::Interactive),
        client("b", Some(share(5, 1000, 5)), Priority::Interactive),
    ];
    let b = budget(spec(share(10, 1000, 10), 500, clients));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        for name in ["a", "b"] {
            let b = b.clone();
            tasks.push((name, tokio::spawn(async move { b.admit(name, n(1)).await })));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut a, mut total) = (0u32, 0u32);
    for (name, task) in tasks {
        if task.await.expect("admit task does not panic").is_ok() {
            total += 1;
            a += u32::from(name == "a");
        }
    }
    assert!(
        total >= 100,
        "expected about 10/s for 10 s admitted, saw {total}"
    );
    let share_a = f64::from(a) / f64::from(total);
    assert!(
        (0.45..=0.55).contains(&share_a),
        "expected each client 45-55% of {total} admitted, saw a = {a}"
    );
}

#[tokio::test(start_paused = true)]
async fn batch_cannot_take_the_interactive_reserve() {
    let clients = vec![
        client("bulk", None, Priority::Batch),
        client("ui", None, Priority::Interactive),
    ];
    let mut s = spec(share(10, 1_000_000, 10), 0, clients);
    s.batch_reserve = 0.2;
    let b = budget(s.clone());
    for i in 0..8 {
        assert!(
            b.admit("bulk", n(1)).await.is_ok(),
            "expected batch call {i} of 8 admitted"
        );
    }
    let refused = b.admit("bulk", n(1)).await;
    assert!(
        matches!(
            refused,
            Err(Rejected {
                budget: Which::Global,
                ..
            })
        ),
        "expected the 9th batch call refused by the reserve, saw {refused:?}"
    );
    for i in 0..2 {
        assert!(
            b.admit("ui", n(1)).await.is_ok(),
            "expected reserve call {i} for interactive"
        );
    }
    assert!(
        b.admit("ui", n(1)).await.is_err(),
        "expected the burst spent after 10"
    );

    // The other order: interactive spending also shrinks what batch may take.
    let b = budget(s);
    for _ in 0..9 {
        assert!(
            b.admit("ui", n(1)).await.is_ok(),
            "expected interactive calls admitted"
        );
    }
    let refused = b.admit("bulk", n(1)).await;
    assert!(
        refused.is_err(),
        "expected batch refused with 1 of 10 left, saw {refused:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn queued_requests_go_in_arrival_order_at_the_budget_rate() {
    let b = budget(spec(share(10, 1000, 1), 10_000, vec![]));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..6u32 {
        let b = b.clone();
        tasks.push(tokio::spawn(async move {
            let admitted = b.admit(if i % 2 == 0 { "x" } else { "y" }, n(1)).await;
            (i, admitted, start.elapsed())
        }));
        // Let the task reach the budget before the next one arrives.
        tokio::task::yield_now().await;
    }
    for (k, task) in tasks.into_iter().enumerate() {
        let (i, admitted, at) = task.await.expect("admit task does not panic");
        let want = Duration::from_millis(100) * i;
        assert_eq!(
            at, want,
            "expected arrival {k} admitted at {want:?}, saw {at:?}"
        );
        let waited = admitted
            .expect("every queued request fits in max_wait")
            .waited;
        assert_eq!(waited, want, "expected waited = {want:?}, saw {waited:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn refuses_at_once_when_the_wait_exceeds_max_wait() {
    let b = budget(spec(share(10, 1000, 2), 250, vec![]));
    for _ in 0..2 {
        assert!(
            b.admit("c", n(1)).await.is_ok(),
            "expected the burst admitted"
        );
    }
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.admit("c", n(1)).await })
        })
        .collect();
    tokio::task::yield_now().await;
    let before = Instant::now();
    let refused = b.admit("c", n(1)).await;
    assert_eq!(
        Instant::now(),
        before,
        "expected the refusal without any wait"
    );
    let want = Rejected {
        retry_after: Duration::from_millis(300),
        budget: Which::Global,
    };
    assert_eq!(
        refused,
        Err(want),
        "expected the 300 ms the fifth call needs"
    );
    assert_eq!(
        want.retry_after_secs(),
        1,
        "expected Retry-After rounded up to 1 s"
    );
    for task in queued {
        let waited = task.await.expect("admit task does not panic");
        assert!(
            waited.is_ok(),
            "expected the two queued calls (100, 200 ms) admitted"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_refusal_by_one_share_spends_nothing_of_the_other() {
    let clients = vec![client("a", Some(share(1, 1000, 1)), Priority::Interactive)];
    let b = budget(spec(share(2, 1_000_000, 2), 0, clients));
    assert!(
        b.admit("a", n(1)).await.is_ok(),
        "expected a's first call admitted"
    );
    let refused = b.admit("a", n(1)).await;
    assert!(
        matches!(
            refused,
            Err(Rejected {
                budget: Which::Client,
                ..
            })
        ),
        "expected a's own share to refuse, saw {refused:?}"
    );
    assert_eq!(
        global_left(&b),
        1,
        "expected the global cell untouched by a's refusal"
    );
    assert!(
        b.admit("other", n(1)).await.is_ok(),
        "expected the last global cell usable"
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_global_refusal_gives_the_client_cell_back() {
    // "a" queues 1 s for its own share; meanwhile "b" takes the global slot it needed.
    let clients = vec![client("a", Some(share(1, 1000, 1)), Priority::Interactive)];
    let b = budget(spec(share(1, 1000, 1), 1500, clients));
    assert!(
        b.admit("a", n(1)).await.is_ok(),
        "expected a's first call admitted"
    );
    let late = tokio::spawn({
        let b = b.clone();
        async move { b.admit("a", n(1)).await }
    });
    tokio::task::yield_now().await;
    let taker = tokio::spawn({
        let b = b.clone();
        async move { b.admit("b", n(1)).await }
    });
    tokio::task::yield_now().await;
    let refused = late.await.expect("admit task does not panic");
    let want = Err(Rejected {
        retry_after: Duration::from_secs(1),
        budget: Which::Global,
    });
    assert_eq!(
        refused, want,
        "expected a refused at 1 s by the global queue"
    );
    let (_, state) = b.headers("a");
    assert_eq!(
        state, "\"client\";r=1;t=0",
        "expected a's cell given back, saw {state:?}"
    );
    assert!(
        taker.await.expect("admit task does not panic").is_ok(),
        "expected b admitted"
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_wait_gives_its_cells_back() {
    let b = budget(spec(share(1, 1000, 1), 5000, vec![]));
    assert!(
        b.admit("c", n(1)).await.is_ok(),
        "expected the first call admitted"
    );
    let gave_up = tokio::time::timeout(Duration::from_millis(100), b.admit("c", n(1))).await;
    assert!(
        gave_up.is_err(),
        "expected the second call still waiting at 100 ms"
    );
    let next = b
        .admit("c", n(1))
        .await
        .expect("expected the third call admitted");
    let want = Duration::from_millis(900);
    assert_eq!(
        next.waited, want,
        "expected the dropped slot reused at 1 s, saw {next:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn too_many_requests_pauses_everything_for_retry_after() {
    let b = budget(spec(share(100, 1000, 100), 1000, vec![]));
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("5"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    assert_eq!(
        b.paused_for(),
        Some(Duration::from_secs(5)),
        "expected a 5 s pause"
    );
    let want = Err(Rejected {
        retry_after: Duration::from_secs(5),
        budget: Which::Upstream,
    });
    assert_eq!(
        b.admit("c", n(1)).await,
        want,
        "expected an immediate upstream refusal"
    );
    advance(Duration::from_millis(4900)).await;
    let refused = b.admit("c", n(1)).await.map_err(|r| r.retry_after);
    let want = Err(Duration::from_millis(100));
    assert_eq!(refused, want, "expected 100 ms left at 4.9 s");
    advance(Duration::from_millis(100)).await;
    assert_eq!(b.paused_for(), None, "expected the pause over at 5 s");
    assert!(
        b.admit("c", n(1)).await.is_ok(),
        "expected admissions to resume at 5 s"
    );
}

#[tokio::test(start_paused = true)]
async fn a_small_remaining_allows_that_many_then_pauses_until_reset() {
    let registry = Registry::new();
    let b = Budget::new(spec(share(100, 1000, 100), 1000, vec![]), &registry)
        .expect("a fresh registry takes the metrics");
    let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("2"));
    h.insert("x-ratelimit-reset", HeaderValue::from_static("1800000060"));
    b.observe_at(StatusCode::OK, &h, wall);
    for i in 0..2 {
        assert!(
            b.admit("c", n(1)).await.is_ok(),
            "expected allowed call {i} of 2"
        );
    }
    let want = Err(Rejected {
        retry_after: Duration::from_secs(60),
        budget: Which::Upstream,
    });
    assert_eq!(
        b.admit("c", n(1)).await,
        want,
        "expected a pause until the reset"
    );
    assert_eq!(
        b.paused_for(),
        Some(Duration::from_secs(60)),
        "expected 60 s of pause"
    );
    assert_eq!(
        gauge(&registry),
        2.0,
        "expected the gauge to show the report"
    );
    advance(Duration::from_secs(60)).await;
    assert!(
        b.admit("c", n(1)).await.is_ok(),
        "expected calls again after the reset"
    );
}

#[tokio::test(start_paused = true)]
async fn cost_spends_that_many_cells() {
    let b = budget(spec(share(10, 1000, 5), 0, vec![]));
    assert!(
        b.admit("c", n(3)).await.is_ok(),
        "expected 3 of 5 cells admitted"
    );
    assert_eq!(
        global_left(&b),
        2,
        "expected 2 cells left after a cost of 3"
    );
    let refused = b.admit("c", n(3)).await.map_err(|r| r.retry_after);
    assert_eq!(
        refused,
        Err(Duration::from_millis(100)),
        "expected 1 cell short = 100 ms"
    );
    assert!(
        b.admit("c", n(2)).await.is_ok(),
        "expected the last 2 cells admitted"
    );
    assert_eq!(global_left(&b), 0, "expected the burst spent");
}

#[tokio::test(start_paused = true)]
async fn headers_show_the_callers_own_share() {
    let clients = vec![
        client("crm", Some(share(100, 60_000, 10)), Priority::Interactive),
        client("bulk", None, Priority::Batch),
    ];
    let mut s = spec(share(1000, 3_600_000, 50), 0, clients);
    s.batch_reserve = 0.2;
    let b = budget(s);
    let (policy, state) = b.headers("crm");
    assert_eq!(
        policy, "\"client\";q=100;w=60",
        "expected crm's share, saw {policy:?}"
    );
    assert_eq!(
        state, "\"client\";r=10;t=0",
        "expected a full burst, saw {state:?}"
    );
    for _ in 0..3 {
        b.admit("crm", n(1)).await.expect("expected crm admitted");
    }
    let (_, state) = b.headers("crm");
    assert_eq!(
        state, "\"client\";r=7;t=1",
        "expected 7 left, next in 0.6 s, saw {state:?}"
    );
    let (policy, state) = b.headers("anonymous");
    assert_eq!(
        policy, "\"global\";q=1000;w=3600",
        "expected the global policy, saw {policy:?}"
    );
    assert_eq!(
        state, "\"global\";r=47;t=4",
        "expected 47 left, next in 3.6 s, saw {state:?}"
    );
    let (_, state) = b.headers("bulk");
    assert_eq!(
        state, "\"global\";r=37;t=4",
        "expected batch without the reserve, saw {state:?}"
    );

    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("5"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    let (_, state) = b.headers("crm");
    assert_eq!(
        state, "\"client\";r=0;t=5",
        "expected nothing left while paused, saw {state:?}"
    );
}

fn gauge(registry: &Registry) -> f64 {
    registry
        .gather()
        .iter()
        .find(|f| f.name() == "cxgate_upstream_ratelimit_remaining")
        .map(|f| f.get_metric()[0].get_gauge().get_value())
        .expect("the gauge is registered")
}

#[tokio::test(start_paused = true)]
async fn metrics_count_waits_and_refusals() {
    let registry = Registry::new();
    let b = Budget::new(spec(share(10, 1000, 1), 150, vec![]), &registry)
        .expect("a fresh registry takes the metrics");
    assert_eq!(gauge(&registry), -1.0, "expected -1 before any report");
    b.admit("c", n(1))
        .await
        .expect("expected the first call admitted");
    let second = tokio::spawn({
        let b = b.clone();
        async move { b.admit("c", n(1)).await }
    });
    tokio::task::yield_now().await;
    assert!(
        b.admit("c", n(1)).await.is_err(),
        "expected the third refused (200 ms > 150 ms)"
    );
    let second = second.await.expect("admit task does not panic");
    assert!(second.is_ok(), "expected the second call admitted after 100 ms");
    let families = registry.gather();
    let family = |name: &str| {
        families
            .iter()
            .find(|f| f.name() == name)
            .unwrap_or_else(|| panic!("expected {name} registered"))
    };
    let wait = family("cxgate_budget_wait_seconds").get_metric()[0].get_histogram();
    assert_eq!(
        wait.get_sample_count(),
        2,
        "expected two admitted waits observed"
    );
    let sum = wait.get_sample_sum();
    assert!(
        (sum - 0.1).abs() < 1e-9,
        "expected 0.1 s waited in all, saw {sum}"
    );
    let refusals = family("cxgate_budget_rejections_total").get_metric();
    let labels: Vec<(&str, &str)> = refusals[0]
        .get_label()
        .iter()
        .map(|l| (l.name(), l.value()))
        .collect();
    assert_eq!(
        labels,
        [("budget", "global"), ("client", "c")],
        "expected one label set"
    );
    let count = refusals[0].get_counter().get_value();
    assert_eq!(count, 1.0, "expected one refusal counted, saw {count}");
    let status = b.status_json();
    assert_eq!(
        status["global"]["rejections"], 1,
        "expected the refusal in status: {status}"
    );
    assert_eq!(
        status["clients"]["c"]["rejections"], 1,
        "expected it per client: {status}"
    );
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_what_was_spent_and_the_pause() {
    let s = spec(share(2, 1_000_000, 2), 0, vec![]);
    let b = budget(s.clone());
    for _ in 0..2 {
        b.admit("c", n(1))
            .await
            .expect("expected the burst admitted");
    }
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("5"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    b.reload(s);
    assert_eq!(
        global_left(&b),
        0,
        "expected the spent burst to stay spent after reload"
    );
    assert_eq!(
        b.paused_for(),
        Some(Duration::from_secs(5)),
        "expected the pause kept"
    );
}

#[tokio::test(start_paused = true)]
async fn status_reports_shares_and_upstream() {
    let clients = vec![client(
        "crm",
        Some(share(200, 3_600_000, 10)),
        Priority::Batch,
    )];
    let b = budget(spec(share(1000, 3_600_000, 50), 2000, clients));
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    let reset = SystemTime::now() + Duration::from_secs(120);
    let reset = reset
        .duration_since(UNIX_EPOCH)
        .expect("now is after 1970")
        .as_secs();
    h.insert("x-ratelimit-reset", HeaderValue::from(reset));
    b.observe_upstream(StatusCode::OK, &h);
    let s = b.status_json();
    let want = serde_json::json!({"limit": 1000, "period_s": 3600.0, "burst": 50,
        "remaining": 50, "rejections": 0, "max_wait_s": 2.0, "batch_reserve_cells": 0});
    assert_eq!(
        s["global"], want,
        "expected the global share, saw {}",
        s["global"]
    );
    let crm = &s["clients"]["crm"];
    assert_eq!(
        crm["budget"], "client",
        "expected crm's own share, saw {crm}"
    );
    assert_eq!(crm["limit"], 200, "expected crm's limit, saw {crm}");
    assert_eq!(
        crm["priority"], "batch",
        "expected crm's priority, saw {crm}"
    );
    assert_eq!(
        s["upstream"]["reported_remaining"], 0,
        "expected the report, saw {s}"
    );
    let paused = s["upstream"]["paused_for_s"].as_f64().unwrap_or(0.0);
    assert!(
        (118.0..=120.0).contains(&paused),
        "expected about 120 s paused, saw {s}"
    );
    assert!(
        s["upstream"]["paused_until"].is_string(),
        "expected an RFC 3339 time, saw {s}"
    );
}
