//! A tiny OAuth token endpoint on 127.0.0.1:0 for the tests.
//!
//! The endpoint behaves like CX Social's: each refresh token works exactly once (a reused
//! one gets 400 `invalid_grant`), answers may be enveloped, and failures can be queued.
//! It records what it saw so tests can prove what reached it.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::token::{OAuthMethod, OAuthSettings, TokenSettings};
use crate::upstream::HttpClient;

pub const CLIENT_ID: &str = "cid";
pub const CLIENT_SECRET: &str = "client-secret-value";
pub const SECRET_ENV: &str = "TEST_CX_CLIENT_SECRET";
pub const GOOD_CODE: &str = "good-code";

/// The environment the tests pretend to have.
pub fn env(name: &str) -> Option<String> {
    (name == SECRET_ENV).then(|| CLIENT_SECRET.to_string())
}

/// Decoded name/value pairs.
pub type Params = Vec<(String, String)>;

/// What the endpoint knows and has seen.
#[derive(Default)]
pub struct Endpoint {
    pub valid_refresh: HashSet<String>,
    pub spent_refresh: HashSet<String>,
    pub issued: u64,
    pub calls: u64,
    pub reuse_seen: bool,
    /// Statuses to answer the next refresh calls with, before behaving again.
    pub fail_next: VecDeque<u16>,
    pub envelope: bool,
    pub expires_in: u64,
    pub delay: Duration,
    /// When each call arrived, on tokio's (possibly paused) clock.
    pub arrivals: Vec<tokio::time::Instant>,
    /// (method, query parameters, body parameters) per call.
    pub seen: Vec<(String, Params, Params)>,
}

pub struct TokenServer {
    pub addr: SocketAddr,
    pub endpoint: Arc<Mutex<Endpoint>>,
}

impl TokenServer {
    pub async fn start(first_refresh: &str, expires_in: u64) -> TokenServer {
        let mut endpoint = Endpoint {
            expires_in,
            ..Endpoint::default()
        };
        endpoint.valid_refresh.insert(first_refresh.to_string());
        let endpoint = Arc::new(Mutex::new(endpoint));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the test token endpoint");
        let addr = listener.local_addr().expect("the bound address");
        let shared = Arc::clone(&endpoint);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(Arc::clone(&shared), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TokenServer { addr, endpoint }
    }

    pub fn state(&self) -> MutexGuard<'_, Endpoint> {
        self.endpoint.lock().expect("endpoint state")
    }

    pub fn oauth(&self, method: OAuthMethod) -> OAuthSettings {
        OAuthSettings {
            token_url: format!("http://{}/oauth/access_token/", self.addr),
            client_id: CLIENT_ID.to_string(),
            client_secret_env: SECRET_ENV.to_string(),
            method,
        }
    }

    pub fn settings(&self, file: PathBuf, refresh_before: Duration) -> TokenSettings {
        TokenSettings {
            file: Some(file),
            access_token_env: None,
            refresh_before,
            oauth: Some(self.oauth(OAuthMethod::Post)),
            client_keys: Vec::new(),
        }
    }
}

pub fn client() -> HttpClient {
    crate::upstream::build_client(None, Duration::from_secs(3)).expect("building the client")
}

fn json(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    response
}

async fn answer(
    shared: Arc<Mutex<Endpoint>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = req.method().to_string();
    let query: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
            .into_owned()
            .collect();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    let delay = {
        let mut ep = shared.lock().expect("endpoint state");
        ep.calls += 1;
        ep.arrivals.push(tokio::time::Instant::now());
        ep.seen.push((method, query.clone(), form.clone()));
        ep.delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let params = if form.is_empty() { query } else { form };
    let get = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let mut ep = shared.lock().expect("endpoint state");
    if get("client_id") != CLIENT_ID || get("client_secret") != CLIENT_SECRET {
        return Ok(json(401, serde_json::json!({"error": "invalid_client"})));
    }
    let allowed = match get("grant_type").as_str() {
        "refresh_token" => {
            if let Some(status) = ep.fail_next.pop_front() {
                return Ok(json(status, serde_json::json!({"error": "server_error"})));
            }
            let token = get("refresh_token");
            if ep.spent_refresh.contains(&token) {
                ep.reuse_seen = true;
            }
            let ok = ep.valid_refresh.remove(&token);
            if ok {
                ep.spent_refresh.insert(token);
            }
            ok
        }
        "authorization_code" => get("code") == GOOD_CODE,
        _ => false,
    };
    if !allowed {
        return Ok(json(
            400,
            serde_json::json!({"error": "invalid_grant", "error_description": "refresh token unknown or used"}),
        ));
    }
    ep.issued += 1;
    let n = ep.issued;
    let refresh = format!("refresh-token-{n:04}");
    ep.valid_refresh.insert(refresh.clone());
    let token = serde_json::json!({
        "access_token": format!("access-token-{n:04}"),
        "expires_in": ep.expires_in,
        "refresh_token": refresh,
        "scope": "accounts_read",
    });
    let body = if ep.envelope {
        serde_json::json!({"meta": {"code": 200}, "response": token})
    } else {
        token
    };
    Ok(json(200, body))
}
