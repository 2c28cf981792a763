//! Everything a request handler reaches: configuration, the store, the keyring, the token
//! verifier and (with the built-in identity) the issuer. Built once at start-up.

use std::ops::Deref;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use bud_auth::jwt::{self, Issuer, KeySource, TokenVerifier, VerifierConfig};
use bud_auth::secrets::Keyring;
use bud_cluster::ClusterClient;
use bud_store::{SigningKey, Store};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{AppConfig, IdentityMode};
use crate::identity::LoginLimiter;
use bud_telemetry::metrics_handle;

/// Cheap to clone: one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub config: AppConfig,
    pub store: Store,
    pub keyring: Keyring,
    pub verifier: TokenVerifier,
    /// Present with the built-in identity only.
    pub issuer: Option<Issuer>,
    /// The built-in issuer's public key set, as served on `/.well-known/jwks.json`.
    pub public_jwks: Option<serde_json::Value>,
    pub login_limiter: LoginLimiter,
    pub metrics: PrometheusHandle,
    /// How to reach budcluster; absent when this process serves budapp without it.
    pub clusters: Option<ClusterClient>,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    /// Prepares identity: with the built-in issuer, loads its signing key from the store (or
    /// generates and stores one, encrypted, on first start).
    pub async fn build(config: AppConfig, store: Store, keyring: Keyring) -> anyhow::Result<Self> {
        Self::build_with(config, store, keyring, None).await
    }

    /// As [`AppState::build`], reaching budcluster through `clusters`.
    pub async fn build_with(
        config: AppConfig,
        store: Store,
        keyring: Keyring,
        clusters: Option<ClusterClient>,
    ) -> anyhow::Result<Self> {
        let issuer_url = match &config.identity {
            IdentityMode::Builtin => config.public_url.clone(),
            IdentityMode::Oidc(oidc) => oidc.issuer.clone(),
        };
        let mut verifier_config = VerifierConfig {
            leeway: config.leeway,
            ..VerifierConfig::new(issuer_url, config.audience.clone())
        };
        if let IdentityMode::Oidc(oidc) = &config.identity {
            verifier_config.refresh_cooldown = oidc.jwks_refresh_cooldown;
        }
        let (verifier, issuer, public_jwks) = match &config.identity {
            IdentityMode::Builtin => {
                let key = builtin_signing_key(&store, &keyring).await?;
                // Computed now so the first failed login costs no more than the others.
                tokio::task::spawn_blocking(crate::identity::dummy_hash).await?;
                let set = jwt::jwk_set(std::slice::from_ref(&key.public_jwk));
                let public = serde_json::to_value(&set).context("encoding the key set")?;
                let issuer = Issuer::new(config.public_url.clone(), config.audience.clone(), key);
                let keys = KeySource::Static(Arc::new(RwLock::new(set)));
                (TokenVerifier::new(verifier_config, keys), Some(issuer), Some(public))
            }
            IdentityMode::Oidc(oidc) => {
                let http = reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(5))
                    .build()
                    .context("building the HTTP client for the identity provider")?;
                let keys = KeySource::Remote { jwks_uri: oidc.jwks_uri.clone(), http };
                let verifier = TokenVerifier::new(verifier_config, keys);
                // The provider may be down at start; tokens are verified once it answers.
                if let Err(e) = verifier.refresh().await {
                    tracing::warn!(error = %e, issuer = %oidc.issuer, "identity provider keys not loaded yet");
                }
                (verifier, None, None)
            }
        };
        let login_limiter = LoginLimiter::new(
            config.login_per_account_per_minute,
            config.login_per_address_per_minute,
        );
        Ok(Self(Arc::new(Inner {
            config,
            store,
            keyring,
            verifier,
            issuer,
            public_jwks,
            login_limiter,
            metrics: metrics_handle(),
            clusters,
        })))
    }

    /// Asks budcluster to reconcile now; it does so on its interval anyway.
    pub async fn wake_clusters(&self) {
        if let Some(c) = &self.clusters {
            c.wake().await;
        }
    }

    /// budcluster, for what only it can answer (logs, engine metrics).
    pub fn clusters(&self) -> Result<&ClusterClient, crate::error::ApiError> {
        self.clusters.as_ref().ok_or_else(|| {
            crate::error::ApiError::Unavailable(
                "budcluster is not configured for this budapp (clusters.url)".into(),
            )
        })
    }
}

/// The newest unretired signing key, or a new one stored encrypted under the keyring.
async fn builtin_signing_key(
    store: &Store,
    keyring: &Keyring,
) -> anyhow::Result<jwt::SigningKeyPair> {
    let keys = store.signing_keys().await.context("reading signing keys")?;
    if let Some(stored) = keys.iter().find(|k| k.retired_at.is_none()) {
        let aad = bud_auth::secrets::aad::signing_key(&stored.kid);
        let der = keyring.decrypt(&stored.private_key_ciphertext, aad.as_bytes()).context(
            "decrypting the identity signing key: is the master key the one it was sealed with?",
        )?;
        return jwt::signing_key_from_pkcs8(&der).context("reading the identity signing key");
    }
    let pair = jwt::generate_signing_key();
    let aad = bud_auth::secrets::aad::signing_key(&pair.kid);
    let record = SigningKey {
        kid: pair.kid.clone(),
        algorithm: "EdDSA".into(),
        private_key_ciphertext: keyring.encrypt(&pair.pkcs8_der, aad.as_bytes()),
        public_jwk: serde_json::to_string(&pair.public_jwk).context("encoding the public key")?,
        created_at: chrono::Utc::now(),
        retired_at: None,
    };
    store.insert_signing_key(&record).await.context("storing the identity signing key")?;
    tracing::info!(kid = %pair.kid, "generated identity signing key");
    Ok(pair)
}
