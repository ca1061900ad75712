//! `doctor` against the loopback fakes, one failure at a time, as an administrator meets them:
//! each failing check prints ✗ with the fix for that failure (from the hints table where the
//! provider or Entra named it), later checks that depend on it are marked not checked, and the
//! result is false. A healthy account passes every check and the provider receives no mail.

mod common;

use std::path::Path;

use common::{CLIENT_ID, Fakes, TENANT, USER, client_secret, password_hash};

/// Configurations pointing at the fakes.
impl Fakes {
    /// Writes proxy.toml; `account_extra` lines replace defaults of the same key.
    fn write(&self, server_extra: &str, trust_ca: bool, account_extra: &str) -> std::path::PathBuf {
        let ca = if trust_ca {
            format!(
                "[tls]\nextra_ca_file = \"{}\"\n",
                self.dir.path().join("ca.pem").display()
            )
        } else {
            String::new()
        };
        let mut account = format!(
            "name = \"printer\"\nusername = \"{USER}\"\npassword_hash = \"{}\"\n\
             tenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{}\"\n\
             token_url = \"{}\"\nupstream = \"127.0.0.1:{}\"\n",
            password_hash(),
            client_secret(),
            self.token_endpoint.token_url(TENANT),
            self.office365.addr().port()
        );
        for line in account_extra.lines() {
            let key = line.split('=').next().unwrap().trim();
            account = account
                .lines()
                .filter(|l| l.split('=').next().unwrap().trim() != key)
                .map(|l| format!("{l}\n"))
                .collect();
            account.push_str(line);
            account.push('\n');
        }
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{server_extra}\n[store]\ndirectory = \"{}\"\n{ca}\n[[accounts]]\n{account}",
            self.dir.path().join("state").display()
        );
        let path = self.dir.path().join("proxy.toml");
        std::fs::write(&path, text).unwrap();
        path
    }
}

async fn doctor(path: &Path) -> (bool, String) {
    let mut out = Vec::new();
    let ok = smtp_oauth_bridge::ops::doctor::run(path, &mut out).await;
    (ok, String::from_utf8(out).unwrap())
}

/// The fix printed under the ✗ line that contains `check`.
fn fix_for<'a>(text: &'a str, check: &str) -> &'a str {
    let mut lines = text.lines();
    lines
        .by_ref()
        .find(|l| l.contains('✗') && l.contains(check))
        .unwrap_or_else(|| panic!("no ✗ {check} in\n{text}"));
    lines
        .next()
        .and_then(|l| l.trim().strip_prefix("fix: "))
        .unwrap_or_else(|| panic!("no fix under ✗ {check} in\n{text}"))
}

#[tokio::test]
async fn a_healthy_account_passes_every_check_in_order_and_nothing_is_sent() {
    let fakes = Fakes::start().await;
    let (ok, text) = doctor(&fakes.write("", true, "")).await;
    assert!(ok, "{text}");
    let marks: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start().split_once(' '))
        .map(|(mark, rest)| if mark == "✓" { rest } else { "" })
        .collect();
    let order = [
        "configuration parses",
        "SMTP listener 127.0.0.1:0 can be bound",
        "store key: not needed",
        "access token obtained",
        "provider reachable",
        "TLS (TLSv1_3) with a valid certificate for 127.0.0.1",
        "EHLO lists AUTH XOAUTH2",
        "AUTH XOAUTH2 accepted for printer@contoso.com",
    ];
    let mut at = 0;
    for check in order {
        let found = marks[at..]
            .iter()
            .position(|l| l.starts_with(check))
            .unwrap_or_else(|| panic!("✓ {check} missing or out of order in\n{text}"));
        at += found + 1;
    }
    let attempts = fakes.office365.auth_attempts();
    assert_eq!(attempts.len(), 1);
    assert!(attempts[0].token_ok);
    assert!(fakes.office365.messages().is_empty());
}

#[tokio::test]
async fn a_wrong_client_secret_is_named_with_its_aadsts_fix_and_auth_is_not_tried() {
    let fakes = Fakes::start().await;
    let (ok, text) = doctor(&fakes.write("", true, "client_secret = \"wrong\"")).await;
    assert!(!ok);
    assert!(text.contains("AADSTS7000215"), "{text}");
    assert!(
        fix_for(&text, "access token").contains("Value (not its Secret ID)"),
        "{text}"
    );
    // The provider is still checked; only the login needs the token.
    assert!(text.contains("✓ EHLO lists AUTH XOAUTH2"), "{text}");
    assert!(
        text.contains("- AUTH XOAUTH2: not checked (no access token)"),
        "{text}"
    );
    assert!(
        !text.contains("wrong"),
        "the secret must not be printed:\n{text}"
    );
    assert!(fakes.office365.auth_attempts().is_empty());
}

#[tokio::test]
async fn smtp_auth_disabled_at_the_provider_gets_the_set_casmailbox_fix() {
    let fakes = Fakes::start().await;
    fakes.office365.behaviour().auth_reply = Some(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
            .into(),
    );
    let (ok, text) = doctor(&fakes.write("", true, "")).await;
    assert!(!ok);
    assert!(
        text.contains("✗ AUTH XOAUTH2") && text.contains("5.7.139"),
        "{text}"
    );
    assert!(
        fix_for(&text, "AUTH XOAUTH2").contains("Set-CASMailbox"),
        "{text}"
    );
}

#[tokio::test]
async fn an_untrusted_certificate_fails_the_tls_check_with_the_extra_ca_fix() {
    let fakes = Fakes::start().await;
    // Without the test CA the fake's certificate is as untrusted as a TLS-inspecting proxy's.
    let (ok, text) = doctor(&fakes.write("", false, "")).await;
    assert!(!ok);
    assert!(text.contains("✓ provider reachable"), "{text}");
    assert!(fix_for(&text, "TLS").contains("extra_ca_file"), "{text}");
    assert!(
        text.contains("- AUTH XOAUTH2: not checked (no secure session)"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_provider_and_a_busy_listener_are_reported() {
    let fakes = Fakes::start().await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let path = fakes.write("", true, &format!("upstream = \"127.0.0.1:{closed_port}\""));
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"127.0.0.1:0\"", &format!("\"{busy_addr}\""));
    std::fs::write(&path, text).unwrap();
    let (ok, text) = doctor(&path).await;
    assert!(!ok);
    assert!(
        fix_for(&text, &format!("SMTP listener {busy_addr}")).contains("ss -ltnp"),
        "{text}"
    );
    assert!(
        fix_for(&text, "provider 127.0.0.1").contains("reach"),
        "{text}"
    );
    assert!(text.contains("✓ access token obtained"), "{text}");
}

#[tokio::test]
async fn a_missing_store_key_is_reported_and_not_created() {
    let fakes = Fakes::start().await;
    let path = fakes.write("", true, "flow = \"refresh_token\"");
    let (ok, text) = doctor(&path).await;
    assert!(!ok);
    assert!(text.contains("✗ store key: no store key"), "{text}");
    assert!(!fakes.dir.path().join("state").join("store.key").exists());
    assert!(
        !fakes.dir.path().join("state").exists(),
        "doctor created the state directory"
    );
}

#[tokio::test]
async fn a_configuration_error_stops_doctor_at_the_first_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "[server]\nlisten = [\"0.0.0.0:25\"]\n").unwrap();
    let (ok, text) = doctor(&path).await;
    assert!(!ok);
    assert_eq!(
        text.lines().filter(|l| l.starts_with('✗')).count(),
        1,
        "{text}"
    );
    assert!(text.contains("server.listen[0]"), "{text}");
    assert!(fix_for(&text, "configuration").contains("proxy.toml"));
}

/// Under the shipped unit a secret file in /etc/smtp-oauth-bridge/credentials arrives as
/// `$CREDENTIALS_DIRECTORY/smtp-oauth-bridge_NAME`; `client_secret_file = "NAME"` finds it and
/// the token endpoint accepts it. Without the credential the name means nothing.
#[tokio::test]
async fn a_client_secret_handed_over_by_systemd_reaches_the_token_endpoint() {
    let fakes = Fakes::start().await;
    let path = fakes.write("", true, "");
    let text: String = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("client_secret =") {
                "client_secret_file = \"printer-secret\"\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&path, text).unwrap();
    let creds = fakes.dir.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(
        creds.join("smtp-oauth-bridge_printer-secret"),
        format!("{}\n", client_secret()),
    )
    .unwrap();
    let doctor = |credentials: Option<&Path>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"));
        cmd.arg("--config")
            .arg(&path)
            .arg("doctor")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("SMTP_OAUTH_BRIDGE_CONFIG");
        if let Some(dir) = credentials {
            cmd.env("CREDENTIALS_DIRECTORY", dir);
        }
        cmd.output()
    };

    let out = doctor(Some(&creds)).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("✓ access token obtained"), "{text}");
    assert!(!text.contains(client_secret()), "{text}");

    let out = doctor(None).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("✗ configuration") && text.contains("client_secret_file"),
        "{text}"
    );
}
