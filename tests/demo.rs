//! `cxgate demo` as a newcomer runs it: it writes the config file it runs from into its
//! temporary directory, so `POST /admin/reload` and SIGHUP work; the demo client's
//! RateLimit headers name its own share; the status page answers at the admin `/`.
mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use common::Proc;

async fn call(
    method: Method,
    url: &str,
    key: Option<&str>,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::builder().method(method).uri(url);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| "no answer within 10 s".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Waits, bounded, until `what` holds for the demo's output.
async fn wait_for_output(proc: &mut Proc, what: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let out = proc.output();
        if out.contains(what) {
            return out;
        }
        if let Some(status) = proc.exited() {
            panic!("expected the demo to keep running, it exited with {status}:\n{out}");
        }
        assert!(
            Instant::now() < deadline,
            "expected {what:?} in the demo's output within {limit:?}, saw:\n{out}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_demo_reloads_its_own_config_file_by_post_and_by_sighup() {
    let dir = common::temp_dir("demo-reload");
    let (port, admin_port) = (common::free_port(), common::free_port());
    let (listen, admin) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{admin_port}"),
    );
    let mut proc = Proc::spawn(
        &["demo", "--listen", &listen, "--admin-listen", &admin],
        &dir,
    );
    let printed = wait_for_output(&mut proc, "Ctrl-C stops both", Duration::from_secs(60)).await;

    // The config file it runs from is named, and it is the embedded one filled in.
    let config = printed
        .lines()
        .find_map(|l| l.trim().strip_prefix("config:"))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("expected the config file named, saw:\n{printed}"))
        .to_string();
    let text = std::fs::read_to_string(&config).expect("the demo's config file is readable");
    assert!(
        text.contains(&format!("listen = \"{listen}\"")) && text.contains("[[routes]]"),
        "expected the demo's listeners and routes in {config}, saw:\n{text}"
    );

    let (status, headers, _) = call(
        Method::GET,
        &format!("http://{listen}/me"),
        Some("demo-key"),
    )
    .await
    .expect("the demo answers /me");
    assert_eq!(status, StatusCode::OK, "expected /me to answer 200");
    let policy = headers
        .get("ratelimit-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(
        policy.starts_with("\"client\""),
        "expected the demo client's RateLimit-Policy to name its own share, saw {policy:?}"
    );

    let (status, _, body) = call(Method::POST, &format!("http://{admin}/admin/reload"), None)
        .await
        .expect("reload answers");
    assert_eq!(
        (status, body.contains("\"reloaded\":true")),
        (StatusCode::OK, true),
        "expected the demo to reload its config file, saw {status} {body}"
    );

    proc.signal("HUP");
    wait_for_output(&mut proc, "SIGHUP: reloaded", Duration::from_secs(10)).await;

    let (status, headers, page) = call(Method::GET, &format!("http://{admin}/"), None)
        .await
        .expect("the status page answers");
    assert!(
        status == StatusCode::OK
            && headers
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/html"))
            && page.contains("Requests/s"),
        "expected the status page at the admin /, saw {status}:\n{page}"
    );

    proc.signal("INT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while proc.exited().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !std::path::Path::new(&config).exists(),
        "expected the demo's temporary directory removed on exit"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
