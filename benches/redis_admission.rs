//! What sharing the budget through Redis costs one admission: the local ledger against the
//! shared Lua script on a `redis-server` on loopback (started here on a free port, stopped
//! by its process id). The budget is large enough that nothing ever waits, so the figures
//! are the decision alone, on plain Redis, on TLS with an ACL user, and on a three-node
//! Redis Cluster. Run: `cargo bench --bench redis_admission`.
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

mod support;

use support::redis_server;

use redis_server::Kind;

/// Our own `redis-server` of `kind` (stopped by its process id when dropped), or `None`
/// after saying loudly why that figure is not measured.
fn start_redis(kind: Kind) -> Option<redis_server::RedisServer> {
    redis_server::RedisServer::spawn_kind(kind)
        .map_err(|e| {
            eprintln!("\n*** redis-server ({kind:?}) unavailable ({e}): not measured ***\n")
        })
        .ok()
}

fn admission(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
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

    // Plain, then TLS with an ACL user (a test CA), then a three-node cluster: the same
    // script, each on its own redis-server(s) started here.
    let kinds = [
        (Kind::Plain, "shared (Redis script, loopback)"),
        (Kind::Tls, "shared (Redis script, loopback, TLS + ACL user)"),
        (
            Kind::Cluster,
            "shared (Redis script, loopback, 3-node cluster)",
        ),
    ];
    for (kind, name) in kinds {
        let Some(server) = start_redis(kind) else {
            continue;
        };
        let options = cxgate::replicas::Options {
            ca_file: server.ca_file(),
            cluster: kind == Kind::Cluster,
        };
        let registry = prometheus::Registry::new();
        let shared = rt.block_on(async {
            let redis = cxgate::replicas::Redis::connect_with(
                "CXGATE_BENCH_REDIS_URL",
                Some(&server.url()),
                "bench",
                &options,
                &registry,
            )
            .await
            .expect("redis handle");
            // A TLS handshake on a busy machine may miss the first 100 ms call bound; the
            // probe retries every 250 ms.
            for _ in 0..50 {
                if redis.is_up() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                redis.is_up(),
                "expected the bench's redis-server ({kind:?}) to answer"
            );
            Budget::new_shared(spec(), &registry, redis, NonZeroU32::MIN).expect("budget")
        });
        group.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { shared.admit("bench", NonZeroU32::MIN).await })
        });
    }
    group.finish();
}

criterion_group!(benches, admission);
criterion_main!(benches);
