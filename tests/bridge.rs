//! The main job, told as stories: a legacy client logs in with a local password, the bridge
//! gets a token from the (fake) Entra endpoint, and the message reaches the (fake) Office365,
//! which accepts only XOAUTH2 after STARTTLS, byte for byte.

mod common;

use common::{PASSWORD, Stage, USER, b64};
use smtp_oauth_bridge::sandbox::{Behaviour, TokenFailure};

const BODY: &[u8] = b"From: Printer <printer@contoso.com>\r\n\
To: Office <office@contoso.com>\r\n\
Subject: Scan 0042\r\n\
\r\n\
Your scan is attached.\r\n\
..a line that starts with a dot\r\n\
.\r\n";

#[tokio::test]
async fn auth_plain_message_arrives_byte_for_byte_over_xoauth2() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    let ehlo = c.ehlo().await;
    let caps: Vec<String> = ehlo
        .lines()
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    for wanted in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(
            caps.iter().any(|c| c == wanted),
            "EHLO lacks {wanted}: {caps:?}"
        );
    }
    assert!(caps.iter().any(|c| c == "SIZE 157286400"), "{caps:?}");

    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!((r.code(), r.enhanced()), (235, Some("2.7.0")));

    let body = &BODY[..BODY.len() - 3]; // without the last ".\r\n": send_message adds it
    let r = c
        .send_message(USER, &["office@contoso.com", "archive@contoso.com"], body)
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert!(
        r.text().contains("2.0.0 OK"),
        "the upstream's own 250 is relayed: {}",
        r.text()
    );
    assert_eq!(c.cmd("QUIT").await.code(), 221);

    let messages = stage.office365.messages();
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m.mail_from, USER);
    assert_eq!(m.rcpt_to, vec!["office@contoso.com", "archive@contoso.com"]);
    assert_eq!(m.auth_user, USER);
    // The upstream removed dot-stuffing; it received exactly the client's message.
    let expected = b"From: Printer <printer@contoso.com>\r\n\
To: Office <office@contoso.com>\r\n\
Subject: Scan 0042\r\n\
\r\n\
Your scan is attached.\r\n\
.a line that starts with a dot\r\n";
    assert_eq!(
        String::from_utf8_lossy(&m.data),
        String::from_utf8_lossy(expected)
    );

    let attempts = stage.office365.auth_attempts();
    assert_eq!(attempts.len(), 1);
    let a = &attempts[0];
    assert_eq!(a.mechanism, "XOAUTH2");
    assert!(
        a.two_step,
        "the token goes on its own line after 334, never inline"
    );
    assert_eq!(a.user.as_deref(), Some(USER));
    assert!(a.token_ok, "the token is one the endpoint issued");
    assert!(
        a.response_line_len > 2000,
        "tokens are long: {}",
        a.response_line_len
    );

    let requests = stage.token_endpoint.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(
        requests[0].grant_type.as_deref(),
        Some("client_credentials")
    );
    assert_eq!(
        requests[0].scope.as_deref(),
        Some("https://outlook.office365.com/.default")
    );
    assert_eq!(requests[0].tenant, common::TENANT);
}

#[tokio::test]
async fn auth_login_uses_the_exact_prompts_and_accepts_the_username_inline() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(c_line(&r), "334 VXNlcm5hbWU6");
    let r = c.cmd(&b64(USER)).await;
    assert_eq!(c_line(&r), "334 UGFzc3dvcmQ6");
    let r = c.cmd(&b64(PASSWORD)).await;
    assert_eq!(r.code(), 235);
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: login\r\n\r\nhi\r\n")
        .await;
    assert_eq!(r.code(), 250);

    // Minolta copiers and Veeam put the username on the AUTH line.
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd(&format!("AUTH LOGIN {}", b64(USER))).await;
    assert_eq!(c_line(&r), "334 UGFzc3dvcmQ6");
    assert_eq!(c.cmd(&b64(PASSWORD)).await.code(), 235);
    assert_eq!(
        stage.token_endpoint.request_count(),
        1,
        "the cached token serves both sessions"
    );
}

#[tokio::test]
async fn auth_plain_without_initial_response_and_cancel() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd("AUTH PLAIN").await;
    assert_eq!(r.code(), 334);
    let r = c.cmd("*").await;
    assert_eq!((r.code(), r.enhanced()), (501, Some("5.7.0")));
    let r = c.cmd("AUTH PLAIN").await;
    assert_eq!(r.code(), 334);
    let r = c.cmd(&b64(&format!("\0{USER}\0{PASSWORD}"))).await;
    assert_eq!(r.code(), 235);
}

#[tokio::test]
async fn wrong_or_unknown_credentials_never_reach_the_token_endpoint_or_upstream() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, "wrong").await;
    assert_eq!((r.code(), r.enhanced()), (535, Some("5.7.8")));
    let r = c.auth_plain("nobody@contoso.com", PASSWORD).await;
    assert_eq!((r.code(), r.enhanced()), (535, Some("5.7.8")));
    // The username is matched case-insensitively.
    let r = c.auth_plain(&USER.to_uppercase(), "wrong").await;
    assert_eq!(r.code(), 535);
    assert_eq!(stage.token_endpoint.request_count(), 0);
    assert_eq!(stage.office365.sessions(), 0);

    let r = c.auth_plain(&USER.to_uppercase(), PASSWORD).await;
    assert_eq!(
        r.code(),
        235,
        "the right password still works after failures"
    );
}

#[tokio::test]
async fn mail_before_auth_is_refused_and_sequence_errors_get_503() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd("MAIL FROM:<printer@contoso.com>").await;
    assert_eq!((r.code(), r.enhanced()), (530, Some("5.7.0")));
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0{USER}\0{PASSWORD}"))
        ))
        .await;
    assert_eq!(r.code(), 235);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 503);
    assert_eq!(c.cmd("DATA").await.code(), 503);
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(r.code(), 503, "AUTH twice");
    assert_eq!(c.cmd("NOOP").await.code(), 250);
    assert_eq!(c.cmd("VRFY someone").await.code(), 252);
    assert_eq!(c.cmd("HELP").await.code(), 214);
    assert_eq!(c.cmd("FROB").await.code(), 500);
    assert_eq!(stage.office365.messages().len(), 0);
}

#[tokio::test]
async fn malformed_base64_gets_501_and_the_session_goes_on() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd("AUTH PLAIN !!!not-base64!!!").await;
    assert_eq!((r.code(), r.enhanced()), (501, Some("5.5.2")));
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(r.code(), 334);
    let r = c.cmd("%%%").await;
    assert_eq!(r.code(), 501);
    // authzid different from the username is refused.
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("boss@contoso.com\0{USER}\0{PASSWORD}"))
        ))
        .await;
    assert_eq!((r.code(), r.enhanced()), (535, Some("5.7.8")));
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let auth = b64(&format!("\0{USER}\0{PASSWORD}"));
    // RFC 4954 lets a client pipeline MAIL after AUTH PLAIN with an initial response.
    c.send(
        format!(
            "AUTH PLAIN {auth}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<a@contoso.com>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    let codes: Vec<u16> = [
        c.reply().await,
        c.reply().await,
        c.reply().await,
        c.reply().await,
        c.reply().await,
    ]
    .iter()
    .map(|r| r.code())
    .collect();
    assert_eq!(codes, vec![235, 250, 250, 250, 354]);
    c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        .await;
    assert_eq!(c.reply().await.code(), 250);
    assert_eq!(c.reply().await.code(), 221);
    let m = stage.office365.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].rcpt_to.len(), 2);
    assert_eq!(m[0].data, b"Subject: pipelined\r\n\r\nbody\r\n");
}

#[tokio::test]
async fn two_messages_on_one_connection_with_one_token_request() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: one\r\n\r\n1\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(c.cmd("RSET").await.code(), 250);
    let r = c
        .send_message(USER, &["b@contoso.com"], b"Subject: two\r\n\r\n2\r\n")
        .await;
    assert_eq!(r.code(), 250);
    // A transaction abandoned with RSET sends nothing.
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RSET").await.code(), 250);
    let r = c
        .send_message(USER, &["c@contoso.com"], b"Subject: three\r\n\r\n3\r\n")
        .await;
    assert_eq!(r.code(), 250);

    let subjects: Vec<String> = stage
        .office365
        .messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(&m.data)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(
        subjects,
        vec!["Subject: one", "Subject: two", "Subject: three"]
    );

    let mut second = stage.logged_in().await;
    let r = second
        .send_message(USER, &["d@contoso.com"], b"Subject: four\r\n\r\n4\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(
        stage.token_endpoint.request_count(),
        1,
        "never one token request per message"
    );
}

#[tokio::test]
async fn upstream_rejection_after_data_is_relayed_intact_never_250() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start().await;
    let send_as_denied = "554-5.2.252 SendAsDenied; printer@contoso.com not allowed to send as boss@contoso.com;\r\n\
554 5.2.252 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; Failed to process message due to a permanent exception with message [BeginDiagnosticData]Cannot submit message. 0.35250:0A007A8B, 1.36674:0A000000, 1.61250:00000000, 1.45378:02000000, 1.44866:00000000, 1.36674:0A000000, 1.61250:00000000, 1.45378:00000000, 1.44866:18000000, 16.55847:F2040000[EndDiagnosticData]";
    stage.office365.set_behaviour(Behaviour {
        end_of_data_reply: Some(send_as_denied.to_string()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(
            "boss@contoso.com",
            &["a@contoso.com"],
            b"Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(r.code(), 554);
    assert_eq!(r.lines().len(), 2, "multi-line reply kept: {}", r.text());
    assert_eq!(r.enhanced(), Some("5.2.252"));
    assert!(r.text().contains("[EndDiagnosticData]"));
    assert!(stage.office365.messages().is_empty());
    // One warning with the provider's words and the fix `doctor` would print.
    let lines = logs.lines_with("provider refused the message");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(
        lines[0].contains("SendAsDenied") && lines[0].contains("Add-RecipientPermission"),
        "{}",
        lines[0]
    );

    // 4xx stays 4xx.
    stage.office365.set_behaviour(Behaviour {
        rcpt_reply: Some("451 4.3.2 Temporary server error, try later".into()),
        ..Behaviour::default()
    });
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    let r = c.cmd("RCPT TO:<a@contoso.com>").await;
    assert_eq!((r.code(), r.enhanced()), (451, Some("4.3.2")));
}

#[tokio::test]
async fn client_vanishing_mid_data_sends_nothing_upstream() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    c.send(b"Subject: half\r\n\r\nthe first half of a message")
        .await;
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(stage.office365.messages().is_empty());

    // The bridge carries on for the next client.
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: whole\r\n\r\nok\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(stage.office365.messages().len(), 1);
}

#[tokio::test]
async fn upstream_vanishing_mid_data_gives_the_client_451() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        drop_during_data: true,
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let big = "x".repeat(998);
    let mut body = Vec::new();
    for _ in 0..2000 {
        body.extend_from_slice(big.as_bytes());
        body.extend_from_slice(b"\r\n");
    }
    let r = c.send_message(USER, &["a@contoso.com"], &body).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (451, Some("4.4.2")),
        "{}",
        r.text()
    );
    assert!(stage.office365.messages().is_empty());

    // The next transaction on the same client connection reconnects transparently.
    stage.office365.set_behaviour(Behaviour::default());
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: retry\r\n\r\nok\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages().len(), 1);
}

#[tokio::test]
async fn smuggled_end_of_data_stays_inside_the_message() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let body = b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@contoso.com>\r\nRCPT TO:<victim@contoso.com>\r\nDATA\r\nspoofed\r\n";
    let r = c.send_message(USER, &["a@contoso.com"], body).await;
    assert_eq!(r.code(), 250);
    assert_eq!(c.cmd("QUIT").await.code(), 221);
    let m = stage.office365.messages();
    assert_eq!(m.len(), 1, "one message in, one message out");
    let data = String::from_utf8_lossy(&m[0].data);
    // The lone dot after bare LFs is message content (sent stuffed as ".."), and the bare LFs
    // became CRLF; the smuggled commands are text in the one message.
    assert_eq!(
        data,
        "Subject: smuggle\r\n\r\nhello\r\n.\r\nMAIL FROM:<evil@contoso.com>\r\n\
         RCPT TO:<victim@contoso.com>\r\nDATA\r\nspoofed\r\n"
    );
}

#[tokio::test]
async fn a_ten_megabyte_line_is_refused_and_the_session_survives() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let huge = vec![b'A'; 10 * 1024 * 1024];
    let writer = async {
        c.send(&huge).await;
        c.send(b"\r\n").await;
        c.reply().await
    };
    let r = writer.await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.2")));
    assert_eq!(c.cmd("NOOP").await.code(), 250);
}

#[tokio::test]
async fn token_endpoint_failures_map_to_454_or_535() {
    for (failure, code, enhanced) in [
        (TokenFailure::Status500, 454, "4.7.0"),
        (
            TokenFailure::TooManyRequests {
                retry_after_secs: 60,
            },
            454,
            "4.7.0",
        ),
        (TokenFailure::Garbage, 454, "4.7.0"),
        (TokenFailure::TemporarilyUnavailable, 454, "4.7.0"),
        (TokenFailure::InvalidGrant, 535, "5.7.8"),
    ] {
        let stage = Stage::start().await;
        stage.token_endpoint.fail_next(1, failure.clone());
        let mut c = stage.client().await;
        c.ehlo().await;
        let started = std::time::Instant::now();
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(
            (r.code(), r.enhanced()),
            (code, Some(enhanced)),
            "{failure:?}: {}",
            r.text()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "answered promptly"
        );
        assert_eq!(stage.office365.sessions(), 0, "no upstream without a token");
        // A transient failure does not stick: the next login works. Throttling is the
        // exception: the endpoint said when to ask again, and until then clients hear 454
        // at once, without a request.
        let requests = stage.token_endpoint.request_count();
        match failure {
            TokenFailure::TooManyRequests { .. } => {
                let r = c.auth_plain(USER, PASSWORD).await;
                assert_eq!(
                    (r.code(), r.enhanced()),
                    (454, Some("4.7.0")),
                    "{}",
                    r.text()
                );
                assert_eq!(stage.token_endpoint.request_count(), requests);
            }
            _ if code == 454 => {
                assert_eq!(
                    c.auth_plain(USER, PASSWORD).await.code(),
                    235,
                    "{failure:?}"
                );
            }
            _ => {
                // Refused for good: no further request until an administrator acts.
                assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 535);
                assert_eq!(stage.token_endpoint.request_count(), requests);
            }
        }
    }
}

#[tokio::test]
async fn upstream_refusing_the_token_triggers_one_fresh_token_then_gives_up() {
    for refusal in [
        "535 5.7.3 Authentication unsuccessful [SANDBOX01]",
        // Office365's high-volume endpoint, for a token it finds too close to its expiry.
        "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
    ] {
        let stage = Stage::start().await;
        stage.office365.set_behaviour(Behaviour {
            auth_reply: Some(refusal.into()),
            ..Behaviour::default()
        });
        let mut c = stage.client().await;
        c.ehlo().await;
        let r = c.auth_plain(USER, PASSWORD).await;
        assert_eq!(
            (r.code(), r.enhanced()),
            (454, Some("4.7.0")),
            "{refusal}: {}",
            r.text()
        );
        assert_eq!(
            stage.token_endpoint.request_count(),
            2,
            "{refusal}: one retry with a new token"
        );
        let attempts = stage.office365.auth_attempts();
        assert_eq!(attempts.len(), 2, "{refusal}: then it gives up");
        assert_ne!(attempts[0].token, attempts[1].token, "{refusal}");
        assert_eq!(
            stage.office365.sessions(),
            2,
            "{refusal}: on a new connection"
        );
    }

    // SMTP AUTH disabled for the tenant: relayed, no token refresh, no retry, and the log
    // says what to run.
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        auth_reply: Some("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.".into()),
        ..Behaviour::default()
    });
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (535, Some("5.7.139")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("aka.ms/smtp_auth_disabled"));
    assert_eq!(stage.token_endpoint.request_count(), 1);
    assert_eq!(stage.office365.auth_attempts().len(), 1);
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("5.7.139") && l.contains("SmtpClientAuthenticationDisabled $false")),
        "{text}"
    );
}

#[tokio::test]
async fn refresh_token_flow_rotates_and_keeps_the_newest_token_on_disk() {
    let stage = Stage::start_with(common::Options {
        flow: "refresh_token",
        ..common::Options::default()
    })
    .await;
    let imported = stage.imported_refresh_token.clone().unwrap();
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(
            USER,
            &["a@contoso.com"],
            b"Subject: delegated\r\n\r\nhi\r\n",
        )
        .await;
    assert_eq!(r.code(), 250);

    let requests = stage.token_endpoint.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].grant_type.as_deref(), Some("refresh_token"));
    assert!(
        requests[0]
            .scope
            .as_deref()
            .unwrap_or("")
            .contains("SMTP.Send"),
        "scope is sent on refresh"
    );
    let on_disk = stage
        .store()
        .load_refresh_token("printer")
        .unwrap()
        .unwrap();
    use secrecy::ExposeSecret;
    assert_ne!(
        on_disk.expose_secret(),
        imported,
        "the rotated token replaced the imported one"
    );
    assert!(on_disk.expose_secret().starts_with("0.A"));
    let attempts = stage.office365.auth_attempts();
    assert!(attempts[0].token_ok);
}

#[tokio::test]
async fn refresh_token_missing_means_535_with_a_log_hint() {
    let stage = Stage::start_with(common::Options {
        flow: "refresh_token",
        import_refresh_token: false,
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!((r.code(), r.enhanced()), (535, Some("5.7.8")));
    assert_eq!(stage.token_endpoint.request_count(), 0);
}

/// The first line of a reply as the client saw it on the wire.
fn c_line(r: &smtp_oauth_bridge::smtp::Reply) -> String {
    let bytes = r.to_bytes();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

#[tokio::test]
async fn implicit_tls_upstream_like_gmail_465() {
    let stage = Stage::start_with(common::Options {
        implicit_tls: true,
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: 465\r\n\r\nhi\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages().len(), 1);
    assert!(stage.office365.auth_attempts()[0].two_step);
}

#[tokio::test]
async fn an_untrusted_provider_certificate_is_refused() {
    let stage = Stage::start_with(common::Options {
        trust_test_ca: false,
        ..common::Options::default()
    })
    .await;
    // The token endpoint uses the same untrusted CA, so the bridge cannot even get a token:
    // the client hears a temporary failure and no credentials leave the machine.
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (454, Some("4.7.0")),
        "{}",
        r.text()
    );
    assert_eq!(
        stage.token_endpoint.request_count(),
        0,
        "no request over an unverified TLS"
    );
    assert!(stage.office365.auth_attempts().is_empty());
}

#[tokio::test]
async fn injected_bytes_after_the_upstream_starttls_reply_abort_the_connection() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        inject_after_starttls_220: true,
        ..Behaviour::default()
    });
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (454, Some("4.7.0")),
        "{}",
        r.text()
    );
    assert!(
        stage.office365.auth_attempts().is_empty(),
        "no token sent after an injection"
    );
}

#[tokio::test]
async fn a_421_from_the_provider_is_relayed_and_the_session_ends() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        rcpt_reply: Some("421 4.7.0 Too many commands, closing".into()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    let r = c.cmd("RCPT TO:<a@contoso.com>").await;
    assert_eq!((r.code(), r.enhanced()), (421, Some("4.7.0")));
    assert!(
        c.closed().await,
        "after 421 the bridge closes too (RFC 5321 3.8)"
    );
}

#[tokio::test]
async fn repeated_wrong_passwords_end_the_connection() {
    let stage = Stage::start_with(common::Options {
        server_extra: "max_errors = 3".into(),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.ehlo().await;
    for _ in 0..3 {
        assert_eq!(c.auth_plain(USER, "guess").await.code(), 535);
    }
    let r = c.auth_plain(USER, "guess").await;
    assert_eq!(r.code(), 535);
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (421, Some("4.7.0")));
    assert!(c.closed().await);
}

#[tokio::test]
async fn an_overlong_auth_line_gets_500_5_5_6() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.cmd(&format!("AUTH PLAIN {}", "A".repeat(20_000))).await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.6")));
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(r.code(), 334);
    let r = c.cmd(&"B".repeat(20_000)).await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.6")));
    // An AUTH initial response under the 12,288-octet limit is read whole (and here refused
    // only because it is not valid PLAIN data).
    let r = c
        .cmd(&format!("AUTH PLAIN {}", common::b64(&"x".repeat(6000))))
        .await;
    assert_eq!(r.code(), 501);
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
}

/// Old devices greet with HELO. They get a one-line 250 without extensions, the bridge's own
/// replies without enhanced status codes (RFC 2034 applies only after EHLO), and can still
/// log in and send.
#[tokio::test]
async fn a_helo_client_logs_in_and_sends_without_extensions() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    let r = c.cmd("HELO old-printer").await;
    assert_eq!(
        c_line(&r),
        "250 bridge.test",
        "no ESMTP keywords after HELO"
    );
    let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!((r.code(), r.enhanced()), (530, None), "{}", r.text());
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!((r.code(), r.enhanced()), (235, None), "{}", r.text());
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: helo\r\n\r\nhi\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(c.cmd("QUIT").await.code(), 221);
    let m = stage.office365.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].data, b"Subject: helo\r\n\r\nhi\r\n");
    assert_eq!(stage.office365.auth_attempts()[0].mechanism, "XOAUTH2");
}

/// The default configuration listens on IPv6 loopback too (`[::1]:1587`); a client there is a
/// loopback client, so it may log in without TLS and its message goes through.
#[tokio::test]
async fn a_client_on_ipv6_loopback_is_served() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.server.listen = vec!["[::1]:0".parse().unwrap()];
        })),
        ..common::Options::default()
    })
    .await;
    assert!(stage.bridge.is_ipv6(), "{}", stage.bridge);
    let mut c = stage.client().await;
    let caps = common::ehlo_lines(&c.ehlo().await);
    assert!(caps.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{caps:?}");
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: v6\r\n\r\nhi\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages().len(), 1);
}

/// DATA is streamed: while the client is still sending (no final dot yet), most of what it
/// sent has already reached the provider. A bridge that held the message back until the end
/// would have passed on nothing.
#[tokio::test]
async fn message_bytes_reach_the_provider_before_the_client_has_finished() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    let line = format!("{}\r\n", "s".repeat(998));
    let mut body = b"Subject: streamed\r\n\r\n".to_vec();
    while body.len() < 2 * 1024 * 1024 {
        body.extend_from_slice(line.as_bytes());
    }
    c.send(&body).await;
    let sent = body.len() as u64;
    assert!(
        common::eventually(|| stage.office365.data_octets_received() >= sent / 2).await,
        "the provider had {} of {sent} octets before the final dot",
        stage.office365.data_octets_received()
    );
    assert!(stage.office365.messages().is_empty(), "not ended yet");

    c.send(b".\r\n").await;
    let r = c.reply().await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages()[0].data, body);
}
