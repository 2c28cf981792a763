//! API keys for the OpenAI-compatible gateway: `bud_sk_` and 40 base62 characters.
//!
//! Only the SHA-256 of a key is stored. A fast hash is enough (unlike passwords) because the
//! keys carry about 238 bits of randomness, so the hash cannot be brute-forced, and the gateway
//! looks a key up by its hash on every request.

use rand::Rng;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};

/// What every key starts with, so leaked keys are recognisable by secret scanners.
pub const API_KEY_PREFIX: &str = "bud_sk_";

/// Random characters after the prefix.
pub const API_KEY_RANDOM_LEN: usize = 40;

/// Random characters kept in the displayable prefix: enough for a user to tell keys apart, too
/// few to help guess the rest.
const DISPLAY_RANDOM_LEN: usize = 6;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly generated key: the plaintext is shown to the user once and never stored.
#[derive(Clone)]
pub struct GeneratedKey {
    /// The full key, `bud_sk_` + 40 base62 characters.
    pub plaintext: String,
    /// `bud_sk_` + the first 6 random characters, stored and shown in key listings.
    pub prefix: String,
    /// Lowercase hex SHA-256 of `plaintext`, the stored lookup value.
    pub hash: String,
}

/// Debug leaves the plaintext out: a key logged by accident is a key leaked.
impl std::fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("plaintext", &"<redacted>")
            .field("prefix", &self.prefix)
            .field("hash", &self.hash)
            .finish()
    }
}

/// A new key from the operating system's randomness.
pub fn generate_api_key() -> GeneratedKey {
    let mut rng = OsRng;
    let random: String = (0..API_KEY_RANDOM_LEN)
        .map(|_| char::from(BASE62[rng.gen_range(0..BASE62.len())]))
        .collect();
    let plaintext = format!("{API_KEY_PREFIX}{random}");
    let prefix = format!("{API_KEY_PREFIX}{}", &random[..DISPLAY_RANDOM_LEN]);
    let hash = sha256_hex(&plaintext);
    GeneratedKey { plaintext, prefix, hash }
}

/// The stored hash of a presented key, or `None` when the string cannot be a key (wrong prefix,
/// length or characters), so the gateway answers garbage without touching the database.
pub fn hash_api_key(presented: &str) -> Option<String> {
    let random = presented.strip_prefix(API_KEY_PREFIX)?;
    if random.len() != API_KEY_RANDOM_LEN || !random.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return None;
    }
    Some(sha256_hex(presented))
}

fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn generated_key_has_the_documented_shape() {
        let key = generate_api_key();
        assert_eq!(key.plaintext.len(), API_KEY_PREFIX.len() + API_KEY_RANDOM_LEN);
        assert!(key.plaintext.starts_with(&key.prefix));
        assert_eq!(key.prefix.len(), API_KEY_PREFIX.len() + DISPLAY_RANDOM_LEN);
        assert_eq!(key.hash.len(), 64);
        assert!(!format!("{key:?}").contains(&key.plaintext));
    }

    /// `printf bud_sk_aaaa…a (40 a) | sha256sum`.
    const KNOWN_HASH: &str = "9333be539c728abc89838f30cf73d162668c9f1d1885c5d587e9b69caba5f711";

    #[test]
    fn hash_is_lowercase_hex_sha256_of_the_whole_key() {
        let key = format!("{API_KEY_PREFIX}{}", "a".repeat(40));
        assert_eq!(hash_api_key(&key).unwrap(), KNOWN_HASH);
    }

    #[test]
    fn rejects_what_cannot_be_a_key() {
        let good = generate_api_key().plaintext;
        let long = format!("{good}a");
        let short = &good[..good.len() - 1];
        let wrong_prefix = good.replacen("bud_sk_", "bud_pk_", 1);
        let bad_char = format!("{}-", &good[..good.len() - 1]);
        let non_ascii = format!("{}é", &good[..good.len() - 2]);
        for bad in ["", "bud_sk_", short, &long, &wrong_prefix, &bad_char, &non_ascii] {
            assert_eq!(hash_api_key(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn hash_of_generated_plaintext_is_its_hash(_seed in any::<u8>()) {
            let key = generate_api_key();
            prop_assert_eq!(hash_api_key(&key.plaintext), Some(key.hash));
        }

        #[test]
        fn arbitrary_strings_are_rejected_unless_key_shaped(s in ".*") {
            let accepted = hash_api_key(&s).is_some();
            let shaped = s.len() == 47
                && s.starts_with(API_KEY_PREFIX)
                && s[7..].bytes().all(|b| b.is_ascii_alphanumeric());
            prop_assert_eq!(accepted, shaped);
        }
    }
}
