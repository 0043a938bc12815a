//! The served TLS certificate, swappable while the listener runs. Certificates are renewed
//! far more often than gateways are restarted, so the acceptor does not own a fixed chain: it
//! asks a [`Certs`] resolver on every handshake, and a reload swaps the chain and key in it.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::server::TlsError;

/// The certificate and key served now.
#[derive(Debug)]
pub struct Certs {
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certs {
    /// Reads `cert_file` (a PEM chain) and `key_file` (a PEM private key).
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<Certs>, TlsError> {
        Ok(Arc::new(Certs {
            current: RwLock::new(Arc::new(read_pair(cert_file, key_file)?)),
        }))
    }

    /// Replaces the served pair with the one in these files; on error nothing changes.
    ///
    /// A new pair that cannot be read, or whose key does not match its certificate, is
    /// refused and the running pair stays. Connections already open keep the certificate
    /// they were made with.
    pub fn reload(&self, cert_file: &Path, key_file: &Path) -> Result<(), TlsError> {
        let pair = Arc::new(read_pair(cert_file, key_file)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = pair;
        Ok(())
    }

    /// An acceptor that offers h2 and http/1.1 by ALPN and serves whatever pair is current.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn read_pair(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, TlsError> {
    let pem_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| TlsError::Pem {
            path: path.clone(),
            source,
        }
    };
    // Read through `config::files`: a FIFO in either setting must not hang a reload.
    let read = |path: &Path| {
        crate::config::files::read(path).map_err(|e| pem_err(path)(pem::Error::Io(e)))
    };
    let certs = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(cert_file))?;
    if certs.is_empty() {
        return Err(TlsError::Rustls(rustls::Error::General(format!(
            "{} holds no certificate",
            cert_file.display()
        ))));
    }
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(pem_err(key_file))?;
    Ok(CertifiedKey::from_der(
        certs,
        key,
        &rustls::crypto::ring::default_provider(),
    )?)
}
