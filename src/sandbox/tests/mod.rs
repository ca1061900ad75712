//! Tests of the sandbox servers over real loopback sockets and real TLS: a reqwest client
//! against the token endpoint, and a hand-written tokio-rustls SMTP client against the
//! Office365 stand-in. Shared fixtures live here.

mod interactive;
mod office365;
mod sandbox;
mod token_endpoint;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::sandbox::{
    ClientRegistration, Office365, Office365Config, SandboxCa, TokenEndpoint, TokenEndpointConfig,
    TokenRegistry,
};

/// No single step of a test should take longer than this.
const STEP: Duration = Duration::from_secs(5);

pub(super) const CLIENT_ID: &str = "00000000-1111-2222-3333-444444444444";
/// Contains `~`, `.`, `+` and `/` like real Entra secrets, to exercise form encoding.
pub(super) const CLIENT_SECRET: &str = "sbx8Q~a.b+c/d_e-f";
pub(super) const TENANT: &str = "sandbox.onmicrosoft.test";
pub(super) const DELEGATED_SCOPE: &str = "https://outlook.office.com/SMTP.Send offline_access";
pub(super) const APP_SCOPE: &str = "https://outlook.office365.com/.default";

/// A client configuration that trusts only the sandbox CA, loaded from its PEM as the
/// bridge would load it from a file.
pub(super) fn client_config(ca: &SandboxCa) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.ca_pem().as_bytes()) {
        roots
            .add(cert.expect("CA PEM parses"))
            .expect("CA accepted");
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The token endpoint with one confidential client, and an HTTPS client that trusts it.
pub(super) struct Entra {
    pub(super) registry: Arc<TokenRegistry>,
    pub(super) endpoint: TokenEndpoint,
    pub(super) http: reqwest::Client,
}

pub(super) async fn entra(adjust: impl FnOnce(&mut TokenEndpointConfig)) -> Entra {
    let ca = SandboxCa::generate().unwrap();
    let tls = ca
        .server_config(&["localhost", "127.0.0.1", "::1"])
        .unwrap();
    let registry = Arc::new(TokenRegistry::new());
    let mut config = TokenEndpointConfig {
        clients: vec![ClientRegistration::new(CLIENT_ID, CLIENT_SECRET)],
        ..TokenEndpointConfig::default()
    };
    adjust(&mut config);
    let endpoint = TokenEndpoint::start(tls, Arc::clone(&registry), config)
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&ca))
        // The authorize endpoint's redirect is what the tests look at.
        .redirect(reqwest::redirect::Policy::none())
        .timeout(STEP)
        .build()
        .unwrap();
    Entra {
        registry,
        endpoint,
        http,
    }
}

/// A response reduced to what the tests look at.
pub(super) struct Answer {
    pub(super) status: u16,
    pub(super) headers: reqwest::header::HeaderMap,
    pub(super) text: String,
}

impl Answer {
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).expect("JSON body")
    }
}

impl Entra {
    pub(super) async fn post(&self, form: &[(&str, &str)]) -> Answer {
        self.send(self.http.post(self.endpoint.token_url(TENANT)).form(form))
            .await
    }

    pub(super) async fn send(&self, request: reqwest::RequestBuilder) -> Answer {
        let response = request.send().await.expect("token endpoint answers");
        Answer {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            text: response.text().await.unwrap(),
        }
    }
}

/// The Office365 stand-in with its CA and registry.
pub(super) struct Upstream {
    pub(super) ca: SandboxCa,
    pub(super) registry: Arc<TokenRegistry>,
    pub(super) office365: Office365,
}

pub(super) async fn upstream(config: Office365Config) -> Upstream {
    let ca = SandboxCa::generate().unwrap();
    let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
    let registry = Arc::new(TokenRegistry::new());
    let office365 = Office365::start(tls, Arc::clone(&registry), config)
        .await
        .unwrap();
    Upstream {
        ca,
        registry,
        office365,
    }
}

impl Upstream {
    /// A delegated token for `user`, as a refresh would produce.
    pub(super) fn delegated_token(&self, user: &str) -> String {
        self.registry
            .issue(
                CLIENT_ID,
                Some(user),
                DELEGATED_SCOPE,
                Duration::from_secs(3599),
            )
            .access_token
    }

    /// Greeting, EHLO, STARTTLS, EHLO: a TLS session ready for AUTH.
    pub(super) async fn tls_session(&self) -> SmtpClient<TlsStream<TcpStream>> {
        let mut plain = SmtpClient::connect(self.office365.addr()).await;
        assert!(plain.read_reply().await.starts_with("220 "));
        assert!(plain.command("EHLO client.test").await.starts_with("250-"));
        assert_eq!(
            plain.command("STARTTLS").await,
            "220 2.0.0 SMTP server ready\r\n"
        );
        let mut tls = plain.starttls(&self.ca).await;
        assert!(
            tls.command("EHLO client.test")
                .await
                .contains("AUTH LOGIN XOAUTH2")
        );
        tls
    }

    /// A TLS session authenticated as `user` with the two-step XOAUTH2 exchange.
    pub(super) async fn authenticated(&self, user: &str) -> SmtpClient<TlsStream<TcpStream>> {
        let mut tls = self.tls_session().await;
        assert_eq!(tls.command("AUTH XOAUTH2").await, "334 \r\n");
        let token = self.delegated_token(user);
        assert_eq!(
            tls.command(&xoauth2(user, &token)).await,
            "235 2.7.0 Authentication successful\r\n"
        );
        tls
    }
}

pub(super) fn xoauth2(user: &str, token: &str) -> String {
    STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// A minimal SMTP client that reads whole replies and can switch to TLS.
pub(super) struct SmtpClient<S> {
    io: S,
    buf: Vec<u8>,
}

impl SmtpClient<TcpStream> {
    pub(super) async fn connect(addr: SocketAddr) -> SmtpClient<TcpStream> {
        SmtpClient {
            io: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    /// Handshake after the server's 220 to STARTTLS (already read by the caller).
    pub(super) async fn starttls(self, ca: &SandboxCa) -> SmtpClient<TlsStream<TcpStream>> {
        assert!(self.buf.is_empty(), "bytes arrived after the STARTTLS 220");
        SmtpClient {
            io: tls_connect(self.io, ca).await,
            buf: Vec::new(),
        }
    }
}

pub(super) async fn tls_connect(tcp: TcpStream, ca: &SandboxCa) -> TlsStream<TcpStream> {
    let connector = TlsConnector::from(Arc::new(client_config(ca)));
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(STEP, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake succeeds")
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    pub(super) fn wrap(io: S) -> SmtpClient<S> {
        SmtpClient {
            io,
            buf: Vec::new(),
        }
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.unwrap();
        self.io.flush().await.unwrap();
    }

    /// Send one command line and read its reply.
    pub(super) async fn command(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// One complete reply, every line with its CRLF.
    pub(super) async fn read_reply(&mut self) -> String {
        loop {
            if let Some(end) = complete_reply(&self.buf) {
                let reply: Vec<u8> = self.buf.drain(..end).collect();
                return String::from_utf8(reply).expect("UTF-8 reply");
            }
            let n = self.read_some().await;
            assert!(
                n > 0,
                "connection closed mid-reply: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        }
    }

    /// The bytes of the next single read.
    pub(super) async fn read_raw(&mut self) -> Vec<u8> {
        if self.buf.is_empty() {
            self.read_some().await;
        }
        std::mem::take(&mut self.buf)
    }

    /// True if the server closed the connection (cleanly or not) without sending anything.
    pub(super) async fn closed_without_reply(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        match tokio::time::timeout(STEP, self.io.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => self.buf.is_empty(),
            Ok(Ok(_)) => false,
            Err(_) => panic!("server neither replied nor closed"),
        }
    }

    async fn read_some(&mut self) -> usize {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(STEP, self.io.read(&mut chunk))
            .await
            .expect("reply in time")
            .expect("read succeeds");
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }
}

/// The length of the first complete reply in `buf`, if there is one.
fn complete_reply(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(pos) = buf[start..].windows(2).position(|w| w == b"\r\n") {
        let line = &buf[start..start + pos];
        start += pos + 2;
        if line.len() < 4 || line[3] == b' ' {
            return Some(start);
        }
    }
    None
}
