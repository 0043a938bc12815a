//! Answers as a test reads them: a whole answer from the gateway's client, and a raw TCP
//! exchange for requests no HTTP client would send (bad framing, odd targets), read back
//! byte for byte.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

/// A whole answer.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected JSON, saw {:?}: {e}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// What came back over a raw TCP exchange.
#[derive(Debug)]
pub struct RawAnswer {
    pub bytes: Vec<u8>,
    /// The peer neither answered in full nor closed within the deadline.
    pub timed_out: bool,
}

impl RawAnswer {
    fn head_end(&self) -> Option<usize> {
        self.bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 4)
    }

    /// The status code of the first response, if one came.
    pub fn status(&self) -> Option<u16> {
        let text = String::from_utf8_lossy(&self.bytes);
        let line = text.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }

    /// A response header (first match, case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let end = self.head_end()?;
        let head = String::from_utf8_lossy(&self.bytes[..end]).into_owned();
        head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The body of the first response (by Content-Length when given).
    pub fn body(&self) -> Vec<u8> {
        let Some(end) = self.head_end() else {
            return Vec::new();
        };
        let rest = &self.bytes[end..];
        match self
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            Some(len) => rest[..len.min(rest.len())].to_vec(),
            None => rest.to_vec(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        let body = self.body();
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body, saw {:?}: {e}",
                String::from_utf8_lossy(&self.bytes)
            )
        })
    }
}

/// Writes `request` as is to `addr` (no client normalises it) and reads until the peer
/// has sent one whole response or closed, or 5 s pass.
pub async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    // The peer may answer and close before reading everything; that is its right.
    let _ = stream.write_all(request).await;
    let mut answer = RawAnswer {
        bytes: Vec::new(),
        timed_out: false,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = answer.head_end() {
            let len = answer
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok());
            if len.is_some_and(|len| answer.bytes.len() >= end + len) {
                return answer;
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                answer.timed_out = true;
                return answer;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return answer,
            Ok(Ok(n)) => answer.bytes.extend_from_slice(&buf[..n]),
        }
    }
}
