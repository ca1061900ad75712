//! SMTP listeners: binding the configured addresses or adopting sockets from systemd, and one
//! accept loop per listener that opens a tracing span per connection and spawns its session.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use super::{Shared, StartError, current, session};
use crate::io::Stream;

pub(super) type Sessions = Arc<tokio::sync::Mutex<JoinSet<()>>>;

/// Session ids are unique for the life of the process, across listeners and reloads.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A bound listener not yet accepting.
pub(super) struct Bound {
    /// The `server.listen` entry it was bound for; `None` when it came from systemd.
    pub configured: Option<SocketAddr>,
    pub local: SocketAddr,
    listener: TcpListener,
}

/// A listener with its accept loop running.
pub(super) struct Acceptor {
    pub configured: Option<SocketAddr>,
    pub local: SocketAddr,
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

pub(super) async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<Bound>, StartError> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let local = listener.local_addr().unwrap_or(addr);
                tracing::info!(address = %local, "listening for SMTP clients");
                listeners.push(Bound {
                    configured: Some(addr),
                    local,
                    listener,
                });
            }
            // A host with IPv6 switched off cannot bind [::1]; the default configuration lists
            // it, so carry on with IPv4 loopback instead of refusing to start.
            Err(e)
                if addr.is_ipv6() && addrs.iter().any(|a| a.is_ipv4()) && ipv6_unavailable(&e) =>
            {
                tracing::warn!(address = %addr, error = %e, "IPv6 loopback unavailable; skipping it");
            }
            Err(source) => return Err(StartError::Bind { addr, source }),
        }
    }
    Ok(listeners)
}

/// Takes over sockets from systemd. They must be on loopback for the same reason configured
/// listeners must: clients send their password in clear text.
pub(super) fn adopt(inherited: Vec<std::net::TcpListener>) -> Result<Vec<Bound>, StartError> {
    let mut listeners = Vec::new();
    for std_listener in inherited {
        let local = std_listener
            .local_addr()
            .map_err(|e| StartError::Inherited(format!("socket from systemd: {e}")))?;
        if !local.ip().is_loopback() {
            return Err(StartError::Inherited(format!(
                "socket from systemd on {local} is not a loopback address; clients send their \
                 password in clear text, so ListenStream= must be 127.0.0.1 or [::1]"
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
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                        spawn_session(current(&state), &sessions, tcp, peer, id).await;
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
        stop: stop_tx,
        task,
    }
}

async fn spawn_session(
    shared: Arc<Shared>,
    sessions: &Sessions,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    id: u64,
) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("session", id = format_args!("{id:06x}"), client = %peer, account = tracing::field::Empty);
    let counted = shared.metrics.connection_opened();
    let session = session::Session::new(shared, Stream::Tcp(tcp));
    let mut set = sessions.lock().await;
    // Reap finished sessions so the set does not grow with every connection ever made.
    while set.try_join_next().is_some() {}
    set.spawn(
        async move {
            session.run().await;
            drop(counted);
        }
        .instrument(span),
    );
}

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(97 | 99)) // EAFNOSUPPORT, EADDRNOTAVAIL
}
