//! Gateway replicas in this process in front of one simulator, sharing one `redis-server`
//! (budget, token, and the cache tier when asked for), for the suites that test the replicas
//! together (`replicas`, `token_repair`). The Redis is the test's own, on a free loopback
//! port, stopped by its process id with the [`Replicas`]; `None` when `redis-server` is not
//! on PATH (outside CI).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use cxgate::sim::{SimHandle, SimOptions};
use cxgate::Running;
use cxgate_testkit::gateway::{
    client_toml, spawn_sim, temp_dir, ACCESS, CLIENT_SECRET, KEY, REFRESH, ROUTES, SECRET_ENV,
};
use cxgate_testkit::redis::{Kind, RedisServer};

/// What [`start_replicas`] starts; [`Setup::new`] gives the defaults the suites share.
pub struct Setup<'a> {
    pub kind: Kind,
    pub n: usize,
    /// The simulator's options; it accepts [`ACCESS`] and [`REFRESH`] (and
    /// [`Setup::also_accepted`]) from the shared client secret, whatever these say.
    pub sim: SimOptions,
    /// Tokens the simulator accepts beside [`ACCESS`] and [`REFRESH`]: (access, refresh).
    pub also_accepted: Vec<(&'a str, &'a str)>,
    /// The `[budget]` lines other than the backend ones.
    pub budget: &'a str,
    /// With a TLS Redis: whether `budget.redis_ca_file` names the test CA (false: a
    /// certificate the replicas cannot verify).
    pub trust_ca: bool,
    /// The `[cache]` lines.
    pub cache: &'a str,
    pub routes: &'a str,
    /// `[[clients]]` sections beside the test client ([`KEY`], read and write).
    pub more_clients: &'a str,
    /// Per-core connection runtimes, as `cxgate run` serves (see [`cxgate::Options`]).
    pub workers: bool,
    /// What the deployment's key prefix starts with (a random suffix follows).
    pub prefix: &'a str,
    /// What the replicas' directories are named after (`{dir}-{i}`).
    pub dir: &'a str,
    /// The replica (if any) that reaches a plain Redis through a [`SlowLink`] of its own,
    /// which the test can make late while the others reach Redis directly.
    pub slow: Option<usize>,
}

impl<'a> Setup<'a> {
    /// `n` replicas on a plain Redis, the shipped routes, a budget that never refuses, no
    /// shared cache tier, per-core runtimes.
    pub fn new(n: usize) -> Setup<'a> {
        Setup {
            kind: Kind::Plain,
            n,
            sim: SimOptions::default(),
            also_accepted: Vec::new(),
            budget: "limit = 100000\nperiod = \"1s\"\nburst = 10000",
            trust_ca: true,
            cache: "",
            routes: ROUTES,
            more_clients: "",
            workers: true,
            prefix: "cxt",
            dir: "replica",
            slow: None,
        }
    }
}

/// A simulator, a Redis and the replicas in front of both.
pub struct Replicas {
    pub sim: SimHandle,
    pub redis: RedisServer,
    pub replicas: Vec<Running>,
    /// Each replica's directory: its `cxgate.toml` and `token.json`.
    pub dirs: Vec<PathBuf>,
    /// The deployment's key prefix (`budget.key_prefix`).
    pub prefix: String,
    pub http: Client<HttpConnector, Full<Bytes>>,
    /// The link of [`Setup::slow`]'s replica.
    pub slow_link: Option<SlowLink>,
    workers: bool,
}

/// Starts what `setup` describes; `None` (the test skips) without `redis-server`.
pub async fn start_replicas(setup: Setup<'_>) -> Option<Replicas> {
    let Setup {
        kind,
        n,
        mut sim,
        also_accepted,
        budget,
        trust_ca,
        cache,
        routes,
        more_clients,
        workers,
        prefix,
        dir,
        slow,
    } = setup;
    let redis = RedisServer::start_kind_or_skip(kind, "the replica tests")?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    sim.access_tokens = vec![ACCESS.to_string()];
    sim.refresh_tokens = vec![REFRESH.to_string()];
    for (access, refresh) in also_accepted {
        sim.access_tokens.push(access.to_string());
        sim.refresh_tokens.push(refresh.to_string());
    }
    sim.client_secret = CLIENT_SECRET.to_string();
    let ttl = sim.token_ttl;
    let sim = spawn_sim(sim).await;
    let base = sim.base_url();
    let prefix = format!("{prefix}{:08x}", fastrand::u32(..));
    let clients = client_toml("test", KEY, "scopes = [\"read\", \"write\"]") + more_clients;
    let mut redis_options = format!("redis_cluster = {}\n", kind.is_cluster());
    if let Some(ca) = redis.ca_file().filter(|_| trust_ca) {
        redis_options.push_str(&format!("redis_ca_file = \"{}\"\n", ca.display()));
    }
    let slow_link = slow.map(|_| {
        assert_eq!(kind, Kind::Plain, "a slow link is a plain TCP relay");
        SlowLink::start(redis.ports()[0])
    });
    let mut replicas = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..n {
        let url_env = match &slow_link {
            Some(link) if slow == Some(i) => {
                let env = format!("CXGATE_TEST_REDIS_URL_{}", link.port);
                std::env::set_var(&env, format!("redis://127.0.0.1:{}/", link.port));
                env
            }
            _ => url_env.clone(),
        };
        let dir = temp_dir(&format!("{dir}-{i}"));
        // Every replica starts from a copy of the same token file, as an operator would.
        let token_file = dir.join("token.json");
        cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, ttl).expect("token file");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"1s\"\n\
             [upstream]\nbase_url = \"{base}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
             [token]\nfile = \"{}\"\nrefresh_before = \"1s\"\n\
             [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
             [cache]\n{cache}\n\
             [budget]\n{budget}\nbackend = \"redis\"\nredis_url_env = \"{url_env}\"\nkey_prefix = \"{prefix}\"\nreplicas = {n}\n{redis_options}\
             {clients}\n{routes}\n",
            token_file.display()
        );
        let path = dir.join("cxgate.toml");
        std::fs::write(&path, &text).expect("write config");
        let cfg = cxgate::config::load(&path)
            .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}\n{text}", e.lines()));
        replicas.push(
            cxgate::start(cfg, Some(path), options(workers))
                .await
                .expect("replica starts"),
        );
        dirs.push(dir);
    }
    Some(Replicas {
        sim,
        redis,
        replicas,
        dirs,
        prefix,
        http: Client::builder(TokioExecutor::new()).build_http(),
        slow_link,
        workers,
    })
}

fn options(workers: bool) -> cxgate::Options {
    cxgate::Options {
        workers,
        ..cxgate::Options::default()
    }
}

impl Replicas {
    /// A key of the test deployment, as the replicas name it (one cluster hash slot).
    pub fn key(&self, suffix: &str) -> String {
        format!("{{{}}}:{suffix}", self.prefix)
    }

    /// A direct connection to the test Redis (TLS, ACL user or cluster as the replicas use
    /// it), to look at what the replicas stored or to plant what they should find.
    pub async fn conn(&self) -> cxgate::replicas::Conn {
        redis_options(&self.redis)
            .open(&self.redis.url())
            .await
            .expect("connect to the test redis-server")
    }

    /// Stops replica `i` (drained, as on SIGTERM) and starts it again on the same files:
    /// its memory cache starts empty.
    pub async fn restart_replica(&mut self, i: usize) {
        let old = self.replicas.remove(i);
        old.shutdown();
        old.stopped().await;
        let path = self.dirs[i].join("cxgate.toml");
        let cfg = cxgate::config::load(&path).expect("the replica's config still loads");
        let again = cxgate::start(cfg, Some(path), options(self.workers))
            .await
            .expect("replica starts again");
        self.replicas.insert(i, again);
    }

    /// Stops every replica, the simulator and the Redis; removes the directories.
    pub async fn stop(self) {
        for r in &self.replicas {
            r.shutdown();
        }
        for r in self.replicas {
            r.stopped().await;
        }
        self.sim.shutdown().await;
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        drop(self.redis);
    }
}

/// How the replicas reach `redis` (its CA, cluster mode), for a connection of the test's own.
pub fn redis_options(redis: &RedisServer) -> cxgate::replicas::Options {
    cxgate::replicas::Options {
        ca_file: redis.ca_file(),
        cluster: redis.kind().is_cluster(),
    }
}

/// A TCP relay to a local Redis that holds back what the client sends by a delay the test
/// sets (and changes) at any moment, in order: a Redis that answers late on this one
/// replica's connections only, as on a loaded host or a slow network path, while it answers
/// the others at once. It can also cut the replica off (every connection closed, new ones
/// closed as they come) and silence the connections open now for good (they stay open
/// and carry nothing either way, as behind a relay that stopped forwarding), while the
/// other replicas reach Redis as before.
pub struct SlowLink {
    pub port: u16,
    delay_ms: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
    state: tokio::sync::watch::Sender<LinkState>,
    accepted: Arc<AtomicU64>,
}

/// What the test asked of the relay's connections.
#[derive(Debug, Clone, Copy, Default)]
struct LinkState {
    /// Every connection closed, new ones closed at once.
    cut: bool,
    /// Connections numbered below this carry nothing more, and stay open.
    silent_below: u64,
}

impl SlowLink {
    /// Listens on a free loopback port and relays each connection to `to`.
    pub fn start(to: u16) -> SlowLink {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a relay port");
        listener.set_nonblocking(true).expect("non-blocking relay");
        let port = listener.local_addr().expect("relay address").port();
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (state, watch) = tokio::sync::watch::channel(LinkState::default());
        let (delay, count, serials) = (delay_ms.clone(), held.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if watch.borrow().cut {
                    continue;
                }
                let serial = serials.fetch_add(1, Ordering::AcqRel);
                let (delay, count, mut watch) = (delay.clone(), count.clone(), watch.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await else {
                        return;
                    };
                    let relayed = relay(client, server, delay, count);
                    tokio::pin!(relayed);
                    // Relays until cut, or silenced: then holds both ends open, unread,
                    // until cut (or the test ends).
                    let silenced = tokio::select! {
                        () = &mut relayed => return,
                        silenced = until(&mut watch, |s| s.cut || serial < s.silent_below) => {
                            silenced
                        }
                    };
                    if silenced.is_some_and(|s| !s.cut) {
                        until(&mut watch, |s| s.cut).await;
                    }
                });
            }
        });
        SlowLink {
            port,
            delay_ms,
            held,
            state,
            accepted,
        }
    }

    /// Holds back from now on each chunk the client sends by `by` (zero: none).
    pub fn set_delay(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::Release);
    }

    /// How many chunks have been held back so far.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    /// Cuts the replica off (`true`: its connections closed, new ones closed at once) or
    /// lets it reach Redis again (`false`).
    pub fn set_cut(&self, cut: bool) {
        self.state.send_modify(|s| s.cut = cut);
    }

    /// Every connection open now carries nothing more, either way, and stays open (a relay
    /// that stopped forwarding); connections made from now on are relayed as before.
    pub fn silence_open_connections(&self) {
        let below = self.accepted.load(Ordering::Acquire);
        self.state.send_modify(|s| s.silent_below = below);
    }

    /// How many connections the relay has taken so far (the replica's redials among them).
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::Acquire)
    }
}

/// Waits until the relay's state meets `done` (`Some` of it), or the link is gone (`None`).
async fn until(
    watch: &mut tokio::sync::watch::Receiver<LinkState>,
    done: impl Fn(&LinkState) -> bool,
) -> Option<LinkState> {
    watch.wait_for(|s| done(s)).await.ok().map(|s| *s)
}

/// Relays one connection: the server's bytes at once, the client's each held until its
/// arrival plus the delay in force then (later chunks never overtake earlier ones).
async fn relay(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    delay: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let ms = delay.load(Ordering::Acquire);
                    if ms > 0 {
                        held.fetch_add(1, Ordering::AcqRel);
                    }
                    let due = tokio::time::Instant::now() + Duration::from_millis(ms);
                    if tx.send((due, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if server_write.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let back = async move {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(
        async {
            tokio::join!(reader, writer);
        },
        back
    );
}
