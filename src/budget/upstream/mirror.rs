//! What one replica knows of the upstream's window beyond its own answers, for the budget
//! the replicas share through Redis: the shared count as Redis last stated it (the
//! mirror), so the replica can seed that count again if Redis loses it, and, while Redis is
//! gone, its part of what was left (the fence), so replicas cut off from each other never
//! spend more together than was left. Invariant: a seed is never above what this replica
//! knows (the lower of its own lowest report and the mirror, for the earlier end of both),
//! and a fenced replica's calls never exceed its part of the free count when the cut began.

use super::{Allowance, Upstream, SAME_WINDOW};

/// The shared count as the last take stated it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mirror {
    /// The lowest `Remaining` of the window, on every replica's reports.
    low: u64,
    /// When the shared count ends (budget clock).
    reset: u64,
    /// The cells out on every replica then, and on this one.
    out: u64,
    mine: u64,
    /// When it was stated (budget clock).
    at: u64,
}

/// This replica's part of the upstream's count while cut off from the others.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fence {
    /// Cells it may still send in this window.
    left: u64,
    /// The window's end (budget clock): the next window's part is the learnt limit's.
    pub(super) reset: u64,
    /// The first sequence number sent while cut off.
    from: u64,
}

/// What this replica knows of the window, for a shared count Redis lost: the count, the
/// time to its end, and for a window assumed after the last one named, how long ago it
/// began (all nanoseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seed {
    pub(crate) left: u64,
    pub(crate) reset_in: u64,
    pub(crate) since: Option<u64>,
}

/// How recent a mirror must be for the calls the others had out then to be worth holding
/// as out still (their answers come within an upstream timeout).
const FRESH: u64 = 10_000_000_000;

impl Upstream {
    /// Keeps what a take's answer said of the shared count (`None`: Redis holds none): its
    /// lowest report, the time to its end, and the cells out on every replica.
    pub(crate) fn mirror(&mut self, low: Option<u64>, ends_in: u64, out: u64, now: u64) {
        self.mirror = low.filter(|_| ends_in > 0).map(|low| Mirror {
            low,
            reset: now.saturating_add(ends_in),
            out,
            mine: self.out(),
            at: now,
        });
    }

    /// The cells the other replicas had out at the last take, if it was recent: what a
    /// shared record of calls out that Redis lost still holds out.
    pub(crate) fn others_out(&self, now: u64) -> u64 {
        self.mirror
            .filter(|m| now.saturating_sub(m.at) < FRESH)
            .map_or(0, |m| m.out.saturating_sub(m.mine))
    }

    /// What this replica knows of the live window (see [`Seed`]): the lower of its own
    /// count and the mirror, until the earlier of their ends.
    pub(crate) fn seed(&self, now: u64) -> Option<Seed> {
        let own = self.current(now);
        let mirror = self.mirror.filter(|m| m.reset > now);
        let since = |a: &Allowance| a.assumed_from.map(|from| now.saturating_sub(from));
        match (own, mirror) {
            (Some(a), Some(m)) => {
                let local_first = a.reset <= m.reset.saturating_add(SAME_WINDOW);
                Some(Seed {
                    left: a.low.min(m.low),
                    reset_in: a.reset.min(m.reset) - now,
                    since: if local_first && a.reset <= m.reset {
                        since(&a)
                    } else {
                        None
                    },
                })
            }
            (Some(a), None) => Some(Seed {
                left: a.low,
                reset_in: a.reset - now,
                since: since(&a),
            }),
            (None, Some(m)) => Some(Seed {
                left: m.low,
                reset_in: m.reset - now,
                since: None,
            }),
            (None, None) => None,
        }
    }

    /// Cut off from the others (Redis gone) among `parts` replicas: this one may send its
    /// part of what was free (the known count less every replica's calls out, as last
    /// stated), and in each later window its part of the learnt limit.
    pub(crate) fn fence_off(&mut self, parts: u32, now: u64) {
        self.parts = u64::from(parts);
        self.apart = 0;
        let Some(seed) = self.seed(now) else {
            self.fence = None;
            return;
        };
        let mirror = self.mirror.filter(|m| m.reset > now);
        let fleet_out = mirror.map_or(0, |m| m.out).max(self.out());
        // The part renews at the later of the ends known: the count lasts until then.
        let own_end = self.current(now).map_or(0, |a| a.reset);
        let reset = own_end.max(mirror.map_or(0, |m| m.reset));
        self.fence = Some(Fence {
            left: seed.left.saturating_sub(fleet_out) / self.parts.max(1),
            reset,
            from: self.next_seq,
        });
    }

    /// Back with the others: the whole count again. Returns the cells sent while cut off
    /// that have been answered since (those still out are in this replica's count out).
    pub(crate) fn fence_lifted(&mut self) -> u64 {
        self.parts = 1;
        let still_out: u64 = match self.fence.take() {
            Some(f) => self.flying.range(f.from..).map(|(_, c)| c).sum(),
            None => 0,
        };
        std::mem::take(&mut self.apart).saturating_sub(still_out)
    }

    /// Cells this replica may still send while cut off, if fenced.
    pub(super) fn fenced(&self, now: u64) -> Option<u64> {
        self.fence.filter(|f| f.reset > now).map(|f| f.left)
    }

    /// A fence whose window has ended: the next window's part is the learnt limit's.
    pub(super) fn renew_fence(&mut self, now: u64) {
        let Some(f) = self.fence.filter(|f| f.reset <= now) else {
            return;
        };
        self.fence = self.current(now).map(|a| Fence {
            left: self.part(a.low),
            reset: a.reset,
            from: f.from,
        });
    }

    pub(super) fn fence_spend(&mut self, cost: u64) {
        if let Some(f) = self.fence.as_mut() {
            f.left = f.left.saturating_sub(cost);
            self.apart += cost;
        }
    }

    pub(super) fn fence_give_back(&mut self, seq: u64, cost: u64) {
        if let Some(f) = self.fence.as_mut().filter(|f| seq >= f.from) {
            f.left += cost;
            self.apart = self.apart.saturating_sub(cost);
        }
    }
}
