//! Route templates: `METHOD /path/{capture}` compiled once, matched per request.
//!
//! A `{name}` segment captures exactly one path segment, other segments match literally,
//! and a trailing slash never changes the match. Matching allocates nothing: captures are
//! slices of the request path, kept in a small fixed array.

use std::fmt;

/// One segment of a compiled path template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

/// A compiled `/path/{capture}` template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    segments: Vec<Segment>,
}

/// Most templates have two or three captures; eight is far above any CX Social path.
pub const MAX_CAPTURES: usize = 8;

/// The captures of one match, borrowed from the request path.
#[derive(Debug, Default, Clone)]
pub struct Captures<'a> {
    names: [&'a str; MAX_CAPTURES],
    values: [&'a str; MAX_CAPTURES],
    len: usize,
}

impl<'a> Captures<'a> {
    /// The value captured for `name`, if the template has it.
    pub fn get(&self, name: &str) -> Option<&'a str> {
        (0..self.len)
            .find(|&i| self.names[i] == name)
            .map(|i| self.values[i])
    }

    fn push(&mut self, name: &'a str, value: &'a str) {
        if self.len < MAX_CAPTURES {
            self.names[self.len] = name;
            self.values[self.len] = value;
            self.len += 1;
        }
    }
}

/// Why a template did not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("empty path segment (\"//\")")]
    EmptySegment,
    #[error("bad placeholder {0:?}: use {{name}} for a whole segment")]
    BadPlaceholder(String),
    #[error("placeholder {{{0}}} appears twice")]
    DuplicatePlaceholder(String),
    #[error("more than {MAX_CAPTURES} placeholders")]
    TooManyPlaceholders,
    #[error("unknown placeholder {{{0}}}")]
    UnknownPlaceholder(String),
    #[error("unclosed '{{'")]
    Unclosed,
}

impl PathTemplate {
    /// Compiles a template such as `/{account_id}/inbox/mentions`.
    pub fn parse(text: &str) -> Result<PathTemplate, TemplateError> {
        let rest = text.strip_prefix('/').ok_or(TemplateError::NotAbsolute)?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        if !rest.is_empty() {
            for part in rest.split('/') {
                segments.push(parse_segment(part)?);
            }
        }
        let captures: Vec<&String> = segments
            .iter()
            .filter_map(|s| match s {
                Segment::Capture(n) => Some(n),
                Segment::Literal(_) => None,
            })
            .collect();
        if captures.len() > MAX_CAPTURES {
            return Err(TemplateError::TooManyPlaceholders);
        }
        for (i, name) in captures.iter().enumerate() {
            if captures[..i].contains(name) {
                return Err(TemplateError::DuplicatePlaceholder((*name).clone()));
            }
        }
        Ok(PathTemplate { segments })
    }

    /// Whether the template captures `name`.
    pub fn has_capture(&self, name: &str) -> bool {
        self.segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) if n == name))
    }

    /// Matches a request path (no query). A trailing slash is ignored.
    pub fn matches<'a>(&'a self, path: &'a str) -> Option<Captures<'a>> {
        let rest = path.strip_prefix('/')?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut caps = Captures::default();
        let mut parts = rest.split('/').filter(|_| !rest.is_empty());
        for seg in &self.segments {
            let part = parts.next()?;
            match seg {
                Segment::Literal(lit) => {
                    if lit != part {
                        return None;
                    }
                }
                Segment::Capture(name) => {
                    if part.is_empty() {
                        return None;
                    }
                    caps.push(name, part);
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(caps)
    }
}

impl PathTemplate {
    /// Where a request path holds what this template captures as `name`, whether or not the
    /// template matches the path: the rest of `path` from that segment on, when the
    /// segments before it have the template's shape as the upstream would read them
    /// ([`loosely_equal`]: case-folded, escapes decoded, `;` parameters and spaces off) and
    /// whatever follows. `None` when `name` is the first segment or not captured, or the
    /// path is shorter or shaped otherwise.
    ///
    /// Authorisation reads account ids here rather than from a route's captures: a path a
    /// route does not match exactly (`/V2/9/data`, `/v2/9/data;x`, `/v2/9/Data`,
    /// `/v2/9/data/x`, another method) still reaches the upstream, which reads the same
    /// segment as the same account.
    pub fn segment_from<'a>(&self, name: &str, path: &'a str) -> Option<&'a str> {
        let index = self
            .segments
            .iter()
            .position(|s| matches!(s, Segment::Capture(n) if n == name))?;
        if index == 0 {
            return None;
        }
        let mut rest = path.strip_prefix('/')?;
        for seg in &self.segments[..index] {
            let (part, after) = rest.split_once('/')?;
            match seg {
                Segment::Literal(lit) if !loosely_equal(part, lit) => return None,
                _ => {}
            }
            rest = after;
        }
        if rest.is_empty() {
            return None;
        }
        Some(&path[path.len() - rest.len() - 1..])
    }
}

/// Whether a request path segment names the template literal `lit` as a lenient server
/// would read it: percent-escapes decoded, anything from `;` on dropped, surrounding
/// whitespace trimmed, letters compared without case.
fn loosely_equal(part: &str, lit: &str) -> bool {
    let decoded = percent_decode(part);
    let text = decoded.split(';').next().unwrap_or("");
    let text = text.trim_matches(|c: char| c.is_ascii_whitespace());
    text.eq_ignore_ascii_case(lit)
}

/// `%XX` escapes decoded (invalid ones kept as they are); bytes that are not UTF-8 become
/// replacement characters, which match no literal.
pub(crate) fn percent_decode(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('%') {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn parse_segment(part: &str) -> Result<Segment, TemplateError> {
    if part.is_empty() {
        return Err(TemplateError::EmptySegment);
    }
    if let Some(inner) = part.strip_prefix('{') {
        let name = inner.strip_suffix('}').ok_or(TemplateError::Unclosed)?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(TemplateError::BadPlaceholder(part.to_string()));
        }
        return Ok(Segment::Capture(name.to_string()));
    }
    if part.contains('{') || part.contains('}') {
        return Err(TemplateError::BadPlaceholder(part.to_string()));
    }
    Ok(Segment::Literal(part.to_string()))
}

impl fmt::Display for PathTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segments.is_empty() {
            return f.write_str("/");
        }
        for seg in &self.segments {
            match seg {
                Segment::Literal(l) => write!(f, "/{l}")?,
                Segment::Capture(c) => write!(f, "/{{{c}}}")?,
            }
        }
        Ok(())
    }
}

/// A tag such as `contact:{account_id}/{service}/{service_id}`, filled from captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate {
    parts: Vec<TagPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagPart {
    Text(String),
    Capture(String),
}

impl TagTemplate {
    /// Compiles a tag; every placeholder must be one of the route's captures.
    pub fn parse(text: &str, route: &PathTemplate) -> Result<TagTemplate, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                parts.push(TagPart::Text(rest[..open].to_string()));
            }
            let after = &rest[open + 1..];
            let close = after.find('}').ok_or(TemplateError::Unclosed)?;
            let name = &after[..close];
            if !route.has_capture(name) {
                return Err(TemplateError::UnknownPlaceholder(name.to_string()));
            }
            parts.push(TagPart::Capture(name.to_string()));
            rest = &after[close + 1..];
        }
        if rest.contains('}') {
            return Err(TemplateError::BadPlaceholder(text.to_string()));
        }
        if !rest.is_empty() {
            parts.push(TagPart::Text(rest.to_string()));
        }
        Ok(TagTemplate { parts })
    }

    /// The tag for one request.
    pub fn fill(&self, caps: &Captures<'_>) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                TagPart::Text(t) => out.push_str(t),
                TagPart::Capture(c) => out.push_str(caps.get(c).unwrap_or("")),
            }
        }
        out
    }
}

impl TagTemplate {
    /// The captures `tag` was filled with, if this template can have made it: each one path
    /// segment (not empty, no `/`), the same value wherever a name repeats. Two captures
    /// with no text between cannot be told apart, so such a template never matches.
    pub fn unfill(&self, tag: &str) -> Option<Vec<(String, String)>> {
        let mut rest = tag;
        let mut values: Vec<(String, String)> = Vec::new();
        let mut parts = self.parts.iter().peekable();
        while let Some(part) = parts.next() {
            match part {
                TagPart::Text(t) => rest = rest.strip_prefix(t.as_str())?,
                TagPart::Capture(name) => {
                    let end = match parts.peek() {
                        Some(TagPart::Text(t)) => rest.find(t.as_str())?,
                        Some(TagPart::Capture(_)) => return None,
                        None => rest.len(),
                    };
                    let value = &rest[..end];
                    if value.is_empty() || value.contains('/') {
                        return None;
                    }
                    match values.iter().find(|(n, _)| n == name) {
                        Some((_, seen)) if seen != value => return None,
                        Some(_) => {}
                        None => values.push((name.clone(), value.to_string())),
                    }
                    rest = &rest[end..];
                }
            }
        }
        rest.is_empty().then_some(values)
    }
}

impl PathTemplate {
    /// The path these captures make; `None` when one of the template's is not among them.
    pub fn fill(&self, values: &[(String, String)]) -> Option<String> {
        let mut out = String::new();
        for segment in &self.segments {
            out.push('/');
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::Capture(n) => out.push_str(&values.iter().find(|(k, _)| k == n)?.1),
            }
        }
        if out.is_empty() {
            out.push('/');
        }
        Some(out)
    }
}

/// The template as written: what [`TagTemplate::parse`] reads back.
impl fmt::Display for TagTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for part in &self.parts {
            match part {
                TagPart::Text(t) => f.write_str(t)?,
                TagPart::Capture(c) => write!(f, "{{{c}}}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_account_segment_is_found_in_paths_the_route_does_not_match() {
        let t = PathTemplate::parse("/v2/{account_id}/data").expect("template");
        for path in [
            "/v2/999/data",
            "/V2/999/data",
            "/v2/999/data;x",
            "/v2/999/data%20",
            "/v2/999/Data",
            "/v2/999/data/x",
            "/v2/999",
            "/v2;p=1/999/data",
            "/v%32/999/data",
            "/%20v2/999/data",
        ] {
            let at = t.segment_from("account_id", path);
            assert!(
                at.is_some_and(|rest| rest.starts_with("/999")),
                "expected {path} read at its second segment, saw {at:?}"
            );
        }
        for path in ["/v3/999/data", "/v2", "/v2/", "/x/v2/999", "/v2x/999"] {
            let at = t.segment_from("account_id", path);
            assert_eq!(at, None, "expected {path} not shaped like the template");
        }
        let first = PathTemplate::parse("/{account_id}/inbox").expect("template");
        assert_eq!(first.segment_from("account_id", "/1/inbox"), None);
        let any = PathTemplate::parse("/{service}/x/{account_id}").expect("template");
        assert_eq!(any.segment_from("account_id", "/abc/X/7"), Some("/7"));
    }

    #[test]
    fn a_filled_tag_gives_back_its_captures_and_path() {
        let path = PathTemplate::parse("/{account_id}/inbox/contact/{service}/{id}").unwrap();
        let tag = TagTemplate::parse("contact:{account_id}/{service}/{id}", &path).unwrap();
        let caps = tag
            .unfill("contact:12345/twitter/42")
            .expect("expected a match");
        assert_eq!(
            path.fill(&caps).as_deref(),
            Some("/12345/inbox/contact/twitter/42")
        );
        for other in [
            "contactv2:12345/twitter/42",
            "contact:12345/twitter",
            "contact:1/a/b/c",
        ] {
            assert!(
                tag.unfill(other).is_none(),
                "expected {other:?} not matched"
            );
        }
        let partial = TagTemplate::parse("account:{account_id}", &path).unwrap();
        let caps = partial.unfill("account:12345").expect("expected a match");
        assert_eq!(
            path.fill(&caps),
            None,
            "expected no path without every capture"
        );
    }

    use super::*;

    #[test]
    fn literal_and_capture_segments_match() {
        let t = PathTemplate::parse("/{account_id}/inbox/contact/{service}/{service_id}").unwrap();
        let caps = t
            .matches("/12345/inbox/contact/twitter/99")
            .expect("should match");
        assert_eq!(caps.get("account_id"), Some("12345"));
        assert_eq!(caps.get("service"), Some("twitter"));
        assert_eq!(caps.get("service_id"), Some("99"));
        assert!(
            t.matches("/12345/inbox/contact/twitter").is_none(),
            "too short"
        );
        assert!(
            t.matches("/12345/inbox/contact/twitter/99/x").is_none(),
            "too long"
        );
        assert!(
            t.matches("/12345/outbox/contact/twitter/99").is_none(),
            "literal differs"
        );
    }

    #[test]
    fn trailing_slash_never_changes_the_match() {
        let t = PathTemplate::parse("/me").unwrap();
        assert!(t.matches("/me").is_some());
        assert!(t.matches("/me/").is_some());
        assert!(t.matches("/me/accounts").is_none());
        let root = PathTemplate::parse("/").unwrap();
        assert!(root.matches("/").is_some());
        assert!(root.matches("/me").is_none());
        assert_eq!(root.to_string(), "/");
    }

    #[test]
    fn empty_capture_does_not_match() {
        let t = PathTemplate::parse("/{account_id}/settings").unwrap();
        assert!(t.matches("//settings").is_none());
    }

    #[test]
    fn bad_templates_are_rejected() {
        assert_eq!(PathTemplate::parse("me"), Err(TemplateError::NotAbsolute));
        assert_eq!(
            PathTemplate::parse("/a//b"),
            Err(TemplateError::EmptySegment)
        );
        assert!(matches!(
            PathTemplate::parse("/x{id}"),
            Err(TemplateError::BadPlaceholder(_))
        ));
        assert!(matches!(
            PathTemplate::parse("/{id}/{id}"),
            Err(TemplateError::DuplicatePlaceholder(_))
        ));
        assert_eq!(PathTemplate::parse("/{id"), Err(TemplateError::Unclosed));
    }

    #[test]
    fn tags_fill_from_captures_and_reject_unknown_names() {
        let t = PathTemplate::parse("/{account_id}/inbox/contact/{service}/{service_id}").unwrap();
        let tag = TagTemplate::parse("contact:{account_id}/{service}/{service_id}", &t).unwrap();
        let caps = t.matches("/1/inbox/contact/fb/2").unwrap();
        assert_eq!(tag.fill(&caps), "contact:1/fb/2");
        assert_eq!(
            TagTemplate::parse("account:{acount_id}", &t),
            Err(TemplateError::UnknownPlaceholder("acount_id".into()))
        );
    }
}
