//! Unit tests of `Store`, kept beside it so store.rs stays one screenful of logic.

use super::*;
use bytes::Bytes;
use http::header::{ACCEPT_LANGUAGE, VARY};
use http::{HeaderValue, StatusCode};
use prometheus::TextEncoder;

const MIB: u64 = 1024 * 1024;

fn store() -> (Store, Registry) {
    let registry = Registry::new();
    let store = Store::new(MIB, &registry).expect("a fresh registry accepts the cache metrics");
    (store, registry)
}

fn response(body: &'static str, tags: &[&str]) -> CachedResponse {
    CachedResponse {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        body: Bytes::from_static(body.as_bytes()),
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
        stored_at: Instant::now(),
        ttl: Duration::from_secs(10),
        stale_while_revalidate: Duration::from_secs(5),
        stale_if_error: Duration::from_secs(30),
    }
}

fn varying(body: &'static str, vary: &'static str) -> CachedResponse {
    let mut r = response(body, &[]);
    r.headers.insert(VARY, HeaderValue::from_static(vary));
    r
}

fn language(value: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ACCEPT_LANGUAGE, HeaderValue::from_static(value));
    h
}

/// The body served for `key`, or None on a miss.
async fn body(store: &Store, key: &str, headers: &HeaderMap) -> Option<Bytes> {
    store.get(key, headers).await.map(|r| r.body())
}

/// The value of an unlabelled sample in the registry's text exposition.
fn sample(registry: &Registry, name: &str) -> f64 {
    let text = TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("text encoding");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("expected a sample {name} in:\n{text}"))
}

#[tokio::test(start_paused = true)]
async fn insert_then_get_shares_the_body_and_counts_hits() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    assert!(
        store.get("GET /me", &none).await.is_none(),
        "expected a miss on an empty store"
    );
    let mut value = response("{\"id\":1}", &[]);
    value
        .headers
        .insert(http::header::ETAG, HeaderValue::from_static("\"v1\""));
    store.insert("GET /me".into(), &none, value).await;
    let hit = store
        .get("GET /me", &none)
        .await
        .expect("expected a hit after insert");
    let again = store.get("GET /me", &none).await.expect("a second hit");
    assert_eq!(hit.body(), "{\"id\":1}", "expected the stored body back");
    assert_eq!(
        hit.body().as_ptr(),
        again.body().as_ptr(),
        "hits must share the stored body, not copy it"
    );
    let headers: Vec<_> = hit.headers().collect();
    assert_eq!(
        headers,
        [(http::header::ETAG, HeaderValue::from_static("\"v1\""))],
        "expected the stored header back"
    );
    let stats = store.stats_json();
    assert_eq!(
        (
            stats["hits"].as_u64(),
            stats["misses"].as_u64(),
            stats["hit_ratio"].as_f64()
        ),
        (Some(2), Some(1), Some(2.0 / 3.0)),
        "expected 2 hits, 1 miss, ratio 2/3; saw {stats}"
    );
}

#[tokio::test]
async fn a_recheck_is_not_counted_again() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    assert!(store.get("GET /me", &none).await.is_none(), "a miss first");
    assert!(
        store.recheck("GET /me", &none).is_none(),
        "the recheck misses too"
    );
    store
        .insert("GET /me".into(), &none, response("{}", &[]))
        .await;
    assert!(
        store.recheck("GET /me", &none).is_some(),
        "a recheck finds the entry"
    );
    let stats = store.stats_json();
    assert_eq!(
        (stats["hits"].as_u64(), stats["misses"].as_u64()),
        (Some(0), Some(1)),
        "expected the one counted lookup alone; saw {stats}"
    );
}

#[tokio::test(start_paused = true)]
async fn entries_are_served_through_their_stale_windows_then_refused() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    store
        .insert("GET /me".into(), &none, response("a", &[]))
        .await;
    // ttl 10 s, longer stale window 30 s: usable up to 40 s.
    tokio::time::advance(Duration::from_secs(39)).await;
    assert!(
        body(&store, "GET /me", &none).await.is_some(),
        "expected a stale hit at 39 s"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    let seen = body(&store, "GET /me", &none).await;
    assert_eq!(
        seen, None,
        "expected a miss past both stale windows, saw {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn entries_past_their_life_leave_the_store_and_the_index() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    store
        .insert("GET /old".into(), &none, response("a", &["t", "old"]))
        .await;
    store
        .insert(
            "GET /vary".into(),
            &language("fr"),
            varying("b", "accept-language"),
        )
        .await;
    tokio::time::advance(Duration::from_secs(30)).await;
    // Stored 30 s later: usable up to 70 s, while the first two end at 40 s.
    store
        .insert("GET /new".into(), &none, response("c", &["t"]))
        .await;
    store.run_pending_tasks().await;
    assert_eq!(store.entry_count(), 4, "expected 4 slots before 40 s");
    tokio::time::advance(Duration::from_secs(11)).await;
    store.run_pending_tasks().await;
    assert_eq!(
        store.entry_count(),
        1,
        "expected only GET /new left past 40 s, saw {} slots",
        store.entry_count()
    );
    assert_eq!(
        store.tag_registrations(),
        1,
        "expected only GET /new's tag left, saw {}",
        store.tag_registrations()
    );
    assert!(body(&store, "GET /new", &none).await.is_some());
}

#[tokio::test(start_paused = true)]
async fn a_replaced_entry_lives_to_its_new_deadline() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    store
        .insert("GET /me".into(), &none, response("a", &["t"]))
        .await;
    tokio::time::advance(Duration::from_secs(20)).await;
    store
        .insert("GET /me".into(), &none, response("b", &["t"]))
        .await;
    // The first value's deadline (40 s) passes; the second lives to 60 s.
    tokio::time::advance(Duration::from_secs(25)).await;
    store.run_pending_tasks().await;
    let seen = body(&store, "GET /me", &none).await;
    assert_eq!(
        seen,
        Some(Bytes::from_static(b"b")),
        "expected the new value at 45 s"
    );
    assert_eq!(
        store.tag_registrations(),
        1,
        "expected its tag still indexed"
    );
    tokio::time::advance(Duration::from_secs(16)).await;
    store.run_pending_tasks().await;
    assert_eq!(store.entry_count(), 0, "expected nothing left past 60 s");
    assert_eq!(
        store.tag_registrations(),
        0,
        "expected an empty index past 60 s"
    );
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_removes_entries_without_any_insert() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    for i in 0..3000 {
        store
            .insert(format!("GET /item/{i}"), &none, response("x", &["t"]))
            .await;
    }
    let sweeper = store.spawn_sweeper();
    tokio::time::sleep(Duration::from_secs(39)).await;
    store.inner.entries.run_pending_tasks();
    assert_eq!(
        store.entry_count(),
        3000,
        "expected every entry kept up to 39 s"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    store.inner.entries.run_pending_tasks();
    assert_eq!(
        store.entry_count(),
        0,
        "expected the sweeper to remove every entry past 40 s, saw {} left",
        store.entry_count()
    );
    sweeper.abort();
}

#[tokio::test(start_paused = true)]
async fn vary_stores_one_variant_per_request_value() {
    let (store, _registry) = store();
    let key = "GET /me";
    store
        .insert(
            key.into(),
            &language("en"),
            varying("english", "Accept-Language"),
        )
        .await;
    store
        .insert(
            key.into(),
            &language("nl"),
            varying("dutch", "accept-language"),
        )
        .await;
    for (lang, expected) in [("en", Some("english")), ("nl", Some("dutch")), ("fr", None)] {
        let seen = body(&store, key, &language(lang)).await;
        assert_eq!(
            seen.as_deref(),
            expected.map(str::as_bytes),
            "Accept-Language {lang}: expected {expected:?}, saw {seen:?}"
        );
    }
    let seen = body(&store, key, &HeaderMap::new()).await;
    assert_eq!(
        seen, None,
        "a request without the header is its own variant, saw {seen:?}"
    );

    // The resource stops varying: the plain entry replaces the variants' marker.
    store
        .insert(key.into(), &language("en"), response("plain", &[]))
        .await;
    let seen = body(&store, key, &language("nl")).await;
    assert_eq!(
        seen.as_deref(),
        Some(&b"plain"[..]),
        "expected the plain entry for everyone, saw {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn vary_star_is_not_stored() {
    let (store, _registry) = store();
    store
        .insert(
            "GET /me".into(),
            &HeaderMap::new(),
            varying("x", "accept, *"),
        )
        .await;
    let seen = body(&store, "GET /me", &HeaderMap::new()).await;
    assert_eq!(
        seen, None,
        "a Vary: * response must not be stored, saw {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn tag_invalidation_removes_exactly_the_tagged_entries() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    store
        .insert("GET /a".into(), &none, response("a", &["x"]))
        .await;
    store
        .insert("GET /b".into(), &none, response("b", &["x", "y"]))
        .await;
    store
        .insert("GET /c".into(), &none, response("c", &["z"]))
        .await;
    store
        .insert("GET /d".into(), &none, response("d", &[]))
        .await;
    let removed = store
        .invalidate_tags(&["x".to_owned(), "nothing".to_owned()])
        .await;
    assert_eq!(removed, 2, "expected 2 entries invalidated, saw {removed}");
    for (key, expected) in [
        ("GET /a", false),
        ("GET /b", false),
        ("GET /c", true),
        ("GET /d", true),
    ] {
        let seen = store.get(key, &none).await.is_some();
        assert_eq!(
            seen, expected,
            "{key}: expected present={expected}, saw present={seen}"
        );
    }
    store.run_pending_tasks().await;
    let left = store.tag_registrations();
    assert_eq!(
        left, 1,
        "expected only /c's registration left (b's `y` unregistered), saw {left}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_fetched_across_an_invalidation_is_not_stored() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    // The read asked the upstream at this epoch; a write's invalidation ran meanwhile.
    let epoch = store.epoch();
    store.invalidate_tags(&["t".to_owned()]).await;
    let stored = store
        .insert_since("GET /late".into(), &none, response("late", &["t"]), epoch)
        .await;
    assert!(
        !stored,
        "an answer that may predate the write must not be stored"
    );
    let seen = body(&store, "GET /late", &none).await;
    assert_eq!(seen, None, "expected a miss, saw {seen:?}");
}

/// A write elsewhere (another contact, another account) while a read is in flight does not
/// cost that read its answer: only an invalidation naming one of its tags, a purge, or more
/// bumps than are kept keep it out.
#[tokio::test(start_paused = true)]
async fn an_answer_fetched_across_other_tags_invalidations_is_stored() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    let epoch = store.epoch();
    store.invalidate_tags(&["other".to_owned()]).await;
    store
        .invalidate_tags(&["more".to_owned(), "else".to_owned()])
        .await;
    let stored = store
        .insert_since("GET /a".into(), &none, response("a", &["t"]), epoch)
        .await;
    assert!(
        stored,
        "expected an answer no invalidation concerned stored"
    );
    assert_eq!(
        body(&store, "GET /a", &none).await.as_deref(),
        Some(&b"a"[..])
    );
    // One of its tags among the bumps since: refused.
    store.invalidate_tags(&["t2".to_owned()]).await;
    let stored = store
        .insert_since("GET /b".into(), &none, response("b", &["t", "t2"]), epoch)
        .await;
    assert!(
        !stored,
        "expected an answer fetched across its tag's invalidation refused"
    );
    // A purge of any path may remove anything: refused.
    let epoch = store.epoch();
    store.purge_path("/elsewhere").await;
    let stored = store
        .insert_since("GET /c".into(), &none, response("c", &["t"]), epoch)
        .await;
    assert!(!stored, "expected an answer fetched across a purge refused");
    // More bumps than are kept: whether one named it is not known, so refused.
    let epoch = store.epoch();
    for i in 0..=BUMPS_KEPT {
        store.invalidate_tags(&[format!("x{i}")]).await;
    }
    let stored = store
        .insert_since("GET /d".into(), &none, response("d", &["t"]), epoch)
        .await;
    assert!(
        !stored,
        "expected an answer older than the kept bumps refused"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slot_under_another_keys_hash_is_never_served() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    // What a hash collision would look like: key B's entry under key A's hash.
    let packed =
        StoredResponse::pack("GET /b", &response("b", &[]), &[], 0).expect("a small entry packs");
    store
        .inner
        .entries
        .insert(store.hash("GET /a"), Slot(packed));
    for key in ["GET /a", "GET /b"] {
        let seen = body(&store, key, &none).await;
        assert_eq!(seen, None, "{key}: expected a miss, saw {seen:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn purge_path_removes_every_query_and_variant_of_one_path() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    store
        .insert("GET /me".into(), &none, response("1", &[]))
        .await;
    store
        .insert("GET /me?a=1".into(), &none, response("2", &[]))
        .await;
    store
        .insert(
            "GET /x".into(),
            &language("en"),
            varying("3", "accept-language"),
        )
        .await;
    store
        .insert("GET /x?q=1".into(), &none, response("4", &[]))
        .await;
    store
        .insert("GET /me/accounts".into(), &none, response("5", &[]))
        .await;
    store
        .insert("GET /mex".into(), &none, response("6", &[]))
        .await;
    let purged = store.purge_path("/me/").await;
    assert_eq!(purged, 2, "purge /me: expected 2 removed, saw {purged}");
    let purged = store.purge_path("/x").await;
    assert_eq!(
        purged, 2,
        "purge /x: expected the variant and the query entry, saw {purged}"
    );
    for (key, headers, expected) in [
        ("GET /me", &none, false),
        ("GET /me?a=1", &none, false),
        ("GET /x", &language("en"), false),
        ("GET /me/accounts", &none, true),
        ("GET /mex", &none, true),
    ] {
        let seen = store.get(key, headers).await.is_some();
        assert_eq!(
            seen, expected,
            "{key}: expected present={expected}, saw present={seen}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn purge_all_empties_the_store_and_the_tag_index() {
    let (store, _registry) = store();
    let none = HeaderMap::new();
    for key in ["GET /a", "GET /b", "GET /c"] {
        store.insert(key.into(), &none, response("x", &["t"])).await;
    }
    let purged = store.purge_all().await;
    assert_eq!(purged, 3, "expected 3 purged, saw {purged}");
    let seen = body(&store, "GET /a", &none).await;
    assert_eq!(
        seen, None,
        "expected nothing served after purge_all, saw {seen:?}"
    );
    store.run_pending_tasks().await;
    assert_eq!(
        store.entry_count(),
        0,
        "expected 0 entries, saw {}",
        store.entry_count()
    );
    assert_eq!(
        store.tag_registrations(),
        0,
        "expected an empty tag index, saw {}",
        store.tag_registrations()
    );
}

#[tokio::test]
async fn size_stays_within_max_bytes_and_evictions_are_counted() {
    let registry = Registry::new();
    let max = 64 * 1024;
    let store = Store::new(max, &registry).expect("metrics register");
    let chunk = Bytes::from(vec![b'x'; 1024]);
    let none = HeaderMap::new();
    for i in 0..(10 * max / 1024) {
        let mut value = response("", &["t"]);
        value.body = chunk.clone();
        store.insert(format!("GET /item/{i}"), &none, value).await;
    }
    store.run_pending_tasks().await;
    let bytes = store.weighted_bytes();
    assert!(
        bytes <= max,
        "expected at most {max} bytes held, saw {bytes}"
    );
    assert!(
        bytes > 0,
        "expected the store to keep some entries, it holds {bytes} bytes"
    );
    let evictions = sample(&registry, "cxgate_cache_evictions_total");
    assert!(
        evictions > 0.0,
        "expected size evictions counted, saw {evictions}"
    );
    let gauge_bytes = sample(&registry, "cxgate_cache_bytes");
    let gauge_entries = sample(&registry, "cxgate_cache_entries");
    assert_eq!(
        gauge_bytes, bytes as f64,
        "cxgate_cache_bytes: expected {bytes}, saw {gauge_bytes}"
    );
    let entries = store.entry_count() as f64;
    assert_eq!(
        gauge_entries, entries,
        "cxgate_cache_entries: expected {entries}, saw {gauge_entries}"
    );
    let left = store.tag_registrations() as f64;
    assert_eq!(
        left, entries,
        "expected the tag index to follow evictions: {entries} entries, {left} registrations"
    );
}

#[tokio::test]
async fn metrics_register_once_per_registry() {
    let registry = Registry::new();
    let _first = Store::new(MIB, &registry).expect("first registration");
    assert!(
        Store::new(MIB, &registry).is_err(),
        "expected a duplicate registration to fail"
    );
    assert!(
        Store::new(MIB, &registry).is_err(),
        "expected the failed attempt to leave the first in place"
    );
    let names: Vec<String> = registry
        .gather()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    assert_eq!(
        names.len(),
        3,
        "expected the three cache metrics once each, saw {names:?}"
    );
}

#[test]
fn key_path_reads_the_path_of_any_key_shape() {
    for (key, expected) in [
        ("GET /me", Some("/me")),
        ("GET /me?a=1", Some("/me")),
        ("GET /me\naccept:x", Some("/me")),
        ("GET /me?a=1\naccept", Some("/me")),
        ("nonsense", None),
    ] {
        let seen = key_path(key);
        assert_eq!(
            seen, expected,
            "key_path({key:?}): expected {expected:?}, saw {seen:?}"
        );
    }
}

#[test]
fn a_slot_stays_one_word() {
    // moka keeps the slot inline in its value node: with one word that node fits the
    // 32-byte size class, with two the 48-byte one (16 bytes more per entry).
    let slot = std::mem::size_of::<Slot>();
    assert!(slot <= 8, "Slot grew to {slot} bytes");
}

/// moka counts an insert only in its maintenance: the gauges and the status must not read 0
/// while entries are stored, waiting for a later lookup to run it.
#[tokio::test(start_paused = true)]
async fn counts_are_true_at_once_after_inserts() {
    let (store, registry) = store();
    let none = HeaderMap::new();
    for key in ["GET /a", "GET /b"] {
        store
            .insert(key.into(), &none, response("xyz", &["t"]))
            .await;
    }
    let stats = store.stats_json();
    assert_eq!(
        stats["entries"], 2,
        "expected /admin/status to count 2 entries at once, saw {stats}"
    );
    assert!(
        stats["bytes"].as_u64().is_some_and(|b| b > 0),
        "expected bytes > 0 at once, saw {stats}"
    );
    let text = TextEncoder::new()
        .encode_to_string(&registry.gather())
        .expect("encode");
    assert!(
        text.lines().any(|l| l == "cxgate_cache_entries 2"),
        "expected cxgate_cache_entries 2 at scrape time, saw:\n{text}"
    );
    assert!(
        !text.lines().any(|l| l == "cxgate_cache_bytes 0"),
        "expected cxgate_cache_bytes above 0 at scrape time, saw:\n{text}"
    );
}
