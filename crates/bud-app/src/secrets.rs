//! Secrets at rest: rotation of the master key. Rotation is online: every replica is given the
//! new key as active with the old one still listed, then [`rotate`] reseals what the store holds,
//! then the old key can go. The associated data binding each ciphertext to its row is
//! [`bud_auth::secrets::aad`].

use anyhow::Context;
use bud_auth::secrets::{Keyring, aad};
use bud_store::{SealedKind, SealedSecret, Store};

use crate::identity::system_audit;

/// The associated data `secret` was sealed with.
fn aad_of(secret: &SealedSecret) -> String {
    match secret.kind {
        SealedKind::ProviderApiKey => aad::provider(&secret.id),
        SealedKind::SigningKey => aad::signing_key(&secret.id),
        SealedKind::Kubeconfig => aad::kubeconfig(&secret.id),
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rotation {
    /// Secrets resealed under the active key.
    pub resealed: usize,
    /// Secrets already under the active key.
    pub current: usize,
}

/// Reseals every secret not yet under the keyring's active key. A secret that changes while
/// this runs is read again; one sealed under a key the keyring lacks stops the rotation with
/// an error naming it.
pub async fn rotate(store: &Store, keyring: &Keyring) -> anyhow::Result<Rotation> {
    let mut report = Rotation::default();
    for mut secret in store.sealed_secrets().await? {
        loop {
            if keyring.is_current(&secret.ciphertext) {
                report.current += 1;
                break;
            }
            let aad = aad_of(&secret);
            let plain = keyring.decrypt(&secret.ciphertext, aad.as_bytes()).with_context(|| {
                format!("opening {aad}: list the key it was sealed with in secrets.master_keys")
            })?;
            let resealed = keyring.encrypt(&plain, aad.as_bytes());
            if store.reseal(&secret, &resealed).await? {
                report.resealed += 1;
                break;
            }
            // Changed under us: read it again.
            match store
                .sealed_secrets()
                .await?
                .into_iter()
                .find(|s| s.kind == secret.kind && s.id == secret.id)
            {
                Some(fresh) => secret = fresh,
                None => break,
            }
        }
    }
    let details =
        serde_json::json!({"active_key": keyring.active_kid(), "resealed": report.resealed});
    store
        .append_audit(&system_audit("secrets.rotate", "keyring", keyring.active_kid(), details))
        .await?;
    Ok(report)
}
