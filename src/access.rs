//! The access log: one line per request, to stderr or a file, written off the request path.
//! A request never waits on the disk: lines are batched for one writer thread, and when the
//! disk is slower than the traffic the lines that do not fit are dropped and counted
//! (`cxgate_access_log_dropped_total`). [`AccessLog`] says how the batch works.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Registry};

/// Bytes of lines waiting for the writer beyond which new lines are dropped: some twenty
/// thousand typical lines, a few seconds of a stalled disk at full load.
pub const DEFAULT_PENDING: usize = 4 << 20;

/// How long the writer lets lines gather after each batch before it takes the next. Without
/// it, under load the writer took a batch as soon as it had written the last, a line or two
/// each time: a `write` (or a wake-up of the writer) per one to three requests, on a thread
/// competing with the connection runtimes for the cores. With it, at most a hundred writes a
/// second whatever the traffic, and a line reaches the disk at most this much later. A flush,
/// a reopen or the stop cut it short.
pub const LINGER: Duration = Duration::from_millis(10);

pub use crate::config::AccessLogTarget as Target;

/// Where the writer thread puts a batch. A file target reopens on request; tests use
/// writers that block or fail.
pub trait Sink: Send + 'static {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()>;
    /// Opens the file again by its name (after logrotate renamed it).
    fn reopen(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct StderrSink;

impl Sink for StderrSink {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        // Locked per batch: other log lines and `eprintln!` share stderr.
        let mut out = io::stderr().lock();
        out.write_all(batch)?;
        out.flush()
    }
}

struct FileSink {
    path: PathBuf,
    file: File,
}

/// Opens `path` for appending, creating it; what `cxgate check` tries too. A FIFO or a
/// socket is refused without waiting for its reader; a character device (`/dev/null`) is
/// a log like a file.
pub fn open_append(path: &Path) -> io::Result<File> {
    crate::config::files::open_append(path)
}

impl Sink for FileSink {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        self.file.write_all(batch)
    }

    fn reopen(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path)?;
        Ok(())
    }
}

/// The state the request side and the writer share.
#[derive(Default)]
struct Pending {
    batch: Vec<u8>,
    reopen: bool,
    stop: bool,
    /// The writer is writing a batch it took: the log is not flushed until it is done.
    writing: bool,
    /// The writer waits on `wake` and no one has woken it yet. A notification costs a
    /// system call even with no thread waiting, so lines only send one when this is set.
    waiting: bool,
    /// Callers of [`AccessLog::flush`] waiting on `idle`, which is only notified when
    /// someone waits on it, for the same reason.
    flushing: usize,
}

struct Shared {
    pending: Mutex<Pending>,
    /// The writer waits on it for lines; `flush` waits on it for the writer to finish.
    wake: Condvar,
    idle: Condvar,
    limit: usize,
    json: bool,
    dropped: IntCounter,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The handle requests log through; cheap to clone. The writer thread ends when the last
/// handle is dropped, after writing what is pending.
///
/// A request formats its line into a buffer its thread reuses, then copies it into one
/// shared batch under a lock held only for that copy. A single writer thread swaps the batch
/// out and writes it in one system call, then lets lines gather for [`LINGER`] before it takes
/// the next, so a busy gateway pays one write per batch, not per request, and no wake-up. The batch is bounded: when the disk is slower than the traffic, lines that do not
/// fit are dropped and counted in `cxgate_access_log_dropped_total`. No line allocates once
/// the buffers have grown to their working size.
///
/// A file is opened for appending and reopened on [`AccessLog::reopen`] (SIGUSR1), so
/// logrotate can rename it and signal, as it does for nginx.
#[derive(Clone)]
pub struct AccessLog {
    shared: Option<Arc<Shared>>,
    _stop: Option<Arc<StopOnDrop>>,
}

struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.lock().stop = true;
        self.0.wake.notify_one();
    }
}

/// One request's line, as the proxy knows it at the end.
pub struct Line<'a> {
    pub request_id: &'a [u8],
    pub client: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub status: u16,
    pub cache: &'a str,
    pub duration: Duration,
    pub upstream: Option<Duration>,
    pub budget_wait: Option<Duration>,
}

thread_local! {
    /// Each thread formats into its own buffer, reused for every line it logs.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
}

impl AccessLog {
    /// Writes nothing; the dropped counter is still registered so it is always scraped.
    pub fn off(registry: &Registry) -> Result<AccessLog, prometheus::Error> {
        dropped_counter(registry)?;
        Ok(AccessLog {
            shared: None,
            _stop: None,
        })
    }

    /// The log `target` names. A file that cannot be opened is an error: the operator
    /// asked for the lines, so starting without them would lose them in silence.
    pub fn open(target: &Target, json: bool, registry: &Registry) -> io::Result<AccessLog> {
        let sink: Box<dyn Sink> = match target {
            Target::Off => return AccessLog::off(registry).map_err(io::Error::other),
            Target::Stderr => Box::new(StderrSink),
            Target::File(path) => Box::new(FileSink {
                path: path.clone(),
                file: open_append(path)?,
            }),
        };
        AccessLog::with_sink(sink, DEFAULT_PENDING, json, registry)
    }

    /// A log writing to `sink`, dropping lines once `limit` bytes wait for it.
    pub fn with_sink(
        sink: Box<dyn Sink>,
        limit: usize,
        json: bool,
        registry: &Registry,
    ) -> io::Result<AccessLog> {
        let dropped = dropped_counter(registry).map_err(io::Error::other)?;
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                batch: Vec::with_capacity(limit.min(DEFAULT_PENDING)),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            idle: Condvar::new(),
            limit,
            json,
            dropped,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("cxgate-access".into())
            .spawn(move || write_loop(&writer, sink))?;
        Ok(AccessLog {
            _stop: Some(Arc::new(StopOnDrop(shared.clone()))),
            shared: Some(shared),
        })
    }

    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// Queues one line; drops and counts it when the writer is too far behind.
    pub fn log(&self, line: &Line<'_>) {
        let Some(shared) = &self.shared else {
            return;
        };
        SCRATCH.with(|scratch| {
            let Ok(mut buf) = scratch.try_borrow_mut() else {
                return;
            };
            buf.clear();
            format_line(&mut buf, line, SystemTime::now(), shared.json);
            let mut pending = shared.lock();
            if pending.batch.len() + buf.len() > shared.limit {
                drop(pending);
                shared.dropped.inc();
                return;
            }
            pending.batch.extend_from_slice(&buf);
            // Only a line that finds the writer waiting wakes it; the lines after it, and
            // those that come while it writes, ride along in the next batch.
            let wake = std::mem::take(&mut pending.waiting);
            drop(pending);
            if wake {
                shared.wake.notify_one();
            }
        });
    }

    /// Asks the writer to reopen the file before its next write (SIGUSR1).
    pub fn reopen(&self) {
        if let Some(shared) = &self.shared {
            shared.lock().reopen = true;
            shared.wake.notify_one();
        }
    }

    /// Waits until every line queued so far is written, at most `limit`.
    pub fn flush(&self, limit: Duration) {
        let Some(shared) = &self.shared else {
            return;
        };
        let deadline = std::time::Instant::now() + limit;
        let mut pending = shared.lock();
        while !pending.batch.is_empty() || pending.writing {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            pending.flushing += 1;
            // The writer may be lingering after a batch: the flush should not wait that out.
            shared.wake.notify_one();
            pending = match shared.idle.wait_timeout(pending, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
            pending.flushing -= 1;
        }
    }
}

fn dropped_counter(registry: &Registry) -> Result<IntCounter, prometheus::Error> {
    let counter = IntCounter::new(
        "cxgate_access_log_dropped_total",
        "Access log lines dropped because the log's writer was too far behind.",
    )?;
    match registry.register(Box::new(counter.clone())) {
        Ok(()) => Ok(counter),
        // A second log on one registry (a test, a restart in process) counts on the same.
        Err(prometheus::Error::AlreadyReg) => Ok(counter),
        Err(e) => Err(e),
    }
}

fn write_loop(shared: &Shared, mut sink: Box<dyn Sink>) {
    let mut spare: Vec<u8> = Vec::with_capacity(shared.limit.min(DEFAULT_PENDING));
    let mut reported = false;
    loop {
        let mut pending = shared.lock();
        while pending.batch.is_empty() && !pending.reopen && !pending.stop {
            if pending.flushing > 0 {
                shared.idle.notify_all();
            }
            pending.waiting = true;
            pending = shared.wake.wait(pending).unwrap_or_else(|e| e.into_inner());
            pending.waiting = false;
        }
        let reopen = std::mem::take(&mut pending.reopen);
        let stop = pending.stop;
        spare.clear();
        std::mem::swap(&mut pending.batch, &mut spare);
        pending.writing = true;
        drop(pending);

        if reopen {
            if let Err(e) = sink.reopen() {
                tracing::error!(error = %e, "access log: cannot reopen the file; writing on to the old one");
            }
        }
        if !spare.is_empty() {
            match sink.write_batch(&spare) {
                Ok(()) => reported = false,
                // Said once per run of failures, not once per batch.
                Err(e) if !reported => {
                    reported = true;
                    tracing::error!(error = %e, "access log: write failed; lines are lost until it works again");
                }
                Err(_) => {}
            }
        }
        let mut pending = shared.lock();
        pending.writing = false;
        if pending.batch.is_empty() && pending.flushing > 0 {
            shared.idle.notify_all();
        }
        if stop && pending.batch.is_empty() {
            return;
        }
        if spare.is_empty() {
            continue;
        }
        // Lines logged meanwhile find `waiting` unset and wake no one: they ride in the
        // next batch, taken when the linger ends.
        let until = std::time::Instant::now() + LINGER;
        loop {
            if pending.stop || pending.reopen || pending.flushing > 0 {
                break;
            }
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            pending = match shared.wake.wait_timeout(pending, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// Appends one line, newline included: `timestamp  INFO cxgate::access: request key=value...`
/// for people, or one JSON object with the same fields.
///
/// Each field's separator and name are one literal, values are copied in runs between the
/// bytes that need escaping, and the timestamp's date and time to the second are formatted
/// once per second per thread: a line costs a few hundred instructions.
pub fn format_line(out: &mut Vec<u8>, line: &Line<'_>, now: SystemTime, json: bool) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    // (human, JSON) spellings of each field's lead-in.
    let field = |out: &mut Vec<u8>, (human, js): (&[u8], &[u8])| {
        out.extend_from_slice(if json { js } else { human });
    };
    let text = |out: &mut Vec<u8>, name: (&[u8], &[u8]), value: &[u8]| {
        field(out, name);
        if json {
            json_string(out, value);
        } else {
            human_value(out, value);
        }
    };
    if json {
        out.extend_from_slice(b"{\"timestamp\":\"");
        timestamp(out, since);
        out.extend_from_slice(
            b"\",\"level\":\"INFO\",\"target\":\"cxgate::access\",\"message\":\"request\"",
        );
    } else {
        timestamp(out, since);
        out.extend_from_slice(b"  INFO cxgate::access: request");
    }
    text(out, (b" request_id=", b",\"request_id\":"), line.request_id);
    text(out, (b" client=", b",\"client\":"), line.client.as_bytes());
    text(out, (b" route=", b",\"route\":"), line.route.as_bytes());
    text(out, (b" method=", b",\"method\":"), line.method.as_bytes());
    field(out, (b" status=", b",\"status\":"));
    out.extend_from_slice(itoa::Buffer::new().format(line.status).as_bytes());
    text(out, (b" cache=", b",\"cache\":"), line.cache.as_bytes());
    field(out, (b" duration_ms=", b",\"duration_ms\":"));
    millis(out, line.duration);
    if let Some(d) = line.upstream {
        field(out, (b" upstream_ms=", b",\"upstream_ms\":"));
        millis(out, d);
    }
    if let Some(d) = line.budget_wait {
        field(out, (b" budget_wait_ms=", b",\"budget_wait_ms\":"));
        millis(out, d);
    }
    out.extend_from_slice(if json { b"}\n" } else { b"\n" });
}

/// Milliseconds to the hundredth, the precision a person reads: `0.91`, `12.05`, `1500.00`.
fn millis(out: &mut Vec<u8>, d: Duration) {
    let hundredths = (d.as_nanos() + 5_000) / 10_000;
    let whole = (hundredths / 100) as u64;
    let frac = (hundredths % 100) as u8;
    out.extend_from_slice(itoa::Buffer::new().format(whole).as_bytes());
    out.extend_from_slice(&[b'.', b'0' + frac / 10, b'0' + frac % 10]);
}

thread_local! {
    /// The last second [`timestamp`] formatted on this thread, and its text up to the dot:
    /// `2026-12-02T01:36:54.`.
    static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
}

/// RFC 3339 in UTC to the microsecond, as the other log lines print it.
fn timestamp(out: &mut Vec<u8>, since_epoch: Duration) {
    let secs = since_epoch.as_secs();
    let (last, mut head) = SECOND.get();
    if last != secs {
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        let mut at = 0;
        for (n, width, after) in [
            (year as u64, 4, b'-'),
            (month, 2, b'-'),
            (day, 2, b'T'),
            (rem / 3600, 2, b':'),
            (rem % 3600 / 60, 2, b':'),
            (rem % 60, 2, b'.'),
        ] {
            digits(&mut head[at..at + width], n);
            head[at + width] = after;
            at += width + 1;
        }
        SECOND.set((secs, head));
    }
    let mut micros = [b'Z'; 7];
    digits(&mut micros[..6], u64::from(since_epoch.subsec_micros()));
    out.extend_from_slice(&head);
    out.extend_from_slice(&micros);
}

/// `n` in decimal, zero-padded to fill `slot` (its lowest digits if it is longer).
fn digits(slot: &mut [u8], mut n: u64) {
    for d in slot.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A byte that leaves a human value unquoted.
const WORD: u8 = 1;
/// A byte copied as it is inside quotes or a JSON string.
const PASS: u8 = 2;

/// [`WORD`] and [`PASS`] for every byte: one load per byte of a value. Bytes past ASCII pass
/// (values are UTF-8), control bytes, `"` and `\\` do not, and `=` and space need quotes.
static CLASS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        if (matches!(b, b' '..=b'~') || b >= 0x80) && b != b'"' && b != b'\\' {
            table[i] = PASS;
            if b.is_ascii_graphic() && b != b'=' {
                table[i] |= WORD;
            }
        }
        i += 1;
    }
    table
};

/// A value as is when it reads as one word, else quoted with `"` and `\\` escaped.
fn human_value(out: &mut Vec<u8>, value: &[u8]) {
    let word = value
        .iter()
        .position(|&b| CLASS[usize::from(b)] & WORD == 0);
    match word {
        None if !value.is_empty() => out.extend_from_slice(value),
        // Up to the first byte that needs quotes, the value is all word bytes, which pass.
        _ => {
            let (head, rest) = value.split_at(word.unwrap_or(0));
            out.push(b'"');
            out.extend_from_slice(head);
            escaped(out, rest, b"\\x");
            out.push(b'"');
        }
    }
}

fn json_string(out: &mut Vec<u8>, value: &[u8]) {
    out.push(b'"');
    escaped(out, value, b"\\u00");
    out.push(b'"');
}

/// `value` with `"` and `\\` backslashed and control bytes written as `prefix` and two hex
/// digits; the runs between them are copied whole.
fn escaped(out: &mut Vec<u8>, value: &[u8], prefix: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    for (i, &b) in value.iter().enumerate() {
        if CLASS[usize::from(b)] & PASS != 0 {
            continue;
        }
        out.extend_from_slice(&value[run..i]);
        if b == b'"' || b == b'\\' {
            out.extend_from_slice(&[b'\\', b]);
        } else {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        run = i + 1;
    }
    out.extend_from_slice(&value[run..]);
}

#[cfg(test)]
#[path = "access_tests.rs"]
mod tests;
