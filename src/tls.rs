//! TLS settings, all built with the ring provider: the one rustls `ClientConfig` shared by
//! every outgoing connection (Mozilla's roots plus an optional extra CA file), the
//! `ServerConfig` of the bridge's own listeners (a certificate and key from PEM files), and
//! the self-signed certificate `generate-certificate` makes for them.
//!
//! The SMTP upstream and the token endpoint use the same trust store, so an administrator who
//! adds a corporate inspection CA fixes both at once. There is deliberately no switch that turns
//! certificate verification off.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read CA file {path}: {source}")]
    ReadCa {
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {path} holds no certificate")]
    EmptyCa { path: String },
    #[error("CA file {path} holds a certificate rustls rejects: {source}")]
    BadCa { path: String, source: rustls::Error },
    #[error("cannot set up TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot read certificate file {path}: {problem}")]
    ReadCertificate { path: String, problem: String },
    #[error("certificate file {path} holds no certificate")]
    EmptyCertificate { path: String },
    /// The key's contents never appear in the message.
    #[error("cannot read private key file {path}: {problem}")]
    ReadKey { path: String, problem: String },
    #[error(
        "the private key in {key} does not belong to the certificate in {certificate}: {source}"
    )]
    KeyMismatch {
        certificate: String,
        key: String,
        source: rustls::Error,
    },
}

impl TlsSetupError {
    /// The configuration key the problem belongs to.
    pub fn key(&self) -> &'static str {
        match self {
            TlsSetupError::ReadCa { .. }
            | TlsSetupError::EmptyCa { .. }
            | TlsSetupError::BadCa { .. } => "tls.extra_ca_file",
            TlsSetupError::ReadKey { .. } | TlsSetupError::KeyMismatch { .. } => "tls.key_file",
            TlsSetupError::ReadCertificate { .. }
            | TlsSetupError::EmptyCertificate { .. }
            | TlsSetupError::Rustls(_) => "tls.certificate_file",
        }
    }
}

/// The crypto provider every config in the process is built with, so a dependency that
/// enables another provider can never change which one we use.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds the client config used toward providers: TLS 1.2 and 1.3, verified certificates.
/// `extra_roots` are trusted in addition (the sandbox's own CA).
pub fn client_config(
    extra_ca: Option<&Path>,
    extra_roots: Vec<CertificateDer<'static>>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert)?;
    }
    if let Some(path) = extra_ca {
        for cert in load_certs(path)? {
            roots.add(cert).map_err(|source| TlsSetupError::BadCa {
                path: path.display().to_string(),
                source,
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Reads every certificate from a PEM file; an empty file is an error because it is
/// certainly a mistake.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsSetupError::ReadCa {
            path: path.display().to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::EmptyCa {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The server config for the bridge's own listeners: TLS 1.2 and 1.3, no client certificates.
pub fn server_config(
    certificate: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let shown = |p: &Path| p.display().to_string();
    let chain = CertificateDer::pem_file_iter(certificate)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsSetupError::ReadCertificate {
            path: shown(certificate),
            problem: pem_problem(&e),
        })?;
    if chain.is_empty() {
        return Err(TlsSetupError::EmptyCertificate {
            path: shown(certificate),
        });
    }
    let private_key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsSetupError::ReadKey {
        path: shown(key),
        problem: pem_problem(&e),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|source| TlsSetupError::KeyMismatch {
            certificate: shown(certificate),
            key: shown(key),
            source,
        })?;
    Ok(Arc::new(config))
}

/// A PEM error in words that never quote the file's contents (it may be a private key).
fn pem_problem(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.kind().to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        _ => "not a valid PEM file".into(),
    }
}

/// A certificate and key made by [`generate_self_signed`].
pub struct GeneratedCertificate {
    pub certificate_pem: String,
    pub key_pem: SecretString,
    /// SHA-256 of the certificate, colon-separated hex, for clients that pin it.
    pub fingerprint: String,
}

/// Days a generated certificate is valid: long, because clients pin or trust it by hand.
const GENERATED_VALIDITY_DAYS: i64 = 3650;

/// Makes an ECDSA P-256 certificate for `names` (host names or IP addresses), signed by its
/// own key. Nothing is written; see [`write_certificate`].
pub fn generate_self_signed(names: &[String]) -> Result<GeneratedCertificate, rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        names.first().map_or("smtp-oauth-bridge", String::as_str),
    );
    params.distinguished_name = dn;
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(GENERATED_VALIDITY_DAYS);
    let certificate = params.self_signed(&key)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, certificate.der());
    let fingerprint = digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":");
    Ok(GeneratedCertificate {
        certificate_pem: certificate.pem(),
        key_pem: SecretString::from(key.serialize_pem()),
        fingerprint,
    })
}

/// Writes `bridge.crt` and `bridge.key` (mode 0600) into `dir`, creating it. Existing files
/// are replaced only with `overwrite`, so a working certificate is never lost by accident.
pub fn write_certificate(
    dir: &Path,
    generated: &GeneratedCertificate,
    overwrite: bool,
) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let certificate = dir.join("bridge.crt");
    let key = dir.join("bridge.key");
    if !overwrite {
        for path in [&certificate, &key] {
            if path.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("{} exists (use --force to replace it)", path.display()),
                ));
            }
        }
    }
    write_file(&key, generated.key_pem.expose_secret().as_bytes(), 0o600)?;
    write_file(&certificate, generated.certificate_pem.as_bytes(), 0o644)?;
    Ok((certificate, key))
}

/// Writes through a temporary file created with `mode`, so the key is never readable by
/// others, not even for a moment, and a crash never leaves half a file.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_loads_and_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let generated = generate_self_signed(&names).unwrap();
        assert!(generated.certificate_pem.contains("BEGIN CERTIFICATE"));
        assert_eq!(generated.fingerprint.len(), 32 * 3 - 1);
        let (crt, key) = write_certificate(dir.path(), &generated, false).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(server_config(&crt, &key).is_ok());

        // Never replaced by accident.
        let again = generate_self_signed(&names).unwrap();
        let e = write_certificate(dir.path(), &again, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        write_certificate(dir.path(), &again, true).unwrap();

        // A key that is not the certificate's is named as the problem.
        let other = dir.path().join("other");
        let (_, other_key) = write_certificate(&other, &generated, false).unwrap();
        let e = server_config(&crt, &other_key).err().unwrap();
        assert_eq!(e.key(), "tls.key_file");
        // A certificate file where the key should be: no key text in the message.
        let e = server_config(&crt, &crt).err().unwrap();
        assert_eq!(e.key(), "tls.key_file");
        let e = server_config(&dir.path().join("missing.crt"), &key)
            .err()
            .unwrap();
        assert_eq!(e.key(), "tls.certificate_file");
        assert!(!e.to_string().contains("PRIVATE"));
    }
}
