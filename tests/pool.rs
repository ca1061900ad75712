//! The upstream session pool, told as stories: legacy clients that connect once per message
//! share a few authenticated provider sessions instead of each paying for TLS and AUTH, never
//! exceed the mailbox's concurrent-session limit, and never notice when a pooled session has
//! died or been replaced.

mod common;

use std::time::Duration;

use common::{PASSWORD, Stage, USER, b64, eventually};
use smtp_oauth_bridge::sandbox::{Behaviour, Stage as At};

fn body(n: usize) -> Vec<u8> {
    format!("Subject: message {n}\r\n\r\nbody {n}\r\n").into_bytes()
}

/// Logs in on a new connection, sends one message, says QUIT: a printer's whole visit.
async fn one_message_visit(stage: &Stage, n: usize) -> u16 {
    let mut c = stage.logged_in().await;
    let code = c
        .send_message(USER, &["office@contoso.com"], &body(n))
        .await
        .code();
    assert_eq!(c.cmd("QUIT").await.code(), 221);
    code
}

fn count(commands: &[String], verb: &str) -> usize {
    commands.iter().filter(|c| c.starts_with(verb)).count()
}

#[tokio::test]
async fn a_printer_connecting_per_message_reuses_one_provider_session() {
    let stage = Stage::start().await;
    for n in 0..5 {
        assert_eq!(one_message_visit(&stage, n).await, 250);
    }
    assert_eq!(stage.office365.messages().len(), 5);
    assert_eq!(
        stage.office365.sessions(),
        1,
        "one TLS session for five visits"
    );
    assert_eq!(stage.office365.auth_attempts().len(), 1, "one AUTH XOAUTH2");
    assert_eq!(stage.token_endpoint.request_count(), 1);
    let metrics = stage.shared.metrics.encode();
    for line in [
        "smtp_oauth_bridge_upstream_sessions_total{account=\"printer\",event=\"opened\"} 1",
        "smtp_oauth_bridge_upstream_sessions_total{account=\"printer\",event=\"reused\"} 5",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let commands = stage.office365.commands();
    assert_eq!(
        count(&commands, "RSET"),
        0,
        "a finished message needs no RSET"
    );
    assert_eq!(
        count(&commands, "QUIT"),
        0,
        "the session stays open for the next visit"
    );
    // Each message arrived intact, in order.
    let subjects: Vec<Vec<u8>> = stage
        .office365
        .messages()
        .iter()
        .map(|m| m.data.clone())
        .collect();
    assert_eq!(subjects, (0..5).map(body).collect::<Vec<_>>());
}

#[tokio::test]
async fn an_abandoned_transaction_is_reset_at_the_provider_and_the_session_reused() {
    let stage = Stage::start().await;
    // RSET in the middle of a transaction.
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("RSET").await.code(), 250);
    // QUIT with a transaction open.
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("QUIT").await.code(), 221);
    assert!(c.closed().await);
    assert!(eventually(|| count(&stage.office365.commands(), "RSET") == 2).await);

    // The next client's message starts a clean transaction on the same session: nothing of
    // the abandoned ones leaks into it.
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    let m = stage.office365.messages();
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].rcpt_to, vec!["office@contoso.com"]);
    assert_eq!(stage.office365.sessions(), 1);
}

#[tokio::test]
async fn a_session_idle_past_noop_after_is_checked_with_noop_first() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.pool.noop_after = Duration::from_millis(100);
        })),
        ..common::Options::default()
    })
    .await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    assert_eq!(
        count(&stage.office365.commands(), "NOOP"),
        0,
        "fresh enough"
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(one_message_visit(&stage, 2).await, 250);
    let commands = stage.office365.commands();
    assert_eq!(count(&commands, "NOOP"), 1);
    let noop = commands.iter().position(|c| c == "NOOP").unwrap();
    assert!(commands[noop + 1].starts_with("MAIL"), "{commands:?}");
    assert_eq!(stage.office365.sessions(), 1);
}

#[tokio::test]
async fn a_session_that_carried_max_messages_is_closed_politely() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.pool.max_messages = 2;
        })),
        ..common::Options::default()
    })
    .await;
    for n in 0..5 {
        assert_eq!(one_message_visit(&stage, n).await, 250);
        // A worn-out session is replaced in the background; the next visit comes once the
        // replacement is in the pool.
        assert!(eventually(|| stage.shared.pool.idle_count() == 1).await);
    }
    assert_eq!(stage.office365.messages().len(), 5);
    assert_eq!(count(&stage.office365.commands(), "QUIT"), 2);
    assert_eq!(stage.office365.sessions(), 3, "2 + 2 + 1 messages");
    let metrics = stage.shared.metrics.encode();
    let opened =
        "smtp_oauth_bridge_upstream_sessions_total{account=\"printer\",event=\"opened\"} 3";
    assert!(metrics.lines().any(|l| l == opened), "{metrics}");
}

#[tokio::test]
async fn a_worn_out_session_is_replaced_before_the_next_client_needs_it() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.pool.max_messages = 1;
        })),
        ..common::Options::default()
    })
    .await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    // The session that carried the message is closed, and a new one is opened and pooled
    // with no client waiting.
    assert!(eventually(|| count(&stage.office365.commands(), "QUIT") == 1).await);
    assert!(eventually(|| stage.shared.pool.idle_count() == 1).await);
    assert_eq!(stage.office365.sessions(), 2);
    // The next visit takes it, and its replacement is ready in turn.
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    assert!(eventually(|| count(&stage.office365.commands(), "QUIT") == 2).await);
    assert!(eventually(|| stage.shared.pool.idle_count() == 1).await);
    assert_eq!(stage.office365.sessions(), 3);
    assert_eq!(stage.office365.messages().len(), 2);
}

#[tokio::test]
async fn an_idle_session_is_closed_after_max_idle_and_the_next_visit_opens_a_new_one() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.pool.max_idle = Duration::from_millis(100);
        })),
        ..common::Options::default()
    })
    .await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    // Closed by the bridge, without any client around: it would otherwise hold one of the
    // mailbox's three slots until the provider's own timeout.
    assert!(eventually(|| count(&stage.office365.commands(), "QUIT") == 1).await);
    assert_eq!(stage.shared.pool.idle_count(), 0);
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    assert_eq!(stage.office365.sessions(), 2);
}

#[tokio::test]
async fn a_pooled_session_the_provider_timed_out_is_replaced_before_the_client_notices() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        idle_timeout: Some(Duration::from_millis(100)),
        ..Behaviour::default()
    });
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    // The provider says "421 4.4.1 Connection timed out" and closes; the 421 waits unread in
    // the pooled connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stage.office365.set_behaviour(Behaviour::default());
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    assert_eq!(stage.office365.messages().len(), 2);
    assert_eq!(stage.office365.sessions(), 2);
}

#[tokio::test]
async fn a_pooled_session_that_dies_at_mail_is_replaced_and_the_client_sees_250() {
    let stage = Stage::start().await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    // The pooled session looks alive, but the provider drops it when the next MAIL arrives.
    stage.office365.set_behaviour(Behaviour {
        drop_once_at: Some(At::Mail),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    c.send(&body(1)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.code(), 250);
    assert_eq!(stage.office365.sessions(), 2);
    assert_eq!(stage.office365.messages().len(), 2);
    assert_eq!(stage.office365.messages()[1].data, body(1));

    // The same with a pipelining client: the whole group is sent again on the new session.
    stage.office365.set_behaviour(Behaviour {
        drop_once_at: Some(At::Mail),
        ..Behaviour::default()
    });
    let mut c = stage.client().await;
    c.ehlo().await;
    let auth = b64(&format!("\0{USER}\0{PASSWORD}"));
    c.send(
        format!("AUTH PLAIN {auth}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n")
            .as_bytes(),
    )
    .await;
    for expected in [235, 250, 250, 354] {
        assert_eq!(c.reply().await.code(), expected);
    }
    c.send(&body(2)).await;
    c.send(b".\r\nQUIT\r\n").await;
    assert_eq!(c.reply().await.code(), 250);
    assert_eq!(c.reply().await.code(), 221);
    assert_eq!(stage.office365.messages().len(), 3);
    assert_eq!(stage.office365.messages()[2].rcpt_to, vec!["b@contoso.com"]);
}

#[tokio::test]
async fn a_pipelined_envelope_reaches_the_provider_in_one_write() {
    let stage = Stage::start().await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    let mut c = stage.client().await;
    c.ehlo().await;
    let auth = b64(&format!("\0{USER}\0{PASSWORD}"));
    c.send(
        format!(
            "AUTH PLAIN {auth}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<a@contoso.com>\r\n\
             RCPT TO:<nobody@contoso.com>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(c.reply().await.code());
    }
    assert_eq!(codes, vec![235, 250, 250, 250, 250, 354]);
    c.send(&body(1)).await;
    c.send(b".\r\n").await;
    assert_eq!(c.reply().await.code(), 250);
    let pipelined = stage.office365.pipelined_commands();
    assert_eq!(
        pipelined,
        vec![
            "RCPT TO:<a@contoso.com>",
            "RCPT TO:<nobody@contoso.com>",
            "RCPT TO:<b@contoso.com>",
            "DATA"
        ],
        "RCPT and DATA went out with MAIL"
    );
    assert_eq!(stage.office365.messages()[1].rcpt_to.len(), 3);

    // A refusal inside the group comes back in its place, and the rest goes on.
    stage.office365.behaviour().mail_reply = Some("550 5.1.8 Sender address rejected".to_string());
    c.send(format!("MAIL FROM:<{USER}>\r\nRCPT TO:<a@contoso.com>\r\nDATA\r\n").as_bytes())
        .await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (550, Some("5.1.8")));
    let rcpt = c.reply().await.code();
    let data = c.reply().await.code();
    assert!(rcpt >= 500 && data >= 500, "{rcpt} {data}");
    stage.office365.behaviour().mail_reply = None;
    let r = c.send_message(USER, &["c@contoso.com"], &body(2)).await;
    assert_eq!(r.code(), 250);
    assert_eq!(stage.office365.messages().len(), 3);
    assert_eq!(stage.office365.sessions(), 1);
}

/// Sends one message per client from `clients` connections at once; returns each final code
/// (the MAIL reply when MAIL was refused).
async fn concurrent_visits(stage: &Stage, clients: usize) -> Vec<u16> {
    let visits: Vec<_> = (0..clients)
        .map(|n| {
            let addr = stage.bridge;
            tokio::spawn(async move {
                let mut c = common::SmtpClient::connect(addr).await;
                c.ehlo().await;
                assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
                let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
                if r.code() != 250 {
                    return (r.code(), r.enhanced().map(str::to_string));
                }
                assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
                assert_eq!(c.cmd("DATA").await.code(), 354);
                c.send(&body(n)).await;
                c.send(b".\r\n").await;
                let r = c.reply().await;
                (r.code(), r.enhanced().map(str::to_string))
            })
        })
        .collect();
    let mut codes = Vec::new();
    for visit in visits {
        let (code, enhanced) = visit.await.unwrap();
        assert_ne!(code, 432, "the provider's limit never reaches a client");
        if code != 250 {
            assert_eq!((code, enhanced.as_deref()), (451, Some("4.3.2")));
        }
        codes.push(code);
    }
    codes
}

#[tokio::test]
async fn eight_clients_at_once_share_three_sessions_and_never_see_432() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        max_concurrent_sessions_per_user: Some(3),
        stage_delay: Some((At::EndOfData, Duration::from_millis(100))),
        ..Behaviour::default()
    });
    let codes = concurrent_visits(&stage, 8).await;
    assert_eq!(codes, vec![250; 8], "they waited their turn");
    assert_eq!(stage.office365.messages().len(), 8);
    assert!(
        stage.office365.sessions() <= 3,
        "{}",
        stage.office365.sessions()
    );
    assert!(
        stage.office365.auth_attempts().iter().all(|a| a.token_ok),
        "no AUTH was refused"
    );
}

#[tokio::test]
async fn past_pool_wait_a_client_hears_451_4_3_2_and_nothing_is_half_sent() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.pool.max_sessions = 2;
            c.pool.wait = Duration::from_millis(100);
        })),
        ..common::Options::default()
    })
    .await;
    stage.office365.set_behaviour(Behaviour {
        max_concurrent_sessions_per_user: Some(2),
        stage_delay: Some((At::EndOfData, Duration::from_millis(600))),
        ..Behaviour::default()
    });
    let codes = concurrent_visits(&stage, 4).await;
    let sent = codes.iter().filter(|&&c| c == 250).count();
    assert!(sent >= 2, "{codes:?}");
    assert!(sent < 4, "two had to wait longer than pool.wait: {codes:?}");
    assert_eq!(stage.office365.messages().len(), sent);
    assert!(stage.office365.sessions() <= 2);
}

#[tokio::test]
async fn a_token_refresh_leaves_pooled_sessions_working_and_new_ones_use_the_new_token() {
    let stage = Stage::start().await;
    // Client A is in the middle of a transaction on the first session (token 1).
    let mut a = stage.logged_in().await;
    assert_eq!(a.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(a.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);

    // The token is refreshed (as when it nears its expiry).
    let old = stage.shared.tokens.token("printer").await.unwrap();
    let new = stage.shared.tokens.replace("printer", &old).await.unwrap();
    use secrecy::ExposeSecret;
    assert_ne!(old.secret.expose_secret(), new.secret.expose_secret());

    // Client B needs a second session: it is opened with the new token.
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    // Client A finishes on its session, authenticated with the old token.
    assert_eq!(a.cmd("DATA").await.code(), 354);
    a.send(&body(0)).await;
    a.send(b".\r\n").await;
    assert_eq!(a.reply().await.code(), 250);

    let attempts = stage.office365.auth_attempts();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0].token, old.secret.expose_secret());
    assert_eq!(attempts[1].token, new.secret.expose_secret());
    // Both sessions stay in the pool and keep serving without another AUTH.
    for n in 2..5 {
        assert_eq!(one_message_visit(&stage, n).await, 250);
    }
    assert_eq!(stage.office365.auth_attempts().len(), 2);
    assert_eq!(stage.office365.messages().len(), 5);
}

#[tokio::test]
async fn a_warm_pool_makes_logins_free_and_a_cold_one_still_reports_provider_problems() {
    let stage = Stage::start().await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    // The provider starts refusing new logins (SMTP AUTH switched off for the tenant). The
    // pooled session was authenticated before and still sends.
    stage.office365.set_behaviour(Behaviour {
        auth_reply: Some(
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
                .into(),
        ),
        ..Behaviour::default()
    });
    assert_eq!(one_message_visit(&stage, 1).await, 250);
    assert_eq!(
        stage.office365.auth_attempts().len(),
        1,
        "no AUTH upstream at login"
    );

    // Once the pool is empty, logins are checked at the provider again.
    stage.shared.pool.reconfigure(&stage.shared.config);
    let mut c = stage.client().await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (535, Some("5.7.139")),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn pooled_sessions_say_quit_when_the_bridge_stops() {
    let mut stage = Stage::start().await;
    assert_eq!(one_message_visit(&stage, 0).await, 250);
    assert_eq!(count(&stage.office365.commands(), "QUIT"), 0);
    stage.stop_bridge().await;
    assert!(eventually(|| count(&stage.office365.commands(), "QUIT") == 1).await);
}
