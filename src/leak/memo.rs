//! Candidates already seen not to be a configured key. The configuration holds keys only as
//! SHA-256, so each candidate a value offers is hashed, and hashing is most of what a key
//! scan costs; yet the same candidates come back in every request (`Mozilla/5.0`,
//! `application/json`, a query's parameter names, a body's field names) and in every
//! layer of one (a percent-decoded layer repeats the tokens that held no escape). Whether a
//! candidate is a key depends only on the configuration, so a verdict of "no key" holds
//! for the life of the configuration snapshot that owns this memo.
//!
//! The memo is exact: a slot holds the candidate's bytes, compared in full, never a hash
//! of them, so it can only say "seen, not a key" of those very bytes. It is bounded: one
//! direct-mapped table, a candidate replacing whatever held its slot. A slot is taken with
//! `try_lock`, and a slot another thread holds is treated as empty (the candidate is
//! hashed as before), so no request ever waits on another.

use std::sync::Mutex;

/// Candidates longer than this are hashed every time (a slot holds this many bytes).
const SLOT_BYTES: usize = 59;
/// Slots in the table: at 64 bytes each, 128 KiB per configuration with clients.
const SLOTS: usize = 2048;

/// Candidates known not to be a key, for one configuration's key set.
pub struct NotKeys {
    slots: Box<[Mutex<Slot>]>,
    /// Seeds the slot hash, so which candidates share a slot is not known outside.
    seed: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    /// 0: empty (a candidate is never empty).
    len: u8,
    bytes: [u8; SLOT_BYTES],
}

impl Default for NotKeys {
    fn default() -> NotKeys {
        NotKeys {
            slots: (0..SLOTS)
                .map(|_| {
                    Mutex::new(Slot {
                        len: 0,
                        bytes: [0; SLOT_BYTES],
                    })
                })
                .collect(),
            seed: fastrand::u64(..) | 1,
        }
    }
}

impl std::fmt::Debug for NotKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The slots hold what requests carried: say how many there are, not what.
        f.debug_struct("NotKeys")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl NotKeys {
    /// Whether `candidate` was recorded by [`NotKeys::record`] (and still holds its slot).
    pub fn holds(&self, candidate: &[u8]) -> bool {
        let Some(slot) = self.slot(candidate) else {
            return false;
        };
        slot.try_lock().is_ok_and(|s| {
            usize::from(s.len) == candidate.len() && &s.bytes[..candidate.len()] == candidate
        })
    }

    /// Records `candidate` as no key.
    pub fn record(&self, candidate: &[u8]) {
        if candidate.is_empty() {
            return;
        }
        let Some(slot) = self.slot(candidate) else {
            return;
        };
        if let Ok(mut s) = slot.try_lock() {
            s.len = candidate.len() as u8;
            s.bytes[..candidate.len()].copy_from_slice(candidate);
        }
    }

    fn slot(&self, candidate: &[u8]) -> Option<&Mutex<Slot>> {
        if candidate.len() > SLOT_BYTES {
            return None;
        }
        let mut h = self.seed ^ candidate.len() as u64;
        for chunk in candidate.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            h = (h ^ u64::from_le_bytes(word))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_left(29);
        }
        h = (h ^ (h >> 32)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        Some(&self.slots[(h >> 32) as usize % SLOTS])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_only_the_very_bytes_recorded() {
        let memo = NotKeys::default();
        memo.record(b"Mozilla/5.0");
        assert!(
            memo.holds(b"Mozilla/5.0"),
            "expected a recorded candidate held"
        );
        for other in [
            &b"Mozilla/5.1"[..],
            b"Mozilla/5.0 ",
            b"Mozilla/5.",
            b"mozilla/5.0",
        ] {
            assert!(
                !memo.holds(other),
                "expected {:?} not held: only the recorded bytes are",
                String::from_utf8_lossy(other)
            );
        }
        let long = [b'a'; SLOT_BYTES + 1];
        memo.record(&long);
        assert!(
            !memo.holds(&long),
            "expected a candidate past a slot never held"
        );
        // However many candidates go through it, each answer is about its own bytes.
        for i in 0..10 * SLOTS {
            memo.record(format!("word-{i}").as_bytes());
        }
        for i in 0..10 * SLOTS {
            let stranger = format!("word+{i}");
            assert!(
                !memo.holds(stranger.as_bytes()),
                "expected a candidate never recorded not held ({stranger})"
            );
        }
        let last = format!("word-{}", 10 * SLOTS - 1);
        assert!(
            memo.holds(last.as_bytes()),
            "expected the last recorded held"
        );
    }

    fn clients(key: &str) -> crate::auth::Clients {
        let cfg = crate::config::parse(&format!(
            "upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n\
             [[clients]]\nname=\"a\"\nkey_sha256=\"{}\"\n",
            crate::auth::sha256_hex(key.as_bytes())
        ))
        .unwrap();
        crate::auth::Clients::from_config(&cfg)
    }

    /// A candidate remembered as no key never hides a key: not in a later request, not in a
    /// later layer of the same value, and not in a configuration where it is one.
    #[test]
    fn remembered_candidates_never_hide_a_key() {
        const KEY: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==";
        let c = clients(KEY);
        let scan = || crate::leak::KeyScan::new(&c, None);
        for round in 0..3 {
            for text in [
                format!("note={KEY}&x=1"),
                format!("a=%{}", KEY.replace('=', "%3D")),
                format!("Mozilla/5.0 {KEY}"),
            ] {
                assert!(
                    scan().in_value(text.as_bytes()),
                    "expected the key found in {text:?} (round {round})"
                );
            }
            assert!(
                !scan().in_value(b"note=Zm9vYmFy&x=1 Mozilla/5.0"),
                "expected no key in a value of other candidates (round {round})"
            );
        }
        // Seen as no key under one configuration, the same bytes are the key of the next.
        let before = clients("another-key-0000");
        assert!(!crate::leak::KeyScan::new(&before, None).in_value(b"x=plainword123"));
        let after = clients("plainword123");
        assert!(
            crate::leak::KeyScan::new(&after, None).in_value(b"x=plainword123"),
            "expected the new configuration's key found"
        );
    }
}
