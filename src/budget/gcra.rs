//! Cell-rate arithmetic (GCRA in its virtual-scheduling form) for one share, and the clock
//! every share reads. Kept here rather than in governor's limiter because the budget must
//! peek, reserve ahead and give back, which governor does not offer; [`Gcra`] says how.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock as GovernorClock;
use governor::nanos::Nanos;
use governor::Quota;

use super::Share;

/// Time as tokio sees it, so `tokio::time::pause()`/`advance()` drive the shares and the
/// sleeps that wait for them alike.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TokioClock {
    origin: tokio::time::Instant,
}

impl TokioClock {
    pub(crate) fn new() -> Self {
        Self {
            origin: tokio::time::Instant::now(),
        }
    }

    /// Nanoseconds since the origin; saturates after 584 years rather than panicking.
    pub(crate) fn nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The tokio instant of a point on this clock, for `sleep_until`.
    pub(crate) fn instant(&self, at: u64) -> tokio::time::Instant {
        self.origin + Duration::from_nanos(at)
    }
}

impl GovernorClock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.nanos())
    }
}

/// The governor quota a share stands for: one cell every `period / limit`, `burst` at once.
/// A zero period (which config validation rejects) degrades to governor's 1 ns minimum.
pub(crate) fn quota(share: &Share) -> Quota {
    let interval = (share.period / share.limit.get()).max(Duration::from_nanos(1));
    // `with_period` is `None` only for a zero interval, which the line above rules out.
    Quota::with_period(interval)
        .unwrap_or(Quota::per_second(NonZeroU32::MAX))
        .allow_burst(share.burst)
}

/// What a reservation changed, so it can be given back while nothing was reserved after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    /// When the cells may be used.
    pub(crate) at: u64,
    before: u64,
    after: u64,
}

/// One share's GCRA state.
///
/// governor's limiter answers one question: "take n cells now, or say when". The budget needs
/// three more: *peek* (refuse a request on one share without spending the other), *reserve*
/// a future slot (so a queue is simply the order of reservations, and a newcomer's wait is
/// known exactly), and *give back* the cells of a request that never went. So the state, one
/// theoretical arrival time (TAT), is kept here; the parameters come from governor's `Quota`,
/// time from governor's `Clock` trait, and a test checks every decision against governor's
/// own limiter. All times are nanoseconds since the clock's origin.
///
/// Invariant: every call for a share happens under the budget's one mutex, so "look, then
/// take" is a single step and concurrent callers cannot both see the last cell.
#[derive(Debug, Clone)]
pub(crate) struct Gcra {
    /// Emission interval: one cell returns every `t` ns.
    t: u64,
    burst: u32,
    /// Theoretical arrival time: the bucket holds its full burst again at `tat`.
    tat: u64,
    /// Every cell reserved and not given back, as ns of this share's time: what was spent,
    /// however long ago (the TAT forgets what the time since has paid off).
    booked: u64,
}

impl Gcra {
    pub(crate) fn new(share: &Share) -> Self {
        let quota = quota(share);
        Self {
            t: u64::try_from(quota.replenish_interval().as_nanos())
                .unwrap_or(u64::MAX)
                .max(1),
            burst: quota.burst_size().get(),
            tat: 0,
            booked: 0,
        }
    }

    /// Keeps the spending of `old` (its TAT) under new parameters, so a reload does not hand
    /// out a fresh burst the upstream has already seen spent.
    pub(crate) fn carry_over(mut self, old: &Gcra) -> Self {
        self.tat = old.tat;
        self.booked = old.booked;
        self
    }

    pub(crate) fn burst(&self) -> u32 {
        self.burst
    }

    /// The theoretical arrival time, for the shared backend's bookkeeping.
    pub(crate) fn tat(&self) -> u64 {
        self.tat
    }

    /// Everything reserved and not given back so far, in ns of this share's time (each
    /// cell counts its interval as the share stood when it was reserved): the difference
    /// between two readings is what was spent between them, even past a full bucket.
    pub(crate) fn booked(&self) -> u64 {
        self.booked
    }

    /// Takes a TAT decided elsewhere (the shared budget in Redis), so what this share shows
    /// matches what every replica spent.
    pub(crate) fn mirror(&mut self, tat: u64) {
        self.tat = tat;
    }

    /// Cells a caller may use when `hold` cells of the burst are kept back from it; at least
    /// one, so every caller can make progress.
    fn usable(&self, hold: u32) -> u32 {
        self.burst.saturating_sub(hold).max(1)
    }

    /// Whether `n` cells fit in the burst usable with `hold` cells kept back. A cost that
    /// does not fit is never reserved: booking it would run the share into debt past its
    /// burst, locking every caller out for as long as the excess takes to drain.
    pub(crate) fn fits(&self, n: NonZeroU32, hold: u32) -> bool {
        n.get() <= self.usable(hold)
    }

    /// Nanoseconds the usable burst (with `hold` kept back) takes to refill from empty.
    pub(crate) fn refill(&self, hold: u32) -> u64 {
        u64::from(self.usable(hold)).saturating_mul(self.t)
    }

    /// Cuts debt this share's terms could never have booked (carried over from older terms
    /// by a reload): at most a full burst past a reservation `span` ns ahead of `now`.
    pub(crate) fn bound(&mut self, now: u64, span: u64) {
        let most = now
            .saturating_add(span)
            .saturating_add(u64::from(self.burst).saturating_mul(self.t));
        self.tat = self.tat.min(most);
    }

    /// Earliest time `n` cells can be taken; callers check [`Gcra::fits`] first (a cost
    /// above the usable burst would wait for a full bucket and then run into debt).
    fn earliest(&self, n: NonZeroU32, hold: u32) -> u64 {
        let usable = self.usable(hold);
        let spare = u64::from(usable - n.get().min(usable));
        self.tat.saturating_sub(spare.saturating_mul(self.t))
    }

    /// How long from `now` until `n` cells could be reserved: 0 means at once.
    pub(crate) fn wait(&self, n: NonZeroU32, hold: u32, now: u64) -> u64 {
        self.earliest(n, hold).saturating_sub(now)
    }

    /// Reserves `n` cells at the earliest possible time (`now` or later). Reservations are
    /// served in the order they are made: that order is the queue.
    pub(crate) fn reserve(&mut self, n: NonZeroU32, hold: u32, now: u64) -> Slot {
        let at = self.earliest(n, hold).max(now);
        let before = self.tat;
        let spend = u64::from(n.get()).saturating_mul(self.t);
        self.tat = self.tat.max(at).saturating_add(spend);
        self.booked = self.booked.saturating_add(spend);
        Slot {
            at,
            before,
            after: self.tat,
        }
    }

    /// Gives the cells of `slot` back if nothing was reserved after it. Later reservations
    /// were scheduled behind these cells; freeing them under their feet could let a newcomer
    /// land on the same instant as one of them, exceeding the burst, so those cells stay spent.
    pub(crate) fn give_back(&mut self, slot: Slot) -> bool {
        if self.tat == slot.after {
            self.tat = slot.before;
            let spent = slot.after.saturating_sub(slot.before.max(slot.at));
            self.booked = self.booked.saturating_sub(spent);
            true
        } else {
            false
        }
    }

    /// Cells usable at `now` (with `hold` kept back), without spending any.
    pub(crate) fn available(&self, hold: u32, now: u64) -> u32 {
        self.usable(hold).saturating_sub(self.debt_cells(now))
    }

    /// Nanoseconds until one more cell is usable at `now`; 0 when the usable burst is full.
    pub(crate) fn next_cell(&self, hold: u32, now: u64) -> u64 {
        let owed = self.debt_cells(now);
        if owed == 0 {
            return 0;
        }
        // One more cell is usable once the debt is down to (usable - 1) cells, or one cell
        // less than now when it is smaller than that.
        let target = u64::from(owed.min(self.usable(hold)) - 1);
        self.tat
            .saturating_sub(now)
            .saturating_sub(target.saturating_mul(self.t))
    }

    /// Whole cells the bucket is short of its full burst at `now` (rounded up).
    fn debt_cells(&self, now: u64) -> u32 {
        let cells = self.tat.saturating_sub(now).div_ceil(self.t);
        u32::try_from(cells).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::RateLimiter;

    const MS: u64 = 1_000_000;

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).expect("test costs are positive")
    }

    fn share(limit: u32, period_ms: u64, burst: u32) -> Share {
        Share {
            limit: n(limit),
            period: Duration::from_millis(period_ms),
            burst: n(burst),
        }
    }

    /// Every decision matches governor's limiter driven by the same (paused) tokio clock:
    /// admit exactly when it admits, and otherwise name the same wait.
    #[tokio::test(start_paused = true)]
    async fn agrees_with_governor() {
        let clock = TokioClock::new();
        let s = share(10, 1000, 4);
        let oracle = RateLimiter::direct_with_clock(quota(&s), clock);
        let mut gcra = Gcra::new(&s);
        let mut rng = fastrand::Rng::with_seed(7);
        let mut admitted = 0;
        for step in 0..2000 {
            tokio::time::advance(Duration::from_millis(rng.u64(0..150))).await;
            let cost = n(rng.u32(1..=4));
            let now = clock.nanos();
            let ours = gcra.wait(cost, 0, now);
            match oracle.check_n(cost) {
                Ok(Ok(())) => {
                    assert_eq!(
                        ours, 0,
                        "step {step}: governor admitted {cost}, we wanted {ours} ns"
                    );
                    let slot = gcra.reserve(cost, 0, now);
                    assert_eq!(slot.at, now, "step {step}: expected slot now, saw {slot:?}");
                    admitted += 1;
                }
                Ok(Err(not_until)) => {
                    let theirs = not_until.wait_time_from(governor::clock::Clock::now(&clock));
                    assert_eq!(
                        Duration::from_nanos(ours),
                        theirs,
                        "step {step}: expected governor's wait for {cost}, saw ours"
                    );
                }
                Err(e) => panic!("step {step}: cost {cost} within burst, governor said {e:?}"),
            }
        }
        assert!(
            admitted > 100,
            "expected a mix of admissions, saw {admitted} of 2000"
        );
    }

    #[test]
    fn reservations_queue_one_interval_apart() {
        let mut g = Gcra::new(&share(10, 1000, 2));
        let slots: Vec<u64> = (0..5).map(|_| g.reserve(n(1), 0, 0).at).collect();
        assert_eq!(
            slots,
            [0, 0, 100 * MS, 200 * MS, 300 * MS],
            "expected burst 2 then 100 ms pacing"
        );
        assert_eq!(
            g.wait(n(1), 0, 0),
            400 * MS,
            "expected the sixth to wait 400 ms"
        );
    }

    #[test]
    fn available_and_next_cell_track_debt() {
        let mut g = Gcra::new(&share(10, 1000, 5));
        assert_eq!(
            (g.available(0, 0), g.next_cell(0, 0)),
            (5, 0),
            "expected a full burst"
        );
        g.reserve(n(3), 0, 0);
        assert_eq!(g.available(0, 0), 2, "expected 5 - 3 cells");
        assert_eq!(
            g.next_cell(0, 0),
            100 * MS,
            "expected one interval to the next cell"
        );
        assert_eq!(
            g.available(0, 150 * MS),
            3,
            "expected one cell back after 150 ms"
        );
        assert_eq!(
            g.next_cell(0, 150 * MS),
            50 * MS,
            "expected the next cell at 200 ms"
        );
        assert_eq!(
            g.available(0, 300 * MS),
            5,
            "expected the burst back after 300 ms"
        );
    }

    #[test]
    fn held_cells_stay_out_of_reach() {
        let mut g = Gcra::new(&share(10, 1000, 5));
        assert_eq!(g.available(1, 0), 4, "expected 4 of 5 usable with 1 held");
        for _ in 0..4 {
            assert_eq!(g.reserve(n(1), 1, 0).at, 0, "expected the first 4 at once");
        }
        assert_eq!(
            g.wait(n(1), 1, 0),
            100 * MS,
            "expected the held cell refused"
        );
        assert_eq!(
            g.wait(n(1), 0, 0),
            0,
            "expected the held cell free without a hold"
        );
        assert_eq!(
            g.next_cell(1, 0),
            100 * MS,
            "expected 100 ms until a usable cell"
        );
        g.reserve(n(1), 0, 0);
        assert_eq!(
            g.wait(n(1), 1, 0),
            200 * MS,
            "expected a held caller to wait two cells"
        );
        assert_eq!(
            g.next_cell(1, 0),
            200 * MS,
            "expected next usable cell in 200 ms"
        );
    }

    #[test]
    fn a_cost_fits_only_within_the_usable_burst() {
        let g = Gcra::new(&share(10, 1000, 5));
        assert!(g.fits(n(5), 0), "expected the whole burst to fit");
        assert!(!g.fits(n(6), 0), "expected one cell past the burst refused");
        assert!(
            !g.fits(n(5), 1),
            "expected a held cell out of a cost's reach"
        );
        assert_eq!(
            g.refill(1),
            400 * MS,
            "expected 4 usable cells to take 400 ms"
        );
    }

    #[test]
    fn bound_cuts_debt_past_a_burst_and_a_wait() {
        let mut g = Gcra::new(&share(10, 1000, 2));
        g.mirror(3_600_000 * MS);
        g.bound(0, 500 * MS);
        assert_eq!(
            g.wait(n(1), 0, 0),
            600 * MS,
            "expected the debt cut to 500 ms + 2 cells, one of them usable after 100 ms"
        );
    }

    #[test]
    fn gives_back_only_the_last_reservation() {
        let mut g = Gcra::new(&share(10, 1000, 1));
        let first = g.reserve(n(1), 0, 0);
        let second = g.reserve(n(1), 0, 0);
        assert!(
            !g.give_back(first),
            "expected no refund under a later reservation"
        );
        assert!(
            g.give_back(second),
            "expected the last reservation refunded"
        );
        assert_eq!(
            g.wait(n(1), 0, 0),
            100 * MS,
            "expected only the first cell still spent"
        );
    }

    #[test]
    fn booked_keeps_what_the_time_since_paid_off() {
        let mut g = Gcra::new(&share(10, 1000, 1));
        for i in 0..5 {
            g.reserve(n(1), 0, i * 1000 * MS);
        }
        let last = g.reserve(n(1), 0, 5000 * MS);
        assert_eq!(
            g.booked(),
            600 * MS,
            "expected six cells of 100 ms booked, though the bucket refilled between them"
        );
        assert!(g.give_back(last), "expected the last reservation refunded");
        assert_eq!(g.booked(), 500 * MS, "expected a refund to leave the count");
    }
}
