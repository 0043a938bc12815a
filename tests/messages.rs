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
fn check_names_each_unset_environment_variable_and_summarises_in_the_files_spelling() {
    let path = config(
        "msg-env",
        "[upstream]
base_url = \"https://api.engagor.com\"
[server]
admin_token_env = \"CXGATE_MSG_UNSET_ADMIN\"
[token]
file = \"/var/lib/cxgate/token.json\"
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
",
    );
    let out = cxgate(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, _) = text(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected a valid file, saw {out:?}"
    );
    for line in [
        "  server.admin_token_env: $CXGATE_MSG_UNSET_ADMIN is not set",
        "  token.oauth.client_secret_env: $CXGATE_MSG_UNSET_SECRET is not set",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "expected {line:?} in check's output, saw:\n{stdout}"
        );
    }
    assert!(
        !stdout.lines().any(|l| l.ends_with(": valid")),
        "expected no bare \"valid\" while variables are unset, saw:\n{stdout}"
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

    let set = cxgate(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("CXGATE_MSG_UNSET_ADMIN", "x"),
            ("CXGATE_MSG_UNSET_SECRET", "y"),
        ],
    );
    let (stdout, _) = text(&set);
    assert!(
        stdout.lines().next() == Some(&format!("{}: valid", path.display())),
        "expected a plain \"valid\" once every variable is set, saw:\n{stdout}"
    );
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
    let out = cxgate(&["run", "--config", path.to_str().unwrap()], &[]);
    let (_, err) = text(&out);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, saw {out:?}");
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
