//! What a failed fill leaves for the replicas that waited on it. A replica waiting on
//! another's fill lock is that call's follower, as a request merged on one replica is its
//! leader's: when the call fails (an upstream error answer, a timeout, an unreachable
//! upstream) there is no entry to find, and without a word each waiter would take the
//! fill over in turn, one upstream call after another, each paying the failure's full
//! time again. So the holder releases its lock together with a short-lived note of the
//! failure ([`Failure`]) and the replicas that saw that very lock held take it, as the
//! local followers take their leader's failed answer. A note names the fill it ends (the
//! lock's value): a miss that arrives later never saw that lock and makes its own call.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Leads every note; anything else under a note key is not read.
const MAGIC: &[u8; 4] = b"cxo1";

/// How long a note outlives its fill: the waiters look every few milliseconds, and a look
/// slowed by Redis takes at most the patient call bound, well within this.
pub const NOTE_TTL: Duration = Duration::from_secs(2);

/// How a fill's upstream call failed, as its waiters take it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The upstream's answer, not stored: an error status, its stored headers and body in
    /// the shared tier's neutral form (see [`super::Localize`]).
    Answered {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// No answer within the upstream timeout (this long).
    TimedOut(Duration),
    /// The upstream could not be reached, or answered something unreadable (what was seen).
    Unreachable(String),
}

impl Failure {
    /// Whether an upstream answer of `status`, not stored, is a failure its waiters take:
    /// an error about the resource or the upstream, the same for every client. Not a 429
    /// (the upstream's limit, which each waiter's own budget terms decide on) nor a 401
    /// (about the token, which each replica handles itself).
    pub fn noted(status: StatusCode) -> bool {
        (status.is_client_error() || status.is_server_error())
            && status != StatusCode::TOO_MANY_REQUESTS
            && status != StatusCode::UNAUTHORIZED
    }
}

/// The note of the fill whose lock held `holder`, ending in `failure`; `None` over `max`
/// bytes (the waiters then take the fill over, as without a note).
pub fn encode(holder: &str, failure: &Failure, max: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(64);
    out.put_slice(MAGIC);
    out.put_u16_le(u16::try_from(holder.len()).ok()?);
    out.put_slice(holder.as_bytes());
    match failure {
        Failure::Answered {
            status,
            headers,
            body,
        } => {
            out.put_u8(0);
            out.put_u16_le(status.as_u16());
            out.put_u16_le(u16::try_from(headers.len()).ok()?);
            for (name, value) in headers {
                out.put_u16_le(u16::try_from(name.as_str().len()).ok()?);
                out.put_slice(name.as_str().as_bytes());
                out.put_u32_le(u32::try_from(value.len()).ok()?);
                out.put_slice(value.as_bytes());
            }
            out.put_slice(body);
        }
        Failure::TimedOut(after) => {
            out.put_u8(1);
            out.put_u64_le(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        }
        Failure::Unreachable(what) => {
            out.put_u8(2);
            out.put_slice(what.as_bytes());
        }
    }
    (out.len() <= max).then_some(out)
}

/// The failure a note says the fill whose lock held `holder` ended in; `None` for a note
/// of another fill, or one that does not read as [`encode`] writes (anyone who may write
/// to Redis may write anything there: such a note is passed over, and the waiter takes
/// the fill over).
pub fn decode(note: &[u8], holder: &[u8]) -> Option<Failure> {
    let mut at = Bytes::copy_from_slice(note);
    let take = |at: &mut Bytes, n: usize| (at.remaining() >= n).then(|| at.split_to(n));
    if take(&mut at, 4)?.as_ref() != MAGIC {
        return None;
    }
    let n = usize::from(take(&mut at, 2)?.get_u16_le());
    if take(&mut at, n)?.as_ref() != holder {
        return None;
    }
    match take(&mut at, 1)?[0] {
        0 => {
            let status = StatusCode::from_u16(take(&mut at, 2)?.get_u16_le()).ok()?;
            if !Failure::noted(status) {
                return None;
            }
            let count = take(&mut at, 2)?.get_u16_le();
            let mut headers = HeaderMap::with_capacity(usize::from(count).min(64));
            for _ in 0..count {
                let n = usize::from(take(&mut at, 2)?.get_u16_le());
                let name = HeaderName::from_bytes(&take(&mut at, n)?).ok()?;
                let n = take(&mut at, 4)?.get_u32_le() as usize;
                let value = HeaderValue::from_maybe_shared(take(&mut at, n)?).ok()?;
                headers.append(name, value);
            }
            Some(Failure::Answered {
                status,
                headers,
                body: at,
            })
        }
        1 => {
            let millis = take(&mut at, 8)?.get_u64_le();
            // No replica's upstream timeout is a day long: anything longer was planted.
            (millis <= 86_400_000 && at.is_empty())
                .then(|| Failure::TimedOut(Duration::from_millis(millis)))
        }
        2 => String::from_utf8(at.to_vec())
            .ok()
            .filter(|what| what.len() <= 1024)
            .map(Failure::Unreachable),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered() -> Failure {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        Failure::Answered {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            headers,
            body: Bytes::from_static(b"{\"meta\":{\"code\":500}}"),
        }
    }

    #[test]
    fn every_failure_survives_the_round_trip_for_its_own_fill_only() {
        for failure in [
            answered(),
            Failure::TimedOut(Duration::from_secs(5)),
            Failure::Unreachable("connection refused".to_string()),
        ] {
            let note = encode("r1:00ff", &failure, 1 << 20).expect("encodes");
            assert_eq!(decode(&note, b"r1:00ff"), Some(failure.clone()));
            assert_eq!(
                decode(&note, b"r1:00fe"),
                None,
                "expected another fill's note passed over"
            );
        }
    }

    #[test]
    fn damaged_or_planted_notes_are_passed_over() {
        let note = encode("r1:00ff", &answered(), 1 << 20).expect("encodes");
        for cut in [0, 3, 8, 12, 20] {
            assert_eq!(decode(&note[..cut], b"r1:00ff"), None, "cut at {cut}");
        }
        let mut ok = encode("r1:00ff", &answered(), 1 << 20).expect("encodes");
        let at = 4 + 2 + 7 + 1;
        ok[at..at + 2].copy_from_slice(&200u16.to_le_bytes());
        assert_eq!(decode(&ok, b"r1:00ff"), None, "a 200 is no failure");
        let long = encode("r1:00ff", &Failure::TimedOut(Duration::MAX), 1 << 20).expect("encodes");
        assert_eq!(decode(&long, b"r1:00ff"), None, "a timeout of ages");
        assert!(
            encode("r1:00ff", &answered(), 16).is_none(),
            "over the bound"
        );
    }
}
