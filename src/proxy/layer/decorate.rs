//! The headers that say how the gateway took a request, added to every answer the
//! pipeline made, its own error answers included: `Cache-Status` for a forwarded request
//! the gateway answered itself, the client's budget (`RateLimit-Policy`, `RateLimit`, the
//! API's `X-RateLimit-*`, `Retry-After` on a 429), and no body on a HEAD.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::Service;

use super::{exchange_of, plain_layer, After, Exchange, Finish};
use crate::error::Body;
use crate::proxy::reply::CACHE_STATUS;
use crate::proxy::request::client_key;

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

plain_layer!(CacheStatusLayer, CacheStatus);

impl<S, B> Service<Request<B>> for CacheStatus<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, CacheStatusDone>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let done = exchange_of(&req).map(CacheStatusDone);
        After::new(self.inner.call(req), done)
    }
}

pub struct CacheStatusDone(Arc<Exchange>);

impl Finish for CacheStatusDone {
    fn finish(self, resp: &mut Response<Body>) {
        // The gateway answered for a forwarded request itself (a timeout, an unreachable
        // upstream, no budget): still say how the cache took it (see the README). Hits
        // always carry their own, so the header is only looked for when it could be missing.
        let fwd = match self.0.outcome().cache {
            "miss" => Some("cxgate; fwd=uri-miss"),
            "collapsed" => Some("cxgate; fwd=uri-miss; collapsed"),
            "bypass" => Some("cxgate; fwd=bypass"),
            _ => None,
        };
        // An upstream answer the gateway stands in for (its limit answer) is named as any
        // forwarded answer is, by its status.
        let forwarded = resp.extensions().get::<super::rescue::Forwarded>().copied();
        let headers = resp.headers_mut();
        if let Some(fwd) = fwd.filter(|_| !headers.contains_key(&CACHE_STATUS)) {
            let value = match forwarded {
                Some(super::rescue::Forwarded(status)) => {
                    // `fwd-status` right after `fwd`, as on the answers the upstream made.
                    let (kind, rest) = fwd.split_at(fwd.find("; collapsed").unwrap_or(fwd.len()));
                    let text = format!("{kind}; fwd-status={}{rest}", status.as_u16());
                    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(fwd))
                }
                None => HeaderValue::from_static(fwd),
            };
            headers.insert(CACHE_STATUS.clone(), value);
        }
    }
}

plain_layer!(RateLimitLayer, RateLimit);

impl<S, B> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, RateLimitDone>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The client a valid key in the header or query names, read before the pipeline so
        // that its refusals made before authentication (the target, the path, a body on a
        // read, 413, 503 overloaded) still carry that client's rate-limit fields. A key
        // only in a form body is known once the body is read, so refusals before that
        // carry none.
        // Read by the request-id layer when it is in the stack, which reads the key anyway.
        let done = exchange_of(&req).map(|ex| {
            let presented = ex.presented().unwrap_or_else(|| {
                let key = client_key(req.headers(), req.uri().query());
                let client = ex.state.clients.authenticate(key.as_deref()).ok();
                client.map(|c| c.ordinal)
            });
            RateLimitDone { presented, ex }
        });
        After::new(self.inner.call(req), done)
    }
}

pub struct RateLimitDone {
    ex: Arc<Exchange>,
    /// The ordinal of the client the request's header or query key names, if valid.
    presented: Option<usize>,
}

impl Finish for RateLimitDone {
    fn finish(self, resp: &mut Response<Body>) {
        let ex = &self.ex;
        let budget = &ex.gateway.inner.budget;
        let outcome = ex.outcome();
        let client_label = ex.client_label(&outcome);
        let refused = resp.status() == StatusCode::TOO_MANY_REQUESTS;
        // A refusal's Retry-After: the gateway's own (whole seconds), or the upstream's; an
        // upstream 429 that named none gets the pause it caused.
        let retry_after = refused.then(|| {
            let named = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok());
            named.unwrap_or_else(|| {
                budget
                    .paused_for()
                    .map_or(1, |d| d.as_secs_f64().ceil().max(1.0) as u64)
            })
        });
        if let Some(secs) = retry_after {
            if !resp.headers().contains_key(header::RETRY_AFTER) {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
        }
        // Every rate-limit field of a refusal comes from its Retry-After: nothing remains
        // until then, on this replica's view and on the upstream's.
        let refusal =
            retry_after.map(|secs| budget.refusal_headers(client_label, Duration::from_secs(secs)));
        let client = ex
            .client(&outcome)
            .or_else(|| self.presented.and_then(|n| ex.state.clients.by_ordinal(n)));
        let live = outcome.cache != "none" || refused;
        let headers = resp.headers_mut();
        match &refusal {
            Some((policy, current, reset)) => {
                headers.insert(RATELIMIT_POLICY.clone(), policy.clone());
                headers.insert(RATELIMIT.clone(), current.clone());
                if let Some(client) = client {
                    // The API's own fields, for client code written against the API (named
                    // in the README): on every answer to a known client, 429s included.
                    let [limit, _, _] = budget.api_headers(&client.name, None);
                    headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
                    headers.insert(X_RATELIMIT_REMAINING.clone(), HeaderValue::from_static("0"));
                    headers.insert(X_RATELIMIT_RESET.clone(), reset.clone());
                }
            }
            // Every hit comes here: the fields are the thread's copies while they hold.
            None if live => {
                let [policy, current, limit, remaining, reset] =
                    budget.answer_headers(client_label);
                headers.insert(RATELIMIT_POLICY.clone(), policy);
                headers.insert(RATELIMIT.clone(), current);
                if let Some(client) = client {
                    // `client_label` is this client's name once it is authenticated; a
                    // client only presented (refused before authentication) is another's.
                    let [limit, remaining, reset] = if *client.name == *client_label {
                        [limit, remaining, reset]
                    } else {
                        budget.api_headers(&client.name, None)
                    };
                    headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
                    headers.insert(X_RATELIMIT_REMAINING.clone(), remaining);
                    headers.insert(X_RATELIMIT_RESET.clone(), reset);
                }
            }
            None => {
                if let Some(client) = client {
                    let [limit, remaining, reset] = budget.api_headers(&client.name, None);
                    headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
                    headers.insert(X_RATELIMIT_REMAINING.clone(), remaining);
                    headers.insert(X_RATELIMIT_RESET.clone(), reset);
                }
            }
        }
    }
}

plain_layer!(HeadLayer, Head);

impl<S, B> Service<Request<B>> for Head<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = After<S::Future, NoBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let head = (req.method() == Method::HEAD).then_some(NoBody);
        After::new(self.inner.call(req), head)
    }
}

pub struct NoBody;

impl Finish for NoBody {
    fn finish(self, resp: &mut Response<Body>) {
        *resp.body_mut() = Full::new(Bytes::new());
    }
}
