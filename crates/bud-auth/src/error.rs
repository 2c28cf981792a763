//! The crate's error for everything but token verification, which has its own
//! [`TokenError`](crate::jwt::TokenError) because each of its variants maps to an HTTP answer.

/// A failure hashing passwords, handling key material, sealing secrets or minting tokens.
///
/// Messages never contain key bytes, plaintexts or password material: they may reach logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Argon2 refused to hash a password; only happens with absurd inputs (over 4 GiB) or a
    /// broken build, so callers treat it as an internal error.
    #[error("password hashing failed: {0}")]
    PasswordHash(String),
    /// A master-key spec from configuration is not `<kid>:<base64 of 32 bytes>`; the message says
    /// which part is wrong, without echoing the key.
    #[error("invalid master key spec: {0}")]
    InvalidKeySpec(String),
    /// The keyring cannot be built: a key id repeats, breaks the kid grammar, or the active kid
    /// is not among the keys.
    #[error("invalid keyring: {0}")]
    InvalidKeyring(String),
    /// A sealed secret names a key id the keyring does not hold: the key was removed from
    /// configuration before every row sealed under it was re-encrypted.
    #[error("secret was sealed with key id {0}, which the keyring does not hold")]
    UnknownKeyId(String),
    /// A stored string is not a sealed secret of a known version (`v1.<kid>.<payload>`).
    #[error("malformed sealed secret: {0}")]
    MalformedSecret(String),
    /// Authenticated decryption failed: the ciphertext was altered, or it belongs to another row
    /// (different associated data), or the key under that kid changed.
    #[error("secret failed to decrypt: tampered, or bound to another row")]
    DecryptFailed,
    /// A signing key's PKCS#8 document is not an Ed25519 private key.
    #[error("invalid signing key: {0}")]
    InvalidSigningKey(String),
    /// Minting a token failed, or its claims would not verify against this issuer (wrong `iss`
    /// or `aud`), which is a programming error worth surfacing rather than a bad token.
    #[error("minting token failed: {0}")]
    Mint(String),
}
