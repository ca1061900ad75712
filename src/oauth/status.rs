//! What `smtp-oauth-bridge accounts` shows, and how it learns it: the daemon rewrites
//! `status.json` in the store directory whenever an identity's state changes. The file holds
//! no secret (states, times, the endpoint's error text), so the command needs neither the
//! store key nor a connection to the daemon, and still answers when the daemon is down
//! (then it says so, and how old the state is).

use std::fmt::{self, Write as _};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::Config;

/// An identity's state as `accounts` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// A valid access token is held.
    Ok,
    /// A token request is in flight.
    Refreshing,
    /// The provider refused the grant or the credential; an administrator must act.
    NeedsLogin,
    /// The last request failed transiently; retrying later.
    BackingOff,
    /// No token requested yet (prefetch off and no session so far).
    Idle,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Ok => "ok",
            State::Refreshing => "refreshing",
            State::NeedsLogin => "needs-login",
            State::BackingOff => "backing-off",
            State::Idle => "idle",
        })
    }
}

/// One identity in the status file. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub name: String,
    pub flow: String,
    pub state: State,
    pub access_token_expires: Option<u64>,
    pub last_refresh: Option<u64>,
    pub refresh_token_received: Option<u64>,
    pub refresh_token_used: Option<u64>,
    /// When the next attempt is due while backing off.
    pub retry_at: Option<u64>,
    /// The last failure (endpoint error code and first sentence), if the last attempt failed.
    pub last_error: Option<String>,
    pub hint: Option<String>,
    /// Token requests made since the daemon started.
    pub requests: u64,
}

/// `status.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusFile {
    pub pid: u32,
    pub started: u64,
    pub written: u64,
    pub identities: Vec<IdentityStatus>,
}

impl StatusFile {
    /// Reads the status file of the store in `dir`; `Ok(None)` when there is none yet.
    pub fn read(dir: &Path) -> Result<Option<StatusFile>, String> {
        let path = dir.join(crate::store::STATUS_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| format!("{} is not a status file: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Whether the process that wrote the file still runs.
    pub fn daemon_running(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    fn identity(&self, name: &str) -> Option<&IdentityStatus> {
        self.identities.iter().find(|i| i.name == name)
    }
}

/// The `accounts` table: one line per account, with its identity's state, then the reasons
/// of identities that need attention. `now` is Unix seconds.
pub fn render_accounts(
    config: &Config,
    status: Option<&StatusFile>,
    running: bool,
    now: u64,
) -> String {
    let mut out = String::new();
    match status {
        None => {
            let _ = writeln!(
                out,
                "no status in {}: the daemon has not run with this store yet",
                config.store.directory.display()
            );
        }
        Some(s) if running => {
            let _ = writeln!(
                out,
                "daemon running (pid {}, started {}); state as of {}",
                s.pid,
                ago(now, s.started),
                ago(now, s.written)
            );
        }
        Some(s) => {
            let _ = writeln!(
                out,
                "daemon NOT running (pid {} gone); last known state from {}",
                s.pid,
                ago(now, s.written)
            );
        }
    }
    let header = [
        "ACCOUNT",
        "USERNAME",
        "IDENTITY",
        "FLOW",
        "STATE",
        "TOKEN EXPIRES",
        "LAST REFRESH",
        "REFRESH TOKEN AGE",
    ];
    let mut rows = vec![header.map(String::from).to_vec()];
    for account in &config.accounts {
        let identity = config.identity(&account.identity);
        let flow = identity
            .map(|i| i.oauth.flow.to_string())
            .unwrap_or_default();
        let live = status.and_then(|s| s.identity(&account.identity));
        let dash = || "-".to_string();
        rows.push(vec![
            account.name.clone(),
            account.username.clone(),
            account.identity.clone(),
            flow,
            live.map(|l| l.state.to_string()).unwrap_or_else(dash),
            live.and_then(|l| l.access_token_expires)
                .map(|t| until(now, t))
                .unwrap_or_else(dash),
            live.and_then(|l| l.last_refresh)
                .map(|t| ago(now, t))
                .unwrap_or_else(dash),
            live.and_then(|l| l.refresh_token_received)
                .map(|t| age(now.saturating_sub(t)))
                .unwrap_or_else(dash),
        ]);
    }
    out.push_str(&table(&rows));
    for identity in status.map(|s| s.identities.as_slice()).unwrap_or(&[]) {
        if let Some(error) = &identity.last_error {
            let _ = writeln!(out, "\n{} ({}): {error}", identity.name, identity.state);
            if let Some(hint) = &identity.hint {
                let _ = writeln!(out, "  hint: {hint}");
            }
            if let Some(at) = identity.retry_at {
                let _ = writeln!(out, "  next attempt {}", until(now, at));
            }
        }
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            let _ = write!(line, "{cell:<width$}  ", width = widths[c]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "3m ago", "2h 5m ago".
fn ago(now: u64, then: u64) -> String {
    if then > now {
        return "just now".into();
    }
    format!("{} ago", age(now - then))
}

/// "in 47m", or "expired 3m ago".
fn until(now: u64, then: u64) -> String {
    if then >= now {
        format!("in {}", age(then - now))
    } else {
        format!("expired {} ago", age(now - then))
    }
}

/// A duration in its two largest units: "45s", "12m 3s", "5h 2m", "3d 4h".
pub fn age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_naturally() {
        assert_eq!(age(45), "45s");
        assert_eq!(age(12 * 60 + 3), "12m 3s");
        assert_eq!(age(5 * 3600 + 120), "5h 2m");
        assert_eq!(age(3 * 86_400 + 4 * 3600), "3d 4h");
        assert_eq!(until(100, 160), "in 1m 0s");
        assert_eq!(until(160, 100), "expired 1m 0s ago");
    }

    fn identity_status(name: &str, flow: &str, state: State) -> IdentityStatus {
        IdentityStatus {
            name: name.into(),
            flow: flow.into(),
            state,
            access_token_expires: None,
            last_refresh: None,
            refresh_token_received: None,
            refresh_token_used: None,
            retry_at: None,
            last_error: None,
            hint: None,
            requests: 0,
        }
    }

    #[test]
    fn each_account_shows_flow_state_expiry_last_refresh_and_refresh_token_age() {
        let hash = crate::users::hash_password("pw").unwrap();
        let config = Config::from_toml_str(&format!(
            "[[identities]]\nname = \"app\"\ntenant = \"contoso.onmicrosoft.com\"\n\
             client_id = \"x\"\nclient_secret = \"hunter2-secret\"\n\
             [[identities]]\nname = \"delegated\"\ntenant = \"contoso.onmicrosoft.com\"\n\
             client_id = \"y\"\nflow = \"refresh_token\"\n\
             [[accounts]]\nname = \"everyone\"\nusername = \"*@contoso.com\"\n\
             password_hash = \"{hash}\"\nidentity = \"app\"\n\
             [[accounts]]\nname = \"printer\"\nusername = \"printer@fabrikam.com\"\n\
             password_hash = \"{hash}\"\nidentity = \"delegated\"\n"
        ))
        .unwrap();
        let now = 1_000_000_000;
        let delegated = IdentityStatus {
            access_token_expires: Some(now + 1800),
            last_refresh: Some(now - 600),
            refresh_token_received: Some(now - 3 * 86_400 - 7200),
            refresh_token_used: Some(now - 600),
            ..identity_status("delegated", "refresh_token", State::Refreshing)
        };
        let app = IdentityStatus {
            last_error: Some("account needs an administrator: invalid_client".into()),
            hint: Some("check the client secret".into()),
            ..identity_status("app", "client_credentials", State::NeedsLogin)
        };
        let status = StatusFile {
            pid: 1,
            started: now - 3600,
            written: now - 5,
            identities: vec![app, delegated],
        };
        let text = render_accounts(&config, Some(&status), true, now);
        let row = |account: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.starts_with(account)).unwrap();
            line.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        };
        assert_eq!(
            row("printer"),
            [
                "printer",
                "printer@fabrikam.com",
                "delegated",
                "refresh_token",
                "refreshing",
                "in 30m 0s",
                "10m 0s ago",
                "3d 2h"
            ]
        );
        assert_eq!(
            row("everyone"),
            [
                "everyone",
                "*@contoso.com",
                "app",
                "client_credentials",
                "needs-login",
                "-",
                "-",
                "-"
            ]
        );
        assert!(text.contains("hint: check the client secret"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn states_serialise_as_accounts_prints_them() {
        let json = serde_json::to_string(&State::NeedsLogin).unwrap();
        assert_eq!(json, "\"needs-login\"");
        assert_eq!(State::BackingOff.to_string(), "backing-off");
    }
}
