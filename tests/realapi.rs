//! The gateway against the API as its public clients show it: the limit in every form the
//! upstream says it (400 `rate_limit_reached`, 429, `X-RateLimit-Remaining: 0`), the API's
//! own `X-RateLimit-*` fields and top-level `error` towards clients, the pause's bounds and
//! its manual end, the simulator's controls kept out of reach, and the overload run.

mod common;

use std::time::Duration;

use cxgate::sim::{Faults, Force429, SimOptions};
use http::{Method, StatusCode};
use tokio::time::Instant;

use common::redis_server::RedisServer;
use common::{Answer, Env, ACCESS, BIG_BUDGET, KEY, ROUTES};

fn contact(n: usize) -> String {
    format!("/12345/inbox/contact/twitter/{n}")
}

/// A call straight to the simulator with the gateway's own token, as another application
/// sharing the token would make: it spends the same upstream limit behind the gateway's back.
async fn behind_the_back(env: &Env, path: &str) -> Answer {
    let url = format!("{}{path}", env.sim.base_url());
    let auth = format!("Bearer {ACCESS}");
    env.send(Method::GET, &url, &[("authorization", &auth)], "")
        .await
}

fn assert_api_fields(a: &Answer, what: &str) -> (u64, u64, u64) {
    let read = |name: &str| -> u64 {
        a.header(name).parse().unwrap_or_else(|_| {
            panic!(
                "{what}: expected an integer {name}, saw {:?} in {:?}",
                a.header(name),
                a.headers
            )
        })
    };
    (
        read("x-ratelimit-limit"),
        read("x-ratelimit-remaining"),
        read("x-ratelimit-reset"),
    )
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The gateway's 429 in the API's dialect: top-level `error` `rate_limit_reached`, a
/// Retry-After, and the API's fields with nothing remaining. Returns the Retry-After.
fn assert_api_429(a: &Answer, what: &str) -> u64 {
    assert_eq!(
        a.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{what}: expected 429, saw {} {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    let body = a.json();
    assert_eq!(
        (&body["error"], &body["meta"]["error_type"]),
        (&"rate_limit_reached".into(), &"rate_limited".into()),
        "{what}: expected the API's top-level error and the gateway's type, saw {body}"
    );
    let (_, remaining, reset) = assert_api_fields(a, what);
    assert_eq!(remaining, 0, "{what}: expected X-RateLimit-Remaining 0");
    assert!(
        reset >= unix_now(),
        "{what}: expected a reset in the future, saw {reset}"
    );
    a.header("retry-after").parse().unwrap_or_else(|_| {
        panic!(
            "{what}: expected an integer Retry-After, saw {:?}",
            a.headers
        )
    })
}

const PAUSE_ROUTES: &str = r#"
[[routes]]
match = "GET /me/accounts"
ttl = "1s"
stale_if_error = "1h"

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "5m"
"#;

/// The real API's own over-limit answer (400, `"error": "rate_limit_reached"`) is the
/// upstream's limit: the client gets the gateway's 429 with the true time, not the 400; the
/// gateway sends nothing until the reset, serves stale meanwhile, and then sends again.
#[tokio::test(start_paused = true)]
async fn the_apis_400_rate_limit_reached_pauses_serves_stale_and_answers_429() {
    let sim = SimOptions {
        rate_limit: Some("4/3s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    // No miss may wait: the gateway's own refusal may name no reset (a blind pause), and a
    // miss whose max_wait reached its probe would wait and be served instead of refused.
    let budget = format!("{BIG_BUDGET}max_wait = \"0s\"\n{PAUSE_ROUTES}");
    let env = common::start(sim, &budget).await;
    let first = env.get("/me/accounts").await;
    assert_eq!(first.status, 200, "expected the first read, saw {first:?}");
    let window = Instant::now();
    // Another user of the token spends the rest of the window and sees the API's 400.
    for _ in 0..3 {
        behind_the_back(&env, "/me").await;
    }
    let refused = behind_the_back(&env, "/me").await;
    assert_eq!(
        (refused.status, refused.json()["error"].clone()),
        (StatusCode::BAD_REQUEST, "rate_limit_reached".into()),
        "expected the simulator's real-API refusal, saw {refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let before = env.upstream_total();
    let limited = env.get(&contact(1)).await;
    let secs = assert_api_429(&limited, "the miss the upstream refused with 400");
    assert!(
        (1..=4).contains(&secs),
        "expected Retry-After within the 3 s window (+1 for whole-second Reset), saw {secs}"
    );
    let stale = env.get("/me/accounts").await;
    assert!(
        stale.status == 200 && stale.header("cache-status").contains("detail=stale"),
        "expected a stale answer while paused, saw {} {:?}",
        stale.status,
        stale.header("cache-status")
    );
    let mut n = 2;
    while window.elapsed() < Duration::from_millis(2500) {
        let a = env.get(&contact(n)).await;
        assert_api_429(&a, "a miss during the pause");
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let reached = env.upstream_total() - before;
    assert_eq!(
        reached, 1,
        "expected only the refused call upstream during the pause ({n} reads), saw {reached}"
    );
    let resumed = loop {
        let a = env.get(&contact(1000 + n)).await;
        n += 1;
        if a.status == StatusCode::OK {
            break window.elapsed();
        }
        assert!(
            window.elapsed() < Duration::from_secs(6),
            "expected traffic again after the 3 s window, still {} at {:?}",
            a.status,
            window.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        resumed >= Duration::from_millis(2900),
        "expected no call before the reset, saw one at {resumed:?}"
    );
    let stats = env.sim.stats();
    assert_eq!(
        stats["rate_limited"], 2,
        "expected two refusals, the other user's and the gateway's one, saw {stats}"
    );
    env.stop().await;
}

/// A limit answer with neither Retry-After nor reset (the API sometimes leaves it out):
/// the gateway waits the blind pause (a minute, cut to the window the upstream showed),
/// then lets exactly one probe through while everyone else keeps waiting for its answer.
/// With a `max_wait` of 0 no miss can wait for the probe: misses in the pause are 429, and
/// those that arrive while the probe is out wait the one-second grace for its answer.
#[tokio::test(start_paused = true)]
async fn a_limit_answer_without_a_reset_waits_then_probes_with_one_call() {
    let sim = SimOptions {
        rate_limit: Some("3/3s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let env = common::start(
        sim,
        &format!(
            "[budget]\nlimit = 1000\nperiod = \"1s\"\nburst = 100\nmax_wait = \"0s\"\n{ROUTES}"
        ),
    )
    .await;
    assert_eq!(env.get(&contact(0)).await.status, 200, "a first read");
    let window = Instant::now();
    behind_the_back(&env, "/me").await;
    behind_the_back(&env, "/me").await;
    // The first refusal of the window names the reset; the second does not.
    let named = behind_the_back(&env, "/me").await;
    assert!(
        !named.header("x-ratelimit-reset").is_empty(),
        "expected the first refusal with a reset"
    );
    let before = env.upstream_total();
    let blind = env.get(&contact(1)).await;
    let secs = assert_api_429(&blind, "the refusal that named no reset");
    assert!(
        secs <= 4,
        "expected the blind pause cut to the 3 s window (+1 for whole-second Reset), saw \
         Retry-After {secs}"
    );
    // Nothing upstream until the blind pause ends (about 3 s after the refusal).
    while window.elapsed() < Duration::from_millis(2700) {
        assert_api_429(&env.get(&contact(2)).await, "a miss in the blind pause");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.upstream_total() - before,
        1,
        "expected nothing upstream in the blind pause but the refused call"
    );
    // After it: ten reads at once; one goes as the probe, it succeeds (the window turned),
    // and traffic flows again.
    tokio::time::sleep_until(window + Duration::from_millis(4200)).await;
    // The probe takes longer upstream than the others' one-second grace, so all ten arrive
    // while it is out and nine give up before it lands.
    env.sim.set_faults(Faults {
        latency_ms: 1500,
        ..Faults::default()
    });
    let mut reads = tokio::task::JoinSet::new();
    let env = std::sync::Arc::new(env);
    for i in 0..10 {
        let env = env.clone();
        reads.spawn(async move { env.get(&contact(100 + i)).await.status });
    }
    let mut ok = 0;
    while let Some(status) = reads.join_next().await {
        ok += u32::from(status.expect("read task") == StatusCode::OK);
    }
    assert_eq!(ok, 1, "expected the probe alone answered, saw {ok} of 10");
    let after = env.get(&contact(200)).await;
    assert_eq!(
        after.status, 200,
        "expected traffic to flow after the probe"
    );
    let stats = env.sim.stats();
    let probes: u64 = (100..110)
        .map(|i| env.upstream_count(&format!("GET {}", contact(i))))
        .sum();
    assert_eq!(
        probes, 1,
        "expected one probe of the ten reads upstream, the others held, saw {probes}: {stats}"
    );
    assert_eq!(
        stats["rate_limited"], 2,
        "expected two refusals (the other user's and the gateway's one), saw {stats}"
    );
    match std::sync::Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("the read tasks have ended"),
    }
}

/// Every answer to a client with a key carries the API's own X-RateLimit-* fields for that
/// client (the tighter of its share and the upstream's word): misses, hits, refusals, and
/// errors the gateway makes; the upstream's own fields (about the shared token) never pass.
#[tokio::test]
async fn clients_get_the_apis_rate_limit_fields_on_every_answer() {
    let sim = SimOptions {
        rate_limit: Some("500/1h".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let clients = format!(
        "{}{}",
        common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]\nlimit = 3\nperiod = \"1h\"\nburst = 3\nmax_wait = \"0s\""),
        common::client_toml("other", "other-key", "scopes = [\"read\"]\naccounts = [1]"),
    );
    let env = common::start_with(
        sim,
        &clients,
        &format!("[budget]\nlimit = 1000\nperiod = \"1h\"\nburst = 50\n{ROUTES}"),
    )
    .await;
    let miss = env.get("/me").await;
    assert_eq!(miss.status, 200, "a first read");
    let (limit, remaining, _) = assert_api_fields(&miss, "a miss");
    assert_eq!(
        (limit, remaining),
        (3, 2),
        "expected the client's own share of 3 with one spent, not the upstream's 500/499"
    );
    let hit = env.get("/me").await;
    assert!(hit.header("cache-status").contains("hit"), "expected a hit");
    assert_eq!(
        assert_api_fields(&hit, "a hit").1,
        2,
        "a hit spends nothing"
    );
    env.get(&contact(1)).await;
    env.get(&contact(2)).await;
    let refused = env.get(&contact(3)).await;
    assert_api_429(&refused, "the client's own share spent");
    let forbidden = env.get_as("other-key", "/12345/inbox/mentions").await;
    assert_eq!(forbidden.status, 403, "expected the account refused");
    assert_api_fields(&forbidden, "a 403 to a known client");
    assert_eq!(
        forbidden.json()["error"],
        "forbidden",
        "expected the top-level error on the gateway's own errors"
    );
    let unknown = env.get_as("nobody-key", "/me").await;
    assert_eq!(
        (unknown.status.as_u16(), unknown.json()["error"].clone()),
        (401, "unauthorized".into()),
        "expected the top-level error on a 401"
    );
    assert_eq!(
        unknown.header("x-ratelimit-remaining"),
        "",
        "expected no budget fields for a caller without a valid key"
    );
    env.stop().await;
}

/// The refusals the gateway makes before it has read who is calling (the request's target,
/// its path, the simulator's controls, a body on a read, two keys) still carry the API's
/// `X-RateLimit-*` fields when the caller presented a valid key, and the error envelope.
#[tokio::test]
async fn early_refusals_to_a_valid_key_carry_the_rate_limit_fields() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let auth = format!("Authorization: Bearer {KEY}\r\n");
    let cases: [(&str, String, u16); 9] = [
        (
            "an account id with a leading zero",
            format!("GET /012345/inbox/mentions HTTP/1.1\r\n{auth}"),
            400,
        ),
        (
            "an account id in percent-escapes",
            format!("GET /%31%32%33%34%35x/inbox/mentions HTTP/1.1\r\n{auth}"),
            400,
        ),
        (
            "the simulator's stats",
            format!("GET /_sim/stats HTTP/1.1\r\n{auth}"),
            404,
        ),
        (
            "a dot-dot segment",
            format!("GET /12345/../me HTTP/1.1\r\n{auth}"),
            400,
        ),
        (
            "an escaped dot segment",
            format!("GET /me/%2e/accounts HTTP/1.1\r\n{auth}"),
            400,
        ),
        (
            "a key in the query and a dot segment",
            format!("GET /me/..?access_token={KEY} HTTP/1.1\r\n"),
            400,
        ),
        (
            "another host in the target",
            format!("GET http://elsewhere.example/me HTTP/1.1\r\n{auth}"),
            400,
        ),
        (
            "a read with a body",
            format!("GET /me HTTP/1.1\r\n{auth}Content-Length: 2\r\n\r\n{{}}"),
            400,
        ),
        (
            "a second, different key",
            format!("GET /me?access_token=other-key HTTP/1.1\r\n{auth}"),
            400,
        ),
    ];
    for (what, head, status) in cases {
        let request = if head.ends_with("{}") {
            head.replacen("HTTP/1.1\r\n", "HTTP/1.1\r\nHost: gw\r\n", 1)
        } else {
            format!("{head}Host: gw\r\nConnection: close\r\n\r\n")
        };
        let a = common::raw_exchange(env.gw.addr, request.as_bytes()).await;
        assert_eq!(
            a.status(),
            Some(status),
            "{what}: saw {:?}",
            String::from_utf8_lossy(&a.bytes)
        );
        let body = a.json();
        assert!(
            body["error"].is_string() && body["error_description"].is_string(),
            "{what}: expected the top-level error and error_description, saw {body}"
        );
        for name in [
            "x-ratelimit-limit",
            "x-ratelimit-remaining",
            "x-ratelimit-reset",
        ] {
            let value = a.header(name).unwrap_or_default();
            assert!(
                value.parse::<u64>().is_ok(),
                "{what}: expected an integer {name}, saw {value:?} in {:?}",
                String::from_utf8_lossy(&a.bytes)
            );
        }
    }
    let anonymous = common::raw_exchange(
        env.gw.addr,
        b"GET /12345/../me HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(
        (anonymous.status(), anonymous.header("x-ratelimit-limit")),
        (Some(400), None),
        "expected no budget fields for a caller without a key"
    );
    env.stop().await;
}

/// `/_sim/*` are the simulator's controls: the gateway refuses them in every spelling and
/// the simulator never sees them.
#[tokio::test]
async fn the_simulators_controls_are_never_forwarded() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let auth = format!("Bearer {KEY}");
    for (method, path) in [
        (Method::GET, "/_sim/stats"),
        (Method::POST, "/_sim/faults"),
        (Method::POST, "/_sim/stats/reset"),
        (Method::GET, "//_sim/stats"),
        (Method::GET, "/%5Fsim/stats"),
        (Method::GET, "/_SIM/stats"),
        (Method::GET, "/_sim"),
    ] {
        let a = env
            .send(
                method.clone(),
                &env.url(path),
                &[("authorization", &auth)],
                "{}",
            )
            .await;
        assert!(
            a.status == 400 || a.status == 404,
            "{method} {path}: expected the gateway to refuse, saw {} {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
        assert!(
            a.json()["error"].is_string(),
            "{method} {path}: expected the error envelope"
        );
    }
    let stats = env.sim.stats();
    assert_eq!(
        stats["requests_total"], 0,
        "expected nothing to reach the simulator, saw {stats}"
    );
    // And its stats name tokens only by hash.
    let text = stats.to_string();
    assert!(
        !text.contains(ACCESS),
        "expected no raw token in the simulator's stats, saw {text}"
    );
    env.stop().await;
}

/// A Retry-After of years is cut to the upstream's window, and `POST /admin/budget/resume`
/// ends a pause at once.
#[tokio::test]
async fn a_pause_is_cut_to_the_window_and_ends_by_hand() {
    let sim = SimOptions {
        rate_limit: Some("1000/20s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let env = common::start(sim, &format!("{BIG_BUDGET}{ROUTES}")).await;
    assert_eq!(env.get(&contact(0)).await.status, 200, "a first read");
    env.sim.set_faults(Faults {
        force_429: Some(Force429 {
            count: 1,
            retry_after: 100 * 365 * 24 * 3600,
        }),
        ..Faults::default()
    });
    let refused = env.get(&contact(1)).await;
    let secs = assert_api_429(&refused, "the upstream's 429 with a century's Retry-After");
    assert!(
        secs <= 21,
        "expected the pause cut to the 20 s window the upstream showed (+1 for whole-second \
         Reset), saw {secs}"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await
        .json();
    let paused = status["upstream"]["paused_for_s"].as_f64().unwrap_or(0.0);
    assert!(
        paused > 10.0 && paused <= 21.0,
        "expected about 20 s of pause in /admin/status, saw {status}"
    );
    let still = env.get(&contact(2)).await;
    assert_api_429(&still, "a miss while paused");
    let resumed = env
        .send(
            Method::POST,
            &env.admin_url("/admin/budget/resume"),
            &[],
            "",
        )
        .await;
    assert_eq!(
        (resumed.status.as_u16(), resumed.json()["resumed"].clone()),
        (200, true.into()),
        "expected {{\"resumed\": true}}, saw {resumed:?}"
    );
    assert_eq!(
        resumed.json()["was_paused"],
        true,
        "expected the pause to have been running"
    );
    let after = env.get(&contact(3)).await;
    assert_eq!(
        after.status, 200,
        "expected traffic at once after the resume, saw {after:?}"
    );
    env.stop().await;
}

/// The overload run, short: 20 services at 10x the upstream's limit for 15 s through one
/// gateway whose own budget is twice the upstream's: never an upstream limit answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_one_process_never_meets_the_upstreams_limit() {
    let report = common::overload::overload_run(1, None, 20, Duration::from_secs(15)).await;
    report.print();
    let problems = report.problems();
    assert!(problems.is_empty(), "overload run: {problems:?}");
}

/// The same with three replicas sharing the upstream's word through Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_three_replicas_never_meet_the_upstreams_limit() {
    let Some(redis) = RedisServer::start_or_skip("the three-replica overload run") else {
        return;
    };
    let report = common::overload::overload_run(3, Some(&redis), 20, Duration::from_secs(15)).await;
    report.print();
    let problems = report.problems();
    assert!(problems.is_empty(), "overload run: {problems:?}");
    assert!(
        report.per_replica.iter().all(|n| *n > 0),
        "expected every replica to call the upstream, saw {:?}",
        report.per_replica
    );
}

/// The outside tester's terms, scaled so several windows pass in a short run: 30 calls per
/// 3 s window, a latency of 10 ms plus up to 250 ms of jitter (calls are counted and
/// answered in another order than they were sent), 20 services at 10x, in one process or
/// with replicas through one Redis.
async fn jittered_overload(replicas: usize) {
    let redis = match replicas {
        1 => None,
        _ => match RedisServer::start_or_skip("the jittered replica overload run") {
            Some(redis) => Some(redis),
            None => return,
        },
    };
    let terms = common::overload::Terms {
        limit: 30,
        window: Duration::from_secs(3),
        latency_ms: 10,
        jitter_ms: 250,
        ..Default::default()
    };
    let run = Duration::from_secs(10);
    let report =
        common::overload::overload_run_with(replicas, redis.as_ref(), 20, run, terms).await;
    report.print();
    let problems = report.problems();
    assert!(problems.is_empty(), "{replicas} replicas: {problems:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_one_process_with_jitter_never_meets_the_upstreams_limit() {
    jittered_overload(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_two_replicas_with_jitter_never_meet_the_upstreams_limit() {
    jittered_overload(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_three_replicas_with_jitter_never_meet_the_upstreams_limit() {
    jittered_overload(3).await;
}

/// With the budget shared through Redis, a replica only mirrors the shared state as of its
/// own last admission. When the other replica has spent the rest, this one's refusal must
/// still say what is really left for the client: nothing, in both the API's fields and the
/// `RateLimit` field, until at least its Retry-After.
#[tokio::test]
async fn a_refusal_on_the_shared_budget_says_nothing_is_left() {
    let Some(redis) = RedisServer::start_or_skip("the shared-budget refusal") else {
        return;
    };
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    let budget = format!(
        "[budget]\nlimit = 4\nperiod = \"1h\"\nburst = 4\nmax_wait = \"0s\"\nbackend = \"redis\"\n\
         redis_url_env = \"{url_env}\"\nkey_prefix = \"refusal{:08x}\"\nreplicas = 2\n",
        fastrand::u32(..)
    );
    let env = common::start(SimOptions::default(), &format!("{budget}{ROUTES}")).await;
    let cfg_path = env.dir.join("cxgate.toml");
    let cfg = cxgate::config::load(&cfg_path).expect("the same config for the second replica");
    let other = cxgate::start(cfg, Some(cfg_path), cxgate::Options::default())
        .await
        .expect("second replica starts");
    let auth = format!("Bearer {KEY}");
    let on = |addr: std::net::SocketAddr, n: usize| {
        let (env, auth) = (&env, &auth);
        async move {
            let url = format!("http://{addr}{}", contact(n));
            env.send(Method::GET, &url, &[("authorization", auth)], "")
                .await
        }
    };

    let first = on(other.addr, 1).await;
    assert_eq!(first.status, 200, "expected the first call admitted");
    let (_, left, _) = assert_api_fields(&first, "first call on the second replica");
    assert_eq!(left, 3, "expected 3 of 4 left after one call");
    assert!(
        first.header("ratelimit").contains(";r=3;"),
        "expected RateLimit r=3 after one call, saw {:?}",
        first.header("ratelimit")
    );
    for n in 2..=4 {
        let a = on(env.gw.addr, n).await;
        assert_eq!(a.status, 200, "call {n} on the first replica: expected 200");
    }
    let refused = on(other.addr, 5).await;
    let retry = assert_api_429(
        &refused,
        "the second replica, after the first spent the rest",
    );
    assert!(
        retry > 60,
        "expected a wait of about a cell (15 min), saw {retry} s"
    );
    let field = refused.header("ratelimit");
    assert!(
        field.contains(";r=0;"),
        "expected RateLimit r=0 on the refusal, saw {field:?}"
    );
    let t: u64 = field
        .rsplit("t=")
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("expected a t= in {field:?}"));
    assert!(
        t >= retry,
        "expected RateLimit t={t} to be at least the Retry-After {retry}"
    );
    let (_, _, reset) = assert_api_fields(&refused, "the refusal");
    assert!(
        reset + 1 >= unix_now() + retry,
        "expected X-RateLimit-Reset {reset} no earlier than Retry-After {retry} s from now"
    );
    // A cached answer on the same replica afterwards: the refusal told it the shared state.
    let hit = on(other.addr, 1).await;
    assert!(
        hit.status == 200 && hit.header("cache-status").contains("hit"),
        "expected a cache hit, saw {hit:?}"
    );
    let (_, left, _) = assert_api_fields(&hit, "a hit after the refusal");
    assert_eq!(left, 0, "expected nothing left on a hit after the refusal");
    assert!(
        hit.header("ratelimit").contains(";r=0;"),
        "expected RateLimit r=0 on a hit after the refusal, saw {:?}",
        hit.header("ratelimit")
    );
    other.shutdown();
    other.stopped().await;
    env.stop().await;
}

/// What a service sees of the pauses, and when the upstream really took calls again.
struct Pauses {
    /// (when a 429 arrived, its Retry-After in seconds), from every service.
    refusals: Vec<(Duration, u64)>,
    /// When the upstream took a call again after refusing one (another user's polls).
    reopened: Vec<Duration>,
    /// When that user's spending of a window's rest was refused: the window was empty.
    closed: Vec<Duration>,
}

/// Six services hammer the gateways at `addrs` (in turn) with misses for 14 s while another
/// user of the token asks the simulator at `sim` directly whether it takes calls again, and
/// two seconds after it does, spends what is left of the window.
async fn pauses_against_reopenings(addrs: Vec<std::net::SocketAddr>, sim: String) -> Pauses {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    let http: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let get = move |url: String, token: &'static str| {
        let http = http.clone();
        async move {
            let req = http::Request::builder()
                .uri(url)
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .expect("request");
            let answer = http.request(req).await.expect("an answer");
            let (parts, body) = answer.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        }
    };
    let start = Instant::now();
    let run = Duration::from_secs(14);
    let refusals = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut services = tokio::task::JoinSet::new();
    for s in 0..6 {
        let (refusals, get, addr) = (refusals.clone(), get.clone(), addrs[s % addrs.len()]);
        services.spawn(async move {
            let mut n = s * 100_000;
            while start.elapsed() < run {
                let a = get(format!("http://{addr}{}", contact(n)), KEY).await;
                n += 1;
                if a.status == StatusCode::TOO_MANY_REQUESTS {
                    let secs = assert_api_429(&a, "a service's refusal");
                    refusals
                        .lock()
                        .expect("refusals")
                        .push((start.elapsed(), secs));
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        });
    }
    let (mut reopened, mut closed) = (Vec::new(), Vec::new());
    while start.elapsed() < run + Duration::from_secs(6) {
        // Asked every 50 ms while refused.
        let a = get(format!("{sim}/me"), ACCESS).await;
        if a.status != StatusCode::OK {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        reopened.push(start.elapsed());
        // Two seconds into the window it spends what the gateways left of it: their next
        // call is refused, by the API's 400 that names no reset every other time.
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..40 {
            if get(format!("{sim}/me"), ACCESS).await.status != StatusCode::OK {
                closed.push(start.elapsed());
                break;
            }
        }
    }
    while let Some(done) = services.join_next().await {
        done.expect("service task");
    }
    let refusals = refusals.lock().expect("refusals").clone();
    Pauses {
        refusals,
        reopened,
        closed,
    }
}

/// A client told to wait for a pause's end (a Retry-After of 2 s or more) and waiting
/// exactly that comes back after the upstream took calls again, and at most 2 s after:
/// the upstream's whole-second `Reset` leaves its window's end unknown within a second,
/// and a whole-second `Retry-After` rounds up within another.
fn assert_retry_after_true(p: &Pauses, what: &str) {
    assert!(
        p.reopened.len() >= 2 && p.refusals.iter().any(|(_, s)| *s >= 2),
        "{what}: expected pauses, saw {} refusals and reopenings {:?}",
        p.refusals.len(),
        p.reopened
    );
    let (mut worst, mut checked) = (Duration::ZERO, 0);
    for (at, secs) in p.refusals.iter().filter(|(_, s)| *s >= 2) {
        let back = *at + Duration::from_secs(*secs);
        // Refused while the upstream took calls (reopened, and not emptied since, with a
        // moment's grace for the news of its emptying): the client waits for nothing.
        let last_open = p.reopened.iter().rev().find(|o| *o < at);
        let grace = *at + Duration::from_millis(200);
        let last_closed = p.closed.iter().rev().find(|c| **c < grace);
        if let Some(open) = last_open.filter(|o| last_closed.is_none_or(|c| c < *o)) {
            eprintln!("{what}: refused at {at:?} with Retry-After {secs}, the upstream open since {open:?}");
            worst = worst.max(back - *at);
            checked += 1;
            continue;
        }
        let Some(open) = p.reopened.iter().find(|o| *o > at) else {
            continue;
        };
        assert!(
            back + Duration::from_millis(100) >= *open,
            "{what}: refused at {at:?} with Retry-After {secs}: back at {back:?}, before the \
             upstream took calls again at {open:?}"
        );
        worst = worst.max(back.saturating_sub(*open));
        checked += 1;
    }
    eprintln!(
        "{what}: {checked} pause refusals, the latest back {worst:?} after the upstream reopened"
    );
    assert!(
        worst <= Duration::from_millis(2100),
        "{what}: expected a client waiting its Retry-After back within 2 s of the upstream \
         taking calls again, saw one {worst:?} after"
    );
}

/// The gateways' own budget spends about half of each window; another user of the token
/// spends the rest, so their next call meets the API's 400, naming its reset or not.
const HALF_WINDOW_BUDGET: &str = "limit = 3\nperiod = \"1s\"\nburst = 3\nmax_wait = \"0s\"\n";

/// Services hammering one gateway over three short windows: every Retry-After a pause
/// gives is true, the upstream open when the client comes back and not long before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_its_retry_after_finds_the_upstream_just_open() {
    let sim = SimOptions {
        rate_limit: Some("20/4s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    let budget = format!("[budget]\n{HALF_WINDOW_BUDGET}{ROUTES}");
    let env = common::start(sim, &budget).await;
    let p = pauses_against_reopenings(vec![env.gw.addr], env.sim.base_url()).await;
    assert_retry_after_true(&p, "one process");
    env.stop().await;
}

/// The same through three replicas sharing the pause in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_retry_after_finds_the_upstream_just_open() {
    let mut setup = common::replicas::Setup::new(3);
    setup.sim = SimOptions {
        rate_limit: Some("20/4s".parse().expect("valid rate limit")),
        ..SimOptions::default()
    };
    setup.budget = HALF_WINDOW_BUDGET;
    let Some(c) = common::replicas::start_replicas(setup).await else {
        return;
    };
    let addrs = c.replicas.iter().map(|r| r.addr).collect();
    let p = pauses_against_reopenings(addrs, c.sim.base_url()).await;
    assert_retry_after_true(&p, "three replicas");
    c.stop().await;
}
