//! The token file: `{"access_token","refresh_token","expires_at","scope"}`, read at start and
//! replaced atomically after every refresh. Refresh tokens rotate and work once, so the file
//! is the only copy of the credential that survives a restart: a crash at any instant must
//! leave the whole old file or the whole new one ([`persist`] says how).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::error::TokenError;
use super::secret::Secret;
use crate::leak::KeySet;

/// One token as stored on disk.
#[derive(Debug, Clone)]
pub(crate) struct TokenRecord {
    pub access: Secret,
    pub refresh: Option<Secret>,
    pub expires_at: Option<SystemTime>,
    pub scope: Option<String>,
    /// The token's epoch (the file's `initialised_at`): when the operator's repair it
    /// descends from was made (`cxgate token init`, or a token file taken on reload).
    /// Refreshes and adoptions keep it, so the replicas compare lineages by it: a record of
    /// a newer epoch replaces a replica's token whatever their expiries, and no replica
    /// offers a token of an older epoch over it (see `shared`). `None` is the oldest.
    pub initialised_at: Option<SystemTime>,
    /// The file was written from the shared record and this replica has not refreshed with
    /// its refresh token since (the file's `adopted_unconfirmed`): an access token the
    /// upstream accepts proves nothing of the refresh token, so the mark stays until a
    /// refresh replaces the file. While it is marked, `.prev` keeps the last file that was
    /// not (the last proven refresh token), and a refresh with the record's refresh token
    /// that the endpoint refuses falls back to it, after a restart too.
    pub adopted: bool,
}

#[derive(Deserialize)]
struct RawIn {
    access_token: String,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    expires_at: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    initialised_at: Option<String>,
    #[serde(default)]
    adopted_unconfirmed: bool,
}

#[derive(Serialize)]
struct RawOut<'a> {
    access_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initialised_at: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    adopted_unconfirmed: bool,
}

/// A SHA-256 of the file's bytes: tells whether someone else replaced the file without
/// keeping a second copy of its secrets (timestamps are too coarse for this).
pub(crate) type Stamp = Vec<u8>;

fn stamp(bytes: &[u8]) -> Stamp {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .to_vec()
}

/// Reads and decodes the token file (the tests need no stamp).
#[cfg(test)]
pub(crate) async fn read(path: &Path) -> Result<TokenRecord, TokenError> {
    read_stamped(path).await.map(|(record, _)| record)
}

/// Reads and decodes the token file, with the stamp of what was read.
pub(crate) async fn read_stamped(path: &Path) -> Result<(TokenRecord, Stamp), TokenError> {
    // Opening a FIFO blocks until a writer appears, and a device never ends: only a regular
    // file is read.
    let meta = tokio::fs::metadata(path)
        .await
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let owned = path.to_path_buf();
    let bytes = tokio::task::spawn_blocking(move || read_capped(&owned))
        .await
        .map_err(|e| TokenError::Read {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })??;
    Ok((decode(&bytes, path)?, stamp(&bytes)))
}

/// The most a token file may hold: a record is a few hundred bytes, so anything larger is
/// not one, and is refused before it is read whole.
pub const MAX_FILE_BYTES: u64 = 64 * 1024;

/// Reads at most [`MAX_FILE_BYTES`] (one more tells that the file is larger).
fn read_capped(path: &Path) -> Result<Vec<u8>, TokenError> {
    use std::io::Read;
    let read_error = |source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(TokenError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Checks the token file as `run` loads it: an error when it is missing, not a regular
/// file, too large or not a record `run` accepts, and a warning when other users may read
/// it (as ssh warns about an open key file).
pub fn inspect(path: &Path) -> Result<Option<String>, TokenError> {
    let meta = fs::metadata(path).map_err(|source| TokenError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let record = decode(&read_capped(path)?, path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            let holds = if record.refresh.is_some() {
                "the access and refresh tokens"
            } else {
                "the access token"
            };
            return Ok(Some(format!(
                "{} is readable by other users (mode {mode:03o}); it holds {holds}: chmod 600 it",
                path.display()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = record;
    Ok(None)
}

/// What `run` warns about the token in the file at `path`, if anything, for `check` to say
/// the same: an access token that cannot be sent upstream leaves the gateway not ready
/// until a refresh or a corrected file replaces it. Call it only on a file [`inspect`]
/// accepted (it opens the file, which must not be a FIFO); `None` for one it cannot decode.
pub fn unsendable_warning(path: &Path) -> Option<String> {
    let record = decode(&read_capped(path).ok()?, path).ok()?;
    if sendable(record.access.expose()) {
        return None;
    }
    Some(format!(
        "the access token in {} cannot be sent upstream (longer than {MAX_TOKEN_BYTES} bytes, \
         or holding spaces, tabs, controls or non-ASCII): `cxgate run` starts but reports not \
         ready and answers 503 until a refresh or a corrected file replaces it",
        path.display()
    ))
}

/// The warning `cxgate run` logs when the access token in `$name` (`token.access_token_env`,
/// which holds `value`) cannot be sent upstream, for `cxgate check` to print too.
pub fn unsendable_env_warning(name: &str, value: &str) -> Option<String> {
    if sendable(value) {
        return None;
    }
    Some(format!(
        "the access token in ${name} cannot be sent upstream (longer than {MAX_TOKEN_BYTES} \
         bytes, or holding spaces, tabs, controls or non-ASCII): `cxgate run` starts but \
         reports not ready and answers 503 until a new token replaces it (an environment \
         token is never refreshed)"
    ))
}

/// A warning when the file's access token has expired and the gateway cannot get a new
/// one (no refresh token in the file, or no `[token.oauth]` to spend it at, which
/// `can_refresh` says): `cxgate run` starts on it but is never ready.
pub fn expired_warning(path: &Path, can_refresh: bool) -> Option<String> {
    let record = decode(&read_capped(path).ok()?, path).ok()?;
    let expired = record
        .expires_at
        .is_some_and(|at| at <= std::time::SystemTime::now());
    if !expired || (can_refresh && record.refresh.is_some()) {
        return None;
    }
    let why = if record.refresh.is_none() {
        "it holds no refresh token"
    } else {
        "there is no [token.oauth] to refresh it at"
    };
    Some(format!(
        "the access token in {} has expired and {why}: `cxgate run` starts but reports not \
         ready and answers 503 until a new token replaces it (`cxgate token init`)",
        path.display()
    ))
}

/// Whether `token` can travel upstream as is: visible ASCII only, as RFC 6750 tokens are
/// (no space, tab, CR, LF, other control or non-ASCII character). `/readyz`, token loading,
/// the shared record's check and the `Authorization` header builder all use this one test,
/// so readiness and the request path never disagree on a token.
pub(crate) fn sendable(token: &str) -> bool {
    !token.is_empty()
        && token.len() <= MAX_TOKEN_BYTES
        && token.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether `token` holds one of `keys` (the clients' keys): is one, or holds one in any
/// spelling the request side's scan finds (`KEY.x`, `x=KEY`, percent-encoded, and the
/// base64 and hex of every key a client has proven, when `keys` are the running
/// gateway's [`crate::auth::Clients`]). The one scan of everything that leaves the
/// gateway, against the same keys, so a token is judged as a request is.
pub(crate) fn holds_key<K: KeySet + ?Sized>(token: &Secret, keys: &K) -> bool {
    crate::leak::KeyScan::new(keys, None).in_value(token.expose().as_bytes())
}

/// Whether `record` would send one of `keys` upstream: its access token (as
/// `Authorization`) or its refresh token (to the OAuth endpoint) holds one.
pub(crate) fn record_holds_key<K: KeySet + ?Sized>(record: &TokenRecord, keys: &K) -> bool {
    holds_key(&record.access, keys)
        || record
            .refresh
            .as_ref()
            .is_some_and(|refresh| holds_key(refresh, keys))
}

/// Whether the token file at `path` holds one of `keys` in its access or refresh token,
/// for `check` and a reload to refuse what `run` refuses. Call it only on a file
/// [`inspect`] accepted; false for one it cannot decode.
pub fn holds_client_key<K: KeySet + ?Sized>(path: &Path, keys: &K) -> bool {
    read_capped(path)
        .ok()
        .and_then(|bytes| decode(&bytes, path).ok())
        .is_some_and(|record| record_holds_key(&record, keys))
}

/// The longest token (access or refresh) the gateway holds. Real ones are tens of bytes
/// (a signed one a few hundred); a longer one would push the upstream request's head past
/// what servers take (431), so it is treated as unsendable wherever it comes from.
pub const MAX_TOKEN_BYTES: usize = 4096;

pub(crate) fn decode(bytes: &[u8], path: &Path) -> Result<TokenRecord, TokenError> {
    // serde_json's messages can quote the offending input, which here may be a token, so
    // only the position of the problem is kept.
    let raw: RawIn = serde_json::from_slice(bytes).map_err(|e| TokenError::Parse {
        path: path.to_path_buf(),
        line: e.line(),
        column: e.column(),
    })?;
    if raw.access_token.is_empty() {
        return Err(TokenError::EmptyAccessToken {
            path: path.to_path_buf(),
        });
    }
    let expires_at = match raw.expires_at.as_deref() {
        None | Some("") => None,
        Some(text) => Some(parse_time(text).ok_or_else(|| TokenError::BadExpiry {
            path: path.to_path_buf(),
        })?),
    };
    Ok(TokenRecord {
        access: Secret::new(raw.access_token),
        refresh: raw.refresh_token.filter(|t| !t.is_empty()).map(Secret::new),
        expires_at,
        scope: raw.scope,
        // Only a hint for choosing between this file and a shared record at start: an
        // unreadable one is as if absent, never a reason to refuse the token.
        initialised_at: raw.initialised_at.as_deref().and_then(parse_time),
        adopted: raw.adopted_unconfirmed,
    })
}

pub(crate) fn encode(record: &TokenRecord) -> io::Result<Vec<u8>> {
    let raw = RawOut {
        access_token: record.access.expose(),
        refresh_token: record.refresh.as_ref().map(Secret::expose),
        expires_at: record
            .expires_at
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        scope: record.scope.as_deref(),
        initialised_at: record
            .initialised_at
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        adopted_unconfirmed: record.adopted,
    };
    let mut bytes = serde_json::to_vec_pretty(&raw).map_err(io::Error::other)?;
    bytes.push(b'\n');
    // Never write a file that loading would refuse.
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io::Error::other(format!(
            "the record would take {} bytes, more than a token file may hold ({MAX_FILE_BYTES})",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Parses RFC 3339, including numeric offsets, which humantime alone reads as UTC.
pub(crate) fn parse_time(text: &str) -> Option<SystemTime> {
    let text = text.trim();
    let b = text.as_bytes();
    let n = b.len();
    if n >= 25 && (b[n - 6] == b'+' || b[n - 6] == b'-') && b[n - 3] == b':' {
        let hours: u64 = text.get(n - 5..n - 3)?.parse().ok()?;
        let minutes: u64 = text.get(n - 2..)?.parse().ok()?;
        let offset = Duration::from_secs(hours * 3600 + minutes * 60);
        let local = humantime::parse_rfc3339_weak(text.get(..n - 6)?).ok()?;
        // Local time = UTC + offset, so UTC = local - offset.
        return if b[n - 6] == b'+' {
            local.checked_sub(offset)
        } else {
            local.checked_add(offset)
        };
    }
    humantime::parse_rfc3339_weak(text).ok()
}

/// Writes `record` to `path` atomically; returns the new stamp.
///
/// A crash at any instant leaves either the whole old file or the whole new one: write a
/// temp file in the same directory (same filesystem, so the rename is atomic), fsync it,
/// rename it over the target, then fsync the directory so the rename itself is durable.
/// The file is created with mode 0600. Each step runs through a hook so the tests can stop
/// the sequence after any step.
pub(crate) async fn persist(path: &Path, record: &TokenRecord) -> Result<Stamp, TokenError> {
    let bytes = encode(record).map_err(|source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let written = stamp(&bytes);
    let target = path.to_path_buf();
    // Blocking file calls belong on the blocking pool; fsync can take a while.
    tokio::task::spawn_blocking(move || {
        keep_previous(&target, &bytes)?;
        write_atomic(&target, &bytes)
    })
    .await
    .map_err(|e| TokenError::Write {
        path: path.to_path_buf(),
        source: io::Error::other(e),
    })?
    .map_err(|source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(written)
}

/// Where the token file's previous content is kept: `token.json` → `token.json.prev`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".prev");
    path.with_file_name(name)
}

/// Saves what the file holds now beside it before it is replaced by `next`, so a bad token
/// that reaches the file (from a tampered shared record, say) never destroys the only copy
/// of the last refresh token. Written with the same atomic sequence and mode 0600.
fn keep_previous(path: &Path, next: &[u8]) -> io::Result<()> {
    let is_file = fs::metadata(path).is_ok_and(|m| m.is_file());
    if !is_file {
        return Ok(());
    }
    let old = fs::read(path)?;
    if old == next || old.is_empty() {
        return Ok(());
    }
    // A file written from the shared record holds a refresh token this replica never
    // proved: `.prev` keeps the last one it did (never an unconfirmed copy).
    if decode(&old, path).is_ok_and(|r| r.adopted) {
        return Ok(());
    }
    write_atomic(&previous_path(path), &old)
}

/// The write sequence, one hook call before each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    CreateTemp,
    WriteFirstHalf,
    WriteRest,
    SyncFile,
    Rename,
    SyncDir,
}

#[cfg(test)]
pub(crate) const STEPS: [Step; 6] = [
    Step::CreateTemp,
    Step::WriteFirstHalf,
    Step::WriteRest,
    Step::SyncFile,
    Step::Rename,
    Step::SyncDir,
];

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temp = None;
    let result = write_steps(path, bytes, &mut temp, &mut |_| Ok(()));
    if result.is_err() {
        if let Some(temp) = temp {
            // Best effort: a leftover temp file is harmless (unique name, never read).
            let _ = fs::remove_file(temp);
        }
    }
    result
}

/// Runs the sequence. `temp` receives the temp file's path as soon as it exists, so the
/// caller can clean up; the hook may fail a step to simulate a crash just before it.
pub(crate) fn write_steps(
    path: &Path,
    bytes: &[u8],
    temp: &mut Option<PathBuf>,
    hook: &mut dyn FnMut(Step) -> io::Result<()>,
) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "token file has no name"))?;
    let temp_path = dir.join(format!(
        ".{}.tmp-{}-{:016x}",
        name.to_string_lossy(),
        std::process::id(),
        fastrand::u64(..)
    ));

    hook(Step::CreateTemp)?;
    let mut file = create_private(&temp_path)?;
    *temp = Some(temp_path.clone());

    let half = bytes.len() / 2;
    hook(Step::WriteFirstHalf)?;
    file.write_all(&bytes[..half])?;
    hook(Step::WriteRest)?;
    file.write_all(&bytes[half..])?;
    hook(Step::SyncFile)?;
    file.sync_all()?;
    drop(file);

    hook(Step::Rename)?;
    fs::rename(&temp_path, path)?;
    *temp = None;

    hook(Step::SyncDir)?;
    sync_dir(&dir)
}

fn create_private(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        let file = options.open(path)?;
        // The mode above is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        Ok(file)
    }
    #[cfg(not(unix))]
    {
        options.open(path)
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}
