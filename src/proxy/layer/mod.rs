//! What every client request goes through around the domain pipeline, as tower layers, so
//! each cross-cutting concern is one small piece and their order is one list ([`stack`]).
//! The layers share one per-request [`Exchange`] (the config snapshot and what the pipeline
//! found out), kept in the request's extensions: a timeout that drops the pipeline mid-way
//! still leaves the layers outside it knowing how far it got. Nothing here is boxed but the
//! pipeline's own (large) future, once.
//!
//! ```text
//! ServiceBuilder::new()
//!     .layer(SnapshotLayer::new(gateway)) // the config snapshot and the Exchange record
//!     .layer(AccessLogLayer)              // one access-log line per answer
//!     .layer(MetricsLayer)                // requests_total, duration, recent errors
//!     .layer(RequestIdLayer)              // X-Request-Id: the client's if sane, else fresh
//!     .layer(RateLimitLayer)              // identifies the caller; RateLimit*, X-RateLimit-*
//!     .layer(CacheStatusLayer)            // Cache-Status on the gateway's own answers
//!     .layer(HeadLayer)                   // a HEAD answer has no body
//!     .layer(RescueLayer)                 // GatewayError -> CX Social envelope: infallible
//!     .layer(TimeoutLayer)                // server.request_timeout -> 504
//!     .service_fn(pipeline)               // the domain steps, in order (super::Gateway)
//! ```

mod decorate;
mod record;
mod request_id;
mod rescue;
mod timeout;

pub use decorate::{CacheStatusLayer, HeadLayer, RateLimitLayer};
pub use record::{AccessLogLayer, MetricsLayer};
pub use request_id::{RequestId, RequestIdLayer};
pub use rescue::{Failure, RescueLayer};
pub use timeout::TimeoutLayer;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use tower::{Layer, Service, ServiceBuilder};

use super::{Gateway, State};
use crate::auth::Client;
use crate::error::{Body, GatewayError};

/// Every layer a client request goes through, outermost first, around the domain pipeline.
/// Never fails: every error has become an answer by the time it leaves.
pub(super) fn stack<B>(
    gateway: Gateway,
) -> impl Service<Request<B>, Response = Response<Body>, Error = Infallible, Future: Send>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ServiceBuilder::new()
        .layer(SnapshotLayer::new(gateway))
        .layer(AccessLogLayer)
        .layer(MetricsLayer)
        .layer(RequestIdLayer)
        .layer(RateLimitLayer)
        .layer(CacheStatusLayer)
        .layer(HeadLayer)
        .layer(RescueLayer)
        .layer(TimeoutLayer)
        .service_fn(pipeline::<B>)
}

/// The domain pipeline as the innermost service. Boxed once: its future is kilobytes, and
/// inline every layer's future would be copied along with it.
fn pipeline<B>(
    mut req: Request<B>,
) -> Pin<Box<impl Future<Output = Result<Response<Body>, GatewayError>> + Send>>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = req.extensions().get::<Arc<Exchange>>().cloned();
    let id = req.extensions_mut().remove::<RequestId>();
    Box::pin(async move {
        let ex = exchange.ok_or(GatewayError::Internal("the request has no exchange record"))?;
        let id = match id {
            Some(RequestId(id)) => id,
            None => request_id::fresh(),
        };
        ex.gateway.pipeline(&ex.state, req, &id, &ex).await
    })
}

/// One request's shared record: the configuration snapshot it runs on (taken once, so a
/// reload mid-request never mixes two) and what it turned out to be, which the pipeline
/// fills in as it learns it and the layers read once it is answered or given up on.
pub struct Exchange {
    pub(super) gateway: Gateway,
    pub(super) state: Arc<State>,
    // A std mutex: only ever held for a copy in or out, never across an await.
    outcome: Mutex<Outcome>,
}

/// What a request turned out to be, for metrics, the access log and the answer's headers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Outcome {
    /// The authenticated client's ordinal; `None` until authenticated.
    pub client: Option<usize>,
    /// The index of the matched route; `None`: no route matched.
    pub route: Option<usize>,
    pub cache: &'static str,
    /// Upstream exchange time of the call that answered (the leader's, when merged).
    pub upstream: Option<Duration>,
    /// Budget wait of that call.
    pub budget_wait: Option<Duration>,
}

/// The `client` label of requests that never got as far as authentication.
const NOBODY: &str = "-";

impl Exchange {
    fn new(gateway: Gateway) -> Exchange {
        Exchange {
            state: gateway.state(),
            gateway,
            outcome: Mutex::new(Outcome {
                client: None,
                route: None,
                cache: "none",
                upstream: None,
                budget_wait: None,
            }),
        }
    }

    fn update(&self, f: impl FnOnce(&mut Outcome)) {
        // A poisoned lock only means a panic while copying plain values in; they are whole.
        f(&mut self.outcome.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A copy of what is known so far.
    pub(super) fn outcome(&self) -> Outcome {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn set_client(&self, client: &Client) {
        self.update(|o| o.client = Some(client.ordinal));
    }

    pub(super) fn set_route(&self, route: Option<usize>) {
        self.update(|o| o.route = route);
    }

    pub(super) fn set_cache(&self, cache: &'static str) {
        self.update(|o| o.cache = cache);
    }

    pub(super) fn set_budget_wait(&self, wait: Option<Duration>) {
        self.update(|o| o.budget_wait = wait);
    }

    pub(super) fn set_upstream(&self, upstream: Duration, budget_wait: Duration) {
        self.update(|o| {
            o.upstream = Some(upstream);
            o.budget_wait = Some(budget_wait);
        });
    }

    /// The authenticated client, if any.
    pub(super) fn client(&self, outcome: &Outcome) -> Option<&Client> {
        outcome
            .client
            .and_then(|n| self.state.clients.by_ordinal(n))
    }

    /// The `client` label: the client's name, or `-` before authentication.
    pub(super) fn client_label(&self, outcome: &Outcome) -> &str {
        self.client(outcome).map_or(NOBODY, |c| &c.name)
    }

    /// The `route` label: the route's `match` text, or `other`.
    pub(super) fn route_label(&self) -> &str {
        self.route_label_of(&self.outcome())
    }

    pub(super) fn route_label_of(&self, outcome: &Outcome) -> &str {
        outcome
            .route
            .and_then(|i| self.state.labels.get(i))
            .map_or(&*self.state.other, |l| &**l)
    }
}

/// Takes the configuration snapshot the request runs on and opens its [`Exchange`].
#[derive(Clone)]
pub struct SnapshotLayer {
    gateway: Gateway,
}

impl SnapshotLayer {
    pub fn new(gateway: Gateway) -> SnapshotLayer {
        SnapshotLayer { gateway }
    }
}

impl<S> Layer<S> for SnapshotLayer {
    type Service = Snapshot<S>;
    fn layer(&self, inner: S) -> Snapshot<S> {
        Snapshot {
            gateway: self.gateway.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Snapshot<S> {
    gateway: Gateway,
    inner: S,
}

impl<S, B> Service<Request<B>> for Snapshot<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let exchange = Arc::new(Exchange::new(self.gateway.clone()));
        req.extensions_mut().insert(exchange);
        self.inner.call(req)
    }
}

/// The request's [`Exchange`], which [`SnapshotLayer`] put there; `None` only in a stack
/// assembled without it.
fn exchange_of<B>(req: &Request<B>) -> Option<Arc<Exchange>> {
    req.extensions().get::<Arc<Exchange>>().cloned()
}

/// What a layer does to the answer once the service inside it has made one.
pub trait Finish {
    fn finish(self, resp: &mut Response<Body>);
}

pin_project_lite::pin_project! {
    /// The inner service's future, then the layer's [`Finish`] on its answer; no boxing.
    pub struct After<F, A> {
        #[pin]
        inner: F,
        after: Option<A>,
    }
}

impl<F, A> After<F, A> {
    fn new(inner: F, after: Option<A>) -> After<F, A> {
        After { inner, after }
    }
}

impl<F, A, E> Future for After<F, A>
where
    F: Future<Output = Result<Response<Body>, E>>,
    A: Finish,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut out = ready!(this.inner.poll(cx));
        if let (Ok(resp), Some(after)) = (&mut out, this.after.take()) {
            after.finish(resp);
        }
        Poll::Ready(out)
    }
}

/// A layer that only wraps its inner service in `$service`.
macro_rules! plain_layer {
    ($layer:ident, $service:ident) => {
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $layer;

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service { inner }
            }
        }

        #[derive(Clone, Debug)]
        pub struct $service<S> {
            inner: S,
        }
    };
}
pub(crate) use plain_layer;
