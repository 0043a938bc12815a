//! The request pipeline: everything between a client's request and its answer.
//!
//! [`Gateway::handle`] is the outermost step and never fails: it assigns the request id,
//! sheds load beyond `max_concurrency`, bounds the whole request by `request_timeout`, and
//! turns every [`GatewayError`] into the CX Social envelope. [`Gateway::pipeline`] then runs
//! the domain steps in their one order: check target and account spelling → authenticate
//! (reading a form body first when the key may be a field of it) → route → authorise → read
//! body (key fields out) → cache and merge → budget → token → upstream → rewrite.
//!
//! The steps are plain async code rather than tower layers: each needs the outcome of the
//! one before (client, route, cache result), and one readable function beats a tower of
//! generic types when reviewing the order.

mod buffers;
mod call;
mod forward;
mod leak;
mod read;
mod recent;
mod reply;
mod request;

pub use buffers::{Buffers, Held, Party};
pub use forward::{strip_hop_by_hop, Fetched};
pub use leak::KeyScan;
pub use request::{
    check_path, check_target, client_key, normalise_escapes, php_name, strip_access_token,
};

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::sync::Semaphore;

use crate::auth::{self, Client, Clients};
use crate::budget::Budget;
use crate::cache::{Merger, Store};
use crate::config::{Captures, Config, RouteConfig};
use crate::error::{Body, GatewayError};
use crate::metrics::{RequestKey, RequestLabels, RequestMetrics};
use crate::token::TokenManager;
use crate::upstream::rewrite::Rewriter;
use crate::upstream::ThreadPools;

use call::Call;
use reply::{Forward, CACHE_STATUS};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");

/// The `client` label of requests that never got as far as authentication.
const NOBODY: &str = "-";

/// Numbers the snapshots, so per-thread tables know which snapshot their entries are for.
static SNAPSHOTS: AtomicU64 = AtomicU64::new(1);

/// Everything that changes on reload, swapped as one snapshot.
pub struct State {
    pub config: Arc<Config>,
    /// Unique within the process (never 0): what the metric handle tables are keyed by.
    id: u64,
    clients: Clients,
    rewriter: Rewriter,
    /// Authorities an absolute-form request target may name.
    own_hosts: Vec<String>,
    /// The `route` label of each route, built once so upstream calls only clone an `Arc`.
    labels: Vec<Arc<str>>,
    /// The `route` label of unmatched requests.
    other: Arc<str>,
}

impl State {
    pub fn new(config: Arc<Config>) -> State {
        let clients = Clients::from_config(&config);
        let rewriter = Rewriter::new(&config.upstream.base_url, &config.server.public_base_url);
        let mut own_hosts = vec![config.server.listen.to_string()];
        for url in [&config.server.public_base_url, &config.upstream.base_url] {
            if let Some(a) = url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.authority().cloned())
            {
                own_hosts.push(a.to_string());
            }
        }
        State {
            id: SNAPSHOTS.fetch_add(1, Ordering::Relaxed),
            clients,
            rewriter,
            own_hosts,
            labels: config
                .routes
                .iter()
                .map(|r| Arc::from(r.match_text.as_str()))
                .collect(),
            other: Arc::from("other"),
            config,
        }
    }

    /// The `route` label of a route index (`None`: unmatched), for an upstream call to own.
    fn route_label(&self, route: Option<usize>) -> Arc<str> {
        route.map_or_else(|| self.other.clone(), |i| self.labels[i].clone())
    }
}

impl Outcome<'_> {
    /// The `client` label: the client's name, or `-` before authentication.
    fn client_label(&self) -> &str {
        self.client.map_or(NOBODY, |c| &c.name)
    }

    /// The `route` label: the route's `match` text, or `other`.
    fn route_label(&self) -> &str {
        self.route
            .map_or(&*self.state.other, |i| &*self.state.labels[i])
    }
}

/// The parts the gateway is made of; built once at start.
pub struct Parts {
    /// `server.access_log`, opened.
    pub access_log: crate::access::AccessLog,
    /// Upstream connection pools, one per calling thread.
    pub http: ThreadPools,
    pub token: TokenManager,
    pub cache: Store,
    pub budget: Budget,
    pub metrics: RequestMetrics,
}

/// The gateway: shared by every connection, cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    access_log: crate::access::AccessLog,
    state: RwLock<Arc<State>>,
    http: ThreadPools,
    token: TokenManager,
    cache: Store,
    merger: Merger<read::Shared>,
    budget: Budget,
    metrics: RequestMetrics,
    last_upstream_status: AtomicU16,
    /// With several replicas: where purges and invalidations are published for the others.
    replicas: std::sync::OnceLock<crate::replicas::Redis>,
    /// `max_concurrency` permits, one set for the process: a reload resizes it rather than
    /// making a new one, so repeated reloads never multiply the limit.
    in_flight: Arc<Semaphore>,
    /// `server.max_buffered_bytes`: every body held in memory at once.
    buffers: Arc<Buffers>,
    /// The last error answers, for the status page.
    recent_errors: recent::RecentErrors,
}

/// What a request turned out to be, for metrics and the access log. Borrows from the
/// snapshot the request runs on, so keeping track costs no reference counting.
struct Outcome<'s> {
    state: &'s State,
    /// `None` until authenticated.
    client: Option<&'s Client>,
    /// The index of the matched route; `None`: no route matched.
    route: Option<usize>,
    cache: &'static str,
    /// Upstream exchange time of the call that answered (the leader's, when merged).
    upstream: Option<std::time::Duration>,
    /// Budget wait of that call.
    budget_wait: Option<std::time::Duration>,
}

impl Gateway {
    pub fn new(config: Arc<Config>, parts: Parts) -> Gateway {
        let permits = config.server.max_concurrency;
        let buffers = Buffers::new(config.server.max_buffered_bytes);
        buffers.set_body_limit(config.server.max_body_bytes);
        prime_metrics(&config, &parts.metrics, &parts.budget);
        Gateway {
            inner: Arc::new(Inner {
                access_log: parts.access_log,
                state: RwLock::new(Arc::new(State::new(config))),
                http: parts.http,
                token: parts.token,
                cache: parts.cache,
                merger: Merger::new(),
                budget: parts.budget,
                metrics: parts.metrics,
                last_upstream_status: AtomicU16::new(0),
                replicas: std::sync::OnceLock::new(),
                in_flight: Arc::new(Semaphore::new(permits)),
                buffers,
                recent_errors: recent::RecentErrors::default(),
            }),
        }
    }

    /// Publishes every later purge and write invalidation to the other replicas.
    pub fn share_invalidations(&self, redis: crate::replicas::Redis) {
        let _ = self.inner.replicas.set(redis);
    }

    /// The shared Redis as `/admin/status` shows it (`{"backend": "local"}` without one).
    pub fn redis_status(&self) -> serde_json::Value {
        match self.inner.replicas.get() {
            Some(redis) => redis.status(),
            None => serde_json::json!({"backend": "local"}),
        }
    }

    /// Tells the other replicas (if any) to drop what this one just dropped.
    pub async fn publish_invalidation(&self, what: crate::replicas::Invalidation) {
        if let Some(redis) = self.inner.replicas.get() {
            redis.publish(what).await;
        }
    }

    /// The current configuration snapshot.
    pub fn state(&self) -> Arc<State> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc; the Arc
        // inside is still whole.
        self.inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Swaps in a new configuration; requests in flight finish on the old one.
    pub fn swap(&self, config: Arc<Config>) {
        let old = self.state().config.server.max_concurrency;
        resize_permits(&self.inner.in_flight, old, config.server.max_concurrency);
        self.inner
            .buffers
            .set_limit(config.server.max_buffered_bytes);
        self.inner
            .buffers
            .set_body_limit(config.server.max_body_bytes);
        self.inner.budget.reload(budget_spec(&config));
        prime_metrics(&config, &self.inner.metrics, &self.inner.budget);
        let next = Arc::new(State::new(config));
        *self.inner.state.write().unwrap_or_else(|e| e.into_inner()) = next;
    }

    pub fn token(&self) -> &TokenManager {
        &self.inner.token
    }

    pub fn cache(&self) -> &Store {
        &self.inner.cache
    }

    /// The access log, for SIGUSR1 and the flush at shutdown.
    pub fn access_log(&self) -> &crate::access::AccessLog {
        &self.inner.access_log
    }

    /// Bytes of request and answer bodies held in memory right now.
    pub fn buffered_bytes(&self) -> u64 {
        self.inner.buffers.held()
    }

    pub fn budget(&self) -> &Budget {
        &self.inner.budget
    }

    /// The last error answers, newest first, for `/admin/status`.
    pub fn recent_errors(&self) -> serde_json::Value {
        self.inner.recent_errors.json()
    }

    /// The budget part of `/admin/status`, with the pause in force wherever it is held.
    pub async fn budget_status(&self) -> serde_json::Value {
        self.inner.budget.status_now().await
    }

    /// Ends an upstream pause by hand (`POST /admin/budget/resume`), on every replica that
    /// shares the budget; whether one was running.
    pub async fn resume_budget(&self) -> bool {
        self.inner.budget.resume().await
    }

    /// The upstream part of `/admin/status`; `budget` is [`Gateway::budget_status`].
    pub fn upstream_status(&self, budget: &serde_json::Value) -> serde_json::Value {
        let last = self.inner.last_upstream_status.load(Ordering::Relaxed);
        serde_json::json!({
            "base_url": self.state().config.upstream.base_url,
            "last_status": if last == 0 { serde_json::Value::Null } else { last.into() },
            "reported_remaining": budget.pointer("/upstream/reported_remaining").cloned().unwrap_or_default(),
            "paused_until": budget.pointer("/upstream/paused_until").cloned().unwrap_or_default(),
            "paused_for_s": budget.pointer("/upstream/paused_for_s").cloned().unwrap_or_default(),
            "pause_source": budget.pointer("/upstream/pause_source").cloned().unwrap_or_default(),
            "merges_in_flight": self.inner.merger.in_flight(),
        })
    }

    /// Answers one client request. Never fails: every error becomes an envelope response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        let state = self.state();
        // The client a valid key in the header or query names, read before the pipeline
        // so that its refusals made before authentication (the target, the path, a body on
        // a read) still carry that client's rate-limit fields. A key only in a form body is
        // known once the body is read, so refusals before that carry none.
        let (request_id, presented) = {
            let key = client_key(req.headers(), req.uri().query());
            let presented = state.clients.authenticate(key.as_deref()).ok();
            let id = request_id(
                req.headers(),
                &leak::KeyScan::new(&state.clients, key.as_deref()),
            );
            (id, presented)
        };
        let method = req.method().clone();
        let mut outcome = Outcome {
            state: &state,
            client: None,
            route: None,
            cache: "none",
            upstream: None,
            budget_wait: None,
        };
        let timeout = state.config.server.request_timeout;

        // The gateway's own reason when it answered with an error, for the status page.
        let mut failure: Option<String> = None;
        // Pinned where it is made: the timeout then holds a pointer instead of a copy of
        // the pipeline's state, which is kilobytes. The `max_concurrency` permit is taken
        // inside, once the request body is in.
        let mut resp = {
            let work = std::pin::pin!(self.pipeline(&state, req, &request_id, &mut outcome));
            match tokio::time::timeout(timeout, work).await {
                Ok(Ok(resp)) => resp,
                Ok(Err(e)) => {
                    failure = Some(e.to_string());
                    e.response()
                }
                Err(_) => {
                    let e = GatewayError::RequestTimeout(timeout);
                    failure = Some(e.to_string());
                    e.response()
                }
            }
        };
        let headers = resp.headers_mut();
        // Moved, not cloned: the access log reads it back from the response.
        headers.insert(X_REQUEST_ID.clone(), request_id);
        // The gateway answered for a forwarded request itself (a timeout, an unreachable
        // upstream, no budget): still say how the cache took it (see the README). Hits always
        // carry their own, so the header is only looked for when it could be missing.
        let fwd = match outcome.cache {
            "miss" => Some("cxgate; fwd=uri-miss"),
            "collapsed" => Some("cxgate; fwd=uri-miss; collapsed"),
            "bypass" => Some("cxgate; fwd=bypass"),
            _ => None,
        };
        if let Some(fwd) = fwd.filter(|_| !headers.contains_key(&CACHE_STATUS)) {
            headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static(fwd));
        }
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
                self.inner
                    .budget
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
        let refusal = retry_after.map(|secs| {
            self.inner
                .budget
                .refusal_headers(outcome.client_label(), Duration::from_secs(secs))
        });
        if outcome.cache != "none" || refused {
            let (policy, current) = match &refusal {
                Some((policy, current, _)) => (policy.clone(), current.clone()),
                None => self.inner.budget.headers(outcome.client_label(), None),
            };
            let headers = resp.headers_mut();
            headers.insert(RATELIMIT_POLICY.clone(), policy);
            headers.insert(RATELIMIT.clone(), current);
        }
        if let Some(client) = outcome.client.or(presented) {
            // The API's own fields, for client code written against the API (named in the
            // README): on every answer to a known client, 429s included.
            let [limit, remaining, reset] = self.inner.budget.api_headers(&client.name, None);
            let (remaining, reset) = match &refusal {
                Some((_, _, reset)) => (HeaderValue::from_static("0"), reset.clone()),
                None => (remaining, reset),
            };
            let headers = resp.headers_mut();
            headers.insert(X_RATELIMIT_LIMIT.clone(), limit);
            headers.insert(X_RATELIMIT_REMAINING.clone(), remaining);
            headers.insert(X_RATELIMIT_RESET.clone(), reset);
        }
        if method == Method::HEAD {
            *resp.body_mut() = Full::new(Bytes::new());
        }

        let status = resp.status();
        let elapsed = started.elapsed();
        self.record(&outcome, &method, status, elapsed);
        // The upstream's own failures (5xx, 429) count as errors too; its 4xx are answers.
        let failure = failure.or_else(|| {
            (status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS)
                .then(|| format!("upstream answered {status}"))
        });
        if let Some(message) = failure {
            self.inner.recent_errors.record(
                status.as_u16(),
                outcome.client_label(),
                outcome.route_label(),
                message,
            );
        }
        if self.inner.access_log.is_on() {
            self.inner.access_log.log(&crate::access::Line {
                request_id: resp
                    .headers()
                    .get(&X_REQUEST_ID)
                    .map_or(b"-", |v| v.as_bytes()),
                client: outcome.client_label(),
                route: outcome.route_label(),
                method: method.as_str(),
                status: status.as_u16(),
                cache: outcome.cache,
                duration: elapsed,
                upstream: outcome.upstream,
                budget_wait: outcome.budget_wait,
            });
        }
        resp
    }

    /// `cxgate_requests_total` and `cxgate_request_duration_seconds` for one request.
    fn record(&self, outcome: &Outcome<'_>, method: &Method, status: StatusCode, took: Duration) {
        let key = RequestKey {
            snapshot: outcome.state.id,
            // Ordinals start at 0 (`anonymous`): `-` gets a number no client can have.
            client: outcome.client.map_or(usize::MAX, |c| c.ordinal),
            route: outcome.route.unwrap_or(usize::MAX),
            method: method_index(method),
            status: status.as_u16(),
            cache: outcome.cache,
        };
        let labels = RequestLabels {
            client: outcome.client_label(),
            route: outcome.route_label(),
            method: method_label(method),
            status,
            cache: outcome.cache,
        };
        self.inner.metrics.record(key, &labels, took.as_secs_f64());
    }

    /// The domain steps, in order.
    async fn pipeline<'s, B>(
        &self,
        state: &'s Arc<State>,
        req: Request<B>,
        request_id: &HeaderValue,
        outcome: &mut Outcome<'s>,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let cfg = &state.config;
        let (parts, body) = req.into_parts();

        // 1. Where the request may go: decided before anything else sees it.
        check_target(&parts, &state.own_hosts)?;
        let path = normalise_escapes(parts.uri.path(), true);
        let query = parts.uri.query().map(|q| normalise_escapes(q, false));
        let (path, query) = (&*path, query.as_deref());
        if is_sim_control(path) {
            return Err(GatewayError::NotFound(
                "paths under /_sim/ are the simulator's controls and are never forwarded",
            ));
        }
        // The account the path names, in its one canonical spelling: authorisation, routing,
        // the cache key and the upstream all read this same segment, so any other spelling
        // of a number there is refused before anything looks at it.
        let path_account = auth::account_of(path).map_err(|e| GatewayError::BadRequest(e.0))?;

        // 2. Who is calling. The key may come in the header, the query or (as the API
        //    allows) a form field of the body; a body is then read before authenticating.
        let reads = parts.method == Method::GET || parts.method == Method::HEAD;
        if reads && request::announces_body(&parts.headers) {
            return Err(GatewayError::BadRequest(
                "a GET or HEAD request must not carry a body",
            ));
        }
        request::one_authorization(&parts.headers)?;
        let header_key = client_key(&parts.headers, None);
        let query_keys = query.map(request::query_keys).unwrap_or_default();
        let mut body = Some(body);
        let (mut early_body, mut early_keys) = (None, Vec::new());
        // The bytes the body holds against `max_buffered_bytes`, until the request ends.
        let mut _body_held = None;
        if header_key.is_none()
            && query_keys.is_empty()
            && !reads
            && request::may_carry_key(&parts.headers)
        {
            let (read, held) = read_body(
                parts.headers.get(header::CONTENT_LENGTH),
                body.take()
                    .ok_or(GatewayError::BadRequest("request body read twice"))?,
                &cfg.server,
                &self.inner.buffers,
                Party::Unauthenticated,
            )
            .await?;
            _body_held = Some(held);
            let read = request::take_body_keys(&parts.headers, read)?;
            (early_body, early_keys) = (Some(read.body), read.keys);
        }
        let key = request::one_key(
            header_key.as_deref(),
            query_keys
                .iter()
                .map(|k| &**k)
                .chain(early_keys.iter().map(String::as_str)),
        )?;
        let client = state.clients.authenticate(key).map_err(|e| match e {
            auth::AuthError::Missing => {
                GatewayError::Unauthorized("a gateway client key is required")
            }
            auth::AuthError::Unknown => GatewayError::Unauthorized("unknown gateway client key"),
        })?;
        outcome.client = Some(client);

        // 3. Which route.
        let route = cfg.find_route(&parts.method, path);
        let rule = route.as_ref().map(|(i, caps)| (&cfg.routes[*i], caps));
        outcome.route = route.as_ref().map(|(i, _)| *i);

        // 4. May this client do this, here: before the cache, so a client never gets a
        //    cached answer for an account it may not see.
        if !client.may_use(&parts.method) {
            return Err(GatewayError::Forbidden(format!(
                "client {} may not use {}",
                client.name, parts.method
            )));
        }
        // A route may capture `{account_id}` elsewhere than the first segment: it is read
        // by the same canonical rule, and both must be allowed.
        let captured = match rule.and_then(|(_, caps)| caps.get("account_id")) {
            Some(text) => {
                Some(auth::canonical_account(text).map_err(|e| GatewayError::BadRequest(e.0))?)
            }
            None => None,
        };
        // Authorisation does not depend on route matching: wherever any route names
        // `{account_id}` past the first segment, a path shaped like that route up to it
        // (as the upstream reads paths, whatever method, whatever follows) names an account
        // there, matched or not.
        let mut shaped = Vec::new();
        for r in &cfg.routes {
            if let Some(rest) = r.path.segment_from("account_id", path) {
                let account = auth::account_of(rest).map_err(|e| GatewayError::BadRequest(e.0))?;
                shaped.extend(account);
            }
        }
        for account in [path_account, captured].into_iter().flatten().chain(shaped) {
            if !client.may_see(Some(account)) {
                return Err(GatewayError::Forbidden(format!(
                    "client {} may not access account {account}",
                    client.name
                )));
            }
        }

        // 5. The body, bounded, with any key field taken out (it must be the same key).
        let body = match (early_body, body) {
            (Some(read), _) => read,
            (None, Some(body)) => {
                let (read, held) = read_body(
                    parts.headers.get(header::CONTENT_LENGTH),
                    body,
                    &cfg.server,
                    &self.inner.buffers,
                    Party::Client(client.ordinal),
                )
                .await?;
                _body_held = Some(held);
                if reads && !read.is_empty() {
                    return Err(GatewayError::BadRequest(
                        "a GET or HEAD request must not carry a body",
                    ));
                }
                let read = request::take_body_keys(&parts.headers, read)?;
                request::one_key(key, read.keys.iter().map(String::as_str))?;
                read.body
            }
            (None, None) => Bytes::new(),
        };
        // No `max_concurrency` permit yet: a request whose body is still arriving waits on
        // its client, not on the gateway, and a cache hit needs none at all. Only what goes
        // upstream (a read the cache cannot answer, a write) takes one, so however many
        // permits slow upstream calls hold, hits keep being served.
        // Last line of defence: the caller's key, in whatever spelling the parsers above did
        // not know, never travels upstream.
        if query.is_some_and(request::overrides_method) {
            return Err(GatewayError::BadRequest(
                "method overrides in the query are not allowed",
            ));
        }
        let query = strip_access_token(query);
        let query = query.as_deref();
        // The caller's key and every other client's, wherever they are left, checked just
        // before anything is forwarded: a cache hit forwards nothing and skips the scan (and
        // a hit for a query holding a key cannot exist, since its miss was refused).
        let leaks = || -> Result<(), GatewayError> {
            let scan = leak::KeyScan::new(&state.clients, key);
            let in_headers = parts
                .headers
                .iter()
                .filter(|(name, _)| forward::forwarded(name))
                .any(|(_, v)| scan.in_value(v.as_bytes()));
            if in_headers
                || scan.in_value(&body)
                || (request::is_json_body(&parts.headers) && scan.in_json(&body))
                || query.is_some_and(|q| scan.in_value(q.as_bytes()))
                || path
                    .split('/')
                    .any(|segment| scan.in_value(segment.as_bytes()))
            {
                return Err(GatewayError::BadRequest(
                    "a gateway key may only be sent as the bearer token, the access_token \
                     parameter or the access_token form field, and only the caller's own",
                ));
            }
            Ok(())
        };

        let route_index = outcome.route;
        let make_call = || Call {
            state: state.clone(),
            route_label: state.route_label(route_index),
            method: parts.method.clone(),
            url: upstream_url(cfg, path, query),
            headers: parts.headers.clone(),
            body: body.clone(),
            request_id: request_id.clone(),
            client: client.name.clone(),
            cost: rule.map_or(std::num::NonZeroU32::MIN, |(r, _)| r.cost),
        };

        // 6. Reads: cache, merge, budget, token, upstream, rewrite. The upstream call is
        //    only put together on a miss: a hit copies nothing of the request.
        if parts.method == Method::GET || parts.method == Method::HEAD {
            return self
                .read(
                    rule,
                    path,
                    query,
                    &parts.headers,
                    read::ToForward {
                        leaks: &leaks,
                        call: make_call,
                    },
                    outcome,
                )
                .await;
        }

        // 7. Writes. Boxed: the upstream call's future is several times the size of the rest
        //    of the pipeline, and kept inline it would be copied along with every cache hit's.
        leaks()?;
        let _permit = self.upstream_permit()?;
        Box::pin(self.write(make_call(), rule, outcome)).await
    }

    /// One of the `max_concurrency` permits, held by a request that goes upstream for as long
    /// as it runs; 503 when none is free.
    pub(super) fn upstream_permit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, GatewayError> {
        self.inner
            .in_flight
            .try_acquire()
            .map_err(|_| GatewayError::Overloaded)
    }

    /// Budget, token, upstream once; then invalidate before answering, so a read right after
    /// the write never sees the old data.
    async fn write(
        &self,
        call: Call,
        rule: Option<(&RouteConfig, &Captures<'_>)>,
        outcome: &mut Outcome<'_>,
    ) -> Result<Response<Body>, GatewayError> {
        outcome.cache = "bypass";
        let tags: Vec<String> = rule
            .map(|(r, caps)| r.invalidates.iter().map(|t| t.fill(caps)).collect())
            .unwrap_or_default();
        // A write runs to its end in a task of its own: once it may have reached the
        // upstream, a client hanging up (or its request timing out) must not leave it half
        // done, its invalidations unapplied and the cache serving what it replaced.
        let gateway = self.clone();
        let fetched = tokio::spawn(async move {
            let fetched = gateway.call(&call).await?;
            if fetched.status.is_success() && !tags.is_empty() {
                gateway.inner.cache.invalidate_tags(&tags).await;
                gateway
                    .publish_invalidation(crate::replicas::Invalidation::Tags(tags))
                    .await;
            }
            Ok::<_, GatewayError>(fetched)
        })
        .await
        .map_err(|_| {
            GatewayError::UpstreamUnreachable("the write ended without an answer".into())
        })??;
        outcome.upstream = Some(fetched.upstream_time);
        outcome.budget_wait = Some(fetched.budget_wait);
        let mut resp = reply::from_parts(fetched.status, &fetched.headers, &fetched.body);
        resp.headers_mut().insert(
            CACHE_STATUS.clone(),
            reply::forward_status(Forward::Bypass, fetched.status, false, false),
        );
        Ok(resp)
    }
}

/// Reads the request body: at most `max_body_bytes` (refused early, by Content-Length,
/// when the client announces it), with no pause longer than `body_timeout` between pieces
/// (408), and its bytes held against `max_buffered_bytes` (503) as they arrive, for as long
/// as the returned [`Held`] lives.
async fn read_body<B>(
    length: Option<&HeaderValue>,
    body: B,
    server: &crate::config::ServerConfig,
    buffers: &Arc<Buffers>,
    party: Party,
) -> Result<(Bytes, Held), GatewayError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limit = server.max_body_bytes;
    if let Some(len) = length {
        let len: u64 = len
            .to_str()
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or(GatewayError::BadRequest("invalid Content-Length"))?;
        if len > limit {
            return Err(GatewayError::PayloadTooLarge { limit });
        }
    }
    if body.is_end_stream() {
        // Nothing to read (a GET without a body, as most are): no collecting to set up.
        return Ok((Bytes::new(), Held::default()));
    }
    // Only the bytes that have arrived are held, never the announced length: a client that
    // announces a large body and trickles it holds what it sent, not the pool.
    let held = buffers.hold_for(party, 0)?;
    let pause = server.body_timeout;
    match buffers::collect(body, limit, Some(pause), &held, 0).await {
        Ok(bytes) => Ok((bytes, held)),
        Err(buffers::CollectError::TooLarge) => Err(GatewayError::PayloadTooLarge { limit }),
        Err(buffers::CollectError::Paused) => Err(GatewayError::BodyTimeout(pause)),
        Err(buffers::CollectError::Full) => Err(GatewayError::BuffersFull),
        Err(buffers::CollectError::Body(_)) => {
            Err(GatewayError::BadRequest("request body could not be read"))
        }
    }
}

/// Every configured route's and client's series at zero (anonymous when no client is
/// configured), so each metric name is present from the first scrape.
fn prime_metrics(cfg: &Config, metrics: &RequestMetrics, budget: &Budget) {
    let clients: Vec<&str> = if cfg.clients.is_empty() {
        vec![auth::ANONYMOUS]
    } else {
        cfg.clients.iter().map(|c| c.name.as_str()).collect()
    };
    metrics.prime(cfg, &clients);
    budget.prime_metrics(&clients);
}

/// The budget's view of the configuration.
pub fn budget_spec(cfg: &Config) -> crate::budget::BudgetSpec {
    use crate::budget::{BudgetSpec, ClientSpec, Priority, Share};
    let share = |s: &crate::config::Share| Share {
        limit: s.limit,
        period: s.period,
        burst: s.burst,
    };
    BudgetSpec {
        global: share(&cfg.budget.global),
        max_wait: cfg.budget.max_wait,
        batch_reserve: cfg.budget.batch_reserve,
        clients: cfg
            .clients
            .iter()
            .map(|c| ClientSpec {
                name: c.name.clone(),
                share: c.share.as_ref().map(share),
                max_wait: c.max_wait,
                priority: match c.priority {
                    crate::config::Priority::Interactive => Priority::Interactive,
                    crate::config::Priority::Batch => Priority::Batch,
                },
            })
            .collect(),
    }
}

/// `base_url` + path + the query without the client's `access_token`.
pub fn upstream_url(cfg: &Config, path: &str, query: Option<&str>) -> String {
    let base = &cfg.upstream.base_url;
    match strip_access_token(query) {
        Some(q) => format!("{base}{path}?{q}"),
        None => format!("{base}{path}"),
    }
}

/// Moves the concurrency limit from `old` to `new` permits. Growing is immediate; shrinking
/// forgets the free permits now and the rest as the requests holding them finish.
fn resize_permits(permits: &Arc<Semaphore>, old: usize, new: usize) {
    if new > old {
        permits.add_permits(new - old);
    } else if new < old {
        let excess = old - new;
        let forgotten = permits.forget_permits(excess);
        let rest = u32::try_from(excess - forgotten).unwrap_or(u32::MAX);
        if rest > 0 {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let permits = Arc::clone(permits);
                runtime.spawn(async move {
                    if let Ok(held) = permits.acquire_many_owned(rest).await {
                        held.forget();
                    }
                });
            }
        }
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
fn method_label(method: &Method) -> &str {
    if KNOWN_METHODS.contains(method) {
        method.as_str()
    } else {
        "other"
    }
}

/// The `method` label as a number: its place in `KNOWN_METHODS`, or one past the end for
/// `other`.
fn method_index(method: &Method) -> usize {
    KNOWN_METHODS
        .iter()
        .position(|m| m == method)
        .unwrap_or(KNOWN_METHODS.len())
}

/// The simulator's control endpoints (`/_sim/...`): the real API has none, and a gateway in
/// front of a simulator must not let clients reset its faults or read its stats. The first
/// segment is read as the account check reads it ([`auth::first_segment`]), then in every
/// way a server could still fold it into `_sim`: decoded once more, with trailing dots and
/// surrounding spaces dropped (as Windows-style servers do), in any letter case. Empty
/// segments and `;` path parameters never get here: the target check refuses them.
fn is_sim_control(path: &str) -> bool {
    let once = auth::first_segment(path);
    let twice = auth::first_segment(&once);
    [&*once, &*twice].iter().any(|seg| {
        seg.trim()
            .trim_end_matches(['.', ' ', '\t'])
            .eq_ignore_ascii_case("_sim")
    })
}

/// The client's `X-Request-Id` if it is a sane token (1 to 128 visible ASCII characters,
/// no space) holding no gateway key, else a fresh one: it is echoed, logged and forwarded.
fn request_id(headers: &http::HeaderMap, scan: &leak::KeyScan<'_>) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let ok = v.len() <= 128
            && !v.is_empty()
            && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
            && !scan.in_value(v.as_bytes());
        if ok {
            return v.clone();
        }
    }
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
mod label_tests {
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

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
