//! The real binary is killed with SIGKILL at random points during refresh-token rotations and
//! restarted at once, against a token endpoint (in this process) that rotates refresh tokens
//! and honours a used one only for a short grace period. Every time, the account keeps
//! sending. After several rotations, a bridge restarted later than the grace period still
//! works, because the newest refresh token was on disk before it was ever used.
//!
//! Access tokens live 4 seconds here, so the bridge refreshes every 2 seconds; each answer
//! is delayed 300 ms, so a kill lands before the answer, while it is read, or while the
//! rotated token is being stored. The random offsets come from a seed printed on failure.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{CLIENT_ID, PASSWORD, SmtpClient, TENANT, USER};
use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_bridge::sandbox::{
    ClientRegistration, Office365, Office365Config, SandboxCa, TokenEndpoint, TokenEndpointConfig,
    TokenRegistry,
};
use smtp_oauth_bridge::store::Store;

const ROUNDS: usize = 6;
const GRACE: Duration = Duration::from_secs(5);
const LIFETIME: Duration = Duration::from_secs(4);
const ANSWER_DELAY: Duration = Duration::from_millis(300);

/// The running binary and its log.
struct Running {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn start(config: &std::path::Path) -> Running {
        let mut child = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if line.contains("listening for SMTP clients")
                    && let Some(addr) = line
                        .split("address=")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the bridge did not start listening");
        Running { child, addr, log }
    }

    /// SIGKILL: no shutdown, no flush, nothing.
    fn kill(mut self) -> String {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.log.lock().unwrap().clone()
    }
}

/// A small deterministic generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn send_one(addr: SocketAddr, subject: &str) {
    let mut c = SmtpClient::connect(addr).await;
    c.ehlo().await;
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(r.code(), 235, "AUTH after a restart: {}", r.text());
    let body = format!("Subject: {subject}\r\n\r\nhi\r\n");
    let r = c
        .send_message(USER, &["a@example.com"], body.as_bytes())
        .await;
    assert_eq!(r.code(), 250, "{}", r.text());
    let _ = c.cmd("QUIT").await;
}

async fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_at_random_points_during_rotations_the_account_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let ca = SandboxCa::generate().unwrap();
    let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
    let registry = Arc::new(TokenRegistry::new());
    let endpoint = TokenEndpoint::start(
        tls.clone(),
        Arc::clone(&registry),
        TokenEndpointConfig {
            clients: vec![ClientRegistration::new(CLIENT_ID, common::client_secret())],
            access_token_lifetime: LIFETIME,
            used_refresh_token_grace: GRACE,
            ..TokenEndpointConfig::default()
        },
    )
    .await
    .unwrap();
    endpoint.set_delay(ANSWER_DELAY);
    let office365 = Office365::start(tls, Arc::clone(&registry), Office365Config::default())
        .await
        .unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
listen = ["127.0.0.1:0"]
[tls]
extra_ca_file = "{ca}"
[store]
directory = "{state}"
[log]
level = "debug"
[[accounts]]
name = "printer"
username = "{USER}"
password_hash = "{hash}"
tenant = "{TENANT}"
client_id = "{CLIENT_ID}"
client_secret = "{secret}"
flow = "refresh_token"
token_url = "{token_url}"
upstream = "127.0.0.1:{port}"
"#,
            ca = ca_file.display(),
            state = state.display(),
            hash = common::password_hash(),
            secret = common::client_secret(),
            token_url = endpoint.token_url(TENANT),
            port = office365.addr().port(),
        ),
    )
    .unwrap();
    let store = Store::open(&state).unwrap();
    let first = endpoint.issue_refresh_token(
        CLIENT_ID,
        USER,
        "https://outlook.office.com/SMTP.Send offline_access",
    );
    store
        .save_refresh_token("printer", &SecretString::from(first))
        .unwrap();

    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let mut bridge = Running::start(&config);
    let mut logs = String::new();
    for round in 0..ROUNDS {
        // A refresh reaches the endpoint; the kill lands somewhere in it.
        let before = endpoint.request_count();
        wait_for("a refresh", Duration::from_secs(15), || {
            endpoint.request_count() > before
        })
        .await;
        let offset = Duration::from_millis(rng.below(450));
        tokio::time::sleep(offset).await;
        logs.push_str(&bridge.kill());
        bridge = Running::start(&config);
        send_one(bridge.addr, &format!("round {round}")).await;
    }
    let refreshes: Vec<u16> = endpoint
        .requests()
        .iter()
        .filter(|r| r.grant_type.as_deref() == Some("refresh_token"))
        .map(|r| r.status)
        .collect();
    assert!(refreshes.len() >= ROUNDS, "{refreshes:?}");
    assert!(
        refreshes.iter().all(|s| *s == 200),
        "a refresh presented a dead token (seed {seed}): {refreshes:?}\n{logs}"
    );

    // Stop right after a rotation was stored, then stay down longer than the grace period
    // (and the access token's life): only the newest refresh token can bring it back.
    let stored = store.load_refresh_token("printer").unwrap().unwrap();
    wait_for("a rotation on disk", Duration::from_secs(15), || {
        store
            .load_refresh_token("printer")
            .ok()
            .flatten()
            .is_some_and(|t| t.expose_secret() != stored.expose_secret())
    })
    .await;
    bridge.kill();
    let newest = store.load_refresh_token("printer").unwrap().unwrap();
    tokio::time::sleep(GRACE + Duration::from_secs(1)).await;
    assert!(endpoint.refresh_token_valid(newest.expose_secret()));
    let before = endpoint.requests().len();
    let bridge = Running::start(&config);
    send_one(bridge.addr, "after the grace period").await;
    let late = endpoint.requests();
    assert!(
        late[before..]
            .iter()
            .any(|r| r.status == 200 && r.grant_type.as_deref() == Some("refresh_token"))
    );
    assert_eq!(office365.messages().len(), ROUNDS + 1);
    bridge.kill();
}
