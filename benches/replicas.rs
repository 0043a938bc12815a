//! Three replicas cost the upstream what one gateway does: the same fleet workload through
//! one gateway and then through three replicas sharing a Redis (budget, token, cache tier
//! and fills merged across replicas), in one run, against real release binaries.
//!
//! Everything runs on 127.0.0.1: the simulated CX Social API in this process (its own rate
//! limit, counted over its window and reported in `X-RateLimit-*`; over it, the real API's
//! 400 `rate_limit_reached`), a `redis-server` the bench starts on a free port and stops by
//! its process id, and the gateways as child processes (`cxgate run`, the binary at
//! `$CXGATE_BIN`, else `target/release/cxgate`: build it first), each stopped by its pid.
//!
//! The workload: 20 services, one client key each, every request sent to the next gateway
//! in turn (a load balancer; a request refused at connect goes to the next one). Each
//! service runs jobs (`/me` and `/me/accounts`, then 20 contact reads spread by Zipf over
//! 10,000 ids, 2% of them followed by a write of that contact, then 2 to 4 s of rest) and
//! polls its account's mentions every 3 to 6 s (10% of polls followed by a mention write).
//! Each service draws from its own seeded generator, so both setups get the same requests.
//!
//! Then, on the three replicas: a replica restarted under load (SIGTERM, started again on
//! its ports), its upstream calls in its first period against its first period cold; and
//! 200 concurrent cold reads of one key spread over the three behind a 100 ms upstream
//! (upstream calls and latency), three rounds.
//!
//! Run: `cargo build --release && cargo bench --bench replicas` (60 s per period: about 4
//! minutes in all); `REPLICAS_SECS=15` for a quick run. Exits 1 when a goal is missed or a
//! client got an answer other than 2xx or the gateway's 429.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cxgate::sim::{Faults, RateLimit, SimHandle, SimOptions};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::redis_server::RedisServer;
use support::Zipf;
use tokio::time::Instant;

/// The simulator's limit per token, and the gateways' budget (shared by the replicas).
const LIMIT: &str = "3000/1m";
const BURST: u32 = 50;
const SERVICES: usize = 20;
const IDS: usize = 10_000;
const READS_PER_JOB: usize = 20;
const CONTACT_WRITE_SHARE: f64 = 0.02;
const MENTION_WRITE_SHARE: f64 = 0.1;
const ACCOUNTS: [u64; 3] = [12345, 23456, 34567];
/// Upstream latency of every call during the workload.
const LATENCY_MS: u64 = 50;
/// Upstream latency of the cold-burst key, and its prefix.
const COLD_LATENCY_MS: u64 = 100;
const COLD_PREFIX: &str = "/12345/inbox/contact/cold/";
const COLD_READS: usize = 200;

type Http = Client<HttpConnector, Full<Bytes>>;

/// What the clients saw, counted as they go (so a snapshot can be taken mid-run).
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    client_429: AtomicU64,
    other: AtomicU64,
    /// No answer from any gateway (every one refused the connection or reset it).
    unanswered: AtomicU64,
    /// Sent to another gateway because the first refused the connection.
    rerouted: AtomicU64,
    other_seen: Mutex<Vec<u16>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    sent: u64,
    ok: u64,
    client_429: u64,
    other: u64,
    unanswered: u64,
    rerouted: u64,
}

impl Tally {
    fn counts(&self) -> Counts {
        Counts {
            sent: self.sent.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            client_429: self.client_429.load(Ordering::Relaxed),
            other: self.other.load(Ordering::Relaxed),
            unanswered: self.unanswered.load(Ordering::Relaxed),
            rerouted: self.rerouted.load(Ordering::Relaxed),
        }
    }
}

/// The gateways the fleet sends to, in turn.
struct Balancer {
    http: Http,
    addrs: Vec<String>,
    next: AtomicUsize,
    tally: Tally,
}

impl Balancer {
    /// Sends one request through the next gateway (the next after it if it refuses the
    /// connection); the answer's status and body, `None` when no gateway answered.
    async fn send(
        &self,
        key: &str,
        method: Method,
        path: &str,
        form: &str,
    ) -> Option<(u16, Bytes)> {
        self.tally.sent.fetch_add(1, Ordering::Relaxed);
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        for attempt in 0..self.addrs.len() {
            let addr = &self.addrs[(first + attempt) % self.addrs.len()];
            let mut req = Request::builder()
                .method(method.clone())
                .uri(format!("http://{addr}{path}"))
                .header("authorization", format!("Bearer {key}"));
            if method == Method::POST {
                req = req.header("content-type", "application/x-www-form-urlencoded");
            }
            let req = req
                .body(Full::new(Bytes::from(form.to_string())))
                .expect("request");
            let resp =
                match tokio::time::timeout(Duration::from_secs(30), self.http.request(req)).await {
                    Ok(Ok(resp)) => resp,
                    Ok(Err(e)) if e.is_connect() => {
                        self.tally.rerouted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => break,
                };
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match status {
                200..=299 => self.tally.ok.fetch_add(1, Ordering::Relaxed),
                429 => self.tally.client_429.fetch_add(1, Ordering::Relaxed),
                other => {
                    let mut seen = self.tally.other_seen.lock().expect("other statuses");
                    if seen.len() < 8 {
                        seen.push(other);
                    }
                    self.tally.other.fetch_add(1, Ordering::Relaxed)
                }
            };
            return Some((status, body));
        }
        self.tally.unanswered.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// One client service of the fleet.
struct Service {
    lb: Arc<Balancer>,
    key: String,
    account: u64,
    rng: fastrand::Rng,
    deadline: Instant,
}

impl Service {
    /// Sleeps a random time in `range` (ms), or until the deadline; false once it is over.
    async fn pause(&mut self, range: std::ops::Range<u64>) -> bool {
        let wake = Instant::now() + Duration::from_millis(self.rng.u64(range));
        tokio::time::sleep_until(wake.min(self.deadline)).await;
        Instant::now() < self.deadline
    }

    async fn jobs(mut self, zipf: Arc<Zipf>) {
        self.pause(0..2000).await;
        while Instant::now() < self.deadline {
            self.lb.send(&self.key, Method::GET, "/me", "").await;
            self.lb
                .send(&self.key, Method::GET, "/me/accounts", "")
                .await;
            for _ in 0..READS_PER_JOB {
                let id = zipf.sample_with(&mut self.rng);
                let path = format!("/12345/inbox/contact/twitter/{id}");
                self.lb.send(&self.key, Method::GET, &path, "").await;
                if self.rng.f64() < CONTACT_WRITE_SHARE {
                    let form = format!("crm_note=seen+{}", self.rng.u32(..));
                    self.lb.send(&self.key, Method::POST, &path, &form).await;
                }
            }
            if !self.pause(2000..4000).await {
                break;
            }
        }
    }

    async fn polls(mut self) {
        self.pause(0..3000).await;
        let list = format!("/{}/inbox/mentions?limit=20&sort=desc", self.account);
        while Instant::now() < self.deadline {
            let answer = self.lb.send(&self.key, Method::GET, &list, "").await;
            if let Some((200, body)) = answer {
                if self.rng.f64() < MENTION_WRITE_SHARE {
                    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let newest = &json["response"]["data"][0];
                    if let (Some(topic), Some(id)) =
                        (newest["topic"]["id"].as_u64(), newest["id"].as_str())
                    {
                        let path = format!("/{}/inbox/mention/{topic}/{id}", self.account);
                        let form = "updates=%7B%22status%22%3A%22open%22%7D";
                        self.lb.send(&self.key, Method::POST, &path, form).await;
                    }
                }
            }
            if !self.pause(3000..6000).await {
                break;
            }
        }
    }
}

/// Starts the fleet against `lb` until `deadline`; the tasks end by themselves.
fn start_fleet(lb: &Arc<Balancer>, deadline: Instant) -> tokio::task::JoinSet<()> {
    let zipf = Arc::new(Zipf::new(IDS, 1.0));
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..SERVICES {
        let service = |seed: u64| Service {
            lb: lb.clone(),
            key: format!("replicas-key-{s:02}"),
            account: ACCOUNTS[s % ACCOUNTS.len()],
            rng: fastrand::Rng::with_seed(seed),
            deadline,
        };
        tasks.spawn(service(2 * s as u64).jobs(zipf.clone()));
        tasks.spawn(service(2 * s as u64 + 1).polls());
    }
    tasks
}

/// One gateway child process.
struct Gateway {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    admin: u16,
    child: Option<Child>,
}

impl Gateway {
    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("create the gateway log");
        let child = Command::new(&self.bin)
            .args(["--log-level", "warn", "run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.bin.display()));
        self.child = Some(child);
    }

    async fn ready(&mut self, http: &Http) {
        let by = Instant::now() + Duration::from_secs(30);
        loop {
            let req = Request::builder()
                .uri(format!("http://127.0.0.1:{}/readyz", self.admin))
                .body(Full::new(Bytes::new()))
                .expect("request");
            if matches!(http.request(req).await, Ok(r) if r.status() == 200) {
                return;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > by {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!(
                    "the gateway on port {} is not ready ({exited:?}):\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM by its pid, then waits for it to exit.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let by = std::time::Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() {
            if std::time::Instant::now() > by {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Upstream calls this process made since it started (`cxgate_upstream_requests_total`).
    async fn upstream_calls(&self, http: &Http) -> u64 {
        let req = Request::builder()
            .uri(format!("http://127.0.0.1:{}/metrics", self.admin))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let text = match http.request(req).await {
            Ok(resp) => resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default(),
            Err(_) => String::new(),
        };
        text.lines()
            .filter(|l| l.starts_with("cxgate_upstream_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `n` gateways in front of `sim`, sharing `redis` (budget, token, cache tier) when given.
async fn start_gateways(
    bin: &Path,
    n: usize,
    sim: &SimHandle,
    redis: Option<&RedisServer>,
    http: &Http,
) -> (Vec<Gateway>, PathBuf) {
    let limit: RateLimit = LIMIT.parse().expect("limit");
    let dir = support::temp_dir(&format!("replicas-{n}"));
    let mut clients = String::new();
    for s in 0..SERVICES {
        clients.push_str(&support::client_toml(
            &format!("service-{s:02}"),
            &format!("replicas-key-{s:02}"),
            "scopes = [\"read\", \"write\"]",
        ));
    }
    let (backend, cache) = match redis {
        Some(_) => (
            format!(
                "backend = \"redis\"\nredis_url_env = \"CXGATE_BENCH_REDIS_URL\"\n\
                 key_prefix = \"rep{:08x}\"\nreplicas = {n}\n",
                fastrand::u32(..)
            ),
            "[cache]\nshared = true\n".to_string(),
        ),
        None => (String::new(), String::new()),
    };
    let mut gateways = Vec::new();
    for i in 0..n {
        let token_file = dir.join(format!("token-{i}.json"));
        cxgate::demo::write_token_file(
            &token_file,
            support::ACCESS,
            support::REFRESH,
            Duration::from_secs(3600),
        )
        .expect("token file");
        let (port, admin) = (support::free_port(), support::free_port());
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             request_timeout = \"10s\"\nshutdown_grace = \"2s\"\n\
             [upstream]\nbase_url = \"{}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\
             [token]\nfile = \"{}\"\n{cache}\
             [budget]\nlimit = {}\nperiod = \"{}ms\"\nburst = {BURST}\nmax_wait = \"2s\"\n{backend}\n\
             {clients}\n{}\n",
            sim.base_url(),
            token_file.display(),
            limit.limit,
            limit.period.as_millis(),
            support::ROUTES,
        );
        let config = dir.join(format!("cxgate-{i}.toml"));
        std::fs::write(&config, &text).expect("write config");
        let mut g = Gateway {
            bin: bin.to_path_buf(),
            config,
            log: dir.join(format!("gateway-{i}.log")),
            port,
            admin,
            child: None,
        };
        g.spawn();
        gateways.push(g);
    }
    for g in &mut gateways {
        g.ready(http).await;
    }
    (gateways, dir)
}

async fn start_sim() -> SimHandle {
    support::spawn_sim(SimOptions {
        rate_limit: Some(LIMIT.parse().expect("limit")),
        access_tokens: vec![support::ACCESS.to_string()],
        refresh_tokens: vec![support::REFRESH.to_string()],
        client_secret: support::CLIENT_SECRET.to_string(),
        faults: Faults {
            latency_ms: LATENCY_MS,
            ..Faults::default()
        },
        ..SimOptions::default()
    })
    .await
}

/// One row of the table.
struct Row {
    setup: &'static str,
    secs: f64,
    counts: Counts,
    upstream_calls: u64,
    upstream_limit: u64,
}

fn upstream(sim: &SimHandle) -> (u64, u64) {
    let stats = sim.stats();
    (
        stats["requests_total"].as_u64().unwrap_or(0),
        stats["rate_limited"].as_u64().unwrap_or(0),
    )
}

fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// 200 reads of one cold key at once, spread over `gateways`: upstream calls for it, and the
/// latencies (p50, max) of the answers; answers other than 200 are counted.
async fn cold_burst(
    http: &Http,
    gateways: &[Gateway],
    sim: &SimHandle,
    round: usize,
) -> (u64, Duration, Duration, usize) {
    let path = format!("{COLD_PREFIX}{round}-{:08x}", fastrand::u32(..));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..COLD_READS {
        let http = http.clone();
        let url = format!(
            "http://127.0.0.1:{}{path}",
            gateways[i % gateways.len()].port
        );
        tasks.spawn(async move {
            let req = Request::builder()
                .uri(url)
                .header("authorization", "Bearer replicas-key-00")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let started = Instant::now();
            let status = match http.request(req).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    status
                }
                Err(_) => 0,
            };
            (status, started.elapsed())
        });
    }
    let mut took = Vec::new();
    let mut bad = 0;
    while let Some(done) = tasks.join_next().await {
        let (status, t) = done.expect("read task");
        bad += usize::from(status != 200);
        took.push(t);
    }
    took.sort();
    let calls = sim.stats()["by_route"][format!("GET {path}")]
        .as_u64()
        .unwrap_or(0);
    (calls, took[took.len() / 2], took[took.len() - 1], bad)
}

fn binary() -> PathBuf {
    match std::env::var_os("CXGATE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/cxgate"),
    }
}

fn main() -> ExitCode {
    let bin = binary();
    if !bin.is_file() {
        eprintln!(
            "replicas: no gateway binary at {} (run `cargo build --release`, or set CXGATE_BIN)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let secs: u64 = std::env::var("REPLICAS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if rt.block_on(run(bin, Duration::from_secs(secs))) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(bin: PathBuf, period: Duration) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(redis) = RedisServer::start_or_skip("the replicas bench") else {
        return false;
    };
    // Read by the replicas from their environment, as in production.
    std::env::set_var("CXGATE_BENCH_REDIS_URL", redis.url());
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(64)
        .build_http();
    println!(
        "replicas bench: {SERVICES} services, {} s per period, upstream limit {LIMIT} (the \
         gateways' budget too, burst {BURST}), upstream latency {LATENCY_MS} ms; binary {}",
        period.as_secs(),
        bin.display()
    );
    println!("  load average at start: {}", load_average());
    let mut rows = Vec::new();

    // One gateway.
    let sim = start_sim().await;
    let (mut one, dir_one) = start_gateways(&bin, 1, &sim, None, &http).await;
    let lb = Arc::new(Balancer {
        http: http.clone(),
        addrs: one
            .iter()
            .map(|g| format!("127.0.0.1:{}", g.port))
            .collect(),
        next: AtomicUsize::new(0),
        tally: Tally::default(),
    });
    let started = Instant::now();
    let mut fleet = start_fleet(&lb, started + period);
    while fleet.join_next().await.is_some() {}
    let (calls, limited) = upstream(&sim);
    rows.push(Row {
        setup: "one gateway",
        secs: started.elapsed().as_secs_f64(),
        counts: lb.tally.counts(),
        upstream_calls: calls,
        upstream_limit: limited,
    });
    let mut other_seen = lb.tally.other_seen.lock().expect("seen").clone();
    for g in &mut one {
        g.stop();
    }
    sim.shutdown().await;
    println!("  load average after one gateway: {}", load_average());

    // Three replicas: one period for the table, then replica 0 restarted under load.
    let sim = start_sim().await;
    let (mut three, dir_three) = start_gateways(&bin, 3, &sim, Some(&redis), &http).await;
    let lb = Arc::new(Balancer {
        http: http.clone(),
        addrs: three
            .iter()
            .map(|g| format!("127.0.0.1:{}", g.port))
            .collect(),
        next: AtomicUsize::new(0),
        tally: Tally::default(),
    });
    let started = Instant::now();
    let mut fleet = start_fleet(&lb, started + 2 * period + Duration::from_secs(5));
    tokio::time::sleep_until(started + period).await;
    let counts = lb.tally.counts();
    let (calls, limited) = upstream(&sim);
    let cold_calls = three[0].upstream_calls(&http).await;
    rows.push(Row {
        setup: "three replicas",
        secs: started.elapsed().as_secs_f64(),
        counts,
        upstream_calls: calls,
        upstream_limit: limited,
    });
    println!("  load average after three replicas: {}", load_average());
    three[0].stop();
    three[0].spawn();
    three[0].ready(&http).await;
    let restarted_at = Instant::now();
    // The peers' calls over the same window: what new keys cost any replica then, restart
    // or not (the workload keeps reaching contacts nobody has read yet).
    let mut peers_before = 0;
    for g in &three[1..] {
        peers_before += g.upstream_calls(&http).await;
    }
    tokio::time::sleep_until(restarted_at + period).await;
    let warm_calls = three[0].upstream_calls(&http).await;
    let mut peers_after = 0;
    for g in &three[1..] {
        peers_after += g.upstream_calls(&http).await;
    }
    let peer_calls = (peers_after - peers_before) / 2;
    let restart_secs = restarted_at.elapsed().as_secs_f64();
    while fleet.join_next().await.is_some() {}
    let after_restart = lb.tally.counts();
    let (_, limited_after) = upstream(&sim);
    other_seen.extend(lb.tally.other_seen.lock().expect("seen").iter());

    // Cold bursts, the fleet stopped, the cold key's upstream at 100 ms.
    sim.set_faults(Faults {
        latency_ms: COLD_LATENCY_MS,
        path_prefix: Some(COLD_PREFIX.to_string()),
        ..Faults::default()
    });
    let mut bursts = Vec::new();
    for round in 0..3 {
        bursts.push(cold_burst(&http, &three, &sim, round).await);
    }
    let load = load_average();
    for g in &mut three {
        g.stop();
    }
    sim.shutdown().await;
    drop(redis);

    println!();
    println!(
        "{:<16} {:>7} {:>9} {:>11} {:>7} {:>7} {:>11} {:>9} {:>15}",
        "setup",
        "seconds",
        "requests",
        "successful",
        "429s",
        "429 %",
        "other/none",
        "upstream",
        "upstream limit"
    );
    for r in &rows {
        let c = &r.counts;
        println!(
            "{:<16} {:>7.1} {:>9} {:>11} {:>7} {:>6.2}% {:>11} {:>9} {:>15}",
            r.setup,
            r.secs,
            c.sent,
            c.ok,
            c.client_429,
            percent(c.client_429, c.sent),
            c.other + c.unanswered,
            r.upstream_calls,
            r.upstream_limit
        );
    }
    println!();
    let restart_errors =
        after_restart.other + after_restart.unanswered - counts.other - counts.unanswered;
    println!(
        "restart under load: replica 0 made {cold_calls} upstream calls in its first {:.0} s \
         cold, {warm_calls} in its first {restart_secs:.0} s after a restart ({:.1}%); requests \
         rerouted while it was down {}, failed {restart_errors}; upstream limit answers by the \
         end {limited_after}",
        period.as_secs_f64(),
        percent(warm_calls, cold_calls),
        after_restart.rerouted,
    );
    println!(
        "  in the same {restart_secs:.0} s each other replica made {peer_calls} (mean of the \
         two): the restart cost {} calls beyond a running replica's, {:.1}% of its cold \
         start",
        warm_calls.saturating_sub(peer_calls),
        percent(warm_calls.saturating_sub(peer_calls), cold_calls)
    );
    println!(
        "cold burst: {COLD_READS} concurrent reads of one new key over 3 replicas, upstream \
         {COLD_LATENCY_MS} ms"
    );
    for (round, (calls, p50, max, bad)) in bursts.iter().enumerate() {
        println!(
            "  round {round}: upstream calls {calls}, p50 {:.1} ms, max {:.1} ms, non-200 {bad}",
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    println!("  load average at the end: {load}");
    if !other_seen.is_empty() {
        println!("  other statuses seen: {other_seen:?}");
    }

    let (one, three_row) = (&rows[0], &rows[1]);
    let ratio = three_row.upstream_calls as f64 / one.upstream_calls.max(1) as f64;
    let refused = percent(three_row.counts.client_429, three_row.counts.sent);
    let p50s_ok = bursts
        .iter()
        .all(|(calls, p50, _, bad)| *calls == 1 && *p50 <= Duration::from_millis(150) && *bad == 0);
    let goals = [
        (
            format!("upstream calls within 5% of one gateway's: {:.3}x", ratio),
            ratio <= 1.05,
        ),
        (format!("refused <= 5%: {refused:.2}%"), refused <= 5.0),
        (
            format!(
                "0 upstream limit answers: {} and {} (by the end: {limited_after})",
                one.upstream_limit, three_row.upstream_limit
            ),
            one.upstream_limit == 0 && limited_after == 0,
        ),
        (
            "cold bursts: 1 upstream call, p50 <= 150 ms, all 200".to_string(),
            p50s_ok,
        ),
        (
            format!(
                "restarted replica <= 10% of its cold calls: {:.1}% ({:.1}% beyond a running \
                 replica's)",
                percent(warm_calls, cold_calls),
                percent(warm_calls.saturating_sub(peer_calls), cold_calls)
            ),
            warm_calls * 10 <= cold_calls,
        ),
        (
            "no client answer other than 2xx or 429, none unanswered".to_string(),
            rows.iter()
                .all(|r| r.counts.other == 0 && r.counts.unanswered == 0)
                && after_restart.other == 0
                && after_restart.unanswered == 0,
        ),
    ];
    let mut ok = true;
    for (goal, met) in &goals {
        println!("  {}: {goal}", if *met { "met   " } else { "MISSED" });
        ok &= met;
    }
    for dir in [dir_one, dir_three] {
        if ok {
            let _ = std::fs::remove_dir_all(dir);
        } else {
            println!("  configs and logs kept in {}", dir.display());
        }
    }
    ok
}
