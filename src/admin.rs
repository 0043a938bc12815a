//! The admin listener: the status page at `/`, `/metrics`, `/healthz`, `/readyz` and
//! `/admin/*`. It runs on its own address so operators can firewall it separately from client
//! traffic; `Admin::authorised` says which paths need the admin token.

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

use crate::error::{rescue, Body, Refusal};
use crate::proxy::Gateway;
use crate::replicas::Invalidation;

/// What the admin endpoints read and act on.
pub struct Admin {
    pub gateway: Gateway,
    pub registry: Registry,
    pub config_path: Option<PathBuf>,
    /// The admin token in force (a reload may set, change or remove it).
    pub live: Arc<crate::app::reload::Live>,
    pub started: Instant,
    /// What the status page turns into rates.
    pub rates: page::Rates,
}

/// Why the admin listener refused a request. It is answered by the same rescue point as
/// the client listener's errors ([`rescue`]), in the CX Social envelope.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No or the wrong admin token; `page`: for the status page, which a browser opens.
    #[error("admin token required")]
    Unauthorized { page: bool },
    #[error("{0}")]
    Misdirected(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("no such admin endpoint")]
    NotFound,
    /// An endpoint asked with another method than the one it takes.
    #[error("this admin endpoint takes {0} only")]
    WrongMethod(&'static str),
    #[error("body unreadable or over 64 KiB")]
    Unreadable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    #[error("{0}")]
    BadPurge(&'static str),
    /// A purge path no client request may have: it names no entry.
    #[error(
        "no request can have this purge path ({0}); name the path as a request does \
         (\"/me\", \"/12345/inbox/mentions\"): escapes are read as requests read them"
    )]
    BadPurgePath(String),
    #[error("configuration invalid; the running configuration stays")]
    Reload { problems: Vec<String> },
}

impl Refusal for AdminError {
    fn kind(&self) -> (StatusCode, &'static str) {
        match self {
            AdminError::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized"),
            AdminError::Misdirected(_) => (StatusCode::MISDIRECTED_REQUEST, "misdirected_request"),
            AdminError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            AdminError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            AdminError::WrongMethod(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            AdminError::Unreadable(_)
            | AdminError::Json(_)
            | AdminError::BadPurge(_)
            | AdminError::BadPurgePath(_)
            | AdminError::Reload { .. } => (StatusCode::BAD_REQUEST, "bad_request"),
        }
    }

    fn complete(&self, headers: &mut http::HeaderMap, body: &mut Value) {
        match self {
            // A browser cannot send a bearer token from its address bar: it asks for a
            // password (the admin token) instead.
            AdminError::Unauthorized { page: true } => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"cxgate admin\", charset=\"UTF-8\""),
                );
            }
            AdminError::WrongMethod(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            AdminError::Reload { problems } => body["problems"] = json!(problems),
            _ => {}
        }
    }
}

impl Admin {
    /// Answers one admin request; never fails.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        match self.answer(req).await {
            Ok(resp) => resp,
            Err(e) => rescue(&e),
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Result<Response<Body>, AdminError> {
        let path = req.uri().path().trim_end_matches('/').to_string();
        let method = req.method().clone();
        self.cross_site(&req, &path)?;
        Ok(match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "") => {
                if !self.authorised(&req) {
                    return Err(AdminError::Unauthorized { page: true });
                }
                self.page().await
            }
            (Method::GET | Method::HEAD, "/metrics") => {
                let mut resp = Response::new(Full::new(Bytes::from(crate::metrics::render(
                    &self.registry,
                ))));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            (Method::GET | Method::HEAD, "/healthz") => {
                json_response(StatusCode::OK, json!({"status": "ok"}))
            }
            (Method::GET | Method::HEAD, "/readyz") => match self.gateway.token().readiness() {
                Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
                Err(reason) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "not_ready", "reason": reason}),
                ),
            },
            (method, p) if p.starts_with("/admin") => {
                if !self.authorised(&req) {
                    return Err(AdminError::Unauthorized { page: false });
                }
                match (method, p) {
                    (Method::GET | Method::HEAD, "/admin/status") => {
                        json_response(StatusCode::OK, self.status().await)
                    }
                    (Method::POST, "/admin/purge") => self.purge(req).await?,
                    (Method::POST, "/admin/reload") => self.reload().await?,
                    (Method::POST, "/admin/budget/resume") => {
                        let was_paused = self.gateway.resume_budget().await;
                        tracing::warn!(was_paused, "admin: upstream pause ended by hand");
                        json_response(
                            StatusCode::OK,
                            json!({"resumed": true, "was_paused": was_paused}),
                        )
                    }
                    (_, "/admin/status") => return Err(AdminError::WrongMethod("GET, HEAD")),
                    (_, "/admin/purge" | "/admin/reload" | "/admin/budget/resume") => {
                        return Err(AdminError::WrongMethod("POST"))
                    }
                    _ => return Err(AdminError::NotFound),
                }
            }
            // The read endpoints answer HEAD as GET (RFC 9110 9.3.2); anything else is the
            // wrong method, not a missing endpoint.
            (_, "" | "/metrics" | "/healthz" | "/readyz") => {
                return Err(AdminError::WrongMethod("GET, HEAD"))
            }
            _ => return Err(AdminError::NotFound),
        })
    }

    /// Refuses what a web page elsewhere could make a browser send here (see
    /// [`host_refused`] and [`post_refused`]).
    fn cross_site(&self, req: &Request<Incoming>, path: &str) -> Result<(), AdminError> {
        // Probes reveal nothing and are often sent by names of their own (a container's
        // service name): they answer to any Host.
        if matches!(path, "/healthz" | "/readyz") {
            return Ok(());
        }
        let state = self.gateway.state();
        let names = &state.config.server.admin_hosts;
        if let Some(why) = host_refused(req, names) {
            tracing::warn!(why, "admin: request refused");
            return Err(AdminError::Misdirected(why));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            if let Some(why) = post_refused(req, path == "/admin/purge") {
                tracing::warn!(why, "admin: request refused");
                return Err(AdminError::Forbidden(why));
            }
        }
        Ok(())
    }

    /// With `server.admin_token_env` set, `/admin/*` needs that bearer token, while the
    /// probe and scrape endpoints stay open as Prometheus and orchestrators expect; the
    /// status page (`page`) is behind the token like `/admin/*`, since it shows the same.
    fn authorised(&self, req: &Request<Incoming>) -> bool {
        let Some(expected) = self.live.admin_token() else {
            return true;
        };
        let presented = presented_token(req.headers()).unwrap_or_default();
        let (a, b) = (presented.as_slice(), expected.expose().as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    async fn status(&self) -> Value {
        let budget = self.gateway.budget_status().await;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started.elapsed().as_secs(),
            "token": self.gateway.token().status_json(),
            "upstream": self.gateway.upstream_status(&budget),
            "budget": budget,
            "cache": self.gateway.cache().stats_json(),
            "shared_cache": match self.gateway.cache().shared() {
                Some(tier) => tier.status(),
                None => json!({"enabled": false}),
            },
            "redis": self.gateway.redis_status(),
            "recent_errors": self.gateway.recent_errors(),
        })
    }

    /// The HTML status page.
    async fn page(&self) -> Response<Body> {
        let html = page::render(
            &self.status().await,
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

    async fn purge(&self, req: Request<Incoming>) -> Result<Response<Body>, AdminError> {
        let body = Limited::new(req.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(AdminError::Unreadable)?
            .to_bytes();
        let spec: Value = serde_json::from_slice(&body).map_err(AdminError::Json)?;
        if !members_unique(&body) {
            // A JSON object keeps the last of two equal names: `{"tags":["me"],"tags":["x"]}`
            // would purge `x` alone, silently.
            return Err(AdminError::BadPurge("a purge body names each member once"));
        }
        check_purge(&spec)?;
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
                    let tags = self.gateway.purge_tags(tags).await;
                    let n = cache.invalidate_tags(&tags).await;
                    shared = Invalidation::Tags(tags);
                    n
                }
                None => return Err(AdminError::BadPurge("tags must be strings")),
            }
        } else if let Some(path) = spec.get("path").and_then(Value::as_str) {
            let path = purge_path(path)?;
            let purged = cache.purge_path(&path).await;
            shared = Invalidation::Path(path);
            purged
        } else {
            return Err(AdminError::BadPurge(
                "expected {\"tags\":[...]}, {\"path\":\"/me\"} or {\"all\":true}",
            ));
        };
        let all = shared == Invalidation::All;
        let published = self.gateway.publish_invalidation(shared).await;
        let answer = purge_answer(purged, all, cache.shared().is_some(), published.as_ref());
        tracing::info!(
            purged,
            shared = %answer["shared"],
            shared_purged = %answer["shared_purged"],
            invalidation = %answer["invalidation"],
            "admin purge"
        );
        Ok(json_response(StatusCode::OK, answer))
    }

    async fn reload(&self) -> Result<Response<Body>, AdminError> {
        match crate::app::reload::reload(&self.gateway, &self.live, self.config_path.as_deref())
            .await
        {
            Ok(notes) => Ok(json_response(
                StatusCode::OK,
                json!({"reloaded": true, "notes": notes}),
            )),
            Err(problems) => {
                // As a failed SIGHUP reload logs it: an operator reads the log, not the answer.
                tracing::error!(
                    ?problems,
                    "admin reload: config invalid; the running configuration stays"
                );
                Err(AdminError::Reload { problems })
            }
        }
    }
}

/// A purge names one thing: `{"all":true}`, `{"tags":[...]}` or `{"path":"/..."}`, and
/// nothing beside it, so no body is read as less than its sender meant (`{"tags":[..],
/// "all":true}` purging everything, a `path` with a query purging nothing: a path purge
/// drops every query of the path already, and the query is not part of what it matches).
/// Whether the top-level object of `body` (already parsed as JSON) names no member twice.
fn members_unique(body: &[u8]) -> bool {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut unique = true;
            while let Some(name) = map.next_key::<String>()? {
                unique &= seen.insert(name);
                map.next_value::<serde::de::IgnoredAny>()?;
            }
            Ok(unique)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    // Anything but an object is refused by `check_purge`.
    serde::Deserializer::deserialize_any(&mut de, Names).unwrap_or(true)
}

fn check_purge(spec: &Value) -> Result<(), AdminError> {
    const EXPECTED: &str = "expected exactly one of {\"tags\":[...]}, {\"path\":\"/me\"} \
                            or {\"all\":true}, and nothing else";
    let Some(members) = spec.as_object() else {
        return Err(AdminError::BadPurge(EXPECTED));
    };
    if members.len() != 1 {
        return Err(AdminError::BadPurge(EXPECTED));
    }
    match members.iter().next() {
        Some((name, Value::Bool(true))) if name == "all" => Ok(()),
        Some((name, Value::Array(_))) if name == "tags" => Ok(()),
        Some((name, Value::String(path))) if name == "path" => {
            if !path.starts_with('/') {
                Err(AdminError::BadPurge(
                    "a purge path starts with '/' (\"/me\")",
                ))
            } else if path.contains(['?', '#']) {
                Err(AdminError::BadPurge(
                    "a purge path is the path alone: every query of it is purged with it",
                ))
            } else {
                Ok(())
            }
        }
        _ => Err(AdminError::BadPurge(EXPECTED)),
    }
}

/// A purge path read as a request's path is read for its cache key
/// ([`crate::proxy::canonical_path`]: `/m%65` is `/me`), so it drops what a request of that
/// path is served from; one a request would be refused for (`//me`, `/me;x`, `/0123/x`)
/// is refused, not answered with nothing purged.
fn purge_path(path: &str) -> Result<String, AdminError> {
    let path =
        crate::proxy::canonical_path(path).map_err(|e| AdminError::BadPurgePath(e.to_string()))?;
    crate::auth::account_of(&path).map_err(|e| AdminError::BadPurgePath(e.0.to_string()))?;
    Ok(path.into_owned())
}

/// What `POST /admin/purge` answers: `purged`, the entries dropped from this replica's
/// memory; `shared`, what became of the shared cache tier's (`off` without one, `removed`
/// with `shared_purged` entries deleted there, `retired` for `{"all":true}`, which retires
/// every entry at once by the generation and counts none, `queued` while Redis does not
/// answer: applied when it is back); `invalidation`, how the other replicas took it (a
/// `cxgate_redis_invalidations_total` result, or `local` without replicas).
fn purge_answer(
    purged: u64,
    all: bool,
    tier: bool,
    published: Option<&crate::replicas::Published>,
) -> Value {
    let queued = published.is_some_and(|p| p.result == "queued");
    let shared = match (tier, queued, all) {
        (false, _, _) => "off",
        (true, true, _) => "queued",
        (true, false, true) => "retired",
        (true, false, false) => "removed",
    };
    let shared_purged = match shared {
        "removed" => published.and_then(|p| p.shared_removed),
        _ => None,
    };
    json!({
        "purged": purged,
        "shared": shared,
        "shared_purged": shared_purged,
        "invalidation": published.map_or("local", |p| p.result),
    })
}

/// The `Host` a request names (the `:authority` over HTTP/2), if any.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(v) => Some(v.to_str().unwrap_or("\u{0}")),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// Why a request's `Host` is not one of the admin listener's own names, against DNS
/// rebinding: a page on a name its owner points at 127.0.0.1 reaches this listener with
/// that name as its `Host`. Allowed are an IP address (v4, or v6 in brackets), `localhost`
/// and the names in `server.admin_hosts`, with any port (a port mapping may change it, and
/// a rebinding page cannot choose the name). A request without `Host` (HTTP/1.0) comes from
/// no browser and passes.
fn host_refused<B>(req: &Request<B>, names: &[String]) -> Option<&'static str> {
    // Two Host headers, or an absolute-form target naming another host than Host, are
    // refused (RFC 9112 3.2): whichever one a check read, the other could name anything.
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Some("the request carries more than one Host header");
    }
    if let Some(target) = req.uri().authority() {
        if let Some(reason) = authority_refused(target.as_str(), names) {
            return Some(reason);
        }
    }
    authority_refused(request_host(req)?, names)
}

/// [`host_refused`] for one authority (`host[:port]`).
fn authority_refused(authority: &str, names: &[String]) -> Option<&'static str> {
    let host = match authority.strip_prefix('[') {
        Some(rest) => {
            let Some((inside, after)) = rest.split_once(']') else {
                return Some("the Host header's IPv6 address is not closed by ']'");
            };
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
                return Some("the Host header's port is not a number");
            }
            return match inside.parse::<std::net::Ipv6Addr>() {
                Ok(_) => None,
                Err(_) => Some("the Host header names no IPv6 address in its brackets"),
            };
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return Some("the Host header's port is not a number"),
            None => authority,
        },
    };
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if host.parse::<std::net::Ipv4Addr>().is_ok() || host == "localhost" || names.contains(&host) {
        return None;
    }
    Some(
        "the Host header is not an address of the admin listener (an IP address, localhost or \
         a name in server.admin_hosts)",
    )
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Why an admin `POST` looks like one a page elsewhere made a browser send (CSRF): a
/// browser attaches remembered Basic credentials to it, and with no admin token none are
/// needed. Refused are an `Origin` other than this listener's own (`http://` and the
/// `Host`, `null` included), `Sec-Fetch-Site: cross-site` or `same-site`, and a
/// `Content-Type` other than `application/json` (which no form or simple request can send);
/// `json_body` endpoints must send that type.
fn post_refused<B>(req: &Request<B>, json_body: bool) -> Option<&'static str> {
    let headers = req.headers();
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = request_host(req).map(|h| format!("http://{h}"));
        let same = own.is_some_and(|own| origin.as_bytes().eq_ignore_ascii_case(own.as_bytes()));
        if !same {
            return Some("cross-origin admin requests are refused (Origin is not this listener)");
        }
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site.eq_ignore_ascii_case(b"cross-site") || site.eq_ignore_ascii_case(b"same-site") {
            return Some("cross-site admin requests are refused (Sec-Fetch-Site)");
        }
    }
    let json = |v: &HeaderValue| {
        let media = v.to_str().unwrap_or("").split(';').next().unwrap_or("");
        media.trim().eq_ignore_ascii_case("application/json")
    };
    match headers.get(header::CONTENT_TYPE) {
        Some(v) if !json(v) => {
            Some("admin requests with a body must be Content-Type: application/json")
        }
        None if json_body => Some("this admin endpoint needs Content-Type: application/json"),
        _ => None,
    }
}

/// The admin token a request presents: `Authorization: Bearer <token>`, or HTTP Basic with
/// the token as the password (any user name), which is what a browser can send. The scheme
/// is matched in any case (`bearer`, `BEARER`), as RFC 9110 has it.
fn presented_token(headers: &http::HeaderMap) -> Option<Vec<u8>> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = (&value[..space], &value[space..]);
    let credentials = rest.trim_ascii_start();
    if scheme.eq_ignore_ascii_case(b"bearer") {
        return Some(credentials.to_vec());
    }
    if !scheme.eq_ignore_ascii_case(b"basic") {
        return None;
    }
    let decoded = base64_decode(credentials)?;
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

    fn req(host: Option<&str>, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/admin/purge");
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn only_the_listeners_own_names_are_served() {
        let names = vec!["gw.internal".to_string()];
        for ok in [
            None,
            Some("127.0.0.1:9090"),
            Some("10.1.2.3"),
            Some("[::1]:9090"),
            Some("localhost:9090"),
            Some("LOCALHOST."),
            Some("gw.internal:9090"),
        ] {
            assert_eq!(
                host_refused(&req(ok, &[]), &names),
                None,
                "expected {ok:?} served"
            );
        }
        for bad in [
            "evil.example:9090",
            "127.0.0.1.nip.io:9090",
            "localhost.evil.example",
            "127.0.0.1:x",
            "[::1",
            "[evil]:9090",
            "gw.internal.evil:9090",
            "",
        ] {
            assert!(
                host_refused(&req(Some(bad), &[]), &names).is_some(),
                "expected Host {bad:?} refused"
            );
        }
        let mut two = req(Some("localhost"), &[]);
        two.headers_mut()
            .append(header::HOST, HeaderValue::from_static("evil.example"));
        assert!(
            host_refused(&two, &names).is_some(),
            "expected two Host headers refused"
        );
        let mut absolute = req(Some("localhost"), &[]);
        *absolute.uri_mut() = "http://evil.example/admin/status".parse().expect("uri");
        assert!(
            host_refused(&absolute, &names).is_some(),
            "expected an absolute-form target naming another host refused"
        );
    }

    #[test]
    fn posts_a_browser_could_send_cross_site_are_refused() {
        let host = Some("127.0.0.1:9090");
        let json = ("content-type", "application/json; charset=utf-8");
        assert_eq!(post_refused(&req(host, &[json]), true), None);
        assert_eq!(
            post_refused(
                &req(
                    host,
                    &[
                        json,
                        ("origin", "http://127.0.0.1:9090"),
                        ("sec-fetch-site", "same-origin")
                    ]
                ),
                true
            ),
            None
        );
        assert_eq!(
            post_refused(&req(host, &[]), false),
            None,
            "a bodyless POST from curl"
        );
        for (what, headers, json_body) in [
            (
                "foreign origin",
                vec![json, ("origin", "http://evil.example")],
                true,
            ),
            ("null origin", vec![json, ("origin", "null")], true),
            (
                "https origin",
                vec![json, ("origin", "https://127.0.0.1:9090")],
                true,
            ),
            (
                "cross-site",
                vec![json, ("sec-fetch-site", "cross-site")],
                true,
            ),
            (
                "same-site",
                vec![json, ("sec-fetch-site", "same-site")],
                true,
            ),
            (
                "form",
                vec![("content-type", "application/x-www-form-urlencoded")],
                false,
            ),
            ("text", vec![("content-type", "text/plain")], true),
            ("no type", vec![], true),
        ] {
            assert!(
                post_refused(&req(host, &headers), json_body).is_some(),
                "expected a POST with {what} refused"
            );
        }
    }

    #[test]
    fn the_token_comes_from_bearer_or_basic() {
        let mut h = http::HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer tok"),
        );
        assert_eq!(presented_token(&h).as_deref(), Some(&b"tok"[..]));
        for spelling in ["bearer tok", "BEARER tok", "bEaReR  tok"] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(spelling));
            assert_eq!(
                presented_token(&h).as_deref(),
                Some(&b"tok"[..]),
                "expected the scheme of {spelling:?} matched in any case"
            );
        }
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearertok"));
        assert_eq!(
            presented_token(&h),
            None,
            "expected no scheme without a space"
        );
        // "anyone:tok"
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("basic YW55b25lOnRvaw=="),
        );
        assert_eq!(presented_token(&h).as_deref(), Some(&b"tok"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic !!!!"),
        );
        assert_eq!(presented_token(&h), None);
    }
}
