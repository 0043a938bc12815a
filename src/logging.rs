//! Logging set-up: human-readable or JSON lines on stderr, written by a background thread.
//!
//! Under load the gateway logs one access line per request; writing each one to stderr
//! with its own system call would cost more than serving a cache hit. Lines are handed to
//! a thread that writes whatever has queued in one go, so the request path never blocks on
//! the terminal or a pipe. [`LogGuard`] flushes what is left when the program ends.

use std::io::Write;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Lines queued beyond this make the request path wait: memory stays bounded even when
/// stderr is slower than the traffic.
const QUEUE: usize = 64 * 1024;

/// Flushes and stops the writer thread when dropped.
pub struct LogGuard {
    sender: mpsc::SyncSender<Vec<u8>>,
    flushed: Option<mpsc::Receiver<()>>,
    _thread: Option<JoinHandle<()>>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        // The global subscriber keeps its own sender for as long as the process lives, so
        // the thread cannot be stopped; ask it to write everything queued so far instead.
        // An empty line is that request (events are never empty).
        if self.sender.send(Vec::new()).is_ok() {
            if let Some(flushed) = &self.flushed {
                let _ = flushed.recv_timeout(std::time::Duration::from_secs(2));
            }
        }
    }
}

/// A `MakeWriter` whose writers queue one formatted event each.
#[derive(Clone)]
struct Queue(mpsc::SyncSender<Vec<u8>>);

/// One event being formatted; sent as a whole when dropped.
struct Line {
    buf: Vec<u8>,
    queue: mpsc::SyncSender<Vec<u8>>,
}

impl Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            let _ = self.queue.send(std::mem::take(&mut self.buf));
        }
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            buf: Vec::with_capacity(256),
            queue: self.0.clone(),
        }
    }
}

type Writer = (
    mpsc::SyncSender<Vec<u8>>,
    mpsc::Receiver<()>,
    Option<JoinHandle<()>>,
);

fn spawn_writer() -> Writer {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let (ack, flushed) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("cxgate-log".into())
        .spawn(move || {
            // stderr is locked per batch, never for the thread's life: the binary still
            // prints its own messages (`eprintln!`) and would deadlock on a held lock.
            let mut batch = Vec::with_capacity(64 * 1024);
            while let Ok(line) = rx.recv() {
                let mut flush_asked = line.is_empty();
                batch.extend_from_slice(&line);
                // Take whatever else is already queued before paying for one write.
                while let Ok(more) = rx.try_recv() {
                    flush_asked |= more.is_empty();
                    batch.extend_from_slice(&more);
                }
                let mut out = std::io::stderr().lock();
                let _ = out.write_all(&batch);
                let _ = out.flush();
                drop(out);
                batch.clear();
                if flush_asked {
                    let _ = ack.send(());
                }
            }
        })
        .ok();
    (tx, flushed, thread)
}

/// Installs the global subscriber. `level` overrides `RUST_LOG`.
pub fn init(json: bool, level: Option<&str>) -> LogGuard {
    let filter = match level {
        Some(l) => EnvFilter::new(l),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (tx, flushed, thread) = spawn_writer();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Queue(tx.clone()));
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.with_ansi(false).try_init()
    };
    LogGuard {
        sender: tx,
        flushed: Some(flushed),
        _thread: thread,
    }
}

/// Prints one line on stdout. A closed stdout (`cxgate check ... | head -1`) is no error
/// worth dying for: the line is dropped and the command ends with its normal code, where
/// `println!` would panic.
pub fn say(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
}

/// As [`say`], on stderr.
pub fn say_err(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stderr().lock();
    let _ = out.write_fmt(args).and_then(|()| out.write_all(b"\n"));
}
