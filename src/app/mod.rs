//! The application: start-up wiring, `cxgate run`'s lifetime, reload and signals.
//!
//! [`start`] builds every part from a checked [`Config`] and the [`Secrets`] read for it,
//! binds both listeners and serves. Secrets are read here, at the edge, and passed down,
//! so the modules below never read the environment on their own account.

pub mod reload;
mod signals;

pub use signals::wait_for_signals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{self, Config};
use crate::proxy::{self, Gateway};
use crate::secrets::Secrets;
use crate::{access, admin, budget, cache, certs, metrics, replicas, server, token, upstream};

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
    /// `server.admin_token_env` names a variable that is not set (no error underneath).
    #[error("{0}")]
    AdminToken(String),
    /// Something the start needs could not be done; `source` says why.
    #[error("{what}: {source}")]
    Refused {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("budget.redis_url_env: {0}")]
    Replicas(#[from] replicas::SetupError),
}

impl StartError {
    /// `what` could not be done, because of `source`.
    pub fn refused(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StartError {
        StartError::Refused {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A setting is wrong (exit code 2, as for an invalid configuration), as opposed to a
    /// failure while starting (exit code 1).
    pub fn is_setting(&self) -> bool {
        match self {
            StartError::Config(_) => true,
            StartError::Replicas(e) => e.is_setting(),
            // A client's key where the CX Social token goes is a wrong value of a variable
            // the file names, as an unset one is: the token file that holds one is refused
            // by `check` and `run` with exit 2 too.
            StartError::Token(token::TokenError::ClientKey { .. }) => true,
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
            // Out of the registry first, so no other replica's write waits for this one.
            redis.leave().await;
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
        client_keys: client_keys(cfg),
    }
}

/// The SHA-256 digests of the configured clients' keys: what must never travel upstream.
pub(crate) fn client_keys(cfg: &Config) -> Vec<[u8; 32]> {
    cfg.clients.iter().map(|c| c.key_sha256).collect()
}

/// How [`start`] runs the gateway, beyond its configuration.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Serve client connections on per-core single-threaded runtimes of their own
    /// ([`server::Workers`]), as `cxgate run` does. Off, they are served on the caller's
    /// runtime: no extra threads, and a paused test clock governs them too.
    pub workers: bool,
    /// The values of the environment variables the config names; `None` reads them from
    /// the process's environment when [`start`] begins.
    pub secrets: Option<Secrets>,
}

impl Options {
    /// As `cxgate run` serves: on per-core connection runtimes, with the secrets read from
    /// the environment at start.
    pub fn with_workers() -> Options {
        Options {
            workers: true,
            secrets: None,
        }
    }
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
    let secrets = options.secrets.unwrap_or_else(|| Secrets::from_env(&cfg));
    let (listener, admin_listener) = bind_listeners(&cfg).await?;
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
            let url = secrets.get(url_env).map(|url| url.expose());
            let redis = replicas::Redis::connect_with(url_env, url, prefix, &options, &registry);
            Some(redis.await?)
        }
        _ => None,
    };
    let token = load_token(&cfg, http.clone(), &registry, &secrets).await?;
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
    budget.set_call_deadline(cfg.upstream.timeout);
    let access_log = access::AccessLog::open(
        &effective_access_log(&cfg.server.access_log),
        cfg.server.access_log_json,
        &registry,
    )
    .map_err(|e| StartError::refused("server.access_log: cannot open the access log", e))?;
    let parts = proxy::Parts {
        access_log,
        http: upstream::ThreadPools::new(connector),
        token,
        cache: cache::Store::new(cfg.cache.max_bytes, &registry)?,
        budget,
        metrics: metrics::RequestMetrics::register(&registry)?,
    };
    let recent = parts.metrics.recent.clone();
    let (certs, tls) = tls_acceptor(&cfg)?;
    let admin_token = reload::admin_token(&cfg, &secrets).map_err(StartError::AdminToken)?;
    let live = reload::Live::new(admin_token, certs);
    let grace = cfg.server.shutdown_grace;
    let config = Arc::new(cfg);
    let gateway = Gateway::new(config.clone(), parts);
    let sweeper = gateway.cache().spawn_sweeper();
    let shared_metrics = cache::SharedMetrics::register(&registry)?;
    if let Some(redis) = &redis {
        if config.cache.shared {
            let tier = cache::SharedTier::new(
                redis.clone(),
                config.cache.shared_max_entry_bytes,
                shared_metrics,
            );
            // Loaded before the first lookup: on a slow Redis a lookup that also had to
            // load its script (three round trips, not one) would run past its bound.
            tier.preload().await;
            gateway.cache().attach_shared(tier.clone());
            redis.remove_before_publishing(remove_shared(tier));
        }
        gateway.share_invalidations(redis.clone()).await;
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
            StartError::refused("cannot start connection threads", e)
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

/// What [`start`] refuses before it serves, tried without serving anything: both listeners
/// are bound (by [`server::bind`], as `start` binds them) and let go at once, the TLS pair and the admin token are taken, and the token
/// is loaded and held against the clients' keys, each by the function `start` itself calls.
/// `cxgate check` runs it after [`reload::preflight`], so it refuses what `run` refuses,
/// with the same error (and so the same message and exit code). Nothing is written, no
/// Redis is asked and no upstream is called.
///
/// A port another process holds now is a warning, not a refusal: it is the state of the
/// machine, not of the file, and the usual holder is the running gateway the file is
/// checked for (`cxgate check && kill -HUP`, as with `nginx -t`).
pub async fn probe(cfg: &Config, secrets: &Secrets) -> Result<Vec<String>, StartError> {
    use tracing::instrument::WithSubscriber;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut warnings = Vec::new();
    for (addr, key, flag) in [
        (cfg.server.listen, "server.listen", "--listen"),
        (
            cfg.server.admin_listen,
            "server.admin_listen",
            "--admin-listen",
        ),
    ] {
        match server::bind(addr).await {
            Ok(listener) => drop(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => warnings.push(format!(
                "{key}: {addr} is in use now, so `run` cannot start while it is (if a running \
                 cxgate holds it, apply this file with a reload instead)"
            )),
            Err(e) => return Err(listen_error(e, key, flag)),
        }
    }
    tls_acceptor(cfg)?;
    reload::admin_token(cfg, secrets).map_err(StartError::AdminToken)?;
    let http = upstream::build_client(
        cfg.upstream.ca_file.as_deref(),
        cfg.upstream.connect_timeout,
    )?;
    // The token's own log lines are `run`'s to say: `check` prints its warnings itself.
    let registry = metrics::new_registry();
    load_token(cfg, http, &registry, secrets)
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await?;
    Ok(warnings)
}

/// Binds the client listener (plain or TLS) and the admin listener, in that order; a
/// port taken, an address not on this host or a port needing privileges is refused with
/// the key that names it.
async fn bind_listeners(
    cfg: &Config,
) -> Result<(tokio::net::TcpListener, tokio::net::TcpListener), StartError> {
    let listener = server::bind(cfg.server.listen)
        .await
        .map_err(|e| listen_error(e, "server.listen", "--listen"))?;
    let admin_listener = server::bind(cfg.server.admin_listen)
        .await
        .map_err(|e| listen_error(e, "server.admin_listen", "--admin-listen"))?;
    Ok((listener, admin_listener))
}

/// The certificate pair of `[server.tls]` and the acceptor serving it, if TLS is on.
fn tls_acceptor(
    cfg: &Config,
) -> Result<(Option<Arc<certs::Certs>>, Option<tokio_rustls::TlsAcceptor>), StartError> {
    let certs = match &cfg.server.tls {
        Some(t) => Some(certs::Certs::load(&t.cert_file, &t.key_file)?),
        None => None,
    };
    let tls = certs.as_ref().map(certs::Certs::acceptor).transpose()?;
    Ok((certs, tls))
}

/// Loads the upstream token and refuses one that must never be sent: every refusal of
/// the token `run` makes before serving belongs here, since `check` runs this too. The
/// clients' keys are set before the token is shared, so no record holding one is adopted.
async fn load_token(
    cfg: &Config,
    http: upstream::HttpClient,
    registry: &prometheus::Registry,
    secrets: &Secrets,
) -> Result<token::TokenManager, StartError> {
    let lookup = |name: &str| secrets.lookup(name);
    let token = token::TokenManager::load(token_settings(cfg), http, registry, &lookup).await?;
    token.set_client_keys(Arc::new(crate::auth::Clients::from_config(cfg)))?;
    Ok(token)
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
    .map_err(|e| StartError::refused("cannot register cxgate_connections_open", e))?;
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
                replicas::Invalidation::All => {
                    // Its new global generation, learnt before anything else is read: an
                    // entry it retired stays retired here should Redis lose the counter.
                    if let Some(tier) = cache.shared() {
                        tier.learn_global().await;
                    }
                    cache.purge_all().await
                }
            };
            tracing::debug!(dropped, "invalidation from another replica applied");
        })
    })
}

/// How a purge or write invalidation made on this replica reaches the shared cache tier:
/// applied there before it is published to the others (queued with it while Redis is down).
fn remove_shared(tier: cache::SharedTier) -> replicas::Remove {
    Arc::new(move |what| {
        let tier = tier.clone();
        Box::pin(async move {
            let removed = tier.invalidate(&what).await?;
            tracing::debug!(removed, "invalidation applied to the shared cache tier");
            Ok(removed)
        })
    })
}

/// `cxgate run`: starts on per-core connection runtimes, then serves until SIGTERM or
/// SIGINT; SIGHUP reloads.
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    secrets: Secrets,
) -> Result<(), StartError> {
    let options = Options {
        secrets: Some(secrets),
        ..Options::with_workers()
    };
    let running = start(cfg, config_path.clone(), options).await?;
    wait_for_signals(&running, config_path.as_deref()).await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown();
    running.stopped().await;
    tracing::info!("stopped");
    Ok(())
}

/// `cxgate token init`: writes the token file from the environment as it is now, or by
/// exchanging an authorisation code at the configured OAuth endpoint.
pub async fn token_init(
    cfg: &Config,
    code: Option<&str>,
    redirect_uri: Option<&str>,
) -> Result<PathBuf, StartError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let settings = token_settings(cfg);
    let secrets = Secrets::from_env(cfg);
    let lookup = |name: &str| secrets.lookup(name);
    // A client's key pasted into the CX Social token is refused by `token` itself
    // (`settings.client_keys`), as it is from every other source.
    match code {
        None => Ok(token::init_from_lookup(&settings, &lookup).await?),
        Some(code) => {
            let http = upstream::build_client(
                cfg.upstream.ca_file.as_deref(),
                cfg.upstream.connect_timeout,
            )?;
            Ok(token::init_from_code(&settings, http, code, redirect_uri, &lookup).await?)
        }
    }
}
