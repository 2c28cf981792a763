//! The built-in identity provider's signing side: Ed25519 keys, EdDSA access tokens, and the
//! JWKS and discovery documents that let any OIDC client (our own verifier included) check them.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::AuthError;

/// An Ed25519 signing key with its kid and public JWK. The DER is what gets sealed and stored
/// (see [`crate::secrets`]); the JWK is what gets published.
#[derive(Clone)]
pub struct SigningKeyPair {
    /// First 16 hex characters of SHA-256 of the public key: derived, so the same key always
    /// gets the same kid, wherever it is loaded.
    pub kid: String,
    /// PKCS#8 v1 (RFC 8410) private key document, always in the same canonical form.
    pub pkcs8_der: Vec<u8>,
    pub public_jwk: Jwk,
}

/// Signs access tokens for one issuer URL and audience with the active key. Cheap to clone.
#[derive(Clone)]
pub struct Issuer {
    inner: Arc<IssuerInner>,
}

/// Claims of the built-in issuer's access tokens; what [`Issuer::mint`] signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    /// The user's id.
    pub sub: String,
    pub aud: String,
    /// Seconds since the Unix epoch, as are `nbf` and `iat`.
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    /// Random per token, so a single token can be revoked.
    pub jti: String,
    pub email: Option<String>,
    pub name: Option<String>,
    /// Platform role names, read back by the verifier from the top-level `roles` claim.
    pub roles: Vec<String>,
}

struct IssuerInner {
    issuer_url: String,
    audience: String,
    kid: String,
    key: EncodingKey,
}

/// DER prefix of a PKCS#8 v1 Ed25519 private key (RFC 8410 §10.3): SEQUENCE, version 0,
/// AlgorithmIdentifier id-Ed25519 (1.3.101.112), OCTET STRING holding an OCTET STRING of the
/// 32-byte seed. Writing it out makes encoding infallible and byte-for-byte stable.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A fresh Ed25519 key from the operating system's randomness.
pub fn generate_signing_key() -> SigningKeyPair {
    pair_from(&SigningKey::generate(&mut OsRng))
}

/// Load a stored key. Accepts PKCS#8 v1 and v2 (with the public key, which must match);
/// the returned `pkcs8_der` is the canonical v1 form.
pub fn signing_key_from_pkcs8(der: &[u8]) -> Result<SigningKeyPair, AuthError> {
    let key = SigningKey::from_pkcs8_der(der)
        .map_err(|e| AuthError::InvalidSigningKey(format!("not an Ed25519 PKCS#8 key: {e}")))?;
    Ok(pair_from(&key))
}

/// A JWKS document of these public keys, for `/.well-known/jwks.json` and for a
/// [`KeySource::Static`](super::KeySource::Static) verifier. Publish the previous key beside the
/// active one until the tokens it signed have expired.
pub fn jwk_set(keys: &[Jwk]) -> JwkSet {
    JwkSet { keys: keys.to_vec() }
}

/// The OpenID discovery document of the built-in issuer, so standard OIDC clients and our own
/// [`TokenVerifier`](super::TokenVerifier) with discovery can find its keys.
pub fn discovery_document(
    issuer_url: &str,
    jwks_uri: &str,
    token_endpoint: &str,
) -> serde_json::Value {
    serde_json::json!({
        "issuer": issuer_url,
        "jwks_uri": jwks_uri,
        "token_endpoint": token_endpoint,
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
        "grant_types_supported": ["password", "refresh_token"],
        "token_endpoint_auth_methods_supported": ["none"],
    })
}

impl fmt::Debug for SigningKeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyPair")
            .field("kid", &self.kid)
            .field("pkcs8_der", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("issuer_url", &self.inner.issuer_url)
            .field("audience", &self.inner.audience)
            .field("kid", &self.inner.kid)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    pub fn new(issuer_url: String, audience: String, active: SigningKeyPair) -> Self {
        let key = EncodingKey::from_ed_der(&active.pkcs8_der);
        Self { inner: Arc::new(IssuerInner { issuer_url, audience, kid: active.kid, key }) }
    }

    pub fn issuer_url(&self) -> &str {
        &self.inner.issuer_url
    }

    pub fn audience(&self) -> &str {
        &self.inner.audience
    }

    /// The kid tokens are signed under.
    pub fn kid(&self) -> &str {
        &self.inner.kid
    }

    /// Claims for a token issued at `issued_at`, valid for `ttl`, with this issuer's `iss` and
    /// `aud` and a fresh random `jti`. The caller passes the time, so services keep control of
    /// the clock.
    pub fn access_claims(
        &self,
        subject: String,
        email: Option<String>,
        name: Option<String>,
        roles: Vec<String>,
        issued_at: DateTime<Utc>,
        ttl: Duration,
    ) -> AccessClaims {
        let iat = issued_at.timestamp();
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let mut jti = [0u8; 16];
        OsRng.fill_bytes(&mut jti);
        AccessClaims {
            iss: self.inner.issuer_url.clone(),
            sub: subject,
            aud: self.inner.audience.clone(),
            exp: iat.saturating_add(ttl),
            nbf: iat,
            iat,
            jti: hex::encode(jti),
            email,
            name,
            roles,
        }
    }

    /// Sign `claims` as a compact JWS: header `alg: EdDSA`, `kid`, `typ: JWT`.
    ///
    /// Refuses claims whose `iss` or `aud` are not this issuer's: such a token would never
    /// verify, and minting it would only hide the bug until a user tried to log in.
    pub fn mint(&self, claims: &AccessClaims) -> Result<String, AuthError> {
        if claims.iss != self.inner.issuer_url {
            return Err(AuthError::Mint(format!(
                "iss {} is not this issuer ({})",
                claims.iss, self.inner.issuer_url
            )));
        }
        if claims.aud != self.inner.audience {
            return Err(AuthError::Mint(format!(
                "aud {} is not this issuer's audience ({})",
                claims.aud, self.inner.audience
            )));
        }
        let header = Header {
            typ: Some("JWT".to_owned()),
            kid: Some(self.inner.kid.clone()),
            ..Header::new(Algorithm::EdDSA)
        };
        jsonwebtoken::encode(&header, claims, &self.inner.key)
            .map_err(|e| AuthError::Mint(e.to_string()))
    }
}

fn pair_from(key: &SigningKey) -> SigningKeyPair {
    let public = key.verifying_key().to_bytes();
    let mut kid = hex::encode(Sha256::digest(public));
    kid.truncate(16);
    let mut pkcs8_der = Vec::with_capacity(PKCS8_ED25519_PREFIX.len() + 32);
    pkcs8_der.extend_from_slice(&PKCS8_ED25519_PREFIX);
    pkcs8_der.extend_from_slice(&key.to_bytes());
    let public_jwk = Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::EdDSA),
            key_id: Some(kid.clone()),
            ..CommonParameters::default()
        },
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: URL_SAFE_NO_PAD.encode(public),
        }),
    };
    SigningKeyPair { kid, pkcs8_der, public_jwk }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::EncodePrivateKey;

    #[test]
    fn kid_is_derived_from_the_public_key() {
        let pair = generate_signing_key();
        let loaded = signing_key_from_pkcs8(&pair.pkcs8_der).unwrap();
        assert_eq!(loaded.kid, pair.kid);
        assert_eq!(loaded.pkcs8_der, pair.pkcs8_der);
        assert_eq!(loaded.public_jwk, pair.public_jwk);
        assert_eq!(pair.kid.len(), 16);
        assert_ne!(generate_signing_key().kid, pair.kid);
    }

    #[test]
    fn canonical_der_is_what_ed25519_dalek_reads_and_v2_loads_too() {
        let key = SigningKey::generate(&mut OsRng);
        let pair = pair_from(&key);
        assert_eq!(SigningKey::from_pkcs8_der(&pair.pkcs8_der).unwrap().to_bytes(), key.to_bytes());
        let v2 = key.to_pkcs8_der().unwrap();
        assert_eq!(signing_key_from_pkcs8(v2.as_bytes()).unwrap().pkcs8_der, pair.pkcs8_der);
    }

    #[test]
    fn rejects_non_ed25519_der() {
        assert!(matches!(signing_key_from_pkcs8(b"nope"), Err(AuthError::InvalidSigningKey(_))));
    }

    #[test]
    fn debug_redacts_the_private_key() {
        let pair = generate_signing_key();
        let shown = format!("{pair:?}");
        assert!(shown.contains(&pair.kid) && shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn mint_refuses_foreign_claims() {
        let issuer = Issuer::new("https://bud".into(), "bud".into(), generate_signing_key());
        let mut claims = issuer.access_claims(
            "u".into(),
            None,
            None,
            vec![],
            Utc::now(),
            Duration::from_secs(60),
        );
        assert!(issuer.mint(&claims).is_ok());
        claims.aud = "other".into();
        assert!(matches!(issuer.mint(&claims), Err(AuthError::Mint(_))));
    }

    #[test]
    fn discovery_document_names_the_endpoints() {
        let doc = discovery_document("https://bud", "https://bud/jwks", "https://bud/token");
        assert_eq!(doc["issuer"], "https://bud");
        assert_eq!(doc["jwks_uri"], "https://bud/jwks");
        assert_eq!(doc["id_token_signing_alg_values_supported"][0], "EdDSA");
        assert_eq!(doc["grant_types_supported"], serde_json::json!(["password", "refresh_token"]));
    }
}
