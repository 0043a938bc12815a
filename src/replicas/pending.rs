//! Invalidations Redis did not take (down, or too slow for the publication), kept in the
//! order they were made and sent by a task of their own once the probe sees Redis answer:
//! sending them waits for the other replicas' acknowledgements (up to 500 ms each), which
//! must not hold up the probe that tells whether Redis is there at all. A message leaves
//! the queue only once it is published, so a failed attempt loses nothing and puts nothing
//! behind a newer one; a publication made while older ones still wait goes behind them.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};

use super::{lock, Inner, Invalidation, Redis, PENDING_LIMIT, PROBE_WHILE_UP};

/// The queue: each message with the id it was first published under, oldest first.
pub(super) type Queue = VecDeque<(Invalidation, u64)>;

impl Redis {
    /// Whether older invalidations still wait to be sent: a new one goes behind them.
    pub(super) fn has_pending(&self) -> bool {
        !lock(&self.inner.pending).is_empty()
    }

    /// Keeps `what` (message `id`) behind what is queued. Past [`PENDING_LIMIT`] one "drop
    /// everything" replaces them all, as does a queued [`Invalidation::All`]: it covers
    /// whatever was queued before it, and goes out as the newest message.
    pub(super) fn keep_pending(&self, what: Invalidation, id: u64) {
        let mut pending = lock(&self.inner.pending);
        if pending.len() >= PENDING_LIMIT || what == Invalidation::All {
            let id = if what == Invalidation::All {
                id
            } else {
                self.inner.acks.next_id()
            };
            pending.clear();
            pending.push_back((Invalidation::All, id));
        } else {
            pending.push_back((what, id));
        }
    }

    /// Starts the task that sends the queue: woken by the probe whenever it sees Redis
    /// answer with messages queued (and once a second regardless); it ends with the link.
    pub(super) fn spawn_sender(&self) {
        let wake = self.inner.send_pending.clone();
        let task = tokio::spawn(send_pending(Arc::downgrade(&self.inner), wake));
        self.remember(task);
    }
}

/// The sender (see [`Redis::spawn_sender`]): while Redis is up, publishes the oldest queued
/// message under its own id and takes it off the queue once published, until the queue is
/// empty or an attempt fails (then the next wake tries again from the same message).
async fn send_pending(inner: Weak<Inner>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let _ = tokio::time::timeout(PROBE_WHILE_UP, wake.notified()).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let redis = Redis { inner };
        loop {
            let front = lock(&redis.inner.pending).front().cloned();
            let Some((what, id)) = front.filter(|_| redis.is_up()) else {
                break;
            };
            if redis.try_publish(what, id).await.is_err() {
                break;
            }
            let mut pending = lock(&redis.inner.pending);
            // Unless "drop everything" replaced the queue meanwhile: it goes next.
            if pending.front().is_some_and(|(_, first)| *first == id) {
                pending.pop_front();
            }
        }
    }
}
