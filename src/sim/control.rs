//! The simulator's own control endpoints under `/_sim/`: stats, faults and revocation.
//!
//! Invariants: these requests are never counted, faulted, authenticated or rate-limited, so
//! reading the stats does not change them; answers are plain JSON (no envelope) except
//! errors, which use the CX Social envelope like every other error.

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;

use super::faults::Faults;
use super::reply::{self, Reply};
use super::Sim;

/// Fault sets are small; anything bigger is a mistake.
const MAX_BODY: usize = 64 * 1024;

pub(crate) async fn handle(sim: &Sim, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    let path = path.strip_suffix('/').unwrap_or(path).to_owned();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/_sim/stats") => reply::json(StatusCode::OK, &sim.stats.snapshot()),
        (Method::POST, "/_sim/stats/reset") => {
            sim.stats.reset();
            reply::json(StatusCode::OK, &json!({"reset": true}))
        }
        (Method::GET, "/_sim/faults") => faults_answer(&sim.faults.current()),
        (Method::DELETE, "/_sim/faults") => {
            sim.faults.set(Faults::default());
            faults_answer(&sim.faults.current())
        }
        (Method::POST | Method::PUT, "/_sim/faults") => match read_faults(req).await {
            Ok(faults) => {
                sim.faults.set(faults);
                faults_answer(&sim.faults.current())
            }
            Err(message) => reply::error(StatusCode::BAD_REQUEST, "invalid_request", &message),
        },
        (Method::POST, "/_sim/revoke") => {
            let revoked = sim.tokens.revoke_all();
            reply::json(StatusCode::OK, &json!({"revoked": revoked}))
        }
        (_, "/_sim/stats" | "/_sim/stats/reset" | "/_sim/faults" | "/_sim/revoke") => reply::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "wrong method for this control endpoint",
        ),
        _ => reply::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such control endpoint",
        ),
    }
}

fn faults_answer(faults: &Faults) -> Reply {
    match serde_json::to_value(faults) {
        Ok(value) => reply::json(StatusCode::OK, &value),
        Err(e) => reply::error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
    }
}

/// An empty body means "no faults", like DELETE.
async fn read_faults(req: Request<Incoming>) -> Result<Faults, String> {
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Faults::default());
    }
    let faults: Faults =
        serde_json::from_slice(&bytes).map_err(|e| format!("bad fault JSON: {e}"))?;
    faults.validate()?;
    Ok(faults)
}
