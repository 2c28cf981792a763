//! Token verification end to end: tokens signed with real RSA, EC and Ed25519 keys, checked by a
//! verifier with static keys or fetching them from a fake identity provider on loopback.
#![expect(
    clippy::unwrap_used,
    reason = "helpers outside #[test] fns panic on broken fixtures, as the tests themselves do"
)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bud_auth::jwt::{
    Issuer, KeySource, TokenError, TokenVerifier, VerifierConfig, discovery_document,
    generate_signing_key, jwk_set,
};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISS: &str = "https://id.example/realms/bud";
const AUD: &str = "bud";

// ---------------------------------------------------------------------------------------------
// Keys and tokens

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Wait until early in a wall-clock second, so a test that computes `now` and then verifies
/// does both within the same second; leeway boundaries one second apart stay deterministic.
async fn start_of_a_second() {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_millis();
    if millis > 300 {
        tokio::time::sleep(Duration::from_millis(u64::from(1005 - millis))).await;
    }
}

struct TestKey {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    jwk: Jwk,
}

fn rsa_key() -> TestKey {
    TestKey {
        kid: "rsa-test-1".into(),
        alg: Algorithm::RS256,
        encoding: EncodingKey::from_rsa_pem(include_bytes!("keys/rsa_private.pem")).unwrap(),
        jwk: serde_json::from_str(include_str!("keys/rsa_public.jwk.json")).unwrap(),
    }
}

fn ec_key() -> TestKey {
    TestKey {
        kid: "ec-test-1".into(),
        alg: Algorithm::ES256,
        encoding: EncodingKey::from_ec_pem(include_bytes!("keys/ec_private.pem")).unwrap(),
        jwk: serde_json::from_str(include_str!("keys/ec_public.jwk.json")).unwrap(),
    }
}

/// A fresh Ed25519 key straight from ed25519-dalek, independent of the crate's issuer code.
fn ed_key(kid: &str) -> TestKey {
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    TestKey {
        kid: kid.into(),
        alg: Algorithm::EdDSA,
        encoding: EncodingKey::from_ed_der(key.to_pkcs8_der().unwrap().as_bytes()),
        jwk: serde_json::from_value(
            json!({"kty": "OKP", "crv": "Ed25519", "use": "sig", "kid": kid, "x": x}),
        )
        .unwrap(),
    }
}

fn claims_for(iss: &str) -> Value {
    let now = now();
    json!({
        "iss": iss, "aud": AUD, "sub": "user-1", "iat": now, "nbf": now - 5, "exp": now + 300,
        "jti": "t-1", "email": "ada@example.com", "name": "Ada", "roles": ["developer"],
    })
}

fn claims() -> Value {
    claims_for(ISS)
}

/// `claims()` with some fields replaced; a `null` value removes the field.
fn claims_with(changes: Value) -> Value {
    let mut c = claims();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn sign(key: &TestKey, claims: &Value) -> String {
    let header = Header { kid: Some(key.kid.clone()), ..Header::new(key.alg) };
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

fn sign_without_kid(key: &TestKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(key.alg), claims, &key.encoding).unwrap()
}

fn part(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn static_verifier(keys: Vec<Jwk>) -> TokenVerifier {
    let set = Arc::new(RwLock::new(JwkSet { keys }));
    TokenVerifier::new(VerifierConfig::new(ISS, AUD), KeySource::Static(set))
}

fn all_keys_verifier() -> TokenVerifier {
    static_verifier(vec![rsa_key().jwk, ec_key().jwk])
}

fn invalid_containing(result: Result<bud_auth::jwt::VerifiedClaims, TokenError>, text: &str) {
    match result {
        Err(TokenError::Invalid(m)) => assert!(m.contains(text), "{m:?} lacks {text:?}"),
        other => panic!("expected Invalid({text}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Static keys

#[tokio::test]
async fn valid_tokens_of_each_algorithm_are_accepted() {
    let ed = ed_key("ed-1");
    let verifier = static_verifier(vec![rsa_key().jwk, ec_key().jwk, ed.jwk.clone()]);
    for key in [rsa_key(), ec_key(), ed] {
        let verified = verifier.verify(&sign(&key, &claims())).await;
        let verified = verified.unwrap_or_else(|e| panic!("{:?}: {e:?}", key.alg));
        assert_eq!(verified.issuer, ISS);
        assert_eq!(verified.subject, "user-1");
        assert_eq!(verified.email.as_deref(), Some("ada@example.com"));
        assert_eq!(verified.name.as_deref(), Some("Ada"));
        assert_eq!(verified.roles, ["developer"]);
        assert_eq!(verified.token_id.as_deref(), Some("t-1"));
        assert_eq!(verified.expires_at, claims()["exp"].as_i64().unwrap());
    }
}

#[tokio::test]
async fn alg_none_is_rejected() {
    let verifier = all_keys_verifier();
    for alg in ["none", "None", "NONE"] {
        let header = part(&json!({"alg": alg, "typ": "JWT", "kid": "rsa-test-1"}));
        let token = format!("{header}.{}.", part(&claims()));
        invalid_containing(verifier.verify(&token).await, "not accepted");
    }
}

#[tokio::test]
async fn hs256_signed_with_the_rsa_public_key_is_rejected() {
    let verifier = all_keys_verifier();
    let public_pem = include_bytes!("keys/rsa_public.pem");
    for kid in [Some("rsa-test-1".to_owned()), None] {
        let header = Header { kid, ..Header::new(Algorithm::HS256) };
        let secret = EncodingKey::from_secret(public_pem);
        let token = jsonwebtoken::encode(&header, &claims(), &secret).unwrap();
        invalid_containing(verifier.verify(&token).await, "algorithm HS256 not accepted");
    }
}

#[tokio::test]
async fn algorithm_must_fit_the_key_type() {
    // An ES256 token naming the RSA key's kid: the kid is known, but the key cannot be an EC key.
    let verifier = all_keys_verifier();
    let ec = ec_key();
    let liar = TestKey { kid: "rsa-test-1".into(), ..ec };
    invalid_containing(verifier.verify(&sign(&liar, &claims())).await, "does not fit");
}

#[tokio::test]
async fn wrong_issuer_and_audience() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    let cases = [
        (json!({"iss": "https://evil.example"}), TokenError::IssuerMismatch),
        (json!({"iss": format!("{ISS}/")}), TokenError::IssuerMismatch),
        (json!({"iss": null}), TokenError::IssuerMismatch),
        (json!({"aud": "other"}), TokenError::AudienceMismatch),
        (json!({"aud": ["other", "account"]}), TokenError::AudienceMismatch),
        (json!({"aud": null}), TokenError::AudienceMismatch),
    ];
    for (change, expected) in cases {
        let result = verifier.verify(&sign(&rsa, &claims_with(change.clone()))).await;
        assert_eq!(result, Err(expected), "{change}");
    }
    let multi = claims_with(json!({"aud": ["account", AUD]}));
    assert!(verifier.verify(&sign(&rsa, &multi)).await.is_ok());
}

#[tokio::test]
async fn exp_is_checked_with_leeway() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    start_of_a_second().await;
    let inside = sign(&rsa, &claims_with(json!({"exp": now() - 59})));
    let outside = sign(&rsa, &claims_with(json!({"exp": now() - 61})));
    assert!(verifier.verify(&inside).await.is_ok());
    assert_eq!(verifier.verify(&outside).await, Err(TokenError::Expired));
    let missing = sign(&rsa, &claims_with(json!({"exp": null})));
    invalid_containing(verifier.verify(&missing).await, "exp");
    let not_a_number = sign(&rsa, &claims_with(json!({"exp": "tomorrow"})));
    invalid_containing(verifier.verify(&not_a_number).await, "exp");
}

#[tokio::test]
async fn nbf_is_checked_with_leeway() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    start_of_a_second().await;
    let inside = sign(&rsa, &claims_with(json!({"nbf": now() + 59})));
    let outside = sign(&rsa, &claims_with(json!({"nbf": now() + 61})));
    assert!(verifier.verify(&inside).await.is_ok());
    invalid_containing(verifier.verify(&outside).await, "token not yet valid");
}

#[tokio::test]
async fn checks_run_in_the_documented_order() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    // Expired beats wrong issuer and audience.
    let expired_elsewhere = claims_with(json!({"exp": now() - 3600, "iss": "x", "aud": "y"}));
    assert_eq!(verifier.verify(&sign(&rsa, &expired_elsewhere)).await, Err(TokenError::Expired));
    // Wrong issuer beats wrong audience.
    let both_wrong = claims_with(json!({"iss": "x", "aud": "y"}));
    assert_eq!(verifier.verify(&sign(&rsa, &both_wrong)).await, Err(TokenError::IssuerMismatch));
    // A bad signature beats everything in the claims.
    let token = sign(&rsa, &expired_elsewhere);
    let (head, _) = token.rsplit_once('.').unwrap();
    let forged = format!("{head}.{}", sign(&rsa, &claims()).rsplit_once('.').unwrap().1);
    invalid_containing(verifier.verify(&forged).await, "signature");
}

#[tokio::test]
async fn tampered_tokens_are_invalid() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    let token = sign(&rsa, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let promoted = part(&claims_with(json!({"roles": ["admin"]})));
    let tampered = format!("{}.{promoted}.{}", parts[0], parts[2]);
    invalid_containing(verifier.verify(&tampered).await, "signature");
}

#[tokio::test]
async fn oversized_and_garbage_tokens_are_malformed() {
    let verifier = all_keys_verifier();
    let rsa = rsa_key();
    let padding = "x".repeat(9 * 1024);
    let oversized = sign(&rsa, &claims_with(json!({ "padding": padding })));
    assert!(oversized.len() > 9 * 1024);
    assert!(matches!(verifier.verify(&oversized).await, Err(TokenError::Malformed(_))));
    for garbage in ["", "garbage", "a.b", "a.b.c", "....", "eyJ.eyJ.sig", "Bearer abc.def.ghi"] {
        let result = verifier.verify(garbage).await;
        assert!(matches!(result, Err(TokenError::Malformed(_))), "{garbage:?}: {result:?}");
    }
}

#[tokio::test]
async fn keycloak_shaped_claims_parse() {
    let verifier = all_keys_verifier();
    let now = now();
    let keycloak = json!({
        "exp": now + 300, "iat": now, "auth_time": now, "jti": "0f1e2d3c",
        "iss": ISS, "aud": ["realm-management", AUD, "account"], "sub": "f81d4fae-7dec",
        "typ": "Bearer", "azp": "bud-ui", "session_state": "abc", "acr": "1",
        "realm_access": {"roles": ["offline_access", "admin", "uma_authorization"]},
        "resource_access": {"account": {"roles": ["manage-account"]}},
        "scope": "openid email profile", "email_verified": true,
        "preferred_username": "ada", "email": "ada@example.com", "roles": ["admin", "developer"],
    });
    let verified = verifier.verify(&sign(&rsa_key(), &keycloak)).await.unwrap();
    assert_eq!(verified.subject, "f81d4fae-7dec");
    assert_eq!(verified.name.as_deref(), Some("ada"));
    assert_eq!(verified.email.as_deref(), Some("ada@example.com"));
    assert_eq!(verified.roles, ["offline_access", "admin", "uma_authorization", "developer"]);
    assert_eq!(verified.token_id.as_deref(), Some("0f1e2d3c"));
    assert_eq!(verified.expires_at, now + 300);
}

#[tokio::test]
async fn token_without_kid_needs_exactly_one_fitting_key() {
    let rsa = rsa_key();
    let one_rsa = static_verifier(vec![rsa.jwk.clone(), ec_key().jwk]);
    assert!(one_rsa.verify(&sign_without_kid(&rsa, &claims())).await.is_ok());

    let mut other_rsa = rsa.jwk.clone();
    other_rsa.common.key_id = Some("rsa-test-2".into());
    let two_rsa = static_verifier(vec![rsa.jwk.clone(), other_rsa]);
    invalid_containing(two_rsa.verify(&sign_without_kid(&rsa, &claims())).await, "2 keys");

    let no_rsa = static_verifier(vec![ec_key().jwk]);
    invalid_containing(no_rsa.verify(&sign_without_kid(&rsa, &claims())).await, "no key fits");
}

#[tokio::test]
async fn unknown_kid_with_static_keys() {
    let verifier = static_verifier(vec![ec_key().jwk]);
    let result = verifier.verify(&sign(&rsa_key(), &claims())).await;
    assert_eq!(result, Err(TokenError::UnknownKey("rsa-test-1".into())));
    assert_eq!(verifier.refresh().await, Ok(()));
}

#[tokio::test]
async fn built_in_issuer_round_trips_and_rotates() {
    let first = generate_signing_key();
    let issuer = Issuer::new(ISS.into(), AUD.into(), first.clone());
    let keys = Arc::new(RwLock::new(jwk_set(std::slice::from_ref(&first.public_jwk))));
    let verifier =
        TokenVerifier::new(VerifierConfig::new(ISS, AUD), KeySource::Static(keys.clone()));

    let claims = issuer.access_claims(
        "user-7".into(),
        Some("grace@example.com".into()),
        Some("Grace".into()),
        vec!["admin".into()],
        chrono::Utc::now(),
        Duration::from_secs(900),
    );
    let token = issuer.mint(&claims).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), Some(first.kid.as_str()));
    assert_eq!(header.typ.as_deref(), Some("JWT"));

    let verified = verifier.verify(&token).await.unwrap();
    assert_eq!(verified.subject, "user-7");
    assert_eq!(verified.email.as_deref(), Some("grace@example.com"));
    assert_eq!(verified.name.as_deref(), Some("Grace"));
    assert_eq!(verified.roles, ["admin"]);
    assert_eq!(verified.expires_at, claims.exp);
    assert_eq!(verified.token_id, Some(claims.jti.clone()));

    // Rotation: publish the new key beside the old, then sign with it; old tokens still verify.
    let second = generate_signing_key();
    *keys.write().unwrap() = jwk_set(&[second.public_jwk.clone(), first.public_jwk.clone()]);
    let rotated = Issuer::new(ISS.into(), AUD.into(), second.clone());
    assert!(verifier.verify(&rotated.mint(&claims).unwrap()).await.is_ok());
    assert!(verifier.verify(&token).await.is_ok());
    // Retire the old key: its tokens are now unknown.
    *keys.write().unwrap() = jwk_set(&[second.public_jwk]);
    assert_eq!(verifier.verify(&token).await, Err(TokenError::UnknownKey(first.kid)));
}

// ---------------------------------------------------------------------------------------------
// Remote keys from a fake identity provider

/// A fake identity provider: a discovery document and a JWKS whose contents, issuer and health
/// the test controls, counting JWKS requests.
#[derive(Clone)]
struct Idp {
    base: String,
    jwks: Arc<RwLock<Value>>,
    doc_issuer: Arc<RwLock<Option<String>>>,
    failing: Arc<AtomicBool>,
    jwks_hits: Arc<AtomicUsize>,
}

impl Idp {
    async fn spawn(keys: &[&Jwk]) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Idp {
            base: format!("http://{}", listener.local_addr().unwrap()),
            jwks: Arc::new(RwLock::new(json!({ "keys": keys }))),
            doc_issuer: Arc::new(RwLock::new(None)),
            failing: Arc::new(AtomicBool::new(false)),
            jwks_hits: Arc::new(AtomicUsize::new(0)),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(idp.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        idp
    }

    fn set_keys(&self, keys: &[&Jwk]) {
        *self.jwks.write().unwrap() = json!({ "keys": keys });
    }

    fn hits(&self) -> usize {
        self.jwks_hits.load(Ordering::SeqCst)
    }

    fn verifier(&self, cooldown: Duration) -> TokenVerifier {
        let cfg =
            VerifierConfig { refresh_cooldown: cooldown, ..VerifierConfig::new(&self.base, AUD) };
        TokenVerifier::new(cfg, KeySource::Remote { jwks_uri: None, http: http() })
    }
}

async fn discovery(State(idp): State<Idp>) -> Response {
    let issuer = idp.doc_issuer.read().unwrap().clone().unwrap_or_else(|| idp.base.clone());
    let jwks_uri = format!("{}/jwks", idp.base);
    let token_endpoint = format!("{}/token", idp.base);
    axum::Json(discovery_document(&issuer, &jwks_uri, &token_endpoint)).into_response()
}

async fn jwks(State(idp): State<Idp>) -> Response {
    idp.jwks_hits.fetch_add(1, Ordering::SeqCst);
    if idp.failing.load(Ordering::SeqCst) {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    // Hold the response a moment so concurrent verifications really overlap the fetch.
    tokio::time::sleep(Duration::from_millis(50)).await;
    axum::Json(idp.jwks.read().unwrap().clone()).into_response()
}

/// No proxy: the fake provider is on loopback, and a proxy from the environment must not see it.
fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn remote_keys_are_discovered_fetched_and_used() {
    let rsa = rsa_key();
    let idp = Idp::spawn(&[&rsa.jwk, &ec_key().jwk]).await;
    let verifier = idp.verifier(Duration::from_secs(30));
    verifier.refresh().await.unwrap();
    assert_eq!(idp.hits(), 1);
    for _ in 0..3 {
        let verified = verifier.verify(&sign(&rsa, &claims_for(&idp.base))).await.unwrap();
        assert_eq!(verified.issuer, idp.base);
    }
    assert_eq!(idp.hits(), 1, "known kids are served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unknown_kid_fetches_once_per_cooldown_under_concurrency() {
    let rsa = rsa_key();
    let idp = Idp::spawn(&[&rsa.jwk]).await;
    let verifier = idp.verifier(Duration::from_secs(30));
    let stranger = ed_key("stranger");
    let token = sign(&stranger, &claims_for(&idp.base));

    for round in 0..2 {
        let tasks: Vec<_> = (0..20)
            .map(|_| {
                let (verifier, token) = (verifier.clone(), token.clone());
                tokio::spawn(async move { verifier.verify(&token).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Err(TokenError::UnknownKey("stranger".into())));
        }
        assert_eq!(idp.hits(), 1, "round {round}");
    }
    // The one fetch also brought the known key.
    assert!(verifier.verify(&sign(&rsa, &claims_for(&idp.base))).await.is_ok());
    assert_eq!(idp.hits(), 1);
}

#[tokio::test]
async fn rotated_key_triggers_a_refresh_and_verifies() {
    let old = ed_key("2024");
    let new = ed_key("2025");
    let idp = Idp::spawn(&[&old.jwk]).await;
    let cooldown = Duration::from_millis(200);
    let verifier = idp.verifier(cooldown);

    assert!(verifier.verify(&sign(&old, &claims_for(&idp.base))).await.is_ok());
    assert_eq!(idp.hits(), 1);

    idp.set_keys(&[&new.jwk]);
    tokio::time::sleep(cooldown + Duration::from_millis(50)).await;
    let verified = verifier.verify(&sign(&new, &claims_for(&idp.base))).await;
    assert!(verified.is_ok(), "{verified:?}");
    assert_eq!(idp.hits(), 2);
    // The old key left the set with that refresh.
    let old_token = sign(&old, &claims_for(&idp.base));
    assert_eq!(verifier.verify(&old_token).await, Err(TokenError::UnknownKey("2024".into())));
}

#[tokio::test]
async fn discovery_with_another_issuer_is_refused() {
    let rsa = rsa_key();
    let idp = Idp::spawn(&[&rsa.jwk]).await;
    *idp.doc_issuer.write().unwrap() = Some("https://evil.example".into());
    let verifier = idp.verifier(Duration::from_secs(30));

    match verifier.refresh().await {
        Err(TokenError::ProviderUnavailable(m)) => {
            assert!(m.contains("https://evil.example"), "{m}")
        }
        other => panic!("expected ProviderUnavailable, got {other:?}"),
    }
    let result = verifier.verify(&sign(&rsa, &claims_for(&idp.base))).await;
    assert!(matches!(result, Err(TokenError::ProviderUnavailable(_))), "{result:?}");
    assert_eq!(idp.hits(), 0, "the JWKS of a mismatched issuer is never fetched");
}

#[tokio::test]
async fn unreachable_provider_without_cached_keys_is_unavailable() {
    // Bind then drop a listener: the port is almost certainly closed afterwards.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let jwks_uri = Some(format!("http://{addr}/jwks"));
    let verifier = TokenVerifier::new(
        VerifierConfig::new(ISS, AUD),
        KeySource::Remote { jwks_uri, http: http() },
    );

    let token = sign(&rsa_key(), &claims());
    let result = verifier.verify(&token).await;
    assert!(
        matches!(&result, Err(TokenError::ProviderUnavailable(m)) if m.contains("/jwks")),
        "{result:?}"
    );
    assert_eq!(result.unwrap_err().code(), "identity_provider_unavailable");
    assert!(matches!(verifier.refresh().await, Err(TokenError::ProviderUnavailable(_))));
}

#[tokio::test]
async fn cached_keys_outlive_a_provider_outage() {
    let rsa = rsa_key();
    let idp = Idp::spawn(&[&rsa.jwk]).await;
    let verifier = idp.verifier(Duration::ZERO);
    verifier.refresh().await.unwrap();

    idp.failing.store(true, Ordering::SeqCst);
    assert!(verifier.verify(&sign(&rsa, &claims_for(&idp.base))).await.is_ok());
    let stranger = sign(&ed_key("stranger"), &claims_for(&idp.base));
    assert_eq!(verifier.verify(&stranger).await, Err(TokenError::UnknownKey("stranger".into())));
    assert_eq!(idp.hits(), 2, "the unknown kid tried a refresh, which failed");
    assert!(matches!(verifier.refresh().await, Err(TokenError::ProviderUnavailable(_))));
}
