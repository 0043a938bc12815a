//! The checked configuration: what the rest of the gateway reads.
//!
//! Every value here has been parsed and cross-checked by `validate`, so the gateway never
//! re-parses text or meets an impossible combination at run time.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::route::{PathTemplate, TagTemplate};

/// The whole checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub token: TokenConfig,
    pub cache: CacheConfig,
    pub budget: BudgetConfig,
    pub clients: Vec<ClientConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Without a trailing slash.
    pub public_base_url: String,
    pub max_body_bytes: u64,
    pub max_concurrency: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// From accept to the end of the first request head, and from the first byte of a
    /// later head to its end: longer and the connection is closed.
    pub header_timeout: Duration,
    /// The longest pause between two pieces of a request body: longer is 408.
    pub body_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Client connections open at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Bytes of request and answer bodies held at once; a request past it gets 503.
    pub max_buffered_bytes: u64,
    pub admin_token_env: Option<String>,
    /// Host names (lower case, no port) the admin listener answers to besides IP addresses
    /// and `localhost`; any other `Host` is refused, against DNS rebinding.
    pub admin_hosts: Vec<String>,
    pub allow_anonymous: bool,
    pub tls: Option<TlsConfig>,
    /// Where the one line per request goes.
    pub access_log: AccessLogTarget,
    /// Access lines as JSON: set from `--log-format`, never from the file.
    pub access_log_json: bool,
}

/// `server.access_log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    /// With the other log lines, at their level (`info` shows it).
    Stderr,
    /// Appended to this file, reopened on SIGUSR1.
    File(PathBuf),
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Without a trailing slash, e.g. `https://api.engagor.com`.
    pub base_url: String,
    pub base_uri: http::Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    pub file: Option<PathBuf>,
    pub access_token_env: Option<String>,
    pub refresh_before: Duration,
    pub oauth: Option<OAuthConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OAuthMethod {
    Post,
    Get,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    pub token_url: String,
    pub client_id: String,
    pub client_secret_env: String,
    pub method: OAuthMethod,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Local,
    Redis,
}

/// A GCRA share: `limit` cells per `period`, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub limit: NonZeroU32,
    pub period: Duration,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub global: Share,
    pub max_wait: Duration,
    pub batch_reserve: f64,
    pub backend: Backend,
    pub redis_url_env: Option<String>,
    pub key_prefix: String,
    pub replicas: NonZeroU32,
    /// `budget.redis_ca_file`: roots for `rediss://` besides the system's.
    pub redis_ca_file: Option<PathBuf>,
    /// `budget.redis_cluster`: the URL variable names cluster seed nodes.
    pub redis_cluster: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Interactive,
    Batch,
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub key_sha256: [u8; 32],
    pub read: bool,
    pub write: bool,
    /// `None`: every account.
    pub accounts: Option<Vec<u64>>,
    pub priority: Priority,
    pub share: Option<Share>,
    pub max_wait: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The `match` text as written: the `route` label of every metric.
    pub match_text: String,
    /// `None` for `*`.
    pub method: Option<http::Method>,
    pub path: PathTemplate,
    /// `Some` makes the route cacheable.
    pub ttl: Option<Duration>,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub tags: Vec<TagTemplate>,
    pub invalidates: Vec<TagTemplate>,
    pub cost: NonZeroU32,
}

impl RouteConfig {
    /// Whether this route applies to `method` (HEAD uses GET rules).
    pub fn accepts(&self, method: &http::Method) -> bool {
        match &self.method {
            None => true,
            Some(m) => m == method || (method == http::Method::HEAD && m == http::Method::GET),
        }
    }
}

impl Config {
    /// The environment variables this configuration names, each with the key that names
    /// it: the secrets the gateway reads from its environment at start and reload.
    pub fn env_names(&self) -> Vec<(&'static str, &str)> {
        let named = [
            (
                "server.admin_token_env",
                self.server.admin_token_env.as_deref(),
            ),
            (
                "token.access_token_env",
                self.token.access_token_env.as_deref(),
            ),
            (
                "token.oauth.client_secret_env",
                self.token
                    .oauth
                    .as_ref()
                    .map(|o| o.client_secret_env.as_str()),
            ),
            (
                "budget.redis_url_env",
                self.budget
                    .redis_url_env
                    .as_deref()
                    .filter(|_| self.budget.backend == Backend::Redis),
            ),
        ];
        named
            .into_iter()
            .filter_map(|(key, name)| Some((key, name?)))
            .collect()
    }

    /// The one-screen summary `cxgate check` prints.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let s = &self.server;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "listeners: client {} ({}), admin {}",
            s.listen,
            if s.tls.is_some() {
                "https, h2+http/1.1"
            } else {
                "http, h2c+http/1.1"
            },
            s.admin_listen
        );
        let _ = writeln!(out, "public base url: {}", s.public_base_url);
        let _ = writeln!(
            out,
            "limits: max_body_bytes={} max_concurrency={} request_timeout={} shutdown_grace={}",
            size(s.max_body_bytes),
            s.max_concurrency,
            dur(s.request_timeout),
            dur(s.shutdown_grace)
        );
        let _ = writeln!(
            out,
            "connections: max_connections={} header_timeout={} body_timeout={} idle_timeout={} max_buffered_bytes={}",
            s.max_connections,
            dur(s.header_timeout),
            dur(s.body_timeout),
            dur(s.idle_timeout),
            size(s.max_buffered_bytes)
        );
        let _ = writeln!(
            out,
            "admin hosts: IP addresses, localhost{}",
            s.admin_hosts
                .iter()
                .map(|h| format!(", {h}"))
                .collect::<String>()
        );
        let _ = match &s.access_log {
            AccessLogTarget::Stderr => writeln!(out, "access log: stderr"),
            AccessLogTarget::Off => writeln!(out, "access log: off"),
            AccessLogTarget::File(path) => writeln!(out, "access log: {}", path.display()),
        };
        let u = &self.upstream;
        let _ = writeln!(
            out,
            "upstream: {} (connect_timeout={} timeout={})",
            u.base_url,
            dur(u.connect_timeout),
            dur(u.timeout)
        );
        let t = &self.token;
        let source = match (&t.file, &t.access_token_env) {
            (Some(f), _) => format!("file {}", f.display()),
            (None, Some(e)) => format!("env ${e} (static)"),
            (None, None) => "none".to_string(),
        };
        let _ = writeln!(
            out,
            "token: {source}, refresh_before={}, oauth={}",
            dur(t.refresh_before),
            t.oauth
                .as_ref()
                .map_or("off".to_string(), |o| o.token_url.clone())
        );
        let _ = writeln!(out, "cache: max_bytes={}", size(self.cache.max_bytes));
        let b = &self.budget;
        let _ = writeln!(
            out,
            "budget: {}/{} burst {} max_wait={} batch_reserve={} backend={}",
            b.global.limit,
            dur(b.global.period),
            b.global.burst,
            dur(b.max_wait),
            b.batch_reserve,
            match b.backend {
                Backend::Local => "local",
                Backend::Redis => "redis",
            }
        );
        if self.clients.is_empty() {
            let _ = writeln!(out, "clients: none (anonymous mode)");
        } else {
            let _ = writeln!(out, "clients ({}):", self.clients.len());
        }
        for c in &self.clients {
            let scopes = match (c.read, c.write) {
                (true, true) => "read,write",
                (true, false) => "read",
                (false, true) => "write",
                (false, false) => "none",
            };
            let share = c.share.map_or("global only".to_string(), |sh| {
                format!("{}/{} burst {}", sh.limit, dur(sh.period), sh.burst)
            });
            let accounts = c
                .accounts
                .as_ref()
                .map_or("all".to_string(), |a| format!("{a:?}"));
            let _ = writeln!(
                out,
                "  {:<20} scopes={scopes} accounts={accounts} priority={} share={share}",
                c.name,
                match c.priority {
                    Priority::Interactive => "interactive",
                    Priority::Batch => "batch",
                }
            );
        }
        let _ = writeln!(out, "routes ({}):", self.routes.len());
        for r in &self.routes {
            let ttl = r.ttl.map_or("not cached".to_string(), |t| {
                format!(
                    "ttl={} swr={} sie={}",
                    dur(t),
                    dur(r.stale_while_revalidate),
                    dur(r.stale_if_error)
                )
            });
            let _ = writeln!(
                out,
                "  {:<60} {ttl} tags={} invalidates={} cost={}",
                r.match_text,
                r.tags.len(),
                r.invalidates.len(),
                r.cost
            );
        }
        out
    }
}

/// A duration in one compact form the file accepts: the largest unit it is a whole number
/// of (`1d`, `10m`, `90s`, `2500ms`, `0s`); never `2s 500ms`.
pub(crate) fn dur(d: std::time::Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_string();
    }
    const S: u128 = 1_000_000_000;
    for (unit, size) in [("d", 86_400 * S), ("h", 3_600 * S), ("m", 60 * S), ("s", S)] {
        if ns % size == 0 {
            return format!("{}{unit}", ns / size);
        }
    }
    for (unit, size) in [("ms", 1_000_000), ("us", 1_000)] {
        if ns % size == 0 {
            return format!("{}{unit}", ns / size);
        }
    }
    format!("{ns}ns")
}

/// A size in one compact form the file accepts: `2MiB`, `64KiB`, or plain bytes.
pub(crate) fn size(bytes: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes != 0 && bytes % (1 << shift) == 0 {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod spelling_tests {
    use super::{dur, size};
    use std::time::Duration;

    #[test]
    fn compact_spellings() {
        assert_eq!(dur(Duration::from_secs(86_400)), "1d");
        assert_eq!(dur(Duration::from_millis(2_500)), "2500ms");
        assert_eq!(dur(Duration::from_secs(90)), "90s");
        assert_eq!(dur(Duration::from_secs(600)), "10m");
        assert_eq!(dur(Duration::from_millis(250)), "250ms");
        assert_eq!(dur(Duration::ZERO), "0s");
        assert_eq!(size(2 << 20), "2MiB");
        assert_eq!(size(1500), "1500");
        for d in ["2500ms", "90s", "1d", "250ms"] {
            let parsed = crate::config::parse_duration(d).expect("parses");
            assert_eq!(dur(parsed), d, "round trip");
        }
    }
}
