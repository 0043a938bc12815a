//! What the budget shows outside: the rate-limit response fields for one client, and the
//! budget part of `/admin/status`, read from the shares without spending; [`view`] says
//! which share a client is shown.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use serde_json::{json, Value};

use super::ledger::Ledger;
use super::{headers, Budget, Priority, Share};
use crate::header_number::header_number;

/// One client's view of the share that limits it.
struct View<'a> {
    /// Policy name in the response fields: `"client"` for an own share, else `"global"`.
    name: &'static str,
    share: &'a Share,
    /// `RateLimit-Policy` for `share` under `name`, prebuilt by the ledger.
    policy: &'a HeaderValue,
    available: u32,
    next_cell: u64,
}

/// Both read the shares without spending (GCRA state is a timestamp, so "remaining now" is
/// arithmetic). A client is shown the share that limits it: its own if it has one, else the
/// global share as its priority sees it (a batch client does not see the interactive reserve).
/// The upstream's word overrides both: while paused, nothing remains.
fn view<'a>(ledger: &'a Ledger, client: &str, now: u64) -> View<'a> {
    let known = ledger.clients.get(client);
    let own = known.and_then(|c| c.share.as_ref().zip(c.policy.as_ref()));
    if let Some(((share, gcra), policy)) = own {
        return View {
            name: "client",
            share,
            policy,
            available: gcra.available(0, now),
            next_cell: gcra.next_cell(0, now),
        };
    }
    let hold = match known.map(|c| c.priority) {
        Some(Priority::Batch) => ledger.reserve_cells,
        _ => 0,
    };
    View {
        name: "global",
        share: &ledger.global_share,
        policy: &ledger.global_policy,
        available: ledger.global.available(hold, now),
        next_cell: ledger.global.next_cell(hold, now),
    }
}

/// The rate-limit fields a thread made last ([`Budget::answer_headers`]).
struct Answer {
    /// Budget id, ledger version, budget clock and wall clock in milliseconds.
    key: (u64, u64, u64, u64),
    client: Box<str>,
    fields: [HeaderValue; 5],
}

thread_local! {
    static ANSWER: std::cell::RefCell<Option<Answer>> = const { std::cell::RefCell::new(None) };
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn share_json(share: &Share, available: u32) -> Value {
    json!({
        "limit": share.limit.get(),
        "period_s": share.period.as_secs_f64(),
        "burst": share.burst.get(),
        "remaining": available,
    })
}

impl Budget {
    /// `(RateLimit-Policy, RateLimit)` for `client` (syntax in `headers`). While the upstream
    /// is paused `r` is 0 and `t` the pause; a smaller upstream allowance caps `r`.
    ///
    /// Called for every answer the cache took part in, hits included: the policy is the
    /// ledger's prebuilt value and the live field is formatted after the lock is released.
    ///
    /// `refused` is set for an answer that refuses the client (a 429), with its
    /// `Retry-After`: then `r` is 0 and `t` at least that, whatever the shares show. With a
    /// shared budget the local view is only a mirror of the last admission here, and other
    /// replicas may have spent what it still shows.
    pub fn headers(&self, client: &str, refused: Option<Duration>) -> (HeaderValue, HeaderValue) {
        let now = self.inner.clock.nanos();
        let (name, policy, remaining, next) = {
            let ledger = self.peek();
            let v = view(&ledger, client, now);
            let mut remaining = v.available;
            let mut next = v.next_cell;
            if let Some(left) = ledger.upstream.allowance(now) {
                remaining = remaining.min(u32::try_from(left).unwrap_or(u32::MAX));
            }
            if let Some(pause) = ledger.upstream.paused_for(now) {
                remaining = 0;
                next = next.max(pause);
            }
            if let Some(wait) = refused {
                remaining = 0;
                next = next.max(nanos(wait));
            }
            (v.name, v.policy.clone(), remaining, next)
        };
        (
            policy,
            headers::state(name, remaining, Duration::from_nanos(next)),
        )
    }

    /// `(X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset)` for `client`, the
    /// API's own fields, so client code written for the API keeps its limit handling: the
    /// tighter of the client's share and what the upstream has left, and the Unix second
    /// when the client may next find a call free (the end of a pause while paused). A
    /// refusal (`refused`, as for `headers`) leaves 0 until at least its `Retry-After`.
    pub fn api_headers(&self, client: &str, refused: Option<Duration>) -> [HeaderValue; 3] {
        let now = self.inner.clock.nanos();
        let (limit, remaining, next) = {
            let ledger = self.peek();
            let v = view(&ledger, client, now);
            let mut limit = u64::from(v.share.limit.get());
            let mut remaining = u64::from(v.available);
            let mut next = v.next_cell;
            if let Some(upstream) = ledger.upstream.limit() {
                limit = limit.min(upstream);
            }
            if let Some(left) = ledger.upstream.allowance(now) {
                if left < remaining {
                    remaining = left;
                    if let Some(reset) = ledger.upstream.reset(now) {
                        next = reset - now;
                    }
                }
            }
            if let Some(pause) = ledger.upstream.paused_for(now) {
                remaining = 0;
                next = next.max(pause);
            }
            if let Some(wait) = refused {
                remaining = 0;
                next = next.max(nanos(wait));
            }
            // Never more remaining than the limit shown beside it.
            (limit, remaining.min(limit), next)
        };
        let wall = SystemTime::now() + Duration::from_nanos(next);
        let reset = wall
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, headers::whole_seconds);
        [
            header_number(limit),
            header_number(remaining),
            HeaderValue::from(reset),
        ]
    }

    /// What [`Budget::headers`] and [`Budget::api_headers`] say for `client` on an answer that
    /// refuses nothing: `[RateLimit-Policy, RateLimit, X-RateLimit-Limit,
    /// X-RateLimit-Remaining, X-RateLimit-Reset]`.
    ///
    /// Every cache hit carries them, and computing them took the ledger's lock twice (one
    /// lock for the whole process, so its line moved between the cores on every hit) and
    /// five fresh header values. Each thread keeps the last fields it made, and hands out
    /// copies of them for as long as nothing could make them differ: the same budget and
    /// client, no change to the ledger since ([`Inner::version`]), and the same millisecond
    /// on both clocks they are read from (the budget's, and the wall clock for the reset).
    pub fn answer_headers(&self, client: &str) -> [HeaderValue; 5] {
        let tick = self.inner.clock.nanos() / 1_000_000;
        let wall = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Read before the fields are made: a change after it bumps it past what is stored.
        let version = self.inner.version.load(Ordering::Acquire);
        let key = (self.inner.id, version, tick, wall);
        let cached = ANSWER.with(|last| {
            let last = last.borrow();
            last.as_ref()
                .filter(|c| c.key == key && &*c.client == client)
                .map(|c| c.fields.clone())
        });
        if let Some(fields) = cached {
            return fields;
        }
        let (policy, state) = self.headers(client, None);
        let [limit, remaining, reset] = self.api_headers(client, None);
        let fields = [policy, state, limit, remaining, reset];
        ANSWER.with(|last| {
            *last.borrow_mut() = Some(Answer {
                key,
                client: client.into(),
                fields: fields.clone(),
            });
        });
        fields
    }

    /// `(RateLimit-Policy, RateLimit, X-RateLimit-Reset)` for a refusal that tells `client`
    /// to retry in `retry_after`: every field says the same thing (nothing remains until
    /// then), whichever part of the budget refused, and wherever this replica learnt of it
    /// (its own counting, the upstream, or another replica through Redis).
    pub fn refusal_headers(
        &self,
        client: &str,
        retry_after: Duration,
    ) -> (HeaderValue, HeaderValue, HeaderValue) {
        let now = self.inner.clock.nanos();
        let (name, policy) = {
            let ledger = self.peek();
            let v = view(&ledger, client, now);
            (v.name, v.policy.clone())
        };
        let reset = (SystemTime::now() + retry_after)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, headers::whole_seconds);
        (
            policy,
            headers::state(name, 0, retry_after),
            HeaderValue::from(reset),
        )
    }

    /// The budget for `/admin/status`: the global share, each client (configured ones, and
    /// any other name that was refused), and what the upstream last said.
    pub fn status_json(&self) -> Value {
        let now = self.inner.clock.nanos();
        let ledger = self.peek();
        let mut global = share_json(&ledger.global_share, ledger.global.available(0, now));
        global["rejections"] = json!(ledger.global_rejections);
        global["max_wait_s"] = json!(ledger.max_wait.as_secs_f64());
        global["batch_reserve_cells"] = json!(ledger.reserve_cells);

        let mut names: Vec<&String> = ledger.clients.keys().collect();
        names.extend(
            ledger
                .rejections
                .keys()
                .filter(|n| !ledger.clients.contains_key(*n)),
        );
        names.sort();
        let clients: serde_json::Map<String, Value> = names
            .into_iter()
            .map(|name| {
                let v = view(&ledger, name, now);
                let known = ledger.clients.get(name);
                let mut entry = share_json(v.share, v.available);
                entry["budget"] = json!(v.name);
                entry["priority"] = json!(match known.map(|c| c.priority) {
                    Some(Priority::Batch) => "batch",
                    _ => "interactive",
                });
                let max_wait = known.and_then(|c| c.max_wait).unwrap_or(ledger.max_wait);
                entry["max_wait_s"] = json!(max_wait.as_secs_f64());
                entry["rejections"] = json!(ledger.rejections.get(name).copied().unwrap_or(0));
                (name.clone(), entry)
            })
            .collect();

        let paused = ledger.upstream.paused_for(now).map(Duration::from_nanos);
        let paused_until =
            paused.map(|p| humantime::format_rfc3339_seconds(SystemTime::now() + p).to_string());
        json!({
            "global": global,
            "clients": clients,
            "upstream": {
                "reported_remaining": ledger.upstream.reported(),
                "allowance": ledger.upstream.allowance(now),
                "paused_for_s": paused.map(|p| p.as_secs_f64()),
                "paused_until": paused_until,
            },
        })
    }
}
