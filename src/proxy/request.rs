//! What a client sent, checked before anything else happens (CONTRACT 3.1 and 3.3).
//!
//! Requests that could reach somewhere other than `upstream.base_url` (absolute-form targets
//! for other hosts, CONNECT, dot-segments raw or percent-encoded) are refused here, before
//! authentication, routing or the upstream see them. The client's credential is taken out
//! of the header or the query so it can never be forwarded or become part of a cache key.

use std::borrow::Cow;

use http::request::Parts;
use http::{header, HeaderMap, Method};

use crate::error::GatewayError;

/// Checks the request target: method, form and path. `own_hosts` are the authorities an
/// absolute-form target may name (the gateway's own and the upstream's).
pub fn check_target(parts: &Parts, own_hosts: &[String]) -> Result<(), GatewayError> {
    if parts.method == Method::CONNECT {
        return Err(GatewayError::BadRequest(
            "CONNECT is not supported: this is not a forward proxy",
        ));
    }
    if let Some(authority) = parts.uri.authority() {
        // HTTP/2 always carries :authority; the scheme tells an absolute-form HTTP/1 target.
        let host = authority.as_str();
        let absolute_form = parts.version < http::Version::HTTP_2 || parts.uri.scheme().is_none();
        if absolute_form && !own_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(GatewayError::BadRequest(
                "request target names another host",
            ));
        }
    }
    check_path(parts.uri.path())
}

/// Decodes percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 6.2.2.2):
/// `/%39%39/x` and `/99/x` are one resource to the upstream, so they must be one to routing,
/// account limits, the key parameter and the cache too. Every other escape stays an escape:
/// with `upper_case_kept` its hex is upper-cased (paths: `%c3%a9` and `%C3%A9` must give one
/// cache key and one tag), otherwise it is kept byte for byte (queries, whose keys decode
/// anyway). Invalid escapes are left as they are (`check_path` refuses them in paths).
pub fn normalise_escapes(text: &str, upper_case_kept: bool) -> std::borrow::Cow<'_, str> {
    if !text.contains('%') {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let b = (hi * 16 + lo) as u8;
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else if upper_case_kept {
                    out.push('%');
                    out.push(bytes[i + 1].to_ascii_uppercase() as char);
                    out.push(bytes[i + 2].to_ascii_uppercase() as char);
                } else {
                    out.push_str(&text[i..i + 3]);
                }
                i += 3;
                continue;
            }
        }
        // Every other byte is copied whole; a multi-byte character is copied byte by byte
        // through its char boundary below.
        let ch = text[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    std::borrow::Cow::Owned(out)
}

/// Refuses dot-segments (`.` or `..`, raw or percent-encoded, with `/` or `\` as separator),
/// invalid percent-encoding and encoded NUL bytes.
pub fn check_path(path: &str) -> Result<(), GatewayError> {
    if !path.starts_with('/') {
        return Err(GatewayError::BadRequest("request path must start with '/'"));
    }
    // Most paths have nothing to decode and no dot or backslash: nothing can hide there.
    if !path.bytes().any(|b| matches!(b, b'%' | b'.' | b'\\')) {
        return Ok(());
    }
    let decoded = percent_decode(path.as_bytes()).ok_or(GatewayError::BadRequest(
        "invalid percent-encoding in the path",
    ))?;
    if decoded.contains(&0) {
        return Err(GatewayError::BadRequest("NUL byte in the path"));
    }
    // CX Social paths are ids and names: bytes that are not UTF-8 (overlong dots included)
    // have no meaning there, and each decoder downstream could read them differently.
    if std::str::from_utf8(&decoded).is_err() {
        return Err(GatewayError::BadRequest(
            "the path is not UTF-8 once percent-decoded",
        ));
    }
    // Decoding twice catches %252e%252e, which a second decoder downstream would turn into "..".
    let twice = percent_decode(&decoded).unwrap_or_else(|| decoded.clone());
    for candidate in [&decoded, &twice] {
        if candidate
            .split(|&b| b == b'/' || b == b'\\')
            .any(|seg| seg == b".." || seg == b".")
        {
            return Err(GatewayError::BadRequest(
                "dot-segments are not allowed in the path",
            ));
        }
    }
    Ok(())
}

fn percent_decode(input: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while i < input.len() {
        if input[i] == b'%' {
            let hex = input.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(input[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The client's gateway key: `Authorization: Bearer <key>`, else the `access_token` query
/// parameter. Borrowed from the request unless the query parameter had to be decoded.
pub fn client_key<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<Cow<'a, str>> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let text = value.to_str().ok()?;
        let (scheme, rest) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| Cow::Borrowed(rest.trim()));
    }
    let query = query?;
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "access_token")
        .map(|(_, v)| v)
}

/// The query without any `access_token` parameter, or `None` if nothing remains. The other
/// parameters keep their original bytes and order.
pub fn strip_access_token(query: Option<&str>) -> Option<String> {
    let query = query?;
    if !query.contains("access_token") && !query.contains('%') && !query.contains('+') {
        return (!query.is_empty()).then(|| query.to_string());
    }
    // Names are compared as `client_key` and the cache key read them (form-decoded), so no
    // spelling that authenticates as the key can travel on.
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            !pair.is_empty()
                && form_urlencoded::parse(pair.as_bytes())
                    .next()
                    .is_none_or(|(name, _)| name != "access_token")
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: Method, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn dot_segments_are_refused_in_every_spelling() {
        for bad in [
            "/me/../admin",
            "/..",
            "/me/./x",
            "/%2e%2e/x",
            "/%2E%2e/x",
            "/.%2e/x",
            "/%2e./x",
            "/me%2f..%2fx",
            "/me\\..\\x",
            "/%252e%252e/x",
            "/me/%2e",
        ] {
            assert!(check_path(bad).is_err(), "{bad} should be refused");
        }
        for good in [
            "/me",
            "/me/",
            "/12/inbox/mentions",
            "/a..b/c",
            "/.well",
            "/x%20y",
        ] {
            assert!(check_path(good).is_ok(), "{good} should pass");
        }
        assert!(check_path("/bad%zz").is_err(), "invalid percent-encoding");
        assert!(check_path("/nul%00").is_err(), "encoded NUL");
        assert!(check_path("/me/%ff").is_err(), "not UTF-8");
        assert!(check_path("/me/%c0%ae").is_err(), "overlong dot");
        assert!(check_path("/me/caf%C3%A9").is_ok(), "UTF-8 é");
    }

    #[test]
    fn connect_and_foreign_absolute_targets_are_refused() {
        assert!(check_target(&parts(Method::CONNECT, "evil.example:443"), &[]).is_err());
        let own = ["127.0.0.1:8080".to_string()];
        assert!(check_target(&parts(Method::GET, "http://evil.example/me"), &own).is_err());
        assert!(check_target(&parts(Method::GET, "http://127.0.0.1:8080/me"), &own).is_ok());
        assert!(check_target(&parts(Method::GET, "/me"), &[]).is_ok());
    }

    #[test]
    fn unreserved_escapes_are_decoded_and_the_rest_upper_cased() {
        assert_eq!(normalise_escapes("/me", true), "/me");
        assert_eq!(normalise_escapes("/%39%39%39/inbox", true), "/999/inbox");
        assert_eq!(normalise_escapes("/caf%c3%a9/%2f", true), "/caf%C3%A9/%2F");
        assert_eq!(
            normalise_escapes("access%5ftoken=k", false),
            "access_token=k"
        );
        assert_eq!(
            normalise_escapes("%61ccess_token=k", false),
            "access_token=k"
        );
        assert_eq!(normalise_escapes("q=a%2fb%20c%0d", false), "q=a%2fb%20c%0d");
        assert_eq!(normalise_escapes("bad%zz%4", true), "bad%zz%4");
        assert_eq!(normalise_escapes("%", true), "%");
        assert_eq!(normalise_escapes("é%41", true), "éA");
    }

    #[test]
    fn key_comes_from_bearer_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(
            client_key(&h, Some("a=1&access_token=k1")),
            Some("k1".into())
        );
        h.insert(header::AUTHORIZATION, "Bearer k2".parse().unwrap());
        assert_eq!(client_key(&h, Some("access_token=k1")), Some("k2".into()));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(client_key(&h, None), None);
    }

    #[test]
    fn access_token_is_stripped_from_the_query() {
        assert_eq!(strip_access_token(Some("access_token=k")), None);
        assert_eq!(
            strip_access_token(Some("a=1&access_token=k&b=2")),
            Some("a=1&b=2".into())
        );
        assert_eq!(strip_access_token(Some("b=2&a=1")), Some("b=2&a=1".into()));
        assert_eq!(
            strip_access_token(Some("my_access_token=1")),
            Some("my_access_token=1".into())
        );
        assert_eq!(strip_access_token(None), None);
        // Every spelling that form-decodes to the name goes, also one that normalising
        // escapes once more would produce (`%%361` -> `%61`).
        for q in [
            "%61ccess_token=k&a=1",
            "access%5Ftoken=k&a=1",
            "%%361ccess_token=k&a=1",
        ] {
            let once = normalise_escapes(q, false);
            assert_eq!(strip_access_token(Some(&once)), Some("a=1".into()), "{q}");
        }
    }
}
