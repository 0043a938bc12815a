//! The budget every replica shares (`budget.backend = "redis"`): the local ledger's GCRA
//! bookings, made by one Lua script (`redis.lua`) in Redis so all replicas spend one global
//! share and one per client, on Redis's clock. The fallback when Redis is slow or gone is in
//! `fallback`; README "How the budget decides" and "Running several replicas" say more.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use ::redis::Script;

mod fallback;

use super::gcra::quota;
use super::ledger::{Ledger, Refusal};
use super::upstream::Seed;
use super::{Admitted, Budget, BudgetSpec, ClientSpec, Rejected, Share, Ticket, Which};
use crate::replicas::{Redis, Unavailable};
use fallback::Return;

/// The one script. Modes: `take` (book, or refuse), `return` (give back a booking nothing
/// was booked after), `refund` (the same for an admitted call that was not sent, which also
/// leaves the flight and gives its cells back to the allowance), `pause` (extend the shared
/// upstream pause), `seen` (an upstream
/// answer: the cells it leaves, less every replica's calls in flight), `done` (a call ended
/// without an answer), `resume` (end the pause by hand), `peek` (what pause and allowance
/// are in force, for a paused replica and `/admin/status`), `learning` (whether this
/// replica is to send the one call that learns the upstream's count). KEYS: the global TAT,
/// the client's TAT, the pause deadline, the upstream's allowance (cells left, expiring at
/// its reset), the cells in flight on every replica (one leased record per replica, see
/// [`Word`]), the resume count (one more each time an
/// operator ends the pause, so every replica can tell its own copy of a pause was ended),
/// the marker of a replica's learning call out, the mark that some replica learnt (with
/// the limit and window it learnt), the blind pause's probe (due, or out until when),
/// when the window the replicas assumed began (while the upstream has named none of it),
/// and the shared time every take has booked on the global share so far (only growing: a
/// replica back from its fallback tells from it what the others booked meanwhile). A TAT
/// at or before now means a full bucket, so keys expire once they hold nothing but
/// the past.
const LUA: &str = include_str!("redis.lua");

static SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LUA));

/// How long a replica's marker says its learning call is out, at most: past it (an answer
/// lost, a replica gone) another replica may send one.
const LEARNING_MARK: Duration = Duration::from_secs(5);

/// How long the probe after a blind pause holds every replica's calls, at most: past it (an
/// answer lost, a replica gone) the next call is the probe.
const PROBE_MARK: Duration = Duration::from_secs(30);

/// How often a replica waiting for another's learning call asks Redis again.
const LEARNING_POLL: Duration = Duration::from_millis(25);

/// How long past the upstream timeout a call admitted here may still be out (the token's
/// wait before it): what bounds a believable count of calls in flight.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// How long a replica's record of its calls out outlives its last word. A replica with
/// calls out renews it every [`BEAT`], so one killed with calls out stops holding the
/// others' allowance within this, however long its calls could have lasted.
const LEASE: Duration = Duration::from_secs(3);

/// How often a replica with calls out renews its record's lease.
const BEAT: Duration = Duration::from_secs(1);

/// The upstream timeout assumed until [`Budget::set_call_deadline`] names the configured one.
const DEFAULT_CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The shared budget's word to a replica that knows nothing of the upstream's count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Learning {
    /// Another replica learnt it: take the shared state as known.
    Known,
    /// This replica sends the call that learns it.
    Mine,
    /// Another replica's learning call is out: wait for its answer.
    Other,
}

/// Runs the script in `mode` on `keys` with `args`: the one place a call is marshalled.
/// Every answer ends with what the run repaired (see [`report_repairs`]), which is said
/// here and taken off: the caller gets the mode's own answer.
async fn run_script(
    redis: &Redis,
    keys: &[String],
    mode: &str,
    args: &[String],
) -> Result<Vec<i64>, Unavailable> {
    let mut raw: Vec<i64> = redis
        .run_budget(|mut conn| async move {
            let mut call = SCRIPT.prepare_invoke();
            for key in keys {
                call.key(key);
            }
            call.arg(mode);
            for arg in args {
                call.arg(arg);
            }
            call.invoke_async(&mut conn).await
        })
        .await?;
    if raw.len() >= 3 {
        let wrong = raw.pop().unwrap_or(0);
        let garbled = raw.pop().unwrap_or(0);
        let fixed = raw.pop().unwrap_or(0);
        report_repairs(
            redis,
            keys,
            Found {
                fixed,
                garbled,
                wrong,
            },
        );
    }
    Ok(raw)
}

/// What a script run found in its keys that no replica writes, one bit per key (see the
/// script's head).
struct Found {
    /// A value past its bound (cut back to it), or a marker no replica sets (dropped).
    fixed: i64,
    /// Text that does not read as what is stored there at all (dropped).
    garbled: i64,
    /// Another type than a string (deleted).
    wrong: i64,
}

/// Says what a script run found in `keys` that no replica writes (see [`Found`]), each in
/// the words that fit it: a value that does not parse is unreadable, not "further ahead".
fn report_repairs(redis: &Redis, keys: &[String], found: Found) {
    for (i, key) in keys.iter().enumerate().take(63) {
        let bit = 1i64 << i;
        let what = if found.wrong & bit != 0 {
            "the key holds another type than the string the budget writes (WRONGTYPE); it \
             was deleted and the shared budget goes on as if it were absent"
        } else if found.garbled & bit != 0 {
            "the value there is unreadable (not a number, count or record any replica \
             writes); it was dropped and the shared budget goes on as if it were absent"
        } else if found.fixed & bit == 0 {
            continue;
        } else if key.ends_with(":budget:learning") {
            "a learning-call marker no replica sets (another value, no expiry, or a longer \
             one than any replica sets); it was deleted"
        } else if key.ends_with(":budget:in_flight") {
            "the calls in flight there are more, or their leases longer, than any fleet's \
             replicas hold; the records past the bound were dropped"
        } else if key.ends_with(":budget:probe") {
            "the blind pause's probe was marked out for longer than any replica's probe \
             lasts; it was cut back to that bound"
        } else {
            "the budget state there is further ahead than any replica books (past what the \
             shares or the upstream's window allow); it was cut back to that bound"
        };
        redis.repaired(key, what);
    }
}

/// The shared backend's state inside a [`Budget`].
pub(crate) struct Shared {
    redis: Redis,
    replicas: NonZeroU32,
    /// The configured spec; while on the fallback the ledger holds its divided form.
    full: Mutex<BudgetSpec>,
    /// On the local fallback. Flipped only under the ledger lock, together with the
    /// ledger's reconfiguration, so both always agree.
    local: AtomicBool,
    /// Where the shared budget stood when the fallback began (see `fallback`).
    cut: Mutex<fallback::Cut>,
    /// `budget:spent` as the last take answered it (-1: none yet, or Redis had none).
    spent_seen: AtomicI64,
    /// The end of the last upstream pause pushed to Redis (budget clock), to push each once.
    pushed_pause: AtomicU64,
    /// The shared resume count this replica has acted on: a different count in Redis means
    /// an operator ended the pause (on any replica), so this replica's copy of it ends too.
    resumes_seen: std::sync::Arc<AtomicU64>,
    /// This replica's name on its record of calls out (letters and digits).
    id: String,
    /// The number of this replica's next word, so Redis keeps only the newest.
    words: AtomicU64,
    /// How long a call admitted here may be out, in µs (the upstream timeout and a margin).
    out_for_us: AtomicU64,
    /// The lease end (Redis clock, µs) Redis last gave this replica's record: a record
    /// ending before it was set back (Redis restored from an older snapshot).
    lease_end: AtomicU64,
    /// The cells Redis last said this replica's record counts: while any, the beat goes
    /// on (a report lost with a killed connection leaves its call counted out there, as
    /// the count it would have lowered never was).
    counted: AtomicU64,
    /// Wakes the beat (see [`BEAT`]) when a call goes out.
    beat: std::sync::Arc<tokio::sync::Notify>,
    /// What this replica brought back from its fallback and has yet to hand Redis.
    back: Mutex<Return>,
}

/// A replica's word on its own calls out, sent with every script run about them: its id,
/// the word's number (taken with the count, under the ledger lock, so numbers order the
/// words), its cells out, how long its record holds without another word, the cells it
/// last knew out on the other replicas, the number its next call takes, and the call the
/// run is about (its number, whether a take booked it in Redis, its cost). A record Redis
/// lost is based again on the count of the replica's next word (the others' calls it knew
/// of held out a moment, until they have based theirs), and a replica that says no more
/// (killed) holds nothing past its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Word([String; 9]);

/// The call a [`Word`] is about: its sequence number, whether a take booked it in Redis,
/// and its cost.
pub(super) type About = Option<(u64, bool, u64)>;

/// The pause and the dry allowance Redis holds, as every replica sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SharedPause {
    /// Microseconds of the shared upstream pause left (0: none).
    pub(crate) pause_us: u64,
    /// Microseconds until the shared allowance, now empty, renews (0: not empty).
    pub(crate) dry_us: u64,
    /// The shared allowance in force (calls the upstream still allows before its reset).
    pub(crate) allowance: Option<u64>,
}

impl Shared {
    pub(crate) fn new(redis: Redis, replicas: NonZeroU32, spec: BudgetSpec) -> Shared {
        Shared {
            replicas,
            full: Mutex::new(spec),
            local: AtomicBool::new(false),
            cut: Mutex::new(fallback::Cut::default()),
            spent_seen: AtomicI64::new(-1),
            pushed_pause: AtomicU64::new(0),
            resumes_seen: std::sync::Arc::new(AtomicU64::new(0)),
            id: redis
                .id()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .collect(),
            words: AtomicU64::new(1),
            out_for_us: AtomicU64::new(lease_us(DEFAULT_CALL_DEADLINE)),
            lease_end: AtomicU64::new(0),
            counted: AtomicU64::new(0),
            beat: std::sync::Arc::new(tokio::sync::Notify::new()),
            back: Mutex::new(Return::default()),
            redis,
        }
    }

    /// This replica's word about the call `about`, taken under the ledger lock once the
    /// ledger shows the call's event (spent, or ended), at `now` (budget clock).
    pub(super) fn word(&self, ledger: &Ledger, now: u64, about: About) -> Word {
        let (call, booked, cost) = match about {
            Some((seq, booked, cost)) => (seq.to_string(), u8::from(booked), cost),
            None => ("-1".to_string(), 0, 0),
        };
        let out = ledger.upstream.out();
        if out > 0 {
            self.beat.notify_one();
        }
        Word([
            self.id.clone(),
            self.words.fetch_add(1, Ordering::AcqRel).to_string(),
            out.to_string(),
            LEASE.as_micros().to_string(),
            ledger.upstream.others_out(now).to_string(),
            ledger.upstream.next_seq().to_string(),
            call,
            booked.to_string(),
            cost.to_string(),
        ])
    }

    /// Keeps `more` for the next take to hand Redis.
    fn hand_over(&self, more: Return) {
        self.back
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .add(more);
    }

    /// What the next take hands Redis (and no other take).
    fn handed_over(&self) -> Return {
        std::mem::take(&mut *self.back.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(super) fn set_call_deadline(&self, deadline: Duration) {
        self.out_for_us.store(lease_us(deadline), Ordering::Release);
    }

    /// Keeps the latest lease end Redis gave this replica's record, and the cells it counts.
    fn leased_until(&self, end: i64, cells: Option<i64>) {
        if let Ok(end) = u64::try_from(end) {
            self.lease_end.fetch_max(end, Ordering::AcqRel);
        }
        if let Some(cells) = cells {
            let cells = u64::try_from(cells).unwrap_or(0);
            self.counted.store(cells, Ordering::Release);
            if cells > 0 {
                self.beat.notify_one();
            }
        }
    }

    /// Renews this replica's lease while it has calls out (or Redis counts some on its
    /// record), every [`BEAT`]: a replica killed
    /// with calls out stops holding the others' allowance within [`LEASE`]. Ends with the
    /// budget, or when the link stops.
    pub(super) fn spawn_beat(budget: &Budget) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let Some(wake) = budget.inner.shared.as_ref().map(|s| s.beat.clone()) else {
            return;
        };
        let weak = std::sync::Arc::downgrade(&budget.inner);
        let redis = budget.inner.shared.as_ref().map(|s| s.redis.clone());
        let task = runtime.spawn(async move {
            loop {
                let Some(budget) = weak.upgrade().map(|inner| Budget { inner }) else {
                    return;
                };
                let Some(shared) = budget.inner.shared.as_ref() else {
                    return;
                };
                let word = {
                    let ledger = budget.ledger();
                    let counted = shared.counted.load(Ordering::Acquire) > 0;
                    ((ledger.upstream.out() > 0 || counted) && shared.redis.is_prompt())
                        .then(|| shared.word(&ledger, budget.inner.clock.nanos(), None))
                };
                let Some(word) = word else {
                    drop(budget);
                    wake.notified().await;
                    continue;
                };
                let keys = shared.keys("-");
                let seen = shared.lease_end.load(Ordering::Acquire).to_string();
                let args: Vec<String> = word.0.into_iter().chain([seen]).collect();
                if let Ok(answer) = run_script(&shared.redis, &keys, "beat", &args).await {
                    if let Some(&end) = answer.first() {
                        shared.leased_until(end, answer.get(1).copied());
                    }
                }
                drop(budget);
                tokio::time::sleep(BEAT).await;
            }
        });
        // Stopped with the link's own tasks (at shutdown).
        if let Some(redis) = redis {
            redis.remember(task);
        }
    }

    fn full(&self) -> BudgetSpec {
        self.full
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn divided(&self) -> BudgetSpec {
        divide(self.full(), self.replicas)
    }

    /// A new configuration (reload): the ledger takes the form that is in force.
    pub(crate) fn reconfigure(&self, ledger: &mut Ledger, spec: BudgetSpec) {
        *self.full.lock().unwrap_or_else(PoisonError::into_inner) = spec;
        let in_force = if self.local.load(Ordering::Acquire) {
            self.divided()
        } else {
            self.full()
        };
        ledger.reconfigure(in_force);
    }

    /// Books on Redis. `None`: Redis failed or answered nonsense; the caller falls back.
    async fn take(
        &self,
        ask: &Ask,
        book_own: bool,
        max_wait: u64,
        back: Return,
        word: Word,
    ) -> Option<(Reply, Stated)> {
        let own = ask.own.filter(|_| book_own);
        let keys = self.keys(&ask.client);
        let owed = back.owed;
        let args = [
            ask.cost.to_string(),
            ask.global.interval_us.to_string(),
            ask.global.usable.to_string(),
            own.map_or(0, |o| o.interval_us).to_string(),
            own.map_or(0, |o| o.usable).to_string(),
            (max_wait / 1000).to_string(),
            owed.to_string(),
            ask.longest_us.to_string(),
            ask.limit.to_string(),
            ask.window_ms.to_string(),
            PROBE_MARK.as_micros().to_string(),
        ];
        let ms = |ns: u64| (ns / 1_000_000).to_string();
        let seed = match ask.seed {
            Some(seed) => [
                seed.left.to_string(),
                ms(seed.reset_in),
                seed.since.map_or("-1".into(), ms),
            ],
            None => ["-1".into(), "0".into(), "-1".into()],
        };
        let heard = self.resumes_seen.load(Ordering::Acquire).to_string();
        let args: Vec<String> = word
            .0
            .into_iter()
            .chain(args)
            .chain(seed)
            .chain([
                heard,
                back.apart.to_string(),
                u8::from(back.rebase).to_string(),
                self.lease_end.load(Ordering::Acquire).to_string(),
                self.out_for_us.load(Ordering::Acquire).to_string(),
                (ask.longest_wait / 1000).to_string(),
                (ask.max_wait / 1000).to_string(),
                ask.period_us.to_string(),
                back.ahead.to_string(),
                back.since.to_string(),
            ])
            .collect();
        let raw = run_script(&self.redis, &keys, "take", &args).await.ok()?;
        if let Some(&end) = raw.get(11) {
            self.leased_until(end, raw.get(12).copied());
        }
        if let Some(&spent) = raw.get(13) {
            self.spent_seen.store(spent.max(-1), Ordering::Release);
        }
        let reply = Reply::parse(&raw);
        if reply.is_none() {
            tracing::error!(?raw, "budget: unexpected answer from the Redis script");
        }
        Some((reply?, Stated::parse(&raw)))
    }

    fn keys(&self, client: &str) -> [String; 11] {
        [
            self.redis.key("budget:global"),
            self.redis.key(&format!("budget:client:{client}")),
            self.redis.key("budget:pause"),
            self.redis.key("budget:upstream_left"),
            self.redis.key("budget:in_flight"),
            self.redis.key("budget:resumes"),
            self.redis.key("budget:learning"),
            self.redis.key("budget:learned"),
            self.redis.key("budget:probe"),
            self.redis.key("budget:assumed"),
            self.redis.key("budget:spent"),
        ]
    }

    /// Asks whether this replica is to send the call that learns the upstream's count (see
    /// [`Learning`]); `None` when Redis did not answer (the replica then goes alone).
    async fn learning(&self) -> Option<Learning> {
        let keys = self.keys("-");
        let mark = LEARNING_MARK.as_millis().to_string();
        let raw = run_script(&self.redis, &keys, "learning", &[mark])
            .await
            .ok()?;
        match raw.first() {
            Some(0) => Some(Learning::Mine),
            Some(1) => Some(Learning::Known),
            Some(2) => Some(Learning::Other),
            _ => {
                tracing::error!(?raw, "budget: unexpected answer from the Redis script");
                None
            }
        }
    }

    /// Reads the shared pause and allowance; `None` when Redis did not answer. When the
    /// shared resume count moved since this replica last looked, an operator ended the pause
    /// somewhere: `on_resumed` runs (ending this replica's own copy) before the answer.
    /// Pauses are cut to `longest_us`, the upstream's window, as admission cuts them, so
    /// what is shown is what is enforced.
    async fn peek(&self, longest_us: u64, on_resumed: impl FnOnce()) -> Option<SharedPause> {
        let keys = self.keys("-");
        let raw = run_script(&self.redis, &keys, "peek", &[longest_us.to_string()])
            .await
            .ok()?;
        let [pause, dry, resumes, allowance] = raw[..] else {
            tracing::error!(?raw, "budget: unexpected answer from the Redis script");
            return None;
        };
        let resumes = u64::try_from(resumes).unwrap_or(0);
        if self.resumes_seen.swap(resumes, Ordering::AcqRel) != resumes {
            self.pushed_pause.store(0, Ordering::Release);
            on_resumed();
        }
        Some(SharedPause {
            pause_us: u64::try_from(pause).unwrap_or(0),
            dry_us: u64::try_from(dry).unwrap_or(0),
            allowance: u64::try_from(allowance).ok(),
        })
    }

    /// Runs one of the script's bookkeeping modes in the background (best effort: it runs
    /// on the answer path, and a lost one only leaves the shared allowance more cautious or
    /// lets the next answer correct it).
    fn tell(&self, mode: &'static str, word: Word, args: Vec<String>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let args: Vec<String> = word.0.into_iter().chain(args).collect();
        let keys = self.keys("-");
        let redis = self.redis.clone();
        runtime.spawn(async move {
            let _ = run_script(&redis, &keys, mode, &args).await;
        });
    }

    /// Gives back bookings nothing was booked after (best effort, in the background: it
    /// runs from `Drop`, and a lost give-back only wastes cells, never exceeds a share).
    fn give_back(&self, client: &str, own: Option<Booked>, global: Option<Booked>, word: Word) {
        self.hand_back(client, own, global, None, word);
    }

    /// Gives back what an admitted call of `cost` booked, as [`Shared::give_back`] does, and
    /// takes the call out of the shared flight: it was not sent (if it was to be the probe
    /// after a blind pause, the next call is).
    pub(super) fn refund(
        &self,
        client: &str,
        own: Option<Booked>,
        global: Booked,
        cost: NonZeroU32,
        probe: bool,
        word: Word,
    ) {
        self.hand_back(client, own, Some(global), Some((cost, probe)), word);
    }

    /// `return` (or, with the call's cost and whether it was the probe, `refund`) in the
    /// background.
    fn hand_back(
        &self,
        client: &str,
        own: Option<Booked>,
        global: Option<Booked>,
        refund: Option<(NonZeroU32, bool)>,
        word: Word,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // `return` takes the client's TAT first and the global one second.
        let mut keys = self.keys(client);
        keys.swap(0, 1);
        let pair = |b: Option<Booked>| b.map_or([0, 0], |b| [b.after, b.before]);
        let [oa, ob] = pair(own);
        let [ga, gb] = pair(global);
        let mode = if refund.is_some() { "refund" } else { "return" };
        let (cost, probe) = refund.map_or((0, false), |(c, p)| (c.get(), p));
        let args = [oa, ob, ga, gb, i64::from(cost), i64::from(probe)].map(|v| v.to_string());
        let args: Vec<String> = word.0.into_iter().chain(args).collect();
        let redis = self.redis.clone();
        runtime.spawn(async move {
            let _ = run_script(&redis, &keys, mode, &args).await;
        });
    }

    /// Pushes an upstream pause this replica learnt to Redis, once per new deadline.
    fn share_pause(&self, now: u64, paused_for: Option<u64>) {
        let Some(left) = paused_for else {
            return;
        };
        let until = now.saturating_add(left);
        // Pauses are whole seconds or more; a millisecond of tolerance avoids re-pushing
        // the same deadline seen through two answers. An earlier one is pushed too: the
        // same end read sooner after the upstream named it (the script keeps the earlier).
        if until.abs_diff(self.pushed_pause.load(Ordering::Acquire)) <= 1_000_000 {
            return;
        }
        self.pushed_pause.store(until, Ordering::Release);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let keys = self.keys("-");
        let redis = self.redis.clone();
        let seen = self.resumes_seen.clone();
        runtime.spawn(async move {
            let answer = run_script(&redis, &keys, "pause", &[(left / 1000).to_string()]).await;
            // This pause is newer than every resume so far: none of them ends it.
            if let Some(&resumes) = answer.ok().as_ref().and_then(|a| a.get(1)) {
                seen.store(u64::try_from(resumes).unwrap_or(0), Ordering::Release);
            }
        });
    }
}

impl Drop for Shared {
    /// The beat waiting for a call to go out ends: there is no budget left to renew.
    fn drop(&mut self) {
        self.beat.notify_one();
    }
}

/// How long a call that ends within `deadline` may be out, in µs.
fn lease_us(deadline: Duration) -> u64 {
    u64::try_from((deadline + LEASE_MARGIN).as_micros()).unwrap_or(u64::MAX)
}

/// What one replica may spend alone: every share divided by the replica count (at least
/// one cell of rate and of burst, so a replica can always make progress).
fn divide(mut spec: BudgetSpec, replicas: NonZeroU32) -> BudgetSpec {
    fn part(s: &Share, n: u32) -> Share {
        Share {
            limit: NonZeroU32::new(s.limit.get() / n).unwrap_or(NonZeroU32::MIN),
            period: s.period,
            burst: NonZeroU32::new(s.burst.get() / n).unwrap_or(NonZeroU32::MIN),
        }
    }
    let n = replicas.get();
    spec.global = part(&spec.global, n);
    spec.clients = spec
        .clients
        .into_iter()
        .map(|c| ClientSpec {
            share: c.share.as_ref().map(|s| part(s, n)),
            ..c
        })
        .collect();
    spec
}

/// A share as the script sees it: one cell every `interval_us`, `usable` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cells {
    interval_us: u64,
    usable: u32,
}

impl Cells {
    /// The interval is rounded *up* to whole microseconds: a share may come out a hair
    /// slower than configured, never faster.
    fn of(share: &Share, hold: u32) -> Cells {
        let q = quota(share);
        let ns = q.replenish_interval().as_nanos();
        Cells {
            interval_us: u64::try_from(ns.div_ceil(1000)).unwrap_or(u64::MAX).max(1),
            usable: q.burst_size().get().saturating_sub(hold).max(1),
        }
    }
}

/// One admission's terms, taken from the ledger in one critical section.
struct Ask {
    client: String,
    cost: u32,
    max_wait: u64,
    /// The longest wait any client's terms allow (ns): what bounds the global share's
    /// bookings ahead, whatever this call has left of its own.
    longest_wait: u64,
    global: Cells,
    own: Option<Cells>,
    /// The longest pause the upstream's window allows, in µs: no stored pause or expiry
    /// read from Redis waits longer.
    longest_us: u64,
    /// The upstream's learnt `X-RateLimit-Limit` (0: none) and window (ms, 0: none): what
    /// a new window holds once the shared count's window has ended.
    limit: u64,
    window_ms: u64,
    /// What this replica knows of the upstream's window, to seed a shared count Redis
    /// lost.
    seed: Option<Seed>,
    /// The global share's period, in µs: the most debt replicas back from their fallbacks
    /// may have handed over (see `fallback`).
    period_us: u64,
}

impl Ask {
    fn new(ledger: &Ledger, client: &str, cost: NonZeroU32, now: u64) -> Ask {
        let (max_wait, hold) = ledger.terms(client);
        let own = ledger
            .clients
            .get(client)
            .and_then(|c| c.share.as_ref())
            .map(|(share, _)| Cells::of(share, 0));
        Ask {
            client: client.to_string(),
            cost: cost.get(),
            max_wait,
            longest_wait: ledger.longest_wait(),
            global: Cells::of(&ledger.global_share, hold),
            own,
            longest_us: ledger.upstream.longest() / 1000,
            limit: ledger.upstream.limit().unwrap_or(0),
            window_ms: ledger.upstream.window_learnt().map_or(0, |w| w / 1_000_000),
            seed: ledger.upstream.seed(now),
            period_us: u64::try_from(ledger.global_share.period.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// One booking on a Redis key: the TAT before and after it (script microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Booked {
    before: i64,
    after: i64,
    /// The TAT this replica's ledger took when it mirrored the booking (budget clock), 0
    /// when it did not: giving the booking back restores the mirror too, while it still
    /// shows this booking last.
    mirrored: u64,
}

/// What every take's answer ends with: the shared count (`None`: none), the ms to its end,
/// and the cells out on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Stated {
    low: Option<u64>,
    ends_ms: u64,
    out: u64,
}

impl Stated {
    fn parse(raw: &[i64]) -> Stated {
        let at = |i: usize| raw.get(i).copied().unwrap_or(-1);
        Stated {
            low: u64::try_from(at(8)).ok(),
            ends_ms: u64::try_from(at(9)).unwrap_or(0),
            out: u64::try_from(at(10)).unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// Both shares booked: go after `wait` µs; `probe`: as the one probe after a blind
    /// pause, which every replica's other calls wait for.
    Go {
        wait: u64,
        own: Option<Booked>,
        global: Booked,
        now: i64,
        probe: bool,
    },
    /// Only the client's share booked: come back after `wait` µs for the global one.
    Queue {
        wait: u64,
        own: Booked,
        now: i64,
    },
    Refused {
        which: Which,
        wait: u64,
    },
}

impl Reply {
    fn parse(raw: &[i64]) -> Option<Reply> {
        let at = |i: usize| raw.get(i).copied();
        let wait = u64::try_from(at(1)?).ok()?;
        let booked = |i: usize| -> Option<Booked> {
            Some(Booked {
                before: at(i)?,
                after: at(i + 1)?,
                mirrored: 0,
            })
        };
        Some(match at(0)? {
            0 => Reply::Go {
                wait,
                own: booked(2).filter(|b| b.after > 0),
                global: booked(4)?,
                now: at(6)?,
                probe: at(7) == Some(1),
            },
            4 => Reply::Queue {
                wait,
                own: booked(2)?,
                now: at(6)?,
            },
            1 => Reply::Refused {
                which: Which::Global,
                wait,
            },
            2 => Reply::Refused {
                which: Which::Client,
                wait,
            },
            3 => Reply::Refused {
                which: Which::Upstream,
                wait,
            },
            _ => return None,
        })
    }
}

/// What a shared admission in progress holds; given back on drop unless admitted.
struct Hold<'a> {
    budget: &'a Budget,
    shared: &'a Shared,
    client: &'a str,
    cost: u64,
    own: Option<Booked>,
    global: Option<Booked>,
    /// The call's sequence number in the local ledger's upstream flight, once spent there.
    spent: Option<u64>,
    /// The shared budget made it the probe after a blind pause.
    probe: bool,
}

impl Hold<'_> {
    fn keep(&mut self) {
        self.own = None;
        self.global = None;
        self.spent = None;
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let booked = self.own.is_some() || self.global.is_some();
        if booked {
            self.budget.unmirror(self.client, self.own, self.global);
        }
        let (returned, ended) = {
            let mut ledger = self.budget.ledger();
            if let Some(seq) = self.spent {
                ledger.upstream.give_back(seq);
            }
            let now = self.budget.inner.clock.nanos();
            let ended = self
                .spent
                .map(|seq| (seq, self.global.is_some(), self.cost));
            (
                self.shared.word(&ledger, now, None),
                self.shared.word(&ledger, now, ended),
            )
        };
        if booked {
            self.shared
                .give_back(self.client, self.own, self.global, returned);
        }
        if self.spent.is_some() {
            self.budget.inner.landed.notify_waiters();
            // Out of the shared flight (the word says so), and no longer a learning call
            // the other replicas wait for.
            let probe = u8::from(self.probe).to_string();
            self.shared
                .tell("done", ended, vec!["0".into(), "0".into(), probe]);
        }
    }
}

impl Budget {
    /// Admission on the shared budget (see the module docs); falls back to the local ledger
    /// whenever Redis is down or fails, so no request fails because of Redis.
    pub(super) async fn admit_shared(
        &self,
        shared: &Shared,
        client: &str,
        cost: NonZeroU32,
        waited: u64,
        queued: super::Queued<'_>,
    ) -> Result<Admitted, Rejected> {
        if !shared.redis.is_up() {
            return self
                .admit_fallback(shared, client, cost, waited, queued)
                .await;
        }
        let clock = self.inner.clock;
        let arrived = clock.nanos().saturating_sub(waited);
        let held_here = {
            let ledger = self.ledger();
            ledger.upstream.paused_for(arrived).is_some()
                || ledger
                    .upstream
                    .allowance(arrived)
                    .is_some_and(|left| left < u64::from(cost.get()))
        };
        if held_here {
            // An operator may have ended the pause on another replica since this one
            // learnt it: the shared resume count says so.
            self.sync_resumes(shared).await;
        }
        let mut hold = Hold {
            budget: self,
            shared,
            client,
            cost: u64::from(cost.get()),
            own: None,
            global: None,
            spent: None,
            probe: false,
        };
        // The upstream's flight is taken here, under the lock that checks it, so no two
        // calls both go as the one sent to learn what the upstream has left.
        let mut looked_shared = false;
        // Whether Redis said this replica sends the call that learns the upstream's count.
        let mut claimed = false;
        let (ask, seq, word) = loop {
            let landed = self.inner.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            let mut learn_first = false;
            let probe_at = {
                let mut ledger = self.ledger();
                if let Some(more) = shared.come_back(&mut ledger, arrived) {
                    shared.hand_over(more);
                }
                let now = clock.nanos();
                let left = ledger
                    .terms(client)
                    .0
                    .saturating_sub(now.saturating_sub(arrived));
                // The blind pause's probe is due within this caller's wait: it waits for it.
                let probe_at = match ledger.probe_within(left, now) {
                    Some(super::ledger::Later::At(at)) => Some(at),
                    _ => None,
                };
                if probe_at.is_none() {
                    if let Some(wait) = ledger.upstream.blocked(hold.cost, now) {
                        drop(ledger);
                        return Err(self.refuse_shared(client, Which::Upstream, wait));
                    }
                    if !ledger.upstream.waits_for_landing(hold.cost, now) {
                        // Nothing is known of the count and this call would go to learn
                        // it: only one replica sends such a call at a time.
                        learn_first = !claimed && !ledger.upstream.knows();
                        if !learn_first {
                            let seq = ledger.upstream.spend(hold.cost);
                            hold.spent = Some(seq);
                            let about = Some((seq, false, hold.cost));
                            let word = shared.word(&ledger, now, about);
                            break (Ask::new(&ledger, client, cost, now), seq, word);
                        }
                    }
                }
                probe_at
            };
            if learn_first {
                match shared.learning().await {
                    Some(Learning::Known) => self.ledger().upstream.learn(),
                    Some(Learning::Other) => self.await_learning(client, arrived).await?,
                    Some(Learning::Mine) | None => claimed = true,
                }
                continue;
            }
            if let Some(at) = probe_at {
                tokio::time::sleep_until(clock.instant(at)).await;
                continue;
            }
            // Another replica may have learnt the upstream's count already: the shared
            // allowance is its report.
            if !looked_shared {
                looked_shared = true;
                let pause = self.sync_resumes(shared).await;
                if pause.is_some_and(|p| p.allowance.is_some()) {
                    self.ledger().upstream.learn();
                    continue;
                }
            }
            queued(None);
            self.await_landing(landed, client, arrived).await?;
        };
        let left = ask
            .max_wait
            .saturating_sub(clock.nanos().saturating_sub(arrived));
        // What this replica brought back from its fallback goes with one take, and is kept
        // for the next one if this take fails: lost, the calls it sent alone would be lost
        // to the others.
        let back = shared.handed_over();
        let Some((mut reply, stated)) = shared.take(&ask, true, left, back, word).await else {
            shared.hand_over(back);
            // The call spent in the ledger's upstream flight goes back first: left there, the
            // local admission would wait for it to land, and it never goes.
            drop(hold);
            return self
                .admit_fallback(shared, client, cost, waited, queued)
                .await;
        };
        self.mirror_count(stated);
        if let Reply::Queue { wait, own, now } = reply {
            let (_, mirrored) = self.mirror(client, now, None, Some(own.after));
            hold.own = Some(Booked {
                mirrored: mirrored.unwrap_or(0),
                ..own
            });
            queued(None);
            tokio::time::sleep(Duration::from_micros(wait)).await;
            let elapsed = clock.nanos().saturating_sub(arrived);
            let left = ask.max_wait.saturating_sub(elapsed);
            let about = Some((seq, false, hold.cost));
            let word = shared.word(&self.ledger(), clock.nanos(), about);
            let again = shared.take(&ask, false, left, Return::default(), word);
            reply = match again.await {
                Some((r, stated)) => {
                    self.mirror_count(stated);
                    r
                }
                None => {
                    // The client's cells stay booked in Redis: spent, not lost.
                    hold.own = None;
                    drop(hold);
                    return self
                        .admit_fallback(shared, client, cost, waited, queued)
                        .await;
                }
            };
        }
        let (wait, own, global, now) = match reply {
            Reply::Go {
                wait,
                own,
                global,
                now,
                probe,
            } => {
                hold.probe = probe;
                (wait, own, global, now)
            }
            Reply::Refused { which, wait } => {
                self.mirror_refusal(client, &ask, which, wait);
                return Err(self.refuse_shared(client, which, wait.saturating_mul(1000)));
            }
            // A second booking never queues on the client share it did not book.
            Reply::Queue { wait, .. } => {
                return Err(self.refuse_shared(client, Which::Global, wait.saturating_mul(1000)))
            }
        };
        let (mirrored_global, mirrored_own) =
            self.mirror(client, now, Some(global.after), own.map(|o| o.after));
        let global = Booked {
            mirrored: mirrored_global.unwrap_or(0),
            ..global
        };
        if let Some(own) = own {
            hold.own = Some(Booked {
                mirrored: mirrored_own.unwrap_or(0),
                ..own
            });
        }
        hold.global = Some(global);
        let alarms = {
            let ledger = self.ledger();
            let now = clock.nanos();
            shared.share_pause(now, ledger.upstream.paused_for(now));
            ledger.upstream.alarms()
        };
        if wait > 0 {
            let at = tokio::time::Instant::now() + Duration::from_micros(wait);
            queued(Some(at));
            tokio::time::sleep_until(at).await;
        }
        let now = clock.nanos();
        let late_alarm = {
            let ledger = self.ledger();
            (ledger.upstream.alarms() != alarms)
                .then(|| ledger.upstream.paused_for(now))
                .flatten()
        };
        if let Some(pause) = late_alarm {
            return Err(self.refuse_shared(client, Which::Upstream, pause));
        }
        let booked = super::Booked::Shared {
            own: hold.own,
            global,
            probe: hold.probe,
        };
        hold.keep();
        let waited = Duration::from_nanos(now.saturating_sub(arrived));
        self.inner
            .metrics
            .wait
            .with_label_values(&[client])
            .observe(waited.as_secs_f64());
        Ok(Admitted {
            waited,
            ticket: Ticket { seq, cost, booked },
        })
    }

    /// Waits a moment for another replica's learning call to be answered, within what is
    /// left of the client's `max_wait` (at least the learning grace); refuses past it.
    async fn await_learning(&self, client: &str, arrived: u64) -> Result<(), Rejected> {
        let (max_wait, _) = self.ledger().terms(client);
        let patience = max_wait.max(super::ledger::nanos(super::LEARNING_GRACE));
        let waited = self.inner.clock.nanos().saturating_sub(arrived);
        if waited >= patience {
            let wait = super::ledger::nanos(super::LEARNING_RETRY);
            return Err(self.refuse_shared(client, Which::Upstream, wait));
        }
        let left = Duration::from_nanos(patience - waited);
        tokio::time::sleep(LEARNING_POLL.min(left)).await;
        Ok(())
    }

    /// Keeps what a take said of the shared count, for a count Redis may lose later.
    fn mirror_count(&self, stated: Stated) {
        let now = self.inner.clock.nanos();
        let ends_in = stated.ends_ms.saturating_mul(1_000_000);
        self.ledger()
            .upstream
            .mirror(stated.low, ends_in, stated.out, now);
    }

    /// Copies the TATs the script returned into the local ledger, for headers and status;
    /// returns the global and own TATs the ledger took (`None` for a share not mirrored).
    fn mirror(
        &self,
        client: &str,
        redis_now: i64,
        global: Option<i64>,
        own: Option<i64>,
    ) -> (Option<u64>, Option<u64>) {
        let at = |tat: i64| -> u64 {
            let ahead = u64::try_from(tat.saturating_sub(redis_now)).unwrap_or(0);
            self.inner
                .clock
                .nanos()
                .saturating_add(ahead.saturating_mul(1000))
        };
        let mut ledger = self.ledger();
        let global = global.map(|tat| {
            let tat = at(tat);
            ledger.global.mirror(tat);
            tat
        });
        let own = own.and_then(|tat| {
            let tat = at(tat);
            let (_, gcra) = ledger
                .clients
                .get_mut(client)
                .and_then(|c| c.share.as_mut())?;
            gcra.mirror(tat);
            Some(tat)
        });
        (global, own)
    }

    /// Gives bookings back in the local mirror as the script gives them back in Redis (only
    /// while nothing was mirrored after them), at once: the answer that goes out next, such
    /// as a read served by another's call after its own cells were booked, shows the client's
    /// budget with them returned, not spent.
    pub(super) fn unmirror(&self, client: &str, own: Option<Booked>, global: Option<Booked>) {
        let back = |gcra: &mut super::gcra::Gcra, b: Booked| {
            if b.mirrored > 0 && gcra.tat() == b.mirrored {
                let span = u64::try_from(b.after.saturating_sub(b.before)).unwrap_or(0);
                gcra.mirror(b.mirrored.saturating_sub(span.saturating_mul(1000)));
            }
        };
        let mut ledger = self.ledger();
        if let Some(b) = global {
            back(&mut ledger.global, b);
        }
        if let Some(b) = own {
            if let Some((_, gcra)) = ledger
                .clients
                .get_mut(client)
                .and_then(|c| c.share.as_mut())
            {
                back(gcra, b);
            }
        }
    }

    /// A refusal tells the share's state exactly: the script refuses when `cost` cells are
    /// `wait` µs away, so the TAT is `wait` plus the rest of the burst ahead. Mirrored, the
    /// answers this replica gives next say what is really left, not what its last own
    /// admission saw (other replicas may have spent it since).
    fn mirror_refusal(&self, client: &str, ask: &Ask, which: Which, wait: u64) {
        let ahead = |cells: &Cells| -> i64 {
            let rest = u64::from(cells.usable - ask.cost.min(cells.usable));
            let ahead = wait.saturating_add(rest.saturating_mul(cells.interval_us));
            i64::try_from(ahead).unwrap_or(i64::MAX)
        };
        match which {
            Which::Global => {
                self.mirror(client, 0, Some(ahead(&ask.global)), None);
            }
            Which::Client => {
                if let Some(own) = &ask.own {
                    self.mirror(client, 0, None, Some(ahead(own)));
                }
            }
            Which::Upstream => {}
        }
    }

    fn refuse_shared(&self, client: &str, which: Which, wait: u64) -> Rejected {
        self.refuse(client, Refusal { which, wait })
    }

    /// After an upstream answer: this replica's word on its calls out (the answered one
    /// has left), and what the upstream says remains becomes the allowance of every replica.
    pub(super) fn share_upstream_answer(
        &self,
        limited: bool,
        headers: &http::HeaderMap,
        about: About,
    ) {
        let Some(shared) = &self.inner.shared else {
            return;
        };
        let now = self.inner.clock.nanos();
        let wall = std::time::SystemTime::now();
        let (word, (remaining, reset_ms, blind_ms, blind, limit, window_ms)) = {
            let ledger = self.ledger();
            let up = &ledger.upstream;
            let word = shared.word(&ledger, now, about);
            let remaining = header_u64(headers, "x-ratelimit-remaining");
            let remaining = if limited { Some(0) } else { remaining };
            // This answer's own reset, so a report of a window already over is told apart.
            let reset_ms = match super::upstream::named_reset(headers, wall) {
                None => 0,
                Some(None) => -1,
                Some(Some(d)) => {
                    let d = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
                    i64::try_from(d.min(up.longest()).div_ceil(1_000_000)).unwrap_or(i64::MAX)
                }
            };
            let blind_ms = up.blind().div_ceil(1_000_000);
            // A limit answer that left this replica's probe due: a blind pause.
            let blind = limited && up.probe_at(now).is_some();
            let limit = up.limit().unwrap_or(0);
            let window_ms = up.window_learnt().map_or(0, |w| w / 1_000_000);
            if remaining == Some(0) {
                // "Stop" lasts exactly as long as the pause it started here (a Retry-After,
                // else the reset, else the blind minute), never the assumed minute when the
                // upstream named a shorter time; no pause here means the window is new.
                let paused = up.paused_for(now);
                let paused_ms = paused.map_or(0, |p| p.div_ceil(1_000_000));
                let remaining = paused.map(|_| 0);
                let paused_ms = i64::try_from(paused_ms).unwrap_or(i64::MAX);
                (
                    word,
                    (remaining, paused_ms, blind_ms, blind, limit, window_ms),
                )
            } else {
                (
                    word,
                    (remaining, reset_ms, blind_ms, blind, limit, window_ms),
                )
            }
        };
        let remaining = remaining.map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX));
        shared.tell(
            "seen",
            word,
            vec![
                "0".into(),
                remaining.to_string(),
                reset_ms.to_string(),
                blind_ms.to_string(),
                u8::from(!limited).to_string(),
                u8::from(blind).to_string(),
                limit.to_string(),
                window_ms.to_string(),
            ],
        );
    }

    /// A call that ended without an answer leaves the shared flight (if it was `booked`
    /// there), and the count (it may have been counted); if it was the probe after a blind
    /// pause, the next call is.
    pub(super) fn share_call_failed(&self, cost: u64, probe: bool, about: About) {
        if let Some(shared) = &self.inner.shared {
            let probe = u8::from(probe).to_string();
            let ledger = self.ledger();
            let now = self.inner.clock.nanos();
            let word = shared.word(&ledger, now, about);
            drop(ledger);
            let args = vec!["0".into(), "1".into(), probe, cost.to_string()];
            shared.tell("done", word, args);
        }
    }

    /// Ends the shared pause and allowance (`POST /admin/budget/resume`) and counts the
    /// resume, so every other replica ends its own copy of the pause at its next look;
    /// whether Redis held either.
    pub(super) async fn resume_shared(&self) -> bool {
        let Some(shared) = &self.inner.shared else {
            return false;
        };
        shared.pushed_pause.store(0, Ordering::Release);
        let keys = shared.keys("-");
        let deleted = run_script(&shared.redis, &keys, "resume", &[]).await;
        if let Some(&resumes) = deleted.as_ref().ok().and_then(|d| d.get(1)) {
            // This replica has ended its own copy already.
            let resumes = u64::try_from(resumes).unwrap_or(0);
            shared.resumes_seen.store(resumes, Ordering::Release);
        }
        deleted.is_ok_and(|d| d.first().is_some_and(|n| *n > 0))
    }

    /// Ends this replica's copy of the pause if an operator resumed since it last looked;
    /// returns what Redis holds (`None`: not shared, or Redis did not answer).
    async fn sync_resumes(&self, shared: &Shared) -> Option<SharedPause> {
        if !shared.redis.is_up() {
            return None;
        }
        let longest_us = self.ledger().upstream.longest() / 1000;
        shared
            .peek(longest_us, || {
                if self.ledger().upstream.resume() {
                    tracing::warn!(
                        "budget: upstream pause ended by an operator on another replica"
                    );
                }
            })
            .await
    }

    /// The shared pause in force (`/admin/status`), after ending this replica's copy of a
    /// pause an operator resumed elsewhere. `None` without Redis.
    pub(super) async fn shared_pause(&self) -> Option<SharedPause> {
        let shared = self.inner.shared.as_ref()?;
        self.sync_resumes(shared).await
    }

    /// After the upstream spoke: a pause it started is pushed to the other replicas.
    pub(super) fn share_upstream_pause(&self, now: u64) {
        if let Some(shared) = &self.inner.shared {
            let paused = self.ledger().upstream.paused_for(now);
            shared.share_pause(now, paused);
        }
    }
}

fn header_u64(headers: &http::HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{BudgetSpec, Priority, Refused};
    use cxgate_testkit::redis::RedisServer as Server;

    mod faults;
    mod queue;

    #[test]
    fn the_script_knows_how_long_a_learning_marker_lasts() {
        let line = format!("local LEARNING_MARK_MS = {}\n", LEARNING_MARK.as_millis());
        assert!(
            LUA.contains(&line),
            "expected the script's bound on a learning marker to be LEARNING_MARK ({line:?})"
        );
    }

    fn n(v: u32) -> NonZeroU32 {
        NonZeroU32::new(v).expect("positive")
    }

    fn spec(limit: u32, period_ms: u64, burst: u32, max_wait_ms: u64) -> BudgetSpec {
        BudgetSpec {
            global: Share {
                limit: n(limit),
                period: Duration::from_millis(period_ms),
                burst: n(burst),
            },
            max_wait: Duration::from_millis(max_wait_ms),
            batch_reserve: 0.0,
            clients: vec![ClientSpec {
                name: "own".into(),
                share: Some(Share {
                    limit: n(limit / 2),
                    period: Duration::from_millis(period_ms),
                    burst: n(2),
                }),
                max_wait: None,
                priority: Priority::Interactive,
            }],
        }
    }

    async fn shared_budget(server: &Server, spec: BudgetSpec, env: &str) -> (Budget, Redis) {
        std::env::set_var(env, server.url());
        let registry = prometheus::Registry::new();
        let redis = Redis::connect(env, &format!("t{:08x}", fastrand::u32(..)), &registry)
            .await
            .expect("redis handle");
        let budget = Budget::new_shared(spec, &registry, redis.clone(), n(3)).expect("budget");
        // One answer without rate fields: the shares alone pace what these tests send.
        budget.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
        (budget, redis)
    }

    /// Sends `count` admissions for `client` at once; returns each one's wait or refusal.
    async fn burst(
        budget: &Budget,
        client: &'static str,
        count: usize,
    ) -> Vec<Result<Duration, Which>> {
        let started = tokio::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..count {
            let b = budget.clone();
            set.spawn(async move {
                match b.admit(client, NonZeroU32::MIN).await {
                    Ok(_) => Ok(started.elapsed()),
                    Err(r) => Err(r.later().budget),
                }
            });
        }
        let mut out = Vec::new();
        while let Some(r) = set.join_next().await {
            out.push(r.expect("admission task"));
        }
        out.sort_by_key(|r| r.map_or(Duration::MAX, |d| d));
        out
    }

    #[test]
    fn replies_parse_and_nonsense_is_refused() {
        assert_eq!(
            Reply::parse(&[1, 500]),
            Some(Reply::Refused {
                which: Which::Global,
                wait: 500
            }),
            "expected a global refusal"
        );
        assert_eq!(
            Reply::parse(&[0, 0, 5, 0, 10, 20, 7]),
            Some(Reply::Go {
                wait: 0,
                own: None,
                global: Booked {
                    before: 10,
                    after: 20,
                    mirrored: 0,
                },
                now: 7,
                probe: false,
            }),
            "expected a go without an own booking"
        );
        assert_eq!(
            Reply::parse(&[9, 0]),
            None,
            "expected an unknown status refused"
        );
        assert_eq!(Reply::parse(&[0]), None, "expected a short reply refused");
    }

    #[test]
    fn intervals_round_up_and_the_fallback_divides_every_share() {
        let c = Cells::of(
            &Share {
                limit: n(3),
                period: Duration::from_millis(1),
                burst: n(5),
            },
            2,
        );
        assert_eq!(
            c,
            Cells {
                interval_us: 334,
                usable: 3
            },
            "expected 333.3 µs rounded up and 5 - 2 usable"
        );
        let divided = divide(spec(300, 1000, 30, 100), n(3));
        assert_eq!(
            (divided.global.limit.get(), divided.global.burst.get()),
            (100, 10),
            "expected 300/3 and 30/3"
        );
        let own = divided.clients[0].share.expect("own share kept");
        assert_eq!(
            (own.limit.get(), own.burst.get()),
            (50, 1),
            "expected 150/3 and at least one cell of burst"
        );
    }

    /// The script books like the local GCRA: the burst at once, then one cell per interval,
    /// refusals beyond `max_wait` that book nothing, and a client's own share limiting it
    /// before the global one does.
    #[tokio::test]
    async fn script_books_like_the_local_ledger() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        // 10 per second, burst 4, wait up to 250 ms: four at once, two more 100 and 200 ms
        // later, and the last two refused (they would wait 300 and 400 ms).
        let (budget, redis) = shared_budget(&server, spec(10, 1000, 4, 250), "CXGATE_T_RB1").await;
        let seen = burst(&budget, "other", 8).await;
        assert!(redis.is_up(), "expected Redis to stay up");
        let ms = Duration::from_millis;
        let ok: Vec<Duration> = seen.iter().filter_map(|r| r.ok()).collect();
        assert_eq!(ok.len(), 6, "expected 6 admitted, saw {seen:?}");
        assert!(
            ok[..4].iter().all(|w| *w < ms(50)),
            "expected the burst of 4 at once, saw {seen:?}"
        );
        assert!(
            ok[4] >= ms(80) && ok[4] < ms(180) && ok[5] >= ms(180) && ok[5] < ms(280),
            "expected waits of about 100 and 200 ms, saw {seen:?}"
        );
        assert!(
            seen[6..].iter().all(|r| *r == Err(Which::Global)),
            "expected two global refusals, saw {seen:?}"
        );

        // Own share: 5 per second, burst 2. After a full refill: two at once, the third
        // 200 ms later, the fourth refused by the client share (400 ms > 250 ms).
        tokio::time::sleep(ms(1000)).await;
        let own = burst(&budget, "own", 4).await;
        let ok: Vec<Duration> = own.iter().filter_map(|r| r.ok()).collect();
        assert_eq!(ok.len(), 3, "expected 3 own calls admitted, saw {own:?}");
        assert!(
            ok[2] >= ms(180),
            "expected the third to wait for its own cell, saw {own:?}"
        );
        assert_eq!(
            own[3],
            Err(Which::Client),
            "expected the client share to refuse"
        );
    }

    /// An admitted call that was not sent after all gives its cells back to the shared
    /// bucket (the script's `refund`), so the next admission goes instead of being refused.
    #[tokio::test]
    async fn a_refunded_admission_gives_its_cells_back_in_redis() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        // 2 a minute, burst 2, no waiting: two at once, then nothing for half a minute.
        let (budget, redis) =
            shared_budget(&server, spec(2, 60_000, 2, 0), "CXGATE_T_RB_REFUND").await;
        budget
            .admit("other", n(1))
            .await
            .expect("the first admission");
        let second = budget
            .admit("other", n(1))
            .await
            .expect("the second admission");
        let spent = budget.admit("other", n(1)).await;
        assert!(
            spent.is_err(),
            "expected the spent bucket to refuse, saw {spent:?}"
        );
        budget.refund("other", second.ticket);
        // The refund reaches Redis in the background; a refused admission books nothing,
        // so asking again until it goes is safe.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match budget.admit("other", n(1)).await {
                Ok(_) => break,
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(refused) => panic!("expected the refunded cell to admit, saw {refused:?}"),
            }
        }
        assert!(redis.is_up(), "expected Redis to stay up");
    }

    /// A refund shows in this replica's rate-limit fields at once: the local mirror of the
    /// shares gets the cells back as the script does in Redis, not at the next admission.
    #[tokio::test]
    async fn a_refund_shows_in_the_rate_limit_fields_at_once() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let (budget, _redis) =
            shared_budget(&server, spec(2, 60_000, 2, 0), "CXGATE_T_RB_REFUND_FIELDS").await;
        let remaining = |budget: &Budget| -> String {
            let (_, current) = budget.headers("other", None);
            let text = current.to_str().unwrap_or("").to_string();
            text.split(';')
                .find_map(|p| p.strip_prefix("r="))
                .unwrap_or_default()
                .to_string()
        };
        let _first = budget
            .admit("other", n(1))
            .await
            .expect("the first admission");
        assert_eq!(remaining(&budget), "1", "expected one cell left after one");
        let second = budget
            .admit("other", n(1))
            .await
            .expect("the second admission");
        assert_eq!(remaining(&budget), "0", "expected none left after two");
        budget.refund("other", second.ticket);
        assert_eq!(
            remaining(&budget),
            "1",
            "expected the refunded cell shown back at once"
        );
    }

    /// An allowance the replicas' own calls out have used up is no shared pause: a refusal
    /// asks back in a second, not at the reset an hour ahead.
    #[tokio::test]
    async fn an_allowance_used_up_by_calls_out_is_no_shared_pause() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let (budget, _redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RB4").await;
        let mut two = http::HeaderMap::new();
        two.insert("x-ratelimit-remaining", http::HeaderValue::from_static("2"));
        two.insert("x-ratelimit-reset", http::HeaderValue::from_static("3600"));
        let first = budget
            .admit("other", NonZeroU32::MIN)
            .await
            .expect("first call");
        budget.observe_answer(http::StatusCode::OK, &two, b"", first.ticket);
        let mut out = Vec::new();
        for i in 0..2 {
            let admitted = budget.admit("other", NonZeroU32::MIN).await;
            out.push(admitted.unwrap_or_else(|e| panic!("expected call {i} of 2, saw {e:?}")));
        }
        let refused = budget
            .admit("other", NonZeroU32::MIN)
            .await
            .expect_err("expected the third refused while two are out");
        assert!(
            refused.later().retry_after <= Duration::from_secs(1),
            "expected a Retry-After of a second, saw {refused:?}"
        );
        let status = budget.status_now().await;
        assert_eq!(
            status["upstream"]["pause_source"],
            serde_json::Value::Null,
            "expected no pause in force, saw {status}"
        );
        for admitted in out {
            budget.observe_answer(http::StatusCode::OK, &two, b"", admitted.ticket);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            budget.admit("other", NonZeroU32::MIN).await.is_ok(),
            "expected calls again once the answers said 2 remain"
        );
    }

    /// Once the shared count's window has ended, the new window holds the learnt limit
    /// less the calls still out on every replica, not what the shares allow: a replica
    /// with nothing out of its own gets only what the other left.
    #[tokio::test]
    async fn a_new_shared_window_holds_the_learnt_limit_less_every_call_out() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        std::env::set_var("CXGATE_T_RB6", server.url());
        let prefix = format!("t{:08x}", fastrand::u32(..));
        let replica = |spec: BudgetSpec| {
            let prefix = prefix.clone();
            async move {
                let registry = prometheus::Registry::new();
                let redis = Redis::connect("CXGATE_T_RB6", &prefix, &registry)
                    .await
                    .expect("redis handle");
                Budget::new_shared(spec, &registry, redis, n(2)).expect("budget")
            }
        };
        let (a, b) = (
            replica(spec(300, 1000, 30, 0)).await,
            replica(spec(300, 1000, 30, 0)).await,
        );
        let mut told = http::HeaderMap::new();
        told.insert("x-ratelimit-limit", http::HeaderValue::from_static("5"));
        told.insert("x-ratelimit-remaining", http::HeaderValue::from_static("4"));
        told.insert("x-ratelimit-reset", http::HeaderValue::from_static("1"));
        for budget in [&a, &b] {
            budget.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
            let first = budget.admit("other", n(1)).await.expect("a first call");
            budget.observe_answer(http::StatusCode::OK, &told, b"", first.ticket);
        }
        let _held = a.admit("other", n(1)).await.expect("a call left out");
        // Both windows (the shared count's key and each ledger's) end with the second named,
        // two seconds after the answer.
        tokio::time::sleep(Duration::from_millis(2600)).await;
        let mut kept = Vec::new();
        for i in 0..2 {
            let admitted = a.admit("other", n(1)).await;
            kept.push(admitted.unwrap_or_else(|e| panic!("expected call {i} on a, saw {e:?}")));
        }
        let mut on_b = 0;
        while on_b < 10 {
            match b.admit("other", n(1)).await {
                Ok(admitted) => kept.push(admitted),
                Err(_) => break,
            }
            on_b += 1;
        }
        assert_eq!(
            on_b, 2,
            "expected b to get the limit of 5 less a's 3 calls out, not its own full 5"
        );
    }

    /// Replicas sharing one Redis (`prefix`), each with `spec`, counted as `replicas`.
    async fn replicas(server: &Server, env: &str, spec: BudgetSpec, count: u32) -> Vec<Budget> {
        std::env::set_var(env, server.url());
        let prefix = format!("t{:08x}", fastrand::u32(..));
        let mut out = Vec::new();
        for _ in 0..count {
            let registry = prometheus::Registry::new();
            let redis = Redis::connect(env, &prefix, &registry)
                .await
                .expect("redis handle");
            out.push(Budget::new_shared(spec.clone(), &registry, redis, n(count)).expect("budget"));
        }
        out
    }

    /// One replica on its local share while the other spends the shared count (Redis gone
    /// for it alone): back on Redis, it hands over the call it sent alone, and the debt
    /// stays in the shared state for the other replica's next bookings too, which used to
    /// cut it back to one burst and forgive it (the other replica then waited 10 s, one
    /// cell, not 20 s: the call sent alone went on top of the shared budget).
    #[tokio::test]
    async fn what_a_replica_spent_alone_is_not_forgiven_by_the_others_bookings() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        // 4 calls per 40 s, all at once: a cell every 10 s; alone, 2 per 40 s.
        let budgets = replicas(&server, "CXGATE_T_RB10", spec(4, 40_000, 4, 0), 2).await;
        for b in &budgets {
            b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
        }
        let (a, b) = (&budgets[0], &budgets[1]);
        let shared = a.inner.shared.as_ref().expect("a shared budget");
        let mut kept = Vec::new();
        kept.push(
            a.admit_fallback(shared, "other", n(1), 0, &|_| {})
                .await
                .expect("a's call on its local share"),
        );
        for i in 0..4 {
            match b.admit("other", n(1)).await {
                Ok(admitted) => kept.push(admitted),
                Err(r) => panic!("expected b's call {i} of the shared burst, saw {r:?}"),
            }
        }
        // a is back: its take hands over its call alone (and is refused, the burst spent).
        let back = a.admit("other", n(1)).await;
        assert!(
            back.is_err() && !shared.local.load(Ordering::Acquire),
            "expected a back on the shared budget and refused, saw {back:?}"
        );
        let wait = b
            .admit("other", n(1))
            .await
            .expect_err("expected b refused")
            .later()
            .retry_after;
        assert!(
            wait >= Duration::from_secs(15),
            "expected b to wait for two cells (its burst and a's call alone), about 20 s, \
             saw {wait:?}"
        );
    }

    /// Two and three replicas, 20 services calling as fast as they are let, an upstream of
    /// 20 calls per 3 s window that counts and answers each call after up to 250 ms: over
    /// several windows no call meets the upstream's limit, and the calls keep going.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replicas_with_jittered_answers_never_meet_the_upstreams_limit() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        for count in [2, 3] {
            let budgets = replicas(&server, "CXGATE_T_RB7", spec(40, 3000, 10, 500), count).await;
            let upstream = std::sync::Arc::new(crate::budget::tests::Windowed::new(
                20,
                Duration::from_secs(3),
                250,
            ));
            let admitted =
                crate::budget::tests::drive(&budgets, &upstream, 20, Duration::from_secs(9)).await;
            let over = upstream.over.load(Ordering::Relaxed);
            assert_eq!(
                over, 0,
                "{count} replicas: expected no limit answer, saw {over} of {admitted} calls"
            );
            assert!(
                admitted >= 20 * 3 * 6 / 10,
                "{count} replicas: expected most of the 3 windows' 20 calls used, saw {admitted}"
            );
        }
    }

    /// A limit answer without a reset pauses every replica for the blind minute (here the
    /// 2 s window the upstream showed); after it exactly one probe goes, on whichever
    /// replica, and its answer renews the pause for all or lifts it for all.
    #[tokio::test]
    async fn after_a_blind_shared_pause_one_probe_goes_across_the_replicas() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let mut spec = spec(300, 2000, 30, 0);
        spec.max_wait = Duration::from_millis(0);
        let budgets = replicas(&server, "CXGATE_T_RB8", spec, 2).await;
        let mut told = http::HeaderMap::new();
        told.insert("x-ratelimit-limit", http::HeaderValue::from_static("50"));
        told.insert(
            "x-ratelimit-remaining",
            http::HeaderValue::from_static("40"),
        );
        // A window that ends by 2 s: the blind pause is cut to it.
        told.insert("x-ratelimit-reset", http::HeaderValue::from_static("1"));
        for b in &budgets {
            b.observe_upstream(http::StatusCode::OK, &http::HeaderMap::new());
            let first = b.admit("other", n(1)).await.expect("a first call");
            b.observe_answer(http::StatusCode::OK, &told, b"", first.ticket);
        }
        let limited = || {
            let mut h = http::HeaderMap::new();
            h.insert("x-ratelimit-remaining", http::HeaderValue::from_static("0"));
            h
        };
        let body: &[u8] = br#"{"error":"rate_limit_reached"}"#;
        let call = budgets[0].admit("other", n(1)).await.expect("a call");
        let said =
            budgets[0].observe_answer(http::StatusCode::BAD_REQUEST, &limited(), body, call.ticket);
        assert!(said, "expected the API's 400 read as the limit");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = budgets[1].admit("other", n(1)).await;
        assert!(
            matches!(
                refused,
                Err(Refused::Later(Rejected {
                    budget: Which::Upstream,
                    ..
                }))
            ),
            "expected the other replica paused too, saw {refused:?}"
        );
        for round in 0..2 {
            tokio::time::sleep(Duration::from_millis(2300)).await;
            // Everyone asks at once, three times on each replica.
            let mut set = tokio::task::JoinSet::new();
            for i in 0..6 {
                let b = budgets[i % 2].clone();
                set.spawn(async move { (i % 2, b.admit("other", n(1)).await) });
            }
            let mut probes = Vec::new();
            while let Some(done) = set.join_next().await {
                if let (i, Ok(admitted)) = done.expect("admission task") {
                    probes.push((i, admitted));
                }
            }
            assert_eq!(
                probes.len(),
                1,
                "round {round}: expected exactly one probe across both replicas, saw {}",
                probes.len()
            );
            let (i, probe) = probes.remove(0);
            if round == 0 {
                // Refused again: a fresh blind pause for both.
                budgets[i].observe_answer(
                    http::StatusCode::BAD_REQUEST,
                    &limited(),
                    body,
                    probe.ticket,
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (j, b) in budgets.iter().enumerate() {
                    let refused = b.admit("other", n(1)).await;
                    assert!(
                        refused.is_err(),
                        "replica {j}: expected the renewed pause, saw {refused:?}"
                    );
                }
            } else {
                budgets[i].observe_answer(http::StatusCode::OK, &told, b"", probe.ticket);
                tokio::time::sleep(Duration::from_millis(200)).await;
                for (j, b) in budgets.iter().enumerate() {
                    let admitted = b.admit("other", n(1)).await;
                    assert!(
                        admitted.is_ok(),
                        "replica {j}: expected the pause lifted, saw {admitted:?}"
                    );
                }
            }
        }
    }

    /// A shared allowance that is no count (a stray or tampered key) is absent, never a
    /// script error, and a count's expiry days ahead is no pause past the window.
    #[tokio::test]
    async fn a_junk_or_far_shared_allowance_is_bounded() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let (budget, redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RB5").await;
        let key = redis.key("budget:upstream_left");
        let put = |value: &'static str| {
            let (redis, key) = (redis.clone(), key.clone());
            async move {
                redis
                    .run("test", |mut conn| async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(value)
                            .arg("PX")
                            .arg(864_000_000u64)
                            .query_async::<()>(&mut conn)
                            .await
                    })
                    .await
                    .expect("SET the key");
            }
        };
        for junk in ["1e9", "abc", "99999999999999999999"] {
            put(junk).await;
            let admitted = budget.admit("other", NonZeroU32::MIN).await;
            assert!(
                admitted.is_ok() && redis.is_up(),
                "{junk:?}: expected an admission with Redis up, saw {admitted:?}"
            );
            if let Ok(admitted) = admitted {
                budget.call_failed(admitted.ticket);
            }
        }
        // The flight is empty again: the 0 below is a pause to the key's expiry, capped.
        tokio::time::sleep(Duration::from_millis(50)).await;
        put("0").await;
        let refused = budget
            .admit("other", NonZeroU32::MIN)
            .await
            .expect_err("expected a dry allowance to refuse");
        assert!(
            refused.later().retry_after <= Duration::from_secs(3600),
            "expected at most the hour's window, not ten days: {refused:?}"
        );
    }

    /// A window the replicas assumed when the last one named ended is a guess: the upstream
    /// begins its next window when it counts that window's first call (perhaps one sent
    /// before the guess), so the first report naming a later reset sets the count, even one
    /// naming a reset well before the assumed one, which is no older news.
    #[tokio::test]
    async fn the_first_report_of_an_assumed_window_sets_its_count() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let (budget, redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RB8").await;
        let shared = budget.inner.shared.as_ref().expect("a shared budget");
        let keys = shared.keys("other");
        // No count in Redis, a learnt limit of 10 and window of 6 s: the window is assumed.
        let take: Vec<String> = [
            "testreplica1",
            "1",
            "0",
            "3000000",
            "0",
            "0",
            "-1",
            "0",
            "0",
            "1",
            "100",
            "30",
            "0",
            "0",
            "0",
            "0",
            "3600000000",
            "10",
            "6000",
            "30000000",
            "-1",
            "0",
            "-1",
            "0",
            "0",
        ]
        .map(String::from)
        .to_vec();
        let went = run_script(&redis, &keys, "take", &take)
            .await
            .expect("take");
        assert_eq!(
            went.first(),
            Some(&0),
            "expected the call to go, saw {went:?}"
        );
        // Its answer: 4 left of this window, which the upstream says resets in 3 s.
        let seen: Vec<String> = [
            "testreplica1",
            "2",
            "0",
            "3000000",
            "0",
            "0",
            "-1",
            "0",
            "0",
            "1",
            "4",
            "3000",
            "60000",
            "1",
            "0",
            "10",
            "6000",
        ]
        .map(String::from)
        .to_vec();
        run_script(&redis, &keys, "seen", &seen)
            .await
            .expect("seen");
        let peek = run_script(&redis, &keys, "peek", &["3600000000".to_string()])
            .await
            .expect("peek");
        assert_eq!(
            peek.get(3),
            Some(&4),
            "expected the report's 4 in force, not the assumed 10, saw {peek:?}"
        );
        let ttl: i64 = redis
            .run("test", |mut conn| {
                let key = keys[3].clone();
                async move { redis::cmd("PTTL").arg(key).query_async(&mut conn).await }
            })
            .await
            .expect("PTTL");
        assert!(
            (1..=3000).contains(&ttl),
            "expected the count to end at the reset named, in 3 s, saw {ttl} ms"
        );
    }

    /// Redis lost: each replica obeys what it knew of the upstream's window, its part of
    /// the count (here half of 9 each); Redis back empty: the first replica back seeds the
    /// shared count from what it knows (9 less its 4 calls out), not from the full limit,
    /// so the other replica gets only what is left.
    #[tokio::test]
    async fn an_outage_keeps_the_upstreams_window_and_seeds_redis_back() {
        let Some(mut server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let budgets = replicas(&server, "CXGATE_T_RB9", spec(300, 1000, 30, 0), 2).await;
        let mut told = http::HeaderMap::new();
        told.insert("x-ratelimit-limit", http::HeaderValue::from_static("30"));
        told.insert("x-ratelimit-remaining", http::HeaderValue::from_static("9"));
        told.insert("x-ratelimit-reset", http::HeaderValue::from_static("60"));
        for b in &budgets {
            b.observe_upstream(http::StatusCode::OK, &told);
        }
        let (a, b) = (&budgets[0], &budgets[1]);
        server.stop();
        let mut kept = Vec::new();
        for _ in 0..12 {
            if let Ok(admitted) = a.admit("other", n(1)).await {
                kept.push(admitted);
            }
        }
        assert_eq!(
            kept.len(),
            4,
            "expected a's half of the 9 left on its own while Redis is gone"
        );
        server.restart();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let up = |b: &Budget| b.inner.shared.as_ref().is_some_and(|s| s.redis.is_up());
        while !(up(a) && up(b)) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(up(a) && up(b), "expected Redis seen back within 5 s");
        kept.push(a.admit("other", n(1)).await.expect("a's first call back"));
        let mut on_b = 0;
        while on_b < 12 {
            match b.admit("other", n(1)).await {
                Ok(admitted) => kept.push(admitted),
                Err(_) => break,
            }
            on_b += 1;
        }
        assert_eq!(
            on_b, 4,
            "expected b to get the 9 less a's 5 calls out, not a fresh window"
        );
    }

    /// A cold budget (nothing known of the upstream's count) whose Redis answers nothing
    /// within the budget's bound (paused from a connection of its own for longer) falls
    /// back to its local share and admits there: the call its shared attempt had put in the ledger's upstream flight
    /// goes back first, so the local admission does not wait, until `max_wait` and a
    /// refusal, for that call to land when it never went.
    #[tokio::test]
    async fn a_shared_admission_past_its_bound_falls_back_without_waiting_for_itself() {
        let Some(server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        std::env::set_var("CXGATE_T_RB_SLOW", server.url());
        let registry = prometheus::Registry::new();
        let prefix = format!("t{:08x}", fastrand::u32(..));
        let redis = Redis::connect("CXGATE_T_RB_SLOW", &prefix, &registry)
            .await
            .expect("redis handle");
        let budget = Budget::new_shared(spec(300, 1000, 30, 1500), &registry, redis.clone(), n(3))
            .expect("budget");
        let mut pauser = crate::replicas::Options::default()
            .open(&server.url())
            .await
            .expect("a second connection");
        let paused: Result<(), _> = ::redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(1500)
            .query_async(&mut pauser)
            .await;
        paused.expect("CLIENT PAUSE");
        let admitted = budget.admit("other", NonZeroU32::MIN).await;
        assert!(
            admitted.is_ok(),
            "expected the admission taken on the local share, saw {:?}",
            admitted.err().map(|r| r.later().budget)
        );
        redis.stop();
    }

    /// With Redis gone every admission still gets an answer, on the divided share; when
    /// Redis is back the shared script is used again.
    #[tokio::test]
    async fn losing_redis_falls_back_and_recovers() {
        let Some(mut server) = Server::start_or_skip("this Redis budget test") else {
            return;
        };
        let (budget, redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RB2").await;
        assert!(
            budget.admit("other", NonZeroU32::MIN).await.is_ok(),
            "expected a shared admission"
        );
        server.stop();
        let mut admitted = 0;
        for _ in 0..40 {
            if budget.admit("other", NonZeroU32::MIN).await.is_ok() {
                admitted += 1;
            }
        }
        assert!(!redis.is_up(), "expected Redis marked down");
        assert!(
            (9..=12).contains(&admitted),
            "expected about the divided burst of 10, saw {admitted} of 40"
        );
        server.restart();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !redis.is_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            redis.is_up(),
            "expected the probe to see Redis back within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = budget.admit("other", NonZeroU32::MIN).await;
        let local = budget
            .inner
            .shared
            .as_ref()
            .map(|s| s.local.load(Ordering::Acquire));
        assert_eq!(
            local,
            Some(false),
            "expected the shared budget in force again"
        );
        redis.stop();
    }

    /// A failover that leaves the address on a demoted primary (now a read-only replica
    /// that still answers PING) is an outage, not a flicker: the replica stays on its local
    /// share while the server refuses writes, and returns once it is a primary again.
    #[tokio::test]
    async fn a_demoted_primary_is_an_outage_until_it_is_promoted_again() {
        let Some(server) = Server::start_or_skip("this Redis failover test") else {
            return;
        };
        let Some(other) = Server::start_or_skip("this Redis failover test") else {
            return;
        };
        let (budget, redis) = shared_budget(&server, spec(300, 1000, 30, 0), "CXGATE_T_RB3").await;
        assert!(
            budget.admit("other", NonZeroU32::MIN).await.is_ok(),
            "expected a shared admission"
        );
        let mut direct = ::redis::Client::open(server.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("direct connection");
        let _: () = ::redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(other.port)
            .query_async(&mut direct)
            .await
            .expect("demote the server to a replica");
        // Over 1.5 s of admissions (several probe rounds) Redis must never look up again.
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut seen_up = 0;
        let mut answered = 0;
        while tokio::time::Instant::now() < until {
            // Looked at before each admission: a probe that wrongly saw Redis back leaves
            // it up until the next admission fails on it.
            if redis.is_up() && answered > 0 {
                seen_up += 1;
            }
            let _ = budget.admit("other", NonZeroU32::MIN).await;
            answered += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            seen_up, 0,
            "expected Redis down the whole time it refused writes, saw it up {seen_up} of {answered} times"
        );
        let _: () = ::redis::cmd("REPLICAOF")
            .arg("NO")
            .arg("ONE")
            .query_async(&mut direct)
            .await
            .expect("promote the server again");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while !redis.is_up() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            redis.is_up(),
            "expected Redis up within 3 s of the promotion"
        );
        let _ = budget.admit("other", NonZeroU32::MIN).await;
        let local = budget
            .inner
            .shared
            .as_ref()
            .map(|s| s.local.load(Ordering::Acquire));
        assert_eq!(
            local,
            Some(false),
            "expected the shared budget in force again"
        );
        redis.stop();
    }
}
