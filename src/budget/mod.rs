//! The shared upstream budget: GCRA shares (global and per client), the interactive reserve,
//! and the pause the upstream's own rate-limit answers impose. One budget for every caller,
//! so no interleaving admits more than a share allows and nobody waits past `max_wait`;
//! README "How the budget decides" has the invariants and the design.
//!
//! ```no_run
//! # async fn demo(budget: cxgate::budget::Budget) {
//! use std::num::NonZeroU32;
//! use cxgate::budget::Refused;
//! match budget.admit("crm-sync", NonZeroU32::MIN).await {
//!     Ok(admitted) => { /* call the upstream, then budget.observe_upstream(status, &headers) */ }
//!     Err(Refused::Later(r)) => { /* 429 with Retry-After: r.retry_after_secs() */ }
//!     Err(Refused::Never(too_costly)) => { /* 400: no wait can admit this cost */ }
//! }
//! # }
//! ```

mod gcra;
mod headers;
mod ledger;
mod redis;
mod status;
mod upstream;

#[cfg(test)]
mod tests;

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use gcra::{Slot, TokioClock};
use ledger::{Ledger, Step};

/// A GCRA quota: one cell every `period / limit`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub limit: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
}

/// Batch clients may not use the interactive reserve of the global burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientSpec {
    pub name: String,
    /// Its own share of the global budget; `None` = the global budget alone.
    pub share: Option<Share>,
    /// Overrides [`BudgetSpec::max_wait`].
    pub max_wait: Option<Duration>,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpec {
    pub global: Share,
    pub max_wait: Duration,
    /// Share of the global burst (0..=1) only interactive clients may take.
    pub batch_reserve: f64,
    pub clients: Vec<ClientSpec>,
}

/// Which budget refused; its label value in `cxgate_budget_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Global,
    Client,
    Upstream,
}

impl Which {
    pub fn label(self) -> &'static str {
        match self {
            Which::Global => "global",
            Which::Client => "client",
            Which::Upstream => "upstream",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub waited: Duration,
    /// The call's place in the upstream's flight: hand it back with its answer.
    pub ticket: Ticket,
}

/// One admitted upstream call: its sequence number (the order calls were sent in, which
/// orders the upstream's reports) and its cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    seq: u64,
    cost: NonZeroU32,
    /// The bookings the admission made, for [`Budget::refund`].
    booked: Booked,
}

/// What an admission booked on the shares, so a call that is not sent after all can give
/// its cells back where nothing was booked after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Booked {
    /// On this process's ledger.
    Local { own: Option<Slot>, global: Slot },
    /// In Redis, the budget every replica shares.
    Shared {
        own: Option<redis::Booked>,
        global: redis::Booked,
        /// The one probe after a blind pause, which every replica's other calls wait for.
        probe: bool,
    },
    /// Nothing to give back (the replay after a refused token).
    Nothing,
}

/// Told when an admission makes its call wait: `None` while the budget is still deciding
/// (the client's own share's queue, a call out that decides what may go), `Some(at)` once
/// the call's cells are booked on the global share for `at`. A call booked so goes then,
/// unless the upstream pauses every call first, and goes before any booked after it: a
/// caller with the same call to make and time to wait for `at` need book nothing itself.
pub type Queued<'a> = &'a (dyn Fn(Option<tokio::time::Instant>) + Sync);

/// What a refusal asks a caller to wait when the call sent to learn the upstream's count
/// has not been answered in time.
const LEARNING_RETRY: Duration = Duration::from_secs(1);

/// How long a caller always grants the call sent to learn the upstream's count, even with a
/// `max_wait` of 0: refusing at once would turn away a cold start's burst that the shares
/// allow, where the answer usually comes in milliseconds.
const LEARNING_GRACE: Duration = Duration::from_secs(1);

/// No budget within the request's `max_wait`: the proxy answers 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{} budget exhausted; next free in {retry_after:?}", budget.label())]
pub struct Rejected {
    /// Exact time until the refusing budget could admit this request.
    pub retry_after: Duration,
    pub budget: Which,
}

impl Rejected {
    /// `Retry-After` in whole seconds, rounded up so a retry then finds the budget, min 1.
    pub fn retry_after_secs(&self) -> u64 {
        headers::whole_seconds(self.retry_after).max(1)
    }
}

/// A call whose cost is more cells than a share it must pass holds in one burst: no wait
/// can admit it (booking it would lock every caller out until the excess drained).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "this route costs {cost} budget cells per call, more than the {} budget's burst of \
     {burst} usable by this client, so no call to it can ever be admitted; the route's cost \
     must be lowered in the gateway's configuration",
    budget.label()
)]
pub struct TooCostly {
    pub cost: u32,
    /// The cells the refusing share lets this client take at once.
    pub burst: u32,
    pub budget: Which,
}

/// Why [`Budget::admit`] let a call through neither now nor within its wait: not yet (the
/// proxy's 429 with `Retry-After`), or never, whatever the wait (the proxy's 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(transparent)]
    Later(#[from] Rejected),
    #[error(transparent)]
    Never(#[from] TooCostly),
}

impl Refused {
    /// The refusal for now, which a test of a cost that fits expects.
    #[cfg(test)]
    pub(crate) fn later(self) -> Rejected {
        match self {
            Refused::Later(r) => r,
            Refused::Never(c) => panic!("expected a refusal for now, saw {c:?}"),
        }
    }
}

/// The cells of the global burst a client of `priority` may take at once: all of it, or
/// for a batch client what `batch_reserve` leaves (at least one).
pub fn global_usable(global: &Share, batch_reserve: f64, priority: Priority) -> u32 {
    let burst = global.burst.get();
    match priority {
        Priority::Interactive => burst,
        Priority::Batch => burst
            .saturating_sub(ledger::reserve_cells(burst, batch_reserve))
            .max(1),
    }
}

/// The largest cost one call may have under the configured terms, per client: the smaller
/// of its own share's burst and the part of the global burst it may take.
#[derive(Debug)]
struct Caps {
    /// A caller without a `[[clients]]` entry (anonymous): the whole global burst.
    anyone: (u32, Which),
    clients: std::collections::HashMap<String, (u32, Which)>,
}

impl Caps {
    fn of(spec: &BudgetSpec) -> Caps {
        let clients = spec
            .clients
            .iter()
            .map(|c| {
                let global = (
                    global_usable(&spec.global, spec.batch_reserve, c.priority),
                    Which::Global,
                );
                let cap = match c.share {
                    Some(own) if own.burst.get() < global.0 => (own.burst.get(), Which::Client),
                    _ => global,
                };
                (c.name.clone(), cap)
            })
            .collect();
        Caps {
            anyone: (spec.global.burst.get(), Which::Global),
            clients,
        }
    }

    fn check(&self, client: &str, cost: NonZeroU32) -> Result<(), TooCostly> {
        let (burst, budget) = self.clients.get(client).copied().unwrap_or(self.anyone);
        if cost.get() > burst {
            return Err(TooCostly {
                cost: cost.get(),
                burst,
                budget,
            });
        }
        Ok(())
    }
}

/// The budget handle; clones share one state.
#[derive(Clone)]
pub struct Budget {
    inner: Arc<Inner>,
}

struct Inner {
    clock: TokioClock,
    ledger: Mutex<Ledger>,
    /// Unique in the process, never reused: what a thread's cached rate-limit fields
    /// ([`Budget::answer_headers`]) name the budget by.
    id: u64,
    /// Bumped each time the ledger is let go by anything that may have changed it, so
    /// fields cached from it are known to be current.
    version: AtomicU64,
    /// The largest cost a call may have under the configured terms, the one check that
    /// refuses a cost no wait can admit (see [`Budget::admit`]).
    caps: Mutex<Caps>,
    metrics: Metrics,
    /// `budget.backend = "redis"`: admissions go to the shared budget (see `redis`).
    shared: Option<redis::Shared>,
    /// Wakes the calls waiting for the first answer that tells what the upstream has left:
    /// notified whenever an admitted call's flight ends.
    landed: tokio::sync::Notify,
}

struct Metrics {
    wait: HistogramVec,
    rejections: IntCounterVec,
    upstream_remaining: IntGauge,
    /// Upstream answers saying its limit is reached, by `kind` (`429`, `rate_limit_reached`).
    limit_answers: IntCounterVec,
}

/// The `kind` labels of `cxgate_upstream_limit_answers_total`: a 429, or the real API's 400
/// with `"error": "rate_limit_reached"`.
pub const LIMIT_KINDS: [&str; 2] = ["429", "rate_limit_reached"];

impl Metrics {
    fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let buckets = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ];
        let wait = HistogramVec::new(
            HistogramOpts::new(
                "cxgate_budget_wait_seconds",
                "Time admitted upstream calls waited for budget.",
            )
            .buckets(buckets),
            &["client"],
        )?;
        let rejections = IntCounterVec::new(
            Opts::new(
                "cxgate_budget_rejections_total",
                "Upstream calls refused for lack of budget, by the budget that refused.",
            ),
            &["client", "budget"],
        )?;
        let upstream_remaining = IntGauge::new(
            "cxgate_upstream_ratelimit_remaining",
            "Last X-RateLimit-Remaining reported by the upstream (-1 while unknown).",
        )?;
        upstream_remaining.set(-1);
        let limit_answers = IntCounterVec::new(
            Opts::new(
                "cxgate_upstream_limit_answers_total",
                "Upstream answers saying its rate limit is reached, by kind (429, or the API's \
                 400 rate_limit_reached); each starts an upstream pause.",
            ),
            &["kind"],
        )?;
        for kind in LIMIT_KINDS {
            limit_answers.with_label_values(&[kind]);
        }
        registry.register(Box::new(wait.clone()))?;
        registry.register(Box::new(rejections.clone()))?;
        registry.register(Box::new(upstream_remaining.clone()))?;
        registry.register(Box::new(limit_answers.clone()))?;
        Ok(Self {
            wait,
            rejections,
            upstream_remaining,
            limit_answers,
        })
    }
}

impl Budget {
    /// Builds the budget and registers its metrics on `registry` (once per registry: use
    /// [`Budget::reload`] for a new configuration).
    pub fn new(spec: BudgetSpec, registry: &Registry) -> Result<Budget, prometheus::Error> {
        Ok(Budget {
            inner: Arc::new(Inner {
                clock: TokioClock::new(),
                id: BUDGETS.fetch_add(1, Ordering::Relaxed),
                version: AtomicU64::new(0),
                caps: Mutex::new(Caps::of(&spec)),
                ledger: Mutex::new(Ledger::new(spec)),
                metrics: Metrics::register(registry)?,
                shared: None,
                landed: tokio::sync::Notify::new(),
            }),
        })
    }

    /// Creates, at zero, each client's budget series (its wait histogram and a rejection
    /// counter per budget), so dashboards and alerts see them from the first scrape.
    pub fn prime_metrics(&self, clients: &[&str]) {
        let m = &self.inner.metrics;
        for client in clients {
            m.wait.with_label_values(&[client]);
            for which in [Which::Global, Which::Client, Which::Upstream] {
                m.rejections.with_label_values(&[client, which.label()]);
            }
        }
    }

    /// Like [`Budget::new`], with one budget shared by every replica through `redis`; while
    /// Redis is unreachable this replica keeps `1 / replicas` of every share locally, and
    /// its part of the upstream's count left.
    pub fn new_shared(
        spec: BudgetSpec,
        registry: &Registry,
        redis: crate::replicas::Redis,
        replicas: NonZeroU32,
    ) -> Result<Budget, prometheus::Error> {
        let budget = Budget {
            inner: Arc::new(Inner {
                clock: TokioClock::new(),
                id: BUDGETS.fetch_add(1, Ordering::Relaxed),
                version: AtomicU64::new(0),
                caps: Mutex::new(Caps::of(&spec)),
                ledger: Mutex::new(Ledger::new(spec.clone())),
                metrics: Metrics::register(registry)?,
                shared: Some(redis::Shared::new(redis, replicas, spec)),
                landed: tokio::sync::Notify::new(),
            }),
        };
        redis::Shared::spawn_beat(&budget);
        Ok(budget)
    }

    /// Names the upstream timeout (`upstream.timeout`), the longest a call admitted here is
    /// out: with Redis, what bounds a believable count of calls in flight. (The record of
    /// a replica's calls out lasts a few seconds past its last word whatever the timeout:
    /// a replica with calls out renews it every second, so the calls of one that dies with
    /// calls out stop counting against the others seconds later.) No effect without Redis.
    pub fn set_call_deadline(&self, deadline: Duration) {
        if let Some(shared) = &self.inner.shared {
            shared.set_call_deadline(deadline);
        }
    }

    /// Applies a new configuration in place. What was spent stays spent (global and surviving
    /// clients' shares), and an upstream pause goes on, so a reload cannot open a burst.
    /// Debt the new terms could never have booked (a burst cut from 50 to 10, say) is cut to
    /// what they allow, so no caller stays locked out by the old terms.
    pub fn reload(&self, spec: BudgetSpec) {
        *self.caps() = Caps::of(&spec);
        let mut ledger = self.ledger();
        match &self.inner.shared {
            Some(shared) => shared.reconfigure(&mut ledger, spec),
            None => ledger.reconfigure(spec),
        }
        ledger.bound_debt(self.inner.clock.nanos());
    }

    fn caps(&self) -> MutexGuard<'_, Caps> {
        self.inner
            .caps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The longest an admission of `client` waits before it is let through or refused,
    /// counted from its arrival: its `max_wait`, or the grace a call sent to learn the
    /// upstream's count is always granted, if longer.
    pub fn longest_wait(&self, client: &str) -> Duration {
        let (max_wait, _) = self.ledger().terms(client);
        Duration::from_nanos(max_wait).max(LEARNING_GRACE)
    }

    /// `client`'s `max_wait`: the longest its admission waits for a share's cells.
    pub fn max_wait(&self, client: &str) -> Duration {
        Duration::from_nanos(self.peek().terms(client).0)
    }

    /// Waits for `cost` cells for one upstream call of `client`, or refuses at once when the
    /// wait would exceed the client's `max_wait` or the upstream has paused us
    /// ([`Refused::Later`]). A cost above the burst of a share the call must pass is refused
    /// as [`Refused::Never`], booking nothing: no wait could admit it, and booking it would
    /// lock every caller out until the excess drained (the configuration refuses such costs;
    /// this is the same rule where the call is made). Dropping the future while it waits
    /// gives its cells back where nothing queued behind them.
    pub async fn admit(&self, client: &str, cost: NonZeroU32) -> Result<Admitted, Refused> {
        self.admit_within(client, cost, Duration::ZERO).await
    }

    /// [`Budget::admit`] for a caller that has `waited` already (behind another client's
    /// merged call): every wait it does here uses only what is left of its `max_wait`, so
    /// in all it waits at most `max_wait` from its arrival. `Admitted::waited` counts from
    /// the arrival too.
    pub async fn admit_within(
        &self,
        client: &str,
        cost: NonZeroU32,
        waited: Duration,
    ) -> Result<Admitted, Refused> {
        self.admit_noting(client, cost, waited, &|_| {}).await
    }

    /// [`Budget::admit_within`] that calls `queued` when the budget makes the call wait (for
    /// a share's next cell, or for the call sent to learn the upstream's count): until then
    /// the admission is only being decided, which takes no time of anyone's `max_wait`. See
    /// [`Queued`] for what it is told.
    pub async fn admit_noting(
        &self,
        client: &str,
        cost: NonZeroU32,
        waited: Duration,
        queued: Queued<'_>,
    ) -> Result<Admitted, Refused> {
        self.caps().check(client, cost)?;
        let waited = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        let admitted = match &self.inner.shared {
            Some(shared) => {
                self.admit_shared(shared, client, cost, waited, queued)
                    .await
            }
            None => self.admit_local(client, cost, waited, queued).await,
        };
        admitted.map_err(Refused::Later)
    }

    /// [`Budget::admit_within`] on this process's own ledger.
    async fn admit_local(
        &self,
        client: &str,
        cost: NonZeroU32,
        waited: u64,
        queued: Queued<'_>,
    ) -> Result<Admitted, Rejected> {
        let clock = self.inner.clock;
        if self.inner.shared.is_some() {
            // On Redis's fallback the ledger holds every share divided by the replicas: a
            // cost the configured terms admit may be past a divided burst, and waits for
            // Redis to come back.
            let fits = self.ledger().fits(client, cost);
            fits.map_err(|r| self.refuse(client, r))?;
        }
        let now = clock.nanos();
        let arrived = now.saturating_sub(waited);
        let mut hold = Hold {
            budget: self,
            client,
            own: None,
            global: None,
            upstream: None,
        };
        let grant = loop {
            let landed = self.inner.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            let step = self
                .ledger()
                .arrive_since(client, cost, arrived, clock.nanos());
            match step.map_err(|r| self.refuse(client, r))? {
                Step::Go { own, grant } => {
                    hold.own = own;
                    break grant;
                }
                Step::Queue { own } => {
                    hold.own = Some(own);
                    queued(None);
                    tokio::time::sleep_until(clock.instant(own.at)).await;
                    break self.cross(client, cost, arrived, queued).await?;
                }
                Step::Wait(later) => {
                    queued(None);
                    self.come_back(later, landed, client, arrived).await?
                }
            }
        };
        hold.global = Some(grant.global);
        hold.upstream = Some(grant.seq);
        if grant.global.at > clock.nanos() {
            queued(Some(clock.instant(grant.global.at)));
            tokio::time::sleep_until(clock.instant(grant.global.at)).await;
        }
        let now = clock.nanos();
        let last_look = self.ledger().recheck(grant, now);
        last_look.map_err(|r| self.refuse(client, r))?;
        let booked = Booked::Local {
            own: hold.own,
            global: grant.global,
        };
        hold.keep();
        let waited = Duration::from_nanos(now.saturating_sub(arrived));
        let metrics = &self.inner.metrics;
        metrics
            .wait
            .with_label_values(&[client])
            .observe(waited.as_secs_f64());
        Ok(Admitted {
            waited,
            ticket: Ticket {
                seq: grant.seq,
                cost,
                booked,
            },
        })
    }

    /// Step 2 of a local admission, after the wait for the client's own share: waits (within
    /// `max_wait`) while the call sent to learn the upstream's count is out.
    async fn cross(
        &self,
        client: &str,
        cost: NonZeroU32,
        arrived: u64,
        queued: Queued<'_>,
    ) -> Result<ledger::Grant, Rejected> {
        loop {
            let landed = self.inner.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            let now = self.inner.clock.nanos();
            let crossed = self.ledger().cross(client, cost, arrived, now);
            match crossed.map_err(|r| self.refuse(client, r))? {
                ledger::Crossed::Go(grant) => return Ok(grant),
                ledger::Crossed::Wait(later) => {
                    queued(None);
                    self.come_back(later, landed, client, arrived).await?
                }
            }
        }
    }

    /// Waits as `later` says: for a landing (see [`Budget::await_landing`]), or until the
    /// blind pause's end (the ledger only asks for that within the caller's `max_wait`).
    async fn come_back(
        &self,
        later: ledger::Later,
        landed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        client: &str,
        arrived: u64,
    ) -> Result<(), Rejected> {
        match later {
            ledger::Later::Landing => self.await_landing(landed, client, arrived).await,
            ledger::Later::At(at) => {
                tokio::time::sleep_until(self.inner.clock.instant(at)).await;
                Ok(())
            }
        }
    }

    /// Waits for `landed` (an admitted call's flight ended) for what is left of the
    /// client's `max_wait`, or of [`LEARNING_GRACE`] if longer; refuses when it does not come
    /// in time.
    async fn await_landing(
        &self,
        landed: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        client: &str,
        arrived: u64,
    ) -> Result<(), Rejected> {
        let (max_wait, _) = self.ledger().terms(client);
        let waited = self.inner.clock.nanos().saturating_sub(arrived);
        let patience = max_wait.max(ledger::nanos(LEARNING_GRACE));
        let left = Duration::from_nanos(patience.saturating_sub(waited));
        if tokio::time::timeout(left, landed).await.is_ok() {
            return Ok(());
        }
        let refusal = ledger::Refusal {
            which: Which::Upstream,
            wait: ledger::nanos(LEARNING_RETRY),
        };
        Err(self.refuse(client, refusal))
    }

    /// Learns from one upstream answer (see `upstream` for the rules); a 429 is the limit.
    pub fn observe_upstream(&self, status: StatusCode, headers: &HeaderMap) {
        let limited = status == StatusCode::TOO_MANY_REQUESTS;
        if limited {
            self.count_limit_answer(status);
        }
        self.observe_at(limited, headers, None, SystemTime::now());
        self.inner.landed.notify_waiters();
        self.share_upstream_pause(self.inner.clock.nanos());
    }

    /// Learns from the answer to the admitted call `ticket` and ends that call's flight.
    /// Returns whether the upstream said its limit is reached (a 429, or the real API's 400
    /// `rate_limit_reached`, see [`limit_reached`]): that answer is not the client's fault
    /// and must not reach it as one.
    pub fn observe_answer(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        body: &[u8],
        ticket: Ticket,
    ) -> bool {
        let limited = limit_reached(status, body);
        if limited {
            self.count_limit_answer(status);
        }
        self.observe_at(limited, headers, Some(ticket.seq), SystemTime::now());
        self.inner.landed.notify_waiters();
        let now = self.inner.clock.nanos();
        self.share_upstream_pause(now);
        let booked = matches!(ticket.booked, Booked::Shared { .. });
        let about = Some((ticket.seq, booked, u64::from(ticket.cost.get())));
        self.share_upstream_answer(limited, headers, about);
        limited
    }

    /// Counts an upstream call that went without admission (the replay after a refused
    /// token) against the upstream's allowance, before its answer is read.
    pub fn spend_unadmitted(&self, cost: NonZeroU32) -> Ticket {
        let seq = self.ledger().upstream.spend(u64::from(cost.get()));
        Ticket {
            seq,
            cost,
            booked: Booked::Nothing,
        }
    }

    /// An admitted call of `client` that was not sent after all (what it was to fetch was
    /// found in the cache once its wait ended): its cells go back to the shares where
    /// nothing was booked after them (the same rule as a cancelled wait), here and in Redis
    /// when replicas share the budget, and it leaves the upstream's flight.
    pub fn refund(&self, client: &str, ticket: Ticket) {
        match ticket.booked {
            Booked::Local { own, global } => {
                self.ledger()
                    .give_back(client, own, Some(global), Some(ticket.seq));
            }
            Booked::Shared { own, global, probe } => {
                let word = {
                    let mut ledger = self.ledger();
                    ledger.upstream.give_back(ticket.seq);
                    let now = self.inner.clock.nanos();
                    let about = Some((ticket.seq, true, u64::from(ticket.cost.get())));
                    let shared = self.inner.shared.as_ref();
                    shared.map(|s| s.word(&ledger, now, about))
                };
                self.unmirror(client, own, Some(global));
                if let (Some(shared), Some(word)) = (&self.inner.shared, word) {
                    shared.refund(client, own, global, ticket.cost, probe, word);
                }
            }
            Booked::Nothing => self.ledger().upstream.give_back(ticket.seq),
        }
        self.inner.landed.notify_waiters();
    }

    /// An admitted call ended without an answer to read (refused token, unreachable
    /// upstream): its cells leave the flight.
    pub fn call_failed(&self, ticket: Ticket) {
        self.ledger().upstream.done(ticket.seq);
        self.inner.landed.notify_waiters();
        let probe = matches!(ticket.booked, Booked::Shared { probe: true, .. });
        let booked = matches!(ticket.booked, Booked::Shared { .. });
        let cost = u64::from(ticket.cost.get());
        self.share_call_failed(cost, probe, Some((ticket.seq, booked, cost)));
    }

    /// Ends an upstream pause now, here and (with Redis) on every replica. Returns whether
    /// one was running.
    pub async fn resume(&self) -> bool {
        let was = self.ledger().upstream.resume();
        let shared = self.resume_shared().await;
        was || shared
    }

    fn observe_at(&self, limited: bool, headers: &HeaderMap, sent: Option<u64>, wall: SystemTime) {
        let now = self.inner.clock.nanos();
        let mut ledger = self.ledger();
        ledger.upstream.read(limited, headers, sent, now, wall);
        if let Some(remaining) = ledger.upstream.reported() {
            let gauge = i64::try_from(remaining).unwrap_or(i64::MAX);
            self.inner.metrics.upstream_remaining.set(gauge);
        }
    }

    /// [`Budget::status_json`] with the pause actually in force: this replica's own (an
    /// upstream answer it read) or the shared one in Redis (learnt by another replica, or
    /// the shared allowance run dry), whichever ends later, and `pause_source` saying which
    /// (`"local"`, `"shared"`, `"local+shared"`, or null when none holds).
    pub async fn status_now(&self) -> serde_json::Value {
        let shared = self.shared_pause().await;
        let mut status = self.status_json();
        // The allowance in force is the smaller of this replica's and the shared one.
        let shared_allowance = shared.and_then(|s| s.allowance);
        if let Some(a) = shared_allowance {
            let local = status["upstream"]["allowance"].as_u64();
            status["upstream"]["allowance"] = serde_json::json!(local.map_or(a, |l| l.min(a)));
        }
        let local = self.paused_for();
        let shared = shared
            .map(|s| Duration::from_micros(s.pause_us.max(s.dry_us)))
            .filter(|d| !d.is_zero());
        let (in_force, source) = match (local, shared) {
            (Some(l), Some(s)) => (Some(l.max(s)), Some("local+shared")),
            (Some(l), None) => (Some(l), Some("local")),
            (None, Some(s)) => (Some(s), Some("shared")),
            (None, None) => (None, None),
        };
        let upstream = &mut status["upstream"];
        upstream["paused_for_s"] = serde_json::json!(in_force.map(|p| p.as_secs_f64()));
        upstream["paused_until"] = serde_json::json!(in_force
            .map(|p| { humantime::format_rfc3339_seconds(SystemTime::now() + p).to_string() }));
        upstream["pause_source"] = serde_json::json!(source);
        status
    }

    fn count_limit_answer(&self, status: StatusCode) {
        let kind = if status == StatusCode::TOO_MANY_REQUESTS {
            LIMIT_KINDS[0]
        } else {
            LIMIT_KINDS[1]
        };
        self.inner
            .metrics
            .limit_answers
            .with_label_values(&[kind])
            .inc();
    }

    /// The upstream pause left, if any.
    pub fn paused_for(&self) -> Option<Duration> {
        let now = self.inner.clock.nanos();
        self.ledger()
            .upstream
            .paused_for(now)
            .map(Duration::from_nanos)
    }

    fn refuse(&self, client: &str, refusal: ledger::Refusal) -> Rejected {
        let budget = refusal.which;
        self.ledger().count_rejection(client, budget);
        self.inner
            .metrics
            .rejections
            .with_label_values(&[client, budget.label()])
            .inc();
        Rejected {
            retry_after: Duration::from_nanos(refusal.wait),
            budget,
        }
    }

    /// The ledger, even if a panic elsewhere poisoned the mutex: every ledger method keeps the
    /// state consistent between statements (plain saturating arithmetic), so refusing all
    /// traffic forever would be worse than going on.
    ///
    /// Letting it go counts as a change (see [`Inner::version`]), whatever was done with it.
    fn ledger(&self) -> Changing<'_> {
        Changing {
            guard: self.peek(),
            version: &self.inner.version,
        }
    }

    /// The ledger, to be read only: letting it go changes no version.
    fn peek(&self) -> MutexGuard<'_, Ledger> {
        self.inner
            .ledger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Numbers the budgets of the process ([`Inner::id`]).
static BUDGETS: AtomicU64 = AtomicU64::new(1);

/// The ledger as [`Budget::ledger`] hands it out: the lock, and a new version when let go.
struct Changing<'a> {
    guard: MutexGuard<'a, Ledger>,
    version: &'a AtomicU64,
}

impl std::ops::Deref for Changing<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.guard
    }
}

impl std::ops::DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        &mut self.guard
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        // Still under the lock: a reader that then sees this version sees the change too.
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// Whether an upstream answer says its rate limit is reached: a 429, or the real API's own
/// form, HTTP 400 with a top-level `"error": "rate_limit_reached"` (the API's clients expect
/// it may later adopt 429, so both count). The whole body is read, however long: it is
/// already held (bounded by the upstream body limit), and the fields the API names may come
/// after any padding.
pub fn limit_reached(status: StatusCode, body: &[u8]) -> bool {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return true;
    }
    if status != StatusCode::BAD_REQUEST {
        return false;
    }
    #[derive(serde::Deserialize)]
    struct Meta<'a> {
        #[serde(borrow, default)]
        error_type: Option<std::borrow::Cow<'a, str>>,
    }
    #[derive(serde::Deserialize)]
    struct Said<'a> {
        #[serde(borrow, default)]
        error: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default)]
        meta: Option<Meta<'a>>,
    }
    let Ok(said) = serde_json::from_slice::<Said<'_>>(body) else {
        return false;
    };
    // The top-level `error` the clients read, or the envelope's `meta.error_type` the API
    // may answer with alone; in any letter case.
    let named = |e: Option<&std::borrow::Cow<'_, str>>| {
        e.is_some_and(|e| e.eq_ignore_ascii_case("rate_limit_reached"))
    };
    named(said.error.as_ref()) || named(said.meta.as_ref().and_then(|m| m.error_type.as_ref()))
}

/// What an `admit` in progress has reserved; given back on drop unless the request was
/// admitted, so a refusal at the second step or a cancelled wait does not burn cells.
struct Hold<'a> {
    budget: &'a Budget,
    client: &'a str,
    own: Option<Slot>,
    global: Option<Slot>,
    /// The sequence number of the upstream flight taken.
    upstream: Option<u64>,
}

impl Hold<'_> {
    fn keep(&mut self) {
        self.own = None;
        self.global = None;
        self.upstream = None;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if self.own.is_none() && self.global.is_none() && self.upstream.is_none() {
            return;
        }
        self.budget
            .ledger()
            .give_back(self.client, self.own, self.global, self.upstream);
        if self.upstream.is_some() {
            self.budget.inner.landed.notify_waiters();
        }
    }
}
