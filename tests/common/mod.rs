//! Test harness: the simulated CX Social API and a gateway in front of it, both on
//! 127.0.0.1:0, started through the same library entry points the binary uses.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use cxgate::sim::{SimHandle, SimOptions};

pub mod overload;
pub mod redis_server;
use cxgate::Running;

pub const KEY: &str = "test-key";
pub const ACCESS: &str = "sim-access-SECRET-0001";
pub const REFRESH: &str = "sim-refresh-SECRET-0001";
pub const SECRET_ENV: &str = "CXGATE_TEST_CLIENT_SECRET";
pub const CLIENT_SECRET: &str = "sim-secret";

/// A running simulator + gateway pair.
pub struct Env {
    pub sim: SimHandle,
    pub gw: Running,
    pub dir: PathBuf,
    pub http: Client<HttpConnector, Full<Bytes>>,
}

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected JSON, saw {:?}: {e}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// The client-key lines for a config.
pub fn client_toml(name: &str, key: &str, extra: &str) -> String {
    format!(
        "[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}\n",
        cxgate::auth::sha256_hex(key.as_bytes())
    )
}

/// The default test routes (a subset of the production table).
pub const ROUTES: &str = r#"
[[routes]]
match = "GET /me"
ttl = "10m"
stale_while_revalidate = "1m"
stale_if_error = "1h"
tags = ["me"]

[[routes]]
match = "GET /me/accounts"
ttl = "10m"
tags = ["me", "accounts"]

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "5m"
stale_if_error = "30m"
tags = ["account:{account_id}", "contact:{account_id}/{service}/{service_id}"]

[[routes]]
match = "POST /{account_id}/inbox/contact/{service}/{service_id}"
invalidates = ["contact:{account_id}/{service}/{service_id}"]

[[routes]]
match = "GET /{account_id}/inbox/mentions"
ttl = "15s"
tags = ["mentions:{account_id}"]

[[routes]]
match = "POST /{account_id}/inbox/mention/{topic_id}/{id}"
invalidates = ["mention:{account_id}/{topic_id}/{id}", "mentions:{account_id}"]
"#;

/// Starts a simulator with `sim` options and a gateway whose config is the base config
/// (upstream, token file, listeners on port 0, the `test-key` client with read+write)
/// followed by `extra` TOML (more sections; use `[[routes]]` etc.). Pass `ROUTES` in
/// `extra` for the default route table.
pub async fn start(sim: SimOptions, extra: &str) -> Env {
    start_with(
        sim,
        &client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        extra,
    )
    .await
}

/// Like [`start`] but with the clients section given in full (empty for anonymous mode).
pub async fn start_with(sim_opts: SimOptions, clients: &str, extra: &str) -> Env {
    start_custom(sim_opts, "", None, clients, extra).await
}

impl Env {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.admin_addr)
    }

    /// Sends a request to the gateway (no key is added: pass headers).
    pub async fn send(
        &self,
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
        let resp = tokio::time::timeout(Duration::from_secs(20), self.http.request(req))
            .await
            .expect("gateway answered within 20 s")
            .expect("gateway request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// GET through the gateway with the test key.
    pub async fn get(&self, path: &str) -> Answer {
        let auth = format!("Bearer {KEY}");
        self.send(
            Method::GET,
            &self.url(path),
            &[("authorization", &auth)],
            "",
        )
        .await
    }

    /// POST a form body through the gateway with the test key.
    pub async fn post_form(&self, path: &str, body: &str) -> Answer {
        let auth = format!("Bearer {KEY}");
        self.send(
            Method::POST,
            &self.url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await
    }

    /// Requests the simulator received for "METHOD /path".
    pub fn upstream_count(&self, route: &str) -> u64 {
        self.sim.stats()["by_route"][route].as_u64().unwrap_or(0)
    }

    pub fn upstream_total(&self) -> u64 {
        self.sim.stats()["requests_total"].as_u64().unwrap_or(0)
    }

    pub async fn metrics(&self) -> String {
        let a = self
            .send(Method::GET, &self.admin_url("/metrics"), &[], "")
            .await;
        String::from_utf8_lossy(&a.body).into_owned()
    }

    pub async fn stop(self) {
        self.gw.shutdown();
        self.gw.stopped().await;
        self.sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Like [`start_with`], with `server_extra` lines added inside `[server]` and, when
/// `upstream` is given, that base URL instead of the simulator's (the simulator still
/// serves the token endpoint).
pub async fn start_custom(
    sim_opts: SimOptions,
    server_extra: &str,
    upstream: Option<&str>,
    clients: &str,
    extra: &str,
) -> Env {
    start_env(sim_opts, server_extra, upstream, "1s", clients, extra).await
}

/// The one way the harness starts a simulator and a gateway in front of it.
async fn start_env(
    mut sim_opts: SimOptions,
    server_extra: &str,
    upstream: Option<&str>,
    refresh_before: &str,
    clients: &str,
    extra: &str,
) -> Env {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    if sim_opts.access_tokens == SimOptions::default().access_tokens {
        sim_opts.access_tokens = vec![ACCESS.to_string()];
        sim_opts.refresh_tokens = vec![REFRESH.to_string()];
    }
    sim_opts.client_secret = CLIENT_SECRET.to_string();
    let ttl = sim_opts.token_ttl;
    let access = sim_opts.access_tokens[0].clone();
    let refresh = sim_opts.refresh_tokens.first().cloned().unwrap_or_default();
    let sim = spawn_sim(sim_opts).await;
    let dir = temp_dir("test");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, &access, &refresh, ttl).expect("token file");
    let base = sim.base_url();
    let upstream = upstream.map_or_else(|| base.clone(), str::to_string);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"2s\"\n{server_extra}\n\
         [upstream]\nbase_url = \"{upstream}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
         [token]\nfile = \"{}\"\nrefresh_before = \"{refresh_before}\"\n\
         [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
         {clients}\n{extra}\n",
        token_file.display()
    );
    let cfg_path = dir.join("cxgate.toml");
    std::fs::write(&cfg_path, &text).expect("write config");
    let cfg = cxgate::config::load(&cfg_path)
        .unwrap_or_else(|e| panic!("test config invalid: {:?}\n{text}", e.lines()));
    let gw = cxgate::start(cfg, Some(cfg_path), cxgate::Options::default())
        .await
        .expect("start gateway");
    let http = Client::builder(TokioExecutor::new()).build_http();
    Env { sim, gw, dir, http }
}

/// A fresh directory under the system's temp dir, named for `tag` and this process, unique
/// to this call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cxgate-{tag}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The simulator on a free loopback port.
pub async fn spawn_sim(opts: SimOptions) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    cxgate::sim::spawn(listener, opts)
        .await
        .expect("start simulator")
}

/// What the real binary needs to run in front of a simulator: the simulator (one path of it
/// slow), a directory with a token file, the config text and its path, and the ports.
pub struct BinarySetup {
    pub sim: SimHandle,
    pub dir: PathBuf,
    pub config: String,
    pub config_path: PathBuf,
    pub port: u16,
    pub admin_port: u16,
}

/// Sets up (without starting it) a `cxgate run` whose upstream is a simulator that answers
/// `slow_path` after `latency_ms`, with one read-only client `test` keyed [`KEY`]. The
/// config is written to `config_path` and its text kept, for tests that rewrite it.
pub async fn binary_setup(tag: &str, slow_path: &str, latency_ms: u64) -> BinarySetup {
    let sim = spawn_sim(SimOptions {
        access_tokens: vec![ACCESS.into()],
        refresh_tokens: vec![REFRESH.into()],
        faults: cxgate::sim::Faults {
            latency_ms,
            path_prefix: Some(slow_path.into()),
            ..cxgate::sim::Faults::default()
        },
        ..SimOptions::default()
    })
    .await;
    let dir = temp_dir(tag);
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3600))
        .expect("token file");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         request_timeout = \"10s\"\nshutdown_grace = \"5s\"\n\
         [upstream]\nbase_url = \"{}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\
         [token]\nfile = \"{}\"\n{}",
        sim.base_url(),
        token_file.display(),
        client_toml("test", KEY, "scopes = [\"read\"]")
    );
    let config_path = dir.join("cxgate.toml");
    std::fs::write(&config_path, &config).expect("write config");
    BinarySetup {
        sim,
        dir,
        config,
        config_path,
        port,
        admin_port,
    }
}

/// A loopback port that was free a moment ago, for a child process that must be told its
/// address in advance.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// What came back over a raw TCP exchange.
#[derive(Debug)]
pub struct RawAnswer {
    pub bytes: Vec<u8>,
    /// The peer neither answered in full nor closed within the deadline.
    pub timed_out: bool,
}

impl RawAnswer {
    fn head_end(&self) -> Option<usize> {
        self.bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
    }

    /// The status code of the first response, if one came.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    /// A response header (first match, case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let end = self.head_end()?;
        let head = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The body of the first response (by Content-Length when given).
    pub fn body(&self) -> Vec<u8> {
        let Some(end) = self.head_end() else {
            return Vec::new();
        };
        let rest = &self.bytes[end..];
        match self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(len) => rest[..len.min(rest.len())].to_vec(),
            None => rest.to_vec(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let body = self.body();
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body, saw {:?}: {e}",
                String::from_utf8_lossy(&self.bytes)
            )
        })
    }
}

/// Writes `request` as is to `addr` (no client normalises it) and reads until the peer
/// has sent one whole response or closed, or 5 s pass.
pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    // The peer may answer and close before reading everything; that is its right.
    let _ = stream.write_all(request).await;
    let mut answer = RawAnswer {
        bytes: Vec::new(),
        timed_out: false,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = answer.head_end() {
            let len = answer
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|len| answer.bytes.len() >= end + len) {
                return answer;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                answer.timed_out = true;
                return answer;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return answer,
            Ok(Ok(n)) => answer.bytes.extend_from_slice(&buf[..n]),
        }
    }
}

/// A budget no test or benchmark traffic reaches, for runs that are not about the budget.
pub const BIG_BUDGET: &str = "[budget]\nlimit = 1000000\nperiod = \"1s\"\nburst = 100000\n";

impl Env {
    /// GET through the gateway with the given client key.
    pub async fn get_as(&self, key: &str, path: &str) -> Answer {
        let auth = format!("Bearer {key}");
        self.send(
            Method::GET,
            &self.url(path),
            &[("authorization", &auth)],
            "",
        )
        .await
    }
}

/// Numbers of the budget load run (see [`budget_load_run`]).
#[derive(Debug)]
pub struct LoadReport {
    pub clients: usize,
    pub elapsed: Duration,
    pub sent: u64,
    /// Answers with status 200, per client, in client order.
    pub admitted: Vec<u64>,
    /// 429s the gateway answered itself, all clients.
    pub gateway_429: u64,
    /// 429s of the upstream passed through, as the clients saw them.
    pub passed_429: u64,
    /// Answers that were neither 200 nor 429.
    pub other: u64,
    /// What reached the simulator, and how many of those it refused with 429.
    pub upstream_calls: u64,
    pub upstream_429: u64,
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
}

impl LoadReport {
    /// What the budget may admit over the run: the burst plus the rate times the time.
    pub fn allowance(&self) -> f64 {
        f64::from(self.burst)
            + f64::from(self.limit) / self.period.as_secs_f64() * self.elapsed.as_secs_f64()
    }

    pub fn print(&self) {
        let admitted: u64 = self.admitted.iter().sum();
        let secs = self.elapsed.as_secs_f64();
        println!(
            "budget load run: {} clients, budget {}/{:?} burst {}, simulator limit the same",
            self.clients, self.limit, self.period, self.burst
        );
        println!(
            "  elapsed {secs:.2} s, sent {} ({:.0}/s offered vs {:.1}/s budget)",
            self.sent,
            self.sent as f64 / secs,
            f64::from(self.limit) / self.period.as_secs_f64()
        );
        println!(
            "  upstream calls {} vs allowance {:.1} (burst + rate x elapsed); answered 200: {admitted}",
            self.upstream_calls,
            self.allowance()
        );
        println!(
            "  upstream 429s seen by the simulator: {} (passed through to clients: {})",
            self.upstream_429, self.passed_429
        );
        println!(
            "  gateway 429s: {}, other statuses: {}",
            self.gateway_429, self.other
        );
        let shares: Vec<String> = self
            .admitted
            .iter()
            .map(|n| format!("{:.1}%", 100.0 * *n as f64 / admitted.max(1) as f64))
            .collect();
        let min = self.admitted.iter().min().copied().unwrap_or(0);
        let max = self.admitted.iter().max().copied().unwrap_or(0);
        println!("  admitted per client: min {min}, max {max}; shares {shares:?}");
    }

    /// What the run must show: never more upstream calls than the allowance, and no 429 from
    /// the upstream (the gateway's model of the limit keeps it from ever being hit).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        // One cell of slack: the allowance is continuous, the calls are whole.
        if self.upstream_calls as f64 > self.allowance() + 1.0 {
            problems.push(format!(
                "expected at most {:.1} upstream calls, saw {}",
                self.allowance(),
                self.upstream_calls
            ));
        }
        if self.upstream_429 != 0 {
            problems.push(format!(
                "expected no upstream 429, saw {}",
                self.upstream_429
            ));
        }
        if self.other != 0 {
            problems.push(format!(
                "expected only 200 and 429 answers, saw {} others",
                self.other
            ));
        }
        problems
    }
}

/// The budget load run: a simulator limited exactly like the budget, and `clients` gateway
/// clients each sending one distinct uncached read every `tick` for `run` (fired without
/// waiting for earlier answers, so the offered load does not drop when requests queue).
/// Every request is awaited before the figures are taken, so the run ends by itself.
pub async fn budget_load_run(clients: usize, tick: Duration, run: Duration) -> LoadReport {
    use std::sync::Arc;

    let (limit, period, burst) = (200u32, Duration::from_secs(10), 20u32);
    let sim = SimOptions {
        rate_limit: Some(
            format!("{limit}/{}s", period.as_secs())
                .parse()
                .expect("valid simulator rate limit"),
        ),
        ..SimOptions::default()
    };
    let mut clients_toml = String::new();
    for c in 0..clients {
        clients_toml.push_str(&client_toml(
            &format!("load-{c:02}"),
            &format!("load-key-{c:02}"),
            "",
        ));
    }
    let budget = format!(
        "[budget]\nlimit = {limit}\nperiod = \"{}s\"\nburst = {burst}\nmax_wait = \"1s\"\n{ROUTES}",
        period.as_secs()
    );
    let env = Arc::new(start_with(sim, &clients_toml, &budget).await);
    let base_calls = env.upstream_total();
    let ticks = (run.as_nanos() / tick.as_nanos().max(1)) as u64;
    let started = tokio::time::Instant::now();
    let mut drivers = tokio::task::JoinSet::new();
    for c in 0..clients {
        let env = env.clone();
        drivers.spawn(async move {
            let key = format!("load-key-{c:02}");
            let mut requests = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..ticks {
                every.tick().await;
                let env = env.clone();
                let key = key.clone();
                requests.spawn(async move {
                    let path = format!("/12345/inbox/contact/load{c}/{i}");
                    env.get_as(&key, &path).await
                });
            }
            // (200s, gateway 429s, passed-through 429s, others)
            let mut counts = (0u64, 0u64, 0u64, 0u64);
            while let Some(answer) = requests.join_next().await {
                let a = answer.expect("load request task");
                match a.status.as_u16() {
                    200 => counts.0 += 1,
                    429 if a.header("cache-status").contains("fwd-status=429") => counts.2 += 1,
                    429 => counts.1 += 1,
                    _ => counts.3 += 1,
                }
            }
            (c, ticks, counts)
        });
    }
    let mut admitted = vec![0u64; clients];
    let (mut sent, mut gateway_429, mut passed_429, mut other) = (0, 0, 0, 0);
    while let Some(done) = drivers.join_next().await {
        let (c, n, counts) = done.expect("load client task");
        sent += n;
        admitted[c] = counts.0;
        gateway_429 += counts.1;
        passed_429 += counts.2;
        other += counts.3;
    }
    let elapsed = started.elapsed();
    let stats = env.sim.stats();
    let report = LoadReport {
        clients,
        elapsed,
        sent,
        admitted,
        gateway_429,
        passed_429,
        other,
        upstream_calls: env.upstream_total() - base_calls,
        upstream_429: stats["rate_limited"].as_u64().unwrap_or(0),
        limit,
        period,
        burst,
    };
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every load task has ended, so no one else holds the environment"),
    }
    report
}

/// Like [`start`] (the `test-key` client with read+write, `extra` appended), but with
/// `token.refresh_before` set to `refresh_before` instead of the harness's one second.
pub async fn start_refresh_before(sim_opts: SimOptions, refresh_before: &str, extra: &str) -> Env {
    let clients = client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    start_env(sim_opts, "", None, refresh_before, &clients, extra).await
}

/// One answer of the refresh-gap run; times count from the run's start.
#[derive(Debug, Clone, Copy)]
pub struct GapSample {
    pub sent: Duration,
    pub done: Duration,
    pub status: u16,
}

impl GapSample {
    pub fn latency(&self) -> Duration {
        self.done.saturating_sub(self.sent)
    }
}

/// Figures of the refresh-gap run (see [`refresh_gap_run`]).
#[derive(Debug)]
pub struct GapReport {
    pub ttl: Duration,
    pub loops: usize,
    pub elapsed: Duration,
    /// Every answer, ordered by completion.
    pub samples: Vec<GapSample>,
    /// When the gateway saved each new token to its file (just before it starts using it).
    pub refreshes: Vec<Duration>,
    /// What the simulator counted: refreshes granted, refresh tokens presented twice.
    pub sim_refreshes: u64,
    pub reuse_rejected: u64,
}

/// How far either side of a refresh counts as "around" it.
pub const GAP_WINDOW: Duration = Duration::from_millis(500);

impl GapReport {
    pub fn non_200(&self) -> Vec<GapSample> {
        self.samples
            .iter()
            .filter(|s| s.status != 200)
            .copied()
            .collect()
    }

    /// The longest time between consecutive successful answers whose later answer ends in
    /// `within` (all of them when `None`), with when that gap ended.
    pub fn longest_gap(&self, within: Option<(Duration, Duration)>) -> (Duration, Duration) {
        let mut best = (Duration::ZERO, Duration::ZERO);
        let mut previous: Option<Duration> = None;
        for s in self.samples.iter().filter(|s| s.status == 200) {
            let counted = within.is_none_or(|(from, to)| s.done >= from && s.done <= to);
            if let Some(p) = previous {
                let gap = s.done.saturating_sub(p);
                if counted && gap > best.0 {
                    best = (gap, s.done);
                }
            }
            previous = Some(s.done);
        }
        best
    }

    /// Requests in flight at some point within `GAP_WINDOW` of `at`: how many, and the
    /// longest latency among them.
    pub fn around(&self, at: Duration) -> (usize, Duration) {
        let from = at.saturating_sub(GAP_WINDOW);
        let to = at + GAP_WINDOW;
        let near: Vec<&GapSample> = self
            .samples
            .iter()
            .filter(|s| s.done >= from && s.sent <= to)
            .collect();
        let max = near.iter().map(|s| s.latency()).max().unwrap_or_default();
        (near.len(), max)
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut all: Vec<Duration> = self.samples.iter().map(GapSample::latency).collect();
        all.sort();
        match all.len() {
            0 => Duration::ZERO,
            n => all[((n as f64 - 1.0) * p).round() as usize],
        }
    }

    pub fn print(&self) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "refresh gap run: token ttl {:?}, refresh_before 1s, {} loops of uncached GETs for {:.1} s",
            self.ttl,
            self.loops,
            self.elapsed.as_secs_f64()
        );
        let failed = self.non_200();
        println!(
            "  answers {}, non-200 {} (goal 0){}",
            self.samples.len(),
            failed.len(),
            match failed.first() {
                Some(f) => format!(", first: {} at {:.3} s", f.status, f.done.as_secs_f64()),
                None => String::new(),
            }
        );
        println!(
            "  refreshes: {} seen in the token file, {} granted by the simulator, {} refresh reuses rejected",
            self.refreshes.len(),
            self.sim_refreshes,
            self.reuse_rejected
        );
        println!(
            "  latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(self.percentile(0.5)),
            ms(self.percentile(0.99)),
            ms(self.percentile(1.0))
        );
        let (gap, ended) = self.longest_gap(None);
        println!(
            "  longest gap between successful answers: {:.2} ms (ended at {:.3} s)",
            ms(gap),
            ended.as_secs_f64()
        );
        for (n, at) in self.refreshes.iter().enumerate() {
            let (count, max) = self.around(*at);
            let window = (at.saturating_sub(GAP_WINDOW), *at + GAP_WINDOW);
            let (gap, _) = self.longest_gap(Some(window));
            println!(
                "  refresh {} at {:.3} s: {count} requests within ±{} ms, max latency {:.2} ms, longest gap {:.2} ms",
                n + 1,
                at.as_secs_f64(),
                GAP_WINDOW.as_millis(),
                ms(max),
                ms(gap)
            );
        }
    }
}

/// The refresh-gap run: a simulator issuing `ttl` tokens, the harness gateway (refresh one
/// second ahead) and `loops` concurrent loops of uncached GETs for `run`, every answer's
/// status and times recorded. A watcher notes each change of the token file.
pub async fn refresh_gap_run(ttl: Duration, run: Duration, loops: usize) -> GapReport {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let sim = SimOptions {
        token_ttl: ttl,
        ..SimOptions::default()
    };
    let env = Arc::new(start(sim, BIG_BUDGET).await);
    let token_file = env.dir.join("token.json");
    let started = tokio::time::Instant::now();
    let done = Arc::new(AtomicBool::new(false));

    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = std::fs::read(&token_file).unwrap_or_default();
            let mut changes = Vec::new();
            while !done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(2)).await;
                // A read racing the rename sees the whole old file or the whole new one.
                if let Ok(now) = std::fs::read(&token_file) {
                    if now != last {
                        changes.push(started.elapsed());
                        last = now;
                    }
                }
            }
            changes
        })
    };

    let mut drivers = tokio::task::JoinSet::new();
    for l in 0..loops {
        let env = env.clone();
        drivers.spawn(async move {
            let mut samples = Vec::new();
            let mut i = 0u64;
            while started.elapsed() < run {
                // Paths repeat so the simulator's per-path counters stay small; each loop
                // has its own, so no two requests in flight are ever merged.
                let path = format!("/12345/inbox/contact/gap{l}/{}", i % 100);
                let sent = started.elapsed();
                let answer = env.get(&path).await;
                samples.push(GapSample {
                    sent,
                    done: started.elapsed(),
                    status: answer.status.as_u16(),
                });
                i += 1;
            }
            samples
        });
    }
    let mut samples = Vec::new();
    while let Some(loop_samples) = drivers.join_next().await {
        samples.extend(loop_samples.expect("request loop"));
    }
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let refreshes = watcher.await.expect("token file watcher");
    samples.sort_by_key(|s| s.done);
    let stats = env.sim.stats();
    let report = GapReport {
        ttl,
        loops,
        elapsed,
        samples,
        refreshes,
        sim_refreshes: stats["token_refreshes"].as_u64().unwrap_or(0),
        reuse_rejected: stats["refresh_reuse_rejected"].as_u64().unwrap_or(0),
    };
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every request loop has ended, so no one else holds the environment"),
    }
    report
}

/// What a recording upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
    pub headers: HeaderMap,
}

/// An upstream that records every request and answers 200 with a small JSON body and
/// hop-by-hop headers of its own (`Connection: x-bar`, `x-bar`, `Keep-Alive`) next to an end-to-end one.
pub async fn recording_upstream() -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the recording upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let log = log.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                log.lock().expect("log lock").push(Seen {
                    target: req.uri().to_string(),
                    headers: req.headers().clone(),
                });
                let resp = hyper::Response::builder()
                    .header("content-type", "application/json")
                    .header("connection", "x-bar")
                    .header("x-bar", "upstream-hop")
                    .header("keep-alive", "timeout=5")
                    .header("x-end-to-end", "kept")
                    .body(Full::new(Bytes::from_static(
                        br#"{"meta":{"code":200},"response":{"id":7}}"#,
                    )));
                async move { Ok::<_, std::convert::Infallible>(resp.expect("static response")) }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, seen, task)
}

/// A child `cxgate` (the real binary) with its stdout and stderr in `dir/cxgate.log`,
/// killed by its PID if the test ends before it exits.
pub struct Proc {
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(args: &[&str], dir: &std::path::Path) -> Proc {
        let log = dir.join("cxgate.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_cxgate"))
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start cxgate");
        Proc { child, log }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "expected kill -{name} to succeed");
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
