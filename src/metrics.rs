//! The Prometheus registry and the request-level metric handles.
//!
//! One `Registry` is created at start and passed to every module that owns metrics (cache,
//! budget, token register their own); nothing is global. Labels are bounded: `route` is a
//! route's `match` text or `other`, `client` a configured name, never a raw path or key.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
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
        })
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
    out
}

/// A standalone histogram with the latency buckets (used in tests and benches).
pub fn latency_histogram(name: &str) -> Result<Histogram, prometheus::Error> {
    Histogram::with_opts(HistogramOpts::new(name, name).buckets(LATENCY_BUCKETS.to_vec()))
}
