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

/// Upstream headers an entry does not keep: each hit regenerates them or they describe the
/// upstream's connection or software rather than the answer. `Date` and `Content-Length`
/// are written by the gateway's HTTP server for every answer, `Age` by the gateway itself;
/// `Connection`, `Keep-Alive` and `Transfer-Encoding` are per connection; `Server` and
/// `X-Powered-By` name the upstream's software. `Accept-Ranges` is dropped too, except on a
/// partial answer (206), the one status where a client reads it.
const NOT_STORED: &[&str] = &[
    "date",
    "server",
    "x-powered-by",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "age",
];

/// Whether a hit needs `name` from the upstream's answer (see [`NOT_STORED`]).
fn stored_header(status: StatusCode, name: &HeaderName) -> bool {
    let name = name.as_str();
    if name == "accept-ranges" {
        return status == StatusCode::PARTIAL_CONTENT;
    }
    !NOT_STORED.contains(&name)
}

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

    /// The headers a stored entry keeps: all but the ones each answer regenerates.
    pub fn stored_headers(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> + '_ {
        self.headers
            .iter()
            .filter(|(name, _)| stored_header(self.status, name))
    }

    /// The entry's cost against the store's byte bound: body, stored header names and
    /// values, tags and a fixed overhead. Saturates at `u32::MAX`, which no single entry
    /// should reach.
    pub fn weight(&self) -> u32 {
        let headers: usize = self
            .stored_headers()
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
///
/// Every field that can be derived from the block is (the tags' end, the header count, the
/// weight): the struct is 80 bytes, held inline in moka's entry, and each of the 100,000s
/// of entries pays for it.
#[derive(Debug, Clone)]
pub struct StoredResponse {
    block: Bytes,
    key_end: u32,
    body_start: u32,
    tag_count: u16,
    status: StatusCode,
    /// Told apart from a later value under the same key when the tag index forgets it.
    pub(crate) serial: u64,
    stored_at: Instant,
    /// ttl and the stale windows in milliseconds: 12 bytes instead of 48 in every entry.
    /// Longer than 49 days saturates at 49 days.
    windows_ms: [u32; 3],
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
            .stored_headers()
            .map(|(n, v)| n.as_str().len() + v.len() + 2)
            .sum();
        let tag_count = u16::try_from(tag_hashes.len()).ok()?;
        let size = key.len() + tag_hashes.len() * 8 + headers + value.body.len();
        let mut block = BytesMut::with_capacity(size);
        block.put_slice(key.as_bytes());
        let key_end = u32::try_from(block.len()).ok()?;
        for hash in tag_hashes {
            block.put_u64_le(*hash);
        }
        for (name, v) in value.stored_headers() {
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
            body_start,
            tag_count,
            status: value.status,
            serial,
            stored_at: value.stored_at,
            windows_ms: [
                millis(value.ttl),
                millis(value.stale_while_revalidate),
                millis(value.stale_if_error),
            ],
        })
    }

    /// The key it is stored under (a variant key for a varying resource).
    pub fn key(&self) -> &str {
        // The block starts with a `&str` copied in `pack`, so this never fails.
        std::str::from_utf8(&self.block[..self.key_end as usize]).unwrap_or("")
    }

    /// Where the tag hashes end and the header lines start.
    fn tags_end(&self) -> usize {
        self.key_end as usize + usize::from(self.tag_count) * 8
    }

    pub(crate) fn tag_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.block[self.key_end as usize..self.tags_end()]
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
        let lines = &self.block[self.tags_end()..self.body_start as usize];
        lines.iter().filter(|b| **b == b'\n').count()
    }

    /// The stored headers; values share the block (no copy).
    pub fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let base = self.tags_end();
        let lines = &self.block[base..self.body_start as usize];
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

    /// The entry's cost against the store's byte bound, from the block: the body, the
    /// stored header lines, the tag hashes and a fixed overhead (the key is added by the
    /// store). Close to [`CachedResponse::weight`] of the value it was packed from.
    pub fn weight(&self) -> u32 {
        let block = self.block.len() - self.key_end as usize;
        u32::try_from(ENTRY_OVERHEAD.saturating_add(block)).unwrap_or(u32::MAX)
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

    #[test]
    fn an_entry_struct_stays_80_bytes() {
        // moka holds it inline in every entry: a field more is 100,000s of 8 bytes.
        let size = std::mem::size_of::<StoredResponse>();
        assert!(size <= 80, "StoredResponse grew to {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn pack_keeps_what_a_hit_needs_and_drops_what_it_regenerates() {
        let mut e = entry(1, 0, 0);
        for (name, value) in [
            ("server", "nginx/1.24.0"),
            ("date", "Tue, 24 Nov 2026 09:00:00 GMT"),
            ("content-type", "application/json"),
            ("content-length", "2"),
            ("last-modified", "Tue, 24 Nov 2026 09:14:03 GMT"),
            ("etag", "\"x\""),
            ("accept-ranges", "bytes"),
            ("x-powered-by", "PHP/8.2"),
            ("keep-alive", "timeout=5"),
            ("age", "3"),
            ("cache-control", "max-age=60"),
            ("vary", "Accept-Language"),
        ] {
            e.headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let kept = |e: &CachedResponse| -> Vec<String> {
            let stored = StoredResponse::pack("GET /x", e, &[1, 2], 0).expect("packs");
            assert_eq!(stored.tag_hashes().collect::<Vec<_>>(), [1, 2]);
            assert_eq!(stored.body(), e.body, "the body must survive packing");
            let mut names: Vec<String> = stored.headers().map(|(n, _)| n.to_string()).collect();
            assert_eq!(stored.header_count(), names.len(), "header_count");
            names.sort();
            names
        };
        let seen = kept(&e);
        let expected = [
            "cache-control",
            "content-type",
            "etag",
            "last-modified",
            "vary",
        ];
        assert_eq!(seen, expected, "headers kept for a 200");
        // A partial answer keeps Accept-Ranges: there a client reads it.
        e.status = StatusCode::PARTIAL_CONTENT;
        let seen = kept(&e);
        assert!(
            seen.iter().any(|n| n == "accept-ranges"),
            "expected Accept-Ranges kept on a 206, saw {seen:?}"
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
