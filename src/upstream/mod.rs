//! The pooled HTTP client to the CX Social API (and its OAuth endpoint). Keep-alive
//! connections are pooled per host and reused, over rustls, and the gateway keeps one pool
//! per thread ([`ThreadPools`]), so requests reuse warm connections without a thread hop.

pub mod hidden;
pub mod rewrite;

use std::cell::RefCell;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// The shared client type: cheap to clone, all clones share one connection pool.
pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read ca_file {path}: {source}")]
    CaFile {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("ca_file {path} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("ca_file {path}: certificate rejected: {source}")]
    CaCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
}

/// What opens upstream connections (TCP, then TLS when the URL says https).
pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Builds the pooled client. `ca_file` adds trusted roots (PEM) to webpki's and the system's.
///
/// Keep-alive connections are pooled per host and reused, HTTP/1.1 or HTTP/2 as the
/// server's ALPN says, over rustls with the ring provider; the optional `ca_file` is for
/// test upstreams.
pub fn build_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<HttpClient, ClientError> {
    Ok(client_with(build_connector(ca_file, connect_timeout)?))
}

/// A client with a pool of its own on `connector`.
pub fn client_with(connector: Connector) -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

/// One upstream pool per thread that calls it: client connections live on per-core runtimes,
/// and a pooled upstream connection used from another runtime than its own costs a thread
/// hop each way. A pool's connections are served by tasks on the runtime that opened them,
/// so a thread that uses its own pool never waits for another thread to be woken for its
/// reads and writes (`benches/overhead.rs` measured ~100 us per uncached request with one
/// pool shared by the per-core runtimes).
///
/// Each thread keeps its pools in a thread-local list, so a call takes no lock: it finds
/// this gateway's pool among the (one or few) gateways that thread has served.
pub struct ThreadPools {
    connector: Connector,
    /// Names this set of pools in every thread's list.
    id: u64,
    /// Alive while this set is: a thread drops the pools of sets that are gone.
    alive: Arc<()>,
    /// Pools made so far, over all threads.
    made: AtomicUsize,
}

/// Tells sets of pools apart in the thread-local lists.
static NEXT_POOLS_ID: AtomicU64 = AtomicU64::new(0);

/// One thread's pools: which set each belongs to, whether that set is alive, the pool.
type Pools = Vec<(u64, Weak<()>, HttpClient)>;

thread_local! {
    static POOLS: RefCell<Pools> = const { RefCell::new(Vec::new()) };
}

impl ThreadPools {
    pub fn new(connector: Connector) -> ThreadPools {
        ThreadPools {
            connector,
            id: NEXT_POOLS_ID.fetch_add(1, Ordering::Relaxed),
            alive: Arc::new(()),
            made: AtomicUsize::new(0),
        }
    }

    /// The calling thread's pool, made on its first call. A thread's list only grows with
    /// the gateways it serves, and loses the pools of gateways that have stopped.
    pub fn current(&self) -> HttpClient {
        POOLS.with(|pools| {
            let mut pools = pools.borrow_mut();
            if let Some((_, _, client)) = pools.iter().find(|(id, _, _)| *id == self.id) {
                return client.clone();
            }
            pools.retain(|(_, alive, _)| alive.strong_count() > 0);
            let client = client_with(self.connector.clone());
            self.made.fetch_add(1, Ordering::Relaxed);
            pools.push((self.id, Arc::downgrade(&self.alive), client.clone()));
            client
        })
    }
}

/// The connector behind [`build_client`]; see there.
pub fn build_connector(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<Connector, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // System roots are a convenience; a machine without them still has webpki's.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        // Read through `config::files`: a FIFO named here must not hang a reload.
        let pem = crate::config::files::read(path).map_err(|e| ClientError::CaFile {
            path: shown.clone(),
            source: rustls::pki_types::pem::Error::Io(e),
        })?;
        let mut added = 0usize;
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|source| ClientError::CaFile {
                path: shown.clone(),
                source,
            })?;
            roots.add(cert).map_err(|source| ClientError::CaCert {
                path: shown.clone(),
                source,
            })?;
            added += 1;
        }
        // A file with no certificate in it (empty, a key, prose) trusts nothing more:
        // the operator meant something else, so it is refused rather than ignored.
        if added == 0 {
            return Err(ClientError::NoCertificate { path: shown });
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| ClientError::CaCert {
        path: String::from("(protocol versions)"),
        source,
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_count(pools: &ThreadPools) -> usize {
        pools.made.load(Ordering::Relaxed)
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = std::env::temp_dir().join(format!("cxgate-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        for (name, text) in [
            ("empty.pem", ""),
            ("prose.pem", "not a certificate at all\n"),
            (
                "key.pem",
                "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIB6Y\n-----END PRIVATE KEY-----\n",
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write the ca file");
            let got = build_connector(Some(&path), Duration::from_secs(1));
            assert!(
                matches!(got, Err(ClientError::NoCertificate { .. })),
                "expected {name} refused as holding no certificate, saw {:?}",
                got.err()
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn each_calling_thread_gets_one_pool_of_its_own() {
        let connector = build_connector(None, Duration::from_secs(1)).expect("a connector");
        let pools = ThreadPools::new(connector);
        let _ = pools.current();
        let _ = pools.current();
        assert_eq!(
            pool_count(&pools),
            1,
            "expected one pool for one thread, saw {}",
            pool_count(&pools)
        );
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = pools.current();
            });
        });
        assert_eq!(
            pool_count(&pools),
            2,
            "expected a second pool for the second thread, saw {}",
            pool_count(&pools)
        );
    }

    #[test]
    fn two_gateways_on_one_thread_keep_their_pools_apart() {
        let connector = build_connector(None, Duration::from_secs(1)).expect("a connector");
        let first = ThreadPools::new(connector.clone());
        let second = ThreadPools::new(connector.clone());
        let _ = (first.current(), second.current(), first.current());
        assert_eq!(
            (pool_count(&first), pool_count(&second)),
            (1, 1),
            "expected one pool per gateway on this thread"
        );
        let alive_before = POOLS.with(|p| p.borrow().len());
        drop(second);
        let third = ThreadPools::new(connector);
        let _ = third.current();
        let alive_after = POOLS.with(|p| p.borrow().len());
        assert_eq!(
            alive_after, alive_before,
            "expected the stopped gateway's pool dropped when a new one is made"
        );
    }
}
