//! Every contract metric is on the first scrape, before any traffic, with the labelled
//! series of every configured route and client at zero, and a reload's new routes and
//! clients get theirs too: dashboards show zeros rather than "No data", and `rate()`
//! alerts have a baseline from the start.
mod common;

use cxgate::sim::SimOptions;

/// The metric names every scrape must carry.
const CONTRACT: &[&str] = &[
    "cxgate_requests_total",
    "cxgate_request_duration_seconds",
    "cxgate_upstream_requests_total",
    "cxgate_upstream_duration_seconds",
    "cxgate_cache_entries",
    "cxgate_cache_bytes",
    "cxgate_cache_evictions_total",
    "cxgate_coalesced_requests_total",
    "cxgate_budget_wait_seconds",
    "cxgate_budget_rejections_total",
    "cxgate_upstream_ratelimit_remaining",
    "cxgate_upstream_limit_answers_total",
    "cxgate_token_expiry_seconds",
    "cxgate_token_refreshes_total",
    "cxgate_build_info",
];

/// The value of the series of `name` whose labels include every `labels` pair.
fn value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (set, value) = rest.strip_prefix('{')?.rsplit_once("} ")?;
        let pairs: Vec<&str> = set.split("\",").map(|p| p.trim_end_matches('"')).collect();
        let all = labels
            .iter()
            .all(|(k, v)| pairs.contains(&format!("{k}=\"{v}").as_str()));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}

fn expect_zero(scrape: &str, name: &str, labels: &[(&str, &str)]) {
    match value(scrape, name, labels) {
        Some(0.0) => {}
        other => panic!(
            "expected {name}{labels:?} present at 0 on the first scrape, saw {other:?}; scrape:\n{}",
            scrape
                .lines()
                .filter(|l| l.starts_with(name))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

#[tokio::test]
async fn every_contract_metric_and_configured_series_is_on_the_first_scrape() {
    let clients = format!(
        "{}{}",
        common::client_toml("crm", common::KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml("bi", "bi-key", "limit = 10\nperiod = \"1m\"")
    );
    let env = common::start_with(SimOptions::default(), &clients, common::ROUTES).await;
    let scrape = env.metrics().await;
    for name in CONTRACT {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "expected {name} on the first scrape, before any request; it is absent"
        );
    }
    for client in ["crm", "bi"] {
        for cache in ["hit", "stale", "miss", "collapsed"] {
            expect_zero(
                &scrape,
                "cxgate_requests_total",
                &[
                    ("client", client),
                    ("route", "GET /me"),
                    ("method", "GET"),
                    ("status", "200"),
                    ("cache", cache),
                ],
            );
        }
        // A write route is never cached: its answers pass by.
        expect_zero(
            &scrape,
            "cxgate_requests_total",
            &[
                ("client", client),
                (
                    "route",
                    "POST /{account_id}/inbox/contact/{service}/{service_id}",
                ),
                ("method", "POST"),
                ("cache", "bypass"),
            ],
        );
        expect_zero(
            &scrape,
            "cxgate_budget_wait_seconds_count",
            &[("client", client)],
        );
        for budget in ["global", "client", "upstream"] {
            expect_zero(
                &scrape,
                "cxgate_budget_rejections_total",
                &[("client", client), ("budget", budget)],
            );
        }
    }
    for route in ["GET /me", "GET /{account_id}/inbox/mentions", "other"] {
        expect_zero(
            &scrape,
            "cxgate_upstream_requests_total",
            &[("route", route), ("status", "200")],
        );
        expect_zero(
            &scrape,
            "cxgate_upstream_duration_seconds_count",
            &[("route", route)],
        );
        expect_zero(
            &scrape,
            "cxgate_coalesced_requests_total",
            &[("route", route)],
        );
    }
    expect_zero(
        &scrape,
        "cxgate_request_duration_seconds_count",
        &[("route", "GET /me"), ("cache", "hit")],
    );
    for kind in ["429", "rate_limit_reached"] {
        expect_zero(
            &scrape,
            "cxgate_upstream_limit_answers_total",
            &[("kind", kind)],
        );
    }

    // A reload that adds a route and a client gives them their series at once.
    let path = env.dir.join("cxgate.toml");
    let text = std::fs::read_to_string(&path).expect("config");
    let text = format!(
        "{text}\n{}\n[[routes]]\nmatch = \"GET /me/permissions\"\nttl = \"1m\"\n",
        common::client_toml("late", "late-key", "")
    );
    std::fs::write(&path, text).expect("write config");
    let reloaded = env
        .send(http::Method::POST, &env.admin_url("/admin/reload"), &[], "")
        .await;
    assert_eq!(
        reloaded.status,
        http::StatusCode::OK,
        "expected the reload accepted, saw {:?}",
        reloaded.body
    );
    let scrape = env.metrics().await;
    expect_zero(
        &scrape,
        "cxgate_requests_total",
        &[
            ("client", "late"),
            ("route", "GET /me/permissions"),
            ("cache", "miss"),
        ],
    );
    expect_zero(
        &scrape,
        "cxgate_budget_rejections_total",
        &[("client", "late"), ("budget", "global")],
    );
    env.stop().await;
}

#[tokio::test]
async fn anonymous_mode_primes_the_anonymous_client() {
    let env = common::start_with(SimOptions::default(), "", common::ROUTES).await;
    let scrape = env.metrics().await;
    expect_zero(
        &scrape,
        "cxgate_requests_total",
        &[
            ("client", "anonymous"),
            ("route", "GET /me"),
            ("cache", "miss"),
        ],
    );
    expect_zero(
        &scrape,
        "cxgate_budget_wait_seconds_count",
        &[("client", "anonymous")],
    );
    env.stop().await;
}

/// With the Redis backend, the Redis metrics are on the first scrape too: the gauge, and
/// the error counter of every operation at 0 (no error has created a series yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_metrics_are_on_the_first_scrape() {
    let Some(redis) = common::redis_server::RedisServer::start_or_skip("the first-scrape test")
    else {
        return;
    };
    let url_env = format!("CXGATE_TEST_FIRST_SCRAPE_REDIS_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    let budget = format!(
        "[budget]\nlimit = 1000\nperiod = \"1s\"\nbackend = \"redis\"\nredis_url_env = \"{url_env}\"\n\
         key_prefix = \"fs{:08x}\"\n{}",
        fastrand::u32(..),
        common::ROUTES
    );
    let clients = common::client_toml("crm", common::KEY, "scopes = [\"read\"]");
    let env = common::start_with(SimOptions::default(), &clients, &budget).await;
    let scrape = env.metrics().await;
    for name in [
        "cxgate_redis_up",
        "cxgate_redis_errors_total",
        "cxgate_redis_repairs_total",
    ] {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "expected {name} on the first scrape with the redis backend; it is absent"
        );
    }
    for op in ["budget", "cache", "token", "publish", "ping"] {
        expect_zero(&scrape, "cxgate_redis_errors_total", &[("op", op)]);
    }
    for key in ["budget:global", "budget:pause", "token", "tables", "other"] {
        expect_zero(&scrape, "cxgate_redis_repairs_total", &[("key", key)]);
    }
    env.stop().await;
    drop(redis);
}

/// A static token has no expiry: the gauge is there from the first scrape at +Inf (never
/// expires), not absent, so panels and `< 300` alerts see a value.
#[tokio::test]
async fn a_token_without_expiry_reports_infinity_from_the_first_scrape() {
    std::env::set_var("CXGATE_FIRST_SCRAPE_STATIC", "static-token");
    let cfg = cxgate::config::parse(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"http://127.0.0.1:9\"\n\
         [token]\naccess_token_env = \"CXGATE_FIRST_SCRAPE_STATIC\"\n",
    )
    .expect("valid config");
    let gw = cxgate::start(cfg, None, cxgate::Options::default())
        .await
        .expect("start gateway");
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .get(
            format!("http://{}/metrics", gw.admin_addr)
                .parse()
                .expect("uri"),
        )
        .await
        .expect("scrape");
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .expect("body")
        .to_bytes();
    let scrape = String::from_utf8_lossy(&body);
    let line = scrape
        .lines()
        .find(|l| l.starts_with("cxgate_token_expiry_seconds "));
    assert_eq!(
        line,
        Some("cxgate_token_expiry_seconds +Inf"),
        "expected the expiry gauge at +Inf for a token that never expires; scrape:\n{scrape}"
    );
    gw.shutdown();
    gw.stopped().await;
}
