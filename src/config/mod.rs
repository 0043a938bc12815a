//! Configuration: the TOML file of README "Configuration", in two layers.
//!
//! `raw` mirrors the file with serde (unknown keys rejected); `validate` turns it into the
//! checked [`Config`] the gateway runs on, collecting every problem with its key path so
//! `cxgate check` can print them all at once. This module imports nothing of the gateway.
//!
//! ```
//! let cfg = cxgate::config::parse(r#"
//!     upstream.base_url = "https://api.engagor.com"
//!     token.access_token_env = "CX_ACCESS_TOKEN"
//!     [[routes]]
//!     match = "GET /me"
//!     ttl = "10m"
//! "#).unwrap();
//! assert_eq!(cfg.routes[0].match_text, "GET /me");
//! ```

mod checked;
pub mod files;
mod raw;
pub mod route;
mod rules;
mod schema;
mod target;
mod units;
mod validate;

use std::fmt;
use std::path::Path;

pub use checked::*;
pub use route::Captures;
pub use rules::{longest_entry_life, WriteRules};
#[cfg(test)]
pub(crate) use schema::TABLES;
pub use units::{parse_duration, parse_size};

/// One problem in a config file, with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// E.g. `routes[3].tags[0]`, or `(file)` for syntax errors.
    pub path: String,
    /// What is wrong, and where possible what would be right.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{} problem(s) in the configuration", .0.len())]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// One line per problem, as `cxgate check` prints them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid(problems) => problems.iter().map(ToString::to_string).collect(),
        }
    }
}

/// Parses and validates config text.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut doc: toml::Table = toml::from_str(text).map_err(|e| {
        let path = match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("(line {line})")
            }
            None => "(file)".to_string(),
        };
        let mut message = e.message().trim().to_string();
        // toml says only "duplicate key"; its span is the key, so name it.
        if message == "duplicate key" {
            if let Some(key) = e
                .span()
                .and_then(|s| text.get(s))
                .map(str::trim)
                .filter(|k| !k.is_empty() && !k.contains('\n'))
            {
                message = format!("duplicate key `{key}`");
            }
        }
        ConfigError::Invalid(vec![Problem { path, message }])
    })?;
    let mut problems = schema::strip_unknown(&mut doc);
    let raw = raw::RawConfig {
        server: section(&mut doc, "server", &mut problems),
        upstream: section(&mut doc, "upstream", &mut problems),
        token: section(&mut doc, "token", &mut problems),
        cache: section(&mut doc, "cache", &mut problems),
        budget: section(&mut doc, "budget", &mut problems),
        clients: list(&mut doc, "clients", &mut problems),
        routes: list(&mut doc, "routes", &mut problems),
    };
    match validate::validate(raw) {
        Ok(cfg) if problems.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigError::Invalid(problems)),
        Err(more) => {
            // A key whose value had the wrong type was reported already; validation sees
            // it as absent, and "required" would be a second line for the same problem.
            let seen: Vec<String> = problems.iter().map(|p| p.path.clone()).collect();
            problems.extend(more.into_iter().filter(|p| !seen.contains(&p.path)));
            Err(ConfigError::Invalid(problems))
        }
    }
}

/// Deserializes one table; on a type error, finds the key(s) at fault so the problem
/// names its path (`budget.limit`) rather than only the section.
fn table_of<T: serde::de::DeserializeOwned + Default>(
    value: toml::Value,
    at: &str,
    problems: &mut Vec<Problem>,
) -> T {
    match T::deserialize(value.clone()) {
        Ok(v) => v,
        Err(whole) => {
            let before = problems.len();
            let mut rest = toml::Table::new();
            if let toml::Value::Table(table) = value {
                for (key, item) in table {
                    let mut one = toml::Table::new();
                    one.insert(key.clone(), item.clone());
                    match T::deserialize(toml::Value::Table(one)) {
                        Ok(_) => {
                            rest.insert(key, item);
                        }
                        Err(e) => problems.push(Problem {
                            path: format!("{at}.{key}"),
                            message: plain_type_error(e.message().trim()),
                        }),
                    }
                }
            }
            if problems.len() == before {
                problems.push(Problem {
                    path: at.to_string(),
                    message: plain_type_error(whole.message().trim()),
                });
            }
            // The keys that were right still count: a client with a wrong-typed `scopes`
            // keeps its `key_sha256`, so nothing else is reported missing.
            T::deserialize(toml::Value::Table(rest)).unwrap_or_default()
        }
    }
}

fn section<T: serde::de::DeserializeOwned + Default>(
    doc: &mut toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
) -> T {
    match doc.remove(name) {
        None => T::default(),
        Some(value) => table_of(value, name, problems),
    }
}

fn list<T: serde::de::DeserializeOwned + Default>(
    doc: &mut toml::Table,
    name: &str,
    problems: &mut Vec<Problem>,
) -> Vec<T> {
    match doc.remove(name) {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| table_of(item, &format!("{name}[{i}]"), problems))
            .collect(),
        Some(_) => {
            problems.push(Problem {
                path: name.to_string(),
                message: format!("must be an array of tables ([[{name}]])"),
            });
            Vec::new()
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = files::read(path)
        .and_then(|bytes| {
            String::from_utf8(bytes).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "stream did not contain valid UTF-8",
                )
            })
        })
        .map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
    parse(&text).map_err(|e| match e {
        // A syntax error has no key path: name the file it is in, as compilers do.
        ConfigError::Invalid(mut problems) => {
            for p in &mut problems {
                if let Some(line) = p
                    .path
                    .strip_prefix("(line ")
                    .and_then(|l| l.strip_suffix(')'))
                {
                    p.path = format!("{}:{line}", path.display());
                } else if p.path == "(file)" {
                    p.path = path.display().to_string();
                }
            }
            ConfigError::Invalid(problems)
        }
        other => other,
    })
}

/// serde's `invalid type: string "lots", expected i64` in the words of the file:
/// `expected a whole number, found the string "lots"`. Other messages pass unchanged.
pub fn plain_type_error(message: &str) -> String {
    let Some((found, expected)) = message
        .strip_prefix("invalid type: ")
        .and_then(|rest| rest.rsplit_once(", expected "))
    else {
        return message.to_string();
    };
    let expected = match expected {
        "i8" | "i16" | "i32" | "i64" | "i128" | "u8" | "u16" | "u32" | "u64" | "u128" | "usize"
        | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" | "bool" => "true or false",
        "a string" | "a borrowed string" | "string" => "a string in quotes",
        "a sequence" => "a list in [brackets]",
        other => other,
    };
    let found = match found.split_once(' ') {
        Some(("string", value)) => format!("the string {value}"),
        Some(("integer", value)) => format!("the number {value}"),
        Some(("floating", value)) => format!("the number {}", value.trim_start_matches("point ")),
        Some(("boolean", value)) => value.to_string(),
        _ => found.to_string(),
    };
    format!("expected {expected}, found {found}")
}

impl Config {
    /// The first route that matches, with its captures. `path` has no query.
    pub fn find_route<'a>(
        &'a self,
        method: &http::Method,
        path: &'a str,
    ) -> Option<(usize, Captures<'a>)> {
        self.routes.iter().enumerate().find_map(|(i, r)| {
            if !r.accepts(method) {
                return None;
            }
            r.path.matches(path).map(|caps| (i, caps))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str =
        "upstream.base_url = \"https://api.engagor.com\"\ntoken.file = \"/tmp/t.json\"\n";

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(_) => vec![],
            Err(e) => e.lines(),
        }
    }

    #[test]
    fn shipped_configs_are_valid() {
        for name in ["cxgate.toml", "demo.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(name);
            if let Err(e) = load(&path) {
                panic!("config/{name} should be valid, saw: {:?}", e.lines());
            }
        }
    }

    #[test]
    fn defaults_apply() {
        let cfg = parse(BASE).expect("minimal config is valid");
        assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.server.max_body_bytes, 1 << 20);
        assert_eq!(cfg.cache.max_bytes, 256 << 20);
        assert_eq!(cfg.budget.global.limit.get(), 1000);
        assert_eq!(cfg.server.public_base_url, "http://127.0.0.1:8080");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let p = problems(&format!("{BASE}[server]\nlisten_addr = \"x\"\n"));
        assert_eq!(p.len(), 1, "one problem expected, saw {p:?}");
        assert!(
            p[0].contains("listen_addr"),
            "should name the unknown key, saw {p:?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            [server]
            request_timeout = "soon"
            max_body_bytes = "huge"
            [budget]
            limit = 100
            period = "1h"
            backend = "redis"
            [[clients]]
            name = "a"
            limit = 200
            period = "1h"
            [[routes]]
            match = "GET /{account_id}/inbox/mentions"
            ttl = "15s"
            tags = ["account:{acount_id}"]
            [[routes]]
            match = "POST /me"
            ttl = "1m"
            [[routes]]
            match = "GET /{account_id}/inbox/mentions/"
        "#;
        let p = problems(text);
        let expect = [
            "server.request_timeout:",
            "server.max_body_bytes:",
            "upstream.base_url:",
            "token:",
            "budget.backend:",
            "clients[0].key_sha256:",
            "clients[0].limit:",
            "routes[0].tags[0]: unknown placeholder {acount_id}",
            "routes[1].ttl:",
            "routes[2].match: duplicate",
        ];
        for e in expect {
            assert!(
                p.iter().any(|l| l.starts_with(e)),
                "expected a line starting {e:?}, saw {p:#?}"
            );
        }
        assert_eq!(p.len(), expect.len(), "unexpected extra problems: {p:#?}");
    }

    #[test]
    fn duplicate_client_keys_and_zero_ttl_with_stale_are_rejected() {
        let key = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let text = format!(
            "{BASE}[[clients]]\nname=\"a\"\nkey_sha256=\"{key}\"\n[[clients]]\nname=\"b\"\nkey_sha256=\"{key}\"\n\
             [[routes]]\nmatch=\"GET /me\"\nttl=\"0s\"\nstale_if_error=\"1h\"\n"
        );
        let p = problems(&text);
        assert!(
            p.iter()
                .any(|l| l.starts_with("clients[1].key_sha256: same key")),
            "saw {p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.starts_with("routes[0].ttl: a ttl of zero")),
            "saw {p:?}"
        );
    }

    /// A cost above a burst it must pass could only be booked as debt: refused, naming the
    /// smallest such burst (the global one, a batch client's part of it, a client's own).
    #[test]
    fn a_route_cost_must_fit_in_every_burst_it_passes() {
        let key = "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8";
        let budget = "[budget]\nlimit=600\nperiod=\"1m\"\nburst=20\nbatch_reserve=0.5\n";
        let route = |cost: u32| format!("[[routes]]\nmatch=\"GET /me/accounts\"\ncost={cost}\n");
        let p = problems(&format!("{BASE}{budget}{}", route(1_000_000)));
        assert!(
            p.len() == 1
                && p[0].starts_with(
                    "routes[0].cost: 1000000 is more than the 20 cells of budget.burst"
                ),
            "expected the global burst named, saw {p:?}"
        );
        assert!(
            problems(&format!("{BASE}{budget}{}", route(20))).is_empty(),
            "expected a cost of the whole burst accepted"
        );
        let batch = format!("[[clients]]\nname=\"b\"\nkey_sha256=\"{key}\"\npriority=\"batch\"\n");
        let p = problems(&format!("{BASE}{budget}{batch}{}", route(11)));
        assert!(
            p.len() == 1 && p[0].contains("10 cells of budget.burst less budget.batch_reserve"),
            "expected the batch client's part named, saw {p:?}"
        );
        let own = format!(
            "[[clients]]\nname=\"s\"\nkey_sha256=\"{key}\"\nlimit=60\nperiod=\"1m\"\nburst=4\n"
        );
        let p = problems(&format!("{BASE}{budget}{own}{}", route(5)));
        assert!(
            p.len() == 1 && p[0].contains("4 cells of clients[0].burst"),
            "expected the client's own burst named, saw {p:?}"
        );
    }

    #[test]
    fn anonymous_mode_needs_loopback_or_consent() {
        let p = problems(&format!("{BASE}[server]\nlisten = \"0.0.0.0:8080\"\n"));
        assert!(p.iter().any(|l| l.starts_with("clients:")), "saw {p:?}");
        let ok = problems(&format!(
            "{BASE}[server]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n"
        ));
        assert!(ok.is_empty(), "saw {ok:?}");
    }

    #[test]
    fn first_matching_route_wins_and_head_uses_get_rules() {
        let cfg = parse(&format!(
            "{BASE}[[routes]]\nmatch=\"GET /me\"\nttl=\"1m\"\n[[routes]]\nmatch=\"* /{{account_id}}/x\"\n"
        ))
        .unwrap();
        assert_eq!(
            cfg.find_route(&http::Method::HEAD, "/me/").map(|r| r.0),
            Some(0)
        );
        assert_eq!(
            cfg.find_route(&http::Method::POST, "/me").map(|r| r.0),
            None
        );
        assert_eq!(
            cfg.find_route(&http::Method::DELETE, "/12/x").map(|r| r.0),
            Some(1)
        );
    }
}
