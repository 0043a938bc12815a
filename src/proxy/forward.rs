//! One exchange with the upstream: the request as the upstream must see it, and its answer
//! as the client may see it.
//!
//! Hop-by-hop headers go both ways; the client's credential never leaves; the held token
//! goes in as a sensitive header. The answer is read whole (bounded), its links rewritten
//! and its `X-RateLimit-*` headers kept for the budget, so what the cache stores and every
//! client gets is already safe to hand out.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;

use crate::error::GatewayError;
use crate::upstream::HttpClient;

/// Upstream answers larger than this are refused rather than buffered without bound.
pub const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// An upstream answer, read whole and filtered.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Time spent in upstream exchanges (both, when a 401 was replayed).
    pub upstream_time: Duration,
    /// Time spent waiting for budget before the first exchange.
    pub budget_wait: Duration,
    /// The body's bytes, held against `server.max_buffered_bytes` while the answer lives.
    pub held: super::Held,
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus the ones
/// the gateway owns on each side.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// What the upstream request is built from.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// The upstream URL: base + path + filtered query.
    pub url: &'a str,
    pub client_headers: &'a HeaderMap,
    pub body: Bytes,
    pub request_id: &'a HeaderValue,
}

/// Builds the upstream request with `token` injected.
pub fn build_request(
    out: &Outgoing<'_>,
    token: &str,
) -> Result<Request<Full<Bytes>>, GatewayError> {
    let mut req = Request::builder()
        .method(out.method.clone())
        .uri(out.url)
        .body(Full::new(out.body.clone()))
        .map_err(|_| GatewayError::BadRequest("request target cannot be forwarded"))?;
    let headers = req.headers_mut();
    for (name, value) in out.client_headers {
        headers.append(name.clone(), value.clone());
    }
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::CONTENT_LENGTH);
    // The client's conditional and range headers would make the upstream answer differently
    // from what every other client sharing this answer asked for.
    headers.remove(header::IF_NONE_MATCH);
    headers.remove(header::IF_MODIFIED_SINCE);
    headers.remove(header::RANGE);
    headers.remove(header::ACCEPT_ENCODING);
    headers.insert(
        HeaderName::from_static("x-request-id"),
        out.request_id.clone(),
    );
    let mut auth = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
        GatewayError::TokenUnavailable("held token is not a valid header value".into())
    })?;
    auth.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, auth);
    Ok(req)
}

/// Sends one request and reads the whole answer, within `timeout`, holding its bytes
/// against `buffers` (503 when they would pass `server.max_buffered_bytes`).
pub async fn exchange(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    buffers: &std::sync::Arc<super::Buffers>,
) -> Result<Fetched, GatewayError> {
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            let what = if e.is_connect() {
                "connect failed"
            } else {
                "connection failed"
            };
            GatewayError::UpstreamUnreachable(format!("{what}: {}", root_cause(&e)))
        })?;
        let (parts, body) = resp.into_parts();
        // What the upstream announces is held before a byte is read: an answer that cannot
        // fit is refused at once instead of after it has been read.
        let announced = hyper::body::Body::size_hint(&body)
            .lower()
            .min(MAX_UPSTREAM_BODY as u64);
        let held = buffers.hold(announced)?;
        let limit = MAX_UPSTREAM_BODY as u64;
        let body = super::buffers::collect(body, limit, None, &held, announced)
            .await
            .map_err(|e| match e {
                super::buffers::CollectError::Full => GatewayError::BuffersFull,
                super::buffers::CollectError::TooLarge => GatewayError::UpstreamUnreachable(
                    format!("answer body failed: larger than {MAX_UPSTREAM_BODY} bytes"),
                ),
                super::buffers::CollectError::Paused => {
                    GatewayError::UpstreamUnreachable("answer body stalled".into())
                }
                super::buffers::CollectError::Body(e) => {
                    GatewayError::UpstreamUnreachable(format!("answer body failed: {e}"))
                }
            })?;
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        Ok(Fetched {
            status: parts.status,
            headers,
            body,
            upstream_time: Duration::ZERO,
            budget_wait: Duration::ZERO,
            held,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "keep-alive, x-secret-hop".parse().unwrap(),
        );
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "only x-kept should remain, saw {h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn credential_is_replaced_by_the_held_token() {
        let mut client_headers = HeaderMap::new();
        client_headers.insert(header::AUTHORIZATION, "Bearer client-key".parse().unwrap());
        client_headers.insert(header::HOST, "gateway".parse().unwrap());
        client_headers.insert("x-app", "crm".parse().unwrap());
        let rid = HeaderValue::from_static("rid-1");
        let out = Outgoing {
            method: &Method::GET,
            url: "http://upstream.test/me",
            client_headers: &client_headers,
            body: Bytes::new(),
            request_id: &rid,
        };
        let req = build_request(&out, "held").unwrap();
        assert_eq!(req.headers()[header::AUTHORIZATION], "Bearer held");
        assert!(req.headers()[header::AUTHORIZATION].is_sensitive());
        assert!(
            req.headers().get(header::HOST).is_none(),
            "Host comes from the upstream URL"
        );
        assert_eq!(req.headers()["x-app"], "crm");
        assert_eq!(req.headers()["x-request-id"], "rid-1");
    }
}
