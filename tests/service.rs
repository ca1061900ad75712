//! Running as a service, driven in-process against the loopback fakes: configuration reloads
//! (new accounts and listeners for new sessions, sessions in flight undisturbed, a reload that
//! cannot be applied refused), the drain at shutdown (messages in flight finish, new work gets
//! 421 4.3.2, nothing gets 250 that the provider did not accept), and the admin listener's
//! `/metrics` and `/healthz` as a monitoring system reads them.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{CLIENT_ID, Fakes, PASSWORD, SmtpClient, TENANT, USER, client_secret, password_hash};
use smtp_oauth_bridge::config::Config;
use smtp_oauth_bridge::sandbox::Office365;
use smtp_oauth_bridge::server::{Bridge, Control};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

const SCANNER: &str = "scanner@contoso.com";

/// Configurations pointing at the fakes.
impl Fakes {
    fn account(&self, name: &str, username: &str, secret: &str) -> String {
        format!(
            r#"
[[accounts]]
name = "{name}"
username = "{username}"
password_hash = "{hash}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{secret}"
token_url = "{token_url}"
upstream = "127.0.0.1:{port}"
"#,
            hash = password_hash(),
            token_url = self.token_endpoint.token_url(TENANT),
            port = self.office365.addr().port(),
        )
    }

    /// A configuration with `listen`, extra top-level TOML, and accounts.
    fn config(&self, listen: &[&str], extra: &str, accounts: &[String]) -> Config {
        let listen: Vec<String> = listen.iter().map(|l| format!("\"{l}\"")).collect();
        let text = format!(
            "[server]\nlisten = [{}]\nhostname = \"bridge.test\"\n[tls]\nextra_ca_file = \"{}\"\n\
             [store]\ndirectory = \"{}\"\n{extra}\n{}",
            listen.join(", "),
            self.dir.path().join("ca.pem").display(),
            self.dir.path().join("state").display(),
            accounts.concat()
        );
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config: {e}"))
    }

    fn printer(&self) -> String {
        self.account("printer", USER, client_secret())
    }

    fn scanner(&self) -> String {
        self.account("scanner", SCANNER, client_secret())
    }
}

/// A bridge running with a control channel.
struct Running {
    addrs: Vec<SocketAddr>,
    admin: Option<SocketAddr>,
    control: mpsc::Sender<Control>,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(config: Config) -> Running {
        let bridge = Bridge::start(config).await.unwrap();
        let addrs = bridge.local_addrs();
        let admin = bridge.admin_addr();
        let (control, rx) = mpsc::channel(1);
        let done = tokio::spawn(bridge.run(rx));
        Running {
            addrs,
            admin,
            control,
            done,
        }
    }

    async fn reload(&self, config: Config) -> Result<String, String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Reload(Box::new(config), tx))
            .await
            .unwrap();
        rx.await.unwrap()
    }

    async fn shutdown(&self) {
        self.control.send(Control::Shutdown).await.unwrap();
    }
}

async fn login(addr: SocketAddr, user: &str) -> (SmtpClient, u16) {
    let mut c = SmtpClient::connect(addr).await;
    c.ehlo().await;
    let code = c.auth_plain(user, PASSWORD).await.code();
    (c, code)
}

/// MAIL and RCPT, then DATA with the first half of a message; the rest is [`rest`].
async fn start_message(c: &mut SmtpClient, from: &str, subject: &str) {
    assert_eq!(c.cmd(&format!("MAIL FROM:<{from}>")).await.code(), 250);
    assert_eq!(c.cmd("RCPT TO:<someone@example.com>").await.code(), 250);
    assert_eq!(c.cmd("DATA").await.code(), 354);
    c.send(format!("Subject: {subject}\r\n\r\nfirst half\r\n").as_bytes())
        .await;
}

async fn rest(c: &mut SmtpClient) -> u16 {
    c.send(b"second half\r\n.\r\n").await;
    c.reply().await.code()
}

fn stored_subjects(office365: &Office365) -> Vec<String> {
    office365
        .messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            text.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn a_reload_changes_what_new_sessions_get_and_leaves_sessions_in_flight_alone() {
    let fakes = Fakes::start().await;
    let bridge = Running::start(fakes.config(&["127.0.0.1:0"], "", &[fakes.printer()])).await;
    let first = bridge.addrs[0];

    // A printer session mid-message while the configuration changes under it.
    let (mut in_flight, code) = login(first, USER).await;
    assert_eq!(code, 235);
    start_message(&mut in_flight, USER, "in flight").await;
    let (_, code) = login(first, SCANNER).await;
    assert_eq!(code, 535, "scanner is not configured yet");

    // Add the scanner and a second listener (another loopback address), drop the printer.
    let summary = bridge
        .reload(fakes.config(&["127.0.0.1:0", "127.0.0.2:0"], "", &[fakes.scanner()]))
        .await
        .expect("reload applied");
    let second: SocketAddr = summary
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new listener in {summary:?}"));
    assert!(
        summary.contains("added: scanner") && summary.contains("removed: printer"),
        "{summary}"
    );

    assert_eq!(
        rest(&mut in_flight).await,
        250,
        "the session in flight finishes undisturbed"
    );
    assert_eq!(in_flight.cmd("QUIT").await.code(), 221);
    assert_eq!(stored_subjects(&fakes.office365), ["in flight"]);

    assert_eq!(
        login(first, SCANNER).await.1,
        235,
        "new account on the old listener"
    );
    assert_eq!(
        login(second, SCANNER).await.1,
        235,
        "new account on the new listener"
    );
    assert_eq!(login(first, USER).await.1, 535, "removed account refused");

    // A reload that cannot be applied (its new listener's address is taken) is refused as a
    // whole: the running configuration stays.
    let taken = std::net::TcpListener::bind("127.0.0.3:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let refused = bridge
        .reload(fakes.config(
            &["127.0.0.1:0", "127.0.0.2:0", &taken_addr],
            "",
            &[fakes.printer()],
        ))
        .await
        .expect_err("a listener that cannot be bound refuses the reload");
    assert!(refused.contains(&taken_addr), "{refused}");
    assert_eq!(login(first, SCANNER).await.1, 235);
    assert_eq!(login(first, USER).await.1, 535);
    assert_eq!(login(second, SCANNER).await.1, 235);

    bridge.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), bridge.done)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_drain_finishes_messages_in_flight_and_answers_new_work_with_421() {
    let fakes = Fakes::start().await;
    let config = fakes.config(
        &["127.0.0.1:0"],
        "[timeouts]\nshutdown_grace = 20\n",
        &[fakes.printer()],
    );
    let bridge = Running::start(config).await;
    let addr = bridge.addrs[0];

    let (mut mid_data, _) = login(addr, USER).await;
    start_message(&mut mid_data, USER, "mid data").await;
    let (mut mid_transaction, _) = login(addr, USER).await;
    assert_eq!(
        mid_transaction
            .cmd(&format!("MAIL FROM:<{USER}>"))
            .await
            .code(),
        250
    );
    let (mut idle, _) = login(addr, USER).await;

    bridge.shutdown().await;

    // The idle session is told at once, without sending anything.
    let told = idle.reply().await;
    assert_eq!(
        (told.code(), told.enhanced()),
        (421, Some("4.3.2")),
        "{}",
        told.text()
    );
    assert!(idle.closed().await);
    // The listener is closed: nobody new gets in.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    // The message in flight completes and is acknowledged; the next one is refused.
    assert_eq!(rest(&mut mid_data).await, 250);
    let refused = mid_data.cmd(&format!("MAIL FROM:<{USER}>")).await;
    assert_eq!((refused.code(), refused.enhanced()), (421, Some("4.3.2")));

    // A transaction already open may finish too.
    assert_eq!(
        mid_transaction.cmd("RCPT TO:<a@example.com>").await.code(),
        250
    );
    assert_eq!(mid_transaction.cmd("DATA").await.code(), 354);
    mid_transaction
        .send(b"Subject: open transaction\r\n\r\nbody\r\n.\r\n")
        .await;
    assert_eq!(mid_transaction.reply().await.code(), 250);
    // With its transaction done, the session is told right away rather than left waiting.
    let told = mid_transaction.reply().await;
    assert_eq!((told.code(), told.enhanced()), (421, Some("4.3.2")));
    assert!(mid_transaction.closed().await);

    tokio::time::timeout(Duration::from_secs(10), bridge.done)
        .await
        .expect("the bridge returns once every session is done")
        .unwrap();
    let mut subjects = stored_subjects(&fakes.office365);
    subjects.sort();
    assert_eq!(subjects, ["mid data", "open transaction"]);
}

#[tokio::test]
async fn after_the_grace_period_a_stalled_data_transfer_gets_421_and_nothing_is_sent() {
    let fakes = Fakes::start().await;
    let config = fakes.config(
        &["127.0.0.1:0"],
        "[timeouts]\nshutdown_grace = 1\n",
        &[fakes.printer()],
    );
    let bridge = Running::start(config).await;
    let (mut stalled, _) = login(bridge.addrs[0], USER).await;
    start_message(&mut stalled, USER, "stalled").await;

    bridge.shutdown().await;
    let told = stalled.reply().await;
    assert_eq!(
        (told.code(), told.enhanced()),
        (421, Some("4.3.2")),
        "{}",
        told.text()
    );
    assert!(stalled.closed().await);
    tokio::time::timeout(Duration::from_secs(10), bridge.done)
        .await
        .unwrap()
        .unwrap();
    assert!(
        fakes.office365.messages().is_empty(),
        "a partial message was delivered"
    );
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{series} not in\n{text}"))
}

#[tokio::test]
async fn metrics_and_health_tell_a_monitoring_system_what_happened() {
    let fakes = Fakes::start().await;
    let broken = fakes.account("broken", "broken@contoso.com", "not-the-secret");
    let accounts = [fakes.printer(), broken];
    // Tokens on first use, so the story below decides when the broken account is found.
    let admin_toml = "[admin]\nlisten = \"127.0.0.1:0\"\nupstream_failures_unhealthy = 2\n[tokens]\nprefetch = false\n";
    let config = fakes.config(&["127.0.0.1:0"], admin_toml, &accounts);
    let bridge = Running::start(config).await;
    let addr = bridge.addrs[0];
    let admin = bridge.admin.expect("admin listener");

    let (status, body) = http_get(admin, "/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (200, "{\"status\":\"ok\",\"problems\":[]}\n")
    );

    let (mut c, code) = login(addr, USER).await;
    assert_eq!(code, 235);
    let reply = c
        .send_message(
            USER,
            &["a@example.com", "b@example.com"],
            b"Subject: m\r\n\r\nhello\r\n",
        )
        .await;
    assert_eq!(reply.code(), 250);
    let mut wrong = SmtpClient::connect(addr).await;
    wrong.ehlo().await;
    assert_eq!(wrong.auth_plain(USER, "wrong-password").await.code(), 535);

    let (status, text) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "smtp_oauth_bridge_connections_total"), 2.0);
    assert_eq!(metric(&text, "smtp_oauth_bridge_auth_successes_total"), 1.0);
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_auth_failures_total{reason=\"bad_credentials\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_messages_relayed_total{account=\"printer\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_message_bytes_total{account=\"printer\"}"
        ),
        b"Subject: m\r\n\r\nhello\r\n".len() as f64
    );
    // MAIL, two RCPT, the final reply: 2xx; DATA's 354: 3xx.
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_upstream_replies_total{class=\"2xx\"}"
        ),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_upstream_replies_total{class=\"3xx\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_token_refreshes_total{account=\"printer\",outcome=\"ok\"}"
        ),
        1.0
    );
    let expiry = metric(
        &text,
        "smtp_oauth_bridge_token_expiry_seconds{account=\"printer\"}",
    );
    assert!((3500.0..=3600.0).contains(&expiry), "{expiry}");
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_upstream_latency_seconds_count{operation=\"connect\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "smtp_oauth_bridge_accounts_needing_login"),
        0.0
    );

    // An account whose client secret is wrong: its login fails, and health says why and what
    // to do about it.
    assert_eq!(login(addr, "broken@contoso.com").await.1, 535);
    let (status, body) = http_get(admin, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unhealthy");
    assert_eq!(health["problems"][0]["account"], "broken");
    assert_eq!(health["problems"][0]["problem"], "needs_login");
    let detail = health["problems"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("AADSTS7000215") && detail.contains("client_secret_file"),
        "{detail}"
    );
    let (_, text) = http_get(admin, "/metrics").await;
    assert_eq!(
        metric(&text, "smtp_oauth_bridge_accounts_needing_login"),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "smtp_oauth_bridge_auth_failures_total{reason=\"token_needs_login\"}"
        ),
        1.0
    );

    // The provider refusing the bridge twice in a row marks it failing. A reload closes the
    // pooled provider session, so each of the next logins has to open a new one.
    bridge
        .reload(fakes.config(&["127.0.0.1:0"], admin_toml, &accounts))
        .await
        .unwrap();
    fakes.office365.behaviour().auth_reply = Some(
        "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant."
            .into(),
    );
    for _ in 0..2 {
        let (_, code) = login(addr, USER).await;
        assert_eq!(code, 535);
    }
    let (status, body) = http_get(admin, "/healthz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("\"upstream_failing\"") && body.contains("5.7.139"),
        "{body}"
    );
    fakes.office365.behaviour().auth_reply = None;
    assert_eq!(login(addr, USER).await.1, 235);
    let (_, body) = http_get(admin, "/healthz").await;
    assert!(!body.contains("upstream_failing"), "{body}");

    bridge.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), bridge.done)
        .await
        .unwrap()
        .unwrap();
}

/// Implicit-TLS listeners come and go with reloads like plain ones, and the connection limits
/// change without forgetting the connections already open.
#[tokio::test]
async fn a_reload_adds_an_implicit_tls_listener_and_new_limits_apply_to_open_counts() {
    let fakes = Fakes::start().await;
    let names = vec!["localhost".to_string()];
    let generated = smtp_oauth_bridge::tls::generate_self_signed(&names).unwrap();
    let (crt, key) = smtp_oauth_bridge::tls::write_certificate(
        &fakes.dir.path().join("certs"),
        &generated,
        false,
    )
    .unwrap();
    let config = |implicit: &str, per_source: usize| {
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n{implicit}\nhostname = \"bridge.test\"\n\
             [limits]\nmax_connections_per_source = {per_source}\n\
             [tls]\nextra_ca_file = \"{}\"\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n\
             [store]\ndirectory = \"{}\"\n{}",
            fakes.dir.path().join("ca.pem").display(),
            crt.display(),
            key.display(),
            fakes.dir.path().join("state").display(),
            fakes.printer()
        );
        Config::from_toml_str(&text).unwrap_or_else(|e| panic!("test config: {e}"))
    };
    let bridge = Running::start(config("", 5)).await;
    let plain = bridge.addrs[0];
    let (mut open, code) = login(plain, USER).await;
    assert_eq!(code, 235);

    let summary = bridge
        .reload(config("listen_implicit_tls = [\"127.0.0.1:0\"]", 1))
        .await
        .expect("reload applied");
    let implicit: SocketAddr = summary
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no new listener in {summary:?}"));
    // The session opened before the reload still holds this address's only slot now.
    let mut tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
    let mut refused = String::new();
    tcp.read_to_string(&mut refused).await.unwrap();
    assert!(
        refused.starts_with("421 4.7.0 Too many connections from your address"),
        "{refused}"
    );
    assert_eq!(open.cmd("QUIT").await.code(), 221);
    drop(open);

    let mut tls = None;
    for _ in 0..50 {
        let tcp = tokio::net::TcpStream::connect(implicit).await.unwrap();
        if let Ok(stream) = common::tls_connect(tcp, &generated.certificate_pem).await {
            tls = Some(stream);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut tls = tls.expect("a slot comes back once the first session ended");
    let mut greeting = [0u8; 3];
    tls.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220");
    tls.write_all(b"QUIT\r\n").await.unwrap();

    bridge.shutdown().await;
    tokio::time::timeout(Duration::from_secs(10), bridge.done)
        .await
        .unwrap()
        .unwrap();
}
