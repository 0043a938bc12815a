//! What the upstream says about its own limit, and the pause that follows from it: the
//! local shares are a model of the upstream's limit, its own answers are the truth. So the
//! gateway never has more calls out than the upstream's `Remaining` allows, and stops when
//! it says stop. [`Upstream`] has the rules and their invariants.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderMap;

mod mirror;

pub(crate) use mirror::Seed;

/// The limit is spent but the upstream did not say for how long: wait this long (the public
/// clients assume about a minute), then send one probe.
const BLIND_PAUSE: Duration = Duration::from_secs(60);

/// The window assumed until the upstream names its own: the real API's is an hour.
const ASSUMED_WINDOW: Duration = Duration::from_secs(3600);

/// Upper bound on any pause, so one garbled header cannot silence the gateway for days.
const LONGEST_PAUSE: Duration = Duration::from_secs(24 * 3600);

/// `X-RateLimit-Reset` values below this are read as seconds from now, not Unix time: as a
/// Unix time they would be in 2001, never a future reset.
const DELTA_RESET_BELOW: u64 = 1_000_000_000;

/// The margin a `Reset` given in whole seconds takes: it is read as the end of the second it
/// names (see `until_reset`).
const WHOLE_SECOND: Duration = Duration::from_secs(1);

/// Two reset times closer than this name the same window: a `Reset` in whole seconds, read
/// at different moments, lands on slightly different instants of the budget clock.
const SAME_WINDOW: u64 = 1_500_000_000;

/// The upstream's count in one window: the lowest `Remaining` it reported for the window
/// (less the calls that failed in it: they may have been counted), until `reset`. What may
/// still go is that less every call out.
#[derive(Debug, Clone, Copy)]
struct Allowance {
    low: u64,
    reset: u64,
    /// Set for a window this side assumed when the last one named ended (at this time):
    /// its bounds are a guess until the upstream names them.
    assumed_from: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Probe {
    /// No blind pause.
    #[default]
    None,
    /// A blind pause runs: when it ends, the next call sent goes alone.
    Due,
    /// The probe (this sequence number) is out; everyone else waits for its answer, and if
    /// it ends without one, the next call is the probe.
    Out(u64),
}

/// Where a window the gateway assumed began: the allowance's reset passed at `at`, when
/// `seq` was the next sequence number. Calls sent before it describe the window before.
#[derive(Debug, Clone, Copy)]
struct Rolled {
    seq: u64,
    at: u64,
}

/// The local shares are a model of the upstream's limit; the upstream's own answers are the
/// truth. The limit is reached when the upstream says so in any of its forms: a 429, the real
/// API's 400 with `"error": "rate_limit_reached"`, or `X-RateLimit-Remaining: 0`. Each pauses
/// all sending until `Retry-After` or `X-RateLimit-Reset`; with neither, until a minute has
/// passed (never longer than the window), and then one probe goes alone: its answer lifts the
/// pause or renews it. Every other `Remaining` sets the window's count: never more calls
/// out than the upstream's `Remaining` allows. Calls are counted upstream in another order
/// than they were sent and answered, so the count is the lowest `Remaining` reported in the
/// window, and what may go is that less every call still out, those sent before the report
/// too (one already counted is subtracted twice only until it lands; as every call lands or
/// fails, and every landing looks again, this never stalls).
/// An allowance our own calls out have used up is no pause: the next call waits for one of
/// them to land (within its `max_wait`), as only the upstream's word starts a pause.
/// Until the first answer that is not a limit answer, nothing is known of what the upstream
/// has left (another process may have spent it): one call goes alone and its answer decides,
/// as an allowance, or (no `Remaining` in it) by leaving the pacing to the shares.
/// Invariants: every admitted call takes a sequence number; within a window a report only
/// lowers the count, except one from a call sent while none other was out and answered
/// before any later-sent call (it counts everything before it); a call that fails
/// unanswered comes off the count (it may have been counted); the count shown is the
/// latest-sent call's report; a window ends at the earliest reset named for it (each is at
/// or after the real end), never
/// before, and a report of an earlier window says nothing of the current one; a report
/// only ever lengthens a pause (a late answer to an old request must not lift a fresh one),
/// or names the same end sooner after it was named (within 1.5 s: the earlier is kept),
/// except the probe's own answer; while the probe is out the others wait for it; no pause is
/// longer than the upstream's window (the longest reset it has named). A reset passing does
/// not make the count unknown again: the window that starts then holds the learnt limit,
/// less the calls still out, and no more, whatever the shares allow.
/// Times are nanoseconds on the budget's clock; wall-clock values (`Reset`, HTTP dates) are
/// turned into that clock once, when they arrive, a `Reset` (whole seconds, rounded down) as
/// the end of the second it names.
#[derive(Debug, Default)]
pub(crate) struct Upstream {
    pause_until: Option<u64>,
    allowance: Option<Allowance>,
    reported: Option<u64>,
    /// The last `X-RateLimit-Limit` seen.
    limit: Option<u64>,
    /// The last reset time seen (budget clock), for the `X-RateLimit-Reset` clients get.
    reset: Option<u64>,
    /// The configured window (the global share's period), in nanoseconds; 0 = not set.
    window: u64,
    /// The longest time to a reset the upstream has named (capped), in nanoseconds.
    learned_window: u64,
    probe: Probe,
    /// The sequence number the next call took when the blind pause began: an answer to a
    /// call sent before it (counted before the limit answer) cannot lift the pause.
    blind_from: u64,
    /// Calls admitted whose upstream answer has not been read yet: sequence number to cost.
    flying: BTreeMap<u64, u64>,
    /// The sequence number the next admitted call takes.
    next_seq: u64,
    /// The sequence number of the latest-sent call whose `Remaining` was read: its report
    /// is the one shown and the one the allowance follows; older ones are ignored.
    newest: Option<u64>,
    /// The last window this side assumed when the allowance's reset passed.
    rolled: Option<Rolled>,
    /// The last call sent while no other was out.
    alone: Option<u64>,
    /// An answer other than a limit answer has been read: what the upstream has left is
    /// known (or it does not say, and the shares alone pace the calls).
    learned: bool,
    /// How many times the upstream itself said stop (429, or nothing remaining). Pauses that
    /// our own counting starts are not alarms: the requests counted in are already allowed.
    alarms: u64,
    /// Contradictory rate fields have been logged once.
    warned_nonsense: bool,
    /// How many processes share the count this side knows (0 or 1: this one alone): a
    /// replica on its fallback, cut off from the others, spends only its part of it.
    parts: u64,
    /// What the shared budget last said of the window (see `mirror`).
    mirror: Option<mirror::Mirror>,
    /// While cut off from the other replicas: this one's part of what was left.
    fence: Option<mirror::Fence>,
    /// Cells sent while cut off (and not given back), for the shared count on return.
    apart: u64,
}

impl Upstream {
    /// The last `X-RateLimit-Remaining` seen, if any.
    pub(crate) fn reported(&self) -> Option<u64> {
        self.reported
    }

    /// The last `X-RateLimit-Limit` seen, if any.
    pub(crate) fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The upstream's next reset on the budget clock, while it lies ahead of `now`.
    pub(crate) fn reset(&self, now: u64) -> Option<u64> {
        self.reset.filter(|r| *r > now)
    }

    pub(crate) fn alarms(&self) -> u64 {
        self.alarms
    }

    /// Sets the window no pause may outlast: the period the upstream's limit is counted over.
    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = nanos(window.min(LONGEST_PAUSE));
    }

    /// The longest pause allowed: the upstream's window. Once a `Reset` has shown it, the
    /// longest reset named; until then the longer of the configured period and an hour,
    /// the window the real API counts over.
    pub(crate) fn longest(&self) -> u64 {
        if self.learned_window > 0 {
            return self.learned_window.min(nanos(LONGEST_PAUSE));
        }
        self.window
            .max(nanos(ASSUMED_WINDOW))
            .min(nanos(LONGEST_PAUSE))
    }

    /// The window the upstream's resets have shown (the longest time to a reset named), in
    /// nanoseconds, once one has.
    pub(crate) fn window_learnt(&self) -> Option<u64> {
        (self.learned_window > 0).then_some(self.learned_window)
    }

    /// The blind pause, in nanoseconds: a minute, or the upstream's window if shorter: the
    /// one its resets have shown, or until one has, the configured period (`budget.period`,
    /// the operator's word for that window). A count spent in a window renews when it
    /// ends, so waiting longer would only leave calls unsent.
    pub(crate) fn blind(&self) -> u64 {
        let window = match (self.learned_window, self.window) {
            (0, 0) => self.longest(),
            (0, configured) => configured,
            _ => self.longest(),
        };
        nanos(BLIND_PAUSE).min(window)
    }

    /// Calls the upstream still allows before its reset: the lowest `Remaining` of the
    /// window less every call out, those sent before the report too (the upstream may have
    /// counted them after it).
    pub(crate) fn allowance(&self, now: u64) -> Option<u64> {
        let counted = self
            .current(now)
            .map(|a| self.part(a.low).saturating_sub(self.out()));
        match (counted, self.fenced(now)) {
            (Some(c), Some(f)) => Some(c.min(f)),
            (c, f) => c.or(f),
        }
    }

    /// This process's part of a count of `low`.
    fn part(&self, low: u64) -> u64 {
        low / self.parts.max(1)
    }

    /// The sequence number the next admitted call takes.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The cells of every call out.
    pub(crate) fn out(&self) -> u64 {
        self.flying.values().sum()
    }

    /// The count in force at `now`. Once its reset has passed, a new window is full: the
    /// learnt `X-RateLimit-Limit` (less the calls still out, as always: the upstream may
    /// count them in the new window), until the window after, one learnt window later (or,
    /// while no reset has been named, one configured period later).
    /// Never the shares alone, which may be set above the upstream's limit. Without a
    /// learnt limit the shares pace the new window.
    fn current(&self, now: u64) -> Option<Allowance> {
        let a = self.allowance?;
        if a.reset > now {
            return Some(a);
        }
        let limit = self.limit?;
        // The window the upstream's resets showed, else the operator's word for it (the
        // configured period): the `X-RateLimit-Reset` clients get names its end.
        let window = if self.learned_window > 0 {
            self.learned_window
        } else if self.window > 0 {
            self.window
        } else {
            self.longest()
        }
        .max(1);
        let windows = (now - a.reset) / window + 1;
        let reset = a.reset.saturating_add(windows.saturating_mul(window));
        Some(Allowance {
            low: limit,
            reset,
            assumed_from: Some(reset - window),
        })
    }

    /// Makes [`Upstream::current`] the allowance, remembering where an assumed window began.
    fn roll(&mut self, now: u64) {
        let Some(a) = self.allowance.filter(|a| a.reset <= now) else {
            return;
        };
        self.rolled = Some(Rolled {
            seq: self.next_seq,
            at: a.reset,
        });
        self.allowance = self.current(now);
        if let Some(next) = self.allowance {
            self.reset = Some(next.reset);
        }
    }

    /// When the blind pause ends and its probe may go, while it still runs at `now`.
    pub(crate) fn probe_at(&self, now: u64) -> Option<u64> {
        match self.probe {
            Probe::Due => self.pause_until.filter(|until| *until > now),
            _ => None,
        }
    }

    /// A call of `cost` must wait for one in flight to land: nothing is known yet of what
    /// the upstream has left and a call is out to find out, or the calls out have used up
    /// the allowance (their answers say what is left; the upstream never said stop).
    pub(crate) fn waits_for_landing(&self, cost: u64, now: u64) -> bool {
        if let Probe::Out(seq) = self.probe {
            if self.flying.contains_key(&seq) {
                return true;
            }
        }
        if self.flying.is_empty() {
            return false;
        }
        !self.learned || self.allowance(now).is_some_and(|left| left < cost)
    }

    /// Whether an answer other than a limit answer has told what the upstream has left (or
    /// that it does not say).
    pub(crate) fn knows(&self) -> bool {
        self.learned
    }

    /// Takes what another replica learnt: the shared budget holds the upstream's report.
    pub(crate) fn learn(&mut self) {
        self.learned = true;
    }

    /// Nanoseconds of pause left at `now`, if paused.
    pub(crate) fn paused_for(&self, now: u64) -> Option<u64> {
        self.pause_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Ends any pause now (`POST /admin/budget/resume`): the operator's word. The allowance
    /// goes too, as it would only start the same pause again.
    pub(crate) fn resume(&mut self) -> bool {
        let out = self.out();
        let was = self.pause_until.is_some() || self.allowance.is_some_and(|a| a.low <= out);
        self.pause_until = None;
        self.allowance = None;
        // The shared count mirrored goes too: seeded again, it would start the same pause.
        self.mirror = None;
        self.probe = Probe::None;
        was
    }

    /// How long `cost` cells must wait for the upstream, or `None` if they may go now.
    pub(crate) fn blocked(&mut self, cost: u64, now: u64) -> Option<u64> {
        if let Some(wait) = self.paused_for(now) {
            return Some(wait);
        }
        self.pause_until = None;
        // With a probe due, the next call spent is the probe (see `spend`), and the others
        // wait for its answer (`waits_for_landing`).
        self.roll(now);
        self.renew_fence(now);
        if self.fenced(now).is_some_and(|left| left < cost) {
            // This replica's part while cut off is spent: the window's end renews it, and
            // calls of its own out only wait for their answers (which renew nothing).
            if self.flying.is_empty() {
                return self.fence.map(|f| f.reset.saturating_sub(now).max(1));
            }
            return None;
        }
        match self.allowance {
            // Only what the upstream said is left (no call of ours out) is too little: wait
            // for its reset. A count our own calls used up waits for their answers instead,
            // and with none out (they failed unanswered) one call goes to ask.
            Some(a) if self.part(a.low) < cost && a.low > 0 && self.flying.is_empty() => {
                Some(a.reset - now)
            }
            _ => None,
        }
    }

    /// Puts `cost` cells in flight, off the allowance until the call lands; spending the
    /// last one starts no pause (the upstream has not said stop), later calls wait for these
    /// to land. Returns the call's sequence number: its cells are in flight until
    /// [`Upstream::read`], [`Upstream::done`] or [`Upstream::give_back`] names it.
    pub(crate) fn spend(&mut self, cost: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.flying.is_empty() {
            self.alone = Some(seq);
        }
        self.flying.insert(seq, cost);
        self.fence_spend(cost);
        if self.probe == Probe::Due && self.pause_until.is_none() {
            self.probe = Probe::Out(seq);
        }
        seq
    }

    /// Call `seq` never went: its cells leave the flight, back to the allowance.
    pub(crate) fn give_back(&mut self, seq: u64) {
        if let Some(cost) = self.flying.remove(&seq) {
            self.fence_give_back(seq, cost);
            self.probe_ended(seq);
        }
    }

    /// Call `seq` is over without an answer to read (failed or abandoned): it leaves the
    /// flight, and the window's count loses its cells, as the upstream may have counted it.
    pub(crate) fn done(&mut self, seq: u64) {
        let Some(cost) = self.flying.remove(&seq) else {
            return;
        };
        self.probe_ended(seq);
        if let Some(a) = self.allowance.as_mut() {
            a.low = a.low.saturating_sub(cost);
        }
    }

    /// Call `seq` left the flight unanswered: if it was the probe, the next call is.
    fn probe_ended(&mut self, seq: u64) {
        if self.probe == Probe::Out(seq) {
            self.probe = Probe::Due;
        }
    }

    /// Reads one upstream answer (429 counts as the limit reached). `now` is the budget
    /// clock, `wall` the same moment in Unix time, so `Reset` and HTTP dates can be placed
    /// on the budget clock.
    #[cfg(test)]
    pub(crate) fn observe(
        &mut self,
        status: http::StatusCode,
        headers: &HeaderMap,
        now: u64,
        wall: SystemTime,
    ) {
        let limited = status == http::StatusCode::TOO_MANY_REQUESTS;
        self.read(limited, headers, None, now, wall);
    }

    /// Reads one upstream answer: `limited` when it said the limit is reached (in whatever
    /// form); `sent` the answered call's sequence number, whose flight ends here (`None`: an
    /// answer to no admitted call, read as sent just now).
    pub(crate) fn read(
        &mut self,
        limited: bool,
        headers: &HeaderMap,
        sent: Option<u64>,
        now: u64,
        wall: SystemTime,
    ) {
        if let Some(seq) = sent {
            self.flying.remove(&seq);
        }
        // Sent while no other call was out: every call before it had landed, so its report
        // counts them all. (An answer to no admitted call was sent at no known time.)
        let alone = sent.is_some_and(|seq| self.alone == Some(seq));
        let sent = sent.unwrap_or(self.next_seq);
        // Only a report at least as fresh as the newest read may be shown or followed.
        let fresh = self.newest.is_none_or(|newest| sent >= newest);
        if !limited {
            self.learned = true;
        }
        let longest = self.longest();
        let mut remaining = header_u64(headers, "x-ratelimit-remaining");
        let mut limit = header_u64(headers, "x-ratelimit-limit");
        let mut reset_value: Option<u64> =
            header_str(headers, "x-ratelimit-reset").and_then(|v| v.parse().ok());
        // Numbers that cannot all be true (a limit of 0, more remaining than the limit) are
        // neither obeyed nor shown to clients: the answer's rate fields are ignored as a set,
        // with one warning for the process's life. A 429 and its Retry-After still count.
        let nonsense = limit == Some(0)
            || matches!((limit.or(self.limit), remaining), (Some(l), Some(r)) if r > l);
        if nonsense {
            if !self.warned_nonsense {
                self.warned_nonsense = true;
                tracing::warn!(
                    limit = ?limit,
                    remaining = ?remaining,
                    "the upstream's X-RateLimit fields contradict each other (limit 0, or more \
                     remaining than the limit): ignored, now and whenever they do"
                );
            }
            (remaining, limit, reset_value) = (None, None, None);
        }
        if let Some(limit) = limit {
            self.limit = Some(limit);
        }
        // A reset of 0 seconds from now names no time, as one already past does: followed,
        // a `Remaining: 0` with it would pause for nothing and send every call into the limit.
        // Any other is read as the end of the second it names (see `until_reset`).
        let reset_in = reset_value
            .and_then(|v| until_reset(v, wall))
            .filter(|d| !d.is_zero());
        if let Some(d) = reset_in {
            // A reset further off than any window we know of (the configured one, else the
            // real API's hour) is not a window: it would pause for that long.
            let ceiling = self
                .window
                .max(nanos(ASSUMED_WINDOW))
                .min(nanos(LONGEST_PAUSE));
            self.learned_window = self.learned_window.max(nanos(d).min(ceiling));
        }
        let reset = reset_in.map(|d| at(now, d, self.longest()));
        // A call sent before an assumed window began, answered with no reset beyond that
        // start, counted in the window before: its count says nothing of this one.
        let earlier_window = self.rolled.is_some_and(|r| {
            sent < r.seq && reset.is_none_or(|reset| reset <= r.at.saturating_add(SAME_WINDOW))
        });
        if earlier_window && !limited {
            return;
        }
        if let Some(reset) = reset {
            self.reset = Some(reset);
        }
        if remaining.is_some() && fresh {
            self.reported = remaining;
            self.newest = Some(sent);
        }
        if limited || remaining == Some(0) {
            // A Retry-After of 0 or a date already past names no time to wait: obeyed, it
            // would send every request into the refusal. The reset decides, else the blind
            // minute and one probe.
            let retry = header_str(headers, "retry-after")
                .and_then(|v| retry_after(v, wall))
                .filter(|d| !d.is_zero());
            let probe_out = matches!(self.probe, Probe::Out(_));
            let until = match (retry, reset) {
                (Some(d), _) => at(now, d, longest),
                (None, Some(reset)) => reset,
                (None, None) => {
                    self.probe = Probe::Due;
                    self.blind_from = self.next_seq;
                    // The limit of a window whose end the upstream named (a pause to it, or
                    // its count) renews then: waiting the blind minute (a whole window when
                    // the window is shorter) from now would hold calls past it.
                    self.named_end(now)
                        .unwrap_or_else(|| now.saturating_add(self.blind()))
                }
            };
            if probe_out {
                // The probe itself was refused: a fresh pause, whatever the last one was.
                self.probe = Probe::Due;
                self.blind_from = self.next_seq;
                self.pause_until = None;
            }
            self.alarm(until, now);
            return;
        }
        if self.probe != Probe::None {
            // An answer that is not the limit means the upstream takes calls again, if the
            // call was sent after the limit answer's pause began (the probe): an older one,
            // landing late, was counted before the limit was reached and says nothing now.
            if sent < self.blind_from {
                return;
            }
            self.probe = Probe::None;
            self.pause_until = None;
        }
        let Some(remaining) = remaining else {
            return;
        };
        let live = self.current(now);
        let named = reset.is_some();
        let reset = match (reset, live) {
            (Some(reset), _) => reset,
            // The reset header is sometimes left out: the count still holds, in the window
            // already known, or else for the time a client would assume.
            (None, Some(a)) => a.reset,
            (None, None) => now.saturating_add(self.blind()),
        };
        // Within a window the count is the lowest report: calls are counted in another
        // order than they were sent and answered, so a higher one is older news. The
        // window ends at the earliest reset named for it (a whole-second `Reset` read at
        // different moments names it a little differently, and each reading, the end of
        // the second it names, is at or after the real end: a later one was read late).
        let allowance = match live {
            // The first report of the window after the one that ended: the upstream began it
            // when its first call was counted (perhaps one sent before this side assumed
            // it), so the reset it names replaces the assumed one, earlier or later.
            Some(Allowance {
                low,
                assumed_from: Some(from),
                ..
            }) if named && reset > from.saturating_add(SAME_WINDOW) => Allowance {
                low: if alone && fresh {
                    remaining
                } else {
                    low.min(remaining)
                },
                reset,
                assumed_from: None,
            },
            Some(a) if a.reset.abs_diff(reset) < SAME_WINDOW => {
                // A call sent alone and answered before any later one knows the count.
                let low = if alone && fresh {
                    remaining
                } else {
                    a.low.min(remaining)
                };
                Allowance {
                    low,
                    reset: a.reset.min(reset),
                    assumed_from: a.assumed_from,
                }
            }
            // Counted in a window before the one in force: it says nothing of this one.
            Some(a) if reset < a.reset => return,
            // A window we know nothing of yet (or none): a report older than the newest
            // read may not open it.
            _ if !fresh => return,
            _ => Allowance {
                low: remaining,
                reset,
                assumed_from: None,
            },
        };
        // What the calls out leave is not the upstream's word: no pause.
        self.allowance = Some(allowance);
    }

    fn alarm(&mut self, until: u64, now: u64) {
        self.alarms += 1;
        self.pause_to(until, now);
    }

    /// Pauses until `until`: a later end than the pause in force lengthens it (a later
    /// window, or a longer `Retry-After`); one naming the same end (within [`SAME_WINDOW`])
    /// keeps the earlier of the two, since every end read is at or after the upstream's
    /// real one (a whole-second `Reset` is read as the end of its second) and a later one
    /// is the same end read late; an earlier end never shortens it (an old answer).
    fn pause_to(&mut self, until: u64, now: u64) {
        self.pause_until = Some(match self.pause_until.filter(|p| *p > now) {
            Some(p) if p.abs_diff(until) < SAME_WINDOW => p.min(until),
            Some(p) => p.max(until),
            None => until,
        });
    }

    /// The end of the current window, as the upstream named it, while it lies ahead: the
    /// pause in force, or the count's reset (not a window this side assumed).
    fn named_end(&self, now: u64) -> Option<u64> {
        self.pause_until.filter(|p| *p > now).or_else(|| {
            self.allowance
                .filter(|a| a.assumed_from.is_none() && a.reset > now)
                .map(|a| a.reset)
        })
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// `now + d` on the budget clock, with `d` capped at `longest` nanoseconds.
fn at(now: u64, d: Duration, longest: u64) -> u64 {
    now.saturating_add(nanos(d).min(longest))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    header_str(headers, name)?.parse().ok()
}

/// The `X-RateLimit-Reset` an answer names, as the time from `wall` until it (`None` inside:
/// it has passed); `None` when it names none.
pub(crate) fn named_reset(headers: &HeaderMap, wall: SystemTime) -> Option<Option<Duration>> {
    let value: u64 = header_str(headers, "x-ratelimit-reset")?.parse().ok()?;
    Some(until_reset(value, wall).filter(|d| !d.is_zero()))
}

/// Time from `wall` until the end of the second a `Reset` value names; `None` when that has
/// passed. The upstream gives its reset in whole seconds, rounded down: its window really
/// ends anywhere in the second named, so a call sent within that second may still be
/// counted in the old window and refused. A reset of 0 seconds from now names no time.
fn until_reset(value: u64, wall: SystemTime) -> Option<Duration> {
    if value == 0 {
        return None;
    }
    if value < DELTA_RESET_BELOW {
        return Some(Duration::from_secs(value) + WHOLE_SECOND);
    }
    (UNIX_EPOCH + Duration::from_secs(value) + WHOLE_SECOND)
        .duration_since(wall)
        .ok()
}

/// `Retry-After` as delay-seconds or an HTTP date (IMF-fixdate); a date in the past is no
/// wait at all.
fn retry_after(value: &str, wall: SystemTime) -> Option<Duration> {
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let date = UNIX_EPOCH + Duration::from_secs(imf_fixdate(value)?);
    Some(date.duration_since(wall).unwrap_or(Duration::ZERO))
}

/// Unix seconds of an IMF-fixdate such as `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 5.6.7),
/// the form senders must use; the two obsolete forms are not read.
fn imf_fixdate(value: &str) -> Option<u64> {
    let mut parts = value.split_ascii_whitespace();
    let (_weekday, day, month, year, clock, zone) = (
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
        parts.next()?,
    );
    if zone != "GMT" || parts.next().is_some() {
        return None;
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| *m == month)? as u64 + 1;
    let day: u64 = day.parse().ok().filter(|d| (1..=31).contains(d))?;
    let year: u64 = year.parse().ok().filter(|y| *y >= 1970)?;
    let mut hms = clock.split(':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_since_epoch(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days from 1970-01-01 to a proleptic Gregorian date (year >= 1970), counting years from
/// March so the leap day falls at the end of the counted year.
fn days_since_epoch(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let year_of_era = y % 400;
    let shifted_month = (month + 9) % 12;
    let day_of_year = (153 * shifted_month + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    (era * 146_097 + day_of_era).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};

    const SEC: u64 = 1_000_000_000;

    /// A fixed wall clock: 2024-01-01T00:00:00Z.
    fn wall() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_704_067_200)
    }

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            let value = HeaderValue::try_from(value.as_str()).expect("test header is ASCII");
            map.insert(*name, value);
        }
        map
    }

    /// The `X-RateLimit-Reset` (Unix seconds) of a window that ends `secs` after `wall()`:
    /// the second before, as a reset is read as the end of the second it names.
    fn reset_in(secs: u64) -> (&'static str, String) {
        ("x-ratelimit-reset", (1_704_067_200 + secs - 1).to_string())
    }

    #[test]
    fn reads_imf_fixdate() {
        let got = imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            got,
            Some(784_111_777),
            "expected RFC 9110's example date, saw {got:?}"
        );
        let got = imf_fixdate("Thu, 29 Feb 2024 23:59:60 GMT");
        assert_eq!(
            got,
            Some(1_709_251_200),
            "expected a leap day with leap second, saw {got:?}"
        );
        for bad in [
            "Sun, 06 Nov 1994 08:49:37 CET",
            "06 Nov 1994",
            "Sun, 06 Foo 1994 08:49:37 GMT",
        ] {
            assert_eq!(imf_fixdate(bad), None, "expected {bad:?} rejected");
        }
    }

    #[test]
    fn too_many_requests_pauses_for_retry_after() {
        let mut up = Upstream::default();
        let h = headers(&[("retry-after", "5".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 10 * SEC, wall());
        assert_eq!(
            up.paused_for(10 * SEC),
            Some(5 * SEC),
            "expected a 5 s pause"
        );
        assert_eq!(
            up.blocked(1, 14 * SEC),
            Some(SEC),
            "expected 1 s left at 14 s"
        );
        assert_eq!(
            up.blocked(1, 15 * SEC),
            None,
            "expected the pause over at 15 s"
        );
    }

    #[test]
    fn retry_after_as_http_date() {
        let mut up = Upstream::default();
        let h = headers(&[("retry-after", "Mon, 01 Jan 2024 00:00:30 GMT".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(30 * SEC),
            "expected 30 s until the date"
        );
    }

    #[test]
    fn a_retry_after_of_zero_or_past_still_pauses() {
        for value in ["0", "Wed, 21 Oct 2015 07:28:00 GMT"] {
            let mut up = Upstream::default();
            let h = headers(&[("retry-after", value.into())]);
            up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
            assert_eq!(
                up.paused_for(0),
                Some(nanos(BLIND_PAUSE)),
                "Retry-After {value:?}: expected the blind minute, not no pause at all"
            );
        }
    }

    #[test]
    fn too_many_requests_without_retry_after_uses_reset_then_a_minute() {
        let mut up = Upstream::default();
        up.observe(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[reset_in(40)]),
            0,
            wall(),
        );
        assert_eq!(
            up.paused_for(0),
            Some(40 * SEC),
            "expected the pause to the reset"
        );
        let mut up = Upstream::default();
        up.observe(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(60 * SEC),
            "expected the blind minute"
        );
    }

    #[test]
    fn remaining_zero_with_reset_pauses() {
        let mut up = Upstream::default();
        let h = headers(&[("x-ratelimit-remaining", "0".into()), reset_in(60)]);
        up.observe(StatusCode::OK, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(60 * SEC),
            "expected a pause until the reset"
        );
        assert_eq!(up.reported(), Some(0), "expected the report kept");
    }

    #[test]
    fn small_remaining_becomes_an_allowance() {
        let mut up = Upstream::default();
        let h = headers(&[("x-ratelimit-remaining", "2".into()), reset_in(60)]);
        up.observe(StatusCode::OK, &h, 0, wall());
        assert_eq!(
            up.blocked(3, 0),
            Some(60 * SEC),
            "expected cost 3 over an allowance of 2"
        );
        assert_eq!(up.blocked(1, 0), None, "expected the first call allowed");
        let first = up.spend(1);
        assert_eq!(up.blocked(1, 0), None, "expected the second call allowed");
        let last = up.spend(1);
        assert_eq!(
            up.paused_for(0),
            None,
            "expected no pause: the upstream never said stop"
        );
        assert!(
            up.waits_for_landing(1, 0),
            "expected a third call to wait for the calls out"
        );
        up.done(first);
        up.done(last);
        assert!(
            !up.waits_for_landing(1, 0) && up.blocked(1, 0).is_none(),
            "expected one call to go and ask once none is out"
        );
    }

    #[test]
    fn late_answers_neither_lift_a_pause_nor_raise_an_allowance() {
        let mut up = Upstream::default();
        let h = headers(&[("x-ratelimit-remaining", "5".into()), reset_in(60)]);
        up.observe(StatusCode::OK, &h, 0, wall());
        let (a, b, c) = (up.spend(1), up.spend(1), up.spend(1));
        let h = headers(&[("x-ratelimit-remaining", "2".into()), reset_in(60)]);
        up.read(false, &h, Some(c), 0, wall());
        assert_eq!(
            up.allowance(0),
            Some(0),
            "expected the latest-sent call's 2 less a and b, still out (maybe not counted)"
        );
        // The answer to `a`, sent before `c`, arrives late: it was counted before `b` and
        // `c` were, so its 4 is older news than c's 2.
        let older = headers(&[("x-ratelimit-remaining", "4".into()), reset_in(60)]);
        up.read(false, &older, Some(a), 0, wall());
        assert_eq!(
            up.allowance(0),
            Some(1),
            "expected the lowest report, 2, less b still out: never the earlier-sent 4"
        );
        assert_eq!(
            up.reported(),
            Some(2),
            "expected the gauge's report kept too"
        );
        up.done(b);

        up.observe(
            StatusCode::TOO_MANY_REQUESTS,
            &headers(&[("retry-after", "30".into())]),
            0,
            wall(),
        );
        let h = headers(&[("x-ratelimit-remaining", "50".into()), reset_in(5)]);
        up.observe(StatusCode::OK, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(30 * SEC),
            "expected the 429's pause to stand"
        );
    }

    #[test]
    fn small_reset_values_are_seconds_from_now_and_past_ones_are_ignored() {
        let mut up = Upstream::default();
        let h = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "20".into()),
        ]);
        up.observe(StatusCode::OK, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(21 * SEC),
            "expected Reset 20 read as seconds ahead, to the end of the 20th (rounded down)"
        );
        let mut up = Upstream::default();
        let past = ("x-ratelimit-reset", "1704067100".to_string());
        let h = headers(&[("x-ratelimit-remaining", "0".into()), past]);
        up.observe(StatusCode::OK, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(60 * SEC),
            "expected Remaining 0 with a past reset to start the blind minute"
        );
        assert_eq!(up.blocked(1, 60 * SEC), None, "expected one probe after it");
        up.spend(1);
        assert!(
            up.waits_for_landing(1, 60 * SEC),
            "expected the others to wait for the probe's answer"
        );
    }

    #[test]
    fn a_reset_of_zero_seconds_is_no_reset_and_starts_the_blind_pause() {
        for zero in ["0", " 0 "] {
            let mut up = Upstream::default();
            let h = headers(&[
                ("x-ratelimit-remaining", "0".into()),
                ("x-ratelimit-reset", zero.into()),
            ]);
            up.observe(StatusCode::OK, &h, 0, wall());
            assert_eq!(
                up.paused_for(0),
                Some(60 * SEC),
                "expected Remaining 0 with Reset {zero:?} to start the blind minute"
            );
            let mut up = Upstream::default();
            up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
            assert_eq!(
                up.paused_for(0),
                Some(60 * SEC),
                "expected a 429 with Reset {zero:?} to start the blind minute"
            );
        }
    }

    #[test]
    fn pauses_are_capped() {
        let mut up = Upstream::default();
        let h = headers(&[("retry-after", "99999999".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
        let want = 3600 * SEC;
        assert_eq!(
            up.paused_for(0),
            Some(want),
            "expected the assumed hourly window as the cap, not days"
        );
        let mut up = Upstream::default();
        let far = headers(&[
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", "99999999999".into()),
        ]);
        up.observe(StatusCode::OK, &far, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(want),
            "expected a reset in the year 5138 cut to the hour, not taught as a day's window"
        );
    }

    #[test]
    fn contradictory_rate_fields_are_ignored() {
        let mut up = Upstream::default();
        let zero = headers(&[
            ("x-ratelimit-limit", "0".into()),
            ("x-ratelimit-remaining", "5".into()),
            reset_in(60),
        ]);
        up.observe(StatusCode::OK, &zero, 0, wall());
        assert_eq!(
            (up.limit(), up.reported(), up.allowance(0), up.reset(0)),
            (None, None, None, None),
            "expected a limit of 0 with 5 remaining ignored as a set"
        );
        let sane = headers(&[
            ("x-ratelimit-limit", "100".into()),
            ("x-ratelimit-remaining", "40".into()),
            reset_in(60),
        ]);
        up.observe(StatusCode::OK, &sane, 0, wall());
        assert_eq!((up.limit(), up.allowance(0)), (Some(100), Some(40)));
        let over = headers(&[
            ("x-ratelimit-limit", "100".into()),
            ("x-ratelimit-remaining", "500".into()),
        ]);
        up.observe(StatusCode::OK, &over, 0, wall());
        let over_known = headers(&[("x-ratelimit-remaining", "101".into())]);
        up.observe(StatusCode::OK, &over_known, 0, wall());
        assert_eq!(
            (up.limit(), up.reported(), up.allowance(0)),
            (Some(100), Some(40), Some(40)),
            "expected more remaining than the limit (said or known) ignored"
        );
        let zero_left = headers(&[
            ("x-ratelimit-limit", "0".into()),
            ("x-ratelimit-remaining", "0".into()),
            reset_in(600),
        ]);
        up.observe(StatusCode::OK, &zero_left, 0, wall());
        assert_eq!(
            up.paused_for(0),
            None,
            "expected no pause from a limit of 0"
        );
        up.observe(StatusCode::TOO_MANY_REQUESTS, &zero_left, 0, wall());
        assert!(
            up.paused_for(0).is_some(),
            "expected a 429 to pause whatever its rate fields say"
        );
    }

    #[test]
    fn pauses_never_outlast_the_window() {
        let mut up = Upstream::default();
        up.set_window(Duration::from_secs(3600));
        let h = headers(&[("retry-after", "999999999".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(3600 * SEC),
            "expected the 1 h window"
        );
        let mut up = Upstream::default();
        up.set_window(Duration::from_secs(1));
        let ok = headers(&[("x-ratelimit-remaining", "5".into()), reset_in(10)]);
        up.observe(StatusCode::OK, &ok, 0, wall());
        up.observe(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new(), 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(10 * SEC),
            "expected the blind minute cut to the 10 s window the upstream showed"
        );
        let h = headers(&[("retry-after", "999999999".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(10 * SEC),
            "expected years cut to 10 s"
        );
    }

    #[test]
    fn a_learnt_window_cuts_the_blind_minute_and_every_pause() {
        let mut up = Upstream::default();
        up.set_window(Duration::from_secs(3600));
        let ok = headers(&[("x-ratelimit-remaining", "5".into()), reset_in(20)]);
        up.observe(StatusCode::OK, &ok, 0, wall());
        up.read(true, &HeaderMap::new(), None, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(20 * SEC),
            "expected a bare limit answer's blind minute cut to the 20 s window"
        );
        let h = headers(&[("retry-after", "3000".into())]);
        up.observe(StatusCode::TOO_MANY_REQUESTS, &h, 0, wall());
        assert_eq!(
            up.paused_for(0),
            Some(20 * SEC),
            "expected Retry-After 3000 cut to the longest reset named"
        );
    }

    #[test]
    fn a_blind_pause_ends_in_one_probe_whose_answer_decides() {
        let mut up = Upstream::default();
        up.read(true, &HeaderMap::new(), None, 0, wall());
        assert_eq!(up.blocked(1, 59 * SEC), Some(SEC), "expected the minute");
        assert_eq!(
            up.probe_at(59 * SEC),
            Some(60 * SEC),
            "expected the probe due"
        );
        assert_eq!(up.blocked(1, 60 * SEC), None, "expected the probe to go");
        let probe = up.spend(1);
        assert!(
            up.blocked(1, 60 * SEC).is_none() && up.waits_for_landing(1, 60 * SEC),
            "expected everyone else waiting for the probe's answer, not refused"
        );
        up.read(true, &HeaderMap::new(), Some(probe), 61 * SEC, wall());
        assert_eq!(
            up.paused_for(61 * SEC),
            Some(60 * SEC),
            "expected a refused probe to start a fresh minute"
        );
        assert_eq!(up.blocked(1, 121 * SEC), None, "expected a second probe");
        let probe = up.spend(1);
        let ok = headers(&[("x-ratelimit-remaining", "50".into())]);
        up.read(false, &ok, Some(probe), 122 * SEC, wall());
        assert!(
            up.blocked(1, 122 * SEC).is_none() && !up.waits_for_landing(1, 122 * SEC),
            "expected the pause lifted"
        );
    }

    #[test]
    fn a_probe_that_ends_unanswered_hands_the_probe_to_the_next_call() {
        let mut up = Upstream::default();
        let first = up.spend(1);
        up.read(false, &HeaderMap::new(), Some(first), 0, wall());
        up.read(true, &HeaderMap::new(), None, 0, wall());
        assert_eq!(up.blocked(1, 60 * SEC), None, "expected the probe to go");
        let probe = up.spend(1);
        assert!(
            up.waits_for_landing(1, 60 * SEC),
            "expected the others held"
        );
        up.done(probe);
        assert!(
            !up.waits_for_landing(1, 60 * SEC),
            "expected the next call free to go once the probe failed"
        );
        let next = up.spend(1);
        assert!(
            up.waits_for_landing(1, 60 * SEC),
            "expected that call to be the probe the others wait for"
        );
        up.give_back(next);
        assert!(
            !up.waits_for_landing(1, 60 * SEC),
            "expected a probe never sent to hand the probe on too"
        );
    }

    #[test]
    fn a_new_window_holds_the_learnt_limit_less_the_calls_still_out() {
        let mut up = Upstream::default();
        let first = up.spend(1);
        let h = |left: u64, reset: u64| {
            headers(&[
                ("x-ratelimit-limit", "10".into()),
                ("x-ratelimit-remaining", left.to_string()),
                ("x-ratelimit-reset", reset.to_string()),
            ])
        };
        // Reset 9 s from now, rounded down: the window ends by 10 s.
        up.read(false, &h(9, 9), Some(first), 0, wall());
        let late: Vec<u64> = (0..3).map(|_| up.spend(1)).collect();
        // The window resets with three calls still out.
        let now = 10 * SEC;
        assert_eq!(up.blocked(1, now), None, "expected calls in the new window");
        assert_eq!(
            up.allowance(now),
            Some(7),
            "expected the learnt limit of 10 less the 3 calls still out, not the shares"
        );
        let fresh: Vec<u64> = (0..7).map(|_| up.spend(1)).collect();
        assert!(
            up.waits_for_landing(1, now),
            "expected an 11th call in the window held for a landing"
        );
        // A call sent before the window began lands saying what it left of the old one.
        up.read(false, &h(0, 0), Some(late[0]), now, wall());
        assert_eq!(
            (up.paused_for(now), up.allowance(now)),
            (None, Some(1)),
            "expected the old window's 0 neither a pause nor a count of this one, and the \
             call it answered no longer out"
        );
        up.read(false, &h(3, 10), Some(fresh[6]), now, wall());
        assert_eq!(
            up.allowance(now),
            Some(0),
            "expected this window's 3 less the 8 calls still out"
        );
        assert_eq!(
            up.allowance(25 * SEC),
            Some(2),
            "expected the next window to hold the limit less the 8 calls still out"
        );
        for seq in fresh[..6].iter().chain(&late[1..]) {
            up.read(false, &h(3, 10), Some(*seq), now, wall());
        }
        assert_eq!(
            up.allowance(now),
            Some(3),
            "expected this window's 3 once every call out has landed"
        );
    }

    #[test]
    fn an_older_answer_never_overwrites_the_count_shown() {
        let mut up = Upstream::default();
        let (a, b) = (up.spend(1), up.spend(1));
        let zero = headers(&[("x-ratelimit-remaining", "0".into()), reset_in(60)]);
        up.read(true, &zero, Some(b), 0, wall());
        let three = headers(&[("x-ratelimit-remaining", "3".into()), reset_in(60)]);
        up.read(false, &three, Some(a), 0, wall());
        assert_eq!(
            up.reported(),
            Some(0),
            "expected the later-sent call's 0 shown, not the earlier one's 3"
        );
        let mut up = Upstream::default();
        let (a, b) = (up.spend(1), up.spend(1));
        up.read(false, &zero, Some(b), 0, wall());
        up.read(false, &three, Some(a), 0, wall());
        assert_eq!(
            (up.reported(), up.allowance(0), up.paused_for(0)),
            (Some(0), None, Some(60 * SEC)),
            "expected a 200 saying 0 to win over an older 3 too, its pause kept, no allowance"
        );
    }

    #[test]
    fn calls_sent_later_and_still_out_come_off_the_allowance() {
        let mut up = Upstream::default();
        let seqs: Vec<u64> = (0..4).map(|_| up.spend(1)).collect();
        let h = headers(&[("x-ratelimit-remaining", "5".into()), reset_in(60)]);
        up.read(false, &h, Some(seqs[0]), 0, wall());
        assert_eq!(
            up.allowance(0),
            Some(2),
            "expected 5 remaining less the 3 calls sent after it and still out"
        );
        let h = headers(&[("x-ratelimit-remaining", "2".into()), reset_in(60)]);
        up.read(false, &h, Some(seqs[1]), 0, wall());
        assert_eq!(up.allowance(0), Some(0), "expected nothing left");
        assert_eq!(
            (up.paused_for(0), up.waits_for_landing(1, 0)),
            (None, true),
            "expected calls out using up what remains to hold the next call, not pause"
        );
    }

    #[test]
    fn a_constant_remaining_in_fresh_answers_never_pauses() {
        let mut up = Upstream::default();
        for i in 0..10 {
            let now = i * SEC;
            assert_eq!(up.blocked(1, now), None, "call {i}: expected it to go");
            let seq = up.spend(1);
            let h = headers(&[("x-ratelimit-remaining", "2".into()), reset_in(30)]);
            up.read(false, &h, Some(seq), now, wall());
            assert_eq!(
                up.allowance(now),
                Some(2),
                "call {i}: expected the fresh report's 2, not a local count down"
            );
        }
    }

    #[test]
    fn calls_in_flight_using_up_a_constant_remaining_never_pause() {
        // An upstream that always answers `Remaining: 2`, an hour from its reset, with three
        // calls out at a time: the third waits for an answer, none ever pauses.
        let mut up = Upstream::default();
        let h = headers(&[("x-ratelimit-remaining", "2".into()), reset_in(3600)]);
        let first = up.spend(1);
        up.read(false, &h, Some(first), 0, wall());
        for round in 0..5 {
            let (a, b) = (up.spend(1), up.spend(1));
            assert!(
                up.blocked(1, 0).is_none() && up.waits_for_landing(1, 0),
                "round {round}: expected a third call held for a landing, not refused"
            );
            up.read(false, &h, Some(a), 0, wall());
            up.read(false, &h, Some(b), 0, wall());
            assert_eq!(
                (up.paused_for(0), up.alarms()),
                (None, 0),
                "round {round}: expected no pause, the upstream never said 0"
            );
        }
    }

    #[test]
    fn a_real_countdown_is_obeyed_exactly() {
        let mut up = Upstream::default();
        let first = up.spend(1);
        let h = |left: u64| headers(&[("x-ratelimit-remaining", left.to_string()), reset_in(60)]);
        up.read(false, &h(3), Some(first), 0, wall());
        let out: Vec<u64> = (0..3).map(|_| up.spend(1)).collect();
        assert!(
            up.waits_for_landing(1, 0),
            "expected the three calls out to use up the 3 left"
        );
        // Answered in any order, what they say leaves nothing for a fourth call.
        for (seq, left) in [(out[1], 1), (out[0], 2), (out[2], 0)] {
            up.read(false, &h(left), Some(seq), 0, wall());
            assert!(
                up.blocked(1, 0).is_some() || up.waits_for_landing(1, 0),
                "after the answer saying {left}: expected no fourth call"
            );
        }
        assert_eq!(
            up.reported(),
            Some(0),
            "expected the last-sent call's 0 shown"
        );
    }

    #[test]
    fn until_a_first_answer_one_call_goes_alone() {
        let mut up = Upstream::default();
        assert!(
            !up.waits_for_landing(1, 0),
            "expected the first call free to go"
        );
        let first = up.spend(1);
        assert!(
            up.waits_for_landing(1, 0),
            "expected the others held while it is out"
        );
        up.read(false, &HeaderMap::new(), Some(first), 0, wall());
        up.spend(1);
        assert!(
            !up.waits_for_landing(1, 0),
            "expected an answer without rate fields to leave the pacing to the shares"
        );

        let mut up = Upstream::default();
        let first = up.spend(1);
        up.read(true, &HeaderMap::new(), Some(first), 0, wall());
        up.spend(1);
        assert!(
            up.waits_for_landing(1, 0),
            "expected a limit answer to leave the count unknown: the next call goes alone"
        );
        let mut up = Upstream::default();
        let first = up.spend(1);
        up.done(first);
        up.spend(1);
        assert!(
            up.waits_for_landing(1, 0),
            "expected a failed call to teach nothing"
        );
    }

    #[test]
    fn a_call_counted_before_an_earlier_sent_one_never_lets_more_out_than_remain() {
        let h = |left: u64| headers(&[("x-ratelimit-remaining", left.to_string()), reset_in(60)]);
        let mut up = Upstream::default();
        let first = up.spend(1);
        up.read(false, &h(10), Some(first), 0, wall());
        // The upstream counts b before a (9 left) and answers it while a is still out.
        let (a, b) = (up.spend(1), up.spend(1));
        up.read(false, &h(9), Some(b), 0, wall());
        assert_eq!(
            up.allowance(0),
            Some(8),
            "expected a, sent earlier but still out, off the 9 b left"
        );
        up.read(false, &h(8), Some(a), 0, wall());
        assert_eq!(up.allowance(0), Some(8), "expected a's own count");

        // Counted in the other order (b last, 8 left), b's answer lands last.
        let mut up = Upstream::default();
        let first = up.spend(1);
        up.read(false, &h(10), Some(first), 0, wall());
        let (a, b) = (up.spend(1), up.spend(1));
        up.read(false, &h(9), Some(a), 0, wall());
        up.read(false, &h(8), Some(b), 0, wall());
        up.read(false, &h(9), None, 0, wall());
        assert_eq!(
            up.allowance(0),
            Some(8),
            "expected no report to raise the count above the lowest one of the window"
        );
    }

    /// An upstream that counts each call some time after it is sent and answers some time
    /// after that, in any order: no call ever goes past its limit, and none stalls (every
    /// call it allows is sent, and once all have landed the count is the upstream's own).
    #[test]
    fn jittered_counting_and_answers_never_pass_the_limit_nor_stall() {
        for seed in 0..300 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let limit = rng.u64(3..40);
            let h = |left: u64| {
                headers(&[
                    ("x-ratelimit-limit", limit.to_string()),
                    ("x-ratelimit-remaining", left.to_string()),
                    reset_in(3600),
                ])
            };
            let mut up = Upstream::default();
            let (mut used, mut over) = (0, 0);
            let (mut sent, mut counted): (Vec<u64>, Vec<(u64, u64)>) = (Vec::new(), Vec::new());
            for _ in 0..10_000 {
                match rng.u8(..3) {
                    0 if up.blocked(1, 0).is_none() && !up.waits_for_landing(1, 0) => {
                        sent.push(up.spend(1));
                    }
                    1 if !sent.is_empty() => {
                        let seq = sent.swap_remove(rng.usize(..sent.len()));
                        if used < limit {
                            used += 1;
                            counted.push((seq, limit - used));
                        } else {
                            over += 1;
                            up.read(true, &h(0), Some(seq), 0, wall());
                        }
                    }
                    2 if !counted.is_empty() => {
                        let (seq, left) = counted.swap_remove(rng.usize(..counted.len()));
                        up.read(false, &h(left), Some(seq), 0, wall());
                    }
                    _ => {}
                }
            }
            assert_eq!(over, 0, "seed {seed}: expected no call past the limit");
            assert!(
                sent.is_empty() && counted.is_empty(),
                "seed {seed}: expected every call landed"
            );
            assert_eq!(
                (used, up.paused_for(0).is_some()),
                (limit, true),
                "seed {seed}: expected the whole limit used, then the upstream's 0 obeyed"
            );
        }
    }

    /// The simulator's upstream over many windows: 30 calls per fixed 5 s window, each
    /// window begun by the first call counted after the last one ended, every call counted
    /// up to a second after it is sent (so calls sent late in one window open the next
    /// before the gateway's own reckoning of it) and answered up to a second after, `Reset` in whole
    /// Unix seconds rounded up, a limit answer's `Reset` left out every other time. The
    /// gateway sends whenever it is let: over a minute no call meets the limit, and the
    /// calls keep going.
    #[test]
    fn calls_counted_late_across_window_starts_never_pass_the_limit() {
        const LIMIT: u64 = 30;
        const PERIOD: u64 = 5 * SEC;
        // Wall time at budget clock 0, off a whole second so rounding up matters.
        let base = UNIX_EPOCH + Duration::from_millis(1_704_067_200_400);
        for seed in 0..40 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut up = Upstream::default();
            // (counted at, seq), and (answered at, seq, remaining or None over the limit,
            // reset as the upstream names it).
            let mut sent: Vec<(u64, u64)> = Vec::new();
            let mut counted: Vec<(u64, u64, Option<u64>, u64)> = Vec::new();
            let (mut start, mut used, mut refused) = (None::<u64>, 0, 0u64);
            let (mut calls, mut over) = (0u64, 0u64);
            let mut now = 0;
            while now < 60 * SEC {
                sent.sort_unstable();
                while sent.first().is_some_and(|(at, _)| *at <= now) {
                    let (at, seq) = sent.remove(0);
                    if start.is_none_or(|s| at >= s + PERIOD) {
                        (start, used, refused) = (Some(at), 0, 0);
                    }
                    let end = start.expect("a window") + PERIOD;
                    let wall = base + Duration::from_nanos(end);
                    let unix = wall.duration_since(UNIX_EPOCH).expect("after 1970");
                    let reset = unix.as_secs() + u64::from(unix.subsec_nanos() > 0);
                    let left = (used < LIMIT).then(|| {
                        used += 1;
                        LIMIT - used
                    });
                    if left.is_none() {
                        over += 1;
                        refused += 1;
                    }
                    let reset = if left.is_none() && refused % 2 == 0 {
                        0
                    } else {
                        reset
                    };
                    counted.push((at + rng.u64(0..=SEC), seq, left, reset));
                }
                counted.sort_unstable();
                while counted.first().is_some_and(|(at, ..)| *at <= now) {
                    let (_, seq, left, reset) = counted.remove(0);
                    let mut fields = vec![
                        ("x-ratelimit-limit", LIMIT.to_string()),
                        ("x-ratelimit-remaining", left.unwrap_or(0).to_string()),
                    ];
                    if reset > 0 {
                        fields.push(("x-ratelimit-reset", reset.to_string()));
                    }
                    let wall = base + Duration::from_nanos(now);
                    up.read(left.is_none(), &headers(&fields), Some(seq), now, wall);
                }
                for _ in 0..3 {
                    if up.blocked(1, now).is_some() || up.waits_for_landing(1, now) {
                        break;
                    }
                    let seq = up.spend(1);
                    calls += 1;
                    sent.push((now + rng.u64(0..=SEC), seq));
                }
                now += 10_000_000;
            }
            assert_eq!(
                over, 0,
                "seed {seed}: expected no limit answer, saw {over} in {calls} calls"
            );
            assert!(
                calls >= LIMIT * 12 * 6 / 10,
                "seed {seed}: expected most of the 12 windows' calls used, saw {calls}"
            );
        }
    }

    /// The real API gives `X-RateLimit-Reset` in whole seconds, rounded down: a window that
    /// really ends 5.6 s from now is said to end in 5 s (or at the Unix second it ends in).
    /// Neither the pause after a limit answer nor the new window's count may begin before
    /// 5.6 s, and both begin within the second after the one named.
    #[test]
    fn a_reset_in_whole_seconds_is_read_as_the_end_of_that_second() {
        // Budget clock 0 is 0.2 s past a whole wall second; the window ends at 5.6 s.
        let base = wall() + Duration::from_millis(200);
        let real_end = 5_600_000_000;
        let epoch = (1_704_067_200 + 5).to_string();
        for reset in ["5".to_string(), epoch] {
            let h = |left: &str| {
                headers(&[
                    ("x-ratelimit-limit", "3".into()),
                    ("x-ratelimit-remaining", left.into()),
                    ("x-ratelimit-reset", reset.clone()),
                ])
            };
            let mut up = Upstream::default();
            let first = up.spend(1);
            up.read(true, &h("0"), Some(first), 0, base);
            assert!(
                up.blocked(1, real_end - 1).is_some(),
                "Reset {reset}: expected the limit answer's pause to last past 5.6 s, saw                  it end at {:?} ns",
                up.paused_for(0)
            );
            assert_eq!(
                up.blocked(1, real_end + SEC),
                None,
                "Reset {reset}: expected the pause over within the second after the one named"
            );

            let mut up = Upstream::default();
            let first = up.spend(1);
            up.read(false, &h("2"), Some(first), 0, base);
            // Two calls out use up the window; the next window's count must wait for 5.6 s.
            let _out = (up.spend(1), up.spend(1));
            assert_eq!(
                up.allowance(real_end - 1),
                Some(0),
                "Reset {reset}: expected no new window's count before 5.6 s"
            );
            assert_eq!(
                up.allowance(real_end + SEC),
                Some(1),
                "Reset {reset}: expected the new window (3 less the 2 out) within the second \
                 after the one named"
            );
        }
    }

    #[test]
    fn a_missing_reset_keeps_the_known_window() {
        let mut up = Upstream::default();
        let h = headers(&[("x-ratelimit-remaining", "9".into()), reset_in(30)]);
        up.read(false, &h, None, 0, wall());
        let h = headers(&[("x-ratelimit-remaining", "4".into())]);
        up.read(false, &h, None, SEC, wall());
        assert_eq!(up.allowance(SEC), Some(4), "expected the fresher count");
        assert_eq!(up.blocked(5, SEC), Some(29 * SEC), "expected the old reset");
    }
}
