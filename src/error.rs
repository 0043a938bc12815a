//! The gateway's own errors and the one place they become responses.
//!
//! Every failure on the request path ends as a [`GatewayError`]; [`GatewayError::response`]
//! turns it into the CX Social error envelope with the right status, so existing clients
//! parse gateway errors exactly like API errors, and nothing ever escapes to hyper.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The response body type of the whole gateway: bodies are buffered `Bytes`, shared with
/// the cache, never copied per hit.
pub type Body = Full<Bytes>;

/// Why the gateway answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    BadRequest(&'static str),
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A path the gateway never forwards (the simulator's controls, in any spelling).
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Forbidden(String),
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: u64 },
    /// The route costs more budget cells than a burst holds: no wait could admit the call.
    #[error("{0}")]
    TooCostly(crate::budget::TooCostly),
    #[error("rate limited: retry in {}s", retry_after_secs(*retry_after))]
    RateLimited {
        retry_after: Duration,
        reason: &'static str,
        /// The upstream's own answer that said its limit is reached (a 429, or the API's
        /// 400 `rate_limit_reached`), for `Cache-Status`'s `fwd-status`; `None` when no
        /// call went (the budget refused it).
        upstream_status: Option<StatusCode>,
    },
    #[error("upstream unreachable: {0}")]
    UpstreamUnreachable(#[source] Unreachable),
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("gateway overloaded: too many requests in flight")]
    Overloaded,
    #[error("no usable upstream token: {0}")]
    TokenUnavailable(#[source] Arc<crate::token::TokenError>),
    #[error("request not answered within {0:?}")]
    RequestTimeout(Duration),
    /// The client stopped sending its request body for longer than `server.body_timeout`.
    #[error("request body paused for more than {0:?}")]
    BodyTimeout(Duration),
    /// Taking this body would pass `server.max_buffered_bytes`.
    #[error("gateway overloaded: too many bytes of bodies held in memory")]
    BuffersFull,
    /// The gateway's own parts were put together wrong; no request should ever see it.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Why no usable answer came from the upstream: what the gateway saw (the envelope's
/// message) and, when there is one, the error underneath, kept as its `source`. Cheap to
/// clone, since one merged call's failure is every waiter's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{what}")]
pub struct Unreachable {
    what: Cow<'static, str>,
    #[source]
    cause: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Unreachable {
    /// A failure seen by the gateway itself (a bad answer), with no error underneath.
    pub fn new(what: impl Into<Cow<'static, str>>) -> Unreachable {
        Unreachable {
            what: what.into(),
            cause: None,
        }
    }

    /// A failure that `cause` (an I/O, HTTP or decoding error) made.
    pub fn caused(
        what: impl Into<Cow<'static, str>>,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Unreachable {
        Unreachable {
            what: what.into(),
            cause: Some(Arc::from(cause.into())),
        }
    }
}

impl From<Unreachable> for GatewayError {
    fn from(e: Unreachable) -> GatewayError {
        GatewayError::UpstreamUnreachable(e)
    }
}

impl From<crate::token::TokenError> for GatewayError {
    fn from(e: crate::token::TokenError) -> GatewayError {
        GatewayError::TokenUnavailable(Arc::new(e))
    }
}

/// `Retry-After` is whole seconds, rounded up, and at least 1 (0 would invite a hot loop).
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

impl GatewayError {
    /// A 502 for a failure the gateway saw itself, with no error underneath.
    pub fn unreachable(what: impl Into<Cow<'static, str>>) -> GatewayError {
        GatewayError::UpstreamUnreachable(Unreachable::new(what))
    }

    /// The HTTP status and the CX Social `error_type`.
    pub fn kind(&self) -> (StatusCode, &'static str) {
        match self {
            GatewayError::BadRequest(_) | GatewayError::TooCostly(_) => {
                (StatusCode::BAD_REQUEST, "bad_request")
            }
            GatewayError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            GatewayError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            GatewayError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            GatewayError::PayloadTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            GatewayError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            GatewayError::UpstreamUnreachable(_) => {
                (StatusCode::BAD_GATEWAY, "upstream_unreachable")
            }
            GatewayError::UpstreamTimeout(_) | GatewayError::RequestTimeout(_) => {
                (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
            }
            GatewayError::Overloaded | GatewayError::BuffersFull => {
                (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
            }
            GatewayError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            GatewayError::TokenUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "token_unavailable")
            }
            GatewayError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }

    /// The envelope response. `X-Request-Id` and the like are added by the caller.
    pub fn response(&self) -> Response<Body> {
        rescue(self)
    }
}

impl Refusal for GatewayError {
    fn kind(&self) -> (StatusCode, &'static str) {
        GatewayError::kind(self)
    }

    fn complete(&self, headers: &mut HeaderMap, _body: &mut serde_json::Value) {
        if let GatewayError::RateLimited { retry_after, .. } = self {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_secs(*retry_after)),
            );
        }
        if matches!(self, GatewayError::Unauthorized(_)) {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"cxgate\""),
            );
        }
    }
}

/// An error a listener answers with itself, client and admin listener alike.
pub trait Refusal: std::error::Error {
    /// The HTTP status and the CX Social `error_type`.
    fn kind(&self) -> (StatusCode, &'static str);
    /// Headers and body fields of its own (`Retry-After`, `WWW-Authenticate`, `problems`).
    fn complete(&self, _headers: &mut HeaderMap, _body: &mut serde_json::Value) {}
}

/// The one rescue point: the CX Social envelope for `e`, with its status, so every error
/// either listener answers has the shape the API's clients parse.
pub fn rescue(e: &dyn Refusal) -> Response<Body> {
    let (status, kind) = e.kind();
    let mut body = envelope_json(status, kind, &e.to_string());
    let mut headers = HeaderMap::new();
    e.complete(&mut headers, &mut body);
    let mut resp = envelope_with(status, body);
    resp.headers_mut().extend(headers);
    resp
}

/// `{"meta":{"code":N,"error_type":"...","error_message":"..."},"error":"...",
/// "error_description":"..."}` with status N. The API's clients read the top-level `error`
/// (and `error_description`), not `meta`; on a 429 `error` is the API's own
/// `rate_limit_reached`, the word its clients test for, and otherwise the `error_type`.
pub fn envelope(status: StatusCode, error_type: &str, message: &str) -> Response<Body> {
    envelope_with(status, envelope_json(status, error_type, message))
}

/// The envelope's JSON body alone, for answers that add fields of their own (a refused
/// reload adds its `problems`).
pub fn envelope_json(status: StatusCode, error_type: &str, message: &str) -> serde_json::Value {
    let error = if status == StatusCode::TOO_MANY_REQUESTS {
        "rate_limit_reached"
    } else {
        error_type
    };
    serde_json::json!({
        "meta": { "code": status.as_u16(), "error_type": error_type, "error_message": message },
        "error": error,
        "error_description": message,
    })
}

/// An error answer with `body` (an [`envelope_json`], perhaps with more fields).
pub fn envelope_with(status: StatusCode, body: serde_json::Value) -> Response<Body> {
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
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn rate_limited_carries_retry_after_rounded_up() {
        let e = GatewayError::RateLimited {
            retry_after: Duration::from_millis(1200),
            reason: "global",
            upstream_status: None,
        };
        let resp = e.response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["meta"]["code"], 429);
        assert_eq!(v["meta"]["error_type"], "rate_limited");
        assert_eq!(
            v["error"], "rate_limit_reached",
            "expected the API's word, saw {v}"
        );
        assert_eq!(v["error_description"], v["meta"]["error_message"]);
    }

    #[tokio::test]
    async fn top_level_error_is_the_error_type_below_429() {
        let resp = GatewayError::Forbidden("account 7 not allowed".into()).response();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "forbidden", "saw {v}");
        assert_eq!(v["error_description"], "account 7 not allowed", "saw {v}");
    }

    /// A call costing more than a burst can never be admitted: 400, saying so, never a
    /// 429 that a retry could not cure.
    #[tokio::test]
    async fn a_call_above_the_burst_is_a_bad_request_saying_why() {
        let e = GatewayError::TooCostly(crate::budget::TooCostly {
            cost: 1_000_000,
            burst: 20,
            budget: crate::budget::Which::Global,
        });
        let resp = e.response();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "bad_request", "saw {v}");
        let said = v["error_description"].as_str().unwrap_or_default();
        assert!(
            said.contains("1000000") && said.contains("global budget's burst of 20"),
            "expected the cost and the burst named, saw {said:?}"
        );
    }

    #[test]
    fn an_unreachable_upstream_and_a_missing_token_keep_their_causes() {
        use std::error::Error;
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = GatewayError::from(Unreachable::caused("connect failed: refused", refused));
        assert_eq!(
            e.to_string(),
            "upstream unreachable: connect failed: refused"
        );
        let cause = e.source().and_then(|s| s.source()).map(|c| c.to_string());
        assert_eq!(
            cause.as_deref(),
            Some("refused"),
            "the I/O error is the cause"
        );
        let e = GatewayError::from(crate::token::TokenError::Expired);
        assert!(
            e.source()
                .is_some_and(|s| s.to_string().starts_with("the access token expired")),
            "expected the token error as the source of {e}"
        );
        assert_eq!(e.kind().0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn retry_after_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(3)), 3);
        assert_eq!(retry_after_secs(Duration::from_millis(3001)), 4);
    }
}
