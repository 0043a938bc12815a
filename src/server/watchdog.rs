//! Each connection's watchdog: what it knows of the connection (a request running, idle
//! since, a head arriving since), the task that closes the connection when a limit of
//! [`Limits`] runs out or drains it at shutdown, and the wrappers through which the
//! connection hears it. The watchdog never runs on the connection's wake-ups: the
//! connection reads one atomic per poll, and the watchdog wakes it when it has a word.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use super::Limits;

/// No time recorded.
const NEVER: u64 = u64::MAX;

/// What one connection's watchdog knows: whether a request is running, since when it has
/// been idle, and since when a new head has been arriving. Times are milliseconds since
/// accept.
pub(super) struct Watch {
    accepted: tokio::time::Instant,
    /// Requests whose answer is being made.
    running: AtomicUsize,
    /// Some request head has been read whole.
    served: AtomicBool,
    /// The client spoke HTTP/2 (its preface): frames such as PING are no new head.
    h2: AtomicBool,
    idle_since: AtomicU64,
    head_since: AtomicU64,
    /// What the watchdog has told the connection: [`CLOSE`], [`DRAIN`] or nothing yet.
    told: AtomicU8,
    /// The connection task's waker, for the watchdog to wake it with what it told.
    waker: std::sync::Mutex<Option<std::task::Waker>>,
}

/// The watchdog's word to its connection: close now (a limit ran out).
const CLOSE: u8 = 1;
/// The watchdog's word to its connection: the server shuts down, finish what runs and close.
const DRAIN: u8 = 2;

impl Watch {
    pub(super) fn new() -> Watch {
        Watch {
            accepted: tokio::time::Instant::now(),
            running: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(NEVER),
            told: AtomicU8::new(0),
            waker: std::sync::Mutex::new(None),
        }
    }

    /// Tells the connection `word` and wakes its task.
    fn tell(&self, word: u8) {
        self.told.fetch_or(word, Ordering::AcqRel);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn now_ms(&self) -> u64 {
        self.accepted.elapsed().as_millis() as u64
    }

    /// A request head has been read: no deadline while its answer is made.
    pub(super) fn begin(self: &Arc<Self>) -> Running {
        self.running.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.head_since.store(NEVER, Ordering::Release);
        Running(Arc::clone(self))
    }

    /// Bytes arrived: on an idle HTTP/1.1 connection that starts the next head's clock.
    fn read_some(&self) {
        if self.running.load(Ordering::Acquire) == 0
            && self.served.load(Ordering::Acquire)
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since.load(Ordering::Acquire) == NEVER
        {
            self.head_since.store(self.now_ms(), Ordering::Release);
        }
    }

    /// When the connection is to be closed if nothing changes; `None` while a request runs.
    fn deadline(&self, limits: &Limits) -> Option<tokio::time::Instant> {
        if self.running.load(Ordering::Acquire) > 0 {
            return None;
        }
        let at = |ms: u64, plus: Duration| {
            Some(self.accepted + Duration::from_millis(ms).saturating_add(plus))
        };
        if !self.served.load(Ordering::Acquire) {
            return at(0, limits.header_timeout);
        }
        match self.head_since.load(Ordering::Acquire) {
            NEVER => at(self.idle_since.load(Ordering::Acquire), limits.idle_timeout),
            since => at(since, limits.header_timeout),
        }
    }

    /// Resolves when the connection has been silent, slow or idle for too long.
    ///
    /// Nothing wakes the watchdog when a request begins or ends or a head starts: it sleeps
    /// until the deadline it saw or `recheck`, whichever is sooner, and looks again. That
    /// never oversleeps a deadline: one that a change after `now` sets is at least
    /// `header_timeout` or `idle_timeout` after it (less the millisecond the times are
    /// rounded to). So a connection costs a timer fire every `recheck` instead of a wake-up
    /// and a new timer for each request, and closes at the same instant as before.
    async fn expired(&self, limits: Limits) -> &'static str {
        let recheck = limits
            .header_timeout
            .min(limits.idle_timeout)
            .saturating_sub(Duration::from_millis(1))
            .max(Duration::from_millis(1));
        let sleep = tokio::time::sleep(recheck);
        tokio::pin!(sleep);
        loop {
            // `now` before the state: a change this reading misses happened after it.
            let now = tokio::time::Instant::now();
            let wake = match self.deadline(&limits) {
                None => now + recheck,
                Some(deadline) if now >= deadline => {
                    return if !self.served.load(Ordering::Acquire) {
                        "no request head within header_timeout of accept"
                    } else if self.head_since.load(Ordering::Acquire) != NEVER {
                        "request head not finished within header_timeout"
                    } else {
                        "idle for idle_timeout"
                    };
                }
                Some(deadline) => deadline.min(now + recheck),
            };
            sleep.as_mut().reset(wake);
            sleep.as_mut().await;
        }
    }
}

/// A request being answered; dropping it starts the connection's idle time.
pub(super) struct Running(Arc<Watch>);

impl Drop for Running {
    fn drop(&mut self) {
        let w = &self.0;
        if w.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            w.idle_since.store(w.now_ms(), Ordering::Release);
            w.head_since.store(NEVER, Ordering::Release);
        }
    }
}

/// A connection's byte stream, telling its [`Watch`] when bytes arrive.
pub(super) struct Watched<T> {
    io: T,
    watch: Arc<Watch>,
    /// The first bytes have been looked at for the HTTP/2 preface.
    seen_first: bool,
}

impl<T> Watched<T> {
    pub(super) fn new(io: T, watch: &Arc<Watch>) -> Watched<T> {
        Watched {
            io,
            watch: Arc::clone(watch),
            seen_first: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if !this.seen_first {
                this.seen_first = true;
                if buf.filled()[before..].starts_with(b"PRI ") {
                    this.watch.h2.store(true, Ordering::Relaxed);
                }
            }
            this.watch.read_some();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// A connection's whole task, as its watchdog lets it run: it ends when told [`CLOSE`].
    ///
    /// The watchdog runs as a task of its own and tells the connection what it decided
    /// through the [`Watch`], so a wake-up of the connection polls one atomic for it
    /// instead of the watchdog's timer and a shutdown signal shared with other
    /// connections (a lock). With thousands of connections those were cold memory on
    /// every request.
    pub(super) struct Guarded<F> {
        #[pin]
        inner: F,
        watch: Arc<Watch>,
        registered: bool,
    }
}

impl<F> Guarded<F> {
    pub(super) fn new(inner: F, watch: &Arc<Watch>) -> Guarded<F> {
        Guarded {
            inner,
            watch: Arc::clone(watch),
            registered: false,
        }
    }
}

impl<F: Future<Output = ()>> Future for Guarded<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        if !*this.registered {
            // This future is a spawned task's own, so its waker is that task's for good:
            // stored once, before `told` is read, so a word told after the read wakes it.
            *this.registered = true;
            *this.watch.waker.lock().unwrap_or_else(|e| e.into_inner()) = Some(cx.waker().clone());
        }
        if this.watch.told.load(Ordering::Acquire) & CLOSE != 0 {
            return Poll::Ready(());
        }
        this.inner.poll(cx)
    }
}

pin_project_lite::pin_project! {
    /// A hyper connection that starts its graceful shutdown once told [`DRAIN`]: no new
    /// request on HTTP/1.1 after the one running, GOAWAY on HTTP/2.
    pub(super) struct Drained<C> {
        #[pin]
        conn: C,
        watch: Arc<Watch>,
        draining: bool,
    }
}

impl<C> Drained<C> {
    pub(super) fn new(conn: C, watch: &Arc<Watch>) -> Drained<C> {
        Drained {
            conn,
            watch: Arc::clone(watch),
            draining: false,
        }
    }
}

impl<C: GracefulConnection> Future for Drained<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let mut this = self.project();
        if !*this.draining && this.watch.told.load(Ordering::Acquire) & DRAIN != 0 {
            *this.draining = true;
            this.conn.as_mut().graceful_shutdown();
        }
        this.conn.poll(cx)
    }
}

/// A connection's watchdog, in a task of its own: tells the connection to close when a
/// limit runs out, and to drain when `shutdown` turns true (the limits still hold then).
pub(super) async fn run(
    watch: Arc<Watch>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
    peer: SocketAddr,
) {
    let expired = tokio::select! {
        biased;
        why = watch.expired(limits.clone()) => Some(why),
        // The value's guard is let go here, before the next wait.
        _ = shutdown.wait_for(|stop| *stop) => None,
    };
    let why = match expired {
        Some(why) => why,
        None => {
            watch.tell(DRAIN);
            watch.expired(limits).await
        }
    };
    tracing::debug!(%peer, why, "connection closed");
    watch.tell(CLOSE);
}

/// Aborts a task when dropped: a connection's watchdog ends with its connection.
pub(super) struct AbortOnDrop(pub(super) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A future that counts how often it is polled.
    struct Polls<F> {
        inner: Pin<Box<F>>,
        count: Arc<AtomicUsize>,
    }

    impl<F: Future> Future for Polls<F> {
        type Output = F::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
            self.count.fetch_add(1, Ordering::Relaxed);
            self.inner.as_mut().poll(cx)
        }
    }

    fn limits(header: u64, idle: u64) -> Limits {
        Limits {
            header_timeout: Duration::from_secs(header),
            idle_timeout: Duration::from_secs(idle),
            max_connections: 1,
            open: None,
        }
    }

    /// Polls the watchdog of `watch` in a task of its own, counting its wake-ups.
    fn watchdog(
        watch: &Arc<Watch>,
        limits: Limits,
    ) -> (tokio::task::JoinHandle<&'static str>, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let w = Arc::clone(watch);
        let task = tokio::spawn(Polls {
            inner: Box::pin(async move { w.expired(limits).await }),
            count: Arc::clone(&count),
        });
        (task, count)
    }

    #[tokio::test(start_paused = true)]
    async fn requests_on_a_kept_alive_connection_do_not_wake_its_watchdog() {
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        let (task, polls) = watchdog(&watch, limits(1, 5));
        tokio::task::yield_now().await;
        let before = polls.load(Ordering::Relaxed);
        // 1,000 requests, each a head arriving, its answer made, and the connection idle
        // again, with the watchdog's task free to run between each step; the clock stands.
        for _ in 0..1000 {
            watch.read_some();
            tokio::task::yield_now().await;
            let running = watch.begin();
            tokio::task::yield_now().await;
            drop(running);
            tokio::task::yield_now().await;
        }
        let during = polls.load(Ordering::Relaxed) - before;
        assert!(
            during == 0,
            "expected no wake-up of the watchdog for 1,000 requests, saw {during} polls"
        );
        let why = task.await.expect("the watchdog task ran");
        assert_eq!(why, "idle for idle_timeout");
        assert_eq!(
            tokio::time::Instant::now(),
            start + Duration::from_secs(5),
            "expected the close at idle_timeout after the last answer"
        );
        let total = polls.load(Ordering::Relaxed);
        assert!(
            total <= 10,
            "expected a few timer wake-ups over 5 s of idle time, saw {total} polls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_begun_while_idle_is_cut_at_header_timeout_not_later() {
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        drop(watch.begin());
        let (task, _) = watchdog(&watch, limits(1, 5));
        // Idle until 5 s; a head starts at 2.5 s and must be done by 3.5 s, which no
        // wake-up announces to the watchdog.
        tokio::time::advance(Duration::from_millis(2500)).await;
        watch.read_some();
        let why = task.await.expect("the watchdog task ran");
        assert_eq!(why, "request head not finished within header_timeout");
        assert_eq!(
            tokio::time::Instant::now(),
            start + Duration::from_millis(3500),
            "expected the close at header_timeout after the head's first byte"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_keeps_both_clocks() {
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
            max_connections: 1,
            open: None,
        };
        let watch = Arc::new(Watch::new());
        let start = tokio::time::Instant::now();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(1)),
            "before any request: header_timeout from accept"
        );
        let running = watch.begin();
        assert_eq!(
            watch.deadline(&limits),
            None,
            "no deadline while a request runs"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(running);
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(7)),
            "idle: idle_timeout from the end of the last request"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        watch.read_some();
        assert_eq!(
            watch.deadline(&limits),
            Some(start + Duration::from_secs(4)),
            "a new head arriving: header_timeout from its first byte"
        );
        let why = watch.expired(limits).await;
        assert_eq!(why, "request head not finished within header_timeout");
        assert_eq!(tokio::time::Instant::now(), start + Duration::from_secs(4));
    }
}
