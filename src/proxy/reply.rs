//! Building client responses: from an upstream answer or a cache entry, with the
//! `Cache-Status` (RFC 9211) and `Age` headers of README "Pointing a service at it".

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::cache::StoredResponse;
use crate::error::Body;
use crate::header_number::header_number;

pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// How a fetched answer reached the client, for `Cache-Status` and the `cache` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Cacheable route, nothing usable stored.
    Miss,
    /// The client asked to refetch (`Cache-Control: no-cache`).
    Request,
    /// The route is not cacheable (or the client said `no-store`).
    Bypass,
}

/// `Cache-Status` for an answer that went upstream (or shared another request's call).
pub fn forward_status(
    fwd: Forward,
    status: StatusCode,
    stored: bool,
    collapsed: bool,
) -> HeaderValue {
    let kind = match fwd {
        Forward::Miss => "uri-miss",
        Forward::Request => "request",
        Forward::Bypass => "bypass",
    };
    let mut text = format!("cxgate; fwd={kind}; fwd-status={}", status.as_u16());
    if stored {
        text.push_str("; stored");
    }
    // `collapsed` (RFC 9211) says the request joined another one's cache fill. A route that
    // is not cacheable has no fill to join: it shared one upstream answer, and says that.
    match (collapsed, fwd) {
        (true, Forward::Bypass) => text.push_str("; detail=merged"),
        (true, _) => text.push_str("; collapsed"),
        (false, _) => {}
    }
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("cxgate"))
}

/// `Cache-Status` for a miss collapsed into another replica's fill of the key, its answer
/// taken from the shared tier: `cxgate; fwd=uri-miss; fwd-status=200; collapsed;
/// detail=shared`.
pub fn filled_elsewhere_status(status: StatusCode) -> HeaderValue {
    let text = format!(
        "cxgate; fwd=uri-miss; fwd-status={}; collapsed; detail=shared",
        status.as_u16()
    );
    HeaderValue::try_from(text).unwrap_or_else(|_| HeaderValue::from_static("cxgate"))
}

/// The `cache` metric label for an answer that went upstream.
pub fn forward_label(fwd: Forward, collapsed: bool) -> &'static str {
    match (fwd, collapsed) {
        (Forward::Bypass, _) => "bypass",
        (_, true) => "collapsed",
        _ => "miss",
    }
}

/// A response from upstream status, headers and body; `x-ratelimit-*` stay inside (they
/// describe the shared token, not this client).
pub fn from_parts(status: StatusCode, headers: &HeaderMap, body: &Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.clone()));
    *resp.status_mut() = status;
    let out = resp.headers_mut();
    out.reserve(headers.len() + 4);
    for (name, value) in headers {
        if !name.as_str().starts_with("x-ratelimit-") {
            out.append(name.clone(), value.clone());
        }
    }
    resp
}

/// A hit: fresh (`remaining` left) or stale (`past` its ttl). Stored headers and body are
/// slices of the entry's block, so a hit copies no header value and no body byte.
pub fn from_entry(
    entry: &StoredResponse,
    age: Duration,
    fresh_for: Result<Duration, Duration>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(entry.body()));
    *resp.status_mut() = entry.status();
    // Room for what the gateway adds: Cache-Status, Age, X-Request-Id, the two rate-limit
    // headers and the API's three X-RateLimit-*, so none of them grows the map.
    let mut headers = HeaderMap::with_capacity(entry.header_count() + 8);
    for (name, value) in entry.headers() {
        headers.append(name, value);
    }
    // Written on the stack (the only allocation is the header value's own), as every hit
    // writes one.
    let mut secs = itoa::Buffer::new();
    let mut text = [0u8; 64];
    let parts: [&[u8]; 3] = match fresh_for {
        Ok(remaining) => [
            b"cxgate; hit; ttl=",
            secs.format(remaining.as_secs()).as_bytes(),
            b"",
        ],
        Err(past) => [
            b"cxgate; hit; ttl=-",
            secs.format(past.as_secs().max(1)).as_bytes(),
            b"; detail=stale",
        ],
    };
    let mut len = 0;
    for part in parts {
        text[len..len + part.len()].copy_from_slice(part);
        len += part.len();
    }
    if let Ok(v) = HeaderValue::from_bytes(&text[..len]) {
        headers.insert(CACHE_STATUS.clone(), v);
    }
    headers.insert(header::AGE, header_number(age.as_secs()));
    *resp.headers_mut() = headers;
    resp
}

/// Says in `Cache-Status` that a fresh hit came from the shared tier (another replica's
/// fetch, or this one's before a restart): `cxgate; hit; ttl=N; detail=shared`.
pub fn mark_shared(resp: &mut Response<Body>) {
    let Some(status) = resp.headers().get(&CACHE_STATUS) else {
        return;
    };
    let marked = format!(
        "{}; detail=shared",
        String::from_utf8_lossy(status.as_bytes())
    );
    if let Ok(v) = HeaderValue::try_from(marked) {
        resp.headers_mut().insert(CACHE_STATUS.clone(), v);
    }
}

/// The headers worth storing with an entry: the upstream's, less its `x-ratelimit-*`.
pub fn storable_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !name.as_str().starts_with("x-ratelimit-") {
            // hyper's header values are slices of the connection's read buffer: a clone
            // would keep that whole buffer alive for as long as the entry lives.
            let mut owned =
                HeaderValue::from_bytes(value.as_bytes()).unwrap_or_else(|_| value.clone());
            owned.set_sensitive(value.is_sensitive());
            out.append(name.clone(), owned);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_status_texts_follow_the_contract() {
        let s = forward_status(Forward::Miss, StatusCode::OK, true, false);
        assert_eq!(s, "cxgate; fwd=uri-miss; fwd-status=200; stored");
        let s = forward_status(Forward::Miss, StatusCode::OK, false, true);
        assert_eq!(s, "cxgate; fwd=uri-miss; fwd-status=200; collapsed");
        let s = forward_status(Forward::Bypass, StatusCode::CREATED, false, false);
        assert_eq!(s, "cxgate; fwd=bypass; fwd-status=201");
        assert_eq!(forward_label(Forward::Bypass, false), "bypass");
        assert_eq!(forward_label(Forward::Miss, true), "collapsed");
    }
}
