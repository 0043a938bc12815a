//! A `redis-server` child process of our own: a free loopback port, nothing saved to disk,
//! stopped by its process id (never the machine's own Redis). It serves the unit tests of
//! the Redis budget, the integration suites and the admission bench alike.
//!
//! Besides a plain server it starts Redis as operators run it ([`Kind`]): TLS with a test
//! CA made here by the `openssl` CLI and an ACL user (the default user disabled), an ACL
//! user over plain TCP, and a three-node Redis Cluster made by `redis-cli --cluster create`.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The variable that lets the Redis tests skip when `redis-server` is missing: `1` skips,
/// except under `CI=true`.
pub const SKIP_ENV: &str = "CXGATE_SKIP_REDIS";

/// Whether a missing `redis-server` may skip a test instead of failing it.
fn may_skip() -> bool {
    std::env::var(SKIP_ENV).as_deref() == Ok("1") && std::env::var("CI").as_deref() != Ok("true")
}

/// How the test Redis is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One server, no TLS, no password.
    Plain,
    /// One server on TLS only (a test CA), with an ACL user and the default user off.
    Tls,
    /// One server with an ACL user and the default user off, no TLS.
    Acl,
    /// Three primaries in one Redis Cluster, no TLS, no password.
    Cluster,
    /// [`Kind::Cluster`] reached as the ACL user, with exactly the README's rights (the
    /// `default` user stays on for `redis-cli --cluster create`; the replicas never use it).
    ClusterAcl,
}

impl Kind {
    /// Several nodes in one Redis Cluster.
    pub fn is_cluster(self) -> bool {
        matches!(self, Kind::Cluster | Kind::ClusterAcl)
    }
}

/// The ACL user of [`Kind::Tls`] and [`Kind::Acl`].
pub const ACL_USER: &str = "cxgate-app";
/// What that user may run: what a replica sends, and no more.
const ACL_COMMANDS: &[&str] = &[
    "+ping",
    "+get",
    "+strlen",
    "+set",
    "+del",
    "+exists",
    "+pexpire",
    "+pttl",
    "+incrby",
    "+decrby",
    "+time",
    "+evalsha",
    "+script|load",
    "+publish",
    "+subscribe",
    "+cluster|slots",
    "+asking",
];

struct Node {
    port: u16,
    bus: u16,
    child: Option<Child>,
}

pub struct RedisServer {
    /// The (first) node's port.
    pub port: u16,
    kind: Kind,
    nodes: Vec<Node>,
    /// Node directories (cluster `nodes.conf`), TLS material; removed on drop.
    dir: PathBuf,
    password: String,
}

impl RedisServer {
    /// Starts a plain one and waits until it listens; an error when it cannot be started
    /// (the kind is `NotFound` when `redis-server` is not installed) or does not listen
    /// within [`LISTEN_WITHIN`].
    pub fn spawn() -> io::Result<RedisServer> {
        RedisServer::spawn_kind(Kind::Plain)
    }

    /// Starts one of `kind` and waits until it serves.
    pub fn spawn_kind(kind: Kind) -> io::Result<RedisServer> {
        let count = if kind.is_cluster() { 3 } else { 1 };
        let mut nodes = Vec::new();
        for _ in 0..count {
            nodes.push(Node {
                port: free_port()?,
                bus: free_port()?,
                child: None,
            });
        }
        let dir = std::env::temp_dir().join(format!(
            "cxgate-redis-{}-{}-{:08x}",
            std::process::id(),
            nodes[0].port,
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir)?;
        let mut server = RedisServer {
            port: nodes[0].port,
            kind,
            nodes,
            dir,
            password: format!("pw-{:016x}", fastrand::u64(..)),
        };
        if kind == Kind::Tls {
            make_certificates(&server.dir)?;
        }
        for i in 0..server.nodes.len() {
            server.launch(i)?;
        }
        for node in &server.nodes {
            wait_listening(node.port)?;
        }
        if kind.is_cluster() {
            server.create_cluster()?;
        }
        Ok(server)
    }

    /// For tests: the server, or `None` after a loud message naming what did not run when
    /// `redis-server` (or `openssl`) is not installed and [`SKIP_ENV`] is `1`. Without that
    /// variable, and always under `CI=true`, a missing server fails the test.
    pub fn start_or_skip(what: &str) -> Option<RedisServer> {
        RedisServer::start_kind_or_skip(Kind::Plain, what)
    }

    /// [`RedisServer::start_or_skip`] for a server of `kind`.
    pub fn start_kind_or_skip(kind: Kind, what: &str) -> Option<RedisServer> {
        match RedisServer::spawn_kind(kind) {
            Ok(server) => Some(server),
            Err(e) if e.kind() == io::ErrorKind::NotFound && may_skip() => {
                eprintln!(
                    "\n*** SKIPPED: redis-server or openssl is not on PATH ({e}); {what} did not run ({SKIP_ENV}=1) ***\n"
                );
                None
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => panic!(
                "expected redis-server and openssl on PATH for {what}, saw: {e} \
                 (set {SKIP_ENV}=1 to skip the Redis tests; never honoured under CI=true)"
            ),
            Err(e) => panic!("cannot start redis-server ({kind:?}): {e}"),
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The URL the gateway is given: `rediss://` for TLS, the ACL user and password in it,
    /// and every node's URL, comma-separated, for the cluster.
    pub fn url(&self) -> String {
        let (scheme, user) = match self.kind {
            Kind::Plain | Kind::Cluster => ("redis", String::new()),
            Kind::Tls => ("rediss", format!("{ACL_USER}:{}@", self.password)),
            Kind::Acl | Kind::ClusterAcl => ("redis", format!("{ACL_USER}:{}@", self.password)),
        };
        self.nodes
            .iter()
            .map(|n| format!("{scheme}://{user}127.0.0.1:{}/", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every node's port.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// A node's `ACL LOG` (commands, keys and channels it refused), read as the `default`
    /// user ([`Kind::Plain`], [`Kind::Cluster`], [`Kind::ClusterAcl`]).
    pub fn acl_log(&self, port: u16) -> String {
        cli(port, &["ACL", "LOG"]).unwrap_or_else(|e| format!("(redis-cli failed: {e})"))
    }

    /// The ACL user's password ([`Kind::Tls`], [`Kind::Acl`]).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The test CA that signed the server's certificate ([`Kind::Tls`]).
    pub fn ca_file(&self) -> Option<PathBuf> {
        (self.kind == Kind::Tls).then(|| self.dir.join("ca.pem"))
    }

    /// Kills our child (by its process id); `restart` brings it back on the same port. On
    /// a cluster every node is killed.
    pub fn stop(&mut self) {
        for node in &mut self.nodes {
            kill(node);
        }
    }

    /// Kills the one node that holds `key`'s slot (the server itself unless a cluster);
    /// returns its port.
    pub fn stop_owner_of(&mut self, key: &str) -> u16 {
        let i = if self.kind.is_cluster() {
            self.owner_of(key)
                .unwrap_or_else(|e| panic!("expected to find the node of {key:?}: {e}"))
                .0
        } else {
            0
        };
        kill(&mut self.nodes[i]);
        self.nodes[i].port
    }

    /// Starts again every node that was stopped, on the same ports, and waits until it
    /// serves (a cluster node rejoins from its `nodes.conf`).
    pub fn restart(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_none() {
                self.launch(i).expect("redis-server starts again");
                wait_listening(self.nodes[i].port)
                    .unwrap_or_else(|e| panic!("redis-server after a restart: {e}"));
            }
        }
        if self.kind.is_cluster() {
            self.wait_cluster_ok()
                .unwrap_or_else(|e| panic!("redis cluster after a restart: {e}"));
        }
    }

    fn launch(&mut self, i: usize) -> io::Result<()> {
        let node = &self.nodes[i];
        let mut cmd = Command::new("redis-server");
        let port = node.port.to_string();
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        match self.kind {
            Kind::Tls => {
                let d = &self.dir;
                cmd.args(["--port", "0", "--tls-port", &port]);
                cmd.arg("--tls-cert-file").arg(d.join("server.pem"));
                cmd.arg("--tls-key-file").arg(d.join("server.key"));
                cmd.arg("--tls-ca-cert-file").arg(d.join("ca.pem"));
                cmd.args(["--tls-auth-clients", "no"]);
            }
            _ => {
                cmd.args(["--port", &port]);
            }
        }
        if matches!(self.kind, Kind::Tls | Kind::Acl | Kind::ClusterAcl) {
            let pass = format!(">{}", self.password);
            // Exactly the rights the README lists for a deployment's user (any prefix).
            cmd.args(["--user", ACL_USER, "on", &pass, "~{*}:*", "&{*}:*"]);
            cmd.args(ACL_COMMANDS);
        }
        if matches!(self.kind, Kind::Tls | Kind::Acl) {
            cmd.args(["--user", "default", "off"]);
        }
        if self.kind.is_cluster() {
            let dir = self.dir.join(format!("node-{i}"));
            std::fs::create_dir_all(&dir)?;
            cmd.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ]);
            cmd.args(["--cluster-node-timeout", "1000"]);
            cmd.args(["--cluster-port", &node.bus.to_string()]);
            cmd.arg("--dir").arg(&dir);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        self.nodes[i].child = Some(child);
        Ok(())
    }

    fn create_cluster(&self) -> io::Result<()> {
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for node in &self.nodes {
            cmd.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = cmd.arg("--cluster-yes").stdin(Stdio::null()).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster create failed: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        self.wait_cluster_ok()
    }

    /// Waits (up to 30 s: see [`LISTEN_WITHIN`]) until every running node reports
    /// `cluster_state:ok`.
    fn wait_cluster_ok(&self) -> io::Result<()> {
        let deadline = std::time::Instant::now() + LISTEN_WITHIN;
        while std::time::Instant::now() < deadline {
            let all_ok = self.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                cli(n.port, &["CLUSTER", "INFO"]).is_ok_and(|t| t.contains("cluster_state:ok"))
            });
            if all_ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("redis cluster did not report cluster_state:ok within {LISTEN_WITHIN:?}"),
        ))
    }

    /// Adds a fourth node as the replica of the primary serving `key`'s slot and waits
    /// until it is in sync, so killing that primary is a failover (the replica promoted
    /// after the 1 s node timeout), not an outage until a restart.
    pub fn add_replica_for(&mut self, key: &str) -> io::Result<()> {
        let (owner, id) = self.owner_of(key)?;
        self.nodes.push(Node {
            port: free_port()?,
            bus: free_port()?,
            child: None,
        });
        let i = self.nodes.len() - 1;
        self.launch(i)?;
        wait_listening(self.nodes[i].port)?;
        let out = Command::new("redis-cli")
            .args(["--cluster", "add-node"])
            .arg(format!("127.0.0.1:{}", self.nodes[i].port))
            .arg(format!("127.0.0.1:{}", self.nodes[owner].port))
            .args(["--cluster-slave", "--cluster-master-id", &id])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "redis-cli --cluster add-node failed: {}",
                String::from_utf8_lossy(&out.stdout)
            )));
        }
        let port = self.nodes[i].port;
        for _ in 0..150 {
            let info = cli(port, &["INFO", "replication"]).unwrap_or_default();
            if info.contains("master_link_status:up") {
                return self.wait_cluster_ok();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the added replica did not sync with its primary within 15 s",
        ))
    }

    /// The index and node id of the primary serving `key`'s slot, from `CLUSTER NODES`.
    fn owner_of(&self, key: &str) -> io::Result<(usize, String)> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .ok_or_else(|| io::Error::other("no node running"))?;
        let slot: u16 = cli(live.port, &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .map_err(|e| io::Error::other(format!("CLUSTER KEYSLOT: {e}")))?;
        let nodes = cli(live.port, &["CLUSTER", "NODES"])?;
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if !serves {
                continue;
            }
            let port = fields[1]
                .split(['@', ','])
                .next()
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.parse::<u16>().ok());
            if let Some(i) = self.nodes.iter().position(|n| Some(n.port) == port) {
                return Ok((i, fields[0].to_string()));
            }
        }
        Err(io::Error::other(format!("no primary serves slot {slot}")))
    }
}

fn kill(node: &mut Node) {
    if let Some(mut child) = node.child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// How long a started `redis-server` may take to listen: it listens within milliseconds on
/// an idle machine, but a loaded one (other builds on the same cores) has been seen to take
/// more than 3 s to schedule it, which failed tests that had nothing to do with Redis's speed.
const LISTEN_WITHIN: Duration = Duration::from_secs(30);

fn wait_listening(port: u16) -> io::Result<()> {
    let deadline = std::time::Instant::now() + LISTEN_WITHIN;
    while std::time::Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("redis-server did not listen on port {port} within {LISTEN_WITHIN:?}"),
    ))
}

/// One `redis-cli` command against a plain (cluster) node.
fn cli(port: u16, args: &[&str]) -> io::Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A test CA and a server certificate for 127.0.0.1 / localhost signed by it, made by the
/// `openssl` CLI in `dir` (`ca.pem`, `server.pem`, `server.key`).
fn make_certificates(dir: &Path) -> io::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )?;
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec[..],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat()
        .into_iter()
        .chain(["-days", "2", "-subj", "/CN=cxgate test CA"])
        .collect(),
        [
            &["req"][..],
            &ec[..],
            &["-keyout", "server.key", "-out", "server.csr"],
        ]
        .concat()
        .into_iter()
        .chain(["-subj", "/CN=localhost"])
        .collect(),
        vec![
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "openssl {}: {}",
                args[0],
                String::from_utf8_lossy(&out.stderr)
            )));
        }
    }
    Ok(())
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
