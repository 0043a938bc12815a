//! The shared token's markers: `<prefix>:token:spent:<digest>` (a refresh token some
//! replica's refresh spent) and `<prefix>:token:refused` (the digest of the last refresh
//! token the token endpoint refused). They exist because refresh tokens rotate: one
//! presented twice is refused, and an endpoint that detects reuse may revoke the whole
//! grant, the other replicas' newer tokens with it. So no honest replica presents a token
//! another one spent.
//!
//! But anyone who can write to Redis can write a marker, and one believed blindly takes
//! every replica to re-authorisation at its next refresh. So each marker's value says who
//! set it and when (`<replica id> <Unix ms>`, after the digest for `refused`), and a
//! replica believes a marker about a refresh token it *proved itself* (it refreshed with
//! it, or `cxgate token init` wrote it, and the endpoint never refused it to this replica)
//! only when it set the marker itself or its writer is a replica it has seen listed as
//! listening (`{prefix}:replicas`, read every few seconds, so one that spent a token and
//! died since is still known). Any other marker about such a token is verified by trying:
//! one refresh under the refresh lock; if the endpoint takes it, the marker was wrong, and
//! it is counted in `cxgate_redis_repairs_total{key}` and warned once per marker. About a
//! refresh token that came from the shared record (never proven here) a marker is believed,
//! as before: the replica goes back to a pair it proved.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::secret::Secret;
use super::shared::{SharedToken, PATIENT};
use crate::replicas::Unavailable;

/// How long a presented refresh token is remembered as spent: longer than any replica holds
/// a proven refresh token unused while the others rotate theirs (a fallback to one spent
/// earlier than this is still refused by the endpoint, and never offered on).
const SPENT_TTL: Duration = Duration::from_secs(30 * 86_400);
/// How long a refused marker is kept: a refused refresh token never works again, and a new
/// one replaces the record long before.
const REFUSED_TTL: Duration = Duration::from_secs(86_400);
/// How many markers set by this replica, and writers seen listed, are remembered.
const REMEMBERED: usize = 64;

/// A marker found about a refresh token.
pub(super) struct Marker {
    /// The marker's key, as the log and the repair counter name it.
    pub key: String,
    /// What this replica remembers of markers it set (the key, and the digest for `refused`).
    ident: String,
    /// The replica that set it, as its value says; `None` for a value in no form a replica
    /// writes (planted, or a bare `1` an older version wrote).
    writer: Option<String>,
    /// A digest of the value, telling one marker from another in the repair warnings.
    fingerprint: u64,
}

/// What a replica remembers about markers: those it set, and the writers it saw listed.
#[derive(Default)]
pub(super) struct Known {
    set: Mutex<Vec<String>>,
    writers: Mutex<Vec<String>>,
}

fn remember(list: &Mutex<Vec<String>>, item: String) {
    let mut list = list.lock().unwrap_or_else(PoisonError::into_inner);
    if list.contains(&item) {
        return;
    }
    if list.len() >= REMEMBERED {
        list.remove(0);
    }
    list.push(item);
}

fn knows(list: &Mutex<Vec<String>>, item: &str) -> bool {
    list.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .any(|i| i == item)
}

/// A hex SHA-256 of a refresh token: enough to recognise it, nothing to present.
pub(super) fn digest(token: &Secret) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.expose().as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn fingerprint(text: &str) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d.as_ref()[..8]);
    u64::from_le_bytes(first).max(1)
}

/// The writer named by `<replica id> <Unix ms>`, if the words are in that form.
fn writer_of<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<String> {
    let id = words.next()?;
    let ms = words.next()?;
    let valid = !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && ms.len() <= 15
        && ms.bytes().all(|b| b.is_ascii_digit());
    (valid && words.next().is_none()).then(|| id.to_string())
}

impl SharedToken {
    /// This marker's value: this replica's id and the time.
    fn signature(&self) -> String {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("{} {ms}", self.redis.id())
    }

    fn spent_key(&self, digest: &str) -> String {
        format!("{}:{digest}", self.spent_prefix)
    }

    /// Notes that this replica's refresh with `refresh` succeeded: the endpoint consumed it
    /// (before the new record is stored, so no replica reads the record and not the note).
    pub(super) async fn mark_spent(&self, refresh: &Secret) {
        if !self.note_spent(&digest(refresh)).await {
            self.spent_while_away(refresh);
        }
    }

    /// Sets `<prefix>:token:spent:<digest>`; false when Redis did not take it.
    async fn note_spent(&self, digest: &str) -> bool {
        let key = self.spent_key(digest);
        remember(&self.known.set, key.clone());
        let value = self.signature();
        let noted: Result<(), _> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("EX")
                    .arg(SPENT_TTL.as_secs())
                    .query_async(&mut c)
                    .await
            })
            .await;
        noted.is_ok()
    }

    /// Remembers `refresh`, presented while Redis was away, to be marked spent on return.
    pub(super) fn spent_while_away(&self, refresh: &Secret) {
        let mut alone = self
            .spent_alone
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if alone.len() >= 16 {
            alone.remove(0);
        }
        alone.push(digest(refresh));
    }

    /// Marks what was presented while Redis was away (see [`SharedToken::spent_while_away`]).
    pub(super) async fn mark_spent_while_away(&self) {
        let pending: Vec<String> = std::mem::take(
            &mut *self
                .spent_alone
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for (i, d) in pending.iter().enumerate() {
            if !self.note_spent(d).await {
                self.spent_alone
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(pending[i..].iter().cloned());
                return;
            }
        }
    }

    /// Whether a replica's refresh spent `refresh`; `None` when Redis does not say.
    pub(super) async fn was_spent(&self, refresh: &Secret) -> Option<bool> {
        let key = self.spent_key(&digest(refresh));
        let found: Result<i64, _> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("EXISTS").arg(&key).query_async(&mut c).await
            })
            .await;
        found.ok().map(|n| n > 0)
    }

    /// The marker saying a replica's refresh spent `refresh`, if there is one.
    pub(super) async fn spent_marker(
        &self,
        refresh: &Secret,
    ) -> Result<Option<Marker>, Unavailable> {
        let key = self.spent_key(&digest(refresh));
        let read = key.clone();
        let value: Option<String> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("GET").arg(&read).query_async(&mut c).await
            })
            .await?;
        Ok(value.map(|v| Marker {
            ident: key.clone(),
            key,
            writer: writer_of(v.split(' ')),
            fingerprint: fingerprint(&v),
        }))
    }

    /// The marker saying the token endpoint refused `refresh` (to any replica), if the
    /// refused marker names it.
    pub(super) async fn refused_marker(
        &self,
        refresh: &Secret,
    ) -> Result<Option<Marker>, Unavailable> {
        let key = self.refused_key.clone();
        let value: Option<String> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await?;
        let digest = digest(refresh);
        Ok(value.and_then(|v| {
            let mut words = v.split(' ');
            (words.next() == Some(digest.as_str())).then(|| Marker {
                key: self.refused_key.clone(),
                ident: format!("{} {digest}", self.refused_key),
                writer: writer_of(words),
                fingerprint: fingerprint(&v),
            })
        }))
    }

    /// Records that the token endpoint refused `refresh`, so no replica presents it again.
    pub(super) async fn mark_refused(&self, refresh: &Secret) {
        let digest = digest(refresh);
        remember(&self.known.set, format!("{} {digest}", self.refused_key));
        let key = self.refused_key.clone();
        let value = format!("{digest} {}", self.signature());
        let _: Result<(), _> = self
            .redis
            .run_within("token", PATIENT, |mut c| async move {
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(&value)
                    .arg("EX")
                    .arg(REFUSED_TTL.as_secs())
                    .query_async(&mut c)
                    .await
            })
            .await;
    }

    /// Reads which replicas are listed as listening and remembers them as writers whose
    /// markers are believed (the watcher's, every few seconds).
    pub(super) async fn learn_listed(&self) {
        if let Ok(ids) = self.redis.listed("token").await {
            for id in ids {
                remember(&self.known.writers, id);
            }
        }
    }

    /// Whether `marker` is believed about a refresh token this replica proved: it set the
    /// marker itself, or its writer is a replica it knows (see the module docs).
    pub(super) async fn believes(&self, marker: &Marker) -> bool {
        if knows(&self.known.set, &marker.ident) {
            return true;
        }
        let Some(writer) = &marker.writer else {
            return false;
        };
        if writer == self.redis.id() || knows(&self.known.writers, writer) {
            return true;
        }
        self.learn_listed().await;
        knows(&self.known.writers, writer)
    }

    /// Whether `marker` is believed about the refresh token held (`proved`: one this
    /// replica proved, see the module docs); one that is not goes to `doubted`, to be put
    /// to the test by the refresh.
    pub(super) async fn weigh(
        &self,
        marker: Marker,
        proved: bool,
        doubted: &mut Vec<Marker>,
    ) -> bool {
        if !proved || self.believes(&marker).await {
            return true;
        }
        doubted.push(marker);
        false
    }

    /// `marker` said a refresh token this replica proved could not be presented, and the
    /// token endpoint took it: counted, and warned once per marker.
    pub(super) fn disproved(&self, marker: &Marker) {
        self.redis.repaired_value(
            &marker.key,
            marker.fingerprint,
            "a marker said this replica's refresh token was spent or refused, set by no \
             replica it knows; a refresh with the token succeeded, so the marker was wrong",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_is_an_id_and_a_time_and_nothing_else() {
        assert_eq!(
            writer_of("1234-00ab 1700000000000".split(' ')),
            Some("1234-00ab".to_string())
        );
        assert_eq!(writer_of("1".split(' ')), None);
        assert_eq!(writer_of("a b c".split(' ')), None);
        assert_eq!(writer_of("id 12x".split(' ')), None);
        assert_eq!(writer_of("i\u{e9}d 12".split(' ')), None);
    }
}
