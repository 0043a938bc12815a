//! The shared budget's fallback, for when Redis is slow or gone: the first failed call (or
//! the health probe) moves this replica to its local ledger with every share, and the
//! upstream's count, divided by `budget.replicas`, from the shared debt it last mirrored, so
//! an outage opens no fresh burst; when Redis answers again, the debt run up alone goes back
//! with the next admission (and what it knows of the upstream's window, if Redis lost it).

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;

use super::super::ledger::Ledger;
use super::super::{Admitted, Budget, Rejected};
use super::Shared;

impl Shared {
    /// Leaves the fallback if it is in force: the ledger gets the full spec back (and the
    /// upstream's whole count), and the debt this replica ran up alone (in shared
    /// microseconds) is returned for the script; `None` when it was not on the fallback.
    pub(super) fn come_back(&self, ledger: &mut Ledger, now: u64) -> Option<u64> {
        if !self.local.load(Ordering::Acquire) {
            return None;
        }
        let known = self.base.load(Ordering::Acquire).max(now);
        let alone = ledger.global.tat().saturating_sub(known);
        ledger.reconfigure(self.full());
        ledger.upstream.set_parts(1);
        self.local.store(false, Ordering::Release);
        tracing::info!("budget: back on the shared Redis budget");
        Some(alone / u64::from(self.replicas.get()) / 1000)
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
        queued: &(dyn Fn() + Sync),
    ) -> Result<Admitted, Rejected> {
        {
            let mut ledger = self.ledger();
            if !shared.local.load(Ordering::Acquire) {
                shared.base.store(ledger.global.tat(), Ordering::Release);
                ledger.reconfigure(shared.divided());
                // The upstream's count too: the other replicas spend it unseen.
                ledger.upstream.set_parts(shared.replicas.get());
                shared.local.store(true, Ordering::Release);
                tracing::warn!(
                    replicas = shared.replicas.get(),
                    "budget: Redis unreachable; admitting on this replica's local share \
                     (limit / replicas) until it returns"
                );
            }
        }
        self.admit_local(client, cost, waited, queued).await
    }
}
