//! Password hashing for the built-in identity provider: argon2id, stored as PHC strings.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::Rng;
use rand::rngs::OsRng;

use crate::AuthError;

/// Characters of generated passwords: letters and digits minus those people confuse when
/// reading a password off a terminal (`0 O o 1 l I`).
const UNAMBIGUOUS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789";

/// Length of generated passwords: 20 characters of a 56-letter alphabet is about 116 bits.
pub const GENERATED_PASSWORD_LEN: usize = 20;

/// Hash with argon2id and the crate's default parameters (19 MiB, 2 passes, 1 lane, OWASP's
/// recommendation), returning a PHC string that records algorithm, parameters and salt, so the
/// defaults can change later without invalidating stored hashes.
pub fn hash_password(plain: &str) -> Result<String, AuthError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(plain.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::PasswordHash(e.to_string()))
}

/// Whether `plain` matches the stored PHC string. An unparsable hash is a mismatch rather than
/// an error: a login must fail closed, and the caller has nothing better to tell the user.
pub fn verify_password(plain: &str, phc: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(phc) else {
        return false;
    };
    // Parameters come from the PHC string, so hashes made with older defaults still verify.
    Argon2::default().verify_password(plain.as_bytes(), &parsed).is_ok()
}

/// A random password for the first admin, printed once at bootstrap.
pub fn generate_password() -> String {
    let mut rng = OsRng;
    (0..GENERATED_PASSWORD_LEN)
        .map(|_| char::from(UNAMBIGUOUS[rng.gen_range(0..UNAMBIGUOUS.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_is_argon2id_phc_and_salted() {
        let a = hash_password("correct horse").unwrap();
        let b = hash_password("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$v=19$"), "{a}");
        assert_ne!(a, b, "each hash gets a fresh salt");
        assert!(verify_password("correct horse", &a));
        assert!(!verify_password("correct horsf", &a));
    }

    #[test]
    fn unparsable_hash_is_a_mismatch() {
        for junk in ["", "plaintext", "$argon2id$", "$md5$abc"] {
            assert!(!verify_password("x", junk), "{junk}");
        }
    }

    #[test]
    fn generated_passwords_use_the_alphabet() {
        let p = generate_password();
        assert_eq!(p.len(), GENERATED_PASSWORD_LEN);
        assert!(p.bytes().all(|b| UNAMBIGUOUS.contains(&b)), "{p}");
        assert_ne!(p, generate_password());
    }

    proptest! {
        // Argon2 costs tens of milliseconds per hash; a few cases cover the encoding paths.
        #![proptest_config(ProptestConfig::with_cases(8))]

        #[test]
        fn any_password_verifies_against_its_hash(plain in any::<String>(), other in any::<String>()) {
            let phc = hash_password(&plain).unwrap();
            prop_assert!(verify_password(&plain, &phc));
            prop_assert_eq!(verify_password(&other, &phc), other == plain);
        }
    }
}
