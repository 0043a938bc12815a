//! Values read from Redis that no replica wrote: a budget state years ahead, a pause past
//! the upstream's window, a count that does not parse, a lock with no expiry, a key of
//! another type than the string the gateway writes. Each site bounds, drops or replaces
//! what it found; this is where every such repair is counted
//! (`cxgate_redis_repairs_total{key}`, every key at 0 from the first scrape) and said: one
//! warning when an incident begins, not one per repair, since a planted value is found
//! again on every call until it is gone, and a value planted again and again is one
//! incident for as long as it goes on (with a reminder every [`REMIND`]). Where the site
//! can tell one planted value from another (a digest of it), a different value begins a
//! new incident at once: the same one found every second is one incident, another one is
//! news.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus::{IntCounterVec, Opts, Registry};
use tokio::time::Instant;

/// The keys a repair is counted under: the key's name after the deployment's prefix, with
/// a per-client, per-entry or per-lock part left out. `other` is any key not listed.
pub(super) const KEYS: &[&str] = &[
    "budget:global",
    "budget:client",
    "budget:pause",
    "budget:upstream_left",
    "budget:in_flight",
    "budget:resumes",
    "budget:learning",
    "budget:learned",
    "budget:probe",
    "budget:assumed",
    "budget:spent",
    "token",
    "token:lock",
    "token:spent",
    "token:refused",
    "tables",
    "cache:lock",
    "cache:generation",
    "cache:entry",
    "invalidate:seq",
    "other",
];

/// A repair more than this after the last one of the same key begins a new incident.
const QUIET: Duration = Duration::from_secs(60);
/// While an incident goes on it is said again this often, with the repairs since.
const REMIND: Duration = Duration::from_secs(600);

/// One key's current incident.
struct Spell {
    last: Instant,
    warned: Instant,
    /// Repairs since the last warning.
    since: u64,
    /// The digest of the value repaired last, where the site gave one.
    value: Option<u64>,
}

/// The counter and the incidents in progress.
pub(super) struct Repairs {
    counter: IntCounterVec,
    spells: Mutex<HashMap<&'static str, Spell>>,
}

impl Repairs {
    pub(super) fn register(registry: &Registry) -> Result<Repairs, prometheus::Error> {
        let counter = IntCounterVec::new(
            Opts::new(
                "cxgate_redis_repairs_total",
                "Values read from Redis that no replica writes (out of bounds, unreadable, or \
                 of the wrong type) and were cut back, dropped or replaced, by key.",
            ),
            &["key"],
        )?;
        registry.register(Box::new(counter.clone()))?;
        for key in KEYS {
            counter.with_label_values(&[key]);
        }
        Ok(Repairs {
            counter,
            spells: Mutex::new(HashMap::new()),
        })
    }

    /// Counts a repair of `key` (its full name, as shown in the log) under `label`, and
    /// warns with `what` (what was found, and what was done about it) when it begins an
    /// incident or one has gone on for [`REMIND`] since its last warning.
    pub(super) fn note(&self, label: &'static str, key: &str, what: &str) {
        self.note_value(label, key, None, what);
    }

    /// [`Repairs::note`] for a value the site can tell apart by `value` (a digest of it):
    /// a value other than the one repaired last begins a new incident, warned at once.
    pub(super) fn note_value(
        &self,
        label: &'static str,
        key: &str,
        value: Option<u64>,
        what: &str,
    ) {
        self.counter.with_label_values(&[label]).inc();
        let now = Instant::now();
        let mut spells = self.spells.lock().unwrap_or_else(PoisonError::into_inner);
        let mut begins = false;
        let spell = spells.entry(label).or_insert_with(|| {
            begins = true;
            Spell {
                last: now,
                warned: now,
                since: 0,
                value,
            }
        });
        if now.duration_since(spell.last) > QUIET || (value.is_some() && spell.value != value) {
            begins = true;
        }
        spell.value = value;
        let reminds = !begins && now.duration_since(spell.warned) >= REMIND;
        spell.last = now;
        spell.since += 1;
        if begins || reminds {
            let repairs = spell.since;
            spell.warned = now;
            spell.since = 0;
            drop(spells);
            if begins {
                tracing::warn!(key, "Redis held a value no replica writes: {what}");
            } else {
                tracing::warn!(
                    key,
                    repairs,
                    "Redis still gets values no replica writes ({repairs} repairs in the last \
                     {} minutes): {what}",
                    REMIND.as_secs() / 60
                );
            }
        }
    }
}

/// The label of `suffix` (a key's name after `{prefix}:`).
pub(super) fn label(suffix: &str) -> &'static str {
    if let Some(&k) = KEYS.iter().find(|&&k| k == suffix) {
        return k;
    }
    for (start, k) in [
        ("budget:client:", "budget:client"),
        ("cache:lock:", "cache:lock"),
        ("cache:gen", "cache:generation"),
        ("cache:set:", "cache:generation"),
        ("cache:entry:", "cache:entry"),
        ("token:spent:", "token:spent"),
    ] {
        if suffix.starts_with(start) {
            return k;
        }
    }
    "other"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_warning_per_incident_and_every_repair_counted() {
        let registry = Registry::new();
        let repairs = Repairs::register(&registry).expect("register");
        let count = |k: &str| repairs.counter.with_label_values(&[k]).get();
        let begun = |r: &Repairs| {
            r.spells
                .lock()
                .unwrap()
                .get("budget:global")
                .map(|s| s.since)
        };
        repairs.note("budget:global", "{p}:budget:global", "cut back");
        assert_eq!(begun(&repairs), Some(0), "expected the first repair warned");
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            repairs.note("budget:global", "{p}:budget:global", "cut back");
        }
        assert_eq!(count("budget:global"), 31);
        assert_eq!(
            begun(&repairs),
            Some(30),
            "expected repeats within the incident unsaid"
        );
        tokio::time::advance(QUIET + Duration::from_secs(1)).await;
        repairs.note("budget:global", "{p}:budget:global", "cut back");
        assert_eq!(begun(&repairs), Some(0), "expected a new incident warned");
        assert_eq!(count("budget:pause"), 0);
        // A value told apart by its digest: the same one again is the same incident, another
        // one a new incident at once, however soon.
        repairs.note_value("token", "{p}:token", Some(7), "unreadable");
        tokio::time::advance(Duration::from_secs(1)).await;
        repairs.note_value("token", "{p}:token", Some(7), "unreadable");
        let since = |r: &Repairs| r.spells.lock().unwrap().get("token").map(|s| s.since);
        assert_eq!(since(&repairs), Some(1), "expected the same value unsaid");
        tokio::time::advance(Duration::from_secs(1)).await;
        repairs.note_value("token", "{p}:token", Some(8), "unreadable");
        assert_eq!(
            since(&repairs),
            Some(0),
            "expected another value warned at once"
        );
        assert_eq!(label("budget:client:a"), "budget:client");
        assert_eq!(label("budget:pause"), "budget:pause");
        assert_eq!(label("nothing"), "other");
    }
}
