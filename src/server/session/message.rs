//! DATA: the message streamed from the client through the smuggling-proof framer to the
//! provider, and the provider's verdict passed back. The message is never held whole in
//! memory; only when the account checks the `From:` header is its header section held back
//! (bounded) until it has been checked, so a refused message never reaches the provider.
//!
//! Lines over RFC 5321's 1,000 octets are passed on unchanged: Office365 and Gmail accept
//! them, and folding or refusing them would break messages that legacy devices produce.

use super::Session;
use super::client::End;
use crate::smtp::headers::{from_addresses, header_section_end};
use crate::smtp::{DataFramer, Feed};
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
            self.relay(reply);
            return Ok(());
        }
        self.relay(reply);
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
            Ok(reply) | Err(reply) => {
                // The client is already sending; its message is read to the end and the
                // provider's refusal becomes the verdict.
                self.discard_rest(&mut framer, ended).await?;
                self.transaction = None;
                self.relay(reply);
                Ok(())
            }
        }
    }

    /// Feeds buffered client bytes through the framer into `out`, reading more first when
    /// nothing is buffered. True at the end of the message. A client that vanishes here
    /// takes the upstream connection with it, without the final dot, so the provider
    /// discards the partial message.
    async fn next_piece(
        &mut self,
        framer: &mut DataFramer,
        out: &mut Vec<u8>,
    ) -> Result<bool, End> {
        if self.client.pending().is_empty()
            && let Err(e) = self.client.fill_data().await
        {
            self.upstream = None;
            self.transaction = None;
            tracing::debug!(error = %e, "client gone during DATA; message discarded");
            return Err(e);
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

    async fn discard_rest(&mut self, framer: &mut DataFramer, mut ended: bool) -> Result<(), End> {
        let mut scratch = Vec::new();
        while !ended {
            scratch.clear();
            ended = self.next_piece(framer, &mut scratch).await?;
        }
        Ok(())
    }

    /// Copies the message to the upstream as it arrives (starting with `out`, bytes already
    /// framed), then relays the upstream's verdict.
    async fn stream_message(
        &mut self,
        mut framer: DataFramer,
        mut out: Vec<u8>,
        mut ended: bool,
    ) -> Result<(), End> {
        let max_size = self.shared.config.server.max_message_size;
        let mut upstream_failure: Option<UpstreamError> = None;
        let mut too_big = false;
        loop {
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
            ended = self.next_piece(&mut framer, &mut out).await?;
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
        self.finish_message(framer.bytes_out(), recipients).await;
        Ok(())
    }

    async fn finish_message(&mut self, size: u64, recipients: usize) {
        let Some(upstream) = self.upstream.as_mut() else {
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
        let started = tokio::time::Instant::now();
        let verdict = upstream.finish_data().await;
        self.shared
            .metrics
            .upstream_latency("end_of_data", started.elapsed());
        match verdict {
            Ok(reply) => {
                if reply.is_positive_completion() {
                    self.shared.metrics.message_relayed(&account, size);
                    tracing::info!(account, size, recipients, code = reply.code(), reply = %reply.text(), "message relayed");
                } else {
                    tracing::warn!(account, size, recipients, code = reply.code(), reply = %reply.text(), fix = crate::hints::fix_for_reply(&reply), "provider refused the message");
                }
                self.relay(reply);
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
