//! `bud serve` as a child process and an admin REST client of it, shared by the end-to-end
//! tests of this crate.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const BUD: &str = env!("CARGO_BIN_EXE_bud");
pub const PASSWORD: &str = "end to end password";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One `bud serve` process; killed on drop.
pub struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    /// Starts `bud serve [args]` with `data` as its data directory and `env` on top of the
    /// test defaults (fast reconcile and probes), and waits until `port` accepts connections.
    pub fn start(data: &Path, args: &[&str], env: &[(&str, String)], port: u16) -> Serve {
        std::fs::create_dir_all(data).unwrap();
        let log = data.join(format!("serve-{}.log", uuid::Uuid::new_v4().simple()));
        let mut cmd = Command::new(BUD);
        cmd.arg("serve")
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BUD_DATA_DIR", data)
            .env("BUD_ADMIN_PASSWORD", PASSWORD)
            .env("BUD_LOG_LEVEL", "info")
            .env("BUD_CLUSTERS_RECONCILE_INTERVAL_MS", "200")
            .env("BUD_CLUSTERS_PROBE_INTERVAL_SECS", "1")
            .env("BUD_CLUSTERS_PROBE_TIMEOUT_SECS", "1")
            .env("BUD_CLUSTERS_MAX_PROBE_FAILURES", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        // Every service gets a free port unless the test chose one, so tests run in parallel.
        for port in ["BUD_CLUSTERS_PORT", "BUD_GATEWAY_PORT"] {
            cmd.env(port, free_port().to_string());
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut serve = Serve { child: cmd.spawn().unwrap(), log };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("bud serve exited with {status}:\n{}", serve.log());
            }
            assert!(Instant::now() < deadline, "bud serve did not listen:\n{}", serve.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        serve
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(mut self) {
        nix_kill(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "bud serve did not stop:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: a crash, with no chance to clean up.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            nix_kill(self.child.id(), "TERM");
            std::thread::sleep(Duration::from_millis(500));
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn nix_kill(pid: u32, signal: &str) {
    let _ = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
}

pub fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// A REST client logged in as the admin.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    pub token: String,
}

impl Api {
    pub async fn login(port: u16) -> Api {
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let r: Value = http
            .post(format!("{base}/auth/login"))
            .json(&json!({"email": "admin@bud.local", "password": PASSWORD}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token =
            r["access_token"].as_str().unwrap_or_else(|| panic!("login failed: {r}")).to_owned();
        Api { base, http, token }
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req =
            self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn post(&self, path: &str, body: Value) -> Value {
        let (status, v) = self.call(reqwest::Method::POST, path, Some(body)).await;
        assert!((200..300).contains(&status), "POST {path}: {status} {v}");
        v
    }

    pub async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call(reqwest::Method::GET, path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// A project and an engine-sim model to deploy.
    pub async fn setup(&self) -> (String, String) {
        let p = self.post("/projects", json!({"name": "e2e"})).await;
        let m = self
            .post(
                "/models",
                json!({"name": "sim", "source_uri": "hf://org/sim", "engine": "engine-sim"}),
            )
            .await;
        (p["id"].as_str().unwrap().to_owned(), m["id"].as_str().unwrap().to_owned())
    }

    pub async fn endpoint(&self, project: &str, model: &str, name: &str, extra: Value) -> String {
        let mut body = json!({"project_id": project, "model_id": model, "name": name});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.post("/endpoints", body).await["id"].as_str().unwrap().to_owned()
    }

    /// Polls until the endpoint satisfies `done`, or fails with its last state.
    pub async fn wait(
        &self,
        id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let e = self.get(&format!("/endpoints/{id}")).await;
            if done(&e) {
                return e;
            }
            assert!(Instant::now() < deadline, "endpoint never became {what}: {e:#}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_status(
        &self,
        id: &str,
        status: &str,
        ready: i64,
        timeout: Duration,
    ) -> Value {
        self.wait(id, &format!("{status} {ready} ready"), timeout, |e| {
            e["status"] == status && e["replicas_ready"] == ready
        })
        .await
    }

    /// (pid, port) of every replica start the endpoint's logs mention.
    pub async fn replica_starts(&self, id: &str) -> Vec<(u32, u16)> {
        let (_, logs) =
            self.call(reqwest::Method::GET, &format!("/endpoints/{id}/logs?tail=1000"), None).await;
        let text = logs.as_str().unwrap_or_default().to_owned();
        text.lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("--- started pid ")?;
                let mut words = rest.split_whitespace();
                let pid = words.next()?.parse().ok()?;
                let port = words.nth(1)?.parse().ok()?;
                Some((pid, port))
            })
            .collect()
    }
}

/// `bud serve` with everything in one process on free ports, and an admin client of it.
pub async fn embedded(data: &Path, extra: &[(&str, String)]) -> (Serve, Api) {
    let (app, cluster) = (free_port(), free_port());
    let mut env =
        vec![("BUD_SERVER_APP_PORT", app.to_string()), ("BUD_CLUSTERS_PORT", cluster.to_string())];
    env.extend(extra.iter().cloned());
    let serve = Serve::start(data, &[], &env, app);
    (serve, Api::login(app).await)
}
