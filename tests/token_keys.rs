//! A client's gateway key never travels upstream inside a token either: an access token
//! (sent as `Authorization`) or a refresh token (sent to the OAuth endpoint) that holds a
//! key, whole or in any spelling the request side's scan finds (`KEY.x`, `x=KEY`,
//! `Bearer%20KEY`, percent-encoded), is refused from the token file at start, by `cxgate
//! check` and on reload, from `cxgate token init` (the environment or an authorisation
//! code's answer) and from a refresh's answer; the upstream never sees it. A key a client
//! has authenticated with is also found in its base64 and hex spellings. The shared
//! Redis record is covered in `token_repair.rs`.
//! The tests take a lock: they set the `CX_*` variables `token init` reads.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use common::{static_upstream, taken, Log, Reply, CLIENT_SECRET, KEY, ROUTES, SECRET_ENV};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The CX Social tokens the tests hold when all is well.
const GOOD: &str = "cx-access-0001";
const GOOD_REFRESH: &str = "cx-refresh-0001";

/// Tokens holding [`KEY`] in the spellings the outside attack sent.
fn holding_the_key() -> Vec<String> {
    let percent: String = KEY.bytes().map(|b| format!("%{b:02X}")).collect();
    vec![
        format!("{KEY}.x"),
        format!("x={KEY}"),
        format!("Bearer%20{KEY}"),
        percent,
        format!("eyJhbGciOi.{}.sig", KEY.replace('-', "%2D")),
    ]
}

/// A directory with a config naming `base` as the upstream and `token_url` as the OAuth
/// endpoint (refresh one hour before expiry), the [`KEY`] client, and a token file.
fn setup(tag: &str, base: &str, token_url: &str) -> (PathBuf, PathBuf) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    let dir = common::temp_dir(tag);
    let token_file = dir.join("token.json");
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"1s\"\n\
         [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
         [token]\nfile = \"{}\"\nrefresh_before = \"1h\"\n\
         [token.oauth]\ntoken_url = \"{token_url}\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
         {clients}\n{ROUTES}\n{}",
        token_file.display(),
        common::BIG_BUDGET
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, text).expect("write config");
    (path, token_file)
}

fn write_token(path: &Path, access: &str, refresh: &str, ttl: Duration) {
    cxgate::demo::write_token_file(path, access, refresh, ttl).expect("write token file");
}

fn file_access(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("token file");
    let value: serde_json::Value = serde_json::from_str(&text).expect("token file JSON");
    value["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Every `Authorization` the upstream saw; none may hold the key.
fn assert_key_never_sent(seen: &Log, what: &str) -> usize {
    let got = taken(seen);
    for request in &got {
        let auth = request
            .headers
            .get("authorization")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        assert_eq!(
            auth,
            format!("Bearer {GOOD}"),
            "{what}: expected only the CX Social token upstream, saw {auth:?}"
        );
    }
    got.len()
}

async fn send(method: Method, url: String) -> (StatusCode, String) {
    let http = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .expect("expected an answer within 10 s")
        .expect("expected the gateway to answer");
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Runs `cxgate token init` with `access` and `refresh` in the environment.
async fn token_init_from_env(
    config: &Path,
    access: &str,
    refresh: &str,
) -> Result<PathBuf, cxgate::StartError> {
    let cfg = cxgate::config::load(config).expect("config");
    std::env::set_var("CX_ACCESS_TOKEN", access);
    std::env::set_var("CX_REFRESH_TOKEN", refresh);
    let written = cxgate::token_init(&cfg, None, None).await;
    for name in ["CX_ACCESS_TOKEN", "CX_REFRESH_TOKEN"] {
        std::env::remove_var(name);
    }
    written
}

fn says_gateway_key<T>(outcome: &Result<T, cxgate::StartError>) -> bool {
    outcome
        .as_ref()
        .err()
        .is_some_and(|e| e.to_string().contains("gateway key"))
}

/// The token file, at start and in `cxgate check`: each token holding the key (as the
/// access or the refresh token) stops the gateway from starting and fails the check,
/// saying why; a running gateway's reload of such a file is refused and it goes on with
/// the token it held, which is all the upstream ever sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_holding_a_key_is_refused_at_start_check_and_reload() {
    let _one = SERIAL.lock().await;
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let oauth = format!("{base}/oauth/access_token/");
    let (config, token_file) = setup("token-keys-file", &base, &oauth);
    let hour = Duration::from_secs(3600);
    let mut files: Vec<(String, String)> = holding_the_key()
        .into_iter()
        .map(|t| (t, GOOD_REFRESH.to_string()))
        .collect();
    files.push((GOOD.to_string(), KEY.to_string()));
    files.push((GOOD.to_string(), format!("r.{KEY}")));
    for (access, refresh) in &files {
        write_token(&token_file, access, refresh, hour);
        let cfg = cxgate::config::load(&config).expect("config");
        let (problems, _) = cxgate::app::reload::preflight(&cfg, &cxgate::Secrets::from_env(&cfg));
        assert!(
            problems.iter().any(|p| p.contains("gateway key")),
            "access {access:?}, refresh {refresh:?}: expected check to name the gateway key, \
             saw {problems:?}"
        );
        let started = cxgate::start(cfg, Some(config.clone()), cxgate::Options::default()).await;
        assert!(
            says_gateway_key(&started),
            "access {access:?}, refresh {refresh:?}: expected the start refused for the \
             gateway key, saw {:?}",
            started.as_ref().err().map(ToString::to_string)
        );
        if let Ok(running) = started {
            running.shutdown();
            running.stopped().await;
        }
    }
    assert_eq!(taken(&seen).len(), 0, "expected nothing sent upstream");

    write_token(&token_file, GOOD, GOOD_REFRESH, hour * 2);
    let cfg = cxgate::config::load(&config).expect("config");
    let running = cxgate::start(cfg, Some(config.clone()), cxgate::Options::default())
        .await
        .expect("the gateway starts on a clean token");
    for (i, (access, refresh)) in files.iter().enumerate() {
        write_token(&token_file, access, refresh, hour * 2);
        let (status, body) = send(
            Method::POST,
            format!("http://{}/admin/reload", running.admin_addr),
        )
        .await;
        assert!(
            status == StatusCode::OK && body.contains("gateway key"),
            "access {access:?}, refresh {refresh:?}: expected the reload to name the gateway \
             key, saw {status} {body}"
        );
        let (status, body) = send(
            Method::GET,
            format!("http://{}/12345/inbox/contact/twitter/k{i}", running.addr),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "expected the gateway serving on the token it held, saw {body}"
        );
    }
    // The file is polled too: give the refresher its look at the last bad file.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, _) = send(
        Method::GET,
        format!("http://{}/12345/inbox/contact/twitter/last", running.addr),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "expected the gateway still serving");
    let sent = assert_key_never_sent(&seen, "after the reloads");
    assert!(
        sent >= files.len(),
        "expected each call forwarded, saw {sent}"
    );
    running.shutdown();
    running.stopped().await;
    upstream.abort();
    let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
}

/// `cxgate token init` writes no token holding the key: not from the environment (as the
/// access or the refresh token), not from an authorisation code's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_init_refuses_a_key_inside_either_token_or_a_codes_answer() {
    let _one = SERIAL.lock().await;
    let answers = [
        serde_json::json!({"access_token": format!("{KEY}.x"), "refresh_token": GOOD_REFRESH,
                           "expires_in": 3600}),
        serde_json::json!({"access_token": GOOD, "refresh_token": format!("x={KEY}"),
                           "expires_in": 3600}),
    ];
    for (i, answer) in answers.iter().enumerate() {
        let (oauth, log, endpoint) = static_upstream(Reply::json(&answer.to_string())).await;
        let (config, token_file) =
            setup(&format!("token-keys-init{i}"), "http://127.0.0.1:9", &oauth);
        if i == 0 {
            let mut cases: Vec<(String, String)> = holding_the_key()
                .into_iter()
                .map(|t| (t, GOOD_REFRESH.to_string()))
                .collect();
            cases.push((GOOD.to_string(), KEY.to_string()));
            cases.push((GOOD.to_string(), format!("Bearer%20{KEY}")));
            for (access, refresh) in cases {
                let written = token_init_from_env(&config, &access, &refresh).await;
                assert!(
                    says_gateway_key(&written),
                    "access {access:?}, refresh {refresh:?}: expected token init refused for \
                     the gateway key, saw {written:?}"
                );
                assert!(!token_file.exists(), "expected no token file written");
            }
            let written = token_init_from_env(&config, GOOD, GOOD_REFRESH).await;
            assert!(
                written.is_ok(),
                "expected clean tokens written, saw {written:?}"
            );
            std::fs::remove_file(&token_file).expect("remove the token file");
        }
        let cfg = cxgate::config::load(&config).expect("config");
        let written = cxgate::token_init(&cfg, Some("code-1"), None).await;
        assert!(
            says_gateway_key(&written),
            "answer {answer}: expected the code's answer refused for the gateway key, saw \
             {written:?}"
        );
        assert!(
            !token_file.exists(),
            "answer {answer}: expected no token file written"
        );
        assert_eq!(taken(&log).len(), 1, "expected the code exchanged once");
        endpoint.abort();
        let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
    }
}

/// A refresh whose answer holds the key (as the access or the refresh token) is not taken:
/// the token file keeps the token held, and the upstream only ever sees that one (a call
/// after the held token expired is answered 503 without one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_holding_a_key_is_not_taken() {
    let _one = SERIAL.lock().await;
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let answers = [
        serde_json::json!({"access_token": format!("Bearer%20{KEY}"), "refresh_token": "r2",
                           "expires_in": 7200}),
        serde_json::json!({"access_token": "cx-access-0002", "refresh_token": KEY,
                           "expires_in": 7200}),
    ];
    for (i, answer) in answers.iter().enumerate() {
        let (oauth, log, endpoint) = static_upstream(Reply::json(&answer.to_string())).await;
        let (config, token_file) = setup(&format!("token-keys-refresh{i}"), &base, &oauth);
        // A token of 4 s is refreshed half its life ahead: 2 s from now.
        write_token(&token_file, GOOD, GOOD_REFRESH, Duration::from_secs(4));
        let cfg = cxgate::config::load(&config).expect("config");
        let running = cxgate::start(cfg, Some(config.clone()), cxgate::Options::default())
            .await
            .expect("the gateway starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.lock().expect("log").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !taken(&log).is_empty(),
            "answer {answer}: expected the refresher to ask the endpoint"
        );
        // A moment for the answer to be taken, were it taken.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = send(
            Method::GET,
            format!("http://{}/12345/inbox/contact/twitter/r{i}", running.addr),
        )
        .await;
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "answer {answer}: expected the gateway serving on the token it held (or 503 once \
             it expired), saw {status} {body}"
        );
        assert_eq!(
            file_access(&token_file),
            GOOD,
            "answer {answer}: expected the token file to keep the token held"
        );
        assert_key_never_sent(&seen, &format!("answer {answer}"));
        running.shutdown();
        running.stopped().await;
        endpoint.abort();
        let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
    }
    upstream.abort();
}

/// The tokens holding [`KEY`] only in the spellings a request's scan decodes once the key
/// is known in full (it authenticated): base64 and hex. Each was taken before from the
/// token file on reload and from a refresh's answer, and sent upstream as the bearer.
fn spelling_the_key() -> Vec<String> {
    vec![
        common::spellings::base64(KEY),
        common::spellings::hex(KEY),
        common::spellings::hex(KEY).to_uppercase(),
        format!("x.{}", common::spellings::base64(KEY).trim_end_matches('=')),
    ]
}

/// Once the key has authenticated, a token file rewritten to hold it in base64 or hex (as
/// the access or the refresh token) is refused on reload as one holding the key itself,
/// and the upstream only ever sees the token held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_file_spelling_a_proven_key_is_refused_on_reload() {
    let _one = SERIAL.lock().await;
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let oauth = format!("{base}/oauth/access_token/");
    let (config, token_file) = setup("token-keys-spelled", &base, &oauth);
    let hours = Duration::from_secs(7200);
    write_token(&token_file, GOOD, GOOD_REFRESH, hours);
    let cfg = cxgate::config::load(&config).expect("config");
    let running = cxgate::start(cfg, Some(config.clone()), cxgate::Options::default())
        .await
        .expect("the gateway starts on a clean token");
    let (status, _) = send(Method::GET, format!("http://{}/me", running.addr)).await;
    assert_eq!(status, StatusCode::OK, "expected the key to authenticate");
    let mut files: Vec<(String, String)> = spelling_the_key()
        .into_iter()
        .map(|t| (t, GOOD_REFRESH.to_string()))
        .collect();
    files.push((GOOD.to_string(), common::spellings::base64(KEY)));
    for (i, (access, refresh)) in files.iter().enumerate() {
        write_token(&token_file, access, refresh, hours);
        let (status, body) = send(
            Method::POST,
            format!("http://{}/admin/reload", running.admin_addr),
        )
        .await;
        assert!(
            status == StatusCode::OK && body.contains("gateway key"),
            "access {access:?}, refresh {refresh:?}: expected the reload to name the gateway \
             key, saw {status} {body}"
        );
        let (status, body) = send(
            Method::GET,
            format!("http://{}/12345/inbox/contact/twitter/s{i}", running.addr),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "expected the gateway serving on the token it held, saw {body}"
        );
    }
    let sent = assert_key_never_sent(&seen, "after the reloads");
    assert!(
        sent > files.len(),
        "expected each call forwarded, saw {sent}"
    );
    running.shutdown();
    running.stopped().await;
    upstream.abort();
    let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
}

/// After the key authenticated, an upstream 401 makes the gateway refresh; an answer
/// whose access or refresh token spells the key in base64 or hex is not taken: the token
/// file keeps the token held, and no call upstream carries the key's spelling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_answer_spelling_a_proven_key_is_not_taken() {
    let _one = SERIAL.lock().await;
    let script: common::Script = std::sync::Arc::new(|seen: &common::Seen| {
        if seen.target.contains("force401") {
            Reply::json(r#"{"meta":{"code":401,"error_type":"invalid_token"}}"#).status(401)
        } else {
            Reply::ok()
        }
    });
    let (base, seen, upstream) = common::scripted_upstream(script).await;
    let spelled = common::spellings::base64(KEY);
    let answers = [
        serde_json::json!({"access_token": spelled, "refresh_token": "r2", "expires_in": 7200}),
        serde_json::json!({"access_token": common::spellings::hex(KEY), "refresh_token": "r2",
                           "expires_in": 7200}),
        serde_json::json!({"access_token": "cx-access-0002", "refresh_token": spelled,
                           "expires_in": 7200}),
    ];
    for (i, answer) in answers.iter().enumerate() {
        let (oauth, log, endpoint) = static_upstream(Reply::json(&answer.to_string())).await;
        let (config, token_file) = setup(&format!("token-keys-spelled-refresh{i}"), &base, &oauth);
        write_token(&token_file, GOOD, GOOD_REFRESH, Duration::from_secs(7200));
        let cfg = cxgate::config::load(&config).expect("config");
        let running = cxgate::start(cfg, Some(config.clone()), cxgate::Options::default())
            .await
            .expect("the gateway starts");
        let (status, _) = send(Method::GET, format!("http://{}/me", running.addr)).await;
        assert_eq!(status, StatusCode::OK, "expected the key to authenticate");
        let _ = send(
            Method::GET,
            format!("http://{}/12345/force401/{i}", running.addr),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.lock().expect("log").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !taken(&log).is_empty(),
            "answer {answer}: expected the 401 to make the gateway refresh"
        );
        // A moment for the answer to be taken, were it taken.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, body) = send(
            Method::GET,
            format!(
                "http://{}/12345/inbox/contact/twitter/after{i}",
                running.addr
            ),
        )
        .await;
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "answer {answer}: expected the gateway serving on the token it held (or 503 \
             without one), saw {status} {body}"
        );
        assert_eq!(
            file_access(&token_file),
            GOOD,
            "answer {answer}: expected the token file to keep the token held"
        );
        assert_key_never_sent(&seen, &format!("answer {answer}"));
        running.shutdown();
        running.stopped().await;
        endpoint.abort();
        let _ = std::fs::remove_dir_all(config.parent().expect("dir"));
    }
    upstream.abort();
}
