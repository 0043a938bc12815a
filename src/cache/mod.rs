//! The response cache: keys, freshness, the bounded store, single-flight merging, and the
//! shared tier with its fills merged across replicas. It knows nothing of routes or config:
//! the proxy passes plain values in (ttl, tags, the byte bound). Invariants: keys never hold
//! `access_token`; the store keeps to its byte bound; once a tag invalidation or purge returns,
//! no lookup sees what it removed; one fetch per key is in flight at a time.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use cxgate::cache::{cache_key, CachedResponse, Merger, Store};
//!
//! let registry = prometheus::Registry::new();
//! let store = Store::new(256 << 20, &registry)?;
//! let merger = Merger::<Result<CachedResponse, String>>::new();
//! let headers = http::HeaderMap::new();
//! let key = cache_key(&http::Method::GET, "/me/", Some("access_token=k"));
//! if store.get(&key, &headers).await.is_none() {
//!     let fetch = async {
//!         Ok(CachedResponse {
//!             status: http::StatusCode::OK,
//!             headers: http::HeaderMap::new(),
//!             body: bytes::Bytes::from_static(b"{}"),
//!             tags: vec!["me".to_owned()].into_boxed_slice(),
//!             stored_at: tokio::time::Instant::now(),
//!             ttl: Duration::from_secs(600),
//!             stale_while_revalidate: Duration::from_secs(60),
//!             stale_if_error: Duration::from_secs(3600),
//!         })
//!     };
//!     let (answer, _role) = merger.run(key.clone(), fetch).await?;
//!     if let Ok(response) = answer {
//!         store.insert(key, &headers, response).await;
//!     }
//! }
//! store.invalidate_tags(&["me".to_owned()]).await;
//! # Ok(())
//! # }
//! ```

mod deadlines;
mod entry;
mod fill;
mod key;
mod lua;
mod merge;
mod outcome;
mod shared;
mod stats;
mod store;
mod tags;
mod vary;

pub use entry::{stored_status, CachedResponse, Freshness, StoredResponse, Timing};
pub use fill::{Fill, FillLock, Take, LOCK_TTL};
pub use key::{cache_key, normalize_path};
pub use merge::{Behind, Joined, MergeError, Merger, Peer, Progress, Role};
pub use outcome::Failure;
pub use shared::{Generations, Localize, Routed, SharedMetrics, SharedTier, Windows};
pub use store::{Since, Store};
pub use vary::Variant;
