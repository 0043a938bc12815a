//! The upstream's own rate limit: `N` requests per fixed window of `PERIOD`, counted per
//! grant lineage (a refresh keeps the lineage, so rotating tokens does not reset the count).
//!
//! Invariants: a window opens at the first request after the previous one ended and lasts
//! exactly one period; refused requests do not count; the map is touched under one brief
//! std Mutex, never across an await. Time is tokio's clock so tests can pause it.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::lock;

/// `N/PERIOD`, e.g. `1000/1h`, `5/500ms` or `60/m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u32,
    pub period: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RateLimitParseError {
    #[error("expected N/PERIOD such as 1000/1h, got {0:?}")]
    Shape(String),
    #[error("the request count in {0:?} must be a positive integer")]
    Count(String),
    #[error("bad period in {input:?}")]
    Period {
        input: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("the period in {0:?} must be longer than zero")]
    ZeroPeriod(String),
}

impl FromStr for RateLimit {
    type Err = RateLimitParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s
            .split_once('/')
            .ok_or_else(|| RateLimitParseError::Shape(s.to_owned()))?;
        let limit = count
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| RateLimitParseError::Count(s.to_owned()))?;
        let period = period.trim();
        // "60/m" reads naturally; humantime wants a number in front of the unit.
        let starts_with_digit = period.starts_with(|c: char| c.is_ascii_digit());
        let spelled = if starts_with_digit {
            period.to_owned()
        } else {
            format!("1{period}")
        };
        let period =
            humantime::parse_duration(&spelled).map_err(|source| RateLimitParseError::Period {
                input: s.to_owned(),
                source,
            })?;
        if period.is_zero() {
            return Err(RateLimitParseError::ZeroPeriod(s.to_owned()));
        }
        Ok(RateLimit { limit, period })
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.limit,
            humantime::format_duration(self.period)
        )
    }
}

/// Where a lineage stands after a request was counted (or refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quota {
    pub limit: u32,
    pub remaining: u32,
    /// Time until the current window ends.
    pub reset_in: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    Unlimited,
    Allowed(Quota),
    /// Over the limit; the second field counts refusals in this window from 0.
    Limited(Quota, u32),
}

struct Window {
    start: Instant,
    used: u32,
    refused: u32,
}

pub(crate) struct Limiter {
    rule: Option<RateLimit>,
    windows: Mutex<HashMap<u64, Window>>,
}

impl Limiter {
    pub fn new(rule: Option<RateLimit>) -> Self {
        Limiter {
            rule,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `lineage` at `now`, unless its window is used up.
    pub fn check(&self, lineage: u64, now: Instant) -> Verdict {
        let Some(rule) = self.rule else {
            return Verdict::Unlimited;
        };
        let mut windows = lock(&self.windows);
        let window = windows.entry(lineage).or_insert(Window {
            start: now,
            used: 0,
            refused: 0,
        });
        if now.duration_since(window.start) >= rule.period {
            *window = Window {
                start: now,
                used: 0,
                refused: 0,
            };
        }
        let reset_in = (window.start + rule.period).saturating_duration_since(now);
        if window.used >= rule.limit {
            let nth = window.refused;
            window.refused = window.refused.saturating_add(1);
            return Verdict::Limited(
                Quota {
                    limit: rule.limit,
                    remaining: 0,
                    reset_in,
                },
                nth,
            );
        }
        window.used += 1;
        Verdict::Allowed(Quota {
            limit: rule.limit,
            remaining: rule.limit - window.used,
            reset_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_periods() {
        let cases = [
            ("1000/1h", 1000, Duration::from_secs(3600)),
            ("60/m", 60, Duration::from_secs(60)),
            ("5/500ms", 5, Duration::from_millis(500)),
        ];
        for (text, limit, period) in cases {
            let seen: RateLimit = text.parse().expect("valid rate limit");
            assert_eq!(seen, RateLimit { limit, period }, "parsing {text}");
        }
        for bad in ["1000", "0/1h", "x/1h", "10/soon", "10/0s"] {
            assert!(
                bad.parse::<RateLimit>().is_err(),
                "expected {bad:?} refused"
            );
        }
    }

    #[test]
    fn fixed_window_per_lineage() {
        let limiter = Limiter::new(Some(RateLimit {
            limit: 2,
            period: Duration::from_secs(10),
        }));
        let t0 = Instant::now();
        let remaining = |v: Verdict| match v {
            Verdict::Allowed(q) => Some(q.remaining),
            _ => None,
        };
        assert_eq!(remaining(limiter.check(1, t0)), Some(1));
        assert_eq!(remaining(limiter.check(1, t0)), Some(0));
        let refused = limiter.check(1, t0 + Duration::from_secs(4));
        assert_eq!(
            refused,
            Verdict::Limited(
                Quota {
                    limit: 2,
                    remaining: 0,
                    reset_in: Duration::from_secs(6)
                },
                0
            ),
            "expected third call refused with 6 s left"
        );
        // Another lineage has its own window.
        assert_eq!(remaining(limiter.check(2, t0)), Some(1));
        // A new window opens once the period is over.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(remaining(limiter.check(1, later)), Some(1));
    }

    #[test]
    fn no_rule_is_unlimited() {
        let limiter = Limiter::new(None);
        assert_eq!(limiter.check(1, Instant::now()), Verdict::Unlimited);
    }
}
