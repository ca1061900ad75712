//! `smtp-oauth-bridge login IDENTITY`: giving an identity its grant.
//!
//! - Delegated identities sign a user in: with a device code ([`device`], for headless
//!   servers: a URL and a code to type on any other device), or with the authorization code
//!   flow and PKCE ([`browser`]: a loopback listener catches the browser's redirect, and a
//!   redirect address pasted on standard input works too, for machines without a browser).
//!   The refresh token is stored with the token endpoint that issued it.
//! - App-only identities (client credentials, with a secret or a certificate) have nothing to
//!   sign in; `login` makes one token request to prove the credential works and caches the
//!   token.
//!
//! The command prints to standard output and reads pasted addresses from standard input; the
//! steps are library functions so the tests drive them against the sandbox.

pub mod browser;
pub mod device;

use std::io::Write;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::config::{Flow, Identity};
use crate::oauth::endpoint::{Http, TokenAnswer};
use crate::oauth::grants::{Grant, HttpTokenSource, TokenSource};
use crate::oauth::{TokenError, status};
use crate::store::{Store, TokenRecord, unix_now};

/// How a delegated login signs the user in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Device code: a URL and a code for any browser anywhere.
    Device,
    /// Authorization code + PKCE with a loopback listener (a pasted address also works).
    Browser,
    /// Authorization code + PKCE without a listener: the redirect address is pasted.
    Paste,
}

/// Why a login did not end with a stored grant.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{0}")]
    Unsupported(String),
    #[error("the sign-in was declined: {0}")]
    Declined(String),
    #[error("the code expired before the sign-in finished; run login again")]
    Expired,
    #[error("the redirect does not belong to this login (state mismatch); nothing was stored")]
    StateMismatch,
    #[error("{0}")]
    BadRedirect(String),
    #[error("no sign-in within {} minutes", .0.as_secs() / 60)]
    TimedOut(Duration),
    #[error("the provider refused: {0}")]
    Refused(TokenError),
    #[error(
        "the answer had no refresh token; the scopes must include offline access (Entra: offline_access)"
    )]
    NoRefreshToken,
    #[error("cannot store the tokens: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Io(String),
}

/// The method used when the command line names none: a device code where the provider has
/// a device endpoint (Entra), the browser flow otherwise (Gmail allows no mail scope in its
/// device flow).
pub fn default_method(identity: &Identity) -> Method {
    if identity.oauth.device_code_url.is_some() {
        Method::Device
    } else {
        Method::Browser
    }
}

/// How to run one login.
pub struct Request<'a> {
    pub method: Method,
    /// How long a browser sign-in may take.
    pub timeout: Duration,
    /// Lines typed on standard input (pasted redirect addresses).
    pub pasted: Option<mpsc::Receiver<String>>,
    /// The user to sign in as, when the identity's accounts share one mailbox.
    pub login_hint: Option<&'a str>,
}

/// Runs the login for `identity` and stores what it obtained.
pub async fn login(
    identity: &Identity,
    http: &Http,
    store: &Store,
    request: Request<'_>,
    out: &mut (dyn Write + Send),
) -> Result<(), LoginError> {
    match identity.oauth.flow {
        Flow::ClientCredentials => check_app_only(identity, http, store, out).await,
        Flow::RefreshToken => {
            let answer = match request.method {
                Method::Device => device::sign_in(identity, http, out).await?,
                Method::Browser | Method::Paste => {
                    browser::sign_in(
                        identity,
                        http,
                        request.method,
                        out,
                        request.timeout,
                        request.pasted,
                        request.login_hint,
                    )
                    .await?
                }
            };
            save_grant(identity, store, answer, out)
        }
    }
}

async fn check_app_only(
    identity: &Identity,
    http: &Http,
    store: &Store,
    out: &mut (dyn Write + Send),
) -> Result<(), LoginError> {
    let source = HttpTokenSource::new(http.clone());
    let granted = source
        .request(identity, Grant::ClientCredentials)
        .await
        .map_err(LoginError::Refused)?;
    let now = unix_now();
    let mut record = store
        .load(&identity.name)
        .ok()
        .flatten()
        .unwrap_or_default();
    record.access_token = Some(granted.access_token);
    record.access_token_expires = Some(now + granted.lifetime.as_secs());
    record.last_refresh = Some(now);
    store.save(&identity.name, &record)?;
    say(
        out,
        &format!(
            "The {} of identity {} works: an access token was issued (valid {}). Nothing else \
             to sign in for an app-only identity.",
            identity.oauth.credential.kind(),
            identity.name,
            status::age(granted.lifetime.as_secs())
        ),
    );
    Ok(())
}

/// Stores the new grant, with the endpoint that issued it, durably.
fn save_grant(
    identity: &Identity,
    store: &Store,
    answer: TokenAnswer,
    out: &mut (dyn Write + Send),
) -> Result<(), LoginError> {
    let refresh_token = answer.refresh_token.ok_or(LoginError::NoRefreshToken)?;
    let now = unix_now();
    let lifetime = answer
        .expires_in
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(3600));
    let record = TokenRecord {
        refresh_token: Some(refresh_token),
        authority: Some(identity.oauth.token_url.clone()),
        refresh_token_received: Some(now),
        refresh_token_used: Some(now),
        access_token: Some(answer.access_token),
        access_token_expires: Some(now + lifetime.as_secs()),
        last_refresh: Some(now),
    };
    store.save(&identity.name, &record)?;
    say(
        out,
        &format!(
            "Signed in. The refresh token of identity {} is stored (encrypted) in {}, with the \
             endpoint that issued it ({}). A running bridge uses it from its next refresh (within \
             30 seconds if the identity was waiting for a login).",
            identity.name,
            store.dir().display(),
            identity.oauth.token_url
        ),
    );
    Ok(())
}

/// One line for the administrator; a closed standard output does not stop the login.
pub(crate) fn say(out: &mut (dyn Write + Send), line: &str) {
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
