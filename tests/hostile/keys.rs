//! Keys and method overrides where none belongs, and upstreams that misbehave around the
//! body: each shown end to end against an upstream that records what reached it.
//!
//! Classes: any configured key (the caller's or another client's) in `X-Request-Id`, the
//! query, forwarded headers and form, multipart, JSON or text bodies; two `Authorization`
//! headers; method-override names in every spelling a server folds; an upstream announcing
//! more than the gateway may buffer; an upstream that reads a write and hangs up; gzip
//! bodies under every label that hides them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::common::{self, Env, ACCESS, KEY, ROUTES};
use super::requests::{gzip, scripted_upstream, static_upstream, taken, Reply, Script, Seen};
use super::{raw_request, shown};
use cxgate::sim::SimOptions;

/// Another client's key, as the README's recipe makes them (base64 of random bytes).
const OTHER: &str = "b3RoZXIta2V5LWZvci1hbm90aGVyLWNsaWVudA==";

/// A third client's key, as short as some operators pick them.
const SHORT: &str = "rwkey";

/// The gateway in front of `base` with three clients: `KEY` (read and write), `OTHER` and
/// `SHORT`.
async fn keyed_gateway(base: &str, extra: &str) -> Env {
    let clients = format!(
        "{}{}{}",
        common::client_toml("mine", KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml("theirs", OTHER, "scopes = [\"read\"]"),
        common::client_toml("short", SHORT, "scopes = [\"read\"]"),
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

fn percent_all(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

fn is_fresh_id(id: &str) -> bool {
    id.len() == 24 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A client's `X-Request-Id` holding a key (its own or another's, raw or percent-encoded)
/// is replaced by a fresh id: the key is never echoed, logged (the access log writes the
/// answer's id) or forwarded. A plain id is kept.
#[tokio::test]
async fn a_key_in_x_request_id_is_replaced_never_forwarded() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    for id in [
        KEY.to_string(),
        format!("req:{KEY}"),
        percent_all(KEY),
        format!("req:{OTHER}"),
        format!("req:{}", percent_all(OTHER)),
    ] {
        let answer = env
            .send(
                Method::GET,
                &env.url("/me/permissions"),
                &[("authorization", &auth), ("x-request-id", &id)],
                "",
            )
            .await;
        assert_eq!(answer.status, 200, "{id}: expected 200, saw {answer:?}");
        let echoed = answer.header("x-request-id").to_string();
        assert!(
            is_fresh_id(&echoed),
            "{id}: expected a fresh id in place of the key, saw {echoed:?}"
        );
        let got = taken(&seen);
        let sent: Vec<&str> = got
            .iter()
            .filter_map(|g| g.headers.get("x-request-id")?.to_str().ok())
            .collect();
        assert_eq!(
            sent,
            [echoed.as_str()],
            "{id}: expected the fresh id upstream"
        );
    }
    let answer = env
        .send(
            Method::GET,
            &env.url("/me/permissions"),
            &[("authorization", &auth), ("x-request-id", "job-42:step-7")],
            "",
        )
        .await;
    assert_eq!(
        answer.header("x-request-id"),
        "job-42:step-7",
        "a plain id is kept"
    );
    env.stop().await;
    upstream.abort();
}

/// The check every refusal case of this file shares: `answer` to the case `what` is the
/// 400 error envelope, and nothing reached the upstream logging into `seen`.
fn assert_refused_unsent(what: &str, answer: &common::Answer, seen: &common::Log) {
    assert_eq!(answer.status, 400, "{what}: expected 400, saw {answer:?}");
    assert_eq!(
        answer.json()["error"],
        "bad_request",
        "{what}: expected the error envelope, saw {answer:?}"
    );
    let got = taken(seen);
    assert!(
        got.is_empty(),
        "{what}: expected nothing upstream, saw {} requests",
        got.len()
    );
}

/// One request that must be refused: what it shows, method, target, headers, body.
type Case = (
    &'static str,
    Method,
    String,
    Vec<(&'static str, String)>,
    String,
);

/// Another client's key anywhere in what would be forwarded (path segment, query value,
/// header, form,
/// multipart, JSON string escaped or not, text body; raw or percent-encoded) is 400 and
/// reaches nothing; the same request without it passes.
#[tokio::test]
async fn another_clients_key_is_never_forwarded() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let path = "/me/permissions";
    let escaped = format!("\\u0062{}", &OTHER[1..]);
    let multipart = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\n{OTHER}\r\n--XyZ--\r\n"
    );
    let cases: Vec<Case> = vec![
        (
            "a query value",
            Method::GET,
            format!("{path}?q={OTHER}"),
            vec![],
            String::new(),
        ),
        (
            "a percent-encoded query value",
            Method::GET,
            format!("{path}?q={}", percent_all(OTHER)),
            vec![],
            String::new(),
        ),
        (
            "a query value with `+` for spaces",
            Method::GET,
            format!("{path}?note=see+{OTHER}+now"),
            vec![],
            String::new(),
        ),
        (
            "a short key with `+` for spaces",
            Method::GET,
            format!("{path}?note=see+{SHORT}+now"),
            vec![],
            String::new(),
        ),
        (
            "a query name with `+` for spaces",
            Method::GET,
            format!("{path}?+{OTHER}+=1"),
            vec![],
            String::new(),
        ),
        (
            "twice percent-encoded",
            Method::GET,
            format!("{path}?q={}", percent_all(OTHER).replace('%', "%25")),
            vec![],
            String::new(),
        ),
        (
            "the Accept header",
            Method::GET,
            path.into(),
            vec![("accept", OTHER.to_string())],
            String::new(),
        ),
        (
            "a short key in Accept",
            Method::GET,
            path.into(),
            vec![("accept", SHORT.to_string())],
            String::new(),
        ),
        (
            "a short key in a list",
            Method::GET,
            format!("{path}?ids=1,{SHORT},3"),
            vec![],
            String::new(),
        ),
        (
            "a path segment",
            Method::GET,
            format!("{path}/{SHORT}"),
            vec![],
            String::new(),
        ),
        (
            "a percent-encoded path segment",
            Method::GET,
            format!("/12345/x/{}", percent_all(OTHER)),
            vec![],
            String::new(),
        ),
        (
            "a form field",
            Method::POST,
            path.into(),
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            format!("note={OTHER}"),
        ),
        (
            "a form value with `+` for spaces",
            Method::POST,
            path.into(),
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            format!("note=+{OTHER}+"),
        ),
        (
            "a form name with `+` for spaces",
            Method::POST,
            path.into(),
            vec![("content-type", "application/x-www-form-urlencoded".into())],
            format!("+{OTHER}+=1"),
        ),
        (
            "a multipart field",
            Method::POST,
            path.into(),
            vec![("content-type", "multipart/form-data; boundary=XyZ".into())],
            multipart,
        ),
        (
            "an escaped JSON string",
            Method::POST,
            path.into(),
            vec![("content-type", "application/json".into())],
            format!(r#"{{"a":{{"b":["{escaped}"]}}}}"#),
        ),
        (
            "a text body",
            Method::POST,
            path.into(),
            vec![("content-type", "text/plain".into())],
            format!("my colleague's key is {OTHER}."),
        ),
    ];
    for (what, method, target, headers, body) in cases {
        let mut all = vec![("authorization", auth.as_str())];
        all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        let answer = env.send(method, &env.url(&target), &all, &body).await;
        assert_refused_unsent(what, &answer, &seen);
    }
    let answer = env
        .send(
            Method::POST,
            &env.url(path),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "note=b3RoZXIta2V5",
        )
        .await;
    assert_eq!(answer.status, 200, "a harmless body passes, saw {answer:?}");
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected the harmless write forwarded"
    );
    env.stop().await;
    upstream.abort();
}

/// Bodies the gateway would read otherwise than the upstream may: two `Content-Type`
/// headers, JSON under types that do not say `application/json` (or no type at all), JSON
/// in UTF-16 or UTF-32, multipart parts hidden by a transfer encoding or another charset.
/// Each carries another client's key escaped so that only a decoder finds it: 400, nothing
/// upstream. The same JSON as UTF-8 under a plain type is refused too, and a harmless one
/// passes.
#[tokio::test]
async fn bodies_read_another_way_upstream_are_refused() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let url = env.url("/me/permissions");
    let json = format!(r#"{{"note":"\u0062{}"}}"#, &OTHER[1..]);
    let plain = format!(r#"{{"note":"{OTHER}"}}"#);
    let utf16le: Vec<u8> = plain.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let utf16bom: Vec<u8> = [0xFF, 0xFE].into_iter().chain(utf16le.clone()).collect();
    let utf32: Vec<u8> = plain
        .chars()
        .flat_map(|c| (c as u32).to_le_bytes())
        .collect();
    let part = |head: &str, value: &[u8]| -> Vec<u8> {
        [
            format!("--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n{head}\r\n\r\n")
                .as_bytes(),
            value,
            b"\r\n--XyZ--\r\n",
        ]
        .concat()
    };
    let qp: String = OTHER.bytes().map(|b| format!("={b:02X}")).collect();
    // OTHER in base64.
    let b64 = "YjNSb1pYSXRhMlY1TFdadmNpMWhibTkwYUdWeUxXTnNhV1Z1ZEE9PQ==";
    let mp = "multipart/form-data; boundary=XyZ";
    // What each case is, its headers and its body.
    type Body = (&'static str, Vec<(&'static str, &'static str)>, Vec<u8>);
    let cases: Vec<Body> = vec![
        (
            "text/plain then application/json",
            vec![
                ("content-type", "text/plain"),
                ("content-type", "application/json"),
            ],
            json.clone().into(),
        ),
        (
            "text/json",
            vec![("content-type", "text/json")],
            json.clone().into(),
        ),
        (
            "application/x-json",
            vec![("content-type", "application/x-json")],
            json.clone().into(),
        ),
        (
            "text/javascript",
            vec![("content-type", "text/javascript")],
            json.clone().into(),
        ),
        (
            "a list of types",
            vec![("content-type", "text/plain, application/json")],
            json.clone().into(),
        ),
        (
            "text/plain",
            vec![("content-type", "text/plain")],
            json.clone().into(),
        ),
        ("no type", vec![], json.clone().into()),
        (
            "UTF-16LE JSON",
            vec![("content-type", "application/json")],
            utf16le,
        ),
        (
            "UTF-16 JSON with a BOM",
            vec![("content-type", "application/json; charset=utf-16")],
            utf16bom,
        ),
        (
            "UTF-32LE JSON",
            vec![("content-type", "application/json")],
            utf32,
        ),
        (
            "a quoted-printable part",
            vec![("content-type", mp)],
            part("Content-Transfer-Encoding: quoted-printable", qp.as_bytes()),
        ),
        (
            "a base64 part",
            vec![("content-type", mp)],
            part("Content-Transfer-Encoding: base64", b64.as_bytes()),
        ),
        (
            "a UTF-16LE part",
            vec![("content-type", mp)],
            part(
                "Content-Type: text/plain; charset=utf-16le",
                &OTHER
                    .encode_utf16()
                    .flat_map(u16::to_le_bytes)
                    .collect::<Vec<u8>>(),
            ),
        ),
    ];
    for (what, headers, body) in cases {
        let mut all = vec![("authorization", auth.as_str())];
        all.extend(headers);
        let answer = env.send_bytes(Method::POST, &url, &all, body.into()).await;
        assert_refused_unsent(what, &answer, &seen);
    }
    let all = [
        ("authorization", auth.as_str()),
        ("content-type", "text/json"),
    ];
    let answer = env
        .send(Method::POST, &url, &all, r#"{"note":"hello"}"#)
        .await;
    assert_eq!(
        answer.status, 200,
        "expected a harmless body passed, saw {answer:?}"
    );
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected the harmless write forwarded"
    );
    env.stop().await;
    upstream.abort();
}

/// A fourth client's key with `/` in it, as `head -c 24 /dev/urandom | base64` makes them:
/// PHP's `json_encode` writes each `/` as `\/`.
const SLASHED: &str = "Zm9vYmFy/cXV4+YmF6/qwertyUIOP1234";

/// `text` percent-encoded as a form or query value (every byte but `A-Z a-z 0-9 - . _ ~`).
fn quoted(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `{"note": value}` as PHP's `json_encode` writes it: `/` as `\/`.
fn php_json(value: &str) -> String {
    serde_json::json!({ "note": value })
        .to_string()
        .replace('/', "\\/")
}

/// Each byte of `text` as a JSON `\u00XX` escape.
fn u_escaped(text: &str) -> String {
    text.bytes().map(|b| format!("\\u{b:04x}")).collect()
}

/// A key inside JSON that the upstream reads out of a form field (`updates`), a multipart
/// part, a query value (`facetdefinitions`), a header or a JSON string, with one layer of
/// JSON escaping (`\/`, `\u00XX`) under the percent-encoding (or over it): 400, nothing
/// upstream. JSON under a form field with escapes and no key passes.
#[tokio::test]
async fn keys_in_json_escapes_inside_forms_parts_queries_and_strings_are_refused() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let clients = format!(
        "{}{}{}",
        common::client_toml("mine", KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml("theirs", OTHER, "scopes = [\"read\"]"),
        common::client_toml("slashed", SLASHED, "scopes = [\"read\"]"),
    );
    let env = common::start_custom(
        SimOptions::default(),
        "",
        Some(&base),
        &clients,
        &format!("{ROUTES}\n{}\n", common::BIG_BUDGET),
    )
    .await;
    let auth = format!("Bearer {KEY}");
    let write = "/12345/inbox/mention/123451/1";
    let form = "application/x-www-form-urlencoded";
    let part = |head: &str, value: &str| {
        format!(
            "--XyZ\r\nContent-Disposition: form-data; name=\"updates\"\r\n{head}\r\n{value}\r\n\
             --XyZ--\r\n"
        )
    };
    let mp = "multipart/form-data; boundary=XyZ";
    let facets = |definitions: &str| {
        format!(
            "/12345/insights/facets?topic_ids=123451&facetdefinitions={}",
            quoted(definitions)
        )
    };
    let nested = serde_json::json!({ "updates": format!(r#"{{"n":"{}"}}"#, u_escaped(SLASHED)) })
        .to_string();
    // What each case is, its method and target, its content type and body.
    type Escaped = (&'static str, Method, String, Option<&'static str>, String);
    let cases: Vec<Escaped> = vec![
        (
            "a form field's JSON with `/` as `\\/`",
            Method::POST,
            write.into(),
            Some(form),
            format!("updates={}", quoted(&php_json(SLASHED))),
        ),
        (
            "a form field's JSON in \\u escapes",
            Method::POST,
            write.into(),
            Some(form),
            format!(
                "updates={}",
                quoted(&format!(r#"{{"note":"{}"}}"#, u_escaped(OTHER)))
            ),
        ),
        (
            "the caller's own key in a form field's JSON in \\u escapes",
            Method::POST,
            write.into(),
            Some(form),
            format!(
                "updates={}",
                quoted(&format!(r#"{{"note":"{}"}}"#, u_escaped(KEY)))
            ),
        ),
        (
            "a form field's JSON percent-encoded twice",
            Method::POST,
            write.into(),
            Some(form),
            format!("updates={}", quoted(&quoted(&php_json(SLASHED)))),
        ),
        (
            "a multipart part's JSON with `/` as `\\/`",
            Method::POST,
            write.into(),
            Some(mp),
            part("", &php_json(SLASHED)),
        ),
        (
            "a multipart JSON part in \\u escapes",
            Method::POST,
            write.into(),
            Some(mp),
            part(
                "Content-Type: application/json\r\n",
                &format!(r#"{{"note":"{}"}}"#, u_escaped(OTHER)),
            ),
        ),
        (
            "a part's JSON holding a percent-encoded `/` as \\u0025",
            Method::POST,
            write.into(),
            Some(mp),
            part(
                "",
                &format!(r#"{{"note":"{}"}}"#, SLASHED.replace('/', "\\u00252F")),
            ),
        ),
        (
            "a query value's JSON in \\u escapes",
            Method::GET,
            facets(&format!(r#"[{{"name":"{}"}}]"#, u_escaped(OTHER))),
            None,
            String::new(),
        ),
        (
            "a query value's JSON with `/` as `\\/`",
            Method::GET,
            format!("/me/permissions?updates={}", quoted(&php_json(SLASHED))),
            None,
            String::new(),
        ),
        (
            "JSON in a JSON string, the inner one in \\u escapes",
            Method::POST,
            write.into(),
            Some("application/json"),
            nested,
        ),
    ];
    for (what, method, target, content_type, body) in cases {
        let mut all = vec![("authorization", auth.as_str())];
        all.extend(content_type.map(|t| ("content-type", t)));
        let answer = env.send(method, &env.url(&target), &all, &body).await;
        assert_refused_unsent(what, &answer, &seen);
    }
    let escaped_header = SLASHED.replace('/', "\\/");
    let answer = env
        .send(
            Method::GET,
            &env.url("/me/permissions"),
            &[("authorization", &auth), ("accept", &escaped_header)],
            "",
        )
        .await;
    assert_refused_unsent("an Accept header with `/` as `\\/`", &answer, &seen);
    let harmless = format!(
        "updates={}",
        quoted(r#"{"note":"see https:\/\/example.com\/a \u00e9\ud83d\ude00 \"Zm9vYmFy\" done\n"}"#)
    );
    let answer = env
        .send(
            Method::POST,
            &env.url(write),
            &[("authorization", &auth), ("content-type", form)],
            &harmless,
        )
        .await;
    assert_eq!(
        answer.status, 200,
        "expected escaped JSON without a key passed, saw {answer:?}"
    );
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected the harmless write forwarded"
    );
    env.stop().await;
    upstream.abort();
}

/// Two `Authorization` headers, even with one key, are 400; so are a header and an
/// `access_token` with different keys.
#[tokio::test]
async fn two_authorizations_are_refused() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let url = env.url("/me/permissions");
    let mine = format!("Bearer {KEY}");
    let theirs = format!("Bearer {OTHER}");
    for (what, headers, target) in [
        (
            "two keys",
            vec![
                ("authorization", mine.as_str()),
                ("authorization", theirs.as_str()),
            ],
            url.clone(),
        ),
        (
            "one key twice",
            vec![
                ("authorization", mine.as_str()),
                ("authorization", mine.as_str()),
            ],
            url.clone(),
        ),
        (
            "theirs first",
            vec![
                ("authorization", theirs.as_str()),
                ("authorization", mine.as_str()),
            ],
            url.clone(),
        ),
        (
            "header and query",
            vec![("authorization", mine.as_str())],
            format!("{url}?access_token={}", OTHER.replace('=', "%3D")),
        ),
    ] {
        let answer = env.send(Method::GET, &target, &headers, "").await;
        assert_refused_unsent(what, &answer, &seen);
    }
    env.stop().await;
    upstream.abort();
}

/// Method-override names in every spelling PHP folds (arrays, NUL, `.` and space), any
/// case, percent-encoded once or twice, with underscores for hyphens: 400, nothing sent.
#[tokio::test]
async fn folded_method_override_names_get_400() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    for target in [
        "/me/permissions?_method[]=DELETE",
        "/me/permissions?_method[x]=DELETE",
        "/me/permissions?_method%00=DELETE",
        "/me/permissions?_method%00x=DELETE",
        "/me/permissions?%255Fmethod=DELETE",
        "/me/permissions?%5Fmethod=DELETE",
        "/me/permissions?+_method=DELETE",
        "/me/permissions?x_http_method_override=DELETE",
        "/me/permissions?X_HTTP_METHOD_OVERRIDE=DELETE",
        "/me/permissions?x.http.method.override=DELETE",
        "/me/permissions?x_method_override=PUT",
        "/me/permissions?x-http-method=PUT",
    ] {
        let answer = common::raw_exchange(env.gw.addr, &raw_request("GET", target, "")).await;
        assert_eq!(
            answer.status(),
            Some(400),
            "{target}: saw {:?}",
            shown(&answer.bytes)
        );
    }
    assert!(taken(&seen).is_empty(), "expected no override forwarded");
    let fine = common::raw_exchange(
        env.gw.addr,
        &raw_request("GET", "/me/permissions?my_method=x&method=y", ""),
    )
    .await;
    assert_eq!(
        fine.status(),
        Some(200),
        "other names pass: {:?}",
        shown(&fine.bytes)
    );
    env.stop().await;
    upstream.abort();
}

/// An upstream on 127.0.0.1:0 speaking raw HTTP/1.1: it reads each request's head and
/// `Content-Length` body, counts it, writes `answer` (nothing when empty), keeps the
/// connection open for `hold`, then closes it.
async fn raw_upstream(
    answer: &'static [u8],
    hold: Duration,
) -> (String, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the raw upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                    match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                seen.fetch_add(1, Ordering::SeqCst);
                if !answer.is_empty() {
                    let _ = stream.write_all(answer).await;
                }
                tokio::time::sleep(hold).await;
            });
        }
    });
    (base, count, task)
}

/// An upstream status past 599 (hyper reads any three digits) is no answer: 502 in the
/// envelope, as nginx answers an invalid status line. An upstream 429 becomes the
/// gateway's 429, whose `Cache-Status` names it as any forwarded status is named.
#[tokio::test]
async fn odd_statuses_and_upstream_429s_are_answered_for_what_they_are() {
    let (base, count, upstream) = raw_upstream(
        b"HTTP/1.1 999 Odd\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        Duration::ZERO,
    )
    .await;
    let env = keyed_gateway(&base, "").await;
    let answer = env.get("/me/permissions").await;
    assert_eq!(answer.status, 502, "expected 999 refused, saw {answer:?}");
    assert_eq!(
        answer.json()["error"],
        "upstream_unreachable",
        "expected the envelope"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "expected one upstream call"
    );
    env.stop().await;
    upstream.abort();

    let (base, _, upstream) = raw_upstream(
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 30\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        Duration::ZERO,
    )
    .await;
    let env = keyed_gateway(&base, "").await;
    let answer = env.get("/me/permissions").await;
    assert_eq!(
        answer.status, 429,
        "expected the upstream's 429, saw {answer:?}"
    );
    let status = answer.header("cache-status");
    assert!(
        status.contains("; fwd-status=429"),
        "expected Cache-Status to name the upstream's 429, saw {status:?}"
    );
    env.stop().await;
    upstream.abort();
}

/// An upstream announcing more than `max_buffered_bytes` is refused with 503 `overloaded`
/// by its `Content-Length`, before a byte of it is read; one announcing more than the
/// answer bound (64 MiB) but less than the pool, with 502 at once.
#[tokio::test]
async fn an_announced_answer_too_large_is_refused_before_reading() {
    for (length, status, kind) in [
        (300u64 << 20, 503, "overloaded"),
        (100u64 << 20, 502, "upstream_unreachable"),
    ] {
        let head: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{\"a\":"
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let (base, count, upstream) = raw_upstream(head, Duration::from_secs(10)).await;
        let env = keyed_gateway(&base, "").await;
        let started = Instant::now();
        let answer = env.get("/me/permissions").await;
        let took = started.elapsed();
        assert_eq!(
            answer.status, status,
            "{length} B: expected {status}, saw {answer:?}"
        );
        assert_eq!(answer.json()["error"], kind, "{length} B: expected {kind}");
        assert!(
            took < Duration::from_secs(5),
            "{length} B: expected a refusal without waiting for the body, took {took:?}"
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "expected one upstream call"
        );
        env.stop().await;
        upstream.abort();
    }
}

/// An upstream that reads a write and hangs up without answering: 502 saying the write
/// may have been applied, unlike a read on the same upstream ("connection failed") and an
/// upstream nobody listens on ("connect failed").
#[tokio::test]
async fn a_write_read_then_dropped_says_it_may_have_been_applied() {
    let (base, count, upstream) = raw_upstream(b"", Duration::ZERO).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let answer = env
        .send(
            Method::POST,
            &env.url("/me/permissions"),
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "note=hello",
        )
        .await;
    let description = answer.json()["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(answer.status, 502, "expected 502, saw {answer:?}");
    assert!(
        description.contains("may have been applied upstream"),
        "expected the write called possibly applied, saw {description:?}"
    );
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "expected the write sent once, not retried"
    );
    let read = env.get("/me/permissions").await;
    let text = read.json()["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(read.status, 502, "expected 502 for the read, saw {read:?}");
    assert!(
        text.contains("connection failed") && !text.contains("may have been applied"),
        "expected a plain connection failure for a read, saw {text:?}"
    );
    env.stop().await;
    upstream.abort();
    let port = common::free_port();
    let env = keyed_gateway(&format!("http://127.0.0.1:{port}"), "").await;
    let answer = env.post_form("/me/permissions", "note=hello").await;
    let text = answer.json()["error_description"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        answer.status, 502,
        "expected 502 with no upstream, saw {answer:?}"
    );
    assert!(
        text.contains("connect failed") && !text.contains("may have been applied"),
        "expected a connect failure, saw {text:?}"
    );
    env.stop().await;
}

/// gzip bodies under the labels that hide them: upstream answers with `Content-Encoding:
/// ""`, with none, or typed `application/gzip` are 502 (they cannot be scanned); a gzip
/// request body with `Content-Encoding: ""` is 400. Nothing of them reaches a client.
#[tokio::test]
async fn gzip_under_empty_or_missing_labels_is_refused() {
    let script: Script = Arc::new(|got: &Seen| {
        let body = gzip(br#"{"meta":{"code":200},"response":{"secret":"x"}}"#);
        let headers: Vec<(String, String)> = match got.target.split('?').next().unwrap_or("") {
            "/me/empty" => vec![
                ("content-type".into(), "application/json".into()),
                ("content-encoding".into(), String::new()),
            ],
            "/me/typed" => vec![("content-type".into(), "application/gzip".into())],
            _ => vec![("content-type".into(), "application/json".into())],
        };
        Reply {
            status: 200,
            headers,
            body,
            delay: Duration::ZERO,
        }
    });
    let (base, seen, upstream) = scripted_upstream(script).await;
    let env = keyed_gateway(&base, "").await;
    for path in ["/me/empty", "/me/none", "/me/typed"] {
        let answer = env.get(path).await;
        assert_eq!(answer.status, 502, "{path}: expected 502, saw {answer:?}");
        assert_eq!(answer.json()["error"], "upstream_unreachable", "{path}");
    }
    taken(&seen);
    let auth = format!("Bearer {KEY}");
    let body = gzip(b"note=hello");
    let req = http::Request::builder()
        .method(Method::POST)
        .uri(env.url("/me/permissions"))
        .header("authorization", &auth)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-encoding", "")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    let resp = env.http.request(req).await.expect("gateway answered");
    assert_eq!(
        resp.status(),
        400,
        "expected a gzip request body labelled \"\" refused"
    );
    assert!(taken(&seen).is_empty(), "expected nothing upstream");
    env.stop().await;
    upstream.abort();
}

/// A held token in an encoding redaction cannot replace in place (UTF-16 by BOM or NUL
/// pattern, `\u0025` + hex, percent-encoded JSON escapes, double percent-encoding) makes
/// the answer 502: never passed on, never stored (the next read asks the upstream again).
#[tokio::test]
async fn tokens_in_layered_encodings_refuse_the_answer() {
    let pct: String = ACCESS.bytes().map(|b| format!("%{b:02X}")).collect();
    let utf16 = |text: &str, bom: bool| -> Vec<u8> {
        let mut out = if bom { vec![0xff, 0xfe] } else { Vec::new() };
        out.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
        out
    };
    let plain = format!(r#"{{"meta":{{"code":200}},"response":{{"t":"{ACCESS}"}}}}"#);
    let bodies: Vec<(&'static str, Vec<u8>)> = vec![
        ("/me/utf16", utf16(&plain, true)),
        ("/me/utf16nobom", utf16(&plain, false)),
        (
            "/me/jsonpct",
            format!(r#"{{"t":"{}"}}"#, pct.replace('%', "\\u0025")).into_bytes(),
        ),
        (
            "/me/pctjson",
            format!(
                r#"{{"t":"{}"}}"#,
                ACCESS
                    .bytes()
                    .map(|b| format!("%5Cu00{b:02X}"))
                    .collect::<String>()
            )
            .into_bytes(),
        ),
        (
            "/me/double",
            format!(r#"{{"t":"{}"}}"#, pct.replace('%', "%25")).into_bytes(),
        ),
    ];
    let table = Arc::new(bodies.clone());
    let script: Script = Arc::new(move |got: &Seen| {
        let path = got.target.split('?').next().unwrap_or("");
        let body = table
            .iter()
            .find(|(p, _)| *p == path)
            .map_or_else(|| b"{}".to_vec(), |(_, b)| b.clone());
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body,
            delay: Duration::ZERO,
        }
    });
    let (base, seen, upstream) = scripted_upstream(script).await;
    let extra = "[[routes]]\nmatch = \"GET /me/{kind}\"\nttl = \"10m\"\n";
    let env = keyed_gateway(&base, extra).await;
    for (path, _) in &bodies {
        for round in 0..2 {
            let answer = env.get(path).await;
            assert_eq!(
                answer.status, 502,
                "{path} #{round}: expected 502, saw {answer:?}"
            );
            let text = String::from_utf8_lossy(&answer.body).replace('\0', "");
            assert!(
                !text.contains(ACCESS),
                "{path}: the token reached the client"
            );
            assert_eq!(
                taken(&seen).len(),
                1,
                "{path} #{round}: expected nothing stored"
            );
        }
    }
    env.stop().await;
    upstream.abort();
}

/// Text the key scans cannot read, whatever its type: a form or plain text declared UTF-16
/// or UTF-32 (or sent so with no charset: its NUL bytes tell), carrying another client's
/// key or the caller's own as the `access_token` field with no other credential. Each is
/// 400 in the envelope with nothing upstream, as multipart parts and JSON in those
/// charsets already were; a form in UTF-8 or Latin-1 still passes.
#[tokio::test]
async fn text_bodies_in_utf16_or_utf32_are_refused_whatever_their_type() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let url = env.url("/me/permissions");
    let utf16 = |text: &str| -> Vec<u8> {
        [0xFF, 0xFE]
            .into_iter()
            .chain(text.encode_utf16().flat_map(u16::to_le_bytes))
            .collect()
    };
    let utf16le =
        |text: &str| -> Vec<u8> { text.encode_utf16().flat_map(u16::to_le_bytes).collect() };
    let utf32 = |text: &str| -> Vec<u8> {
        text.chars()
            .flat_map(|c| (c as u32).to_le_bytes())
            .collect()
    };
    let other = format!("updates={{}}&note={OTHER}");
    let own = format!("updates={{}}&access_token={KEY}");
    let form = "application/x-www-form-urlencoded";
    // What each case is, whether it sends the header key, its type and its body.
    type Body = (&'static str, bool, &'static str, Vec<u8>);
    let cases: Vec<Body> = vec![
        (
            "a UTF-16 form",
            true,
            "application/x-www-form-urlencoded; charset=utf-16",
            utf16(&other),
        ),
        (
            "a UTF-16LE form",
            true,
            "application/x-www-form-urlencoded; charset=UTF-16LE",
            utf16le(&other),
        ),
        (
            "a UTF-32 form",
            true,
            "application/x-www-form-urlencoded; charset=\"utf-32\"",
            utf32(&other),
        ),
        ("a UTF-16 form with no charset", true, form, utf16le(&other)),
        (
            "UTF-16 plain text",
            true,
            "text/plain; charset=utf-16",
            utf16(&other),
        ),
        (
            "UTF-16 plain text with no charset",
            true,
            "text/plain",
            utf16le(&other),
        ),
        (
            "UTF-16 under another type",
            true,
            "application/octet-stream; charset=utf-16",
            utf16(&other),
        ),
        (
            "the caller's key as a UTF-16 form field",
            false,
            "application/x-www-form-urlencoded; charset=utf-16",
            utf16(&own),
        ),
    ];
    for (what, with_auth, content_type, body) in cases {
        let mut headers = vec![("content-type", content_type)];
        if with_auth {
            headers.push(("authorization", auth.as_str()));
        }
        let answer = env
            .send_bytes(Method::POST, &url, &headers, body.into())
            .await;
        assert!(
            answer.status == 400 && answer.json()["error"] == "bad_request",
            "{what}: expected 400 bad_request in the envelope, saw {answer:?}"
        );
        let got = taken(&seen);
        assert!(
            got.is_empty(),
            "{what}: expected nothing upstream, saw {}",
            got.len()
        );
    }
    for content_type in [
        "application/x-www-form-urlencoded; charset=utf-8",
        "application/x-www-form-urlencoded; charset=ISO-8859-1",
    ] {
        let headers = [
            ("content-type", content_type),
            ("authorization", auth.as_str()),
        ];
        let answer = env
            .send(Method::POST, &url, &headers, "updates={}&note=hello")
            .await;
        assert_eq!(
            answer.status, 200,
            "{content_type}: expected a harmless form passed, saw {answer:?}"
        );
        assert_eq!(
            taken(&seen).len(),
            1,
            "{content_type}: expected the write forwarded"
        );
    }
    env.stop().await;
    upstream.abort();
}

/// Bodies that are not text hold a key as UTF-16 or UTF-32 (either byte order, BOM or not, at an
/// even or odd offset behind binary bytes, percent-encoded inside): octet streams, images,
/// PDFs and bodies with no type. The rule has no exception for a type ("a gateway key
/// never travels upstream in any place"), so each is 400 in the envelope with nothing
/// upstream; the same binary body without a key still passes.
#[tokio::test]
async fn binary_bodies_holding_a_key_in_utf16_or_utf32_are_refused() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let url = env.url("/me/permissions");
    let utf16 = |text: &str, little: bool, bom: bool| -> Vec<u8> {
        bom.then_some(0xFEFF_u16)
            .into_iter()
            .chain(text.encode_utf16())
            .flat_map(|u| {
                if little {
                    u.to_le_bytes()
                } else {
                    u.to_be_bytes()
                }
            })
            .collect()
    };
    let utf32 = |text: &str, little: bool, bom: bool| -> Vec<u8> {
        bom.then_some('\u{FEFF}')
            .into_iter()
            .chain(text.chars())
            .flat_map(|c| {
                if little {
                    u32::from(c).to_le_bytes()
                } else {
                    u32::from(c).to_be_bytes()
                }
            })
            .collect()
    };
    let png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".as_slice();
    let behind = |head: &[u8], body: Vec<u8>| -> Vec<u8> { [head, &body, b"\x00\xff"].concat() };
    let encoded = format!("note={}", percent_all(OTHER));
    // What each case is, its type and its body.
    type Body = (&'static str, Option<&'static str>, Vec<u8>);
    let cases: Vec<Body> = vec![
        (
            "UTF-16LE with a BOM, octet-stream",
            Some("application/octet-stream"),
            utf16(OTHER, true, true),
        ),
        (
            "UTF-16BE with a BOM, octet-stream",
            Some("application/octet-stream"),
            utf16(OTHER, false, true),
        ),
        (
            "UTF-16LE, no BOM, image/png",
            Some("image/png"),
            behind(png, utf16(OTHER, true, false)),
        ),
        (
            "UTF-16BE, no BOM, at an odd offset, image/jpeg",
            Some("image/jpeg"),
            behind(b"\xff\xd8\xff", utf16(OTHER, false, false)),
        ),
        (
            "UTF-16LE percent-encoded, application/pdf",
            Some("application/pdf"),
            behind(b"%PDF-1.7\n", utf16(&encoded, true, false)),
        ),
        (
            "the caller's own key in UTF-16BE, no type",
            None,
            utf16(&format!("access_token={KEY}"), false, false),
        ),
        (
            "a short key in UTF-16LE, application/zip",
            Some("application/zip"),
            behind(b"PK\x03\x04", utf16(&format!("k={SHORT}"), true, false)),
        ),
        (
            "UTF-32LE, no BOM, octet-stream",
            Some("application/octet-stream"),
            utf32(&format!("note {OTHER}"), true, false),
        ),
        (
            "the caller's own key in UTF-32BE with a BOM, behind PNG bytes",
            Some("image/png"),
            behind(png, utf32(&format!("note {KEY}"), false, true)),
        ),
    ];
    for (what, content_type, body) in cases {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(content_type.map(|t| ("content-type", t)));
        let answer = env
            .send_bytes(Method::POST, &url, &headers, body.into())
            .await;
        assert_refused_unsent(what, &answer, &seen);
    }
    let harmless = behind(png, utf16("a picture of a cat", true, false));
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "image/png"),
    ];
    let answer = env
        .send_bytes(Method::POST, &url, &headers, harmless.into())
        .await;
    assert_eq!(
        answer.status, 200,
        "expected a binary body without a key passed, saw {answer:?}"
    );
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected the harmless write forwarded"
    );
    env.stop().await;
    upstream.abort();
}

/// `data` in base64: the standard or the URL-safe alphabet, padded or not.
fn base64(data: &[u8], url_safe: bool, padded: bool) -> String {
    let alphabet: &[u8; 64] = if url_safe {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
        if padded {
            out.push_str(&"=".repeat(3 - chunk.len()));
        }
    }
    out
}

/// A client's own key under three (and up to eight) layers of percent-encoding, and a
/// known key in base64 (either alphabet, each of the three byte alignments inside a longer
/// encoded text, padded or not) or hex (either case) in a body, are refused and reach
/// nothing: a reader upstream decodes them back to the key. Another client's key is
/// searched so once that client has called (the gateway then knows it in full). The same
/// encodings of text without a key pass.
#[tokio::test]
async fn keys_deeply_percent_encoded_or_in_base64_or_hex_are_refused() {
    let (base, seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    // The other client calls once: its key is now known in full.
    let theirs = format!("Bearer {OTHER}");
    let proven = env
        .send(
            Method::GET,
            &env.url("/me/permissions"),
            &[("authorization", &theirs)],
            "",
        )
        .await;
    assert_eq!(
        proven.status, 200,
        "expected the other client's read, saw {proven:?}"
    );
    // Its read reached the upstream; from here on nothing may but the harmless write.
    taken(&seen);
    let auth = format!("Bearer {KEY}");
    let url = env.url("/me/permissions");
    let deeper = |text: &str| text.replace('%', "%25");
    let three = deeper(&deeper(&percent_all(KEY)));
    let eight = (0..7).fold(percent_all(KEY), |t, _| deeper(&t));
    for (what, target) in [
        ("three layers in the query", format!("{url}?note={three}")),
        ("eight layers in the query", format!("{url}?note={eight}")),
    ] {
        let answer = env
            .send(Method::GET, &target, &[("authorization", &auth)], "")
            .await;
        assert_refused_unsent(what, &answer, &seen);
    }
    let form = format!("note={three}");
    let answer = env
        .send(
            Method::POST,
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            &form,
        )
        .await;
    assert_refused_unsent("three layers in a form", &answer, &seen);

    let mut bodies: Vec<(String, String)> = Vec::new();
    for key in [KEY, OTHER] {
        for prefix in ["", "a", "ab"] {
            let text = format!("{prefix}{key} and more after it");
            for url_safe in [false, true] {
                for padded in [false, true] {
                    bodies.push((
                        format!(
                            "{key} base64 after {prefix:?}, url-safe {url_safe}, padded {padded}"
                        ),
                        format!("payload={}", base64(text.as_bytes(), url_safe, padded)),
                    ));
                }
            }
        }
        // At the very end of the encoded text, padding and all.
        bodies.push((
            format!("{key} base64 alone"),
            base64(key.as_bytes(), false, true),
        ));
        let hex: String = key.bytes().map(|b| format!("{b:02x}")).collect();
        bodies.push((
            format!("{key} in lower-case hex"),
            format!("blob {hex} end"),
        ));
        bodies.push((format!("{key} in upper-case hex"), hex.to_uppercase()));
    }
    for (what, body) in &bodies {
        let answer = env
            .send(
                Method::POST,
                &url,
                &[("authorization", &auth), ("content-type", "text/plain")],
                body,
            )
            .await;
        assert_refused_unsent(what, &answer, &seen);
    }
    // The same encodings of a text without a key pass.
    let harmless = base64(b"nothing to see here, just a note", false, true);
    let answer = env
        .send(
            Method::POST,
            &url,
            &[("authorization", &auth), ("content-type", "text/plain")],
            &format!("payload={harmless} hex 6e6f7468696e67"),
        )
        .await;
    assert_eq!(
        answer.status, 200,
        "expected a harmless body passed, saw {answer:?}"
    );
    assert_eq!(
        taken(&seen).len(),
        1,
        "expected only the harmless write forwarded"
    );
    env.stop().await;
    upstream.abort();
}

/// A key in a forwarded header is refused whatever the cache holds: a fresh hit used to
/// answer 200 for what its miss (and a stale hit) refused with 400, so the answer told
/// whether the entry was cached. The header scan now runs before the lookup.
#[tokio::test]
async fn a_key_in_a_header_is_refused_on_a_fresh_hit_too() {
    let (base, _seen, upstream) = static_upstream(Reply::ok()).await;
    let env = keyed_gateway(&base, "").await;
    let auth = format!("Bearer {KEY}");
    let url = env.url("/me");
    let filled = env
        .send(Method::GET, &url, &[("authorization", &auth)], "")
        .await;
    assert_eq!(filled.status, 200, "expected the entry filled");
    let hit = env
        .send(Method::GET, &url, &[("authorization", &auth)], "")
        .await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected a fresh hit, saw {:?}",
        hit.header("cache-status")
    );
    for (name, value) in [
        ("accept-language", OTHER),
        ("user-agent", OTHER),
        ("user-agent", KEY),
    ] {
        let refused = env
            .send(
                Method::GET,
                &url,
                &[("authorization", &auth), (name, value)],
                "",
            )
            .await;
        assert_eq!(
            refused.status,
            400,
            "expected a key in {name} refused on a fresh hit, saw {} {:?}",
            refused.status,
            refused.header("cache-status")
        );
    }
    upstream.abort();
}
