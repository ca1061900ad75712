//! The grants the daemon makes: client credentials (with a client secret or a signed
//! assertion) and refresh token. Scopes go with every request, refreshes included, because
//! Entra refuses a refresh without them (AADSTS900144).
//!
//! [`TokenSource`] is the seam between "what to ask for" and "how it is asked": the daemon
//! uses [`HttpTokenSource`]; the refresh logic's tests use a scripted source under tokio's
//! paused clock, with no sockets.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::config::{ClientCredential, Identity, OAuthSettings};
use crate::oauth::TokenError;
use crate::oauth::classify::classify;
use crate::oauth::endpoint::{Http, TokenAnswer};
use crate::oauth::jwt;

/// Lifetime assumed when an answer has no `expires_in`: the common hour, never "forever".
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What to ask the token endpoint for.
pub enum Grant<'a> {
    ClientCredentials,
    /// Redeem a refresh token at the endpoint that issued it.
    Refresh {
        refresh_token: &'a SecretString,
        token_url: &'a str,
    },
}

/// A token endpoint's successful answer.
pub struct Granted {
    pub access_token: SecretString,
    /// From `expires_in` at receipt (never from the JWT, which the bridge does not parse).
    pub lifetime: Duration,
    /// A rotated refresh token, when the endpoint returned one.
    pub refresh_token: Option<SecretString>,
}

/// Something that answers token requests.
pub trait TokenSource: Send + Sync + 'static {
    fn request<'a>(
        &'a self,
        identity: &'a Identity,
        grant: Grant<'a>,
    ) -> BoxFuture<'a, Result<Granted, TokenError>>;
}

/// The real source: HTTPS to the identity's token endpoint.
pub struct HttpTokenSource {
    http: Http,
}

impl HttpTokenSource {
    pub fn new(http: Http) -> HttpTokenSource {
        HttpTokenSource { http }
    }

    async fn exchange(&self, identity: &Identity, grant: Grant<'_>) -> Result<Granted, TokenError> {
        let oauth = &identity.oauth;
        let scopes = oauth.scopes.join(" ");
        let (token_url, mut form) = match grant {
            Grant::ClientCredentials => (
                oauth.token_url.as_str(),
                Form::new()
                    .with("grant_type", "client_credentials")
                    .with("scope", &scopes),
            ),
            Grant::Refresh {
                refresh_token,
                token_url,
            } => (
                token_url,
                Form::new()
                    .with("grant_type", "refresh_token")
                    .with("refresh_token", refresh_token.expose_secret())
                    .with("scope", &scopes),
            ),
        };
        form.client(oauth, token_url)?;
        let answer = self
            .http
            .token(token_url, &form.pairs())
            .await
            .map_err(|e| classify(e, oauth.flow, &login_command(&identity.name)))?;
        Ok(granted(answer))
    }
}

impl TokenSource for HttpTokenSource {
    fn request<'a>(
        &'a self,
        identity: &'a Identity,
        grant: Grant<'a>,
    ) -> BoxFuture<'a, Result<Granted, TokenError>> {
        Box::pin(self.exchange(identity, grant))
    }
}

/// The answer as the refresh logic keeps it.
pub(crate) fn granted(answer: TokenAnswer) -> Granted {
    Granted {
        access_token: answer.access_token,
        lifetime: answer
            .expires_in
            .filter(|d| !d.is_zero())
            .unwrap_or(DEFAULT_LIFETIME),
        refresh_token: answer.refresh_token,
    }
}

/// What an administrator types to give an identity a new grant.
pub fn login_command(identity: &str) -> String {
    format!("smtp-oauth-bridge login {identity}")
}

/// A form body whose values are wiped when it is dropped (they include secrets).
pub(crate) struct Form(Vec<(&'static str, Zeroizing<String>)>);

impl Form {
    pub(crate) fn new() -> Form {
        Form(Vec::with_capacity(8))
    }

    pub(crate) fn with(mut self, name: &'static str, value: &str) -> Form {
        self.0.push((name, Zeroizing::new(value.to_owned())));
        self
    }

    /// Adds how the application authenticates: its id, and its secret or a fresh assertion
    /// for `audience` (the token URL). A public client sends its id only.
    pub(crate) fn client(
        &mut self,
        oauth: &OAuthSettings,
        audience: &str,
    ) -> Result<(), TokenError> {
        self.0
            .push(("client_id", Zeroizing::new(oauth.client_id.clone())));
        match &oauth.credential {
            ClientCredential::None => {}
            ClientCredential::Secret(secret) => self.0.push((
                "client_secret",
                Zeroizing::new(secret.expose_secret().to_owned()),
            )),
            ClientCredential::Certificate(cert) => {
                let assertion = jwt::client_assertion(
                    cert,
                    &oauth.client_id,
                    audience,
                    crate::store::unix_now(),
                )
                .map_err(|e| TokenError::Setup {
                    reason: format!("cannot make the client assertion: {e}"),
                })?;
                self.0.push((
                    "client_assertion_type",
                    Zeroizing::new(jwt::ASSERTION_TYPE.to_owned()),
                ));
                self.0.push(("client_assertion", Zeroizing::new(assertion)));
            }
        }
        Ok(())
    }

    pub(crate) fn pairs(&self) -> Vec<(&str, &str)> {
        self.0.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
}
