//! TLS on both sides: the listener with `[server.tls]` (rustls, ALPN h2 and http/1.1), and
//! an upstream reached over https that is trusted only through `upstream.ca_file`.
//!
//! `tests/tls/` holds a test CA (`ca.pem`) and a leaf for `localhost` and 127.0.0.1
//! (`cert.pem`, `key.pem`) that it signed; they exist only for these tests. A second CA
//! (`renewed-ca.pem`) signed `renewed-cert.pem`/`renewed-key.pem`: the pair a renewal brings.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cxgate::sim::SimOptions;
use http::{header, Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use common::{ACCESS, KEY};

fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client that trusts only the test CA and offers `alpn`.
fn connector(alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(tls_file("ca.pem")).expect("read ca.pem") {
        roots
            .add(cert.expect("parse ca.pem"))
            .expect("add the test CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

async fn handshake(addr: SocketAddr, alpn: &[&[u8]]) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    connector(alpn)
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the gateway")
}

fn get_me(authority: &str) -> Request<Empty<Bytes>> {
    Request::get(format!("https://{authority}/me"))
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Empty::new())
        .expect("request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_serves_https_with_alpn_h2_and_http1() {
    let server = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        tls_file("cert.pem").display(),
        tls_file("key.pem").display()
    );
    let clients = common::client_toml("test", KEY, "scopes = [\"read\"]");
    let env = common::start_custom(SimOptions::default(), &server, None, &clients, "").await;
    let authority = format!("localhost:{}", env.gw.addr.port());

    // ALPN picks h2 when the client offers it.
    let tls = handshake(env.gw.addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "expected ALPN to choose h2"
    );
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let resp = send
        .send_request(get_me(&authority))
        .await
        .expect("h2 answer");
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, Version::HTTP_2),
        "expected 200 over HTTP/2"
    );
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(
        body.starts_with(b"{\"meta\""),
        "expected the CX Social envelope, saw {body:?}"
    );

    // A client that offers only http/1.1 is served HTTP/1.1.
    let tls = handshake(env.gw.addr, &[b"http/1.1"]).await;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let mut req = get_me(&authority);
    *req.uri_mut() = "/me".parse().expect("origin form");
    req.headers_mut()
        .insert(header::HOST, authority.parse().expect("host"));
    let resp = send.send_request(req).await.expect("h1 answer");
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, Version::HTTP_11),
        "expected 200 over HTTP/1.1"
    );

    // Plain HTTP on the TLS port gets no HTTP answer.
    let answer = common::raw_exchange(
        env.gw.addr,
        format!("GET /me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(
        !answer.bytes.starts_with(b"HTTP/1.1 200"),
        "expected plain HTTP refused on the TLS listener, saw {:?}",
        String::from_utf8_lossy(&answer.bytes)
    );
    env.stop().await;
}

/// A TLS terminator for the simulator: https on its own port, plain bytes to the simulator.
async fn https_front(sim: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(tls_file("cert.pem"))
        .expect("read cert.pem")
        .map(|c| c.expect("parse cert.pem"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(tls_file("key.pem")).expect("read key.pem");
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    // The simulator speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut plain) = TcpStream::connect(sim).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    (addr, task)
}

async fn gateway_to(upstream: &str, ca_file: Option<&Path>) -> (cxgate::Running, PathBuf) {
    let dir = common::temp_dir("tls");
    let ca = ca_file.map_or(String::new(), |p| {
        format!("ca_file = \"{}\"\n", p.display())
    });
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\
         [upstream]\nbase_url = \"{upstream}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n{ca}\
         [token]\naccess_token_env = \"CXGATE_TLS_TEST_TOKEN\"\n\
         {}\n",
        common::client_toml("test", KEY, "scopes = [\"read\"]")
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, &text).expect("write config");
    let cfg = cxgate::config::load(&path)
        .unwrap_or_else(|e| panic!("test config invalid: {:?}\n{text}", e.lines()));
    let gw = cxgate::start(cfg, Some(path), cxgate::Options::default())
        .await
        .expect("start gateway");
    (gw, dir)
}

async fn plain_get(gw: &cxgate::Running, path: &str) -> (StatusCode, Bytes) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let req = Request::get(format!("http://{}{path}", gw.addr))
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = client.request(req).await.expect("gateway answer");
    let status = resp.status();
    (
        status,
        resp.into_body().collect().await.expect("body").to_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_is_trusted_through_ca_file_and_only_then() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    std::env::set_var("CXGATE_TLS_TEST_TOKEN", ACCESS);
    let sim_opts = SimOptions {
        access_tokens: vec![ACCESS.to_string()],
        ..SimOptions::default()
    };
    let sim = common::spawn_sim(sim_opts).await;
    let (front, front_task) = https_front(sim.addr).await;
    let upstream = format!("https://localhost:{}", front.port());

    let (trusting, dir_a) = gateway_to(&upstream, Some(&tls_file("ca.pem"))).await;
    let (status, body) = plain_get(&trusting, "/me").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "expected /me over https with ca_file, saw {status}: {body:?}"
    );

    let (default_roots, dir_b) = gateway_to(&upstream, None).await;
    let (status, body) = plain_get(&default_roots, "/me/permissions").await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        status == StatusCode::BAD_GATEWAY && text.contains("upstream_unreachable"),
        "expected 502 upstream_unreachable for an upstream certificate no trusted root signed, \
         saw {status}: {text}"
    );

    for gw in [trusting, default_roots] {
        gw.shutdown();
        gw.stopped().await;
    }
    front_task.abort();
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir_a);
    let _ = std::fs::remove_dir_all(dir_b);
}

/// The end-entity certificate the gateway presents to a new connection.
async fn served_certificate(addr: SocketAddr) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in ["ca.pem", "renewed-ca.pem"] {
        for cert in CertificateDer::pem_file_iter(tls_file(ca)).expect("read a test CA") {
            roots
                .add(cert.expect("parse a test CA"))
                .expect("add a test CA");
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("TLS handshake with the gateway");
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

fn first_certificate(name: &str) -> Vec<u8> {
    CertificateDer::pem_file_iter(tls_file(name))
        .expect("read a test certificate")
        .next()
        .expect("one certificate")
        .expect("parse a test certificate")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_the_renewed_certificate_and_keeps_the_old_one_when_the_new_is_bad() {
    let dir = common::temp_dir("tls-renew");
    let (cert, key) = (dir.join("served-cert.pem"), dir.join("served-key.pem"));
    std::fs::copy(tls_file("cert.pem"), &cert).expect("copy cert.pem");
    std::fs::copy(tls_file("key.pem"), &key).expect("copy key.pem");
    let server = format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let clients = common::client_toml("test", KEY, "scopes = [\"read\"]");
    let env = common::start_custom(SimOptions::default(), &server, None, &clients, "").await;
    let reload = || async {
        env.send(http::Method::POST, &env.admin_url("/admin/reload"), &[], "")
            .await
    };
    let before = served_certificate(env.gw.addr).await;
    assert!(
        before == first_certificate("cert.pem"),
        "expected cert.pem served at start"
    );

    // The renewal lands in the same files, as certbot and cert-manager do it.
    std::fs::copy(tls_file("renewed-cert.pem"), &cert).expect("renew the cert");
    std::fs::copy(tls_file("renewed-key.pem"), &key).expect("renew the key");
    let answer = reload().await;
    assert_eq!(
        answer.status,
        StatusCode::OK,
        "expected the reload accepted, saw {} {:?}",
        answer.status,
        answer.body
    );
    let after = served_certificate(env.gw.addr).await;
    assert!(
        after == first_certificate("renewed-cert.pem"),
        "expected the renewed certificate served to a new connection after the reload"
    );

    // A key that does not match its certificate is refused, and the running pair stays.
    std::fs::copy(tls_file("key.pem"), &key).expect("a mismatched key");
    let answer = reload().await;
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert!(
        answer.status == StatusCode::BAD_REQUEST && text.contains("server.tls"),
        "expected 400 naming server.tls for a mismatched pair, saw {} {text}",
        answer.status
    );
    let still = served_certificate(env.gw.addr).await;
    assert!(
        still == first_certificate("renewed-cert.pem"),
        "expected the renewed certificate still served after the refused reload"
    );
    env.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}
