//! The command line: parse flags, load the configuration, run a subcommand, pick the exit
//! code. Everything else lives in the library so tests can drive it.

use std::io::{BufRead, IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_bridge::cli;
use smtp_oauth_bridge::config::{Config, DEFAULT_CONFIG_PATH};
use smtp_oauth_bridge::oauth::login::Method;
use smtp_oauth_bridge::ops::systemd;
use smtp_oauth_bridge::server::{Bridge, Control};
use tokio::sync::{mpsc, oneshot};

/// sysexits.h: the configuration is wrong.
const EX_CONFIG: u8 = 64;
/// sysexits.h: a service the bridge needs is unavailable (bind, store).
const EX_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    version,
    about = "Lets legacy SMTP clients send through Office365 and Gmail with OAuth2"
)]
struct Cli {
    /// Configuration file.
    #[arg(long, short, env = "SMTP_OAUTH_BRIDGE_CONFIG", default_value = DEFAULT_CONFIG_PATH, global = true)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default).
    Run,
    /// Check the configuration and exit.
    CheckConfig,
    /// Check configuration, listeners, store key and every account's token and provider
    /// login (nothing is sent); one line per check, non-zero exit on any failure.
    Doctor,
    /// Print an argon2 hash for a local password: asked for twice on a terminal, otherwise
    /// the first line of standard input (without its line end).
    HashPassword,
    /// Give an identity its grant: sign a user in (device code or browser), or check an
    /// app-only credential. Stores the tokens encrypted.
    Login {
        /// The identity's name, or an account's name or username.
        identity: String,
        /// Sign in with a code on any device (default where the provider has a device
        /// endpoint, as Microsoft does).
        #[arg(long, conflicts_with_all = ["browser", "paste"])]
        device: bool,
        /// Sign in with a browser; its redirect comes back to a listener on localhost, or the
        /// address it ends up on may be pasted (default for Gmail).
        #[arg(long, conflicts_with = "paste")]
        browser: bool,
        /// Like --browser without the listener: paste the address the browser ends up on.
        #[arg(long)]
        paste: bool,
        /// Minutes a browser sign-in may take (1 to 1440).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1440))]
        timeout: u64,
    },
    /// List each account: its identity, flow, state, token expiry, last refresh and
    /// refresh-token age (from the running daemon's status file; no secret is shown).
    Accounts,
    /// Store a refresh token obtained elsewhere, read from standard input.
    ImportToken {
        /// The identity's name, or an account's name or username.
        account: String,
    },
    /// Make a self-signed certificate (ECDSA P-256) for the bridge's own TLS listeners:
    /// DIR/bridge.crt and DIR/bridge.key (mode 0600).
    GenerateCertificate {
        /// Where to write the files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// A host name or IP address clients use to reach the bridge (repeatable).
        /// Default: localhost, 127.0.0.1 and ::1.
        #[arg(long = "name")]
        names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::HashPassword => hash_password(),
        Command::GenerateCertificate { dir, names, force } => {
            generate_certificate(&dir, names, force)
        }
        Command::CheckConfig => match load(&cli.config) {
            Ok(config) => {
                println!(
                    "{}: ok ({} account(s))",
                    cli.config.display(),
                    config.accounts.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::ImportToken { account } => match load(&cli.config) {
            Ok(config) => import_token(&config, &account),
            Err(code) => code,
        },
        Command::Login {
            identity,
            device,
            browser,
            paste,
            timeout,
        } => match load(&cli.config) {
            Ok(config) => {
                let method = match (device, browser, paste) {
                    (true, _, _) => Some(Method::Device),
                    (_, true, _) => Some(Method::Browser),
                    (_, _, true) => Some(Method::Paste),
                    _ => None,
                };
                let timeout = Duration::from_secs(timeout * 60);
                finish(runtime().block_on(cli::login(&config, &identity, method, timeout)))
            }
            Err(code) => code,
        },
        Command::Accounts => match load(&cli.config) {
            Ok(config) => finish(cli::accounts(&config).map(|table| print!("{table}"))),
            Err(code) => code,
        },
        Command::Doctor => doctor(&cli.config),
        Command::Run => {
            // Before any thread exists: this reads and clears LISTEN_FDS.
            let inherited = match systemd::inherited_listeners() {
                Ok(listeners) => listeners,
                Err(e) => {
                    eprintln!("smtp-oauth-bridge: {e}");
                    return ExitCode::from(EX_CONFIG);
                }
            };
            match load(&cli.config) {
                Ok(config) => run(config, inherited, cli.config),
                Err(code) => code,
            }
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("smtp-oauth-bridge: configuration error: {e}");
        ExitCode::from(EX_CONFIG)
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime")
}

fn run(config: Config, inherited: Vec<std::net::TcpListener>, path: PathBuf) -> ExitCode {
    smtp_oauth_bridge::ops::init_logging(&config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "smtp-oauth-bridge starting"
    );
    runtime().block_on(async {
        let bridge = match Bridge::start_with(config, inherited).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("smtp-oauth-bridge: {e}");
                let code = if e.is_config() {
                    EX_CONFIG
                } else {
                    EX_UNAVAILABLE
                };
                return ExitCode::from(code);
            }
        };
        let _watchdog = systemd::spawn_watchdog();
        systemd::ready(&serving_status(&bridge));
        let (control, requests) = mpsc::channel(4);
        let signals = tokio::spawn(handle_signals(control, path));
        bridge.run(requests).await;
        signals.abort();
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

fn serving_status(bridge: &Bridge) -> String {
    let shared = bridge.shared();
    format!(
        "serving {} account(s) on {}",
        shared.config.accounts.len(),
        bridge
            .local_addrs()
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// SIGHUP reloads the configuration file; SIGTERM and SIGINT drain and stop. A second
/// SIGTERM or SIGINT during the drain (Ctrl-C pressed twice) stops without waiting out the
/// grace period: open sessions hear 421 and nothing half-sent is delivered.
async fn handle_signals(control: mpsc::Sender<Control>, path: PathBuf) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the bridge with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&control, &path).await,
        }
    }
    systemd::stopping();
    let _ = control.send(Control::Shutdown).await;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let _ = control.send(Control::Shutdown).await;
}

async fn reload(control: &mpsc::Sender<Control>, path: &std::path::Path) {
    systemd::reloading();
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    match Config::load(path) {
        Ok(config) => {
            let (answer, answered) = oneshot::channel();
            if control
                .send(Control::Reload(Box::new(config), answer))
                .await
                .is_err()
            {
                return;
            }
            let status = match answered.await {
                Ok(Ok(_)) => "configuration reloaded".to_string(),
                Ok(Err(e)) => format!("reload refused: {e}"),
                Err(_) => return,
            };
            systemd::ready(&status);
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                "configuration reload refused; the running configuration stays"
            );
            systemd::ready(&format!("reload refused: {e}"));
        }
    }
}

fn doctor(path: &std::path::Path) -> ExitCode {
    let ok = runtime().block_on(async {
        let mut out = std::io::stdout();
        smtp_oauth_bridge::ops::doctor::run(path, &mut out).await
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn hash_password() -> ExitCode {
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ");
        let second = rpassword::prompt_password("Repeat: ");
        match (first, second) {
            (Ok(a), Ok(b)) if a == b => SecretString::from(a),
            (Ok(_), Ok(_)) => {
                eprintln!("smtp-oauth-bridge: the passwords differ");
                return ExitCode::FAILURE;
            }
            _ => {
                eprintln!("smtp-oauth-bridge: cannot read the password");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let mut line = String::new();
        if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
            if e.kind() == std::io::ErrorKind::InvalidData {
                eprintln!("smtp-oauth-bridge: the password must be UTF-8 text");
            } else {
                eprintln!("smtp-oauth-bridge: cannot read the password from standard input");
            }
            return ExitCode::FAILURE;
        }
        SecretString::from(line.trim_end_matches(['\r', '\n']).to_string())
    };
    if password.expose_secret().is_empty() {
        eprintln!("smtp-oauth-bridge: the password is empty");
        return ExitCode::FAILURE;
    }
    match smtp_oauth_bridge::users::hash_password(password.expose_secret()) {
        Ok(hash) => {
            println!("{hash}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smtp-oauth-bridge: {e}");
            ExitCode::FAILURE
        }
    }
}

fn generate_certificate(dir: &std::path::Path, mut names: Vec<String>, force: bool) -> ExitCode {
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    }
    let generated = match smtp_oauth_bridge::tls::generate_self_signed(&names) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("smtp-oauth-bridge: cannot make a certificate: {e}");
            return ExitCode::FAILURE;
        }
    };
    match smtp_oauth_bridge::tls::write_certificate(dir, &generated, force) {
        Ok((certificate, key)) => {
            println!("certificate: {}", certificate.display());
            println!("private key: {} (mode 0600)", key.display());
            println!("names: {}", names.join(", "));
            println!("SHA-256 fingerprint: {}", generated.fingerprint);
            println!(
                "In proxy.toml, [tls]: certificate_file = \"{}\" and key_file = \"{}\"",
                certificate.display(),
                key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("smtp-oauth-bridge: cannot write the certificate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn import_token(config: &Config, wanted: &str) -> ExitCode {
    if std::io::stdin().is_terminal() {
        eprintln!("Paste the refresh token, then press Enter:");
    }
    let mut text = String::new();
    if std::io::stdin().read_to_string(&mut text).is_err() {
        eprintln!("smtp-oauth-bridge: cannot read the token from standard input");
        return ExitCode::FAILURE;
    }
    let text = zeroize::Zeroizing::new(text);
    finish(cli::import_token(config, wanted, &text).map(|message| println!("{message}")))
}

/// Prints a subcommand's failure and turns it into the exit code.
fn finish(result: Result<(), cli::Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("smtp-oauth-bridge: {failure}");
            ExitCode::from(match failure {
                cli::Failure::Usage(_) => EX_CONFIG,
                cli::Failure::Unavailable(_) => EX_UNAVAILABLE,
                cli::Failure::Failed(_) => 1,
            })
        }
    }
}
