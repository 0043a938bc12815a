//! The one place a [`GatewayError`] becomes an answer: the CX Social error envelope with
//! its status. Everything outside this layer is infallible, so no error ever reaches hyper
//! (which would close the connection with no answer). The reason is kept on the answer as
//! a [`Failure`], for the status page's list of recent errors.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use http::{Request, Response};
use tower::Service;

use super::plain_layer;
use crate::error::{Body, GatewayError};

/// Why the gateway answered with an error itself, in the answer's extensions.
#[derive(Clone, Debug)]
pub struct Failure(pub String);

/// The status of the upstream answer a gateway error stands in for (its limit answer,
/// turned into the gateway's 429), in the answer's extensions for `Cache-Status`.
#[derive(Clone, Copy, Debug)]
pub struct Forwarded(pub http::StatusCode);

/// The answer for `e`, with its reason attached as a [`Failure`].
pub fn rescue(e: &GatewayError) -> Response<Body> {
    let mut resp = e.response();
    resp.extensions_mut().insert(Failure(e.to_string()));
    if let GatewayError::RateLimited {
        upstream_status: Some(status),
        ..
    } = e
    {
        resp.extensions_mut().insert(Forwarded(*status));
    }
    resp
}

plain_layer!(RescueLayer, Rescue);

impl<S, B> Service<Request<B>> for Rescue<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Rescued<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The pipeline is always ready; an inner service that is not is answered for.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        Rescued {
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Rescued<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Future for Rescued<F>
where
    F: Future<Output = Result<Response<Body>, GatewayError>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(Ok(match ready!(self.project().inner.poll(cx)) {
            Ok(resp) => resp,
            Err(e) => rescue(&e),
        }))
    }
}
