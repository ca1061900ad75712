//! What serde reads from `proxy.toml` and the environment, before any checking. Every table
//! refuses unknown keys, so a typo is reported with its key path instead of being ignored.
//! `#[serde(flatten)]` is avoided: figment loses key paths through it.

use std::path::PathBuf;

use secrecy::SecretString;
use serde::Deserialize;

use crate::config::LogFormat;
use crate::config::identity::{AssertionAlgorithm, Flow, Provider, Thumbprint, UpstreamTls};
use crate::config::pool::RawPool;
use crate::config::server::{RawLimits, RawServer, RawTimeouts, RawTls};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) timeouts: RawTimeouts,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) pool: RawPool,
    #[serde(default)]
    pub(super) tokens: RawTokens,
    #[serde(default)]
    pub(super) tls: RawTls,
    #[serde(default)]
    pub(super) store: RawStore,
    pub(super) sandbox: Option<RawSandbox>,
    #[serde(default)]
    pub(super) log: RawLog,
    pub(super) admin: Option<RawAdmin>,
    #[serde(default)]
    pub(super) identities: Vec<RawIdentity>,
    #[serde(default)]
    pub(super) accounts: Vec<RawAccount>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<String>,
    pub(super) upstream_failures_unhealthy: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTokens {
    pub(super) refresh_margin: Option<u64>,
    pub(super) keepalive: Option<u64>,
    pub(super) session_wait: Option<u64>,
    pub(super) prefetch: Option<bool>,
    pub(super) backoff_max: Option<u64>,
    pub(super) notify_command: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub(super) directory: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSandbox {
    #[serde(default = "default_true")]
    pub(super) enabled: bool,
    pub(super) mail_dir: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) level: Option<String>,
    pub(super) format: Option<LogFormat>,
}

/// The OAuth side of an identity: given in `[[identities]]`, or inline in an account that
/// is its own identity. The two tables repeat these keys because flattening is avoided.
#[derive(Default)]
pub(super) struct RawOAuth {
    pub(super) provider: Option<Provider>,
    pub(super) flow: Option<Flow>,
    pub(super) tenant: Option<String>,
    pub(super) authority: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<SecretString>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) client_secret_env: Option<String>,
    pub(super) client_certificate: Option<PathBuf>,
    pub(super) client_key: Option<PathBuf>,
    pub(super) certificate_thumbprint: Option<Thumbprint>,
    pub(super) assertion_algorithm: Option<AssertionAlgorithm>,
    pub(super) token_url: Option<String>,
    pub(super) authorize_url: Option<String>,
    pub(super) device_code_url: Option<String>,
    pub(super) redirect_uri: Option<String>,
    pub(super) scopes: Option<Vec<String>>,
    pub(super) upstream: Option<String>,
    pub(super) upstream_tls: Option<UpstreamTls>,
}

impl RawOAuth {
    /// The keys that are set, by name, so an account that names an identity can be told
    /// which of its keys belong in `[[identities]]`.
    pub(super) fn given_keys(&self) -> Vec<&'static str> {
        let present = [
            ("provider", self.provider.is_some()),
            ("flow", self.flow.is_some()),
            ("tenant", self.tenant.is_some()),
            ("authority", self.authority.is_some()),
            ("client_id", self.client_id.is_some()),
            ("client_secret", self.client_secret.is_some()),
            ("client_secret_file", self.client_secret_file.is_some()),
            ("client_secret_env", self.client_secret_env.is_some()),
            ("client_certificate", self.client_certificate.is_some()),
            ("client_key", self.client_key.is_some()),
            (
                "certificate_thumbprint",
                self.certificate_thumbprint.is_some(),
            ),
            ("assertion_algorithm", self.assertion_algorithm.is_some()),
            ("token_url", self.token_url.is_some()),
            ("authorize_url", self.authorize_url.is_some()),
            ("device_code_url", self.device_code_url.is_some()),
            ("redirect_uri", self.redirect_uri.is_some()),
            ("scopes", self.scopes.is_some()),
            ("upstream", self.upstream.is_some()),
            ("upstream_tls", self.upstream_tls.is_some()),
        ];
        present
            .into_iter()
            .filter(|(_, set)| *set)
            .map(|(k, _)| k)
            .collect()
    }
}

macro_rules! oauth_table {
    ($name:ident { $($extra:ident : $ty:ty),* $(,)? }) => {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct $name {
            $(pub(super) $extra: $ty,)*
            provider: Option<Provider>,
            flow: Option<Flow>,
            tenant: Option<String>,
            authority: Option<String>,
            client_id: Option<String>,
            client_secret: Option<SecretString>,
            client_secret_file: Option<PathBuf>,
            client_secret_env: Option<String>,
            client_certificate: Option<PathBuf>,
            client_key: Option<PathBuf>,
            certificate_thumbprint: Option<Thumbprint>,
            assertion_algorithm: Option<AssertionAlgorithm>,
            token_url: Option<String>,
            authorize_url: Option<String>,
            device_code_url: Option<String>,
            redirect_uri: Option<String>,
            scopes: Option<Vec<String>>,
            upstream: Option<String>,
            upstream_tls: Option<UpstreamTls>,
        }

        impl $name {
            /// Splits off the OAuth keys.
            pub(super) fn take_oauth(&mut self) -> RawOAuth {
                RawOAuth {
                    provider: self.provider.take(),
                    flow: self.flow.take(),
                    tenant: self.tenant.take(),
                    authority: self.authority.take(),
                    client_id: self.client_id.take(),
                    client_secret: self.client_secret.take(),
                    client_secret_file: self.client_secret_file.take(),
                    client_secret_env: self.client_secret_env.take(),
                    client_certificate: self.client_certificate.take(),
                    client_key: self.client_key.take(),
                    certificate_thumbprint: self.certificate_thumbprint.take(),
                    assertion_algorithm: self.assertion_algorithm.take(),
                    token_url: self.token_url.take(),
                    authorize_url: self.authorize_url.take(),
                    device_code_url: self.device_code_url.take(),
                    redirect_uri: self.redirect_uri.take(),
                    scopes: self.scopes.take(),
                    upstream: self.upstream.take(),
                    upstream_tls: self.upstream_tls.take(),
                }
            }
        }
    };
}

oauth_table!(RawIdentity { name: Option<String> });
oauth_table!(RawAccount {
    name: Option<String>,
    username: Option<String>,
    password_hash: Option<String>,
    mailbox: Option<String>,
    identity: Option<String>,
    allowed_senders: Option<Vec<String>>,
    check_from_header: Option<bool>,
    no_auth_sources: Option<Vec<String>>,
});

fn default_true() -> bool {
    true
}
