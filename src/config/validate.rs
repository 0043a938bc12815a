//! `validate`: from the file as written to the checked [`Config`], reporting every
//! problem with its key path (`routes[3].tags[0]: unknown placeholder {acount_id}`).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use super::checked::*;
use super::raw::*;
use super::route::{PathTemplate, TagTemplate};
use super::units::{parse_duration, parse_size};
use super::Problem;

/// Collects problems as validation walks the file.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, value: Option<&String>, default: Duration) -> Duration {
        match value {
            None => default,
            Some(v) => parse_duration(v).unwrap_or_else(|e| {
                self.add(path, e);
                default
            }),
        }
    }

    fn size(&mut self, path: &str, value: Option<&RawSize>, default: u64) -> u64 {
        match value {
            None => default,
            Some(RawSize::Bytes(n)) if *n >= 0 => *n as u64,
            Some(RawSize::Bytes(n)) => {
                self.add(path, format!("size must not be negative, got {n}"));
                default
            }
            Some(RawSize::Text(t)) => parse_size(t).unwrap_or_else(|e| {
                self.add(path, e);
                default
            }),
        }
    }

    fn positive(&mut self, path: &str, value: Option<i64>, default: u32) -> NonZeroU32 {
        let fallback = NonZeroU32::new(default).unwrap_or(NonZeroU32::MIN);
        match value {
            None => fallback,
            Some(n) => match u32::try_from(n).ok().and_then(NonZeroU32::new) {
                Some(v) => v,
                None => {
                    self.add(
                        path,
                        format!("must be a whole number from 1 to {}, got {n}", u32::MAX),
                    );
                    fallback
                }
            },
        }
    }

    fn addr(&mut self, path: &str, value: Option<&String>, default: &str) -> SocketAddr {
        let text = value.map_or(default, |v| v.as_str());
        text.parse().unwrap_or_else(|_| {
            self.add(
                path,
                format!("invalid socket address {text:?}; use e.g. \"127.0.0.1:8080\""),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn base_url(&mut self, path: &str, text: &str) -> Option<http::Uri> {
        let trimmed = text.trim_end_matches('/');
        match trimmed.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some() =>
            {
                if uri.query().is_some() {
                    self.add(path, "must not have a query string");
                    return None;
                }
                // The URL parser drops a fragment without a word, and every request would then
                // go to the base's root, cached under each client's path.
                if trimmed.contains('#') {
                    self.add(path, "must not have a fragment (#...)");
                    return None;
                }
                // The parser reads a port past 65535 as no port at all.
                let port = uri
                    .authority()
                    .and_then(|a| a.as_str().rsplit_once(':'))
                    .map(|(_, p)| p)
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
                if port.is_some_and(|p| p.parse::<u16>().is_err()) {
                    self.add(
                        path,
                        format!("invalid port in {text:?}: a port is at most 65535"),
                    );
                    return None;
                }
                if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                    // It would be printed by check, logged and shown on the status page.
                    self.add(
                        path,
                        "must not carry a user or password (user:password@): the OAuth token is \
                         the only credential the gateway sends",
                    );
                    return None;
                }
                Some(uri)
            }
            _ => {
                self.add(
                    path,
                    format!("invalid URL {text:?}; use e.g. \"https://api.engagor.com\""),
                );
                None
            }
        }
    }
}

/// Validates the whole file. `Err` carries every problem found, in file order.
pub fn validate(raw: RawConfig) -> Result<Config, Vec<Problem>> {
    let mut p = Problems::default();

    let s = &raw.server;
    let listen = p.addr("server.listen", s.listen.as_ref(), "127.0.0.1:8080");
    let admin_listen = p.addr(
        "server.admin_listen",
        s.admin_listen.as_ref(),
        "127.0.0.1:9090",
    );
    // Two listeners on one port: `run` would fail to bind the second.
    if listen.port() != 0
        && listen.port() == admin_listen.port()
        && (listen.ip() == admin_listen.ip()
            || listen.ip().is_unspecified()
            || admin_listen.ip().is_unspecified())
    {
        p.add(
            "server.admin_listen",
            format!(
                "{admin_listen} takes the port of server.listen ({listen}); give the admin \
                 listener a port of its own"
            ),
        );
    }
    let public_base_url = s
        .public_base_url
        .clone()
        .unwrap_or_else(|| format!("http://{listen}"));
    p.base_url("server.public_base_url", &public_base_url);
    let max_concurrency = match s.max_concurrency {
        None => 1024,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            p.add(
                "server.max_concurrency",
                format!("must be at least 1, got {n}"),
            );
            1024
        }
    };
    let max_connections = match s.max_connections {
        None => 10_000,
        Some(n) if n >= 1 => n as usize,
        Some(n) => {
            p.add(
                "server.max_connections",
                format!("must be at least 1, got {n}"),
            );
            10_000
        }
    };
    let tls = s.tls.as_ref().map(|t| {
        if t.cert_file.is_none() {
            p.add(
                "server.tls.cert_file",
                "required when [server.tls] is present",
            );
        }
        if t.key_file.is_none() {
            p.add(
                "server.tls.key_file",
                "required when [server.tls] is present",
            );
        }
        TlsConfig {
            cert_file: PathBuf::from(t.cert_file.clone().unwrap_or_default()),
            key_file: PathBuf::from(t.key_file.clone().unwrap_or_default()),
        }
    });
    let server = ServerConfig {
        listen,
        admin_listen,
        public_base_url: public_base_url.trim_end_matches('/').to_string(),
        max_body_bytes: p.size("server.max_body_bytes", s.max_body_bytes.as_ref(), 1 << 20),
        max_concurrency,
        request_timeout: p.duration(
            "server.request_timeout",
            s.request_timeout.as_ref(),
            Duration::from_secs(30),
        ),
        shutdown_grace: p.duration(
            "server.shutdown_grace",
            s.shutdown_grace.as_ref(),
            Duration::from_secs(10),
        ),
        header_timeout: p.duration(
            "server.header_timeout",
            s.header_timeout.as_ref(),
            Duration::from_secs(10),
        ),
        body_timeout: p.duration(
            "server.body_timeout",
            s.body_timeout.as_ref(),
            Duration::from_secs(10),
        ),
        idle_timeout: p.duration(
            "server.idle_timeout",
            s.idle_timeout.as_ref(),
            Duration::from_secs(60),
        ),
        max_connections,
        max_buffered_bytes: p.size(
            "server.max_buffered_bytes",
            s.max_buffered_bytes.as_ref(),
            256 << 20,
        ),
        admin_token_env: s.admin_token_env.clone(),
        admin_hosts: s
            .admin_hosts
            .iter()
            .flatten()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        allow_anonymous: s.allow_anonymous.unwrap_or(false),
        tls,
        access_log: match s.access_log.as_deref() {
            None | Some("stderr") => AccessLogTarget::Stderr,
            Some("off") => AccessLogTarget::Off,
            Some("") => {
                p.add(
                    "server.access_log",
                    "must be \"stderr\", \"off\" or a file path, not empty",
                );
                AccessLogTarget::Off
            }
            Some(path) => AccessLogTarget::File(PathBuf::from(path)),
        },
        access_log_json: false,
    };
    if server.request_timeout.is_zero() {
        p.add("server.request_timeout", "must be greater than zero");
    }
    for (path, value) in [
        ("server.header_timeout", server.header_timeout),
        ("server.body_timeout", server.body_timeout),
        ("server.idle_timeout", server.idle_timeout),
    ] {
        if value.is_zero() {
            p.add(path, "must be greater than zero");
        }
    }
    for host in &server.admin_hosts {
        let name_like = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with('.');
        if !name_like {
            p.add(
                "server.admin_hosts",
                format!("{host:?} is not a host name (letters, digits, '-' and '.'; no scheme, port or path)"),
            );
        }
    }
    if server.max_buffered_bytes < server.max_body_bytes {
        p.add(
            "server.max_buffered_bytes",
            format!(
                "must be at least server.max_body_bytes ({}), or no request with a full-size body could ever be read",
                server.max_body_bytes
            ),
        );
    }

    let u = &raw.upstream;
    let (base_url, base_uri) = match &u.base_url {
        None => {
            p.add(
                "upstream.base_url",
                "required (e.g. \"https://api.engagor.com\")",
            );
            (String::new(), http::Uri::default())
        }
        Some(text) => {
            let own = [
                ("server.listen", listen),
                ("server.admin_listen", admin_listen),
            ];
            match p.base_url("upstream.base_url", text) {
                Some(uri) => match super::target::problem(&uri, &own) {
                    Some(why) => {
                        p.add("upstream.base_url", why);
                        (String::new(), http::Uri::default())
                    }
                    None => (text.trim_end_matches('/').to_string(), uri),
                },
                None => (String::new(), http::Uri::default()),
            }
        }
    };
    let upstream = UpstreamConfig {
        base_url,
        base_uri,
        connect_timeout: p.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_ref(),
            Duration::from_secs(3),
        ),
        timeout: p.duration(
            "upstream.timeout",
            u.timeout.as_ref(),
            Duration::from_secs(20),
        ),
        ca_file: u.ca_file.as_ref().map(PathBuf::from),
    };
    zero_upstream_timeouts(&mut p, &upstream);

    let t = &raw.token;
    match (&t.file, &t.access_token_env) {
        (None, None) => p.add(
            "token",
            "one token source is required: token.file or token.access_token_env",
        ),
        (Some(_), Some(_)) => p.add(
            "token",
            "token.file and token.access_token_env are exclusive: choose one",
        ),
        _ => {}
    }
    let oauth = t.oauth.as_ref().map(|o| {
        let method = match o.method.as_deref() {
            // Every public CX Social client asks for tokens with a GET.
            Some("post") => OAuthMethod::Post,
            None | Some("get") => OAuthMethod::Get,
            Some(other) => {
                p.add(
                    "token.oauth.method",
                    format!("must be \"post\" or \"get\", got {other:?}"),
                );
                OAuthMethod::Get
            }
        };
        let token_url = o
            .token_url
            .clone()
            .unwrap_or_else(|| "https://app.engagor.com/oauth/access_token/".into());
        if let Some(uri) = p.base_url("token.oauth.token_url", &token_url) {
            let own = [
                ("server.listen", listen),
                ("server.admin_listen", admin_listen),
            ];
            if let Some(why) = super::target::token_url_problem(&uri, &own) {
                p.add("token.oauth.token_url", why);
            }
        }
        if o.client_id.as_deref().is_none_or(str::is_empty) {
            p.add("token.oauth.client_id", "required with [token.oauth]");
        }
        if o.client_secret_env.as_deref().is_none_or(str::is_empty) {
            p.add(
                "token.oauth.client_secret_env",
                "required with [token.oauth] (the name of an environment variable)",
            );
        }
        if t.file.is_none() {
            p.add(
                "token.oauth",
                "refreshing needs token.file to keep the rotating refresh token",
            );
        }
        OAuthConfig {
            token_url,
            client_id: o.client_id.clone().unwrap_or_default(),
            client_secret_env: o.client_secret_env.clone().unwrap_or_default(),
            method,
        }
    });
    let token = TokenConfig {
        file: t.file.as_ref().map(PathBuf::from),
        access_token_env: t.access_token_env.clone(),
        refresh_before: p.duration(
            "token.refresh_before",
            t.refresh_before.as_ref(),
            Duration::from_secs(600),
        ),
        oauth,
    };

    let cache = CacheConfig {
        max_bytes: p.size("cache.max_bytes", raw.cache.max_bytes.as_ref(), 256 << 20),
        shared: raw.cache.shared.unwrap_or(false),
        shared_max_entry_bytes: p.size(
            "cache.shared_max_entry_bytes",
            raw.cache.shared_max_entry_bytes.as_ref(),
            1 << 20,
        ),
    };
    if cache.shared_max_entry_bytes == 0 {
        p.add(
            "cache.shared_max_entry_bytes",
            "must be above 0 (set cache.shared = false to keep entries out of Redis)",
        );
    }

    let b = &raw.budget;
    let global = Share {
        limit: p.positive("budget.limit", b.limit, 1000),
        period: p.duration(
            "budget.period",
            b.period.as_ref(),
            Duration::from_secs(3600),
        ),
        burst: p.positive("budget.burst", b.burst, 50),
    };
    if global.period.is_zero() {
        p.add("budget.period", "must be greater than zero");
    }
    let batch_reserve = b.batch_reserve.unwrap_or(0.2);
    if !(0.0..1.0).contains(&batch_reserve) {
        p.add(
            "budget.batch_reserve",
            format!("must be at least 0 and below 1, got {batch_reserve}"),
        );
    }
    let backend = match b.backend.as_deref() {
        None | Some("local") => Backend::Local,
        Some("redis") => {
            // The URL may hold a password, so it only ever comes from the environment.
            if b.redis_url_env.as_deref().is_none_or(str::is_empty) {
                p.add(
                    "budget.backend",
                    "\"redis\" needs budget.redis_url_env, the environment variable that \
                     holds the Redis URL (e.g. CXGATE_REDIS_URL)",
                );
            }
            Backend::Redis
        }
        Some(other) => {
            p.add(
                "budget.backend",
                format!("must be \"local\" or \"redis\", got {other:?}"),
            );
            Backend::Local
        }
    };
    if cache.shared && backend != Backend::Redis {
        p.add(
            "cache.shared",
            "the shared cache lives in the replicas' Redis: it needs budget.backend = \"redis\"",
        );
    }
    let budget = BudgetConfig {
        global,
        max_wait: p.duration(
            "budget.max_wait",
            b.max_wait.as_ref(),
            Duration::from_secs(2),
        ),
        batch_reserve,
        backend,
        redis_url_env: b.redis_url_env.clone(),
        redis_ca_file: b.redis_ca_file.as_ref().map(PathBuf::from),
        redis_cluster: b.redis_cluster.unwrap_or(false),
        key_prefix: match b.key_prefix.as_deref() {
            None => "cxgate".into(),
            // Braces would break the hash tag that keeps every key in one cluster slot.
            Some(k)
                if !k.is_empty() && !k.contains(char::is_whitespace) && !k.contains(['{', '}']) =>
            {
                k.to_string()
            }
            Some(k) => {
                p.add(
                    "budget.key_prefix",
                    format!("must be non-empty without spaces or braces, got {k:?}"),
                );
                "cxgate".into()
            }
        },
        replicas: p.positive("budget.replicas", b.replicas, 1),
    };

    let clients = raw
        .clients
        .iter()
        .enumerate()
        .map(|(i, c)| client(&mut p, i, c, &global, b.period.as_deref().unwrap_or("1h")))
        .collect::<Vec<_>>();
    for (i, c) in clients.iter().enumerate() {
        if let Some(j) = clients[..i]
            .iter()
            .position(|o| o.key_sha256 == c.key_sha256 && c.key_sha256 != [0; 32])
        {
            p.add(
                format!("clients[{i}].key_sha256"),
                format!("same key as clients[{j}]"),
            );
        }
        if let Some(j) = clients[..i].iter().position(|o| o.name == c.name) {
            p.add(
                format!("clients[{i}].name"),
                format!("same name as clients[{j}]"),
            );
        }
    }
    if clients.is_empty() && !server.listen.ip().is_loopback() && !server.allow_anonymous {
        p.add("clients", format!(
            "no [[clients]]: anonymous mode is refused on non-loopback listen {} unless server.allow_anonymous = true",
            server.listen
        ));
    }

    let routes = raw
        .routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| route(&mut p, i, r))
        .collect::<Vec<_>>();
    for (i, r) in routes.iter().enumerate() {
        if routes[..i]
            .iter()
            .any(|o| o.method == r.method && o.path == r.path)
        {
            p.add(
                format!("routes[{i}].match"),
                format!("duplicate match {:?}", r.match_text),
            );
        }
    }

    for (i, r) in raw.routes.iter().enumerate() {
        if let Some(cost) = r.cost.and_then(|c| u32::try_from(c).ok()) {
            cost_fits(&mut p, i, cost, &global, batch_reserve, &clients);
        }
    }

    if p.0.is_empty() {
        Ok(Config {
            server,
            upstream,
            token,
            cache,
            budget,
            clients,
            routes,
        })
    } else {
        Err(p.0)
    }
}

/// A route's cost must fit in the smallest burst a call to it may have to pass: the global
/// burst (less the interactive reserve for a batch client) and every client's own share,
/// since any client may call any route. A cost above it could only be booked as debt, which
/// would lock every caller out until it drained; the message names that burst.
fn cost_fits(
    p: &mut Problems,
    i: usize,
    cost: u32,
    global: &Share,
    batch_reserve: f64,
    clients: &[ClientConfig],
) {
    let as_budget = crate::budget::Share {
        limit: global.limit,
        period: global.period,
        burst: global.burst,
    };
    let mut smallest = (global.burst.get(), "budget.burst".to_string());
    for (k, c) in clients.iter().enumerate() {
        let priority = match c.priority {
            Priority::Interactive => crate::budget::Priority::Interactive,
            Priority::Batch => crate::budget::Priority::Batch,
        };
        let usable = crate::budget::global_usable(&as_budget, batch_reserve, priority);
        if usable < smallest.0 {
            smallest = (
                usable,
                format!(
                    "budget.burst less budget.batch_reserve, what batch client {:?} may take",
                    c.name
                ),
            );
        }
        if let Some(own) = c.share.filter(|s| s.burst.get() < smallest.0) {
            smallest = (
                own.burst.get(),
                format!("clients[{k}].burst, client {:?}'s own share", c.name),
            );
        }
    }
    let (burst, what) = smallest;
    if cost > burst {
        p.add(
            format!("routes[{i}].cost"),
            format!(
                "{cost} is more than the {burst} cells of {what}: one call must fit in one \
                 burst, or it could never be admitted"
            ),
        );
    }
}

/// `global_period` is the budget's period as the file spells it, for messages.
fn client(
    p: &mut Problems,
    i: usize,
    c: &RawClient,
    global: &Share,
    global_period: &str,
) -> ClientConfig {
    let at = |k: &str| format!("clients[{i}].{k}");
    let name = c.name.clone().unwrap_or_else(|| format!("client{i}"));
    let key_sha256 = match c.key_sha256.as_deref() {
        None => {
            p.add(
                at("key_sha256"),
                "required (print it with `cxgate key hash`)",
            );
            [0; 32]
        }
        Some(hex) => decode_sha256(hex).unwrap_or_else(|| {
            p.add(
                at("key_sha256"),
                "must be 64 hex digits (the SHA-256 of the key)",
            );
            [0; 32]
        }),
    };
    let (mut read, mut write) = (false, false);
    match &c.scopes {
        None => read = true,
        Some(scopes) => {
            for (k, s) in scopes.iter().enumerate() {
                match s.as_str() {
                    "read" => read = true,
                    "write" => write = true,
                    other => p.add(
                        format!("clients[{i}].scopes[{k}]"),
                        format!("unknown scope {other:?}; use \"read\" or \"write\""),
                    ),
                }
            }
        }
    }
    let accounts = c.accounts.as_ref().map(|ids| {
        ids.iter()
            .enumerate()
            .filter_map(|(k, &id)| {
                u64::try_from(id).ok().or_else(|| {
                    p.add(
                        format!("clients[{i}].accounts[{k}]"),
                        "account ids are positive numbers",
                    );
                    None
                })
            })
            .collect()
    });
    let priority = match c.priority.as_deref() {
        None | Some("interactive") => Priority::Interactive,
        Some("batch") => Priority::Batch,
        Some(other) => {
            p.add(
                at("priority"),
                format!("must be \"interactive\" or \"batch\", got {other:?}"),
            );
            Priority::Interactive
        }
    };
    let share = if c.limit.is_some() || c.period.is_some() || c.burst.is_some() {
        if c.limit.is_none() {
            p.add(at("limit"), "required when period or burst is set");
        }
        let limit = p.positive(&at("limit"), c.limit, global.limit.get());
        let period = p.duration(&at("period"), c.period.as_ref(), global.period);
        let burst = p.positive(&at("burst"), c.burst, limit.get().min(global.burst.get()));
        if period.is_zero() {
            p.add(at("period"), "must be greater than zero");
        } else if limit.get() as f64 / period.as_secs_f64()
            > global.limit.get() as f64 / global.period.as_secs_f64()
        {
            p.add(
                at("limit"),
                format!(
                    "share {}/{} is faster than the global budget {}/{}",
                    limit,
                    c.period.as_deref().unwrap_or(global_period),
                    global.limit,
                    global_period
                ),
            );
        }
        Some(Share {
            limit,
            period,
            burst,
        })
    } else {
        None
    };
    ClientConfig {
        name,
        key_sha256,
        read,
        write,
        accounts,
        priority,
        share,
        max_wait: c
            .max_wait
            .as_ref()
            .map(|w| p.duration(&at("max_wait"), Some(w), Duration::ZERO)),
    }
}

/// A zero `upstream.timeout` or `upstream.connect_timeout` passes no upstream call at all
/// (each would end at once, 504 "did not answer within 0ns"): refused, as a zero
/// `server.request_timeout` is. The other durations that may be zero mean something
/// there: no wait (`max_wait`), no grace (`shutdown_grace`), a refresh at expiry
/// (`token.refresh_before`), no caching or no stale answers (a route's `ttl`,
/// `stale_while_revalidate`, `stale_if_error`); the rest are refused where they are read.
fn zero_upstream_timeouts(p: &mut Problems, upstream: &UpstreamConfig) {
    for (path, value) in [
        ("upstream.connect_timeout", upstream.connect_timeout),
        ("upstream.timeout", upstream.timeout),
    ] {
        if value.is_zero() {
            p.add(
                path,
                "must be greater than zero: every upstream call would time out at once",
            );
        }
    }
}

/// The methods a route's `match` may name (besides `*`).
const ROUTE_METHODS: [http::Method; 7] = [
    http::Method::GET,
    http::Method::HEAD,
    http::Method::POST,
    http::Method::PUT,
    http::Method::PATCH,
    http::Method::DELETE,
    http::Method::OPTIONS,
];

fn route(p: &mut Problems, i: usize, r: &RawRoute) -> Option<RouteConfig> {
    let at = |k: &str| format!("routes[{i}].{k}");
    let Some(text) = r.match_.as_deref() else {
        p.add(at("match"), "required, e.g. \"GET /me\"");
        return None;
    };
    let Some((method_text, path_text)) = text.trim().split_once(' ') else {
        p.add(
            at("match"),
            format!("must be \"METHOD /path\", got {text:?}"),
        );
        return None;
    };
    let method = if method_text == "*" {
        None
    } else {
        // Only the methods an HTTP API uses: a typo such as `FETCH` is named as such, not
        // reported later as a method that cannot be cached.
        match ROUTE_METHODS.iter().find(|m| m.as_str() == method_text) {
            Some(m) => Some(m.clone()),
            None => {
                p.add(
                    at("match"),
                    format!(
                        "unknown method {method_text:?}; use one of {} or *",
                        ROUTE_METHODS.map(|m| m.to_string()).join(", ")
                    ),
                );
                return None;
            }
        }
    };
    if path_text.contains('?') {
        p.add(
            at("match"),
            format!(
                "routes match paths only, not query strings: drop {:?}",
                &path_text[path_text.find('?').unwrap_or(0)..]
            ),
        );
        return None;
    }
    let path = match PathTemplate::parse(path_text.trim()) {
        Ok(t) => t,
        Err(e) => {
            p.add(at("match"), e.to_string());
            return None;
        }
    };
    let ttl = r
        .ttl
        .as_ref()
        .map(|v| p.duration(&at("ttl"), Some(v), Duration::ZERO));
    let swr = p.duration(
        &at("stale_while_revalidate"),
        r.stale_while_revalidate.as_ref(),
        Duration::ZERO,
    );
    let sie = p.duration(
        &at("stale_if_error"),
        r.stale_if_error.as_ref(),
        Duration::ZERO,
    );
    if ttl.is_some()
        && !matches!(method, Some(ref m) if m == http::Method::GET || m == http::Method::HEAD)
    {
        p.add(at("ttl"), "only GET and HEAD routes can be cached");
    }
    if ttl.is_none() && (r.stale_while_revalidate.is_some() || r.stale_if_error.is_some()) {
        p.add(at("ttl"), "stale windows need a ttl");
    }
    // A ttl that did not parse was reported already; its stand-in zero is no second problem.
    let ttl_parsed = r.ttl.as_deref().is_none_or(|v| parse_duration(v).is_ok());
    if ttl_parsed && ttl == Some(Duration::ZERO) && (!swr.is_zero() || !sie.is_zero()) {
        p.add(at("ttl"), "a ttl of zero cannot have stale windows");
    }
    if ttl.is_none() && r.tags.as_ref().is_some_and(|t| !t.is_empty()) {
        p.add(at("tags"), "tags only apply to cached routes (set a ttl)");
    }
    let mut tags_of = |key: &str, list: &Option<Vec<String>>| -> Vec<TagTemplate> {
        list.iter()
            .flatten()
            .enumerate()
            .filter_map(|(k, tag)| match TagTemplate::parse(tag, &path) {
                Ok(t) => Some(t),
                Err(e) => {
                    p.add(format!("routes[{i}].{key}[{k}]"), e.to_string());
                    None
                }
            })
            .collect()
    };
    let tags = tags_of("tags", &r.tags);
    let invalidates = tags_of("invalidates", &r.invalidates);
    let cost = p.positive(&at("cost"), r.cost, 1);
    Some(RouteConfig {
        match_text: format!("{} {}", method_text, path_text.trim()),
        method,
        path,
        ttl,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        tags,
        invalidates,
        cost,
    })
}

fn decode_sha256(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.trim().as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}
