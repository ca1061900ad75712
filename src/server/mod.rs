//! The daemon's serving side: start-up (sandbox, token store, TLS, token manager), the
//! listeners and their accept loops (`listener`, one tracing span per connection), the limits
//! every client is held to (`limits`), and shutdown. `session` is one client connection.

pub mod limits;
pub mod listener;
pub mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use tokio::task::JoinSet;

use crate::config::{Config, Provider};
use crate::oauth::TokenManager;
use crate::sandbox::Sandbox;
use crate::store::Store;

/// What every session shares: read-only after start-up.
pub struct Shared {
    pub config: Config,
    pub tokens: TokenManager,
    pub tls_client: Arc<rustls::ClientConfig>,
    /// Connection slots and failed-login throttling.
    pub guard: Arc<limits::Guard>,
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
    listeners: Vec<listener::Listener>,
    /// Kept alive for as long as the bridge runs.
    sandbox: Option<Sandbox>,
}

impl Bridge {
    /// Prepares everything that can fail before the first client connects: the sandbox
    /// stand-ins, the token store, TLS, and the listeners.
    pub async fn start(mut config: Config) -> Result<Bridge, StartError> {
        let mut extra_roots = Vec::new();
        let sandbox = match &config.sandbox {
            Some(settings) => {
                let sandbox = Sandbox::start(Some(settings.mail_dir.clone()))
                    .await
                    .map_err(|e| StartError::Sandbox(e.to_string()))?;
                let token_url = sandbox.token_endpoint.token_url(&sandbox.tenant);
                let secret = secrecy::SecretString::from(sandbox.client_secret.clone());
                for account in config
                    .accounts
                    .iter_mut()
                    .filter(|a| a.provider == Provider::Sandbox)
                {
                    crate::config::bind_sandbox_account(
                        account,
                        token_url.clone(),
                        sandbox.client_id.clone(),
                        &secret,
                        sandbox.office365.addr(),
                    );
                }
                extra_roots.push(sandbox.ca.ca_der());
                tracing::info!(
                    token_endpoint = %sandbox.token_endpoint.authority_url(),
                    office365 = %sandbox.office365.addr(),
                    mail_dir = %settings.mail_dir.display(),
                    "sandbox stand-ins for Entra and Office365 started"
                );
                Some(sandbox)
            }
            None => None,
        };

        for account in &config.accounts {
            tracing::info!(
                account = %account.name,
                provider = ?account.provider,
                flow = ?account.oauth.flow,
                upstream = %format!("{}:{}", account.upstream.host, account.upstream.port),
                "account configured"
            );
        }
        let tls_client = crate::tls::client_config(config.extra_ca_file.as_deref(), extra_roots)?;
        let store = if config.needs_store() {
            Some(Arc::new(Store::open(&config.store.directory)?))
        } else {
            None
        };
        let tokens = TokenManager::new(
            &config.accounts,
            &tls_client,
            config.timeouts.token_request,
            store,
        )
        .map_err(StartError::Other)?;

        if let Some(local) = &config.local_tls {
            warn_if_key_readable(&local.key_file);
        }
        let listeners =
            listener::bind_all(&config.server.listen, &config.server.listen_implicit_tls).await?;
        Ok(Bridge {
            shared: Arc::new(Shared {
                guard: limits::Guard::new(config.limits),
                config,
                tokens,
                tls_client,
            }),
            listeners,
            sandbox,
        })
    }

    /// The plain listeners' addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(listener::ListenerKind::Plain)
    }

    /// The implicit-TLS listeners' addresses actually bound.
    pub fn implicit_tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(listener::ListenerKind::ImplicitTls)
    }

    fn addrs_of(&self, kind: listener::ListenerKind) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| l.kind == kind)
            .filter_map(|l| l.tcp.local_addr().ok())
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
            accept_tasks.spawn(listener::accept_loop(
                listener,
                self.shared.clone(),
                sessions.clone(),
                next_id.clone(),
                stop_tx.subscribe(),
            ));
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
        drop(self.sandbox);
    }
}

/// The private key of the local listeners should be readable by the bridge alone.
fn warn_if_key_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            key_file = %path.display(),
            "the TLS private key is readable by other users; chmod 600 it"
        );
    }
}
