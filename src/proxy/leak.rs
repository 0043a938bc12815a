//! Gateway keys where none belongs: the last check before anything is forwarded or logged.
//! A client key that reached the upstream or a log line would be a credential handed out, so
//! every value that would leave the gateway is searched for the caller's key and for every
//! configured one, in any spelling a reader could decode; [`KeyScan`] says how, and why the
//! work stays bounded.

use std::borrow::Cow;

use crate::auth::Clients;

use super::request::carries_key;

/// Shorter candidates are not hashed (a key that short is guessed faster than found). A
/// configured key shorter than this is found only when it is the caller's own.
pub const MIN_KEY: usize = 4;
/// Longer runs are not keys anyone types or generates.
pub const MAX_KEY: usize = 256;
/// Percent-decodings tried after the raw bytes.
const MAX_LAYERS: usize = 2;
/// Pieces of one token (cut at `=`) looked at; the rest of a longer token is skipped.
const MAX_PIECES: usize = 16;

/// Finds gateway keys in values about to be forwarded.
///
/// One matcher reads every value that would leave the gateway (forwarded headers, the
/// query, the body) and the client's `X-Request-Id` (echoed, logged and forwarded). The
/// caller's own key is searched as a substring, each byte raw or percent-encoded, whatever
/// its length. Every configured key (the caller's and all others', known only as SHA-256)
/// is found by hashing: a value is cut into candidate tokens at the bytes a key cannot
/// contain, and each candidate of `MIN_KEY` to `MAX_KEY` bytes is hashed and looked up.
///
/// A key, for this search, is letters, digits and `- . _ ~ + / =` (`=` only as trailing
/// padding), which the base64 keys the README suggests are. Values are read raw and
/// percent-decoded up to `MAX_LAYERS` times, each layer also with `+` read as a space
/// the way form decoding does (`note=see+KEY+now`); JSON bodies also once parsed, escapes
/// undone. The work is bounded: each byte of a value is hashed a small constant number of
/// times per layer, and values are bounded by the body and head limits.
pub struct KeyScan<'a> {
    clients: &'a Clients,
    own: Option<&'a str>,
}

impl<'a> KeyScan<'a> {
    pub fn new(clients: &'a Clients, own: Option<&'a str>) -> KeyScan<'a> {
        KeyScan {
            clients,
            own: own.filter(|k| !k.is_empty()),
        }
    }

    /// Whether `text` holds the caller's key or any configured key.
    pub fn in_value(&self, text: &[u8]) -> bool {
        self.own.is_some_and(|k| carries_key(text, k)) || self.hashed_in(text)
    }

    /// Whether a JSON document holds a key in any string or member name once unescaped
    /// (`"\u0074est-key"`), read by [`KeyScan::in_value`]. Not JSON: `false` (the raw
    /// bytes are read by `in_value`).
    pub fn in_json(&self, body: &[u8]) -> bool {
        fn holds(scan: &KeyScan<'_>, value: &serde_json::Value) -> bool {
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
        if self.clients.is_open() {
            return false;
        }
        let mut layer = Cow::Borrowed(text);
        for depth in 0..=MAX_LAYERS {
            if self.key_token_in(&layer) {
                return true;
            }
            // `+` is a key byte and a form's space: read both ways.
            if layer.contains(&b'+') && self.key_token_in(&plus_as_space(&layer)) {
                return true;
            }
            if depth == MAX_LAYERS || !layer.contains(&b'%') {
                break;
            }
            layer = Cow::Owned(percent_decoded(&layer));
        }
        false
    }

    fn key_token_in(&self, text: &[u8]) -> bool {
        tokens(text).any(|t| candidates(t).any(|c| self.clients.is_some_key(c)))
    }
}

/// `text` with each `+` a space, as form decoding reads it.
fn plus_as_space(text: &[u8]) -> Vec<u8> {
    text.iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect()
}

/// A byte a key may contain.
fn key_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
}

/// The maximal runs of key bytes that could hold a key at all.
fn tokens(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| !key_byte(b)).filter(|t| t.len() >= MIN_KEY)
}

/// The candidates one token offers, each once: itself, and each piece between `=` runs
/// (`note=KEY`, `a=KEY==`), with and without the `=` padding after it, and with the
/// punctuation that ends a sentence or a list (`.`, `-`, `~`, `_`) trimmed off its ends.
fn candidates(token: &[u8]) -> impl Iterator<Item = &[u8]> {
    let fits = |len: usize| (MIN_KEY..=MAX_KEY).contains(&len);
    let whole = fits(token.len()).then_some(token);
    // Most tokens are words with nothing to cut: no allocation for them.
    let plain = !token.contains(&b'=') && trim_punctuation(token) == (0, token.len());
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut add = |range: (usize, usize)| {
        if fits(range.1 - range.0) && range != (0, token.len()) && !ranges.contains(&range) {
            ranges.push(range);
        }
    };
    let mut start = if plain { token.len() } else { 0 };
    let mut pieces = 0;
    while start < token.len() && pieces < MAX_PIECES {
        let end = token[start..]
            .iter()
            .position(|&b| b == b'=')
            .map_or(token.len(), |p| start + p);
        let padded = token[end..]
            .iter()
            .position(|&b| b != b'=')
            .map_or(token.len(), |p| end + p);
        let (from, to) = trim_punctuation(&token[start..end]);
        add((start, end));
        add((start, padded));
        add((start + from, start + to));
        pieces += 1;
        start = padded.max(start + 1);
    }
    whole
        .into_iter()
        .chain(ranges.into_iter().map(move |(from, to)| &token[from..to]))
}

/// The range of `piece` left once the edge punctuation is trimmed.
fn trim_punctuation(piece: &[u8]) -> (usize, usize) {
    let edge = |b: &u8| matches!(b, b'.' | b'-' | b'~' | b'_');
    let from = piece.iter().position(|b| !edge(b)).unwrap_or(piece.len());
    let to = piece.iter().rposition(|b| !edge(b)).map_or(from, |p| p + 1);
    (from, to)
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
        let json = format!(r#"{{"a":["\u005a{}"]}}"#, &OTHER[1..]);
        assert!(
            scan.in_json(json.as_bytes()),
            "expected the escaped key found in {json}"
        );
        assert!(!scan.in_json(br#"{"a":"b"}"#));
    }

    fn hex_all(text: &str) -> String {
        text.bytes()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join("%")
    }

    #[test]
    fn candidates_stay_within_a_few_per_token() {
        let token = "abcd=".repeat(100);
        assert!(candidates(token.as_bytes()).count() <= 3 * MAX_PIECES + 1);
        let plain: Vec<&[u8]> = candidates(b"plainword").collect();
        assert_eq!(plain, [b"plainword".as_slice()], "each candidate once");
        let padded: Vec<&[u8]> = candidates(b"note=KEYKEY==").collect();
        assert_eq!(
            padded,
            [
                b"note=KEYKEY==".as_slice(),
                b"note",
                b"note=",
                b"KEYKEY",
                b"KEYKEY=="
            ],
            "the token, its pieces, with and without padding"
        );
        let long = vec![b'a'; 10_000];
        assert_eq!(candidates(&long).count(), 0, "a run past MAX_KEY is no key");
    }
}
