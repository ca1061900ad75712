//! The client assertion for certificate credentials (RFC 7523, Entra's "certificate
//! credentials"): a JWT whose header names the certificate by thumbprint and whose claims
//! bind it to this client and this token endpoint for a few minutes, signed with the
//! certificate's RSA key through rustls' ring signer (PS256 or RS256).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::SignatureScheme;
use serde_json::json;

use crate::config::{AssertionAlgorithm, CertificateCredential, Thumbprint};

/// How long an assertion is valid. Entra recommends at most 5 to 10 minutes.
pub const ASSERTION_LIFETIME_SECS: u64 = 5 * 60;

/// The form value of `client_assertion_type`.
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Why no assertion could be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AssertionError {
    #[error("the certificate's key cannot sign {0}")]
    UnsupportedKey(&'static str),
    #[error("signing the client assertion failed")]
    Signing,
    #[error("system random number generator failed")]
    Random,
}

/// A signed assertion for `client_id` toward `audience` (the token endpoint URL), issued at
/// `now` (Unix seconds).
pub fn client_assertion(
    credential: &CertificateCredential,
    client_id: &str,
    audience: &str,
    now: u64,
) -> Result<String, AssertionError> {
    let (alg, scheme) = match credential.algorithm {
        AssertionAlgorithm::PS256 => ("PS256", SignatureScheme::RSA_PSS_SHA256),
        AssertionAlgorithm::RS256 => ("RS256", SignatureScheme::RSA_PKCS1_SHA256),
    };
    let mut header = json!({ "alg": alg, "typ": "JWT" });
    let der = credential.certificate.as_ref();
    match credential.thumbprint {
        Thumbprint::Sha256 => {
            header["x5t#S256"] = json!(URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der)))
        }
        Thumbprint::Sha1 => {
            header["x5t"] = json!(
                URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der))
            )
        }
    }
    let claims = json!({
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": jti()?,
        "nbf": now,
        "iat": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signer = credential
        .key
        .choose_scheme(&[scheme])
        .ok_or(AssertionError::UnsupportedKey(alg))?;
    let signature = signer
        .sign(signing_input.as_bytes())
        .map_err(|_| AssertionError::Signing)?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// A random GUID-shaped id, unique per assertion (Entra refuses a replayed `jti`).
fn jti() -> Result<String, AssertionError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| AssertionError::Random)?;
    // Version 4, RFC 4122 variant.
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}
