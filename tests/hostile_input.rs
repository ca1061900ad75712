//! A client that sends anything at all: every bad input gets a defined SMTP reply (or a quick,
//! logged close), never a panic, a hang or a second message smuggled past the bridge.

mod common;

use std::time::{Duration, Instant};

use common::{PASSWORD, Stage, USER, b64};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A MAIL line of exactly `len` octets, CRLF included, made long with DSN parameters the
/// way real clients make long lines.
fn mail_line_of(len: usize) -> String {
    let head = format!("MAIL FROM:<{USER}> RET=HDRS ENVID={}", "Q".repeat(100));
    let pad = len - head.len() - 2;
    format!("{head}{}", " ".repeat(pad))
}

#[tokio::test]
async fn command_lines_up_to_4096_octets_pass_and_longer_get_500_5_5_2() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    for len in [2048, 4096] {
        let line = mail_line_of(len);
        assert_eq!(line.len() + 2, len);
        let r = c.cmd(&line).await;
        assert_eq!(r.code(), 250, "{len}: {}", r.text());
        assert_eq!(c.cmd("RSET").await.code(), 250);
        let received = stage.office365.commands();
        assert!(
            received.contains(&line),
            "the provider got the {len}-octet line unchanged"
        );
    }
    let r = c.cmd(&mail_line_of(4097)).await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.2")));
    assert_eq!(c.cmd("NOOP").await.code(), 250, "the session goes on");
}

#[tokio::test]
async fn auth_lines_up_to_12288_octets_pass_and_longer_get_500_5_5_6() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    // A 12,288-octet answer to the username prompt is read and judged (an unknown user).
    assert_eq!(c.cmd("AUTH LOGIN").await.code(), 334);
    assert_eq!(c.cmd(&"QUFB".repeat(3072)).await.code(), 334);
    assert_eq!(c.cmd(&b64("wrong")).await.code(), 535);
    // One octet more is refused as too long for an AUTH exchange.
    assert_eq!(c.cmd("AUTH LOGIN").await.code(), 334);
    let r = c.cmd(&format!("{}A", "QUFB".repeat(3072))).await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.6")));
    // The same on the AUTH command line itself (initial response).
    let r = c.cmd(&format!("AUTH PLAIN {}", "A".repeat(12_300))).await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.6")));
    let r = c.cmd(&format!("AUTH PLAIN {}", "A".repeat(12_276))).await;
    assert_eq!(
        r.code(),
        501,
        "long but within the limit: decoded and judged"
    );
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
}

#[tokio::test]
async fn nul_bytes_bad_utf8_and_unknown_commands_then_421_after_too_many() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| c.server.max_errors = 4)),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.ehlo().await;
    c.send(b"NO\0OP\r\n").await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.2")));
    c.send(b"MAIL FROM:<\xff\xfe@contoso.com>\r\n").await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.2")));
    let r = c.cmd("FROBNICATE now").await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.1")));
    let r = c.cmd("EXPN staff").await;
    assert_eq!((r.code(), r.enhanced()), (502, Some("5.5.1")));
    // The fifth mistake is one too many.
    let r = c.cmd("XYZZY").await;
    assert_eq!(r.code(), 500);
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (421, Some("4.7.0")));
    assert!(c.closed().await);
}

#[tokio::test]
async fn bad_sasl_input_gets_its_own_reply() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    let cases: Vec<(String, u16, &str)> = vec![
        // Empty authcid.
        (
            format!("AUTH PLAIN {}", b64(&format!("\0\0{PASSWORD}"))),
            535,
            "5.7.8",
        ),
        // authzid naming someone else.
        (
            format!(
                "AUTH PLAIN {}",
                b64(&format!("boss@contoso.com\0{USER}\0{PASSWORD}"))
            ),
            535,
            "5.7.8",
        ),
        // Not base64, and base64 of invalid UTF-8.
        ("AUTH PLAIN ***".into(), 501, "5.5.2"),
        (
            format!(
                "AUTH PLAIN {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    b"\0pr\xffinter\0pw"
                )
            ),
            501,
            "5.5.2",
        ),
        // A lone "=" is an empty response: no credentials.
        ("AUTH PLAIN =".into(), 535, "5.7.8"),
        ("AUTH CRAM-MD5".into(), 504, "5.5.4"),
    ];
    for (line, code, enhanced) in cases {
        let r = c.cmd(&line).await;
        assert_eq!((r.code(), r.enhanced()), (code, Some(enhanced)), "{line}");
    }
    // An empty LOGIN username, and a cancelled exchange.
    assert_eq!(c.cmd("AUTH LOGIN").await.code(), 334);
    let r = c.cmd("").await;
    assert_eq!((r.code(), r.enhanced()), (535, Some("5.7.8")));
    assert_eq!(c.cmd("AUTH LOGIN").await.code(), 334);
    let r = c.cmd("*").await;
    assert_eq!((r.code(), r.enhanced()), (501, Some("5.7.0")));
    assert_eq!(stage.token_endpoint.request_count(), 0);
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
}

#[tokio::test]
async fn commands_out_of_order_get_503() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0{USER}\0{PASSWORD}"))
        ))
        .await;
    assert_eq!((r.code(), r.enhanced()), (503, None), "AUTH before EHLO");
    c.ehlo().await;
    assert_eq!(c.auth_plain(USER, PASSWORD).await.code(), 235);
    let r = c.cmd("RCPT TO:<a@contoso.com>").await;
    assert_eq!((r.code(), r.enhanced()), (503, Some("5.5.1")));
    let r = c.cmd("DATA").await;
    assert_eq!((r.code(), r.enhanced()), (503, Some("5.5.1")));
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    let r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!((r.code(), r.enhanced()), (503, Some("5.5.1")), "MAIL twice");
    let r = c.cmd("DATA").await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (554, Some("5.5.1")),
        "DATA without a recipient"
    );
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0{USER}\0{PASSWORD}"))
        ))
        .await;
    assert_eq!((r.code(), r.enhanced()), (503, Some("5.5.1")), "AUTH twice");
    assert!(stage.office365.messages().is_empty());
}

#[tokio::test]
async fn a_tls_client_on_the_plain_port_is_closed_at_once_with_a_log_line() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start().await;
    let started = Instant::now();
    let tcp = TcpStream::connect(stage.bridge).await.unwrap();
    let result = common::tls_connect(tcp, &stage.ca.ca_pem()).await;
    assert!(result.is_err(), "no TLS on a plain port");
    assert!(started.elapsed() < Duration::from_secs(5), "closed quickly");
    assert!(
        common::eventually(|| logs.lines_with("TLS handshake on a plaintext port").len() == 1)
            .await,
        "one line explains the mismatch: {}",
        logs.text()
    );
}

#[tokio::test]
async fn plaintext_on_the_implicit_tls_port_gets_421_and_a_log_line() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start_with(common::Options {
        local_tls: true,
        implicit_tls_listener: true,
        tweak: Some(Box::new(|c| {
            c.timeouts.tls_handshake = Duration::from_millis(300);
        })),
        ..common::Options::default()
    })
    .await;
    let addr = stage.bridge_implicit_tls.unwrap();

    // A client that speaks first.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"EHLO printer\r\n").await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(
        answer.starts_with("421 4.7.0 This port expects TLS"),
        "{answer}"
    );
    assert_eq!(
        logs.lines_with("plaintext to an implicit-TLS port").len(),
        1
    );

    // A client that waits for a greeting that never comes in clear.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("421 4.7.0"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(
        logs.lines_with("no TLS handshake on an implicit-TLS port")
            .len(),
        1
    );
}

#[tokio::test]
async fn commands_pipelined_after_starttls_are_refused() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start_with(common::Options {
        local_tls: true,
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    c.send(b"EHLO client.test\r\nSTARTTLS\r\nMAIL FROM:<evil@contoso.com>\r\n")
        .await;
    assert_eq!(c.reply().await.code(), 250);
    let r = c.reply().await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (554, Some("5.5.1")),
        "{}",
        r.text()
    );
    assert!(c.closed().await, "no TLS handshake follows");
    assert_eq!(logs.lines_with("pipelined after STARTTLS").len(), 1);
}

#[tokio::test]
async fn every_bare_cr_and_lf_variant_around_a_dot_stays_inside_one_message() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let smuggled =
        "MAIL FROM:<evil@contoso.com>\r\nRCPT TO:<victim@contoso.com>\r\nDATA\r\nspoofed\r\n";
    let variants = [
        "\n.\n", "\n.\r\n", "\r\n.\n", "\r.\r", "\r\n.\r", "\r.\r\n", "\n.\r", "\r.\n",
    ];
    for (i, variant) in variants.iter().enumerate() {
        let body = format!("Subject: variant {i}\r\n\r\nhello{variant}{smuggled}");
        let r = c
            .send_message(USER, &["a@contoso.com"], body.as_bytes())
            .await;
        assert_eq!(r.code(), 250, "variant {variant:?}: {}", r.text());
        let messages = stage.office365.messages();
        assert_eq!(
            messages.len(),
            i + 1,
            "variant {variant:?}: one in, one out"
        );
        let data = String::from_utf8_lossy(&messages[i].data).into_owned();
        assert!(data.contains("MAIL FROM:<evil@contoso.com>"), "{data:?}");
        assert!(
            !data.replace("\r\n", "").contains(['\r', '\n']),
            "bare CR and LF became CRLF: {data:?}"
        );
    }
    let evil_commands = stage
        .office365
        .commands()
        .iter()
        .filter(|l| l.contains("evil@"))
        .count();
    assert_eq!(evil_commands, 0, "no smuggled command reached the provider");
}

#[tokio::test]
async fn bdat_is_not_offered_and_its_chunk_is_never_run_as_commands() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let ehlo = common::ehlo_lines(&c.ehlo().await);
    assert!(
        !ehlo.iter().any(|l| l == "CHUNKING" || l == "BINARYMIME"),
        "{ehlo:?}"
    );
    let chunk = b"QUIT\r\nRSET\r\n";
    c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes())
        .await;
    c.send(chunk).await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (502, Some("5.5.1")));
    let r = c.cmd("NOOP").await;
    assert_eq!(r.code(), 250, "the QUIT inside the chunk was not obeyed");
    let r = c.cmd(&format!("MAIL FROM:<{USER}> BODY=BINARYMIME")).await;
    assert_eq!((r.code(), r.enhanced()), (555, Some("5.5.4")));
}

#[tokio::test]
async fn data_lines_over_1000_octets_are_passed_on_unchanged() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    let mut body = b"Subject: long lines\r\n\r\n".to_vec();
    body.extend(std::iter::repeat_n(b'a', 5_000));
    body.extend_from_slice(b"\r\n");
    body.extend(std::iter::repeat_n(b'b', 100_000));
    body.extend_from_slice(b"\r\nend\r\n");
    let r = c.send_message(USER, &["a@contoso.com"], &body).await;
    assert_eq!(r.code(), 250, "{}", r.text());
    assert_eq!(stage.office365.messages()[0].data, body);
}

#[tokio::test]
async fn a_ten_megabyte_auth_answer_is_refused_without_buffering_it() {
    let stage = Stage::start().await;
    let mut c = stage.client().await;
    c.ehlo().await;
    assert_eq!(c.cmd("AUTH LOGIN").await.code(), 334);
    let huge = vec![b'A'; 10 * 1024 * 1024];
    c.send(&huge).await;
    c.send(b"\r\n").await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (500, Some("5.5.6")));
    assert_eq!(c.cmd("NOOP").await.code(), 250);
}

#[tokio::test]
async fn bdat_inside_a_transaction_leaves_no_transaction_open_at_the_provider() {
    let stage = Stage::start().await;
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    c.send(b"BDAT 3 LAST\r\nabc").await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (502, Some("5.5.1")));
    // The refused BDAT ended the transaction for the client; the provider must not still
    // hold its MAIL and RCPT, for this client or for the next one the session is lent to.
    let r = c
        .send_message(
            USER,
            &["b@contoso.com"],
            b"Subject: after BDAT\r\n\r\nok\r\n",
        )
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    let messages = stage.office365.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].rcpt_to, ["b@contoso.com"]);
}
