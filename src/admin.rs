//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/admin/*` (CONTRACT 4).
//!
//! It runs on its own address so operators can firewall it separately from client
//! traffic. With `server.admin_token_env` set, `/admin/*` needs that bearer token, while the
//! probe and scrape endpoints stay open as Prometheus and orchestrators expect.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use prometheus::Registry;
use serde_json::{json, Value};

use crate::error::{envelope, Body};
use crate::proxy::Gateway;
use crate::replicas::Invalidation;

/// What the admin endpoints read and act on.
pub struct Admin {
    pub gateway: Gateway,
    pub registry: Registry,
    pub config_path: Option<PathBuf>,
    /// The admin token in force (a reload may set, change or remove it).
    pub live: Arc<crate::reload::Live>,
    pub started: Instant,
}

impl Admin {
    /// Answers one admin request; never fails.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::GET, "/metrics") => {
                let mut resp = Response::new(Full::new(Bytes::from(crate::metrics::render(
                    &self.registry,
                ))));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            (Method::GET, "/healthz") => json_response(StatusCode::OK, json!({"status": "ok"})),
            (Method::GET, "/readyz") => match self.gateway.token().readiness() {
                Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
                Err(reason) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "not_ready", "reason": reason}),
                ),
            },
            (method, p) if p.starts_with("/admin") => {
                if !self.authorised(&req) {
                    return envelope(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token required",
                    );
                }
                match (method, p) {
                    (Method::GET, "/admin/status") => json_response(StatusCode::OK, self.status()),
                    (Method::POST, "/admin/purge") => self.purge(req).await,
                    (Method::POST, "/admin/reload") => self.reload().await,
                    _ => envelope(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
                }
            }
            _ => envelope(StatusCode::NOT_FOUND, "not_found", "no such admin endpoint"),
        }
    }

    fn authorised(&self, req: &Request<Incoming>) -> bool {
        let Some(expected) = self.live.admin_token() else {
            return true;
        };
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let (a, b) = (presented.as_bytes(), expected.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    fn status(&self) -> Value {
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "token": self.gateway.token().status_json(),
            "budget": self.gateway.budget_status(),
            "cache": self.gateway.cache().stats_json(),
            "upstream": self.gateway.upstream_status(),
        })
    }

    async fn purge(&self, req: Request<Incoming>) -> Response<Body> {
        let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                return envelope(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "body unreadable or over 64 KiB",
                )
            }
        };
        let spec: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return envelope(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("invalid JSON: {e}"),
                )
            }
        };
        let cache = self.gateway.cache();
        // What the other replicas (if any) must drop too.
        let shared;
        let purged = if spec.get("all") == Some(&Value::Bool(true)) {
            shared = Invalidation::All;
            cache.purge_all().await
        } else if let Some(tags) = spec.get("tags").and_then(Value::as_array) {
            let tags: Option<Vec<String>> =
                tags.iter().map(|t| t.as_str().map(String::from)).collect();
            match tags {
                Some(tags) => {
                    let n = cache.invalidate_tags(&tags).await;
                    shared = Invalidation::Tags(tags);
                    n
                }
                None => {
                    return envelope(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "tags must be strings",
                    )
                }
            }
        } else if let Some(path) = spec.get("path").and_then(Value::as_str) {
            shared = Invalidation::Path(path.to_string());
            cache.purge_path(path).await
        } else {
            return envelope(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "expected {\"tags\":[...]}, {\"path\":\"/me\"} or {\"all\":true}",
            );
        };
        tracing::info!(purged, "admin purge");
        self.gateway.publish_invalidation(shared).await;
        json_response(StatusCode::OK, json!({ "purged": purged }))
    }

    async fn reload(&self) -> Response<Body> {
        match crate::reload::reload(&self.gateway, &self.live, self.config_path.as_deref()).await {
            Ok(notes) => json_response(StatusCode::OK, json!({"reloaded": true, "notes": notes})),
            Err(problems) => json_response(
                StatusCode::BAD_REQUEST,
                json!({
                    "meta": {"code": 400, "error_type": "bad_request", "error_message": "configuration invalid; the running configuration stays"},
                    "problems": problems,
                }),
            ),
        }
    }
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
