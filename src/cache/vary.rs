//! `Vary` support: which request headers select a stored variant, and the variant's key.
//!
//! A response with `Vary` is stored under its primary key plus the request's values of the
//! varied headers; `Vary: *` (or a name that is not a header name) cannot be honoured, so
//! such a response is not stored at all. Names are lowercased, sorted and deduplicated, so
//! `Vary: B, a` and `Vary: A, b` select variants the same way. A name the gateway never
//! sends upstream (`Accept-Encoding`, say: the gateway asks for and reads the answer whole
//! itself) cannot have changed the upstream's answer, so it selects nothing: one entry
//! serves every value of it, rather than one entry per client's spelling of it.

use std::fmt::Write as _;
use std::sync::Arc;

use http::header::{HeaderName, VARY};
use http::HeaderMap;

/// What a response's `Vary` header says about storing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Vary {
    /// No `Vary`: one entry serves every request for the key.
    None,
    /// Store per value of these request headers (sorted, unique, lowercase).
    Headers(Arc<[HeaderName]>),
    /// `Vary: *` or unparsable: every request is its own variant, so do not store.
    Any,
}

impl Vary {
    pub(crate) fn of(response_headers: &HeaderMap) -> Vary {
        let mut names = Vec::new();
        for value in response_headers.get_all(VARY) {
            let Ok(value) = value.to_str() else {
                return Vary::Any;
            };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                if name == "*" {
                    return Vary::Any;
                }
                // from_bytes lowercases, so names compare case-insensitively as HTTP wants.
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(name) if crate::proxy::sent_upstream(&name) => names.push(name),
                    Ok(_) => {}
                    Err(_) => return Vary::Any,
                }
            }
        }
        if names.is_empty() {
            return Vary::None;
        }
        names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        names.dedup();
        Vary::Headers(names.into())
    }
}

/// Which variant of an answer a request selects, for telling whether one answer made for
/// one request may serve another (merged requests, in flight together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Variant {
    /// The answer has no `Vary`: it serves every request.
    Any,
    /// The varied request headers' values, as [`variant_key`] writes them.
    Of(String),
    /// `Vary: *` (or unparsable): it serves only the request it was made for.
    Own,
}

impl Variant {
    /// The variant of `response_headers`' answer that `request_headers` select.
    pub fn of(response_headers: &HeaderMap, request_headers: &HeaderMap) -> Variant {
        match Vary::of(response_headers) {
            Vary::None => Variant::Any,
            Vary::Any => Variant::Own,
            Vary::Headers(names) => Variant::Of(variant_key("", &names, request_headers)),
        }
    }

    /// Whether an answer made for a request selecting `self` also serves one selecting
    /// `other`.
    pub fn serves(&self, other: &Variant) -> bool {
        match (self, other) {
            (Variant::Any, _) => true,
            (Variant::Of(a), Variant::Of(b)) => a == b,
            _ => false,
        }
    }
}

/// The key of the variant that `request_headers` select: the primary key, then one line per
/// varied header. Lines start with `\n`, which neither a path nor a header value can hold,
/// so a variant key never collides with a primary key. An absent header is written without
/// a colon, so it differs from a header sent empty.
pub(crate) fn variant_key(
    primary: &str,
    names: &[HeaderName],
    request_headers: &HeaderMap,
) -> String {
    let mut key = String::with_capacity(primary.len() + names.len() * 32);
    key.push_str(primary);
    for name in names {
        key.push('\n');
        key.push_str(name.as_str());
        let mut values = request_headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            continue;
        }
        key.push(':');
        for (i, value) in values.enumerate() {
            if i > 0 {
                key.push(',');
            }
            push_escaped(&mut key, value.as_bytes());
        }
    }
    key
}

/// Appends header bytes; anything outside printable ASCII (and `%` itself) is written as
/// `%XX`, so distinct byte strings stay distinct keys.
fn push_escaped(key: &mut String, bytes: &[u8]) {
    for &b in bytes {
        if (b' '..=b'~').contains(&b) && b != b'%' {
            key.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(key, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static [u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            let value = HeaderValue::from_bytes(value).expect("test header values are valid");
            map.append(HeaderName::from_static(name), value);
        }
        map
    }

    #[test]
    fn vary_lists_are_normalised() {
        let seen = Vary::of(&headers(&[
            ("vary", b"User-Agent, accept"),
            ("vary", b"Accept,,"),
        ]));
        let names: Arc<[HeaderName]> = vec![
            HeaderName::from_static("accept"),
            HeaderName::from_static("user-agent"),
        ]
        .into();
        assert_eq!(
            seen,
            Vary::Headers(names),
            "expected [accept, user-agent], saw {seen:?}"
        );
    }

    #[test]
    fn headers_never_sent_upstream_select_no_variant() {
        let seen = Vary::of(&headers(&[("vary", b"Accept-Encoding, X-Foo")]));
        assert_eq!(seen, Vary::None, "expected no variants, saw {seen:?}");
        let seen = Vary::of(&headers(&[("vary", b"Accept-Encoding, Accept-Language")]));
        let names: Arc<[HeaderName]> = vec![HeaderName::from_static("accept-language")].into();
        assert_eq!(
            seen,
            Vary::Headers(names),
            "expected [accept-language], saw {seen:?}"
        );
    }

    #[test]
    fn star_or_garbage_means_any_and_absence_means_none() {
        for value in [&b"*"[..], b"accept, *", b"bad name"] {
            let seen = Vary::of(&headers(&[("vary", value)]));
            assert_eq!(
                seen,
                Vary::Any,
                "Vary {:?}: expected Any, saw {seen:?}",
                String::from_utf8_lossy(value)
            );
        }
        let seen = Vary::of(&HeaderMap::new());
        assert_eq!(seen, Vary::None, "no Vary: expected None, saw {seen:?}");
        let seen = Vary::of(&headers(&[("vary", b" ")]));
        assert_eq!(seen, Vary::None, "blank Vary: expected None, saw {seen:?}");
    }

    #[test]
    fn variant_keys_separate_values_absence_and_bytes() {
        let names = [HeaderName::from_static("accept-language")];
        let en = variant_key("GET /me", &names, &headers(&[("accept-language", b"en")]));
        let nl = variant_key("GET /me", &names, &headers(&[("accept-language", b"nl")]));
        let empty = variant_key("GET /me", &names, &headers(&[("accept-language", b"")]));
        let absent = variant_key("GET /me", &names, &HeaderMap::new());
        assert_eq!(
            en, "GET /me\naccept-language:en",
            "expected the value appended, saw {en:?}"
        );
        for (a, b) in [(&en, &nl), (&empty, &absent), (&en, &absent)] {
            assert_ne!(
                a, b,
                "distinct requests must give distinct variant keys, both were {a:?}"
            );
        }
        let raw = variant_key(
            "GET /me",
            &names,
            &headers(&[("accept-language", b"\xe9%")]),
        );
        assert_eq!(
            raw, "GET /me\naccept-language:%E9%25",
            "expected escaped bytes, saw {raw:?}"
        );
    }
}
