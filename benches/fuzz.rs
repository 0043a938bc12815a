//! Plain-Rust fuzz loops over the four parsers that hostile input reaches first: route
//! templates, cache keys, config parsing and link rewriting.
//!
//! No nightly toolchain is needed (so no cargo-fuzz): each target runs a loop of random and
//! mutated inputs for a fixed time, with `catch_unwind` around every execution. Inputs whose
//! outcome has a new "shape" (a small fingerprint of what the target did) join the corpus
//! and are mutated further, a poor man's coverage feedback; the time of the last new shape
//! shows whether a run has plateaued. Invariants are checked on every execution too.
//!
//! `cargo bench --bench fuzz` runs 20 s per target; `cargo bench --bench fuzz -- --seconds 5`
//! changes that, `--target route|key|config|rewrite` runs one. Exits 1 on any panic or
//! broken invariant, printing the input.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Method;

use cxgate::cache::cache_key;
use cxgate::config::route::{PathTemplate, TagTemplate};
use cxgate::upstream::rewrite::Rewriter;

const UP: &str = "https://api.engagor.com";
const PUBLIC: &str = "http://127.0.0.1:8080";
const SECRET: &str = "zQ9tokSECRET7x1Kp";
const MAX_CORPUS: usize = 2_000;
const MAX_INPUT: usize = 8_192;

/// What one execution found: its shape, or a broken invariant.
type Outcome = Result<u64, String>;

fn shape(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// Figures of one target's run.
struct Run {
    name: &'static str,
    execs: u64,
    elapsed: Duration,
    shapes: usize,
    /// Distinct shapes known at each quarter of the run.
    quarters: [usize; 4],
    last_new_shape: Duration,
    last_new_exec: u64,
    corpus: usize,
    failures: Vec<String>,
}

impl Run {
    fn print(&self) {
        let rate = self.execs as f64 / self.elapsed.as_secs_f64();
        println!(
            "{:<8} {:>11} execs in {:>5.1} s ({:>9.0}/s); {:>4} shapes (by quarter {:?}); \
             last new shape at {:>5.1} s (exec {}); corpus {}; failures {}",
            self.name,
            self.execs,
            self.elapsed.as_secs_f64(),
            rate,
            self.shapes,
            self.quarters,
            self.last_new_shape.as_secs_f64(),
            self.last_new_exec,
            self.corpus,
            self.failures.len()
        );
        for f in self.failures.iter().take(5) {
            println!("  FAILURE {f}");
        }
    }
}

/// Runs `target` on generated and mutated inputs for `budget`.
fn fuzz(
    name: &'static str,
    budget: Duration,
    seeds: &[String],
    dictionary: &[&str],
    generate: impl Fn(&mut fastrand::Rng) -> String,
    target: impl Fn(&str) -> Outcome,
) -> Run {
    let mut rng = fastrand::Rng::with_seed(0x5eed ^ name.len() as u64);
    let mut corpus: Vec<String> = seeds.to_vec();
    let mut shapes = HashSet::new();
    let mut failures: Vec<String> = Vec::new();
    let mut seen_failures = HashSet::new();
    let started = Instant::now();
    let (mut execs, mut last_new_exec) = (0u64, 0u64);
    let mut last_new_shape = Duration::ZERO;
    let mut quarters = [0usize; 4];
    loop {
        let elapsed = started.elapsed();
        // Check the clock every 256 executions; the targets take microseconds.
        if execs % 256 == 0 {
            if elapsed >= budget {
                break;
            }
            let q = ((elapsed.as_secs_f64() / budget.as_secs_f64()) * 4.0) as usize;
            for slot in quarters.iter_mut().skip(q.min(3)) {
                *slot = shapes.len();
            }
        }
        let input = if corpus.is_empty() || rng.u8(..) < 64 {
            generate(&mut rng)
        } else {
            let base = &corpus[rng.usize(..corpus.len())];
            let other = &corpus[rng.usize(..corpus.len())];
            mutate(&mut rng, base, other, dictionary)
        };
        execs += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(Ok(s)) => {
                if shapes.insert(s) {
                    last_new_shape = started.elapsed();
                    last_new_exec = execs;
                    if corpus.len() < MAX_CORPUS {
                        corpus.push(input);
                    } else {
                        let at = rng.usize(..corpus.len());
                        corpus[at] = input;
                    }
                }
            }
            Ok(Err(why)) => {
                if seen_failures.insert(why.clone()) && failures.len() < 50 {
                    failures.push(format!("invariant: {why}; input {input:?}"));
                }
            }
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "non-string panic".into());
                if seen_failures.insert(message.clone()) && failures.len() < 50 {
                    failures.push(format!("panic: {message}; input {input:?}"));
                }
            }
        }
    }
    Run {
        name,
        execs,
        elapsed: started.elapsed(),
        shapes: shapes.len(),
        quarters,
        last_new_shape,
        last_new_exec,
        corpus: corpus.len(),
        failures,
    }
}

/// One to four edits of `base`: insert a dictionary word or a random char, delete,
/// duplicate or splice a range, truncate. Works on chars, so the result stays UTF-8.
fn mutate(rng: &mut fastrand::Rng, base: &str, other: &str, dictionary: &[&str]) -> String {
    let mut chars: Vec<char> = base.chars().collect();
    for _ in 0..rng.usize(1..=4) {
        let at = rng.usize(..=chars.len());
        match rng.u8(..8) {
            0 | 1 => {
                let word = dictionary[rng.usize(..dictionary.len())];
                chars.splice(at..at, word.chars());
            }
            2 => chars.insert(at, random_char(rng)),
            3 if !chars.is_empty() => {
                let end = (at + rng.usize(1..=8)).min(chars.len());
                chars.drain(at.min(end)..end);
            }
            4 if !chars.is_empty() => {
                let end = (at + rng.usize(1..=16)).min(chars.len());
                let piece: Vec<char> = chars[at.min(end)..end].to_vec();
                chars.splice(at..at, piece);
            }
            5 => {
                let theirs: Vec<char> = other.chars().collect();
                let from = rng.usize(..=theirs.len());
                let end = (from + rng.usize(1..=32)).min(theirs.len());
                chars.splice(at..at, theirs[from..end].iter().copied());
            }
            6 if !chars.is_empty() => {
                let i = rng.usize(..chars.len());
                chars[i] = random_char(rng);
            }
            _ => chars.truncate(at),
        }
    }
    chars.truncate(MAX_INPUT);
    chars.into_iter().collect()
}

fn random_char(rng: &mut fastrand::Rng) -> char {
    const ODD: [char; 12] = [
        '\0',
        '\r',
        '\n',
        '\t',
        '\\',
        '"',
        '\u{7f}',
        'é',
        '\u{feff}',
        '\u{10ffff}',
        '€',
        '\u{301}',
    ];
    match rng.u8(..4) {
        0 => ODD[rng.usize(..ODD.len())],
        _ => rng.u8(0x20..0x7f) as char,
    }
}

fn pick<'a>(rng: &mut fastrand::Rng, from: &[&'a str]) -> &'a str {
    from[rng.usize(..from.len())]
}

// ---------------------------------------------------------------------------------------
// Target 1: route templates. Input: "template\npath".
// ---------------------------------------------------------------------------------------

const ROUTE_WORDS: &[&str] = &[
    "/",
    "//",
    "{",
    "}",
    "{account_id}",
    "{id}",
    "{service}",
    "{}",
    "{a}{b}",
    "me",
    "inbox",
    "contact",
    "mentions",
    "%2e",
    "..",
    ".",
    "\n",
    "é",
    "{account_id",
    "account_id}",
    "*",
];

fn route_generate(rng: &mut fastrand::Rng) -> String {
    let segment = |rng: &mut fastrand::Rng| -> String {
        match rng.u8(..4) {
            0 => format!("{{c{}}}", rng.u8(..10)),
            _ => pick(
                rng,
                &["me", "inbox", "12345", "x", "mentions", "a b", "é", "%41"],
            )
            .into(),
        }
    };
    let template: String = (0..rng.usize(0..6))
        .map(|_| format!("/{}", segment(rng)))
        .collect();
    let path: String = (0..rng.usize(0..7))
        .map(|_| format!("/{}", segment(rng)))
        .collect();
    let slash = if rng.bool() { "/" } else { "" };
    format!(
        "{}\n{path}{slash}",
        if template.is_empty() { "/" } else { &template }
    )
}

fn route_target(input: &str) -> Outcome {
    let (template, path) = input.split_once('\n').unwrap_or((input, "/"));
    let parsed = PathTemplate::parse(template);
    let t = match parsed {
        Ok(t) => t,
        Err(e) => {
            let kind = e.to_string();
            return Ok(shape((
                "err",
                kind.split_whitespace().next().map(str::to_string),
            )));
        }
    };
    let display = t.to_string();
    let again = PathTemplate::parse(&display)
        .map_err(|e| format!("Display of {template:?} is {display:?}, which fails: {e}"))?;
    if again != t {
        return Err(format!(
            "{template:?} does not round-trip through {display:?}"
        ));
    }
    let tag = TagTemplate::parse("t:{c0}/{c1}", &t).ok();
    let Some(caps) = t.matches(path) else {
        return Ok(shape((
            "nomatch",
            display.matches('/').count().min(8),
            tag.is_some(),
        )));
    };
    // Whatever matched must be exactly the template filled with the captures.
    let rebuilt: Vec<String> = display
        .split('/')
        .skip(1)
        .filter(|s| !s.is_empty())
        .map(
            |s| match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => caps.get(name).unwrap_or("").to_string(),
                None => s.to_string(),
            },
        )
        .collect();
    let rebuilt = format!("/{}", rebuilt.join("/"));
    let expected = if path.len() > 1 {
        path.strip_suffix('/').unwrap_or(path)
    } else {
        path
    };
    if rebuilt != expected {
        return Err(format!(
            "{display} matched {path:?} but rebuilds {rebuilt:?}"
        ));
    }
    let filled = tag.map(|tag| tag.fill(&caps).len().min(16));
    Ok(shape((
        "match",
        display.matches('/').count().min(8),
        display.matches('{').count(),
        path.ends_with('/'),
        filled,
    )))
}

// ---------------------------------------------------------------------------------------
// Target 2: cache keys. Input: "METHOD path?query".
// ---------------------------------------------------------------------------------------

const KEY_WORDS: &[&str] = &[
    "access_token=",
    "access%5Ftoken=",
    "%61ccess_token=",
    SECRET,
    "&",
    "=",
    "?",
    "+",
    "%",
    "%zz",
    "%2",
    "%00",
    "%e9",
    "/",
    "//",
    "a=1",
    "a=2",
    "é",
    "#",
    "&&",
    "==",
];

fn key_generate(rng: &mut fastrand::Rng) -> String {
    let method = pick(rng, &["GET", "HEAD", "POST"]);
    let path = pick(
        rng,
        &["/me", "/me/", "/", "", "//", "/1/inbox/mentions", "/x/é"],
    );
    let mut pairs: Vec<String> = (0..rng.usize(0..6))
        .map(|_| {
            format!(
                "{}={}",
                pick(rng, &["a", "b", "page", "limit", "q", "a%5Fb", "", "é"]),
                pick(rng, &["1", "2", "", "x+y", "%41", "A", "%zz"])
            )
        })
        .collect();
    if rng.bool() {
        let at = rng.usize(..=pairs.len());
        let name = pick(rng, &["access_token", "access%5Ftoken", "%61ccess_token"]);
        pairs.insert(at, format!("{name}={SECRET}"));
    }
    format!("{method} {path}?{}", pairs.join("&"))
}

fn key_target(input: &str) -> Outcome {
    let (method, rest) = input.split_once(' ').unwrap_or(("GET", input));
    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let key = cache_key(&method, path, query);
    if method == Method::GET && key != cache_key(&Method::HEAD, path, query) {
        return Err("HEAD and GET keys differ".into());
    }
    if path.starts_with('/') && key != cache_key(&method, &format!("{path}/"), query) {
        return Err("a trailing slash changed the key".into());
    }
    // The secret may only show up if something other than the credential carries it.
    if key.contains(SECRET) {
        // The method and path are the client's own text, kept as they are.
        let carried_elsewhere = method.as_str().contains(SECRET)
            || path.contains(SECRET)
            || query.is_some_and(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .any(|(k, v)| k != "access_token" && (k.contains(SECRET) || v.contains(SECRET)))
            });
        if !carried_elsewhere {
            return Err(format!("the credential leaked into the key {key:?}"));
        }
    }
    let pairs = query.map_or(0, |q| form_urlencoded::parse(q.as_bytes()).count());
    Ok(shape((
        method.as_str().to_string(),
        key.contains('?'),
        pairs.min(8),
        usize::BITS - key.len().leading_zeros(),
        key.ends_with('/'),
    )))
}

// ---------------------------------------------------------------------------------------
// Target 3: config parsing.
// ---------------------------------------------------------------------------------------

const CONFIG_WORDS: &[&str] = &[
    "[server]\n",
    "[[routes]]\n",
    "[[clients]]\n",
    "[budget]\n",
    "[token.oauth]\n",
    "match = \"GET /{account_id}/x\"\n",
    "ttl = \"0s\"\n",
    "ttl = \"10m\"\n",
    "stale_if_error = \"1h\"\n",
    "tags = [\"a:{account_id}\", \"{b}\"]\n",
    "limit = 0\n",
    "limit = 4294967296\n",
    "period = \"1h\"\n",
    "burst = -1\n",
    "max_body_bytes = \"1ZiB\"\n",
    "listen = \"[::1]:0\"\n",
    "key_sha256 = \"zz\"\n",
    "batch_reserve = 1.5\n",
    "\"",
    "=",
    "\n",
    "{",
    "}",
    "[",
    "]",
    "#",
    "'''",
    "\"\"\"",
    "é",
    "\\u0000",
    "1e999",
    "nan",
    "inf",
];

fn config_generate(rng: &mut fastrand::Rng) -> String {
    let mut text = String::from(
        "upstream.base_url = \"https://api.engagor.com\"\ntoken.access_token_env = \"X\"\n",
    );
    for _ in 0..rng.usize(0..8) {
        text.push_str(pick(rng, CONFIG_WORDS));
    }
    text
}

fn config_target(input: &str) -> Outcome {
    match cxgate::config::parse(input) {
        Ok(cfg) => Ok(shape((
            "ok",
            cfg.routes.len().min(16),
            cfg.clients.len().min(8),
        ))),
        Err(e) => {
            let lines = e.lines();
            if lines.is_empty() {
                return Err("an error without problems".into());
            }
            let mut kinds: Vec<String> = Vec::new();
            if let cxgate::config::ConfigError::Invalid(problems) = &e {
                for p in problems {
                    if p.path.trim().is_empty() || p.message.trim().is_empty() {
                        return Err(format!("a problem without path or message: {p:?}"));
                    }
                    // The path without indices or line numbers, plus the message's first word.
                    let path: String = p.path.chars().filter(|c| !c.is_ascii_digit()).collect();
                    let word = p
                        .message
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    kinds.push(format!("{path} {word}"));
                }
            }
            kinds.sort();
            kinds.dedup();
            kinds.truncate(3);
            Ok(shape(("err", kinds)))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Target 4: link rewriting and redaction.
// ---------------------------------------------------------------------------------------

const REWRITE_WORDS: &[&str] = &[
    UP,
    "https:\\/\\/api.engagor.com",
    "https://api.engagor.com.evil",
    SECRET,
    "access_token=",
    "?",
    "&",
    "#",
    "\\/",
    "\\\"",
    "\\u002f",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    " ",
    "null",
    "\"next_url\":",
    "/1/inbox/mentions",
    "%5F",
    "access%5Ftoken=",
];

fn upstream_link(rng: &mut fastrand::Rng) -> String {
    let path = pick(rng, &["", "/", "/1/inbox/mentions", "/me?x=1", "/a/b/"]);
    let query = match rng.u8(..4) {
        0 => format!("?access_token={SECRET}&page=2"),
        1 => format!("?page=2&access_token={SECRET}#f"),
        2 => "?page=2".to_string(),
        _ => String::new(),
    };
    format!("{UP}{path}{query}")
}

fn json_string(rng: &mut fastrand::Rng) -> serde_json::Value {
    let text = match rng.u8(..5) {
        0 => upstream_link(rng),
        1 => format!("see {} now", upstream_link(rng)),
        2 => format!("Bearer {SECRET}"),
        3 => "plain text é \" \\".to_string(),
        _ => format!("{PUBLIC}/me"),
    };
    serde_json::Value::from(text)
}

fn rewrite_generate(rng: &mut fastrand::Rng) -> String {
    let mut items = Vec::new();
    for _ in 0..rng.usize(1..5) {
        items.push(json_string(rng));
    }
    let doc = serde_json::json!({"paging": {"next_url": json_string(rng)}, "items": items});
    let text = doc.to_string();
    if rng.bool() {
        text.replace('/', "\\/")
    } else {
        text
    }
}

/// An upstream link standing on its own: at the start of the text or after whitespace or a
/// character that opens or separates (an occurrence right after `/`, `=`, a letter or a
/// closing bracket is text inside the path or query of another link, which the rewriter
/// rightly leaves as data).
fn has_upstream_link(text: &str) -> bool {
    text.match_indices(UP).any(|(i, _)| {
        let starts = text[..i].chars().next_back().is_none_or(|c| {
            c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '(' | '[' | '{' | ',' | ';' | '|')
        });
        starts
            && matches!(
                text.as_bytes().get(i + UP.len()),
                None | Some(b'/' | b'?' | b'#')
            )
    })
}

fn strings(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::String(s) => out.push(s.clone()),
        serde_json::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                out.push(k.clone());
                strings(v, out);
            }
        }
        _ => {}
    }
}

fn rewrite_target(rewriter: &Rewriter, input: &str) -> Outcome {
    let body = Bytes::from(input.to_string());
    let out = rewriter.rewrite_body(&body, &[SECRET]);
    let changed = out.is_some();
    let out = out.unwrap_or(body);
    let input_json = serde_json::from_str::<serde_json::Value>(input).ok();
    let output_json = serde_json::from_slice::<serde_json::Value>(&out).ok();
    let text = String::from_utf8_lossy(&out);
    if text.contains(SECRET) {
        return Err("the secret survived".into());
    }
    if input_json.is_some() {
        let Some(output_json) = &output_json else {
            return Err(format!("valid JSON in, invalid out: {text:?}"));
        };
        let mut all = Vec::new();
        strings(output_json, &mut all);
        if all.iter().any(|s| s.contains(SECRET)) {
            return Err("the secret survived in a decoded string".into());
        }
        // A link only counts when the input spelled it the way JSON encoders do (no \u
        // escapes of its characters); those are what the upstream sends.
        // Slashes half escaped (`https:/\/`) are not what encoders write either.
        let plain = !input.contains("\\u") && !input.contains(":/\\/") && !input.contains(":\\//");
        if plain && all.iter().any(|s| has_upstream_link(s)) {
            return Err(format!("an upstream link survived in {text:?}"));
        }
    }
    Ok(shape((
        changed,
        input_json.is_some(),
        output_json.is_some(),
        text.matches(PUBLIC).count().min(8),
        text.matches("[redacted]").count().min(4),
    )))
}

// ---------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut seconds = 20u64;
    let mut only: Option<String> = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                seconds = args
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("--seconds needs a whole number"));
                i += 1;
            }
            "--target" => {
                only = args.get(i + 1).cloned();
                i += 1;
            }
            // `cargo bench` adds `--bench`; anything else is ignored as well.
            _ => {}
        }
        i += 1;
    }
    let budget = Duration::from_secs(seconds);
    // Panics are caught and reported with their input; the default hook would print each.
    std::panic::set_hook(Box::new(|_| {}));

    let shipped = [
        include_str!("../config/cxgate.toml").to_string(),
        include_str!("../config/demo.toml").to_string(),
    ];
    let rewriter = Rewriter::new(UP, PUBLIC);
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let mut runs = Vec::new();
    println!("fuzzing each target for {seconds} s (plain-Rust loops, catch_unwind per input)");
    if wanted("route") {
        let seeds = [
            "/{account_id}/inbox/contact/{service}/{service_id}\n/1/inbox/contact/tw/9".to_string(),
            "/me\n/me/".to_string(),
            "/\n/".to_string(),
        ];
        runs.push(fuzz(
            "route",
            budget,
            &seeds,
            ROUTE_WORDS,
            route_generate,
            route_target,
        ));
    }
    if wanted("key") {
        let seeds = [format!("GET /me/?b=2&a=1&access_token={SECRET}")];
        runs.push(fuzz(
            "key",
            budget,
            &seeds,
            KEY_WORDS,
            key_generate,
            key_target,
        ));
    }
    if wanted("config") {
        runs.push(fuzz(
            "config",
            budget,
            &shipped,
            CONFIG_WORDS,
            config_generate,
            config_target,
        ));
    }
    if wanted("rewrite") {
        let seeds = [format!(
            "{{\"paging\":{{\"next_url\":\"https:\\/\\/api.engagor.com\\/1\\/inbox\\/mentions?access_token={SECRET}&page_token=abc\"}}}}"
        )];
        runs.push(fuzz(
            "rewrite",
            budget,
            &seeds,
            REWRITE_WORDS,
            rewrite_generate,
            |input| rewrite_target(&rewriter, input),
        ));
    }
    let _ = std::panic::take_hook();
    println!();
    for run in &runs {
        run.print();
    }
    let failed: usize = runs.iter().map(|r| r.failures.len()).sum();
    let total: u64 = runs.iter().map(|r| r.execs).sum();
    println!("total: {total} executions, {failed} distinct failures");
    if failed > 0 {
        std::process::exit(1);
    }
}
