//! `smtp-oauth-bridge login` as an administrator runs it, against the fake Entra in this
//! process: the device code (approved, declined), the browser sign-in with PKCE through the
//! loopback listener and through a pasted address (and a forged `state`, which stores
//! nothing), and the check of an app-only certificate credential. The test plays the user:
//! it approves device codes and follows the authorize redirect like a browser. The tests
//! wait for the child process synchronously, so the runtime that serves the fake Entra has
//! worker threads of its own.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use secrecy::ExposeSecret;
use smtp_oauth_bridge::sandbox::{
    ClientRegistration, SandboxCa, TokenEndpoint, TokenEndpointConfig, TokenRegistry,
};
use smtp_oauth_bridge::store::Store;

const TENANT: &str = "contoso.onmicrosoft.com";
const PUBLIC_CLIENT: &str = "77777777-1111-2222-3333-444444444444";
const APP_CLIENT: &str = "88888888-1111-2222-3333-444444444444";
const MAILBOX: &str = "printer@contoso.com";

struct Entra {
    dir: tempfile::TempDir,
    ca: SandboxCa,
    registry: Arc<TokenRegistry>,
    endpoint: TokenEndpoint,
    config: PathBuf,
}

async fn entra() -> Entra {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = common::rsa_certificate(dir.path(), "scanner-app");
    let ca = SandboxCa::generate().unwrap();
    let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
    let registry = Arc::new(TokenRegistry::new());
    let endpoint = TokenEndpoint::start(
        tls,
        Arc::clone(&registry),
        TokenEndpointConfig {
            clients: vec![ClientRegistration::with_certificate(APP_CLIENT, der)],
            device_interval: Duration::from_secs(1),
            ..TokenEndpointConfig::default()
        },
    )
    .await
    .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let hash = common::password_hash();
    let authority = endpoint.authority_url();
    let config = format!(
        r#"
[tls]
extra_ca_file = "{ca}"

[store]
directory = "{state}"

[[identities]]
name = "printer"
tenant = "{TENANT}"
authority = "{authority}"
client_id = "{PUBLIC_CLIENT}"
flow = "refresh_token"

[[identities]]
name = "scanner-app"
tenant = "{TENANT}"
authority = "{authority}"
client_id = "{APP_CLIENT}"
client_certificate = "{pem}"

[[identities]]
name = "browser-only"
provider = "generic"
client_id = "{PUBLIC_CLIENT}"
token_url = "{authority}/{TENANT}/oauth2/v2.0/token"
authorize_url = "{authority}/{TENANT}/oauth2/v2.0/authorize"
scopes = ["https://outlook.office.com/SMTP.Send", "offline_access"]
upstream = "smtp.example.test:587"

[[accounts]]
username = "{MAILBOX}"
password_hash = "{hash}"
identity = "printer"

[[accounts]]
username = "scanner"
mailbox = "scanner@contoso.com"
password_hash = "{hash}"
identity = "scanner-app"

[[accounts]]
username = "other@example.test"
password_hash = "{hash}"
identity = "browser-only"
"#,
        ca = ca_file.display(),
        state = dir.path().join("state").display(),
        pem = pem.display(),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).unwrap();
    Entra {
        dir,
        ca,
        registry,
        endpoint,
        config: path,
    }
}

/// A running `login` with its standard output read line by line.
struct Login {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Entra {
    fn login(&self, args: &[&str]) -> Login {
        let mut child = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
            .arg("--config")
            .arg(&self.config)
            .arg("login")
            .args(args)
            .env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Login {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn store(&self) -> Store {
        Store::open(&self.dir.path().join("state")).unwrap()
    }

    fn http(&self) -> reqwest::Client {
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

    /// Plays the browser: opens the authorize URL and returns where Entra sends it.
    async fn sign_in(&self, url: &str) -> String {
        let response = self.http().get(url).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 302);
        response.headers()["location"].to_str().unwrap().to_string()
    }
}

impl Login {
    /// The first line for which `pick` returns something (waits up to 20 s).
    fn line<T>(&mut self, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("no such line; output so far: {:?}", self.seen));
            self.seen.push(line.clone());
            if let Some(found) = pick(&line) {
                return found;
            }
        }
    }

    fn type_line(&mut self, text: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{text}").unwrap();
    }

    /// Waits for the exit; returns the code and everything printed.
    fn finish(mut self) -> (i32, String, String) {
        drop(self.child.stdin.take());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("login did not finish; output: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(self.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        let mut stdout = self.seen.join("\n");
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            stdout.push('\n');
            stdout.push_str(&line);
        }
        (status.code().unwrap_or(-1), stdout, stderr)
    }
}

fn authorize_line(line: &str) -> Option<String> {
    line.trim()
        .starts_with("https://")
        .then(|| line.trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_login_stores_the_grant_with_its_authority() {
    let entra = entra().await;
    let mut login = entra.login(&["printer"]);
    let code = login.line(|l| l.strip_prefix("Code: ").map(str::to_string));
    assert!(login.seen.iter().any(|l| l.starts_with("URL: https://")));
    assert!(entra.endpoint.approve_device(&code, MAILBOX));
    let (status, stdout, stderr) = login.finish();
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("Signed in"), "{stdout}");
    assert!(
        stdout.contains("waiting for sign-in:") && stdout.contains("left"),
        "{stdout}"
    );

    let record = entra.store().load("printer").unwrap().unwrap();
    let refresh = record.refresh_token.unwrap();
    assert!(entra.endpoint.refresh_token_valid(refresh.expose_secret()));
    assert_eq!(
        record.authority.as_deref(),
        Some(entra.endpoint.token_url(TENANT).as_str())
    );
    let access = record.access_token.unwrap();
    let issued = entra.registry.lookup(access.expose_secret()).unwrap();
    assert_eq!(issued.subject.as_deref(), Some(MAILBOX));
    assert!(!stdout.contains(refresh.expose_secret()) && !stderr.contains(access.expose_secret()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_device_login_stores_nothing() {
    let entra = entra().await;
    let mut login = entra.login(&["printer", "--device"]);
    let code = login.line(|l| l.strip_prefix("Code: ").map(str::to_string));
    assert!(entra.endpoint.decline_device(&code));
    let (status, _, stderr) = login.finish();
    assert_eq!(status, 1);
    assert!(stderr.contains("declined"), "{stderr}");
    assert!(entra.store().load("printer").unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_through_the_loopback_listener() {
    let entra = entra().await;
    let mut login = entra.login(&["printer", "--browser"]);
    let url = login.line(authorize_line);
    assert!(url.contains("code_challenge_method=S256"), "{url}");
    assert!(url.contains("login_hint=printer%40contoso.com"), "{url}");
    let back = entra.sign_in(&url).await;
    assert!(back.starts_with("http://localhost:"), "{back}");
    // The browser follows the redirect to the bridge's listener.
    let page = entra.http().get(&back).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().await.unwrap().contains("Signed in"));
    let (status, stdout, stderr) = login.finish();
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    let requests = entra.endpoint.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].grant_type.as_deref(),
        Some("authorization_code")
    );
    assert!(requests[0].code_verifier_sent);
    assert!(
        entra
            .store()
            .load_refresh_token("printer")
            .unwrap()
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_by_pasting_the_redirect_address() {
    let entra = entra().await;
    let mut login = entra.login(&["browser-only", "--paste"]);
    let url = login.line(authorize_line);
    let back = entra.sign_in(&url).await;
    login.line(|l| l.contains("Paste").then_some(()));
    login.type_line(&back);
    let (status, stdout, stderr) = login.finish();
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(
        entra
            .store()
            .load_refresh_token("browser-only")
            .unwrap()
            .is_some()
    );

    // Device codes need an endpoint this identity does not have.
    let (status, _, stderr) = entra.login(&["browser-only", "--device"]).finish();
    assert_eq!(status, 64);
    assert!(stderr.contains("no device_code_url"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_with_a_forged_state_is_refused() {
    let entra = entra().await;
    let mut login = entra.login(&["printer", "--paste"]);
    let url = login.line(authorize_line);
    let back = entra.sign_in(&url).await;
    let mut forged = url::Url::parse(&back).unwrap();
    let pairs: Vec<(String, String)> = forged
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                "forged".into()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    forged.query_pairs_mut().clear().extend_pairs(pairs);
    login.type_line(forged.as_str());
    let (status, _, stderr) = login.finish();
    assert_eq!(status, 1);
    assert!(stderr.contains("state mismatch"), "{stderr}");
    assert!(entra.store().load("printer").unwrap().is_none());
    assert_eq!(
        entra.endpoint.request_count(),
        0,
        "the code was never redeemed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_checks_an_app_only_certificate_credential() {
    let entra = entra().await;
    // By any account of the identity.
    let (status, stdout, stderr) = entra.login(&["scanner"]).finish();
    assert_eq!(status, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("certificate of identity scanner-app works"),
        "{stdout}"
    );
    let requests = entra.endpoint.requests();
    assert_eq!(
        requests[0].grant_type.as_deref(),
        Some("client_credentials")
    );
    assert!(requests[0].assertion.as_ref().unwrap().valid);
    let record = entra.store().load("scanner-app").unwrap().unwrap();
    assert!(record.access_token.is_some() && record.refresh_token.is_none());

    let (status, _, stderr) = entra.login(&["nobody"]).finish();
    assert_eq!(status, 64);
    assert!(
        stderr.contains("no identity or account named nobody"),
        "{stderr}"
    );
}
