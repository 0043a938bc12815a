//! Wire-level classes, each spelled many ways and checked end to end against an upstream
//! that records what it received: answers compressed in ways their labels do not say,
//! spellings of `/_sim` a server could still read as the simulator's controls, headers a
//! `Connection` header names (both ways), one client's share of the bytes held for
//! request bodies, escaped key names in JSON bodies, and conditional requests against the
//! cache and merging.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::{self, ACCESS, KEY, ROUTES};
use super::requests::{
    bearer, gateway, gzip, scripted_upstream, static_upstream, taken, zlib, Reply, Script, Seen,
};
use cxgate::sim::SimOptions;

/// Makes a raw answer from a request target and the upstream's base URL.
type RawScript = Arc<dyn Fn(&str, &str) -> Vec<u8> + Send + Sync>;

/// An upstream on 127.0.0.1:0 that answers each connection's one request with the raw
/// bytes `answer` makes from its target, then closes; every request head it read is kept.
async fn raw_upstream(
    answer: RawScript,
) -> (String, Arc<Mutex<Vec<String>>>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the raw upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let (kept, base_for) = (heads.clone(), base.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (kept, answer, base) = (kept.clone(), answer.clone(), base_for.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split(' ').nth(1).unwrap_or("/").to_string();
                kept.lock().expect("heads").push(text);
                let _ = stream.write_all(&answer(&target, &base)).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (base, heads, task)
}

/// A raw HTTP/1.1 answer: status line, `headers` (each ending in CRLF) and `body`.
fn raw_answer(headers: &str, body: &[u8]) -> Vec<u8> {
    let mut out =
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{headers}\r\n").into_bytes();
    out.extend_from_slice(body);
    out
}

/// `data` as one chunk and the last chunk.
fn chunked(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

/// A body holding the held token and an upstream link that carries it too.
fn secret_body(base: &str) -> Vec<u8> {
    format!(
        r#"{{"meta":{{"code":200}},"response":{{"t":"{ACCESS}","paging":{{"next_url":"{base}/me/accounts?page_token=2&access_token={ACCESS}"}}}}}}"#
    )
    .into_bytes()
}

/// Transfer codings are undone like content codings; a body that is still gzip or zlib
/// once every listed coding is undone (unlabelled, `identity`, or compressed once more
/// than it says), and a coding the gateway cannot undo, are 502: never passed unscanned.
#[tokio::test]
async fn compressed_bodies_in_any_label_are_scanned_or_refused() {
    let answer = Arc::new(|target: &str, base: &str| -> Vec<u8> {
        let plain = secret_body(base);
        let length = |b: &[u8]| format!("Content-Length: {}\r\n", b.len());
        match target.split('?').next().unwrap_or("") {
            // Close-delimited, as a transfer coding other than chunked must be.
            "/me" | "/me/te-gzip" => raw_answer(
                "Transfer-Encoding: gzip\r\nConnection: close\r\n",
                &gzip(&plain),
            ),
            "/me/te-gzip-chunked" => raw_answer(
                "Transfer-Encoding: gzip, chunked\r\n",
                &chunked(&gzip(&plain)),
            ),
            "/me/te-gzip-ce-gzip" => raw_answer(
                "Content-Encoding: gzip\r\nTransfer-Encoding: gzip, chunked\r\n",
                &chunked(&gzip(&gzip(&plain))),
            ),
            "/me/twice" => {
                let body = gzip(&gzip(&plain));
                raw_answer(
                    &format!("Content-Encoding: gzip, gzip\r\n{}", length(&body)),
                    &body,
                )
            }
            "/me/identity" => {
                let body = gzip(&plain);
                raw_answer(
                    &format!("Content-Encoding: identity\r\n{}", length(&body)),
                    &body,
                )
            }
            "/me/unlabelled" => {
                let body = gzip(&plain);
                raw_answer(&length(&body), &body)
            }
            "/me/unlabelled-zlib" => {
                let body = zlib(&plain);
                raw_answer(&length(&body), &body)
            }
            "/me/inner" => {
                let body = gzip(&gzip(&plain));
                raw_answer(
                    &format!("Content-Encoding: gzip\r\n{}", length(&body)),
                    &body,
                )
            }
            "/me/inner-zlib" => {
                let body = gzip(&zlib(&plain));
                raw_answer(
                    &format!("Content-Encoding: gzip\r\n{}", length(&body)),
                    &body,
                )
            }
            "/me/te-br" => raw_answer("Transfer-Encoding: br, chunked\r\n", &chunked(&plain)),
            "/me/te-compress" => raw_answer(
                "Transfer-Encoding: compress\r\nConnection: close\r\n",
                &plain,
            ),
            "/me/many" => {
                let mut body = plain.clone();
                for _ in 0..6 {
                    body = gzip(&body);
                }
                raw_answer(
                    &format!(
                        "Content-Encoding: gzip, gzip, gzip, gzip, gzip, gzip\r\n{}",
                        length(&body)
                    ),
                    &body,
                )
            }
            _ => raw_answer(&length(&plain), &plain),
        }
    });
    let (base, _heads, upstream) = raw_upstream(answer).await;
    let env = gateway(&base, "").await;
    for path in [
        "/me",
        "/me/te-gzip",
        "/me/te-gzip-chunked",
        "/me/te-gzip-ce-gzip",
        "/me/twice",
        "/me/plain",
    ] {
        let answer = env.get(path).await;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        assert_eq!(answer.status, 200, "{path}: expected 200, saw {answer:?}");
        assert!(
            !text.contains(ACCESS),
            "{path}: the held token reached the client: {text}"
        );
        assert!(
            text.contains(&env.url("/me/accounts?page_token=2")),
            "{path}: expected the upstream link rewritten, saw {text}"
        );
        assert!(
            !answer.header("transfer-encoding").contains("gzip")
                && answer.header("content-encoding").is_empty(),
            "{path}: expected no coding left on the answer, saw {:?}",
            answer.headers
        );
    }
    let hit = env.get("/me").await;
    assert!(
        hit.header("cache-status").contains("hit")
            && !String::from_utf8_lossy(&hit.body).contains(ACCESS),
        "expected the scanned /me served from the cache, saw {hit:?}"
    );
    for path in [
        "/me/identity",
        "/me/unlabelled",
        "/me/unlabelled-zlib",
        "/me/inner",
        "/me/inner-zlib",
        "/me/te-br",
        "/me/te-compress",
        "/me/many",
    ] {
        let answer = env.get(path).await;
        let shown = String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)]);
        assert_eq!(
            answer.status, 502,
            "{path}: expected 502 for a body that cannot be scanned, saw {} {shown:?}",
            answer.status
        );
        let envelope = answer.json();
        assert!(
            envelope["error"].is_string() && envelope["error_description"].is_string(),
            "{path}: expected the error envelope, saw {envelope}"
        );
    }
    env.stop().await;
    upstream.abort();
}

/// Every spelling of `/_sim` a server could read as the simulator's controls is refused
/// before the upstream: 404 where the first segment folds into `_sim`, 400 where readers
/// disagree on the path (`;` parameters, empty or dot segments).
#[tokio::test]
async fn sim_controls_are_refused_in_every_spelling() {
    let env = common::start(SimOptions::default(), ROUTES).await;
    let auth = bearer();
    let mut not_found = Vec::new();
    for name in [
        "_sim", "_SIM", "_Sim", "%5Fsim", "%5fSIM", "%255Fsim", "_%73im",
    ] {
        for tail in ["", ".", "..", "...", "%2E", "%20", ".%20", "%2e%2E"] {
            for rest in ["/stats", "/stats/reset", ""] {
                not_found.push(format!("/{name}{tail}{rest}"));
            }
        }
    }
    let bad_request: Vec<String> = [
        "/_sim;x/stats",
        "/_sim;/stats",
        "/_sim;jsessionid=1/stats",
        "/_sim%3Bx/stats",
        "/_sim%253Bx/stats",
        "/_sim/stats;x",
        "//_sim/stats",
        "/./_sim/stats",
        "/_sim/./stats",
        "/%2E/_sim/stats",
        "/me;x",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    for (paths, want) in [(&not_found, 404), (&bad_request, 400)] {
        for path in paths {
            for method in [Method::GET, Method::POST] {
                let a = env
                    .send(
                        method.clone(),
                        &env.url(path),
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/json"),
                        ],
                        if method == Method::GET { "" } else { "{}" },
                    )
                    .await;
                assert_eq!(
                    a.status,
                    want,
                    "{method} {path}: expected {want}, saw {} {:?}",
                    a.status,
                    String::from_utf8_lossy(&a.body)
                );
                let envelope = a.json();
                assert!(
                    envelope["error"].is_string() && envelope["error_description"].is_string(),
                    "{method} {path}: expected the error envelope, saw {envelope}"
                );
            }
        }
    }
    let stats = env.sim.stats();
    assert_eq!(
        stats["requests_total"], 0,
        "expected nothing to reach the simulator, saw {stats}"
    );
    env.stop().await;
}

/// Headers a client's `Connection` names stay behind, and headers the upstream's
/// `Connection` names reach neither the client nor the cache.
#[tokio::test]
async fn headers_named_in_connection_stay_on_their_hop() {
    let answer = Arc::new(|_: &str, _: &str| -> Vec<u8> {
        let body = br#"{"meta":{"code":200},"response":{"id":7}}"#;
        raw_answer(
            &format!(
                "Connection: close, X-Hop-One\r\nConnection: x-hop-two, é\r\nX-Hop-One: a\r\n\
                 X-Hop-Two: b\r\nKeep-Alive: timeout=5\r\nX-Kept: 1\r\nContent-Length: {}\r\n",
                body.len()
            ),
            body,
        )
    });
    let (base, heads, upstream) = raw_upstream(answer).await;
    let env = gateway(&base, "").await;
    let auth = bearer();
    let hop_by_hop = [
        "Accept-Language",
        "accept-language, User-Agent",
        "keep-alive, If-None-Match",
        "content-type",
        "accept-language, é",
        "User-Agent,\tAccept-Language ,\u{a0}",
    ];
    for (i, named) in hop_by_hop.iter().enumerate() {
        for (method, path) in [
            (Method::GET, "/me/permissions"),
            (Method::POST, "/12345/inbox/mention/1/2"),
        ] {
            let a = env
                .send(
                    method.clone(),
                    &env.url(path),
                    &[
                        ("authorization", &auth),
                        ("connection", named),
                        ("accept-language", "fr"),
                        ("user-agent", "crm-sync/1.0"),
                        ("if-none-match", "\"v0\""),
                        ("content-type", "application/x-www-form-urlencoded"),
                    ],
                    if method == Method::GET { "" } else { "a=1" },
                )
                .await;
            assert_eq!(a.status, 200, "{method} {path} ({named}): saw {a:?}");
            assert!(
                a.header("x-hop-one").is_empty() && a.header("x-hop-two").is_empty(),
                "{method} {path}: headers the upstream's Connection names reached the client: {:?}",
                a.headers
            );
            assert_eq!(a.header("x-kept"), "1", "{method} {path}: expected x-kept");
            let head = heads.lock().expect("heads").pop().unwrap_or_default();
            let lower = head.to_ascii_lowercase();
            for name in named
                .split(',')
                .map(|n| n.trim().to_ascii_lowercase())
                .filter(|n| n.is_ascii())
            {
                assert!(
                    !lower.contains(&format!("\r\n{name}:")),
                    "case {i}, {method} {path}: `{name}` named in Connection reached the upstream:\n{head}"
                );
            }
        }
    }
    for _ in 0..2 {
        let me = env.get("/me").await;
        assert_eq!(me.status, 200, "expected /me, saw {me:?}");
        assert!(
            me.header("x-hop-one").is_empty()
                && me.header("x-hop-two").is_empty()
                && me.header("keep-alive").is_empty(),
            "a hop-by-hop header reached the client or the cache: {:?}",
            me.headers
        );
    }
    env.stop().await;
    upstream.abort();
}

/// One client holding request bodies up to its share leaves the rest of
/// `max_buffered_bytes` to the others: its own bodies past the share get 503, another
/// client's body is still read.
#[tokio::test(start_paused = true)]
async fn one_client_cannot_hold_every_buffered_byte() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let greedy_key = "greedy-key";
    let clients = format!(
        "{}{}",
        common::client_toml(
            "greedy",
            greedy_key,
            "scopes = [\"read\", \"write\"]\naccounts = [12345]"
        ),
        common::client_toml(
            "other",
            KEY,
            "scopes = [\"read\", \"write\"]\naccounts = [12345]"
        ),
    );
    let env = common::start_custom(
        SimOptions::default(),
        "max_body_bytes = \"1MiB\"\nmax_buffered_bytes = \"2MiB\"\nbody_timeout = \"60s\"\n",
        Some(&base),
        &clients,
        &format!("{ROUTES}\n{}\n", common::BIG_BUDGET),
    )
    .await;
    // Three bodies of 680 KiB each, never finished: 2040 KiB would fit the 2 MiB pool.
    let piece = vec![b'a'; 680 << 10];
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(env.gw.addr)
            .await
            .expect("connect");
        let head = format!(
            "POST /12345/inbox/mention/1/2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {greedy_key}\r\nContent-Type: text/plain\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            piece.len()
        );
        let _ = conn.write_all(head.as_bytes()).await;
        let _ = conn.write_all(&piece).await;
        // On the paused clock this ends once the gateway has read all it will of the body.
        tokio::time::sleep(Duration::from_millis(300)).await;
        held.push(conn);
    }
    let holding = env.gw.gateway.buffered_bytes();
    assert!(
        holding <= 1 << 20,
        "expected one client to hold at most half of the 2 MiB pool, it holds {holding} bytes"
    );
    let body = "b".repeat(600 << 10);
    let other = env
        .send(
            Method::POST,
            &env.url("/12345/inbox/mention/1/2"),
            &[("authorization", &bearer()), ("content-type", "text/plain")],
            &body,
        )
        .await;
    assert_eq!(
        other.status,
        200,
        "expected another client's body read while one holds its share, saw {} {:?}",
        other.status,
        String::from_utf8_lossy(&other.body)
    );
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected only the other client's write upstream"
    );
    let mut refused = 0;
    for mut conn in held {
        let mut answer = Vec::new();
        // Paused: the timeout ends only after whatever the gateway wrote has been read.
        let _ =
            tokio::time::timeout(Duration::from_millis(500), conn.read_to_end(&mut answer)).await;
        let text = String::from_utf8_lossy(&answer);
        if text.starts_with("HTTP/1.1 503") {
            assert!(
                text.contains("\"error\":\"overloaded\"") && text.contains("error_description"),
                "expected the 503 in the error envelope, saw {text}"
            );
            refused += 1;
        }
    }
    assert!(
        refused >= 1,
        "expected the greedy client's bodies past its share refused with 503"
    );
    env.stop().await;
    upstream.abort();
}

/// A JSON body's member names are read unescaped: an escaped `access_token` member is the
/// caller's key (read, checked, removed), and a key hidden in an escaped string is never
/// forwarded.
#[tokio::test]
async fn escaped_key_members_in_json_bodies_are_the_key() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = gateway(&base, "").await;
    let path = env.url("/12345/inbox/mention/1/2");
    let json = "application/json";
    let as_key = [
        format!(r#"{{"access_token":"{KEY}","updates":1}}"#),
        format!(r#"{{"access\u005ftoken":"{KEY}","updates":1}}"#),
        format!(r#"{{"\u0061ccess_token":"{KEY}","updates":1}}"#),
        format!(
            r#"{{"\u0061\u0063\u0063\u0065\u0073\u0073\u005f\u0074\u006f\u006b\u0065\u006e":"{KEY}","updates":1}}"#
        ),
        format!(r#"{{"ACCESS\u005FTOKEN":"{KEY}","updates":1}}"#),
        r#"{"access\u005ftoken":"\u0074est-key","updates":1}"#.to_string(),
        format!(r#"{{"updates":1,"access.token":"{KEY}"}}"#),
    ];
    for body in &as_key {
        for content_type in [
            json,
            "application/json; charset=utf-8",
            "application/vnd.api+json",
        ] {
            let a = env
                .send(Method::POST, &path, &[("content-type", content_type)], body)
                .await;
            assert_eq!(
                a.status, 200,
                "{content_type} {body}: expected the JSON key to authenticate, saw {a:?}"
            );
            let got = taken(&seen);
            assert_eq!(got.len(), 1, "{body}: expected one upstream write");
            let sent: serde_json::Value =
                serde_json::from_slice(&got[0].body).expect("the forwarded body is JSON");
            assert_eq!(
                sent,
                serde_json::json!({"updates": 1}),
                "{body}: expected the key member removed and the rest kept"
            );
        }
    }
    // With a key in the header too: another key in the body is refused, the same one is
    // removed, and the key hidden in any escaped string never goes upstream.
    let auth = bearer();
    let refused = [
        r#"{"access\u005ftoken":"another-key"}"#.to_string(),
        r#"{"note":"\u0074est-key"}"#.to_string(),
        r#"{"nested":{"k":["te\u0073t-key"]}}"#.to_string(),
        r#"{"te\u0073t-key":1}"#.to_string(),
        r#"{"access\u005ftoken":7}"#.to_string(),
        // Two members of one name: a JSON map keeps the last, the caller is judged by both.
        r#"{"access_token":"another-key","access_token":"test-key"}"#.to_string(),
    ];
    for body in &refused {
        let a = env
            .send(
                Method::POST,
                &path,
                &[("authorization", &auth), ("content-type", json)],
                body,
            )
            .await;
        assert_eq!(a.status, 400, "{body}: expected 400, saw {a:?}");
        assert!(
            a.json()["error_description"].is_string(),
            "{body}: expected the error envelope"
        );
    }
    // Without a header, two keys in repeated members are two keys: 400, whichever is last.
    let twice = r#"{"access_token":"another-key","access_token":"test-key"}"#;
    let a = env
        .send(Method::POST, &path, &[("content-type", json)], twice)
        .await;
    assert_eq!(a.status, 400, "{twice}: expected 400, saw {a:?}");
    assert!(
        taken(&seen).is_empty(),
        "expected none of the refused bodies upstream"
    );
    env.stop().await;
    upstream.abort();
}

/// Conditional requests: forwarded on uncached reads (and merged only with the same
/// conditions), answered 304 from the cache on cacheable ones, and never stored or merged
/// as if a 304 were the 200.
// Paused: the pairs sent together are in flight together before the upstream's 300 ms
// pass, however busy the machine.
#[tokio::test(start_paused = true)]
async fn conditional_requests_are_forwarded_or_answered_from_the_cache() {
    let lm = "Tue, 01 Dec 2026 10:00:00 GMT";
    let script: Script = Arc::new(move |got: &Seen| {
        let matches = got
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"v1\"");
        let mut reply = Reply::json(r#"{"meta":{"code":200},"response":{"id":7}}"#);
        reply.headers.push(("etag".into(), "\"v1\"".into()));
        reply.headers.push(("last-modified".into(), lm.into()));
        reply.delay = Duration::from_millis(300);
        if matches {
            reply.status = 304;
            reply.body = Vec::new();
        }
        reply
    });
    let (base, seen, upstream) = scripted_upstream(script).await;
    let env = gateway(&base, "").await;
    let auth = bearer();
    let get = |path: &'static str, cond: Option<(&'static str, &'static str)>| {
        let auth = auth.clone();
        let env = &env;
        async move {
            let mut headers = vec![("authorization", auth.as_str())];
            headers.extend(cond);
            env.send(Method::GET, &env.url(path), &headers, "").await
        }
    };
    let inm = Some(("if-none-match", "\"v1\""));

    // Cacheable: the first caller's condition does not go up; it still gets its 304.
    let first = get("/me", inm).await;
    assert_eq!(
        first.status, 304,
        "expected 304 from the fetched answer, saw {first:?}"
    );
    assert!(first.body.is_empty(), "a 304 has no body");
    let got = taken(&seen);
    assert_eq!(got.len(), 1, "expected one upstream call for /me");
    assert!(
        got[0].headers.get("if-none-match").is_none(),
        "a cacheable read's call must not carry one client's conditions"
    );
    let plain = get("/me", None).await;
    assert_eq!(plain.status, 200, "expected the stored 200, saw {plain:?}");
    assert!(
        plain.header("cache-status").contains("hit") && plain.json()["response"]["id"] == 7,
        "expected the whole answer from the cache, saw {plain:?}"
    );
    for (cond, want) in [
        (("if-none-match", "\"v1\""), 304),
        (("if-none-match", "W/\"v1\""), 304),
        (("if-none-match", "*"), 304),
        (("if-none-match", "\"v0\""), 200),
        (("if-modified-since", lm), 304),
        (("if-modified-since", "Mon, 30 Nov 2026 10:00:00 GMT"), 200),
        (("if-match", "\"v2\""), 412),
        (("if-match", "\"v1\""), 200),
    ] {
        let a = get("/me", Some(cond)).await;
        assert_eq!(a.status, want, "{cond:?} on a hit: saw {a:?}");
        assert!(
            a.header("cache-status").contains("hit"),
            "{cond:?}: expected a hit"
        );
        if want == 304 {
            assert!(
                a.body.is_empty() && a.header("etag") == "\"v1\"",
                "{cond:?}: expected an empty 304 with the ETag, saw {a:?}"
            );
        }
    }
    assert!(
        taken(&seen).is_empty(),
        "expected every conditional hit answered by the cache"
    );

    // Cacheable and merged: a conditional caller and a plain one share one call that
    // carries no condition; each gets its own answer.
    let (a, b) = tokio::join!(get("/me/accounts", inm), get("/me/accounts", None));
    let got = taken(&seen);
    assert_eq!(got.len(), 1, "expected the two reads merged into one call");
    assert!(got[0].headers.get("if-none-match").is_none());
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (304, 200),
        "saw {a:?} and {b:?}"
    );
    assert_eq!(
        b.json()["response"]["id"],
        7,
        "the plain caller gets the whole answer"
    );

    // Uncached: the condition goes up, and only same-condition callers share a call.
    let (a, b) = tokio::join!(get("/me/permissions", inm), get("/me/permissions", None));
    let got = taken(&seen);
    assert_eq!(
        got.len(),
        2,
        "expected a conditional and a plain uncached read to make their own calls"
    );
    assert_eq!(
        got.iter()
            .filter(|g| g
                .headers
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\""))
            .count(),
        1,
        "expected the condition forwarded on exactly the conditional call"
    );
    assert_eq!(
        (a.status.as_u16(), b.status.as_u16()),
        (304, 200),
        "saw {a:?} and {b:?}"
    );
    assert_eq!(
        b.json()["response"]["id"],
        7,
        "the plain caller gets the whole answer"
    );
    env.stop().await;
    upstream.abort();
}
