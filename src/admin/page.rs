//! The HTML status page at the admin listener's `GET /`: the `/admin/status` document and a
//! few rates from the registry, drawn for people. It is built from the same JSON, section by
//! section, so a field added there shows up here without a second list to keep in step;
//! [`render`] holds what the page promises.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Recent;

use prometheus::Registry;
use serde_json::Value;

/// How often the page reloads itself, in seconds.
pub const REFRESH_SECS: u64 = 5;

/// The per-second counts the request path keeps (requests answered, upstream calls), read
/// into rates over the last minute; the totals come from the registry.
#[derive(Default)]
pub struct Rates {
    recent: Arc<Recent>,
}

impl From<Arc<Recent>> for Rates {
    fn from(recent: Arc<Recent>) -> Self {
        Rates { recent }
    }
}

/// Requests and upstream calls: totals, and per second over the last minute.
struct Now {
    requests: f64,
    upstream: f64,
    requests_per_s: f64,
    upstream_per_s: f64,
}

impl Rates {
    fn sample(&self, registry: &Registry) -> Now {
        Now {
            requests: counter_sum(registry, "cxgate_requests_total"),
            upstream: counter_sum(registry, "cxgate_upstream_requests_total"),
            requests_per_s: self.recent.requests.per_second(),
            upstream_per_s: self.recent.upstream.per_second(),
        }
    }
}

/// The sum of every series of one counter.
fn counter_sum(registry: &Registry, name: &str) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric())
        .map(|m| m.get_counter().get_value())
        .sum()
}

/// The whole page for a `/admin/status` document.
///
/// Invariants: every text is HTML-escaped; nothing is loaded from elsewhere (inline CSS, no
/// script, no image); it refreshes itself with `<meta http-equiv="refresh">`; it holds only
/// what the status JSON holds, which carries no secret.
pub fn render(status: &Value, registry: &Registry, rates: &Rates, uptime: Duration) -> String {
    let now = rates.sample(registry);
    let mut out = String::with_capacity(16 * 1024);
    let version = text(&status["version"]);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>cxgate status</title><style>{CSS}</style></head><body>\
         <h1>cxgate <small>{}</small></h1>\
         <p class=\"sub\">up {} &middot; this page refreshes every {REFRESH_SECS} s &middot; \
         the same data as JSON at <a href=\"/admin/status\">/admin/status</a>, metrics at \
         <a href=\"/metrics\">/metrics</a></p>",
        esc(&version),
        esc(&human_secs(uptime.as_secs_f64())),
    );
    glance(&mut out, status, &now);
    clients(&mut out, &status["budget"]["clients"]);
    errors(&mut out, &status["recent_errors"]);
    // Then every section of the status document as it is, so nothing it says is hidden.
    out.push_str("<h2>Everything in /admin/status</h2><div class=\"grid\">");
    if let Value::Object(sections) = status {
        for (name, value) in sections {
            if name == "recent_errors" || !value.is_object() {
                continue;
            }
            let _ = write!(out, "<section><h3>{}</h3>", esc(name));
            table(&mut out, value);
            out.push_str("</section>");
        }
    }
    out.push_str("</div></body></html>\n");
    out
}

/// The few figures an operator looks at first.
fn glance(out: &mut String, status: &Value, now: &Now) {
    let cache = &status["cache"];
    let token = &status["token"];
    let upstream = &status["upstream"];
    let hit_ratio = cache["hit_ratio"].as_f64().unwrap_or(0.0);
    let remaining = match upstream["reported_remaining"].as_i64() {
        Some(n) if n >= 0 => n.to_string(),
        _ => "not reported yet".to_string(),
    };
    let expires = match token["expires_in_s"].as_f64() {
        Some(s) if s <= 0.0 => "expired".to_string(),
        Some(s) => format!("in {}", human_secs(s)),
        None => "never (static token)".to_string(),
    };
    let refresh = if token["usable"] == Value::Bool(false)
        && token["needs_reauthorisation"] != Value::Bool(true)
    {
        ("bad", format!("not usable: {}", text(&token["last_error"])))
    } else if token["needs_reauthorisation"] == Value::Bool(true) {
        (
            "bad",
            "needs re-authorisation (cxgate token init)".to_string(),
        )
    } else if token["refresh_failures"].as_u64().unwrap_or(0) > 0 {
        (
            "bad",
            format!(
                "{} failed refresh(es): {}",
                token["refresh_failures"],
                text(&token["last_error"])
            ),
        )
    } else if token["refreshable"] == Value::Bool(true) {
        let last = match token["last_refresh"].as_str() {
            Some(t) => format!("last refreshed {t}"),
            None => "not refreshed yet".to_string(),
        };
        ("ok", format!("refreshes by itself; {last}"))
    } else {
        ("warn", "not refreshable (no [token.oauth])".to_string())
    };
    let pause = match upstream["paused_for_s"].as_f64() {
        Some(s) if s > 0.0 => (
            "bad",
            format!(
                "paused for {} (until {}), {}",
                human_secs(s),
                text(&upstream["paused_until"]),
                match upstream["pause_source"].as_str() {
                    Some("shared") => "held in Redis for every replica",
                    Some("local+shared") => "seen here and held in Redis for every replica",
                    _ => "seen by this replica",
                }
            ),
        ),
        _ => ("ok", "none".to_string()),
    };
    let errors = status["recent_errors"].as_array().map_or(0, Vec::len);
    let redis = shared_redis(&status["redis"]);
    let tier = shared_tier(&status["shared_cache"]);
    let cards = [
        (
            "Requests/s",
            format!("{:.1}", now.requests_per_s),
            format!("{} answered since start", now.requests),
            "",
        ),
        (
            "Hit ratio",
            format!("{:.1} %", hit_ratio * 100.0),
            format!("hits {}, misses {}", cache["hits"], cache["misses"]),
            "",
        ),
        (
            "Upstream calls/s",
            format!("{:.2}", now.upstream_per_s),
            format!(
                "{} calls; last status {}",
                now.upstream,
                text(&upstream["last_status"])
            ),
            "",
        ),
        (
            "Upstream window left",
            remaining,
            "as the upstream last reported (X-RateLimit-Remaining)".to_string(),
            "",
        ),
        ("Token expires", expires, refresh.1, refresh.0),
        ("Upstream pause", pause.1.clone(), String::new(), pause.0),
        ("Shared Redis", redis.1, redis.2, redis.0),
        ("Shared cache tier", tier.1, tier.2, tier.0),
        (
            "Recent errors",
            errors.to_string(),
            "listed below".to_string(),
            if errors > 0 { "warn" } else { "ok" },
        ),
    ];
    out.push_str("<div class=\"cards\">");
    for (title, big, small, class) in cards {
        let _ = write!(
            out,
            "<div class=\"card {class}\"><div class=\"t\">{}</div><div class=\"v\">{}</div>\
             <div class=\"s\">{}</div></div>",
            esc(title),
            esc(&big),
            esc(&small)
        );
    }
    out.push_str("</div>");
}

/// The shared Redis card: class, state, and since when / why.
fn shared_redis(redis: &Value) -> (&'static str, String, String) {
    if redis["backend"] != "redis" {
        return (
            "",
            "not used".to_string(),
            "local budget (one replica)".to_string(),
        );
    }
    let since = format!("since {}", text(&redis["since"]));
    match (
        redis["reachable"].as_bool(),
        redis["invalidations_heard"].as_bool(),
    ) {
        (Some(true), Some(true)) => ("ok", "reachable".to_string(), since),
        (Some(true), _) => (
            "bad",
            "invalidations not heard".to_string(),
            text(&redis["channel_error"]),
        ),
        _ => (
            "bad",
            "unreachable: local fallback".to_string(),
            format!("{since}; last error: {}", text(&redis["last_error"])),
        ),
    }
}

/// The shared cache tier card: class, hit share of its lookups, and what else it did.
fn shared_tier(tier: &Value) -> (&'static str, String, String) {
    if tier["enabled"] != Value::Bool(true) {
        return ("", "off".to_string(), "cache.shared = false".to_string());
    }
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let lookups = &tier["lookups"];
    let asked: u64 = ["hit", "miss", "other_format", "invalid", "error"]
        .iter()
        .map(|r| n(&lookups[*r]))
        .sum();
    let hits = n(&lookups["hit"]);
    let big = match asked {
        0 => "no lookup yet".to_string(),
        _ => format!("{:.1} % hits", hits as f64 * 100.0 / asked as f64),
    };
    let small = format!(
        "{hits} hits of {asked} lookups, {} errors; {} answers stored",
        n(&lookups["error"]),
        n(&tier["writes"]["stored"])
    );
    let class = if tier["redis_reachable"] == Value::Bool(true) {
        "ok"
    } else {
        "bad"
    };
    match tier["last_error"].as_str() {
        Some(why) if class == "bad" => (class, big, format!("{small}; last error: {why}")),
        _ => (class, big, small),
    }
}

/// One row per client: its share of the budget and how much of it is in use.
fn clients(out: &mut String, clients: &Value) {
    out.push_str("<h2>Clients' budgets</h2>");
    let Some(map) = clients.as_object().filter(|m| !m.is_empty()) else {
        out.push_str("<p>No client has a budget of its own.</p>");
        return;
    };
    out.push_str(
        "<table class=\"rows\"><tr><th>client</th><th>budget</th><th>in use</th>\
         <th>remaining</th><th>limit</th><th>rejections</th></tr>",
    );
    for (name, c) in map {
        let limit = c["limit"].as_f64().unwrap_or(0.0);
        let burst = c["burst"].as_f64().unwrap_or(0.0);
        let remaining = c["remaining"].as_f64().unwrap_or(0.0);
        // What is left of the burst is what the client may send at once now.
        let used = if burst > 0.0 {
            ((burst - remaining) / burst).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td><meter min=\"0\" max=\"1\" value=\"{used:.3}\"></meter> \
             {:.0} %</td><td>{}</td><td>{} per {}</td><td>{}</td></tr>",
            esc(name),
            esc(&text(&c["budget"])),
            used * 100.0,
            esc(&text(&c["remaining"])),
            limit,
            esc(&human_secs(c["period_s"].as_f64().unwrap_or(0.0))),
            esc(&text(&c["rejections"])),
        );
    }
    out.push_str("</table>");
}

/// The last errors the gateway answered with, newest first.
fn errors(out: &mut String, errors: &Value) {
    out.push_str("<h2>Last errors</h2>");
    let Some(list) = errors.as_array().filter(|l| !l.is_empty()) else {
        out.push_str("<p class=\"ok\">None since start.</p>");
        return;
    };
    out.push_str(
        "<table class=\"rows\"><tr><th>at</th><th>status</th><th>client</th><th>route</th>\
         <th>what</th></tr>",
    );
    for e in list {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&text(&e["at"])),
            esc(&text(&e["status"])),
            esc(&text(&e["client"])),
            esc(&text(&e["route"])),
            esc(&text(&e["message"])),
        );
    }
    out.push_str("</table>");
}

/// A JSON object as a two-column table; nested objects become nested tables.
fn table(out: &mut String, value: &Value) {
    let Value::Object(map) = value else {
        out.push_str(&esc(&text(value)));
        return;
    };
    out.push_str("<table>");
    for (k, v) in map {
        let _ = write!(out, "<tr><th>{}</th><td>", esc(k));
        table(out, v);
        out.push_str("</td></tr>");
    }
    out.push_str("</table>");
}

/// A JSON value as plain text: strings without quotes, `null` as a dash.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(", "),
        other => other.to_string(),
    }
}

/// `3725.4` → `1h 2m 5s`, `3600` → `1h`.
fn human_secs(secs: f64) -> String {
    let total = secs.max(0.0).round() as u64;
    let parts = [
        (total / 3600, "h"),
        (total / 60 % 60, "m"),
        (total % 60, "s"),
    ];
    let text: Vec<String> = parts
        .iter()
        .skip_while(|(n, _)| *n == 0)
        .filter(|(n, _)| *n != 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".to_string()
    } else {
        text.join(" ")
    }
}

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "body{font:15px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#f6f7f9}\
h1{margin:0}h1 small{font-size:55%;color:#667}h2{margin-top:1.6em;font-size:1.15em}\
h3{margin:.2em 0;font-size:1em;text-transform:capitalize}.sub{color:#556;margin-top:.2em}\
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin-top:1em}\
.card{background:#fff;border:1px solid #d7dbe2;border-left:6px solid #8895a7;border-radius:6px;padding:.6em .9em;min-width:11em;max-width:22em}\
.card.ok{border-left-color:#2e9e5b}.card.warn{border-left-color:#d69a12}.card.bad{border-left-color:#c83a3a}\
.card .t{color:#556;font-size:.85em}.card .v{font-size:1.6em;font-weight:600}.card .s{color:#667;font-size:.8em}\
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #d7dbe2;padding:.2em .5em;text-align:left;vertical-align:top}\
th{background:#eef0f4;font-weight:600}table table th{background:#f6f7f9;font-weight:normal}\
.grid{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}p.ok{color:#2e6b45}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_the_status_is_escaped() {
        let status = serde_json::json!({
            "version": "<b>1</b>",
            "upstream": {"base_url": "http://x/?a=1&b=<script>"},
            "recent_errors": [{"message": "bad <path> \"x\"", "status": 400}],
        });
        let page = render(&status, &Registry::new(), &Rates::default(), Duration::ZERO);
        for raw in ["<b>1</b>", "<script>", "<path>"] {
            assert!(
                !page.contains(raw),
                "expected {raw:?} escaped, page: {page}"
            );
        }
        assert!(
            page.contains("bad &lt;path&gt; &quot;x&quot;"),
            "expected the error escaped, page: {page}"
        );
    }

    #[test]
    fn durations_read_as_hours_minutes_seconds() {
        assert_eq!(human_secs(3725.4), "1h 2m 5s");
        assert_eq!(human_secs(59.6), "1m");
        assert_eq!(human_secs(3601.0), "1h 1s");
        assert_eq!(human_secs(-3.0), "0s");
    }
}
