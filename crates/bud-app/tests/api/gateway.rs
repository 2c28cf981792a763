//! What budapp keeps for the gateway: routes (validation, project scoping), usage summaries, and
//! the internal configuration route a gateway apart from the control plane polls.

use bud_app::AppConfig;
use bud_domain::{ApiKeyId, EndpointId, EndpointStatus, ProjectId};
use bud_store::{StatusChange, UsageRow};
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::authz::KUBECONFIG;
use crate::both_backends;
use crate::support::{Backend, Reply, TestApp};

/// Creates `body` at `path` as the admin and returns its id.
async fn created(app: &TestApp, path: &str, body: Value) -> String {
    let r = app.post(path, &app.admin_token, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{path}: {:?}", r.body);
    r.body.get("key").map(|k| &k["id"]).unwrap_or(&r.body["id"]).as_str().unwrap().to_owned()
}

/// A model, a cluster, and an endpoint of that model in each of `projects`.
async fn endpoints_in(app: &TestApp, projects: &[&str]) -> Vec<String> {
    let model = created(
        app,
        "/models",
        json!({"name": "llama", "source_uri": "hf://org/llama", "engine": "engine-sim"}),
    )
    .await;
    let cluster = created(app, "/clusters", json!({"name": "gpu", "kubeconfig": KUBECONFIG})).await;
    let mut endpoints = Vec::new();
    for (i, project) in projects.iter().enumerate() {
        let body = json!({"project_id": project, "model_id": model, "cluster_id": cluster, "name": format!("ep{i}")});
        endpoints.push(created(app, "/endpoints", body).await);
    }
    endpoints
}

fn field(r: &Reply) -> &str {
    r.body["error"]["field"].as_str().unwrap_or("")
}

async fn patch(app: &TestApp, path: &str, token: &str, body: Value) -> Reply {
    app.call(Method::PATCH, path, Some(token), Some(body)).await
}

async fn routes_are_validated_and_scoped_to_their_project(app: &TestApp) {
    let t = &app.admin_token;
    let own = app.project("own").await;
    let foreign = app.project("foreign").await;
    let endpoints = endpoints_in(app, &[&own, &foreign]).await;
    let (ep_own, ep_foreign) = (&endpoints[0], &endpoints[1]);
    let provider =
        created(app, "/providers", json!({"name": "openai", "base_url": "https://8.8.8.8/v1"}))
            .await;
    let routes = format!("/projects/{own}/routes");

    let nobody = uuid::Uuid::now_v7();
    for (body, expected) in [
        (json!({"name": "chat", "targets": []}), "targets"),
        (json!({"name": " ", "targets": [{"endpoint_id": ep_own}]}), "name"),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own, "weight": 0}]}),
            "targets[0].weight",
        ),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own, "weight": 1001}]}),
            "targets[0].weight",
        ),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_foreign}]}),
            "targets[0].endpoint_id",
        ),
        (json!({"name": "chat", "targets": [{"endpoint_id": nobody}]}), "targets[0].endpoint_id"),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own, "model": "x"}]}),
            "targets[0].model",
        ),
        (
            json!({"name": "chat", "targets": [{"provider_id": nobody, "model": "gpt"}]}),
            "targets[0].provider_id",
        ),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own}, {"provider_id": provider}]}),
            "targets[1].model",
        ),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own, "provider_id": provider}]}),
            "targets[0]",
        ),
        (json!({"name": "chat", "targets": [{"weight": 3}]}), "targets[0]"),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own}], "fallbacks": [{"provider_id": provider, "model": "gpt", "weight": -1}]}),
            "fallbacks[0].weight",
        ),
        (
            json!({"name": "chat", "targets": [{"endpoint_id": ep_own}], "rpm_limit": 0}),
            "rpm_limit",
        ),
    ] {
        let r = app.post(&routes, t, body.clone()).await;
        assert_eq!(
            (r.status, r.code(), field(&r)),
            (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", expected),
            "{body}: {:?}",
            r.body
        );
    }
    let r = app.post(&routes, t, json!({"name": "chat", "targets": [], "extra": 1})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "unknown fields are refused");

    let body = json!({
        "name": "chat",
        "targets": [{"endpoint_id": ep_own, "weight": 3}, {"provider_id": provider, "model": "gpt-4o"}],
        "fallbacks": [{"provider_id": provider, "model": "gpt-4o-mini"}],
        "rpm_limit": 600,
    });
    let r = app.post(&routes, t, body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let route = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["project_id"], own.as_str());
    assert_eq!(
        r.body["targets"],
        json!([{"endpoint_id": ep_own, "weight": 3}, {"provider_id": provider, "model": "gpt-4o", "weight": 1}])
    );
    assert_eq!(r.body["fallbacks"][0]["model"], "gpt-4o-mini");
    assert_eq!((r.body["rpm_limit"].as_i64(), r.body["tpm_limit"].is_null()), (Some(600), true));
    let again =
        app.post(&routes, t, json!({"name": "chat", "targets": [{"endpoint_id": ep_own}]})).await;
    assert_eq!((again.status, again.code()), (StatusCode::CONFLICT, "conflict"));
    let elsewhere = app
        .post(
            &format!("/projects/{foreign}/routes"),
            t,
            json!({"name": "chat", "targets": [{"endpoint_id": ep_foreign}]}),
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::CREATED, "names are unique per project only");
    let foreign_route = elsewhere.body["id"].as_str().unwrap().to_owned();

    let r = app.get(&format!("/routes/{route}"), t).await;
    assert_eq!((r.status, r.body["name"].as_str()), (StatusCode::OK, Some("chat")));
    let listed = app.get(&routes, t).await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1, "{:?}", listed.body);

    // A patch changes what it names; `null` clears a limit, absence keeps it.
    let path = format!("/routes/{route}");
    let r =
        patch(app, &path, t, json!({"name": "chat-2", "rpm_limit": null, "tpm_limit": 5000})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!((r.body["name"].as_str(), r.body["rpm_limit"].is_null()), (Some("chat-2"), true));
    assert_eq!(r.body["targets"].as_array().unwrap().len(), 2, "untouched");
    let r =
        patch(app, &path, t, json!({"targets": [{"provider_id": provider, "model": "o3"}]})).await;
    assert_eq!(r.body["targets"], json!([{"provider_id": provider, "model": "o3", "weight": 1}]));
    assert_eq!(r.body["tpm_limit"], 5000);
    let r = patch(app, &path, t, json!({"targets": [{"endpoint_id": ep_foreign}]})).await;
    assert_eq!(field(&r), "targets[0].endpoint_id");
    let r = patch(app, &path, t, json!({"targets": []})).await;
    assert_eq!(field(&r), "targets");

    // Members see their project's routes; other projects' routes do not exist for them.
    let (dev_id, dev) = app.user("dev@example.com", "developer").await;
    app.add_member(&own, &dev_id).await;
    let (tester_id, tester) = app.user("tester@example.com", "tester").await;
    app.add_member(&own, &tester_id).await;
    assert_eq!(app.get(&path, &dev).await.status, StatusCode::OK);
    assert_eq!(app.get(&path, &tester).await.status, StatusCode::OK);
    let r = app.get(&format!("/routes/{foreign_route}"), &dev).await;
    assert_eq!((r.status, r.code()), (StatusCode::NOT_FOUND, "not_found"));
    let r = patch(app, &format!("/routes/{foreign_route}"), &dev, json!({"rpm_limit": 1})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app.get(&format!("/projects/{foreign}/routes"), &dev).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = app
        .post(
            &format!("/projects/{foreign}/routes"),
            &dev,
            json!({"name": "x", "targets": [{"endpoint_id": ep_foreign}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = patch(app, &path, &tester, json!({"rpm_limit": 1})).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "testers view routes, they do not change them");
    let r = app.get(&format!("/routes/{}", uuid::Uuid::now_v7()), t).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let r = app.call(Method::DELETE, &path, Some(&dev), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    assert_eq!(app.get(&path, t).await.status, StatusCode::NOT_FOUND);
    let r = app.call(Method::DELETE, &path, Some(&dev), None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let audit = app.get(&format!("/audit?project_id={own}&limit=200"), t).await;
    let actions: Vec<&str> = audit.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["action"].as_str())
        .filter(|a| a.starts_with("route."))
        .collect();
    let count = |a: &str| actions.iter().filter(|x| **x == a).count();
    assert_eq!((count("route.create"), count("route.update"), count("route.delete")), (1, 2, 1));
}
both_backends!(routes_are_validated_and_scoped_to_their_project);

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn usage_is_summarised_per_model_key_and_project(app: &TestApp) {
    let t = &app.admin_token;
    let own = app.project("own").await;
    let foreign = app.project("foreign").await;
    let (p_own, p_foreign) =
        (ProjectId::parse("id", &own).unwrap(), ProjectId::parse("id", &foreign).unwrap());
    let (k1, k2) = (ApiKeyId::new(), ApiKeyId::new());
    let row = |when: &str, project, key, model: &str, status, latency| UsageRow {
        id: uuid::Uuid::new_v4(),
        at: at(when),
        key_id: key,
        project_id: project,
        model: model.to_owned(),
        route: "endpoint:x".to_owned(),
        target: "replica:x/10.0.0.1:8000".to_owned(),
        prompt_tokens: 100,
        completion_tokens: 20,
        latency_ms: latency,
        status,
    };
    let rows = vec![
        row("2025-03-01T10:00:00Z", p_own, k1, "llama", 200, 100),
        row("2025-03-01T11:00:00Z", p_own, k1, "llama", 502, 300),
        row("2025-03-01T12:00:00Z", p_own, k2, "qwen", 200, 50),
        row("2025-03-01T12:30:00Z", p_foreign, k2, "llama", 200, 10),
        row("2025-03-05T00:00:00Z", p_own, k1, "llama", 200, 10),
    ];
    assert_eq!(app.state.store.insert_usage(&rows).await.unwrap(), 5);

    let range = "since=2025-03-01T00:00:00Z&until=2025-03-02T00:00:00Z";
    let r = app.get(&format!("/usage?project_id={own}&{range}"), t).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["group_by"], "model");
    assert_eq!(r.body["since"], "2025-03-01T00:00:00Z");
    assert_eq!(
        r.body["data"],
        json!([
            {"group": "llama", "requests": 2, "errors": 1, "prompt_tokens": 200, "completion_tokens": 40, "total_tokens": 240, "avg_latency_ms": 200.0},
            {"group": "qwen", "requests": 1, "errors": 0, "prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120, "avg_latency_ms": 50.0},
        ])
    );
    let r = app.get(&format!("/usage?project_id={own}&{range}&group_by=key&model=llama"), t).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["data"][0]["group"], k1.to_string());
    let r = app.get(&format!("/usage?{range}&group_by=project"), t).await;
    let groups: Vec<(&str, i64)> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["group"].as_str().unwrap(), g["requests"].as_i64().unwrap()))
        .collect();
    let mut expected = vec![(own.as_str(), 3), (foreign.as_str(), 1)];
    expected.sort();
    assert_eq!(groups, expected, "across projects for admins");
    let r = app.get(&format!("/usage?{range}&key_id={k2}&group_by=project"), t).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 2);
    let r = app.get("/usage", t).await;
    assert_eq!(r.status, StatusCode::OK, "the last 24 hours by default");
    assert_eq!(r.body["data"], json!([]));

    // Project members with key:view see their project; the whole platform is for admins.
    let (tester_id, tester) = app.user("tester@example.com", "tester").await;
    app.add_member(&own, &tester_id).await;
    let r = app.get(&format!("/usage?project_id={own}&{range}"), &tester).await;
    assert_eq!((r.status, r.body["data"].as_array().map(Vec::len)), (StatusCode::OK, Some(2)));
    let r = app.get(&format!("/usage?{range}"), &tester).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("user:manage"));
    let r = app.get(&format!("/usage?project_id={foreign}&{range}"), &tester).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    for (query, expected) in [
        ("since=yesterday", "since"),
        ("until=2025-13-01T00:00:00Z", "until"),
        ("since=2025-03-02T00:00:00Z&until=2025-03-01T00:00:00Z", "until"),
        ("group_by=endpoint", "group_by"),
    ] {
        let r = app.get(&format!("/usage?project_id={own}&{query}"), t).await;
        assert_eq!((r.status, field(&r)), (StatusCode::UNPROCESSABLE_ENTITY, expected), "{query}");
    }
}
both_backends!(usage_is_summarised_per_model_key_and_project);

/// Moves an endpoint to RUNNING with ready replicas at `addresses`, as budcluster would.
async fn run(app: &TestApp, endpoint: &str, addresses: &[&str]) {
    let store = &app.state.store;
    let id = EndpointId::parse("id", endpoint).unwrap();
    for (from, to) in [
        (EndpointStatus::Pending, EndpointStatus::Deploying),
        (EndpointStatus::Deploying, EndpointStatus::Running),
    ] {
        let change = StatusChange {
            from,
            to,
            reason: None,
            reason_detail: String::new(),
            at: Utc::now(),
            message: to.to_string(),
        };
        assert!(store.transition_endpoint(id, &change, None, None).await.unwrap());
    }
    let addresses: Vec<String> = addresses.iter().map(|a| (*a).to_owned()).collect();
    let ready = i64::try_from(addresses.len()).unwrap();
    assert!(store.set_ready_replicas(id, ready, &addresses).await.unwrap());
}

async fn gateway_config_goes_to_the_gateway_token_only(app: &TestApp) {
    let path = "/internal/gateway/config";
    let own = app.project("own").await;
    let endpoints = endpoints_in(app, &[&own, &own]).await;
    run(app, &endpoints[0], &["10.0.0.2:8000", "10.0.0.1:8000"]).await;
    let secret = "sk-provider-secret";
    let provider = created(
        app,
        "/providers",
        json!({"name": "openai", "base_url": "https://8.8.8.8/v1", "api_key": secret}),
    )
    .await;
    let route = json!({"name": "chat", "targets": [{"provider_id": provider, "model": "gpt-4o"}]});
    created(app, &format!("/projects/{own}/routes"), route).await;
    let key =
        app.post(&format!("/projects/{own}/keys"), &app.admin_token, json!({"name": "ci"})).await;
    let key_id = key.body["key"]["id"].as_str().unwrap().to_owned();
    let hash = bud_auth::api_key::hash_api_key(key.body["secret"].as_str().unwrap()).unwrap();

    for token in [None, Some("wrong"), Some(app.admin_token.as_str())] {
        let r = app.call(Method::GET, path, token, None).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "invalid_gateway_token"));
    }
    let r = app.call(Method::GET, path, Some("gw-secret"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let version = r.body["version"].as_u64().unwrap();
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["keys"][0]["hash"], hash.as_str());
    assert_eq!(r.body["keys"][0]["project_id"], own.as_str());
    assert_eq!(r.body["routes"][0]["name"], "chat");
    assert_eq!(r.body["routes"][0]["targets"][0]["model"], "gpt-4o");
    assert_eq!(
        r.body["endpoints"],
        json!([{"id": endpoints[0], "project_id": own, "model_name": "llama", "addresses": ["10.0.0.1:8000", "10.0.0.2:8000"]}]),
        "RUNNING endpoints only, with their model's name"
    );
    assert_eq!(r.body["providers"][0]["id"], provider.as_str());
    let sealed = r.body["providers"][0]["api_key_ciphertext"].as_str().unwrap();
    assert!(sealed.starts_with("v1.test."), "provider keys stay sealed: {sealed}");
    assert!(!r.body.to_string().contains(secret));

    let unchanged =
        app.call(Method::GET, &format!("{path}?since={version}"), Some("gw-secret"), None).await;
    assert_eq!(unchanged.status, StatusCode::NOT_MODIFIED);
    let r =
        app.call(Method::DELETE, &format!("/keys/{key_id}"), Some(&app.admin_token), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let changed =
        app.call(Method::GET, &format!("{path}?since={version}"), Some("gw-secret"), None).await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_ne!(changed.body["version"].as_u64().unwrap(), version);
    assert_eq!(changed.body["keys"], json!([]), "revoked keys leave the configuration");
}

#[tokio::test]
async fn gateway_config_sqlite() {
    let config = AppConfig { gateway_token: Some("gw-secret".into()), ..AppConfig::default() };
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    gateway_config_goes_to_the_gateway_token_only(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn gateway_config_postgres() {
    if std::env::var("BUD_TEST_POSTGRES_URL").is_err() {
        eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
        return;
    }
    let config = AppConfig { gateway_token: Some("gw-secret".into()), ..AppConfig::default() };
    let app = TestApp::spawn_with(Backend::Postgres, config).await;
    gateway_config_goes_to_the_gateway_token_only(&app).await;
    app.stop().await;
}

#[tokio::test]
async fn gateway_config_is_refused_without_a_gateway_token_and_undocumented() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let r = app.call(Method::GET, "/internal/gateway/config", Some("anything"), None).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "action_refused"));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("gateway_token"));
    app.stop().await;
    let doc = serde_json::to_value(bud_app::api::openapi()).unwrap();
    assert!(doc["paths"].as_object().unwrap().keys().all(|p| !p.starts_with("/internal")));
}
