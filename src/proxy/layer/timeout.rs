//! `server.request_timeout` over the whole pipeline, read from the request's snapshot so a
//! reload changes it for the next request. When it passes, the pipeline is dropped (a write
//! already on its way upstream runs on in its own task) and the answer is a 504.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::{exchange_of, plain_layer};
use crate::error::GatewayError;

plain_layer!(TimeoutLayer, Timeout);

impl<S, B> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Error = GatewayError>,
{
    type Response = S::Response;
    type Error = GatewayError;
    type Future = Timed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Without a snapshot (a stack assembled without one) the default applies.
        let limit = exchange_of(&req).map_or(Duration::from_secs(30), |ex| {
            ex.state.config.server.request_timeout
        });
        let now = Instant::now();
        Timed {
            inner: Some(self.inner.call(req)),
            sleep: None,
            // As far as tokio's own timeout goes when the sum overflows: a year is never.
            deadline: now
                .checked_add(limit)
                .unwrap_or_else(|| now + Duration::from_secs(365 * 86_400)),
            limit,
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Timed<F> {
        // Dropped as soon as the deadline passes, as tokio's own timeout drops its work.
        #[pin]
        inner: Option<F>,
        // Made at the first poll that finds the work unfinished: an answer ready at once
        // (a hit) never touches the timer.
        #[pin]
        sleep: Option<Sleep>,
        deadline: Instant,
        limit: Duration,
    }
}

impl<F, T> Future for Timed<F>
where
    F: Future<Output = Result<T, GatewayError>>,
{
    type Output = Result<T, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        // The work first, as tokio's own timeout does: an answer ready at the deadline wins.
        if let Some(inner) = this.inner.as_mut().as_pin_mut() {
            if let Poll::Ready(out) = inner.poll(cx) {
                return Poll::Ready(out);
            }
        }
        if this.sleep.is_none() {
            this.sleep
                .set(Some(tokio::time::sleep_until(*this.deadline)));
        }
        match this.sleep.as_pin_mut().map(|sleep| sleep.poll(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => {
                this.inner.set(None);
                Poll::Ready(Err(GatewayError::RequestTimeout(*this.limit)))
            }
        }
    }
}
