//! Cache keys: HEAD and GET share a key, a trailing slash changes nothing, and the value of
//! the `access_token` parameter never reaches a key.
#![no_main]

use cxgate::cache::cache_key;
use http::Method;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "zQ9tokSECRET7x1Kp";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let key = cache_key(&Method::GET, path, query);
    assert_eq!(
        key,
        cache_key(&Method::HEAD, path, query),
        "HEAD and GET keys differ"
    );
    if path.starts_with('/') {
        let slashed = format!("{path}/");
        assert_eq!(
            key,
            cache_key(&Method::GET, &slashed, query),
            "a trailing slash changed the key"
        );
    }
    if !text.contains(SECRET) {
        let with = match query {
            Some(q) => format!("{q}&access_token={SECRET}"),
            None => format!("access_token={SECRET}"),
        };
        let keyed = cache_key(&Method::GET, path, Some(&with));
        assert!(
            !keyed.contains(SECRET),
            "the credential reached the key {keyed:?}"
        );
    }
});
