//! The pooled HTTP client to the CX Social API (and its OAuth endpoint).
//!
//! One client per process: keep-alive connections are pooled per host and reused, HTTP/1.1
//! or HTTP/2 as the server's ALPN says, over rustls with the ring provider. Roots are
//! webpki's plus the system's, plus an optional `ca_file` for test upstreams.

pub mod rewrite;

use std::path::Path;
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
    #[error("ca_file {path}: certificate rejected: {source}")]
    CaCert {
        path: String,
        #[source]
        source: rustls::Error,
    },
}

/// Builds the pooled client. `ca_file` adds trusted roots (PEM) to webpki's and the system's.
pub fn build_client(
    ca_file: Option<&Path>,
    connect_timeout: Duration,
) -> Result<HttpClient, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // System roots are a convenience; a machine without them still has webpki's.
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let certs = CertificateDer::pem_file_iter(path).map_err(|source| ClientError::CaFile {
            path: shown.clone(),
            source,
        })?;
        for cert in certs {
            let cert = cert.map_err(|source| ClientError::CaFile {
                path: shown.clone(),
                source,
            })?;
            roots.add(cert).map_err(|source| ClientError::CaCert {
                path: shown.clone(),
                source,
            })?;
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
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector))
}
