//! The path of one request through the simulator, in order: control endpoints aside, count
//! it, draw its faults, route it, then (API calls) authenticate, rate-limit and answer.
//!
//! Invariants: every request gets an answer except one the `drop_rate` fault chose, which
//! is the one deliberate error handed to hyper (it closes the connection unanswered);
//! the OAuth endpoint and `/_sim/*` are never rate-limited; no lock is held across an await.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::api::{self, Endpoint, Route};
use super::faults::{Plan, Target};
use super::limit::{Quota, Verdict};
use super::oauth::{self, AuthError, GrantRequest};
use super::page::Call;
use super::reply::{self, Reply};
use super::stats::Counter;
use super::{control, Sim};

/// Largest request body read; bigger ones get 413.
const MAX_BODY: usize = 1 << 20;

/// The connection is closed on purpose, without an answer (the `drop_rate` fault).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped on purpose by the drop_rate fault")]
pub struct Dropped;

pub(crate) async fn handle(sim: &Sim, req: Request<Incoming>) -> Result<Reply, Dropped> {
    let path = req.uri().path().to_owned();
    if path == "/_sim" || path.starts_with("/_sim/") {
        return Ok(control::handle(sim, req).await);
    }
    let guard = sim.stats.enter();
    sim.stats.request(req.method().as_str(), &path);
    let route = api::classify(req.method(), &path);
    let target = match route {
        Route::Api(_) => Target::Api,
        Route::Token => Target::TokenEndpoint,
        _ => Target::Other,
    };
    let plan = sim.faults.plan(&path, target);
    if plan.injects() {
        sim.stats.incr(Counter::FaultsInjected);
    }
    if plan.drop {
        return Err(Dropped);
    }
    if !plan.delay.is_zero() {
        tokio::time::sleep(plan.delay).await;
    }
    let answer = match plan.error.and_then(|s| StatusCode::from_u16(s).ok()) {
        Some(status) => reply::error(status, "server_error", "injected server error"),
        None => answer(sim, route, &plan, &path, req).await,
    };
    let answer = if plan.slow_body.is_zero() {
        answer
    } else {
        reply::dribble(answer, plan.slow_body)
    };
    Ok(reply::hold(answer, guard))
}

async fn answer(sim: &Sim, route: Route, plan: &Plan, path: &str, req: Request<Incoming>) -> Reply {
    match route {
        Route::NotFound => reply::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        Route::BadRequest(message) => {
            reply::error(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
        Route::WrongMethod(allow) => {
            let mut r = reply::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("this endpoint answers {allow}"),
            );
            reply::set_header(&mut r, "allow", allow);
            r
        }
        Route::Token if plan.token_down => reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the token endpoint is down (injected fault)",
        ),
        Route::Token => {
            let (query, form) = match read_params(req).await {
                Ok(params) => params,
                Err(e) => return e.reply(),
            };
            let pairs = form.iter().chain(query.iter());
            let grant = GrantRequest::from_pairs(pairs.map(|(k, v)| (k.as_str(), v.as_str())));
            oauth::token_endpoint(&sim.tokens, &sim.stats, &grant)
        }
        Route::Api(endpoint) => api_call(sim, endpoint, plan, path, req).await,
    }
}

fn unauthorized(sim: &Sim, message: &str) -> Reply {
    sim.stats.incr(Counter::Unauthorized);
    reply::error(StatusCode::UNAUTHORIZED, "invalid_token", message)
}

async fn api_call(
    sim: &Sim,
    endpoint: Endpoint,
    plan: &Plan,
    path: &str,
    req: Request<Incoming>,
) -> Reply {
    let method = req.method().clone();
    let base = base_url(sim, &req);
    let bearer = bearer(req.headers());
    // The body is read before any refusal so a keep-alive connection stays usable.
    let (query, form) = match read_params(req).await {
        Ok(params) => params,
        Err(e) => return e.reply(),
    };
    // As the API: the header, the query string, or a field of the form body.
    let from_params = || {
        query
            .iter()
            .chain(form.iter())
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.clone())
    };
    let Some(token) = bearer.or_else(from_params) else {
        return unauthorized(
            sim,
            "no access token: send Authorization: Bearer or access_token",
        );
    };
    sim.stats.token(&token);
    if plan.force_401 {
        return unauthorized(sim, "the access token is invalid (injected fault)");
    }
    let now = Instant::now();
    let lineage = match sim.tokens.authorize(&token, now) {
        Ok(lineage) => lineage,
        Err(AuthError::Unknown) => return unauthorized(sim, "unknown access token"),
        Err(AuthError::Expired) => return unauthorized(sim, "the access token has expired"),
    };
    if let Some(retry_after) = plan.force_429 {
        sim.stats.incr(Counter::RateLimited);
        let mut r = reply::error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_reached",
            "rate limit exceeded (injected fault)",
        );
        reply::set_header(&mut r, "retry-after", retry_after);
        return r;
    }
    let quota = match sim.limiter.check(lineage, now) {
        Verdict::Unlimited => None,
        Verdict::Allowed(quota) => Some(quota),
        Verdict::Limited(quota, nth) => {
            sim.stats.incr(Counter::RateLimited);
            // The real API says 400 with a top-level `error`; the 429 convention adds
            // Retry-After. Every other refusal leaves the reset header out, as the real
            // API sometimes does (its clients then assume about a minute).
            let mut r = reply::error(
                sim.limit_status,
                "rate_limit_reached",
                "the rate limit is reached; it will reset within the hour",
            );
            reply::set_header(&mut r, "x-ratelimit-limit", quota.limit);
            reply::set_header(&mut r, "x-ratelimit-remaining", 0);
            if nth % 2 == 0 {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                reply::set_header(
                    &mut r,
                    "x-ratelimit-reset",
                    (now + quota.reset_in).as_secs(),
                );
            }
            if sim.limit_status == StatusCode::TOO_MANY_REQUESTS {
                reply::set_header(&mut r, "retry-after", whole_seconds(quota.reset_in).max(1));
            }
            return r;
        }
    };
    let call = Call {
        base: &base,
        path,
        query,
        form,
        token: &token,
    };
    let mut answer = api::serve(sim, endpoint, &method, &call).await;
    if let Some(quota) = quota {
        rate_headers(&mut answer, quota);
    }
    answer
}

fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The rate fields of an allowed call. `X-RateLimit-Reset` is the Unix second the window
/// ends in, rounded down, as the real API gives it: the window really ends up to a second
/// after the time it names. (`Retry-After`, a wait, is rounded up.)
fn rate_headers(reply: &mut Reply, quota: Quota) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    reply::set_header(reply, "x-ratelimit-limit", quota.limit);
    reply::set_header(reply, "x-ratelimit-remaining", quota.remaining);
    reply::set_header(reply, "x-ratelimit-reset", (now + quota.reset_in).as_secs());
}

/// `http://host[:port]` as the caller addressed us, so absolute links work through any
/// name or port; the bound address when the request names no usable host.
pub(crate) fn base_url<B>(sim: &Sim, req: &Request<B>) -> String {
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .filter(|h| h.parse::<http::uri::Authority>().is_ok() && !h.contains('@'));
    match host {
        Some(host) => format!("http://{host}"),
        None => format!("http://{}", sim.local_addr),
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

type Pairs = Vec<(String, String)>;

/// Why a request body could not be read as parameters.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the request body is larger than {MAX_BODY} bytes or broken")]
    TooLarge,
    #[error("the API takes form bodies (application/x-www-form-urlencoded), not JSON")]
    Json,
}

impl BodyError {
    fn reply(&self) -> Reply {
        let (status, kind) = match self {
            BodyError::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            BodyError::Json => (StatusCode::BAD_REQUEST, "invalid_request"),
        };
        reply::error(status, kind, &self.to_string())
    }
}

/// The query pairs and the form body's pairs.
async fn read_params(req: Request<Incoming>) -> Result<(Pairs, Pairs), BodyError> {
    let (parts, body) = req.into_parts();
    let query: Pairs = form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let bytes = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|_| BodyError::TooLarge)?
        .to_bytes();
    Ok((query, body_pairs(&parts.headers, &bytes)?))
}

fn body_pairs(headers: &HeaderMap, bytes: &Bytes) -> Result<Pairs, BodyError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .is_some_and(|v| v == "application/json" || v.ends_with("+json"));
    if json {
        return Err(BodyError::Json);
    }
    Ok(form_urlencoded::parse(bytes).into_owned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer(&headers), None);
        headers.insert(AUTHORIZATION, http::HeaderValue::from_static("bearer abc"));
        assert_eq!(
            bearer(&headers).as_deref(),
            Some("abc"),
            "scheme is case-insensitive"
        );
        headers.insert(AUTHORIZATION, http::HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&headers), None, "expected Basic ignored");
    }

    #[test]
    fn rounding_up_seconds() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
