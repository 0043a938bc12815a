//! The economy run: how many upstream calls cxgate saves for a fleet of client services.
//!
//! 20 services (one gateway client key each) work through cxgate with the shipped route
//! table of `config/cxgate.toml`, against a simulator whose rate limit equals the gateway's
//! budget. Each service calls `/me` and `/me/accounts` before every job, then reads contacts
//! with a Zipf spread over 10,000 ids and now and then updates one; beside that it polls its
//! account's mentions every 3 to 6 s and now and then updates a mention. Prints the share of
//! client requests answered without an upstream call of their own, upstream calls per 1,000
//! client requests and the upstream's 429s, in total and per kind of request.
//!
//! Run: `cargo bench --bench economy` (5 minutes), or shorter with
//! `cargo bench --bench economy -- --duration 60`. `--help` lists the other knobs.
//! Exits 1 when the upstream answered any 429 or a client saw an unexpected status.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cxgate::sim::{Faults, RateLimit, SimOptions};
use http::Method;
use support::Zipf;
use tokio::time::Instant;

const USAGE: &str = "\
cargo bench --bench economy -- [options]
  --duration D     how long the services work (300s; plain seconds or 5m, 90s, ...)
  --services N     client services, one key each (20)
  --ids N          contact ids the reads spread over (10000)
  --zipf S         Zipf exponent of the contact reads (1.0)
  --budget N/P     gateway budget and simulator limit per token (6000/1m)
  --burst N        gateway budget burst (100)
  --latency D      simulator latency per call (50ms)";

/// The accounts the simulator's user sees; services are spread over them.
const ACCOUNTS: [u64; 3] = [12345, 23456, 34567];
/// Contact reads per job, after `/me` and `/me/accounts`.
const READS_PER_JOB: usize = 20;
/// Chance that a contact read is followed by an update of that contact.
const CONTACT_WRITE_SHARE: f64 = 0.02;
/// Chance that a mentions poll is followed by an update of the newest mention.
const MENTION_WRITE_SHARE: f64 = 0.1;

struct Args {
    duration: Duration,
    services: usize,
    ids: usize,
    zipf: f64,
    budget: RateLimit,
    burst: u32,
    latency: Duration,
}

fn duration(text: &str) -> Result<Duration, String> {
    match text.parse::<u64>() {
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}")),
    }
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        duration: Duration::from_secs(300),
        services: 20,
        ids: 10_000,
        zipf: 1.0,
        budget: "6000/1m".parse().map_err(|e| format!("{e}"))?,
        burst: 100,
        latency: Duration::from_millis(50),
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
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--duration" => args.duration = duration(&value)?,
            "--services" => args.services = value.parse().map_err(|e| bad(&e))?,
            "--ids" => args.ids = value.parse().map_err(|e| bad(&e))?,
            "--zipf" => args.zipf = value.parse().map_err(|e| bad(&e))?,
            "--budget" => args.budget = value.parse().map_err(|e| bad(&e))?,
            "--burst" => args.burst = value.parse().map_err(|e| bad(&e))?,
            "--latency" => args.latency = duration(&value)?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    if args.services == 0 || args.ids == 0 {
        return Err("--services and --ids must be positive".into());
    }
    Ok(args)
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Me,
    Accounts,
    ContactRead,
    ContactWrite,
    Mentions,
    MentionWrite,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::Me,
        Kind::Accounts,
        Kind::ContactRead,
        Kind::ContactWrite,
        Kind::Mentions,
        Kind::MentionWrite,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::Me => "GET /me",
            Kind::Accounts => "GET /me/accounts",
            Kind::ContactRead => "GET contact",
            Kind::ContactWrite => "POST contact",
            Kind::Mentions => "GET mentions",
            Kind::MentionWrite => "POST mention",
        }
    }

    /// The kind of a call the simulator counted as "METHOD /path".
    fn of_upstream(call: &str) -> Option<Kind> {
        let (method, path) = call.split_once(' ')?;
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match (method, segs.as_slice()) {
            ("GET", ["me"]) => Kind::Me,
            ("GET", ["me", "accounts"]) => Kind::Accounts,
            ("GET", [_, "inbox", "contact", _, _]) => Kind::ContactRead,
            ("POST", [_, "inbox", "contact", _, _]) => Kind::ContactWrite,
            ("GET", [_, "inbox", "mentions"]) => Kind::Mentions,
            ("POST", [_, "inbox", "mention", _, _]) => Kind::MentionWrite,
            _ => return None,
        })
    }
}

/// What the clients saw for one kind of request.
#[derive(Default, Clone, Copy)]
struct Tally {
    requests: u64,
    /// Hits (fresh or stale) and requests merged into another's upstream call.
    no_upstream: u64,
    /// 429s the gateway answered itself (budget), never reaching the upstream.
    gateway_429: u64,
    /// 429s of the upstream, passed through.
    passed_429: u64,
    /// Anything else that was not 2xx.
    other: u64,
}

impl Tally {
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.no_upstream += other.no_upstream;
        self.gateway_429 += other.gateway_429;
        self.passed_429 += other.passed_429;
        self.other += other.other;
    }
}

type Tallies = BTreeMap<Kind, Tally>;

/// One client service: its key, account, and what it has seen.
struct Service {
    env: Arc<support::Env>,
    auth: String,
    account: u64,
    deadline: Instant,
    sent: Arc<AtomicU64>,
    tallies: Tallies,
    /// Contact ids read by any service: each costs at least one upstream call (its first
    /// read), the floor under any cache.
    contacts_seen: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
}

impl Service {
    async fn call(
        &mut self,
        kind: Kind,
        method: Method,
        path: &str,
        form: &str,
    ) -> support::Answer {
        let mut headers = vec![("authorization", self.auth.as_str())];
        if method == Method::POST {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
        }
        let url = self.env.url(path);
        let answer = self.env.send(method, &url, &headers, form).await;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let status = answer.header("cache-status");
        let t = self.tallies.entry(kind).or_default();
        t.requests += 1;
        if status.contains("; hit") || status.contains("; collapsed") {
            t.no_upstream += 1;
        }
        match answer.status.as_u16() {
            200..=299 => {}
            429 if status.contains("fwd-status=429") => t.passed_429 += 1,
            429 => t.gateway_429 += 1,
            _ => t.other += 1,
        }
        answer
    }

    /// Sleeps a random time in `range`, or until the deadline; false once the run is over.
    async fn pause(&self, range: std::ops::Range<u64>) -> bool {
        let wake = Instant::now() + Duration::from_millis(fastrand::u64(range));
        tokio::time::sleep_until(wake.min(self.deadline)).await;
        Instant::now() < self.deadline
    }

    /// Jobs: identity and accounts first, as services do on every job, then contact reads.
    async fn work(mut self, zipf: Arc<Zipf>) -> Tallies {
        // Services do not start in lockstep.
        self.pause(0..2000).await;
        while Instant::now() < self.deadline {
            self.call(Kind::Me, Method::GET, "/me", "").await;
            self.call(Kind::Accounts, Method::GET, "/me/accounts", "")
                .await;
            for _ in 0..READS_PER_JOB {
                let id = zipf.sample();
                self.contacts_seen
                    .lock()
                    .expect("contacts seen")
                    .insert(id as u64);
                let path = format!("/12345/inbox/contact/twitter/{id}");
                self.call(Kind::ContactRead, Method::GET, &path, "").await;
                if fastrand::f64() < CONTACT_WRITE_SHARE {
                    let form = format!(
                        "updates=%7B%22note%22%3A%22seen+{}%22%7D",
                        fastrand::u32(..)
                    );
                    self.call(Kind::ContactWrite, Method::POST, &path, &form)
                        .await;
                }
            }
            if !self.pause(2000..4000).await {
                break;
            }
        }
        self.tallies
    }

    /// Polls the account's newest mentions; now and then updates the newest one.
    async fn poll(mut self) -> Tallies {
        self.pause(0..3000).await;
        let list = format!("/{}/inbox/mentions?limit=20&sort=desc", self.account);
        while Instant::now() < self.deadline {
            let answer = self.call(Kind::Mentions, Method::GET, &list, "").await;
            if answer.status == 200 && fastrand::f64() < MENTION_WRITE_SHARE {
                let newest = &answer.json()["response"]["data"][0];
                if let (Some(topic), Some(id)) =
                    (newest["topic"]["id"].as_u64(), newest["id"].as_str())
                {
                    let path = format!("/{}/inbox/mention/{topic}/{id}", self.account);
                    let form = "updates=%7B%22status%22%3A%22open%22%7D";
                    self.call(Kind::MentionWrite, Method::POST, &path, form)
                        .await;
                }
            }
            if !self.pause(3000..6000).await {
                break;
            }
        }
        self.tallies
    }
}

fn routes_of_shipped_config() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let start = text
        .find("\n[[routes]]")
        .unwrap_or_else(|| panic!("{} has no [[routes]]", path.display()));
    let routes = &text[start..];
    // Everything after the first route must be routes, or this would import other settings.
    let foreign = routes
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with('[') && *l != "[[routes]]");
    assert!(
        foreign.is_none(),
        "expected only [[routes]] after the first route in config/cxgate.toml, saw {foreign:?}"
    );
    routes.to_string()
}

fn percent(part: u64, whole: u64) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

fn main() -> std::process::ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            if !problem.is_empty() {
                eprintln!("economy: {problem}");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ok = rt.block_on(run(args));
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

async fn run(args: Args) -> bool {
    let sim = SimOptions {
        rate_limit: Some(args.budget),
        faults: Faults {
            latency_ms: args.latency.as_millis() as u64,
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let mut clients = String::new();
    for s in 0..args.services {
        clients.push_str(&support::client_toml(
            &format!("service-{s:02}"),
            &format!("economy-key-{s:02}"),
            "scopes = [\"read\", \"write\"]",
        ));
    }
    let budget = format!(
        "[budget]\nlimit = {}\nperiod = \"{}ms\"\nburst = {}\n{}",
        args.budget.limit,
        args.budget.period.as_millis(),
        args.burst,
        routes_of_shipped_config()
    );
    let env = Arc::new(support::start_with(sim, &clients, &budget).await);
    let base_calls = env.upstream_total();

    println!(
        "economy run: {} services for {} s through cxgate, routes from config/cxgate.toml",
        args.services,
        args.duration.as_secs()
    );
    println!(
        "  simulator: latency {} ms, limit {} per token; gateway budget the same, burst {}",
        args.latency.as_millis(),
        args.budget,
        args.burst
    );
    println!(
        "  contacts: Zipf s={} over {} ids; {READS_PER_JOB} reads per job after /me and /me/accounts",
        args.zipf, args.ids
    );

    let zipf = Arc::new(Zipf::new(args.ids, args.zipf));
    let sent = Arc::new(AtomicU64::new(0));
    let contacts_seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let started = Instant::now();
    let deadline = started + args.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.services {
        let service = || Service {
            env: env.clone(),
            auth: format!("Bearer economy-key-{s:02}"),
            account: ACCOUNTS[s % ACCOUNTS.len()],
            deadline,
            sent: sent.clone(),
            tallies: Tallies::new(),
            contacts_seen: contacts_seen.clone(),
        };
        tasks.spawn(service().work(zipf.clone()));
        tasks.spawn(service().poll());
    }
    // Progress once a minute, so a five-minute run does not look hung.
    let progress = {
        let sent = sent.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(60));
            every.tick().await;
            loop {
                every.tick().await;
                eprintln!(
                    "  ... {} s, {} client requests",
                    started.elapsed().as_secs(),
                    sent.load(Ordering::Relaxed)
                );
            }
        })
    };
    let mut tallies = Tallies::new();
    while let Some(done) = tasks.join_next().await {
        for (kind, t) in done.expect("service task") {
            tallies.entry(kind).or_default().add(&t);
        }
    }
    progress.abort();
    let elapsed = started.elapsed();

    let stats = env.sim.stats();
    let upstream_calls = env.upstream_total() - base_calls;
    let upstream_429 = stats["rate_limited"].as_u64().unwrap_or(0);
    let mut upstream_by_kind: BTreeMap<Kind, u64> = BTreeMap::new();
    if let Some(routes) = stats["by_route"].as_object() {
        for (call, n) in routes {
            if let Some(kind) = Kind::of_upstream(call) {
                *upstream_by_kind.entry(kind).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
    let mut total = Tally::default();
    for t in tallies.values() {
        total.add(t);
    }

    let share = percent(total.no_upstream, total.requests);
    let per_1000 = 1000.0 * upstream_calls as f64 / total.requests.max(1) as f64;
    println!(
        "  elapsed {:.1} s; client requests {} ({:.0}/s)",
        elapsed.as_secs_f64(),
        total.requests,
        total.requests as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  answered without an upstream call: {share:.1}% (goal >= 90%: {})",
        if share >= 90.0 { "met" } else { "missed" }
    );
    println!(
        "  upstream calls: {upstream_calls} = {per_1000:.1} per 1,000 client requests \
         (background refreshes and writes included)"
    );
    let distinct = contacts_seen.lock().expect("contacts seen").len() as u64;
    let floor = distinct
        + tallies
            .iter()
            .filter(|(k, _)| k.label().starts_with("POST"))
            .map(|(_, t)| t.requests)
            .sum::<u64>()
        + 2;
    println!(
        "  floor: {distinct} distinct contacts read; first reads + writes + /me + /me/accounts = \
         {floor} calls, so at most {:.1}% can be answered without one in this run",
        percent(total.requests.saturating_sub(floor), total.requests)
    );
    println!(
        "  upstream 429s: {upstream_429} (goal 0: {})",
        if upstream_429 == 0 { "met" } else { "missed" }
    );
    println!(
        "  gateway 429s (budget): {}; upstream 429s passed to clients: {}; other non-2xx: {}",
        total.gateway_429, total.passed_429, total.other
    );
    println!(
        "  {:<18} {:>9} {:>12} {:>15} {:>12}",
        "kind", "requests", "no upstream", "upstream calls", "gateway 429"
    );
    for kind in Kind::ALL {
        let t = tallies.get(&kind).copied().unwrap_or_default();
        println!(
            "  {:<18} {:>9} {:>11.1}% {:>15} {:>12}",
            kind.label(),
            t.requests,
            percent(t.no_upstream, t.requests),
            upstream_by_kind.get(&kind).copied().unwrap_or(0),
            t.gateway_429
        );
    }

    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every service task has ended, so no one else holds the environment"),
    }
    let ok = upstream_429 == 0 && total.passed_429 == 0 && total.other == 0;
    if !ok {
        println!(
            "  FAILED: expected no upstream 429 and only 2xx or budget 429 answers, saw \
             {upstream_429} upstream 429s and {} other non-2xx",
            total.other
        );
    }
    ok
}
