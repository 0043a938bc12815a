//! Several replicas behind one load balancer: the one Redis handle the budget, the token
//! and the cache wiring share, its health (every call bounded; down at a refused connection,
//! an error or a failed probe, so losing Redis costs requests nothing, but not at one slow
//! answer), and the channel that carries cache invalidations.
//! It imports nothing of the gateway; README "The Redis link, the shared token and
//! invalidations, in detail" says how each part behaves.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

mod acks;
mod members;
mod pending;
mod repairs;
mod tables;
pub use tables::{Current, Table, MAX_LIST_BYTES};

/// The health probe: a script (what every admission runs) that writes the probe key
/// (KEYS[1], for ARGV[1] ms) and publishes to `{<prefix>}:probe` (ARGV[2], which no
/// replica listens on) -- the rights the budget, the token and the invalidations need.
/// A user refused any of them makes the probe fail, so Redis stays marked down instead of
/// flapping between up (a plain SET works) and down (the next script or publication fails).
/// It answers where the count of invalidations stands (KEYS[2], see `members`), so a
/// replica notices within a probe or two that its subscription stopped carrying them.
static PROBE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[2], '')
local seq = redis.pcall('GET', KEYS[2])
if type(seq) == 'string' and #seq <= 40 then return seq end
return false
",
    )
});

/// Extends a lock key (KEYS[1]) by ARGV[2] ms if, and only if, it still holds ARGV[1]: a
/// holder never extends a lock that expired and another replica took.
static EXTEND_LOCK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
",
    )
});

/// Deletes a lock key (KEYS[1]) if, and only if, it still holds ARGV[1].
static RELEASE_LOCK: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
",
    )
});

/// Bound on one Redis round trip of the budget and the invalidation channel,
/// which run on every admission: Redis answers in well under a millisecond on a healthy
/// network, and past this bound the caller takes its local fallback for that call.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(100);
/// Bound on one run of the budget's script. An answer later than [`CALL_TIMEOUT`] is
/// latency, not an outage, and the script it answers has run in Redis, booked where every
/// replica sees it: a replica that gave up on it and admitted on its local share instead
/// would spend that share on top of what the shared count lets the others spend. So the
/// budget waits for the answer, and only a Redis that answers nothing within this (the
/// probe's bound too) counts as down, which moves the replica to its local share.
pub const BUDGET_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a shared cache tier call on the request path (a lookup, the fill lock, a wait
/// for another replica's fill): giving up there costs an upstream call, the one thing the
/// tier exists to save, so a slow Redis is waited for longer and costs latency instead.
pub const PATIENT_CALL_TIMEOUT: Duration = Duration::from_millis(500);
/// Bound on a call made off the request path (a fetched answer written to the shared tier):
/// it lands when a slow Redis catches up, and the client is not kept waiting for it.
pub const BACKGROUND_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls that time out in a row mark Redis down only once there are this many of them...
const SLOW_STRIKES: u32 = 3;
/// ...and they span this long with no call answered between: one slow answer on a busy
/// machine is latency, not an outage. A refused or dropped connection, an error Redis sends,
/// or a failed probe marks it down at once.
const SLOW_FOR: Duration = Duration::from_secs(1);
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
/// A replica that has not heard a publication this long after the probe saw it made takes
/// its subscription for stalled: it resubscribes and replays what it missed.
const STALL_AFTER: Duration = Duration::from_secs(1);
/// Messages (sender and id) remembered as applied, so one sent twice (a queued invalidation
/// sent again after a frozen Redis ran the first late, or replayed) is applied once.
const APPLIED_KEPT: usize = 4096;

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
    /// Asks each replica that applies it to say so on the publisher's channel (see
    /// `acks`); absent from the subscription check and from older versions' messages.
    /// A queued invalidation keeps its id when it is sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ack: Option<u64>,
    /// Its number in the count of publications and that count's epoch, added by the
    /// publishing script (see `members`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<String>,
}

/// How a publication went: its `cxgate_redis_invalidations_total` result, and how many
/// shared cache entries its removal there deleted (`None` when it did not run: no tier,
/// or queued).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub result: &'static str,
    pub shared_removed: Option<u64>,
}

/// Why a Redis call did not happen or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("Redis is unreachable (waiting for the probe to see it back)")]
    Down,
    /// Refused to a call of [`CALL_TIMEOUT`] only (see [`Redis::is_prompt`]).
    #[error("Redis answers slower than {CALL_TIMEOUT:?} (waiting for the probe to see it prompt)")]
    Slow,
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Shown by [`shown_error`] only: the text Redis (or a proxy in front of it) sends may
    /// quote the command's arguments, which can hold the token record.
    #[error("Redis: {}", shown_error(.0))]
    Command(#[source] redis::RedisError),
}

impl Unavailable {
    /// Redis answered that a key holds another type than the command reads (`WRONGTYPE`):
    /// the key is wrong, not Redis.
    pub fn is_wrong_type(&self) -> bool {
        matches!(self, Unavailable::Command(err) if err.code() == Some("WRONGTYPE"))
    }

    /// Redis was asked and did not answer in time (this side's bound, or the cluster
    /// client's): it may answer the next call, unlike a Redis marked down or one that refused.
    pub fn is_slow(&self) -> bool {
        match self {
            Unavailable::Timeout(_) | Unavailable::Slow => true,
            Unavailable::Command(err) => err.is_timeout(),
            Unavailable::Down => false,
        }
    }
}

/// What may be shown of a Redis error (logs, `/admin/status`): its category and, for an
/// error Redis sent, its code (`NOPERM`, `READONLY`, ...) from a fixed list, never the
/// text after it. A server or a proxy can quote the command it refuses ("unknown command
/// 'EVALSHA', with args beginning with: ..."), and a command's arguments can be the token
/// record; a code that is not on the list is not shown either, since it too is the server's
/// text. Errors made on this side (a refused connection, a TLS failure) are shown whole:
/// they hold no argument.
pub fn shown_error(err: &redis::RedisError) -> String {
    use redis::ErrorKind;
    const CODES: &[&str] = &[
        "ERR",
        "EXECABORT",
        "LOADING",
        "NOSCRIPT",
        "MOVED",
        "ASK",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "CROSSSLOT",
        "MASTERDOWN",
        "READONLY",
        "NOTBUSY",
        "NOSUB",
        "NOPERM",
        "WRONGPASS",
        "NOAUTH",
        "OOM",
        "BUSY",
        "MISCONF",
        "WRONGTYPE",
        "NOREPLICAS",
        "NOPROTO",
    ];
    match err.kind() {
        ErrorKind::Io | ErrorKind::ClusterConnectionNotFound => err.to_string(),
        kind => {
            let code = err.code().filter(|c| CODES.contains(c));
            let from_server = matches!(
                kind,
                ErrorKind::Server(_) | ErrorKind::Extension | ErrorKind::AuthenticationFailed
            );
            let category = match (kind, err.category()) {
                (ErrorKind::Server(redis::ServerErrorKind::NoPerm), _) => "no permission",
                (_, "") => "error",
                (_, category) => category,
            };
            match code {
                Some(code) => format!("{category} ({code})"),
                None if from_server => format!("{category} (code not shown)"),
                None => category.to_string(),
            }
        }
    }
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
        "${env} holds a URL starting {found:?}; accepted: redis:// (plain TCP) or rediss:// \
         (TLS), e.g. redis://10.0.0.5:6379/0"
    )]
    Scheme { env: String, found: String },
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
            SetupError::Scheme { found, .. } => SetupError::Scheme {
                env: url_env.to_string(),
                found,
            },
            other => other,
        }
    }

    /// A setting is wrong (the URL, the CA file), as opposed to a failure while starting:
    /// `cxgate run` exits as for an invalid configuration.
    pub fn is_setting(&self) -> bool {
        !matches!(
            self,
            SetupError::Connection(_) | SetupError::Metrics(_) | SetupError::MissingEnv(_)
        )
    }
}

/// What `cxgate check` can tell of the Redis settings without connecting: the CA file,
/// and the URL when `url` (the variable's value here) is given. The same checks as start.
pub fn check_settings(
    url_env: &str,
    url: Option<&str>,
    options: &Options,
) -> Result<(), SetupError> {
    options.certificates()?;
    let Some(url) = url.filter(|u| !u.trim().is_empty()) else {
        return Ok(());
    };
    let clients = options.clients(url).map_err(|e| e.in_env(url_env))?;
    if !options.cluster && clients.len() != 1 {
        return Err(SetupError::SeveralUrls(url_env.to_string()));
    }
    // A cluster's seeds must agree (one password, one user, one database): start builds
    // the cluster client from them and refuses what it refuses.
    if options.cluster {
        options.cluster_client(url).map_err(|e| e.in_env(url_env))?;
    }
    Ok(())
}

/// What `/admin/status` shows of the shared Redis.
struct Health {
    since: std::time::SystemTime,
    last_error: Option<String>,
    channel_error: Option<String>,
}

/// Every operation [`Redis::run`] and the probe count errors under, so each
/// `cxgate_redis_errors_total` series is there (at 0) from the first scrape.
const OPS: &[&str] = &["budget", "cache", "ping", "publish", "token"];

/// Applies one invalidation received from another replica.
pub type Apply =
    Arc<dyn Fn(Invalidation) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Removes what an invalidation names from state kept in Redis itself (the shared cache
/// tier), before it is published, answering how many entries it deleted; an error keeps
/// the invalidation queued like a failed publication, so it is applied there too once
/// Redis is back.
pub type Remove = Arc<
    dyn Fn(Invalidation) -> Pin<Box<dyn Future<Output = Result<u64, Unavailable>> + Send>>
        + Send
        + Sync,
>;

/// Messages applied lately by sender and id: a set to look them up, and their order to
/// forget the oldest.
type Applied = (HashSet<(String, u64)>, VecDeque<(String, u64)>);

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
    /// The current run of timed-out calls with no answer between: when it began and how
    /// many (see [`SLOW_STRIKES`]); `slowing` says there is one without taking the lock.
    slow: Mutex<Option<(tokio::time::Instant, u32)>>,
    slowing: AtomicBool,
    /// No call has timed out since the probe last saw an answer within [`CALL_TIMEOUT`]
    /// (see [`Redis::is_prompt`]).
    prompt: AtomicBool,
    /// The invalidation channel is subscribed and carries messages (see [`subscribe`]).
    listening: AtomicBool,
    /// The connection was replaced for its silence and no probe has been answered since
    /// (see [`Inner::redial`]).
    redialled: AtomicBool,
    /// Since when Redis is up or down, and why it last failed (shown by [`Redis::status`]).
    health: Mutex<Health>,
    gauge: IntGauge,
    errors: IntCounterVec,
    /// Publications that failed, each with the id it was first published under, oldest
    /// first (see `pending`).
    pending: Mutex<pending::Queue>,
    /// Wakes the task that sends them (see `pending`).
    send_pending: Arc<tokio::sync::Notify>,
    /// Other replicas listed as listening at this replica's last heartbeat (see `members`).
    others_live: AtomicUsize,
    /// This replica's last heartbeat: until when its own entry lasts, and the others then
    /// listed with the ends of their entries (on tokio's clock). A publication that finds
    /// the registry without this replica's entry, before that entry's end, found a registry
    /// that lost live entries: it also waits for these.
    last_join: Mutex<Option<members::Heartbeat>>,
    /// The highest publication this replica heard or replayed (see `members`).
    heard: Mutex<Option<members::Position>>,
    /// The oldest publication the probe saw made that this replica has not heard yet, and
    /// when the probe first saw it.
    lag: Mutex<Option<(members::Position, tokio::time::Instant)>>,
    /// Tells the subscriber its subscription stalled (see [`STALL_AFTER`]).
    stalled: tokio::sync::Notify,
    /// Messages applied lately, by sender and id (see [`APPLIED_KEPT`]).
    applied: Mutex<Applied>,
    /// Run before each publication (see [`Redis::remove_before_publishing`]).
    remove: std::sync::OnceLock<Remove>,
    /// Publications waiting for the other replicas to say they applied them.
    acks: acks::Acks,
    /// Whether the last announcement of the route table found more tables live than the
    /// list keeps (said once; see `tables`).
    tables_over: AtomicBool,
    /// Whether the last read of the list of tables found junk in it (said once).
    tables_junk: AtomicBool,
    /// Values read that no replica writes, repaired (see `repairs`).
    repairs: repairs::Repairs,
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
            if !url.starts_with("redis://") && !url.starts_with("rediss://") {
                // Only the scheme is shown: the rest may hold a password.
                let found = match url.split_once("://") {
                    Some((scheme, _)) => format!("{scheme}://"),
                    None => "(no scheme)".to_string(),
                };
                return Err(SetupError::Scheme {
                    env: String::new(),
                    found,
                });
            }
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
        let text = crate::config::files::read(path).map_err(|e| bad(e.to_string()))?;
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
            // Each call has its own bound on this side; the client's must not cut the
            // longest of them short.
            .response_timeout(BACKGROUND_CALL_TIMEOUT)
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

/// How [`Inner`] reaches Redis. Each connection carries its number (one more at every
/// [`Link::redial`]), so a call that timed out names the connection it waited on, and a
/// connection is replaced once however many calls timed out on it.
enum Link {
    Single {
        client: redis::Client,
        conn: Mutex<(u64, ConnectionManager)>,
    },
    /// The cluster connection is made by the probe (it cannot be made lazily); `None` until
    /// the cluster first answers. Pub/sub goes to one seed node at a time: a cluster
    /// forwards every publication to every node.
    Cluster {
        client: Box<ClusterClient>,
        conn: Mutex<(u64, Option<ClusterConnection>)>,
        seeds: Vec<redis::Client>,
    },
}

/// How the single-server connection (re)connects. Quick and short-lived: the probe decides
/// health, and a reconnect stuck in a long backoff would hide a server that is already back.
/// No response timeout of its own: each call has its bound on this side.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CALL_TIMEOUT * 2))
        .set_response_timeout(None)
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(100))
}

impl Link {
    fn conn(&self) -> Option<Conn> {
        self.current().map(|(_, conn)| conn)
    }

    /// The connection calls use now, with its number.
    fn current(&self) -> Option<(u64, Conn)> {
        match self {
            Link::Single { conn, .. } => {
                let (number, conn) = &*lock(conn);
                Some((*number, Conn::Single(conn.clone())))
            }
            Link::Cluster { conn, .. } => {
                let (number, conn) = &*lock(conn);
                conn.clone().map(|c| (*number, Conn::Cluster(c)))
            }
        }
    }

    /// The number of the connection calls use now (or the next one made, on a cluster).
    fn number(&self) -> u64 {
        match self {
            Link::Single { conn, .. } => lock(conn).0,
            Link::Cluster { conn, .. } => lock(conn).0,
        }
    }

    /// Replaces connection `used` (a call waited on it for its whole bound with no answer)
    /// by a new one: a connection that stays open while nothing comes back on it (a relay
    /// or firewall that stopped forwarding, a server that lost it) is never replaced by the
    /// client itself, which reconnects only when the connection fails. Calls already
    /// waiting on the old one keep it until their own bounds. False when `used` was
    /// replaced already, or a new one cannot be set up.
    fn redial(&self, used: u64) -> bool {
        match self {
            Link::Single { client, conn } => {
                let mut conn = lock(conn);
                if conn.0 != used {
                    return false;
                }
                match client.get_connection_manager_lazy(manager_config()) {
                    Ok(fresh) => {
                        *conn = (used + 1, fresh);
                        true
                    }
                    Err(_) => false,
                }
            }
            Link::Cluster { conn, .. } => {
                let mut conn = lock(conn);
                if conn.0 != used {
                    return false;
                }
                // The probe makes the next one.
                *conn = (used + 1, None);
                true
            }
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
    /// Builds the handle from the URL in environment variable `url_env` as it is now,
    /// registers the `cxgate_redis_*` metrics and starts the health probe: for callers
    /// without a config (tools, tests). The gateway reads its secrets once at start and
    /// calls [`Redis::connect_with`].
    pub async fn connect(
        url_env: &str,
        prefix: &str,
        registry: &Registry,
    ) -> Result<Redis, SetupError> {
        let secrets = crate::secrets::Secrets::from_vars([url_env]);
        let url = secrets.get(url_env).map(|url| url.expose());
        Redis::connect_with(url_env, url, prefix, &Options::default(), registry).await
    }

    /// Builds the handle from `url`, the value of environment variable `url_env` (named in
    /// errors), with TLS roots and cluster mode from `options`; registers the
    /// `cxgate_redis_*` metrics and starts the health probe. An unreachable server is not an
    /// error: the replica starts on its local fallbacks and switches over when Redis answers.
    pub async fn connect_with(
        url_env: &str,
        url: Option<&str>,
        prefix: &str,
        options: &Options,
        registry: &Registry,
    ) -> Result<Redis, SetupError> {
        let url = url
            .filter(|v| !v.trim().is_empty())
            .ok_or_else(|| SetupError::MissingEnv(url_env.to_string()))?;
        let in_env = |e: SetupError| e.in_env(url_env);
        let link = if options.cluster {
            Link::Cluster {
                client: Box::new(options.cluster_client(url).map_err(in_env)?),
                conn: Mutex::new((0, None)),
                seeds: options.clients(url).map_err(in_env)?,
            }
        } else {
            let mut clients = options.clients(url).map_err(in_env)?;
            if clients.len() != 1 {
                return Err(SetupError::SeveralUrls(url_env.to_string()));
            }
            let client = clients.remove(0);
            let conn = client
                .get_connection_manager_lazy(manager_config())
                .map_err(SetupError::Connection)?;
            Link::Single {
                client,
                conn: Mutex::new((0, conn)),
            }
        };
        let address = redacted_address(url);
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
        for op in OPS {
            errors.with_label_values(&[op]);
        }
        let acks = acks::Acks::register(registry)?;
        let repairs = repairs::Repairs::register(registry)?;
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
                slow: Mutex::new(None),
                slowing: AtomicBool::new(false),
                prompt: AtomicBool::new(true),
                listening: AtomicBool::new(true),
                redialled: AtomicBool::new(false),
                health: Mutex::new(Health {
                    since: std::time::SystemTime::now(),
                    last_error: None,
                    channel_error: None,
                }),
                gauge,
                errors,
                pending: Mutex::new(pending::Queue::new()),
                send_pending: Arc::new(tokio::sync::Notify::new()),
                others_live: AtomicUsize::new(0),
                last_join: Mutex::new(None),
                heard: Mutex::new(None),
                lag: Mutex::new(None),
                stalled: tokio::sync::Notify::new(),
                applied: Mutex::new((HashSet::new(), VecDeque::new())),
                remove: std::sync::OnceLock::new(),
                acks,
                tables_over: AtomicBool::new(false),
                tables_junk: AtomicBool::new(false),
                repairs,
                tasks: Mutex::new(Vec::new()),
            }),
        };
        redis.inner.gauge.set(1);
        // A failure is logged by the health transition itself; the replica starts anyway.
        redis.probe_once().await;
        let probe = tokio::spawn(probe(Arc::downgrade(&redis.inner)));
        redis.remember(probe);
        redis.spawn_sender();
        Ok(redis)
    }

    /// `{<prefix>}:<suffix>`: every key and channel of this deployment. The braces are a
    /// Redis Cluster hash tag: only the prefix decides the slot, so all of a deployment's
    /// keys live on one node and one script may touch several of them.
    pub fn key(&self, suffix: &str) -> String {
        hash_tagged(&self.inner.prefix, suffix)
    }

    /// Counts a value read from `key` (a key of this deployment) that no replica writes,
    /// which the caller has cut back, dropped or replaced, in
    /// `cxgate_redis_repairs_total{key}`, and says so once per incident: `what` names what
    /// was found and what was done about it.
    pub fn repaired(&self, key: &str, what: &str) {
        let prefix = hash_tagged(&self.inner.prefix, "");
        let suffix = key.strip_prefix(prefix.as_str()).unwrap_or(key);
        self.inner.repairs.note(repairs::label(suffix), key, what);
    }

    /// [`Redis::repaired`] for a value told apart by `value` (a digest of it): another
    /// value than the one repaired last is a new incident, said at once.
    pub fn repaired_value(&self, key: &str, value: u64, what: &str) {
        let prefix = hash_tagged(&self.inner.prefix, "");
        let suffix = key.strip_prefix(prefix.as_str()).unwrap_or(key);
        self.inner
            .repairs
            .note_value(repairs::label(suffix), key, Some(value), what);
    }

    /// This replica's unique id (lock values, message senders).
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Whether calls are attempted at all (see the module docs).
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Whether calls bounded by [`CALL_TIMEOUT`] ([`Redis::run`]: publications, the route
    /// tables) are attempted: Redis is up, and no call has timed out since the probe
    /// last saw it answer within that bound. Past a timeout those callers stay on their
    /// local fallback until the probe (every 250 ms meanwhile) sees Redis prompt again,
    /// rather than switch back and forth at every call of a Redis that answers sometimes
    /// in time; the shared cache tier and the token's refresh, whose calls have longer
    /// bounds, go on using it (the token's watch of the record waits for it to be prompt),
    /// and so does the budget ([`Redis::run_budget`]), which waits for a late answer.
    pub fn is_prompt(&self) -> bool {
        self.is_up() && self.inner.prompt.load(Ordering::Acquire)
    }

    /// Takes the lock `key` with `value` for `ttl` (`SET NX PX`): true when taken, false when
    /// another holds it.
    pub async fn try_lock(
        &self,
        op: &'static str,
        key: &str,
        value: &str,
        ttl: Duration,
        bound: Duration,
    ) -> Result<bool, Unavailable> {
        let (k, v) = (key.to_owned(), value.to_owned());
        let set: Option<String> = self
            .run_within(op, bound, |mut c| async move {
                redis::cmd("SET")
                    .arg(&k)
                    .arg(&v)
                    .arg("NX")
                    .arg("PX")
                    .arg(lock_millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(set.is_some())
    }

    /// How long the lock `key` still holds (`PTTL`): `None` when nobody holds it.
    pub async fn lock_left(
        &self,
        op: &'static str,
        key: &str,
        bound: Duration,
    ) -> Result<Option<Duration>, Unavailable> {
        let k = key.to_owned();
        let left: i64 = self
            .run_within(op, bound, |mut c| async move {
                redis::cmd("PTTL").arg(&k).query_async(&mut c).await
            })
            .await?;
        // -2: no such key; -1: no expiry, which no lock is written without.
        Ok(u64::try_from(left)
            .ok()
            .filter(|&ms| ms > 0)
            .map(Duration::from_millis))
    }

    /// Extends the lock `key` for `ttl` if it still holds `value`; false when it does not
    /// (expired and maybe taken by another) or Redis cannot say.
    pub async fn extend_lock(
        &self,
        op: &'static str,
        key: &str,
        value: &str,
        ttl: Duration,
        bound: Duration,
    ) -> bool {
        let (k, v) = (key.to_owned(), value.to_owned());
        let kept = self
            .run_within(op, bound, |mut c| async move {
                EXTEND_LOCK
                    .key(&k)
                    .arg(&v)
                    .arg(lock_millis(ttl))
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        matches!(kept, Ok(1))
    }

    /// Deletes the lock `key` if it still holds `value` (a lock that expired and was taken
    /// by another stays theirs).
    pub async fn release_lock(&self, op: &'static str, key: &str, value: &str, bound: Duration) {
        let (k, v) = (key.to_owned(), value.to_owned());
        let _ = self
            .run_within(op, bound, |mut c| async move {
                RELEASE_LOCK
                    .key(&k)
                    .arg(&v)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Runs one Redis exchange on the shared connection, bounded by [`CALL_TIMEOUT`], as
    /// [`Redis::run_within`] does; not sent while Redis is not prompt ([`Redis::is_prompt`]).
    pub async fn run<T, F, Fut>(&self, op: &'static str, exchange: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.is_up() && !self.is_prompt() {
            return Err(Unavailable::Slow);
        }
        self.run_within(op, CALL_TIMEOUT, exchange).await
    }

    /// Runs one exchange of the shared budget, bounded by [`BUDGET_CALL_TIMEOUT`] and sent
    /// whenever Redis is up, prompt or not: a late answer is an answer. No answer within
    /// the bound marks Redis down at once, as a probe unanswered that long does; any other
    /// failure counts as in [`Redis::run_within`].
    pub async fn run_budget<T, F, Fut>(&self, exchange: F) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some((number, conn)) = self.inner.link.current().filter(|_| self.is_up()) else {
            return Err(Unavailable::Down);
        };
        let why = match tokio::time::timeout(BUDGET_CALL_TIMEOUT, exchange(conn)).await {
            Ok(Ok(value)) => {
                self.inner.answered();
                return Ok(value);
            }
            Ok(Err(err)) => {
                let why = Unavailable::Command(err);
                if why.is_wrong_type() {
                    // The script replaces a key of the wrong type itself; one that still
                    // comes back is the key's fault, not Redis's (as in `run_within`).
                    self.inner.answered();
                } else {
                    self.inner.failed(&why);
                }
                why
            }
            Err(_) => {
                let why = Unavailable::Timeout(BUDGET_CALL_TIMEOUT);
                self.inner.set_up(false, Some(&why));
                self.inner.redial(number);
                why
            }
        };
        self.inner.errors.with_label_values(&["budget"]).inc();
        Err(why)
    }

    /// Runs one Redis exchange on the shared connection, bounded by `bound`. A failure marks
    /// Redis down, except a timeout, which does so only as part of a run of them with no
    /// answer between ([`SLOW_STRIKES`], [`SLOW_FOR`]); while it is down nothing is sent.
    pub async fn run_within<T, F, Fut>(
        &self,
        op: &'static str,
        bound: Duration,
        exchange: F,
    ) -> Result<T, Unavailable>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(conn) = self.inner.link.conn().filter(|_| self.is_up()) else {
            return Err(Unavailable::Down);
        };
        let result = match tokio::time::timeout(bound, exchange(conn)).await {
            Ok(Ok(value)) => {
                self.inner.answered();
                return Ok(value);
            }
            Ok(Err(err)) => Unavailable::Command(err),
            Err(_) => Unavailable::Timeout(bound),
        };
        self.inner.errors.with_label_values(&[op]).inc();
        if result.is_wrong_type() {
            // Redis answered: a key holds another type than the string written to it
            // (planted, or left by something else). Not an outage: the caller falls back for
            // this call, and replaces the key where it owns it.
            self.inner.answered();
            self.inner.repairs.note(
                "other",
                op,
                &format!(
                    "a key read for {op} holds another type than the string the gateway \
                     writes (WRONGTYPE); this call fell back as if Redis were away, Redis \
                     is not down"
                ),
            );
            return Err(result);
        }
        self.inner.failed(&result);
        Err(result)
    }

    /// What `/admin/status` shows: reachable or not and since when, whether the
    /// invalidation channel works, and the last error as [`shown_error`] shows it. The
    /// address is not included: the masked form is in the start-up log line.
    pub fn status(&self) -> serde_json::Value {
        let health = self
            .inner
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let heard = lock(&self.inner.heard).as_ref().map(|(_, seq)| *seq);
        let pending = lock(&self.inner.pending).len();
        serde_json::json!({
            "backend": "redis",
            "cluster": matches!(self.inner.link, Link::Cluster { .. }),
            "reachable": self.is_up(),
            "since": humantime::format_rfc3339_seconds(health.since).to_string(),
            "invalidations_heard": self.inner.listening.load(Ordering::Acquire),
            "channel_error": health.channel_error,
            "last_error": health.last_error,
            "other_replicas_listening": self.inner.others_live.load(Ordering::Relaxed),
            "invalidations_published": self.inner.acks.totals(),
            "invalidations_queued": pending,
            "last_invalidation_heard": heard,
        })
    }

    /// The Redis address as it may be shown: user name and password masked.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// One health check: marks Redis up or down and, when up, wakes the sender of what is
    /// queued (which takes as long as the other replicas take to acknowledge, off the probe).
    async fn probe_once(&self) {
        let asked = tokio::time::Instant::now();
        let number = self.inner.link.number();
        match tokio::time::timeout(CONNECT_TIMEOUT, self.inner.check()).await {
            Ok(Ok(position)) => {
                self.inner.answered();
                if self.inner.redialled.swap(false, Ordering::AcqRel) {
                    tracing::info!("Redis answers on the new connection");
                }
                self.inner.watch_lag(position);
                if asked.elapsed() <= CALL_TIMEOUT
                    && !self.inner.prompt.swap(true, Ordering::AcqRel)
                {
                    tracing::info!("Redis answers promptly again: shared budget and token resume");
                }
                if !self.is_up() {
                    self.inner.set_up(true, None);
                }
                if self.has_pending() {
                    self.inner.send_pending.notify_one();
                }
            }
            Ok(Err(why)) => {
                self.inner.errors.with_label_values(&["ping"]).inc();
                self.inner.set_up(false, Some(&why));
            }
            Err(_) => {
                self.inner.errors.with_label_values(&["ping"]).inc();
                let why = Unavailable::Timeout(CONNECT_TIMEOUT);
                self.inner.set_up(false, Some(&why));
                self.inner.redial(number);
            }
        }
    }

    /// Tells the other replicas to drop what this one just dropped, and waits until each
    /// replica listed as listening when the message went out says it did (see `acks` and
    /// `members`). Waits at most [`PATIENT_CALL_TIMEOUT`] for the publication and as long
    /// again for the answers: a write's invalidation is worth that much latency on a slow
    /// Redis; while Redis is down (or the call times out) the message is kept, with its id,
    /// and sent when the probe sees Redis back. While older messages still wait to be sent,
    /// it is queued behind them at once, so the others apply them in the order they were made.
    pub async fn publish(&self, what: Invalidation) -> Published {
        let id = self.inner.acks.next_id();
        let what = if self.has_pending() {
            what
        } else {
            match self.try_publish(what, id).await {
                Ok(published) => return published,
                Err(what) => what,
            }
        };
        self.inner.acks.count("queued", 0, PATIENT_CALL_TIMEOUT);
        self.keep_pending(what, id);
        self.inner.send_pending.notify_one();
        Published {
            result: "queued",
            shared_removed: None,
        }
    }

    /// Has every later invalidation applied by `remove` before it is published, queued
    /// with it while Redis is down (once; later calls are ignored).
    pub fn remove_before_publishing(&self, remove: Remove) {
        let _ = self.inner.remove.set(remove);
    }

    /// One attempt at publishing `what` as message `id`; gives it back when Redis did not
    /// take it (the shared tier's removal or the publication failed).
    async fn try_publish(&self, what: Invalidation, id: u64) -> Result<Published, Invalidation> {
        let mut shared_removed = None;
        if let Some(remove) = self.inner.remove.get() {
            match remove(what.clone()).await {
                Ok(n) => shared_removed = Some(n),
                Err(_) => return Err(what),
            }
        }
        let mut waiter = self.inner.acks.waiter_for(id);
        let message = Message {
            from: self.inner.id.clone(),
            what,
            ack: Some(id),
            seq: None,
            epoch: None,
        };
        let head = match serde_json::to_string(&message) {
            Ok(text) if text.ends_with('}') => text[..text.len() - 1].to_string(),
            _ => {
                return Ok(Published {
                    result: "alone",
                    shared_removed,
                })
            }
        };
        let published = match self.publish_numbered(head).await {
            Ok(published) => published,
            Err(_) => return Err(message.what),
        };
        let expected = self.expected(published);
        let result = if expected.is_empty() {
            self.inner.acks.count("alone", 0, PATIENT_CALL_TIMEOUT);
            "alone"
        } else {
            let missing = waiter.missing(&expected, PATIENT_CALL_TIMEOUT).await;
            let result = if missing == 0 {
                "acknowledged"
            } else {
                "unacknowledged"
            };
            self.inner.acks.count(result, missing, PATIENT_CALL_TIMEOUT);
            result
        };
        Ok(Published {
            result,
            shared_removed,
        })
    }

    /// The replicas a publication waits for: those listed when it went out, and when the
    /// registry had lost this replica's own live entry (Redis emptied, or the key replaced
    /// by a value no replica wrote), also those listed at this replica's last heartbeat
    /// whose entries have not ended: a registry no live replica answers for must not make
    /// a write go unwaited ("alone"). It is written again at once.
    fn expected(&self, published: members::Published) -> Vec<String> {
        let mut expected = published.others;
        if published.listed_self {
            return expected;
        }
        let now = tokio::time::Instant::now();
        let remembered = match &*lock(&self.inner.last_join) {
            Some(beat) if beat.own_end > now => beat
                .others
                .iter()
                .filter(|(_, end)| *end > now)
                .map(|(id, _)| id.clone())
                .collect(),
            _ => Vec::new(),
        };
        if !remembered.is_empty() {
            let redis = self.clone();
            tokio::spawn(async move {
                let _ = redis.join().await;
            });
        }
        for id in remembered {
            if !expected.contains(&id) {
                expected.push(id);
            }
        }
        expected
    }

    /// Listens on the invalidation channel and hands every other replica's message to
    /// `apply`. Reconnects by itself; after a lost subscription it applies
    /// [`Invalidation::All`] (see the module docs). Returns once the first subscription is
    /// made and heard, or has failed (at most about two seconds): a replica that serves
    /// before it listens would miss what the others publish meanwhile, and nothing would
    /// tell it so.
    pub async fn spawn_subscriber(&self, apply: Apply) {
        let (ready, listening) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscribe(self.clone(), apply, ready));
        self.remember(task);
        let _ = tokio::time::timeout(Duration::from_secs(3), listening).await;
    }

    /// Keeps `task` with the link's own, so [`Redis::stop`] ends it too.
    pub(crate) fn remember(&self, task: JoinHandle<()>) {
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
    /// if there is none yet, made by a script that also publishes (see [`PROBE`]): what a
    /// replica needs, so a user that may SET but not run scripts or publish is not "back"
    /// after every probe only to fail the next admission. A write, not a PING: a server that a failover demoted to a
    /// replica still answers PING but refuses writes (READONLY), and marking it up would
    /// flip this replica between the shared and the local budget on every request. On a
    /// cluster the key's slot also picks the node that matters: the one holding this
    /// deployment's keys.
    async fn check(&self) -> Result<Option<members::Position>, Unavailable> {
        let failed = |e| Unavailable::Command(e);
        let mut conn = match (&self.link, self.link.conn()) {
            (_, Some(conn)) => conn,
            (Link::Cluster { client, conn, .. }, None) => {
                let number = self.link.number();
                let made = client.get_async_connection().await.map_err(failed)?;
                let mut conn = lock(conn);
                // Unless it was replaced meanwhile.
                if conn.0 == number {
                    conn.1 = Some(made.clone());
                }
                Conn::Cluster(made)
            }
            (Link::Single { .. }, None) => return Err(Unavailable::Down),
        };
        let mut call = PROBE.key(hash_tagged(&self.prefix, &format!("probe:{}", self.id)));
        call.key(hash_tagged(&self.prefix, "invalidate:seq"))
            .arg(10_000)
            .arg(hash_tagged(&self.prefix, "probe"));
        // Bounded by the caller's probe bound, not a call's: a Redis slower than a call's
        // bound but answering within the probe's is slow, not down.
        let answer = call
            .invoke_async::<redis::Value>(&mut conn)
            .await
            .map_err(failed)?;
        Ok(match answer {
            redis::Value::BulkString(raw) => members::parse_position(&raw),
            _ => None,
        })
    }

    /// Compares where the count of invalidations stands (`now`, as the probe read it) with
    /// what this replica heard: a publication the probe saw and the subscription has not
    /// carried [`STALL_AFTER`] later means the subscription stalled (a connection dropped
    /// without a word); the subscriber is told to resubscribe and replay.
    fn watch_lag(&self, now: Option<members::Position>) {
        let mut lag = lock(&self.lag);
        let heard = lock(&self.heard).clone();
        let (Some(now), Some((epoch, seq)), true) =
            (now, heard, self.listening.load(Ordering::Acquire))
        else {
            *lag = None;
            return;
        };
        let covers = |p: &members::Position| p.0 == epoch && p.1 <= seq;
        match &*lag {
            Some((behind, since)) if !covers(behind) => {
                if since.elapsed() >= STALL_AFTER {
                    tracing::warn!(
                        heard = seq,
                        published = behind.1,
                        "the invalidation channel carried no message for a publication made \
                         over a second ago: resubscribing, and replaying what was missed"
                    );
                    *lag = None;
                    self.stalled.notify_one();
                }
            }
            _ if covers(&now) => *lag = None,
            _ => *lag = Some((now, tokio::time::Instant::now())),
        }
    }

    /// Whether the message `id` from `from` is applied for the first time (remembered).
    fn first_time(&self, from: &str, id: u64) -> bool {
        let mut applied = lock(&self.applied);
        let (seen, order) = &mut *applied;
        let key = (from.to_string(), id);
        if !seen.insert(key.clone()) {
            return false;
        }
        order.push_back(key);
        if order.len() > APPLIED_KEPT {
            if let Some(old) = order.pop_front() {
                seen.remove(&old);
            }
        }
        true
    }

    /// Raises what this replica heard to `at` (same epoch), or moves to `at`'s epoch.
    fn heard_up_to(&self, at: &members::Position) {
        let mut heard = lock(&self.heard);
        match &*heard {
            Some((epoch, seq)) if *epoch == at.0 && *seq >= at.1 => {}
            _ => *heard = Some(at.clone()),
        }
    }

    /// A call or probe waited its whole bound (a second) on connection `used` and nothing
    /// came back: that connection is replaced (see [`Link::redial`]), so the next probe
    /// asks on a new one and the replica returns to the shared state as soon as Redis
    /// answers there. Said once until a probe is answered again; each such call is counted
    /// in `cxgate_redis_errors_total` by its operation (`budget`, `ping`).
    fn redial(&self, used: u64) {
        if self.link.redial(used) && !self.redialled.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                "Redis did not answer on its connection within a second: that connection is \
                 dropped and a new one dialled (the probe tries it every 250 ms)"
            );
        }
    }

    /// A call was answered: any run of timeouts is over.
    fn answered(&self) {
        if self.slowing.load(Ordering::Acquire) {
            self.slowing.store(false, Ordering::Release);
            *self.slow.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// A call failed with `why`: Redis is down now, unless `why` is a timeout in a run of
    /// them still too short to call an outage (it is recorded as the last error then).
    fn failed(&self, why: &Unavailable) {
        if why.is_slow() {
            if self.prompt.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    error = %why,
                    "Redis answered slower than its call bound: the budget uses its local \
                     fallback until it answers promptly again; the shared cache tier and the \
                     token wait longer for it"
                );
            }
            let now = tokio::time::Instant::now();
            let mut slow = self.slow.lock().unwrap_or_else(PoisonError::into_inner);
            let (since, count) = slow.get_or_insert((now, 0));
            *count += 1;
            self.slowing.store(true, Ordering::Release);
            if *count < SLOW_STRIKES || now.duration_since(*since) < SLOW_FOR {
                drop(slow);
                let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
                health.last_error = Some(why.to_string());
                return;
            }
            *slow = None;
        }
        self.set_up(false, Some(why));
    }

    fn set_up(&self, up: bool, why: Option<&Unavailable>) {
        let was = self.up.swap(up, Ordering::AcqRel);
        self.show();
        {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            if was != up {
                health.since = std::time::SystemTime::now();
            }
            if let Some(why) = why {
                health.last_error = Some(why.to_string());
            }
        }
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

impl Inner {
    /// `cxgate_redis_up`: 1 only while calls succeed *and* the invalidation channel carries
    /// messages; a replica that cannot hear the others' invalidations is not fully on Redis.
    fn show(&self) {
        let up = self.up.load(Ordering::Acquire) && self.listening.load(Ordering::Acquire);
        self.gauge.set(i64::from(up));
    }

    /// Records whether the invalidation channel works; says so once per change.
    fn set_listening(&self, listening: bool, why: Option<String>) {
        let was = self.listening.swap(listening, Ordering::AcqRel);
        self.show();
        let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
        if was && !listening {
            tracing::warn!(
                error = why.as_deref(),
                "invalidation channel unusable: this replica cannot hear the others' purges; \
                 its cache is dropped when the channel works again (cxgate_redis_up 0 meanwhile)"
            );
        } else if !was && listening {
            tracing::info!("invalidation channel works again");
        }
        health.channel_error = if listening { None } else { why };
    }
}

/// A lock whose holder may have panicked: each update is one assignment, so what it holds
/// is whole.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            Some(i) if i.up.load(Ordering::Acquire) && i.prompt.load(Ordering::Acquire) => {
                PROBE_WHILE_UP
            }
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

/// The subscriber loop (see [`Redis::spawn_subscriber`]). A subscription counts only once
/// this replica's own message came back on it ([`hear_own`]): a SUBSCRIBE that a user
/// without rights on the channel is refused does not always show as an error, and a replica
/// that believed it listens would serve what the others invalidated. Until it hears, the
/// replica is on its own as when Redis is gone: `cxgate_redis_up` 0, one warning, and what
/// it missed replayed (or its cache dropped) once the channel works ([`catch_up`]). While
/// it listens it says so in the registry of live replicas every [`members::JOIN_EVERY`].
async fn subscribe(redis: Redis, apply: Apply, ready: tokio::sync::oneshot::Sender<()>) {
    let mut ready = Some(ready);
    let channel = redis.key("invalidate");
    let acks = ack_channel(&redis, &redis.inner.id);
    // The first subscription at start has missed nothing; any later one may have.
    let mut first = true;
    let mut attempt = 0;
    loop {
        let client = redis.inner.link.pubsub_client(attempt);
        attempt += 1;
        let connected = tokio::time::timeout(Duration::from_secs(1), async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[&channel, &acks]).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        })
        .await;
        let heard = match connected {
            Ok(Ok(mut messages)) => match hear_own(&redis, &channel, &mut messages, &apply).await {
                true => Ok(messages),
                false => Err(
                    "subscribed, but this replica's own message did not come back \
                              (does the Redis user lack rights on the channel?)"
                        .to_string(),
                ),
            },
            Ok(Err(err)) => Err(shown_error(&err)),
            Err(_) => Err("no subscription within 1s".to_string()),
        };
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        match heard {
            Ok(mut messages) => {
                if first {
                    if let Some(now) = redis.position().await {
                        redis.inner.heard_up_to(&now);
                    }
                } else {
                    catch_up(&redis, &apply).await;
                }
                first = false;
                redis.inner.set_listening(true, None);
                let mut beat = tokio::time::interval(members::JOIN_EVERY);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let why = loop {
                    tokio::select! {
                        msg = next(&mut messages) => match msg {
                            Some(msg) => {
                                take(&redis, &msg, &apply).await;
                            }
                            None => break "subscription lost; resubscribing",
                        },
                        _ = beat.tick() => {
                            let redis = redis.clone();
                            tokio::spawn(async move { let _ = redis.join().await; });
                        }
                        () = redis.inner.stalled.notified() => {
                            break "subscription stalled (a publication was not heard); \
                                   resubscribing"
                        }
                    }
                };
                redis.inner.set_listening(false, Some(why.to_string()));
            }
            Err(why) => {
                first = false;
                redis.inner.set_listening(false, Some(why));
            }
        }
        tokio::time::sleep(RESUBSCRIBE_AFTER).await;
    }
}

/// After a subscription came back: replays the publications made since the last one this
/// replica heard, from the copies Redis keeps (see `members`), or drops the whole cache
/// when it cannot tell what it missed (too many, expired copies, a count that was lost and
/// started again, or Redis not answering).
async fn catch_up(redis: &Redis, apply: &Apply) {
    let since = lock(&redis.inner.heard).clone();
    let missed = match &since {
        Some(since) => redis.missed(since).await.ok(),
        None => None,
    };
    let copies = match missed {
        Some(members::Missed::Copies(now, copies)) => Some((now, copies)),
        Some(members::Missed::Unknown(now)) => {
            *lock(&redis.inner.heard) = Some(now.unwrap_or_else(members::nothing_published));
            None
        }
        None => None,
    };
    let Some((now, copies)) = copies else {
        tracing::info!(
            "invalidation channel back: dropping this replica's cache, since what was \
             published meanwhile cannot be told"
        );
        apply(Invalidation::All).await;
        return;
    };
    let mut messages = Vec::with_capacity(copies.len());
    for copy in copies {
        match copy.and_then(|c| serde_json::from_slice::<Message>(&c).ok()) {
            Some(message) => messages.push(message),
            None => {
                tracing::info!(
                    "invalidation channel back: dropping this replica's cache, since a \
                     message published meanwhile is no longer kept"
                );
                apply(Invalidation::All).await;
                redis.inner.heard_up_to(&now);
                return;
            }
        }
    }
    let replayed = messages.len();
    for message in messages {
        applies(redis, message, apply).await;
    }
    redis.inner.heard_up_to(&now);
    tracing::info!(
        replayed,
        "invalidation channel back: replayed what was published meanwhile"
    );
}

/// Applies another replica's message unless it was applied before (same sender and id).
async fn applies(redis: &Redis, message: Message, apply: &Apply) -> bool {
    if message.from == redis.inner.id || is_check(&message.what) {
        return false;
    }
    if let Some(id) = message.ack {
        if !redis.inner.first_time(&message.from, id) {
            return false;
        }
    }
    apply(message.what).await;
    true
}

/// The empty invalidation [`hear_own`] sends: nothing to apply (applying it would still
/// count as an invalidation in the cache and keep fills in flight from being stored).
fn is_check(what: &Invalidation) -> bool {
    matches!(what, Invalidation::Tags(tags) if tags.is_empty())
}

/// Publishes an empty invalidation from this replica (a no-op for the others) until it
/// comes back on `messages`, for at most a second; applies the others' messages meanwhile.
async fn hear_own<S>(redis: &Redis, channel: &str, messages: &mut S, apply: &Apply) -> bool
where
    S: futures_core::Stream<Item = redis::Msg> + Unpin,
{
    let own = Message {
        from: redis.inner.id.clone(),
        what: Invalidation::Tags(Vec::new()),
        ack: None,
        seq: None,
        epoch: None,
    };
    let Ok(text) = serde_json::to_string(&own) else {
        return false;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        if let Some(mut conn) = redis.inner.link.conn() {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(&text);
            let sent = cmd.query_async::<i64>(&mut conn);
            let _ = tokio::time::timeout(CALL_TIMEOUT, sent).await;
        }
        let window = tokio::time::Instant::now() + Duration::from_millis(250);
        while let Ok(msg) = tokio::time::timeout_at(window, next(messages)).await {
            let Some(msg) = msg else {
                return false;
            };
            if take(redis, &msg, apply).await == Heard::Own {
                return true;
            }
        }
    }
    false
}

/// The channel on which the replica of id `id` hears that others applied its invalidations.
fn ack_channel(redis: &Redis, id: &str) -> String {
    redis.key(&format!("ack:{id}"))
}

/// What [`take`] heard.
#[derive(Debug, PartialEq, Eq)]
enum Heard {
    /// A message this replica published itself (nothing to apply).
    Own,
    Other,
}

/// One message heard on the subscription: an acknowledgement of this replica's
/// publications is handed to its waiter; another replica's invalidation is applied and then,
/// when it asks for it, acknowledged on that replica's channel (sent off this task, so the
/// next message is not held up by the round trip).
async fn take(redis: &Redis, msg: &redis::Msg, apply: &Apply) -> Heard {
    let payload = msg.get_payload_bytes();
    if msg.get_channel_name() != redis.key("invalidate") {
        match serde_json::from_slice::<acks::Ack>(payload) {
            Ok(ack) => redis.inner.acks.heard(&ack),
            Err(_) => tracing::warn!("ignoring an unreadable invalidation acknowledgement"),
        }
        return Heard::Other;
    }
    let Ok(message) = serde_json::from_slice::<Message>(payload) else {
        tracing::warn!("ignoring an unreadable invalidation message");
        return Heard::Other;
    };
    if let (Some(seq), Some(epoch)) = (message.seq, &message.epoch) {
        // Numbers come in order: one skipped was missed, and is replayed first.
        let before = lock(&redis.inner.heard).clone();
        let skipped = before
            .as_ref()
            .is_some_and(|(e, last)| (e == epoch || e.is_empty()) && seq > last.saturating_add(1));
        let moved = before
            .as_ref()
            .is_some_and(|(e, _)| !e.is_empty() && e != epoch);
        if skipped || moved {
            catch_up(redis, apply).await;
        }
        redis.inner.heard_up_to(&(epoch.clone(), seq));
    }
    if message.from == redis.inner.id {
        return Heard::Own;
    }
    let (from, ack) = (message.from.clone(), message.ack);
    applies(redis, message, apply).await;
    if let Some(id) = ack {
        let ack = acks::Ack {
            id,
            from: redis.inner.id.clone(),
        };
        let (Ok(text), Some(mut conn)) = (serde_json::to_string(&ack), redis.inner.link.conn())
        else {
            return Heard::Other;
        };
        let channel = ack_channel(redis, &from);
        // Sent whether or not this replica counts Redis as up: it just heard from it.
        tokio::spawn(async move {
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(&channel).arg(&text);
            let sent = cmd.query_async::<i64>(&mut conn);
            let _ = tokio::time::timeout(PATIENT_CALL_TIMEOUT, sent).await;
        });
    }
    Heard::Other
}

/// The next item of a stream, without pulling in a stream-combinator crate.
async fn next<S>(stream: &mut S) -> Option<S::Item>
where
    S: futures_core::Stream + Unpin,
{
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

fn lock_millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

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

    /// A fake Redis on a free loopback port: answers each command with `answer(words)`
    /// (raw RESP). Stops when the test's runtime ends.
    async fn fake_redis(answer: fn(&[String]) -> String) -> u16 {
        fake_redis_late(answer, Arc::default()).await
    }

    /// [`fake_redis`], each answer `delay` ms late (read at each command).
    async fn fake_redis_late(
        answer: fn(&[String]) -> String,
        delay: Arc<std::sync::atomic::AtomicU64>,
    ) -> u16 {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let port = listener.local_addr().expect("address").port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let delay = delay.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).lines();
                    // Commands arrive as RESP arrays of bulk strings: "*n", then "$len", word.
                    while let Ok(Some(head)) = lines.next_line().await {
                        let n: usize = head.trim_start_matches('*').parse().unwrap_or(0);
                        let mut words = Vec::new();
                        for _ in 0..n {
                            let _len = lines.next_line().await;
                            match lines.next_line().await {
                                Ok(Some(word)) => words.push(word),
                                _ => return,
                            }
                        }
                        let late = delay.load(Ordering::Acquire);
                        if late > 0 {
                            tokio::time::sleep(Duration::from_millis(late)).await;
                        }
                        if write.write_all(answer(&words).as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    /// The first command word, upper-cased.
    fn verb(words: &[String]) -> String {
        words
            .first()
            .map(|w| w.to_ascii_uppercase())
            .unwrap_or_default()
    }

    /// A Redis (or proxy) that may SET and PUBLISH but refuses scripts, quoting their
    /// arguments in the error as Redis does for an unknown command.
    fn refuses_scripts_quoting_args(words: &[String]) -> String {
        match verb(words).as_str() {
            "SET" | "CLIENT" | "SELECT" => "+OK\r\n".to_string(),
            "PUBLISH" => ":0\r\n".to_string(),
            _ => {
                let args: Vec<String> = words[1..].iter().map(|w| format!("'{w}'")).collect();
                format!(
                    "-ERR unknown command '{}', with args beginning with: {}\r\n",
                    words.first().map_or("", String::as_str),
                    args.join(" ")
                )
            }
        }
    }

    /// A Redis that runs every script and command it is sent (answers as if it did).
    fn answers_everything(words: &[String]) -> String {
        match verb(words).as_str() {
            "EVALSHA" | "EVAL" | "PUBLISH" => ":1\r\n".to_string(),
            "SCRIPT" => "$40\r\n0000000000000000000000000000000000000000\r\n".to_string(),
            _ => "+OK\r\n".to_string(),
        }
    }

    async fn connect_to(port: u16, registry: &Registry) -> Redis {
        let env = format!("CXGATE_UNIT_REDIS_{port}");
        std::env::set_var(&env, format!("redis://127.0.0.1:{port}/"));
        Redis::connect(&env, &format!("u{port}"), registry)
            .await
            .expect("a valid URL")
    }

    fn gauge(registry: &Registry) -> Option<f64> {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == "cxgate_redis_up")
            .map(|f| f.get_metric()[0].get_gauge().get_value())
    }

    /// An error Redis sends can quote the command's arguments (a token record): neither the
    /// warning, nor `/admin/status`, nor any error text shows them; the code is kept.
    #[tokio::test]
    async fn redis_error_text_never_shows_the_arguments_it_quotes() {
        let port = fake_redis(refuses_scripts_quoting_args).await;
        let registry = Registry::new();
        let redis = connect_to(port, &registry).await;
        let secret = "access-8f2c1d-SECRET";
        // Sent even though the probe marked Redis down: the refusal must quote the secret.
        redis.inner.up.store(true, Ordering::Release);
        let err = redis
            .run("token", |mut c| async move {
                redis::cmd("EVALSHA")
                    .arg("abc")
                    .arg(1)
                    .arg(format!("{{\"access_token\":\"{secret}\"}}"))
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await
            .err();
        // The probe's own refusal (its script call) is what the status shows.
        let status = redis.status();
        let last = status["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            last.contains("ERR") && !last.contains("EVALSHA") && !last.contains("with args"),
            "expected the last error as its code only, saw {last:?}"
        );
        let shown = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            shown.contains("(ERR)") && !shown.contains(secret) && !shown.contains("with args"),
            "expected the refusal shown by its code, no quoted argument, saw {shown:?}"
        );
        let last = redis.status()["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !last.contains(secret),
            "expected no secret in the status, saw {last:?}"
        );
        let direct = Unavailable::Command(redis::RedisError::from((
            redis::ErrorKind::Extension,
            "x",
            format!("WHATEVER echoing {secret}"),
        )))
        .to_string();
        assert!(
            !direct.contains(secret) && !direct.contains("WHATEVER"),
            "expected an unknown code and its text hidden, saw {direct:?}"
        );
        redis.stop();
    }

    /// A user that may SET but not run scripts: the probe runs a script as admissions do,
    /// so Redis stays down (gauge 0) rather than "coming back" on every probe.
    #[tokio::test]
    async fn a_redis_that_refuses_scripts_is_down_not_flapping() {
        let port = fake_redis(refuses_scripts_quoting_args).await;
        let registry = Registry::new();
        let redis = connect_to(port, &registry).await;
        for _ in 0..6 {
            assert!(
                !redis.is_up() && gauge(&registry) == Some(0.0),
                "expected Redis down and cxgate_redis_up 0 while scripts are refused, saw \
                 up={} gauge={:?}",
                redis.is_up(),
                gauge(&registry)
            );
            tokio::time::sleep(PROBE_WHILE_DOWN).await;
        }
        redis.stop();
    }

    /// Every `cxgate_redis_errors_total` series is there from the first scrape, at 0, on a
    /// Redis that answers everything (so no error has created one).
    #[tokio::test]
    async fn redis_error_series_are_on_the_first_scrape() {
        let port = fake_redis(answers_everything).await;
        let registry = Registry::new();
        let redis = connect_to(port, &registry).await;
        assert!(redis.is_up(), "expected the fake Redis to count as up");
        let families = registry.gather();
        let errors = families
            .iter()
            .find(|f| f.name() == "cxgate_redis_errors_total")
            .expect("expected cxgate_redis_errors_total on the first scrape");
        let ops: Vec<String> = errors
            .get_metric()
            .iter()
            .filter(|m| m.get_counter().get_value() == 0.0)
            .flat_map(|m| m.get_label().iter().map(|l| l.value().to_string()))
            .collect();
        for op in OPS {
            assert!(
                ops.iter().any(|o| o == op),
                "expected op={op} at 0, saw {ops:?}"
            );
        }
        redis.stop();
    }

    /// A fake Redis that answers as [`answers_everything`] does, each answer `delay` ms
    /// late (read at each command, so a test can slow it down and speed it up).
    async fn slow_redis(delay: Arc<std::sync::atomic::AtomicU64>) -> u16 {
        fake_redis_late(answers_everything, delay).await
    }

    /// One `GET k` as `op`: through [`Redis::run`] (bounded by [`CALL_TIMEOUT`], held back
    /// while Redis is not prompt) when `bound` is `None`, else [`Redis::run_within`] `bound`.
    async fn get_k(
        redis: &Redis,
        op: &'static str,
        bound: Option<Duration>,
    ) -> Result<Option<String>, Unavailable> {
        let get = |mut c: Conn| async move {
            redis::cmd("GET")
                .arg("k")
                .query_async::<Option<String>>(&mut c)
                .await
        };
        match bound {
            None => redis.run(op, get).await,
            Some(bound) => redis.run_within(op, bound, get).await,
        }
    }

    /// One answer slower than the call bound is a timeout for that call, not an outage:
    /// Redis stays up (the caller falls back for that call alone). A Redis that answers
    /// nothing within the probe's bound is down, and is up again once it answers.
    #[tokio::test]
    async fn one_slow_answer_does_not_mark_redis_down() {
        let delay = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let port = slow_redis(delay.clone()).await;
        let registry = Registry::new();
        let redis = connect_to(port, &registry).await;
        assert!(redis.is_up(), "expected the fake Redis up at start");
        delay.store(300, Ordering::Release);
        let slow = get_k(&redis, "cache", None).await;
        assert!(
            matches!(slow, Err(Unavailable::Timeout(_))),
            "expected the 300 ms answer past the 100 ms bound, saw {slow:?}"
        );
        assert!(
            redis.is_up() && gauge(&registry) == Some(1.0),
            "expected one slow answer to leave Redis up, saw up={} gauge={:?}",
            redis.is_up(),
            gauge(&registry)
        );
        // Short calls (publications) wait for the probe to see it prompt.
        let short = get_k(&redis, "publish", None).await;
        assert!(
            !redis.is_prompt() && matches!(short, Err(Unavailable::Slow)),
            "expected short calls held back after a timeout, saw {short:?}"
        );
        let patient = get_k(&redis, "cache", Some(BACKGROUND_CALL_TIMEOUT)).await;
        assert!(
            patient.is_ok() && redis.is_up(),
            "expected a call with a longer bound answered, saw {patient:?}"
        );
        // Slower than the probe's bound: gone, as far as any caller can tell.
        delay.store(3_000, Ordering::Release);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
        while redis.is_up() && tokio::time::Instant::now() < deadline {
            let _ = get_k(&redis, "cache", Some(PATIENT_CALL_TIMEOUT)).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            !redis.is_up(),
            "expected a Redis that answers nothing within a second marked down"
        );
        delay.store(0, Ordering::Release);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !redis.is_prompt() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            redis.is_up() && redis.is_prompt(),
            "expected Redis up and prompt again once it answers at once"
        );
        redis.stop();
    }

    #[test]
    fn a_url_of_another_scheme_is_named_with_what_is_accepted() {
        let err = check_settings("U", Some("http://user:pw@host:6379/"), &Options::default())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("\"http://\"")
                && err.contains("redis://")
                && err.contains("rediss://")
                && !err.contains("pw")
                && !err.contains("holds a plain"),
            "expected the scheme found and the accepted ones, saw {err:?}"
        );
        let missing = Options {
            ca_file: Some("/nonexistent/cxgate-ca.pem".into()),
            cluster: false,
        };
        assert!(
            check_settings("U", None, &missing).is_err(),
            "expected a missing CA file refused without a URL"
        );
    }

    /// Cluster seeds that disagree on the password: start cannot build the cluster client,
    /// so `check` (which builds it the same way) refuses them too, naming the variable.
    #[tokio::test]
    async fn cluster_seeds_start_refuses_are_refused_by_check() {
        let urls = "redis://:one@127.0.0.1:1,redis://:two@127.0.0.1:2";
        let cluster = Options {
            ca_file: None,
            cluster: true,
        };
        let registry = Registry::new();
        let started = Redis::connect_with("U", Some(urls), "cx", &cluster, &registry).await;
        let start = started.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            start.contains("different password"),
            "expected start to refuse seeds with two passwords, saw {start:?}"
        );
        let checked = check_settings("U", Some(urls), &cluster)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert_eq!(
            checked, start,
            "expected check to refuse them as start does"
        );
    }
}
