//! The drop-in suite: the calls the API's public clients make (a JavaScript client of about
//! sixty methods, a Singer tap, two PHP clients; written out here from what they are known
//! to send, not copied), replayed through a gateway running the shipped route table against
//! the simulator. Each answer must have the shape the client reads, lists are followed by
//! their `next_url` as the clients do, writes must show in later reads through the cache,
//! and nothing may reach a client that the API would not send (the upstream's host, any
//! token, the upstream's own rate-limit fields).

mod common;

use std::path::Path;

use cxgate::sim::SimOptions;
use http::Method;
use serde_json::Value;

use common::{Answer, Env, ACCESS, BIG_BUDGET, KEY, REFRESH};

/// The `[[routes]]` of `config/cxgate.toml`, as shipped.
fn shipped_routes() -> String {
    routes_of("config/cxgate.toml")
}

/// The `[[routes]]` of a shipped config file.
fn routes_of(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let text = std::fs::read_to_string(&path).expect("read the shipped config");
    let at = text
        .find("[[routes]]")
        .expect("the shipped config has routes");
    text[at..].to_string()
}

/// What the API would never send a client of the gateway.
fn assert_clean(env: &Env, a: &Answer, what: &str) {
    let body = String::from_utf8_lossy(&a.body);
    let sim_host = env.sim.base_url();
    for secret in [ACCESS, REFRESH, KEY, sim_host.as_str(), "access_token="] {
        assert!(
            !body.contains(secret),
            "{what}: expected no {secret:?} in the body, saw {body}"
        );
    }
    for (name, value) in &a.headers {
        let value = value.to_str().unwrap_or("");
        assert!(
            !value.contains(ACCESS) && !value.contains(&sim_host),
            "{what}: expected no token or upstream host in {name}: {value}"
        );
    }
}

/// One client call: method, path with query, form body, and the JSON pointers of the
/// fields the client reads in the answer's `response`.
struct Replay {
    method: Method,
    path: &'static str,
    form: &'static str,
    reads: &'static [&'static str],
}

const fn get(path: &'static str, reads: &'static [&'static str]) -> Replay {
    Replay {
        method: Method::GET,
        path,
        form: "",
        reads,
    }
}

fn replays() -> Vec<Replay> {
    let post = |path, form, reads| Replay {
        method: Method::POST,
        path,
        form,
        reads,
    };
    vec![
        get("/me", &["/id", "/name"]),
        get(
            "/me/accounts",
            &["/data/0/projects/0/topics/0/id", "/paging"],
        ),
        get("/me/permissions", &[""]),
        get("/me/connectedprofiles", &["/data", "/paging"]),
        get("/12345/settings/topics", &["/data/0/id"]),
        get("/12345/settings/users", &["/data/0/email"]),
        get("/12345/settings/tags", &["/data/0/name"]),
        get("/12345/settings/teams", &["/data/0/members"]),
        get("/12345/settings/userroles", &["/data/0/name"]),
        get("/12345/settings/canned_responses", &["/data/0/id"]),
        get("/12345/settings/canned_responses_folders", &["/data/0/id"]),
        get("/12345/settings/customattributes", &["/data/0/id"]),
        get("/12345/settings/profilegroups", &["/data/0/id"]),
        get("/12345/settings/publishing_guidelines", &["/data"]),
        get("/12345/settings/businesshoursschedules", &["/data"]),
        get("/12345/settings/history", &["/data"]),
        get(
            "/12345/inbox/mentions?limit=100&sort=dateadd:desc&date_from=2020-01-01T00:00:00Z",
            &[
                "/data/0/id",
                "/data/0/actions",
                "/data/0/timestamps",
                "/data/0/message/sentiment",
                "/data/0/assignment/user_ids",
                "/data/0/source/category",
                "/data/0/original_author",
                "/data/0/action_links/0/http_method",
                "/paging/next_url",
            ],
        ),
        get("/12345/inbox/contacts?limit=50", &["/data/0/id", "/paging"]),
        get("/12345/inbox/contact/twitter/7", &["/id"]),
        get("/12345/inbox/contact/9", &["/id"]),
        get("/12345/inbox/mailboxes", &["/data"]),
        get("/12345/inbox/cases", &["/data"]),
        get("/12345/publisher/add", &["/services", "/statuses"]),
        get("/12345/publisher/mentions", &["/data"]),
        get(
            "/12345/insights/facets?facetdefinitions=%5B%7B%22name%22%3A%22sentiment%22%7D%5D&topic_ids=123451",
            &["/0/keys/0/name", "/0/data/0/1"],
        ),
        post(
            "/12345/insights/facets",
            "facetdefinitions=%5B%7B%22name%22%3A%22service%22%7D%5D&topic_ids=123451&date_from=2025-12-01T00:00:00Z",
            &["/0/keys", "/0/data"],
        ),
        get("/12345/settings/team/12345001", &["/id", "/name", "/members"]),
        get("/12345/settings/user/1234501", &["/id", "/email"]),
        get("/12345/crisis/plans?active_only=1", &[""]),
        get("/12345/crisis/plans", &["/0/id", "/0/active", "/0/todos/0/done"]),
        get(
            "/12345/security/audit?events=login_success,logout&limit=20",
            &["/data/0/event", "/data/0/user_id", "/data/0/date", "/paging"],
        ),
        get("/12345/settings/history?limit=20", &["/data"]),
        get("/12345/dashboards/component?id=1", &["/data"]),
        get("/12345/tools/sentiment?text=hi", &["/data"]),
        get("/12345/filter/suggestions", &["/data"]),
        post(
            "/12345/publisher/add",
            "type=post&services=1&message=hello&status=draft",
            &["/id", "/status"],
        ),
        post(
            "/12345/inbox/add",
            "mentions=%5B%7B%22message%22%3A%22one%22%7D%2C%7B%22message%22%3A%22two%22%7D%5D",
            &[""],
        ),
    ]
}

fn pointer<'a>(v: &'a Value, p: &str) -> Option<&'a Value> {
    if p.is_empty() {
        Some(v)
    } else {
        v.pointer(p)
    }
}

#[tokio::test]
async fn the_public_clients_calls_work_through_the_gateway_unchanged() {
    let env = common::start(
        SimOptions::default(),
        &format!("{BIG_BUDGET}{}", shipped_routes()),
    )
    .await;
    let auth = format!("Bearer {KEY}");
    let mut replayed = 0;
    for r in replays() {
        let what = format!("{} {}", r.method, r.path);
        let a = env
            .send(
                r.method.clone(),
                &env.url(r.path),
                &[
                    ("authorization", &auth),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                r.form,
            )
            .await;
        replayed += 1;
        assert_eq!(a.status, 200, "{what}: expected 200, saw {a:?}");
        assert_clean(&env, &a, &what);
        let body = a.json();
        assert_eq!(body["meta"]["code"], 200, "{what}: expected the envelope");
        for p in r.reads {
            assert!(
                pointer(&body["response"], p).is_some(),
                "{what}: the client reads response{p}, missing in {body}"
            );
        }
        assert!(
            !a.header("x-ratelimit-remaining").is_empty(),
            "{what}: expected the API's rate-limit fields for the client"
        );
    }
    println!("drop-in: {replayed} public-client calls replayed, all as expected");
    env.stop().await;
}

/// Paging as the clients do it: take `next_url` as given (absolute) and call it with the
/// same credential until it runs out; every link points at the gateway and carries no token.
#[tokio::test]
async fn paging_links_are_followed_through_the_gateway() {
    let env = common::start(
        SimOptions::default(),
        &format!("{BIG_BUDGET}{}", shipped_routes()),
    )
    .await;
    let auth = format!("Bearer {KEY}");
    let mut url = env.url("/12345/inbox/mentions?limit=100");
    let (mut pages, mut items) = (0, 0);
    loop {
        let a = env
            .send(Method::GET, &url, &[("authorization", &auth)], "")
            .await;
        assert_eq!(a.status, 200, "page {pages}: expected 200, saw {a:?}");
        assert_clean(&env, &a, &format!("page {pages}"));
        let body = a.json();
        items += body["response"]["data"].as_array().map_or(0, Vec::len);
        pages += 1;
        match body["response"]["paging"]["next_url"].as_str() {
            Some(next) if !next.is_empty() && pages < 50 => {
                assert!(
                    next.starts_with(&env.url("/")),
                    "expected next_url on the gateway, saw {next}"
                );
                url = next.to_string();
            }
            _ => break,
        }
    }
    assert!(pages > 1, "expected more than one page, saw {pages}");
    println!("drop-in paging: {pages} pages, {items} mentions");
    env.stop().await;
}

/// Writes through the shipped routes invalidate what they change: a contact written by its
/// own id shows in the cached service-keyed read, a deleted mention is gone from its cached
/// read, a queued draft shows in the cached draft list.
#[tokio::test]
async fn writes_invalidate_what_they_change() {
    let env = common::start(
        SimOptions::default(),
        &format!("{BIG_BUDGET}{}", shipped_routes()),
    )
    .await;
    let auth = format!("Bearer {KEY}");
    let send = |m: Method, path: &'static str, form: &'static str| {
        let (env, auth) = (&env, &auth);
        async move {
            env.send(
                m,
                &env.url(path),
                &[
                    ("authorization", auth),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                form,
            )
            .await
        }
    };
    let profile = "/12345/inbox/contact/twitter/7";
    send(Method::GET, profile, "").await;
    let hit = send(Method::GET, profile, "").await;
    assert!(
        hit.header("cache-status").contains("hit"),
        "expected a cached contact"
    );
    let wrote = send(
        Method::POST,
        "/12345/inbox/contact/7",
        "updates=%7B%22email%22%3A%22new%40example.com%22%7D",
    )
    .await;
    assert_eq!(
        wrote.status, 200,
        "expected the write by contact id, saw {wrote:?}"
    );
    let after = send(Method::GET, profile, "").await;
    assert!(
        String::from_utf8_lossy(&after.body).contains("new@example.com"),
        "expected the service-keyed read to show the write by id, saw {} {:?}",
        after.header("cache-status"),
        String::from_utf8_lossy(&after.body)
    );

    let mention = "/12345/inbox/mention/123451/12345000001";
    assert_eq!(
        send(Method::GET, mention, "").await.status,
        200,
        "a mention"
    );
    let deleted = send(Method::DELETE, mention, "").await;
    assert_eq!(deleted.status, 200, "expected the delete, saw {deleted:?}");
    let gone = send(Method::GET, mention, "").await;
    assert_eq!(
        gone.status, 404,
        "expected the deleted mention gone, saw {gone:?}"
    );

    let drafts = "/12345/publisher/mentions";
    let before = send(Method::GET, drafts, "").await.json();
    let queued = send(
        Method::POST,
        "/12345/publisher/add",
        "message=hi&status=draft",
    )
    .await;
    assert_eq!(queued.status, 200, "expected the draft queued");
    let listed = send(Method::GET, drafts, "").await.json();
    assert_eq!(
        listed["response"]["data"].as_array().map(Vec::len),
        before["response"]["data"].as_array().map(|d| d.len() + 1),
        "expected the new draft in the list, saw {listed}"
    );
    env.stop().await;
}

/// Percent-encodes a form value (JSON fields of the clients' writes).
fn enc(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// A gateway over the shipped routes and a way to call it as a client with a key does.
struct Client {
    env: Env,
    auth: String,
}

impl Client {
    async fn start() -> Client {
        Client::over(shipped_routes()).await
    }

    async fn over(routes: String) -> Client {
        let env = common::start(SimOptions::default(), &format!("{BIG_BUDGET}{routes}")).await;
        Client {
            env,
            auth: format!("Bearer {KEY}"),
        }
    }

    async fn call(&self, method: Method, path: &str, form: &str) -> Answer {
        let a = self
            .env
            .send(
                method.clone(),
                &self.env.url(path),
                &[
                    ("authorization", &self.auth),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                form,
            )
            .await;
        assert_clean(&self.env, &a, &format!("{method} {path}"));
        a
    }

    /// A read answered 200, twice: the second must come from the cache, so a later read
    /// that shows a write proves the write's invalidation, not a cache that never held.
    async fn cached(&self, path: &str) -> Value {
        let first = self.call(Method::GET, path, "").await;
        assert_eq!(first.status, 200, "GET {path}: expected 200, saw {first:?}");
        let again = self.call(Method::GET, path, "").await;
        assert!(
            again.header("cache-status").contains("hit"),
            "GET {path}: expected a cache hit, saw {:?}",
            again.header("cache-status")
        );
        again.json()["response"].clone()
    }

    async fn read(&self, path: &str) -> Value {
        let a = self.call(Method::GET, path, "").await;
        assert_eq!(a.status, 200, "GET {path}: expected 200, saw {a:?}");
        a.json()["response"].clone()
    }

    async fn write(&self, method: Method, path: &str, form: &str) -> Value {
        let a = self.call(method.clone(), path, form).await;
        assert_eq!(a.status, 200, "{method} {path}: expected 200, saw {a:?}");
        a.json()["response"].clone()
    }
}

/// The demo's route table, too, drops what each write the public clients make changes: a
/// contact written by its own id, a mention deleted, a message added, a team created.
#[tokio::test]
async fn the_demo_routes_invalidate_what_writes_change() {
    for file in ["config/demo.toml", "config/cxgate.toml"] {
        let c = Client::over(routes_of(file)).await;
        let profile = "/12345/inbox/contact/twitter/42";
        c.cached(profile).await;
        let crm = enc(r#"{"crm":{"company":"X"}}"#);
        c.write(
            Method::POST,
            "/12345/inbox/contact/twitter_42",
            &format!("updates={crm}"),
        )
        .await;
        let after = c.read(profile).await;
        assert_eq!(
            after["crm"]["company"], "X",
            "{file}: expected the write by contact id in the profile read, saw {after}"
        );
        let by_id = "/12345/inbox/contact/twitter_42";
        c.cached(by_id).await;
        let crm = enc(r#"{"crm":{"company":"Y"}}"#);
        c.write(Method::POST, profile, &format!("updates={crm}"))
            .await;
        let after = c.read(by_id).await;
        assert_eq!(
            after["crm"]["company"], "Y",
            "{file}: expected the write by profile in the id read, saw {after}"
        );

        let list = "/12345/inbox/mentions?limit=5";
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect()
        };
        let first = c.cached(list).await;
        let victim = first["data"][0].clone();
        let path = format!(
            "/12345/inbox/mention/{}/{}",
            victim["topic"]["id"]
                .as_u64()
                .or(victim["topic_id"].as_u64())
                .expect("topic"),
            victim["id"].as_str().expect("id")
        );
        c.write(Method::DELETE, &path, "").await;
        let after = ids(&c.read(list).await);
        assert!(
            !after.contains(&victim["id"].as_str().unwrap_or("").to_string()),
            "{file}: expected {path} gone from the list, saw {after:?}"
        );

        c.cached(list).await;
        let added = enc(r#"[{"message":"fresh words"}]"#);
        c.write(
            Method::POST,
            "/12345/inbox/add",
            &format!("mentions={added}"),
        )
        .await;
        let listed = c.read(list).await;
        assert!(
            listed.to_string().contains("fresh words"),
            "{file}: expected the added message listed, saw {listed}"
        );

        let teams = "/12345/settings/teams";
        c.cached(teams).await;
        let team = enc(r#"{"name":"Night shift"}"#);
        c.write(Method::POST, teams, &format!("team={team}")).await;
        let after = c.read(teams).await;
        assert!(
            names(&after).contains(&"Night shift".to_string()),
            "{file}: expected the new team listed, saw {after}"
        );
        c.env.stop().await;
    }
}

fn names(list: &Value) -> Vec<String> {
    list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect()
}

/// Settings writes the JavaScript client makes (a team added, renamed and deleted, a user
/// updated) change what later settings reads return through the cache, and each lands in
/// the settings history and the security audit log as a `settings_edited` event.
#[tokio::test]
async fn settings_writes_change_later_reads_and_the_logs() {
    let c = Client::start().await;
    let teams = "/12345/settings/teams";
    let before = c.cached(teams).await;
    let audit = "/12345/security/audit?events=settings_edited&limit=200";
    let edited_before = c.cached(audit).await["count"].as_u64().expect("a count");
    let history_before = c.cached("/12345/settings/history").await["count"]
        .as_u64()
        .expect("a count");

    let made = c
        .write(
            Method::POST,
            teams,
            &format!(
                "team={}",
                enc(r#"{"name":"Night shift","members":[1234502]}"#)
            ),
        )
        .await;
    let id = made["id"].as_u64().expect("the new team's id");
    assert_eq!(
        made["name"], "Night shift",
        "expected the team back, saw {made}"
    );
    let after = c.read(teams).await;
    assert!(
        names(&after).contains(&"Night shift".to_string()),
        "expected the new team listed, saw {after}"
    );
    assert_eq!(after["count"], before["count"].as_u64().expect("count") + 1);

    let team = format!("/12345/settings/team/{id}");
    assert_eq!(c.cached(&team).await["name"], "Night shift");
    let renamed = c
        .write(
            Method::POST,
            &team,
            &format!("updates={}", enc(r#"{"name":"Late shift"}"#)),
        )
        .await;
    assert_eq!(
        renamed["name"], "Late shift",
        "expected the updated team, saw {renamed}"
    );
    assert_eq!(c.read(&team).await["name"], "Late shift");
    assert!(names(&c.cached(teams).await).contains(&"Late shift".to_string()));

    assert_eq!(c.write(Method::DELETE, &team, "").await, true);
    let gone = c.call(Method::GET, &team, "").await;
    assert_eq!(
        gone.status, 404,
        "expected the deleted team gone, saw {gone:?}"
    );
    assert_eq!(gone.json()["error"], "not_found");
    let listed = c.read(teams).await;
    assert_eq!(
        listed["count"], before["count"],
        "expected the list as before, saw {listed}"
    );

    let users = "/12345/settings/users";
    c.cached(users).await;
    c.write(
        Method::POST,
        "/12345/settings/user/1234502",
        &format!("updates={}", enc(r#"{"email":"night@example.com"}"#)),
    )
    .await;
    let users_after = c.read(users).await;
    assert!(
        users_after.to_string().contains("night@example.com"),
        "expected the user's new email in the user list, saw {users_after}"
    );

    let bad = c
        .call(Method::POST, teams, &format!("team={}", enc("[1]")))
        .await;
    assert_eq!(
        bad.status, 400,
        "expected a malformed team refused, saw {bad:?}"
    );
    assert_eq!(bad.json()["error"], "invalid_request");

    // Four writes: created, updated, deleted, a user updated.
    let edited = c.read(audit).await;
    assert_eq!(
        edited["count"].as_u64(),
        Some(edited_before + 4),
        "expected four more settings_edited events, saw {edited}"
    );
    assert!(edited["data"]
        .as_array()
        .expect("items")
        .iter()
        .all(|e| e["event"] == "settings_edited"));
    let history = c.read("/12345/settings/history").await;
    assert_eq!(history["count"].as_u64(), Some(history_before + 4));
    assert_eq!(
        history["data"][0]["action"], "updated",
        "newest first: {history}"
    );
    let unknown = c
        .call(Method::GET, "/12345/security/audit?events=coffee", "")
        .await;
    assert_eq!(unknown.status, 400, "expected an unknown event refused");
    c.env.stop().await;
}

/// The crisis calls: the plans (all, or `active_only=1`), a plan switched on by
/// `crisis/event` and a to-do item marked by `crisis/todo`, each answering the plan, and
/// the cached plan lists showing both.
#[tokio::test]
async fn crisis_plans_change_with_their_events_and_todos() {
    let c = Client::start().await;
    let active = "/12345/crisis/plans?active_only=1";
    let all = "/12345/crisis/plans";
    assert_eq!(c.cached(active).await, serde_json::json!([]));
    let plans = c.cached(all).await;
    let plan = plans[0]["id"].as_u64().expect("a plan id");
    let todo = plans[0]["todos"][0]["id"].as_u64().expect("a to-do id");

    let on = c
        .write(
            Method::POST,
            "/12345/crisis/event",
            &format!("id={plan}&activate=true&crisis_name=Outage"),
        )
        .await;
    assert_eq!(
        (&on["id"], &on["active"], &on["crisis_name"]),
        (&plan.into(), &true.into(), &"Outage".into()),
        "expected the plan switched on, saw {on}"
    );
    let now_active = c.read(active).await;
    assert_eq!(
        now_active.as_array().map(Vec::len),
        Some(1),
        "expected one active plan, saw {now_active}"
    );
    let marked = c
        .write(
            Method::POST,
            "/12345/crisis/todo",
            &format!("plan_id={plan}&todo_id={todo}&done=1"),
        )
        .await;
    assert_eq!(marked["todos"][0]["done"], true, "saw {marked}");
    assert_eq!(c.read(all).await[0]["todos"][0]["done"], true);
    let off = c
        .write(
            Method::POST,
            "/12345/crisis/event",
            &format!("id={plan}&activate=0"),
        )
        .await;
    assert_eq!(
        (&off["active"], &off["crisis_name"]),
        (&false.into(), &Value::Null)
    );
    assert_eq!(c.read(active).await, serde_json::json!([]));

    let unknown = c
        .call(Method::POST, "/12345/crisis/event", "id=999&activate=1")
        .await;
    assert_eq!(
        unknown.status, 404,
        "expected an unknown plan refused, saw {unknown:?}"
    );
    let bad = c
        .call(
            Method::POST,
            "/12345/crisis/event",
            &format!("id={plan}&activate=maybe"),
        )
        .await;
    assert_eq!(bad.status, 400, "expected a bad flag refused, saw {bad:?}");
    c.env.stop().await;
}

/// Insights facets, by GET and by POST: one facet item per definition, counting exactly
/// the mentions `inbox/mentions` lists for the same topics and dates, so narrowing the
/// parameters narrows the counts.
#[tokio::test]
async fn facets_count_the_mentions_their_parameters_select() {
    let c = Client::start().await;
    let defs = enc(r#"[{"name":"sentiment"},{"name":"service"}]"#);
    let total = |facet: &Value| -> u64 {
        facet["data"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|row| row[1].as_u64().expect("a count"))
            .sum()
    };
    let listed = |topics: &str, from: &str| {
        let c = &c;
        let path = format!("/12345/inbox/mentions?limit=1&topic_ids={topics}&date_from={from}");
        async move { c.read(&path).await["count"].as_u64().expect("a count") }
    };
    let from_all = "2000-01-01T00:00:00Z";
    let from_late = "2025-12-30T00:00:00Z";
    let mut seen = Vec::new();
    for (topics, from) in [
        ("123451", from_all),
        ("123451,123452", from_all),
        ("123451", from_late),
    ] {
        let path = format!(
            "/12345/insights/facets?facetdefinitions={defs}&topic_ids={topics}&date_from={from}"
        );
        let facets = c.read(&path).await;
        let items = facets.as_array().expect("an array of facet items");
        assert_eq!(
            items.len(),
            2,
            "expected one item per definition, saw {facets}"
        );
        assert_eq!(items[0]["keys"][0]["name"], "sentiment");
        assert_eq!(items[1]["keys"][0]["name"], "service");
        let want = listed(topics, from).await;
        assert_eq!(
            (total(&items[0]), total(&items[1])),
            (want, want),
            "topics {topics} from {from}: expected the facets to count the {want} mentions listed"
        );
        let posted = c
            .write(
                Method::POST,
                "/12345/insights/facets",
                &format!("facetdefinitions={defs}&topic_ids={topics}&date_from={from}"),
            )
            .await;
        assert_eq!(posted, facets, "expected POST and GET to agree");
        seen.push(want);
    }
    assert!(
        seen[1] > seen[0] && seen[2] < seen[0] && seen[2] > 0,
        "expected more topics to count more and a later date_from fewer, saw {seen:?}"
    );
    let missing = c
        .call(
            Method::GET,
            &format!("/12345/insights/facets?facetdefinitions={defs}"),
            "",
        )
        .await;
    assert_eq!(
        missing.status, 400,
        "expected topic_ids required, saw {missing:?}"
    );
    let bare = c
        .call(
            Method::GET,
            "/12345/insights/facets?facetdefinitions=sentiment&topic_ids=123451",
            "",
        )
        .await;
    assert_eq!(
        bare.status, 400,
        "expected a bare name refused, saw {bare:?}"
    );
    c.env.stop().await;
}

/// Makes a test CA and a leaf for `localhost` and 127.0.0.1 that it signed, in `dir`, with
/// the `openssl` command line; `None` (the test skips) when there is no `openssl`.
fn make_test_ca(dir: &Path) -> Option<()> {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(()),
            Ok(out) => panic!(
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(_) => None,
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec![
        "req",
        "-x509",
        "-days",
        "1",
        "-subj",
        "/CN=cxgate drop-in test CA",
    ];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    run(&ca)?;
    let mut csr = vec!["req", "-new", "-subj", "/CN=localhost"];
    csr.extend(ec);
    csr.extend(["-keyout", "key.pem", "-out", "leaf.csr"]);
    run(&csr)?;
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("write the leaf's extensions");
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "leaf.ext",
        "-out",
        "cert.pem",
    ])
}

/// One https GET to the gateway, trusting only `ca`, as a client that knows nothing but
/// https does it: the URL must be absolute and https, and its host is the gateway's name.
async fn https_get(
    ca: &Path,
    addr: std::net::SocketAddr,
    upstream: &str,
    url: &str,
) -> (u16, Value) {
    use http_body_util::{BodyExt, Empty};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let rest = url
        .strip_prefix("https://")
        .unwrap_or_else(|| panic!("an https-only client cannot follow {url:?}"));
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.split(':').next().unwrap_or(authority);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the test CA") {
        roots
            .add(cert.expect("parse the test CA"))
            .expect("add the test CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(
            ServerName::try_from(host.to_string()).expect("a server name"),
            tcp,
        )
        .await
        .expect("TLS handshake with the gateway, trusting only the test CA");
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .expect("http/1.1 over TLS");
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::AUTHORIZATION, format!("Bearer {KEY}"))
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.expect("an answer");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    for secret in [ACCESS, REFRESH, "access_token=", upstream] {
        assert!(
            !text.contains(secret),
            "{url}: expected no {secret:?} in the body, saw {text}"
        );
    }
    (
        status,
        serde_json::from_slice(&body).expect("a JSON answer"),
    )
}

/// The https-only client (a Singer tap: it treats any link not starting with `https://` as
/// relative) replayed through the TLS listener with an https `public_base_url`: its
/// accounts, then every page of mentions and contacts by following `next_url`, which must
/// come back as https links to the gateway's own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_only_client_pages_through_the_tls_listener() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = common::temp_dir("dropin-tls");
    if make_test_ca(&dir).is_none() {
        eprintln!("skipping the https-only client: no openssl to make a test CA");
        return;
    }
    std::env::set_var(common::SECRET_ENV, common::CLIENT_SECRET);
    let sim = common::spawn_sim(SimOptions {
        access_tokens: vec![ACCESS.to_string()],
        refresh_tokens: vec![REFRESH.to_string()],
        client_secret: common::CLIENT_SECRET.to_string(),
        ..SimOptions::default()
    })
    .await;
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(
        &token_file,
        ACCESS,
        REFRESH,
        std::time::Duration::from_secs(3600),
    )
    .expect("token file");
    let port = common::free_port();
    let gateway = format!("https://localhost:{port}");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:0\"\n\
         public_base_url = \"{gateway}\"\nrequest_timeout = \"5s\"\nshutdown_grace = \"1s\"\n\
         [server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\
         [upstream]\nbase_url = \"{}\"\nconnect_timeout = \"1s\"\ntimeout = \"2s\"\n\
         [token]\nfile = \"{}\"\n{BIG_BUDGET}\n{}\n{}\n",
        dir.join("cert.pem").display(),
        dir.join("key.pem").display(),
        sim.base_url(),
        token_file.display(),
        common::client_toml("tap", KEY, "scopes = [\"read\"]"),
        shipped_routes(),
    );
    let path = dir.join("cxgate.toml");
    std::fs::write(&path, &text).expect("write config");
    let cfg = cxgate::config::load(&path)
        .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}\n{text}", e.lines()));
    let gw = cxgate::start(cfg, Some(path), cxgate::Options::default())
        .await
        .expect("gateway starts");
    let ca = dir.join("ca.pem");
    let upstream = sim.base_url();

    let (status, accounts) =
        https_get(&ca, gw.addr, &upstream, &format!("{gateway}/me/accounts")).await;
    assert_eq!(status, 200, "expected the accounts, saw {accounts}");
    let topic = accounts["response"]["data"][0]["projects"][0]["topics"][0]["id"]
        .as_u64()
        .expect("a topic id, as the tap reads it");
    let (mut calls, mut pages) = (1, 0);
    for start in [
        format!(
            "{gateway}/12345/inbox/mentions?topic_ids={topic}&limit=100&date_from=2025-12-01T00:00:00Z&sort=dateadd:asc"
        ),
        format!("{gateway}/12345/inbox/contacts?limit=50"),
    ] {
        let mut url = start;
        let mut items = 0;
        loop {
            let (status, body) = https_get(&ca, gw.addr, &upstream, &url).await;
            calls += 1;
            assert_eq!(status, 200, "{url}: expected 200, saw {body}");
            items += body["response"]["data"].as_array().map_or(0, Vec::len);
            pages += 1;
            match body["response"]["paging"]["next_url"].as_str() {
                Some(next) if !next.is_empty() && pages < 60 => {
                    assert!(
                        next.starts_with(&format!("{gateway}/")),
                        "expected an https link to the gateway, saw {next}"
                    );
                    url = next.to_string();
                }
                _ => break,
            }
        }
        assert!(items > 100, "{url}: expected more than one page of items, saw {items}");
    }
    println!("drop-in https-only client: {calls} calls over TLS, {pages} pages followed");
    gw.shutdown();
    gw.stopped().await;
    sim.shutdown().await;
    let _ = std::fs::remove_dir_all(dir);
}
