//! Building answers: the CX Social envelope, error answers, and the response body type that
//! can either be sent at once or dribbled slowly (the `slow_body_ms` fault).
//!
//! Invariants: every error answer has the same HTTP status as its `meta.code`; a body always
//! reports its exact length, so HTTP/1.1 answers carry `Content-Length` even when dribbled;
//! the in-flight guard rides in the body and is released when the body is done or dropped.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use hyper::body::{Body, Frame, SizeHint};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::stats::InFlight;

pub(crate) type Reply = Response<SimBody>;

/// How many pieces a slow body is cut into.
const DRIP_PIECES: u64 = 10;

enum Payload {
    Full(Option<Bytes>),
    Drip(mpsc::Receiver<Bytes>),
}

/// The body of every simulator answer.
pub struct SimBody {
    payload: Payload,
    remaining: u64,
    _in_flight: Option<InFlight>,
}

impl SimBody {
    fn full(bytes: Bytes) -> Self {
        SimBody {
            remaining: bytes.len() as u64,
            payload: Payload::Full(Some(bytes)),
            _in_flight: None,
        }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let next = match &mut this.payload {
            Payload::Full(bytes) => bytes.take(),
            Payload::Drip(rx) => match rx.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(piece) => piece,
            },
        };
        match next {
            Some(piece) => {
                this.remaining = this.remaining.saturating_sub(piece.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            None => {
                // Releases the in-flight count as soon as the last byte is out.
                this._in_flight = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.payload, Payload::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Attaches the in-flight guard to an answer.
pub(crate) fn hold(mut reply: Reply, guard: InFlight) -> Reply {
    reply.body_mut()._in_flight = Some(guard);
    reply
}

/// Turns an answer into one whose body arrives in pieces spread over `over`.
pub(crate) fn dribble(reply: Reply, over: Duration) -> Reply {
    let (parts, body) = reply.into_parts();
    let bytes = match body.payload {
        Payload::Full(Some(bytes)) => bytes,
        // Already dribbling or empty: nothing to slow down.
        payload => return Response::from_parts(parts, SimBody { payload, ..body }),
    };
    let total = bytes.len() as u64;
    let piece_len = total.div_ceil(DRIP_PIECES).max(1) as usize;
    let pause = over / DRIP_PIECES as u32;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut rest = bytes;
        while !rest.is_empty() {
            tokio::time::sleep(pause).await;
            let piece = rest.split_to(piece_len.min(rest.len()));
            if tx.send(piece).await.is_err() {
                // The client went away; stop dribbling.
                return;
            }
        }
    });
    let body = SimBody {
        payload: Payload::Drip(rx),
        remaining: total,
        _in_flight: body._in_flight,
    };
    Response::from_parts(parts, body)
}

/// A JSON answer as is (no envelope).
pub(crate) fn json(status: StatusCode, value: &Value) -> Reply {
    // Serialising a `Value` cannot fail: its map keys are always strings.
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut reply = Response::new(SimBody::full(Bytes::from(bytes)));
    *reply.status_mut() = status;
    reply.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    reply
}

/// A successful answer in the CX Social envelope.
pub(crate) fn ok(response: Value) -> Reply {
    json(
        StatusCode::OK,
        &json!({"meta": {"code": 200}, "response": response}),
    )
}

/// An error answer in the CX Social envelope, with the same HTTP status, and the top-level
/// `error`/`error_description` the API's public clients read instead of `meta`.
pub(crate) fn error(status: StatusCode, error_type: &str, message: &str) -> Reply {
    json(
        status,
        &json!({
            "meta": {
                "code": status.as_u16(),
                "error_type": error_type,
                "error_message": message,
            },
            "error": error_type,
            "error_description": message,
        }),
    )
}

/// Sets a header whose value is built from a number or a known-safe string.
pub(crate) fn set_header(reply: &mut Reply, name: &'static str, value: impl ToString) {
    if let Ok(value) = HeaderValue::from_str(&value.to_string()) {
        reply.headers_mut().insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn error_envelope_matches_status() {
        let reply = error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down");
        assert_eq!(reply.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            reply.body().size_hint().exact(),
            Some(reply.body().remaining)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dribbled_body_arrives_whole() {
        let reply = dribble(
            ok(json!({"n": "x".repeat(100)})),
            Duration::from_millis(500),
        );
        let started = tokio::time::Instant::now();
        let expected_len = reply.body().size_hint().exact();
        let bytes = reply
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        assert_eq!(
            Some(bytes.len() as u64),
            expected_len,
            "expected exact length"
        );
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(value["response"]["n"].as_str().map(str::len), Some(100));
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "expected the body to take 500 ms, took {:?}",
            started.elapsed()
        );
    }
}
