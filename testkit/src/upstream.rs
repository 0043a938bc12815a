//! A test upstream: one hyper server on 127.0.0.1:0 that records every request it receives
//! (method, target, headers, body) and answers it with a fixed [`Reply`] or with what a
//! script makes of the request. Tests read "what reached the API" from its log instead of
//! trusting what the gateway says it sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinHandle;

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the upstream answers: status, headers, body, and a delay before it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
}

impl Reply {
    /// 200 with `body` as `application/json`.
    pub fn json(body: &str) -> Reply {
        Reply {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.as_bytes().to_vec(),
            delay: Duration::ZERO,
        }
    }

    /// The API's small success answer, `{"meta":{"code":200},"response":{"id":7}}`.
    pub fn ok() -> Reply {
        Reply::json(OK_BODY)
    }

    /// This reply with one more header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// This reply with `status` instead.
    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }
}

/// The body of [`Reply::ok`].
pub const OK_BODY: &str = r#"{"meta":{"code":200},"response":{"id":7}}"#;

/// How a scripted upstream answers a request.
pub type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;
/// Every request the upstream has received, in order.
pub type Log = Arc<Mutex<Vec<Seen>>>;

/// The requests logged since the last call, leaving the log empty.
pub fn taken(log: &Log) -> Vec<Seen> {
    std::mem::take(&mut *log.lock().expect("upstream log"))
}

/// An upstream answering every request with `reply`: its base URL, its log and its task
/// (abort it when done).
pub async fn static_upstream(reply: Reply) -> (String, Log, JoinHandle<()>) {
    scripted_upstream(Arc::new(move |_| reply.clone())).await
}

/// An upstream answering each request with what `script` makes of it.
pub async fn scripted_upstream(script: Script) -> (String, Log, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the test upstream");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    let seen: Log = Arc::default();
    let log = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (log, script) = (log.clone(), script.clone());
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (log, script) = (log.clone(), script.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let got = Seen {
                        method: parts.method.to_string(),
                        target: parts.uri.to_string(),
                        headers: parts.headers,
                        body,
                    };
                    let reply = script(&got);
                    log.lock().expect("upstream log").push(got);
                    if !reply.delay.is_zero() {
                        tokio::time::sleep(reply.delay).await;
                    }
                    let mut resp = hyper::Response::builder().status(reply.status);
                    for (k, v) in &reply.headers {
                        resp = resp.header(k, v);
                    }
                    let resp = resp
                        .body(Full::new(Bytes::from(reply.body)))
                        .expect("test upstream response");
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (base, seen, task)
}

/// An upstream that records every request and answers 200 with a small JSON body and
/// hop-by-hop headers of its own (`Connection: x-bar`, `x-bar`, `Keep-Alive`) next to an
/// end-to-end one.
pub async fn recording_upstream() -> (String, Log, JoinHandle<()>) {
    static_upstream(
        Reply::ok()
            .header("connection", "x-bar")
            .header("x-bar", "upstream-hop")
            .header("keep-alive", "timeout=5")
            .header("x-end-to-end", "kept"),
    )
    .await
}
