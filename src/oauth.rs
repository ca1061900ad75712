//! Access tokens: requesting them from the token endpoint (client credentials or refresh
//! token), caching them in memory until shortly before expiry, and classifying failures into
//! "an administrator must act" and "try again later".
//!
//! One request per account at a time (single flight): concurrent sessions that find no valid
//! token wait for the same request instead of each minting their own. A session that finds a
//! valid token never waits on anything.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponse, BasicErrorResponseType};
use oauth2::{
    AuthType, ClientId, ClientSecret, HttpRequest, HttpResponse, RefreshToken, RequestTokenError,
    Scope, TokenResponse, TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::config::{Account, Flow, OAuthSettings};
use crate::store::Store;

/// A token is refreshed when less than this much of its life is left. Microsoft's
/// high-volume endpoint refuses tokens that expire within about ten minutes.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(10 * 60);

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
    NeedsLogin { reason: String },
    /// The endpoint is unavailable, throttling, or answered nonsense: try again later.
    #[error("token endpoint temporarily unavailable: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The bridge itself cannot proceed (store unreadable, no refresh token imported).
    #[error("{reason}")]
    Setup { reason: String },
}

impl TokenError {
    pub fn is_permanent(&self) -> bool {
        !matches!(self, TokenError::Transient { .. })
    }
}

/// What the HTTP adapter reports when the exchange itself failed (before OAuth semantics).
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
}

/// Hands out access tokens for every configured account.
pub struct TokenManager {
    http: HttpClient,
    store: Option<Arc<Store>>,
    accounts: HashMap<String, Arc<AccountTokens>>,
    metrics: Option<Arc<crate::ops::Metrics>>,
}

struct AccountTokens {
    name: String,
    settings: OAuthSettings,
    cached: Mutex<Option<AccessToken>>,
    /// Held while a token request is in flight: the single-flight gate.
    refreshing: tokio::sync::Mutex<()>,
    requests: std::sync::atomic::AtomicU64,
}

impl TokenManager {
    /// Builds the manager; `tls` is the same client config the SMTP upstream uses.
    pub fn new(
        accounts: &[Account],
        tls: &Arc<rustls::ClientConfig>,
        request_timeout: Duration,
        store: Option<Arc<Store>>,
    ) -> Result<TokenManager, String> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured((**tls).clone())
            // A token endpoint that redirects is misconfigured or hostile; following it could
            // send the client secret elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(request_timeout)
            .user_agent(concat!("smtp-oauth-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let accounts = accounts
            .iter()
            .map(|a| {
                let tokens = AccountTokens {
                    name: a.name.clone(),
                    settings: OAuthSettings {
                        flow: a.oauth.flow,
                        token_url: a.oauth.token_url.clone(),
                        client_id: a.oauth.client_id.clone(),
                        client_secret: a.oauth.client_secret.clone(),
                        scopes: a.oauth.scopes.clone(),
                    },
                    cached: Mutex::new(None),
                    refreshing: tokio::sync::Mutex::new(()),
                    requests: Default::default(),
                };
                (a.name.clone(), Arc::new(tokens))
            })
            .collect();
        Ok(TokenManager {
            http: HttpClient(http),
            store,
            accounts,
            metrics: None,
        })
    }

    /// Reports every token request and its outcome to `metrics` (refresh counts, expiry,
    /// accounts needing login).
    pub fn with_metrics(mut self, metrics: Arc<crate::ops::Metrics>) -> TokenManager {
        self.metrics = Some(metrics);
        self
    }

    /// A valid access token for `account`, from the cache when one has enough life left.
    pub async fn token(&self, account: &str) -> Result<AccessToken, TokenError> {
        let tokens = self.account(account)?;
        if let Some(token) = tokens.usable() {
            return Ok(token);
        }
        let _gate = tokens.refreshing.lock().await;
        // Another session may have fetched one while we waited for the gate.
        if let Some(token) = tokens.usable() {
            return Ok(token);
        }
        self.fetch(&tokens).await
    }

    /// Drops the cached token of `account` (the upstream refused it) and fetches a new one,
    /// unless another session already replaced the refused token.
    pub async fn replace(
        &self,
        account: &str,
        refused: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let tokens = self.account(account)?;
        let _gate = tokens.refreshing.lock().await;
        if let Some(current) = tokens.usable()
            && current.secret.expose_secret() != refused.secret.expose_secret()
        {
            return Ok(current);
        }
        self.fetch(&tokens).await
    }

    /// How many token requests were made for `account` (all outcomes).
    pub fn request_count(&self, account: &str) -> u64 {
        self.accounts
            .get(account)
            .map(|t| t.requests.load(std::sync::atomic::Ordering::Relaxed))
            .unwrap_or(0)
    }

    fn account(&self, name: &str) -> Result<Arc<AccountTokens>, TokenError> {
        self.accounts
            .get(name)
            .cloned()
            .ok_or_else(|| TokenError::Setup {
                reason: format!("no account named {name}"),
            })
    }

    async fn fetch(&self, tokens: &AccountTokens) -> Result<AccessToken, TokenError> {
        tokens
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics
            .iter()
            .for_each(|m| m.token_refreshing(&tokens.name));
        let result = match tokens.settings.flow {
            Flow::ClientCredentials => self.client_credentials(&tokens.settings).await,
            Flow::RefreshToken => self.refresh(&tokens.name, &tokens.settings).await,
        };
        self.metrics
            .iter()
            .for_each(|m| m.token_result(&tokens.name, &result));
        match &result {
            Ok(token) => {
                let left = token.expires_at.saturating_duration_since(Instant::now());
                tracing::info!(
                    account = %tokens.name,
                    expires_in_s = left.as_secs(),
                    "access token obtained"
                );
                *tokens.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
            }
            Err(e) if e.is_permanent() => {
                tracing::error!(account = %tokens.name, error = %e, fix = crate::hints::fix_for_text(&e.to_string()), "cannot obtain an access token");
            }
            Err(e) => {
                tracing::warn!(account = %tokens.name, error = %e, fix = crate::hints::fix_for_text(&e.to_string()), "cannot obtain an access token");
            }
        }
        result
    }

    async fn client_credentials(&self, s: &OAuthSettings) -> Result<AccessToken, TokenError> {
        let client = oauth_client(s)?;
        let mut request = client.exchange_client_credentials();
        for scope in &s.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let response = request.request_async(&self.http).await.map_err(classify)?;
        Ok(access_token(&response))
    }

    async fn refresh(&self, account: &str, s: &OAuthSettings) -> Result<AccessToken, TokenError> {
        let store = self.store.as_ref().ok_or_else(|| TokenError::Setup {
            reason: "no token store is open".into(),
        })?;
        let refresh_token = store
            .load_refresh_token(account)
            .map_err(|e| TokenError::Setup {
                reason: e.to_string(),
            })?
            .ok_or_else(|| TokenError::NeedsLogin {
                reason: format!(
                    "no refresh token stored; run `smtp-oauth-bridge import-token {account}`"
                ),
            })?;
        let client = oauth_client(s)?;
        let refresh_token = RefreshToken::new(refresh_token.expose_secret().to_owned());
        let mut request = client.exchange_refresh_token(&refresh_token);
        // Entra refuses a refresh without scope (AADSTS900144).
        for scope in &s.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let response = request.request_async(&self.http).await.map_err(classify)?;
        // A rotated refresh token is on disk before the new access token is used: a crash
        // after this point loses nothing, a crash before it leaves the old token, which the
        // endpoint still honours.
        if let Some(rotated) = response.refresh_token() {
            let rotated = SecretString::from(rotated.secret().to_owned());
            store
                .save_refresh_token(account, &rotated)
                .map_err(|e| TokenError::Setup {
                    reason: format!("cannot save the rotated refresh token: {e}"),
                })?;
        }
        Ok(access_token(&response))
    }
}

impl AccountTokens {
    fn usable(&self) -> Option<AccessToken> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached
            .as_ref()
            .filter(|t| t.expires_at > Instant::now() + REFRESH_MARGIN)
            .cloned()
    }
}

type Client = oauth2::Client<
    BasicErrorResponse,
    oauth2::basic::BasicTokenResponse,
    oauth2::basic::BasicTokenIntrospectionResponse,
    oauth2::StandardRevocableToken,
    oauth2::basic::BasicRevocationErrorResponse,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
>;

fn oauth_client(s: &OAuthSettings) -> Result<Client, TokenError> {
    let token_url = TokenUrl::new(s.token_url.clone()).map_err(|_| TokenError::Setup {
        reason: "token_url is not a valid URL".into(),
    })?;
    let mut client = BasicClient::new(ClientId::new(s.client_id.clone()))
        .set_token_uri(token_url)
        // Entra documents the secret in the form body; Basic auth also works but body is
        // what every Microsoft sample uses.
        .set_auth_type(AuthType::RequestBody);
    if let Some(secret) = &s.client_secret {
        client = client.set_client_secret(ClientSecret::new(secret.expose_secret().to_owned()));
    }
    Ok(client)
}

fn access_token(response: &oauth2::basic::BasicTokenResponse) -> AccessToken {
    // Without expires_in, assume the common one-hour lifetime rather than "forever".
    let lifetime = response.expires_in().unwrap_or(Duration::from_secs(3600));
    AccessToken {
        secret: SecretString::from(response.access_token().secret().to_owned()),
        expires_at: Instant::now() + lifetime,
    }
}

/// oauth2's HTTP hook, implemented on a type (not a closure) so the future it returns is
/// `Send` for every borrow lifetime.
struct HttpClient(reqwest::Client);

impl<'c> oauth2::AsyncHttpClient<'c> for HttpClient {
    type Error = HttpError;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(send(&self.0, request))
    }
}

/// Sends an oauth2 request with reqwest. Throttling (429) and server errors (5xx) are turned
/// into an adapter error here, because oauth2 would otherwise drop the status code and the
/// Retry-After header that decide how long to wait.
async fn send(client: &reqwest::Client, request: HttpRequest) -> Result<HttpResponse, HttpError> {
    let request = reqwest::Request::try_from(request)
        .map_err(|e| HttpError::Transport(format!("bad request: {e}")))?;
    let response = client
        .execute(request)
        .await
        .map_err(|e| HttpError::Transport(describe_reqwest_error(&e)))?;
    let status = response.status();
    if status.as_u16() == 429 || status.is_server_error() {
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        return Err(HttpError::Status {
            status: status.as_u16(),
            retry_after,
        });
    }
    let mut builder = oauth2::http::Response::builder().status(status.as_u16());
    for (name, value) in response.headers() {
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| HttpError::Transport(describe_reqwest_error(&e)))?;
    builder
        .body(body.to_vec())
        .map_err(|e| HttpError::Transport(format!("bad response: {e}")))
}

/// reqwest's Display can include the URL, which is fine (no secrets in token URLs), but its
/// chain is what says "connection refused" or "certificate unknown"; keep both.
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn classify(e: RequestTokenError<HttpError, BasicErrorResponse>) -> TokenError {
    match e {
        RequestTokenError::ServerResponse(response) => {
            let description = response
                .error_description()
                .map(|d| first_line(d))
                .unwrap_or_default();
            let reason = format!("{}: {description}", response.error());
            match response.error() {
                BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient
                | BasicErrorResponseType::InvalidScope
                | BasicErrorResponseType::InvalidRequest
                | BasicErrorResponseType::UnsupportedGrantType => TokenError::NeedsLogin { reason },
                BasicErrorResponseType::Extension(code) => match code.as_str() {
                    "interaction_required" | "consent_required" | "login_required" => {
                        TokenError::NeedsLogin { reason }
                    }
                    _ => TokenError::Transient {
                        reason,
                        retry_after: None,
                    },
                },
            }
        }
        RequestTokenError::Request(HttpError::Status {
            status,
            retry_after,
        }) => TokenError::Transient {
            reason: if status == 429 {
                "throttled (HTTP 429)".into()
            } else {
                format!("server error (HTTP {status})")
            },
            retry_after,
        },
        RequestTokenError::Request(HttpError::Transport(reason)) => TokenError::Transient {
            reason,
            retry_after: None,
        },
        // The body may hold a token; say only that it could not be read.
        RequestTokenError::Parse(_, body) => TokenError::Transient {
            reason: format!("unreadable answer ({} bytes)", body.len()),
            retry_after: None,
        },
        RequestTokenError::Other(text) => TokenError::Transient {
            reason: text,
            retry_after: None,
        },
    }
}

/// Entra descriptions run on with trace and correlation ids; the first sentence with the
/// AADSTS code is what an administrator needs.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    line.chars().take(300).collect()
}
