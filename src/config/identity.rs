//! OAuth identities: who the bridge is toward the provider. An identity is a provider preset
//! (office365, gmail, generic, sandbox), a grant (client credentials or a delegated refresh
//! token), the application's credential (secret or certificate), the endpoints and scopes,
//! and the upstream SMTP server. Every preset value can be overridden, so national clouds
//! (GCC High, 21Vianet) are a matter of configuration.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use crate::config::raw::RawOAuth;
use crate::config::{ConfigError, err};

const OFFICE365_AUTHORITY: &str = "https://login.microsoftonline.com";
const OFFICE365_SCOPE_APP: &str = "https://outlook.office365.com/.default";
const OFFICE365_SCOPE_DELEGATED: &str = "https://outlook.office.com/SMTP.Send";
const GMAIL_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
const GMAIL_AUTHORIZE_URL: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GMAIL_SCOPE: &str = "https://mail.google.com/";
/// Tenant aliases that name no single directory; Entra refuses app-only grants on them.
const MULTI_TENANT: [&str; 3] = ["common", "organizations", "consumers"];

/// Which provider an identity talks to; sets defaults for endpoints, scopes and upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Microsoft 365 and consumer Outlook (tenant "consumers").
    Office365,
    Gmail,
    /// Any OAuth2 provider speaking XOAUTH2: every endpoint, scope and upstream is given.
    Generic,
    /// The built-in stand-ins for Entra and Office365 (`[sandbox]`).
    Sandbox,
}

/// How the bridge obtains access tokens for an identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// App-only: the application's own credential, no user involved.
    ClientCredentials,
    /// Delegated: a refresh token from `login` (or `import-token`), kept fresh by the bridge.
    RefreshToken,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flow::ClientCredentials => "client_credentials",
            Flow::RefreshToken => "refresh_token",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain connect, then STARTTLS (Office365 on 587).
    Starttls,
    /// TLS from the first byte (Gmail on 465).
    Implicit,
}

/// Which certificate thumbprint the client assertion's header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Thumbprint {
    /// `x5t#S256`: base64url SHA-256 of the certificate (Entra's current documentation).
    #[serde(rename = "x5t#S256")]
    Sha256,
    /// `x5t`: base64url SHA-1 of the certificate (what MSAL has long sent).
    #[serde(rename = "x5t")]
    Sha1,
}

/// The signature algorithm of the client assertion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256, what Entra's documentation now asks for.
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, the older form Entra still accepts.
    RS256,
}

/// An OAuth identity.
pub struct Identity {
    /// Key of the identity's tokens in the store, and its name in logs and `login`.
    pub name: String,
    pub provider: Provider,
    pub oauth: OAuthSettings,
    pub upstream: UpstreamSettings,
}

pub struct OAuthSettings {
    pub flow: Flow,
    pub token_url: String,
    /// For `login` with a browser (authorization code with PKCE).
    pub authorize_url: Option<String>,
    /// For `login` on a headless machine (device code).
    pub device_code_url: Option<String>,
    /// Overrides `http://localhost:PORT/` as the redirect of a browser login.
    pub redirect_uri: Option<String>,
    pub client_id: String,
    pub credential: ClientCredential,
    /// Sent with every token request, refreshes included (Entra insists).
    pub scopes: Vec<String>,
}

/// How the application proves itself to the token endpoint.
#[derive(Clone)]
pub enum ClientCredential {
    /// A public client (delegated flows only): nothing but the client id.
    None,
    Secret(Arc<SecretString>),
    Certificate(Arc<CertificateCredential>),
}

/// A certificate and its private key, for signed client assertions (private_key_jwt).
pub struct CertificateCredential {
    pub certificate: CertificateDer<'static>,
    pub key: Arc<dyn rustls::sign::SigningKey>,
    pub thumbprint: Thumbprint,
    pub algorithm: AssertionAlgorithm,
    /// Where the certificate was read from, for messages.
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
}

// === redacted Debug: secrets never reach a formatted string ===

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("oauth", &self.oauth)
            .field("upstream", &self.upstream)
            .finish()
    }
}

impl fmt::Debug for OAuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthSettings")
            .field("flow", &self.flow)
            .field("token_url", &self.token_url)
            .field("authorize_url", &self.authorize_url)
            .field("device_code_url", &self.device_code_url)
            .field("client_id", &self.client_id)
            .field("credential", &self.credential)
            .field("scopes", &self.scopes)
            .finish()
    }
}

impl fmt::Debug for ClientCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientCredential::None => f.write_str("None"),
            ClientCredential::Secret(_) => f.write_str("Secret([redacted])"),
            ClientCredential::Certificate(c) => c.fmt(f),
        }
    }
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("path", &self.path)
            .field("thumbprint", &self.thumbprint)
            .field("algorithm", &self.algorithm)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({:?}, {}, {}:{})",
            self.name, self.provider, self.oauth.flow, self.upstream.host, self.upstream.port
        )
    }
}

impl OAuthSettings {
    /// Whether tokens obtained with `self` are still good for `other`: same grant, endpoint,
    /// client, credential and scopes. What only `login` uses (authorize and device URLs) does
    /// not matter.
    pub fn same_grant(&self, other: &OAuthSettings) -> bool {
        self.flow == other.flow
            && self.token_url == other.token_url
            && self.client_id == other.client_id
            && self.scopes == other.scopes
            && self.credential.same(&other.credential)
    }
}

impl ClientCredential {
    fn same(&self, other: &ClientCredential) -> bool {
        match (self, other) {
            (ClientCredential::None, ClientCredential::None) => true,
            (ClientCredential::Secret(a), ClientCredential::Secret(b)) => {
                a.expose_secret() == b.expose_secret()
            }
            (ClientCredential::Certificate(a), ClientCredential::Certificate(b)) => {
                a.certificate == b.certificate
                    && a.thumbprint == b.thumbprint
                    && a.algorithm == b.algorithm
                    && a.path == b.path
            }
            _ => false,
        }
    }

    /// A short word for logs and `accounts`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientCredential::None => "public client",
            ClientCredential::Secret(_) => "client secret",
            ClientCredential::Certificate(_) => "certificate",
        }
    }
}

/// Checks the OAuth keys of an identity; `key` turns a field name into its full key path.
pub(super) fn check_identity(
    name: String,
    raw: RawOAuth,
    key: &dyn Fn(&str) -> String,
    sandbox_on: bool,
) -> Result<Identity, ConfigError> {
    let provider = raw.provider.unwrap_or(Provider::Office365);
    if provider == Provider::Sandbox && !sandbox_on {
        return Err(err(
            key("provider"),
            "is \"sandbox\" but [sandbox] is not enabled",
        ));
    }
    let flow = raw.flow.unwrap_or(match provider {
        Provider::Office365 | Provider::Sandbox => Flow::ClientCredentials,
        Provider::Gmail | Provider::Generic => Flow::RefreshToken,
    });
    match (provider, flow) {
        (Provider::Gmail, Flow::ClientCredentials) => {
            return Err(err(
                key("flow"),
                "Gmail has no client-credentials grant for SMTP; use \"refresh_token\"",
            ));
        }
        (Provider::Sandbox, Flow::RefreshToken) => {
            return Err(err(
                key("flow"),
                "sandbox accounts use client credentials (the sandbox has no login page)",
            ));
        }
        _ => {}
    }
    let credential = crate::config::credential::credential(&raw, key)?;
    if provider == Provider::Sandbox {
        return Ok(sandbox_identity(name));
    }
    let client_id = raw
        .client_id
        .clone()
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| err(key("client_id"), "missing (the application (client) id)"))?;
    if flow == Flow::ClientCredentials && matches!(credential, ClientCredential::None) {
        return Err(err(
            key("client_secret"),
            "missing: client credentials need client_secret, client_secret_file, \
             client_secret_env, or client_certificate",
        ));
    }
    let endpoints = endpoints(provider, flow, &raw, key)?;
    let upstream = upstream(provider, &raw, key)?;
    Ok(Identity {
        name,
        provider,
        oauth: OAuthSettings {
            flow,
            token_url: endpoints.token_url,
            authorize_url: endpoints.authorize_url,
            device_code_url: endpoints.device_code_url,
            redirect_uri: endpoints.redirect_uri,
            client_id,
            credential,
            scopes: endpoints.scopes,
        },
        upstream,
    })
}

/// A sandbox identity; its endpoints are filled in when the stand-ins start.
fn sandbox_identity(name: String) -> Identity {
    Identity {
        name,
        provider: Provider::Sandbox,
        oauth: OAuthSettings {
            flow: Flow::ClientCredentials,
            token_url: String::new(),
            authorize_url: None,
            device_code_url: None,
            redirect_uri: None,
            client_id: String::new(),
            credential: ClientCredential::None,
            scopes: vec![OFFICE365_SCOPE_APP.to_string()],
        },
        upstream: UpstreamSettings {
            host: "127.0.0.1".into(),
            port: 587,
            tls: UpstreamTls::Starttls,
        },
    }
}

struct Endpoints {
    token_url: String,
    authorize_url: Option<String>,
    device_code_url: Option<String>,
    redirect_uri: Option<String>,
    scopes: Vec<String>,
}

fn endpoints(
    provider: Provider,
    flow: Flow,
    raw: &RawOAuth,
    key: &dyn Fn(&str) -> String,
) -> Result<Endpoints, ConfigError> {
    let tenant = raw.tenant.clone().filter(|t| !t.trim().is_empty());
    if let Some(tenant) = &tenant {
        if tenant.contains(['/', '?', '#']) || tenant.contains(char::is_whitespace) {
            return Err(err(
                key("tenant"),
                "must be a tenant id or domain, not a URL",
            ));
        }
        if flow == Flow::ClientCredentials && MULTI_TENANT.contains(&tenant.as_str()) {
            return Err(err(
                key("tenant"),
                "client credentials need a tenant id or domain, not common/organizations/consumers",
            ));
        }
    }
    // Microsoft's three endpoints share one base: {authority}/{tenant}/oauth2/v2.0/.
    let entra_base = match (provider, &tenant) {
        (Provider::Office365, Some(tenant)) => {
            let authority = raw
                .authority
                .clone()
                .unwrap_or_else(|| OFFICE365_AUTHORITY.to_string());
            check_url(&authority, &key("authority"))?;
            Some(format!(
                "{}/{tenant}/oauth2/v2.0",
                authority.trim_end_matches('/')
            ))
        }
        _ => None,
    };
    if raw.authority.is_some() && provider != Provider::Office365 {
        return Err(err(
            key("authority"),
            "only applies to provider \"office365\"",
        ));
    }
    let token_url = match (&raw.token_url, provider, &entra_base) {
        (Some(url), _, _) => url.clone(),
        (None, Provider::Office365, Some(base)) => format!("{base}/token"),
        (None, Provider::Office365, None) => {
            return Err(err(
                key("tenant"),
                "missing (the directory (tenant) id or domain, e.g. contoso.onmicrosoft.com)",
            ));
        }
        (None, Provider::Gmail, _) => GMAIL_TOKEN_URL.into(),
        (None, _, _) => {
            return Err(err(
                key("token_url"),
                "missing (provider \"generic\" has no default)",
            ));
        }
    };
    check_url(&token_url, &key("token_url"))?;
    let authorize_url = match (&raw.authorize_url, provider, &entra_base) {
        (Some(url), _, _) => Some(url.clone()),
        (None, Provider::Office365, Some(base)) => Some(format!("{base}/authorize")),
        (None, Provider::Gmail, _) => Some(GMAIL_AUTHORIZE_URL.into()),
        _ => None,
    };
    // Google's device flow does not allow the full-mail scope, so Gmail has no default.
    let device_code_url = match (&raw.device_code_url, &entra_base) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(base)) => Some(format!("{base}/devicecode")),
        _ => None,
    };
    for (name, url) in [
        ("authorize_url", &authorize_url),
        ("device_code_url", &device_code_url),
    ] {
        if let Some(url) = url {
            check_url(url, &key(name))?;
        }
    }
    if let Some(uri) = &raw.redirect_uri {
        check_redirect_uri(uri, &key("redirect_uri"))?;
    }
    let scopes = match (&raw.scopes, provider, flow) {
        (Some(scopes), _, _) => scopes.clone(),
        (None, Provider::Gmail, _) => vec![GMAIL_SCOPE.into()],
        (None, Provider::Office365, Flow::ClientCredentials) => vec![OFFICE365_SCOPE_APP.into()],
        (None, Provider::Office365, Flow::RefreshToken) => {
            vec![OFFICE365_SCOPE_DELEGATED.into(), "offline_access".into()]
        }
        (None, _, _) => {
            return Err(err(
                key("scopes"),
                "missing (provider \"generic\" has no default)",
            ));
        }
    };
    if scopes.is_empty() || scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
        return Err(err(
            key("scopes"),
            "needs at least one scope, each without spaces",
        ));
    }
    Ok(Endpoints {
        token_url,
        authorize_url,
        device_code_url,
        redirect_uri: raw.redirect_uri.clone(),
        scopes,
    })
}

/// Endpoints must be https; plain http only to this machine (tests, local stand-ins).
fn check_url(url: &str, key: &str) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(url).map_err(|_| err(key, "not a valid URL"))?;
    if parsed.scheme() != "https" && !(parsed.scheme() == "http" && is_loopback(&parsed)) {
        return Err(err(
            key,
            "must be https (plain http only to a loopback address)",
        ));
    }
    Ok(())
}

fn check_redirect_uri(uri: &str, key: &str) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(uri).map_err(|_| err(key, "not a valid URL"))?;
    if parsed.scheme() != "http" || !is_loopback(&parsed) {
        return Err(err(
            key,
            "must be http://localhost:PORT/ (or 127.0.0.1 / [::1]): the bridge listens there",
        ));
    }
    Ok(())
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

fn upstream(
    provider: Provider,
    raw: &RawOAuth,
    key: &dyn Fn(&str) -> String,
) -> Result<UpstreamSettings, ConfigError> {
    let consumer = raw.tenant.as_deref() == Some("consumers");
    let preset = match provider {
        Provider::Office365 if consumer => {
            Some(("smtp-mail.outlook.com", 587, UpstreamTls::Starttls))
        }
        Provider::Office365 | Provider::Sandbox => {
            Some(("smtp.office365.com", 587, UpstreamTls::Starttls))
        }
        Provider::Gmail => Some(("smtp.gmail.com", 465, UpstreamTls::Implicit)),
        Provider::Generic => None,
    };
    let settings = match (&raw.upstream, preset) {
        (Some(text), _) => {
            let (host, port) = split_host_port(text).ok_or_else(|| {
                err(
                    key("upstream"),
                    "expected host:port, e.g. smtp.office365.com:587",
                )
            })?;
            let tls = raw.upstream_tls.unwrap_or(if port == 465 {
                UpstreamTls::Implicit
            } else {
                UpstreamTls::Starttls
            });
            UpstreamSettings { host, port, tls }
        }
        (None, Some((host, port, tls))) => UpstreamSettings {
            host: host.into(),
            port,
            tls: raw.upstream_tls.unwrap_or(tls),
        },
        (None, None) => {
            return Err(err(
                key("upstream"),
                "missing (provider \"generic\" has no default)",
            ));
        }
    };
    if rustls::pki_types::ServerName::try_from(settings.host.as_str()).is_err() {
        return Err(err(
            key("upstream"),
            "host is not a valid DNS name or IP address",
        ));
    }
    Ok(settings)
}

pub(super) fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

impl Identity {
    /// Fills in a sandbox identity's endpoints once the stand-ins are listening.
    pub fn bind_sandbox(
        &mut self,
        token_url: String,
        client_id: String,
        client_secret: &SecretString,
        upstream: std::net::SocketAddr,
    ) {
        self.oauth.token_url = token_url;
        self.oauth.client_id = client_id;
        self.oauth.credential = ClientCredential::Secret(Arc::new(SecretString::from(
            client_secret.expose_secret().to_owned(),
        )));
        self.upstream = UpstreamSettings {
            host: upstream.ip().to_string(),
            port: upstream.port(),
            tls: UpstreamTls::Starttls,
        };
    }
}
