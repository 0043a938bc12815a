//! Resident memory per cached entry: 100,000 entries of 1.5 KB bodies in the store,
//! measured from /proc/self/statm before and after. Run: `cargo bench --bench memory`.

use std::time::Duration;

use bytes::Bytes;
use cxgate::cache::{cache_key, CachedResponse, Store};
use http::{HeaderMap, HeaderValue, Method, StatusCode};

const ENTRIES: usize = 100_000;
const BODY: usize = 1536;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let registry = prometheus::Registry::new();
        let store = Store::new(1 << 30, &registry).expect("store");
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(
            "date",
            HeaderValue::from_static("Wed, 25 Nov 2026 12:00:00 GMT"),
        );
        let req_headers = HeaderMap::new();
        let before = rss_bytes();
        for i in 0..ENTRIES {
            // Distinct bodies, as real contact profiles are: no sharing between entries.
            let mut body =
                format!("{{\"meta\":{{\"code\":200}},\"response\":{{\"id\":{i},\"bio\":\"");
            while body.len() < BODY - 3 {
                body.push((b'a' + (i % 26) as u8) as char);
            }
            body.push_str("\"}}");
            let key = cache_key(
                &Method::GET,
                &format!("/12345/inbox/contact/twitter/{i}"),
                None,
            );
            let entry = CachedResponse {
                status: StatusCode::OK,
                headers: headers.clone(),
                // The gateway stores an exact copy of each body (proxy/read.rs), so a
                // 1.5 KB body costs 1.5 KB here too, not the String's doubled capacity.
                body: Bytes::copy_from_slice(body.as_bytes()),
                tags: vec![
                    format!("account:12345"),
                    format!("contact:12345/twitter/{i}"),
                ]
                .into_boxed_slice(),
                stored_at: tokio::time::Instant::now(),
                ttl: Duration::from_secs(600),
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::from_secs(3600),
            };
            store.insert(key, &req_headers, entry).await;
        }
        // Serve every entry once, as a live cache does: a hit's first use of the stored
        // block is where `bytes` allocates its shared header, which belongs in the count.
        for i in 0..ENTRIES {
            let key = cache_key(
                &Method::GET,
                &format!("/12345/inbox/contact/twitter/{i}"),
                None,
            );
            let hit = store.get(&key, &req_headers).await.expect("a stored entry");
            assert_eq!(hit.body().len(), BODY, "entry {i}: body length");
        }
        store.run_pending_tasks().await;
        let after = rss_bytes();
        let per_entry = (after.saturating_sub(before)) as f64 / ENTRIES as f64;
        println!(
            "{ENTRIES} cached entries of {BODY} B bodies (entries held: {})",
            store.entry_count()
        );
        println!(
            "  resident memory added: {:.1} MiB",
            (after - before) as f64 / (1 << 20) as f64
        );
        println!(
            "  per entry: {per_entry:.0} B   = {:.2} B per body byte",
            per_entry / BODY as f64
        );
    });
}
