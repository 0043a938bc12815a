//! The last errors the gateway answered clients with, for the admin status page.
//!
//! A short ring: the newest [`KEPT`] errors, each with its time, status, client, route and
//! the gateway's own message (never a token: the messages are the error envelope's, which
//! clients see too). Recording takes a lock only on an error answer, never on a success.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

/// How many errors are kept.
pub const KEPT: usize = 20;

struct Seen {
    at: SystemTime,
    status: u16,
    client: String,
    route: String,
    message: String,
}

#[derive(Default)]
pub struct RecentErrors {
    seen: Mutex<VecDeque<Seen>>,
}

impl RecentErrors {
    pub fn record(&self, status: u16, client: &str, route: &str, message: String) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() == KEPT {
            seen.pop_front();
        }
        seen.push_back(Seen {
            at: SystemTime::now(),
            status,
            client: client.to_string(),
            route: route.to_string(),
            message,
        });
    }

    /// Newest first.
    pub fn json(&self) -> serde_json::Value {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .rev()
            .map(|s| {
                serde_json::json!({
                    "at": humantime::format_rfc3339_seconds(s.at).to_string(),
                    "status": s.status,
                    "client": s.client,
                    "route": s.route,
                    "message": s.message,
                })
            })
            .collect()
    }
}
