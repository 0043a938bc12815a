//! What each answer leaves behind: `cxgate_requests_total` and
//! `cxgate_request_duration_seconds`, the status page's recent errors, and the access log
//! line. Both read the request's [`Exchange`] once the answer is made, so a request the
//! timeout cut short is counted with what the pipeline had found out by then.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use tower::Service;

use super::request_id::X_REQUEST_ID;
use super::{exchange_of, plain_layer, After, Exchange, Failure, Finish, Outcome};
use crate::error::Body;
use crate::metrics::{RequestKey, RequestLabels};

plain_layer!(MetricsLayer, Metrics);

impl<S, B> Service<Request<B>> for Metrics<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, Measured>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let done = exchange_of(&req).map(|ex| Measured {
            ex,
            method: req.method().clone(),
        });
        After::new(self.inner.call(req), done)
    }
}

pub struct Measured {
    ex: Arc<Exchange>,
    method: Method,
}

impl Finish for Measured {
    fn finish(self, resp: &mut Response<Body>) {
        let Measured { ex, method } = self;
        let outcome = ex.outcome();
        let status = resp.status();
        // The request's one reading of the clock at its end: its duration here and in the
        // access log, and its second in the status page's rate.
        let now = Instant::now();
        let took = now.saturating_duration_since(ex.started);
        ex.set_took(took);
        record(&ex, &outcome, &method, status, took, now);
        // The gateway's own reason when it answered with an error; the upstream's own
        // failures (5xx, 429) count as errors too, its 4xx are answers.
        let failure = match resp.extensions().get::<Failure>() {
            Some(Failure(why)) => Some(why.clone()),
            None => (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| format!("upstream answered {status}")),
        };
        if let Some(message) = failure {
            ex.gateway.inner.recent_errors.record(
                status.as_u16(),
                ex.client_label(&outcome),
                ex.route_label_of(&outcome),
                message,
            );
        }
    }
}

/// `cxgate_requests_total` and `cxgate_request_duration_seconds` for one request.
fn record(
    ex: &Exchange,
    outcome: &Outcome,
    method: &Method,
    status: StatusCode,
    took: Duration,
    now: Instant,
) {
    let key = RequestKey {
        snapshot: ex.state.id,
        // Ordinals start at 0 (`anonymous`): `-` gets a number no client can have.
        client: outcome.client.unwrap_or(usize::MAX),
        route: outcome.route.unwrap_or(usize::MAX),
        method: method_index(method),
        status: status.as_u16(),
        cache: outcome.cache,
    };
    let labels = RequestLabels {
        client: ex.client_label(outcome),
        route: ex.route_label_of(outcome),
        method: method_label(method),
        status,
        cache: outcome.cache,
    };
    ex.gateway
        .inner
        .metrics
        .record_at(key, &labels, took.as_secs_f64(), now);
}

plain_layer!(AccessLogLayer, AccessLog);

impl<S, B> Service<Request<B>> for AccessLog<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, Logged>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let done = req
            .extensions()
            .get::<Arc<Exchange>>()
            .filter(|ex| ex.gateway.inner.access_log.is_on())
            .map(|ex| Logged {
                ex: ex.clone(),
                method: req.method().clone(),
            });
        After::new(self.inner.call(req), done)
    }
}

pub struct Logged {
    ex: Arc<Exchange>,
    method: Method,
}

impl Finish for Logged {
    fn finish(self, resp: &mut Response<Body>) {
        let ex = &self.ex;
        let outcome = ex.outcome();
        ex.gateway.inner.access_log.log(&crate::access::Line {
            request_id: resp
                .headers()
                .get(&X_REQUEST_ID)
                .map_or(b"-", |v| v.as_bytes()),
            client: ex.client_label(&outcome),
            route: ex.route_label_of(&outcome),
            method: self.method.as_str(),
            status: resp.status().as_u16(),
            cache: outcome.cache,
            // What the metrics layer inside measured; read anew only in a stack without it.
            duration: ex.took().unwrap_or_else(|| ex.started.elapsed()),
            upstream: outcome.upstream,
            budget_wait: outcome.budget_wait,
        });
    }
}

/// The methods the `method` label names; any other is `other`.
const KNOWN_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
    Method::TRACE,
    Method::CONNECT,
];

/// The `method` label: the standard methods by name, anything else as `other`, since hyper
/// accepts any token as a method and a label must not grow with what strangers send.
pub fn method_label(method: &Method) -> &str {
    if KNOWN_METHODS.contains(method) {
        method.as_str()
    } else {
        "other"
    }
}

/// The `method` label as a number: its place in `KNOWN_METHODS`, or one past the end for
/// `other`.
pub fn method_index(method: &Method) -> usize {
    KNOWN_METHODS
        .iter()
        .position(|m| m == method)
        .unwrap_or(KNOWN_METHODS.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
