//! The shared budget's fallback, for when Redis is slow or gone: the first failed call (or
//! the health probe) moves this replica to its local ledger with every share divided by
//! `budget.replicas`, from the shared debt it last mirrored, so an outage opens no fresh
//! burst; of the upstream's count it may send only its part of what was free when the cut
//! began (every call it sends meanwhile comes off it). When Redis answers again, what it
//! booked alone and the calls answered while apart go back with the next admission, with
//! what it knows of the upstream's window, if Redis lost it.
//!
//! What it booked alone is handed over whole when the others went on spending the shared
//! count meanwhile (a replica cut off from Redis alone): a spell longer than a burst and a
//! wait pays its first cells off on the local clock, but the upstream saw them on top of
//! everything the others sent. When the others booked less than that meanwhile (Redis was
//! gone for all of them, each on its own part), only what they booked and the debt still
//! ahead of this replica's clock can have gone on top: the script takes the smaller, from
//! the count of what every take booked (`budget:spent`) then and now.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use super::super::ledger::Ledger;
use super::super::{Admitted, Budget, Queued, Rejected};
use super::Shared;

/// What a replica back from its fallback hands the shared budget with its first take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Return {
    /// Everything it booked alone, in shared microseconds (at most one period: older
    /// cells are out of every window to come).
    pub(super) owed: u64,
    /// The part of it still ahead of its clock when it came back, in shared microseconds.
    pub(super) ahead: u64,
    /// The shared count of what every take booked (`budget:spent`) as this replica last
    /// saw it before the cut; -1 when it saw none (then all it booked alone is owed).
    pub(super) since: i64,
    /// The cells it sent alone that have been answered since: counted by the upstream,
    /// unseen by the others.
    pub(super) apart: u64,
    /// Its record of calls out is to be based again: the calls it sent alone that are
    /// still out were never booked there.
    pub(super) rebase: bool,
}

impl Return {
    /// `more` on top of what is still to be handed over (a take that carried it failed).
    pub(super) fn add(&mut self, more: Return) {
        self.since = match (self.owed, more.owed) {
            (0, _) => more.since,
            (_, 0) => self.since,
            // The earlier reading counts more of the others' bookings: the safer one.
            _ if self.since < 0 || more.since < 0 => -1,
            _ => self.since.min(more.since),
        };
        self.owed += more.owed;
        self.ahead += more.ahead;
        self.apart += more.apart;
        self.rebase |= more.rebase;
    }
}

/// Where the shared budget stood when this replica went to its fallback.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Cut {
    /// The mirrored global TAT: debt already known to Redis.
    tat: u64,
    /// What the global share had booked (see [`super::super::gcra::Gcra::booked`]): what
    /// it books past this is booked alone.
    booked: u64,
    /// `budget:spent` as last seen (-1: never).
    spent: i64,
}

impl Shared {
    /// Leaves the fallback if it is in force: the ledger gets the full spec back (and the
    /// upstream's whole count); `None` when it was not on the fallback.
    pub(super) fn come_back(&self, ledger: &mut Ledger, now: u64) -> Option<Return> {
        if !self.local.load(Ordering::Acquire) {
            return None;
        }
        let cut = *self
            .cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Alone a cell takes `replicas` shared intervals: divided, the local time booked is
        // the shared time those cells stand for.
        let shared_us = |ns: u64| ns / u64::from(self.replicas.get()) / 1000;
        let alone = ledger.global.booked().saturating_sub(cut.booked);
        let ahead = ledger.global.tat().saturating_sub(cut.tat.max(now));
        let full = self.full();
        let period_us = u64::try_from(full.global.period.as_micros()).unwrap_or(u64::MAX);
        ledger.reconfigure(full);
        let apart = ledger.upstream.fence_lifted();
        self.local.store(false, Ordering::Release);
        tracing::info!("budget: back on the shared Redis budget");
        let owed = shared_us(alone).min(period_us);
        Some(Return {
            owed,
            ahead: shared_us(ahead).min(owed),
            since: cut.spent,
            apart,
            rebase: true,
        })
    }
}

impl Shared {
    /// Puts `ledger` on the fallback (divided terms, the upstream's count fenced) unless it
    /// is there already, noting where the shared budget stood.
    pub(super) fn go_local(&self, ledger: &mut Ledger, now: u64) {
        if self.local.load(Ordering::Acquire) {
            return;
        }
        *self
            .cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Cut {
            tat: ledger.global.tat(),
            booked: ledger.global.booked(),
            spent: self.spent_seen.load(Ordering::Acquire),
        };
        ledger.reconfigure(self.divided());
        // The upstream's count too: the other replicas spend it unseen.
        ledger.upstream.fence_off(self.replicas.get(), now);
        self.local.store(true, Ordering::Release);
        tracing::warn!(
            replicas = self.replicas.get(),
            "budget: Redis unreachable; admitting on this replica's local share \
             (limit / replicas, and its part of the upstream's count left) until it returns"
        );
    }
}

impl Budget {
    /// Switches to the divided local ledger (once per outage) and admits there.
    pub(super) async fn admit_fallback(
        &self,
        shared: &Shared,
        client: &str,
        cost: NonZeroU32,
        waited: u64,
        queued: Queued<'_>,
    ) -> Result<Admitted, Rejected> {
        let now = self.inner.clock.nanos();
        shared.go_local(&mut self.ledger(), now);
        self.admit_local(client, cost, waited, queued).await
    }
}
