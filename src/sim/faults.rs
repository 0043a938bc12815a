//! Fault injection: the set of faults in force and the per-request decision drawn from it.
//!
//! Invariants: the set is replaced as a whole (flags at start, `POST /_sim/faults`,
//! `SimHandle::set_faults`); forced counts (`force_429`, `force_401`) are consumed under the
//! same brief lock that draws the decision, so N forced answers happen exactly N times even
//! under concurrency. When no fault is set, a request pays one atomic load and nothing else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::lock;

/// The faults in force. Every field is optional in JSON; absent means "no such fault".
///
/// The JSON also takes the flags' own names and spellings: `"latency": "500ms"` as
/// `--latency 500ms` (and `jitter`, `slow_body`, `fault_path_prefix`); the `_ms` fields take
/// a number of milliseconds or such a duration string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every matching request before it is answered.
    #[serde(alias = "latency", deserialize_with = "millis")]
    pub latency_ms: u64,
    /// A uniformly random extra delay in `0..=jitter_ms`.
    #[serde(alias = "jitter", deserialize_with = "millis")]
    pub jitter_ms: u64,
    /// Share (0..1) of matching requests answered with `error_status`.
    pub error_rate: f64,
    /// Status of injected errors (a 5xx; 500, 502 and 503 are the usual ones).
    pub error_status: u16,
    /// Share (0..1) of matching requests whose connection is closed without an answer.
    pub drop_rate: f64,
    /// When non-zero, answers send their headers and then dribble the body over this time.
    #[serde(alias = "slow_body", deserialize_with = "millis")]
    pub slow_body_ms: u64,
    /// The next `count` API calls answer 429 with `Retry-After: retry_after`.
    pub force_429: Option<Force429>,
    /// The next `count` API calls answer 401 `invalid_token`.
    pub force_401: Option<Force401>,
    /// The OAuth token endpoint answers 503 while this is true.
    pub token_endpoint_down: bool,
    /// When set, only requests whose path starts with it are subject to the faults above
    /// (except `token_endpoint_down`, which concerns one path anyway).
    #[serde(alias = "fault_path_prefix")]
    pub path_prefix: Option<String>,
    /// When set, replaces `--insights-latency` for insights and facets calls.
    #[serde(alias = "insights_latency", deserialize_with = "some_millis")]
    pub insights_latency_ms: Option<u64>,
}

/// Every fault flag of `cxgate sim` (`--error-rate` is `error_rate`) with the field of the
/// fault JSON it sets: the JSON takes both names. `force_429` and `force_401` have no flag;
/// they take `{"count": N}` (and for 429 `"retry_after": SECONDS`, default 1).
pub const FAULT_NAMES: &[(&str, &str)] = &[
    ("latency", "latency_ms"),
    ("jitter", "jitter_ms"),
    ("error_rate", "error_rate"),
    ("error_status", "error_status"),
    ("drop_rate", "drop_rate"),
    ("slow_body", "slow_body_ms"),
    ("token_endpoint_down", "token_endpoint_down"),
    ("fault_path_prefix", "path_prefix"),
    ("insights_latency", "insights_latency_ms"),
];

fn some_millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    millis(d).map(Some)
}

/// Milliseconds as a number (`500`) or as a duration the flags take (`"500ms"`, `"2s"`).
fn millis<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Millis {
        Number(u64),
        Text(String),
    }
    match Millis::deserialize(d)? {
        Millis::Number(n) => Ok(n),
        Millis::Text(t) => humantime::parse_duration(&t)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration: {e}"))),
    }
}

/// See [`Faults::force_429`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Force429 {
    pub count: u32,
    #[serde(default = "one_second")]
    pub retry_after: u64,
}

/// See [`Faults::force_401`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Force401 {
    pub count: u32,
}

fn one_second() -> u64 {
    1
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            error_status: 503,
            drop_rate: 0.0,
            slow_body_ms: 0,
            force_429: None,
            force_401: None,
            token_endpoint_down: false,
            path_prefix: None,
            insights_latency_ms: None,
        }
    }
}

impl Faults {
    /// Checks the values a JSON body may get wrong; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("drop_rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("{name} must be between 0 and 1, got {rate}"));
            }
        }
        if !(500..=599).contains(&self.error_status) {
            return Err(format!(
                "error_status must be a 5xx status, got {}",
                self.error_status
            ));
        }
        Ok(())
    }

    /// Brings out-of-range values into range, for callers that cannot report an error.
    pub fn normalised(mut self) -> Self {
        // NaN fails every comparison, so it is mapped to "never" explicitly.
        let clamp = |r: f64| if r.is_nan() { 0.0 } else { r.clamp(0.0, 1.0) };
        self.error_rate = clamp(self.error_rate);
        self.drop_rate = clamp(self.drop_rate);
        if !(500..=599).contains(&self.error_status) {
            self.error_status = 503;
        }
        self
    }

    fn is_active(&self) -> bool {
        *self
            != Faults {
                path_prefix: self.path_prefix.clone(),
                error_status: self.error_status,
                // Read where insights are answered, not per request.
                insights_latency_ms: self.insights_latency_ms,
                ..Faults::default()
            }
    }
}

/// What to do to one request. `Plan::default()` is "nothing".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    pub drop: bool,
    pub delay: Duration,
    pub error: Option<u16>,
    pub slow_body: Duration,
    pub force_401: bool,
    pub force_429: Option<u64>,
    pub token_down: bool,
}

impl Plan {
    pub fn injects(&self) -> bool {
        *self != Plan::default()
    }
}

/// Which kind of request a plan is drawn for: forced 401/429 only hit API calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    Api,
    TokenEndpoint,
    Other,
}

/// The shared, replaceable fault set.
pub(crate) struct FaultState {
    active: AtomicBool,
    faults: Mutex<Faults>,
}

impl FaultState {
    pub fn new(faults: Faults) -> Self {
        let state = FaultState {
            active: AtomicBool::new(false),
            faults: Mutex::new(Faults::default()),
        };
        state.set(faults);
        state
    }

    pub fn set(&self, faults: Faults) {
        let faults = faults.normalised();
        let mut current = lock(&self.faults);
        self.active.store(faults.is_active(), Ordering::Release);
        *current = faults;
    }

    pub fn current(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Draws the decision for one request and consumes any forced answer it uses.
    pub fn plan(&self, path: &str, target: Target) -> Plan {
        if !self.active.load(Ordering::Acquire) {
            return Plan::default();
        }
        let mut faults = lock(&self.faults);
        let mut plan = Plan {
            token_down: target == Target::TokenEndpoint && faults.token_endpoint_down,
            ..Plan::default()
        };
        if let Some(prefix) = &faults.path_prefix {
            if !path.starts_with(prefix.as_str()) {
                return plan;
            }
        }
        if faults.drop_rate > 0.0 && fastrand::f64() < faults.drop_rate {
            plan.drop = true;
            return plan;
        }
        let jitter = match faults.jitter_ms {
            0 => 0,
            j => fastrand::u64(0..=j),
        };
        plan.delay = Duration::from_millis(faults.latency_ms.saturating_add(jitter));
        plan.slow_body = Duration::from_millis(faults.slow_body_ms);
        if faults.error_rate > 0.0 && fastrand::f64() < faults.error_rate {
            plan.error = Some(faults.error_status);
            return plan;
        }
        if target != Target::Api {
            return plan;
        }
        if let Some(force) = faults.force_401.as_mut().filter(|f| f.count > 0) {
            force.count -= 1;
            plan.force_401 = true;
        } else if let Some(force) = faults.force_429.as_mut().filter(|f| f.count > 0) {
            force.count -= 1;
            plan.force_429 = Some(force.retry_after);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fault_flag_is_a_json_name_too() {
        use clap::CommandFactory;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sim: super::super::SimArgs,
        }
        let flags: Vec<String> = Cli::command()
            .get_arguments()
            .filter_map(|a| a.get_long().map(|l| l.replace('-', "_")))
            .collect();
        for (flag, field) in FAULT_NAMES {
            assert!(flags.iter().any(|f| f == flag), "no flag --{flag}");
            for name in [flag, field] {
                let value = match *field {
                    "error_rate" | "drop_rate" => serde_json::json!(0.5),
                    "error_status" => serde_json::json!(502),
                    "token_endpoint_down" => serde_json::json!(true),
                    "path_prefix" => serde_json::json!("/1/"),
                    _ => serde_json::json!("250ms"),
                };
                let parsed: Result<Faults, _> =
                    serde_json::from_value(serde_json::json!({ *name: value }));
                let parsed = parsed.unwrap_or_else(|e| panic!("{name} refused: {e}"));
                assert_ne!(parsed, Faults::default(), "{name} changed nothing");
            }
        }
        // Every flag that is not about the simulator itself is a fault in the table.
        let not_faults = [
            "listen",
            "token_ttl",
            "rate_limit",
            "rate_limit_status",
            "access_token",
            "refresh_token",
            "client_id",
            "client_secret",
            "auth_code",
        ];
        for flag in &flags {
            assert!(
                not_faults.contains(&flag.as_str()) || FAULT_NAMES.iter().any(|(f, _)| f == flag),
                "flag --{flag} is neither a fault in FAULT_NAMES nor a simulator setting"
            );
        }
    }

    #[test]
    fn no_faults_means_empty_plan() {
        let state = FaultState::new(Faults::default());
        let plan = state.plan("/me", Target::Api);
        assert!(!plan.injects(), "expected no fault, saw {plan:?}");
    }

    #[test]
    fn forced_answers_are_consumed_exactly() {
        let state = FaultState::new(Faults {
            force_429: Some(Force429 {
                count: 2,
                retry_after: 7,
            }),
            ..Faults::default()
        });
        let seen: Vec<_> = (0..3)
            .map(|_| state.plan("/me", Target::Api).force_429)
            .collect();
        assert_eq!(
            seen,
            vec![Some(7), Some(7), None],
            "expected two forced 429s"
        );
        // The token endpoint never consumes a forced API answer.
        state.set(Faults {
            force_401: Some(Force401 { count: 1 }),
            ..Faults::default()
        });
        assert!(
            !state
                .plan("/oauth/access_token", Target::TokenEndpoint)
                .force_401
        );
        assert!(
            state.plan("/me", Target::Api).force_401,
            "expected forced 401"
        );
    }

    #[test]
    fn path_prefix_limits_faults() {
        let state = FaultState::new(Faults {
            error_rate: 1.0,
            error_status: 502,
            path_prefix: Some("/12345/".into()),
            ..Faults::default()
        });
        assert_eq!(
            state.plan("/me", Target::Api).error,
            None,
            "expected /me untouched"
        );
        assert_eq!(
            state.plan("/12345/inbox/mentions", Target::Api).error,
            Some(502)
        );
    }

    #[test]
    fn json_round_trip_and_validation() {
        let f: Faults = serde_json::from_str(r#"{"drop_rate":0.5,"force_401":{"count":1}}"#)
            .expect("valid fault JSON");
        assert_eq!(f.error_status, 503, "expected default error_status 503");
        assert!(f.validate().is_ok());
        let bad = Faults {
            error_rate: 2.0,
            ..Faults::default()
        };
        assert!(
            bad.validate().is_err(),
            "expected error_rate 2.0 to be refused"
        );
        // The flags' spellings are taken; a name that is neither is still refused.
        assert!(serde_json::from_str::<Faults>(r#"{"latency_secs":5}"#).is_err());
        let flags: Faults = serde_json::from_str(r#"{"latency":"2s","jitter_ms":"5ms"}"#)
            .expect("the flags' spellings");
        assert_eq!((flags.latency_ms, flags.jitter_ms), (2000, 5));
        assert!(serde_json::from_str::<Faults>(r#"{"latency":"soon"}"#).is_err());
        assert_eq!(bad.normalised().error_rate, 1.0);
    }
}
