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
//! The workload is the (20 services, Zipf contacts, `/me` and accounts every round,
//! mention polls, occasional writes, an upstream that enforces its limit): about 49,000
//! requests a minute, some 8% of them going upstream in a cold minute, against a limit
//! (4,000 a minute, the gateways' budget too, burst 660) that the cold minute's first
//! seconds overrun, so one gateway refuses a few percent and the refusal goal is put under
//! pressure. Each service
//! starts a job every 0.9 to 1.1 s whether the last one is done or not (clients do not wait
//! for a slow gateway): `/me`, `/me/accounts`, then a page of 40 contacts read at once
//! (Zipf, exponent 0.9, over 4,000 ids: a minute reaches about 3,850 of them, the next one
//! about 140 more), 0.1% of them followed by a write of that contact; and it polls its
//! account's mentions every 3 to 6 s, 5% of polls followed by a mention write. So the
//! second minute asks the upstream for about a tenth of a cold one, and the restart goal
//! (10%) sits at its edge on the workload's steady misses alone (the arithmetic: [`IDS`]).
//! Each service draws from its own seeded generator, so both setups get the same requests,
//! sent to the next gateway in turn (a load balancer: a request refused at connect, or a
//! read whose connection closed unanswered, goes to the next one).
//!
//! Then, on the three replicas: a replica restarted under load (SIGTERM, started again on
//! its ports), its upstream calls in its first period against its first period cold, beside
//! what each running replica made in the same period, and every call the clients saw it
//! make sorted by why (a key nobody had fetched, one nobody had fetched that a client was
//! refused earlier, one a write invalidated, one past its ttl, or one another fetch had put
//! in the shared tier: the restart's own cost), and the fleet's calls then; and 200
//! concurrent cold reads of one key spread over the three behind a 100 ms upstream
//! (upstream calls and latency), three rounds.
//!
//! Run: `cargo build --release && cargo bench --bench replicas` (60 s per period: about 4
//! minutes in all); `REPLICAS_SECS=15` for a quick run (a shorter cold period, so the
//! ratios differ). Exits 1 when a goal is missed or a client got an answer other than 2xx
//! or the gateway's 429.

mod support;

use std::collections::HashMap;
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

/// The simulator's limit per token, and the gateways' budget (shared by the replicas): about
/// what a cold minute of this workload asks for, most of it in its first seconds, so the
/// limit binds there. The burst (10 s of the budget's pace) lets a cold start use the
/// upstream's window, which is counted per minute, not per second.
const LIMIT: &str = "4000/1m";
const BURST: u32 = 660;
const SERVICES: usize = 20;
/// The contact ids, drawn with [`ZIPF_EXPONENT`]; with them the restart goal (10% of a cold
/// minute) sits at its edge. 800 reads a second (20 services, 40 a job, a job a second)
/// reach 3,845 ids in a minute (the expected distinct count of 48,000 draws) and 125-140
/// more in the next (135 seen). With the writes (0.1% of the contact reads and 5% of ~267
/// mention polls: ~61 a minute, 73 for these seeds), a refetch after each and a few
/// mention-list expiries, the fleet's second minute is about 280 calls against a cold
/// minute the limit holds to ~3,800: 7.4%. First fetches of reads the cold minute's budget
/// refused come on top (100-150 a run) and make it 10-11%, for every replica alike (each
/// makes a third of the fleet's calls) whatever the restart costs. And that holds only
/// before the contacts' 5-minute ttl ends: past it the fleet refetches about 760 contacts a
/// minute (an id read r times a minute is fetched once per 5 + 1/r minutes), with the
/// writes ~23% of a cold minute, restarted or not.
const IDS: usize = 4_000;
const ZIPF_EXPONENT: f64 = 0.9;
/// A job starts this often (ms), per service.
const JOB_EVERY_MS: std::ops::Range<u64> = 900..1100;
/// Contacts a job reads at once (a page of a list).
const READS_PER_JOB: usize = 40;
const CONTACT_WRITE_SHARE: f64 = 0.001;
/// A mention poll this often (ms), per service.
const POLL_EVERY_MS: std::ops::Range<u64> = 3000..6000;
const MENTION_WRITE_SHARE: f64 = 0.05;
const ACCOUNTS: [u64; 3] = [12345, 23456, 34567];
/// Upstream latency of every call during the workload.
const LATENCY_MS: u64 = 50;
/// Upstream latency of the cold-burst key, and its prefix.
const COLD_LATENCY_MS: u64 = 100;
const COLD_PREFIX: &str = "/12345/inbox/contact/cold/";
const COLD_READS: usize = 200;
/// The routes' ttls (`support::ROUTES`), to tell a refetch past its ttl from one within it.
fn ttl_of(path: &str) -> Duration {
    if path.contains("/inbox/mentions") {
        Duration::from_secs(15)
    } else if path.contains("/inbox/contact/") {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(600)
    }
}

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
    other_seen: Mutex<Vec<(u16, String)>>,
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

/// What went upstream as the clients saw it (a read answered with `fwd=` and not collapsed
/// into another request's call, or a write), when and through which gateway, when writes
/// invalidated a read, and when a gateway refused: to tell why a replica called the
/// upstream, and who refused when.
#[derive(Default)]
struct Trace {
    /// Per path: when, through which gateway, and whether the answer was stored.
    fetched: HashMap<String, Vec<(Instant, usize, bool)>>,
    writes: Vec<(Instant, usize)>,
    invalidated: HashMap<String, Vec<Instant>>,
    /// When, through which gateway, and for which read (`None` for a write).
    refused: Vec<(Instant, usize, Option<String>)>,
}

/// Why a replica's call went upstream, judged by what the clients saw before it.
#[derive(Debug, Default, Clone, Copy)]
struct Why {
    /// No gateway had fetched the key before, and no client had been refused it.
    new: u64,
    /// No gateway had fetched the key before, but a client was refused it (429) earlier:
    /// a read the cold minute's budget turned away, paid for now.
    refused_before: u64,
    /// Its last fetch was answered but not stored (`Cache-Status` without `stored`).
    unstored: u64,
    /// A write invalidated it since its last fetch.
    written: u64,
    /// Its last fetch is older than the route's ttl.
    expired: u64,
    /// Fetched before, within its ttl, not invalidated: the shared tier held it.
    shared: u64,
    writes: u64,
    /// The reads above by route: contacts, mention lists, `/me` and accounts, the rest.
    by_route: [u64; 4],
}

/// Where [`Why::by_route`] counts a read of `path`.
fn route_of(path: &str) -> usize {
    if path.contains("/inbox/contact/") {
        0
    } else if path.contains("/inbox/mentions") {
        1
    } else if path.starts_with("/me") {
        2
    } else {
        3
    }
}

impl Trace {
    /// The calls `gateway` made in `[from, to)`, by why.
    fn why(&self, gateway: usize, from: Instant, to: Instant) -> Why {
        let mut why = Why::default();
        let mut first_refused: HashMap<&str, Instant> = HashMap::new();
        for (at, _, path) in &self.refused {
            if let Some(path) = path {
                first_refused.entry(path.as_str()).or_insert(*at);
            }
        }
        for (path, fetches) in &self.fetched {
            for (i, &(at, g, _)) in fetches.iter().enumerate() {
                if g != gateway || at < from || at >= to {
                    continue;
                }
                why.by_route[route_of(path)] += 1;
                // Fetches are pushed as answers land, so the ones before are earlier.
                let Some(&(last, _, stored)) = i.checked_sub(1).map(|j| &fetches[j]) else {
                    if first_refused.get(path.as_str()).is_some_and(|&t| t < at) {
                        why.refused_before += 1;
                    } else {
                        why.new += 1;
                    }
                    continue;
                };
                let written = self
                    .invalidated
                    .get(path)
                    .is_some_and(|w| w.iter().any(|&t| t > last && t <= at));
                if written {
                    why.written += 1;
                } else if !stored {
                    why.unstored += 1;
                } else if at.duration_since(last) > ttl_of(path) {
                    why.expired += 1;
                } else {
                    why.shared += 1;
                }
            }
        }
        why.writes = self
            .writes
            .iter()
            .filter(|&&(at, g)| g == gateway && at >= from && at < to)
            .count() as u64;
        why
    }
}

/// The client 429s of a window, as the clients saw them: by route, and for a read, what
/// became of its key (to tell a refusal the cache or another request's call could have
/// answered from one no call did).
#[derive(Debug, Default, Clone, Copy)]
struct Refusals {
    /// Reads by route (see [`route_of`]), and writes.
    by_route: [u64; 4],
    writes: u64,
    /// A fetch of the key was answered within 3 s after the refusal: another request's
    /// call (queued for budget, or on its way) that the refused read could have taken.
    fetched_soon: u64,
    /// The key had been fetched and stored within its ttl before: a hit refused.
    cached_before: u64,
    /// The key was fetched later in the window, not within 3 s.
    fetched_later: u64,
    /// No fetch of the key in the window after the refusal.
    never: u64,
}

impl Trace {
    /// The client 429s of `[from, to)`, sorted as [`Refusals`] says.
    fn refusals(&self, from: Instant, to: Instant) -> Refusals {
        let mut r = Refusals::default();
        let soon = Duration::from_secs(3);
        for (at, _, path) in &self.refused {
            if *at < from || *at >= to {
                continue;
            }
            let Some(path) = path else {
                r.writes += 1;
                continue;
            };
            r.by_route[route_of(path)] += 1;
            let fetches = self.fetched.get(path).map(Vec::as_slice).unwrap_or(&[]);
            let cached = fetches.iter().any(|&(t, _, stored)| {
                stored
                    && t < *at
                    && at.duration_since(t) < ttl_of(path)
                    && !self
                        .invalidated
                        .get(path)
                        .is_some_and(|w| w.iter().any(|&w| w > t && w <= *at))
            });
            let next = fetches
                .iter()
                .map(|f| f.0)
                .filter(|t| t > at && *t < to)
                .min();
            if cached {
                r.cached_before += 1;
            } else if next.is_some_and(|t| t.duration_since(*at) <= soon) {
                r.fetched_soon += 1;
            } else if next.is_some() {
                r.fetched_later += 1;
            } else {
                r.never += 1;
            }
        }
        r
    }
}

/// The gateways the fleet sends to, in turn.
struct Balancer {
    http: Http,
    addrs: Vec<String>,
    next: AtomicUsize,
    tally: Tally,
    trace: Mutex<Trace>,
}

impl Balancer {
    fn new(http: &Http, gateways: &[Gateway]) -> Balancer {
        Balancer {
            http: http.clone(),
            addrs: gateways
                .iter()
                .map(|g| format!("127.0.0.1:{}", g.port))
                .collect(),
            next: AtomicUsize::new(0),
            tally: Tally::default(),
            trace: Mutex::new(Trace::default()),
        }
    }

    fn trace(&self) -> std::sync::MutexGuard<'_, Trace> {
        self.trace.lock().expect("trace")
    }

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
            let gateway = (first + attempt) % self.addrs.len();
            let addr = &self.addrs[gateway];
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
                    // Refused at connect; or, for a read, a kept-alive connection the gateway
                    // closed as it shut down before answering: a balancer retries those.
                    Ok(Err(e)) if e.is_connect() || method == Method::GET => {
                        self.tally.rerouted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => break,
                };
            let status = resp.status().as_u16();
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
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let now = Instant::now();
            match status {
                200..=299 => {
                    if method == Method::POST {
                        self.trace().writes.push((now, gateway));
                    } else if cache.contains("fwd=") && !cache.contains("collapsed") {
                        let mut trace = self.trace();
                        let fetches = trace.fetched.entry(path.to_string()).or_default();
                        fetches.push((now, gateway, cache.contains("stored")));
                    }
                    self.tally.ok.fetch_add(1, Ordering::Relaxed)
                }
                429 => {
                    let read = (method == Method::GET).then(|| path.to_string());
                    self.trace().refused.push((now, gateway, read));
                    self.tally.client_429.fetch_add(1, Ordering::Relaxed)
                }
                other => {
                    let mut seen = self.tally.other_seen.lock().expect("other statuses");
                    if seen.len() < 8 {
                        let body = String::from_utf8_lossy(&body[..body.len().min(160)]);
                        seen.push((other, format!("{method} {path}: {body}")));
                    }
                    self.tally.other.fetch_add(1, Ordering::Relaxed)
                }
            };
            return Some((status, body));
        }
        self.tally.unanswered.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Notes that a write answered 2xx invalidated the read at `path`.
    fn invalidated(&self, path: &str) {
        let mut trace = self.trace();
        let at = Instant::now();
        trace
            .invalidated
            .entry(path.to_string())
            .or_default()
            .push(at);
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

    /// A job every [`JOB_EVERY_MS`] until the deadline, each started on time even when the
    /// one before is still waiting for answers; every draw is made here, in order, so the
    /// requests do not depend on how fast the gateways answer.
    async fn jobs(mut self, zipf: Arc<Zipf>) {
        let mut due = Instant::now() + Duration::from_millis(self.rng.u64(0..1000));
        let mut running = tokio::task::JoinSet::new();
        while due < self.deadline {
            tokio::time::sleep_until(due).await;
            let page: Vec<(usize, Option<u32>)> = (0..READS_PER_JOB)
                .map(|_| {
                    let id = zipf.sample_with(&mut self.rng);
                    let write = (self.rng.f64() < CONTACT_WRITE_SHARE).then(|| self.rng.u32(..));
                    (id, write)
                })
                .collect();
            running.spawn(job(self.lb.clone(), self.key.clone(), page));
            while running.try_join_next().is_some() {}
            due += Duration::from_millis(self.rng.u64(JOB_EVERY_MS));
        }
        while running.join_next().await.is_some() {}
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
                        let written = self.lb.send(&self.key, Method::POST, &path, form).await;
                        if matches!(written, Some((200..=299, _))) {
                            self.lb.invalidated(&list);
                        }
                    }
                }
            }
            if !self.pause(POLL_EVERY_MS).await {
                break;
            }
        }
    }
}

/// One job: `/me` and `/me/accounts`, then its page of contacts read at once, each read
/// with a write drawn followed by that write.
async fn job(lb: Arc<Balancer>, key: String, page: Vec<(usize, Option<u32>)>) {
    lb.send(&key, Method::GET, "/me", "").await;
    lb.send(&key, Method::GET, "/me/accounts", "").await;
    let mut reads = tokio::task::JoinSet::new();
    for (id, write) in page {
        let (lb, key) = (lb.clone(), key.clone());
        reads.spawn(async move {
            let path = format!("/12345/inbox/contact/twitter/{id}");
            lb.send(&key, Method::GET, &path, "").await;
            if let Some(note) = write {
                let form = format!("updates=%7B%22crm_note%22%3A%22seen+{note}%22%7D");
                let written = lb.send(&key, Method::POST, &path, &form).await;
                if matches!(written, Some((200..=299, _))) {
                    lb.invalidated(&path);
                }
            }
        });
    }
    while reads.join_next().await.is_some() {}
}

/// Starts the fleet against `lb` until `deadline`; the tasks end by themselves.
fn start_fleet(lb: &Arc<Balancer>, deadline: Instant) -> tokio::task::JoinSet<()> {
    let zipf = Arc::new(Zipf::new(IDS, ZIPF_EXPONENT));
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

    /// This process's `cxgate_budget_rejections_total` by budget: global, client, upstream.
    async fn rejections(&self, http: &Http) -> [u64; 3] {
        let text = support::metrics::scrape(http, &format!("127.0.0.1:{}", self.admin)).await;
        ["global", "client", "upstream"].map(|budget| {
            let label = format!("budget=\"{budget}\"");
            text.lines()
                .filter(|l| l.starts_with("cxgate_budget_rejections_total{") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        })
    }

    /// Upstream calls this process made since it started (`cxgate_upstream_requests_total`).
    async fn upstream_calls(&self, http: &Http) -> u64 {
        let text = support::metrics::scrape(http, &format!("127.0.0.1:{}", self.admin)).await;
        support::metrics::sum(&text, "cxgate_upstream_requests_total") as u64
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
        if status != 200 && bad == 0 {
            println!("  cold burst round {round}: first answer other than 200: {status}");
        }
        bad += usize::from(status != 200);
        took.push(t);
    }
    took.sort();
    let calls = sim.stats()["by_route"][format!("GET {path}")]
        .as_u64()
        .unwrap_or(0);
    (calls, took[took.len() / 2], took[took.len() - 1], bad)
}

/// Waits (at most `limit`) until a read of a key nobody asked for is answered 200 through
/// every gateway; how long that took.
async fn budget_back(http: &Http, gateways: &[Gateway], limit: Duration) -> Duration {
    let started = Instant::now();
    for (i, g) in gateways.iter().enumerate() {
        for attempt in 0u32.. {
            let req = Request::builder()
                .uri(format!(
                    "http://127.0.0.1:{}/12345/inbox/contact/probe/{i}-{attempt}",
                    g.port
                ))
                .header("authorization", "Bearer replicas-key-00")
                .body(Full::new(Bytes::new()))
                .expect("request");
            let ok = matches!(http.request(req).await, Ok(r) if r.status() == 200);
            if ok || started.elapsed() > limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    started.elapsed()
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

/// The client 429s in `trace`, per gateway, in 10 s buckets from `from`.
fn refusals_by_time(trace: &Trace, gateways: usize, from: Instant) -> Vec<Vec<u64>> {
    let mut buckets = vec![Vec::new(); gateways];
    for &(at, g, _) in &trace.refused {
        let i = (at.saturating_duration_since(from).as_secs() / 10) as usize;
        if buckets[g].len() <= i {
            buckets[g].resize(i + 1, 0);
        }
        buckets[g][i] += 1;
    }
    buckets
}

fn print_refusals(setup: &str, buckets: &[Vec<u64>]) {
    for (g, counts) in buckets.iter().enumerate() {
        if counts.iter().any(|&n| n > 0) {
            println!("  {setup}, gateway {g}: client 429s per 10 s from its start {counts:?}");
        }
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
        .pool_max_idle_per_host(1024)
        .build_http();
    println!(
        "replicas bench: {SERVICES} services, {} s per period, upstream limit {LIMIT} (the \
         gateways' budget too, burst {BURST}), upstream latency {LATENCY_MS} ms; a job per \
         service every {JOB_EVERY_MS:?} ms reading {READS_PER_JOB} contacts at once (Zipf \
         {ZIPF_EXPONENT} over {IDS} ids); binary {}",
        period.as_secs(),
        bin.display()
    );
    println!("  load average at start: {}", load_average());
    let mut rows = Vec::new();

    // One gateway.
    let sim = start_sim().await;
    let (mut one, dir_one) = start_gateways(&bin, 1, &sim, None, &http).await;
    let lb = Arc::new(Balancer::new(&http, &one));
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
    let refused_one = refusals_by_time(&lb.trace(), 1, started);
    let why_one = lb.trace().why(0, started, Instant::now());
    let sorted_one = lb.trace().refusals(started, Instant::now());
    let rejections_one = one[0].rejections(&http).await;
    let mut other_seen = lb.tally.other_seen.lock().expect("seen").clone();
    for g in &mut one {
        g.stop();
    }
    sim.shutdown().await;
    println!("  load average after one gateway: {}", load_average());

    // Three replicas: one period for the table, then replica 0 restarted under load.
    let sim = start_sim().await;
    let (mut three, dir_three) = start_gateways(&bin, 3, &sim, Some(&redis), &http).await;
    let lb = Arc::new(Balancer::new(&http, &three));
    let started = Instant::now();
    let mut fleet = start_fleet(&lb, started + 2 * period + Duration::from_secs(5));
    tokio::time::sleep_until(started + period).await;
    let counts = lb.tally.counts();
    let (calls, limited) = upstream(&sim);
    let mut cold = Vec::new();
    let mut rejections_three = [0; 3];
    for g in &three {
        cold.push(g.upstream_calls(&http).await);
        for (sum, n) in rejections_three.iter_mut().zip(g.rejections(&http).await) {
            *sum += n;
        }
    }
    let sorted_three = lb.trace().refusals(started, started + period);
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
    // The peers' calls over the same window: what the workload's steady misses (new keys,
    // writes, expiries) cost any replica then, restart or not.
    let mut peers_before = Vec::new();
    for g in &three[1..] {
        peers_before.push(g.upstream_calls(&http).await);
    }
    tokio::time::sleep_until(restarted_at + period).await;
    let warm_calls = three[0].upstream_calls(&http).await;
    let mut peer_calls = Vec::new();
    for (g, before) in three[1..].iter().zip(&peers_before) {
        peer_calls.push(g.upstream_calls(&http).await.saturating_sub(*before));
    }
    let restart_secs = restarted_at.elapsed().as_secs_f64();
    let restart_end = Instant::now();
    while fleet.join_next().await.is_some() {}
    let after_restart = lb.tally.counts();
    let (_, limited_after) = upstream(&sim);
    other_seen.extend(lb.tally.other_seen.lock().expect("seen").iter().cloned());
    let (why, refused_three) = {
        let trace = lb.trace();
        let why: Vec<Why> = (0..three.len())
            .map(|g| trace.why(g, restarted_at, restart_end))
            .collect();
        let cold: Vec<Why> = (0..three.len())
            .map(|g| trace.why(g, started, started + period))
            .collect();
        println!("  three replicas' calls in their first period, by why: {cold:?}");
        (why, refusals_by_time(&trace, three.len(), started))
    };

    // Cold bursts, the fleet stopped, the cold key's upstream at 100 ms.
    sim.set_faults(Faults {
        latency_ms: COLD_LATENCY_MS,
        path_prefix: Some(COLD_PREFIX.to_string()),
        ..Faults::default()
    });
    // The fleet may have left the budget spent (or the upstream's window used up): the
    // bursts measure merging, so they start once every replica admits a call again.
    let budget_back = budget_back(&http, &three, Duration::from_secs(90)).await;
    println!("  cold bursts start once every replica admits a call again: after {budget_back:.1?}");
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
    let one_row = &rows[0];
    println!(
        "  one gateway: upstream calls {:.1}% of its requests",
        percent(one_row.upstream_calls, one_row.counts.sent)
    );
    println!(
        "  three replicas' upstream calls in their first {:.0} s: {cold:?}",
        period.as_secs_f64()
    );
    println!("  one gateway's calls by why (see below): {why_one:?}");
    for (setup, sorted, rejections) in [
        ("one gateway", sorted_one, rejections_one),
        ("three replicas", sorted_three, rejections_three),
    ] {
        println!(
            "  {setup}, client 429s: reads of contacts {}, mentions {}, /me and accounts {}, \
             other {}, writes {}; the read's key: fetched by another call within 3 s {}, \
             cached (stored within its ttl) before {}, fetched later {}, not fetched {}; \
             budget rejections (global, client, upstream) {rejections:?}",
            sorted.by_route[0],
            sorted.by_route[1],
            sorted.by_route[2],
            sorted.by_route[3],
            sorted.writes,
            sorted.fetched_soon,
            sorted.cached_before,
            sorted.fetched_later,
            sorted.never,
        );
    }
    print_refusals("one gateway", &refused_one);
    print_refusals("three replicas", &refused_three);
    let restart_errors =
        after_restart.other + after_restart.unanswered - counts.other - counts.unanswered;
    let cold_calls = cold[0];
    let peer_mean = peer_calls.iter().sum::<u64>() / peer_calls.len().max(1) as u64;
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
        "  in the same {restart_secs:.0} s the running replicas made {peer_calls:?} ({:.1}% of \
         their own cold starts {:?}): the restart cost {} calls beyond a running replica's \
         mean, {:.1}% of its cold start",
        percent(peer_mean, (cold[1] + cold[2]) / 2),
        &cold[1..],
        warm_calls.saturating_sub(peer_mean),
        percent(warm_calls.saturating_sub(peer_mean), cold_calls)
    );
    println!(
        "  why, as the clients saw each call in that window (reads: new key, new but refused \
         (429) earlier, after a write, its last fetch not stored, past its ttl, held in the \
         shared tier; then writes):"
    );
    for (g, w) in why.iter().enumerate() {
        println!(
            "    replica {g}{}: new {}, refused earlier {}, after a write {}, not stored {}, past \
             ttl {}, in the shared tier {}, writes {}; reads by route: contacts {}, mentions \
             {}, /me and accounts {}, other {}",
            if g == 0 { " (restarted)" } else { "" },
            w.new,
            w.refused_before,
            w.written,
            w.unstored,
            w.expired,
            w.shared,
            w.writes,
            w.by_route[0],
            w.by_route[1],
            w.by_route[2],
            w.by_route[3]
        );
    }
    // The same window for the whole fleet: what the restarted replica's figure is a third
    // of, and how much of it earlier refusals (the cold minute's, mostly) left over.
    let fleet_warm = warm_calls + peer_calls.iter().sum::<u64>();
    let fleet_cold = cold.iter().sum::<u64>();
    let carried: u64 = why.iter().map(|w| w.refused_before).sum();
    println!(
        "  the fleet in that window: {fleet_warm} calls, {:.1}% of its cold period's \
         {fleet_cold}; {carried} of them first fetches of reads a client was refused \
         earlier ({:.1}% of it); the restarted replica's share {:.1}% (a third: 33.3%)",
        percent(fleet_warm, fleet_cold),
        percent(carried, fleet_cold),
        percent(warm_calls, fleet_warm)
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
        (
            format!(
                "refused <= 5%: {refused:.2}% (one gateway {:.2}%)",
                percent(one.counts.client_429, one.counts.sent)
            ),
            refused <= 5.0,
        ),
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
                "restarted replica <= 10% of its cold calls: {:.1}% (running replicas {:.1}%; \
                 {:.1}% beyond theirs)",
                percent(warm_calls, cold_calls),
                percent(peer_mean, (cold[1] + cold[2]) / 2),
                percent(warm_calls.saturating_sub(peer_mean), cold_calls)
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
