//! Several replicas behind one load balancer (CONTRACT 6): the Redis connection they share,
//! its health, and the channel that carries cache invalidations from one replica to all.
//!
//! Role: [`Redis`] is the one handle the budget, the token and the cache wiring use to reach
//! Redis. Every call is bounded by [`CALL_TIMEOUT`]; any failure marks Redis *down* at once,
//! and while it is down no call is even attempted (callers get [`Unavailable::Down`] at no
//! cost and use their local fallback), so losing Redis never adds a timeout to every request.
//! A background probe pings it and marks it *up* again by itself. `cxgate_redis_up` shows the
//! state; transitions are logged once each, not per request.
//!
//! Invalidations: each replica keeps its own in-memory cache, so a purge or a write's
//! invalidation is published on `<prefix>:invalidate` and applied by every other replica.
//! Pub/sub keeps nothing for a replica that is not listening, so after the subscription is
//! lost and comes back the replica drops its whole cache: it cannot know what it missed, and
//! a few extra upstream calls (paced by the budget) are better than serving deleted data.
//! Publications that fail while Redis is down are kept (bounded) and sent when it returns.
//!
//! This module imports nothing of the gateway: the cache is reached through the callback
//! given to [`Redis::spawn_subscriber`], so `budget`, `token` and `cache` stay independent.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// Bound on one Redis round trip. Redis answers in well under a millisecond on a healthy
/// network; anything slower than this is treated as an outage rather than queued behind.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often a healthy Redis is pinged, so the gauge turns 0 even while no request runs.
const PROBE_WHILE_UP: Duration = Duration::from_secs(1);
/// How often an unreachable Redis is tried again: recovery is noticed within this.
const PROBE_WHILE_DOWN: Duration = Duration::from_millis(250);
/// Pause between attempts to (re)subscribe to the invalidation channel.
const RESUBSCRIBE_AFTER: Duration = Duration::from_millis(250);
/// Failed publications kept for later; beyond this one "drop everything" replaces them.
const PENDING_LIMIT: usize = 256;

/// What a purge or a write removed; applied by every replica to its own cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Invalidation {
    Tags(Vec<String>),
    Path(String),
    All,
}

/// One message on the invalidation channel.
#[derive(Debug, Serialize, Deserialize)]
struct Message {
    /// The publishing replica, which has already applied the invalidation itself.
    from: String,
    what: Invalidation,
}

/// Why a Redis call did not happen or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis is unreachable (waiting for the probe to see it back)")]
    Down,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis: {0}")]
    Command(#[source] redis::RedisError),
}

/// Why the Redis handle could not be built (a bad URL; an unreachable server is not an error).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("invalid Redis URL in ${env}: {source}")]
    Url {
        env: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("${0} is not set; it must hold the Redis URL (e.g. redis://10.0.0.5:6379/0)")]
    MissingEnv(String),
    #[error("Redis connection: {0}")]
    Connection(#[source] redis::RedisError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Applies one invalidation received from another replica.
pub type Apply =
    Arc<dyn Fn(Invalidation) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The shared Redis handle; clones share one connection and one health state.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    /// Unique per process start: tells our own messages and locks from other replicas'.
    id: String,
    up: AtomicBool,
    gauge: IntGauge,
    errors: IntCounterVec,
    pending: Mutex<Vec<Invalidation>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.inner.prefix)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Builds the handle from the URL in environment variable `url_env`, registers the
    /// `cxgate_redis_*` metrics and starts the health probe. An unreachable server is not an
    /// error: the replica starts on its local fallbacks and switches over when Redis answers.
    pub async fn connect(
        url_env: &str,
        prefix: &str,
        registry: &Registry,
    ) -> Result<Redis, SetupError> {
        let url = std::env::var(url_env)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| SetupError::MissingEnv(url_env.to_string()))?;
        let client = redis::Client::open(url.as_str()).map_err(|source| SetupError::Url {
            env: url_env.to_string(),
            source,
        })?;
        // Reconnection is quick and short-lived: the probe decides health, and a reconnect
        // stuck in a long backoff would hide a server that is already back.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CALL_TIMEOUT * 2))
            .set_response_timeout(None)
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(100));
        let conn = client
            .get_connection_manager_lazy(config)
            .map_err(SetupError::Connection)?;
        let gauge = IntGauge::new(
            "cxgate_redis_up",
            "1 while the shared Redis answers; 0 while this replica runs on local fallbacks.",
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "cxgate_redis_errors_total",
                "Redis calls that failed or timed out, by operation.",
            ),
            &["op"],
        )?;
        registry.register(Box::new(gauge.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        let redis = Redis {
            inner: Arc::new(Inner {
                client,
                conn,
                prefix: prefix.to_string(),
                id: format!(
                    "{}-{:016x}",
                    std::process::id(),
                    fastrand::u64(..) ^ unique_seed()
                ),
                // Assumed up until the first call says otherwise, so the start-up probe
                // below is an ordinary call.
                up: AtomicBool::new(true),
                gauge,
                errors,
                pending: Mutex::new(Vec::new()),
                tasks: Mutex::new(Vec::new()),
            }),
        };
        redis.inner.gauge.set(1);
        // A failure is logged by the health transition itself; the replica starts anyway.
        let _ = redis.ping().await;
        let probe = tokio::spawn(probe(Arc::downgrade(&redis.inner)));
        redis.remember(probe);
        Ok(redis)
    }

    /// `<prefix>:<suffix>`: every key and channel of this deployment.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}:{suffix}", self.inner.prefix)
    }

    /// This replica's unique id (lock values, message senders).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether calls are attempted at all (see the module docs).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Runs one Redis exchange on the shared connection, bounded by [`CALL_TIMEOUT`]. Any
    /// failure marks Redis down; while it is down nothing is sent.
    pub async fn run<T, F, Fut>(&self, op: &'static str, exchange: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return Err(Unavailable::Down);
        }
        let result =
            match tokio::time::timeout(CALL_TIMEOUT, exchange(self.inner.conn.clone())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(err)) => Unavailable::Command(err),
                Err(_) => Unavailable::Timeout(CALL_TIMEOUT),
            };
        self.inner.errors.with_label_values(&[op]).inc();
        self.inner.set_up(false, Some(&result));
        Err(result)
    }

    async fn ping(&self) -> Result<(), Unavailable> {
        self.run("ping", |mut c| async move {
            redis::cmd("PING").query_async::<String>(&mut c).await
        })
        .await
        .map(|_| ())
    }

    /// Tells the other replicas to drop what this one just dropped. Waits at most one call
    /// timeout; while Redis is down the message is kept and sent when it returns.
    pub async fn publish(&self, what: Invalidation) {
        if let Err(what) = self.try_publish(what).await {
            self.keep_pending(what);
        }
    }

    async fn try_publish(&self, what: Invalidation) -> Result<(), Invalidation> {
        let message = Message {
            from: self.inner.id.clone(),
            what,
        };
        let Ok(text) = serde_json::to_string(&message) else {
            return Ok(());
        };
        let channel = self.key("invalidate");
        let sent = self
            .run("publish", |mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(&text)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
        sent.map(|_| ()).map_err(|_| message.what)
    }

    fn keep_pending(&self, what: Invalidation) {
        let mut pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= PENDING_LIMIT || what == Invalidation::All {
            pending.clear();
            pending.push(Invalidation::All);
        } else if pending.first() != Some(&Invalidation::All) {
            pending.push(what);
        }
    }

    /// Sends what could not be published while Redis was down.
    async fn flush_pending(&self) {
        let pending = std::mem::take(
            &mut *self
                .inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut left = pending.into_iter();
        while let Some(what) = left.next() {
            if let Err(what) = self.try_publish(what).await {
                self.keep_pending(what);
                for rest in left.by_ref() {
                    self.keep_pending(rest);
                }
            }
        }
    }

    /// Listens on the invalidation channel and hands every other replica's message to
    /// `apply`. Reconnects by itself; after a lost subscription it applies
    /// [`Invalidation::All`] (see the module docs).
    pub fn spawn_subscriber(&self, apply: Apply) {
        let task = tokio::spawn(subscribe(self.clone(), apply));
        self.remember(task);
    }

    fn remember(&self, task: JoinHandle<()>) {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    /// Stops the background tasks (probe, subscriber); the gateway calls it on shutdown.
    pub fn stop(&self) {
        for task in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
        {
            task.abort();
        }
    }
}

impl Inner {
    fn set_up(&self, up: bool, why: Option<&Unavailable>) {
        let was = self.up.swap(up, Ordering::AcqRel);
        self.gauge.set(i64::from(up));
        match (was, up) {
            (true, false) => tracing::warn!(
                error = why.map(|e| e.to_string()),
                "Redis unreachable: this replica now uses its local budget (limit / replicas) \
                 and its own token file; invalidations are queued"
            ),
            (false, true) => tracing::info!(
                "Redis reachable again: shared budget, token and invalidations resume"
            ),
            _ => {}
        }
    }
}

/// A per-process seed mixed into the replica id, so two processes started in the same
/// instant with the same pid (containers) still differ.
fn unique_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The health probe; ends when the last handle is dropped.
async fn probe(inner: std::sync::Weak<Inner>) {
    loop {
        let every = match inner.upgrade() {
            Some(i) if i.up.load(Ordering::Acquire) => PROBE_WHILE_UP,
            Some(_) => PROBE_WHILE_DOWN,
            None => return,
        };
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let redis = Redis { inner };
        let mut conn = redis.inner.conn.clone();
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok(_)) => {
                if !redis.is_up() {
                    redis.inner.set_up(true, None);
                }
                redis.flush_pending().await;
            }
            Ok(Err(err)) => {
                redis.inner.errors.with_label_values(&["ping"]).inc();
                redis.inner.set_up(false, Some(&Unavailable::Command(err)));
            }
            Err(_) => {
                redis.inner.errors.with_label_values(&["ping"]).inc();
                let why = Unavailable::Timeout(CALL_TIMEOUT);
                redis.inner.set_up(false, Some(&why));
            }
        }
    }
}

/// The subscriber loop (see [`Redis::spawn_subscriber`]).
async fn subscribe(redis: Redis, apply: Apply) {
    let channel = redis.key("invalidate");
    // The first subscription at start has missed nothing; any later one may have.
    let mut first = true;
    loop {
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = redis.inner.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                if !first {
                    tracing::info!(
                        "invalidation channel back: dropping this replica's cache, since \
                         invalidations sent meanwhile were missed"
                    );
                    apply(Invalidation::All).await;
                }
                first = false;
                let mut messages = pubsub.into_on_message();
                while let Some(msg) = next(&mut messages).await {
                    let Ok(message) = serde_json::from_slice::<Message>(msg.get_payload_bytes())
                    else {
                        tracing::warn!("ignoring an unreadable invalidation message");
                        continue;
                    };
                    if message.from != redis.inner.id {
                        apply(message.what).await;
                    }
                }
                tracing::warn!("invalidation channel lost; resubscribing");
            }
            _ => first = false,
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// The next item of a stream, without pulling in a stream-combinator crate.
async fn next<S>(stream: &mut S) -> Option<S::Item>
where
    S: futures_core::Stream + Unpin,
{
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

/// A `redis-server` child process for tests (shared with the integration tests).
#[cfg(test)]
#[path = "../tests/common/redis_server.rs"]
pub(crate) mod testing;
