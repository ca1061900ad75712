//! Tokens: getting them, keeping them fresh, and saying why there is none.
//!
//! - [`endpoint`]: HTTP to the token endpoint (form POSTs, Entra's and Google's JSON answers).
//! - [`grants`]: the grants the daemon uses (client credentials with a secret or a signed
//!   assertion, refresh token) behind the [`TokenSource`] trait, so the refresh logic can be
//!   driven by a scripted source under tokio's paused clock.
//! - [`jwt`]: the client assertion (private_key_jwt) signed with the certificate's key.
//! - [`classify`]: endpoint failures sorted into "an administrator must act" and "try
//!   again later", with the AADSTS code and a one-line hint.
//! - [`manager`]: [`TokenManager`], the per-identity cache with single flight and the path
//!   sessions take; `slot` keeps one identity's token and state; `refresher` is the one
//!   background task (refresh ahead of expiry, back-off, keep-alive, the status file).
//! - [`login`]: the interactive `login` flows (device code, authorization code with PKCE).
//!
//! Sessions ask [`TokenManager::token`]; when a valid token is cached they never wait, and
//! otherwise they wait a bounded few seconds for the one request in flight.

pub mod classify;
pub mod endpoint;
pub mod grants;
pub mod jwt;
pub mod login;
pub mod manager;
mod refresher;
mod slot;
pub mod status;

use std::fmt;
use std::time::Duration;

use secrecy::SecretString;
use tokio::time::Instant;

pub use grants::{Grant, Granted, HttpTokenSource, TokenSource};
pub use manager::TokenManager;
pub use status::{IdentityStatus, State, StatusFile};

/// An access token and when it stops being usable.
#[derive(Clone)]
pub struct AccessToken {
    pub secret: SecretString,
    pub expires_at: Instant,
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[redacted]")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Why no token could be had. Messages carry the endpoint's error code and description
/// (AADSTS text), never a token or secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The grant or the application's credential is refused: retrying will not help until an
    /// administrator acts (new login, new secret, consent).
    #[error("account needs an administrator: {reason}")]
    NeedsLogin {
        reason: String,
        /// The endpoint's `error` field, e.g. `invalid_grant`.
        code: Option<String>,
        /// Entra's AADSTS number, when there is one.
        aadsts: Option<u32>,
        /// One line saying what to do.
        hint: String,
    },
    /// The endpoint is unavailable, throttling, or answered nonsense: try again later.
    #[error("token endpoint temporarily unavailable: {reason}")]
    Transient {
        reason: String,
        /// From a 429's `Retry-After`: not to be asked again before this.
        retry_after: Option<Duration>,
    },
    /// The bridge itself cannot proceed (store unreadable, no store open).
    #[error("{reason}")]
    Setup { reason: String },
}

impl TokenError {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, TokenError::Transient { .. })
    }

    pub(crate) fn transient(reason: impl Into<String>) -> TokenError {
        TokenError::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    /// A few words for the SMTP client's reply: enough for whoever reads a printer's log to
    /// know whom to call, nothing about the tenant.
    pub fn short_reason(&self) -> &'static str {
        match self {
            TokenError::NeedsLogin { code, .. } => match code.as_deref() {
                Some("invalid_client" | "unauthorized_client") => {
                    "the bridge's application credential is refused; an administrator must fix it"
                }
                None => {
                    "the bridge has no authorization for this mailbox; an administrator must log in"
                }
                Some(_) => {
                    "the mailbox authorization expired or was revoked; an administrator must log in again"
                }
            },
            TokenError::Setup { .. } => "the bridge cannot read its token store; see its log",
            TokenError::Transient { .. } => {
                "the mail provider's login service is unavailable, try again later"
            }
        }
    }
}
