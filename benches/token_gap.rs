//! The longest gap in service around a token refresh, with five-second tokens.
//!
//! The simulator issues tokens that live 5 s; the gateway renews them 1 s ahead (the test
//! harness's `refresh_before`). Four loops send uncached GETs back to back for 16 s, so
//! three or four refreshes happen under load. Prints the number of refreshes, the answers
//! other than 200 (goal: none), the longest time between consecutive successful answers,
//! and for each refresh the longest latency of the requests in flight around it.
//! Run: `cargo bench --bench token_gap` (the same run is the ignored test `refresh_gap` in
//! `tests/token.rs`).

mod support;

use std::time::Duration;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(support::refresh_gap_run(
        Duration::from_secs(5),
        Duration::from_secs(16),
        4,
    ));
    report.print();
    let failed = report.non_200().len();
    if failed > 0 {
        eprintln!("token_gap: {failed} answers were not 200 (goal: 0)");
        std::process::exit(1);
    }
}
