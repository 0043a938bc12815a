//! The read path (GET and HEAD): cache lookup, merging, stale answers.
//!
//! A fresh entry answers at once. A stale entry within stale-while-revalidate answers at
//! once and starts one background refresh. Otherwise identical requests in flight share one
//! upstream call (cacheable or not); its answer is stored if the route allows, and an entry
//! within stale-if-error stands in when the call fails, times out or finds no budget.

use std::sync::Arc;
use std::time::Duration;

use http::{header, HeaderMap, Method, Response, StatusCode};
use tokio::time::Instant;

use super::call::Call;
use super::forward::{self, Fetched};
use super::layer::Exchange;
use super::reply::{self, Forward, CACHE_STATUS};
use super::Gateway;
use crate::cache::{
    CachedResponse, Failure, Fill, Freshness, Joined, Localize, Peer, Progress, Role, Since,
    StoredResponse, Take, Variant,
};
use crate::config::{Captures, RouteConfig};
use crate::error::{Body, GatewayError};

/// What one merged upstream call produced, shared by every waiter.
pub type Shared = Result<Arc<Answer>, Arc<GatewayError>>;

/// An upstream answer and whether it was stored.
#[derive(Debug)]
pub struct Answer {
    pub fetched: Fetched,
    pub stored: bool,
    /// The variant the leader's request selected (by the answer's `Vary`): a merged
    /// follower that selects another is not served this answer.
    pub variant: Variant,
    /// A fresh entry found once the call's budget wait was over, in place of calling the
    /// upstream: another request filled the cache meanwhile. Its callers answer a hit.
    pub cached: Option<StoredResponse>,
    /// Another flight's answer, taken by a call that found that flight already on its way
    /// upstream: its callers were merged, whatever role they had in their own flight.
    pub merged: bool,
    /// `cached` is another replica's fill that this one waited for (merged across
    /// replicas): its callers answer as collapsed into that fill.
    pub filled_elsewhere: bool,
}

impl Answer {
    /// The answer `entry` gives a request with `request` headers, after `waited` for budget.
    fn from_cache(
        entry: StoredResponse,
        waited: std::time::Duration,
        request: &HeaderMap,
    ) -> Answer {
        let headers: HeaderMap = entry.headers().collect();
        let variant = Variant::of(&headers, request);
        Answer {
            fetched: Fetched {
                status: entry.status(),
                headers,
                body: entry.body(),
                upstream_time: std::time::Duration::ZERO,
                budget_wait: waited,
                held: super::Held::default(),
                neutral: None,
            },
            stored: false,
            variant,
            cached: Some(entry),
            merged: false,
            filled_elsewhere: false,
        }
    }

    /// Another replica's answer to the key, `entry` from the shared tier, for a request with
    /// `request` headers that waited `waited` for budget: its callers answer as collapsed.
    fn filled_elsewhere(
        entry: StoredResponse,
        waited: std::time::Duration,
        request: &HeaderMap,
    ) -> Answer {
        Answer {
            filled_elsewhere: true,
            ..Answer::from_cache(entry, waited, request)
        }
    }

    /// `self`, as taken by a call of another flight that waited `waited` for budget.
    fn merged(&self, waited: std::time::Duration) -> Answer {
        let f = &self.fetched;
        Answer {
            fetched: Fetched {
                status: f.status,
                headers: f.headers.clone(),
                body: f.body.clone(),
                upstream_time: f.upstream_time,
                budget_wait: waited,
                // Clones share one holding: the bytes are counted once.
                held: f.held.clone(),
                // Only the call that fetched it stores an answer.
                neutral: None,
            },
            stored: self.stored,
            variant: self.variant.clone(),
            cached: self.cached.clone(),
            merged: true,
            filled_elsewhere: false,
        }
    }
}

/// The client's cache directives (RFC 9111 5.2.1).
#[derive(Debug, Default, Clone, Copy)]
struct Directives {
    /// `no-cache`, `max-age=0`, or `Pragma: no-cache` without `Cache-Control`: refetch.
    no_cache: bool,
    no_store: bool,
    /// `max-age=N` (N above 0): a stored answer older than N seconds is not taken.
    max_age: Option<u64>,
    /// `min-fresh=N`: a stored answer is taken only while it stays fresh at least N more
    /// seconds (RFC 9111 5.2.1.3); a stale one not at all.
    min_fresh: Option<u64>,
    /// `max-stale[=N]`: a stale stored answer is taken as it is, stale by at most N
    /// seconds (`None` inside: by any time) (RFC 9111 5.2.1.2).
    max_stale: Option<Option<u64>>,
}

impl Directives {
    /// The client will not take `entry`: older than its `max-age`, or fresh for less than
    /// its `min-fresh`.
    fn refuses(&self, entry: &StoredResponse, now: Instant) -> bool {
        let too_old = self
            .max_age
            .is_some_and(|most| entry.age(now).as_secs() > most);
        let too_short = self
            .min_fresh
            .is_some_and(|least| match entry.freshness(now) {
                Freshness::Fresh { remaining } => remaining < Duration::from_secs(least),
                Freshness::Stale { .. } => true,
            });
        too_old || too_short
    }

    /// The client takes an answer stale by `past` as it is (`max-stale`).
    fn takes_stale(&self, past: Duration) -> bool {
        self.max_stale
            .is_some_and(|most| most.is_none_or(|most| past.as_secs() <= most))
    }
}

/// A directive's delta-seconds (RFC 9111 1.2.2): `None` for anything but digits; past
/// what fits, as good as forever.
fn delta_seconds(argument: Option<&str>) -> Option<u64> {
    let n = argument.filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))?;
    Some(n.parse::<u64>().unwrap_or(u64::MAX))
}

fn directives(headers: &HeaderMap) -> Directives {
    let mut d = Directives::default();
    let mut max_age: Option<u64> = None;
    for value in headers.get_all(header::CACHE_CONTROL) {
        for part in value.to_str().unwrap_or("").split(',') {
            let part = part.trim().to_ascii_lowercase();
            let (name, argument) = match part.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim().trim_matches('"'))),
                None => (part.as_str(), None),
            };
            match (name, argument) {
                ("no-cache", _) => d.no_cache = true,
                ("no-store", _) => d.no_store = true,
                // Delta-seconds past what fits are as good as forever (RFC 9111 1.2.2); a
                // value that is no number says nothing. The strictest of several counts.
                ("max-age", n) => {
                    if let Some(n) = delta_seconds(n) {
                        max_age = Some(max_age.map_or(n, |m| m.min(n)));
                    }
                }
                ("min-fresh", n) => {
                    if let Some(n) = delta_seconds(n) {
                        d.min_fresh = Some(d.min_fresh.map_or(n, |m| m.max(n)));
                    }
                }
                // Without a value: stale by any time. Several: the strictest.
                ("max-stale", None) => d.max_stale = Some(d.max_stale.unwrap_or(None)),
                ("max-stale", n) => {
                    if let Some(n) = delta_seconds(n) {
                        d.max_stale = Some(Some(match d.max_stale {
                            Some(Some(m)) => m.min(n),
                            _ => n,
                        }));
                    }
                }
                _ => {}
            }
        }
    }
    // An answer no older than 0 s is one fetched for this request: the same as no-cache.
    match max_age {
        Some(0) => d.no_cache = true,
        other => d.max_age = other,
    }
    // `Pragma` counts only without `Cache-Control` (RFC 9111 5.4).
    let pragma = || {
        headers.get_all(header::PRAGMA).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("no-cache"))
        })
    };
    if !headers.contains_key(header::CACHE_CONTROL) && pragma() {
        d.no_cache = true;
    }
    d
}

/// What the cache lookup of a read hands on to the upstream path.
struct Upstream {
    key: String,
    directives: Directives,
    /// The route has a ttl and the client did not say `no-store`.
    cacheable: bool,
    /// A stored answer was there but the client's `max-age` refused it.
    too_old: bool,
    /// An entry past its ttl that stale-if-error still allows.
    stale_fallback: Option<StoredResponse>,
    /// What the shared tier's lookup found the fetch must carry, when one was made.
    since: Option<Since>,
}

/// What a read sends upstream if the cache cannot answer it: `call` builds the request,
/// once `leaks` (the check that no gateway key would travel with it) has passed.
pub(super) struct ToForward<'a, F> {
    pub leaks: &'a (dyn Fn() -> Result<(), GatewayError> + Sync),
    pub call: F,
    /// Makes an entry taken from the shared cache tier this replica's own.
    pub local: &'a dyn Localize,
}

impl Gateway {
    /// Answers a GET or HEAD. `call` is what goes upstream if it must, once `leaks` (the
    /// check that no gateway key would travel with it) has passed.
    pub(super) async fn read(
        &self,
        route: Option<(&RouteConfig, &Captures<'_>)>,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        forward: ToForward<'_, impl Fn() -> Call>,
        outcome: &Exchange,
    ) -> Result<Response<Body>, GatewayError> {
        let ToForward {
            leaks,
            call: client_call,
            local,
        } = forward;
        let inner = &self.inner;
        let d = directives(headers);
        let key = crate::cache::cache_key(&Method::GET, path, query);
        let ttl = route.and_then(|(r, _)| r.ttl).filter(|_| !d.no_store);
        let mut stale_fallback: Option<StoredResponse> = None;
        let cacheable = ttl.is_some();
        // A cacheable read goes up without the client's conditions: its answer is stored
        // and shared, so it must be the whole answer, and the conditions are answered here
        // from it. An uncached read forwards them (and merges only with the same ones).
        let make_call = || {
            let mut call = client_call();
            if cacheable {
                for name in forward::CONDITIONAL {
                    call.headers.remove(name);
                }
            }
            call
        };
        let answered = |resp: Response<Body>| {
            if cacheable {
                answer_conditions(resp, headers)
            } else {
                resp
            }
        };

        let mut since = None;
        let mut too_old = false;
        if ttl.is_some() && !d.no_cache {
            let mut found = inner.cache.get(&key, headers).await;
            let mut shared_hit = false;
            // Nothing fresh in memory (or nothing young enough for the client's `max-age`):
            // the shared tier may hold what another replica fetched.
            let usable = |e: &StoredResponse| is_fresh(e) && !d.refuses(e, Instant::now());
            if inner.cache.shared().is_some() && !found.as_ref().is_some_and(usable) {
                let tags = route_tags(route);
                let secrets = inner.token.secrets();
                let exposed: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
                let routed = crate::cache::Routed {
                    local,
                    windows: route.map_or(NO_WINDOWS, |(r, _)| crate::cache::Windows {
                        ttl: r.ttl.unwrap_or_default(),
                        stale_while_revalidate: r.stale_while_revalidate,
                        stale_if_error: r.stale_if_error,
                    }),
                    secrets: &exposed,
                };
                // Boxed: the shared tier's future is large and only this rare path needs it;
                // inline it would make every hit's future (which the layers box) that size.
                let (entry, looked_up) =
                    Box::pin(inner.cache.get_shared(&key, headers, &tags, &routed)).await;
                if entry.is_some() {
                    found = entry;
                    shared_hit = true;
                }
                since = Some(looked_up);
            }
            // Older than the client's `max-age` allows, or not fresh for its `min-fresh`:
            // refetched as for no-cache.
            if found.as_ref().is_some_and(|e| d.refuses(e, Instant::now())) {
                found = None;
                too_old = true;
            }
            if let Some(entry) = found {
                let now = Instant::now();
                match entry.freshness(now) {
                    Freshness::Fresh { remaining } => {
                        return Ok(hit(&entry, now, remaining, shared_hit, headers, outcome));
                    }
                    Freshness::Stale {
                        past,
                        revalidate: true,
                        ..
                    } => {
                        // The revalidation forwards this request's headers.
                        leaks()?;
                        outcome.set_cache("stale");
                        let since = since.unwrap_or_else(|| inner.cache.since());
                        self.revalidate(key, since, route, upstream_get(&make_call));
                        let resp = reply::from_entry(&entry, entry.age(now), Err(past));
                        return Ok(answered(resp));
                    }
                    // Stale, and the client takes it so (`max-stale`): as it is.
                    Freshness::Stale { past, .. } if d.takes_stale(past) => {
                        outcome.set_cache("stale");
                        let resp = reply::from_entry(&entry, entry.age(now), Err(past));
                        return Ok(answered(resp));
                    }
                    Freshness::Stale { if_error: true, .. } => stale_fallback = Some(entry),
                    Freshness::Stale { .. } => {}
                }
            }
        }
        // Boxed: merging and the upstream call make a future several times the size of the
        // lookup's, and kept inline it would be copied along with every hit's.
        let upstream = Upstream {
            key,
            directives: d,
            cacheable: ttl.is_some(),
            too_old,
            stale_fallback,
            since,
        };
        leaks()?;
        Box::pin(self.read_upstream(route, upstream, headers, make_call, outcome))
            .await
            .map(answered)
    }

    /// The answer of an entry in memory still fresh for this read, counted as a hit.
    /// `None` (nothing counted) for anything else: [`Gateway::read`] then looks and counts.
    pub(super) fn fresh(
        &self,
        route: Option<(&RouteConfig, &Captures<'_>)>,
        path: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        outcome: &Exchange,
    ) -> Option<Response<Body>> {
        let d = directives(headers);
        if route.and_then(|(r, _)| r.ttl).is_none() || d.no_store || d.no_cache {
            return None;
        }
        let key = crate::cache::cache_key(&Method::GET, path, query);
        let now = Instant::now();
        let (entry, remaining) = self.inner.cache.get_fresh(&key, headers, now)?;
        if d.refuses(&entry, now) {
            return None;
        }
        Some(hit(&entry, now, remaining, false, headers, outcome))
    }

    /// The rest of a read that the cache could not answer fresh: one merged upstream call,
    /// stored if allowed, with a stale entry standing in if the call fails.
    async fn read_upstream(
        &self,
        route: Option<(&RouteConfig, &Captures<'_>)>,
        upstream: Upstream,
        headers: &HeaderMap,
        make_call: impl Fn() -> Call,
        outcome: &Exchange,
    ) -> Result<Response<Body>, GatewayError> {
        // Only now a `max_concurrency` permit: hits above needed none.
        let _permit = self.upstream_permit()?;
        let inner = &self.inner;
        let Upstream {
            key,
            directives: d,
            cacheable,
            too_old,
            stale_fallback,
            since,
        } = upstream;
        let fwd = match (cacheable, d.no_cache || too_old) {
            (false, _) => Forward::Bypass,
            (true, true) => Forward::Request,
            (true, false) => Forward::Miss,
        };
        // The epoch in the merge key keeps a read that comes after a write from joining a
        // call that was already in flight before it (its answer may predate the write).
        let since = since.unwrap_or_else(|| inner.cache.since());
        let epoch = since.epoch();
        let mut merge_key = if d.no_store {
            format!("{epoch} no-store {key}")
        } else {
            format!("{epoch} {key}")
        };
        // An uncached read carries its caller's conditions upstream: it shares its call only
        // with readers that sent the same ones, so no one gets a 304 made for another.
        if !cacheable {
            for name in forward::CONDITIONAL {
                for value in headers.get_all(name) {
                    merge_key.push_str(&format!(
                        "\n{name}: {}",
                        String::from_utf8_lossy(value.as_bytes())
                    ));
                }
            }
        }
        let call = upstream_get(&make_call);
        let client = call.client.clone();
        // A follower's own terms: behind a flight still queued for another client's budget
        // it asks its own budget at once, as it would alone, and the first of the two past
        // its queue answers both (see `Merger::run_own`); a leader's refusal is not its
        // refusal. Its deadline counts from its arrival: whatever it runs itself afterwards
        // (its own call, or a flight of its own variant) waits only for the rest. Behind a
        // flight whose cells are booked on the global share for a time within its own
        // `max_wait` it books nothing and follows: alone it would go no sooner.
        let arrived = tokio::time::Instant::now();
        let patience = std::time::Duration::ZERO;
        let follow_by = Some(arrived + inner.budget.max_wait(&client));
        let fetch = self.fetch_and_store(key.clone(), since.clone(), route, call, Some(arrived));
        // Labelled before waiting, so a request timeout while waiting still says how the
        // cache took it.
        outcome.set_cache(reply::forward_label(fwd, false));
        // A read that will not be cached is of use to its callers only: once they have all
        // hung up it is cancelled, budget and upstream connection with it. A cacheable one
        // runs on to fill the cache for whoever asks next.
        let only_while_wanted = !cacheable;
        let mut flight_key = merge_key.clone();
        let mut shared = inner
            .merger
            .run_patient(
                merge_key.clone(),
                fetch,
                patience,
                follow_by,
                only_while_wanted,
            )
            .await;
        // An answer that varies on a request header serves only the followers that sent
        // what the leader sent: the others merge among themselves, by their own variant.
        if let Ok(Joined::Followed(Ok(answer), _)) = &shared {
            let mine = Variant::of(&answer.fetched.headers, headers);
            if !answer.variant.serves(&mine) {
                let own = match &mine {
                    Variant::Of(selected) => format!("{merge_key}\n{selected}"),
                    _ => format!("{merge_key}\n* {}", fastrand::u64(..)),
                };
                let call = upstream_get(&make_call);
                let fetch = self.fetch_and_store(key, since, route, call, Some(arrived));
                flight_key.clone_from(&own);
                shared = inner
                    .merger
                    .run_patient(own, fetch, patience, follow_by, only_while_wanted)
                    .await;
            }
        }
        let unreachable = |e: crate::cache::MergeError| -> Shared {
            Err(Arc::new(GatewayError::from(
                crate::error::Unreachable::caused(e.to_string(), e),
            )))
        };
        // A follower on its own terms runs its fetch as a flight of its own: once past its
        // queue it stands in the map for its key (or joins a call already sent), so reads
        // queued behind it take its answer instead of calling again. The fetches were made
        // to count from this caller's arrival (above).
        let own_terms = |own| async {
            inner
                .merger
                .run_own(flight_key.clone(), own, only_while_wanted)
                .await
                .unwrap_or_else(unreachable)
        };
        let (value, role) = match shared {
            Ok(Joined::Led(v)) => (v, Role::Leader),
            Ok(Joined::Followed(v, own)) if refused_by_budget(&v) => {
                (own_terms(own).await, Role::Leader)
            }
            Ok(Joined::Followed(v, _)) => (v, Role::Follower),
            Ok(Joined::Impatient(own, behind)) => {
                let mine = own_terms(own).await;
                // Refused alone, it still takes the answer of the flight it left when that
                // one's budget decides within this read's own wait: a 429 then would refuse
                // a read the gateway answers within its max_wait anyway.
                let deadline = arrived + inner.budget.longest_wait(&client);
                let by_a_share = matches!(&mine, Err(e) if refused_by_a_share(e));
                if by_a_share && behind.due_by(deadline) {
                    match behind.value().await {
                        Ok(Ok(answer))
                            if answer
                                .variant
                                .serves(&Variant::of(&answer.fetched.headers, headers)) =>
                        {
                            (Ok(answer), Role::Follower)
                        }
                        Ok(theirs) if !refused_by_budget(&theirs) && theirs.is_err() => {
                            (theirs, Role::Follower)
                        }
                        _ => (mine, Role::Leader),
                    }
                } else {
                    (mine, Role::Leader)
                }
            }
            Err(e) => (unreachable(e), Role::Leader),
        };
        let elsewhere = value
            .as_ref()
            .ok()
            .filter(|a| a.filled_elsewhere)
            .and_then(|a| a.cached.as_ref());
        if let Some(entry) = elsewhere {
            // Collapsed into another replica's fill of this key, taken from the shared tier.
            let now = Instant::now();
            outcome.set_cache(reply::forward_label(fwd, true));
            inner
                .metrics
                .coalesced
                .with_label_values(&[outcome.route_label()])
                .inc();
            let fresh_for = match entry.freshness(now) {
                Freshness::Fresh { remaining } => Ok(remaining),
                Freshness::Stale { past, .. } => Err(past),
            };
            let mut resp = reply::from_entry(entry, entry.age(now), fresh_for);
            resp.headers_mut().insert(
                CACHE_STATUS.clone(),
                reply::filled_elsewhere_status(entry.status()),
            );
            return Ok(resp);
        }
        if let Some(entry) = value.as_ref().ok().and_then(|a| a.cached.as_ref()) {
            // The cache answered once the budget wait was over: a hit (stale only if it aged
            // past its ttl in the instant since).
            let now = Instant::now();
            outcome.set_budget_wait(value.as_ref().ok().map(|a| a.fetched.budget_wait));
            let fresh_for = match entry.freshness(now) {
                Freshness::Fresh { remaining } => {
                    outcome.set_cache("hit");
                    Ok(remaining)
                }
                Freshness::Stale { past, .. } => {
                    outcome.set_cache("stale");
                    Err(past)
                }
            };
            return Ok(reply::from_entry(entry, entry.age(now), fresh_for));
        }
        let collapsed = role == Role::Follower || value.as_ref().is_ok_and(|answer| answer.merged);
        if collapsed {
            inner
                .metrics
                .coalesced
                .with_label_values(&[outcome.route_label()])
                .inc();
        }
        let failed = match &value {
            // The upstream's 429 means no budget upstream: stale-if-error covers it too.
            Ok(a) => {
                a.fetched.status.is_server_error()
                    || a.fetched.status == StatusCode::TOO_MANY_REQUESTS
            }
            Err(e) => matches!(
                **e,
                GatewayError::UpstreamUnreachable(_)
                    | GatewayError::UpstreamTimeout(_)
                    | GatewayError::RateLimited { .. }
                    | GatewayError::TokenUnavailable(_)
            ),
        };
        if failed {
            if let Some(entry) = stale_fallback.filter(|e| e.freshness(Instant::now()).is_usable())
            {
                let now = Instant::now();
                let past = entry.age(now).saturating_sub(entry.ttl());
                outcome.set_cache("stale");
                return Ok(reply::from_entry(&entry, entry.age(now), Err(past)));
            }
        }
        outcome.set_cache(reply::forward_label(fwd, collapsed));
        let answer = value.map_err(|e| clone_error(&e))?;
        let f = &answer.fetched;
        outcome.set_upstream(f.upstream_time, f.budget_wait);
        let mut resp = reply::from_parts(f.status, &f.headers, &f.body);
        let stored = answer.stored && !collapsed;
        resp.headers_mut().insert(
            CACHE_STATUS.clone(),
            reply::forward_status(fwd, f.status, stored, collapsed),
        );
        Ok(resp)
    }

    /// Starts one background refresh for a stale entry (merged with any refresh already
    /// running for the key); the client that found the stale entry does not wait for it.
    fn revalidate(
        &self,
        key: String,
        since: Since,
        route: Option<(&RouteConfig, &Captures<'_>)>,
        call: Call,
    ) {
        let merge_key = format!("{} {key}", since.epoch());
        let fetch = self.fetch_and_store(key, since, route, call, None);
        let merger = self.inner.merger.clone();
        tokio::spawn(async move {
            let _ = merger
                .run_patient(merge_key, fetch, std::time::Duration::MAX, None, false)
                .await;
        });
    }

    /// The merged upstream call: fetch, then store a storable answer under `key` unless an
    /// invalidation ran after `since` (taken before the upstream was asked; with a shared
    /// tier, its generations are read first if `since` has none). `arrived`: when the caller
    /// it runs for arrived, so its budget wait counts from then.
    fn fetch_and_store(
        &self,
        key: String,
        since: Since,
        route: Option<(&RouteConfig, &Captures<'_>)>,
        call: Call,
        arrived: Option<tokio::time::Instant>,
    ) -> impl FnOnce(Progress<Shared>) -> Fetch {
        let gateway = self.clone();
        let rule = route.and_then(|(r, caps)| {
            r.ttl.map(|ttl| {
                let tags: Box<[String]> = r.tags.iter().map(|t| t.fill(caps)).collect();
                (ttl, r.stale_while_revalidate, r.stale_if_error, tags)
            })
        });
        let d = directives(&call.headers);
        let Directives {
            no_cache, no_store, ..
        } = d;
        move |progress: Progress<Shared>| -> Fetch {
            let progress = match arrived {
                Some(at) => progress.since(at),
                None => progress,
            };
            let fetch = move |gateway: Gateway,
                              call: Call,
                              key: String,
                              since: Since,
                              rule: Option<Rule>,
                              progress: Progress<Shared>| async move {
                // Between this read's lookup and its joining the map, a flight of the key may
                // have ended and stored its answer: that entry answers, and no budget is
                // asked (a spent budget must not refuse what the cache holds).
                if rule.is_some() && !no_cache && !no_store {
                    let now = Instant::now();
                    if let Some(entry) = gateway
                        .inner
                        .cache
                        .recheck(&key, &call.headers)
                        .filter(|e| matches!(e.freshness(now), Freshness::Fresh { .. }))
                        .filter(|e| !d.refuses(e, now))
                    {
                        let answer =
                            Answer::from_cache(entry, std::time::Duration::ZERO, &call.headers);
                        return Ok(Arc::new(answer));
                    }
                }
                // A miss looked up in the shared tier is merged with the same miss on the
                // other replicas: the one whose budget lets it through first takes the key's
                // fill lock and calls, the others take its answer from Redis (see
                // `cache::FillLock`). Waiting for that call is bounded as `fill_patience` says.
                let cache = &gateway.inner.cache;
                // Not for a client's `max-age`: another replica's entry would need its age
                // checked at each step, and such reads are rare; they merge here alone.
                let mut across = rule.is_some()
                    && !no_cache
                    && !no_store
                    && d.max_age.is_none()
                    && d.min_fresh.is_none();
                // Another replica's answer is held to this replica's own windows.
                let windows = rule.as_ref().map_or(NO_WINDOWS, |r| crate::cache::Windows {
                    ttl: r.0,
                    stale_while_revalidate: r.1,
                    stale_if_error: r.2,
                });
                let secrets = gateway.inner.token.secrets();
                let exposed: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
                let routed = crate::cache::Routed {
                    local: &call.state.rewriter,
                    windows,
                    secrets: &exposed,
                };
                let deadline = Instant::now()
                    + fill_patience(&call.state.config, &call.client)
                        .saturating_sub(progress.waited());
                // A peer is tried once: when it gives nothing this call can use (another
                // variant, or it ended without a value), the call goes on its own terms. So
                // is another replica's call seen while queued: its queue is given up once.
                let mut tried_peer = false;
                let mut watched = false;
                let mut followed = false;
                let mut lock = None;
                let admitted = loop {
                    if across {
                        // Another replica is calling for the key: its answer, no budget spent.
                        // Waiting for it is no budget queue: this replica's callers merged
                        // behind this one wait for it too.
                        let waiting = || progress.sent();
                        match cache
                            .await_fill(&key, &call.headers, &since, deadline, waiting, &routed)
                            .await
                        {
                            Fill::Filled(entry) => {
                                return Ok(Arc::new(Answer::filled_elsewhere(
                                    entry,
                                    progress.waited(),
                                    &call.headers,
                                )));
                            }
                            Fill::Failed(failure) => {
                                return failed_elsewhere(failure, progress.waited(), &call.headers);
                            }
                            Fill::Free => {}
                            Fill::Alone => across = false,
                        }
                    }
                    // The same miss queued on a replica with its cells booked for a time
                    // within this one's max_wait: its call, not cells of this one's own (see
                    // `Store::queued_for`). Told so, this flight's followers that cannot wait
                    // that long go their own way.
                    if across && !followed {
                        followed = true;
                        let own_deadline = progress.arrived().unwrap_or_else(Instant::now)
                            + gateway.inner.budget.max_wait(&call.client);
                        let noted = cache.queued_for(&key, &since).await;
                        if let Some(at) = noted.filter(|&at| at <= own_deadline) {
                            progress.booked(at);
                            let filled = cache
                                .follow_queued(&key, &call.headers, &since, at, deadline, &routed)
                                .await;
                            if let Some(entry) = filled {
                                return Ok(Arc::new(Answer::filled_elsewhere(
                                    entry,
                                    progress.waited(),
                                    &call.headers,
                                )));
                            }
                            // It came to nothing: this flight is deciding on its own again.
                            progress.queued_until(Some(own_deadline));
                        }
                    }
                    // While queued, a call of the same key that another client's terms let
                    // go at once may take this flight's place, here or on another replica:
                    // this one takes its answer then, and its queued cells go back (or are
                    // burnt when others queued behind them, as for any cancelled wait).
                    // A miss its budget makes wait says so in Redis, so the same miss
                    // refused on another replica waits for this one's call (see below).
                    let note = async {
                        if let Some(at) = progress.booked_for().await {
                            cache.note_queued(&key, &since, at).await;
                        }
                        std::future::pending::<()>().await
                    };
                    let turn = tokio::select! {
                        admitted = gateway.admit_reporting(&call, &progress) => {
                            Turn::Admitted(admitted)
                        }
                        () = note, if across => unreachable!("the note never resolves"),
                        peer = progress.displaced(), if !tried_peer => Turn::Join(peer),
                        started = cache.fill_started(&key, &call.headers, &since, &routed),
                            if across && !watched => Turn::Elsewhere(started),
                    };
                    let admitted = match turn {
                        // Refused by its budget while the same miss queues on a replica
                        // whose budget decides within this one's max_wait: that call's
                        // answer, not a 429 for a read the fleet fetches anyway.
                        Turn::Admitted(Err(refused)) if across && refused_by_a_share(&refused) => {
                            let budget_deadline = progress.arrived().unwrap_or_else(Instant::now)
                                + gateway.inner.budget.longest_wait(&call.client);
                            let filled = cache
                                .await_queued_fill(
                                    &key,
                                    &call.headers,
                                    &since,
                                    budget_deadline,
                                    deadline,
                                    &routed,
                                )
                                .await;
                            return match filled {
                                Some(entry) => Ok(Arc::new(Answer::filled_elsewhere(
                                    entry,
                                    progress.waited(),
                                    &call.headers,
                                ))),
                                None => Err(Arc::new(refused)),
                            };
                        }
                        Turn::Admitted(admitted) => admitted.map_err(Arc::new)?,
                        Turn::Join(peer) => {
                            tried_peer = true;
                            match peer_answer(peer, &call.headers, progress.waited()).await {
                                Some(answer) => return answer,
                                None => continue,
                            }
                        }
                        Turn::Elsewhere(Some(entry)) => {
                            return Ok(Arc::new(Answer::filled_elsewhere(
                                entry,
                                progress.waited(),
                                &call.headers,
                            )));
                        }
                        Turn::Elsewhere(None) => {
                            watched = true;
                            continue;
                        }
                    };
                    // While this call queued for budget, another request for the key (one
                    // whose client's terms let it go at once) may have filled the cache: its
                    // entry answers, and the cells go back unspent (not for a client that
                    // said no-cache or no-store: the cache may not answer it).
                    if rule.is_some() && !no_cache && !no_store {
                        let found = cache.recheck(&key, &call.headers);
                        let now = Instant::now();
                        if let Some(entry) = found
                            .filter(|e| matches!(e.freshness(now), Freshness::Fresh { .. }))
                            .filter(|e| !d.refuses(e, now))
                        {
                            gateway.inner.budget.refund(&call.client, admitted.ticket);
                            let answer = Answer::from_cache(entry, admitted.waited, &call.headers);
                            return Ok(Arc::new(answer));
                        }
                    }
                    // Or that request is still on its way upstream: its answer will do, and
                    // the cells go back the same way.
                    let peer = if tried_peer {
                        None
                    } else {
                        progress.take_place()
                    };
                    if let Some(peer) = peer {
                        tried_peer = true;
                        gateway.inner.budget.refund(&call.client, admitted.ticket);
                        if let Some(answer) =
                            peer_answer(peer, &call.headers, admitted.waited).await
                        {
                            return answer;
                        }
                        continue;
                    }
                    // Only now, about to call, the fill lock: another replica that took it
                    // first is calling already, and its answer will do (the cells go back).
                    if across {
                        match cache.take_fill(&key, &call.headers, &since, &routed).await {
                            Take::Holder(held) => lock = Some(held),
                            Take::Filled(entry) => {
                                gateway.inner.budget.refund(&call.client, admitted.ticket);
                                let answer =
                                    Answer::filled_elsewhere(entry, admitted.waited, &call.headers);
                                return Ok(Arc::new(answer));
                            }
                            Take::Busy => {
                                gateway.inner.budget.refund(&call.client, admitted.ticket);
                                continue;
                            }
                            Take::Alone => {}
                        }
                    }
                    break admitted;
                };
                let since = match &rule {
                    Some((_, _, _, tags)) if !no_store => {
                        gateway
                            .inner
                            .cache
                            .with_generations(since, &key, tags, routed.windows)
                            .await
                    }
                    _ => since,
                };
                let mut fetched = match gateway.send_admitted(&call, admitted).await {
                    Ok(fetched) => fetched,
                    Err(e) => {
                        // The replicas waiting on this call take its failure, rather than
                        // each call again in turn (any other error releases the lock plainly
                        // as it drops: each waiter's own terms decide).
                        if let Some(failure) = failure_of_error(&e) {
                            if let Some(held) = lock.take() {
                                held.release_failed(&failure).await;
                            }
                        }
                        return Err(Arc::new(e));
                    }
                };
                let storable = crate::cache::stored_status(fetched.status)
                    && !no_store
                    && !sets_cookie(&fetched.headers)
                    && !cache_control_forbids(&fetched.headers);
                let stored = match rule {
                    Some((ttl, swr, sie, tags)) if storable => {
                        // The body may be a slice of a much larger read buffer; an exact copy
                        // keeps a long-lived entry from pinning that buffer (once per miss).
                        fetched.body = bytes::Bytes::copy_from_slice(&fetched.body);
                        // The form the shared tier keeps, when this replica's differs.
                        let neutral = fetched.neutral.take().map(|neutral| {
                            let (headers, body) = *neutral;
                            (
                                reply::storable_headers(&headers),
                                bytes::Bytes::copy_from_slice(&body),
                            )
                        });
                        let entry = CachedResponse {
                            status: fetched.status,
                            headers: reply::storable_headers(&fetched.headers),
                            body: fetched.body.clone(),
                            tags,
                            stored_at: Instant::now(),
                            ttl,
                            stale_while_revalidate: swr,
                            stale_if_error: sie,
                        };
                        gateway
                            .inner
                            .cache
                            .insert_fetched(key, &call.headers, entry, neutral, &since, lock.take())
                            .await
                    }
                    _ => false,
                };
                // Not stored: nothing for the waiting replicas to find. An error answer is
                // theirs too, as it is this replica's followers': it goes with the lock's
                // release. Otherwise they go on their own now. (A stored answer's lock is
                // released once it is in the shared tier.)
                if let Some(lock) = lock {
                    if Failure::noted(fetched.status) {
                        let (headers, body) = match &fetched.neutral {
                            Some(neutral) => (&neutral.0, &neutral.1),
                            None => (&fetched.headers, &fetched.body),
                        };
                        let failure = Failure::Answered {
                            status: fetched.status,
                            headers: reply::storable_headers(headers),
                            body: body.clone(),
                        };
                        lock.release_failed(&failure).await;
                    } else {
                        lock.release().await;
                    }
                }
                let variant = Variant::of(&fetched.headers, &call.headers);
                Ok(Arc::new(Answer {
                    fetched,
                    stored,
                    variant,
                    cached: None,
                    merged: false,
                    filled_elsewhere: false,
                }))
            };
            Box::pin(fetch(gateway, call, key, since, rule, progress))
        }
    }
}

/// How long, from its arrival, a miss may wait for other replicas' calls of its key: no
/// longer than it would have spent alone at most, its own budget wait and an upstream call
/// (a holder never queues: it takes the lock once admitted, and its call ends within the
/// upstream timeout, its failure noted for the waiters), and never so long that its own
/// call would no longer fit in the request timeout.
fn fill_patience(config: &crate::config::Config, client: &str) -> std::time::Duration {
    let upstream = config.upstream.timeout;
    let longest = max_wait_of(config, client) + upstream;
    longest.min(config.server.request_timeout.saturating_sub(upstream))
}

/// What a miss answers when the other replica's call it waited on failed (`waited`: how long
/// it waited, for a request with `request` headers): the same error answer, merged (its
/// callers answer as collapsed into that call), or the same gateway error.
fn failed_elsewhere(failure: Failure, waited: std::time::Duration, request: &HeaderMap) -> Shared {
    match failure {
        Failure::Answered {
            status,
            headers,
            body,
        } => {
            let variant = Variant::of(&headers, request);
            Ok(Arc::new(Answer {
                fetched: Fetched {
                    status,
                    headers,
                    body,
                    upstream_time: std::time::Duration::ZERO,
                    budget_wait: waited,
                    held: super::Held::default(),
                    neutral: None,
                },
                stored: false,
                variant,
                cached: None,
                merged: true,
                filled_elsewhere: false,
            }))
        }
        Failure::TimedOut(after) => Err(Arc::new(GatewayError::UpstreamTimeout(after))),
        Failure::Unreachable(what) => Err(Arc::new(GatewayError::UpstreamUnreachable(
            crate::error::Unreachable::new(what),
        ))),
    }
}

/// The failure of a fill's call that its waiting replicas take (see [`Failure`]): a timeout
/// or an unreachable upstream, what their own calls would meet too.
fn failure_of_error(e: &GatewayError) -> Option<Failure> {
    match e {
        GatewayError::UpstreamTimeout(after) => Some(Failure::TimedOut(*after)),
        GatewayError::UpstreamUnreachable(why) => Some(Failure::Unreachable(why.to_string())),
        _ => None,
    }
}

/// A fresh entry's answer (`shared`: found in the shared tier), the client's conditions
/// answered from it.
fn hit(
    entry: &StoredResponse,
    now: Instant,
    remaining: std::time::Duration,
    shared: bool,
    request: &HeaderMap,
    outcome: &Exchange,
) -> Response<Body> {
    outcome.set_cache("hit");
    let mut resp = reply::from_entry(entry, entry.age(now), Ok(remaining));
    if shared {
        reply::mark_shared(&mut resp);
    }
    answer_conditions(resp, request)
}

/// Fresh now (not merely usable).
fn is_fresh(entry: &StoredResponse) -> bool {
    matches!(entry.freshness(Instant::now()), Freshness::Fresh { .. })
}

/// The route's tags for this request (its captures filled in).
fn route_tags(route: Option<(&RouteConfig, &Captures<'_>)>) -> Vec<String> {
    route.map_or_else(Vec::new, |(r, caps)| {
        r.tags.iter().map(|t| t.fill(caps)).collect()
    })
}

/// Where a merged call's budget left it: admitted (or refused), or displaced by a call of
/// its key already on its way upstream, here or on another replica, whose answer it may take.
enum Turn {
    Admitted(Result<crate::budget::Admitted, GatewayError>),
    Join(Peer<Shared>),
    /// Another replica started the call (`None`: wait for it) or shared its answer.
    Elsewhere(Option<StoredResponse>),
}

/// The answer of `peer` (another flight of the same key, sent upstream) for a request with
/// `request` headers that waited `waited` for budget; `None` when it cannot serve it (its
/// answer varies on a header this request sent otherwise, or it was refused for budget:
/// as for a merged follower, that is no refusal of this request) or it ended without a
/// value.
async fn peer_answer(
    peer: Peer<Shared>,
    request: &HeaderMap,
    waited: std::time::Duration,
) -> Option<Shared> {
    match peer.value().await.ok()? {
        Ok(answer) => {
            let mine = Variant::of(&answer.fetched.headers, request);
            answer
                .variant
                .serves(&mine)
                .then(|| Ok(Arc::new(answer.merged(waited))))
        }
        // A peer waiting for another replica's fill counts as sent, and may still be refused
        // by its own budget after; an upstream pause, this request's budget knows too.
        Err(e) if matches!(*e, GatewayError::RateLimited { .. }) => None,
        // Its call was sent: what went wrong there (a timeout, an unreachable upstream)
        // would go wrong for this one too.
        Err(e) => Some(Err(e)),
    }
}

/// The windows of a read no route caches: nothing another replica shared is kept for it.
const NO_WINDOWS: crate::cache::Windows = crate::cache::Windows {
    ttl: std::time::Duration::ZERO,
    stale_while_revalidate: std::time::Duration::ZERO,
    stale_if_error: std::time::Duration::ZERO,
};

/// Refused by a share of the budget (global or the client's own), not for an upstream
/// pause: a call queued for the same key then still goes within its wait.
fn refused_by_a_share(e: &GatewayError) -> bool {
    matches!(e, GatewayError::RateLimited { reason, upstream_status: None, .. } if *reason != crate::budget::Which::Upstream.label())
}

/// A cacheable route's rule for one request: ttl, the two stale windows, its tags.
type Rule = (
    std::time::Duration,
    std::time::Duration,
    std::time::Duration,
    Box<[String]>,
);

/// The merged upstream call of a read, boxed so a follower can hold its own unrun.
type Fetch = std::pin::Pin<Box<dyn std::future::Future<Output = Shared> + Send>>;

/// The longest `client` waits for budget: its own `max_wait`, else the global one.
fn max_wait_of(config: &crate::config::Config, client: &str) -> std::time::Duration {
    config
        .clients
        .iter()
        .find(|c| c.name == client)
        .and_then(|c| c.max_wait)
        .unwrap_or(config.budget.max_wait)
}

/// The leader found no budget: its refusal says nothing of a follower's own terms.
fn refused_by_budget(value: &Shared) -> bool {
    matches!(value, Err(e) if matches!(**e, GatewayError::RateLimited { .. }))
}

/// A cacheable read's `200` as the client's conditions make it: `304` with the answer's
/// headers and no body, `412` in the error envelope, or unchanged.
fn answer_conditions(resp: Response<Body>, request: &HeaderMap) -> Response<Body> {
    if resp.status() != StatusCode::OK {
        return resp;
    }
    match forward::conditional(request, resp.headers()) {
        None => resp,
        Some(StatusCode::NOT_MODIFIED) => {
            let (mut parts, _) = resp.into_parts();
            parts.status = StatusCode::NOT_MODIFIED;
            parts.headers.remove(header::CONTENT_LENGTH);
            parts.headers.remove(header::CONTENT_TYPE);
            Response::from_parts(parts, Body::default())
        }
        Some(status) => {
            let mut refused = crate::error::envelope(
                status,
                "precondition_failed",
                "If-Match names none of the answer's entity tags",
            );
            if let Some(cache_status) = resp.headers().get(&CACHE_STATUS) {
                refused
                    .headers_mut()
                    .insert(CACHE_STATUS.clone(), cache_status.clone());
            }
            refused
        }
    }
}

/// The upstream call of a read: HEAD is answered from GET entries, so it goes up as a GET.
fn upstream_get(make_call: &impl Fn() -> Call) -> Call {
    let mut call = make_call();
    call.method = Method::GET;
    call
}

/// The answer sets a cookie in any header of the family (`Set-Cookie`, the obsolete
/// `Set-Cookie2`, or any other name starting so): a cookie is one client's, never stored
/// to be served to everyone. Names arrive lower-cased.
fn sets_cookie(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|name| name.as_str().starts_with("set-cookie"))
}

/// The upstream's own `Cache-Control: no-store` or `private` wins over the route's ttl.
fn cache_control_forbids(headers: &HeaderMap) -> bool {
    headers.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().unwrap_or("").split(',').any(|p| {
            matches!(
                p.trim().to_ascii_lowercase().as_str(),
                "no-store" | "private"
            )
        })
    })
}

/// Every waiter gets its own copy of the shared error to turn into a response.
fn clone_error(e: &GatewayError) -> GatewayError {
    match e {
        GatewayError::BadRequest(m) => GatewayError::BadRequest(m),
        GatewayError::TooCostly(c) => GatewayError::TooCostly(*c),
        GatewayError::Unauthorized(m) => GatewayError::Unauthorized(m),
        GatewayError::NotFound(m) => GatewayError::NotFound(m),
        GatewayError::Forbidden(m) => GatewayError::Forbidden(m.clone()),
        GatewayError::PayloadTooLarge { limit } => GatewayError::PayloadTooLarge { limit: *limit },
        GatewayError::RateLimited {
            retry_after,
            reason,
            upstream_status,
        } => GatewayError::RateLimited {
            retry_after: *retry_after,
            reason,
            upstream_status: *upstream_status,
        },
        GatewayError::UpstreamUnreachable(m) => GatewayError::UpstreamUnreachable(m.clone()),
        GatewayError::UpstreamTimeout(d) => GatewayError::UpstreamTimeout(*d),
        GatewayError::Overloaded => GatewayError::Overloaded,
        GatewayError::TokenUnavailable(m) => GatewayError::TokenUnavailable(m.clone()),
        GatewayError::RequestTimeout(d) => GatewayError::RequestTimeout(*d),
        GatewayError::BodyTimeout(d) => GatewayError::BodyTimeout(*d),
        GatewayError::BuffersFull => GatewayError::BuffersFull,
        GatewayError::Internal(m) => GatewayError::Internal(m),
    }
}
