//! The guide's §2.1: every token problem is a 401 with a reason code, never a 500; login,
//! refresh rotation with reuse detection, logout, rate limiting.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bud_app::AppConfig;
use bud_auth::jwt::{AccessClaims, Issuer, generate_signing_key};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_backends;
use crate::support::{ADMIN_EMAIL, ADMIN_PASSWORD, Backend, TestApp};

fn claims(app: &TestApp, exp_offset: i64, nbf_offset: i64) -> AccessClaims {
    let now = chrono::Utc::now().timestamp();
    let admin_id = app_admin_id(app);
    AccessClaims {
        iss: app.url.clone(),
        sub: admin_id,
        aud: "bud".into(),
        exp: now + exp_offset,
        nbf: now + nbf_offset,
        iat: now,
        jti: uuid::Uuid::now_v7().to_string(),
        email: Some(ADMIN_EMAIL.into()),
        name: None,
        roles: vec!["admin".into()],
    }
}

fn app_admin_id(app: &TestApp) -> String {
    let token = &app.admin_token;
    let payload = token.split('.').nth(1).unwrap();
    let v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    v["sub"].as_str().unwrap().to_owned()
}

fn mint(app: &TestApp, c: &AccessClaims) -> String {
    app.state.issuer.as_ref().unwrap().mint(c).unwrap()
}

/// The server's own signing key, read back from the store, minting for another issuer URL or
/// audience: a correctly signed token with the wrong `iss` or `aud`.
async fn issuer_with(app: &TestApp, iss: &str, aud: &str) -> Issuer {
    let stored = app.state.store.signing_keys().await.unwrap().remove(0);
    let der = app
        .state
        .keyring
        .decrypt(&stored.private_key_ciphertext, format!("signing-key:{}", stored.kid).as_bytes())
        .unwrap();
    Issuer::new(iss.into(), aud.into(), bud_auth::jwt::signing_key_from_pkcs8(&der).unwrap())
}

async fn status_of(app: &TestApp, token: &str) -> (StatusCode, String) {
    let r = app.get("/me", token).await;
    if r.status == StatusCode::UNAUTHORIZED {
        assert!(r.headers.contains_key("www-authenticate"), "401 without a challenge");
        assert!(r.body["error"]["request_id"].as_str().is_some_and(|s| !s.is_empty()));
    }
    (r.status, r.code().to_owned())
}

async fn every_token_problem_is_a_401_with_its_reason(app: &TestApp) {
    let unauthorized = StatusCode::UNAUTHORIZED;
    let r = app.call(Method::GET, "/me", None, None).await;
    assert_eq!((r.status, r.code()), (unauthorized, "missing_token"));
    assert_eq!(status_of(app, "not-a-jwt").await, (unauthorized, "malformed".into()));
    assert_eq!(status_of(app, "a.b.c").await, (unauthorized, "malformed".into()));
    assert_eq!(status_of(app, &"x".repeat(9 * 1024)).await, (unauthorized, "malformed".into()));

    // exp and nbf against the 60 s leeway, just inside and just outside.
    assert_eq!(status_of(app, &mint(app, &claims(app, -50, -100))).await.0, StatusCode::OK);
    assert_eq!(
        status_of(app, &mint(app, &claims(app, -70, -100))).await,
        (unauthorized, "token_expired".into())
    );
    assert_eq!(status_of(app, &mint(app, &claims(app, 600, 50))).await.0, StatusCode::OK);
    assert_eq!(
        status_of(app, &mint(app, &claims(app, 600, 70))).await,
        (unauthorized, "token_invalid".into())
    );

    let mut wrong_aud = claims(app, 600, 0);
    wrong_aud.aud = "someone-else".into();
    let token = issuer_with(app, &app.url, "someone-else").await.mint(&wrong_aud).unwrap();
    assert_eq!(status_of(app, &token).await, (unauthorized, "audience_mismatch".into()));
    let mut wrong_iss = claims(app, 600, 0);
    wrong_iss.iss = "https://evil.example.com".into();
    let token = issuer_with(app, "https://evil.example.com", "bud").await.mint(&wrong_iss).unwrap();
    assert_eq!(status_of(app, &token).await, (unauthorized, "issuer_mismatch".into()));

    // Signed by a key this server never published.
    let stranger = Issuer::new(app.url.clone(), "bud".into(), generate_signing_key());
    assert_eq!(
        status_of(app, &stranger.mint(&claims(app, 600, 0)).unwrap()).await,
        (unauthorized, "unknown_key".into())
    );

    // alg: none, with the server's own kid.
    let kid = header_of(&app.admin_token)["kid"].as_str().unwrap().to_owned();
    let none_header =
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT", "kid": kid}).to_string());
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_string(&claims(app, 600, 0)).unwrap());
    let (status, code) = status_of(app, &format!("{none_header}.{body}.")).await;
    assert_eq!(status, unauthorized);
    assert!(code == "token_invalid" || code == "malformed", "{code}");

    // HS256 keyed with the server's public key: the classic algorithm-confusion attack.
    let jwks = app.call(Method::GET, "/.well-known/jwks.json", None, None).await;
    let x = jwks.body["keys"][0]["x"].as_str().unwrap().to_owned();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some(kid);
    for secret in [URL_SAFE_NO_PAD.decode(&x).unwrap(), x.into_bytes()] {
        let forged = jsonwebtoken::encode(
            &header,
            &claims(app, 600, 0),
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap();
        assert_eq!(status_of(app, &forged).await, (unauthorized, "token_invalid".into()));
    }

    // A valid token whose signature was altered.
    let valid = mint(app, &claims(app, 600, 0));
    let (head, sig) = valid.rsplit_once('.').unwrap();
    let flipped =
        if sig.starts_with('A') { sig.replacen('A', "B", 1) } else { format!("A{}", &sig[1..]) };
    assert_eq!(
        status_of(app, &format!("{head}.{flipped}")).await,
        (unauthorized, "token_invalid".into())
    );
}
both_backends!(every_token_problem_is_a_401_with_its_reason);

fn header_of(token: &str) -> Value {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap())
        .unwrap()
}

async fn refresh_rotates_and_reuse_revokes_the_family(app: &TestApp) {
    let login = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
        )
        .await;
    let first = login.body["refresh_token"].as_str().unwrap().to_owned();
    let rotated =
        app.call(Method::POST, "/auth/refresh", None, Some(json!({"refresh_token": first}))).await;
    assert_eq!(rotated.status, StatusCode::OK, "{:?}", rotated.body);
    let second = rotated.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(first, second);
    assert_eq!(
        status_of(app, rotated.body["access_token"].as_str().unwrap()).await.0,
        StatusCode::OK
    );

    let reused =
        app.call(Method::POST, "/auth/refresh", None, Some(json!({"refresh_token": first}))).await;
    assert_eq!((reused.status, reused.code()), (StatusCode::UNAUTHORIZED, "refresh_token_reused"));
    let after =
        app.call(Method::POST, "/auth/refresh", None, Some(json!({"refresh_token": second}))).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED, "the whole family is revoked");

    let login = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD})),
        )
        .await;
    let token = login.body["refresh_token"].as_str().unwrap().to_owned();
    let out =
        app.call(Method::POST, "/auth/logout", None, Some(json!({"refresh_token": token}))).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    let after =
        app.call(Method::POST, "/auth/refresh", None, Some(json!({"refresh_token": token}))).await;
    assert_eq!((after.status, after.code()), (StatusCode::UNAUTHORIZED, "token_invalid"));
}
both_backends!(refresh_rotates_and_reuse_revokes_the_family);

async fn wrong_password_and_disabled_accounts(app: &TestApp) {
    let bad = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"email": ADMIN_EMAIL, "password": "nope nope nope"})),
        )
        .await;
    assert_eq!((bad.status, bad.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));
    let unknown = app
        .call(
            Method::POST,
            "/auth/login",
            None,
            Some(json!({"email": "ghost@x.io", "password": "nope nope nope"})),
        )
        .await;
    assert_eq!((unknown.status, unknown.code()), (StatusCode::UNAUTHORIZED, "invalid_credentials"));

    let (id, token) = app.user("temp@example.com", "tester").await;
    let r = app
        .call(
            Method::PATCH,
            &format!("/users/{id}"),
            Some(&app.admin_token),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(status_of(app, &token).await, (StatusCode::UNAUTHORIZED, "account_disabled".into()));
}
both_backends!(wrong_password_and_disabled_accounts);

#[tokio::test]
async fn login_attempts_are_rate_limited_per_account() {
    let config = AppConfig { login_per_account_per_minute: 3, ..AppConfig::default() };
    let app = TestApp::spawn_with(Backend::Sqlite, config).await;
    // The spawn logged in once already.
    let mut last = None;
    for _ in 0..3 {
        last = Some(
            app.call(
                Method::POST,
                "/auth/login",
                None,
                Some(json!({"email": ADMIN_EMAIL, "password": "wrong password!"})),
            )
            .await,
        );
    }
    let last = last.unwrap();
    assert_eq!((last.status, last.code()), (StatusCode::TOO_MANY_REQUESTS, "rate_limited"));
    let retry: u64 = last.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    app.stop().await;
}

#[tokio::test]
async fn discovery_and_jwks_are_published() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let d = app.call(Method::GET, "/.well-known/openid-configuration", None, None).await;
    assert_eq!(d.status, StatusCode::OK);
    assert_eq!(d.body["issuer"], app.url.as_str());
    let jwks_uri = d.body["jwks_uri"].as_str().unwrap().to_owned();
    let jwks: Value = app.http.get(&jwks_uri).send().await.unwrap().json().await.unwrap();
    assert_eq!(jwks["keys"][0]["kid"], header_of(&app.admin_token)["kid"]);
    app.stop().await;
}
