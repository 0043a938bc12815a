//! The shipped Grafana dashboard and Prometheus alert rules, checked against the metric
//! names and labels the gateway exports: a renamed metric must break this test, not a
//! graph in production. The rules and their unit tests run through `promtool` (Debian
//! package `prometheus`); without it these tests skip locally but fail when `CI=true`, so
//! a missing tool can never pass silently in CI.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One metric family the gateway exports, with the labels it sets on it.
struct Family {
    name: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
}

const FAMILIES: &[Family] = &[
    Family {
        name: "cxgate_requests_total",
        kind: Kind::Counter,
        labels: &["client", "route", "method", "status", "cache"],
    },
    Family {
        name: "cxgate_request_duration_seconds",
        kind: Kind::Histogram,
        labels: &["route", "cache"],
    },
    Family {
        name: "cxgate_upstream_requests_total",
        kind: Kind::Counter,
        labels: &["route", "status"],
    },
    Family {
        name: "cxgate_upstream_duration_seconds",
        kind: Kind::Histogram,
        labels: &["route"],
    },
    Family {
        name: "cxgate_cache_entries",
        kind: Kind::Gauge,
        labels: &[],
    },
    Family {
        name: "cxgate_cache_bytes",
        kind: Kind::Gauge,
        labels: &[],
    },
    Family {
        name: "cxgate_cache_evictions_total",
        kind: Kind::Counter,
        labels: &[],
    },
    Family {
        name: "cxgate_cache_shared_lookups_total",
        kind: Kind::Counter,
        labels: &["result"],
    },
    Family {
        name: "cxgate_cache_shared_writes_total",
        kind: Kind::Counter,
        labels: &["result"],
    },
    Family {
        name: "cxgate_coalesced_requests_total",
        kind: Kind::Counter,
        labels: &["route"],
    },
    Family {
        name: "cxgate_budget_wait_seconds",
        kind: Kind::Histogram,
        labels: &["client"],
    },
    Family {
        name: "cxgate_budget_rejections_total",
        kind: Kind::Counter,
        labels: &["client", "budget"],
    },
    Family {
        name: "cxgate_upstream_ratelimit_remaining",
        kind: Kind::Gauge,
        labels: &[],
    },
    Family {
        name: "cxgate_upstream_limit_answers_total",
        kind: Kind::Counter,
        labels: &["kind"],
    },
    Family {
        name: "cxgate_token_expiry_seconds",
        kind: Kind::Gauge,
        labels: &[],
    },
    Family {
        name: "cxgate_token_refreshes_total",
        kind: Kind::Counter,
        labels: &["result"],
    },
    Family {
        name: "cxgate_redis_repairs_total",
        kind: Kind::Counter,
        labels: &["key"],
    },
    Family {
        name: "cxgate_redis_up",
        kind: Kind::Gauge,
        labels: &[],
    },
    Family {
        name: "cxgate_redis_errors_total",
        kind: Kind::Counter,
        labels: &["op"],
    },
    Family {
        name: "cxgate_redis_invalidations_total",
        kind: Kind::Counter,
        labels: &["result"],
    },
    Family {
        name: "cxgate_build_info",
        kind: Kind::Gauge,
        labels: &["version"],
    },
];

/// Labels Prometheus itself attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Labels whose values the contract enumerates; a matcher may only name these values.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    (
        "cache",
        &["hit", "stale", "miss", "collapsed", "bypass", "none"],
    ),
    ("budget", &["global", "client", "upstream"]),
    (
        "result",
        &[
            "ok",
            "error",
            "hit",
            "miss",
            "stored",
            "invalidated",
            "too_large",
            "other_format",
            "invalid",
            "filled",
            "acknowledged",
            "unacknowledged",
            "alone",
            "queued",
        ],
    ),
    ("op", &["budget", "cache", "ping", "publish", "token"]),
    ("kind", &["429", "rate_limit_reached"]),
];

/// Range selectors in panels must follow Grafana's interval, never a fixed window.
const RANGES: &[&str] = &["$__rate_interval", "$__range"];

/// What a series name is allowed to carry.
enum Known {
    Contract(Vec<&'static str>),
    Process,
    Unknown,
}

fn known(series: &str) -> Known {
    if series.starts_with("process_") {
        return Known::Process;
    }
    for f in FAMILIES {
        let mut labels: Vec<&'static str> = f.labels.to_vec();
        labels.extend_from_slice(TARGET_LABELS);
        if f.kind == Kind::Histogram {
            let Some(suffix) = series.strip_prefix(f.name) else {
                continue;
            };
            match suffix {
                "_bucket" => {
                    labels.push("le");
                    return Known::Contract(labels);
                }
                "_sum" | "_count" => return Known::Contract(labels),
                _ => continue,
            }
        } else if series == f.name {
            return Known::Contract(labels);
        }
    }
    Known::Unknown
}

/// A vector selector found in a PromQL expression.
#[derive(Debug, PartialEq)]
struct Selector {
    metric: String,
    /// (label, operator, value) of each matcher between the braces.
    matchers: Vec<(String, String, String)>,
}

/// What a light PromQL scan finds: the selectors and the contents of every `[...]`.
#[derive(Debug, Default)]
struct Scan {
    selectors: Vec<Selector>,
    ranges: Vec<String>,
}

/// Aggregations, set operators and modifiers: identifiers that are never metric names.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "atan2",
    // Number literals.
    "Inf",
    "NaN",
];

/// Keywords followed by a parenthesised list of label names, not of expressions.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    expr: &'a str,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_ident) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// Reads a quoted string starting at the quote and returns its unescaped content.
    fn string(&mut self) -> Result<String, String> {
        let quote = self.peek().ok_or("expected a string")?;
        if !matches!(quote, '"' | '\'' | '`') {
            return Err(format!(
                "expected a string at {} in {:?}",
                self.pos, self.expr
            ));
        }
        self.pos += 1;
        let mut out = String::new();
        loop {
            let c = self
                .peek()
                .ok_or_else(|| format!("unterminated string in {:?}", self.expr))?;
            self.pos += 1;
            match c {
                '\\' if quote != '`' => {
                    let escaped = self
                        .peek()
                        .ok_or_else(|| format!("dangling escape in {:?}", self.expr))?;
                    out.push(escaped);
                    self.pos += 1;
                }
                c if c == quote => return Ok(out),
                c => out.push(c),
            }
        }
    }

    /// Returns the text up to the bracket matching the one at the cursor.
    fn bracketed(&mut self, open: char, close: char) -> Result<String, String> {
        let start = self.pos + 1;
        let mut depth = 0;
        while let Some(c) = self.peek() {
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    self.pos += 1;
                    return Ok(self.chars[start..self.pos - 1].iter().collect());
                }
            }
            self.pos += 1;
        }
        Err(format!("unbalanced {open}{close} in {:?}", self.expr))
    }

    fn matchers(&mut self) -> Result<Vec<(String, String, String)>, String> {
        self.pos += 1; // the '{'
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some('}') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some(c) if is_ident_start(c) => {}
                _ => return Err(format!("bad label matcher in {:?}", self.expr)),
            }
            let label = self.ident();
            self.skip_ws();
            let mut op = String::new();
            while let Some(c @ ('=' | '!' | '~')) = self.peek() {
                op.push(c);
                self.pos += 1;
            }
            if !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
                return Err(format!(
                    "bad operator {op:?} after {label} in {:?}",
                    self.expr
                ));
            }
            self.skip_ws();
            let value = self.string()?;
            out.push((label, op, value));
            self.skip_ws();
            if self.peek() == Some(',') {
                self.pos += 1;
            }
        }
    }
}

/// Finds the metric selectors and range windows of a PromQL expression. It is no full
/// parser (promtool checks the syntax below); it only has to tell metric names from
/// functions, keywords, label lists, numbers and strings.
fn scan(expr: &str) -> Result<Scan, String> {
    let mut lx = Lexer {
        chars: expr.chars().collect(),
        pos: 0,
        expr,
    };
    let mut out = Scan::default();
    while let Some(c) = lx.peek() {
        match c {
            '"' | '\'' | '`' => {
                lx.string()?;
            }
            '#' => {
                while lx.peek().is_some_and(|c| c != '\n') {
                    lx.pos += 1;
                }
            }
            '[' => out.ranges.push(lx.bracketed('[', ']')?.trim().to_string()),
            '{' => return Err(format!("selector without a metric name in {expr:?}")),
            '$' => {
                // A Grafana variable outside a string: $name or ${name}.
                lx.pos += 1;
                if lx.peek() == Some('{') {
                    lx.bracketed('{', '}')?;
                } else {
                    lx.ident();
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                // Numbers and durations: 0.99, 1e3, 5m.
                while lx
                    .peek()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '.')
                {
                    lx.pos += 1;
                }
            }
            c if is_ident_start(c) => {
                let word = lx.ident();
                lx.skip_ws();
                let next = lx.peek();
                if GROUPING.contains(&word.as_str()) {
                    if next == Some('(') {
                        lx.bracketed('(', ')')?;
                    }
                } else if KEYWORDS.contains(&word.as_str()) || next == Some('(') {
                    // An aggregation, a set operator or a function call.
                } else {
                    let matchers = if next == Some('{') {
                        lx.matchers()?
                    } else {
                        Vec::new()
                    };
                    out.selectors.push(Selector {
                        metric: word,
                        matchers,
                    });
                }
            }
            _ => lx.pos += 1,
        }
    }
    Ok(out)
}

/// Every problem with the metric names, labels and label values of one expression.
fn contract_problems(expr: &str) -> Vec<String> {
    let scan = match scan(expr) {
        Ok(scan) => scan,
        Err(e) => return vec![e],
    };
    let mut problems = Vec::new();
    if scan.selectors.is_empty() {
        problems.push(format!("no metric at all in {expr:?}"));
    }
    for sel in &scan.selectors {
        let labels = match known(&sel.metric) {
            Known::Process => continue,
            Known::Unknown => {
                problems.push(format!(
                    "{:?} is not a metric the gateway exports (nor process_*), in {expr:?}",
                    sel.metric
                ));
                continue;
            }
            Known::Contract(labels) => labels,
        };
        for (label, op, value) in &sel.matchers {
            if !labels.contains(&label.as_str()) {
                problems.push(format!(
                    "{} has no label {label:?} (it has {labels:?}), in {expr:?}",
                    sel.metric
                ));
            }
            let Some((_, allowed)) = LABEL_VALUES.iter().find(|(l, _)| l == label) else {
                continue;
            };
            if op.starts_with('!') || value.contains('$') {
                continue;
            }
            for alt in value.split('|') {
                if !allowed.contains(&alt) {
                    problems.push(format!(
                        "{label}={alt:?} is not one of {allowed:?}, in {expr:?}"
                    ));
                }
            }
        }
    }
    problems
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboard() -> Value {
    let path = root().join("dashboards/cxgate.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

/// Every panel that shows data: rows are skipped, panels nested in collapsed rows are not.
fn data_panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            if p["type"] == "row" {
                walk(&p["panels"], out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// (panel title, expr) of every query of every panel.
fn queries(dash: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in data_panels(dash) {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                title.to_string(),
                t["expr"].as_str().unwrap_or("").to_string(),
            ));
        }
    }
    out
}

fn variable<'a>(dash: &'a Value, name: &str) -> &'a Value {
    dash["templating"]["list"]
        .as_array()
        .and_then(|list| list.iter().find(|v| v["name"] == name))
        .unwrap_or_else(|| panic!("dashboard has no template variable {name:?}"))
}

#[test]
fn scan_tells_metrics_from_functions_keywords_and_labels() {
    let s = scan(
        r#"histogram_quantile(0.99, sum by (le, cache) (rate(cxgate_request_duration_seconds_bucket{route=~"$route", cache!="a,b}"}[$__rate_interval])))
           / on (job) group_left (version) cxgate_build_info and process_cpu_seconds_total offset 5m"#,
    )
    .expect("the expression scans");
    let names: Vec<&str> = s.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(
        names,
        [
            "cxgate_request_duration_seconds_bucket",
            "cxgate_build_info",
            "process_cpu_seconds_total"
        ],
        "selectors found"
    );
    assert_eq!(
        s.selectors[0].matchers,
        [
            ("route".into(), "=~".into(), "$route".into()),
            ("cache".into(), "!=".into(), "a,b}".into())
        ],
        "matchers of the first selector"
    );
    assert_eq!(s.ranges, ["$__rate_interval"], "range windows found");
}

#[test]
fn contract_check_rejects_unknown_metrics_labels_and_values() {
    let good = r#"sum by (cache) (rate(cxgate_requests_total{cache=~"hit|stale", client=~"$client"}[5m]))"#;
    assert_eq!(contract_problems(good), Vec::<String>::new(), "for {good}");
    for bad in [
        "rate(cxgate_request_total[5m])",
        "cxgate_request_duration_seconds",
        "rate(http_requests_total[5m])",
        r#"rate(cxgate_upstream_requests_total{client="a"}[5m])"#,
        r#"rate(cxgate_requests_total{cache="hits"}[5m])"#,
        "sum(1)",
    ] {
        assert!(
            !contract_problems(bad).is_empty(),
            "expected a problem in {bad}, found none"
        );
    }
}

/// A token without expiry exports +Inf: the stat panel names it, the graph leaves it out
/// rather than stretching its axis to infinity.
#[test]
fn token_expiry_panels_handle_a_token_that_never_expires() {
    let dash = dashboard();
    let panels = data_panels(&dash);
    let with = |expr: &str| {
        panels
            .iter()
            .find(|p| {
                p["targets"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|t| t["expr"] == expr)
            })
            .copied()
    };
    let stat = with("min(cxgate_token_expiry_seconds)").expect("the token expiry stat panel");
    let mapped = stat["fieldConfig"]["defaults"]["mappings"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|m| {
            m["type"] == "range"
                && m["options"]["to"].is_null()
                && m["options"]["from"].as_f64().is_some_and(|f| f > 1e9)
                && m["options"]["result"]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("never"))
        });
    assert!(
        mapped,
        "expected +Inf mapped to a \"never\" text, saw {stat}"
    );
    assert!(
        with("cxgate_token_expiry_seconds < Inf").is_some(),
        "expected the countdown graph to leave +Inf out"
    );
}

#[test]
fn dashboard_is_importable_anywhere() {
    let dash = dashboard();
    let schema = dash["schemaVersion"].as_u64().unwrap_or(0);
    assert!(schema >= 39, "expected schemaVersion >= 39, saw {schema}");
    assert!(
        dash["title"].as_str().is_some_and(|t| !t.is_empty()),
        "dashboard has no title"
    );
    let ds = variable(&dash, "DS_PROMETHEUS");
    assert_eq!(ds["type"], "datasource", "DS_PROMETHEUS variable type");
    assert_eq!(ds["query"], "prometheus", "DS_PROMETHEUS variable plugin");

    let expected = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    let mut ids = BTreeSet::new();
    for p in data_panels(&dash) {
        let title = p["title"].as_str().unwrap_or("<untitled>");
        assert_eq!(p["datasource"], expected, "datasource of panel {title:?}");
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                t["datasource"], expected,
                "datasource of a query of {title:?}"
            );
        }
        let id = p["id"].as_u64();
        assert!(
            id.is_some_and(|id| ids.insert(id)),
            "panel {title:?} has a missing or duplicate id {id:?}"
        );
    }
}

#[test]
fn dashboard_has_client_and_route_variables() {
    let dash = dashboard();
    for (name, query) in [
        ("client", "label_values(cxgate_requests_total, client)"),
        (
            "route",
            r#"label_values(cxgate_requests_total{client=~"$client"}, route)"#,
        ),
    ] {
        let var = variable(&dash, name);
        assert_eq!(var["type"], "query", "type of variable {name}");
        assert_eq!(
            var["multi"], true,
            "variable {name} must allow several values"
        );
        assert_eq!(var["includeAll"], true, "variable {name} must offer All");
        let q = var["query"]["query"].as_str().or(var["query"].as_str());
        assert_eq!(q, Some(query), "query of variable {name}");
    }
}

#[test]
fn every_panel_has_a_title_a_description_and_a_query() {
    let dash = dashboard();
    let panels = data_panels(&dash);
    assert!(
        panels.len() >= 10,
        "expected a full dashboard, saw {} panels",
        panels.len()
    );
    for p in panels {
        let title = p["title"].as_str().unwrap_or("");
        assert!(!title.is_empty(), "a panel has no title: {p}");
        assert!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "panel {title:?} has no description"
        );
        let targets = p["targets"].as_array().map_or(0, Vec::len);
        assert!(targets >= 1, "panel {title:?} has no query");
        for t in p["targets"].as_array().into_iter().flatten() {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?} has a query without expr: {t}"
            );
        }
    }
}

#[test]
fn dashboard_queries_use_only_contract_metrics() {
    let dash = dashboard();
    let mut problems = Vec::new();
    for (title, expr) in queries(&dash) {
        for p in contract_problems(&expr) {
            problems.push(format!("panel {title:?}: {p}"));
        }
        if let Ok(scan) = scan(&expr) {
            for r in scan.ranges.iter().filter(|r| !RANGES.contains(&r.as_str())) {
                problems.push(format!(
                    "panel {title:?}: range [{r}] should be one of {RANGES:?}"
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
}

/// Every family the gateway exports is on some panel: a metric added for operators (the
/// invalidations' acknowledgements, the shared Redis's health) that no panel shows is
/// one nobody looks at.
#[test]
fn every_exported_family_is_on_the_dashboard() {
    let dash = dashboard();
    let mut shown = BTreeSet::new();
    for (_, expr) in queries(&dash) {
        if let Ok(scan) = scan(&expr) {
            shown.extend(scan.selectors.into_iter().map(|s| s.metric));
        }
    }
    let missing: Vec<&str> = FAMILIES
        .iter()
        .filter(|f| {
            !shown
                .iter()
                .any(|m| m == f.name || (f.kind == Kind::Histogram && m.starts_with(f.name)))
        })
        .map(|f| f.name)
        .collect();
    assert!(
        missing.is_empty(),
        "expected every exported family on a panel, missing: {missing:?}"
    );
}

/// The alert on unacknowledged invalidations exists and reads their counter.
#[test]
fn unacknowledged_invalidations_have_an_alert() {
    let text = std::fs::read_to_string(root().join("dashboards/alerts.yml")).expect("alerts");
    let at = text
        .find("alert: CxgateInvalidationsUnacknowledged")
        .expect("expected an alert CxgateInvalidationsUnacknowledged in dashboards/alerts.yml");
    let rule = &text[at..];
    let rule = &rule[..rule[1..].find("- alert:").map_or(rule.len(), |i| i + 1)];
    assert!(
        rule.contains("cxgate_redis_invalidations_total{result=\"unacknowledged\"}"),
        "expected the alert to read the unacknowledged invalidations, saw:\n{rule}"
    );
}

#[test]
fn alert_files_use_only_contract_metrics() {
    for file in ["dashboards/alerts.yml", "dashboards/alerts.test.yml"] {
        let path = root().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let mut seen = 0;
        for (i, _) in text.match_indices("cxgate_") {
            if text[..i].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let name: String = text[i..].chars().take_while(|&c| is_ident(c)).collect();
            seen += 1;
            assert!(
                !matches!(known(&name), Known::Unknown),
                "{file}: {name:?} is not a metric the gateway exports"
            );
        }
        assert!(seen > 0, "{file}: expected cxgate_* metrics, found none");
    }
}

/// Whether `promtool` can run. Missing it is a failure in CI and a loud skip elsewhere.
fn promtool_present() -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "promtool not found on PATH and CI=true: install Debian's `prometheus` package \
             (apt-get install prometheus) so the alert rules are really tested"
        );
    }
    // Straight to the stderr handle: the test harness captures eprintln!, and a skip
    // nobody sees is a silent pass.
    let _ = writeln!(
        std::io::stderr(),
        "\n{bar}\nSKIPPED: promtool not found (apt-get install prometheus)\n{bar}",
        bar = "=".repeat(60)
    );
    false
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run promtool {args:?}: {e}"))
}

fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_check() {
    if !promtool_present() {
        return;
    }
    let out = promtool(&["check", "rules", "dashboards/alerts.yml"], &root());
    assert_success(&out, "promtool check rules dashboards/alerts.yml");
}

#[test]
fn alert_rules_pass_their_unit_tests() {
    if !promtool_present() {
        return;
    }
    let out = promtool(&["test", "rules", "dashboards/alerts.test.yml"], &root());
    assert_success(&out, "promtool test rules dashboards/alerts.test.yml");
}

/// Every panel query, with Grafana's variables filled in, must be valid PromQL:
/// promtool parses them as recording rules, offline.
#[test]
fn dashboard_queries_are_valid_promql() {
    if !promtool_present() {
        return;
    }
    let dash = dashboard();
    let mut rules = Vec::new();
    let mut index = Vec::new();
    for (i, (title, expr)) in queries(&dash).into_iter().enumerate() {
        let filled = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$client", ".*")
            .replace("$route", ".*");
        assert!(
            !filled.contains('$'),
            "panel {title:?} uses an unknown variable: {expr}"
        );
        let record = format!("cxgate_dashboard:query_{i}");
        index.push(format!("{record}  panel {title:?}: {filled}"));
        rules.push(json!({"record": record, "expr": filled}));
    }
    let file = json!({"groups": [{"name": "cxgate-dashboard", "rules": rules}]});
    let dir = std::env::temp_dir().join(format!("cxgate-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a temporary directory");
    // JSON is YAML, so promtool reads this file as a rules file.
    std::fs::write(dir.join("queries.yml"), file.to_string()).expect("write queries.yml");
    let out = promtool(&["check", "rules", "queries.yml"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "a panel query is not valid PromQL:\n--- stdout\n{}\n--- stderr\n{}\n--- queries\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        index.join("\n")
    );
}
