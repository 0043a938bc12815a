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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulConnection;
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
    /// What the watchdog has told the connection: [`CLOSE`], [`DRAIN`] or nothing yet.
    told: AtomicU8,
    /// The connection task's waker, for the watchdog to wake it with what it told.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// The watchdog's word to its connection: close now (a limit ran out).
const CLOSE: u8 = 1;
/// The watchdog's word to its connection: the server shuts down, finish what runs and close.
const DRAIN: u8 = 2;

impl Watch {
    fn new() -> Watch {
        Watch {
            accepted: tokio::time::Instant::now(),
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NEVER),
            told: AtomicU8::new(0),
            waker: std::sync::Mutex::new(None),
        }
    }

    /// Tells the connection `word` and wakes its task.
    fn tell(&self, word: u8) {
        self.told.fetch_or(word, Ordering::AcqRel);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(waker) = waker {
            waker.wake();
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

pin_project_lite::pin_project! {
    /// A connection's whole task, as its watchdog lets it run: it ends when told [`CLOSE`].
    ///
    /// The watchdog runs as a task of its own and tells the connection what it decided
    /// through the [`Watch`], so a wake-up of the connection polls one atomic for it
    /// instead of the watchdog's timer and a shutdown signal shared with other
    /// connections (a lock). With thousands of connections those were cold memory on
    /// every request.
    struct Guarded<F> {
        #[pin]
        inner: F,
        watch: Arc<Watch>,
        registered: bool,
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if !*this.registered {
            // This future is a spawned task's own, so its waker is that task's for good:
            // stored once, before `told` is read, so a word told after the read wakes it.
            *this.registered = true;
            *this.watch.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        }
        if this.watch.told.load(Ordering::Acquire) & CLOSE != 0 {
            return Poll::Ready(());
        }
        this.inner.poll(cx)
    }
}

pin_project_lite::pin_project! {
    /// A hyper connection that starts its graceful shutdown once told [`DRAIN`]: no new
    /// request on HTTP/1.1 after the one running, GOAWAY on HTTP/2.
    struct Drained<C> {
        #[pin]
        conn: C,
        watch: Arc<Watch>,
        draining: bool,
    }
}

impl<C> Drained<C> {
    fn new(conn: C, watch: &Arc<Watch>) -> Drained<C> {
        Drained {
            conn,
            watch: Arc::clone(watch),
            draining: false,
        }
    }
}

impl<C: GracefulConnection> Future for Drained<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.draining && this.watch.told.load(Ordering::Acquire) & DRAIN != 0 {
            *this.draining = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}

/// A connection's watchdog, in a task of its own: tells the connection to close when a
/// limit runs out, and to drain when `shutdown` turns true (the limits still hold then).
async fn watchdog(
    watch: Arc<Watch>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    let expired = tokio::select! {
        biased;
        why = watch.expired(limits.clone()) => Some(why),
        // The value's guard is let go here, before the next wait.
        _ = shutdown.wait_for(|stop| *stop) => None,
    };
    let why = match expired {
        Some(why) => why,
        None => {
            watch.tell(DRAIN);
            watch.expired(limits).await
        }
    };
    tracing::debug!(%peer, why, "connection closed");
    watch.tell(CLOSE);
}

/// Aborts a task when dropped: a connection's watchdog ends with its connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
    let _watchdog = AbortOnDrop(tokio::spawn(watchdog(
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
    Guarded {
        inner: served,
        watch: Arc::clone(&watch),
        registered: false,
    }
    .await;
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
