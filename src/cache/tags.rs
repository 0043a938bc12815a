//! The tag index: which stored keys carry which tag, so a write can drop them at once.
//!
//! Tags and keys are held as 64-bit hashes (a collision can only make an invalidation drop
//! one entry too many, never keep one). Each registration also records the entry's serial,
//! so forgetting an old value never unregisters the newer value that replaced it under the
//! same key. The store changes the index and the cache together under one lock (see
//! `Store`), so the index needs no flags of its own.
//!
//! Memory matters here (one registration per tag per entry): a tag that only one entry
//! carries, such as a contact's own tag, is held inline rather than in a map of its own.

use std::collections::HashMap;

/// The entries registered under one tag: key hash → serial.
#[derive(Debug)]
enum Members {
    One {
        key: u64,
        serial: u64,
    },
    /// Boxed on purpose: it keeps every `One` (most tags) at 16 bytes instead of 48.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<u64, u64>>),
}

/// An entry that left the cache, to be forgotten by the index.
#[derive(Debug)]
pub(crate) struct Removed {
    pub key: u64,
    pub serial: u64,
    pub tags: Vec<u64>,
}

/// tag hash → the entries carrying it.
#[derive(Debug, Default)]
pub(crate) struct TagIndex {
    by_tag: HashMap<u64, Members>,
}

impl TagIndex {
    pub(crate) fn register(&mut self, key: u64, serial: u64, tags: impl Iterator<Item = u64>) {
        for tag in tags {
            match self.by_tag.get_mut(&tag) {
                None => {
                    self.by_tag.insert(tag, Members::One { key, serial });
                }
                Some(Members::One { key: k, serial: s }) if *k == key => *s = serial,
                Some(one @ Members::One { .. }) => {
                    let Members::One {
                        key: other,
                        serial: other_serial,
                    } = *one
                    else {
                        continue;
                    };
                    let map = HashMap::from([(other, other_serial), (key, serial)]);
                    *one = Members::Many(Box::new(map));
                }
                Some(Members::Many(map)) => {
                    map.insert(key, serial);
                }
            }
        }
    }

    /// Forgets a removed entry under its tags, but only where the registration is still its.
    pub(crate) fn unregister(&mut self, removed: &Removed) {
        for tag in &removed.tags {
            let empty = match self.by_tag.get_mut(tag) {
                None => continue,
                Some(Members::One { key, serial }) => {
                    *key == removed.key && *serial == removed.serial
                }
                Some(Members::Many(map)) => {
                    if map.get(&removed.key) == Some(&removed.serial) {
                        map.remove(&removed.key);
                    }
                    map.is_empty()
                }
            };
            if empty {
                self.by_tag.remove(tag);
            }
        }
    }

    /// Forgets every key under `tags`; returns those keys, each once, so the caller can
    /// remove them from the cache.
    pub(crate) fn revoke(&mut self, tags: impl Iterator<Item = u64>) -> Vec<u64> {
        let mut revoked = Vec::new();
        for tag in tags {
            match self.by_tag.remove(&tag) {
                None => {}
                Some(Members::One { key, .. }) => revoked.push(key),
                Some(Members::Many(map)) => revoked.extend(map.keys()),
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
        self.by_tag
            .values()
            .map(|m| match m {
                Members::One { .. } => 1,
                Members::Many(map) => map.len(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removed(key: u64, serial: u64, tags: &[u64]) -> Removed {
        Removed {
            key,
            serial,
            tags: tags.to_vec(),
        }
    }

    #[test]
    fn revoke_returns_exactly_the_tagged_keys_once() {
        let mut index = TagIndex::default();
        index.register(1, 10, [100, 200].into_iter());
        index.register(2, 20, [200].into_iter());
        index.register(3, 30, [300].into_iter());
        let keys = index.revoke([100, 200].into_iter());
        assert_eq!(
            keys,
            [1, 2],
            "expected keys 1 and 2 once each, saw {keys:?}"
        );
        assert_eq!(
            index.len(),
            1,
            "expected only key 3's registration left, saw {}",
            index.len()
        );
    }

    #[test]
    fn unregister_keeps_a_newer_registration() {
        let mut index = TagIndex::default();
        index.register(7, 1, [100, 101].into_iter());
        index.register(7, 2, [100].into_iter());
        index.unregister(&removed(7, 1, &[100, 101]));
        assert_eq!(
            index.len(),
            1,
            "expected the new registration to survive, saw {} left",
            index.len()
        );
        let keys = index.revoke([100].into_iter());
        assert_eq!(keys, [7], "expected key 7 still indexed, saw {keys:?}");
        index.unregister(&removed(7, 2, &[100]));
        assert_eq!(
            index.len(),
            0,
            "expected an empty index, saw {}",
            index.len()
        );
    }

    #[test]
    fn a_shared_tag_grows_and_shrinks_between_one_and_many() {
        let mut index = TagIndex::default();
        for key in 0..5 {
            index.register(key, key + 100, [9].into_iter());
        }
        assert_eq!(
            index.len(),
            5,
            "expected 5 registrations, saw {}",
            index.len()
        );
        for key in 0..4 {
            index.unregister(&removed(key, key + 100, &[9]));
        }
        assert_eq!(
            index.len(),
            1,
            "expected 1 registration, saw {}",
            index.len()
        );
        // A stale serial does not remove the live registration.
        index.unregister(&removed(4, 3, &[9]));
        assert_eq!(index.revoke([9].into_iter()), [4]);
    }
}
