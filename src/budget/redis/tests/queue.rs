//! The shared queue is served in the order it was booked, whoever asks: a caller with a
//! short wait left (a client with a short `max_wait`, or a call that already waited behind
//! a merged one) is refused or admitted on its own terms, and never forgives the bookings
//! of callers who wait longer.

use super::*;

/// Everyone waits up to 5 s, except `hasty`, which waits for nothing.
fn patient_and_hasty() -> BudgetSpec {
    BudgetSpec {
        global: Share {
            limit: n(10),
            period: Duration::from_millis(1000),
            burst: n(2),
        },
        max_wait: Duration::from_secs(5),
        batch_reserve: 0.0,
        clients: vec![ClientSpec {
            name: "hasty".into(),
            share: None,
            max_wait: Some(Duration::ZERO),
            priority: Priority::Interactive,
        }],
    }
}

/// A queue of 20 patient calls (the burst, then one every 100 ms: the last about 1.8 s
/// out), then a hasty call, refused. The patient call after it is booked behind the 20,
/// about 2 s out: the hasty call's take bounded the shared state by its own wait (none)
/// and cut the queue to 0.4 s, so this one went 0.3 s out, ahead of most of the queue and
/// past the share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_with_a_short_wait_does_not_cut_the_shared_queue() {
    let Some(server) = Server::start_or_skip("this Redis budget test") else {
        return;
    };
    let (budget, redis) =
        shared_budget(&server, patient_and_hasty(), "CXGATE_T_RB_QUEUE_CUT").await;
    let started = tokio::time::Instant::now();
    let mut queue = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let b = budget.clone();
        queue.spawn(async move { b.admit("patient", n(1)).await.map(|a| a.waited) });
    }
    // All 20 are booked within milliseconds (the burst goes at once, the rest wait for
    // their cells); the hasty call comes well after, well before the queue's end.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hasty = budget.admit("hasty", n(1)).await;
    assert!(
        matches!(&hasty, Err(Refused::Later(r)) if r.budget == Which::Global),
        "expected the hasty call refused by the queued global share, saw {hasty:?}"
    );
    let asked = started.elapsed();
    let next = budget
        .admit("patient", n(1))
        .await
        .expect("the patient call after the queue");
    let out = asked + next.waited;
    assert!(
        out >= Duration::from_millis(1_500),
        "expected the patient call after the hasty one booked behind the queue of 20 (about \
         2 s from its start), saw it go {out:?} from the start"
    );
    while let Some(admitted) = queue.join_next().await {
        admitted
            .expect("queued task")
            .expect("a queued patient call");
    }
    assert!(redis.is_up(), "expected Redis to stay up");
}
