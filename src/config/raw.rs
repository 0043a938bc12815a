//! The configuration file as written: serde structs that mirror README "Configuration".
//!
//! Every struct denies unknown keys, so a typo is an error instead of a silently ignored
//! setting. Durations and sizes stay strings here: `validate` parses them, so one run of
//! `cxgate check` can report every bad value with its key path instead of only the first.

use serde::Deserialize;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Client and admin listeners and request limits.
    #[serde(default)]
    pub server: RawServer,
    /// Where requests go.
    #[serde(default)]
    pub upstream: RawUpstream,
    /// Where the one OAuth token comes from and how it is refreshed.
    #[serde(default)]
    pub token: RawToken,
    /// The response cache.
    #[serde(default)]
    pub cache: RawCache,
    /// The one shared rate budget.
    #[serde(default)]
    pub budget: RawBudget,
    /// Who may use the gateway; none means one anonymous client (loopback only).
    #[serde(default)]
    pub clients: Vec<RawClient>,
    /// Route rules, first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
}

/// `[server]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Client traffic listener (HTTP/1.1 and HTTP/2).
    pub listen: Option<String>,
    /// Admin listener: /metrics, /healthz, /readyz, /admin/*.
    pub admin_listen: Option<String>,
    /// How clients reach the gateway; upstream links are rewritten to it.
    pub public_base_url: Option<String>,
    /// Larger request bodies get 413.
    pub max_body_bytes: Option<RawSize>,
    /// Requests in flight beyond this get 503.
    pub max_concurrency: Option<i64>,
    /// Whole request, queueing included.
    pub request_timeout: Option<String>,
    /// Drain time on SIGTERM/SIGINT.
    pub shutdown_grace: Option<String>,
    /// A connection must finish its request head within this, counted from accept.
    pub header_timeout: Option<String>,
    /// The longest pause between two pieces of a request body before 408.
    pub body_timeout: Option<String>,
    /// Keep-alive connections idle longer than this are closed.
    pub idle_timeout: Option<String>,
    /// Client connections open at once; more wait in the listen backlog.
    pub max_connections: Option<i64>,
    /// All request and answer bodies held in memory at once; past it 503. One client key's
    /// request bodies may hold at most half of it (or one `max_body_bytes` body if more).
    pub max_buffered_bytes: Option<RawSize>,
    /// Environment variable holding the admin bearer token.
    pub admin_token_env: Option<String>,
    /// Host names the admin listener answers to, besides IP addresses and `localhost`.
    pub admin_hosts: Option<Vec<String>>,
    /// Allow the anonymous mode on a non-loopback listener.
    pub allow_anonymous: Option<bool>,
    /// TLS for the client listener.
    pub tls: Option<RawTls>,
    /// "stderr", a file path or "off".
    pub access_log: Option<String>,
}

/// `[server.tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain.
    pub cert_file: Option<String>,
    /// PEM private key.
    pub key_file: Option<String>,
}

/// `[upstream]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// The CX Social API base URL.
    pub base_url: Option<String>,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Option<String>,
    /// One upstream exchange.
    pub timeout: Option<String>,
    /// Extra trusted roots (PEM).
    pub ca_file: Option<String>,
}

/// `[token]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawToken {
    /// JSON token file, refreshed and rewritten in place.
    pub file: Option<String>,
    /// Environment variable holding a static token (never refreshed).
    pub access_token_env: Option<String>,
    /// Refresh this long before expiry.
    pub refresh_before: Option<String>,
    /// OAuth client used to refresh.
    pub oauth: Option<RawOAuth>,
}

/// `[token.oauth]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth {
    /// The OAuth token endpoint.
    pub token_url: Option<String>,
    /// The OAuth client id.
    pub client_id: Option<String>,
    /// Environment variable holding the client secret.
    pub client_secret_env: Option<String>,
    /// "get" (query parameters, as every public CX Social client does; the default) or
    /// "post" (RFC 6749 form).
    pub method: Option<String>,
}

/// `[cache]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Bound on cached bodies and headers.
    pub max_bytes: Option<RawSize>,
    /// A second cache tier in the replicas' shared Redis.
    pub shared: Option<bool>,
    /// Bound on one entry written to the shared tier.
    pub shared_max_entry_bytes: Option<RawSize>,
}

/// `[budget]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    /// Requests per period the upstream allows this token.
    pub limit: Option<i64>,
    /// The period of `limit`.
    pub period: Option<String>,
    /// How many may go at once after idle time.
    pub burst: Option<i64>,
    /// How long a request may queue for budget.
    pub max_wait: Option<String>,
    /// Share of the burst only interactive clients may use.
    pub batch_reserve: Option<f64>,
    /// "local" or "redis".
    pub backend: Option<String>,
    /// Environment variable with the Redis URL.
    pub redis_url_env: Option<String>,
    /// Prefix of every Redis key.
    pub key_prefix: Option<String>,
    /// Replica count, for the fallback share when Redis is unreachable.
    pub replicas: Option<i64>,
    /// PEM roots trusted for `rediss://` besides the system's.
    pub redis_ca_file: Option<String>,
    /// The URL variable holds Redis Cluster seed nodes.
    pub redis_cluster: Option<bool>,
}

/// `[[clients]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClient {
    /// Name used in metrics and logs.
    pub name: Option<String>,
    /// Hex SHA-256 of the client's key.
    pub key_sha256: Option<String>,
    /// "read" and/or "write".
    pub scopes: Option<Vec<String>>,
    /// Account ids this client may touch.
    pub accounts: Option<Vec<i64>>,
    /// "interactive" (default) or "batch".
    pub priority: Option<String>,
    /// Own share of the budget: requests ...
    pub limit: Option<i64>,
    /// ... per period.
    pub period: Option<String>,
    /// Own burst.
    pub burst: Option<i64>,
    /// Overrides budget.max_wait.
    pub max_wait: Option<String>,
}

/// `[[routes]]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// "METHOD /path/{capture}".
    #[serde(rename = "match")]
    pub match_: Option<String>,
    /// Fresh for this long; makes the route cacheable.
    pub ttl: Option<String>,
    /// Serve stale and refresh in the background within this window after ttl.
    pub stale_while_revalidate: Option<String>,
    /// Serve stale when the upstream fails within this window after ttl.
    pub stale_if_error: Option<String>,
    /// Tags stored with each entry.
    pub tags: Option<Vec<String>>,
    /// Tags removed after a 2xx answer.
    pub invalidates: Option<Vec<String>>,
    /// Budget cells one upstream call spends.
    pub cost: Option<i64>,
}

/// A size: bytes as an integer, or a string such as "256MiB".
#[derive(Debug, Clone)]
pub enum RawSize {
    /// Plain bytes.
    Bytes(i64),
    /// With a unit.
    Text(String),
}

/// By hand rather than `untagged`, so a wrong value (`1.5`) is told what is accepted
/// instead of "data did not match any variant".
impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a whole number of bytes or a string such as \"2MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}
