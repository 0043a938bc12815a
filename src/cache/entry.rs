//! A stored response and its freshness on tokio's clock.
//!
//! An entry is fresh for `ttl` after `stored_at`, then stale: usable for background
//! revalidation within `stale_while_revalidate` and as a fallback within `stale_if_error`.
//! Past both windows it is useless, and the store drops it (`lifetime` says when).

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

/// Bytes charged per entry on top of its body and headers: the struct itself, the header
/// map's tables, the key and the store's bookkeeping. A guess, but it stops a flood of
/// empty bodies from looking free.
const ENTRY_OVERHEAD: usize = 256;

/// One cached upstream answer. The body is `Bytes`, so serving a hit shares it, never copies.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Route tags (already expanded), used by `Store::invalidate_tags`.
    pub tags: Box<[String]>,
    /// When the answer was received, on tokio's clock so tests can pause time.
    pub stored_at: Instant,
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// How usable an entry is at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Serve as is; `remaining` is the time left before it turns stale.
    Fresh { remaining: Duration },
    /// Older than its ttl by `past`.
    Stale {
        past: Duration,
        /// Within the stale-while-revalidate window: serve now, refresh in the background.
        revalidate: bool,
        /// Within the stale-if-error window: serve when the upstream fails or the budget is out.
        if_error: bool,
    },
}

impl Freshness {
    /// True when the entry may still be served in some case (fresh or in a stale window).
    pub fn is_usable(&self) -> bool {
        match *self {
            Freshness::Fresh { .. } => true,
            Freshness::Stale {
                revalidate,
                if_error,
                ..
            } => revalidate || if_error,
        }
    }
}

impl CachedResponse {
    /// Time since the entry was stored; zero if `now` is earlier (a clock never runs back,
    /// but a caller may pass an instant taken before the insert).
    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        let age = self.age(now);
        match self.ttl.checked_sub(age) {
            Some(remaining) if !remaining.is_zero() => Freshness::Fresh { remaining },
            _ => {
                let past = age.saturating_sub(self.ttl);
                Freshness::Stale {
                    past,
                    revalidate: past < self.stale_while_revalidate,
                    if_error: past < self.stale_if_error,
                }
            }
        }
    }

    /// How long after `stored_at` the entry is of any use: ttl plus the longer stale window.
    pub fn lifetime(&self) -> Duration {
        self.ttl
            .saturating_add(self.stale_while_revalidate.max(self.stale_if_error))
    }

    /// The entry's cost against the store's byte bound: body, header names and values, tags
    /// and a fixed overhead. Saturates at `u32::MAX`, which no single entry should reach.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let tags: usize = self.tags.iter().map(String::len).sum();
        let total = ENTRY_OVERHEAD
            .saturating_add(self.body.len())
            .saturating_add(headers)
            .saturating_add(tags);
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONTENT_TYPE, ETAG};
    use http::HeaderValue;

    fn entry(ttl: u64, swr: u64, sie: u64) -> CachedResponse {
        CachedResponse {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"{}"),
            tags: Box::new([]),
            stored_at: Instant::now(),
            ttl: Duration::from_secs(ttl),
            stale_while_revalidate: Duration::from_secs(swr),
            stale_if_error: Duration::from_secs(sie),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_moves_through_ttl_swr_stale_if_error_and_gone() {
        let e = entry(10, 5, 60);
        let s = Duration::from_secs;
        let steps = [
            (0, Freshness::Fresh { remaining: s(10) }),
            (4, Freshness::Fresh { remaining: s(6) }),
            (
                6,
                Freshness::Stale {
                    past: s(0),
                    revalidate: true,
                    if_error: true,
                },
            ),
            (
                4,
                Freshness::Stale {
                    past: s(4),
                    revalidate: true,
                    if_error: true,
                },
            ),
            (
                1,
                Freshness::Stale {
                    past: s(5),
                    revalidate: false,
                    if_error: true,
                },
            ),
            (
                54,
                Freshness::Stale {
                    past: s(59),
                    revalidate: false,
                    if_error: true,
                },
            ),
            (
                1,
                Freshness::Stale {
                    past: s(60),
                    revalidate: false,
                    if_error: false,
                },
            ),
        ];
        for (step, expected) in steps {
            tokio::time::advance(s(step)).await;
            let now = Instant::now();
            let seen = e.freshness(now);
            let age = e.age(now);
            assert_eq!(
                seen, expected,
                "at age {age:?}: expected {expected:?}, saw {seen:?}"
            );
        }
        let now = Instant::now();
        assert!(
            !e.freshness(now).is_usable(),
            "past both windows the entry must be unusable"
        );
        assert_eq!(
            e.lifetime(),
            s(70),
            "lifetime: expected 70s, saw {:?}",
            e.lifetime()
        );
        assert_eq!(e.age(now), s(70), "age: expected 70s, saw {:?}", e.age(now));
    }

    #[tokio::test(start_paused = true)]
    async fn zero_windows_mean_stale_is_unusable() {
        let e = entry(1, 0, 0);
        assert!(
            e.freshness(Instant::now()).is_usable(),
            "a new entry must be usable"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let seen = e.freshness(Instant::now());
        assert!(
            !seen.is_usable(),
            "with no stale windows, expected unusable at ttl, saw {seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn age_is_zero_before_stored_at() {
        let earlier = Instant::now();
        tokio::time::advance(Duration::from_secs(3)).await;
        let e = entry(10, 0, 0);
        let seen = e.age(earlier);
        assert_eq!(
            seen,
            Duration::ZERO,
            "age before stored_at: expected 0, saw {seen:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn weight_counts_body_headers_tags_and_overhead() {
        let mut e = entry(1, 0, 0);
        e.body = Bytes::from(vec![0u8; 1000]);
        e.headers
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        e.headers.insert(ETAG, HeaderValue::from_static("\"abc\""));
        e.tags = vec!["me".to_owned(), "account:1".to_owned()].into_boxed_slice();
        let expected = ENTRY_OVERHEAD + 1000 + (12 + 16) + (4 + 5) + (2 + 9);
        let seen = e.weight() as usize;
        assert_eq!(seen, expected, "weight: expected {expected}, saw {seen}");
    }
}
