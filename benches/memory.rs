//! Resident memory per cached entry, measured from outside the process: the release binary
//! (`cxgate run`) in front of a small upstream in this process that answers every contact id
//! with the same 1,504-byte JSON and the headers a real web server sends (`Server`, `Date`,
//! `Content-Type`, `Last-Modified`, `ETag`, `Accept-Ranges`, `Content-Length`, `Connection`).
//! 100,000 distinct ids are asked once each (127.0.0.1 only, a fixed number of requests);
//! the gateway's `VmRSS` is read from `/proc/PID/status` before and after.
//!
//! Then, for `--hit-seconds` (default 5), hits: `wrk -t2 -c32` on one stored id when `wrk`
//! is on PATH, else (`--no-wrk`) this process's own client over all the stored ids. The rate
//! is printed, so an allocator or storage change can be checked for hit throughput in the
//! same run. Compare two binaries by running this twice with `CXGATE_BIN`.
//!
//! Before that, an in-process breakdown: the same entries put straight into a
//! [`cxgate::cache::Store`] under a counting allocator, with parts left out one at a time,
//! gives the bytes asked of the allocator per entry for the body, the stored headers, the
//! tags (index and hashes) and the rest (key, entry struct, moka). What the RSS figure
//! holds beyond their sum is the allocator's own overhead and fragmentation.
//!
//! Run: `cargo build --release && cargo bench --bench memory`
//! (`-- --entries N --hit-seconds S --concurrency C`; `CXGATE_BIN=path` for another binary).

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// The system allocator, counting the bytes live (asked for and not yet freed).
struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call goes to `System` unchanged; the counter is only arithmetic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as u64, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The upstream's body length for every id, as in the measurement.
const BODY: usize = 1504;
const ACCOUNT: u64 = 12345;

type Http = Client<HttpConnector, Full<Bytes>>;

struct Args {
    entries: u64,
    hit_seconds: u64,
    concurrency: u64,
    breakdown: bool,
    wrk: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        entries: 100_000,
        hit_seconds: 5,
        concurrency: 8,
        breakdown: true,
        wrk: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--entries" => args.entries = number("--entries")?.clamp(1, 1_000_000),
            "--hit-seconds" => args.hit_seconds = number("--hit-seconds")?.min(60),
            "--concurrency" => args.concurrency = number("--concurrency")?.clamp(1, 64),
            "--no-breakdown" => args.breakdown = false,
            "--no-wrk" => args.wrk = false,
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// The JSON a contact lookup returns, padded to exactly `BODY` bytes.
fn contact_body(id: u64) -> Bytes {
    let mut body = format!(
        "{{\"meta\":{{\"code\":200}},\"response\":{{\"id\":\"{id}\",\"service\":\"twitter\",\
         \"name\":\"Contact {id}\",\"bio\":\""
    );
    while body.len() < BODY - 3 {
        body.push((b'a' + (id % 26) as u8) as char);
    }
    body.push_str("\"}}");
    debug_assert_eq!(body.len(), BODY);
    Bytes::from(body)
}

/// The id at the end of `/12345/inbox/contact/twitter/{id}`, or 0.
fn id_of(path: &str) -> u64 {
    path.rsplit('/')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// An answer the way nginx serves a static file: hyper adds `Date` and `Content-Length`.
async fn upstream(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let id = id_of(req.uri().path());
    let mut resp = Response::new(Full::new(contact_body(id)));
    let h = resp.headers_mut();
    h.insert("server", "nginx/1.24.0 (Ubuntu)".parse().expect("value"));
    h.insert(
        "content-type",
        "application/json; charset=utf-8".parse().expect("value"),
    );
    h.insert(
        "last-modified",
        "Tue, 24 Nov 2026 09:14:03 GMT".parse().expect("value"),
    );
    // nginx's ETag is the file's mtime and length in hex: distinct per id here.
    h.insert(
        "etag",
        format!("\"{:x}-{BODY:x}\"", 0x6743_f1cb_u64 + id)
            .parse()
            .expect("value"),
    );
    h.insert("accept-ranges", "bytes".parse().expect("value"));
    h.insert("connection", "keep-alive".parse().expect("value"));
    Ok(resp)
}

async fn spawn_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the upstream on 127.0.0.1");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(upstream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// The headers the gateway hands its cache for one answer of [`upstream`]: the upstream's,
/// less the hop-by-hop `Connection`, plus the `Date` and `Content-Length` hyper wrote.
fn upstream_headers(id: u64) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (name, value) in [
        ("server", "nginx/1.24.0 (Ubuntu)".to_string()),
        ("date", "Tue, 01 Dec 2026 21:30:00 GMT".to_string()),
        (
            "content-type",
            "application/json; charset=utf-8".to_string(),
        ),
        ("content-length", BODY.to_string()),
        ("last-modified", "Tue, 24 Nov 2026 09:14:03 GMT".to_string()),
        ("etag", format!("\"{:x}-{BODY:x}\"", 0x6743_f1cb_u64 + id)),
        ("accept-ranges", "bytes".to_string()),
    ] {
        h.insert(name, value.parse().expect("value"));
    }
    h
}

/// Bytes live per entry in a store holding `n` entries built with the parts asked for.
async fn live_per_entry(n: u64, headers: bool, tags: bool, body: bool) -> f64 {
    use cxgate::cache::{cache_key, CachedResponse, Store};
    let registry = prometheus::Registry::new();
    let store = Store::new(1 << 40, &registry).expect("store");
    let none = http::HeaderMap::new();
    // The first entry creates moka's and the index's tables: not an entry's cost.
    let mut before = 0;
    for id in 0..=n {
        if id == 1 {
            store.run_pending_tasks().await;
            before = LIVE.load(Ordering::Relaxed);
        }
        let path = format!("/{ACCOUNT}/inbox/contact/twitter/{id}");
        let entry = CachedResponse {
            status: StatusCode::OK,
            headers: if headers {
                upstream_headers(id)
            } else {
                http::HeaderMap::new()
            },
            body: if body { contact_body(id) } else { Bytes::new() },
            tags: if tags {
                vec![
                    format!("account:{ACCOUNT}"),
                    format!("contact:{ACCOUNT}/twitter/{id}"),
                ]
                .into_boxed_slice()
            } else {
                Box::new([])
            },
            stored_at: tokio::time::Instant::now(),
            ttl: Duration::from_secs(300),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(1800),
        };
        store
            .insert(cache_key(&http::Method::GET, &path, None), &none, entry)
            .await;
    }
    // Serve each once, as the gateway does: a hit's first use may allocate (bytes' shared
    // header), which belongs to the entry.
    // Keys are hashed to 32 bits: at 100,000 entries about one pair collides, and the later
    // one takes the earlier one's place (a miss, never a wrong answer).
    for id in 1..=n {
        let path = format!("/{ACCOUNT}/inbox/contact/twitter/{id}");
        let key = cache_key(&http::Method::GET, &path, None);
        if let Some(hit) = store.get(&key, &none).await {
            drop(hit.body());
        }
    }
    store.run_pending_tasks().await;
    let live = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    drop(store);
    live as f64 / n as f64
}

/// Prints the bytes asked of the allocator per entry, part by part; returns their sum.
async fn breakdown(n: u64) -> f64 {
    let full = live_per_entry(n, true, true, true).await;
    let no_headers = live_per_entry(n, false, true, true).await;
    let no_tags = live_per_entry(n, false, false, true).await;
    let bare = live_per_entry(n, false, false, false).await;
    let key = format!("GET /{ACCOUNT}/inbox/contact/twitter/{n}").len() as f64;
    println!("in process, bytes asked of the allocator per entry ({n} entries):");
    println!("  body                     {:6.0}", no_tags - bare);
    println!("  stored headers           {:6.0}", full - no_headers);
    println!("  tags: index + hashes     {:6.0}", no_headers - no_tags);
    println!("  key (in the block)       {key:6.0}");
    println!("  entry struct + moka      {:6.0}", bare - key);
    println!("  sum                      {full:6.0}");
    full
}

struct Gateway {
    child: Child,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn binary() -> PathBuf {
    match std::env::var_os("CXGATE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/cxgate"),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// One GET of contact `id`; true on a 200 with the whole body.
async fn get(http: &Http, base: &str, id: u64) -> bool {
    let req = Request::get(format!("{base}/{ACCOUNT}/inbox/contact/twitter/{id}"))
        .header("authorization", format!("Bearer {}", support::KEY))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(10), http.request(req)).await
    else {
        return false;
    };
    let ok = resp.status() == StatusCode::OK;
    let len = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    ok && len == BODY
}

/// Asks ids `first..first + count` once each, `concurrency` at a time; returns the failures.
async fn fill(http: &Http, base: &Arc<str>, first: u64, count: u64, concurrency: u64) -> u64 {
    let next = Arc::new(AtomicU64::new(first));
    let failed = Arc::new(AtomicU64::new(0));
    let end = first + count;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, base, next, failed) =
                (http.clone(), base.clone(), next.clone(), failed.clone());
            tokio::spawn(async move {
                loop {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    if id >= end {
                        break;
                    }
                    if !get(&http, &base, id).await {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    failed.load(Ordering::Relaxed)
}

/// Hits on the stored ids for `seconds`; returns (answers, failures).
async fn hits(
    http: &Http,
    base: &Arc<str>,
    ids: u64,
    seconds: u64,
    concurrency: u64,
) -> (u64, u64) {
    let stop = tokio::time::Instant::now() + Duration::from_secs(seconds);
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|w| {
            let (http, base, done, failed) =
                (http.clone(), base.clone(), done.clone(), failed.clone());
            tokio::spawn(async move {
                let mut id = w * 7919;
                while tokio::time::Instant::now() < stop {
                    id = (id + 104_729) % ids;
                    if get(&http, &base, 1 + id).await {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// A number from the gateway's `/metrics`.
async fn metric(http: &Http, admin: &str, name: &str) -> Option<f64> {
    let req = Request::get(format!("{admin}/metrics"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = http.request(req).await.ok()?;
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!(
                "memory: {problem}\nusage: cargo bench --bench memory -- \
                 [--entries N] [--hit-seconds S] [--concurrency C] [--no-breakdown] [--no-wrk]"
            );
            return ExitCode::from(2);
        }
    };
    let bin = binary();
    if !bin.is_file() {
        eprintln!(
            "memory: no gateway binary at {} (run `cargo build --release`, or set CXGATE_BIN)",
            bin.display()
        );
        return ExitCode::from(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if rt.block_on(run(args, bin)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn run(args: Args, bin: PathBuf) -> bool {
    let live = if args.breakdown {
        Some(breakdown(args.entries).await)
    } else {
        None
    };
    let upstream = spawn_upstream().await;
    let listen = support::free_port();
    let admin = support::free_port();
    let dir = support::temp_dir("memory");
    let token_file = dir.join("token.json");
    cxgate::demo::write_token_file(
        &token_file,
        support::ACCESS,
        support::REFRESH,
        Duration::from_secs(24 * 3600),
    )
    .expect("write the token file");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{listen}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
         public_base_url = \"http://127.0.0.1:{listen}\"\n\
         [upstream]\nbase_url = \"http://{upstream}\"\n\
         [token]\nfile = \"{}\"\n\
         [cache]\nmax_bytes = \"2GiB\"\n{}\n{}\n{}\n",
        token_file.display(),
        support::client_toml("bench", support::KEY, "scopes = [\"read\"]"),
        support::BIG_BUDGET,
        support::ROUTES,
    );
    let config_path = dir.join("cxgate.toml");
    std::fs::write(&config_path, config).expect("write the config");
    let log = std::fs::File::create(dir.join("gateway.log")).expect("create the gateway log");
    let child = Command::new(&bin)
        .args(["--log-level", "warn", "run", "--config"])
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    let mut gateway = Gateway { child };
    let pid = gateway.child.id();

    let http: Http = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build_http();
    let base: Arc<str> = format!("http://127.0.0.1:{listen}").into();
    let admin_base = format!("http://127.0.0.1:{admin}");
    let started = std::time::Instant::now();
    // One warm-up request (id 0) brings up the connections and lazy state on both sides.
    while !get(&http, &base, 0).await {
        if started.elapsed() > Duration::from_secs(20)
            || gateway.child.try_wait().ok().flatten().is_some()
        {
            eprintln!(
                "memory: the gateway did not answer (log in {})",
                dir.display()
            );
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let before = rss_bytes(pid);
    let filled = std::time::Instant::now();
    let failed = fill(&http, &base, 1, args.entries, args.concurrency).await;
    let fill_time = filled.elapsed();
    // moka counts in its maintenance; a scrape after a short pause sees the final figures.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes(pid);
    let entries = metric(&http, &admin_base, "cxgate_cache_entries").await;
    let weighed = metric(&http, &admin_base, "cxgate_cache_bytes").await;

    let added = after.saturating_sub(before);
    let per_entry = added as f64 / args.entries as f64;
    println!(
        "cxgate {} in front of an upstream with realistic headers, {} B bodies",
        bin.display(),
        BODY
    );
    println!(
        "  filled {} distinct ids in {:.1} s ({failed} failed); cache entries {}, weighed {:.1} MiB",
        args.entries,
        fill_time.as_secs_f64(),
        entries.map_or("?".into(), |e| format!("{e}")),
        weighed.map_or(0.0, |w| w / f64::from(1 << 20)),
    );
    println!(
        "  RSS {:.1} -> {:.1} MiB: {per_entry:.0} B per entry = {:.2} B per body byte",
        mib(before),
        mib(after),
        per_entry / BODY as f64
    );

    if let Some(live) = live {
        println!(
            "  of which the allocator's overhead and fragmentation (RSS less the sum above): {:.0} B per entry",
            per_entry - live
        );
    }

    let mut ok = failed == 0;
    if args.hit_seconds > 0 && args.wrk {
        // wrk on one stored id: the gateway's hit path, not this process's client, is what
        // limits the rate.
        let url = format!("{base}/{ACCOUNT}/inbox/contact/twitter/1");
        let out = Command::new("wrk")
            .args(["-t2", "-c32", &format!("-d{}s", args.hit_seconds), "-H"])
            .arg(format!("Authorization: Bearer {}", support::KEY))
            .arg(&url)
            .output();
        match out {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let rate = text
                    .lines()
                    .find(|l| l.starts_with("Requests/sec:"))
                    .unwrap_or("Requests/sec: ?");
                let errors = text
                    .lines()
                    .filter(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
                    .collect::<Vec<_>>()
                    .join("; ");
                let rss = rss_bytes(pid);
                println!(
                    "  hits (wrk -t2 -c32 -d{}s, one id): {rate} {errors}; RSS after {:.1} MiB \
                     = {:.0} B per entry",
                    args.hit_seconds,
                    mib(rss),
                    rss.saturating_sub(before) as f64 / args.entries as f64
                );
                ok &= errors.is_empty();
            }
            Ok(out) => {
                eprintln!(
                    "memory: wrk failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                ok = false;
            }
            Err(e) => println!("  (no wrk on PATH: {e}; pass --no-wrk for the built-in client)"),
        }
    } else if args.hit_seconds > 0 {
        let (done, hit_failed) = hits(
            &http,
            &base,
            args.entries,
            args.hit_seconds,
            args.concurrency,
        )
        .await;
        println!(
            "  hits: {done} in {} s = {:.0}/s at concurrency {} ({hit_failed} failed); RSS after {:.1} MiB",
            args.hit_seconds,
            done as f64 / args.hit_seconds as f64,
            args.concurrency,
            mib(rss_bytes(pid))
        );
        ok &= hit_failed == 0;
    }
    drop(gateway);
    let _ = std::fs::remove_dir_all(&dir);
    ok
}
