//! Configuration: `proxy.toml` merged with `SMTP_OAUTH_BRIDGE_*` environment variables, read
//! into a raw serde layer ([`raw`]) and then checked into a [`Config`] of typed values.
//!
//! Local users ([`account`]) and OAuth identities ([`identity`]) are separate: an account
//! names an `[[identities]]` entry, or carries the OAuth keys itself and is then its own
//! identity. Everything is validated before a socket is bound. Errors name the key and what
//! was expected but never echo the value, because the value may be a secret.

mod account;
mod credential;
mod identity;
mod policy;
mod pool;
mod raw;
mod server;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::Deserialize;

pub use account::Account;
pub use identity::{
    AssertionAlgorithm, CertificateCredential, ClientCredential, Flow, Identity, OAuthSettings,
    Provider, Thumbprint, UpstreamSettings, UpstreamTls,
};
pub use policy::{AccountPolicy, SenderPattern, canonical as canonical_ip};
pub use pool::PoolSettings;
use raw::{RawConfig, RawTokens};
pub use server::{Limits, LocalTls, PlaintextAuth, ServerSettings, Timeouts, is_loopback};

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/smtp-oauth-bridge/proxy.toml";
/// Prefix of environment variables that override configuration keys
/// (`SMTP_OAUTH_BRIDGE_SERVER__HOSTNAME=mail.local` sets `server.hostname`).
pub const ENV_PREFIX: &str = "SMTP_OAUTH_BRIDGE_";
/// Office365's message size limit (150 MiB), advertised when nothing lower is configured.
pub const OFFICE365_MAX_SIZE: u64 = 157_286_400;
/// Gmail's message size limit as its servers advertise it.
pub const GMAIL_MAX_SIZE: u64 = 35_882_577;

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

/// The longest a timeout may be. Deadlines are the clock plus a timeout, and one near
/// 2^63 seconds (a "never" some administrators write) would overflow that sum.
const LONGEST_TIMEOUT: u64 = 366 * 24 * 3600;

/// A timeout in whole seconds: at least one, at most [`LONGEST_TIMEOUT`].
fn timeout(key: String, value: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(0) => Err(err(key, "must be at least 1 second")),
        Some(s) if s > LONGEST_TIMEOUT => Err(err(
            key,
            format!("must be at most {LONGEST_TIMEOUT} seconds (a year)"),
        )),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

/// The checked configuration the daemon runs with.
pub struct Config {
    pub server: ServerSettings,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub pool: PoolSettings,
    pub tokens: TokenSettings,
    /// Extra CA certificates trusted for the upstream and the token endpoint.
    pub extra_ca_file: Option<PathBuf>,
    /// The bridge's own certificate, for STARTTLS and implicit-TLS listeners.
    pub local_tls: Option<LocalTls>,
    pub store: StoreSettings,
    pub sandbox: Option<SandboxSettings>,
    pub log: LogSettings,
    /// The optional loopback HTTP listener for `/metrics` and `/healthz`.
    pub admin: Option<AdminSettings>,
    /// Every identity, explicit ones first, then those accounts declare inline.
    pub identities: Vec<Arc<Identity>>,
    pub accounts: Vec<Account>,
}

pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Consecutive failed upstream sessions of one account after which `/healthz` says 503.
    pub upstream_failures_unhealthy: u32,
}

/// How the refresh task keeps tokens fresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// Refresh this long before an access token expires (at most half its lifetime).
    pub refresh_margin: Duration,
    /// Refresh a refresh token that has not been used for this long, whatever else happens.
    pub keepalive: Duration,
    /// The longest a client's AUTH waits for a token request before it gets 454.
    pub session_wait: Duration,
    /// Obtain every identity's first token at start rather than at its first session.
    pub prefetch: bool,
    /// The longest pause between retries after transient failures.
    pub backoff_max: Duration,
    /// Run with the identity name and a reason when an identity starts needing a login.
    pub notify_command: Option<Vec<String>>,
}

impl Default for TokenSettings {
    fn default() -> Self {
        TokenSettings {
            refresh_margin: Duration::from_secs(15 * 60),
            keepalive: Duration::from_secs(24 * 3600),
            session_wait: Duration::from_secs(2),
            prefetch: true,
            backoff_max: Duration::from_secs(10 * 60),
            notify_command: None,
        }
    }
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

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.server.listen)
            .field("hostname", &self.server.hostname)
            .field("tokens", &self.tokens)
            .field("store", &self.store.directory)
            .field("identities", &self.identities)
            .field("accounts", &self.accounts)
            .finish_non_exhaustive()
    }
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
            k.to_str().is_some_and(|k| {
                k.starts_with(&format!("{ENV_PREFIX}ACCOUNTS"))
                    || k.starts_with(&format!("{ENV_PREFIX}IDENTITIES"))
            })
        }) {
            return Err(err(
                name.to_string_lossy(),
                "accounts and identities cannot be set from the environment; use \
                 client_secret_env or client_secret_file in the entry instead",
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

    /// The account a client logging in as `username` belongs to, and the mailbox it sends
    /// as. An exact username wins over a `*@domain` account.
    pub fn find_account(&self, username: &str) -> Option<(usize, String)> {
        let wanted = username.to_ascii_lowercase();
        let exact = self
            .accounts
            .iter()
            .position(|a| !a.is_pattern() && a.username == wanted);
        let index = exact.or_else(|| {
            self.accounts
                .iter()
                .position(|a| a.is_pattern() && a.mailbox_for(&wanted).is_some())
        })?;
        let mailbox = self.accounts[index].mailbox_for(&wanted)?;
        Some((index, mailbox))
    }

    /// The account a local username belongs to, matched case-insensitively.
    pub fn account_by_username(&self, username: &str) -> Option<&Account> {
        self.find_account(username).map(|(i, _)| &self.accounts[i])
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

    pub fn identity(&self, name: &str) -> Option<&Arc<Identity>> {
        self.identities.iter().find(|i| i.name == name)
    }

    /// An identity by its name, or the identity of an account given by name or username:
    /// what `login` and `import-token` accept.
    pub fn identity_for(&self, wanted: &str) -> Option<&Arc<Identity>> {
        self.identity(wanted).or_else(|| {
            let account = self
                .account_by_name(wanted)
                .or_else(|| self.account_by_username(wanted))?;
            self.identity(&account.identity)
        })
    }

    /// Whether an identity lives on a stored refresh token: the store is then required, not
    /// just a cache of access tokens.
    pub fn needs_store(&self) -> bool {
        self.identities
            .iter()
            .any(|i| i.oauth.flow == Flow::RefreshToken)
    }

    /// The accounts that use `identity`.
    pub fn accounts_of<'a>(&'a self, identity: &'a str) -> impl Iterator<Item = &'a Account> {
        self.accounts.iter().filter(move |a| a.identity == identity)
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
    let tokens = check_tokens(raw.tokens)?;
    let sandbox = match raw.sandbox {
        Some(s) if s.enabled => Some(SandboxSettings {
            mail_dir: s.mail_dir.unwrap_or_else(|| PathBuf::from("sandbox-mail")),
        }),
        _ => None,
    };
    // A sandbox run from a checkout keeps its state next to its mail rather than in a
    // system directory the user cannot write.
    let default_store = if sandbox.is_some() {
        "sandbox-state"
    } else {
        "/var/lib/smtp-oauth-bridge"
    };
    let store_dir = raw
        .store
        .directory
        .or_else(|| std::env::var_os("STATE_DIRECTORY").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(default_store));
    let admin = raw.admin.map(check_admin).transpose()?;
    let log = LogSettings {
        level: raw.log.level.unwrap_or_else(|| "info".into()),
        format: raw.log.format.unwrap_or(LogFormat::Text),
    };
    let (identities, accounts) = check_people(raw.identities, raw.accounts, sandbox.is_some())?;
    let mut server = server_side.server;
    server.max_message_size = match server_side.explicit_max_size {
        // Advertising more than the provider takes would have clients upload messages the
        // provider then refuses after the final dot.
        Some(size) => match known_size_limit(&accounts) {
            Some(limit) if size > limit => {
                return Err(err(
                    "server.max_message_size",
                    format!(
                        "is above the {limit} bytes the configured providers accept; leave it \
                         out to advertise their limit"
                    ),
                ));
            }
            _ => size,
        },
        None => provider_size_limit(&accounts),
    };
    Ok(Config {
        server,
        timeouts,
        limits,
        pool,
        tokens,
        extra_ca_file: raw.tls.extra_ca_file,
        local_tls: server_side.local_tls,
        store: StoreSettings {
            directory: store_dir,
        },
        sandbox,
        log,
        admin,
        identities,
        accounts,
    })
}

fn check_admin(raw: raw::RawAdmin) -> Result<AdminSettings, ConfigError> {
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

/// What every configured provider accepts, so a client learns the limit at EHLO rather than
/// after uploading. A generic provider's limit is unknown; Office365's is assumed.
fn provider_size_limit(accounts: &[Account]) -> u64 {
    known_size_limit(accounts).unwrap_or(OFFICE365_MAX_SIZE)
}

/// The smallest limit among providers whose limit is known (all but generic ones): a
/// configured `max_message_size` may be lower, never higher.
fn known_size_limit(accounts: &[Account]) -> Option<u64> {
    accounts
        .iter()
        .filter_map(|a| match a.provider {
            Provider::Gmail => Some(GMAIL_MAX_SIZE),
            Provider::Office365 | Provider::Sandbox => Some(OFFICE365_MAX_SIZE),
            Provider::Generic => None,
        })
        .min()
}

/// Checks identities and accounts and links each account to its identity.
fn check_people(
    raw_identities: Vec<raw::RawIdentity>,
    raw_accounts: Vec<raw::RawAccount>,
    sandbox_on: bool,
) -> Result<(Vec<Arc<Identity>>, Vec<Account>), ConfigError> {
    let mut identities: Vec<Identity> = Vec::new();
    for (i, mut raw) in raw_identities.into_iter().enumerate() {
        let key = |field: &str| format!("identities[{i}].{field}");
        let name = raw
            .name
            .take()
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| err(key("name"), "missing"))?;
        if identities.iter().any(|x| x.name == name) {
            return Err(err(key("name"), "used by two identities"));
        }
        identities.push(identity::check_identity(
            name,
            raw.take_oauth(),
            &key,
            sandbox_on,
        )?);
    }
    let explicit = identities.len();

    let mut pending = Vec::new();
    let mut names = HashSet::new();
    let mut usernames = HashSet::new();
    for (i, raw_account) in raw_accounts.into_iter().enumerate() {
        let (account, inline) = account::check_account(i, raw_account, sandbox_on)?;
        if let Some(identity) = inline {
            if identities[..explicit]
                .iter()
                .any(|x| x.name == identity.name)
            {
                return Err(err(
                    format!("accounts[{i}].name"),
                    "is also the name of an [[identities]] entry; an account with its own \
                     OAuth settings is an identity of that name",
                ));
            }
            identities.push(identity);
        }
        pending.push(account);
    }
    let by_name: HashMap<&str, &Identity> =
        identities.iter().map(|i| (i.name.as_str(), i)).collect();
    let mut accounts = Vec::with_capacity(pending.len());
    for account in pending {
        let index = account.index;
        let Some(identity) = by_name.get(account.identity.as_str()) else {
            return Err(err(
                format!("accounts[{index}].identity"),
                "names no [[identities]] entry",
            ));
        };
        let account = account.resolve(identity)?;
        if !names.insert(account.name.clone()) {
            return Err(err(
                format!("accounts[{index}].name"),
                "used by two accounts",
            ));
        }
        if !usernames.insert(account.username.clone()) {
            return Err(err(
                format!("accounts[{index}].username"),
                "used by two accounts",
            ));
        }
        policy::check_sources_unique(index, &account, &accounts)?;
        accounts.push(account);
    }
    if accounts.is_empty() {
        return Err(err(
            "accounts",
            "no [[accounts]] configured; the bridge would refuse every login",
        ));
    }
    Ok((identities.into_iter().map(Arc::new).collect(), accounts))
}

fn seconds(
    section: &str,
    key: &str,
    value: Option<u64>,
    default: Duration,
    range: (u64, u64),
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) if s < range.0 || s > range.1 => Err(err(
            format!("{section}.{key}"),
            format!("must be between {} and {} seconds", range.0, range.1),
        )),
        Some(s) => Ok(Duration::from_secs(s)),
    }
}

fn check_tokens(raw: RawTokens) -> Result<TokenSettings, ConfigError> {
    let d = TokenSettings::default();
    let year = 366 * 24 * 3600;
    let notify_command = match raw.notify_command {
        Some(argv) if argv.is_empty() || argv[0].trim().is_empty() => {
            return Err(err(
                "tokens.notify_command",
                "needs a program, e.g. [\"/usr/local/bin/alert\"]",
            ));
        }
        other => other,
    };
    Ok(TokenSettings {
        refresh_margin: seconds(
            "tokens",
            "refresh_margin",
            raw.refresh_margin,
            d.refresh_margin,
            (1, 24 * 3600),
        )?,
        keepalive: seconds("tokens", "keepalive", raw.keepalive, d.keepalive, (1, year))?,
        // Clients must hear back within seconds, never minutes.
        session_wait: seconds(
            "tokens",
            "session_wait",
            raw.session_wait,
            d.session_wait,
            (1, 30),
        )?,
        prefetch: raw.prefetch.unwrap_or(d.prefetch),
        backoff_max: seconds(
            "tokens",
            "backoff_max",
            raw.backoff_max,
            d.backoff_max,
            (1, 24 * 3600),
        )?,
        notify_command,
    })
}
