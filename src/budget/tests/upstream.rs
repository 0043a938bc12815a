//! Following the upstream: 429 pauses, small allowances, alarms during a wait.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, StatusCode};
use prometheus::Registry;
use tokio::time::advance;

use super::report::gauge;
use super::*;

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
    b.observe_at(false, &h, 0, wall);
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
async fn a_429_during_the_wait_refuses_the_sleeper() {
    let b = budget(spec(share(1, 1000, 1), 5000, vec![]));
    b.admit("c", n(1))
        .await
        .expect("expected the first call admitted");
    let sleeper = tokio::spawn({
        let b = b.clone();
        async move { b.admit("c", n(1)).await }
    });
    tokio::task::yield_now().await;
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("10"));
    b.observe_upstream(StatusCode::TOO_MANY_REQUESTS, &h);
    let got = sleeper.await.expect("admit task does not panic");
    let want = Err(Rejected {
        retry_after: Duration::from_secs(9),
        budget: Which::Upstream,
    });
    assert_eq!(
        got, want,
        "expected the sleeper refused at 1 s with 9 s of pause left"
    );
}
