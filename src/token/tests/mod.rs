//! Tests of the token module that need more than one file: the whole manager against a
//! test token endpoint (on tokio's paused clock), the token file's crash safety, and
//! `token init`. Shared helpers live here.

mod endpoint;
mod load;
mod persist;
mod refresh;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::file::{self, TokenRecord};
use super::*;
pub(crate) use endpoint::{client, TokenServer};

pub(crate) const MINUTE: Duration = Duration::from_secs(60);

pub(crate) fn write_token(
    path: &Path,
    access: &str,
    refresh: Option<&str>,
    expires_in: Option<Duration>,
) {
    let record = TokenRecord {
        access: Secret::new(access.to_string()),
        refresh: refresh.map(|r| Secret::new(r.to_string())),
        expires_at: expires_in.map(|d| SystemTime::now() + d),
        scope: None,
        initialised_at: None,
        adopted: false,
    };
    let bytes = file::encode(&record).expect("encoding a token");
    file::write_atomic(path, &bytes).expect("writing a token file");
}

pub(crate) async fn manager(
    settings: TokenSettings,
    registry: &prometheus::Registry,
) -> TokenManager {
    TokenManager::load_with(settings, client(), Some(registry), &endpoint::env)
        .await
        .expect("loading the token")
}

/// Polls `cond` in 10 ms steps of (paused) time until it holds.
pub(crate) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected {what}, but it never happened");
}

pub(crate) fn refreshes(registry: &prometheus::Registry, result: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "cxgate_token_refreshes_total")
        .flat_map(|f| f.get_metric().to_vec())
        .filter(|m| m.get_label().iter().any(|l| l.value() == result))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub(crate) fn generation(tokens: &TokenManager) -> u64 {
    tokens.current().map(|c| c.generation).unwrap_or(0)
}

pub(crate) fn tokens_settings_without_source() -> TokenSettings {
    TokenSettings {
        file: None,
        access_token_env: None,
        refresh_before: MINUTE,
        oauth: None,
        client_keys: Vec::new(),
    }
}

/// A directory removed when dropped.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "cxgate-token-test-{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&path).expect("creating a scratch directory");
        TempDir(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }

    pub(crate) fn file(&self) -> PathBuf {
        self.0.join("token.json")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
