//! The access log: `server.access_log` as a file gets one line per request with every field,
//! the real binary writes JSON lines with `--log-format json` and moves to a new file on
//! SIGUSR1 after a rename, and `cxgate check` refuses a log it could not open.
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use common::{Proc, KEY, ROUTES};
use cxgate::sim::SimOptions;

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Polls until `path` holds at least `n` lines, or fails after 5 s.
async fn wait_for_lines(path: &Path, n: usize, what: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = lines(path);
        if seen.len() >= n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: expected {n} lines in {}, saw {seen:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn each_request_lands_in_the_file_with_its_fields() {
    let dir = common::temp_dir("access-file");
    let log = dir.join("access.log");
    let server = format!("access_log = \"{}\"", log.display());
    let env = common::start_custom(
        SimOptions::default(),
        &server,
        None,
        &common::client_toml("test", KEY, "scopes = [\"read\"]"),
        ROUTES,
    )
    .await;
    let auth = [("authorization", format!("Bearer {KEY}"))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let miss = env.send(Method::GET, &env.url("/me"), &auth, "").await;
    let hit = env.send(Method::GET, &env.url("/me"), &auth, "").await;
    let refused = env.send(Method::GET, &env.url("/me"), &[], "").await;
    assert_eq!(miss.status, StatusCode::OK, "first /me: {miss:?}");
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "no key: {refused:?}"
    );

    let seen = wait_for_lines(&log, 3, "three requests").await;
    assert_eq!(seen.len(), 3, "one line per request, saw {seen:?}");
    // Routes are matched after authentication: a refused request names none.
    for (line, answer, client, route, cache, status) in [
        (&seen[0], &miss, "test", "\"GET /me\"", "miss", "200"),
        (&seen[1], &hit, "test", "\"GET /me\"", "hit", "200"),
        (&seen[2], &refused, "-", "other", "none", "401"),
    ] {
        let id = answer.header("x-request-id");
        assert!(!id.is_empty(), "every answer has a request id");
        for want in [
            " INFO cxgate::access: request ".to_string(),
            format!(" request_id={id} "),
            format!(" client={client} "),
            format!(" route={route} "),
            " method=GET ".to_string(),
            format!(" status={status} "),
            format!(" cache={cache} "),
        ] {
            assert!(line.contains(&want), "expected {want:?} in {line:?}");
        }
        let ms = line
            .split(" duration_ms=")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_else(|| panic!("expected duration_ms in {line:?}"));
        let (whole, frac) = ms.split_once('.').expect("a decimal point");
        assert!(
            whole.parse::<u64>().is_ok() && frac.len() == 2 && frac.parse::<u8>().is_ok(),
            "expected milliseconds to the hundredth, saw {ms:?} in {line:?}"
        );
    }
    assert!(
        seen[0].contains(" upstream_ms="),
        "a miss names its upstream time: {:?}",
        seen[0]
    );
    assert!(
        !seen[1].contains(" upstream_ms="),
        "a hit has no upstream time: {:?}",
        seen[1]
    );

    let metrics = env
        .send(Method::GET, &env.admin_url("/metrics"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("cxgate_access_log_dropped_total 0"),
        "expected the dropped counter at 0 on /metrics, saw:\n{text}"
    );
    // The line's duration is the one the histogram observed (one reading of the clock at
    // the end serves both): the miss is the only request of its series.
    let sum = text
        .lines()
        .find(|l| {
            l.starts_with("cxgate_request_duration_seconds_sum{")
                && l.contains("cache=\"miss\"")
                && l.contains("route=\"GET /me\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("expected the miss's duration sum in:\n{text}"));
    let logged = seen[0]
        .split(" duration_ms=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_default();
    assert_eq!(
        logged,
        format!("{:.2}", (sum * 1e5).round() / 100.0),
        "the miss's line and its histogram observation ({sum} s) differ"
    );
    env.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_binary_writes_json_and_reopens_the_file_on_sigusr1() {
    let setup = common::binary_setup("access-rotate", "/nothing-slow", 0).await;
    let log = setup.dir.join("access.log");
    let rotated = setup.dir.join("access.log.1");
    let config = setup.config.replacen(
        "[server]\n",
        &format!("[server]\naccess_log = \"{}\"\n", log.display()),
        1,
    );
    std::fs::write(&setup.config_path, format!("{config}\n{ROUTES}")).expect("write config");
    let mut proc = Proc::spawn(
        &[
            "--log-format",
            "json",
            "run",
            "--config",
            setup.config_path.to_str().expect("utf-8 path"),
        ],
        &setup.dir,
    );
    let url = format!("http://127.0.0.1:{}/me", setup.port);
    let client = reqwest_like::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&url).await != Some(200) {
        assert!(
            proc.exited().is_none() && Instant::now() < deadline,
            "expected cxgate to answer /me within 10 s; it said:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = wait_for_lines(&log, 1, "before the rename").await;

    std::fs::rename(&log, &rotated).expect("rename the log as logrotate does");
    proc.signal("USR1");
    // The signal is handled asynchronously: ask until a line lands in the new file.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&log).is_empty() {
        assert!(
            Instant::now() < deadline,
            "expected a new {} after SIGUSR1; cxgate said:\n{}",
            log.display(),
            proc.output()
        );
        assert_eq!(client.get(&url).await, Some(200), "/me after SIGUSR1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let old = lines(&rotated);
    let new = lines(&log);
    assert!(
        old.len() >= before.len() && old[..before.len()] == before[..],
        "the renamed file keeps the lines written before: {old:?}"
    );
    for line in old.iter().chain(&new) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("expected a JSON line, saw {line:?}: {e}"));
        assert_eq!(v["target"], "cxgate::access", "in {line}");
        assert_eq!(v["client"], "test", "in {line}");
        assert_eq!(v["route"], "GET /me", "in {line}");
        assert_eq!(v["method"], "GET", "in {line}");
        assert_eq!(v["status"], 200, "in {line}");
        assert!(v["request_id"].is_string(), "in {line}");
        assert!(
            matches!(v["cache"].as_str(), Some("miss" | "hit")),
            "in {line}"
        );
        assert!(v["duration_ms"].is_f64(), "in {line}");
    }
    proc.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc.exited().is_none() {
        assert!(Instant::now() < deadline, "cxgate did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_dir_all(&setup.dir);
}

#[tokio::test]
async fn check_refuses_an_access_log_it_cannot_open() {
    let setup = common::binary_setup("access-check", "/nothing-slow", 0).await;
    for (value, want) in [
        (
            setup
                .dir
                .join("no-such-dir/access.log")
                .display()
                .to_string(),
            "server.access_log: cannot open",
        ),
        (String::new(), "server.access_log: must be"),
    ] {
        let config = setup.config.replacen(
            "[server]\n",
            &format!("[server]\naccess_log = \"{value}\"\n"),
            1,
        );
        std::fs::write(&setup.config_path, &config).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxgate"))
            .args(["check", "--config"])
            .arg(&setup.config_path)
            .output()
            .expect("run cxgate check");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "access_log = {value:?}: {said}");
        assert!(said.contains(want), "expected {want:?}, saw:\n{said}");
    }
    let ok = setup.config.replacen(
        "[server]\n",
        &format!(
            "[server]\naccess_log = \"{}\"\n",
            setup.dir.join("ok.log").display()
        ),
        1,
    );
    std::fs::write(&setup.config_path, &ok).expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cxgate"))
        .args(["check", "--config"])
        .arg(&setup.config_path)
        .output()
        .expect("run cxgate check");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "a writable log passes: {said}");
    assert!(
        said.contains("access log: "),
        "the summary names it: {said}"
    );
    let _ = std::fs::remove_dir_all(&setup.dir);
}

/// A tiny keyed GET client, so the test reads as the steps it takes.
mod reqwest_like {
    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::client::legacy::{connect::HttpConnector, Client as Hyper};
    use hyper_util::rt::TokioExecutor;
    use std::time::Duration;

    pub struct Client(Hyper<HttpConnector, Full<Bytes>>);

    impl Client {
        pub fn new() -> Client {
            Client(Hyper::builder(TokioExecutor::new()).build_http())
        }

        /// The status of a GET with the test key, `None` when nothing answered in 5 s.
        pub async fn get(&self, url: &str) -> Option<u16> {
            let req = http::Request::get(url)
                .header("authorization", format!("Bearer {}", super::KEY))
                .body(Full::new(Bytes::new()))
                .ok()?;
            let resp = tokio::time::timeout(Duration::from_secs(5), self.0.request(req))
                .await
                .ok()?
                .ok()?;
            Some(resp.status().as_u16())
        }
    }
}
