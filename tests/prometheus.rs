//! The dashboard against a real Prometheus: a `prometheus` child on a free loopback port
//! scrapes a gateway under every kind of traffic, then every panel query of
//! `dashboards/cxgate.json` is evaluated through Prometheus's HTTP API. Each must parse,
//! and the panels for traffic, cache, upstream, budget, token and process must show data.
//!
//! Also measures the size of `/metrics` with ten clients and the full production route
//! table, after traffic from every client on every route.
mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::Value;

use cxgate::sim::{Faults, SimOptions};

type Http = Client<HttpConnector, Full<Bytes>>;

/// How long the traffic runs while Prometheus scrapes (once a second).
const TRAFFIC_TICKS: u32 = 90;
const TICK: Duration = Duration::from_millis(100);

/// What Grafana's variables become: `$client`/`$route` are used with `=~`, so "All" is `.*`.
/// Longer names first, so `$__interval_ms` is not read as `$__interval` + "_ms".
const VARIABLES: &[(&str, &str)] = &[
    ("${__rate_interval}", "15s"),
    ("$__rate_interval", "15s"),
    ("${__range}", "1m"),
    ("$__range_ms", "60000"),
    ("$__range_s", "60"),
    ("$__range", "1m"),
    ("${__interval}", "5s"),
    ("$__interval_ms", "5000"),
    ("$__interval", "5s"),
    ("${client}", ".*"),
    ("$client", ".*"),
    ("${route}", ".*"),
    ("$route", ".*"),
];

/// Metrics whose panels may rightly show nothing here: no token refresh happens during the
/// run (the token is valid for an hour), and the cache is far below `max_bytes`, so nothing
/// is evicted. Both series are exported from the start today (a zero), but the traffic of
/// this test does not make them move, so only their query syntax is asserted. The gateway
/// here runs alone, without Redis: it exports no `cxgate_redis_*` series and the shared
/// tier's hit ratio is 0/0 (tests/replicas.rs and tests/first_scrape.rs read those metrics
/// from gateways sharing a real Redis).
const MAY_BE_EMPTY: &[&str] = &[
    "cxgate_token_refreshes_total",
    "cxgate_cache_evictions_total",
    "cxgate_cache_shared_lookups_total",
    "cxgate_redis_",
];

/// Which part of the gateway a panel shows, read from the metrics its queries use. The order
/// matters: process panels join on `cxgate_build_info`, and upstream metrics share words with
/// request metrics.
fn group_of(exprs: &[String]) -> Option<&'static str> {
    let all = exprs.join(" ");
    let groups: [(&str, &[&str]); 7] = [
        ("process", &["process_"]),
        ("token", &["cxgate_token_"]),
        ("budget", &["cxgate_budget_"]),
        ("upstream", &["cxgate_upstream_"]),
        ("redis", &["cxgate_redis_"]),
        ("cache", &["cxgate_cache_", "cxgate_coalesced_"]),
        (
            "traffic",
            &["cxgate_requests_total", "cxgate_request_duration"],
        ),
    ];
    groups
        .iter()
        .find(|(_, needles)| needles.iter().any(|n| all.contains(n)))
        .map(|(group, _)| *group)
}

const GROUPS: [&str; 7] = [
    "traffic", "cache", "upstream", "budget", "token", "process", "redis",
];

/// Whether `prometheus` can run. Missing it is a failure in CI and a loud skip elsewhere.
fn prometheus_present() -> bool {
    let found = Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "prometheus not found on PATH and CI=true: install Debian's `prometheus` package \
             (apt-get install prometheus) so the dashboard is really evaluated"
        );
    }
    // Straight to the stderr handle: the test harness captures eprintln!, and a skip
    // nobody sees is a silent pass.
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\nSKIPPED: prometheus not found (apt-get install prometheus)\n{bar}",
        bar = "=".repeat(60)
    );
    false
}

/// A Prometheus child process and its temporary directory. Dropping it kills the child by
/// its PID, waits for it, and removes the directory (and any other directory handed to it),
/// also when the test fails halfway.
struct Prometheus {
    child: Child,
    dir: PathBuf,
    also_remove: Vec<PathBuf>,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        for dir in &self.also_remove {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Prometheus {
    /// The last lines Prometheus logged, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// One GET without panicking (Prometheus may not listen yet).
async fn http_get(http: &Http, url: &str) -> Result<(StatusCode, Bytes), String> {
    let req = Request::builder()
        .method(Method::GET)
        .uri(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("bad request {url}: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .map_err(|_| format!("no answer from {url} within 10 s"))?
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body of {url}: {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// Starts Prometheus scraping `target`'s `/metrics` every second and waits until it is
/// ready. A port taken between choosing and binding is retried with another port.
async fn start_prometheus(http: &Http, target: std::net::SocketAddr) -> Prometheus {
    let mut last_problem = String::new();
    for _attempt in 0..3 {
        let dir = common::temp_dir("prometheus");
        std::fs::create_dir_all(dir.join("data")).expect("create the Prometheus temp dir");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: cxgate\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).expect("write prometheus.yml");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("create the log");
        let port = common::free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("clone the log handle"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start prometheus: {e}"));
        let mut prom = Prometheus {
            child,
            dir,
            also_remove: Vec::new(),
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = prom.child.try_wait() {
                last_problem = format!(
                    "prometheus exited early ({status}); its log:\n{}",
                    prom.log_tail()
                );
                break;
            }
            let ready = http_get(http, &format!("{}/-/ready", prom.url)).await;
            if ready.is_ok_and(|(status, _)| status == StatusCode::OK) {
                return prom;
            }
            if Instant::now() > deadline {
                panic!(
                    "expected prometheus on {} ready within 15 s, it was not; its log:\n{}",
                    prom.url,
                    prom.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(prom);
    }
    panic!("expected prometheus to start in 3 attempts; last: {last_problem}");
}

/// The answer of one instant query: `Ok(samples)` on `status: success`, each sample
/// (labels, value), or `Err(the error)`.
async fn instant_query(http: &Http, prom: &str, expr: &str) -> Result<Vec<(String, f64)>, String> {
    let q: String = form_urlencoded::byte_serialize(expr.as_bytes()).collect();
    let (status, body) = http_get(http, &format!("{prom}/api/v1/query?query={q}")).await?;
    let json: Value = serde_json::from_slice(&body).map_err(|e| {
        format!(
            "HTTP {status}, not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    })?;
    if json["status"] != "success" {
        return Err(format!(
            "HTTP {status}, status {}: {} {}",
            json["status"], json["errorType"], json["error"]
        ));
    }
    let value = |v: &Value| {
        v[1].as_str()
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    let data = &json["data"];
    Ok(match data["resultType"].as_str() {
        Some("vector") | Some("matrix") => data["result"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| (s["metric"].to_string(), value(&s["value"])))
            .collect(),
        Some("scalar") => vec![("scalar".to_string(), value(&data["result"]))],
        _ => Vec::new(),
    })
}

/// Fills in Grafana's variables; `Err` names any variable left over.
fn substitute(expr: &str) -> Result<String, String> {
    let mut out = expr.to_string();
    for (var, value) in VARIABLES {
        out = out.replace(var, value);
    }
    if out.contains('$') {
        return Err(format!("unknown template variable left in {out:?}"));
    }
    Ok(out)
}

/// One data panel of the dashboard: title, row, and its queries (refId, expr).
struct Panel {
    title: String,
    row: String,
    targets: Vec<(String, String)>,
}

fn dashboard_panels() -> Vec<Panel> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards/cxgate.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let dash: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    fn walk(panels: &Value, row: &mut String, out: &mut Vec<Panel>) {
        for p in panels.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("<untitled>").to_string();
            if p["type"] == "row" {
                *row = title;
                // Panels of a collapsed row sit inside it.
                walk(&p["panels"], &mut row.clone(), out);
                continue;
            }
            let targets = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| {
                    (
                        t["refId"].as_str().unwrap_or("?").to_string(),
                        t["expr"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            out.push(Panel {
                title,
                row: row.clone(),
                targets,
            });
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut String::new(), &mut out);
    out
}

/// What one request of the traffic saw.
struct Seen {
    who: &'static str,
    status: u16,
    cache_status: String,
}

async fn get_seen(env: &common::Env, who: &'static str, key: &str, path: &str) -> Seen {
    let a = env.get_as(key, path).await;
    Seen {
        who,
        status: a.status.as_u16(),
        cache_status: a.header("cache-status").to_string(),
    }
}

/// Every kind of traffic at once, for `TRAFFIC_TICKS` ticks: hits, misses, merged cold
/// reads, bypassed reads, invalidating writes, and a client over its own budget (so some of
/// its requests wait and some get 429). Returns what the clients saw.
async fn run_traffic(env: &Arc<common::Env>) -> Vec<Seen> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut every = tokio::time::interval(TICK);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0..TRAFFIC_TICKS {
        every.tick().await;
        // Hits after the first tick; /me/permissions matches no test route: bypass, "other".
        for path in [
            "/me",
            "/me/accounts",
            "/12345/inbox/mentions",
            "/me/permissions",
        ] {
            let env = env.clone();
            tasks.spawn(async move { vec![get_seen(&env, "test", common::KEY, path).await] });
        }
        // Four identical cold reads at once; the simulator holds /34567/ for 100 ms, so one
        // is a miss and the others are answered by its upstream call (collapsed).
        for _ in 0..4 {
            let env = env.clone();
            let path = format!("/34567/inbox/contact/twitter/burst{tick}");
            tasks.spawn(async move { vec![get_seen(&env, "burst", common::KEY, &path).await] });
        }
        // A write that invalidates the contact, then a read of it (a miss again).
        if tick % 5 == 0 {
            let env = env.clone();
            tasks.spawn(async move {
                let path = "/12345/inbox/contact/twitter/1";
                let w = env
                    .post_form(path, "updates=%7B%22email%22%3A%22ops%40example.com%22%7D")
                    .await;
                let write = Seen {
                    who: "write",
                    status: w.status.as_u16(),
                    cache_status: w.header("cache-status").to_string(),
                };
                vec![write, get_seen(&env, "test", common::KEY, path).await]
            });
        }
        // The tight client: a distinct cold read every tick (10/s) against 4/s of its own.
        let env = env.clone();
        let path = format!("/12345/inbox/contact/tight/{tick}");
        tasks.spawn(async move { vec![get_seen(&env, "tight", "tight-key", &path).await] });
    }
    let mut seen = Vec::new();
    while let Some(done) = tasks.join_next().await {
        seen.extend(done.expect("a traffic task panicked"));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_return_data_from_a_real_prometheus() {
    if !prometheus_present() {
        return;
    }
    let started = Instant::now();
    // The simulator reports X-RateLimit-Remaining (a limit the run never reaches) and holds
    // the /34567/ reads long enough for identical requests to merge. The token file written
    // by the harness expires in an hour (the default token_ttl), so the expiry is known.
    let sim = SimOptions {
        rate_limit: Some("100000/1h".parse().expect("valid simulator rate limit")),
        faults: Faults {
            latency_ms: 100,
            path_prefix: Some("/34567/".into()),
            ..Faults::default()
        },
        ..SimOptions::default()
    };
    let clients = format!(
        "{}{}",
        common::client_toml("test", common::KEY, "scopes = [\"read\", \"write\"]"),
        common::client_toml(
            "tight",
            "tight-key",
            "limit = 4\nperiod = \"1s\"\nburst = 2\nmax_wait = \"250ms\""
        )
    );
    let extra = format!(
        "[budget]\nlimit = 1000000\nperiod = \"1h\"\nburst = 1000\n{}",
        common::ROUTES
    );
    let env = Arc::new(common::start_with(sim, &clients, &extra).await);

    let mut prom = start_prometheus(&env.http, env.gw.admin_addr).await;
    prom.also_remove.push(env.dir.clone());

    let seen = run_traffic(&env).await;
    let count = |f: &dyn Fn(&Seen) -> bool| seen.iter().filter(|s| f(s)).count();
    let hits = count(&|s| s.cache_status.starts_with("cxgate; hit"));
    let collapsed = count(&|s| s.cache_status.ends_with("collapsed"));
    let rejected = count(&|s| s.who == "tight" && s.status == 429);
    let tight_ok = count(&|s| s.who == "tight" && s.status == 200);
    let writes_ok = count(&|s| s.who == "write" && s.status == 200);
    let unexpected: Vec<String> = seen
        .iter()
        .filter(|s| !(s.status == 200 || (s.who == "tight" && s.status == 429)))
        .map(|s| format!("{} {} {:?}", s.who, s.status, s.cache_status))
        .collect();
    println!(
        "traffic: {} requests, {hits} hits, {collapsed} collapsed, {writes_ok} writes, \
         tight client {tight_ok} admitted / {rejected} rejected",
        seen.len()
    );
    assert!(
        unexpected.is_empty(),
        "expected only 200s (and 429s for the tight client), saw {unexpected:?}"
    );
    assert!(hits > 0, "expected cache hits in the traffic, saw none");
    assert!(
        collapsed > 0,
        "expected merged (collapsed) reads in the traffic, saw none"
    );
    assert!(
        rejected > 0 && tight_ok > 0,
        "expected the tight client both admitted and refused, saw {tight_ok} admitted, {rejected} 429s"
    );
    assert!(writes_ok > 0, "expected successful writes, saw none");

    // At least one scrape after the last request.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let up = instant_query(&env.http, &prom.url, "up{job=\"cxgate\"}").await;
    assert!(
        matches!(&up, Ok(s) if s.len() == 1 && s[0].1 == 1.0),
        "expected the gateway target up (up == 1), saw {up:?}; prometheus log:\n{}",
        prom.log_tail()
    );

    // The traffic really produced what the panels are about (a zero rate alone would not
    // show that): budget rejections and waits, merges, a reported upstream remaining, a
    // known token expiry.
    for (expr, what) in [
        (
            r#"sum(cxgate_budget_rejections_total{client="tight", budget="client"}) > 0"#,
            "client-budget rejections of the tight client",
        ),
        (
            r#"sum(cxgate_budget_wait_seconds_sum{client="tight"}) > 0"#,
            "budget waits of the tight client",
        ),
        (
            "sum(cxgate_coalesced_requests_total) > 0",
            "merged requests",
        ),
        (
            "cxgate_upstream_ratelimit_remaining >= 0",
            "an upstream-reported remaining count (not -1)",
        ),
        (
            "cxgate_token_expiry_seconds > 3000",
            "a token expiry about an hour ahead",
        ),
    ] {
        let got = instant_query(&env.http, &prom.url, expr).await;
        assert!(
            matches!(&got, Ok(s) if !s.is_empty()),
            "expected {what} in Prometheus ({expr}), saw {got:?}"
        );
    }

    // Every query of every panel.
    let panels = dashboard_panels();
    let mut problems = Vec::new();
    let mut per_group: BTreeMap<&str, usize> = BTreeMap::new();
    println!("{:<9} {:<45} ref series  first value", "group", "panel");
    for panel in &panels {
        let exprs: Vec<String> = panel.targets.iter().map(|(_, e)| e.clone()).collect();
        let Some(group) = group_of(&exprs) else {
            problems.push(format!(
                "panel {:?} (row {:?}) shows no metric of a known group: {exprs:?}",
                panel.title, panel.row
            ));
            continue;
        };
        *per_group.entry(group).or_default() += 1;
        let optional = MAY_BE_EMPTY
            .iter()
            .any(|m| exprs.iter().any(|e| e.contains(m)));
        if panel.targets.is_empty() {
            problems.push(format!("panel {:?} has no query", panel.title));
        }
        for (ref_id, expr) in &panel.targets {
            let filled = match substitute(expr) {
                Ok(filled) => filled,
                Err(e) => {
                    problems.push(format!("panel {:?} {ref_id}: {e}", panel.title));
                    continue;
                }
            };
            let samples = match instant_query(&env.http, &prom.url, &filled).await {
                Ok(samples) => samples,
                Err(e) => {
                    problems.push(format!(
                        "panel {:?} {ref_id}: expected status success, saw {e}; expr {filled}",
                        panel.title
                    ));
                    continue;
                }
            };
            let finite = samples.iter().filter(|(_, v)| v.is_finite()).count();
            println!(
                "{group:<9} {:<45} {ref_id:<3} {:>2}/{:<2}  {}",
                panel.title,
                finite,
                samples.len(),
                samples
                    .first()
                    .map_or("(none)".to_string(), |(l, v)| format!("{v} {l}"))
            );
            if !optional && finite == 0 {
                problems.push(format!(
                    "{group} panel {:?} {ref_id}: expected data (a finite sample), saw {} \
                     series {samples:?}; expr {filled}",
                    panel.title,
                    samples.len()
                ));
            }
        }
    }
    for group in GROUPS {
        if !per_group.contains_key(group) {
            problems.push(format!(
                "expected at least one {group} panel in the dashboard, saw none"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} dashboard problem(s) against a live Prometheus:\n{}",
        problems.len(),
        problems.join("\n")
    );

    drop(prom);
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every traffic task has ended, so no one else holds the environment"),
    }
    println!(
        "prometheus test took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Removes a directory when dropped, also when the test fails halfway.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A request path for a route template of the production table, different per client so
/// each client has its own misses and hits.
fn path_for(method: &str, template: &str, client: usize) -> String {
    let kind = if template.contains("/insights/") {
        "volume"
    } else if template.contains("/crisis/") {
        "event"
    } else if method != "GET" && template.ends_with("/settings/{kind}") {
        "teams"
    } else if method != "GET" || template.ends_with("/settings/{kind}/{id}") {
        "team"
    } else {
        "topics"
    };
    template
        .replace("{contact_id}", &format!("{}", 100 + client))
        .replace("{account_id}", "12345")
        .replace("{kind}", kind)
        .replace("{service}", "twitter")
        .replace("{service_id}", &format!("c{client}"))
        .replace("{topic_id}", "123451")
        .replace(
            "{id}",
            &if template.contains("/settings/") {
                // A team of the generated account (account id x 1000 + 1).
                "12345001".to_string()
            } else {
                format!("m{client}")
            },
        )
}

/// A form body each write endpoint of the simulator accepts.
fn body_for(path: &str) -> &'static str {
    if path.contains("/inbox/mention/") {
        "updates=%7B%22status%22%3A%22closed%22%7D"
    } else if path.contains("/inbox/contact/") {
        "updates=%7B%22email%22%3A%22ops%40example.com%22%7D"
    } else if path.contains("/insights/facets") {
        "facetdefinitions=%5B%7B%22name%22%3A%22sentiment%22%7D%5D&topic_ids=123451"
    } else if path.ends_with("/settings/teams") {
        "team=%7B%22name%22%3A%22Ops%22%7D"
    } else if path.contains("/settings/") {
        "updates=%7B%22name%22%3A%22Ops%22%7D"
    } else if path.contains("/crisis/") {
        "id=123451&activate=1&crisis_name=drill"
    } else {
        "message=hello"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_size_with_ten_clients() {
    const CLIENTS: usize = 10;
    const MAX_BYTES: usize = 1 << 20;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let production: toml::Table = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid TOML: {e}", path.display()));
    let routes = production
        .get("routes")
        .cloned()
        .unwrap_or_else(|| panic!("{} has no [[routes]]", path.display()));
    let templates: Vec<String> = routes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r.get("match").and_then(|m| m.as_str()).map(str::to_string))
        .collect();
    assert!(
        templates.len() >= 10,
        "expected the full production route table, saw {} routes",
        templates.len()
    );
    let mut only_routes = toml::Table::new();
    only_routes.insert("routes".into(), routes);
    let routes_toml = toml::to_string(&only_routes).expect("routes back to TOML");

    let mut clients = String::new();
    for c in 0..CLIENTS {
        clients.push_str(&common::client_toml(
            &format!("service-{c:02}"),
            &format!("size-key-{c:02}"),
            "scopes = [\"read\", \"write\"]",
        ));
    }
    let sim = SimOptions {
        rate_limit: Some("100000/1h".parse().expect("valid simulator rate limit")),
        insights_latency: Duration::from_millis(1),
        ..SimOptions::default()
    };
    let extra = format!("{}\n{routes_toml}", common::BIG_BUDGET);
    let env = Arc::new(common::start_with(sim, &clients, &extra).await);
    let _cleanup = RemoveOnDrop(env.dir.clone());

    // Every client on every route, each request twice (a miss then a hit for reads), plus
    // one unrouted read each (route "other", a 404 from the simulator).
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let env = env.clone();
        let templates = templates.clone();
        tasks.spawn(async move {
            let key = format!("size-key-{c:02}");
            let auth = format!("Bearer {key}");
            let mut statuses = Vec::new();
            for template in &templates {
                let (method, tpath) = template.split_once(' ').expect("METHOD /path");
                let path = path_for(method, tpath, c);
                for _ in 0..2 {
                    let a = if method == "GET" {
                        env.get_as(&key, &path).await
                    } else {
                        env.send(
                            Method::POST,
                            &env.url(&path),
                            &[
                                ("authorization", &auth),
                                ("content-type", "application/x-www-form-urlencoded"),
                            ],
                            body_for(&path),
                        )
                        .await
                    };
                    statuses.push((template.clone(), a.status.as_u16()));
                }
            }
            let a = env.get_as(&key, "/12345/inbox/contact/twitter").await;
            statuses.push(("other".into(), a.status.as_u16()));
            statuses
        });
    }
    let mut bad = Vec::new();
    while let Some(done) = tasks.join_next().await {
        for (route, status) in done.expect("a client task panicked") {
            if status != 200 && route != "other" {
                bad.push(format!("{route}: {status}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "expected 200 for every routed request, saw {bad:?}"
    );

    let metrics = env.metrics().await;
    let bytes = metrics.len();
    let series = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    let request_series = metrics
        .lines()
        .filter(|l| l.starts_with("cxgate_requests_total{"))
        .count();
    println!(
        "/metrics with {CLIENTS} clients and {} routes after traffic on all of them: \
         {bytes} bytes ({:.1} KiB), {series} samples, {request_series} cxgate_requests_total series",
        templates.len(),
        bytes as f64 / 1024.0
    );
    for c in 0..CLIENTS {
        let label = format!("client=\"service-{c:02}\"");
        assert!(
            metrics.contains(&label),
            "expected {label} in /metrics, saw none"
        );
    }
    assert!(
        bytes < MAX_BYTES,
        "expected /metrics under {MAX_BYTES} bytes, saw {bytes}"
    );
    match Arc::try_unwrap(env) {
        Ok(env) => env.stop().await,
        Err(_) => panic!("every client task has ended, so no one else holds the environment"),
    }
}
