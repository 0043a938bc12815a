//! Reloading the config file while serving, and the settings a reload applies in place.
//!
//! A reload swaps in the new file as one snapshot. What cannot change without a restart
//! (listeners, the upstream client, the token source, the cache size, the Redis link) is
//! listed once, in [`keep_restart_only`]: each row there is both the note the operator gets
//! and the value kept from the running config, so a setting is never ignored in silence.
//! Everything else takes effect: routes, clients, budgets, timeouts, the admin token and
//! the TLS certificate (re-read from its files, so a renewed certificate is served to new
//! connections). The access log's file is reopened by SIGUSR1, not by a reload; a new
//! `server.access_log` needs a restart. Cache entries of a route whose ttl, stale windows or tags changed are
//! dropped, so the new rules and tag names govern everything served after the reload.

use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::certs::Certs;
use crate::config::Config;
use crate::proxy::Gateway;
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

/// The admin token `server.admin_token_env` names; start and reload refuse alike when the
/// variable is missing or empty.
pub fn admin_token(cfg: &Config) -> Result<Option<Secret>, String> {
    match &cfg.server.admin_token_env {
        Some(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
            _ => Err(format!("server.admin_token_env: ${name} is not set")),
        },
        None => Ok(None),
    }
}

/// What `cxgate run` would refuse about the files `cfg` names, checked without starting:
/// the TLS pair must load, `upstream.ca_file` must be readable, and a token file that
/// exists must be a regular file. Returns the problems, then warnings that do not refuse.
pub fn preflight(cfg: &Config) -> (Vec<String>, Vec<String>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
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
        let url = std::env::var(url_env).ok();
        if let Err(e) = crate::replicas::check_settings(url_env, url.as_deref(), &options) {
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
        match crate::token::inspect_file(path) {
            Ok(Some(warning)) => warnings.push(format!("token.file: {warning}")),
            Ok(None) => {}
            Err(e) => problems.push(format!("token.file: {e}")),
        }
    }
    (problems, warnings)
}

/// Re-reads the config file and swaps it in; an invalid file, an unreadable certificate or a
/// missing admin token changes nothing. Returns notes on settings that need a restart.
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
    let mut next = crate::config::load(path).map_err(|e| e.lines())?;
    let current = gateway.state().config.clone();
    let notes = keep_restart_only(&current, &mut next);

    // Everything that can fail is tried before anything is applied.
    let admin_token = admin_token(&next).map_err(|e| vec![e])?;
    if let (Some(certs), Some(tls)) = (&live.certs, &next.server.tls) {
        certs
            .reload(&tls.cert_file, &tls.key_file)
            .map_err(|e| vec![format!("server.tls: {e}")])?;
    }
    *live.admin_token.write().unwrap_or_else(|e| e.into_inner()) = admin_token;

    let next = Arc::new(next);
    gateway.swap(next.clone());
    let dropped = gateway
        .cache()
        .purge_where(|method, path| route_changed(&current, &next, method, path))
        .await;
    // The shared tier cannot be searched by route: when any route's caching rules changed,
    // every shared entry is retired (each replica then fetches and shares anew).
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

/// For each row: when the new file changes the setting, note that it needs a restart and
/// keep the running value, so the snapshot stays true to what is running. Whole-table rows
/// after the named keys catch keys added to those tables later.
fn keep_restart_only(current: &Config, next: &mut Config) -> Vec<String> {
    let mut notes = Vec::new();
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
    macro_rules! restart_only {
        ($($key:literal => $($field:ident).+;)*) => {$(
            if format!("{:?}", next.$($field).+) != format!("{:?}", current.$($field).+) {
                notes.push(format!("{} changed: restart to apply it", $key));
                next.$($field).+ = current.$($field).+.clone();
            }
        )*};
    }
    restart_only! {
        "server.listen" => server.listen;
        "server.admin_listen" => server.admin_listen;
        "server.shutdown_grace" => server.shutdown_grace;
        "server.header_timeout" => server.header_timeout;
        "server.idle_timeout" => server.idle_timeout;
        "server.max_connections" => server.max_connections;
        "server.access_log" => server.access_log;
        "upstream.base_url" => upstream.base_url;
        "upstream.connect_timeout" => upstream.connect_timeout;
        "upstream.ca_file" => upstream.ca_file;
        "token.file" => token.file;
        "token.access_token_env" => token.access_token_env;
        "token.refresh_before" => token.refresh_before;
        "[token.oauth]" => token.oauth;
        "[token]" => token;
        "cache.max_bytes" => cache.max_bytes;
        "cache.shared" => cache.shared;
        "cache.shared_max_entry_bytes" => cache.shared_max_entry_bytes;
        "[cache]" => cache;
        "budget.backend" => budget.backend;
        "budget.redis_url_env" => budget.redis_url_env;
        "budget.key_prefix" => budget.key_prefix;
        "budget.replicas" => budget.replicas;
        "budget.redis_ca_file" => budget.redis_ca_file;
        "budget.redis_cluster" => budget.redis_cluster;
    }
    // Set from the command line, which a reload does not re-read.
    next.server.access_log_json = current.server.access_log_json;
    // Derived from base_url, so kept with it.
    next.upstream.base_uri = current.upstream.base_uri.clone();
    // TLS on or off changes the listener; new files for a running TLS listener are applied.
    if next.server.tls.is_some() != current.server.tls.is_some() {
        notes.push("[server.tls] added or removed: restart to apply it".to_string());
        next.server.tls = current.server.tls.clone();
    }
    notes
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
