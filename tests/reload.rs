//! Reload: `POST /admin/reload` (in process) and SIGHUP (the real binary as a child) swap
//! routes, clients, budgets and TTLs at once, never drop a request in flight, and refuse an
//! invalid file with its problems while the running configuration stays.
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use common::{Answer, Env, Proc, BIG_BUDGET, KEY, ROUTES};
use cxgate::sim::{Faults, SimOptions};

const NEW_KEY: &str = "newcomer-key";

/// Replaces the config file in one step, so a reload never reads half a file.
fn write_config(path: &Path, text: &str) {
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).expect("write the new config");
    std::fs::rename(&tmp, path).expect("move the new config in place");
}

fn config_path(env: &Env) -> PathBuf {
    env.dir.join("cxgate.toml")
}

fn current_config(env: &Env) -> String {
    std::fs::read_to_string(config_path(env)).expect("read the config the harness wrote")
}

/// `text` with `from` replaced by `to`, which must occur.
fn edited(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "expected {from:?} in the config to edit, saw:\n{text}"
    );
    text.replacen(from, to, 1)
}

async fn admin_reload(env: &Env) -> Answer {
    env.send(Method::POST, &env.admin_url("/admin/reload"), &[], "")
        .await
}

fn assert_reloaded(answer: &Answer, what: &str) {
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{what}: expected the reload accepted, saw {} {}",
        answer.status,
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        answer.json()["reloaded"],
        true,
        "{what}: expected {{\"reloaded\":true}}, saw {}",
        String::from_utf8_lossy(&answer.body)
    );
}

/// The `ttl=` of a hit's Cache-Status, in seconds.
fn hit_ttl(answer: &Answer) -> Option<i64> {
    let status = answer.header("cache-status");
    if !status.contains("; hit") {
        return None;
    }
    status
        .split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .and_then(|v| v.parse().ok())
}

const ACCOUNTS_TTL: &str = "match = \"GET /me/accounts\"\nttl = \"10m\"";

#[tokio::test]
async fn admin_reload_swaps_routes_clients_and_ttls() {
    let env = common::start(SimOptions::default(), ROUTES).await;

    // Before: /me/permissions is not cached, the newcomer is unknown, accounts live 10 min.
    for _ in 0..2 {
        let a = env.get("/me/permissions").await;
        assert!(
            a.status == StatusCode::OK
                && a.header("cache-status").starts_with("cxgate; fwd=bypass"),
            "before reload: expected /me/permissions bypassed, saw {a:?}"
        );
    }
    let unknown = env.get_as(NEW_KEY, "/me").await;
    assert_eq!(
        unknown.status, 401,
        "before reload: expected the newcomer refused, saw {unknown:?}"
    );
    env.get("/me/accounts?v=1").await;
    let old_ttl = hit_ttl(&env.get("/me/accounts?v=1").await);
    assert!(
        old_ttl.is_some_and(|t| t > 300),
        "before reload: expected a hit with ttl near 600, saw {old_ttl:?}"
    );

    let text = edited(
        &current_config(&env),
        ACCOUNTS_TTL,
        "match = \"GET /me/accounts\"\nttl = \"2m\"",
    );
    let text = format!(
        "{text}\n{}\n[[routes]]\nmatch = \"GET /me/permissions\"\nttl = \"1m\"\ntags = [\"me\"]\n",
        common::client_toml("newcomer", NEW_KEY, "")
    );
    write_config(&config_path(&env), &text);
    assert_reloaded(&admin_reload(&env).await, "valid file");

    let welcome = env.get_as(NEW_KEY, "/me").await;
    assert_eq!(
        welcome.status, 200,
        "after reload: expected the newcomer served, saw {welcome:?}"
    );
    let old = env.get("/me").await;
    assert_eq!(
        old.status, 200,
        "after reload: expected the old client still served, saw {old:?}"
    );
    let first = env.get("/me/permissions?r=1").await;
    let second = env.get("/me/permissions?r=1").await;
    assert!(
        first.header("cache-status").contains("stored") && hit_ttl(&second).is_some(),
        "after reload: expected the new route stored then hit, saw {:?} then {:?}",
        first.header("cache-status"),
        second.header("cache-status")
    );
    env.get("/me/accounts?v=2").await;
    let new_ttl = hit_ttl(&env.get("/me/accounts?v=2").await);
    assert!(
        new_ttl.is_some_and(|t| (1..=120).contains(&t)),
        "after reload: expected a hit with ttl at most 120 (2m), saw {new_ttl:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_reload_removes_a_client_and_tightens_the_budget() {
    let other = common::client_toml("other", "other-key", "");
    let clients = format!(
        "{}{other}",
        common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]")
    );
    let env = common::start_with(SimOptions::default(), &clients, ROUTES).await;
    let a = env.get_as("other-key", "/me").await;
    assert_eq!(
        a.status, 200,
        "before reload: expected the other client served, saw {a:?}"
    );
    for i in 0..3 {
        let a = env.get(&format!("/me/permissions?before={i}")).await;
        assert_eq!(
            a.status, 200,
            "before reload: expected uncached reads within budget, saw {a:?}"
        );
    }

    let text = edited(&current_config(&env), &other, "");
    let text = format!(
        "{text}\n[budget]\nlimit = 1000\nperiod = \"1h\"\nburst = 1\nmax_wait = \"10ms\"\n"
    );
    write_config(&config_path(&env), &text);
    assert_reloaded(
        &admin_reload(&env).await,
        "client removed, budget tightened",
    );

    let gone = env.get_as("other-key", "/me").await;
    assert_eq!(
        gone.status, 401,
        "after reload: expected the removed client refused, saw {gone:?}"
    );
    let before = env.upstream_total();
    let mut refused = 0;
    for i in 0..3 {
        let a = env.get(&format!("/me/permissions?after={i}")).await;
        match a.status.as_u16() {
            200 => {}
            429 => {
                refused += 1;
                assert!(
                    a.header("retry-after").parse::<u64>().is_ok_and(|s| s >= 1),
                    "expected a Retry-After of whole seconds on the 429, saw {:?}",
                    a.headers
                );
            }
            other => panic!("after reload: expected 200 or 429, saw {other}: {a:?}"),
        }
    }
    let calls = env.upstream_total() - before;
    assert!(
        refused >= 2 && calls <= 1,
        "after reload with burst 1 (one call per 3.6 s): expected at least 2 of 3 refused and at \
         most 1 upstream call, saw {refused} refused and {calls} calls"
    );
    env.stop().await;
}

// Paused: the reload happens inside the slow request's 1.2 s however long it takes the
// machine, so "still in flight when the reload had finished" is the gateway's doing.
#[tokio::test(start_paused = true)]
async fn a_request_in_flight_finishes_on_the_old_configuration() {
    use tokio::time::Instant;
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(Faults {
        latency_ms: 1200,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let slow = async {
        let started = Instant::now();
        (env.get("/me/permissions").await, started.elapsed())
    };
    let reload_midway = async {
        let deadline = Instant::now() + Duration::from_secs(3);
        while env.sim.stats()["in_flight"].as_u64() != Some(1) {
            assert!(
                Instant::now() < deadline,
                "expected the slow request in flight upstream, saw {}",
                env.sim.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The new file drops the client whose request is in flight.
        let ours = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
        let text = edited(
            &current_config(&env),
            &ours,
            &common::client_toml("successor", NEW_KEY, ""),
        );
        write_config(&config_path(&env), &text);
        let reloaded = admin_reload(&env).await;
        let refused = env.get("/me").await;
        (reloaded, refused, env.sim.stats()["in_flight"].as_u64())
    };
    let ((answer, took), (reloaded, refused, in_flight)) = tokio::join!(slow, reload_midway);
    assert_reloaded(&reloaded, "reload during a slow request");
    assert_eq!(
        in_flight,
        Some(1),
        "expected the slow request still in flight when the reload had finished"
    );
    assert_eq!(
        refused.status, 401,
        "expected the removed key refused right after the reload, saw {refused:?}"
    );
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the request in flight during the reload to finish with 200, saw {answer:?}"
    );
    assert!(
        took >= Duration::from_millis(1100),
        "expected the request to have been slow (in flight across the reload), took {took:?}"
    );
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

#[tokio::test]
async fn an_invalid_file_is_refused_with_its_problems_and_changes_nothing() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let broken = edited(&good, "[server]\n", "[server]\nlistn = \"x\"\n");
    let broken = edited(
        &broken,
        ACCOUNTS_TTL,
        "match = \"GET /me/accounts\"\nttl = \"2m\"",
    );
    let broken = format!(
        "{broken}\n{}\n[[routes]]\nmatch = \"GET /{{account_id}}/settings/{{kind}}\"\nttl = \"1m\"\n\
         tags = [\"settings:{{acount_id}}\"]\n",
        common::client_toml("newcomer", NEW_KEY, "")
    );
    write_config(&config_path(&env), &broken);

    let answer = admin_reload(&env).await;
    let body = answer.json();
    assert_eq!(
        (answer.status.as_u16(), &body["meta"]["error_type"]),
        (400, &Value::from("bad_request")),
        "expected 400 bad_request for an invalid file, saw {} {body}",
        answer.status
    );
    let problems: Vec<String> = body["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        problems.len(),
        2,
        "expected exactly the two problems listed, saw {problems:#?}"
    );
    for (prefix, detail) in [
        ("server.listn", "unknown key"),
        ("routes[", "unknown placeholder {acount_id}"),
    ] {
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with(prefix) && p.contains(detail)),
            "expected a problem starting {prefix:?} saying {detail:?}, saw {problems:#?}"
        );
    }

    // Nothing of the broken file took effect.
    let newcomer = env.get_as(NEW_KEY, "/me").await;
    assert_eq!(
        newcomer.status, 401,
        "expected the newcomer of the refused file still unknown, saw {newcomer:?}"
    );
    env.get("/me/accounts?v=3").await;
    let ttl = hit_ttl(&env.get("/me/accounts?v=3").await);
    assert!(
        ttl.is_some_and(|t| t > 300),
        "expected the old 10m ttl still in force, saw {ttl:?}"
    );

    // A missing file is refused the same way, naming the file.
    std::fs::remove_file(config_path(&env)).expect("remove the config");
    let answer = admin_reload(&env).await;
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(
        answer.status == 400 && text.contains("cxgate.toml"),
        "expected 400 naming the missing file, saw {} {text}",
        answer.status
    );
    let still = env.get("/me").await;
    assert_eq!(
        still.status, 200,
        "expected the gateway to keep serving after refused reloads, saw {still:?}"
    );

    // And a good file afterwards is taken.
    write_config(&config_path(&env), &good);
    assert_reloaded(&admin_reload(&env).await, "the original file again");
    env.stop().await;
}

#[tokio::test]
async fn reloading_under_load_drops_nothing() {
    let extra = format!("{BIG_BUDGET}{ROUTES}");
    let env = common::start(SimOptions::default(), &extra).await;
    env.sim.set_faults(Faults {
        latency_ms: 20,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let a = current_config(&env);
    let b = edited(
        &a,
        ACCOUNTS_TTL,
        "match = \"GET /me/accounts\"\nttl = \"2m\"",
    );
    let b = format!("{b}\n{}", common::client_toml("newcomer", NEW_KEY, ""));
    let path = config_path(&env);

    let worker = |w: usize| {
        let env = &env;
        async move {
            let mut bad = Vec::new();
            for i in 0..25 {
                let target = if i % 2 == 0 {
                    format!("/me/permissions?w={w}&i={i}")
                } else {
                    "/me/accounts".to_string()
                };
                let answer = env.get(&target).await;
                if answer.status != StatusCode::OK {
                    bad.push(format!("{target}: {} {:?}", answer.status, answer.body));
                }
            }
            bad
        }
    };
    let reloads = async {
        let mut failed = Vec::new();
        for n in 0..20 {
            write_config(&path, if n % 2 == 0 { &b } else { &a });
            let answer = admin_reload(&env).await;
            if answer.status != StatusCode::OK {
                failed.push(format!("reload {n}: {}", answer.status));
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        failed
    };
    let started = Instant::now();
    let (w0, w1, w2, w3, failed) =
        tokio::join!(worker(0), worker(1), worker(2), worker(3), reloads);
    let bad: Vec<String> = [w0, w1, w2, w3].concat();
    assert!(
        failed.is_empty(),
        "expected all 20 reloads accepted, saw {failed:?}"
    );
    assert!(
        bad.is_empty(),
        "expected all 100 requests answered 200 across 20 reloads, saw {} others: {bad:?}",
        bad.len()
    );
    println!("100 requests across 20 reloads in {:?}", started.elapsed());
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// SIGHUP: the real binary
// ---------------------------------------------------------------------------------------

/// One GET; `Err` when no answer came within 5 s.
async fn get(url: &str, key: &str) -> Result<(StatusCode, String, Bytes), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::get(url)
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let cache = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, cache, body.to_bytes()))
}

/// Polls until `url` answers `want` for `key`, or fails after `limit`.
async fn wait_for_status(proc: &mut Proc, url: &str, key: &str, want: StatusCode, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut last = String::from("nothing yet");
    while Instant::now() < deadline {
        if let Some(status) = proc.exited() {
            panic!(
                "expected cxgate to keep running, it exited with {status}:\n{}",
                proc.output()
            );
        }
        match get(url, key).await {
            Ok((status, _, _)) if status == want => return,
            Ok((status, _, body)) => {
                last = format!("{status} {}", String::from_utf8_lossy(&body));
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "expected {want} from {url} within {limit:?}, last saw {last}; cxgate said:\n{}",
        proc.output()
    );
}

#[tokio::test]
async fn sighup_reloads_the_real_binary_and_keeps_the_old_config_when_invalid() {
    let common::BinarySetup {
        sim,
        dir,
        config: base,
        config_path: path,
        port,
        ..
    } = common::binary_setup("reload", "/me/connectedprofiles", 1000).await;
    let mut proc = Proc::spawn(
        &["run", "--config", path.to_str().expect("utf-8 path")],
        &dir,
    );
    let url = |p: &str| format!("http://127.0.0.1:{port}{p}");
    wait_for_status(
        &mut proc,
        &url("/me"),
        KEY,
        StatusCode::OK,
        Duration::from_secs(10),
    )
    .await;

    let before = get(&url("/me/permissions"), KEY).await;
    assert!(
        matches!(&before, Ok((StatusCode::OK, cache, _)) if cache.starts_with("cxgate; fwd=bypass")),
        "before SIGHUP: expected /me/permissions bypassed, saw {before:?}"
    );
    let unknown = get(&url("/me"), NEW_KEY).await;
    assert!(
        matches!(&unknown, Ok((StatusCode::UNAUTHORIZED, _, _))),
        "before SIGHUP: expected the newcomer refused, saw {unknown:?}"
    );

    // A slow request is in flight when the signal arrives.
    let slow_url = url("/me/connectedprofiles");
    let slow = tokio::spawn(async move { get(&slow_url, KEY).await });
    let deadline = Instant::now() + Duration::from_secs(3);
    while sim.stats()["in_flight"].as_u64() != Some(1) {
        assert!(
            Instant::now() < deadline,
            "expected the slow request in flight upstream, saw {}",
            sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let valid = format!(
        "{base}\n{}\n[[routes]]\nmatch = \"GET /me/permissions\"\nttl = \"1m\"\n",
        common::client_toml("newcomer", NEW_KEY, "")
    );
    write_config(&path, &valid);
    proc.signal("HUP");
    wait_for_status(
        &mut proc,
        &url("/me"),
        NEW_KEY,
        StatusCode::OK,
        Duration::from_secs(5),
    )
    .await;
    let slow = slow.await.expect("slow request task");
    assert!(
        matches!(&slow, Ok((StatusCode::OK, _, _))),
        "expected the request in flight during SIGHUP to finish with 200, saw {slow:?}"
    );
    let first = get(&url("/me/permissions?h=1"), KEY).await;
    let second = get(&url("/me/permissions?h=1"), KEY).await;
    assert!(
        matches!(&first, Ok((_, c, _)) if c.contains("stored"))
            && matches!(&second, Ok((_, c, _)) if c.contains("; hit")),
        "after SIGHUP: expected the new route stored then hit, saw {first:?} then {second:?}"
    );

    // An invalid file: the process logs the problem, keeps running and keeps the config.
    let broken = format!(
        "{}\n[[clients]]\nname = \"keyless\"\n",
        valid.replacen("[server]\n", "[server]\nlistn = \"x\"\n", 1)
    );
    write_config(&path, &broken);
    proc.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !proc.output().contains("server.listn") {
        assert!(
            Instant::now() < deadline,
            "expected the refused SIGHUP reload logged with its problems, log:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let log = proc.output();
    assert!(
        log.contains("clients[2].key_sha256"),
        "expected every problem logged, not just the first; log:\n{log}"
    );
    assert!(
        proc.exited().is_none(),
        "expected cxgate to keep running after an invalid SIGHUP reload:\n{log}"
    );
    let still = get(&url("/me"), NEW_KEY).await;
    assert!(
        matches!(&still, Ok((StatusCode::OK, _, _))),
        "expected the last good configuration still in force, saw {still:?}"
    );

    // SIGHUP reads the token file again too: a rewritten one's token goes upstream next.
    const REWRITTEN: &str = "sim-access-SECRET-REWRITTEN";
    write_config(&path, &valid);
    cxgate::demo::write_token_file(
        &dir.join("token.json"),
        REWRITTEN,
        common::REFRESH,
        Duration::from_secs(3600),
    )
    .expect("rewrite the token file");
    proc.signal("HUP");
    let name = format!(
        "sha256:{}",
        &cxgate::auth::sha256_hex(REWRITTEN.as_bytes())[..12]
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut n = 0;
    while sim.stats()["by_token"][name.as_str()].as_u64().is_none() {
        assert!(
            Instant::now() < deadline,
            "expected the rewritten token file's token sent upstream after SIGHUP, stats {}\n{}",
            sim.stats(),
            proc.output()
        );
        n += 1;
        let _ = get(&url(&format!("/me/permissions?after-hup={n}")), KEY).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = proc.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "expected cxgate to exit within 5 s of SIGTERM:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit 0 after SIGTERM, saw {status}:\n{}",
        proc.output()
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes the harness config with `from` replaced by `to` and reloads it; returns the notes.
async fn reload_with(env: &Env, from: &str, to: &str) -> String {
    let text = edited(&current_config(env), from, to);
    write_config(&config_path(env), &text);
    let answer = admin_reload(env).await;
    assert_reloaded(&answer, &format!("{to:?}"));
    answer.json()["notes"].to_string()
}

// A setting a reload cannot apply must at least be named in the answer's notes, as the
// listeners, the cache size and the upstream base are; otherwise the operator is told the
// reload worked while the old value silently stays.

// Paused: both requests are in flight together before the upstream's 600 ms pass.
#[tokio::test(start_paused = true)]
async fn a_reload_applies_or_notes_max_concurrency() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let notes = reload_with(
        &env,
        "request_timeout = \"5s\"\n",
        "request_timeout = \"5s\"\nmax_concurrency = 1\n",
    )
    .await;
    env.sim.set_faults(Faults {
        latency_ms: 600,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let (a, b) = tokio::join!(
        env.get("/me/permissions?c=1"),
        env.get("/me/permissions?c=2")
    );
    let statuses = [a.status.as_u16(), b.status.as_u16()];
    assert!(
        statuses.contains(&503) || notes.contains("max_concurrency"),
        "expected max_concurrency = 1 applied (one of two concurrent requests refused with 503) \
         or named in the notes; saw statuses {statuses:?} and notes {notes}"
    );
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_reload_applies_or_notes_upstream_timeout() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let notes = reload_with(&env, "timeout = \"2s\"\n", "timeout = \"300ms\"\n").await;
    env.sim.set_faults(Faults {
        latency_ms: 800,
        path_prefix: Some("/me/permissions".into()),
        ..Faults::default()
    });
    let answer = env.get("/me/permissions").await;
    assert!(
        answer.status == 504 || notes.contains("upstream.timeout"),
        "expected upstream.timeout = 300ms applied (504 for an 800 ms upstream) or named in the \
         notes; saw {} and notes {notes}",
        answer.status
    );
    env.sim.set_faults(Faults::default());
    env.stop().await;
}

/// A zero upstream timeout or connect timeout is refused by a reload as by `check` (every
/// upstream call would fail), and the running values stay: the upstream is still called.
#[tokio::test]
async fn a_reload_refuses_a_zero_upstream_timeout() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    for (key, from, to) in [
        (
            "upstream.timeout",
            "timeout = \"2s\"\n",
            "timeout = \"0s\"\n",
        ),
        (
            "upstream.connect_timeout",
            "connect_timeout = \"1s\"\n",
            "connect_timeout = \"0ms\"\n",
        ),
    ] {
        write_config(&config_path(&env), &edited(&good, from, to));
        let answer = admin_reload(&env).await;
        let body = answer.json();
        let problems: Vec<&str> = body["problems"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
            .unwrap_or_default();
        assert!(
            answer.status == 400
                && problems.len() == 1
                && problems[0].starts_with(&format!("{key}:"))
                && problems[0].contains("greater than zero"),
            "{key}: expected 400 with the one problem naming it, saw {} {body}",
            answer.status
        );
        let still = env.get("/me/permissions").await;
        assert_eq!(
            still.status, 200,
            "{key}: expected the upstream still called with the old timeouts, saw {still:?}"
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn a_reload_notes_budget_backend_settings_that_need_a_restart() {
    let env = common::start(SimOptions::default(), BIG_BUDGET).await;
    let notes = reload_with(
        &env,
        "burst = 100000\n",
        "burst = 100000\nkey_prefix = \"other\"\n",
    )
    .await;
    assert!(
        notes.contains("budget.key_prefix"),
        "expected a note that budget.key_prefix needs a restart, saw {notes}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_reload_that_turns_on_the_admin_token_enforces_it() {
    const ADMIN_ENV: &str = "CXGATE_TEST_RELOADED_ADMIN_TOKEN";
    std::env::set_var(ADMIN_ENV, "reloaded-admin-secret");
    let env = common::start(SimOptions::default(), ROUTES).await;
    let status = |auth: Option<&'static str>| {
        let env = &env;
        async move {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("authorization", a)).into_iter().collect();
            env.send(Method::GET, &env.admin_url("/admin/status"), &headers, "")
                .await
                .status
        }
    };
    assert_eq!(
        status(None).await,
        200,
        "expected /admin/status open before"
    );

    let notes = reload_with(
        &env,
        "request_timeout = \"5s\"\n",
        &format!("request_timeout = \"5s\"\nadmin_token_env = \"{ADMIN_ENV}\"\n"),
    )
    .await;
    assert!(
        !notes.contains("admin_token"),
        "expected the admin token applied, not noted, saw {notes}"
    );
    let open = status(None).await;
    let wrong = status(Some("Bearer nope")).await;
    let right = status(Some("Bearer reloaded-admin-secret")).await;
    assert_eq!(
        (open, wrong, right),
        (
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::OK
        ),
        "expected the reloaded admin token enforced (401 without it, 401 wrong, 200 right)"
    );

    // A variable that is not set is refused, as at start, and the token in force stays.
    let text = edited(
        &current_config(&env),
        ADMIN_ENV,
        "CXGATE_TEST_ADMIN_TOKEN_NOBODY_SET",
    );
    write_config(&config_path(&env), &text);
    let answer = env
        .send(
            Method::POST,
            &env.admin_url("/admin/reload"),
            &[("authorization", "Bearer reloaded-admin-secret")],
            "",
        )
        .await;
    let body = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(
        answer.status == 400 && body.contains("admin_token_env"),
        "expected 400 naming admin_token_env for an unset variable, saw {} {body}",
        answer.status
    );
    assert_eq!(
        status(Some("Bearer reloaded-admin-secret")).await,
        200,
        "expected the admin token in force to stay after the refused reload"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_reload_names_every_token_and_server_setting_that_needs_a_restart() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let text = current_config(&env);
    let text = edited(&text, "refresh_before = \"1s\"", "refresh_before = \"5m\"");
    let text = edited(
        &text,
        "client_id = \"sim-client\"",
        "client_id = \"other-client\"",
    );
    let text = edited(&text, "shutdown_grace = \"2s\"", "shutdown_grace = \"9s\"");
    // A file that exists, so the change is one a restart could start on.
    std::fs::copy(env.dir.join("token.json"), env.dir.join("token-moved.json"))
        .expect("copy the token file");
    let text = edited(&text, "token.json", "token-moved.json");
    write_config(&config_path(&env), &text);
    let answer = admin_reload(&env).await;
    assert_reloaded(&answer, "token and server settings changed");
    let notes = answer.json()["notes"].to_string();
    for key in [
        "token.refresh_before",
        "[token.oauth]",
        "server.shutdown_grace",
        "token.file",
    ] {
        assert!(
            notes.contains(key),
            "expected the notes to name {key} as needing a restart, saw {notes}"
        );
    }
    let unchanged = admin_reload(&env).await;
    let again = unchanged.json()["notes"].to_string();
    assert!(
        again.contains("token.file"),
        "expected the same file reloaded again to still name what is not applied, saw {again}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_reload_drops_entries_of_a_route_whose_ttl_or_tags_changed() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    for path in ["/me/accounts", "/me"] {
        env.get(path).await;
        let hit = env.get(path).await;
        assert!(
            hit_ttl(&hit).is_some(),
            "before reload: expected {path} cached, saw {:?}",
            hit.header("cache-status")
        );
    }
    let text = edited(
        &current_config(&env),
        "match = \"GET /me/accounts\"\nttl = \"10m\"\ntags = [\"me\", \"accounts\"]",
        "match = \"GET /me/accounts\"\nttl = \"2m\"\ntags = [\"profile\"]",
    );
    write_config(&config_path(&env), &text);
    assert_reloaded(
        &admin_reload(&env).await,
        "new ttl and tags for /me/accounts",
    );

    let after = env.get("/me/accounts").await;
    assert!(
        after.header("cache-status").contains("stored"),
        "expected the entry stored under the old ttl and tags dropped (a new miss), saw {:?}",
        after.header("cache-status")
    );
    let ttl = hit_ttl(&env.get("/me/accounts").await);
    assert!(
        ttl.is_some_and(|t| t <= 120),
        "expected the new 2m ttl on the new entry, saw {ttl:?}"
    );
    let untouched = env.get("/me").await;
    assert!(
        hit_ttl(&untouched).is_some(),
        "expected /me (route unchanged) still a hit, saw {:?}",
        untouched.header("cache-status")
    );
    let purged = env
        .send(
            Method::POST,
            &env.admin_url("/admin/purge"),
            &[("content-type", "application/json")],
            r#"{"tags":["profile"]}"#,
        )
        .await;
    assert_eq!(
        purged.json()["purged"],
        1,
        "expected a purge by the new tag name to reach the /me/accounts entry, saw {:?}",
        purged.body
    );
    env.stop().await;
}

/// A refused reload answers in the gateway's error envelope (top-level `error` and
/// `error_description`, as every other error), and admin auth matches the `Bearer` scheme in
/// any case.
#[tokio::test]
async fn a_refused_reload_uses_the_envelope_and_the_bearer_scheme_is_case_insensitive() {
    const ADMIN_ENV: &str = "CXGATE_TEST_CASE_ADMIN_TOKEN";
    std::env::set_var(ADMIN_ENV, "case-admin-secret");
    let env = common::start(SimOptions::default(), ROUTES).await;
    reload_with(
        &env,
        "request_timeout = \"5s\"\n",
        &format!("request_timeout = \"5s\"\nadmin_token_env = \"{ADMIN_ENV}\"\n"),
    )
    .await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} case-admin-secret");
        let answer = env
            .send(
                Method::GET,
                &env.admin_url("/admin/status"),
                &[("authorization", auth.as_str())],
                "",
            )
            .await;
        assert_eq!(
            answer.status, 200,
            "expected {auth:?} accepted (the scheme is case-insensitive)"
        );
    }

    write_config(&config_path(&env), "this is [not toml\n");
    let answer = env
        .send(
            Method::POST,
            &env.admin_url("/admin/reload"),
            &[("authorization", "bearer case-admin-secret")],
            "",
        )
        .await;
    let body = answer.json();
    assert_eq!(answer.status, 400, "expected the invalid file refused");
    assert_eq!(
        (body["error"].as_str(), body["meta"]["code"].as_u64()),
        (Some("bad_request"), Some(400)),
        "expected the error envelope, saw {body}"
    );
    assert!(
        body["error_description"]
            .as_str()
            .is_some_and(|d| !d.is_empty())
            && body["problems"].as_array().is_some_and(|p| !p.is_empty()),
        "expected an error_description and the problems, saw {body}"
    );
    env.stop().await;
}

/// The simulator's count of API calls made with `token`.
fn calls_with(env: &Env, token: &str) -> u64 {
    let name = format!(
        "sha256:{}",
        &cxgate::auth::sha256_hex(token.as_bytes())[..12]
    );
    env.sim.stats()["by_token"][name.as_str()]
        .as_u64()
        .unwrap_or(0)
}

fn token_generation(status: &Answer) -> u64 {
    status.json()["token"]["generation"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected token.generation in {:?}", status.json()))
}

/// A reload reads the token file again, as a restart would: an operator's new token is
/// used at once, and a broken file is not taken (the held token stays, the notes say so).
#[tokio::test]
async fn a_reload_takes_a_rewritten_token_file_and_keeps_the_token_when_it_is_broken() {
    const NEXT: &str = "sim-access-SECRET-0002";
    let sim = SimOptions {
        access_tokens: vec![common::ACCESS.into(), NEXT.into()],
        refresh_tokens: vec![common::REFRESH.into(), "sim-refresh-SECRET-0002".into()],
        ..SimOptions::default()
    };
    let env = common::start(sim, &format!("{BIG_BUDGET}{ROUTES}")).await;
    let read = |n: u32| format!("/12345/inbox/contact/twitter/{n}");
    assert_eq!(env.get(&read(1)).await.status, 200, "the first read");
    assert_eq!(
        calls_with(&env, common::ACCESS),
        1,
        "the first token at start"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let before = token_generation(&status);

    // What `cxgate token init` does: a new token in the file.
    let token_file = env.dir.join("token.json");
    cxgate::demo::write_token_file(
        &token_file,
        NEXT,
        "sim-refresh-SECRET-0002",
        Duration::from_secs(3600),
    )
    .expect("rewrite the token file");
    let answer = admin_reload(&env).await;
    assert_reloaded(&answer, "a reload after the token file was rewritten");
    assert!(
        !String::from_utf8_lossy(&answer.body).contains("token.file"),
        "expected no note about a valid token file, saw {}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(
        env.get(&read(2)).await.status,
        200,
        "a read after the reload"
    );
    assert_eq!(
        (calls_with(&env, common::ACCESS), calls_with(&env, NEXT)),
        (1, 1),
        "expected the read after the reload sent with the token of the rewritten file"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let adopted = token_generation(&status);
    assert!(
        adopted > before,
        "expected a new token generation, saw {before} then {adopted}"
    );

    // The same tokens with another expiry: the refresh schedule follows the file.
    cxgate::demo::write_token_file(
        &token_file,
        NEXT,
        "sim-refresh-SECRET-0002",
        Duration::from_secs(1500),
    )
    .expect("rewrite the token file with another expiry");
    let answer = admin_reload(&env).await;
    assert_reloaded(&answer, "a reload after only the expiry changed");
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let rescheduled = token_generation(&status);
    assert!(
        rescheduled > adopted,
        "expected the new expiry taken as a new generation, saw {adopted} then {rescheduled}"
    );

    // A file others may read is taken with the warning start-up gives, in the answer too.
    cxgate::demo::write_token_file(
        &token_file,
        NEXT,
        "sim-refresh-SECRET-0002",
        Duration::from_secs(1400),
    )
    .expect("rewrite the token file again");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644))
            .expect("open the token file to others");
        let answer = admin_reload(&env).await;
        assert_reloaded(&answer, "a reload with a token file others may read");
        let notes = answer.json()["notes"].clone();
        assert!(
            notes.as_array().is_some_and(|n| n.iter().any(|n| n
                .as_str()
                .is_some_and(|n| n.starts_with("token.file:") && n.contains("readable by other")))),
            "expected a note that the token file is readable by others, saw {notes}"
        );
    }
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let rescheduled = token_generation(&status);

    // A broken file is not taken: the token held stays, and the notes name token.file.
    std::fs::write(&token_file, "{\"access_token\": ").expect("break the token file");
    let answer = admin_reload(&env).await;
    assert_reloaded(&answer, "a reload with a broken token file");
    let notes = answer.json()["notes"].clone();
    assert!(
        notes.as_array().is_some_and(|n| n
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.starts_with("token.file:")))),
        "expected a note naming token.file, saw {notes}"
    );
    assert!(
        !String::from_utf8_lossy(&answer.body).contains(NEXT),
        "expected no token text in the reload's answer"
    );
    assert_eq!(
        env.get(&read(3)).await.status,
        200,
        "a read after that reload"
    );
    assert_eq!(
        calls_with(&env, NEXT),
        2,
        "expected the held token still in use after a broken token file"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    assert_eq!(
        token_generation(&status),
        rescheduled,
        "expected the token generation unchanged by a broken file"
    );
    env.stop().await;
}

/// A reload refuses what `cxgate run` would refuse, restart-only settings included: the
/// answer must never be "restart to apply it" for a file the restart cannot start on.
#[tokio::test]
async fn a_reload_refuses_files_that_run_would_refuse() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let missing = env.dir.join("no-such-file.pem");
    let missing = missing.display();
    let cases = [
        (
            "server.tls",
            format!("{good}\n[server.tls]\ncert_file = \"{missing}\"\nkey_file = \"{missing}\"\n"),
        ),
        (
            "upstream.ca_file",
            edited(
                &good,
                "timeout = \"2s\"\n",
                &format!("timeout = \"2s\"\nca_file = \"{missing}\"\n"),
            ),
        ),
        (
            "server.access_log",
            edited(
                &good,
                "[server]\n",
                "[server]\naccess_log = \"/proc/no-such-dir/access.log\"\n",
            ),
        ),
    ];
    for (key, text) in cases {
        // With it, a route change that would apply: it must not, as nothing of a refused
        // file is.
        let text = edited(
            &text,
            ACCOUNTS_TTL,
            "match = \"GET /me/accounts\"\nttl = \"2m\"",
        );
        write_config(&config_path(&env), &text);
        let answer = admin_reload(&env).await;
        let body = answer.json();
        let problems = body["problems"].to_string();
        assert!(
            answer.status == StatusCode::BAD_REQUEST && problems.contains(key),
            "{key}: expected 400 naming the setting run would refuse, saw {} {body}",
            answer.status
        );
        env.get("/me/accounts").await;
        let ttl = hit_ttl(&env.get("/me/accounts").await);
        assert!(
            ttl.is_some_and(|t| t > 120),
            "{key}: expected the old 10m ttl still in force after the refused reload, saw {ttl:?}"
        );
    }
    write_config(&config_path(&env), &good);
    assert_reloaded(&admin_reload(&env).await, "the good file again");
    env.stop().await;
}

/// Cached bodies carry links rewritten to the public base URL: a reload that changes it
/// drops them, so no client is sent to a base the config no longer names.
#[tokio::test]
async fn a_reload_that_changes_the_public_base_drops_answers_linking_the_old_one() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let with_base = |base: &str| {
        edited(
            &good,
            "[server]\n",
            &format!("[server]\npublic_base_url = \"{base}\"\n"),
        )
    };
    let page = "/12345/inbox/mentions?limit=2&base=1";
    write_config(&config_path(&env), &with_base("http://old-base.example:1"));
    assert_reloaded(&admin_reload(&env).await, "a public base");
    let first = env.get(page).await;
    assert!(
        String::from_utf8_lossy(&first.body).contains("old-base.example"),
        "expected the page's links on the reloaded base, saw {}",
        String::from_utf8_lossy(&first.body)
    );
    write_config(&config_path(&env), &with_base("http://new-base.example:2"));
    let answer = admin_reload(&env).await;
    assert_reloaded(&answer, "another public base");
    let again = env.get(page).await;
    let body = String::from_utf8_lossy(&again.body);
    assert!(
        !body.contains("old-base.example") && body.contains("new-base.example"),
        "expected the page's links on the base now configured, saw Cache-Status {:?} and {body}",
        again.header("cache-status")
    );
    assert!(
        answer.json()["notes"]
            .to_string()
            .contains("server.public_base_url"),
        "expected the notes to say the cached answers were dropped, saw {}",
        answer.json()["notes"]
    );
    env.stop().await;
}

/// A reload refuses a new token file `run` could not start on, and a variable the file
/// names that is not set, as `run` would; the running configuration stays.
#[tokio::test]
async fn a_reload_refuses_a_new_token_file_or_variable_run_would_refuse() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let cases = [
        (
            "token.file",
            edited(&good, "token.json", "no-such-token.json"),
        ),
        (
            "token.oauth.client_secret_env",
            edited(
                &good,
                "client_secret_env = \"",
                "client_secret_env = \"CXGATE_TEST_NEVER_SET_",
            ),
        ),
    ];
    for (key, text) in cases {
        write_config(&config_path(&env), &text);
        let answer = admin_reload(&env).await;
        let body = answer.json();
        assert!(
            answer.status == StatusCode::BAD_REQUEST && body["problems"].to_string().contains(key),
            "{key}: expected 400 naming it, saw {} {body}",
            answer.status
        );
    }
    write_config(&config_path(&env), &good);
    assert_reloaded(&admin_reload(&env).await, "the good file again");
    env.stop().await;
}

/// Opens `fifo` read-write (which never blocks on Linux) for a second, so an open blocked
/// on its other end returns: a test that found a hang can then fail instead of stalling.
#[cfg(unix)]
fn release(fifo: &Path) {
    let fifo = fifo.to_path_buf();
    std::thread::spawn(move || {
        let end = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo);
        std::thread::sleep(Duration::from_secs(1));
        drop(end);
    });
}

/// A file setting (or the config file itself) naming a FIFO is refused at once with 400:
/// nothing waits for the FIFO's other end, so the reload answers and `/healthz` and the
/// client listener keep answering. Workers are threads here, so a hang fails the timeout.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_a_fifo_in_any_file_setting_without_hanging() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let fifo = env.dir.join("setting.fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "expected mkfifo to work");
    let f = fifo.display();
    let cases = [
        (
            "server.access_log",
            edited(
                &good,
                "[server]\n",
                &format!("[server]\naccess_log = \"{f}\"\n"),
            ),
        ),
        (
            "upstream.ca_file",
            edited(
                &good,
                "timeout = \"2s\"\n",
                &format!("timeout = \"2s\"\nca_file = \"{f}\"\n"),
            ),
        ),
        (
            "server.tls",
            format!("{good}\n[server.tls]\ncert_file = \"{f}\"\nkey_file = \"{f}\"\n"),
        ),
        ("cannot read config file", String::new()),
    ];
    for (key, text) in cases {
        let path = config_path(&env);
        if text.is_empty() {
            std::fs::remove_file(&path).expect("remove the config");
            let made = std::process::Command::new("mkfifo").arg(&path).status();
            assert!(made.is_ok_and(|s| s.success()), "expected mkfifo to work");
        } else {
            write_config(&path, &text);
        }
        let fifo = if text.is_empty() { path } else { fifo.clone() };
        let Ok(answer) = tokio::time::timeout(Duration::from_secs(10), admin_reload(&env)).await
        else {
            release(&fifo);
            panic!("{key}: expected the reload to answer, it waited 10 s on the FIFO");
        };
        let body = answer.json();
        let problems = body["problems"].to_string();
        assert!(
            answer.status == StatusCode::BAD_REQUEST
                && problems.contains(key)
                && problems.contains("FIFO"),
            "{key}: expected 400 naming the setting and the FIFO, saw {} {body}",
            answer.status
        );
        let health = tokio::time::timeout(
            Duration::from_secs(5),
            env.send(Method::GET, &env.admin_url("/healthz"), &[], ""),
        )
        .await;
        assert!(
            health.as_ref().is_ok_and(|h| h.status == StatusCode::OK),
            "{key}: expected /healthz to answer 200 after the refused reload, saw {:?}",
            health.map(|h| h.status)
        );
        let me = tokio::time::timeout(Duration::from_secs(5), env.get("/me")).await;
        assert!(
            me.as_ref().is_ok_and(|a| a.status == StatusCode::OK),
            "{key}: expected the client listener to answer /me, saw {:?}",
            me.map(|a| a.status)
        );
    }
    write_config(&config_path(&env), &good);
    assert_reloaded(&admin_reload(&env).await, "the good file again");
    env.stop().await;
}

/// A base URL the gateway cannot forward under (the simulator's `/_sim` controls, a dot
/// segment, an encoded slash) is refused by a reload as by `check`: 400 naming
/// `upstream.base_url` with the reason, and the running configuration stays. Before, the
/// reload was taken with a note that the change needs a restart, which would then refuse.
#[tokio::test]
async fn a_reload_refuses_a_base_url_the_gateway_cannot_forward_under() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let base = good
        .lines()
        .find(|l| l.trim_start().starts_with("base_url"))
        .expect("the harness writes upstream.base_url")
        .to_string();
    for (path, says) in [
        ("/_sim", "/_sim"),
        ("/a/../b", "dot segment"),
        ("/a%2Fb", "encoded slash"),
    ] {
        let bad = edited(
            &good,
            &base,
            &format!("{}{path}\"", base.trim_end_matches('"')),
        );
        write_config(&config_path(&env), &bad);
        let answer = admin_reload(&env).await;
        let body = answer.json();
        let problems: Vec<String> = body["problems"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            answer.status == 400
                && problems.len() == 1
                && problems[0].starts_with("upstream.base_url:")
                && problems[0].contains(says),
            "{path}: expected 400 with the one problem naming upstream.base_url and {says:?}, \
             saw {} {body}",
            answer.status
        );
        let still = env.get("/me").await;
        assert_eq!(
            still.status, 200,
            "{path}: expected the old base still in use, saw {still:?}"
        );
    }
    env.stop().await;
}

/// A reload refuses `token.oauth.token_url` at the gateway's own admin listener, as `check`
/// and `run` do: 400 naming the key, and the running configuration stays.
#[tokio::test]
async fn a_reload_refuses_a_token_url_that_is_the_gateway_itself() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let good = current_config(&env);
    let url = good
        .lines()
        .find(|l| l.trim_start().starts_with("token_url"))
        .expect("the harness writes token.oauth.token_url")
        .to_string();
    let (listen, admin) = (env.gw.addr, env.gw.admin_addr);
    let bad = edited(
        &edited(
            &edited(
                &good,
                "listen = \"127.0.0.1:0\"",
                &format!("listen = \"{listen}\""),
            ),
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"{admin}\""),
        ),
        &url,
        &format!("token_url = \"http://{admin}/oauth/access_token/\""),
    );
    write_config(&config_path(&env), &bad);
    let answer = admin_reload(&env).await;
    let body = answer.json();
    let problems: Vec<String> = body["problems"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        answer.status == 400
            && problems.len() == 1
            && problems[0].starts_with("token.oauth.token_url:")
            && problems[0].contains("server.admin_listen"),
        "expected 400 with the one problem naming token.oauth.token_url, saw {} {body}",
        answer.status
    );
    assert_eq!(
        env.get("/me").await.status,
        200,
        "expected the gateway still serving"
    );
    env.stop().await;
}
