//! The request pipeline: everything between a client's request and its answer, in one
//! place and one order. [`Gateway::handle`] sends each request through the tower layers of
//! `layer` (the cross-cutting concerns) around `Gateway::pipeline` (the domain steps).

mod buffers;
mod call;
mod forward;
mod layer;
mod read;
mod recent;
mod reply;
mod request;
mod tables;

pub use crate::leak::KeyScan;
pub use buffers::{Buffers, Held, Party};
pub use forward::{sent_upstream, strip_hop_by_hop, Fetched};
pub use request::{
    canonical_path, check_path, check_target, client_key, normalise_escapes, php_name,
    strip_access_token,
};
pub use tables::announced;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response};
use tokio::sync::Semaphore;

use crate::auth::{self, Clients};
use crate::budget::Budget;
use crate::cache::{Merger, Store};
use crate::config::{Captures, Config, RouteConfig, WriteRules};
use crate::error::{Body, GatewayError};
use crate::metrics::RequestMetrics;
use crate::token::TokenManager;
use crate::upstream::rewrite::Rewriter;
use crate::upstream::ThreadPools;

use call::Call;
use layer::Exchange;
use reply::{Forward, CACHE_STATUS};

/// Numbers the snapshots, so per-thread tables know which snapshot their entries are for.
static SNAPSHOTS: AtomicU64 = AtomicU64::new(1);

/// Everything that changes on reload, swapped as one snapshot.
pub struct State {
    pub config: Arc<Config>,
    /// Unique within the process (never 0): what the metric handle tables are keyed by.
    id: u64,
    /// The clients requests authenticate against: the token manager's own set
    /// ([`TokenManager::clients`]), so a key proven here is searched in every token too.
    clients: Arc<Clients>,
    /// Upstream links to `server.public_base_url`: this replica's own form of an answer.
    rewriter: Rewriter,
    /// Upstream links kept, stripped of `access_token`: the form the shared tier keeps.
    neutral: Rewriter,
    /// Authorities an absolute-form request target may name.
    own_hosts: Vec<String>,
    /// The `route` label of each route, built once so upstream calls only clone an `Arc`.
    labels: Vec<Arc<str>>,
    /// The `route` label of unmatched requests.
    other: Arc<str>,
    /// What the routes say writes invalidate, in the form other replicas read.
    rules: WriteRules,
}

impl State {
    pub fn new(config: Arc<Config>, clients: Arc<Clients>) -> State {
        let rewriter = Rewriter::new(&config.upstream.base_url, &config.server.public_base_url);
        let neutral = Rewriter::neutral(&config.upstream.base_url);
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
            neutral,
            own_hosts,
            labels: config
                .routes
                .iter()
                .map(|r| Arc::from(r.match_text.as_str()))
                .collect(),
            other: Arc::from("other"),
            rules: WriteRules::of(&config),
            config,
        }
    }

    /// The `route` label of a route index (`None`: unmatched), for an upstream call to own.
    fn route_label(&self, route: Option<usize>) -> Arc<str> {
        route.map_or_else(|| self.other.clone(), |i| self.labels[i].clone())
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
    /// The other replicas' route tables, read from Redis for writes.
    peers: tables::Peers,
    /// `max_concurrency` permits, one set for the process: a reload resizes it rather than
    /// making a new one, so repeated reloads never multiply the limit.
    in_flight: Arc<Semaphore>,
    /// `server.max_buffered_bytes`: every body held in memory at once.
    buffers: Arc<Buffers>,
    /// The last error answers, for the status page.
    recent_errors: recent::RecentErrors,
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
                state: RwLock::new(Arc::new(State::new(config, parts.token.clients()))),
                http: parts.http,
                token: parts.token,
                cache: parts.cache,
                merger: Merger::new(),
                budget: parts.budget,
                metrics: parts.metrics,
                last_upstream_status: AtomicU16::new(0),
                replicas: std::sync::OnceLock::new(),
                peers: tables::Peers::default(),
                in_flight: Arc::new(Semaphore::new(permits)),
                buffers,
                recent_errors: recent::RecentErrors::default(),
            }),
        }
    }

    /// Publishes every later purge and write invalidation to the other replicas, and
    /// announces the route table in force to them (now, and again while it runs), so their
    /// writes drop what this replica stores under it (see `tables`).
    pub async fn share_invalidations(&self, redis: crate::replicas::Redis) {
        if let Err(e) = redis.announce_table(&self.table()).await {
            tracing::warn!(error = %e, "the route table could not be announced yet; retried every 10 s");
        }
        let gateway = self.clone();
        redis.spawn_announcer(Arc::new(move || gateway.table()));
        let _ = self.inner.replicas.set(redis);
    }

    /// The route table in force, as the other replicas are told of it.
    pub fn table(&self) -> crate::replicas::Table {
        announced(&self.state().config)
    }

    /// The shared Redis, with several replicas.
    pub fn replicas(&self) -> Option<&crate::replicas::Redis> {
        self.inner.replicas.get()
    }

    /// The shared Redis as `/admin/status` shows it (`{"backend": "local"}` without one).
    pub fn redis_status(&self) -> serde_json::Value {
        match self.inner.replicas.get() {
            Some(redis) => redis.status(),
            None => serde_json::json!({"backend": "local"}),
        }
    }

    /// What a purge of `tags` drops on every replica: these, and for each write of this
    /// replica's table that would invalidate one of them, the tags every other live table
    /// names for that write (as for a write; see `tables`): a table that renamed a tag
    /// still has its entries of the same resource purged. A table's write naming several
    /// tags has them all dropped: an entry too many, never one kept.
    pub async fn purge_tags(&self, tags: Vec<String>) -> Vec<String> {
        let Some(redis) = self.inner.replicas.get() else {
            return tags;
        };
        let state = self.state();
        let mut all = tags.clone();
        for tag in &tags {
            for (method, path) in state.rules.writes_naming(tag) {
                let peers = &self.inner.peers;
                for t in peers
                    .tags(redis, &state.rules, Vec::new(), &method, &path)
                    .await
                {
                    if !all.contains(&t) {
                        all.push(t);
                    }
                }
            }
        }
        all
    }

    /// Tells the other replicas (if any) to drop what this one just dropped; how it went
    /// (`None` without replicas).
    pub async fn publish_invalidation(
        &self,
        what: crate::replicas::Invalidation,
    ) -> Option<crate::replicas::Published> {
        let redis = self.inner.replicas.get()?;
        Some(redis.publish(what).await)
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

    /// Swaps in a new configuration, with the clients the token manager holds tokens
    /// against (a reload sets them first); requests in flight finish on the old one.
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
        self.inner.budget.set_call_deadline(config.upstream.timeout);
        prime_metrics(&config, &self.inner.metrics, &self.inner.budget);
        let next = Arc::new(State::new(config, self.inner.token.clients()));
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

    /// Answers one client request through every layer of [`layer::stack`]. Never fails:
    /// every error becomes an envelope response.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use tower::ServiceExt;
        match layer::stack(self.clone()).oneshot(req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    }

    /// The domain steps, as plain async code since each needs the one before's result, in
    /// their one order: check target and account spelling → authenticate (reading a form
    /// body first when the key may be a field of it) → route → authorise → read body (key
    /// fields out) → cache and merge → budget → token → upstream → rewrite. A fresh hit
    /// takes the same steps as plain calls (`Gateway::fresh_hit`) and never enters it, so
    /// the layers wrap a small future.
    async fn pipeline<B>(
        &self,
        state: &Arc<State>,
        parts: http::request::Parts,
        body: B,
        outcome: &Exchange,
    ) -> Result<Response<Body>, GatewayError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let cfg = &state.config;

        // 1. Where the request may go: decided before anything else sees it.
        let target = target(&parts, state)?;
        let (path, query, path_account) = (&*target.path, target.query.as_deref(), target.account);

        // 2. Who is calling. The key may come in the header, the query or (as the API
        //    allows) a form field of the body; a body is then read before authenticating.
        let reads = parts.method == Method::GET || parts.method == Method::HEAD;
        if reads && request::announces_body(&parts.headers) {
            return Err(GatewayError::BadRequest(
                "a GET or HEAD request must not carry a body",
            ));
        }
        request::one_authorization(&parts.headers)?;
        request::one_content_type(&parts.headers)?;
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
            // Boxed: only a write with its key in a form body comes here.
            let (read, held) = Box::pin(read_body(
                parts.headers.get(header::CONTENT_LENGTH),
                body.take()
                    .ok_or(GatewayError::BadRequest("request body read twice"))?,
                &cfg.server,
                &self.inner.buffers,
                Party::Unauthenticated,
            ))
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
        let client = authenticate(state, key)?;
        outcome.set_client(client);

        // 3. Which route, and 4. may this client do this, here.
        let route = authorise(cfg, client, &parts.method, path, path_account, outcome)?;
        let rule = route.as_ref().map(|(i, caps)| (&cfg.routes[*i], caps));
        let route_index = route.as_ref().map(|(i, _)| *i);

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
        // The caller's key and every other client's in a header that would be forwarded:
        // refused before the cache is asked, so the answer never depends on what the cache
        // holds (headers are not part of the cache key, so a hit would not tell).
        if key_in_headers(state, key, &parts.headers) {
            return Err(GatewayError::BadRequest(KEY_ELSEWHERE));
        }
        // And wherever else they are left, checked just before anything is forwarded: a
        // cache hit forwards nothing and skips this scan (a hit for a path or query holding
        // a key cannot exist, since they are part of its key and its miss was refused; a
        // read has no body).
        let leaks = || -> Result<(), GatewayError> {
            let scan = KeyScan::new(&*state.clients, key);
            if scan.in_body(&body)
                || query.is_some_and(|q| scan.in_value(q.as_bytes()))
                || path
                    .split('/')
                    .any(|segment| scan.in_value(segment.as_bytes()))
            {
                return Err(GatewayError::BadRequest(KEY_ELSEWHERE));
            }
            Ok(())
        };

        let make_call = || Call {
            state: state.clone(),
            route_label: state.route_label(route_index),
            method: parts.method.clone(),
            url: upstream_url(cfg, path, query),
            headers: parts.headers.clone(),
            body: body.clone(),
            request_id: outcome.request_id(),
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
                        local: &state.rewriter,
                    },
                    outcome,
                )
                .await;
        }

        // 7. Writes. Boxed: the upstream call's future is several times the size of the rest
        //    of the pipeline, and kept inline it would be copied along with every cache hit's.
        leaks()?;
        let _permit = self.upstream_permit()?;
        Box::pin(self.write(make_call(), rule, path, outcome)).await
    }

    /// A fresh hit, answered without entering the async pipeline: the steps of
    /// [`Gateway::pipeline`] in its order, for a read whose body has ended (so is empty and
    /// holds no key). `None` wherever a step would refuse, wait or go upstream: the pipeline
    /// then runs them all, so each refusal is still made in one place.
    fn fresh_hit(
        &self,
        state: &State,
        parts: &http::request::Parts,
        outcome: &Exchange,
    ) -> Option<Response<Body>> {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            return None;
        }
        let target = target(parts, state).ok()?;
        let (path, query) = (&*target.path, target.query.as_deref());
        if request::announces_body(&parts.headers)
            || request::one_authorization(&parts.headers).is_err()
            || request::one_content_type(&parts.headers).is_err()
        {
            return None;
        }
        let header_key = client_key(&parts.headers, None);
        let query_keys = query.map(request::query_keys).unwrap_or_default();
        let key = request::one_key(header_key.as_deref(), query_keys.iter().map(|k| &**k)).ok()?;
        let client = authenticate(state, key).ok()?;
        outcome.set_client(client);
        let cfg = &state.config;
        let route = authorise(cfg, client, &parts.method, path, target.account, outcome).ok()?;
        if query.is_some_and(request::overrides_method)
            || key_in_headers(state, key, &parts.headers)
        {
            return None;
        }
        let query = strip_access_token(query);
        let rule = route.as_ref().map(|(i, caps)| (&cfg.routes[*i], caps));
        self.fresh(rule, path, query.as_deref(), &parts.headers, outcome)
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
    /// With other replicas, the tags are those of every route table they run (see `tables`).
    async fn write(
        &self,
        call: Call,
        rule: Option<(&RouteConfig, &Captures<'_>)>,
        path: &str,
        outcome: &Exchange,
    ) -> Result<Response<Body>, GatewayError> {
        outcome.set_cache("bypass");
        let own: Vec<String> = rule
            .map(|(r, caps)| r.invalidates.iter().map(|t| t.fill(caps)).collect())
            .unwrap_or_default();
        let path = path.to_string();
        // A write runs to its end in a task of its own: once it may have reached the
        // upstream, a client hanging up (or its request timing out) must not leave it half
        // done, its invalidations unapplied and the cache serving what it replaced.
        let gateway = self.clone();
        let fetched = tokio::spawn(async move {
            let fetched = gateway.call(&call).await?;
            if !fetched.status.is_success() {
                return Ok(fetched);
            }
            let tags = match gateway.inner.replicas.get() {
                Some(redis) => {
                    let (state, method) = (&call.state, &call.method);
                    let peers = &gateway.inner.peers;
                    peers.tags(redis, &state.rules, own, method, &path).await
                }
                None => own,
            };
            if !tags.is_empty() {
                gateway.inner.cache.invalidate_tags(&tags).await;
                gateway
                    .publish_invalidation(crate::replicas::Invalidation::Tags(tags))
                    .await;
            }
            Ok::<_, GatewayError>(fetched)
        })
        .await
        .map_err(|e| {
            GatewayError::from(crate::error::Unreachable::caused(
                "the write ended without an answer",
                e,
            ))
        })??;
        outcome.set_upstream(fetched.upstream_time, fetched.budget_wait);
        let mut resp = reply::from_parts(fetched.status, &fetched.headers, &fetched.body);
        resp.headers_mut().insert(
            CACHE_STATUS.clone(),
            reply::forward_status(Forward::Bypass, fetched.status, false, false),
        );
        Ok(resp)
    }
}

/// Where a request may go (step 1): its path and query in their one spelling, and the
/// account the path names.
struct Target<'p> {
    path: std::borrow::Cow<'p, str>,
    query: Option<std::borrow::Cow<'p, str>>,
    account: Option<u64>,
}

fn target<'p>(parts: &'p http::request::Parts, state: &State) -> Result<Target<'p>, GatewayError> {
    check_target(parts, &state.own_hosts)?;
    let path = canonical_path(parts.uri.path())?;
    let query = parts.uri.query().map(|q| normalise_escapes(q, false));
    if is_sim_control(&path) {
        return Err(GatewayError::NotFound(
            "paths under /_sim/ are the simulator's controls and are never forwarded",
        ));
    }
    // The account the path names, in its one canonical spelling: authorisation, routing,
    // the cache key and the upstream all read this same segment, so any other spelling
    // of a number there is refused before anything looks at it.
    let account = auth::account_of(&path).map_err(|e| GatewayError::BadRequest(e.0))?;
    Ok(Target {
        path,
        query,
        account,
    })
}

/// The client `key` names.
fn authenticate<'s>(state: &'s State, key: Option<&str>) -> Result<&'s auth::Client, GatewayError> {
    state.clients.authenticate(key).map_err(|e| match e {
        auth::AuthError::Missing => GatewayError::Unauthorized("a gateway client key is required"),
        auth::AuthError::Unknown => GatewayError::Unauthorized("unknown gateway client key"),
    })
}

/// Steps 3 and 4: the route `path` matches (on `outcome` at once, so a refusal carries it),
/// then whether `client` may do this, here: before the cache, so a client never gets a
/// cached answer for an account it may not see.
fn authorise<'a>(
    cfg: &'a Config,
    client: &auth::Client,
    method: &Method,
    path: &'a str,
    path_account: Option<u64>,
    outcome: &Exchange,
) -> Result<Option<(usize, Captures<'a>)>, GatewayError> {
    let route = cfg.find_route(method, path);
    outcome.set_route(route.as_ref().map(|(i, _)| *i));
    if !client.may_use(method) {
        return Err(GatewayError::Forbidden(format!(
            "client {} may not use {method}",
            client.name
        )));
    }
    // A route may capture `{account_id}` elsewhere than the first segment: it is read
    // by the same canonical rule, and both must be allowed.
    let captured = match route.as_ref().and_then(|(_, caps)| caps.get("account_id")) {
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
    Ok(route)
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

/// Why a request carrying a gateway key anywhere else is refused.
const KEY_ELSEWHERE: &str = "a gateway key may only be sent as the bearer token, the \
                             access_token parameter or the access_token form field, and only \
                             the caller's own";

/// Whether a header the gateway forwards upstream holds the caller's key (`own`) or any
/// client's, in any spelling the scan knows. Asked of every request before its cache
/// lookup, hits too: the headers' values only, a few hundred bytes for most requests.
fn key_in_headers(state: &State, own: Option<&str>, headers: &http::HeaderMap) -> bool {
    let scan = KeyScan::new(&*state.clients, own);
    headers
        .iter()
        .filter(|(name, _)| forward::forwarded(name))
        .any(|(_, v)| scan.in_value(v.as_bytes()))
}
