//! PostgreSQL going away under load: budapp answers 503 quickly with a clear error, `/readyz`
//! turns false, and everything recovers by itself once the database is back.
//!
//! The database is cut with a TCP proxy between budapp and PostgreSQL: "down" drops every open
//! connection and closes each new one at once, which is what clients of a killed server see.

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

#[tokio::test]
async fn postgres_outage_gives_fast_503_and_recovers() {
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
    let config = StoreConfig {
        url: url.to_string(),
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
    proxy.set_down(true);

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
    proxy.set_down(false);
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

    let samples = samples.lock().unwrap();
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
    db.cleanup().await;
}
