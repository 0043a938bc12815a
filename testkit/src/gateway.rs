//! The simulated CX Social API and a cxgate in front of it, both on 127.0.0.1:0, started
//! through the same library entry points the binary uses, and the client that talks to
//! them. Most suites start their gateways here, so a change to how the binary starts
//! reaches the tests at once.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use cxgate::sim::{SimHandle, SimOptions};
use cxgate::Running;

use crate::http::Answer;

pub const KEY: &str = "test-key";
pub const ACCESS: &str = "sim-access-SECRET-0001";
pub const REFRESH: &str = "sim-refresh-SECRET-0001";
pub const SECRET_ENV: &str = "CXGATE_TEST_CLIENT_SECRET";
pub const CLIENT_SECRET: &str = "sim-secret";

/// A running simulator + gateway pair.
pub struct Env {
    pub sim: SimHandle,
    pub gw: Running,
    pub dir: PathBuf,
    pub http: Client<HttpConnector, Full<Bytes>>,
}

/// The client-key lines for a config.
pub fn client_toml(name: &str, key: &str, extra: &str) -> String {
    format!(
        "[[clients]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n{extra}\n",
        cxgate::auth::sha256_hex(key.as_bytes())
    )
}

/// The default test routes (a subset of the production table).
pub const ROUTES: &str = r#"
[[routes]]
match = "GET /me"
ttl = "10m"
stale_while_revalidate = "1m"
stale_if_error = "1h"
tags = ["me"]

[[routes]]
match = "GET /me/accounts"
ttl = "10m"
tags = ["me", "accounts"]

[[routes]]
match = "GET /{account_id}/inbox/contact/{service}/{service_id}"
ttl = "5m"
stale_if_error = "30m"
tags = ["account:{account_id}", "contact:{account_id}/{service}/{service_id}"]

[[routes]]
match = "POST /{account_id}/inbox/contact/{service}/{service_id}"
invalidates = ["contact:{account_id}/{service}/{service_id}"]

[[routes]]
match = "GET /{account_id}/inbox/mentions"
ttl = "15s"
tags = ["mentions:{account_id}"]

[[routes]]
match = "POST /{account_id}/inbox/mention/{topic_id}/{id}"
invalidates = ["mention:{account_id}/{topic_id}/{id}", "mentions:{account_id}"]
"#;

/// A budget no test or benchmark traffic reaches, for runs that are not about the budget.
pub const BIG_BUDGET: &str = "[budget]\nlimit = 1000000\nperiod = \"1s\"\nburst = 100000\n";

/// Starts a simulator with `sim` options and a gateway whose config is the base config
/// (upstream, token file, listeners on port 0, the `test-key` client with read+write)
/// followed by `extra` TOML (more sections; use `[[routes]]` etc.). Pass `ROUTES` in
/// `extra` for the default route table.
pub async fn start(sim: SimOptions, extra: &str) -> Env {
    start_with(
        sim,
        &client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        extra,
    )
    .await
}

/// Like [`start`] but with the clients section given in full (empty for anonymous mode).
pub async fn start_with(sim_opts: SimOptions, clients: &str, extra: &str) -> Env {
    start_custom(sim_opts, "", None, clients, extra).await
}

impl Env {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gw.admin_addr)
    }

    /// Sends a request to the gateway (no key is added: pass headers).
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        self.send_bytes(method, url, headers, Bytes::from(body.to_string()))
            .await
    }

    /// [`Env::send`] with a body of any bytes (UTF-16 text, say).
    pub async fn send_bytes(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body)).expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(20), self.http.request(req))
            .await
            .expect("gateway answered within 20 s")
            .expect("gateway request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// GET through the gateway with the test key.
    pub async fn get(&self, path: &str) -> Answer {
        let auth = format!("Bearer {KEY}");
        self.send(
            Method::GET,
            &self.url(path),
            &[("authorization", &auth)],
            "",
        )
        .await
    }

    /// GET through the gateway with the given client key.
    pub async fn get_as(&self, key: &str, path: &str) -> Answer {
        let auth = format!("Bearer {key}");
        self.send(
            Method::GET,
            &self.url(path),
            &[("authorization", &auth)],
            "",
        )
        .await
    }

    /// POST a form body through the gateway with the test key.
    pub async fn post_form(&self, path: &str, body: &str) -> Answer {
        let auth = format!("Bearer {KEY}");
        self.send(
            Method::POST,
            &self.url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            body,
        )
        .await
    }

    /// Requests the simulator received for "METHOD /path".
    pub fn upstream_count(&self, route: &str) -> u64 {
        self.sim.stats()["by_route"][route].as_u64().unwrap_or(0)
    }

    pub fn upstream_total(&self) -> u64 {
        self.sim.stats()["requests_total"].as_u64().unwrap_or(0)
    }

    pub async fn metrics(&self) -> String {
        let a = self
            .send(Method::GET, &self.admin_url("/metrics"), &[], "")
            .await;
        String::from_utf8_lossy(&a.body).into_owned()
    }

    pub async fn stop(self) {
        self.gw.shutdown();
        self.gw.stopped().await;
        self.sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Like [`start_with`], with `server_extra` lines added inside `[server]` and, when
/// `upstream` is given, that base URL instead of the simulator's (the simulator still
/// serves the token endpoint).
pub async fn start_custom(
    sim_opts: SimOptions,
    server_extra: &str,
    upstream: Option<&str>,
    clients: &str,
    extra: &str,
) -> Env {
    start_env(sim_opts, server_extra, upstream, "1s", clients, extra).await
}

/// The one way the harness starts a simulator and a gateway in front of it.
async fn start_env(
    mut sim_opts: SimOptions,
    server_extra: &str,
    upstream: Option<&str>,
    refresh_before: &str,
    clients: &str,
    extra: &str,
) -> Env {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var(SECRET_ENV, CLIENT_SECRET);
    if sim_opts.access_tokens == SimOptions::default().access_tokens {
        sim_opts.access_tokens = vec![ACCESS.to_string()];
        sim_opts.refresh_tokens = vec![REFRESH.to_string()];
    }
    sim_opts.client_secret = CLIENT_SECRET.to_string();
    let ttl = sim_opts.token_ttl;
    let access = sim_opts.access_tokens[0].clone();
    let refresh = sim_opts.refresh_tokens.first().cloned().unwrap_or_default();
    let sim = spawn_sim(sim_opts).await;
    let dir = temp_dir("test");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, &access, &refresh, ttl).expect("token file");
    let base = sim.base_url();
    let upstream = upstream.map_or_else(|| base.clone(), str::to_string);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"2s\"\n{server_extra}\n\
         [upstream]\nbase_url = \"{upstream}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
         [token]\nfile = \"{}\"\nrefresh_before = \"{refresh_before}\"\n\
         [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{SECRET_ENV}\"\n\
         {clients}\n{extra}\n",
        token_file.display()
    );
    let cfg_path = dir.join("cxgate.toml");
    std::fs::write(&cfg_path, &text).expect("write config");
    let cfg = cxgate::config::load(&cfg_path)
        .unwrap_or_else(|e| panic!("test config invalid: {:?}\n{text}", e.lines()));
    let gw = cxgate::start(cfg, Some(cfg_path), cxgate::Options::default())
        .await
        .expect("start gateway");
    let http = Client::builder(TokioExecutor::new()).build_http();
    Env { sim, gw, dir, http }
}

/// A fresh directory under the system's temp dir, named for `tag` and this process, unique
/// to this call.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "cxgate-{tag}-{}-{:016x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The simulator on a free loopback port.
pub async fn spawn_sim(opts: SimOptions) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind simulator");
    cxgate::sim::spawn(listener, opts)
        .await
        .expect("start simulator")
}

/// What the real binary needs to run in front of a simulator: the simulator (one path of it
/// slow), a directory with a token file, the config text and its path, and the ports.
pub struct BinarySetup {
    pub sim: SimHandle,
    pub dir: PathBuf,
    pub config: String,
    pub config_path: PathBuf,
    pub port: u16,
    pub admin_port: u16,
}

/// Sets up (without starting it) a `cxgate run` whose upstream is a simulator that answers
/// `slow_path` after `latency_ms`, with one read-only client `test` keyed [`KEY`]. The
/// config is written to `config_path` and its text kept, for tests that rewrite it.
pub async fn binary_setup(tag: &str, slow_path: &str, latency_ms: u64) -> BinarySetup {
    let sim = spawn_sim(SimOptions {
        access_tokens: vec![ACCESS.into()],
        refresh_tokens: vec![REFRESH.into()],
        faults: cxgate::sim::Faults {
            latency_ms,
            path_prefix: Some(slow_path.into()),
            ..cxgate::sim::Faults::default()
        },
        ..SimOptions::default()
    })
    .await;
    let dir = temp_dir(tag);
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3600))
        .expect("token file");
    let (port, admin_port) = (free_port(), free_port());
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n\
         request_timeout = \"10s\"\nshutdown_grace = \"5s\"\n\
         [upstream]\nbase_url = \"{}\"\nconnect_timeout = \"1s\"\ntimeout = \"5s\"\n\
         [token]\nfile = \"{}\"\n{}",
        sim.base_url(),
        token_file.display(),
        client_toml("test", KEY, "scopes = [\"read\"]")
    );
    let config_path = dir.join("cxgate.toml");
    std::fs::write(&config_path, &config).expect("write config");
    BinarySetup {
        sim,
        dir,
        config,
        config_path,
        port,
        admin_port,
    }
}

/// A loopback port that was free a moment ago, for a child process that must be told its
/// address in advance.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Like [`start`] (the `test-key` client with read+write, `extra` appended), but with
/// `token.refresh_before` set to `refresh_before` instead of the harness's one second.
pub async fn start_refresh_before(sim_opts: SimOptions, refresh_before: &str, extra: &str) -> Env {
    let clients = client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    start_env(sim_opts, "", None, refresh_before, &clients, extra).await
}
