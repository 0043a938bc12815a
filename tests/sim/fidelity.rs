//! What the public clients rely on beyond the first endpoint table: a contact by its own
//! id, contact `updates` shaped like a contact, messages added in bulk, lists after deletes,
//! and the topics' monitored profiles and search keywords in `/me/accounts`.

use super::support::*;
use cxgate::sim::SimOptions;
use http::{Method, StatusCode};
use serde_json::{json, Value};

fn ids(list: &Value) -> Vec<String> {
    let data = list["response"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    data.iter()
        .map(|m| m["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_contact_by_its_own_id_is_the_listed_one() {
    let peer = start(SimOptions::default()).await;
    let listed = peer.get("/12345/inbox/contacts?limit=3").await.json();
    let first = listed["response"]["data"][0].clone();
    let id = first["id"].as_str().unwrap_or_default().to_owned();
    assert!(
        !id.is_empty(),
        "expected a contact id in the list, saw {listed}"
    );
    let by_id = peer.get(&format!("/12345/inbox/contact/{id}")).await;
    assert_eq!(by_id.status, StatusCode::OK, "saw {}", by_id.json());
    assert_eq!(
        by_id.json()["response"],
        first,
        "expected the contact listed as {id} back by that id"
    );
    let service = first["service"].as_str().unwrap_or_default();
    let sid = first["service_id"].as_str().unwrap_or_default();
    let by_profile = peer
        .get(&format!("/12345/inbox/contact/{service}/{sid}"))
        .await
        .json();
    assert_eq!(
        by_profile["response"], first,
        "expected the service-keyed lookup to give the same contact"
    );
}

#[tokio::test]
async fn contact_updates_are_shaped_like_a_contact() {
    let peer = start(SimOptions::default()).await;
    let updates = json!({
        "crm": {"email": "crm@example.com"},
        "custom_attributes": {"tier": "platinum"},
    })
    .to_string();
    let body = form(&[("updates", &updates)]);
    for path in [
        "/12345/inbox/contact/twitter_5",
        "/12345/inbox/contact/twitter/6",
    ] {
        let wrote = peer
            .send(Method::POST, path, Some("sim-token"), Some(&body))
            .await;
        assert_eq!(wrote.status, StatusCode::OK, "saw {}", wrote.json());
        let read = peer.get(path).await.json();
        let contact = &read["response"];
        assert_eq!(
            (
                &contact["crm"]["email"],
                &contact["custom_attributes"]["tier"]
            ),
            (&json!("crm@example.com"), &json!("platinum")),
            "expected {path} to take the sections' fields, saw {read}"
        );
        assert!(
            contact["crm"].get("crm").is_none()
                && contact["crm"].get("custom_attributes").is_none(),
            "expected no section nested in crm at {path}, saw {read}"
        );
        assert!(
            contact["crm"]["phone"].is_string(),
            "expected the other CRM fields kept at {path}, saw {read}"
        );
    }
}

#[tokio::test]
async fn messages_added_in_bulk_appear_in_the_lists() {
    let peer = start(SimOptions::default()).await;
    let mentions = json!([
        {"message": "first added", "topic_id": 123452},
        {"message": "second added", "topic_id": "123452"},
    ])
    .to_string();
    let added = peer
        .send(
            Method::POST,
            "/12345/inbox/add",
            Some("sim-token"),
            Some(&form(&[("mentions", &mentions)])),
        )
        .await;
    assert_eq!(
        added.json()["response"],
        json!(true),
        "saw {}",
        added.json()
    );
    let listed = peer
        .get("/12345/inbox/mentions?topic_ids=123452&limit=5")
        .await
        .json();
    let data = listed["response"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let contents: Vec<&Value> = data.iter().map(|m| &m["message"]["content"]).collect();
    assert_eq!(
        contents.get(..2),
        Some(&[&json!("second added"), &json!("first added")][..]),
        "expected the added messages first (newest first), saw {listed}"
    );
    let total = listed["response"]["count"].as_u64().unwrap_or_default();
    let before = peer
        .get("/23456/inbox/mentions?topic_ids=234562&limit=5")
        .await
        .json();
    assert_eq!(
        total,
        before["response"]["count"].as_u64().unwrap_or_default() + 2,
        "expected the count to include the two added messages"
    );
    let id = data[0]["id"].as_str().unwrap_or_default();
    let one = peer.get(&format!("/12345/inbox/mention/123452/{id}")).await;
    assert_eq!(
        one.json()["response"]["message"]["content"],
        "second added",
        "expected the listed id to read back, saw {}",
        one.json()
    );
    let oldest_first = peer
        .get("/12345/inbox/mentions?topic_ids=123452&sort=date:asc&limit=100&page_token=pt100")
        .await
        .json();
    assert!(
        ids(&oldest_first).contains(&id.to_owned()),
        "expected the added messages at the end of an ascending list, saw {oldest_first}"
    );
}

#[tokio::test]
async fn pages_stay_full_after_deletes() {
    let peer = start(SimOptions::default()).await;
    let first = ids(&peer.get("/12345/inbox/mentions?limit=10").await.json());
    let second = ids(&peer
        .get("/12345/inbox/mentions?limit=10&page_token=pt10")
        .await
        .json());
    assert_eq!((first.len(), second.len()), (10, 10));
    let victim = &first[3];
    let topic = peer.get("/12345/inbox/mentions?limit=10").await.json()["response"]["data"][3]
        ["topic"]["id"]
        .as_u64()
        .unwrap_or_default();
    let deleted = peer
        .send(
            Method::DELETE,
            &format!("/12345/inbox/mention/{topic}/{victim}"),
            Some("sim-token"),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::OK, "saw {}", deleted.json());
    let after = peer.get("/12345/inbox/mentions?limit=10").await.json();
    let mut want: Vec<String> = first.iter().filter(|id| *id != victim).cloned().collect();
    want.push(second[0].clone());
    assert_eq!(
        ids(&after),
        want,
        "expected a full first page without {victim}"
    );
    let next = ids(&peer
        .get("/12345/inbox/mentions?limit=10&page_token=pt10")
        .await
        .json());
    assert_eq!(
        next,
        second[1..]
            .iter()
            .chain(std::iter::once(&next[9]))
            .cloned()
            .collect::<Vec<_>>(),
        "expected the second page to follow on without a gap"
    );
    assert_eq!(
        after["response"]["count"], 499,
        "expected the count one less, saw {after}"
    );
}

#[tokio::test]
async fn topics_carry_monitored_profiles_and_search_keywords() {
    let peer = start(SimOptions::default()).await;
    let one = peer.get("/me/accounts").await.json();
    let again = peer.get("/me/accounts").await.json();
    assert_eq!(one, again, "expected stable accounts");
    let accounts = one["response"]["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!accounts.is_empty(), "saw {one}");
    for account in &accounts {
        for project in account["projects"].as_array().into_iter().flatten() {
            for topic in project["topics"].as_array().into_iter().flatten() {
                let profiles = topic["monitoredprofiles"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                assert!(
                    !profiles.is_empty(),
                    "expected monitored profiles in {topic}"
                );
                for p in &profiles {
                    for field in ["type", "username", "displayname"] {
                        assert!(p[field].is_string(), "expected {field} in {p}");
                    }
                }
                assert!(
                    topic["searchkeywords"]
                        .as_array()
                        .is_some_and(|k| !k.is_empty()),
                    "expected search keywords in {topic}"
                );
            }
        }
    }
}

#[tokio::test]
async fn permissions_include_identify() {
    let peer = start(SimOptions::default()).await;
    let listed = peer.get("/me/permissions").await.json();
    let scopes = listed["response"].as_array().cloned().unwrap_or_default();
    assert!(
        scopes.contains(&json!("identify")),
        "expected the identify scope the clients ask for, saw {listed}"
    );
}
