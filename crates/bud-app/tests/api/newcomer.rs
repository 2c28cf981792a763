//! The path a newcomer takes: log in, create a project, add a member, create a key, list,
//! revoke; and the audit log that records it.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both_backends;
use crate::support::TestApp;

async fn newcomer_path(app: &TestApp) {
    let admin = &app.admin_token;
    let me = app.get("/me", admin).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["role"], "admin");

    let project = app.project("research").await;
    let (dev_id, dev) = app.user("dev@example.com", "developer").await;
    app.add_member(&project, &dev_id).await;

    let members = app.get(&format!("/projects/{project}/members"), &dev).await;
    assert_eq!(members.status, StatusCode::OK, "{:?}", members.body);
    let emails: Vec<&str> = members.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["email"].as_str().unwrap())
        .collect();
    assert!(
        emails.contains(&"dev@example.com") && emails.contains(&"admin@bud.local"),
        "{emails:?}"
    );

    let created = app
        .post(&format!("/projects/{project}/keys"), &dev, json!({"name": "ci", "rpm_limit": 600}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    let secret = created.body["secret"].as_str().unwrap();
    assert!(secret.starts_with("bud_sk_"), "{secret}");
    assert!(secret.starts_with(created.body["key"]["prefix"].as_str().unwrap()));
    let key_id = created.body["key"]["id"].as_str().unwrap().to_owned();

    let listed = app.get(&format!("/projects/{project}/keys"), &dev).await;
    assert_eq!(listed.status, StatusCode::OK);
    let keys = listed.body["data"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0]["status"], "active");
    assert_eq!(keys[0]["rpm_limit"], 600);
    assert!(!listed.body.to_string().contains(secret), "the secret is shown once only");

    let revoked = app.call(Method::DELETE, &format!("/keys/{key_id}"), Some(&dev), None).await;
    assert_eq!(revoked.status, StatusCode::OK, "{:?}", revoked.body);
    assert_eq!(revoked.body["status"], "revoked");
    let again = app.call(Method::DELETE, &format!("/keys/{key_id}"), Some(&dev), None).await;
    assert_eq!(
        again.body["revoked_at"], revoked.body["revoked_at"],
        "revoking twice keeps the first time"
    );

    // The key's hash is what the store holds: looking it up by the secret's hash finds it.
    let hash = bud_auth::api_key::hash_api_key(secret).unwrap();
    let stored = app.state.store.api_key_by_hash(&hash).await.unwrap().unwrap();
    assert!(stored.revoked_at.is_some());

    let audit = app.get("/audit?limit=200", &app.admin_token).await;
    assert_eq!(audit.status, StatusCode::OK);
    let actions: Vec<&str> = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for expected in [
        "auth.login",
        "project.create",
        "user.create",
        "project.member_add",
        "key.create",
        "key.revoke",
    ] {
        assert!(actions.contains(&expected), "{expected} missing from {actions:?}");
    }
    let filtered =
        app.get(&format!("/audit?action=key.create&project_id={project}"), &app.admin_token).await;
    assert_eq!(filtered.body["data"].as_array().unwrap().len(), 1);
    let verify = app.get("/audit/verify", &app.admin_token).await;
    assert_eq!(verify.body["ok"], true, "{:?}", verify.body);
    assert!(verify.body["records_checked"].as_i64().unwrap() >= 6);
}
both_backends!(newcomer_path);

async fn audit_verify_finds_a_tampered_record(app: &TestApp) {
    app.project("alpha").await;
    app.project("beta").await;
    app.state
        .store
        .execute_raw("UPDATE audit_log SET actor = 'mallory' WHERE action = 'project.create'")
        .await
        .unwrap();
    let verify = app.get("/audit/verify", &app.admin_token).await;
    assert_eq!(verify.body["ok"], false, "{:?}", verify.body);
    assert!(verify.body["first_broken_seq"].as_i64().is_some());
}
both_backends!(audit_verify_finds_a_tampered_record);

async fn pagination_walks_every_item_once(app: &TestApp) {
    for i in 0..7 {
        app.project(&format!("p{i}")).await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/projects?limit=3&cursor={c}"),
            None => "/projects?limit=3".to_owned(),
        };
        let page = app.get(&path, &app.admin_token).await;
        assert_eq!(page.status, StatusCode::OK, "{:?}", page.body);
        for p in page.body["data"].as_array().unwrap() {
            seen.push(p["name"].as_str().unwrap().to_owned());
        }
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("p{i}")).collect::<Vec<_>>());
    let bad = app.get("/projects?limit=0", &app.admin_token).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.body["error"]["field"], "limit");
}
both_backends!(pagination_walks_every_item_once);
