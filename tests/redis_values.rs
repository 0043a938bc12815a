//! Values in the replicas' Redis that no replica wrote (planted, or left by another tool):
//! the real binary bounds or replaces each, counts it in `cxgate_redis_repairs_total{key}`
//! and says so once per incident, naming the key and what it did, never "Redis
//! unreachable" for a Redis that answers.
//!
//! Each test starts its own `redis-server` on a free loopback port (stopped by its process
//! id) and the binary against the simulator, in this process.

mod common;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

use common::redis_server::RedisServer;
use common::{Proc, KEY};

/// The binary on a Redis budget, its Redis, and what it needs to be reached.
struct Setup {
    proc: Proc,
    redis: RedisServer,
    prefix: String,
    port: u16,
    admin_port: u16,
    _sim: cxgate::sim::SimHandle,
}

impl Setup {
    async fn start(tag: &str) -> Option<Setup> {
        let redis = RedisServer::start_or_skip("the Redis value tests")?;
        let setup = common::binary_setup(tag, "/nothing-slow", 0).await;
        let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
        let prefix = format!("cxv{:08x}", fastrand::u32(..));
        let config = format!(
            "{}\n[budget]\nlimit = 100000\nperiod = \"1s\"\nburst = 10000\nbackend = \"redis\"\n\
             redis_url_env = \"{url_env}\"\nkey_prefix = \"{prefix}\"\nreplicas = 1\n",
            setup.config
        );
        std::fs::write(&setup.config_path, config).expect("write config");
        std::env::set_var(&url_env, redis.url());
        let proc = Proc::spawn(
            &[
                "run",
                "--config",
                setup.config_path.to_str().expect("utf-8"),
            ],
            &setup.dir,
        );
        let s = Setup {
            proc,
            redis,
            prefix,
            port: setup.port,
            admin_port: setup.admin_port,
            _sim: setup.sim,
        };
        s.wait_for_redis().await;
        Some(s)
    }

    fn key(&self, suffix: &str) -> String {
        format!("{{{}}}:{suffix}", self.prefix)
    }

    async fn conn(&self) -> cxgate::replicas::Conn {
        cxgate::replicas::Options::default()
            .open(&self.redis.url())
            .await
            .expect("connect to the test redis-server")
    }

    async fn get(&self, url: &str, key: Option<&str>) -> Option<(StatusCode, Bytes)> {
        self.get_with_headers(url, key)
            .await
            .map(|(status, _, body)| (status, body))
    }

    async fn get_with_headers(
        &self,
        url: &str,
        key: Option<&str>,
    ) -> Option<(StatusCode, http::HeaderMap, Bytes)> {
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let mut req = Request::get(url);
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, headers, body))
    }

    /// A read through the gateway: its status.
    async fn read(&self, path: &str) -> StatusCode {
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        self.get(&url, Some(KEY))
            .await
            .map_or(StatusCode::BAD_GATEWAY, |(s, _)| s)
    }

    /// `/admin/status`'s `budget.upstream.paused_for_s`, if a pause is shown.
    async fn paused_for(&self) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/admin/status", self.admin_port);
        let (_, body) = self.get(&url, None).await?;
        let status: serde_json::Value = serde_json::from_slice(&body).ok()?;
        status["budget"]["upstream"]["paused_for_s"].as_f64()
    }

    /// The value of the exported series `series` (name and labels exactly), if exported.
    async fn metric(&self, series: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.admin_port);
        let (_, body) = self.get(&url, None).await?;
        let text = String::from_utf8_lossy(&body).into_owned();
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Waits until the binary serves and says Redis is up (it starts in well under 15 s
    /// even on a busy machine).
    async fn wait_for_redis(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.metric("cxgate_redis_up").await != Some(1.0) {
            assert!(
                Instant::now() < deadline,
                "expected cxgate serving with Redis up within 15 s:\n{}",
                self.proc.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log lines that contain every one of `parts`.
    fn lines_with(&self, parts: &[&str]) -> Vec<String> {
        self.proc
            .output()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }

    async fn redis_now_us(&self) -> u64 {
        let mut c = self.conn().await;
        let (s, us): (u64, u64) = redis::cmd("TIME")
            .query_async(&mut c)
            .await
            .expect("redis TIME");
        s * 1_000_000 + us
    }
}

const REPAIRS_GLOBAL: &str = "cxgate_redis_repairs_total{key=\"budget:global\"}";
const REPAIRS_PAUSE: &str = "cxgate_redis_repairs_total{key=\"budget:pause\"}";

/// A budget state planted ten years ahead in `budget:global` is cut back (as before) and
/// now also counted, every time, in `cxgate_redis_repairs_total{key="budget:global"}` (on
/// the first scrape at 0), with one warning naming the key for the incident however often
/// it is planted again; a pause planted past the upstream's window is counted under
/// `budget:pause`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_budget_state_is_counted_and_warned_once_per_incident() {
    let Some(s) = Setup::start("redis-values-far").await else {
        return;
    };
    assert_eq!(
        s.metric(REPAIRS_GLOBAL).await,
        Some(0.0),
        "expected {REPAIRS_GLOBAL} at 0 on the first scrape:\n{}",
        s.proc.output()
    );
    let ten_years_us: u64 = 10 * 365 * 24 * 3600 * 1_000_000;
    let mut redis = s.conn().await;
    for round in 1..=3u32 {
        let ahead = s.redis_now_us().await + ten_years_us;
        let () = redis::cmd("SET")
            .arg(s.key("budget:global"))
            .arg(ahead.to_string())
            .query_async(&mut redis)
            .await
            .expect("plant a budget state ten years ahead");
        let status = s.read(&format!("/me/permissions?round={round}")).await;
        assert!(
            status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS,
            "round {round}: expected 200 or a bounded 429, saw {status}"
        );
        let held: Option<String> = redis::cmd("GET")
            .arg(s.key("budget:global"))
            .query_async(&mut redis)
            .await
            .expect("read the budget state");
        let held: u64 = held.and_then(|v| v.parse().ok()).unwrap_or(0);
        assert!(
            held < s.redis_now_us().await + 3_600_000_000,
            "round {round}: expected the planted state cut back, saw {held}"
        );
    }
    assert_eq!(
        s.metric(REPAIRS_GLOBAL).await,
        Some(3.0),
        "expected each of the 3 planted states counted"
    );
    let warned = s.lines_with(&["budget:global", "no replica writes"]);
    assert_eq!(
        warned.len(),
        1,
        "expected one warning for the incident, saw {warned:#?}\n{}",
        s.proc.output()
    );

    let () = redis::cmd("DEL")
        .arg(s.key("budget:global"))
        .query_async(&mut redis)
        .await
        .expect("clear the budget state");
    let ahead = s.redis_now_us().await + ten_years_us;
    let () = redis::cmd("SET")
        .arg(s.key("budget:pause"))
        .arg(ahead.to_string())
        .query_async(&mut redis)
        .await
        .expect("plant a pause ten years ahead");
    let _ = s.read("/me/permissions?paused=1").await;
    assert_eq!(
        s.metric(REPAIRS_PAUSE).await,
        Some(1.0),
        "expected the planted pause counted under budget:pause"
    );
    assert_eq!(
        s.lines_with(&["budget:pause", "no replica writes"]).len(),
        1,
        "expected one warning naming budget:pause:\n{}",
        s.proc.output()
    );
}

/// `budget:global` holding a list (WRONGTYPE for every GET) is no outage: the gateway
/// says what the key holds and that it replaced it, counts the repair, keeps Redis up and
/// admits on the shared budget at once. Before, every admission failed, Redis was marked
/// down ("Redis unreachable") and the replica flapped onto its local share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_key_of_the_wrong_type_is_replaced_not_called_an_outage() {
    let Some(s) = Setup::start("redis-values-type").await else {
        return;
    };
    let mut redis = s.conn().await;
    let _: i64 = redis::cmd("RPUSH")
        .arg(s.key("budget:global"))
        .arg("planted")
        .query_async(&mut redis)
        .await
        .expect("plant a list");
    for round in 0..3 {
        let status = s.read(&format!("/me/permissions?typed={round}")).await;
        assert_eq!(status, StatusCode::OK, "round {round}: expected 200");
    }
    let kind: String = redis::cmd("TYPE")
        .arg(s.key("budget:global"))
        .query_async(&mut redis)
        .await
        .expect("TYPE");
    assert!(
        kind == "string" || kind == "none",
        "expected the list replaced by the budget's own state, saw a {kind}"
    );
    assert_eq!(
        s.metric(REPAIRS_GLOBAL).await,
        Some(1.0),
        "expected the one repair counted:\n{}",
        s.proc.output()
    );
    assert_eq!(
        s.metric("cxgate_redis_up").await,
        Some(1.0),
        "expected Redis still up"
    );
    let log = s.proc.output();
    assert!(
        !log.contains("Redis unreachable"),
        "expected no \"Redis unreachable\" for a Redis that answers, saw:\n{log}"
    );
    let said = s.lines_with(&["budget:global", "WRONGTYPE", "deleted"]);
    assert_eq!(
        said.len(),
        1,
        "expected one warning saying the key held the wrong type and was replaced, saw:\n{log}"
    );
}

impl Setup {
    async fn set(&self, suffix: &str, value: &str) {
        let mut redis = self.conn().await;
        let () = redis::cmd("SET")
            .arg(self.key(suffix))
            .arg(value)
            .query_async(&mut redis)
            .await
            .expect("plant a value");
    }

    async fn value(&self, suffix: &str) -> Option<String> {
        let mut redis = self.conn().await;
        redis::cmd("GET")
            .arg(self.key(suffix))
            .query_async(&mut redis)
            .await
            .expect("read a value")
    }

    /// Whether the token record parses as JSON (a replica wrote it).
    async fn record_readable(&self) -> bool {
        self.value("token")
            .await
            .is_some_and(|t| serde_json::from_str::<serde_json::Value>(&t).is_ok())
    }

    /// Polls `done` every 50 ms for up to 10 s; true once it holds.
    async fn eventually(&self, mut done: impl FnMut(&Setup) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        done(self)
    }
}

/// The outside tester's M4: a `budget:probe` planted in no form a replica writes (a bare
/// time ten minutes ahead) refused every miss for 30 s with a `Retry-After` of 1 while
/// `/admin/status` showed no pause. A probe marker holds calls only while the replica it
/// names has calls out; this one is dropped, counted under `budget:probe` and said
/// unreadable, and the miss is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_probe_marker_refuses_no_call() {
    let Some(s) = Setup::start("redis-values-probe").await else {
        return;
    };
    assert_eq!(s.read("/me/permissions?first=1").await, StatusCode::OK);
    let ahead = s.redis_now_us().await + 600_000_000;
    s.set("budget:probe", &ahead.to_string()).await;
    let status = s.read("/me/permissions?probe=1").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "expected a miss served despite the planted probe marker:\n{}",
        s.proc.output()
    );
    let series = "cxgate_redis_repairs_total{key=\"budget:probe\"}";
    assert_eq!(
        s.metric(series).await,
        Some(1.0),
        "expected {series} counted"
    );
    assert_eq!(
        s.lines_with(&["budget:probe", "unreadable"]).len(),
        1,
        "expected one warning calling the marker unreadable:\n{}",
        s.proc.output()
    );
    // One naming a replica with no calls out is no probe in flight: the next call is the
    // probe, and it goes.
    s.set("budget:probe", &format!("{ahead}:nosuchreplica0001"))
        .await;
    assert_eq!(s.read("/me/permissions?probe=2").await, StatusCode::OK);
}

/// A `budget:learning` marker no replica sets (another value than a replica's, no expiry)
/// was deleted by the next answer without a word: it is counted under `budget:learning`
/// and warned about like the other repairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_learning_marker_is_counted_and_said() {
    let Some(s) = Setup::start("redis-values-learning").await else {
        return;
    };
    assert_eq!(s.read("/me/permissions?first=1").await, StatusCode::OK);
    s.set("budget:learning", "planted").await;
    assert_eq!(s.read("/me/permissions?learning=1").await, StatusCode::OK);
    let series = "cxgate_redis_repairs_total{key=\"budget:learning\"}";
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.metric(series).await != Some(1.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        s.metric(series).await,
        Some(1.0),
        "expected {series} counted"
    );
    assert_eq!(
        s.lines_with(&["budget:learning", "no replica"]).len(),
        1,
        "expected one warning naming budget:learning:\n{}",
        s.proc.output()
    );
    assert_eq!(
        s.value("budget:learning").await,
        None,
        "expected it deleted"
    );
}

/// A budget value that does not parse is said to be unreadable, not "further ahead" than
/// anything: the warning says what was found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_budget_value_is_said_unreadable() {
    let Some(s) = Setup::start("redis-values-garbled").await else {
        return;
    };
    s.set("budget:global", "abc").await;
    assert_eq!(s.read("/me/permissions?garbled=1").await, StatusCode::OK);
    let said = s.lines_with(&["budget:global", "no replica writes"]);
    assert_eq!(said.len(), 1, "expected one warning:\n{}", s.proc.output());
    assert!(
        said[0].contains("unreadable") && !said[0].contains("further ahead"),
        "expected the value called unreadable, saw {}",
        said[0]
    );
}

/// The outside tester's M6: a token record that is no JSON is counted and warned about;
/// after the replica replaced it, the same text planted again (the same incident) is
/// counted but not warned again, and another text is a new incident, warned at once.
/// Before, any unreadable record within a minute of the first went unsaid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_token_record_is_warned_once_per_planted_value() {
    let Some(s) = Setup::start("redis-values-record").await else {
        return;
    };
    let series = "cxgate_redis_repairs_total{key=\"token\"}";
    let warned = |s: &Setup| s.lines_with(&["record is unreadable"]).len();
    for (round, text, warnings) in [
        (1, "planted A", 1),
        (2, "planted A", 1),
        (3, "planted B", 2),
    ] {
        s.set("token", text).await;
        assert!(
            s.eventually(|s| warned(s) >= warnings).await,
            "round {round}: expected {warnings} warning(s):\n{}",
            s.proc.output()
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !s.record_readable().await && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            s.record_readable().await,
            "round {round}: expected the record replaced"
        );
        // Past the watcher's next look, which reads the replaced record.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            s.metric(series).await,
            Some(f64::from(round)),
            "round {round}: expected each planted record counted"
        );
        assert_eq!(warned(&s), warnings, "round {round}: warnings");
    }
}

const REPAIRS_LEFT: &str = "cxgate_redis_repairs_total{key=\"budget:upstream_left\"}";

/// A shared count of 0 planted with a day's expiry (and no pause) held every miss for the
/// day: `Retry-After` an hour forever, `/admin/status` at `paused_for_s: 3600` never
/// counting down, the key's expiry untouched, no repair counted or said. A count holds
/// within the upstream's window only: its expiry is cut to the window's end (counted
/// once, warned once), `Retry-After` and the status say the same time left and it counts
/// down; a count planted with no expiry at all (ignored, and kept) is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_count_past_the_upstreams_window_is_cut_to_it() {
    let Some(s) = Setup::start("redis-values-left").await else {
        return;
    };
    assert_eq!(s.read("/me/permissions?left=0").await, StatusCode::OK);
    let mut redis = s.conn().await;
    let left = s.key("budget:upstream_left");
    // No expiry at all: no replica's count, and no window's; it goes.
    let () = redis::cmd("SET")
        .arg(&left)
        .arg("0")
        .query_async(&mut redis)
        .await
        .expect("plant a count of 0 with no expiry");
    assert_eq!(
        s.read("/me/permissions?left=none").await,
        StatusCode::OK,
        "expected a count with no expiry dropped, not obeyed"
    );
    assert_eq!(
        s.metric(REPAIRS_LEFT).await,
        Some(1.0),
        "expected the dropped count counted:\n{}",
        s.proc.output()
    );
    let () = redis::cmd("SET")
        .arg(&left)
        .arg("0")
        .arg("PX")
        .arg(86_400_000u64)
        .query_async(&mut redis)
        .await
        .expect("plant a count of 0 for a day");
    let url = format!("http://127.0.0.1:{}/me/permissions?left=1", s.port);
    let (status, headers, _) = s
        .get_with_headers(&url, Some(KEY))
        .await
        .expect("an answer");
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "expected the dry count to refuse"
    );
    let retry_after: f64 = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .expect("a Retry-After");
    let pttl: i64 = redis::cmd("PTTL")
        .arg(&left)
        .query_async(&mut redis)
        .await
        .expect("PTTL");
    assert!(
        (0..=3_601_500).contains(&pttl),
        "expected the day's expiry cut to the hour's window at most, saw {pttl} ms"
    );
    assert_eq!(
        s.metric(REPAIRS_LEFT).await,
        Some(2.0),
        "expected the cut counted once:\n{}",
        s.proc.output()
    );
    let first = s.paused_for().await.expect("a pause shown");
    assert!(
        (first - retry_after).abs() <= 1.5,
        "expected the status ({first} s) to say what Retry-After ({retry_after} s) said"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = s.paused_for().await.expect("a pause shown");
    assert!(
        second < first,
        "expected the pause shown to count down, saw {first} s then {second} s"
    );
    assert_eq!(
        s.lines_with(&["budget:upstream_left", "no replica writes"])
            .len(),
        1,
        "expected one warning naming budget:upstream_left:\n{}",
        s.proc.output()
    );
}
