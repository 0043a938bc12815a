//! When stored entries' lives end, so the store can remove them without a timer per entry:
//! moka's per-entry expiry keeps timer-wheel nodes for every entry (about 50 bytes each),
//! where this keeps one key hash (4 bytes) in a bucket per second of deadline.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

/// Key hashes by the second (since `origin`, rounded up) at which their entry's life ends.
///
/// A bucket is due once its second has passed, and the store then checks each key against
/// what it holds: an entry is removed only if it is really past its life, a newer value is
/// re-queued at its own deadline, and a key no longer held is dropped. Time is tokio's
/// clock, so the sweep follows a paused clock in tests.
#[derive(Debug)]
pub(crate) struct Deadlines {
    origin: Instant,
    buckets: BTreeMap<u64, Vec<u32>>,
    len: usize,
}

impl Deadlines {
    pub(crate) fn new(origin: Instant) -> Deadlines {
        Deadlines {
            origin,
            buckets: BTreeMap::new(),
            len: 0,
        }
    }

    /// The bucket that is due once `deadline` has passed: its second, rounded up.
    fn second(&self, deadline: Instant) -> u64 {
        let after = deadline.saturating_duration_since(self.origin);
        after.as_secs() + u64::from(after.subsec_nanos() > 0)
    }

    /// Queues `key`, whose entry is of no use from `deadline` on.
    pub(crate) fn push(&mut self, deadline: Instant, key: u32) {
        let bucket = self.buckets.entry(self.second(deadline)).or_default();
        if bucket.len() == bucket.capacity() {
            // Grow by an eighth rather than doubling: the queue is part of every entry's
            // cost, and a doubled vector is a quarter empty on average.
            bucket.reserve_exact(bucket.len() / 8 + 16);
        }
        bucket.push(key);
        self.len += 1;
    }

    /// Moves up to `max` keys whose bucket is due at `now` into `out`.
    pub(crate) fn pop_due(&mut self, now: Instant, max: usize, out: &mut Vec<u32>) {
        let due = now.saturating_duration_since(self.origin).as_secs();
        while out.len() < max {
            let Some(mut first) = self.buckets.first_entry() else {
                return;
            };
            if *first.key() > due {
                return;
            }
            let bucket = first.get_mut();
            let take = (max - out.len()).min(bucket.len());
            out.extend(bucket.drain(bucket.len() - take..));
            self.len -= take;
            if bucket.is_empty() {
                first.remove();
            }
        }
    }

    /// Keeps only the keys `held` accepts; for dropping the keys of entries that left the
    /// cache otherwise (evicted for size, invalidated, purged) before their deadline.
    pub(crate) fn retain(&mut self, mut held: impl FnMut(u32) -> bool) {
        self.buckets.retain(|_, bucket| {
            bucket.retain(|key| held(*key));
            bucket.shrink_to_fit();
            !bucket.is_empty()
        });
        self.len = self.buckets.values().map(Vec::len).sum();
    }

    /// Keys queued, including ones whose entry has left already.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The instant `lifetime` after `from`, capped so the bucket arithmetic cannot overflow.
    pub(crate) fn deadline(from: Instant, lifetime: Duration, cap: Duration) -> Instant {
        // Only an instant near the clock's end overflows: removing that entry early loses
        // a cached answer, never serves a stale one.
        from.checked_add(lifetime.min(cap)).unwrap_or(from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn keys_come_out_once_their_second_has_passed_in_deadline_order() {
        let origin = Instant::now();
        let mut queue = Deadlines::new(origin);
        queue.push(origin + Duration::from_millis(2500), 3);
        queue.push(origin + Duration::from_secs(1), 1);
        queue.push(origin + Duration::from_millis(1200), 2);
        let mut out = Vec::new();
        queue.pop_due(origin + Duration::from_millis(999), 10, &mut out);
        assert_eq!(
            out,
            [] as [u32; 0],
            "nothing is due before 1 s, saw {out:?}"
        );
        queue.pop_due(origin + Duration::from_secs(1), 10, &mut out);
        assert_eq!(out, [1], "expected key 1 due at 1 s, saw {out:?}");
        out.clear();
        // 1.2 s rounds up to the 2 s bucket: never handed out before its deadline.
        queue.pop_due(origin + Duration::from_millis(1900), 10, &mut out);
        assert!(out.is_empty(), "expected nothing due at 1.9 s, saw {out:?}");
        queue.pop_due(origin + Duration::from_secs(3), 10, &mut out);
        assert_eq!(out, [2, 3], "expected keys 2 then 3, saw {out:?}");
        assert_eq!(queue.len(), 0, "expected an empty queue");
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_hands_out_at_most_max_keys() {
        let origin = Instant::now();
        let mut queue = Deadlines::new(origin);
        for key in 0..10 {
            queue.push(origin, key);
        }
        let mut out = Vec::new();
        queue.pop_due(origin, 4, &mut out);
        assert_eq!(out.len(), 4, "expected a step of 4, saw {out:?}");
        assert_eq!(queue.len(), 6, "expected 6 keys left, saw {}", queue.len());
        queue.retain(|key| key % 2 == 0);
        out.clear();
        queue.pop_due(origin, 100, &mut out);
        out.sort_unstable();
        assert_eq!(out, [0, 2, 4], "expected the even keys left, saw {out:?}");
    }
}
