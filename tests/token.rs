//! End-to-end checks of the upstream token (README: `token init`, `[token]`, the token stays inside, the admin listener
//! `/readyz`, 5 token metrics), driven through the gateway against the simulator: refresh
//! after revocation, rotation over time, a failing token endpoint, `invalid_grant`, the
//! `token init` command of the real binary, and that no token ever leaves the gateway.
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::{
    spawn_sim, temp_dir, Answer, Env, ACCESS, BIG_BUDGET, CLIENT_SECRET, KEY, REFRESH, ROUTES,
    SECRET_ENV,
};
use cxgate::sim::{Faults, Force401, Force429, SimOptions};

const BIN: &str = env!("CARGO_BIN_EXE_cxgate");

type Http = Client<HttpConnector, Full<Bytes>>;

fn http_client() -> Http {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A simulator counter from `/_sim/stats`.
fn stat(sim: &cxgate::sim::SimHandle, name: &str) -> u64 {
    sim.stats()[name].as_u64().unwrap_or(0)
}

/// The value of one exact series (`name{labels}`) in a Prometheus text page; 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(series)?;
            rest.starts_with(' ').then(|| rest.trim().parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Sends one request to any address and reads the whole answer.
async fn send(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .unwrap_or_else(|_| panic!("expected an answer from {url} within 10 s"))
        .unwrap_or_else(|e| panic!("expected an answer from {url}, saw {e}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Spends `refresh` at the simulator's token endpoint, as another holder of it would.
async fn spend_refresh(http: &Http, sim_base: &str, refresh: &str) -> Answer {
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "refresh_token")
        .append_pair("refresh_token", refresh)
        .append_pair("client_id", "sim-client")
        .append_pair("client_secret", CLIENT_SECRET)
        .finish();
    send(
        http,
        Method::POST,
        &format!("{sim_base}/oauth/access_token/"),
        &[("content-type", "application/x-www-form-urlencoded")],
        &form,
    )
    .await
}

/// The token file as the gateway left it.
#[derive(Debug, Clone, PartialEq)]
struct TokenFile {
    access: String,
    refresh: String,
    expires_at: SystemTime,
}

/// Reads the token file and checks its shape and its mode; Err says what was wrong.
fn read_token_file(path: &Path) -> Result<TokenFile, String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
        .permissions()
        .mode()
        & 0o777;
    if mode != 0o600 {
        return Err(format!("expected mode 0600, saw {mode:04o}"));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("expected JSON, saw error {e}"))?;
    let field = |name: &str| {
        value[name]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("expected a string {name}, saw {}", value[name]))
    };
    let expires_at = field("expires_at")?;
    let expires_at = humantime::parse_rfc3339(&expires_at)
        .map_err(|e| format!("expected an RFC 3339 expires_at, saw {expires_at:?}: {e}"))?;
    Ok(TokenFile {
        access: field("access_token")?,
        refresh: field("refresh_token")?,
        expires_at,
    })
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The next distinct (uncached) contact path.
fn contact(i: &mut u32) -> String {
    *i += 1;
    format!("/12345/inbox/contact/twitter/{i}")
}

// ---------------------------------------------------------------------------------------
// Refresh behaviour
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_requests_after_a_revocation_cost_exactly_one_refresh() {
    let env = Arc::new(common::start(SimOptions::default(), BIG_BUDGET).await);
    let warm = env.get("/me/permissions").await;
    assert_eq!(warm.status, 200, "expected the first request to work");
    assert!(
        env.sim.revoke_all() >= 1,
        "expected the simulator to revoke the held token"
    );
    let refreshes_before = stat(&env.sim, "token_refreshes");

    let mut requests = tokio::task::JoinSet::new();
    for i in 0..50 {
        let env = env.clone();
        // Distinct ids: 50 separate upstream calls, none merged, all with the revoked token.
        requests.spawn(async move {
            let a = env
                .get(&format!("/12345/inbox/contact/twitter/{}", 1000 + i))
                .await;
            (
                i,
                a.status.as_u16(),
                String::from_utf8_lossy(&a.body).into_owned(),
            )
        });
    }
    let mut failed = Vec::new();
    while let Some(done) = requests.join_next().await {
        let (i, status, body) = done.expect("request task");
        if status != 200 {
            failed.push(format!("#{i}: {status} {body}"));
        }
    }
    assert!(
        failed.is_empty(),
        "expected all 50 answers 200, saw {} others: {failed:?}",
        failed.len()
    );
    let refreshes = stat(&env.sim, "token_refreshes") - refreshes_before;
    assert_eq!(
        refreshes, 1,
        "expected exactly one refresh, saw {refreshes}"
    );
    let unauthorized = stat(&env.sim, "unauthorized");
    assert!(
        unauthorized >= 1,
        "expected the revoked token to have earned at least one upstream 401, saw {unauthorized}"
    );
    let reused = stat(&env.sim, "refresh_reuse_rejected");
    assert_eq!(
        reused, 0,
        "expected no refresh token presented twice, saw {reused}"
    );
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
}

#[tokio::test(start_paused = true)]
async fn tokens_rotate_before_expiry_and_the_file_keeps_the_latest_one() {
    let ttl = Duration::from_secs(3);
    let run = Duration::from_secs(7);
    let sim = SimOptions {
        token_ttl: ttl,
        ..SimOptions::default()
    };
    let env = common::start(sim, BIG_BUDGET).await;
    let path = env.dir.join("token.json");
    // The paused clock runs the seven seconds of token lifetimes without waiting for them.
    let started = tokio::time::Instant::now();
    let (mut failed, mut file_problems) = (Vec::new(), Vec::new());
    let mut refresh_tokens: Vec<String> = Vec::new();
    let mut i = 0u32;
    while started.elapsed() < run {
        let at = started.elapsed().as_secs_f64();
        let a = env.get(&format!("/12345/inbox/contact/twitter/{i}")).await;
        if a.status != 200 {
            failed.push(format!(
                "{at:.1} s: {} {}",
                a.status,
                String::from_utf8_lossy(&a.body)
            ));
        }
        match read_token_file(&path) {
            Ok(file) => {
                if refresh_tokens.last() != Some(&file.refresh) {
                    refresh_tokens.push(file.refresh);
                }
            }
            Err(e) => file_problems.push(format!("{at:.1} s: {e}")),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Env { sim, gw, dir, http } = env;
    gw.shutdown();
    gw.stopped().await;
    // A refresh already under way finishes in its own task; give it time to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = read_token_file(&path);

    assert!(
        failed.is_empty(),
        "expected every answer 200, saw {failed:?}"
    );
    assert!(
        file_problems.is_empty(),
        "expected the token file always valid, saw {file_problems:?}"
    );
    let reused = stat(&sim, "refresh_reuse_rejected");
    assert_eq!(
        reused, 0,
        "expected no refresh token presented twice, saw {reused}"
    );
    // At least one refresh per token lifetime (else a token would have expired), at most
    // one per (ttl - refresh_before) plus one, which is when the gateway renews.
    let refreshes = stat(&sim, "token_refreshes");
    assert!(
        (2..=5).contains(&refreshes),
        "expected 2 to 5 refreshes in {run:?} with {ttl:?} tokens refreshed 1 s ahead, saw {refreshes}"
    );
    let last = last.unwrap_or_else(|e| panic!("expected a valid token file at the end: {e}"));
    if refresh_tokens.last() != Some(&last.refresh) {
        refresh_tokens.push(last.refresh.clone());
    }
    assert_eq!(
        refresh_tokens.first().map(String::as_str),
        Some(REFRESH),
        "expected the file to start with the harness's refresh token"
    );
    assert_eq!(
        refresh_tokens.len() as u64,
        refreshes + 1,
        "expected the file to hold each of the {refreshes} refreshed tokens in turn, saw {} distinct",
        refresh_tokens.len()
    );
    // Every earlier refresh token was spent, so only the latest one still works.
    let exchange = spend_refresh(&http, &sim.base_url(), &last.refresh).await;
    assert_eq!(
        exchange.status,
        200,
        "expected the file's refresh token to be the latest, unspent one; the endpoint said {}",
        String::from_utf8_lossy(&exchange.body)
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn a_refresh_answered_503_keeps_the_valid_token_in_use_until_the_endpoint_recovers() {
    // Four-second tokens refreshed two seconds ahead: the first attempt comes at about half
    // the lifetime, leaving room for one failed attempt and a retry before expiry.
    let ttl = Duration::from_secs(4);
    let sim = SimOptions {
        token_ttl: ttl,
        faults: Faults {
            token_endpoint_down: true,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let env = common::start_refresh_before(sim, "2s", BIG_BUDGET).await;
    let started = tokio::time::Instant::now();
    let mut failed = Vec::new();
    let mut i = 0u32;

    // Phase 1: the endpoint is down; wait for the gateway's failed attempt.
    let error_series = "cxgate_token_refreshes_total{result=\"error\"}";
    loop {
        let a = env.get(&contact(&mut i)).await;
        if a.status != 200 {
            failed.push(format!(
                "{:.1} s (endpoint down): {}",
                started.elapsed().as_secs_f64(),
                a.status
            ));
        }
        if metric(&env.metrics().await, error_series) >= 1.0 {
            break;
        }
        assert!(
            started.elapsed() < ttl,
            "expected a failed refresh attempt before the token expired ({ttl:?}); none seen"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = env.get(&contact(&mut i)).await;
    assert_eq!(
        a.status,
        200,
        "expected the still valid token to keep serving after a failed refresh, saw {}",
        String::from_utf8_lossy(&a.body)
    );
    let ready = env
        .send(Method::GET, &env.admin_url("/readyz"), &[], "")
        .await;
    assert_eq!(
        ready.status,
        200,
        "expected ready while the token is still valid, saw {}",
        String::from_utf8_lossy(&ready.body)
    );
    assert_eq!(
        stat(&env.sim, "token_refreshes"),
        0,
        "expected no refresh granted while the endpoint is down"
    );

    // Phase 2: the endpoint recovers; the retry must succeed, then serve past the old expiry.
    env.sim.set_faults(Faults::default());
    let recovered_by = started.elapsed() + Duration::from_secs(2);
    while stat(&env.sim, "token_refreshes") == 0 {
        assert!(
            started.elapsed() < recovered_by,
            "expected a successful refresh within 2 s of the endpoint recovering; none"
        );
        let a = env.get(&contact(&mut i)).await;
        if a.status != 200 {
            failed.push(format!(
                "{:.1} s (recovering): {}",
                started.elapsed().as_secs_f64(),
                a.status
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    while started.elapsed() < ttl + Duration::from_millis(500) {
        let a = env.get(&contact(&mut i)).await;
        if a.status != 200 {
            failed.push(format!(
                "{:.1} s (recovered): {}",
                started.elapsed().as_secs_f64(),
                a.status
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed.is_empty(),
        "expected every answer 200, saw {failed:?}"
    );
    let ok = metric(
        &env.metrics().await,
        "cxgate_token_refreshes_total{result=\"ok\"}",
    );
    assert!(
        ok >= 1.0,
        "expected refreshes_total{{result=\"ok\"}} >= 1, saw {ok}"
    );
    let file = read_token_file(&env.dir.join("token.json"))
        .unwrap_or_else(|e| panic!("expected a valid token file: {e}"));
    assert_ne!(
        file.refresh, REFRESH,
        "expected the refreshed token in the file"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_makes_the_gateway_unready_and_asks_for_reauthorisation() {
    let env = common::start(SimOptions::default(), BIG_BUDGET).await;
    let first = env.get("/me/permissions").await;
    assert_eq!(first.status, 200, "expected the first request to work");
    // Someone else spends the gateway's refresh token; the gateway's next refresh is a reuse.
    let spent = spend_refresh(&env.http, &env.sim.base_url(), REFRESH).await;
    assert_eq!(
        spent.status, 200,
        "expected the simulator to accept the first use"
    );
    env.sim.revoke_all();
    let refused = env.get("/12345/inbox/contact/twitter/1").await;
    assert_ne!(
        refused.status, 200,
        "expected no 200 with a revoked token that cannot be renewed"
    );

    let ready = env
        .send(Method::GET, &env.admin_url("/readyz"), &[], "")
        .await;
    assert_eq!(
        ready.status,
        503,
        "expected /readyz 503 after invalid_grant, saw {} {}",
        ready.status,
        String::from_utf8_lossy(&ready.body)
    );
    let reason = ready.json()["reason"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        reason.contains("re-authoris") || reason.contains("reauthoris"),
        "expected the reason to ask for re-authorisation, saw {reason:?}"
    );
    let errors = metric(
        &env.metrics().await,
        "cxgate_token_refreshes_total{result=\"error\"}",
    );
    assert!(
        errors >= 1.0,
        "expected refreshes_total{{result=\"error\"}} >= 1, saw {errors}"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let needs = &status.json()["token"]["needs_reauthorisation"];
    assert_eq!(
        needs, true,
        "expected /admin/status to say re-authorisation is needed"
    );

    // A refused refresh token is not presented again and again.
    for i in 2..6 {
        env.get(&format!("/12345/inbox/contact/twitter/{i}")).await;
    }
    let reused = stat(&env.sim, "refresh_reuse_rejected");
    assert_eq!(
        reused, 1,
        "expected the spent refresh token presented once, saw {reused} attempts refused"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_answers_clients_503_token_unavailable_not_the_upstream_401() {
    let env = common::start(SimOptions::default(), BIG_BUDGET).await;
    let spent = spend_refresh(&env.http, &env.sim.base_url(), REFRESH).await;
    assert_eq!(
        spent.status, 200,
        "expected the simulator to accept the first use"
    );
    env.sim.revoke_all();
    let first = env.get("/12345/inbox/contact/twitter/1").await;
    let later = env.get("/12345/inbox/contact/twitter/2").await;
    for (what, a) in [
        ("the refusing request", &first),
        ("a later request", &later),
    ] {
        let body = String::from_utf8_lossy(&a.body);
        assert!(
            a.status == 503 && body.contains("token_unavailable"),
            "expected {what} to get 503 token_unavailable (see the README; a 401 tells a client \
             with a valid key that its key is bad), saw {} {body}",
            a.status
        );
    }
    env.stop().await;
}

// ---------------------------------------------------------------------------------------
// `cxgate token init`
// ---------------------------------------------------------------------------------------

async fn token_init(
    config: &Path,
    code: Option<&str>,
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["token", "init", "--config"]).arg(config);
    if let Some(code) = code {
        cmd.args(["--code", code]);
    }
    // Other tests of this binary put the client secret into the process environment.
    for name in [
        "CX_ACCESS_TOKEN",
        "CX_REFRESH_TOKEN",
        "CX_EXPIRES_IN",
        "CXGATE_CONFIG",
        "RUST_LOG",
        SECRET_ENV,
    ] {
        cmd.env_remove(name);
    }
    cmd.envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(5), cmd.output())
        .await
        .expect("expected cxgate token init to exit within 5 s")
        .expect("run cxgate token init")
}

/// A directory with a config whose `[token.oauth]` points at `sim`: (dir, token file, config).
fn code_config(sim: &cxgate::sim::SimHandle) -> (PathBuf, PathBuf, PathBuf) {
    let dir = temp_dir("token-code");
    let file = dir.join("token.json");
    let base = sim.base_url();
    let config = write_config(
        &dir,
        &format!(
            "[upstream]\nbase_url = \"{base}\"\n[token]\nfile = \"{}\"\n\
             [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\n\
             client_secret_env = \"{SECRET_ENV}\"\n",
            file.display()
        ),
    );
    (dir, file, config)
}

#[tokio::test]
async fn token_init_writes_the_file_from_the_environment() {
    let dir = temp_dir("token-init");
    let file = dir.join("state").join("token.json");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("state dir");
    let config = write_config(
        &dir,
        &format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\n[token]\nfile = \"{}\"\n",
            file.display()
        ),
    );
    let access = "env-access-TOKEN-1234";
    let refresh = "env-refresh-TOKEN-5678";
    let out = token_init(
        &config,
        None,
        &[
            ("CX_ACCESS_TOKEN", access),
            ("CX_REFRESH_TOKEN", refresh),
            ("CX_EXPIRES_IN", "3600"),
        ],
    )
    .await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected exit 0, saw {:?}; stdout {stdout} stderr {stderr}",
        out.status
    );
    let written =
        read_token_file(&file).unwrap_or_else(|e| panic!("expected a valid token file: {e}"));
    assert_eq!(
        written.access, access,
        "expected CX_ACCESS_TOKEN in the file"
    );
    assert_eq!(
        written.refresh, refresh,
        "expected CX_REFRESH_TOKEN in the file"
    );
    let left = written
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > Duration::from_secs(3590) && left <= Duration::from_secs(3600),
        "expected expires_at about an hour ahead, saw {left:?} left"
    );
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains(access) && !text.contains(refresh),
            "expected no token on {name}, saw {text}"
        );
    }

    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_init_exchanges_an_authorisation_code_for_the_simulators_tokens() {
    let sim = spawn_sim(SimOptions::default()).await;
    let (dir, file, config) = code_config(&sim);
    let base = sim.base_url();
    let secret = [(SECRET_ENV, "sim-secret")];
    let out = token_init(&config, Some("sim-code"), &secret).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected exit 0 for a good code, saw {:?}; stdout {stdout} stderr {stderr}",
        out.status
    );
    assert_eq!(
        stat(&sim, "token_grants"),
        1,
        "expected one authorisation-code grant at the simulator"
    );
    let written =
        read_token_file(&file).unwrap_or_else(|e| panic!("expected a valid token file: {e}"));
    let http = http_client();
    let bearer = format!("Bearer {}", written.access);
    let me = send(
        &http,
        Method::GET,
        &format!("{base}/me"),
        &[("authorization", &bearer)],
        "",
    )
    .await;
    assert_eq!(
        me.status, 200,
        "expected the written access token to be the simulator's, usable"
    );
    let exchange = spend_refresh(&http, &base, &written.refresh).await;
    assert_eq!(
        exchange.status, 200,
        "expected the written refresh token to be the simulator's"
    );
    for (name, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(
            !text.contains(&written.access)
                && !text.contains(&written.refresh)
                && !text.contains("sim-secret"),
            "expected no token or client secret on {name}, saw {text}"
        );
    }

    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_init_refusals_exit_1_with_a_clear_message() {
    let sim = spawn_sim(SimOptions::default()).await;
    let (dir, file, config) = code_config(&sim);
    let secret = [(SECRET_ENV, "sim-secret")];
    let out = token_init(&config, Some("sim-code"), &secret).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "expected the first use of sim-code to work"
    );

    // The code was used once; a second use, or an unknown code, is refused.
    let before = std::fs::read(&file).expect("token file");
    for code in ["sim-code", "not-a-code"] {
        let out = token_init(&config, Some(code), &secret).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(1),
            "expected exit 1 for code {code:?}, saw {:?}; {stderr}",
            out.status
        );
        assert!(
            stderr.contains("invalid_grant") && stderr.lines().count() <= 3,
            "expected a short message naming invalid_grant for code {code:?}, saw {stderr}"
        );
    }
    assert_eq!(
        std::fs::read(&file).expect("token file"),
        before,
        "expected a refused code to leave the token file alone"
    );

    // Without the client secret in the environment: exit 1 naming the variable.
    sim.add_auth_code("second-code");
    let out = token_init(&config, Some("second-code"), &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 without the client secret, saw {:?}",
        out.status
    );
    assert!(
        stderr.contains(SECRET_ENV),
        "expected the message to name {SECRET_ENV}, saw {stderr}"
    );

    // Without CX_ACCESS_TOKEN there is nothing to write: exit 1 naming the variable.
    let out = token_init(&config, None, &[]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1 without CX_ACCESS_TOKEN, saw {:?}",
        out.status
    );
    assert!(
        stderr.contains("CX_ACCESS_TOKEN"),
        "expected the message to name CX_ACCESS_TOKEN, saw {stderr}"
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------
// The token stays inside (README "Pointing a service at it")
// ---------------------------------------------------------------------------------------

/// Every token the gateway has held, gathered as it rotates.
#[derive(Default)]
struct Held(BTreeSet<String>);

impl Held {
    fn start() -> Held {
        Held([ACCESS, REFRESH].iter().map(|s| s.to_string()).collect())
    }

    fn note_file(&mut self, path: &Path) {
        if let Ok(file) = read_token_file(path) {
            self.0.insert(file.access);
            self.0.insert(file.refresh);
        }
    }

    /// Every access token the simulator was sent (the client key aside, should it be there).
    fn note_sim(&mut self, sim: &cxgate::sim::SimHandle) {
        self.0
            .extend(sim.raw_tokens().into_iter().filter(|k| k != KEY));
    }

    /// Where in `text` any token appears, in any spelling.
    fn leaks(&self, what: &str, text: &str) -> Vec<String> {
        let mut found = Vec::new();
        for token in &self.0 {
            let percent: String = form_urlencoded::byte_serialize(token.as_bytes()).collect();
            let json = serde_json::to_string(token).expect("string");
            let json = json.trim_matches('"').to_string();
            for spelling in [token.clone(), percent, json] {
                if let Some(at) = text.find(&spelling) {
                    let from = text[..at]
                        .char_indices()
                        .rev()
                        .nth(60)
                        .map_or(0, |(i, _)| i);
                    let to = (at + spelling.len() + 20).min(text.len());
                    let context = text.get(from..to).unwrap_or(&text[at..at + spelling.len()]);
                    found.push(format!("{what}: token {token:?} in ...{context}..."));
                    break;
                }
            }
        }
        found
    }
}

/// An answer as one text: status, headers, body.
fn transcript(a: &Answer) -> String {
    let mut text = format!("{}\n", a.status);
    for (name, value) in &a.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(&a.body));
    text
}

/// Traffic through every path of the gateway: misses, hits, HEAD, merged reads, paging and
/// its rewritten links, action links, upstream 404, the gateway's own 401, a 401 replay, a
/// revocation, an upstream 429 and the pause after it, a dropped connection (502), and the
/// admin endpoints. `sim` is the simulator behind `gw`, `admin` the admin base URL.
/// Returns every answer as (label, transcript), and checks that the interesting paths did
/// what they are for, so a quiet path cannot pass for a clean one.
async fn leak_traffic(
    http: &Http,
    sim: &cxgate::sim::SimHandle,
    gw: &str,
    admin: &str,
    token_file: &Path,
    held: &mut Held,
) -> Vec<(String, String)> {
    let key = format!("Bearer {KEY}");
    let auth = [("authorization", key.as_str())];
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut record = |label: &str, a: &Answer| seen.push((label.to_string(), transcript(a)));
    let get = |path: &str| {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{gw}{path}")
        };
        let key = key.clone();
        async move { send(http, Method::GET, &url, &[("authorization", &key)], "").await }
    };

    for (label, path) in [
        ("miss", "/me"),
        ("hit", "/me"),
        ("miss", "/me/accounts"),
        ("hit", "/me/accounts"),
        ("bypass", "/me/permissions"),
        ("cached contact", "/12345/inbox/contact/twitter/7"),
        ("404 from upstream", "/me/nothing"),
    ] {
        let a = get(path).await;
        record(&format!("{label} GET {path}"), &a);
    }
    let head = send(http, Method::HEAD, &format!("{gw}/me"), &auth, "").await;
    record("HEAD /me", &head);

    // Merged reads: insights answers take 200 ms, so these overlap and share one call.
    let mut merged = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let (http, url, key) = (
            http.clone(),
            format!("{gw}/12345/insights/volume"),
            key.clone(),
        );
        merged.spawn(async move {
            send(&http, Method::GET, &url, &[("authorization", &key)], "").await
        });
    }
    while let Some(a) = merged.join_next().await {
        record(
            "merged GET /12345/insights/volume",
            &a.expect("merged request"),
        );
    }

    // Paging: the simulator puts its caller's token in next_url; the client must get a
    // gateway link without it, and following it must work.
    let page = get("/12345/inbox/mentions?limit=2").await;
    record("paging GET /12345/inbox/mentions?limit=2", &page);
    assert_eq!(
        page.status, 200,
        "expected the mentions page, saw {}",
        page.status
    );
    let next = page.json()["response"]["paging"]["next_url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        next.starts_with(gw),
        "expected next_url on the gateway {gw}, saw {next:?}"
    );
    let page2 = get(&next).await;
    record("paging: next_url", &page2);
    assert_eq!(
        page2.status, 200,
        "expected next_url to work through the gateway"
    );
    let action = page.json()["response"]["data"][0]["action_links"][1]["link"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        action.starts_with(gw),
        "expected action links on the gateway {gw}, saw {action:?}"
    );
    let followed = get(&action).await;
    record("action link", &followed);
    // The client key as a query parameter, and a mentions page with a query of its own.
    let by_query = send(
        http,
        Method::GET,
        &format!("{gw}/12345/inbox/mentions?limit=1&sort=asc&access_token={KEY}"),
        &[],
        "",
    )
    .await;
    record("paging with access_token=<key>", &by_query);

    // The gateway's own refusals.
    for (label, headers) in [
        ("401 no key", vec![]),
        ("401 bad key", vec![("authorization", "Bearer not-a-key")]),
    ] {
        let a = send(
            http,
            Method::GET,
            &format!("{gw}/me/permissions"),
            &headers,
            "",
        )
        .await;
        assert_eq!(a.status, 401, "expected {label} to be 401");
        record(label, &a);
    }

    // A 401 replay: the upstream refuses once, the gateway refreshes and replays.
    let refreshes = stat(sim, "token_refreshes");
    sim.set_faults(Faults {
        force_401: Some(Force401 { count: 1 }),
        ..Faults::default()
    });
    let replayed = get("/12345/inbox/contact/twitter/401").await;
    record("401 replay", &replayed);
    assert_eq!(replayed.status, 200, "expected the replay to succeed");
    let now = stat(sim, "token_refreshes");
    assert!(
        now > refreshes,
        "expected the replay to refresh, saw {refreshes} then {now} refreshes"
    );
    held.note_file(token_file);
    // A revocation: the next call refreshes again; the paging link then carries a new token.
    sim.revoke_all();
    let page3 = get("/12345/inbox/mentions?limit=3").await;
    record("paging after revocation", &page3);
    held.note_file(token_file);
    for (label, path) in [
        ("hit after rotation", "/me"),
        ("miss after rotation", "/me/connectedprofiles"),
    ] {
        let a = get(path).await;
        record(label, &a);
    }

    // A dropped connection: 502.
    sim.set_faults(Faults {
        drop_rate: 1.0,
        path_prefix: Some("/12345/inbox/contact/twitter/502".into()),
        ..Faults::default()
    });
    let dropped = get("/12345/inbox/contact/twitter/502").await;
    record("dropped upstream", &dropped);
    assert_eq!(
        dropped.status, 502,
        "expected 502 for a dropped upstream connection"
    );
    // An upstream 429, then the gateway's own 429 while the upstream pause lasts.
    sim.set_faults(Faults {
        force_429: Some(Force429 {
            count: 1,
            retry_after: 1,
        }),
        ..Faults::default()
    });
    for label in ["upstream 429", "gateway 429 while paused"] {
        let a = get("/12345/inbox/contact/twitter/429").await;
        record(label, &a);
        assert_eq!(a.status, 429, "expected {label}");
    }
    sim.set_faults(Faults::default());

    for path in [
        "/admin/status",
        "/metrics",
        "/readyz",
        "/healthz",
        "/admin/nothing",
    ] {
        let a = send(http, Method::GET, &format!("{admin}{path}"), &[], "").await;
        record(&format!("admin {path}"), &a);
    }
    held.note_file(token_file);
    held.note_sim(sim);
    assert!(
        held.0.len() >= 6,
        "expected at least three access/refresh pairs held over the run, saw {}",
        held.0.len()
    );
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_appears_in_any_response_header_body_or_metric() {
    let env = common::start(SimOptions::default(), &format!("{BIG_BUDGET}{ROUTES}")).await;
    // The control: the simulator does put its caller's token in paging links.
    let direct = send(
        &env.http,
        Method::GET,
        &format!("{}/12345/inbox/mentions?limit=2", env.sim.base_url()),
        &[("authorization", &format!("Bearer {ACCESS}"))],
        "",
    )
    .await;
    assert!(
        String::from_utf8_lossy(&direct.body).contains(ACCESS),
        "expected the simulator itself to echo the token in next_url (else this test proves nothing)"
    );
    let mut held = Held::start();
    let token_file = env.dir.join("token.json");
    let seen = leak_traffic(
        &env.http,
        &env.sim,
        &env.url(""),
        &env.admin_url(""),
        &token_file,
        &mut held,
    )
    .await;
    let metrics = env.metrics().await;
    let mut leaks = Vec::new();
    for (label, text) in &seen {
        leaks.extend(held.leaks(label, text));
    }
    leaks.extend(held.leaks("metrics", &metrics));
    assert!(
        leaks.is_empty(),
        "expected no token in {} answers or the metrics, saw {} leaks: {leaks:#?}",
        seen.len(),
        leaks.len()
    );
    env.stop().await;
}

/// A child process ended by its PID when the test ends, however it ends.
struct Child(tokio::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_appears_in_the_debug_json_logs_of_the_real_binary() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Three-second tokens, so the background refresher renews once during the run too.
    let sim = spawn_sim(SimOptions {
        token_ttl: Duration::from_secs(3),
        access_tokens: vec![ACCESS.into()],
        refresh_tokens: vec![REFRESH.into()],
        client_secret: CLIENT_SECRET.into(),
        ..SimOptions::default()
    })
    .await;
    let dir = temp_dir("token-logs");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3))
        .expect("token file");
    let (port, admin_port) = (common::free_port(), common::free_port());
    let base = sim.base_url();
    let config = write_config(
        &dir,
        &format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nshutdown_grace = \"2s\"\n\
             [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
             [token]\nfile = \"{}\"\nrefresh_before = \"1s\"\n\
             [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
             {}\n{BIG_BUDGET}\n{ROUTES}\n",
            token_file.display(),
            common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        ),
    );
    let log_path = dir.join("stderr.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = Child(
        tokio::process::Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .args(["--log-format", "json", "--log-level", "debug"])
            .env(SECRET_ENV, CLIENT_SECRET)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("start cxgate run"),
    );
    let started = Instant::now();
    let http = http_client();
    let gw = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    loop {
        let req = Request::get(format!("{admin}/healthz"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        // Each look may take a second on a busy machine; the loop's 5 s bound the whole start.
        if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(1), http.request(req)).await
        {
            if resp.status() == 200 {
                break;
            }
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!(
                "expected cxgate run to serve, it exited with {status}: {}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "expected /healthz to answer within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut held = Held::start();
    let seen = leak_traffic(&http, &sim, &gw, &admin, &token_file, &mut held).await;
    // The upstream 429 at the end of the traffic pauses upstream calls for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Keep going until the background refresher has renewed a token on its own as well.
    let wait_until = Instant::now() + Duration::from_secs(4);
    let scheduled_before = stat(&sim, "token_refreshes");
    while stat(&sim, "token_refreshes") == scheduled_before && Instant::now() < wait_until {
        let a = send(
            &http,
            Method::GET,
            &format!("{gw}/me/permissions"),
            &[("authorization", &format!("Bearer {KEY}"))],
            "",
        )
        .await;
        assert_eq!(
            a.status, 200,
            "expected traffic to keep working while waiting for a refresh"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    held.note_file(&token_file);
    held.note_sim(&sim);

    let pid = child.0.id().expect("child pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(killed.success(), "expected kill -TERM {pid} to succeed");
    let exit = tokio::time::timeout(Duration::from_secs(5), child.0.wait())
        .await
        .expect("expected cxgate to exit within 5 s of SIGTERM")
        .expect("wait for cxgate");
    let logs = std::fs::read_to_string(&log_path).expect("read logs");
    assert!(exit.success(), "expected exit 0 after SIGTERM, saw {exit}");

    let lines: Vec<&str> = logs.lines().collect();
    assert!(
        lines.len() > 20 && lines.iter().all(|l| l.starts_with('{')),
        "expected many JSON log lines, saw {} lines starting {:?}",
        lines.len(),
        lines.first()
    );
    assert!(
        logs.contains("access token refreshed"),
        "expected the logs to cover refreshes (else this run proves little)"
    );
    assert!(
        seen.len() > 20,
        "expected the traffic to have run, saw {} answers",
        seen.len()
    );
    let mut leaks = held.leaks("logs", &logs);
    let secret = Held(BTreeSet::from([CLIENT_SECRET.to_string()]));
    leaks.extend(secret.leaks("logs (client secret)", &logs));
    for (label, text) in &seen {
        leaks.extend(held.leaks(label, text));
    }
    assert!(
        leaks.is_empty(),
        "expected no token in {} log lines or the answers, saw {} leaks: {leaks:#?}",
        lines.len(),
        leaks.len()
    );
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}

// ---------------------------------------------------------------------------------------
// The refresh gap (the same run as `benches/token_gap.rs`)
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 16 s measurement; run with --release --ignored refresh_gap --nocapture"]
async fn refresh_gap() {
    let report = common::refresh_gap_run(Duration::from_secs(5), Duration::from_secs(16), 4).await;
    report.print();
    let failed = report.non_200();
    assert!(
        failed.is_empty(),
        "expected every answer 200 across the refreshes, saw {} others, first {:?}",
        failed.len(),
        failed.first()
    );
    // Five-second tokens renewed one second ahead: about one refresh every four seconds.
    assert!(
        (3..=5).contains(&report.refreshes.len()),
        "expected 3 to 5 refreshes in 16 s, saw {} (simulator granted {})",
        report.refreshes.len(),
        report.sim_refreshes
    );
    assert_eq!(
        report.reuse_rejected, 0,
        "expected no refresh token presented twice"
    );
    let (gap, _) = report.longest_gap(None);
    assert!(
        gap < Duration::from_millis(500),
        "expected no gap in service of 500 ms or more, saw {gap:?}"
    );
}

/// An upstream that echoes the token it was sent in response headers (as debugging
/// proxies and some APIs' `Link` headers do): none of those headers reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_echoed_in_upstream_headers_never_reaches_the_client() {
    let (base, _seen, upstream) = common::scripted_upstream(std::sync::Arc::new(|seen| {
        let token = seen
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("none")
            .to_string();
        common::Reply::ok()
            .header("x-echo-authorization", &format!("Bearer {token}"))
            .header(
                "link",
                &format!("<https://api.engagor.com/me?access_token={token}>; rel=self"),
            )
            .header("content-location", &format!("/me?access_token={token}"))
            .header("x-kept", "yes")
    }))
    .await;
    let clients = common::client_toml("test", KEY, "scopes = [\"read\"]");
    let env = common::start_custom(SimOptions::default(), "", Some(&base), &clients, "").await;
    let answer = env.get("/me/permissions").await;
    assert_eq!(answer.status, 200, "expected 200, saw {answer:?}");
    for (name, value) in &answer.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(ACCESS),
            "expected no header carrying the held token, saw {name}: {value}"
        );
    }
    assert_eq!(
        answer.header("x-kept"),
        "yes",
        "expected headers without the token passed on"
    );
    env.stop().await;
    upstream.abort();
}

#[tokio::test]
async fn readyz_is_503_while_the_held_token_cannot_be_sent() {
    let sim = SimOptions {
        access_tokens: vec!["sim-access\r\nX-Injected: 1".to_string()],
        refresh_tokens: vec![REFRESH.to_string()],
        ..SimOptions::default()
    };
    let env = common::start(sim, ROUTES).await;
    let ready = env
        .send(Method::GET, &env.admin_url("/readyz"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&ready.body).into_owned();
    assert!(
        ready.status == 503 && text.contains("cannot be sent"),
        "expected /readyz 503 saying the token cannot be sent, saw {} {text}",
        ready.status
    );
    assert!(
        !text.contains("X-Injected"),
        "expected the token kept out of the reason, saw {text}"
    );
    env.stop().await;
}

/// `/readyz` and the request path use one test of a held token: a token with a space, a
/// tab or a non-ASCII character makes `/readyz` not ready, and the request path refuses to
/// send it too (503 `token_unavailable` in the envelope), rather than sending what
/// readiness calls unusable.
#[tokio::test]
async fn readiness_and_the_request_path_agree_on_unsendable_tokens() {
    let long = "a".repeat(5_000);
    for token in [
        "sim access",
        "sim\taccess",
        "sim-acc\u{e8}ss",
        long.as_str(),
    ] {
        let shown = &token[..token.len().min(40)];
        // The simulator grants no refresh: an unsendable token is refreshed at once, and a
        // fresh one would end the state this test looks at before its second look.
        let sim = SimOptions {
            access_tokens: vec![token.to_string()],
            refresh_tokens: vec![],
            ..SimOptions::default()
        };
        let env = common::start(sim, ROUTES).await;
        let ready = env
            .send(Method::GET, &env.admin_url("/readyz"), &[], "")
            .await;
        assert_eq!(ready.status, 503, "{shown:?}: expected /readyz not ready");
        let before = env.sim.stats()["requests_total"].as_u64().unwrap_or(0);
        let answer = env.get("/me/permissions").await;
        let body = answer.json();
        assert!(
            answer.status == 503
                && body["error"] == "token_unavailable"
                && body["error_description"]
                    .as_str()
                    .is_some_and(|d| d.contains("cannot be sent")),
            "{shown:?}: expected 503 token_unavailable like /readyz, saw {} {body}",
            answer.status
        );
        let after = env.sim.stats()["requests_total"].as_u64().unwrap_or(0);
        assert_eq!(
            after, before,
            "{shown:?}: expected nothing sent upstream with a token /readyz calls unusable"
        );
        env.stop().await;
    }
}

#[cfg(unix)]
#[tokio::test]
async fn a_fifo_as_the_token_file_is_refused_at_start_instead_of_hanging() {
    let dir = temp_dir("token-fifo");
    let fifo = dir.join("token.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "expected mkfifo to make {}", fifo.display());
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:1\"\n\
         [token]\nfile = \"{}\"\n{}",
        fifo.display(),
        common::client_toml("test", KEY, "")
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, &text).expect("write config");
    let cfg = cxgate::config::load(&path).expect("valid config");
    let started = tokio::time::timeout(
        Duration::from_secs(10),
        cxgate::start(cfg, Some(path), cxgate::Options::default()),
    )
    .await;
    let Ok(started) = started else {
        // Release the reader blocked in open(2), or the runtime could never shut down.
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        let _ = std::fs::remove_dir_all(&dir);
        panic!("expected start to return, it blocked opening the FIFO token file");
    };
    let _ = std::fs::remove_dir_all(&dir);
    match started {
        Ok(gw) => {
            gw.shutdown();
            panic!("expected start refused for a FIFO token file, it started");
        }
        Err(e) => assert!(
            e.to_string().contains("not a regular file"),
            "expected the refusal to say the token file is not a regular file, saw {e}"
        ),
    }
}

/// An upstream that refuses even a token fresh from a refresh: every client gets 503, so
/// `/readyz` is not ready and `/admin/status` says why (the refusals and the reason).
#[tokio::test]
async fn readyz_and_status_show_an_upstream_refusing_fresh_tokens() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(Faults {
        force_401: Some(Force401 { count: 50 }),
        ..Faults::default()
    });
    let answer = env.get("/12345/inbox/contact/twitter/1").await;
    let body = answer.json();
    assert!(
        answer.status == 503
            && body["error_description"]
                .as_str()
                .is_some_and(|d| d.contains("freshly refreshed")),
        "expected 503 saying the upstream refuses a freshly refreshed token, saw {} {body}",
        answer.status
    );
    let ready = env
        .send(Method::GET, &env.admin_url("/readyz"), &[], "")
        .await;
    let text = String::from_utf8_lossy(&ready.body).into_owned();
    assert!(
        ready.status == 503 && text.contains("freshly refreshed"),
        "expected /readyz 503 while the upstream refuses fresh tokens, saw {} {text}",
        ready.status
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let token = &status.json()["token"];
    assert!(
        token["upstream_refusals"].as_u64().is_some_and(|n| n >= 2)
            && token["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("freshly refreshed")),
        "expected /admin/status to show the refusals and why, saw {token}"
    );
    env.stop().await;
}

/// A static token (`token.access_token_env`, never refreshed) that the upstream answers
/// with 401 makes the gateway not ready, with the reason, for as long as the upstream
/// refuses it; the first call with it that succeeds makes it ready again.
#[tokio::test]
async fn a_refused_static_token_is_not_ready_until_a_call_with_it_succeeds() {
    const TOKEN_ENV: &str = "CXGATE_TEST_STATIC_REFUSED_TOKEN";
    std::env::set_var(TOKEN_ENV, ACCESS);
    let sim = spawn_sim(SimOptions {
        access_tokens: vec![ACCESS.to_string()],
        ..SimOptions::default()
    })
    .await;
    let dir = temp_dir("static-refused");
    let cfg = cxgate::config::parse(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{}\"\n[token]\naccess_token_env = \"{TOKEN_ENV}\"\n{}{ROUTES}",
        sim.base_url(),
        common::client_toml("test", KEY, "scopes = [\"read\"]"),
    ))
    .expect("valid config");
    let gw = cxgate::start(cfg, None, cxgate::Options::default())
        .await
        .expect("start gateway");
    let env = Env {
        sim,
        gw,
        dir,
        http: http_client(),
    };
    let readyz = || async {
        let a = env
            .send(Method::GET, &env.admin_url("/readyz"), &[], "")
            .await;
        (a.status.as_u16(), a.json())
    };
    let contact = |n: u32| format!("/12345/inbox/contact/twitter/{n}");
    assert_eq!(
        env.get(&contact(1)).await.status,
        200,
        "a first call with the token"
    );
    assert_eq!(
        readyz().await.0,
        200,
        "expected ready with a token the upstream takes"
    );

    env.sim.set_faults(Faults {
        force_401: Some(Force401 { count: 2 }),
        ..Faults::default()
    });
    for n in [2, 3] {
        let refused = env.get(&contact(n)).await;
        assert_eq!(
            refused.status, 503,
            "expected 503 while the token is refused, saw {refused:?}"
        );
        let (status, body) = readyz().await;
        let reason = body["reason"].as_str().unwrap_or_default();
        assert_eq!(
            (status, body["status"].as_str()),
            (503, Some("not_ready")),
            "expected not ready after the upstream refused the static token, saw {body}"
        );
        assert!(
            reason.contains("refuses the held token") && reason.contains("cannot be refreshed"),
            "expected the reason to name the refused token, saw {reason:?}"
        );
    }
    assert_eq!(
        env.get(&contact(4)).await.status,
        200,
        "expected the token taken again once the upstream stops refusing it"
    );
    let (status, body) = readyz().await;
    assert_eq!(
        status, 200,
        "expected ready again after a call succeeded, saw {body}"
    );
    env.stop().await;
}

/// A token that cannot be refreshed (from `token.access_token_env`, or a token file with no
/// `[token.oauth]`) that the upstream refuses, takes once, then refuses again: `/readyz`
/// and `/admin/status` report the second refusal as they did the first.
#[tokio::test]
async fn an_unrefreshable_token_refused_again_after_a_success_is_not_ready_again() {
    const TOKEN_ENV: &str = "CXGATE_TEST_STATIC_REFUSED_AGAIN_TOKEN";
    std::env::set_var(TOKEN_ENV, ACCESS);
    for from_file in [false, true] {
        let sim = spawn_sim(SimOptions {
            access_tokens: vec![ACCESS.to_string()],
            ..SimOptions::default()
        })
        .await;
        let dir = temp_dir("static-refused-again");
        let token = if from_file {
            let file = dir.join("token.json");
            std::fs::write(&file, format!("{{\"access_token\":\"{ACCESS}\"}}\n"))
                .expect("token file");
            std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .expect("chmod token file");
            format!("file = \"{}\"", file.display())
        } else {
            format!("access_token_env = \"{TOKEN_ENV}\"")
        };
        let cfg = cxgate::config::parse(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [upstream]\nbase_url = \"{}\"\n[token]\n{token}\n{}{ROUTES}",
            sim.base_url(),
            common::client_toml("test", KEY, "scopes = [\"read\"]"),
        ))
        .expect("valid config");
        let gw = cxgate::start(cfg, None, cxgate::Options::default())
            .await
            .expect("start gateway");
        let env = Env {
            sim,
            gw,
            dir,
            http: http_client(),
        };
        let source = if from_file { "file" } else { "env" };
        let mut n = 0;
        for round in 1..=2 {
            env.sim.set_faults(Faults {
                force_401: Some(Force401 { count: 1 }),
                ..Faults::default()
            });
            let refused = env.get(&contact(&mut n)).await;
            assert_eq!(
                refused.status, 503,
                "{source}, refusal {round}: expected 503 while the token is refused"
            );
            let ready = env
                .send(Method::GET, &env.admin_url("/readyz"), &[], "")
                .await;
            let status = env
                .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
                .await
                .json();
            assert!(
                ready.status == 503
                    && status["token"]["usable"] == false
                    && status["token"]["upstream_refusals"].as_u64() >= Some(1),
                "{source}, refusal {round}: expected not ready and the refusal in the status, \
                 saw /readyz {} {} and {}",
                ready.status,
                String::from_utf8_lossy(&ready.body),
                status["token"]
            );
            let taken = env.get(&contact(&mut n)).await;
            assert_eq!(
                taken.status, 200,
                "{source}, round {round}: expected the token taken again"
            );
            let ready = env
                .send(Method::GET, &env.admin_url("/readyz"), &[], "")
                .await;
            assert_eq!(
                ready.status, 200,
                "{source}, round {round}: expected ready after a call succeeded"
            );
        }
        env.stop().await;
    }
}

/// With `[token.oauth]` and a valid refresh token, a token file whose access token cannot
/// be sent is refreshed at once when a reload takes it, every time, as a restart would.
#[tokio::test]
async fn an_unsendable_token_taken_on_reload_is_refreshed_at_once_every_time() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let file = env.dir.join("token.json");
    for (round, bad) in ["bad token", "bad\ttoken", "bad\r\ntoken"]
        .iter()
        .enumerate()
    {
        let held = read_token_file(&file).expect("token file");
        let before = stat(&env.sim, "token_refreshes");
        let text = serde_json::json!({
            "access_token": bad,
            "refresh_token": held.refresh,
            "expires_at": humantime::format_rfc3339_seconds(held.expires_at).to_string(),
        });
        std::fs::write(&file, text.to_string()).expect("write token file");
        let reload = env
            .send(Method::POST, &env.admin_url("/admin/reload"), &[], "")
            .await;
        assert_eq!(
            reload.status, 200,
            "round {round}: expected the reload done"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut ready = 0;
        while Instant::now() < deadline {
            ready = env
                .send(Method::GET, &env.admin_url("/readyz"), &[], "")
                .await
                .status
                .as_u16();
            if ready == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = stat(&env.sim, "token_refreshes");
        assert!(
            ready == 200 && after == before + 1,
            "round {round}: expected one refresh at once and ready again within 5 s, saw \
             /readyz {ready} and {} refreshes",
            after - before
        );
        let answer = env
            .get(&format!("/12345/inbox/contact/twitter/reload{round}"))
            .await;
        assert_eq!(
            answer.status, 200,
            "round {round}: expected requests served"
        );
    }
    env.stop().await;
}
