//! Secrets: password hashing (argon2id) and random tokens stored as SHA-256 hashes.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::Argon2;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::domain::Password;

pub fn hash_password(password: &Password) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)?
        .to_string())
}

/// Argon2's verification compares in constant time.
pub fn verify_password(password: &str, stored_hash: &str) -> bool {
    PasswordHash::new(stored_hash)
        .map(|hash| {
            Argon2::default()
                .verify_password(password.as_bytes(), &hash)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so both cases take as long.
pub fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| {
        Password::parse("not-a-real-password".into())
            .ok()
            .and_then(|p| hash_password(&p).ok())
            .unwrap_or_default()
    })
}

/// A new random token with a prefix naming its kind (`lcp_` user, `lce_` enrollment, `lca_` agent).
pub fn new_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Tokens carry 256 random bits, so one unsalted SHA-256 is enough to store them: a lookup
/// by hash never compares secret material byte by byte.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// HMAC-SHA256 of `message` under `key`, hex: the signature of a download link.
pub fn sign(key: &str, message: &str) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<Sha256>::new_from_slice(key.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(message.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Checks a signature in constant time.
pub fn verify_signature(key: &str, message: &str, signature: &str) -> bool {
    use subtle::ConstantTimeEq;
    sign(key, message)
        .as_bytes()
        .ct_eq(signature.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_hash() {
        let password = Password::parse("correct horse".into()).expect("valid");
        let hash = hash_password(&password).expect("hashes");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", &hash));
        assert!(!verify_password("wrong horse", &hash));
    }

    #[test]
    fn signatures_verify_only_for_their_message_and_key() {
        let signature = sign("key", "artifact:1700000000");
        assert!(verify_signature("key", "artifact:1700000000", &signature));
        assert!(!verify_signature("key", "artifact:1700000001", &signature));
        assert!(!verify_signature(
            "other",
            "artifact:1700000000",
            &signature
        ));
    }

    #[test]
    fn tokens_are_unique_and_hashed() {
        let (a, b) = (new_token("lcp_"), new_token("lcp_"));
        assert_ne!(a, b);
        assert_eq!(token_hash(&a).len(), 64);
        assert_ne!(token_hash(&a), a);
    }
}
