//! Secrets never reach a log line or a `Debug` string: a whole delegated session (local login,
//! token refresh with rotation, XOAUTH2 upstream, a message) runs with every log level on, and
//! neither the captured log nor the formatted configuration may contain the local password,
//! its base64 form, the client secret, any access token or any refresh token.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::{PASSWORD, Stage, USER};
use secrecy::ExposeSecret;
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

#[tokio::test]
async fn no_secret_in_trace_logs_or_debug_output() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    // Thread-local: the test runtime is single-threaded, so every task logs here.
    let _guard = tracing::subscriber::set_default(subscriber);

    let stage = Stage::start_with(common::Options {
        flow: "refresh_token",
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.ehlo().await;
    // A wrong password first: failed logins are logged, the password must not be.
    assert_eq!(c.auth_plain(USER, "wrong-password-123").await.code(), 535);
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

    let mut secrets: Vec<String> = vec![
        PASSWORD.to_string(),
        "wrong-password-123".to_string(),
        base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}")),
        common::client_secret().to_string(),
        stage.imported_refresh_token.clone().unwrap(),
        stage
            .store()
            .load_refresh_token("printer")
            .unwrap()
            .unwrap()
            .expose_secret()
            .to_string(),
    ];
    let attempts = stage.office365.auth_attempts();
    assert!(!attempts.is_empty());
    for attempt in &attempts {
        assert!(attempt.token.len() > 1000);
        secrets.push(attempt.token.clone());
    }
    let cached = stage.shared.tokens.token("printer").await.unwrap();
    secrets.push(cached.secret.expose_secret().to_string());

    let debug = format!(
        "{:?}\n{:?}\n{:?}",
        stage.shared.config, stage.shared.config.accounts, cached
    );
    let log = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(log.contains("message relayed"), "the capture works: {log}");
    assert!(log.contains("access token obtained"));
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret reached the log");
        assert!(
            !debug.contains(secret.as_str()),
            "a secret reached Debug output"
        );
        // A distinctive piece of a long secret is just as bad as the whole.
        if secret.len() > 64 {
            let middle = &secret[secret.len() / 2..secret.len() / 2 + 32];
            assert!(!log.contains(middle), "part of a secret reached the log");
        }
    }
}
