//! What sharing the budget through Redis costs one admission: the local ledger against the
//! shared Lua script on a `redis-server` on loopback (started here on a free port, stopped
//! by its process id). The budget is large enough that nothing ever waits, so the figures
//! are the decision alone. Run: `cargo bench --bench redis_admission`.
//! Without `redis-server` on PATH only the local figure is measured (said loudly).

use std::num::NonZeroU32;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use cxgate::budget::{Budget, BudgetSpec, Share};

fn spec() -> BudgetSpec {
    let huge = NonZeroU32::new(1_000_000_000).expect("positive");
    BudgetSpec {
        global: Share {
            limit: huge,
            period: Duration::from_secs(1),
            burst: huge,
        },
        max_wait: Duration::from_secs(1),
        batch_reserve: 0.0,
        clients: Vec::new(),
    }
}

#[path = "../tests/common/redis_server.rs"]
mod redis_server;

/// Our own `redis-server` (stopped by its process id when dropped), or `None` after saying
/// loudly why only the local ledger is measured.
fn start_redis() -> Option<redis_server::RedisServer> {
    redis_server::RedisServer::spawn()
        .map_err(|e| {
            eprintln!("\n*** redis-server unavailable ({e}): measuring the local ledger only ***\n")
        })
        .ok()
}

fn admission(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("admission");
    group.measurement_time(Duration::from_secs(5));

    let local = Budget::new(spec(), &prometheus::Registry::new()).expect("budget");
    group.bench_function("local ledger", |b| {
        b.to_async(&rt)
            .iter(|| async { local.admit("bench", NonZeroU32::MIN).await })
    });

    if let Some(server) = start_redis() {
        std::env::set_var("CXGATE_BENCH_REDIS_URL", server.url());
        let registry = prometheus::Registry::new();
        let shared = rt.block_on(async {
            let redis =
                cxgate::replicas::Redis::connect("CXGATE_BENCH_REDIS_URL", "bench", &registry)
                    .await
                    .expect("redis handle");
            assert!(redis.is_up(), "expected the bench's redis-server to answer");
            Budget::new_shared(spec(), &registry, redis, NonZeroU32::MIN).expect("budget")
        });
        group.bench_function("shared (Redis script, loopback)", |b| {
            b.to_async(&rt)
                .iter(|| async { shared.admit("bench", NonZeroU32::MIN).await })
        });
    }
    group.finish();
}

criterion_group!(benches, admission);
criterion_main!(benches);
