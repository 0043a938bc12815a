//! The CX Social endpoints: which path is which endpoint, and the answer of each once the
//! caller is authenticated and within its rate limit.
//!
//! Invariants: a trailing slash never changes the endpoint; ids are bounded so derived ids
//! cannot overflow; a write is stored before its answer is built, so the answer and every
//! later read show it.

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::data;
use super::extra::{self, Extra};
use super::page::{paged, paged_list, Call, Page};
use super::reply::{self, Reply};
use super::stats::Counter;
use super::Sim;

/// Largest account or topic id accepted; keeps derived ids (`account * 1000`) in range.
const MAX_ID: u64 = 999_999_999_999;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Endpoint {
    Me,
    Accounts,
    Permissions,
    ConnectedProfiles,
    Settings(u64, String),
    Mentions(u64),
    Mention(u64, u64, String),
    InboxAdd(u64),
    Contact(u64, String, String),
    PublisherAdd(u64),
    Insights(u64, String),
    Extra(u64, Extra),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    Token,
    Api(Endpoint),
    NotFound,
    BadRequest(&'static str),
    WrongMethod(&'static str),
}

fn id(segment: &str) -> Option<u64> {
    segment
        .parse::<u64>()
        .ok()
        .filter(|n| (1..=MAX_ID).contains(n))
}

/// Names the endpoint of a request, or why there is none.
pub(crate) fn classify(method: &Method, path: &str) -> Route {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    let segs: Vec<&str> = trimmed.split('/').skip(1).collect();
    if segs.iter().any(|s| s.is_empty()) {
        return Route::NotFound;
    }
    let (allow, endpoint) = match segs.as_slice() {
        ["oauth", "access_token"] => {
            return match *method {
                Method::GET | Method::POST => Route::Token,
                _ => Route::WrongMethod("GET, POST"),
            }
        }
        ["me"] => ("GET", Endpoint::Me),
        ["me", "accounts"] => ("GET", Endpoint::Accounts),
        ["me", "permissions"] => ("GET", Endpoint::Permissions),
        ["me", "connectedprofiles"] => ("GET", Endpoint::ConnectedProfiles),
        [account, rest @ ..] => {
            // 0 is never a valid id, so it marks an unreadable account until the shape is known.
            let account = id(account).unwrap_or(0);
            let Some(found) = account_endpoint(account, rest) else {
                return Route::NotFound;
            };
            if account == 0 {
                return Route::BadRequest("the account id must be a positive number");
            }
            match found {
                Ok(found) => found,
                Err(message) => return Route::BadRequest(message),
            }
        }
        [] => return Route::NotFound,
    };
    let method_ok = allow
        .split(", ")
        .any(|m| m == method.as_str() || (m == "GET" && *method == Method::HEAD));
    if method_ok {
        Route::Api(endpoint)
    } else {
        Route::WrongMethod(allow)
    }
}

/// The endpoint below `/{account_id}`: `None` when no endpoint has this shape, an error
/// when one has but a nested id is unreadable.
fn account_endpoint(
    account: u64,
    rest: &[&str],
) -> Option<Result<(&'static str, Endpoint), &'static str>> {
    if let Some((allow, found)) = extra::classify(rest) {
        return Some(Ok((allow, Endpoint::Extra(account, found))));
    }
    let found = match rest {
        ["settings", kind @ ("topics"
        | "users"
        | "tags"
        | "teams"
        | "userroles"
        | "canned_responses"
        | "canned_responses_folders"
        | "customattributes"
        | "profilegroups"
        | "publishing_guidelines"
        | "businesshoursschedules"
        | "history")] => ("GET", Endpoint::Settings(account, kind.to_string())),
        ["inbox", "mentions"] => ("GET", Endpoint::Mentions(account)),
        ["inbox", "mention", topic, mention] => {
            let Some(topic) = id(topic) else {
                return Some(Err("the topic id must be a positive number"));
            };
            (
                "GET, POST, DELETE",
                Endpoint::Mention(account, topic, mention.to_string()),
            )
        }
        ["inbox", "add"] => ("POST", Endpoint::InboxAdd(account)),
        ["inbox", "contact", service, sid] => (
            "GET, POST",
            Endpoint::Contact(account, service.to_string(), sid.to_string()),
        ),
        ["publisher", "add"] => ("GET, POST", Endpoint::PublisherAdd(account)),
        ["insights", metric @ ..] if !metric.is_empty() => {
            ("GET", Endpoint::Insights(account, metric.join("/")))
        }
        _ => return None,
    };
    Some(Ok(found))
}

impl Endpoint {
    /// The account the endpoint lies under, if any.
    fn account(&self) -> Option<u64> {
        match self {
            Endpoint::Me
            | Endpoint::Accounts
            | Endpoint::Permissions
            | Endpoint::ConnectedProfiles => None,
            Endpoint::Settings(a, _)
            | Endpoint::Mentions(a)
            | Endpoint::Mention(a, _, _)
            | Endpoint::InboxAdd(a)
            | Endpoint::Contact(a, _, _)
            | Endpoint::PublisherAdd(a)
            | Endpoint::Insights(a, _)
            | Endpoint::Extra(a, _) => Some(*a),
        }
    }

    /// The topic the endpoint's path names, if any.
    fn topic(&self) -> Option<u64> {
        match self {
            Endpoint::Mention(_, topic, _) => Some(*topic),
            Endpoint::Extra(_, Extra::Context(topic, _)) => Some(*topic),
            _ => None,
        }
    }
}

fn bad(message: &str) -> Reply {
    reply::error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn not_found(what: &str) -> Reply {
    reply::error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no such {what}"),
    )
}

/// A 404 for an account the sim user does not have, or a topic (in the path, `topic_ids`
/// or `topic_id`) that is not one of the account's: the API answers those, it never
/// invents data for them.
fn unknown_ids(endpoint: &Endpoint, call: &Call<'_>) -> Option<Reply> {
    let account = endpoint.account()?;
    if !data::known_account(account) {
        return Some(not_found("account"));
    }
    let listed = ["topic_ids", "topic_id"]
        .into_iter()
        .filter_map(|name| call.param(name))
        .flat_map(|t| t.split(','))
        .filter_map(|t| t.trim().parse::<u64>().ok());
    let mut topics = endpoint.topic().into_iter().chain(listed);
    topics
        .any(|t| !data::known_topic(account, t))
        .then(|| not_found("topic"))
}

/// Answers an authenticated, admitted API call.
pub(crate) async fn serve(
    sim: &Sim,
    endpoint: Endpoint,
    method: &Method,
    call: &Call<'_>,
) -> Reply {
    if let Some(refused) = unknown_ids(&endpoint, call) {
        return refused;
    }
    let post = *method == Method::POST;
    let list = |items: Vec<Value>| match Page::parse(call) {
        Ok(page) => reply::ok(paged(call, page, items)),
        Err(message) => bad(&message),
    };
    match endpoint {
        Endpoint::Me => reply::ok(data::me()),
        Endpoint::Accounts => list(data::accounts()),
        Endpoint::Permissions => reply::ok(data::permissions()),
        Endpoint::ConnectedProfiles => list(data::connected_profiles()),
        Endpoint::Settings(account, kind) => {
            list(sim.settings.list(account, &kind).unwrap_or_default())
        }
        Endpoint::Mentions(account) => mentions(sim, account, call),
        Endpoint::Mention(account, topic, id) if post => {
            update_mention(sim, account, topic, id, call)
        }
        Endpoint::Mention(account, topic, id) if *method == Method::DELETE => {
            if mention(sim, call.base, account, topic, &id).is_none() {
                return reply::error(StatusCode::NOT_FOUND, "not_found", "no such mention");
            }
            sim.writes.delete_mention((account, topic, id));
            sim.stats.incr(Counter::Writes);
            reply::ok(json!(true))
        }
        Endpoint::Mention(account, topic, id) => match mention(sim, call.base, account, topic, &id)
        {
            Some(found) => reply::ok(found),
            None => reply::error(StatusCode::NOT_FOUND, "not_found", "no such mention"),
        },
        Endpoint::InboxAdd(account) => add_message(sim, account, call),
        Endpoint::Contact(account, service, sid) => contact(sim, account, service, sid, post, call),
        Endpoint::PublisherAdd(account) if post => publisher_add(sim, account, call),
        Endpoint::PublisherAdd(account) => {
            extra::serve(sim, account, Extra::PublisherOptions, method, call)
        }
        Endpoint::Extra(account, found) => {
            if found == Extra::Facets {
                tokio::time::sleep(sim.insights_latency()).await;
            }
            extra::serve(sim, account, found, method, call)
        }
        Endpoint::Insights(account, metric) => {
            tokio::time::sleep(sim.insights_latency()).await;
            let time = |name: &str| call.query_param(name).and_then(|t| t.parse::<u64>().ok());
            let to = time("date_to").unwrap_or(data::NEWEST);
            let from = time("date_from").unwrap_or(to.saturating_sub(7 * 86_400));
            reply::ok(data::insights(account, &metric, from, to))
        }
    }
}

/// A generated mention or one added through `inbox/add`, with stored updates applied.
/// Added messages live under their own `custom-N` ids, so an unknown one is a 404.
pub(crate) fn mention(sim: &Sim, base: &str, account: u64, topic: u64, id: &str) -> Option<Value> {
    let key = (account, topic, id.to_owned());
    if sim.writes.mention_deleted(&key) {
        return None;
    }
    let mut body = if id.starts_with("custom-") {
        sim.writes.added(&key)?
    } else {
        data::mention(base, account, topic, id)
    };
    sim.writes.overlay_mention(&key, &mut body);
    Some(body)
}

fn mentions(sim: &Sim, account: u64, call: &Call<'_>) -> Reply {
    let page = match Page::parse(call) {
        Ok(page) if page.limit > 100 => return bad("limit must be 1 to 100 for mentions"),
        Ok(page) => page,
        Err(message) => return bad(&message),
    };
    let topics: Option<Vec<u64>> = call
        .query_param("topic_ids")
        .filter(|t| !t.is_empty())
        .map(|t| t.split(',').filter_map(|n| n.trim().parse().ok()).collect());
    // Dates are honoured loosely: an unreadable bound is ignored, as a lenient API would.
    let time = |name: &str| call.query_param(name).and_then(extra::parse_time);
    let (from, to) = (time("date_from"), time("date_to"));
    let ascending = call.query_param("sort").is_some_and(|s| s.contains("asc"));
    let mut keys = listed(sim, account, topics.as_deref(), from, to);
    if !ascending {
        keys.reverse();
    }
    let total = keys.len() as u64;
    let items = keys[page.range(total)]
        .iter()
        .filter_map(|(topic, id)| mention(sim, call.base, account, *topic, id))
        .collect();
    reply::ok(paged_list(call, page, total, items))
}

/// The `(topic, id)` of the mentions an inbox list shows, oldest first: the generated
/// timeline, then the messages added through `inbox/add` (dated `NEWEST`, in the order they
/// were added), without the deleted ones, so offset paging never skips an item.
pub(crate) fn listed(
    sim: &Sim,
    account: u64,
    topics: Option<&[u64]>,
    from: Option<u64>,
    to: Option<u64>,
) -> Vec<(u64, String)> {
    let wanted = |topic: u64, when: u64| {
        topics.is_none_or(|t| t.contains(&topic))
            && from.is_none_or(|f| when >= f)
            && to.is_none_or(|t| when <= t)
    };
    let generated = (0..data::MENTIONS)
        .filter(|seq| wanted(data::topic_at(account, *seq), data::published_at(*seq)))
        .map(|seq| data::mention_at(account, seq));
    let added = sim
        .writes
        .added_to(account)
        .into_iter()
        .filter(|(topic, _)| wanted(*topic, data::NEWEST));
    generated
        .chain(added)
        .filter(|(topic, id)| !sim.writes.mention_deleted(&(account, *topic, id.clone())))
        .collect()
}

fn update_mention(sim: &Sim, account: u64, topic: u64, id: String, call: &Call<'_>) -> Reply {
    let Some(text) = call.param("updates") else {
        return bad("the form field updates is required");
    };
    let updates: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => return bad(&format!("updates is not JSON: {e}")),
    };
    if mention(sim, call.base, account, topic, &id).is_none() {
        return reply::error(StatusCode::NOT_FOUND, "not_found", "no such mention");
    }
    if let Err(message) = sim
        .writes
        .update_mention((account, topic, id.clone()), &updates)
    {
        return bad(&message);
    }
    sim.stats.incr(Counter::Writes);
    match mention(sim, call.base, account, topic, &id) {
        Some(updated) => reply::ok(updated),
        None => reply::error(StatusCode::NOT_FOUND, "not_found", "no such mention"),
    }
}

/// Fields of a write other than the credential, in order.
fn fields(call: &Call<'_>) -> Map<String, Value> {
    call.form
        .iter()
        .filter(|(k, _)| k != "access_token")
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

fn add_message(sim: &Sim, account: u64, call: &Call<'_>) -> Reply {
    if let Some(list) = call.param("mentions") {
        let first_topic = data::topic_ids(account)[0];
        return extra::add_many(sim, account, list, |m| {
            let topic = m["topic_id"]
                .as_u64()
                .or_else(|| m["topic_id"].as_str().and_then(|t| t.parse().ok()))
                .unwrap_or(first_topic);
            let content = m["message"].as_str().unwrap_or_default();
            (topic, added_body(topic, content, "custom", None))
        });
    }
    let Some(content) = call.param("message").filter(|m| !m.is_empty()) else {
        return bad("the form field message is required");
    };
    let topic = match call.param("topic_id") {
        None => data::topic_ids(account)[0],
        Some(t) => match id(t) {
            Some(t) => t,
            None => return bad("topic_id must be a positive number"),
        },
    };
    let service = call.param("service").unwrap_or("custom").to_owned();
    let author = call.param("author_name").map(str::to_owned);
    let added = sim.writes.add_message(account, topic, |id| {
        let mut body = added_body(topic, content, &service, author);
        body["id"] = json!(id);
        body["unique_id"] = json!(format!("{topic}_{id}"));
        body["source"]["id"] = json!(id);
        body
    });
    sim.stats.incr(Counter::Writes);
    reply::ok(added)
}

/// A message added through `inbox/add`, before it has an id.
fn added_body(topic: u64, content: &str, service: &str, author: Option<String>) -> Value {
    json!({
        "message": {"content": content, "language": null, "sentiment": "neutral"},
        "source": {"service": service, "id": null, "url": null, "category": "custom",
                   "type": "post", "domain": null},
        "topic": {"id": topic},
        "status": "new",
        "actions": [],
        "timestamps": {"added": data::NEWEST, "published": data::NEWEST},
        "date": {"added": data::NEWEST, "published": data::NEWEST},
        "tags": [],
        "author": {"id": null, "name": author},
        "original_author": {"id": null, "name": null},
        "assignment": {"user_ids": [], "team_ids": [], "comments": []},
        "action_links": [],
        "notes": [],
    })
}

fn contact(
    sim: &Sim,
    account: u64,
    service: String,
    sid: String,
    post: bool,
    call: &Call<'_>,
) -> Reply {
    let key = (account, service, sid);
    if sim.writes.contact_deleted(&key) {
        return reply::error(StatusCode::NOT_FOUND, "not_found", "no such contact");
    }
    if post {
        if let Err(message) = update_contact(sim, &key, call) {
            return bad(&message);
        }
    }
    let mut body = data::contact(key.0, &key.1, &key.2);
    sim.writes.overlay_contact(&key, &mut body);
    reply::ok(body)
}

/// Stores a contact write. `updates` (required, as the API requires it) is shaped like a
/// contact: its `crm` and `custom_attributes` objects merge into those sections, and any
/// other key is taken as a CRM field. Missing, not a JSON object, or with nothing in it,
/// the write is refused.
pub(crate) fn update_contact(
    sim: &Sim,
    key: &(u64, String, String),
    call: &Call<'_>,
) -> Result<(), String> {
    let (mut crm, mut custom) = (Map::new(), Map::new());
    match call.param("updates").map(serde_json::from_str::<Value>) {
        None => return Err("the form field updates is required".into()),
        Some(Ok(Value::Object(updates))) => {
            for (field, value) in updates {
                match (field.as_str(), value) {
                    ("crm", Value::Object(more)) => crm.extend(more),
                    ("custom_attributes", Value::Object(more)) => custom.extend(more),
                    ("crm" | "custom_attributes", _) => {
                        return Err(format!("updates.{field} must be a JSON object"))
                    }
                    (_, value) => {
                        crm.insert(field, value);
                    }
                }
            }
        }
        Some(_) => return Err("updates must be a JSON object".into()),
    }
    if crm.is_empty() && custom.is_empty() {
        return Err("nothing to update: send CRM fields or updates".into());
    }
    sim.writes.update_contact(key.clone(), crm, custom);
    sim.stats.incr(Counter::Writes);
    Ok(())
}

fn publisher_add(sim: &Sim, account: u64, call: &Call<'_>) -> Reply {
    let fields = fields(call);
    if fields.is_empty() {
        return bad("a draft needs at least one field, such as message");
    }
    let status = match call.param("status") {
        None | Some("awaitingapproval") => "awaitingapproval",
        Some("draft") => "draft",
        Some(_) => return bad("status must be draft or awaitingapproval"),
    };
    sim.stats.incr(Counter::Writes);
    // Drafts wait for approval: the simulator, like the real API, never publishes them.
    let draft = sim.writes.add_draft(account, |id| {
        json!({
            "id": format!("draft-{id}"),
            "account_id": account,
            "status": status,
            "fields": fields,
        })
    });
    reply::ok(draft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_paths() {
        let get = Method::GET;
        let cases = [
            ("/me", Route::Api(Endpoint::Me)),
            ("/me/", Route::Api(Endpoint::Me)),
            ("/oauth/access_token/", Route::Token),
            (
                "/12345/inbox/mentions/",
                Route::Api(Endpoint::Mentions(12345)),
            ),
            (
                "/12345/inbox/mention/123451/77",
                Route::Api(Endpoint::Mention(12345, 123451, "77".into())),
            ),
            (
                "/1/insights/mentions/volume",
                Route::Api(Endpoint::Insights(1, "mentions/volume".into())),
            ),
            (
                "/abc/inbox/mentions",
                Route::BadRequest("the account id must be a positive number"),
            ),
            ("/12345/nothing", Route::NotFound),
            ("/", Route::NotFound),
            ("/me//accounts", Route::NotFound),
        ];
        for (path, expected) in cases {
            assert_eq!(classify(&get, path), expected, "classifying {path}");
        }
        assert_eq!(
            classify(&Method::DELETE, "/1/publisher/add"),
            Route::WrongMethod("GET, POST")
        );
        assert_eq!(classify(&Method::DELETE, "/me"), Route::WrongMethod("GET"));
    }
}
