//! The first end-to-end check: /me through the gateway, miss then hit.
mod common;

#[tokio::test]
async fn me_is_answered_through_the_gateway_then_from_cache() {
    let env = common::start(Default::default(), common::ROUTES).await;
    let first = env.get("/me").await;
    assert_eq!(first.status, 200, "first /me: {:?}", first.body);
    assert_eq!(
        first.header("cache-status"),
        "cxgate; fwd=uri-miss; fwd-status=200; stored"
    );
    assert_eq!(first.json()["response"]["id"], 4242);
    let second = env.get("/me").await;
    assert!(
        second
            .header("cache-status")
            .starts_with("cxgate; hit; ttl="),
        "saw {:?}",
        second.headers
    );
    assert_eq!(second.body, first.body, "hit must serve the same body");
    assert_eq!(
        env.upstream_count("GET /me"),
        1,
        "one upstream call for two reads"
    );
    env.stop().await;
}
