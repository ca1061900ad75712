//! The Office365 stand-in against a hand-written tokio-rustls SMTP client.

use std::time::Duration;

use super::{SmtpClient, Upstream, upstream, xoauth2};
use crate::sandbox::{Behaviour, Office365Config};

const HOST: &str = "SANDBOX01.outlook.office365.com";
const USER: &str = "alice@sandbox.onmicrosoft.test";

#[tokio::test]
async fn full_submission_with_dot_stuffing() {
    let up = upstream(Office365Config::default()).await;
    let mut plain = SmtpClient::connect(up.office365.addr()).await;

    let greeting = plain.read_reply().await;
    let prefix = format!("220 {HOST} Microsoft ESMTP MAIL Service ready at ");
    assert!(greeting.starts_with(&prefix), "{greeting}");
    assert!(
        greeting.ends_with("]\r\n") && greeting.contains(" +0000 ["),
        "{greeting}"
    );

    assert_eq!(
        plain.command("EHLO client.test").await,
        format!(
            "250-{HOST} Hello [127.0.0.1]\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n\
             250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-STARTTLS\r\n250-8BITMIME\r\n\
             250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
        )
    );
    assert_eq!(
        plain.command("STARTTLS").await,
        "220 2.0.0 SMTP server ready\r\n"
    );
    let mut tls = plain.starttls(&up.ca).await;

    // After TLS the old EHLO no longer counts.
    assert_eq!(
        tls.command("AUTH XOAUTH2").await,
        "503 5.5.2 Send hello first\r\n"
    );
    assert_eq!(
        tls.command("EHLO client.test").await,
        format!(
            "250-{HOST} Hello [127.0.0.1]\r\n250-SIZE 157286400\r\n250-PIPELINING\r\n\
             250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH LOGIN XOAUTH2\r\n250-8BITMIME\r\n\
             250-BINARYMIME\r\n250-CHUNKING\r\n250 SMTPUTF8\r\n"
        )
    );

    let token = up.delegated_token(USER);
    assert_eq!(tls.command("AUTH XOAUTH2").await, "334 \r\n");
    let response = xoauth2(USER, &token);
    assert_eq!(
        tls.command(&response).await,
        "235 2.7.0 Authentication successful\r\n"
    );
    assert_eq!(
        tls.command("AUTH XOAUTH2").await,
        "503 5.5.2 Already authenticated\r\n"
    );

    assert_eq!(
        tls.command(&format!("MAIL FROM:<{USER}> SIZE=80 BODY=8BITMIME"))
            .await,
        "250 2.1.0 Sender OK\r\n"
    );
    assert_eq!(
        tls.command("RCPT TO:<bob@example.test>").await,
        "250 2.1.5 Recipient OK\r\n"
    );
    assert_eq!(
        tls.command("RCPT TO:<carol@example.test> NOTIFY=NEVER")
            .await,
        "250 2.1.5 Recipient OK\r\n"
    );
    assert_eq!(
        tls.command("DATA").await,
        "354 Start mail input; end with <CRLF>.<CRLF>\r\n"
    );
    // Split the body across writes, with the terminator straddling two of them.
    tls.send(b"Subject: dots\r\n\r\n..leading dot\r\n..\r\n")
        .await;
    tls.send(b"...two\r\nend.\r\n\r").await;
    tls.send(b"\n.").await;
    tls.send(b"\r\n").await;
    let reply = tls.read_reply().await;
    let queue_id = {
        let rest = reply.strip_prefix("250 2.0.0 OK <").expect(&reply);
        rest.split('@').next().unwrap().to_string()
    };
    assert_eq!(
        reply,
        format!("250 2.0.0 OK <{queue_id}@{HOST}> [Hostname={HOST}]\r\n")
    );

    let messages = up.office365.messages();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message.data,
        b"Subject: dots\r\n\r\n.leading dot\r\n.\r\n..two\r\nend.\r\n\r\n"
    );
    assert_eq!(message.mail_from, USER);
    assert_eq!(message.mail_params, "SIZE=80 BODY=8BITMIME");
    assert_eq!(message.rcpt_to, ["bob@example.test", "carol@example.test"]);
    assert_eq!(message.auth_user, USER);
    assert_eq!(message.queue_id, queue_id);

    let attempts = up.office365.auth_attempts();
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt.mechanism, "XOAUTH2");
    assert!(attempt.two_step && attempt.token_ok);
    assert_eq!(attempt.user.as_deref(), Some(USER));
    assert_eq!(attempt.response_line_len, response.len());
    assert_eq!(attempt.token, token);
    assert!(!format!("{attempt:?}").contains(&token));

    assert_eq!(
        tls.command("QUIT").await,
        "221 2.0.0 Service closing transmission channel\r\n"
    );
    assert_eq!(up.office365.sessions(), 1);
}

#[tokio::test]
async fn commands_before_tls_and_before_auth() {
    let up = upstream(Office365Config::default()).await;
    let mut plain = SmtpClient::connect(up.office365.addr()).await;
    plain.read_reply().await;
    plain.command("EHLO client.test").await;
    assert_eq!(
        plain.command("AUTH XOAUTH2").await,
        "530 5.7.0 Must issue a STARTTLS command first\r\n"
    );
    assert_eq!(
        plain.command("MAIL FROM:<a@b.test>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]\r\n")
    );
    assert_eq!(plain.command("RSET").await, "250 2.0.0 Resetting\r\n");
    assert_eq!(plain.command("NOOP").await, "250 2.0.0 OK\r\n");
    assert_eq!(
        plain.command("a1 login user \u{7}pass").await,
        "500 5.3.3 Unrecognized command 'a1 login user pass'\r\n"
    );

    let mut tls = up.tls_session().await;
    assert_eq!(
        tls.command("MAIL FROM:<a@b.test>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]\r\n")
    );
    assert_eq!(
        tls.command("RCPT TO:<a@b.test>").await,
        format!("530 5.7.57 Client not authenticated to send mail. [{HOST}]\r\n")
    );
    assert_eq!(
        tls.command("AUTH PLAIN AGEAYg==").await,
        "504 5.7.4 Unrecognized authentication type\r\n"
    );
}

#[tokio::test]
async fn bad_tokens_and_basic_auth_are_refused() {
    let up = upstream(Office365Config::default()).await;
    let mut tls = up.tls_session().await;
    let refused = format!("535 5.7.3 Authentication unsuccessful [{HOST}]\r\n");

    // Unknown token, two-step.
    tls.command("AUTH XOAUTH2").await;
    assert_eq!(tls.command(&xoauth2(USER, "not-a-token")).await, refused);
    // A real token for another mailbox, inline.
    let token = up.delegated_token("mallory@sandbox.onmicrosoft.test");
    assert_eq!(
        tls.command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await,
        refused
    );
    // Expired.
    let expired = up
        .registry
        .issue(
            super::CLIENT_ID,
            Some(USER),
            super::DELEGATED_SCOPE,
            Duration::ZERO,
        )
        .access_token;
    assert_eq!(
        tls.command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &expired)))
            .await,
        refused
    );
    // Wrong audience (Graph).
    let graph = up
        .registry
        .issue(
            super::CLIENT_ID,
            Some(USER),
            "https://graph.microsoft.com/SMTP.Send",
            Duration::from_secs(60),
        )
        .access_token;
    assert_eq!(
        tls.command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &graph)))
            .await,
        refused
    );
    // Malformed blob.
    assert_eq!(
        tls.command("AUTH XOAUTH2 dXNlcj1hQGIAYXV0aD1CZWFyZXIgeAEB")
            .await,
        "535 5.7.3 Authentication unsuccessful\r\n"
    );
    // Cancel.
    tls.command("AUTH XOAUTH2").await;
    assert!(tls.command("*").await.starts_with("501 5.5.2"));
    // Basic authentication runs to the end, then is refused.
    assert_eq!(tls.command("AUTH LOGIN").await, "334 VXNlcm5hbWU6\r\n");
    assert_eq!(tls.command("YWxpY2U=").await, "334 UGFzc3dvcmQ6\r\n");
    assert_eq!(
        tls.command("c2VjcmV0").await,
        format!(
            "535 5.7.139 Authentication unsuccessful, basic authentication is disabled. [{HOST}]\r\n"
        )
    );

    let attempts = up.office365.auth_attempts();
    let summary: Vec<(&str, bool, bool)> = attempts
        .iter()
        .map(|a| (a.mechanism.as_str(), a.two_step, a.token_ok))
        .collect();
    assert_eq!(
        summary,
        [
            ("XOAUTH2", true, false),
            ("XOAUTH2", false, false),
            ("XOAUTH2", false, false),
            ("XOAUTH2", false, false),
            ("XOAUTH2", false, false),
            ("LOGIN", true, false),
        ]
    );
    assert_eq!(attempts[5].user.as_deref(), Some("alice"));
    assert!(attempts[5].token.is_empty());

    // App-only tokens may send as any mailbox.
    let app = up
        .registry
        .issue(
            super::CLIENT_ID,
            None,
            super::APP_SCOPE,
            Duration::from_secs(60),
        )
        .access_token;
    assert_eq!(
        tls.command(&format!(
            "AUTH XOAUTH2 {}",
            xoauth2("anyone@sandbox.onmicrosoft.test", &app)
        ))
        .await,
        "235 2.7.0 Authentication successful\r\n"
    );
}

#[tokio::test]
async fn injected_reply_after_starttls_is_sent_in_one_write() {
    let up = upstream(Office365Config::default()).await;
    up.office365.behaviour().inject_after_starttls_220 = true;
    let mut plain = SmtpClient::connect(up.office365.addr()).await;
    plain.read_reply().await;
    plain.command("EHLO client.test").await;
    plain.send(b"STARTTLS\r\n").await;
    assert_eq!(
        plain.read_raw().await,
        b"220 2.0.0 SMTP server ready\r\n250 injected\r\n"
    );
}

#[tokio::test]
async fn input_pipelined_after_starttls_is_discarded() {
    let up = upstream(Office365Config::default()).await;
    let mut plain = SmtpClient::connect(up.office365.addr()).await;
    plain.read_reply().await;
    plain.command("EHLO client.test").await;
    plain.send(b"STARTTLS\r\nNOOP\r\n").await;
    assert_eq!(plain.read_reply().await, "220 2.0.0 SMTP server ready\r\n");
    let mut tls = plain.starttls(&up.ca).await;
    // Had the NOOP survived, its 250 would come before the EHLO reply.
    let reply = tls.command("EHLO client.test").await;
    assert!(reply.starts_with(&format!("250-{HOST} Hello")), "{reply}");
}

#[tokio::test]
async fn multi_line_end_of_data_reply_is_relayed() {
    let up = upstream(Office365Config::default()).await;
    let long_line = format!(
        "554 5.2.252 SendAsDenied; {USER} not allowed to send as other@example.test; {}",
        "STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; ".repeat(8)
    );
    let reply = format!("554-5.2.252 first line of the diagnostic\r\n{long_line}");
    assert!(reply.len() > 700);
    up.office365.behaviour().end_of_data_reply = Some(reply.clone());

    let mut tls = up.authenticated(USER).await;
    tls.command("MAIL FROM:<other@example.test>").await;
    tls.command("RCPT TO:<bob@example.test>").await;
    tls.command("DATA").await;
    assert_eq!(
        tls.command("Subject: x\r\n\r\nbody\r\n.").await,
        format!("{reply}\r\n")
    );
    assert!(up.office365.messages().is_empty());
    // The transaction is over; the session goes on.
    assert_eq!(tls.command("NOOP").await, "250 2.0.0 OK\r\n");
}

#[tokio::test]
async fn pipelined_transaction_and_bdat() {
    let up = upstream(Office365Config::default()).await;
    let mut tls = up.authenticated(USER).await;
    tls.send(
        format!(
            "MAIL FROM:<{USER}>\r\nRCPT TO:<bob@example.test>\r\nRCPT TO:<x>\r\nRCPT TO:bare\r\n\
             DATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(tls.read_reply().await, "250 2.1.0 Sender OK\r\n");
    assert_eq!(tls.read_reply().await, "250 2.1.5 Recipient OK\r\n");
    assert_eq!(tls.read_reply().await, "250 2.1.5 Recipient OK\r\n");
    assert_eq!(tls.read_reply().await, "501 5.1.3 Invalid address\r\n");
    assert!(tls.read_reply().await.starts_with("354 "));
    // An empty message, then a pipelined command after the terminator.
    tls.send(b".\r\nNOOP\r\n").await;
    assert!(tls.read_reply().await.starts_with("250 2.0.0 OK <"));
    assert_eq!(tls.read_reply().await, "250 2.0.0 OK\r\n");

    // BDAT with exact counts; the chunk may contain anything, dots and CRLFs included.
    tls.send(
        format!(
            "MAIL FROM:<{USER}> BODY=BINARYMIME\r\nRCPT TO:<bob@example.test>\r\n\
             BDAT 7\r\n.\r\nA\0\r\nBDAT 4 LAST\r\nB.\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(tls.read_reply().await, "250 2.1.0 Sender OK\r\n");
    assert_eq!(tls.read_reply().await, "250 2.1.5 Recipient OK\r\n");
    assert_eq!(
        tls.read_reply().await,
        "250 2.0.0 CHUNK received OK, 7 octets\r\n"
    );
    assert!(tls.read_reply().await.starts_with("250 2.0.0 OK <"));
    // BDAT outside a transaction is consumed and refused.
    tls.send(b"BDAT 3\r\nxyzNOOP\r\n").await;
    assert_eq!(
        tls.read_reply().await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );
    assert_eq!(tls.read_reply().await, "250 2.0.0 OK\r\n");
    // DATA before RCPT.
    tls.command(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(
        tls.command("DATA").await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );

    let messages = up.office365.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0].data, b"");
    assert_eq!(messages[0].rcpt_to, ["bob@example.test", "x"]);
    assert_eq!(messages[1].data, b".\r\nA\0\r\nB.\r\n");
    assert_eq!(messages[1].mail_params, "BODY=BINARYMIME");
}

#[tokio::test]
async fn rcpt_before_mail_and_size_limits() {
    let up = upstream(Office365Config {
        max_size: 100,
        ..Office365Config::default()
    })
    .await;
    let mut tls = up.authenticated(USER).await;
    assert_eq!(
        tls.command("RCPT TO:<b@example.test>").await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );
    let too_big = "552 5.3.4 Message size exceeds fixed maximum message size\r\n";
    assert_eq!(
        tls.command(&format!("MAIL FROM:<{USER}> SIZE=101")).await,
        too_big
    );
    tls.command(&format!("MAIL FROM:<{USER}> SIZE=100")).await;
    tls.command("RCPT TO:<b@example.test>").await;
    tls.command("DATA").await;
    let body = format!("{}\r\n.", "x".repeat(200));
    assert_eq!(tls.command(&body).await, too_big);
    assert!(up.office365.messages().is_empty());
    // The session survives and is back to no transaction.
    assert_eq!(
        tls.command("DATA").await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );
    // Overlong ordinary lines are refused without ending the session.
    assert_eq!(
        tls.command(&format!("NOOP {}", "x".repeat(5000))).await,
        "500 5.5.6 Line too long\r\n"
    );
    assert_eq!(tls.command("NOOP").await, "250 2.0.0 OK\r\n");
}

#[tokio::test]
async fn endless_oversized_data_ends_the_session() {
    let up = upstream(Office365Config {
        max_size: 100,
        ..Office365Config::default()
    })
    .await;
    let mut tls = up.authenticated(USER).await;
    tls.command(&format!("MAIL FROM:<{USER}>")).await;
    tls.command("RCPT TO:<b@example.test>").await;
    tls.command("DATA").await;
    // Past twice the limit (at least 1 MiB) without a terminator, the server gives up.
    // Exactly one byte past it, so the server has read everything when it closes (unread
    // input would turn its close into a reset that could swallow the reply).
    let mut body = format!("{}\r\n", "y".repeat(998)).repeat(1_048);
    body.push_str(&"y".repeat(577));
    assert_eq!(body.len(), (1 << 20) + 1);
    tls.send(body.as_bytes()).await;
    assert_eq!(
        tls.read_reply().await,
        "552 5.3.4 Message size exceeds fixed maximum message size\r\n"
    );
    assert!(tls.closed_without_reply().await);
}

#[tokio::test]
async fn concurrent_session_limit_per_mailbox() {
    let up = upstream(Office365Config::default()).await;
    up.office365.behaviour().max_concurrent_sessions_per_user = Some(1);
    let mut first = up.authenticated(USER).await;

    let mut second = up.tls_session().await;
    let token = up.delegated_token(USER);
    assert_eq!(
        second
            .command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await,
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded\r\n"
    );
    // Other mailboxes are not affected.
    let mut other = up.authenticated("bob@sandbox.onmicrosoft.test").await;
    other.command("QUIT").await;

    first.command("QUIT").await;
    drop(first);
    // The slot is released when the first session's task ends, just after its 221.
    let mut accepted = false;
    for _ in 0..50 {
        let reply = second
            .command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await;
        if reply.starts_with("235 ") {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted);
}

#[tokio::test]
async fn behaviour_overrides_and_drop() {
    let up = upstream(Office365Config::default()).await;
    let disabled = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is \
                    disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more \
                    information.";
    up.office365.behaviour().auth_reply = Some(disabled.to_string());
    let mut tls = up.tls_session().await;
    let token = up.delegated_token(USER);
    assert_eq!(
        tls.command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
            .await,
        format!("{disabled}\r\n")
    );
    assert!(up.office365.auth_attempts()[0].token_ok);

    up.office365.set_behaviour(Behaviour {
        mail_reply: Some("451 4.7.500 Server busy".to_string()),
        ..Behaviour::default()
    });
    let mut tls = up.authenticated(USER).await;
    assert_eq!(
        tls.command(&format!("MAIL FROM:<{USER}>")).await,
        "451 4.7.500 Server busy\r\n"
    );
    assert_eq!(
        tls.command("RCPT TO:<b@example.test>").await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );

    up.office365.set_behaviour(Behaviour {
        rcpt_reply: Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound".to_string()),
        data_reply: Some("554 5.6.0 No".to_string()),
        ..Behaviour::default()
    });
    tls.command(&format!("MAIL FROM:<{USER}>")).await;
    assert!(
        tls.command("RCPT TO:<b@example.test>")
            .await
            .starts_with("550 5.1.10")
    );
    assert_eq!(
        tls.command("DATA").await,
        "503 5.5.1 Bad sequence of commands\r\n"
    );

    up.office365.set_behaviour(Behaviour {
        drop_during_data: true,
        reply_delay: Duration::from_millis(50),
        ..Behaviour::default()
    });
    tls.command("RSET").await;
    tls.command(&format!("MAIL FROM:<{USER}>")).await;
    tls.command("RCPT TO:<b@example.test>").await;
    tls.command("DATA").await;
    tls.send(b"Subject: lost\r\n").await;
    assert!(tls.closed_without_reply().await);
    assert!(up.office365.messages().is_empty());
}

#[tokio::test]
async fn implicit_tls_and_send_as_check() {
    let ca = crate::sandbox::SandboxCa::generate().unwrap();
    let tls_config = ca.server_config(&["localhost"]).unwrap();
    let registry = std::sync::Arc::new(crate::sandbox::TokenRegistry::new());
    let office365 = crate::sandbox::Office365::start_implicit_tls(
        tls_config,
        std::sync::Arc::clone(&registry),
        Office365Config::default(),
    )
    .await
    .unwrap();
    office365.behaviour().enforce_send_as = true;

    let tcp = tokio::net::TcpStream::connect(office365.addr())
        .await
        .unwrap();
    let mut tls = SmtpClient::wrap(super::tls_connect(tcp, &ca).await);
    assert!(tls.read_reply().await.starts_with("220 "));
    let ehlo = tls.command("EHLO client.test").await;
    assert!(ehlo.contains("250-AUTH LOGIN XOAUTH2") && !ehlo.contains("STARTTLS"));
    assert_eq!(
        tls.command("STARTTLS").await,
        "503 5.5.1 TLS already active\r\n"
    );
    let token = registry
        .issue(
            super::CLIENT_ID,
            Some(USER),
            super::DELEGATED_SCOPE,
            Duration::from_secs(60),
        )
        .access_token;
    tls.command(&format!("AUTH XOAUTH2 {}", xoauth2(USER, &token)))
        .await;
    let denied =
        format!("554 5.2.252 SendAsDenied; {USER} not allowed to send as boss@example.test;");
    let own_header = format!("From: Me <{USER}>\r\n\r\nhi\r\n.");
    let cases = [
        // Another envelope sender.
        ("boss@example.test", "hi\r\n.", denied.as_str(), 0),
        // The mailbox's own envelope, another address in the header.
        (
            USER,
            "From: The Boss <Boss@Example.test>\r\nSubject: hi\r\n\r\nhi\r\n.",
            &denied,
            0,
        ),
        // Its own address in both places.
        (USER, &own_header, "250 ", 1),
    ];
    for (sender, message, expected, stored) in cases {
        tls.command(&format!("MAIL FROM:<{sender}>")).await;
        tls.command("RCPT TO:<b@example.test>").await;
        tls.command("DATA").await;
        let reply = tls.command(message).await;
        assert!(reply.starts_with(expected), "{sender}: {reply}");
        assert_eq!(office365.messages().len(), stored, "{sender}");
    }
}

#[tokio::test]
async fn long_xoauth2_lines_up_to_16_kib() {
    let up: Upstream = upstream(Office365Config::default()).await;
    let mut tls = up.tls_session().await;
    // A 10,000-character token: unknown, but the line must be read whole and answered.
    let response = xoauth2(USER, &"t".repeat(10_000));
    assert!(response.len() > 13_000);
    tls.command("AUTH XOAUTH2").await;
    assert!(tls.command(&response).await.starts_with("535 5.7.3"));
    assert_eq!(
        up.office365.auth_attempts()[0].response_line_len,
        response.len()
    );
    // Beyond 16 KiB the exchange is refused and the session ends.
    tls.command("AUTH XOAUTH2").await;
    let reply = tls.command(&"A".repeat(17_000)).await;
    assert_eq!(
        reply,
        "500 5.5.6 Authentication exchange line is too long\r\n"
    );
}
