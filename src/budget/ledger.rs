//! The budget's whole state, kept under one mutex, and the admission decisions made on it:
//! one lock, so no interleaving of callers admits more than a share allows. [`Ledger`] says
//! how a decision is taken in at most two critical sections.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderValue;

use super::gcra::{Gcra, Slot};
use super::headers;
use super::upstream::Upstream;
use super::{BudgetSpec, Priority, Share, Which};

pub(crate) struct Client {
    pub(crate) share: Option<(Share, Gcra)>,
    /// The `RateLimit-Policy` of the own share, built with it: it only changes on reload.
    pub(crate) policy: Option<HeaderValue>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) priority: Priority,
}

/// A request spends cells of two shares, its client's own (if it has one) and the global one,
/// and must also pass the upstream's word. The decision is taken in at most two steps, each a
/// single critical section with no `.await` inside:
/// 1. `arrive_since`: refuse at once if any of the three would make it wait past its `max_wait`
///    (nothing is spent then); if its own share is free, reserve both shares now; otherwise
///    reserve only its own share's slot and come back then.
/// 2. `cross` (only after waiting for its own share): reserve the global share. Other clients
///    may have filled the global queue meanwhile, so this can still refuse; the client's cells
///    are then given back if nothing was reserved after them. Only that case can burn cells.
///
/// Either step answers "come back later" while a call out decides what may go (the one sent
/// to learn what the upstream has left, or the blind pause's probe, see `upstream`), or when
/// the probe is due within the caller's `max_wait`: nothing is reserved then, and the caller
/// waits for it.
///
/// Why not reserve the global slot at arrival for the later time? One TAT cannot hold a gap:
/// a slot booked ahead would leave every free cell before it unusable by other clients.
pub(crate) struct Ledger {
    pub(crate) global: Gcra,
    pub(crate) global_share: Share,
    /// The `RateLimit-Policy` of the global share, built with it (see `Client::policy`).
    pub(crate) global_policy: HeaderValue,
    pub(crate) max_wait: Duration,
    /// Cells of the global burst that batch clients may not take.
    pub(crate) reserve_cells: u32,
    pub(crate) clients: HashMap<String, Client>,
    pub(crate) upstream: Upstream,
    /// Refusals per client name, all budgets; and refusals by the global share alone.
    pub(crate) rejections: HashMap<String, u64>,
    pub(crate) global_rejections: u64,
}

/// A refusal: which budget said no, and in how many nanoseconds it could say yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) which: Which,
    pub(crate) wait: u64,
}

/// Cells reserved on the global share, the call's sequence number in the upstream's
/// flight, and the upstream's alarm count when they were.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Grant {
    pub(crate) global: Slot,
    pub(crate) seq: u64,
    alarms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Both shares are reserved: send at `grant.global.at`.
    Go { own: Option<Slot>, grant: Grant },
    /// Only the client's own share is reserved: come back at `own.at` and `cross`.
    Queue { own: Slot },
    /// Nothing is reserved; come back later (see [`Later`]).
    Wait(Later),
}

/// Why an admission comes back later, with nothing reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Later {
    /// A call out decides what may go next (the one sent to learn the upstream's count, the
    /// blind pause's probe, or the calls that used up the allowance): come back when one
    /// lands.
    Landing,
    /// The blind pause ends at this time, within the caller's `max_wait`: come back then,
    /// when one call goes as the probe and the others wait for its answer.
    At(u64),
}

/// Step 2's answer: the global share is reserved, or come back later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crossed {
    Go(Grant),
    Wait(Later),
}

impl Ledger {
    pub(crate) fn new(spec: BudgetSpec) -> Self {
        let clients = spec
            .clients
            .into_iter()
            .map(|c| {
                let share = c.share.map(|s| {
                    let gcra = Gcra::new(&s);
                    (s, gcra)
                });
                let client = Client {
                    policy: c.share.as_ref().map(|s| policy("client", s)),
                    share,
                    max_wait: c.max_wait,
                    priority: c.priority,
                };
                (c.name, client)
            })
            .collect();
        let global = Gcra::new(&spec.global);
        let mut upstream = Upstream::default();
        upstream.set_window(spec.global.period);
        Self {
            reserve_cells: reserve_cells(global.burst(), spec.batch_reserve),
            global,
            global_policy: policy("global", &spec.global),
            global_share: spec.global,
            max_wait: spec.max_wait,
            clients,
            upstream,
            rejections: HashMap::new(),
            global_rejections: 0,
        }
    }

    /// A new configuration that keeps what was spent: the global TAT, each surviving client's
    /// TAT, the upstream's pause and the refusal counts.
    pub(crate) fn reconfigure(&mut self, spec: BudgetSpec) {
        let mut next = Ledger::new(spec);
        next.global = next.global.carry_over(&self.global);
        for (name, client) in next.clients.iter_mut() {
            let old = self.clients.get(name).and_then(|c| c.share.as_ref());
            if let (Some((_, new)), Some((_, old))) = (client.share.as_mut(), old) {
                *new = new.clone().carry_over(old);
            }
        }
        next.upstream = std::mem::take(&mut self.upstream);
        next.upstream.set_window(next.global_share.period);
        // A client the new configuration removed is gone from the status with its count;
        // names never configured (an anonymous caller) keep theirs.
        let removed =
            |name: &String| self.clients.contains_key(name) && !next.clients.contains_key(name);
        next.rejections = std::mem::take(&mut self.rejections)
            .into_iter()
            .filter(|(name, _)| !removed(name))
            .collect();
        next.global_rejections = self.global_rejections;
        *self = next;
    }

    /// The longest wait `client` accepts, in nanoseconds, and the global cells it may not use.
    pub(crate) fn terms(&self, client: &str) -> (u64, u32) {
        let c = self.clients.get(client);
        let max_wait = c.and_then(|c| c.max_wait).unwrap_or(self.max_wait);
        let hold = match c.map(|c| c.priority) {
            Some(Priority::Batch) => self.reserve_cells,
            _ => 0,
        };
        (nanos(max_wait), hold)
    }

    /// The longest wait any client's terms allow (ns): how far ahead the global share may
    /// be booked, whoever asks.
    pub(crate) fn longest_wait(&self) -> u64 {
        let longest = self
            .clients
            .values()
            .filter_map(|c| c.max_wait)
            .fold(self.max_wait, Duration::max);
        nanos(longest)
    }

    /// Step 1, at arrival (see the module doc), for a caller that arrived at `arrived`: one
    /// that waited elsewhere until `now` (behind a merged call) may wait only what is left
    /// of its `max_wait`.
    pub(crate) fn arrive_since(
        &mut self,
        client: &str,
        cost: NonZeroU32,
        arrived: u64,
        now: u64,
    ) -> Result<Step, Refusal> {
        let (max_wait, hold) = self.terms(client);
        let max_wait = max_wait.saturating_sub(now.saturating_sub(arrived));
        if let Some(later) = self.probe_within(max_wait, now) {
            return Ok(Step::Wait(later));
        }
        self.upstream_allows(cost, now)?;
        let own = self
            .clients
            .get_mut(client)
            .and_then(|c| c.share.as_mut())
            .map(|(_, gcra)| gcra);
        let own_wait = own.as_ref().map_or(0, |g| g.wait(cost, 0, now));
        // Waits only shrink with time while new reservations only add to them, so the global
        // wait now is a lower bound on what the whole path can take: refusing on it is safe.
        let global_wait = self.global.wait(cost, hold, now);
        let needed = own_wait.max(global_wait);
        if needed > max_wait {
            let which = if own_wait >= global_wait {
                Which::Client
            } else {
                Which::Global
            };
            return Err(Refusal {
                which,
                wait: needed,
            });
        }
        // Refused by a share first: its wait is the truer Retry-After.
        if self.upstream.waits_for_landing(u64::from(cost.get()), now) {
            return Ok(Step::Wait(Later::Landing));
        }
        let own = own.map(|g| g.reserve(cost, 0, now));
        match own {
            Some(own) if own.at > now => Ok(Step::Queue { own }),
            _ => Ok(Step::Go {
                own,
                grant: self.grant(cost, hold, now),
            }),
        }
    }

    /// Step 2, once the client's own slot has come (see the module doc); `Wait` while a call
    /// out decides what may go, or the blind pause's probe is due within the caller's wait.
    pub(crate) fn cross(
        &mut self,
        client: &str,
        cost: NonZeroU32,
        arrived: u64,
        now: u64,
    ) -> Result<Crossed, Refusal> {
        let (max_wait, hold) = self.terms(client);
        if !self.global.fits(cost, hold) {
            return Err(self.too_costly_now(Which::Global, hold));
        }
        let left = max_wait.saturating_sub(now.saturating_sub(arrived));
        if let Some(later) = self.probe_within(left, now) {
            return Ok(Crossed::Wait(later));
        }
        self.upstream_allows(cost, now)?;
        let wait = self.global.wait(cost, hold, now);
        if wait > left {
            return Err(Refusal {
                which: Which::Global,
                wait,
            });
        }
        if self.upstream.waits_for_landing(u64::from(cost.get()), now) {
            return Ok(Crossed::Wait(Later::Landing));
        }
        Ok(Crossed::Go(self.grant(cost, hold, now)))
    }

    /// Refuses a cost the shares in force could only book as debt past their burst (see
    /// `Gcra::fits`). `Budget::admit` refuses such costs under the configured terms before
    /// the ledger is asked, so this is only for terms smaller than configured (a replica on
    /// its divided fallback share): the refusal names the share and asks to come back once
    /// a whole burst has refilled, when Redis may be back.
    pub(crate) fn fits(&self, client: &str, cost: NonZeroU32) -> Result<(), Refusal> {
        let (_, hold) = self.terms(client);
        let own = self.clients.get(client).and_then(|c| c.share.as_ref());
        if let Some((_, own)) = own.filter(|(_, g)| !g.fits(cost, 0)) {
            return Err(Refusal {
                which: Which::Client,
                wait: own.refill(0),
            });
        }
        if !self.global.fits(cost, hold) {
            return Err(self.too_costly_now(Which::Global, hold));
        }
        Ok(())
    }

    fn too_costly_now(&self, which: Which, hold: u32) -> Refusal {
        Refusal {
            which,
            wait: self.global.refill(hold),
        }
    }

    /// Cuts every share's debt to what its terms could have booked: a reload to smaller
    /// terms (or a cost booked before costs were bounded) must not leave callers locked out
    /// by cells the new terms could never have lent.
    pub(crate) fn bound_debt(&mut self, now: u64) {
        let longest = self.longest_wait();
        self.global.bound(now, longest);
        let max_wait = self.max_wait;
        for client in self.clients.values_mut() {
            let wait = nanos(client.max_wait.unwrap_or(max_wait));
            if let Some((_, gcra)) = client.share.as_mut() {
                gcra.bound(now, wait);
            }
        }
    }

    /// `Later::At` the blind pause's end when its probe is due within `left` nanoseconds: a
    /// caller that can wait that long waits for the probe (and then for its answer) rather
    /// than being refused for the whole blind pause.
    pub(crate) fn probe_within(&self, left: u64, now: u64) -> Option<Later> {
        self.upstream
            .probe_at(now)
            .filter(|at| at - now <= left)
            .map(Later::At)
    }

    /// Last look when a granted slot comes: refuses if the upstream raised an alarm after the
    /// grant and its pause still runs. Earlier alarms were seen at the grant, and pauses our own
    /// counting started already include this request.
    pub(crate) fn recheck(&self, grant: Grant, now: u64) -> Result<(), Refusal> {
        if self.upstream.alarms() == grant.alarms {
            return Ok(());
        }
        match self.upstream.paused_for(now) {
            Some(wait) => Err(Refusal {
                which: Which::Upstream,
                wait,
            }),
            None => Ok(()),
        }
    }

    fn upstream_allows(&mut self, cost: NonZeroU32, now: u64) -> Result<(), Refusal> {
        match self.upstream.blocked(u64::from(cost.get()), now) {
            Some(wait) => Err(Refusal {
                which: Which::Upstream,
                wait,
            }),
            None => Ok(()),
        }
    }

    /// Spends `cost` of the upstream's allowance and reserves the global slot.
    fn grant(&mut self, cost: NonZeroU32, hold: u32, now: u64) -> Grant {
        let seq = self.upstream.spend(u64::from(cost.get()));
        Grant {
            global: self.global.reserve(cost, hold, now),
            seq,
            alarms: self.upstream.alarms(),
        }
    }

    /// Returns what a request reserved but never used (refused late, or dropped while waiting).
    pub(crate) fn give_back(
        &mut self,
        client: &str,
        own: Option<Slot>,
        global: Option<Slot>,
        upstream_seq: Option<u64>,
    ) {
        if let (Some(slot), Some((_, gcra))) = (
            own,
            self.clients.get_mut(client).and_then(|c| c.share.as_mut()),
        ) {
            gcra.give_back(slot);
        }
        if let Some(slot) = global {
            self.global.give_back(slot);
        }
        if let Some(seq) = upstream_seq {
            self.upstream.give_back(seq);
        }
    }

    pub(crate) fn count_rejection(&mut self, client: &str, which: Which) {
        *self.rejections.entry(client.to_owned()).or_default() += 1;
        if which == Which::Global {
            self.global_rejections += 1;
        }
    }
}

/// Whole cells of `burst` kept for interactive clients: `burst × reserve` rounded up, so any
/// non-zero reserve protects at least one cell, but never the whole burst (batch clients must
/// be able to make progress). A reserve outside 0..=1, or NaN, is clamped.
pub(crate) fn reserve_cells(burst: u32, reserve: f64) -> u32 {
    if reserve.is_nan() || reserve <= 0.0 {
        return 0;
    }
    // The small epsilon keeps binary fractions such as 50 × 0.2 = 10.000…2 from rounding to 11.
    let cells = (f64::from(burst) * reserve.min(1.0) - 1e-9).ceil();
    // `cells` lies in 0..=burst, so the cast cannot truncate.
    (cells as u32).min(burst.saturating_sub(1))
}

/// The `RateLimit-Policy` value of a share shown under `name`.
fn policy(name: &'static str, share: &Share) -> HeaderValue {
    headers::policy(name, share.limit.get(), share.period)
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
