//! What a route table says writes invalidate, in a form other replicas can read back.
//!
//! During a rolling reload replicas run different route tables, and an entry is tagged by
//! the table of the replica that stored it; a write must drop what every live table would
//! tag for it, not only its own replica's. [`WriteRules`] is the part of a table that
//! decides that (each route that may match a write, in order, with its `invalidates`),
//! with a canonical text and a name digested from it, so replicas on the same rules share
//! one name whatever else their files say.

use std::fmt::Write as _;
use std::time::Duration;

use http::Method;

use super::route::{PathTemplate, TagTemplate};
use super::Config;

/// The routes of one table a write can match, with what each invalidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRules {
    routes: Vec<Rule>,
    /// The canonical text (JSON: `[["POST /path/{x}", ["tag:{x}"]], ...]`).
    text: String,
    /// The first 16 hex digits of the text's SHA-256.
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// `None` for `*`.
    method: Option<Method>,
    path: PathTemplate,
    invalidates: Vec<TagTemplate>,
}

impl WriteRules {
    /// The rules of `cfg`: every route except GET and HEAD ones, which no write matches, so
    /// a write finds the route here that it finds in `cfg`.
    pub fn of(cfg: &Config) -> WriteRules {
        let routes = cfg
            .routes
            .iter()
            .filter(|r| !matches!(&r.method, Some(m) if m == Method::GET || m == Method::HEAD))
            .map(|r| Rule {
                method: r.method.clone(),
                path: r.path.clone(),
                invalidates: r.invalidates.clone(),
            })
            .collect();
        WriteRules::new(routes)
    }

    /// Reads back what [`WriteRules::text`] made (on another replica, perhaps another
    /// version of it); an error says what is wrong. Nothing is trusted: each route is
    /// compiled as the config's own are.
    pub fn parse(text: &str) -> Result<WriteRules, String> {
        let raw: Vec<(String, Vec<String>)> =
            serde_json::from_str(text).map_err(|e| format!("not a list of rules: {e}"))?;
        let mut routes = Vec::with_capacity(raw.len());
        for (at, (matched, invalidates)) in raw.into_iter().enumerate() {
            let bad = |why: String| format!("rule {at} ({matched:?}): {why}");
            let (method, path) = matched
                .split_once(' ')
                .ok_or_else(|| bad("not \"METHOD /path\"".into()))?;
            let method = match method {
                "*" => None,
                m => Some(Method::from_bytes(m.as_bytes()).map_err(|e| bad(e.to_string()))?),
            };
            let path = PathTemplate::parse(path).map_err(|e| bad(e.to_string()))?;
            let invalidates = invalidates
                .iter()
                .map(|t| TagTemplate::parse(t, &path).map_err(|e| bad(e.to_string())))
                .collect::<Result<Vec<_>, _>>()?;
            routes.push(Rule {
                method,
                path,
                invalidates,
            });
        }
        Ok(WriteRules::new(routes))
    }

    fn new(routes: Vec<Rule>) -> WriteRules {
        let raw: Vec<(String, Vec<String>)> = routes
            .iter()
            .map(|r| {
                let method = r.method.as_ref().map_or("*", Method::as_str);
                let tags = r.invalidates.iter().map(ToString::to_string).collect();
                (format!("{method} {}", r.path), tags)
            })
            .collect();
        // A list of strings always serialises.
        let text = serde_json::to_string(&raw).unwrap_or_default();
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut name = String::with_capacity(16);
        for byte in &digest.as_ref()[..8] {
            let _ = write!(name, "{byte:02x}");
        }
        WriteRules { routes, text, name }
    }

    /// The canonical text, as other replicas read it with [`WriteRules::parse`].
    pub fn text(&self) -> &str {
        &self.text
    }

    /// What tells these rules apart from other tables' (the same for the same rules).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The writes (method and path) of these rules that would invalidate `tag`: what a
    /// purge of that tag stands for, to find the tags other tables give the same writes.
    pub fn writes_naming(&self, tag: &str) -> Vec<(Method, String)> {
        let mut writes = Vec::new();
        for r in &self.routes {
            for t in &r.invalidates {
                let Some(path) = t.unfill(tag).and_then(|caps| r.path.fill(&caps)) else {
                    continue;
                };
                writes.push((r.method.clone().unwrap_or(Method::POST), path));
            }
        }
        writes
    }

    /// The tags a successful write `method path` invalidates under these rules: those of
    /// the first route that matches it, as the table's own lookup finds it.
    pub fn tags(&self, method: &Method, path: &str) -> Vec<String> {
        for r in &self.routes {
            if r.method.as_ref().is_some_and(|m| m != method) {
                continue;
            }
            if let Some(caps) = r.path.matches(path) {
                return r.invalidates.iter().map(|t| t.fill(&caps)).collect();
            }
        }
        Vec::new()
    }
}

/// How long an entry stored under `cfg`'s routes can live, at most: the longest ttl with
/// its longer stale window.
pub fn longest_entry_life(cfg: &Config) -> Duration {
    cfg.routes
        .iter()
        .filter_map(|r| {
            r.ttl
                .map(|ttl| ttl.saturating_add(r.stale_while_revalidate.max(r.stale_if_error)))
        })
        .max()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(routes: &str) -> Config {
        let text = format!(
            "upstream.base_url = \"https://api.engagor.com\"\ntoken.access_token_env = \"T\"\n{routes}"
        );
        crate::config::parse(&text).unwrap_or_else(|e| panic!("invalid: {:?}", e.lines()))
    }

    const TABLE: &str = r#"
[[routes]]
match = "GET /{a}/contact/{id}"
ttl = "5m"
stale_if_error = "30m"
tags = ["contact:{a}/{id}"]
[[routes]]
match = "POST /{a}/contact/{id}"
invalidates = ["contact:{a}/{id}", "account:{a}"]
[[routes]]
match = "* /{a}/anything"
invalidates = ["any:{a}"]
"#;

    #[test]
    fn a_write_gets_the_tags_of_the_first_route_it_matches() {
        let rules = WriteRules::of(&config(TABLE));
        let post = Method::POST;
        assert_eq!(
            rules.tags(&post, "/7/contact/9"),
            ["contact:7/9", "account:7"],
            "expected the POST route's tags"
        );
        assert_eq!(
            rules.tags(&Method::DELETE, "/7/contact/9"),
            Vec::<String>::new()
        );
        assert_eq!(rules.tags(&Method::DELETE, "/7/anything"), ["any:7"]);
        assert_eq!(rules.tags(&post, "/7/elsewhere"), Vec::<String>::new());
    }

    #[test]
    fn the_text_reads_back_to_the_same_rules_and_name() {
        let rules = WriteRules::of(&config(TABLE));
        assert!(
            !rules.text().contains("GET"),
            "expected no read route in {}",
            rules.text()
        );
        let back = WriteRules::parse(rules.text()).expect("reads back");
        assert_eq!(back, rules);
        assert_eq!(back.name().len(), 16, "saw {:?}", back.name());
        let renamed = WriteRules::of(&config(&TABLE.replace("contact:", "person:")));
        assert_ne!(
            renamed.name(),
            rules.name(),
            "expected other rules, another name"
        );
        // A read route's change alone leaves the write rules, and their name, as they are.
        let longer = WriteRules::of(&config(&TABLE.replace("ttl = \"5m\"", "ttl = \"6m\"")));
        assert_eq!(longer.name(), rules.name());
    }

    #[test]
    fn damaged_text_is_refused_with_a_reason() {
        for (text, why) in [
            ("{}", "not a list of rules"),
            (r#"[["POST/x", []]]"#, "not \"METHOD /path\""),
            (r#"[["POST /x", ["t:{y}"]]]"#, "unknown placeholder"),
            (r#"[["P OST /x", []]]"#, "rule 0"),
        ] {
            let seen = WriteRules::parse(text).expect_err(text);
            assert!(
                seen.contains(why),
                "expected {why:?} for {text}, saw {seen:?}"
            );
        }
    }

    #[test]
    fn the_longest_life_is_a_ttl_with_its_longer_stale_window() {
        assert_eq!(
            longest_entry_life(&config(TABLE)),
            Duration::from_secs(35 * 60)
        );
        assert_eq!(longest_entry_life(&config("")), Duration::ZERO);
    }
}
