//! The admin listener: the status page at `/`, `/metrics`, `/healthz`, `/readyz` and
//! `/admin/*`.
//!
//! It runs on its own address so operators can firewall it separately from client
//! traffic. With `server.admin_token_env` set, `/admin/*` needs that bearer token, while the
//! probe and scrape endpoints stay open as Prometheus and orchestrators expect; the status
//! page (`page`) is behind the token like `/admin/*`, since it shows the same.

mod page;

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
    /// What the status page turns into rates.
    pub rates: page::Rates,
}

impl Admin {
    /// Answers one admin request; never fails.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "") => {
                if !self.authorised(&req) {
                    let mut resp = envelope(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "admin token required",
                    );
                    // A browser cannot send a bearer token from its address bar: it asks
                    // for a password (the admin token) instead.
                    resp.headers_mut().insert(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Basic realm=\"cxgate admin\", charset=\"UTF-8\""),
                    );
                    return resp;
                }
                self.page()
            }
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
                    (Method::POST, "/admin/budget/resume") => {
                        let was_paused = self.gateway.resume_budget().await;
                        tracing::warn!(was_paused, "admin: upstream pause ended by hand");
                        json_response(
                            StatusCode::OK,
                            json!({"resumed": true, "was_paused": was_paused}),
                        )
                    }
                    (_, "/admin/status") => wrong_method("GET"),
                    (_, "/admin/purge" | "/admin/reload" | "/admin/budget/resume") => {
                        wrong_method("POST")
                    }
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
        let presented = presented_token(req.headers()).unwrap_or_default();
        let (a, b) = (presented.as_slice(), expected.expose().as_bytes());
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
            "recent_errors": self.gateway.recent_errors(),
        })
    }

    /// The HTML status page.
    fn page(&self) -> Response<Body> {
        let html = page::render(
            &self.status(),
            &self.registry,
            &self.rates,
            self.started.elapsed(),
        );
        let mut resp = Response::new(Full::new(Bytes::from(html)));
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        // Nothing on the page comes from elsewhere, and nothing may.
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
            ),
        );
        resp
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
            Err(problems) => {
                // As a failed SIGHUP reload logs it: an operator reads the log, not the answer.
                tracing::error!(
                    ?problems,
                    "admin reload: config invalid; the running configuration stays"
                );
                let said = "configuration invalid; the running configuration stays";
                json_response(
                    StatusCode::BAD_REQUEST,
                    json!({
                        "meta": {"code": 400, "error_type": "bad_request", "error_message": said},
                        "error": "bad_request",
                        "error_description": said,
                        "problems": problems,
                    }),
                )
            }
        }
    }
}

/// 405 for an admin endpoint asked with another method, naming the one it takes.
fn wrong_method(allow: &'static str) -> Response<Body> {
    let mut resp = envelope(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("this admin endpoint takes {allow} only"),
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

/// The admin token a request presents: `Authorization: Bearer <token>`, or HTTP Basic with
/// the token as the password (any user name), which is what a browser can send.
fn presented_token(headers: &http::HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    if let Some(token) = value.strip_prefix(b"Bearer ") {
        return Some(token.to_vec());
    }
    let decoded = base64_decode(value.strip_prefix(b"Basic ")?)?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    Some(decoded[colon + 1..].to_vec())
}

/// Standard base64 (RFC 4648, with padding); `None` for anything else.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    let text = text.trim_ascii();
    if text.len() % 4 != 0 {
        return None;
    }
    let sextet = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for (i, quad) in text.chunks(4).enumerate() {
        let last = i == text.len() / 4 - 1;
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = n << 6 | sextet(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_what_browsers_send() {
        assert_eq!(
            base64_decode(b"YWRtaW46czNjcmV0").as_deref(),
            Some(&b"admin:s3cret"[..])
        );
        assert_eq!(base64_decode(b"OnQ=").as_deref(), Some(&b":t"[..]));
        assert_eq!(base64_decode(b"Og==").as_deref(), Some(&b":"[..]));
        assert_eq!(base64_decode(b"Og=").as_deref(), None);
        assert_eq!(base64_decode(b"O===").as_deref(), None);
        assert_eq!(base64_decode(b"Og==Og==").as_deref(), None);
    }

    #[test]
    fn the_token_comes_from_bearer_or_basic() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert_eq!(presented_token(&h).as_deref(), Some(&b"tok"[..]));
        // "anyone:tok"
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YW55b25lOnRvaw=="),
        );
        assert_eq!(presented_token(&h).as_deref(), Some(&b"tok"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!!!"),
        );
        assert_eq!(presented_token(&h), None);
    }
}
