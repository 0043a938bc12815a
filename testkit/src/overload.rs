//! The overload run: many services offering ten times what the upstream allows, against a
//! simulator that counts its limit over fixed windows (the real API's hourly window, scaled
//! down to seconds) and answers over it with 400 `rate_limit_reached`. The gateway's own
//! budget is set to twice the upstream's limit on purpose, so only what the upstream says
//! in its headers can keep it under. Shared by the `realapi` suite (short) and
//! the `overload` bench (60 s and more).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::gateway::{
    client_toml, spawn_sim, temp_dir, ACCESS, CLIENT_SECRET, REFRESH, ROUTES, SECRET_ENV,
};
use crate::redis::RedisServer;
use cxgate::sim::SimOptions;

/// The upstream's limit: this many calls per window.
pub const UPSTREAM_LIMIT: u32 = 60;
pub const WINDOW: Duration = Duration::from_secs(6);

/// The simulator's terms for one run: its limit per fixed window (whole seconds), the
/// latency (plus a random jitter up to `jitter_ms`) before it counts and answers each call,
/// and the status of its limit answers (400 as the real API, or 429 with `Retry-After`).
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    pub limit: u32,
    pub window: Duration,
    pub latency_ms: u64,
    pub jitter_ms: u64,
    pub limit_status: u16,
    /// With replicas: a `FLUSHALL` of their Redis this often (no disconnect, so no replica
    /// sees an outage), as a lost or evicted shared state.
    pub flush_every: Option<Duration>,
}

impl Default for Terms {
    fn default() -> Terms {
        Terms {
            limit: UPSTREAM_LIMIT,
            window: WINDOW,
            latency_ms: 20,
            jitter_ms: 30,
            limit_status: 400,
            flush_every: None,
        }
    }
}

/// What one overload run shows.
#[derive(Debug)]
pub struct OverloadReport {
    pub terms: Terms,
    pub replicas: usize,
    pub services: usize,
    pub elapsed: Duration,
    pub sent: u64,
    pub ok: u64,
    /// 429s the clients got (the gateway's, with Retry-After).
    pub client_429: u64,
    /// Any other status, with the first few seen.
    pub other: u64,
    pub other_seen: Vec<u16>,
    /// 429s without the API's X-RateLimit-* fields (client code written for the API
    /// crashes on those).
    pub bare_429: u64,
    /// What the simulator received, and how many of those it refused as over its limit.
    pub upstream_calls: u64,
    pub upstream_limit_answers: u64,
    /// Upstream calls per replica, from each replica's `cxgate_upstream_requests_total`.
    pub per_replica: Vec<u64>,
    /// Redis calls that failed or ran past their bound, summed over the replicas
    /// (`cxgate_redis_errors_total`): each may have put its replica on its fallback for a
    /// while, where it spends only its part of the upstream's count as it last knew it.
    pub redis_errors: u64,
    /// `FLUSHALL`s of the replicas' Redis during the run (see [`Terms::flush_every`]).
    pub flushes: u64,
}

impl OverloadReport {
    /// What the upstream allows over the run: its limit in every window begun.
    pub fn allowance(&self) -> u64 {
        let windows = self.elapsed.as_secs_f64() / self.terms.window.as_secs_f64();
        u64::from(self.terms.limit) * (windows.ceil() as u64 + 1)
    }

    pub fn print(&self) {
        let secs = self.elapsed.as_secs_f64();
        let Terms { limit, window, .. } = self.terms;
        let rate = f64::from(limit) / window.as_secs_f64();
        println!(
            "overload run: {} replica(s), {} services, upstream {limit}/{window:?} (fixed \
             windows, {} rate_limit_reached over it, latency {} ms + up to {} ms), gateway \
             budget 2x that",
            self.replicas,
            self.services,
            self.terms.limit_status,
            self.terms.latency_ms,
            self.terms.jitter_ms
        );
        println!(
            "  elapsed {secs:.1} s, sent {} ({:.1}/s offered = {:.1}x the upstream's {rate:.1}/s)",
            self.sent,
            self.sent as f64 / secs,
            self.sent as f64 / secs / rate,
        );
        println!(
            "  upstream calls {} (allowance {}), upstream limit answers {}",
            self.upstream_calls,
            self.allowance(),
            self.upstream_limit_answers
        );
        println!(
            "  per replica upstream calls {:?}; clients: 200 {}, 429 {} (without X-RateLimit-*: \
             {}), other {} {:?}",
            self.per_replica, self.ok, self.client_429, self.bare_429, self.other, self.other_seen
        );
        if self.replicas > 1 {
            println!(
                "  Redis calls failed or past their bound, all replicas: {}",
                self.redis_errors
            );
        }
        if let Some(every) = self.terms.flush_every {
            println!(
                "  Redis flushed (FLUSHALL) every {every:?}: {} times",
                self.flushes
            );
        }
    }

    /// What the run must show.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.upstream_limit_answers != 0 {
            problems.push(format!(
                "expected no upstream answer saying the limit is reached, saw {} (Redis calls \
                 failed or past their bound, all replicas: {})",
                self.upstream_limit_answers, self.redis_errors
            ));
        }
        if self.upstream_calls > self.allowance() {
            problems.push(format!(
                "expected at most {} upstream calls, saw {}",
                self.allowance(),
                self.upstream_calls
            ));
        }
        if self.other != 0 || self.bare_429 != 0 {
            problems.push(format!(
                "expected only 200 and 429 with X-RateLimit-*, saw {} others {:?} and {} bare 429s",
                self.other, self.other_seen, self.bare_429
            ));
        }
        if self.ok == 0 || self.client_429 == 0 {
            problems.push(format!(
                "expected both answers and refusals at 10x load, saw {} and {}",
                self.ok, self.client_429
            ));
        }
        problems
    }
}

/// Runs `services` clients for `run` across `replicas` gateways (sharing `redis` when
/// there is more than one), each service sending one distinct uncached read every
/// `services / (10 x upstream rate)` seconds, fired without waiting for earlier answers.
pub async fn overload_run(
    replicas: usize,
    redis: Option<&RedisServer>,
    services: usize,
    run: Duration,
) -> OverloadReport {
    overload_run_with(replicas, redis, services, run, Terms::default()).await
}

/// [`overload_run`] against a simulator on other `terms`.
pub async fn overload_run_with(
    replicas: usize,
    redis: Option<&RedisServer>,
    services: usize,
    run: Duration,
    terms: Terms,
) -> OverloadReport {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    let sim = spawn_sim(SimOptions {
        rate_limit: Some(
            format!("{}/{}s", terms.limit, terms.window.as_secs())
                .parse()
                .expect("valid rate limit"),
        ),
        rate_limit_status: terms.limit_status,
        access_tokens: vec![ACCESS.to_string()],
        refresh_tokens: vec![REFRESH.to_string()],
        client_secret: CLIENT_SECRET.to_string(),
        faults: cxgate::sim::Faults {
            latency_ms: terms.latency_ms,
            jitter_ms: terms.jitter_ms,
            ..cxgate::sim::Faults::default()
        },
        ..SimOptions::default()
    })
    .await;
    let base = sim.base_url();
    let mut clients = String::new();
    for s in 0..services {
        clients.push_str(&client_toml(
            &format!("svc-{s:02}"),
            &format!("svc-key-{s:02}"),
            "",
        ));
    }
    let backend = match redis {
        Some(redis) if replicas > 1 => {
            let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
            std::env::set_var(&url_env, redis.url());
            format!(
                "backend = \"redis\"\nredis_url_env = \"{url_env}\"\nkey_prefix = \"ovl{:08x}\"\nreplicas = {replicas}\n",
                fastrand::u32(..)
            )
        }
        _ => String::new(),
    };
    let mut gateways = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..replicas {
        let dir = temp_dir(&format!("overload-{i}"));
        let token_file = dir.join("token.json");
        cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3600))
            .expect("token file");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"10s\"\nshutdown_grace = \"1s\"\n\
             [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\
             [token]\nfile = \"{}\"\n\
             [budget]\nlimit = {}\nperiod = \"{}s\"\nburst = 10\nmax_wait = \"500ms\"\n{backend}\n\
             {clients}\n{ROUTES}\n",
            token_file.display(),
            2 * terms.limit,
            terms.window.as_secs(),
        );
        let path = dir.join("cxgate.toml");
        std::fs::write(&path, &text).expect("write config");
        let cfg = cxgate::config::load(&path)
            .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}\n{text}", e.lines()));
        gateways.push(
            cxgate::start(cfg, Some(path), cxgate::Options::with_workers())
                .await
                .expect("gateway starts"),
        );
        dirs.push(dir);
    }
    let addrs: Arc<Vec<_>> = Arc::new(gateways.iter().map(|g| g.addr).collect());
    let http = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let offered = 10.0 * f64::from(terms.limit) / terms.window.as_secs_f64();
    let tick = Duration::from_secs_f64(services as f64 / offered);
    let ticks = (run.as_secs_f64() / tick.as_secs_f64()) as u64;
    let started = tokio::time::Instant::now();
    let flusher = match (redis, terms.flush_every) {
        (Some(redis), Some(every)) if replicas > 1 => Some(spawn_flusher(redis.port, every)),
        _ => None,
    };
    let mut drivers = tokio::task::JoinSet::new();
    for s in 0..services {
        let (http, addrs) = (http.clone(), addrs.clone());
        drivers.spawn(async move {
            let mut requests = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for i in 0..ticks {
                every.tick().await;
                let addr = addrs[(s + i as usize) % addrs.len()];
                let http = http.clone();
                requests.spawn(async move {
                    let req = Request::builder()
                        .method(Method::GET)
                        .uri(format!("http://{addr}/12345/inbox/contact/svc{s}/{i}"))
                        .header("authorization", format!("Bearer svc-key-{s:02}"))
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    let resp = tokio::time::timeout(Duration::from_secs(20), http.request(req))
                        .await
                        .expect("an answer within 20 s")
                        .expect("the gateway answers");
                    let bare = resp.status() == 429
                        && [
                            "x-ratelimit-limit",
                            "x-ratelimit-remaining",
                            "x-ratelimit-reset",
                        ]
                        .iter()
                        .any(|h| !resp.headers().contains_key(*h));
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    (status, bare)
                });
            }
            let mut seen = Vec::new();
            while let Some(done) = requests.join_next().await {
                seen.push(done.expect("request task"));
            }
            seen
        });
    }
    let mut report = OverloadReport {
        terms,
        replicas,
        services,
        elapsed: Duration::ZERO,
        sent: 0,
        ok: 0,
        client_429: 0,
        other: 0,
        other_seen: Vec::new(),
        bare_429: 0,
        upstream_calls: 0,
        upstream_limit_answers: 0,
        per_replica: Vec::new(),
        redis_errors: 0,
        flushes: 0,
    };
    while let Some(done) = drivers.join_next().await {
        for (status, bare) in done.expect("service task") {
            report.sent += 1;
            match status {
                200 => report.ok += 1,
                429 => report.client_429 += 1,
                other => {
                    report.other += 1;
                    if report.other_seen.len() < 5 {
                        report.other_seen.push(other);
                    }
                }
            }
            report.bare_429 += u64::from(bare);
        }
    }
    report.elapsed = started.elapsed();
    if let Some((task, count)) = flusher {
        task.abort();
        report.flushes = count.load(std::sync::atomic::Ordering::Relaxed);
    }
    let stats = sim.stats();
    report.upstream_calls = stats["requests_total"].as_u64().unwrap_or(0);
    report.upstream_limit_answers = stats["rate_limited"].as_u64().unwrap_or(0);
    for g in &gateways {
        let text = crate::metrics::scrape(&http, &g.admin_addr.to_string()).await;
        let calls = crate::metrics::sum(&text, "cxgate_upstream_requests_total");
        report.per_replica.push(calls as u64);
        report.redis_errors += crate::metrics::sum(&text, "cxgate_redis_errors_total") as u64;
    }
    for g in gateways {
        g.shutdown();
        g.stopped().await;
    }
    sim.shutdown().await;
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    report
}

/// `FLUSHALL` on the Redis at `port` every `every` (by `redis-cli`, as an operator would),
/// counting those that succeeded.
fn spawn_flusher(
    port: u16,
    every: Duration,
) -> (
    tokio::task::JoinHandle<()>,
    Arc<std::sync::atomic::AtomicU64>,
) {
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = count.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let flushed = tokio::task::spawn_blocking(move || {
                std::process::Command::new("redis-cli")
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "FLUSHALL"])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
            .await
            .unwrap_or(false);
            if flushed {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    (task, count)
}
