//! Listeners: accepting connections, TLS, HTTP/1.1 and HTTP/2, and graceful shutdown (the
//! accept loops stop, in-flight requests finish, after `grace` the rest is dropped). Each
//! connection has a watchdog, a task of its own, that closes it when it holds resources
//! without using them ([`Limits`], README "Slow clients, idle connections and memory") and
//! drains it at shutdown; connections run on the per-core [`Workers`], each accepting its
//! own, when `start` asks for them, else on the caller's runtime.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

mod watchdog;

use self::watchdog::{AbortOnDrop, Drained, Guarded, Watch, Watched};

use crate::error::Body;

/// The largest request head accepted over HTTP/1.1; beyond it hyper answers 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Connections the admin listener keeps open at once: its own limit, apart from the client
/// listener's, so a flood of client connections never leaves `/healthz` unanswered.
const ADMIN_MAX_CONNECTIONS: usize = 256;

/// How long a connection may hold on without sending, and how many may be open.
#[derive(Debug, Clone)]
pub struct Limits {
    /// From accept to the end of the first request head (TLS handshake included), and from
    /// the first byte of a later HTTP/1.1 head to its end.
    pub header_timeout: Duration,
    /// With no request running for this long, the connection is closed.
    pub idle_timeout: Duration,
    /// Connections open at once on the listener.
    pub max_connections: usize,
    /// Where the number of open connections is shown (`cxgate_connections_open`).
    pub open: Option<prometheus::IntGauge>,
}

impl Limits {
    /// The client listener's: `server.header_timeout`, `idle_timeout`, `max_connections`.
    pub fn client(server: &crate::config::ServerConfig) -> Limits {
        Limits {
            header_timeout: server.header_timeout,
            idle_timeout: server.idle_timeout,
            max_connections: server.max_connections,
            open: None,
        }
    }

    /// The same limits, counting open connections in `gauge`.
    pub fn counted(self, gauge: prometheus::IntGauge) -> Limits {
        Limits {
            open: Some(gauge),
            ..self
        }
    }

    /// The admin listener's: the same timeouts, and a small limit of its own.
    pub fn admin(server: &crate::config::ServerConfig) -> Limits {
        Limits {
            max_connections: ADMIN_MAX_CONNECTIONS.min(server.max_connections.max(16)),
            ..Limits::client(server)
        }
    }
}

/// One open connection, counted while it lives.
struct Place {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: Option<prometheus::IntGauge>,
}

impl Place {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        open: &Option<prometheus::IntGauge>,
    ) -> Place {
        if let Some(g) = open {
            g.inc();
        }
        Place {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(g) = &self.open {
            g.dec();
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Pem {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor that offers h2 and http/1.1 by ALPN.
pub fn tls_acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsError> {
    let pem_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Pem {
            path: path.clone(),
            source,
        }
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .map_err(pem_err(cert_file))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert_file))?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(pem_err(key_file))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn builder() -> Builder<TokioExecutor> {
    let mut b = Builder::new(TokioExecutor::new());
    // hyper's own head timer starts as soon as a keep-alive connection waits for its next
    // request, which would cut idle connections at `header_timeout`: each connection's
    // watchdog keeps both clocks instead.
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    b
}

/// Where connections are served: single-threaded runtimes, each on a thread of its own and
/// accepting on a listening socket of its own ([`serve`]). A connection lives on the one
/// that accepted it until it closes, so its socket events, its timers and the tasks it
/// spawns never cross threads; under cache hits that saves the multi-threaded scheduler's
/// hand-offs between workers.
/// Dropping it stops the runtimes, cancelling whatever still runs there.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    _stops: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Workers {
    /// `count` runtimes (at least one), or the reason a thread or runtime could not start.
    pub fn start(count: usize) -> std::io::Result<Workers> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..count.max(1) {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (ready, handle) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("cxgate-conn-{i}"))
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build();
                    match runtime {
                        Ok(rt) => {
                            let _ = ready.send(Ok(rt.handle().clone()));
                            let _ = rt.block_on(async {
                                let anchor = tokio::spawn(anchor());
                                let stopped = stopped.await;
                                anchor.abort();
                                stopped
                            });
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                })?;
            let handle = handle
                .recv()
                .map_err(|_| std::io::Error::other("connection thread ended at start"))??;
            handles.push(handle);
            stops.push(stop);
        }
        Ok(Workers {
            handles,
            _stops: stops,
        })
    }

    /// Two per core, as the machine reports its parallelism. With one per core, a thread
    /// the kernel preempts (for a load generator, say) stalls half the connections until
    /// it runs again; two per core halve what one stall holds up. Measured with
    /// benches/compare.sh on 2 cores: hits 95-105k req/s at 115% CPU, against 79-100k
    /// at 108% with one per core (benches/README.md).
    pub fn per_core() -> std::io::Result<Workers> {
        Workers::start(2 * std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// How often a connection runtime's [`anchor`] timer fires.
const ANCHOR_EVERY: Duration = Duration::from_secs(1);

/// Keeps a timer due within [`ANCHOR_EVERY`] on the runtime it runs on, for as long as it
/// runs.
///
/// tokio's timer driver wakes its runtime (a `write` to the runtime's eventfd, then one
/// more `epoll_wait`) whenever a timer is set sooner than the soonest one the runtime had
/// when it last went to sleep, even from the runtime's own thread, which is awake. An
/// uncached request sets two: the request timeout (`server.request_timeout`, 30 s) and the
/// upstream exchange's (`upstream.timeout`, 20 s). With nothing sooner on the runtime (no
/// connection, or watchdogs that look again only every `header_timeout`, when that is 20 s
/// or more) each cost such a wake-up: two `write`s per request (benches/README.md). With
/// this timer always sooner, they cost none, for one timer fire per runtime per second.
async fn anchor() {
    loop {
        tokio::time::sleep(ANCHOR_EVERY).await;
    }
}

/// What every accept loop of one listener shares: how connections are served and limited.
struct Accepting<H> {
    builder: Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    handler: H,
    /// Places for open connections, shared by all the loops: `max_connections` holds for
    /// the listener as a whole.
    open: Arc<Semaphore>,
    limits: Limits,
}

/// Serves `listener` until `shutdown` turns true, then drains for at most `grace`.
///
/// With `workers`, each runtime accepts on a listening socket of its own on the same
/// address (`SO_REUSEPORT`: the kernel spreads new connections over them, as nginx's
/// `reuseport` does) and serves what it accepts itself, so a connection is never handed
/// from the accepting thread to another (a deregistration, a registration and a wake-up
/// of the other thread each). Without, connections are accepted and served on the calling
/// runtime. Connections are held to `limits`; at shutdown each is told to drain by its
/// watchdog, and the drain ends when every connection's place is back.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    shutdown: watch::Receiver<bool>,
    grace: Duration,
    workers: Option<Arc<Workers>>,
    limits: Limits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    if let Some(fds) = descriptor_limit().filter(|fds| *fds < limits.max_connections as u64 + 128) {
        tracing::warn!(
            max_connections = limits.max_connections,
            descriptor_limit = fds,
            "the process may open fewer descriptors than max_connections needs: raise `ulimit -n` \
             or lower server.max_connections, or accepts will fail before the limit is reached"
        );
    }
    let accepting = Arc::new(Accepting {
        builder: builder(),
        tls,
        handler,
        open: Arc::new(Semaphore::new(
            limits.max_connections.clamp(1, u32::MAX as usize),
        )),
        limits,
    });
    // Borrowed: the runtimes must outlive the drain below, as dropping them ends their
    // connections.
    match workers.as_deref() {
        None => accept_loop(listener, Arc::clone(&accepting), shutdown).await,
        Some(workers) => {
            let sockets = match one_each(listener, workers.handles.len()) {
                Ok(sockets) => sockets,
                Err(e) => {
                    return tracing::error!(error = %e, "cannot open the connection runtimes' listeners")
                }
            };
            let loops: Vec<_> = workers
                .handles
                .iter()
                .zip(sockets)
                .map(|(runtime, socket)| {
                    let accepting = Arc::clone(&accepting);
                    let shutdown = shutdown.clone();
                    runtime.spawn(async move {
                        match TcpListener::from_std(socket) {
                            Ok(listener) => accept_loop(listener, accepting, shutdown).await,
                            Err(e) => tracing::error!(error = %e, "cannot register a listener"),
                        }
                    })
                })
                .collect();
            for one in loops {
                let _ = one.await;
            }
        }
    }
    // Every listener is closed. Each connection holds a place until it ends, so all the
    // places back means all drained.
    let places = u32::try_from(accepting.limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let all = accepting.open.acquire_many(places);
    if tokio::time::timeout(grace, all).await.is_err() {
        tracing::warn!(
            ?grace,
            "shutdown grace elapsed with requests still in flight"
        );
    }
    drop(workers);
}

/// `listener` and `count - 1` more listening sockets on its address, each to be accepted on
/// by one runtime. [`bind`] set `SO_REUSEPORT` on `listener`, so the others may join it.
fn one_each(listener: TcpListener, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let addr = listener.local_addr()?;
    let mut sockets = vec![listener.into_std()?];
    for _ in 1..count {
        sockets.push(reuse_port(addr)?.into_std()?);
    }
    Ok(sockets)
}

/// Accepts on `listener` until `shutdown`, serving each connection on this runtime, and
/// closes it.
async fn accept_loop<H, F>(
    listener: TcpListener,
    accepting: Arc<Accepting<H>>,
    mut shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    loop {
        // A place first, then the connection: past `max_connections` new ones wait in the
        // listen backlog rather than take descriptors the open ones and the admin need.
        let place = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            place = Arc::clone(&accepting.open).acquire_owned() => match place {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: back off briefly
                // instead of spinning, and keep serving.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let place = Place::new(place, &accepting.limits.open);
        tokio::spawn(connection(
            stream,
            peer,
            place,
            Arc::clone(&accepting),
            shutdown.clone(),
        ));
    }
}

/// Serves one accepted connection until it ends, its watchdog closes it, or shutdown has
/// drained it.
async fn connection<H, F>(
    stream: TcpStream,
    peer: SocketAddr,
    place: Place,
    accepting: Arc<Accepting<H>>,
    shutdown: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let watch = Arc::new(Watch::new());
    let _watchdog = AbortOnDrop(tokio::spawn(watchdog::run(
        Arc::clone(&watch),
        accepting.limits.clone(),
        shutdown,
        peer,
    )));
    let service = hyper::service::service_fn({
        let handler = accepting.handler.clone();
        let watch = Arc::clone(&watch);
        move |req| {
            let running = watch.begin();
            // Boxed: hyper keeps the slot for a connection's request future from accept
            // to close, so unboxed every idle connection would hold the size of the
            // gateway's future (kilobytes); boxed, it is held only while a request runs.
            let fut = Box::pin(handler(req));
            async move {
                let resp = fut.await;
                drop(running);
                Ok::<_, Infallible>(resp)
            }
        }
    });
    let builder = &accepting.builder;
    let served = async {
        match &accepting.tls {
            None => {
                let io = TokioIo::new(Watched::new(stream, &watch));
                let conn = builder.serve_connection_with_upgrades(io, service);
                if let Err(e) = Drained::new(conn, &watch).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            // Boxed, so that the TLS session's state is no part of a plain
            // connection's task, which is sized for the larger of the two branches.
            Some(acceptor) => {
                Box::pin(async {
                    // The handshake runs on the watchdog's clock from accept.
                    let tls = match acceptor.accept(stream).await {
                        Ok(tls) => tls,
                        Err(e) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    };
                    let io = TokioIo::new(Watched::new(tls, &watch));
                    let conn = builder.serve_connection_with_upgrades(io, service);
                    if let Err(e) = Drained::new(conn, &watch).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                })
                .await
            }
        }
    };
    Guarded::new(served, &watch).await;
    drop(place);
}

/// The process's soft limit on open descriptors, as `/proc/self/limits` says (Linux).
fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Connections the kernel holds for a listener before it is accepted from (`listen`'s
/// backlog; the kernel caps it at `net.core.somaxconn`, 4,096 by default). std and tokio
/// ask for 128: when thousands of clients connect at once the queue overflows, and the
/// handshakes it drops are retried by the clients a second later or more.
const BACKLOG: u32 = 4096;

/// Binds a listener, with a message that names the address.
///
/// The socket has `SO_REUSEPORT`, so that [`serve`] can open one more per connection
/// runtime on the same address. That option would also let another process of the same
/// user join the port unnoticed, so the address is first bound without it: a port another
/// process holds is refused here as before.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let named =
        |e: std::io::Error| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let probe = std::net::TcpListener::bind(addr).map_err(named)?;
    let bound = probe.local_addr().map_err(named)?;
    drop(probe);
    reuse_port(bound).map_err(named)
}

/// A listener on `addr` with `SO_REUSEPORT` and [`BACKLOG`].
fn reuse_port(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_descriptor_limit_is_read_from_proc() {
        if Path::new("/proc/self/limits").exists() {
            let fds = descriptor_limit();
            assert!(
                fds.is_some_and(|n| n > 0),
                "expected a soft descriptor limit from /proc/self/limits, saw {fds:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_listener_holds_hundreds_of_handshakes_not_yet_accepted() {
        // Clients that connect at once while the accept loops are busy wait in the listen
        // queue; past its backlog the kernel drops their handshakes, and a client retries
        // only a second later. 500 connections, none accepted, must all get through.
        let listener = bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let connects = (0..500)
            .map(|_| tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)));
        let mut open = Vec::new();
        for connected in futures_join_all(connects).await {
            if let Ok(Ok(stream)) = connected {
                open.push(stream);
            }
        }
        assert_eq!(
            open.len(),
            500,
            "expected all 500 connections through the listen queue, saw {}",
            open.len()
        );
    }

    #[tokio::test]
    async fn a_port_another_socket_holds_is_refused_though_ours_share_it() {
        let first = bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("a listener");
        let addr = first.local_addr().expect("its address");
        let again = bind(addr).await;
        assert!(
            again
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse),
            "expected a second bind of {addr} refused as in use, saw {again:?}"
        );
        let sockets = one_each(first, 3).expect("three sockets on one port");
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().expect("an address").port())
            .collect();
        assert_eq!(ports, [addr.port(); 3], "expected all three on {addr}");
    }

    /// Write-type system calls this thread has made (`/proc/thread-self/io`, Linux).
    fn writes_of_this_thread() -> Option<u64> {
        let io = std::fs::read_to_string("/proc/thread-self/io").ok()?;
        let line = io.lines().find(|l| l.starts_with("syscw:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    #[tokio::test]
    async fn a_request_timer_set_on_a_connection_runtime_wakes_nothing() {
        if writes_of_this_thread().is_none() {
            return;
        }
        let workers = Workers::start(1).expect("a connection runtime");
        let counted = workers.handles[0].spawn(async {
            // Asleep once, so the runtime knows its soonest timer as it would between
            // requests.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let before = writes_of_this_thread();
            for _ in 0..50 {
                // What an uncached request does: set a timer of many seconds and drop it
                // when the answer comes first.
                let timer = tokio::time::sleep(Duration::from_secs(30));
                tokio::pin!(timer);
                std::future::poll_fn(|cx| {
                    let _ = timer.as_mut().poll(cx);
                    std::task::Poll::Ready(())
                })
                .await;
            }
            Some(writes_of_this_thread()? - before?)
        });
        let writes = counted
            .await
            .expect("the task ran")
            .expect("the counts are readable");
        assert!(
            writes < 5,
            "expected 50 timers of 30 s to cost (almost) no eventfd write on their runtime, \
             saw {writes} writes"
        );
    }

    /// Reads one HTTP/1.1 answer's status line and head from `stream`, or `None` at EOF.
    async fn status_of(stream: &mut TcpStream) -> Option<String> {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return None,
            }
        }
        let text = String::from_utf8_lossy(&head).into_owned();
        text.lines().next().map(str::to_string)
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_closes_idle_connections_and_lets_a_running_request_finish() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind("127.0.0.1:0".parse().expect("an address"))
            .await
            .expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let release = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let release = Arc::clone(&release);
            move |req: Request<Incoming>| {
                let release = Arc::clone(&release);
                async move {
                    if req.uri().path() == "/slow" {
                        release.notified().await;
                    }
                    Response::new(Body::from("ok"))
                }
            }
        };
        let (stop, stopped) = watch::channel(false);
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 8,
            open: None,
        };
        let server = tokio::spawn(serve(
            listener,
            None,
            handler,
            stopped,
            Duration::from_secs(30),
            None,
            limits,
        ));
        let ask = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut idle = TcpStream::connect(addr).await.expect("a connection");
        idle.write_all(ask("/fast").as_bytes())
            .await
            .expect("a request");
        let first = status_of(&mut idle).await;
        assert_eq!(first.as_deref(), Some("HTTP/1.1 200 OK"));
        let mut body = [0u8; 2];
        idle.read_exact(&mut body).await.expect("the body");
        let mut slow = TcpStream::connect(addr).await.expect("a connection");
        slow.write_all(ask("/slow").as_bytes())
            .await
            .expect("a request");
        tokio::time::sleep(Duration::from_millis(100)).await;

        stop.send(true).expect("the server listens");
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(
            matches!(closed, Ok(Ok(0))),
            "expected the idle keep-alive connection closed at shutdown, saw {closed:?}"
        );
        assert!(
            !server.is_finished(),
            "expected the server draining the slow request"
        );
        release.notify_one();
        let answer = status_of(&mut slow).await;
        assert_eq!(
            answer.as_deref(),
            Some("HTTP/1.1 200 OK"),
            "expected the running request answered after shutdown began"
        );
        // The grace is 30 s: ending within 5 means the drain ended with the last connection.
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server ended once drained, before the grace")
            .expect("the server task ran");
    }

    /// Waits for every future, each in a task of its own.
    async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let tasks: Vec<_> = futures.map(tokio::spawn).collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.expect("the task ran"));
        }
        out
    }
}
