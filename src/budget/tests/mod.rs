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

/// An upstream that counts its limit over fixed windows, each begun by the first call after
/// the last one ended (as the simulator does), answering with the API's rate fields (`Reset`
/// in whole seconds from now, rounded up) and, over the limit, the API's 400
/// `rate_limit_reached`. Each call is counted and answered after a random delay, so calls
/// are counted and answered in another order than they were sent.
pub(crate) struct Windowed {
    pub(crate) limit: u64,
    pub(crate) window: Duration,
    pub(crate) jitter_ms: u64,
    state: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
    pub(crate) calls: std::sync::atomic::AtomicU64,
    pub(crate) over: std::sync::atomic::AtomicU64,
}

impl Windowed {
    pub(crate) fn new(limit: u64, window: Duration, jitter_ms: u64) -> Windowed {
        Windowed {
            limit,
            window,
            jitter_ms,
            state: std::sync::Mutex::new((None, 0)),
            calls: Default::default(),
            over: Default::default(),
        }
    }

    /// Sends the admitted call of `ticket` and reads its answer back into `budget`.
    pub(crate) async fn call(&self, budget: &Budget, ticket: Ticket) {
        use std::sync::atomic::Ordering::Relaxed;
        let delay = || Duration::from_millis(fastrand::u64(0..=self.jitter_ms));
        tokio::time::sleep(delay()).await;
        let now = tokio::time::Instant::now();
        let (left, reset_in) = {
            let mut state = self.state.lock().expect("not poisoned");
            let start = match state.0 {
                Some(start) if now < start + self.window => start,
                _ => {
                    *state = (Some(now), 0);
                    now
                }
            };
            let left = if state.1 < self.limit {
                state.1 += 1;
                Some(self.limit - state.1)
            } else {
                None
            };
            (left, start + self.window - now)
        };
        self.calls.fetch_add(1, Relaxed);
        let mut h = HeaderMap::new();
        let set = |h: &mut HeaderMap, name: &'static str, v: u64| {
            h.insert(name, http::HeaderValue::from(v));
        };
        set(&mut h, "x-ratelimit-limit", self.limit);
        set(&mut h, "x-ratelimit-remaining", left.unwrap_or(0));
        let secs = reset_in.as_secs() + u64::from(reset_in.subsec_nanos() > 0);
        set(&mut h, "x-ratelimit-reset", secs);
        let (status, body): (StatusCode, &[u8]) = match left {
            Some(_) => (StatusCode::OK, b"{}"),
            None => {
                self.over.fetch_add(1, Relaxed);
                (
                    StatusCode::BAD_REQUEST,
                    br#"{"error":"rate_limit_reached"}"#,
                )
            }
        };
        tokio::time::sleep(delay()).await;
        budget.observe_answer(status, &h, body, ticket);
    }
}

/// `callers` services calling as fast as they are let through `budgets` (in turn) for
/// `run`, each pausing as long as a refusal's `Retry-After` says (at most a second); returns
/// the calls admitted.
pub(crate) async fn drive(
    budgets: &[Budget],
    upstream: &std::sync::Arc<Windowed>,
    callers: usize,
    run: Duration,
) -> u64 {
    let until = tokio::time::Instant::now() + run;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..callers {
        let b = budgets[c % budgets.len()].clone();
        let upstream = upstream.clone();
        set.spawn(async move {
            let mut admitted = 0;
            while tokio::time::Instant::now() < until {
                match b.admit("c", n(1)).await {
                    Ok(a) => {
                        admitted += 1;
                        upstream.call(&b, a.ticket).await;
                    }
                    Err(r) => {
                        let pause = r
                            .later()
                            .retry_after
                            .clamp(Duration::from_millis(10), Duration::from_secs(1));
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            admitted
        });
    }
    let mut admitted = 0;
    while let Some(n) = set.join_next().await {
        admitted += n.expect("caller task");
    }
    admitted
}
