//! Local credentials: the argon2 hashes in `[[accounts]]`, checking a password against them,
//! and making new hashes for `hash-password`.
//!
//! Verification runs on tokio's blocking pool because argon2 deliberately costs tens of
//! milliseconds of CPU; an unknown username costs the same as a wrong password so timing
//! does not reveal which usernames exist.

use argon2::password_hash::phc::PasswordHash;
use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use secrecy::{ExposeSecret, SecretString};

/// The password of the sandbox demo account in the shipped `proxy.toml`. It is public, so the
/// configuration refuses it for any account that is not a sandbox account.
pub const DEMO_PASSWORD: &str = "sandbox-password";
/// An argon2id hash of [`DEMO_PASSWORD`], as shipped in `proxy.toml`.
pub const DEMO_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FuZGJveC1kZW1vLXNhbHQ$yIFRJrUQkCO4uMEhPGn0hTSuRM0B/bpN0drVP2xIXhE";

/// A hash nobody's password matches, verified for unknown usernames to even out timing.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$ZHVtbXktc2FsdC1mb3ItdGltaW5n$3SKNHxr2ZHvc32srtCDuKf1ay5GnzF2AnR8u2ZrOzEE";

/// Makes a PHC string (`$argon2id$...`) for `password` with a random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash password: {e}"))
}

/// Checks that a configured hash is an argon2 PHC string we can verify against.
pub fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash).map_err(|_| "not a PHC hash string".to_string())?;
    if !parsed.algorithm.as_str().starts_with("argon2") {
        return Err("only argon2 hashes are supported".into());
    }
    Ok(())
}

/// Whether `hash` is a hash of the public demo password.
pub fn is_demo_hash(hash: &str) -> bool {
    verify_blocking(DEMO_PASSWORD, hash)
}

fn verify_blocking(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Verifies `password` against `hash` (or against a dummy hash when the user is unknown)
/// without blocking the async runtime.
pub async fn verify(password: SecretString, hash: Option<String>) -> bool {
    let known = hash.is_some();
    let hash = hash.unwrap_or_else(|| DUMMY_HASH.to_string());
    let ok = tokio::task::spawn_blocking(move || verify_blocking(password.expose_secret(), &hash))
        .await
        .unwrap_or(false);
    ok && known
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_wrong_passwords_fail() {
        let hash = hash_password("correct horse").unwrap();
        assert!(check_hash(&hash).is_ok());
        assert!(verify_blocking("correct horse", &hash));
        assert!(!verify_blocking("correct hors", &hash));
        assert!(check_hash("plaintext").is_err());
    }

    #[test]
    fn shipped_demo_hash_is_the_demo_password() {
        assert!(check_hash(DEMO_PASSWORD_HASH).is_ok());
        assert!(is_demo_hash(DEMO_PASSWORD_HASH));
        assert!(!is_demo_hash(&hash_password("something else").unwrap()));
        assert!(check_hash(DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn unknown_users_never_verify() {
        assert!(!verify(SecretString::from("x".to_string()), None).await);
        let hash = hash_password("pw").unwrap();
        assert!(verify(SecretString::from("pw".to_string()), Some(hash)).await);
    }
}
