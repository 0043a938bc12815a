//! Shares, queue order, refusals and the interactive reserve.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;

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
                r.later().budget,
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
            Err(Refused::Later(Rejected {
                budget: Which::Global,
                ..
            }))
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
        Err(want.into()),
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
            Err(Refused::Later(Rejected {
                budget: Which::Client,
                ..
            }))
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
    let want = Err(Refused::Later(Rejected {
        retry_after: Duration::from_secs(1),
        budget: Which::Global,
    }));
    assert_eq!(
        refused, want,
        "expected a refused at 1 s by the global queue"
    );
    let (_, state) = b.headers("a", None);
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
    let refused = b.admit("c", n(3)).await.map_err(|r| r.later().retry_after);
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

/// A caller that already waited elsewhere (behind another client's merged call) waits here
/// only for what is left of its max_wait: refused when its cell is further away than that,
/// admitted when it comes within it, and never past its deadline from arrival.
#[tokio::test(start_paused = true)]
async fn a_caller_that_waited_elsewhere_has_only_the_rest_of_its_max_wait() {
    let clients = vec![client("ui", Some(share(1, 4000, 1)), Priority::Interactive)];
    let b = budget(spec(share(1000, 1000, 1000), 2000, clients));
    assert!(b.admit("ui", n(1)).await.is_ok(), "expected the first cell");
    // The next cell is 4 s away; 2 s later it is 2 s away, which fits a fresh caller's 2 s
    // max_wait but not one that has waited 1.5 s already.
    tokio::time::advance(Duration::from_millis(2000)).await;
    let refused = b
        .admit_within("ui", n(1), Duration::from_millis(1500))
        .await;
    assert!(
        matches!(refused, Err(Refused::Later(ref r)) if r.budget == Which::Client),
        "expected a caller that waited 1.5 s already refused (2 s > the 0.5 s left), saw {refused:?}"
    );
    let started = tokio::time::Instant::now();
    let admitted = b
        .admit_within("ui", n(1), Duration::from_millis(0))
        .await
        .expect("a fresh caller waits the 2 s its max_wait allows");
    assert_eq!(
        started.elapsed(),
        Duration::from_millis(2000),
        "expected the fresh caller to wait exactly its 2 s"
    );
    assert_eq!(admitted.waited, Duration::from_millis(2000));
}

/// A cost above a burst could only be booked as debt, locking every caller out until it
/// drained (a million cells at 10 a second: 28 hours). It is refused and books nothing.
#[tokio::test(start_paused = true)]
async fn a_cost_above_the_burst_is_refused_and_books_nothing() {
    let clients = vec![
        client("own", Some(share(60, 60_000, 4)), Priority::Interactive),
        client("bulk", None, Priority::Batch),
    ];
    let mut s = spec(share(600, 60_000, 20), 2000, clients);
    s.batch_reserve = 0.5;
    let b = budget(s);
    let never = |budget, burst| {
        Err(Refused::Never(TooCostly {
            cost: 1_000_000,
            burst,
            budget,
        }))
    };
    for (who, want) in [
        ("anyone", never(Which::Global, 20)),
        ("bulk", never(Which::Global, 10)),
        ("own", never(Which::Client, 4)),
    ] {
        let refused = b.admit(who, n(1_000_000)).await.map(|a| a.waited);
        assert_eq!(
            refused, want,
            "expected {who}'s call refused as never fitting"
        );
    }
    assert_eq!(
        global_left(&b),
        20,
        "expected nothing booked on the global share"
    );
    let next = b.admit("other", n(20)).await.map(|a| a.waited);
    assert_eq!(
        next,
        Ok(Duration::ZERO),
        "expected the next caller's whole burst admitted at once"
    );
}

/// A reload to a smaller burst cuts the debt the old terms booked to what the new ones
/// could have: at most a full new burst past the longest wait.
#[tokio::test(start_paused = true)]
async fn a_reload_cuts_debt_the_new_terms_could_not_have_booked() {
    let b = budget(spec(share(600, 60_000, 50), 2000, vec![]));
    b.admit("c", n(50))
        .await
        .expect("expected the whole burst admitted");
    b.reload(spec(share(600, 60_000, 5), 2000, vec![]));
    let refused = b.admit("c", n(1)).await.map_err(|r| r.later().retry_after);
    assert_eq!(
        refused,
        Err(Duration::from_millis(2100)),
        "expected the debt cut to 2 s + 5 cells (one usable 400 ms before), not 5 s"
    );
}
