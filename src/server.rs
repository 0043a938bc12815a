//! Listeners: accepting connections, TLS, HTTP/1.1 and HTTP/2, and graceful shutdown (the
//! accept loop stops, in-flight requests finish, after `grace` the rest is dropped). Each
//! connection has a watchdog that closes it when it holds resources without using them
//! ([`Limits`], README "Slow clients, idle connections and memory"); connections run on the
//! per-core [`Workers`] when `start` asks for them, else on the caller's runtime.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

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

/// No time recorded.
const NEVER: u64 = u64::MAX;

/// What one connection's watchdog knows: whether a request is running, since when it has
/// been idle, and since when a new head has been arriving. Times are milliseconds since
/// accept.
struct Watch {
    accepted: tokio::time::Instant,
    /// Requests whose answer is being made.
    running: AtomicUsize,
    /// Some request head has been read whole.
    served: AtomicBool,
    /// The client spoke HTTP/2 (its preface): frames such as PING are no new head.
    h2: AtomicBool,
    idle_since: AtomicU64,
    head_since: AtomicU64,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            accepted: tokio::time::Instant::now(),
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NEVER),
        }
    }

    fn now_ms(&self) -> u64 {
        self.accepted.elapsed().as_millis() as u64
    }

    /// A request head has been read: no deadline while its answer is made.
    fn begin(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.head_since.store(NEVER, Ordering::Release);
        Running(Arc::clone(self))
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection that starts the next head's clock.
    fn read_some(&self) {
        if self.running.load(Ordering::Acquire) == 0
            && self.served.load(Ordering::Acquire)
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since.load(Ordering::Acquire) == NEVER
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while a request runs.
    fn deadline(&self, limits: &Limits) -> Option<tokio::time::Instant> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, plus: Duration| {
            Some(self.accepted + Duration::from_millis(ms).saturating_add(plus))
        };
        if !self.served.load(Ordering::Acquire) {
            return at(0, limits.header_timeout);
        }
        match self.head_since.load(Ordering::Acquire) {
            NEVER => at(self.idle_since.load(Ordering::Acquire), limits.idle_timeout),
            since => at(since, limits.header_timeout),
        }
    }

    /// Resolves when the connection has been silent, slow or idle for too long.
    ///
    /// Nothing wakes the watchdog when a request begins or ends or a head starts: it sleeps
    /// until the deadline it saw or `recheck`, whichever is sooner, and looks again. That
    /// never oversleeps a deadline: one that a change after `now` sets is at least
    /// `header_timeout` or `idle_timeout` after it (less the millisecond the times are
    /// rounded to). So a connection costs a timer fire every `recheck` instead of a wake-up
    /// and a new timer for each request, and closes at the same instant as before.
    async fn expired(&self, limits: Limits) -> &'static str {
        let recheck = limits
            .header_timeout
            .min(limits.idle_timeout)
            .saturating_sub(Duration::from_millis(1))
            .max(Duration::from_millis(1));
        let sleep = tokio::time::sleep(recheck);
        tokio::pin!(sleep);
        loop {
            // `now` before the state: a change this reading misses happened after it.
            let now = tokio::time::Instant::now();
            let wake = match self.deadline(&limits) {
                None => now + recheck,
                Some(deadline) if now >= deadline => {
                    return if !self.served.load(Ordering::Acquire) {
                        "no request head within header_timeout of accept"
                    } else if self.head_since.load(Ordering::Acquire) != NEVER {
                        "request head not finished within header_timeout"
                    } else {
                        "idle for idle_timeout"
                    };
                }
                Some(deadline) => deadline.min(now + recheck),
            };
            sleep.as_mut().reset(wake);
            sleep.as_mut().await;
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

/// A request being answered; dropping it starts the connection's idle time.
struct Running(Arc<Watch>);

impl Drop for Running {
    fn drop(&mut self) {
        let w = &self.0;
        if w.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            w.idle_since.store(w.now_ms(), Ordering::Release);
            w.head_since.store(NEVER, Ordering::Release);
        }
    }
}

/// A connection's byte stream, telling its [`Watch`] when bytes arrive.
struct Watched<T> {
    io: T,
    watch: Arc<Watch>,
    /// The first bytes have been looked at for the HTTP/2 preface.
    seen_first: bool,
}

impl<T> Watched<T> {
    fn new(io: T, watch: &Arc<Watch>) -> Watched<T> {
        Watched {
            io,
            watch: Arc::clone(watch),
            seen_first: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if !this.seen_first {
                this.seen_first = true;
                if buf.filled()[before..].starts_with(b"PRI ") {
                    this.watch.h2.store(true, Ordering::Relaxed);
                }
            }
            this.watch.read_some();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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

/// Where connections are served: one single-threaded runtime per core, each on a thread of
/// its own. A connection lives on one of them from accept to close, so its socket events,
/// its timers and the tasks it spawns never cross threads; under cache hits that saves the
/// multi-threaded scheduler's hand-offs between workers.
/// Dropping it stops the runtimes, cancelling whatever still runs there.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    next: std::sync::atomic::AtomicUsize,
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
                            let _ = rt.block_on(stopped);
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
            next: std::sync::atomic::AtomicUsize::new(0),
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

    /// The runtime for the next connection, in turn.
    fn pick(&self) -> &tokio::runtime::Handle {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.handles[i % self.handles.len()]
    }
}

/// Serves `listener` until `shutdown` turns true, then drains for at most `grace`.
/// Connections run on `workers` when given, else on the calling runtime, and are held to
/// `limits`.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    workers: Option<Arc<Workers>>,
    limits: Limits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(builder());
    let graceful = GracefulShutdown::new();
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    if let Some(fds) = descriptor_limit().filter(|fds| *fds < limits.max_connections as u64 + 128) {
        tracing::warn!(
            max_connections = limits.max_connections,
            descriptor_limit = fds,
            "the process may open fewer descriptors than max_connections needs: raise `ulimit -n` \
             or lower server.max_connections, or accepts will fail before the limit is reached"
        );
    }
    loop {
        // A place first, then the connection: past `max_connections` new ones wait in the
        // listen backlog rather than take descriptors the open ones and the admin need.
        let place = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            place = Arc::clone(&open).acquire_owned() => match place {
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
        let place = Place::new(place, &limits.open);
        let watch = Arc::new(Watch::new());
        let service = hyper::service::service_fn({
            let handler = handler.clone();
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
        let runtime = workers.as_deref().map(Workers::pick);
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let limits = limits.clone();
        let connection = move |stream: TcpStream| async move {
            let served = async {
                match tls {
                    None => {
                        let io = TokioIo::new(Watched::new(stream, &watch));
                        let conn = builder.serve_connection_with_upgrades(io, service);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    }
                    // Boxed, so that the TLS session's state is no part of a plain
                    // connection's task, which is sized for the larger of the two branches.
                    Some(acceptor) => Box::pin(async {
                        // The handshake runs on the watchdog's clock from accept.
                        let tls = match acceptor.accept(stream).await {
                            Ok(tls) => tls,
                            Err(e) => {
                                return tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                        };
                        let io = TokioIo::new(Watched::new(tls, &watch));
                        let conn = builder.serve_connection_with_upgrades(io, service);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            tracing::debug!(%peer, error = %e, "connection ended with an error");
                        }
                    })
                    .await,
                }
            };
            // `biased`: polled in this order rather than a random one, which would draw a
            // random number on every poll of the connection; neither branch can starve the
            // other, as each one's poll is cheap and the first ready one ends the connection.
            tokio::select! {
                biased;
                _ = served => {}
                why = watch.expired(limits) => tracing::debug!(%peer, why, "connection closed"),
            }
            drop(place);
        };
        match runtime {
            None => {
                tokio::spawn(connection(stream));
            }
            Some(runtime) => {
                // The socket moves to the worker's own reactor: it is registered there, so
                // its readiness wakes that thread and no other.
                let std_stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "cannot hand the connection over");
                        continue;
                    }
                };
                runtime.spawn(async move {
                    match TcpStream::from_std(std_stream) {
                        Ok(stream) => connection(stream).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "cannot register the connection")
                        }
                    }
                });
            }
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "shutdown grace elapsed with requests still in flight"
        );
    }
}

/// The process's soft limit on open descriptors, as `/proc/self/limits` says (Linux).
fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Binds a listener, with a message that names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
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

    /// A future that counts how often it is polled.
    struct Polls<F> {
        inner: Pin<Box<F>>,
        count: Arc<AtomicUsize>,
    }

    impl<F: Future> Future for Polls<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.inner.as_mut().poll(cx)
        }
    }

    fn limits(header: u64, idle: u64) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(header),
            idle_timeout: Duration::from_secs(idle),
            max_connections: 1,
            open: None,
        }
    }

    /// Polls the watchdog of `watch` in a task of its own, counting its wake-ups.
    fn watchdog(
        watch: &Arc<Watch>,
        limits: Limits,
    ) -> (tokio::task::JoinHandle<&'static str>, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(watch);
        let task = tokio::spawn(Polls {
            inner: Box::pin(async move { w.expired(limits).await }),
            count: Arc::clone(&count),
        });
        (task, count)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_on_a_kept_alive_connection_do_not_wake_its_watchdog() {
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        let (task, polls) = watchdog(&watch, limits(1, 5));
        tokio::task::yield_now().await;
        let before = polls.load(Ordering::Relaxed);
        // 1,000 requests, each a head arriving, its answer made, and the connection idle
        // again, with the watchdog's task free to run between each step; the clock stands.
        for _ in 0..1000 {
            watch.read_some();
            tokio::task::yield_now().await;
            let running = watch.begin();
            tokio::task::yield_now().await;
            drop(running);
            tokio::task::yield_now().await;
        }
        let during = polls.load(Ordering::Relaxed) - before;
        assert!(
            during == 0,
            "expected no wake-up of the watchdog for 1,000 requests, saw {during} polls"
        );
        let why = task.await.expect("the watchdog task ran");
        assert_eq!(why, "idle for idle_timeout");
        assert_eq!(
            tokio::time::Instant::now(),
            start + Duration::from_secs(5),
            "expected the close at idle_timeout after the last answer"
        );
        let total = polls.load(Ordering::Relaxed);
        assert!(
            total <= 10,
            "expected a few timer wake-ups over 5 s of idle time, saw {total} polls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_while_idle_is_cut_at_header_timeout_not_later() {
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        drop(watch.begin());
        let (task, _) = watchdog(&watch, limits(1, 5));
        // Idle until 5 s; a head starts at 2.5 s and must be done by 3.5 s, which no
        // wake-up announces to the watchdog.
        tokio::time::advance(Duration::from_millis(2500)).await;
        watch.read_some();
        let why = task.await.expect("the watchdog task ran");
        assert_eq!(why, "request head not finished within header_timeout");
        assert_eq!(
            tokio::time::Instant::now(),
            start + Duration::from_millis(3500),
            "expected the close at header_timeout after the head's first byte"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_keeps_both_clocks() {
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_connections: 1,
            open: None,
        };
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(1)),
            "before any request: header_timeout from accept"
        );
        let running = watch.begin();
        assert_eq!(
            watch.deadline(&limits),
            None,
            "no deadline while a request runs"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(running);
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(7)),
            "idle: idle_timeout from the end of the last request"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        watch.read_some();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(4)),
            "a new head arriving: header_timeout from its first byte"
        );
        let why = watch.expired(limits).await;
        assert_eq!(why, "request head not finished within header_timeout");
        assert_eq!(tokio::time::Instant::now(), start + Duration::from_secs(4));
    }
}
