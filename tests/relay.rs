//! The relay is faithful: what the client sends is what the provider gets (UTF-8 addresses,
//! 8-bit bodies, DSN and SIZE parameters), what the provider answers is what the client hears
//! (4xx stays 4xx, 5xx is relayed once and never retried, long replies stay valid SMTP), and a
//! client that keeps its connection gets a working upstream for every transaction.

mod common;

use std::time::Duration;

use common::{Stage, USER};
use smtp_oauth_bridge::sandbox::{Behaviour, Stage as At};

#[tokio::test]
async fn smtputf8_addresses_and_8bit_bodies_arrive_byte_for_byte() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let r = c.cmd("MAIL FROM:<grüße@exämple.test> SMTPUTF8").await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(c.cmd("RCPT TO:<日本@例え.テスト>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    let mut body = "Subject: Grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        .as_bytes()
        .to_vec();
    body.extend_from_slice("naïve café ✓\r\n".as_bytes());
    // Latin-1 bytes, invalid UTF-8 and a NUL are content too, and stay as they are.
    body.extend_from_slice(b"caf\xe9 \xff\xfe \x00 \x80\r\n");
    c.send(&body).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.code(), 250);
    let m = &stage.office365.messages()[0];
    assert_eq!(m.mail_from, "grüße@exämple.test");
    assert_eq!(m.mail_params, "SMTPUTF8");
    assert_eq!(m.rcpt_to, ["日本@例え.テスト"]);
    assert_eq!(m.data, body);
}

#[tokio::test]
async fn dsn_and_size_parameters_pass_through_unchanged() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(
        ehlo.iter().any(|l| l == "DSN"),
        "Office365 accounts: DSN offered: {ehlo:?}"
    );
    let mail = format!("MAIL FROM:<{USER}> SIZE=1234 RET=HDRS ENVID=QQ314159 BODY=8BITMIME");
    let rcpt = "RCPT TO:<a@contoso.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@contoso.com";
    assert_eq!(c.cmd(&mail).await.code(), 250);
    assert_eq!(c.cmd(rcpt).await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    c.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code(), 250);
    let received = stage.office365.commands();
    assert!(received.contains(&mail), "{received:?}");
    assert!(received.contains(&rcpt.to_string()), "{received:?}");
    assert_eq!(
        stage.office365.messages()[0].mail_params,
        "SIZE=1234 RET=HDRS ENVID=QQ314159 BODY=8BITMIME"
    );
}

#[tokio::test]
async fn a_700_octet_reply_line_reaches_the_client_as_valid_smtp_lines() {
    let stage = Stage::start().await;
    let diagnostic =
        "0.35250:0A007A8B, 1.36674:0A000000, 1.61250:00000000, 1.45378:02000000, ".repeat(8);
    let reply = format!(
        "554 5.2.252 SendAsDenied; printer@contoso.com not allowed to send as boss@contoso.com; \
         STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied; \
         [BeginDiagnosticData]{diagnostic}[EndDiagnosticData]"
    );
    assert!(reply.len() > 700);
    stage.office365.set_behaviour(Behaviour {
        end_of_data_reply: Some(reply.clone()),
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
    let wire = r.to_bytes();
    assert_eq!((r.code(), r.enhanced()), (554, Some("5.2.252")));
    assert!(r.lines().len() >= 2, "wrapped: {}", r.text());
    for line in wire.split_inclusive(|&b| b == b'\n') {
        assert!(line.len() <= 512, "{} octets", line.len());
        assert!(line.starts_with(b"554-5.2.252 ") || line.starts_with(b"554 5.2.252 "));
    }
    // Every word of the provider's text is there, in order.
    let words = |text: &str| -> Vec<String> {
        text.split_whitespace()
            .filter(|w| *w != "5.2.252" && *w != "554")
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(words(&r.text()), words(&reply));
}

/// The provider's 432, 451 and 554 at MAIL, RCPT, DATA and after the message: the client
/// hears exactly that, the command went up once, and the client can carry on.
#[tokio::test]
async fn provider_replies_at_every_stage_are_relayed_once_and_never_retried() {
    let replies = [
        "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
        "451 4.7.500 Server busy. Please try again later",
        "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
    ];
    for at in [At::Mail, At::Rcpt, At::Data, At::EndOfData] {
        for reply in replies {
            let stage = Stage::start().await;
            let mut behaviour = Behaviour::default();
            match at {
                At::Mail => behaviour.mail_reply = Some(reply.into()),
                At::Rcpt => behaviour.rcpt_reply = Some(reply.into()),
                At::Data => behaviour.data_reply = Some(reply.into()),
                _ => behaviour.end_of_data_reply = Some(reply.into()),
            }
            stage.office365.set_behaviour(behaviour);
            let mut c = stage.logged_in().await;
            let mut r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
            if at != At::Mail {
                r = c.cmd("RCPT TO:<a@contoso.com>").await;
            }
            if matches!(at, At::Data | At::EndOfData) {
                r = c.cmd("DATA").await;
            }
            if at == At::EndOfData {
                assert_eq!(r.code(), 354);
                c.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
                r = c.reply().await;
            }
            let want_code: u16 = reply[..3].parse().unwrap();
            let want_enhanced = reply.split(' ').nth(1);
            assert_eq!(
                (r.code(), r.enhanced()),
                (want_code, want_enhanced),
                "{at:?} {reply}"
            );
            assert_eq!(r.text(), reply[4..], "{at:?}: the provider's own text");

            let verb = match at {
                At::Mail => "MAIL",
                At::Rcpt => "RCPT",
                _ => "DATA",
            };
            let sent = stage
                .office365
                .commands()
                .iter()
                .filter(|l| l.starts_with(verb))
                .count();
            assert_eq!(sent, 1, "{at:?} {reply}: sent once, never retried");
            assert!(stage.office365.messages().is_empty());

            // The client carries on with the next transaction on the same connection.
            stage.office365.set_behaviour(Behaviour::default());
            assert_eq!(c.cmd("RSET").await.code(), 250);
            let r = c
                .send_message(USER, &["a@contoso.com"], b"Subject: next\r\n\r\nok\r\n")
                .await;
            assert_eq!(r.code(), 250, "{at:?} {reply}: {}", r.text());
        }
    }
}

/// A refusal before the message (a sender the provider will not take stops every message)
/// is one warning with the provider's words and the known fix; a refused recipient is the
/// client's business and stays below info.
#[tokio::test]
async fn provider_refusals_of_the_envelope_are_logged_with_their_fix() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        mail_reply: Some("530 5.7.57 Client not authenticated to send mail".into()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 530);
    let lines = logs.lines_with("provider refused MAIL");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    let line = &lines[0];
    for wanted in [
        "WARN",
        "account=",
        "code=530",
        "Client not authenticated to send mail",
        "fix=",
        "lost its login",
    ] {
        assert!(line.contains(wanted), "{wanted} missing: {line}");
    }

    stage.office365.set_behaviour(Behaviour {
        rcpt_reply: Some("550 5.1.10 RESOLVER.ADR.RecipientNotFound".into()),
        data_reply: Some(
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException".into(),
        ),
        ..Behaviour::default()
    });
    assert_eq!(c.cmd("RSET").await.code(), 250);
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<nobody@contoso.com>").await.code(), 550);
    assert!(
        logs.lines_with("RecipientNotFound").is_empty(),
        "{}",
        logs.text()
    );
    stage.office365.behaviour().rcpt_reply = None;
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 554);
    let lines = logs.lines_with("provider refused DATA");
    assert_eq!(lines.len(), 1, "{}", logs.text());
    assert!(lines[0].contains("24-hour window"), "{}", lines[0]);
}

#[tokio::test]
async fn provider_refusals_at_auth_become_a_temporary_failure_once() {
    for reply in ["451 4.7.500 Server busy", "554 5.6.0 Something permanent"] {
        let (_guard, logs) = common::capture_logs();
        let stage = Stage::start().await;
        stage.office365.set_behaviour(Behaviour {
            auth_reply: Some(reply.into()),
            ..Behaviour::default()
        });
        let mut c = stage.client().await;
        c.ehlo().await;
        let r = c.auth_plain(USER, common::PASSWORD).await;
        assert_eq!(
            (r.code(), r.enhanced()),
            (454, Some("4.7.0")),
            "{reply}: {}",
            r.text()
        );
        assert!(
            r.text().contains(&reply[..9]),
            "the provider's code is named: {}",
            r.text()
        );
        assert_eq!(
            stage.office365.auth_attempts().len(),
            1,
            "{reply}: not retried"
        );
        // The log has the provider's own words, which is what an administrator searches for.
        let lines = logs.lines_with("cannot open the upstream session");
        assert_eq!(lines.len(), 1, "{reply}: {}", logs.text());
        for wanted in ["WARN", "account=printer", reply] {
            assert!(lines[0].contains(wanted), "{wanted} missing: {}", lines[0]);
        }
    }
}

#[tokio::test]
async fn a_provider_out_of_sessions_for_the_mailbox_means_try_later_never_432() {
    // Something else holds the mailbox's sessions: the provider accepts the token but refuses
    // another session. The login is good; the message is the one to retry.
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        auth_reply: Some("432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded".into()),
        ..Behaviour::default()
    });
    let mut c = stage.client().await;
    c.ehlo().await;
    assert_eq!(c.auth_plain(USER, common::PASSWORD).await.code(), 235);
    let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (451, Some("4.3.2")),
        "{}",
        r.text()
    );
    assert_eq!(stage.token_endpoint.request_count(), 1, "no token refresh");
    assert!(stage.office365.messages().is_empty());

    stage.office365.set_behaviour(Behaviour::default());
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: later\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250);
}

#[tokio::test]
async fn an_upstream_closed_between_messages_is_replaced_transparently() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        close_after_message: true,
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    for n in 1..=3 {
        let body = format!("Subject: {n}\r\n\r\nx\r\n");
        let r = c
            .send_message(USER, &["a@contoso.com"], body.as_bytes())
            .await;
        assert_eq!(r.code(), 250, "message {n}: {}", r.text());
    }
    assert_eq!(stage.office365.messages().len(), 3);
    assert_eq!(
        stage.office365.sessions(),
        3,
        "one fresh connection per message"
    );
    assert_eq!(
        stage.token_endpoint.request_count(),
        1,
        "the cached token is still good"
    );
}

#[tokio::test]
async fn an_old_upstream_connection_is_replaced_before_the_next_message() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.timeouts.upstream_max_age = Duration::from_millis(300);
        })),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: 1\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250);
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: 2\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(stage.office365.sessions(), 1, "young enough to reuse");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: 3\r\n\r\nx\r\n")
        .await;
    assert_eq!(r.code(), 250);
    assert_eq!(stage.office365.sessions(), 2, "replaced once it grew old");
    assert!(
        stage.office365.commands().contains(&"QUIT".to_string()),
        "the old one said goodbye"
    );
    assert_eq!(stage.office365.messages().len(), 3);
}

#[tokio::test]
async fn the_provider_dying_mid_transaction_gives_451_and_the_client_goes_on() {
    for at in [At::Rcpt, At::Data, At::EndOfData] {
        let stage = Stage::start().await;
        stage.office365.set_behaviour(Behaviour {
            drop_at: Some(at),
            ..Behaviour::default()
        });
        let mut c = stage.logged_in().await;
        assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
        let mut r = c.cmd("RCPT TO:<a@contoso.com>").await;
        if at != At::Rcpt {
            r = c.cmd("DATA").await;
        }
        if at == At::EndOfData {
            assert_eq!(r.code(), 354);
            c.send(b"Subject: x\r\n\r\nx\r\n.\r\n").await;
            r = c.reply().await;
        }
        assert_eq!(
            (r.code(), r.enhanced()),
            (451, Some("4.4.2")),
            "{at:?}: {}",
            r.text()
        );
        if at == At::EndOfData {
            assert!(r.text().contains("may not have been sent"), "{}", r.text());
        }
        stage.office365.set_behaviour(Behaviour::default());
        let r = c
            .send_message(USER, &["a@contoso.com"], b"Subject: retry\r\n\r\nok\r\n")
            .await;
        assert_eq!(r.code(), 250, "{at:?}: {}", r.text());
        assert_eq!(stage.office365.messages().len(), 1);
    }
}

#[tokio::test]
async fn a_421_from_the_provider_is_relayed_and_closes_the_channel() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        mail_reply: Some("421 4.3.2 Service not available, closing transmission channel".into()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!((r.code(), r.enhanced()), (421, Some("4.3.2")));
    assert!(c.closed().await, "a 421 means the channel closes");
    stage.office365.set_behaviour(Behaviour::default());
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(
            USER,
            &["a@contoso.com"],
            b"Subject: after 421\r\n\r\nok\r\n",
        )
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
}

/// The bridge's own `max_message_size`, lower than the provider's here so only the bridge can
/// be the one refusing: a declared SIZE over it never reaches the provider, and a message
/// that grows over it is refused after its final dot with nothing kept at the provider.
#[tokio::test]
async fn the_bridge_refuses_oversized_messages_itself_at_mail_and_after_the_data() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| c.server.max_message_size = 1000)),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(ehlo.iter().any(|l| l == "SIZE 1000"), "{ehlo:?}");
    let r = c.cmd(&format!("MAIL FROM:<{USER}> SIZE=1001")).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (552, Some("5.3.4")),
        "{}",
        r.text()
    );
    assert!(
        !stage
            .office365
            .commands()
            .iter()
            .any(|l| l.starts_with("MAIL")),
        "refused before the provider heard of it"
    );

    let mut body = b"Subject: big\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'x', 2000));
    body.extend_from_slice(b"\r\n");
    let r = c.send_message(USER, &["a@contoso.com"], &body).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (552, Some("5.3.4")),
        "{}",
        r.text()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(stage.office365.messages().is_empty(), "no part of it kept");

    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: small\r\n\r\nok\r\n")
        .await;
    assert_eq!(r.code(), 250, "the session goes on: {}", r.text());
    assert_eq!(stage.office365.messages().len(), 1);
}

/// A provider refusing every recipient of a long list ("too many recipients", a throttled
/// mailbox) is worth one warning per message, not one per recipient.
#[tokio::test]
async fn recipients_refused_by_the_provider_give_one_warning_per_message() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        rcpt_reply: Some("452 4.5.3 Too many recipients".into()),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    for round in 0..2 {
        assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
        for i in 0..20 {
            let r = c.cmd(&format!("RCPT TO:<r{i}@contoso.com>")).await;
            assert_eq!((r.code(), r.enhanced()), (452, Some("4.5.3")), "{round}");
        }
        assert_eq!(c.cmd("RSET").await.code(), 250);
    }
    let text = logs.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("4.5.3"))
        .count();
    assert_eq!(warnings, 2, "one per transaction:\n{text}");
}
