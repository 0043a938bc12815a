//! The token file: `{"access_token","refresh_token","expires_at","scope"}`, read at start and
//! replaced atomically after every refresh.
//!
//! Refresh tokens rotate and work once, so the file is the only copy of the credential that
//! survives a restart. The write sequence guarantees that a crash at any instant leaves
//! either the whole old file or the whole new one: write a temp file in the same directory
//! (same filesystem, so the rename is atomic), fsync it, rename it over the target, then
//! fsync the directory so the rename itself is durable. The file is created with mode 0600.
//! Each step runs through a hook so the tests can stop the sequence after any step.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::error::TokenError;
use super::secret::Secret;

/// One token as stored on disk.
#[derive(Debug, Clone)]
pub(crate) struct TokenRecord {
    pub access: Secret,
    pub refresh: Option<Secret>,
    pub expires_at: Option<SystemTime>,
    pub scope: Option<String>,
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
}

/// Reads and decodes the token file.
pub(crate) async fn read(path: &Path) -> Result<TokenRecord, TokenError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    decode(&bytes, path)
}

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
    };
    let mut bytes = serde_json::to_vec_pretty(&raw).map_err(io::Error::other)?;
    bytes.push(b'\n');
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

/// Writes `record` to `path` atomically; see the module docs for the sequence.
pub(crate) async fn persist(path: &Path, record: &TokenRecord) -> Result<(), TokenError> {
    let bytes = encode(record).map_err(|source| TokenError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    let target = path.to_path_buf();
    // Blocking file calls belong on the blocking pool; fsync can take a while.
    tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
        .await
        .map_err(|e| TokenError::Write {
            path: path.to_path_buf(),
            source: io::Error::other(e),
        })?
        .map_err(|source| TokenError::Write {
            path: path.to_path_buf(),
            source,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::testutil::TempDir;

    fn record(access: &str, refresh: Option<&str>, expires_at: Option<u64>) -> TokenRecord {
        TokenRecord {
            access: Secret::new(access.to_string()),
            refresh: refresh.map(|r| Secret::new(r.to_string())),
            expires_at: expires_at.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            scope: Some("accounts_read".to_string()),
        }
    }

    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0)
    }

    #[test]
    fn a_record_survives_encode_and_decode() {
        let original = record("acc-1", Some("ref-1"), Some(1_900_000_000));
        let bytes = encode(&original).expect("encoding");
        let back = decode(&bytes, Path::new("t.json")).expect("decoding what was encoded");
        assert_eq!(
            back.access, original.access,
            "expected the access token back"
        );
        assert_eq!(
            back.refresh, original.refresh,
            "expected the refresh token back"
        );
        assert_eq!(
            back.expires_at, original.expires_at,
            "expected the expiry back"
        );
        assert_eq!(back.scope, original.scope, "expected the scope back");
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("\"expires_at\": \"2030-03-17T17:46:40Z\""),
            "expected an RFC 3339 expiry in {text}"
        );
    }

    #[test]
    fn decode_errors_do_not_quote_the_file() {
        let broken = br#"{"access_token": "leaky-secret-123", "expires_at": 5}"#;
        let err = decode(broken, Path::new("t.json")).err();
        let text = format!(
            "{err:?} {}",
            err.as_ref().map(|e| e.to_string()).unwrap_or_default()
        );
        assert!(err.is_some(), "expected a numeric expires_at to be refused");
        assert!(
            !text.contains("leaky-secret"),
            "expected no token text in {text}"
        );
        let empty = decode(br#"{"access_token": ""}"#, Path::new("t.json"));
        assert!(
            matches!(empty, Err(TokenError::EmptyAccessToken { .. })),
            "expected an empty access token to be refused, saw {empty:?}"
        );
        let bad_time = decode(
            br#"{"access_token": "a", "expires_at": "soon"}"#,
            Path::new("t.json"),
        );
        assert!(
            matches!(bad_time, Err(TokenError::BadExpiry { .. })),
            "expected a bad expiry to be refused, saw {bad_time:?}"
        );
    }

    #[test]
    fn rfc3339_offsets_are_honoured() {
        let utc = parse_time("2026-11-01T12:00:00Z");
        let cases = [
            "2026-11-01T12:00:00+00:00",
            "2026-11-01T14:00:00+02:00",
            "2026-11-01T06:30:00-05:30",
            "2026-11-01T14:00:00.000+02:00",
        ];
        assert!(utc.is_some(), "expected the UTC form to parse");
        for case in cases {
            assert_eq!(parse_time(case), utc, "expected {case} to be 12:00 UTC");
        }
        assert_eq!(
            parse_time("tomorrow"),
            None,
            "expected garbage to be refused"
        );
    }

    /// Stops the write sequence before each step in turn (a crash at that instant) and
    /// checks that the token file is always whole: the old one until the rename, the new
    /// one after it, never a mix, and always mode 0600.
    #[test]
    fn a_crash_at_any_step_leaves_the_old_or_the_new_file() {
        let dir = TempDir::new();
        let path = dir.file();
        let old = encode(&record(
            "old-access",
            Some("old-refresh"),
            Some(1_800_000_000),
        ))
        .expect("encoding");
        let new = encode(&record(
            "new-access",
            Some("new-refresh"),
            Some(1_900_000_000),
        ))
        .expect("encoding");
        let rename_at = STEPS.iter().position(|s| *s == Step::Rename).unwrap_or(0);
        for k in 0..=STEPS.len() {
            write_atomic(&path, &old).expect("writing the old file");
            let mut temp = None;
            let mut hook = |step: Step| {
                if STEPS.get(k) == Some(&step) {
                    Err(io::Error::other("simulated crash"))
                } else {
                    Ok(())
                }
            };
            let result = write_steps(&path, &new, &mut temp, &mut hook);
            assert_eq!(
                result.is_ok(),
                k == STEPS.len(),
                "stop before step {k}: expected success only when no step fails"
            );
            let on_disk = fs::read(&path).expect("the token file must exist");
            let want = if k <= rename_at { &old } else { &new };
            assert_eq!(
                String::from_utf8_lossy(&on_disk),
                String::from_utf8_lossy(want),
                "stop before step {k} ({:?}): expected the {} file",
                STEPS.get(k),
                if k <= rename_at { "old" } else { "new" }
            );
            assert!(
                decode(&on_disk, &path).is_ok(),
                "stop before step {k}: expected a decodable file"
            );
            assert_eq!(
                mode(&path),
                0o600,
                "stop before step {k}: expected mode 0600"
            );
        }
        // Leftover temp files from the simulated crashes never block a later write.
        write_atomic(&path, &new).expect("writing after crashes");
        let back = decode(&fs::read(&path).expect("reading"), &path).expect("decoding");
        assert_eq!(
            back.access.expose(),
            "new-access",
            "expected the last write to win"
        );
    }

    #[test]
    fn a_replaced_file_is_private_even_if_the_old_one_was_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let path = dir.file();
        fs::write(&path, b"{}").expect("writing a loose file");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        write_atomic(&path, b"{\"access_token\":\"a\"}").expect("atomic write");
        assert_eq!(mode(&path), 0o600, "expected mode 0600 after replacement");
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("listing")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "expected no temp file after a clean write, saw {leftovers:?}"
        );
    }

    #[tokio::test]
    async fn persist_then_read_round_trips() {
        let dir = TempDir::new();
        let path = dir.file();
        let original = record("acc-9", None, None);
        persist(&path, &original).await.expect("persisting");
        let back = read(&path).await.expect("reading back");
        assert_eq!(
            back.access.expose(),
            "acc-9",
            "expected the stored access token"
        );
        assert!(
            back.refresh.is_none() && back.expires_at.is_none(),
            "expected no refresh token and no expiry"
        );
        let missing = read(&dir.path().join("nope.json")).await;
        assert!(
            matches!(missing, Err(TokenError::Read { .. })),
            "expected a read error for a missing file, saw {missing:?}"
        );
    }
}
