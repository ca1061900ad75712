//! The administrator's subcommands besides `run`: `login`, `accounts` and `import-token`.
//! They return what happened; `main.rs` prints it and picks the exit code.

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};

use crate::config::{Config, Flow, Identity};
use crate::oauth::endpoint::Http;
use crate::oauth::login::{self, Method};
use crate::oauth::status::{StatusFile, render_accounts};
use crate::store::{Store, unix_now};

/// Why a subcommand failed, by the exit code it deserves.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The command line or configuration names something that is not there (exit 64).
    #[error("{0}")]
    Usage(String),
    /// The store or the network is unavailable (exit 69).
    #[error("{0}")]
    Unavailable(String),
    /// The login itself did not succeed (exit 1).
    #[error("{0}")]
    Failed(String),
}

fn identity<'a>(config: &'a Config, wanted: &str) -> Result<&'a Arc<Identity>, Failure> {
    config.identity_for(wanted).ok_or_else(|| {
        Failure::Usage(format!(
            "no identity or account named {wanted} in the configuration"
        ))
    })
}

/// `login IDENTITY`: signs in (delegated) or checks the credential (app-only).
pub async fn login(
    config: &Config,
    wanted: &str,
    method: Option<Method>,
    timeout: Duration,
) -> Result<(), Failure> {
    let identity = identity(config, wanted)?;
    if identity.provider == crate::config::Provider::Sandbox {
        return Err(Failure::Usage(
            "sandbox identities need no login: the sandbox issues tokens itself".into(),
        ));
    }
    let tls = crate::tls::client_config(config.extra_ca_file.as_deref(), Vec::new())
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    let http = Http::new(&tls, config.timeouts.token_request).map_err(Failure::Unavailable)?;
    let store =
        Store::open(&config.store.directory).map_err(|e| Failure::Unavailable(e.to_string()))?;
    let method = method.unwrap_or_else(|| login::default_method(identity));
    let hint = login_hint(config, &identity.name);
    let request = login::Request {
        method,
        timeout,
        pasted: (method != Method::Device).then(stdin_lines),
        login_hint: hint.as_deref(),
    };
    let mut out = std::io::stdout();
    login::login(identity, &http, &store, request, &mut out)
        .await
        .map_err(|e| match e {
            login::LoginError::Store(e) => Failure::Unavailable(e.to_string()),
            login::LoginError::Unsupported(text) => Failure::Usage(text),
            other => Failure::Failed(other.to_string()),
        })
}

/// The user to sign in as: the one mailbox every account of the identity sends as.
fn login_hint(config: &Config, identity: &str) -> Option<String> {
    let mut mailboxes = config.accounts_of(identity).map(|a| a.mailbox.clone());
    let first = mailboxes.next()??;
    mailboxes
        .all(|m| m.as_deref() == Some(&first))
        .then_some(first)
}

/// Lines typed on standard input, read on a plain thread: a blocked read must not keep the
/// process from exiting once the browser's redirect arrived instead.
fn stdin_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// `accounts`: every account with its identity's live state. Reads only the status file,
/// never the token store, so it needs no key and prints no secret.
pub fn accounts(config: &Config) -> Result<String, Failure> {
    let status = StatusFile::read(&config.store.directory).map_err(Failure::Unavailable)?;
    let running = status.as_ref().is_some_and(StatusFile::daemon_running);
    Ok(render_accounts(
        config,
        status.as_ref(),
        running,
        unix_now(),
    ))
}

/// `import-token IDENTITY`: stores a refresh token obtained elsewhere.
pub fn import_token(config: &Config, wanted: &str, text: &str) -> Result<String, Failure> {
    let identity = identity(config, wanted)?;
    if identity.oauth.flow != Flow::RefreshToken {
        return Err(Failure::Usage(format!(
            "identity {} uses flow {}, which needs no refresh token",
            identity.name, identity.oauth.flow
        )));
    }
    let token = SecretString::from(text.trim().to_string());
    if token.expose_secret().is_empty() || token.expose_secret().contains(char::is_whitespace) {
        return Err(Failure::Failed(
            "expected one refresh token on standard input".into(),
        ));
    }
    let store =
        Store::open(&config.store.directory).map_err(|e| Failure::Unavailable(e.to_string()))?;
    // The configured token endpoint is the best guess of who issued it.
    store
        .save_grant(&identity.name, &token, Some(&identity.oauth.token_url))
        .map_err(|e| Failure::Unavailable(e.to_string()))?;
    Ok(format!(
        "stored the refresh token of {} in {}",
        identity.name,
        store.dir().display()
    ))
}
