//! JSON Web Tokens: verifying access tokens from any OIDC issuer (Keycloak, Auth0, the built-in
//! one), and minting the built-in issuer's own EdDSA tokens.
//!
//! The verifier and the issuer meet only through JWKs: the built-in issuer publishes its public
//! keys as a [`JwkSet`](jsonwebtoken::jwk::JwkSet), and the control plane verifies its own tokens
//! with a [`KeySource::Static`] holding that set, exactly as it verifies an outside issuer's.

mod issuer;
mod jwks;
mod verifier;

pub use issuer::{
    AccessClaims, Issuer, SigningKeyPair, discovery_document, generate_signing_key, jwk_set,
    signing_key_from_pkcs8,
};
pub use verifier::{KeySource, TokenError, TokenVerifier, VerifiedClaims, VerifierConfig};
