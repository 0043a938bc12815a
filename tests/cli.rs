//! The real `cxgate` binary: `check`, `key hash`, `run` (refusals and graceful shutdown) and
//! `demo`. Child processes are stopped by their PID, and killed by it if a test fails.
mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::{Proc, KEY};

const BIN: &str = env!("CARGO_BIN_EXE_cxgate");

/// A fresh private directory for one test's files.
fn cxgate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cxgate");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("cxgate output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

impl Proc {
    /// Waits for the exit without blocking the runtime (the simulator may share it).
    async fn exit_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// One GET with an optional bearer key; `Err` when no answer came within 10 s.
async fn get(url: &str, key: Option<&str>) -> Result<(StatusCode, Bytes), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::get(url);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, body.to_bytes()))
}

/// Polls `url` until it answers `want`, the child exits, or `limit` passes.
async fn wait_until_answers(proc: &mut Proc, url: &str, key: Option<&str>, limit: Duration) {
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
            Ok((StatusCode::OK, _)) => return,
            Ok((status, body)) => last = format!("{status} {}", text(&body)),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "expected 200 from {url} within {limit:?}, last saw {last}; cxgate said:\n{}",
        proc.output()
    );
}

// ---------------------------------------------------------------------------------------
// check, key hash, refusals
// ---------------------------------------------------------------------------------------

#[test]
fn check_accepts_the_shipped_production_config() {
    // The shipped file with its token file where this test can make one: as on a host
    // where `cxgate token init` has run (check refuses a missing one, as run does).
    let dir = common::temp_dir("cli-shipped");
    let token = dir.join("token.json");
    cxgate::demo::write_token_file(&token, "a", "r", Duration::from_secs(3600))
        .expect("token file");
    let shipped =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml"))
            .expect("read shipped config");
    assert!(shipped.contains("\"/var/lib/cxgate/token.json\""));
    // And on ports of its own: `check` binds both listeners as `run` would, and 8080 or
    // 9090 may be taken on a test host.
    let path = dir.join("cxgate.toml");
    let moved = shipped
        .replace("/var/lib/cxgate/token.json", token.to_str().expect("utf-8"))
        .replacen("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:0\"", 1)
        .replacen(
            "admin_listen = \"127.0.0.1:9090\"",
            "admin_listen = \"127.0.0.1:0\"",
            1,
        );
    assert!(
        moved.contains("\nlisten = \"127.0.0.1:0\"")
            && moved.contains("admin_listen = \"127.0.0.1:0\""),
        "expected the shipped listeners moved to free ports"
    );
    std::fs::write(&path, moved).expect("write config");
    // With the variables the file names set, as on a host that is ready to run it (an unset
    // one adds a line per variable, which another test covers).
    let out = Command::new(BIN)
        .args(["check", "--config", path.to_str().expect("utf-8 path")])
        .env("CXGATE_ADMIN_TOKEN", "admin-token")
        .env("CX_CLIENT_SECRET", "client-secret")
        .stdin(Stdio::null())
        .output()
        .expect("run cxgate check");
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected exit 0, saw {}; stderr:\n{}",
        out.status,
        text(&out.stderr)
    );
    for part in ["valid", "listeners:", "clients (3)", "routes ("] {
        assert!(
            stdout.contains(part),
            "expected {part:?} in the summary, saw:\n{stdout}"
        );
    }
    assert!(
        // One screen of a terminal: the shipped table has a route for every API write.
        stdout.lines().count() <= 50,
        "expected a one-screen summary, saw {} lines",
        stdout.lines().count()
    );
}

/// A config with three problems that serde accepts, so validation can see them all.
const THREE_PROBLEMS: &str = r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "30 parsecs"

[upstream]
base_url = "http://127.0.0.1:1"

[token]
access_token_env = "CXGATE_TEST_NEVER_SET"

[[routes]]
match = "GET /{account_id}/inbox/mentions"
ttl = "15s"
tags = ["mentions:{acount_id}"]

[[routes]]
match = "GET /{account_id}/inbox/mentions"
ttl = "15s"
"#;

fn check_text(config: &str) -> (Option<i32>, Vec<String>) {
    let dir = common::temp_dir("cli");
    let path = dir.join("broken.toml");
    std::fs::write(&path, config).expect("write config");
    let out = cxgate(&["check", "--config", path.to_str().expect("utf-8")], None);
    let _ = std::fs::remove_dir_all(&dir);
    let lines = text(&out.stderr)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    (out.status.code(), lines)
}

#[test]
fn check_reports_every_problem_on_its_own_line_with_its_key_path() {
    let (code, lines) = check_text(THREE_PROBLEMS);
    assert_eq!(code, Some(2), "expected exit 2, saw {code:?}: {lines:#?}");
    assert_eq!(
        lines.len(),
        3,
        "expected one line per problem (3), saw {lines:#?}"
    );
    for (prefix, detail) in [
        ("server.request_timeout:", "parsecs"),
        ("routes[0].tags[0]:", "{acount_id}"),
        ("routes[1].match:", "duplicate"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(prefix) && l.contains(detail)),
            "expected a line starting {prefix:?} mentioning {detail:?}, saw {lines:#?}"
        );
    }
}

#[test]
fn check_refuses_an_unknown_key() {
    let config = THREE_PROBLEMS.replace("[server]\n", "[server]\nlistn = \"x\"\n");
    let (code, lines) = check_text(&config);
    assert_eq!(code, Some(2), "expected exit 2, saw {code:?}: {lines:#?}");
    assert!(
        lines.iter().any(|l| l.contains("listn")),
        "expected the unknown key named, saw {lines:#?}"
    );
}

#[test]
fn check_reports_an_unknown_key_by_path_alongside_the_other_problems() {
    let config = THREE_PROBLEMS.replace("[server]\n", "[server]\nlistn = \"x\"\n");
    let (code, lines) = check_text(&config);
    assert_eq!(code, Some(2), "expected exit 2, saw {code:?}: {lines:#?}");
    assert_eq!(
        lines.len(),
        4,
        "expected one line per problem (4), saw {lines:#?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("server.listn")),
        "expected a line naming the key path server.listn, saw {lines:#?}"
    );
}

#[test]
fn key_hash_prints_the_sha256_of_stdin() {
    let expected = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
    for input in ["password", "password\n"] {
        let out = cxgate(&["key", "hash"], Some(input));
        assert_eq!(
            (out.status.code(), text(&out.stdout).trim()),
            (Some(0), expected),
            "expected exit 0 and the hash for {input:?}; stderr: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn run_with_the_redis_backend_but_no_redis_url_exits_2_with_a_clear_message() {
    let dir = common::temp_dir("cli");
    let path = dir.join("redis.toml");
    let config = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                  [upstream]\nbase_url = \"http://127.0.0.1:1\"\n\
                  [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n\
                  [budget]\nbackend = \"redis\"\n";
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .env("CXGATE_TEST_TOKEN", "some-static-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cxgate");
    // A gateway that starts anyway would never exit: bound the wait.
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "expected cxgate run to refuse the redis backend without a URL, it kept running"
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, saw {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("budget.backend") && stderr.contains("redis"),
        "expected a message naming budget.backend and redis, saw:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// graceful shutdown and the demo
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_drains_the_request_in_flight_then_exits_0() {
    let common::BinarySetup {
        sim,
        dir,
        config_path: path,
        port,
        admin_port,
        ..
    } = common::binary_setup("cli", "/me/permissions", 1500).await;
    let mut proc = Proc::spawn(&["run", "--config", path.to_str().expect("utf-8")], &dir);
    let health = format!("http://127.0.0.1:{admin_port}/healthz");
    wait_until_answers(&mut proc, &health, None, Duration::from_secs(10)).await;

    let slow_url = format!("http://127.0.0.1:{port}/me/permissions");
    let slow = tokio::spawn(async move { get(&slow_url, Some(KEY)).await });
    let deadline = Instant::now() + Duration::from_secs(3);
    while sim.stats()["in_flight"].as_u64() != Some(1) {
        assert!(
            Instant::now() < deadline,
            "expected the slow request in flight upstream, saw {}",
            sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proc.signal("TERM");

    // Stop accepting first: new connections are refused while the old one drains.
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut refused = false;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused && !slow.is_finished(),
        "expected new connections refused while the request drains \
         (refused: {refused}, request finished: {})",
        slow.is_finished()
    );

    let answer = slow.await.expect("request task");
    assert!(
        matches!(answer, Ok((StatusCode::OK, _))),
        "expected the in-flight request to complete with 200, saw {answer:?}; cxgate said:\n{}",
        proc.output()
    );
    let status = proc.exit_within(Duration::from_secs(6)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "expected exit 0 within the grace, saw {status:?}; cxgate said:\n{}",
        proc.output()
    );
    for p in [port, admin_port] {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", p)).await;
        assert!(
            connect.is_err(),
            "expected 127.0.0.1:{p} closed after shutdown, it accepted a connection"
        );
    }
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn demo_serves_me_with_the_demo_key_and_stops_on_sigint() {
    let dir = common::temp_dir("cli");
    let (port, admin_port) = (common::free_port(), common::free_port());
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{admin_port}");
    let mut proc = Proc::spawn(
        &["demo", "--listen", &listen, "--admin-listen", &admin],
        &dir,
    );
    let me = format!("http://{listen}/me");
    wait_until_answers(&mut proc, &me, Some("demo-key"), Duration::from_secs(30)).await;
    let printed = proc.output();
    assert!(
        printed.contains(&format!("http://{listen}")) && printed.contains("curl"),
        "expected the gateway URL and curl lines printed, saw:\n{printed}"
    );

    proc.signal("INT");
    let status = proc.exit_within(Duration::from_secs(10)).await;
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "expected exit 0 after SIGINT, saw {status:?}; cxgate said:\n{}",
        proc.output()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// check refuses what run refuses
// ---------------------------------------------------------------------------------------

const MINIMAL: &str = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                       [upstream]\nbase_url = \"http://127.0.0.1:1\"\n";

#[test]
fn check_refuses_a_missing_tls_certificate_as_run_does() {
    let dir = common::temp_dir("cli-tls");
    let missing = dir.join("no-such-cert.pem");
    let config = MINIMAL.replace(
        "[upstream]",
        &format!(
            "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n[upstream]",
            missing.display(),
            dir.join("no-such-key.pem").display()
        ),
    ) + "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    let (code, lines) = check_text(&config);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(2), "expected exit 2, saw {code:?}: {lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("server.tls") && l.contains("no-such-cert.pem")),
        "expected a line naming server.tls and the missing file, saw {lines:#?}"
    );
}

#[cfg(unix)]
#[test]
fn check_refuses_a_fifo_token_file_and_warns_about_an_open_one() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::temp_dir("cli-token");
    let fifo = dir.join("token.fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "expected mkfifo to make {}", fifo.display());
    let config = format!("{MINIMAL}[token]\nfile = \"{}\"\n", fifo.display());
    let started = Instant::now();
    let (code, lines) = check_text(&config);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "expected check to return without opening the FIFO"
    );
    assert!(
        code == Some(2) && lines.iter().any(|l| l.contains("not a regular file")),
        "expected exit 2 saying the token file is not a regular file, saw {code:?}: {lines:#?}"
    );

    let open = dir.join("token.json");
    std::fs::write(&open, "{\"access_token\":\"a\",\"refresh_token\":\"r\"}").expect("token");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = format!("{MINIMAL}[token]\nfile = \"{}\"\n", open.display());
    let (code, lines) = check_text(&config);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        code == Some(0)
            && lines
                .iter()
                .any(|l| l.starts_with("warning: token.file") && l.contains("644")),
        "expected exit 0 with a warning naming mode 644, saw {code:?}: {lines:#?}"
    );
}

/// `check` loads the token file as `run` does, so a file `run` refuses fails the check too,
/// and a file far larger than any token record is refused before it is read whole.
#[test]
fn check_refuses_every_token_file_run_refuses() {
    let dir = common::temp_dir("cli-token-bad");
    let path = dir.join("token.json");
    let huge = format!("{}{{\"access_token\":\"a\"}}", " ".repeat(100 * 1024));
    for (what, contents, says) in [
        (
            "empty access_token",
            "{\"access_token\":\"\"}".to_string(),
            "empty access_token",
        ),
        (
            "malformed JSON",
            "{\"access_token\":".to_string(),
            "not valid JSON",
        ),
        (
            "duplicate key",
            "{\"access_token\":\"a\",\"access_token\":\"b\"}".to_string(),
            "not valid JSON",
        ),
        (
            "impossible date",
            "{\"access_token\":\"a\",\"expires_at\":\"9999-99-99T00:00:00Z\"}".to_string(),
            "expires_at",
        ),
        ("100 KiB of spaces", huge, "larger than"),
    ] {
        std::fs::write(&path, contents).expect("write the token file");
        let config = format!("{MINIMAL}[token]\nfile = \"{}\"\n", path.display());
        let (code, lines) = check_text(&config);
        assert!(
            code == Some(2) && lines.iter().any(|l| l.contains(says)),
            "{what}: expected exit 2 saying {says:?}, saw {code:?}: {lines:#?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A Redis setting `run` refuses is refused by `check` too (a CA file that does not
/// exist), and `run` exits 2 on a wrong Redis URL as on any invalid configuration, saying
/// what it found and what it accepts.
#[test]
fn redis_settings_run_refuses_are_refused_by_check_and_exit_2() {
    let dir = common::temp_dir("cli");
    let base = "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
                [upstream]\nbase_url = \"http://127.0.0.1:1\"\n\
                [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n\
                [budget]\nbackend = \"redis\"\nredis_url_env = \"CXGATE_TEST_CLI_REDIS\"\n";
    let missing_ca = format!(
        "{base}redis_ca_file = \"{}\"\n",
        dir.join("no-such-ca.pem").display()
    );
    let (code, lines) = check_text(&missing_ca);
    assert!(
        code == Some(2) && lines.iter().any(|l| l.contains("budget.redis_ca_file")),
        "expected check to exit 2 naming budget.redis_ca_file, saw {code:?} {lines:?}"
    );

    let path = dir.join("http.toml");
    std::fs::write(&path, base).expect("write config");
    let mut child = Command::new(BIN)
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .env("CXGATE_TEST_TOKEN", "some-static-token")
        .env("CXGATE_TEST_CLI_REDIS", "http://user:pw@127.0.0.1:6379/")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cxgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("expected cxgate run to refuse an http:// Redis URL, it kept running");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit 2, saw {}; stderr:\n{stderr}",
        out.status
    );
    assert!(
        stderr.contains("\"http://\"")
            && stderr.contains("rediss://")
            && !stderr.contains("pw@")
            && !stderr.contains("holds a plain"),
        "expected the scheme found and the accepted ones named, no password, saw:\n{stderr}"
    );
}

/// `cxgate check` or `run` on `config` with `env` set; the exit code and stderr. A `run`
/// that starts anyway is killed after 10 s and reported as no exit code.
fn exit_of(command: &str, config: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = common::temp_dir("cli-exit");
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = Command::new(BIN)
        .args([command, "--config", path.to_str().expect("utf-8")])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cxgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = false;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().expect("output");
    let _ = std::fs::remove_dir_all(&dir);
    let code = if killed { None } else { out.status.code() };
    (code, text(&out.stderr))
}

/// What `check` refuses about the files a config names is an invalid configuration for
/// `run` too: both exit 2, naming the key.
#[test]
fn run_exits_2_for_every_file_check_refuses() {
    let dir = common::temp_dir("cli-files");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate").expect("write garbage");
    let token = "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    let cases = [
        (
            "a missing TLS pair",
            MINIMAL.replace(
                "[upstream]",
                &format!(
                    "[server.tls]\ncert_file = \"{0}/no-cert.pem\"\nkey_file = \"{0}/no-key.pem\"\n[upstream]",
                    dir.display()
                ),
            ) + token,
            "server.tls",
        ),
        (
            "a garbage ca_file",
            format!("{MINIMAL}ca_file = \"{}\"\n{token}", garbage.display()),
            "upstream.ca_file",
        ),
        (
            "a directory as access_log",
            MINIMAL.replace(
                "[upstream]",
                &format!("access_log = \"{}\"\n[upstream]", dir.display()),
            ) + token,
            "server.access_log",
        ),
        (
            "a missing token directory",
            format!(
                "{MINIMAL}[token]\nfile = \"{}/no-such-dir/token.json\"\n",
                dir.display()
            ),
            "token.file",
        ),
    ];
    for (what, config, key) in cases {
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config, &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2) && stderr.contains(key),
                "{what}: expected `{command}` to exit 2 naming {key}, saw {code:?}:\n{stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An admin token that could only work through Basic (spaces around it, a non-ASCII
/// byte) is refused by `check` and `run`; a token file whose access token cannot be sent
/// gets from `check` the warning `run` gives (exit 0: `run` starts, not ready); and the
/// permission warning says what an open file holds.
#[cfg(unix)]
#[test]
fn check_says_what_run_would_of_admin_and_access_tokens() {
    use std::os::unix::fs::PermissionsExt;
    let env_token = "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    let admin = MINIMAL.replace(
        "[upstream]",
        "admin_token_env = \"CXGATE_TEST_ADMIN\"\n[upstream]",
    ) + env_token;
    for value in [" padded ", "t\u{f6}ken"] {
        for command in ["check", "run"] {
            let env = [("CXGATE_TEST_TOKEN", "tok"), ("CXGATE_TEST_ADMIN", value)];
            let (code, stderr) = exit_of(command, &admin, &env);
            assert!(
                code == Some(2) && stderr.contains("server.admin_token_env"),
                "admin token {value:?}: expected `{command}` to exit 2 naming the key, saw \
                 {code:?}:\n{stderr}"
            );
        }
    }
    let dir = common::temp_dir("cli-token-space");
    let path = dir.join("token.json");
    std::fs::write(&path, "{\"access_token\":\"two words\"}").expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = format!("{MINIMAL}[token]\nfile = \"{}\"\n", path.display());
    let (code, stderr) = exit_of("check", &config, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        code == Some(0)
            && stderr.contains("warning: token.file")
            && stderr.contains("cannot be sent upstream"),
        "expected exit 0 with a warning that the token cannot be sent, saw {code:?}:\n{stderr}"
    );
    assert!(
        stderr.contains("it holds the access token:") && !stderr.contains("refresh token"),
        "expected the permission warning to say the file holds an access token only, \
         saw:\n{stderr}"
    );
}

/// `cxgate check` or `run` on the config at `path`, as [`exit_of`] does.
fn exit_of_path(command: &str, path: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args([command, "--config", path.to_str().expect("utf-8")])
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start cxgate");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut killed = false;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let out = child.wait_with_output().expect("output");
    let code = if killed { None } else { out.status.code() };
    (code, text(&out.stderr))
}

/// A FIFO named as the access log, the CA file, the TLS pair or the config itself is
/// refused by `check` and `run` alike (exit 2, naming the key) without being opened in a
/// way that waits for its other end: before, both waited forever.
#[cfg(unix)]
#[test]
fn check_and_run_refuse_a_fifo_in_any_file_setting_at_once() {
    let dir = common::temp_dir("cli-fifo");
    let fifo = dir.join("setting.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "expected mkfifo to work");
    let f = fifo.display();
    let token = "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    let cases = [
        (
            "server.access_log",
            MINIMAL.replace("[upstream]", &format!("access_log = \"{f}\"\n[upstream]")) + token,
        ),
        (
            "upstream.ca_file",
            format!("{MINIMAL}ca_file = \"{f}\"\n{token}"),
        ),
        (
            "server.tls",
            MINIMAL.replace(
                "[upstream]",
                &format!("[server.tls]\ncert_file = \"{f}\"\nkey_file = \"{f}\"\n[upstream]"),
            ) + token,
        ),
    ];
    let path = dir.join("cxgate.toml");
    for (key, config) in cases {
        std::fs::write(&path, config).expect("write config");
        for command in ["check", "run"] {
            let (code, stderr) = exit_of_path(command, &path, &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2) && stderr.contains(key) && stderr.contains("FIFO"),
                "{key}: expected `{command}` to exit 2 naming it and the FIFO, saw \
                 {code:?}:\n{stderr}"
            );
        }
    }
    for command in ["check", "run"] {
        let (code, stderr) = exit_of_path(command, &fifo, &[]);
        assert!(
            code == Some(2) && stderr.contains("cannot read config file") && stderr.contains("FIFO"),
            "a FIFO as the config: expected `{command}` to exit 2 saying so, saw {code:?}:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A variable the file names that is not set: `run` cannot start without it, so `check`
/// refuses it too and `run` exits 2 as for any invalid configuration, both naming the key.
#[test]
fn check_and_run_refuse_an_unset_variable_alike() {
    let dir = common::temp_dir("cli-unset");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, "a", "r", Duration::from_secs(3600))
        .expect("token file");
    let token = "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    let cases = [
        (
            "server.admin_token_env",
            MINIMAL.replace(
                "[upstream]",
                "admin_token_env = \"CXGATE_TEST_NEVER_SET_ADMIN\"\n[upstream]",
            ) + token,
        ),
        (
            "budget.redis_url_env",
            format!(
                "{MINIMAL}{token}[budget]\nbackend = \"redis\"\n\
                 redis_url_env = \"CXGATE_TEST_NEVER_SET_REDIS\"\n"
            ),
        ),
        (
            "token.oauth.client_secret_env",
            format!(
                "{MINIMAL}[token]\nfile = \"{}\"\n[token.oauth]\n\
                 token_url = \"http://127.0.0.1:1/oauth/access_token/\"\nclient_id = \"x\"\n\
                 client_secret_env = \"CXGATE_TEST_NEVER_SET_SECRET\"\n",
                token_file.display()
            ),
        ),
    ];
    for (key, config) in cases {
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config, &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2) && stderr.contains(key) && stderr.contains("is not set"),
                "{key}: expected `{command}` to exit 2 saying it is not set, saw \
                 {code:?}:\n{stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The gateway's own listener written as the upstream client's resolver reads an IPv4
/// address (inet_aton: one to four parts, decimal, octal with a leading 0, hex with 0x) or
/// as IPv6 is a loop, refused by `check` and `run` alike; another address in such a
/// spelling is accepted.
#[test]
fn check_and_run_refuse_the_gateways_own_address_in_every_ipv4_spelling() {
    let (port, admin) = (common::free_port(), common::free_port());
    let server =
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n");
    let config = |base: &str| {
        format!(
            "{server}[upstream]\nbase_url = \"{base}\"\n\
             [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n"
        )
    };
    let cases = [
        (format!("http://127.1:{port}"), "server.listen"),
        (format!("http://2130706433:{port}"), "server.listen"),
        (format!("http://0x7f000001:{port}/"), "server.listen"),
        (format!("http://0X7F.0.0.1:{port}"), "server.listen"),
        (format!("http://0177.0.0.01:{port}"), "server.listen"),
        (format!("http://127.0.1:{admin}"), "server.admin_listen"),
        (
            format!("http://017700000001:{admin}"),
            "server.admin_listen",
        ),
        (
            format!("http://[::ffff:7f00:1]:{admin}"),
            "server.admin_listen",
        ),
    ];
    for (base, says) in cases {
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config(&base), &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2)
                    && stderr.lines().count() == 1
                    && stderr.starts_with("upstream.base_url:")
                    && stderr.contains(says)
                    && stderr.contains("call the gateway itself"),
                "{base}: expected `{command}` to exit 2 with one line naming upstream.base_url \
                 and {says:?}, saw {code:?}:\n{stderr}"
            );
        }
    }
    for base in [
        format!("http://0x7f000002:{port}"),
        format!("http://127.2:{port}"),
        format!("http://2130706433:{}", port.wrapping_add(1)),
    ] {
        let (code, stderr) = exit_of("check", &config(&base), &[("CXGATE_TEST_TOKEN", "tok")]);
        assert!(
            code == Some(0) && !stderr.contains("upstream.base_url"),
            "{base}: expected `check` to accept another address, saw {code:?}:\n{stderr}"
        );
    }
}

/// An upstream timeout or connect timeout of zero would fail every upstream call (504
/// "did not answer within 0ns"): refused by `check` and `run` alike, as a zero
/// `server.request_timeout` is.
#[test]
fn check_and_run_refuse_a_zero_upstream_timeout() {
    let token = "[token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n";
    for (key, setting) in [
        ("upstream.timeout", "timeout = \"0s\""),
        ("upstream.connect_timeout", "connect_timeout = \"0ms\""),
    ] {
        let config = format!("{MINIMAL}{setting}\n{token}");
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config, &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2)
                    && stderr.lines().count() == 1
                    && stderr.starts_with(&format!("{key}:"))
                    && stderr.contains("greater than zero"),
                "{key}: expected `{command}` to exit 2 with one line naming it, saw \
                 {code:?}:\n{stderr}"
            );
        }
    }
}

/// A token file whose access token has expired, with nothing to refresh it (no refresh
/// token, or no `[token.oauth]`): `run` starts on it but is never ready, so `check` warns
/// (exit 0, as for an unsendable token); with both, `run` refreshes it and nothing is said.
#[test]
fn check_warns_about_an_expired_token_that_cannot_be_refreshed() {
    let dir = common::temp_dir("cli-token-expired");
    let path = dir.join("token.json");
    let oauth = "[token.oauth]\ntoken_url = \"http://127.0.0.1:1/oauth/access_token/\"\n\
                 client_id = \"x\"\nclient_secret_env = \"CXGATE_TEST_SECRET\"\n";
    let expired = "\"expires_at\":\"2020-01-01T00:00:00Z\"";
    for (what, record, extra, warned) in [
        (
            "no refresh token",
            format!("{{\"access_token\":\"a\",{expired}}}"),
            "",
            true,
        ),
        (
            "no [token.oauth]",
            format!("{{\"access_token\":\"a\",\"refresh_token\":\"r\",{expired}}}"),
            "",
            true,
        ),
        (
            "a refresh token and [token.oauth]",
            format!("{{\"access_token\":\"a\",\"refresh_token\":\"r\",{expired}}}"),
            oauth,
            false,
        ),
    ] {
        std::fs::write(&path, record).expect("write the token file");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        }
        let config = format!("{MINIMAL}[token]\nfile = \"{}\"\n{extra}", path.display());
        let (code, stderr) = exit_of("check", &config, &[("CXGATE_TEST_SECRET", "s")]);
        let says = stderr.contains("warning: token.file") && stderr.contains("has expired");
        assert!(
            code == Some(0) && says == warned,
            "{what}: expected exit 0 {} an expiry warning, saw {code:?}:\n{stderr}",
            if warned { "with" } else { "without" }
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// What `run` refuses once it starts, before it serves, `check` refuses with the same
/// message and exit code: a port taken (the client listener, plain or TLS, and the admin
/// one), an address that is not on this host, and a client's gateway key as the static
/// token. Before, `check` said "valid" (exit 0) for each.
#[test]
fn check_refuses_what_run_refuses_before_serving() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let taken = busy.local_addr().expect("addr").to_string();
    let tls_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tls");
    let tls = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        tls_dir.join("cert.pem").display(),
        tls_dir.join("key.pem").display()
    );
    let config = |listen: &str, admin: &str, server: &str, rest: &str| {
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{server}\
             [upstream]\nbase_url = \"http://127.0.0.1:1\"\n\
             [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n{rest}"
        )
    };
    let client = format!(
        "[[clients]]\nname = \"app\"\nkey_sha256 = \"{}\"\nscopes = [\"read\"]\n",
        cxgate::auth::sha256_hex(KEY.as_bytes())
    );
    let any = "127.0.0.1:0";
    let cases = [
        (
            "the client port taken",
            config(&taken, any, "", ""),
            "tok",
            1,
            "server.listen",
        ),
        (
            "the TLS port taken",
            config(&taken, any, &tls, ""),
            "tok",
            1,
            "server.listen",
        ),
        (
            "the admin port taken",
            config(any, &taken, "", ""),
            "tok",
            1,
            "server.admin_listen",
        ),
        (
            "an address not on this host (TEST-NET-1)",
            config("192.0.2.1:8080", any, "allow_anonymous = true\n", ""),
            "tok",
            1,
            "not on this host",
        ),
        (
            "a client's key as the static token",
            config(any, any, "", &client),
            KEY,
            2,
            "token.access_token_env",
        ),
    ];
    for (what, config, token, code, says) in cases {
        let mut said = Vec::new();
        for command in ["check", "run"] {
            let (got, stderr) = exit_of(command, &config, &[("CXGATE_TEST_TOKEN", token)]);
            if command == "check" && what.contains("port taken") {
                // A port held now is the machine's state, not the file's (the usual holder
                // is the running gateway the file is checked for): `check` warns, naming
                // the key, and passes; `run` refuses below.
                assert!(
                    got == Some(0)
                        && stderr
                            .lines()
                            .any(|l| l.starts_with("warning: ") && l.contains(says)),
                    "{what}: expected `check` to pass with a warning naming {says:?}, saw \
                     {got:?}:\n{stderr}"
                );
                continue;
            }
            let line = stderr
                .lines()
                .find(|l| l.starts_with("cxgate: "))
                .unwrap_or_default()
                .to_string();
            assert!(
                got == Some(code) && line.contains(says),
                "{what}: expected `{command}` to exit {code} saying {says:?}, saw {got:?}:\n{stderr}"
            );
            said.push(line);
        }
        if said.len() == 2 {
            assert_eq!(
                said[0], said[1],
                "{what}: expected `check` to say what `run` says"
            );
        }
    }
    drop(busy);
}

/// A base URL the gateway cannot forward under, or one that is the gateway itself, is
/// refused by `check` and `run` alike (exit 2, naming `upstream.base_url` and why).
#[test]
fn check_and_run_refuse_a_base_url_that_loops_or_leaves_its_path() {
    let (port, admin) = (common::free_port(), common::free_port());
    let server =
        format!("[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n");
    let cases = [
        ("http://127.0.0.1:1/_sim".to_string(), "/_sim"),
        ("http://127.0.0.1:1/x/_sim/".to_string(), "/_sim"),
        ("http://127.0.0.1:1/a/../b".to_string(), "dot segment"),
        ("http://127.0.0.1:1/a/./b".to_string(), "dot segment"),
        ("http://127.0.0.1:1/a%2Fb".to_string(), "encoded slash"),
        (format!("http://127.0.0.1:{port}"), "server.listen"),
        (format!("http://localhost:{admin}/"), "server.admin_listen"),
    ];
    for (base, says) in cases {
        let config = format!(
            "{server}[upstream]\nbase_url = \"{base}\"\n\
             [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n"
        );
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config, &[("CXGATE_TEST_TOKEN", "tok")]);
            assert!(
                code == Some(2)
                    && stderr.lines().count() == 1
                    && stderr.starts_with("upstream.base_url:")
                    && stderr.contains(says),
                "{base}: expected `{command}` to exit 2 with one line naming upstream.base_url \
                 and {says:?}, saw {code:?}:\n{stderr}"
            );
        }
    }
}

/// `token.oauth.token_url` at the gateway's own listener or admin listener is refused by
/// `check` and `run` alike, as `upstream.base_url` is (exit 2, one line naming the key):
/// every refresh would ask the gateway itself, which hands out no tokens.
#[test]
fn check_and_run_refuse_a_token_url_that_is_the_gateway_itself() {
    let (port, admin) = (common::free_port(), common::free_port());
    let dir = common::temp_dir("cli-token-url");
    let token_file = dir.join("token.json");
    for (url, says) in [
        (
            format!("http://127.0.0.1:{port}/oauth/access_token/"),
            "server.listen",
        ),
        (
            format!("http://localhost:{admin}/oauth/access_token/"),
            "server.admin_listen",
        ),
    ] {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [upstream]\nbase_url = \"https://api.engagor.com\"\n\
             [token]\nfile = \"{}\"\n\
             [token.oauth]\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret_env = \"CXGATE_TEST_SECRET\"\n",
            token_file.display()
        );
        for command in ["check", "run"] {
            let (code, stderr) = exit_of(command, &config, &[("CXGATE_TEST_SECRET", "s")]);
            assert!(
                code == Some(2)
                    && stderr.lines().count() == 1
                    && stderr.starts_with("token.oauth.token_url:")
                    && stderr.contains(says)
                    && stderr.contains("gateway itself"),
                "{url}: expected `{command}` to exit 2 with one line naming \
                 token.oauth.token_url and {says:?}, saw {code:?}:\n{stderr}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cxgate check` prints what `run` warns about an environment token on loading it (one
/// that cannot be sent upstream), and still accepts the file, as `run` starts on it.
#[test]
fn check_prints_the_warnings_run_logs_for_an_environment_token() {
    let (port, admin) = (common::free_port(), common::free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         [upstream]\nbase_url = \"https://api.engagor.com\"\n\
         [token]\naccess_token_env = \"CXGATE_TEST_TOKEN\"\n"
    );
    let (code, stderr) = exit_of("check", &config, &[("CXGATE_TEST_TOKEN", "has a space")]);
    assert!(
        code == Some(0)
            && stderr.contains("warning: token.access_token_env:")
            && stderr.contains("$CXGATE_TEST_TOKEN")
            && stderr.contains("cannot be sent upstream"),
        "expected check to pass with a warning about the token in $CXGATE_TEST_TOKEN, saw \
         {code:?}:\n{stderr}"
    );
    let (code, stderr) = exit_of("check", &config, &[("CXGATE_TEST_TOKEN", "sendable-token")]);
    assert!(
        code == Some(0) && !stderr.contains("warning"),
        "expected no warning for a sendable token, saw {code:?}:\n{stderr}"
    );
}
