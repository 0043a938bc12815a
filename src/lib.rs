//! cxgate: a local caching gateway in front of the CX Social (Engagor) REST API.
//!
//! The binary in `src/main.rs` only parses the command line; everything it does is a
//! function of this library, so the end-to-end tests drive exactly what users run.
#![forbid(unsafe_code)]

pub mod budget;
pub mod cache;
pub mod sim;
pub mod token;
