//! Generated, stable data: every body is a pure function of its ids (and of the base URL
//! for absolute links), so the same id always gives the same body and tests can compare
//! answers byte for byte. There is no randomness and no clock: values are picked with a fixed
//! hash of the ids ([`hash`]).

use serde_json::{json, Value};

/// The accounts the sim user can see in `/me/accounts`.
pub(crate) const ACCOUNTS: [u64; 3] = [12345, 23456, 34567];
/// Mentions generated per account inbox.
pub(crate) const MENTIONS: u64 = 500;
/// Unix time of the newest generated mention (2026-01-01T00:00:00Z). Mention `seq` numbers
/// place mentions on a fixed timeline ending here, so list filters work on integers and only
/// the page actually returned is built.
pub(crate) const NEWEST: u64 = 1_767_225_600;
/// Seconds between two generated mentions.
const STEP: u64 = 600;

const SERVICES: [&str; 5] = ["twitter", "facebook", "instagram", "youtube", "web"];
const LANGUAGES: [&str; 4] = ["en", "nl", "fr", "de"];
const STATUSES: [&str; 4] = ["new", "open", "pending", "closed"];
const TAGS: [&str; 5] = ["complaint", "praise", "question", "urgent", "billing"];
const SUBJECTS: [&str; 5] = [
    "The delivery",
    "Your support team",
    "My order",
    "The new app",
    "Customer service",
];
const PREDICATES: [&str; 5] = [
    "was great today",
    "is still missing",
    "keeps crashing",
    "made my day",
    "needs an update",
];
const FIRST: [&str; 6] = ["Ann", "Bart", "Chloe", "Dries", "Emma", "Femke"];
const LAST: [&str; 6] = [
    "Peeters", "Janssens", "Maes", "Jacobs", "Mertens", "Willems",
];
const TOPIC_WORDS: [&str; 6] = ["Brand", "Support", "Product", "Campaign", "Events", "Press"];

/// FNV-1a over the parts, with a separator so ("ab","c") and ("a","bc") differ.
pub(crate) fn hash(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn pick<'a>(list: &[&'a str], h: u64) -> &'a str {
    list[(h % list.len() as u64) as usize]
}

fn person(h: u64) -> String {
    format!("{} {}", pick(&FIRST, h), pick(&LAST, h >> 16))
}

pub(crate) fn me() -> Value {
    json!({
        "id": 4242,
        "name": "Sim User",
        "email": "sim.user@example.com",
        "language": "en",
        "timezone": "Europe/Brussels",
    })
}

/// The scopes of every token the simulator issues, as `/me/permissions` lists them and the
/// token endpoint's space-separated `scope` names them; the clients ask for `identify`.
pub(crate) const SCOPES: [&str; 5] = [
    "identify",
    "accounts_read",
    "accounts_write",
    "socialprofiles",
    "email",
];

pub(crate) fn permissions() -> Value {
    json!(SCOPES)
}

pub(crate) fn connected_profiles() -> Vec<Value> {
    ["twitter", "facebook", "instagram"]
        .iter()
        .enumerate()
        .map(|(i, service)| {
            let id = 9000 + i as u64;
            json!({
                "id": id,
                "service": service,
                "name": format!("Sim on {service}"),
                "url": format!("https://{service}.example.com/sim{id}"),
            })
        })
        .collect()
}

/// Whether `account` is one the sim user has: any other is a 404, as the API answers an
/// account the token cannot see, never invented data.
pub(crate) fn known_account(account: u64) -> bool {
    ACCOUNTS.contains(&account)
}

/// Whether `topic` is one of `account`'s three topics.
pub(crate) fn known_topic(account: u64, topic: u64) -> bool {
    topic_ids(account).contains(&topic)
}

/// The three topics of an account: `account * 10 + 1 ..= + 3`.
pub(crate) fn topic_ids(account: u64) -> [u64; 3] {
    let base = account.saturating_mul(10);
    [base + 1, base + 2, base + 3]
}

fn topic(topic_id: u64) -> Value {
    let h = hash(&["topic", &topic_id.to_string()]);
    json!({"id": topic_id, "name": format!("{} {}", pick(&TOPIC_WORDS, h), topic_id % 10)})
}

/// A topic as `/me/accounts` lists it: with the profiles it monitors and its search keywords.
fn monitored_topic(topic_id: u64) -> Value {
    let mut body = topic(topic_id);
    let account = topic_id / 10;
    let h = hash(&["keywords", &topic_id.to_string()]);
    let profiles: Vec<Value> = ["twitter", "facebook"]
        .iter()
        .map(|service| {
            json!({
                "type": service,
                "username": format!("sim{account}"),
                "displayname": format!("Account {account} on {service}"),
            })
        })
        .collect();
    let word = pick(&TOPIC_WORDS, h).to_lowercase();
    body["monitoredprofiles"] = Value::Array(profiles);
    body["searchkeywords"] = json!([format!("sim {word}"), format!("#sim{account}")]);
    body
}

/// Topics 1 and 2 belong to the account's first project, topic 3 to its second.
fn project_of(topic_id: u64) -> Value {
    let account = topic_id / 10;
    let n = if topic_id % 10 <= 2 { 1 } else { 2 };
    json!({"id": account * 100 + n, "name": format!("Project {n}")})
}

pub(crate) fn accounts() -> Vec<Value> {
    ACCOUNTS.iter().map(|&id| account(id)).collect()
}

fn account(id: u64) -> Value {
    let topics = topic_ids(id);
    let projects: Vec<Value> = [1, 2]
        .iter()
        .map(|n| {
            let mut project = project_of(id * 10 + if *n == 1 { 1 } else { 3 });
            let own: Vec<Value> = topics
                .iter()
                .filter(|t| (**t % 10 <= 2) == (*n == 1))
                .map(|t| monitored_topic(*t))
                .collect();
            project["topics"] = Value::Array(own);
            project
        })
        .collect();
    let profiles: Vec<Value> = ["twitter", "facebook"]
        .iter()
        .map(|s| json!({"service": s, "service_id": format!("{}{id}", s.len()), "name": format!("Account {id} on {s}")}))
        .collect();
    json!({
        "id": id,
        "name": format!("Sim account {id}"),
        "projects": projects,
        "monitored_profiles": profiles,
    })
}

/// The list behind `/{account}/settings/{kind}`, or `None` for an unknown kind.
pub(crate) fn settings(account: u64, kind: &str) -> Option<Vec<Value>> {
    let acc = account.to_string();
    let list = match kind {
        "topics" => topic_ids(account)
            .iter()
            .map(|t| {
                let mut v = topic(*t);
                v["project"] = project_of(*t);
                v
            })
            .collect(),
        "users" => (1..=4)
            .map(|n| {
                let h = hash(&["user", &acc, &n.to_string()]);
                let name = person(h);
                let email = format!("{}@example.com", name.to_lowercase().replace(' ', "."));
                let role = if n == 1 { "admin" } else { "agent" };
                json!({"id": account * 100 + n, "name": name, "email": email, "role": role})
            })
            .collect(),
        "tags" => TAGS
            .iter()
            .enumerate()
            .map(|(i, tag)| json!({"id": account * 100 + i as u64 + 1, "name": tag}))
            .collect(),
        "teams" => (1..=2)
            .map(|n| {
                let members: Vec<u64> = (1..=4).filter(|m| m % 2 == n % 2).collect();
                let members: Vec<u64> = members.iter().map(|m| account * 100 + m).collect();
                json!({"id": account * 1000 + n, "name": format!("Team {n}"), "members": members})
            })
            .collect(),
        "userroles"
        | "canned_responses"
        | "canned_responses_folders"
        | "customattributes"
        | "profilegroups"
        | "publishing_guidelines"
        | "businesshoursschedules"
        | "history" => (1..=3)
            .map(|n| {
                let h = hash(&[kind, &acc, &n.to_string()]);
                json!({
                    "id": account * 100 + n,
                    "name": format!("{} {n}", kind.trim_end_matches('s').replace('_', " ")),
                    "description": pick(&SUBJECTS, h),
                })
            })
            .collect(),
        _ => return None,
    };
    Some(list)
}

/// Topic of the mention at timeline position `seq`, without building its id.
pub(crate) fn topic_at(account: u64, seq: u64) -> u64 {
    topic_ids(account)[(seq % 3) as usize]
}

/// Topic and id of the mention at timeline position `seq` (0 = oldest).
pub(crate) fn mention_at(account: u64, seq: u64) -> (u64, String) {
    (topic_at(account, seq), format!("{account}{seq:06}"))
}

/// Publication time of a generated mention at position `seq`.
pub(crate) fn published_at(seq: u64) -> u64 {
    NEWEST - (MENTIONS - 1 - seq.min(MENTIONS - 1)) * STEP
}

fn published(account: u64, id: &str) -> u64 {
    let seq = id
        .strip_prefix(account.to_string().as_str())
        .and_then(|rest| rest.parse::<u64>().ok())
        .filter(|seq| *seq < MENTIONS);
    match seq {
        Some(seq) => published_at(seq),
        // Ids outside the timeline still get a stable date, before it.
        None => NEWEST - MENTIONS * STEP - hash(&["date", id]) % 10_000_000,
    }
}

/// One mention; `base` is the API's own URL, used for absolute action links.
pub(crate) fn mention(base: &str, account: u64, topic_id: u64, id: &str) -> Value {
    let (acc, top) = (account.to_string(), topic_id.to_string());
    let h = hash(&["mention", &acc, &top, id]);
    let service = pick(&SERVICES, h);
    let source_id = format!(
        "{}",
        1_000_000_000_000_000_000 + h % 900_000_000_000_000_000
    );
    let url = match service {
        "twitter" => format!("https://twitter.com/i/web/status/{source_id}"),
        "web" => format!("https://blog.example.com/posts/{source_id}"),
        s => format!("https://www.{s}.com/{source_id}"),
    };
    // Twitter's terms: tweets carry only the tweet id and CX Social's own analysis.
    let content = match service {
        "twitter" => Value::Null,
        _ => json!(format!(
            "{} {}",
            pick(&SUBJECTS, h >> 8),
            pick(&PREDICATES, h >> 12)
        )),
    };
    let author = match service {
        "twitter" => json!({"id": format!("{}", h % 9_000_000_000 + 1_000_000)}),
        // Public Facebook posts are anonymised.
        "facebook" => json!({"id": null, "name": null, "anonymised": true}),
        _ => json!({"id": format!("u{}", h % 1_000_000), "name": person(h >> 20)}),
    };
    let tags: Vec<&str> = (0..(h >> 24) % 3)
        .map(|k| pick(&TAGS, (h >> 28) + k))
        .collect();
    let published = published(account, id);
    let unique_id = format!("{topic_id}_{id}");
    let reply_link =
        format!("{base}/{account}/publisher/add/?type=reply&topic_id={topic_id}&mention_id={id}");
    let added = published + 30 + h % 90;
    let sentiment = ["negative", "negative", "neutral", "positive", "positive"];
    let (category, kind, domain) = match service {
        "twitter" => ("social", "tweet", "twitter.com"),
        "facebook" => ("social", "post", "facebook.com"),
        "instagram" => ("social", "post", "instagram.com"),
        "web" => ("news", "article", "blog.example.com"),
        _ => ("social", "post", "example.com"),
    };
    json!({
        "id": id,
        "unique_id": unique_id,
        "message": {
            "content": content,
            "language": pick(&LANGUAGES, h >> 4),
            "sentiment": sentiment[((h >> 16) % 5) as usize],
        },
        "source": {
            "service": service, "id": source_id, "url": url,
            "category": category, "type": kind, "domain": domain,
        },
        "topic": topic(topic_id),
        "project": project_of(topic_id),
        "status": pick(&STATUSES, h >> 36),
        "permalink": format!("https://app.engagor.com/messages/{account}/permalink/{topic_id}/{id}/"),
        "action_links": [
            {"key": "reply", "type": "api", "name": "reply", "title": "Reply",
             "link": reply_link, "http_method": "GET"},
            {"key": "update", "type": "api", "name": "update", "title": "Update",
             "link": format!("{base}/{account}/inbox/mention/{topic_id}/{id}"), "http_method": "POST"},
            {"key": "view", "type": "web", "name": "view", "title": "View original",
             "link": url, "http_method": "GET"},
        ],
        "actions": [],
        "timestamps": {"added": added, "published": published, "last_updated": added},
        "date": {"added": added, "published": published},
        "tags": tags,
        "author": author.clone(),
        "original_author": author,
        "assignment": {"user_ids": [], "team_ids": [], "comments": []},
        "notes": [],
    })
}

/// The profile (service, service id) a contact's own id names: the id is
/// `{service}_{service_id}`, and a bare id is a Twitter one.
pub(crate) fn contact_profile(id: &str) -> (&str, &str) {
    id.split_once('_').unwrap_or(("twitter", id))
}

/// A social profile with CRM fields and custom attributes.
pub(crate) fn contact(account: u64, service: &str, service_id: &str) -> Value {
    let h = hash(&["contact", &account.to_string(), service, service_id]);
    let name = person(h);
    json!({
        "id": format!("{service}_{service_id}"),
        "service": service,
        "service_id": service_id,
        "name": name,
        "url": format!("https://{service}.example.com/{service_id}"),
        "followers": h % 50_000,
        "crm": {
            "email": format!("{}@example.com", name.to_lowercase().replace(' ', ".")),
            "phone": format!("+32 4{:02} {:02} {:02} {:02}", h % 100, (h >> 8) % 100, (h >> 16) % 100, (h >> 24) % 100),
            "company": format!("{} BV", pick(&LAST, h >> 32)),
            "customer_id": format!("C{}", h % 1_000_000),
        },
        "custom_attributes": {
            "tier": pick(&["bronze", "silver", "gold"], h >> 40),
            "region": pick(&["north", "south", "east", "west"], h >> 44),
        },
    })
}

/// Daily values of a statistic between two Unix times (at most 90 points).
pub(crate) fn insights(account: u64, metric: &str, from: u64, to: u64) -> Value {
    let acc = account.to_string();
    let days = (to.saturating_sub(from) / 86_400).clamp(1, 90);
    let points: Vec<Value> = (0..days)
        .map(|d| {
            let day = from + d * 86_400;
            let v = hash(&["insights", &acc, metric, &day.to_string()]) % 1000;
            json!({"date": day, "value": v})
        })
        .collect();
    json!({"account_id": account, "metric": metric, "date_from": from, "date_to": to, "data": points})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_ids_same_body_different_ids_differ() {
        let a = mention("http://h", 12345, 123451, "12345000007");
        let b = mention("http://h", 12345, 123451, "12345000007");
        let c = mention("http://h", 12345, 123451, "12345000008");
        assert_eq!(a, b, "expected identical bodies for one id");
        assert_ne!(a, c, "expected different ids to differ");
        assert_eq!(a["unique_id"], "123451_12345000007");
        let link = a["action_links"][0]["link"].as_str().unwrap_or_default();
        assert!(
            link.starts_with("http://h/12345/publisher/add/?"),
            "expected absolute publisher link, saw {link}"
        );
    }

    #[test]
    fn timeline_dates_follow_seq() {
        let (topic, id) = mention_at(12345, MENTIONS - 1);
        let m = mention("http://h", 12345, topic, &id);
        assert_eq!(
            m["date"]["published"], NEWEST,
            "expected newest at NEWEST, saw {m}"
        );
        assert_eq!(published_at(0), NEWEST - (MENTIONS - 1) * STEP);
    }

    #[test]
    fn twitter_mentions_have_no_content() {
        let found = (0..50)
            .map(|n| mention("http://h", 1, 11, &n.to_string()))
            .find(|m| m["source"]["service"] == "twitter");
        let m = found.unwrap_or(Value::Null);
        assert!(m.is_object(), "expected a twitter mention among 50");
        assert!(
            m["message"]["content"].is_null(),
            "expected no tweet text, saw {m}"
        );
    }

    #[test]
    fn settings_kinds() {
        for kind in ["topics", "users", "tags", "teams"] {
            let list = settings(12345, kind).unwrap_or_default();
            assert!(!list.is_empty(), "expected {kind} to be listed");
        }
        assert!(settings(12345, "nope").is_none());
    }
}
