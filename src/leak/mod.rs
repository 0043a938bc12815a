//! Gateway keys where none belongs: the last check before anything is sent upstream or
//! logged. A client key that reached the upstream or a log line would be a credential
//! handed out, so every value that would leave the gateway (a forwarded request, and the
//! tokens the gateway sends: access tokens as `Authorization`, refresh tokens to the OAuth
//! endpoint) is searched for the caller's key and for every configured one, in any spelling
//! a reader could decode; [`KeyScan`] says how, and why the work stays bounded.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use crate::auth::Clients;

mod memo;
mod spelled;

pub use memo::NotKeys;
pub use spelled::Spellings;

/// The configured keys, known only by their SHA-256: the clients of a request, or the
/// digests the token manager holds.
pub trait KeySet {
    /// Whether `candidate` is one of the keys.
    fn holds(&self, candidate: &[u8]) -> bool;
    /// No key at all (anonymous mode): nothing to search for.
    fn is_empty(&self) -> bool;
    /// The [`Spellings`] of every key known in full (not only by its digest), if any.
    fn spellings(&self) -> Option<Arc<Spellings>> {
        None
    }
    /// Whether `key` is one of those known in full, whose spellings are kept with it.
    fn knows(&self, key: &[u8]) -> bool {
        let _ = key;
        false
    }
}

impl KeySet for Clients {
    fn holds(&self, candidate: &[u8]) -> bool {
        self.is_some_key(candidate)
    }

    fn is_empty(&self) -> bool {
        self.is_open()
    }

    /// Every key a client has authenticated with (this configuration's), spelled.
    fn spellings(&self) -> Option<Arc<Spellings>> {
        self.proven_spellings()
    }

    fn knows(&self, key: &[u8]) -> bool {
        self.is_proven(key)
    }
}

impl KeySet for [[u8; 32]] {
    fn holds(&self, candidate: &[u8]) -> bool {
        let digest = ring::digest::digest(&ring::digest::SHA256, candidate);
        self.iter().any(|d| d.as_slice() == digest.as_ref())
    }

    fn is_empty(&self) -> bool {
        <[[u8; 32]]>::is_empty(self)
    }
}

/// Shorter candidates are not hashed (a key that short is guessed faster than found). A
/// configured key shorter than this is found only when it is the caller's own.
pub const MIN_KEY: usize = 4;
/// Longer runs are not keys anyone types or generates.
pub const MAX_KEY: usize = 256;
/// Percent-decodings tried after the raw bytes, at most: decoding stops earlier at a
/// fixpoint (no escape left, or one more decoding changes nothing). Eight layers are more
/// than any reader undoes by accident; a value encoded deeper is refused by nothing here,
/// but no reader decodes it back either without meaning to.
const MAX_LAYERS: usize = 8;
/// Keys shorter than this are not searched in their base64 and hex spellings: the
/// spelling of a shorter one is short enough to turn up by chance in ordinary text.
pub const MIN_SPELLED_KEY: usize = 8;
/// How many punctuation cuts one candidate may span: a key holding more of `- . _ ~ + / =`
/// than one less than this is found only as a whole token, not inside a longer one.
const MAX_SPAN: usize = 8;

/// Finds gateway keys in values about to leave the gateway.
///
/// One matcher reads every value that would leave the gateway (forwarded headers, the
/// query, the body, the upstream and refresh tokens) and the client's `X-Request-Id`
/// (echoed, logged and forwarded). The caller's own key is searched as a substring, each
/// byte raw or percent-encoded, whatever its length. Every configured key (the caller's
/// and all others', known only as SHA-256) is found by hashing: a value is cut into tokens
/// at the bytes a key cannot contain, each token into candidates at its punctuation
/// (`KEY.x`, `x=KEY`, `KEY==`, `-KEY.`), and each candidate of `MIN_KEY` to `MAX_KEY`
/// bytes is hashed and looked up.
///
/// A key, for this search, is letters, digits and `- . _ ~ + / =`, which the base64 keys
/// the README suggests are. Values are read raw and percent-decoded up to `MAX_LAYERS`
/// times, each layer also with `+` read as a space the way form decoding does
/// (`note=see+KEY+now`); JSON bodies also once parsed, escapes undone; bodies of any type
/// also as UTF-16 and UTF-32 (either byte order, every alignment, BOM or not); every value
/// also with its JSON string escapes undone along with its percent escapes, in any order
/// (`in_unescaped`: JSON carried in a form field, part, query value or header).
/// The work is bounded:
/// each token is cut at most `MAX_SPAN` times per start, each byte of a value is hashed a
/// small constant number of times per layer, and values are bounded by the body and head
/// limits.
pub struct KeyScan<'a, K: KeySet + ?Sized = Clients> {
    keys: &'a K,
    own: Option<&'a str>,
    /// The caller's key when it is not one `keys` knows in full (whose spellings are made
    /// once and kept with it): only such a key is spelled here, once per scan.
    own_unknown: Option<&'a [u8]>,
    /// The caller's key spelled, made on the first value scanned.
    own_spelled: OnceLock<Spellings>,
    /// The spellings of the keys `keys` knows in full, fetched on the first value scanned.
    known: OnceLock<Option<Arc<Spellings>>>,
}

impl<'a, K: KeySet + ?Sized> KeyScan<'a, K> {
    /// A scan for `keys`, and for `own` (the caller's key, also when shorter than
    /// `MIN_KEY`) as a substring.
    pub fn new(keys: &'a K, own: Option<&'a str>) -> KeyScan<'a, K> {
        let own = own.filter(|k| !k.is_empty());
        KeyScan {
            keys,
            own,
            own_unknown: own.map(str::as_bytes).filter(|k| !keys.knows(k)),
            own_spelled: OnceLock::new(),
            known: OnceLock::new(),
        }
    }

    /// Whether `text` holds the caller's key or any configured key.
    pub fn in_value(&self, text: &[u8]) -> bool {
        self.in_text(text) || self.in_unescaped(text)
    }

    /// [`KeyScan::in_value`] but for JSON escapes: the bytes raw and percent-decoded.
    fn in_text(&self, text: &[u8]) -> bool {
        self.own.is_some_and(|k| carries_key(text, k)) || self.hashed_in(text)
    }

    /// Whether `text` (one layer of a value) holds the base64 or hex [`Spellings`] of the
    /// caller's key or of another key known in full.
    /// An authenticated caller's key is one of those known in full, searched with the
    /// others in one pass ([`KeySet::spellings`]); another is spelled here.
    fn spelled_in(&self, text: &[u8]) -> bool {
        let own = self.own_unknown;
        own.is_some_and(|k| {
            self.own_spelled
                .get_or_init(|| Spellings::of(k))
                .in_text(text)
        }) || self
            .known
            .get_or_init(|| self.keys.spellings())
            .as_ref()
            .is_some_and(|s| s.in_text(text))
    }

    /// Whether a request body of any content type holds a key: its bytes as they are
    /// ([`KeyScan::in_value`]), as JSON ([`KeyScan::in_json`]), and, when it holds a zero
    /// byte at all (UTF-16 or UTF-32 text of ASCII does), each UTF-16 and UTF-32 reading of
    /// it. Only writes
    /// carry a body, so reads never pay for this.
    pub fn in_body(&self, body: &[u8]) -> bool {
        if self.in_body_bytes(body) || self.in_json(without_bom(body)) {
            return true;
        }
        if !body.contains(&0) {
            return false;
        }
        wide_views(body).any(|view| self.in_value(&view) || self.in_json(&view))
    }

    /// Whether a JSON document holds a key in any string or member name once unescaped
    /// (`"\u0074est-key"`), read by [`KeyScan::in_value`]. Not JSON: `false` (the raw
    /// bytes are read by `in_value`).
    pub fn in_json(&self, body: &[u8]) -> bool {
        fn holds<K: KeySet + ?Sized>(scan: &KeyScan<'_, K>, value: &serde_json::Value) -> bool {
            match value {
                serde_json::Value::String(s) => scan.in_value(s.as_bytes()),
                serde_json::Value::Array(items) => items.iter().any(|v| holds(scan, v)),
                serde_json::Value::Object(members) => members
                    .iter()
                    .any(|(name, v)| scan.in_value(name.as_bytes()) || holds(scan, v)),
                _ => false,
            }
        }
        serde_json::from_slice::<serde_json::Value>(body).is_ok_and(|v| holds(self, &v))
    }

    fn hashed_in(&self, text: &[u8]) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let mut layer = Cow::Borrowed(text);
        for depth in 0..=MAX_LAYERS {
            if self.key_token_in(&layer) || self.spelled_in(&layer) {
                return true;
            }
            // `+` is a key byte and a form's space: read both ways.
            if layer.contains(&b'+') && self.key_token_in(&plus_as_space(&layer)) {
                return true;
            }
            if depth == MAX_LAYERS || !layer.contains(&b'%') {
                break;
            }
            let next = percent_decoded(&layer);
            // A fixpoint: `%` left only in escapes that are none (`100%`, `%zz`).
            if next.len() == layer.len() {
                break;
            }
            layer = Cow::Owned(next);
        }
        false
    }

    fn key_token_in(&self, text: &[u8]) -> bool {
        tokens(text).any(|t| candidates(t).any(|c| self.keys.holds(c)))
    }

    /// A body's bytes read as [`KeyScan::in_value`] reads a value, but JSON-unescaped only
    /// when the body is no JSON document: a JSON body's strings are read unescaped by
    /// [`KeyScan::in_json`] (and each again by `in_value`), so unescaping its raw bytes too
    /// would find nothing more and double what every JSON body with an escape costs.
    fn in_body_bytes(&self, body: &[u8]) -> bool {
        let json = || serde_json::from_slice::<serde::de::IgnoredAny>(without_bom(body)).is_ok();
        self.in_text(body) || (!json() && self.in_unescaped(body))
    }

    /// Whether `text` holds a key once its JSON escapes are undone along with its percent
    /// escapes, in any order, over up to `MAX_UNESCAPES` passes ([`unescaped_views`]): JSON
    /// in a form field, a multipart part, a query value or a header, read by an upstream
    /// that decodes the one and then parses the other (`updates=%7B%22n%22%3A%22a%5C%2Fb`,
    /// `{"n":"\u0061"}`). Each view is read as [`KeyScan::in_value`] reads a layer.
    fn in_unescaped(&self, text: &[u8]) -> bool {
        unescaped_views(text).any(|view| {
            self.own.is_some_and(|k| carries_key(&view, k))
                || (!self.keys.is_empty()
                    && (self.key_token_in(&view)
                        || (view.contains(&b'+') && self.key_token_in(&plus_as_space(&view)))))
        })
    }
}

/// Passes of [`unescaped`] tried: a form field's JSON takes two (percent, then JSON), a
/// twice-encoded one or JSON in a JSON string three.
const MAX_UNESCAPES: usize = 4;

/// The readings of `text` with JSON string escapes undone: each pass of [`unescaped`]
/// undoes the percent and JSON escapes the previous one left or made (`%5C%2F` is `\/`
/// after one and `/` after two; `\u0025` is `%` after one), up to `MAX_UNESCAPES` passes
/// or until nothing is left to undo. Only the readings from the first pass that undid a
/// JSON escape on are given: the ones before are percent-decodings, which
/// [`KeyScan::hashed_in`] reads already. A pass is linear and the text shrinks with each,
/// so the cost is at most `MAX_UNESCAPES` copies, and none for text without `\` or `%`.
fn unescaped_views(text: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut layer = Cow::Borrowed(text);
    let mut json_seen = false;
    let mut passes = 0;
    std::iter::from_fn(move || {
        while passes < MAX_UNESCAPES {
            passes += 1;
            // Nothing left that a pass could undo.
            memchr::memchr2(b'\\', b'%', &layer)?;
            let (next, json) = unescaped(&layer)?;
            layer = Cow::Owned(next);
            json_seen |= json;
            if json_seen {
                return Some(layer.to_vec());
            }
        }
        None
    })
}

/// One pass over `text` undoing each percent escape (`%2F`) and each JSON string escape
/// (`\/`, `\\`, `\"`, `\b`, `\f`, `\n`, `\r`, `\t`, `\u00e9`, a surrogate pair
/// `\ud83d\ude00` as its one character, a lone surrogate as U+FFFD), wherever they stand
/// (JSON's quotes are not looked for: a value may be any part of a document). What the
/// pass decodes is not read again until the next. An invalid escape stays as it is.
/// `None` when there was nothing to undo; else the text, and whether a JSON escape was
/// among what was undone.
fn unescaped(text: &[u8]) -> Option<(Vec<u8>, bool)> {
    let hex = |at: usize, len: usize| -> Option<u32> {
        let digits = text.get(at..at + len)?;
        digits
            .iter()
            .try_fold(0u32, |n, &b| Some(n * 16 + (b as char).to_digit(16)?))
    };
    let mut out = Vec::with_capacity(text.len());
    let (mut json, mut percent) = (false, false);
    let mut i = 0;
    while i < text.len() {
        let (byte, next) = (text[i], text.get(i + 1).copied());
        if byte == b'%' {
            if let Some(value) = hex(i + 1, 2) {
                out.push(value as u8);
                percent = true;
                i += 3;
                continue;
            }
        }
        if byte == b'\\' {
            let simple = match next {
                Some(b'"') => Some(b'"'),
                Some(b'\\') => Some(b'\\'),
                Some(b'/') => Some(b'/'),
                Some(b'b') => Some(0x08),
                Some(b'f') => Some(0x0C),
                Some(b'n') => Some(b'\n'),
                Some(b'r') => Some(b'\r'),
                Some(b't') => Some(b'\t'),
                _ => None,
            };
            if let Some(b) = simple {
                out.push(b);
                json = true;
                i += 2;
                continue;
            }
            if let (Some(b'u'), Some(unit)) = (next, hex(i + 2, 4)) {
                let low = match text.get(i + 6..i + 8) {
                    Some(b"\\u") => hex(i + 8, 4).filter(|low| (0xDC00..0xE000).contains(low)),
                    _ => None,
                };
                let (c, len) = match (unit, low) {
                    (0xD800..=0xDBFF, Some(low)) => (
                        char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)),
                        12,
                    ),
                    _ => (char::from_u32(unit), 6),
                };
                let c = c.unwrap_or(char::REPLACEMENT_CHARACTER);
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
                json = true;
                i += len;
                continue;
            }
        }
        out.push(byte);
        i += 1;
    }
    (json || percent).then_some((out, json))
}

/// `body` without a UTF-8 byte order mark.
pub fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// The ASCII a body holds as UTF-16 or UTF-32: for each unit width, byte order and
/// alignment, one byte per code unit, the unit's ASCII character where it is one and a
/// space (no key byte) where it is not, so a BOM, a non-ASCII character or a binary
/// neighbour only ends a token.
fn wide_views(body: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let view = move |width: usize, start: usize, little: bool| -> Vec<u8> {
        body.get(start..)
            .unwrap_or_default()
            .chunks_exact(width)
            .map(|unit| {
                let (low, rest) = if little {
                    (unit[0], &unit[1..])
                } else {
                    (unit[width - 1], &unit[..width - 1])
                };
                if low != 0 && low.is_ascii() && rest.iter().all(|&b| b == 0) {
                    low
                } else {
                    b' '
                }
            })
            .collect()
    };
    [2usize, 4].into_iter().flat_map(move |width| {
        (0..width).flat_map(move |start| [true, false].map(|little| view(width, start, little)))
    })
}

/// `text` with each `+` a space, as form decoding reads it.
fn plus_as_space(text: &[u8]) -> Vec<u8> {
    text.iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect()
}

/// A byte a key may contain.
fn key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || punctuation(b)
}

/// The key bytes a candidate may start after or end before: what joins a key to its
/// neighbours in `KEY.x`, `x=KEY`, `KEY==` or `-KEY.`.
fn punctuation(b: u8) -> bool {
    matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// The maximal runs of key bytes that could hold a key at all.
fn tokens(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| !key_byte(b)).filter(|t| t.len() >= MIN_KEY)
}

/// The candidates one token offers, each once: itself, and each run that starts at its
/// start or just after a punctuation byte and ends at its end or just before one, spanning
/// fewer than `MAX_SPAN` cuts (`x.KEY-1.y` offers `KEY-1`, `note=KEY==` offers `KEY` and
/// `KEY==`).
fn candidates(token: &[u8]) -> impl Iterator<Item = &[u8]> {
    let fits = |len: usize| (MIN_KEY..=MAX_KEY).contains(&len);
    let whole = fits(token.len()).then_some(token);
    // Most tokens are words with nothing to cut: no work for them.
    let cut = token.iter().any(|&b| punctuation(b));
    let starts = (0..token.len()).filter(move |&i| cut && (i == 0 || punctuation(token[i - 1])));
    starts
        .flat_map(move |from| {
            (from + 1..=token.len().min(from + MAX_KEY))
                .filter(move |&to| to == token.len() || punctuation(token[to]))
                .take(MAX_SPAN)
                .filter(move |&to| fits(to - from) && (from, to) != (0, token.len()))
                .map(move |to| &token[from..to])
        })
        .chain(whole)
}

/// One percent-decoding; an invalid escape stays as it is.
fn percent_decoded(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                text.get(i + 1).and_then(|&b| hex(b)),
                text.get(i + 2).and_then(|&b| hex(b)),
            ) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

/// Whether `key` still appears in `text`, each byte raw or percent-encoded (either hex
/// case): the last check that no spelling the parsers do not know carries the caller's
/// key upstream. A configured key is matched whatever its length.
pub fn carries_key(text: &[u8], key: &str) -> bool {
    let key = key.as_bytes();
    if key.is_empty() {
        return false;
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let unit = |at: usize| -> Option<(u8, usize)> {
        let first = *text.get(at)?;
        if first == b'%' {
            let hi = text.get(at + 1).and_then(|&b| hex(b));
            let lo = text.get(at + 2).and_then(|&b| hex(b));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                return Some(((hi * 16 + lo) as u8, 3));
            }
        }
        Some((first, 1))
    };
    let matches_at = |at: usize| {
        let mut pos = at;
        for &want in key {
            match unit(pos) {
                Some((b, len)) if b == want => pos += len,
                Some(_) if text[pos] == want => pos += 1,
                _ => return false,
            }
        }
        true
    };
    (0..text.len())
        .filter(|&i| text[i] == key[0] || text[i] == b'%')
        .any(matches_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::sha256_hex;

    const OTHER: &str = "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MA==";

    fn clients() -> Clients {
        let cfg = crate::config::parse(&format!(
            "upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n\
             [[clients]]\nname=\"a\"\nkey_sha256=\"{}\"\n\
             [[clients]]\nname=\"b\"\nkey_sha256=\"{}\"\n",
            sha256_hex(b"own-key-123"),
            sha256_hex(OTHER.as_bytes())
        ))
        .unwrap();
        Clients::from_config(&cfg)
    }

    #[test]
    fn a_digest_list_finds_keys_as_the_clients_do() {
        let digests = [crate::auth::sha256(OTHER.as_bytes())];
        let scan = KeyScan::new(digests.as_slice(), None);
        for token in [
            OTHER.to_string(),
            format!("{OTHER}.x"),
            format!("x={OTHER}"),
            format!("Bearer%20{OTHER}"),
            OTHER.replace('=', "%3D"),
        ] {
            assert!(
                scan.in_value(token.as_bytes()),
                "expected a key found in {token:?}"
            );
        }
        assert!(
            !scan.in_value(b"sim-access-token-1"),
            "expected no key in a plain token"
        );
        let none: [[u8; 32]; 0] = [];
        assert!(!KeyScan::new(none.as_slice(), None).in_value(OTHER.as_bytes()));
    }

    #[test]
    fn any_configured_key_is_found_in_every_layer_and_place() {
        let c = clients();
        let scan = KeyScan::new(&c, Some("own-key-123"));
        let encoded = OTHER.replace('+', "%2B").replace('=', "%3D");
        for text in [
            OTHER.to_string(),
            format!("note={OTHER}&x=1"),
            format!("text/html, {OTHER}"),
            format!("see {OTHER}."),
            format!("note=see+{OTHER}+now"),
            format!("+{OTHER}+=1"),
            format!("note=see+{}+now", OTHER.replace('=', "%3D")),
            format!("a=%{}", hex_all(OTHER)),
            format!("a=%25{}", hex_all(OTHER).replace('%', "%25")),
            encoded,
            "x own-key-123 y".into(),
            format!("{OTHER}.x"),
            format!("x.{OTHER}"),
            format!("Bearer%20{OTHER}"),
            format!("a-{OTHER}-b"),
            "tok.own-key-123.x".into(),
            "%6Fwn-key-123".into(),
        ] {
            assert!(
                scan.in_value(text.as_bytes()),
                "expected a key found in {text:?}"
            );
        }
        for text in [
            "text/html",
            "Mozilla/5.0 (X11; Linux x86_64)",
            "own-key-12",
            "Zm9vYmFyYmF6",
        ] {
            assert!(
                !scan.in_value(text.as_bytes()),
                "expected no key in {text:?}"
            );
        }
        for body in [
            utf16(OTHER, true, true),
            utf16(OTHER, false, true),
            utf16(&format!("x={OTHER}"), true, false),
            utf16(&format!("x={OTHER}"), false, false),
            [b"\x01".as_slice(), &utf16(OTHER, true, false)].concat(),
            [
                b"\x89PNG\x00\x00".as_slice(),
                &utf16(OTHER, false, false),
                b"\xff",
            ]
            .concat(),
            utf32(OTHER, true, true),
            utf32(&format!("note {OTHER}"), false, false),
            [b"\x89PNG\x00".as_slice(), &utf32(OTHER, true, false)].concat(),
            [b"%PDF\x01\x02\x03".as_slice(), &utf32(OTHER, false, true)].concat(),
        ] {
            assert!(
                scan.in_body(&body),
                "expected the key found in the UTF-16 or UTF-32 body {body:?}"
            );
        }
        assert!(
            !scan.in_body(&utf32("nothing to see here", false, true)),
            "expected no key in a UTF-32 body without one"
        );
        assert!(
            !scan.in_body(&utf16("nothing to see here", true, true)),
            "expected no key in a UTF-16 body without one"
        );
        let json = format!(r#"{{"a":["\u005a{}"]}}"#, &OTHER[1..]);
        assert!(
            scan.in_json(json.as_bytes()),
            "expected the escaped key found in {json}"
        );
        assert!(!scan.in_json(br#"{"a":"b"}"#));
    }

    /// `text` as UTF-16, little- or big-endian, with or without a byte order mark.
    fn utf16(text: &str, little: bool, bom: bool) -> Vec<u8> {
        let units = bom.then_some(0xFEFF).into_iter().chain(text.encode_utf16());
        units
            .flat_map(|u| {
                if little {
                    u.to_le_bytes()
                } else {
                    u.to_be_bytes()
                }
            })
            .collect()
    }

    /// `text` as UTF-32, little- or big-endian, with or without a byte order mark.
    fn utf32(text: &str, little: bool, bom: bool) -> Vec<u8> {
        let units = bom.then_some('\u{FEFF}').into_iter().chain(text.chars());
        units
            .flat_map(|c| {
                if little {
                    u32::from(c).to_le_bytes()
                } else {
                    u32::from(c).to_be_bytes()
                }
            })
            .collect()
    }

    fn hex_all(text: &str) -> String {
        text.bytes()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join("%")
    }

    #[test]
    fn json_escapes_are_undone_with_percent_escapes_in_either_order() {
        let pass = |text: &str| unescaped(text.as_bytes());
        assert_eq!(
            pass(r#"a\/b\\c\"d\n\t\u0041\u00e9"#),
            Some(("a/b\\c\"d\n\tA\u{e9}".as_bytes().to_vec(), true))
        );
        assert_eq!(
            pass(r"\ud83d\ude00 \ud83d \ude00\u12"),
            Some(("\u{1F600} \u{FFFD} \u{FFFD}\\u12".as_bytes().to_vec(), true)),
            "a pair is one character, a lone surrogate U+FFFD, a short escape kept"
        );
        assert_eq!(pass("a%2Fb%zz"), Some((b"a/b%zz".to_vec(), false)));
        assert_eq!(pass(r"plain \x %z"), None, "nothing to undo");
        let views = |text: &str| -> Vec<String> {
            unescaped_views(text.as_bytes())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
                .collect()
        };
        assert_eq!(views("%5C%2F"), ["/"], "percent (hashed_in's), then JSON");
        assert_eq!(views(r"\u00252F"), ["%2F", "/"], "JSON, then percent");
        assert_eq!(
            views("a%2Fb"),
            Vec::<String>::new(),
            "percent alone is hashed_in's"
        );
        assert_eq!(views("no escapes at all"), Vec::<String>::new());
        let deep = format!("{}u0041", "\\".repeat(1 << 10));
        assert_eq!(
            views(&deep).len(),
            MAX_UNESCAPES,
            "expected {MAX_UNESCAPES} passes, no more"
        );

        let c = clients();
        let scan = KeyScan::new(&c, Some("own-key-123"));
        let other: String = OTHER.bytes().map(|b| format!("\\u{b:04x}")).collect();
        for text in [
            format!("updates=%7B%22n%22%3A%22{other}%22%7D"),
            format!("updates={{\"n\":\"\\ud83d\\ude00{other}\"}}"),
            format!("q=%255Cu005a{}", &OTHER[1..]),
            r"x=\u006fwn-key-123".to_string(),
            "x=%5Cu006fwn-key-123".to_string(),
            format!(r#"{{"a":"{{\"b\":\"{}\"}}"}}"#, other.replace('\\', "\\\\")),
        ] {
            assert!(
                scan.in_value(text.as_bytes()),
                "expected a key found in {text:?}"
            );
        }
        for text in [
            r#"{"note":"see https:\/\/example.com\/a \u00e9 done\n"}"#,
            "updates=%7B%22n%22%3A%22Zm9vYmFy%5C%2F%22%7D",
        ] {
            assert!(
                !scan.in_value(text.as_bytes()),
                "expected no key in {text:?}"
            );
        }
    }

    #[test]
    fn candidates_stay_within_a_few_per_token() {
        let token = "abcd=".repeat(100);
        let count = candidates(token.as_bytes()).count();
        assert!(
            count <= MAX_SPAN * 100 + 1,
            "expected at most {} candidates of 100 pieces, saw {count}",
            MAX_SPAN * 100 + 1
        );
        let plain: Vec<&[u8]> = candidates(b"plainword").collect();
        assert_eq!(plain, [b"plainword".as_slice()], "each candidate once");
        let padded: Vec<&[u8]> = candidates(b"note=KEYKEY==").collect();
        assert_eq!(
            padded,
            [
                b"note".as_slice(),
                b"note=KEYKEY",
                b"note=KEYKEY=",
                b"KEYKEY",
                b"KEYKEY=",
                b"KEYKEY==",
                b"note=KEYKEY==",
            ],
            "the token, its pieces, with and without padding, each once"
        );
        let dotted: Vec<&[u8]> = candidates(b"x.own-key-123.y").collect();
        assert!(
            dotted.contains(&b"own-key-123".as_slice()),
            "expected a key with its own punctuation offered between two cuts, saw {dotted:?}"
        );
        let long = vec![b'a'; 10_000];
        assert_eq!(candidates(&long).count(), 0, "a run past MAX_KEY is no key");
    }
}
