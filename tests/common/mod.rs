//! The suites' harness. What benches and unit tests also use lives in the
//! `cxgate-testkit` crate and is re-exported here under the names the suites have always
//! used (`common::start`, `common::redis_server::RedisServer`, ...); only what needs this
//! test build itself (the path of the built binary) is defined here.
#![allow(dead_code, unused_imports)]

pub mod process;
pub mod replicas;
pub mod spellings;

pub use cxgate_testkit::gateway::*;
pub use cxgate_testkit::http::*;
pub use cxgate_testkit::load::*;
pub use cxgate_testkit::upstream::*;
pub use cxgate_testkit::{overload, redis as redis_server};
pub use process::Proc;
