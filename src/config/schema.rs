//! The known keys of every table, so that one run of `cxgate check` reports every unknown
//! key by its path (serde's `deny_unknown_fields` stops at the first, and knows no path).
//!
//! `raw.rs` stays the authority on types; a test below proves every key listed here is one
//! `raw.rs` accepts.

use toml::{Table, Value};

use super::Problem;

const TOP: &[&str] = &[
    "server", "upstream", "token", "cache", "budget", "clients", "routes",
];
const SERVER: &[&str] = &[
    "listen",
    "admin_listen",
    "public_base_url",
    "max_body_bytes",
    "max_concurrency",
    "request_timeout",
    "shutdown_grace",
    "header_timeout",
    "body_timeout",
    "idle_timeout",
    "max_connections",
    "max_buffered_bytes",
    "admin_token_env",
    "admin_hosts",
    "allow_anonymous",
    "tls",
    "access_log",
];
const TLS: &[&str] = &["cert_file", "key_file"];
const UPSTREAM: &[&str] = &["base_url", "connect_timeout", "timeout", "ca_file"];
const TOKEN: &[&str] = &["file", "access_token_env", "refresh_before", "oauth"];
const OAUTH: &[&str] = &["token_url", "client_id", "client_secret_env", "method"];
const CACHE: &[&str] = &["max_bytes"];
const BUDGET: &[&str] = &[
    "limit",
    "period",
    "burst",
    "max_wait",
    "batch_reserve",
    "backend",
    "redis_url_env",
    "key_prefix",
    "replicas",
    "redis_ca_file",
    "redis_cluster",
];
const CLIENT: &[&str] = &[
    "name",
    "key_sha256",
    "scopes",
    "accounts",
    "priority",
    "limit",
    "period",
    "burst",
    "max_wait",
];
const ROUTE: &[&str] = &[
    "match",
    "ttl",
    "stale_while_revalidate",
    "stale_if_error",
    "tags",
    "invalidates",
    "cost",
];

/// Every table by its key path, with its known keys (`clients` and `routes` are arrays of
/// tables): what reload's test walks to prove each setting applied or noted.
#[cfg(test)]
pub(crate) const TABLES: &[(&str, &[&str])] = &[
    ("server", SERVER),
    ("server.tls", TLS),
    ("upstream", UPSTREAM),
    ("token", TOKEN),
    ("token.oauth", OAUTH),
    ("cache", CACHE),
    ("budget", BUDGET),
    ("clients", CLIENT),
    ("routes", ROUTE),
];

/// Removes every unknown key from `doc`, returning one problem per key removed.
pub fn strip_unknown(doc: &mut Table) -> Vec<Problem> {
    let mut problems = Vec::new();
    check(doc, "", TOP, &mut problems);
    let sections: [(&str, &[&str]); 5] = [
        ("server", SERVER),
        ("upstream", UPSTREAM),
        ("token", TOKEN),
        ("cache", CACHE),
        ("budget", BUDGET),
    ];
    for (name, keys) in sections {
        if let Some(Value::Table(t)) = doc.get_mut(name) {
            check(t, name, keys, &mut problems);
        }
    }
    if let Some(Value::Table(server)) = doc.get_mut("server") {
        if let Some(Value::Table(tls)) = server.get_mut("tls") {
            check(tls, "server.tls", TLS, &mut problems);
        }
    }
    if let Some(Value::Table(token)) = doc.get_mut("token") {
        if let Some(Value::Table(oauth)) = token.get_mut("oauth") {
            check(oauth, "token.oauth", OAUTH, &mut problems);
        }
    }
    for (name, keys) in [("clients", CLIENT), ("routes", ROUTE)] {
        if let Some(Value::Array(items)) = doc.get_mut(name) {
            for (i, item) in items.iter_mut().enumerate() {
                if let Value::Table(t) = item {
                    check(t, &format!("{name}[{i}]"), keys, &mut problems);
                }
            }
        }
    }
    problems
}

fn check(table: &mut Table, at: &str, known: &[&str], problems: &mut Vec<Problem>) {
    let unknown: Vec<String> = table
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .cloned()
        .collect();
    for key in unknown {
        table.remove(&key);
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        let hint = known
            .iter()
            .find(|k| similar(k, &key))
            .map_or(String::new(), |k| format!(" (did you mean {k:?}?)"));
        problems.push(Problem {
            path,
            message: format!("unknown key{hint}; known keys here: {}", known.join(", ")),
        });
    }
}

/// One edit apart, or the same letters in another order: the usual typos.
fn similar(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let mut sa = a.to_vec();
    let mut sb = b.to_vec();
    sa.sort_unstable();
    sb.sort_unstable();
    if sa == sb {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let mut i = 0;
    while i < short.len() && short[i] == long[i] {
        i += 1;
    }
    if short.len() == long.len() {
        short[i + 1..] == long[i + 1..]
    } else {
        short[i..] == long[i + 1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_key_is_one_the_schema_accepts() {
        let sections: [(&str, &[&str]); 9] = [
            ("[server]", SERVER),
            ("[server.tls]", TLS),
            ("[upstream]", UPSTREAM),
            ("[token]", TOKEN),
            ("[token.oauth]", OAUTH),
            ("[cache]", CACHE),
            ("[budget]", BUDGET),
            ("[[clients]]", CLIENT),
            ("[[routes]]", ROUTE),
        ];
        for (header, keys) in sections {
            for key in keys {
                let text = format!("{header}\n{key} = []\n");
                if let Err(e) = toml::from_str::<super::super::raw::RawConfig>(&text) {
                    let m = e.to_string();
                    assert!(
                        !m.contains("unknown field"),
                        "{header} {key} is listed but raw.rs rejects it: {m}"
                    );
                }
            }
        }
    }

    #[test]
    fn unknown_keys_are_reported_with_paths_and_removed() {
        let mut doc: Table = toml::from_str(
            "colour = 1\n[server]\nlistn = \"x\"\n[[routes]]\nmatch = \"GET /me\"\ntll = \"1m\"\n",
        )
        .unwrap();
        let p = strip_unknown(&mut doc);
        let paths: Vec<&str> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["colour", "server.listn", "routes[0].tll"],
            "saw {p:?}"
        );
        assert!(
            p[1].message.contains("did you mean \"listen\""),
            "saw {}",
            p[1].message
        );
        assert!(
            doc["server"].as_table().unwrap().is_empty(),
            "unknown keys are removed"
        );
    }
}
