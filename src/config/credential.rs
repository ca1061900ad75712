//! An identity's credential toward the token endpoint: a client secret (inline, from a file
//! or a systemd credential, or from the environment) or a certificate with its RSA key for
//! signed client assertions. Errors name the key and the file, never the secret.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};

use crate::config::identity::{
    AssertionAlgorithm, CertificateCredential, ClientCredential, Thumbprint,
};
use crate::config::raw::RawOAuth;
use crate::config::{ConfigError, err};

pub(super) fn credential(
    raw: &RawOAuth,
    key: &dyn Fn(&str) -> String,
) -> Result<ClientCredential, ConfigError> {
    let secret = client_secret(
        key,
        raw.client_secret.as_ref(),
        raw.client_secret_file.as_deref(),
        raw.client_secret_env.as_deref(),
    )?;
    if secret.is_some() && raw.client_certificate.is_some() {
        return Err(err(
            key("client_certificate"),
            "give either a client secret or a certificate, not both",
        ));
    }
    let certificate = match &raw.client_certificate {
        Some(path) => Some(load_certificate(raw, path, key)?),
        None => {
            for (name, given) in [
                ("client_key", raw.client_key.is_some()),
                (
                    "certificate_thumbprint",
                    raw.certificate_thumbprint.is_some(),
                ),
                ("assertion_algorithm", raw.assertion_algorithm.is_some()),
            ] {
                if given {
                    return Err(err(key(name), "only applies with client_certificate"));
                }
            }
            None
        }
    };
    match (secret, certificate) {
        (Some(secret), _) => Ok(ClientCredential::Secret(Arc::new(secret))),
        (None, Some(cert)) => Ok(ClientCredential::Certificate(Arc::new(cert))),
        (None, None) => Ok(ClientCredential::None),
    }
}

fn client_secret(
    key: &dyn Fn(&str) -> String,
    inline: Option<&SecretString>,
    file: Option<&Path>,
    env: Option<&str>,
) -> Result<Option<SecretString>, ConfigError> {
    let given = [inline.is_some(), file.is_some(), env.is_some()];
    if given.iter().filter(|g| **g).count() > 1 {
        return Err(err(
            key("client_secret"),
            "give only one of client_secret, client_secret_file, client_secret_env",
        ));
    }
    if let Some(secret) = inline {
        if secret.expose_secret().trim().is_empty() {
            return Err(err(key("client_secret"), "is empty"));
        }
        return Ok(Some(SecretString::from(secret.expose_secret().to_owned())));
    }
    if let Some(path) = file {
        let resolved = credential_path(path);
        let text = std::fs::read_to_string(&resolved).map_err(|e| {
            err(
                key("client_secret_file"),
                format!("cannot read {}: {}", resolved.display(), e.kind()),
            )
        })?;
        let secret = text.trim_end_matches(['\r', '\n']).to_string();
        if secret.is_empty() {
            return Err(err(key("client_secret_file"), "file is empty"));
        }
        return Ok(Some(SecretString::from(secret)));
    }
    if let Some(var) = env {
        let value = std::env::var(var).map_err(|_| {
            err(
                key("client_secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?;
        if value.trim().is_empty() {
            return Err(err(
                key("client_secret_env"),
                format!("environment variable {var} is empty"),
            ));
        }
        return Ok(Some(SecretString::from(value)));
    }
    Ok(None)
}

/// A relative name is looked up among systemd credentials first (`LoadCredential=`).
pub(crate) fn credential_path(path: &Path) -> PathBuf {
    crate::credentials::resolve(path)
}

/// Reads the certificate and its RSA key (the key may sit in the same PEM file).
fn load_certificate(
    raw: &RawOAuth,
    cert_path: &Path,
    key: &dyn Fn(&str) -> String,
) -> Result<CertificateCredential, ConfigError> {
    let cert_file = credential_path(cert_path);
    let certificate = CertificateDer::pem_file_iter(&cert_file)
        .map_err(|e| {
            err(
                key("client_certificate"),
                format!("cannot read {}: {e}", cert_file.display()),
            )
        })?
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            err(
                key("client_certificate"),
                format!("{} holds no PEM certificate", cert_file.display()),
            )
        })?;
    let key_file = credential_path(raw.client_key.as_deref().unwrap_or(cert_path));
    let key_name = if raw.client_key.is_some() {
        "client_key"
    } else {
        "client_certificate"
    };
    // The parse error may quote nothing of the key, but say only which file failed.
    let private = PrivateKeyDer::from_pem_file(&key_file).map_err(|_| {
        err(
            key(key_name),
            format!("{} holds no readable PEM private key", key_file.display()),
        )
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&private)
        .map_err(|_| err(key(key_name), "the private key is not usable"))?;
    if signing.algorithm() != rustls::SignatureAlgorithm::RSA {
        return Err(err(
            key(key_name),
            "must be an RSA key: Entra signs client assertions with RSA only",
        ));
    }
    Ok(CertificateCredential {
        certificate,
        key: signing,
        thumbprint: raw.certificate_thumbprint.unwrap_or(Thumbprint::Sha256),
        algorithm: raw.assertion_algorithm.unwrap_or(AssertionAlgorithm::PS256),
        path: cert_file,
    })
}
