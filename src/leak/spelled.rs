//! The base64 and hex spellings of the keys known in full, searched all at once: one
//! Aho-Corasick automaton over every spelling of every key reads a value in one pass,
//! where a substring search per spelling read it eight times per key. The automaton is
//! made when the set of keys changes (a client's key is proven, a configuration is
//! loaded), never per request.

use super::MIN_SPELLED_KEY;

/// The spellings of a set of keys that a reader could decode back to one of them: base64
/// in the standard and the URL-safe alphabet, for each of the three alignments a key may
/// have inside the encoded bytes (so whether it starts the encoded text or sits inside a
/// longer one, with padding or without: only the characters that the key's bytes alone
/// decide are searched), and hex in lower and upper case: at most 8 per key, none for a
/// key shorter than [`MIN_SPELLED_KEY`].
pub struct Spellings(Matcher);

enum Matcher {
    None,
    /// Every spelling of every key, in one automaton.
    All(aho_corasick::AhoCorasick),
    /// One substring search per spelling: only if the automaton could not be built (past
    /// its size limits, which no configuration's keys reach).
    Each(Vec<memchr::memmem::Finder<'static>>),
}

impl std::fmt::Debug for Spellings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Spellings of keys are credentials too: never print them.
        f.write_str("Spellings([redacted])")
    }
}

impl Spellings {
    /// The spellings of `key`.
    pub fn of(key: &[u8]) -> Spellings {
        Spellings::of_all([key])
    }

    /// The spellings of every key in `keys`.
    pub fn of_all<'a>(keys: impl IntoIterator<Item = &'a [u8]>) -> Spellings {
        let mut found: Vec<Vec<u8>> = keys.into_iter().flat_map(spellings).collect();
        found.sort();
        found.dedup();
        if found.is_empty() {
            return Spellings(Matcher::None);
        }
        Spellings(match aho_corasick::AhoCorasick::new(&found) {
            Ok(all) => Matcher::All(all),
            Err(_) => Matcher::Each(
                found
                    .iter()
                    .map(|p| memchr::memmem::Finder::new(p).into_owned())
                    .collect(),
            ),
        })
    }

    /// Whether `text` holds one of the spellings.
    pub fn in_text(&self, text: &[u8]) -> bool {
        match &self.0 {
            Matcher::None => false,
            Matcher::All(all) => all.is_match(text),
            Matcher::Each(each) => each.iter().any(|f| f.find(text).is_some()),
        }
    }
}

/// The spellings of one key ([`Spellings`]).
fn spellings(key: &[u8]) -> Vec<Vec<u8>> {
    let mut found = Vec::new();
    if key.len() < MIN_SPELLED_KEY {
        return found;
    }
    for align in 0..3 {
        let standard = base64_inner(key, align);
        let url_safe: Vec<u8> = standard
            .iter()
            .map(|&c| match c {
                b'+' => b'-',
                b'/' => b'_',
                c => c,
            })
            .collect();
        found.push(standard);
        found.push(url_safe);
    }
    let hex = |digits: &[u8; 16]| -> Vec<u8> {
        key.iter()
            .flat_map(|&b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
            .collect()
    };
    found.push(hex(b"0123456789abcdef"));
    found.push(hex(b"0123456789ABCDEF"));
    found
}

/// The base64 characters (standard alphabet) that `key`'s bytes alone decide when the key
/// starts `align` bytes (0 to 2) into a 3-byte group of the encoded data: the characters
/// around them also depend on the bytes before and after the key.
fn base64_inner(key: &[u8], align: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data: Vec<u8> = std::iter::repeat_n(0, align)
        .chain(key.iter().copied())
        .collect();
    let bits = data.len() * 8;
    // Character i holds bits [6i, 6i + 6): it is the key's alone when those lie within
    // the key's bits [8 align, bits).
    let first = (8 * align).div_ceil(6);
    let end = bits / 6;
    (first..end)
        .map(|i| {
            let at = 6 * i;
            let (byte, shift) = (at / 8, at % 8);
            let word = u16::from(data[byte]) << 8 | u16::from(*data.get(byte + 1).unwrap_or(&0));
            ALPHABET[usize::from((word >> (10 - shift)) & 63)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard base64 of `data`, padded.
    fn base64(data: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..=chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        while out.len() % 4 != 0 {
            out.push('=');
        }
        out
    }

    /// The one automaton over many keys finds each key in every spelling the per-key
    /// searches found, at every alignment, and nothing in text holding none of them.
    #[test]
    fn one_automaton_finds_every_spelling_of_every_key() {
        let keys: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("client-key-number-{i:02}-abcdefgh").into_bytes())
            .collect();
        let all = Spellings::of_all(keys.iter().map(Vec::as_slice));
        for key in &keys {
            for before in ["", "a", "ab"] {
                let data = [before.as_bytes(), key, b"?>"].concat();
                let standard = base64(&data);
                let url_safe = standard.replace('+', "-").replace('/', "_");
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                for text in [
                    format!("x={standard}&y"),
                    format!("token {url_safe}"),
                    hex.clone(),
                    format!("0x{}", hex.to_uppercase()),
                ] {
                    assert!(
                        all.in_text(text.as_bytes()),
                        "expected a spelling of {:?} found in {text:?}",
                        String::from_utf8_lossy(key)
                    );
                    assert!(
                        Spellings::of(key).in_text(text.as_bytes()),
                        "expected the key's own spellings to find it in {text:?}"
                    );
                }
            }
        }
        let plain = base64(b"client-key-number-20-abcdefgh, not configured");
        assert!(
            !all.in_text(plain.as_bytes()),
            "expected nothing in {plain:?}"
        );
        assert!(
            !Spellings::of(b"short").in_text(b"c2hvcnQ="),
            "short keys are not spelled"
        );
        assert!(!Spellings::of_all([]).in_text(b"anything"));
    }

    /// A key proven after a scan's spellings were made is searched by the next scan: the
    /// shared automaton is made again for each key proven.
    #[test]
    fn each_key_proven_joins_the_spellings_of_the_next_scan() {
        let keys = ["first-client-key-0123", "second-client-key-4567"];
        let mut text = String::from("upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n");
        for (i, key) in keys.iter().enumerate() {
            text.push_str(&format!(
                "[[clients]]\nname=\"c{i}\"\nkey_sha256=\"{}\"\n",
                crate::auth::sha256_hex(key.as_bytes())
            ));
        }
        let clients = crate::auth::Clients::from_config(&crate::config::parse(&text).unwrap());
        let spelled = |key: &str| format!("q={}", base64(key.as_bytes()).trim_end_matches('='));
        let found =
            |text: &str| crate::leak::KeyScan::new(&clients, None).in_value(text.as_bytes());
        assert!(
            !found(&spelled(keys[0])),
            "no key is known in full before one is proven"
        );
        clients.authenticate(Some(keys[0])).unwrap();
        assert!(
            found(&spelled(keys[0])),
            "expected the proven key's base64 found"
        );
        assert!(
            !found(&spelled(keys[1])),
            "expected the unproven key's base64 not found"
        );
        clients.authenticate(Some(keys[1])).unwrap();
        for key in keys {
            assert!(
                found(&spelled(key)),
                "expected {key}'s base64 found once both are proven"
            );
        }
    }
}
