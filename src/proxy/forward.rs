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

/// The request headers the upstream may see (what the CX Social API reads). Everything
/// else a client sends stays behind: cookies, method-override headers (`X-HTTP-Method-Override`
/// and its kin, which would let a read-only client write), `X-Forwarded-*`, `Forwarded`,
/// `Authorization` (the gateway puts the held token there), `Accept-Encoding` (the gateway
/// must read the answer to rewrite and redact it) and anything unknown.
const FORWARDED: &[HeaderName] = &[
    header::ACCEPT,
    header::ACCEPT_LANGUAGE,
    header::CONTENT_TYPE,
    header::USER_AGENT,
];

/// Conditional-request headers: forwarded on writes only. A read's answer is shared with
/// every merged caller and stored for later ones, so it must not depend on one client's
/// validators (a 304 made for one client is no answer for another).
const CONDITIONAL: &[HeaderName] = &[
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
];

/// Whether a client request header goes upstream (`shared`: the answer is a read's).
/// `Content-Length` is written by the client library from the body it sends, and
/// `X-Request-Id` is set by the gateway.
pub(super) fn forwarded(name: &HeaderName, shared: bool) -> bool {
    FORWARDED.contains(name) || (!shared && CONDITIONAL.contains(name))
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
    let shared = out.method == Method::GET || out.method == Method::HEAD;
    for (name, value) in out.client_headers {
        if forwarded(name, shared) {
            headers.append(name.clone(), value.clone());
        }
    }
    // Hop-by-hop headers are not on the allowlist, but a `Connection` header may name one
    // that is (`Connection: accept-language`): such a header describes the connection.
    let named: Vec<HeaderName> = out
        .client_headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    headers.insert(
        HeaderName::from_static("x-request-id"),
        out.request_id.clone(),
    );
    // The same test as `/readyz`: a token it calls unusable is never sent, whatever a
    // header value would let through (spaces, tabs, non-ASCII).
    if !crate::token::sendable(token) {
        return Err(GatewayError::TokenUnavailable(
            crate::token::TokenError::Unsendable.to_string(),
        ));
    }
    let mut auth = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
        GatewayError::TokenUnavailable(crate::token::TokenError::Unsendable.to_string())
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
        if parts.status.is_informational() {
            // hyper hands on a 101 (and nothing else 1xx) as if final: no client asked to
            // switch protocols, so this is no answer.
            return Err(GatewayError::UpstreamUnreachable(format!(
                "the upstream answered with an interim status {} and no final answer",
                parts.status.as_u16()
            )));
        }
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let body = decoded(&mut headers, body, &held)?;
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

/// The body without its `Content-Encoding`, so link rewriting and token redaction see (and
/// the cache stores) what clients will read. gzip and deflate are decoded, bounded by
/// [`MAX_UPSTREAM_BODY`] (a zip bomb is refused, not inflated); any other coding cannot be
/// scanned, and an unscanned body is never passed on, so it is refused too. The decoded
/// bytes are held in `held` against `max_buffered_bytes` as they are produced (503 past it).
fn decoded(
    headers: &mut HeaderMap,
    body: Bytes,
    held: &super::Held,
) -> Result<Bytes, GatewayError> {
    let codings: Vec<String> = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_ascii_lowercase())
        .flat_map(|v| {
            v.split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty() && c != "identity")
        .collect();
    if codings.is_empty() {
        headers.remove(header::CONTENT_ENCODING);
        return Ok(body);
    }
    if codings.len() > 2 {
        return Err(GatewayError::UpstreamUnreachable(
            "the upstream answer is encoded more than twice".into(),
        ));
    }
    let mut current = body;
    // Codings are listed in the order they were applied: undo the last one first.
    for coding in codings.iter().rev() {
        current = inflate(coding, &current, held)?;
    }
    headers.remove(header::CONTENT_ENCODING);
    Ok(current)
}

fn inflate(coding: &str, data: &[u8], held: &super::Held) -> Result<Bytes, GatewayError> {
    use std::io::Read;
    let limit = MAX_UPSTREAM_BODY as u64;
    let mut out = Vec::new();
    let mut full = false;
    // Read a piece at a time, each held before it is kept, so many large decoded answers
    // cannot pass `max_buffered_bytes` between them.
    let mut read = |reader: &mut dyn Read, out: &mut Vec<u8>| -> std::io::Result<()> {
        out.clear();
        let mut reader = reader.take(limit + 1);
        let mut piece = vec![0u8; 64 << 10];
        loop {
            let n = reader.read(&mut piece)?;
            if n == 0 {
                return Ok(());
            }
            if held.grow(n as u64).is_err() {
                full = true;
                return Err(std::io::Error::other("max_buffered_bytes"));
            }
            out.extend_from_slice(&piece[..n]);
        }
    };
    let result = match coding {
        "gzip" | "x-gzip" => read(&mut flate2::read::MultiGzDecoder::new(data), &mut out),
        // "deflate" is zlib-wrapped (RFC 9110), but some servers send raw deflate.
        "deflate" => read(&mut flate2::read::ZlibDecoder::new(data), &mut out)
            .or_else(|_| read(&mut flate2::read::DeflateDecoder::new(data), &mut out)),
        other => {
            return Err(GatewayError::UpstreamUnreachable(format!(
                "the upstream answer uses a content coding the gateway cannot read ({})",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    if full {
        return Err(GatewayError::BuffersFull);
    }
    result.map_err(|e| {
        GatewayError::UpstreamUnreachable(format!("the upstream's {coding} body is corrupt: {e}"))
    })?;
    if out.len() as u64 > limit {
        return Err(GatewayError::UpstreamUnreachable(format!(
            "the upstream's {coding} body inflates past {MAX_UPSTREAM_BODY} bytes"
        )));
    }
    Ok(Bytes::from(out))
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
        client_headers.insert(header::ACCEPT, "application/json".parse().unwrap());
        client_headers.insert(header::COOKIE, "k=client-key".parse().unwrap());
        client_headers.insert("x-http-method-override", "DELETE".parse().unwrap());
        client_headers.insert(header::IF_NONE_MATCH, "\"v1\"".parse().unwrap());
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
        assert_eq!(req.headers()[header::ACCEPT], "application/json");
        assert_eq!(req.headers()["x-request-id"], "rid-1");
        let names: Vec<&str> = req.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["accept", "x-request-id", "authorization"],
            "expected only allowlisted headers to go upstream on a read, saw {names:?}"
        );
    }
}
