//! Several replicas behind one load balancer (CONTRACT 6): the Redis connection they share,
//! its health, and the channel that carries cache invalidations from one replica to all.
//!
//! Role: [`Redis`] is the one handle the budget, the token and the cache wiring use to reach
//! Redis. Every call is bounded by [`CALL_TIMEOUT`]; any failure marks Redis *down* at once,
//! and while it is down no call is even attempted (callers get [`Unavailable::Down`] at no
//! cost and use their local fallback), so losing Redis never adds a timeout to every request.
//! A background probe (a short-lived write, so a read-only replica left behind by a failover
//! counts as down) marks it *up* again by itself. `cxgate_redis_up` shows the state;
//! transitions are logged once each, not per request.
//!
//! Reaching Redis: `redis://` or `rediss://` (rustls, the system's roots plus
//! `budget.redis_ca_file`), an ACL user and password in the URL (shown only through
//! [`redacted_address`]), one server or a Redis Cluster (`budget.redis_cluster`, seed nodes
//! comma-separated). Every key carries the hash tag `{<prefix>}` ([`Redis::key`]), so a
//! deployment's keys share one cluster slot and the multi-key scripts run there unchanged.
//!
//! Invalidations: each replica keeps its own in-memory cache, so a purge or a write's
//! invalidation is published on `{<prefix>}:invalidate` and applied by every other replica.
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
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// Bound on one Redis round trip. Redis answers in well under a millisecond on a healthy
/// network; anything slower than this is treated as an outage rather than queued behind.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// How often a healthy Redis is pinged, so the gauge turns 0 even while no request runs.
const PROBE_WHILE_UP: Duration = Duration::from_secs(1);
/// How often an unreachable Redis is tried again: recovery is noticed within this.
const PROBE_WHILE_DOWN: Duration = Duration::from_millis(250);
/// Bound on one health check, which on a cluster may include making the connection
/// (asking a seed node for the slot map and connecting to the primaries).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
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
    #[error("budget.redis_ca_file {path}: {why}")]
    CaFile { path: String, why: String },
    #[error(
        "${0} holds a plain redis:// URL but budget.redis_ca_file is set; use rediss:// \
         for TLS, or remove the CA file"
    )]
    CaWithoutTls(String),
    #[error(
        "${0} holds several URLs (comma-separated), which only budget.redis_cluster = true \
         accepts"
    )]
    SeveralUrls(String),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl SetupError {
    /// Names the URL variable in errors made before it was known.
    fn in_env(self, url_env: &str) -> SetupError {
        match self {
            SetupError::Url { source, .. } => SetupError::Url {
                env: url_env.to_string(),
                source,
            },
            SetupError::CaWithoutTls(_) => SetupError::CaWithoutTls(url_env.to_string()),
            other => other,
        }
    }
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
    link: Link,
    /// The URL with any user name and password masked: the only form that is shown.
    address: String,
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

/// How the shared Redis is reached, beside its URL (`budget.redis_ca_file`,
/// `budget.redis_cluster`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// PEM roots trusted for `rediss://` in addition to the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// The URL variable names seed nodes of a Redis Cluster (comma-separated).
    pub cluster: bool,
}

impl Options {
    /// One client per URL in `urls` (comma-separated; one unless `cluster`), TLS roots
    /// applied to `rediss://` ones.
    fn clients(&self, urls: &str) -> Result<Vec<redis::Client>, SetupError> {
        let certs = self.certificates()?;
        let mut clients = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let tls = url.starts_with("rediss://");
            let client = match &certs {
                Some(certs) if tls => redis::Client::build_with_tls(url, certs.clone()),
                Some(_) => return Err(SetupError::CaWithoutTls(String::new())),
                None => redis::Client::open(url),
            };
            clients.push(client.map_err(|source| SetupError::Url {
                env: String::new(),
                source,
            })?);
        }
        Ok(clients)
    }

    /// The roots for `rediss://` when a CA file is given: the system's plus the file's
    /// (the crate trusts only the given roots once any are given, so both are passed).
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, SetupError> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let bad = |why: String| SetupError::CaFile {
            path: path.display().to_string(),
            why,
        };
        let text = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let found = rustls::pki_types::pem::PemObject::pem_slice_iter(&text)
            .collect::<Result<Vec<rustls::pki_types::CertificateDer<'_>>, _>>()
            .map_err(|e| bad(format!("not PEM certificates: {e}")))?;
        if found.is_empty() {
            return Err(bad("holds no PEM certificate".to_string()));
        }
        let mut pem = Vec::new();
        for cert in rustls_native_certs::load_native_certs().certs {
            pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
            for line in base64(&cert).as_bytes().chunks(64) {
                pem.extend_from_slice(line);
                pem.push(b'\n');
            }
            pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
        }
        pem.push(b'\n');
        pem.extend_from_slice(&text);
        Ok(Some(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        }))
    }

    /// A direct connection (tests, tools): a cluster connection when `cluster`, otherwise a
    /// multiplexed connection to the one URL.
    pub async fn open(&self, urls: &str) -> Result<Conn, SetupError> {
        if self.cluster {
            let client = self.cluster_client(urls)?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(SetupError::Connection)?;
            return Ok(Conn::Cluster(conn));
        }
        let client = self.clients(urls)?.remove(0);
        let conn = client
            .get_connection_manager()
            .await
            .map_err(SetupError::Connection)?;
        Ok(Conn::Single(conn))
    }

    fn cluster_client(&self, urls: &str) -> Result<ClusterClient, SetupError> {
        let infos = self
            .clients(urls)?
            .into_iter()
            .map(|c| c.get_connection_info().clone())
            .collect::<Vec<_>>();
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(CALL_TIMEOUT * 2)
            .response_timeout(CALL_TIMEOUT)
            .retries(1)
            .min_retry_wait(10)
            .max_retry_wait(50);
        if let Some(certs) = self.certificates()? {
            builder = builder.certs(certs);
        }
        builder.build().map_err(|source| SetupError::Url {
            env: String::new(),
            source,
        })
    }
}

/// Standard base64 with padding (PEM bodies); small enough not to need a crate.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The Redis URL(s) as they may be shown (logs, errors, `/admin/status`): any user name and
/// password are replaced by `***`, so `redis://app:s3cret@10.0.0.5:6379/0` shows as
/// `redis://***@10.0.0.5:6379/0`. Text that is not a URL shows as `(unparsable URL)`.
pub fn redacted_address(urls: &str) -> String {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return "(unparsable URL)".to_string();
            };
            // The authority ends at the first '/', '?' or '#'; a user part ends at its last '@'.
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(end);
            let host = match authority.rfind('@') {
                Some(at) => format!("***@{}", &authority[at + 1..]),
                None => authority.to_string(),
            };
            let tail = tail.split(['?', '#']).next().unwrap_or("");
            format!("{scheme}://{host}{tail}")
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// One connection to the shared Redis: a single server (reconnecting by itself) or a
/// cluster (routing each command to the node of its slot). Both run the same commands and
/// scripts, since every key of a deployment lives in one slot (see [`Redis::key`]).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// How [`Inner`] reaches Redis.
enum Link {
    Single {
        client: redis::Client,
        conn: ConnectionManager,
    },
    /// The cluster connection is made by the probe (it cannot be made lazily); `None` until
    /// the cluster first answers. Pub/sub goes to one seed node at a time: a cluster
    /// forwards every publication to every node.
    Cluster {
        client: Box<ClusterClient>,
        conn: Mutex<Option<ClusterConnection>>,
        seeds: Vec<redis::Client>,
    },
}

impl Link {
    fn conn(&self) -> Option<Conn> {
        match self {
            Link::Single { conn, .. } => Some(Conn::Single(conn.clone())),
            Link::Cluster { conn, .. } => conn
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .map(Conn::Cluster),
        }
    }

    /// The client for the `attempt`-th subscription (cycling through the seed nodes).
    fn pubsub_client(&self, attempt: usize) -> &redis::Client {
        match self {
            Link::Single { client, .. } => client,
            Link::Cluster { seeds, .. } => &seeds[attempt % seeds.len()],
        }
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
        Redis::connect_with(url_env, prefix, &Options::default(), registry).await
    }

    /// [`Redis::connect`] with TLS roots and cluster mode from `options`.
    pub async fn connect_with(
        url_env: &str,
        prefix: &str,
        options: &Options,
        registry: &Registry,
    ) -> Result<Redis, SetupError> {
        let url = std::env::var(url_env)
            .ok()
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| SetupError::MissingEnv(url_env.to_string()))?;
        let in_env = |e: SetupError| e.in_env(url_env);
        let link = if options.cluster {
            Link::Cluster {
                client: Box::new(options.cluster_client(&url).map_err(in_env)?),
                conn: Mutex::new(None),
                seeds: options.clients(&url).map_err(in_env)?,
            }
        } else {
            let mut clients = options.clients(&url).map_err(in_env)?;
            if clients.len() != 1 {
                return Err(SetupError::SeveralUrls(url_env.to_string()));
            }
            let client = clients.remove(0);
            // Reconnection is quick and short-lived: the probe decides health, and a
            // reconnect stuck in a long backoff would hide a server that is already back.
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(CALL_TIMEOUT * 2))
                .set_response_timeout(None)
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_millis(100));
            let conn = client
                .get_connection_manager_lazy(config)
                .map_err(SetupError::Connection)?;
            Link::Single { client, conn }
        };
        let address = redacted_address(&url);
        tracing::info!(
            redis = %address,
            cluster = options.cluster,
            tls = url.contains("rediss://"),
            "shared Redis for budget, token and invalidations"
        );
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
                link,
                address,
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
        redis.probe_once().await;
        let probe = tokio::spawn(probe(Arc::downgrade(&redis.inner)));
        redis.remember(probe);
        Ok(redis)
    }

    /// `{<prefix>}:<suffix>`: every key and channel of this deployment. The braces are a
    /// Redis Cluster hash tag: only the prefix decides the slot, so all of a deployment's
    /// keys live on one node and one script may touch several of them.
    pub fn key(&self, suffix: &str) -> String {
        hash_tagged(&self.inner.prefix, suffix)
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
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.inner.link.conn().filter(|_| self.is_up()) else {
            return Err(Unavailable::Down);
        };
        let result = match tokio::time::timeout(CALL_TIMEOUT, exchange(conn)).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => Unavailable::Command(err),
            Err(_) => Unavailable::Timeout(CALL_TIMEOUT),
        };
        self.inner.errors.with_label_values(&[op]).inc();
        self.inner.set_up(false, Some(&result));
        Err(result)
    }

    /// The Redis address as it may be shown: user name and password masked.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// One health check: marks Redis up or down and, when up, sends what is pending.
    async fn probe_once(&self) {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.inner.check()).await {
            Ok(Ok(())) => {
                if !self.is_up() {
                    self.inner.set_up(true, None);
                }
                self.flush_pending().await;
            }
            Ok(Err(why)) => {
                self.inner.errors.with_label_values(&["ping"]).inc();
                self.inner.set_up(false, Some(&why));
            }
            Err(_) => {
                self.inner.errors.with_label_values(&["ping"]).inc();
                let why = Unavailable::Timeout(CONNECT_TIMEOUT);
                self.inner.set_up(false, Some(&why));
            }
        }
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
    /// [`Invalidation::All`] (see the module docs). Returns once the first subscription is
    /// made or has failed (at most about a second): a replica that serves before it listens
    /// would miss what the others publish meanwhile, and nothing would tell it so.
    pub async fn spawn_subscriber(&self, apply: Apply) {
        let (ready, listening) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscribe(self.clone(), apply, ready));
        self.remember(task);
        let _ = tokio::time::timeout(Duration::from_secs(2), listening).await;
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
    /// A short-lived write of this replica's probe key, after making the cluster connection
    /// if there is none yet. A write, not a PING: a server that a failover demoted to a
    /// replica still answers PING but refuses writes (READONLY), and marking it up would
    /// flip this replica between the shared and the local budget on every request. On a
    /// cluster the key's slot also picks the node that matters: the one holding this
    /// deployment's keys.
    async fn check(&self) -> Result<(), Unavailable> {
        let failed = |e| Unavailable::Command(e);
        let mut conn = match &self.link {
            Link::Single { conn, .. } => Conn::Single(conn.clone()),
            Link::Cluster { client, conn, .. } => {
                let current = conn.lock().unwrap_or_else(PoisonError::into_inner).clone();
                match current {
                    Some(c) => Conn::Cluster(c),
                    None => {
                        let made = client.get_async_connection().await.map_err(failed)?;
                        *conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(made.clone());
                        Conn::Cluster(made)
                    }
                }
            }
        };
        let mut cmd = redis::cmd("SET");
        cmd.arg(hash_tagged(&self.prefix, &format!("probe:{}", self.id)))
            .arg(1)
            .arg("PX")
            .arg(10_000);
        let answer = cmd.query_async::<redis::Value>(&mut conn);
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(answer) => answer.map(|_| ()).map_err(failed),
            Err(_) => Err(Unavailable::Timeout(CALL_TIMEOUT)),
        }
    }

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

/// The one key builder (see [`Redis::key`]).
fn hash_tagged(prefix: &str, suffix: &str) -> String {
    format!("{{{prefix}}}:{suffix}")
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
        Redis { inner }.probe_once().await;
    }
}

/// The subscriber loop (see [`Redis::spawn_subscriber`]).
async fn subscribe(redis: Redis, apply: Apply, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let channel = redis.key("invalidate");
    // The first subscription at start has missed nothing; any later one may have.
    let mut first = true;
    let mut attempt = 0;
    loop {
        let client = redis.inner.link.pubsub_client(attempt);
        attempt += 1;
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_shown_without_user_or_password() {
        let cases = [
            ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
            (
                "redis://:s3cret@10.0.0.5:6379/0",
                "redis://***@10.0.0.5:6379/0",
            ),
            (
                "rediss://app:s3cret@redis.internal:6380/2",
                "rediss://***@redis.internal:6380/2",
            ),
            // A raw '@' in the password: everything up to the last '@' is hidden.
            ("redis://app:p@ss@host/", "redis://***@host/"),
            (
                "redis://app:pw@host:1?protocol=resp3#x",
                "redis://***@host:1",
            ),
            (
                "redis://u:a@n1:7000, redis://u:a@n2:7001",
                "redis://***@n1:7000,redis://***@n2:7001",
            ),
            ("app:s3cret@host", "(unparsable URL)"),
        ];
        for (url, shown) in cases {
            assert_eq!(redacted_address(url), shown, "for {url:?}");
        }
    }

    #[test]
    fn pem_bodies_are_standard_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar\xff"), "Zm9vYmFy/w==");
    }

    #[test]
    fn every_key_carries_the_deployment_hash_tag() {
        assert_eq!(
            hash_tagged("cxgate", "budget:global"),
            "{cxgate}:budget:global"
        );
        assert_eq!(hash_tagged("a", "token:lock"), "{a}:token:lock");
    }

    #[test]
    fn a_ca_file_is_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("cxgate-ca-{}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").expect("write");
        let missing = dir.join("missing.pem");
        for path in [junk, missing] {
            let options = Options {
                ca_file: Some(path.clone()),
                cluster: false,
            };
            let err = options
                .clients("rediss://127.0.0.1:1/")
                .err()
                .map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("budget.redis_ca_file")),
                "expected {path:?} refused naming budget.redis_ca_file, saw {err:?}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
