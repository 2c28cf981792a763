//! Who is calling, and what we keep secret: token verification for any OIDC issuer and the
//! built-in issuer's signing keys, password hashing, API keys, and encryption of secrets at rest.
//!
//! This crate holds no state of the platform and talks to no database: the only IO is fetching
//! an identity provider's JWKS (and discovery document) over HTTP, in [`jwt::TokenVerifier`].
//! Everything else is a pure function of its inputs and the operating system's randomness.

pub mod api_key;
pub mod error;
pub mod jwt;
pub mod password;
pub mod secrets;

pub use error::AuthError;
