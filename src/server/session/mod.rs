//! One client connection from greeting to QUIT: the SMTP state machine toward the legacy
//! client. Its parts: `client` (the socket, buffers and clocks), `auth` (local login and
//! getting provider sessions from the pool), `relay` (MAIL, RCPT, RSET toward the provider),
//! `pipeline` (forwarding a pipelined envelope in one write) and `message` (DATA, streamed,
//! with the optional `From:` check).
//!
//! The client sees 250 for a message only when the provider said 250 for it. Replies are
//! written in command order; they are buffered while more pipelined commands are waiting and
//! flushed before the session waits for the client again.

mod auth;
mod client;
mod message;
mod pipeline;
mod relay;

use std::net::SocketAddr;
use std::sync::Arc;

use smtp_proto::Request;

use crate::io::Stream;
use crate::server::Shared;
use crate::smtp::{MAX_WIRE_REPLY_LINE, Reply};
use crate::upstream::Phase;
use crate::upstream::pool::Lease;

pub use client::End;
use client::{Client, Input};

/// Longest ordinary command line accepted, CRLF included. RFC 5321 asks for 512 at least;
/// MAIL with DSN and SMTPUTF8 parameters runs longer in practice.
pub const COMMAND_LINE_LIMIT: usize = 4096;
/// Longest line in an AUTH exchange (RFC 4954 section 4 suggests 12,288 octets), plus CRLF.
pub const AUTH_LINE_LIMIT: usize = 12_288 + 2;

/// Per-connection state.
pub struct Session {
    shared: Arc<Shared>,
    client: Client,
    peer: SocketAddr,
    /// HELO or EHLO seen (since STARTTLS, if there was one).
    greeted: bool,
    /// The client used EHLO, so replies carry enhanced status codes (RFC 2034).
    extended: bool,
    /// The account the client logged in as.
    account: Option<usize>,
    /// The mailbox it sends as (XOAUTH2 `user=`) when the account admits several
    /// (`*@domain`); otherwise the account's own.
    mailbox: Option<String>,
    /// The account this source address sends as without logging in (`no_auth_sources`).
    no_auth: Option<usize>,
    /// The provider session lent for the transaction in progress; none between transactions.
    upstream: Option<Lease>,
    transaction: Option<Transaction>,
    errors: u32,
    /// A 421 was relayed: the client was told the channel closes, so it does.
    closing: bool,
}

struct Transaction {
    accepted_recipients: usize,
    /// A provider refusal of RCPT was logged: one warning per message is enough, however
    /// many recipients a "too many recipients" refuses.
    rcpt_refusal_logged: bool,
}

impl Session {
    pub fn new(shared: Arc<Shared>, stream: Stream, peer: SocketAddr) -> Session {
        let t = &shared.config.timeouts;
        let client = Client::new(stream, t.client_idle, t.session, shared.lifecycle.clone());
        let no_auth = shared.config.no_auth_account(peer.ip());
        Session {
            shared,
            client,
            peer,
            greeted: false,
            extended: false,
            account: None,
            mailbox: None,
            no_auth,
            upstream: None,
            transaction: None,
            errors: 0,
            closing: false,
        }
    }

    /// Runs the conversation to its end. Never panics on client input; every outcome is logged
    /// at the level its audience needs (client mistakes at debug).
    pub async fn run(mut self) {
        if let Some(index) = self.no_auth {
            let name = self.shared.config.accounts[index].name.clone();
            tracing::Span::current().record("account", name.as_str());
            tracing::info!("source address sends as this account without AUTH (no_auth_sources)");
        }
        let greeting = format!(
            "{} ESMTP smtp-oauth-bridge ready",
            self.shared.config.server.hostname
        );
        self.reply_plain(220, &greeting);
        let result = self.serve().await;
        let _ = self.client.flush().await;
        match result {
            Ok(()) | Err(End::Done) => tracing::debug!("session closed"),
            Err(End::Closed) => tracing::debug!("client closed the connection"),
            Err(End::TlsOnPlaintextPort) => tracing::warn!(
                "client started a TLS handshake on a plaintext port; configure it for \
                 STARTTLS, or point it at a listen_implicit_tls address; connection closed"
            ),
            Err(e @ (End::SessionLimit(_) | End::TlsHandshake(_) | End::ShuttingDown)) => {
                tracing::info!(reason = %e, "session ended")
            }
            Err(e) => tracing::debug!(reason = %e, "session ended"),
        }
        // A transaction left open (the client said QUIT after RCPT, or went quiet) is reset
        // at the provider, and the session goes back to the pool.
        self.rset_upstream().await;
        self.client.shutdown().await;
    }

    async fn serve(&mut self) -> Result<(), End> {
        loop {
            let in_transaction = self.transaction.is_some();
            match self
                .client
                .read_line(COMMAND_LINE_LIMIT, AUTH_LINE_LIMIT, in_transaction)
                .await?
            {
                Input::Line(line) => {
                    // An AUTH line may carry credentials (the initial response).
                    let line = zeroize::Zeroizing::new(line);
                    self.command(&line).await?;
                    if self.closing {
                        return Err(End::Done);
                    }
                }
                Input::TooLong { auth: true } => {
                    self.error_reply(500, "5.5.6", "Authentication exchange line is too long")?
                }
                Input::TooLong { auth: false } => {
                    self.error_reply(500, "5.5.2", "Line too long")?
                }
            }
        }
    }

    async fn command(&mut self, line: &[u8]) -> Result<(), End> {
        let request = match crate::smtp::command::parse(line) {
            Ok(request) => request,
            Err(refusal) => {
                tracing::debug!(len = line.len(), "refused command line");
                return self.error_reply(refusal.code, refusal.enhanced, &refusal.text);
            }
        };
        // Only the command's name: arguments may carry credentials (AUTH initial responses).
        tracing::debug!(command = request.name(), "command");
        if !matches!(request, Request::Quit)
            && self.client.refusing_new_work(self.transaction.is_some())
        {
            if self.transaction.take().is_some() {
                // Dropped without QUIT: the provider abandons the transaction.
                self.upstream = None;
            }
            return Err(self.client.shutting_down());
        }
        match request {
            Request::Ehlo { .. } => self.ehlo(),
            Request::Helo { .. } => self.helo(),
            Request::Lhlo { .. } => self.error_reply(500, "5.5.1", "LHLO is for LMTP"),
            Request::StartTls => self.starttls().await,
            Request::Auth {
                mechanism,
                initial_response,
            } => {
                let initial = zeroize::Zeroizing::new(initial_response.into_owned());
                self.auth(mechanism, &initial).await
            }
            Request::Mail { from } => {
                let sender = from.address.to_string();
                self.mail(line, &sender, from.size, from.flags).await
            }
            Request::Rcpt { .. } => self.rcpt(line).await,
            Request::Data => self.data().await,
            Request::Bdat { chunk_size, .. } => self.bdat(chunk_size).await,
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
                    "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP VRFY HELP QUIT",
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
            Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => self.error_reply(502, "5.5.1", "Command not implemented"),
        }
    }

    fn ehlo(&mut self) -> Result<(), End> {
        self.reset_transaction_locally();
        self.greeted = true;
        self.extended = true;
        let config = &self.shared.config;
        let mut lines = vec![
            config.server.hostname.clone(),
            "PIPELINING".into(),
            format!("SIZE {}", config.server.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if config.advertise_dsn() {
            lines.push("DSN".into());
        }
        if config.local_tls.is_some() && !self.client.is_tls() {
            lines.push("STARTTLS".into());
        }
        // RFC 4954 section 4: no plaintext mechanisms where the password would cross the
        // network in clear.
        if self.auth_allowed_here() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Reply::multi(250, lines).write_to(self.client.queue());
        Ok(())
    }

    fn helo(&mut self) -> Result<(), End> {
        self.reset_transaction_locally();
        self.greeted = true;
        self.extended = false;
        let hostname = self.shared.config.server.hostname.clone();
        self.reply_plain(250, &hostname);
        Ok(())
    }

    /// RFC 3207: a plain connection becomes TLS, and everything the client said before is
    /// forgotten. Bytes pipelined after STARTTLS would otherwise be read as if they had come
    /// through TLS (CVE-2011-0411); such a client is refused.
    async fn starttls(&mut self) -> Result<(), End> {
        let Some(local_tls) = self.shared.config.local_tls.as_ref() else {
            return self.error_reply(502, "5.5.1", "STARTTLS not available on this listener");
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(local_tls.server_config.clone());
        if self.client.is_tls() {
            return self.error_reply(503, "5.5.1", "TLS already active");
        }
        if self.account.is_some() || self.transaction.is_some() {
            return self.error_reply(503, "5.5.1", "STARTTLS not allowed after AUTH or MAIL");
        }
        if !self.client.pending().is_empty() {
            tracing::warn!(
                bytes = self.client.pending().len(),
                "client sent commands pipelined after STARTTLS (command injection?); closing"
            );
            self.reply(
                554,
                "5.5.1",
                "Commands pipelined after STARTTLS; closing connection",
            );
            return Err(End::Done);
        }
        self.reply(220, "2.0.0", "Ready to start TLS");
        self.client.flush().await?;
        let limit = self.shared.config.timeouts.tls_handshake;
        self.client.start_tls(&acceptor, limit).await?;
        tracing::debug!("STARTTLS: TLS established");
        self.greeted = false;
        self.extended = false;
        Ok(())
    }

    /// BDAT without CHUNKING advertised: the chunk is read and thrown away so the next
    /// command is found where the client put it, never inside the chunk.
    async fn bdat(&mut self, size: usize) -> Result<(), End> {
        if size as u64 > self.shared.config.server.max_message_size {
            self.reply(
                421,
                "4.7.0",
                "BDAT chunk too large and CHUNKING not offered; closing",
            );
            return Err(End::Done);
        }
        let mut left = size;
        while left > 0 {
            if self.client.pending().is_empty() {
                self.client.fill_data().await?;
            }
            let n = left.min(self.client.pending().len());
            self.client.consume(n);
            left -= n;
        }
        if self.transaction.take().is_some() {
            // The client's transaction is over, so the provider's must be too: left open on
            // the lent session, it would answer the next MAIL (this client's, or the next
            // client's the session is lent to) with 503.
            self.rset_upstream().await;
        }
        self.error_reply(502, "5.5.1", "CHUNKING not offered; use DATA")
    }

    /// Whether this client may log in here: inside TLS, or in clear where the configured
    /// `plaintext_auth` allows it (loopback by default).
    fn auth_allowed_here(&self) -> bool {
        self.client.is_tls()
            || self
                .shared
                .config
                .server
                .plaintext_auth
                .allows(self.peer.ip())
    }

    fn reset_transaction_locally(&mut self) {
        // An upstream transaction left open is abandoned with its connection; the next MAIL
        // opens a new one.
        if self.transaction.take().is_some() {
            self.upstream = None;
        }
    }

    /// Queues the provider's reply to `phase` for the client as received, with over-long
    /// lines wrapped so the client gets a valid SMTP reply. The provider's 421 closes its
    /// connection, and since a 421 tells the client the channel is closing, the client's
    /// connection closes too; its next connection gets a fresh upstream.
    fn relay(&mut self, phase: Phase, reply: Reply) {
        self.shared.metrics.upstream_reply(&reply);
        // The verdict after the message has its own line (`finish_message`).
        let repeated = phase == Phase::Rcpt
            && reply.code() >= 400
            && self
                .transaction
                .as_mut()
                .is_some_and(|tx| std::mem::replace(&mut tx.rcpt_refusal_logged, true));
        if phase != Phase::DataEnd {
            log_refusal(phase, &reply, repeated);
        }
        if reply.code() == 421 {
            self.upstream = None;
            self.transaction = None;
            self.closing = true;
        }
        reply
            .wrapped(MAX_WIRE_REPLY_LINE)
            .write_to(self.client.queue());
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
        Reply::new(code, text).write_to(self.client.queue());
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
}

/// One line for a provider's refusal of MAIL, RCPT or DATA, with its text and, for known
/// failures, the fix: a sender the mailbox may not use or a throttled mailbox stops every
/// message, and the client's own log rarely reaches the administrator. A recipient address
/// the provider does not take (X.1.X, RFC 3463) is the client's mistake, and a further
/// recipient refused in the same transaction (`repeated`) adds nothing: debug.
fn log_refusal(phase: Phase, reply: &Reply, repeated: bool) {
    if reply.code() < 400 {
        return;
    }
    let address = phase == Phase::Rcpt
        && reply
            .enhanced()
            .is_some_and(|e| e.split('.').nth(1) == Some("1"));
    let (code, text) = (reply.code(), reply.text());
    if address || repeated {
        tracing::debug!(command = %phase, code, reply = %text, "provider refused the recipient");
    } else {
        let fix = crate::hints::fix_for_reply(reply);
        tracing::warn!(command = %phase, code, reply = %text, fix, "provider refused {phase}");
    }
}
