//! Loopback stand-ins for Microsoft's services: an Entra v2.0 token endpoint and an
//! Office365-like SMTP submission server, both over TLS signed by a throwaway CA.
//!
//! They serve the product's `sandbox` mode (try the bridge with no Microsoft account; the
//! messages land in a folder) and the integration tests (which assert what the upstream
//! received). Replies, status codes and error bodies follow shared/PROTOCOL.md §1.3–1.6 and
//! §2.1–2.9, so the bridge cannot tell the sandbox from the real services except by the CA.
//!
//! Map: [`ca`] makes certificates, [`registry`] records issued access tokens,
//! [`token_endpoint`] answers OAuth token, device-code and authorize requests, [`office365`] accepts SMTP. Everything
//! binds `127.0.0.1:0`; nothing here dials out.

pub mod ca;
mod clock;
mod http;
pub mod office365;
mod random;
pub mod registry;
mod smtp_session;
pub mod token_endpoint;
mod wire;

#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub use ca::SandboxCa;
pub use office365::{AuthAttempt, Behaviour, Office365, Office365Config, Stage, StoredMessage};
pub use registry::{IssuedToken, TokenRegistry};
pub use token_endpoint::{
    AssertionSeen, ClientRegistration, TokenEndpoint, TokenEndpointConfig, TokenFailure,
    TokenRequest,
};

/// The tenant the sandbox pretends to be; `.test` keeps it out of real DNS.
pub const SANDBOX_TENANT: &str = "sandbox.onmicrosoft.test";

/// A connection that sends nothing for this long is closed (RFC 5321 suggests at least five
/// minutes for real servers; a stand-in that tests drive can be stricter).
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Connections served at once per listener; more are closed on accept.
const MAX_CONNECTIONS: usize = 256;

/// Failures while starting the sandbox.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// rcgen could not make a key or certificate.
    #[error("failed to generate a sandbox certificate")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the generated certificate or key.
    #[error("failed to build the sandbox TLS configuration")]
    Tls(#[from] rustls::Error),
    /// A listener could not be bound.
    #[error("failed to start a sandbox listener")]
    Io(#[from] std::io::Error),
}

/// A complete sandbox: one CA, one token registry, a token endpoint and an Office365 stand-in
/// with a registered confidential client.
pub struct Sandbox {
    pub ca: SandboxCa,
    pub registry: Arc<TokenRegistry>,
    pub token_endpoint: TokenEndpoint,
    pub office365: Office365,
    pub client_id: String,
    /// Random, made at start; the bridge's sandbox configuration uses it.
    pub client_secret: String,
    pub tenant: String,
}

impl Sandbox {
    /// Start both servers on `127.0.0.1:0` with a certificate for `localhost`, `127.0.0.1`
    /// and `::1`. Accepted messages are also written to `mail_dir` when it is given.
    pub async fn start(mail_dir: Option<PathBuf>) -> Result<Sandbox, SandboxError> {
        let ca = SandboxCa::generate()?;
        let tls = ca.server_config(&["localhost", "127.0.0.1", "::1"])?;
        let registry = Arc::new(TokenRegistry::new());
        let client_id = random::guid();
        // Entra secrets are 40 characters; 30 random bytes make 40 base64url characters.
        let client_secret = random::base64url(30);

        let token_config = TokenEndpointConfig {
            clients: vec![ClientRegistration::new(&client_id, &client_secret)],
            ..TokenEndpointConfig::default()
        };
        let token_endpoint =
            TokenEndpoint::start(Arc::clone(&tls), Arc::clone(&registry), token_config).await?;
        let office365_config = Office365Config {
            mail_dir,
            ..Office365Config::default()
        };
        let office365 = Office365::start(tls, Arc::clone(&registry), office365_config).await?;
        // Strict where Office365 is: a mailbox sends only as itself, with at most three
        // sessions at once. A trial run then meets the refusals the real service gives.
        office365.set_behaviour(Behaviour {
            enforce_send_as: true,
            max_concurrent_sessions_per_user: Some(3),
            ..Behaviour::default()
        });

        Ok(Sandbox {
            ca,
            registry,
            token_endpoint,
            office365,
            client_id,
            client_secret,
            tenant: SANDBOX_TENANT.to_string(),
        })
    }

    /// The token URL for the sandbox tenant.
    pub fn token_url(&self) -> String {
        self.token_endpoint.token_url(&self.tenant)
    }
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("token_endpoint", &self.token_endpoint.addr())
            .field("office365", &self.office365.addr())
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

/// Bind `127.0.0.1:0`; loopback only, because these servers accept any client.
pub(crate) async fn bind_loopback() -> std::io::Result<(TcpListener, SocketAddr)> {
    // A long accept queue, as the bridge's own listeners have: load tests connect in bursts.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let listener = socket.listen(4096)?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Accept connections and run `serve` for each. The connection tasks live in a `JoinSet`
/// owned by the accept task, so aborting the returned handle stops them all.
pub(crate) fn spawn_accept_loop<F, Fut>(listener: TcpListener, serve: F) -> JoinHandle<()>
where
    F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tasks = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) if tasks.len() < MAX_CONNECTIONS => {
                        // Replies go out in several writes; without this, Nagle's algorithm
                        // and delayed ACKs add 40 ms stalls that real servers do not have.
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(serve(stream, peer));
                    }
                    Ok((_, peer)) => {
                        tracing::debug!(%peer, "sandbox: connection limit reached, closing");
                    }
                    Err(error) => {
                        // Usually EMFILE; pause instead of spinning on the error.
                        tracing::debug!(%error, "sandbox: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
    })
}
