//! A throwaway certificate authority, made fresh each time the sandbox starts.
//!
//! No key material lives in the repository: the CA key exists only in memory, and whoever
//! needs to trust the sandbox servers gets the CA certificate through [`SandboxCa::ca_pem`].

use std::fmt;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::sandbox::SandboxError;
use crate::sandbox::clock::{UtcDateTime, unix_millis};

/// Common name of every sandbox CA, so a stray one is easy to recognise in a trust store.
pub const CA_COMMON_NAME: &str = "smtp-oauth-bridge sandbox CA";

const DAY_MILLIS: u64 = 86_400_000;
/// Certificates start a day in the past so a slightly slow client clock still accepts them.
const BACKDATE_DAYS: u64 = 1;
/// Long enough for any sandbox run; short enough that a leaked CA file soon stops mattering.
const VALIDITY_DAYS: u64 = 90;

/// An ECDSA P-256 CA that signs leaf certificates for the sandbox servers.
pub struct SandboxCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl SandboxCa {
    /// Generate a new CA key and self-signed certificate.
    pub fn generate() -> Result<SandboxCa, SandboxError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CA_COMMON_NAME);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        set_validity(&mut params);
        let issuer = CertifiedIssuer::self_signed(params, key)?;
        Ok(SandboxCa { issuer })
    }

    /// The CA certificate in PEM: what the bridge must trust.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A TLS server configuration whose leaf certificate covers `names` (DNS names or IP
    /// literals such as `"localhost"`, `"127.0.0.1"`, `"::1"`, `"smtp.sandbox.test"`), signed
    /// by this CA. The chain sent to clients is the leaf followed by the CA certificate.
    pub fn server_config(&self, names: &[&str]) -> Result<Arc<rustls::ServerConfig>, SandboxError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name = DistinguishedName::new();
        let common_name = names.first().copied().unwrap_or("sandbox");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let leaf = params.signed_by(&key, &self.issuer)?;

        let chain = vec![leaf.der().clone(), self.ca_der()];
        let private_key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)?;
        Ok(Arc::new(config))
    }
}

impl fmt::Debug for SandboxCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The issuer holds the CA private key: show only that a CA is there.
        f.debug_struct("SandboxCa")
            .field("common_name", &CA_COMMON_NAME)
            .finish_non_exhaustive()
    }
}

fn set_validity(params: &mut CertificateParams) {
    let now = unix_millis();
    let start = UtcDateTime::from_unix_millis(now.saturating_sub(BACKDATE_DAYS * DAY_MILLIS));
    let end = UtcDateTime::from_unix_millis(now.saturating_add(VALIDITY_DAYS * DAY_MILLIS));
    // `date_time_ymd` rejects years past 9999; the months and days from `UtcDateTime` are
    // always valid calendar values, so clamping the year keeps it from ever panicking.
    let ymd = |t: UtcDateTime| {
        let year = i32::try_from(t.year.min(9999)).unwrap_or(9999);
        let (month, day) = if t.year > 9999 {
            (12, 31)
        } else {
            (t.month, t.day)
        };
        rcgen::date_time_ymd(year, month as u8, day as u8)
    };
    params.not_before = ymd(start);
    params.not_after = ymd(end);
}
