//! An Entra-compatible v2.0 token endpoint over HTTPS: `POST /{tenant}/oauth2/v2.0/token`
//! with the `client_credentials` and `refresh_token` grants, Entra's JSON error shape and
//! AADSTS codes (PROTOCOL.md §2.1, §2.2, §2.5–2.7, §2.9), and scripted failures for tests.
//!
//! One request per connection, answered with `Connection: close`: token clients open few
//! connections, and it keeps the server free of keep-alive state.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;
use url::form_urlencoded;

use crate::sandbox::http::{self, HttpRequest, HttpResponse};
use crate::sandbox::{IDLE_TIMEOUT, TokenRegistry, bind_loopback, clock, random};

/// Entra's default refresh-token lifetime (PROTOCOL.md §2.6).
const REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Entra refresh tokens are opaque, about 800 characters, and start with "0.A".
const REFRESH_TOKEN_RANDOM_BYTES: usize = 597;
/// Scopes that ask for sign-in artefacts rather than an API permission; Entra leaves them
/// out of the `scope` it returns with the access token.
const NON_RESOURCE_SCOPES: [&str; 4] = ["offline_access", "openid", "profile", "email"];
/// The request log keeps the most recent entries only, so a long sandbox run stays small.
const MAX_RECORDED_REQUESTS: usize = 10_000;
/// Tenants on which Entra refuses app-only grants (PROTOCOL.md §2.1).
const MULTI_TENANT_ALIASES: [&str; 2] = ["common", "consumers"];

/// How the token endpoint behaves.
#[derive(Clone)]
pub struct TokenEndpointConfig {
    /// Confidential applications (client id and secret). Any other client id is treated as a
    /// public client, which may only redeem refresh tokens issued to it.
    pub clients: Vec<ClientRegistration>,
    /// Reported as `expires_in` and `ext_expires_in`.
    pub access_token_lifetime: Duration,
    /// Entra rotates: each refresh returns a new refresh token. When false, refresh responses
    /// carry no `refresh_token` and the old one stays valid.
    pub rotate_refresh_tokens: bool,
    /// A refresh token that has been used stays valid this long, then is `invalid_grant`.
    pub used_refresh_token_grace: Duration,
}

impl Default for TokenEndpointConfig {
    fn default() -> Self {
        TokenEndpointConfig {
            clients: Vec::new(),
            access_token_lifetime: Duration::from_secs(3599),
            rotate_refresh_tokens: true,
            used_refresh_token_grace: Duration::from_secs(60),
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
            .finish()
    }
}

/// A confidential application registration.
#[derive(Clone)]
pub struct ClientRegistration {
    pub client_id: String,
    pub client_secret: String,
}

impl ClientRegistration {
    pub fn new(client_id: &str, client_secret: &str) -> ClientRegistration {
        ClientRegistration {
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
        }
    }
}

impl fmt::Debug for ClientRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientRegistration")
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
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
    /// The HTTP status of the answer.
    pub status: u16,
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
            registry,
            config,
            refresh_grants: Mutex::new(HashMap::new()),
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
    registry: Arc<TokenRegistry>,
    config: TokenEndpointConfig,
    refresh_grants: Mutex<HashMap<String, RefreshGrant>>,
    requests: Mutex<Vec<TokenRequest>>,
    request_count: AtomicUsize,
    script: Mutex<VecDeque<TokenFailure>>,
    delay: Mutex<Duration>,
}

/// What a refresh token stands for.
struct RefreshGrant {
    client_id: String,
    subject: String,
    scope: String,
    expires_at: Instant,
    /// Set on first redemption when rotating; the token dies a grace period later.
    used_at: Option<Instant>,
}

/// Client credentials as presented, before they are checked.
struct ClientAuth {
    client_id: Option<String>,
    /// The secret as sent; a Basic header may yield two spellings (decoded and raw).
    secret: Option<Vec<String>>,
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
        let Some(tenant) = token_path_tenant(request.path()) else {
            return HttpResponse::text(404, "Not Found");
        };
        if request.method != "POST" {
            let message = format!(
                "The endpoint only accepts POST, OPTIONS requests. Received a {} request.",
                request.method
            );
            return entra_error(400, "invalid_request", 900561, &message);
        }
        self.request_count.fetch_add(1, Ordering::SeqCst);

        let form = parse_form(request);
        let auth = client_auth(request, &form);
        let basic_auth = request.header("authorization").is_some();
        let client_id = match &auth {
            Ok(auth) => auth.client_id.clone(),
            Err(_) => form.get("client_id").cloned(),
        };

        let delay = *lock(&self.delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let scripted = lock(&self.script).pop_front();
        let response = match (scripted, auth) {
            (Some(failure), _) => scripted_failure(&failure),
            (None, Err(response)) => response,
            (None, Ok(auth)) => self.grant(tenant, &form, &auth),
        };

        let record = TokenRequest {
            tenant: tenant.to_string(),
            grant_type: form.get("grant_type").cloned(),
            client_id,
            scope: form.get("scope").cloned(),
            secret_sent: basic_auth || form.contains_key("client_secret"),
            basic_auth,
            refresh_token_sent: form.contains_key("refresh_token"),
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

    fn grant(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        auth: &ClientAuth,
    ) -> HttpResponse {
        match form.get("grant_type").map(String::as_str) {
            None => missing_parameter("grant_type"),
            Some("client_credentials") => self.client_credentials(tenant, form, auth),
            Some("refresh_token") => self.refresh(form, auth),
            Some(other) => entra_error(
                400,
                "unsupported_grant_type",
                70003,
                &format!(
                    "The app requested an unsupported grant type '{}'.",
                    printable(other, 64)
                ),
            ),
        }
    }

    /// App-only tokens (PROTOCOL.md §2.2, §2.3).
    fn client_credentials(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        auth: &ClientAuth,
    ) -> HttpResponse {
        if MULTI_TENANT_ALIASES.contains(&tenant.to_ascii_lowercase().as_str()) {
            return entra_error(
                400,
                "invalid_request",
                9001023,
                "The grant type isn't supported over the /common or /consumers endpoints. \
                 Please use the /organizations or tenant-specific endpoint.",
            );
        }
        let Some(client_id) = auth.client_id.as_deref() else {
            return missing_parameter("client_id");
        };
        let Some(scope) = form.get("scope") else {
            return missing_parameter("scope");
        };
        let Some(registration) = self.registration(client_id) else {
            return unknown_application(client_id, tenant);
        };
        if let Err(response) = check_secret(registration, auth.secret.as_deref()) {
            return response;
        }
        let scope = scope.trim();
        if scope.is_empty() || scope.contains(char::is_whitespace) || !scope.ends_with("/.default")
        {
            let message = format!(
                "The provided value for scope {} is not valid. Client credential flows must have \
                 a scope value with /.default suffixed to the resource identifier (application \
                 ID URI).",
                printable(scope, 200)
            );
            return entra_error(400, "invalid_scope", 1002012, &message);
        }

        let lifetime = self.config.access_token_lifetime;
        let issued = self.registry.issue(client_id, None, scope, lifetime);
        HttpResponse::json(
            200,
            &json!({
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs(),
                "ext_expires_in": lifetime.as_secs(),
                "access_token": issued.access_token,
            }),
        )
    }

    /// Delegated tokens from a refresh token, with Entra's rotation (PROTOCOL.md §2.6).
    fn refresh(&self, form: &HashMap<String, String>, auth: &ClientAuth) -> HttpResponse {
        let Some(client_id) = auth.client_id.as_deref() else {
            return missing_parameter("client_id");
        };
        let Some(refresh_token) = form.get("refresh_token") else {
            return missing_parameter("refresh_token");
        };
        // Entra insists on scope even for a refresh (§2.2, tarickb/sasl-xoauth2#89).
        let Some(scope) = form.get("scope") else {
            return missing_parameter("scope");
        };
        match self.registration(client_id) {
            Some(registration) => {
                if let Err(response) = check_secret(registration, auth.secret.as_deref()) {
                    return response;
                }
            }
            None if auth.secret.is_some() => {
                return entra_error(
                    401,
                    "invalid_client",
                    700025,
                    "Client is public so neither 'client_assertion' nor 'client_secret' should \
                     be presented.",
                );
            }
            None => {}
        }

        let now = Instant::now();
        let grace = self.config.used_refresh_token_grace;
        let (subject, granted_scope) = {
            let mut grants = lock(&self.refresh_grants);
            // Drop grants that can never be redeemed again, so rotation does not pile them up.
            grants.retain(|_, g| {
                now < g.expires_at && g.used_at.is_none_or(|used| still_valid(used, grace, now))
            });
            let Some(grant) = grants.get_mut(refresh_token.as_str()) else {
                return expired_grant();
            };
            if grant
                .used_at
                .is_some_and(|used| !still_valid(used, grace, now))
            {
                grants.remove(refresh_token.as_str());
                return expired_grant();
            }
            if grant.client_id != client_id {
                return entra_error(
                    400,
                    "invalid_grant",
                    70000,
                    "Provided grant is invalid or malformed.",
                );
            }
            if self.config.rotate_refresh_tokens && grant.used_at.is_none() {
                grant.used_at = Some(now);
            }
            (grant.subject.clone(), grant.scope.clone())
        };

        let returned_scope = resource_scopes(scope);
        let lifetime = self.config.access_token_lifetime;
        let issued = self
            .registry
            .issue(client_id, Some(&subject), &returned_scope, lifetime);
        let mut body = json!({
            "token_type": "Bearer",
            "scope": returned_scope,
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": issued.access_token,
        });
        if self.config.rotate_refresh_tokens {
            body["refresh_token"] =
                json!(self.new_refresh_token(client_id, &subject, &granted_scope));
        }
        HttpResponse::json(200, &body)
    }

    fn registration(&self, client_id: &str) -> Option<&ClientRegistration> {
        self.config
            .clients
            .iter()
            .find(|c| c.client_id == client_id)
    }

    fn new_refresh_token(&self, client_id: &str, subject: &str, scope: &str) -> String {
        let token = format!("0.A{}", random::base64url(REFRESH_TOKEN_RANDOM_BYTES));
        let grant = RefreshGrant {
            client_id: client_id.to_string(),
            subject: subject.to_string(),
            scope: scope.to_string(),
            expires_at: Instant::now() + REFRESH_TOKEN_LIFETIME,
            used_at: None,
        };
        lock(&self.refresh_grants).insert(token.clone(), grant);
        token
    }
}

/// Whether a token used at `used` is inside its grace period at `now`. A grace too large to
/// add to an `Instant` never runs out.
fn still_valid(used: Instant, grace: Duration, now: Instant) -> bool {
    used.checked_add(grace)
        .is_none_or(|deadline| now < deadline)
}

/// The `{tenant}` of `/{tenant}/oauth2/v2.0/token`, if that is the path.
fn token_path_tenant(path: &str) -> Option<&str> {
    let rest = path.strip_prefix('/')?;
    let (tenant, tail) = rest.split_once('/')?;
    (!tenant.is_empty() && tail == "oauth2/v2.0/token").then_some(tenant)
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
        for (key, value) in form_urlencoded::parse(&request.body) {
            form.entry(key.into_owned())
                .or_insert_with(|| value.into_owned());
        }
    }
    form
}

/// Client id and secret from the body or an HTTP Basic header (oauth2 crates use either).
fn client_auth(
    request: &HttpRequest,
    form: &HashMap<String, String>,
) -> Result<ClientAuth, HttpResponse> {
    let body_id = form.get("client_id").cloned();
    let body_secret = form.get("client_secret").cloned();
    let Some(header) = request.header("authorization") else {
        return Ok(ClientAuth {
            client_id: body_id,
            secret: body_secret.map(|s| vec![s]),
        });
    };

    let bad_header = || {
        entra_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. The Authorization header could not be decoded.",
        )
    };
    let (scheme, encoded) = header.split_once(' ').ok_or_else(bad_header)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad_header());
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| bad_header())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad_header())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(bad_header)?;
    // RFC 6749 §2.3.1 form-encodes both parts before base64; clients that skip that step
    // are still understood because the secret check also tries the raw text.
    let id = form_decode(id);
    if body_secret.is_some() || body_id.as_ref().is_some_and(|b| *b != id) {
        return Err(entra_error(
            400,
            "invalid_request",
            90014,
            "The request presented client credentials more than once or for two different \
             clients.",
        ));
    }
    let mut spellings = vec![form_decode(secret)];
    if spellings[0] != secret {
        spellings.push(secret.to_string());
    }
    Ok(ClientAuth {
        client_id: Some(id),
        secret: Some(spellings),
    })
}

fn form_decode(text: &str) -> String {
    let wrapped = format!("v={text}");
    form_urlencoded::parse(wrapped.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

fn check_secret(
    registration: &ClientRegistration,
    presented: Option<&[String]>,
) -> Result<(), HttpResponse> {
    let Some(presented) = presented else {
        return Err(entra_error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        ));
    };
    let expected = registration.client_secret.as_bytes();
    let mut matched = false;
    for candidate in presented {
        matched |= secrets_equal(candidate.as_bytes(), expected);
    }
    if matched {
        return Ok(());
    }
    let message = format!(
        "Invalid client secret provided. Ensure the secret being sent in the request is the \
         client secret value, not the client secret ID, for a secret added to app '{}'.",
        registration.client_id
    );
    Err(entra_error(401, "invalid_client", 7000215, &message))
}

/// Compare two secrets without stopping at the first difference, so answer timing does not
/// reveal how much of a guessed secret was right. Lengths are not hidden.
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

/// The requested scopes minus sign-in-only ones, as Entra echoes them.
fn resource_scopes(scope: &str) -> String {
    let kept: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !NON_RESOURCE_SCOPES.contains(&s.to_ascii_lowercase().as_str()))
        .collect();
    if kept.is_empty() {
        scope.trim().to_string()
    } else {
        kept.join(" ")
    }
}

fn scripted_failure(failure: &TokenFailure) -> HttpResponse {
    match failure {
        TokenFailure::Status500 => entra_error(
            500,
            "server_error",
            50000,
            "There was an error issuing a token or an issue with our sign-in service.",
        ),
        TokenFailure::TooManyRequests { retry_after_secs } => entra_error(
            429,
            "temporarily_unavailable",
            90055,
            "Too many requests have been received. Please try again later.",
        )
        .header("Retry-After", retry_after_secs.to_string()),
        TokenFailure::Garbage => HttpResponse::with_body(200, "text/html", b"<html>oops".to_vec()),
        TokenFailure::InvalidGrant => expired_grant(),
        TokenFailure::TemporarilyUnavailable => entra_error(
            503,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        ),
    }
}

fn expired_grant() -> HttpResponse {
    entra_error(
        400,
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity. Send \
         a new interactive authorization request for this user and resource.",
    )
}

fn missing_parameter(name: &str) -> HttpResponse {
    let message = format!("The request body must contain the following parameter: '{name}'.");
    entra_error(400, "invalid_request", 900144, &message)
}

fn unknown_application(client_id: &str, tenant: &str) -> HttpResponse {
    let message = format!(
        "Application with identifier '{}' was not found in the directory '{}'.",
        printable(client_id, 64),
        printable(tenant, 64)
    );
    entra_error(400, "unauthorized_client", 700016, &message)
}

/// An error body in Entra's shape (PROTOCOL.md §2.7).
fn entra_error(status: u16, error: &str, code: u32, message: &str) -> HttpResponse {
    let trace_id = random::guid();
    let correlation_id = random::guid();
    let timestamp = clock::UtcDateTime::now().entra();
    let description = format!(
        "AADSTS{code}: {message} Trace ID: {trace_id} Correlation ID: {correlation_id} \
         Timestamp: {timestamp}"
    );
    HttpResponse::json(
        status,
        &json!({
            "error": error,
            "error_description": description,
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

/// Peer text echoed in an error: printable ASCII only, bounded.
fn printable(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(secrets_equal(b"", b""));
    }

    #[test]
    fn token_paths() {
        assert_eq!(
            token_path_tenant("/common/oauth2/v2.0/token"),
            Some("common")
        );
        assert_eq!(token_path_tenant("//oauth2/v2.0/token"), None);
        assert_eq!(token_path_tenant("/t/oauth2/v2.0/devicecode"), None);
        assert_eq!(token_path_tenant("/t/oauth2/token"), None);
    }

    #[test]
    fn scopes_echoed_without_sign_in_scopes() {
        assert_eq!(
            resource_scopes("https://outlook.office.com/SMTP.Send offline_access openid"),
            "https://outlook.office.com/SMTP.Send"
        );
        assert_eq!(resource_scopes("offline_access"), "offline_access");
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
