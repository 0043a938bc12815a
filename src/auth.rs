//! Client keys, scopes and accounts. Clients present a gateway key where their CX Social
//! token used to be; the configuration holds keys only as SHA-256, and a match is found in
//! time that leaks neither which client matched nor where. [`Clients::authenticate`] says how,
//! and why a matched key is remembered.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use http::Method;

use crate::config::{ClientConfig, Config, Priority};

/// The name anonymous callers get in metrics and logs.
pub const ANONYMOUS: &str = "anonymous";

/// A caller the gateway has recognised.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: Arc<str>,
    pub read: bool,
    pub write: bool,
    pub accounts: Option<Arc<[u64]>>,
    pub priority: Priority,
    /// Its place among the callers of one configuration: 0 for anonymous, then the
    /// configured clients in order. A small number, so per-request bookkeeping (metric
    /// handles) can find it without hashing the name.
    pub ordinal: usize,
}

impl Client {
    fn anonymous() -> Client {
        Client {
            name: Arc::from(ANONYMOUS),
            read: true,
            write: true,
            accounts: None,
            priority: Priority::Interactive,
            ordinal: 0,
        }
    }

    fn from_config(c: &ClientConfig, ordinal: usize) -> Client {
        Client {
            name: Arc::from(c.name.as_str()),
            read: c.read,
            write: c.write,
            accounts: c.accounts.as_ref().map(|a| Arc::from(a.as_slice())),
            priority: c.priority,
            ordinal,
        }
    }

    /// Whether the method is inside this client's scopes.
    pub fn may_use(&self, method: &Method) -> bool {
        if method == Method::GET || method == Method::HEAD {
            self.read
        } else {
            self.write
        }
    }

    /// Whether this client may touch `account` (`None`: the path names no account).
    pub fn may_see(&self, account: Option<u64>) -> bool {
        match (&self.accounts, account) {
            (None, _) | (Some(_), None) => true,
            (Some(allowed), Some(id)) => allowed.contains(&id),
        }
    }
}

/// The configured clients, ready for lookups.
#[derive(Debug)]
pub struct Clients {
    entries: Vec<Entry>,
    /// Who every caller is when no clients are configured; built once, lent to each request.
    anonymous: Client,
    /// Every configured key hash, for finding any client's key where none belongs.
    hashes: std::collections::HashSet<[u8; 32]>,
    /// Candidates hashed and found to be none of `hashes`: most of a key scan is hashing,
    /// and the same candidates come back request after request.
    not_keys: OnceLock<crate::leak::NotKeys>,
    /// How many entries have a proven key; counted after each is set.
    proven: AtomicUsize,
    /// The spellings of every proven key, with the `proven` count they were made for.
    spelled: Mutex<Option<(usize, Arc<crate::leak::Spellings>)>>,
}

/// One configured client.
struct Entry {
    hash: [u8; 32],
    client: Client,
    /// The key that was seen to hash to `hash`, once one has been.
    proven: OnceLock<Box<[u8]>>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The remembered key is a credential: say whether there is one, never what it is.
        f.debug_struct("Entry")
            .field("client", &self.client)
            .field("proven", &self.proven.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Why a key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Unknown,
}

impl Clients {
    pub fn from_config(cfg: &Config) -> Clients {
        Clients {
            entries: cfg
                .clients
                .iter()
                .enumerate()
                .map(|(i, c)| Entry {
                    hash: c.key_sha256,
                    client: Client::from_config(c, i + 1),
                    proven: OnceLock::new(),
                })
                .collect(),
            anonymous: Client::anonymous(),
            hashes: cfg.clients.iter().map(|c| c.key_sha256).collect(),
            not_keys: OnceLock::new(),
            proven: AtomicUsize::new(0),
            spelled: Mutex::new(None),
        }
    }

    /// The clients of `cfg` (a reload's), each still knowing the key it was proven with
    /// in `previous` when its `key_sha256` is unchanged: the key still hashes to it, and a
    /// key known in full stays searched in its spellings wherever no key belongs (a
    /// forwarded value, a token taken from the token file or the shared record) rather than
    /// being forgotten until its client calls again.
    pub fn carried_over(cfg: &Config, previous: &Clients) -> Clients {
        let clients = Clients::from_config(cfg);
        for entry in &clients.entries {
            let proven = previous
                .entries
                .iter()
                .find(|p| p.hash == entry.hash)
                .and_then(|p| p.proven.get());
            if let Some(key) = proven {
                if entry.proven.set(key.clone()).is_ok() {
                    clients.proven.fetch_add(1, Ordering::Release);
                }
            }
        }
        clients
    }

    /// No clients at all (anonymous mode): no key to find anywhere.
    pub fn none() -> Clients {
        Clients {
            entries: Vec::new(),
            anonymous: Client::anonymous(),
            hashes: std::collections::HashSet::new(),
            not_keys: OnceLock::new(),
            proven: AtomicUsize::new(0),
            spelled: Mutex::new(None),
        }
    }

    /// Whether `candidate` is some configured client's key. Not constant time: it answers
    /// where a key must not be (a forwarded value), not who is calling, and only a digest
    /// is compared.
    /// A candidate found to be no key is remembered ([`crate::leak::NotKeys`], its bytes
    /// in full) and not hashed again while this configuration lasts.
    pub fn is_some_key(&self, candidate: &[u8]) -> bool {
        if self.hashes.is_empty() {
            return false;
        }
        let not_keys = self.not_keys.get_or_init(Default::default);
        if not_keys.holds(candidate) {
            return false;
        }
        let key = self.hashes.contains(&sha256(candidate));
        if !key {
            not_keys.record(candidate);
        }
        key
    }

    /// The [`crate::leak::Spellings`] of every key a client has authenticated with (only
    /// those are known in full: the configuration holds digests), made once per key proven
    /// and shared by every scan until the next. `None`: no key proven yet.
    pub fn proven_spellings(&self) -> Option<Arc<crate::leak::Spellings>> {
        let proven = self.proven.load(Ordering::Acquire);
        if proven == 0 {
            return None;
        }
        let mut held = self.spelled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((made_for, spellings)) = &*held {
            if *made_for == proven {
                return Some(spellings.clone());
            }
        }
        let keys = self.entries.iter().filter_map(|e| e.proven.get());
        let spellings = Arc::new(crate::leak::Spellings::of_all(keys.map(|k| &**k)));
        *held = Some((proven, spellings.clone()));
        Some(spellings)
    }

    /// Whether `key` is one a client has authenticated with (see [`Clients::proven_spellings`]).
    pub fn is_proven(&self, key: &[u8]) -> bool {
        self.remembered(key).is_some()
    }

    /// Anonymous mode: no clients configured.
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The client with this ordinal ([`Client::ordinal`]: 0 is anonymous).
    pub fn by_ordinal(&self, ordinal: usize) -> Option<&Client> {
        match ordinal {
            0 => Some(&self.anonymous),
            n => self.entries.get(n - 1).map(|e| &e.client),
        }
    }

    /// Finds the client for a presented key.
    ///
    /// A presented key is hashed once and compared against every configured hash in constant
    /// time, so neither the timing nor the order of clients leaks a match. Hashing on every
    /// request is the largest part of authenticating, so a key that matched is remembered with
    /// its client (one key per client, for the life of one configuration snapshot; a reload
    /// keeps it for a client whose `key_sha256` is unchanged: [`Clients::carried_over`]). Later requests compare the presented key against every remembered key,
    /// again in time that does not depend on which matched, and hash only when none does.
    /// Unknown keys are never remembered, so strangers cannot grow the memory.
    pub fn authenticate(&self, key: Option<&str>) -> Result<&Client, AuthError> {
        if self.is_open() {
            return Ok(&self.anonymous);
        }
        let key = key.filter(|k| !k.is_empty()).ok_or(AuthError::Missing)?;
        if let Some(entry) = self.remembered(key.as_bytes()) {
            return Ok(&entry.client);
        }
        let digest = sha256(key.as_bytes());
        let mut found = None;
        // Visit every entry, whatever matches, so the time taken does not depend on where
        // (or whether) the key is in the list.
        for entry in &self.entries {
            if constant_time_eq(&entry.hash, &digest) {
                found = Some(entry);
            }
        }
        let entry = found.ok_or(AuthError::Unknown)?;
        // A race with another request proving the same key sets it once; either is the key.
        if entry.proven.set(key.as_bytes().into()).is_ok() {
            self.proven.fetch_add(1, Ordering::Release);
        }
        Ok(&entry.client)
    }

    /// The entry whose remembered key is `key`, comparing against every remembered key in
    /// time that does not depend on which (if any) matches.
    fn remembered(&self, key: &[u8]) -> Option<&Entry> {
        let mut found = None;
        for entry in &self.entries {
            if entry.proven.get().is_some_and(|k| same_secret(k, key)) {
                found = Some(entry);
            }
        }
        found
    }
}

/// Byte equality in time that depends on the lengths only, not on where the bytes differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why an account segment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotCanonical(pub &'static str);

/// The account a path addresses: its first segment, read in exactly one way.
///
/// A first segment whose first letter or digit is a digit (after percent-decoding, and
/// whatever non-alphanumeric bytes come before it: signs, spaces, tabs, zero-width
/// characters) names an account, and must then be spelled canonically: ASCII digits, no
/// leading zero, nothing else, within `u64`. Every other spelling of a number (`0123`,
/// `+123`, `%2B123`, ` 123`, fullwidth or other Unicode digits, `123abc`, a number past
/// `u64`) is refused, because the upstream or a route could read it as an account the
/// caller was never authorised for. `Ok(None)`: the path names no account (`/me`).
/// Percent-escapes must already be valid UTF-8 (the target check refuses the rest).
pub fn account_of(path: &str) -> Result<Option<u64>, NotCanonical> {
    let decoded = first_segment(path);
    let Some(lead) = decoded.chars().find(|c| c.is_alphanumeric()) else {
        return Ok(None);
    };
    if !lead.is_numeric() {
        return Ok(None);
    }
    canonical_account(&decoded).map(Some)
}

/// The first segment of `path` as the upstream reads it: percent-decoded once (invalid
/// escapes and bytes that are not UTF-8 become replacement characters). The account check
/// and the refusal of the simulator's controls both read this one segment.
pub fn first_segment(path: &str) -> std::borrow::Cow<'_, str> {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    crate::config::route::percent_decode(first)
}

/// `text` as an account id if it is the canonical spelling of one.
pub fn canonical_account(text: &str) -> Result<u64, NotCanonical> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(NotCanonical(
            "the account id must be written in plain ASCII digits (no sign, space, padding \
             or other characters)",
        ));
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return Err(NotCanonical("the account id must not have leading zeros"));
    }
    text.parse()
        .map_err(|_| NotCanonical("the account id is too large"))
}

/// Hex SHA-256, as `cxgate key hash` prints and `clients[].key_sha256` stores.
pub fn sha256_hex(data: &[u8]) -> String {
    sha256(data).iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clients() -> Clients {
        let cfg = crate::config::parse(&format!(
            "upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n[[clients]]\nname=\"a\"\nkey_sha256=\"{}\"\naccounts=[7]\n\
             [[clients]]\nname=\"b\"\nkey_sha256=\"{}\"\nscopes=[\"read\"]\n",
            sha256_hex(b"key-a"),
            sha256_hex(b"key-b")
        ))
        .unwrap();
        Clients::from_config(&cfg)
    }

    #[test]
    fn known_keys_find_their_client() {
        let c = clients();
        assert_eq!(&*c.authenticate(Some("key-a")).unwrap().name, "a");
        assert_eq!(&*c.authenticate(Some("key-b")).unwrap().name, "b");
        assert_eq!(
            c.authenticate(Some("key-c")).unwrap_err(),
            AuthError::Unknown
        );
        assert_eq!(c.authenticate(None).unwrap_err(), AuthError::Missing);
        assert_eq!(c.authenticate(Some("")).unwrap_err(), AuthError::Missing);
    }

    #[test]
    fn remembered_keys_still_find_only_their_client() {
        let c = clients();
        for _ in 0..2 {
            assert_eq!(&*c.authenticate(Some("key-a")).unwrap().name, "a");
            assert_eq!(&*c.authenticate(Some("key-b")).unwrap().name, "b");
            for wrong in ["key-", "key-a ", "key-c", "KEY-A", "key-aa"] {
                let seen = c.authenticate(Some(wrong));
                assert_eq!(seen.unwrap_err(), AuthError::Unknown, "{wrong:?}");
            }
        }
        let debug = format!("{c:?}");
        assert!(!debug.contains("key-a"), "a remembered key leaked: {debug}");
        assert!(same_secret(b"k", b"k") && !same_secret(b"k", b"kk") && !same_secret(b"a", b"b"));
    }

    #[test]
    fn ordinals_number_anonymous_then_the_configured_clients() {
        let c = clients();
        assert_eq!(c.authenticate(Some("key-a")).unwrap().ordinal, 1);
        assert_eq!(c.authenticate(Some("key-b")).unwrap().ordinal, 2);
        let cfg =
            crate::config::parse("upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n").unwrap();
        let open = Clients::from_config(&cfg);
        let anonymous = open.authenticate(None).unwrap();
        assert_eq!((&*anonymous.name, anonymous.ordinal), (ANONYMOUS, 0));
    }

    #[test]
    fn scopes_and_accounts() {
        let c = clients();
        let a = c.authenticate(Some("key-a")).unwrap();
        let b = c.authenticate(Some("key-b")).unwrap();
        assert!(a.may_see(Some(7)) && !a.may_see(Some(8)) && a.may_see(None));
        assert!(b.may_use(&Method::GET) && b.may_use(&Method::HEAD) && !b.may_use(&Method::POST));
        assert!(!a.may_use(&Method::POST), "default scopes are read only");
    }

    #[test]
    fn account_is_the_canonical_first_segment() {
        assert_eq!(account_of("/12345/inbox/mentions"), Ok(Some(12345)));
        assert_eq!(account_of("/0/x"), Ok(Some(0)));
        assert_eq!(account_of("/me/accounts"), Ok(None));
        assert_eq!(account_of("/"), Ok(None));
        assert_eq!(account_of("/-/x"), Ok(None));
        assert_eq!(account_of("/m%31/x"), Ok(None));
        for bad in [
            "/012345/x",
            "/+12345/x",
            "/%2B12345/x",
            "/-12345/x",
            "/%2012345/x",
            "/%0912345/x",
            "/12345%20/x",
            "/12a/x",
            "/12.0/x",
            "/%EF%BC%91%EF%BC%92/x",
            "/\u{0661}/x",
            "/%E2%80%8B12/x",
            "/99999999999999999999999/x",
            "/12%/x",
        ] {
            assert!(account_of(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn hash_matches_the_documented_example() {
        assert_eq!(
            sha256_hex(b"password"),
            "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
        );
    }
}
