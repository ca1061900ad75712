//! One SMTP session of the Office365 stand-in, from greeting (or from the TLS handshake
//! after STARTTLS) to close: command dispatch, AUTH XOAUTH2/LOGIN, the mail transaction,
//! DATA and BDAT. Replies follow PROTOCOL.md §1.3–1.6.
//!
//! A session runs in phases: the plaintext phase ends at STARTTLS and hands the socket back
//! for the handshake; the TLS phase starts with a fresh [`Session`], because RFC 3207 says
//! nothing learned before TLS may be kept.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::sandbox::clock::UtcDateTime;
use crate::sandbox::office365::{AuthAttempt, SenderSlot, Shared, Stage, StoredMessage};
use crate::sandbox::random;
use crate::sandbox::wire::{Wire, WireError, find};

/// Ordinary command lines, including the line end.
const COMMAND_LINE_LIMIT: usize = 4 * 1024;
/// AUTH lines carry tokens of 2,000 to 4,000+ characters, base64-encoded (§1.7).
const AUTH_LINE_LIMIT: usize = 16 * 1024;
/// One session may pipeline many messages, but not forever.
const MAX_COMMANDS: usize = 10_000;
const MAX_RECIPIENTS: usize = 500;
/// How much of an unknown command is echoed back.
const ECHO_LIMIT: usize = 64;

const END_OF_DATA: &[u8] = b"\r\n.\r\n";
const KNOWN_VERBS: [&str; 13] = [
    "EHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY",
    "HELP", "QUIT",
];

/// How a phase ended.
pub(crate) enum PhaseEnd<S> {
    /// The session is over.
    Closed,
    /// The client asked for STARTTLS and got its 220; buffered input has been discarded.
    StartTls(S),
}

/// What the command loop does next.
enum Flow {
    Continue,
    /// End the session, closing the connection politely.
    Close,
    /// End the session by dropping the connection, as a network failure would.
    Abort,
    StartTls,
}

/// Run one phase of a session on `wire`. `secure` says whether the stream is TLS; `greet`
/// whether to send the 220 greeting first (not after STARTTLS).
pub(crate) async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Arc<Shared>,
    mut wire: Wire<S>,
    peer: SocketAddr,
    secure: bool,
    greet: bool,
) -> PhaseEnd<S> {
    let mut session = Session {
        shared: Arc::clone(shared),
        peer,
        secure,
        stage: Stage::Greeting,
        greeted: false,
        auth: None,
        tx: None,
    };
    match session.serve(&mut wire, greet).await {
        Ok(Flow::StartTls) => {
            let (stream, leftover) = wire.into_parts();
            if !leftover.is_empty() {
                // CVE-2011-0411: bytes sent before the handshake must not count as sent
                // inside TLS.
                tracing::debug!(
                    bytes = leftover.len(),
                    "discarding input pipelined after STARTTLS"
                );
            }
            PhaseEnd::StartTls(stream)
        }
        Ok(Flow::Continue | Flow::Close) => {
            wire.shutdown().await;
            PhaseEnd::Closed
        }
        Ok(Flow::Abort) => {
            tracing::debug!("dropping the connection without a reply");
            PhaseEnd::Closed
        }
        Err(WireError::Timeout) => {
            tracing::debug!("idle timeout");
            let _ = wire.write_all(b"421 4.4.1 Connection timed out\r\n").await;
            wire.shutdown().await;
            PhaseEnd::Closed
        }
        Err(error) => {
            tracing::debug!(?error, "session ended");
            PhaseEnd::Closed
        }
    }
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    secure: bool,
    /// What the next reply answers, for [`crate::sandbox::Behaviour`]'s per-stage switches.
    stage: Stage,
    /// EHLO or HELO seen in this phase.
    greeted: bool,
    auth: Option<Authenticated>,
    tx: Option<Transaction>,
}

struct Authenticated {
    user: String,
    /// Held for the concurrency limit; released when the session ends.
    _slot: SenderSlot,
}

struct Transaction {
    mail_from: String,
    mail_params: String,
    rcpt_to: Vec<String>,
    /// `BODY=BINARYMIME`, which only BDAT may carry (RFC 3030).
    binary: bool,
    /// Message bytes so far once BDAT has started; DATA may not follow then.
    chunks: Option<Vec<u8>>,
}

/// The outcome of reading a DATA body.
enum DotData {
    Message(Vec<u8>),
    /// Over the size limit. `resynced` is false when no terminator came within the scan
    /// limit, so the session cannot find the next command.
    TooBig {
        resynced: bool,
    },
    Dropped,
}

impl Session {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        greet: bool,
    ) -> Result<Flow, WireError> {
        if greet {
            let greeting = format!(
                "220 {} Microsoft ESMTP MAIL Service ready at {} [{}]",
                self.host(),
                UtcDateTime::now().rfc2822(),
                random::hex(8).to_ascii_uppercase()
            );
            self.reply(wire, &greeting).await?;
        }
        for _ in 0..MAX_COMMANDS {
            let line = match wire.read_line(AUTH_LINE_LIMIT).await {
                Ok(line) => line,
                Err(WireError::LineTooLong { resynced }) => {
                    self.reply(wire, "500 5.5.6 Line too long").await?;
                    if resynced {
                        continue;
                    }
                    return Ok(Flow::Close);
                }
                Err(error) => return Err(error),
            };
            if line.len() > COMMAND_LINE_LIMIT && !starts_with_ignore_case(&line, b"AUTH ") {
                self.reply(wire, "500 5.5.6 Line too long").await?;
                continue;
            }
            match self.command(wire, &line).await? {
                Flow::Continue => {}
                other => return Ok(other),
            }
        }
        self.reply(wire, "421 4.7.0 Too many commands in one session")
            .await?;
        Ok(Flow::Close)
    }

    async fn command<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        line: &[u8],
    ) -> Result<Flow, WireError> {
        let Ok(text) = std::str::from_utf8(line) else {
            return self.unrecognized(wire, line).await;
        };
        let (verb, args) = match text.split_once(' ') {
            Some((verb, args)) => (verb, args.trim()),
            None => (text.trim(), ""),
        };
        let verb = verb.to_ascii_uppercase();
        // Only known verbs are logged: arguments, and lines sent out of turn, may carry
        // credentials.
        if KNOWN_VERBS.contains(&verb.as_str()) {
            tracing::debug!(%verb, "command");
        } else {
            tracing::debug!("unrecognized command");
        }
        self.shared.record_command(
            if verb == "AUTH" {
                format!("AUTH {}", args.split(' ').next().unwrap_or_default())
            } else {
                text.trim_end_matches(['\r', '\n']).to_string()
            },
            wire.line_was_buffered(),
        );
        self.stage = Stage::of_verb(&verb);
        if self.shared.behaviour().drop_at == Some(self.stage)
            || self.shared.take_drop_once(self.stage)
        {
            return Ok(Flow::Abort);
        }
        match verb.as_str() {
            "EHLO" => self.hello(wire, args, true).await,
            "HELO" => self.hello(wire, args, false).await,
            "STARTTLS" => self.starttls(wire, args).await,
            "AUTH" => self.auth(wire, args, line.len()).await,
            "MAIL" => self.mail(wire, args).await,
            "RCPT" => self.rcpt(wire, args).await,
            "DATA" => self.data(wire).await,
            "BDAT" => self.bdat(wire, args).await,
            "RSET" => {
                self.tx = None;
                self.respond(wire, "250 2.0.0 Resetting").await
            }
            "NOOP" => self.respond(wire, "250 2.0.0 OK").await,
            "VRFY" => self.respond(wire, "252 2.1.5 Cannot VRFY user").await,
            "HELP" => {
                let help = "214-This server supports the following commands:\r\n\
                            214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH BDAT";
                self.respond(wire, help).await
            }
            "QUIT" => {
                self.reply(wire, "221 2.0.0 Service closing transmission channel")
                    .await?;
                Ok(Flow::Close)
            }
            _ => self.unrecognized(wire, line).await,
        }
    }

    async fn hello<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
        extended: bool,
    ) -> Result<Flow, WireError> {
        if args.is_empty() {
            return self.respond(wire, "501 5.5.4 Invalid domain name").await;
        }
        self.greeted = true;
        self.tx = None;
        let first = format!("{} Hello [{}]", self.host(), self.peer.ip());
        if !extended {
            return self.respond(wire, &format!("250 {first}")).await;
        }
        let size = format!("SIZE {}", self.shared.config.max_size);
        let security = if self.secure {
            "AUTH LOGIN XOAUTH2"
        } else {
            "STARTTLS"
        };
        let lines = [
            first.as_str(),
            &size,
            "PIPELINING",
            "DSN",
            "ENHANCEDSTATUSCODES",
            security,
            "8BITMIME",
            "BINARYMIME",
            "CHUNKING",
            "SMTPUTF8",
        ];
        let last = lines.len() - 1;
        let reply: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        self.respond(wire, &reply.join("\r\n")).await
    }

    async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
    ) -> Result<Flow, WireError> {
        if self.secure {
            return self.respond(wire, "503 5.5.1 TLS already active").await;
        }
        if !args.is_empty() {
            return self.respond(wire, "501 5.5.4 Invalid arguments").await;
        }
        if self.shared.behaviour().inject_after_starttls_220 {
            // One write, so the extra line arrives with the 220 as a man in the middle would
            // arrange it (PROTOCOL.md §4.9).
            self.delay().await;
            wire.write_all(b"220 2.0.0 SMTP server ready\r\n250 injected\r\n")
                .await?;
        } else {
            self.reply(wire, "220 2.0.0 SMTP server ready").await?;
        }
        Ok(Flow::StartTls)
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
        line_len: usize,
    ) -> Result<Flow, WireError> {
        if !self.secure {
            return self
                .respond(wire, "530 5.7.0 Must issue a STARTTLS command first")
                .await;
        }
        if !self.greeted {
            return self.respond(wire, "503 5.5.2 Send hello first").await;
        }
        if self.auth.is_some() {
            return self.respond(wire, "503 5.5.2 Already authenticated").await;
        }
        if self.tx.is_some() {
            return self
                .respond(wire, "503 5.5.1 Bad sequence of commands")
                .await;
        }
        let (mechanism, initial) = match args.split_once(' ') {
            Some((m, ir)) => (m, Some(ir.trim())),
            None => (args, None),
        };
        match mechanism.to_ascii_uppercase().as_str() {
            "XOAUTH2" => self.auth_xoauth2(wire, initial, line_len).await,
            "LOGIN" => self.auth_login(wire, initial).await,
            "" => self.respond(wire, "501 5.5.4 Syntax error").await,
            _ => {
                self.respond(wire, "504 5.7.4 Unrecognized authentication type")
                    .await
            }
        }
    }

    async fn auth_xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        initial: Option<&str>,
        line_len: usize,
    ) -> Result<Flow, WireError> {
        let two_step = initial.is_none();
        let (response, response_line_len) = match initial {
            Some(initial) => (initial.to_string(), line_len),
            None => {
                self.reply(wire, "334 ").await?;
                let Some(line) = self.read_auth_line(wire).await? else {
                    return Ok(Flow::Close);
                };
                (String::from_utf8_lossy(&line).into_owned(), line.len())
            }
        };
        if response.trim() == "*" {
            return self
                .respond(wire, "501 5.5.2 Authentication cancelled")
                .await;
        }

        let decoded = decode_xoauth2(response.trim());
        let token_ok = decoded
            .as_ref()
            .is_some_and(|(user, token)| self.shared.bearer_accepted(user, token));
        let (user, token) = match decoded {
            Some((user, token)) => (Some(user), token),
            None => (None, String::new()),
        };
        self.shared.record_attempt(AuthAttempt {
            mechanism: "XOAUTH2".to_string(),
            two_step,
            user: user.clone(),
            token_ok,
            response_line_len,
            token,
        });
        let Some(user) = user else {
            return self
                .respond(wire, "535 5.7.3 Authentication unsuccessful")
                .await;
        };

        let behaviour = self.shared.behaviour();
        if let Some(reply) = behaviour.auth_reply {
            if is_positive(&reply)
                && let Some(slot) = self.shared.try_acquire_sender(&user, None)
            {
                self.auth = Some(Authenticated { user, _slot: slot });
            }
            return self.respond(wire, &reply).await;
        }
        if !token_ok {
            let reply = format!("535 5.7.3 Authentication unsuccessful [{}]", self.host());
            return self.respond(wire, &reply).await;
        }
        let limit = behaviour.max_concurrent_sessions_per_user;
        let Some(slot) = self.shared.try_acquire_sender(&user, limit) else {
            return self
                .respond(
                    wire,
                    "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                )
                .await;
        };
        self.auth = Some(Authenticated { user, _slot: slot });
        self.respond(wire, "235 2.7.0 Authentication successful")
            .await
    }

    /// Basic authentication is switched off in Exchange Online: the exchange runs to the
    /// end so clients see the real refusal.
    async fn auth_login<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        initial: Option<&str>,
    ) -> Result<Flow, WireError> {
        let username = match initial {
            Some(initial) => initial.as_bytes().to_vec(),
            None => {
                self.reply(wire, "334 VXNlcm5hbWU6").await?;
                match self.read_auth_line(wire).await? {
                    Some(line) => line,
                    None => return Ok(Flow::Close),
                }
            }
        };
        if username == b"*" {
            return self
                .respond(wire, "501 5.5.2 Authentication cancelled")
                .await;
        }
        self.reply(wire, "334 UGFzc3dvcmQ6").await?;
        let Some(password) = self.read_auth_line(wire).await? else {
            return Ok(Flow::Close);
        };
        if password == b"*" {
            return self
                .respond(wire, "501 5.5.2 Authentication cancelled")
                .await;
        }
        let user = STANDARD
            .decode(&username)
            .ok()
            .and_then(|u| String::from_utf8(u).ok());
        self.shared.record_attempt(AuthAttempt {
            mechanism: "LOGIN".to_string(),
            two_step: initial.is_none(),
            user,
            token_ok: false,
            response_line_len: password.len(),
            token: String::new(),
        });
        let reply = format!(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [{}]",
            self.host()
        );
        self.respond(wire, &reply).await
    }

    /// A SASL response line, up to 16 KiB. `None` means the line was too long and the
    /// session should end (its reply has been sent).
    async fn read_auth_line<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
    ) -> Result<Option<Vec<u8>>, WireError> {
        match wire.read_line(AUTH_LINE_LIMIT).await {
            Ok(line) => Ok(Some(line)),
            Err(WireError::LineTooLong { .. }) => {
                self.reply(wire, "500 5.5.6 Authentication exchange line is too long")
                    .await?;
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    async fn mail<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
    ) -> Result<Flow, WireError> {
        if let Some(refusal) = self.transaction_refusal() {
            return self.respond(wire, &refusal).await;
        }
        if self.tx.is_some() {
            return self
                .respond(wire, "503 5.5.1 Sender already specified")
                .await;
        }
        let Some((address, params)) = parse_path(args, "FROM:") else {
            return self.respond(wire, "501 5.1.7 Invalid address").await;
        };
        let max_size = self.shared.config.max_size;
        let mut binary = false;
        for param in params.split_whitespace() {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            if key.eq_ignore_ascii_case("SIZE") {
                // A size too large to parse is certainly too large.
                if value.parse::<u64>().map_or(true, |size| size > max_size) {
                    let reply = "552 5.3.4 Message size exceeds fixed maximum message size";
                    return self.respond(wire, reply).await;
                }
            } else if key.eq_ignore_ascii_case("BODY") && value.eq_ignore_ascii_case("BINARYMIME") {
                binary = true;
            }
        }
        let transaction = Transaction {
            mail_from: address.to_string(),
            mail_params: params.to_string(),
            rcpt_to: Vec::new(),
            binary,
            chunks: None,
        };
        match self.shared.behaviour().mail_reply {
            Some(reply) => {
                if is_positive(&reply) {
                    self.tx = Some(transaction);
                }
                self.respond(wire, &reply).await
            }
            None => {
                self.tx = Some(transaction);
                self.respond(wire, "250 2.1.0 Sender OK").await
            }
        }
    }

    async fn rcpt<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
    ) -> Result<Flow, WireError> {
        if let Some(refusal) = self.transaction_refusal() {
            return self.respond(wire, &refusal).await;
        }
        let Some(tx) = self.tx.as_ref() else {
            return self
                .respond(wire, "503 5.5.1 Bad sequence of commands")
                .await;
        };
        let Some((address, _params)) = parse_path(args, "TO:").filter(|(a, _)| !a.is_empty())
        else {
            return self.respond(wire, "501 5.1.3 Invalid address").await;
        };
        if tx.rcpt_to.len() >= MAX_RECIPIENTS {
            return self.respond(wire, "452 4.5.3 Too many recipients").await;
        }
        let address = address.to_string();
        let reply = self.shared.behaviour().rcpt_reply;
        let accepted = reply.as_deref().is_none_or(is_positive);
        if accepted && let Some(tx) = self.tx.as_mut() {
            tx.rcpt_to.push(address);
        }
        let reply = reply.unwrap_or_else(|| "250 2.1.5 Recipient OK".to_string());
        self.respond(wire, &reply).await
    }

    async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
    ) -> Result<Flow, WireError> {
        if let Some(refusal) = self.transaction_refusal() {
            return self.respond(wire, &refusal).await;
        }
        let ready = self
            .tx
            .as_ref()
            .is_some_and(|tx| !tx.rcpt_to.is_empty() && tx.chunks.is_none() && !tx.binary);
        if !ready {
            return self
                .respond(wire, "503 5.5.1 Bad sequence of commands")
                .await;
        }

        let behaviour = self.shared.behaviour();
        match behaviour.data_reply {
            Some(reply) if !reply.trim_start().starts_with("354") => {
                return self.respond(wire, &reply).await;
            }
            Some(reply) => self.reply(wire, &reply).await?,
            None => {
                self.reply(wire, "354 Start mail input; end with <CRLF>.<CRLF>")
                    .await?
            }
        }

        let max_size = self.shared.config.max_size;
        match read_dot_data(
            wire,
            max_size,
            behaviour.drop_during_data,
            &self.shared.data_octets,
        )
        .await?
        {
            DotData::Message(data) => self.finish_message(wire, data).await,
            DotData::TooBig { resynced } => {
                self.tx = None;
                let reply = "552 5.3.4 Message size exceeds fixed maximum message size";
                self.reply(wire, reply).await?;
                Ok(if resynced {
                    Flow::Continue
                } else {
                    Flow::Close
                })
            }
            DotData::Dropped => Ok(Flow::Abort),
        }
    }

    async fn bdat<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        args: &str,
    ) -> Result<Flow, WireError> {
        let Some((size, last)) = parse_bdat(args) else {
            // Without a valid size the chunk boundary is unknown: nothing after this line
            // can be trusted, so the session ends.
            self.reply(wire, "501 5.5.4 Invalid BDAT arguments").await?;
            return Ok(Flow::Close);
        };
        let max_size = self.shared.config.max_size;
        if size > max_size {
            // Reading that many bytes just to discard them is not worth it.
            self.reply(
                wire,
                "552 5.3.4 Message size exceeds fixed maximum message size",
            )
            .await?;
            return Ok(Flow::Close);
        }
        let drop_during_data = self.shared.behaviour().drop_during_data;
        let keep_going = |got: u64| !(drop_during_data && got > 0);

        let refusal = self.transaction_refusal().or_else(|| {
            let ready = self.tx.as_ref().is_some_and(|tx| !tx.rcpt_to.is_empty());
            (!ready).then(|| "503 5.5.1 Bad sequence of commands".to_string())
        });
        if let Some(refusal) = refusal {
            // The chunk still has to be consumed to find the next command.
            if !wire.read_exact_into(size, None, keep_going).await? {
                return Ok(Flow::Abort);
            }
            return self.respond(wire, &refusal).await;
        }

        let Some(tx) = self.tx.as_mut() else {
            return Ok(Flow::Close);
        };
        let chunks = tx.chunks.get_or_insert_with(Vec::new);
        let too_big = chunks.len() as u64 + size > max_size;
        let sink = (!too_big).then_some(chunks);
        if !wire.read_exact_into(size, sink, keep_going).await? {
            return Ok(Flow::Abort);
        }
        if too_big {
            self.tx = None;
            let reply = "552 5.3.4 Message size exceeds fixed maximum message size";
            return self.respond(wire, reply).await;
        }
        if !last {
            let reply = format!("250 2.0.0 CHUNK received OK, {size} octets");
            return self.respond(wire, &reply).await;
        }
        let data = tx.chunks.take().unwrap_or_default();
        self.finish_message(wire, data).await
    }

    /// The reply to the end of a message: store it, or refuse it as configured.
    async fn finish_message<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        data: Vec<u8>,
    ) -> Result<Flow, WireError> {
        let (Some(tx), Some(auth)) = (self.tx.take(), self.auth.as_ref()) else {
            return self
                .respond(wire, "503 5.5.1 Bad sequence of commands")
                .await;
        };
        let behaviour = self.shared.behaviour();
        self.stage = Stage::EndOfData;
        if behaviour.drop_at == Some(Stage::EndOfData) {
            return Ok(Flow::Abort);
        }
        let queue_id = random::hex(10).to_ascii_uppercase();
        let message = StoredMessage {
            mail_from: tx.mail_from,
            mail_params: tx.mail_params,
            rcpt_to: tx.rcpt_to,
            data,
            auth_user: auth.user.clone(),
            queue_id: queue_id.clone(),
        };

        if let Some(reply) = behaviour.end_of_data_reply {
            if is_positive(&reply)
                && let Err(error) = self.shared.store(message).await
            {
                tracing::debug!(%error, "could not write the message to the mail folder");
            }
            return self.respond(wire, &reply).await;
        }
        if behaviour.enforce_send_as
            && let Some(other) = sent_as_other(&message, &auth.user)
        {
            let reply = send_as_denied(&auth.user, &other, self.host());
            return self.respond(wire, &reply).await;
        }
        if let Err(error) = self.shared.store(message).await {
            tracing::debug!(%error, "could not write the message to the mail folder");
            return self
                .respond(
                    wire,
                    "451 4.3.0 Error writing the message to the mail folder",
                )
                .await;
        }
        let host = self.host();
        let reply = format!("250 2.0.0 OK <{queue_id}@{host}> [Hostname={host}]");
        self.reply(wire, &reply).await?;
        if behaviour.close_after_message {
            return Ok(Flow::Abort);
        }
        Ok(Flow::Continue)
    }

    /// Why MAIL, RCPT, DATA or BDAT cannot run now, if they cannot.
    fn transaction_refusal(&self) -> Option<String> {
        if !self.greeted {
            return Some("503 5.5.2 Send hello first".to_string());
        }
        if self.auth.is_none() {
            return Some(format!(
                "530 5.7.57 Client not authenticated to send mail. [{}]",
                self.host()
            ));
        }
        None
    }

    async fn unrecognized<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        line: &[u8],
    ) -> Result<Flow, WireError> {
        let reply = format!(
            "500 5.3.3 Unrecognized command '{}'",
            printable(line, ECHO_LIMIT)
        );
        self.respond(wire, &reply).await
    }

    /// Send a reply and carry on.
    async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        wire: &mut Wire<S>,
        text: &str,
    ) -> Result<Flow, WireError> {
        self.reply(wire, text).await?;
        Ok(Flow::Continue)
    }

    /// Send a reply: one line, or several separated by `"\r\n"`, each sent with CRLF.
    async fn reply<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        wire: &mut Wire<S>,
        text: &str,
    ) -> Result<(), WireError> {
        self.delay().await;
        let mut bytes = Vec::with_capacity(text.len() + 2);
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.is_empty() && !bytes.is_empty() {
                continue;
            }
            bytes.extend_from_slice(line.as_bytes());
            bytes.extend_from_slice(b"\r\n");
        }
        wire.write_all(&bytes).await
    }

    async fn delay(&self) {
        let delay = self.shared.reply_delay(self.stage);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    fn host(&self) -> &str {
        &self.shared.config.hostname
    }
}

/// Read a DATA body up to `CRLF.CRLF` (the only end-of-data, PROTOCOL.md §4.10) and undo
/// dot-stuffing. Input after the terminator stays buffered for the next command. Beyond
/// `max_size` the bytes are only scanned for the terminator, not kept, and beyond twice
/// that (at least 1 MiB) the scan gives up.
async fn read_dot_data<S: AsyncRead + AsyncWrite + Unpin>(
    wire: &mut Wire<S>,
    max_size: u64,
    drop_during_data: bool,
    received: &AtomicU64,
) -> Result<DotData, WireError> {
    let scan_limit = max_size.saturating_mul(2).max(1 << 20);
    // A CRLF in front lets a terminator at the very start (an empty message) match too.
    let mut raw = b"\r\n".to_vec();
    let mut search_from = 0;
    let mut too_big = false;
    let mut scanned: u64 = 0;
    loop {
        if let Some(pos) = find(&raw[search_from..], END_OF_DATA) {
            let end = search_from + pos;
            wire.unread(raw.split_off(end + END_OF_DATA.len()));
            if too_big {
                return Ok(DotData::TooBig { resynced: true });
            }
            // Keep the CRLF that ends the last line; drop ".\r\n".
            raw.truncate(end + 2);
            let data = unstuff(&raw[2..]);
            if data.len() as u64 > max_size {
                return Ok(DotData::TooBig { resynced: true });
            }
            return Ok(DotData::Message(data));
        }
        if drop_during_data && raw.len() > 2 {
            return Ok(DotData::Dropped);
        }
        if scanned > scan_limit {
            return Ok(DotData::TooBig { resynced: false });
        }
        if too_big || (raw.len() - 2) as u64 > max_size {
            // Keep only what could be the start of a terminator.
            too_big = true;
            let tail = raw.split_off(raw.len().saturating_sub(END_OF_DATA.len() - 1));
            raw = tail;
        }
        search_from = raw.len().saturating_sub(END_OF_DATA.len() - 1);
        let before = raw.len();
        wire.read_into(&mut raw).await?;
        let read = (raw.len() - before) as u64;
        scanned += read;
        received.fetch_add(read, Ordering::SeqCst);
    }
}

/// Remove one leading dot from every line (RFC 5321 §4.5.2). Lines end only at CRLF.
fn unstuff(stuffed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(stuffed.len());
    let mut at_line_start = true;
    let mut previous = 0u8;
    for &byte in stuffed {
        if !(at_line_start && byte == b'.') {
            out.push(byte);
        }
        at_line_start = previous == b'\r' && byte == b'\n';
        previous = byte;
    }
    out
}

/// `user=<mailbox>^Aauth=Bearer <token>^A^A`, base64-encoded, strictly (PROTOCOL.md §1.4).
fn decode_xoauth2(response: &str) -> Option<(String, String)> {
    let raw = STANDARD.decode(response.as_bytes()).ok()?;
    let body = raw.strip_suffix(b"\x01\x01")?;
    let split = body.iter().position(|&b| b == 0x01)?;
    let (user_field, auth_field) = (&body[..split], &body[split + 1..]);
    let user = std::str::from_utf8(user_field.strip_prefix(b"user=")?).ok()?;
    let auth = std::str::from_utf8(auth_field.strip_prefix(b"auth=")?).ok()?;
    let (scheme, token) = auth.split_once(' ')?;
    let well_formed = !user.is_empty()
        && !user.contains(char::is_whitespace)
        && scheme.eq_ignore_ascii_case("Bearer")
        && !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_graphic());
    well_formed.then(|| (user.to_string(), token.to_string()))
}

/// `FROM:<address> params` or `TO:<address> params`, with optional space after the colon.
/// Office365 wants angle brackets (PROTOCOL.md §1.5), so a bare address is refused.
fn parse_path<'a>(args: &'a str, prefix: &str) -> Option<(&'a str, &'a str)> {
    let head = args.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = args[prefix.len()..].trim_start().strip_prefix('<')?;
    let (address, params) = rest.split_once('>')?;
    if address.contains(['<', ' ']) {
        return None;
    }
    Some((address, params.trim()))
}

/// `<size> [LAST]`.
fn parse_bdat(args: &str) -> Option<(u64, bool)> {
    let mut words = args.split_whitespace();
    let size = words.next()?;
    if !size.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let size = size.parse().ok()?;
    let last = match words.next() {
        None => false,
        Some(word) if word.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return None,
    };
    words.next().is_none().then_some((size, last))
}

fn is_positive(reply: &str) -> bool {
    reply.trim_start().starts_with('2')
}

fn starts_with_ignore_case(line: &[u8], prefix: &[u8]) -> bool {
    line.get(..prefix.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(prefix))
}

/// Peer text fit to echo: printable ASCII only, at most `max` characters.
fn printable(bytes: &[u8], max: usize) -> String {
    bytes
        .iter()
        .filter(|b| b.is_ascii_graphic() || **b == b' ')
        .take(max)
        .map(|&b| char::from(b))
        .collect()
}

/// The address a message is sent as when that is not `user`'s own: the envelope sender, or
/// an address in the `From:` header. Office365 checks both against the mailbox.
fn sent_as_other(message: &StoredMessage, user: &str) -> Option<String> {
    if !message.mail_from.eq_ignore_ascii_case(user) {
        return Some(message.mail_from.clone());
    }
    let data = &message.data;
    let end = crate::smtp::headers::header_section_end(data).unwrap_or(data.len());
    crate::smtp::headers::from_addresses(&data[..end])
        .into_iter()
        .find(|address| !address.eq_ignore_ascii_case(user))
}

/// The long SendAs refusal of PROTOCOL.md §1.6, with a diagnostic blob like the real one's.
fn send_as_denied(user: &str, from: &str, host: &str) -> String {
    format!(
        "554 5.2.252 SendAsDenied; {user} not allowed to send as {from}; \
         STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; \
         Failed to process message due to a permanent exception with message \
         [BeginDiagnosticData]Cannot submit message. 0.35250:0A00C184, 1.36674:0A000000, \
         1.61250:00000000, 1.45378:02000000, 1.44866:D8000000, 1.36674:0E000000, \
         1.61250:00000000, 1.45378:DD000000, 1.44866:8A010000[EndDiagnosticData] \
         [Hostname={host}]"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstuffing() {
        assert_eq!(unstuff(b""), b"");
        assert_eq!(unstuff(b"..a\r\n.b\r\nc.d\r\n"), b".a\r\nb\r\nc.d\r\n");
        // A bare LF is not a line end, so the dot after it stays.
        assert_eq!(unstuff(b"x\n.y\r\n"), b"x\n.y\r\n");
    }

    #[test]
    fn xoauth2_decoding_is_strict() {
        let encode = |s: &[u8]| STANDARD.encode(s);
        let good = encode(b"user=a@b.test\x01auth=Bearer tok.en\x01\x01");
        assert_eq!(
            decode_xoauth2(&good),
            Some(("a@b.test".to_string(), "tok.en".to_string()))
        );
        for bad in [
            &b"user=a@b.test\x01auth=Bearer tok\x01"[..],
            b"user=a@b.test\x01auth=Basic tok\x01\x01",
            b"user=\x01auth=Bearer tok\x01\x01",
            b"user=a@b.test\x01auth=Bearer \x01\x01",
            b"user=a@b.test\x01auth=Bearer tok\x01x=y\x01\x01",
            b"auth=Bearer tok\x01user=a@b.test\x01\x01",
        ] {
            assert_eq!(decode_xoauth2(&encode(bad)), None, "{bad:?}");
        }
        assert_eq!(decode_xoauth2("not base64!"), None);
    }

    #[test]
    fn paths_and_bdat_arguments() {
        assert_eq!(
            parse_path("FROM:<a@b> SIZE=10", "FROM:"),
            Some(("a@b", "SIZE=10"))
        );
        assert_eq!(parse_path("from: <>", "FROM:"), Some(("", "")));
        assert_eq!(parse_path("FROM:a@b", "FROM:"), None);
        assert_eq!(parse_path("TO:<a@b>", "FROM:"), None);
        assert_eq!(parse_path("F", "FROM:"), None);
        assert_eq!(parse_bdat("10"), Some((10, false)));
        assert_eq!(parse_bdat("10 last"), Some((10, true)));
        assert_eq!(parse_bdat("-1"), None);
        assert_eq!(parse_bdat("10 LAST x"), None);
        assert_eq!(parse_bdat("99999999999999999999999"), None);
    }

    #[test]
    fn echo_is_printable_and_bounded() {
        assert_eq!(printable(b"a1 login\x00\x1b[31m", 64), "a1 login[31m");
        assert_eq!(printable(&[b'x'; 100], 64).len(), 64);
    }
}
