//! Listeners: accepting connections, TLS, HTTP/1.1 and HTTP/2, and graceful shutdown.
//!
//! Each listener runs one accept loop; each connection is served by hyper-util's auto
//! builder (HTTP/1.1, or HTTP/2 by prior knowledge or ALPN), on one of the per-core
//! [`Workers`] for the client listener. On shutdown the accept loop
//! stops first, then every connection is told to finish its in-flight requests, and after
//! `grace` whatever is left is dropped.

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
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::error::Body;

/// How long a client may take to send its request head, or to finish a TLS handshake.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted over HTTP/1.1; beyond it hyper answers 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

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
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
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
/// multi-threaded scheduler's hand-offs between workers (issue #7, "tune the runtime").
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
/// Connections run on `workers` when given, else on the calling runtime.
pub async fn serve<H, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    workers: Option<Arc<Workers>>,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let builder = Arc::new(builder());
    let graceful = GracefulShutdown::new();
    loop {
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
        let service = hyper::service::service_fn({
            let handler = handler.clone();
            move |req| {
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            }
        });
        let runtime = workers.as_deref().map(Workers::pick);
        let builder = builder.clone();
        let tls = tls.clone();
        let watcher = graceful.watcher();
        let connection = move |stream: TcpStream| async move {
            match tls {
                None => {
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                return tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                        };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
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

/// Binds a listener, with a message that names the address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}
