//! The daemon's serving side: start-up (sandbox, token store, TLS, the token manager and its
//! refresh task), the listeners, the accept loop with one tracing span per connection, and
//! shutdown.

pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::config::{Config, Provider};
use crate::io::Stream;
use crate::oauth::endpoint::Http;
use crate::oauth::{HttpTokenSource, TokenManager};
use crate::sandbox::Sandbox;
use crate::store::Store;

/// What every session shares: read-only after start-up.
pub struct Shared {
    pub config: Config,
    pub tokens: TokenManager,
    pub tls_client: Arc<rustls::ClientConfig>,
}

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot start the sandbox: {0}")]
    Sandbox(String),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A started bridge: listeners bound, ready to serve.
pub struct Bridge {
    shared: Arc<Shared>,
    listeners: Vec<TcpListener>,
    /// Kept alive for as long as the bridge runs.
    sandbox: Option<Sandbox>,
}

impl Bridge {
    /// Prepares everything that can fail before the first client connects: the sandbox
    /// stand-ins, the token store, TLS, and the listeners.
    pub async fn start(mut config: Config) -> Result<Bridge, StartError> {
        let mut extra_roots = Vec::new();
        let mail_dir = config.sandbox.as_ref().map(|s| s.mail_dir.clone());
        let sandbox = match mail_dir {
            Some(mail_dir) => {
                let sandbox = start_sandbox(&mut config, &mail_dir).await?;
                extra_roots.push(sandbox.ca.ca_der());
                Some(sandbox)
            }
            None => None,
        };
        for identity in &config.identities {
            tracing::info!(
                identity = %identity.name,
                provider = ?identity.provider,
                flow = %identity.oauth.flow,
                credential = identity.oauth.credential.kind(),
                upstream = %format!("{}:{}", identity.upstream.host, identity.upstream.port),
                accounts = config.accounts_of(&identity.name).count(),
                "identity configured"
            );
        }
        let tls_client = crate::tls::client_config(config.extra_ca_file.as_deref(), extra_roots)?;
        let store = Arc::new(Store::open(&config.store.directory)?);
        let http =
            Http::new(&tls_client, config.timeouts.token_request).map_err(StartError::Other)?;
        let tokens = TokenManager::new(
            &config.identities,
            Arc::new(HttpTokenSource::new(http)),
            Some(store),
            config.tokens.clone(),
        );

        let listeners = bind_all(&config.server.listen).await?;
        Ok(Bridge {
            shared: Arc::new(Shared {
                config,
                tokens,
                tls_client,
            }),
            listeners,
            sandbox,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes, then stops accepting and gives sessions in flight
    /// `grace` to finish before they are cut off.
    pub async fn serve(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let sessions = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let next_id = Arc::new(AtomicU64::new(1));
        let mut accept_tasks = JoinSet::new();
        for listener in self.listeners {
            let shared = self.shared.clone();
            let sessions = sessions.clone();
            let next_id = next_id.clone();
            let mut stop = stop_tx.subscribe();
            accept_tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.recv() => break,
                        accepted = listener.accept() => match accepted {
                            Ok((tcp, peer)) => {
                                let id = next_id.fetch_add(1, Ordering::Relaxed);
                                spawn_session(&shared, &sessions, tcp, peer, id).await;
                            }
                            Err(e) => {
                                // Usually out of file descriptors: wait a little rather than
                                // spin, and keep serving.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
            });
        }

        shutdown.await;
        tracing::info!("shutting down: no new connections");
        let _ = stop_tx.send(());
        while accept_tasks.join_next().await.is_some() {}

        let mut sessions = sessions.lock().await;
        let drain = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(grace, drain).await.is_err() {
            tracing::warn!(
                grace_s = grace.as_secs(),
                "sessions still open after the grace period; closing them"
            );
            sessions.abort_all();
        }
        self.shared
            .tokens
            .shutdown(self.shared.config.timeouts.token_request)
            .await;
        drop(self.sandbox);
    }
}

/// Starts the stand-ins and points the sandbox identities at them.
async fn start_sandbox(
    config: &mut Config,
    mail_dir: &std::path::Path,
) -> Result<Sandbox, StartError> {
    let sandbox = Sandbox::start(Some(mail_dir.to_path_buf()))
        .await
        .map_err(|e| StartError::Sandbox(e.to_string()))?;
    let token_url = sandbox.token_endpoint.token_url(&sandbox.tenant);
    let secret = secrecy::SecretString::from(sandbox.client_secret.clone());
    for identity in config
        .identities
        .iter_mut()
        .filter(|i| i.provider == Provider::Sandbox)
    {
        let Some(identity) = Arc::get_mut(identity) else {
            return Err(StartError::Other(
                "sandbox identity shared before start".into(),
            ));
        };
        identity.bind_sandbox(
            token_url.clone(),
            sandbox.client_id.clone(),
            &secret,
            sandbox.office365.addr(),
        );
    }
    for account in config
        .accounts
        .iter_mut()
        .filter(|a| a.provider == Provider::Sandbox)
    {
        if let Some(identity) = config
            .identities
            .iter()
            .find(|i| i.name == account.identity)
        {
            account.upstream = identity.upstream.clone();
        }
    }
    tracing::info!(
        token_endpoint = %sandbox.token_endpoint.authority_url(),
        office365 = %sandbox.office365.addr(),
        mail_dir = %mail_dir.display(),
        "sandbox stand-ins for Entra and Office365 started"
    );
    Ok(sandbox)
}

async fn spawn_session(
    shared: &Arc<Shared>,
    sessions: &Arc<tokio::sync::Mutex<JoinSet<()>>>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    id: u64,
) {
    let _ = tcp.set_nodelay(true);
    let span = tracing::info_span!("session", id = format_args!("{id:06x}"), client = %peer, account = tracing::field::Empty);
    let session = session::Session::new(shared.clone(), Stream::Tcp(tcp));
    let mut set = sessions.lock().await;
    // Reap finished sessions so the set does not grow with every connection ever made.
    while set.try_join_next().is_some() {}
    set.spawn(session.run().instrument(span));
}

async fn bind_all(addrs: &[SocketAddr]) -> Result<Vec<TcpListener>, StartError> {
    let mut listeners = Vec::new();
    for &addr in addrs {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                let bound = listener.local_addr().unwrap_or(addr);
                tracing::info!(address = %bound, "listening for SMTP clients");
                listeners.push(listener);
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

fn ipv6_unavailable(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(97 | 99)) // EAFNOSUPPORT, EADDRNOTAVAIL
}
