//! What sharing the budget through Redis costs one admission: the local ledger against the
//! shared Lua script on a `redis-server` on loopback (started here on a free port, stopped
//! by its process id). The budget is large enough that nothing ever waits, so the figures
//! are the decision alone. Run: `cargo bench --bench redis_admission`.
//! Without `redis-server` on PATH only the local figure is measured (said loudly).

use std::num::NonZeroU32;
use std::process::{Child, Command, Stdio};
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

/// Our own `redis-server`, killed by its process id when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<(Server, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let child = match child {
        Ok(c) => Server(c),
        Err(e) => {
            eprintln!(
                "\n*** redis-server not on PATH ({e}): measuring the local ledger only ***\n"
            );
            return None;
        }
    };
    for _ in 0..150 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("redis-server did not listen on {port}; measuring the local ledger only");
    None
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

    if let Some((_server, port)) = start_redis() {
        std::env::set_var(
            "CXGATE_BENCH_REDIS_URL",
            format!("redis://127.0.0.1:{port}/"),
        );
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
