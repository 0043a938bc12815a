//! Request-level classes: each table spells one fault many ways and shows it closed end to
//! end, with an upstream that records every request it receives, so "nothing leaked" is
//! read from what the upstream saw, not from what the gateway said.
//!
//! Classes: account ids in any spelling but the canonical one; request headers outside
//! the allowlist; bodies on reads; gateway keys in form and multipart bodies; compressed
//! upstream answers; `Vary` under merging; upstream 401 storms; redaction of every token
//! held; `Cache-Status` of answers too big to store; interim (1xx) upstream answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;

use super::common::{self, Env, ACCESS, KEY, REFRESH, ROUTES};
pub(super) use super::common::{scripted_upstream, static_upstream, taken, Reply, Script, Seen};
use cxgate::sim::SimOptions;

/// What a refused request is: a name, its headers and its body.
type RefusedCase = (&'static str, Vec<(&'static str, String)>, String);

fn targets(got: &[Seen]) -> Vec<String> {
    got.iter()
        .map(|g| format!("{} {}", g.method, g.target))
        .collect()
}

/// The gateway in front of `base` with one client `KEY` (read+write, account 12345 only).
pub(super) async fn gateway(base: &str, extra: &str) -> Env {
    let clients = common::client_toml(
        "limited",
        KEY,
        "scopes = [\"read\", \"write\"]\naccounts = [12345]",
    );
    common::start_custom(
        SimOptions::default(),
        "",
        Some(base),
        &clients,
        &format!("{ROUTES}\n{}\n{extra}", common::BIG_BUDGET),
    )
    .await
}

pub(super) fn bearer() -> String {
    format!("Bearer {KEY}")
}

// ---------------------------------------------------------------------------------------
// Account identity
// ---------------------------------------------------------------------------------------

/// Every other way to write account `id` in the first path segment.
fn account_spellings(id: &str) -> Vec<(String, String)> {
    let fullwidth: String = id
        .chars()
        .map(|c| char::from_u32(0xFF10 + c.to_digit(10).unwrap_or(0)).unwrap_or(c))
        .collect();
    let arabic: String = id
        .chars()
        .map(|c| char::from_u32(0x0660 + c.to_digit(10).unwrap_or(0)).unwrap_or(c))
        .collect();
    let encode = |s: &str| -> String { s.bytes().map(|b| format!("%{b:02X}")).collect() };
    let overlong: String = id
        .bytes()
        .map(|b| format!("%C0%{:02X}", 0x80 | (b & 0x3F)))
        .collect();
    vec![
        ("leading zero".into(), format!("0{id}")),
        ("leading zeros".into(), format!("000{id}")),
        ("plus".into(), format!("+{id}")),
        ("encoded plus".into(), format!("%2B{id}")),
        ("minus".into(), format!("-{id}")),
        ("encoded zero".into(), format!("%30{id}")),
        ("all encoded with a zero".into(), encode(&format!("0{id}"))),
        ("leading space".into(), format!("%20{id}")),
        ("trailing space".into(), format!("{id}%20")),
        ("tab".into(), format!("%09{id}")),
        ("newline".into(), format!("{id}%0A")),
        ("nbsp".into(), format!("%C2%A0{id}")),
        ("zero-width space".into(), format!("%E2%80%8B{id}")),
        ("fullwidth digits".into(), encode(&fullwidth)),
        ("arabic-indic digits".into(), encode(&arabic)),
        ("overlong UTF-8".into(), overlong),
        ("trailing letters".into(), format!("{id}abc")),
        ("decimal".into(), format!("{id}.0")),
        ("exponent".into(), format!("{id}e0")),
        ("hex".into(), format!("0x{id}")),
        ("underscore".into(), format!("_{id}")),
        ("path parameter".into(), format!("{id};x=1")),
        ("huge".into(), format!("{id}99999999999999999999")),
    ]
}

/// Any spelling of an account id other than the canonical one is 400, before
/// authentication (no key needed to see it), routed, unrouted or a write, for an account
/// the client may use and one it may not; nothing reaches the upstream.
#[tokio::test]
async fn account_ids_in_any_other_spelling_get_400_and_reach_nothing() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = gateway(&base, "").await;
    let auth = bearer();
    let own = env.get("/12345/inbox/mentions").await;
    assert_eq!(
        own.status, 200,
        "expected the canonical own account to pass, saw {own:?}"
    );
    let foreign = env.get("/999/inbox/mentions").await;
    assert_eq!(
        foreign.status, 403,
        "expected a foreign account refused, saw {foreign:?}"
    );
    taken(&seen);

    let mut tried = 0;
    for id in ["12345", "999"] {
        for (what, spelled) in account_spellings(id) {
            let cases = [
                (Method::GET, format!("/{spelled}/inbox/mentions"), true),
                (Method::GET, format!("/{spelled}/settings/topics"), true),
                (Method::POST, format!("/{spelled}/inbox/mention/1/2"), true),
                (Method::DELETE, format!("/{spelled}/inbox/contact/9"), true),
                (Method::GET, format!("/{spelled}/inbox/mentions"), false),
            ];
            for (method, path, keyed) in cases {
                tried += 1;
                let headers: Vec<(&str, &str)> = if keyed {
                    vec![("authorization", &auth)]
                } else {
                    vec![]
                };
                let answer = env
                    .send(method.clone(), &env.url(&path), &headers, "")
                    .await;
                let upstream_saw = targets(&taken(&seen));
                assert_eq!(
                    answer.status,
                    400,
                    "{what}: {method} {path} (key: {keyed}): expected 400, saw {} {:?}; upstream saw {upstream_saw:?}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
                assert_eq!(
                    answer.json()["meta"]["error_type"],
                    "bad_request",
                    "{what}: {path}: expected the bad_request envelope"
                );
                assert!(
                    upstream_saw.is_empty(),
                    "{what}: {method} {path}: expected nothing upstream, saw {upstream_saw:?}"
                );
            }
        }
    }
    assert!(tried > 200, "expected a large table, tried {tried}");
    env.stop().await;
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Request headers
// ---------------------------------------------------------------------------------------

/// Headers the upstream may see from a client (the allowlist), plus what the gateway sets.
const UPSTREAM_MAY_SEE: &[&str] = &[
    "accept",
    "accept-language",
    "content-type",
    "content-length",
    "user-agent",
    "x-request-id",
    "if-match",
    "if-unmodified-since",
    "host",
    "authorization",
];

/// Cookies, method overrides, `X-Forwarded-*` and every other header outside the
/// allowlist stay behind, on reads and writes; the allowlisted ones arrive.
#[tokio::test]
async fn request_headers_outside_the_allowlist_stay_behind() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = gateway(&base, "").await;
    let auth = bearer();
    let hostile: Vec<(String, String)> = [
        "cookie",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-original-method",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-prefix",
        "forwarded",
        "x-real-ip",
        "x-client-ip",
        "true-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-override-url",
        "via",
        "origin",
        "referer",
        "accept-encoding",
        "range",
        "expect-ct",
        "x-api-key",
        "x-access-token",
        "proxy-authorization",
        "x-custom",
    ]
    .iter()
    .map(|n| (n.to_string(), format!("leak-{n}")))
    .collect();
    for (method, path) in [
        (Method::GET, "/me/permissions"),
        (Method::GET, "/me"),
        (Method::POST, "/12345/inbox/mention/1/2"),
        (Method::DELETE, "/12345/inbox/contact/9"),
    ] {
        let mut headers: Vec<(&str, &str)> = vec![
            ("authorization", &auth),
            ("accept", "application/json"),
            ("accept-language", "fr"),
            ("user-agent", "crm-sync/1.0"),
        ];
        headers.extend(hostile.iter().map(|(n, v)| (n.as_str(), v.as_str())));
        let answer = env.send(method.clone(), &env.url(path), &headers, "").await;
        assert_eq!(
            answer.status, 200,
            "{method} {path}: expected 200, saw {answer:?}"
        );
        let got = taken(&seen);
        assert_eq!(
            got.len(),
            1,
            "{method} {path}: expected one upstream request, saw {}",
            got.len()
        );
        let names: Vec<&str> = got[0].headers.keys().map(|n| n.as_str()).collect();
        let stray: Vec<&&str> = names
            .iter()
            .filter(|n| !UPSTREAM_MAY_SEE.contains(n))
            .collect();
        assert!(
            stray.is_empty(),
            "{method} {path}: expected only allowlisted headers upstream, saw also {stray:?} (all: {names:?})"
        );
        for (name, value) in [
            ("accept", "application/json"),
            ("accept-language", "fr"),
            ("user-agent", "crm-sync/1.0"),
        ] {
            assert_eq!(
                got[0].headers.get(name).and_then(|v| v.to_str().ok()),
                Some(value),
                "{method} {path}: expected {name} forwarded"
            );
        }
        assert_eq!(
            got[0].headers["authorization"],
            format!("Bearer {ACCESS}").as_str(),
            "{method} {path}: expected the held token upstream"
        );
        let raw = format!("{:?}", got[0].headers);
        assert!(
            !raw.contains("leak-"),
            "{method} {path}: a client header leaked: {raw}"
        );
    }
    env.stop().await;
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Bodies on reads, and gateway keys in bodies
// ---------------------------------------------------------------------------------------

/// A GET or HEAD with a body (by length or chunked, with or without a key inside) is 400
/// and reaches nothing.
#[tokio::test]
async fn get_and_head_with_a_body_get_400() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = gateway(&base, "").await;
    let key_body = format!("access_token={KEY}");
    let cases: Vec<(String, String)> = vec![
        (
            "GET with Content-Length".into(),
            format!(
                "GET /me/permissions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{key_body}",
                key_body.len()
            ),
        ),
        (
            "GET chunked".into(),
            format!(
                "GET /me/permissions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\
                 Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{key_body}\r\n0\r\n\r\n",
                key_body.len()
            ),
        ),
        (
            "GET with the key only in the body".into(),
            format!(
                "GET /me/permissions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{key_body}",
                key_body.len()
            ),
        ),
        (
            "HEAD with a body".into(),
            format!(
                "HEAD /me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\
                 Content-Length: 5\r\n\r\nhello"
            ),
        ),
    ];
    for (what, bytes) in cases {
        let answer = common::raw_exchange(env.gw.addr, bytes.as_bytes()).await;
        assert_eq!(
            answer.status(),
            Some(400),
            "{what}: expected 400, saw {:?}",
            String::from_utf8_lossy(&answer.bytes)
        );
        let got = targets(&taken(&seen));
        assert!(
            got.is_empty(),
            "{what}: expected nothing upstream, saw {got:?}"
        );
    }
    env.stop().await;
    upstream.abort();
}

/// Bodies that carry the gateway key as a field, in every spelling a server could read as
/// `access_token`: the key authenticates, and the upstream never sees it.
fn key_bodies() -> Vec<(&'static str, String, String)> {
    let form = "application/x-www-form-urlencoded".to_string();
    let multipart = "multipart/form-data; boundary=b0undary".to_string();
    let part = |disposition: &str, value: &str| {
        format!("--b0undary\r\nContent-Disposition: form-data; {disposition}\r\n\r\n{value}\r\n")
    };
    let note = part("name=\"updates\"", "{\"status\":\"closed\"}");
    let mut cases = Vec::new();
    for name in [
        "access_token",
        "access%5Ftoken",
        "access%5ftoken",
        "%61ccess_token",
        "access%255Ftoken",
        "ACCESS_TOKEN",
        "Access_Token",
        "access.token",
        "access+token",
        "access%20token",
        "access[token",
        "access_token[]",
        "access_token%5B%5D",
        "+access_token",
    ] {
        cases.push((
            "form field",
            form.clone(),
            format!("updates=%7B%7D&{name}={KEY}&x=1"),
        ));
        cases.push(("form field first", form.clone(), format!("{name}={KEY}")));
    }
    cases.push((
        "form, key percent-encoded",
        form.clone(),
        "a=1&access_token=test%2Dkey".to_string(),
    ));
    cases.push((
        "form, twice",
        form.clone(),
        format!("access_token={KEY}&access_token={KEY}"),
    ));
    cases.push((
        "form, uppercase type",
        "Application/X-WWW-Form-Urlencoded; charset=utf-8".into(),
        format!("access_token={KEY}"),
    ));
    for disposition in [
        "name=\"access_token\"".to_string(),
        "name=access_token".to_string(),
        "NAME=\"access_token\"".to_string(),
        "name=\"access\\_token\"".to_string(),
        "name=\"access%5Ftoken\"".to_string(),
        "name=\"ACCESS_TOKEN\"".to_string(),
        "name=\"access.token\"".to_string(),
        "name*=UTF-8''access%5Ftoken".to_string(),
        "name=\"x\"; name*=utf-8''access_token".to_string(),
    ] {
        let body = format!("{note}{}--b0undary--\r\n", part(&disposition, KEY));
        cases.push(("multipart part", multipart.clone(), body));
        let body = format!("{}{note}--b0undary--\r\n", part(&disposition, KEY));
        cases.push(("multipart first part", multipart.clone(), body));
    }
    cases.push((
        "multipart, quoted boundary",
        "multipart/form-data; boundary=\"b0undary\"".into(),
        format!(
            "{note}{}--b0undary--\r\n",
            part("name=\"access_token\"", KEY)
        ),
    ));
    cases
}

/// A key in a form or multipart body authenticates the write and is removed; a body key
/// that differs from the header's, or one hidden where no field parser looks, is 400.
#[tokio::test]
async fn gateway_keys_in_bodies_are_read_checked_and_removed() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = gateway(&base, "").await;
    let path = "/12345/inbox/mention/1/2";
    for (what, content_type, body) in key_bodies() {
        let answer = env
            .send(
                Method::POST,
                &env.url(path),
                &[("content-type", &content_type)],
                &body,
            )
            .await;
        let got = taken(&seen);
        assert_eq!(
            answer.status, 200,
            "{what} {body:?}: expected the body key to authenticate, saw {answer:?}"
        );
        assert_eq!(
            got.len(),
            1,
            "{what} {body:?}: expected one upstream write, saw {}",
            got.len()
        );
        let sent = String::from_utf8_lossy(&got[0].body);
        assert!(
            !sent.contains(KEY) && !sent.contains("test%2Dkey"),
            "{what}: the gateway key reached the upstream in the body {sent:?}"
        );
        if body.contains("updates") {
            assert!(
                sent.contains("updates"),
                "{what}: expected the other fields kept, saw {sent:?}"
            );
        }
    }
    // The same key in the header and the body is one key; different keys are refused.
    let auth = bearer();
    let form = "application/x-www-form-urlencoded";
    let same = env
        .send(
            Method::POST,
            &env.url(path),
            &[("authorization", &auth), ("content-type", form)],
            &format!("a=1&access_token={KEY}"),
        )
        .await;
    assert_eq!(
        same.status, 200,
        "expected one key in two places to pass, saw {same:?}"
    );
    let sent = taken(&seen);
    assert!(
        !String::from_utf8_lossy(&sent[0].body).contains(KEY),
        "the key reached the upstream"
    );
    let refused: Vec<RefusedCase> = vec![
        (
            "another key in the form",
            vec![
                ("authorization", auth.clone()),
                ("content-type", form.into()),
            ],
            "access_token=other-key-123".into(),
        ),
        (
            // An `access_token` member is the key, like a form field (see the JSON test in
            // wire.rs); anywhere else in a JSON body it is refused.
            "the key in a JSON body outside an access_token member",
            vec![
                ("authorization", auth.clone()),
                ("content-type", "application/json".into()),
            ],
            format!("{{\"note\":\"{KEY}\"}}"),
        ),
        (
            "the key in a text body",
            vec![("authorization", auth.clone())],
            format!("token {KEY}"),
        ),
        (
            "the key under another form name",
            vec![
                ("authorization", auth.clone()),
                ("content-type", form.into()),
            ],
            format!("token={KEY}"),
        ),
        (
            "the key in a form and another in the query",
            vec![("content-type", form.into())],
            format!("access_token={KEY}"),
        ),
        (
            "a gzip request body",
            vec![
                ("authorization", auth.clone()),
                ("content-type", form.into()),
                ("content-encoding", "gzip".into()),
            ],
            "x".into(),
        ),
    ];
    for (i, (what, headers, body)) in refused.into_iter().enumerate() {
        let url = if i == 4 {
            env.url(&format!("{path}?access_token=other-key-123"))
        } else {
            env.url(path)
        };
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let answer = env.send(Method::POST, &url, &headers, &body).await;
        let got = targets(&taken(&seen));
        assert!(
            answer.status == 400 || answer.status == 401,
            "{what}: expected 400 (or 401), saw {answer:?}"
        );
        assert!(
            got.is_empty(),
            "{what}: expected nothing upstream, saw {got:?}"
        );
    }
    // A query key spelled the ways a form field may be is taken out too.
    for name in [
        "access%5Ftoken",
        "ACCESS_TOKEN",
        "access.token",
        "access_token[]",
    ] {
        let answer = env.get(&format!("/me/permissions?{name}={KEY}&x=1")).await;
        assert_eq!(answer.status, 200, "{name}: expected 200, saw {answer:?}");
        let got = targets(&taken(&seen));
        assert!(
            got.len() == 1 && !got[0].contains(KEY),
            "{name}: the key reached the upstream in {got:?}"
        );
    }
    env.stop().await;
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Compressed upstream answers
// ---------------------------------------------------------------------------------------

pub(super) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

pub(super) fn zlib(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).expect("zlib");
    enc.finish().expect("zlib")
}

/// gzip and deflate answers (sent unasked) are decoded before link rewriting and token
/// redaction, for clients and the cache alike; a zip bomb, an unknown coding and a
/// corrupt body are 502, never an unscanned body.
#[tokio::test]
async fn compressed_answers_are_scanned_or_refused() {
    let base_cell: Arc<Mutex<String>> = Arc::default();
    let cell = base_cell.clone();
    let bomb = Arc::new(gzip(&vec![0u8; 65 << 20]));
    let script: Script = Arc::new(move |got: &Seen| {
        let base = cell.lock().expect("base").clone();
        let plain = format!(
            r#"{{"meta":{{"code":200}},"response":{{"t":"{ACCESS}","paging":{{"next_url":"{base}/me/accounts?page_token=2&access_token={ACCESS}"}}}}}}"#
        );
        let (coding, body) = match got.target.split('?').next().unwrap_or("") {
            "/me" | "/me/gzip" => ("gzip", gzip(plain.as_bytes())),
            "/me/accounts" => ("x-gzip", gzip(plain.as_bytes())),
            "/me/deflate" => ("deflate", zlib(plain.as_bytes())),
            "/me/twice" => ("gzip, gzip", gzip(&gzip(plain.as_bytes()))),
            "/me/bomb" => ("gzip", bomb.to_vec()),
            "/me/br" => ("br", plain.clone().into_bytes()),
            _ => ("gzip", b"not gzip at all".to_vec()),
        };
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("content-encoding".into(), coding.into()),
            ],
            body,
            delay: Duration::ZERO,
        }
    });
    let (base, _seen, upstream) = scripted_upstream(script).await;
    *base_cell.lock().expect("base") = base.clone();
    let env = gateway(&base, "").await;
    for path in [
        "/me",
        "/me",
        "/me/accounts",
        "/me/gzip",
        "/me/deflate",
        "/me/twice",
    ] {
        let answer = env.get(path).await;
        let text = String::from_utf8_lossy(&answer.body).into_owned();
        assert_eq!(answer.status, 200, "{path}: expected 200, saw {answer:?}");
        assert_eq!(
            answer.header("content-encoding"),
            "",
            "{path}: expected the coding removed"
        );
        assert!(
            !text.contains(ACCESS),
            "{path}: the held token reached the client: {text}"
        );
        assert!(
            !text.contains(&base) && text.contains(&env.url("/me/accounts?page_token=2")),
            "{path}: expected the upstream link rewritten, saw {text}"
        );
    }
    let hit = env.get("/me").await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected the decoded /me cached, saw {hit:?}"
    );
    for path in ["/me/bomb", "/me/br", "/me/corrupt"] {
        let answer = env.get(path).await;
        assert_eq!(
            answer.status,
            502,
            "{path}: expected 502 for an answer that cannot be scanned, saw {} {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body[..answer.body.len().min(200)])
        );
        assert!(
            !String::from_utf8_lossy(&answer.body).contains(ACCESS),
            "{path}: the held token reached the client"
        );
    }
    env.stop().await;
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Vary under merging
// ---------------------------------------------------------------------------------------

/// Requests in flight together that differ in a header the upstream varies on each get
/// the answer made for their own headers (cached route and uncached alike), while those
/// that agree still share one call.
// Paused: the six requests are in flight together before the upstream's 400 ms pass,
// however busy the machine.
#[tokio::test(start_paused = true)]
async fn merged_requests_get_the_variant_of_their_own_headers() {
    let script: Script = Arc::new(|got: &Seen| {
        let lang = got
            .headers
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        let mut reply = Reply::json(&format!(
            r#"{{"meta":{{"code":200}},"response":{{"lang":"{lang}"}}}}"#
        ));
        reply
            .headers
            .push(("vary".into(), "Accept-Language".into()));
        reply.delay = Duration::from_millis(400);
        reply
    });
    let (base, seen, upstream) = scripted_upstream(script).await;
    let env = Arc::new(gateway(&base, "").await);
    for path in ["/me", "/me/permissions"] {
        let langs = ["en", "fr", "en", "de", "fr", "en"];
        let mut tasks = Vec::new();
        for lang in langs {
            let env = env.clone();
            tasks.push(tokio::spawn(async move {
                let auth = bearer();
                let answer = env
                    .send(
                        Method::GET,
                        &env.url(path),
                        &[("authorization", &auth), ("accept-language", lang)],
                        "",
                    )
                    .await;
                (lang, answer)
            }));
        }
        for task in tasks {
            let (lang, answer) = task.await.expect("request task");
            assert_eq!(
                answer.status, 200,
                "{path} {lang}: expected 200, saw {answer:?}"
            );
            assert_eq!(
                answer.json()["response"]["lang"],
                lang,
                "{path}: a client asking for {lang} got another client's variant: {answer:?}"
            );
        }
        let calls = taken(&seen).len();
        assert!(
            (3..langs.len()).contains(&calls),
            "{path}: expected one upstream call per language (3), saw {calls}"
        );
    }
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Upstream 401 storms and the tokens held
// ---------------------------------------------------------------------------------------

/// While the upstream refuses even a freshly refreshed token, requests (one after
/// another, then many at once) cost one refresh in all, and clients with valid keys are
/// told 503 token_unavailable, never 401.
#[tokio::test]
async fn an_upstream_that_keeps_refusing_costs_one_refresh() {
    let mut sim = SimOptions::default();
    sim.faults.force_401 = Some(cxgate::sim::Force401 { count: 10_000 });
    let env = common::start(sim, ROUTES).await;
    let mut answers = Vec::new();
    for i in 0..8 {
        answers.push(env.get(&format!("/me/permissions?n={i}")).await);
    }
    let env = Arc::new(env);
    let mut tasks = Vec::new();
    for i in 0..16 {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            env.get(&format!("/me/connectedprofiles?n={i}")).await
        }));
    }
    for task in tasks {
        answers.push(task.await.expect("request task"));
    }
    for answer in &answers {
        assert_eq!(
            answer.status, 503,
            "expected 503 while the upstream refuses, saw {answer:?}"
        );
        assert_eq!(
            answer.json()["meta"]["error_type"],
            "token_unavailable",
            "saw {answer:?}"
        );
    }
    let refreshes = env.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
    assert_eq!(
        refreshes, 1,
        "expected one refresh for 24 refused requests, saw {refreshes}"
    );
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every request task has ended"),
    }
}

/// An upstream that echoes a token the gateway held generations ago (access or refresh,
/// raw, percent-encoded or JSON-escaped) still has it redacted.
#[tokio::test]
async fn every_token_held_since_start_is_redacted() {
    let revoke_next = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let revoked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (flag, list) = (revoke_next.clone(), revoked.clone());
    let script: Script = Arc::new(move |got: &Seen| {
        let auth = got
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let mut list = list.lock().expect("revoked");
        if flag.swap(false, std::sync::atomic::Ordering::SeqCst) {
            list.push(auth.clone());
        }
        if list.contains(&auth) {
            let mut reply = Reply::json(r#"{"meta":{"code":401,"error_type":"invalid_token"}}"#);
            reply.status = 401;
            return reply;
        }
        let encoded: String = form_urlencoded::byte_serialize(ACCESS.as_bytes()).collect();
        Reply::json(&format!(
            r#"{{"meta":{{"code":200}},"response":{{"a":"{ACCESS}","r":"{REFRESH}","p":"x?t={encoded}","j":"{}"}}}}"#,
            serde_json::to_string(REFRESH)
                .unwrap_or_default()
                .trim_matches('"')
        ))
    });
    let (base, _seen, upstream) = scripted_upstream(script).await;
    let env = gateway(&base, "").await;
    for round in 0..2 {
        revoke_next.store(true, std::sync::atomic::Ordering::SeqCst);
        let answer = env.get(&format!("/me/permissions?round={round}")).await;
        assert_eq!(
            answer.status, 200,
            "round {round}: expected a refresh and a replay, saw {answer:?}"
        );
    }
    let refreshes = env.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
    assert_eq!(refreshes, 2, "expected two refreshes, saw {refreshes}");
    let answer = env.get("/me/permissions?echo=1").await;
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    assert_eq!(answer.status, 200, "expected 200, saw {answer:?}");
    for secret in [ACCESS, REFRESH] {
        assert!(
            !text.contains(secret),
            "a token held two generations ago reached the client: {text}"
        );
    }
    assert!(
        text.contains("[redacted]"),
        "expected redaction marks in {text}"
    );
    env.stop().await;
    upstream.abort();
}

/// A held token spelled with mixed escapes (every character `%XX` in either hex case, one
/// escaped character, `/` left raw, JSON `\uXXXX`) is redacted in bodies, and a header
/// carrying it in its value, or named after it, is dropped.
#[tokio::test]
async fn a_token_in_any_mix_of_escapes_is_redacted() {
    let every: String = ACCESS.bytes().map(|b| format!("%{b:02X}")).collect();
    let lower = every.to_lowercase();
    let one = format!("%{:02X}{}", ACCESS.as_bytes()[0], &ACCESS[1..]);
    let json = format!("\\u{:04x}{}", ACCESS.as_bytes()[0], &ACCESS[1..]);
    let body = format!(
        r#"{{"meta":{{"code":200}},"response":{{"a":"{every}","b":"{lower}","c":"{one}","d":"{json}"}}}}"#
    );
    let header_name = ACCESS.to_ascii_lowercase();
    let script: Script = Arc::new(move |_| {
        let mut reply = Reply::json(&body);
        reply.headers.push(("x-echo".into(), one.clone()));
        reply.headers.push((header_name.clone(), "1".into()));
        reply
    });
    let (base, _seen, upstream) = scripted_upstream(script).await;
    let env = gateway(&base, "").await;
    let answer = env.get("/me").await;
    assert_eq!(answer.status, 200, "expected 200, saw {answer:?}");
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    let value: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    for field in ["a", "b", "c", "d"] {
        assert_eq!(
            value["response"][field], "[redacted]",
            "field {field} not redacted in {text}"
        );
    }
    assert_eq!(
        answer.header("x-echo"),
        "",
        "an escaped token header passed: {answer:?}"
    );
    assert_eq!(
        answer.header(&ACCESS.to_ascii_lowercase()),
        "",
        "a header named after the token passed: {answer:?}"
    );
    env.stop().await;
    upstream.abort();
}

// ---------------------------------------------------------------------------------------
// Cache-Status of answers too big to store, and interim answers
// ---------------------------------------------------------------------------------------

/// An answer larger than the whole cache is not stored, and `Cache-Status` says so.
#[tokio::test]
async fn answers_too_big_to_store_do_not_claim_stored() {
    let big = format!(
        r#"{{"meta":{{"code":200}},"response":{{"pad":"{}"}}}}"#,
        "x".repeat(8192)
    );
    let script: Script = Arc::new(move |_| Reply::json(&big));
    let (base, seen, upstream) = scripted_upstream(script).await;
    let env = gateway(&base, "[cache]\nmax_bytes = 4096\n").await;
    for round in 0..2 {
        let answer = env.get("/me").await;
        assert_eq!(answer.status, 200, "round {round}: saw {answer:?}");
        let status = answer.header("cache-status").to_string();
        assert!(
            !status.contains("stored") && !status.contains("hit"),
            "round {round}: expected a miss that was not stored, saw Cache-Status {status:?}"
        );
    }
    assert_eq!(
        taken(&seen).len(),
        2,
        "expected both requests to reach the upstream"
    );
    env.stop().await;
    upstream.abort();
}

/// An upstream that answers with an interim status (101) and nothing final gives the
/// client 502, not the interim status as if it were the answer.
#[tokio::test]
async fn an_upstream_interim_answer_is_not_final() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await;
                tokio::time::sleep(Duration::from_secs(3)).await;
            });
        }
    });
    let env = gateway(&base, "").await;
    let answer = env.get("/me/permissions").await;
    assert_eq!(
        answer.status, 502,
        "expected 502 for an interim-only answer, saw {answer:?}"
    );
    env.stop().await;
    task.abort();
}

/// A decoded answer holds its decoded bytes against `max_buffered_bytes`: 3 MiB of zeros
/// sent as a few KiB of gzip pass a 2 MiB pool and get 503, where a small one is served.
#[tokio::test]
async fn decoded_answers_count_against_max_buffered_bytes() {
    let big = Arc::new(gzip(&vec![b'0'; 3 << 20]));
    let script: Script = Arc::new(move |got: &Seen| {
        let body = match got.target.split('?').next().unwrap_or("") {
            "/me/big" => big.to_vec(),
            _ => gzip(br#"{"meta":{"code":200},"response":{"id":7}}"#),
        };
        Reply {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("content-encoding".into(), "gzip".into()),
            ],
            body,
            delay: Duration::ZERO,
        }
    });
    let (base, _seen, upstream) = scripted_upstream(script).await;
    let clients = common::client_toml("limited", KEY, "scopes = [\"read\"]");
    let env = common::start_custom(
        SimOptions::default(),
        "max_body_bytes = \"1MiB\"\nmax_buffered_bytes = \"2MiB\"\n",
        Some(&base),
        &clients,
        &format!("{ROUTES}\n{}\n", common::BIG_BUDGET),
    )
    .await;
    let small = env.get("/me").await;
    assert_eq!(
        small.status, 200,
        "expected a small gzip answer served, saw {small:?}"
    );
    let big = env.get("/me/big").await;
    assert_eq!(
        big.status,
        503,
        "3 MiB decoded past a 2 MiB pool: expected 503 overloaded, saw {} {:?}",
        big.status,
        String::from_utf8_lossy(&big.body[..big.body.len().min(200)])
    );
    assert_eq!(
        env.gw.gateway.buffered_bytes(),
        0,
        "every decoded byte given back"
    );
    env.stop().await;
    upstream.abort();
}
