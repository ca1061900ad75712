//! The envelope toward the provider: MAIL (after the local policy checks, on a session lent
//! by the account's pool), RCPT and RSET, each relayed as the client's own line with the
//! provider's reply passed back unchanged. The session goes back to the pool when the
//! transaction ends cleanly.
//!
//! Nothing is ever retried after the provider answered: a 4xx stays the client's to retry,
//! and repeating a 5xx would only feed Office365's continuous-error throttling.

use super::client::End;
use super::pipeline::Ahead;
use super::{Session, Transaction};
use crate::smtp::Reply;
use crate::upstream::{Phase, UpstreamError};

impl Session {
    /// The account this client sends as: the one it logged in as, or the one its address is
    /// mapped to. `None` when it may not send at all (the refusal is queued): the bridge is
    /// never an open relay.
    pub(super) fn sending_account(&mut self) -> Result<Option<usize>, End> {
        if let Some(index) = self.account.or(self.no_auth) {
            return Ok(Some(index));
        }
        if self.auth_allowed_here() {
            self.error_reply(530, "5.7.0", "Authentication required")?;
        } else {
            self.error_reply(530, "5.7.0", "Must issue a STARTTLS command first")?;
        }
        Ok(None)
    }

    pub(super) async fn mail(
        &mut self,
        line: &[u8],
        sender: &str,
        size: usize,
        flags: u64,
    ) -> Result<(), End> {
        let Some(index) = self.sending_account()? else {
            return Ok(());
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
        let account = &self.shared.config.accounts[index];
        if !account.policy.sender_allowed(sender) {
            tracing::warn!(
                account = %account.name,
                sender = %printable(sender),
                "MAIL FROM is not in the account's allowed_senders; refused without asking the provider"
            );
            self.reply(
                550,
                "5.7.60",
                "Client does not have permissions to send as this sender (not in allowed_senders)",
            );
            return Ok(());
        }
        let line = crlf_line(line);
        let ahead = self.pipelined_after_mail(index);
        let Some((reply, batch)) = self.send_mail(index, &line, &ahead).await else {
            return Ok(());
        };
        if reply.code() == 421 {
            self.upstream = None;
        } else if reply.is_positive_completion() {
            self.transaction = Some(Transaction {
                accepted_recipients: 0,
                rcpt_refusal_logged: false,
            });
        }
        self.relay(Phase::Mail, reply);
        if batch {
            self.pipelined_replies(&ahead).await?;
        }
        if self.transaction.is_none() {
            // Nothing open at the provider: the session can serve the next transaction.
            self.release_upstream();
        }
        Ok(())
    }

    /// Sends MAIL (with the commands the client pipelined after it, when the provider
    /// pipelines too: `true` in the result) on a session from the pool, and reads MAIL's
    /// reply. A pooled session the provider dropped while it idled shows up here as a closed
    /// connection or a 421 before any reply; it is replaced before the client hears
    /// anything. `None` means the client's reply is already queued.
    async fn send_mail(
        &mut self,
        index: usize,
        line: &[u8],
        ahead: &[Ahead],
    ) -> Option<(Reply, bool)> {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            if self.upstream.is_none() {
                match self.lease(index).await {
                    Ok(lease) => self.upstream = Some(lease),
                    Err(reply) => {
                        reply.write_to(self.client.queue());
                        return None;
                    }
                }
            }
            let lease = self.upstream.as_mut()?;
            let retry = lease.reused() && attempt < ATTEMPTS;
            let batch = !ahead.is_empty() && lease.capabilities().pipelining;
            let started = tokio::time::Instant::now();
            let result = if batch {
                let mut lines = line.to_vec();
                ahead.iter().for_each(|a| lines.extend_from_slice(&a.line));
                match lease.send_pipelined(&lines).await {
                    Ok(()) => lease.next_reply(Phase::Mail).await,
                    Err(e) => Err(e),
                }
            } else {
                lease.command(Phase::Mail, line).await
            };
            self.shared
                .metrics
                .upstream_latency("command", started.elapsed());
            match result {
                Ok(reply) if reply.code() == 421 && retry => {
                    tracing::debug!(reply = %reply.text(), "pooled upstream session was closing; taking another");
                    self.upstream = None;
                }
                Ok(reply) => return Some((reply, batch)),
                Err(e) if retry && !matches!(e, UpstreamError::Timeout { .. }) => {
                    tracing::debug!(error = %e, "pooled upstream session unusable; taking another");
                    self.upstream = None;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "upstream failed at MAIL");
                    self.upstream = None;
                    let text = lost_text(&e);
                    self.reply(451, "4.4.2", &text);
                    return None;
                }
            }
        }
        None
    }

    pub(super) async fn rcpt(&mut self, line: &[u8]) -> Result<(), End> {
        if self.sending_account()?.is_none() {
            return Ok(());
        }
        if self.transaction.is_none() {
            return self.error_reply(503, "5.5.1", "Need MAIL before RCPT");
        }
        let line = crlf_line(line);
        let Some(reply) = self.upstream_command(Phase::Rcpt, &line).await else {
            return Ok(());
        };
        if reply.is_positive_completion()
            && let Some(tx) = self.transaction.as_mut()
        {
            tx.accepted_recipients += 1;
        }
        self.relay(Phase::Rcpt, reply);
        Ok(())
    }

    pub(super) async fn rset(&mut self) -> Result<(), End> {
        if self.transaction.take().is_some() {
            self.rset_upstream().await;
        }
        self.reply(250, "2.0.0", "OK");
        Ok(())
    }

    /// Abandons the provider's side of a transaction and gives the session back to the pool;
    /// one that does not answer RSET with 250 is dropped instead.
    pub(super) async fn rset_upstream(&mut self) {
        if let Some(mut lease) = self.upstream.take()
            && lease
                .command(Phase::Rset, b"RSET\r\n")
                .await
                .is_ok_and(|reply| reply.code() == 250)
        {
            lease.release();
        }
    }

    /// Gives the session back to the pool after a transaction ended cleanly.
    pub(super) fn release_upstream(&mut self) {
        if let Some(lease) = self.upstream.take() {
            lease.release();
        }
    }

    /// Sends a transaction command upstream; on a lost connection the client gets 451 and the
    /// transaction is over. `None` means a reply is already queued.
    pub(super) async fn upstream_command(&mut self, phase: Phase, line: &[u8]) -> Option<Reply> {
        match self.upstream_exchange(phase, line).await {
            Ok(reply) => Some(reply),
            Err(reply) => {
                reply.write_to(self.client.queue());
                None
            }
        }
    }

    /// Like [`Self::upstream_command`] but hands the failure reply back instead of queueing
    /// it, for DATA where the client must not hear it before the end of the message.
    pub(super) async fn upstream_exchange(
        &mut self,
        phase: Phase,
        line: &[u8],
    ) -> Result<Reply, Reply> {
        let started = tokio::time::Instant::now();
        let result = match self.upstream.as_mut() {
            Some(upstream) => upstream.command(phase, line).await,
            None => {
                self.transaction = None;
                return Err(self.own_reply(
                    451,
                    "4.4.2",
                    "Connection to the mail provider lost; try again",
                ));
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
                Ok(reply)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream connection failed");
                self.upstream = None;
                self.transaction = None;
                Err(self.own_reply(451, "4.4.2", &lost_text(&e)))
            }
        }
    }

    /// A reply of our own as a value, with the enhanced code when the client used EHLO.
    pub(super) fn own_reply(&self, code: u16, enhanced: &str, text: &str) -> Reply {
        if self.extended {
            Reply::new(code, &format!("{enhanced} {text}"))
        } else {
            Reply::new(code, text)
        }
    }
}

/// What the client hears when the provider connection failed, naming the phase.
pub(super) fn lost_text(e: &UpstreamError) -> String {
    match e {
        UpstreamError::Timeout { phase, after } => format!(
            "The mail provider did not answer {phase} within {}; try again",
            crate::upstream::human(*after)
        ),
        UpstreamError::Io { phase, .. }
        | UpstreamError::Closed { phase }
        | UpstreamError::Protocol { phase, .. }
        | UpstreamError::Rejected { phase, .. } => {
            format!("Connection to the mail provider lost during {phase}; try again")
        }
        _ => "Connection to the mail provider lost; try again".to_string(),
    }
}

/// The client's command line as sent upstream: the same bytes, with a CRLF line end even if
/// the client used a bare LF.
pub(super) fn crlf_line(line: &[u8]) -> Vec<u8> {
    let body = crate::smtp::line::trim_line_end(line);
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(body);
    out.extend_from_slice(b"\r\n");
    out
}

/// A peer-supplied address for a log line: printable, bounded.
pub(super) fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).take(256).collect()
}
