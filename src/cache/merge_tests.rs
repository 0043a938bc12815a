//! The single-flight merger's unit tests: one fetch per key, cancellation, patience and
//! flights that take each other's place.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A fetch that counts its runs and answers `value` after 100 ms.
fn slow_fetch(runs: &Arc<AtomicUsize>, value: u32) -> impl Future<Output = u32> + Send + 'static {
    let runs = Arc::clone(runs);
    async move {
        runs.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        value
    }
}

#[tokio::test(start_paused = true)]
async fn a_thousand_callers_share_one_fetch() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let mut callers = Vec::new();
    for i in 0..1000 {
        let merger = merger.clone();
        let fetch = slow_fetch(&runs, 7 + i);
        callers.push(tokio::spawn(async move {
            merger.run("GET /me".into(), fetch).await
        }));
    }
    let mut leaders = 0;
    for caller in callers {
        let (value, role) = caller.await.expect("caller task").expect("merged fetch");
        assert_eq!(
            value, 7,
            "every caller must get the leader's value: expected 7, saw {value}"
        );
        leaders += usize::from(role == Role::Leader);
    }
    let seen = runs.load(Ordering::SeqCst);
    assert_eq!(
        seen, 1,
        "expected the fetch to run once, it ran {seen} times"
    );
    assert_eq!(leaders, 1, "expected exactly one leader, saw {leaders}");
    assert_eq!(
        merger.in_flight(),
        0,
        "expected no key in flight, saw {}",
        merger.in_flight()
    );
}

#[tokio::test(start_paused = true)]
async fn different_keys_do_not_merge() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let a = merger.run("a".into(), slow_fetch(&runs, 1));
    let b = merger.run("b".into(), slow_fetch(&runs, 2));
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (a.expect("a"), b.expect("b"));
    assert_eq!(
        (a, b),
        ((1, Role::Leader), (2, Role::Leader)),
        "expected two leaders with their own values"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2, "expected two fetches");
}

#[tokio::test(start_paused = true)]
async fn a_dropped_leader_does_not_strand_followers() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let leader = {
        let (merger, fetch) = (merger.clone(), slow_fetch(&runs, 42));
        tokio::spawn(async move { merger.run("k".into(), fetch).await })
    };
    tokio::task::yield_now().await;
    assert_eq!(
        merger.in_flight(),
        1,
        "expected the leader's flight to be registered"
    );
    let follower = {
        let (merger, fetch) = (merger.clone(), slow_fetch(&runs, 0));
        tokio::spawn(async move { merger.run("k".into(), fetch).await })
    };
    tokio::time::advance(Duration::from_millis(10)).await;
    leader.abort();
    assert!(
        leader.await.is_err_and(|e| e.is_cancelled()),
        "expected the leader to be cancelled"
    );
    let seen = follower
        .await
        .expect("follower task")
        .expect("merged fetch");
    assert_eq!(
        seen,
        (42, Role::Follower),
        "expected the leader's value as follower, saw {seen:?}"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "expected one fetch despite the cancelled leader"
    );
    assert_eq!(
        merger.in_flight(),
        0,
        "expected the key freed, {} in flight",
        merger.in_flight()
    );
}

#[tokio::test(start_paused = true)]
async fn a_panicking_fetch_fails_every_waiter_and_frees_the_key() {
    let merger = Merger::<u32>::new();
    let mut callers = Vec::new();
    for _ in 0..10 {
        let merger = merger.clone();
        callers.push(tokio::spawn(async move {
            let fetch = async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                panic!("upstream exploded");
            };
            merger.run("k".into(), fetch).await
        }));
    }
    for caller in callers {
        let seen = caller.await.expect("caller task");
        assert!(
            seen.is_err(),
            "expected MergeError after a panic, saw {seen:?}"
        );
    }
    assert_eq!(
        merger.in_flight(),
        0,
        "expected the key freed after the panic"
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let seen = merger
        .run("k".into(), slow_fetch(&runs, 5))
        .await
        .expect("new leader");
    assert_eq!(
        seen,
        (5, Role::Leader),
        "expected a new leader after the panic, saw {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fetch_run_while_wanted_stops_when_its_last_caller_hangs_up() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let fetch = |runs: &Arc<AtomicUsize>| {
        let (done, inner) = (Arc::clone(&done), slow_fetch(runs, 1));
        async move {
            let v = inner.await;
            done.fetch_add(1, Ordering::SeqCst);
            v
        }
    };
    let first = {
        let (merger, fetch) = (merger.clone(), fetch(&runs));
        tokio::spawn(async move { merger.run_while_wanted("k".into(), fetch).await })
    };
    tokio::task::yield_now().await;
    let second = {
        let (merger, fetch) = (merger.clone(), fetch(&runs));
        tokio::spawn(async move { merger.run_while_wanted("k".into(), fetch).await })
    };
    tokio::time::advance(Duration::from_millis(10)).await;
    first.abort();
    let _ = first.await;
    assert_eq!(
        merger.in_flight(),
        1,
        "one caller left: the fetch must go on"
    );
    second.abort();
    let _ = second.await;
    assert_eq!(merger.in_flight(), 0, "nobody left: the key must be freed");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        done.load(Ordering::SeqCst),
        0,
        "expected the abandoned fetch to be cancelled, it completed"
    );
    let again = merger
        .run_while_wanted("k".into(), fetch(&runs))
        .await
        .expect("a new fetch");
    assert_eq!(again, (1, Role::Leader), "expected a fresh leader");
}

#[tokio::test(start_paused = true)]
async fn the_fetch_finishes_when_every_caller_hangs_up() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let fetch = {
        let (done, inner) = (Arc::clone(&done), slow_fetch(&runs, 1));
        async move {
            let v = inner.await;
            done.fetch_add(1, Ordering::SeqCst);
            v
        }
    };
    let timed_out =
        tokio::time::timeout(Duration::from_millis(10), merger.run("k".into(), fetch)).await;
    assert!(
        timed_out.is_err(),
        "expected the only caller to give up, saw {timed_out:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        done.load(Ordering::SeqCst),
        1,
        "expected the orphaned fetch to complete"
    );
    assert_eq!(
        merger.in_flight(),
        0,
        "expected the key freed by the task itself"
    );
}

fn kind<V, B>(joined: &Joined<V, B>) -> &'static str {
    match joined {
        Joined::Led(_) => "Led",
        Joined::Followed(..) => "Followed",
        Joined::Impatient(..) => "Impatient",
    }
}

#[tokio::test(start_paused = true)]
async fn a_patient_follower_gets_its_fetch_back_while_the_leader_is_queued() {
    let merger = Merger::<u32>::new();
    let leader = {
        let merger = merger.clone();
        tokio::spawn(async move {
            // Queued for 10 s before it would be let through: it never reports `sent`.
            let build = |progress: Progress<u32>| async move {
                progress.queued();
                tokio::time::sleep(Duration::from_secs(10)).await;
                1
            };
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    let build = |_: Progress<u32>| async { 2 };
    let joined = merger
        .run_patient("k".into(), build, Duration::from_secs(1), None, false)
        .await
        .expect("joined");
    let waited = asked.elapsed();
    let own = match joined {
        Joined::Impatient(own, _) => own,
        other => panic!(
            "expected the follower's own fetch back, saw {}",
            kind(&other)
        ),
    };
    assert_eq!(
        waited,
        Duration::from_secs(1),
        "expected the follower to wait exactly its patience, it waited {waited:?}"
    );
    assert_eq!(
        own(Progress::<u32>::detached()).await,
        2,
        "expected its own fetch to run"
    );
    let led = leader.await.expect("leader task").expect("leader");
    assert!(
        matches!(led, Joined::Led(1)),
        "expected the leader to keep its own value, saw {}",
        kind(&led)
    );
}

#[tokio::test(start_paused = true)]
async fn a_follower_waits_for_a_leader_that_was_let_through() {
    let merger = Merger::<u32>::new();
    let leader = {
        let merger = merger.clone();
        tokio::spawn(async move {
            let build = |progress: Progress<u32>| async move {
                progress.sent();
                tokio::time::sleep(Duration::from_secs(5)).await;
                7
            };
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let build = |_: Progress<u32>| async { 0 };
    let joined = merger
        .run_patient("k".into(), build, Duration::from_millis(10), None, false)
        .await
        .expect("joined");
    assert!(
        matches!(joined, Joined::Followed(7, _)),
        "expected the leader's value once it was sent upstream, saw {}",
        kind(&joined)
    );
    leader.await.expect("leader task").expect("leader");
}

#[tokio::test(start_paused = true)]
async fn a_follower_with_no_patience_still_follows_a_leader_not_yet_scheduled() {
    let merger = Merger::<u32>::new();
    let runs = Arc::new(AtomicUsize::new(0));
    let build = |runs: &Arc<AtomicUsize>, value: u32| {
        let runs = Arc::clone(runs);
        move |progress: Progress<u32>| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            progress.sent();
            tokio::time::sleep(Duration::from_millis(100)).await;
            value
        }
    };
    // Both join before the leader's flight task has run at all: its budget has not
    // decided yet, which takes none of the follower's patience.
    let leader = merger.run_patient("k".into(), build(&runs, 1), Duration::MAX, None, false);
    let follower = merger.run_patient("k".into(), build(&runs, 2), Duration::ZERO, None, false);
    let (leader, follower) = tokio::join!(leader, follower);
    let (leader, follower) = (leader.expect("leader"), follower.expect("follower"));
    assert!(
        matches!(follower, Joined::Followed(1, _)),
        "expected the follower to take the leader's value, saw {}",
        kind(&follower)
    );
    assert!(
        matches!(leader, Joined::Led(1)),
        "expected the leader's own value"
    );
    let seen = runs.load(Ordering::SeqCst);
    assert_eq!(seen, 1, "expected one fetch, saw {seen}");
}

#[tokio::test(start_paused = true)]
async fn a_queued_flight_displaced_by_a_sent_one_takes_its_value() {
    let merger = Merger::<u32>::new();
    let leader = {
        let merger = merger.clone();
        tokio::spawn(async move {
            let build = |progress: Progress<u32>| async move {
                progress.queued();
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(10)) => 1,
                    peer = progress.displaced() => peer.value().await.unwrap_or(0),
                }
            };
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    let own = |progress: Progress<u32>| async move {
        progress.sent();
        assert!(
            progress.take_place().is_none(),
            "expected the first flight sent to take the key's place, not to join"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        2
    };
    let own = {
        let merger = merger.clone();
        tokio::spawn(async move { merger.run_own("k".into(), own, false).await })
    };
    tokio::task::yield_now().await;
    // A newcomer joins the flight on its way upstream, not the queued one.
    let newcomer = merger
        .run_patient("k".into(), |_| async { 3 }, Duration::ZERO, None, false)
        .await
        .expect("newcomer");
    assert!(
        matches!(newcomer, Joined::Followed(2, _)),
        "expected a newcomer to follow the flight already sent, saw {}",
        kind(&newcomer)
    );
    let led = leader.await.expect("leader task").expect("leader");
    let waited = asked.elapsed();
    assert!(
        matches!(led, Joined::Led(2)),
        "expected the queued flight to take the sent flight's value, saw {}",
        kind(&led)
    );
    assert_eq!(
        waited,
        Duration::from_secs(1),
        "expected the queued flight answered when the sent one was, after {waited:?}"
    );
    assert_eq!(own.await.expect("own task").expect("own"), 2);
    assert_eq!(merger.in_flight(), 0, "expected every key freed");
}

#[tokio::test(start_paused = true)]
async fn a_flight_let_through_after_another_joins_it() {
    let merger = Merger::<u32>::new();
    let leader = {
        let merger = merger.clone();
        tokio::spawn(async move {
            let build = |progress: Progress<u32>| async move {
                progress.sent();
                assert!(progress.take_place().is_none(), "the leader stands already");
                tokio::time::sleep(Duration::from_secs(1)).await;
                7
            };
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let own = |progress: Progress<u32>| async move {
        progress.sent();
        match progress.take_place() {
            Some(peer) => peer.value().await.unwrap_or(0),
            None => 8,
        }
    };
    let value = merger.run_own("k".into(), own, false).await.expect("own");
    assert_eq!(
        value, 7,
        "expected a flight let through after the leader to take the leader's value"
    );
    leader.await.expect("leader task").expect("leader");
}

/// A fetch as the read path makes it: queued for `queue` by its own budget unless a flight
/// of its key gets past its queue first (it then takes that one's value), then sent
/// upstream for `call`, answering `value`. `spent` counts the fetches that went upstream.
fn budgeted(
    spent: &Arc<AtomicUsize>,
    queue: Duration,
    call: Duration,
    value: u32,
) -> impl FnOnce(Progress<u32>) -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> {
    let spent = Arc::clone(spent);
    move |progress: Progress<u32>| {
        Box::pin(async move {
            if !queue.is_zero() {
                progress.queued();
                tokio::select! {
                    () = tokio::time::sleep(queue) => {}
                    peer = progress.displaced() => return peer.value().await.unwrap_or(0),
                }
            }
            progress.sent();
            if let Some(peer) = progress.take_place() {
                return peer.value().await.unwrap_or(0);
            }
            spent.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(call).await;
            value
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_follower_gone_its_own_way_takes_the_value_of_a_leader_let_through_first() {
    let merger = Merger::<u32>::new();
    let spent = Arc::new(AtomicUsize::new(0));
    let secs = Duration::from_secs;
    let leader = {
        let (merger, build) = (merger.clone(), budgeted(&spent, secs(1), secs(1), 1));
        tokio::spawn(async move {
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    // With no patience it gets its fetch back at once, and its own budget would queue it
    // 5 s: the leader, let through after 1 s, answers it instead.
    let joined = merger
        .run_patient(
            "k".into(),
            budgeted(&spent, secs(5), secs(1), 2),
            Duration::ZERO,
            None,
            false,
        )
        .await
        .expect("joined");
    let Joined::Impatient(own, _) = joined else {
        panic!(
            "expected the follower's own fetch back at once, saw {}",
            kind(&joined)
        );
    };
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "expected no wait on the queued leader"
    );
    let value = merger.run_own("k".into(), own, false).await.expect("own");
    let waited = asked.elapsed();
    assert_eq!(value, 1, "expected the leader's value, saw {value}");
    assert_eq!(
        waited,
        secs(2),
        "expected the answer when the leader's call ended (1 s queued, 1 s upstream), not \
         after its own 5 s queue: it came after {waited:?}"
    );
    let calls = spent.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "expected one call upstream, saw {calls}");
    let led = leader.await.expect("leader task").expect("leader");
    assert!(
        matches!(led, Joined::Led(1)),
        "expected the leader's own value, saw {}",
        kind(&led)
    );
    assert_eq!(merger.in_flight(), 0, "expected every key freed");
}

#[tokio::test(start_paused = true)]
async fn the_first_flight_past_its_queue_answers_the_queued_leader_and_every_rival() {
    let merger = Merger::<u32>::new();
    let spent = Arc::new(AtomicUsize::new(0));
    let secs = Duration::from_secs;
    let leader = {
        let (merger, build) = (merger.clone(), budgeted(&spent, secs(10), secs(1), 1));
        tokio::spawn(async move {
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    // Two followers go their own way while the leader is queued: one is let through at
    // once, the other would queue 5 s.
    let rival = |queue: Duration, value: u32| {
        let (merger, build) = (merger.clone(), budgeted(&spent, queue, secs(1), value));
        tokio::spawn(async move { merger.run_own("k".into(), build, false).await })
    };
    let slow = rival(secs(5), 3);
    tokio::task::yield_now().await;
    let fast = rival(Duration::ZERO, 2);
    let fast = fast.await.expect("fast task").expect("fast");
    let slow = slow.await.expect("slow task").expect("slow");
    let waited = asked.elapsed();
    assert_eq!(
        (fast, slow),
        (2, 2),
        "expected both rivals answered by the call let through"
    );
    assert_eq!(
        waited,
        secs(1),
        "expected the slow rival answered with that call, after {waited:?}"
    );
    let led = leader.await.expect("leader task").expect("leader");
    assert!(
        matches!(led, Joined::Led(2)),
        "expected the queued leader to take the call let through, saw {}",
        kind(&led)
    );
    let calls = spent.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "expected one call upstream, saw {calls}");
}

#[tokio::test(start_paused = true)]
async fn a_flight_started_beside_one_already_let_through_takes_its_value_at_once() {
    let merger = Merger::<u32>::new();
    let spent = Arc::new(AtomicUsize::new(0));
    let secs = Duration::from_secs;
    let leader = {
        let (merger, build) = (merger.clone(), budgeted(&spent, Duration::ZERO, secs(1), 1));
        tokio::spawn(async move {
            merger
                .run_patient("k".into(), build, Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    let value = merger
        .run_own("k".into(), budgeted(&spent, secs(5), secs(1), 2), false)
        .await
        .expect("own");
    let waited = asked.elapsed();
    assert_eq!(
        (value, waited),
        (1, secs(1)),
        "expected the leader's value when its call ended"
    );
    leader.await.expect("leader task").expect("leader");
    let calls = spent.load(Ordering::SeqCst);
    assert_eq!(calls, 1, "expected one call upstream, saw {calls}");
}

/// A leader whose cells are booked on the global share for 1 s from now, then sent, and
/// answering `value` after 100 ms.
fn booked_leader(
    value: u32,
) -> impl FnOnce(Progress<u32>) -> std::pin::Pin<Box<dyn Future<Output = u32> + Send>> {
    move |progress: Progress<u32>| {
        Box::pin(async move {
            let at = tokio::time::Instant::now() + Duration::from_secs(1);
            progress.booked(at);
            tokio::time::sleep_until(at).await;
            progress.sent();
            tokio::time::sleep(Duration::from_millis(100)).await;
            value
        })
    }
}

#[tokio::test(start_paused = true)]
async fn a_follower_whose_wait_reaches_the_leaders_booked_cells_follows_with_no_patience() {
    let merger = Merger::<u32>::new();
    let leader = {
        let merger = merger.clone();
        tokio::spawn(async move {
            merger
                .run_patient("k".into(), booked_leader(1), Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let own = |runs: &Arc<AtomicUsize>| {
        let runs = Arc::clone(runs);
        move |_: Progress<u32>| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            2
        }
    };
    // Its own wait ends 2 s from now, past the leader's cells (1 s): it follows, its own
    // fetch unrun, and takes the leader's value when the leader's call ends.
    let asked = tokio::time::Instant::now();
    let by = Some(asked + Duration::from_secs(2));
    let joined = merger
        .run_patient("k".into(), own(&runs), Duration::ZERO, by, false)
        .await
        .expect("joined");
    assert!(
        matches!(joined, Joined::Followed(1, _)),
        "expected the follower to follow the booked leader, saw {}",
        kind(&joined)
    );
    let waited = asked.elapsed();
    assert_eq!(
        waited,
        Duration::from_millis(1100),
        "expected the answer when the leader's call ended (1 s booked, 100 ms upstream)"
    );
    // One that cannot wait so long gets its fetch back at once, to decide on its own terms.
    let leader_again = {
        let merger = merger.clone();
        tokio::spawn(async move {
            merger
                .run_patient("j".into(), booked_leader(3), Duration::MAX, None, false)
                .await
        })
    };
    tokio::task::yield_now().await;
    let asked = tokio::time::Instant::now();
    let by = Some(asked + Duration::from_millis(500));
    let joined = merger
        .run_patient("j".into(), own(&runs), Duration::ZERO, by, false)
        .await
        .expect("joined");
    assert!(
        matches!(joined, Joined::Impatient(..)),
        "expected a follower whose wait ends before the leader's cells to get its fetch \
         back, saw {}",
        kind(&joined)
    );
    assert_eq!(
        asked.elapsed(),
        Duration::ZERO,
        "expected its fetch back at once"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "expected no own fetch run here"
    );
    leader.await.expect("leader task").expect("leader");
    leader_again.await.expect("leader task").expect("leader");
}
