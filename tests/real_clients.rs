//! End-to-end test with real SMTP clients: `swaks`, `curl`, `msmtp`, Python's `smtplib` and
//! PHPMailer send mail through the real `smtp-oauth-bridge` binary running in sandbox mode,
//! started the way the README's quick start does it (a `proxy.toml`, then `run`).
//!
//! Each client authenticates with AUTH PLAIN and with AUTH LOGIN and sends: plain text, a
//! 5 MB attachment, a UTF-8 subject and 8-bit UTF-8 body, body lines starting with a dot,
//! several recipients, and (smtplib, PHPMailer, curl) two messages on one connection.
//! swaks also tries a wrong password with each mechanism, which must fail and store nothing.
//!
//! What arrived is read from the sandbox Office365's mail directory (`.eml` + `.json`). Where
//! the client sends our bytes as they are (swaks `--data`, curl `-T`, msmtp on stdin), the
//! stored message must equal them byte for byte; for MIME the clients build themselves
//! (smtplib, PHPMailer, swaks `--attach`), the essentials are decoded and compared.
//!
//! A missing client fails the test with the Debian package to install: a skipped client
//! would look like a passing one. `scripts/test` installs them all.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value;

/// The sandbox account's username; also the envelope sender every client uses.
const USER: &str = "printer@sandbox.test";
/// A client that has not finished after this long has hung; it is killed and the test fails.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Time for the bridge to start (sandbox CA, listeners) and print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Time for the sandbox to write a message after the client saw 250.
const STORE_TIMEOUT: Duration = Duration::from_secs(10);
const MECHANISMS: [&str; 2] = ["PLAIN", "LOGIN"];

/// The non-ASCII texts; the client scripts use the same ones.
const UTF8_SUBJECT: &str = "Grüße – 日本語 ✓";
const UTF8_BODY: &str = "Grüße aus Köln — naïve café ✓";
/// Body lines that must be dot-stuffed on the wire; "." alone would otherwise end DATA.
const DOTS_BODY: &str = ".leading dot\r\n..two dots\r\n.\r\nend\r\n";
/// Recipients of the "recipients" case: To, To, Cc, Bcc (envelope only where possible).
const MANY: [&str; 4] = [
    "alice@example.test",
    "bob@example.test",
    "carol@example.test",
    "dave@example.test",
];
const ALICE: [&str; 1] = ["alice@example.test"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Plain,
    Attachment,
    Utf8,
    Dots,
    Recipients,
    /// Two messages in one SMTP session.
    Two,
}

impl Case {
    /// What every client can express.
    const COMMON: [Case; 5] = [
        Case::Plain,
        Case::Attachment,
        Case::Utf8,
        Case::Dots,
        Case::Recipients,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::Plain => "plain",
            Case::Attachment => "attachment",
            Case::Utf8 => "utf8",
            Case::Dots => "dots",
            Case::Recipients => "recipients",
            Case::Two => "two",
        }
    }
}

// ---------------------------------------------------------------------------------------
// The tests, one per client so the test runner can run them in parallel.
// ---------------------------------------------------------------------------------------

#[test]
fn swaks_sends_through_the_bridge() {
    let swaks = require_program("swaks", "swaks");
    let mut bridge = Bridge::start();

    // A wrong password first: it must fail, and the next successful case proves (through
    // `collect`'s exact count) that nothing was stored for it.
    for mechanism in MECHANISMS {
        let out = run_client(
            Command::new(&swaks)
                .args(swaks_base(&bridge, mechanism))
                .args(["--auth-password", &random_secret()])
                .args(["--to", ALICE[0]]),
            None,
        );
        assert!(
            !out.status.success(),
            "swaks with a wrong password ({mechanism}) succeeded:\n{}",
            describe(&out)
        );
        let transcript = String::from_utf8_lossy(&out.stdout);
        assert!(
            transcript.contains("535"),
            "swaks with a wrong password ({mechanism}) did not see a 535 reply:\n{}",
            describe(&out)
        );
        bridge.assert_nothing_new();
    }

    for mechanism in MECHANISMS {
        for case in Case::COMMON {
            let password = bridge.password.clone();
            let mut cmd = Command::new(&swaks);
            cmd.args(swaks_base(&bridge, mechanism))
                .args(["--auth-password", &password]);
            if case == Case::Attachment {
                // Let swaks build the MIME itself, as a user would with --attach.
                let blob = bridge.blob_file();
                cmd.args(["--to", ALICE[0]])
                    .args(["--h-Subject", &format!("swaks {mechanism} attachment")])
                    .args(["--body", "A 5 MB attachment follows."])
                    .args(["--attach-type", "application/octet-stream"])
                    .args(["--attach-name", "blob.bin"])
                    .arg("--attach")
                    .arg(at_file(&blob));
                expect_success("swaks", mechanism, case, &run_client(&mut cmd, None));
                let stored = bridge.collect(1).remove(0);
                stored.assert_envelope(&ALICE);
                assert_eq!(
                    subject(&stored.eml),
                    format!("swaks {mechanism} attachment")
                );
                assert_attachment(&stored);
                continue;
            }
            let fixed = fixed_message("swaks", mechanism, case);
            // swaks always ends the DATA it sends with CRLF before the final dot, so the file
            // it reads must not have the message's last CRLF or the stored copy gains a line.
            let file = bridge.write_file(
                &format!("swaks-{mechanism}-{}.eml", case.name()),
                fixed.bytes.strip_suffix(b"\r\n").unwrap(),
            );
            cmd.args(["--to", &fixed.rcpts.join(",")])
                .arg("--data")
                .arg(at_file(&file));
            expect_success("swaks", mechanism, case, &run_client(&mut cmd, None));
            bridge.collect(1)[0].assert_exact(&fixed);
        }
    }
}

#[test]
fn curl_sends_through_the_bridge() {
    let curl = require_program("curl", "curl");
    let mut bridge = Bridge::start();
    for mechanism in MECHANISMS {
        for case in Case::COMMON {
            let fixed = fixed_message("curl", mechanism, case);
            let mut cmd = Command::new(&curl);
            // -q first: ignore any ~/.curlrc.
            cmd.args(["-q", "--silent", "--show-error"]);
            curl_transfer(&mut cmd, &bridge, mechanism, &fixed, case.name());
            expect_success("curl", mechanism, case, &run_client(&mut cmd, None));
            bridge.collect(1)[0].assert_exact(&fixed);
        }

        // Two messages on one connection: curl reuses the SMTP connection for a second
        // transfer to the same server (`--next`), sending a new MAIL FROM after the first 250.
        let first = fixed_message("curl-1of2", mechanism, Case::Plain);
        let mut second = fixed_message("curl-2of2", mechanism, Case::Plain);
        second.rcpts = vec!["bob@example.test"];
        let mut cmd = Command::new(&curl);
        cmd.args(["-q", "--verbose", "--show-error"]);
        curl_transfer(&mut cmd, &bridge, mechanism, &first, "two-1");
        cmd.arg("--next");
        curl_transfer(&mut cmd, &bridge, mechanism, &second, "two-2");
        let out = run_client(&mut cmd, None);
        expect_success("curl", mechanism, Case::Two, &out);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Re-using existing connection"),
            "curl opened a second connection:\n{}",
            describe(&out)
        );
        let stored = bridge.collect(2);
        for fixed in [&first, &second] {
            let found = stored.iter().find(|s| s.eml == fixed.bytes);
            found
                .unwrap_or_else(|| panic!("{:?} not stored", String::from_utf8_lossy(&fixed.bytes)))
                .assert_exact(fixed);
        }
    }
}

/// One curl SMTP upload of `fixed`: server, AUTH mechanism, envelope, file.
fn curl_transfer(cmd: &mut Command, bridge: &Bridge, mechanism: &str, fixed: &Fixed, name: &str) {
    let file = bridge.write_file(&format!("curl-{mechanism}-{name}.eml"), &fixed.bytes);
    // The URL path is the EHLO name curl sends; without one curl would use the file's name.
    cmd.arg("--url")
        .arg(format!("smtp://127.0.0.1:{}/client.test", bridge.port()))
        .args(["--mail-from", USER])
        .args(["--user", &format!("{USER}:{}", bridge.password)])
        .args(["--login-options", &format!("AUTH={mechanism}")]);
    for rcpt in &fixed.rcpts {
        cmd.args(["--mail-rcpt", rcpt]);
    }
    cmd.arg("-T").arg(file);
}

#[test]
fn msmtp_sends_through_the_bridge() {
    let msmtp = require_program("msmtp", "msmtp");
    let mut bridge = Bridge::start();
    for mechanism in MECHANISMS {
        for case in Case::COMMON {
            let fixed = fixed_message("msmtp", mechanism, case);
            let mut cmd = Command::new(&msmtp);
            // --host: command-line settings only, no msmtprc. The fixed messages carry Date
            // and Message-ID because msmtp would add them otherwise.
            cmd.arg("--host=127.0.0.1")
                .arg(format!("--port={}", bridge.port()))
                .arg("--tls=off")
                .arg("--domain=client.test")
                .arg(format!("--auth={}", mechanism.to_ascii_lowercase()))
                .arg(format!("--user={USER}"))
                .arg(format!("--passwordeval=printf %s '{}'", bridge.password))
                .args(["-f", USER])
                .arg("--")
                .args(&fixed.rcpts);
            let out = run_client(&mut cmd, Some(fixed.bytes.clone()));
            expect_success("msmtp", mechanism, case, &out);
            bridge.collect(1)[0].assert_exact(&fixed);
        }
    }
}

#[test]
fn python_smtplib_sends_through_the_bridge() {
    let python = require_program("python3", "python3");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/send_smtplib.py");
    let mut bridge = Bridge::start();
    for mechanism in MECHANISMS {
        for case in Case::COMMON.into_iter().chain([Case::Two]) {
            let mut cmd = Command::new(&python);
            // -I: isolated from PYTHON* variables and user site-packages.
            cmd.arg("-I").arg(&script);
            script_args(&mut cmd, &mut bridge, mechanism, case);
            expect_success("python", mechanism, case, &run_client(&mut cmd, None));
            check_generated(&mut bridge, "python", mechanism, case);
        }
    }
}

#[test]
fn phpmailer_sends_through_the_bridge() {
    let php = require_program("php", "php-cli");
    let autoload = Path::new("/usr/share/php/libphp-phpmailer/autoload.php");
    assert!(
        autoload.exists(),
        "PHPMailer is not installed ({} is missing): install the Debian package \
         libphp-phpmailer (apt-get install libphp-phpmailer), or run scripts/test",
        autoload.display()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/send_phpmailer.php");
    let mut bridge = Bridge::start();
    for mechanism in MECHANISMS {
        for case in Case::COMMON.into_iter().chain([Case::Two]) {
            let mut cmd = Command::new(&php);
            cmd.arg(&script);
            script_args(&mut cmd, &mut bridge, mechanism, case);
            expect_success("php", mechanism, case, &run_client(&mut cmd, None));
            check_generated(&mut bridge, "php", mechanism, case);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------

/// swaks options shared by all cases, without the password and recipients.
fn swaks_base(bridge: &Bridge, mechanism: &str) -> Vec<String> {
    [
        "--server",
        &format!("127.0.0.1:{}", bridge.port()),
        "--ehlo",
        "client.test",
        "--auth",
        mechanism,
        "--auth-user",
        USER,
        "--from",
        USER,
    ]
    .map(String::from)
    .to_vec()
}

/// swaks reads a file when the argument starts with "@".
fn at_file(path: &Path) -> String {
    format!("@{}", path.display())
}

/// HOST PORT USER PASSWORD MECHANISM CASE [ATTACHMENT_FILE], as both scripts take them.
fn script_args(cmd: &mut Command, bridge: &mut Bridge, mechanism: &str, case: Case) {
    cmd.arg("127.0.0.1")
        .arg(bridge.port().to_string())
        .arg(USER)
        .arg(&bridge.password)
        .arg(mechanism)
        .arg(case.name());
    if case == Case::Attachment {
        cmd.arg(bridge.blob_file());
    }
}

fn expect_success(client: &str, mechanism: &str, case: Case, out: &Output) {
    assert!(
        out.status.success(),
        "{client} with AUTH {mechanism}, case {}: {}",
        case.name(),
        describe(out)
    );
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Finds `program` on PATH or fails with the package that provides it.
fn require_program(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} is not installed (not on PATH): install the Debian package \
                 {package} (apt-get install {package}), or run scripts/test, which installs \
                 every client this test needs"
            )
        })
}

/// Runs a client to completion, killing it and failing after [`CLIENT_TIMEOUT`]. Output is
/// read in threads so a chatty client never blocks on a full pipe.
fn run_client(cmd: &mut Command, stdin: Option<Vec<u8>>) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let writer = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().unwrap();
        // A client that exits early closes the pipe; its exit status reports why.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let stdout = read_in_thread(child.stdout.take().unwrap());
    let stderr = read_in_thread(child.stderr.take().unwrap());
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = Output {
                status: child.wait().unwrap(),
                stdout: stdout.join().unwrap(),
                stderr: stderr.join().unwrap(),
            };
            panic!(
                "{cmd:?} did not finish within {CLIENT_TIMEOUT:?}; killed: {}",
                describe(&out)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(writer) = writer {
        writer.join().unwrap();
    }
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

fn read_in_thread(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

// ---------------------------------------------------------------------------------------
// The bridge under test
// ---------------------------------------------------------------------------------------

/// The running binary and its temp dir. Dropping it kills the process; during a panic it
/// also prints the bridge's log, which is what explains most failures.
struct Bridge {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    /// The local password, made at test time.
    password: String,
    /// `.eml` names already handed out by `collect`.
    seen: BTreeSet<String>,
}

impl Bridge {
    fn start() -> Bridge {
        let dir = tempfile::tempdir().unwrap();
        let password = random_secret();
        let hash = smtp_oauth_bridge::users::hash_password(&password).unwrap();
        let config = format!(
            r#"[server]
listen = ["127.0.0.1:0"]
hostname = "bridge.test"

[sandbox]
enabled = true
mail_dir = "{mail}"

[store]
directory = "{state}"

[log]
level = "debug"

[[accounts]]
name = "printer"
username = "{USER}"
password_hash = "{hash}"
provider = "sandbox"
"#,
            mail = dir.path().join("mail").display(),
            state = dir.path().join("state").display(),
        );
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).unwrap();

        let mut child = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"))
            .arg("--config")
            .arg(&config_path)
            .arg("run")
            // The log is parsed: keep the configured level and no colour codes.
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start the smtp-oauth-bridge binary");

        // One thread reads stderr for the whole run: it reports the listening address once,
        // then keeps draining so the bridge never blocks on a full pipe.
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut line = Vec::new();
            loop {
                line.clear();
                match stderr.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = strip_ansi(&String::from_utf8_lossy(&line));
                if let Some(addr) = listening_address(&text) {
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push_str(&text);
            }
        });

        let mut bridge = Bridge {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            log,
            password,
            seen: BTreeSet::new(),
        };
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => bridge.addr = addr,
            Err(_) => panic!(
                "the bridge did not log `listening for SMTP clients` within {START_TIMEOUT:?} \
                 (exit status: {:?})",
                bridge.child.try_wait()
            ),
        }
        bridge
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    /// The 5 MB attachment as a file, written once per bridge.
    fn blob_file(&self) -> PathBuf {
        let path = self.dir.path().join("blob.bin");
        if !path.exists() {
            std::fs::write(&path, blob()).unwrap();
        }
        path
    }

    /// `.eml` files in the mail dir not yet handed out.
    fn new_messages(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.mail_dir()) else {
            return Vec::new(); // not created before the first message
        };
        let mut names: Vec<String> = entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".eml") && !self.seen.contains(n))
            .collect();
        names.sort();
        names
    }

    /// Waits for exactly `count` new messages with their envelopes and returns them.
    fn collect(&mut self, count: usize) -> Vec<Stored> {
        let deadline = Instant::now() + STORE_TIMEOUT;
        loop {
            let names = self.new_messages();
            assert!(
                names.len() <= count,
                "expected {count} new message(s) in the mail dir, found {names:?}"
            );
            if names.len() == count {
                // The envelope may land just after the message; retry until both parse.
                let stored: Option<Vec<Stored>> = names
                    .iter()
                    .map(|n| Stored::read(&self.mail_dir(), n))
                    .collect();
                if let Some(stored) = stored {
                    self.seen.extend(names);
                    return stored;
                }
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} new message(s) with envelopes within {STORE_TIMEOUT:?}, \
                 found {names:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_nothing_new(&self) {
        let names = self.new_messages();
        assert!(names.is_empty(), "unexpected messages stored: {names:?}");
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- bridge log ({}) ---\n{}",
                self.addr,
                self.log.lock().map(|l| l.clone()).unwrap_or_default()
            );
        }
    }
}

/// `address=127.0.0.1:PORT` from the line that announces the listener.
fn listening_address(line: &str) -> Option<SocketAddr> {
    if !line.contains("listening for SMTP clients") {
        return None;
    }
    let rest = &line[line.find("address=")? + "address=".len()..];
    rest.split_whitespace().next()?.parse().ok()
}

/// Removes ANSI colour sequences, in case the log is coloured despite NO_COLOR.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A password or wrong password: random at test time, URL-safe so no client quotes it.
fn random_secret() -> String {
    let mut bytes = [0u8; 18];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    format!(
        "pw-{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// 5 MiB of deterministic pseudo-random bytes (xorshift64*): incompressible, and the same
/// in every run so a failure can be reproduced.
fn blob() -> &'static [u8] {
    static BLOB: OnceLock<Vec<u8>> = OnceLock::new();
    BLOB.get_or_init(|| {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut bytes = Vec::with_capacity(5 * 1024 * 1024);
        while bytes.len() < 5 * 1024 * 1024 {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            bytes.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        bytes
    })
}

// ---------------------------------------------------------------------------------------
// What arrived
// ---------------------------------------------------------------------------------------

/// One message as the sandbox Office365 stored it.
struct Stored {
    name: String,
    eml: Vec<u8>,
    envelope: Value,
}

impl Stored {
    fn read(dir: &Path, name: &str) -> Option<Stored> {
        let eml = std::fs::read(dir.join(name)).ok()?;
        let json = std::fs::read(dir.join(name.replace(".eml", ".json"))).ok()?;
        let envelope = serde_json::from_slice(&json).ok()?;
        Some(Stored {
            name: name.to_owned(),
            eml,
            envelope,
        })
    }

    /// The envelope: sender, recipients in the order sent, the authenticated mailbox, and a
    /// size that matches the stored bytes.
    fn assert_envelope(&self, rcpts: &[&str]) {
        let env = &self.envelope;
        let context = format!("envelope of {}: {env}", self.name);
        assert_eq!(address(&env["mail_from"]), USER, "{context}");
        let stored: Vec<String> = env["rcpt_to"]
            .as_array()
            .unwrap_or_else(|| panic!("rcpt_to is not a list; {context}"))
            .iter()
            .map(address)
            .collect();
        assert_eq!(stored, rcpts, "{context}");
        assert_eq!(env["auth_user"].as_str(), Some(USER), "{context}");
        assert_eq!(
            env["size"].as_u64(),
            Some(self.eml.len() as u64),
            "{context}"
        );
        assert!(!env["received_at"].is_null(), "{context}");
        assert!(!env["mail_params"].is_null(), "{context}");
    }

    /// The client sent our bytes unchanged (apart from dot-stuffing, undone by the server).
    fn assert_exact(&self, fixed: &Fixed) {
        self.assert_envelope(&fixed.rcpts);
        if self.eml != fixed.bytes {
            let at = self
                .eml
                .iter()
                .zip(&fixed.bytes)
                .position(|(a, b)| a != b)
                .unwrap_or(self.eml.len().min(fixed.bytes.len()));
            let around = |b: &[u8]| {
                String::from_utf8_lossy(&b[at.saturating_sub(40)..(at + 40).min(b.len())])
                    .into_owned()
            };
            panic!(
                "{} differs from what the client was given: {} vs {} bytes, first difference \
                 at byte {at}: stored {:?}, sent {:?}",
                self.name,
                self.eml.len(),
                fixed.bytes.len(),
                around(&self.eml),
                around(&fixed.bytes)
            );
        }
        if fixed.has_attachment {
            assert_attachment(self);
        }
    }
}

/// An address from the envelope, with or without angle brackets.
fn address(value: &Value) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("address is not a string: {value}"));
    text.trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

/// Checks a message MIME-built by the client script (smtplib, PHPMailer).
fn check_generated(bridge: &mut Bridge, client: &str, mechanism: &str, case: Case) {
    let tag = format!("{client} {mechanism} {}", case.name());
    if case == Case::Two {
        let mut stored = bridge.collect(2);
        stored.sort_by_key(|s| subject(&s.eml));
        for (s, (n, rcpt)) in stored.iter().zip([(1, ALICE[0]), (2, "bob@example.test")]) {
            assert_eq!(subject(&s.eml), format!("{tag} {n}/2"), "{}", s.name);
            s.assert_envelope(&[rcpt]);
        }
        return;
    }
    let stored = bridge.collect(1).remove(0);
    let eml = &stored.eml;
    let text = String::from_utf8_lossy(eml);
    match case {
        Case::Plain => {
            stored.assert_envelope(&ALICE);
            assert_eq!(subject(eml), tag);
            assert!(text.contains("Hello from "), "{text}");
        }
        Case::Attachment => {
            stored.assert_envelope(&ALICE);
            assert_eq!(subject(eml), tag);
            assert_attachment(&stored);
        }
        Case::Utf8 => {
            stored.assert_envelope(&ALICE);
            assert_eq!(subject(eml), format!("{tag} {UTF8_SUBJECT}"));
            // The body was sent as raw 8-bit UTF-8 and must arrive unchanged, not re-encoded.
            assert!(
                contains(eml, format!("\r\n\r\n{UTF8_BODY}\r\n").as_bytes()),
                "8-bit body missing from {}:\n{text}",
                stored.name
            );
        }
        Case::Dots => {
            stored.assert_envelope(&ALICE);
            assert!(
                contains(eml, format!("\r\n\r\n{DOTS_BODY}").as_bytes()),
                "dot lines not intact in {}:\n{text}",
                stored.name
            );
        }
        Case::Recipients => {
            // Both clients put Bcc addresses in the envelope only. smtplib's send_message()
            // orders the envelope To, Bcc, Cc; PHPMailer To, Cc, Bcc. The bridge must keep it.
            let [alice, bob, carol, dave] = MANY;
            if client == "python" {
                stored.assert_envelope(&[alice, bob, dave, carol]);
            } else {
                stored.assert_envelope(&MANY);
            }
            assert_eq!(
                header(eml, "To").as_deref(),
                Some("alice@example.test, bob@example.test")
            );
            assert_eq!(header(eml, "Cc").as_deref(), Some("carol@example.test"));
            assert_eq!(header(eml, "Bcc"), None, "Bcc header leaked");
        }
        Case::Two => unreachable!(),
    }
}

fn assert_attachment(stored: &Stored) {
    let decoded = attachment(&stored.eml)
        .unwrap_or_else(|| panic!("no base64 blob.bin part in {}", stored.name));
    assert!(
        decoded == blob(),
        "the attachment in {} decodes to {} bytes that differ from the {} sent",
        stored.name,
        decoded.len(),
        blob().len()
    );
}

/// Decodes the base64 part named blob.bin: its headers end at the first blank line after the
/// name, its body at the next boundary line.
fn attachment(eml: &[u8]) -> Option<Vec<u8>> {
    let name = find(eml, b"blob.bin")?;
    let headers_start = eml[..name].windows(4).rposition(|w| w == b"\r\n\r\n")?;
    let body_start = name + find(&eml[name..], b"\r\n\r\n")? + 4;
    let headers = String::from_utf8_lossy(&eml[headers_start..body_start]).to_ascii_lowercase();
    if !headers.contains("content-transfer-encoding: base64") {
        return None;
    }
    let body_end = body_start + find(&eml[body_start..], b"\r\n--")?;
    let text: Vec<u8> = eml[body_start..body_end]
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    BASE64.decode(text).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// A top-level header, unfolded; `None` if absent.
fn header(eml: &[u8], name: &str) -> Option<String> {
    let end = find(eml, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&eml[..end])
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ");
    head.split("\r\n").find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

/// The Subject with RFC 2047 encoded words (B or Q, UTF-8) decoded; whitespace between two
/// encoded words is dropped, as RFC 2047 says.
fn subject(eml: &[u8]) -> String {
    let raw = header(eml, "Subject").expect("no Subject header");
    let mut out = String::new();
    let mut previous_encoded = false;
    for word in raw.split_whitespace() {
        let decoded = decode_word(word);
        if !out.is_empty() && (!previous_encoded || decoded.is_none()) {
            out.push(' ');
        }
        previous_encoded = decoded.is_some();
        out.push_str(&decoded.unwrap_or_else(|| word.to_owned()));
    }
    out
}

fn decode_word(word: &str) -> Option<String> {
    let inner = word.strip_prefix("=?")?.strip_suffix("?=")?;
    let mut parts = inner.splitn(3, '?');
    let (charset, encoding, text) = (parts.next()?, parts.next()?, parts.next()?);
    assert!(charset.eq_ignore_ascii_case("utf-8"), "charset {charset}");
    let bytes = match encoding {
        "B" | "b" => BASE64.decode(text).expect("bad base64 in encoded word"),
        "Q" | "q" => {
            let mut bytes = Vec::new();
            let mut rest = text.as_bytes();
            while let Some((&b, tail)) = rest.split_first() {
                match b {
                    b'_' => bytes.push(b' '),
                    b'=' if tail.len() >= 2 => {
                        let hex = std::str::from_utf8(&tail[..2]).unwrap();
                        bytes.push(u8::from_str_radix(hex, 16).expect("bad Q escape"));
                        rest = &tail[2..];
                        continue;
                    }
                    _ => bytes.push(b),
                }
                rest = tail;
            }
            bytes
        }
        _ => return None,
    };
    Some(String::from_utf8(bytes).expect("encoded word is not UTF-8"))
}

// ---------------------------------------------------------------------------------------
// Messages for the clients that send bytes as given
// ---------------------------------------------------------------------------------------

struct Fixed {
    bytes: Vec<u8>,
    rcpts: Vec<&'static str>,
    has_attachment: bool,
}

/// A complete RFC 5322 message in CRLF form for swaks `--data`, curl `-T` and msmtp. It has
/// Date and Message-ID so no client adds headers, and no `%` or `\` that swaks would expand.
fn fixed_message(client: &str, mechanism: &str, case: Case) -> Fixed {
    let tag = format!("{client} {mechanism} {}", case.name());
    let mut head = format!(
        "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\
         Message-ID: <{client}-{mechanism}-{}@client.test>\r\n\
         From: {USER}\r\n",
        case.name()
    );
    let mut rcpts = ALICE.to_vec();
    let body = match case {
        Case::Plain => {
            head += &format!("To: {}\r\nSubject: {tag}\r\n", ALICE[0]);
            format!("Hello from {client}.\r\n")
        }
        Case::Utf8 => {
            // The client does not encode headers, so the file carries the encoded word.
            let subject = BASE64.encode(format!("{tag} {UTF8_SUBJECT}"));
            head += &format!(
                "To: {}\r\nSubject: =?UTF-8?B?{subject}?=\r\nMIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=UTF-8\r\nContent-Transfer-Encoding: 8bit\r\n",
                ALICE[0]
            );
            format!("{UTF8_BODY}\r\n")
        }
        Case::Dots => {
            head += &format!("To: {}\r\nSubject: {tag}\r\n", ALICE[0]);
            DOTS_BODY.to_owned()
        }
        Case::Recipients => {
            // dave is envelope-only, like a Bcc.
            rcpts = MANY.to_vec();
            head += &format!(
                "To: {}, {}\r\nCc: {}\r\nSubject: {tag}\r\n",
                MANY[0], MANY[1], MANY[2]
            );
            "To several people.\r\n".to_owned()
        }
        Case::Attachment => {
            let boundary = "=_bridge_test_boundary";
            head += &format!(
                "To: {}\r\nSubject: {tag}\r\nMIME-Version: 1.0\r\n\
                 Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n",
                ALICE[0]
            );
            let encoded = BASE64.encode(blob());
            let mut body = format!(
                "--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n\
                 A 5 MB attachment follows.\r\n\r\n--{boundary}\r\n\
                 Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\
                 Content-Disposition: attachment; filename=\"blob.bin\"\r\n\r\n"
            );
            for line in encoded.as_bytes().chunks(76) {
                body.push_str(std::str::from_utf8(line).unwrap());
                body.push_str("\r\n");
            }
            body.push_str(&format!("--{boundary}--\r\n"));
            body
        }
        Case::Two => unreachable!("one message per file"),
    };
    Fixed {
        bytes: format!("{head}\r\n{body}").into_bytes(),
        rcpts,
        has_attachment: case == Case::Attachment,
    }
}
