//! `X-Request-Id` on every answer: the client's own when it is a sane token holding no
//! gateway key, else 24 fresh hex digits. The same id goes upstream (the pipeline reads it
//! from the request's [`Exchange`]) and into the access log (read back from the answer).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use tower::Service;

use super::{exchange_of, plain_layer, After, Exchange, Finish};
use crate::error::Body;
use crate::leak::KeyScan;
use crate::proxy::request::client_key;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

plain_layer!(RequestIdLayer, RequestIds);

impl<S, B> Service<Request<B>> for RequestIds<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, Echo>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let echo = exchange_of(&req).map(|ex| {
            let key = client_key(req.headers(), req.uri().query());
            let scan = KeyScan::new(&*ex.state.clients, key.as_deref());
            ex.set_request_id(request_id(req.headers(), &scan));
            // The rate-limit layer needs the client this key names: read it once, here.
            ex.set_presented(ex.state.clients.authenticate(key.as_deref()).ok());
            Echo(ex)
        });
        After::new(self.inner.call(req), echo)
    }
}

pub struct Echo(Arc<Exchange>);

impl Finish for Echo {
    fn finish(self, resp: &mut Response<Body>) {
        // Moved, not cloned: the access log reads it back from the answer.
        let id = self.0.take_request_id().unwrap_or_else(fresh);
        resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
}

/// The client's `X-Request-Id` if it is a sane token (1 to 128 visible ASCII characters,
/// no space) holding no gateway key, else a fresh one: it is echoed, logged and forwarded.
fn request_id(headers: &HeaderMap, scan: &KeyScan<'_>) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let ok = v.len() <= 128
            && !v.is_empty()
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
            && !scan.in_value(v.as_bytes());
        if ok {
            return v.clone();
        }
    }
    fresh()
}

/// A fresh id.
pub(super) fn fresh() -> HeaderValue {
    fresh_request_id(fastrand::u64(..), fastrand::u32(..))
}

/// 24 lower-case hex digits (`high` then `low`, zero-padded), written on the stack: the
/// only allocation is the header value's own.
fn fresh_request_id(high: u64, low: u32) -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 24];
    let digits = (u128::from(high) << 32) | u128::from(low);
    for (i, slot) in text.iter_mut().enumerate() {
        let shift = 4 * (23 - i);
        *slot = HEX[((digits >> shift) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_request_ids_are_24_padded_hex_digits() {
        let id = fresh_request_id(0xab, 0x1);
        assert_eq!(id, "00000000000000ab00000001");
        let id = fresh_request_id(u64::MAX, u32::MAX);
        assert_eq!(id, "ffffffffffffffffffffffff");
        let (high, low) = (0x0123_4567_89ab_cdef, 0xfedc_ba98);
        assert_eq!(
            fresh_request_id(high, low),
            format!("{high:016x}{low:08x}").as_str()
        );
    }
}
