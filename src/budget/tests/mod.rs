//! Behaviour of the whole budget on tokio's paused clock: no test sleeps for real.
//! `admission` covers the shares, queue and reserve; `upstream` the pause; `report` what
//! the budget shows (headers, metrics, status) and reload.

mod admission;
mod report;
mod upstream;

use std::num::NonZeroU32;
use std::time::Duration;

use prometheus::Registry;

use super::*;

pub(super) fn n(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("test values are positive")
}

pub(super) fn share(limit: u32, period_ms: u64, burst: u32) -> Share {
    Share {
        limit: n(limit),
        period: Duration::from_millis(period_ms),
        burst: n(burst),
    }
}

pub(super) fn client(name: &str, share: Option<Share>, priority: Priority) -> ClientSpec {
    ClientSpec {
        name: name.to_owned(),
        share,
        max_wait: None,
        priority,
    }
}

pub(super) fn spec(global: Share, max_wait_ms: u64, clients: Vec<ClientSpec>) -> BudgetSpec {
    BudgetSpec {
        global,
        max_wait: Duration::from_millis(max_wait_ms),
        batch_reserve: 0.0,
        clients,
    }
}

/// A budget whose upstream has answered once, without rate fields: the shares alone pace
/// it (a fresh one sends its first call alone, see `upstream`).
pub(super) fn budget(spec: BudgetSpec) -> Budget {
    let b = Budget::new(spec, &Registry::new()).expect("a fresh registry takes the metrics");
    answered_once(&b);
    b
}

pub(super) fn answered_once(b: &Budget) {
    b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
}

/// Global cells usable by an interactive caller right now.
pub(super) fn global_left(b: &Budget) -> u64 {
    b.status_json()["global"]["remaining"]
        .as_u64()
        .expect("status has global.remaining")
}
