//! The simulated CX Social (Engagor) API behind `cxgate sim` and `cxgate demo`: the upstream
//! of the demo, the tests and the benchmarks, following what the public clients of the real
//! API show. It imports nothing of the gateway, so the gateway's tests really test it against
//! an independent outsider. README "The simulator" lists what it models and its control
//! endpoints (`/_sim/stats`, `/_sim/faults`, `/_sim/revoke`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let sim = cxgate::sim::spawn(listener, cxgate::sim::SimOptions::default()).await?;
//! println!("GET {}/me?access_token=sim-token", sim.base_url());
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

mod api;
mod control;
mod data;
mod extra;
mod faults;
mod limit;
mod oauth;
mod page;
mod reply;
mod router;
mod serve;
mod settings;
mod stats;
mod writes;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

pub use faults::{Faults, Force401, Force429, FAULT_NAMES};
pub use limit::{RateLimit, RateLimitParseError};
pub use serve::{run_cli, spawn, SimHandle};
pub use stats::token_hash;

/// Flags of `cxgate sim`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8089")]
    pub listen: SocketAddr,
    /// Lifetime of access tokens (seed tokens count from start).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub token_ttl: Duration,
    /// Rate limit per grant, as N/PERIOD (e.g. 1000/1h); unlimited when absent.
    #[arg(long)]
    pub rate_limit: Option<RateLimit>,
    /// Status of over-limit answers: 400 (what the real API sends, with `"error":
    /// "rate_limit_reached"`) or 429 (the convention, with Retry-After).
    #[arg(long, default_value_t = 400, value_parser = parse_limit_status)]
    pub rate_limit_status: u16,
    /// Access token valid from start (repeatable).
    #[arg(long = "access-token", default_value = "sim-token")]
    pub access_tokens: Vec<String>,
    /// Refresh token valid from start, paired with the access token of the same position.
    #[arg(long = "refresh-token", default_value = "sim-refresh")]
    pub refresh_tokens: Vec<String>,
    /// OAuth client id the token endpoint accepts.
    #[arg(long, default_value = "sim-client")]
    pub client_id: String,
    /// OAuth client secret the token endpoint accepts.
    #[arg(long, default_value = "sim-secret")]
    pub client_secret: String,
    /// One-use authorisation code for the authorization_code grant (repeatable).
    #[arg(long = "auth-code", default_value = "sim-code")]
    pub auth_codes: Vec<String>,
    /// Added latency on every request.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<Duration>,
    /// Random extra latency, up to this much.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub jitter: Option<Duration>,
    /// Share (0..1) of requests answered with --error-status.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub error_rate: f64,
    /// Status of injected errors (5xx).
    #[arg(long, default_value_t = 503, value_parser = clap::value_parser!(u16).range(500..600))]
    pub error_status: u16,
    /// Share (0..1) of requests whose connection is closed without an answer.
    #[arg(long, default_value_t = 0.0, value_parser = parse_share)]
    pub drop_rate: f64,
    /// Dribble every body over this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub slow_body: Option<Duration>,
    /// Make the token endpoint answer 503.
    #[arg(long)]
    pub token_endpoint_down: bool,
    /// Restrict the faults to paths starting with this.
    #[arg(long)]
    pub fault_path_prefix: Option<String>,
    /// Time the insights endpoints take.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub insights_latency: Duration,
}

impl SimArgs {
    pub fn options(&self) -> SimOptions {
        let ms = |d: Option<Duration>| d.map_or(0, |d| d.as_millis() as u64);
        SimOptions {
            token_ttl: self.token_ttl,
            rate_limit: self.rate_limit,
            rate_limit_status: self.rate_limit_status,
            access_tokens: self.access_tokens.clone(),
            refresh_tokens: self.refresh_tokens.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            auth_codes: self.auth_codes.clone(),
            faults: Faults {
                latency_ms: ms(self.latency),
                jitter_ms: ms(self.jitter),
                error_rate: self.error_rate,
                error_status: self.error_status,
                drop_rate: self.drop_rate,
                slow_body_ms: ms(self.slow_body),
                force_429: None,
                force_401: None,
                token_endpoint_down: self.token_endpoint_down,
                path_prefix: self.fault_path_prefix.clone(),
                insights_latency_ms: None,
            },
            insights_latency: self.insights_latency,
            ..SimOptions::default()
        }
    }
}

fn parse_limit_status(text: &str) -> Result<u16, String> {
    match text {
        "400" => Ok(400),
        "429" => Ok(429),
        _ => Err(format!("expected 400 or 429, got {text:?}")),
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("expected a share between 0 and 1, got {text:?}")),
    }
}

/// Everything the simulator is started with.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub token_ttl: Duration,
    pub rate_limit: Option<RateLimit>,
    /// Over-limit answers: 400 `rate_limit_reached` like the real API, or 429.
    pub rate_limit_status: u16,
    pub access_tokens: Vec<String>,
    pub refresh_tokens: Vec<String>,
    pub client_id: String,
    pub client_secret: String,
    pub auth_codes: Vec<String>,
    /// Faults in force from start (out-of-range values are brought into range).
    pub faults: Faults,
    pub insights_latency: Duration,
    /// How long `shutdown` lets requests in flight finish before cutting them off.
    pub shutdown_grace: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            token_ttl: Duration::from_secs(3600),
            rate_limit: None,
            rate_limit_status: 400,
            access_tokens: vec!["sim-token".into()],
            refresh_tokens: vec!["sim-refresh".into()],
            client_id: "sim-client".into(),
            client_secret: "sim-secret".into(),
            auth_codes: vec!["sim-code".into()],
            faults: Faults::default(),
            insights_latency: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// The shared state of one running simulator.
///
/// Invariants: generated data is a pure function of the ids (same id, same body); writes are
/// kept in memory and show in later reads; every answer is in the CX Social envelope (the
/// token endpoint answers plain OAuth JSON); no lock is held across an await, so the fast path
/// costs a few brief std Mutex sections.
pub(crate) struct Sim {
    tokens: oauth::Tokens,
    limiter: limit::Limiter,
    limit_status: http::StatusCode,
    faults: faults::FaultState,
    stats: Arc<stats::Stats>,
    writes: writes::Writes,
    settings: settings::Store,
    insights_latency: Duration,
    local_addr: SocketAddr,
}

impl Sim {
    /// `--insights-latency`, unless the fault JSON set `insights_latency` since.
    fn insights_latency(&self) -> Duration {
        self.faults
            .current()
            .insights_latency_ms
            .map_or(self.insights_latency, Duration::from_millis)
    }

    fn new(opts: &SimOptions, local_addr: SocketAddr) -> Self {
        Sim {
            tokens: oauth::Tokens::new(opts, tokio::time::Instant::now()),
            limiter: limit::Limiter::new(opts.rate_limit),
            limit_status: http::StatusCode::from_u16(opts.rate_limit_status)
                .ok()
                .filter(|s| *s == http::StatusCode::TOO_MANY_REQUESTS)
                .unwrap_or(http::StatusCode::BAD_REQUEST),
            faults: faults::FaultState::new(opts.faults.clone()),
            stats: Arc::new(stats::Stats::default()),
            writes: writes::Writes::default(),
            settings: settings::Store::default(),
            insights_latency: opts.insights_latency,
            local_addr,
        }
    }
}

/// Locks a std Mutex, ignoring poisoning: every critical section here leaves its data
/// consistent at each step (counters, map inserts), so a panic elsewhere cannot corrupt it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimArgs,
    }

    #[test]
    fn flags_become_options() {
        let cli = Cli::try_parse_from(["sim"]).map(|c| c.sim.options());
        let defaults = cli.expect("no flags is valid");
        assert_eq!(defaults.access_tokens, ["sim-token"], "default seed token");
        assert_eq!(defaults.rate_limit, None, "unlimited by default");
        assert_eq!(defaults.faults, Faults::default(), "no faults by default");
        let argv = [
            "sim",
            "--rate-limit",
            "10/1s",
            "--access-token",
            "a",
            "--access-token",
            "b",
            "--latency",
            "20ms",
            "--error-rate",
            "0.5",
            "--error-status",
            "502",
            "--token-ttl",
            "5m",
        ];
        let opts = Cli::try_parse_from(argv).map(|c| c.sim.options());
        let opts = opts.expect("valid flags");
        assert_eq!(opts.access_tokens, ["a", "b"]);
        assert_eq!(opts.token_ttl, Duration::from_secs(300));
        let limit = RateLimit {
            limit: 10,
            period: Duration::from_secs(1),
        };
        assert_eq!(opts.rate_limit, Some(limit));
        let seen = (
            opts.faults.latency_ms,
            opts.faults.error_rate,
            opts.faults.error_status,
        );
        assert_eq!(seen, (20, 0.5, 502), "fault flags");
        for bad in [
            ["sim", "--error-rate", "1.5"],
            ["sim", "--error-status", "404"],
        ] {
            assert!(
                Cli::try_parse_from(bad).is_err(),
                "expected {bad:?} refused"
            );
        }
    }
}
