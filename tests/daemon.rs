//! The real binary as systemd runs it: readiness, reload and stop notifications on a
//! `NOTIFY_SOCKET`, watchdog pings, SIGTERM in the middle of a DATA transfer (the message is
//! relayed and acknowledged, or the client hears 421; never a 250 for a message the provider
//! did not take), SIGHUP reloading `proxy.toml` (a bad file is refused and the old one kept),
//! a listening socket inherited through socket activation, syslog priorities when stderr is the
//! journal, and `doctor`'s exit codes. Each test runs the binary in sandbox mode on port 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smtp_oauth_bridge::users::{DEMO_PASSWORD, DEMO_PASSWORD_HASH};

const USER: &str = "printer@sandbox.test";
const WAIT: Duration = Duration::from_secs(20);

fn config_text(dir: &Path, extra_server: &str, extra: &str) -> String {
    format!(
        r#"[server]
listen = ["127.0.0.1:0"]
{extra_server}

[sandbox]
enabled = true
mail_dir = "{mail}"

[store]
directory = "{state}"

[log]
level = "debug"
{extra}

[[accounts]]
name = "printer"
username = "{USER}"
password_hash = "{DEMO_PASSWORD_HASH}"
provider = "sandbox"
"#,
        mail = dir.join("mail").display(),
        state = dir.join("state").display(),
    )
}

fn bridge_command(config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"));
    cmd.arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
        .stdin(Stdio::null());
    cmd
}

/// A running bridge with its log collected and, when asked for, a notify socket.
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: Arc<Mutex<String>>,
    notify: UnixDatagram,
    notes: Vec<String>,
}

impl Daemon {
    fn start(extra_server: &str, extra: &str, env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("proxy.toml");
        std::fs::write(&config, config_text(dir.path(), extra_server, extra)).unwrap();
        let socket_path = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&socket_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut cmd = bridge_command(&config);
        cmd.arg("run")
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("cannot start the binary");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            let mut line = String::new();
            while matches!(stderr.read_line(&mut line), Ok(n) if n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Daemon {
            child,
            dir,
            config,
            log,
            notify,
            notes: Vec::new(),
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a notification containing `what`; returns every one received so far.
    fn wait_note(&mut self, what: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.notes.iter().any(|n| n.contains(what)) {
                let seen = std::mem::take(&mut self.notes);
                // Keep what came after the match for the next wait.
                let at = seen.iter().position(|n| n.contains(what)).unwrap();
                self.notes = seen[at + 1..].to_vec();
                return seen[..=at].to_vec();
            }
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.notify.recv(&mut buf) {
                self.notes
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        panic!(
            "no {what} notification; got {:?}\nlog:\n{}",
            self.notes,
            self.log()
        );
    }

    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "{what} not logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn addr(&self) -> SocketAddr {
        self.wait_log("listening for SMTP clients");
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("listening for SMTP clients"))
            .unwrap();
        let rest = &line[line.find("address=").unwrap() + 8..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn exit_code(&mut self) -> Option<i32> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(Instant::now() < deadline, "still running:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn delivered(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("mail")) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking SMTP client that returns whole replies as "code text" of their last line.
struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(addr: SocketAddr) -> (Client, String) {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = Client {
            reader: BufReader::new(stream),
        };
        let greeting = c.reply();
        (c, greeting)
    }

    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return format!("closed after {all:?}");
            }
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).unwrap();
    }

    fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes());
        self.reply()
    }

    /// Logs in and starts a message, sending its first half.
    fn mid_data(addr: SocketAddr, subject: &str) -> Client {
        let (mut c, _) = Client::connect(addr);
        assert!(c.cmd("EHLO client.test").starts_with("250"));
        let plain = base64_plain(USER, DEMO_PASSWORD);
        assert!(c.cmd(&format!("AUTH PLAIN {plain}")).starts_with("235"));
        assert!(c.cmd(&format!("MAIL FROM:<{USER}>")).starts_with("250"));
        assert!(c.cmd("RCPT TO:<someone@example.com>").starts_with("250"));
        assert!(c.cmd("DATA").starts_with("354"));
        c.send(format!("Subject: {subject}\r\n\r\nfirst half\r\n").as_bytes());
        c
    }
}

fn base64_plain(user: &str, password: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"))
}

#[test]
fn sigterm_during_data_lets_the_message_finish_then_exits_0() {
    let mut d = Daemon::start("", "[timeouts]\nshutdown_grace = 15", &[]);
    let ready = d.wait_note("READY=1");
    assert!(
        ready
            .last()
            .unwrap()
            .contains("STATUS=serving 1 account(s)"),
        "{ready:?}"
    );
    let addr = d.addr();
    let mut c = Client::mid_data(addr, "finished during the drain");

    d.signal("TERM");
    d.wait_note("STOPPING=1");
    c.send(b"second half\r\n.\r\n");
    let verdict = c.reply();
    assert!(verdict.starts_with("250"), "{verdict}");
    let delivered = d.delivered();
    assert_eq!(delivered.len(), 1);
    assert!(delivered[0].contains("finished during the drain"));
    // Nothing new is taken on.
    let after = c.cmd(&format!("MAIL FROM:<{USER}>"));
    assert!(
        after.starts_with("421 4.3.2") || after.starts_with("closed"),
        "{after}"
    );
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
    assert_eq!(d.exit_code(), Some(0), "{}", d.log());
    assert!(d.log().contains("message relayed"), "{}", d.log());
}

#[test]
fn sigterm_with_a_stalled_transfer_gives_421_and_delivers_nothing() {
    let mut d = Daemon::start("", "[timeouts]\nshutdown_grace = 1", &[]);
    d.wait_note("READY=1");
    let mut c = Client::mid_data(d.addr(), "never finished");
    d.signal("TERM");
    let told = c.reply();
    assert!(told.starts_with("421 4.3.2"), "{told}");
    assert_eq!(d.exit_code(), Some(0), "{}", d.log());
    assert!(d.delivered().is_empty(), "a partial message was delivered");
}

/// Ctrl-C in a terminal (SIGINT) drains like `systemctl stop`.
#[test]
fn sigint_drains_like_sigterm() {
    let mut d = Daemon::start("", "", &[]);
    d.wait_note("READY=1");
    let (mut idle, greeting) = Client::connect(d.addr());
    assert!(greeting.starts_with("220"), "{greeting}");
    d.signal("INT");
    d.wait_note("STOPPING=1");
    let told = idle.reply();
    assert!(told.starts_with("421 4.3.2"), "{told}");
    assert_eq!(d.exit_code(), Some(0), "{}", d.log());
}

/// Ctrl-C pressed twice: the second one does not wait out a long grace period for a client
/// that is taking its time, and the half-sent message is not delivered.
#[test]
fn a_second_sigint_stops_without_waiting_for_the_grace_period() {
    let mut d = Daemon::start("", "[timeouts]\nshutdown_grace = 60", &[]);
    d.wait_note("READY=1");
    let mut c = Client::mid_data(d.addr(), "cut short");
    d.signal("INT");
    d.wait_note("STOPPING=1");
    // Still draining: the client's transaction may finish.
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.child.try_wait().unwrap().is_none(), "{}", d.log());
    let stopped_at = Instant::now();
    d.signal("INT");
    let told = c.reply();
    assert!(told.starts_with("421 4.3.2"), "{told}");
    assert_eq!(d.exit_code(), Some(0), "{}", d.log());
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
    d.wait_log("asked to stop again");
    assert!(d.delivered().is_empty(), "a partial message was delivered");
}

#[test]
fn sighup_reloads_the_file_and_refuses_a_bad_one() {
    let mut d = Daemon::start(
        "hostname = \"before.test\"",
        "",
        &[("WATCHDOG_USEC", "100000")],
    );
    d.wait_note("READY=1");
    let addr = d.addr();
    let (mut before, greeting) = Client::connect(addr);
    assert!(greeting.contains("before.test"), "{greeting}");

    let text = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("before.test", "after.test");
    std::fs::write(&d.config, &text).unwrap();
    d.signal("HUP");
    let notes = d.wait_note("READY=1");
    // RELOADING=1 carries the monotonic time, as systemd 253+ requires.
    let reloading = notes
        .iter()
        .find(|n| n.contains("RELOADING=1"))
        .unwrap_or_else(|| panic!("no RELOADING=1 in {notes:?}"));
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC= with RELOADING=1: {reloading:?}"));
    assert!(usec > 0);
    d.wait_log("configuration reloaded");
    let (_, greeting) = Client::connect(addr);
    assert!(greeting.contains("after.test"), "{greeting}");
    // The session opened before the reload keeps its configuration.
    assert!(before.cmd("EHLO client.test").contains("before.test"));

    // A broken file: refused with a line naming the key, and the bridge carries on.
    std::fs::write(
        &d.config,
        text.replace("[server]", "[server]\nbogus_key = 1"),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_note("READY=1");
    d.wait_log("configuration reload refused");
    assert!(d.log().contains("server.bogus_key"), "{}", d.log());
    let (_, greeting) = Client::connect(addr);
    assert!(greeting.contains("after.test"), "{greeting}");

    // Watchdog pings arrive as systemd asked (every 50 ms for WATCHDOG_USEC=100000).
    d.wait_note("WATCHDOG=1");
    d.wait_note("WATCHDOG=1");
    d.signal("TERM");
    assert_eq!(d.exit_code(), Some(0));
}

/// Runs the binary the way systemd's socket activation does: a listening socket on fd 3 and
/// LISTEN_FDS/LISTEN_PID naming it (python3 binds it, then execs the bridge in place).
fn socket_activated(bind: &str, config: &Path) -> (Child, u16) {
    let script = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"#;
    let mut child = Command::new("python3")
        .args(["-c", script, bind, env!("CARGO_BIN_EXE_smtp-oauth-bridge")])
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_remove("LISTEN_FDS")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed (scripts/test installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line.trim().parse().unwrap())
}

#[test]
fn socket_activation_serves_on_the_inherited_socket_and_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, config_text(dir.path(), "", "")).unwrap();

    let (mut child, port) = socket_activated("127.0.0.1", &config);
    let (mut c, greeting) = Client::connect(SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(greeting.starts_with("220 "), "{greeting}");
    let plain = base64_plain(USER, DEMO_PASSWORD);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    assert!(c.cmd(&format!("AUTH PLAIN {plain}")).starts_with("235"));
    let _ = child.kill();
    let mut log = String::new();
    let _ = child.wait();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("socket from systemd"), "{log}");
    assert!(
        !log.contains("address=127.0.0.1:0"),
        "server.listen must be ignored: {log}"
    );

    // A socket on a non-loopback address would expose clear-text passwords: refused, exit 64.
    let (mut child, _) = socket_activated("0.0.0.0", &config);
    let status = child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(log.contains("not a loopback address"), "{log}");
}

#[test]
fn under_journald_each_line_carries_its_syslog_priority() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, config_text(dir.path(), "", "")).unwrap();
    let stderr_path = dir.path().join("journal");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = bridge_command(&config)
        .arg("run")
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&stderr_path).unwrap();
        if text.contains("listening for SMTP clients") || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("<6>listening for SMTP clients"), "{text}");
    assert!(text.contains("<7>"), "debug lines have priority 7: {text}");
    for line in text.lines() {
        assert!(
            line.starts_with('<') && line.as_bytes().get(2) == Some(&b'>'),
            "line without a priority: {line:?}"
        );
        assert!(
            !line.contains('\u{1b}'),
            "colour codes for the journal: {line:?}"
        );
    }
}

/// `format = "json"`: every line is a JSON object; the relayed message's line has the
/// session's id, client and account and the message's account, size, recipients, reply
/// code and the provider's text with its queue id. `RUST_LOG` wins over `[log] level`.
#[test]
fn json_lines_carry_the_session_and_message_fields_and_rust_log_sets_the_level() {
    let mut d = Daemon::start(
        "",
        "format = \"json\"",
        &[("RUST_LOG", "smtp_oauth_bridge=info")],
    );
    d.wait_note("READY=1");
    d.wait_log("listening for SMTP clients");
    let parsed = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect()
    };
    let message = |v: &serde_json::Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    let addr: SocketAddr = parsed(&d.log())
        .iter()
        .find(|v| message(v) == "listening for SMTP clients")
        .and_then(|v| v["fields"]["address"].as_str()?.parse().ok())
        .expect("the listening line names its address");

    let mut c = Client::mid_data(addr, "as json");
    c.send(b"second half\r\n.\r\n");
    let verdict = c.reply();
    assert!(verdict.starts_with("250"), "{verdict}");
    d.wait_log("message relayed");
    let lines = parsed(&d.log());
    let relayed = lines
        .iter()
        .find(|v| message(v) == "message relayed")
        .unwrap();
    assert_eq!(relayed["level"], "INFO");
    let fields = &relayed["fields"];
    assert_eq!(fields["account"], "printer");
    assert_eq!(fields["recipients"], 1);
    assert_eq!(fields["code"], 250);
    assert!(fields["size"].as_u64().unwrap() > 20, "{fields}");
    // The provider's text, with the queue id it gave the message.
    let reply = fields["reply"].as_str().unwrap();
    assert!(
        verdict.contains(reply) && reply.contains('<'),
        "{reply} / {verdict}"
    );
    let span = &relayed["span"];
    assert_eq!(span["name"], "session");
    assert_eq!(span["account"], "printer");
    assert!(span["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(!span["id"].as_str().unwrap().is_empty());
    // [log] level = "debug" in the file, RUST_LOG=smtp_oauth_bridge=info in the environment.
    assert!(lines.iter().all(|v| v["level"] != "DEBUG"), "{}", d.log());

    d.signal("TERM");
    assert_eq!(d.exit_code(), Some(0));
}

#[test]
fn doctor_passes_on_the_sandbox_and_fails_with_a_fix_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, config_text(dir.path(), "", "")).unwrap();
    let out = bridge_command(&config).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(!text.contains('✗'), "{text}");
    assert!(
        text.contains("✓ AUTH XOAUTH2 accepted for printer@sandbox.test"),
        "{text}"
    );

    // An Office365 account whose token endpoint and provider are both unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[[accounts]]\nname = \"scanner\"\n\
             username = \"scanner@contoso.com\"\npassword_hash = \"{}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"y\"\n\
             token_url = \"http://127.0.0.1:{port}/token\"\nupstream = \"127.0.0.1:{port}\"\n",
            smtp_oauth_bridge::users::hash_password("pw").unwrap()
        ),
    )
    .unwrap();
    let out = bridge_command(&config).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("✗ access token"), "{text}");
    assert!(
        text.contains(&format!("✗ provider 127.0.0.1:{port}")),
        "{text}"
    );
    assert!(text.matches("fix: ").count() >= 2, "{text}");
    assert!(
        !text.contains("client_secret = \"y\"") && !text.contains(" y "),
        "{text}"
    );
}

/// Sandbox mode is as strict as Office365: a mailbox sends only as itself, so another sender
/// gets `554 5.2.252 SendAsDenied` after the data and the log says what to change; and a
/// fourth concurrent session for one mailbox is refused, which a pool set above Office365's
/// limit turns into `451 4.3.2` for the client, with the log naming the setting.
#[test]
fn the_sandbox_refuses_what_office365_refuses() {
    let mut d = Daemon::start("", "[pool]\nmax_sessions = 4\nwait = 1", &[]);
    d.wait_note("READY=1");
    let addr = d.addr();

    let (mut c, _) = Client::connect(addr);
    assert!(c.cmd("EHLO client.test").starts_with("250"));
    let plain = base64_plain(USER, DEMO_PASSWORD);
    assert!(c.cmd(&format!("AUTH PLAIN {plain}")).starts_with("235"));
    assert!(c.cmd("MAIL FROM:<ceo@sandbox.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<someone@example.com>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    c.send(b"Subject: not mine to send\r\n\r\nbody\r\n.\r\n");
    let verdict = c.reply();
    assert!(verdict.starts_with("554 5.2.252"), "{verdict}");
    assert!(verdict.contains("SendAsDenied"), "{verdict}");
    assert!(
        d.delivered().is_empty(),
        "a message sent as another address was stored"
    );
    d.wait_log("fix=\"send as the mailbox itself");

    // Three transactions hold three provider sessions; a fourth session is refused.
    let mut holding: Vec<Client> = (0..3)
        .map(|i| Client::mid_data(addr, &format!("holding {i}")))
        .collect();
    let (mut fourth, _) = Client::connect(addr);
    assert!(fourth.cmd("EHLO client.test").starts_with("250"));
    assert!(
        fourth
            .cmd(&format!("AUTH PLAIN {plain}"))
            .starts_with("235")
    );
    let refused = fourth.cmd(&format!("MAIL FROM:<{USER}>"));
    assert!(refused.starts_with("451 4.3.2"), "{refused}");
    d.wait_log("refused another concurrent session");
    for c in &mut holding {
        c.send(b"rest\r\n.\r\n");
        let done = c.reply();
        assert!(done.starts_with("250"), "{done}");
    }
    assert_eq!(d.delivered().len(), 3);
}
