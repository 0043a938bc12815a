//! Link rewriting and secret redaction of upstream answers.
//!
//! The upstream puts absolute links in its JSON (paging `next_url`/`prev_url`,
//! `action_links`), sometimes with the caller's `access_token` in the query. Clients must
//! follow them through the gateway and must never see the real token, so every link that
//! starts with the upstream base is moved to the public base and loses its `access_token`
//! parameter. PHP escapes slashes (`https:\/\/api.engagor.com\/...`), so both spellings are
//! matched. As defence in depth, any remaining occurrence of a token (raw, JSON-escaped or
//! percent-encoded) becomes `[redacted]`.
//!
//! This runs once per upstream answer (the cache stores the result), so it is a byte scan,
//! not a JSON parse: a body with nothing to change costs a few `memchr`-style passes and no
//! allocation. Output stays valid JSON: a link ends at the first byte that cannot be part
//! of it inside a JSON string (a quote, whitespace, or a backslash other than `\/`), and
//! only whole query parameters are removed, so no escape sequence is ever cut.

use bytes::Bytes;

/// What a redacted secret becomes.
const REDACTED: &[u8] = b"[redacted]";
/// Secrets shorter than this are not searched for: no real bearer token is that short, and
/// replacing a short string would corrupt ordinary words in the body.
const MIN_SECRET_LEN: usize = 8;
/// Bytes skipped per probe when looking for a needle's first byte.
const BLOCK: usize = 64;

/// Rewrites links from one upstream base to one public base.
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

    /// Rewrites upstream links and redacts `secrets`; `None` when nothing changed.
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

/// Replaces every spelling of every secret; `None` when none occurs.
fn redact(body: &[u8], secrets: &[&str]) -> Option<Vec<u8>> {
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for secret in secrets.iter().filter(|s| s.len() >= MIN_SECRET_LEN) {
        let raw = secret.as_bytes().to_vec();
        let json = json_escape(&raw);
        let json_slashes = escape_slashes(&json);
        let percent: String = form_urlencoded::byte_serialize(&raw).collect();
        for needle in [raw, json, json_slashes, percent.into_bytes()] {
            if !needles.contains(&needle) {
                needles.push(needle);
            }
        }
    }
    // Longest first, so a secret that contains another is replaced whole.
    needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
    let mut current: Option<Vec<u8>> = None;
    for needle in &needles {
        let text = current.as_deref().unwrap_or(body);
        if let Some(replaced) = replace_all(text, needle, REDACTED) {
            current = Some(replaced);
        }
    }
    current
}

fn replace_all(text: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    let mut at = find(text, needle, 0)?;
    let mut out = Vec::with_capacity(text.len());
    let mut copied = 0;
    loop {
        out.extend_from_slice(&text[copied..at]);
        out.extend_from_slice(with);
        copied = at + needle.len();
        match find(text, needle, copied) {
            Some(next) => at = next,
            None => break,
        }
    }
    out.extend_from_slice(&text[copied..]);
    Some(out)
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
