//! One client connection from greeting to QUIT: the SMTP state machine toward the legacy
//! client, local authentication, and the relay of each transaction to an authenticated
//! upstream connection.
//!
//! The client sees 250 for a message only when the provider said 250 for it. Replies are
//! written in command order; they are buffered while more pipelined commands are waiting and
//! flushed before the session waits for the client again.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use smtp_proto::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Account;
use crate::io::Stream;
use crate::oauth::{AccessToken, TokenError};
use crate::ops::metrics::AuthFailure;
use crate::server::{Lifecycle, Shared};
use crate::smtp::sasl::{self, SaslError};
use crate::smtp::{DataFramer, Feed, LineStatus, Reply, find_line};
use crate::upstream::{Phase, Target, Upstream, UpstreamError};

/// Longest ordinary command line accepted, CRLF included. RFC 5321 asks for 512 at least;
/// MAIL with DSN and SMTPUTF8 parameters runs longer in practice.
pub const COMMAND_LINE_LIMIT: usize = 4096;
/// Longest line in an AUTH exchange (RFC 4954 section 4 suggests 12,288 octets), plus CRLF.
pub const AUTH_LINE_LIMIT: usize = 12_288 + 2;

const READ_CHUNK: usize = 16 * 1024;

/// Why a session ended early; everything else is a normal QUIT or close.
#[derive(Debug, thiserror::Error)]
enum End {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client idle for {}s", .0.as_secs())]
    ClientIdle(Duration),
    #[error("client connection failed: {0}")]
    ClientIo(#[from] std::io::Error),
    #[error("session closed after QUIT or a fatal reply")]
    Done,
    #[error("the bridge is shutting down")]
    ShuttingDown,
}

/// Per-connection state.
pub struct Session {
    shared: Arc<Shared>,
    stream: Stream,
    /// Bytes read from the client; `pos` marks how far they are consumed.
    inbuf: Vec<u8>,
    pos: usize,
    outbuf: Vec<u8>,
    /// HELO or EHLO seen.
    greeted: bool,
    /// The client used EHLO, so replies carry enhanced status codes (RFC 2034).
    extended: bool,
    account: Option<usize>,
    /// The mailbox the authenticated client sends as (XOAUTH2 `user=`).
    mailbox: String,
    upstream: Option<Upstream>,
    token: Option<AccessToken>,
    transaction: Option<Transaction>,
    errors: u32,
    /// A 421 was relayed: the session ends after this command (RFC 5321 section 3.8).
    closing: bool,
    lifecycle: tokio::sync::watch::Receiver<Lifecycle>,
}

#[derive(Default)]
struct Transaction {
    accepted_recipients: usize,
}

impl Session {
    pub fn new(shared: Arc<Shared>, stream: Stream) -> Session {
        Session {
            stream,
            inbuf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            outbuf: Vec::with_capacity(1024),
            greeted: false,
            extended: false,
            account: None,
            mailbox: String::new(),
            upstream: None,
            token: None,
            transaction: None,
            errors: 0,
            closing: false,
            lifecycle: shared.lifecycle.clone(),
            shared,
        }
    }

    /// Runs the conversation to its end. Never panics on client input; every outcome is logged
    /// at the level its audience needs (client mistakes at debug).
    pub async fn run(mut self) {
        let greeting = format!(
            "{} ESMTP smtp-oauth-bridge ready",
            self.shared.config.server.hostname
        );
        self.reply_plain(220, &greeting);
        let result = self.serve().await;
        let _ = self.flush().await;
        match result {
            Ok(()) | Err(End::Done) => tracing::debug!("session closed"),
            Err(End::ClientClosed) => tracing::debug!("client closed the connection"),
            Err(e) => tracing::debug!(reason = %e, "session ended"),
        }
        if let Some(upstream) = self.upstream.take() {
            upstream.quit().await;
        }
        let _ = self.stream.shutdown().await;
    }

    async fn serve(&mut self) -> Result<(), End> {
        loop {
            let line = match self.read_line(COMMAND_LINE_LIMIT, AUTH_LINE_LIMIT).await? {
                Line::Complete(line) => line,
                Line::TooLong { auth: true } => {
                    self.error_reply(500, "5.5.6", "Authentication exchange line is too long")?;
                    continue;
                }
                Line::TooLong { auth: false } => {
                    self.error_reply(500, "5.5.2", "Line too long")?;
                    continue;
                }
            };
            self.command(&line).await?;
            if self.closing {
                // The provider said 421 and closed; the client hears the same and goes.
                return Err(End::Done);
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<(), End> {
        if line.contains(&0) {
            return self.error_reply(500, "5.5.2", "NUL byte in command line");
        }
        // smtp-proto wants the line with its LF; a bare-LF line is accepted as a command
        // line (many old clients), DATA content is held to stricter rules.
        let request = match Request::parse(&mut line.iter()) {
            Ok(request) => request,
            Err(e) => return self.parse_error(e, line),
        };
        tracing::debug!(command = request.name(), "command");
        if !matches!(request, Request::Quit) && self.refusing_new_work() {
            return self.shutting_down();
        }
        match request {
            Request::Ehlo { host } => self.ehlo(&host),
            Request::Helo { host } => self.helo(&host),
            Request::Lhlo { .. } => self.error_reply(500, "5.5.1", "LHLO is for LMTP"),
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let initial = initial_response.into_owned();
                self.auth(mechanism, SecretString::from(initial)).await
            }
            Request::Mail { from } => self.mail(line, from.size, from.flags).await,
            Request::Rcpt { .. } => self.rcpt(line).await,
            Request::Data => self.data().await,
            Request::Rset => self.rset().await,
            Request::Noop { .. } => {
                self.reply(250, "2.0.0", "OK");
                Ok(())
            }
            Request::Quit => {
                self.reply(221, "2.0.0", "Bye");
                Err(End::Done)
            }
            Request::Help { .. } => {
                self.reply(
                    214,
                    "2.0.0",
                    "Commands: EHLO HELO AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
                );
                Ok(())
            }
            Request::Vrfy { .. } => {
                self.reply(
                    252,
                    "2.5.0",
                    "Cannot VRFY user, but will accept message and attempt delivery",
                );
                Ok(())
            }
            Request::StartTls => {
                self.error_reply(502, "5.5.1", "STARTTLS not available on this listener")
            }
            Request::Bdat { .. } => {
                self.error_reply(502, "5.5.1", "CHUNKING not offered; use DATA")
            }
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error_reply(502, "5.5.1", "Command not implemented"),
        }
    }

    fn parse_error(&mut self, e: smtp_proto::Error, line: &[u8]) -> Result<(), End> {
        use smtp_proto::Error as E;
        match e {
            E::UnknownCommand => self.error_reply(500, "5.5.1", "Command unrecognized"),
            E::SyntaxError { syntax } => {
                self.error_reply(501, "5.5.4", &format!("Syntax: {syntax}"))
            }
            E::InvalidSenderAddress => self.error_reply(501, "5.1.7", "Invalid sender address"),
            E::InvalidRecipientAddress => {
                self.error_reply(501, "5.1.3", "Invalid recipient address")
            }
            E::InvalidParameter { param } => {
                self.error_reply(501, "5.5.4", &format!("Invalid parameter {param}"))
            }
            E::UnsupportedParameter { .. } => {
                self.error_reply(555, "5.5.4", "Unsupported parameter")
            }
            E::NeedsMoreData { .. } | E::ResponseTooLong | E::InvalidResponse { .. } => {
                tracing::debug!(len = line.len(), "unparseable command line");
                self.error_reply(500, "5.5.2", "Syntax error")
            }
        }
    }

    fn ehlo(&mut self, _host: &str) -> Result<(), End> {
        self.reset_transaction_locally();
        self.greeted = true;
        self.extended = true;
        let config = &self.shared.config.server;
        let reply = Reply::multi(
            250,
            [
                config.hostname.clone(),
                "PIPELINING".into(),
                format!("SIZE {}", config.max_message_size),
                "8BITMIME".into(),
                "SMTPUTF8".into(),
                "ENHANCEDSTATUSCODES".into(),
                "AUTH PLAIN LOGIN".into(),
            ],
        );
        reply.write_to(&mut self.outbuf);
        Ok(())
    }

    fn helo(&mut self, _host: &str) -> Result<(), End> {
        self.reset_transaction_locally();
        self.greeted = true;
        self.extended = false;
        let hostname = self.shared.config.server.hostname.clone();
        self.reply_plain(250, &hostname);
        Ok(())
    }

    async fn auth(&mut self, mechanism: u64, initial: SecretString) -> Result<(), End> {
        if !self.greeted {
            return self.error_reply(503, "5.5.1", "Send EHLO first");
        }
        if self.account.is_some() {
            return self.error_reply(503, "5.5.1", "Already authenticated");
        }
        if self.transaction.is_some() {
            return self.error_reply(503, "5.5.1", "AUTH not allowed during a mail transaction");
        }
        let initial = initial.expose_secret().trim().to_owned();
        let initial = (!initial.is_empty()).then(|| SecretString::from(initial));
        let credentials = match mechanism {
            smtp_proto::AUTH_PLAIN => self.sasl_plain(initial).await?,
            smtp_proto::AUTH_LOGIN => self.sasl_login(initial).await?,
            _ => {
                return self.error_reply(
                    504,
                    "5.5.4",
                    "Unrecognized authentication type; use PLAIN or LOGIN",
                );
            }
        };
        let Some((username, password)) = credentials else {
            return Ok(());
        };

        let config = &self.shared.config;
        let found = config.find_account(&username);
        let index = found.as_ref().map(|(i, _)| *i);
        let hash = index.map(|i| config.accounts[i].password_hash.as_str());
        let verified = self
            .shared
            .verifier
            .verify(&username.to_ascii_lowercase(), password, hash)
            .await;
        if !verified {
            tracing::info!(username = %printable(&username), "local authentication failed");
            self.shared.metrics.auth_failed(AuthFailure::BadCredentials);
            // Counted like any other client error, so one connection cannot guess forever.
            return self.error_reply(535, "5.7.8", "Authentication credentials invalid");
        }
        let Some((index, mailbox)) = found else {
            unreachable!("verify() never accepts an unknown user");
        };
        self.mailbox = mailbox;
        let account_name = config.accounts[index].name.clone();
        tracing::Span::current().record("account", account_name.as_str());
        tracing::debug!("local authentication succeeded");

        match self.open_upstream(index).await {
            Ok(()) => {
                self.account = Some(index);
                self.shared.metrics.auth_succeeded();
                self.reply(235, "2.7.0", "Authentication successful");
            }
            Err(reply) => reply.write_to(&mut self.outbuf),
        }
        Ok(())
    }

    /// AUTH PLAIN: the credentials arrive as the initial response or after an empty 334.
    /// `Ok(None)` means the exchange ended with a reply already queued.
    async fn sasl_plain(
        &mut self,
        initial: Option<SecretString>,
    ) -> Result<Option<(String, SecretString)>, End> {
        let response = match initial {
            Some(r) => r,
            None => {
                self.reply_plain(334, "");
                match self.auth_line().await? {
                    Some(r) => r,
                    None => return Ok(None),
                }
            }
        };
        if sasl::is_empty_response(response.expose_secret().as_bytes()) {
            self.reply(535, "5.7.8", "Authentication credentials invalid");
            return Ok(None);
        }
        match sasl::decode_plain(response.expose_secret().as_bytes()) {
            Ok(c) => Ok(Some((c.username, c.password))),
            Err(e) => {
                self.sasl_error(e);
                Ok(None)
            }
        }
    }

    /// AUTH LOGIN with the exact "Username:" and "Password:" prompts some devices insist on;
    /// the username may come on the AUTH line.
    async fn sasl_login(
        &mut self,
        initial: Option<SecretString>,
    ) -> Result<Option<(String, SecretString)>, End> {
        let user_b64 = match initial {
            Some(r) => r,
            None => {
                self.reply_plain(334, sasl::LOGIN_USERNAME_PROMPT);
                match self.auth_line().await? {
                    Some(r) => r,
                    None => return Ok(None),
                }
            }
        };
        let username = match sasl::decode_login_field(user_b64.expose_secret().as_bytes()) {
            Ok(u) => u.expose_secret().to_owned(),
            Err(e) => {
                self.sasl_error(e);
                return Ok(None);
            }
        };
        if username.is_empty() {
            self.sasl_error(SaslError::EmptyUsername);
            return Ok(None);
        }
        self.reply_plain(334, sasl::LOGIN_PASSWORD_PROMPT);
        let Some(pass_b64) = self.auth_line().await? else {
            return Ok(None);
        };
        match sasl::decode_login_field(pass_b64.expose_secret().as_bytes()) {
            Ok(password) => Ok(Some((username, password))),
            Err(e) => {
                self.sasl_error(e);
                Ok(None)
            }
        }
    }

    /// Reads one line of an AUTH exchange; `None` when the client cancelled or the line was
    /// too long (the reply is already queued).
    async fn auth_line(&mut self) -> Result<Option<SecretString>, End> {
        let Line::Complete(line) = self.read_line(AUTH_LINE_LIMIT, AUTH_LINE_LIMIT).await? else {
            self.error_reply(500, "5.5.6", "Authentication exchange line is too long")?;
            return Ok(None);
        };
        let line = zeroize::Zeroizing::new(line);
        if sasl::is_cancel(&line) {
            self.reply(501, "5.7.0", "Authentication cancelled");
            return Ok(None);
        }
        let text = crate::smtp::line::trim_line_end(&line);
        match std::str::from_utf8(text) {
            Ok(t) => Ok(Some(SecretString::from(t.to_owned()))),
            Err(_) => {
                // Base64 is ASCII; anything else on the line is not a valid response.
                self.sasl_error(SaslError::InvalidBase64);
                Ok(None)
            }
        }
    }

    fn sasl_error(&mut self, e: SaslError) {
        self.errors += 1;
        self.shared.metrics.auth_failed(AuthFailure::Malformed);
        match e {
            SaslError::AuthzidMismatch => self.reply(
                535,
                "5.7.8",
                "Authentication credentials invalid (authorization identity must match the username)",
            ),
            SaslError::EmptyUsername => self.reply(535, "5.7.8", "Authentication credentials invalid (empty username)"),
            SaslError::InvalidBase64 => self.reply(501, "5.5.2", "Cannot decode base64 response"),
            SaslError::NotUtf8 => self.reply(501, "5.5.2", "Credentials must be UTF-8 text"),
            SaslError::Malformed => self.reply(501, "5.5.2", "Malformed authentication response"),
            SaslError::TooLong => self.reply(500, "5.5.6", "Authentication exchange line is too long"),
        }
    }

    /// Gets a token and an authenticated upstream connection for the account. On failure the
    /// reply for the client says whether to retry (4xx) or call the administrator (5xx).
    async fn open_upstream(&mut self, index: usize) -> Result<(), Reply> {
        let shared = self.shared.clone();
        let account = &shared.config.accounts[index];
        let mut token = match shared.tokens.token(&account.identity).await {
            Ok(token) => token,
            Err(e) => return Err(token_error_reply(&shared, &e)),
        };
        let mut refreshed = false;
        loop {
            let started = tokio::time::Instant::now();
            let connected = Upstream::connect(&self.target(account), &token).await;
            shared
                .metrics
                .upstream_latency("connect", started.elapsed());
            match connected {
                Ok(upstream) => {
                    shared.metrics.upstream_ok(&account.name);
                    tracing::debug!(upstream = %account.upstream.host, "upstream authenticated");
                    self.upstream = Some(upstream);
                    self.token = Some(token);
                    return Ok(());
                }
                Err(e) => {
                    let refused_token = matches!(
                        (e.reply(), &e),
                        (Some(r), UpstreamError::Rejected { phase: Phase::Auth, .. })
                            if matches!(r.enhanced(), Some("5.7.3" | "5.5.127" | "4.7.0"))
                                || (r.code() == 535 && r.enhanced().is_none())
                    );
                    if refused_token && !refreshed {
                        // The provider refused a token we thought valid (revoked, or too close
                        // to expiry for it): get a fresh one and try once more.
                        tracing::warn!(account = %account.name, error = %e, "upstream refused the access token; fetching a new one");
                        refreshed = true;
                        token = match shared.tokens.replace(&account.identity, &token).await {
                            Ok(t) => t,
                            Err(e) => return Err(token_error_reply(&shared, &e)),
                        };
                        continue;
                    }
                    tracing::warn!(account = %account.name, error = %e, fix = e.reply().and_then(crate::hints::fix_for_reply), "cannot open the upstream session");
                    shared
                        .metrics
                        .upstream_failed(&account.name, &e.to_string());
                    shared.metrics.auth_failed(AuthFailure::Upstream);
                    return Err(upstream_auth_reply(&e));
                }
            }
        }
    }

    fn target<'a>(&'a self, account: &'a Account) -> Target<'a> {
        Target {
            settings: &account.upstream,
            tls: &self.shared.tls_client,
            ehlo_name: &self.shared.config.server.hostname,
            mailbox: &self.mailbox,
            timeouts: self.shared.config.timeouts,
        }
    }

    async fn mail(&mut self, line: &[u8], size: usize, flags: u64) -> Result<(), End> {
        let Some(index) = self.account else {
            return self.error_reply(530, "5.7.0", "Authentication required");
        };
        if self.transaction.is_some() {
            return self.error_reply(503, "5.5.1", "Sender already specified");
        }
        if size as u64 > self.shared.config.server.max_message_size {
            self.reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
            return Ok(());
        }
        if flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
            return self.error_reply(
                555,
                "5.5.4",
                "BODY=BINARYMIME needs CHUNKING, which is not offered",
            );
        }
        let line = crlf_line(line);
        // A connection that died or was dropped since the last message is replaced here,
        // before the client hears anything, so a long-lived client connection keeps working.
        let mut attempts = 0;
        let reply = loop {
            attempts += 1;
            if self.upstream.is_none()
                && let Err(reply) = self.open_upstream(index).await
            {
                reply.write_to(&mut self.outbuf);
                return Ok(());
            }
            let upstream = self.upstream.as_mut().expect("opened above");
            let started = tokio::time::Instant::now();
            let result = upstream.command(&line).await;
            self.shared
                .metrics
                .upstream_latency("command", started.elapsed());
            match result {
                Ok(reply) => break reply,
                Err(e) if attempts == 1 => {
                    tracing::debug!(error = %e, "upstream connection unusable; reconnecting");
                    self.upstream = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upstream failed at MAIL");
                    self.upstream = None;
                    self.reply(
                        451,
                        "4.4.2",
                        "Connection to the mail provider lost; try again",
                    );
                    return Ok(());
                }
            }
        };
        if reply.is_positive_completion() {
            self.transaction = Some(Transaction::default());
        }
        self.relay(reply);
        Ok(())
    }

    async fn rcpt(&mut self, line: &[u8]) -> Result<(), End> {
        if self.account.is_none() {
            return self.error_reply(530, "5.7.0", "Authentication required");
        }
        if self.transaction.is_none() {
            return self.error_reply(503, "5.5.1", "Need MAIL before RCPT");
        }
        let line = crlf_line(line);
        let Some(reply) = self.upstream_command(&line).await else {
            return Ok(());
        };
        if reply.is_positive_completion()
            && let Some(tx) = self.transaction.as_mut()
        {
            tx.accepted_recipients += 1;
        }
        self.relay(reply);
        Ok(())
    }

    async fn data(&mut self) -> Result<(), End> {
        if self.account.is_none() {
            return self.error_reply(530, "5.7.0", "Authentication required");
        }
        match &self.transaction {
            None => return self.error_reply(503, "5.5.1", "Need MAIL before DATA"),
            Some(tx) if tx.accepted_recipients == 0 => {
                return self.error_reply(554, "5.5.1", "No valid recipients");
            }
            Some(_) => {}
        }
        let Some(reply) = self.upstream_command(b"DATA\r\n").await else {
            return Ok(());
        };
        if reply.code() != 354 {
            self.relay(reply);
            return Ok(());
        }
        self.relay(reply);
        self.flush().await?;
        self.stream_message().await
    }

    /// Copies the message from the client to the upstream as it arrives, then relays the
    /// upstream's verdict. The message is never held whole in memory.
    async fn stream_message(&mut self) -> Result<(), End> {
        let max_size = self.shared.config.server.max_message_size;
        let mut framer = DataFramer::new();
        let mut out = Vec::with_capacity(READ_CHUNK + READ_CHUNK / 8);
        let mut upstream_failure: Option<UpstreamError> = None;
        let mut too_big = false;
        loop {
            if self.pos == self.inbuf.len() {
                // The client vanishing here drops the upstream connection without the final
                // dot, so the provider discards the partial message.
                if let Err(e) = self.fill().await {
                    self.upstream = None;
                    self.transaction = None;
                    tracing::debug!(error = %e, "client gone during DATA; message discarded");
                    return Err(e);
                }
            }
            let feed = framer.feed(&self.inbuf[self.pos..], &mut out);
            let ended = match feed {
                Feed::NeedMore => {
                    self.pos = self.inbuf.len();
                    false
                }
                Feed::End { consumed } => {
                    self.pos += consumed;
                    true
                }
            };
            if framer.bytes_out() > max_size {
                too_big = true;
            }
            if !too_big
                && upstream_failure.is_none()
                && !out.is_empty()
                && let Some(upstream) = self.upstream.as_mut()
                && let Err(e) = upstream.write_data(&out).await
            {
                upstream_failure = Some(e);
            }
            out.clear();
            if ended {
                break;
            }
        }
        let recipients = self
            .transaction
            .take()
            .map_or(0, |tx| tx.accepted_recipients);

        let size = framer.bytes_out();
        if framer.normalised_line_ends() > 0 {
            tracing::debug!(
                count = framer.normalised_line_ends(),
                "bare CR or LF normalised to CRLF"
            );
        }
        if too_big {
            // The provider has part of the message; closing without the final dot makes it
            // discard that part.
            tracing::info!(
                size,
                limit = max_size,
                "message over the size limit refused"
            );
            self.upstream = None;
            self.reply(
                552,
                "5.3.4",
                "Message size exceeds fixed maximum message size",
            );
            return Ok(());
        }
        if let Some(e) = upstream_failure {
            tracing::warn!(error = %e, "upstream failed during DATA; message not sent");
            self.upstream = None;
            self.reply(
                451,
                "4.4.2",
                "Connection to the mail provider lost during DATA; message not sent, try again",
            );
            return Ok(());
        }
        let Some(upstream) = self.upstream.as_mut() else {
            self.reply(
                451,
                "4.4.2",
                "Connection to the mail provider lost; try again",
            );
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let verdict = upstream.finish_data().await;
        self.shared
            .metrics
            .upstream_latency("end_of_data", started.elapsed());
        match verdict {
            Ok(reply) => {
                let account = self
                    .account
                    .map_or("-", |i| self.shared.config.accounts[i].name.as_str());
                if reply.is_positive_completion() {
                    self.shared.metrics.message_relayed(account, size);
                    tracing::info!(account, size, recipients, code = reply.code(), reply = %reply.text(), "message relayed");
                } else {
                    tracing::warn!(account, size, recipients, code = reply.code(), reply = %reply.text(), fix = crate::hints::fix_for_reply(&reply), "provider refused the message");
                }
                if reply.code() == 421 {
                    self.upstream = None;
                }
                self.relay(reply);
            }
            Err(e) => {
                // No verdict arrived: the provider may or may not have the message. Only a
                // 4xx is honest; the client retries, at worst producing a duplicate.
                tracing::warn!(error = %e, size, "no reply from the provider after DATA");
                self.upstream = None;
                self.reply(451, "4.4.2", "No confirmation from the mail provider; message may not have been sent, try again");
            }
        }
        Ok(())
    }

    async fn rset(&mut self) -> Result<(), End> {
        if self.transaction.take().is_some()
            && let Some(upstream) = self.upstream.as_mut()
            && upstream.command(b"RSET\r\n").await.is_err()
        {
            // The next MAIL reconnects; the client's RSET itself succeeded.
            self.upstream = None;
        }
        self.reply(250, "2.0.0", "OK");
        Ok(())
    }

    /// Sends a transaction command upstream; on a lost connection the client gets 451 and the
    /// transaction is over. `None` means a reply is already queued.
    async fn upstream_command(&mut self, line: &[u8]) -> Option<Reply> {
        let started = tokio::time::Instant::now();
        let result = match self.upstream.as_mut() {
            Some(upstream) => upstream.command(line).await,
            None => {
                self.transaction = None;
                self.reply(
                    451,
                    "4.4.2",
                    "Connection to the mail provider lost; try again",
                );
                return None;
            }
        };
        self.shared
            .metrics
            .upstream_latency("command", started.elapsed());
        match result {
            Ok(reply) => {
                if reply.code() == 421 {
                    self.upstream = None;
                    self.transaction = None;
                }
                Some(reply)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream connection failed");
                self.upstream = None;
                self.transaction = None;
                self.reply(
                    451,
                    "4.4.2",
                    "Connection to the mail provider lost; try again",
                );
                None
            }
        }
    }

    fn reset_transaction_locally(&mut self) {
        // An upstream transaction left open is aborted by the RSET the next MAIL implies;
        // simplest is to forget the connection's transaction state here and send RSET lazily.
        if self.transaction.take().is_some() {
            self.upstream = None;
        }
    }

    /// Queues the provider's reply for the client exactly as received. A 421 means the
    /// provider is closing: the upstream connection is gone and the client is told the same.
    fn relay(&mut self, reply: Reply) {
        self.shared.metrics.upstream_reply(&reply);
        if reply.code() == 421 {
            self.upstream = None;
            self.transaction = None;
            self.closing = true;
        }
        reply.write_to(&mut self.outbuf);
    }

    /// Queues a reply of our own, with the enhanced code when the client used EHLO.
    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        if self.extended {
            self.reply_plain(code, &format!("{enhanced} {text}"));
        } else {
            self.reply_plain(code, text);
        }
    }

    fn reply_plain(&mut self, code: u16, text: &str) {
        Reply::new(code, text).write_to(&mut self.outbuf);
    }

    /// A reply for a client mistake; too many of them end the session.
    fn error_reply(&mut self, code: u16, enhanced: &str, text: &str) -> Result<(), End> {
        self.errors += 1;
        self.reply(code, enhanced, text);
        if self.errors > self.shared.config.server.max_errors {
            self.reply(421, "4.7.0", "Too many errors, closing connection");
            return Err(End::Done);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), End> {
        if self.outbuf.is_empty() {
            return Ok(());
        }
        let idle = self.shared.config.timeouts.client_idle;
        let write = async {
            self.stream.write_all(&self.outbuf).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(idle, write).await {
            Err(_) => return Err(End::ClientIdle(idle)),
            Ok(r) => r?,
        }
        self.outbuf.clear();
        Ok(())
    }

    /// Reads more client bytes, flushing pending replies first so a waiting client is
    /// never left without its answers.
    async fn fill(&mut self) -> Result<(), End> {
        self.flush().await?;
        if self.pos > 0 && self.pos == self.inbuf.len() {
            self.inbuf.clear();
            self.pos = 0;
        } else if self.pos > READ_CHUNK {
            self.inbuf.drain(..self.pos);
            self.pos = 0;
        }
        if self.refusing_new_work() {
            return self.shutting_down();
        }
        let idle = self.shared.config.timeouts.client_idle;
        let start = self.inbuf.len();
        self.inbuf.resize(start + READ_CHUNK, 0);
        let read = {
            // A drain or stop that begins while the client is quiet must not wait for it.
            let (stream, buf, lifecycle) = (
                &mut self.stream,
                &mut self.inbuf[start..],
                &mut self.lifecycle,
            );
            let in_transaction = self.transaction.is_some();
            tokio::select! {
                read = tokio::time::timeout(idle, stream.read(buf)) => Some(read),
                _ = wait_for_stop(lifecycle, in_transaction) => None,
            }
        };
        let Some(read) = read else {
            self.inbuf.truncate(start);
            return self.shutting_down();
        };
        let n = match read {
            Err(_) => {
                self.inbuf.truncate(start);
                self.reply(421, "4.4.2", "Idle too long, closing connection");
                let _ = self.flush().await;
                return Err(End::ClientIdle(idle));
            }
            Ok(Err(e)) => {
                self.inbuf.truncate(start);
                return Err(End::ClientIo(e));
            }
            Ok(Ok(n)) => n,
        };
        self.inbuf.truncate(start + n);
        if n == 0 {
            return Err(End::ClientClosed);
        }
        Ok(())
    }

    /// While draining, a session may finish its transaction but starts nothing new; once the
    /// grace period is over it stops whatever it is doing.
    fn refusing_new_work(&self) -> bool {
        match *self.lifecycle.borrow() {
            Lifecycle::Serving => false,
            Lifecycle::Draining => self.transaction.is_none(),
            Lifecycle::Stopping => true,
        }
    }

    /// Tells the client the bridge is going away (RFC 5321 allows 421 at any time) and ends
    /// the session. During DATA this drops the upstream without the final dot, so the provider
    /// discards the partial message and the client, seeing 421, sends it again later.
    fn shutting_down(&mut self) -> Result<(), End> {
        self.upstream_abandon_transaction();
        self.reply(421, "4.3.2", "Service shutting down, try again later");
        Err(End::ShuttingDown)
    }

    fn upstream_abandon_transaction(&mut self) {
        if self.transaction.take().is_some() {
            self.upstream = None;
        }
    }

    /// The next line (with its line end), or `None` when it was longer than allowed; an
    /// overlong line is read and thrown away in chunks, so memory stays bounded whatever its
    /// length. AUTH command lines may be longer than other commands (initial responses).
    async fn read_line(&mut self, limit: usize, auth_limit: usize) -> Result<Line, End> {
        loop {
            let pending = &self.inbuf[self.pos..];
            match find_line(pending, auth_limit.max(limit)) {
                LineStatus::Complete(n) => {
                    let line = pending[..n].to_vec();
                    self.pos += n;
                    let auth = starts_with_auth(&line);
                    if n > limit && !(n <= auth_limit && auth) {
                        return Ok(Line::TooLong { auth });
                    }
                    return Ok(Line::Complete(line));
                }
                LineStatus::TooLong => {
                    let auth = starts_with_auth(pending);
                    self.discard_line().await?;
                    return Ok(Line::TooLong { auth });
                }
                LineStatus::Incomplete => self.fill().await?,
            }
        }
    }

    async fn discard_line(&mut self) -> Result<(), End> {
        loop {
            match crate::smtp::line::skip_to_lf(&self.inbuf[self.pos..]) {
                Some(n) => {
                    self.pos += n;
                    return Ok(());
                }
                None => {
                    self.pos = self.inbuf.len();
                    self.fill().await?;
                }
            }
        }
    }
}

/// Completes when the session must stop waiting for its client: at `Stopping`, or at
/// `Draining` when no transaction is open. Pending forever otherwise.
async fn wait_for_stop(
    lifecycle: &mut tokio::sync::watch::Receiver<Lifecycle>,
    in_transaction: bool,
) {
    let stop = |state: &Lifecycle| match state {
        Lifecycle::Serving => false,
        Lifecycle::Draining => !in_transaction,
        Lifecycle::Stopping => true,
    };
    if lifecycle.wait_for(stop).await.is_err() {
        // The bridge is gone; its drain aborts this session anyway.
        std::future::pending::<()>().await;
    }
}

/// A line read from the client.
enum Line {
    Complete(Vec<u8>),
    /// Over the limit and thrown away; `auth` when it was an AUTH command or response.
    TooLong {
        auth: bool,
    },
}

fn starts_with_auth(line: &[u8]) -> bool {
    line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ")
}

/// The client's command line as sent upstream: the same bytes, with a CRLF line end even if
/// the client used a bare LF.
fn crlf_line(line: &[u8]) -> Vec<u8> {
    let body = crate::smtp::line::trim_line_end(line);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    out
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
            text.truncate(400);
            Reply::new(535, &text)
        }
        Some(r) => {
            let mut text = format!(
                "4.7.0 Temporary authentication failure at the mail provider: {} {}",
                r.code(),
                strip_code(r)
            );
            text.truncate(400);
            Reply::new(454, &text)
        }
        None => Reply::new(
            454,
            "4.7.0 Temporary authentication failure: cannot reach the mail provider, try again later",
        ),
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
