//! One exchange with the upstream: the request as the upstream must see it, and its answer
//! as the client may see it. The client's credential never leaves, and the answer is read
//! whole and bounded ([`build_request`], [`exchange`], [`Fetched`]).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;

use crate::error::{GatewayError, Unreachable};
use crate::upstream::HttpClient;

/// Upstream answers larger than this are refused rather than buffered without bound.
pub const MAX_UPSTREAM_BODY: usize = 64 << 20;

/// An upstream answer, read whole (bounded) and filtered: its `X-RateLimit-*` headers are
/// kept for the budget, and its links are rewritten before the cache or a client sees it,
/// so what the cache stores and every client gets is already safe to hand out.
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
    /// Headers and body as the shared cache tier keeps them (links at the upstream's base),
    /// when they differ from `headers` and `body` (this replica's own form).
    pub neutral: Option<Box<(HeaderMap, Bytes)>>,
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

/// The headers every `Connection` header names (RFC 9110 7.6.1), read from the bytes: a
/// value that is not visible ASCII throughout (`Connection: accept-language, é`) still
/// names the headers it lists.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
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

/// Conditional-request headers: forwarded as they came. A cacheable read's call is made
/// without them (the read path takes them out and answers them from the answer it got,
/// see [`conditional`]): its answer is shared with every merged caller and stored for
/// later ones, so it must not depend on one client's validators. `Range` never goes
/// upstream (every answer is whole, and one stored serves every later read), so neither
/// does `If-Range`, which means nothing without it (RFC 9110 13.1.5).
pub(super) const CONDITIONAL: &[HeaderName] = &[
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
];

/// Whether a client request header goes upstream. `Content-Length` is written by the
/// client library from the body it sends, and `X-Request-Id` is set by the gateway.
pub(super) fn forwarded(name: &HeaderName) -> bool {
    FORWARDED.contains(name) || CONDITIONAL.contains(name)
}

/// Whether a request header named `name` can reach the upstream at all, so can have made
/// its answer what it is: what a `Vary` naming it may select variants by (see
/// `crate::cache`).
pub fn sent_upstream(name: &HeaderName) -> bool {
    forwarded(name)
}

/// What a client's conditions make of a `200` the cache holds or a cacheable read got, as
/// nginx and Varnish answer them: `If-None-Match` (weak comparison, `*` matches any)
/// and, without it, `If-Modified-Since` equal to the answer's `Last-Modified` give `304`;
/// an `If-Match` that names none of the answer's tags (strong comparison) gives `412`.
/// `If-Unmodified-Since` is not evaluated on such reads (the full answer is sent). `None`: answer as usual.
pub(super) fn conditional(request: &HeaderMap, answer: &HeaderMap) -> Option<StatusCode> {
    // Most requests ask nothing: then no answer header needs reading.
    let asks = [
        header::IF_MATCH,
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
    ];
    if !asks.iter().any(|name| request.contains_key(name)) {
        return None;
    }
    let etag = answer.get(header::ETAG).and_then(|v| v.to_str().ok());
    let tags = |name: HeaderName| -> Option<Vec<String>> {
        let values: Vec<String> = request
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|t| t.trim().to_string()))
            .filter(|t| !t.is_empty())
            .collect();
        (!values.is_empty()).then_some(values)
    };
    if let Some(wanted) = tags(header::IF_MATCH) {
        let strong = etag.filter(|e| !e.starts_with("W/"));
        let any = wanted.iter().any(|t| t == "*") && etag.is_some();
        if !any && !strong.is_some_and(|e| wanted.iter().any(|t| t == e)) {
            return Some(StatusCode::PRECONDITION_FAILED);
        }
    }
    if let Some(held) = tags(header::IF_NONE_MATCH) {
        let weak = |t: &str| t.trim_start_matches("W/").to_string();
        let matched = held.iter().any(|t| t == "*" && etag.is_some())
            || etag.is_some_and(|e| held.iter().any(|t| weak(t) == weak(e)));
        return matched.then_some(StatusCode::NOT_MODIFIED);
    }
    let since = request
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok());
    let modified = answer
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok());
    match (since, modified) {
        (Some(since), Some(modified)) if since.trim() == modified.trim() => {
            Some(StatusCode::NOT_MODIFIED)
        }
        _ => None,
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

/// Builds the upstream request with `token` injected: hop-by-hop headers are dropped, the
/// client's credential never leaves, and the held token goes in as a sensitive header.
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
        if forwarded(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    // Hop-by-hop headers are not on the allowlist, but a `Connection` header may name one
    // that is (`Connection: accept-language`): such a header describes the connection.
    for name in connection_named(out.client_headers) {
        headers.remove(name);
    }
    headers.insert(
        HeaderName::from_static("x-request-id"),
        out.request_id.clone(),
    );
    // The same test as `/readyz`: a token it calls unusable is never sent, whatever a
    // header value would let through (spaces, tabs, non-ASCII).
    if !crate::token::sendable(token) {
        return Err(crate::token::TokenError::Unsendable.into());
    }
    let mut auth = HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| GatewayError::from(crate::token::TokenError::Unsendable))?;
    auth.set_sensitive(true);
    headers.insert(header::AUTHORIZATION, auth);
    Ok(req)
}

/// Sends one request and reads the whole answer, within `timeout`, holding its bytes
/// against `buffers` (503 when they would pass `server.max_buffered_bytes`). The answer
/// loses its hop-by-hop headers, as the request did.
pub async fn exchange(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
    timeout: Duration,
    buffers: &std::sync::Arc<super::Buffers>,
) -> Result<Fetched, GatewayError> {
    let write = !matches!(*req.method(), Method::GET | Method::HEAD);
    let work = async {
        let resp = client.request(req).await.map_err(|e| {
            let what = if e.is_connect() {
                "connect failed"
            } else if write {
                // The connection was up, so the request (or part of it) went out: the
                // upstream may have acted on it even though no answer came back.
                "the connection failed after the request was sent, so the write may have \
                 been applied upstream; do not retry it blindly"
            } else {
                "connection failed"
            };
            let what = format!("{what}: {}", root_cause(&e));
            GatewayError::from(Unreachable::caused(what, e))
        })?;
        let (parts, body) = resp.into_parts();
        // What the upstream announces is held before a byte is read: an answer that cannot
        // fit (in `max_buffered_bytes`: 503, or past the answer bound: 502) is refused at
        // once instead of after it has been read.
        let announced = hyper::body::Body::size_hint(&body).lower();
        let held = buffers.hold(announced)?;
        let limit = MAX_UPSTREAM_BODY as u64;
        if announced > limit {
            return Err(GatewayError::unreachable(format!(
                "answer body refused: its Content-Length is larger than {MAX_UPSTREAM_BODY} bytes"
            )));
        }
        let body = super::buffers::collect(body, limit, None, &held, announced)
            .await
            .map_err(|e| match e {
                super::buffers::CollectError::Full => GatewayError::BuffersFull,
                super::buffers::CollectError::TooLarge => GatewayError::unreachable(format!(
                    "answer body failed: larger than {MAX_UPSTREAM_BODY} bytes"
                )),
                super::buffers::CollectError::Paused => {
                    GatewayError::unreachable("answer body stalled")
                }
                super::buffers::CollectError::Body(e) => {
                    Unreachable::caused(format!("answer body failed: {e}"), e).into()
                }
            })?;
        if parts.status.as_u16() > 599 {
            // HTTP status codes end at 599; hyper reads any three digits. Such an answer is
            // no answer to pass on, as nginx refuses an invalid status line.
            return Err(GatewayError::unreachable(format!(
                "the upstream answered with status {}, outside 100-599",
                parts.status.as_u16()
            )));
        }
        if parts.status.is_informational() {
            // hyper hands on a 101 (and nothing else 1xx) as if final: no client asked to
            // switch protocols, so this is no answer.
            return Err(GatewayError::unreachable(format!(
                "the upstream answered with an interim status {} and no final answer",
                parts.status.as_u16()
            )));
        }
        let mut headers = parts.headers;
        // Transfer codings are hop-by-hop, but what they did to the body is not: hyper
        // undoes `chunked` only, so any other (`gzip`, `gzip, chunked`) is undone here.
        let transfer = codings(&headers, header::TRANSFER_ENCODING);
        strip_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        let body = decoded(&mut headers, transfer, body, &held)?;
        Ok(Fetched {
            status: parts.status,
            headers,
            body,
            upstream_time: Duration::ZERO,
            budget_wait: Duration::ZERO,
            held,
            neutral: None,
        })
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(GatewayError::UpstreamTimeout(timeout)),
    }
}

/// Codings are applied at most this many times in all (transfer and content): enough for
/// any real server, and a bound on the work a hostile one can ask for.
const MAX_CODINGS: usize = 4;

/// The codings a header lists, in the order they were applied, lower-cased; `identity`
/// (no coding) and, for `Transfer-Encoding`, `chunked` (undone by hyper) are left out.
fn codings(headers: &HeaderMap, name: HeaderName) -> Vec<String> {
    headers
        .get_all(&name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_ascii_lowercase())
        .flat_map(|v| {
            v.split(',')
                .map(|c| c.split(';').next().unwrap_or("").trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|c| !c.is_empty() && c != "identity" && c != "chunked")
        .collect()
}

/// The body as clients will read it, so link rewriting and token redaction see (and the
/// cache stores) what they get. The rule: every coding listed is undone, last applied
/// first: the transfer codings (`Transfer-Encoding` other than `chunked`) and then the
/// content codings (`Content-Encoding`), at most [`MAX_CODINGS`] in all and each bounded
/// by [`MAX_UPSTREAM_BODY`] (a zip bomb is refused, not inflated). A coding the gateway
/// cannot decode (anything but gzip and deflate) is refused (502), and so is a body that
/// still starts like gzip or zlib data once every listed coding is undone, whatever it
/// was labelled (unlabelled, `identity`, or compressed more times than it says): such a
/// body cannot be scanned, and an unscanned body is never passed on. The decoded bytes
/// are held in `held` against `max_buffered_bytes` as they are produced (503 past it).
fn decoded(
    headers: &mut HeaderMap,
    transfer: Vec<String>,
    body: Bytes,
    held: &super::Held,
) -> Result<Bytes, GatewayError> {
    let content = codings(headers, header::CONTENT_ENCODING);
    headers.remove(header::CONTENT_ENCODING);
    if transfer.len() + content.len() > MAX_CODINGS {
        return Err(GatewayError::unreachable(format!(
            "the upstream answer is encoded more than {MAX_CODINGS} times"
        )));
    }
    let mut current = body;
    // Transfer codings were applied last (on the wire), so they are undone first; within
    // each list, the last one listed was applied last.
    for coding in transfer.iter().rev().chain(content.iter().rev()) {
        current = inflate(coding, &current, held)?;
    }
    if looks_compressed(&current) {
        return Err(GatewayError::unreachable(
            "the upstream answer is still compressed after undoing the codings it lists, \
             so it cannot be scanned",
        ));
    }
    Ok(current)
}

/// Whether `data` starts like a gzip member (`1f 8b 08`) or a zlib stream (a deflate CMF
/// byte whose header check passes and that inflates), the two formats a server sends
/// compressed bodies in. Text and JSON never start like either: the zlib check is
/// confirmed by inflating the first bytes, so a body that merely starts with `x^` passes.
fn looks_compressed(data: &[u8]) -> bool {
    use std::io::Read;
    if data.starts_with(&[0x1f, 0x8b, 0x08]) {
        return true;
    }
    let [cmf, flg, ..] = *data else {
        return false;
    };
    let zlib_header = cmf & 0x0f == 8
        && cmf >> 4 <= 7
        && flg & 0x20 == 0
        && (u16::from(cmf) << 8 | u16::from(flg)) % 31 == 0;
    if !zlib_header {
        return false;
    }
    let mut probe = [0u8; 1];
    matches!(
        flate2::read::ZlibDecoder::new(data).read(&mut probe),
        Ok(n) if n > 0
    )
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
            return Err(GatewayError::unreachable(format!(
                "the upstream answer uses a content coding the gateway cannot read ({})",
                other.chars().take(32).collect::<String>()
            )))
        }
    };
    if full {
        return Err(GatewayError::BuffersFull);
    }
    result.map_err(|e| {
        Unreachable::caused(format!("the upstream's {coding} body is corrupt: {e}"), e)
    })?;
    if out.len() as u64 > limit {
        return Err(GatewayError::unreachable(format!(
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
            ["accept", "if-none-match", "x-request-id", "authorization"],
            "expected only allowlisted headers to go upstream, saw {names:?}"
        );
    }

    #[test]
    fn conditions_are_answered_from_the_answers_validators() {
        let mut answer = HeaderMap::new();
        answer.insert(header::ETAG, "\"v1\"".parse().unwrap());
        answer.insert(
            header::LAST_MODIFIED,
            "Tue, 01 Dec 2026 10:00:00 GMT".parse().unwrap(),
        );
        let ask = |name: HeaderName, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(name, value.parse().unwrap());
            conditional(&h, &answer)
        };
        let not_modified = Some(StatusCode::NOT_MODIFIED);
        assert_eq!(ask(header::IF_NONE_MATCH, "\"v1\""), not_modified);
        assert_eq!(ask(header::IF_NONE_MATCH, "W/\"v1\""), not_modified);
        assert_eq!(ask(header::IF_NONE_MATCH, "\"v0\", \"v1\""), not_modified);
        assert_eq!(ask(header::IF_NONE_MATCH, "*"), not_modified);
        assert_eq!(ask(header::IF_NONE_MATCH, "\"v2\""), None);
        assert_eq!(
            ask(header::IF_MODIFIED_SINCE, "Tue, 01 Dec 2026 10:00:00 GMT"),
            not_modified
        );
        assert_eq!(
            ask(header::IF_MODIFIED_SINCE, "Mon, 30 Nov 2026 10:00:00 GMT"),
            None
        );
        assert_eq!(ask(header::IF_MATCH, "\"v1\""), None);
        assert_eq!(
            ask(header::IF_MATCH, "\"v2\""),
            Some(StatusCode::PRECONDITION_FAILED)
        );
        assert_eq!(conditional(&HeaderMap::new(), &answer), None);
    }
}
