use std::sync::mpsc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::*;

fn line(request_id: &'static str) -> Line<'static> {
    Line {
        request_id: request_id.as_bytes(),
        client: "acme",
        route: "GET /{account_id}/inbox",
        method: "GET",
        status: 200,
        cache: "hit",
        duration: Duration::from_nanos(909_411),
        upstream: Some(Duration::from_micros(12_345)),
        budget_wait: None,
    }
}

fn formatted(l: &Line<'_>, json: bool) -> String {
    let mut out = Vec::new();
    // 2026-12-02T01:36:54.000123Z
    let at = UNIX_EPOCH + Duration::from_secs(1_796_175_414) + Duration::from_micros(123);
    format_line(&mut out, l, at, json);
    String::from_utf8(out).expect("lines are UTF-8")
}

#[test]
fn human_line_has_every_field_rounded() {
    let text = formatted(&line("abc123"), false);
    assert_eq!(
        text,
        "2026-12-02T01:36:54.000123Z  INFO cxgate::access: request request_id=abc123 \
         client=acme route=\"GET /{account_id}/inbox\" method=GET status=200 cache=hit \
         duration_ms=0.91 upstream_ms=12.35\n",
        "saw {text:?}"
    );
}

#[test]
fn json_line_parses_with_the_same_fields() {
    let mut l = line("id\"with\\quote");
    l.budget_wait = Some(Duration::from_millis(1500));
    l.client = "caf\u{e9}\n";
    let text = formatted(&l, true);
    assert!(text.ends_with("}\n"), "one line per request, saw {text:?}");
    let v: serde_json::Value = serde_json::from_str(text.trim_end()).expect("valid JSON");
    assert_eq!(v["timestamp"], "2026-12-02T01:36:54.000123Z", "saw {v}");
    assert_eq!(v["target"], "cxgate::access", "saw {v}");
    assert_eq!(v["request_id"], "id\"with\\quote", "saw {v}");
    assert_eq!(v["client"], "caf\u{e9}\n", "saw {v}");
    assert_eq!(v["route"], "GET /{account_id}/inbox", "saw {v}");
    assert_eq!(v["status"], 200, "saw {v}");
    assert_eq!(v["cache"], "hit", "saw {v}");
    assert_eq!(v["duration_ms"], 0.91, "saw {v}");
    assert_eq!(v["upstream_ms"], 12.35, "saw {v}");
    assert_eq!(v["budget_wait_ms"], 1500.0, "saw {v}");
    assert_eq!(text.matches("1500.00").count(), 1, "saw {text}");
}

#[test]
fn millis_round_to_the_hundredth() {
    for (nanos, want) in [
        (0u64, "0.00"),
        (4_999, "0.00"),
        (5_000, "0.01"),
        (9_094_110, "9.09"),
        (999_999_999, "1000.00"),
        (61_234_567_890, "61234.57"),
    ] {
        let mut out = Vec::new();
        millis(&mut out, Duration::from_nanos(nanos));
        assert_eq!(String::from_utf8(out).unwrap(), want, "for {nanos} ns");
    }
}

#[test]
fn dates_match_the_calendar() {
    for (days, want) in [
        (0, (1970, 1, 1)),
        (11_016, (2000, 2, 29)),
        (20_789, (2026, 12, 2)),
        (-1, (1969, 12, 31)),
    ] {
        assert_eq!(civil_from_days(days), want, "day {days}");
    }
}

/// Hands each batch to the test and blocks until the test lets it go: a disk that stalls.
struct Stalled {
    batches: mpsc::Sender<Vec<u8>>,
    go: mpsc::Receiver<()>,
}

impl Sink for Stalled {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        let _ = self.batches.send(batch.to_vec());
        let _ = self.go.recv();
        Ok(())
    }
}

#[test]
fn a_stalled_writer_drops_and_counts_instead_of_blocking() {
    let registry = Registry::new();
    let (batches_tx, batches) = mpsc::channel();
    let (go, go_rx) = mpsc::channel();
    let one = formatted(&line("0123456789abcdef01234567"), false).len();
    // Room for ten lines while the writer is stuck on its first batch.
    let log = AccessLog::with_sink(
        Box::new(Stalled {
            batches: batches_tx,
            go: go_rx,
        }),
        one * 10,
        false,
        &registry,
    )
    .unwrap();
    log.log(&line("0123456789abcdef01234567"));
    let first = batches
        .recv_timeout(Duration::from_secs(5))
        .expect("the writer takes the first line");
    assert_eq!(first.len(), one, "the first batch is the one line");

    let started = Instant::now();
    for _ in 0..1_000 {
        log.log(&line("0123456789abcdef01234567"));
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "1,000 lines against a stalled disk took {took:?}: requests waited on it"
    );
    let dropped = registry
        .gather()
        .iter()
        .find(|f| f.name() == "cxgate_access_log_dropped_total")
        .map(|f| f.get_metric()[0].get_counter().get_value())
        .expect("the dropped counter is registered");
    assert_eq!(dropped, 990.0, "ten lines fit, the rest are counted");

    go.send(()).unwrap();
    let second = batches
        .recv_timeout(Duration::from_secs(5))
        .expect("the lines that fit are written once the disk moves");
    assert_eq!(second.len(), one * 10, "the ten queued lines in one batch");
    go.send(()).unwrap();
    log.flush(Duration::from_secs(5));
}

#[test]
fn off_writes_nothing_and_still_exposes_the_counter() {
    let registry = Registry::new();
    let log = AccessLog::open(&Target::Off, false, &registry).unwrap();
    assert!(!log.is_on(), "off has no writer");
    log.log(&line("x"));
    log.flush(Duration::from_secs(1));
    assert!(
        SCRATCH.with(|s| s.borrow().is_empty()),
        "off formats nothing"
    );
    assert!(
        registry
            .gather()
            .iter()
            .any(|f| f.name() == "cxgate_access_log_dropped_total"),
        "the counter is scraped even with the log off"
    );
}

#[test]
fn a_renamed_file_is_left_behind_on_reopen() {
    let dir = std::env::temp_dir().join(format!("cxgate-access-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("access.log");
    let rotated = dir.join("access.log.1");
    let _ = std::fs::remove_file(&path);
    let registry = Registry::new();
    let log = AccessLog::open(&Target::File(path.clone()), true, &registry).unwrap();
    log.log(&line("before"));
    log.flush(Duration::from_secs(5));
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen();
    log.log(&line("after"));
    log.flush(Duration::from_secs(5));
    let old = std::fs::read_to_string(&rotated).unwrap();
    let new = std::fs::read_to_string(&path).expect("reopen creates the file again");
    assert!(
        old.contains("\"before\"") && !old.contains("\"after\""),
        "saw {old:?}"
    );
    assert!(
        new.contains("\"after\"") && !new.contains("\"before\""),
        "saw {new:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_byte_is_quoted_and_escaped_as_the_rules_say() {
    for b in 0..=255u8 {
        let value = [b'a', b, b'z'];
        let mut human = Vec::new();
        human_value(&mut human, &value);
        let word = b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'=');
        let inner: Vec<u8> = match b {
            b'"' | b'\\' => vec![b'\\', b],
            b' '..=b'~' | 0x80.. => vec![b],
            _ => format!("\\x{b:02x}").into_bytes(),
        };
        let want = if word {
            value.to_vec()
        } else {
            [&b"\"a"[..], &inner, b"z\""].concat()
        };
        assert_eq!(human, want, "human value of byte {b:#04x}");

        let mut json = Vec::new();
        json_string(&mut json, &value);
        let inner: Vec<u8> = match b {
            b'"' | b'\\' => vec![b'\\', b],
            b' '..=b'~' | 0x80.. => vec![b],
            _ => format!("\\u00{b:02x}").into_bytes(),
        };
        assert_eq!(
            json,
            [&b"\"a"[..], &inner, b"z\""].concat(),
            "JSON of byte {b:#04x}"
        );
    }
    let mut empty = Vec::new();
    human_value(&mut empty, b"");
    assert_eq!(empty, b"\"\"", "an empty value is quoted");
}

#[test]
fn the_second_is_formatted_anew_when_it_changes() {
    let at = UNIX_EPOCH + Duration::from_secs(1_796_175_414);
    let mut out = Vec::new();
    for (step, want) in [
        (
            Duration::from_micros(999_999),
            "2026-12-02T01:36:54.999999Z",
        ),
        (
            Duration::from_micros(1_000_000),
            "2026-12-02T01:36:55.000000Z",
        ),
        (Duration::from_secs(86_400), "2026-12-03T01:36:54.000000Z"),
    ] {
        out.clear();
        timestamp(&mut out, (at + step).duration_since(UNIX_EPOCH).unwrap());
        assert_eq!(String::from_utf8_lossy(&out), want);
    }
}

/// Counts the batches and the bytes it is handed: a disk that is never slow.
struct Counting(Arc<Mutex<(usize, usize)>>);

impl Sink for Counting {
    fn write_batch(&mut self, batch: &[u8]) -> io::Result<()> {
        let mut seen = self.0.lock().unwrap();
        seen.0 += 1;
        seen.1 += batch.len();
        Ok(())
    }
}

#[test]
fn steady_traffic_is_written_in_a_few_batches_not_one_per_line() {
    // Lines arriving one at a time, as from a busy gateway: the writer used to take each as
    // it came (a write, and a wake-up of the writer, per line). It lets them gather instead.
    let registry = Registry::new();
    let seen = Arc::new(Mutex::new((0, 0)));
    let log = AccessLog::with_sink(
        Box::new(Counting(seen.clone())),
        DEFAULT_PENDING,
        false,
        &registry,
    )
    .unwrap();
    let one = formatted(&line("0123456789abcdef01234567"), false).len();
    let started = Instant::now();
    let mut lines = 0;
    while started.elapsed() < Duration::from_millis(300) {
        log.log(&line("0123456789abcdef01234567"));
        lines += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
    let took = started.elapsed();
    log.flush(Duration::from_secs(5));
    let (batches, bytes) = *seen.lock().unwrap();
    assert_eq!(
        bytes,
        lines * one,
        "expected every line written, saw {bytes} of {} bytes",
        lines * one
    );
    // One batch per linger over the run, plus the first line's and the flush's.
    let most = (took.as_millis() / LINGER.as_millis()) as usize + 3;
    assert!(
        batches <= most,
        "expected at most {most} batches for {lines} lines over {took:?}, saw {batches}"
    );
}
