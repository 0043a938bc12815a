//! The token file's encoding and its crash-safe write sequence.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::TempDir;
use crate::token::error::TokenError;
use crate::token::file::{
    decode, encode, parse_time, persist, read, write_atomic, write_steps, Step, TokenRecord, STEPS,
};
use crate::token::secret::Secret;
fn record(access: &str, refresh: Option<&str>, expires_at: Option<u64>) -> TokenRecord {
    TokenRecord {
        access: Secret::new(access.to_string()),
        refresh: refresh.map(|r| Secret::new(r.to_string())),
        expires_at: expires_at.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
        scope: Some("accounts_read".to_string()),
        initialised_at: None,
        adopted: false,
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
fn the_adopted_mark_is_written_only_when_set_and_read_back() {
    let plain = record("acc-1", Some("ref-1"), None);
    let text = String::from_utf8(encode(&plain).expect("encoding")).expect("UTF-8");
    assert!(
        !text.contains("adopted"),
        "expected no mark on an unmarked record: {text}"
    );
    let marked = TokenRecord {
        adopted: true,
        ..plain
    };
    let bytes = encode(&marked).expect("encoding");
    let back = decode(&bytes, Path::new("t.json")).expect("decoding what was encoded");
    assert!(back.adopted, "expected the mark read back");
    let old = br#"{"access_token": "acc-1", "refresh_token": "ref-1"}"#;
    let back = decode(old, Path::new("t.json")).expect("decoding a file without the mark");
    assert!(!back.adopted, "expected a file without the mark unmarked");
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
