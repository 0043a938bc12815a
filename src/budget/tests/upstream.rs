//! Following the upstream: 429 pauses, small allowances, alarms during a wait, the first
//! call sent alone, fresh reports.

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
    let want = Err(Refused::Later(Rejected {
        retry_after: Duration::from_secs(5),
        budget: Which::Upstream,
    }));
    assert_eq!(
        b.admit("c", n(1)).await,
        want,
        "expected an immediate upstream refusal"
    );
    advance(Duration::from_millis(4900)).await;
    let refused = b.admit("c", n(1)).await.map_err(|r| r.later().retry_after);
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
async fn a_small_remaining_used_up_by_calls_out_waits_for_them_never_pauses() {
    let registry = Registry::new();
    let b = Budget::new(spec(share(100, 1000, 100), 1000, vec![]), &registry)
        .expect("a fresh registry takes the metrics");
    let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-remaining", HeaderValue::from_static("2"));
    h.insert("x-ratelimit-reset", HeaderValue::from_static("1800003600"));
    b.observe_at(false, &h, None, wall);
    let mut out = Vec::new();
    for i in 0..2 {
        let admitted = b.admit("c", n(1)).await;
        out.push(admitted.unwrap_or_else(|e| panic!("expected allowed call {i} of 2, saw {e:?}")));
    }
    // The third waits its max_wait (1 s) for one of the two to land, then gets a short
    // Retry-After: the upstream never said 0, so nothing pauses for the hour.
    let want = Err(Refused::Later(Rejected {
        retry_after: Duration::from_secs(1),
        budget: Which::Upstream,
    }));
    assert_eq!(
        b.admit("c", n(1)).await,
        want,
        "expected a short refusal after waiting for a landing"
    );
    assert_eq!(b.paused_for(), None, "expected no pause");
    assert_eq!(
        gauge(&registry),
        2.0,
        "expected the gauge to show the report"
    );
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.admit("c", n(1)).await }
    });
    tokio::task::yield_now().await;
    b.observe_answer(StatusCode::OK, &h, b"", out[0].ticket);
    assert!(
        waiter.await.expect("the waiter does not panic").is_ok(),
        "expected the waiting call admitted once an answer said 2 remain"
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
    let want = Err(Refused::Later(Rejected {
        retry_after: Duration::from_secs(9),
        budget: Which::Upstream,
    }));
    assert_eq!(
        got, want,
        "expected the sleeper refused at 1 s with 9 s of pause left"
    );
}

fn remaining(left: &'static str, reset: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-remaining", HeaderValue::from_static(left));
    h.insert("x-ratelimit-reset", HeaderValue::from_static(reset));
    h
}

#[tokio::test(start_paused = true)]
async fn a_cold_start_sends_one_call_and_lets_its_answer_set_the_allowance() {
    let b = Budget::new(spec(share(100, 1000, 100), 5000, vec![]), &Registry::new())
        .expect("a fresh registry takes the metrics");
    let first = b
        .admit("c", n(1))
        .await
        .expect("expected the first call to go");
    let mut burst = tokio::task::JoinSet::new();
    for _ in 0..9 {
        let b = b.clone();
        burst.spawn(async move { b.admit("c", n(1)).await });
    }
    advance(Duration::from_secs(1)).await;
    assert!(
        burst.try_join_next().is_none(),
        "expected the burst held while nothing is known of the upstream's count"
    );
    // The upstream had 2 calls left: the first used one.
    let told = b.observe_answer(StatusCode::OK, &remaining("1", "60"), b"", first.ticket);
    assert!(!told, "expected a 200 not read as the limit");
    let mut admitted = 0;
    while let Some(got) = burst.join_next().await {
        match got.expect("admit task does not panic") {
            Ok(_) => admitted += 1,
            Err(r) => assert_eq!(
                r.later().budget,
                Which::Upstream,
                "expected the upstream's word"
            ),
        }
    }
    assert_eq!(
        admitted, 1,
        "expected one more call, for the one left, saw {admitted}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_first_answer_without_rate_fields_hands_the_pacing_to_the_shares() {
    let b = Budget::new(spec(share(100, 1000, 5), 5000, vec![]), &Registry::new())
        .expect("a fresh registry takes the metrics");
    let first = b
        .admit("c", n(1))
        .await
        .expect("expected the first call to go");
    let waiter = tokio::spawn({
        let b = b.clone();
        async move { b.admit("c", n(1)).await }
    });
    tokio::task::yield_now().await;
    b.observe_answer(StatusCode::OK, &HeaderMap::new(), b"", first.ticket);
    let got = waiter.await.expect("admit task does not panic");
    assert!(got.is_ok(), "expected the waiter to go, saw {got:?}");
    for i in 0..3 {
        assert!(
            b.admit("c", n(1)).await.is_ok(),
            "expected call {i} to go at once on the shares"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_answer_not_coming_refuses_within_max_wait() {
    let b = Budget::new(spec(share(100, 1000, 100), 2000, vec![]), &Registry::new())
        .expect("a fresh registry takes the metrics");
    let _first = b
        .admit("c", n(1))
        .await
        .expect("expected the first call to go");
    let started = tokio::time::Instant::now();
    let got = b.admit("c", n(1)).await;
    assert_eq!(
        got.map_err(|r| r.later().budget),
        Err(Which::Upstream),
        "expected a refusal once max_wait has passed"
    );
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "expected the refusal at the 2 s max_wait"
    );
}

#[tokio::test(start_paused = true)]
async fn a_constant_remaining_keeps_calls_going() {
    let b = budget(spec(share(100, 1000, 100), 0, vec![]));
    for i in 0..10 {
        let admitted = b.admit("c", n(1)).await;
        let Ok(admitted) = admitted else {
            panic!("call {i}: expected it to go, saw {admitted:?}");
        };
        b.observe_answer(StatusCode::OK, &remaining("2", "30"), b"", admitted.ticket);
        advance(Duration::from_millis(100)).await;
    }
}

const LIMIT_BODY: &[u8] = br#"{"error":"rate_limit_reached"}"#;

/// A budget whose upstream said stop without saying for how long, at 0: the blind pause
/// runs to 60 s (the period is an hour, as the real API's window), when one probe goes.
async fn blind_paused(max_wait_ms: u64) -> Budget {
    let b = budget(spec(share(100, 3_600_000, 100), max_wait_ms, vec![]));
    let first = b.admit("c", n(1)).await.expect("a first call");
    let limited = b.observe_answer(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        LIMIT_BODY,
        first.ticket,
    );
    assert!(limited, "expected the API's 400 read as the limit");
    b
}

fn two_waiting(b: &Budget) -> tokio::task::JoinSet<Result<Admitted, Refused>> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let b = b.clone();
        set.spawn(async move { b.admit("c", n(1)).await });
    }
    set
}

#[tokio::test(start_paused = true)]
async fn callers_whose_wait_covers_the_blind_probe_wait_for_it_and_are_served() {
    let b = blind_paused(5000).await;
    advance(Duration::from_secs(57)).await;
    let started = tokio::time::Instant::now();
    let mut set = two_waiting(&b);
    let probe = set.join_next().await.expect("two tasks");
    let probe = probe.expect("the admission does not panic");
    let probe = probe.unwrap_or_else(|e| {
        panic!("expected one caller, waiting 3 s of its 5, to go as the probe, saw {e:?}")
    });
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(3),
        "expected the probe to go when the blind minute ends"
    );
    let ok = remaining("50", "3600");
    b.observe_answer(StatusCode::OK, &ok, b"", probe.ticket);
    let other = set.join_next().await.expect("two tasks");
    let other = other.expect("the admission does not panic");
    assert!(
        other.is_ok(),
        "expected the other caller served once the probe's answer lifted the pause, saw {other:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_probe_refuses_its_waiters_with_the_new_pause() {
    let b = blind_paused(5000).await;
    advance(Duration::from_secs(58)).await;
    let mut set = two_waiting(&b);
    let probe = set.join_next().await.expect("two tasks");
    let probe = probe.expect("the admission does not panic");
    let probe = probe.unwrap_or_else(|e| panic!("expected a probe at 60 s, saw {e:?}"));
    advance(Duration::from_millis(500)).await;
    b.observe_answer(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        LIMIT_BODY,
        probe.ticket,
    );
    let other = set.join_next().await.expect("two tasks");
    let other = other.expect("the admission does not panic");
    assert_eq!(
        other,
        Err(Refused::Later(Rejected {
            retry_after: Duration::from_secs(60),
            budget: Which::Upstream,
        })),
        "expected the waiter refused with the fresh blind minute"
    );
}

#[tokio::test(start_paused = true)]
async fn a_caller_whose_wait_ends_before_the_probe_is_refused_with_the_pause_left() {
    let b = blind_paused(5000).await;
    advance(Duration::from_secs(50)).await;
    assert_eq!(
        b.admit("c", n(1)).await,
        Err(Refused::Later(Rejected {
            retry_after: Duration::from_secs(10),
            budget: Which::Upstream,
        })),
        "expected a caller that cannot wait 10 s refused at once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_window_admits_no_more_than_the_learnt_limit() {
    let b = budget(spec(share(100, 1000, 100), 0, vec![]));
    // Reset 9 s from now, rounded down: the window ends by 10 s.
    let mut h = remaining("9", "9");
    h.insert("x-ratelimit-limit", HeaderValue::from_static("10"));
    let first = b.admit("c", n(1)).await.expect("a first call");
    b.observe_answer(StatusCode::OK, &h, b"", first.ticket);
    let mut out = Vec::new();
    for _ in 0..2 {
        out.push(b.admit("c", n(1)).await.expect("a call in the window"));
    }
    advance(Duration::from_secs(10)).await;
    let mut admitted = 0;
    while admitted < 50 {
        match b.admit("c", n(1)).await {
            Ok(a) => out.push(a),
            Err(_) => break,
        }
        admitted += 1;
    }
    assert_eq!(
        admitted, 8,
        "expected the new window to take the learnt limit of 10 less the 2 calls still out, \
         whatever the shares allow"
    );
}

/// 20 services against an upstream allowing 30 calls in each 10 s window, counting and
/// answering every call after a random delay of up to 300 ms: for two simulated minutes
/// no call meets its limit, and the calls keep going (most of what it allows is used).
#[tokio::test(start_paused = true)]
async fn jittered_answers_never_meet_the_upstreams_limit() {
    let b = Budget::new(spec(share(60, 10_000, 10), 500, vec![]), &Registry::new())
        .expect("a fresh registry takes the metrics");
    let upstream = std::sync::Arc::new(Windowed::new(30, Duration::from_secs(10), 300));
    let admitted = drive(
        std::slice::from_ref(&b),
        &upstream,
        20,
        Duration::from_secs(120),
    )
    .await;
    let over = upstream.over.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        over, 0,
        "expected no limit answer, saw {over} of {admitted} calls"
    );
    assert!(
        admitted >= 30 * 12 * 8 / 10,
        "expected most of the 12 windows' 30 calls used, saw {admitted}"
    );
}

/// An upstream that sends no reset: a `Remaining: 0` starts the blind pause, and an answer
/// to a call sent before it, landing later with more left (counted earlier), must not lift
/// it: only the probe's answer says the upstream takes calls again.
#[tokio::test(start_paused = true)]
async fn a_late_answer_to_an_older_call_does_not_lift_a_blind_pause() {
    let b = budget(spec(share(100, 3_600_000, 100), 1000, vec![]));
    let only = |left: &'static str| {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static(left));
        h
    };
    let first = b.admit("c", n(1)).await.expect("the first call");
    b.observe_answer(StatusCode::OK, &only("5"), b"", first.ticket);
    let older = b.admit("c", n(1)).await.expect("an allowed call");
    let newer = b.admit("c", n(1)).await.expect("another allowed call");
    b.observe_answer(StatusCode::OK, &only("0"), b"", newer.ticket);
    assert!(b.paused_for().is_some(), "expected Remaining 0 to pause");
    b.observe_answer(StatusCode::OK, &only("1"), b"", older.ticket);
    assert!(
        b.paused_for().is_some(),
        "expected the pause to hold after an older call's answer landed late"
    );
    let refused = b.admit("c", n(1)).await;
    assert!(
        matches!(
            refused,
            Err(Refused::Later(Rejected {
                budget: Which::Upstream,
                ..
            }))
        ),
        "expected the next call refused by the upstream's pause, saw {refused:?}"
    );
}

/// `X-RateLimit-Limit` and `-Remaining` with no reset, as the real API sometimes sends.
fn unreset(left: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-ratelimit-limit", HeaderValue::from_static("30"));
    h.insert("x-ratelimit-remaining", HeaderValue::from_static(left));
    h
}

/// A budget of `period_ms` whose upstream counted 5 left, then said stop naming no reset.
async fn limited_without_reset(period_ms: u64) -> Budget {
    let b = budget(spec(share(100, period_ms, 100), 5000, vec![]));
    let first = b.admit("c", n(1)).await.expect("a first call");
    b.observe_answer(StatusCode::OK, &unreset("5"), b"", first.ticket);
    let second = b.admit("c", n(1)).await.expect("a second call");
    let limited = b.observe_answer(
        StatusCode::BAD_REQUEST,
        &HeaderMap::new(),
        LIMIT_BODY,
        second.ticket,
    );
    assert!(limited, "expected the API's 400 read as the limit");
    b
}

/// The `X-RateLimit-Reset` a client of `b` gets now, in seconds from now.
fn reset_shown(b: &Budget) -> u64 {
    let [_, _, reset] = b.api_headers("c", None);
    let reset: u64 = reset
        .to_str()
        .ok()
        .and_then(|r| r.parse().ok())
        .expect("a whole Unix second");
    let now = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    reset.saturating_sub(now)
}

/// With `budget.period` at 3 s (the operator's word for the upstream's window) and no
/// reset ever named, the blind pause after a limit answer lasts those 3 s, not a minute:
/// the count renews when the window ends, and one probe then asks.
#[tokio::test(start_paused = true)]
async fn the_blind_pause_is_no_longer_than_the_configured_period() {
    let b = limited_without_reset(3000).await;
    assert_eq!(
        b.paused_for(),
        Some(Duration::from_secs(3)),
        "expected the blind pause cut to the 3 s period"
    );
    advance(Duration::from_secs(3)).await;
    let probe = b.admit("c", n(1)).await;
    assert!(probe.is_ok(), "expected the probe at 3 s, saw {probe:?}");
}

/// After a blind pause whose probe was answered without a reset, the `X-RateLimit-Reset`
/// clients get names the end of the window assumed from the configured period (5 min
/// here), never an hour no one named.
#[tokio::test(start_paused = true)]
async fn after_a_blind_pause_the_reset_shown_is_within_the_configured_period() {
    let b = limited_without_reset(300_000).await;
    advance(Duration::from_secs(60)).await;
    let probe = b
        .admit("c", n(1))
        .await
        .expect("the probe after the minute");
    b.observe_answer(StatusCode::OK, &unreset("20"), b"", probe.ticket);
    let shown = reset_shown(&b);
    assert!(
        (1..=301).contains(&shown),
        "expected a reset within the 5 min period, saw {shown} s from now"
    );
}

#[test]
fn the_limit_answer_is_known_in_the_envelope_and_in_any_case() {
    let bad = StatusCode::BAD_REQUEST;
    for body in [
        r#"{"error":"rate_limit_reached"}"#,
        r#"{"error":"RATE_LIMIT_REACHED"}"#,
        r#"{"meta":{"code":400,"error_type":"rate_limit_reached"}}"#,
        r#"{"meta":{"code":400,"error_type":"Rate_Limit_Reached","error_message":"m"}}"#,
    ] {
        assert!(
            limit_reached(bad, body.as_bytes()),
            "expected {body} read as the upstream's limit"
        );
    }
    for body in [
        r#"{"error":"invalid_request"}"#,
        r#"{"meta":{"code":400,"error_type":"invalid_request"}}"#,
        r#"{"error_description":"rate_limit_reached"}"#,
        "rate_limit_reached",
    ] {
        assert!(
            !limit_reached(bad, body.as_bytes()),
            "expected {body} read as the client's own fault"
        );
    }
    // However long the answer: an outside test padded it past 64 KiB and every call went on
    // into the limit, each 400 passed to a client as its own fault.
    let pad = "x".repeat(300_000);
    let long = format!(
        r#"{{"meta":{{"error_type":"rate_limit_reached"}},"pad":"{pad}","error":"rate_limit_reached"}}"#
    );
    assert!(
        limit_reached(bad, long.as_bytes()),
        "expected a {} byte limit answer read as the limit",
        long.len()
    );
    let ok = br#"{"error":"rate_limit_reached"}"#;
    assert!(
        !limit_reached(StatusCode::OK, ok),
        "expected a 200 never read as the limit"
    );
}

/// An upstream whose window really ends 5.6 s after its limit answer, which says
/// `X-RateLimit-Reset: 5` (whole seconds, rounded down, as the real API gives it): no call
/// is let through before 5.6 s, calls go again within the second after the one named, and
/// no refusal's `Retry-After` names a time before the gateway sends again.
#[tokio::test(start_paused = true)]
async fn a_whole_second_reset_is_never_trusted_to_end_early() {
    let b = budget(spec(share(100, 3_600_000, 100), 0, vec![]));
    let started = tokio::time::Instant::now();
    let first = b.admit("c", n(1)).await.expect("a first call");
    let mut h = remaining("0", "5");
    h.insert("x-ratelimit-limit", HeaderValue::from_static("30"));
    let limited = b.observe_answer(StatusCode::BAD_REQUEST, &h, LIMIT_BODY, first.ticket);
    assert!(limited, "expected the API's 400 read as the limit");
    let real_end = Duration::from_millis(5600);
    let mut earliest_promised = Duration::MAX;
    let resumed = loop {
        advance(Duration::from_millis(100)).await;
        let at = started.elapsed();
        assert!(
            at < Duration::from_secs(10),
            "expected calls to go again, still refused at {at:?}"
        );
        match b.admit("c", n(1)).await {
            Ok(_) => break at,
            Err(r) => {
                let back = at + Duration::from_secs(r.later().retry_after_secs());
                earliest_promised = earliest_promised.min(back);
            }
        }
    };
    assert!(
        resumed >= real_end,
        "expected no call before the window's real end at {real_end:?}, saw one at {resumed:?}"
    );
    assert!(
        resumed <= real_end + Duration::from_secs(1),
        "expected calls again within the second after the one named, saw {resumed:?}"
    );
    assert!(
        earliest_promised >= resumed,
        "expected no Retry-After naming a time before calls go again ({resumed:?}), saw one \
         for {earliest_promised:?}"
    );
}

/// The same through Redis: a replica reads the limit answer saying `Reset: 1`, and the
/// other replica is refused until the end of that second, 2 s after the answer, not one.
#[tokio::test]
async fn a_whole_second_reset_shared_through_redis_holds_to_the_end_of_that_second() {
    use cxgate_testkit::redis::RedisServer;
    let Some(server) = RedisServer::start_or_skip("this Redis budget test") else {
        return;
    };
    const ENV: &str = "CXGATE_T_WHOLE_SECOND";
    std::env::set_var(ENV, server.url());
    let prefix = format!("t{:08x}", fastrand::u32(..));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let registry = Registry::new();
        let redis = crate::replicas::Redis::connect(ENV, &prefix, &registry)
            .await
            .expect("a Redis handle");
        let spec = spec(share(100, 3_600_000, 100), 0, vec![]);
        let b = Budget::new_shared(spec, &registry, redis, n(2)).expect("a shared budget");
        answered_once(&b);
        replicas.push(b);
    }
    let first = replicas[0].admit("c", n(1)).await.expect("a first call");
    let told = std::time::Instant::now();
    let limited = replicas[0].observe_answer(
        StatusCode::BAD_REQUEST,
        &remaining("0", "1"),
        LIMIT_BODY,
        first.ticket,
    );
    assert!(limited, "expected the API's 400 read as the limit");
    let refused = loop {
        match replicas[1].admit("c", n(1)).await {
            Err(Refused::Later(r)) if r.budget == Which::Upstream => break r,
            other => {
                assert!(
                    told.elapsed() < Duration::from_secs(5),
                    "expected the other replica paused by Redis, saw {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let until = told.elapsed() + refused.retry_after;
    assert!(
        until >= Duration::from_millis(1500),
        "expected the shared pause to run to the end of the second named (2 s), saw it end \
         {until:?} after the answer"
    );
}
