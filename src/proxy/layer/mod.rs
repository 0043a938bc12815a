//! What every client request goes through around the domain pipeline, as tower layers: each
//! cross-cutting concern is one small piece, and [`stack`] lists them in order. They share a
//! per-request [`Exchange`] in the request's extensions, so a timeout that drops the pipeline
//! still leaves the layers outside it knowing how far it got. Nothing is boxed on a hit.
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
pub use request_id::RequestIdLayer;
pub use rescue::{Failure, RescueLayer};
pub use timeout::TimeoutLayer;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
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

/// The domain pipeline as the innermost service. A fresh hit is answered in `call`, so the
/// future every layer wraps is small and is moved cheaply; anything else runs the async
/// pipeline, boxed, which on those paths costs less than the copies of its kilobytes would.
fn pipeline<B>(
    mut req: Request<B>,
) -> Answer<impl Future<Output = Result<Response<Body>, GatewayError>> + Send>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let exchange = req.extensions_mut().remove::<Arc<Exchange>>();
    let (parts, body) = req.into_parts();
    if let Some(ex) = exchange.as_ref().filter(|_| body.is_end_stream()) {
        if let Some(resp) = ex.gateway.fresh_hit(&ex.state, &parts, ex) {
            return Answer::Now(std::future::ready(Ok(resp)));
        }
    }
    Answer::Later(Box::pin(async move {
        let ex = exchange.ok_or(GatewayError::Internal("the request has no exchange record"))?;
        ex.gateway.pipeline(&ex.state, parts, body, &ex).await
    }))
}

/// The pipeline's answer: made at once, or to come.
pub enum Answer<F> {
    Now(std::future::Ready<Result<Response<Body>, GatewayError>>),
    Later(Pin<Box<F>>),
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Response<Body>, GatewayError>>,
{
    type Output = Result<Response<Body>, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Answer::Now(ready) => Pin::new(ready).poll(cx),
            Answer::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// One request's shared record: the configuration snapshot it runs on (taken once, so a
/// reload mid-request never mixes two) and what it turned out to be, which the pipeline
/// fills in as it learns it and the layers read once it is answered or given up on.
/// Plain atomics rather than a lock: each field is written by one step and read after.
pub struct Exchange {
    pub(super) gateway: Gateway,
    pub(super) state: Arc<State>,
    /// When the stack took the request: the one clock reading the metrics and the access
    /// log measure the request's duration from.
    started: std::time::Instant,
    /// The request's duration as [`MetricsLayer`] measured it when the answer was made, in
    /// nanoseconds (`NONE_NS` until then), for the access log outside it: one clock reading
    /// at the end serves both.
    took: AtomicU64,
    /// The request id, from [`RequestIdLayer`] until the answer carries it.
    request_id: Mutex<Option<HeaderValue>>,
    /// Client ordinal, route index: `NONE` until known.
    client: AtomicUsize,
    /// The ordinal of the client the header or query key names, read once by
    /// [`RequestIdLayer`] (which reads that key anyway) for [`RateLimitLayer`]: `UNREAD`
    /// until read, `NONE` for no valid key.
    presented: AtomicUsize,
    route: AtomicUsize,
    /// An index into [`CACHE_LABELS`].
    cache: AtomicU8,
    /// Nanoseconds; `NONE_NS` until known.
    upstream: AtomicU64,
    budget_wait: AtomicU64,
}

const NONE: usize = usize::MAX;
const UNREAD: usize = usize::MAX - 1;
const NONE_NS: u64 = u64::MAX;

/// Every value of the `cache` label; the first is a request that never reached the cache.
const CACHE_LABELS: [&str; 6] = ["none", "hit", "stale", "miss", "collapsed", "bypass"];

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

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NONE_NS - 1)
}

impl Exchange {
    fn new(gateway: Gateway, started: std::time::Instant) -> Exchange {
        Exchange {
            state: gateway.state(),
            gateway,
            started,
            took: AtomicU64::new(NONE_NS),
            request_id: Mutex::new(None),
            client: AtomicUsize::new(NONE),
            presented: AtomicUsize::new(UNREAD),
            route: AtomicUsize::new(NONE),
            cache: AtomicU8::new(0),
            upstream: AtomicU64::new(NONE_NS),
            budget_wait: AtomicU64::new(NONE_NS),
        }
    }

    /// How long the request took, as measured once its answer was made; `None` before.
    fn took(&self) -> Option<Duration> {
        let n = self.took.load(Relaxed);
        (n != NONE_NS).then(|| Duration::from_nanos(n))
    }

    fn set_took(&self, took: Duration) {
        self.took.store(nanos(took), Relaxed);
    }

    /// A copy of what is known so far.
    pub(super) fn outcome(&self) -> Outcome {
        let some = |n: usize| (n != NONE).then_some(n);
        let time = |n: u64| (n != NONE_NS).then(|| Duration::from_nanos(n));
        Outcome {
            client: some(self.client.load(Relaxed)),
            route: some(self.route.load(Relaxed)),
            cache: CACHE_LABELS
                .get(usize::from(self.cache.load(Relaxed)))
                .copied()
                .unwrap_or(CACHE_LABELS[0]),
            upstream: time(self.upstream.load(Relaxed)),
            budget_wait: time(self.budget_wait.load(Relaxed)),
        }
    }

    /// The request id (a copy), for what goes upstream.
    pub(super) fn request_id(&self) -> HeaderValue {
        let id = self.request_id.lock().unwrap_or_else(|e| e.into_inner());
        id.clone().unwrap_or_else(request_id::fresh)
    }

    fn set_request_id(&self, id: HeaderValue) {
        *self.request_id.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
    }

    /// The request id, taken for the answer: moved, so a fresh id is never copied on a hit.
    fn take_request_id(&self) -> Option<HeaderValue> {
        self.request_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn set_presented(&self, client: Option<&Client>) {
        self.presented
            .store(client.map_or(NONE, |c| c.ordinal), Relaxed);
    }

    /// The client the request's header or query key names (`Some(None)`: no valid key);
    /// `None` if it was never read.
    fn presented(&self) -> Option<Option<usize>> {
        match self.presented.load(Relaxed) {
            UNREAD => None,
            NONE => Some(None),
            n => Some(Some(n)),
        }
    }

    pub(super) fn set_client(&self, client: &Client) {
        self.client.store(client.ordinal, Relaxed);
    }

    pub(super) fn set_route(&self, route: Option<usize>) {
        self.route.store(route.unwrap_or(NONE), Relaxed);
    }

    pub(super) fn set_cache(&self, cache: &'static str) {
        let i = CACHE_LABELS.iter().position(|l| *l == cache).unwrap_or(0);
        self.cache.store(i as u8, Relaxed);
    }

    pub(super) fn set_budget_wait(&self, wait: Option<Duration>) {
        self.budget_wait.store(wait.map_or(NONE_NS, nanos), Relaxed);
    }

    pub(super) fn set_upstream(&self, upstream: Duration, budget_wait: Duration) {
        self.upstream.store(nanos(upstream), Relaxed);
        self.budget_wait.store(nanos(budget_wait), Relaxed);
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
        let started = std::time::Instant::now();
        let exchange = Arc::new(Exchange::new(self.gateway.clone(), started));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use tower::ServiceExt;

    /// Sets its flag when dropped.
    struct Flag(Arc<AtomicBool>);

    impl Drop for Flag {
        fn drop(&mut self) {
            self.0.store(true, SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_pipeline_past_its_deadline_is_dropped_and_answered_504_in_the_envelope() {
        let dropped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&dropped);
        let svc = ServiceBuilder::new()
            .layer(RescueLayer)
            .layer(TimeoutLayer)
            .service_fn(move |_req: Request<()>| {
                let guard = Flag(Arc::clone(&flag));
                async move {
                    let _guard = guard;
                    std::future::pending::<Result<Response<Body>, GatewayError>>().await
                }
            });
        let started = tokio::time::Instant::now();
        let Ok(resp) = svc.oneshot(Request::new(())).await;
        assert_eq!(resp.status(), http::StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(30),
            "expected the answer at the default timeout on the paused clock"
        );
        assert!(
            dropped.load(SeqCst),
            "the pipeline must be dropped at the deadline"
        );
        let failure = resp.extensions().get::<Failure>().map(|f| f.0.clone());
        assert_eq!(
            failure.as_deref(),
            Some("request not answered within 30s"),
            "the reason rides on the answer for the recent-errors list"
        );
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        assert_eq!(v["error"], "upstream_timeout", "saw {v}");
    }

    #[tokio::test]
    async fn answers_in_time_pass_through_untouched() {
        let svc = ServiceBuilder::new()
            .layer(RescueLayer)
            .layer(HeadLayer)
            .layer(TimeoutLayer)
            .service_fn(|_req: Request<()>| async {
                Ok::<_, GatewayError>(Response::new(Body::new(Bytes::from_static(b"hello"))))
            });
        let head = Request::head("/").body(()).unwrap_or_default();
        let Ok(resp) = svc.clone().oneshot(head).await;
        assert_eq!(resp.status(), http::StatusCode::OK);
        assert!(resp.extensions().get::<Failure>().is_none());
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        assert!(body.is_empty(), "a HEAD answer has no body, saw {body:?}");
        let Ok(resp) = svc.oneshot(Request::new(())).await;
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        assert_eq!(&body[..], b"hello");
    }
}
