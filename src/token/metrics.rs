//! The token's two metrics: `cxgate_token_expiry_seconds` and
//! `cxgate_token_refreshes_total{result}`, so an alert can fire before the upstream token
//! runs out. Neither metric ever carries token text.

use std::sync::Weak;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, IntCounter, IntCounterVec, Opts, Registry};

use super::error::TokenError;

/// Handles kept by the manager.
pub(crate) struct TokenMetrics {
    pub ok: IntCounter,
    pub error: IntCounter,
}

/// Something that can say how many seconds the token has left.
pub(crate) trait ExpirySource: Send + Sync {
    fn seconds_left(&self) -> Option<f64>;
}

struct ExpiryCollector<S> {
    gauge: Gauge,
    source: Weak<S>,
}

impl<S: ExpirySource> Collector for ExpiryCollector<S> {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.source.upgrade() {
            Some(source) => {
                self.gauge
                    .set(source.seconds_left().unwrap_or(f64::INFINITY));
                self.gauge.collect()
            }
            None => Vec::new(),
        }
    }
}

/// Registers both metrics on `registry`.
///
/// The expiry gauge is computed at scrape time by a custom collector, so it is exact
/// without a timer task. It holds only a `Weak` link to the token state, so the registry
/// does not keep a dropped manager alive. A token with no expiry (a static token, or a file
/// without `expires_at`) exports `+Inf`: it never expires, and the series is there from the
/// first scrape, so `cxgate_token_expiry_seconds < 300` stays false rather than absent.
pub(crate) fn register<S: ExpirySource + 'static>(
    registry: &Registry,
    source: Weak<S>,
) -> Result<TokenMetrics, TokenError> {
    let gauge = Gauge::with_opts(Opts::new(
        "cxgate_token_expiry_seconds",
        "Seconds until the upstream access token expires (negative once expired, +Inf for a \
         token without expiry).",
    ))
    .map_err(TokenError::Metrics)?;
    registry
        .register(Box::new(ExpiryCollector { gauge, source }))
        .map_err(TokenError::Metrics)?;

    let refreshes = IntCounterVec::new(
        Opts::new(
            "cxgate_token_refreshes_total",
            "Access token refresh attempts, by result.",
        ),
        &["result"],
    )
    .map_err(TokenError::Metrics)?;
    registry
        .register(Box::new(refreshes.clone()))
        .map_err(TokenError::Metrics)?;
    // Both series exist from the start, so `rate()` and alerts see a zero, not a gap.
    Ok(TokenMetrics {
        ok: refreshes.with_label_values(&["ok"]),
        error: refreshes.with_label_values(&["error"]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Fixed(Option<f64>);

    impl ExpirySource for Fixed {
        fn seconds_left(&self) -> Option<f64> {
            self.0
        }
    }

    fn gauge_values(registry: &Registry) -> Vec<f64> {
        registry
            .gather()
            .iter()
            .filter(|f| f.name() == "cxgate_token_expiry_seconds")
            .flat_map(|f| f.get_metric().iter().map(|m| m.get_gauge().get_value()))
            .collect()
    }

    #[test]
    fn expiry_is_read_at_scrape_time_and_infinite_when_unknown() {
        let registry = Registry::new();
        let known = Arc::new(Fixed(Some(42.0)));
        let metrics = register(&registry, Arc::downgrade(&known));
        assert!(metrics.is_ok(), "expected registration to succeed");
        assert_eq!(
            gauge_values(&registry),
            vec![42.0],
            "expected the gauge at 42"
        );

        let registry = Registry::new();
        let unknown = Arc::new(Fixed(None));
        let _metrics = register(&registry, Arc::downgrade(&unknown));
        assert_eq!(
            gauge_values(&registry),
            vec![f64::INFINITY],
            "expected +Inf for a token that never expires"
        );
    }

    #[test]
    fn both_refresh_results_are_exported_from_the_start() {
        let registry = Registry::new();
        let source = Arc::new(Fixed(None));
        let _metrics = register(&registry, Arc::downgrade(&source));
        let mut results: Vec<String> = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "cxgate_token_refreshes_total")
            .flat_map(|f| {
                f.get_metric()
                    .iter()
                    .flat_map(|m| m.get_label().iter().map(|l| l.value().to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        results.sort();
        assert_eq!(results, ["error", "ok"], "expected both result labels");
    }
}
