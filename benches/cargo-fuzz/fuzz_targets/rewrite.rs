//! Link rewriting: the held token never survives, and valid JSON stays valid JSON.
#![no_main]

use bytes::Bytes;
use cxgate::upstream::rewrite::Rewriter;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "zQ9tokSECRET7x1Kp";

fuzz_target!(|data: &[u8]| {
    let rewriter = Rewriter::new("https://api.engagor.com", "http://127.0.0.1:8080");
    let body = Bytes::copy_from_slice(data);
    // None means nothing needed changing: the body goes out as it came.
    let out = rewriter.rewrite_body(&body, &[SECRET]).unwrap_or(body);
    assert!(
        !out.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
        "the secret survived the rewrite"
    );
    if serde_json::from_slice::<serde_json::Value>(data).is_ok() {
        serde_json::from_slice::<serde_json::Value>(&out).expect("valid JSON in, valid JSON out");
    }
});
