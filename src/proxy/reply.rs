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
    append_stored(entry, &mut headers);
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

/// The stored headers of the entry this thread has served twice in a row, parsed once:
/// the names looked up and the values checked, as [`StoredResponse::headers`] does on
/// every call. A hot key's hits clone them instead (a reference count each, on memory of
/// this thread's own).
struct Parsed {
    /// Held, so its block is neither freed nor its address reused while it is here.
    entry: StoredResponse,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// What a thread knows of the entries it served: the last one seen, and the parsed
/// headers of the last one seen twice in a row.
struct Recent {
    seen: (usize, u64),
    parsed: Option<Parsed>,
}

thread_local! {
    static RECENT: std::cell::RefCell<Recent> = const {
        std::cell::RefCell::new(Recent { seen: (0, u64::MAX), parsed: None })
    };
}

#[cfg(test)]
thread_local! {
    /// Times this thread parsed an entry's header lines for an answer.
    static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Appends `entry`'s stored headers to `out`.
///
/// Parsing them costs each line a name lookup, a value check and a slice of the block:
/// about 690 instructions a header under callgrind (`from_entry` 2,799 per hit for the
/// 1.5 KB answer's headers, 4,865 for the 64 KB one's three more), the largest part of a
/// hit's own work in the gateway. An entry served twice in a row by a thread is parsed once
/// more and kept, so a hot key's hits copy the parsed pairs; a thread whose hits spread
/// over many keys parses each as before and keeps nothing. The thread holds at most one
/// entry beyond the store's life of it: never served from there (only a lookup's own block
/// matches it), only freed later.
fn append_stored(entry: &StoredResponse, out: &mut HeaderMap) {
    let parse = |out: &mut HeaderMap| {
        #[cfg(test)]
        PARSES.with(|n| n.set(n.get() + 1));
        for (name, value) in entry.headers() {
            out.append(name, value);
        }
    };
    RECENT.with(|recent| {
        let Ok(mut recent) = recent.try_borrow_mut() else {
            return parse(out);
        };
        if let Some(parsed) = recent.parsed.as_ref().filter(|p| p.entry.same_block(entry)) {
            for (name, value) in &parsed.headers {
                out.append(name.clone(), value.clone());
            }
            return;
        }
        let identity = entry.identity();
        if recent.seen != identity {
            recent.seen = identity;
            return parse(out);
        }
        #[cfg(test)]
        PARSES.with(|n| n.set(n.get() + 1));
        let headers: Vec<_> = entry.headers().collect();
        for (name, value) in &headers {
            out.append(name.clone(), value.clone());
        }
        recent.parsed = Some(Parsed {
            entry: entry.clone(),
            headers,
        });
    })
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

    fn stored(serial: u64, etag: &'static str) -> StoredResponse {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::ETAG, HeaderValue::from_static(etag));
        headers.insert("x-custom", HeaderValue::from_static("kept"));
        let value = crate::cache::CachedResponse {
            status: StatusCode::OK,
            headers,
            body: Bytes::from_static(b"{}"),
            tags: Box::new([]),
            stored_at: tokio::time::Instant::now(),
            ttl: Duration::from_secs(60),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
        };
        StoredResponse::pack("GET /me", &value, &[], serial).expect("a block")
    }

    fn answer(entry: &StoredResponse) -> Vec<(String, String)> {
        let resp = from_entry(entry, Duration::ZERO, Ok(Duration::from_secs(60)));
        resp.headers()
            .iter()
            .map(|(n, v)| (n.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect()
    }

    #[test]
    fn a_hot_entrys_headers_are_parsed_once_not_on_every_hit() {
        let hot = stored(1, "\"a\"");
        let first = answer(&hot);
        let before = PARSES.with(|n| n.get());
        for _ in 0..50 {
            assert_eq!(answer(&hot), first, "expected the same answer on every hit");
        }
        let parses = PARSES.with(|n| n.get()) - before;
        assert!(
            parses <= 1,
            "expected a hot entry's header lines parsed at most once more over 50 hits, \
             saw {parses} parses"
        );
        assert!(
            first.contains(&("etag".into(), "\"a\"".into()))
                && first.contains(&("x-custom".into(), "kept".into())),
            "expected the stored headers in the answer, saw {first:?}"
        );
        // Another entry is answered with its own headers, never the kept ones, whether it is
        // seen once or becomes the hot one.
        let other = stored(2, "\"b\"");
        for _ in 0..3 {
            let got = answer(&other);
            assert!(
                got.contains(&("etag".into(), "\"b\"".into()))
                    && !got.contains(&("etag".into(), "\"a\"".into())),
                "expected the other entry's own ETag, saw {got:?}"
            );
        }
        assert_eq!(
            answer(&hot),
            first,
            "expected the first entry's headers again"
        );
    }

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
