//! PostgreSQL going away under load: budapp answers 503 quickly with a clear error, `/readyz`
//! turns false, and everything recovers by itself once the database is back.
//!
//! Two ways to take the database away: a TCP proxy between budapp and PostgreSQL that drops
//! every connection (always available), and killing a private PostgreSQL server with
//! `pg_ctl stop -m immediate` and starting it again (when `BUD_TEST_PG_BIN` names PostgreSQL's
//! binaries).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bud_app::{AppConfig, AppState};
use bud_auth::secrets::{self, Keyring};
use bud_domain::Email;
use bud_store::{Store, StoreConfig};
use reqwest::StatusCode;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:<port> to `upstream` while up; while down, cuts everything.
struct Proxy {
    port: u16,
    down: watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, watch_down) = watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else { return };
                if *watch_down.borrow() {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let mut cut = watch_down.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.wait_for(|down| *down) => {}
                    }
                });
            }
        });
        Proxy { port, down }
    }

    fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

/// Takes the database away and brings it back.
trait Outage {
    async fn cut(&mut self);
    async fn restore(&mut self);
}

impl Outage for Proxy {
    async fn cut(&mut self) {
        self.set_down(true);
    }
    async fn restore(&mut self) {
        self.set_down(false);
    }
}

#[tokio::test]
async fn postgres_cut_off_gives_fast_503_and_recovers() {
    let Some(admin_url) = bud_store::testing::postgres_admin_url() else {
        eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
        return;
    };
    let db = bud_store::testing::fresh_postgres(&admin_url).await.unwrap();
    let mut url = url::Url::parse(&db.config().url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let proxy = Proxy::start(upstream).await;
    url.set_host(Some("127.0.0.1")).unwrap();
    url.set_port(Some(proxy.port)).unwrap();
    exercise_outage(url.to_string(), proxy).await;
    db.cleanup().await;
}

/// A PostgreSQL server of the test's own, in a temporary directory, on a free port.
struct PrivatePostgres {
    bin: std::path::PathBuf,
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    async fn start(bin: &str) -> PrivatePostgres {
        let dir = std::env::temp_dir().join(format!("bud-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = PrivatePostgres { bin: bin.into(), dir, port };
        pg.as_postgres_user(&["chown", "-R", "postgres", &pg.dir.display().to_string()], true)
            .await;
        let data = pg.dir.join("data").display().to_string();
        pg.tool(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        )
        .await;
        pg.up().await;
        pg
    }

    /// PostgreSQL refuses to run as root: when we are root, run its tools as `postgres`.
    async fn as_postgres_user(&self, argv: &[&str], as_root: bool) {
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        let mut cmd = if root && !as_root {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).args(argv);
            c
        } else if root || !as_root {
            let mut c = tokio::process::Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        } else {
            return;
        };
        let out = cmd.output().await.unwrap();
        assert!(out.status.success(), "{argv:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    async fn tool(&self, name: &str, args: &[&str]) {
        let path = self.bin.join(name).display().to_string();
        let argv: Vec<&str> = std::iter::once(path.as_str()).chain(args.iter().copied()).collect();
        self.as_postgres_user(&argv, false).await;
    }

    async fn up(&self) {
        let data = self.dir.join("data").display().to_string();
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.tool("pg_ctl", &["-D", &data, "-o", &options, "-l", &log, "-w", "start"]).await;
    }

    /// A crash-like stop: no checkpoint, connections cut.
    async fn kill(&self) {
        let data = self.dir.join("data").display().to_string();
        self.tool("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"]).await;
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Outage for PrivatePostgres {
    async fn cut(&mut self) {
        self.kill().await;
    }
    async fn restore(&mut self) {
        self.up().await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let data = self.dir.join("data").display().to_string();
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &pg_ctl, "-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::process::Command::new(&pg_ctl)
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn postgres_killed_under_load_gives_fast_503_and_recovers() {
    let Ok(bin) = std::env::var("BUD_TEST_PG_BIN") else {
        eprintln!("skipped: BUD_TEST_PG_BIN (PostgreSQL's bin directory) not set");
        return;
    };
    let pg = PrivatePostgres::start(&bin).await;
    let url = pg.url();
    let store =
        Store::connect(&StoreConfig { url: url.clone(), ..StoreConfig::default() }).await.unwrap();
    store.migrate().await.unwrap();
    store.close().await;
    exercise_outage(url, pg).await;
}

/// Runs budapp on `db_url` under load from four clients, takes the database away, and checks:
/// only fast 503s with a clear error while it is gone, `/readyz` false, recovery once it is back.
async fn exercise_outage(db_url: String, mut outage: impl Outage) {
    let config = StoreConfig {
        url: db_url,
        acquire_timeout: Duration::from_millis(500),
        ..StoreConfig::default()
    };
    let store = Store::connect(&config).await.unwrap();
    let keyring = Keyring::new("t", vec![("t".into(), secrets::generate_key())]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::build(
        AppConfig { public_url: base.clone(), ..AppConfig::default() },
        store,
        keyring,
    )
    .await
    .unwrap();
    let password = "outage test password";
    bud_app::identity::ensure_first_admin(
        &state,
        &Email::parse("e", "admin@bud.local").unwrap(),
        Some(password.into()),
    )
    .await
    .unwrap();
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(bud_app::run(listener, state.clone(), shutdown.clone()));
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let login: serde_json::Value = http
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": "admin@bud.local", "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let project: serde_json::Value = http
        .post(format!("{base}/projects"))
        .bearer_auth(&token)
        .json(&json!({"name": "load"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let project_url = format!("{base}/projects/{}", project["id"].as_str().unwrap());

    // Load: four clients reading the project for the whole test; each records (status, latency).
    let stop = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u16, Duration, String)>::new()));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (http, url, token, stop, samples) =
            (http.clone(), project_url.clone(), token.clone(), stop.clone(), samples.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = http.get(&url).bearer_auth(&token).send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                samples.lock().unwrap().push((started, status, started.elapsed(), body));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut_at = Instant::now();
    outage.cut().await;

    // /readyz goes false.
    let mut ready_false = None;
    while cut_at.elapsed() < Duration::from_secs(10) {
        let r = http.get(format!("{base}/readyz")).send().await.unwrap();
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["status"], "not_ready");
            ready_false = Some(cut_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ready_false = ready_false.expect("/readyz never reported the outage");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let restored_at = Instant::now();
    outage.restore().await;
    let mut recovered = None;
    while restored_at.elapsed() < Duration::from_secs(15) {
        let ready =
            http.get(format!("{base}/readyz")).send().await.unwrap().status() == StatusCode::OK;
        let read = http.get(&project_url).bearer_auth(&token).send().await.unwrap().status()
            == StatusCode::OK;
        if ready && read {
            recovered = Some(restored_at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let recovered =
        recovered.expect("budapp did not recover within 15 s of the database coming back");

    let samples = std::mem::take(&mut *samples.lock().unwrap());
    // A request that starts just before the restore may wait for a connection (up to the 500 ms
    // acquire timeout) and then succeed: leave that margin out of the outage window.
    let window = (cut_at + Duration::from_millis(100), restored_at - Duration::from_millis(600));
    let during: Vec<_> =
        samples.iter().filter(|(at, ..)| *at > window.0 && *at < window.1).collect();
    assert!(!during.is_empty());
    for (_, status, latency, body) in &during {
        assert_eq!(*status, 503, "only 503 while the database is down, got {status}: {body}");
        assert!(
            body.contains("service_unavailable") && body.contains("database"),
            "clear error: {body}"
        );
        assert!(*latency < Duration::from_millis(1500), "503 must be fast, took {latency:?}");
    }
    assert!(samples.iter().all(|(_, status, ..)| *status == 200 || *status == 503), "never a 500");
    eprintln!(
        "readyz false after {ready_false:?}; {} fast 503s during the outage; recovered in {recovered:?}",
        during.len()
    );

    shutdown.cancel();
    let _ = server.await;
}
