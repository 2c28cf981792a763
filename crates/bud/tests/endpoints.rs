#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Endpoints on the local cluster, end to end: `bud serve` as a process, the REST API over
//! loopback, engine-sim replicas as its child processes. Covers the lifecycle, the failures the
//! guide names (start failure, crash, deployment timeout, unreachable cluster), a crash of
//! `bud serve` itself mid-deployment, and two budcluster replicas sharing one PostgreSQL.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "support/harness.rs"]
mod harness;
use harness::*;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[tokio::test]
async fn endpoint_lifecycle_on_the_local_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (serve, api) = embedded(dir.path(), &[]).await;

    let clusters = api.get("/clusters").await;
    assert_eq!(clusters["data"][0]["name"], "local");
    let (project, model) = api.setup().await;
    let id = api.endpoint(&project, &model, "chat", json!({"replicas": 2})).await;
    let e = api.wait_status(&id, "RUNNING", 2, SECS(30)).await;
    assert_eq!(e["replicas_desired"], 2);
    let history: Vec<&str> =
        e["events"].as_array().unwrap().iter().map(|v| v["message"].as_str().unwrap()).collect();
    assert!(history.iter().any(|m| m.contains("deploying")), "{history:?}");

    // Call an engine replica as a client would.
    let starts = api.replica_starts(&id).await;
    assert_eq!(starts.len(), 2, "{starts:?}");
    let (_, port) = starts[0];
    let answer: Value = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .json(&json!({"model": "sim", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["model"], "sim");
    assert_eq!(answer["usage"]["completion_tokens"], 4);

    let (status, scaled) = api
        .call(reqwest::Method::PATCH, &format!("/endpoints/{id}"), Some(json!({"replicas": 3})))
        .await;
    assert_eq!(status, 200, "{scaled}");
    api.wait_status(&id, "RUNNING", 3, SECS(30)).await;
    let metrics = api.get(&format!("/endpoints/{id}/metrics")).await;
    assert_eq!(metrics["replicas_scraped"], 3, "{metrics}");

    api.post(&format!("/endpoints/{id}/stop"), json!({})).await;
    api.wait_status(&id, "STOPPED", 0, SECS(30)).await;
    let pids: BTreeSet<u32> = api.replica_starts(&id).await.into_iter().map(|(p, _)| p).collect();
    assert_eq!(pids.len(), 3);
    assert!(pids.iter().all(|p| !alive(*p)), "stopped replicas are gone");

    api.post(&format!("/endpoints/{id}/start"), json!({})).await;
    api.wait_status(&id, "RUNNING", 3, SECS(30)).await;
    api.post(&format!("/endpoints/{id}/stop"), json!({})).await;
    api.wait_status(&id, "STOPPED", 0, SECS(30)).await;
    let (status, _) = api.call(reqwest::Method::DELETE, &format!("/endpoints/{id}"), None).await;
    assert_eq!(status, 204);
    let all: BTreeSet<u32> = pids.into_iter().collect();
    serve.stop();
    assert!(all.iter().all(|p| !alive(*p)), "no engine process is left");
}

#[tokio::test]
async fn illegal_commands_name_the_current_state() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, api) = embedded(dir.path(), &[]).await;
    let (project, model) = api.setup().await;
    let id = api.endpoint(&project, &model, "e", json!({})).await;
    api.wait_status(&id, "RUNNING", 1, SECS(30)).await;
    let (status, body) = api.call(reqwest::Method::DELETE, &format!("/endpoints/{id}"), None).await;
    assert_eq!(status, 409);
    assert!(body["error"]["message"].as_str().unwrap().contains("RUNNING"), "{body}");
    let (status, body) =
        api.call(reqwest::Method::POST, &format!("/endpoints/{id}/retry"), Some(json!({}))).await;
    assert_eq!(status, 409, "{body}");
}

#[tokio::test]
async fn start_failure_is_an_error_and_retry_recovers_once_the_fault_is_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let fault = dir.path().join("fault");
    std::fs::write(&fault, "").unwrap();
    // The engine refuses to start while the fault file exists.
    let command = format!(
        "sh -c 'test -e {} && {{ echo engine cannot start: fault file present >&2; exit 3; }}; exec {BUD} engine-sim --port {{port}} --model {{model}}'",
        fault.display()
    );
    let (_serve, api) = embedded(dir.path(), &[("BUD_CLUSTERS_LOCAL_COMMAND", command)]).await;
    let (project, model) = api.setup().await;
    let id = api.endpoint(&project, &model, "broken", json!({})).await;
    let e = api.wait(&id, "ERROR", SECS(60), |e| e["status"] == "ERROR").await;
    assert_eq!(e["reason"], "start_failure", "{e:#}");
    assert!(
        e["reason_detail"].as_str().unwrap().contains("fault file present"),
        "the detail quotes the engine: {e:#}"
    );

    std::fs::remove_file(&fault).unwrap();
    api.post(&format!("/endpoints/{id}/retry"), json!({})).await;
    api.wait_status(&id, "RUNNING", 1, SECS(30)).await;
}

#[tokio::test]
async fn a_replica_that_crashes_while_running_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, api) = embedded(dir.path(), &[]).await;
    let (project, model) = api.setup().await;
    let id = api
        .endpoint(&project, &model, "fragile", json!({"engine_args": ["--crash-after", "2"]}))
        .await;
    api.wait_status(&id, "RUNNING", 1, SECS(30)).await;
    let (pid, port) = api.replica_starts(&id).await[0];
    let http = reqwest::Client::new();
    for _ in 0..2 {
        let _ = http
            .post(format!("http://127.0.0.1:{port}/v1/completions"))
            .json(&json!({"model": "sim", "prompt": "x", "max_tokens": 1}))
            .send()
            .await;
    }
    let deadline = Instant::now() + SECS(30);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the replica did not crash");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The local driver starts it again: a second start is logged and the endpoint is ready.
    let deadline = Instant::now() + SECS(30);
    loop {
        let starts = api.replica_starts(&id).await;
        let e = api.get(&format!("/endpoints/{id}")).await;
        if starts.len() >= 2
            && alive(starts.last().unwrap().0)
            && e["status"] == "RUNNING"
            && e["replicas_ready"] == 1
        {
            break;
        }
        assert!(Instant::now() < deadline, "the replica was not restarted: {starts:?} {e:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_deployment_that_is_not_ready_in_time_is_an_error_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, api) = embedded(dir.path(), &[]).await;
    let (project, model) = api.setup().await;
    let extra =
        json!({"engine_args": ["--start-delay-ms", "120000"], "deployment_timeout_secs": 5});
    let id = api.endpoint(&project, &model, "slow", extra).await;
    let e = api.wait(&id, "ERROR", SECS(30), |e| e["status"] == "ERROR").await;
    assert_eq!(e["reason"], "timeout", "{e:#}");
    assert!(e["reason_detail"].as_str().unwrap().contains("0 of 1"), "{e:#}");
    let pids: Vec<u32> = api.replica_starts(&id).await.into_iter().map(|(p, _)| p).collect();
    let deadline = Instant::now() + SECS(15);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < deadline, "an errored endpoint keeps no replicas");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A kubeconfig pointing at a port where nothing listens.
fn kubeconfig_to_nowhere() -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster:\n    server: https://127.0.0.1:{}\ncontexts:\n- name: gone\n  context:\n    cluster: gone\n    user: u\ncurrent-context: gone\nusers:\n- name: u\n  user:\n    token: t\n",
        free_port()
    )
}

#[tokio::test]
async fn an_unreachable_cluster_errors_after_retries_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let (_serve, api) = embedded(dir.path(), &[]).await;
    let c = api
        .post("/clusters", json!({"name": "gpu-east", "kubeconfig": kubeconfig_to_nowhere()}))
        .await;
    let cid = c["id"].as_str().unwrap().to_owned();
    assert_eq!(c["status"], "REGISTERING");

    let (project, model) = api.setup().await;
    let id = api.endpoint(&project, &model, "alive", json!({})).await;

    let mut seen = Vec::new();
    let deadline = Instant::now() + SECS(60);
    loop {
        let c = api.get(&format!("/clusters/{cid}")).await;
        let status = c["status"].as_str().unwrap().to_owned();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "ERROR" {
            assert!(c["reason"].as_str().unwrap().contains("3 failed checks"), "{c:#}");
            let to: Vec<&str> = c["events"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["to_status"].as_str().unwrap())
                .collect();
            assert!(
                to.contains(&"NOT_AVAILABLE") && to.contains(&"ERROR"),
                "every change is recorded: {to:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never reached ERROR: {seen:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(seen.contains(&"NOT_AVAILABLE".to_owned()), "{seen:?}");
    // Meanwhile the local cluster served its endpoint.
    api.wait_status(&id, "RUNNING", 1, SECS(30)).await;
    let local = api.get("/clusters").await["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "local")
        .cloned()
        .unwrap();
    assert_eq!(local["status"], "AVAILABLE");

    // Refresh goes back to REGISTERING and the checks start over.
    let refreshed = api.post(&format!("/clusters/{cid}/refresh"), json!({})).await;
    assert_eq!(refreshed["status"], "REGISTERING");
    let (status, body) = api
        .call(
            reqwest::Method::POST,
            "/clusters",
            Some(json!({"name": "x", "kubeconfig": "not: [yaml"})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["field"], "kubeconfig");
}

#[tokio::test]
async fn a_crash_mid_deployment_converges_after_restart_with_no_orphans() {
    let dir = tempfile::tempdir().unwrap();
    // Fixed ports: the restarted process must answer where the first one did.
    let (app, cluster) = (free_port(), free_port());
    let env =
        [("BUD_SERVER_APP_PORT", app.to_string()), ("BUD_CLUSTERS_PORT", cluster.to_string())];
    let serve = Serve::start(dir.path(), &[], &env, app);
    let api = Api::login(app).await;
    let (project, model) = api.setup().await;
    let id = api
        .endpoint(
            &project,
            &model,
            "phoenix",
            json!({"replicas": 2, "engine_args": ["--start-delay-ms", "3000"]}),
        )
        .await;
    api.wait(&id, "DEPLOYING with replicas started", SECS(30), |e| e["status"] == "DEPLOYING")
        .await;
    let deadline = Instant::now() + SECS(15);
    let first = loop {
        let starts = api.replica_starts(&id).await;
        if starts.len() == 2 {
            break starts;
        }
        assert!(Instant::now() < deadline, "replicas never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    serve.crash();
    assert!(first.iter().all(|(p, _)| alive(*p)), "the crash left the replicas running");

    let serve = Serve::start(dir.path(), &[], &env, app);
    let api = Api::login(app).await;
    let e = api.wait_status(&id, "RUNNING", 2, SECS(60)).await;
    assert_eq!(e["status"], "RUNNING");
    assert!(
        first.iter().all(|(p, _)| !alive(*p)),
        "the orphans of the crashed process were cleaned up"
    );
    let now: Vec<u32> = api.replica_starts(&id).await.into_iter().map(|(p, _)| p).collect();
    assert_eq!(now.iter().filter(|p| alive(**p)).count(), 2, "exactly the desired replicas run");
    serve.stop();
}

/// Two budcluster replicas on one PostgreSQL: only the holder of a cluster's lease runs its
/// endpoints; when it stops, the other takes over.
#[tokio::test]
async fn two_budclusters_on_one_postgres_never_double_deploy() {
    let Some(admin) = bud_store::testing::postgres_admin_url() else {
        eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
        return;
    };
    let db = bud_store::testing::fresh_postgres(&admin).await.unwrap();
    let url = db.config().url.clone();
    let root = tempfile::tempdir().unwrap();
    let app = free_port();
    // One master key for all three processes: they share the sealed secrets in the database.
    let key = bud_auth::secrets::encode_key_spec("k1", &[7u8; 32]);
    let shared =
        [("BUD_DATABASE_URL", url.clone()), ("BUD_SECRETS_MASTER_KEYS", format!("[\"{key}\"]"))];
    let with = |extra: &[(&'static str, String)]| -> Vec<(&'static str, String)> {
        shared.iter().cloned().chain(extra.iter().cloned()).collect()
    };

    let a_port = free_port();
    let b_port = free_port();
    let a = Serve::start(
        &root.path().join("a"),
        &["--only", "cluster"],
        &with(&[("BUD_CLUSTERS_PORT", a_port.to_string())]),
        a_port,
    );
    let b = Serve::start(
        &root.path().join("b"),
        &["--only", "cluster"],
        &with(&[("BUD_CLUSTERS_PORT", b_port.to_string())]),
        b_port,
    );
    let api_env = with(&[
        ("BUD_SERVER_APP_PORT", app.to_string()),
        ("BUD_CLUSTERS_URL", format!("http://127.0.0.1:{a_port}")),
        ("BUD_CLUSTERS_LOCAL", "false".into()),
    ]);
    let _app = Serve::start(&root.path().join("app"), &["--only", "app"], &api_env, app);
    let api = Api::login(app).await;
    let (project, model) = api.setup().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(api.endpoint(&project, &model, &format!("e{i}"), json!({"replicas": 2})).await);
    }
    for id in &ids {
        api.wait_status(id, "RUNNING", 2, SECS(60)).await;
    }
    let replicas_under = |who: &str| -> usize {
        ids.iter()
            .map(|id| {
                let dir = root.path().join(who).join("local").join(id);
                std::fs::read_dir(dir)
                    .map(|d| {
                        d.filter(|f| {
                            f.as_ref()
                                .is_ok_and(|f| f.path().extension().is_some_and(|x| x == "json"))
                        })
                        .count()
                    })
                    .unwrap_or(0)
            })
            .sum()
    };
    let (in_a, in_b) = (replicas_under("a"), replicas_under("b"));
    assert_eq!(in_a + in_b, 6, "every replica runs once: a={in_a} b={in_b}");
    assert!(in_a == 0 || in_b == 0, "one budcluster holds the local cluster: a={in_a} b={in_b}");

    // Stop the holder; the other takes the lease over and redeploys.
    let (holder, other) = if in_a > 0 { (a, "b") } else { (b, "a") };
    holder.stop();
    let deadline = Instant::now() + SECS(60);
    while replicas_under(other) < 6 {
        assert!(Instant::now() < deadline, "the other budcluster did not take over");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &ids {
        api.wait_status(id, "RUNNING", 2, SECS(60)).await;
    }
    drop(api);
    db.cleanup().await;
}
