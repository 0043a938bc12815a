//! The benches' side of the shared harness: the `cxgate-testkit` crate under the flat names
//! the benches use (`support::start`, `support::Env`, `support::budget_load_run`, ...), the
//! same code the test suites drive, so a bench measures the gateway the tests check.
#![allow(unused_imports)]

pub use cxgate_testkit::gateway::*;
pub use cxgate_testkit::http::*;
pub use cxgate_testkit::load::*;
pub use cxgate_testkit::upstream::*;
pub use cxgate_testkit::{metrics, overload, redis as redis_server};
