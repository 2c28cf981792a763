//! Keys, routes, the model list, request rewriting, and where keys go.

use std::sync::Arc;

use bud_domain::ProjectId;

use crate::fake_upstream::{FakeUpstream, PROMPT_TOKENS};
use crate::harness::{
    KEY, TestGateway, World, chat_body, config, gateway_for, hash, key_entry, provider, replica,
    route,
};

#[tokio::test]
async fn requests_without_a_valid_key_get_401() {
    let upstream = FakeUpstream::start().await;
    let mut world = World::new(vec![route("chat", vec![replica(upstream.addr, "m")], vec![])]);
    world.key.expires_at_ms = Some(chrono::Utc::now().timestamp_millis() + 60_000);
    let mut snapshot = world.snapshot();
    let mut expired = key_entry(world.project);
    expired.expires_at_ms = Some(chrono::Utc::now().timestamp_millis() - 1);
    snapshot.keys.insert(hash("sk-expired"), expired);
    let gw = TestGateway::spawn(config(), snapshot).await;
    let url = format!("{}/v1/chat/completions", gw.url);

    let cases = [
        gw.client.post(&url).json(&chat_body(false)),
        gw.client.post(&url).bearer_auth("sk-unknown").json(&chat_body(false)),
        gw.client.post(&url).bearer_auth("sk-expired").json(&chat_body(false)),
        gw.client.post(&url).header("authorization", KEY).json(&chat_body(false)),
        gw.client.get(format!("{}/v1/models", gw.url)).bearer_auth("sk-expired"),
    ];
    for request in cases {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 401);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "authentication_error");
        assert!(!body["error"]["message"].as_str().unwrap().contains("sk-"), "keys are not echoed");
    }
    assert_eq!(upstream.requests(), 0);
    // The valid, not yet expired key works.
    assert_eq!(gw.chat(chat_body(false)).send().await.unwrap().status(), 200);
}

/// Two projects; the key belongs to the first.
fn two_projects(upstream: &FakeUpstream) -> bud_gateway::snapshot::Snapshot {
    let world = World::new(vec![
        route("b-model", vec![replica(upstream.addr, "m")], vec![]),
        route("a-model", vec![replica(upstream.addr, "m")], vec![]),
    ]);
    let mut snapshot = world.snapshot();
    let other = ProjectId::new();
    let theirs = route("their-model", vec![replica(upstream.addr, "m")], vec![]);
    snapshot.routes.entry(other).or_default().insert(theirs.name.clone(), Arc::new(theirs));
    snapshot
}

#[tokio::test]
async fn a_model_of_another_project_is_not_found_in_openai_shape() {
    let upstream = FakeUpstream::start().await;
    let gw = TestGateway::spawn(config(), two_projects(&upstream)).await;
    let response =
        gw.chat(serde_json::json!({"model": "their-model", "messages": []})).send().await.unwrap();
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    insta::assert_json_snapshot!(body, @r#"
    {
      "error": {
        "code": "model_not_found",
        "message": "The model `their-model` does not exist or you do not have access to it.",
        "param": "model",
        "type": "invalid_request_error"
      }
    }
    "#);
    assert_eq!(upstream.requests(), 0);
    let response = gw.get("/v1/models/their-model").bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn the_model_list_holds_only_the_projects_routes() {
    let upstream = FakeUpstream::start().await;
    let gw = TestGateway::spawn(config(), two_projects(&upstream)).await;
    let response = gw.get("/v1/models").bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    insta::assert_json_snapshot!(body, @r#"
    {
      "data": [
        {
          "created": 0,
          "id": "a-model",
          "object": "model",
          "owned_by": "bud"
        },
        {
          "created": 0,
          "id": "b-model",
          "object": "model",
          "owned_by": "bud"
        }
      ],
      "object": "list"
    }
    "#);
    let one: serde_json::Value =
        gw.get("/v1/models/a-model").bearer_auth(KEY).send().await.unwrap().json().await.unwrap();
    assert_eq!(one["id"], "a-model");
}

#[tokio::test]
async fn malformed_requests_and_unknown_paths_get_openai_errors() {
    let upstream = FakeUpstream::start().await;
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let url = format!("{}/v1/chat/completions", gw.url);
    for body in
        ["{", "[]", "{\"messages\":[]}", "{\"model\":1}", "{\"model\":\"chat\",\"stream\":\"yes\"}"]
    {
        let response = gw.client.post(&url).bearer_auth(KEY).body(body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let v: serde_json::Value = response.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{body}");
    }
    let response = gw.get("/v1/chat/completions").bearer_auth(KEY).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let response = gw.get("/v1/nothing").send().await.unwrap();
    assert_eq!(response.status(), 404);
    let v: serde_json::Value = response.json().await.unwrap();
    assert_eq!(v["error"]["code"], "unknown_url");
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn the_model_is_rewritten_and_usage_forced_without_touching_the_rest() {
    let upstream = FakeUpstream::start().await;
    let gw = gateway_for(vec![replica(upstream.addr, "org/served-model")], vec![]).await;
    let body = serde_json::json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5, "stream": true, "max_tokens": 9, "x_vendor": {"k": [1, 2]}});
    let response = gw.chat(body.clone()).send().await.unwrap();
    let text = response.text().await.unwrap();
    assert!(
        !text.contains("\"usage\""),
        "the usage chunk the client did not ask for is dropped: {text}"
    );

    let seen = upstream.seen();
    let mut expected = body;
    expected["model"] = "org/served-model".into();
    expected["stream_options"] = serde_json::json!({"include_usage": true});
    assert_eq!(seen[0].body, expected);
    assert_eq!(seen[0].path, "/v1/chat/completions");
}

#[tokio::test]
async fn provider_keys_go_to_their_provider_only() {
    let upstream = FakeUpstream::start().await;
    let gw = gateway_for(
        vec![replica(upstream.addr, "m")],
        vec![provider(upstream.addr, Some("sk-provider-secret"), "gpt-x")],
    )
    .await;
    upstream.script([crate::fake_upstream::Behavior::Status(503, None)]);
    let response = gw.chat(chat_body(false)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].authorization, None, "the replica gets no key, and never the client's");
    assert_eq!(seen[1].authorization.as_deref(), Some("Bearer sk-provider-secret"));
    assert_eq!(seen[1].body["model"], "gpt-x");
    assert_eq!(seen[1].path, "/v1/chat/completions");
}

#[tokio::test]
async fn completions_and_embeddings_are_forwarded_and_metered() {
    let upstream = FakeUpstream::start().await;
    let gw = gateway_for(vec![replica(upstream.addr, "m")], vec![]).await;
    let r = gw
        .post("/v1/completions", serde_json::json!({"model": "chat", "prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = gw
        .post(
            "/v1/completions",
            serde_json::json!({"model": "chat", "prompt": "hi", "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let r = gw
        .post("/v1/embeddings", serde_json::json!({"model": "chat", "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["data"][0]["embedding"][0], 0.25);
    assert!(upstream.seen()[2].body.get("stream_options").is_none(), "embeddings never stream");

    let records = gw.records_eventually(3).await;
    let tokens: Vec<(u32, u32)> =
        records.iter().map(|r| (r.prompt_tokens, r.completion_tokens)).collect();
    assert_eq!(tokens, [(PROMPT_TOKENS, 3), (PROMPT_TOKENS, 3), (PROMPT_TOKENS, 0)]);
}

#[tokio::test]
async fn provider_requests_go_through_the_configured_proxy_only() {
    let proxy = FakeUpstream::start().await;
    let mut config = config();
    config.http_proxy = Some(format!("http://{}", proxy.addr));
    let mut through_proxy = provider(proxy.addr, Some("sk-p"), "gpt-x");
    if let bud_gateway::snapshot::Upstream::Provider { base_url, .. } = &mut through_proxy.upstream
    {
        *base_url = "http://provider.invalid/v1".to_owned();
    }
    let direct = FakeUpstream::start().await;
    config.no_proxy = Some("127.0.0.1".to_owned());
    let world = World::new(vec![
        route("via-proxy", vec![through_proxy], vec![]),
        route("bypass", vec![provider(direct.addr, None, "gpt-y")], vec![]),
    ]);
    let gw = TestGateway::spawn(config, world.snapshot()).await;
    let r =
        gw.chat(serde_json::json!({"model": "via-proxy", "messages": []})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let seen = proxy.seen();
    assert_eq!(
        seen[0].path, "http://provider.invalid/v1/chat/completions",
        "absolute form: a proxy request"
    );
    let r = gw.chat(serde_json::json!({"model": "bypass", "messages": []})).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        (proxy.requests(), direct.requests()),
        (1, 1),
        "no_proxy hosts are reached directly"
    );
}

#[tokio::test]
async fn a_bad_proxy_url_is_a_configuration_error() {
    let mut config = config();
    config.https_proxy = Some("http://[::1".to_owned());
    let (meter, _writer) = bud_gateway::metering::Meter::new(
        Default::default(),
        std::sync::Arc::new(crate::harness::VecSink::default()),
        Default::default(),
    );
    let e =
        bud_gateway::Gateway::try_new(config, meter, crate::harness::prometheus()).err().unwrap();
    assert!(matches!(e, bud_gateway::Error::Proxy { which: "https_proxy", .. }), "{e:?}");
}
