//! The test peer: a simulator on 127.0.0.1:0 and an HTTP/1.1 client that talks to it.

use std::time::Duration;

use bytes::Bytes;
use cxgate::sim::{self, SimHandle, SimOptions};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub struct Peer {
    pub sim: SimHandle,
    pub http: Client<HttpConnector, Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub bytes: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes).unwrap_or(Value::Null)
    }
    pub fn header(&self, name: &str) -> String {
        let value = self.headers.get(name).and_then(|v| v.to_str().ok());
        value.unwrap_or("").to_owned()
    }
}

pub async fn start(opts: SimOptions) -> Peer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let sim = sim::spawn(listener, opts)
        .await
        .expect("spawn the simulator");
    let http = Client::builder(TokioExecutor::new()).build_http();
    Peer { sim, http }
}

impl Peer {
    /// `target` is a path (joined to the base) or an absolute URL.
    pub async fn try_send(
        &self,
        method: Method,
        target: &str,
        token: Option<&str>,
        form: Option<&str>,
    ) -> Result<Answer, String> {
        let uri = if target.starts_with("http") {
            target.to_owned()
        } else {
            format!("{}{target}", self.sim.base_url())
        };
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if form.is_some() {
            req = req.header("content-type", "application/x-www-form-urlencoded");
        }
        let body = Full::new(Bytes::from(form.unwrap_or("").to_owned()));
        let req = req.body(body).map_err(|e| e.to_string())?;
        let resp = self.http.request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            bytes,
        })
    }

    pub async fn send(
        &self,
        method: Method,
        target: &str,
        token: Option<&str>,
        form: Option<&str>,
    ) -> Answer {
        match self.try_send(method, target, token, form).await {
            Ok(answer) => answer,
            Err(e) => panic!("expected an answer to {target}, saw error {e}"),
        }
    }

    pub async fn get(&self, target: &str) -> Answer {
        self.send(Method::GET, target, Some("sim-token"), None)
            .await
    }
}

pub fn assert_error(answer: &Answer, status: u16, error_type: &str) {
    let body = answer.json();
    assert_eq!(
        answer.status.as_u16(),
        status,
        "expected HTTP {status}, saw {} {body}",
        answer.status
    );
    assert_eq!(
        body["meta"]["code"], status,
        "expected meta.code {status}, saw {body}"
    );
    assert_eq!(
        body["meta"]["error_type"], error_type,
        "expected {error_type}, saw {body}"
    );
    assert_eq!(
        (&body["error"], &body["error_description"]),
        (&body["meta"]["error_type"], &body["meta"]["error_message"]),
        "expected the top-level error and error_description the API's clients read, saw {body}"
    );
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// Polls the stats until `key` has `want` (the in-flight gauge drops when the server lets go
/// of a body, a moment after the client has read it).
pub async fn eventually(sim: &SimHandle, key: &str, want: u64) {
    for _ in 0..100 {
        if sim.stats()[key] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expected stats.{key} == {want}, saw {}", sim.stats());
}
