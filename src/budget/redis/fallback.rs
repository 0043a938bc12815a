//! The shared budget's fallback, for when Redis is slow or gone: the first failed call (or
//! the health probe) moves this replica to its local ledger with every share divided by
//! `budget.replicas`, from the shared debt it last mirrored, so an outage opens no fresh
//! burst; of the upstream's count it may send only its part of what was free when the cut
//! began (every call it sends meanwhile comes off it). When Redis answers again, the debt
//! run up alone and the calls answered while apart go back with the next admission, with
//! what it knows of the upstream's window, if Redis lost it.

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use super::super::ledger::Ledger;
use super::super::{Admitted, Budget, Queued, Rejected};
use super::Shared;

/// What a replica back from its fallback hands the shared budget with its first take.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Return {
    /// The debt it ran up alone, in shared microseconds.
    pub(super) owed: u64,
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
        self.owed += more.owed;
        self.apart += more.apart;
        self.rebase |= more.rebase;
    }
}

impl Shared {
    /// Leaves the fallback if it is in force: the ledger gets the full spec back (and the
    /// upstream's whole count); `None` when it was not on the fallback.
    pub(super) fn come_back(&self, ledger: &mut Ledger, now: u64) -> Option<Return> {
        if !self.local.load(Ordering::Acquire) {
            return None;
        }
        let known = self.base.load(Ordering::Acquire).max(now);
        let alone = ledger.global.tat().saturating_sub(known);
        ledger.reconfigure(self.full());
        let apart = ledger.upstream.fence_lifted();
        self.local.store(false, Ordering::Release);
        tracing::info!("budget: back on the shared Redis budget");
        Some(Return {
            owed: alone / u64::from(self.replicas.get()) / 1000,
            apart,
            rebase: true,
        })
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
        {
            let mut ledger = self.ledger();
            if !shared.local.load(Ordering::Acquire) {
                shared.base.store(ledger.global.tat(), Ordering::Release);
                ledger.reconfigure(shared.divided());
                // The upstream's count too: the other replicas spend it unseen.
                let now = self.inner.clock.nanos();
                ledger.upstream.fence_off(shared.replicas.get(), now);
                shared.local.store(true, Ordering::Release);
                tracing::warn!(
                    replicas = shared.replicas.get(),
                    "budget: Redis unreachable; admitting on this replica's local share \
                     (limit / replicas, and its part of the upstream's count left) until it \
                     returns"
                );
            }
        }
        self.admit_local(client, cost, waited, queued).await
    }
}
