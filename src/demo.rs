//! `cxgate demo`: the simulated CX Social API on an ephemeral loopback port and the gateway
//! in front of it, configured from the embedded `config/demo.toml`. It needs no credentials
//! and leaves nothing behind, yet runs the gateway as production does; [`run`] says how.

/// `println!` that never panics on a closed stdout (see [`crate::logging::say`]).
macro_rules! println {
    () => { crate::logging::say(format_args!("")) };
    ($($arg:tt)*) => { crate::logging::say(format_args!($($arg)*)) };
}

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::config::{self, Config};
use crate::{sim, StartError};

/// The demo's embedded configuration.
pub const DEMO_TOML: &str = include_str!("../config/demo.toml");
/// The demo client's key (its SHA-256 is in `config/demo.toml`).
pub const DEMO_KEY: &str = "demo-key";
/// The environment variable the demo's `[token.oauth]` names for the client secret.
pub const DEMO_SECRET_ENV: &str = "CXGATE_DEMO_CLIENT_SECRET";

/// How long the demo's access tokens live: short enough that a demo left running shows
/// a refresh (`refresh_before` is 2 minutes), long enough not to get in the way.
const DEMO_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);

/// The demo's config file text: the embedded `config/demo.toml` with the simulator's
/// address, the token file and the listeners filled in.
pub fn demo_config_text(
    sim_base: &str,
    token_file: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<String, StartError> {
    let not_toml = |e: Box<dyn std::error::Error + Send + Sync>| {
        StartError::refused("the embedded demo config is not TOML", e)
    };
    let mut doc: toml::Table = toml::from_str(DEMO_TOML).map_err(|e| not_toml(e.into()))?;
    let base = sim_base.trim_end_matches('/').to_string();
    let mut set = |section: &[&str], key: &str, value: String| {
        let mut table = &mut doc;
        for name in section {
            table = table
                .entry(name.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(|| not_toml(format!("[{name}] is not a table").into()))?;
        }
        table.insert(key.to_string(), toml::Value::String(value));
        Ok::<(), StartError>(())
    };
    set(&["upstream"], "base_url", base.clone())?;
    set(
        &["token", "oauth"],
        "token_url",
        format!("{base}/oauth/access_token/"),
    )?;
    set(&["token"], "file", token_file.display().to_string())?;
    set(&["server"], "listen", listen.to_string())?;
    set(&["server"], "admin_listen", admin.to_string())?;
    set(&["server"], "public_base_url", format!("http://{listen}"))?;
    let body = toml::to_string(&doc).map_err(|e| not_toml(e.into()))?;
    Ok(format!(
        "# Written by `cxgate demo` from its embedded config/demo.toml, with this run's\n\
         # simulator, token file and listeners. Edit it and reload: POST /admin/reload or SIGHUP.\n\n{body}"
    ))
}

/// The demo's gateway config, pointed at a running simulator and a token file.
pub fn demo_config(
    sim_base: &str,
    token_file: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<Config, StartError> {
    let mut cfg = config::parse(DEMO_TOML)?;
    cfg.upstream.base_url = sim_base.trim_end_matches('/').to_string();
    cfg.upstream.base_uri = cfg.upstream.base_url.parse().map_err(|e| {
        StartError::refused(format!("simulator address {sim_base} is not a URL"), e)
    })?;
    if let Some(oauth) = cfg.token.oauth.as_mut() {
        oauth.token_url = format!("{}/oauth/access_token/", cfg.upstream.base_url);
    }
    cfg.token.file = Some(token_file.to_path_buf());
    cfg.server.listen = listen;
    cfg.server.admin_listen = admin;
    cfg.server.public_base_url = format!("http://{listen}");
    Ok(cfg)
}

/// A fresh random token pair for the simulator and the demo's token file.
fn random_token(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

/// Writes the token file the gateway starts from (mode 0600).
pub fn write_token_file(
    path: &Path,
    access: &str,
    refresh: &str,
    ttl: Duration,
) -> std::io::Result<()> {
    let expires_at = humantime::format_rfc3339_seconds(SystemTime::now() + ttl).to_string();
    let body = serde_json::json!({
        "access_token": access,
        "refresh_token": refresh,
        "expires_at": expires_at,
        "scope": "accounts_read accounts_write",
    });
    std::fs::write(path, body.to_string())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

fn private_temp_dir() -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "cxgate-demo-{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir_all(&dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(dir)
}

/// Runs the demo until Ctrl-C or SIGTERM, which stops both.
///
/// The simulator is started with a fresh random token pair, the token file lives in a
/// private temporary directory that is removed on exit, and the OAuth client secret is the
/// simulator's own. The gateway runs from a config file written into that directory
/// (`cxgate.toml`, the embedded one with the simulator's address filled in), so
/// `POST /admin/reload` and SIGHUP re-read it as in production.
pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), StartError> {
    let dir = private_temp_dir()
        .map_err(|e| StartError::refused("cannot create a temporary directory", e))?;
    let result = run_in(&dir, listen, admin_listen).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &Path,
    listen: SocketAddr,
    admin_listen: SocketAddr,
) -> Result<(), StartError> {
    let access = random_token("demo-access");
    let refresh = random_token("demo-refresh");
    let opts = sim::SimOptions {
        token_ttl: DEMO_TOKEN_TTL,
        access_tokens: vec![access.clone()],
        refresh_tokens: vec![refresh.clone()],
        client_secret: random_token("demo-secret"),
        ..sim::SimOptions::default()
    };
    // The gateway reads the OAuth client secret from the environment, like in production.
    // Set before any other thread reads the environment.
    std::env::set_var(DEMO_SECRET_ENV, &opts.client_secret);
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(StartError::Listen)?;
    let sim = sim::spawn(sim_listener, opts)
        .await
        .map_err(StartError::Listen)?;
    let token_file = dir.join("token.json");
    write_token_file(&token_file, &access, &refresh, DEMO_TOKEN_TTL)
        .map_err(|e| StartError::refused("cannot write the demo token file", e))?;
    // Written to a file and loaded from it, so reload finds the file the demo runs from.
    let config_file = dir.join("cxgate.toml");
    let loaded =
        demo_config_text(&sim.base_url(), &token_file, listen, admin_listen).and_then(|text| {
            std::fs::write(&config_file, text)
                .map_err(|e| StartError::refused("cannot write the demo config file", e))?;
            Ok(config::load(&config_file)?)
        });
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            sim.shutdown().await;
            return Err(e);
        }
    };
    let running = match crate::start(
        cfg,
        Some(config_file.clone()),
        crate::Options::with_workers(),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            sim.shutdown().await;
            return Err(e);
        }
    };
    let gw = format!("http://{}", running.addr);
    let admin = format!("http://{}", running.admin_addr);
    println!("cxgate demo is running.");
    println!("  gateway:   {gw}   (client key: {DEMO_KEY})");
    println!("  admin:     {admin}   (status page at /; /metrics /healthz /readyz /admin/status)");
    println!(
        "  config:    {}   (edit, then: curl -X POST {admin}/admin/reload, or kill -HUP {})",
        config_file.display(),
        std::process::id()
    );
    println!(
        "  simulated CX Social API: {}   (/_sim/stats)",
        sim.base_url()
    );
    println!();
    println!("Try:");
    println!("  curl -i -H 'Authorization: Bearer {DEMO_KEY}' {gw}/me");
    println!("  curl -s -H 'Authorization: Bearer {DEMO_KEY}' '{gw}/12345/inbox/mentions?limit=2'");
    println!("  curl -s {admin}/admin/status");
    println!("  and open {admin}/ in a browser: the status page");
    println!();
    println!("Ctrl-C stops both.");
    crate::app::wait_for_signals(&running, Some(&config_file)).await;
    println!("stopping...");
    running.shutdown();
    running.stopped().await;
    sim.shutdown().await;
    Ok(())
}
