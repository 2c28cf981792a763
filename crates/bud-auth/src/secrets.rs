//! Secrets at rest (provider API keys, the built-in issuer's signing key): AES-256-GCM under a
//! keyring of master keys named by key ids, so the master key can rotate.
//!
//! A sealed secret is `v1.<kid>.<base64url-nopad(nonce || ciphertext || tag)>`. The kid says which
//! master key opens it; rotation adds a new key, makes it active, re-encrypts every row whose
//! secret [`Keyring::is_current`] denies, and only then drops the old key. The associated data
//! binds a ciphertext to its row (`b"provider:<id>"`), so a secret copied into another row does
//! not decrypt there.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use rand::RngCore;
use rand::rngs::OsRng;

use crate::AuthError;

/// Version tag of the sealed format; a new format gets a new tag and both decrypt for a while.
const VERSION: &str = "v1";
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
const MAX_KID_LEN: usize = 32;

/// The master keys, by kid, and which one seals new secrets. Cheap to clone.
#[derive(Clone)]
pub struct Keyring {
    /// Always a key of `keys` (checked in [`Keyring::new`]).
    active_kid: String,
    /// The cipher of `active_kid`, kept apart so sealing needs no lookup that could miss.
    active: Aes256Gcm,
    keys: Arc<BTreeMap<String, Aes256Gcm>>,
}

/// Lists the kids only: key bytes must never reach a log.
impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("active_kid", &self.active_kid)
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A keyring sealing under `active_kid`. Kids are `[a-z0-9_-]{1,32}`, distinct, and the
    /// active one must be among them.
    pub fn new(active_kid: &str, keys: Vec<(String, [u8; 32])>) -> Result<Keyring, AuthError> {
        let mut ring = BTreeMap::new();
        for (kid, key) in keys {
            check_kid(&kid).map_err(AuthError::InvalidKeyring)?;
            let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
            if ring.insert(kid.clone(), cipher).is_some() {
                return Err(AuthError::InvalidKeyring(format!("key id {kid} appears twice")));
            }
        }
        let Some(active) = ring.get(active_kid).cloned() else {
            let known: Vec<&str> = ring.keys().map(String::as_str).collect();
            return Err(AuthError::InvalidKeyring(format!(
                "active key id {active_kid} is not among the keys ({})",
                known.join(", ")
            )));
        };
        Ok(Keyring { active_kid: active_kid.to_owned(), active, keys: Arc::new(ring) })
    }

    /// The kid new secrets are sealed under.
    pub fn active_kid(&self) -> &str {
        &self.active_kid
    }

    /// Every kid the keyring can open, sorted.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Seal `plaintext` under the active key with a fresh random nonce, bound to `aad`.
    ///
    /// Random 96-bit nonces are safe for far more secrets than this platform will ever seal
    /// under one key (the bound is about 2^32 encryptions).
    pub fn encrypt(&self, plaintext: &[u8], aad: &[u8]) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        #[expect(clippy::expect_used, reason = "AES-GCM only refuses plaintexts over 64 GiB")]
        let sealed = self
            .active
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .expect("plaintext within AES-GCM limits");
        let mut payload = Vec::with_capacity(NONCE_LEN + sealed.len());
        payload.extend_from_slice(&nonce);
        payload.extend_from_slice(&sealed);
        format!("{VERSION}.{}.{}", self.active_kid, URL_SAFE_NO_PAD.encode(payload))
    }

    /// Open a sealed secret with the key its kid names, checking it is bound to `aad`.
    pub fn decrypt(&self, sealed: &str, aad: &[u8]) -> Result<Vec<u8>, AuthError> {
        let (kid, payload) = split_sealed(sealed)?;
        let cipher = self.keys.get(kid).ok_or_else(|| AuthError::UnknownKeyId(kid.to_owned()))?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| AuthError::MalformedSecret("payload is not base64url".into()))?;
        if payload.len() < NONCE_LEN + TAG_LEN {
            return Err(AuthError::MalformedSecret(format!(
                "payload is {} bytes, shorter than nonce and tag",
                payload.len()
            )));
        }
        let (nonce, ciphertext) = payload.split_at(NONCE_LEN);
        cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad })
            .map_err(|_| AuthError::DecryptFailed)
    }

    /// Whether `sealed` is sealed under the active key; rotation re-encrypts the rows where it
    /// is not. A string that is not a sealed secret is not current either.
    pub fn is_current(&self, sealed: &str) -> bool {
        split_sealed(sealed).is_ok_and(|(kid, _)| kid == self.active_kid)
    }

    /// Decrypt and seal again under the active key, for rotation.
    pub fn reseal(&self, sealed: &str, aad: &[u8]) -> Result<String, AuthError> {
        Ok(self.encrypt(&self.decrypt(sealed, aad)?, aad))
    }
}

/// The associated data that binds each kind of sealed secret to its row. Every service that
/// seals or opens a secret (budapp seals provider keys and kubeconfigs, budcluster opens
/// kubeconfigs, budgateway opens provider keys) takes the string from here, so they cannot drift
/// apart.
pub mod aad {
    use std::fmt::Display;

    /// Associated data of a provider's API key: `provider:<id>`.
    pub fn provider(id: impl Display) -> String {
        format!("provider:{id}")
    }

    /// Associated data of a cluster's kubeconfig: `kubeconfig:<id>`.
    pub fn kubeconfig(id: impl Display) -> String {
        format!("kubeconfig:{id}")
    }

    /// Associated data of the built-in issuer's private key: `signing-key:<kid>`.
    pub fn signing_key(kid: &str) -> String {
        format!("signing-key:{kid}")
    }
}

/// Parse a configuration string `<kid>:<base64 of 32 bytes>`. Standard and URL-safe base64 are
/// both accepted, padded or not, since operators paste keys from different tools.
pub fn parse_key_spec(spec: &str) -> Result<(String, [u8; 32]), AuthError> {
    let err = |m: String| AuthError::InvalidKeySpec(m);
    let (kid, b64) = spec
        .trim()
        .split_once(':')
        .ok_or_else(|| err("expected <kid>:<base64 key>, found no ':'".into()))?;
    check_kid(kid).map_err(err)?;
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let bytes = GeneralPurpose::new(&alphabet::STANDARD, lenient)
        .decode(b64)
        .or_else(|_| GeneralPurpose::new(&alphabet::URL_SAFE, lenient).decode(b64))
        .map_err(|_| err(format!("key of {kid} is not valid base64")))?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        err(format!("key of {kid} must be 32 bytes (AES-256), found {} bytes", bytes.len()))
    })?;
    Ok((kid.to_owned(), key))
}

/// A fresh random master key.
pub fn generate_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    OsRng.fill_bytes(&mut key);
    key
}

/// The configuration string [`parse_key_spec`] reads, with standard padded base64.
pub fn encode_key_spec(kid: &str, key: &[u8; 32]) -> String {
    format!("{kid}:{}", STANDARD.encode(key))
}

/// Split `v1.<kid>.<payload>` without decoding the payload.
fn split_sealed(sealed: &str) -> Result<(&str, &str), AuthError> {
    let malformed = || AuthError::MalformedSecret(format!("expected {VERSION}.<kid>.<payload>"));
    let rest =
        sealed.strip_prefix(VERSION).and_then(|r| r.strip_prefix('.')).ok_or_else(malformed)?;
    let (kid, payload) = rest.split_once('.').ok_or_else(malformed)?;
    if check_kid(kid).is_err() || payload.is_empty() {
        return Err(malformed());
    }
    Ok((kid, payload))
}

/// Kids appear inside sealed strings and configuration, so they are short and need no escaping.
fn check_kid(kid: &str) -> Result<(), String> {
    let ok = !kid.is_empty()
        && kid.len() <= MAX_KID_LEN
        && kid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("key id {kid:?} must be 1 to 32 characters of a-z, 0-9, '_' and '-'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring(active: &str) -> Keyring {
        Keyring::new(active, vec![("k1".into(), [1; 32]), ("k2".into(), [2; 32])]).unwrap()
    }

    #[test]
    fn round_trip_and_format() {
        let r = ring("k1");
        let sealed = r.encrypt(b"sk-live-123", b"provider:1");
        assert!(sealed.starts_with("v1.k1."), "{sealed}");
        assert_ne!(sealed, r.encrypt(b"sk-live-123", b"provider:1"), "fresh nonce each time");
        assert_eq!(r.decrypt(&sealed, b"provider:1").unwrap(), b"sk-live-123");
    }

    #[test]
    fn aad_binds_to_the_row() {
        let r = ring("k1");
        let sealed = r.encrypt(b"secret", b"provider:1");
        assert_eq!(r.decrypt(&sealed, b"provider:2"), Err(AuthError::DecryptFailed));
    }

    #[test]
    fn rotation_keeps_old_secrets_readable_and_reports_them_stale() {
        let old = ring("k1").encrypt(b"secret", b"aad");
        let rotated = ring("k2");
        assert!(!rotated.is_current(&old));
        let resealed = rotated.reseal(&old, b"aad").unwrap();
        assert!(rotated.is_current(&resealed));
        assert_eq!(rotated.decrypt(&resealed, b"aad").unwrap(), b"secret");

        let only_k2 = Keyring::new("k2", vec![("k2".into(), [2; 32])]).unwrap();
        let err = only_k2.decrypt(&old, b"aad").unwrap_err();
        assert_eq!(err, AuthError::UnknownKeyId("k1".into()));
        assert!(err.to_string().contains("k1"));
    }

    #[test]
    fn same_kid_with_another_key_fails() {
        let sealed = ring("k1").encrypt(b"secret", b"aad");
        let other = Keyring::new("k1", vec![("k1".into(), [9; 32])]).unwrap();
        assert_eq!(other.decrypt(&sealed, b"aad"), Err(AuthError::DecryptFailed));
    }

    #[test]
    fn malformed_sealed_strings() {
        let r = ring("k1");
        for bad in ["", "v1", "v1.k1", "v1.k1.", "v2.k1.AAAA", "v1.K1.AAAA"] {
            assert!(matches!(r.decrypt(bad, b""), Err(AuthError::MalformedSecret(_))), "{bad}");
            assert!(!r.is_current(bad), "{bad}");
        }
        // The envelope is fine, so `is_current` (which only reads the kid) says yes; the
        // payload is not base64url, or too short to hold nonce and tag.
        for bad in ["v1.k1.!!!!", "v1.k1.AAAA"] {
            assert!(matches!(r.decrypt(bad, b""), Err(AuthError::MalformedSecret(_))), "{bad}");
        }
    }

    #[test]
    fn keyring_rules() {
        let k = |kid: &str| (kid.to_owned(), [0u8; 32]);
        assert!(Keyring::new("a", vec![k("a"), k("b")]).is_ok());
        assert!(matches!(Keyring::new("c", vec![k("a")]), Err(AuthError::InvalidKeyring(_))));
        assert!(matches!(
            Keyring::new("a", vec![k("a"), k("a")]),
            Err(AuthError::InvalidKeyring(_))
        ));
        for bad in ["", "A", "a.b", "a:b", &"a".repeat(33)] {
            assert!(Keyring::new(bad, vec![k(bad)]).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_shows_kids_not_keys() {
        let shown = format!("{:?}", Keyring::new("k1", vec![("k1".into(), [0xAB; 32])]).unwrap());
        assert!(shown.contains("k1"));
        assert!(!shown.contains("171"), "{shown}");
    }

    #[test]
    fn key_specs() {
        let key = generate_key();
        let spec = encode_key_spec("2025-01", &key);
        assert_eq!(parse_key_spec(&spec).unwrap(), ("2025-01".to_owned(), key));
        let url_safe_unpadded = format!("k:{}", URL_SAFE_NO_PAD.encode([0xFF; 32]));
        assert_eq!(parse_key_spec(&url_safe_unpadded).unwrap().1, [0xFF; 32]);

        let msg = |s: &str| parse_key_spec(s).unwrap_err().to_string();
        assert!(msg("nocolon").contains("':'"));
        assert!(msg("Bad:AAAA").contains("key id"));
        assert!(msg("k:***").contains("base64"));
        assert!(msg(&format!("k:{}", STANDARD.encode([0u8; 16]))).contains("16 bytes"));
    }

    fn plaintext_and_aad() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), 0..512),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
    }

    proptest! {
        #[test]
        fn encrypt_decrypt_round_trip((plain, aad) in plaintext_and_aad()) {
            let r = ring("k2");
            prop_assert_eq!(r.decrypt(&r.encrypt(&plain, &aad), &aad).unwrap(), plain);
        }

        #[test]
        fn any_bit_flip_of_the_payload_fails((plain, aad) in plaintext_and_aad(), bit in any::<prop::sample::Index>()) {
            let r = ring("k1");
            let sealed = r.encrypt(&plain, &aad);
            let (head, payload) = sealed.rsplit_once('.').unwrap();
            let mut bytes = URL_SAFE_NO_PAD.decode(payload).unwrap();
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            let tampered = format!("{head}.{}", URL_SAFE_NO_PAD.encode(&bytes));
            prop_assert_eq!(r.decrypt(&tampered, &aad), Err(AuthError::DecryptFailed));
        }

        #[test]
        fn any_bit_flip_of_the_sealed_string_fails((plain, aad) in plaintext_and_aad(), bit in any::<prop::sample::Index>()) {
            let r = ring("k1");
            let mut bytes = r.encrypt(&plain, &aad).into_bytes();
            let i = bit.index(bytes.len() * 8);
            bytes[i / 8] ^= 1 << (i % 8);
            // A flip that leaves no valid UTF-8 cannot even be presented as a sealed string.
            if let Ok(tampered) = String::from_utf8(bytes) {
                prop_assert!(r.decrypt(&tampered, &aad).is_err());
            }
        }
    }
}
