//! Reloading the config file while serving, and the settings a reload applies in place.
//!
//! A reload swaps in the new file as one snapshot, except the settings of [`RestartOnly`]:
//! those keep their running values and each one changed is named in the notes, so no
//! setting is ever ignored in silence. README "Reloading" lists both kinds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::certs::Certs;
use crate::config::{AccessLogTarget, Backend, CacheConfig, Config, TlsConfig, TokenConfig};
use crate::proxy::Gateway;
use crate::secrets::Secrets;
use crate::token::Secret;

/// The running values of settings a reload applies outside the config snapshot.
#[derive(Debug)]
pub struct Live {
    admin_token: RwLock<Option<Secret>>,
    certs: Option<Arc<Certs>>,
}

impl Live {
    pub fn new(admin_token: Option<Secret>, certs: Option<Arc<Certs>>) -> Arc<Live> {
        Arc::new(Live {
            admin_token: RwLock::new(admin_token),
            certs,
        })
    }

    /// The bearer token `/admin/*` needs now, if any.
    pub fn admin_token(&self) -> Option<Secret> {
        self.admin_token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The admin token `server.admin_token_env` names; start, reload and `check` refuse alike
/// when the variable is missing or empty, or holds anything but visible ASCII: a token
/// with spaces around it or a non-ASCII byte could not be sent as `Bearer` (a client trims
/// or cannot encode it) and would only ever work through Basic.
pub fn admin_token(cfg: &Config, secrets: &Secrets) -> Result<Option<Secret>, String> {
    match &cfg.server.admin_token_env {
        Some(name) => match secrets.get(name) {
            Some(token) if !token.expose().bytes().all(|b| b.is_ascii_graphic()) => Err(format!(
                "server.admin_token_env: ${name} must hold visible ASCII characters only \
                     (no space, tab, control or non-ASCII byte, also not around it)"
            )),
            Some(token) => Ok(Some(token.clone())),
            None => Err(format!("server.admin_token_env: ${name} is not set")),
        },
        None => Ok(None),
    }
}

/// What `cxgate run` would refuse about the files `cfg` names, checked without starting:
/// the TLS pair must load, `upstream.ca_file` must be readable, and a token file that
/// exists must be a regular file, and a Redis URL in `secrets` must be one start accepts.
/// Returns the problems, then warnings that do not refuse.
pub fn preflight(cfg: &Config, secrets: &Secrets) -> (Vec<String>, Vec<String>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut warnings = Vec::new();
    // A variable the file names must be set, as `run` needs each one: `check`, `run` and
    // reload refuse alike when one is not (`run` would otherwise stop later, with exit 1).
    let mut problems: Vec<String> = secrets
        .unset(cfg)
        .into_iter()
        .map(|(key, name)| format!("{key}: ${name} is not set"))
        .collect();
    // The unset admin token is named above; here only a value that is set but unusable.
    let admin_set = cfg
        .server
        .admin_token_env
        .as_ref()
        .is_some_and(|name| secrets.get(name).is_some());
    if let (true, Err(e)) = (admin_set, admin_token(cfg, secrets)) {
        problems.push(e);
    }
    if let Some(tls) = &cfg.server.tls {
        if let Err(e) = Certs::load(&tls.cert_file, &tls.key_file) {
            problems.push(format!("server.tls: {e}"));
        }
    }
    if let Some(ca) = &cfg.upstream.ca_file {
        if let Err(e) = crate::upstream::build_client(Some(ca), cfg.upstream.connect_timeout) {
            problems.push(format!("upstream.ca_file: {e}"));
        }
    }
    if let (crate::config::Backend::Redis, Some(url_env)) =
        (cfg.budget.backend, &cfg.budget.redis_url_env)
    {
        let options = crate::replicas::Options {
            ca_file: cfg.budget.redis_ca_file.clone(),
            cluster: cfg.budget.redis_cluster,
        };
        let url = secrets.get(url_env).map(|url| url.expose());
        if let Err(e) = crate::replicas::check_settings(url_env, url, &options) {
            problems.push(format!("budget: {e}"));
        }
    }
    if let crate::config::AccessLogTarget::File(path) = &cfg.server.access_log {
        if let Err(e) = crate::access::open_append(path) {
            problems.push(format!(
                "server.access_log: cannot open {} for appending: {e}",
                path.display()
            ));
        }
    }
    if let Some(path) = &cfg.token.file {
        // Only a file `inspect` accepts is read again: a FIFO must never be opened.
        match crate::token::inspect_file(path) {
            Ok(_) if crate::token::holds_client_key(path, super::client_keys(cfg).as_slice()) => {
                problems.push(format!(
                    "token.file: {}",
                    crate::token::TokenError::ClientKey {
                        what: format!("token file {}", path.display())
                    }
                ));
            }
            Ok(open) => {
                let unsendable = crate::token::unsendable_warning(path);
                let expired = crate::token::expired_warning(path, cfg.token.oauth.is_some());
                for warning in open.into_iter().chain(unsendable).chain(expired) {
                    warnings.push(format!("token.file: {warning}"));
                }
            }
            Err(e) => problems.push(format!("token.file: {e}")),
        }
    }
    // The file takes precedence; without one, the token is the variable's value, and what
    // `run` warns about it on loading is said here too.
    if let (None, Some(name)) = (&cfg.token.file, &cfg.token.access_token_env) {
        let value = secrets.lookup(name).unwrap_or_default();
        if !value.is_empty() {
            if let Some(warning) = crate::token::unsendable_env_warning(name, &value) {
                warnings.push(format!("token.access_token_env: {warning}"));
            }
        }
    }
    (problems, warnings)
}

/// Re-reads the config file, and the environment variables it names, and swaps it in; an
/// invalid file, an unreadable certificate or a missing admin token changes nothing.
/// Returns notes on settings that need a restart.
pub async fn reload(
    gateway: &Gateway,
    live: &Live,
    path: Option<&Path>,
) -> Result<Vec<String>, Vec<String>> {
    let Some(path) = path else {
        return Err(vec![
            "this gateway was started without a config file; nothing to reload".into(),
        ]);
    };
    // Reading the files blocks (a slow disk, a network mount), so it runs off the runtime's
    // workers: a reload must never stall the listeners or `/healthz`.
    let owned = path.to_path_buf();
    let (mut next, secrets, problems) = tokio::task::spawn_blocking(move || {
        let next = crate::config::load(&owned).map_err(|e| e.lines())?;
        let secrets = Secrets::from_env(&next);
        let (problems, _) = preflight(&next, &secrets);
        Ok::<_, Vec<String>>((next, secrets, problems))
    })
    .await
    .map_err(|e| vec![format!("reload: reading the files failed: {e}")])??;
    let current = gateway.state().config.clone();

    // Everything that can fail is tried before anything is applied. A file `cxgate run`
    // would refuse is refused here too, restart-only settings included: a reload must not
    // answer "restart to apply it" for a file the restart cannot start on. A token file
    // that cannot be read is the exception while it is the running one: the held token
    // stays (see below).
    let same_file = next.token.file == current.token.file;
    let problems: Vec<String> = problems
        .into_iter()
        .filter(|p| !(same_file && p.starts_with("token.file:")))
        .collect();
    if !problems.is_empty() {
        return Err(problems);
    }
    // A client added with the upstream token as its key would send a key upstream. The
    // new clients keep the keys proven under the old ones, so the token file read below
    // is searched for their spellings too, and the gateway serves by these same clients
    // once swapped in.
    let held = gateway.token().clients();
    let clients = Arc::new(crate::auth::Clients::carried_over(&next, &held));
    let restore = |problems: Vec<String>| {
        let _ = gateway.token().set_client_keys(held.clone());
        problems
    };
    if let Err(e) = gateway.token().set_client_keys(clients) {
        return Err(restore(vec![format!("clients: {e}")]));
    }
    let mut notes = keep_restart_only(&current, &mut next);
    let admin_token = admin_token(&next, &secrets).map_err(|e| restore(vec![e]))?;
    if let (Some(certs), Some(tls)) = (&live.certs, &next.server.tls) {
        let (certs, tls) = (certs.clone(), tls.clone());
        tokio::task::spawn_blocking(move || certs.reload(&tls.cert_file, &tls.key_file))
            .await
            .map_err(|e| restore(vec![format!("server.tls: {e}")]))?
            .map_err(|e| restore(vec![format!("server.tls: {e}")]))?;
    }
    *live.admin_token.write().unwrap_or_else(|e| e.into_inner()) = admin_token;

    // The token file is read again as a restart would read it: an operator who rewrote it
    // (`cxgate token init`) and reloads gets its token in use. One that cannot be read or
    // decoded is not taken, and the token held stays; the rest of the reload applies.
    match gateway.token().reread_file().await {
        Ok(Some(generation)) => {
            tracing::info!(
                generation,
                "reload: the token file changed; its token is in use"
            );
            // What start-up warns about, a reload says too, in its answer as well.
            if let Some(path) = &current.token.file {
                if let Ok(Some(warning)) = crate::token::inspect_file(path) {
                    tracing::warn!("token.file: {warning}");
                    notes.push(format!("token.file: {warning}; taken"));
                }
            }
            if let Err(reason) = gateway.token().readiness() {
                tracing::warn!("reload: the token taken from token.file is not usable: {reason}");
                notes.push(format!(
                    "token.file: the token taken is not usable: {reason}"
                ));
            }
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(error = %e, "reload: the token file is not usable; the held token stays");
            notes.push(format!(
                "token.file: {e}; not taken, the token held stays in use"
            ));
        }
    }

    // The other replicas learn the new table before this one serves by it: from then on
    // their writes also drop what it stores under it (see `proxy::announced`).
    if let Some(redis) = gateway.replicas() {
        if let Err(e) = redis.announce_table(&crate::proxy::announced(&next)).await {
            tracing::warn!(error = %e, "reload: the new route table could not be announced");
            notes.push(format!(
                "routes: the new table could not be announced to the other replicas ({e}); \
                 retried every 10 s, and until then their writes may miss what this replica \
                 caches under it"
            ));
        }
    }
    let next = Arc::new(next);
    gateway.swap(next.clone());
    // Cached bodies carry their links rewritten to the public base URL: a new base makes
    // every entry wrong, so all go (and clients follow links to the base now configured).
    let new_base = current.server.public_base_url != next.server.public_base_url;
    let dropped = if new_base {
        let dropped = gateway.cache().purge_all().await;
        notes.push(format!(
            "server.public_base_url changed: {dropped} cached answers dropped, as their \
             links named the old base"
        ));
        dropped
    } else {
        gateway
            .cache()
            .purge_where(|method, path| route_changed(&current, &next, method, path))
            .await
    };
    // The shared tier cannot be searched by route: when any route's caching rules changed,
    // every shared entry is retired (each replica then fetches and shares anew). A new base
    // leaves it be: its entries name the upstream's base, and each replica moves their
    // links to its own as it takes them.
    if let Some(tier) = gateway
        .cache()
        .shared()
        .filter(|_| rules_changed(&current, &next))
    {
        if let Err(e) = tier.invalidate(&crate::replicas::Invalidation::All).await {
            tracing::warn!(
                error = %e,
                "routes changed but the shared cache could not be purged: its entries keep \
                 the old rules until they expire"
            );
        }
    }
    tracing::info!(path = %path.display(), ?notes, dropped, "configuration reloaded");
    Ok(notes)
}

/// Declares [`RestartOnly`]: each row is a field, the key path its note names, and where it
/// lives in [`Config`]. A row here is the only way to mark a setting restart-only.
macro_rules! restart_only {
    ($($field:ident: $ty:ty = $key:literal => $($path:ident).+;)*) => {
        /// The settings a reload cannot apply (listeners, the upstream client, the token
        /// source, the cache size, the Redis link), projected out of a [`Config`] and
        /// compared as a whole.
        #[derive(Debug, Clone, PartialEq)]
        pub struct RestartOnly {
            $(pub $field: $ty,)*
        }

        impl RestartOnly {
            /// The restart-only settings of `cfg`.
            pub fn of(cfg: &Config) -> RestartOnly {
                RestartOnly { $($field: cfg.$($path).+.clone().into(),)* }
            }

            /// The key path of each setting that differs between `self` and `other`.
            fn differences(&self, other: &RestartOnly) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if self.$field != other.$field {
                    keys.push($key);
                })*
                keys
            }

            /// Puts back into `cfg` each setting of `self` that `cfg` has otherwise.
            fn restore(&self, cfg: &mut Config) {
                let theirs = RestartOnly::of(cfg);
                $(if self.$field != theirs.$field {
                    cfg.$($path).+ = self.$field.clone().into();
                })*
            }
        }
    };
}

restart_only! {
    listen: std::net::SocketAddr = "server.listen" => server.listen;
    admin_listen: std::net::SocketAddr = "server.admin_listen" => server.admin_listen;
    shutdown_grace: Duration = "server.shutdown_grace" => server.shutdown_grace;
    header_timeout: Duration = "server.header_timeout" => server.header_timeout;
    idle_timeout: Duration = "server.idle_timeout" => server.idle_timeout;
    max_connections: usize = "server.max_connections" => server.max_connections;
    access_log: AccessLogTarget = "server.access_log" => server.access_log;
    tls: Presence<TlsConfig> = "[server.tls]" => server.tls;
    base_url: String = "upstream.base_url" => upstream.base_url;
    connect_timeout: Duration = "upstream.connect_timeout" => upstream.connect_timeout;
    ca_file: Option<PathBuf> = "upstream.ca_file" => upstream.ca_file;
    token_file: Option<PathBuf> = "token.file" => token.file;
    access_token_env: Option<String> = "token.access_token_env" => token.access_token_env;
    refresh_before: Duration = "token.refresh_before" => token.refresh_before;
    oauth: Option<crate::config::OAuthConfig> = "[token.oauth]" => token.oauth;
    token: TokenConfig = "[token]" => token;
    max_bytes: u64 = "cache.max_bytes" => cache.max_bytes;
    shared: bool = "cache.shared" => cache.shared;
    shared_max_entry_bytes: u64 = "cache.shared_max_entry_bytes" => cache.shared_max_entry_bytes;
    cache: CacheConfig = "[cache]" => cache;
    backend: Backend = "budget.backend" => budget.backend;
    redis_url_env: Option<String> = "budget.redis_url_env" => budget.redis_url_env;
    key_prefix: String = "budget.key_prefix" => budget.key_prefix;
    replicas: std::num::NonZeroU32 = "budget.replicas" => budget.replicas;
    redis_ca_file: Option<PathBuf> = "budget.redis_ca_file" => budget.redis_ca_file;
    redis_cluster: bool = "budget.redis_cluster" => budget.redis_cluster;
}

/// An optional table of which only presence is restart-only: `[server.tls]` turns the
/// listener's TLS on or off, while new files for a running TLS listener are applied.
#[derive(Debug, Clone)]
pub struct Presence<T>(pub Option<T>);

impl<T> PartialEq for Presence<T> {
    fn eq(&self, other: &Presence<T>) -> bool {
        self.0.is_some() == other.0.is_some()
    }
}

impl<T> From<Option<T>> for Presence<T> {
    fn from(table: Option<T>) -> Presence<T> {
        Presence(table)
    }
}

impl<T> From<Presence<T>> for Option<T> {
    fn from(presence: Presence<T>) -> Option<T> {
        presence.0
    }
}

/// Keeps the running value of every restart-only setting the new file changes, so the
/// snapshot stays true to what is running, and returns a note for each. A whole-table row
/// (`[token]`) is noted only when no key of that table is: it catches keys added later.
fn keep_restart_only(current: &Config, next: &mut Config) -> Vec<String> {
    // Port 0 means "any free port": the bound one is what runs, not a change.
    if next.server.listen.port() == 0 {
        next.server.listen = current.server.listen;
    }
    if next.server.admin_listen.port() == 0 {
        next.server.admin_listen = current.server.admin_listen;
    }
    if next.server.public_base_url.ends_with(":0") {
        next.server.public_base_url = current.server.public_base_url.clone();
    }
    // Not read from the file: set from the command line, or derived from a kept setting.
    next.server.access_log_json = current.server.access_log_json;
    next.upstream.base_uri = current.upstream.base_uri.clone();

    let running = RestartOnly::of(current);
    let keys = running.differences(&RestartOnly::of(next));
    running.restore(next);
    keys.iter()
        .filter(|key| !is_covered_table(key, &keys))
        .map(|key| format!("{key} changed: restart to apply it"))
        .collect()
}

/// Whether `key` is a whole table (`[token]`) of which a key is among `keys` already.
fn is_covered_table(key: &str, keys: &[&str]) -> bool {
    let Some(table) = key.strip_prefix('[').and_then(|k| k.strip_suffix(']')) else {
        return false;
    };
    keys.iter().any(|other| {
        other.starts_with(&format!("{table}.")) || other.starts_with(&format!("[{table}."))
    })
}

/// Whether any route's caching rules (match, ttl, stale windows, tags) or their order changed.
fn rules_changed(current: &Config, next: &Config) -> bool {
    let rules = |cfg: &Config| -> Vec<String> {
        cfg.routes
            .iter()
            .map(|r| {
                format!(
                    "{}|{:?}|{:?}|{:?}|{:?}",
                    r.match_text, r.ttl, r.stale_while_revalidate, r.stale_if_error, r.tags
                )
            })
            .collect()
    };
    rules(current) != rules(next)
}

/// Whether an entry of `method path` was stored under rules the new config no longer has:
/// its route's ttl, stale windows or tags changed, or the path now falls to another route.
fn route_changed(current: &Config, next: &Config, method: &str, path: &str) -> bool {
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return true;
    };
    let rules = |cfg: &Config| {
        cfg.find_route(&method, path).map(|(i, _)| {
            let r = &cfg.routes[i];
            format!(
                "{}|{:?}|{:?}|{:?}|{:?}",
                r.match_text, r.ttl, r.stale_while_revalidate, r.stale_if_error, r.tags
            )
        })
    };
    rules(current) != rules(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config that sets every table, so each key can be changed on its own.
    const BASE: &str = r#"
[server]
listen = "127.0.0.1:7000"
admin_listen = "127.0.0.1:7001"
public_base_url = "https://gw.example"
max_body_bytes = 1000
max_concurrency = 10
request_timeout = "5s"
shutdown_grace = "2s"
header_timeout = "3s"
body_timeout = "4s"
idle_timeout = "50s"
max_connections = 100
max_buffered_bytes = 100000
admin_token_env = "RELOAD_TEST_ADMIN"
admin_hosts = ["gw.example"]
allow_anonymous = false
access_log = "off"
[server.tls]
cert_file = "cert.pem"
key_file = "key.pem"
[upstream]
base_url = "https://api.engagor.com"
connect_timeout = "1s"
timeout = "2s"
ca_file = "ca.pem"
[token]
file = "token.json"
refresh_before = "1m"
[token.oauth]
token_url = "https://app.engagor.com/oauth/access_token/"
client_id = "client"
client_secret_env = "RELOAD_TEST_SECRET"
method = "post"
[cache]
max_bytes = 1000000
[budget]
limit = 100
period = "1m"
burst = 10
max_wait = "1s"
batch_reserve = 0.2
backend = "redis"
redis_url_env = "RELOAD_TEST_REDIS"
key_prefix = "cx"
replicas = 2
redis_ca_file = "redis-ca.pem"
redis_cluster = false
[[clients]]
name = "app"
key_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
scopes = ["read"]
[[routes]]
match = "GET /me"
ttl = "1m"
"#;

    /// A change of one setting: its key path, and the edits to `BASE` that make it (a
    /// value for a key, or `None` to remove it).
    type Change = (&'static str, Vec<(&'static str, Option<&'static str>)>);

    /// One change for each setting of every table.
    fn changes() -> Vec<Change> {
        let one = |path, value| (path, vec![(path, value)]);
        vec![
            one("server.listen", Some(r#""127.0.0.1:7100""#)),
            one("server.admin_listen", Some(r#""127.0.0.1:7101""#)),
            one("server.public_base_url", Some(r#""https://other.example""#)),
            one("server.max_body_bytes", Some("2000")),
            one("server.max_concurrency", Some("20")),
            one("server.request_timeout", Some(r#""6s""#)),
            one("server.shutdown_grace", Some(r#""9s""#)),
            one("server.header_timeout", Some(r#""8s""#)),
            one("server.body_timeout", Some(r#""7s""#)),
            one("server.idle_timeout", Some(r#""60s""#)),
            one("server.max_connections", Some("200")),
            one("server.max_buffered_bytes", Some("200000")),
            one("server.admin_token_env", Some(r#""RELOAD_TEST_OTHER""#)),
            one("server.admin_hosts", Some(r#"["other.example"]"#)),
            one("server.allow_anonymous", Some("true")),
            one("server.tls", None),
            one("server.access_log", Some(r#""stderr""#)),
            one("server.tls.cert_file", Some(r#""renewed-cert.pem""#)),
            one("server.tls.key_file", Some(r#""renewed-key.pem""#)),
            one("upstream.base_url", Some(r#""https://api.example""#)),
            one("upstream.connect_timeout", Some(r#""3s""#)),
            one("upstream.timeout", Some(r#""4s""#)),
            one("upstream.ca_file", Some(r#""other-ca.pem""#)),
            one("token.file", Some(r#""other-token.json""#)),
            // A static token instead of the file (exclusive with it, and never refreshed).
            (
                "token.access_token_env",
                vec![
                    ("token.access_token_env", Some(r#""RELOAD_TEST_TOKEN""#)),
                    ("token.file", None),
                    ("token.oauth", None),
                ],
            ),
            one("token.refresh_before", Some(r#""5m""#)),
            one("token.oauth", None),
            one(
                "token.oauth.token_url",
                Some(r#""https://other.example/token""#),
            ),
            one("token.oauth.client_id", Some(r#""other""#)),
            one(
                "token.oauth.client_secret_env",
                Some(r#""RELOAD_TEST_OTHER""#),
            ),
            one("token.oauth.method", Some(r#""get""#)),
            one("cache.max_bytes", Some("2000000")),
            one("cache.shared", Some("true")),
            one("cache.shared_max_entry_bytes", Some("2000000")),
            one("budget.limit", Some("200")),
            one("budget.period", Some(r#""2m""#)),
            one("budget.burst", Some("20")),
            one("budget.max_wait", Some(r#""2s""#)),
            one("budget.batch_reserve", Some("0.3")),
            one("budget.backend", Some(r#""local""#)),
            one("budget.redis_url_env", Some(r#""RELOAD_TEST_OTHER""#)),
            one("budget.key_prefix", Some(r#""other""#)),
            one("budget.replicas", Some("3")),
            one("budget.redis_ca_file", Some(r#""other-ca.pem""#)),
            one("budget.redis_cluster", Some("true")),
            one(
                "clients",
                Some(
                    r#"[{ name = "other", key_sha256 = "1111111111111111111111111111111111111111111111111111111111111111", scopes = ["read"] }]"#,
                ),
            ),
            one("routes", Some(r#"[{ match = "GET /me", ttl = "2m" }]"#)),
        ]
    }

    /// `BASE` with `edits` made.
    fn changed(edits: &[(&str, Option<&str>)]) -> Config {
        let mut doc: toml::Table = toml::from_str(BASE).expect("BASE is TOML");
        for (path, value) in edits {
            edit(&mut doc, path, *value);
        }
        let text = toml::to_string(&doc).expect("serialises");
        crate::config::parse(&text)
            .unwrap_or_else(|e| panic!("{edits:?} gives an invalid config: {:?}", e.lines()))
    }

    /// Sets the value at `path` in `doc`, or removes it.
    fn edit(doc: &mut toml::Table, path: &str, value: Option<&str>) {
        let (tables, key) = path.rsplit_once('.').unwrap_or(("", path));
        let mut table = doc;
        for name in tables.split('.').filter(|n| !n.is_empty()) {
            table = table
                .get_mut(name)
                .and_then(toml::Value::as_table_mut)
                .expect("BASE has the table");
        }
        match value {
            Some(value) => {
                let value: toml::Table =
                    toml::from_str(&format!("v = {value}")).expect("a TOML value");
                table.insert(key.to_string(), value["v"].clone());
            }
            None => {
                table.remove(key);
            }
        }
    }

    /// Whether `note` names the setting at `path`, or a table it is in (`[token.oauth]`).
    fn names(note: &str, path: &str) -> bool {
        let key = note.split(' ').next().unwrap_or_default();
        let mut table = path;
        loop {
            if key == table || key == format!("[{table}]") {
                return true;
            }
            match table.rsplit_once('.') {
                Some((outer, _)) => table = outer,
                None => return false,
            }
        }
    }

    #[test]
    fn every_setting_is_applied_on_reload_or_named_in_the_notes() {
        let current = crate::config::parse(BASE).expect("BASE is valid");
        let running = format!("{current:?}");
        let changes = changes();
        for (table, keys) in crate::config::TABLES {
            let arrays = ["clients", "routes"];
            let paths: Vec<String> = match arrays.contains(table) {
                // An array is swapped whole: one change for all its keys.
                true => vec![table.to_string()],
                false => keys.iter().map(|key| format!("{table}.{key}")).collect(),
            };
            for path in paths {
                assert!(
                    changes.iter().any(|(p, _)| *p == path),
                    "{path} has no change in this test: add one, so it is proven applied or noted"
                );
            }
        }
        for (path, edits) in changes {
            let mut next = changed(&edits);
            let notes = keep_restart_only(&current, &mut next);
            let kept = format!("{next:?}");
            let noted = notes.iter().any(|note| names(note, path));
            if noted {
                assert_eq!(
                    kept, running,
                    "{path} is noted as needing a restart, so its running value must stay"
                );
            } else {
                assert_ne!(
                    kept, running,
                    "changing {path} was neither applied nor noted (notes: {notes:?})"
                );
            }
        }
    }

    #[test]
    fn a_restart_only_change_is_noted_once_and_by_its_key() {
        let current = crate::config::parse(BASE).expect("BASE is valid");
        let mut next = changed(&[("token.file", Some(r#""moved.json""#))]);
        let notes = keep_restart_only(&current, &mut next);
        assert_eq!(notes, ["token.file changed: restart to apply it"]);
        assert_eq!(RestartOnly::of(&next), RestartOnly::of(&current));
    }

    #[test]
    fn new_certificate_files_are_applied_and_tls_on_or_off_is_noted() {
        let current = crate::config::parse(BASE).expect("BASE is valid");
        let mut renewed = changed(&[("server.tls.cert_file", Some(r#""renewed.pem""#))]);
        assert!(keep_restart_only(&current, &mut renewed).is_empty());
        let cert = renewed.server.tls.map(|t| t.cert_file);
        assert_eq!(cert, Some(PathBuf::from("renewed.pem")));
        let mut off = changed(&[("server.tls", None)]);
        let notes = keep_restart_only(&current, &mut off);
        assert_eq!(notes, ["[server.tls] changed: restart to apply it"]);
        assert!(off.server.tls.is_some(), "the running TLS listener stays");
    }
}
