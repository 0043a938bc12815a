//! What a write invalidates while replicas run different route tables (a rolling reload):
//! the tags its own table names and those every table announced in Redis names for it, so
//! a write through any replica drops what each replica stored, in Redis and in memory.
//! [`Peers`] keeps the other tables read back, so a write reads only their names.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use http::Method;

use crate::config::{longest_entry_life, Config, WriteRules};
use crate::replicas::{Redis, Table};

/// The route tables of the other replicas, as last read from Redis.
#[derive(Default)]
pub(super) struct Peers {
    /// Tables read back, by name; `None` for one whose text did not read (said once).
    known: Mutex<HashMap<String, Option<Arc<WriteRules>>>>,
    /// The names announced at the last read that succeeded: what a write goes by while
    /// Redis cannot say (the tables may have changed since, which only its return shows).
    live: Mutex<Vec<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update is one assignment or map change: a poisoned lock holds a whole value.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The table `cfg` runs, as it is announced to the other replicas.
pub fn announced(cfg: &Config) -> Table {
    let rules = WriteRules::of(cfg);
    Table {
        name: rules.name().to_string(),
        text: rules.text().to_string(),
        lasts: longest_entry_life(cfg),
    }
}

impl Peers {
    /// `own` (the tags this replica's table names for the write `method path`) with those
    /// every other table announced on `redis` names for it, each once.
    pub(super) async fn tags(
        &self,
        redis: &Redis,
        rules: &WriteRules,
        own: Vec<String>,
        method: &Method,
        path: &str,
    ) -> Vec<String> {
        let names: Vec<String> = lock(&self.known).keys().cloned().collect();
        let live = match redis.live_tables(&names).await {
            Ok(live) => self.learn(live),
            Err(_) => lock(&self.live).clone(),
        };
        let known = lock(&self.known);
        let mut seen: HashSet<String> = own.iter().cloned().collect();
        let mut tags = own;
        let others = live
            .iter()
            .filter(|name| *name != rules.name())
            .filter_map(|name| known.get(name).cloned().flatten());
        for table in others {
            for tag in table.tags(method, path) {
                if seen.insert(tag.clone()) {
                    tags.push(tag);
                }
            }
        }
        tags
    }

    /// Takes a read of the announced tables in: compiles the texts not known yet, forgets
    /// the tables no longer announced, and returns the names in force.
    fn learn(&self, live: Vec<(String, Option<Vec<u8>>)>) -> Vec<String> {
        let mut known = lock(&self.known);
        for (name, text) in &live {
            if known.contains_key(name) {
                continue;
            }
            // A name announced without its text (it ended meanwhile, or is over the bound)
            // is asked for again at the next write.
            let Some(text) = text else { continue };
            let rules = std::str::from_utf8(text)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(WriteRules::parse);
            let rules = match rules {
                Ok(rules) => Some(Arc::new(rules)),
                Err(why) => {
                    tracing::warn!(
                        name,
                        why,
                        "ignoring a route table announced in Redis that does not read back"
                    );
                    None
                }
            };
            known.insert(name.clone(), rules);
        }
        let names: Vec<String> = live.into_iter().map(|(name, _)| name).collect();
        known.retain(|name, _| names.contains(name));
        *lock(&self.live) = names.clone();
        names
    }
}
