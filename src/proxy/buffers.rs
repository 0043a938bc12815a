//! The one bound on body bytes held in memory at once, `server.max_buffered_bytes`, so a
//! hostile upstream sending large answers, or many clients sending large bodies, cannot make
//! the process grow without bound; and each client's share of it, so one client sending large
//! or slow bodies cannot make every other client 503. [`Buffers`] says what counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::GatewayError;

/// The running total and its limit, shared by every request.
///
/// Every request body being read and every upstream answer being collected holds its bytes
/// here while it grows, and gives them back when the last part of the request or answer
/// that owns it is dropped. A body that would take the total past the limit is refused
/// (503 `overloaded`) instead of read: without it, `max_concurrency` times the 64 MiB answer
/// limit is what could be held.
///
/// Request bodies are also held per party: no one client key may hold more than half of
/// the limit in request bodies at once, or one `max_body_bytes` body if that is more (503
/// past it). Bodies read before the caller is known (a key sent as a form or JSON field) are
/// one party of their own, so unauthenticated senders together also stay within half.
/// Upstream answers belong to no party: merged callers share them.
///
/// What it does not count: cache entries (`cache.max_bytes` bounds those) and answers
/// already handed to a connection for writing (those go as fast as the client reads, and a
/// client that stops reading is closed by `server.idle_timeout`).
#[derive(Debug)]
pub struct Buffers {
    held: AtomicU64,
    limit: AtomicU64,
    /// `server.max_body_bytes`: a party's share is never less than one full-size body.
    body_limit: AtomicU64,
    /// Request-body bytes held per party (see [`Party`]); parties holding nothing are absent.
    /// A std mutex: it is held for a map update, never across an await.
    parties: Mutex<HashMap<Party, u64>>,
}

/// Who request-body bytes are held for: a client (by its ordinal), or everyone whose key
/// is not known yet because it comes in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Party {
    Client(usize),
    Unauthenticated,
}

impl Buffers {
    pub fn new(limit: u64) -> Arc<Buffers> {
        Arc::new(Buffers {
            held: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
            body_limit: AtomicU64::new(0),
            parties: Mutex::default(),
        })
    }

    /// A reload's new limit; what is held already stays held.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes held right now.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// `server.max_body_bytes` (the least a party's share may be), at start and on reload.
    pub fn set_body_limit(&self, max_body_bytes: u64) {
        self.body_limit.store(max_body_bytes, Ordering::Relaxed);
    }

    /// Bytes of request bodies one party may hold at once: half the limit, or one
    /// full-size body if that is more.
    pub fn share(&self) -> u64 {
        (self.limit.load(Ordering::Relaxed) / 2).max(self.body_limit.load(Ordering::Relaxed))
    }

    /// Takes `bytes` more (for `party`, if any), or refuses if that would pass the limit
    /// or the party's share.
    fn take(&self, bytes: u64, party: Option<Party>) -> Result<(), GatewayError> {
        if bytes == 0 {
            return Ok(());
        }
        let limit = self.limit.load(Ordering::Relaxed);
        let take_total = || {
            self.held
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    held.checked_add(bytes).filter(|total| *total <= limit)
                })
                .map(|_| ())
                .map_err(|_| GatewayError::BuffersFull)
        };
        let Some(party) = party else {
            return take_total();
        };
        let share = self.share();
        let mut parties = self.parties.lock().unwrap_or_else(|e| e.into_inner());
        let mine = parties.get(&party).copied().unwrap_or(0);
        if mine.checked_add(bytes).is_none_or(|m| m > share) {
            return Err(GatewayError::BuffersFull);
        }
        take_total()?;
        parties.insert(party, mine + bytes);
        Ok(())
    }

    /// Gives back `bytes` held for `party`.
    fn give_back(&self, bytes: u64, party: Option<Party>) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
        if let (Some(party), true) = (party, bytes > 0) {
            let mut parties = self.parties.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mine) = parties.get_mut(&party) {
                *mine = mine.saturating_sub(bytes);
                if *mine == 0 {
                    parties.remove(&party);
                }
            }
        }
    }

    /// A holding of `bytes` (possibly none yet), or 503 if the limit does not allow them.
    pub fn hold(self: &Arc<Self>, bytes: u64) -> Result<Held, GatewayError> {
        self.hold_as(bytes, None)
    }

    /// A holding of request-body bytes for `party`, within its share as well as the limit.
    pub fn hold_for(self: &Arc<Self>, party: Party, bytes: u64) -> Result<Held, GatewayError> {
        self.hold_as(bytes, Some(party))
    }

    fn hold_as(self: &Arc<Self>, bytes: u64, party: Option<Party>) -> Result<Held, GatewayError> {
        self.take(bytes, party)?;
        Ok(Held {
            inner: Some(Arc::new(Holding {
                buffers: Arc::clone(self),
                bytes: AtomicU64::new(bytes),
                party,
            })),
        })
    }
}

/// Bytes held for one body; given back when the last clone is dropped. Clones share one
/// holding, so an answer shared by merged callers is counted once.
#[derive(Debug, Clone, Default)]
pub struct Held {
    inner: Option<Arc<Holding>>,
}

#[derive(Debug)]
struct Holding {
    buffers: Arc<Buffers>,
    bytes: AtomicU64,
    party: Option<Party>,
}

impl Held {
    /// Holds `more` bytes too, or 503 if the limit does not allow them.
    pub fn grow(&self, more: u64) -> Result<(), GatewayError> {
        match &self.inner {
            None => Ok(()),
            Some(h) => {
                h.buffers.take(more, h.party)?;
                h.bytes.fetch_add(more, Ordering::Relaxed);
                Ok(())
            }
        }
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        let bytes = *self.bytes.get_mut();
        self.buffers.give_back(bytes, self.party);
    }
}

/// Why [`collect`] stopped.
pub enum CollectError {
    /// More than the per-body limit.
    TooLarge,
    /// No piece arrived within the allowed pause.
    Paused,
    /// The limit of all bodies held at once.
    Full,
    /// The body itself failed (a reset stream, a broken chunk).
    Body(Box<dyn std::error::Error + Send + Sync>),
}

/// Reads `body` whole into one buffer, holding its bytes in `held` as they arrive beyond
/// the `reserved` ones `held` was made with: at most `limit` bytes, and with no pause
/// between pieces longer than `pause` (if given).
pub async fn collect<B>(
    body: B,
    limit: u64,
    pause: Option<std::time::Duration>,
    held: &Held,
    reserved: u64,
) -> Result<Bytes, CollectError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut body = std::pin::pin!(body);
    // One piece is kept as it came (no copy: most bodies are one); from the second on they
    // go into one buffer, sized up front when the length was announced, so a body is never
    // held twice over while it is joined.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total: u64 = 0;
    let mut covered = reserved;
    loop {
        let next = body.frame();
        let frame = match pause {
            Some(pause) => tokio::time::timeout(pause, next)
                .await
                .map_err(|_| CollectError::Paused)?,
            None => next.await,
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| CollectError::Body(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let len = data.len() as u64;
        total += len;
        if total > limit {
            return Err(CollectError::TooLarge);
        }
        if total > covered {
            held.grow(total - covered).map_err(|_| CollectError::Full)?;
            covered = total;
        }
        match (&mut joined, first.take()) {
            (Some(buf), _) => buf.extend_from_slice(&data),
            (None, None) => first = Some(data),
            (None, Some(earlier)) => {
                let mut buf = BytesMut::with_capacity(covered.max(total) as usize);
                buf.extend_from_slice(&earlier);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
        }
    }
    Ok(match (joined, first) {
        (Some(buf), _) => buf.freeze(),
        (None, Some(one)) => one,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of the given pieces, one frame each.
    struct Pieces(std::collections::VecDeque<Bytes>);

    impl hyper::body::Body for Pieces {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(self.0.pop_front().map(|b| Ok(hyper::body::Frame::data(b))))
        }
    }

    fn pieces(parts: &[&'static [u8]]) -> Pieces {
        Pieces(parts.iter().map(|p| Bytes::from_static(p)).collect())
    }

    #[tokio::test]
    async fn collect_joins_pieces_in_order_and_holds_what_arrived() {
        let buffers = Buffers::new(100);
        let held = buffers.hold(4).expect("4 announced");
        let body = collect(pieces(&[b"ab", b"", b"cd", b"efg"]), 50, None, &held, 4)
            .await
            .ok()
            .expect("a body within the limits");
        assert_eq!(&body[..], b"abcdefg");
        assert_eq!(buffers.held(), 7, "the announced 4 plus the 3 beyond them");
        let one = collect(pieces(&[b"solo"]), 50, None, &held, 0)
            .await
            .ok()
            .expect("one piece");
        assert_eq!(&one[..], b"solo");
        assert!(
            matches!(
                collect(pieces(&[b"0123456789"]), 5, None, &held, 0).await,
                Err(CollectError::TooLarge)
            ),
            "more than the per-body limit must be refused"
        );
        let small = Buffers::new(3);
        let tight = small.hold(0).expect("nothing yet");
        assert!(
            matches!(
                collect(pieces(&[b"ab", b"cd"]), 50, None, &tight, 0).await,
                Err(CollectError::Full)
            ),
            "passing max_buffered_bytes must be refused"
        );
    }

    #[test]
    fn one_party_holds_at_most_half_and_others_still_get_theirs() {
        let buffers = Buffers::new(100);
        let greedy = buffers.hold_for(Party::Client(1), 50).expect("half of 100");
        assert!(
            greedy.grow(1).is_err(),
            "a party must not pass half the limit"
        );
        assert!(buffers.hold_for(Party::Client(1), 1).is_err());
        let other = buffers
            .hold_for(Party::Client(2), 40)
            .expect("another party's share");
        drop(greedy);
        assert_eq!(buffers.held(), 40, "the party's bytes given back");
        let again = buffers
            .hold_for(Party::Client(1), 50)
            .expect("its share again");
        drop((other, again));
        assert_eq!(buffers.held(), 0);
    }

    #[test]
    fn holdings_past_the_limit_are_refused_and_dropping_gives_bytes_back() {
        let buffers = Buffers::new(100);
        let a = buffers.hold(60).expect("60 of 100");
        assert!(
            buffers.hold(41).is_err(),
            "60 + 41 must pass a limit of 100"
        );
        let b = buffers.hold(40).expect("60 + 40 fits exactly");
        assert!(b.grow(1).is_err(), "growing past the limit must be refused");
        let shared = b.clone();
        drop(b);
        assert_eq!(buffers.held(), 100, "a clone keeps the holding");
        drop(shared);
        drop(a);
        assert_eq!(buffers.held(), 0, "every byte given back");
    }
}
