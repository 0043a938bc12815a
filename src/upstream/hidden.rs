//! Held tokens that in-place redaction cannot reach. A token under more layers of escapes
//! than redaction reads, or in a wide encoding, cannot be replaced without rewriting the
//! encoding around it, so such an answer is found here and refused: never passed on, never
//! stored. [`hides_secret`] says which spellings count.

use super::rewrite::carries_secret;

/// Layers of escapes undone on top of the one that redaction already reads.
const MAX_LAYERS: usize = 3;

/// Whether `body` holds one of `secrets` in any layered decoding.
///
/// Redaction replaces a token spelled with one layer of escapes (each character raw,
/// percent-encoded or JSON-escaped, in any mix). This finds one under more layers
/// (`\u0025` + hex, `%5Cu0052...`, `%252D`) or in a wide encoding (UTF-16 or UTF-32, by BOM
/// or NUL bytes). It decodes at most `MAX_LAYERS` layers, each one linear pass over the body,
/// and stops as soon as a layer changes nothing (most bodies: one pass).
pub fn hides_secret(body: &[u8], secrets: &[&str]) -> bool {
    if secrets.is_empty() || body.is_empty() {
        return false;
    }
    // Held tokens are ASCII: in UTF-16 or UTF-32 each of their characters is the ASCII
    // byte with NULs around it, so dropping every NUL (and a BOM) lines them up again.
    let narrowed;
    let mut layer: &[u8] = body;
    if body.contains(&0) || has_wide_bom(body) {
        narrowed = body
            .iter()
            .copied()
            .filter(|&b| b != 0 && b != 0xfe && b != 0xff)
            .collect::<Vec<u8>>();
        layer = &narrowed;
    }
    let mut owned;
    for depth in 0..=MAX_LAYERS {
        if carries_secret(layer, secrets) {
            return true;
        }
        if depth == MAX_LAYERS {
            break;
        }
        match unescaped(layer) {
            Some(next) => {
                owned = next;
                layer = &owned;
            }
            None => break,
        }
    }
    false
}

fn has_wide_bom(body: &[u8]) -> bool {
    body.starts_with(&[0xff, 0xfe]) || body.starts_with(&[0xfe, 0xff])
}

/// One layer of percent-escapes and JSON escapes undone together; `None` when there is
/// none. `\uXXXX` becomes the character's UTF-8; invalid escapes stay as they are.
fn unescaped(text: &[u8]) -> Option<Vec<u8>> {
    // Nothing to undo without a `%` or a `\`.
    memchr::memchr2(b'%', b'\\', text)?;
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'%' => {
                let hi = text.get(i + 1).and_then(|&b| hex(b));
                let lo = text.get(i + 2).and_then(|&b| hex(b));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push((hi * 16 + lo) as u8);
                    i += 3;
                    changed = true;
                    continue;
                }
            }
            b'\\' => {
                let simple = match text.get(i + 1) {
                    Some(b'n') => Some(b'\n'),
                    Some(b't') => Some(b'\t'),
                    Some(b'r') => Some(b'\r'),
                    Some(b'b') => Some(8),
                    Some(b'f') => Some(12),
                    Some(&b @ (b'/' | b'"' | b'\\')) => Some(b),
                    _ => None,
                };
                if let Some(b) = simple {
                    out.push(b);
                    i += 2;
                    changed = true;
                    continue;
                }
                let code = text.get(i + 2..i + 6).and_then(|d| {
                    d.iter()
                        .try_fold(0u32, |acc, &b| hex(b).map(|v| acc * 16 + v))
                });
                if let (Some(b'u'), Some(code)) = (text.get(i + 1), code) {
                    let ch = char::from_u32(code).unwrap_or('\u{fffd}');
                    let mut utf8 = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut utf8).as_bytes());
                    i += 6;
                    changed = true;
                    continue;
                }
            }
            _ => {}
        }
        out.push(text[i]);
        i += 1;
    }
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "tok-ABCD-1234-efgh";

    fn utf16le(text: &str) -> Vec<u8> {
        let mut out = vec![0xff, 0xfe];
        out.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
        out
    }

    fn utf32be(text: &str) -> Vec<u8> {
        text.chars()
            .flat_map(|c| (c as u32).to_be_bytes())
            .collect()
    }

    #[test]
    fn layered_and_wide_spellings_are_found() {
        let pct: String = TOKEN.bytes().map(|b| format!("%{b:02X}")).collect();
        for (what, body) in [
            (
                "UTF-16LE with BOM",
                utf16le(&format!(r#"{{"t":"{TOKEN}"}}"#)),
            ),
            (
                "UTF-32BE without BOM",
                utf32be(&format!(r#"{{"t":"{TOKEN}"}}"#)),
            ),
            (
                "JSON-escaped percent",
                pct.replace('%', "\\u0025").into_bytes(),
            ),
            (
                "percent-encoded JSON escapes",
                TOKEN
                    .bytes()
                    .map(|b| format!("%5Cu00{b:02X}"))
                    .collect::<String>()
                    .into_bytes(),
            ),
            ("double percent", pct.replace('%', "%25").into_bytes()),
            ("triple percent", pct.replace('%', "%2525").into_bytes()),
        ] {
            assert!(
                hides_secret(&body, &[TOKEN]),
                "{what}: expected the token found"
            );
        }
        for body in [
            r#"{"t":"[redacted]","u":"caf\u00e9 %41"}"#.as_bytes(),
            b"tok-ABCD-1234-efg",
            b"",
        ] {
            assert!(
                !hides_secret(body, &[TOKEN]),
                "expected nothing in {body:?}"
            );
        }
        assert!(
            !hides_secret(TOKEN.as_bytes(), &[]),
            "no secrets, nothing to find"
        );
    }
}
