//! Configuration: `proxy.toml` merged with `SMTP_OAUTH_BRIDGE_*` environment variables, read
//! into a raw serde layer and then checked into a [`Config`] of typed values.
//!
//! Everything is validated before a socket is bound. Errors name the key and what was expected
//! but never echo the value, because the value may be a secret.

mod policy;
mod pool;
mod server;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use policy::{AccountPolicy, SenderPattern, canonical as canonical_ip};
pub use pool::PoolSettings;
pub use server::{Limits, LocalTls, PlaintextAuth, ServerSettings, Timeouts, is_loopback};
use server::{RawLimits, RawServer, RawTimeouts, RawTls};

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/smtp-oauth-bridge/proxy.toml";
/// Prefix of environment variables that override configuration keys
/// (`SMTP_OAUTH_BRIDGE_SERVER__HOSTNAME=mail.local` sets `server.hostname`).
pub const ENV_PREFIX: &str = "SMTP_OAUTH_BRIDGE_";
/// Office365's message size limit (150 MiB), advertised when nothing lower is configured.
pub const OFFICE365_MAX_SIZE: u64 = 157_286_400;
/// Gmail's message size limit as its servers advertise it.
pub const GMAIL_MAX_SIZE: u64 = 35_882_577;

const OFFICE365_SCOPE_APP: &str = "https://outlook.office365.com/.default";
const OFFICE365_SCOPE_DELEGATED: &str = "https://outlook.office.com/SMTP.Send";
const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// A configuration problem, printed as one line: the key, then what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.problem)
        } else {
            write!(f, "{}: {}", self.key, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The checked configuration the daemon runs with.
pub struct Config {
    pub server: ServerSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub pool: PoolSettings,
    /// Extra CA certificates trusted for the upstream and the token endpoint.
    pub extra_ca_file: Option<PathBuf>,
    /// The bridge's own certificate, for STARTTLS and implicit-TLS listeners.
    pub local_tls: Option<LocalTls>,
    pub store: StoreSettings,
    pub sandbox: Option<SandboxSettings>,
    pub log: LogSettings,
    /// The optional loopback HTTP listener for `/metrics` and `/healthz`.
    pub admin: Option<AdminSettings>,
    pub accounts: Vec<Account>,
}

pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Consecutive failed upstream sessions of one account after which `/healthz` says 503.
    pub upstream_failures_unhealthy: u32,
}

pub struct StoreSettings {
    pub directory: PathBuf,
}

pub struct SandboxSettings {
    /// Where the stand-in Office365 writes the messages it accepts.
    pub mail_dir: PathBuf,
}

pub struct LogSettings {
    /// A tracing filter directive, e.g. `info` or `smtp_oauth_bridge=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Which provider an account talks to; sets defaults for endpoints, scopes and the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Office365,
    Gmail,
    /// The built-in stand-ins for Entra and Office365 (`[sandbox]`).
    Sandbox,
}

/// How the bridge obtains access tokens for an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// App-only: the application's own credential, no user involved.
    ClientCredentials,
    /// Delegated: a refresh token an administrator imported once.
    RefreshToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain connect, then STARTTLS (Office365 on 587).
    Starttls,
    /// TLS from the first byte (Gmail on 465).
    Implicit,
}

/// A local user, the mailbox it sends as, and how to get tokens for it.
pub struct Account {
    /// Short name used by `import-token` and in logs.
    pub name: String,
    /// The username the legacy client sends, lower-cased for case-insensitive matching.
    pub username: String,
    /// PHC string of the argon2 hash of the local password.
    pub password_hash: String,
    /// The address put in XOAUTH2's `user=`.
    pub mailbox: String,
    pub provider: Provider,
    pub oauth: OAuthSettings,
    pub upstream: UpstreamSettings,
    pub policy: AccountPolicy,
}

pub struct OAuthSettings {
    pub flow: Flow,
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
}

// === redacted Debug: secrets never reach a formatted string ===

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.server.listen)
            .field("hostname", &self.server.hostname)
            .field("accounts", &self.accounts)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("username", &self.username)
            .field("mailbox", &self.mailbox)
            .field("provider", &self.provider)
            .field("oauth", &self.oauth)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for OAuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuthSettings")
            .field("flow", &self.flow)
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("scopes", &self.scopes)
            .finish()
    }
}

// === raw layer: what serde reads ===

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    pool: pool::RawPool,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    store: RawStore,
    sandbox: Option<RawSandbox>,
    #[serde(default)]
    log: RawLog,
    admin: Option<RawAdmin>,
    #[serde(default)]
    accounts: Vec<RawAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    upstream_failures_unhealthy: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    directory: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSandbox {
    #[serde(default = "default_true")]
    enabled: bool,
    mail_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: Option<String>,
    format: Option<LogFormat>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    name: Option<String>,
    username: Option<String>,
    password_hash: Option<String>,
    mailbox: Option<String>,
    provider: Option<Provider>,
    flow: Option<Flow>,
    tenant: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    client_secret_file: Option<PathBuf>,
    client_secret_env: Option<String>,
    token_url: Option<String>,
    scopes: Option<Vec<String>>,
    upstream: Option<String>,
    upstream_tls: Option<UpstreamTls>,
    allowed_senders: Option<Vec<String>>,
    check_from_header: Option<bool>,
    no_auth_sources: Option<Vec<String>>,
}

fn default_true() -> bool {
    true
}

impl Config {
    /// Reads `path` (which must exist; parent directories are never searched) and the
    /// environment, and checks the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(err(
                "",
                format!("config file {} does not exist", path.display()),
            ));
        }
        if !path.is_file() {
            return Err(err("", format!("{} is not a file", path.display())));
        }
        // Arrays of tables cannot be addressed from the environment (figment would replace
        // the whole list); say so instead of failing with a type error.
        if let Some((name, _)) = std::env::vars_os().find(|(k, _)| {
            k.to_str()
                .is_some_and(|k| k.starts_with(&format!("{ENV_PREFIX}ACCOUNTS")))
        }) {
            return Err(err(
                name.to_string_lossy(),
                "accounts cannot be set from the environment; use client_secret_env or \
                 client_secret_file in the account instead",
            ));
        }
        let figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(Env::prefixed(ENV_PREFIX).ignore(&["CONFIG"]).split("__"));
        Self::from_figment(figment)
    }

    /// Checks configuration given as TOML text (tests and `check-config` of snippets).
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::new().merge(Toml::string(text)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let raw: RawConfig = figment.extract().map_err(describe_figment_error)?;
        check(raw)
    }

    /// The account a local username belongs to, matched case-insensitively.
    pub fn account_by_username(&self, username: &str) -> Option<&Account> {
        let wanted = username.to_ascii_lowercase();
        self.accounts.iter().find(|a| a.username == wanted)
    }

    pub fn account_by_name(&self, name: &str) -> Option<&Account> {
        self.accounts.iter().find(|a| a.name == name)
    }

    /// The account whose `no_auth_sources` include `peer`, for clients that cannot log in.
    pub fn no_auth_account(&self, peer: std::net::IpAddr) -> Option<usize> {
        self.accounts
            .iter()
            .position(|a| a.policy.no_auth_source(peer))
    }

    /// Whether DSN may be advertised: the bridge answers EHLO before it knows which account
    /// (and so which provider) a client will use, so it offers DSN only when every configured
    /// provider supports it (Office365 does; Gmail does not advertise it).
    pub fn advertise_dsn(&self) -> bool {
        self.accounts.iter().all(|a| a.provider != Provider::Gmail)
    }

    /// Whether any account needs the on-disk store (refresh tokens).
    pub fn needs_store(&self) -> bool {
        self.accounts
            .iter()
            .any(|a| a.oauth.flow == Flow::RefreshToken)
    }
}

/// Turns figment's error into ours without the offending value: figment's own messages echo
/// values ("found string \"hunter2\""), and a mistyped secret must not reach a log.
fn describe_figment_error(error: figment::Error) -> ConfigError {
    use figment::error::Kind;
    let key = key_path(&error.path);
    let problem = match &error.kind {
        Kind::Message(m) => without_source_excerpt(m),
        Kind::InvalidType(_, expected) => format!("wrong type, expected {expected}"),
        Kind::InvalidValue(_, expected) => format!("invalid value, expected {expected}"),
        Kind::InvalidLength(_, expected) => format!("wrong length, expected {expected}"),
        Kind::UnknownVariant(_, allowed) => format!("unknown value, expected one of {allowed:?}"),
        Kind::UnknownField(field, _) => {
            return err(
                join_key(&key, field),
                "unknown key (a typo? every key is documented in the shipped proxy.toml)",
            );
        }
        Kind::MissingField(field) => return err(join_key(&key, field), "missing"),
        Kind::DuplicateField(field) => return err(join_key(&key, field), "given twice"),
        Kind::ISizeOutOfRange(_) | Kind::USizeOutOfRange(_) => "number out of range".into(),
        Kind::Unsupported(_) | Kind::UnsupportedKey(_, _) => "unsupported value".into(),
    };
    let source = error
        .metadata
        .as_ref()
        .and_then(|m| m.source.as_ref())
        .map(|s| format!(" (from {s})"))
        .unwrap_or_default();
    err(key, format!("{problem}{source}"))
}

/// `accounts.0.client_secret` → `accounts[0].client_secret`, the form our own checks use.
fn key_path(path: &[String]) -> String {
    let mut out = String::new();
    for part in path {
        if part.parse::<usize>().is_ok() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(part);
        }
    }
    out
}

/// The TOML parser's messages quote the offending source line, which may be the very secret
/// that is mistyped; keep the position and the description, drop the quoted excerpt.
fn without_source_excerpt(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains('|'))
        .collect();
    lines.join(": ")
}

fn join_key(prefix: &str, field: &str) -> String {
    if prefix == field || prefix.ends_with(&format!(".{field}")) {
        prefix.to_string()
    } else if prefix.is_empty() {
        field.to_string()
    } else {
        format!("{prefix}.{field}")
    }
}

fn check(raw: RawConfig) -> Result<Config, ConfigError> {
    let server_side = server::check_server_side(raw.server, &raw.tls)?;
    let timeouts = server::check_timeouts(&raw.timeouts)?;
    let limits = server::check_limits(&raw.limits)?;
    let pool = pool::check_pool(&raw.pool, timeouts.upstream_max_age)?;
    let sandbox = match raw.sandbox {
        Some(s) if s.enabled => Some(SandboxSettings {
            mail_dir: s.mail_dir.unwrap_or_else(|| PathBuf::from("sandbox-mail")),
        }),
        _ => None,
    };
    let store_dir = raw
        .store
        .directory
        .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/var/lib/smtp-oauth-bridge"));
    let admin = raw.admin.map(check_admin).transpose()?;
    let log = LogSettings {
        level: raw.log.level.unwrap_or_else(|| "info".into()),
        format: raw.log.format.unwrap_or(LogFormat::Text),
    };

    let mut accounts: Vec<Account> = Vec::with_capacity(raw.accounts.len());
    let mut names = HashSet::new();
    let mut usernames = HashSet::new();
    for (i, raw_account) in raw.accounts.into_iter().enumerate() {
        let account = check_account(i, raw_account, sandbox.is_some())?;
        if !names.insert(account.name.clone()) {
            return Err(err(format!("accounts[{i}].name"), "used by two accounts"));
        }
        if !usernames.insert(account.username.clone()) {
            return Err(err(
                format!("accounts[{i}].username"),
                "used by two accounts",
            ));
        }
        policy::check_sources_unique(i, &account, &accounts)?;
        accounts.push(account);
    }
    if accounts.is_empty() {
        return Err(err(
            "accounts",
            "no [[accounts]] configured; the bridge would refuse every login",
        ));
    }
    let mut server = server_side.server;
    // Advertise what every configured provider accepts, so a client learns the limit at
    // EHLO rather than after uploading.
    server.max_message_size = server_side.explicit_max_size.unwrap_or_else(|| {
        accounts
            .iter()
            .map(|a| match a.provider {
                Provider::Gmail => GMAIL_MAX_SIZE,
                Provider::Office365 | Provider::Sandbox => OFFICE365_MAX_SIZE,
            })
            .min()
            .unwrap_or(OFFICE365_MAX_SIZE)
    });
    Ok(Config {
        server,
        timeouts,
        limits,
        pool,
        extra_ca_file: raw.tls.extra_ca_file,
        local_tls: server_side.local_tls,
        store: StoreSettings {
            directory: store_dir,
        },
        sandbox,
        log,
        admin,
        accounts,
    })
}

fn check_admin(raw: RawAdmin) -> Result<AdminSettings, ConfigError> {
    let text = raw.listen.ok_or_else(|| {
        err(
            "admin.listen",
            "missing (e.g. \"127.0.0.1:9725\"; remove [admin] to switch the listener off)",
        )
    })?;
    let listen: SocketAddr = text.parse().map_err(|_| {
        err(
            "admin.listen",
            "expected an IP address and port such as \"127.0.0.1:9725\"",
        )
    })?;
    // Metrics name the accounts and health says which one is broken: keep them local.
    if !listen.ip().is_loopback() {
        return Err(err(
            "admin.listen",
            "only loopback addresses (127.0.0.0/8, ::1) are allowed",
        ));
    }
    let threshold = raw.upstream_failures_unhealthy.unwrap_or(3);
    if threshold == 0 {
        return Err(err(
            "admin.upstream_failures_unhealthy",
            "must be at least 1",
        ));
    }
    Ok(AdminSettings {
        listen,
        upstream_failures_unhealthy: threshold,
    })
}

fn check_account(i: usize, raw: RawAccount, sandbox_on: bool) -> Result<Account, ConfigError> {
    let key = |field: &str| format!("accounts[{i}].{field}");

    let username = raw
        .username
        .ok_or_else(|| err(key("username"), "missing"))?
        .trim()
        .to_ascii_lowercase();
    if username.is_empty() {
        return Err(err(key("username"), "must not be empty"));
    }
    let name = raw.name.unwrap_or_else(|| username.clone());
    let password_hash = raw.password_hash.ok_or_else(|| {
        err(
            key("password_hash"),
            "missing (make one with `smtp-oauth-bridge hash-password`)",
        )
    })?;
    crate::users::check_hash(&password_hash).map_err(|problem| {
        err(
            key("password_hash"),
            format!("{problem} (make one with `smtp-oauth-bridge hash-password`)"),
        )
    })?;
    let mailbox = raw.mailbox.unwrap_or_else(|| username.clone());
    if !mailbox.contains('@') || mailbox.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(err(key("mailbox"), "must be an e-mail address"));
    }
    let provider = raw.provider.unwrap_or(Provider::Office365);
    if provider == Provider::Sandbox && !sandbox_on {
        return Err(err(
            key("provider"),
            "is \"sandbox\" but [sandbox] is not enabled",
        ));
    }
    if provider != Provider::Sandbox && crate::users::is_demo_hash(&password_hash) {
        return Err(err(
            key("password_hash"),
            "is the sandbox demo password, which only sandbox accounts may use \
             (make a new one with `smtp-oauth-bridge hash-password`)",
        ));
    }

    let flow = raw.flow.unwrap_or(match provider {
        Provider::Office365 | Provider::Sandbox => Flow::ClientCredentials,
        Provider::Gmail => Flow::RefreshToken,
    });
    if provider == Provider::Gmail && flow == Flow::ClientCredentials {
        return Err(err(
            key("flow"),
            "Gmail has no client-credentials grant for SMTP; use \"refresh_token\"",
        ));
    }

    let client_secret = client_secret(
        &key,
        raw.client_secret,
        raw.client_secret_file,
        raw.client_secret_env,
    )?;

    let (token_url, client_id, scopes) = if provider == Provider::Sandbox {
        // Filled in when the sandbox starts and its ports are known.
        (
            String::new(),
            String::new(),
            vec![OFFICE365_SCOPE_APP.to_string()],
        )
    } else {
        let client_id = raw
            .client_id
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| err(key("client_id"), "missing (the application (client) id)"))?;
        let token_url = match (raw.token_url, provider) {
            (Some(url), _) => url,
            (None, Provider::Gmail) => "https://oauth2.googleapis.com/token".into(),
            (None, _) => {
                let tenant = raw.tenant.filter(|t| !t.trim().is_empty()).ok_or_else(|| {
                    err(
                        key("tenant"),
                        "missing (the directory (tenant) id or domain, e.g. contoso.onmicrosoft.com)",
                    )
                })?;
                if flow == Flow::ClientCredentials
                    && matches!(tenant.as_str(), "common" | "organizations" | "consumers")
                {
                    return Err(err(
                        key("tenant"),
                        "client credentials need a tenant id or domain, not common/organizations/consumers",
                    ));
                }
                format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
            }
        };
        let parsed =
            url::Url::parse(&token_url).map_err(|_| err(key("token_url"), "not a valid URL"))?;
        let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
        if parsed.scheme() != "https" && !(parsed.scheme() == "http" && loopback) {
            return Err(err(
                key("token_url"),
                "must be https (plain http only to a loopback address)",
            ));
        }
        let scopes = raw.scopes.unwrap_or_else(|| match (provider, flow) {
            (Provider::Gmail, _) => vec![GMAIL_SCOPE.into()],
            (_, Flow::ClientCredentials) => vec![OFFICE365_SCOPE_APP.into()],
            (_, Flow::RefreshToken) => {
                vec![OFFICE365_SCOPE_DELEGATED.into(), "offline_access".into()]
            }
        });
        if scopes.is_empty() {
            return Err(err(key("scopes"), "needs at least one scope"));
        }
        (token_url, client_id, scopes)
    };
    if flow == Flow::ClientCredentials && provider != Provider::Sandbox && client_secret.is_none() {
        return Err(err(
            key("client_secret"),
            "missing: client credentials need client_secret, client_secret_file or client_secret_env",
        ));
    }

    let (default_host, default_port, default_tls) = match provider {
        Provider::Office365 | Provider::Sandbox => {
            ("smtp.office365.com", 587, UpstreamTls::Starttls)
        }
        Provider::Gmail => ("smtp.gmail.com", 465, UpstreamTls::Implicit),
    };
    let upstream = match raw.upstream {
        Some(text) => {
            let (host, port) = split_host_port(&text).ok_or_else(|| {
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
        None => UpstreamSettings {
            host: default_host.into(),
            port: default_port,
            tls: raw.upstream_tls.unwrap_or(default_tls),
        },
    };
    if rustls::pki_types::ServerName::try_from(upstream.host.as_str()).is_err() {
        return Err(err(
            key("upstream"),
            "host is not a valid DNS name or IP address",
        ));
    }

    let policy = policy::check_account_policy(
        &key,
        raw.allowed_senders,
        raw.check_from_header,
        raw.no_auth_sources,
    )?;

    Ok(Account {
        name,
        username,
        password_hash,
        mailbox,
        provider,
        policy,
        oauth: OAuthSettings {
            flow,
            token_url,
            client_id,
            client_secret,
            scopes,
        },
        upstream,
    })
}

fn client_secret(
    key: &dyn Fn(&str) -> String,
    inline: Option<SecretString>,
    file: Option<PathBuf>,
    env: Option<String>,
) -> Result<Option<SecretString>, ConfigError> {
    let given = [inline.is_some(), file.is_some(), env.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(err(
            key("client_secret"),
            "give only one of client_secret, client_secret_file, client_secret_env",
        ));
    }
    if let Some(secret) = inline {
        if secret.expose_secret().trim().is_empty() {
            return Err(err(key("client_secret"), "is empty"));
        }
        return Ok(Some(secret));
    }
    if let Some(path) = file {
        // A relative name is looked up among systemd credentials first (LoadCredential=).
        let resolved = crate::credentials::resolve(&path);
        let text = std::fs::read_to_string(&resolved).map_err(|e| {
            err(
                key("client_secret_file"),
                format!("cannot read {}: {}", resolved.display(), e.kind()),
            )
        })?;
        let secret = text.trim_end_matches(['\r', '\n']).to_string();
        if secret.is_empty() {
            return Err(err(key("client_secret_file"), "file is empty"));
        }
        return Ok(Some(SecretString::from(secret)));
    }
    if let Some(var) = env {
        let value = std::env::var(&var).map_err(|_| {
            err(
                key("client_secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        if value.trim().is_empty() {
            return Err(err(
                key("client_secret_env"),
                format!("environment variable {var} is empty"),
            ));
        }
        return Ok(Some(SecretString::from(value)));
    }
    Ok(None)
}

fn split_host_port(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port))
}

/// Fills in a sandbox account's endpoints once the stand-ins are listening.
pub fn bind_sandbox_account(
    account: &mut Account,
    token_url: String,
    client_id: String,
    client_secret: &SecretString,
    upstream: SocketAddr,
) {
    account.oauth.token_url = token_url;
    account.oauth.client_id = client_id;
    account.oauth.client_secret =
        Some(SecretString::from(client_secret.expose_secret().to_owned()));
    account.upstream = UpstreamSettings {
        host: upstream.ip().to_string(),
        port: upstream.port(),
        tls: UpstreamTls::Starttls,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash() -> String {
        crate::users::hash_password("pw").unwrap()
    }

    fn office365(extra: &str) -> String {
        office365_with_hash(&hash(), extra)
    }

    fn office365_with_hash(hash: &str, extra: &str) -> String {
        format!(
            "[[accounts]]\nusername = \"Printer@Contoso.com\"\npassword_hash = \"{hash}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app\"\nclient_secret = \"hunter2-secret\"\n{extra}"
        )
    }

    #[test]
    fn office365_defaults() {
        let config = Config::from_toml_str(&office365("")).unwrap();
        let account = &config.accounts[0];
        assert_eq!(account.username, "printer@contoso.com");
        assert_eq!(account.mailbox, "printer@contoso.com");
        assert_eq!(account.oauth.flow, Flow::ClientCredentials);
        assert_eq!(
            account.oauth.token_url,
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        );
        assert_eq!(account.oauth.scopes, vec![OFFICE365_SCOPE_APP]);
        assert_eq!(account.upstream.host, "smtp.office365.com");
        assert_eq!(account.upstream.port, 587);
        assert_eq!(account.upstream.tls, UpstreamTls::Starttls);
        assert_eq!(config.server.max_message_size, OFFICE365_MAX_SIZE);
        assert_eq!(config.server.listen.len(), 2);
        assert!(config.account_by_username("PRINTER@contoso.COM").is_some());
    }

    #[test]
    fn errors_name_the_key_never_the_value() {
        let text = office365("").replace(
            "client_secret = \"hunter2-secret\"",
            "client_secret = [\"hunter2-secret\"]",
        );
        let e = Config::from_toml_str(&text).err().unwrap();
        assert_eq!(e.key, "accounts[0].client_secret");
        assert!(!e.to_string().contains("hunter2"), "{e}");

        let text = office365("").replace("tenant", "tennant");
        let e = Config::from_toml_str(&text).err().unwrap();
        assert_eq!(e.key, "accounts[0].tennant");
        assert!(e.problem.contains("unknown key"));

        let e = Config::from_toml_str(&office365("").replace("client_id = \"app\"\n", ""))
            .err()
            .unwrap();
        assert_eq!(e.key, "accounts[0].client_id");

        let e = Config::from_toml_str(&format!(
            "[server]\nlisten = [\"0.0.0.0:25\"]\n{}",
            office365("")
        ))
        .err()
        .unwrap();
        assert_eq!(e.key, "server.listen[0]");
    }

    #[test]
    fn broken_toml_never_echoes_the_line_it_broke_on() {
        let secret = "SuperSecretValue123";
        for broken in [
            format!("client_secret = \"{secret}~abc"),
            format!("client_secret = {secret}"),
            "client_secret = 12345678901234567890123".to_string(),
            format!("client_secret = \"{secret}\"\nclient_secret = \"{secret}\""),
        ] {
            let text = office365("").replace("client_secret = \"hunter2-secret\"", &broken);
            let e = Config::from_toml_str(&text).expect_err(&broken);
            let shown = e.to_string();
            assert!(
                !shown.contains(secret) && !shown.contains("1234567890"),
                "{shown}"
            );
            assert!(!shown.contains('\n'), "one line: {shown}");
            assert!(shown.contains("line"), "says where: {shown}");
        }
        let e = Config::from_toml_str(&office365("").replace("hunter2-secret", " "))
            .err()
            .unwrap();
        assert_eq!(e.key, "accounts[0].client_secret");
    }

    #[test]
    fn debug_output_hides_the_client_secret() {
        let config = Config::from_toml_str(&office365("")).unwrap();
        let text = format!("{config:?}");
        assert!(text.contains("printer@contoso.com"));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn demo_password_is_refused_outside_the_sandbox() {
        let text = office365_with_hash(crate::users::DEMO_PASSWORD_HASH, "");
        let e = Config::from_toml_str(&text).err().unwrap();
        assert_eq!(e.key, "accounts[0].password_hash");
    }

    #[test]
    fn gmail_defaults_and_upstream_override() {
        let text = format!(
            "[[accounts]]\nusername = \"a@gmail.com\"\npassword_hash = \"{}\"\nprovider = \"gmail\"\nclient_id = \"x\"\n",
            hash()
        );
        let config = Config::from_toml_str(&text).unwrap();
        let a = &config.accounts[0];
        assert_eq!(a.oauth.flow, Flow::RefreshToken);
        assert_eq!(
            (a.upstream.host.as_str(), a.upstream.port),
            ("smtp.gmail.com", 465)
        );
        assert_eq!(a.upstream.tls, UpstreamTls::Implicit);
        assert_eq!(config.server.max_message_size, GMAIL_MAX_SIZE);

        let config = Config::from_toml_str(&office365("upstream = \"[::1]:2525\"\n")).unwrap();
        let u = &config.accounts[0].upstream;
        assert_eq!(
            (u.host.as_str(), u.port, u.tls),
            ("::1", 2525, UpstreamTls::Starttls)
        );
    }
}
