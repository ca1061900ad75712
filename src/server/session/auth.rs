//! Local login (AUTH PLAIN and LOGIN against the configured hashes, throttled per source
//! address) and what it unlocks: authenticated sessions with the provider, opened with the
//! account's access token and lent from the account's pool, one per transaction.

use std::sync::Arc;

use tokio::time::Instant;

use super::client::{End, Input};
use super::{AUTH_LINE_LIMIT, Session};
use crate::config::Account;
use crate::oauth::TokenError;
use crate::ops::metrics::AuthFailure;
use crate::server::Shared;
use crate::smtp::Reply;
use crate::smtp::sasl::{Credentials, Exchange, Failure, Mechanism, SaslError, Step};
use crate::upstream::pool::{AcquireError, Lease, Opener};
use crate::upstream::{Phase, Target, Upstream, UpstreamError};

impl Session {
    pub(super) async fn auth(&mut self, mechanism: u64, initial: &str) -> Result<(), End> {
        if !self.auth_allowed_here() {
            return self.error_reply(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        if !self.greeted {
            return self.error_reply(503, "5.5.1", "Send EHLO first");
        }
        if self.account.is_some() {
            return self.error_reply(503, "5.5.1", "Already authenticated");
        }
        if self.transaction.is_some() {
            return self.error_reply(503, "5.5.1", "AUTH not allowed during a mail transaction");
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Mechanism::Plain,
            smtp_proto::AUTH_LOGIN => Mechanism::Login,
            _ => {
                return self.error_reply(
                    504,
                    "5.5.4",
                    "Unrecognized authentication type; use PLAIN or LOGIN",
                );
            }
        };
        let source = self.peer.ip();
        if !self.shared.guard.login_allowed(source) {
            // Refused unchecked: a guesser learns nothing, and the 4xx tells a real client
            // to come back later, when the right password works again.
            tracing::debug!("login refused: too many recent failures from this address");
            return self.error_reply(
                454,
                "4.7.0",
                "Too many failed logins from your address; try again later",
            );
        }
        let Some(credentials) = self.sasl(mechanism, initial).await? else {
            return Ok(());
        };
        self.check_credentials(credentials).await
    }

    /// Runs the exchange; `None` when it failed (its reply is queued).
    async fn sasl(
        &mut self,
        mechanism: Mechanism,
        initial: &str,
    ) -> Result<Option<Credentials>, End> {
        let initial = (!initial.trim().is_empty()).then_some(initial.as_bytes());
        let (mut exchange, mut step) = Exchange::start(mechanism, initial);
        loop {
            match step {
                Step::Done(credentials) => return Ok(Some(credentials)),
                Step::Failed(failure) => {
                    if matches!(failure, Failure::Invalid(_)) {
                        self.shared.metrics.auth_failed(AuthFailure::Malformed);
                    }
                    let (code, enhanced, text) = failure.reply();
                    self.error_reply(code, enhanced, text)?;
                    return Ok(None);
                }
                Step::Challenge(challenge) => {
                    self.reply_plain(334, challenge);
                    step = match self
                        .client
                        .read_line(AUTH_LINE_LIMIT, AUTH_LINE_LIMIT, false)
                        .await?
                    {
                        Input::Line(line) => {
                            let line = zeroize::Zeroizing::new(line);
                            exchange.respond(&line)
                        }
                        Input::TooLong { .. } => Step::Failed(Failure::Invalid(SaslError::TooLong)),
                    };
                }
            }
        }
    }

    async fn check_credentials(&mut self, credentials: Credentials) -> Result<(), End> {
        // A client waits at most `session_wait` for a token, counted from here: the password
        // check and any wait for this address's turn come out of it.
        let token_deadline = Instant::now() + self.shared.config.tokens.session_wait;
        let Credentials { username, password } = credentials;
        let config = &self.shared.config;
        let found = config.find_account(&username);
        let index = found.as_ref().map(|(i, _)| *i);
        let hash = index.map(|i| config.accounts[i].password_hash.as_str());
        let source = self.peer.ip();
        let turn = self.shared.guard.login_turn(source).await;
        if !self.shared.guard.login_allowed(source) {
            // Checks from this address that ran while this one waited used up its allowance.
            return self.error_reply(
                454,
                "4.7.0",
                "Too many failed logins from your address; try again later",
            );
        }
        let verified = self
            .shared
            .verifier
            .verify(&username.to_ascii_lowercase(), password, hash)
            .await;
        if !verified {
            // An unknown username is not logged: clients that swap the fields would put the
            // password there.
            if index.is_some() {
                tracing::info!(username = %printable(&username), "local authentication failed");
            } else {
                tracing::info!(
                    username_chars = username.chars().count(),
                    "local authentication failed: unknown username"
                );
            }
            if self.shared.guard.login_failed(source) {
                let limits = self.shared.guard.limits();
                tracing::warn!(
                    source = %source,
                    failures = limits.auth_failures,
                    window_s = limits.auth_failure_window.as_secs(),
                    "too many failed logins from this address; refusing its logins until the \
                     failures are older than the window"
                );
            }
            self.shared.metrics.auth_failed(AuthFailure::BadCredentials);
            // Counted like any other client error, so one connection cannot guess forever.
            return self.error_reply(535, "5.7.8", "Authentication credentials invalid");
        }
        self.shared.guard.login_succeeded(source);
        // The turn covers the password check only; the provider connection below must not
        // hold up other logins from the same address.
        drop(turn);
        let Some((index, mailbox)) = found else {
            unreachable!("verify() never accepts an unknown user");
        };
        self.mailbox = Some(mailbox);
        let account_name = self.shared.config.accounts[index].name.clone();
        tracing::Span::current().record("account", account_name.as_str());
        tracing::debug!("local authentication succeeded");

        match self.check_upstream(index, token_deadline).await {
            Ok(()) => {
                self.account = Some(index);
                self.shared.metrics.auth_succeeded();
                self.reply(235, "2.7.0", "Authentication successful");
            }
            Err(reply) => reply.write_to(self.client.queue()),
        }
        Ok(())
    }

    /// At AUTH, makes sure the account can send: free when the pool already holds a session
    /// for it; otherwise a token is fetched and a session opened (and pooled for the client's
    /// first MAIL), so token and provider problems are reported at AUTH as before. A provider
    /// that says it has too many sessions for the mailbox has accepted the token; the
    /// client's MAIL will wait for a session.
    async fn check_upstream(&mut self, index: usize, token_deadline: Instant) -> Result<(), Reply> {
        let shared = self.shared.clone();
        let account = &shared.config.accounts[index];
        let mailbox = self.mailbox_of(account);
        let pool = shared.pool.account(account, &mailbox);
        if pool.is_warm() {
            return Ok(());
        }
        match pool
            .acquire(async || {
                Box::pin(open_session(&shared, account, &mailbox, token_deadline)).await
            })
            .await
        {
            Ok(lease) => {
                lease.release();
                Ok(())
            }
            Err(AcquireError::Busy | AcquireError::Open(OpenFailure::ProviderBusy)) => Ok(()),
            Err(AcquireError::Open(OpenFailure::Refused(reply))) => Err(reply),
        }
    }

    /// A session for the client's transaction, from the pool or newly opened. The reply on
    /// failure is the client's answer to its MAIL.
    pub(super) async fn lease(&mut self, index: usize) -> Result<Lease, Reply> {
        let shared = self.shared.clone();
        let account = &shared.config.accounts[index];
        let mailbox = self.mailbox_of(account);
        let pool = shared.pool.account(account, &mailbox);
        pool.set_opener_if_missing(|| opener(&shared, index, &mailbox));
        match pool
            .acquire(async || {
                let deadline = Instant::now() + shared.config.tokens.session_wait;
                Box::pin(open_session(&shared, account, &mailbox, deadline)).await
            })
            .await
        {
            Ok(lease) => Ok(lease),
            Err(AcquireError::Busy | AcquireError::Open(OpenFailure::ProviderBusy)) => {
                tracing::info!(
                    account = %account.name,
                    max_sessions = shared.config.pool.max_sessions,
                    "no provider session free for this account within pool.wait; client told to retry"
                );
                Err(self.own_reply(
                    451,
                    "4.3.2",
                    "All sessions to the mail provider for this account are busy; try again later",
                ))
            }
            Err(AcquireError::Open(OpenFailure::Refused(reply))) => Err(reply),
        }
    }

    /// The address the provider session logs in as (XOAUTH2's `user=`): the one the client
    /// logged in with for a `*@domain` account, else the account's.
    fn mailbox_of(&self, account: &Account) -> String {
        self.mailbox
            .as_deref()
            .or(account.mailbox.as_deref())
            .unwrap_or_default()
            .to_string()
    }
}

/// How the pool opens a replacement session for `index` sending as `mailbox`, with no client
/// waiting. It holds the configuration weakly: after a reload the pool asks for a new one.
fn opener(shared: &Arc<Shared>, index: usize, mailbox: &str) -> Opener {
    let shared = Arc::downgrade(shared);
    let mailbox = mailbox.to_string();
    Arc::new(move || {
        let (shared, mailbox) = (shared.clone(), mailbox.clone());
        Box::pin(async move {
            let shared = shared.upgrade()?;
            let account = shared.config.accounts.get(index)?;
            let deadline = Instant::now() + shared.config.tokens.session_wait;
            open_session(&shared, account, &mailbox, deadline)
                .await
                .ok()
        })
    })
}

/// Why no provider session could be opened.
enum OpenFailure {
    /// The reply for the client: whether to retry (4xx) or call the administrator (5xx).
    Refused(Reply),
    /// The provider refused one more concurrent session for the mailbox (`432 4.3.2`):
    /// something else uses it too, and the bridge's cap is higher than what is left.
    ProviderBusy,
}

/// Gets a token (waiting for one until `token_deadline` at most) and opens an authenticated
/// provider session. A token the provider refuses is replaced once by a fresh one, with a
/// wait of its own: the provider's refusal may have come after most of the first wait.
/// Callers box this future: it is large (TLS handshake, token request) and rarely needed, and
/// every session's task would otherwise reserve room for it.
async fn open_session(
    shared: &Shared,
    account: &Account,
    mailbox: &str,
    token_deadline: Instant,
) -> Result<Upstream, OpenFailure> {
    let mut token = match shared
        .tokens
        .token_by(&account.identity, token_deadline)
        .await
    {
        Ok(token) => token,
        Err(e) => return Err(OpenFailure::Refused(token_error_reply(shared, &e))),
    };
    let target = Target {
        settings: &account.upstream,
        tls: &shared.tls_client,
        ehlo_name: &shared.config.server.hostname,
        mailbox,
        timeouts: shared.config.timeouts,
    };
    let mut refreshed = false;
    loop {
        let started = tokio::time::Instant::now();
        let connected = Upstream::connect(&target, &token).await;
        shared
            .metrics
            .upstream_latency("connect", started.elapsed());
        let e = match connected {
            Ok(upstream) => {
                shared.metrics.upstream_ok(&account.name);
                tracing::debug!(upstream = %account.upstream.host, "upstream authenticated");
                return Ok(upstream);
            }
            Err(e) => e,
        };
        let auth_reply = match &e {
            UpstreamError::Rejected {
                phase: Phase::Auth,
                reply,
            } => Some(reply),
            _ => None,
        };
        if auth_reply.is_some_and(|r| r.code() == 432) {
            tracing::warn!(account = %account.name, error = %e, "the provider refused another concurrent session for this mailbox; is something else sending as it? Lower pool.max_sessions if so");
            return Err(OpenFailure::ProviderBusy);
        }
        let refused_token = auth_reply.is_some_and(|r| {
            matches!(r.enhanced(), Some("5.7.3" | "5.5.127" | "4.7.0"))
                || (r.code() == 535 && r.enhanced().is_none())
        });
        if refused_token && !refreshed {
            // The provider refused a token we thought valid (revoked, or too close to expiry
            // for it): get a fresh one and try once more.
            tracing::warn!(account = %account.name, error = %e, "upstream refused the access token; fetching a new one");
            refreshed = true;
            token = match shared.tokens.replace(&account.identity, &token).await {
                Ok(t) => t,
                Err(e) => return Err(OpenFailure::Refused(token_error_reply(shared, &e))),
            };
            continue;
        }
        tracing::warn!(account = %account.name, error = %e, fix = e.reply().and_then(crate::hints::fix_for_reply), "cannot open the upstream session");
        shared
            .metrics
            .upstream_failed(&account.name, &e.to_string());
        shared.metrics.auth_failed(AuthFailure::Upstream);
        return Err(OpenFailure::Refused(upstream_auth_reply(&e)));
    }
}

/// A username for a log line: printable ASCII only, bounded.
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(128)
        .collect()
}

fn token_error_reply(shared: &Shared, e: &TokenError) -> Reply {
    shared.metrics.auth_failed_token(e);
    match e {
        TokenError::Transient { .. } => Reply::new(
            454,
            "4.7.0 Temporary authentication failure: the mail provider's login service is unavailable, try again later",
        ),
        TokenError::NeedsLogin { .. } | TokenError::Setup { .. } => Reply::new(
            535,
            &format!(
                "5.7.8 Authentication credentials invalid: {}",
                e.short_reason()
            ),
        ),
    }
}

/// What the client hears when the upstream connection could not be authenticated.
fn upstream_auth_reply(e: &UpstreamError) -> Reply {
    match e.reply() {
        // SMTP AUTH switched off for the tenant: permanent, and the provider's text says how
        // to fix it, so pass it on.
        Some(r) if r.enhanced() == Some("5.7.139") => {
            let mut text = format!(
                "5.7.139 Mail provider refused the bridge: {}",
                strip_code(r)
            );
            truncate_on_char(&mut text, 400);
            Reply::new(535, &text)
        }
        Some(r) => {
            let mut text = format!(
                "4.7.0 Temporary authentication failure at the mail provider: {} {}",
                r.code(),
                r.text()
            );
            truncate_on_char(&mut text, 400);
            Reply::new(454, &text)
        }
        None => Reply::new(
            454,
            &format!(
                "4.7.0 Temporary authentication failure: cannot reach the mail provider ({e}), try again later"
            ),
        ),
    }
}

/// `String::truncate` panics inside a UTF-8 sequence, and provider text may hold any.
fn truncate_on_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// The reply text without its enhanced code, for embedding in a reply of our own.
fn strip_code(reply: &Reply) -> String {
    let text = reply.text();
    match reply.enhanced() {
        Some(code) => text.trim_start_matches(code).trim_start().to_string(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_text_is_cut_on_a_character_boundary() {
        let long = format!("5.7.1 {}", "é".repeat(400));
        let reply = upstream_auth_reply(&UpstreamError::Rejected {
            phase: Phase::Auth,
            reply: Reply::new(554, &long),
        });
        assert_eq!((reply.code(), reply.enhanced()), (454, Some("4.7.0")));
        assert!(reply.to_bytes().len() <= 512);
    }
}
