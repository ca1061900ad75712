//! `smtp-oauth-bridge doctor`: the checks an administrator would run by hand, in the order
//! they depend on each other, each printed as one ✓ or ✗ line with a one-line fix under a ✗.
//!
//! It uses the daemon's own code paths (configuration, store, token manager, upstream client)
//! so what passes here works in the service. It sends no mail: the upstream session ends with
//! QUIT right after `AUTH XOAUTH2`. It creates nothing on disk: a store key that does not
//! exist yet is reported, not made.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Account, Config, Flow};
use crate::oauth::endpoint::Http;
use crate::oauth::{AccessToken, HttpTokenSource, TokenError, TokenManager};
use crate::sandbox::Sandbox;
use crate::store::Store;
use crate::upstream::{Phase, Target, Upstream, UpstreamError};

/// Prints the checks to `out`; `true` when every check passed.
pub async fn run(config_path: &Path, out: &mut dyn Write) -> bool {
    let mut report = Report { out, failed: false };
    let mut config = match Config::load(config_path) {
        Ok(config) => {
            report.pass(&format!(
                "configuration parses: {} ({} account(s))",
                config_path.display(),
                config.accounts.len()
            ));
            config
        }
        Err(e) => {
            report.fail(
                &format!("configuration: {e}"),
                &format!(
                    "edit {}; every key is documented in the shipped proxy.toml",
                    config_path.display()
                ),
            );
            return false;
        }
    };

    check_listeners(&mut report, &config);
    let store = check_store(&mut report, &config);

    let sandbox = match &config.sandbox {
        Some(_) => match Sandbox::start(None).await {
            Ok(sandbox) => {
                report.pass("sandbox stand-ins for Entra and Office365 started");
                Some(sandbox)
            }
            Err(e) => {
                report.fail(
                    &format!("sandbox: {e}"),
                    "the sandbox needs to bind loopback ports",
                );
                return false;
            }
        },
        None => None,
    };
    let extra_roots = crate::server::bind_sandbox(&mut config, sandbox.as_ref());
    let tls = match crate::tls::client_config(config.extra_ca_file.as_deref(), extra_roots) {
        Ok(tls) => tls,
        Err(e) => {
            report.fail(
                &format!("TLS setup: {e}"),
                "fix [tls] extra_ca_file: it must be a readable PEM file of CA certificates",
            );
            return false;
        }
    };
    let http = match Http::new(&tls, config.timeouts.token_request) {
        Ok(http) => http,
        Err(e) => {
            report.fail(&format!("HTTP client: {e}"), "see the error above");
            return false;
        }
    };
    // One-off requests only: no refresh task, and the daemon's status file is left alone.
    let tokens = TokenManager::probe(
        &config.identities,
        Arc::new(HttpTokenSource::new(http)),
        store.map(Arc::new),
        config.tokens.clone(),
    );
    for account in &config.accounts {
        check_account(&mut report, &config, &tokens, &tls, account).await;
    }
    drop(sandbox);
    !report.failed
}

struct Report<'a> {
    out: &'a mut dyn Write,
    failed: bool,
}

impl Report<'_> {
    fn pass(&mut self, what: &str) {
        let (indent, what) = split_indent(what);
        let _ = writeln!(self.out, "{indent}✓ {what}");
    }

    fn fail(&mut self, what: &str, fix: &str) {
        self.failed = true;
        let (indent, what) = split_indent(what);
        let _ = writeln!(self.out, "{indent}✗ {what}\n{indent}    fix: {fix}");
    }

    fn skip(&mut self, what: &str, why: &str) {
        let (indent, what) = split_indent(what);
        let _ = writeln!(self.out, "{indent}- {what}: not checked ({why})");
    }

    fn heading(&mut self, text: &str) {
        let _ = writeln!(self.out, "{text}");
    }
}

/// Checks under an account heading are written with two leading spaces; the mark goes after
/// them.
fn split_indent(text: &str) -> (&str, &str) {
    let body = text.trim_start_matches(' ');
    (&text[..text.len() - body.len()], body)
}

fn check_listeners(report: &mut Report, config: &Config) {
    for &addr in &config.server.listen {
        check_bind(report, "SMTP listener", addr, is_bridge_smtp);
    }
    for &addr in &config.server.listen_implicit_tls {
        check_bind(report, "implicit-TLS SMTP listener", addr, is_bridge_smtps);
    }
    if let Some(admin) = &config.admin {
        check_bind(report, "admin listener", admin.listen, is_bridge_admin);
    }
}

fn check_bind(report: &mut Report, what: &str, addr: SocketAddr, ours: fn(SocketAddr) -> bool) {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => report.pass(&format!("{what} {addr} can be bound")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && ours(addr) => {
            report.pass(&format!("{what} {addr} is served by a running smtp-oauth-bridge"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => report.fail(
            &format!("{what} {addr}: address in use by another program"),
            "stop that program (ss -ltnp shows it) or choose another address in proxy.toml",
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => report.fail(
            &format!("{what} {addr}: {e}"),
            "ports below 1024 need smtp-oauth-bridge.socket or AmbientCapabilities=CAP_NET_BIND_SERVICE (see README)",
        ),
        Err(e) if addr.is_ipv6() && matches!(e.raw_os_error(), Some(97 | 99)) => {
            report.pass(&format!("{what} {addr}: IPv6 unavailable here; the bridge skips it"))
        }
        Err(e) => report.fail(&format!("{what} {addr}: {e}"), "choose another address in proxy.toml"),
    }
}

/// Reads the greeting on `addr` and looks for the bridge's.
fn is_bridge_smtp(addr: SocketAddr) -> bool {
    probe(addr, b"").contains("ESMTP smtp-oauth-bridge")
}

/// An implicit-TLS port of the bridge answers plaintext with a one-line refusal.
fn is_bridge_smtps(addr: SocketAddr) -> bool {
    probe(addr, b"\r\n").contains("This port expects TLS")
}

fn is_bridge_admin(addr: SocketAddr) -> bool {
    probe(addr, b"GET /healthz HTTP/1.0\r\n\r\n").contains("\"problems\"")
}

fn probe(addr: SocketAddr, send: &[u8]) -> String {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if !send.is_empty() && stream.write_all(send).is_err() {
        return String::new();
    }
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).unwrap_or(0);
    if send.is_empty() {
        let _ = stream.write_all(b"QUIT\r\n");
    }
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn check_store(report: &mut Report, config: &Config) -> Option<Store> {
    if !config.needs_store() {
        report.pass("store key: not needed (no account uses flow = \"refresh_token\")");
        return None;
    }
    match Store::open_existing(&config.store.directory) {
        Ok((store, key)) => {
            report.pass(&format!("store key readable: {}", key.display()));
            Some(store)
        }
        Err(e) => {
            report.fail(
                &format!("store key: {e}"),
                "run as the service's user or root; a new installation gets its key at the first start or `login`",
            );
            None
        }
    }
}

async fn check_account(
    report: &mut Report<'_>,
    config: &Config,
    tokens: &TokenManager,
    tls: &Arc<rustls::ClientConfig>,
    account: &Account,
) {
    let upstream = &account.upstream;
    report.heading(&format!(
        "account {} ({} via {}:{}):",
        account.name,
        account.mailbox.as_deref().unwrap_or(&account.username),
        upstream.host,
        upstream.port
    ));
    let token = match tokens.token(&account.identity).await {
        Ok(token) => {
            let left = token
                .expires_at
                .saturating_duration_since(tokio::time::Instant::now());
            report.pass(&format!(
                "  access token obtained (valid for {} min)",
                left.as_secs() / 60
            ));
            Some(token)
        }
        Err(e) => {
            report.fail(
                &format!("  access token: {e}"),
                &token_fix(config, account, &e),
            );
            None
        }
    };

    let target = Target {
        settings: upstream,
        tls,
        ehlo_name: &config.server.hostname,
        mailbox: account.mailbox.as_deref().unwrap_or(""),
        timeouts: config.timeouts,
    };
    let mut up = match Upstream::handshake(&target).await {
        Ok(up) => up,
        Err(e) => return handshake_failed(report, account, &e),
    };
    report.pass(&format!(
        "  provider reachable: {}:{} answered",
        upstream.host, upstream.port
    ));
    report.pass(&format!(
        "  TLS ({}) with a valid certificate for {}",
        up.tls_version().unwrap_or_else(|| "?".into()),
        upstream.host
    ));
    if !up.capabilities().supports_auth("XOAUTH2") {
        report.fail(
            &format!(
                "  EHLO does not list AUTH XOAUTH2 (offered: {})",
                up.capabilities().auth.join(" ")
            ),
            "point `upstream` at the provider's submission server (smtp.office365.com:587, smtp.gmail.com:465)",
        );
        report.skip("  AUTH XOAUTH2", "the provider does not offer it");
        up.quit().await;
        return;
    }
    report.pass("  EHLO lists AUTH XOAUTH2");
    match (token, account.mailbox.as_deref()) {
        (Some(token), Some(mailbox)) => authenticate(report, &mut up, mailbox, &token).await,
        (Some(_), None) => report.skip(
            "  AUTH XOAUTH2",
            "a *@domain account names no single mailbox; add an exact account to check one",
        ),
        (None, _) => report.skip("  AUTH XOAUTH2", "no access token"),
    }
    up.quit().await;
}

async fn authenticate(
    report: &mut Report<'_>,
    up: &mut Upstream,
    mailbox: &str,
    token: &AccessToken,
) {
    match up.authenticate(mailbox, token).await {
        Ok(()) => report.pass(&format!(
            "  AUTH XOAUTH2 accepted for {mailbox} (then QUIT; nothing sent)"
        )),
        Err(e) => {
            let fix = e
                .reply()
                .and_then(crate::hints::fix_for_reply)
                .unwrap_or("check that the token is for this mailbox and the app may send as it (README, Office365 setup)");
            report.fail(&format!("  AUTH XOAUTH2: {e}"), fix);
        }
    }
}

fn handshake_failed(report: &mut Report, account: &Account, e: &UpstreamError) {
    let upstream = &account.upstream;
    let unreachable = match e {
        UpstreamError::Timeout { phase, .. }
        | UpstreamError::Io { phase, .. }
        | UpstreamError::Closed { phase }
        | UpstreamError::Protocol { phase, .. }
        | UpstreamError::Rejected { phase, .. } => {
            matches!(phase, Phase::Connect | Phase::Greeting)
        }
        UpstreamError::BadHostName(_) => true,
        _ => false,
    };
    if unreachable {
        report.fail(
            &format!("  provider {}:{}: {e}", upstream.host, upstream.port),
            "check that this host can reach it (DNS, firewall, outbound proxy); `upstream` overrides the address",
        );
        report.skip("  TLS and certificate", "provider unreachable");
    } else {
        report.pass(&format!(
            "  provider reachable: {}:{} answered",
            upstream.host, upstream.port
        ));
        let text = e.to_string();
        let fix = if text.contains("certificate") || text.contains("Certificate") {
            "the certificate did not verify; behind a TLS-inspecting proxy add its CA with [tls] extra_ca_file"
        } else {
            "the provider would not set up TLS; check `upstream` and `upstream_tls` (starttls for 587, implicit for 465)"
        };
        report.fail(&format!("  TLS: {e}"), fix);
    }
    report.skip("  EHLO lists AUTH XOAUTH2", "no secure session");
    report.skip("  AUTH XOAUTH2", "no secure session");
}

fn token_fix(config: &Config, account: &Account, e: &TokenError) -> String {
    if let TokenError::NeedsLogin { hint, .. } = e
        && !hint.is_empty()
    {
        return hint.clone();
    }
    if let Some(fix) = crate::hints::fix_for_text(&e.to_string()) {
        return fix.replace("NAME", &account.identity);
    }
    let flow = config.identity(&account.identity).map(|i| i.oauth.flow);
    match e {
        TokenError::Transient { .. } => {
            "the token endpoint is unreachable or failing: check DNS, firewall and proxy for login.microsoftonline.com / oauth2.googleapis.com".into()
        }
        _ if flow == Some(Flow::RefreshToken) => format!(
            "sign in with `smtp-oauth-bridge login {}`",
            account.identity
        ),
        _ => "check tenant, client_id and the client secret or certificate against the app registration".into(),
    }
}
