//! Acknowledged invalidations: a purge or a write's invalidation counts as done on the other
//! replicas only once each replica its message reached said it dropped its copies. The
//! message carries an id; every replica that applies it answers on the writer's own channel
//! (`{<prefix>}:ack:<replica id>`), which the writer's subscriber hears and hands to the
//! [`Waiter`] of that id. The writer waits for an answer from each replica the registry of
//! live replicas names (see `members`), each counted once by its id, within a bound: a
//! replica that does not answer in time is counted, and the first of a run of them is
//! logged. Not PUBLISH's count of receivers: that counts any other client subscribed to the
//! channel (a `redis-cli SUBSCRIBE` left open), only the receivers of the node that took the
//! message on a Redis Cluster, and replicas of a version that does not answer.

use std::collections::{HashMap, HashSet};
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
    waiting: Mutex<HashMap<u64, mpsc::UnboundedSender<String>>>,
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

    /// A new id, for a message published later ([`Acks::waiter_for`]).
    pub(super) fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A waiter for message `id`, whose acknowledgements are kept until it is dropped: made
    /// before the message is published, since an answer may come back before the
    /// publication returns. A queued invalidation sent again keeps the id it
    /// was first published with, so a replica that applied the first (a publication a
    /// frozen Redis ran late) does not apply it twice, and still answers.
    pub(super) fn waiter_for(&self, id: u64) -> Waiter<'_> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.waiting).insert(id, tx);
        Waiter { acks: self, id, rx }
    }

    /// An acknowledgement heard on this replica's channel; one of an id nobody waits for
    /// any more (it came after the bound) is dropped.
    pub(super) fn heard(&self, ack: &Ack) {
        if let Some(tx) = lock(&self.waiting).get(&ack.id) {
            let _ = tx.send(ack.from.clone());
        }
    }

    /// Each result's count so far, for `/admin/status`.
    pub(super) fn totals(&self) -> serde_json::Map<String, serde_json::Value> {
        RESULTS
            .iter()
            .map(|r| {
                (
                    r.to_string(),
                    self.results.with_label_values(&[r]).get().into(),
                )
            })
            .collect()
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
    rx: mpsc::UnboundedReceiver<String>,
}

impl Waiter<'_> {
    /// Waits until each replica of `expected` (ids) acknowledged, for at most `bound`; how
    /// many of them did not. A replica answering twice counts once, and one not expected
    /// (it joined after the registry was read) counts for none.
    pub(super) async fn missing(&mut self, expected: &[String], bound: Duration) -> usize {
        let mut left: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let _ = tokio::time::timeout(bound, async {
            while !left.is_empty() {
                match self.rx.recv().await {
                    Some(from) => {
                        left.remove(from.as_str());
                    }
                    None => return,
                }
            }
        })
        .await;
        left.len()
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
        let mut waiter = acks.waiter_for(acks.next_id());
        let id = waiter.id;
        let from = |name: &str| Ack {
            id,
            from: name.to_string(),
        };
        let peers = ["a".to_string(), "b".to_string()];
        acks.heard(&from("a"));
        acks.heard(&from("b"));
        assert_eq!(waiter.missing(&peers, Duration::from_millis(500)).await, 0);
        // The same replica twice, and one nobody expects, are not the other's answer.
        acks.heard(&from("a"));
        acks.heard(&from("a"));
        acks.heard(&from("stranger"));
        assert_eq!(
            waiter.missing(&peers, Duration::from_millis(500)).await,
            1,
            "expected b missing however often a answered"
        );
        drop(waiter);
        assert!(
            lock(&acks.waiting).get(&id).is_none(),
            "expected a dropped waiter forgotten"
        );
    }
}
