//! One upstream call on behalf of a request: budget, token, exchange, 401 replay, rewrite.
//!
//! A [`Call`] owns everything it needs, so the read path can run it in a spawned task that
//! outlives the client that started it (merged waiters still need the answer).

use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use super::forward::{self, Fetched};
use super::{Gateway, State};
use crate::budget::Refused;
use crate::error::{GatewayError, Unreachable};
use crate::token::TokenError;
use crate::upstream::hidden::hides_secret;
use crate::upstream::rewrite::carries_secret;

/// An upstream call, owned.
pub struct Call {
    pub state: Arc<State>,
    pub route_label: Arc<str>,
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub request_id: HeaderValue,
    pub client: Arc<str>,
    pub cost: NonZeroU32,
}

impl Gateway {
    /// Spends budget, then exchanges with the upstream using the held token. A token the
    /// upstream refuses is refreshed once (merged with every request that saw the same
    /// generation refused) and the request replayed once: the refused request was not
    /// applied, so a replayed write is still a write forwarded once.
    pub(super) async fn call(&self, call: &Call) -> Result<Fetched, GatewayError> {
        let progress = crate::cache::Progress::<()>::detached();
        let admitted = self.admit_reporting(call, &progress).await?;
        self.send_admitted(call, admitted).await
    }

    /// The budget's part of [`Gateway::call`]: waits for the call's cells, reporting to
    /// `progress` once the budget has let it through, so requests merged behind it know it
    /// is no longer queued. The cells are spent: send the call with
    /// [`Gateway::send_admitted`], or give them back with `Budget::refund`.
    pub(super) async fn admit_reporting<V: Send + Sync>(
        &self,
        call: &Call,
        progress: &crate::cache::Progress<V>,
    ) -> Result<crate::budget::Admitted, GatewayError> {
        // A caller that already waited on another client's merged call queues only for what
        // is left of its own max_wait. Followers that leave the queued flight learn by when
        // it is decided, at the latest.
        let by = progress
            .arrived()
            .map(|at| at + self.inner.budget.longest_wait(&call.client));
        // Booked on the global share, it goes at that time: followers that can wait so long
        // follow it rather than book cells of their own.
        let queued = |booked: Option<tokio::time::Instant>| match booked {
            Some(at) => progress.booked(at),
            None => progress.queued_until(by),
        };
        match self
            .inner
            .budget
            .admit_noting(&call.client, call.cost, progress.waited(), &queued)
            .await
        {
            Ok(admitted) => {
                progress.sent();
                Ok(admitted)
            }
            Err(Refused::Later(rejected)) => Err(GatewayError::RateLimited {
                retry_after: rejected.retry_after,
                reason: rejected.budget.label(),
                upstream_status: None,
            }),
            Err(Refused::Never(too_costly)) => Err(GatewayError::TooCostly(too_costly)),
        }
    }

    /// The rest of [`Gateway::call`] once the budget has admitted it.
    pub(super) async fn send_admitted(
        &self,
        call: &Call,
        admitted: crate::budget::Admitted,
    ) -> Result<Fetched, GatewayError> {
        let inner = &self.inner;
        // From here the call is in flight for the budget until its answer is read.
        let mut flight = Flight {
            budget: &inner.budget,
            cost: call.cost,
            ticket: Some(admitted.ticket),
        };
        let token = inner.token.current().map_err(GatewayError::from)?;
        let out = forward::Outgoing {
            method: &call.method,
            url: &call.url,
            client_headers: &call.headers,
            body: call.body.clone(),
            request_id: &call.request_id,
        };
        let started = Instant::now();
        let mut fetched = self.exchange(call, &out, token.access.expose()).await?;
        if fetched.status == StatusCode::UNAUTHORIZED {
            // The refused call counted upstream; the replay is counted as it answers.
            flight.land(&fetched);
            // The upstream's 401 is about the gateway's token, never the client's key: passing
            // it on would tell a client with a valid key that its key is bad. Without a
            // newer token to replay with, the answer is 503 token_unavailable.
            let fresh = inner
                .token
                .refresh_after_rejection(token.generation)
                .await
                .map_err(GatewayError::from)?;
            if fresh.generation == token.generation {
                return Err(TokenError::RefusedNoNewer.into());
            }
            fetched = self.exchange(call, &out, fresh.access.expose()).await?;
            if fetched.status == StatusCode::UNAUTHORIZED {
                // A token fresh from a refresh was refused too: no second refresh now (the
                // next one backs off), and the client with its valid key is told 503.
                inner.token.refused(fresh.generation);
                return Err(TokenError::RefusedFresh.into());
            }
            inner.token.accepted(fresh.generation);
        } else {
            inner.token.accepted(token.generation);
        }
        fetched.upstream_time = started.elapsed();
        fetched.budget_wait = admitted.waited;
        if flight.land(&fetched) {
            // The upstream's limit, in whatever form it said so, is no fault of the client:
            // it gets the gateway's 429 with the pause as Retry-After (and a read may be
            // served stale instead); the write was not applied, so it is refused, not lost.
            let pause = inner.budget.paused_for().unwrap_or(Duration::from_secs(1));
            return Err(GatewayError::RateLimited {
                retry_after: pause,
                reason: "upstream",
                upstream_status: Some(fetched.status),
            });
        }
        // With a shared tier, first the form every replica shares (links kept at the
        // upstream's base, without `access_token`; tokens redacted), then this replica's own
        // (links at its public base), made from it the way a replica makes an entry from the
        // shared tier its own. Without one, nothing needs the neutral form: this replica's
        // own is made in one pass, to the same bytes.
        let shared = inner.cache.shared().is_some();
        let first = if shared {
            &call.state.neutral
        } else {
            &call.state.rewriter
        };
        let secrets = inner.token.secrets();
        let exposed: Vec<&str> = secrets.iter().map(|s| s.expose()).collect();
        if let Some(body) = first.rewrite_body(&fetched.body, &exposed) {
            fetched.body = body;
        }
        // What redaction could not replace (a token under layers of escapes, or in UTF-16)
        // must not reach a client or the cache: the whole answer is refused.
        if hides_secret(&fetched.body, &exposed) {
            return Err(Unreachable::new(
                "the upstream answer holds a token in an encoding the gateway cannot \
                 redact (layered escapes or UTF-16/32), so it is refused",
            )
            .into());
        }
        first.rewrite_headers(&mut fetched.headers);
        // Any other header that carries a held token in any spelling (an echoed
        // Authorization, a `Link` or `Content-Location` with the token in its query), or
        // is named after one, is dropped: rewriting arbitrary header syntax is guesswork,
        // and a missing header is safer than a leaked token. Names arrive lower-cased.
        let lowered: Vec<String> = exposed.iter().map(|s| s.to_ascii_lowercase()).collect();
        let lowered: Vec<&str> = lowered.iter().map(String::as_str).collect();
        let leaking: Vec<header::HeaderName> =
            fetched
                .headers
                .iter()
                .filter(|(name, v)| {
                    let (name, value) = (name.as_str().as_bytes(), v.as_bytes());
                    exposed.iter().zip(&lowered).any(|(s, low)| {
                        contains(value, s.as_bytes()) || contains(name, low.as_bytes())
                    }) || hides_secret(value, &exposed)
                        || carries_secret(name, &lowered)
                })
                .map(|(name, _)| name.clone())
                .collect();
        for name in leaking {
            fetched.headers.remove(name);
        }
        if !shared {
            return Ok(fetched);
        }
        if let Some((headers, body)) = call
            .state
            .rewriter
            .localize(&fetched.headers, &fetched.body)
        {
            let headers = std::mem::replace(&mut fetched.headers, headers);
            let body = std::mem::replace(&mut fetched.body, body);
            // Kept for the shared tier to store.
            fetched.neutral = Some(Box::new((headers, body)));
        }
        Ok(fetched)
    }

    async fn exchange(
        &self,
        call: &Call,
        out: &forward::Outgoing<'_>,
        token: &str,
    ) -> Result<Fetched, GatewayError> {
        let inner = &self.inner;
        let req = forward::build_request(out, token)?;
        let started = Instant::now();
        let http = inner.http.current();
        let result = forward::exchange(
            &http,
            req,
            call.state.config.upstream.timeout,
            &inner.buffers,
        )
        .await;
        let m = &inner.metrics;
        let route = &*call.route_label;
        m.upstream_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
        let status = match &result {
            Ok(f) => {
                inner
                    .last_upstream_status
                    .store(f.status.as_u16(), Ordering::Relaxed);
                crate::metrics::status_label(&f.status).to_string()
            }
            Err(GatewayError::UpstreamTimeout(_)) => "timeout".to_string(),
            Err(_) => "error".to_string(),
        };
        m.upstream_requests
            .with_label_values(&[route, &status])
            .inc();
        m.recent.upstream.add();
        result
    }
}

/// An admitted call's place in the budget's flight: left when its answer is read, or when
/// it ends without one (dropped, refused token, unreachable upstream).
struct Flight<'a> {
    budget: &'a crate::budget::Budget,
    cost: NonZeroU32,
    /// The call out now, until its answer is read.
    ticket: Option<crate::budget::Ticket>,
}

impl Flight<'_> {
    /// Reads the answer into the budget; true when it says the upstream's limit is reached.
    /// A second answer (the replay after a 401) is read as a new call of the same cost.
    fn land(&mut self, f: &Fetched) -> bool {
        let ticket = self
            .ticket
            .take()
            .unwrap_or_else(|| self.budget.spend_unadmitted(self.cost));
        self.budget
            .observe_answer(f.status, &f.headers, &f.body, ticket)
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            self.budget.call_failed(ticket);
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
