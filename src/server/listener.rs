//! The listeners: binding them, accepting connections within the connection limits, and
//! starting a session for each, with TLS first on implicit-TLS listeners.
//!
//! A client at the wrong kind of port is told so in one log line and closed at once: a TLS
//! ClientHello on a plain port (noticed by the session on its first read), or plaintext (or
//! silence: a plaintext client waits for a greeting) on an implicit-TLS port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::Instrument;

use super::limits::Permit;
use super::{Shared, StartError, session};
use crate::io::Stream;

/// How clients on a listener start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain SMTP, with STARTTLS when a certificate is configured.
    Plain,
    /// TLS from the first byte (port 465 style).
    ImplicitTls,
}

pub struct Listener {
    pub tcp: TcpListener,
    pub kind: ListenerKind,
}

/// What a plaintext client on an implicit-TLS port hears before the close.
const PLAINTEXT_ON_TLS_PORT: &[u8] =
    b"421 4.7.0 This port expects TLS from the first byte; use STARTTLS on the plain port\r\n";

/// Accepts on one listener until `stop` fires.
pub(super) async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    sessions: Arc<tokio::sync::Mutex<JoinSet<()>>>,
    next_id: Arc<AtomicU64>,
    mut stop: tokio::sync::broadcast::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = stop.recv() => break,
            accepted = listener.tcp.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    spawn_session(&shared, &sessions, tcp, peer, id, listener.kind).await;
                }
                Err(e) => {
                    // Usually out of file descriptors: wait a little rather than spin, and
                    // keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn spawn_session(
    shared: &Arc<Shared>,
    sessions: &Arc<tokio::sync::Mutex<JoinSet<()>>>,
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    kind: ListenerKind,
) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("session", id = format_args!("{id:06x}"), client = %peer, account = tracing::field::Empty);
    let mut set = sessions.lock().await;
    // Reap finished sessions so the set does not grow with every connection ever made.
    while set.try_join_next().is_some() {}
    match shared.guard.admit(peer.ip()) {
        Ok(permit) => {
            let shared = shared.clone();
            set.spawn(serve_connection(shared, tcp, peer, kind, permit).instrument(span));
        }
        Err(refused) => {
            span.in_scope(|| {
                tracing::warn!(limit = ?refused, "connection refused: too many connections");
            });
            // Outside the session set: a refusal must not wait for a drain.
            tokio::spawn(async move {
                let mut tcp = tcp;
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    let _ = tcp.write_all(refused.reply()).await;
                    let _ = tcp.shutdown().await;
                })
                .await;
            });
        }
    }
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
            refuse_plaintext(tcp).await;
            return None;
        }
        Ok(Ok(_)) => {}
        Err(_) => {
            tracing::warn!(
                wait_s = limit.as_secs(),
                "no TLS handshake on an implicit-TLS port (a plaintext client waiting for a \
                 greeting?); connection closed"
            );
            refuse_plaintext(tcp).await;
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
                after_s = limit.as_secs(),
                "TLS handshake with the client timed out"
            );
            None
        }
    }
}

async fn refuse_plaintext(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let _ = tcp.write_all(PLAINTEXT_ON_TLS_PORT).await;
        let _ = tcp.shutdown().await;
    })
    .await;
}

pub(super) async fn bind_all(
    plain: &[SocketAddr],
    implicit_tls: &[SocketAddr],
) -> Result<Vec<Listener>, StartError> {
    let all: Vec<SocketAddr> = plain.iter().chain(implicit_tls).copied().collect();
    let mut listeners = Vec::new();
    for (addrs, kind) in [
        (plain, ListenerKind::Plain),
        (implicit_tls, ListenerKind::ImplicitTls),
    ] {
        for &addr in addrs {
            match TcpListener::bind(addr).await {
                Ok(tcp) => {
                    let bound = tcp.local_addr().unwrap_or(addr);
                    tracing::info!(address = %bound, kind = ?kind, "listening for SMTP clients");
                    listeners.push(Listener { tcp, kind });
                }
                // A host with IPv6 switched off cannot bind [::1]; the default configuration
                // lists it, so carry on with IPv4 loopback instead of refusing to start.
                Err(e)
                    if addr.is_ipv6()
                        && all.iter().any(|a| a.is_ipv4())
                        && ipv6_unavailable(&e) =>
                {
                    tracing::warn!(address = %addr, error = %e, "IPv6 loopback unavailable; skipping it");
                }
                Err(source) => return Err(StartError::Bind { addr, source }),
            }
        }
    }
    Ok(listeners)
}

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(97 | 99)) // EAFNOSUPPORT, EADDRNOTAVAIL
}
