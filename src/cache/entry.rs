//! A cached response: what the gateway hands the store, and the compact form it is kept in.
//! Memory per entry is what bounds how much the cache holds, so the kept form is one shared
//! block a hit slices without copying ([`StoredResponse`]); when an entry may be served is
//! [`Freshness`].

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::time::Instant;
use triomphe::ThinArc;

/// Bytes charged per entry on top of its body and headers: the struct itself, the header
/// map's tables, the key and the store's bookkeeping. A guess, but it stops a flood of
/// empty bodies from looking free.
const ENTRY_OVERHEAD: usize = 256;

/// Upstream headers an entry does not keep: each hit regenerates them or they describe the
/// upstream's connection or software rather than the answer. `Date` is written by the
/// gateway's HTTP server for every answer, `Age` by the gateway itself;
/// `Connection`, `Keep-Alive` and `Transfer-Encoding` are per connection; `Server` and
/// `X-Powered-By` name the upstream's software. `Accept-Ranges` is dropped too, except on a
/// partial answer (206), the one status where a client reads it. `Content-Length` stays: a
/// HEAD answered from the entry carries no body for the server to count.
const NOT_STORED: &[&str] = &[
    "date",
    "server",
    "x-powered-by",
    "connection",
    "keep-alive",
    "transfer-encoding",
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

/// Whether the gateway stores an upstream answer of `status`: only a success (2xx), and
/// never a 206, which is a part of the answer: a later read of the key would be served a
/// fragment as if it were whole. The shared tier refuses an entry of any other status,
/// whoever wrote it.
pub fn stored_status(status: StatusCode) -> bool {
    status.is_success() && status != StatusCode::PARTIAL_CONTENT
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
///
/// An entry is fresh for `ttl` after `stored_at`, then stale: usable for background
/// revalidation within `stale_while_revalidate` and as a fallback within `stale_if_error`.
/// Past both windows it is useless, and the store drops it (`lifetime` says when).
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

/// A stored entry: one shared allocation (a `triomphe::ThinArc`), nothing else. The block
/// holds, in order: a fixed [`META`]-byte header (serial, stored-at, the three windows, two
/// offsets, the tag count and the status, little-endian), the key, one `u32` per tag hash,
/// the headers as `name:value\n` lines (a name never holds `:` and a value never holds a
/// line break, so the split is unambiguous), then the body.
///
/// moka keeps this handle inline in its entry, so the handle is one word: the block's
/// length sits in the allocation, next to its reference count, and with an 8-byte value
/// moka's per-entry value node fits jemalloc's 32-byte size class instead of the 48-byte
/// one. Every field in the block rides in the allocation the body needs anyway (whose size
/// class usually has room to spare). A hit wraps the block in one `Bytes` per call, and the
/// body and header values are slices of it, never copies: the store holds the one-word
/// handle inline in moka, and a lookup clones it (one reference count). README "Memory per
/// cached entry" gives the measured cost per part.
#[derive(Clone)]
pub struct StoredResponse {
    block: ThinArc<(), u8>,
}

/// The block's fixed header: serial (8), stored-at (8), ttl, stale-while-revalidate and
/// stale-if-error in milliseconds (3 x 4), key end (4), body start (4), tag count (2),
/// status (2).
const META: usize = 40;
const AT_SERIAL: usize = 0;
const AT_STORED: usize = 8;
const AT_WINDOWS: usize = 16;
const AT_KEY_END: usize = 28;
const AT_BODY_START: usize = 32;
const AT_TAG_COUNT: usize = 36;
const AT_STATUS: usize = 38;

/// The status field of a varying resource's marker (see [`StoredResponse::pack_vary_marker`]).
const VARY_MARKER: u16 = 0;

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The instant `stored_at` values are counted from, in nanoseconds (either side of it).
fn epoch() -> std::time::Instant {
    static EPOCH: OnceLock<std::time::Instant> = OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn encode_instant(at: Instant) -> i64 {
    let at = at.into_std();
    match at.checked_duration_since(epoch()) {
        Some(after) => nanos(after),
        None => -nanos(epoch().saturating_duration_since(at)),
    }
}

fn decode_instant(n: i64) -> Instant {
    let offset = Duration::from_nanos(n.unsigned_abs());
    let at = if n >= 0 {
        epoch().checked_add(offset)
    } else {
        epoch().checked_sub(offset)
    };
    Instant::from_std(at.unwrap_or_else(epoch))
}

impl StoredResponse {
    /// Packs `value` under `key` with its tags already hashed. `None` when a part is too
    /// large for the block's 32-bit offsets (4 GiB; no upstream answer comes near).
    pub(crate) fn pack(
        key: &str,
        value: &CachedResponse,
        tag_hashes: &[u32],
        serial: u64,
    ) -> Option<StoredResponse> {
        let lines = || {
            value
                .stored_headers()
                .map(|(name, v)| (name.as_str().as_bytes(), v.as_bytes()))
        };
        let status = value.status.as_u16();
        Self::pack_parts(
            key,
            status,
            value.timing(),
            tag_hashes,
            lines,
            &value.body,
            serial,
        )
    }

    /// Packs the marker kept under the primary key of a varying resource: `names`, the
    /// request headers that select a variant, as header lines without values, and the
    /// timing of the variant stored with it. Its status is 0, which no answer has.
    pub(crate) fn pack_vary_marker(
        key: &str,
        names: &[HeaderName],
        timing: Timing,
        serial: u64,
    ) -> Option<StoredResponse> {
        let lines = || names.iter().map(|n| (n.as_str().as_bytes(), &b""[..]));
        Self::pack_parts(key, VARY_MARKER, timing, &[], lines, &[], serial)
    }

    /// `lines` gives the header lines' names and values, once to size the block and once
    /// to fill it.
    fn pack_parts<'a, I: Iterator<Item = (&'a [u8], &'a [u8])>>(
        key: &str,
        status: u16,
        timing: Timing,
        tag_hashes: &[u32],
        lines: impl Fn() -> I,
        body: &[u8],
        serial: u64,
    ) -> Option<StoredResponse> {
        let headers: usize = lines().map(|(n, v)| n.len() + v.len() + 2).sum();
        let tag_count = u16::try_from(tag_hashes.len()).ok()?;
        let size = META + key.len() + tag_hashes.len() * 4 + headers + body.len();
        u32::try_from(size).ok()?;
        let key_end = META + key.len();
        let body_start = size - body.len();
        // Filled in place: an exact-size iterator allocates the block once, where building a
        // `Vec` first would allocate and free a second block per insert.
        let mut block = ThinArc::from_header_and_iter((), std::iter::repeat_n(0u8, size));
        block.with_arc_mut(|arc| {
            let mut out: &mut [u8] = triomphe::Arc::get_mut(arc)?.slice_mut();
            out.put_u64_le(serial);
            out.put_i64_le(encode_instant(timing.stored_at));
            for window in [
                timing.ttl,
                timing.stale_while_revalidate,
                timing.stale_if_error,
            ] {
                out.put_u32_le(millis(window));
            }
            out.put_u32_le(key_end as u32);
            out.put_u32_le(body_start as u32);
            out.put_u16_le(tag_count);
            out.put_u16_le(status);
            out.put_slice(key.as_bytes());
            for hash in tag_hashes {
                out.put_u32_le(*hash);
            }
            for (name, v) in lines() {
                out.put_slice(name);
                out.put_u8(b':');
                out.put_slice(v);
                out.put_u8(b'\n');
            }
            out.put_slice(body);
            debug_assert!(out.is_empty(), "pack: {} bytes left unwritten", out.len());
            Some(())
        })?;
        Some(StoredResponse { block })
    }

    /// The whole block: fixed header, key, tag hashes, header lines, body.
    fn bytes(&self) -> &[u8] {
        &self.block.slice
    }

    /// Whether this is a varying resource's marker rather than an answer.
    pub(crate) fn is_vary_marker(&self) -> bool {
        self.u16_at(AT_STATUS) == VARY_MARKER
    }

    /// The request headers a marker names (sorted, unique, lowercase, as [`Vary`] gave
    /// them); `None` for an answer.
    ///
    /// [`Vary`]: super::vary::Vary
    pub(crate) fn vary_names(&self) -> Option<Vec<HeaderName>> {
        if !self.is_vary_marker() {
            return None;
        }
        let lines = &self.bytes()[self.tags_end()..self.body_start()];
        let names = lines
            .split(|b| *b == b'\n')
            .filter_map(|line| line.strip_suffix(b":"))
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .collect();
        Some(names)
    }

    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes(self.bytes()[at..at + 2].try_into().unwrap_or_default())
    }

    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.bytes()[at..at + 4].try_into().unwrap_or_default())
    }

    fn u64_at(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.bytes()[at..at + 8].try_into().unwrap_or_default())
    }

    fn key_end(&self) -> usize {
        self.u32_at(AT_KEY_END) as usize
    }

    fn body_start(&self) -> usize {
        self.u32_at(AT_BODY_START) as usize
    }

    /// Where the tag hashes end and the header lines start.
    fn tags_end(&self) -> usize {
        self.key_end() + usize::from(self.u16_at(AT_TAG_COUNT)) * 4
    }

    /// Told apart from a later value under the same key when the tag index forgets it.
    pub(crate) fn serial(&self) -> u64 {
        self.u64_at(AT_SERIAL)
    }

    /// Whether `other` is this very block (a clone of the handle), not merely an equal one.
    pub fn same_block(&self, other: &StoredResponse) -> bool {
        self.block.heap_ptr() == other.block.heap_ptr()
    }

    /// The block's address and serial: what tells one stored block from another seen
    /// before, without holding it (an address alone may be reused once a block is freed).
    pub fn identity(&self) -> (usize, u64) {
        (self.block.heap_ptr() as usize, self.serial())
    }

    /// The key it is stored under (a variant key for a varying resource).
    pub fn key(&self) -> &str {
        // `pack` copied a `&str` there, so this never fails.
        std::str::from_utf8(&self.bytes()[META..self.key_end()]).unwrap_or("")
    }

    pub(crate) fn tag_hashes(&self) -> impl Iterator<Item = u32> + '_ {
        self.bytes()[self.key_end()..self.tags_end()]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()))
    }

    pub fn status(&self) -> StatusCode {
        // `pack` wrote a valid status there.
        StatusCode::from_u16(self.u16_at(AT_STATUS)).unwrap_or(StatusCode::OK)
    }

    /// The block as `Bytes` (one small allocation, no copy), to slice answers out of.
    fn shared(&self) -> Bytes {
        Bytes::from_owner(ArcBlock(self.block.clone()))
    }

    /// The body, sharing the block (no copy).
    pub fn body(&self) -> Bytes {
        self.shared().slice(self.body_start()..)
    }

    /// How many headers [`StoredResponse::headers`] yields.
    pub fn header_count(&self) -> usize {
        let lines = &self.bytes()[self.tags_end()..self.body_start()];
        lines.iter().filter(|b| **b == b'\n').count()
    }

    /// The stored headers; values share the block (no copy).
    pub fn headers(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        let base = self.tags_end();
        let lines = &self.bytes()[base..self.body_start()];
        let shared = if lines.is_empty() {
            Bytes::new()
        } else {
            self.shared()
        };
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
                let value = shared.slice(start + colon + 1..start + line.len() - 1);
                // Checked when it was first received; checked again rather than trusted.
                let value = HeaderValue::from_maybe_shared(value).ok()?;
                Some((name, value))
            })
    }

    pub fn timing(&self) -> Timing {
        let ms = |i: usize| Duration::from_millis(u64::from(self.u32_at(AT_WINDOWS + 4 * i)));
        Timing {
            stored_at: decode_instant(self.u64_at(AT_STORED) as i64),
            ttl: ms(0),
            stale_while_revalidate: ms(1),
            stale_if_error: ms(2),
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
        let rest = self.bytes().len() - self.key_end();
        u32::try_from(ENTRY_OVERHEAD.saturating_add(rest)).unwrap_or(u32::MAX)
    }
}

impl std::fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredResponse")
            .field("key", &self.key())
            .field("status", &self.status())
            .field("serial", &self.serial())
            .field("timing", &self.timing())
            .field("body_len", &(self.bytes().len() - self.body_start()))
            .finish_non_exhaustive()
    }
}

/// The block as a `Bytes` owner.
struct ArcBlock(ThinArc<(), u8>);

impl AsRef<[u8]> for ArcBlock {
    fn as_ref(&self) -> &[u8] {
        &self.0.slice
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
    fn an_entry_handle_stays_one_word() {
        // moka holds it inline in every entry: a word more moves moka's value node from the
        // 32-byte size class to the 48-byte one, 16 bytes per entry.
        let size = std::mem::size_of::<StoredResponse>();
        assert!(size <= 8, "StoredResponse grew to {size} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn pack_keeps_timing_status_serial_and_key() {
        let before = Instant::now();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let mut e = entry(10, 5, 60);
        e.status = StatusCode::NON_AUTHORITATIVE_INFORMATION;
        let stored = StoredResponse::pack("GET /k?a=1", &e, &[7], 42).expect("packs");
        assert_eq!(stored.key(), "GET /k?a=1");
        assert_eq!(stored.serial(), 42);
        assert_eq!(stored.status(), StatusCode::NON_AUTHORITATIVE_INFORMATION);
        assert_eq!(stored.timing(), e.timing(), "timing must survive packing");
        assert_eq!(stored.age(before), Duration::ZERO);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(
            stored.freshness(Instant::now()),
            e.freshness(Instant::now())
        );
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
            "content-length",
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
