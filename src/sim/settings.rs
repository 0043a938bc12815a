//! What clients change in an account beyond its messages: settings (teams, users, profile
//! groups, business hours schedules), crisis plans, and the two logs those changes land in
//! (`settings/history` and `security/audit`), so the gateway's invalidation of them can be
//! tested against reads that really change. [`Store`] holds the invariants.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use http::{Method, StatusCode};
use serde_json::{json, Map, Value};

use super::data;
use super::extra::parse_time;
use super::lock;
use super::page::{paged, Call, Page};
use super::reply::{self, Reply};
use super::stats::Counter;
use super::Sim;

/// The security events an audit log holds (the `events` filter takes only these).
pub(crate) const AUDIT_EVENTS: [&str; 8] = [
    "password_change",
    "login_success",
    "login_failure",
    "logout",
    "account_locked",
    "account_unlocked",
    "settings_edited",
    "password_reset",
];

/// Generated audit events per account, one every six hours back from `data::NEWEST`.
const AUDIT_GENERATED: u64 = 60;
/// Audit and history items per page at most.
const MAX_LOG_PAGE: u64 = 200;

#[derive(Default)]
struct Kind {
    changed: HashMap<u64, Value>,
    deleted: HashSet<u64>,
    created: Vec<Value>,
}

#[derive(Default)]
struct Inner {
    kinds: HashMap<(u64, &'static str), Kind>,
    /// Crisis plans of an account, once one was written (generated until then).
    plans: HashMap<u64, Vec<Value>>,
    /// Items the writes added to the logs, oldest first.
    history: HashMap<u64, Vec<Value>>,
    audit: HashMap<u64, Vec<Value>>,
    next_id: u64,
}

/// The settings writes of every account.
///
/// Invariants: the generated lists of `data::settings` stay a pure function; a write is an
/// overlay (changed items by id, deleted ids, created items in order) applied on every read,
/// so a read after a write shows it and nothing else moves. Every settings write adds one
/// `history_item` and one `settings_edited` audit event, as the real account logs do. All of
/// it sits behind one std Mutex held briefly.
#[derive(Default)]
pub(crate) struct Store {
    inner: Mutex<Inner>,
}

/// A settings write path, read: the list it changes, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// `settings/teams`, `settings/profilegroup(s)`, `settings/businesshoursschedules`: the
    /// list, or a new item in it (from the form field named by `create_field`).
    List(&'static str),
    /// `settings/{team,user,profilegroup,businesshoursschedules}/{id}`: one item.
    Item(&'static str, String),
}

/// The settings endpoints below `/{account}` this module serves, with their methods.
pub(crate) fn classify(rest: &[&str]) -> Option<(&'static str, Target)> {
    let list = |kind: &str| -> Option<&'static str> {
        Some(match kind {
            "teams" | "team" => "teams",
            "users" | "user" => "users",
            "profilegroups" | "profilegroup" => "profilegroups",
            "businesshoursschedules" | "businesshoursschedule" => "businesshoursschedules",
            _ => return None,
        })
    };
    Some(match rest {
        ["settings", kind @ ("teams" | "profilegroups" | "businesshoursschedules")] => {
            ("GET, POST", Target::List(list(kind)?))
        }
        ["settings", "profilegroup"] => ("POST", Target::List("profilegroups")),
        ["settings", kind, id] => (
            "GET, POST, DELETE",
            Target::Item(list(kind)?, id.to_string()),
        ),
        _ => return None,
    })
}

/// The form field a new item of `list` arrives in, as JSON.
fn create_field(list: &str) -> &'static str {
    match list {
        "teams" => "team",
        "profilegroups" => "profile_group",
        _ => "business_hours_schedule",
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

/// Why a request is refused, small until it becomes the reply.
enum Refusal {
    Bad(String),
    NotFound(&'static str),
}

impl Refusal {
    fn reply(self) -> Reply {
        match self {
            Refusal::Bad(message) => bad(&message),
            Refusal::NotFound(what) => not_found(what),
        }
    }
}

/// A form field holding a JSON object, or why not.
fn object_field(call: &Call<'_>, name: &str) -> Result<Map<String, Value>, Refusal> {
    match call.param(name).map(serde_json::from_str::<Value>) {
        Some(Ok(Value::Object(fields))) => Ok(fields),
        Some(_) => Err(Refusal::Bad(format!("{name} must be a JSON object"))),
        None => Err(Refusal::Bad(format!("the form field {name} is required"))),
    }
}

/// The wall clock in Unix seconds (log items of writes carry when they happened).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// A settings list with every write applied; `None` for a kind the API does not have.
    pub fn list(&self, account: u64, kind: &str) -> Option<Vec<Value>> {
        let mut items = data::settings(account, kind)?;
        let inner = lock(&self.inner);
        if kind == "history" {
            let added = inner.history.get(&account).into_iter().flatten();
            items.splice(0..0, added.rev().cloned());
            return Some(items);
        }
        let Some(state) = list_name(kind).and_then(|list| inner.kinds.get(&(account, list))) else {
            return Some(items);
        };
        let mut out: Vec<Value> = items
            .into_iter()
            .filter_map(|item| {
                let id = item["id"].as_u64()?;
                if state.deleted.contains(&id) {
                    return None;
                }
                Some(state.changed.get(&id).cloned().unwrap_or(item))
            })
            .collect();
        out.extend(state.created.iter().cloned());
        Some(out)
    }

    fn find(&self, account: u64, list: &'static str, id: u64) -> Option<Value> {
        self.list(account, list)?
            .into_iter()
            .find(|item| item["id"].as_u64() == Some(id))
    }

    /// Records a settings change in both logs of the account.
    fn log(inner: &mut Inner, account: u64, change: &str, list: &str, id: u64) {
        inner.next_id += 1;
        let n = inner.next_id;
        let when = unix_now();
        let user = account * 100 + 1;
        inner.history.entry(account).or_default().push(json!({
            "id": format!("history-{n}"), "type": list, "action": change, "object_id": id,
            "user_id": user, "date": when,
        }));
        inner.audit.entry(account).or_default().push(json!({
            "id": format!("audit-w{n}"), "event": "settings_edited", "user_id": user,
            "date": when, "details": {"type": list, "action": change, "object_id": id},
        }));
    }

    fn create(&self, account: u64, list: &'static str, mut item: Map<String, Value>) -> Value {
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = account * 100_000 + 50_000 + inner.next_id;
        item.insert("id".into(), json!(id));
        let item = Value::Object(item);
        let state = inner.kinds.entry((account, list)).or_default();
        state.created.push(item.clone());
        Self::log(&mut inner, account, "created", list, id);
        item
    }

    fn change(&self, account: u64, list: &'static str, id: u64, with: Option<Value>) {
        let action = if with.is_some() { "updated" } else { "deleted" };
        let mut inner = lock(&self.inner);
        let state = inner.kinds.entry((account, list)).or_default();
        let at = state
            .created
            .iter()
            .position(|c| c["id"].as_u64() == Some(id));
        match (with, at) {
            (Some(item), Some(at)) => state.created[at] = item,
            (Some(item), None) => {
                state.changed.insert(id, item);
            }
            (None, Some(at)) => {
                state.created.remove(at);
            }
            (None, None) => {
                state.deleted.insert(id);
            }
        }
        Self::log(&mut inner, account, action, list, id);
    }

    /// The crisis plans of `account` as they stand.
    fn plans(&self, account: u64) -> Vec<Value> {
        lock(&self.inner)
            .plans
            .get(&account)
            .cloned()
            .unwrap_or_else(|| generated_plans(account))
    }

    /// Applies `edit` to plan `id`; the plan after it, or `None` for an unknown plan (or an
    /// edit that refused).
    fn edit_plan(
        &self,
        account: u64,
        id: u64,
        edit: impl FnOnce(&mut Value) -> Result<(), Refusal>,
    ) -> Result<Value, Refusal> {
        let mut inner = lock(&self.inner);
        let plans = inner
            .plans
            .entry(account)
            .or_insert_with(|| generated_plans(account));
        let Some(plan) = plans.iter_mut().find(|p| p["id"].as_u64() == Some(id)) else {
            return Err(Refusal::NotFound("crisis plan"));
        };
        edit(plan)?;
        Ok(plan.clone())
    }

    /// The audit log of `account`, newest first: the writes' events, then the generated ones.
    fn audit(&self, account: u64) -> Vec<Value> {
        let mut items: Vec<Value> = lock(&self.inner)
            .audit
            .get(&account)
            .into_iter()
            .flatten()
            .rev()
            .cloned()
            .collect();
        items.extend((0..AUDIT_GENERATED).map(|n| {
            let h = data::hash(&["audit", &account.to_string(), &n.to_string()]);
            json!({
                "id": format!("audit-{account}-{n}"),
                "event": AUDIT_EVENTS[(h % AUDIT_EVENTS.len() as u64) as usize],
                "user_id": account * 100 + 1 + (h >> 8) % 4,
                "date": data::NEWEST - n * 6 * 3600,
                "ip": format!("203.0.113.{}", (h >> 16) % 250 + 1),
            })
        }));
        items
    }
}

/// The list a settings kind's writes change (`None` for a kind that is only read).
fn list_name(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "teams" => "teams",
        "users" => "users",
        "profilegroups" => "profilegroups",
        "businesshoursschedules" => "businesshoursschedules",
        _ => return None,
    })
}

/// Three crisis plans per account, none active, each with three to-do items.
fn generated_plans(account: u64) -> Vec<Value> {
    (1..=3u64)
        .map(|n| {
            let todos: Vec<Value> = (1..=3u64)
                .map(|t| json!({"id": n * 10 + t, "name": format!("Step {t} of plan {n}"), "done": false}))
                .collect();
            json!({
                "id": account * 10 + n,
                "name": format!("Crisis plan {n}"),
                "active": false,
                "crisis_name": null,
                "todos": todos,
            })
        })
        .collect()
}

/// `true`/`false` as the clients send them (`1`/`0` too), or why not.
fn flag(call: &Call<'_>, name: &str) -> Result<bool, Refusal> {
    match call.param(name) {
        Some("1" | "true") => Ok(true),
        Some("0" | "false") => Ok(false),
        Some(_) => Err(Refusal::Bad(format!("{name} must be true or false"))),
        None => Err(Refusal::Bad(format!("the form field {name} is required"))),
    }
}

fn number(call: &Call<'_>, name: &str) -> Result<u64, Refusal> {
    match call.param(name).map(str::parse::<u64>) {
        Some(Ok(n)) => Ok(n),
        Some(Err(_)) => Err(Refusal::Bad(format!("{name} must be a number"))),
        None => Err(Refusal::Bad(format!("the form field {name} is required"))),
    }
}

/// Answers a settings endpoint of `classify`.
pub(crate) fn serve_settings(
    sim: &Sim,
    account: u64,
    target: Target,
    method: &Method,
    call: &Call<'_>,
) -> Reply {
    let store = &sim.settings;
    match target {
        Target::List(list) if *method == Method::GET => match Page::parse(call) {
            Ok(page) => reply::ok(paged(
                call,
                page,
                store.list(account, list).unwrap_or_default(),
            )),
            Err(message) => bad(&message),
        },
        Target::List(list) => match object_field(call, create_field(list)) {
            Ok(mut fields) => {
                fields.remove("id");
                if !fields.get("name").is_some_and(Value::is_string) {
                    return bad(&format!("{} needs a name", create_field(list)));
                }
                sim.stats.incr(Counter::Writes);
                reply::ok(store.create(account, list, fields))
            }
            Err(refusal) => refusal.reply(),
        },
        Target::Item(list, id) => {
            let what = list.trim_end_matches('s');
            let Some(found) = id
                .parse()
                .ok()
                .and_then(|n| store.find(account, list, n).map(|f| (n, f)))
            else {
                return not_found(what);
            };
            let (n, mut item) = found;
            match *method {
                Method::GET => reply::ok(item),
                Method::DELETE => {
                    store.change(account, list, n, None);
                    sim.stats.incr(Counter::Writes);
                    reply::ok(json!(true))
                }
                _ => {
                    let updates = match object_field(call, "updates") {
                        Ok(updates) => updates,
                        Err(refusal) => return refusal.reply(),
                    };
                    for (field, value) in updates {
                        if field != "id" {
                            item[field] = value;
                        }
                    }
                    store.change(account, list, n, Some(item.clone()));
                    sim.stats.incr(Counter::Writes);
                    reply::ok(item)
                }
            }
        }
    }
}

/// `crisis/plans` (GET), `crisis/event` and `crisis/todo` (POST), with their methods.
pub(crate) fn classify_crisis(rest: &[&str]) -> Option<(&'static str, &'static str)> {
    Some(match rest {
        ["crisis", "plans"] => ("GET", "plans"),
        ["crisis", "event"] => ("POST", "event"),
        ["crisis", "todo"] => ("POST", "todo"),
        _ => return None,
    })
}

/// Answers a crisis endpoint: the plans (a list of `crisis_plan`, `active_only=1` for the
/// active ones), a plan switched on or off by `crisis/event`, a to-do item marked by
/// `crisis/todo`; both writes answer the plan as it now stands.
pub(crate) fn serve_crisis(sim: &Sim, account: u64, which: &str, call: &Call<'_>) -> Reply {
    let store = &sim.settings;
    let edited = match which {
        "plans" => {
            let active_only = match call.query_param("active_only") {
                None | Some("" | "0") => false,
                Some("1") => true,
                Some(_) => return bad("active_only must be 1 or 0"),
            };
            let plans = store.plans(account);
            let plans: Vec<Value> = plans
                .into_iter()
                .filter(|p| !active_only || p["active"] == true)
                .collect();
            return reply::ok(Value::Array(plans));
        }
        "event" => {
            let (id, activate) = match (number(call, "id"), flag(call, "activate")) {
                (Ok(id), Ok(activate)) => (id, activate),
                (Err(r), _) | (_, Err(r)) => return r.reply(),
            };
            let name = call
                .param("crisis_name")
                .filter(|n| !n.is_empty())
                .map(str::to_owned);
            store.edit_plan(account, id, |plan| {
                plan["active"] = json!(activate);
                plan["crisis_name"] = if activate { json!(name) } else { Value::Null };
                Ok(())
            })
        }
        _ => {
            let (plan, todo, done) = match (
                number(call, "plan_id"),
                number(call, "todo_id"),
                flag(call, "done"),
            ) {
                (Ok(p), Ok(t), Ok(d)) => (p, t, d),
                (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return r.reply(),
            };
            store.edit_plan(account, plan, |plan| {
                let item = plan["todos"]
                    .as_array_mut()
                    .and_then(|list| list.iter_mut().find(|t| t["id"].as_u64() == Some(todo)));
                match item {
                    Some(item) => {
                        item["done"] = json!(done);
                        Ok(())
                    }
                    None => Err(Refusal::NotFound("to-do item")),
                }
            })
        }
    };
    match edited {
        Ok(plan) => {
            sim.stats.incr(Counter::Writes);
            reply::ok(plan)
        }
        Err(refusal) => refusal.reply(),
    }
}

/// `security/audit`: a paged list of `audit_log_item`s, newest first, filtered by `events`
/// (a comma-separated list of the known events), `user_id`, and `date_from`/`date_to`
/// (ISO-8601 or Unix seconds); at most 200 per page.
pub(crate) fn serve_audit(sim: &Sim, account: u64, call: &Call<'_>) -> Reply {
    let page = match Page::parse(call) {
        Ok(page) if page.limit > MAX_LOG_PAGE => {
            return bad(&format!("limit must be 1 to {MAX_LOG_PAGE}"))
        }
        Ok(page) => page,
        Err(message) => return bad(&message),
    };
    let events: Option<Vec<&str>> = call
        .query_param("events")
        .filter(|e| !e.is_empty())
        .map(|e| e.split(',').map(str::trim).collect());
    if let Some(unknown) = events.iter().flatten().find(|e| !AUDIT_EVENTS.contains(*e)) {
        return bad(&format!(
            "unknown event {unknown:?}: events are {}",
            AUDIT_EVENTS.join(", ")
        ));
    }
    let user = match call.query_param("user_id").filter(|u| !u.is_empty()) {
        None => None,
        Some(u) => match u.parse::<u64>() {
            Ok(u) => Some(u),
            Err(_) => return bad("user_id must be a number"),
        },
    };
    let mut bounds = [None, None];
    for (slot, name) in bounds.iter_mut().zip(["date_from", "date_to"]) {
        if let Some(text) = call.query_param(name).filter(|t| !t.is_empty()) {
            match parse_time(text) {
                Some(t) => *slot = Some(t),
                None => return bad(&format!("{name} must be an ISO-8601 date")),
            }
        }
    }
    let [from, to] = bounds;
    let items: Vec<Value> = sim
        .settings
        .audit(account)
        .into_iter()
        .filter(|item| {
            let when = item["date"].as_u64().unwrap_or(0);
            events
                .as_ref()
                .is_none_or(|e| e.iter().any(|e| item["event"] == *e))
                && user.is_none_or(|u| item["user_id"].as_u64() == Some(u))
                && from.is_none_or(|f| when >= f)
                && to.is_none_or(|t| when <= t)
        })
        .collect();
    reply::ok(paged(call, page, items))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_show_in_the_list_and_the_logs() {
        let store = Store::default();
        let before = store.list(7, "teams").expect("teams").len();
        let mut team = Map::new();
        team.insert("name".into(), json!("Night shift"));
        let made = store.create(7, "teams", team);
        let id = made["id"].as_u64().expect("an id");
        assert_eq!(store.list(7, "teams").expect("teams").len(), before + 1);
        let first = store.list(7, "teams").expect("teams")[0]["id"]
            .as_u64()
            .expect("id");
        store.change(7, "teams", first, None);
        store.change(
            7,
            "teams",
            id,
            Some(json!({"id": id, "name": "Late shift"})),
        );
        let teams = store.list(7, "teams").expect("teams");
        assert_eq!(teams.len(), before, "one made, one deleted");
        assert!(teams.iter().all(|t| t["id"].as_u64() != Some(first)));
        assert!(teams.iter().any(|t| t["name"] == "Late shift"));
        let history = store.list(7, "history").expect("history");
        assert_eq!(history[0]["action"], "updated", "newest first: {history:?}");
        assert_eq!(history[1]["action"], "deleted");
        assert_eq!(history[2]["action"], "created");
        let edited = store.audit(7);
        assert_eq!(edited[0]["event"], "settings_edited");
        assert_eq!(
            store.list(8, "teams").expect("teams").len(),
            before,
            "other accounts untouched"
        );
    }
}
