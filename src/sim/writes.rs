//! What clients wrote: mention updates, contact CRM changes, added messages and queued
//! drafts, kept in memory so a later read shows the write (the gateway's invalidation is
//! tested against this). [`Writes`] holds the invariants.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Map, Value};

use super::lock;

type MentionKey = (u64, u64, String);
type ContactKey = (u64, String, String);

#[derive(Default)]
struct Inner {
    mentions: HashMap<MentionKey, Map<String, Value>>,
    added: HashMap<MentionKey, Value>,
    /// The `(topic, id)` of each account's added messages, in the order they were added.
    added_order: HashMap<u64, Vec<(u64, String)>>,
    contacts: HashMap<ContactKey, Map<String, Value>>,
    deleted_mentions: std::collections::HashSet<MentionKey>,
    deleted_contacts: std::collections::HashSet<ContactKey>,
    /// Publisher drafts by account, in the order they were queued.
    drafts: HashMap<u64, Vec<Value>>,
    next_id: u64,
}

/// The writes of every account.
///
/// Invariants: a stored write is an overlay on the generated body, applied on every read,
/// so the generated data stays a pure function; everything sits behind one std Mutex held
/// briefly, and the overlays are checked before they are stored, so reads never fail.
#[derive(Default)]
pub(crate) struct Writes {
    inner: Mutex<Inner>,
}

/// Fields a mention update may not set (the clients send any other mention key); `note`
/// appends to `notes` instead of replacing.
const FIXED_FIELDS: [&str; 3] = ["id", "unique_id", "topic"];

impl Writes {
    /// Checks and stores a mention update (`updates` JSON object).
    pub fn update_mention(&self, key: MentionKey, updates: &Value) -> Result<(), String> {
        let fields = updates.as_object().ok_or("updates must be a JSON object")?;
        if let Some(bad) = fields.keys().find(|k| FIXED_FIELDS.contains(&k.as_str())) {
            return Err(format!(
                "updates may not set {bad:?}: {} are fixed",
                FIXED_FIELDS.join(", ")
            ));
        }
        if fields.get("tags").is_some_and(|t| !t.is_array()) {
            return Err("updates.tags must be a list".into());
        }
        let mut inner = lock(&self.inner);
        let overlay = inner.mentions.entry(key).or_default();
        for (field, value) in fields {
            if field == "note" {
                let notes = overlay
                    .entry("notes")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(list) = notes {
                    list.push(value.clone());
                }
            } else {
                overlay.insert(field.clone(), value.clone());
            }
        }
        Ok(())
    }

    /// Applies a stored update to a mention body.
    pub fn overlay_mention(&self, key: &MentionKey, mention: &mut Value) {
        let inner = lock(&self.inner);
        let Some(overlay) = inner.mentions.get(key) else {
            return;
        };
        for (field, value) in overlay {
            if field == "sentiment" {
                mention["message"]["sentiment"] = value.clone();
            } else {
                mention[field] = value.clone();
            }
        }
    }

    /// Stores a message added through `inbox/add`; answers its id.
    pub fn add_message(
        &self,
        account: u64,
        topic: u64,
        build: impl FnOnce(&str) -> Value,
    ) -> Value {
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = format!("custom-{}", inner.next_id);
        let message = build(&id);
        let order = inner.added_order.entry(account).or_default();
        order.push((topic, id.clone()));
        inner.added.insert((account, topic, id), message.clone());
        message
    }

    /// The `(topic, id)` of the messages added to `account`, oldest first.
    pub fn added_to(&self, account: u64) -> Vec<(u64, String)> {
        let inner = lock(&self.inner);
        inner.added_order.get(&account).cloned().unwrap_or_default()
    }

    /// A message added through `inbox/add`, if that is what the id names.
    pub fn added(&self, key: &MentionKey) -> Option<Value> {
        lock(&self.inner).added.get(key).cloned()
    }

    /// Deletes a mention: later reads answer 404 and lists leave it out.
    pub fn delete_mention(&self, key: MentionKey) -> bool {
        lock(&self.inner).deleted_mentions.insert(key)
    }

    pub fn mention_deleted(&self, key: &MentionKey) -> bool {
        lock(&self.inner).deleted_mentions.contains(key)
    }

    /// Deletes a contact: later reads answer 404.
    pub fn delete_contact(&self, key: ContactKey) -> bool {
        lock(&self.inner).deleted_contacts.insert(key)
    }

    pub fn contact_deleted(&self, key: &ContactKey) -> bool {
        lock(&self.inner).deleted_contacts.contains(key)
    }

    /// Queues a publisher draft of `account`; `build` gets its id.
    pub fn add_draft(&self, account: u64, build: impl FnOnce(u64) -> Value) -> Value {
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let draft = build(inner.next_id);
        inner.drafts.entry(account).or_default().push(draft.clone());
        draft
    }

    /// The drafts of `account`, oldest first.
    pub fn drafts(&self, account: u64) -> Vec<Value> {
        lock(&self.inner)
            .drafts
            .get(&account)
            .cloned()
            .unwrap_or_default()
    }

    /// Replaces (`Some`) or removes (`None`) one draft; whether it existed.
    pub fn change_draft(&self, account: u64, id: &str, with: Option<&Map<String, Value>>) -> bool {
        let mut inner = lock(&self.inner);
        let Some(list) = inner.drafts.get_mut(&account) else {
            return false;
        };
        let Some(at) = list.iter().position(|d| d["id"] == id) else {
            return false;
        };
        match with {
            Some(fields) => {
                for (k, v) in fields {
                    if k != "id" {
                        list[at][k] = v.clone();
                    }
                }
            }
            None => {
                list.remove(at);
            }
        }
        true
    }

    /// Merges CRM fields and custom attributes into a contact.
    pub fn update_contact(
        &self,
        key: ContactKey,
        crm: Map<String, Value>,
        custom: Map<String, Value>,
    ) {
        let mut inner = lock(&self.inner);
        let overlay = inner.contacts.entry(key).or_default();
        let mut merge = |section: &str, fields: Map<String, Value>| {
            if fields.is_empty() {
                return;
            }
            let slot = overlay
                .entry(section)
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(target) = slot {
                target.extend(fields);
            }
        };
        merge("crm", crm);
        merge("custom_attributes", custom);
    }

    pub fn overlay_contact(&self, key: &ContactKey, contact: &mut Value) {
        let inner = lock(&self.inner);
        let Some(overlay) = inner.contacts.get(key) else {
            return;
        };
        for (section, fields) in overlay {
            if let (Value::Object(target), Value::Object(fields)) = (&mut contact[section], fields)
            {
                target.extend(fields.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mention_updates_overlay_and_notes_append() {
        let writes = Writes::default();
        let key = (1, 11, "7".to_string());
        let first = writes.update_mention(key.clone(), &json!({"status": "closed", "note": "a"}));
        assert_eq!(first, Ok(()));
        let second = writes.update_mention(key.clone(), &json!({"note": "b"}));
        assert_eq!(second, Ok(()));
        let mut m = json!({"status": "new", "notes": [], "message": {"sentiment": 0}});
        writes.overlay_mention(&key, &mut m);
        assert_eq!(m["status"], "closed", "expected status overlay, saw {m}");
        assert_eq!(
            m["notes"],
            json!(["a", "b"]),
            "expected notes appended, saw {m}"
        );
        let refused = writes.update_mention(key, &json!({"id": "x"}));
        assert!(refused.is_err(), "expected unknown field refused");
    }

    #[test]
    fn contact_updates_merge() {
        let writes = Writes::default();
        let key = (1, "twitter".to_string(), "42".to_string());
        let mut crm = Map::new();
        crm.insert("email".into(), json!("new@example.com"));
        writes.update_contact(key.clone(), crm, Map::new());
        let mut c = json!({"crm": {"email": "old", "phone": "1"}, "custom_attributes": {}});
        writes.overlay_contact(&key, &mut c);
        assert_eq!(
            c["crm"],
            json!({"email": "new@example.com", "phone": "1"}),
            "saw {c}"
        );
    }
}
