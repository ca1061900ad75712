//! Stories of identities against the fake Entra and Office365: local users sharing one
//! identity, a whole domain behind one app-only identity, certificate credentials (and the
//! fake Entra's check of client assertions, which those stories rely on), tokens
//! obtained at start and shown by `accounts`, a slow token endpoint that clients never wait
//! for long, and a token the provider refuses before it expires.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{CLIENT_ID, Options, PASSWORD, Stage, TENANT, USER};
use secrecy::ExposeSecret;
use smtp_oauth_bridge::oauth::State;
use smtp_oauth_bridge::sandbox::{ClientRegistration, TokenEndpointConfig};

/// An app-only identity shared by two devices and by every mailbox of contoso.com.
fn shared_identity() -> String {
    let hash = common::password_hash();
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

[[accounts]]
name = "front-desk"
username = "frontdesk"
password_hash = "{hash}"
mailbox = "reception@contoso.com"
identity = "contoso-app"

[[accounts]]
name = "back-office"
username = "backoffice"
password_hash = "{hash}"
mailbox = "reception@contoso.com"
identity = "contoso-app"

[[accounts]]
name = "everyone"
username = "*@contoso.com"
password_hash = "{hash}"
identity = "contoso-app"
"#,
        secret = common::client_secret()
    )
}

async fn stage_with_shared_identity() -> Stage {
    Stage::start_with(Options {
        config_extra: shared_identity(),
        ..Options::default()
    })
    .await
}

#[tokio::test]
async fn devices_and_a_whole_domain_share_one_identity_and_one_token() {
    let stage = stage_with_shared_identity().await;
    for (user, mailbox) in [
        ("frontdesk", "reception@contoso.com"),
        ("BackOffice", "reception@contoso.com"),
        ("alice@contoso.com", "alice@contoso.com"),
        ("Bob@Contoso.com", "bob@contoso.com"),
    ] {
        let mut c = stage.client().await;
        c.ehlo().await;
        let r = c.auth_plain(user, PASSWORD).await;
        assert_eq!(r.code(), 235, "{user}: {}", r.text());
        let r = c
            .send_message(mailbox, &["x@example.com"], b"Subject: hi\r\n\r\nhi\r\n")
            .await;
        assert_eq!(r.code(), 250, "{user}: {}", r.text());
        assert_eq!(c.cmd("QUIT").await.code(), 221);
    }
    let attempts = stage.office365.auth_attempts();
    let users: Vec<&str> = attempts.iter().filter_map(|a| a.user.as_deref()).collect();
    // The two devices sending as reception@ share that mailbox's pooled provider session.
    assert_eq!(
        users,
        vec![
            "reception@contoso.com",
            "alice@contoso.com",
            "bob@contoso.com"
        ],
        "each sends as its own mailbox in user="
    );
    assert!(
        attempts.windows(2).all(|w| w[0].token == w[1].token),
        "one token"
    );
    assert_eq!(
        stage.token_endpoint.request_count(),
        1,
        "one request per identity"
    );
    assert_eq!(stage.shared.tokens.request_count("contoso-app"), 1);

    // A wrong password for a domain mailbox, or a mailbox of another domain, gets nothing.
    let mut c = stage.client().await;
    c.ehlo().await;
    assert_eq!(c.auth_plain("carol@contoso.com", "wrong").await.code(), 535);
    assert_eq!(
        c.auth_plain("carol@fabrikam.com", PASSWORD).await.code(),
        535
    );
    assert_eq!(stage.token_endpoint.request_count(), 1);
}

#[tokio::test]
async fn a_certificate_signs_the_client_assertion_in_either_header_style() {
    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = common::rsa_certificate(dir.path(), "bridge-app");
    for (style, alg) in [("x5t#S256", "PS256"), ("x5t", "RS256")] {
        let stage = Stage::start_with(Options {
            credential: Some(format!(
                "client_certificate = \"{}\"\ncertificate_thumbprint = \"{style}\"\n\
                 assertion_algorithm = \"{alg}\"",
                pem.display()
            )),
            token_config: TokenEndpointConfig {
                clients: vec![ClientRegistration::with_certificate(CLIENT_ID, der.clone())],
                ..TokenEndpointConfig::default()
            },
            ..Options::default()
        })
        .await;
        let mut c = stage.logged_in().await;
        let r = c
            .send_message(USER, &["a@example.com"], b"Subject: cert\r\n\r\nhi\r\n")
            .await;
        assert_eq!(r.code(), 250);
        let requests = stage.token_endpoint.requests();
        let request = &requests[0];
        assert!(!request.secret_sent, "no secret with a certificate");
        let assertion = request.assertion.as_ref().expect("an assertion was sent");
        assert!(assertion.valid, "{assertion:?}");
        assert_eq!(assertion.alg, alg);
        assert_eq!(assertion.thumbprint_header, style);
        assert!(assertion.lifetime_secs > 0 && assertion.lifetime_secs <= 600);
    }

    // A certificate the application does not know: the identity needs an administrator.
    let (other, _) = common::rsa_certificate(dir.path(), "unknown-app");
    let stage = Stage::start_with(Options {
        credential: Some(format!("client_certificate = \"{}\"", other.display())),
        token_config: TokenEndpointConfig {
            clients: vec![ClientRegistration::with_certificate(CLIENT_ID, der)],
            ..TokenEndpointConfig::default()
        },
        ..Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (535, Some("5.7.8")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("credential is refused"), "{}", r.text());
    let status = &stage.shared.tokens.status()[0];
    assert_eq!(status.state, State::NeedsLogin);
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("AADSTS700027")
    );
    assert!(
        status
            .hint
            .as_deref()
            .unwrap()
            .contains("upload the certificate")
    );
}

/// The fake Entra's check of client assertions is what makes "valid" above mean something:
/// it refuses every assertion Entra refuses (wrong audience, issuer or subject, a lifetime
/// over ten minutes, outside its time window, no or a replayed `jti`, a bad signature, an
/// unknown thumbprint), and accepts a correct one in either header style.
#[tokio::test]
async fn the_fake_entra_refuses_assertions_entra_would_refuse() {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use smtp_oauth_bridge::config::{ClientCredential, Config};
    use smtp_oauth_bridge::oauth::endpoint::{EndpointError, Http};
    use smtp_oauth_bridge::sandbox::{SandboxCa, TokenEndpoint, TokenRegistry};

    let dir = tempfile::tempdir().unwrap();
    let (pem, der) = common::rsa_certificate(dir.path(), "bridge-app");
    let ca = SandboxCa::generate().unwrap();
    let endpoint = TokenEndpoint::start(
        ca.server_config(&["127.0.0.1"]).unwrap(),
        std::sync::Arc::new(TokenRegistry::new()),
        TokenEndpointConfig {
            clients: vec![ClientRegistration::with_certificate(CLIENT_ID, der.clone())],
            ..TokenEndpointConfig::default()
        },
    )
    .await
    .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let tls = smtp_oauth_bridge::tls::client_config(Some(&ca_file), Vec::new()).unwrap();
    let http = Http::new(&tls, Duration::from_secs(10)).unwrap();
    let config = Config::from_toml_str(&format!(
        "[[accounts]]\nusername = \"{USER}\"\npassword_hash = \"{}\"\ntenant = \"{TENANT}\"\n\
         client_id = \"{CLIENT_ID}\"\nclient_certificate = \"{}\"\n",
        common::password_hash(),
        pem.display()
    ))
    .unwrap();
    let ClientCredential::Certificate(credential) = &config.identities[0].oauth.credential else {
        panic!("a certificate credential");
    };
    let token_url = endpoint.token_url(TENANT);
    let now = smtp_oauth_bridge::store::unix_now();
    let sha256 = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, der.as_ref()));
    let sha1 = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
        der.as_ref(),
    ));
    let mut serial = 0;
    let mut jti = || {
        serial += 1;
        format!("jti-{serial}")
    };
    // An assertion signed with the certificate's key (PS256), from a header and claims.
    let sign = |header: serde_json::Value, claims: serde_json::Value| {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signer = credential
            .key
            .choose_scheme(&[rustls::SignatureScheme::RSA_PSS_SHA256])
            .unwrap();
        let signature = signer.sign(input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))
    };
    let header = serde_json::json!({ "alg": "PS256", "typ": "JWT", "x5t#S256": sha256 });
    let claims = |jti: String| {
        serde_json::json!({
            "aud": token_url, "iss": CLIENT_ID, "sub": CLIENT_ID, "jti": jti,
            "nbf": now, "iat": now, "exp": now + 300,
        })
    };
    let present = |assertion: String| {
        let http = http.clone();
        let token_url = token_url.clone();
        async move {
            let form = [
                ("grant_type", "client_credentials"),
                ("client_id", CLIENT_ID),
                ("scope", "https://outlook.office365.com/.default"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", assertion.as_str()),
            ];
            match http.token(&token_url, &form).await {
                Ok(_) => None,
                Err(EndpointError::OAuth { aadsts, .. }) => aadsts,
                Err(other) => panic!("{other:?}"),
            }
        }
    };

    // Correct ones: hand-made, in both header styles, and the bridge's own.
    let good = sign(header.clone(), claims(jti()));
    assert_eq!(present(good.clone()).await, None);
    let sha1_header = serde_json::json!({ "alg": "PS256", "typ": "JWT", "x5t": sha1 });
    assert_eq!(present(sign(sha1_header, claims(jti()))).await, None);
    let bridge =
        smtp_oauth_bridge::oauth::jwt::client_assertion(credential, CLIENT_ID, &token_url, now)
            .unwrap();
    assert_eq!(present(bridge).await, None);

    let with = |key: &str, value: serde_json::Value, jti: String| {
        let mut c = claims(jti);
        c[key] = value;
        c
    };
    let refused = [
        ("replayed", good.clone(), 700232),
        (
            "no jti",
            sign(header.clone(), with("jti", "".into(), jti())),
            700232,
        ),
        (
            "another audience",
            sign(
                header.clone(),
                with(
                    "aud",
                    "https://login.example.test/t/oauth2/v2.0/token".into(),
                    jti(),
                ),
            ),
            700212,
        ),
        (
            "another issuer",
            sign(header.clone(), with("iss", "someone-else".into(), jti())),
            50048,
        ),
        (
            "another subject",
            sign(header.clone(), with("sub", "someone-else".into(), jti())),
            50048,
        ),
        (
            "valid 15 minutes",
            sign(header.clone(), with("exp", (now + 900).into(), jti())),
            700024,
        ),
        (
            "expired",
            sign(header.clone(), with("exp", (now - 60).into(), jti())),
            700024,
        ),
        (
            "not yet valid",
            sign(header.clone(), with("nbf", (now + 3600).into(), jti())),
            700024,
        ),
        (
            "another certificate",
            sign(
                serde_json::json!({ "alg": "PS256", "x5t#S256": URL_SAFE_NO_PAD.encode([7u8; 32]) }),
                claims(jti()),
            ),
            700027,
        ),
        (
            "a forged signature",
            {
                // One character of the signature changed (not the last, whose low bits are
                // padding).
                let signed = sign(header.clone(), claims(jti()));
                let at = signed.rfind('.').unwrap() + 10;
                let swapped = if &signed[at..=at] == "A" { "B" } else { "A" };
                format!("{}{swapped}{}", &signed[..at], &signed[at + 1..])
            },
            700027,
        ),
    ];
    for (what, assertion, code) in refused {
        assert_eq!(present(assertion).await, Some(code), "{what}");
    }
}

/// Waits (briefly, on the real clock) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn tokens_obtained_at_start_and_accounts_shows_them_without_secrets() {
    let stage = Stage::start_with(Options {
        prefetch: true,
        config_extra: format!(
            "[[accounts]]\nname = \"alerts\"\nusername = \"alerts@contoso.com\"\npassword_hash = \"{}\"\n\
             tenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\nflow = \"refresh_token\"\n\
             token_url = \"https://127.0.0.1:9/t/oauth2/v2.0/token\"\n",
            common::password_hash()
        ),
        ..Options::default()
    })
    .await;
    eventually("the token at start", || {
        stage.shared.tokens.status()[0].state == State::Ok
    })
    .await;
    assert_eq!(
        stage.token_endpoint.request_count(),
        1,
        "before any session"
    );
    let status_file = stage.dir.path().join("state/status.json");
    eventually("the status file", || {
        std::fs::read_to_string(&status_file).is_ok_and(|t| t.contains("needs-login"))
    })
    .await;

    let out = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
        .arg("--config")
        .arg(&stage.config_path)
        .arg("accounts")
        .env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("daemon running"), "{text}");
    let printer = text.lines().find(|l| l.starts_with("printer")).unwrap();
    assert!(
        printer.contains("client_credentials") && printer.contains(" ok "),
        "{printer}"
    );
    assert!(
        printer.contains("in 59m") || printer.contains("in 1h"),
        "{printer}"
    );
    let alerts = text.lines().find(|l| l.starts_with("alerts")).unwrap();
    assert!(alerts.contains("needs-login"), "{alerts}");
    assert!(
        text.contains("hint: run `smtp-oauth-bridge login alerts`"),
        "{text}"
    );

    let token = stage.shared.tokens.token("printer").await.unwrap();
    let status_text = std::fs::read_to_string(&status_file).unwrap();
    for secret in [token.secret.expose_secret(), common::client_secret()] {
        assert!(!text.contains(secret) && !status_text.contains(secret));
    }
}

#[tokio::test]
async fn a_slow_token_endpoint_never_keeps_a_client_waiting_long() {
    let stage = Stage::start().await;
    stage.token_endpoint.set_delay(Duration::from_secs(4));
    let mut c = stage.client().await;
    c.ehlo().await;
    let asked = Instant::now();
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (454, Some("4.7.0")),
        "{}",
        r.text()
    );
    let waited = asked.elapsed();
    assert!(waited < Duration::from_secs(3), "answered after {waited:?}");
    // The request carried on; once it is answered the next login finds the token.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let asked = Instant::now();
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    assert!(asked.elapsed() < Duration::from_secs(2));
    assert_eq!(stage.token_endpoint.request_count(), 1);
}

#[tokio::test]
async fn a_token_the_provider_refuses_is_replaced_once_on_a_new_connection() {
    let stage = Stage::start_with(Options {
        prefetch: true,
        ..Options::default()
    })
    .await;
    eventually("the token at start", || {
        stage.token_endpoint.request_count() == 1
    })
    .await;
    // Revoked before its expiry: the bridge still believes in it.
    let believed = stage.shared.tokens.token("printer").await.unwrap();
    assert!(stage.registry.revoke(believed.secret.expose_secret()));
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@example.com"], b"Subject: retry\r\n\r\nhi\r\n")
        .await;
    assert_eq!(r.code(), 250);
    let attempts = stage.office365.auth_attempts();
    assert_eq!(attempts.len(), 2);
    assert!(!attempts[0].token_ok && attempts[1].token_ok);
    assert_eq!(
        stage.office365.sessions(),
        2,
        "the retry used a new connection"
    );
    assert_eq!(
        stage.token_endpoint.request_count(),
        2,
        "one forced refresh"
    );
}

#[tokio::test]
async fn a_reload_keeps_tokens_of_unchanged_identities_and_retries_a_fixed_one() {
    use smtp_oauth_bridge::config::Config;
    use smtp_oauth_bridge::server::{Bridge, Control};

    let stage = Stage::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config_text = |secret: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[tls]\nextra_ca_file = \"{ca}\"\n\
             [store]\ndirectory = \"{state}\"\n\
             [[identities]]\nname = \"good\"\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{good}\"\ntoken_url = \"{url}\"\nupstream = \"{up}\"\n\
             [[identities]]\nname = \"fixable\"\ntenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret = \"{secret}\"\ntoken_url = \"{url}\"\nupstream = \"{up}\"\n\
             [[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\nidentity = \"good\"\n\
             [[accounts]]\nusername = \"b@contoso.com\"\npassword_hash = \"{hash}\"\nidentity = \"fixable\"\n",
            ca = stage.dir.path().join("ca.pem").display(),
            state = dir.path().display(),
            good = common::client_secret(),
            url = stage.token_endpoint.token_url(TENANT),
            up = format!("127.0.0.1:{}", stage.office365.addr().port()),
            hash = common::password_hash(),
        )
    };
    let bridge = Bridge::start(Config::from_toml_str(&config_text("not-the-secret")).unwrap())
        .await
        .unwrap();
    let shared = bridge.shared();
    let (control, requests) = tokio::sync::mpsc::channel(1);
    let running = tokio::spawn(bridge.run(requests));
    let state_of = |name: &str| {
        shared
            .tokens
            .status()
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.state)
    };
    eventually("both identities tried", || {
        state_of("good") == Some(State::Ok) && state_of("fixable") == Some(State::NeedsLogin)
    })
    .await;
    assert_eq!(stage.token_endpoint.request_count(), 2);

    let fixed = Config::from_toml_str(&config_text(common::client_secret())).unwrap();
    let (answer, answered) = tokio::sync::oneshot::channel();
    control
        .send(Control::Reload(Box::new(fixed), answer))
        .await
        .unwrap_or_else(|_| panic!("the bridge runs"));
    let summary = answered.await.unwrap().unwrap();
    assert!(summary.contains("identity fixable changed"), "{summary}");
    assert!(!summary.contains("identity good"), "{summary}");
    eventually("the fixed identity works", || {
        state_of("fixable") == Some(State::Ok)
    })
    .await;
    assert_eq!(
        stage.token_endpoint.request_count(),
        3,
        "the unchanged identity kept its token; the fixed one was tried at once"
    );
    drop(control);
    running.await.unwrap();
}

/// `session_wait` counts from the AUTH: a slow password check comes out of it rather than
/// being added to it. Both times are real ones, and a busy machine stretches the check, so
/// the check is measured on the bridge itself, just before, and the bound is derived from it.
#[tokio::test]
async fn the_token_wait_counts_from_the_auth_password_check_included() {
    // A costly hash (64 MiB, 8 passes) makes the password check itself take a while.
    use argon2::PasswordHasher;
    let argon = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(64 * 1024, 8, 1, None).unwrap(),
    );
    let costly = argon
        .hash_password(b"scanner-password")
        .unwrap()
        .to_string();

    let wait = Duration::from_secs(1);
    let stage = Stage::start_with(Options {
        tokens_extra: format!("session_wait = {}", wait.as_secs()),
        config_extra: format!(
            "{}\n[[accounts]]\nname = \"scanner\"\nusername = \"scanner@contoso.com\"\n\
             password_hash = \"{costly}\"\nidentity = \"contoso-app\"\n",
            shared_identity()
        ),
        ..Options::default()
    })
    .await;
    stage.token_endpoint.set_delay(Duration::from_secs(4));
    let mut c = stage.client().await;
    c.ehlo().await;
    // A wrong password is answered as soon as the check is done, with no token involved.
    let asked = Instant::now();
    let r = c.auth_plain("scanner@contoso.com", "wrong-password").await;
    let check = asked.elapsed();
    assert_eq!(r.code(), 535, "{}", r.text());
    assert!(
        check > Duration::from_millis(250),
        "the check took {check:?}: too short to tell the two ways of counting apart"
    );

    let asked = Instant::now();
    let r = c
        .auth_plain("scanner@contoso.com", "scanner-password")
        .await;
    let waited = asked.elapsed();
    assert_eq!(
        (r.code(), r.enhanced()),
        (454, Some("4.7.0")),
        "{}",
        r.text()
    );
    // Counted from the AUTH, the answer comes when the wait or the check ends, whichever is
    // later; counted from the end of the check, a whole wait after it. Half the shorter of
    // the two separates them, and leaves room for a second check slower than the first.
    let bound = check.max(wait) + check.min(wait) / 2;
    assert!(
        waited < bound,
        "answered after {waited:?}, over {bound:?} (the password check takes about {check:?})"
    );
}
