//! Load drivers shared by tests (short runs that assert) and benches (long runs that
//! print): the budget load run, many clients over a budget that matches the simulator's
//! limit, and the refresh-gap run, uncached reads across token refreshes; and the Zipf
//! spread the fleet workloads draw contact ids from.

use std::time::Duration;

use cxgate::sim::SimOptions;

use crate::gateway::{client_toml, start, start_with, BIG_BUDGET, ROUTES};

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

/// Ranks 1..=n drawn with probability proportional to 1/rank^s: how a fleet's reads spread
/// over contacts (a few hot, a long tail).
pub struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / (rank as f64).powf(s);
                total
            })
            .collect();
        Zipf { cumulative }
    }

    pub fn sample(&self) -> usize {
        self.rank_at(fastrand::f64())
    }

    /// A rank drawn from `rng`, for a run that must repeat its requests.
    pub fn sample_with(&self, rng: &mut fastrand::Rng) -> usize {
        self.rank_at(rng.f64())
    }

    fn rank_at(&self, uniform: f64) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let u = uniform * total;
        let i = self.cumulative.partition_point(|&c| c < u);
        i.min(self.cumulative.len().saturating_sub(1)) + 1
    }
}
