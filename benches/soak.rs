//! The soak run: a bounded, steady, mixed load with injected faults against the real binary,
//! watching the gateway's resident memory and open descriptors.
//!
//! The gateway runs as a child process (`cxgate run --config <temp file>`), so its memory
//! (`VmRSS` in `/proc/<pid>/status`) and descriptors (entries of `/proc/<pid>/fd`) are its
//! own and not the load generator's. The binary is `$CXGATE_BIN` when set, else
//! `target/release/cxgate` under the crate root: build it first. The simulated CX Social API
//! runs inside this process, so its fault set is switched directly.
//!
//! Run (10 minutes):
//!
//! ```sh
//! cargo build --release && cargo bench --bench soak -- --minutes 10
//! ```
//!
//! `-- --seconds 60` is a short check; `--rate N` changes the request rate (200/s).
//!
//! What it does, all on 127.0.0.1:
//! - Config: the test route table, a budget no traffic reaches, `cache.max_bytes = 8MiB` (so
//!   the bound is exercised: cold contact reads over a million ids and 100-mention pages of
//!   about 90 KB fill it within a minute and then evict), upstream timeout 2 s, a token file
//!   with OAuth refresh against the simulator (tokens live 5 minutes, refreshed 1 minute
//!   before expiry, so a 10-minute run refreshes twice, faults or not).
//! - Load: a fixed-interval ticker sends `--rate` requests/s in total from four tasks, each
//!   request in its own task so a slow answer does not slow the rate (at most 512 in flight;
//!   ticks beyond that are counted as skipped). Mix: 35% hits (`/me`, `/me/accounts`), 10%
//!   reads of 200 hot contacts (mostly hits), 40% cold contact reads and 5% mention pages
//!   (misses), 5% contact writes and 5% mention writes (which invalidate by tag).
//! - Faults: after a warm-up, a 5 s window every 30 s, in turn: 50% of upstream answers 503;
//!   3 s latency (above `upstream.timeout`); 30% of upstream connections dropped. No window
//!   in the last 30 s, so the end figures are taken in calm. Short runs scale the warm-up,
//!   the calm tail and the period down so that each kind still happens at least once.
//! - Samples every 5 s: RSS, descriptors (split into client-side sockets, upstream sockets
//!   and the rest, from `/proc/<pid>/net/tcp`), and `cxgate_cache_bytes` from `/metrics`.
//!
//! Report: start (first sample after the warm-up), middle, end and max of each curve,
//! requests by kind and status, and the gateway's exit after SIGTERM. Exits 1 when:
//! - a 5xx came that no fault explains (explained: the request was in flight during a fault
//!   window or within 2 s after it);
//! - any request got no answer at all (reset, timeout) or a 4xx: the load is all valid and
//!   the budget out of reach, so either is a gateway failure whatever the faults did;
//! - end descriptors exceed start descriptors + 16;
//! - max RSS exceeds `cache.max_bytes` + 64 MiB. The 64 MiB fixed overhead covers what is
//!   not cached bodies: code and runtime, thread stacks, connection buffers, in-flight
//!   bodies (up to a few hundred during a latency window) and allocator slack. It is set
//!   for the release binary; a debug build (`CXGATE_BIN=target/debug/cxgate`) needs more;
//! - requests are still in flight 20 s after the load stopped.
//!
//! The config and the gateway's log stay in the temp directory named at the end when a
//! check fails.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use cxgate::sim::{Faults, SimHandle, SimOptions};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio::time::Instant;

const USAGE: &str = "\
cargo bench --bench soak -- [options]
  --minutes N   how long the load runs (10)
  --seconds N   the same in seconds, for a short check
  --rate N      requests per second in total (200)
The gateway binary is $CXGATE_BIN, else target/release/cxgate (cargo build --release).";

const MAX_BYTES: &str = "8MiB";
/// What the gateway may hold beyond `cache.max_bytes` (see the module comment).
const OVERHEAD: u64 = 64 << 20;
/// How far end descriptors may exceed start descriptors: a few connections in flight at the
/// moment of sampling, not a leak.
const FD_SLACK: usize = 16;
/// A 5xx this long after a fault window closed is still that window's.
const EXPLAIN_AFTER: Duration = Duration::from_secs(2);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
const DRIVERS: u32 = 4;
const MAX_IN_FLIGHT: usize = 512;
/// Upstream timeout in the config; the latency fault is above it.
const UPSTREAM_TIMEOUT_MS: u64 = 2000;
const TOKEN_TTL: Duration = Duration::from_secs(300);
/// Contact ids read often enough to stay cached, and the far larger cold range.
const HOT_CONTACTS: u64 = 200;
const COLD_CONTACTS: u64 = 1_000_000;
/// Mention pages are read on another account than mention writes go to: a write
/// invalidates every page of its account, which would keep the pages from ever filling
/// the cache.
const PAGE_ACCOUNT: u64 = 23456;
const WRITE_ACCOUNT: u64 = 12345;

struct Args {
    duration: Duration,
    rate: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(600),
        rate: 200,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        // `cargo bench` appends `--bench` to every bench's arguments.
        if flag == "--bench" {
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = argv.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|e| format!("{flag} {value}: {e}"))
        };
        match flag.as_str() {
            "--minutes" => args.duration = Duration::from_secs(number()? * 60),
            "--seconds" => args.duration = Duration::from_secs(number()?),
            "--rate" => args.rate = u32::try_from(number()?).map_err(|e| format!("{e}"))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.duration < Duration::from_secs(30) {
        return Err("the run needs at least 30 s (warm-up, three fault windows, calm tail)".into());
    }
    if args.rate < DRIVERS {
        return Err(format!("--rate must be at least {DRIVERS}"));
    }
    Ok(args)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Me,
    Accounts,
    HotContact,
    ColdContact,
    MentionPage,
    ContactWrite,
    MentionWrite,
}

impl Kind {
    /// Kinds with their share of the load in percent.
    const MIX: [(Kind, u32); 7] = [
        (Kind::Me, 20),
        (Kind::Accounts, 15),
        (Kind::HotContact, 10),
        (Kind::ColdContact, 40),
        (Kind::MentionPage, 5),
        (Kind::ContactWrite, 5),
        (Kind::MentionWrite, 5),
    ];

    fn pick() -> Kind {
        let mut roll = fastrand::u32(0..100);
        for (kind, share) in Kind::MIX {
            if roll < share {
                return kind;
            }
            roll -= share;
        }
        Kind::Me
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Me => "hit   GET /me",
            Kind::Accounts => "hit   GET /me/accounts",
            Kind::HotContact => "hit   GET hot contact",
            Kind::ColdContact => "miss  GET cold contact",
            Kind::MentionPage => "miss  GET mention page",
            Kind::ContactWrite => "write POST contact",
            Kind::MentionWrite => "write POST mention",
        }
    }

    /// Method, path and form body of one request of this kind.
    fn request(self) -> (Method, String, &'static str) {
        let contact = |id: u64| format!("/{WRITE_ACCOUNT}/inbox/contact/twitter/{id}");
        match self {
            Kind::Me => (Method::GET, "/me".into(), ""),
            Kind::Accounts => (Method::GET, "/me/accounts".into(), ""),
            Kind::HotContact => (Method::GET, contact(fastrand::u64(0..HOT_CONTACTS)), ""),
            Kind::ColdContact => (
                Method::GET,
                contact(HOT_CONTACTS + fastrand::u64(0..COLD_CONTACTS)),
                "",
            ),
            Kind::MentionPage => (
                Method::GET,
                format!(
                    "/{PAGE_ACCOUNT}/inbox/mentions?limit=100&page_token=pt{}",
                    fastrand::u64(0..400)
                ),
                "",
            ),
            Kind::ContactWrite => (
                Method::POST,
                contact(fastrand::u64(0..HOT_CONTACTS)),
                "updates=%7B%22email%22%3A%22ops%40example.com%22%7D",
            ),
            Kind::MentionWrite => (
                Method::POST,
                format!("/{WRITE_ACCOUNT}/inbox/mention/{WRITE_ACCOUNT}1/m1"),
                "updates=%7B%22status%22%3A%22closed%22%7D",
            ),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Errors,
    Slow,
    Drops,
}

impl Fault {
    const TURN: [Fault; 3] = [Fault::Errors, Fault::Slow, Fault::Drops];

    fn faults(self) -> Faults {
        match self {
            Fault::Errors => Faults {
                error_rate: 0.5,
                error_status: 503,
                ..Faults::default()
            },
            Fault::Slow => Faults {
                latency_ms: UPSTREAM_TIMEOUT_MS + 1000,
                ..Faults::default()
            },
            Fault::Drops => Faults {
                drop_rate: 0.3,
                ..Faults::default()
            },
        }
    }

    fn label(self) -> String {
        match self {
            Fault::Errors => "50% upstream 503".into(),
            Fault::Slow => format!(
                "{} ms upstream latency (timeout {} ms)",
                UPSTREAM_TIMEOUT_MS + 1000,
                UPSTREAM_TIMEOUT_MS
            ),
            Fault::Drops => "30% upstream connections dropped".into(),
        }
    }
}

/// When the faults come: windows of `window` every `period` between the warm-up and the
/// calm tail.
struct Schedule {
    warmup: Duration,
    tail: Duration,
    period: Duration,
    window: Duration,
    windows: Vec<(Duration, Fault)>,
}

impl Schedule {
    fn new(run: Duration) -> Schedule {
        let warmup = (run / 4).min(Duration::from_secs(30));
        let tail = (run / 4).min(Duration::from_secs(30));
        // At least three periods fit, so every kind of fault comes at least once.
        let period = ((run - warmup - tail) / 3).min(Duration::from_secs(30));
        let window = (period / 2).min(Duration::from_secs(5));
        let mut windows = Vec::new();
        let mut at = warmup + period / 2;
        while at + window <= run - tail {
            windows.push((at, Fault::TURN[windows.len() % Fault::TURN.len()]));
            at += period;
        }
        Schedule {
            warmup,
            tail,
            period,
            window,
            windows,
        }
    }
}

/// What the requests of one kind got.
#[derive(Default, Clone, Copy)]
struct Tally {
    sent: u64,
    ok: u64,
    hits: u64,
    client_errors: u64,
    explained_5xx: u64,
    unexplained_5xx: u64,
    no_answer: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.hits += other.hits;
        self.client_errors += other.client_errors;
        self.explained_5xx += other.explained_5xx;
        self.unexplained_5xx += other.unexplained_5xx;
        self.no_answer += other.no_answer;
    }

    fn print_row(&self, label: &str) {
        println!(
            "  {label:<24}{:>8}{:>8}{:>8}{:>6}{:>10}{:>12}{:>10}",
            self.sent,
            self.ok,
            self.hits,
            self.client_errors,
            self.explained_5xx,
            self.unexplained_5xx,
            self.no_answer
        );
    }
}

/// State the load, fault and sampling tasks share.
struct Shared {
    started: Instant,
    /// Fault windows as applied: start and, once over, end (times since `started`).
    windows: Mutex<Vec<(Duration, Option<Duration>)>>,
    tallies: Mutex<BTreeMap<Kind, Tally>>,
    statuses: Mutex<BTreeMap<u16, u64>>,
    /// The first few failures in detail, to look up in the gateway's log.
    failures: Mutex<Vec<String>>,
    skipped: AtomicU64,
    sent: AtomicU64,
}

impl Shared {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        // A panicking request task must not hide the figures of all the others.
        m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a request in flight from `sent` to `done` overlaps a fault window or the
    /// `EXPLAIN_AFTER` that follows it.
    fn explained(&self, sent: Duration, done: Duration) -> bool {
        Shared::lock(&self.windows).iter().any(|(start, end)| {
            let until = end.map_or(Duration::MAX, |e| e + EXPLAIN_AFTER);
            sent <= until && done >= *start
        })
    }

    /// Whether a fault is on now or ended within one sample interval.
    fn fault_recent(&self, now: Duration) -> bool {
        Shared::lock(&self.windows)
            .iter()
            .any(|(start, end)| now >= *start && end.is_none_or(|e| now <= e + SAMPLE_EVERY))
    }

    fn note_failure(&self, line: String) {
        let mut failures = Shared::lock(&self.failures);
        if failures.len() < 10 {
            failures.push(line);
        }
    }
}

type Http = Client<HttpConnector, Full<Bytes>>;

/// The gateway child process; killed by its pid when dropped, so a panic leaks nothing.
struct Gateway {
    child: Child,
    log: PathBuf,
}

impl Gateway {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then up to 15 s for a drained exit; answers how it ended.
    fn terminate(&mut self) -> String {
        let started = std::time::Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status();
        if !sent.as_ref().is_ok_and(|s| s.success()) {
            return format!("could not send SIGTERM ({sent:?}); killed");
        }
        while started.elapsed() < Duration::from_secs(15) {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    return format!(
                        "exited with {status} {} ms after SIGTERM",
                        started.elapsed().as_millis()
                    )
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return format!("cannot wait for it: {e}"),
            }
        }
        "still running 15 s after SIGTERM; killed".into()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Descriptors of the gateway by what they are.
#[derive(Clone, Copy, Default, Debug)]
struct Fds {
    total: usize,
    /// Sockets on the client listener's port: the listener and client connections.
    client: usize,
    /// Connections to the simulator.
    upstream: usize,
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Duration,
    rss: u64,
    fds: Fds,
    cache_bytes: Option<u64>,
    evictions: Option<u64>,
    fault: bool,
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Socket inode to (local port, remote port), from the namespace's TCP tables.
fn tcp_ports(pid: u32) -> HashMap<u64, (u16, u16)> {
    let mut map = HashMap::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let port = |col: Option<&&str>| {
                col.and_then(|c| c.rsplit(':').next())
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            if let (Some(local), Some(remote), Some(inode)) = (
                port(cols.get(1)),
                port(cols.get(2)),
                cols.get(9).and_then(|i| i.parse().ok()),
            ) {
                map.insert(inode, (local, remote));
            }
        }
    }
    map
}

fn fds(pid: u32, listen_port: u16, sim_port: u16) -> Fds {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Fds::default();
    };
    let ports = tcp_ports(pid);
    let mut fds = Fds::default();
    for entry in entries.flatten() {
        fds.total += 1;
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let inode = target
            .strip_prefix("socket:[")
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse::<u64>().ok());
        match inode.and_then(|i| ports.get(&i)) {
            Some((local, _)) if *local == listen_port => fds.client += 1,
            Some((_, remote)) if *remote == sim_port => fds.upstream += 1,
            _ => {}
        }
    }
    fds
}

async fn send(
    http: &Http,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: &'static str,
) -> Result<(StatusCode, String, Bytes), String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async {
        let resp = http.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        let cache = parts
            .headers
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((parts.status, cache, body))
    };
    // Longer than the gateway's request_timeout, so the gateway always speaks first.
    tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .map_err(|_| "no answer within 15 s".to_string())?
}

/// One request of `kind`, tallied.
async fn one(shared: Arc<Shared>, http: Http, base: Arc<str>, kind: Kind) {
    let (method, path, body) = kind.request();
    let auth = format!("Bearer {}", support::KEY);
    let mut headers = vec![("authorization", auth.as_str())];
    if method == Method::POST {
        headers.push(("content-type", "application/x-www-form-urlencoded"));
    }
    let sent = shared.started.elapsed();
    let result = send(
        &http,
        method.clone(),
        &format!("{base}{path}"),
        &headers,
        body,
    )
    .await;
    let done = shared.started.elapsed();
    let mut t = Tally {
        sent: 1,
        ..Tally::default()
    };
    match result {
        Ok((status, cache, body)) => {
            *Shared::lock(&shared.statuses)
                .entry(status.as_u16())
                .or_default() += 1;
            if cache.contains("; hit") {
                t.hits = 1;
            }
            let mut failure = None;
            match status.as_u16() {
                200..=299 => t.ok = 1,
                500..=599 if shared.explained(sent, done) => t.explained_5xx = 1,
                code => {
                    if code >= 500 {
                        t.unexplained_5xx = 1;
                    } else {
                        t.client_errors = 1;
                    }
                    let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
                    failure = Some(format!(
                        "{code} at {:.1} s after {} ms: {method} {path} ({cache}) {text}",
                        done.as_secs_f64(),
                        (done - sent).as_millis()
                    ));
                }
            }
            if let Some(line) = failure {
                shared.note_failure(line);
            }
        }
        Err(e) => {
            t.no_answer = 1;
            shared.note_failure(format!(
                "no answer at {:.1} s after {} ms: {method} {path}: {e}",
                done.as_secs_f64(),
                (done - sent).as_millis()
            ));
        }
    }
    Shared::lock(&shared.tallies)
        .entry(kind)
        .or_default()
        .add(&t);
}

/// One of the load tasks: a request every tick until `end`, each in its own task.
async fn drive(
    shared: Arc<Shared>,
    http: Http,
    base: Arc<str>,
    every: Duration,
    end: Instant,
    slots: Arc<Semaphore>,
) {
    let mut ticker = tokio::time::interval(every);
    // A stalled driver must not fire a burst to catch up: the rate is the point.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        ticker.tick().await;
        if Instant::now() >= end {
            return;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        shared.sent.fetch_add(1, Ordering::Relaxed);
        let (shared, http, base) = (shared.clone(), http.clone(), base.clone());
        tokio::spawn(async move {
            one(shared, http, base, Kind::pick()).await;
            drop(slot);
        });
    }
}

/// Applies the fault windows at their times and records when each really began and ended.
async fn inject(
    shared: Arc<Shared>,
    sim: Arc<SimHandle>,
    schedule: Vec<(Duration, Fault)>,
    window: Duration,
) {
    for (at, fault) in schedule {
        tokio::time::sleep_until(shared.started + at).await;
        // The recorded window encloses the real one (opened before the faults are set,
        // closed after they are lifted), so no faulty answer falls outside it.
        let index = {
            let mut windows = Shared::lock(&shared.windows);
            windows.push((shared.started.elapsed(), None));
            windows.len() - 1
        };
        sim.set_faults(fault.faults());
        tokio::time::sleep(window).await;
        sim.set_faults(Faults::default());
        Shared::lock(&shared.windows)[index].1 = Some(shared.started.elapsed());
    }
}

/// A metric's value from Prometheus text (unlabelled series only).
fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

struct Ports {
    listen: u16,
    admin: u16,
    sim: u16,
}

async fn sample(shared: &Shared, http: &Http, pid: u32, ports: &Ports) -> Sample {
    let at = shared.started.elapsed();
    let metrics = send(
        http,
        Method::GET,
        &format!("http://127.0.0.1:{}/metrics", ports.admin),
        &[],
        "",
    )
    .await
    .map(|(_, _, body)| String::from_utf8_lossy(&body).into_owned())
    .unwrap_or_default();
    Sample {
        at,
        rss: rss_bytes(pid).unwrap_or(0),
        fds: fds(pid, ports.listen, ports.sim),
        cache_bytes: metric(&metrics, "cxgate_cache_bytes"),
        evictions: metric(&metrics, "cxgate_cache_evictions_total"),
        fault: shared.fault_recent(at),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn progress(s: &Sample, shared: &Shared) {
    let unexplained: u64 = Shared::lock(&shared.tallies)
        .values()
        .map(|t| t.unexplained_5xx + t.no_answer + t.client_errors)
        .sum();
    eprintln!(
        "  {:>4} s  rss {:>6.1} MiB  fds {:>4} (client {}, upstream {})  cache {:>5.1} MiB  sent {}  failures {}{}",
        s.at.as_secs(),
        mib(s.rss),
        s.fds.total,
        s.fds.client,
        s.fds.upstream,
        mib(s.cache_bytes.unwrap_or(0)),
        shared.sent.load(Ordering::Relaxed),
        unexplained,
        if s.fault { "  (fault window)" } else { "" }
    );
}

fn binary() -> PathBuf {
    match std::env::var_os("CXGATE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/cxgate"),
    }
}

/// Two distinct loopback ports that were free a moment ago, for the child to bind.
fn two_free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let b = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    (
        a.local_addr().expect("local addr").port(),
        b.local_addr().expect("local addr").port(),
    )
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("soak: {problem}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let bin = binary();
    if !bin.is_file() {
        eprintln!(
            "soak: no gateway binary at {} (run `cargo build --release`, or set CXGATE_BIN)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if rt.block_on(run(args, bin)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(args: Args, bin: PathBuf) -> bool {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let sim_opts = SimOptions {
        token_ttl: TOKEN_TTL,
        access_tokens: vec![support::ACCESS.to_string()],
        refresh_tokens: vec![support::REFRESH.to_string()],
        client_secret: support::CLIENT_SECRET.to_string(),
        ..SimOptions::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the simulator on 127.0.0.1");
    let sim = Arc::new(
        cxgate::sim::spawn(listener, sim_opts)
            .await
            .expect("start the simulator"),
    );
    let (listen, admin) = two_free_ports();
    let ports = Ports {
        listen,
        admin,
        sim: sim.addr.port(),
    };

    let dir = std::env::temp_dir().join(format!("cxgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the soak's temp dir");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, support::ACCESS, support::REFRESH, TOKEN_TTL)
        .expect("write the token file");
    let base = sim.base_url();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         public_base_url = \"http://127.0.0.1:{listen}\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"5s\"\n\
         [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"{UPSTREAM_TIMEOUT_MS}ms\"\n\
         [token]\nfile = \"{}\"\nrefresh_before = \"1m\"\n\
         [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\n\
         client_secret_env = \"{}\"\n\
         [cache]\nmax_bytes = \"{MAX_BYTES}\"\n\
         {}\n{}\n{}\n",
        token_file.display(),
        support::SECRET_ENV,
        support::client_toml("soak", support::KEY, "scopes = [\"read\", \"write\"]"),
        support::BIG_BUDGET,
        support::ROUTES,
    );
    let config_path = dir.join("cxgate.toml");
    std::fs::write(&config_path, &config).expect("write the soak config");
    // Checked here as well, for a clear message and the effective cache bound.
    let max_bytes = match cxgate::config::load(&config_path) {
        Ok(cfg) => cfg.cache.max_bytes,
        Err(e) => {
            eprintln!("soak: the generated config is invalid: {:?}", e.lines());
            return false;
        }
    };

    let log = dir.join("gateway.log");
    let log_file = std::fs::File::create(&log).expect("create the gateway log");
    let child = Command::new(&bin)
        .args(["--log-level", "info", "run", "--config"])
        .arg(&config_path)
        .env(support::SECRET_ENV, support::CLIENT_SECRET)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone the log handle"))
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let mut gateway = Gateway { child, log };
    let pid = gateway.pid();

    // The client pool forgets idle connections well before the gateway's 10 s head timeout
    // would close them, so no request races a closing connection, and connections opened
    // during a slow window do not linger in the gateway's descriptor count.
    let http: Http = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(32)
        .build_http();
    let ready_by = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = send(
            &http,
            Method::GET,
            &format!("http://127.0.0.1:{admin}/readyz"),
            &[],
            "",
        )
        .await;
        if matches!(ready, Ok((StatusCode::OK, _, _))) {
            break;
        }
        if let Ok(Some(status)) = gateway.child.try_wait() {
            eprintln!(
                "soak: the gateway exited ({status}) before it was ready; its log:\n{}",
                gateway.log_tail()
            );
            return false;
        }
        if Instant::now() > ready_by {
            eprintln!(
                "soak: the gateway was not ready within 20 s ({ready:?}); its log:\n{}",
                gateway.log_tail()
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let schedule = Schedule::new(args.duration);
    println!(
        "soak run: {} s at {} requests/s through {} (pid {pid}), cache.max_bytes {:.1} MiB",
        args.duration.as_secs(),
        args.rate,
        bin.display(),
        mib(max_bytes)
    );
    println!(
        "  faults: {} windows of {} s every {} s from {} s ({}, in turn), none in the last {} s",
        schedule.windows.len(),
        schedule.window.as_secs_f64(),
        schedule.period.as_secs_f64(),
        schedule.windows.first().map_or(0.0, |w| w.0.as_secs_f64()),
        Fault::TURN.map(Fault::label).join("; "),
        schedule.tail.as_secs()
    );
    println!(
        "  warm-up {} s; a 5xx within {} s of a window counts as explained",
        schedule.warmup.as_secs(),
        EXPLAIN_AFTER.as_secs()
    );

    let started = Instant::now();
    let end = started + args.duration;
    let shared = Arc::new(Shared {
        started,
        windows: Mutex::new(Vec::new()),
        tallies: Mutex::new(BTreeMap::new()),
        statuses: Mutex::new(BTreeMap::new()),
        failures: Mutex::new(Vec::new()),
        skipped: AtomicU64::new(0),
        sent: AtomicU64::new(0),
    });
    let gw_base: Arc<str> = Arc::from(format!("http://127.0.0.1:{listen}"));
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let every = Duration::from_secs(1) * DRIVERS / args.rate;
    let mut drivers = tokio::task::JoinSet::new();
    for d in 0..DRIVERS {
        let (shared, http, base, slots) =
            (shared.clone(), http.clone(), gw_base.clone(), slots.clone());
        drivers.spawn(async move {
            // Offset the drivers within one interval, so the load is even, not in fours.
            tokio::time::sleep(every * d / DRIVERS).await;
            drive(shared, http, base, every, end, slots).await;
        });
    }
    let injector = tokio::spawn(inject(
        shared.clone(),
        sim.clone(),
        schedule.windows.clone(),
        schedule.window,
    ));

    let mut samples = Vec::new();
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    let progress_every = if args.duration >= Duration::from_secs(300) {
        12
    } else {
        2
    };
    loop {
        ticker.tick().await;
        let last = Instant::now() >= end;
        let s = sample(&shared, &http, pid, &ports).await;
        if samples.len() % progress_every == 0 || last {
            progress(&s, &shared);
        }
        samples.push(s);
        if last {
            break;
        }
        if let Ok(Some(status)) = gateway.child.try_wait() {
            eprintln!(
                "soak: the gateway exited ({status}) during the run; its log:\n{}",
                gateway.log_tail()
            );
            return false;
        }
    }

    while let Some(done) = drivers.join_next().await {
        done.expect("load driver");
    }
    injector.abort();
    // Requests still in flight finish (the gateway's request_timeout is 10 s) before the
    // figures are read.
    let drained = tokio::time::timeout(
        Duration::from_secs(20),
        slots.acquire_many(MAX_IN_FLIGHT as u32),
    )
    .await;
    if drained.is_err() {
        eprintln!("soak: requests were still in flight 20 s after the load stopped");
    }
    let exit = gateway.terminate();

    let ok = report(
        &shared,
        &samples,
        &schedule,
        max_bytes,
        &sim,
        &exit,
        drained.is_ok(),
    );
    if ok {
        drop(gateway);
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("  config and gateway log kept in {}", dir.display());
    }
    ok
}

fn report(
    shared: &Shared,
    samples: &[Sample],
    schedule: &Schedule,
    max_bytes: u64,
    sim: &SimHandle,
    exit: &str,
    drained: bool,
) -> bool {
    let Some(last) = samples.last() else {
        println!("  no samples taken");
        return false;
    };
    let start = samples
        .iter()
        .find(|s| s.at >= schedule.warmup)
        .unwrap_or(&samples[0]);
    let mid_at = (start.at + last.at) / 2;
    let middle = samples
        .iter()
        .min_by_key(|s| s.at.abs_diff(mid_at))
        .unwrap_or(last);
    // Each maximum over the whole run, warm-up included: the bound holds at every moment.
    let max = |of: fn(&Sample) -> u64| samples.iter().map(of).max().unwrap_or(0);
    let max_rss = max(|s| s.rss);
    let points = [start, middle, last];

    println!();
    println!(
        "  {:<22}{:>12}{:>12}{:>12}{:>12}",
        "",
        format!("start {}s", start.at.as_secs()),
        format!("middle {}s", middle.at.as_secs()),
        format!("end {}s", last.at.as_secs()),
        "max"
    );
    let row = |name: &str, values: [String; 3], max: String| {
        println!(
            "  {name:<22}{:>12}{:>12}{:>12}{:>12}",
            values[0], values[1], values[2], max
        );
    };
    row(
        "RSS MiB",
        points.map(|s| format!("{:.1}", mib(s.rss))),
        format!("{:.1}", mib(max_rss)),
    );
    row(
        "open fds",
        points.map(|s| s.fds.total.to_string()),
        max(|s| s.fds.total as u64).to_string(),
    );
    row(
        "  client sockets",
        points.map(|s| s.fds.client.to_string()),
        max(|s| s.fds.client as u64).to_string(),
    );
    row(
        "  upstream sockets",
        points.map(|s| s.fds.upstream.to_string()),
        max(|s| s.fds.upstream as u64).to_string(),
    );
    row(
        "cache MiB (metric)",
        points.map(|s| format!("{:.2}", mib(s.cache_bytes.unwrap_or(0)))),
        format!("{:.2}", mib(max(|s| s.cache_bytes.unwrap_or(0)))),
    );
    row(
        "cache evictions",
        points.map(|s| s.evictions.unwrap_or(0).to_string()),
        String::new(),
    );
    let faulted: Vec<String> = points
        .iter()
        .filter(|s| s.fault)
        .map(|s| format!("{} s", s.at.as_secs()))
        .collect();
    if !faulted.is_empty() {
        println!(
            "  (taken during or just after a fault window: {})",
            faulted.join(", ")
        );
    }

    println!();
    println!(
        "  {:<24}{:>8}{:>8}{:>8}{:>6}{:>10}{:>12}{:>10}",
        "requests", "sent", "2xx", "hits", "4xx", "5xx fault", "5xx unexpl.", "no answer"
    );
    let tallies = Shared::lock(&shared.tallies).clone();
    let mut total = Tally::default();
    for (kind, t) in &tallies {
        t.print_row(kind.label());
        total.add(t);
    }
    total.print_row("all");
    let statuses: Vec<String> = Shared::lock(&shared.statuses)
        .iter()
        .map(|(code, n)| format!("{code}: {n}"))
        .collect();
    println!("  statuses: {}", statuses.join(", "));
    println!(
        "  ticks skipped at {MAX_IN_FLIGHT} in flight: {}",
        shared.skipped.load(Ordering::Relaxed)
    );
    let windows = Shared::lock(&shared.windows).len();
    let stats = sim.stats();
    println!(
        "  simulator: {} calls, {} with a fault, {} token refreshes, max {} in flight; {windows} fault windows applied",
        stats["requests_total"],
        stats["faults_injected"],
        stats["token_refreshes"],
        stats["max_in_flight"]
    );
    println!("  gateway: {exit}");
    for line in Shared::lock(&shared.failures).iter() {
        println!("  failure: {line}");
    }

    let rss_limit = max_bytes + OVERHEAD;
    let checks = [
        (
            total.unexplained_5xx == 0,
            format!("5xx no fault explains: {} (goal 0)", total.unexplained_5xx),
        ),
        (
            total.no_answer == 0 && total.client_errors == 0,
            format!(
                "requests without an answer: {}, 4xx: {} (goal 0)",
                total.no_answer, total.client_errors
            ),
        ),
        (
            last.fds.total <= start.fds.total + FD_SLACK,
            format!(
                "open fds at the end {} vs start {} (limit start + {FD_SLACK})",
                last.fds.total, start.fds.total
            ),
        ),
        (
            max_rss <= rss_limit,
            format!(
                "max RSS {:.1} MiB (limit cache.max_bytes {:.1} MiB + {:.0} MiB overhead = {:.1} MiB)",
                mib(max_rss),
                mib(max_bytes),
                mib(OVERHEAD),
                mib(rss_limit)
            ),
        ),
        (drained, "every request finished after the load stopped".to_string()),
    ];
    println!();
    let mut ok = true;
    for (passed, text) in &checks {
        println!("  {} {text}", if *passed { "ok  " } else { "FAIL" });
        ok &= passed;
    }
    ok
}
