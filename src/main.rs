//! The command line: parse flags, load the configuration, run a subcommand, pick the exit
//! code. Everything else lives in the library so tests can drive it.

use std::io::{BufRead, IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_bridge::config::{Config, DEFAULT_CONFIG_PATH, Flow};
use smtp_oauth_bridge::server::Bridge;

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
    /// Print an argon2 hash for a local password (asked for, or read from standard input).
    HashPassword,
    /// Store a refresh token for ACCOUNT, read from standard input.
    ImportToken {
        /// The account's `name` (or username) in the configuration.
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
        Command::Run => match load(&cli.config) {
            Ok(config) => run(config),
            Err(code) => code,
        },
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

fn run(config: Config) -> ExitCode {
    smtp_oauth_bridge::ops::init_logging(&config.log);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "smtp-oauth-bridge starting"
    );
    runtime().block_on(async {
        let bridge = match Bridge::start(config).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                eprintln!("smtp-oauth-bridge: {e}");
                return ExitCode::from(EX_UNAVAILABLE);
            }
        };
        bridge
            .serve(shutdown_signal(), Duration::from_secs(30))
            .await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
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
        if std::io::stdin().lock().read_line(&mut line).is_err() {
            eprintln!("smtp-oauth-bridge: cannot read the password from standard input");
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
    let Some(account) = config
        .account_by_name(wanted)
        .or_else(|| config.account_by_username(wanted))
    else {
        eprintln!("smtp-oauth-bridge: no account named {wanted} in the configuration");
        return ExitCode::from(EX_CONFIG);
    };
    if account.oauth.flow != Flow::RefreshToken {
        eprintln!(
            "smtp-oauth-bridge: account {} uses flow {:?}, which needs no refresh token",
            account.name, account.oauth.flow
        );
        return ExitCode::from(EX_CONFIG);
    }
    if std::io::stdin().is_terminal() {
        eprintln!("Paste the refresh token, then press Enter:");
    }
    let mut text = String::new();
    if std::io::stdin().read_to_string(&mut text).is_err() {
        eprintln!("smtp-oauth-bridge: cannot read the token from standard input");
        return ExitCode::FAILURE;
    }
    let token = SecretString::from(text.trim().to_string());
    if token.expose_secret().is_empty() || token.expose_secret().contains(char::is_whitespace) {
        eprintln!("smtp-oauth-bridge: expected one refresh token on standard input");
        return ExitCode::FAILURE;
    }
    let store = match smtp_oauth_bridge::store::Store::open(&config.store.directory) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("smtp-oauth-bridge: {e}");
            return ExitCode::from(EX_UNAVAILABLE);
        }
    };
    if let Err(e) = store.save_refresh_token(&account.name, &token) {
        eprintln!("smtp-oauth-bridge: {e}");
        return ExitCode::from(EX_UNAVAILABLE);
    }
    println!(
        "stored the refresh token of {} in {}",
        account.name,
        store.dir().display()
    );
    ExitCode::SUCCESS
}
