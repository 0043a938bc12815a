//! The tag index: which stored keys carry which tag, so a write can drop them at once.
//!
//! Every stored response owns a `Revoked` flag shared with its index entries. Revoking a
//! tag sets the flags of every key registered under it before anything else, and lookups
//! refuse flagged entries, so an invalidation holds even for an insert still on its way
//! into the cache. Registrations are removed only by the flag that made them, so removing
//! an old value never unregisters the newer value that replaced it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set once an entry's tag was invalidated; never cleared.
#[derive(Debug, Clone, Default)]
pub(crate) struct Revoked(Arc<AtomicBool>);

impl Revoked {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn same(&self, other: &Revoked) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// tag → (key → flag of the value stored under that key).
#[derive(Debug, Default)]
pub(crate) struct TagIndex {
    by_tag: HashMap<String, HashMap<String, Revoked>>,
}

impl TagIndex {
    pub(crate) fn register(&mut self, key: &str, tags: &[String], flag: &Revoked) {
        for tag in tags {
            self.by_tag
                .entry(tag.clone())
                .or_default()
                .insert(key.to_owned(), flag.clone());
        }
    }

    /// Forgets `key` under `tags`, but only where the registration is still `flag`'s.
    pub(crate) fn unregister(&mut self, key: &str, tags: &[String], flag: &Revoked) {
        for tag in tags {
            let Some(keys) = self.by_tag.get_mut(tag) else {
                continue;
            };
            if keys.get(key).is_some_and(|f| f.same(flag)) {
                keys.remove(key);
                if keys.is_empty() {
                    self.by_tag.remove(tag);
                }
            }
        }
    }

    /// Flags and forgets every key under `tags`; returns those keys, each once, so the
    /// caller can remove them from the cache.
    pub(crate) fn revoke(&mut self, tags: &[String]) -> Vec<String> {
        let mut revoked = Vec::new();
        for tag in tags {
            let Some(keys) = self.by_tag.remove(tag) else {
                continue;
            };
            for (key, flag) in keys {
                flag.set();
                revoked.push(key);
            }
        }
        // A key carrying two of the tags is found twice.
        revoked.sort_unstable();
        revoked.dedup();
        revoked
    }

    /// How many (tag, key) registrations exist.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_tag.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| (*t).to_owned()).collect()
    }

    #[test]
    fn revoke_flags_exactly_the_tagged_keys_once() {
        let mut index = TagIndex::default();
        let (a, b, c) = (Revoked::default(), Revoked::default(), Revoked::default());
        index.register("a", &tags(&["x", "y"]), &a);
        index.register("b", &tags(&["y"]), &b);
        index.register("c", &tags(&["z"]), &c);
        let keys = index.revoke(&tags(&["x", "y"]));
        assert_eq!(
            keys,
            ["a", "b"],
            "expected keys a and b once each, saw {keys:?}"
        );
        assert!(
            a.is_set() && b.is_set(),
            "expected a and b flagged, saw a={} b={}",
            a.is_set(),
            b.is_set()
        );
        assert!(!c.is_set(), "c carries no revoked tag but was flagged");
        assert_eq!(
            index.len(),
            1,
            "expected only c's registration left, saw {}",
            index.len()
        );
    }

    #[test]
    fn unregister_keeps_a_newer_registration() {
        let mut index = TagIndex::default();
        let (old, new) = (Revoked::default(), Revoked::default());
        index.register("k", &tags(&["t", "only-old"]), &old);
        index.register("k", &tags(&["t"]), &new);
        index.unregister("k", &tags(&["t", "only-old"]), &old);
        assert_eq!(
            index.len(),
            1,
            "expected the new registration to survive, saw {} left",
            index.len()
        );
        let keys = index.revoke(&tags(&["t"]));
        assert_eq!(
            keys,
            ["k"],
            "expected k still indexed under t, saw {keys:?}"
        );
        assert!(
            new.is_set() && !old.is_set(),
            "expected only the new flag set"
        );
        index.unregister("k", &tags(&["t"]), &new);
        assert_eq!(
            index.len(),
            0,
            "expected an empty index, saw {}",
            index.len()
        );
    }
}
