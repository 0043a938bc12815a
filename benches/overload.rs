//! The overload run at length: 20 services offering ten times the upstream's own limit for
//! 60 s (set `OVERLOAD_SECS` for another length), against a simulator that counts its limit
//! over fixed windows and answers over it with the real API's 400 `rate_limit_reached`;
//! the gateway's own budget is twice the upstream's, so only the upstream's headers keep it
//! under. Once in one process, once with three replicas sharing a `redis-server` it starts
//! on a free loopback port (skipped without one). Prints upstream limit answers, client
//! 429s and upstream calls per replica; exits 1 if the upstream ever said its limit is
//! reached. Run: `cargo bench --bench overload`; `OVERLOAD_LIMIT`, `OVERLOAD_WINDOW_SECS`,
//! `OVERLOAD_LATENCY_MS`, `OVERLOAD_JITTER_MS` and `OVERLOAD_STATUS` (429) set other
//! simulator terms, `OVERLOAD_SERVICES` the services, `OVERLOAD_REPLICAS=3` runs only the
//! three replicas, `OVERLOAD_FLUSH_EVERY_MS` flushes their Redis (`FLUSHALL`) that often.

mod support;

use std::time::Duration;

use support::overload::{overload_run_with, Terms};
use support::redis_server::RedisServer;

fn main() {
    let secs: u64 = std::env::var("OVERLOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let run = Duration::from_secs(secs);
    let env = |name: &str| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let mut terms = Terms::default();
    if let Some(limit) = env("OVERLOAD_LIMIT") {
        terms.limit = u32::try_from(limit).expect("OVERLOAD_LIMIT fits in u32");
    }
    if let Some(window) = env("OVERLOAD_WINDOW_SECS") {
        terms.window = Duration::from_secs(window);
    }
    terms.latency_ms = env("OVERLOAD_LATENCY_MS").unwrap_or(terms.latency_ms);
    terms.flush_every = env("OVERLOAD_FLUSH_EVERY_MS").map(Duration::from_millis);
    terms.jitter_ms = env("OVERLOAD_JITTER_MS").unwrap_or(terms.jitter_ms);
    if let Some(status) = env("OVERLOAD_STATUS") {
        terms.limit_status = u16::try_from(status).expect("OVERLOAD_STATUS is a status code");
    }
    let services = env("OVERLOAD_SERVICES").map_or(20, |n| n as usize);
    let only_three = env("OVERLOAD_REPLICAS") == Some(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut failed = false;
    if !only_three {
        let one = rt.block_on(overload_run_with(1, None, services, run, terms));
        one.print();
        for p in one.problems() {
            println!("  PROBLEM: {p}");
            failed = true;
        }
    }
    match RedisServer::start_or_skip("the three-replica overload run") {
        Some(redis) => {
            let three = rt.block_on(overload_run_with(3, Some(&redis), services, run, terms));
            three.print();
            for p in three.problems() {
                println!("  PROBLEM: {p}");
                failed = true;
            }
        }
        None => println!("three replicas: skipped (no redis-server)"),
    }
    if failed {
        std::process::exit(1);
    }
}
