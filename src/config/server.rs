//! The client-facing half of the configuration: listeners and who may use them, the bridge's
//! own TLS certificate, limits on connections and failed logins, and the timeout of every
//! phase. Raw serde structs here, checked into typed settings by [`check_server_side`].
//!
//! The rule this file enforces before anything is bound: clients send their password in
//! clear text unless TLS protects it, so a listener on anything but loopback needs an
//! explicit `allow_non_loopback = true` *and* a certificate, and AUTH from a non-loopback
//! address is only accepted inside TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, err};

pub struct ServerSettings {
    /// Plain listeners; STARTTLS is offered on them when a certificate is configured.
    pub listen: Vec<SocketAddr>,
    /// Listeners that speak TLS from the first byte (port 465 style).
    pub listen_implicit_tls: Vec<SocketAddr>,
    /// The name in the greeting and the EHLO reply, and the name the bridge gives upstream.
    pub hostname: String,
    /// Largest message accepted from clients; advertised in EHLO as SIZE.
    pub max_message_size: u64,
    /// Unknown or out-of-place commands tolerated before the connection is closed.
    pub max_errors: u32,
    /// Who may authenticate without TLS.
    pub plaintext_auth: PlaintextAuth,
    /// Listeners beyond loopback were explicitly allowed (they also need a certificate).
    pub allow_non_loopback: bool,
}

/// Where AUTH is accepted before TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextAuth {
    /// From loopback addresses (127.0.0.0/8, ::1, ::ffff:127.0.0.0/104): the password never
    /// leaves the machine.
    Loopback,
    /// Never: every client must use STARTTLS or the implicit-TLS listener first.
    Never,
}

impl PlaintextAuth {
    /// Whether a client at `peer` may send its password outside TLS.
    pub fn allows(self, peer: IpAddr) -> bool {
        self == PlaintextAuth::Loopback && is_loopback(peer)
    }
}

/// Loopback, counting IPv4-mapped IPv6 loopback (what a dual-stack socket reports for a
/// client of 127.0.0.1), which `Ipv6Addr::is_loopback` does not.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The bridge's own certificate for clients (STARTTLS and implicit TLS).
pub struct LocalTls {
    pub certificate_file: PathBuf,
    pub key_file: PathBuf,
    pub server_config: Arc<rustls::ServerConfig>,
}

/// Bounds on what clients may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Client connections served at once; more are answered 421 and closed.
    pub max_connections: usize,
    /// Client connections served at once from one source address.
    pub max_connections_per_source: usize,
    /// Failed logins from one source address within `auth_failure_window` after which its
    /// logins are refused until the oldest failure leaves the window.
    pub auth_failures: u32,
    pub auth_failure_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100,
            max_connections_per_source: 20,
            auth_failures: 5,
            auth_failure_window: Duration::from_secs(60),
        }
    }
}

/// How long each phase may take before the bridge gives up on it.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// A client's next complete command line, or its next bytes during DATA.
    pub client_idle: Duration,
    /// A whole client connection, however busy; bounds how long one slot can be held.
    pub session: Duration,
    /// A TLS handshake, with a client (STARTTLS, implicit TLS) or with the provider.
    pub tls_handshake: Duration,
    /// TCP connect toward the provider.
    pub upstream_connect: Duration,
    /// The provider's 220 greeting.
    pub upstream_greeting: Duration,
    /// Each upstream command's reply.
    pub upstream_command: Duration,
    /// The upstream's reply after the end of DATA, which can take minutes for large messages.
    pub upstream_data_end: Duration,
    /// An upstream connection older than this is replaced before the next transaction.
    pub upstream_max_age: Duration,
    /// Each request to the token endpoint.
    pub token_request: Duration,
    /// After SIGTERM, how long sessions in flight may take to finish before they are told
    /// 421 and closed.
    pub shutdown_grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            client_idle: Duration::from_secs(300),
            session: Duration::from_secs(3600),
            tls_handshake: Duration::from_secs(30),
            upstream_connect: Duration::from_secs(30),
            upstream_greeting: Duration::from_secs(60),
            upstream_command: Duration::from_secs(120),
            upstream_data_end: Duration::from_secs(600),
            upstream_max_age: Duration::from_secs(600),
            token_request: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    listen: Option<Vec<String>>,
    listen_implicit_tls: Option<Vec<String>>,
    allow_non_loopback: Option<bool>,
    plaintext_auth: Option<PlaintextAuth>,
    hostname: Option<String>,
    pub(super) max_message_size: Option<u64>,
    max_errors: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    client_idle: Option<u64>,
    session: Option<u64>,
    tls_handshake: Option<u64>,
    upstream_connect: Option<u64>,
    upstream_greeting: Option<u64>,
    upstream_command: Option<u64>,
    upstream_data_end: Option<u64>,
    upstream_max_age: Option<u64>,
    token_request: Option<u64>,
    shutdown_grace: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    max_connections: Option<usize>,
    max_connections_per_source: Option<usize>,
    auth_failures: Option<u32>,
    auth_failure_window: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) extra_ca_file: Option<PathBuf>,
    certificate_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// The checked client-facing settings; `max_message_size` is resolved by the caller, which
/// knows the providers.
pub(super) struct ServerSide {
    pub server: ServerSettings,
    pub explicit_max_size: Option<u64>,
    pub local_tls: Option<LocalTls>,
}

pub(super) fn check_server_side(raw: RawServer, tls: &RawTls) -> Result<ServerSide, ConfigError> {
    let local_tls = check_local_tls(tls)?;
    let allow_non_loopback = raw.allow_non_loopback.unwrap_or(false);
    let listen = raw
        .listen
        .unwrap_or_else(|| vec!["127.0.0.1:1587".into(), "[::1]:1587".into()]);
    let listen = addresses("server.listen", &listen, allow_non_loopback, &local_tls)?;
    let implicit = raw.listen_implicit_tls.unwrap_or_default();
    let listen_implicit_tls = addresses(
        "server.listen_implicit_tls",
        &implicit,
        allow_non_loopback,
        &local_tls,
    )?;
    if !listen_implicit_tls.is_empty() && local_tls.is_none() {
        return Err(err(
            "server.listen_implicit_tls",
            "needs tls.certificate_file and tls.key_file (make them with \
             `smtp-oauth-bridge generate-certificate`)",
        ));
    }
    if listen.is_empty() && listen_implicit_tls.is_empty() {
        return Err(err("server.listen", "needs at least one address"));
    }
    let plaintext_auth = raw.plaintext_auth.unwrap_or(PlaintextAuth::Loopback);
    if plaintext_auth == PlaintextAuth::Never && local_tls.is_none() {
        return Err(err(
            "server.plaintext_auth",
            "is \"never\" but no certificate is configured (tls.certificate_file), so no \
             client could log in",
        ));
    }
    let hostname = raw.hostname.unwrap_or_else(|| "localhost".into());
    if hostname.is_empty() || !hostname.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err("server.hostname", "must be a host name without spaces"));
    }
    if raw.max_message_size == Some(0) {
        return Err(err("server.max_message_size", "must be greater than 0"));
    }
    Ok(ServerSide {
        server: ServerSettings {
            listen,
            listen_implicit_tls,
            hostname,
            max_message_size: raw.max_message_size.unwrap_or(0),
            max_errors: raw.max_errors.unwrap_or(10),
            plaintext_auth,
            allow_non_loopback,
        },
        explicit_max_size: raw.max_message_size,
        local_tls,
    })
}

fn addresses(
    key: &str,
    texts: &[String],
    allow_non_loopback: bool,
    local_tls: &Option<LocalTls>,
) -> Result<Vec<SocketAddr>, ConfigError> {
    let mut out = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let addr: SocketAddr = text.parse().map_err(|_| {
            err(
                format!("{key}[{i}]"),
                "expected an IP address and port such as \"127.0.0.1:1587\" or \"[::1]:1587\"",
            )
        })?;
        if !is_loopback(addr.ip()) {
            if !allow_non_loopback {
                return Err(err(
                    format!("{key}[{i}]"),
                    "is not a loopback address; clients elsewhere send their password over \
                     the network, so this needs server.allow_non_loopback = true and a \
                     certificate (tls.certificate_file)",
                ));
            }
            if local_tls.is_none() {
                return Err(err(
                    format!("{key}[{i}]"),
                    "is not a loopback address, which needs a certificate \
                     (tls.certificate_file and tls.key_file) so clients can log in over TLS",
                ));
            }
        }
        out.push(addr);
    }
    Ok(out)
}

fn check_local_tls(raw: &RawTls) -> Result<Option<LocalTls>, ConfigError> {
    let (certificate_file, key_file) = match (&raw.certificate_file, &raw.key_file) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        (Some(_), None) => {
            return Err(err("tls.key_file", "missing (tls.certificate_file is set)"));
        }
        (None, Some(_)) => {
            return Err(err("tls.certificate_file", "missing (tls.key_file is set)"));
        }
    };
    let server_config = crate::tls::server_config(&certificate_file, &key_file)
        .map_err(|e| err(e.key(), e.to_string()))?;
    Ok(Some(LocalTls {
        certificate_file,
        key_file,
        server_config,
    }))
}

pub(super) fn check_timeouts(raw: &RawTimeouts) -> Result<Timeouts, ConfigError> {
    let d = Timeouts::default();
    let pick = |key: &str, value: Option<u64>, default: Duration| {
        super::timeout(format!("timeouts.{key}"), value, default)
    };
    Ok(Timeouts {
        client_idle: pick("client_idle", raw.client_idle, d.client_idle)?,
        session: pick("session", raw.session, d.session)?,
        tls_handshake: pick("tls_handshake", raw.tls_handshake, d.tls_handshake)?,
        upstream_connect: pick("upstream_connect", raw.upstream_connect, d.upstream_connect)?,
        upstream_greeting: pick(
            "upstream_greeting",
            raw.upstream_greeting,
            d.upstream_greeting,
        )?,
        upstream_command: pick("upstream_command", raw.upstream_command, d.upstream_command)?,
        upstream_data_end: pick(
            "upstream_data_end",
            raw.upstream_data_end,
            d.upstream_data_end,
        )?,
        upstream_max_age: pick("upstream_max_age", raw.upstream_max_age, d.upstream_max_age)?,
        token_request: pick("token_request", raw.token_request, d.token_request)?,
        shutdown_grace: pick("shutdown_grace", raw.shutdown_grace, d.shutdown_grace)?,
    })
}

pub(super) fn check_limits(raw: &RawLimits) -> Result<Limits, ConfigError> {
    let d = Limits::default();
    let positive = |key: &str, value: Option<usize>, default: usize| match value {
        Some(0) => Err(err(format!("limits.{key}"), "must be at least 1")),
        Some(n) => Ok(n),
        None => Ok(default),
    };
    let limits = Limits {
        max_connections: positive("max_connections", raw.max_connections, d.max_connections)?,
        max_connections_per_source: positive(
            "max_connections_per_source",
            raw.max_connections_per_source,
            d.max_connections_per_source,
        )?,
        auth_failures: match raw.auth_failures {
            Some(0) => return Err(err("limits.auth_failures", "must be at least 1")),
            Some(n) => n,
            None => d.auth_failures,
        },
        auth_failure_window: match raw.auth_failure_window {
            Some(0) => {
                return Err(err(
                    "limits.auth_failure_window",
                    "must be at least 1 second",
                ));
            }
            Some(s) => Duration::from_secs(s),
            None => d.auth_failure_window,
        },
    };
    if limits.max_connections_per_source > limits.max_connections {
        return Err(err(
            "limits.max_connections_per_source",
            "is larger than limits.max_connections",
        ));
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn account() -> String {
        let hash = crate::users::hash_password("pw").unwrap();
        format!(
            "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n"
        )
    }

    /// `[server]` and `[tls]` text plus an account; `CERT`/`KEY` stand for a real pair.
    fn load(server: &str, tls: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string()];
        let generated = crate::tls::generate_self_signed(&names).unwrap();
        let (crt, key) = crate::tls::write_certificate(dir.path(), &generated, false).unwrap();
        let tls = tls
            .replace("CERT", &crt.display().to_string())
            .replace("KEY", &key.display().to_string());
        Config::from_toml_str(&format!("[server]\n{server}\n[tls]\n{tls}\n{}", account()))
    }

    const CERT: &str = "certificate_file = \"CERT\"\nkey_file = \"KEY\"";

    #[test]
    fn listeners_beyond_loopback_need_an_explicit_setting_and_a_certificate() {
        let cases: &[(&str, &str, Result<(), &str>)] = &[
            ("listen = [\"127.0.0.1:1587\", \"[::1]:1587\"]", "", Ok(())),
            ("listen = [\"127.0.0.5:25\"]", "", Ok(())),
            ("listen = [\"0.0.0.0:587\"]", "", Err("server.listen[0]")),
            (
                "listen = [\"192.168.1.5:587\"]",
                CERT,
                Err("server.listen[0]"),
            ),
            (
                "listen = [\"192.168.1.5:587\"]\nallow_non_loopback = true",
                "",
                Err("server.listen[0]"),
            ),
            (
                "listen = [\"[::]:587\"]\nallow_non_loopback = true",
                CERT,
                Ok(()),
            ),
            (
                "listen = [\"127.0.0.1:1587\"]\nlisten_implicit_tls = [\"0.0.0.0:465\"]\nallow_non_loopback = true",
                CERT,
                Ok(()),
            ),
            (
                "listen = [\"127.0.0.1:1587\"]\nlisten_implicit_tls = [\"127.0.0.1:1465\"]",
                "",
                Err("server.listen_implicit_tls"),
            ),
            (
                "plaintext_auth = \"never\"",
                "",
                Err("server.plaintext_auth"),
            ),
            ("plaintext_auth = \"never\"", CERT, Ok(())),
            ("listen = []", "", Err("server.listen")),
            ("", "certificate_file = \"CERT\"", Err("tls.key_file")),
            ("", "key_file = \"KEY\"", Err("tls.certificate_file")),
            (
                "",
                "certificate_file = \"/nonexistent.crt\"\nkey_file = \"KEY\"",
                Err("tls.certificate_file"),
            ),
            (
                "",
                "certificate_file = \"CERT\"\nkey_file = \"CERT\"",
                Err("tls.key_file"),
            ),
        ];
        for (server, tls, want) in cases {
            let got = load(server, tls).map(|_| ()).map_err(|e| e.key);
            assert_eq!(
                got.as_ref().copied().map_err(String::as_str),
                *want,
                "{server} / {tls}"
            );
        }
    }

    #[test]
    fn limits_and_timeouts_are_checked() {
        let hash_free = |extra: &str| {
            Config::from_toml_str(&format!("{extra}\n{}", account()))
                .map(|_| ())
                .map_err(|e| e.key)
        };
        assert_eq!(
            hash_free("[limits]\nmax_connections = 0"),
            Err("limits.max_connections".into())
        );
        assert_eq!(
            hash_free("[limits]\nmax_connections = 5\nmax_connections_per_source = 6"),
            Err("limits.max_connections_per_source".into())
        );
        assert_eq!(
            hash_free("[limits]\nauth_failure_window = 0"),
            Err("limits.auth_failure_window".into())
        );
        assert_eq!(
            hash_free("[timeouts]\nsession = 0"),
            Err("timeouts.session".into())
        );
        let config = Config::from_toml_str(&format!(
            "[timeouts]\ntls_handshake = 7\nupstream_max_age = 60\n[limits]\nauth_failures = 9\n{}",
            account()
        ))
        .unwrap();
        assert_eq!(config.timeouts.tls_handshake, Duration::from_secs(7));
        assert_eq!(config.timeouts.upstream_max_age, Duration::from_secs(60));
        assert_eq!(config.limits.auth_failures, 9);
        assert_eq!(config.limits.max_connections, 100);
    }

    #[test]
    fn dsn_is_advertised_only_when_every_provider_offers_it() {
        let config = Config::from_toml_str(&account()).unwrap();
        assert!(config.advertise_dsn());
        let hash = crate::users::hash_password("pw").unwrap();
        let gmail = format!(
            "{}[[accounts]]\nusername = \"g@gmail.com\"\npassword_hash = \"{hash}\"\n\
             provider = \"gmail\"\nclient_id = \"x\"\n",
            account()
        );
        assert!(!Config::from_toml_str(&gmail).unwrap().advertise_dsn());
    }

    #[test]
    fn loopback_table() {
        let cases = [
            ("127.0.0.1", true),
            ("127.255.3.4", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:127.9.9.9", true),
            ("10.0.0.1", false),
            ("192.168.1.20", false),
            ("::ffff:10.0.0.1", false),
            ("0.0.0.0", false),
            ("::", false),
            ("fe80::1", false),
        ];
        for (ip, want) in cases {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(is_loopback(ip), want, "{ip}");
            assert_eq!(PlaintextAuth::Loopback.allows(ip), want, "{ip}");
            assert!(!PlaintextAuth::Never.allows(ip), "{ip}");
        }
    }
}
