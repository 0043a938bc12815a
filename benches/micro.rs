//! Criterion micro-benchmarks of the per-request work: route matching, cache key building,
//! the whole hit path in process (no sockets), the uncached path (to the simulator on
//! loopback), one admission decision, link rewriting of a
//! 50 KB mentions page. Run: `cargo bench --bench micro`.

mod support;

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};

fn config() -> cxgate::config::Config {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cxgate.toml");
    cxgate::config::load(&path).expect("shipped config is valid")
}

fn route_and_key(c: &mut Criterion) {
    let cfg = config();
    c.bench_function("route_match/contact (9th route)", |b| {
        b.iter(|| {
            cfg.find_route(
                &Method::GET,
                black_box("/12345/inbox/contact/twitter/987654"),
            )
        })
    });
    c.bench_function("route_match/unmatched", |b| {
        b.iter(|| cfg.find_route(&Method::GET, black_box("/12345/unknown/path")))
    });
    c.bench_function("cache_key/no query", |b| {
        b.iter(|| cxgate::cache::cache_key(&Method::GET, black_box("/me/"), None))
    });
    c.bench_function("cache_key/4 params + access_token", |b| {
        b.iter(|| {
            cxgate::cache::cache_key(
                &Method::GET,
                black_box("/12345/inbox/mentions"),
                Some(black_box(
                    "sort=asc&limit=50&access_token=k&topic_ids=1,2&page_token=x",
                )),
            )
        })
    });
}

fn hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let env = rt.block_on(support::start(Default::default(), support::ROUTES));
    let warm = rt.block_on(env.get("/me"));
    assert_eq!(warm.status, 200);
    let gateway = env.gw.gateway.clone();
    let auth = format!("Bearer {}", support::KEY);
    let request = || {
        Request::get("/me")
            .header("authorization", auth.as_str())
            .header("host", "127.0.0.1:8080")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let resp = rt.block_on(gateway.handle(request()));
    let status = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        status.starts_with("cxgate; hit"),
        "the benchmark must measure hits, saw {status:?}"
    );
    c.bench_function("hit_path/GET /me in process", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(gateway.handle(request()).await) })
    });
    rt.block_on(env.stop());
}

/// The uncached path in process: each request goes to the simulator on loopback through
/// the calling thread's upstream pool, so the pool lookup is on it.
fn uncached_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // No route matches /me/permissions: it is forwarded every time.
    let env = rt.block_on(support::start(Default::default(), support::BIG_BUDGET));
    let gateway = env.gw.gateway.clone();
    let auth = format!("Bearer {}", support::KEY);
    let request = || {
        Request::get("/me/permissions")
            .header("authorization", auth.as_str())
            .header("host", "127.0.0.1:8080")
            .body(Full::new(Bytes::new()))
            .expect("request")
    };
    let resp = rt.block_on(gateway.handle(request()));
    assert_eq!(resp.status(), 200, "the uncached request must be answered");
    c.bench_function("uncached_path/GET /me/permissions in process", |b| {
        b.to_async(&rt).iter(|| async {
            let resp = gateway.handle(request()).await;
            black_box(resp.into_body().collect().await.expect("body"))
        })
    });
    rt.block_on(env.stop());
}

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let registry = prometheus::Registry::new();
    let share = cxgate::budget::Share {
        limit: NonZeroU32::new(u32::MAX).expect("nonzero"),
        period: Duration::from_secs(1),
        burst: NonZeroU32::new(1_000_000).expect("nonzero"),
    };
    let spec = cxgate::budget::BudgetSpec {
        global: share,
        max_wait: Duration::from_secs(1),
        batch_reserve: 0.2,
        clients: vec![cxgate::budget::ClientSpec {
            name: "crm".into(),
            share: Some(share),
            max_wait: None,
            priority: cxgate::budget::Priority::Interactive,
        }],
    };
    let budget =
        rt.block_on(async { cxgate::budget::Budget::new(spec, &registry).expect("budget") });
    let one = NonZeroU32::MIN;
    c.bench_function("admission/global + client share", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(budget.admit("crm", one).await.is_ok()) })
    });
    c.bench_function("admission/global only", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(budget.admit("other", one).await.is_ok()) })
    });
}

fn rewrite(c: &mut Criterion) {
    let base = "https://api.engagor.com";
    let mut mentions = Vec::new();
    let mut i = 0;
    loop {
        let m = serde_json::json!({
            "id": format!("{i}"), "unique_id": format!("1_{i}"),
            "message": {"content": "Our order still has not arrived, can someone help?", "language": "en", "sentiment": -1},
            "source": {"service": "twitter", "id": format!("{}", 1_400_000_000_000_000_000u64 + i), "url": "https://twitter.com/i/web/status/1"},
            "action_links": [
                {"type": "reply", "link": format!("{base}/12345/publisher/add/?in_reply_to=1_{i}&access_token=REAL-TOKEN-abcdef123456")},
                {"type": "update", "link": format!("{base}/12345/inbox/mention/1/{i}")}
            ],
            "status": "open", "tags": ["delivery"],
        });
        mentions.push(m);
        i += 1;
        if serde_json::to_vec(&mentions).expect("json").len() > 50_000 {
            break;
        }
    }
    let page = serde_json::json!({"meta": {"code": 200}, "response": {"count": i, "data": mentions,
        "paging": {"next_url": format!("{base}/12345/inbox/mentions?limit={i}&page_token=p2&access_token=REAL-TOKEN-abcdef123456"), "prev_url": null}}});
    let body = Bytes::from(serde_json::to_vec(&page).expect("json"));
    let plain = body.clone();
    let rewriter = cxgate::upstream::rewrite::Rewriter::new(base, "http://127.0.0.1:8080");
    let secrets = ["REAL-TOKEN-abcdef123456"];
    println!("rewrite input: {} bytes, {} mentions", body.len(), i);
    c.bench_function("rewrite/50KB mentions page with links", |b| {
        b.iter(|| black_box(rewriter.rewrite_body(black_box(&body), &secrets)))
    });
    let other = cxgate::upstream::rewrite::Rewriter::new(
        "https://elsewhere.example",
        "http://127.0.0.1:8080",
    );
    c.bench_function("rewrite/50KB page, nothing to rewrite", |b| {
        b.iter(|| black_box(other.rewrite_body(black_box(&plain), &["NOT-PRESENT-TOKEN-123"])))
    });
}

/// What the key scan adds to a request: the forwarded headers of a browser-like client,
/// a query and a 1 KB JSON body, checked against 20 configured clients (each of its values
/// cut into tokens, hashed and looked up, and searched for the caller's own key).
fn key_scan(c: &mut Criterion) {
    let mut text = String::from("upstream.base_url=\"http://x\"\ntoken.file=\"t\"\n");
    for i in 0..20 {
        let key = format!("client-key-number-{i:02}-abcdefgh");
        text.push_str(&format!(
            "[[clients]]\nname=\"c{i}\"\nkey_sha256=\"{}\"\n",
            cxgate::auth::sha256_hex(key.as_bytes())
        ));
    }
    let cfg = cxgate::config::parse(&text).expect("config");
    let clients = cxgate::auth::Clients::from_config(&cfg);
    let own = "client-key-number-03-abcdefgh";
    let headers: [&[u8]; 4] = [
        b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        b"application/json, text/plain, */*",
        b"en-GB,en;q=0.9,nl;q=0.8",
        b"\"W/\\\"5f3c2a1b9e8d7c6b\\\"\"",
    ];
    let query = b"date_from=1700000000&date_to=1700086400&limit=50&filter=status%3Aopen";
    let body: String = format!(
        "{{\"items\":[{}]}}",
        (0..20)
            .map(|i| format!("{{\"id\":{i},\"text\":\"reply number {i} to the customer\"}}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let scan = cxgate::proxy::KeyScan::new(&clients, Some(own));
    c.bench_function("key_scan/headers + query, no body", |b| {
        b.iter(|| {
            let found = headers.iter().any(|h| scan.in_value(black_box(h)))
                || scan.in_value(black_box(query));
            assert!(!found);
        })
    });
    c.bench_function("key_scan/headers + query + 1 KB JSON body", |b| {
        b.iter(|| {
            let found = headers.iter().any(|h| scan.in_value(black_box(h)))
                || scan.in_value(black_box(query))
                || scan.in_value(black_box(body.as_bytes()))
                || scan.in_json(black_box(body.as_bytes()));
            assert!(!found);
        })
    });
    // Forwarded write bodies as the proxy scans them (`in_body`): a 4 KiB form whose
    // `updates` field is percent-encoded JSON written by PHP (`\/` in its URLs), and a
    // 64 KiB JSON body of replies with the escapes JSON text has (`\n`, `\"`, `\/`).
    let note = |i: usize| {
        format!(
            r#"{{"id":{i},"note":"see https:\/\/example.com\/a\/{i} \"done\"\n","tags":["x","y"]}}"#
        )
    };
    let mut json = String::new();
    let mut i = 0;
    while json.len() < 3 << 10 {
        json.push_str(&note(i));
        i += 1;
    }
    let form: String = format!(
        "status=open&updates={}",
        json.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let form = &form[..form.len().min(4 << 10)];
    let mut big = String::from("{\"items\":[");
    let mut i = 0;
    while big.len() < 64 << 10 {
        big.push_str(&note(i));
        big.push(',');
        i += 1;
    }
    big.push_str("{}]}");
    assert!(serde_json::from_str::<serde_json::Value>(&big).is_ok());
    c.bench_function("key_scan/4 KiB form body with JSON in a field", |b| {
        b.iter(|| assert!(!scan.in_body(black_box(form.as_bytes()))))
    });
    c.bench_function("key_scan/64 KiB JSON body", |b| {
        b.iter(|| assert!(!scan.in_body(black_box(big.as_bytes()))))
    });
    // Every client has called, so every key is known in full: each is searched in its
    // base64 and hex spellings too (8 substring searches per key and value).
    for i in 0..20 {
        let key = format!("client-key-number-{i:02}-abcdefgh");
        clients.authenticate(Some(&key)).expect("a configured key");
    }
    c.bench_function(
        "key_scan/headers + query + 1 KB JSON body, 20 keys known",
        |b| {
            b.iter(|| {
                let found = headers.iter().any(|h| scan.in_value(black_box(h)))
                    || scan.in_value(black_box(query))
                    || scan.in_value(black_box(body.as_bytes()))
                    || scan.in_json(black_box(body.as_bytes()));
                assert!(!found);
            })
        },
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = route_and_key, hit_path, uncached_path, admission, rewrite, key_scan
}
criterion_main!(benches);
