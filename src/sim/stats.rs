//! Counters of what reached the simulator, read by tests and benchmarks as proof of what the
//! gateway let through (`GET /_sim/stats`). Counting must cost the traffic it counts next to
//! nothing, so no counter waits on a lock held across an await ([`Stats`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::lock;

/// A counter without a key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Counter {
    RateLimited,
    Unauthorized,
    TokenRefreshes,
    TokenGrants,
    RefreshReuseRejected,
    FaultsInjected,
    Writes,
}

/// Everything `GET /_sim/stats` answers.
///
/// Invariants: plain counters are atomics; the two keyed maps sit behind one std Mutex held
/// only for a map update, never across an await. `in_flight` is a gauge maintained by the
/// [`InFlight`] guard, so it stays right even when a connection dies mid-answer; a reset
/// zeroes the counters but keeps the gauge and restarts `max_in_flight` from it.
#[derive(Default)]
pub(crate) struct Stats {
    requests_total: AtomicU64,
    rate_limited: AtomicU64,
    unauthorized: AtomicU64,
    token_refreshes: AtomicU64,
    token_grants: AtomicU64,
    refresh_reuse_rejected: AtomicU64,
    faults_injected: AtomicU64,
    writes: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    keyed: Mutex<Keyed>,
}

#[derive(Default)]
struct Keyed {
    by_route: HashMap<String, u64>,
    by_token: HashMap<String, u64>,
    raw_tokens: Vec<String>,
}

impl Stats {
    fn cell(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::RateLimited => &self.rate_limited,
            Counter::Unauthorized => &self.unauthorized,
            Counter::TokenRefreshes => &self.token_refreshes,
            Counter::TokenGrants => &self.token_grants,
            Counter::RefreshReuseRejected => &self.refresh_reuse_rejected,
            Counter::FaultsInjected => &self.faults_injected,
            Counter::Writes => &self.writes,
        }
    }

    pub fn incr(&self, counter: Counter) {
        self.cell(counter).fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one request under `"METHOD /raw/path"`.
    pub fn request(&self, method: &str, path: &str) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let key = format!("{method} {path}");
        *lock(&self.keyed).by_route.entry(key).or_insert(0) += 1;
    }

    /// Counts one API request made with `token` (valid or not), under its short hash: the
    /// stats are read over plain HTTP, and a token is a credential.
    pub fn token(&self, token: &str) {
        let mut keyed = lock(&self.keyed);
        let name = token_hash(token);
        *keyed.by_token.entry(name).or_insert(0) += 1;
        if keyed.raw_tokens.len() < 1024 && !keyed.raw_tokens.iter().any(|t| t == token) {
            keyed.raw_tokens.push(token.to_owned());
        }
    }

    /// Every distinct token seen (the first 1024), for in-process test harnesses only.
    pub fn raw_tokens(&self) -> Vec<String> {
        lock(&self.keyed).raw_tokens.clone()
    }

    /// Marks one request as in flight until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.max_in_flight.fetch_max(now, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    pub fn snapshot(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let keyed = lock(&self.keyed);
        json!({
            "requests_total": get(&self.requests_total),
            "by_route": keyed.by_route,
            "by_token": keyed.by_token,
            "rate_limited": get(&self.rate_limited),
            "unauthorized": get(&self.unauthorized),
            "token_refreshes": get(&self.token_refreshes),
            "token_grants": get(&self.token_grants),
            "refresh_reuse_rejected": get(&self.refresh_reuse_rejected),
            "faults_injected": get(&self.faults_injected),
            "writes": get(&self.writes),
            "in_flight": get(&self.in_flight),
            "max_in_flight": get(&self.max_in_flight),
        })
    }

    pub fn reset(&self) {
        for cell in [
            &self.requests_total,
            &self.rate_limited,
            &self.unauthorized,
            &self.token_refreshes,
            &self.token_grants,
            &self.refresh_reuse_rejected,
            &self.faults_injected,
            &self.writes,
        ] {
            cell.store(0, Ordering::Relaxed);
        }
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Acquire), Ordering::Release);
        let mut keyed = lock(&self.keyed);
        keyed.by_route.clear();
        keyed.by_token.clear();
        keyed.raw_tokens.clear();
    }
}

/// Keeps a request counted in `in_flight`; it travels with the response body so a slowly
/// dribbled answer stays in flight until its last byte is handed over.
pub(crate) struct InFlight(Arc<Stats>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How `/_sim/stats` names a token: `sha256:` and the first 12 hex digits of its SHA-256,
/// enough to tell tokens apart and useless to a reader.
pub fn token_hash(token: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let hex: String = digest.as_ref()[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_resets() {
        let stats = Arc::new(Stats::default());
        stats.request("GET", "/me");
        stats.request("GET", "/me");
        stats.token("t1");
        stats.incr(Counter::RateLimited);
        let a = stats.enter();
        let b = stats.enter();
        drop(a);
        let snap = stats.snapshot();
        assert_eq!(
            snap["by_route"]["GET /me"], 2,
            "expected 2 GET /me, saw {snap}"
        );
        let t1 = token_hash("t1");
        assert_eq!(snap["by_token"][&t1], 1, "expected 1 for t1, saw {snap}");
        assert!(
            !snap.to_string().contains("\"t1\""),
            "expected no raw token, saw {snap}"
        );
        assert_eq!(snap["rate_limited"], 1);
        assert_eq!(snap["in_flight"], 1, "expected 1 in flight, saw {snap}");
        assert_eq!(snap["max_in_flight"], 2, "expected max 2, saw {snap}");
        stats.reset();
        let snap = stats.snapshot();
        assert_eq!(
            snap["requests_total"], 0,
            "expected zero after reset, saw {snap}"
        );
        assert_eq!(
            snap["max_in_flight"], 1,
            "expected max restarted at gauge, saw {snap}"
        );
        drop(b);
        assert_eq!(stats.snapshot()["in_flight"], 0);
    }
}
