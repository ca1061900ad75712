//! The test stage: a fake Entra token endpoint and a fake Office365 (the same stand-ins as the
//! product's sandbox mode), a bridge configured through TOML like a real deployment, and a
//! raw SMTP client that shows exactly what a legacy client would see. Everything listens on
//! 127.0.0.1 with port 0; nothing dials the internet.

#![allow(dead_code)]

pub mod fakes;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::Engine;
pub use fakes::Fakes;
use smtp_oauth_bridge::config::Config;
use smtp_oauth_bridge::io::Stream;
use smtp_oauth_bridge::sandbox::{
    Office365, Office365Config, SandboxCa, TokenEndpoint, TokenEndpointConfig, TokenRegistry,
};
use smtp_oauth_bridge::server::{Bridge, Shared};
use smtp_oauth_bridge::smtp::{Reply, parse_reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const USER: &str = "printer@contoso.com";
pub const PASSWORD: &str = "local-printer-password";
pub const TENANT: &str = "contoso.onmicrosoft.com";
pub const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";

/// A client secret made at test time, never a constant in the repository.
pub fn client_secret() -> &'static str {
    static SECRET: OnceLock<String> = OnceLock::new();
    SECRET.get_or_init(|| {
        let mut bytes = [0u8; 24];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
        format!(
            "cs~{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        )
    })
}

/// The argon2 hash of [`PASSWORD`], computed once per test binary.
pub fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| smtp_oauth_bridge::users::hash_password(PASSWORD).unwrap())
}

/// A change made to the checked configuration before the bridge starts.
pub type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

/// How a test wants its stage set up.
pub struct Options {
    /// "client_credentials" or "refresh_token".
    pub flow: &'static str,
    /// Extra lines appended to the account's TOML table.
    pub account_extra: String,
    /// Extra TOML appended at the end (more accounts, settings). `{TOKEN_URL}`,
    /// `{AUTHORITY}` and `{UPSTREAM}` stand for the fake endpoint's token URL and authority
    /// and for the fake Office365.
    pub config_extra: String,
    /// Extra lines in the `[server]` table.
    pub server_extra: String,
    pub token_config: TokenEndpointConfig,
    pub office365: Office365Config,
    /// Refresh token to put in the store before the bridge starts (refresh_token flow).
    pub import_refresh_token: bool,
    /// The fake provider speaks TLS from the first byte (Gmail's port 465 style).
    pub implicit_tls: bool,
    /// Whether the bridge is told to trust the test CA.
    pub trust_test_ca: bool,
    /// Obtain the first token at start. Off by default: most stories count the token
    /// requests that sessions cause, so none may happen before the first session.
    pub prefetch: bool,
    /// Extra lines for the `[tokens]` table.
    pub tokens_extra: String,
    /// The account's credential lines instead of `client_secret = "..."`.
    pub credential: Option<String>,
    /// Give the bridge a certificate made at test time (`[tls] certificate_file`), so it
    /// offers STARTTLS.
    pub local_tls: bool,
    /// Also listen with implicit TLS (needs `local_tls`).
    pub implicit_tls_listener: bool,
    /// Changes to the checked configuration before the bridge starts, for durations shorter
    /// than the one-second steps the TOML takes.
    pub tweak: Option<Tweak>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            flow: "client_credentials",
            account_extra: String::new(),
            config_extra: String::new(),
            server_extra: String::new(),
            token_config: TokenEndpointConfig::default(),
            office365: Office365Config::default(),
            import_refresh_token: true,
            implicit_tls: false,
            trust_test_ca: true,
            prefetch: false,
            tokens_extra: String::new(),
            credential: None,
            local_tls: false,
            implicit_tls_listener: false,
            tweak: None,
        }
    }
}

pub struct Stage {
    pub dir: tempfile::TempDir,
    pub ca: SandboxCa,
    pub registry: Arc<TokenRegistry>,
    pub token_endpoint: TokenEndpoint,
    pub office365: Office365,
    pub bridge: SocketAddr,
    /// The implicit-TLS listener, when asked for.
    pub bridge_implicit_tls: Option<SocketAddr>,
    /// The bridge's own certificate (PEM), when `local_tls` was asked for.
    pub local_cert_pem: Option<String>,
    pub shared: Arc<Shared>,
    /// The refresh token imported at start (refresh_token flow).
    pub imported_refresh_token: Option<String>,
    /// The configuration the bridge runs with, as a file (for the command line).
    pub config_path: std::path::PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<()>>,
}

impl Stage {
    pub async fn start() -> Stage {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(mut options: Options) -> Stage {
        let Fakes {
            dir,
            ca,
            ca_file,
            registry,
            token_endpoint,
            office365,
        } = Fakes::start_with(
            std::mem::take(&mut options.token_config),
            std::mem::take(&mut options.office365),
            options.implicit_tls,
        )
        .await;
        let upstream_tls = if options.implicit_tls {
            "implicit"
        } else {
            "starttls"
        };
        // Without the test CA the bridge trusts only the public roots, as in production.
        let ca_line = if options.trust_test_ca {
            format!("extra_ca_file = \"{}\"", ca_file.display())
        } else {
            String::new()
        };

        let mut local_cert_pem = None;
        let mut tls_lines = ca_line;
        if options.local_tls {
            let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            let generated = smtp_oauth_bridge::tls::generate_self_signed(&names).unwrap();
            let certs = dir.path().join("certs");
            let (crt, key) =
                smtp_oauth_bridge::tls::write_certificate(&certs, &generated, false).unwrap();
            tls_lines.push_str(&format!(
                "\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n",
                crt.display(),
                key.display()
            ));
            local_cert_pem = Some(generated.certificate_pem.clone());
        }
        let implicit_line = if options.implicit_tls_listener {
            "listen_implicit_tls = [\"127.0.0.1:0\"]"
        } else {
            ""
        };

        let store_dir = dir.path().join("state");
        let toml = format!(
            r#"
[server]
listen = ["127.0.0.1:0"]
{implicit_line}
hostname = "bridge.test"
{server_extra}

[tls]
{tls_lines}

[store]
directory = "{store}"

[tokens]
prefetch = {prefetch}
{tokens_extra}

[[accounts]]
name = "printer"
username = "{USER}"
password_hash = "{hash}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
{credential}
flow = "{flow}"
token_url = "{token_url}"
upstream = "127.0.0.1:{port}"
upstream_tls = "{upstream_tls}"
{account_extra}
{config_extra}
"#,
            store = store_dir.display(),
            hash = password_hash(),
            credential = options
                .credential
                .unwrap_or_else(|| format!("client_secret = \"{}\"", client_secret())),
            flow = options.flow,
            token_url = token_endpoint.token_url(TENANT),
            port = office365.addr().port(),
            prefetch = options.prefetch,
            tokens_extra = options.tokens_extra,
            account_extra = options.account_extra,
            config_extra = options.config_extra,
            server_extra = options.server_extra,
        );
        // Extra tables may name the stand-ins through placeholders.
        let toml = toml
            .replace("{TOKEN_URL}", &token_endpoint.token_url(TENANT))
            .replace("{AUTHORITY}", &token_endpoint.authority_url())
            .replace(
                "{UPSTREAM}",
                &format!("127.0.0.1:{}", office365.addr().port()),
            );
        let mut config =
            Config::from_toml_str(&toml).unwrap_or_else(|e| panic!("test config: {e}"));
        if let Some(tweak) = options.tweak.take() {
            tweak(&mut config);
        }
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, &toml).unwrap();

        let mut imported_refresh_token = None;
        if options.flow == "refresh_token" && options.import_refresh_token {
            let token = token_endpoint.issue_refresh_token(
                CLIENT_ID,
                USER,
                "https://outlook.office.com/SMTP.Send offline_access",
            );
            let store = smtp_oauth_bridge::store::Store::open(&store_dir).unwrap();
            store
                .save_refresh_token("printer", &secrecy::SecretString::from(token.clone()))
                .unwrap();
            imported_refresh_token = Some(token);
        }

        let bridge = Bridge::start(config).await.unwrap();
        let addr = bridge.local_addrs()[0];
        let bridge_implicit_tls = bridge.implicit_tls_addrs().first().copied();
        let shared = bridge.shared().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(bridge.serve(
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Stage {
            dir,
            ca,
            registry,
            token_endpoint,
            office365,
            bridge: addr,
            bridge_implicit_tls,
            local_cert_pem,
            shared,
            imported_refresh_token,
            config_path,
            stop: Some(stop),
            served: Some(served),
        }
    }

    pub async fn client(&self) -> SmtpClient {
        SmtpClient::connect(self.bridge).await
    }

    /// A connected client that has said EHLO and authenticated with AUTH PLAIN.
    pub async fn logged_in(&self) -> SmtpClient {
        let mut c = self.client().await;
        c.ehlo().await;
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(r.code(), 235, "AUTH: {}", r.text());
        c
    }

    /// An HTTPS client that trusts the test CA and follows no redirects (a test browser).
    pub fn browser(&self) -> reqwest::Client {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.ca_der()).unwrap();
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    pub fn store(&self) -> smtp_oauth_bridge::store::Store {
        smtp_oauth_bridge::store::Store::open(&self.dir.path().join("state")).unwrap()
    }

    /// Stops accepting and waits for sessions to end.
    pub async fn shutdown(mut self) {
        self.stop_bridge().await;
    }

    /// Like [`Stage::shutdown`], keeping the fakes for a look at what they saw.
    pub async fn stop_bridge(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            let _ = served.await;
        }
    }
}

/// A legacy client speaking raw SMTP, so tests see exact reply codes and texts.
pub struct SmtpClient {
    pub stream: Stream,
    buf: Vec<u8>,
    pub greeting: Reply,
}

impl SmtpClient {
    pub async fn connect(addr: SocketAddr) -> SmtpClient {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::greeted(Stream::Tcp(stream)).await
    }

    /// Connects from a chosen loopback source address (127.0.0.0/8 is all loopback on Linux,
    /// so 127.0.0.2 is a second, distinct client address).
    pub async fn connect_from(addr: SocketAddr, source: IpAddr) -> SmtpClient {
        Self::greeted(Stream::Tcp(tcp_from(addr, source).await)).await
    }

    /// Connects to an implicit-TLS listener, trusting `cert_pem`.
    pub async fn connect_tls(addr: SocketAddr, cert_pem: &str) -> SmtpClient {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(tcp, cert_pem).await.expect("TLS handshake");
        Self::greeted(Stream::ClientTls(Box::new(tls))).await
    }

    async fn greeted(stream: Stream) -> SmtpClient {
        let mut c = SmtpClient {
            stream,
            buf: Vec::new(),
            greeting: Reply::new(0, ""),
        };
        c.greeting = c.reply().await;
        assert_eq!(c.greeting.code(), 220);
        c
    }

    /// STARTTLS, then the TLS handshake trusting `cert_pem`; the client continues inside TLS.
    pub async fn starttls(mut self, cert_pem: &str) -> SmtpClient {
        let r = self.cmd("STARTTLS").await;
        assert_eq!(r.code(), 220, "STARTTLS: {}", r.text());
        assert!(self.buf.is_empty(), "nothing may follow the 220 in clear");
        let Stream::Tcp(tcp) = self.stream else {
            panic!("already TLS");
        };
        let tls = tls_connect(tcp, cert_pem).await.expect("TLS handshake");
        SmtpClient {
            stream: Stream::ClientTls(Box::new(tls)),
            buf: Vec::new(),
            greeting: self.greeting,
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Reads one reply; fails the test after 20 seconds rather than hanging.
    pub async fn reply(&mut self) -> Reply {
        self.try_reply().await.unwrap_or_else(|| {
            panic!(
                "connection closed; unparsed: {:?}",
                String::from_utf8_lossy(&self.buf)
            )
        })
    }

    /// One reply, or `None` when the server closed the connection first.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some((reply, used)) = parse_reply(&self.buf).expect("valid SMTP reply") {
                    self.buf.drain(..used);
                    return Some(reply);
                }
                let mut chunk = [0u8; 8192];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
        .expect("no reply within 20 s")
    }

    /// The raw bytes of the next reply as they came off the wire.
    pub async fn raw_reply(&mut self) -> Vec<u8> {
        let r = self.reply().await;
        r.to_bytes()
    }

    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    pub async fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test").await;
        assert_eq!(r.code(), 250);
        r
    }

    pub async fn auth_plain(&mut self, user: &str, password: &str) -> Reply {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        self.cmd(&format!("AUTH PLAIN {b64}")).await
    }

    /// MAIL, RCPT for each recipient, DATA, body, final dot; returns the final reply.
    pub async fn send_message(&mut self, from: &str, to: &[&str], wire_body: &[u8]) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(r.code(), 250, "MAIL: {}", r.text());
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert_eq!(r.code(), 250, "RCPT: {}", r.text());
        }
        let r = self.cmd("DATA").await;
        assert_eq!(r.code(), 354, "DATA: {}", r.text());
        self.send(wire_body).await;
        self.send(b".\r\n").await;
        self.reply().await
    }

    /// True when the server has closed the connection (reads EOF within 10 s).
    pub async fn closed(&mut self) -> bool {
        let mut chunk = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// An RSA key and self-signed certificate made now with `openssl` (ring cannot generate RSA
/// keys), in one PEM file as an administrator would make it for an app registration.
pub fn rsa_certificate(
    dir: &std::path::Path,
    name: &str,
) -> (
    std::path::PathBuf,
    rustls_pki_types::CertificateDer<'static>,
) {
    use rustls_pki_types::pem::PemObject;
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.crt"));
    let status = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={name}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl is needed to make a test certificate (apt-get install openssl)");
    assert!(status.success(), "openssl req failed");
    let pem = dir.join(format!("{name}.pem"));
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&key).unwrap()
    );
    std::fs::write(&pem, both).unwrap();
    let der = rustls_pki_types::CertificateDer::from_pem_file(&cert).unwrap();
    (pem, der)
}

/// EHLO lines as strings, for capability checks.
pub fn ehlo_lines(r: &Reply) -> Vec<String> {
    r.lines()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

pub async fn tcp_from(addr: SocketAddr, source: IpAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(addr).await.unwrap()
}

/// A TLS client trusting exactly `cert_pem` (the bridge's self-signed certificate).
pub fn client_tls_config(cert_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(cert_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(smtp_oauth_bridge::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

pub async fn tls_connect(
    tcp: TcpStream,
    cert_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let connector = tokio_rustls::TlsConnector::from(client_tls_config(cert_pem));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector.connect(name, tcp).await
}

/// Log lines the bridge writes while the returned guard lives (this thread only: tests run
/// on tokio's single-threaded test runtime, so every task logs here).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

pub fn capture_logs() -> (tracing::subscriber::DefaultGuard, Logs) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("smtp_oauth_bridge=info")
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    (tracing::subscriber::set_default(subscriber), logs)
}

/// Waits (up to 10 s) until `check` holds, for effects that follow a reply.
pub async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

pub fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}
