//! The SMTP client toward the provider: connect, TLS (STARTTLS or implicit), EHLO, and
//! `AUTH XOAUTH2` in the two-step form; then one command at a time (or a pipelined group),
//! each with its own timeout, keeping the provider's reply intact so the session can relay
//! it. `pool` keeps authenticated sessions between client sessions.

pub mod pool;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use secrecy::ExposeSecret;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::{Timeouts, UpstreamSettings, UpstreamTls};
use crate::io::Stream;
use crate::oauth::AccessToken;
use crate::smtp::{Capabilities, Reply, ReplyError, parse_ehlo, parse_reply};

/// The phase of the upstream conversation an error happened in, for messages and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Greeting,
    Ehlo,
    StartTls,
    TlsHandshake,
    Auth,
    Mail,
    Rcpt,
    /// The DATA command itself, up to the 354.
    DataStart,
    Rset,
    /// Other commands (QUIT).
    Command,
    Data,
    DataEnd,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Greeting => "greeting",
            Phase::Ehlo => "EHLO",
            Phase::StartTls => "STARTTLS",
            Phase::TlsHandshake => "TLS handshake",
            Phase::Auth => "AUTH XOAUTH2",
            Phase::Mail => "MAIL",
            Phase::Rcpt => "RCPT",
            Phase::DataStart => "DATA",
            Phase::Rset => "RSET",
            Phase::Command => "command",
            Phase::Data => "DATA transfer",
            Phase::DataEnd => "end of DATA",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{phase} timed out after {}", human(*after))]
    Timeout { phase: Phase, after: Duration },
    #[error("{phase} failed: {source}")]
    Io {
        phase: Phase,
        source: std::io::Error,
    },
    #[error("{phase}: upstream closed the connection")]
    Closed { phase: Phase },
    #[error("{phase}: unreadable reply from upstream: {source}")]
    Protocol { phase: Phase, source: ReplyError },
    /// The provider answered, but not with what was needed; the reply is kept for relaying.
    #[error("{phase}: upstream replied {}", reply.text_with_code())]
    Rejected { phase: Phase, reply: Reply },
    #[error("upstream does not offer STARTTLS; refusing to send credentials in clear text")]
    NoStartTls,
    #[error("upstream does not offer AUTH XOAUTH2 (it offers: {offered})")]
    NoXoauth2 { offered: String },
    #[error("upstream sent data after its STARTTLS reply before the TLS handshake")]
    StartTlsInjection,
    #[error("invalid upstream host name {0}")]
    BadHostName(String),
}

impl UpstreamError {
    /// The provider's own reply, when the failure is one.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            UpstreamError::Rejected { reply, .. } => Some(reply),
            _ => None,
        }
    }
}

/// A duration for messages: whole seconds, or milliseconds below one second.
pub fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs())
    }
}

/// What the session needs to open an authenticated upstream connection.
pub struct Target<'a> {
    pub settings: &'a UpstreamSettings,
    pub tls: &'a Arc<rustls::ClientConfig>,
    /// Our name in EHLO.
    pub ehlo_name: &'a str,
    /// The mailbox in XOAUTH2's `user=`.
    pub mailbox: &'a str,
    pub timeouts: Timeouts,
}

/// An authenticated SMTP connection to the provider.
pub struct Upstream {
    stream: Stream,
    buf: Vec<u8>,
    capabilities: Capabilities,
    timeouts: Timeouts,
    opened: tokio::time::Instant,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

const READ_CHUNK: usize = 16 * 1024;

impl Upstream {
    /// Connects, secures and authenticates. On failure nothing is left open.
    pub async fn connect(
        target: &Target<'_>,
        token: &AccessToken,
    ) -> Result<Upstream, UpstreamError> {
        let mut up = Self::handshake(target).await?;
        up.authenticate(target.mailbox, token).await?;
        Ok(up)
    }

    /// Connects and secures the connection (TLS from the first byte, or STARTTLS) and reads
    /// the provider's capabilities, without logging in.
    pub async fn handshake(target: &Target<'_>) -> Result<Upstream, UpstreamError> {
        let t = target.timeouts;
        let settings = target.settings;
        let server_name = ServerName::try_from(settings.host.clone())
            .map_err(|_| UpstreamError::BadHostName(settings.host.clone()))?;
        let connector = TlsConnector::from(target.tls.clone());

        let tcp = within(
            Phase::Connect,
            t.upstream_connect,
            TcpStream::connect((settings.host.as_str(), settings.port)),
        )
        .await?;
        let _ = tcp.set_nodelay(true);

        let stream = match settings.tls {
            UpstreamTls::Implicit => {
                let tls = within(
                    Phase::TlsHandshake,
                    t.tls_handshake,
                    connector.connect(server_name.clone(), tcp),
                )
                .await?;
                Stream::ClientTls(Box::new(tls))
            }
            UpstreamTls::Starttls => Stream::Tcp(tcp),
        };
        let mut up = Upstream {
            stream,
            buf: Vec::with_capacity(READ_CHUNK),
            capabilities: Capabilities::default(),
            timeouts: t,
            opened: tokio::time::Instant::now(),
        };
        let greeting = up.read_reply(Phase::Greeting, t.upstream_greeting).await?;
        expect(Phase::Greeting, greeting, 220)?;
        up.ehlo(target.ehlo_name).await?;

        if settings.tls == UpstreamTls::Starttls {
            if !up.capabilities.starttls {
                return Err(UpstreamError::NoStartTls);
            }
            let reply = up.command_in(Phase::StartTls, b"STARTTLS\r\n").await?;
            expect(Phase::StartTls, reply, 220)?;
            // Anything the server sent after its 220 arrived unprotected and would later be
            // read as if it came over TLS (response injection): refuse to go on.
            if !up.buf.is_empty() {
                return Err(UpstreamError::StartTlsInjection);
            }
            let Stream::Tcp(tcp) = up.stream else {
                unreachable!("STARTTLS is only sent on a plain connection");
            };
            let tls = within(
                Phase::TlsHandshake,
                t.tls_handshake,
                connector.connect(server_name, tcp),
            )
            .await?;
            up.stream = Stream::ClientTls(Box::new(tls));
            // Everything learnt before TLS is forgotten (RFC 3207 section 4.2).
            up.capabilities = Capabilities::default();
            up.ehlo(target.ehlo_name).await?;
        }
        Ok(up)
    }

    /// Logs in with `AUTH XOAUTH2` after [`Upstream::handshake`].
    pub async fn authenticate(
        &mut self,
        mailbox: &str,
        token: &AccessToken,
    ) -> Result<(), UpstreamError> {
        if !self.capabilities.supports_auth("XOAUTH2") {
            return Err(UpstreamError::NoXoauth2 {
                offered: self.capabilities.auth.join(" "),
            });
        }
        self.auth_xoauth2(mailbox, token).await
    }

    /// The negotiated TLS version, e.g. `TLSv1_3`; `None` on a plain connection.
    pub fn tls_version(&self) -> Option<String> {
        match &self.stream {
            Stream::ClientTls(tls) => tls.get_ref().1.protocol_version().map(|v| format!("{v:?}")),
            _ => None,
        }
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// How long ago the connection was opened.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    async fn ehlo(&mut self, name: &str) -> Result<(), UpstreamError> {
        let line = format!("EHLO {name}\r\n");
        let reply = self.command_in(Phase::Ehlo, line.as_bytes()).await?;
        let reply = expect(Phase::Ehlo, reply, 250)?;
        self.capabilities = parse_ehlo(&reply);
        Ok(())
    }

    /// Two-step XOAUTH2: the bare command, the server's empty 334, then the credentials on a
    /// line of their own. Tokens run to several kilobytes, which an initial response on the
    /// AUTH line would push past command-line limits.
    async fn auth_xoauth2(
        &mut self,
        mailbox: &str,
        token: &AccessToken,
    ) -> Result<(), UpstreamError> {
        let reply = self.command_in(Phase::Auth, b"AUTH XOAUTH2\r\n").await?;
        expect(Phase::Auth, reply, 334)?;
        let response = crate::smtp::sasl::xoauth2_response(mailbox, token.secret.expose_secret());
        let mut line =
            zeroize::Zeroizing::new(Vec::with_capacity(response.expose_secret().len() + 2));
        line.extend_from_slice(response.expose_secret().as_bytes());
        line.extend_from_slice(b"\r\n");
        let mut reply = self.command_in(Phase::Auth, &line).await?;
        if reply.code() == 334 {
            // Gmail's error challenge (base64 JSON): an empty line fetches the final verdict.
            reply = self.command_in(Phase::Auth, b"\r\n").await?;
        }
        expect(Phase::Auth, reply, 235)?;
        Ok(())
    }

    /// Sends one command line (with its CRLF) and reads the reply; `phase` names the
    /// command in errors.
    pub async fn command(&mut self, phase: Phase, line: &[u8]) -> Result<Reply, UpstreamError> {
        self.command_in(phase, line).await
    }

    async fn command_in(&mut self, phase: Phase, line: &[u8]) -> Result<Reply, UpstreamError> {
        let limit = self.timeouts.upstream_command;
        self.write_all(phase, line).await?;
        self.read_reply(phase, limit).await
    }

    /// NOOP, answered within `limit` (shorter than a command's usual timeout: a pooled
    /// session slow to answer it is replaced rather than waited for).
    pub async fn noop(&mut self, limit: Duration) -> Result<Reply, UpstreamError> {
        let limit = limit.min(self.timeouts.upstream_command);
        self.write_all(Phase::Command, b"NOOP\r\n").await?;
        self.read_reply(Phase::Command, limit).await
    }

    /// Writes several pipelined command lines at once (the provider advertised PIPELINING);
    /// their replies are read one by one with [`Upstream::next_reply`].
    pub async fn send_pipelined(&mut self, lines: &[u8]) -> Result<(), UpstreamError> {
        self.write_all(Phase::Mail, lines).await
    }

    /// Reads the next reply, for commands sent with [`Upstream::send_pipelined`]; `phase`
    /// names the command it answers.
    pub async fn next_reply(&mut self, phase: Phase) -> Result<Reply, UpstreamError> {
        let limit = self.timeouts.upstream_command;
        self.read_reply(phase, limit).await
    }

    /// Whether an idle connection has stayed silent: nothing unread and nothing arriving now.
    /// A provider that timed the session out has sent a 421 or closed it; either shows up
    /// here without a round trip.
    pub fn is_quiet(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut probe = [0u8; 1];
        let mut read_buf = tokio::io::ReadBuf::new(&mut probe);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // Pending is the only good answer; data, EOF or an error all mean the provider is
        // done with this session.
        std::pin::Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut read_buf)
            .is_pending()
    }

    /// Writes message bytes during DATA: the parts in order, in as few TLS records as they
    /// fit, without gathering them into a buffer first.
    pub async fn write_data(&mut self, parts: &[&[u8]]) -> Result<(), UpstreamError> {
        self.write_parts(Phase::Data, parts).await
    }

    /// Writes the last message bytes and the final dot together, then waits (possibly
    /// minutes) for the provider's verdict on the message.
    pub async fn finish_data(&mut self, last: &[&[u8]]) -> Result<Reply, UpstreamError> {
        let mut parts = Vec::with_capacity(last.len() + 1);
        parts.extend_from_slice(last);
        parts.push(&b".\r\n"[..]);
        self.write_parts(Phase::DataEnd, &parts).await?;
        let limit = self.timeouts.upstream_data_end;
        self.read_reply(Phase::DataEnd, limit).await
    }

    async fn write_parts(&mut self, phase: Phase, parts: &[&[u8]]) -> Result<(), UpstreamError> {
        let limit = self.timeouts.upstream_command;
        let stream = &mut self.stream;
        within(phase, limit, async {
            let mut slices: Vec<std::io::IoSlice<'_>> =
                parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
            let mut slices = &mut slices[..];
            std::io::IoSlice::advance_slices(&mut slices, 0);
            while !slices.is_empty() {
                let n = stream.write_vectored(slices).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::WriteZero.into());
                }
                std::io::IoSlice::advance_slices(&mut slices, n);
            }
            stream.flush().await
        })
        .await
    }

    /// Says goodbye politely; errors do not matter any more at this point.
    pub async fn quit(mut self) {
        let limit = Duration::from_secs(5).min(self.timeouts.upstream_command);
        let _ = tokio::time::timeout(limit, async {
            if self.write_all(Phase::Command, b"QUIT\r\n").await.is_ok() {
                let _ = self.read_reply(Phase::Command, limit).await;
            }
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    async fn write_all(&mut self, phase: Phase, bytes: &[u8]) -> Result<(), UpstreamError> {
        let limit = self.timeouts.upstream_command;
        let stream = &mut self.stream;
        within(phase, limit, async {
            stream.write_all(bytes).await?;
            stream.flush().await
        })
        .await
    }

    async fn read_reply(&mut self, phase: Phase, limit: Duration) -> Result<Reply, UpstreamError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match parse_reply(&self.buf) {
                Ok(Some((reply, used))) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => return Err(UpstreamError::Protocol { phase, source }),
            }
            let start = self.buf.len();
            self.buf.resize(start + READ_CHUNK, 0);
            let read =
                tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf[start..])).await;
            let n = match read {
                Err(_) => {
                    self.buf.truncate(start);
                    return Err(UpstreamError::Timeout {
                        phase,
                        after: limit,
                    });
                }
                Ok(Err(source)) => {
                    self.buf.truncate(start);
                    return Err(UpstreamError::Io { phase, source });
                }
                Ok(Ok(n)) => n,
            };
            self.buf.truncate(start + n);
            if n == 0 {
                return Err(UpstreamError::Closed { phase });
            }
        }
    }
}

fn expect(phase: Phase, reply: Reply, code: u16) -> Result<Reply, UpstreamError> {
    if reply.code() == code {
        Ok(reply)
    } else {
        Err(UpstreamError::Rejected { phase, reply })
    }
}

async fn within<T>(
    phase: Phase,
    limit: Duration,
    fut: impl Future<Output = std::io::Result<T>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(UpstreamError::Timeout {
            phase,
            after: limit,
        }),
        Ok(Err(source)) => Err(UpstreamError::Io { phase, source }),
        Ok(Ok(v)) => Ok(v),
    }
}

/// `Reply` formatting for error messages: code plus text.
trait ReplyText {
    fn text_with_code(&self) -> String;
}

impl ReplyText for Reply {
    fn text_with_code(&self) -> String {
        format!("{} {}", self.code(), self.text())
    }
}
