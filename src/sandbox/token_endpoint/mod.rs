//! An Entra-compatible v2.0 identity endpoint over HTTPS (PROTOCOL.md §2):
//!
//! - `POST /{tenant}/oauth2/v2.0/token` with the `client_credentials`, `refresh_token`
//!   (rotating, with a grace period for a used token), `authorization_code` (PKCE S256) and
//!   device-code grants ([`grants`]), clients authenticated by secret or by a signed client
//!   assertion checked against a registered certificate ([`client_auth`]);
//! - `GET /{tenant}/oauth2/v2.0/authorize`, which "signs in" at once (the test plays the
//!   browser) and redirects to the loopback redirect URI, and
//!   `POST /{tenant}/oauth2/v2.0/devicecode`, whose codes the test approves or declines
//!   ([`interactive`]);
//! - Entra's JSON error shape and AADSTS codes, and scripted failures and slow answers for
//!   tests ([`errors`]).
//!
//! One request per connection, answered with `Connection: close`: token clients open few
//! connections, and it keeps the server free of keep-alive state.

mod client_auth;
mod errors;
mod grants;
mod interactive;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::sandbox::http::{self, HttpRequest, HttpResponse};
use crate::sandbox::{IDLE_TIMEOUT, TokenRegistry, bind_loopback};
use errors::lock;
use grants::RefreshGrant;
use interactive::{AuthCode, DeviceGrant};

/// The record of token requests keeps the most recent entries only, so a long sandbox run
/// stays small.
const MAX_RECORDED_REQUESTS: usize = 10_000;

/// How the token endpoint behaves.
#[derive(Clone)]
pub struct TokenEndpointConfig {
    /// Confidential applications (client id and secret or certificate). Any other client id
    /// is treated as a public client, which may use the delegated grants without a secret.
    pub clients: Vec<ClientRegistration>,
    /// Reported as `expires_in` and `ext_expires_in`.
    pub access_token_lifetime: Duration,
    /// Entra rotates: each refresh returns a new refresh token. When false, refresh responses
    /// carry no `refresh_token` and the old one stays valid.
    pub rotate_refresh_tokens: bool,
    /// A refresh token that has been used stays valid this long, then is `invalid_grant`.
    pub used_refresh_token_grace: Duration,
    /// How long a device code may wait for its user (Entra: 15 minutes).
    pub device_code_lifetime: Duration,
    /// The device-code polling interval announced (Entra: 5 seconds). Polling faster gets
    /// `slow_down`.
    pub device_interval: Duration,
    /// Who signs in at the authorize endpoint when the request carries no `login_hint`.
    pub interactive_user: String,
}

impl Default for TokenEndpointConfig {
    fn default() -> Self {
        TokenEndpointConfig {
            clients: Vec::new(),
            access_token_lifetime: Duration::from_secs(3599),
            rotate_refresh_tokens: true,
            used_refresh_token_grace: Duration::from_secs(60),
            device_code_lifetime: Duration::from_secs(900),
            device_interval: Duration::from_secs(5),
            interactive_user: "user@sandbox.onmicrosoft.test".into(),
        }
    }
}

impl fmt::Debug for TokenEndpointConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpointConfig")
            .field("clients", &self.clients)
            .field("access_token_lifetime", &self.access_token_lifetime)
            .field("rotate_refresh_tokens", &self.rotate_refresh_tokens)
            .field("used_refresh_token_grace", &self.used_refresh_token_grace)
            .field("device_code_lifetime", &self.device_code_lifetime)
            .field("device_interval", &self.device_interval)
            .finish_non_exhaustive()
    }
}

/// A confidential application registration: a secret, a certificate, or both.
#[derive(Clone)]
pub struct ClientRegistration {
    pub client_id: String,
    /// Empty when the application has no secret (then every secret is refused).
    pub client_secret: String,
    /// The certificate whose key signs this client's assertions.
    pub certificate: Option<CertificateDer<'static>>,
}

impl ClientRegistration {
    pub fn new(client_id: &str, client_secret: &str) -> ClientRegistration {
        ClientRegistration {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            certificate: None,
        }
    }

    /// An application that authenticates with signed assertions only.
    pub fn with_certificate(client_id: &str, certificate: CertificateDer<'static>) -> Self {
        ClientRegistration {
            client_id: client_id.to_string(),
            client_secret: String::new(),
            certificate: Some(certificate),
        }
    }
}

impl fmt::Debug for ClientRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRegistration")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("certificate", &self.certificate.is_some())
            .finish()
    }
}

/// A scripted answer that replaces the normal one (see [`TokenEndpoint::fail_next`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFailure {
    /// HTTP 500 with an Entra `server_error` body.
    Status500,
    /// HTTP 429 with `Retry-After`, as Entra throttles client credentials (§2.9).
    TooManyRequests { retry_after_secs: u64 },
    /// HTTP 200 whose body is `<html>oops` as `text/html`.
    Garbage,
    /// HTTP 400 `invalid_grant`, AADSTS70008.
    InvalidGrant,
    /// HTTP 503 `temporarily_unavailable`, AADSTS90033.
    TemporarilyUnavailable,
    /// HTTP 400 `invalid_client`, AADSTS7000222 (the client secret expired).
    ExpiredSecret,
    /// HTTP 400 `slow_down` (RFC 8628) to a device-code poll.
    SlowDown,
}

/// What one POST to the token path carried. Never holds a secret or a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The `{tenant}` path segment.
    pub tenant: String,
    pub grant_type: Option<String>,
    /// From the body, or from the Basic header when the body has none.
    pub client_id: Option<String>,
    pub scope: Option<String>,
    /// A client secret came in the body or in a Basic header.
    pub secret_sent: bool,
    /// Client credentials came in an HTTP Basic header.
    pub basic_auth: bool,
    /// A `refresh_token` parameter was present.
    pub refresh_token_sent: bool,
    /// The client assertion, when one was presented and could be read.
    pub assertion: Option<AssertionSeen>,
    /// A PKCE `code_verifier` came with an authorization code.
    pub code_verifier_sent: bool,
    /// The HTTP status of the answer.
    pub status: u16,
}

/// The readable parts of a client assertion, for tests to check what the bridge signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionSeen {
    /// `alg` from the header.
    pub alg: String,
    /// Which thumbprint header named the certificate: `x5t#S256` or `x5t`.
    pub thumbprint_header: String,
    /// `exp - nbf`, seconds.
    pub lifetime_secs: i64,
    /// The signature verified against the registered certificate and every claim held.
    pub valid: bool,
}

/// A running token endpoint on `127.0.0.1`. Dropping it stops the server.
pub struct TokenEndpoint {
    addr: SocketAddr,
    state: Arc<EndpointState>,
    accept_task: JoinHandle<()>,
}

impl TokenEndpoint {
    /// Bind `127.0.0.1:0` and serve. The TLS configuration is copied and limited to
    /// HTTP/1.1 through ALPN, since this server speaks nothing else.
    pub async fn start(
        tls: Arc<rustls::ServerConfig>,
        registry: Arc<TokenRegistry>,
        config: TokenEndpointConfig,
    ) -> std::io::Result<TokenEndpoint> {
        let mut tls = (*tls).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let (listener, addr) = bind_loopback().await?;
        let state = Arc::new(EndpointState {
            addr,
            registry,
            config,
            refresh_grants: Mutex::new(HashMap::new()),
            codes: Mutex::new(HashMap::new()),
            devices: Mutex::new(HashMap::new()),
            assertion_ids: Mutex::new(HashSet::new()),
            decline: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            script: Mutex::new(VecDeque::new()),
            delay: Mutex::new(Duration::ZERO),
        });

        let serve_state = Arc::clone(&state);
        let accept_task = crate::sandbox::spawn_accept_loop(listener, move |stream, peer| {
            let state = Arc::clone(&serve_state);
            let acceptor = acceptor.clone();
            let span = tracing::debug_span!("sandbox_token_endpoint", %peer);
            async move { serve_connection(stream, acceptor, state).await }.instrument(span)
        });
        tracing::debug!(%addr, "sandbox token endpoint listening");
        Ok(TokenEndpoint {
            addr,
            state,
            accept_task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT/{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self, tenant: &str) -> String {
        format!("{}/{tenant}/oauth2/v2.0/token", self.authority_url())
    }

    /// `https://127.0.0.1:PORT`, the stand-in for `https://login.microsoftonline.com`.
    pub fn authority_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Mint a refresh token for a delegated user, as an admin would get from an interactive
    /// login. The grant lasts 90 days unless used (and then rotated) or revoked.
    pub fn issue_refresh_token(&self, client_id: &str, subject: &str, scope: &str) -> String {
        self.state.new_refresh_token(client_id, subject, scope)
    }

    /// Revoke a refresh token, as a password reset would. Returns whether it was known.
    pub fn revoke_refresh_token(&self, refresh_token: &str) -> bool {
        lock(&self.state.refresh_grants)
            .remove(refresh_token)
            .is_some()
    }

    /// Whether `refresh_token` would be honoured now (known, not expired, not past its
    /// grace period after use).
    pub fn refresh_token_valid(&self, refresh_token: &str) -> bool {
        self.state.refresh_token_valid(refresh_token)
    }

    /// The user codes of device logins waiting for their user.
    pub fn pending_device_codes(&self) -> Vec<String> {
        self.state.pending_device_codes()
    }

    /// The user signs in with `user_code` as `subject`. Returns whether the code was pending.
    pub fn approve_device(&self, user_code: &str, subject: &str) -> bool {
        self.state.settle_device(user_code, Some(subject))
    }

    /// The user declines the device login. Returns whether the code was pending.
    pub fn decline_device(&self, user_code: &str) -> bool {
        self.state.settle_device(user_code, None)
    }

    /// From now on the authorize endpoint reports that the user declined consent.
    pub fn decline_authorizations(&self, decline: bool) {
        self.state.decline.store(decline, Ordering::SeqCst);
    }

    /// POSTs to the token path so far, whatever their outcome.
    pub fn request_count(&self) -> usize {
        self.state.request_count.load(Ordering::SeqCst)
    }

    /// The recorded POSTs to the token path, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        lock(&self.state.requests).clone()
    }

    /// The next `n` token requests get `failure` instead of their normal answer. Calls
    /// queue up: failures scripted earlier are answered first.
    pub fn fail_next(&self, n: usize, failure: TokenFailure) {
        lock(&self.state.script).extend(std::iter::repeat_n(failure, n));
    }

    /// Wait this long before answering each token request.
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.state.delay) = delay;
    }

    /// Stop accepting and drop open connections (dropping the endpoint does the same).
    pub fn shutdown(self) {}
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl fmt::Debug for TokenEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEndpoint")
            .field("addr", &self.addr)
            .field("config", &self.state.config)
            .finish_non_exhaustive()
    }
}

struct EndpointState {
    addr: SocketAddr,
    registry: Arc<TokenRegistry>,
    config: TokenEndpointConfig,
    refresh_grants: Mutex<HashMap<String, RefreshGrant>>,
    /// Authorization codes by code.
    codes: Mutex<HashMap<String, AuthCode>>,
    /// Device logins by device code.
    devices: Mutex<HashMap<String, DeviceGrant>>,
    /// `jti` of every assertion seen: a replayed assertion is refused.
    assertion_ids: Mutex<HashSet<String>>,
    decline: AtomicBool,
    requests: Mutex<Vec<TokenRequest>>,
    request_count: AtomicUsize,
    script: Mutex<VecDeque<TokenFailure>>,
    delay: Mutex<Duration>,
}

/// The endpoint a path names, with its tenant.
enum Route<'a> {
    Token(&'a str),
    DeviceCode(&'a str),
    Authorize(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix('/')?;
    let (tenant, tail) = rest.split_once('/')?;
    if tenant.is_empty() {
        return None;
    }
    match tail {
        "oauth2/v2.0/token" => Some(Route::Token(tenant)),
        "oauth2/v2.0/devicecode" => Some(Route::DeviceCode(tenant)),
        "oauth2/v2.0/authorize" => Some(Route::Authorize(tenant)),
        _ => None,
    }
}

async fn serve_connection(stream: TcpStream, acceptor: TlsAcceptor, state: Arc<EndpointState>) {
    let mut tls = match tokio::time::timeout(IDLE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };

    let response = match tokio::time::timeout(IDLE_TIMEOUT, http::read_request(&mut tls)).await {
        Ok(Ok(request)) => state.answer(&request).await,
        Ok(Err(error)) => match error.response() {
            Some(response) => {
                tracing::debug!(?error, "refusing a malformed HTTP request");
                response
            }
            None => return,
        },
        Err(_) => {
            tracing::debug!("request timed out");
            return;
        }
    };

    let written = tokio::time::timeout(IDLE_TIMEOUT, async {
        response.write_to(&mut tls).await?;
        tls.shutdown().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::debug!("client went away before the response was written");
    }
}

impl EndpointState {
    async fn answer(&self, request: &HttpRequest) -> HttpResponse {
        match route(request.path()) {
            Some(Route::Token(tenant)) => self.answer_token(tenant, request).await,
            Some(Route::DeviceCode(tenant)) => self.device_authorization(tenant, request),
            Some(Route::Authorize(tenant)) => self.authorize(tenant, request),
            None => HttpResponse::text(404, "Not Found"),
        }
    }

    async fn answer_token(&self, tenant: &str, request: &HttpRequest) -> HttpResponse {
        if request.method != "POST" {
            let message = format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {} request.",
                request.method
            );
            return errors::entra_error(400, "invalid_request", 900561, &message);
        }
        self.request_count.fetch_add(1, Ordering::SeqCst);

        let form = parse_form(request);
        let auth = client_auth::client_auth(request, &form);
        let basic_auth = request.header("authorization").is_some();
        let client_id = match &auth {
            Ok(auth) => auth.client_id.clone(),
            Err(_) => form.get("client_id").cloned(),
        };
        let assertion = form
            .get("client_assertion")
            .map(|jwt| self.read_assertion(tenant, client_id.as_deref(), jwt));

        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let scripted = lock(&self.script).pop_front();
        let response = match (scripted, auth) {
            (Some(failure), _) => errors::scripted_failure(&failure),
            (None, Err(response)) => response,
            (None, Ok(auth)) => self.grant(tenant, &form, &auth, assertion.as_ref()),
        };

        let record = TokenRequest {
            tenant: tenant.to_string(),
            grant_type: form.get("grant_type").cloned(),
            client_id,
            scope: form.get("scope").cloned(),
            secret_sent: basic_auth || form.contains_key("client_secret"),
            basic_auth,
            refresh_token_sent: form.contains_key("refresh_token"),
            assertion: assertion.and_then(|a| a.ok()),
            code_verifier_sent: form.contains_key("code_verifier"),
            status: response.status,
        };
        tracing::debug!(
            grant_type = ?record.grant_type,
            client_id = ?record.client_id,
            status = record.status,
            "token request answered"
        );
        let mut requests = lock(&self.requests);
        if requests.len() >= MAX_RECORDED_REQUESTS {
            requests.remove(0);
        }
        requests.push(record);
        drop(requests);
        response
    }

    fn registration(&self, client_id: &str) -> Option<&ClientRegistration> {
        self.config
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
    }
}

/// The form body as a map; the first occurrence of a repeated parameter wins. A body that
/// is not form-encoded reads as empty, so Entra's "must contain grant_type" follows.
fn parse_form(request: &HttpRequest) -> HashMap<String, String> {
    let is_form = request.header("content-type").is_some_and(|v| {
        v.split(';').next().is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    });
    let mut form = HashMap::new();
    if is_form {
        for (key, value) in url::form_urlencoded::parse(&request.body) {
            form.entry(key.into_owned())
                .or_insert_with(|| value.into_owned());
        }
    }
    form
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert!(matches!(
            route("/common/oauth2/v2.0/token"),
            Some(Route::Token("common"))
        ));
        assert!(route("//oauth2/v2.0/token").is_none());
        assert!(matches!(
            route("/t/oauth2/v2.0/devicecode"),
            Some(Route::DeviceCode("t"))
        ));
        assert!(matches!(
            route("/t/oauth2/v2.0/authorize"),
            Some(Route::Authorize("t"))
        ));
        assert!(route("/t/oauth2/token").is_none());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let config = TokenEndpointConfig {
            clients: vec![ClientRegistration::new("id", "very-secret")],
            ..TokenEndpointConfig::default()
        };
        let text = format!("{config:?}");
        assert!(text.contains("id") && !text.contains("very-secret"));
    }
}
