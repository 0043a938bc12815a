//! cxgate: a local caching gateway in front of the CX Social (Engagor) REST API.
//!
//! The binary in `src/main.rs` only parses the command line; everything it does is a
//! function of this library ([`start`], [`run`], [`demo::run`], [`sim::run_cli`]), so the
//! end-to-end tests drive exactly what users run.
//!
//! A request goes: [`server`] (listener, HTTP/1.1 or HTTP/2) → [`proxy`] (the pipeline:
//! target check, [`auth`], route from [`config`], [`cache`] and merging, [`budget`],
//! [`token`], [`upstream`], link rewriting) → back, with [`metrics`] recorded on the way;
//! [`admin`] serves the operator's endpoints. [`sim`] is the simulated CX Social API.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod certs;
pub mod config;
pub mod demo;
pub mod error;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod replicas;
pub mod server;
pub mod sim;
pub mod token;
pub mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use config::Config;
use proxy::Gateway;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Listen(#[source] std::io::Error),
    #[error("upstream client: {0}")]
    Client(#[from] upstream::ClientError),
    #[error("token: {0}")]
    Token(#[from] token::TokenError),
    #[error("TLS: {0}")]
    Tls(#[from] server::TlsError),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("{0}")]
    Refused(String),
    #[error("budget.redis_url_env: {0}")]
    Replicas(#[from] replicas::SetupError),
}

impl StartError {
    /// A setting is wrong (exit code 2, as for an invalid configuration), as opposed to a
    /// failure while starting (exit code 1).
    pub fn is_setting(&self) -> bool {
        match self {
            StartError::Config(_) => true,
            StartError::Replicas(e) => e.is_setting(),
            _ => false,
        }
    }
}

/// A running gateway: its bound addresses and the handle to stop it.
pub struct Running {
    /// The client listener's bound address.
    pub addr: SocketAddr,
    /// The admin listener's bound address.
    pub admin_addr: SocketAddr,
    pub gateway: Gateway,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    refresher: JoinHandle<()>,
    /// Removes cache entries past their life every few seconds.
    sweeper: JoinHandle<()>,
    /// The shared Redis, with several replicas; its background tasks stop with the gateway.
    replicas: Option<replicas::Redis>,
    /// What a reload applies outside the config snapshot (admin token, certificate).
    live: Arc<reload::Live>,
}

impl Running {
    /// Stops accepting and starts draining; [`Running::stopped`] waits for the end.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until both listeners have drained (bounded by `shutdown_grace`).
    pub async fn stopped(self) {
        for task in self.tasks {
            let _ = task.await;
        }
        self.refresher.abort();
        self.sweeper.abort();
        if let Some(redis) = &self.replicas {
            redis.stop();
        }
        // The lines of the last requests, before the process exits.
        self.gateway
            .access_log()
            .flush(std::time::Duration::from_secs(2));
    }
}

/// The token module's view of `[token]`.
pub fn token_settings(cfg: &Config) -> token::TokenSettings {
    token::TokenSettings {
        file: cfg.token.file.clone(),
        access_token_env: cfg.token.access_token_env.clone(),
        refresh_before: cfg.token.refresh_before,
        oauth: cfg.token.oauth.as_ref().map(|o| token::OAuthSettings {
            token_url: o.token_url.clone(),
            client_id: o.client_id.clone(),
            client_secret_env: o.client_secret_env.clone(),
            method: match o.method {
                config::OAuthMethod::Post => token::OAuthMethod::Post,
                config::OAuthMethod::Get => token::OAuthMethod::Get,
            },
        }),
    }
}

/// How [`start`] runs the gateway, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve client connections on per-core single-threaded runtimes of their own
    /// ([`server::Workers`]), as `cxgate run` does. Off, they are served on the caller's
    /// runtime: no extra threads, and a paused test clock governs them too.
    pub workers: bool,
}

/// Starts the gateway: binds both listeners (port 0 picks a free one), loads the token,
/// and serves until [`Running::shutdown`]. `config_path` is what reload re-reads.
pub async fn start(
    mut cfg: Config,
    config_path: Option<PathBuf>,
    options: Options,
) -> Result<Running, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let started = Instant::now();
    let listener = server::bind(cfg.server.listen)
        .await
        .map_err(|e| listen_error(e, "server.listen", "--listen"))?;
    let admin_listener = server::bind(cfg.server.admin_listen)
        .await
        .map_err(|e| listen_error(e, "server.admin_listen", "--admin-listen"))?;
    let addr = listener.local_addr().map_err(StartError::Listen)?;
    let admin_addr = admin_listener.local_addr().map_err(StartError::Listen)?;
    // With port 0 the default public base URL names a port nobody listens on: use the real one.
    if cfg.server.public_base_url == format!("http://{}", cfg.server.listen) {
        cfg.server.public_base_url = format!("http://{addr}");
    }
    cfg.server.listen = addr;
    cfg.server.admin_listen = admin_addr;

    let registry = metrics::new_registry();
    let connector = upstream::build_connector(
        cfg.upstream.ca_file.as_deref(),
        cfg.upstream.connect_timeout,
    )?;
    let http = upstream::client_with(connector.clone());
    // Several replicas share one budget, one token and their invalidations through Redis.
    let redis = match (cfg.budget.backend, &cfg.budget.redis_url_env) {
        (config::Backend::Redis, Some(url_env)) => {
            let options = replicas::Options {
                ca_file: cfg.budget.redis_ca_file.clone(),
                cluster: cfg.budget.redis_cluster,
            };
            let prefix = &cfg.budget.key_prefix;
            Some(replicas::Redis::connect_with(url_env, prefix, &options, &registry).await?)
        }
        _ => None,
    };
    let token = token::TokenManager::load(token_settings(&cfg), http.clone(), &registry).await?;
    if let Some(redis) = &redis {
        token.share_through(redis.clone()).await;
    }
    let refresher = token.spawn_refresher();
    let budget = match &redis {
        Some(redis) => budget::Budget::new_shared(
            proxy::budget_spec(&cfg),
            &registry,
            redis.clone(),
            cfg.budget.replicas,
        )?,
        None => budget::Budget::new(proxy::budget_spec(&cfg), &registry)?,
    };
    let access_log = access::AccessLog::open(
        &effective_access_log(&cfg.server.access_log),
        cfg.server.access_log_json,
        &registry,
    )
    .map_err(|e| {
        StartError::Refused(format!(
            "server.access_log: cannot open the access log: {e}"
        ))
    })?;
    let parts = proxy::Parts {
        access_log,
        http: upstream::ThreadPools::new(connector),
        token,
        cache: cache::Store::new(cfg.cache.max_bytes, &registry)?,
        budget,
        metrics: metrics::RequestMetrics::register(&registry)?,
    };
    let recent = parts.metrics.recent.clone();
    let certs = match &cfg.server.tls {
        Some(t) => Some(certs::Certs::load(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let tls = certs.as_ref().map(certs::Certs::acceptor).transpose()?;
    let admin_token = reload::admin_token(&cfg).map_err(StartError::Refused)?;
    let live = reload::Live::new(admin_token, certs);
    let grace = cfg.server.shutdown_grace;
    let config = Arc::new(cfg);
    let gateway = Gateway::new(config.clone(), parts);
    let sweeper = gateway.cache().spawn_sweeper();
    if let Some(redis) = &redis {
        gateway.share_invalidations(redis.clone());
        redis
            .spawn_subscriber(apply_invalidations(gateway.cache().clone()))
            .await;
    }
    let admin = Arc::new(admin::Admin {
        gateway: gateway.clone(),
        registry,
        config_path,
        live: live.clone(),
        started,
        rates: recent.into(),
    });

    let open = connections_gauge(&admin.registry)?;
    let (stop, stopped) = watch::channel(false);
    let g = gateway.clone();
    let workers = match options.workers {
        true => Some(Arc::new(server::Workers::per_core().map_err(|e| {
            StartError::Refused(format!("cannot start connection threads: {e}"))
        })?)),
        false => None,
    };
    let client_task = tokio::spawn(server::serve(
        listener,
        tls,
        move |req| {
            let g = g.clone();
            async move { g.handle(req).await }
        },
        stopped.clone(),
        grace,
        workers,
        server::Limits::client(&config.server).counted(open.with_label_values(&["client"])),
    ));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        None,
        move |req| admin.clone().handle(req),
        stopped,
        grace,
        None,
        server::Limits::admin(&config.server).counted(open.with_label_values(&["admin"])),
    ));
    tracing::info!(%addr, %admin_addr, upstream = %config.upstream.base_url, "cxgate serving");
    Ok(Running {
        addr,
        admin_addr,
        gateway,
        stop,
        tasks: vec![client_task, admin_task],
        refresher,
        sweeper,
        replicas: redis,
        live,
    })
}

/// On stderr the access lines keep to the log level like every other line (`info` shows
/// them, `--log-level warn` hides them); a file gets every line, as the operator asked.
fn effective_access_log(target: &access::Target) -> access::Target {
    match target {
        access::Target::Stderr if !tracing::enabled!(target: "cxgate::access", tracing::Level::INFO) => {
            access::Target::Off
        }
        other => other.clone(),
    }
}

/// `cxgate_connections_open{listener}`: connections open now on each listener, both
/// present from the first scrape.
fn connections_gauge(
    registry: &prometheus::Registry,
) -> Result<prometheus::IntGaugeVec, StartError> {
    let gauge = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "cxgate_connections_open",
            "Connections open now, by listener (client, admin).",
        ),
        &["listener"],
    )
    .and_then(|g| {
        registry.register(Box::new(g.clone()))?;
        Ok(g)
    })
    .map_err(|e| StartError::Refused(format!("cannot register cxgate_connections_open: {e}")))?;
    for listener in ["client", "admin"] {
        gauge.with_label_values(&[listener]).set(0);
    }
    Ok(gauge)
}

/// A listener that cannot bind, with what to change: the config key (`cxgate run`) or the
/// flag (`cxgate demo`) that names the address.
fn listen_error(e: std::io::Error, key: &str, flag: &str) -> StartError {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            "; another process holds that port: stop it, or pick another address with \
             {key} in the config (or `cxgate demo {flag} ADDR`)"
        ),
        std::io::ErrorKind::PermissionDenied => {
            "; ports below 1024 need privileges: pick a port above 1024".to_string()
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("; that address is not on this host: check {key}")
        }
        _ => String::new(),
    };
    StartError::Listen(std::io::Error::new(e.kind(), format!("{e}{hint}")))
}

/// How an invalidation published by another replica is applied to this one's cache.
fn apply_invalidations(cache: cache::Store) -> replicas::Apply {
    Arc::new(move |what| {
        let cache = cache.clone();
        Box::pin(async move {
            let dropped = match what {
                replicas::Invalidation::Tags(tags) => cache.invalidate_tags(&tags).await,
                replicas::Invalidation::Path(path) => cache.purge_path(&path).await,
                replicas::Invalidation::All => cache.purge_all().await,
            };
            tracing::debug!(dropped, "invalidation from another replica applied");
        })
    })
}

/// `cxgate run`: starts, then serves until SIGTERM or SIGINT; SIGHUP reloads.
pub async fn run(cfg: Config, config_path: Option<PathBuf>) -> Result<(), StartError> {
    let running = start(cfg, config_path.clone(), Options { workers: true }).await?;
    wait_for_signals(&running, config_path.as_deref()).await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown();
    running.stopped().await;
    tracing::info!("stopped");
    Ok(())
}

/// Returns on SIGTERM or SIGINT; reloads on SIGHUP; reopens the access log on SIGUSR1.
pub async fn wait_for_signals(running: &Running, config_path: Option<&Path>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
                // logrotate renamed the file: write on to a new one by the configured name.
                _ = usr1.recv() => running.gateway.access_log().reopen(),
                _ = hup.recv() => match reload::reload(&running.gateway, &running.live, config_path).await {
                    Ok(notes) => tracing::info!(?notes, "SIGHUP: reloaded"),
                    Err(problems) => tracing::error!(?problems, "SIGHUP: config invalid; the running configuration stays"),
                },
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (running, config_path);
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `cxgate token init`: writes the token file from the environment, or by exchanging an
/// authorisation code at the configured OAuth endpoint.
pub async fn token_init(
    cfg: &Config,
    code: Option<&str>,
    redirect_uri: Option<&str>,
) -> Result<PathBuf, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = token_settings(cfg);
    match code {
        None => Ok(token::init_from_env(&settings).await?),
        Some(code) => {
            let http = upstream::build_client(
                cfg.upstream.ca_file.as_deref(),
                cfg.upstream.connect_timeout,
            )?;
            Ok(token::init_from_code(&settings, http, code, redirect_uri).await?)
        }
    }
}
