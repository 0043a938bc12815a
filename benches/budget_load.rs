//! The budget under load: 20 gateway clients offering ten times the shared budget for 20 s,
//! against a simulator whose own limit equals the budget. Prints upstream calls against the
//! budget's allowance, the share each client got, and the 429s on both sides.
//! Run: `cargo bench --bench budget_load` (the same run is the ignored test `load_run` in
//! tests/budget.rs).

mod support;

use std::time::Duration;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(support::budget_load_run(
        20,
        Duration::from_millis(100),
        Duration::from_secs(20),
    ));
    report.print();
    let problems = report.problems();
    assert!(problems.is_empty(), "budget load run: {problems:?}");
}
