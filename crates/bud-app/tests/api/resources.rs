//! Input validation, secrets at rest, and the telemetry every service carries.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both_backends;
use crate::support::{Backend, TestApp};

async fn bad_input_gets_an_error_naming_what_to_change(app: &TestApp) {
    let t = &app.admin_token;
    let r = app.post("/models", t, json!({"name": "llama", "source_uri": "ftp://x/y"})).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        (r.code(), r.body["error"]["field"].as_str()),
        ("validation_failed", Some("source_uri"))
    );

    let r = app
        .post(
            "/models",
            t,
            json!({"name": "llama", "source_uri": "hf://a/b", "engine": "tensorflow"}),
        )
        .await;
    assert_eq!(r.body["error"]["field"], "engine");
    assert!(r.body["error"]["message"].as_str().unwrap().contains("vllm"), "lists accepted values");

    let r = app.post("/models", t, json!({"name": "llama", "source": "hf://a/b"})).await;
    assert_eq!((r.status, r.code()), (StatusCode::BAD_REQUEST, "invalid_request"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("source"), "{:?}", r.body);

    let raw = app
        .http
        .post(format!("{}/projects", app.url))
        .bearer_auth(t)
        .header("content-type", "application/json")
        .body("{\"name\":")
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_request");

    let r = app.post("/users", t, json!({"email": "x@example.com", "name": "x", "role": "superuser", "password": "long enough password"})).await;
    assert_eq!(r.body["error"]["field"], "role");
    let r = app
        .post(
            "/users",
            t,
            json!({"email": "x@example.com", "name": "x", "role": "tester", "password": "short"}),
        )
        .await;
    assert_eq!(r.body["error"]["field"], "password");

    let r = app.get("/projects/not-a-uuid", t).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = app.get(&format!("/projects/{}", uuid::Uuid::now_v7()), t).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));

    app.project("dup").await;
    let r = app.post("/projects", t, json!({"name": "dup"})).await;
    assert_eq!((r.status, r.code()), (StatusCode::CONFLICT, "conflict"));

    let r = app
        .post(
            "/permissions",
            t,
            json!({"user_id": uuid::Uuid::now_v7(), "permission": "endpoint:view"}),
        )
        .await;
    assert_eq!(r.body["error"]["field"], "project_id", "{:?}", r.body);
}
both_backends!(bad_input_gets_an_error_naming_what_to_change);

async fn provider_urls_are_guarded_and_keys_sealed(app: &TestApp) {
    let t = &app.admin_token;
    for url in [
        "http://127.0.0.1:8000/v1",
        "http://169.254.169.254/latest",
        "http://10.0.0.5/v1",
        "http://localhost/v1",
    ] {
        let r = app.post("/providers", t, json!({"name": "x", "base_url": url})).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{url}: {:?}", r.body);
        assert_eq!(r.body["error"]["field"], "base_url");
    }
    let secret = "sk-live-very-secret-provider-key";
    let r = app
        .post(
            "/providers",
            t,
            json!({"name": "openai", "base_url": "https://8.8.8.8/v1/", "api_key": secret}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["api_key_set"], true);
    assert_eq!(r.body["base_url"], "https://8.8.8.8/v1");
    assert!(!r.body.to_string().contains(secret));
    let id = r.body["id"].as_str().unwrap();
    let stored = app
        .state
        .store
        .provider(bud_domain::ProviderId::parse("id", id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(!stored.api_key_ciphertext.contains(secret), "stored encrypted");
    let opened = app
        .state
        .keyring
        .decrypt(&stored.api_key_ciphertext, format!("provider:{id}").as_bytes())
        .unwrap();
    assert_eq!(opened, secret.as_bytes());
}
both_backends!(provider_urls_are_guarded_and_keys_sealed);

#[tokio::test]
async fn request_ids_metrics_health_and_openapi() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let r = app
        .http
        .get(format!("{}/healthz", app.url))
        .header("x-request-id", "trace-me-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "trace-me-42");
    let r = app.get("/projects/00000000-0000-0000-0000-000000000000", &app.admin_token).await;
    let generated = r.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(
        r.body["error"]["request_id"],
        generated.as_str(),
        "error bodies carry the request id"
    );

    let ready = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!((ready.status, ready.body["status"].as_str()), (StatusCode::OK, Some("ready")));

    let metrics = app.call(Method::GET, "/metrics", None, None).await;
    let text = metrics.body.as_str().unwrap();
    assert!(text.contains("http_requests_total{service=\"budapp\",route=\"/projects/{id}\",method=\"GET\",status=\"404\"}"), "{text}");
    assert!(text.contains("http_request_duration_seconds_bucket"), "{text}");

    let doc = app.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(doc.status, StatusCode::OK);
    assert!(doc.body["openapi"].as_str().unwrap().starts_with("3."));
    assert!(doc.body["paths"]["/projects/{id}"]["get"].is_object());
    app.stop().await;
}

/// The OpenAPI document is a contract: a change to it shows up as a snapshot diff to review.
#[test]
fn openapi_document_snapshot() {
    insta::assert_json_snapshot!("openapi", bud_app::api::openapi());
}
