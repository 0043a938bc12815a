//! 200 concurrent cold reads of one key behind a 100 ms upstream: how many upstream
//! calls, and when each caller got its answer. Run: `cargo bench --bench cold_burst`.

mod support;

use std::time::{Duration, Instant};

use cxgate::sim::Faults;

const CALLERS: usize = 200;
const ROUNDS: usize = 5;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let env = std::sync::Arc::new(
            support::start(
                Default::default(),
                &format!("{}{}", support::BIG_BUDGET, support::ROUTES),
            )
            .await,
        );
        // Open the connections first, so the burst measures the gateway, not TCP setup.
        let warm: Vec<_> = (0..CALLERS)
            .map(|i| {
                let env = env.clone();
                tokio::spawn(
                    async move { env.get(&format!("/12345/inbox/contact/warm/{i}")).await },
                )
            })
            .collect();
        for w in warm {
            w.await.expect("warm-up");
        }
        env.sim.set_faults(Faults {
            latency_ms: 100,
            ..Faults::default()
        });
        println!(
            "{CALLERS} concurrent cold reads of one key, upstream latency 100 ms, {ROUNDS} rounds"
        );
        for round in 0..ROUNDS {
            let path = format!("/12345/inbox/contact/twitter/{}", 9000 + round);
            let before = env.upstream_total();
            let started = Instant::now();
            let tasks: Vec<_> = (0..CALLERS)
                .map(|_| {
                    let env = env.clone();
                    let path = path.clone();
                    tokio::spawn(async move {
                        let a = env.get(&path).await;
                        assert_eq!(a.status, 200, "cold read should answer 200");
                        started.elapsed()
                    })
                })
                .collect();
            let mut times: Vec<Duration> = Vec::with_capacity(CALLERS);
            for t in tasks {
                times.push(t.await.expect("caller"));
            }
            times.sort();
            let calls = env.upstream_total() - before;
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "  round {round}: upstream calls {calls}   p50 {:6.1} ms   max {:6.1} ms",
                ms(times[CALLERS / 2]),
                ms(times[CALLERS - 1])
            );
        }
        env.sim.set_faults(Faults::default());
    });
}
