//! The secrets the gateway runs on, read from the environment once, at the edge.
//!
//! The config file names environment variables rather than holding secrets; start, reload,
//! `check` and `token init` each read those variables into one [`Secrets`] value and pass
//! it in, so no module below them reads the environment, and tests can supply their own.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::token::{Secret, ACCESS_TOKEN_VAR, EXPIRES_IN_VAR, REFRESH_TOKEN_VAR};

/// Values of environment variables, by name; an empty value counts as unset.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    values: BTreeMap<String, Secret>,
}

impl Secrets {
    /// Every variable `cfg` names, and the token values `cxgate token init` stores, as
    /// the process's environment holds them now.
    pub fn from_env(cfg: &Config) -> Secrets {
        let names = cfg.env_names().into_iter().map(|(_, name)| name);
        Secrets::from_vars(names.chain([ACCESS_TOKEN_VAR, REFRESH_TOKEN_VAR, EXPIRES_IN_VAR]))
    }

    /// The variables `names`, as the process's environment holds them now.
    pub fn from_vars<'a>(names: impl IntoIterator<Item = &'a str>) -> Secrets {
        Secrets::from_pairs(
            names
                .into_iter()
                .filter_map(|name| Some((name.to_string(), std::env::var(name).ok()?))),
        )
    }

    /// Exactly these values, without looking at the environment.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Secrets {
        Secrets {
            values: pairs
                .into_iter()
                .filter(|(_, value)| !value.is_empty())
                .map(|(name, value)| (name, Secret::new(value)))
                .collect(),
        }
    }

    /// The value of variable `name`, if set and not empty.
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.values.get(name)
    }

    /// [`Secrets::get`], as the owned string the token module's lookups take.
    pub fn lookup(&self, name: &str) -> Option<String> {
        self.get(name).map(|s| s.expose().to_string())
    }

    /// The variables `cfg` names that are unset or empty here, each with its key:
    /// `check`, `run` and reload refuse each one, since `run` cannot start without it.
    pub fn unset<'a>(&self, cfg: &'a Config) -> Vec<(&'static str, &'a str)> {
        cfg.env_names()
            .into_iter()
            .filter(|(_, name)| self.get(name).is_none())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_values_count_as_unset_and_unset_names_the_key() {
        let cfg = crate::config::parse(
            "upstream.base_url = \"https://api.engagor.com\"\n\
             token.access_token_env = \"SECRETS_TEST_TOKEN\"\n\
             server.admin_token_env = \"SECRETS_TEST_ADMIN\"\n",
        )
        .expect("valid config");
        let secrets = Secrets::from_pairs([
            ("SECRETS_TEST_TOKEN".to_string(), "abc".to_string()),
            ("SECRETS_TEST_ADMIN".to_string(), String::new()),
        ]);
        assert_eq!(secrets.lookup("SECRETS_TEST_TOKEN").as_deref(), Some("abc"));
        assert_eq!(secrets.get("SECRETS_TEST_ADMIN"), None);
        assert_eq!(
            secrets.unset(&cfg),
            vec![("server.admin_token_env", "SECRETS_TEST_ADMIN")]
        );
    }
}
