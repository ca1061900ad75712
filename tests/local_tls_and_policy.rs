//! The bridge's own TLS and its policies: STARTTLS and implicit TLS for clients, AUTH only
//! where the password cannot be read on the way, never an open relay, devices without a login
//! mapped to an account by address, and senders an account may not use refused before the
//! provider hears of them.

mod common;

use std::net::IpAddr;

use common::{PASSWORD, SmtpClient, Stage, USER};

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn tls() -> common::Options {
    common::Options {
        local_tls: true,
        ..common::Options::default()
    }
}

#[tokio::test]
async fn starttls_forgets_the_plaintext_ehlo_and_carries_the_session() {
    let stage = Stage::start_with(tls()).await;
    let pem = stage.local_cert_pem.clone().unwrap();
    let mut c = stage.client().await;
    let before = common::ehlo_lines(&c.ehlo().await);
    assert!(before.iter().any(|l| l == "STARTTLS"), "{before:?}");
    assert!(
        before.iter().any(|l| l == "AUTH PLAIN LOGIN"),
        "loopback may log in in clear"
    );
    let mut c = c.starttls(&pem).await;
    // What was said before TLS counts for nothing: EHLO again first.
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!((r.code(), r.enhanced()), (503, None), "{}", r.text());
    let after = common::ehlo_lines(&c.ehlo().await);
    assert!(!after.iter().any(|l| l == "STARTTLS"), "{after:?}");
    assert!(after.iter().any(|l| l == "AUTH PLAIN LOGIN"));
    let r = c.cmd("STARTTLS").await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (503, Some("5.5.1")),
        "TLS already active"
    );
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: tls\r\n\r\nsecret\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(
        stage.office365.messages()[0].data,
        b"Subject: tls\r\n\r\nsecret\r\n"
    );
}

#[tokio::test]
async fn the_implicit_tls_listener_speaks_smtp_inside_tls() {
    let stage = Stage::start_with(common::Options {
        local_tls: true,
        implicit_tls_listener: true,
        ..common::Options::default()
    })
    .await;
    let pem = stage.local_cert_pem.clone().unwrap();
    let mut c = SmtpClient::connect_tls(stage.bridge_implicit_tls.unwrap(), &pem).await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(!ehlo.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: 465\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250);
}

/// `plaintext_auth = "never"` puts every client where a non-loopback client always is.
#[tokio::test]
async fn where_plaintext_auth_is_not_allowed_auth_needs_starttls_first() {
    let stage = Stage::start_with(common::Options {
        local_tls: true,
        tweak: Some(Box::new(|c| {
            c.server.plaintext_auth = smtp_oauth_bridge::config::PlaintextAuth::Never;
        })),
        ..common::Options::default()
    })
    .await;
    let pem = stage.local_cert_pem.clone().unwrap();
    let mut c = stage.client().await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(ehlo.iter().any(|l| l == "STARTTLS"), "{ehlo:?}");
    assert!(
        !ehlo.iter().any(|l| l.starts_with("AUTH")),
        "no AUTH offered in clear: {ehlo:?}"
    );
    for attempt in [
        format!(
            "AUTH PLAIN {}",
            common::b64(&format!("\0{USER}\0{PASSWORD}"))
        ),
        "AUTH LOGIN".to_string(),
        format!("MAIL FROM:<{USER}>"),
    ] {
        let r = c.cmd(&attempt).await;
        assert_eq!(r.code(), 530, "{attempt}");
        assert_eq!(r.text(), "5.7.0 Must issue a STARTTLS command first");
    }
    assert_eq!(stage.token_endpoint.request_count(), 0);
    let mut c = c.starttls(&pem).await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(ehlo.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
}

#[tokio::test]
async fn the_bridge_is_never_an_open_relay() {
    let stage = Stage::start().await;
    for source in ["127.0.0.1", "127.0.0.2"] {
        let mut c = SmtpClient::connect_from(stage.bridge, ip(source)).await;
        c.ehlo().await;
        for line in [
            "MAIL FROM:<anyone@example.com>",
            "RCPT TO:<victim@example.com>",
            "DATA",
        ] {
            let r = c.cmd(line).await;
            assert_eq!(
                (r.code(), r.enhanced()),
                (530, Some("5.7.0")),
                "{source} {line}"
            );
        }
    }
    assert_eq!(
        stage.office365.sessions(),
        0,
        "nothing reached the provider"
    );
    assert_eq!(stage.token_endpoint.request_count(), 0);
}

#[tokio::test]
async fn listed_sources_send_as_their_account_without_logging_in() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start_with(common::Options {
        account_extra: "no_auth_sources = [\"127.0.0.2\"]".into(),
        ..common::Options::default()
    })
    .await;
    let mut scanner = SmtpClient::connect_from(stage.bridge, ip("127.0.0.2")).await;
    scanner.ehlo().await;
    let r = scanner
        .send_message(USER, &["a@contoso.com"], b"Subject: scan\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    let m = &stage.office365.messages()[0];
    assert_eq!(m.auth_user, USER, "sent as the mapped account");
    assert_eq!(logs.lines_with("without AUTH").len(), 1);

    // Any other address still has to log in.
    let mut other = SmtpClient::connect_from(stage.bridge, ip("127.0.0.3")).await;
    other.ehlo().await;
    let r = other.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!((r.code(), r.enhanced()), (530, Some("5.7.0")));
}

#[tokio::test]
async fn a_sender_outside_allowed_senders_is_refused_before_the_provider_hears_of_it() {
    let stage = Stage::start_with(common::Options {
        account_extra: "allowed_senders = [\"printer@contoso.com\", \"@scans.contoso.com\"]".into(),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    for sender in ["boss@contoso.com", "printer@contoso.com.evil.test", ""] {
        let r = c.cmd(&format!("MAIL FROM:<{sender}>")).await;
        assert_eq!(
            (r.code(), r.enhanced()),
            (550, Some("5.7.60")),
            "{sender:?}"
        );
    }
    assert!(
        !stage
            .office365
            .commands()
            .iter()
            .any(|l| l.starts_with("MAIL")),
        "no refused MAIL reached the provider"
    );
    for sender in ["Printer@Contoso.com", "tray2@scans.contoso.com"] {
        let r = c
            .send_message(sender, &["a@contoso.com"], b"Subject: ok\r\n\r\nx\r\n")
            .await;
        assert_eq!(r.code(), 250, "{sender}: {}", r.text());
    }
}

#[tokio::test]
async fn a_from_header_outside_allowed_senders_never_reaches_the_provider() {
    let stage = Stage::start_with(common::Options {
        account_extra: "allowed_senders = [\"printer@contoso.com\"]\ncheck_from_header = true"
            .into(),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    let refused: [&[u8]; 5] = [
        b"From: Boss <boss@contoso.com>\r\nSubject: x\r\n\r\nbody\r\n",
        b"From: printer@contoso.com, boss@contoso.com\r\n\r\nbody\r\n",
        b"Subject: no From at all\r\n\r\nbody\r\n",
        // Dot-stuffed lines the provider would store as a second From: and as a folded one.
        b".From: boss@contoso.com\r\nFrom: printer@contoso.com\r\n\r\nbody\r\n",
        b"From: printer@contoso.com\r\n. , boss@contoso.com\r\n\r\nbody\r\n",
    ];
    for body in refused {
        let r = c.send_message(USER, &["a@contoso.com"], body).await;
        assert_eq!(
            (r.code(), r.enhanced()),
            (550, Some("5.7.60")),
            "{}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
    }
    assert!(
        !stage.office365.commands().iter().any(|l| l == "DATA"),
        "the provider never got DATA for a refused message"
    );
    assert!(stage.office365.messages().is_empty());

    // An allowed From:, its header arriving in pieces, goes through byte for byte.
    let body = b"From: Printer\r\n <PRINTER@contoso.com>\r\nSubject: scan\r\n\r\n.hello\r\n";
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    for piece in [&body[..7], &body[7..30], &body[30..]] {
        c.send(piece).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(
        stage.office365.messages()[0].data,
        b"From: Printer\r\n <PRINTER@contoso.com>\r\nSubject: scan\r\n\r\nhello\r\n"
    );
}

#[tokio::test]
async fn a_provider_refusing_data_after_the_from_check_leaves_no_transaction_open() {
    use smtp_oauth_bridge::sandbox::Behaviour;
    let stage = Stage::start_with(common::Options {
        account_extra: "allowed_senders = [\"printer@contoso.com\"]\ncheck_from_header = true"
            .into(),
        ..common::Options::default()
    })
    .await;
    stage.office365.set_behaviour(Behaviour {
        data_reply: Some("451 4.7.500 Server busy. Please try again later".into()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let body = b"From: printer@contoso.com\r\nSubject: busy\r\n\r\nx\r\n";
    let r = c.send_message(USER, &["a@contoso.com"], body).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (451, Some("4.7.500")),
        "{}",
        r.text()
    );
    // The client was told the transaction is over; so must the provider have been, or the
    // retry (and every later client of the pooled session) hears 503 for its MAIL.
    stage.office365.set_behaviour(Behaviour::default());
    let r = c.send_message(USER, &["a@contoso.com"], body).await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages().len(), 1);
}
