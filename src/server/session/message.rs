//! DATA: the message streamed from the client through the smuggling-proof framer to the
//! provider, and the provider's verdict passed back. The message is never held whole in
//! memory; only when the account checks the `From:` header is its header section held back
//! (bounded) until it has been checked, so a refused message never reaches the provider.
//!
//! Lines over RFC 5321's 1,000 octets are passed on unchanged: Office365 and Gmail accept
//! them, and folding or refusing them would break messages that legacy devices produce.

use super::Session;
use super::client::End;
use crate::smtp::data::Piece;
use crate::smtp::headers::{from_addresses, header_section_end};
use crate::smtp::{DataFramer, Feed, Reply};
use crate::upstream::{Phase, UpstreamError};

/// How much of the header section is held back for the `From:` check; a message whose
/// headers run longer is judged on what was seen.
const HEADER_HOLD_LIMIT: usize = 64 * 1024;

impl Session {
    pub(super) async fn data(&mut self) -> Result<(), End> {
        let Some(index) = self.sending_account()? else {
            return Ok(());
        };
        match &self.transaction {
            None => return self.error_reply(503, "5.5.1", "Need MAIL before DATA"),
            Some(tx) if tx.accepted_recipients == 0 => {
                return self.error_reply(554, "5.5.1", "No valid recipients");
            }
            Some(_) => {}
        }
        if self.shared.config.accounts[index].policy.check_from_header {
            return self.data_with_from_check(index).await;
        }
        let reply = match self.upstream_exchange(Phase::DataStart, b"DATA\r\n").await {
            Ok(reply) => reply,
            Err(reply) => {
                reply.write_to(self.client.queue());
                return Ok(());
            }
        };
        if reply.code() != 354 {
            self.relay(Phase::DataStart, reply);
            return Ok(());
        }
        self.relay(Phase::DataStart, reply);
        self.client.flush().await?;
        self.stream_message(DataFramer::new(), Vec::new(), false)
            .await
    }

    /// The client gets our own 354; the provider gets DATA only once the `From:` header has
    /// passed, so a refused message costs the mailbox nothing with the provider.
    async fn data_with_from_check(&mut self, index: usize) -> Result<(), End> {
        self.reply_plain(354, "Start mail input; end with <CRLF>.<CRLF>");
        let mut framer = DataFramer::new();
        let mut held = Vec::new();
        let mut ended = false;
        while !ended && header_section_end(&held).is_none() && held.len() <= HEADER_HOLD_LIMIT {
            ended = self.next_piece(&mut framer, &mut held).await?;
        }
        let headers_end = header_section_end(&held).unwrap_or(held.len());
        let from = from_addresses(&held[..headers_end]);
        let account = &self.shared.config.accounts[index];
        let allowed = !from.is_empty() && from.iter().all(|a| account.policy.sender_allowed(a));
        if !allowed {
            tracing::warn!(
                account = %account.name,
                from = %super::relay::printable(&from.join(", ")),
                "From: header is not in the account's allowed_senders; message refused without \
                 reaching the provider"
            );
            self.discard_rest(&mut framer, ended).await?;
            self.transaction = None;
            self.rset_upstream().await;
            self.reply(
                550,
                "5.7.60",
                "Client does not have permissions to send as this sender (From: header not in allowed_senders)",
            );
            return Ok(());
        }
        match self.upstream_exchange(Phase::DataStart, b"DATA\r\n").await {
            Ok(reply) if reply.code() == 354 => self.stream_message(framer, held, ended).await,
            refused => {
                // The client is already sending; its message is read to the end and the
                // provider's refusal (or our 451 for a lost connection) becomes the verdict.
                self.discard_rest(&mut framer, ended).await?;
                self.transaction = None;
                // A provider that refused DATA still holds MAIL and RCPT; the client is told
                // the transaction is over, so it is reset there too before the session goes
                // back to the pool.
                self.rset_upstream().await;
                match refused {
                    Ok(reply) => self.relay(Phase::DataStart, reply),
                    Err(own) => own.write_to(self.client.queue()),
                }
                Ok(())
            }
        }
    }

    /// Feeds buffered client bytes through the framer into `out`, reading more first when
    /// nothing is buffered. True at the end of the message.
    async fn next_piece(
        &mut self,
        framer: &mut DataFramer,
        out: &mut Vec<u8>,
    ) -> Result<bool, End> {
        if self.client.pending().is_empty() {
            self.fill_message().await?;
        }
        match framer.feed(self.client.pending(), out) {
            Feed::NeedMore => {
                let n = self.client.pending().len();
                self.client.consume(n);
                Ok(false)
            }
            Feed::End { consumed } => {
                self.client.consume(consumed);
                Ok(true)
            }
        }
    }

    /// More message bytes from the client. A client that vanishes here takes the upstream
    /// connection with it, without the final dot, so the provider discards the partial
    /// message.
    async fn fill_message(&mut self) -> Result<(), End> {
        if let Err(e) = self.client.fill_data().await {
            self.upstream = None;
            self.transaction = None;
            tracing::debug!(error = %e, "client gone during DATA; message discarded");
            return Err(e);
        }
        Ok(())
    }

    async fn discard_rest(&mut self, framer: &mut DataFramer, mut ended: bool) -> Result<(), End> {
        let mut scratch = Vec::new();
        while !ended {
            scratch.clear();
            ended = self.next_piece(framer, &mut scratch).await?;
        }
        Ok(())
    }

    /// Passes the message to the upstream as it arrives (starting with `held`, bytes already
    /// framed), then relays the upstream's verdict. The framer describes each read as pieces
    /// of the client's buffer, which go to the TLS layer as they are: the message is never
    /// copied on its way through, and the last bytes travel with the final dot.
    pub(super) async fn stream_message(
        &mut self,
        mut framer: DataFramer,
        held: Vec<u8>,
        mut ended: bool,
    ) -> Result<(), End> {
        let max_size = self.shared.config.server.max_message_size;
        let mut failure: Option<UpstreamError> = None;
        let mut verdict = None;
        let mut too_big = false;
        let mut held = Some(held);
        let mut pieces = Vec::new();
        loop {
            if !ended && self.client.pending().is_empty() {
                self.fill_message().await?;
            }
            pieces.clear();
            let pending = self.client.pending();
            let consumed = if ended {
                0
            } else {
                match framer.feed_pieces(pending, &mut pieces) {
                    Feed::NeedMore => pending.len(),
                    Feed::End { consumed } => {
                        ended = true;
                        consumed
                    }
                }
            };
            too_big |= framer.bytes_out() > max_size;
            if !too_big
                && failure.is_none()
                && let Some(upstream) = self.upstream.as_mut()
            {
                let first = held.take().unwrap_or_default();
                let mut parts: Vec<&[u8]> = Vec::with_capacity(pieces.len() + 1);
                parts.push(&first);
                parts.extend(pieces.iter().map(|piece| match piece {
                    Piece::Input(range) => &pending[range.clone()],
                    Piece::Literal(bytes) => *bytes,
                }));
                if ended {
                    let started = tokio::time::Instant::now();
                    verdict = Some(upstream.finish_data(&parts).await);
                    self.shared
                        .metrics
                        .upstream_latency("end_of_data", started.elapsed());
                } else if let Err(e) = upstream.write_data(&parts).await {
                    failure = Some(e);
                }
            }
            self.client.consume(consumed);
            if ended {
                break;
            }
        }
        let recipients = self
            .transaction
            .take()
            .map_or(0, |tx| tx.accepted_recipients);
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
                size = framer.bytes_out(),
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
        if let Some(e) = failure {
            tracing::warn!(error = %e, "upstream failed during DATA; message not sent");
            self.upstream = None;
            self.reply(
                451,
                "4.4.2",
                "Connection to the mail provider lost during DATA; message not sent, try again",
            );
            return Ok(());
        }
        self.finish_message(verdict, framer.bytes_out(), recipients);
        Ok(())
    }

    /// Relays the provider's verdict on the message (`None`: there was no provider
    /// connection to send it on) and gives the session back to the pool.
    fn finish_message(
        &mut self,
        verdict: Option<Result<Reply, UpstreamError>>,
        size: u64,
        recipients: usize,
    ) {
        let Some(verdict) = verdict else {
            self.reply(
                451,
                "4.4.2",
                "Connection to the mail provider lost; try again",
            );
            return;
        };
        let account = self.account.or(self.no_auth).map_or_else(
            || "-".to_string(),
            |i| self.shared.config.accounts[i].name.clone(),
        );
        match verdict {
            Ok(reply) => {
                if reply.is_positive_completion() {
                    self.shared.metrics.message_relayed(&account, size);
                    tracing::info!(account, size, recipients, code = reply.code(), reply = %reply.text(), "message relayed");
                } else {
                    tracing::warn!(account, size, recipients, code = reply.code(), reply = %reply.text(), fix = crate::hints::fix_for_reply(&reply), "provider refused the message");
                }
                if reply.code() != 421
                    && let Some(mut lease) = self.upstream.take()
                {
                    // The transaction is over either way; the session serves the next one.
                    lease.count_message();
                    lease.release();
                }
                self.relay(Phase::DataEnd, reply);
            }
            Err(e) => {
                // No verdict arrived: the provider may or may not have the message. Only a
                // 4xx is honest; the client retries, at worst producing a duplicate.
                tracing::warn!(error = %e, size, "no reply from the provider after DATA");
                self.upstream = None;
                let text = match e {
                    UpstreamError::Timeout { after, .. } => format!(
                        "No confirmation from the mail provider within {} of the end of DATA; \
                         message may not have been sent, try again",
                        crate::upstream::human(after)
                    ),
                    _ => "No confirmation from the mail provider; message may not have been sent, try again".to_string(),
                };
                self.reply(451, "4.4.2", &text);
            }
        }
    }
}
