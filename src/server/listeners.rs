//! SMTP listeners: binding the configured addresses or adopting sockets from systemd, and one
//! accept loop per listener that admits connections within the limits, opens a tracing span
//! per connection and spawns its session, with TLS first on implicit-TLS listeners.
//!
//! A client at the wrong kind of port is told so in one log line and closed at once: a TLS
//! ClientHello on a plain port (noticed by the session on its first read), or plaintext (or
//! silence: a plaintext client waits for a greeting) on an implicit-TLS port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use super::limits::Permit;
use super::{Shared, StartError, current, session};
use crate::io::Stream;

/// How clients on a listener start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain SMTP, with STARTTLS when a certificate is configured.
    Plain,
    /// TLS from the first byte (port 465 style).
    ImplicitTls,
}

/// What a plaintext client on an implicit-TLS port hears before the close.
const PLAINTEXT_ON_TLS_PORT: &[u8] =
    b"421 4.7.0 This port expects TLS from the first byte; use STARTTLS on the plain port\r\n";

pub(super) type Sessions = Arc<tokio::sync::Mutex<JoinSet<()>>>;

/// Session ids are unique for the life of the process, across listeners and reloads.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A bound listener not yet accepting.
pub(super) struct Bound {
    /// The `server.listen` (or `listen_implicit_tls`) entry it was bound for; `None` when it
    /// came from systemd.
    pub configured: Option<SocketAddr>,
    pub local: SocketAddr,
    pub kind: ListenerKind,
    listener: TcpListener,
}

/// A listener with its accept loop running.
pub(super) struct Acceptor {
    pub configured: Option<SocketAddr>,
    pub local: SocketAddr,
    pub kind: ListenerKind,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Acceptor {
    /// Stops accepting and closes the socket.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Every configured listener with its kind.
pub(super) fn configured(config: &crate::config::Config) -> Vec<(SocketAddr, ListenerKind)> {
    let server = &config.server;
    let plain = server.listen.iter().map(|a| (*a, ListenerKind::Plain));
    let implicit = server
        .listen_implicit_tls
        .iter()
        .map(|a| (*a, ListenerKind::ImplicitTls));
    plain.chain(implicit).collect()
}

pub(super) async fn bind_all(
    addrs: &[(SocketAddr, ListenerKind)],
) -> Result<Vec<Bound>, StartError> {
    let mut listeners = Vec::new();
    for &(addr, kind) in addrs {
        match bind_one(addr) {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(address = %local, kind = ?kind, "listening for SMTP clients");
                listeners.push(Bound {
                    configured: Some(addr),
                    local,
                    kind,
                    listener,
                });
            }
            // A host with IPv6 switched off cannot bind [::1]; the default configuration lists
            // it, so carry on with IPv4 loopback instead of refusing to start.
            Err(e)
                if addr.is_ipv6()
                    && addrs.iter().any(|(a, _)| a.is_ipv4())
                    && ipv6_unavailable(&e) =>
            {
                tracing::warn!(address = %addr, error = %e, "IPv6 loopback unavailable; skipping it");
            }
            Err(source) => return Err(StartError::Bind { addr, source }),
        }
    }
    Ok(listeners)
}

/// Connections the kernel may hold for the accept loop. SMTP servers speak first: a client
/// whose connection overflowed a short queue (and was then completed by a SYN cookie) waits
/// for a greeting that never comes. The usual 128 was overrun by 1,000 clients connecting at
/// once; the kernel caps this at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Takes over sockets from systemd (plain SMTP). They are held to the rule configured
/// listeners are: beyond loopback only with `server.allow_non_loopback` and a certificate,
/// because clients send their password.
pub(super) fn adopt(
    inherited: Vec<std::net::TcpListener>,
    non_loopback_allowed: bool,
) -> Result<Vec<Bound>, StartError> {
    let mut listeners = Vec::new();
    for std_listener in inherited {
        let local = std_listener
            .local_addr()
            .map_err(|e| StartError::Inherited(format!("socket from systemd: {e}")))?;
        if !crate::config::is_loopback(local.ip()) && !non_loopback_allowed {
            return Err(StartError::Inherited(format!(
                "socket from systemd on {local} is not a loopback address; clients send their \
                 password over it, so ListenStream= must be 127.0.0.1 or [::1], or proxy.toml \
                 needs server.allow_non_loopback = true and a certificate (tls.certificate_file)"
            )));
        }
        std_listener
            .set_nonblocking(true)
            .map_err(|e| StartError::Inherited(format!("socket from systemd on {local}: {e}")))?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| StartError::Inherited(format!("socket from systemd on {local}: {e}")))?;
        tracing::info!(address = %local, "listening for SMTP clients (socket from systemd)");
        listeners.push(Bound {
            configured: None,
            local,
            kind: ListenerKind::Plain,
            listener,
        });
    }
    Ok(listeners)
}

/// Runs the accept loop of `bound` until stopped. Each connection gets the state current when
/// it is accepted.
pub(super) fn spawn(
    bound: Bound,
    current_state: &Arc<RwLock<Arc<Shared>>>,
    sessions: &Sessions,
) -> Acceptor {
    let (stop_tx, mut stop) = oneshot::channel::<()>();
    let state = current_state.clone();
    let sessions = sessions.clone();
    let listener = bound.listener;
    let kind = bound.kind;
    let task = tokio::spawn(async move {
        let mut refusals = RefusalLog::default();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                        let shared = current(&state);
                        spawn_session(shared, &sessions, tcp, peer, id, kind, &mut refusals)
                            .await;
                    }
                    Err(e) => {
                        // Usually out of file descriptors: wait a little rather than spin,
                        // and keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    });
    Acceptor {
        configured: bound.configured,
        local: bound.local,
        kind: bound.kind,
        stop: stop_tx,
        task,
    }
}

/// How often a listener warns about connections refused for the limits. A flood of them,
/// which is what the limits are for, would otherwise write a warning per connection.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// One listener's record of refused connections since its last warning.
#[derive(Default)]
struct RefusalLog {
    last_warning: Option<tokio::time::Instant>,
    since: u64,
}

impl RefusalLog {
    /// Warns for the first refusal and then at most once per [`REFUSAL_WARNING_EVERY`],
    /// counting the refusals in between; those are logged at debug level.
    fn refused(&mut self, limit: crate::server::limits::Refused) {
        let now = tokio::time::Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < REFUSAL_WARNING_EVERY)
        {
            self.since += 1;
            tracing::debug!(limit = ?limit, "connection refused: too many connections");
            return;
        }
        tracing::warn!(
            limit = ?limit,
            refused_since_last_warning = self.since,
            warned_every_s = REFUSAL_WARNING_EVERY.as_secs(),
            "connection refused: too many connections (one warning per listener per period; \
             refused_since_last_warning counts the others)"
        );
        self.last_warning = Some(now);
        self.since = 0;
    }
}

async fn spawn_session(
    shared: Arc<Shared>,
    sessions: &Sessions,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    kind: ListenerKind,
    refusals: &mut RefusalLog,
) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("session", id = format_args!("{id:06x}"), client = %peer, account = tracing::field::Empty);
    let permit = match shared.guard.admit(peer.ip()) {
        Ok(permit) => permit,
        Err(refused) => {
            span.in_scope(|| refusals.refused(refused));
            shared.metrics.connection_refused(refused.label());
            // Outside the session set: a refusal must not hold up a drain.
            tokio::spawn(say_and_close(tcp, refused.reply()));
            return;
        }
    };
    let counted = shared.metrics.connection_opened();
    let mut set = sessions.lock().await;
    // Reap finished sessions so the set does not grow with every connection ever made.
    while set.try_join_next().is_some() {}
    set.spawn(
        async move {
            serve_connection(shared, tcp, peer, kind, permit).await;
            drop(counted);
        }
        .instrument(span),
    );
}

async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
    permit: Permit,
) {
    let stream = match kind {
        ListenerKind::Plain => Stream::Tcp(tcp),
        ListenerKind::ImplicitTls => match implicit_tls(&shared, tcp).await {
            Some(stream) => stream,
            None => return,
        },
    };
    session::Session::new(shared, stream, peer).run().await;
    drop(permit);
}

/// The TLS handshake of an implicit-TLS connection, refusing clients that speak plaintext.
async fn implicit_tls(shared: &Shared, tcp: TcpStream) -> Option<Stream> {
    let config = &shared.config;
    let local_tls = config.local_tls.as_ref()?;
    let limit = config.timeouts.tls_handshake;
    // One deadline for the ClientHello to start and the handshake to finish.
    let deadline = tokio::time::Instant::now() + limit;
    let mut first = [0u8; 1];
    match tokio::time::timeout_at(deadline, tcp.peek(&mut first)).await {
        Ok(Ok(0)) | Ok(Err(_)) => return None,
        Ok(Ok(_)) if !crate::smtp::command::looks_like_tls(&first) => {
            tracing::warn!(
                "client sent plaintext to an implicit-TLS port; configure it for TLS \
                 (SSL, port 465 style), or point it at a plain listen address; connection closed"
            );
            say_and_close(tcp, PLAINTEXT_ON_TLS_PORT).await;
            return None;
        }
        Ok(Ok(_)) => {}
        Err(_) => {
            tracing::warn!(
                wait_s = limit.as_secs(),
                "no TLS handshake on an implicit-TLS port (a plaintext client waiting for a \
                 greeting?); connection closed"
            );
            say_and_close(tcp, PLAINTEXT_ON_TLS_PORT).await;
            return None;
        }
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(local_tls.server_config.clone());
    match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(Stream::ServerTls(Box::new(tls))),
        Ok(Err(e)) => {
            tracing::info!(error = %e, "TLS handshake with the client failed");
            None
        }
        Err(_) => {
            tracing::info!(
                after = %crate::upstream::human(limit),
                "TLS handshake with the client timed out"
            );
            None
        }
    }
}

/// One line to a client that is not going to be served, then the close.
async fn say_and_close(mut tcp: TcpStream, line: &'static [u8]) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tcp.write_all(line).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(97 | 99)) // EAFNOSUPPORT, EADDRNOTAVAIL
}
