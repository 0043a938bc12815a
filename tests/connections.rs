//! The connection-level attack suite: what anyone who can open a socket may try.
//!
//! Silent connections, heads that never end, bodies that dribble (over HTTP/1.1 and over one
//! HTTP/2 connection), more connections than `server.max_connections`, answers too big to
//! hold together, and callers that hang up. Throughout each attack the admin listener and a
//! cache hit for another client must stay answered. The limits are set small here
//! (`header_timeout` 1s, `body_timeout` 1s, `idle_timeout` 3s) so the attacks end quickly.
//! The gateway's timeouts are tokio timers, so the attacks run on tokio's paused clock:
//! every wait below is virtual and ends only once the sockets have nothing left to say.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::{client_toml, start_custom, Env, KEY, ROUTES};
use cxgate::sim::{Faults, SimOptions};
use http::{Method, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The other client's key: the one whose cache hits must keep coming during an attack.
const OTHER: &str = "other-key";

const LIMITS: &str = "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nidle_timeout = \"3s\"\n";

async fn start(server_extra: &str, sim: SimOptions, upstream: Option<&str>) -> Env {
    let clients = format!(
        "{}{}",
        client_toml("test", KEY, "scopes = [\"read\", \"write\"]"),
        client_toml("other", OTHER, "scopes = [\"read\"]")
    );
    start_custom(sim, server_extra, upstream, &clients, ROUTES).await
}

/// Fills the cache with `GET /me`, so the probes below are hits.
async fn prime(env: &Env) {
    let first = env.get_as(OTHER, "/me").await;
    assert_eq!(first.status, 200, "priming GET /me: {:?}", first.body);
    let hit = env.get_as(OTHER, "/me").await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected the second GET /me to be a hit, saw {:?}",
        hit.header("cache-status")
    );
}

/// One round of what must keep working during an attack: `/healthz` on the admin listener
/// and a cache hit for the other client, each on a connection of its own. Returns the
/// slower of the two.
async fn probe(env: &Env, what: &str) -> Duration {
    let started = Instant::now();
    let health = env
        .send(Method::GET, &env.admin_url("/healthz"), &[], "")
        .await;
    assert_eq!(
        health.status, 200,
        "{what}: /healthz answered {}",
        health.status
    );
    let health_took = started.elapsed();
    let started = Instant::now();
    let hit = env.get_as(OTHER, "/me").await;
    assert_eq!(
        hit.status,
        200,
        "{what}: the other client's cache hit answered {} {:?}",
        hit.status,
        String::from_utf8_lossy(&hit.body)
    );
    assert!(
        hit.header("cache-status").contains("hit"),
        "{what}: expected a hit, saw {:?}",
        hit.header("cache-status")
    );
    health_took.max(started.elapsed())
}

/// Probes every 200 ms for `run`, asserting each answer, and returns the slowest.
async fn probe_for(env: &Env, run: Duration, what: &str) -> Duration {
    let until = Instant::now() + run;
    let mut slowest = Duration::ZERO;
    while Instant::now() < until {
        slowest = slowest.max(probe(env, what).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    slowest
}

/// Reads until the peer closes (returning when, after `since`) or `limit` passes (`None`).
async fn closed_within(
    stream: &mut TcpStream,
    since: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    let deadline = since + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(since.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Reads one response head and its `Content-Length` body; returns the status line's code.
async fn read_response(stream: &mut TcpStream, limit: Duration) -> Option<u16> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if bytes.len() >= end + 4 + len {
                return head.split(' ').nth(1).and_then(|c| c.parse().ok());
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr)
        .await
        .expect("connect to the gateway")
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(start_paused = true)]
async fn silent_connections_and_slow_heads_are_closed_while_others_are_answered() {
    let env = start(LIMITS, SimOptions::default(), None).await;
    prime(&env).await;
    let addr = env.gw.addr;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(connect(addr).await);
    }
    // Heads that never end: one header line every 300 ms, for longer than the timeout.
    let mut slow = Vec::new();
    for i in 0..10 {
        slow.push(tokio::spawn(async move {
            let mut s = connect(addr).await;
            let opened = Instant::now();
            let _ = s.write_all(b"GET /me HTTP/1.1\r\nHost: gw\r\n").await;
            for n in 0..20 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if s.write_all(format!("x-slow-{i}-{n}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            closed_within(&mut s, opened, Duration::from_secs(8)).await
        }));
    }
    let slowest = probe_for(
        &env,
        Duration::from_millis(1500),
        "silent and slow-head attack",
    )
    .await;
    for (i, s) in silent.iter_mut().enumerate() {
        let closed = closed_within(s, started, Duration::from_secs(5)).await;
        assert!(
            closed.is_some(),
            "silent connection {i} still open 5 s after accept (header_timeout 1s)"
        );
    }
    for (i, task) in slow.into_iter().enumerate() {
        let closed = task.await.expect("slow-head task");
        let took = closed.unwrap_or_else(|| {
            panic!("slow-head connection {i} still open 8 s after accept (header_timeout 1s)")
        });
        assert!(
            took < Duration::from_secs(4),
            "slow-head connection {i} was closed only after {took:?} (header_timeout 1s)"
        );
    }
    println!("silent/slow head: slowest probe {slowest:?}");
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_lasts_idle_timeout_not_header_timeout() {
    let env = start(LIMITS, SimOptions::default(), None).await;
    prime(&env).await;
    let mut s = connect(env.gw.addr).await;
    s.write_all(
        format!("GET /me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {OTHER}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send a request");
    let status = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(
        status,
        Some(200),
        "expected the keep-alive request answered"
    );
    let answered = Instant::now();
    let early = closed_within(&mut s, answered, Duration::from_secs(2)).await;
    assert!(
        early.is_none(),
        "an idle keep-alive was closed after {early:?}, before idle_timeout (3s)"
    );
    // Still usable after header_timeout has passed twice over.
    s.write_all(
        format!("GET /me HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {OTHER}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send a second request");
    let status = read_response(&mut s, Duration::from_secs(5)).await;
    assert_eq!(status, Some(200), "expected the second request answered");
    let answered = Instant::now();
    let closed = closed_within(&mut s, answered, Duration::from_secs(7)).await;
    assert!(
        closed.is_some(),
        "an idle keep-alive was still open 7 s after its last answer (idle_timeout 3s)"
    );
    env.stop().await;
}

#[tokio::test(start_paused = true)]
async fn connections_past_max_connections_wait_and_the_admin_listener_answers() {
    let extra = format!("{LIMITS}max_connections = 50\n");
    let env = start(&extra, SimOptions::default(), None).await;
    prime(&env).await;
    let addr = env.gw.addr;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(connect(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open = metric(
        &env.metrics().await,
        "cxgate_connections_open{listener=\"client\"}",
    );
    assert!(
        open <= 50.0,
        "expected at most max_connections (50) client connections open, saw {open}"
    );
    assert!(
        open >= 40.0,
        "expected the attack to fill the limit, saw {open}"
    );
    // The admin listener is never behind the client listener's queue.
    let health = env
        .send(Method::GET, &env.admin_url("/healthz"), &[], "")
        .await;
    assert_eq!(health.status, 200, "/healthz during the flood");
    // A new client waits in the backlog until silent ones are closed, then is answered.
    let hit = env.get_as(OTHER, "/me").await;
    assert_eq!(
        hit.status, 200,
        "the other client's hit after the flood drained"
    );
    let mut still_open = 0;
    for s in silent.iter_mut() {
        if closed_within(s, started, Duration::from_secs(10))
            .await
            .is_none()
        {
            still_open += 1;
        }
    }
    assert_eq!(
        still_open, 0,
        "{still_open} of 150 silent connections still open 10 s after they were made"
    );
    let open = metric(
        &env.metrics().await,
        "cxgate_connections_open{listener=\"client\"}",
    );
    assert!(
        open <= 2.0,
        "expected the flood's connections gone, {open} open"
    );
    env.stop().await;
}

/// Writes `head` then dribbles one body byte every 400 ms for `dribble`, then holds the
/// connection without sending; returns the status the gateway finally answered.
async fn dribble_body(addr: SocketAddr, head: String, dribble: Duration) -> Option<u16> {
    let mut s = connect(addr).await;
    s.write_all(head.as_bytes()).await.ok()?;
    let until = Instant::now() + dribble;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(b"x").await.ok()?;
    }
    read_response(&mut s, Duration::from_secs(6)).await
}

#[tokio::test(start_paused = true)]
async fn slow_http1_bodies_hold_no_permit_and_get_408_when_they_stop() {
    let extra = format!("{LIMITS}max_concurrency = 4\n");
    let env = start(&extra, SimOptions::default(), None).await;
    prime(&env).await;
    // A write with a write key: a GET with a body is refused at once, and a read-only key
    // is refused a write before its body is read, so neither can hold a body open.
    let head = format!(
        "POST /12345/inbox/add HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
    );
    let mut dribblers = Vec::new();
    for _ in 0..16 {
        let head = head.clone();
        let addr = env.gw.addr;
        dribblers.push(tokio::spawn(dribble_body(
            addr,
            head,
            Duration::from_secs(3),
        )));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slowest = probe_for(
        &env,
        Duration::from_secs(2),
        "16 slow bodies, max_concurrency 4",
    )
    .await;
    for (i, d) in dribblers.into_iter().enumerate() {
        let status = d.await.expect("dribbler task");
        assert_eq!(
            status,
            Some(408),
            "slow body {i}: expected 408 once it paused past body_timeout, saw {status:?}"
        );
    }
    println!("slow http/1.1 bodies: slowest probe {slowest:?}");
    env.stop().await;
}

/// A request body fed from a channel: what arrives is sent, nothing more until it does.
struct Dribble(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for Dribble {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

#[tokio::test(start_paused = true)]
async fn slow_bodies_on_one_http2_connection_hold_no_permit() {
    let extra = format!("{LIMITS}max_concurrency = 4\n");
    let env = start(&extra, SimOptions::default(), None).await;
    prime(&env).await;
    let stream = connect(env.gw.addr).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("h2 handshake with the gateway");
    tokio::spawn(conn);
    let mut feeds = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..16 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/12345/inbox/add", env.gw.addr))
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", "1000")
            .body(Dribble(rx))
            .expect("request");
        sender.ready().await.expect("h2 sender ready");
        answers.push(tokio::spawn(sender.send_request(req)));
        feeds.push(tx);
    }
    let feeder = tokio::spawn(async move {
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            for tx in &feeds {
                let _ = tx.send(Bytes::from_static(b"x")).await;
            }
        }
        // Hold the streams open without sending: body_timeout must end them.
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(feeds);
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slowest = probe_for(
        &env,
        Duration::from_secs(2),
        "16 slow h2 bodies, max_concurrency 4",
    )
    .await;
    for (i, a) in answers.into_iter().enumerate() {
        let resp = tokio::time::timeout(Duration::from_secs(8), a)
            .await
            .unwrap_or_else(|_| panic!("h2 stream {i}: no answer 8 s after its body stopped"))
            .expect("h2 task")
            .expect("h2 answer");
        assert_eq!(
            resp.status(),
            408,
            "h2 stream {i}: expected 408 once its body paused"
        );
    }
    feeder.abort();
    println!("slow h2 bodies: slowest probe {slowest:?}");
    env.stop().await;
}

/// An upstream whose every answer announces `size` bytes, sends the first 64 KiB, and the
/// rest after `pause`; counts the requests it has received.
async fn big_upstream(size: usize, pause: Duration) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the big upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = Arc::clone(&count);
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                // `/warm`: a small answer at once, so a test can let the gateway learn
                // that the upstream names no limit before the big ones.
                let size = if req.uri().path().ends_with("/warm") {
                    2
                } else {
                    size
                };
                if size > 2 {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                let (tx, rx) = tokio::sync::mpsc::channel(2);
                tokio::spawn(async move {
                    if size <= 2 {
                        let _ = tx.send(Bytes::from_static(b"{}")).await;
                        return;
                    }
                    let first = 64 << 10;
                    let _ = tx.send(Bytes::from(vec![b' '; first])).await;
                    tokio::time::sleep(pause).await;
                    let _ = tx.send(Bytes::from(vec![b' '; size - first])).await;
                });
                let resp = hyper::Response::builder()
                    .header("content-type", "application/json")
                    .header("content-length", size.to_string())
                    .body(Dribble(rx))
                    .expect("response");
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                );
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, seen)
}

#[tokio::test(start_paused = true)]
async fn answers_past_max_buffered_bytes_get_503_and_the_first_completes() {
    let (base, seen) = big_upstream(4 << 20, Duration::from_millis(1500)).await;
    let extra = format!("{LIMITS}max_buffered_bytes = \"6MiB\"\n");
    let env = start(&extra, SimOptions::default(), Some(&base)).await;
    // Until one answer has come back, a call goes alone (the upstream's count is unknown):
    // the second big answer would wait for the first instead of meeting its held bytes.
    assert_eq!(
        env.get_as(KEY, "/big/warm").await.status,
        200,
        "warm-up read"
    );
    let env = Arc::new(env);
    let first = {
        let env = Arc::clone(&env);
        tokio::spawn(async move { env.get_as(KEY, "/big/1").await })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream never saw the first request"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The first answer's head (and its Content-Length) must have reached the gateway before
    // the second is asked; on a busy machine that can take longer than any fixed pause.
    while env.gw.gateway.buffered_bytes() < 4 << 20 {
        assert!(
            Instant::now() < deadline,
            "the gateway never held the first answer's 4 MiB, holds {}",
            env.gw.gateway.buffered_bytes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = env.get_as(KEY, "/big/2").await;
    assert_eq!(
        second.status,
        503,
        "4 MiB held of 6 MiB: a second 4 MiB answer must be refused, saw {} {:?}",
        second.status,
        String::from_utf8_lossy(&second.body[..second.body.len().min(200)])
    );
    assert_eq!(second.json()["meta"]["error_type"], "overloaded");
    let first = first.await.expect("first request");
    assert_eq!(first.status, 200, "the answer being held must complete");
    assert_eq!(first.body.len(), 4 << 20, "the whole first answer");
    assert_eq!(
        env.gw.gateway.buffered_bytes(),
        0,
        "every held byte given back after the answers"
    );
    // The bytes are back: the same answer fits again.
    let again = env.get_as(KEY, "/big/3").await;
    assert_eq!(
        again.status, 200,
        "after the first finished, a new answer fits"
    );
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("env still shared"),
    }
}

/// Opens a write announcing a 1 MiB body and sends `sent` bytes of it, then holds it.
async fn announce_and_hold(addr: SocketAddr, sent: usize) -> tokio::net::TcpStream {
    let mut holder = connect(addr).await;
    holder
        .write_all(
            format!(
                "POST /100/inbox/mention/1/2 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{}",
                1 << 20,
                "x".repeat(sent)
            )
            .as_bytes(),
        )
        .await
        .expect("send the holding head");
    holder
}

#[tokio::test(start_paused = true)]
async fn request_bodies_hold_what_arrived_and_past_max_buffered_bytes_get_503() {
    let extra = format!(
        "{LIMITS}body_timeout = \"5s\"\nmax_body_bytes = \"1MiB\"\nmax_buffered_bytes = \"1536KiB\"\n"
    );
    let extra = extra.replacen("body_timeout = \"1s\"\n", "", 1);
    let env = start(&extra, SimOptions::default(), None).await;
    let addr = env.gw.addr;
    let body = "y".repeat(700 << 10);
    let send = |path: &'static str| {
        let (env, body) = (&env, &body);
        async move {
            env.send(
                Method::POST,
                &env.url(path),
                &[
                    ("authorization", &format!("Bearer {KEY}")),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                body,
            )
            .await
        }
    };
    // 1 MiB announced but only 3 bytes sent holds the 3 bytes, not the megabyte: the
    // announced length is no claim on the pool, so a trickle cannot fill it.
    let trickle = announce_and_hold(addr, 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = env.gw.gateway.buffered_bytes();
    assert!(
        held < 1024,
        "1 MiB announced, 3 bytes sent: expected only what arrived held, saw {held} bytes"
    );
    let beside = send("/100/inbox/mention/1/3").await;
    assert_ne!(
        beside.status,
        503,
        "3 bytes held of 1.5 MiB: a 700 KiB body must be read, saw {} {:?}",
        beside.status,
        String::from_utf8_lossy(&beside.body)
    );
    drop(trickle);
    // The trickle's 3 bytes are the same client's: with them still held, that client's
    // share (1 MiB here) would refuse the holder below before it held its megabyte.
    let until = Instant::now() + Duration::from_secs(5);
    while env.gw.gateway.buffered_bytes() > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A body whose bytes have arrived holds them: 1 MiB less one byte sent and held.
    let holder = announce_and_hold(addr, (1 << 20) - 1).await;
    let until = Instant::now() + Duration::from_secs(5);
    while env.gw.gateway.buffered_bytes() < (1 << 20) - 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = send("/100/inbox/mention/1/4").await;
    assert_eq!(
        second.status,
        503,
        "1 MiB held of 1.5 MiB: a 700 KiB body must be refused, saw {} {:?}",
        second.status,
        String::from_utf8_lossy(&second.body)
    );
    drop(holder);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        env.gw.gateway.buffered_bytes(),
        0,
        "the hung-up body's bytes given back"
    );
    env.stop().await;
}

/// Sends `GET path` as the other client and hangs up after 300 ms, before the answer.
async fn ask_and_hang_up(addr: SocketAddr, path: &str) {
    let mut s = connect(addr).await;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {OTHER}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_uncached_read_is_cancelled_and_a_cached_one_fills_the_cache() {
    let sim = SimOptions {
        faults: Faults {
            latency_ms: 1500,
            path_prefix: Some("/me".into()),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let env = start(LIMITS, sim, None).await;
    let addr = env.gw.addr;
    ask_and_hang_up(addr, "/me/unrouted").await;
    ask_and_hang_up(addr, "/me").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = env
        .send(Method::GET, &env.admin_url("/admin/status"), &[], "")
        .await;
    let merges = status.json()["upstream"]["merges_in_flight"].as_u64();
    assert_eq!(
        merges,
        Some(1),
        "expected only the cacheable read still in flight after both callers left"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let text = env.metrics().await;
    let uncached = metric(&text, "cxgate_upstream_requests_total{route=\"other\"");
    assert_eq!(
        uncached, 0.0,
        "the abandoned uncached read must not have run to the upstream's answer"
    );
    let cached = metric(&text, "cxgate_upstream_requests_total{route=\"GET /me\"");
    assert_eq!(cached, 1.0, "the abandoned cacheable read runs on");
    let hit = env.get_as(OTHER, "/me").await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "the abandoned cacheable read must have filled the cache, saw {:?}",
        hit.header("cache-status")
    );
    env.stop().await;
}

#[test]
fn the_connection_limits_are_configured_checked_and_summarised() {
    let dir = common::temp_dir("conn-config");
    let write = |name: &str, server: &str| {
        let path = dir.join(name);
        let text = format!(
            "[server]\n{server}\n[upstream]\nbase_url = \"http://127.0.0.1:1\"\n\
             [token]\naccess_token_env = \"CX_ACCESS_TOKEN\"\n"
        );
        std::fs::write(&path, text).expect("write config");
        path
    };
    let defaults = cxgate::config::load(&write("defaults.toml", "")).expect("defaults load");
    let summary = defaults.summary();
    for part in [
        "max_connections=10000",
        "header_timeout=10s",
        "body_timeout=10s",
        "idle_timeout=1m",
        "max_buffered_bytes=256MiB",
    ] {
        assert!(
            summary.contains(part),
            "expected {part:?} in the summary, saw:\n{summary}"
        );
    }
    let set = cxgate::config::load(&write(
        "set.toml",
        "header_timeout = \"2s\"\nbody_timeout = \"3s\"\nidle_timeout = \"4s\"\n\
         max_connections = 50\nmax_buffered_bytes = \"8MiB\"",
    ))
    .expect("set values load");
    let s = &set.server;
    assert_eq!(
        (
            s.header_timeout,
            s.body_timeout,
            s.idle_timeout,
            s.max_connections,
            s.max_buffered_bytes
        ),
        (
            Duration::from_secs(2),
            Duration::from_secs(3),
            Duration::from_secs(4),
            50,
            8 << 20
        )
    );
    let bad = cxgate::config::load(&write(
        "bad.toml",
        "header_timeout = \"0s\"\nbody_timeout = \"0s\"\nidle_timeout = \"0s\"\n\
         max_connections = 0\nmax_body_bytes = \"2MiB\"\nmax_buffered_bytes = \"1MiB\"",
    ))
    .expect_err("zero limits must be refused");
    let lines = bad.lines().join("\n");
    for key in [
        "server.header_timeout",
        "server.body_timeout",
        "server.idle_timeout",
        "server.max_connections",
        "server.max_buffered_bytes",
    ] {
        assert!(
            lines.contains(key),
            "expected a problem for {key}, saw:\n{lines}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(start_paused = true)]
async fn a_write_whose_client_hangs_up_still_completes_and_invalidates() {
    const CONTACT: &str = "/12345/inbox/contact/twitter/111";
    let sim = SimOptions {
        faults: Faults {
            latency_ms: 1200,
            path_prefix: Some("/12345/inbox/contact".into()),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let env = start(LIMITS, sim, None).await;
    let first = env.get(CONTACT).await;
    assert_eq!(first.status, 200, "priming the contact");
    let hit = env.get(CONTACT).await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected the contact cached, saw {:?}",
        hit.header("cache-status")
    );
    let mut s = connect(env.gw.addr).await;
    let body = "updates=%7B%22email%22%3A%22x%40y.z%22%7D";
    s.write_all(
        format!(
            "POST {CONTACT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("send the write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let text = env.metrics().await;
    let writes = metric(
        &text,
        "cxgate_upstream_requests_total{route=\"POST /{account_id}/inbox/contact/{service}/{service_id}\"",
    );
    assert_eq!(writes, 1.0, "the write must have run to its answer once");
    let after = env.get(CONTACT).await;
    assert!(
        !after.header("cache-status").contains("hit"),
        "the finished write must have invalidated the contact, saw {:?}",
        after.header("cache-status")
    );
    env.stop().await;
}
