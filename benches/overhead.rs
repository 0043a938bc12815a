//! Added latency of cxgate on an uncached request, over calling the simulator directly.
//!
//! 1,000 sequential requests each way over keep-alive HTTP/1.1 on loopback, in
//! alternating blocks of 100 so both see the same machine state; prints median and p99 of
//! each and their difference. Run: `cargo bench --bench overhead`.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};

const N: usize = 1000;
const BLOCK: usize = 100;

async fn timed(env: &support::Env, url: &str, auth: &str) -> Duration {
    let req = Request::get(url)
        .header("authorization", auth)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let started = Instant::now();
    let resp = env.http.request(req).await.expect("answer");
    assert_eq!(resp.status(), 200, "{url} should answer 200");
    resp.into_body().collect().await.expect("body");
    started.elapsed()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // No route matches /me/permissions: it is forwarded uncached every time.
        let env = support::start(Default::default(), support::BIG_BUDGET).await;
        let direct_url = format!("{}/me/permissions", env.sim.base_url());
        let gateway_url = env.url("/me/permissions");
        let held = format!("Bearer {}", support::ACCESS);
        let key = format!("Bearer {}", support::KEY);
        for _ in 0..200 {
            timed(&env, &direct_url, &held).await;
            timed(&env, &gateway_url, &key).await;
        }
        let (mut direct, mut via) = (Vec::with_capacity(N), Vec::with_capacity(N));
        for _ in 0..N / BLOCK {
            for _ in 0..BLOCK {
                direct.push(timed(&env, &direct_url, &held).await);
            }
            for _ in 0..BLOCK {
                via.push(timed(&env, &gateway_url, &key).await);
            }
        }
        direct.sort();
        via.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let (d50, d99) = (percentile(&direct, 0.5), percentile(&direct, 0.99));
        let (g50, g99) = (percentile(&via, 0.5), percentile(&via, 0.99));
        println!("uncached request, {N} sequential each way (keep-alive HTTP/1.1, loopback)");
        println!(
            "  direct to simulator: p50 {:8.1} us   p99 {:8.1} us",
            us(d50),
            us(d99)
        );
        println!(
            "  through cxgate:      p50 {:8.1} us   p99 {:8.1} us",
            us(g50),
            us(g99)
        );
        println!(
            "  added by cxgate:     p50 {:8.1} us   p99 {:8.1} us",
            us(g50) - us(d50),
            us(g99) - us(d99)
        );
        env.stop().await;
    });
}
