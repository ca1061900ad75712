//! The record of access tokens the sandbox has issued, shared by the token endpoint (which
//! mints them) and the fake Office365 (which checks the bearer token in AUTH XOAUTH2).
//!
//! Tokens are shaped like Entra's (three base64url parts, roughly 2,000 characters) so the
//! bridge's line-length handling is exercised, but the registry alone decides validity: the
//! signature part is random bytes and nothing ever verifies it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::sandbox::{clock, random};

/// Entra access tokens observed in the wild are about 1,500 to 3,000 characters; the sandbox
/// aims for the middle of that range.
const TOKEN_LENGTH_RANGE: (usize, usize) = (1_800, 2_200);
/// An RS256 signature is 256 bytes, 342 base64url characters.
const SIGNATURE_BYTES: usize = 256;
/// A busy test should never be able to grow the registry without bound.
const MAX_TOKENS: usize = 10_000;

/// One access token the sandbox issued.
#[derive(Clone)]
pub struct IssuedToken {
    pub access_token: String,
    pub client_id: String,
    /// The mailbox for delegated tokens; `None` for app-only (client credentials) tokens.
    pub subject: Option<String>,
    pub scope: String,
    pub expires_at: Instant,
}

impl IssuedToken {
    /// True once the token's lifetime has run out.
    pub fn is_expired(&self) -> bool {
        Instant::now() >= self.expires_at
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("access_token", &"[redacted]")
            .field("client_id", &self.client_id)
            .field("subject", &self.subject)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Access tokens issued so far, by token text.
pub struct TokenRegistry {
    /// Sandbox tenant id written into the token claims (`tid`), fixed per registry.
    tenant_id: String,
    tokens: Mutex<HashMap<String, IssuedToken>>,
}

impl TokenRegistry {
    pub fn new() -> TokenRegistry {
        TokenRegistry {
            tenant_id: random::guid(),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// Mint an Entra-shaped access token, record it and return it.
    pub fn issue(
        &self,
        client_id: &str,
        subject: Option<&str>,
        scope: &str,
        lifetime: Duration,
    ) -> IssuedToken {
        let token = IssuedToken {
            access_token: self.mint(client_id, subject, scope, lifetime),
            client_id: client_id.to_string(),
            subject: subject.map(str::to_string),
            scope: scope.to_string(),
            expires_at: far_future_saturating(lifetime),
        };
        self.insert(token.clone());
        token
    }

    /// Record a token made elsewhere (tests use this to plant tokens with odd properties).
    pub fn insert(&self, token: IssuedToken) {
        let mut tokens = self.lock();
        tokens.retain(|_, t| !t.is_expired());
        if tokens.len() >= MAX_TOKENS {
            // Evict the token closest to expiry: it is the least useful one to keep.
            let oldest = tokens
                .iter()
                .min_by_key(|(_, t)| t.expires_at)
                .map(|(k, _)| k.clone());
            if let Some(key) = oldest {
                tokens.remove(&key);
            }
        }
        tokens.insert(token.access_token.clone(), token);
    }

    /// The record for `access_token`, expired or not.
    pub fn lookup(&self, access_token: &str) -> Option<IssuedToken> {
        self.lock().get(access_token).cloned()
    }

    /// Forget a token, as a revocation would. Returns whether it was known.
    pub fn revoke(&self, access_token: &str) -> bool {
        self.lock().remove(access_token).is_some()
    }

    /// Tokens currently recorded (expired ones are pruned lazily).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, IssuedToken>> {
        // A panic elsewhere while holding the lock leaves a map that is still consistent.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mint(
        &self,
        client_id: &str,
        subject: Option<&str>,
        scope: &str,
        lifetime: Duration,
    ) -> String {
        let thumbprint = random::base64url(20);
        let header = json!({
            "typ": "JWT",
            "nonce": random::base64url(32),
            "alg": "RS256",
            "x5t": thumbprint,
            "kid": thumbprint,
        });
        let now = clock::unix_millis() / 1000;
        let mut claims = json!({
            "aud": "https://outlook.office.com",
            "iss": format!("https://sts.windows.net/{}/", self.tenant_id),
            "iat": now,
            "nbf": now,
            "exp": now.saturating_add(lifetime.as_secs()),
            "app_displayname": "smtp-oauth-bridge sandbox",
            "appid": client_id,
            "appidacr": "1",
            "oid": random::guid(),
            "tid": self.tenant_id,
            "uti": random::base64url(16),
            "ver": "1.0",
        });
        match subject {
            Some(user) => {
                claims["scp"] = json!(scope_permissions(scope));
                claims["upn"] = json!(user);
                claims["unique_name"] = json!(user);
            }
            None => claims["roles"] = json!(["SMTP.SendAsApp"]),
        }

        let header_text = URL_SAFE_NO_PAD.encode(header.to_string());
        let signature = random::base64url(SIGNATURE_BYTES);
        let unpadded = header_text.len() + 1 + URL_SAFE_NO_PAD.encode(claims.to_string()).len();
        let target = random::in_range(TOKEN_LENGTH_RANGE.0, TOKEN_LENGTH_RANGE.1);
        let missing = target.saturating_sub(unpadded + 1 + signature.len());
        // Real tokens carry many more claims; a filler claim brings the size into the real
        // range. Every 4 base64 characters carry 3 JSON bytes, and the claim's own key and
        // quotes take 13 of them.
        let filler_chars = (missing * 3 / 4).saturating_sub(13);
        if filler_chars > 0 {
            let filler = random::base64url(filler_chars);
            claims["xms_sbx"] = json!(&filler[..filler_chars.min(filler.len())]);
        }
        let payload_text = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header_text}.{payload_text}.{signature}")
    }
}

impl Default for TokenRegistry {
    fn default() -> Self {
        TokenRegistry::new()
    }
}

impl fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("tokens", &self.len())
            .finish_non_exhaustive()
    }
}

/// `now + lifetime`, or about a century ahead when the sum would overflow `Instant`.
fn far_future_saturating(lifetime: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(lifetime)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// The `scp` claim lists permission names without their resource prefix.
fn scope_permissions(scope: &str) -> String {
    scope
        .split_whitespace()
        .map(|s| s.rsplit('/').next().unwrap_or(s))
        .filter(|s| !matches!(*s, "offline_access" | "openid" | "profile" | "email"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_jwt_shaped_and_entra_sized() {
        let registry = TokenRegistry::new();
        for _ in 0..20 {
            let t = registry.issue(
                "client",
                Some("user@example.test"),
                "https://outlook.office.com/SMTP.Send offline_access",
                Duration::from_secs(60),
            );
            let len = t.access_token.len();
            assert!((1_750..=2_250).contains(&len), "length {len}");
            let parts: Vec<&str> = t.access_token.split('.').collect();
            assert_eq!(parts.len(), 3);
            let claims: serde_json::Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
            assert_eq!(claims["upn"], "user@example.test");
            assert_eq!(claims["scp"], "SMTP.Send");
            assert!(registry.lookup(&t.access_token).is_some());
        }
        assert_eq!(registry.len(), 20);
    }

    #[test]
    fn expired_tokens_are_pruned_and_debug_is_redacted() {
        let registry = TokenRegistry::new();
        let old = registry.issue("c", None, "s/.default", Duration::ZERO);
        assert!(old.is_expired());
        let fresh = registry.issue("c", None, "s/.default", Duration::from_secs(60));
        assert!(registry.lookup(&old.access_token).is_none());
        assert!(!format!("{fresh:?}").contains(&fresh.access_token));
        assert!(registry.revoke(&fresh.access_token));
        assert!(registry.is_empty());
    }
}
