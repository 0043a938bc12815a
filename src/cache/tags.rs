//! The tag index: which stored keys carry which tag, so a write can drop them at once. It
//! needs no serials or flags of its own, because the store changes it and the cache together
//! under one lock, and it stays small, because there is one registration per tag per entry
//! ([`TagIndex`]).

use std::collections::{HashMap, HashSet};

/// tag hash → the entries carrying it.
///
/// Tags and keys are held as the store's 32-bit hashes (a collision can only make an
/// invalidation drop one entry too many, never keep one). The store changes the index and
/// the cache together under one lock (see `Store`), and forgets a removed entry's
/// registrations only when no newer value is held under its key.
///
/// Memory matters here (one registration per tag per entry): a tag that only one entry
/// carries, such as a contact's own tag, is one 8-byte slot of a flat map; only tags that
/// several entries share get a set of their own.
#[derive(Debug, Default)]
pub(crate) struct TagIndex {
    /// Tags exactly one entry carries: tag → key.
    single: HashMap<u32, u32>,
    /// Tags two or more entries carry: tag → keys.
    shared: HashMap<u32, HashSet<u32>>,
}

/// An entry that left the cache, to be forgotten by the index.
#[derive(Debug)]
pub(crate) struct Removed {
    pub key: u32,
    pub tags: Vec<u32>,
}

impl TagIndex {
    pub(crate) fn register(&mut self, key: u32, tags: impl Iterator<Item = u32>) {
        for tag in tags {
            if let Some(keys) = self.shared.get_mut(&tag) {
                keys.insert(key);
                continue;
            }
            match self.single.insert(tag, key) {
                Some(other) if other != key => {
                    self.single.remove(&tag);
                    self.shared.insert(tag, HashSet::from([other, key]));
                }
                _ => {}
            }
        }
    }

    /// Forgets `key` under `tags`.
    pub(crate) fn unregister(&mut self, key: u32, tags: &[u32]) {
        for tag in tags {
            if self.single.get(tag) == Some(&key) {
                self.single.remove(tag);
            } else if let Some(keys) = self.shared.get_mut(tag) {
                keys.remove(&key);
                if keys.len() <= 1 {
                    let last = keys.iter().next().copied();
                    self.shared.remove(tag);
                    if let Some(last) = last {
                        self.single.insert(*tag, last);
                    }
                }
            }
        }
    }

    /// Forgets every key under `tags`; returns those keys, each once, so the caller can
    /// remove them from the cache.
    pub(crate) fn revoke(&mut self, tags: impl Iterator<Item = u32>) -> Vec<u32> {
        let mut revoked = Vec::new();
        for tag in tags {
            if let Some(key) = self.single.remove(&tag) {
                revoked.push(key);
            }
            if let Some(keys) = self.shared.remove(&tag) {
                revoked.extend(keys);
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
        self.single.len() + self.shared.values().map(HashSet::len).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revoke_returns_exactly_the_tagged_keys_once() {
        let mut index = TagIndex::default();
        index.register(1, [100, 200].into_iter());
        index.register(2, [200].into_iter());
        index.register(3, [300].into_iter());
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
    fn registering_a_key_again_keeps_one_registration() {
        let mut index = TagIndex::default();
        index.register(7, [100, 101].into_iter());
        index.register(7, [100].into_iter());
        index.register(8, [100].into_iter());
        index.register(8, [100].into_iter());
        assert_eq!(
            index.len(),
            3,
            "expected (100,7), (101,7), (100,8), saw {} registrations",
            index.len()
        );
        index.unregister(7, &[100, 101]);
        let keys = index.revoke([100].into_iter());
        assert_eq!(keys, [8], "expected key 8 still indexed, saw {keys:?}");
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
            index.register(key, [9].into_iter());
        }
        assert_eq!(
            index.len(),
            5,
            "expected 5 registrations, saw {}",
            index.len()
        );
        for key in 0..4 {
            index.unregister(key, &[9]);
        }
        assert_eq!(
            index.len(),
            1,
            "expected 1 registration, saw {}",
            index.len()
        );
        // Unregistering a key that is not registered leaves the live registration.
        index.unregister(2, &[9]);
        assert_eq!(index.revoke([9].into_iter()), [4]);
    }
}
