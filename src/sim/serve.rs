//! Accepting connections (HTTP/1.1 with keep-alive, and h2c) and stopping cleanly; the
//! handle that tests and the demo hold on a running simulator. No connection outlives the
//! simulator, so a failed test leaks nothing ([`SimHandle`]).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use super::faults::Faults;
use super::{router, Sim, SimArgs, SimOptions};

/// A running simulator.
///
/// Invariants: one task per connection, all owned by the accept loop's `JoinSet`, so none
/// outlives [`SimHandle::shutdown`]; shutdown stops accepting, asks every connection to
/// finish (idle keep-alive ones close at once), waits at most `shutdown_grace`, then aborts
/// the rest. Dropping the handle stops the simulator as well.
pub struct SimHandle {
    pub addr: SocketAddr,
    sim: Arc<Sim>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The same JSON as `GET /_sim/stats`.
    pub fn stats(&self) -> serde_json::Value {
        self.sim.stats.snapshot()
    }

    /// Every distinct access token the simulator was sent, raw: for in-process harnesses
    /// that look for leaks (`/_sim/stats` shows only hashes).
    pub fn raw_tokens(&self) -> Vec<String> {
        self.sim.stats.raw_tokens()
    }

    /// Zeroes the counters, like `POST /_sim/stats/reset`.
    pub fn reset_stats(&self) {
        self.sim.stats.reset();
    }

    /// Replaces the fault set, like `POST /_sim/faults`; out-of-range values are clamped.
    pub fn set_faults(&self, faults: Faults) {
        self.sim.faults.set(faults);
    }

    /// The fault set in force, with forced counts as they stand now.
    pub fn faults(&self) -> Faults {
        self.sim.faults.current()
    }

    /// Revokes every access token, like `POST /_sim/revoke`; answers how many.
    pub fn revoke_all(&self) -> usize {
        self.sim.tokens.revoke_all()
    }

    /// Makes one more authorisation code usable (once) at the token endpoint.
    pub fn add_auth_code(&self, code: &str) {
        self.sim.tokens.add_code(code);
    }

    /// Stops accepting, ends the connections and waits for them.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the loop is gone already, which is what we want.
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::warn!(error = %e, "the simulator's accept loop ended abnormally");
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves the simulated API on `listener` until the handle is shut down or dropped.
pub async fn spawn(listener: TcpListener, opts: SimOptions) -> std::io::Result<SimHandle> {
    let addr = listener.local_addr()?;
    let sim = Arc::new(Sim::new(&opts, addr));
    let (stop, stopped) = oneshot::channel();
    let task = tokio::spawn(accept_loop(
        listener,
        Arc::clone(&sim),
        stopped,
        opts.shutdown_grace,
    ));
    Ok(SimHandle {
        addr,
        sim,
        stop: Some(stop),
        task: Some(task),
    })
}

async fn accept_loop(
    listener: TcpListener,
    sim: Arc<Sim>,
    mut stopped: oneshot::Receiver<()>,
    grace: Duration,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Usually out of file descriptors: pause instead of spinning.
                        tracing::warn!(error = %e, "the simulator could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Small answers must not wait for Nagle's algorithm.
                let _ = stream.set_nodelay(true);
                let sim = Arc::clone(&sim);
                let service = service_fn(move |req| {
                    let sim = Arc::clone(&sim);
                    async move { router::handle(&sim, req).await }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                connections.spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "simulator connection ended with an error");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("simulator connections outlived the grace period; cutting them off");
    }
    connections.shutdown().await;
}

/// `cxgate sim`: binds, prints one line with the URL, serves until Ctrl-C or SIGTERM.
pub async fn run_cli(args: SimArgs) -> std::io::Result<()> {
    let listener = TcpListener::bind(args.listen).await?;
    let handle = spawn(listener, args.options()).await?;
    {
        // A closed stdout is no reason to stop serving.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "cxgate sim listening on {}", handle.base_url());
        let _ = out.flush();
    }
    stop_signal().await?;
    handle.shutdown().await;
    Ok(())
}

#[cfg(unix)]
async fn stop_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

#[cfg(not(unix))]
async fn stop_signal() -> std::io::Result<()> {
    tokio::signal::ctrl_c().await
}
