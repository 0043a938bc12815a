//! Single flight: concurrent requests for one key share one execution of the fetch, so a
//! burst of identical misses makes one upstream call. No cancelled caller can leave a key
//! locked, and a caller that joins is never worse off than alone: [`Merger`] says how.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

use tokio::sync::watch;

/// Whether this caller started the shared fetch or joined one already running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// The shared fetch ended without a value: it panicked, or the runtime shut down under it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the shared upstream fetch ended without an answer")]
pub struct MergeError;

/// Where a fetch is on its way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Its budget has not decided yet (it may not even have been scheduled).
    Deciding,
    /// Its budget made it wait; by this time (if known) it is past its queue or refused.
    Queued(Option<tokio::time::Instant>),
    /// Its cells are booked on the global share for this time: it goes then, before any
    /// call booked after it (see `budget::Queued`).
    Booked(tokio::time::Instant),
    /// Past its queue, on its way upstream.
    Sent,
}

/// `None` until the fetch has produced its value.
type Outcome<V> = Option<V>;
type Flights<V> = Mutex<HashMap<String, Flying<V>>>;
/// Set to the flight a fetch may take the value of instead of waiting on for its budget.
type Displaced<V> = watch::Sender<Option<Flying<V>>>;
/// Flights of a key run beside the one standing in the map, on their callers' own terms.
type Rivals<V> = Mutex<Vec<Weak<Displaced<V>>>>;

/// One fetch in flight as the map holds it.
struct Flying<V> {
    outcome: watch::Receiver<Outcome<V>>,
    stage: watch::Receiver<Stage>,
    /// For a fetch that only runs while wanted: who still waits, and how to stop it.
    wanted: Option<Arc<Wanted>>,
    /// Set, to the flight already on its way upstream, when that one took this one's place
    /// in the map: its value can be taken even after it has left the map.
    displaced: Arc<Displaced<V>>,
    /// Flights of the key that followers of this one, still queued, started on their own
    /// terms: whichever gets past its queue first answers the others.
    rivals: Arc<Rivals<V>>,
}

impl<V> Clone for Flying<V> {
    fn clone(&self) -> Self {
        Flying {
            outcome: self.outcome.clone(),
            stage: self.stage.clone(),
            wanted: self.wanted.clone(),
            displaced: Arc::clone(&self.displaced),
            rivals: Arc::clone(&self.rivals),
        }
    }
}

impl<V> Flying<V> {
    /// Makes `rival`, a flight of this one's key outside the map, take this one's value once
    /// this one is past its queue (at once if it is): a follower that went its own way need
    /// not spend its budget when the leader it left gets there first.
    fn add_rival(&self, rival: &Flying<V>) {
        let mut rivals = lock(&self.rivals);
        // Read under the lock `sent` takes after setting the stage: a rival is either
        // listed before the stage moves, or sees that it has.
        if *self.stage.borrow() == Stage::Sent {
            drop(rivals);
            displace(&rival.displaced, self);
        } else {
            rivals.retain(|r| r.strong_count() > 0);
            rivals.push(Arc::downgrade(&rival.displaced));
        }
    }

    /// Hands `by`, a flight on its way upstream, to every rival of this one.
    fn displace_rivals(&self, by: &Flying<V>) {
        let rivals = std::mem::take(&mut *lock(&self.rivals));
        for rival in rivals.iter().filter_map(Weak::upgrade) {
            if !Arc::ptr_eq(&rival, &by.displaced) {
                displace(&rival, by);
            }
        }
    }
}

/// Points a fetch still waiting for its budget at `by`, unless it was pointed elsewhere.
fn displace<V>(displaced: &Displaced<V>, by: &Flying<V>) {
    displaced.send_if_modified(|d| {
        let first = d.is_none();
        if first {
            *d = Some(by.clone());
        }
        first
    });
}

/// The callers still waiting for a fetch that runs only while wanted. Counted under the
/// map's lock, so a caller can never join a fetch that is being cancelled.
struct Wanted {
    callers: AtomicUsize,
    task: OnceLock<tokio::task::AbortHandle>,
}

/// A caller waiting for a fetch that runs only while wanted: the last one to go cancels it.
struct Waiting<V> {
    flights: Arc<Flights<V>>,
    key: String,
    outcome: watch::Receiver<Outcome<V>>,
    wanted: Arc<Wanted>,
}

impl<V> Drop for Waiting<V> {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        let left = self.wanted.callers.fetch_sub(1, Ordering::AcqRel);
        if left == 1 {
            if flights
                .get(&self.key)
                .is_some_and(|f| f.outcome.same_channel(&self.outcome))
            {
                flights.remove(&self.key);
            }
            if let Some(task) = self.wanted.task.get() {
                task.abort();
            }
        }
    }
}

/// Where a fetch stands in the map: its key and its own entry.
struct Place<V> {
    flights: Arc<Flights<V>>,
    key: String,
    own: Flying<V>,
}

/// Handed to a fetch so it can say where it is: queued by its budget, or past its queue
/// (the budget let it through); followers waiting with a patience count only the queue. It
/// also carries when the caller the fetch runs for arrived, so a caller that already waited
/// on another's flight queues for its own budget only for what is left of its `max_wait`,
/// and the fetch's place in the map, so it can stand there once sent or join another.
pub struct Progress<V> {
    stage: Arc<watch::Sender<Stage>>,
    since: Option<tokio::time::Instant>,
    place: Option<Arc<Place<V>>>,
}

impl<V> Clone for Progress<V> {
    fn clone(&self) -> Self {
        Progress {
            stage: Arc::clone(&self.stage),
            since: self.since,
            place: self.place.clone(),
        }
    }
}

impl<V> std::fmt::Debug for Progress<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("stage", &*self.stage.borrow())
            .field("since", &self.since)
            .field("key", &self.place.as_ref().map(|p| &p.key))
            .finish()
    }
}

impl<V> Progress<V> {
    /// A handle that reports to nobody, for a fetch run outside any flight.
    pub fn detached() -> Progress<V> {
        Progress {
            stage: Arc::new(watch::channel(Stage::Deciding).0),
            since: None,
            place: None,
        }
    }

    /// The same handle, for a caller that arrived at `arrived`.
    #[must_use]
    pub fn since(mut self, arrived: tokio::time::Instant) -> Progress<V> {
        self.since = Some(arrived);
        self
    }

    /// How long the caller has waited already (zero when not known).
    pub fn waited(&self) -> std::time::Duration {
        self.since
            .map_or(std::time::Duration::ZERO, |at| at.elapsed())
    }

    /// The fetch's budget made it wait: followers start counting their patience.
    pub fn queued(&self) {
        self.queued_until(None);
    }

    /// [`Progress::queued`] for a fetch whose budget decides by `by` at the latest (its
    /// caller's `max_wait` from its arrival): past its queue then, or refused. A follower
    /// whose own budget refuses it may wait for such a leader (see [`Behind`]). A fetch
    /// booked before ([`Progress::booked`]) that queues again (the call it followed came to
    /// nothing) is queued again.
    pub fn queued_until(&self, by: Option<tokio::time::Instant>) {
        self.stage.send_if_modified(|stage| {
            let was = matches!(stage, Stage::Deciding | Stage::Booked(_));
            if was {
                *stage = Stage::Queued(by);
            }
            was
        });
    }

    /// The fetch's cells are booked on the global share for `at` (or it follows a call
    /// booked so on another replica): a follower whose own wait reaches `at` follows it
    /// without booking cells of its own (see [`Merger::run_patient`]).
    pub fn booked(&self, at: tokio::time::Instant) {
        self.stage.send_if_modified(|stage| {
            let was = *stage != Stage::Sent;
            if was {
                *stage = Stage::Booked(at);
            }
            was
        });
    }

    /// Resolves once the fetch's cells are booked on the global share for a time still to
    /// come: that time (see [`Progress::booked`]), `None` when it went without such a wait.
    pub async fn booked_for(&self) -> Option<tokio::time::Instant> {
        let mut stage = self.stage.subscribe();
        let ahead = |s: &Stage| match *s {
            Stage::Booked(at) => at > tokio::time::Instant::now(),
            Stage::Sent => true,
            Stage::Deciding | Stage::Queued(_) => false,
        };
        let booked = stage.wait_for(ahead).await.ok()?;
        match *booked {
            Stage::Booked(at) => Some(at),
            _ => None,
        }
    }

    /// When the caller this fetch runs for arrived, if known.
    pub fn arrived(&self) -> Option<tokio::time::Instant> {
        self.since
    }

    /// The fetch is past its queue and on its way upstream: its rivals still queued take
    /// its value.
    pub fn sent(&self) {
        self.stage.send_replace(Stage::Sent);
        if let Some(place) = &self.place {
            place.own.displace_rivals(&place.own);
        }
    }
}

/// Another flight of the same key, already on its way upstream, that a fetch joined.
pub struct Peer<V> {
    outcome: watch::Receiver<Outcome<V>>,
    _waiting: Option<Waiting<V>>,
}

impl<V: Clone> Peer<V> {
    /// The peer's value (`MergeError` if it ended without one).
    pub async fn value(mut self) -> Result<V, MergeError> {
        wait(&mut self.outcome).await
    }
}

impl<V> std::fmt::Debug for Peer<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

impl<V: Clone + Send + Sync + 'static> Progress<V> {
    /// Once past its queue: when another flight of the key is already on its way upstream,
    /// that one to join (this fetch need not call again); otherwise this flight takes the
    /// key's place in the map (newcomers join it), displacing one still queued.
    pub fn take_place(&self) -> Option<Peer<V>> {
        let place = self.place.as_ref()?;
        let mut flights = lock(&place.flights);
        match flights.get(&place.key) {
            Some(f) if f.outcome.same_channel(&place.own.outcome) => None,
            Some(f) if *f.stage.borrow() == Stage::Sent => Some(peer(place, f)),
            other => {
                if let Some(queued) = other {
                    queued.displaced.send_replace(Some(place.own.clone()));
                    queued.displace_rivals(&place.own);
                }
                flights.insert(place.key.clone(), place.own.clone());
                None
            }
        }
    }

    /// Resolves, while this fetch still waits for its budget, once a flight of its key on
    /// its way upstream has taken its place in the map, or (for a flight of
    /// [`Merger::run_own`]) once the flight it ran beside got past its queue: that one to
    /// join. Never resolves for a fetch outside any flight.
    pub async fn displaced(&self) -> Peer<V> {
        let Some(place) = self.place.as_ref() else {
            return std::future::pending().await;
        };
        let mut displaced = place.own.displaced.subscribe();
        let by = match displaced.wait_for(Option::is_some).await {
            Ok(by) => (*by).clone(),
            // The sender lives in this very handle: it cannot be gone while this waits.
            Err(_) => None,
        };
        match by {
            Some(by) => {
                // Counted as waiting under the map's lock, as every caller joining a flight.
                let _flights = lock(&place.flights);
                peer(place, &by)
            }
            None => std::future::pending().await,
        }
    }
}

/// Joins `flying` (found under `place`'s key, with the map locked) as a waiting caller.
fn peer<V>(place: &Place<V>, flying: &Flying<V>) -> Peer<V> {
    let waiting = flying.wanted.as_ref().map(|wanted| {
        wanted.callers.fetch_add(1, Ordering::AcqRel);
        Waiting {
            flights: Arc::clone(&place.flights),
            key: place.key.clone(),
            outcome: flying.outcome.clone(),
            wanted: Arc::clone(wanted),
        }
    });
    Peer {
        outcome: flying.outcome.clone(),
        _waiting: waiting,
    }
}

/// How a patient caller took part in a flight.
#[derive(Debug)]
pub enum Joined<V, B> {
    /// It led: the value of its own fetch.
    Led(V),
    /// It followed: the leader's value, and its own fetch, unrun.
    Followed(V, B),
    /// The leader was still queued after the patience: its own fetch, unrun, and the
    /// leader's flight, whose value it may still take (when its own budget refuses it).
    Impatient(B, Behind<V>),
}

/// The queued flight a caller left to run its fetch on its own terms: still joined (it
/// counts as waiting for it), so that caller can take its value after all.
pub struct Behind<V> {
    outcome: watch::Receiver<Outcome<V>>,
    stage: watch::Receiver<Stage>,
    _waiting: Option<Waiting<V>>,
}

impl<V: Clone> Behind<V> {
    /// Whether the flight's value comes without waiting on its budget past `deadline`: it
    /// has its value, or is past its queue, or its budget decides by then.
    pub fn due_by(&self, deadline: tokio::time::Instant) -> bool {
        if self.outcome.borrow().is_some() {
            return true;
        }
        match *self.stage.borrow() {
            Stage::Sent => true,
            Stage::Queued(by) => by.is_some_and(|by| by <= deadline),
            Stage::Booked(at) => at <= deadline,
            Stage::Deciding => false,
        }
    }

    /// The flight's value (`MergeError` if it ended without one).
    pub async fn value(mut self) -> Result<V, MergeError> {
        wait(&mut self.outcome).await
    }
}

impl<V> std::fmt::Debug for Behind<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behind").finish_non_exhaustive()
    }
}

/// What joining a flight gives a caller: its watches, its role, and (for a fetch that runs
/// only while wanted) the guard that counts it as waiting.
struct Seat<V> {
    outcome: watch::Receiver<Outcome<V>>,
    stage: watch::Receiver<Stage>,
    role: Role,
    _waiting: Option<Waiting<V>>,
}

/// Merges concurrent fetches by key. Cheap to clone: clones share the in-flight map.
///
/// The fetch runs in its own task, so it finishes even when every caller hangs up, and
/// that task (not a caller) removes the key from the in-flight map, through a drop guard
/// that also runs on panic: no cancelled caller can leave a key locked. Waiters sleep on a
/// watch channel and all wake at once; a panicked fetch wakes them with [`MergeError`].
///
/// Two exceptions, each chosen by the caller. A fetch run "while wanted"
/// ([`Merger::run_while_wanted`]) is cancelled as soon as the last caller waiting for it has
/// gone (answers nobody else can use, such as reads that are not cached). With
/// [`Merger::run_patient`] a follower is never worse off than alone: once the leader's budget
/// has decided, it waits for the leader's fetch to get past its queue (report
/// [`Progress::sent`]) at most its own patience, and gets its unrun fetch back when the
/// leader is still queued, and beside the leader's value otherwise, so it can run the fetch
/// on its own terms ([`Merger::run_own`]).
///
/// The map holds, per key, the flight newcomers join: a flight on its way upstream takes
/// the place of one still queued ([`Progress::take_place`]), and a flight that finds another
/// of its key already on its way upstream, when its own queue ends or while it still
/// waits ([`Progress::displaced`]), can take that one's value instead of calling again.
pub struct Merger<V> {
    flights: Arc<Flights<V>>,
}

impl<V> Clone for Merger<V> {
    fn clone(&self) -> Self {
        Merger {
            flights: Arc::clone(&self.flights),
        }
    }
}

impl<V> Default for Merger<V> {
    fn default() -> Self {
        Merger {
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The map and the rival lists are only touched by single insert, remove or push calls,
    // which leave them consistent even if a panic (an allocation failure) poisoned a lock.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<V: Clone + Send + Sync + 'static> Merger<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `fetch` for `key` unless a fetch for `key` is already in flight, in which case
    /// this waits for that one's value instead; `fetch` is then dropped unrun.
    pub async fn run<F>(&self, key: String, fetch: F) -> Result<(V, Role), MergeError>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut build = Some(|_: Progress<V>| fetch);
        let mut seat = self.join(key, &mut build, false);
        Ok((wait(&mut seat.outcome).await?, seat.role))
    }

    /// Like [`Merger::run`], but the fetch is cancelled once every caller waiting for it
    /// (this one and any that joined) has gone. Callers of `run` joining such a fetch count
    /// as waiting for it too.
    pub async fn run_while_wanted<F>(&self, key: String, fetch: F) -> Result<(V, Role), MergeError>
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut build = Some(|_: Progress<V>| fetch);
        let mut seat = self.join(key, &mut build, true);
        Ok((wait(&mut seat.outcome).await?, seat.role))
    }

    /// Like [`Merger::run`] (or [`Merger::run_while_wanted`] with `only_while_wanted`), but
    /// `build` makes the fetch from a [`Progress`] it reports to, and a follower waits at
    /// most `patience` for the leader to report [`Progress::sent`], counted once the
    /// leader's budget has decided: a leader not yet past that instant step (not even
    /// scheduled, say) is waited for whatever the patience, so a burst of identical reads
    /// makes one call even with a patience of zero. A leader whose cells are booked on the
    /// global share for no later than `follow_by` ([`Progress::booked`]) is followed
    /// whatever the patience: alone, the follower would book cells behind the leader's, to
    /// go no sooner, and those cells would be spent for nothing once the leader's answer
    /// came (given back only while nobody booked after them, which in a queue is never).
    pub async fn run_patient<B, F>(
        &self,
        key: String,
        build: B,
        patience: std::time::Duration,
        follow_by: Option<tokio::time::Instant>,
        only_while_wanted: bool,
    ) -> Result<Joined<V, B>, MergeError>
    where
        B: FnOnce(Progress<V>) -> F,
        F: Future<Output = V> + Send + 'static,
    {
        let asked = tokio::time::Instant::now();
        let mut build = Some(build);
        let mut seat = self.join(key, &mut build, only_while_wanted);
        let Some(build) = build.filter(|_| seat.role == Role::Follower) else {
            return Ok(Joined::Led(wait(&mut seat.outcome).await?));
        };
        // Each wait also ends when the flight does, sent or not: its value is there to take.
        let stage = &mut seat.stage;
        let decided = stage.wait_for(|s| *s != Stage::Deciding).await.is_ok();
        let in_time = |s: &Stage| match *s {
            Stage::Sent => true,
            Stage::Booked(at) => follow_by.is_some_and(|by| at <= by),
            Stage::Deciding | Stage::Queued(_) => false,
        };
        let queued = if decided {
            // Polled once before the timeout is, so a zero patience still sees the stage.
            let left = patience.saturating_sub(asked.elapsed());
            let passed = async { stage.wait_for(in_time).await.map(|_| ()) };
            tokio::time::timeout(left, passed).await.is_err()
        } else {
            false
        };
        let done = seat.outcome.borrow().is_some();
        if queued && !done {
            let behind = Behind {
                outcome: seat.outcome,
                stage: seat.stage,
                _waiting: seat._waiting,
            };
            return Ok(Joined::Impatient(build, behind));
        }
        Ok(Joined::Followed(wait(&mut seat.outcome).await?, build))
    }

    /// Runs `build`'s fetch for `key` as a flight of its own, outside the map until it is
    /// past its queue (it then takes the key's place, or joins a flight already sent: see
    /// [`Progress::take_place`]): for a follower that gave up on a queued leader, or whose
    /// leader's budget refused it. The flight standing for the key, if it gets past its
    /// queue first, displaces this one ([`Progress::displaced`]). Like a leader's, the fetch
    /// runs on when the caller hangs up, unless `only_while_wanted`.
    pub async fn run_own<B, F>(
        &self,
        key: String,
        build: B,
        only_while_wanted: bool,
    ) -> Result<V, MergeError>
    where
        B: FnOnce(Progress<V>) -> F,
        F: Future<Output = V> + Send + 'static,
    {
        let mut seat = {
            let mut flights = lock(&self.flights);
            self.fly(&mut flights, key, build, only_while_wanted, false)
        };
        wait(&mut seat.outcome).await
    }

    /// Joins the flight for `key`, or registers one running the fetch `build` makes (taking
    /// it out of `build`).
    fn join<B, F>(&self, key: String, build: &mut Option<B>, only_while_wanted: bool) -> Seat<V>
    where
        B: FnOnce(Progress<V>) -> F,
        F: Future<Output = V> + Send + 'static,
    {
        let mut flights = lock(&self.flights);
        if let Some(flying) = flights.get(&key) {
            let waiting = flying.wanted.as_ref().map(|wanted| {
                wanted.callers.fetch_add(1, Ordering::AcqRel);
                Waiting {
                    flights: Arc::clone(&self.flights),
                    key: key.clone(),
                    outcome: flying.outcome.clone(),
                    wanted: Arc::clone(wanted),
                }
            });
            return Seat {
                outcome: flying.outcome.clone(),
                stage: flying.stage.clone(),
                role: Role::Follower,
                _waiting: waiting,
            };
        }
        let Some(build) = build.take() else {
            // Only reachable by a caller passing None, which no caller in this module does.
            return Seat {
                outcome: watch::channel(None).1,
                stage: watch::channel(Stage::Deciding).1,
                role: Role::Leader,
                _waiting: None,
            };
        };
        self.fly(&mut flights, key, build, only_while_wanted, true)
    }

    /// Spawns the flight running `build`'s fetch for `key`, in the map at once when
    /// `listed`, else a rival of the flight standing there. Called with the map locked, so
    /// the entry and its task are one step.
    fn fly<B, F>(
        &self,
        flights: &mut HashMap<String, Flying<V>>,
        key: String,
        build: B,
        only_while_wanted: bool,
        listed: bool,
    ) -> Seat<V>
    where
        B: FnOnce(Progress<V>) -> F,
        F: Future<Output = V> + Send + 'static,
    {
        let (sender, outcome) = watch::channel(None);
        let (stage_tx, stage) = watch::channel(Stage::Deciding);
        let wanted = only_while_wanted.then(|| {
            Arc::new(Wanted {
                callers: AtomicUsize::new(1),
                task: OnceLock::new(),
            })
        });
        let own = Flying {
            outcome: outcome.clone(),
            stage: stage.clone(),
            wanted: wanted.clone(),
            displaced: Arc::new(watch::channel(None).0),
            rivals: Arc::default(),
        };
        if listed {
            flights.insert(key.clone(), own.clone());
        } else if let Some(standing) = flights.get(&key) {
            standing.add_rival(&own);
        }
        let waiting = wanted.as_ref().map(|wanted| Waiting {
            flights: Arc::clone(&self.flights),
            key: key.clone(),
            outcome: outcome.clone(),
            wanted: Arc::clone(wanted),
        });
        let progress = Progress {
            stage: Arc::new(stage_tx),
            since: None,
            place: Some(Arc::new(Place {
                flights: Arc::clone(&self.flights),
                key: key.clone(),
                own,
            })),
        };
        // Spawning under the lock is fine (it never blocks) and keeps the map entry and its
        // task one step: no caller can observe one without the other.
        let flight = Flight {
            flights: Arc::clone(&self.flights),
            key,
            sender,
        };
        let fetch = build(progress.clone());
        let task = tokio::spawn(async move {
            // Held until the value is out, so a follower never takes a fetch that dropped
            // its handle for a flight that has ended.
            let _held = progress;
            flight.fly(fetch).await;
        });
        if let Some(wanted) = &wanted {
            let _ = wanted.task.set(task.abort_handle());
        }
        Seat {
            outcome,
            stage,
            role: Role::Leader,
            _waiting: waiting,
        }
    }

    /// Keys with a fetch in flight right now.
    pub fn in_flight(&self) -> usize {
        lock(&self.flights).len()
    }
}

/// The flight's value; Err only if the sender is gone with the value still `None` (the
/// task panicked or the runtime dropped it).
async fn wait<V: Clone>(outcome: &mut watch::Receiver<Outcome<V>>) -> Result<V, MergeError> {
    let value = outcome
        .wait_for(Option::is_some)
        .await
        .map_err(|_| MergeError)?;
    match &*value {
        Some(v) => Ok(v.clone()),
        // wait_for only returns Ok for a value that passed `is_some`.
        None => Err(MergeError),
    }
}

impl<V> std::fmt::Debug for Merger<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Merger")
            .field("in_flight", &lock(&self.flights).len())
            .finish()
    }
}

/// One fetch in flight. Dropping it (after success, on panic, or when the runtime drops the
/// task) frees the key; the sender goes with it, which wakes waiters of a failed fetch.
struct Flight<V> {
    flights: Arc<Flights<V>>,
    key: String,
    sender: watch::Sender<Outcome<V>>,
}

impl<V> Flight<V> {
    async fn fly<F: Future<Output = V>>(self, fetch: F) {
        let value = fetch.await;
        self.sender.send_replace(Some(value));
    }
}

impl<V> Drop for Flight<V> {
    fn drop(&mut self) {
        let mut flights = lock(&self.flights);
        // The key's entry may be another flight's (one that took this one's place, or this
        // one never stood there): only this flight's own entry is removed.
        if flights
            .get(&self.key)
            .is_some_and(|f| f.outcome.same_channel(&self.sender.subscribe()))
        {
            flights.remove(&self.key);
        }
    }
}

#[cfg(test)]
#[path = "merge_tests.rs"]
mod tests;
