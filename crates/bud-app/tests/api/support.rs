//! `TestApp`: budapp on port 0 with a fresh database and (with the built-in issuer) a known
//! admin, plus a client.

use std::time::Duration;

use bud_app::{AppConfig, AppState, IdentityMode};
use bud_auth::secrets::{self, Keyring};
use bud_domain::Email;
use bud_store::testing::TestDatabase;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const ADMIN_EMAIL: &str = "admin@bud.local";
pub const ADMIN_PASSWORD: &str = "correct horse battery";

/// Runs one async test body against SQLite and, when configured, PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                let app = $crate::support::TestApp::spawn($crate::support::Backend::Sqlite).await;
                super::$name(&app).await;
                app.stop().await;
            }

            #[tokio::test]
            async fn postgres() {
                let Some(app) = $crate::support::TestApp::spawn_postgres().await else { return };
                super::$name(&app).await;
                app.stop().await;
            }
        }
    };
}

#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct TestApp {
    pub url: String,
    /// The keyring's one key, id `test`.
    pub master_key: [u8; 32],
    pub state: AppState,
    pub http: reqwest::Client,
    /// The built-in admin's access token; empty with an external identity provider, where no
    /// local admin exists.
    pub admin_token: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    db: TestDatabase,
}

/// A response reduced to what tests look at.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The error code of an error envelope.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl TestApp {
    /// PostgreSQL when `BUD_TEST_POSTGRES_URL` is set; otherwise says the test is skipped.
    pub async fn spawn_postgres() -> Option<TestApp> {
        if std::env::var("BUD_TEST_POSTGRES_URL").is_err() {
            eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
            return None;
        }
        Some(Self::spawn(Backend::Postgres).await)
    }

    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, AppConfig::default()).await
    }

    pub async fn spawn_with(backend: Backend, mut config: AppConfig) -> TestApp {
        let db = match backend {
            Backend::Sqlite => bud_store::testing::fresh_sqlite().await.unwrap(),
            Backend::Postgres => {
                let admin_url =
                    std::env::var("BUD_TEST_POSTGRES_URL").expect("BUD_TEST_POSTGRES_URL");
                bud_store::testing::fresh_postgres(&admin_url).await.unwrap()
            }
        };
        let store = db.store().clone();
        let master_key = secrets::generate_key();
        let keyring = Keyring::new("test", vec![("test".into(), master_key)]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        config.public_url = url.clone();
        let state = AppState::build(config, store, keyring).await.unwrap();
        // As `bud serve` does: the first admin is a local account, so only the built-in issuer
        // has one. With an external provider, admins are whoever the provider says.
        let builtin = matches!(state.config.identity, IdentityMode::Builtin);
        if builtin {
            let email = Email::parse("email", ADMIN_EMAIL).unwrap();
            bud_app::identity::ensure_first_admin(&state, &email, Some(ADMIN_PASSWORD.into()))
                .await
                .unwrap();
        }
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(bud_app::run(listener, state.clone(), shutdown.clone()));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let mut app = TestApp {
            url,
            master_key,
            state,
            http,
            admin_token: String::new(),
            shutdown,
            server,
            db,
        };
        if builtin {
            app.admin_token = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        }
        app
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
        self.db.cleanup().await;
    }

    /// Any request; `token` goes in `Authorization: Bearer`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request failed");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.call(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.call(Method::POST, path, Some(token), Some(body)).await
    }

    pub async fn login(&self, email: &str, password: &str) -> String {
        let r = self
            .call(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "login failed: {:?}", r.body);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    /// Creates a user with `role` and returns (id, access token).
    pub async fn user(&self, email: &str, role: &str) -> (String, String) {
        let password = "a long enough password";
        let r = self
            .post(
                "/users",
                &self.admin_token,
                json!({"email": email, "name": email, "role": role, "password": password}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        let id = r.body["id"].as_str().unwrap().to_owned();
        (id, self.login(email, password).await)
    }

    /// Creates a project as the admin and returns its id.
    pub async fn project(&self, name: &str) -> String {
        let r = self.post("/projects", &self.admin_token, json!({"name": name})).await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        r.body["id"].as_str().unwrap().to_owned()
    }

    pub async fn add_member(&self, project: &str, user_id: &str) {
        let r = self
            .post(
                &format!("/projects/{project}/members"),
                &self.admin_token,
                json!({"user_id": user_id}),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    }
}
