//! The Prometheus registry and the request-level metric handles.
//!
//! One `Registry` is created at start and passed to every module that owns metrics (cache,
//! budget, token register their own); nothing is global. Labels are bounded: `route` is a
//! route's `match` text or `other`, `client` a configured name, never a raw path or key.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Buckets from 50 µs (a cache hit) to 30 s (a slow upstream call at its timeout).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Handles for the metrics the request pipeline records.
#[derive(Clone)]
pub struct RequestMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub upstream_requests: IntCounterVec,
    pub upstream_duration: HistogramVec,
    pub coalesced: IntCounterVec,
    /// Answered requests and upstream calls per second over the last minute, for the
    /// status page.
    pub recent: Arc<Recent>,
}

/// Answered requests and upstream calls, counted per second over the last minute.
#[derive(Default)]
pub struct Recent {
    pub requests: PerSecond,
    pub upstream: PerSecond,
}

/// Slots of [`PerSecond`]: the current second and the 59 before it.
const SLOTS: u64 = 60;

/// A ring of per-second counts: a true windowed rate (the count of the last minute over
/// the time it covers), not an average since start or a decaying one. Each slot packs the
/// second it counts (high 32 bits) and its count (low 32 bits) into one atomic, so adding is
/// one compare-and-swap and a slot left over from a minute ago is never read as recent.
pub struct PerSecond {
    start: Instant,
    slots: [AtomicU64; SLOTS as usize],
}

impl Default for PerSecond {
    fn default() -> Self {
        PerSecond {
            start: Instant::now(),
            slots: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
        }
    }
}

impl PerSecond {
    /// Counts one event now.
    pub fn add(&self) {
        self.add_at(self.start.elapsed());
    }

    /// Counts one event at `now`, a reading of the clock the caller already has.
    pub fn add_now(&self, now: Instant) {
        self.add_at(now.saturating_duration_since(self.start));
    }

    /// The events per second over the last minute (or since start, when younger).
    pub fn per_second(&self) -> f64 {
        self.per_second_at(self.start.elapsed())
    }

    fn add_at(&self, since_start: Duration) {
        let second = since_start.as_secs() & 0xFFFF_FFFF;
        let slot = &self.slots[(second % SLOTS) as usize];
        let mut seen = slot.load(Ordering::Relaxed);
        loop {
            let next = if seen >> 32 == second {
                seen.saturating_add(1)
            } else {
                (second << 32) | 1
            };
            match slot.compare_exchange_weak(seen, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(now) => seen = now,
            }
        }
    }

    /// Sums the current second and the 59 before it: they cover the last 59 s plus the
    /// part of this second gone by, which is what the sum is divided by.
    fn per_second_at(&self, since_start: Duration) -> f64 {
        let now = since_start.as_secs();
        let first = now.saturating_sub(SLOTS - 1);
        let count: u64 = (first..=now)
            .map(|second| {
                let v = self.slots[(second % SLOTS) as usize].load(Ordering::Relaxed);
                if v >> 32 == second & 0xFFFF_FFFF {
                    v & 0xFFFF_FFFF
                } else {
                    0
                }
            })
            .sum();
        let covered = since_start.as_secs_f64() - first as f64;
        count as f64 / covered.max(0.001)
    }
}

impl RequestMetrics {
    /// Registers the request metrics and `cxgate_build_info` on `registry`.
    pub fn register(registry: &Registry) -> Result<RequestMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "cxgate_requests_total",
                "Client requests answered, by outcome.",
            ),
            &["client", "route", "method", "status", "cache"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "cxgate_request_duration_seconds",
                "Time from request head to response head, as the client sees it.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "cache"],
        )?;
        let upstream_requests = IntCounterVec::new(
            Opts::new(
                "cxgate_upstream_requests_total",
                "Calls sent to the upstream, by answer status.",
            ),
            &["route", "status"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new(
                "cxgate_upstream_duration_seconds",
                "Duration of one upstream exchange.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let coalesced = IntCounterVec::new(
            Opts::new(
                "cxgate_coalesced_requests_total",
                "Requests answered by another request's upstream call.",
            ),
            &["route"],
        )?;
        let build = IntGaugeVec::new(
            Opts::new(
                "cxgate_build_info",
                "Build information; the value is always 1.",
            ),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(upstream_requests.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(coalesced.clone()))?;
        registry.register(Box::new(build))?;
        Ok(RequestMetrics {
            requests,
            duration,
            upstream_requests,
            upstream_duration,
            coalesced,
            recent: Arc::default(),
        })
    }
}

/// The label values of one answered request.
#[derive(Debug, Clone, Copy)]
pub struct RequestLabels<'a> {
    pub client: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub status: http::StatusCode,
    pub cache: &'static str,
}

/// The same labels as small numbers: positions in the tables of one configuration snapshot
/// (client ordinal, route index, method index), so the handles of a request can be found
/// without hashing label text under the metric vectors' shared lock.
///
/// The caller upholds two things: two keys of one snapshot are equal only if their labels
/// are, and one snapshot always records to the same `RequestMetrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey {
    /// Identifies the snapshot the numbers refer to (never 0); unique within the process.
    pub snapshot: u64,
    pub client: usize,
    pub route: usize,
    pub method: usize,
    pub status: u16,
    pub cache: &'static str,
}

/// The metrics one request records, resolved from their vectors.
struct Handles {
    requests: IntCounter,
    duration: Histogram,
}

/// One thread's resolved handles, all for one snapshot. Per thread rather than shared, so
/// finding them takes no lock and touches no cache line another core writes.
#[derive(Default)]
struct Resolved {
    snapshot: u64,
    handles: HashMap<RequestKey, Handles, BuildHasherDefault<KeyHasher>>,
}

/// A multiply-rotate hash (as rustc's FxHash) for [`RequestKey`]s: a handful of small
/// numbers and a static label, none of it text a client chose, so SipHash's resistance to
/// chosen collisions buys nothing here and would cost more than the rest of the lookup.
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

thread_local! {
    static RESOLVED: RefCell<Resolved> = RefCell::new(Resolved::default());
}

impl RequestMetrics {
    /// Counts one answered request and observes its duration. The handles are resolved
    /// once per thread, snapshot and label set (as many as the series themselves), and the
    /// table starts over when a request of another snapshot (a reload) comes by.
    pub fn record(&self, key: RequestKey, labels: &RequestLabels<'_>, seconds: f64) {
        self.record_at(key, labels, seconds, Instant::now());
    }

    /// [`RequestMetrics::record`] for a request answered at `now`, a reading of the clock
    /// the caller took anyway.
    pub fn record_at(
        &self,
        key: RequestKey,
        labels: &RequestLabels<'_>,
        seconds: f64,
        now: Instant,
    ) {
        self.recent.requests.add_now(now);
        let recorded = RESOLVED.try_with(|resolved| {
            let mut resolved = resolved.borrow_mut();
            if resolved.snapshot != key.snapshot {
                resolved.snapshot = key.snapshot;
                resolved.handles.clear();
            }
            let handles = resolved
                .handles
                .entry(key)
                .or_insert_with(|| self.resolve(labels));
            handles.requests.inc();
            handles.duration.observe(seconds);
        });
        if recorded.is_err() {
            // The thread is shutting down and its table is gone: resolve this once.
            let handles = self.resolve(labels);
            handles.requests.inc();
            handles.duration.observe(seconds);
        }
    }

    fn resolve(&self, l: &RequestLabels<'_>) -> Handles {
        Handles {
            requests: self.requests.with_label_values(&[
                l.client,
                l.route,
                l.method,
                status_label(&l.status),
                l.cache,
            ]),
            duration: self.duration.with_label_values(&[l.route, l.cache]),
        }
    }
}

/// The `cache` label values a route's answers can carry: a cacheable route answers from the
/// cache (fresh or stale) or goes upstream (alone or merged); any other route passes by.
const CACHEABLE_RESULTS: &[&str] = &["hit", "stale", "miss", "collapsed"];
const PASSING_RESULTS: &[&str] = &["bypass"];

impl RequestMetrics {
    /// Creates, at zero, the series every configured route and client will fill, so the
    /// first scrape already carries every name and `rate()` has a baseline to start from.
    ///
    /// For each client and route (and `other`, the unmatched requests): the route's method,
    /// status 200 and each cache result the route can have; the upstream series of each
    /// route with status 200. Other statuses appear when they happen, which is what an
    /// alert on them expects (`increase()` of an absent series is no increase).
    pub fn prime(&self, cfg: &crate::config::Config, clients: &[&str]) {
        let routes = cfg
            .routes
            .iter()
            .map(|r| {
                let method = r.method.as_ref().map_or("GET", |m| m.as_str());
                let results = if r.ttl.is_some() {
                    CACHEABLE_RESULTS
                } else {
                    PASSING_RESULTS
                };
                (r.match_text.as_str(), method, results)
            })
            .chain(std::iter::once(("other", "GET", PASSING_RESULTS)));
        for (route, method, results) in routes {
            for cache in results {
                for client in clients {
                    self.requests
                        .with_label_values(&[client, route, method, "200", cache]);
                }
                self.duration.with_label_values(&[route, cache]);
            }
            self.upstream_requests.with_label_values(&[route, "200"]);
            self.upstream_duration.with_label_values(&[route]);
            self.coalesced.with_label_values(&[route]);
        }
    }
}

/// The `status` label of a status code: the code itself inside the range HTTP defines
/// (100 to 599), `other` outside it. An upstream may answer with any three digits, and each
/// new label value is a new series kept for the life of the process.
pub fn status_label(status: &http::StatusCode) -> &str {
    if (100..=599).contains(&status.as_u16()) {
        status.as_str()
    } else {
        "other"
    }
}

/// A registry with the standard `process_*` metrics already on it.
pub fn new_registry() -> Registry {
    let registry = Registry::new();
    // Only Linux has the process collector; elsewhere the gateway runs without those series.
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        let _ = registry.register(Box::new(pc));
    }
    registry
}

/// The text exposition of everything on `registry`.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 * 1024);
    // Encoding into a Vec cannot fail on I/O; a metric family error is reported inline.
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        out.extend_from_slice(format!("# encode error: {e}\n").as_bytes());
    }
    infinities_as_the_format_spells_them(out)
}

/// The encoder writes an infinite sample value as Rust prints it (`inf`); the text format
/// spells it `+Inf` / `-Inf` (a token that never expires reports `+Inf`).
fn infinities_as_the_format_spells_them(out: Vec<u8>) -> Vec<u8> {
    if !out.windows(5).any(|w| w == b" inf\n" || w == b"-inf\n") {
        return out;
    }
    let text = String::from_utf8_lossy(&out);
    let mut fixed = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        if let Some(head) = line.strip_suffix(" inf\n") {
            fixed.push_str(head);
            fixed.push_str(" +Inf\n");
        } else if let Some(head) = line.strip_suffix(" -inf\n") {
            fixed.push_str(head);
            fixed.push_str(" -Inf\n");
        } else {
            fixed.push_str(line);
        }
    }
    fixed.into_bytes()
}

/// A standalone histogram with the latency buckets (used in tests and benches).
pub fn latency_histogram(name: &str) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, name).buckets(LATENCY_BUCKETS.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_second_is_the_count_of_the_last_minute() {
        let ring = PerSecond::default();
        let at = Duration::from_secs;
        for _ in 0..600 {
            ring.add_at(at(0));
        }
        for _ in 0..30 {
            ring.add_at(at(30));
        }
        // Young: everything since start over the time since start.
        assert!((ring.per_second_at(at(40)) - 630.0 / 40.0).abs() < 1e-9);
        // A minute on, the burst at second 0 is out of the window, however busy it was.
        assert!((ring.per_second_at(at(70)) - 30.0 / 59.0).abs() < 1e-9);
        // Quiet for a minute: zero, not a decaying remnant.
        assert_eq!(ring.per_second_at(at(100)), 0.0);
        // A slot reused a minute later counts afresh.
        ring.add_at(at(90));
        assert!((ring.per_second_at(at(100)) - 1.0 / 59.0).abs() < 1e-9);
    }

    fn labels(client: &str) -> RequestLabels<'_> {
        RequestLabels {
            client,
            route: "/me",
            method: "GET",
            status: http::StatusCode::OK,
            cache: "hit",
        }
    }

    fn key(snapshot: u64, client: usize) -> RequestKey {
        RequestKey {
            snapshot,
            client,
            route: 0,
            method: 0,
            status: 200,
            cache: "hit",
        }
    }

    #[test]
    fn recorded_requests_land_in_the_labelled_series() {
        let m = RequestMetrics::register(&Registry::new()).unwrap();
        m.record(key(1, 1), &labels("crm"), 0.001);
        m.record(key(1, 1), &labels("crm"), 0.002);
        m.record(key(1, 2), &labels("bi"), 0.003);
        // A reload renumbers: the same numbers under another snapshot are another client.
        m.record(key(2, 1), &labels("bi"), 0.004);
        let count = |client| {
            m.requests
                .with_label_values(&[client, "/me", "GET", "200", "hit"])
                .get()
        };
        assert_eq!((count("crm"), count("bi")), (2, 2));
        let observed = m.duration.with_label_values(&["/me", "hit"]);
        assert_eq!(observed.get_sample_count(), 4);
        assert!((observed.get_sample_sum() - 0.010).abs() < 1e-9);
    }

    #[test]
    fn the_key_hasher_tells_small_keys_apart() {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let build = BuildHasherDefault::<KeyHasher>::default();
        let a = build.hash_one(key(1, 1));
        assert_eq!(a, build.hash_one(key(1, 1)));
        assert_ne!(a, build.hash_one(key(1, 2)));
        assert_ne!(a, build.hash_one(key(2, 1)));
    }
}
