//! What the budget shows: response fields, metrics, status; and reload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus::Registry;

use super::*;

#[tokio::test(start_paused = true)]
async fn headers_show_the_callers_own_share() {
    let clients = vec![
        client("crm", Some(share(100, 60_000, 10)), Priority::Interactive),
        client("bulk", None, Priority::Batch),
    ];
    let mut s = spec(share(1000, 3_600_000, 50), 0, clients);
    s.batch_reserve = 0.2;
    let b = budget(s);
    let (policy, state) = b.headers("crm", None);
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
    let (_, state) = b.headers("crm", None);
    assert_eq!(
        state, "\"client\";r=7;t=1",
        "expected 7 left, next in 0.6 s, saw {state:?}"
    );
    let (policy, state) = b.headers("anonymous", None);
    assert_eq!(
        policy, "\"global\";q=1000;w=3600",
        "expected the global policy, saw {policy:?}"
    );
    assert_eq!(
        state, "\"global\";r=47;t=4",
        "expected 47 left, next in 3.6 s, saw {state:?}"
    );
    let (_, state) = b.headers("bulk", None);
    assert_eq!(
        state, "\"global\";r=37;t=4",
        "expected batch without the reserve, saw {state:?}"
    );

    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("5"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    let (_, state) = b.headers("crm", None);
    assert_eq!(
        state, "\"client\";r=0;t=5",
        "expected nothing left while paused, saw {state:?}"
    );
}

pub(super) fn gauge(registry: &Registry) -> f64 {
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
    answered_once(&b);
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
    assert!(
        second.is_ok(),
        "expected the second call admitted after 100 ms"
    );
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
        (119.0..=121.0).contains(&paused),
        "expected about 120 s paused (to the end of the second named), saw {s}"
    );
    assert!(
        s["upstream"]["paused_until"].is_string(),
        "expected an RFC 3339 time, saw {s}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_older_answer_never_overwrites_the_remaining_shown() {
    let registry = Registry::new();
    let b = Budget::new(spec(share(100, 1000, 100), 1000, vec![]), &registry)
        .expect("a fresh registry takes the metrics");
    answered_once(&b);
    let earlier = b.admit("c", n(1)).await.expect("a first call");
    let later = b.admit("c", n(1)).await.expect("a second call");
    let mut zero = HeaderMap::new();
    zero.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
    zero.insert("x-ratelimit-reset", HeaderValue::from_static("60"));
    let body = br#"{"error":"rate_limit_reached"}"#;
    b.observe_answer(StatusCode::BAD_REQUEST, &zero, body, later.ticket);
    let mut three = HeaderMap::new();
    three.insert("x-ratelimit-remaining", HeaderValue::from_static("3"));
    three.insert("x-ratelimit-reset", HeaderValue::from_static("60"));
    b.observe_answer(StatusCode::OK, &three, b"", earlier.ticket);
    let shown = b.status_json()["upstream"]["reported_remaining"].clone();
    assert_eq!(
        (gauge(&registry), shown),
        (0.0, serde_json::json!(0)),
        "expected the later-sent call's 0 in the metric and /admin/status, not the older 3"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_removed_by_reload_leaves_the_status() {
    let clients = vec![
        client("crm", None, Priority::Interactive),
        client("gone", Some(share(1, 3_600_000, 1)), Priority::Interactive),
    ];
    let b = budget(spec(share(1000, 3_600_000, 50), 0, clients.clone()));
    let _spent = b.admit("gone", n(1)).await.expect("its one cell");
    assert!(b.admit("gone", n(1)).await.is_err(), "its share is spent");
    assert_eq!(
        b.status_json()["clients"]["gone"]["rejections"],
        1,
        "the refusal shown before the reload"
    );
    b.reload(spec(share(1000, 3_600_000, 50), 0, clients[..1].to_vec()));
    let s = b.status_json();
    assert!(
        s["clients"].get("gone").is_none(),
        "expected the removed client gone from the status, saw {}",
        s["clients"]
    );
    assert!(
        s["clients"].get("crm").is_some(),
        "expected crm kept, saw {s}"
    );
}

/// [`Budget::answer_headers`] as computed afresh: the two field sets it stands for.
fn fresh_fields(b: &Budget, client: &str) -> [HeaderValue; 5] {
    let (policy, state) = b.headers(client, None);
    let [limit, remaining, reset] = b.api_headers(client, None);
    [policy, state, limit, remaining, reset]
}

#[tokio::test(start_paused = true)]
async fn a_threads_copy_of_the_fields_never_outlives_a_change_of_the_ledger() {
    let clients = vec![client(
        "crm",
        Some(share(100, 60_000, 10)),
        Priority::Interactive,
    )];
    let b = budget(spec(share(1000, 3_600_000, 50), 0, clients));
    let first = b.answer_headers("crm");
    assert_eq!(first, fresh_fields(&b, "crm"));
    assert_eq!(first[1], "\"client\";r=10;t=0", "saw {first:?}");
    // Admissions, an upstream pause and another client's fields, with the clock standing
    // still: each is seen by the very next answer, never the copy made before it.
    b.admit("crm", n(1)).await.expect("expected crm admitted");
    let after = b.answer_headers("crm");
    assert_eq!(after[1], "\"client\";r=9;t=1", "saw {after:?}");
    assert_eq!(after, fresh_fields(&b, "crm"));
    let global = b.answer_headers("anonymous");
    assert_eq!(global[0], "\"global\";q=1000;w=3600", "saw {global:?}");
    assert_eq!(global, fresh_fields(&b, "anonymous"));
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("5"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    let paused = b.answer_headers("crm");
    assert_eq!(paused[1], "\"client\";r=0;t=5", "saw {paused:?}");
    assert_eq!(paused[3], "0", "saw {paused:?}");
    // Time moving on moves the fields on.
    tokio::time::advance(Duration::from_secs(6)).await;
    let later = b.answer_headers("crm");
    assert_eq!(later, fresh_fields(&b, "crm"));
    assert_ne!(later[1], paused[1], "expected the pause over after 6 s");
    // Another budget on the same thread never gets this one's copy.
    let other = budget(spec(share(7, 3_600_000, 3), 0, Vec::new()));
    let theirs = other.answer_headers("anonymous");
    assert_eq!(theirs[0], "\"global\";q=7;w=3600", "saw {theirs:?}");
    assert_eq!(theirs, fresh_fields(&other, "anonymous"));
}
