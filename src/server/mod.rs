//! The daemon's serving side: start-up (sandbox, token store, TLS, the token manager and its
//! refresh task), the listeners and their accept loops with one tracing span per connection
//! (`listeners`), the limits every client is held to (`limits`), configuration reloads, and the
//! drain at shutdown. `session` is one client connection.
//!
//! Every session holds the [`Shared`] state that was current when it was accepted. A reload
//! builds a new `Shared` and swaps it in for sessions accepted afterwards; sessions in flight
//! keep theirs and finish undisturbed. The token manager is one for the life of the process:
//! a reload reconfigures it, so tokens survive and one refresh task keeps running. A drain stops the listeners, lets sessions finish within
//! the grace period (they refuse new work with 421 4.3.2), then tells the rest 421 and closes.

pub mod limits;
mod listeners;
pub mod session;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::config::{Config, Provider};
use crate::oauth::endpoint::Http;
use crate::oauth::{HttpTokenSource, TokenManager, TokenSource};
use crate::ops::Metrics;
use crate::sandbox::Sandbox;
use crate::store::Store;
use listeners::{Acceptor, ListenerKind};

/// After the grace period, how long sessions get to say 421 and close before they are cut.
const HARD_STOP: Duration = Duration::from_secs(2);

/// What every session shares: read-only once built. A reload builds a new one.
pub struct Shared {
    pub config: Config,
    /// The same manager in every `Shared` of the process.
    pub tokens: Arc<TokenManager>,
    pub tls_client: Arc<rustls::ClientConfig>,
    /// Local password checks; one for the life of the process, so reloads keep its bounds.
    pub verifier: Arc<crate::users::Verifier>,
    /// Connection slots and failed-login throttling; one for the life of the process, so a
    /// reload keeps the counts (and applies the new limits).
    pub guard: Arc<limits::Guard>,
    /// Authenticated provider sessions kept between client sessions, and the per-account cap;
    /// one for the life of the process, so the cap holds across reloads.
    pub pool: Arc<crate::upstream::pool::Pool>,
    pub metrics: Arc<Metrics>,
    /// Where the bridge is in its life; sessions watch it to refuse new work while draining.
    pub lifecycle: watch::Receiver<Lifecycle>,
}

/// Serving, draining after SIGTERM (finish what is in flight, refuse new work), or stopping
/// (the grace period is over: say 421 and close now).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Serving,
    Draining,
    Stopping,
}

/// Requests to a running bridge.
pub enum Control {
    /// Apply a new, already checked configuration; the answer says what changed or why it was
    /// refused (the running configuration stays then).
    Reload(Box<Config>, oneshot::Sender<Result<String, String>>),
    /// Stop accepting, drain, and return. Sent again during the drain, it ends the grace
    /// period at once.
    Shutdown,
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
    /// A socket handed over by systemd is not acceptable (a configuration mistake).
    #[error("{0}")]
    Inherited(String),
    #[error("{0}")]
    Other(String),
}

impl StartError {
    /// Whether fixing configuration (the unit's or proxy.toml) is what it takes.
    pub fn is_config(&self) -> bool {
        matches!(self, StartError::Inherited(_))
    }
}

/// A started bridge: listeners bound, ready to serve.
pub struct Bridge {
    current: Arc<RwLock<Arc<Shared>>>,
    listeners: Vec<listeners::Bound>,
    /// The listeners came from systemd; `server.listen` is ignored and reloads keep them.
    from_systemd: bool,
    admin: Option<tokio::net::TcpListener>,
    metrics: Arc<Metrics>,
    tokens: Arc<TokenManager>,
    lifecycle: watch::Sender<Lifecycle>,
    /// Kept alive for as long as the bridge runs.
    sandbox: Option<Sandbox>,
}

impl Bridge {
    /// Prepares everything that can fail before the first client connects: the sandbox
    /// stand-ins, the token store, TLS, and the listeners.
    pub async fn start(config: Config) -> Result<Bridge, StartError> {
        Self::start_with(config, Vec::new()).await
    }

    /// Like [`Bridge::start`], serving on `inherited` listeners (socket activation) instead
    /// of binding `server.listen` when any are given.
    pub async fn start_with(
        mut config: Config,
        inherited: Vec<std::net::TcpListener>,
    ) -> Result<Bridge, StartError> {
        let sandbox = match &config.sandbox {
            Some(settings) => {
                let sandbox = Sandbox::start(Some(settings.mail_dir.clone()))
                    .await
                    .map_err(|e| StartError::Sandbox(e.to_string()))?;
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
        let extra_roots = bind_sandbox(&mut config, sandbox.as_ref());
        let metrics = Arc::new(Metrics::new());
        let (lifecycle, _) = watch::channel(Lifecycle::Serving);
        let verifier = Arc::new(crate::users::Verifier::new());
        let tls_client = crate::tls::client_config(config.extra_ca_file.as_deref(), extra_roots)?;
        let store = match Store::open(&config.store.directory) {
            Ok(store) => Some(Arc::new(store)),
            // Only refresh tokens make the store indispensable; without it app-only tokens
            // live in memory and `accounts` has no live state.
            Err(e) if !config.needs_store() => {
                tracing::warn!(
                    error = %e,
                    "state directory unavailable: tokens are kept in memory only and \
                     `accounts` shows no live state"
                );
                None
            }
            Err(e) => return Err(e.into()),
        };
        let tokens = Arc::new(
            TokenManager::new(
                &config.identities,
                &config.accounts,
                token_source(&tls_client, &config)?,
                store,
                config.tokens.clone(),
            )
            .with_metrics(metrics.clone()),
        );
        let guard = limits::Guard::new(config.limits);
        let pool = Arc::new(crate::upstream::pool::Pool::new(
            &config,
            Some(metrics.clone()),
        ));
        let lifelong = Lifelong {
            verifier,
            guard,
            pool,
        };
        let shared = build_shared(
            config,
            tls_client,
            &tokens,
            &metrics,
            lifelong,
            lifecycle.subscribe(),
        );
        if let Some(local) = &shared.config.local_tls {
            warn_if_key_readable(&local.key_file);
        }

        let from_systemd = !inherited.is_empty();
        let listeners = if from_systemd {
            let server = &shared.config.server;
            let beyond_loopback = server.allow_non_loopback && shared.config.local_tls.is_some();
            let mut adopted = listeners::adopt(inherited, beyond_loopback)?;
            // systemd hands over plain sockets; implicit-TLS listeners are still the bridge's.
            let implicit: Vec<_> = listeners::configured(&shared.config)
                .into_iter()
                .filter(|(_, kind)| *kind == ListenerKind::ImplicitTls)
                .collect();
            adopted.extend(listeners::bind_all(&implicit).await?);
            adopted
        } else {
            listeners::bind_all(&listeners::configured(&shared.config)).await?
        };
        let admin = match &shared.config.admin {
            Some(settings) => Some(crate::ops::admin::bind(settings.listen).await.map_err(
                |source| StartError::Bind {
                    addr: settings.listen,
                    source,
                },
            )?),
            None => None,
        };
        Ok(Bridge {
            current: Arc::new(RwLock::new(Arc::new(shared))),
            listeners,
            from_systemd,
            admin,
            metrics,
            tokens,
            lifecycle,
            sandbox,
        })
    }

    /// The plain SMTP addresses actually bound (useful with port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(ListenerKind::Plain)
    }

    /// The implicit-TLS addresses actually bound.
    pub fn implicit_tls_addrs(&self) -> Vec<SocketAddr> {
        self.addrs_of(ListenerKind::ImplicitTls)
    }

    fn addrs_of(&self, kind: ListenerKind) -> Vec<SocketAddr> {
        self.listeners
            .iter()
            .filter(|l| l.kind == kind)
            .map(|l| l.local)
            .collect()
    }

    /// The admin listener's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The state new sessions get now.
    pub fn shared(&self) -> Arc<Shared> {
        current(&self.current)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn sandbox(&self) -> Option<&Sandbox> {
        self.sandbox.as_ref()
    }

    /// Serves until `shutdown` completes, then drains with `grace` (instead of the configured
    /// `timeouts.shutdown_grace`).
    pub async fn serve(self, shutdown: impl Future<Output = ()>, grace: Duration) {
        let (tx, rx) = mpsc::channel(1);
        let run = self.run_inner(rx, Some(grace));
        let stop = async move {
            shutdown.await;
            let _ = tx.send(Control::Shutdown).await;
            // Keep the sender alive until the bridge has returned.
            std::future::pending::<()>().await;
        };
        tokio::select! {
            _ = run => {}
            _ = stop => {}
        }
    }

    /// Serves, applying reloads, until [`Control::Shutdown`] (or the sender is dropped), then
    /// drains for `timeouts.shutdown_grace`.
    pub async fn run(self, control: mpsc::Receiver<Control>) {
        self.run_inner(control, None).await
    }

    async fn run_inner(mut self, mut control: mpsc::Receiver<Control>, grace: Option<Duration>) {
        let sessions: listeners::Sessions = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let mut acceptors: Vec<Acceptor> = std::mem::take(&mut self.listeners)
            .into_iter()
            .map(|bound| listeners::spawn(bound, &self.current, &sessions))
            .collect();
        let admin = self
            .admin
            .take()
            .map(|l| crate::ops::admin::spawn(l, self.metrics.clone()));
        self.metrics
            .set_accounts(names(&current(&self.current).config));
        self.metrics
            .set_unhealthy_after(unhealthy_after(&current(&self.current).config));

        while let Some(Control::Reload(config, answer)) = control.recv().await {
            let result = self.reload(*config, &mut acceptors, &sessions).await;
            match &result {
                Ok(summary) => tracing::info!(changes = %summary, "configuration reloaded"),
                Err(e) => tracing::error!(
                    error = %e,
                    "configuration reload refused; the running configuration stays"
                ),
            }
            let _ = answer.send(result);
        }

        let grace = grace.unwrap_or(current(&self.current).config.timeouts.shutdown_grace);
        self.drain(acceptors, &sessions, grace, &mut control).await;
        // Pooled provider sessions say goodbye rather than vanish.
        current(&self.current).pool.close_all(HARD_STOP).await;
        if let Some(admin) = admin {
            admin.abort();
        }
        // A refresh in flight finishes, so a refresh token the endpoint already rotated is
        // stored rather than lost.
        let wait = current(&self.current).config.timeouts.token_request;
        self.tokens.shutdown(wait).await;
        drop(self.sandbox);
    }

    async fn reload(
        &mut self,
        mut config: Config,
        acceptors: &mut Vec<Acceptor>,
        sessions: &listeners::Sessions,
    ) -> Result<String, String> {
        if config.sandbox.is_some() && self.sandbox.is_none() {
            return Err("[sandbox] cannot be switched on by a reload; restart the bridge".into());
        }
        let extra_roots = bind_sandbox(&mut config, self.sandbox.as_ref());
        let verifier = current(&self.current).verifier.clone();
        let tls_client = crate::tls::client_config(config.extra_ca_file.as_deref(), extra_roots)
            .map_err(|e| e.to_string())?;
        let source = token_source(&tls_client, &config).map_err(|e| e.to_string())?;
        let guard = current(&self.current).guard.clone();
        let pool = current(&self.current).pool.clone();
        let lifelong = Lifelong {
            verifier,
            guard,
            pool,
        };
        let shared = build_shared(
            config,
            tls_client,
            &self.tokens,
            &self.metrics,
            lifelong,
            self.lifecycle.subscribe(),
        );
        let old = current(&self.current);
        let mut changes = Vec::new();
        for (what, changed) in [
            ("[tokens]", shared.config.tokens != old.config.tokens),
            (
                "store.directory",
                shared.config.store.directory != old.config.store.directory,
            ),
        ] {
            if changed {
                changes.push(format!("{what} changes take effect at the next restart"));
            }
        }
        if self.from_systemd {
            if shared.config.server.listen != old.config.server.listen {
                changes.push("server.listen ignored: the sockets come from systemd".to_string());
            }
        } else {
            let wanted = listeners::configured(&shared.config);
            let added: Vec<(SocketAddr, ListenerKind)> = wanted
                .iter()
                .filter(|(a, k)| {
                    !acceptors
                        .iter()
                        .any(|x| x.configured == Some(*a) && x.kind == *k)
                })
                .copied()
                .collect();
            // Bind first: a listener that cannot be bound refuses the whole reload.
            let bound = listeners::bind_all(&added)
                .await
                .map_err(|e| e.to_string())?;
            let (keep, remove): (Vec<Acceptor>, Vec<Acceptor>) = std::mem::take(acceptors)
                .into_iter()
                .partition(|a| a.configured.is_none_or(|c| wanted.contains(&(c, a.kind))));
            *acceptors = keep;
            for gone in remove {
                changes.push(format!("stopped listening on {}", gone.local));
                gone.stop().await;
            }
            for b in bound {
                changes.push(format!("listening on {}", b.local));
                acceptors.push(listeners::spawn(b, &self.current, sessions));
            }
        }
        if shared.config.admin.as_ref().map(|a| a.listen)
            != old.config.admin.as_ref().map(|a| a.listen)
        {
            changes.push("[admin] listen changes take effect at the next restart".into());
        }
        let before: Vec<&str> = names(&old.config).collect();
        let after: Vec<&str> = names(&shared.config).collect();
        changes.push(format!(
            "{} account(s) (added: {}; removed: {})",
            after.len(),
            list(after.iter().filter(|a| !before.contains(a))),
            list(before.iter().filter(|a| !after.contains(a))),
        ));
        changes.extend(self.tokens.reconfigure(
            &shared.config.identities,
            &shared.config.accounts,
            Some(source),
        ));
        self.metrics.set_accounts(after.iter().copied());
        shared.guard.set_limits(shared.config.limits);
        shared.pool.reconfigure(&shared.config);
        self.metrics
            .set_unhealthy_after(unhealthy_after(&shared.config));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(shared);
        Ok(changes.join("; "))
    }

    async fn drain(
        &self,
        acceptors: Vec<Acceptor>,
        sessions: &listeners::Sessions,
        grace: Duration,
        control: &mut mpsc::Receiver<Control>,
    ) {
        tracing::info!(
            grace_s = grace.as_secs(),
            "shutting down: no new connections"
        );
        self.metrics.set_draining();
        // Listeners close first, so nothing new arrives once sessions hear of the drain.
        for acceptor in acceptors {
            acceptor.stop().await;
        }
        let _ = self.lifecycle.send(Lifecycle::Draining);
        let mut sessions = sessions.lock().await;
        let drained = async { while sessions.join_next().await.is_some() {} };
        tokio::select! {
            finished = tokio::time::timeout(grace, drained) => {
                if finished.is_ok() {
                    return;
                }
                tracing::warn!(
                    grace_s = grace.as_secs(),
                    open = sessions.len(),
                    "sessions still open after the grace period; telling them 421 and closing"
                );
            }
            () = stop_requested_again(control) => tracing::warn!(
                open = sessions.len(),
                "asked to stop again: not waiting for the grace period; telling open \
                 sessions 421 and closing"
            ),
        }
        let _ = self.lifecycle.send(Lifecycle::Stopping);
        let stopped = async { while sessions.join_next().await.is_some() {} };
        if tokio::time::timeout(HARD_STOP, stopped).await.is_err() {
            sessions.abort_all();
        }
    }
}

/// Completes when a second [`Control::Shutdown`] arrives; a reload asked for meanwhile is
/// refused, and a closed channel means nobody can ask.
async fn stop_requested_again(control: &mut mpsc::Receiver<Control>) {
    loop {
        match control.recv().await {
            Some(Control::Shutdown) => return,
            Some(Control::Reload(_, answer)) => {
                let _ = answer.send(Err("the bridge is shutting down".to_string()));
            }
            None => std::future::pending::<()>().await,
        }
    }
}

fn current(lock: &RwLock<Arc<Shared>>) -> Arc<Shared> {
    lock.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn names(config: &Config) -> impl Iterator<Item = &str> {
    config.accounts.iter().map(|a| a.name.as_str())
}

fn list<'a>(items: impl Iterator<Item = &'a &'a str>) -> String {
    let items: Vec<&str> = items.copied().collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

fn unhealthy_after(config: &Config) -> u32 {
    config
        .admin
        .as_ref()
        .map(|a| a.upstream_failures_unhealthy)
        .unwrap_or(3)
}

/// Points sandbox identities (and their accounts) at the running stand-ins; returns the CA to
/// trust for them.
pub(crate) fn bind_sandbox(
    config: &mut Config,
    sandbox: Option<&Sandbox>,
) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let Some(sandbox) = sandbox else {
        return Vec::new();
    };
    let token_url = sandbox.token_endpoint.token_url(&sandbox.tenant);
    let secret = secrecy::SecretString::from(sandbox.client_secret.clone());
    for identity in config
        .identities
        .iter_mut()
        .filter(|i| i.provider == Provider::Sandbox)
    {
        // A configuration just checked is not shared yet.
        if let Some(identity) = Arc::get_mut(identity) {
            identity.bind_sandbox(
                token_url.clone(),
                sandbox.client_id.clone(),
                &secret,
                sandbox.office365.addr(),
            );
        }
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
    vec![sandbox.ca.ca_der()]
}

/// How the token manager reaches token endpoints: the TLS trust of the SMTP side.
fn token_source(
    tls_client: &Arc<rustls::ClientConfig>,
    config: &Config,
) -> Result<Arc<dyn TokenSource>, StartError> {
    let http = Http::new(tls_client, config.timeouts.token_request).map_err(StartError::Other)?;
    Ok(Arc::new(HttpTokenSource::new(http)))
}

/// The parts of [`Shared`] made once per process and carried over by every reload.
struct Lifelong {
    verifier: Arc<crate::users::Verifier>,
    guard: Arc<limits::Guard>,
    pool: Arc<crate::upstream::pool::Pool>,
}

/// Everything a session needs from a checked configuration.
fn build_shared(
    config: Config,
    tls_client: Arc<rustls::ClientConfig>,
    tokens: &Arc<TokenManager>,
    metrics: &Arc<Metrics>,
    lifelong: Lifelong,
    lifecycle: watch::Receiver<Lifecycle>,
) -> Shared {
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
    Shared {
        config,
        tokens: tokens.clone(),
        tls_client,
        verifier: lifelong.verifier,
        guard: lifelong.guard,
        pool: lifelong.pool,
        metrics: metrics.clone(),
        lifecycle,
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
