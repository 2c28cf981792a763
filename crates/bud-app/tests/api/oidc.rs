//! budapp in front of an outside OpenID provider (`IdentityMode::Oidc`): users provisioned on
//! first sight by (iss, sub), roles mapped from the token, keys discovered, cached and rotated.
//!
//! Two providers:
//! - `FakeKeycloak`, written here: a Keycloak-shaped discovery document and JWKS under
//!   `/realms/bud`, with tokens minted by the test from the committed test keys of bud-auth
//!   (`crates/bud-auth/tests/keys/`). Always runs.
//! - panva's `oidc-provider` on Node.js (`tests/oidc/provider.mjs`), which none of us wrote,
//!   issuing client-credentials JWTs. Runs when `BUD_TEST_OIDC_PROVIDER` is set, after
//!   `npm ci` in `tests/oidc`.
//!
//! budapp's verifier refreshes keys on an unknown kid at most once per refresh cooldown; these
//! tests set it to [`COOLDOWN`] and wait for it on the real clock.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bud_app::{AppConfig, IdentityMode, OidcSettings};
use bud_domain::Role;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio::net::TcpListener;

use crate::support::{Backend, Reply, TestApp};

/// Keycloak's issuer is the realm's URL.
const REALM: &str = "/realms/bud";

/// Keycloak subjects are UUIDs.
const ADA: &str = "5f0c3e9a-6a43-4f4e-9d1c-2b8f0d7f7a01";
const GRACE: &str = "a1d2f6c4-1b7e-4c55-8a0e-3f9e6c2d4b12";

// ---- keys and tokens ------------------------------------------------------------------------

/// A signing key of the provider, with its public half as published in the JWKS.
struct TestKey {
    kid: &'static str,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Value,
}

fn rsa_key() -> TestKey {
    TestKey {
        kid: "rsa-test-1",
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(include_bytes!(
            "../../../bud-auth/tests/keys/rsa_private.pem"
        ))
        .unwrap(),
        jwk: serde_json::from_str(include_str!("../../../bud-auth/tests/keys/rsa_public.jwk.json"))
            .unwrap(),
    }
}

fn ec_key() -> TestKey {
    TestKey {
        kid: "ec-test-1",
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(include_bytes!(
            "../../../bud-auth/tests/keys/ec_private.pem"
        ))
        .unwrap(),
        jwk: serde_json::from_str(include_str!("../../../bud-auth/tests/keys/ec_public.jwk.json"))
            .unwrap(),
    }
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let header =
        Header { kid: Some(key.kid.into()), typ: Some("JWT".into()), ..Header::new(key.alg) };
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

/// The claims of a Keycloak access token for subject `sub` (with Ada's profile) of realm `bud`,
/// logged in through the `bud` client, with `realm_roles` as the realm's role mappings (Keycloak
/// adds its own `default-roles-bud`, `offline_access` and `uma_authorization`).
fn keycloak_claims(issuer: &str, sub: &str, realm_roles: &[&str]) -> Value {
    let now = chrono::Utc::now().timestamp();
    json!({
        "exp": now + 300,
        "iat": now,
        "auth_time": now,
        "jti": uuid::Uuid::new_v4().to_string(),
        "iss": issuer,
        "aud": ["bud", "account"],
        "sub": sub,
        "typ": "Bearer",
        "azp": "bud",
        "sid": uuid::Uuid::new_v4().to_string(),
        "acr": "1",
        "allowed-origins": ["http://127.0.0.1:3000"],
        "realm_access": { "roles": realm_roles },
        "resource_access": { "account": { "roles": ["manage-account", "view-profile"] } },
        "scope": "openid email profile",
        "email_verified": true,
        "name": "Ada Lovelace",
        "preferred_username": "ada",
        "given_name": "Ada",
        "family_name": "Lovelace",
        "email": "ada@example.com",
    })
}

/// The same token with its payload rewritten (here: to claim the admin role) and the original
/// signature kept.
fn tampered(token: &str) -> String {
    let mut parts = token.split('.');
    let (header, payload, signature) =
        (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    claims["roles"] = json!(["bud-admin"]);
    claims["realm_access"] = json!({ "roles": ["bud-admin"] });
    let forged = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{header}.{forged}.{signature}")
}

// ---- a provider written here ----------------------------------------------------------------

/// What budapp sees of a Keycloak realm: discovery and certificates, with a JWKS the test can
/// change and a count of JWKS fetches.
#[derive(Clone)]
struct FakeKeycloak {
    issuer: String,
    jwks: Arc<RwLock<Value>>,
    jwks_fetches: Arc<AtomicUsize>,
}

impl FakeKeycloak {
    async fn spawn(key: &TestKey) -> FakeKeycloak {
        Self::serve(TcpListener::bind("127.0.0.1:0").await.unwrap(), key)
    }

    /// Serves on `listener` until the test's runtime ends.
    fn serve(listener: TcpListener, key: &TestKey) -> FakeKeycloak {
        let idp = FakeKeycloak {
            issuer: format!("http://{}{REALM}", listener.local_addr().unwrap()),
            jwks: Arc::new(RwLock::new(Value::Null)),
            jwks_fetches: Arc::new(AtomicUsize::new(0)),
        };
        idp.publish(key);
        let app = Router::new()
            .route(&format!("{REALM}/.well-known/openid-configuration"), get(discovery))
            .route(&format!("{REALM}/protocol/openid-connect/certs"), get(certs))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    /// Replaces the published signing key. Like Keycloak, the set also holds an encryption
    /// key, which budapp must skip.
    fn publish(&self, key: &TestKey) {
        let mut encryption = rsa_key().jwk;
        encryption["kid"] = json!("rsa-enc-1");
        encryption["use"] = json!("enc");
        encryption["alg"] = json!("RSA-OAEP");
        *self.jwks.write().unwrap() = json!({ "keys": [key.jwk, encryption] });
    }

    fn fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }
}

async fn discovery(State(idp): State<FakeKeycloak>) -> axum::Json<Value> {
    let base = format!("{}/protocol/openid-connect", idp.issuer);
    axum::Json(json!({
        "issuer": idp.issuer,
        "authorization_endpoint": format!("{base}/auth"),
        "token_endpoint": format!("{base}/token"),
        "userinfo_endpoint": format!("{base}/userinfo"),
        "end_session_endpoint": format!("{base}/logout"),
        "jwks_uri": format!("{base}/certs"),
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "scopes_supported": ["openid", "email", "profile", "roles"],
    }))
}

async fn certs(State(idp): State<FakeKeycloak>) -> axum::Json<Value> {
    idp.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    axum::Json(idp.jwks.read().unwrap().clone())
}

// ---- helpers --------------------------------------------------------------------------------

/// The key-set refresh cooldown these tests run with.
const COOLDOWN: Duration = Duration::from_secs(5);

fn oidc_config(issuer: &str, default_role: Role) -> AppConfig {
    AppConfig {
        identity: IdentityMode::Oidc(OidcSettings {
            issuer: issuer.to_owned(),
            jwks_uri: None,
            default_role,
            jwks_refresh_cooldown: COOLDOWN,
        }),
        audience: "bud".into(),
        ..AppConfig::default()
    }
}

/// Sends `token` to `/me` until the answer is not `waiting`, or a deadline just past the
/// verifier's refresh cooldown; returns the last answer.
async fn me_once_refreshed(app: &TestApp, token: &str, waiting: (StatusCode, &str)) -> Reply {
    let deadline = Instant::now() + COOLDOWN + Duration::from_secs(10);
    loop {
        let r = app.get("/me", token).await;
        if (r.status, r.code()) != waiting || Instant::now() > deadline {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn assert_user(r: &Reply, role: &str, email: &str, name: &str) {
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["role"], role, "{:?}", r.body);
    assert_eq!(r.body["email"], email, "{:?}", r.body);
    assert_eq!(r.body["name"], name, "{:?}", r.body);
    assert_eq!(r.body["external"], true, "{:?}", r.body);
    assert_eq!(r.body["disabled"], false, "{:?}", r.body);
}

// ---- Keycloak-shaped tokens -----------------------------------------------------------------

mod keycloak_users_are_provisioned_and_their_roles_synced {
    use super::*;

    #[tokio::test]
    async fn sqlite() {
        provisioning(Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn postgres() {
        if std::env::var("BUD_TEST_POSTGRES_URL").is_err() {
            eprintln!("skipped: BUD_TEST_POSTGRES_URL not set");
            return;
        }
        provisioning(Backend::Postgres).await;
    }
}

async fn provisioning(backend: Backend) {
    let rsa = rsa_key();
    let idp = FakeKeycloak::spawn(&rsa).await;
    let app = TestApp::spawn_with(backend, oidc_config(&idp.issuer, Role::Tester)).await;
    let keycloak_roles = ["default-roles-bud", "offline_access", "uma_authorization"];
    let token_with = |sub: &str, extra: &[&str]| {
        let roles: Vec<&str> = keycloak_roles.iter().chain(extra).copied().collect();
        sign(&rsa, &keycloak_claims(&idp.issuer, sub, &roles))
    };

    // First sight: provisioned with the role the realm maps, `bud-` prefix and all.
    let r = app.get("/me", &token_with(ADA, &["bud-devops"])).await;
    assert_user(&r, "devops", "ada@example.com", "Ada Lovelace");
    let ada_id = r.body["id"].clone();
    let again = app.get("/me", &token_with(ADA, &["bud-devops"])).await;
    assert_eq!(again.body["id"], ada_id, "the same (iss, sub) is the same user");

    // The realm's roles change: the next token brings them, down and then up.
    let r = app.get("/me", &token_with(ADA, &["developer"])).await;
    assert_user(&r, "developer", "ada@example.com", "Ada Lovelace");
    assert_eq!(r.body["id"], ada_id);
    let ada = token_with(ADA, &["bud-admin", "bud-tester"]);
    let r = app.get("/me", &ada).await;
    assert_user(&r, "admin", "ada@example.com", "Ada Lovelace");
    assert_eq!(r.body["id"], ada_id);

    // A colleague whose token names none of Bud's roles gets the configured default.
    let mut grace_claims = keycloak_claims(&idp.issuer, GRACE, &keycloak_roles);
    grace_claims["email"] = json!("grace@example.com");
    grace_claims["name"] = json!("Grace Hopper");
    let grace = sign(&rsa, &grace_claims);
    let r = app.get("/me", &grace).await;
    assert_user(&r, "tester", "grace@example.com", "Grace Hopper");
    let grace_id = r.body["id"].as_str().unwrap().to_owned();

    // Roles in a top-level array (Auth0-style), and neither email nor name: the login name
    // stands in for the name, and an address is made up from the subject and the issuer's host.
    let mut service = keycloak_claims(&idp.issuer, "svc-ingest", &[]);
    for claim in ["realm_access", "email", "name", "email_verified"] {
        service.as_object_mut().unwrap().remove(claim);
    }
    service["preferred_username"] = json!("ingest-bot");
    service["roles"] = json!(["bud-developer"]);
    let r = app.get("/me", &sign(&rsa, &service)).await;
    assert_user(&r, "developer", "svc-ingest@127.0.0.1", "ingest-bot");

    // Taking every Bud role away in the provider takes it away here: back to the default.
    let demoted = app.get("/me", &token_with(ADA, &[])).await;
    assert_user(&demoted, "tester", "ada@example.com", "Ada Lovelace");
    let r = app.get("/me", &ada).await;
    assert_user(&r, "admin", "ada@example.com", "Ada Lovelace");

    // Another identity claiming an email an account already has is provisioned all the same,
    // under an address derived from its identity, not locked out.
    let mut twin = keycloak_claims(&idp.issuer, "ada-twin", &["bud-tester"]);
    twin["email"] = json!("ada@example.com");
    let r = app.get("/me", &sign(&rsa, &twin)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_ne!(r.body["id"], ada_id);
    assert!(r.body["email"].as_str().unwrap().ends_with("@external.invalid"), "{:?}", r.body);
    // An unverified email is not taken at its word.
    let mut unverified = keycloak_claims(&idp.issuer, "mallory", &["bud-tester"]);
    unverified["email"] = json!("boss@example.com");
    unverified["email_verified"] = json!(false);
    let r = app.get("/me", &sign(&rsa, &unverified)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_ne!(r.body["email"], "boss@example.com");

    // Ada, admin by the provider's word, sees each user once, and the audit log says why
    // her role changed.
    let users = app.get("/users", &ada).await;
    assert_eq!(users.status, StatusCode::OK, "{:?}", users.body);
    let listed = users.body["data"].as_array().unwrap();
    assert_eq!(listed.len(), 5, "{listed:?}");
    assert!(listed.iter().all(|u| u["external"] == true), "no local admin in OIDC mode");
    let audit = app.get("/audit?action=user.role_sync", &ada).await;
    assert_eq!(audit.status, StatusCode::OK, "{:?}", audit.body);
    let syncs = audit.body["data"].as_array().unwrap();
    assert_eq!(syncs.len(), 4, "devops → developer → admin → tester → admin: {syncs:?}");
    assert!(syncs.iter().all(|e| e["resource_id"] == ada_id && e["actor"] == "system"));
    let audit = app.get("/audit?action=user.provision", &ada).await;
    assert_eq!(audit.body["data"].as_array().unwrap().len(), 5, "{:?}", audit.body);

    // Disabled in Bud, the provider's valid token no longer gets Grace in.
    let r = app
        .call(
            Method::PATCH,
            &format!("/users/{grace_id}"),
            Some(&ada),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = app.get("/me", &grace).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "account_disabled"));

    assert_eq!(idp.fetches(), 1, "every token verified with the keys fetched at start-up");
    app.stop().await;
}

#[tokio::test]
async fn token_problems_are_401s_and_provision_no_one() {
    let rsa = rsa_key();
    let idp = FakeKeycloak::spawn(&rsa).await;
    let app = TestApp::spawn_with(Backend::Sqlite, oidc_config(&idp.issuer, Role::Tester)).await;
    let good = keycloak_claims(&idp.issuer, ADA, &["bud-admin"]);
    let with = |claim: &str, value: Value| {
        let mut c = good.clone();
        c[claim] = value;
        sign(&rsa, &c)
    };
    let ec = ec_key();
    let naming_rsa = |alg| Header { kid: Some(rsa.kid.into()), ..Header::new(alg) };
    let rsa_public_pem = include_bytes!("../../../bud-auth/tests/keys/rsa_public.pem");

    let cases = [
        (
            "for another client of the realm",
            with("aud", json!(["account", "grafana"])),
            "audience_mismatch",
        ),
        (
            "from another realm",
            with("iss", json!(idp.issuer.replace(REALM, "/realms/other"))),
            "issuer_mismatch",
        ),
        ("expired", with("exp", json!(chrono::Utc::now().timestamp() - 3600)), "token_expired"),
        ("with a rewritten payload", tampered(&sign(&rsa, &good)), "token_invalid"),
        (
            "signed with another key while naming the published one",
            jsonwebtoken::encode(&naming_rsa(Algorithm::ES256), &good, &ec.encoding).unwrap(),
            "token_invalid",
        ),
        (
            "signed with the published RSA key as an HMAC secret",
            jsonwebtoken::encode(
                &naming_rsa(Algorithm::HS256),
                &good,
                &EncodingKey::from_secret(rsa_public_pem),
            )
            .unwrap(),
            "token_invalid",
        ),
        // Within the refresh cooldown, so not even a JWKS fetch.
        (
            "naming a kid never published",
            sign(&TestKey { kid: "gone", ..ec_key() }, &good),
            "unknown_key",
        ),
    ];
    for (what, token, code) in cases {
        let r = app.get("/me", &token).await;
        assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, code), "{what}: {:?}", r.body);
    }

    assert_eq!(app.state.store.count_users().await.unwrap(), 0, "no refused token provisions");
    assert_eq!(idp.fetches(), 1);
    app.stop().await;
}

#[tokio::test]
async fn local_login_is_refused_with_an_external_provider() {
    let rsa = rsa_key();
    let idp = FakeKeycloak::spawn(&rsa).await;
    let app = TestApp::spawn_with(Backend::Sqlite, oidc_config(&idp.issuer, Role::Tester)).await;
    assert!(app.admin_token.is_empty(), "no built-in admin with an external provider");

    let login = json!({"email": "ada@example.com", "password": "correct horse battery"});
    let r = app.call(Method::POST, "/auth/login", None, Some(login)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "action_refused"), "{:?}", r.body);
    let refresh = json!({"refresh_token": "bud_rt_0000"});
    let r = app.call(Method::POST, "/auth/refresh", None, Some(refresh)).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "action_refused"), "{:?}", r.body);

    // Even the provider's admin cannot create local accounts.
    let admin = sign(&rsa, &keycloak_claims(&idp.issuer, ADA, &["bud-admin"]));
    let user = json!({
        "email": "x@example.com", "name": "X", "role": "tester", "password": "a long enough password",
    });
    let r = app.post("/users", &admin, user).await;
    assert_eq!((r.status, r.code()), (StatusCode::FORBIDDEN, "action_refused"), "{:?}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_in_key_verifies_after_one_jwks_refresh() {
    let (rsa, ec) = (rsa_key(), ec_key());
    let idp = FakeKeycloak::spawn(&rsa).await;
    let app = TestApp::spawn_with(Backend::Sqlite, oidc_config(&idp.issuer, Role::Tester)).await;
    let claims = keycloak_claims(&idp.issuer, ADA, &["bud-devops"]);
    let before = sign(&rsa, &claims);
    assert_eq!(app.get("/me", &before).await.status, StatusCode::OK);
    assert_eq!(idp.fetches(), 1);

    // The realm rotates to an EC key and drops the RSA one.
    idp.publish(&ec);
    let after = sign(&ec, &claims);
    let r = app.get("/me", &after).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::UNAUTHORIZED, "unknown_key"),
        "inside the cooldown"
    );
    let r = me_once_refreshed(&app, &after, (StatusCode::UNAUTHORIZED, "unknown_key")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["role"], "devops");
    assert_eq!(
        idp.fetches(),
        2,
        "two unknown-kid tokens a second through the cooldown: one refresh"
    );

    // The refresh also dropped the retired key.
    let r = app.get("/me", &before).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "unknown_key"), "{:?}", r.body);
    app.stop().await;
}

#[tokio::test]
async fn a_provider_down_at_start_up_does_not_stop_budapp() {
    // A port with nothing listening: bound, noted and released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let issuer = format!("http://127.0.0.1:{port}{REALM}");
    let app = TestApp::spawn_with(Backend::Sqlite, oidc_config(&issuer, Role::Tester)).await;
    assert_eq!(app.call(Method::GET, "/healthz", None, None).await.status, StatusCode::OK);

    let rsa = rsa_key();
    let token = sign(&rsa, &keycloak_claims(&issuer, ADA, &["bud-devops"]));
    // No keys yet: the token may be fine, so this is the server's trouble, not the client's.
    let r = app.get("/me", &token).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "identity_provider_unavailable")
    );

    let idp = FakeKeycloak::serve(TcpListener::bind(("127.0.0.1", port)).await.unwrap(), &rsa);
    assert_eq!(idp.issuer, issuer);
    let r = me_once_refreshed(
        &app,
        &token,
        (StatusCode::SERVICE_UNAVAILABLE, "identity_provider_unavailable"),
    )
    .await;
    assert_user(&r, "devops", "ada@example.com", "Ada Lovelace");
    assert_eq!(idp.fetches(), 1);
    app.stop().await;
}

// ---- a provider none of us wrote ------------------------------------------------------------

/// The confidential client `tests/oidc/provider.mjs` registers.
const CI_CLIENT_ID: &str = "bud-ci";
const CI_CLIENT_SECRET: &str = "bud-ci-secret-not-for-production";

#[tokio::test]
async fn a_real_provider_s_client_credentials_token_is_accepted() {
    if std::env::var_os("BUD_TEST_OIDC_PROVIDER").is_none() {
        eprintln!("skipped: BUD_TEST_OIDC_PROVIDER not set");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/oidc/provider.mjs");
    let mut node = tokio::process::Command::new("node")
        .arg(script)
        .arg("0")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting `node`: is Node.js installed?");
    let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let issuer = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(issuer) = line.strip_prefix("READY ") {
                return issuer.trim().to_owned();
            }
        }
        panic!("provider.mjs exited before READY: did `npm ci` run in tests/oidc?")
    })
    .await
    .expect("provider.mjs printed no READY within 30 s");
    // Keep reading, so the provider never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let app = TestApp::spawn_with(Backend::Sqlite, oidc_config(&issuer, Role::Tester)).await;
    let discovery: Value = app
        .http
        .get(format!("{issuer}/.well-known/openid-configuration"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token_endpoint = discovery["token_endpoint"].as_str().unwrap();
    let response = app
        .http
        .post(token_endpoint)
        .basic_auth(CI_CLIENT_ID, Some(CI_CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials"), ("resource", "urn:bud")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let grant: Value = response.json().await.unwrap();
    let token = grant["access_token"].as_str().unwrap();

    // No email and no name in a client-credentials token: both are made up.
    let r = app.get("/me", token).await;
    assert_user(&r, "developer", "bud-ci@127.0.0.1", CI_CLIENT_ID);
    let stored = app.state.store.user_by_subject(&issuer, CI_CLIENT_ID).await.unwrap().unwrap();
    assert_eq!(r.body["id"], stored.id.to_string());
    assert_eq!(app.get("/me", token).await.body["id"], r.body["id"]);

    let r = app.get("/me", &tampered(token)).await;
    assert_eq!((r.status, r.code()), (StatusCode::UNAUTHORIZED, "token_invalid"), "{:?}", r.body);
    app.stop().await;
    node.kill().await.unwrap();
}
