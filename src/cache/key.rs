//! Cache keys: one string per cacheable resource, built once per request.
//!
//! Invariants: HEAD shares the GET key (a HEAD is answered from the GET entry); a trailing
//! slash never changes the key; the `access_token` query parameter never appears in a key;
//! two queries that decode to the same parameters in the same per-name order give one key.

use http::Method;

use crate::proxy::php_name;

/// The name of the query parameter that carries a client's credential; it identifies the
/// caller, not the resource, so it must never split (or leak into) a cache key.
const CREDENTIAL_PARAM: &str = "access_token";

/// Strips trailing slashes so `/me/` and `/me` name one resource; a path made only of
/// slashes is the root `/`.
pub fn normalize_path(path: &str) -> &str {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() && !path.is_empty() {
        "/"
    } else {
        trimmed
    }
}

/// The primary cache key of a request: `METHOD path[?canonical-query]`.
///
/// The query is decoded and re-encoded, so `a=%41` and `a=A` are one key, and its pairs are
/// ordered by the name the upstream reads (PHP folds `a.b`, `a b` and `a[]` into one name).
/// The sort is stable: values of a repeated name keep their order, because
/// the upstream may read them positionally (an array, or "last one wins"), and reordering
/// them could serve one request the answer to another.
pub fn cache_key(method: &Method, path: &str, query: Option<&str>) -> String {
    // HEAD is answered from the GET entry, so both must compute the same key.
    let method = if method == Method::HEAD {
        Method::GET.as_str()
    } else {
        method.as_str()
    };
    let path = normalize_path(path);
    let query = query.filter(|q| !q.is_empty());

    let Some(query) = query else {
        // The common case: one allocation of exactly the right size.
        let mut key = String::with_capacity(method.len() + 1 + path.len());
        key.push_str(method);
        key.push(' ');
        key.push_str(path);
        return key;
    };

    // Decoded to bytes, not to text: a lossy UTF-8 decode would turn `%ff` and `%fe` into
    // the same U+FFFD, and two queries the upstream reads differently would share one entry.
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode_component(name), decode_component(value))
        })
        .filter(|(name, _)| name != CREDENTIAL_PARAM.as_bytes())
        .collect();
    // Sorted by the name as the upstream reads it (`a.b` and `a_b` are one PHP variable),
    // stably, so pairs it reads as one name keep their order and so their meaning (the last
    // one wins); each pair keeps its own bytes in the key.
    pairs.sort_by_cached_key(|(name, _)| php_name(&String::from_utf8_lossy(name)));

    let mut key = String::with_capacity(method.len() + 2 + path.len() + query.len());
    key.push_str(method);
    key.push(' ');
    key.push_str(path);
    for (i, (name, value)) in pairs.iter().enumerate() {
        key.push(if i == 0 { '?' } else { '&' });
        key.extend(form_urlencoded::byte_serialize(name));
        key.push('=');
        key.extend(form_urlencoded::byte_serialize(value));
    }
    key
}

/// One `application/x-www-form-urlencoded` name or value as the raw bytes it stands for:
/// `+` is a space, `%XX` one byte, and a `%` without two hex digits stays as it is (as the
/// form decoder reads it).
fn decode_component(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => match (
                bytes.get(i + 1).and_then(hex),
                bytes.get(i + 2).and_then(hex),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(digit: &u8) -> Option<u8> {
    (*digit as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, query: Option<&str>) -> String {
        cache_key(&Method::GET, path, query)
    }

    #[test]
    fn trailing_slashes_are_stripped_but_root_stays() {
        for (input, expected) in [
            ("/me/", "/me"),
            ("/me//", "/me"),
            ("/me", "/me"),
            ("/", "/"),
            ("///", "/"),
            ("/1/inbox/", "/1/inbox"),
        ] {
            let seen = normalize_path(input);
            assert_eq!(
                seen, expected,
                "normalize_path({input:?}): expected {expected:?}, saw {seen:?}"
            );
        }
    }

    #[test]
    fn plain_key_has_method_and_normalised_path() {
        let seen = get("/me/", None);
        assert_eq!(seen, "GET /me", "expected \"GET /me\", saw {seen:?}");
        let empty = get("/me", Some(""));
        assert_eq!(
            empty, seen,
            "an empty query must equal no query: expected {seen:?}, saw {empty:?}"
        );
    }

    #[test]
    fn head_shares_the_get_key_and_other_methods_do_not() {
        let head = cache_key(&Method::HEAD, "/me", Some("a=1"));
        let get_key = get("/me", Some("a=1"));
        assert_eq!(
            head, get_key,
            "HEAD key: expected {get_key:?}, saw {head:?}"
        );
        let post = cache_key(&Method::POST, "/me", Some("a=1"));
        assert_ne!(
            post, get_key,
            "POST must not share the GET key, both were {post:?}"
        );
    }

    #[test]
    fn parameter_order_does_not_matter() {
        let a = get("/x", Some("b=2&a=1"));
        let b = get("/x", Some("a=1&b=2"));
        assert_eq!(a, b, "reordered parameters: expected {b:?}, saw {a:?}");
        assert_eq!(
            b, "GET /x?a=1&b=2",
            "canonical form: expected \"GET /x?a=1&b=2\", saw {b:?}"
        );
    }

    #[test]
    fn access_token_is_dropped() {
        let with = get("/me", Some("access_token=secret&a=1"));
        let without = get("/me", Some("a=1"));
        assert_eq!(
            with, without,
            "access_token must not split keys: expected {without:?}, saw {with:?}"
        );
        assert!(
            !with.contains("secret"),
            "the credential leaked into the key {with:?}"
        );
        let only = get("/me", Some("access_token=secret"));
        assert_eq!(
            only, "GET /me",
            "a query of only the credential: expected \"GET /me\", saw {only:?}"
        );
    }

    #[test]
    fn equivalent_encodings_give_one_key() {
        let encoded = get("/x", Some("a=%41&q=hello%20world"));
        let plain = get("/x", Some("a=A&q=hello+world"));
        assert_eq!(
            encoded, plain,
            "equivalent encodings: expected {plain:?}, saw {encoded:?}"
        );
    }

    #[test]
    fn different_values_and_paths_differ() {
        let one = get("/x", Some("a=1"));
        let two = get("/x", Some("a=2"));
        assert_ne!(
            one, two,
            "different values must give different keys, both were {one:?}"
        );
        let other = get("/y", Some("a=1"));
        assert_ne!(
            one, other,
            "different paths must give different keys, both were {one:?}"
        );
        let flag = get("/x", Some("a"));
        let empty = get("/x", Some("a="));
        assert_eq!(
            flag, empty,
            "`a` and `a=` decode alike: expected {empty:?}, saw {flag:?}"
        );
    }

    #[test]
    fn repeated_names_keep_their_value_order() {
        let forward = get("/x", Some("id=1&b=0&id=2"));
        let backward = get("/x", Some("id=2&b=0&id=1"));
        assert_ne!(
            forward, backward,
            "value order of a repeated name matters, both were {forward:?}"
        );
        assert_eq!(
            forward, "GET /x?b=0&id=1&id=2",
            "expected names sorted, values in order; saw {forward:?}"
        );
    }

    #[test]
    fn names_the_upstream_folds_together_keep_their_order() {
        for (first, second) in [
            ("a.b=1&a_b=2", "a_b=2&a.b=1"),
            ("a+b=1&a_b=2", "a_b=2&a+b=1"),
            ("a%00x=1&a=2", "a=2&a%00x=1"),
            ("a[]=1&a=2", "a=2&a[]=1"),
        ] {
            let one = get("/x", Some(first));
            let two = get("/x", Some(second));
            assert_ne!(
                one, two,
                "{first:?} and {second:?} read differently upstream, both keys were {one:?}"
            );
        }
        let sorted = get("/x", Some("z=0&a_b=2&a.b=1"));
        assert_eq!(
            sorted, "GET /x?a_b=2&a.b=1&z=0",
            "expected folded names sorted, each pair's bytes kept; saw {sorted:?}"
        );
    }

    #[test]
    fn invalid_utf8_values_keep_their_bytes() {
        let ff = get("/x", Some("q=%ff"));
        let fe = get("/x", Some("q=%fe"));
        assert_ne!(
            ff, fe,
            "%ff and %fe are different bytes, both keys were {ff:?}"
        );
        assert_eq!(ff, "GET /x?q=%FF", "expected the byte kept, saw {ff:?}");
        let overlong = get("/x", Some("q=%c0%af"));
        let slash = get("/x", Some("q=%2f"));
        assert_ne!(
            overlong, slash,
            "an overlong `/` is not `/`, both were {slash:?}"
        );
        let broken = get("/x", Some("q=%f"));
        assert_eq!(
            broken, "GET /x?q=%25f",
            "a lone % stays a %, saw {broken:?}"
        );
    }
}
