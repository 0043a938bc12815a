//! Link rewriting and secret redaction of upstream answers. The upstream puts absolute links
//! in its JSON, sometimes with the caller's `access_token` in the query; clients must follow
//! them through the gateway and must never see the real token. It runs once per upstream
//! answer (the cache stores the result), so it is a byte scan, not a JSON parse.

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue};

/// What a redacted secret becomes.
const REDACTED: &[u8] = b"[redacted]";
/// Secrets shorter than this are not searched for: no real bearer token is that short, and
/// replacing a short string would corrupt ordinary words in the body.
const MIN_SECRET_LEN: usize = 8;
/// Bytes skipped per probe when looking for a needle's first byte.
const BLOCK: usize = 64;

/// Rewrites links from one upstream base to one public base.
///
/// Every link that starts with the upstream base (paging `next_url`/`prev_url`,
/// `action_links`) is moved to the public base and loses its `access_token` parameter. PHP
/// escapes slashes (`https:\/\/api.engagor.com\/...`), so both spellings are matched.
#[derive(Debug, Clone)]
pub struct Rewriter {
    upstream: Vec<u8>,
    upstream_escaped: Vec<u8>,
    /// What the two spellings share (`https:`), found first, then told apart.
    shared_prefix: usize,
    public: String,
    public_json: Vec<u8>,
    public_json_escaped: Vec<u8>,
}

impl Rewriter {
    /// `upstream_base` like `https://api.engagor.com`, `public_base` like
    /// `http://127.0.0.1:8080`; a trailing slash on either is ignored.
    pub fn new(upstream_base: &str, public_base: &str) -> Rewriter {
        let upstream = upstream_base.trim_end_matches('/').as_bytes().to_vec();
        let upstream_escaped = escape_slashes(&upstream);
        let shared_prefix = upstream
            .iter()
            .zip(&upstream_escaped)
            .take_while(|(a, b)| a == b)
            .count();
        let public = public_base.trim_end_matches('/').to_string();
        let public_json = json_escape(public.as_bytes());
        let public_json_escaped = escape_slashes(&public_json);
        Rewriter {
            upstream,
            upstream_escaped,
            shared_prefix,
            public,
            public_json,
            public_json_escaped,
        }
    }

    /// The rewriter of the form replicas share an answer in: links stay at the upstream's
    /// base (each replica has a public base of its own) and lose their `access_token`.
    /// [`Rewriter::localize`] of a replica's own rewriter turns that form into its own.
    pub fn neutral(upstream_base: &str) -> Rewriter {
        Rewriter::new(upstream_base, upstream_base)
    }

    /// An answer in the neutral form (see [`Rewriter::neutral`]: already redacted, its links
    /// at the upstream's base without `access_token`) as this rewriter's public base gives
    /// it: the links of body and headers moved there, `Content-Length` (if any) following
    /// the body. `None` when nothing changes.
    pub fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)> {
        let relinked = self.rewrite_links(body).map(Bytes::from);
        let linking = [header::LOCATION, header::CONTENT_LOCATION, header::LINK];
        if relinked.is_none() && !linking.iter().any(|name| headers.contains_key(name)) {
            return None;
        }
        let mut moved = headers.clone();
        self.rewrite_headers(&mut moved);
        if relinked.is_none() && moved == *headers {
            return None;
        }
        let mut headers = moved;
        let body = match relinked {
            Some(body) => {
                if headers.contains_key(header::CONTENT_LENGTH) {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
                }
                body
            }
            None => body.clone(),
        };
        Some((headers, body))
    }

    /// Rewrites the headers that point somewhere (`Location`, `Content-Location`, every
    /// target of `Link`): a client following one (paging by `Link`, say) must come back
    /// through the gateway and never see the real token in it. A value that is not text, or
    /// whose rewrite is no valid header value, is dropped rather than passed on unrewritten.
    pub fn rewrite_headers(&self, headers: &mut HeaderMap) {
        rewrite_header(headers, header::LOCATION, |v| self.rewrite_location(v));
        rewrite_header(headers, header::CONTENT_LOCATION, |v| {
            self.rewrite_location(v)
        });
        rewrite_header(headers, header::LINK, |v| self.rewrite_link(v));
    }

    /// Rewrites upstream links and redacts `secrets`; `None` when nothing changed.
    ///
    /// As defence in depth, any remaining occurrence of a token (raw, JSON-escaped or
    /// percent-encoded) becomes `[redacted]`. A body with nothing to change costs a few
    /// `memchr`-style passes and no allocation. Output stays valid JSON: a link ends at the
    /// first byte that cannot be part of it inside a JSON string (a quote, whitespace, or a
    /// backslash other than `\/`), and only whole query parameters are removed, so no escape
    /// sequence is ever cut.
    pub fn rewrite_body(&self, body: &Bytes, secrets: &[&str]) -> Option<Bytes> {
        let linked = self.rewrite_links(body);
        let current: &[u8] = linked.as_deref().unwrap_or(body);
        match redact(current, secrets) {
            Some(redacted) => Some(Bytes::from(redacted)),
            None => linked.map(Bytes::from),
        }
    }

    /// Rewrites a `Location` header: upstream links move to the public base, and any
    /// `access_token` parameter goes (also from relative links). `None` when unchanged.
    pub fn rewrite_location(&self, value: &str) -> Option<String> {
        let bytes = value.as_bytes();
        let mut out = Vec::with_capacity(bytes.len() + self.public.len());
        if bytes.starts_with(&self.upstream) && self.at_boundary(bytes, self.upstream.len()) {
            out.extend_from_slice(self.public.as_bytes());
            strip_access_token(&bytes[self.upstream.len()..], &mut out);
        } else if bytes.starts_with(b"/") && !bytes.starts_with(b"//") {
            strip_access_token(bytes, &mut out);
            if out == bytes {
                return None;
            }
        } else {
            return None;
        }
        // Only whole ASCII-delimited pieces of a valid string were copied.
        String::from_utf8(out).ok()
    }

    /// Rewrites a `Link` header (RFC 8288): every `<URI-reference>` in it is rewritten as a
    /// `Location` is, parameters and the rest of the text stay. `None` when unchanged.
    pub fn rewrite_link(&self, value: &str) -> Option<String> {
        let mut out = String::with_capacity(value.len() + self.public.len());
        let mut rest = value;
        let mut changed = false;
        while let Some(open) = rest.find('<') {
            let Some(close) = rest[open..].find('>').map(|c| open + c) else {
                break;
            };
            out.push_str(&rest[..=open]);
            let target = &rest[open + 1..close];
            match self.rewrite_location(target.trim()) {
                Some(rewritten) => {
                    out.push_str(&rewritten);
                    changed = true;
                }
                None => out.push_str(target),
            }
            out.push('>');
            rest = &rest[close + 1..];
        }
        out.push_str(rest);
        changed.then_some(out)
    }

    fn rewrite_links(&self, body: &[u8]) -> Option<Vec<u8>> {
        let prefix = &self.upstream[..self.shared_prefix];
        let mut out: Option<Vec<u8>> = None;
        let (mut copied, mut pos) = (0, 0);
        while let Some(at) = find(body, prefix, pos) {
            let rest = &body[at..];
            let (len, public) = if rest.starts_with(&self.upstream) {
                (self.upstream.len(), &self.public_json)
            } else if rest.starts_with(&self.upstream_escaped) {
                (self.upstream_escaped.len(), &self.public_json_escaped)
            } else {
                pos = at + 1;
                continue;
            };
            if !self.at_boundary(body, at + len) {
                pos = at + 1;
                continue;
            }
            let end = link_end(body, at + len);
            let out = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
            out.extend_from_slice(&body[copied..at]);
            out.extend_from_slice(public);
            strip_access_token(&body[at + len..end], out);
            copied = end;
            pos = end;
        }
        let mut out = out?;
        out.extend_from_slice(&body[copied..]);
        Some(out)
    }

    /// The base must end where a path, query or fragment starts, so
    /// `https://api.engagor.com.evil.example` is not taken for the upstream.
    fn at_boundary(&self, text: &[u8], after: usize) -> bool {
        match text.get(after) {
            None | Some(b'/' | b'?' | b'#' | b'"') => true,
            Some(b'\\') => text.get(after + 1) == Some(&b'/'),
            _ => false,
        }
    }
}

impl crate::cache::Localize for Rewriter {
    fn localize(&self, headers: &HeaderMap, body: &Bytes) -> Option<(HeaderMap, Bytes)> {
        Rewriter::localize(self, headers, body)
    }
}

/// Rewrites every value of the header `name` with `rewrite` (`None`: unchanged); see
/// [`Rewriter::rewrite_headers`].
fn rewrite_header(
    headers: &mut HeaderMap,
    name: HeaderName,
    rewrite: impl Fn(&str) -> Option<String>,
) {
    if !headers.contains_key(&name) {
        return;
    }
    let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
    headers.remove(&name);
    for value in values {
        let kept = match value.to_str() {
            Ok(text) => match rewrite(text) {
                Some(rewritten) => HeaderValue::try_from(rewritten).ok(),
                None => Some(value),
            },
            Err(_) => None,
        };
        if let Some(v) = kept {
            headers.append(&name, v);
        }
    }
}

/// Where a link that started before `from` ends inside a JSON string.
fn link_end(body: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < body.len() {
        match body[i] {
            b'"' | b' ' | b'\t' | b'\r' | b'\n' | b'<' | b'>' => return i,
            b'\\' if body.get(i + 1) != Some(&b'/') => return i,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
    body.len()
}

/// Copies path, query and fragment, leaving out every `access_token` parameter and
/// fixing up `?`/`&` (an emptied query loses its `?`).
fn strip_access_token(link: &[u8], out: &mut Vec<u8>) {
    let Some(q) = link.iter().position(|&b| b == b'?') else {
        out.extend_from_slice(link);
        return;
    };
    out.extend_from_slice(&link[..q]);
    let after = &link[q + 1..];
    let (query, fragment) = match after.iter().position(|&b| b == b'#') {
        Some(h) => after.split_at(h),
        None => (after, &[][..]),
    };
    let mut separator = b'?';
    for param in query.split(|&b| b == b'&') {
        if param.is_empty() || is_access_token(param) {
            continue;
        }
        out.push(separator);
        out.extend_from_slice(param);
        separator = b'&';
    }
    out.extend_from_slice(fragment);
}

fn is_access_token(param: &[u8]) -> bool {
    let name = param.split(|&b| b == b'=').next().unwrap_or_default();
    if name.eq_ignore_ascii_case(b"access_token") {
        return true;
    }
    // A percent-encoded name (`access%5Ftoken`) means the same to the upstream.
    name.contains(&b'%')
        && form_urlencoded::parse(name)
            .next()
            .is_some_and(|(key, _)| key.eq_ignore_ascii_case("access_token"))
}

/// Replaces every occurrence of every secret; `None` when none occurs. Each character of
/// a secret may appear literally, percent-encoded (`%2f`, `%2F`, any case) or as a JSON
/// escape (`\u002f`, `\/`, `\"`), mixed freely, so no spelling of a token gets through.
fn redact(body: &[u8], secrets: &[&str]) -> Option<Vec<u8>> {
    let matcher = Matcher::new(secrets);
    let mut out: Option<Vec<u8>> = None;
    let mut starts = matcher.starts_in(body);
    let (mut copied, mut i) = (0, 0);
    while let Some(at) = starts.next(&matcher, body, i) {
        if let Some(len) = matcher.match_at(body, at) {
            let out = out.get_or_insert_with(|| Vec::with_capacity(body.len()));
            out.extend_from_slice(&body[copied..at]);
            out.extend_from_slice(REDACTED);
            i = at + len;
            copied = i;
            continue;
        }
        i = at + 1;
    }
    let mut out = out?;
    out.extend_from_slice(&body[copied..]);
    Some(out)
}

/// Whether any spelling of any secret (as [`redact`] finds them) occurs in `text`.
pub fn carries_secret(text: &[u8], secrets: &[&str]) -> bool {
    let matcher = Matcher::new(secrets);
    let mut starts = matcher.starts_in(text);
    let mut i = 0;
    while let Some(at) = starts.next(&matcher, text, i) {
        if matcher.match_at(text, at).is_some() {
            return true;
        }
        i = at + 1;
    }
    false
}

/// One character of the text at `at`, decoded: a literal byte, `%XX`, `\uXXXX` (ASCII
/// only), or a JSON two-byte escape; the byte and how many text bytes it took.
fn unit_at(text: &[u8], at: usize) -> Option<(u8, usize)> {
    let hex = |b: u8| (b as char).to_digit(16);
    let first = *text.get(at)?;
    match first {
        b'%' => {
            let hi = hex(*text.get(at + 1)?);
            let lo = text.get(at + 2).and_then(|&b| hex(b));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                return Some(((hi * 16 + lo) as u8, 3));
            }
        }
        b'\\' => match text.get(at + 1) {
            Some(&b @ (b'/' | b'"' | b'\\')) => return Some((b, 2)),
            Some(b'u') => {
                let digits = text.get(at + 2..at + 6)?;
                let value = digits
                    .iter()
                    .try_fold(0u32, |acc, &b| hex(b).map(|d| acc * 16 + d));
                if let Some(value @ 0..=0x7f) = value {
                    return Some((value as u8, 6));
                }
            }
            _ => {}
        },
        _ => {}
    }
    Some((first, 1))
}

/// Finds secrets in any mix of spellings. Only positions whose byte can start one (a
/// secret's first byte, `%` or `\\`) are decoded, and then only `MIN_SECRET_LEN`
/// characters before a map lookup by that prefix, so the cost stays a small constant per
/// byte however many tokens were held.
struct Matcher<'s> {
    starts: [bool; 256],
    /// The bytes `starts` holds, each once.
    start_bytes: Vec<u8>,
    by_prefix: std::collections::HashMap<u64, Vec<&'s [u8]>>,
}

impl<'s> Matcher<'s> {
    fn new(secrets: &[&'s str]) -> Matcher<'s> {
        let mut starts = [false; 256];
        let mut by_prefix: std::collections::HashMap<u64, Vec<&'s [u8]>> =
            std::collections::HashMap::new();
        let mut secrets: Vec<&[u8]> = secrets
            .iter()
            .map(|s| s.as_bytes())
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .collect();
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let mut start_bytes = Vec::new();
        let mut start = |b: u8| {
            if !std::mem::replace(&mut starts[usize::from(b)], true) {
                start_bytes.push(b);
            }
        };
        for secret in secrets {
            start(secret[0]);
            by_prefix
                .entry(prefix_word(secret))
                .or_default()
                .push(secret);
        }
        if !by_prefix.is_empty() {
            start(b'%');
            start(b'\\');
        }
        Matcher {
            starts,
            start_bytes,
            by_prefix,
        }
    }

    /// The positions in `text` whose byte can start a secret, for a scan that skips to
    /// them instead of trying every position.
    fn starts_in(&self, text: &[u8]) -> Starts {
        // A header value or a short body: a table load per byte costs less than setting up.
        if text.len() < SHORT_TEXT {
            return Starts::Table;
        }
        let groups: Vec<[u8; 3]> = self
            .start_bytes
            .chunks(3)
            .map(|c| [c[0], c[c.len().min(2) - 1], c[c.len() - 1]])
            .collect();
        let next = groups
            .iter()
            .map(|&[a, b, c]| memchr::memchr3(a, b, c, text))
            .collect();
        Starts::Groups { groups, next }
    }

    /// The length of text a secret takes at `at`, if one starts there.
    fn match_at(&self, text: &[u8], at: usize) -> Option<usize> {
        if !self.starts[*text.get(at)? as usize] {
            return None;
        }
        let mut word = [0u8; MIN_SECRET_LEN];
        let mut pos = at;
        for slot in &mut word {
            let (b, len) = unit_at(text, pos)?;
            *slot = b;
            pos += len;
        }
        let candidates = self.by_prefix.get(&u64::from_le_bytes(word))?;
        candidates
            .iter()
            .find_map(|secret| matches(text, at, secret))
    }
}

/// Where the bytes that can start a secret occur, found with `memchr3` (SIMD) for up to
/// three bytes at a time: a body without them costs a fraction of an instruction per byte.
enum Starts {
    /// Each byte looked up in [`Matcher`]'s table.
    Table,
    Groups {
        groups: Vec<[u8; 3]>,
        /// Per group, its next occurrence at or after the last position asked for.
        next: Vec<Option<usize>>,
    },
}

/// Texts shorter than this are scanned by table.
const SHORT_TEXT: usize = 256;

impl Starts {
    /// The first position at or after `from` (not below the last `from`) holding one of
    /// the bytes.
    fn next(&mut self, matcher: &Matcher<'_>, text: &[u8], from: usize) -> Option<usize> {
        let Starts::Groups { groups, next } = self else {
            let rest = text.get(from..)?;
            return rest
                .iter()
                .position(|&b| matcher.starts[usize::from(b)])
                .map(|i| from + i);
        };
        let mut first: Option<usize> = None;
        for (&[a, b, c], next) in groups.iter().zip(next.iter_mut()) {
            if next.is_some_and(|at| at < from) {
                *next = text
                    .get(from..)
                    .and_then(|rest| memchr::memchr3(a, b, c, rest))
                    .map(|i| from + i);
            }
            if let Some(at) = *next {
                first = Some(first.map_or(at, |f| f.min(at)));
            }
        }
        first
    }
}

/// The text length `secret` takes at `at`, each character literal or escaped.
fn matches(text: &[u8], at: usize, secret: &[u8]) -> Option<usize> {
    let mut pos = at;
    for &want in secret {
        match unit_at(text, pos)? {
            (b, len) if b == want => pos += len,
            // An escape that decodes to something else may still be the literal character.
            _ if text[pos] == want => pos += 1,
            _ => return None,
        }
    }
    Some(pos - at)
}

/// The first `MIN_SECRET_LEN` bytes of `at` as one word (`at` is at least that long).
fn prefix_word(at: &[u8]) -> u64 {
    let mut word = [0u8; MIN_SECRET_LEN];
    word.copy_from_slice(&at[..MIN_SECRET_LEN]);
    u64::from_le_bytes(word)
}

/// The first occurrence of `needle` at or after `from`. Whole blocks without the needle's
/// first byte are skipped with `contains`, which std implements with a word-at-a-time memchr.
fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut start = from;
    while start <= last_start {
        let end = (start + BLOCK).min(last_start + 1);
        let block = &hay[start..end];
        if block.contains(&first) {
            for (offset, &b) in block.iter().enumerate() {
                let i = start + offset;
                if b == first && hay[i..].starts_with(needle) {
                    return Some(i);
                }
            }
        }
        start = end;
    }
    None
}

fn escape_slashes(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    for &b in text {
        if b == b'/' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out
}

/// Escapes what JSON requires inside a string (quotes, backslashes, control bytes).
fn json_escape(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for &b in text {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            0..=0x1f => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UP: &str = "https://api.engagor.com";
    const PUBLIC: &str = "http://127.0.0.1:8080";
    const TOKEN: &str = "tok-4f9a1c2e77b0";

    fn rewriter() -> Rewriter {
        Rewriter::new("https://api.engagor.com/", "http://127.0.0.1:8080/")
    }

    fn rewritten(body: &str, secrets: &[&str]) -> String {
        let out = rewriter().rewrite_body(&Bytes::from(body.to_string()), secrets);
        let out = out.unwrap_or_else(|| panic!("expected a rewrite of {body}"));
        String::from_utf8(out.to_vec()).expect("UTF-8 output")
    }

    fn link_of(body: &str, key: &str) -> String {
        let value: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("expected valid JSON ({e}): {body}"));
        value[key].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn access_token_is_removed_wherever_it_sits() {
        let cases = [
            (
                "/1/inbox/mentions?access_token=T&page_token=p2&limit=20",
                "/1/inbox/mentions?page_token=p2&limit=20",
            ),
            (
                "/1/inbox/mentions?page_token=p2&access_token=T&limit=20",
                "/1/inbox/mentions?page_token=p2&limit=20",
            ),
            (
                "/1/inbox/mentions?page_token=p2&limit=20&access_token=T",
                "/1/inbox/mentions?page_token=p2&limit=20",
            ),
            ("/me?access_token=T", "/me"),
            ("/me?access_token=T#top", "/me#top"),
            ("/me?access%5Ftoken=T&x=1", "/me?x=1"),
            ("/me", "/me"),
            ("", ""),
        ];
        for (path, want) in cases {
            let body = format!(r#"{{"next_url":"{UP}{path}","n":1}}"#);
            let out = rewritten(&body, &[]);
            assert_eq!(
                link_of(&out, "next_url"),
                format!("{PUBLIC}{want}"),
                "for {path:?}"
            );
            assert_eq!(
                link_of(&out, "n"),
                "",
                "expected other fields intact in {out}"
            );
        }
    }

    #[test]
    fn php_escaped_slashes_are_matched_and_kept() {
        let body = r#"{"paging":{"prev_url":null,"next_url":"https:\/\/api.engagor.com\/1\/inbox\/mentions?access_token=T&page_token=abc"}}"#;
        let out = rewritten(body, &[]);
        assert!(
            out.contains(
                r#""next_url":"http:\/\/127.0.0.1:8080\/1\/inbox\/mentions?page_token=abc""#
            ),
            "expected an escaped public link without the token, saw {out}"
        );
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(
            value["paging"]["next_url"], "http://127.0.0.1:8080/1/inbox/mentions?page_token=abc",
            "expected the decoded link to point at the gateway"
        );
    }

    #[test]
    fn action_links_are_rewritten_and_other_hosts_left_alone() {
        let body = format!(
            r#"{{"action_links":[{{"type":"reply","link":"{UP}/9/publisher/add/?access_token=T&type=reply&id=1"}}],
            "permalink":"https://twitter.com/x/status/1?access_token=keep",
            "lookalike":"https://api.engagor.com.evil.example/x?access_token=keep",
            "text":"see https://api.engagor.comedy.example"}}"#
        );
        let out = rewritten(&body, &[]);
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(
            value["action_links"][0]["link"],
            format!("{PUBLIC}/9/publisher/add/?type=reply&id=1"),
            "expected the action link moved to the gateway"
        );
        assert_eq!(
            value["permalink"], "https://twitter.com/x/status/1?access_token=keep",
            "expected other hosts untouched"
        );
        assert_eq!(
            value["lookalike"], "https://api.engagor.com.evil.example/x?access_token=keep",
            "expected a look-alike host untouched"
        );
        assert_eq!(
            value["text"], "see https://api.engagor.comedy.example",
            "expected text untouched"
        );
    }

    #[test]
    fn secrets_are_redacted_in_every_spelling() {
        let slashy = "abc/def+ghi=jkl";
        let body = format!(
            r#"{{"echo":"{TOKEN}","debug":"Bearer {TOKEN}!","esc":"abc\/def+ghi=jkl","pct":"x?t=abc%2Fdef%2Bghi%3Djkl","short":"tiny"}}"#
        );
        let out = rewritten(&body, &[TOKEN, slashy, "tiny"]);
        let value: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(value["echo"], "[redacted]", "expected a raw token redacted");
        assert_eq!(
            value["debug"], "Bearer [redacted]!",
            "expected an embedded token redacted"
        );
        assert_eq!(
            value["esc"], "[redacted]",
            "expected a JSON-escaped token redacted"
        );
        assert_eq!(
            value["pct"], "x?t=[redacted]",
            "expected a percent-encoded token redacted"
        );
        assert_eq!(value["short"], "tiny", "expected too-short secrets ignored");
    }

    #[test]
    fn a_token_in_another_parameter_of_a_link_is_redacted_too() {
        let body = format!(r#"{{"next_url":"{UP}/me?token={TOKEN}&access_token={TOKEN}"}}"#);
        let out = rewritten(&body, &[TOKEN]);
        assert_eq!(
            link_of(&out, "next_url"),
            format!("{PUBLIC}/me?token=[redacted]"),
            "in {out}"
        );
    }

    #[test]
    fn nothing_to_change_returns_none() {
        let body = Bytes::from_static(
            br#"{"meta":{"code":200},"response":{"id":1,"name":"https://example.com"}}"#,
        );
        assert!(
            rewriter().rewrite_body(&body, &[TOKEN]).is_none(),
            "expected None for a body without links or secrets"
        );
        assert!(
            rewriter().rewrite_body(&Bytes::new(), &[TOKEN]).is_none(),
            "expected None for empty"
        );
    }

    #[test]
    fn random_bodies_stay_valid_json_and_never_leak() {
        let pieces = [
            format!("{UP}/1/x?access_token={TOKEN}&a=1"),
            format!("{UP}/1/x?a=1&access_token={TOKEN}"),
            format!("{UP}?access_token={TOKEN}"),
            UP.to_string(),
            format!("prefix {TOKEN} suffix"),
            "https://other.example/?access_token=zzz".to_string(),
            "plain text with \"quotes\" and \\ backslashes / slashes".to_string(),
            "h".to_string(),
        ];
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..300 {
            let mut list = Vec::new();
            for _ in 0..rng.usize(1..8) {
                let piece = &pieces[rng.usize(..pieces.len())];
                list.push(serde_json::Value::String(piece.clone()));
            }
            let value = serde_json::json!({"data": list, "n": round});
            let mut text = value.to_string();
            if rng.bool() {
                text = text.replace('/', "\\/");
            }
            let body = Bytes::from(text.clone());
            let out = rewriter().rewrite_body(&body, &[TOKEN]).unwrap_or(body);
            let parsed: Result<serde_json::Value, _> = serde_json::from_slice(&out);
            assert!(
                parsed.is_ok(),
                "round {round}: expected valid JSON from {text}"
            );
            let out = String::from_utf8_lossy(&out);
            assert!(
                !out.contains(TOKEN),
                "round {round}: expected no token in {out}"
            );
            assert!(
                !out.contains("api.engagor.com"),
                "round {round}: expected no upstream link in {out}"
            );
        }
    }

    #[test]
    fn link_headers_are_rewritten() {
        let r = Rewriter::new(UP, "http://gw:8080");
        let link = format!(
            "<{UP}/1/inbox/mentions?page=2&access_token=T>; rel=\"next\", \
             <{UP}/1/inbox/mentions?page=0>; rel=\"prev\", <https://elsewhere.example/x>; rel=x"
        );
        assert_eq!(
            r.rewrite_link(&link).as_deref(),
            Some(
                "<http://gw:8080/1/inbox/mentions?page=2>; rel=\"next\", \
                 <http://gw:8080/1/inbox/mentions?page=0>; rel=\"prev\", \
                 <https://elsewhere.example/x>; rel=x"
            ),
            "expected every upstream target moved to the gateway without its access_token"
        );
        assert_eq!(
            r.rewrite_link("</me?access_token=T&a=1>; rel=self")
                .as_deref(),
            Some("</me?a=1>; rel=self"),
            "expected the token dropped from a relative target"
        );
        assert_eq!(
            r.rewrite_link("<https://elsewhere.example/x>; rel=x"),
            None,
            "expected other hosts' links left alone"
        );
        assert_eq!(r.rewrite_link("<unclosed"), None);
    }

    #[test]
    fn location_headers_are_rewritten() {
        let r = rewriter();
        assert_eq!(
            r.rewrite_location(&format!("{UP}/me?access_token=T&x=1")),
            Some(format!("{PUBLIC}/me?x=1")),
            "expected an absolute upstream Location moved to the gateway"
        );
        assert_eq!(
            r.rewrite_location(UP),
            Some(PUBLIC.to_string()),
            "expected the bare base moved"
        );
        assert_eq!(
            r.rewrite_location("/me?access_token=T"),
            Some("/me".to_string()),
            "expected the token dropped from a relative Location"
        );
        assert_eq!(
            r.rewrite_location("/me?x=1"),
            None,
            "expected an unchanged relative Location"
        );
        assert_eq!(
            r.rewrite_location("https://app.engagor.com/oauth/authorize/"),
            None,
            "expected other hosts untouched"
        );
        assert_eq!(
            r.rewrite_location("https://api.engagor.com.evil.example/"),
            None,
            "expected a look-alike host untouched"
        );
    }

    /// The proxy takes either route: with a shared tier, the neutral form then this
    /// replica's own; without one, the direct rewrite in one pass. Both must give the
    /// same bytes and headers.
    #[test]
    fn the_neutral_form_localized_is_what_each_replica_would_have_made() {
        let body = format!(
            r#"{{"paging":{{"next_url":"{UP}/1/inbox/mentions?access_token={TOKEN}&page_token=p2"}},"esc":"https:\/\/api.engagor.com\/me?access_token=T","echo":"{TOKEN}"}}"#
        );
        let body = Bytes::from(body);
        let mut headers = HeaderMap::new();
        headers.insert(
            header::LINK,
            format!("<{UP}/me?access_token=T&a=1>; rel=next")
                .parse()
                .unwrap(),
        );
        headers.insert(
            header::LOCATION,
            format!("/1/inbox/mentions?access_token={TOKEN}&page=2")
                .parse()
                .unwrap(),
        );
        headers.insert(
            header::CONTENT_LOCATION,
            format!("{UP}/1/inbox/mentions?page=2").parse().unwrap(),
        );
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let neutral = Rewriter::neutral(UP);
        let shared = neutral
            .rewrite_body(&body, &[TOKEN])
            .expect("a neutral rewrite");
        let text = String::from_utf8_lossy(&shared);
        assert!(
            text.contains(&format!("{UP}/1/inbox/mentions?page_token=p2"))
                && !text.contains("access_token")
                && !text.contains(TOKEN),
            "expected upstream links without a token in the neutral form, saw {text}"
        );
        let mut shared_headers = headers.clone();
        neutral.rewrite_headers(&mut shared_headers);
        for public in ["http://a.example:1", "https://b.example/gw"] {
            let direct = Rewriter::new(UP, public);
            let want = direct
                .rewrite_body(&body, &[TOKEN])
                .expect("a direct rewrite");
            let (local_headers, local) = direct
                .localize(&shared_headers, &shared)
                .expect("links to move");
            assert_eq!(local, want, "for {public}");
            assert_eq!(
                local_headers[header::LINK],
                format!("<{public}/me?a=1>; rel=next"),
                "for {public}"
            );
            assert_eq!(
                local_headers[header::CONTENT_LENGTH],
                local.len().to_string(),
                "expected Content-Length to follow the body for {public}"
            );
            let mut one_pass = headers.clone();
            direct.rewrite_headers(&mut one_pass);
            let mut two_pass = local_headers.clone();
            for h in [&mut one_pass, &mut two_pass] {
                h.remove(header::CONTENT_LENGTH);
            }
            assert_eq!(
                one_pass, two_pass,
                "expected the one-pass headers to be the localized neutral ones for {public}"
            );
            assert_eq!(
                one_pass[header::LOCATION],
                "/1/inbox/mentions?page=2",
                "expected the token gone from a relative Location for {public}"
            );
        }
        let plain = Bytes::from_static(br#"{"id":1}"#);
        assert!(
            rewriter().localize(&HeaderMap::new(), &plain).is_none(),
            "expected nothing to localize without links"
        );
    }

    #[test]
    fn many_secrets_are_redacted_in_one_pass_like_a_few() {
        let secrets: Vec<String> = (0..40).map(|i| format!("token-{i:04}-abcdefgh")).collect();
        let exposed: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let body = format!(
            r#"{{"a":"{}","b":"x{}y","c":"token-0003-abcdefg","d":"{}"}}"#,
            secrets[0], secrets[39], "token-0007-abcdefgh"
        );
        let many = redact(body.as_bytes(), &exposed).expect("a redaction");
        let text = String::from_utf8(many).expect("UTF-8");
        assert_eq!(
            text,
            r#"{"a":"[redacted]","b":"x[redacted]y","c":"token-0003-abcdefg","d":"[redacted]"}"#
        );
        assert_eq!(redact(b"nothing here at all", &exposed), None);
        let few = redact(body.as_bytes(), &exposed[..2]).expect("a redaction");
        assert!(!String::from_utf8_lossy(&few).contains(&secrets[0]));
    }

    #[test]
    fn tokens_with_many_first_bytes_are_all_found_in_every_spelling() {
        // Seven first bytes, plus `%` and `\\`: the start bytes span three memchr3 groups.
        let secrets = [
            "alpha-token-1",
            "bravo-token-2",
            "charlie-tok-3",
            "delta-token-4",
            "echo-token-55",
            "fox-trot-66",
            "golf-token-7",
        ];
        let spellings = |s: &str| {
            let (first, rest) = s.split_at(1);
            [
                s.to_string(),
                format!("%{:02X}{rest}", first.as_bytes()[0]),
                format!("\\u00{:02x}{rest}", first.as_bytes()[0]),
                s.replace('-', "%2d"),
            ]
        };
        for (n, secret) in secrets.iter().enumerate() {
            for spelled in spellings(secret) {
                // Other secrets' first bytes before and after it, so each group's next
                // occurrence moves past the others'.
                let body = format!(r#"{{"a":"gfedcba%x\\q","t":"{spelled}","b":"abcdefg"}}"#);
                let redacted = redact(body.as_bytes(), &secrets).expect("a redaction");
                assert_eq!(
                    String::from_utf8(redacted).unwrap(),
                    r#"{"a":"gfedcba%x\\q","t":"[redacted]","b":"abcdefg"}"#,
                    "secret {n} spelled {spelled}"
                );
                assert!(carries_secret(body.as_bytes(), &secrets), "{spelled}");
            }
        }
        assert!(!carries_secret(b"abcdefg %% \\\\ alpha-token-", &secrets));
    }
}
