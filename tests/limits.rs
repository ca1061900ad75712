//! What one client can take from the bridge, and how long anything may take: connection
//! slots globally and per source address, failed logins per source address, and a timeout
//! for every phase, each named in what the client hears and in the log. Durations are cut to
//! fractions of a second through the checked configuration so the stories stay quick.

mod common;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use common::{PASSWORD, SmtpClient, Stage, USER};
use smtp_oauth_bridge::sandbox::{Behaviour, Stage as At};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The first line a server sends on a fresh connection from `source`.
async fn first_line_from(addr: std::net::SocketAddr, source: IpAddr) -> String {
    let tcp = common::tcp_from(addr, source).await;
    let mut lines = BufReader::new(tcp).lines();
    tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default()
}

#[tokio::test]
async fn connections_are_limited_per_source_and_in_total() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.limits.max_connections = 3;
            c.limits.max_connections_per_source = 2;
        })),
        ..common::Options::default()
    })
    .await;
    let a1 = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
    let _a2 = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
    let line = first_line_from(stage.bridge, ip("127.0.0.1")).await;
    assert!(
        line.starts_with("421 4.7.0 Too many connections from your address"),
        "{line}"
    );
    let _b1 = SmtpClient::connect_from(stage.bridge, ip("127.0.0.2")).await;
    let line = first_line_from(stage.bridge, ip("127.0.0.3")).await;
    assert!(line.starts_with("421 4.3.2 Too many connections"), "{line}");

    // A slot comes back when its session ends.
    drop(a1);
    assert!(common::eventually(|| stage.shared.guard.connections() == 2).await);
    let mut c3 = SmtpClient::connect_from(stage.bridge, ip("127.0.0.3")).await;
    c3.ehlo().await;
}

/// A flood of connections beyond the limits is what the limits are for: every one hears its
/// 421, but the log gets one warning, not one per connection.
#[tokio::test]
async fn a_flood_of_refused_connections_writes_one_warning() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| c.limits.max_connections_per_source = 1)),
        ..common::Options::default()
    })
    .await;
    let _holder = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
    for _ in 0..50 {
        let line = first_line_from(stage.bridge, ip("127.0.0.1")).await;
        assert!(
            line.starts_with("421 4.7.0 Too many connections from your address"),
            "{line}"
        );
    }
    assert_eq!(
        logs.lines_with("connection refused: too many connections")
            .len(),
        1,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn failed_logins_are_throttled_per_source_and_the_right_password_works_later() {
    let (_guard, logs) = common::capture_logs();
    let window = Duration::from_millis(700);
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(move |c| {
            c.limits.auth_failures = 3;
            c.limits.auth_failure_window = window;
        })),
        ..common::Options::default()
    })
    .await;
    let mut attacker = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
    attacker.ehlo().await;
    for guess in ["123456", "password", "printer"] {
        assert_eq!(attacker.auth_plain(USER, guess).await.code(), 535);
    }
    let started = Instant::now();
    // Now even the right password is refused, unchecked, with a 4xx.
    let r = attacker.auth_plain(USER, PASSWORD).await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (454, Some("4.7.0")),
        "{}",
        r.text()
    );
    assert_eq!(
        logs.lines_with("too many failed logins from this address")
            .len(),
        1
    );
    // Another address is not affected.
    let mut printer = SmtpClient::connect_from(stage.bridge, ip("127.0.0.2")).await;
    printer.ehlo().await;
    assert_eq!(printer.auth_plain(USER, PASSWORD).await.code(), 235);

    // Once the failures are older than the window, the right password works again.
    tokio::time::sleep(window.saturating_sub(started.elapsed()) + Duration::from_millis(100)).await;
    let mut again = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
    again.ehlo().await;
    assert_eq!(again.auth_plain(USER, PASSWORD).await.code(), 235);
    assert_eq!(stage.token_endpoint.request_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_simultaneous_guesses_gets_no_more_checks_than_the_limit() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.limits.auth_failures = 3;
            c.limits.max_connections_per_source = 30;
        })),
        ..common::Options::default()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..12 {
        let mut c = SmtpClient::connect_from(stage.bridge, ip("127.0.0.1")).await;
        c.ehlo().await;
        clients.push(c);
    }
    // Every guess is on the wire before any answer comes back.
    let guess = format!(
        "AUTH PLAIN {}\r\n",
        common::b64(&format!("\0{USER}\0guess"))
    );
    for c in &mut clients {
        c.send(guess.as_bytes()).await;
    }
    let mut codes = Vec::new();
    for c in &mut clients {
        codes.push(c.reply().await.code());
    }
    codes.sort();
    let checked = codes.iter().filter(|&&c| c == 535).count();
    let refused = codes.iter().filter(|&&c| c == 454).count();
    assert_eq!((checked, refused), (3, 9), "{codes:?}");
}

#[tokio::test]
async fn a_client_trickling_a_command_cannot_hold_its_slot() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.timeouts.client_idle = Duration::from_millis(1000);
        })),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    let started = Instant::now();
    // One byte every 250 ms: each read comes well within the idle time, the line does not.
    // Were the limit per read, the last byte would push the close to 1,750 ms.
    for byte in b"EHLO" {
        c.send(&[*byte]).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = c.reply().await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (421, Some("4.4.2")),
        "{}",
        r.text()
    );
    assert!(c.closed().await);
    let after = started.elapsed();
    assert!(
        after < Duration::from_millis(1500),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn a_busy_session_still_ends_at_the_session_time_limit() {
    let (_guard, logs) = common::capture_logs();
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.timeouts.session = Duration::from_millis(800);
        })),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.client().await;
    for _ in 0..3 {
        assert_eq!(c.cmd("NOOP").await.code(), 250);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // The client idle limit is five minutes; only the session limit can end this.
    let r = c.reply().await;
    assert_eq!(
        (r.code(), r.enhanced()),
        (421, Some("4.4.2")),
        "{}",
        r.text()
    );
    assert!(r.text().contains("Session time limit"));
    assert!(c.closed().await);
    assert!(
        common::eventually(|| !logs.lines_with("session time limit of 800ms").is_empty()).await,
        "{}",
        logs.text()
    );
}

#[tokio::test]
async fn a_client_silent_during_data_is_cut_off_and_nothing_is_sent() {
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.timeouts.client_idle = Duration::from_millis(400);
        })),
        ..common::Options::default()
    })
    .await;
    let mut c = stage.logged_in().await;
    assert_eq!(c.cmd(&format!("MAIL FROM:<{USER}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<a@contoso.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    c.send(b"Subject: half\r\n\r\nand then nothing").await;
    let r = c.reply().await;
    assert_eq!((r.code(), r.enhanced()), (421, Some("4.4.2")));
    assert!(c.closed().await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(stage.office365.messages().is_empty());
}

/// Each upstream phase that stalls gives its own answer, naming the phase.
#[tokio::test]
async fn every_upstream_phase_has_its_own_timeout_named_in_the_reply() {
    struct Case {
        stage: At,
        /// The first command whose reply shows the timeout.
        at: &'static str,
        code: u16,
        enhanced: &'static str,
        says: &'static str,
    }
    let cases = [
        Case {
            stage: At::Greeting,
            at: "AUTH",
            code: 454,
            enhanced: "4.7.0",
            says: "greeting timed out after 300ms",
        },
        Case {
            stage: At::Ehlo,
            at: "AUTH",
            code: 454,
            enhanced: "4.7.0",
            says: "EHLO timed out after 300ms",
        },
        Case {
            stage: At::Auth,
            at: "AUTH",
            code: 454,
            enhanced: "4.7.0",
            says: "AUTH XOAUTH2 timed out after 300ms",
        },
        Case {
            stage: At::Mail,
            at: "MAIL",
            code: 451,
            enhanced: "4.4.2",
            says: "did not answer MAIL within 300ms",
        },
        Case {
            stage: At::Rcpt,
            at: "RCPT",
            code: 451,
            enhanced: "4.4.2",
            says: "did not answer RCPT within 300ms",
        },
        Case {
            stage: At::Data,
            at: "DATA",
            code: 451,
            enhanced: "4.4.2",
            says: "did not answer DATA within 300ms",
        },
        Case {
            stage: At::EndOfData,
            at: ".",
            code: 451,
            enhanced: "4.4.2",
            says: "within 400ms of the end of DATA",
        },
    ];
    for case in cases {
        let stage = Stage::start_with(common::Options {
            tweak: Some(Box::new(|c| {
                c.timeouts.upstream_greeting = Duration::from_millis(300);
                c.timeouts.upstream_command = Duration::from_millis(300);
                c.timeouts.upstream_data_end = Duration::from_millis(400);
            })),
            ..common::Options::default()
        })
        .await;
        stage.office365.set_behaviour(Behaviour {
            stage_delay: Some((case.stage, Duration::from_secs(3))),
            ..Behaviour::default()
        });
        let mut c = stage.client().await;
        c.ehlo().await;
        let mut r = c.auth_plain(USER, PASSWORD).await;
        if case.at != "AUTH" {
            assert_eq!(r.code(), 235, "{:?}: {}", case.stage, r.text());
            r = c.cmd(&format!("MAIL FROM:<{USER}>")).await;
        }
        if !matches!(case.at, "AUTH" | "MAIL") {
            assert_eq!(r.code(), 250);
            r = c.cmd("RCPT TO:<a@contoso.com>").await;
        }
        if !matches!(case.at, "AUTH" | "MAIL" | "RCPT") {
            assert_eq!(r.code(), 250);
            r = c.cmd("DATA").await;
        }
        if case.at == "." {
            assert_eq!(r.code(), 354);
            c.send(b"Subject: slow\r\n\r\nx\r\n.\r\n").await;
            r = c.reply().await;
        }
        assert_eq!(
            (r.code(), r.enhanced()),
            (case.code, Some(case.enhanced)),
            "{:?}: {}",
            case.stage,
            r.text()
        );
        assert!(
            r.text().contains(case.says),
            "{:?}: {}",
            case.stage,
            r.text()
        );
        // The session survives the provider's stall.
        assert_eq!(c.cmd("NOOP").await.code(), 250);
    }
}

#[tokio::test]
async fn slow_but_timely_replies_are_waited_for() {
    let stage = Stage::start().await;
    stage.office365.set_behaviour(Behaviour {
        reply_delay: Duration::from_millis(100),
        stage_delay: Some((At::EndOfData, Duration::from_millis(400))),
        ..Behaviour::default()
    });
    let mut c = stage.logged_in().await;
    let r = c
        .send_message(USER, &["a@contoso.com"], b"Subject: slow\r\n\r\nok\r\n")
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
}

#[tokio::test]
async fn stalled_tls_handshakes_time_out_on_both_sides() {
    // The client side: a ClientHello that never finishes on the implicit-TLS port.
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
    let started = Instant::now();
    let mut tcp = TcpStream::connect(stage.bridge_implicit_tls.unwrap())
        .await
        .unwrap();
    tcp.write_all(&[0x16, 0x03, 0x01]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        common::eventually(|| !logs
            .lines_with("TLS handshake with the client timed out")
            .is_empty())
        .await
    );

    // The provider side: a server that agrees to STARTTLS and then says nothing.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_port = fake.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = fake.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = tcp.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 fake ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer: &[u8] = if line.starts_with("EHLO") {
                        b"250-fake\r\n250 STARTTLS\r\n"
                    } else if line == "STARTTLS" {
                        b"220 2.0.0 go ahead\r\n"
                    } else {
                        b"500 what\r\n"
                    };
                    let _ = write.write_all(answer).await;
                    if line == "STARTTLS" {
                        tokio::time::sleep(Duration::from_secs(30)).await;
                    }
                }
            });
        }
    });
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(move |c| {
            c.timeouts.tls_handshake = Duration::from_millis(300);
            c.accounts[0].upstream.port = fake_port;
        })),
        ..common::Options::default()
    })
    .await;
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
        r.text().contains("TLS handshake timed out after 300ms"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn a_burst_of_connections_all_get_their_greeting() {
    // Devices that all wake at once: more connections arrive while the accept loop is busy
    // than a default listen queue (128) holds. Each must hear the greeting, not wait for one
    // that never comes.
    let stage = Stage::start_with(common::Options {
        tweak: Some(Box::new(|c| {
            c.limits.max_connections = 1000;
            c.limits.max_connections_per_source = 1000;
        })),
        ..common::Options::default()
    })
    .await;
    // Connecting without yielding keeps this (single-threaded) runtime, and with it the
    // bridge's accept loop, busy until all 300 connections wait in the kernel's queue.
    let streams: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(stage.bridge).unwrap())
        .collect();
    let greetings: Vec<_> = streams
        .into_iter()
        .map(|std| {
            std.set_nonblocking(true).unwrap();
            let tcp = TcpStream::from_std(std).unwrap();
            tokio::spawn(async move {
                let mut lines = BufReader::new(tcp).lines();
                tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await
            })
        })
        .collect();
    let mut greeted = 0;
    for greeting in greetings {
        if let Ok(Ok(Some(line))) = greeting.await.unwrap() {
            assert!(line.starts_with("220 "), "{line}");
            greeted += 1;
        }
    }
    assert_eq!(greeted, 300);
}
