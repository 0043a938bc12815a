//! The endpoints the public clients use beyond the first table: deleting mentions, contacts
//! by their own id and the contact list, a mention's context, mailboxes and cases, the
//! publisher's drafts, settings writes, insights facets and the read-only tools. The
//! invariants are the same as `api`'s; [`serve`] adds how contact ids are read.

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::data;
use super::page::{paged, Call, Page};
use super::reply::{self, Reply};
use super::settings;
use super::stats::Counter;
use super::Sim;

/// Mentions per page at most, and contacts per page at most, as the clients show.
const MAX_MENTIONS_PAGE: u64 = 100;
const MAX_CONTACTS_PAGE: u64 = 50;

/// Messages one `inbox/add` may carry in its `mentions` array.
const MAX_ADDED: usize = 500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Extra {
    ContactById(String),
    Contacts,
    Context(u64, String),
    Mailboxes,
    Cases,
    PublisherOptions,
    PublisherMentions,
    PublisherMention(String),
    Settings(settings::Target),
    Crisis(&'static str),
    Audit,
    Facets,
    Tool(String),
}

/// The endpoint below `/{account}` for `rest`, with the methods it takes.
pub(crate) fn classify(rest: &[&str]) -> Option<(&'static str, Extra)> {
    Some(match rest {
        ["inbox", "contact", id] => ("GET, POST, DELETE", Extra::ContactById(id.to_string())),
        ["inbox", "contacts"] => ("GET", Extra::Contacts),
        ["inbox", "context", topic, id] => {
            let topic = topic.parse().ok().filter(|t| *t > 0)?;
            ("GET", Extra::Context(topic, id.to_string()))
        }
        ["inbox", "mailboxes"] => ("GET", Extra::Mailboxes),
        ["inbox", "cases"] => ("GET", Extra::Cases),
        ["publisher", "mentions"] => ("GET", Extra::PublisherMentions),
        ["publisher", "mention", id] => {
            ("GET, POST, DELETE", Extra::PublisherMention(id.to_string()))
        }
        ["settings", ..] => {
            let (allow, target) = settings::classify(rest)?;
            (allow, Extra::Settings(target))
        }
        ["crisis", ..] => {
            let (allow, which) = settings::classify_crisis(rest)?;
            (allow, Extra::Crisis(which))
        }
        ["security", "audit"] => ("GET", Extra::Audit),
        ["insights", "facets"] => ("GET, POST", Extra::Facets),
        [tool @ ("dashboards" | "tools" | "filter"), more @ ..] if !more.is_empty() => {
            ("GET", Extra::Tool(format!("{tool}/{}", more.join("/"))))
        }
        _ => return None,
    })
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

/// A page whose `limit` may not pass `max`, or why not.
fn page_within(call: &Call<'_>, max: u64) -> Result<Page, String> {
    let page = Page::parse(call)?;
    if page.limit > max {
        return Err(format!("limit must be 1 to {max}"));
    }
    Ok(page)
}

/// Answers one of the endpoints above.
///
/// Invariants: the same as `api` (stable generated data, writes stored before the answer is
/// built). A contact's own id is `{service}_{service_id}` (a bare `N` reads as `twitter_N`),
/// so a contact by its id, in the list and by its profile is one contact, and a write through
/// either spelling shows in both.
pub(crate) fn serve(
    sim: &Sim,
    account: u64,
    extra: Extra,
    method: &Method,
    call: &Call<'_>,
) -> Reply {
    let list = |items: Vec<Value>, max: u64| match page_within(call, max) {
        Ok(page) => reply::ok(paged(call, page, items)),
        Err(message) => bad(&message),
    };
    match extra {
        Extra::ContactById(id) => {
            let (service, sid) = data::contact_profile(&id);
            let key = (account, service.to_owned(), sid.to_owned());
            if sim.writes.contact_deleted(&key) {
                return not_found("contact");
            }
            if *method == Method::DELETE {
                sim.writes.delete_contact(key);
                sim.stats.incr(Counter::Writes);
                return reply::ok(json!(true));
            }
            if *method == Method::POST {
                if let Err(message) = super::api::update_contact(sim, &key, call) {
                    return bad(&message);
                }
            }
            let mut body = data::contact(key.0, &key.1, &key.2);
            sim.writes.overlay_contact(&key, &mut body);
            reply::ok(body)
        }
        Extra::Contacts => {
            let items = (1..=120u64)
                .map(|n| {
                    let key = (account, "twitter".to_string(), n.to_string());
                    let mut body = data::contact(key.0, &key.1, &key.2);
                    sim.writes.overlay_contact(&key, &mut body);
                    body
                })
                .collect();
            list(items, MAX_CONTACTS_PAGE)
        }
        Extra::Context(topic, id) => {
            let h = data::hash(&["context", &account.to_string(), &id]);
            let replies: Vec<Value> = (0..h % 3)
                .map(|n| data::mention(call.base, account, topic, &format!("{id}{n}")))
                .collect();
            reply::ok(json!({
                "mention": data::mention(call.base, account, topic, &id),
                "context": replies,
            }))
        }
        Extra::Mailboxes => list(
            (1..=3u64)
                .map(|n| json!({"id": account * 10 + n, "name": format!("Mailbox {n}")}))
                .collect(),
            MAX_MENTIONS_PAGE,
        ),
        Extra::Cases => list(
            (1..=5u64)
                .map(|n| json!({"id": account * 100 + n, "status": "open", "mentions": n}))
                .collect(),
            MAX_MENTIONS_PAGE,
        ),
        Extra::PublisherOptions => reply::ok(json!({
            "services": data::connected_profiles(),
            "types": ["reply", "post", "private_message"],
            "statuses": ["draft", "awaitingapproval"],
        })),
        Extra::PublisherMentions => list(sim.writes.drafts(account), MAX_MENTIONS_PAGE),
        Extra::PublisherMention(id) => {
            // Like mentions, any draft id has a stable generated body until it is written
            // or deleted; a deleted one is gone.
            let gone = (account, 0, format!("draft:{id}"));
            if sim.writes.mention_deleted(&gone) {
                return not_found("draft");
            }
            let stored = sim
                .writes
                .drafts(account)
                .into_iter()
                .find(|d| d["id"] == id);
            let draft = stored.clone().unwrap_or_else(|| {
                json!({"id": id, "account_id": account, "status": "draft",
                       "fields": {"message": data::hash(&["draft", &id]) % 1000}})
            });
            match *method {
                Method::GET => reply::ok(draft),
                Method::DELETE => {
                    sim.writes.change_draft(account, &id, None);
                    sim.writes.delete_mention(gone);
                    sim.stats.incr(Counter::Writes);
                    reply::ok(json!(true))
                }
                _ => {
                    let fields = fields(call);
                    if stored.is_none() {
                        sim.writes.add_draft(account, |_| draft.clone());
                    }
                    sim.writes.change_draft(account, &id, Some(&fields));
                    sim.stats.incr(Counter::Writes);
                    reply::ok(json!(true))
                }
            }
        }
        Extra::Settings(target) => settings::serve_settings(sim, account, target, method, call),
        Extra::Crisis(which) => settings::serve_crisis(sim, account, which, call),
        Extra::Audit => settings::serve_audit(sim, account, call),
        Extra::Facets => facets(sim, account, call),
        Extra::Tool(name) => reply::ok(json!({"tool": name, "account_id": account, "data": []})),
    }
}

/// What a facet may count mentions by, and where a mention holds it.
const FACET_FIELDS: [(&str, &str); 4] = [
    ("sentiment", "/message/sentiment"),
    ("language", "/message/language"),
    ("service", "/source/service"),
    ("topic", "/topic/id"),
];

/// `insights/facets` (GET or POST): `facetdefinitions` is a JSON array of facet
/// definitions (`{"name": "sentiment"}`, `"type": "mentions"` the only type modelled), and
/// each is answered by one facet item, `{"keys": [{"name": N}, {"name": "count"}], "data":
/// [[value, count], ...]}`, counting the account's mentions in `topic_ids` (required, as for
/// the API's mention facets) between `date_from` and `date_to`, exactly the mentions
/// `inbox/mentions` lists for the same parameters (written and deleted ones included).
fn facets(sim: &Sim, account: u64, call: &Call<'_>) -> Reply {
    let Some(text) = call.param("facetdefinitions") else {
        return bad("facetdefinitions is required");
    };
    let defs: Vec<Value> = match serde_json::from_str(text) {
        Ok(Value::Array(defs)) if !defs.is_empty() && defs.len() <= 10 => defs,
        _ => return bad("facetdefinitions must be a JSON array of 1 to 10 facet definitions"),
    };
    let mut pointers = Vec::new();
    for def in &defs {
        if def.get("type").is_some_and(|t| t != "mentions") {
            return bad("only facets of type mentions are modelled");
        }
        let name = def["name"].as_str().unwrap_or_default();
        let Some((_, pointer)) = FACET_FIELDS.iter().find(|(n, _)| *n == name) else {
            let names: Vec<&str> = FACET_FIELDS.iter().map(|f| f.0).collect();
            return bad(&format!(
                "a facet definition needs a name, one of {}",
                names.join(", ")
            ));
        };
        pointers.push((name, *pointer));
    }
    let topics: Vec<u64> = match call.param("topic_ids").filter(|t| !t.is_empty()) {
        None => return bad("topic_ids is required for facets of type mentions"),
        Some(t) => match t.split(',').map(|n| n.trim().parse()).collect() {
            Ok(topics) => topics,
            Err(_) => return bad("topic_ids must be comma-separated numbers"),
        },
    };
    let mut bounds = [None, None];
    for (slot, name) in bounds.iter_mut().zip(["date_from", "date_to"]) {
        if let Some(text) = call.param(name).filter(|t| !t.is_empty()) {
            match parse_time(text) {
                Some(t) => *slot = Some(t),
                None => return bad(&format!("{name} must be an ISO-8601 date")),
            }
        }
    }
    let [from, to] = bounds;
    let mentions: Vec<Value> = super::api::listed(sim, account, Some(topics.as_slice()), from, to)
        .into_iter()
        .filter_map(|(topic, id)| super::api::mention(sim, call.base, account, topic, &id))
        .collect();
    let items: Vec<Value> = pointers
        .iter()
        .map(|(name, pointer)| {
            let mut counts: Vec<(String, u64)> = Vec::new();
            for m in &mentions {
                let value = match m.pointer(pointer) {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Null) | None => "unknown".to_string(),
                    Some(other) => other.to_string(),
                };
                match counts.iter_mut().find(|(v, _)| *v == value) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((value, 1)),
                }
            }
            counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let rows: Vec<Value> = counts.into_iter().map(|(v, n)| json!([v, n])).collect();
            json!({"keys": [{"name": name}, {"name": "count"}], "data": rows})
        })
        .collect();
    reply::ok(Value::Array(items))
}

/// Form fields of a write other than the credential.
pub(crate) fn fields(call: &Call<'_>) -> Map<String, Value> {
    call.form
        .iter()
        .filter(|(k, _)| k != "access_token")
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect()
}

/// `inbox/add` with a `mentions` array: each added, the answer a boolean.
pub(crate) fn add_many(
    sim: &Sim,
    account: u64,
    text: &str,
    build: impl Fn(&Value) -> (u64, Value),
) -> Reply {
    let messages: Vec<Value> = match serde_json::from_str(text) {
        Ok(Value::Array(list)) => list,
        _ => return bad("mentions must be a JSON array"),
    };
    if messages.is_empty() || messages.len() > MAX_ADDED {
        return bad(&format!("mentions must hold 1 to {MAX_ADDED} messages"));
    }
    let built: Vec<(u64, Value)> = messages.iter().map(build).collect();
    if built
        .iter()
        .any(|(topic, _)| !data::known_topic(account, *topic))
    {
        return not_found("topic");
    }
    for (topic, mut body) in built {
        sim.writes.add_message(account, topic, |id| {
            body["id"] = json!(id);
            body["unique_id"] = json!(format!("{topic}_{id}"));
            body["source"]["id"] = json!(id);
            body
        });
    }
    sim.stats.incr(Counter::Writes);
    reply::ok(json!(true))
}

/// Parses an ISO-8601 date (`2026-12-01`, `2026-12-01T10:00:00Z`, with an offset) or Unix
/// seconds into Unix seconds.
pub(crate) fn parse_time(text: &str) -> Option<u64> {
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    let (date, time) = text.split_once('T').unwrap_or((text, "00:00:00Z"));
    let mut d = date.split('-').map(|p| p.parse::<u64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) || y < 1970 {
        return None;
    }
    let (clock, offset) = match time.find(['Z', '+', '-']) {
        Some(at) => (&time[..at], &time[at..]),
        None => (time, "Z"),
    };
    let mut c = clock
        .split(':')
        .map(|p| p.split('.').next()?.parse::<u64>().ok());
    let (hh, mm, ss) = (
        c.next()??,
        c.next().flatten().unwrap_or(0),
        c.next().flatten().unwrap_or(0),
    );
    let shift: i64 = match offset {
        "Z" | "" => 0,
        o => {
            let sign = if o.starts_with('-') { -1 } else { 1 };
            let digits: String = o[1..].chars().filter(char::is_ascii_digit).collect();
            let (oh, om) = digits.split_at(digits.len().min(2));
            sign * (oh.parse::<i64>().ok()? * 3600 + om.parse::<i64>().unwrap_or(0) * 60)
        }
    };
    let yy = if m <= 2 { y - 1 } else { y };
    let era = yy / 400;
    let yoe = yy % 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    let secs = (days * 86_400 + hh * 3600 + mm * 60 + ss) as i64 - shift;
    u64::try_from(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iso_dates_and_unix_seconds() {
        assert_eq!(parse_time("1764547200"), Some(1_764_547_200));
        assert_eq!(parse_time("2025-12-01"), Some(1_764_547_200));
        assert_eq!(parse_time("2025-12-01T01:00:00Z"), Some(1_764_550_800));
        assert_eq!(parse_time("2025-12-01T02:00:00+01:00"), Some(1_764_550_800));
        assert_eq!(parse_time("yesterday"), None);
    }

    #[test]
    fn classifies_the_extra_shapes() {
        assert_eq!(
            classify(&["inbox", "contact", "77"]),
            Some(("GET, POST, DELETE", Extra::ContactById("77".into())))
        );
        assert_eq!(
            classify(&["insights", "facets"]).map(|f| f.0),
            Some("GET, POST")
        );
        assert_eq!(classify(&["tools"]), None);
    }
}
