//! What the bridge counts and how healthy it is: a Prometheus registry (exposed as text by the
//! admin listener) and the per-account state behind `/healthz`.
//!
//! This is the one interface the rest of the code reports to: sessions, the listener loop and
//! the token manager call the small methods here (one line at each call site) and never touch
//! the registry. Account states follow the token lifecycle (`ok`, `refreshing`,
//! `needs_login`, `backing_off`); whichever code owns that lifecycle reports transitions with
//! [`Metrics::set_account_state`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::time::Instant;

use crate::oauth::{AccessToken, TokenError};
use crate::smtp::Reply;

/// Where an account's tokens stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountState {
    Ok,
    Refreshing,
    /// An administrator must act (new login, new secret, consent); retrying will not help.
    NeedsLogin,
    /// The token endpoint failed for a reason that may pass; the next attempt may succeed.
    BackingOff,
}

/// Why a client's AUTH did not end in 235.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// Wrong or unknown local username or password.
    BadCredentials,
    /// The SASL exchange was malformed or cancelled.
    Malformed,
    /// No access token: the account needs an administrator.
    TokenNeedsLogin,
    /// No access token for now: the token endpoint failed.
    TokenUnavailable,
    /// The provider could not be reached or refused the bridge's login.
    Upstream,
}

impl AuthFailure {
    fn label(self) -> &'static str {
        match self {
            AuthFailure::BadCredentials => "bad_credentials",
            AuthFailure::Malformed => "malformed",
            AuthFailure::TokenNeedsLogin => "token_needs_login",
            AuthFailure::TokenUnavailable => "token_unavailable",
            AuthFailure::Upstream => "upstream",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AccountLabel {
    account: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabel {
    account: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    account: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabel {
    operation: &'static str,
}

/// What `/healthz` reports.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Health {
    /// `ok`, `unhealthy` or `draining`.
    pub status: &'static str,
    pub problems: Vec<Problem>,
}

impl Health {
    pub fn is_ok(&self) -> bool {
        self.status == "ok"
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub account: String,
    /// `needs_login` or `upstream_failing`.
    pub problem: &'static str,
    /// The token endpoint's or provider's own words, and the fix when one is known.
    pub detail: String,
}

#[derive(Default)]
struct AccountHealth {
    state: Option<AccountState>,
    state_detail: String,
    token_expires_at: Option<Instant>,
    upstream_failures: u32,
    upstream_detail: String,
}

/// The bridge's counters and health. Shared by every session; survives configuration reloads.
pub struct Metrics {
    registry: Registry,
    connections: Counter,
    connections_active: Gauge,
    connections_refused: Family<LimitLabel, Counter>,
    auth_successes: Counter,
    auth_failures: Family<ReasonLabel, Counter>,
    messages: Family<AccountLabel, Counter>,
    message_bytes: Family<AccountLabel, Counter>,
    upstream_replies: Family<ClassLabel, Counter>,
    upstream_latency: Family<OperationLabel, Histogram>,
    token_refreshes: Family<RefreshLabel, Counter>,
    pool_events: Family<PoolLabel, Counter>,
    token_expiry: Family<AccountLabel, Gauge<f64, AtomicU64>>,
    accounts_needing_login: Gauge,
    accounts: Mutex<HashMap<String, AccountHealth>>,
    unhealthy_after: AtomicU32,
    draining: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("smtp_oauth_bridge");
        let connections = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted",
            connections.clone(),
        );
        let connections_active = Gauge::default();
        registry.register(
            "connections_active",
            "Client connections open now",
            connections_active.clone(),
        );
        let connections_refused = Family::default();
        registry.register(
            "connections_refused",
            "Client connections refused for the connection limits (global or per_source)",
            connections_refused.clone(),
        );
        let auth_successes = Counter::default();
        registry.register(
            "auth_successes",
            "Client logins that ended in 235 (local password right, upstream session open)",
            auth_successes.clone(),
        );
        let auth_failures = Family::default();
        registry.register(
            "auth_failures",
            "Client logins refused, by reason",
            auth_failures.clone(),
        );
        let messages = Family::default();
        registry.register(
            "messages_relayed",
            "Messages the provider accepted (250 after DATA), by account",
            messages.clone(),
        );
        let message_bytes = Family::default();
        registry.register(
            "message_bytes",
            "Bytes of messages the provider accepted, by account",
            message_bytes.clone(),
        );
        let upstream_replies = Family::default();
        registry.register(
            "upstream_replies",
            "Provider replies relayed to clients, by class (2xx, 3xx, 4xx, 5xx)",
            upstream_replies.clone(),
        );
        let upstream_latency = Family::<OperationLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 14))
        });
        registry.register(
            "upstream_latency_seconds",
            "Time the provider took: connect (TCP, TLS, EHLO, AUTH), command, end_of_data",
            upstream_latency.clone(),
        );
        let token_refreshes = Family::default();
        registry.register(
            "token_refreshes",
            "Access token requests to the token endpoint, by account and outcome",
            token_refreshes.clone(),
        );
        let pool_events = Family::default();
        registry.register(
            "upstream_sessions",
            "Pooled provider sessions by account and event: opened, reused, closed (QUIT), \
             discarded (failed or abandoned), lost (closed by the provider while idle), \
             wait_timeout (a transaction found no free session within pool.wait)",
            pool_events.clone(),
        );
        let token_expiry = Family::default();
        registry.register(
            "token_expiry_seconds",
            "Seconds until the account's current access token expires (negative: expired)",
            token_expiry.clone(),
        );
        let accounts_needing_login = Gauge::default();
        registry.register(
            "accounts_needing_login",
            "Accounts whose tokens need an administrator (new login, secret or consent)",
            accounts_needing_login.clone(),
        );
        Metrics {
            registry,
            connections,
            connections_active,
            connections_refused,
            auth_successes,
            auth_failures,
            messages,
            message_bytes,
            upstream_replies,
            upstream_latency,
            token_refreshes,
            pool_events,
            token_expiry,
            accounts_needing_login,
            accounts: Mutex::new(HashMap::new()),
            unhealthy_after: AtomicU32::new(3),
            draining: AtomicBool::new(false),
        }
    }

    // === configuration ===

    /// The configured accounts; state of accounts no longer configured is forgotten.
    pub fn set_accounts<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let names: Vec<&str> = names.into_iter().collect();
        let mut accounts = self.lock();
        let gone: Vec<AccountLabel> = accounts
            .keys()
            .filter(|name| !names.contains(&name.as_str()))
            .map(|name| AccountLabel {
                account: name.clone(),
            })
            .collect();
        accounts.retain(|name, _| names.contains(&name.as_str()));
        for name in &names {
            accounts.entry((*name).to_string()).or_default();
        }
        drop(accounts);
        for label in gone {
            self.token_expiry.remove(&label);
        }
        self.update_needing_login();
    }

    /// Consecutive failed upstream sessions after which an account counts as failing.
    pub fn set_unhealthy_after(&self, failures: u32) {
        self.unhealthy_after
            .store(failures.max(1), Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    // === connections and logins ===

    /// Counts a new client connection; the returned guard counts it closed when dropped.
    pub fn connection_opened(&self) -> ConnectionGuard {
        self.connections.inc();
        self.connections_active.inc();
        ConnectionGuard(self.connections_active.clone())
    }

    /// A connection refused for a connection limit: `global` or `per_source`.
    pub fn connection_refused(&self, limit: &'static str) {
        self.connections_refused
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    pub fn auth_succeeded(&self) {
        self.auth_successes.inc();
    }

    pub fn auth_failed(&self, reason: AuthFailure) {
        self.auth_failures
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
    }

    /// A token failure at AUTH, by whether an administrator must act.
    pub fn auth_failed_token(&self, e: &TokenError) {
        self.auth_failed(if e.is_permanent() {
            AuthFailure::TokenNeedsLogin
        } else {
            AuthFailure::TokenUnavailable
        });
    }

    // === messages and the provider ===

    pub fn message_relayed(&self, account: &str, bytes: u64) {
        let label = AccountLabel {
            account: account.to_string(),
        };
        self.messages.get_or_create(&label).inc();
        self.message_bytes.get_or_create(&label).inc_by(bytes);
    }

    /// A provider reply passed on to a client.
    pub fn upstream_reply(&self, reply: &Reply) {
        let class = match reply.code() / 100 {
            2 => "2xx",
            3 => "3xx",
            4 => "4xx",
            _ => "5xx",
        };
        self.upstream_replies
            .get_or_create(&ClassLabel { class })
            .inc();
    }

    /// How long a provider operation took: `connect`, `command` or `end_of_data`.
    pub fn upstream_latency(&self, operation: &'static str, took: Duration) {
        self.upstream_latency
            .get_or_create(&OperationLabel { operation })
            .observe(took.as_secs_f64());
    }

    /// Something happened to one of `account`'s pooled provider sessions.
    pub fn pool_event(&self, account: &str, event: &'static str) {
        self.pool_events
            .get_or_create(&PoolLabel {
                account: account.to_string(),
                event,
            })
            .inc();
    }

    /// An authenticated upstream session opened for `account`.
    pub fn upstream_ok(&self, account: &str) {
        let mut accounts = self.lock();
        let health = accounts.entry(account.to_string()).or_default();
        health.upstream_failures = 0;
        health.upstream_detail.clear();
    }

    /// An upstream session for `account` could not be opened; `detail` is the error with the
    /// provider's reply.
    pub fn upstream_failed(&self, account: &str, detail: &str) {
        let mut accounts = self.lock();
        let health = accounts.entry(account.to_string()).or_default();
        health.upstream_failures = health.upstream_failures.saturating_add(1);
        health.upstream_detail = detail.chars().take(400).collect();
    }

    // === tokens ===

    /// The token manager reports each state change of an account.
    pub fn set_account_state(&self, account: &str, state: AccountState, detail: &str) {
        {
            let mut accounts = self.lock();
            let health = accounts.entry(account.to_string()).or_default();
            health.state = Some(state);
            health.state_detail = detail.chars().take(400).collect();
        }
        self.update_needing_login();
    }

    /// A token request for `account` is about to be made.
    pub fn token_refreshing(&self, account: &str) {
        self.set_account_state(account, AccountState::Refreshing, "");
    }

    /// The outcome of one token request for `account`.
    pub fn token_result(&self, account: &str, result: &Result<AccessToken, TokenError>) {
        let (outcome, state, detail) = match result {
            Ok(token) => {
                self.lock()
                    .entry(account.to_string())
                    .or_default()
                    .token_expires_at = Some(token.expires_at);
                ("ok", AccountState::Ok, String::new())
            }
            Err(e @ TokenError::Transient { .. }) => {
                ("transient", AccountState::BackingOff, e.to_string())
            }
            Err(e @ TokenError::NeedsLogin { .. }) => {
                ("needs_login", AccountState::NeedsLogin, e.to_string())
            }
            Err(e @ TokenError::Setup { .. }) => ("setup", AccountState::NeedsLogin, e.to_string()),
        };
        self.token_refreshes
            .get_or_create(&RefreshLabel {
                account: account.to_string(),
                outcome,
            })
            .inc();
        self.set_account_state(account, state, &detail);
    }

    // === reading ===

    /// The registry in Prometheus text format (version 0.0.4).
    pub fn encode(&self) -> String {
        let now = Instant::now();
        for (name, health) in self.lock().iter() {
            if let Some(at) = health.token_expires_at {
                let left = if at >= now {
                    at.duration_since(now).as_secs_f64()
                } else {
                    -now.duration_since(at).as_secs_f64()
                };
                self.token_expiry
                    .get_or_create(&AccountLabel {
                        account: name.clone(),
                    })
                    .set(left.round());
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Accounts that need an administrator or whose provider keeps failing; `draining` while
    /// the bridge shuts down.
    pub fn health(&self) -> Health {
        let threshold = self.unhealthy_after.load(Ordering::Relaxed);
        let mut problems = Vec::new();
        let accounts = self.lock();
        let mut names: Vec<&String> = accounts.keys().collect();
        names.sort();
        for name in names {
            let health = &accounts[name];
            if health.state == Some(AccountState::NeedsLogin) {
                problems.push(Problem {
                    account: name.clone(),
                    problem: "needs_login",
                    detail: with_fix(&health.state_detail, crate::hints::fix_for_text),
                });
            }
            if health.upstream_failures >= threshold {
                problems.push(Problem {
                    account: name.clone(),
                    problem: "upstream_failing",
                    detail: format!(
                        "{} failed upstream sessions in a row; last: {}",
                        health.upstream_failures, health.upstream_detail
                    ),
                });
            }
        }
        let status = if self.draining.load(Ordering::Relaxed) {
            "draining"
        } else if problems.is_empty() {
            "ok"
        } else {
            "unhealthy"
        };
        Health { status, problems }
    }

    fn update_needing_login(&self) {
        let count = self
            .lock()
            .values()
            .filter(|h| h.state == Some(AccountState::NeedsLogin))
            .count();
        self.accounts_needing_login.set(count as i64);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, AccountHealth>> {
        self.accounts.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn with_fix(detail: &str, fix: impl Fn(&str) -> Option<&'static str>) -> String {
    match fix(detail) {
        Some(fix) => format!("{detail}; fix: {fix}"),
        None => detail.to_string(),
    }
}

/// Counts a connection closed when dropped, however the session ends.
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn counters_appear_in_prometheus_text_with_their_labels() {
        let m = Metrics::new();
        m.set_accounts(["printer"]);
        {
            let _c = m.connection_opened();
            m.auth_failed(AuthFailure::BadCredentials);
            m.auth_succeeded();
            m.message_relayed("printer", 1234);
            m.upstream_latency("connect", Duration::from_millis(30));
            m.connection_refused("per_source");
            m.connection_refused("per_source");
        }
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_connections_refused_total{limit=\"per_source\"}"
            ),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "smtp_oauth_bridge_connections_total"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "smtp_oauth_bridge_connections_active"),
            Some(0.0)
        );
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_auth_failures_total{reason=\"bad_credentials\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_message_bytes_total{account=\"printer\"}"
            ),
            Some(1234.0)
        );
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_upstream_latency_seconds_count{operation=\"connect\"}"
            ),
            Some(1.0)
        );
        assert!(text.contains("# TYPE smtp_oauth_bridge_upstream_latency_seconds histogram"));
    }

    #[tokio::test(start_paused = true)]
    async fn token_outcomes_drive_expiry_and_needing_login() {
        let m = Metrics::new();
        m.set_accounts(["a", "b"]);
        let token = AccessToken {
            secret: secrecy::SecretString::from("t".to_string()),
            expires_at: Instant::now() + Duration::from_secs(3600),
        };
        m.token_result("a", &Ok(token));
        tokio::time::advance(Duration::from_secs(600)).await;
        m.token_result(
            "b",
            &Err(TokenError::NeedsLogin {
                reason: "invalid_grant: AADSTS70008: expired".into(),
                code: Some("invalid_grant".into()),
                aadsts: Some(70008),
                hint: String::new(),
            }),
        );
        let text = m.encode();
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_token_expiry_seconds{account=\"a\"}"
            ),
            Some(3000.0)
        );
        assert_eq!(
            value(&text, "smtp_oauth_bridge_accounts_needing_login"),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                "smtp_oauth_bridge_token_refreshes_total{account=\"b\",outcome=\"needs_login\"}"
            ),
            Some(1.0)
        );
        let health = m.health();
        assert_eq!(health.status, "unhealthy");
        assert_eq!(health.problems.len(), 1);
        assert_eq!(health.problems[0].account, "b");
        assert!(
            health.problems[0]
                .detail
                .contains("smtp-oauth-bridge login"),
            "{:?}",
            health
        );

        // Removing the account from the configuration clears its problem.
        m.set_accounts(["a"]);
        assert!(m.health().is_ok());
        assert_eq!(
            value(&m.encode(), "smtp_oauth_bridge_accounts_needing_login"),
            Some(0.0)
        );
    }

    #[test]
    fn repeated_upstream_failures_make_the_bridge_unhealthy_until_a_success() {
        let m = Metrics::new();
        m.set_accounts(["a"]);
        m.set_unhealthy_after(2);
        m.upstream_failed("a", "connect failed: connection refused");
        assert!(m.health().is_ok());
        m.upstream_failed("a", "connect failed: connection refused");
        let health = m.health();
        assert_eq!(health.problems[0].problem, "upstream_failing");
        assert!(health.problems[0].detail.contains("connection refused"));
        m.upstream_ok("a");
        assert!(m.health().is_ok());
        m.set_draining();
        assert_eq!(m.health().status, "draining");
    }
}
