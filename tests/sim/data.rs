//! Envelope, stable data, paging, writes, HTTP/2 and shutdown.

use std::time::{Duration, Instant};

use super::support::*;
use bytes::Bytes;
use cxgate::sim::SimOptions;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

#[tokio::test]
async fn envelope_stable_data_and_routing() {
    let peer = start(SimOptions::default()).await;
    let me = peer.get("/me").await;
    let body = me.json();
    assert_eq!(
        me.status,
        StatusCode::OK,
        "expected 200 for /me, saw {body}"
    );
    assert_eq!(body["meta"]["code"], 200, "expected envelope, saw {body}");
    for field in ["id", "name", "email", "language", "timezone"] {
        assert!(
            !body["response"][field].is_null(),
            "expected /me.{field}, saw {body}"
        );
    }
    assert_eq!(
        peer.get("/me/").await.bytes,
        me.bytes,
        "expected /me/ to equal /me"
    );
    let accounts = peer.get("/me/accounts").await.json();
    let ids: Vec<&Value> = accounts["response"]["data"]
        .as_array()
        .map(|a| a.iter().map(|x| &x["id"]).collect())
        .unwrap_or_default();
    assert_eq!(
        ids,
        [&json!(12345), &json!(23456), &json!(34567)],
        "saw {accounts}"
    );
    let path = "/12345/inbox/mention/123451/12345000042";
    let (a, b) = (peer.get(path).await, peer.get(path).await);
    assert_eq!(
        a.status,
        StatusCode::OK,
        "expected the mention, saw {}",
        a.json()
    );
    assert_eq!(a.bytes, b.bytes, "expected the same mention body twice");
    assert_eq!(a.json()["response"]["unique_id"], "123451_12345000042");
    for kind in ["topics", "users", "tags", "teams"] {
        let list = peer.get(&format!("/12345/settings/{kind}")).await.json();
        assert!(
            list["response"]["count"].as_u64() > Some(0),
            "expected {kind} listed, saw {list}"
        );
    }
    assert_error(&peer.get("/12345/nothing/here").await, 404, "not_found");
    assert_error(
        &peer.get("/abc/inbox/mentions").await,
        400,
        "invalid_request",
    );
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn paging_links_are_absolute_and_carry_the_token() {
    let peer = start(SimOptions::default()).await;
    let first = peer
        .get("/12345/inbox/mentions?limit=50&topic_ids=123452")
        .await
        .json();
    let next = first["response"]["paging"]["next_url"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    let prefix = format!("{}/12345/inbox/mentions?", peer.sim.base_url());
    assert!(
        next.starts_with(&prefix),
        "expected next_url under {prefix}, saw {next}"
    );
    assert!(
        next.contains("access_token=sim-token"),
        "expected the token in {next}"
    );
    assert!(
        first["response"]["paging"]["prev_url"].is_null(),
        "expected no prev on page 1"
    );
    let data = first["response"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(data.len(), 50, "expected 50 mentions");
    assert!(
        data.iter().all(|m| m["topic"]["id"] == 123452),
        "expected topic filter honoured"
    );
    // Following the link as given (token in the query, no header) reaches page 2.
    let second = peer.send(Method::GET, &next, None, None).await.json();
    let (a, b) = (&data[0]["id"], &second["response"]["data"][0]["id"]);
    assert!(
        b.is_string() && a != b,
        "expected page 2 to differ, saw {a} then {b}"
    );
    assert!(
        second["response"]["paging"]["prev_url"].is_string(),
        "expected prev on page 2"
    );
    for limit in ["0", "201", "x"] {
        assert_error(
            &peer
                .get(&format!("/12345/inbox/mentions?limit={limit}"))
                .await,
            400,
            "invalid_request",
        );
    }
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn writes_are_visible_to_later_reads() {
    let peer = start(SimOptions::default()).await;
    let path = "/12345/inbox/mention/123452/12345000499";
    let updates = form(&[(
        "updates",
        r#"{"status":"closed","tags":["vip"],"note":"called back"}"#,
    )]);
    let posted = peer
        .send(Method::POST, path, Some("sim-token"), Some(&updates))
        .await;
    assert_eq!(
        posted.status,
        StatusCode::OK,
        "expected the update accepted, saw {}",
        posted.json()
    );
    let read = peer.get(path).await.json();
    let seen = (
        &read["response"]["status"],
        &read["response"]["tags"],
        &read["response"]["notes"],
    );
    assert_eq!(
        seen,
        (&json!("closed"), &json!(["vip"]), &json!(["called back"])),
        "saw {read}"
    );
    let listed = peer.get("/12345/inbox/mentions?limit=1").await.json();
    assert_eq!(
        listed["response"]["data"][0]["status"], "closed",
        "expected the list to show it, saw {listed}"
    );

    let contact = "/12345/inbox/contact/twitter/42";
    let crm = form(&[("updates", r#"{"email":"new@example.com"}"#)]);
    assert_eq!(
        peer.send(Method::POST, contact, Some("sim-token"), Some(&crm))
            .await
            .status,
        StatusCode::OK
    );
    let read = peer.get(contact).await.json();
    assert_eq!(
        read["response"]["crm"]["email"], "new@example.com",
        "saw {read}"
    );

    let added = peer
        .send(
            Method::POST,
            "/12345/inbox/add",
            Some("sim-token"),
            Some(&form(&[("message", "hello")])),
        )
        .await
        .json();
    let id = added["response"]["id"].as_str().unwrap_or("");
    let read = peer
        .get(&format!("/12345/inbox/mention/123451/{id}"))
        .await
        .json();
    assert_eq!(
        read["response"]["message"]["content"], "hello",
        "expected the added message, saw {read}"
    );
    let draft = peer
        .send(
            Method::POST,
            "/12345/publisher/add/",
            Some("sim-token"),
            Some(&form(&[("message", "hi")])),
        )
        .await
        .json();
    assert_eq!(
        draft["response"]["status"], "awaitingapproval",
        "saw {draft}"
    );
    assert_eq!(peer.sim.stats()["writes"], 4, "saw {}", peer.sim.stats());
    peer.sim.shutdown().await;
}

#[tokio::test]
async fn h2c_insights_latency_and_shutdown() {
    let opts = SimOptions {
        insights_latency: Duration::from_millis(150),
        ..SimOptions::default()
    };
    let peer = start(opts).await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let req = Request::get(format!(
        "{}/12345/insights/mentions/volume?access_token=sim-token",
        peer.sim.base_url()
    ))
    .body(Full::new(Bytes::new()))
    .expect("request");
    let started = Instant::now();
    let resp = h2.request(req).await.expect("an h2c answer");
    assert_eq!(resp.version(), http::Version::HTTP_2, "expected HTTP/2");
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "expected insights to be slow"
    );
    let addr = peer.sim.addr;
    peer.sim.shutdown().await;
    let refused = tokio::net::TcpStream::connect(addr).await;
    assert!(refused.is_err(), "expected no listener after shutdown");
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_prompt_and_lets_requests_finish() {
    let peer = start(SimOptions::default()).await;
    // An idle keep-alive connection must not hold shutdown up.
    assert_eq!(peer.get("/me").await.status, StatusCode::OK);
    let started = tokio::time::Instant::now();
    peer.sim.shutdown().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "expected a prompt shutdown, took {took:?}"
    );
}

/// An account the sim user does not have, or a topic that is not one of the account's, is a
/// 404 in the API's envelope, as the real API answers; the simulator invents no data for it.
#[tokio::test]
async fn unknown_accounts_and_topics_are_404() {
    let peer = start(SimOptions::default()).await;
    for path in [
        "/999/inbox/mentions",
        "/1/inbox/contact/twitter/42",
        "/555/settings/topics",
        "/12346/insights/mentions/volume",
        "/12345/inbox/mention/1/12345000042",
        "/12345/inbox/mention/234561/12345000042",
        "/12345/inbox/mentions?topic_ids=123452,999",
        "/12345/inbox/context/7/12345000042",
    ] {
        let answer = peer.get(path).await;
        assert_error(&answer, 404, "not_found");
    }
    let add = form(&[("message", "hello"), ("topic_id", "5")]);
    let answer = peer
        .send(
            Method::POST,
            "/12345/inbox/add",
            Some("sim-token"),
            Some(&add),
        )
        .await;
    assert_error(&answer, 404, "not_found");
    let many = form(&[(
        "mentions",
        r#"[{"message":"a","topic_id":123451},{"message":"b","topic_id":7}]"#,
    )]);
    let answer = peer
        .send(
            Method::POST,
            "/12345/inbox/add",
            Some("sim-token"),
            Some(&many),
        )
        .await;
    assert_error(&answer, 404, "not_found");
    let listed = peer.get("/12345/inbox/mentions?limit=1").await.json();
    assert_eq!(
        listed["response"]["count"], 500,
        "expected nothing added by a refused batch, saw {listed}"
    );
    for path in [
        "/23456/inbox/mentions?topic_ids=234563",
        "/34567/inbox/mention/345671/34567000001",
    ] {
        let answer = peer.get(path).await;
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "{path}: saw {}",
            answer.json()
        );
    }
}

/// A contact write without `updates`, or with one that is empty or not a JSON object, is
/// a 400 in the envelope: the API requires the parameter.
#[tokio::test]
async fn a_contact_write_needs_updates() {
    let peer = start(SimOptions::default()).await;
    for contact in [
        "/12345/inbox/contact/twitter/42",
        "/12345/inbox/contact/twitter_42",
    ] {
        for body in [
            form(&[("email", "new@example.com")]),
            String::new(),
            form(&[("updates", "")]),
            form(&[("updates", "{}")]),
            form(&[("updates", "[1]")]),
            form(&[("updates", "{not json")]),
        ] {
            let answer = peer
                .send(Method::POST, contact, Some("sim-token"), Some(&body))
                .await;
            assert_error(&answer, 400, "invalid_request");
        }
        let read = peer.get(contact).await.json();
        assert_ne!(
            read["response"]["crm"]["email"], "new@example.com",
            "{contact}: expected no refused write stored, saw {read}"
        );
    }
}
