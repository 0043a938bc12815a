//! The admin listener's HTML status page, loaded in a real browser (Debian's headless
//! `chromium`) while traffic runs, and behind the admin token when one is set.
//!
//! Without `chromium` on PATH the browser test fails, unless `CXGATE_SKIP_CHROMIUM=1` says
//! to skip it (with a loud message); under `CI=true` it always fails. `.ci/run` installs
//! chromium.
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cxgate::sim::SimOptions;
use http::{Method, StatusCode};

/// The browser to drive, or `None` (after saying so) when the test may be skipped.
fn chromium() -> Option<String> {
    let found = Command::new("chromium")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("chromium".to_string());
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let skip = std::env::var("CXGATE_SKIP_CHROMIUM").is_ok_and(|v| v == "1");
    if skip && !ci {
        eprintln!(
            "\n*** SKIPPED: chromium is not installed and CXGATE_SKIP_CHROMIUM=1; the status \
             page was NOT tested in a browser ***\n"
        );
        return None;
    }
    panic!(
        "chromium is not installed: `apt-get install chromium` (as .ci/run does), or set \
         CXGATE_SKIP_CHROMIUM=1 to skip this test outside CI"
    );
}

/// Runs headless chromium with `args` then `url`, in a profile of its own, bounded in time.
async fn browse(browser: &str, profile: &Path, args: &[String], url: &str) -> String {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("chromium finished within 120 s")
        .expect("chromium ran");
    assert!(
        out.status.success(),
        "expected chromium to exit 0, saw {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the card titled `title` on the page: its big value.
fn card<'a>(dom: &'a str, title: &str) -> &'a str {
    let at = dom
        .find(&format!("<div class=\"t\">{title}</div>"))
        .unwrap_or_else(|| panic!("expected a {title:?} card, page:\n{dom}"));
    let rest = &dom[at..];
    let v = rest.find("<div class=\"v\">").expect("card value") + "<div class=\"v\">".len();
    let end = rest[v..].find("</div>").expect("card value end");
    &rest[v..v + end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_traffic_budget_token_and_errors_in_chromium() {
    let Some(browser) = chromium() else { return };
    let clients = format!(
        "{}{}",
        common::client_toml("crm", common::KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml("reports", "reports-key", "limit = 100\nperiod = \"1h\"")
    );
    // A limited simulator reports its window in X-RateLimit-Remaining, as the API does.
    let sim = SimOptions {
        rate_limit: Some(cxgate::sim::RateLimit {
            limit: 5000,
            period: Duration::from_secs(3600),
        }),
        ..SimOptions::default()
    };
    let env = std::sync::Arc::new(common::start_with(sim, &clients, common::ROUTES).await);
    // Traffic while the browser loads: hits on /me, and errors (an unknown key).
    let traffic = {
        let env = env.clone();
        tokio::spawn(async move {
            for i in 0..400u32 {
                let a = env.get("/me").await;
                assert_eq!(a.status, StatusCode::OK, "expected /me to answer 200");
                if i % 50 == 0 {
                    let auth = "Bearer not-a-client-key";
                    env.send(Method::GET, &env.url("/me"), &[("authorization", auth)], "")
                        .await;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let profile = env.dir.join("chromium-profile");
    let url = env.admin_url("/");
    let dom = browse(&browser, &profile, &["--dump-dom".to_string()], &url).await;

    assert!(
        dom.contains("<meta http-equiv=\"refresh\""),
        "expected the page to refresh itself, page:\n{dom}"
    );
    for absent in ["<script", "<link", "<img", "src=", "@import"] {
        assert!(
            !dom.contains(absent),
            "expected no script and no external asset ({absent:?}), page:\n{dom}"
        );
    }
    for secret in [
        common::ACCESS,
        common::REFRESH,
        common::CLIENT_SECRET,
        common::KEY,
    ] {
        assert!(
            !dom.contains(secret),
            "expected no secret on the page, saw {secret:?}"
        );
    }
    let rps: f64 = card(&dom, "Requests/s")
        .parse()
        .expect("a number of requests/s");
    assert!(
        rps > 0.0,
        "expected requests/s above 0 during traffic, saw {rps}"
    );
    let ratio = card(&dom, "Hit ratio");
    assert!(
        ratio.ends_with('%') && ratio != "0.0 %",
        "expected a hit ratio above 0 after repeated /me, saw {ratio:?}"
    );
    let expires = card(&dom, "Token expires");
    assert!(
        expires.starts_with("in "),
        "expected the token's expiry as a countdown, saw {expires:?}"
    );
    assert_eq!(card(&dom, "Upstream pause"), "none", "expected no pause");
    let upstream = card(&dom, "Upstream calls/s");
    assert!(
        upstream.parse::<f64>().is_ok(),
        "expected upstream calls/s as a number, saw {upstream:?}"
    );
    let window = card(&dom, "Upstream window left");
    assert!(
        window.parse::<u64>().is_ok(),
        "expected the upstream's reported remaining calls (the simulator reports them), saw {window:?}"
    );
    for client in ["<td>crm</td>", "<td>reports</td>"] {
        assert!(
            dom.contains(client),
            "expected a budget row for each client ({client}), page:\n{dom}"
        );
    }
    assert!(
        dom.contains("unknown gateway client key"),
        "expected the refused key among the last errors, page:\n{dom}"
    );

    // And a picture of it, as a person sees it.
    let shot = env.dir.join("status.png");
    browse(
        &browser,
        &profile,
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1100".to_string(),
            "--hide-scrollbars".to_string(),
        ],
        &url,
    )
    .await;
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "expected a PNG screenshot of the page, saw {} bytes",
        png.len()
    );
    if let Ok(keep) = std::env::var("CXGATE_STATUS_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }

    traffic.abort();
    let _ = traffic.await;
    let env = std::sync::Arc::try_unwrap(env)
        .unwrap_or_else(|_| panic!("expected the traffic task to have let go of the env"));
    env.stop().await;
}

#[tokio::test]
async fn the_status_page_needs_the_admin_token_when_one_is_set() {
    const VAR: &str = "CXGATE_TEST_STATUS_PAGE_ADMIN_TOKEN";
    std::env::set_var(VAR, "page-admin-token");
    let env = common::start_custom(
        SimOptions::default(),
        &format!("admin_token_env = \"{VAR}\""),
        None,
        &common::client_toml("test", common::KEY, ""),
        common::ROUTES,
    )
    .await;
    let without = env.send(Method::GET, &env.admin_url("/"), &[], "").await;
    assert_eq!(
        without.status,
        StatusCode::UNAUTHORIZED,
        "expected the page refused without the admin token"
    );
    assert!(
        !String::from_utf8_lossy(&without.body).contains("Requests/s"),
        "expected nothing of the page without the token"
    );
    let with = env
        .send(
            Method::GET,
            &env.admin_url("/"),
            &[("authorization", "Bearer page-admin-token")],
            "",
        )
        .await;
    assert_eq!(
        with.status,
        StatusCode::OK,
        "expected the page with the token"
    );
    assert!(
        without.header("www-authenticate").starts_with("Basic "),
        "expected a browser asked for the token as a password, saw {:?}",
        without.header("www-authenticate")
    );
    // What a browser sends once given the token as the password: "admin:page-admin-token".
    let basic = env
        .send(
            Method::GET,
            &env.admin_url("/"),
            &[("authorization", "Basic YWRtaW46cGFnZS1hZG1pbi10b2tlbg==")],
            "",
        )
        .await;
    assert_eq!(
        basic.status,
        StatusCode::OK,
        "expected the page with the token as a Basic password"
    );
    assert!(
        with.header("content-type").starts_with("text/html"),
        "expected HTML, saw {:?}",
        with.header("content-type")
    );
    let page = String::from_utf8_lossy(&with.body);
    assert!(
        page.contains("Requests/s") && !page.contains("page-admin-token"),
        "expected the page, without the admin token in it:\n{page}"
    );
    env.stop().await;
}
