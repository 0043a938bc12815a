//! What a client sent, checked before anything else happens.
//!
//! Requests that could reach somewhere other than `upstream.base_url` (absolute-form targets
//! for other hosts, CONNECT, dot-segments raw or percent-encoded) are refused here, before
//! authentication, routing or the upstream see them. The client's credential is taken out
//! of the header or the query so it can never be forwarded or become part of a cache key.

use std::borrow::Cow;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, Method};

use crate::error::GatewayError;

/// Checks the request target: method and form (its path is [`canonical_path`]'s).
/// `own_hosts` are the authorities an absolute-form target may name (the gateway's own and
/// the upstream's).
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
    Ok(())
}

/// A request path in its one spelling (escapes of unreserved characters decoded, the rest
/// upper-cased: [`normalise_escapes`]), which routing, account limits, the cache key and the
/// upstream all read; or why no client request may have it ([`check_path`]). A purge by
/// path reads its path here too, so it names the entries a request of that path is served
/// from, and a path no request can have is refused rather than purging nothing.
pub fn canonical_path(path: &str) -> Result<Cow<'_, str>, GatewayError> {
    check_path(path)?;
    Ok(normalise_escapes(path, true))
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
    // An empty segment (`//evil/...`) reads as an authority or a different route to some.
    if path.contains("//") {
        return Err(GatewayError::BadRequest(
            "empty segments are not allowed in the path",
        ));
    }
    // Most paths have nothing to decode and no dot, backslash or `;`: nothing can hide there.
    if !path
        .bytes()
        .any(|b| matches!(b, b'%' | b'.' | b'\\' | b';'))
    {
        return Ok(());
    }
    if path.contains('\\') {
        return Err(GatewayError::BadRequest(
            "backslashes are not allowed in the path",
        ));
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
    // `;` starts a path parameter to some servers (`/_sim;x/stats` is `/_sim/stats` to
    // them) and is plain text to others: no two readers agree on such a path.
    // Decoding twice catches %252e%252e, which a second decoder downstream would turn into "..".
    let twice = percent_decode(&decoded).unwrap_or_else(|| decoded.clone());
    if decoded.contains(&b';') || twice.contains(&b';') {
        return Err(GatewayError::BadRequest(
            "path parameters (';') are not allowed in the path",
        ));
    }
    for candidate in [path.as_bytes(), &decoded] {
        let lower = candidate.to_ascii_lowercase();
        if find_bytes(&lower, b"%2f", 0).is_some() || find_bytes(&lower, b"%5c", 0).is_some() {
            return Err(GatewayError::BadRequest(
                "encoded slashes or backslashes are not allowed in the path",
            ));
        }
    }
    for candidate in [&decoded, &twice] {
        // `..;x` is `..` to servers that cut path parameters (Tomcat and its kin).
        if candidate
            .split(|&b| b == b'/' || b == b'\\')
            .map(|seg| seg.split(|&b| b == b';').next().unwrap_or_default())
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
        // Only the first is read here; `one_authorization` refuses a request with more.
        let text = value.to_str().ok()?;
        let (scheme, rest) = text.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| Cow::Borrowed(rest.trim()));
    }
    let query = query?;
    query_keys(query).into_iter().next()
}

/// Refuses a request with more than one `Authorization` header: servers disagree on
/// which counts (the first, the last, both joined), so none is guessed.
pub fn one_authorization(headers: &HeaderMap) -> Result<(), GatewayError> {
    if headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(GatewayError::BadRequest(
            "the request carries more than one Authorization header",
        ));
    }
    Ok(())
}

/// Refuses a request with more than one `Content-Type` header: the gateway would read the
/// body by the first and the upstream might by another (a key JSON-escaped under a
/// `text/plain` that comes first), so none is guessed.
pub fn one_content_type(headers: &HeaderMap) -> Result<(), GatewayError> {
    if headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .nth(1)
        .is_some()
    {
        return Err(GatewayError::BadRequest(
            "the request carries more than one Content-Type header",
        ));
    }
    Ok(())
}

/// Every value of a key parameter in the query (see [`is_key_name`]).
pub fn query_keys(query: &str) -> Vec<Cow<'_, str>> {
    query
        .split('&')
        .filter(|pair| is_key_name(pair.split('=').next().unwrap_or_default().as_bytes()))
        .filter_map(|pair| {
            form_urlencoded::parse(pair.as_bytes())
                .next()
                .map(|(_, v)| v)
        })
        .collect()
}

/// Whether a form or query parameter name (as sent, still encoded) is the gateway key's
/// `access_token`, in any spelling a server could read as it: percent- or plus-encoded
/// (`access%5Ftoken`, also encoded twice), any letter case, and the names PHP (the
/// upstream's language) folds into `access_token`: `access.token`, `access token`,
/// `access[token`, ` access_token` and the array forms `access_token[]`, `access_token[x]`.
pub fn is_key_name(raw: &[u8]) -> bool {
    reads_as_one_of(raw, &["access_token"])
}

/// Whether a parameter name, as sent (still encoded), is one of `names` to a server:
/// form-decoded once or, if that leaves escapes, twice, then folded as PHP folds it
/// ([`php_name`]) and compared in any letter case. The one reading both the key name and
/// the method-override names go through.
fn reads_as_one_of(raw: &[u8], names: &[&str]) -> bool {
    let once: String = form_urlencoded::parse(&[raw, b"=".as_slice()].concat())
        .next()
        .map(|(name, _)| name.into_owned())
        .unwrap_or_default();
    let is_named = |decoded: &str| {
        let folded = php_name(decoded);
        names.iter().any(|n| folded.eq_ignore_ascii_case(n))
    };
    if is_named(&once) {
        return true;
    }
    once.contains('%')
        && percent_decode(once.as_bytes())
            .map(|twice| is_named(&String::from_utf8_lossy(&twice)))
            .unwrap_or(false)
}

/// PHP's reading of a (decoded) parameter name: cut at a NUL, leading spaces dropped, an
/// array suffix cut at its first `[`, and `.`, ` ` and a lone `[` turned into `_`. Two
/// names with one reading are one variable upstream.
pub fn php_name(name: &str) -> String {
    let name = name.split('\0').next().unwrap_or_default();
    let name = name.trim_start_matches(' ');
    let name = match name.find('[') {
        Some(open) if name[open..].contains(']') => &name[..open],
        _ => name,
    };
    name.chars()
        .map(|c| if matches!(c, '.' | ' ' | '[') { '_' } else { c })
        .collect()
}

/// A request body with every gateway key field taken out, and the keys it carried.
#[derive(Debug)]
pub struct BodyKeys {
    pub body: Bytes,
    pub keys: Vec<String>,
}

/// Takes every `access_token` field (see [`is_key_name`]) out of a form-encoded, multipart
/// or JSON body: the API reads the token from a form POST too, so a gateway key there is
/// a client credential like one in the header, and must never travel on. Other content
/// types are passed through; a compressed body cannot be scanned and is refused.
pub fn take_body_keys(headers: &HeaderMap, body: Bytes) -> Result<BodyKeys, GatewayError> {
    if body.is_empty() {
        return Ok(BodyKeys {
            body,
            keys: Vec::new(),
        });
    }
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    if encoded {
        return Err(GatewayError::BadRequest(
            "compressed request bodies are not accepted (send the body without Content-Encoding)",
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if may_read_as_json(headers) && !utf8_text(&body) {
        return Err(GatewayError::BadRequest(
            "a JSON request body (or one without a Content-Type) must be UTF-8 text: \
             UTF-16, UTF-32 and NUL bytes cannot be checked for keys",
        ));
    }
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // The scans read ASCII bytes as they are: text in UTF-16 or UTF-32 (declared, or told
    // by its NUL bytes) hides a key from them, whatever the type, so it is not forwarded.
    let declared = param(content_type, "charset");
    if declared.is_some_and(|c| !ascii_compatible(&c)) || (textual(&media) && body.contains(&0)) {
        return Err(GatewayError::BadRequest(BODY_CHARSET));
    }
    match media.as_str() {
        "application/x-www-form-urlencoded" => Ok(take_form_keys(body)),
        "multipart/form-data" => {
            let boundary = param(content_type, "boundary").ok_or(GatewayError::BadRequest(
                "multipart body without a boundary",
            ))?;
            take_multipart_keys(body, boundary.as_bytes())
        }
        m if is_json(m) => take_json_keys(body),
        _ => Ok(BodyKeys {
            body,
            keys: Vec::new(),
        }),
    }
}

/// Whether the upstream might read this request's body as JSON: its `Content-Type` names
/// `json` anywhere (`text/json`, `application/x-json`, a list such as `text/plain,
/// application/json`), or JavaScript, or there is none (a server may then guess).
fn may_read_as_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return true;
    };
    let value = String::from_utf8_lossy(value.as_bytes()).to_ascii_lowercase();
    value.trim().is_empty() || value.contains("json") || value.contains("javascript")
}

/// The refusal of a body (or a multipart part) whose text the key scans cannot read.
const BODY_CHARSET: &str = "a request body's charset must be UTF-8 or another ASCII-compatible \
     one: UTF-16, UTF-32 and NUL bytes in text cannot be checked for keys";

/// A charset in which ASCII (so every key byte) is written as ASCII: the ones clients send
/// forms and text in. Anything else (UTF-16, UTF-32, UTF-7, EBCDIC) is refused.
fn ascii_compatible(charset: &str) -> bool {
    let c = charset.trim().trim_matches('"').to_ascii_lowercase();
    matches!(
        c.as_str(),
        "utf-8" | "utf8" | "us-ascii" | "ascii" | "iso-8859-1" | "latin1" | "windows-1252"
    ) || c
        .strip_prefix("iso-8859-")
        .is_some_and(|n| n.parse::<u8>().is_ok())
}

/// A media type that is text for its reader (so a NUL byte in it means UTF-16 or UTF-32):
/// `text/*`, forms, JSON and XML. Multipart is not: its file parts may be binary, and its
/// text parts' charsets are checked one by one.
fn textual(media: &str) -> bool {
    media.starts_with("text/")
        || media == "application/x-www-form-urlencoded"
        || media.contains("json")
        || media.ends_with("xml")
}

/// UTF-8 with no NUL byte: JSON text never holds a raw NUL, and UTF-16 or UTF-32 text of
/// ASCII characters (with or without a byte-order mark) always does or is not UTF-8.
fn utf8_text(body: &[u8]) -> bool {
    std::str::from_utf8(body).is_ok() && !body.contains(&0)
}

/// `application/json` and the `+json` media types.
fn is_json(media: &str) -> bool {
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// Takes every top-level `access_token` member out of a JSON object body. Member names are
/// compared once unescaped, as the upstream's JSON decoder reads them
/// (`"access\u005ftoken"` is `access_token`), by the same rule as form field names. A body
/// that is not a JSON object is passed on as it is (the upstream cannot read a member from
/// it either); the last check before forwarding still looks for the caller's key in it.
fn take_json_keys(body: Bytes) -> Result<BodyKeys, GatewayError> {
    // Every member as written, repeated names included: a map keeps only the last of two
    // `access_token` members, and the caller must be judged by all of them.
    let Ok(Members(all)) = serde_json::from_slice::<Members>(&body) else {
        return Ok(BodyKeys {
            body,
            keys: Vec::new(),
        });
    };
    let is_key = |name: &str| php_name(name).eq_ignore_ascii_case("access_token");
    if !all.iter().any(|(name, _)| is_key(name)) {
        return Ok(BodyKeys {
            body,
            keys: Vec::new(),
        });
    }
    let mut keys = Vec::new();
    let mut members = serde_json::Map::new();
    for (name, value) in all {
        if !is_key(&name) {
            members.insert(name, value);
            continue;
        }
        match value {
            serde_json::Value::String(key) => keys.push(key),
            _ => {
                return Err(GatewayError::BadRequest(
                    "an access_token member of a JSON body must be a string",
                ))
            }
        }
    }
    let body = serde_json::to_vec(&serde_json::Value::Object(members))
        .map_err(|_| GatewayError::BadRequest("the JSON body cannot be written back"))?;
    Ok(BodyKeys {
        body: Bytes::from(body),
        keys,
    })
}

/// A JSON object's members in order, a name that appears twice kept twice.
struct Members(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Members, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Members, A::Error> {
                let mut all = Vec::new();
                while let Some(member) = map.next_entry::<String, serde_json::Value>()? {
                    all.push(member);
                }
                Ok(Members(all))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// The request's media type, lower-cased, without parameters.
fn media_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
}

/// Whether a body of this request may carry a key field (so it is read before the caller
/// is authenticated when no key came in the header or query).
pub fn may_carry_key(headers: &HeaderMap) -> bool {
    media_type(headers).is_some_and(|m| {
        m == "application/x-www-form-urlencoded" || m == "multipart/form-data" || is_json(&m)
    })
}

fn take_form_keys(body: Bytes) -> BodyKeys {
    let mut keys = Vec::new();
    let mut kept: Vec<&[u8]> = Vec::new();
    for pair in body.split(|&b| b == b'&') {
        let name = pair.split(|&b| b == b'=').next().unwrap_or_default();
        if is_key_name(name) {
            let value = pair.get(name.len() + 1..).unwrap_or_default();
            let value = form_urlencoded::parse(&[b"k=".as_slice(), value].concat())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            keys.push(value);
        } else {
            kept.push(pair);
        }
    }
    if keys.is_empty() {
        return BodyKeys { body, keys };
    }
    BodyKeys {
        body: Bytes::from(kept.join(&b'&')),
        keys,
    }
}

/// One `name=value` parameter of a header such as `Content-Type` or `Content-Disposition`,
/// unquoted (backslash escapes undone). Parameter names compare case-insensitively.
fn param(header_value: &str, wanted: &str) -> Option<String> {
    let mut rest = header_value.split_once(';')?.1;
    loop {
        let (name, after) = rest.split_once('=')?;
        let name = name.trim();
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, escaped)) = chars.next() {
                            value.push(escaped);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => value.push(c),
                }
            }
            let next = quoted[end..].split_once(';').map_or("", |(_, n)| n);
            (value, next)
        } else {
            let (value, next) = after.split_once(';').unwrap_or((after, ""));
            (value.trim().to_string(), next)
        };
        if name.eq_ignore_ascii_case(wanted) {
            return Some(value);
        }
        if next.is_empty() {
            return None;
        }
        rest = next;
    }
}

/// The field name a multipart part's headers give it: `name`, or an RFC 5987 `name*`
/// (`UTF-8''access%5Ftoken`), as raw bytes for [`is_key_name`].
fn part_names(head: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(head);
    let mut names = Vec::new();
    for line in text.split("\r\n") {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        if !field.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        if let Some(name) = param(value, "name") {
            names.push(name);
        }
        if let Some(extended) = param(value, "name*") {
            let encoded = extended.rsplit('\'').next().unwrap_or("");
            names.push(encoded.to_string());
        }
    }
    names
}

/// Why a multipart part cannot be checked for keys as sent, if it cannot: a
/// `Content-Transfer-Encoding` other than `7bit`, `8bit` or `binary` (quoted-printable and
/// base64 hide every byte), or text in a charset other than UTF-8 (UTF-16 and the like).
fn unscannable_part(head: &[u8]) -> Option<&'static str> {
    let text = String::from_utf8_lossy(head);
    for line in text.split("\r\n") {
        let Some((field, value)) = line.split_once(':') else {
            continue;
        };
        let field = field.trim();
        if field.eq_ignore_ascii_case("content-transfer-encoding") {
            let coding = value.trim().to_ascii_lowercase();
            if !matches!(coding.as_str(), "7bit" | "8bit" | "binary") {
                return Some(
                    "a multipart part may not have a Content-Transfer-Encoding other than \
                     7bit, 8bit or binary: it cannot be checked for keys",
                );
            }
        }
        if field.eq_ignore_ascii_case("content-type")
            && param(value, "charset").is_some_and(|c| !ascii_compatible(&c))
        {
            return Some(BODY_CHARSET);
        }
    }
    None
}

fn take_multipart_keys(body: Bytes, boundary: &[u8]) -> Result<BodyKeys, GatewayError> {
    let unreadable = GatewayError::BadRequest("the multipart body could not be read");
    if boundary.is_empty() {
        return Err(unreadable);
    }
    let delimiter = [b"--".as_slice(), boundary].concat();
    // Every place a delimiter line starts: at the very beginning, or after CRLF.
    let mut starts = Vec::new();
    let mut from = 0;
    while let Some(at) = find_bytes(&body, &delimiter, from) {
        if at == 0 || body[..at].ends_with(b"\r\n") {
            starts.push(if at == 0 { 0 } else { at - 2 });
        }
        from = at + delimiter.len();
    }
    let Some((&last, _)) = starts.split_last() else {
        return Err(unreadable);
    };
    let closing = last + if last == 0 { 0 } else { 2 } + delimiter.len();
    if !body[closing..].starts_with(b"--") {
        return Err(unreadable);
    }
    let mut keys = Vec::new();
    let mut dropped: Vec<(usize, usize)> = Vec::new();
    for pair in starts.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        let part = &body[start..end];
        let Some(head_end) = find_bytes(part, b"\r\n\r\n", 0) else {
            return Err(unreadable);
        };
        let head = &part[..head_end];
        if let Some(refused) = unscannable_part(head) {
            return Err(GatewayError::BadRequest(refused));
        }
        let names = part_names(head);
        if names.iter().any(|n| is_key_name(n.as_bytes())) {
            let value = &part[head_end + 4..];
            keys.push(String::from_utf8_lossy(value).trim().to_string());
            dropped.push((start, end));
        }
    }
    if dropped.is_empty() {
        return Ok(BodyKeys { body, keys });
    }
    let mut out = Vec::with_capacity(body.len());
    let mut copied = 0;
    for (start, end) in dropped {
        out.extend_from_slice(&body[copied..start]);
        copied = end;
    }
    out.extend_from_slice(&body[copied..]);
    // The first part began the body without a CRLF before its delimiter: a body that now
    // starts with the CRLF of the next one must not.
    let out = match out.strip_prefix(b"\r\n") {
        Some(rest) if starts[0] == 0 => rest.to_vec(),
        _ => out,
    };
    Ok(BodyKeys {
        body: Bytes::from(out),
        keys,
    })
}

/// The one key a request presents: every place that carries one (`first`, then `more`)
/// must carry the same, or the request is refused rather than guessing which counts.
pub fn one_key<'k>(
    first: Option<&'k str>,
    more: impl Iterator<Item = &'k str>,
) -> Result<Option<&'k str>, GatewayError> {
    let mut key = first;
    for other in more {
        match key {
            None => key = Some(other),
            Some(k) if k == other => {}
            Some(_) => {
                return Err(GatewayError::BadRequest(
                    "the request carries more than one gateway key",
                ))
            }
        }
    }
    Ok(key)
}

/// Whether the head announces a body (a `Content-Length` other than 0, or any
/// `Transfer-Encoding`).
pub fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|v| v.as_bytes().iter().any(|&b| b != b'0'))
}

/// The query spellings of a method override: Laravel's and Symfony's `_method`, and the
/// override headers as a query parameter, with hyphens or (as PHP's `$_SERVER` spells
/// headers) underscores.
const OVERRIDE_NAMES: &[&str] = &[
    "_method",
    "x-http-method-override",
    "x_http_method_override",
    "x-http-method",
    "x_http_method",
    "x-method-override",
    "x_method_override",
];

/// Whether the query asks for another method (`_method=DELETE`,
/// `X-HTTP-Method-Override=...`): some frameworks upstream obey it, which would turn a
/// read into a write past the client's scopes. Names are read exactly as the key name is
/// ([`is_key_name`]): any case, percent-encoded once or twice, and PHP's folding
/// (`_method[]`, `_method%00`, ` _method`, `.`/space for `_`).
pub fn overrides_method(query: &str) -> bool {
    query.split('&').any(|pair| {
        let name = pair.split('=').next().unwrap_or_default();
        // PHP reads `_method ` as `_method_`, but servers that trim names read `_method`.
        reads_as_one_of(name.as_bytes(), OVERRIDE_NAMES)
            || reads_as_one_of(name.trim_end_matches(['+', ' ']).as_bytes(), OVERRIDE_NAMES)
    })
}

fn find_bytes(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    if needle.is_empty() || from > hay.len() {
        return None;
    }
    hay[from..]
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| i + from)
}

/// The query without any `access_token` parameter, or `None` if nothing remains. The other
/// parameters keep their original bytes and order.
pub fn strip_access_token(query: Option<&str>) -> Option<String> {
    let query = query?;
    let may_name_key = query
        .as_bytes()
        .windows(6)
        .any(|w| w.eq_ignore_ascii_case(b"access"));
    if !may_name_key && !query.contains('%') && !query.contains('+') {
        return (!query.is_empty()).then(|| query.to_string());
    }
    // Names are compared as `client_key` and the cache key read them (form-decoded), so no
    // spelling that authenticates as the key can travel on.
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            !pair.is_empty() && !is_key_name(pair.split('=').next().unwrap_or_default().as_bytes())
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leak::carries_key;

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

    #[test]
    fn every_spelling_of_the_key_name_is_the_key() {
        for name in [
            "access_token",
            "ACCESS_TOKEN",
            "access%5Ftoken",
            "access%5ftoken",
            "%61ccess_token",
            "access%255Ftoken",
            "access.token",
            "access+token",
            "access%20token",
            "access[token",
            "access_token[]",
            "access_token[0]",
            "+access_token",
        ] {
            assert!(
                is_key_name(name.as_bytes()),
                "{name} should be the key name"
            );
        }
        for name in ["my_access_token", "access_tokens", "token", "access"] {
            assert!(!is_key_name(name.as_bytes()), "{name} is another name");
        }
    }

    fn form_headers(content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        h
    }

    #[test]
    fn key_fields_are_taken_out_of_form_bodies() {
        let h = form_headers("application/x-www-form-urlencoded");
        let body = Bytes::from_static(b"updates=%7B%7D&access%5Ftoken=k%2B1&note=x");
        let out = take_body_keys(&h, body).unwrap();
        assert_eq!(out.keys, ["k+1"]);
        assert_eq!(&out.body[..], b"updates=%7B%7D&note=x");
        let plain = take_body_keys(&h, Bytes::from_static(b"a=1")).unwrap();
        assert!(plain.keys.is_empty() && &plain.body[..] == b"a=1");
    }

    #[test]
    fn key_parts_are_taken_out_of_multipart_bodies() {
        let h = form_headers("multipart/form-data; boundary=\"XyZ\"");
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"access_token\"\r\n\r\nkey-1\r\n\
                    --XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n\
                    --XyZ\r\ncontent-disposition: form-data; name*=UTF-8''access%5Ftoken\r\n\r\nkey-1\r\n\
                    --XyZ--\r\n";
        let out = take_body_keys(&h, Bytes::from(body)).unwrap();
        assert_eq!(out.keys, ["key-1", "key-1"]);
        let kept = String::from_utf8(out.body.to_vec()).unwrap();
        assert_eq!(
            kept,
            "--XyZ\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n--XyZ--\r\n"
        );
        assert!(take_body_keys(&h, Bytes::from_static(b"garbage")).is_err());
        let encoded = {
            let mut h = h.clone();
            h.insert(header::CONTENT_ENCODING, "gzip".parse().unwrap());
            h
        };
        assert!(take_body_keys(&encoded, Bytes::from_static(b"x")).is_err());
    }

    #[test]
    fn one_key_per_request() {
        assert_eq!(one_key(Some("a"), ["a"].into_iter()).unwrap(), Some("a"));
        assert_eq!(one_key(None, ["b"].into_iter()).unwrap(), Some("b"));
        assert!(one_key(Some("a"), ["b"].into_iter()).is_err());
        assert!(carries_key(b"x=test-key-1", "test-key-1"));
        assert!(carries_key(b"x=a%2Bbcdefgh", "a+bcdefgh"));
        assert!(carries_key(b"x=short", "short"));
        assert!(carries_key(b"x=%6B%65y1", "key1"));
    }
}
