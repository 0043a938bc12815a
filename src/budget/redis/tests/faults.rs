//! What Redis loses under load, measured as the upstream sees it: shared keys gone without
//! a disconnect (FLUSHALL, keys deleted, as eviction does), the server killed and started
//! again empty, and a replica gone (killed) with calls out. Three replicas drive an
//! upstream of 20 calls per 3 s window that answers over it with the API's 400
//! `rate_limit_reached`: none of its answers may say the limit is reached. And a replica on
//! its local share for longer than a burst and a wait hands back all it booked alone.

use std::sync::Arc;

use super::*;
use crate::budget::tests::{drive, Windowed};

/// A direct connection to the test server, for the faults.
async fn direct(server: &Server) -> ::redis::aio::MultiplexedConnection {
    ::redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("direct connection")
}

fn key(budget: &Budget, suffix: &str) -> String {
    let shared = budget.inner.shared.as_ref().expect("a shared budget");
    shared.redis.key(suffix)
}

/// Every 700 ms, in turn: FLUSHALL, and a DEL of the shared count and the calls in
/// flight (what eviction under `maxmemory` or an operator's DEL does); no disconnect, so
/// no replica sees an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_keys_lost_without_a_disconnect_never_meet_the_upstreams_limit() {
    let Some(server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RF1", spec(40, 3000, 10, 500), 3).await;
    let upstream = Arc::new(Windowed::new(20, Duration::from_secs(3), 250));
    let doomed: Vec<String> = ["budget:upstream_left", "budget:in_flight"]
        .iter()
        .map(|s| key(&budgets[0], s))
        .collect();
    let mut conn = direct(&server).await;
    let faults = tokio::spawn(async move {
        let mut done = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let cmd = if done % 2 == 0 {
                ::redis::cmd("FLUSHALL")
            } else {
                let mut del = ::redis::cmd("DEL");
                del.arg(&doomed);
                del
            };
            let _: Result<(), _> = cmd.query_async(&mut conn).await;
            done += 1;
        }
    });
    let admitted = drive(&budgets, &upstream, 20, Duration::from_secs(9)).await;
    faults.abort();
    let over = upstream.over.load(Ordering::Relaxed);
    // The code before the re-seeding gave 23 of 83 here, and before the count only went
    // down within a window, CI saw one (a loss at the instant another replica's answer
    // was on its way to Redis: that replica's next take lowers the count again).
    assert_eq!(
        over, 0,
        "expected no limit answer with the shared keys lost every 700 ms, saw {over} of \
         {admitted} calls"
    );
    assert!(
        budgets
            .iter()
            .all(|b| b.inner.shared.as_ref().is_some_and(|s| s.redis.is_up())),
        "expected no replica to see an outage"
    );
    assert!(
        admitted >= 20 * 3 / 2,
        "expected calls to keep going (at least half of the 3 windows' 20), saw {admitted}"
    );
}

/// Redis killed under load for 1.5 s, started again empty, twice: while it is gone each
/// replica spends only its part of what was left, and when it is back the shared count is
/// what is truly left, not a fresh window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_started_again_under_load_never_meets_the_upstreams_limit() {
    let Some(mut server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RF2", spec(40, 3000, 10, 500), 3).await;
    let upstream = Arc::new(Windowed::new(20, Duration::from_secs(3), 250));
    let run = {
        let (budgets, upstream) = (budgets.clone(), upstream.clone());
        tokio::spawn(async move { drive(&budgets, &upstream, 20, Duration::from_secs(9)).await })
    };
    for (down_at, up_after) in [(1300, 1500), (1700, 1500)] {
        tokio::time::sleep(Duration::from_millis(down_at)).await;
        tokio::task::block_in_place(|| server.stop());
        tokio::time::sleep(Duration::from_millis(up_after)).await;
        tokio::task::block_in_place(|| server.restart());
    }
    let admitted = run.await.expect("the drive");
    let over = upstream.over.load(Ordering::Relaxed);
    // The code before the tight share gave 9 of 69; before the hand-over survived a failed
    // take and the others' parts were held while they were still cut off, 1 to 4.
    assert_eq!(
        over, 0,
        "expected no limit answer across two Redis restarts, saw {over} of {admitted} calls"
    );
    assert!(
        admitted >= 20 * 3 / 3,
        "expected calls to keep going, saw {admitted}"
    );
}

/// A replica killed with five calls out: the other replica is held back by them only for
/// their lease (the upstream timeout, here 1 s, and a little more), not for minutes.
#[tokio::test]
async fn a_dead_replicas_calls_out_stop_counting_after_their_lease() {
    let Some(server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RF3", spec(300, 1000, 30, 0), 2).await;
    let mut told = http::HeaderMap::new();
    told.insert("x-ratelimit-limit", http::HeaderValue::from_static("30"));
    told.insert(
        "x-ratelimit-remaining",
        http::HeaderValue::from_static("10"),
    );
    told.insert("x-ratelimit-reset", http::HeaderValue::from_static("3600"));
    for b in &budgets {
        b.set_call_deadline(Duration::from_secs(1));
        b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
        let first = b.admit("other", n(1)).await.expect("a first call");
        b.observe_answer(http::StatusCode::OK, &told, b"", first.ticket);
    }
    // The answers reach Redis in the background.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (dead, live) = (&budgets[0], &budgets[1]);
    for i in 0..5 {
        // Sent, never answered: the replica dies with them out.
        dead.admit("other", n(1))
            .await
            .unwrap_or_else(|e| panic!("expected call {i} on the doomed replica, saw {e:?}"));
    }
    let shared = dead.inner.shared.as_ref().expect("a shared budget");
    shared.redis.stop();
    let mut kept = Vec::new();
    while kept.len() < 10 {
        match live.admit("other", n(1)).await {
            Ok(admitted) => kept.push(admitted),
            Err(_) => break,
        }
    }
    assert_eq!(
        kept.len(),
        5,
        "expected the 10 left less the dead replica's 5 calls out, saw {}",
        kept.len()
    );
    let started = std::time::Instant::now();
    let more = loop {
        if let Ok(admitted) = live.admit("other", n(1)).await {
            break Some(admitted);
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        more.is_some(),
        "expected the dead replica's calls gone within 10 s (their lease is 3 s), not held \
         for minutes"
    );
}

/// A record of calls out that is no record (a stray or tampered key), or one counting more
/// calls than the share could ever have out, is reset, never a script error or a stall.
#[tokio::test]
async fn a_junk_or_implausible_record_of_calls_out_is_reset() {
    let Some(server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let (budget, redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RF4").await;
    let flights = key(&budget, "budget:in_flight");
    let mut conn = direct(&server).await;
    let (secs, micros): (u64, u64) = ::redis::cmd("TIME")
        .query_async(&mut conn)
        .await
        .expect("TIME");
    let soon = secs * 1_000_000 + micros + 60_000_000;
    let far = "99999999999999999999";
    for junk in [
        "abc".to_string(),
        "x".repeat(5000),
        format!("someone12345,{far},1,{far};"),
        format!("someone12345,{soon},1,99999999;"),
    ] {
        let _: () = ::redis::cmd("SET")
            .arg(&flights)
            .arg(&junk)
            .query_async(&mut conn)
            .await
            .expect("SET the record");
        let admitted = budget.admit("other", NonZeroU32::MIN).await;
        assert!(
            admitted.is_ok() && redis.is_up(),
            "{:?}: expected an admission with Redis up, saw {admitted:?}",
            &junk[..junk.len().min(40)]
        );
        if let Ok(admitted) = admitted {
            budget.call_failed(admitted.ticket);
        }
    }
}

/// Two replicas that know 10 calls are left in the window, all answered; then Redis says 30
/// again (restored from an older snapshot of the same window, the key's expiry kept): the
/// count only goes down within a window, so together they send 10, not 30.
#[tokio::test]
async fn a_count_set_back_within_the_window_is_not_believed() {
    let Some(server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RF5", spec(300, 1000, 30, 0), 2).await;
    let mut told = http::HeaderMap::new();
    told.insert("x-ratelimit-limit", http::HeaderValue::from_static("30"));
    told.insert(
        "x-ratelimit-remaining",
        http::HeaderValue::from_static("10"),
    );
    told.insert("x-ratelimit-reset", http::HeaderValue::from_static("3600"));
    for b in &budgets {
        b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
        let first = b.admit("other", n(1)).await.expect("a first call");
        b.observe_answer(http::StatusCode::OK, &told, b"", first.ticket);
    }
    let left = key(&budgets[0], "budget:upstream_left");
    let mut conn = direct(&server).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now: Option<String> = ::redis::cmd("GET")
            .arg(&left)
            .query_async(&mut conn)
            .await
            .expect("GET");
        if now.as_deref() == Some("10") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected the reports to reach Redis, saw {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _: () = ::redis::cmd("SET")
        .arg(&left)
        .arg("30")
        .arg("KEEPTTL")
        .query_async(&mut conn)
        .await
        .expect("SET the older count");
    let mut sent = Vec::new();
    for b in &budgets {
        let mut mine = 0;
        while mine < 30 {
            match b.admit("other", n(1)).await {
                Ok(admitted) => sent.push(admitted),
                Err(_) => break,
            }
            mine += 1;
        }
    }
    assert_eq!(
        sent.len(),
        10,
        "expected the 10 this window has left, not the older count's 30, saw {}",
        sent.len()
    );
    let now: Option<String> = ::redis::cmd("GET")
        .arg(&left)
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(
        now.as_deref(),
        Some("10"),
        "expected the replicas to write their lower count back"
    );
}

/// Every 1.5 s, in turn, `CLIENT KILL TYPE normal` and `TYPE pubsub` (this test's own
/// connection spared): every replica's connection drops with calls out and reports on
/// their way, each replica falls back for a moment and comes back to the count Redis kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_under_load_never_meet_the_upstreams_limit() {
    let Some(server) = Server::start_or_skip("this Redis fault test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RF6", spec(40, 3000, 10, 500), 3).await;
    let upstream = Arc::new(Windowed::new(20, Duration::from_secs(3), 250));
    let mut conn = direct(&server).await;
    let faults = tokio::spawn(async move {
        let mut done = 0u32;
        loop {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let kind = if done % 2 == 0 { "normal" } else { "pubsub" };
            let _: Result<i64, _> = ::redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg(kind)
                .arg("SKIPME")
                .arg("yes")
                .query_async(&mut conn)
                .await;
            done += 1;
        }
    });
    let admitted = drive(&budgets, &upstream, 20, Duration::from_secs(9)).await;
    faults.abort();
    let over = upstream.over.load(Ordering::Relaxed);
    assert_eq!(
        over, 0,
        "expected no limit answer with every connection killed each 1.5 s, saw {over} of \
         {admitted} calls"
    );
    assert!(
        admitted >= 20 * 3 / 2,
        "expected calls to keep going (at least half of the 3 windows' 20), saw {admitted}"
    );
}

/// Runs `alone` on its local share (and `shared` on the shared budget, if any) for
/// `spell`, each asking every 20 ms; how many `alone` admitted, all kept in `kept`.
async fn spell_alone(
    alone: &[&Budget],
    shared: Option<&Budget>,
    spell: Duration,
    kept: &mut Vec<Admitted>,
) -> u64 {
    let started = tokio::time::Instant::now();
    let mut admitted = 0;
    while started.elapsed() < spell {
        for budget in alone {
            let local = budget.inner.shared.as_ref().expect("a shared budget");
            if let Ok(a) = budget
                .admit_fallback(local, "other", n(1), 0, &|_| {})
                .await
            {
                admitted += 1;
                kept.push(a);
            }
        }
        if let Some(budget) = shared {
            while let Ok(a) = budget.admit("other", n(1)).await {
                kept.push(a);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admitted
}

/// One replica on its local share for 1.5 s, far past its burst and wait (200 ms alone),
/// while the other spends the shared count: back on Redis it hands over every cell it
/// booked alone, so the other then waits for all of them. It used to hand over only the
/// debt still ahead of its clock, a cell or two, and the rest went on top of the budget.
#[tokio::test]
async fn a_long_spell_alone_hands_back_every_cell_booked_alone() {
    let Some(server) = Server::start_or_skip("this Redis budget test") else {
        return;
    };
    // 20 calls per 2 s, 2 at once: a cell every 100 ms; alone, one every 200 ms.
    let budgets = replicas(&server, "CXGATE_T_RB_ALONE", spec(20, 2000, 2, 0), 2).await;
    for b in &budgets {
        b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
    }
    let (a, b) = (&budgets[0], &budgets[1]);
    let shared = a.inner.shared.as_ref().expect("a shared budget");
    let mut kept = vec![a.admit("other", n(1)).await.expect("a's shared call first")];
    let alone = spell_alone(&[a], Some(b), Duration::from_millis(1500), &mut kept).await;
    // a is back: its first take hands over what it booked alone.
    if let Ok(admitted) = a.admit("other", n(1)).await {
        kept.push(admitted);
    }
    assert!(
        !shared.local.load(Ordering::Acquire),
        "expected a back on the shared budget"
    );
    let wait = b
        .admit("other", n(1))
        .await
        .expect_err("expected b refused")
        .later()
        .retry_after;
    let owed = Duration::from_millis(100) * u32::try_from(alone - 2).unwrap_or(0);
    assert!(
        alone >= 5 && wait >= owed,
        "expected b to wait for the {alone} cells a booked alone (at least {owed:?}), saw \
         {wait:?}"
    );
}

/// Both replicas on their local shares for 3 s (Redis gone for both): neither booked on
/// the shared count meanwhile, so what they booked alone never went on top of anything,
/// and back on Redis they owe only the debt still ahead of their clocks, not the whole
/// spell's cells (which would shut both out for as long again).
#[tokio::test]
async fn replicas_all_alone_owe_only_their_debt_ahead() {
    let Some(server) = Server::start_or_skip("this Redis budget test") else {
        return;
    };
    let budgets = replicas(&server, "CXGATE_T_RB_ALL", spec(20, 2000, 2, 0), 2).await;
    let mut kept = Vec::new();
    for b in &budgets {
        b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
        kept.push(b.admit("other", n(1)).await.expect("a shared call first"));
    }
    let (a, b) = (&budgets[0], &budgets[1]);
    let alone = spell_alone(&[a, b], None, Duration::from_millis(3000), &mut kept).await;
    for budget in [a, b] {
        if let Ok(admitted) = budget.admit("other", n(1)).await {
            kept.push(admitted);
        }
    }
    let wait = match a.admit("other", n(1)).await {
        Ok(admitted) => {
            kept.push(admitted);
            Duration::ZERO
        }
        Err(refused) => refused.later().retry_after,
    };
    let all = Duration::from_millis(100) * u32::try_from(alone).unwrap_or(0);
    assert!(
        alone >= 10 && wait < all / 2,
        "expected a short wait after both came back, not the {all:?} of the {alone} cells \
         they booked alone, saw {wait:?}"
    );
}
