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
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml");
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
            "/12345/insights/facets?facetdefinitions=sentiment",
            &["/0/keys/0/name", "/0/data"],
        ),
        post(
            "/12345/insights/facets",
            "facetdefinitions=sentiment&topic_ids=123451",
            &["/0/keys", "/0/data"],
        ),
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
