//! Property tests of the four pure parts a hostile request or file reaches first: route
//! templates, cache keys, config parsing and link rewriting. They are the normal-suite
//! companions of `benches/fuzz.rs`: fewer cases (256 each), so CI runs them on every push.

use std::collections::BTreeMap;

use http::Method;
use proptest::prelude::*;
use proptest::test_runner::Config as Cases;
use serde_json::Value;

use cxgate::cache::cache_key;
use cxgate::config::route::PathTemplate;
use cxgate::upstream::rewrite::Rewriter;

const UP: &str = "https://api.engagor.com";
const PUBLIC: &str = "http://127.0.0.1:8080";
const SHIPPED: &str = include_str!("../config/cxgate.toml");

fn cases() -> Cases {
    Cases {
        cases: 256,
        // A failing case is printed, shrunk, in the test output; nothing is written to disk.
        failure_persistence: None,
        ..Cases::default()
    }
}

// ---------------------------------------------------------------------------------------
// Route templates
// ---------------------------------------------------------------------------------------

/// One template segment: `Some(literal)` or `None` for a capture.
fn template_segments() -> impl Strategy<Value = Vec<Option<String>>> {
    prop::collection::vec(
        prop_oneof!["[a-z0-9_.-]{1,8}".prop_map(Some), Just(None),],
        0..7,
    )
}

/// The template text, naming captures `c0`, `c1`, ... so names never repeat.
fn template_text(segments: &[Option<String>]) -> String {
    if segments.is_empty() {
        return "/".to_string();
    }
    let mut names = 0;
    segments
        .iter()
        .map(|s| match s {
            Some(lit) => format!("/{lit}"),
            None => {
                names += 1;
                format!("/{{c{}}}", names - 1)
            }
        })
        .collect()
}

/// A path built from the template with `values` in its captures.
fn fill(segments: &[Option<String>], values: &[String]) -> String {
    if segments.is_empty() {
        return "/".to_string();
    }
    let mut next = values.iter();
    segments
        .iter()
        .map(|s| match s {
            Some(lit) => format!("/{lit}"),
            None => format!("/{}", next.next().map_or("v", String::as_str)),
        })
        .collect()
}

/// Capture values: any non-empty text without `/` (including `{`, `%` and non-ASCII).
fn capture_values() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec("[^/]{1,12}", 8)
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn template_parsing_and_matching_never_panic(template in "\\PC{0,40}", path in "\\PC{0,60}") {
        if let Ok(t) = PathTemplate::parse(&template) {
            let _ = t.matches(&path);
            let _ = t.to_string();
        }
    }

    #[test]
    fn a_template_matches_every_path_built_from_it(
        segments in template_segments(),
        values in capture_values(),
        trailing in any::<bool>(),
    ) {
        let text = template_text(&segments);
        let t = PathTemplate::parse(&text)
            .unwrap_or_else(|e| panic!("expected {text:?} to compile, saw {e}"));
        let mut path = fill(&segments, &values);
        if trailing && path != "/" {
            path.push('/');
        }
        let caps = t.matches(&path);
        prop_assert!(caps.is_some(), "expected {text} to match {path:?}");
        let caps = caps.unwrap_or_default();
        let captures = segments.iter().filter(|s| s.is_none()).count();
        for (i, value) in values.iter().take(captures).enumerate() {
            let name = format!("c{i}");
            prop_assert_eq!(
                caps.get(&name),
                Some(value.as_str()),
                "capture {} of {} on {:?}", name, text, path
            );
        }
        prop_assert_eq!(t.to_string(), text.clone(), "template round trip");
    }

    /// The converse: whatever a template matches is exactly the template filled with the
    /// captured values (a trailing slash aside), so no other path slips through.
    #[test]
    fn a_template_matches_only_paths_built_from_it(
        segments in template_segments(),
        values in capture_values(),
        edits in prop::collection::vec((0usize..6, 0usize..64, "[a-z0-9{}%/.]{0,3}"), 0..4),
    ) {
        let text = template_text(&segments);
        let t = PathTemplate::parse(&text)
            .unwrap_or_else(|e| panic!("expected {text:?} to compile, saw {e}"));
        // Start from a matching path and damage it a little, so both outcomes are common.
        let mut path = fill(&segments, &values);
        for (op, at, piece) in &edits {
            let mut at = (*at).min(path.len());
            while !path.is_char_boundary(at) {
                at -= 1;
            }
            match op {
                0 => path.insert_str(at, piece),
                1 => path.truncate(at.max(1)),
                2 => path.push_str(&format!("/{piece}")),
                3 => path = path.replacen("//", "/", 1),
                4 => path.insert(at, '/'),
                _ => {}
            }
        }
        if let Some(caps) = t.matches(&path) {
            let mut next = 0;
            let rebuilt: Vec<String> = segments
                .iter()
                .map(|s| match s {
                    Some(lit) => lit.clone(),
                    None => {
                        next += 1;
                        caps.get(&format!("c{}", next - 1)).unwrap_or("").to_string()
                    }
                })
                .collect();
            let rebuilt = format!("/{}", rebuilt.join("/"));
            let expected = if path.len() > 1 { path.strip_suffix('/').unwrap_or(&path) } else { &path };
            prop_assert_eq!(
                &rebuilt, expected,
                "{} matched {:?} but the captures rebuild {:?}", text, path, rebuilt
            );
        }
    }

    /// `Config::find_route` agrees with the templates: a path built from route `k` is found
    /// at `k` or at an earlier route that also matches it (first match wins).
    #[test]
    fn find_route_returns_the_first_matching_route(
        tables in prop::collection::vec(template_segments(), 1..6),
        values in capture_values(),
        pick in any::<prop::sample::Index>(),
    ) {
        let mut texts: Vec<String> = Vec::new();
        for segments in &tables {
            let text = template_text(segments);
            let normalised = text.trim_end_matches('/').to_string();
            if !texts.iter().any(|t| t.trim_end_matches('/') == normalised) {
                texts.push(text);
            }
        }
        let routes: String = texts
            .iter()
            .map(|t| format!("[[routes]]\nmatch = \"GET {t}\"\n"))
            .collect();
        let toml = format!(
            "upstream.base_url = \"{UP}\"\ntoken.access_token_env = \"X\"\n{routes}"
        );
        let cfg = cxgate::config::parse(&toml)
            .unwrap_or_else(|e| panic!("expected a valid config, saw {:?}\n{toml}", e.lines()));
        let k = pick.index(texts.len());
        let segments = tables
            .iter()
            .find(|s| template_text(s) == texts[k])
            .cloned()
            .unwrap_or_default();
        let path = fill(&segments, &values);
        let found = cfg.find_route(&Method::GET, &path).map(|(i, _)| i);
        prop_assert!(found.is_some_and(|i| i <= k), "expected a route at or before {} for {:?}, saw {:?}", k, path, found);
        let i = found.unwrap_or_default();
        prop_assert!(cfg.routes[i].path.matches(&path).is_some(), "route {} does not match {:?}", i, path);
        for earlier in &cfg.routes[..i] {
            prop_assert!(earlier.path.matches(&path).is_none(), "an earlier route {} also matches {:?}", earlier.match_text, path);
        }
        prop_assert!(cfg.find_route(&Method::POST, &path).is_none(), "a GET route answered a POST for {:?}", path);
    }
}

// ---------------------------------------------------------------------------------------
// Cache keys
// ---------------------------------------------------------------------------------------

fn encode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

fn query_of(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Distinct names, any values.
fn distinct_pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::btree_map("[a-z]{1,6}", "\\PC{0,8}", 0..8)
        .prop_map(|m: BTreeMap<String, String>| m.into_iter().collect())
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn cache_key_never_panics(path in "\\PC{0,40}", query in proptest::option::of("\\PC{0,60}")) {
        let _ = cache_key(&Method::GET, &path, query.as_deref());
        let _ = cache_key(&Method::HEAD, &path, query.as_deref());
    }

    #[test]
    fn permuted_query_pairs_give_one_key(
        pairs in distinct_pairs(),
        order in any::<u64>(),
    ) {
        let mut shuffled = pairs.clone();
        // A Fisher-Yates shuffle driven by the generated seed.
        let mut seed = order;
        for i in (1..shuffled.len()).rev() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (seed >> 33) as usize % (i + 1);
            shuffled.swap(i, j);
        }
        let a = cache_key(&Method::GET, "/1/inbox/mentions", Some(&query_of(&pairs)));
        let b = cache_key(&Method::GET, "/1/inbox/mentions", Some(&query_of(&shuffled)));
        prop_assert_eq!(&a, &b, "reordered pairs {:?} vs {:?}", pairs, shuffled);
        let head = cache_key(&Method::HEAD, "/1/inbox/mentions/", Some(&query_of(&shuffled)));
        prop_assert_eq!(&a, &head, "HEAD with a trailing slash should share the GET key");
    }

    #[test]
    fn the_credential_never_reaches_a_key(
        pairs in prop::collection::vec(("[a-z]{1,6}", "[a-z0-9]{0,6}"), 0..6),
        secret in "tok[A-Za-z0-9]{12}",
        at in any::<prop::sample::Index>(),
        spelling in prop::sample::select(vec!["access_token", "access%5Ftoken", "access%5ftoken", "%61ccess_token", "access_toke%6E"]),
    ) {
        let mut parts: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        parts.insert(at.index(parts.len() + 1), format!("{spelling}={secret}"));
        let query = parts.join("&");
        let key = cache_key(&Method::GET, "/me", Some(&query));
        prop_assert!(!key.contains(&secret), "the credential leaked into {:?}", key);
        prop_assert!(!key.contains("access_token"), "the parameter name leaked into {:?}", key);
        let without = cache_key(&Method::GET, "/me", Some(&query_of(&pairs)));
        prop_assert_eq!(key, without, "the credential split the key for {:?}", query);
    }

    #[test]
    fn different_values_give_different_keys(
        pairs in distinct_pairs().prop_filter("need a pair", |p| !p.is_empty()),
        which in any::<prop::sample::Index>(),
        other in "\\PC{0,8}",
    ) {
        let i = which.index(pairs.len());
        prop_assume!(pairs[i].1 != other);
        let mut changed = pairs.clone();
        changed[i].1 = other;
        let a = cache_key(&Method::GET, "/x", Some(&query_of(&pairs)));
        let b = cache_key(&Method::GET, "/x", Some(&query_of(&changed)));
        prop_assert_ne!(&a, &b, "different values {:?} and {:?} share one key", pairs, changed);
        let c = cache_key(&Method::GET, "/y", Some(&query_of(&pairs)));
        prop_assert_ne!(&a, &c, "different paths share one key");
    }
}

// ---------------------------------------------------------------------------------------
// Config parsing
// ---------------------------------------------------------------------------------------

/// One edit of a config text.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    Truncate(usize),
    Insert(usize, String),
    ReplaceChar(usize, char),
}

fn edit() -> impl Strategy<Value = Edit> {
    let snippet = prop_oneof![
        Just("[server]\n".to_string()),
        Just("[[routes]]\nmatch = \"GET /{x}\"\n".to_string()),
        Just("ttl = \"0s\"\n".to_string()),
        Just("limit = 0\n".to_string()),
        Just("listen = \"999.1.1.1:99999\"\n".to_string()),
        Just("max_body_bytes = \"18446744073709551616\"\n".to_string()),
        Just("period = \"-1s\"\n".to_string()),
        Just("tags = [\"{account_id\"]\n".to_string()),
        Just("\u{feff}é\"\n".to_string()),
        "\\PC{0,20}",
    ];
    prop_oneof![
        any::<usize>().prop_map(Edit::DeleteLine),
        any::<usize>().prop_map(Edit::DuplicateLine),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        any::<usize>().prop_map(Edit::Truncate),
        (any::<usize>(), snippet).prop_map(|(a, s)| Edit::Insert(a, s)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                '"', '[', ']', '=', '{', '}', '\n', '0', 'x', 'é', '\\'
            ])
        )
            .prop_map(|(a, c)| Edit::ReplaceChar(a, c)),
    ]
}

fn apply(text: &str, edit: &Edit) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let n = lines.len().max(1);
    match edit {
        Edit::DeleteLine(i) => {
            if !lines.is_empty() {
                lines.remove(i % n);
            }
        }
        Edit::DuplicateLine(i) => {
            if let Some(line) = lines.get(i % n).cloned() {
                lines.insert(i % n, line);
            }
        }
        Edit::SwapLines(a, b) => {
            if !lines.is_empty() {
                lines.swap(a % n, b % n);
            }
        }
        Edit::Insert(i, s) => lines.insert(i % (lines.len() + 1), s.clone()),
        Edit::Truncate(at) | Edit::ReplaceChar(at, _) => {
            let mut text = lines.join("\n");
            let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            if let Some(&pos) = boundaries.get(at % boundaries.len().max(1)) {
                match edit {
                    Edit::Truncate(_) => text.truncate(pos),
                    Edit::ReplaceChar(_, c) => {
                        let old = text[pos..].chars().next().map_or(0, char::len_utf8);
                        text.replace_range(pos..pos + old, &c.to_string());
                    }
                    _ => {}
                }
            }
            return text;
        }
    }
    lines.join("\n")
}

/// Every problem names a key path and says something.
fn problems_are_well_formed(
    result: &Result<cxgate::config::Config, cxgate::config::ConfigError>,
) -> Result<(), String> {
    if let Err(e) = result {
        let lines = e.lines();
        if lines.is_empty() {
            return Err("an error with no problem lines".into());
        }
        if let cxgate::config::ConfigError::Invalid(problems) = e {
            for p in problems {
                if p.path.trim().is_empty() || p.message.trim().is_empty() {
                    return Err(format!("a problem without path or message: {p:?}"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn the_shipped_config_is_the_seed_and_parses() {
    if let Err(e) = cxgate::config::parse(SHIPPED) {
        panic!("expected config/cxgate.toml to parse, saw {:?}", e.lines());
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn config_parsing_never_panics_on_arbitrary_text(text in "\\PC{0,300}") {
        let result = cxgate::config::parse(&text);
        if let Err(why) = problems_are_well_formed(&result) {
            prop_assert!(false, "{} for {:?}", why, text);
        }
    }

    #[test]
    fn config_parsing_never_panics_on_toml_shaped_text(text in "([a-z_.\\[\\]]{1,12} ?= ?(\"[a-z0-9{}/: ]{0,12}\"|[0-9]{1,4}|true|\\[\\])?\n){0,12}") {
        let result = cxgate::config::parse(&text);
        if let Err(why) = problems_are_well_formed(&result) {
            prop_assert!(false, "{} for {:?}", why, text);
        }
    }

    #[test]
    fn config_parsing_never_panics_on_a_mutated_shipped_config(edits in prop::collection::vec(edit(), 1..6)) {
        let mut text = SHIPPED.to_string();
        for e in &edits {
            text = apply(&text, e);
        }
        let result = cxgate::config::parse(&text);
        if let Err(why) = problems_are_well_formed(&result) {
            prop_assert!(false, "{} after {:?}", why, edits);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Link rewriting
// ---------------------------------------------------------------------------------------

/// A realistic bearer token: long, alphanumeric with the usual base64 punctuation, and not
/// a bare number (a secret spelled like a JSON number is outside any real token format).
fn secret() -> impl Strategy<Value = String> {
    "[A-Za-z][A-Za-z0-9._~+/-]{15,40}"
}

/// Path, query pairs (one may be the credential) and fragment of an upstream link.
#[derive(Debug, Clone)]
struct Link {
    path: String,
    pairs: Vec<(String, String)>,
    token_at: Option<usize>,
    fragment: Option<String>,
}

fn link() -> impl Strategy<Value = Link> {
    (
        "(/[a-z0-9]{1,8}){0,4}/?",
        prop::collection::vec(("[a-z_]{1,8}", "[A-Za-z0-9%._-]{0,8}"), 0..4),
        proptest::option::of(any::<prop::sample::Index>()),
        proptest::option::of("[a-z0-9]{1,6}"),
    )
        .prop_map(|(path, pairs, token_at, fragment)| Link {
            path,
            pairs: pairs
                .into_iter()
                .filter(|(k, _)| k != "access_token")
                .collect(),
            token_at: token_at.map(|i| i.index(usize::MAX)),
            fragment,
        })
}

impl Link {
    /// The link as the upstream writes it, with `secret` as its `access_token` if any.
    fn upstream(&self, secret: &str) -> String {
        let mut params: Vec<String> = self.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(at) = self.token_at {
            params.insert(at % (params.len() + 1), format!("access_token={secret}"));
        }
        self.render(UP, &params)
    }

    /// The link a client must see.
    fn public(&self) -> String {
        let params: Vec<String> = self.pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.render(PUBLIC, &params)
    }

    fn render(&self, base: &str, params: &[String]) -> String {
        let mut out = format!("{base}{}", self.path);
        if !params.is_empty() {
            out.push('?');
            out.push_str(&params.join("&"));
        }
        if let Some(f) = &self.fragment {
            out.push('#');
            out.push_str(f);
        }
        out
    }
}

/// Any JSON value, with strings of any text.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::from),
        "[ -~]{0,20}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("\\PC{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every string in a JSON value (keys included).
fn strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                strings(v, out);
            }
        }
        _ => {}
    }
}

/// The upstream base at a link boundary inside `text`.
fn has_upstream_link(text: &str) -> bool {
    text.match_indices(UP).any(|(i, _)| {
        matches!(
            text.as_bytes().get(i + UP.len()),
            None | Some(b'/' | b'?' | b'#')
        )
    })
}

fn rewrite(body: &str, secret: &str) -> String {
    let rewriter = Rewriter::new(UP, PUBLIC);
    let input = bytes::Bytes::from(body.to_string());
    let out = rewriter.rewrite_body(&input, &[secret]).unwrap_or(input);
    String::from_utf8(out.to_vec()).unwrap_or_else(|e| panic!("expected UTF-8 output, saw {e}"))
}

/// PHP's `json_encode` escapes every `/`; outside strings JSON has no `/`, so this is safe.
fn php_escaped(json: &str) -> String {
    json.replace('/', "\\/")
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn rewriting_keeps_any_json_valid_and_drops_the_secret(
        value in json_value(),
        secret in secret(),
        links in prop::collection::vec(link(), 0..3),
        php in any::<bool>(),
    ) {
        // Put the links and the secret somewhere inside the arbitrary value.
        let doc = serde_json::json!({
            "data": value,
            "links": links.iter().map(|l| l.upstream(&secret)).collect::<Vec<_>>(),
            "echo": format!("token {secret} again"),
            "text": format!("see {} or {UP}", links.first().map(|l| l.upstream(&secret)).unwrap_or_default()),
        });
        let mut body = doc.to_string();
        if php {
            body = php_escaped(&body);
        }
        let out = rewrite(&body, &secret);
        let parsed: Result<Value, _> = serde_json::from_str(&out);
        prop_assert!(parsed.is_ok(), "output is not JSON: {:?}\ninput: {}", out, body);
        let parsed = parsed.unwrap_or_default();
        prop_assert!(!out.contains(&secret), "the secret survived in {:?}", out);
        let mut all = Vec::new();
        strings(&parsed, &mut all);
        for s in &all {
            prop_assert!(!s.contains(&secret), "the secret survived in the string {:?}", s);
            prop_assert!(!has_upstream_link(s), "an upstream link survived in {:?}", s);
        }
    }

    #[test]
    fn upstream_links_become_public_links_without_the_token(
        links in prop::collection::vec(link(), 1..4),
        secret in secret(),
        php in any::<bool>(),
    ) {
        let doc = serde_json::json!({
            "paging": {
                "next_url": links[0].upstream(&secret),
                "prev_url": Value::Null,
            },
            "action_links": links.iter().map(|l| serde_json::json!({"type": "reply", "link": l.upstream(&secret)})).collect::<Vec<_>>(),
        });
        let mut body = doc.to_string();
        if php {
            body = php_escaped(&body);
        }
        let out = rewrite(&body, &secret);
        let parsed: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("output is not JSON ({e}): {out}\ninput: {body}"));
        let first = links[0].public();
        prop_assert_eq!(
            parsed["paging"]["next_url"].as_str(),
            Some(first.as_str()),
            "next_url in {}", out
        );
        for (i, l) in links.iter().enumerate() {
            let public = l.public();
            prop_assert_eq!(
                parsed["action_links"][i]["link"].as_str(),
                Some(public.as_str()),
                "action link {} in {}", i, out
            );
        }
        prop_assert!(!out.contains("access_token"), "an access_token parameter survived in {}", out);
    }

    /// Text that holds neither a link nor the secret is returned untouched.
    #[test]
    fn bodies_without_links_or_secrets_are_left_alone(value in json_value(), secret in secret()) {
        let body = value.to_string();
        prop_assume!(!body.contains(&secret) && !body.contains("https:"));
        let rewriter = Rewriter::new(UP, PUBLIC);
        let out = rewriter.rewrite_body(&bytes::Bytes::from(body.clone()), &[&secret]);
        prop_assert!(out.is_none(), "expected no rewrite of {}, saw {:?}", body, out);
    }
}
