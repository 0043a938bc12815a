//! A cached response: what the gateway hands the store, and the compact form it is kept in.
//!
//! An entry is fresh for `ttl` after `stored_at`, then stale: usable for background
//! revalidation within `stale_while_revalidate` and as a fallback within `stale_if_error`.
//! Past both windows it is useless, and the store drops it (`lifetime` says when).
//!
//! [`StoredResponse`] keeps a whole entry in one allocation: its key, tag hashes, headers
//! and body sit in one `Bytes` block, and the rest is a few plain fields. The store holds it
//! inline in moka, a lookup clones it (one reference count), and a hit slices its headers
//! and body out of the block without copying (memory per entry is an issue-#7 goal).

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;

/// Bytes charged per entry on top of its body and headers: the struct itself, the header
/// map's tables, the key and the store's bookkeeping. A guess, but it stops a flood of
/// empty bodies from looking free.
const ENTRY_OVERHEAD: usize = 256;

/// One cached upstream answer, as the gateway builds it for [`crate::cache::Store::insert`].
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

/// When an entry was stored and how long each window lasts after that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub stored_at: Instant,
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

impl Timing {
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
}

impl CachedResponse {
    pub fn timing(&self) -> Timing {
        Timing {
            stored_at: self.stored_at,
            ttl: self.ttl,
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
        }
    }

    pub fn age(&self, now: Instant) -> Duration {
        self.timing().age(now)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        self.timing().freshness(now)
    }

    pub fn lifetime(&self) -> Duration {
        self.timing().lifetime()
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

/// A stored entry. The block holds, in order: the key, one little-endian `u64` per tag
/// hash, the headers as `name:value\n` lines (a name never holds `:` and a value never
/// holds a line break, so the split is unambiguous), then the body.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    block: Bytes,
    key_end: u32,
    tags_end: u32,
    body_start: u32,
    header_count: u16,
    status: StatusCode,
    /// Told apart from a later value under the same key when the tag index forgets it.
    pub(crate) serial: u64,
    stored_at: Instant,
    /// ttl and the stale windows in milliseconds: 12 bytes instead of 48 in every entry.
    /// Longer than 49 days saturates at 49 days.
    windows_ms: [u32; 3],
    weight: u32,
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl StoredResponse {
    /// Packs `value` under `key` with its tags already hashed. `None` when a part is too
    /// large for the block's 32-bit offsets (4 GiB; no upstream answer comes near).
    pub(crate) fn pack(
        key: &str,
        value: &CachedResponse,
        tag_hashes: &[u64],
        serial: u64,
    ) -> Option<StoredResponse> {
        let headers: usize = value
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 2)
            .sum();
        let size = key.len() + tag_hashes.len() * 8 + headers + value.body.len();
        let mut block = BytesMut::with_capacity(size);
        block.put_slice(key.as_bytes());
        let key_end = u32::try_from(block.len()).ok()?;
        for hash in tag_hashes {
            block.put_u64_le(*hash);
        }
        let tags_end = u32::try_from(block.len()).ok()?;
        for (name, v) in &value.headers {
            block.put_slice(name.as_str().as_bytes());
            block.put_u8(b':');
            block.put_slice(v.as_bytes());
            block.put_u8(b'\n');
        }
        let body_start = u32::try_from(block.len()).ok()?;
        block.put_slice(&value.body);
        u32::try_from(block.len()).ok()?;
        Some(StoredResponse {
            block: block.freeze(),
            key_end,
            tags_end,
            body_start,
            header_count: u16::try_from(value.headers.len()).ok()?,
            status: value.status,
            serial,
            stored_at: value.stored_at,
            windows_ms: [
                millis(value.ttl),
                millis(value.stale_while_revalidate),
                millis(value.stale_if_error),
            ],
            weight: value.weight(),
        })
    }

    /// The key it is stored under (a variant key for a varying resource).
    pub fn key(&self) -> &str {
        // The block starts with a `&str` copied in `pack`, so this never fails.
        std::str::from_utf8(&self.block[..self.key_end as usize]).unwrap_or("")
    }

    pub(crate) fn tag_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.block[self.key_end as usize..self.tags_end as usize]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The body, sharing the block (no copy).
    pub fn body(&self) -> Bytes {
        self.block.slice(self.body_start as usize..)
    }

    /// How many headers [`StoredResponse::headers`] yields.
    pub fn header_count(&self) -> usize {
        usize::from(self.header_count)
    }

    /// The stored headers; values share the block (no copy).
    pub fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let lines = &self.block[self.tags_end as usize..self.body_start as usize];
        let base = self.tags_end as usize;
        lines
            .split_inclusive(|b| *b == b'\n')
            .scan(base, |at, line| {
                let start = *at;
                *at += line.len();
                Some((start, line))
            })
            .filter_map(move |(start, line)| {
                let colon = line.iter().position(|b| *b == b':')?;
                let name = HeaderName::from_bytes(&line[..colon]).ok()?;
                let value = self.block.slice(start + colon + 1..start + line.len() - 1);
                // Checked when it was first received; checked again rather than trusted.
                let value = HeaderValue::from_maybe_shared(value).ok()?;
                Some((name, value))
            })
    }

    pub fn timing(&self) -> Timing {
        let [ttl, swr, sie] = self
            .windows_ms
            .map(|ms| Duration::from_millis(u64::from(ms)));
        Timing {
            stored_at: self.stored_at,
            ttl,
            stale_while_revalidate: swr,
            stale_if_error: sie,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.timing().ttl
    }

    pub fn age(&self, now: Instant) -> Duration {
        self.timing().age(now)
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        self.timing().freshness(now)
    }

    pub fn lifetime(&self) -> Duration {
        self.timing().lifetime()
    }

    /// The weight of the [`CachedResponse`] it was packed from.
    pub fn weight(&self) -> u32 {
        self.weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{CONTENT_TYPE, ETAG};

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
