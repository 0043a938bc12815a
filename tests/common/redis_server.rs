//! A `redis-server` child process of our own: a free loopback port, nothing saved to disk,
//! stopped by its process id (never the machine's own Redis). One file serves the unit
//! tests (`src/replicas.rs`), the integration tests (`tests/replicas.rs`) and the admission
//! bench, each including it by path.
#![allow(dead_code)]

use std::io;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it listens; an error when it cannot be started (the kind
    /// is `NotFound` when `redis-server` is not installed) or does not listen within 3 s.
    pub fn spawn() -> io::Result<RedisServer> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut server = RedisServer { port, child: None };
        server.child = Some(launch(port)?);
        server.wait_listening()?;
        Ok(server)
    }

    /// For tests: `None` after a loud message naming what did not run when `redis-server`
    /// is not installed, except under `CI=true`, where a missing server is a failure.
    pub fn start_or_skip(what: &str) -> Option<RedisServer> {
        match RedisServer::spawn() {
            Ok(server) => Some(server),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if std::env::var("CI").as_deref() == Ok("true") {
                    panic!("expected redis-server on PATH under CI=true, saw: {e}");
                }
                eprintln!(
                    "\n*** SKIPPED: redis-server is not on PATH ({e}); {what} did not run ***\n"
                );
                None
            }
            Err(e) => panic!("cannot start redis-server: {e}"),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills our child (by its process id); `restart` brings it back on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.child = Some(launch(self.port).expect("redis-server starts again"));
        self.wait_listening()
            .unwrap_or_else(|e| panic!("redis-server after a restart: {e}"));
    }

    fn wait_listening(&self) -> io::Result<()> {
        for _ in 0..150 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "redis-server did not listen on port {} within 3 s",
                self.port
            ),
        ))
    }
}

fn launch(port: u16) -> io::Result<Child> {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
