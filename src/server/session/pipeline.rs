//! Pipelining toward the provider. A client that pipelines (RFC 2920) sends MAIL, its RCPTs
//! and DATA in one packet; when the provider offers PIPELINING too, the bridge forwards them
//! in one write and relays the replies in order, so the whole envelope costs one round trip
//! to the provider instead of one per command.
//!
//! Only commands already complete in the input buffer are forwarded, and only RCPT and DATA:
//! anything else ends the group and is handled one at a time. DATA is held back when the
//! account checks the `From:` header, because then the provider may only hear DATA once the
//! header has passed.

use super::client::End;
use super::relay::crlf_line;
use super::{COMMAND_LINE_LIMIT, Session};
use crate::smtp::line::{LineStatus, find_line};
use crate::smtp::{DataFramer, Reply};
use crate::upstream::Phase;

/// At most this many commands ride along with one MAIL.
const MAX_AHEAD: usize = 100;

/// A command the client pipelined after MAIL.
pub(super) struct Ahead {
    /// The line as sent to the provider (CRLF-terminated).
    pub line: Vec<u8>,
    /// Its length in the client's input, line end included.
    consumed: usize,
    data: bool,
}

impl Session {
    /// The RCPT lines, and a DATA line ending them, that follow MAIL in the client's input.
    pub(super) fn pipelined_after_mail(&self, index: usize) -> Vec<Ahead> {
        let data_allowed = !self.shared.config.accounts[index].policy.check_from_header;
        let mut ahead = Vec::new();
        let mut rest = self.client.pending();
        while ahead.len() < MAX_AHEAD {
            let LineStatus::Complete(n) = find_line(rest, COMMAND_LINE_LIMIT) else {
                break;
            };
            let line = &rest[..n];
            let data = match crate::smtp::command::parse(line) {
                Ok(smtp_proto::Request::Rcpt { .. }) => false,
                Ok(smtp_proto::Request::Data) if data_allowed => true,
                _ => break,
            };
            ahead.push(Ahead {
                line: crlf_line(line),
                consumed: n,
                data,
            });
            rest = &rest[n..];
            if data {
                break;
            }
        }
        ahead
    }

    /// Relays the provider's replies to the pipelined commands in order, taking each command
    /// off the client's input as its reply is read, and streams the message after a 354. If
    /// the provider connection fails, the commands not yet answered stay in the input and
    /// get their replies the ordinary way (the transaction is gone by then).
    pub(super) async fn pipelined_replies(&mut self, ahead: &[Ahead]) -> Result<(), End> {
        for command in ahead {
            let phase = if command.data {
                Phase::DataStart
            } else {
                Phase::Rcpt
            };
            if self.upstream.is_none() {
                // Closed by a 421 or a failure: the rest is answered the ordinary way.
                return Ok(());
            }
            self.client.consume(command.consumed);
            let Some(reply) = self.pipelined_reply(phase).await else {
                return Ok(());
            };
            tracing::debug!(
                command = if command.data { "DATA" } else { "RCPT" },
                "command (pipelined)"
            );
            if !command.data {
                if reply.is_positive_completion()
                    && let Some(tx) = self.transaction.as_mut()
                {
                    tx.accepted_recipients += 1;
                }
                self.relay(Phase::Rcpt, reply);
                continue;
            }
            let go = reply.code() == 354;
            self.relay(Phase::DataStart, reply);
            if go {
                self.client.flush().await?;
                self.stream_message(DataFramer::new(), Vec::new(), false)
                    .await?;
            }
        }
        Ok(())
    }

    /// The next reply on the lent session; `None` when it failed (the client's reply is
    /// queued and the session dropped).
    async fn pipelined_reply(&mut self, phase: Phase) -> Option<Reply> {
        let upstream = self.upstream.as_mut()?;
        match upstream.next_reply(phase).await {
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
                let reply = self.own_reply(451, "4.4.2", &super::relay::lost_text(&e));
                reply.write_to(self.client.queue());
                None
            }
        }
    }
}
