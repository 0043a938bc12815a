//! cxgate: a local caching gateway in front of the CX Social (Engagor) REST API.
//!
//! The binary in `src/main.rs` only parses the command line; everything it does is a
//! function of this library ([`start`], [`run`], [`demo::run`], [`sim::run_cli`]), so the
//! end-to-end tests drive exactly what users run. A request goes [`server`] → [`proxy`]
//! ([`auth`], [`cache`], [`budget`], [`token`], [`upstream`]) and back; [`app`] wires them.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod app;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod certs;
pub mod config;
pub mod demo;
pub mod error;
pub mod header_number;
pub mod leak;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod replicas;
pub mod secrets;
pub mod server;
pub mod sim;
pub mod token;
pub mod upstream;

pub use app::{run, start, token_init, Options, Running, StartError};
pub use secrets::Secrets;
