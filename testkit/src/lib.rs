//! What cxgate's tests and benches share, in one crate so the integration suites, the
//! benches and the library's own unit tests use the same code without including files by
//! path: the simulator and gateway pair ([`gateway`]), answers and raw exchanges
//! ([`http`]), a recording test upstream ([`upstream`]), load drivers ([`load`],
//! [`overload`]), a gateway's metrics read from outside ([`metrics`]) and a `redis-server`
//! of the tests' own ([`redis`]).

pub mod gateway;
pub mod http;
pub mod load;
pub mod metrics;
pub mod overload;
pub mod redis;
pub mod upstream;
