//! What the real binary says when something is wrong, and that it says what to do: config
//! problems in the file's own words, unset environment variables, a missing token file, a
//! busy port; and the simulator's fault JSON taking its flags' names.
mod common;

use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cxgate");

fn cxgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // `run` must not outlive a test that expected it to refuse: bounded by `timeout`.
    cmd.output().expect("run cxgate")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A config file in a fresh directory; returns its path.
fn config(tag: &str, body: &str) -> std::path::PathBuf {
    let dir = common::temp_dir(tag);
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, body).expect("write config");
    path
}

const BASE: &str = r#"
[upstream]
base_url = "https://api.engagor.com"
[token]
access_token_env = "CXGATE_MSG_TEST_TOKEN"
"#;

#[test]
fn check_speaks_the_files_language_and_reports_each_problem_once() {
    let path = config(
        "msg-check",
        &format!(
            "{BASE}
[budget]
limit = \"lots\"
[[routes]]
match = \"FETCH /me\"
ttl = \"10m\"
[[routes]]
match = \"GET /x\"
ttl = \"10 parsecs\"
stale_if_error = \"1h\"
"
        ),
    );
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, saw {out:?}");
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.contains(&"budget.limit: expected a whole number, found the string \"lots\""),
        "expected the type problem in plain words, saw:\n{err}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("routes[0].match: unknown method \"FETCH\"")),
        "expected FETCH named as an unknown method, saw:\n{err}"
    );
    assert!(
        !lines.iter().any(|l| l.starts_with("routes[0].ttl")),
        "expected no ttl problem for a route whose method is unknown, saw:\n{err}"
    );
    let route1: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("routes[1]"))
        .collect();
    assert!(
        route1.len() == 1 && route1[0].starts_with("routes[1].ttl: invalid duration"),
        "expected one line for the bad ttl, saw {route1:?}"
    );
}

#[test]
fn a_toml_syntax_error_names_the_file_and_line() {
    let path = config("msg-syntax", "[upstream\nbase_url = 1\n");
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, saw {out:?}");
    assert!(
        err.starts_with(&format!("{}:1: ", path.display())),
        "expected FILE:LINE: first, saw:\n{err}"
    );
}

#[test]
fn check_refuses_each_unset_environment_variable_and_summarises_in_the_files_spelling() {
    // check refuses a missing token file as run does: this one exists.
    let token = common::temp_dir("msg-env-token").join("token.json");
    cxgate::demo::write_token_file(&token, "a", "r", std::time::Duration::from_secs(3600))
        .expect("token file");
    let path = config(
        "msg-env",
        &"[upstream]
base_url = \"https://api.engagor.com\"
[server]
listen = \"127.0.0.1:0\"
admin_listen = \"127.0.0.1:0\"
admin_token_env = \"CXGATE_MSG_UNSET_ADMIN\"
[token]
file = \"TOKEN_FILE\"
[token.oauth]
token_url = \"https://app.engagor.com/oauth/access_token/\"
client_id = \"abc\"
client_secret_env = \"CXGATE_MSG_UNSET_SECRET\"
[[clients]]
name = \"nightly\"
key_sha256 = \"c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c\"
priority = \"batch\"
[[routes]]
match = \"GET /me\"
ttl = \"10m\"
"
        .replace("TOKEN_FILE", token.to_str().unwrap()),
    );
    // `run` refuses to start without them, so `check` refuses too: exit 2, a line each.
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, err) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected the unset variables refused, saw {out:?}"
    );
    for line in [
        "server.admin_token_env: $CXGATE_MSG_UNSET_ADMIN is not set",
        "token.oauth.client_secret_env: $CXGATE_MSG_UNSET_SECRET is not set",
    ] {
        assert!(
            err.lines().any(|l| l == line),
            "expected {line:?} in check's errors, saw:\n{err}"
        );
    }
    assert!(
        !stdout.lines().any(|l| l.ends_with(": valid")),
        "expected no \"valid\" while variables are unset, saw:\n{stdout}"
    );

    let set = cxgate(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("CXGATE_MSG_UNSET_ADMIN", "x"),
            ("CXGATE_MSG_UNSET_SECRET", "y"),
        ],
    );
    let (stdout, _) = text(&set);
    assert!(
        set.status.code() == Some(0)
            && stdout.lines().next() == Some(&format!("{}: valid", path.display())),
        "expected a plain \"valid\" once every variable is set, saw {set:?}:\n{stdout}"
    );
    for spelled in ["backend=local", "priority=batch", "ttl=10m", "swr=0s"] {
        assert!(
            stdout.contains(spelled),
            "expected the summary to say {spelled:?}, saw:\n{stdout}"
        );
    }
    for rust in ["Local", "Batch", "0ns", "600s"] {
        assert!(
            !stdout.contains(rust),
            "expected no Rust spelling {rust:?} in the summary, saw:\n{stdout}"
        );
    }
}

#[test]
fn a_missing_token_file_says_to_run_token_init() {
    let dir = common::temp_dir("msg-token");
    let path = dir.join("cxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"https://api.engagor.com\"\n\
             [token]\nfile = \"{}\"\n",
            dir.join("absent.json").display()
        ),
    )
    .expect("write config");
    // `check` refuses it as an invalid configuration, so `run` exits 2 as well.
    let out = cxgate(&["run", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, saw {out:?}");
    assert!(
        err.contains("absent.json") && err.contains("cxgate token init --config"),
        "expected the missing file named and `cxgate token init` suggested, saw:\n{err}"
    );
}

#[test]
fn a_busy_port_names_the_setting_and_the_flag() {
    let dir = common::temp_dir("msg-port");
    let busy = std::net::TcpListener::bind("127.0.0.1:0").expect("hold a port");
    let port = busy.local_addr().expect("addr").port();
    let token = dir.join("token.json");
    cxgate::demo::write_token_file(&token, "a", "r", std::time::Duration::from_secs(3600))
        .expect("token file");
    let path = dir.join("cxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:{port}\"\n\
             [upstream]\nbase_url = \"https://api.engagor.com\"\n\
             [token]\nfile = \"{}\"\n",
            token.display()
        ),
    )
    .expect("write config");
    let out = cxgate(&["run", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, saw {out:?}");
    assert!(
        err.contains(&format!("127.0.0.1:{port}"))
            && err.contains("server.admin_listen")
            && err.contains("--admin-listen"),
        "expected the busy address, its config key and the demo flag named, saw:\n{err}"
    );
    drop(busy);

    let help = cxgate(&["demo", "--help"], &[]);
    let (stdout, _) = text(&help);
    assert!(
        stdout.contains("Address for client traffic")
            && stdout.contains("Address for the status page"),
        "expected help text for --listen and --admin-listen, saw:\n{stdout}"
    );
}

#[tokio::test]
async fn the_simulators_fault_json_takes_the_flags_names() {
    let sim = common::spawn_sim(cxgate::sim::SimOptions::default()).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let body =
        r#"{"latency": "300ms", "jitter": "1s", "slow_body": 40, "fault_path_prefix": "/12345/"}"#;
    let req = http::Request::post(format!("{}/_sim/faults", sim.base_url()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let resp = client.request(req).await.expect("sim answers");
    let status = resp.status();
    let got = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(
        status,
        http::StatusCode::OK,
        "expected the flags' spellings accepted, saw {status} {:?}",
        String::from_utf8_lossy(&got)
    );
    let req = http::Request::get(format!("{}/_sim/faults", sim.base_url()))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("sim answers");
    let set: serde_json::Value = serde_json::from_slice(
        &http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body")
            .to_bytes(),
    )
    .expect("JSON");
    assert_eq!(
        (
            &set["latency_ms"],
            &set["jitter_ms"],
            &set["slow_body_ms"],
            &set["path_prefix"]
        ),
        (
            &serde_json::json!(300),
            &serde_json::json!(1000),
            &serde_json::json!(40),
            &serde_json::json!("/12345/")
        ),
        "expected the faults in force as set, saw {set}"
    );
    sim.shutdown().await;
}

#[test]
fn token_init_makes_the_token_files_private_directory() {
    let dir = common::temp_dir("msg-init");
    let token = dir.join("var/lib/cxgate/token.json");
    let path = dir.join("cxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"https://api.engagor.com\"\n[token]\nfile = \"{}\"\n",
            token.display()
        ),
    )
    .expect("write config");
    let out = cxgate(
        &["token", "init", "--config", path.to_str().unwrap()],
        &[
            ("CX_ACCESS_TOKEN", "init-access"),
            ("CX_EXPIRES_IN", "3600"),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected token init to make the missing directory, saw {out:?}"
    );
    let record = std::fs::read_to_string(&token).expect("token file written");
    assert!(
        record.contains("init-access"),
        "expected the token stored, saw {record}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(token.parent().unwrap())
            .expect("directory")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "expected a private directory, saw {mode:o}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check`'s problem lines (stderr) for a config body added to `BASE`.
fn check_problems(tag: &str, extra: &str) -> (Option<i32>, Vec<String>) {
    let path = config(tag, &format!("{BASE}{extra}"));
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    (out.status.code(), err.lines().map(str::to_string).collect())
}

fn has(lines: &[String], start: &str, contains: &str) -> bool {
    lines
        .iter()
        .any(|l| l.starts_with(start) && l.contains(contains))
}

#[test]
fn check_refuses_a_missing_token_file_as_run_does() {
    let dir = common::temp_dir("msg-check-token");
    let path = dir.join("cxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"https://api.engagor.com\"\n[token]\nfile = \"{}\"\n",
            dir.join("absent.json").display()
        ),
    )
    .expect("write config");
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, saw {out:?}");
    assert!(
        err.contains("token.file")
            && err.contains("absent.json")
            && err.contains("cxgate token init --config"),
        "expected the missing file named with the `cxgate token init` hint, saw:\n{err}"
    );
    assert!(
        !stdout.contains("valid"),
        "expected no \"valid\", saw:\n{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_refuses_what_could_never_work() {
    // One listener port for both, a route matching a query string, a password in the URL.
    let (code, lines) = check_problems(
        "msg-never",
        "[server]\nlisten = \"127.0.0.1:8181\"\nadmin_listen = \"127.0.0.1:8181\"\n\
         [[routes]]\nmatch = \"GET /me?x=1\"\nttl = \"1m\"\n",
    );
    assert_eq!(code, Some(2), "expected exit 2, saw {lines:#?}");
    assert!(
        has(&lines, "server.admin_listen:", "server.listen"),
        "expected the shared port refused naming both keys, saw {lines:#?}"
    );
    assert!(
        has(&lines, "routes[0].match:", "paths only"),
        "expected a route with a query refused, saw {lines:#?}"
    );
    assert_eq!(
        lines.len(),
        2,
        "expected one line per problem, saw {lines:#?}"
    );

    let path = config(
        "msg-userinfo",
        "[upstream]\nbase_url = \"http://user:hunter2@127.0.0.1:1\"\n\
         [token]\naccess_token_env = \"CXGATE_MSG_TEST_TOKEN\"\n",
    );
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, err) = text(&out);
    assert_eq!(out.status.code(), Some(2), "expected exit 2, saw {out:?}");
    assert!(
        err.starts_with("upstream.base_url:") && err.contains("user or password"),
        "expected credentials in base_url refused, saw:\n{err}"
    );
    assert!(
        !stdout.contains("hunter2") && !err.contains("hunter2"),
        "expected the password never printed, saw:\n{stdout}{err}"
    );
}

/// A base URL the parser would take while dropping part of it: a fragment (every request
/// then went to the base's root, cached under each client's path) or a port past 65535
/// (every request a 502).
#[test]
fn check_refuses_a_base_url_with_a_fragment_or_an_impossible_port() {
    for (name, base, said) in [
        (
            "msg-base-fragment",
            "http://127.0.0.1:32001#frag",
            "fragment",
        ),
        ("msg-base-port", "http://127.0.0.1:99999", "invalid port"),
    ] {
        let path = config(
            name,
            &format!(
                "[upstream]\nbase_url = \"{base}\"\n\
                 [token]\naccess_token_env = \"CXGATE_MSG_TEST_TOKEN\"\n"
            ),
        );
        let out = cxgate(
            &["check", "--config", path.to_str().unwrap()],
            &[("CXGATE_MSG_TEST_TOKEN", "upstream-token")],
        );
        let (_, err) = text(&out);
        assert_eq!(
            out.status.code(),
            Some(2),
            "expected {base} refused, saw {out:?}"
        );
        assert_eq!(
            err.lines().count(),
            1,
            "expected the one problem, saw:\n{err}"
        );
        assert!(
            err.starts_with("upstream.base_url:") && err.contains(said),
            "expected {base} refused naming the {said}, saw:\n{err}"
        );
    }
}

#[test]
fn one_line_per_real_problem_in_the_files_words() {
    let key = "c48a01f49fd0f2cc404bc3cbbc80e91457a3d41bb429a695243de4c61794155c";
    let (code, lines) = check_problems(
        "msg-types",
        &format!(
            "[server]\nmax_body_bytes = 1.5\n\
             [[clients]]\nname = \"a\"\nkey_sha256 = \"{key}\"\nscopes = \"read\"\naccounts = [\"12345\"]\n"
        ),
    );
    assert_eq!(code, Some(2), "expected exit 2, saw {lines:#?}");
    assert!(
        !lines.iter().any(|l| l.starts_with("clients[0].key_sha256")),
        "expected no problem with the key that is present, saw {lines:#?}"
    );
    assert!(
        has(&lines, "clients[0].scopes:", "list")
            && has(&lines, "clients[0].accounts:", "whole number"),
        "expected the two wrong types named, saw {lines:#?}"
    );
    assert!(
        has(&lines, "server.max_body_bytes:", "2MiB")
            && !lines
                .iter()
                .any(|l| l.contains("untagged") || l.contains("variant")),
        "expected what a size may be said in the file's words, saw {lines:#?}"
    );
    assert_eq!(
        lines.len(),
        3,
        "expected one line per problem, saw {lines:#?}"
    );

    // Periods in messages as the file spells them.
    let (_, lines) = check_problems(
        "msg-period",
        &format!(
            "[budget]\nlimit = 5000\nperiod = \"1h\"\n\
             [[clients]]\nname = \"a\"\nkey_sha256 = \"{key}\"\nlimit = 100\nperiod = \"1m\"\n"
        ),
    );
    assert!(
        has(&lines, "clients[0].limit:", "100/1m") && has(&lines, "clients[0].limit:", "5000/1h"),
        "expected the file's own spellings, saw {lines:#?}"
    );

    // A duplicate key names the key.
    let path = config(
        "msg-dup",
        "[upstream]\nbase_url = \"https://api.engagor.com\"\nbase_url = \"https://x\"\n",
    );
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert!(
        err.contains("duplicate key") && err.contains("base_url"),
        "expected the duplicate key named, saw:\n{err}"
    );
}

#[test]
fn check_summary_spells_durations_and_sizes_compactly() {
    let path = config(
        "msg-spell",
        &format!(
            "{BASE}[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"2500ms\"\nidle_timeout = \"90s\"\nmax_body_bytes = \"2MiB\"\n\
             [[routes]]\nmatch = \"GET /me\"\nttl = \"1d\"\n"
        ),
    );
    let out = cxgate(
        &["check", "--config", path.to_str().unwrap()],
        &[("CXGATE_MSG_TEST_TOKEN", "t")],
    );
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0), "expected valid, saw {out:?}");
    for spelled in [
        "request_timeout=2500ms",
        "idle_timeout=90s",
        "max_body_bytes=2MiB",
        "ttl=1d",
    ] {
        assert!(
            stdout.contains(spelled),
            "expected {spelled:?} in the summary, saw:\n{stdout}"
        );
    }
    assert!(
        !stdout.contains("2s 500ms") && !stdout.contains("1m 30s"),
        "expected no spaced durations, saw:\n{stdout}"
    );
}

#[test]
fn a_closed_stdout_ends_quietly() {
    let path = config(
        "msg-pipe",
        &format!("{BASE}[[routes]]\nmatch = \"GET /me\"\nttl = \"1m\"\n"),
    );
    // The reader (`true`) is gone before cxgate writes: every write meets a closed pipe.
    for args in [
        format!("check --config '{}'", path.display()),
        "key hash".to_string(),
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "( sleep 0.3; echo some-key-for-the-pipe-test | \"$0\" {args}; echo \"exit=$?\" >&2 ) | true"
            ))
            .arg(BIN)
            .env("CXGATE_MSG_TEST_TOKEN", "t")
            .stdin(Stdio::null())
            .output()
            .expect("run sh");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("panicked") && (err.contains("exit=0") || err.contains("exit=2")),
            "expected `cxgate {args}` to end quietly on a closed stdout, saw:\n{err}"
        );
    }
}

#[tokio::test]
async fn token_init_with_a_used_code_says_the_code_was_refused() {
    let sim = common::spawn_sim(cxgate::sim::SimOptions::default()).await;
    let dir = common::temp_dir("msg-code");
    let path = dir.join("cxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[upstream]\nbase_url = \"{base}\"\n[token]\nfile = \"{}\"\n\
             [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\n\
             client_secret_env = \"CXGATE_MSG_CODE_SECRET\"\n",
            dir.join("token.json").display(),
            base = sim.base_url()
        ),
    )
    .expect("write config");
    let run = |code: &'static str| {
        let path = path.clone();
        tokio::task::spawn_blocking(move || {
            cxgate(
                &[
                    "token",
                    "init",
                    "--config",
                    path.to_str().unwrap(),
                    "--code",
                    code,
                ],
                &[("CXGATE_MSG_CODE_SECRET", "sim-secret")],
            )
        })
    };
    let first = run("sim-code").await.expect("join");
    assert_eq!(
        first.status.code(),
        Some(0),
        "expected the code exchanged, saw {first:?}"
    );
    let again = run("sim-code").await.expect("join");
    let (_, err) = text(&again);
    assert_eq!(
        again.status.code(),
        Some(1),
        "expected a refusal, saw {again:?}"
    );
    assert!(
        err.contains("authorisation code was refused")
            && !err.contains("refresh token")
            && err.contains("authorise again"),
        "expected the used code named with what to do, saw:\n{err}"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn admin_call(
    method: http::Method,
    url: &str,
) -> (http::StatusCode, http::HeaderMap, serde_json::Value) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("admin answers");
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .expect("body")
        .to_bytes();
    (
        parts.status,
        parts.headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn admin_wrong_methods_get_405_and_a_failed_reload_is_logged() {
    let dir = common::temp_dir("msg-admin");
    let token = dir.join("token.json");
    cxgate::demo::write_token_file(&token, "a", "r", std::time::Duration::from_secs(3600))
        .expect("token file");
    let admin_port = common::free_port();
    let path = dir.join("cxgate.toml");
    let good = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"\n",
        token.display()
    );
    std::fs::write(&path, &good).expect("write config");
    let proc = common::Proc::spawn(&["run", "--config", path.to_str().unwrap()], &dir);
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        if client
            .get(format!("{admin}/healthz").parse().expect("uri"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gateway did not start:\n{}",
            proc.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    for (method, endpoint, allow) in [
        (http::Method::GET, "/admin/purge", "POST"),
        (http::Method::GET, "/admin/reload", "POST"),
        (http::Method::PUT, "/admin/budget/resume", "POST"),
        (http::Method::POST, "/admin/status", "GET, HEAD"),
        (http::Method::POST, "/metrics", "GET, HEAD"),
        (http::Method::DELETE, "/healthz", "GET, HEAD"),
        (http::Method::PUT, "/readyz", "GET, HEAD"),
    ] {
        let (status, headers, body) =
            admin_call(method.clone(), &format!("{admin}{endpoint}")).await;
        assert_eq!(
            status,
            http::StatusCode::METHOD_NOT_ALLOWED,
            "expected 405 for {method} {endpoint}, saw {status} {body}"
        );
        assert_eq!(
            headers
                .get(http::header::ALLOW)
                .and_then(|v| v.to_str().ok()),
            Some(allow),
            "expected Allow: {allow} for {endpoint}"
        );
        assert!(
            body["error"] == "method_not_allowed" && body["error_description"].is_string(),
            "expected the error envelope, saw {body}"
        );
    }
    // HEAD works wherever GET does (RFC 9110 9.3.2): probes and scrapers send it.
    for endpoint in ["/healthz", "/readyz", "/metrics", "/admin/status"] {
        let (status, _, body) = admin_call(http::Method::HEAD, &format!("{admin}{endpoint}")).await;
        assert_eq!(
            status,
            http::StatusCode::OK,
            "expected 200 for HEAD {endpoint}, saw {status} {body}"
        );
        assert_eq!(body, serde_json::Value::Null, "HEAD {endpoint} sent a body");
    }
    let (status, _, _) = admin_call(http::Method::GET, &format!("{admin}/admin/nothing")).await;
    assert_eq!(
        status,
        http::StatusCode::NOT_FOUND,
        "an unknown path stays 404"
    );

    std::fs::write(&path, format!("{good}[budget]\nlimit = \"lots\"\n")).expect("break config");
    let (status, _, body) = admin_call(http::Method::POST, &format!("{admin}/admin/reload")).await;
    assert_eq!(status, http::StatusCode::BAD_REQUEST, "saw {body}");
    assert!(
        body["error"] == "bad_request" && body["error_description"].is_string(),
        "expected the error envelope on a refused reload, saw {body}"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !proc.output().contains("config invalid") {
        assert!(
            std::time::Instant::now() < deadline,
            "expected the refused reload in the log, saw:\n{}",
            proc.output()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let log = proc.output();
    assert!(
        log.contains("ERROR") && log.contains("budget.limit"),
        "expected an ERROR line naming the problem, saw:\n{log}"
    );
    drop(proc);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_shipped_example_keys_are_what_their_comments_say() {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml"),
    )
    .expect("read config/cxgate.toml");
    let lines: Vec<&str> = shipped.lines().collect();
    let hashes: Vec<(usize, &str)> = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let hex = l.strip_prefix("key_sha256 = \"")?.strip_suffix('"')?;
            Some((i, hex))
        })
        .collect();
    assert!(!hashes.is_empty(), "expected example clients in the file");
    let mut keys = Vec::new();
    for (i, hex) in hashes {
        let key = i
            .checked_sub(1)
            .and_then(|j| lines[j].strip_prefix("# example key: \""))
            .and_then(|k| k.strip_suffix('"'))
            .unwrap_or_else(|| panic!("expected `# example key: \"...\"` above line {}", i + 1));
        assert_eq!(
            cxgate::auth::sha256_hex(key.as_bytes()),
            hex,
            "expected line {} to be the hash of {key:?}",
            i + 1
        );
        assert!(key.len() >= 16, "expected a long example key, saw {key:?}");
        keys.push(key);
    }
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), 3, "expected three distinct example keys");

    let mut child = Command::new(BIN)
        .args(["key", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run key hash");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"1\n").expect("write key");
    }
    let out = child.wait_with_output().expect("key hash");
    let (stdout, err) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected the hash printed, saw {out:?}"
    );
    assert_eq!(stdout.trim(), cxgate::auth::sha256_hex(b"1"));
    assert!(
        err.contains("warning") && err.contains("16"),
        "expected a warning about a short key, saw:\n{err}"
    );
}

#[tokio::test]
async fn a_held_token_that_cannot_be_sent_is_named_in_status_and_on_the_page() {
    let dir = common::temp_dir("msg-unsendable");
    let token = dir.join("token.json");
    cxgate::demo::write_token_file(
        &token,
        "has a space",
        "r",
        std::time::Duration::from_secs(3600),
    )
    .expect("token file");
    let cfg = cxgate::config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"\n",
        token.display()
    ))
    .expect("valid config");
    let gw = cxgate::start(cfg, None, cxgate::Options::default())
        .await
        .expect("start gateway");
    let admin = format!("http://{}", gw.admin_addr);
    let (status, _, ready) = admin_call(http::Method::GET, &format!("{admin}/readyz")).await;
    assert_eq!(status, http::StatusCode::SERVICE_UNAVAILABLE, "saw {ready}");
    let (_, _, body) = admin_call(http::Method::GET, &format!("{admin}/admin/status")).await;
    let said = body["token"]["last_error"].as_str().unwrap_or_default();
    assert!(
        said.contains("cannot be sent") && body["token"]["usable"] == false,
        "expected the reason the token is unusable in /admin/status, saw {}",
        body["token"]
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .get(format!("{admin}/").parse().expect("uri"))
        .await
        .expect("page");
    let page = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let page = String::from_utf8_lossy(&page);
    assert!(
        page.contains("not usable: the access token cannot be sent upstream"),
        "expected the status page to say why the token is unusable"
    );
    assert!(
        !page.contains("has a space"),
        "the token itself is never shown"
    );
    gw.shutdown();
    gw.stopped().await;
    let _ = std::fs::remove_dir_all(&dir);
}
