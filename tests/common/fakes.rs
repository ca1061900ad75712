//! The stand-ins a test talks to: a CA made for the test, the fake Entra token endpoint (with
//! the test application registered) and the fake Office365, all on 127.0.0.1.

use std::path::PathBuf;
use std::sync::Arc;

use smtp_oauth_bridge::sandbox::{
    ClientRegistration, Office365, Office365Config, SandboxCa, TokenEndpoint, TokenEndpointConfig,
    TokenRegistry,
};

use super::{CLIENT_ID, client_secret};

pub struct Fakes {
    /// Scratch space for the test: `ca.pem` is written here; configurations and state go here.
    pub dir: tempfile::TempDir,
    pub ca: SandboxCa,
    /// The test CA as a PEM file, for `extra_ca_file`.
    pub ca_file: PathBuf,
    pub registry: Arc<TokenRegistry>,
    pub token_endpoint: TokenEndpoint,
    pub office365: Office365,
}

impl Fakes {
    pub async fn start() -> Fakes {
        Self::start_with(
            TokenEndpointConfig::default(),
            Office365Config::default(),
            false,
        )
        .await
    }

    /// `implicit_tls`: the fake Office365 speaks TLS from the first byte (Gmail's 465 style)
    /// instead of offering STARTTLS.
    pub async fn start_with(
        mut token_config: TokenEndpointConfig,
        office365_config: Office365Config,
        implicit_tls: bool,
    ) -> Fakes {
        let dir = tempfile::tempdir().unwrap();
        let ca = SandboxCa::generate().unwrap();
        let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        let registry = Arc::new(TokenRegistry::new());
        token_config
            .clients
            .push(ClientRegistration::new(CLIENT_ID, client_secret()));
        let token_endpoint = TokenEndpoint::start(tls.clone(), registry.clone(), token_config)
            .await
            .unwrap();
        let office365 = if implicit_tls {
            Office365::start_implicit_tls(tls, registry.clone(), office365_config).await
        } else {
            Office365::start(tls, registry.clone(), office365_config).await
        }
        .unwrap();
        Fakes {
            dir,
            ca,
            ca_file,
            registry,
            token_endpoint,
            office365,
        }
    }
}
