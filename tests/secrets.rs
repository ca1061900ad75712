//! Secrets never reach a log line, a `Debug` or `Display` string, the status file, or what
//! `login` and `accounts` print. With every log level on, the bridge obtains tokens at start
//! (a delegated refresh with rotation, an app-only identity shared by a whole domain, a
//! certificate identity the endpoint refuses), serves sessions (a wrong password, a domain
//! mailbox, a message), and signs users in with a device code and with a browser. Then every
//! configuration, account, identity, token and session type (the SASL exchange and the
//! credentials it yields) is formatted with `{:?}` and `{}`, and
//! neither that text nor the captured log may contain the local password (or its base64),
//! the client secret, any access token, refresh token or authorization code.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use common::{CLIENT_ID, Options, PASSWORD, Stage, TENANT, USER};
use secrecy::ExposeSecret;
use smtp_oauth_bridge::oauth::endpoint::Http;
use smtp_oauth_bridge::oauth::login::{self, Method};
use smtp_oauth_bridge::oauth::{State, StatusFile};
use smtp_oauth_bridge::sandbox::TokenEndpointConfig;
use smtp_oauth_bridge::smtp::sasl::{Exchange, Mechanism, Step};
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Identities beyond the stage's own account: a whole domain on one app-only identity, a
/// delegated identity for `login`, and a certificate the endpoint does not know.
fn extra_config(pem: &std::path::Path) -> String {
    format!(
        r#"
[[identities]]
name = "contoso-app"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{secret}"
token_url = "{{TOKEN_URL}}"
upstream = "{{UPSTREAM}}"
upstream_tls = "starttls"

[[identities]]
name = "delegated"
tenant = "{TENANT}"
authority = "{{AUTHORITY}}"
client_id = "55555555-1111-2222-3333-444444444444"
flow = "refresh_token"
upstream = "{{UPSTREAM}}"

[[identities]]
name = "unknown-cert"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_certificate = "{pem}"
token_url = "{{TOKEN_URL}}"
upstream = "{{UPSTREAM}}"

[[accounts]]
name = "everyone"
username = "*@fabrikam.com"
password_hash = "{hash}"
identity = "contoso-app"

[[accounts]]
name = "user"
username = "user@contoso.com"
password_hash = "{hash}"
identity = "delegated"

[[accounts]]
name = "scanner"
username = "scanner@contoso.com"
password_hash = "{hash}"
identity = "unknown-cert"
"#,
        secret = common::client_secret(),
        hash = common::password_hash(),
        pem = pem.display(),
    )
}

/// A writer whose lines reach the test while `login` runs.
struct Lines(std::sync::mpsc::Sender<String>, Vec<u8>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        while let Some(end) = self.1.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.1.drain(..=end).collect();
            let _ = self
                .0
                .send(String::from_utf8_lossy(&line).trim_end().to_string());
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn next_line(rx: &std::sync::mpsc::Receiver<String>, seen: &mut Vec<String>) -> String {
    for _ in 0..1000 {
        if let Ok(line) = rx.try_recv() {
            seen.push(line.clone());
            return line;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("login printed nothing more: {seen:?}");
}

/// Runs `login` for the delegated identity with `method`, playing the user, and returns
/// what it printed.
async fn login(stage: &Stage, http: &Http, method: Method) -> String {
    let identity = stage.shared.config.identity("delegated").unwrap().clone();
    let store = stage.store();
    let (tx, rx) = std::sync::mpsc::channel();
    let (paste_tx, paste_rx) = tokio::sync::mpsc::channel(1);
    let mut out = Lines(tx, Vec::new());
    let request = login::Request {
        method,
        timeout: Duration::from_secs(30),
        pasted: Some(paste_rx),
        login_hint: Some("user@contoso.com"),
    };
    let run = login::login(&identity, http, &store, request, &mut out);
    let user = async {
        let mut seen = Vec::new();
        loop {
            let line = next_line(&rx, &mut seen).await;
            if let Some(code) = line.strip_prefix("Code: ") {
                assert!(
                    stage
                        .token_endpoint
                        .approve_device(code, "user@contoso.com")
                );
            } else if line.trim().starts_with("https://") {
                let answer = stage.browser().get(line.trim()).send().await.unwrap();
                let back = answer.headers()["location"].to_str().unwrap().to_string();
                paste_tx.send(back).await.unwrap();
            } else if line.starts_with("Signed in") {
                return seen.join("\n");
            }
        }
    };
    let (result, printed) = tokio::join!(run, user);
    result.unwrap();
    printed
}

#[tokio::test]
async fn no_secret_in_trace_logs_debug_display_status_or_printed_output() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    // Thread-local: the test runtime is single-threaded, so every task logs here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let (pem, _) = common::rsa_certificate(dir.path(), "not-registered");
    let stage = Stage::start_with(Options {
        flow: "refresh_token",
        prefetch: true,
        config_extra: extra_config(&pem),
        token_config: TokenEndpointConfig {
            device_interval: Duration::from_secs(1),
            ..TokenEndpointConfig::default()
        },
        ..Options::default()
    })
    .await;

    // Sessions: a wrong password, the delegated account, a domain mailbox.
    let mut c = stage.client().await;
    c.ehlo().await;
    assert_eq!(c.auth_plain(USER, "wrong-password-123").await.code(), 535);
    // A client with the fields swapped sends the password as the username.
    assert_eq!(c.auth_plain(PASSWORD, USER).await.code(), 535);
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    let r = c
        .send_message(
            USER,
            &["a@contoso.com"],
            b"Subject: secret test\r\n\r\nbody\r\n",
        )
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(c.cmd("QUIT").await.code(), 221);
    let mut c = stage.client().await;
    c.ehlo().await;
    assert_eq!(c.auth_plain("ann@fabrikam.com", PASSWORD).await.code(), 235);

    // Logins, in this process so their logs are captured too.
    let tls =
        smtp_oauth_bridge::tls::client_config(Some(&stage.dir.path().join("ca.pem")), Vec::new())
            .unwrap();
    let http = Http::new(&tls, Duration::from_secs(10)).unwrap();
    let mut printed = login(&stage, &http, Method::Device).await;
    printed.push_str(&login(&stage, &http, Method::Paste).await);

    let mut secrets: Vec<String> = vec![
        PASSWORD.to_string(),
        "wrong-password-123".to_string(),
        base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}")),
        common::client_secret().to_string(),
        stage.imported_refresh_token.clone().unwrap(),
    ];
    let store = stage.store();
    for identity in ["printer", "delegated", "contoso-app"] {
        let record = store.load(identity).unwrap().unwrap();
        secrets.extend(record.refresh_token.map(|t| t.expose_secret().to_string()));
        secrets.extend(record.access_token.map(|t| t.expose_secret().to_string()));
    }
    let attempts = stage.office365.auth_attempts();
    assert!(attempts.len() >= 2);
    for attempt in &attempts {
        assert!(attempt.token.len() > 1000);
        secrets.push(attempt.token.clone());
    }
    let cached = stage.shared.tokens.token("printer").await.unwrap();
    secrets.push(cached.secret.expose_secret().to_string());

    // Every type that can be formatted, both ways where it offers both.
    let config = &stage.shared.config;
    let mut formatted = format!(
        "{config:?}\n{:?}\n{:?}\n{cached:?}\n{:?}\n{store:?}\n",
        config.tokens,
        stage.shared.tokens,
        stage.shared.tokens.status()
    );
    for account in &config.accounts {
        formatted.push_str(&format!("{account:?}\n{account}\n"));
    }
    for identity in &config.identities {
        formatted.push_str(&format!(
            "{identity:?}\n{identity}\n{:?}\n",
            identity.oauth.credential
        ));
    }
    for identity in ["printer", "delegated", "contoso-app"] {
        formatted.push_str(&format!("{:?}\n", store.load(identity).unwrap()));
    }
    // The session side: the SASL exchanges that carry the local password, and what they
    // yield.
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    let plain = b64(&format!("\0{USER}\0{PASSWORD}"));
    let (exchange, step) = Exchange::start(Mechanism::Plain, Some(plain.as_bytes()));
    assert!(matches!(step, Step::Done(_)));
    formatted.push_str(&format!("{exchange:?}\n{step:?}\n"));
    let (mut exchange, step) = Exchange::start(Mechanism::Login, None);
    formatted.push_str(&format!(
        "{step:?}\n{:?}\n",
        exchange.respond(b64(USER).as_bytes())
    ));
    formatted.push_str(&format!("{exchange:?}\n"));
    let step = exchange.respond(b64(PASSWORD).as_bytes());
    assert!(matches!(step, Step::Done(_)));
    formatted.push_str(&format!("{exchange:?}\n{step:?}\n"));
    let refused = stage.shared.tokens.token("unknown-cert").await.unwrap_err();
    formatted.push_str(&format!("{refused:?}\n{refused}\n"));
    let status_text = std::fs::read_to_string(stage.dir.path().join("state/status.json")).unwrap();
    let status = StatusFile::read(&stage.dir.path().join("state"))
        .unwrap()
        .unwrap();
    let accounts =
        smtp_oauth_bridge::oauth::status::render_accounts(config, Some(&status), true, 0);

    let log = captured.text();
    assert!(log.contains("message relayed"), "the capture works");
    assert!(log.contains("access token obtained"));
    assert!(
        log.contains("AADSTS700027"),
        "the refused certificate is logged"
    );
    assert!(printed.contains("Code: ") && printed.contains("Signed in"));
    assert!(
        status
            .identities
            .iter()
            .any(|i| i.state == State::NeedsLogin)
    );
    for (what, text) in [
        ("the log", &log),
        ("Debug or Display output", &formatted),
        ("the status file", &status_text),
        ("the accounts table", &accounts),
        ("login's output", &printed),
    ] {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "a secret reached {what}");
            // A distinctive piece of a long secret is just as bad as the whole.
            if secret.len() > 64 {
                let middle = &secret[secret.len() / 2..secret.len() / 2 + 32];
                assert!(!text.contains(middle), "part of a secret reached {what}");
            }
        }
    }
    // Authorization codes are secrets too: they were in the redirect, never in the log.
    for line in log.lines().filter(|l| l.contains("code=")) {
        assert!(
            !line.contains("localhost"),
            "a redirect reached the log: {line}"
        );
    }
}
