//! What the store keeps per identity, and its JSON form inside the sealed file.
//!
//! Times are Unix seconds (wall clock), because they must survive a restart; the refresh
//! task turns them back into monotonic instants when it loads a record.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

/// One identity's tokens and their history.
#[derive(Default)]
pub struct TokenRecord {
    pub refresh_token: Option<SecretString>,
    /// The token endpoint that issued the refresh token; refreshes go back there, since
    /// another authority refuses the grant (AADSTS7000012).
    pub authority: Option<String>,
    /// When the current refresh token was received.
    pub refresh_token_received: Option<u64>,
    /// When a refresh token of this grant was last redeemed (the inactivity clock).
    pub refresh_token_used: Option<u64>,
    pub access_token: Option<SecretString>,
    pub access_token_expires: Option<u64>,
    /// When the cached access token was obtained.
    pub last_refresh: Option<u64>,
}

impl fmt::Debug for TokenRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRecord")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .field("authority", &self.authority)
            .field("refresh_token_received", &self.refresh_token_received)
            .field("refresh_token_used", &self.refresh_token_used)
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "[redacted]"),
            )
            .field("access_token_expires", &self.access_token_expires)
            .field("last_refresh", &self.last_refresh)
            .finish()
    }
}

/// The serialised form; its strings are wiped when it is dropped.
#[derive(Serialize, Deserialize, Default)]
struct Wire {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    authority: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_received: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_used: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access_token_expires: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_refresh: Option<u64>,
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.refresh_token.zeroize();
        self.access_token.zeroize();
    }
}

impl TokenRecord {
    pub(super) fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let wire = Wire {
            refresh_token: self
                .refresh_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            authority: self.authority.clone(),
            refresh_token_received: self.refresh_token_received,
            refresh_token_used: self.refresh_token_used,
            access_token: self
                .access_token
                .as_ref()
                .map(|t| t.expose_secret().to_owned()),
            access_token_expires: self.access_token_expires,
            last_refresh: self.last_refresh,
        };
        // Serialising plain strings and numbers cannot fail.
        Zeroizing::new(serde_json::to_vec(&wire).unwrap_or_default())
    }

    pub(super) fn from_json(bytes: &[u8]) -> Option<TokenRecord> {
        let mut wire: Wire = serde_json::from_slice(bytes).ok()?;
        Some(TokenRecord {
            refresh_token: wire.refresh_token.take().map(SecretString::from),
            authority: wire.authority.take(),
            refresh_token_received: wire.refresh_token_received,
            refresh_token_used: wire.refresh_token_used,
            access_token: wire.access_token.take().map(SecretString::from),
            access_token_expires: wire.access_token_expires,
            last_refresh: wire.last_refresh,
        })
    }
}

/// Seconds since the Unix epoch; a clock before 1970 reads as the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
