//! Acknowledged invalidations: a purge or a write's invalidation counts as done on the other
//! replicas only once each replica its message reached said it dropped its copies. The
//! message carries an id; every replica that applies it answers on the writer's own channel
//! (`{<prefix>}:ack:<replica id>`), which the writer's subscriber hears and hands to the
//! [`Waiter`] of that id. The writer waits for as many answers as PUBLISH said it reached
//! (less itself), within a bound: a replica that does not answer in time is counted, and the
//! first of a run of them is logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// How one publication went, as `cxgate_redis_invalidations_total{result}` counts it.
pub(super) const RESULTS: &[&str] = &["acknowledged", "unacknowledged", "alone", "queued"];

/// What a replica sends on the writer's channel once it applied the writer's message `id`.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Ack {
    pub id: u64,
    /// The replica that applied it.
    pub from: String,
}

/// The publications of this replica waiting for acknowledgements, and their counter.
pub(super) struct Acks {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<()>>>,
    results: IntCounterVec,
    /// In a run of publications some replica did not acknowledge (said once per run).
    missing: AtomicBool,
}

impl Acks {
    /// Registers `cxgate_redis_invalidations_total{result}`, every result at 0.
    pub(super) fn register(registry: &Registry) -> Result<Acks, prometheus::Error> {
        let results = IntCounterVec::new(
            Opts::new(
                "cxgate_redis_invalidations_total",
                "Invalidations this replica published, by how the other replicas took them \
                 (acknowledged, unacknowledged, alone, queued).",
            ),
            &["result"],
        )?;
        registry.register(Box::new(results.clone()))?;
        for result in RESULTS {
            results.with_label_values(&[result]);
        }
        Ok(Acks {
            next: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            results,
            missing: AtomicBool::new(false),
        })
    }

    /// A new id whose acknowledgements are kept until the waiter is dropped: made before
    /// the message is published, since an answer may come back before PUBLISH returns.
    pub(super) fn waiter(&self) -> Waiter<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiting).insert(id, tx);
        Waiter { acks: self, id, rx }
    }

    /// An acknowledgement heard on this replica's channel; one of an id nobody waits for
    /// any more (it came after the bound) is dropped.
    pub(super) fn heard(&self, ack: &Ack) {
        if let Some(tx) = lock(&self.waiting).get(&ack.id) {
            let _ = tx.send(());
        }
    }

    /// Counts one publication's `result` (one of [`RESULTS`]) and says when a run of
    /// unacknowledged ones starts and ends.
    pub(super) fn count(&self, result: &str, missing: usize, bound: Duration) {
        self.results.with_label_values(&[result]).inc();
        match result {
            "unacknowledged" if !self.missing.swap(true, Ordering::AcqRel) => tracing::warn!(
                missing,
                ?bound,
                "a replica did not acknowledge an invalidation in time: it may serve what \
                 this replica's write or purge removed until it applies it (counted in \
                 cxgate_redis_invalidations_total{{result=\"unacknowledged\"}})"
            ),
            "acknowledged" if self.missing.swap(false, Ordering::AcqRel) => {
                tracing::info!("every replica acknowledges invalidations again")
            }
            _ => {}
        }
    }
}

/// The acknowledgements of one publication.
pub(super) struct Waiter<'a> {
    acks: &'a Acks,
    pub id: u64,
    rx: mpsc::UnboundedReceiver<()>,
}

impl Waiter<'_> {
    /// Waits until `n` acknowledgements came, for at most `bound`; how many are missing.
    pub(super) async fn missing(&mut self, n: usize, bound: Duration) -> usize {
        let mut heard = 0;
        let _ = tokio::time::timeout(bound, async {
            while heard < n && self.rx.recv().await.is_some() {
                heard += 1;
            }
        })
        .await;
        n.saturating_sub(heard)
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        lock(&self.acks.waiting).remove(&self.id);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update is one map change: a poisoned lock still holds a whole map.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiter_counts_what_came_within_its_bound() {
        let acks = Acks::register(&Registry::new()).expect("register");
        let mut waiter = acks.waiter();
        let ack = Ack {
            id: waiter.id,
            from: "peer".to_string(),
        };
        acks.heard(&ack);
        acks.heard(&ack);
        assert_eq!(waiter.missing(2, Duration::from_millis(500)).await, 0);
        acks.heard(&ack);
        assert_eq!(
            waiter.missing(3, Duration::from_millis(500)).await,
            2,
            "expected one of three more heard"
        );
        let id = waiter.id;
        drop(waiter);
        assert!(
            lock(&acks.waiting).get(&id).is_none(),
            "expected a dropped waiter forgotten"
        );
    }
}
