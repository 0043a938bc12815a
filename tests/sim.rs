//! Black-box tests of the simulated CX Social API: each test starts its own simulator on
//! 127.0.0.1:0 and talks HTTP to it, as the gateway will. The tests live in `tests/sim/`,
//! one file per concern.

#[path = "sim/auth.rs"]
mod auth;
#[path = "sim/control.rs"]
mod control;
#[path = "sim/data.rs"]
mod data;
#[path = "sim/fidelity.rs"]
mod fidelity;
#[path = "sim/support.rs"]
mod support;
