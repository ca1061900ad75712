//! Load benchmark: N concurrent legacy clients × M messages of S bytes through the real
//! `smtp-oauth-bridge` binary to the fake Office365, and the same load sent directly to the
//! fake Office365 with XOAUTH2 (the limit the bridge can approach), in one run.
//!
//! The fake token endpoint and Office365 run in this process; the bridge runs as its own
//! process, so its CPU time and peak RSS are read from /proc without the load generator's
//! share. A relay in front of the fake Office365 can add a fixed one-way delay to every chunk
//! in both directions, which emulates a WAN round trip (TLS handshakes included).
//!
//! Run: `cargo bench --bench relay -- --clients 50 --messages 2000 --size 4096`
//! Options: --clients N, --messages M (total), --size BYTES, --per-connection K (messages on one
//! client connection, default 1), --rtt-ms R (emulated round trip to the provider), --pipelining
//! (client pipelines AUTH+MAIL+RCPT+DATA), --mode both|bridge|direct|all, --warmup W (messages sent
//! through each path before measuring, e.g. to fill the bridge's session pool), --max-sessions S
//! (the bridge's `pool.max_sessions`), --idle N (open N authenticated idle sessions and report
//! RSS instead of sending), --pin (this process on CPU 0, the bridge on the others, with
//! `taskset`: the load generator and the fake provider then cannot take the bridge's CPU, as
//! they would not in production).
//!
//! `--mode all` adds a third path between the two: the direct clients' TCP connections pass
//! through a forwarder that does nothing but copy bytes (`tokio::io::copy_bidirectional`),
//! running as its own process like the bridge. It is the ceiling for any relay that sits in
//! its own process between sender and provider on the same machine: what a long client session
//! through the bridge cannot beat however little the bridge does per message.
//!
//! The bridge runs with `[limits] max_connections` and `max_connections_per_source` raised to
//! 20,000, because all load comes from 127.0.0.1 (the defaults, 100 and 20, would refuse it),
//! and otherwise with the shipped defaults (`[pool] max_sessions = 3` unless --max-sessions).
//! The soft limit on open files is raised to the hard limit (10,000 idle sessions need more
//! than the usual 1,024); the bridge inherits it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use smtp_oauth_bridge::sandbox::{
    ClientRegistration, Office365, Office365Config, SandboxCa, TokenEndpoint, TokenEndpointConfig,
    TokenRegistry,
};
use smtp_oauth_bridge::smtp::{Reply, parse_reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const USER: &str = "bench@contoso.com";
const PASSWORD: &str = "bench-local-password";
const CLIENT_ID: &str = "bench-client";
const TENANT: &str = "contoso.onmicrosoft.com";

#[derive(Clone)]
struct Args {
    clients: usize,
    messages: usize,
    size: usize,
    per_connection: usize,
    rtt: Duration,
    pipelining: bool,
    mode: String,
    idle: usize,
    warmup: usize,
    max_sessions: Option<usize>,
    pin: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        clients: 10,
        messages: 1000,
        size: 4096,
        per_connection: 1,
        rtt: Duration::ZERO,
        pipelining: false,
        mode: "both".into(),
        idle: 0,
        warmup: 0,
        max_sessions: None,
        pin: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_default();
        match flag.as_str() {
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--messages" => a.messages = value().parse().expect("--messages M"),
            "--size" => a.size = value().parse().expect("--size BYTES"),
            "--per-connection" => a.per_connection = value().parse().expect("--per-connection K"),
            "--rtt-ms" => a.rtt = Duration::from_millis(value().parse().expect("--rtt-ms R")),
            "--pipelining" => a.pipelining = true,
            "--pin" => a.pin = true,
            "--mode" => a.mode = value(),
            "--idle" => a.idle = value().parse().expect("--idle N"),
            "--warmup" => a.warmup = value().parse().expect("--warmup W"),
            "--max-sessions" => a.max_sessions = Some(value().parse().expect("--max-sessions S")),
            "--bench" => {}
            other => panic!("unknown option {other}"),
        }
    }
    a.per_connection = a.per_connection.max(1);
    a
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(FORWARDER_ROLE) {
        return forwarder_main();
    }
    let args = parse_args();
    // Every client connection is a file descriptor here and in the bridge (which inherits it).
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if args.pin {
        // Before the runtime starts, so its threads inherit the main thread's CPU.
        let pinned = std::process::Command::new("taskset")
            .args(["-pc", "0", &std::process::id().to_string()])
            .stdout(std::process::Stdio::null())
            .status();
        assert!(
            pinned.is_ok_and(|s| s.success()),
            "--pin needs taskset (util-linux)"
        );
    }
    if args.idle + args.clients + 64 > nofile as usize {
        eprintln!("open-file limit {nofile} is too low for this run; raise it with ulimit -Hn");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Interrupted or timed out: dropping the run kills the bridge process with it.
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! {
            _ = run(args) => {}
            _ = tokio::signal::ctrl_c() => eprintln!("interrupted"),
            _ = terminate.recv() => eprintln!("terminated"),
        }
    });
}

struct Stage {
    _dir: tempfile::TempDir,
    ca: SandboxCa,
    registry: Arc<TokenRegistry>,
    /// Kept alive for the bridge's token requests.
    _token_endpoint: TokenEndpoint,
    office365: Office365,
    /// Where SMTP to the provider goes: the fake Office365 itself, or the delay relay.
    provider: SocketAddr,
    bridge: Option<ChildProcess>,
    /// The byte-copying forwarder in front of the provider (`--mode all`).
    forwarder: Option<ChildProcess>,
}

async fn run(args: Args) {
    let stage = start_stage(&args).await;
    println!(
        "# clients={} messages={} size={} per_connection={} rtt_ms={} pipelining={} warmup={} \
         max_sessions={} pin={} cpus={}",
        args.clients,
        args.messages,
        args.size,
        args.per_connection,
        args.rtt.as_millis(),
        args.pipelining,
        args.warmup,
        args.max_sessions
            .map_or("default".to_string(), |n| n.to_string()),
        args.pin,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let bridge = stage.bridge.as_ref().expect("bridge started");
    if args.idle > 0 {
        idle_sessions(&args, bridge).await;
        return;
    }
    let all = args.mode == "all";
    if all || args.mode == "both" || args.mode == "direct" {
        let token = fetch_token(&stage);
        let direct = Target::Direct {
            stage: &stage,
            addr: stage.provider,
            token: &token,
        };
        warm_up(&args, &direct).await;
        let report = load(&args, direct).await;
        report.print("direct", &args, None);
    }
    if let Some(forwarder) = &stage.forwarder {
        let token = fetch_token(&stage);
        let forwarded = Target::Direct {
            stage: &stage,
            addr: forwarder.addr,
            token: &token,
        };
        warm_up(&args, &forwarded).await;
        let report = measured(&args, forwarded, forwarder).await;
        report.0.print("forwarder", &args, Some(report.1));
    }
    if all || args.mode == "both" || args.mode == "bridge" {
        warm_up(&args, &Target::Bridge(bridge.addr)).await;
        let report = measured(&args, Target::Bridge(bridge.addr), bridge).await;
        report.0.print("bridge", &args, Some(report.1));
    }
    let stored = stage.office365.messages().len();
    println!("# fake Office365 kept {stored} messages in memory (bounded)");
}

/// One measured load through a relay process, with what /proc says of that process.
async fn measured(args: &Args, target: Target<'_>, process: &ChildProcess) -> (Report, Process) {
    let before = process.cpu_seconds();
    let rss_before = process.rss_kib();
    process.reset_peak_rss();
    let report = load(args, target).await;
    let cpu = process.cpu_seconds() - before;
    let usage = Process {
        cpu,
        rss_before_kib: rss_before,
        peak_rss_kib: process.peak_rss_kib(),
    };
    (report, usage)
}

async fn start_stage(args: &Args) -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let ca = SandboxCa::generate().unwrap();
    let tls = ca.server_config(&["localhost", "127.0.0.1"]).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    let secret = format!("bench-{}", std::process::id());
    let registry = Arc::new(TokenRegistry::new());
    let token_endpoint = TokenEndpoint::start(
        tls.clone(),
        registry.clone(),
        TokenEndpointConfig {
            clients: vec![ClientRegistration::new(CLIENT_ID, &secret)],
            ..TokenEndpointConfig::default()
        },
    )
    .await
    .unwrap();
    let office365 = Office365::start(tls, registry.clone(), Office365Config::default())
        .await
        .unwrap();
    let provider = if args.rtt.is_zero() {
        office365.addr()
    } else {
        delay_relay(office365.addr(), args.rtt / 2).await
    };
    let bridge = ChildProcess::bridge(
        dir.path(),
        &ca_file,
        &token_endpoint.token_url(TENANT),
        &secret,
        provider,
        args.max_sessions,
        args.pin,
    )
    .await;
    let forwarder = (args.mode == "all").then(|| ChildProcess::forwarder(provider, args.pin));
    Stage {
        _dir: dir,
        ca,
        registry,
        _token_endpoint: token_endpoint,
        office365,
        provider,
        bridge: Some(bridge),
        forwarder,
    }
}

/// A relay (the bridge binary, or the byte-copying forwarder) as its own process, so /proc
/// accounts for it alone.
struct ChildProcess {
    child: std::process::Child,
    addr: SocketAddr,
}

impl ChildProcess {
    /// The bridge binary with a configuration for this run.
    async fn bridge(
        dir: &Path,
        ca_file: &Path,
        token_url: &str,
        secret: &str,
        provider: SocketAddr,
        max_sessions: Option<usize>,
        pin: bool,
    ) -> ChildProcess {
        let hash = smtp_oauth_bridge::users::hash_password(PASSWORD).unwrap();
        let config = dir.join("proxy.toml");
        let pool = max_sessions.map_or(String::new(), |n| format!("[pool]\nmax_sessions = {n}\n"));
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = [\"127.0.0.1:0\"]\nmax_errors = 1000\n\
                 [limits]\nmax_connections = 20000\nmax_connections_per_source = 20000\n\
                 [tls]\nextra_ca_file = \"{}\"\n[store]\ndirectory = \"{}\"\n[log]\nlevel = \"info\"\n{pool}\
                 [[accounts]]\nname = \"bench\"\nusername = \"{USER}\"\npassword_hash = \"{hash}\"\n\
                 tenant = \"{TENANT}\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{secret}\"\n\
                 token_url = \"{token_url}\"\nupstream = \"{provider}\"\n",
                ca_file.display(),
                dir.join("state").display()
            ),
        )
        .unwrap();
        let binary = env!("CARGO_BIN_EXE_smtp-oauth-bridge");
        let mut command = relay_command(Path::new(binary), pin);
        let mut child = command
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the bridge binary");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut sent = false;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if !sent
                    && line.contains("listening for SMTP clients")
                    && let Some(addr) = line.split("address=").nth(1)
                {
                    let addr = addr.split_whitespace().next().unwrap_or("").to_string();
                    let _ = tx.send(addr);
                    sent = true;
                }
                if line.contains("ERROR") || line.contains("panicked") {
                    eprintln!("bridge: {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("bridge did not start")
            .parse()
            .unwrap();
        ChildProcess { child, addr }
    }

    /// This benchmark binary again, as a forwarder to `target`; it prints the address it
    /// listens on as its first line.
    fn forwarder(target: SocketAddr, pin: bool) -> ChildProcess {
        use std::io::BufRead;
        let exe = std::env::current_exe().expect("the benchmark's own path");
        let mut command = relay_command(&exe, pin);
        let mut child = command
            .arg(FORWARDER_ROLE)
            .arg(target.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the forwarder");
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .expect("the forwarder's address");
        let addr = first.trim().parse().expect("the forwarder's address");
        ChildProcess { child, addr }
    }

    /// utime + stime of the process, in seconds.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses and may contain spaces.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        ticks / 100.0
    }

    fn peak_rss_kib(&self) -> u64 {
        status_field(self.child.id(), "VmHWM:")
    }

    fn rss_kib(&self) -> u64 {
        status_field(self.child.id(), "VmRSS:")
    }

    /// Makes VmHWM start again from the current RSS (Linux 4.0 and later), so the peak
    /// reported is the measured run's, not start-up's or the warm-up's.
    fn reset_peak_rss(&self) {
        let _ = std::fs::write(format!("/proc/{}/clear_refs", self.child.id()), "5");
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A command for a relay process; with `pin`, kept off CPU 0, where this process runs.
fn relay_command(binary: &Path, pin: bool) -> std::process::Command {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    if pin && cpus > 1 {
        let mut c = std::process::Command::new("taskset");
        c.arg("-c").arg(format!("1-{}", cpus - 1)).arg(binary);
        c
    } else {
        std::process::Command::new(binary)
    }
}

/// The first argument that makes this binary the forwarder of `--mode all`.
const FORWARDER_ROLE: &str = "--serve-as-forwarder";

/// Accepts on a loopback port (printed on stdout) and copies bytes both ways between each
/// connection and the address given after the role argument, on a runtime built like the
/// bridge's (a worker per CPU). Runs until killed.
fn forwarder_main() {
    let target: SocketAddr = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .expect("forwarder target address");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
}

fn status_field(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[derive(Clone)]
enum Target<'a> {
    Bridge(SocketAddr),
    /// XOAUTH2 to the provider at `addr`: the provider itself, or the forwarder before it.
    Direct {
        stage: &'a Stage,
        addr: SocketAddr,
        token: &'a str,
    },
}

struct Report {
    messages: usize,
    errors: usize,
    /// Connections whose QUIT got no 221 within a second (not counted as errors: the
    /// messages were sent).
    slow_quits: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

/// What /proc says about the bridge over one measured run.
struct Process {
    cpu: f64,
    rss_before_kib: u64,
    peak_rss_kib: u64,
}

impl Report {
    fn print(&self, name: &str, args: &Args, process: Option<Process>) {
        let mut l = self.latencies.clone();
        l.sort();
        let pct = |p: f64| {
            l.get(((l.len() as f64 - 1.0) * p).round() as usize)
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(f64::NAN)
        };
        let rate = self.messages as f64 / self.elapsed.as_secs_f64();
        print!(
            "{name:>9}: {} msgs, {} errors, {:.2} s, {rate:.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
            self.messages,
            self.errors,
            self.elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99)
        );
        if !args.rtt.is_zero() {
            let rtt = args.rtt.as_secs_f64() * 1000.0;
            print!(", p50 = {:.2} round trips of {rtt:.0} ms", pct(0.5) / rtt);
        }
        if let Some(p) = process {
            let per_1000 = p.cpu / self.messages.max(1) as f64 * 1000.0;
            print!(
                ", {name} CPU {:.2} s ({per_1000:.3} s per 1000 msgs), RSS {:.1} MiB before, \
                 peak during the run {:.1} MiB",
                p.cpu,
                p.rss_before_kib as f64 / 1024.0,
                p.peak_rss_kib as f64 / 1024.0
            );
        }
        if self.slow_quits > 0 {
            print!(", {} QUITs unanswered within 1 s", self.slow_quits);
        }
        println!();
    }
}

/// Sends `args.warmup` messages through `target` with as many clients as the measured run,
/// unmeasured: the bridge's session pool is warm afterwards, as it is in steady use.
async fn warm_up(args: &Args, target: &Target<'_>) {
    if args.warmup == 0 {
        return;
    }
    let warm = Args {
        clients: args.clients.min(args.warmup),
        messages: args.warmup,
        ..args.clone()
    };
    let report = load(&warm, target.clone()).await;
    if report.errors > 0 {
        eprintln!("warm-up: {} errors", report.errors);
    }
}

async fn load(args: &Args, target: Target<'_>) -> Report {
    let body = message_body(args.size);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let direct = match &target {
        Target::Direct { stage, addr, token } => {
            Some((*addr, connector(&stage.ca), xoauth2(USER, token)))
        }
        Target::Bridge(_) => None,
    };
    let bridge_addr = match &target {
        Target::Bridge(addr) => Some(*addr),
        Target::Direct { .. } => None,
    };
    for _ in 0..args.clients {
        let next = next.clone();
        let body = body.clone();
        let args = args.clone();
        let direct = direct.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut slow_quits = 0;
            // A message's latency is what its sender feels: for the first message on a
            // connection it includes connecting (and, direct, TLS and AUTH).
            'connections: while next.fetch_add(1, Ordering::Relaxed) < args.messages {
                let t = Instant::now();
                let mut conn = match (&direct, bridge_addr) {
                    (Some((addr, tls, auth)), _) => match Conn::direct(*addr, tls, auth).await {
                        Ok(c) => c,
                        Err(why) => {
                            eprintln!("direct connection failed: {why}");
                            errors += 1;
                            continue;
                        }
                    },
                    (None, Some(addr)) => match Conn::try_plain(addr).await {
                        Some(c) => c,
                        None => {
                            eprintln!("connection to the bridge refused or not greeted");
                            errors += 1;
                            continue;
                        }
                    },
                    _ => unreachable!(),
                };
                let ok = if bridge_addr.is_some() {
                    conn.bridge_login_and_send(&body, args.pipelining).await
                } else {
                    conn.send(&body, args.pipelining).await
                };
                if !ok {
                    errors += 1;
                    continue;
                }
                latencies.push(t.elapsed());
                for _ in 1..args.per_connection {
                    if next.fetch_add(1, Ordering::Relaxed) >= args.messages {
                        slow_quits += usize::from(!conn.quit().await);
                        break 'connections;
                    }
                    let t = Instant::now();
                    if !conn.send(&body, args.pipelining).await {
                        errors += 1;
                        continue 'connections;
                    }
                    latencies.push(t.elapsed());
                }
                slow_quits += usize::from(!conn.quit().await);
            }
            (latencies, errors, slow_quits)
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut slow_quits = 0;
    for t in tasks {
        let (l, e, q) = t.await.unwrap();
        latencies.extend(l);
        errors += e;
        slow_quits += q;
    }
    Report {
        messages: latencies.len(),
        errors,
        slow_quits,
        elapsed: started.elapsed(),
        latencies,
    }
}

fn message_body(size: usize) -> Arc<Vec<u8>> {
    let mut body =
        b"From: bench@contoso.com\r\nTo: sink@contoso.com\r\nSubject: bench\r\n\r\n".to_vec();
    let line =
        b"The quick brown fox jumps over the lazy dog 0123456789 abcdefghijklmnopqrstuvwxyz\r\n";
    while body.len() + line.len() <= size.max(body.len() + line.len()) {
        body.extend_from_slice(line);
        if body.len() >= size {
            break;
        }
    }
    Arc::new(body)
}

fn connector(ca: &SandboxCa) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// The direct path's token: issued once by the fake Entra's registry, the way a client with
/// a token cache would hold one; the bridge obtains its own over HTTPS.
fn fetch_token(stage: &Stage) -> String {
    stage
        .registry
        .issue(
            CLIENT_ID,
            None,
            "https://outlook.office365.com/.default",
            Duration::from_secs(3600),
        )
        .access_token
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Conn {
    stream: Box<dyn Io>,
    buf: Vec<u8>,
}

impl Conn {
    async fn try_plain(addr: SocketAddr) -> Option<Conn> {
        let stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        let mut c = Conn {
            stream: Box::new(stream),
            buf: Vec::with_capacity(4096),
        };
        (c.reply().await.code() == 220).then_some(c)
    }

    async fn direct(
        addr: SocketAddr,
        tls: &tokio_rustls::TlsConnector,
        auth: &str,
    ) -> Result<Conn, &'static str> {
        let mut tcp = TcpStream::connect(addr).await.map_err(|_| "connect")?;
        tcp.set_nodelay(true).unwrap();
        // Greeting, EHLO and STARTTLS in clear; each reply fits one read on loopback, and the
        // server sends nothing after its 220 to STARTTLS.
        let mut chunk = [0u8; 4096];
        for line in [&b""[..], b"EHLO bench\r\n", b"STARTTLS\r\n"] {
            tcp.write_all(line).await.map_err(|_| "write")?;
            let mut got = Vec::new();
            loop {
                let n = tcp.read(&mut chunk).await.map_err(|_| "read")?;
                if n == 0 {
                    return Err("closed before TLS");
                }
                got.extend_from_slice(&chunk[..n]);
                if let Ok(Some(_)) = parse_reply(&got) {
                    break;
                }
            }
        }
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tls.connect(name, tcp).await.map_err(|_| "TLS handshake")?;
        let mut c = Conn {
            stream: Box::new(tls),
            buf: Vec::new(),
        };
        c.cmd(b"EHLO bench\r\n").await;
        if c.cmd(b"AUTH XOAUTH2\r\n").await.code() != 334 {
            return Err("AUTH XOAUTH2 refused");
        }
        if c.cmd(format!("{auth}\r\n").as_bytes()).await.code() != 235 {
            return Err("token refused");
        }
        Ok(c)
    }

    async fn reply(&mut self) -> Reply {
        loop {
            if let Ok(Some((reply, used))) = parse_reply(&self.buf) {
                self.buf.drain(..used);
                return reply;
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return Reply::new(421, "closed");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn cmd(&mut self, line: &[u8]) -> Reply {
        if self.stream.write_all(line).await.is_err() {
            return Reply::new(421, "closed");
        }
        self.reply().await
    }

    /// EHLO, AUTH PLAIN, then one message; with `pipelining` everything up to DATA goes in
    /// one write, as a pipelining client sends it.
    async fn bridge_login_and_send(&mut self, body: &[u8], pipelining: bool) -> bool {
        let auth =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
        if pipelining {
            let _ = self.cmd(b"EHLO bench\r\n").await;
            let batch = format!(
                "AUTH PLAIN {auth}\r\nMAIL FROM:<{USER}>\r\nRCPT TO:<sink@contoso.com>\r\nDATA\r\n"
            );
            if self.stream.write_all(batch.as_bytes()).await.is_err() {
                return false;
            }
            for expected in [235, 250, 250, 354] {
                if self.reply().await.code() != expected {
                    return false;
                }
            }
            return self.data(body).await;
        }
        if self.cmd(b"EHLO bench\r\n").await.code() != 250 {
            return false;
        }
        if self
            .cmd(format!("AUTH PLAIN {auth}\r\n").as_bytes())
            .await
            .code()
            != 235
        {
            return false;
        }
        self.send(body, false).await
    }

    /// MAIL, RCPT, DATA and the message; with `pipelining` the three commands go in one
    /// write, as a pipelining client sends them.
    async fn send(&mut self, body: &[u8], pipelining: bool) -> bool {
        let mail = format!("MAIL FROM:<{USER}>\r\n");
        let rcpt = "RCPT TO:<sink@contoso.com>\r\n";
        if pipelining {
            let batch = format!("{mail}{rcpt}DATA\r\n");
            if self.stream.write_all(batch.as_bytes()).await.is_err() {
                return false;
            }
            for expected in [250, 250, 354] {
                if self.reply().await.code() != expected {
                    return false;
                }
            }
            return self.data(body).await;
        }
        if self.cmd(mail.as_bytes()).await.code() != 250 {
            return false;
        }
        if self.cmd(rcpt.as_bytes()).await.code() != 250 {
            return false;
        }
        if self.cmd(b"DATA\r\n").await.code() != 354 {
            return false;
        }
        self.data(body).await
    }

    async fn data(&mut self, body: &[u8]) -> bool {
        if self.stream.write_all(body).await.is_err() {
            return false;
        }
        self.cmd(b".\r\n").await.code() == 250
    }

    /// Says goodbye without waiting long: the benchmark measures messages, not farewells.
    /// False when the server did not answer 221 within a second.
    async fn quit(mut self) -> bool {
        let answer = tokio::time::timeout(Duration::from_secs(1), self.cmd(b"QUIT\r\n")).await;
        answer.is_ok_and(|reply| reply.code() == 221)
    }
}

/// Opens `args.idle` authenticated sessions (100 logging in at a time) that stay open, reports
/// the bridge's RSS, then sends one message on a few of them to show they still work.
async fn idle_sessions(args: &Args, bridge: &ChildProcess) {
    let before = bridge.rss_kib();
    let started = Instant::now();
    let mut conns = Vec::with_capacity(args.idle);
    let mut failures = 0;
    let addr = bridge.addr;
    let mut remaining = args.idle;
    while remaining > 0 {
        let batch = remaining.min(100);
        remaining -= batch;
        let logins: Vec<_> = (0..batch)
            .map(|_| tokio::spawn(async move { idle_login(addr).await }))
            .collect();
        for login in logins {
            match login.await.unwrap() {
                Some(c) => conns.push(c),
                None => failures += 1,
            }
        }
    }
    let after = bridge.rss_kib();
    println!(
        "  idle: {} authenticated sessions open ({failures} failed) in {:.1} s, bridge RSS \
         {:.1} MiB (was {:.1} MiB; {:.1} KiB per session), peak {:.1} MiB",
        conns.len(),
        started.elapsed().as_secs_f64(),
        after as f64 / 1024.0,
        before as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / conns.len().max(1) as f64,
        bridge.peak_rss_kib() as f64 / 1024.0
    );
    let body = message_body(args.size);
    let mut sent = 0;
    let sample = conns.len().min(10);
    for c in conns.iter_mut().take(sample) {
        if c.send(&body, false).await {
            sent += 1;
        }
    }
    println!("  idle: {sent} of {sample} sampled sessions then sent a message");
}

async fn idle_login(addr: SocketAddr) -> Option<Conn> {
    let mut c = Conn::try_plain(addr).await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{USER}\0{PASSWORD}"));
    if c.cmd(b"EHLO bench\r\n").await.code() != 250 {
        return None;
    }
    let code = c
        .cmd(format!("AUTH PLAIN {auth}\r\n").as_bytes())
        .await
        .code();
    (code == 235).then_some(c)
}

/// A loopback relay that delivers every chunk `one_way` later in each direction, preserving
/// order: a WAN round trip without a bandwidth limit.
async fn delay_relay(target: SocketAddr, one_way: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let _ = inbound.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = outbound.set_nodelay(true);
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::join!(delayed_pump(ri, wo, one_way), delayed_pump(ro, wi, one_way));
            });
        }
    });
    addr
}

async fn delayed_pump(
    mut from: impl AsyncRead + Unpin + Send + 'static,
    mut to: impl AsyncWrite + Unpin + Send + 'static,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
