//! The gateway under the simulator's faults, one table-driven
//! run: for every fault, cold requests get the right status in the CX Social envelope
//! (README "Pointing a service at it"), a stale entry of a stale-if-error route stands in for a failing upstream,
//! a fresh request works once the fault clears, and nothing leaks (simulator requests in
//! flight, open descriptors and runtime tasks come back to where they were). The token
//! endpoint down while the held token is still valid must not be seen by clients at all.
//!
//! A connection reset has no simulator fault, so it is played by a tiny raw HTTP/1.1
//! upstream that, when told to, reads a request and closes the socket with `SO_LINGER` 0
//! (a TCP RST instead of an answer). Redis lost is covered in tests/replicas.rs.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cxgate::sim::{Faults, SimHandle, SimOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use common::{Answer, Env, BIG_BUDGET};

/// One route, cached for a second and allowed to answer stale for an hour on errors.
const FAULT_ROUTES: &str = r#"
[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "1s"
stale_if_error = "1h"
tags = ["contact:{account_id}/{service}/{service_id}"]
"#;

/// Every path of this test starts here; simulator faults are limited to it, so the token
/// endpoint never sees them (only the token case means to take that endpoint down).
const PREFIX: &str = "/12345/inbox/contact/faults/";

/// How long the leak and recovery checks may poll: generous, they end as soon as they hold.
const SETTLE: Duration = Duration::from_secs(10);

/// Descriptors or tasks a case may leave above its starting point (pooled keep-alive
/// connections come and go; a leak grows with every failed request).
const SLACK: usize = 8;

/// What a client sees while the fault is in force.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// An error in the CX Social envelope with this status and `error_type`.
    Error {
        status: u16,
        error_type: &'static str,
        /// The upstream's own answer forwarded (as opposed to the gateway's error).
        passed_through: bool,
    },
    /// 200: the gateway keeps serving (a stale entry is not needed).
    Serves,
}

/// How the fault is made.
#[derive(Debug, Clone)]
enum Fault {
    /// A simulator fault, on the shared gateway + simulator pair.
    Sim(Faults),
    /// The raw upstream resets every connection after reading a request.
    Reset,
    /// The token endpoint answers 503 while the gateway needs a refresh (its own pair with
    /// short-lived tokens).
    TokenDown,
}

struct Case {
    name: &'static str,
    slug: &'static str,
    fault: Fault,
    expect: Expect,
    /// Cold requests sent while the fault is in force (a burst for the quick faults).
    cold: usize,
    /// Words the gateway's `error_message` must contain, proving the fault is the one meant.
    hint: Option<&'static str>,
}

fn sim_fault(f: Faults) -> Fault {
    Fault::Sim(Faults {
        path_prefix: Some(PREFIX.to_string()),
        ..f
    })
}

fn error_burst(status: u16) -> Faults {
    Faults {
        error_rate: 1.0,
        error_status: status,
        ..Faults::default()
    }
}

fn table() -> Vec<Case> {
    let passed = |status| Expect::Error {
        status,
        error_type: "server_error",
        passed_through: true,
    };
    let own = |status, error_type| Expect::Error {
        status,
        error_type,
        passed_through: false,
    };
    vec![
        Case {
            name: "latency 2500 ms (timeout 2 s)",
            slug: "latency",
            fault: sim_fault(Faults {
                latency_ms: 2500,
                ..Faults::default()
            }),
            expect: own(504, "upstream_timeout"),
            cold: 1,
            hint: None,
        },
        Case {
            name: "5xx burst: 500",
            slug: "e500",
            fault: sim_fault(error_burst(500)),
            expect: passed(500),
            cold: 10,
            hint: None,
        },
        Case {
            name: "5xx burst: 502",
            slug: "e502",
            fault: sim_fault(error_burst(502)),
            expect: passed(502),
            cold: 10,
            hint: None,
        },
        Case {
            name: "5xx burst: 503",
            slug: "e503",
            fault: sim_fault(error_burst(503)),
            expect: passed(503),
            cold: 10,
            hint: None,
        },
        Case {
            name: "dropped connections",
            slug: "drop",
            fault: sim_fault(Faults {
                drop_rate: 1.0,
                ..Faults::default()
            }),
            expect: own(502, "upstream_unreachable"),
            cold: 20,
            hint: None,
        },
        Case {
            name: "slow body 3000 ms (timeout 2 s)",
            slug: "slowbody",
            fault: sim_fault(Faults {
                slow_body_ms: 3000,
                ..Faults::default()
            }),
            expect: own(504, "upstream_timeout"),
            cold: 1,
            hint: None,
        },
        Case {
            name: "connection reset",
            slug: "reset",
            fault: Fault::Reset,
            expect: own(502, "upstream_unreachable"),
            cold: 20,
            hint: Some("reset"),
        },
        Case {
            name: "token endpoint down, token still valid",
            slug: "tokendown",
            fault: Fault::TokenDown,
            expect: Expect::Serves,
            cold: 10,
            hint: None,
        },
    ]
}

/// Returns `Err(message)` from the enclosing function unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

fn cold_path(slug: &str, n: usize) -> String {
    format!("{PREFIX}cold-{slug}-{n}")
}

fn stale_path(slug: &str) -> String {
    format!("{PREFIX}stale-{slug}")
}

fn after_path(slug: &str) -> String {
    format!("{PREFIX}after-{slug}")
}

fn shown(a: &Answer) -> String {
    format!(
        "{} cache-status {:?} body {}",
        a.status,
        a.header("cache-status"),
        String::from_utf8_lossy(&a.body)
    )
}

fn json_of(a: &Answer) -> Option<serde_json::Value> {
    serde_json::from_slice(&a.body).ok()
}

/// The answer a client must see while the fault is in force.
fn check_cold(a: &Answer, case: &Case, what: &str) -> Result<(), String> {
    ensure!(
        !a.header("x-request-id").is_empty(),
        "{what}: expected an X-Request-Id on every answer, saw headers {:?}",
        a.headers
    );
    let body = json_of(a);
    let meta = body.as_ref().map(|b| &b["meta"]);
    match case.expect {
        Expect::Error {
            status,
            error_type,
            passed_through,
        } => {
            ensure!(
                a.status.as_u16() == status,
                "{what}: expected status {status} {error_type}, saw {}",
                shown(a)
            );
            ensure!(
                meta.is_some_and(|m| m["code"] == status && m["error_type"] == error_type),
                "{what}: expected the envelope {{\"meta\":{{\"code\":{status},\"error_type\":\"{error_type}\"}}}}, saw {}",
                shown(a)
            );
            if passed_through {
                let expected = format!("cxgate; fwd=uri-miss; fwd-status={status}");
                ensure!(
                    a.header("cache-status") == expected,
                    "{what}: expected the upstream's {status} forwarded and not stored \
                     (Cache-Status {expected:?}), saw {}",
                    shown(a)
                );
            }
        }
        Expect::Serves => {
            ensure!(
                a.status.as_u16() == 200 && meta.is_some_and(|m| m["code"] == 200),
                "{what}: expected 200 with meta.code 200 (the gateway keeps serving), saw {}",
                shown(a)
            );
        }
    }
    if let Some(hint) = case.hint {
        let message = meta
            .and_then(|m| m["error_message"].as_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        ensure!(
            message.contains(hint),
            "{what}: expected an error_message mentioning {hint:?} (the fault meant), saw {}",
            shown(a)
        );
    }
    Ok(())
}

/// A stale-if-error entry standing in for the failed refetch.
fn check_stale(a: &Answer, stored: &Bytes, what: &str) -> Result<(), String> {
    ensure!(
        a.status.as_u16() == 200 && a.header("cache-status").contains("detail=stale"),
        "{what}: expected 200 with Cache-Status `...; detail=stale` (stale-if-error), saw {}",
        shown(a)
    );
    ensure!(
        a.body == *stored,
        "{what}: expected the stored body as the stale answer, saw {}",
        shown(a)
    );
    Ok(())
}

/// A fresh, successful answer from the upstream (not the cache).
fn check_fresh(a: &Answer, what: &str) -> Result<(), String> {
    let meta_ok = json_of(a).is_some_and(|b| b["meta"]["code"] == 200);
    ensure!(
        a.status.as_u16() == 200 && meta_ok,
        "{what}: expected 200 with meta.code 200 once the fault cleared, saw {}",
        shown(a)
    );
    ensure!(
        a.header("cache-status")
            .starts_with("cxgate; fwd=uri-miss; fwd-status=200"),
        "{what}: expected a fresh answer from the upstream (`cxgate; fwd=uri-miss; fwd-status=200...`), saw {}",
        shown(a)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Leak accounting
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Footprint {
    /// Entries of /proc/self/fd (the gateway and the simulator run in this process).
    fds: Option<usize>,
    tasks: usize,
}

fn footprint() -> Footprint {
    Footprint {
        fds: std::fs::read_dir("/proc/self/fd").ok().map(Iterator::count),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    }
}

/// Polls until the simulator has nothing in flight and descriptors and tasks are back
/// within [`SLACK`] of `before`; the error says what was last seen.
async fn no_leaks(sim: &SimHandle, before: Footprint, what: &str) -> Result<String, String> {
    let started = Instant::now();
    loop {
        let in_flight = sim.stats()["in_flight"].as_u64();
        let now = footprint();
        let fds_ok = match (before.fds, now.fds) {
            (Some(b), Some(n)) => n <= b + SLACK,
            _ => true,
        };
        let tasks_ok = now.tasks <= before.tasks + SLACK;
        if in_flight == Some(0) && fds_ok && tasks_ok {
            return Ok(format!(
                "fds {:?}->{:?}, tasks {}->{}",
                before.fds, now.fds, before.tasks, now.tasks
            ));
        }
        ensure!(
            started.elapsed() < SETTLE,
            "{what}: expected within {SETTLE:?} of the fault clearing: simulator in_flight 0, \
             open fds <= {:?} + {SLACK}, alive tasks <= {} + {SLACK}; saw in_flight {in_flight:?}, \
             fds {:?}, tasks {}",
            before.fds,
            before.tasks,
            now.fds,
            now.tasks
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// The resetting upstream
// ---------------------------------------------------------------------------------------

const RAW_BODY: &[u8] = br#"{"meta":{"code":200},"response":{"id":7,"from":"raw upstream"}}"#;

/// A minimal keep-alive HTTP/1.1 upstream: answers every request 200 with [`RAW_BODY`],
/// or, while `reset` is set, reads the request and closes the socket with `SO_LINGER` 0 so
/// the gateway gets a TCP RST instead of an answer (on fresh and pooled connections alike).
struct ResettingUpstream {
    base: String,
    reset: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

async fn resetting_upstream() -> ResettingUpstream {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the resetting upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let reset = Arc::new(AtomicBool::new(false));
    let flag = reset.clone();
    let task = tokio::spawn(async move {
        // Aborting this task drops the set, which aborts every connection with it.
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(serve_raw(stream, flag.clone()));
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    });
    ResettingUpstream { base, reset, task }
}

async fn serve_raw(mut stream: TcpStream, reset: Arc<AtomicBool>) {
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        // The gateway's GETs carry no body: a request ends with its head.
        let end = loop {
            if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
            }
        };
        pending.drain(..end);
        if reset.load(Ordering::SeqCst) {
            // With a zero linger, close sends RST at once and never blocks the thread.
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            return;
        }
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            RAW_BODY.len()
        )
        .into_bytes();
        answer.extend_from_slice(RAW_BODY);
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

/// GETs `paths` concurrently (priming the keep-alive pools as well) and answers the bodies.
async fn warm(env: &Arc<Env>, paths: Vec<String>) -> Vec<(String, Bytes)> {
    let mut set = JoinSet::new();
    for path in paths {
        let env = env.clone();
        set.spawn(async move {
            let a = env.get(&path).await;
            (path, a)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (path, a) = joined.expect("warm-up request");
        assert_eq!(
            (a.status.as_u16(), a.header("cache-status")),
            (200, "cxgate; fwd=uri-miss; fwd-status=200; stored"),
            "warm-up of {path}: expected a stored 200 before any fault, saw {}",
            shown(&a)
        );
        out.push((path, a.body));
    }
    out
}

/// The cold burst and the stale read, concurrently, while the fault is in force.
async fn under_fault(env: &Env, case: &Case, stored: Option<&Bytes>) -> Result<(), String> {
    let cold = async {
        let mut answers = Vec::new();
        for n in 0..case.cold {
            answers.push(env.get(&cold_path(case.slug, n)).await);
        }
        answers
    };
    let stale_path = stale_path(case.slug);
    let stale = async {
        match stored {
            Some(_) => Some(env.get(&stale_path).await),
            None => None,
        }
    };
    let (colds, stale) = tokio::join!(cold, stale);
    for (n, a) in colds.iter().enumerate() {
        check_cold(a, case, &format!("{}: cold GET {}", case.name, n + 1))?;
    }
    if let (Some(a), Some(stored)) = (&stale, stored) {
        check_stale(a, stored, &format!("{}: GET of a stale entry", case.name))?;
    }
    Ok(())
}

/// After the fault: a path never asked before and the stale one are fetched fresh.
async fn recovery(env: &Env, case: &Case, stale_too: bool) -> Result<(), String> {
    let after = env.get(&after_path(case.slug)).await;
    check_fresh(
        &after,
        &format!("{}: GET after the fault cleared", case.name),
    )?;
    if stale_too {
        let again = env.get(&stale_path(case.slug)).await;
        check_fresh(
            &again,
            &format!(
                "{}: GET of the stale entry after the fault cleared",
                case.name
            ),
        )?;
    }
    Ok(())
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.starts_with(' ').then(|| rest.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// The token case on its own pair: six-second tokens refreshed four seconds ahead, the
/// endpoint down from the start. The first refresh attempt (about 2 s in) fails; the token
/// still has about 4 s to live, so clients must keep being served; once the endpoint is
/// back, a retry must succeed.
async fn token_down(case: &Case) -> Result<String, String> {
    let sim = SimOptions {
        token_ttl: Duration::from_secs(6),
        faults: Faults {
            token_endpoint_down: true,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let env = common::start_refresh_before(sim, "4s", &format!("{BIG_BUDGET}{FAULT_ROUTES}")).await;
    let started = Instant::now();
    // The starting point is taken once the keep-alive pools this case needs exist (client to
    // gateway and admin, gateway to API and token endpoint), so they do not count as leaks.
    let mut before = footprint();
    let exercised = async {
        let prime = env.get(&format!("{PREFIX}prime-token")).await;
        check_cold(
            &prime,
            case,
            &format!("{}: GET before the refresh", case.name),
        )?;
        let error_series = "cxgate_token_refreshes_total{result=\"error\"}";
        while metric(&env.metrics().await, error_series) < 1.0 {
            ensure!(
                started.elapsed() < Duration::from_secs(5),
                "{}: expected a failed refresh attempt within 5 s (token ttl 6 s, refresh 4 s \
                 ahead), saw none",
                case.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        before = footprint();
        under_fault(&env, case, None).await?;
        let granted = env.sim.stats()["token_refreshes"].as_u64();
        ensure!(
            granted == Some(0),
            "{}: expected no refresh granted while the endpoint is down, saw {granted:?}",
            case.name
        );
        Ok(())
    }
    .await;
    env.sim.set_faults(Faults::default());
    let recovered = async {
        exercised?;
        let since = Instant::now();
        while env.sim.stats()["token_refreshes"].as_u64() == Some(0) {
            ensure!(
                since.elapsed() < SETTLE,
                "{}: expected a refresh granted within {SETTLE:?} of the endpoint recovering, \
                 saw none",
                case.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        recovery(&env, case, false).await
    }
    .await;
    let leaks = no_leaks(&env.sim, before, case.name).await;
    env.stop().await;
    recovered?;
    leaks
}

// On the paused clock: the ttls, token lifetimes and upstream timeouts the faults play on
// are tokio timers, so the table runs without waiting them out.
#[tokio::test(start_paused = true)]
async fn every_fault_gets_its_status_stale_answers_recovery_and_no_leaks() {
    let cases = table();
    let extra = format!("{BIG_BUDGET}{FAULT_ROUTES}");
    let sim_env = Arc::new(common::start(SimOptions::default(), &extra).await);
    let raw = resetting_upstream().await;
    let clients = common::client_toml("test", common::KEY, "scopes = [\"read\", \"write\"]");
    let raw_env = Arc::new(
        common::start_custom(SimOptions::default(), "", Some(&raw.base), &clients, &extra).await,
    );

    // One stale entry per case that can use one, stored before any fault; one wait for all
    // of them to pass their one-second ttl.
    let mut sim_paths = Vec::new();
    let mut raw_paths = vec![format!("{PREFIX}prime-0"), format!("{PREFIX}prime-1")];
    for case in &cases {
        match case.fault {
            Fault::Sim(_) => sim_paths.push(stale_path(case.slug)),
            Fault::Reset => raw_paths.push(stale_path(case.slug)),
            Fault::TokenDown => {}
        }
    }
    let (from_sim, from_raw) = tokio::join!(warm(&sim_env, sim_paths), warm(&raw_env, raw_paths));
    let stored: std::collections::HashMap<String, Bytes> =
        from_sim.into_iter().chain(from_raw).collect();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let run_started = Instant::now();
    let mut survived = Vec::new();
    let mut failures = Vec::new();
    for case in &cases {
        let case_started = Instant::now();
        let outcome = match &case.fault {
            Fault::TokenDown => token_down(case).await,
            Fault::Sim(faults) => {
                let before = footprint();
                sim_env.sim.set_faults(faults.clone());
                let exercised =
                    under_fault(&sim_env, case, stored.get(&stale_path(case.slug))).await;
                sim_env.sim.set_faults(Faults::default());
                let recovered = match exercised {
                    Ok(()) => recovery(&sim_env, case, true).await,
                    Err(e) => Err(e),
                };
                let leaks = no_leaks(&sim_env.sim, before, case.name).await;
                recovered.and(leaks)
            }
            Fault::Reset => {
                let before = footprint();
                raw.reset.store(true, Ordering::SeqCst);
                let exercised =
                    under_fault(&raw_env, case, stored.get(&stale_path(case.slug))).await;
                raw.reset.store(false, Ordering::SeqCst);
                let recovered = match exercised {
                    Ok(()) => recovery(&raw_env, case, true).await,
                    Err(e) => Err(e),
                };
                let leaks = no_leaks(&raw_env.sim, before, case.name).await;
                recovered.and(leaks)
            }
        };
        let took = case_started.elapsed().as_secs_f64();
        let pinned = match case.expect {
            Expect::Error {
                status, error_type, ..
            } => format!("{status} {error_type} + stale"),
            Expect::Serves => "200 on the valid token".to_string(),
        };
        match outcome {
            Ok(leaks) => {
                println!(
                    "fault {:?}: survived in {took:.1} s ({pinned}; {leaks})",
                    case.name
                );
                survived.push(format!("{}: {pinned}", case.slug));
            }
            Err(e) => {
                println!("fault {:?}: FAILED in {took:.1} s: {e}", case.name);
                failures.push(e);
            }
        }
    }

    println!(
        "faults: {} tried, {} survived in {:.1} s ({})",
        cases.len(),
        survived.len(),
        run_started.elapsed().as_secs_f64(),
        survived.join(", ")
    );
    raw.task.abort();
    for env in [sim_env, raw_env] {
        match Arc::try_unwrap(env) {
            Ok(env) => env.stop().await,
            Err(_) => panic!(
                "expected no other holder of the environment once every request ended, saw one"
            ),
        }
    }
    assert!(
        failures.is_empty(),
        "expected all {} faults survived, saw {} fail:\n{}",
        cases.len(),
        failures.len(),
        failures.join("\n")
    );
}
