//! The cache's size gauges, read from the cache itself at scrape time: moka changes its
//! counts in its own maintenance (evictions, expiries), where no code of ours runs, so only
//! reading at scrape time keeps `cxgate_cache_entries` and `cxgate_cache_bytes` true.

use moka::sync::Cache;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::IntGauge;

use super::store::Slot;

/// Registers as one collector exporting `cxgate_cache_entries` and `cxgate_cache_bytes`.
///
/// moka's counts are lazy (an insert is counted only once its maintenance has run), so the
/// scrape runs that maintenance first: what it reports is what is stored at that moment.
pub(crate) struct Gauges {
    entries: Cache<u32, Slot>,
    count: IntGauge,
    bytes: IntGauge,
}

impl Gauges {
    pub(crate) fn new(entries: Cache<u32, Slot>) -> Result<Gauges, prometheus::Error> {
        Ok(Gauges {
            entries,
            count: IntGauge::new("cxgate_cache_entries", "Entries held in the response cache")?,
            bytes: IntGauge::new(
                "cxgate_cache_bytes",
                "Bytes of bodies, headers and overhead held in the response cache",
            )?,
        })
    }
}

impl Collector for Gauges {
    fn desc(&self) -> Vec<&Desc> {
        self.count
            .desc()
            .into_iter()
            .chain(self.bytes.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.entries.run_pending_tasks();
        self.count.set(as_gauge(self.entries.entry_count()));
        self.bytes.set(as_gauge(self.entries.weighted_size()));
        let mut families = self.count.collect();
        families.extend(self.bytes.collect());
        families
    }
}
