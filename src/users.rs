//! Local credentials: the argon2 hashes in `[[accounts]]`, checking a password against them,
//! and making new hashes for `hash-password`.
//!
//! Verification runs on tokio's blocking pool because argon2 deliberately costs tens of
//! milliseconds of CPU and 19 MiB of memory; at most one verification per CPU runs at a time,
//! so a burst of logins (or of guesses) queues instead of exhausting memory, and the working
//! memory goes back to the operating system when a verification ends. An unknown username
//! costs the same as a wrong password, so timing does not reveal which usernames exist.
//!
//! A password that verified once is remembered, in memory only, as an HMAC-SHA256 under a
//! random key made at start-up, so a device that logs in for every message pays argon2 once
//! per process rather than once per message; logins for one username that arrive together wait
//! for one verification instead of each running their own. Only successful logins are
//! remembered; a wrong password always goes through argon2. The trade-off: someone able to
//! read the process's memory could test guesses against the HMAC far faster than against
//! argon2 (they could also read the access tokens there, which are worth more).

use std::sync::Arc;

use argon2::password_hash::phc::PasswordHash;
use argon2::{Argon2, PasswordHasher};
use secrecy::{ExposeSecret, SecretString};

/// The password of the sandbox demo account in the shipped `proxy.toml`. It is public, so the
/// configuration refuses it for any account that is not a sandbox account.
pub const DEMO_PASSWORD: &str = "sandbox-password";
/// An argon2id hash of [`DEMO_PASSWORD`], as shipped in `proxy.toml`.
pub const DEMO_PASSWORD_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FuZGJveC1kZW1vLXNhbHQ$yIFRJrUQkCO4uMEhPGn0hTSuRM0B/bpN0drVP2xIXhE";

/// A hash nobody's password matches, verified for unknown usernames to even out timing.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$ZHVtbXktc2FsdC1mb3ItdGltaW5n$3SKNHxr2ZHvc32srtCDuKf1ay5GnzF2AnR8u2ZrOzEE";

/// The most memory a configured hash may ask argon2 for, in KiB: RFC 9106's first
/// recommendation (2 GiB, one pass) fits.
const MAX_MEMORY_KIB: u64 = 2 * 1024 * 1024;
/// The most work, in KiB of memory × passes (its second, 64 MiB × 3, is far below).
const MAX_WORK: u64 = 4 * 1024 * 1024;

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
    // Every login (and the demo-password check at load) pays what the hash asks for; a
    // damaged `m=` or `t=` would ask for terabytes, which aborts the process, or for hours.
    if let Ok(params) = argon2::Params::try_from(&parsed) {
        let (memory, passes) = (u64::from(params.m_cost()), u64::from(params.t_cost()));
        if memory > MAX_MEMORY_KIB || memory * passes > MAX_WORK {
            return Err(
                "asks argon2 for more than 2 GiB of memory, or for more than 4 GiB × passes".into(),
            );
        }
    }
    Ok(())
}

/// Whether `hash` is a hash of the public demo password.
pub fn is_demo_hash(hash: &str) -> bool {
    verify_blocking(DEMO_PASSWORD, hash)
}

/// What is remembered of a successful login: the configured hash, NUL, the password.
fn remembered_message(hash: &str, password: &SecretString) -> zeroize::Zeroizing<Vec<u8>> {
    let password = password.expose_secret().as_bytes();
    let mut message = Vec::with_capacity(hash.len() + 1 + password.len());
    message.extend_from_slice(hash.as_bytes());
    message.push(0);
    message.extend_from_slice(password);
    zeroize::Zeroizing::new(message)
}

fn verify_blocking(password: &str, hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (&parsed.salt, &parsed.hash) else {
        return false;
    };
    let (Ok(params), Ok(algorithm)) = (
        argon2::Params::try_from(&parsed),
        argon2::Algorithm::try_from(parsed.algorithm.as_str()),
    ) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        None => argon2::Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let mut memory = WorkingMemory::new(params.block_count());
    let mut out = zeroize::Zeroizing::new(vec![0u8; expected.len()]);
    let computed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password.as_bytes(),
        salt.as_ref(),
        &mut out,
        memory.blocks(),
    );
    // Output's equality is constant-time.
    computed.is_ok() && argon2::password_hash::phc::Output::new(&out).is_ok_and(|o| &o == expected)
}

/// Argon2's working memory (19 MiB with the recommended parameters), handed back to the
/// operating system as soon as a verification ends.
///
/// glibc serves allocations under its mmap threshold from per-thread arenas and keeps them
/// when freed, and after the first 19 MiB block is freed it raises that threshold to 19 MiB;
/// every blocking-pool thread that ever verified a password would then hold 19 MiB for the
/// life of the process (measured: 370 MiB after a burst of logins). An allocation larger than
/// glibc's highest threshold (32 MiB) is always mapped on its own and unmapped on free, and
/// its pages are only resident once touched, so reserving at least that much costs nothing
/// beyond the blocks argon2 uses.
struct WorkingMemory(Vec<argon2::Block>);

impl WorkingMemory {
    const ALWAYS_MAPPED: usize = 32 * 1024 * 1024 / argon2::Block::SIZE + 1;

    fn new(blocks: usize) -> WorkingMemory {
        let mut memory = Vec::with_capacity(blocks.max(Self::ALWAYS_MAPPED));
        memory.resize(blocks, argon2::Block::default());
        WorkingMemory(memory)
    }

    fn blocks(&mut self) -> &mut [argon2::Block] {
        &mut self.0
    }
}

/// Checks local passwords: argon2 with bounded concurrency, and a memory of recent successes.
pub struct Verifier {
    permits: tokio::sync::Semaphore,
    key: ring::hmac::Key,
    /// username → HMAC(key, hash ‖ NUL ‖ password) of the last password that verified.
    verified: std::sync::Mutex<std::collections::HashMap<String, ring::hmac::Tag>>,
    /// One argon2 run per username at a time: a burst of logins by one device (every
    /// connection of a printer at once) costs one verification, the rest find it remembered.
    in_flight: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    argon2_runs: std::sync::atomic::AtomicU64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let rng = ring::rand::SystemRandom::new();
        let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
            .expect("the system random number generator works");
        Verifier {
            permits: tokio::sync::Semaphore::new(cpus),
            key,
            verified: Default::default(),
            in_flight: Default::default(),
            argon2_runs: Default::default(),
        }
    }

    /// Verifies `password` for `username`, whose configured hash is `hash` (`None` when the
    /// user is unknown: a dummy hash is checked so the answer takes as long).
    pub async fn verify(&self, username: &str, password: SecretString, hash: Option<&str>) -> bool {
        let Some(hash) = hash else {
            self.argon2(password, DUMMY_HASH.to_string()).await;
            return false;
        };
        // Binding the hash in means a changed password in the configuration invalidates the
        // remembered success.
        let message = remembered_message(hash, &password);
        if self.remembers(username, &message) {
            return true;
        }
        let gate = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(username.to_string())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        if self.remembers(username, &message) {
            return true;
        }
        let ok = self.argon2(password, hash.to_string()).await;
        if ok {
            let tag = ring::hmac::sign(&self.key, &message);
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(username.to_string(), tag);
        }
        ok
    }

    fn remembers(&self, username: &str, message: &[u8]) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(username)
            // hmac::verify compares in constant time.
            .is_some_and(|tag| ring::hmac::verify(&self.key, message, tag.as_ref()).is_ok())
    }

    /// How many argon2 verifications ran (the expensive path).
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn argon2(&self, password: SecretString, hash: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        self.argon2_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || verify_blocking(password.expose_secret(), &hash))
            .await
            .unwrap_or(false)
    }
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
    fn hashes_asking_for_unbounded_work_are_refused() {
        let hash = hash_password("pw").unwrap();
        let (_, rest) = hash.split_once(",t=").unwrap();
        let (_, tail) = rest.split_once(",p=").unwrap();
        let with = |m: u32, t: u32| format!("$argon2id$v=19$m={m},t={t},p={tail}");
        // RFC 9106's recommendations: 2 GiB and one pass; 64 MiB and three passes.
        assert!(check_hash(&with(2 * 1024 * 1024, 1)).is_ok());
        assert!(check_hash(&with(64 * 1024, 3)).is_ok());
        assert!(check_hash(&with(u32::MAX, 1)).is_err(), "4 TiB");
        assert!(check_hash(&with(2 * 1024 * 1024 + 1, 1)).is_err());
        assert!(
            check_hash(&with(19456, u32::MAX)).is_err(),
            "hours per login"
        );
        assert!(check_hash(&with(1024 * 1024, 5)).is_err());
    }

    #[test]
    fn other_argon2_variants_and_parameters_verify() {
        use argon2::{Algorithm, Params, Version};
        for (algorithm, version) in [
            (Algorithm::Argon2i, Version::V0x10),
            (Algorithm::Argon2d, Version::V0x13),
            (Algorithm::Argon2id, Version::V0x13),
        ] {
            let params = Params::new(64, 1, 2, Some(16)).unwrap();
            let hash = Argon2::new(algorithm, version, params)
                .hash_password(b"pw")
                .unwrap()
                .to_string();
            assert!(verify_blocking("pw", &hash), "{hash}");
            assert!(!verify_blocking("pW", &hash), "{hash}");
        }
        // A hash without its output or salt never verifies.
        assert!(!verify_blocking("pw", "$argon2id$v=19$m=64,t=1,p=1"));
        assert!(!verify_blocking(
            "pw",
            "$argon2id$v=99$m=64,t=1,p=1$c2FsdHNhbHQ$AAAA"
        ));
    }

    #[test]
    fn shipped_demo_hash_is_the_demo_password() {
        assert!(check_hash(DEMO_PASSWORD_HASH).is_ok());
        assert!(is_demo_hash(DEMO_PASSWORD_HASH));
        assert!(!is_demo_hash(&hash_password("something else").unwrap()));
        assert!(check_hash(DUMMY_HASH).is_ok());
    }

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[tokio::test]
    async fn unknown_users_never_verify() {
        let v = Verifier::new();
        assert!(!v.verify("nobody", secret("x"), None).await);
        let hash = hash_password("pw").unwrap();
        assert!(v.verify("a", secret("pw"), Some(&hash)).await);
    }

    #[tokio::test]
    async fn a_remembered_success_skips_argon2_but_never_admits_another_password() {
        let v = Verifier::new();
        let hash = hash_password("right").unwrap();
        assert!(v.verify("a", secret("right"), Some(&hash)).await);
        assert_eq!(v.argon2_runs(), 1);
        assert!(v.verify("a", secret("right"), Some(&hash)).await);
        assert_eq!(
            v.argon2_runs(),
            1,
            "the second login is answered from memory"
        );
        assert!(!v.verify("a", secret("wrong"), Some(&hash)).await);
        assert_eq!(v.argon2_runs(), 2, "a wrong password always costs argon2");
        // The password changed in the configuration: the old one no longer works.
        let new_hash = hash_password("newer").unwrap();
        assert!(!v.verify("a", secret("right"), Some(&new_hash)).await);
        assert!(v.verify("a", secret("newer"), Some(&new_hash)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_logins_by_one_user_costs_one_argon2_run() {
        let v = Arc::new(Verifier::new());
        let hash = Arc::new(hash_password("right").unwrap());
        let logins: Vec<_> = (0..8)
            .map(|_| {
                let (v, hash) = (v.clone(), hash.clone());
                tokio::spawn(async move { v.verify("a", secret("right"), Some(&hash)).await })
            })
            .collect();
        for login in logins {
            assert!(login.await.unwrap());
        }
        assert_eq!(v.argon2_runs(), 1);
    }
}
