//! TLS settings shared by every outgoing connection: one rustls `ClientConfig`, built once at
//! start-up with the ring provider, trusting Mozilla's roots plus an optional extra CA file.
//!
//! The SMTP upstream and the token endpoint use the same trust store, so an administrator who
//! adds a corporate inspection CA fixes both at once. There is deliberately no switch that turns
//! certificate verification off.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

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
