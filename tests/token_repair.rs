//! An operator's repair of the shared token across two real replicas and their own
//! `redis-server` (a free loopback port, stopped by its process id): `cxgate token init` on
//! one replica and a reload start a new epoch that every replica adopts, whatever the
//! expiries say, and no replica pushes the token it held before back over it, not even
//! after a restart. And a record whose token is a client's gateway key is never adopted.
//! Without `redis-server` on PATH the tests skip loudly, except under `CI=true`.
//! The tests take a lock: they set the `CX_*` variables `token init` reads.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use common::replicas::{start_replicas, Replicas, Setup};
use common::{ACCESS, KEY, REFRESH};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A token the upstream accepts as well as [`ACCESS`]: the planted record's, so a replica
/// that adopts it keeps working and holds it as a valid token.
const PLANTED: &str = "planted-access-0001";
const PLANTED_REFRESH: &str = "planted-refresh-0001";

/// Longer than the replicas' one-second watch of the record, twice over.
const WATCHES: Duration = Duration::from_millis(2500);

/// A simulator, a Redis and two replicas in front of both (`common::replicas`).
type Pair = Replicas;

/// A simulator accepting [`ACCESS`] and [`PLANTED`], a Redis and two replicas.
async fn pair() -> Option<Pair> {
    start_replicas(Setup {
        also_accepted: vec![(PLANTED, PLANTED_REFRESH)],
        workers: false,
        prefix: "cxr",
        dir: "repair",
        ..Setup::new(2)
    })
    .await
}

impl Pair {
    async fn send(&self, method: Method, url: String) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .header("authorization", format!("Bearer {KEY}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(10), self.http.request(req))
            .await
            .expect("expected an answer within 10 s")
            .expect("expected the replica to answer");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn get(&self, i: usize, path: &str) -> (StatusCode, String) {
        let url = format!("http://{}{path}", self.replicas[i].addr);
        self.send(Method::GET, url).await
    }

    async fn reload(&self, i: usize) -> (StatusCode, String) {
        let url = format!("http://{}/admin/reload", self.replicas[i].admin_addr);
        self.send(Method::POST, url).await
    }

    fn file(&self, i: usize) -> serde_json::Value {
        let text = std::fs::read_to_string(self.dirs[i].join("token.json")).expect("token file");
        serde_json::from_str(&text).expect("token file JSON")
    }

    fn files_hold(&self, access: &str) -> bool {
        (0..2).all(|i| self.file(i)["access_token"] == access)
    }

    async fn record(&self) -> serde_json::Value {
        let mut redis = self.conn().await;
        let text: Option<String> = redis::cmd("GET")
            .arg(self.key("token"))
            .query_async(&mut redis)
            .await
            .expect("read the token record");
        text.map_or(serde_json::Value::Null, |t| {
            serde_json::from_str(&t).expect("record JSON")
        })
    }

    async fn set_record(&self, version: u64, token: serde_json::Value) {
        let mut redis = self.conn().await;
        let record = serde_json::json!({"version": version, "by": "tamper", "token": token});
        let () = redis::cmd("SET")
            .arg(self.key("token"))
            .arg(record.to_string())
            .query_async(&mut redis)
            .await
            .expect("write the token record");
    }

    /// The status of one uncached call through replica `i`.
    async fn serves(&self, i: usize, tag: &str) -> StatusCode {
        self.get(i, &format!("/12345/inbox/contact/twitter/{tag}"))
            .await
            .0
    }
}

/// Polls `done` every 50 ms for up to `limit`; true once it holds.
async fn eventually(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done()
}

/// The version of the record once one exists (each replica creates or adopts it at start).
async fn version_once_stored(p: &Pair) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = p.record().await["version"].as_u64() {
            return v;
        }
        assert!(Instant::now() < deadline, "expected a token record stored");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `cxgate token init` for replica `i` with the given variables (expiry in seconds).
async fn token_init(p: &Pair, i: usize, access: &str, refresh: &str, expires_in: u64) {
    try_token_init(p, i, access, refresh, expires_in)
        .await
        .expect("token init writes the file");
}

/// [`token_init`], with its outcome.
async fn try_token_init(
    p: &Pair,
    i: usize,
    access: &str,
    refresh: &str,
    expires_in: u64,
) -> Result<PathBuf, cxgate::StartError> {
    let cfg = cxgate::config::load(&p.dirs[i].join("cxgate.toml")).expect("config");
    std::env::set_var("CX_ACCESS_TOKEN", access);
    std::env::set_var("CX_REFRESH_TOKEN", refresh);
    std::env::set_var("CX_EXPIRES_IN", expires_in.to_string());
    let written = cxgate::token_init(&cfg, None, None).await;
    for name in ["CX_ACCESS_TOKEN", "CX_REFRESH_TOKEN", "CX_EXPIRES_IN"] {
        std::env::remove_var(name);
    }
    written
}

/// The outside tester's `tok_repair.sh`: a planted record with a token the upstream still
/// accepts, a far expiry and a higher version is adopted by both replicas; the operator
/// repairs replica 0 with `token init` (an expiry an hour away, sooner than the planted
/// one) and reloads it. Replica 1 must take the repair although its planted token expires
/// later, and a restart of replica 1 must not push the planted token back over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_token_init_and_reload_win_on_every_replica_and_survive_a_restart() {
    let _one = SERIAL.lock().await;
    let Some(mut p) = pair().await else {
        return;
    };
    let version = version_once_stored(&p).await;
    p.set_record(
        version + 1,
        serde_json::json!({"access_token": PLANTED, "refresh_token": PLANTED_REFRESH,
                           "expires_at": "2098-01-01T00:00:00Z"}),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || p.files_hold(PLANTED)).await,
        "expected the planted record adopted by both replicas (the setup of this test): {} {}",
        p.file(0),
        p.file(1)
    );
    // The upstream takes the planted token: each replica now holds it as a working token
    // (its refresh token unproven, so the files keep the mark).
    for i in 0..2 {
        assert_eq!(p.serves(i, &format!("planted{i}")).await, StatusCode::OK);
    }

    token_init(&p, 0, ACCESS, REFRESH, 3600).await;
    let (status, body) = p.reload(0).await;
    assert_eq!(status, StatusCode::OK, "reload of replica 0: {body}");
    let repaired = eventually(Duration::from_secs(10), || p.files_hold(ACCESS)).await;
    assert!(
        repaired,
        "expected the operator's repair adopted by both replicas although the planted token \
         expires later, saw files {} and {}; record {}",
        p.file(0)["access_token"],
        p.file(1)["access_token"],
        p.record().await["token"]["access_token"]
    );
    assert_eq!(
        p.record().await["token"]["access_token"],
        ACCESS,
        "expected the repair in the record"
    );

    p.restart_replica(1).await;
    tokio::time::sleep(WATCHES).await;
    let record = p.record().await;
    assert_eq!(
        record["token"]["access_token"], ACCESS,
        "expected the repair to stay in the record after replica 1 restarted, saw version {} \
         holding {}",
        record["version"], record["token"]["access_token"]
    );
    for i in 0..2 {
        assert_eq!(
            p.file(i)["access_token"],
            ACCESS,
            "replica {i}: expected the repaired token in its file after the restart"
        );
        assert_eq!(
            p.serves(i, &format!("repaired{i}")).await,
            StatusCode::OK,
            "replica {i}: expected it serving on the repaired token"
        );
    }
    // `.prev` keeps the last proven file throughout: never a copy of a record.
    let prev = std::fs::read_to_string(p.dirs[1].join("token.json.prev")).unwrap_or_default();
    assert!(
        prev.contains(REFRESH) && !prev.contains(PLANTED) && !prev.contains("adopted_unconfirmed"),
        "replica 1: expected its proven token file kept in token.json.prev, saw {prev}"
    );
    p.stop().await;
}

/// A record of a newer epoch is still checked: one whose `initialised_at` lies in the
/// future (it would outrank every later repair) is not adopted, nor is an older-epoch
/// record over a repaired token, however much later it expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_from_before_a_repair_or_stamped_in_the_future_is_not_adopted() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    let version = version_once_stored(&p).await;
    p.set_record(
        version + 1,
        serde_json::json!({"access_token": PLANTED, "refresh_token": PLANTED_REFRESH,
                           "expires_at": "2098-01-01T00:00:00Z",
                           "initialised_at": "2097-01-01T00:00:00.000Z"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    assert!(
        p.files_hold(ACCESS),
        "expected a record stamped with an epoch in 2097 not adopted, saw {} {}",
        p.file(0),
        p.file(1)
    );
    // The operator's repair on replica 0, taken by both.
    token_init(&p, 0, ACCESS, REFRESH, 3600).await;
    let (status, body) = p.reload(0).await;
    assert_eq!(status, StatusCode::OK, "reload of replica 0: {body}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.record().await["token"].get("initialised_at").is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        p.record().await["token"].get("initialised_at").is_some(),
        "expected the repair's epoch in the record: {}",
        p.record().await
    );
    // Replica 1 held the same token already: it takes the epoch with the next watch.
    tokio::time::sleep(WATCHES).await;
    // A record without an epoch (from before the repair), later expiry, higher version.
    let version = p.record().await["version"].as_u64().expect("version");
    p.set_record(
        version + 1,
        serde_json::json!({"access_token": PLANTED, "refresh_token": PLANTED_REFRESH,
                           "expires_at": "2098-01-01T00:00:00Z"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    assert!(
        p.files_hold(ACCESS),
        "expected a record from before the repair not adopted over it, saw {} {}",
        p.file(0)["access_token"],
        p.file(1)["access_token"]
    );
    assert_eq!(
        p.record().await["token"]["access_token"],
        ACCESS,
        "expected the repaired token offered back over the older record"
    );
    p.stop().await;
}

/// A gateway key never travels upstream: a shared record whose access token is a client's
/// key is not adopted (however well-formed), `cxgate token init` refuses one, and a token
/// file holding one is not taken on reload (the held token stays, and `notes` say why).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_key_is_never_taken_as_the_upstream_token() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    let version = version_once_stored(&p).await;
    p.set_record(
        version + 1,
        serde_json::json!({"access_token": KEY, "refresh_token": PLANTED_REFRESH,
                           "expires_at": "2098-01-01T00:00:00Z"}),
    )
    .await;
    tokio::time::sleep(WATCHES).await;
    for i in 0..2 {
        assert_eq!(
            p.file(i)["access_token"],
            ACCESS,
            "replica {i}: expected a record holding the client's key not adopted"
        );
        assert_eq!(
            p.serves(i, &format!("key{i}")).await,
            StatusCode::OK,
            "replica {i}: expected it serving on its own token"
        );
    }

    let refused = try_token_init(&p, 0, KEY, REFRESH, 3600).await;
    let message = refused.as_ref().err().map(ToString::to_string);
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("gateway key")),
        "expected token init to refuse a client's key as the token, saw {refused:?}"
    );
    assert_eq!(
        p.file(0)["access_token"],
        ACCESS,
        "expected the token file untouched by the refused token init"
    );

    // Written by hand, then a reload: not taken.
    let hand = serde_json::json!({"access_token": KEY, "refresh_token": REFRESH,
                                  "expires_at": "2098-01-01T00:00:00Z"});
    std::fs::write(p.dirs[1].join("token.json"), hand.to_string()).expect("write token file");
    let (status, body) = p.reload(1).await;
    assert!(
        status == StatusCode::OK && body.contains("gateway key"),
        "expected the reload to say the file's token is a client's key, saw {status} {body}"
    );
    assert_eq!(
        p.serves(1, "after-reload").await,
        StatusCode::OK,
        "expected replica 1 serving on the token it held"
    );
    tokio::time::sleep(WATCHES).await;
    let record = p.record().await;
    assert_eq!(
        (record["version"].as_u64(), record["by"].as_str()),
        (Some(version + 1), Some("tamper")),
        "expected no replica to write a record after the refusals (the planted one stays, \
         refused), saw {}",
        record["version"]
    );
    p.stop().await;
}

/// A shared record whose token only holds a client's key (`KEY.x`, `x=KEY`,
/// `Bearer%20KEY`, percent-encoded, in base64 or hex once the key has authenticated, or as
/// the refresh token the replicas would send to the OAuth endpoint) is refused as one
/// that is the key: no replica adopts it, each serves on its own token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_whose_token_holds_a_clients_key_is_never_adopted() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    let mut version = version_once_stored(&p).await;
    let percent: String = KEY.bytes().map(|b| format!("%{b:02X}")).collect();
    let records = [
        (format!("{KEY}.x"), PLANTED_REFRESH.to_string()),
        (format!("x={KEY}"), PLANTED_REFRESH.to_string()),
        (format!("Bearer%20{KEY}"), PLANTED_REFRESH.to_string()),
        (percent, PLANTED_REFRESH.to_string()),
        (PLANTED.to_string(), KEY.to_string()),
        // By now the key has authenticated on both replicas (each serves above): known in
        // full, its base64 and hex spellings are the key too.
        (common::spellings::base64(KEY), PLANTED_REFRESH.to_string()),
        (common::spellings::hex(KEY), PLANTED_REFRESH.to_string()),
        (PLANTED.to_string(), common::spellings::base64(KEY)),
    ];
    for (access, refresh) in &records {
        version += 1;
        p.set_record(
            version,
            serde_json::json!({"access_token": access, "refresh_token": refresh,
                               "expires_at": "2098-01-01T00:00:00Z"}),
        )
        .await;
        tokio::time::sleep(WATCHES).await;
        for i in 0..2 {
            assert_eq!(
                p.file(i)["access_token"],
                ACCESS,
                "replica {i}: expected the record ({access:?}, {refresh:?}) not adopted"
            );
            assert_eq!(
                p.serves(i, &format!("holds{version}-{i}")).await,
                StatusCode::OK,
                "replica {i}: expected it serving on its own token"
            );
        }
    }
    p.stop().await;
}

/// A planted refresh token the token endpoint does not know.
const BOGUS_REFRESH: &str = "bogus-refresh-planted";

/// One upstream 401 for the next API call (the next request through replica `i`).
fn one_401(p: &Pair) {
    p.sim.set_faults(cxgate::sim::Faults {
        force_401: Some(cxgate::sim::Force401 { count: 1 }),
        ..cxgate::sim::Faults::default()
    });
}

impl Pair {
    fn text(&self, i: usize, name: &str) -> String {
        std::fs::read_to_string(self.dirs[i].join(name)).unwrap_or_default()
    }

    /// Refresh tokens presented a second time, as the simulator counts them.
    fn reused(&self) -> u64 {
        self.sim.stats()["refresh_reuse_rejected"]
            .as_u64()
            .unwrap_or(0)
    }

    async fn ready(&self, i: usize) -> (StatusCode, String) {
        let url = format!("http://{}/readyz", self.replicas[i].admin_addr);
        self.send(Method::GET, url).await
    }

    /// Plants a record the upstream's API takes ([`PLANTED`]) with a refresh token its
    /// token endpoint does not know, and waits until both replicas serve on it.
    async fn plant_bogus_refresh_token(&self) {
        let version = self.record().await["version"]
            .as_u64()
            .expect("a record version");
        self.set_record(
            version + 1,
            serde_json::json!({"access_token": PLANTED, "refresh_token": BOGUS_REFRESH,
                               "expires_at": "2098-01-01T00:00:00Z"}),
        )
        .await;
        assert!(
            eventually(Duration::from_secs(10), || self.files_hold(PLANTED)).await,
            "expected the planted record adopted by both replicas (the setup of this test): \
             {} {}",
            self.file(0),
            self.file(1)
        );
        for i in 0..2 {
            assert_eq!(
                self.serves(i, &format!("planted-{version}-{i}")).await,
                StatusCode::OK,
                "replica {i}: expected the planted access token taken upstream (setup)"
            );
        }
    }

    /// One upstream 401 on replica `i`: it must refresh, and the request must still be
    /// served, the replica ready.
    async fn survives_a_401(&self, i: usize, tag: &str) {
        one_401(self);
        let status = self.serves(i, tag).await;
        let ready = self.ready(i).await;
        assert!(
            status == StatusCode::OK && ready.0 == StatusCode::OK,
            "replica {i}: expected the request after one upstream 401 served and the replica \
             ready (its working refresh token kept), saw {status} and /readyz {ready:?}; \
             token.json {}, .prev {}; record {}; refresh tokens presented twice: {}",
            self.text(i, "token.json"),
            self.text(i, "token.json.prev"),
            self.record().await,
            self.reused()
        );
    }
}

/// The outside tester's F2: a record whose access token the upstream takes but whose
/// refresh token is bogus, with a higher version, is adopted, and calls with it succeed.
/// That proves the access token only: each replica's working refresh token stays in its
/// token file or `.prev` (never an unconfirmed copy of the record), and when an upstream
/// 401 makes it refresh, the endpoint's `invalid_grant` for the planted refresh token
/// sends it back to the refresh token it proved, which it then refreshes with, with no
/// refresh token ever presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_a_bogus_refresh_token_never_costs_the_working_one() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    version_once_stored(&p).await;
    for i in 0..2 {
        assert_eq!(p.serves(i, &format!("own{i}")).await, StatusCode::OK);
    }
    p.plant_bogus_refresh_token().await;
    // Longer than a confirmation's rewrite of the file takes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..2 {
        let (file, prev) = (p.text(i, "token.json"), p.text(i, "token.json.prev"));
        assert!(
            file.contains(REFRESH) || prev.contains(REFRESH),
            "replica {i}: expected its working refresh token kept in token.json or \
             token.json.prev after calls with the planted access token, saw {file} and {prev}"
        );
        assert!(
            !prev.contains(BOGUS_REFRESH),
            "replica {i}: expected .prev to keep the last proven file, not a copy of the \
             record, saw {prev}"
        );
    }
    p.survives_a_401(0, "after-401-0").await;
    p.survives_a_401(1, "after-401-1").await;
    // The refresh token the replicas went back to works: the next refresh spends it.
    let refreshes = p.sim.stats()["token_refreshes"].as_u64().unwrap_or(0);
    p.survives_a_401(0, "after-second-401").await;
    assert!(
        p.sim.stats()["token_refreshes"].as_u64().unwrap_or(0) > refreshes,
        "expected a refresh with the restored refresh token"
    );
    assert_eq!(p.reused(), 0, "expected no refresh token presented twice");
    tokio::time::sleep(WATCHES).await;
    for i in 0..2 {
        assert!(
            !p.text(i, "token.json").contains(BOGUS_REFRESH),
            "replica {i}: expected the planted refresh token gone from its file"
        );
        assert_eq!(p.serves(i, &format!("end{i}")).await, StatusCode::OK);
    }
    assert_eq!(p.reused(), 0, "expected no refresh token presented twice");
    p.stop().await;
}

/// With several replicas a replica's proven refresh token is soon rotated away by another
/// replica's refresh: it holds the other's token, adopted. When a planted record's refresh
/// token is refused, the replica takes the refresh token it held before the record (another
/// replica's, never presented since), not one a replica already spent, and the replica
/// whose proven refresh token that spent in turn takes the record it published: both keep
/// serving, and no refresh token is presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_bogus_refresh_token_no_rotated_refresh_token_is_presented_again() {
    let _one = SERIAL.lock().await;
    let Some(p) = pair().await else {
        return;
    };
    version_once_stored(&p).await;
    // Replica 0 refreshes (spending REFRESH); replica 1 adopts its record.
    one_401(&p);
    assert_eq!(p.serves(0, "rotate").await, StatusCode::OK);
    let rotated = eventually(Duration::from_secs(10), || {
        let access = p.file(0)["access_token"].clone();
        access != ACCESS && p.file(1)["access_token"] == access
    })
    .await;
    assert!(
        rotated,
        "expected replica 1 to adopt replica 0's refreshed token (setup): {} {}",
        p.file(0),
        p.file(1)
    );
    assert_eq!(p.serves(1, "adopted").await, StatusCode::OK);
    p.plant_bogus_refresh_token().await;
    p.survives_a_401(1, "after-401-1").await;
    p.survives_a_401(0, "after-401-0").await;
    // And the refresh tokens they went back to are live ones: the next refreshes work.
    p.survives_a_401(0, "again-0").await;
    p.survives_a_401(1, "again-1").await;
    assert_eq!(
        p.reused(),
        0,
        "expected no rotated refresh token presented again"
    );
    tokio::time::sleep(WATCHES).await;
    for i in 0..2 {
        assert!(
            !p.text(i, "token.json").contains(BOGUS_REFRESH),
            "replica {i}: expected the planted refresh token gone from its file"
        );
        assert_eq!(p.serves(i, &format!("end{i}")).await, StatusCode::OK);
        assert_eq!(p.ready(i).await.0, StatusCode::OK, "replica {i} ready");
    }
    p.stop().await;
}

/// The outside tester's F5: warnings about bad shared records are per incident, not
/// throttled by time. The real binary, its own Redis: a record with version 2^64 - 1 is
/// warned about once while it stays; after an operator's corrected record is adopted, the
/// same bad record written again is a new incident and warned about at once, and so is a
/// different bad record following it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_is_warned_about_once_per_incident() {
    let _one = SERIAL.lock().await;
    let Some(redis) =
        cxgate_testkit::redis::RedisServer::start_or_skip("the shared record warning test")
    else {
        return;
    };
    std::env::set_var(common::SECRET_ENV, common::CLIENT_SECRET);
    let url_env = format!("CXGATE_TEST_REDIS_URL_{}", redis.port);
    std::env::set_var(&url_env, redis.url());
    let sim = common::spawn_sim(cxgate::sim::SimOptions {
        access_tokens: vec![ACCESS.to_string(), PLANTED.to_string()],
        refresh_tokens: vec![REFRESH.to_string(), PLANTED_REFRESH.to_string()],
        client_secret: common::CLIENT_SECRET.to_string(),
        ..cxgate::sim::SimOptions::default()
    })
    .await;
    let base = sim.base_url();
    let dir = common::temp_dir("warn-incident");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(&token_file, ACCESS, REFRESH, Duration::from_secs(3600))
        .expect("token file");
    let prefix = format!("cxw{:08x}", fastrand::u32(..));
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
         [upstream]\nbase_url = \"{base}\"\n\
         [token]\nfile = \"{}\"\n\
         [token.oauth]\ntoken_url = \"{base}/oauth/access_token/\"\nclient_id = \"sim-client\"\nclient_secret_env = \"{}\"\n\
         [budget]\nlimit = 100000\nperiod = \"1s\"\nburst = 10000\nbackend = \"redis\"\nredis_url_env = \"{url_env}\"\nkey_prefix = \"{prefix}\"\n\
         {}\n",
        token_file.display(),
        common::SECRET_ENV,
        common::client_toml("test", KEY, "scopes = [\"read\"]"),
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, config).expect("write config");
    let proc = common::Proc::spawn(&["run", "--config", path.to_str().expect("utf-8")], &dir);
    let mut conn = common::replicas::redis_options(&redis)
        .open(&redis.url())
        .await
        .expect("connect to the test redis-server");
    let key = format!("{{{prefix}}}:token");
    let deadline = Instant::now() + Duration::from_secs(20);
    let stored = loop {
        let text: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("read the record");
        if let Some(text) = text {
            break serde_json::from_str::<serde_json::Value>(&text).expect("record JSON");
        }
        assert!(
            Instant::now() < deadline,
            "expected the gateway to store its token record:\n{}",
            proc.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let epoch = stored["token"]["initialised_at"].clone();
    let version = stored["version"].as_u64().expect("version");
    let record = |version: u64, access: &str, refresh: &str| {
        let mut token = serde_json::json!({"access_token": access, "refresh_token": refresh,
                                           "expires_at": "2098-01-01T00:00:00Z"});
        if !epoch.is_null() {
            token["initialised_at"] = epoch.clone();
        }
        serde_json::json!({"version": version, "by": "operator", "token": token}).to_string()
    };
    let set = |text: String| {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let () = redis::cmd("SET")
                .arg(&key)
                .arg(text)
                .query_async(&mut conn)
                .await
                .expect("write the record");
        }
    };
    let warnings = || proc.output().matches("beyond what a record").count();
    let adoptions = || {
        proc.output()
            .matches("using the token another replica refreshed")
            .count()
    };
    let uncountable = record(u64::MAX, "planted-hv", "planted-hv-refresh");

    set(uncountable.clone()).await;
    assert!(
        eventually(Duration::from_secs(10), || warnings() == 1).await,
        "expected the first uncountable record warned about:\n{}",
        proc.output()
    );
    tokio::time::sleep(WATCHES).await;
    assert_eq!(warnings(), 1, "expected one warning while the record stays");

    set(record(version + 1, PLANTED, PLANTED_REFRESH)).await;
    assert!(
        eventually(Duration::from_secs(10), || adoptions() == 1).await,
        "expected the operator's corrected record adopted (setup):\n{}",
        proc.output()
    );
    set(uncountable).await;
    assert!(
        eventually(Duration::from_secs(10), || warnings() == 2).await,
        "expected the same bad record, written again after a good one was adopted, warned \
         about as a new incident, saw {} warning(s):\n{}",
        warnings(),
        proc.output()
    );
    set(record(u64::MAX, "planted-hv-2", "planted-hv-refresh-2")).await;
    assert!(
        eventually(Duration::from_secs(10), || warnings() == 3).await,
        "expected a different bad record warned about at once, saw {} warning(s)",
        warnings()
    );
    tokio::time::sleep(WATCHES).await;
    assert_eq!(warnings(), 3, "expected one warning while the record stays");
    drop(proc);
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
