//! `paged_list` answers: `limit`/`page_token` parsing and the absolute paging links.
//!
//! Invariants: `limit` is 1..=200 (default 20), anything else is a 400; a page token is an
//! offset the simulator issued itself; `next_url`/`prev_url` are absolute URLs on the
//! caller's base, keep the caller's other parameters, and carry `access_token=<the caller's
//! token>` on purpose: the gateway must strip it before its clients see the link.

use serde_json::{json, Value};

pub(crate) const DEFAULT_LIMIT: u64 = 20;
pub(crate) const MAX_LIMIT: u64 = 200;

/// What one API call carries, as the handlers need it.
pub(crate) struct Call<'a> {
    /// `http://host:port` as the caller addressed the simulator.
    pub base: &'a str,
    /// The raw request path, without query.
    pub path: &'a str,
    pub query: Vec<(String, String)>,
    pub form: Vec<(String, String)>,
    pub token: &'a str,
}

impl Call<'_> {
    /// A parameter from the form body first, then from the query string.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .chain(self.query.iter())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Page {
    pub offset: u64,
    pub limit: u64,
}

impl Page {
    pub fn parse(call: &Call<'_>) -> Result<Page, String> {
        let limit = match call.query_param("limit") {
            None => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| format!("limit must be 1 to {MAX_LIMIT}, got {text:?}"))?,
        };
        let offset = match call.query_param("page_token") {
            None | Some("") => 0,
            Some(token) => token
                .strip_prefix("pt")
                .and_then(|n| n.parse::<u64>().ok())
                .ok_or_else(|| format!("unknown page_token {token:?}"))?,
        };
        Ok(Page { offset, limit })
    }

    /// The positions of this page within `total` items.
    pub fn range(&self, total: u64) -> std::ops::Range<usize> {
        let start = self.offset.min(total);
        let end = self.offset.saturating_add(self.limit).min(total);
        start as usize..end as usize
    }
}

fn link(call: &Call<'_>, limit: u64, offset: u64) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    for (key, value) in &call.query {
        if !matches!(key.as_str(), "limit" | "page_token" | "access_token") {
            query.append_pair(key, value);
        }
    }
    query.append_pair("limit", &limit.to_string());
    query.append_pair("page_token", &format!("pt{offset}"));
    query.append_pair("access_token", call.token);
    format!("{}{}?{}", call.base, call.path, query.finish())
}

/// The `paged_list` object for one page of `total` items.
pub(crate) fn paged_list(call: &Call<'_>, page: Page, total: u64, data: Vec<Value>) -> Value {
    let next = page.offset.saturating_add(page.limit);
    let next_url = (next < total).then(|| link(call, page.limit, next));
    let prev_url =
        (page.offset > 0).then(|| link(call, page.limit, page.offset.saturating_sub(page.limit)));
    json!({
        "count": total,
        "data": data,
        "paging": {"prev_url": prev_url, "next_url": next_url},
    })
}

/// Pages an already built list.
pub(crate) fn paged(call: &Call<'_>, page: Page, list: Vec<Value>) -> Value {
    let total = list.len() as u64;
    let range = page.range(total);
    let data = list
        .into_iter()
        .skip(range.start)
        .take(range.len())
        .collect();
    paged_list(call, page, total, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(query: &[(&str, &str)]) -> Call<'static> {
        Call {
            base: "http://127.0.0.1:9",
            path: "/12345/inbox/mentions",
            query: query
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            form: Vec::new(),
            token: "tok en",
        }
    }

    #[test]
    fn limit_bounds() {
        assert_eq!(
            Page::parse(&call(&[])),
            Ok(Page {
                offset: 0,
                limit: 20
            })
        );
        assert!(
            Page::parse(&call(&[("limit", "0")])).is_err(),
            "expected 0 refused"
        );
        assert!(
            Page::parse(&call(&[("limit", "201")])).is_err(),
            "expected 201 refused"
        );
        assert!(Page::parse(&call(&[("page_token", "zz")])).is_err());
        let page = Page::parse(&call(&[("limit", "200"), ("page_token", "pt40")]));
        assert_eq!(
            page,
            Ok(Page {
                offset: 40,
                limit: 200
            })
        );
    }

    #[test]
    fn links_are_absolute_and_carry_token() {
        let c = call(&[("sort", "asc"), ("access_token", "old"), ("limit", "2")]);
        let list: Vec<Value> = (0..5).map(|n| json!(n)).collect();
        let v = paged(
            &c,
            Page {
                offset: 2,
                limit: 2,
            },
            list,
        );
        assert_eq!(v["data"], json!([2, 3]), "saw {v}");
        assert_eq!(
            v["paging"]["next_url"],
            "http://127.0.0.1:9/12345/inbox/mentions?sort=asc&limit=2&page_token=pt4&access_token=tok+en"
        );
        assert_eq!(
            v["paging"]["prev_url"],
            "http://127.0.0.1:9/12345/inbox/mentions?sort=asc&limit=2&page_token=pt0&access_token=tok+en"
        );
        let last = paged(
            &c,
            Page {
                offset: 4,
                limit: 2,
            },
            (0..5).map(|n| json!(n)).collect(),
        );
        assert!(
            last["paging"]["next_url"].is_null(),
            "expected no next on last page"
        );
    }
}
