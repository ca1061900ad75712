//! An Office365-like SMTP submission server: STARTTLS on a plain listener (like port 587) or
//! TLS from the first byte, AUTH XOAUTH2 checked against the [`TokenRegistry`], messages kept
//! in memory and optionally written to a folder, and [`Behaviour`] switches that make it
//! misbehave the ways the real service does (PROTOCOL.md §1.3–1.6).
//!
//! This file owns the public face (config, records, listener, mail folder); the per-connection
//! state machine lives in `smtp_session`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument as _;

use crate::sandbox::clock::{UtcDateTime, unix_millis};
use crate::sandbox::smtp_session::{self, PhaseEnd};
use crate::sandbox::wire::Wire;
use crate::sandbox::{IDLE_TIMEOUT, TokenRegistry, bind_loopback};

/// Office365's advertised limit, 150 MiB (PROTOCOL.md §1.3).
pub const DEFAULT_MAX_SIZE: u64 = 157_286_400;
/// A long-running sandbox must not keep every message forever; older ones stay on disk only.
const MAX_MESSAGES_IN_MEMORY: usize = 1_000;
const MAX_AUTH_ATTEMPTS_IN_MEMORY: usize = 10_000;

/// How the server presents itself.
#[derive(Debug, Clone)]
pub struct Office365Config {
    /// Appears in the greeting, EHLO and replies.
    pub hostname: String,
    /// If set, every accepted message is written there (`.eml` plus a `.json` envelope).
    pub mail_dir: Option<PathBuf>,
    /// Advertised as SIZE and enforced with `552 5.3.4`.
    pub max_size: u64,
}

impl Default for Office365Config {
    fn default() -> Self {
        Office365Config {
            hostname: "SANDBOX01.outlook.office365.com".to_string(),
            mail_dir: None,
            max_size: DEFAULT_MAX_SIZE,
        }
    }
}

/// A message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub mail_from: String,
    /// Raw parameter text after the reverse-path (`SIZE=123 BODY=8BITMIME`), trimmed.
    pub mail_params: String,
    pub rcpt_to: Vec<String>,
    /// The message exactly as received, after dot-unstuffing, without the terminator.
    pub data: Vec<u8>,
    /// The `user=` of the XOAUTH2 exchange that authenticated the session.
    pub auth_user: String,
    pub queue_id: String,
}

/// One AUTH exchange that got as far as a response.
///
/// `token` keeps the bearer token as received so tests can check which token the bridge
/// sent (for instance the refreshed one). That is acceptable only because every token here
/// was minted by the sandbox and is worthless elsewhere; `Debug` still redacts it, and it is
/// empty for LOGIN (the password is never kept) and for undecodable responses.
#[derive(Clone)]
pub struct AuthAttempt {
    /// `XOAUTH2` or `LOGIN`.
    pub mechanism: String,
    /// Bare AUTH, then `334`, then the response on its own line.
    pub two_step: bool,
    pub user: Option<String>,
    /// The registry accepted the token for this user.
    pub token_ok: bool,
    /// Octets in the line that carried the response, without CRLF (for the inline form,
    /// the whole AUTH command line).
    pub response_line_len: usize,
    pub token: String,
}

impl fmt::Debug for AuthAttempt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthAttempt")
            .field("mechanism", &self.mechanism)
            .field("two_step", &self.two_step)
            .field("user", &self.user)
            .field("token_ok", &self.token_ok)
            .field("response_line_len", &self.response_line_len)
            .field("token", &"[redacted]")
            .finish()
    }
}

/// Switches that tests flip at run time. Reply overrides are full reply text; multi-line
/// replies are given as their complete lines separated by `"\r\n"`.
#[derive(Debug, Default, Clone)]
pub struct Behaviour {
    /// Replaces the reply after the XOAUTH2 response. The session counts as authenticated
    /// only if this reply is positive (2xx).
    pub auth_reply: Option<String>,
    /// Replaces the reply to MAIL; a 2xx override still opens the transaction.
    pub mail_reply: Option<String>,
    /// Replaces the reply to RCPT; a 2xx override still adds the recipient.
    pub rcpt_reply: Option<String>,
    /// Replaces the reply to DATA; data is read only if the override is a 354.
    pub data_reply: Option<String>,
    /// Replaces the reply after the message (DATA's final dot or BDAT LAST); the message is
    /// stored only if the override is 2xx.
    pub end_of_data_reply: Option<String>,
    /// Close the socket after reading some message bytes, never replying.
    pub drop_during_data: bool,
    /// Send `220 2.0.0 SMTP server ready\r\n250 injected\r\n` in one write after STARTTLS
    /// (a careful client must refuse to go on).
    pub inject_after_starttls_220: bool,
    /// Wait this long before every reply.
    pub reply_delay: Duration,
    /// Wait this long before the reply of one stage only.
    pub stage_delay: Option<(Stage, Duration)>,
    /// Close the connection without a reply when this stage's command (or, for
    /// [`Stage::EndOfData`], the whole message) has arrived.
    pub drop_at: Option<Stage>,
    /// Like `drop_at`, once: the first connection that reaches the stage is dropped and the
    /// switch turns itself off.
    pub drop_once_at: Option<Stage>,
    /// Close connections idle this long with `421 4.4.1 Connection timed out` (default 60
    /// seconds); read when a connection is accepted.
    pub idle_timeout: Option<Duration>,
    /// Close the connection right after accepting a message, as a provider cutting old or
    /// idle sessions does; the client learns it only when it next sends a command.
    pub close_after_message: bool,
    /// Office365 allows 3 concurrent authenticated sessions per mailbox; beyond this number
    /// the AUTH response gets `432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`.
    pub max_concurrent_sessions_per_user: Option<usize>,
    /// Reply `554 5.2.252 SendAsDenied` after the data when MAIL FROM is not the
    /// authenticated user (PROTOCOL.md §1.6). Off by default.
    pub enforce_send_as: bool,
}

/// The stages of a session that [`Behaviour`] can single out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// The DATA command (its 354).
    Data,
    /// The reply after the message's final dot (or BDAT LAST).
    EndOfData,
    /// Any other command.
    Other,
}

impl Stage {
    pub(crate) fn of_verb(verb: &str) -> Stage {
        match verb {
            "EHLO" | "HELO" => Stage::Ehlo,
            "STARTTLS" => Stage::StartTls,
            "AUTH" => Stage::Auth,
            "MAIL" => Stage::Mail,
            "RCPT" => Stage::Rcpt,
            "DATA" | "BDAT" => Stage::Data,
            _ => Stage::Other,
        }
    }
}

/// A running Office365 stand-in on `127.0.0.1`. Dropping it stops the server.
pub struct Office365 {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_task: JoinHandle<()>,
}

impl Office365 {
    /// Serve plain SMTP with STARTTLS, as on port 587.
    pub async fn start(
        tls: Arc<rustls::ServerConfig>,
        registry: Arc<TokenRegistry>,
        config: Office365Config,
    ) -> io::Result<Office365> {
        Office365::start_with(tls, registry, config, false).await
    }

    /// Serve SMTP inside TLS from the first byte, as on port 465.
    pub async fn start_implicit_tls(
        tls: Arc<rustls::ServerConfig>,
        registry: Arc<TokenRegistry>,
        config: Office365Config,
    ) -> io::Result<Office365> {
        Office365::start_with(tls, registry, config, true).await
    }

    async fn start_with(
        tls: Arc<rustls::ServerConfig>,
        registry: Arc<TokenRegistry>,
        config: Office365Config,
        implicit_tls: bool,
    ) -> io::Result<Office365> {
        let (listener, addr) = bind_loopback().await?;
        let acceptor = TlsAcceptor::from(tls);
        let shared = Arc::new(Shared {
            registry,
            config,
            behaviour: Mutex::new(Behaviour::default()),
            messages: Mutex::new(VecDeque::new()),
            auth_attempts: Mutex::new(VecDeque::new()),
            commands: Mutex::new(VecDeque::new()),
            pipelined: Mutex::new(Vec::new()),
            sessions: AtomicUsize::new(0),
            data_octets: AtomicU64::new(0),
            senders: Mutex::new(HashMap::new()),
        });

        let serve_shared = Arc::clone(&shared);
        let accept_task = crate::sandbox::spawn_accept_loop(listener, move |stream, peer| {
            serve_shared.sessions.fetch_add(1, Ordering::SeqCst);
            let shared = Arc::clone(&serve_shared);
            let acceptor = acceptor.clone();
            let span = tracing::debug_span!("sandbox_office365", %peer);
            async move { serve_connection(shared, acceptor, stream, peer, implicit_tls).await }
                .instrument(span)
        });
        tracing::debug!(%addr, implicit_tls, "sandbox Office365 listening");
        Ok(Office365 {
            addr,
            shared,
            accept_task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Messages accepted so far (the most recent 1,000), oldest first.
    pub fn messages(&self) -> Vec<StoredMessage> {
        lock(&self.shared.messages).iter().cloned().collect()
    }

    /// AUTH exchanges so far, oldest first.
    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        lock(&self.shared.auth_attempts).iter().cloned().collect()
    }

    /// Command lines received so far, oldest first, without their line end; AUTH lines and
    /// SASL responses are reduced to `AUTH <mechanism>`.
    pub fn commands(&self) -> Vec<String> {
        lock(&self.shared.commands).iter().cloned().collect()
    }

    /// Commands that arrived in the same read as the command before them: the client sent
    /// them without waiting for the reply (pipelining). Recorded like [`Office365::commands`].
    pub fn pipelined_commands(&self) -> Vec<String> {
        lock(&self.shared.pipelined).clone()
    }

    /// Connections accepted so far.
    pub fn sessions(&self) -> usize {
        self.shared.sessions.load(Ordering::SeqCst)
    }

    /// Octets of DATA read so far, over all sessions, as they arrive: a message still being
    /// sent counts too, so a test can see whether a client streams or holds the message back.
    pub fn data_octets_received(&self) -> u64 {
        self.shared.data_octets.load(Ordering::SeqCst)
    }

    /// The live behaviour switches. Do not hold the guard across an `.await`.
    pub fn behaviour(&self) -> MutexGuard<'_, Behaviour> {
        lock(&self.shared.behaviour)
    }

    /// Replace all behaviour switches at once.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    pub fn config(&self) -> &Office365Config {
        &self.shared.config
    }

    /// Stop accepting and drop open sessions (dropping the server does the same).
    pub fn shutdown(self) {}
}

impl Drop for Office365 {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl fmt::Debug for Office365 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Office365")
            .field("addr", &self.addr)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// State shared by the listener, every session and the test-facing accessors.
pub(crate) struct Shared {
    registry: Arc<TokenRegistry>,
    pub(crate) config: Office365Config,
    behaviour: Mutex<Behaviour>,
    messages: Mutex<VecDeque<StoredMessage>>,
    auth_attempts: Mutex<VecDeque<AuthAttempt>>,
    commands: Mutex<VecDeque<String>>,
    pipelined: Mutex<Vec<String>>,
    sessions: AtomicUsize,
    /// Octets read while receiving DATA, counted as they arrive, finished message or not.
    pub(crate) data_octets: AtomicU64,
    /// Authenticated sessions per mailbox (lower-cased), for the concurrency limit.
    senders: Mutex<HashMap<String, usize>>,
}

impl Shared {
    /// A copy of the switches, so no lock is held while a session works.
    pub(crate) fn behaviour(&self) -> Behaviour {
        lock(&self.behaviour).clone()
    }

    /// How long to wait before a reply at `stage`.
    /// Whether `drop_once_at` fires at `stage`; it is switched off when it does.
    pub(crate) fn take_drop_once(&self, stage: Stage) -> bool {
        let mut behaviour = lock(&self.behaviour);
        let fires = behaviour.drop_once_at == Some(stage);
        if fires {
            behaviour.drop_once_at = None;
        }
        fires
    }

    pub(crate) fn reply_delay(&self, stage: Stage) -> Duration {
        let behaviour = lock(&self.behaviour);
        match behaviour.stage_delay {
            Some((slow, extra)) if slow == stage => behaviour.reply_delay + extra,
            _ => behaviour.reply_delay,
        }
    }

    /// `pipelined`: the line was already buffered when the previous one was read.
    pub(crate) fn record_command(&self, line: String, pipelined: bool) {
        if pipelined {
            let mut batched = lock(&self.pipelined);
            if batched.len() < MAX_AUTH_ATTEMPTS_IN_MEMORY {
                batched.push(line.clone());
            }
        }
        let mut commands = lock(&self.commands);
        if commands.len() >= MAX_AUTH_ATTEMPTS_IN_MEMORY {
            commands.pop_front();
        }
        commands.push_back(line);
    }

    pub(crate) fn record_attempt(&self, attempt: AuthAttempt) {
        let mut attempts = lock(&self.auth_attempts);
        if attempts.len() >= MAX_AUTH_ATTEMPTS_IN_MEMORY {
            attempts.pop_front();
        }
        attempts.push_back(attempt);
    }

    /// Whether Office365 would take `token` for `user`: issued by the sandbox, unexpired,
    /// meant for Exchange Online's SMTP, and (for delegated tokens) issued to that mailbox.
    /// App-only tokens may send as any mailbox, as SendAs grants allow (PROTOCOL.md §2.3).
    pub(crate) fn bearer_accepted(&self, user: &str, token: &str) -> bool {
        let Some(issued) = self.registry.lookup(token) else {
            return false;
        };
        if Instant::now() >= issued.expires_at || !scope_allows_smtp(&issued.scope) {
            return false;
        }
        match &issued.subject {
            Some(subject) => subject.eq_ignore_ascii_case(user),
            None => true,
        }
    }

    /// Count an authenticated session for `user`, unless `limit` sessions already are.
    pub(crate) fn try_acquire_sender(
        self: &Arc<Self>,
        user: &str,
        limit: Option<usize>,
    ) -> Option<SenderSlot> {
        let key = user.to_ascii_lowercase();
        let mut senders = lock(&self.senders);
        let active = senders.entry(key.clone()).or_insert(0);
        if limit.is_some_and(|limit| *active >= limit) {
            return None;
        }
        *active += 1;
        Some(SenderSlot {
            shared: Arc::clone(self),
            key,
        })
    }

    /// Keep a message in memory and, when configured, in the mail folder.
    pub(crate) async fn store(&self, message: StoredMessage) -> io::Result<()> {
        if let Some(dir) = &self.config.mail_dir {
            write_to_mail_dir(dir, &message).await?;
        }
        let mut messages = lock(&self.messages);
        if messages.len() >= MAX_MESSAGES_IN_MEMORY {
            messages.pop_front();
        }
        messages.push_back(message);
        Ok(())
    }
}

/// One authenticated session counted against its mailbox; released on drop.
pub(crate) struct SenderSlot {
    shared: Arc<Shared>,
    key: String,
}

impl Drop for SenderSlot {
    fn drop(&mut self) {
        let mut senders = lock(&self.shared.senders);
        if let Some(active) = senders.get_mut(&self.key) {
            *active = active.saturating_sub(1);
            if *active == 0 {
                senders.remove(&self.key);
            }
        }
    }
}

/// Delegated tokens carry `https://outlook.office.com/SMTP.Send` (or the office365.com
/// spelling, PROTOCOL.md §2.2); app-only tokens carry `https://outlook.office365.com/.default`.
/// Any other audience, such as Microsoft Graph, is the wrong resource and is refused.
fn scope_allows_smtp(scope: &str) -> bool {
    scope.split_whitespace().any(|item| {
        let item = item.to_ascii_lowercase();
        let exchange = item.starts_with("https://outlook.office.com/")
            || item.starts_with("https://outlook.office365.com/");
        exchange
            && (item.ends_with("/.default")
                || item.ends_with("/smtp.send")
                || item.ends_with("/smtp.sendasapp"))
    })
}

async fn serve_connection(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
) {
    let idle = shared.behaviour().idle_timeout.unwrap_or(IDLE_TIMEOUT);
    if implicit_tls {
        if let Some(tls) = handshake(&acceptor, stream).await {
            let wire = Wire::new(tls, idle);
            // STARTTLS is refused inside TLS, so this phase can only end the session.
            let _ = smtp_session::run(&shared, wire, peer, true, true).await;
        }
        return;
    }

    let wire = Wire::new(stream, idle);
    if let PhaseEnd::StartTls(stream) = smtp_session::run(&shared, wire, peer, false, true).await
        && let Some(tls) = handshake(&acceptor, stream).await
    {
        let wire = Wire::new(tls, idle);
        let _ = smtp_session::run(&shared, wire, peer, true, false).await;
    }
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(IDLE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(error)) => {
            tracing::debug!(%error, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// The `.json` written beside each `.eml`.
#[derive(Serialize)]
struct Envelope<'a> {
    mail_from: &'a str,
    rcpt_to: &'a [String],
    auth_user: &'a str,
    mail_params: &'a str,
    queue_id: &'a str,
    received_at: String,
    size: usize,
}

/// Write `<millis>-<queue-id>.json` and then `.eml`, each through a temporary file and a
/// rename: a reader that sees the `.eml` finds it complete and its envelope already there.
async fn write_to_mail_dir(dir: &Path, message: &StoredMessage) -> io::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    let millis = unix_millis();
    let stem = format!("{millis}-{}", message.queue_id);
    let envelope = Envelope {
        mail_from: &message.mail_from,
        rcpt_to: &message.rcpt_to,
        auth_user: &message.auth_user,
        mail_params: &message.mail_params,
        queue_id: &message.queue_id,
        received_at: UtcDateTime::from_unix_millis(millis).rfc3339(),
        size: message.data.len(),
    };
    let json = serde_json::to_vec_pretty(&envelope).map_err(io::Error::other)?;
    write_atomically(&dir.join(format!("{stem}.json")), &json).await?;
    write_atomically(&dir.join(format!("{stem}.eml")), &message.data).await
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    tokio::fs::write(&temporary, bytes).await?;
    tokio::fs::rename(&temporary, path).await
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smtp_scopes() {
        assert!(scope_allows_smtp("https://outlook.office365.com/.default"));
        assert!(scope_allows_smtp("https://outlook.office.com/SMTP.Send"));
        assert!(scope_allows_smtp(
            "offline_access https://outlook.office365.com/SMTP.Send"
        ));
        assert!(!scope_allows_smtp("https://graph.microsoft.com/SMTP.Send"));
        assert!(!scope_allows_smtp("https://graph.microsoft.com/.default"));
        assert!(!scope_allows_smtp("SMTP.Send"));
        assert!(!scope_allows_smtp(""));
    }
}
