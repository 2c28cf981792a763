//! Rotating the master key: reseal everything under the new key, then the old key can go.

use bud_app::AppState;
use bud_auth::secrets::{self, Keyring};
use bud_store::SealedKind;
use reqwest::StatusCode;
use serde_json::json;

use crate::both_backends;
use crate::support::TestApp;

async fn master_key_rotation_reseals_every_secret(app: &TestApp) {
    let r = app
        .post(
            "/providers",
            &app.admin_token,
            json!({"name": "p", "base_url": "https://8.8.8.8/v1", "api_key": "sk-1"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);

    // The new key is active; the old one is still listed so existing secrets open.
    let new_key = secrets::generate_key();
    let both =
        Keyring::new("k2", vec![("k2".into(), new_key), ("test".into(), app.master_key)]).unwrap();
    let report = bud_app::secrets::rotate(&app.state.store, &both).await.unwrap();
    assert_eq!(report.resealed, 2, "the provider key and the signing key");
    let again = bud_app::secrets::rotate(&app.state.store, &both).await.unwrap();
    assert_eq!((again.resealed, again.current), (0, 2), "a second pass has nothing to do");

    // With only the new key, everything still opens: budapp starts and its tokens verify.
    let only_new = Keyring::new("k2", vec![("k2".into(), new_key)]).unwrap();
    for s in app.state.store.sealed_secrets().await.unwrap() {
        let aad = match s.kind {
            SealedKind::ProviderApiKey => bud_auth::secrets::aad::provider(&s.id),
            SealedKind::SigningKey => bud_auth::secrets::aad::signing_key(&s.id),
            SealedKind::Kubeconfig => bud_auth::secrets::aad::kubeconfig(&s.id),
        };
        only_new.decrypt(&s.ciphertext, aad.as_bytes()).unwrap();
    }
    let config = app.state.config.clone();
    let restarted = AppState::build(config, app.state.store.clone(), only_new).await.unwrap();
    let claims = bud_app::identity::authenticate(&restarted, &app.admin_token).await;
    assert!(claims.is_ok(), "a token signed before the rotation still verifies");

    let audit = app.get("/audit?action=secrets.rotate", &app.admin_token).await;
    assert_eq!(audit.body["data"].as_array().unwrap().len(), 2);
}
both_backends!(master_key_rotation_reseals_every_secret);
