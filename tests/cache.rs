//! End-to-end checks of the cache and request merging (README "Configuration" route rules, "Pointing a service at it", "The admin listener"
//! purge, 5 metrics), driven through the gateway against the simulator.
mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cxgate::sim::{Faults, SimOptions};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use common::{Answer, Env, KEY, ROUTES};

/// Routes with one-second ttls, for the stale-while-revalidate and stale-if-error tests.
const SHORT_TTL_ROUTES: &str = r#"
[[routes]]
match = "GET /me"
ttl = "1s"
stale_while_revalidate = "30s"
tags = ["me"]

[[routes]]
match = "GET /me/accounts"
ttl = "1s"
stale_if_error = "1h"
tags = ["me"]

[[routes]]
match = "GET /me/connectedprofiles"
ttl = "1s"
stale_if_error = "1h"
"#;

const CONTACT_A: &str = "/12345/inbox/contact/twitter/111";
const CONTACT_B: &str = "/12345/inbox/contact/twitter/222";

fn bearer() -> String {
    format!("Bearer {KEY}")
}

/// Faults that delay every `/me...` call by `ms`.
fn latency(ms: u64) -> Faults {
    Faults {
        latency_ms: ms,
        path_prefix: Some("/me".into()),
        ..Faults::default()
    }
}

/// A GET with the test key and extra headers.
async fn get_with(env: &Env, path: &str, headers: &[(&str, &str)]) -> Answer {
    let auth = bearer();
    let mut all = vec![("authorization", auth.as_str())];
    all.extend_from_slice(headers);
    env.send(Method::GET, &env.url(path), &all, "").await
}

/// `POST /admin/purge` with `body`.
async fn purge(env: &Env, body: &str) -> Answer {
    env.send(
        Method::POST,
        &env.admin_url("/admin/purge"),
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// The value of the sample whose name-and-labels text is exactly `series`, if exported.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

fn is_hit(a: &Answer) -> bool {
    a.header("cache-status").starts_with("cxgate; hit; ttl=")
}

fn assert_hit(a: &Answer, what: &str) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{what}: expected 200, saw {}",
        a.status
    );
    assert!(
        is_hit(a) && !a.header("cache-status").contains("stale"),
        "{what}: expected a fresh hit, saw Cache-Status {:?}",
        a.header("cache-status")
    );
}

fn assert_stored(a: &Answer, what: &str) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{what}: expected 200, saw {}",
        a.status
    );
    assert_eq!(
        a.header("cache-status"),
        "cxgate; fwd=uri-miss; fwd-status=200; stored",
        "{what}: expected a stored miss"
    );
}

/// Polls `done` every 20 ms for up to `limit`; true once it holds.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done()
}

/// `n` HTTP/1.1 connections to the gateway, all established before any request is sent, so
/// the requests then leave together instead of trickling out behind the TCP handshakes.
async fn connections(env: &Env, n: usize) -> Vec<SendRequest<Full<Bytes>>> {
    let mut senders = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = tokio::net::TcpStream::connect(env.gw.addr)
            .await
            .expect("connect to the gateway");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        senders.push(sender);
    }
    senders
}

/// One GET of `path` with the test key on `sender`: status, `Cache-Status` and body.
async fn read_on(
    mut sender: SendRequest<Full<Bytes>>,
    host: String,
    path: String,
) -> (StatusCode, String, Bytes) {
    let req = Request::get(path)
        .header("host", host)
        .header("authorization", bearer())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("gateway answered");
    let status = resp.status();
    let cache = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, cache, body)
}

/// Sends one GET of `path` on each connection at once; the answers in connection order.
async fn burst(
    env: &Env,
    senders: Vec<SendRequest<Full<Bytes>>>,
    path: &str,
) -> Vec<(StatusCode, String, Bytes)> {
    let host = env.gw.addr.to_string();
    let callers: Vec<_> = senders
        .into_iter()
        .map(|s| tokio::spawn(read_on(s, host.clone(), path.to_owned())))
        .collect();
    let mut answers = Vec::with_capacity(callers.len());
    for caller in callers {
        answers.push(caller.await.expect("caller task"));
    }
    answers
}

#[tokio::test(start_paused = true)]
async fn a_thousand_cold_reads_make_one_upstream_call() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    // On the paused clock the upstream's 1.5 s pass only once every caller is waiting, so
    // the burst is in flight together however busy the machine; a caller that still
    // arrives after the answer is a hit, which the counts allow.
    env.sim.set_faults(latency(1500));
    let senders = connections(&env, 1000).await;
    let answers = burst(&env, senders, "/me").await;
    let bad: Vec<_> = answers.iter().filter(|a| a.0 != StatusCode::OK).collect();
    assert!(
        bad.is_empty(),
        "expected 1000 x 200, saw {} others, first {:?}",
        bad.len(),
        bad.first()
    );
    let first = &answers[0].2;
    let differing = answers.iter().filter(|a| a.2 != first).count();
    assert_eq!(
        differing, 0,
        "expected one body for every caller, {differing} differ"
    );
    let stored = answers
        .iter()
        .filter(|a| a.1 == "cxgate; fwd=uri-miss; fwd-status=200; stored")
        .count();
    let collapsed = answers
        .iter()
        .filter(|a| a.1 == "cxgate; fwd=uri-miss; fwd-status=200; collapsed")
        .count();
    let hits = answers
        .iter()
        .filter(|a| a.1.starts_with("cxgate; hit"))
        .count();
    assert_eq!(
        (stored, collapsed + hits),
        (1, 999),
        "expected 1 stored and 999 collapsed or hits, saw {stored}, {collapsed} and {hits}"
    );
    assert!(
        collapsed >= 900,
        "expected nearly every caller to share the one call, saw {collapsed} collapsed"
    );
    let upstream = env.upstream_count("GET /me");
    assert_eq!(upstream, 1, "expected 1 upstream call, saw {upstream}");
    let text = env.metrics().await;
    let coalesced = metric(&text, r#"cxgate_coalesced_requests_total{route="GET /me"}"#);
    assert_eq!(
        coalesced,
        Some(collapsed as f64),
        "expected cxgate_coalesced_requests_total{{route=\"GET /me\"}} {collapsed}, saw {coalesced:?}"
    );
    env.stop().await;
}

/// A fresh hit is answered in the innermost service's `call`, so the future every layer
/// wraps (and that each connection holds per request) stays small and a hit copies little
/// of it; the whole async pipeline in it would be kilobytes. Still one answer, counted once.
#[tokio::test(start_paused = true)]
async fn a_fresh_hit_is_a_small_future_answered_at_its_first_poll() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let filled = get_with(&env, "/me", &[]).await;
    assert_eq!(filled.status, 200, "the first read fills the cache");
    let auth = bearer();
    let host = env.gw.addr.to_string();
    let request = Request::get("/me")
        .header("authorization", auth.as_str())
        .header("host", host.as_str())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let gateway = env.gw.gateway.clone();
    let answer = gateway.handle(request);
    let size = std::mem::size_of_val(&answer);
    assert!(
        size <= 1024,
        "expected a hit's future of at most 1 KiB, saw {size} bytes"
    );
    let mut answer = std::pin::pin!(answer);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let std::task::Poll::Ready(resp) = answer.as_mut().poll(&mut cx) else {
        panic!("expected a fresh hit to be answered at its first poll, it was pending");
    };
    let status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        status.starts_with("cxgate; hit; ttl="),
        "expected a fresh hit, saw Cache-Status {status:?}"
    );
    let stats = gateway.cache().stats_json();
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(1), Some(1)),
        "expected the fill counted as one miss and the hit as one hit, saw {stats}"
    );
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn uncacheable_gets_in_flight_together_are_merged_too() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(latency(300));
    let senders = connections(&env, 50).await;
    let answers = burst(&env, senders, "/me/permissions").await;
    for (status, cache, body) in &answers {
        assert_eq!(
            *status,
            StatusCode::OK,
            "expected 200, saw {status}: {body:?}"
        );
        assert!(
            cache.starts_with("cxgate; fwd=bypass; "),
            "expected Cache-Status `cxgate; fwd=bypass; ...`, saw {cache:?}"
        );
    }
    // Not cacheable, so nothing was collapsed into a cache fill: they shared one answer.
    let merged = answers
        .iter()
        .filter(|a| a.1.ends_with("; detail=merged") && !a.1.contains("collapsed"))
        .count();
    assert_eq!(
        merged, 49,
        "expected 49 answers saying `detail=merged` (not `collapsed`), saw {merged}"
    );
    let upstream = env.upstream_count("GET /me/permissions");
    assert_eq!(
        upstream, 1,
        "expected 1 upstream call for 50 reads, saw {upstream}"
    );
    // Nothing was stored: a later read goes upstream again.
    let again = env.get("/me/permissions").await;
    assert_eq!(
        again.header("cache-status"),
        "cxgate; fwd=bypass; fwd-status=200",
        "expected an uncached route to bypass the cache afterwards"
    );
    let upstream = env.upstream_count("GET /me/permissions");
    assert_eq!(
        upstream, 2,
        "expected a second upstream call after the merge, saw {upstream}"
    );
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_hangs_up_strands_nobody() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(latency(400));
    // The leader: a raw connection, so dropping it really closes the socket.
    let mut leader = tokio::net::TcpStream::connect(env.gw.addr)
        .await
        .expect("connect");
    let head = format!(
        "GET /me HTTP/1.1\r\nhost: {}\r\nauthorization: {}\r\n\r\n",
        env.gw.addr,
        bearer()
    );
    leader
        .write_all(head.as_bytes())
        .await
        .expect("send leader");
    let reached = eventually(Duration::from_secs(2), || {
        env.sim.stats()["in_flight"].as_u64() == Some(1)
    })
    .await;
    assert!(
        reached,
        "expected the leader's call to reach the upstream within 2 s"
    );
    let sender = connections(&env, 1).await.pop().expect("one connection");
    let follower = tokio::spawn(read_on(sender, env.gw.addr.to_string(), "/me".into()));
    // On the paused clock this pause ends only once the follower has got as far as it can
    // (joined the leader's call, whose 400 ms are still to run), however busy the machine.
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(leader);
    let (status, cache, body) = follower.await.expect("follower task");
    assert_eq!(
        status,
        StatusCode::OK,
        "follower: expected 200, saw {status}: {body:?}"
    );
    assert_eq!(
        cache, "cxgate; fwd=uri-miss; fwd-status=200; collapsed",
        "follower: expected to share the leader's call"
    );
    let upstream = env.upstream_count("GET /me");
    assert_eq!(upstream, 1, "expected 1 upstream call, saw {upstream}");
    let next = env.get("/me").await;
    assert_hit(&next, "read after the abandoned leader");
    assert_eq!(
        next.body, body,
        "expected the hit to serve the shared answer"
    );
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await
        .json();
    let in_flight = &status["upstream"]["merges_in_flight"];
    assert_eq!(
        *in_flight, 0,
        "expected no merge left in flight, saw {in_flight}"
    );
    env.stop().await;
}

/// `/admin/status` counts each request's lookup once: a miss that looks at the cache again
/// once past its budget is still one miss.
#[tokio::test]
async fn status_counts_one_miss_and_one_hit_for_a_miss_and_a_hit() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get("/me").await, "/me, first read");
    assert_hit(&env.get("/me").await, "/me, second read");
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await
        .json();
    let cache = &status["cache"];
    assert_eq!(
        (cache["hits"].as_u64(), cache["misses"].as_u64()),
        (Some(1), Some(1)),
        "expected 1 hit and 1 miss, saw {cache}"
    );
    assert_eq!(cache["hit_ratio"].as_f64(), Some(0.5), "saw {cache}");
    env.stop().await;
}

#[tokio::test]
async fn a_write_invalidates_exactly_its_tags() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let a = env.get(CONTACT_A).await;
    assert_stored(&a, "contact A, first read");
    let b = env.get(CONTACT_B).await;
    assert_stored(&b, "contact B, first read");
    let old = a.json()["response"]["crm"]["email"].clone();
    assert_ne!(
        old, "x@y.z",
        "expected contact A to start with another email"
    );
    assert_hit(&env.get(CONTACT_A).await, "contact A, second read");

    let write = env
        .post_form(CONTACT_A, "updates=%7B%22email%22%3A%22x%40y.z%22%7D")
        .await;
    assert_eq!(
        write.status,
        StatusCode::OK,
        "write: expected 200, saw {}: {:?}",
        write.status,
        write.body
    );

    let a2 = env.get(CONTACT_A).await;
    assert_stored(&a2, "contact A after the write");
    let email = &a2.json()["response"]["crm"]["email"];
    assert_eq!(
        *email, "x@y.z",
        "expected the written email after the write, saw {email}"
    );
    assert_hit(&env.get(CONTACT_B).await, "contact B after a write to A");
    let seen = (
        env.upstream_count(&format!("GET {CONTACT_A}")),
        env.upstream_count(&format!("GET {CONTACT_B}")),
    );
    assert_eq!(
        seen,
        (2, 1),
        "expected upstream reads (A, B) = (2, 1), saw {seen:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_failed_write_invalidates_nothing() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get(CONTACT_A).await, "contact A, first read");
    // An empty form is refused by the upstream (400): nothing changed, nothing to drop.
    let write = env.post_form(CONTACT_A, "").await;
    assert_eq!(
        write.status,
        StatusCode::BAD_REQUEST,
        "expected the upstream's 400 for an empty write, saw {}",
        write.status
    );
    assert_hit(&env.get(CONTACT_A).await, "contact A after a refused write");
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_byte_bound_holds_and_evicts() {
    let extra = format!(
        "[cache]\nmax_bytes = \"64KiB\"\n[budget]\nlimit = 100000\nperiod = \"1s\"\nburst = 10000\n{ROUTES}"
    );
    let env = common::start(SimOptions::default(), &extra).await;
    let target = 10 * 65536;
    let (mut read, mut calls) = (0, 0u64);
    // The simulator's three accounts, 50 pages of 10 mentions each.
    'outer: for account in [12345u64, 23456, 34567] {
        for page in 0..50u64 {
            let path = format!(
                "/{account}/inbox/mentions?limit=10&page_token=pt{}",
                page * 10
            );
            let a = env.get(&path).await;
            assert_stored(&a, &path);
            read += a.body.len();
            calls += 1;
            if read >= target {
                break 'outer;
            }
        }
    }
    assert!(
        read >= target,
        "expected to read {target} bytes, read {read}"
    );
    let mut bytes = None;
    let mut evictions = None;
    let settled = {
        let mut ok = false;
        for _ in 0..40 {
            let text = env.metrics().await;
            bytes = metric(&text, "cxgate_cache_bytes");
            evictions = metric(&text, "cxgate_cache_evictions_total");
            if bytes.is_some_and(|b| b > 0.0 && b <= 65536.0) && evictions.is_some_and(|e| e > 0.0)
            {
                ok = true;
                break;
            }
            // moka settles its counts in maintenance, which traffic triggers.
            let _ = env
                .get("/34567/inbox/mentions?limit=10&page_token=pt0")
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        ok
    };
    assert!(
        settled,
        "expected 0 < cxgate_cache_bytes <= 65536 and cxgate_cache_evictions_total > 0 after \
         reading {read} bytes in {calls} entries, saw bytes {bytes:?}, evictions {evictions:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn equivalent_queries_share_an_entry() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let base = "/12345/inbox/mentions";
    let first = env.get(&format!("{base}?limit=2&sort=asc")).await;
    assert_stored(&first, "limit=2&sort=asc");
    let swapped = env.get(&format!("{base}?sort=asc&limit=2")).await;
    assert_hit(&swapped, "sort=asc&limit=2");
    assert_eq!(
        swapped.body, first.body,
        "expected the same body for reordered parameters"
    );
    let keyed = env
        .send(
            Method::GET,
            &env.url(&format!("{base}?limit=2&access_token={KEY}&sort=asc")),
            &[],
            "",
        )
        .await;
    assert_hit(&keyed, "the key as access_token parameter");
    let other = env.get(&format!("{base}?limit=3&sort=asc")).await;
    assert_stored(&other, "limit=3&sort=asc");
    assert_ne!(
        other.body, first.body,
        "expected limit=3 to answer differently"
    );
    let upstream = env.upstream_count(&format!("GET {base}"));
    assert_eq!(
        upstream, 2,
        "expected 2 upstream calls (limit 2 and 3), saw {upstream}"
    );
    env.stop().await;
}

#[tokio::test]
async fn queries_that_differ_only_in_invalid_utf8_bytes_do_not_share_an_entry() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let base = "/12345/inbox/mentions";
    let first = env.get(&format!("{base}?q=%ff")).await;
    assert_stored(&first, "q=%ff");
    // Each of these is a different byte string to the upstream; a lossy decode made all of
    // them U+FFFD and answered them from the `%ff` entry.
    for other in ["q=%fe", "q=%c0%af", "q=%ef%bf%bd"] {
        let answer = env.get(&format!("{base}?{other}")).await;
        assert_stored(&answer, other);
    }
    let again = env.get(&format!("{base}?q=%FF")).await;
    assert_hit(&again, "q=%FF after q=%ff (the same byte)");
    let upstream = env.upstream_count(&format!("GET {base}"));
    assert_eq!(
        upstream, 4,
        "expected 4 upstream calls (one per distinct byte string), saw {upstream}"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_trailing_slash_is_the_same_resource() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let plain = env.get("/me").await;
    assert_stored(&plain, "/me");
    let slashed = env.get("/me/").await;
    assert_hit(&slashed, "/me/ after /me");
    assert_eq!(
        slashed.body, plain.body,
        "expected /me/ to serve the /me body"
    );
    let upstream = env.upstream_total();
    assert_eq!(
        upstream, 1,
        "expected 1 upstream call in all, saw {upstream}"
    );
    env.stop().await;
}

fn assert_stale(a: &Answer, what: &str) {
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{what}: expected 200, saw {}",
        a.status
    );
    let status = a.header("cache-status");
    let past = status
        .strip_prefix("cxgate; hit; ttl=-")
        .and_then(|rest| rest.strip_suffix("; detail=stale"))
        .and_then(|n| n.parse::<u64>().ok());
    assert!(
        past.is_some_and(|n| n >= 1),
        "{what}: expected `cxgate; hit; ttl=-N; detail=stale` with N >= 1, saw {status:?}"
    );
    let age = a.header("age").parse::<u64>().ok();
    assert!(
        age.is_some_and(|n| n >= 1),
        "{what}: expected Age >= 1 on a stale answer, saw {:?}",
        a.header("age")
    );
}

#[tokio::test(start_paused = true)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let env = common::start(SimOptions::default(), SHORT_TTL_ROUTES).await;
    let first = env.get("/me").await;
    assert_stored(&first, "/me, first read");
    tokio::time::advance(Duration::from_millis(1100)).await;
    // The refresh is slow, so an answer that waited for it would show: on the paused clock
    // the stale answer takes no time at all unless it waited for the refresh's 500 ms.
    env.sim.set_faults(latency(500));
    let started = tokio::time::Instant::now();
    let stale = env.get("/me").await;
    let waited = started.elapsed();
    assert_stale(&stale, "/me past its ttl");
    assert_eq!(
        stale.body, first.body,
        "expected the stored body while stale"
    );
    assert!(
        waited < Duration::from_millis(400),
        "expected the stale answer at once, it took {waited:?}"
    );
    // More stale reads while the refresh runs share it.
    for _ in 0..3 {
        assert_stale(&env.get("/me").await, "/me during the refresh");
    }
    let refreshed = eventually(Duration::from_secs(2), || {
        env.upstream_count("GET /me") == 2
    })
    .await;
    assert!(
        refreshed,
        "expected one background refresh (2 upstream calls), saw {}",
        env.upstream_count("GET /me")
    );
    // The refresh stores before its task ends; give the store a moment after the count.
    let mut fresh = env.get("/me").await;
    for _ in 0..20 {
        if !fresh.header("cache-status").contains("stale") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        fresh = env.get("/me").await;
    }
    assert_hit(&fresh, "/me after the refresh");
    let upstream = env.upstream_count("GET /me");
    assert_eq!(
        upstream, 2,
        "expected exactly one refresh, saw {upstream} upstream calls"
    );
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_covers_a_failing_upstream() {
    let env = common::start(SimOptions::default(), SHORT_TTL_ROUTES).await;
    let first = env.get("/me/accounts").await;
    assert_stored(&first, "/me/accounts, first read");
    tokio::time::advance(Duration::from_millis(1100)).await;
    env.sim.set_faults(Faults {
        error_rate: 1.0,
        error_status: 503,
        ..Faults::default()
    });
    let stale = env.get("/me/accounts").await;
    assert_stale(&stale, "/me/accounts with the upstream failing");
    assert_eq!(
        stale.body, first.body,
        "expected the stored body as the stale answer"
    );
    let upstream = env.upstream_count("GET /me/accounts");
    assert_eq!(
        upstream, 2,
        "expected the stale answer only after a tried refetch, saw {upstream} calls"
    );
    // No stale entry to stand in: the upstream's 503 passes through.
    let cold = env.get("/me/connectedprofiles").await;
    assert_eq!(
        cold.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "expected the upstream's 503 without a stale entry, saw {}: {:?}",
        cold.status,
        cold.body
    );
    assert_eq!(
        cold.header("cache-status"),
        "cxgate; fwd=uri-miss; fwd-status=503",
        "expected a forwarded, unstored 503"
    );
    env.sim.set_faults(Faults::default());
    // Past the ttl without swr, a healthy upstream means a miss, with no Age from the old entry.
    let miss = env.get("/me/accounts").await;
    assert_stored(&miss, "/me/accounts with the upstream back");
    assert!(
        miss.headers.get("age").is_none(),
        "expected no Age on a refetched answer, saw {:?}",
        miss.header("age")
    );
    env.stop().await;
}

#[tokio::test]
async fn client_no_cache_refetches_and_no_store_bypasses_both_ways() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get("/me").await, "/me, first read");
    let refetch = get_with(&env, "/me", &[("cache-control", "no-cache")]).await;
    assert_eq!(
        refetch.status,
        StatusCode::OK,
        "no-cache: expected 200, saw {}",
        refetch.status
    );
    assert!(
        refetch
            .header("cache-status")
            .starts_with("cxgate; fwd=request; "),
        "no-cache: expected `cxgate; fwd=request; ...`, saw {:?}",
        refetch.header("cache-status")
    );
    let upstream = env.upstream_count("GET /me");
    assert_eq!(
        upstream, 2,
        "no-cache: expected a second upstream call, saw {upstream}"
    );
    assert_hit(&env.get("/me").await, "/me after a no-cache refetch");

    // no-store does not read: a stored entry is ignored.
    let unread = get_with(&env, "/me", &[("cache-control", "no-store")]).await;
    assert_eq!(
        unread.status,
        StatusCode::OK,
        "no-store: expected 200, saw {}",
        unread.status
    );
    assert!(
        !is_hit(&unread),
        "no-store: expected no hit, saw {:?}",
        unread.header("cache-status")
    );
    let upstream = env.upstream_count("GET /me");
    assert_eq!(
        upstream, 3,
        "no-store: expected a third upstream call, saw {upstream}"
    );

    // no-store does not write: the next plain read is still a miss.
    let unwritten = get_with(&env, "/me/accounts", &[("cache-control", "no-store")]).await;
    assert_eq!(
        unwritten.status,
        StatusCode::OK,
        "no-store: expected 200, saw {}",
        unwritten.status
    );
    assert!(
        !unwritten.header("cache-status").contains("stored"),
        "no-store: expected nothing stored, saw {:?}",
        unwritten.header("cache-status")
    );
    assert_stored(
        &env.get("/me/accounts").await,
        "/me/accounts after a no-store read",
    );
    let upstream = env.upstream_count("GET /me/accounts");
    assert_eq!(
        upstream, 2,
        "expected 2 upstream calls for /me/accounts, saw {upstream}"
    );
    env.stop().await;
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let get = env.get("/me").await;
    assert_stored(&get, "GET /me");
    let auth = bearer();
    let head = env
        .send(
            Method::HEAD,
            &env.url("/me"),
            &[("authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(
        head.status,
        StatusCode::OK,
        "HEAD: expected 200, saw {}",
        head.status
    );
    assert!(
        is_hit(&head),
        "HEAD: expected a hit, saw {:?}",
        head.header("cache-status")
    );
    assert!(
        head.body.is_empty(),
        "HEAD: expected no body, saw {} bytes",
        head.body.len()
    );
    let upstream = env.upstream_total();
    assert_eq!(
        upstream, 1,
        "expected HEAD to cost no upstream call, saw {upstream} calls"
    );
    // A cold HEAD fetches with GET and fills the entry GET then uses.
    let cold = env
        .send(
            Method::HEAD,
            &env.url("/me/accounts"),
            &[("authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(
        cold.status,
        StatusCode::OK,
        "cold HEAD: expected 200, saw {}",
        cold.status
    );
    assert!(
        cold.body.is_empty(),
        "cold HEAD: expected no body, saw {} bytes",
        cold.body.len()
    );
    let after = env.get("/me/accounts").await;
    assert_hit(&after, "GET after a cold HEAD");
    assert!(
        !after.body.is_empty(),
        "expected the GET hit to carry the body"
    );
    let upstream = env.upstream_count("GET /me/accounts");
    assert_eq!(
        upstream, 1,
        "expected the cold HEAD's one GET upstream, saw {upstream}"
    );
    env.stop().await;
}

#[tokio::test]
async fn admin_purge_by_tag_path_and_all() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let purged = |a: &Answer| {
        assert_eq!(
            a.status,
            StatusCode::OK,
            "purge: expected 200, saw {}: {:?}",
            a.status,
            a.body
        );
        a.json()["purged"].as_u64()
    };
    assert_stored(&env.get("/me").await, "/me");
    assert_stored(&env.get("/me/accounts").await, "/me/accounts");
    assert_stored(&env.get(CONTACT_A).await, "contact A");
    let n = purged(&purge(&env, r#"{"tags":["me"]}"#).await);
    assert_eq!(
        n,
        Some(2),
        "tags [me]: expected 2 purged (/me, /me/accounts), saw {n:?}"
    );
    assert_stored(&env.get("/me").await, "/me after the tag purge");
    assert_stored(
        &env.get("/me/accounts").await,
        "/me/accounts after the tag purge",
    );
    assert_hit(
        &env.get(CONTACT_A).await,
        "contact A after purging another tag",
    );

    assert_stored(&env.get("/me?fields=id").await, "/me?fields=id");
    let n = purged(&purge(&env, r#"{"path":"/me"}"#).await);
    assert_eq!(
        n,
        Some(2),
        "path /me: expected 2 purged (/me, /me?fields=id), saw {n:?}"
    );
    assert_stored(&env.get("/me").await, "/me after the path purge");
    assert_hit(
        &env.get("/me/accounts").await,
        "/me/accounts after purging /me",
    );

    let n = purged(&purge(&env, r#"{"all":true}"#).await);
    assert_eq!(n, Some(3), "all: expected 3 purged, saw {n:?}");
    for path in ["/me", "/me/accounts", CONTACT_A] {
        assert_stored(&env.get(path).await, &format!("{path} after purging all"));
    }

    // Each names less or more than one thing to purge: never read as something else.
    for bad in [
        "{not json",
        "{}",
        r#"{"tags":[1]}"#,
        r#"{"path":"me"}"#,
        r#"{"path":"/me?x=1"}"#,
        r#"{"tags":["me"],"all":true}"#,
        r#"{"all":false}"#,
        r#"{"path":"/me","extra":1}"#,
        r#"["/me"]"#,
        // JSON keeps the last of two equal names: this would purge `zzz` alone.
        r#"{"tags":["me"],"tags":["zzz"]}"#,
        r#"{"path":"/me","path":"/x"}"#,
    ] {
        let a = purge(&env, bad).await;
        assert_eq!(
            a.status,
            StatusCode::BAD_REQUEST,
            "purge {bad}: expected 400, saw {}: {:?}",
            a.status,
            a.body
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn a_purge_counts_only_what_is_still_stored() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get("/me").await, "/me");
    let n = purge(&env, r#"{"path":"/me"}"#).await.json()["purged"].as_u64();
    assert_eq!(n, Some(1), "path /me: expected 1 purged, saw {n:?}");
    let n = purge(&env, r#"{"tags":["me"]}"#).await.json()["purged"].as_u64();
    assert_eq!(
        n,
        Some(0),
        "tags [me] after purging /me: expected 0 purged, saw {n:?}"
    );
    assert_stored(&env.get("/me").await, "/me after the purges");
    let n = purge(&env, r#"{"all":true}"#).await.json()["purged"].as_u64();
    assert_eq!(n, Some(1), "all: expected 1 purged, saw {n:?}");
    let n = purge(&env, r#"{"tags":["me"]}"#).await.json()["purged"].as_u64();
    assert_eq!(
        n,
        Some(0),
        "tags [me] after purging all: expected 0 purged, saw {n:?}"
    );
    env.stop().await;
}

/// A purge path is read as a request's path is read for its cache key: `/m%65` is the
/// `/me` a request of `/m%65` is served from, so purging it drops that entry; a path no
/// request may have (`//me`, `/me;x`, an account spelled `0123`) is a 400 in the CX
/// Social envelope naming the form, not "0 purged".
#[tokio::test]
async fn a_purge_path_is_read_as_the_cache_key_reads_it() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get("/me").await, "/me");
    assert_hit(&env.get("/m%65").await, "/m%65, the /me entry");
    let a = purge(&env, r#"{"path":"/m%65"}"#).await;
    assert_eq!(
        (a.status, a.json()["purged"].as_u64()),
        (StatusCode::OK, Some(1)),
        "purge /m%65: expected the /me entry purged, saw {:?}",
        a.body
    );
    assert_stored(&env.get("/me").await, "/me after purging /m%65");
    for bad in ["//me", "/me;x", "/me/%2e%2e", "/0123/inbox/mentions"] {
        assert_ne!(
            env.get(bad).await.status,
            StatusCode::OK,
            "{bad}: expected a client request refused"
        );
        let a = purge(&env, &format!(r#"{{"path":"{bad}"}}"#)).await;
        let body = a.json();
        assert_eq!(
            (a.status, body["meta"]["error_type"].as_str()),
            (StatusCode::BAD_REQUEST, Some("bad_request")),
            "purge {bad}: expected a 400 envelope, saw {:?}",
            a.body
        );
        let message = body["meta"]["error_message"].as_str().unwrap_or_default();
        assert!(
            message.contains("purge path") && message.contains("\"/me\""),
            "purge {bad}: expected the message to name the forms, saw {message:?}"
        );
    }
    assert_hit(&env.get("/me").await, "/me after the refused purges");
    env.stop().await;
}

#[tokio::test]
async fn hits_carry_age_and_misses_do_not() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let miss = env.get("/me").await;
    assert_stored(&miss, "/me, first read");
    assert!(
        miss.headers.get("age").is_none(),
        "expected no Age on a miss, saw {:?}",
        miss.header("age")
    );
    let hit = env.get("/me").await;
    assert_hit(&hit, "/me, second read");
    let age = hit.header("age").parse::<u64>();
    assert_eq!(
        age,
        Ok(0),
        "expected Age: 0 on an immediate hit, saw {:?}",
        hit.header("age")
    );
    env.stop().await;
}

#[tokio::test]
async fn error_answers_are_not_stored() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    env.sim.set_faults(Faults {
        error_rate: 1.0,
        error_status: 500,
        ..Faults::default()
    });
    let failed = env.get("/me").await;
    assert_eq!(
        failed.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "expected the forced 500, saw {}",
        failed.status
    );
    assert_eq!(
        failed.header("cache-status"),
        "cxgate; fwd=uri-miss; fwd-status=500",
        "expected a forwarded, unstored 500"
    );
    env.sim.set_faults(Faults::default());
    let next = env.get("/me").await;
    assert_stored(&next, "/me after the error");
    let upstream = env.upstream_count("GET /me");
    assert_eq!(
        upstream, 2,
        "expected the read after a 500 to go upstream, saw {upstream} calls"
    );
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn stale_if_error_covers_an_upstream_429() {
    let env = common::start(SimOptions::default(), SHORT_TTL_ROUTES).await;
    let first = env.get("/me/accounts").await;
    assert_stored(&first, "/me/accounts, first read");
    tokio::time::advance(Duration::from_millis(1100)).await;
    env.sim.set_faults(Faults {
        force_429: Some(cxgate::sim::Force429 {
            count: 1,
            retry_after: 1,
        }),
        ..Faults::default()
    });
    // The read that meets the upstream's 429 and the one during the pause that follows.
    let refused = env.get("/me/accounts").await;
    let paused = env.get("/me/accounts").await;
    assert_stale(&paused, "/me/accounts while the upstream is paused");
    assert_stale(&refused, "/me/accounts answered 429 by the upstream");
    assert_eq!(
        refused.body, first.body,
        "expected the stored body as the stale answer"
    );
    env.stop().await;
}

/// A read already in flight when a write invalidates its tags got its answer from before
/// the write: it must not be stored, and a read sent after the write must not join it.
#[tokio::test(start_paused = true)]
async fn a_read_in_flight_across_a_write_is_neither_stored_nor_joined() {
    const MENTIONS: &str = "/12345/inbox/mentions";
    let env = Arc::new(common::start(SimOptions::default(), ROUTES).await);
    // One answer first, so the upstream's remaining count is known: until then a call goes
    // alone, and the write would wait for the read instead of crossing it.
    assert_eq!(env.get("/me").await.status, StatusCode::OK, "warm-up read");
    // The list answer is made at once and then dribbled for a second: the upstream's data
    // is from before the write, the gateway only has it after.
    env.sim.set_faults(Faults {
        slow_body_ms: 1000,
        path_prefix: Some(MENTIONS.into()),
        ..Faults::default()
    });
    let early = tokio::spawn({
        let env = Arc::clone(&env);
        async move { env.get(MENTIONS).await }
    });
    // On the paused clock the body's second of dribble waits until the write is done.
    eventually(Duration::from_secs(5), || {
        env.upstream_count(&format!("GET {MENTIONS}")) >= 1
    })
    .await;
    let write = env
        .post_form(
            "/12345/inbox/mention/123451/m1",
            "updates=%7B%22status%22%3A%22closed%22%7D",
        )
        .await;
    assert_eq!(
        write.status,
        StatusCode::OK,
        "write: expected 200, saw {}: {:?}",
        write.status,
        write.body
    );
    let late = env.get(MENTIONS).await;
    let early = early.await.expect("early read");
    assert_eq!(early.status, StatusCode::OK, "early read: {early:?}");
    assert_eq!(
        early.header("cache-status"),
        "cxgate; fwd=uri-miss; fwd-status=200",
        "expected the read that crossed the write answered but not stored"
    );
    assert!(
        !late.header("cache-status").contains("collapsed"),
        "expected the read after the write to make its own call, saw {:?}",
        late.header("cache-status")
    );
    env.sim.set_faults(Faults::default());
    let reads = env.upstream_count(&format!("GET {MENTIONS}"));
    assert_eq!(
        reads, 2,
        "expected two upstream reads (one each side of the write), saw {reads}"
    );
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("expected the early read's task to have let go of the env"),
    }
}

/// Stale-if-error covers every way a refetch can fail, not only a 5xx: an upstream slower
/// than `upstream.timeout`, a connection dropped without an answer, and a refetch the
/// gateway's own budget refuses.
#[tokio::test(start_paused = true)]
async fn stale_if_error_covers_timeouts_dropped_connections_and_budget_refusals() {
    let env = common::start(SimOptions::default(), SHORT_TTL_ROUTES).await;
    let first = env.get("/me/accounts").await;
    assert_stored(&first, "/me/accounts, first read");
    tokio::time::advance(Duration::from_millis(1100)).await;
    for (what, faults) in [
        (
            "an upstream slower than upstream.timeout (2 s)",
            Faults {
                latency_ms: 2500,
                ..Faults::default()
            },
        ),
        (
            "a dropped connection",
            Faults {
                drop_rate: 1.0,
                ..Faults::default()
            },
        ),
    ] {
        env.sim.set_faults(faults);
        let stale = env.get("/me/accounts").await;
        assert_stale(&stale, what);
        assert_eq!(stale.body, first.body, "{what}: expected the stored body");
    }
    env.sim.set_faults(Faults::default());
    env.stop().await;

    // One cell of budget for the whole hour: the first read spends it.
    let tiny = format!(
        "[budget]\nlimit = 1\nperiod = \"1h\"\nburst = 1\nmax_wait = \"0s\"\n{SHORT_TTL_ROUTES}"
    );
    let env = common::start(SimOptions::default(), &tiny).await;
    let first = env.get("/me/accounts").await;
    assert_stored(&first, "/me/accounts, first read (the only budget)");
    tokio::time::advance(Duration::from_millis(1100)).await;
    let stale = env.get("/me/accounts").await;
    assert_stale(&stale, "/me/accounts with the budget spent");
    let cold = env.get("/me/connectedprofiles").await;
    assert_eq!(
        cold.status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected 429 for a miss with the budget spent, saw {}: {:?}",
        cold.status,
        cold.body
    );
    assert!(
        cold.headers.contains_key("retry-after"),
        "expected Retry-After on the budget's 429"
    );
    assert_eq!(
        cold.header("cache-status"),
        "cxgate; fwd=uri-miss",
        "expected Cache-Status on the gateway's own answer to a miss"
    );
    let calls =
        env.upstream_count("GET /me/accounts") + env.upstream_count("GET /me/connectedprofiles");
    assert_eq!(
        calls, 1,
        "expected only the first read upstream, saw {calls}"
    );
    env.stop().await;
}

/// An upstream that answers every request like a static web server: 200, a small JSON
/// body and the headers nginx sends (`Server`, an old `Date`, `Accept-Ranges`, ...).
async fn web_server_upstream() -> String {
    let mut reply = common::Reply::ok();
    reply.headers.clear();
    let reply = reply
        .header("server", "nginx/1.24.0 (Ubuntu)")
        .header("content-type", "application/json; charset=utf-8")
        .header("date", "Tue, 24 Nov 2026 09:00:00 GMT")
        .header("last-modified", "Tue, 24 Nov 2026 09:14:03 GMT")
        .header("etag", "\"6743f1cb-2a\"")
        .header("accept-ranges", "bytes")
        .header("x-powered-by", "PHP/8.2")
        .header("content-language", "en");
    let (base, _seen, _task) = common::static_upstream(reply).await;
    base
}

/// Every value of header `name` in an answer.
fn all(a: &Answer, name: &str) -> Vec<String> {
    a.headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

#[tokio::test]
async fn hits_keep_what_clients_read_and_regenerate_the_rest() {
    let upstream = web_server_upstream().await;
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env =
        common::start_custom(SimOptions::default(), "", Some(&upstream), &clients, ROUTES).await;
    let miss = env.get("/me").await;
    assert_stored(&miss, "first GET /me");
    let hit = env.get("/me").await;
    assert_hit(&hit, "second GET /me");
    assert_eq!(hit.body, miss.body, "the hit must carry the stored body");

    // What a client or a revalidation reads comes back exactly as the upstream sent it.
    for (name, value) in [
        ("content-type", "application/json; charset=utf-8"),
        ("last-modified", "Tue, 24 Nov 2026 09:14:03 GMT"),
        ("etag", "\"6743f1cb-2a\""),
        ("content-language", "en"),
    ] {
        assert_eq!(
            all(&hit, name),
            [value],
            "hit: expected {name} kept as the upstream sent it"
        );
    }
    // What names the upstream's software or only held for one answer is not stored.
    for name in ["server", "x-powered-by", "accept-ranges"] {
        assert!(
            all(&hit, name).is_empty(),
            "hit: expected no {name}, saw {:?}",
            all(&hit, name)
        );
    }
    // Date is the gateway's own, written for this answer; Content-Length matches the body.
    let dates = all(&hit, "date");
    assert_eq!(dates.len(), 1, "hit: expected one Date, saw {dates:?}");
    assert_ne!(
        dates[0], "Tue, 24 Nov 2026 09:00:00 GMT",
        "hit: expected a Date of this answer, not the upstream's"
    );
    let lengths = all(&hit, "content-length");
    assert_eq!(
        lengths,
        [hit.body.len().to_string()],
        "hit: expected one Content-Length matching the body"
    );

    env.stop().await;
}

/// A 206 is a part of an answer: passed on as it came, never stored (the next read of the
/// key would be served the fragment as the whole answer), and `Cache-Status` says so.
/// `Range` itself never goes upstream: a client that sends it gets the whole answer.
#[tokio::test]
async fn a_partial_answer_is_passed_on_but_never_stored() {
    let partial = common::Reply::ok()
        .status(206)
        .header("content-range", "bytes 0-9/100");
    let (upstream, seen, task) = common::static_upstream(partial).await;
    let clients = common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]");
    let env =
        common::start_custom(SimOptions::default(), "", Some(&upstream), &clients, ROUTES).await;
    for round in ["first", "second"] {
        let answer = get_with(&env, "/me", &[("range", "bytes=0-9")]).await;
        assert_eq!(
            answer.status,
            StatusCode::PARTIAL_CONTENT,
            "{round} read: expected the upstream's 206 passed on, saw {}",
            answer.status
        );
        assert_eq!(
            answer.header("cache-status"),
            "cxgate; fwd=uri-miss; fwd-status=206",
            "{round} read: expected a miss that was not stored"
        );
    }
    let got = common::taken(&seen);
    assert_eq!(
        got.len(),
        2,
        "expected both reads upstream (nothing stored), saw {}",
        got.len()
    );
    assert!(
        got.iter()
            .all(|s| !s.headers.contains_key("range") && !s.headers.contains_key("if-range")),
        "expected neither Range nor If-Range forwarded, saw {:?}",
        got.iter().map(|s| &s.headers).collect::<Vec<_>>()
    );
    env.stop().await;
    task.abort();
}

/// A client's `Cache-Control: max-age=0` takes no stored answer (RFC 9111 5.2.1.1): a
/// refetch, as for `no-cache`; `max-age=N` takes a hit only while its `Age` is at most N;
/// `Pragma: no-cache` refetches when no `Cache-Control` is sent (RFC 9111 5.4).
#[tokio::test(start_paused = true)]
async fn a_clients_max_age_and_pragma_are_honoured() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    assert_stored(&env.get("/me").await, "/me, first read");
    let refetch = |headers: &'static [(&'static str, &'static str)], calls: u64| {
        let env = &env;
        async move {
            let answer = get_with(env, "/me", headers).await;
            assert_eq!(answer.status, StatusCode::OK, "{headers:?}: expected 200");
            assert_eq!(
                answer.header("cache-status"),
                "cxgate; fwd=request; fwd-status=200; stored",
                "{headers:?}: expected a refetch the client asked for"
            );
            let upstream = env.upstream_count("GET /me");
            assert_eq!(
                upstream, calls,
                "{headers:?}: expected {calls} upstream calls, saw {upstream}"
            );
        }
    };
    refetch(&[("cache-control", "max-age=0")], 2).await;
    refetch(&[("cache-control", "no-transform, MAX-AGE=\"0\"")], 3).await;
    refetch(&[("pragma", "no-cache")], 4).await;
    // With Cache-Control present, Pragma is not read.
    let hit = get_with(
        &env,
        "/me",
        &[("pragma", "no-cache"), ("cache-control", "max-age=60")],
    )
    .await;
    assert_hit(&hit, "Pragma beside Cache-Control: max-age=60");

    tokio::time::advance(Duration::from_secs(5)).await;
    let young = get_with(&env, "/me", &[("cache-control", "max-age=5")]).await;
    assert_hit(&young, "max-age=5 at Age 5");
    assert_eq!(young.header("age"), "5", "expected Age 5 on the hit");
    refetch(&[("cache-control", "max-age=4")], 5).await;
    // The refetch stored a new answer: young enough again.
    assert_hit(
        &get_with(&env, "/me", &[("cache-control", "max-age=4")]).await,
        "max-age=4 after the refetch",
    );
    assert_hit(&env.get("/me").await, "a plain read after the refetches");
    env.stop().await;
}

/// A client's `Cache-Control: min-fresh=N` takes a stored answer only while it stays fresh
/// N more seconds (RFC 9111 5.2.1.3), else refetches; `max-stale[=N]` takes a stale one as
/// it is, stale by at most N seconds (RFC 9111 5.2.1.2), where without it the read would
/// go upstream.
#[tokio::test(start_paused = true)]
async fn a_clients_min_fresh_and_max_stale_are_honoured() {
    // Minutes pass on the paused clock: the client's pooled connection must outlive them.
    let env = common::start_custom(
        SimOptions::default(),
        "idle_timeout = \"1h\"",
        None,
        &common::client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        ROUTES,
    )
    .await;
    assert_stored(&env.get("/me").await, "/me, first read");
    // The ttl is 10 minutes: 5 minutes in, 300 s of freshness are left.
    tokio::time::advance(Duration::from_secs(300)).await;
    let enough = get_with(&env, "/me", &[("cache-control", "min-fresh=299")]).await;
    assert_hit(&enough, "min-fresh=299 with 300 s left");
    assert_eq!(
        env.upstream_count("GET /me"),
        1,
        "expected the hit to call nothing"
    );
    let short = get_with(&env, "/me", &[("cache-control", "min-fresh=301")]).await;
    assert_eq!(
        short.header("cache-status"),
        "cxgate; fwd=request; fwd-status=200; stored",
        "min-fresh=301 with 300 s left: expected a refetch"
    );
    assert_eq!(env.upstream_count("GET /me"), 2, "expected one refetch");
    // The refetched answer has its whole ttl ahead.
    assert_hit(
        &get_with(&env, "/me", &[("cache-control", "min-fresh=301")]).await,
        "min-fresh=301 after the refetch",
    );
    env.stop().await;

    let env = common::start(SimOptions::default(), SHORT_TTL_ROUTES).await;
    assert_stored(&env.get("/me/accounts").await, "/me/accounts, first read");
    // Stale by 5 s, no stale-while-revalidate: a plain read would go upstream.
    tokio::time::advance(Duration::from_secs(6)).await;
    for ask in [
        "max-stale=10",
        "max-stale",
        "no-transform, MAX-STALE=\"60\"",
    ] {
        let stale = get_with(&env, "/me/accounts", &[("cache-control", ask)]).await;
        assert_stale(&stale, ask);
        assert_eq!(
            env.upstream_count("GET /me/accounts"),
            1,
            "{ask}: expected the stale answer taken as it is"
        );
    }
    let strict = get_with(&env, "/me/accounts", &[("cache-control", "max-stale=2")]).await;
    assert_eq!(strict.status, StatusCode::OK, "max-stale=2: expected 200");
    assert_eq!(
        env.upstream_count("GET /me/accounts"),
        2,
        "max-stale=2 stale by 5 s: expected a refetch, saw Cache-Status {:?}",
        strict.header("cache-status")
    );
    env.stop().await;
}
