//! The budget end to end (README "Who may call", 3.5, 5): scopes, shares, the interactive reserve,
//! queueing, the upstream's own limit, and the metrics that show it, all counted by what
//! reached the simulator.
mod common;

use std::sync::Arc;
use std::time::Duration;

use cxgate::sim::{Faults, Force429, SimOptions};
use http::{Method, StatusCode};
use tokio::task::JoinSet;
use tokio::time::Instant;

use common::{client_toml, Answer, Env, BIG_BUDGET, ROUTES};

const READER: &str = "reader-key";
const ACCOUNT: &str = "account-key";
const WRITER: &str = "writer-key";

/// A distinct cacheable path per `n`, so every read is a miss.
fn contact(n: usize) -> String {
    format!("/12345/inbox/contact/twitter/{n}")
}

fn retry_after(a: &Answer) -> u64 {
    a.header("retry-after").parse().unwrap_or_else(|_| {
        panic!(
            "expected an integer Retry-After, saw {:?}",
            a.header("retry-after")
        )
    })
}

/// The gateway's own 429: envelope `rate_limited`, integer `Retry-After` of at least 1 and
/// the client's budget fields. Returns the `Retry-After`.
fn assert_gateway_429(a: &Answer, what: &str) -> u64 {
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{what}: expected 429, saw {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let kind = a.json()["meta"]["error_type"].clone();
    assert_eq!(
        kind, "rate_limited",
        "{what}: expected error_type rate_limited, saw {kind}"
    );
    let secs = retry_after(a);
    assert!(secs >= 1, "{what}: expected Retry-After >= 1, saw {secs}");
    for name in ["ratelimit-policy", "ratelimit"] {
        assert!(
            !a.header(name).is_empty(),
            "{what}: expected a {name} header on the 429, saw {:?}",
            a.headers
        );
    }
    secs
}

fn assert_forbidden(a: &Answer, what: &str) {
    assert_eq!(
        a.status,
        StatusCode::FORBIDDEN,
        "{what}: expected 403, saw {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let meta = a.json()["meta"].clone();
    assert_eq!(
        (meta["code"].clone(), meta["error_type"].clone()),
        (403.into(), "forbidden".into()),
        "{what}: expected the forbidden envelope, saw {meta}"
    );
}

fn assert_ok(a: &Answer, what: &str) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{what}: expected 200, saw {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
}

/// The value of the sample `name{labels...}` in a Prometheus text exposition, whatever the
/// order of its labels.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (labelset, value) = match rest.strip_prefix('{') {
            Some(inner) => inner.split_once("} ")?,
            None => ("", rest.strip_prefix(' ')?),
        };
        let pairs: Vec<&str> = labelset.split(',').collect();
        let all = labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}\"").as_str()));
        if all {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Sends one GET per path as `key`, all at once, and collects the answers in path order.
async fn concurrent_gets(env: &Arc<Env>, key: &str, paths: Vec<String>) -> Vec<Answer> {
    let mut set = JoinSet::new();
    for (i, path) in paths.into_iter().enumerate() {
        let env = env.clone();
        let key = key.to_string();
        set.spawn(async move { (i, env.get_as(&key, &path).await) });
    }
    let mut answers: Vec<(usize, Answer)> = Vec::new();
    while let Some(done) = set.join_next().await {
        answers.push(done.expect("request task"));
    }
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

fn statuses(answers: &[Answer]) -> (usize, usize, Vec<u16>) {
    let ok = answers
        .iter()
        .filter(|a| a.status == StatusCode::OK)
        .count();
    let limited = answers
        .iter()
        .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let other = answers
        .iter()
        .map(|a| a.status.as_u16())
        .filter(|s| *s != 200 && *s != 429)
        .collect();
    (ok, limited, other)
}

async fn stop(env: Arc<Env>) {
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("a request task still holds the test environment"),
    }
}

// 1. Scopes and accounts.
#[tokio::test]
async fn scopes_and_accounts_are_refused_before_the_upstream_and_the_cache() {
    let clients = [
        client_toml("reader", READER, "scopes = [\"read\"]"),
        client_toml("account", ACCOUNT, "accounts = [12345]"),
        client_toml("writer", WRITER, "scopes = [\"read\", \"write\"]"),
    ]
    .concat();
    let env = common::start_with(
        SimOptions::default(),
        &clients,
        &format!("{BIG_BUDGET}{ROUTES}"),
    )
    .await;
    let before = env.upstream_total();
    let auth = format!("Bearer {READER}");
    let post = env
        .send(
            Method::POST,
            &env.url("/12345/inbox/contact/twitter/1"),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "name=Someone",
        )
        .await;
    assert_forbidden(&post, "POST by a read-only client");
    let seen = env.upstream_total() - before;
    assert_eq!(
        seen, 0,
        "expected nothing upstream for a refused POST, saw {seen} calls"
    );

    let own = env.get_as(ACCOUNT, "/12345/inbox/mentions").await;
    assert_ok(&own, "account client reading its own account");
    let other = env.get_as(ACCOUNT, "/23456/inbox/mentions").await;
    assert_forbidden(&other, "account client reading account 23456");
    let seen = env.upstream_count("GET /23456/inbox/mentions");
    assert_eq!(
        seen, 0,
        "expected the refused read to reach nothing, saw {seen} calls"
    );

    // Another client fills the cache; the restricted client still gets 403 for that entry.
    let filled = env.get_as(WRITER, "/23456/inbox/mentions").await;
    assert_ok(&filled, "unrestricted client reading account 23456");
    let hit = env.get_as(WRITER, "/23456/inbox/mentions").await;
    assert!(
        hit.header("cache-status").starts_with("cxgate; hit;"),
        "expected the entry cached, saw Cache-Status {:?}",
        hit.header("cache-status")
    );
    let cached = env.get_as(ACCOUNT, "/23456/inbox/mentions").await;
    assert_forbidden(
        &cached,
        "account client reading a cached entry of account 23456",
    );
    assert!(
        cached.header("cache-status").is_empty() && cached.json().get("response").is_none(),
        "expected no cached data in the 403, saw Cache-Status {:?} body {:?}",
        cached.header("cache-status"),
        String::from_utf8_lossy(&cached.body)
    );
    let seen = env.upstream_count("GET /23456/inbox/mentions");
    assert_eq!(seen, 1, "expected one upstream call in all, saw {seen}");
    env.stop().await;
}

// 2. A burst of distinct misses against a small budget that may not queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_beyond_the_budget_get_429_and_never_reach_the_upstream() {
    let budget = "[budget]\nlimit = 5\nperiod = \"1h\"\nburst = 5\nmax_wait = \"0s\"\n";
    let env = Arc::new(common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await);
    let before = env.upstream_total();
    let answers = concurrent_gets(&env, common::KEY, (0..100).map(contact).collect()).await;
    let (ok, limited, other) = statuses(&answers);
    let seen = env.upstream_total() - before;
    assert_eq!(seen, 5, "expected exactly 5 upstream calls, saw {seen}");
    assert_eq!(
        (ok, limited, other),
        (5, 95, vec![]),
        "expected 5 x 200 and 95 x 429"
    );
    for a in answers.iter().filter(|a| a.status != StatusCode::OK) {
        let secs = assert_gateway_429(a, "a miss beyond the budget");
        // The next cell comes back one emission interval (1 h / 5 = 720 s) after the burst.
        assert!(
            (715..=720).contains(&secs),
            "expected Retry-After of about 720 s (one cell of 5/1h), saw {secs}"
        );
        let policy = a.header("ratelimit-policy");
        assert_eq!(
            policy, "\"global\";q=5;w=3600",
            "expected the global policy on a 429"
        );
        let state = a.header("ratelimit");
        assert!(
            state.starts_with("\"global\";r=0;t="),
            "expected nothing remaining on a 429, saw RateLimit {state:?}"
        );
    }
    stop(env).await;
}

// 3. Equal shares under overload get equal parts.
#[tokio::test(start_paused = true)]
async fn two_equal_shares_under_overload_split_the_admitted_calls() {
    let clients = [
        client_toml("a", "key-a", "limit = 10\nperiod = \"1s\"\nburst = 2"),
        client_toml("b", "key-b", "limit = 10\nperiod = \"1s\"\nburst = 2"),
    ]
    .concat();
    let budget = "[budget]\nlimit = 20\nperiod = \"1s\"\nburst = 4\nmax_wait = \"100ms\"\n";
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{budget}{ROUTES}"),
        )
        .await,
    );
    let before = env.upstream_total();
    let started = Instant::now();
    // Each client offers 100 requests/s, ten times its share, for 2 s.
    let mut drivers = JoinSet::new();
    for (c, key) in ["key-a", "key-b"].into_iter().enumerate() {
        let env = env.clone();
        drivers.spawn(async move {
            let mut requests = JoinSet::new();
            let mut every = tokio::time::interval(Duration::from_millis(10));
            for i in 0..200 {
                every.tick().await;
                let env = env.clone();
                requests.spawn(async move {
                    let path = format!("/12345/inbox/contact/share{c}/{i}");
                    env.get_as(key, &path).await
                });
            }
            let mut ok = 0u64;
            while let Some(answer) = requests.join_next().await {
                let answer = answer.expect("request task");
                let status = answer.status;
                let policy = answer.header("ratelimit-policy");
                assert_eq!(
                    policy, "\"client\";q=10;w=1",
                    "expected the client's own share in RateLimit-Policy"
                );
                assert!(
                    status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
                    "expected 200 or 429 under overload, saw {status}"
                );
                ok += u64::from(status == StatusCode::OK);
            }
            (c, ok)
        });
    }
    let mut admitted = [0u64; 2];
    while let Some(done) = drivers.join_next().await {
        let (c, ok) = done.expect("client task");
        admitted[c] = ok;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let total: u64 = admitted.iter().sum();
    let upstream = env.upstream_total() - before;
    assert_eq!(
        upstream, total,
        "expected every upstream call to be one 200, saw {upstream} calls for {total} x 200"
    );
    for (c, n) in admitted.iter().enumerate() {
        assert!(
            *n as f64 >= 0.45 * total as f64,
            "expected client {c} to get at least 45% of {total} admitted calls, saw {n} ({admitted:?})"
        );
    }
    // Global burst plus rate over the run, plus one cell of rounding.
    let allowance = 4.0 + 20.0 * elapsed + 1.0;
    assert!(
        (total as f64) <= allowance && total >= 20,
        "expected between 20 and {allowance:.1} admitted calls in {elapsed:.2} s, saw {total}"
    );
    stop(env).await;
}

// 4. The interactive reserve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_client_cannot_take_the_interactive_reserve() {
    let clients = [
        client_toml("batch", "batch-key", "priority = \"batch\""),
        client_toml("interactive", "interactive-key", ""),
    ]
    .concat();
    let budget = "[budget]\nlimit = 10\nperiod = \"1h\"\nburst = 10\nbatch_reserve = 0.5\nmax_wait = \"0s\"\n";
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{budget}{ROUTES}"),
        )
        .await,
    );
    let before = env.upstream_total();
    let answers = concurrent_gets(&env, "batch-key", (0..20).map(contact).collect()).await;
    let (ok, limited, other) = statuses(&answers);
    assert!(
        (1..=5).contains(&ok) && ok + limited == 20 && other.is_empty(),
        "expected 1 to 5 of 20 batch reads through and the rest 429, saw {ok} x 200, {limited} x 429, others {other:?}"
    );
    let seen = env.upstream_total() - before;
    assert_eq!(seen, ok as u64, "expected {ok} upstream calls, saw {seen}");
    // The reserve (5 cells) is still there for an interactive client.
    let mut through = 0;
    for n in 100..106 {
        let a = env.get_as("interactive-key", &contact(n)).await;
        if a.status == StatusCode::OK {
            through += 1;
        } else {
            assert_gateway_429(&a, "interactive read beyond the whole burst");
        }
    }
    assert_eq!(
        through,
        10 - ok,
        "expected the interactive client to get the {} cells the batch burst left, saw {through}",
        10 - ok
    );
    stop(env).await;
}

// 5. Queued requests go at the budget's pace, in arrival order.
#[tokio::test(start_paused = true)]
async fn queued_requests_are_paced_at_the_budget_rate_in_arrival_order() {
    let budget = "[budget]\nlimit = 10\nperiod = \"1s\"\nburst = 1\nmax_wait = \"2s\"\n";
    let env = Arc::new(common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await);
    let before = env.upstream_total();
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..6 {
        let env = env.clone();
        set.spawn(async move {
            // Staggered so the arrival order at the gateway is known.
            tokio::time::sleep(Duration::from_millis(20 * i as u64)).await;
            let a = env.get(&contact(i)).await;
            (i, a.status, started.elapsed())
        });
    }
    let mut done = Vec::new();
    while let Some(d) = set.join_next().await {
        done.push(d.expect("request task"));
    }
    for (i, status, _) in &done {
        assert_eq!(
            *status,
            StatusCode::OK,
            "expected queued read {i} to succeed"
        );
    }
    let seen = env.upstream_total() - before;
    assert_eq!(seen, 6, "expected 6 upstream calls, saw {seen}");
    done.sort_by_key(|(_, _, at)| *at);
    // On the paused clock the answers leave on the budget's cells (one every 100 ms), so
    // the spread is the pacing alone, not how busy the machine is.
    let spread = done[5].2 - done[0].2;
    assert!(
        spread >= Duration::from_millis(450) && spread <= Duration::from_millis(1500),
        "expected answers spread over 0.45..1.5 s (one every 100 ms), saw {spread:?}"
    );
    let order: Vec<usize> = done.iter().map(|(i, _, _)| *i).collect();
    let inversions = order.windows(2).filter(|w| w[0] > w[1]).count();
    assert!(
        inversions <= 1,
        "expected answers in arrival order (at most one swap), saw {order:?}"
    );
    stop(env).await;
}

// 6. A wait beyond max_wait is refused at once.
#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_is_refused_at_once_with_the_wait_rounded_up() {
    let budget = "[budget]\nlimit = 1\nperiod = \"10s\"\nburst = 1\nmax_wait = \"2s\"\n";
    let env = common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await;
    assert_ok(&env.get(&contact(1)).await, "first read");
    let before = env.upstream_total();
    let asked = tokio::time::Instant::now();
    let refused = env.get(&contact(2)).await;
    let took = asked.elapsed();
    let secs = assert_gateway_429(&refused, "read that would wait ~10 s");
    assert!(
        took < Duration::from_millis(500),
        "expected the refusal well under max_wait (2 s), saw it after {took:?}"
    );
    assert_eq!(
        secs, 10,
        "expected Retry-After 10 (a wait just under 10 s, rounded up), saw {secs}"
    );
    let seen = env.upstream_total() - before;
    assert_eq!(
        seen, 0,
        "expected the refused read to reach nothing, saw {seen}"
    );
    env.stop().await;
}

/// Routes for the pause test: one entry that goes stale after 1 s but may stand in for
/// errors for an hour, and the contact reads as plain misses.
const PAUSE_ROUTES: &str = r#"
[[routes]]
match = "GET /me/accounts"
ttl = "1s"
stale_if_error = "1h"

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "5m"
"#;

// 7. The upstream's 429 pauses all upstream traffic.
#[tokio::test(start_paused = true)]
async fn an_upstream_429_pauses_all_upstream_traffic_until_its_retry_after() {
    let env = common::start(
        SimOptions::default(),
        &format!("{BIG_BUDGET}{PAUSE_ROUTES}"),
    )
    .await;
    assert_ok(&env.get("/me/accounts").await, "first /me/accounts");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    env.sim.set_faults(Faults {
        force_429: Some(Force429 {
            count: 1,
            retry_after: 2,
        }),
        ..Faults::default()
    });
    let before = env.upstream_total();
    let first = env.get(&contact(1)).await;
    let paused_at = Instant::now();
    assert_eq!(
        first.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the upstream's forced 429, saw {}",
        first.status
    );
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached, 1,
        "expected the first read upstream, saw {reached}"
    );

    let stale = env.get("/me/accounts").await;
    assert_ok(&stale, "/me/accounts during the pause");
    assert!(
        stale.header("cache-status").contains("detail=stale"),
        "expected a stale answer during the pause, saw Cache-Status {:?}",
        stale.header("cache-status")
    );

    let mut n = 2;
    while paused_at.elapsed() < Duration::from_millis(1500) {
        let a = env.get(&contact(n)).await;
        let secs = assert_gateway_429(&a, "a miss during the upstream's pause");
        let state = a.header("ratelimit");
        assert!(
            state.contains(";r=0;"),
            "expected nothing remaining while paused, saw RateLimit {state:?}"
        );
        assert!(
            secs <= 2,
            "expected Retry-After at most the upstream's 2 s, saw {secs}"
        );
        n += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached,
        1,
        "expected nothing upstream during the pause ({} reads), saw {reached} calls",
        n - 2
    );

    tokio::time::sleep_until(paused_at + Duration::from_millis(2100)).await;
    assert_ok(&env.get(&contact(100)).await, "a read after the pause");
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached, 2,
        "expected traffic to flow again, saw {reached} calls"
    );
    env.stop().await;
}

// 8. The upstream's own counter running out pauses the gateway until the reset.
#[tokio::test(start_paused = true)]
async fn upstream_remaining_zero_stops_sending_until_the_reset() {
    let sim = SimOptions {
        rate_limit: Some("3/2s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let env = common::start(sim, &format!("{BIG_BUDGET}{ROUTES}")).await;
    let before = env.upstream_total();
    let window = Instant::now();
    for n in 0..3 {
        assert_ok(
            &env.get(&contact(n)).await,
            "a read within the upstream's limit",
        );
    }
    let refused = env.get(&contact(3)).await;
    let secs = assert_gateway_429(&refused, "the read after X-RateLimit-Remaining: 0");
    assert!(
        secs <= 3,
        "expected Retry-After within the 2 s window (+1 for whole-second Reset), saw {secs}"
    );
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached, 3,
        "expected the 4th read kept from the upstream, saw {reached} calls"
    );

    // Poll until the gateway sends again; nothing may reach the upstream before the reset.
    let mut n = 4;
    let resumed = loop {
        let a = env.get(&contact(n)).await;
        n += 1;
        if a.status == StatusCode::OK {
            break window.elapsed();
        }
        assert_gateway_429(&a, "a read while the upstream's counter is spent");
        assert!(
            window.elapsed() < Duration::from_secs(4),
            "expected traffic again within 4 s of the window's start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        resumed >= Duration::from_millis(1900),
        "expected no call before the reset (~2 s after the window opened), saw one at {resumed:?}"
    );
    let stats = env.sim.stats();
    assert_eq!(
        stats["rate_limited"], 0,
        "expected the simulator never to answer 429, saw {stats}"
    );
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached, 4,
        "expected 3 calls, the pause, then 1, saw {reached}"
    );
    env.stop().await;
}

// 9. The budget's metrics.
#[tokio::test(start_paused = true)]
async fn budget_metrics_move() {
    let sim = SimOptions {
        rate_limit: Some("50/1m".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let budget = "[budget]\nlimit = 3\nperiod = \"1h\"\nburst = 3\nmax_wait = \"0s\"\n";
    let env = common::start(sim, &format!("{budget}{ROUTES}")).await;
    assert_ok(&env.get(&contact(1)).await, "first read");
    env.sim.set_faults(Faults {
        force_429: Some(Force429 {
            count: 1,
            retry_after: 1,
        }),
        ..Faults::default()
    });
    let forced = env.get(&contact(2)).await;
    assert_eq!(
        forced.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the forced upstream 429, saw {}",
        forced.status
    );
    assert_gateway_429(&env.get(&contact(3)).await, "read during the pause");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_ok(&env.get(&contact(4)).await, "read after the pause");
    assert_gateway_429(&env.get(&contact(5)).await, "read beyond the global budget");

    let text = env.metrics().await;
    let show = |name: &str| -> Vec<&str> { text.lines().filter(|l| l.starts_with(name)).collect() };
    for which in ["global", "upstream"] {
        let seen = metric(
            &text,
            "cxgate_budget_rejections_total",
            &[("client", "test"), ("budget", which)],
        );
        assert_eq!(
            seen,
            Some(1.0),
            "expected one {which} rejection for client test, saw {:?}",
            show("cxgate_budget_rejections_total")
        );
    }
    let waits = metric(
        &text,
        "cxgate_budget_wait_seconds_count",
        &[("client", "test")],
    );
    assert_eq!(
        waits,
        Some(3.0),
        "expected 3 admitted calls observed in the wait histogram, saw {:?}",
        show("cxgate_budget_wait_seconds_count")
    );
    let remaining = metric(&text, "cxgate_upstream_ratelimit_remaining", &[]);
    assert_eq!(
        remaining,
        Some(48.0),
        "expected the last X-RateLimit-Remaining (50 - 2 counted calls), saw {:?}",
        show("cxgate_upstream_ratelimit_remaining")
    );
    let limited = metric(
        &text,
        "cxgate_requests_total",
        &[("client", "test"), ("status", "429")],
    );
    assert!(
        limited.is_some_and(|n| n >= 1.0),
        "expected cxgate_requests_total with client=\"test\" and status 429, saw {:?}",
        show("cxgate_requests_total")
    );
    env.stop().await;
}

// 10. Hits and merged followers spend nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_and_merged_reads_spend_no_budget() {
    let budget = "[budget]\nlimit = 1\nperiod = \"1h\"\nburst = 1\nmax_wait = \"0s\"\n";
    let env = Arc::new(common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await);
    let path = contact(77);
    let cold = concurrent_gets(&env, common::KEY, vec![path.clone(); 20]).await;
    let (ok, _, _) = statuses(&cold);
    assert_eq!(
        ok,
        20,
        "expected 20 x 200 for one merged cold read, saw statuses {:?}",
        cold.iter().map(|a| a.status.as_u16()).collect::<Vec<_>>()
    );
    let route = format!("GET {path}");
    assert_eq!(
        env.upstream_count(&route),
        1,
        "expected one upstream call for 20 identical reads"
    );
    let hits = concurrent_gets(&env, common::KEY, vec![path.clone(); 20]).await;
    let (ok, _, _) = statuses(&hits);
    assert_eq!(
        ok, 20,
        "expected 20 hits with 200 on a spent budget, saw {ok}"
    );
    assert_eq!(
        env.upstream_count(&route),
        1,
        "expected hits to stay off the upstream"
    );
    // The one cell really is spent: a different miss is refused.
    assert_gateway_429(
        &env.get(&contact(78)).await,
        "a new miss on the spent budget",
    );
    stop(env).await;
}

// The load run of benches/budget_load.rs, runnable without a bench target:
// `cargo test --release --test budget -- --ignored load_run --nocapture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "about 20 s of load; run in release on purpose"]
async fn load_run() {
    let report =
        common::budget_load_run(20, Duration::from_millis(100), Duration::from_secs(20)).await;
    report.print();
    let problems = report.problems();
    assert!(problems.is_empty(), "budget load run: {problems:?}");
}

// A merged request keeps its own budget terms.
#[tokio::test(start_paused = true)]
async fn a_merged_read_waits_no_longer_than_its_own_max_wait_behind_a_queued_leader() {
    let clients = format!(
        "{}{}",
        client_toml(
            "batch",
            READER,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"10s\"",
        ),
        client_toml(
            "interactive",
            ACCOUNT,
            "scopes = [\"read\"]\nmax_wait = \"1s\""
        ),
    );
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{BIG_BUDGET}{ROUTES}"),
        )
        .await,
    );
    assert_ok(
        &env.get_as(READER, &contact(1)).await,
        "the batch client's first read",
    );
    // The batch client's share is spent: its next read queues for about 4 s.
    let leader = {
        let env = env.clone();
        tokio::spawn(async move {
            let asked = Instant::now();
            let a = env.get_as(READER, &contact(2)).await;
            (a, asked.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    let follower = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    assert_ok(&follower, "the interactive client's identical read");
    assert!(
        took < Duration::from_millis(2500),
        "expected the interactive read answered within about its own max_wait (1 s), not \
         after the batch client's ~4 s queue; it took {took:?}"
    );
    assert!(
        !follower.header("cache-status").contains("collapsed"),
        "expected the interactive read to lead its own call, saw Cache-Status {:?}",
        follower.header("cache-status")
    );
    // The batch read, still queued on its own share (about 4 s) when the interactive call
    // went upstream, takes that call's answer instead of calling again.
    let (batch, waited) = leader.await.expect("leader task");
    assert_ok(&batch, "the batch client's queued read");
    assert!(
        batch.header("cache-status").contains("collapsed") && waited < Duration::from_secs(4),
        "expected the queued batch read answered with the interactive call (collapsed, \
         before its ~4 s queue ended), saw Cache-Status {:?} after {waited:?}",
        batch.header("cache-status")
    );
    assert_eq!(
        env.upstream_count(&format!("GET {}", contact(2))),
        1,
        "expected one upstream call for contact 2"
    );
    stop(env).await;
}

// A merged follower behind a queued leader asks its own budget at once: it does not wait
// on the leader first and then start its own max_wait over for its own budget.
#[tokio::test(start_paused = true)]
async fn a_merged_follower_waits_at_most_its_own_max_wait_in_all() {
    let clients = format!(
        "{}{}",
        client_toml(
            "batch",
            READER,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"8s\"\nburst = 1\nmax_wait = \"20s\"",
        ),
        client_toml(
            "interactive",
            ACCOUNT,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"2s\""
        ),
    );
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{BIG_BUDGET}{ROUTES}"),
        )
        .await,
    );
    assert_ok(
        &env.get_as(READER, &contact(1)).await,
        "the batch client's first read",
    );
    // The batch client's next read queues for about 8 s and leads the flight for contact 2.
    let leader = {
        let env = env.clone();
        tokio::spawn(async move { env.get_as(READER, &contact(2)).await })
    };
    // The interactive client spends its one cell: its next cell comes about 4 s later.
    assert_ok(
        &env.get_as(ACCOUNT, &contact(3)).await,
        "the interactive client's first read",
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let follower = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    // Alone it would be refused at once (its cell is ~4 s away, past its 2 s), and merged
    // so it is: its own terms refuse it, neither after waiting on the leader nor after
    // queuing for its own cell.
    assert_eq!(
        follower.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the follower refused by its own terms, saw {} after {took:?} \
         (Cache-Status {:?})",
        follower.status,
        follower.header("cache-status")
    );
    assert!(
        took < Duration::from_secs(1),
        "expected the follower refused at once, as alone, not after its max_wait of 2 s; it \
         took {took:?}"
    );
    leader.abort();
    let _ = leader.await;
    stop(env).await;
}

// A read queued for budget takes the answer of another client's identical call, one whose
// terms let it go at once, and its queued cell goes back.
#[tokio::test(start_paused = true)]
async fn a_queued_read_takes_the_call_another_client_made_and_gives_its_cell_back() {
    let clients = format!(
        "{}{}",
        client_toml(
            "batch",
            READER,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"10s\"",
        ),
        client_toml(
            "interactive",
            ACCOUNT,
            "scopes = [\"read\"]\nmax_wait = \"0s\""
        ),
    );
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{BIG_BUDGET}{ROUTES}"),
        )
        .await,
    );
    let start = Instant::now();
    assert_ok(
        &env.get_as(READER, &contact(1)).await,
        "the batch client's first read",
    );
    // The batch client's share is spent: its read of contact 2 queues for about 4 s.
    let queued = {
        let env = env.clone();
        tokio::spawn(async move { env.get_as(READER, &contact(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The interactive client will not wait: it leads its own call and fills the cache.
    let filler = env.get_as(ACCOUNT, &contact(2)).await;
    assert_ok(&filler, "the interactive client's read");
    let batch = queued.await.expect("queued task");
    assert_ok(&batch, "the batch client's queued read");
    let route = format!("GET {}", contact(2));
    assert_eq!(
        env.upstream_count(&route),
        1,
        "expected one upstream call for contact 2: the queued read must take the answer of \
         the interactive read's call"
    );
    assert!(
        batch.header("cache-status").contains("collapsed"),
        "expected the queued read answered as merged, saw Cache-Status {:?}",
        batch.header("cache-status")
    );
    // Its answer shows the budget with that cell back: the next one about 4 s after the
    // first read, not 8.
    let (r, t) = rate_limit_state(&batch);
    assert!(
        r == 0 && t <= 4,
        "expected RateLimit to show the returned cell (r=0, t at most 4), saw {:?}",
        batch.header("ratelimit")
    );
    let text = env.metrics().await;
    let merged = metric(
        &text,
        "cxgate_requests_total",
        &[
            ("client", "batch"),
            (
                "route",
                "GET /{account_id}/inbox/contact/{service}/{service_id}",
            ),
            ("status", "200"),
            ("cache", "collapsed"),
        ],
    );
    assert_eq!(
        merged,
        Some(1.0),
        "expected the queued read counted as the batch client's collapsed read"
    );
    // Its queued cell went back: the batch client's next miss takes the cell ~4 s after its
    // first read, the one the queued read had reserved, not the one after it (~8 s).
    assert_ok(
        &env.get_as(READER, &contact(3)).await,
        "the batch client's read after the refund",
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(6000),
        "expected the given-back cell (about 4 s after the first read) to let the next read \
         go, not the next one (about 8 s); it was answered {took:?} after the first read"
    );
    stop(env).await;
}

/// A batch client whose share is spent after one read (its next cell is `period` away,
/// it waits up to 10 s) and an interactive client with `interactive` terms, in front of a
/// budget no test reaches.
async fn batch_and_interactive(period: &str, interactive: &str) -> Arc<Env> {
    let clients = format!(
        "{}{}",
        client_toml(
            "batch",
            READER,
            &format!(
                "scopes = [\"read\"]\nlimit = 1\nperiod = \"{period}\"\nburst = 1\nmax_wait = \"10s\""
            ),
        ),
        client_toml(
            "interactive",
            ACCOUNT,
            &format!("scopes = [\"read\"]\n{interactive}")
        ),
    );
    Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{BIG_BUDGET}{ROUTES}"),
        )
        .await,
    )
}

/// The batch client reads `contact(1)` (its share is then spent) and then `contact(2)`,
/// which queues for its next cell; returns that queued read's task once it is queued.
async fn queue_a_batch_read(env: &Arc<Env>) -> tokio::task::JoinHandle<(Answer, Duration)> {
    assert_ok(
        &env.get_as(READER, &contact(1)).await,
        "the batch client's first read",
    );
    let queued = {
        let env = env.clone();
        tokio::spawn(async move {
            let asked = Instant::now();
            let a = env.get_as(READER, &contact(2)).await;
            (a, asked.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    queued
}

// A merged follower whose own budget lets it go at once does not wait on a queued leader,
// not even its own short max_wait: it leads its own call at once (on tokio's clock).
#[tokio::test(start_paused = true)]
async fn a_merged_follower_with_a_short_max_wait_leads_its_own_call_at_once() {
    let env = batch_and_interactive("4s", "max_wait = \"100ms\"").await;
    let queued = queue_a_batch_read(&env).await;
    let asked = Instant::now();
    let follower = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    assert_ok(&follower, "the interactive client's identical read");
    assert!(
        !follower.header("cache-status").contains("collapsed"),
        "expected the interactive read to lead its own call, saw Cache-Status {:?}",
        follower.header("cache-status")
    );
    assert!(
        took < Duration::from_millis(100),
        "expected the follower to lead at once, as alone, not after waiting its max_wait \
         (100 ms) on the queued leader; it took {took:?}"
    );
    let (batch, _) = queued.await.expect("queued task");
    assert_ok(&batch, "the batch client's queued read");
    assert_eq!(
        env.upstream_count(&format!("GET {}", contact(2))),
        1,
        "expected the queued batch read to take the follower's call"
    );
    stop(env).await;
}

// The same follower whose own share is spent too: it gets its own 429 with a true
// Retry-After at once, as alone.
#[tokio::test(start_paused = true)]
async fn a_merged_follower_with_a_short_max_wait_gets_its_own_429_at_once() {
    let env = batch_and_interactive(
        "4s",
        "limit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"100ms\"",
    )
    .await;
    assert_ok(
        &env.get_as(ACCOUNT, &contact(3)).await,
        "the interactive client's first read",
    );
    let queued = queue_a_batch_read(&env).await;
    let asked = Instant::now();
    let follower = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    let secs = assert_gateway_429(&follower, "the interactive client's merged read");
    assert!(
        took < Duration::from_millis(100),
        "expected the follower refused at once, as alone, not after its max_wait (100 ms); it \
         took {took:?}"
    );
    // Its next cell is about 4 s after its first read, 50 ms ago.
    assert!(
        (3..=4).contains(&secs),
        "expected Retry-After to name its own next cell, about 4 s away, saw {secs}"
    );
    queued.abort();
    let _ = queued.await;
    stop(env).await;
}

// A read queued for budget while an identical call is on its way upstream takes that
// call's answer instead of a second upstream call (on tokio's clock).
#[tokio::test(start_paused = true)]
async fn a_queued_read_takes_the_answer_of_an_identical_call_already_upstream() {
    let env = batch_and_interactive("1s", "max_wait = \"0s\"").await;
    // Only contact 2 is slow: its upstream call takes 1.5 s, past the batch client's wait.
    env.sim.set_faults(Faults {
        latency_ms: 1500,
        path_prefix: Some(contact(2)),
        ..Faults::default()
    });
    let queued = queue_a_batch_read(&env).await;
    // The interactive client will not wait: it gives up on the queued batch read at once
    // and its own call goes upstream now, while the batch read still waits (about 1 s).
    let asked = Instant::now();
    let interactive = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    assert_ok(&interactive, "the interactive client's read");
    let (batch, waited) = queued.await.expect("queued task");
    assert_ok(&batch, "the batch client's queued read");
    let route = format!("GET {}", contact(2));
    assert_eq!(
        env.upstream_count(&route),
        1,
        "expected one upstream call for contact 2: the queued batch read must take the \
         answer of the interactive client's call, in flight when its wait ended"
    );
    assert!(
        took < Duration::from_millis(1600),
        "expected the interactive read answered by its own call (1.5 s), it took {took:?}"
    );
    assert!(
        batch.header("cache-status").contains("collapsed"),
        "expected the batch read answered as merged, saw Cache-Status {:?}",
        batch.header("cache-status")
    );
    assert!(
        waited < Duration::from_millis(1700),
        "expected the batch read answered with the interactive call (about 1.55 s after it \
         asked), it took {waited:?}"
    );
    stop(env).await;
}

/// A global budget of one cell a second (two at most), a client `delta` whose own share
/// (one cell per 4 s) is spent after one read, an interactive `alpha` with the global share
/// only and a hasty `eps`; the simulator answers in 200 ms.
async fn a_leader_queued_on_its_own_share() -> Arc<Env> {
    let clients = format!(
        "{}{}{}",
        client_toml("alpha", ACCOUNT, "scopes = [\"read\"]"),
        client_toml(
            "delta",
            READER,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"4s\"\nburst = 1\nmax_wait = \"5s\"",
        ),
        client_toml("eps", WRITER, "scopes = [\"read\"]\nmax_wait = \"100ms\""),
    );
    let budget = "[budget]\nlimit = 3600\nperiod = \"1h\"\nburst = 2\nmax_wait = \"2s\"\n";
    let env = common::start_with(
        SimOptions::default(),
        &clients,
        &format!("{budget}{ROUTES}"),
    )
    .await;
    env.sim.set_faults(Faults {
        latency_ms: 200,
        ..Faults::default()
    });
    Arc::new(env)
}

/// delta queues ~4 s for `path` on its own share; 150 ms later alpha reads the same path,
/// and from 300 ms on eps spends every global cell on other paths. Alone, alpha would find
/// a global cell free at once: merged behind delta it must not do worse.
async fn a_follower_behind_a_leader_queued_on_its_own_share(path: &str) {
    let env = a_leader_queued_on_its_own_share().await;
    assert_ok(&env.get_as(READER, &contact(1)).await, "delta's first read");
    let leader = {
        let (env, path) = (env.clone(), path.to_string());
        tokio::spawn(async move {
            let asked = Instant::now();
            let a = env.get_as(READER, &path).await;
            (a, asked.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let follower = {
        let (env, path) = (env.clone(), path.to_string());
        tokio::spawn(async move {
            let asked = Instant::now();
            let a = env.get_as(ACCOUNT, &path).await;
            (a, asked.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut eps = Vec::new();
    for n in 0..19 {
        eps.push(env.get_as(WRITER, &contact(100 + n)).await.status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (alpha, took) = follower.await.expect("follower task");
    assert_ok(&alpha, "alpha's read, merged behind delta's queued one");
    assert!(
        took < Duration::from_secs(1),
        "expected alpha answered by its own free cell at once (200 ms upstream), not after \
         waiting on delta's queue; it took {took:?} (Cache-Status {:?})",
        alpha.header("cache-status")
    );
    let (delta, waited) = leader.await.expect("leader task");
    assert_ok(&delta, "delta's queued read");
    // `collapsed` on a cached route, `detail=merged` on one that is not.
    let status = delta.header("cache-status");
    assert!(
        (status.contains("collapsed") || status.contains("detail=merged"))
            && waited < Duration::from_secs(1),
        "expected delta's queued read answered with alpha's call (merged, long before its \
         ~4 s queue ended), saw Cache-Status {:?} after {waited:?}",
        delta.header("cache-status")
    );
    assert_eq!(
        env.upstream_count(&format!("GET {path}")),
        1,
        "expected one upstream call for {path}"
    );
    let admitted = eps.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        admitted >= 1,
        "expected eps to take global cells meanwhile, saw statuses {eps:?}"
    );
    stop(env).await;
}

// A follower merged behind a leader queued on its own share asks its own budget at once,
// as alone: it leads the call, and the queued leader takes its answer (on tokio's clock).
#[tokio::test(start_paused = true)]
async fn a_follower_behind_a_queued_leader_leads_at_once_on_a_cached_route() {
    a_follower_behind_a_leader_queued_on_its_own_share(&contact(2)).await;
}

// The same on a route that is not cached: the read is merged only while wanted.
#[tokio::test(start_paused = true)]
async fn a_follower_behind_a_queued_leader_leads_at_once_on_an_uncached_route() {
    a_follower_behind_a_leader_queued_on_its_own_share("/me/connectedprofiles").await;
}

/// `(r, t)` of a `RateLimit` field (`"client";r=0;t=4`).
fn rate_limit_state(a: &Answer) -> (u64, u64) {
    let value = a.header("ratelimit");
    let field = |name: &str| {
        value
            .split(';')
            .find_map(|p| p.trim().strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("expected {name} in RateLimit, saw {value:?}"))
    };
    (field("r="), field("t="))
}

// With the budget shared through Redis (its state here a mirror of what Redis said last),
// a read queued on its client's share that takes another client's call gives its booked
// cell back, and its answer's rate-limit fields say so: the client's next cell one period
// after its first read, not two. Real time: the shared budget asks a real Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_read_shows_its_returned_cell_on_a_budget_shared_through_redis() {
    let Some(redis) =
        common::redis_server::RedisServer::start_or_skip("the shared budget's rate-limit fields")
    else {
        return;
    };
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    let clients = format!(
        "{}{}",
        client_toml(
            "batch",
            READER,
            "scopes = [\"read\"]\nlimit = 1\nperiod = \"20s\"\nburst = 1\nmax_wait = \"30s\"",
        ),
        client_toml(
            "interactive",
            ACCOUNT,
            "scopes = [\"read\"]\nmax_wait = \"0s\""
        ),
    );
    let budget = format!(
        "{BIG_BUDGET}backend = \"redis\"\nredis_url_env = \"{url_env}\"\n\
         key_prefix = \"merged{:08x}\"\nreplicas = 1\n",
        fastrand::u32(..)
    );
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &clients,
            &format!("{budget}{ROUTES}"),
        )
        .await,
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    assert_ok(
        &env.get_as(READER, &contact(1)).await,
        "the batch client's first read",
    );
    // Its share is spent: its read of contact 2 books the cell 20 s on and queues for it.
    let queued = {
        let env = env.clone();
        tokio::spawn(async move { env.get_as(READER, &contact(2)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_ok(
        &env.get_as(ACCOUNT, &contact(2)).await,
        "the interactive client's read",
    );
    let batch = queued.await.expect("queued task");
    assert_ok(&batch, "the batch client's queued read");
    assert!(
        batch.header("cache-status").contains("collapsed"),
        "expected the queued read answered with the interactive call, saw Cache-Status {:?}",
        batch.header("cache-status")
    );
    assert_eq!(
        env.upstream_count(&format!("GET {}", contact(2))),
        1,
        "expected one upstream call for contact 2"
    );
    // Given back, the next cell is the one 20 s after the first read; still booked, it
    // would be the one after (about 40 s).
    let (r, t) = rate_limit_state(&batch);
    assert!(
        r == 0 && t <= 20,
        "expected RateLimit to show the returned cell (r=0, t at most 20), saw {:?}",
        batch.header("ratelimit")
    );
    let reset: u64 = batch
        .header("x-ratelimit-reset")
        .parse()
        .unwrap_or(u64::MAX);
    assert!(
        batch.header("x-ratelimit-remaining") == "0" && reset <= started + 22,
        "expected X-RateLimit-Reset about 20 s after the first read ({started}), saw \
         remaining {:?} and reset {reset}",
        batch.header("x-ratelimit-remaining")
    );
    // And so it stays: a hit afterwards shows the same budget.
    let hit = env.get_as(READER, &contact(2)).await;
    let (r, t) = rate_limit_state(&hit);
    assert!(
        hit.header("cache-status").starts_with("cxgate; hit") && r == 0 && t <= 20,
        "expected a hit showing the returned cell, saw Cache-Status {:?} and RateLimit {:?}",
        hit.header("cache-status"),
        hit.header("ratelimit")
    );
    stop(env).await;
}

// A read merged behind a leader queued for the global budget, whose own admission is
// refused (the queue behind the leader is longer than its max_wait), takes the leader's
// answer once the leader's slot comes within its own max_wait: it is not answered 429 for
// a call the gateway makes for its key anyway (on tokio's clock).
#[tokio::test(start_paused = true)]
async fn a_follower_refused_alone_takes_the_answer_of_a_leader_queued_within_its_max_wait() {
    let budget = "[budget]\nlimit = 1\nperiod = \"1s\"\nburst = 1\nmax_wait = \"2s\"\n";
    let env = Arc::new(
        common::start_with(
            SimOptions::default(),
            &client_toml("alpha", ACCOUNT, "scopes = [\"read\"]"),
            &format!("{budget}{ROUTES}"),
        )
        .await,
    );
    assert_ok(&env.get_as(ACCOUNT, &contact(1)).await, "the first read");
    // contact 2 queues for the next cell (about 1 s away) and contact 3 for the one after
    // (about 2 s away): the global queue is then as long as a max_wait.
    let mut queued = JoinSet::new();
    for n in [2, 3] {
        let env = env.clone();
        queued.spawn(async move { (n, env.get_as(ACCOUNT, &contact(n)).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Alone, a read now would wait about 3 s (past its 2 s) and is refused at once...
    let alone = env.get_as(ACCOUNT, &contact(4)).await;
    assert_gateway_429(&alone, "a read of a path no call is queued for");
    // ... but merged behind contact 2's leader, whose cell comes in under a second, it
    // need not be.
    let asked = Instant::now();
    let follower = env.get_as(ACCOUNT, &contact(2)).await;
    let took = asked.elapsed();
    assert_ok(
        &follower,
        "the read merged behind contact 2's queued leader",
    );
    assert!(
        follower.header("cache-status").contains("collapsed") && took < Duration::from_secs(2),
        "expected the follower answered with the leader's call (collapsed) once its cell \
         came, under a second; saw Cache-Status {:?} after {took:?}",
        follower.header("cache-status")
    );
    while let Some(done) = queued.join_next().await {
        let (n, answer) = done.expect("queued read");
        assert_ok(&answer, &format!("the queued read of contact {n}"));
    }
    assert_eq!(
        env.upstream_count(&format!("GET {}", contact(2))),
        1,
        "expected one upstream call for contact 2"
    );
    stop(env).await;
}

// A read merged behind a leader whose cell is booked on the global share follows it and
// books no cell of its own: alone it would go no sooner, and its cell, booked behind the
// leader's, would only push everyone after it back (and be spent for nothing once the
// leader's answer came, with others booked behind it).
#[tokio::test(start_paused = true)]
async fn a_read_merged_behind_a_booked_leader_books_no_cell_of_its_own() {
    let budget = "[budget]\nlimit = 1\nperiod = \"1s\"\nburst = 1\nmax_wait = \"2500ms\"\n";
    let env = Arc::new(common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await);
    assert_ok(&env.get(&contact(1)).await, "the first read");
    let get = |n: usize| {
        let env = env.clone();
        tokio::spawn(async move { env.get(&contact(n)).await })
    };
    // Contact 2's cell is booked about 1 s ahead; an identical read joins it 100 ms later.
    let leader = get(2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let follower = get(2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The next cell is then about 2 s ahead, within a 2.5 s max_wait; had the follower
    // booked one of its own, it would be 3 s ahead, and this read refused.
    let asked = Instant::now();
    let other = env.get(&contact(3)).await;
    assert_ok(&other, "a read of another key queued behind the two");
    assert!(
        asked.elapsed() < Duration::from_millis(2300),
        "expected the read of contact 3 on the cell after the leader's (about 1.8 s), saw \
         {:?}",
        asked.elapsed()
    );
    let (leader, follower) = (
        leader.await.expect("leader"),
        follower.await.expect("follower"),
    );
    assert_ok(&leader, "the leader");
    assert_ok(&follower, "the follower");
    assert!(
        follower.header("cache-status").contains("collapsed"),
        "expected the follower answered with the leader's call, saw Cache-Status {:?}",
        follower.header("cache-status")
    );
    assert_eq!(
        env.upstream_count(&format!("GET {}", contact(2))),
        1,
        "expected one upstream call for contact 2"
    );
    stop(env).await;
}
