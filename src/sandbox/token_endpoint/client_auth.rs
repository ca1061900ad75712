//! How a client proves itself at the token endpoint: a secret (form body or HTTP Basic), or a
//! client assertion (RFC 7523; Entra's certificate credentials) whose signature is checked
//! against the certificate registered for the application, with every claim Entra checks:
//! the thumbprint header, `aud` = this token URL, `iss` = `sub` = client id, `nbf`/`exp` with
//! at most ten minutes between them, and a `jti` never seen before.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::digest;

use crate::sandbox::clock;
use crate::sandbox::http::{HttpRequest, HttpResponse};
use crate::sandbox::token_endpoint::errors::{entra_error, lock, printable};
use crate::sandbox::token_endpoint::{AssertionSeen, ClientRegistration, EndpointState};

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Entra accepts assertions valid for at most this long.
const MAX_ASSERTION_LIFETIME: i64 = 600;
/// Clock skew allowed on `nbf`.
const SKEW: i64 = 300;

/// Client credentials as presented, before they are checked.
pub(super) struct ClientAuth {
    pub(super) client_id: Option<String>,
    /// The secret as sent; a Basic header may yield two spellings (decoded and raw).
    pub(super) secret: Option<Vec<String>>,
}

/// A client assertion as read: what it looks like, and why it is refused if it is.
pub(super) struct Assertion {
    pub(super) seen: Option<AssertionSeen>,
    refusal: Option<Refusal>,
}

impl Assertion {
    pub(super) fn ok(&self) -> Option<AssertionSeen> {
        self.seen.clone()
    }
}

/// An error answer kept as data, so it can be given later.
struct Refusal {
    status: u16,
    error: &'static str,
    code: u32,
    message: String,
}

impl Refusal {
    fn invalid_client(code: u32, message: &str) -> Refusal {
        Refusal {
            status: 401,
            error: "invalid_client",
            code,
            message: message.to_string(),
        }
    }

    fn response(&self) -> HttpResponse {
        entra_error(self.status, self.error, self.code, &self.message)
    }
}

/// Client id and secret from the body or an HTTP Basic header (oauth2 clients use either).
pub(super) fn client_auth(
    request: &HttpRequest,
    form: &HashMap<String, String>,
) -> Result<ClientAuth, HttpResponse> {
    let body_id = form.get("client_id").cloned();
    let body_secret = form.get("client_secret").cloned();
    let Some(header) = request.header("authorization") else {
        return Ok(ClientAuth {
            client_id: body_id,
            secret: body_secret.map(|s| vec![s]),
        });
    };

    let bad_header = || {
        entra_error(
            401,
            "invalid_client",
            7000215,
            "Invalid client secret provided. The Authorization header could not be decoded.",
        )
    };
    let (scheme, encoded) = header.split_once(' ').ok_or_else(bad_header)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad_header());
    }
    let decoded = STANDARD.decode(encoded.trim()).map_err(|_| bad_header())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad_header())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(bad_header)?;
    // RFC 6749 §2.3.1 form-encodes both parts before base64; clients that skip that step
    // are still understood because the secret check also tries the raw text.
    let id = form_decode(id);
    if body_secret.is_some() || body_id.as_ref().is_some_and(|b| *b != id) {
        return Err(entra_error(
            400,
            "invalid_request",
            90014,
            "The request presented client credentials more than once or for two different \
             clients.",
        ));
    }
    let mut spellings = vec![form_decode(secret)];
    if spellings[0] != secret {
        spellings.push(secret.to_string());
    }
    Ok(ClientAuth {
        client_id: Some(id),
        secret: Some(spellings),
    })
}

fn form_decode(text: &str) -> String {
    let wrapped = format!("v={text}");
    url::form_urlencoded::parse(wrapped.as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

impl EndpointState {
    /// Checks the client of a grant: a registered client proves itself by secret or
    /// assertion; any other client id is public and must present neither.
    pub(super) fn authenticate(
        &self,
        client_id: &str,
        auth: &ClientAuth,
        form: &HashMap<String, String>,
        assertion: Option<&Assertion>,
    ) -> Result<(), HttpResponse> {
        let Some(registration) = self.registration(client_id) else {
            if auth.secret.is_some() || assertion.is_some() {
                return Err(entra_error(
                    401,
                    "invalid_client",
                    700025,
                    "Client is public so neither 'client_assertion' nor 'client_secret' should \
                     be presented.",
                ));
            }
            return Ok(());
        };
        let Some(assertion) = assertion else {
            return check_secret(registration, auth.secret.as_deref());
        };
        if auth.secret.is_some() {
            return Err(entra_error(
                400,
                "invalid_request",
                90014,
                "The request presented both a client secret and a client assertion.",
            ));
        }
        if form.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
            return Err(entra_error(
                400,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: \
                 'client_assertion_type' with the jwt-bearer value.",
            ));
        }
        match &assertion.refusal {
            Some(refusal) => Err(refusal.response()),
            None => Ok(()),
        }
    }

    /// Reads and checks a client assertion presented for `client_id` at `tenant`.
    pub(super) fn read_assertion(
        &self,
        tenant: &str,
        client_id: Option<&str>,
        jwt: &str,
    ) -> Assertion {
        let parsed = match parse_jwt(jwt) {
            Ok(parsed) => parsed,
            Err(refusal) => {
                return Assertion {
                    seen: None,
                    refusal: Some(refusal),
                };
            }
        };
        let mut seen = parsed.seen();
        let refusal = self.check_assertion(tenant, client_id, &parsed).err();
        seen.valid = refusal.is_none();
        Assertion {
            seen: Some(seen),
            refusal,
        }
    }

    fn check_assertion(
        &self,
        tenant: &str,
        client_id: Option<&str>,
        jwt: &ParsedJwt,
    ) -> Result<(), Refusal> {
        let not_registered = || {
            Refusal::invalid_client(
                700027,
                "The certificate with identifier used to sign the client assertion is not \
                 registered on application.",
            )
        };
        let registration = client_id
            .and_then(|id| self.registration(id))
            .ok_or_else(not_registered)?;
        let certificate = registration
            .certificate
            .as_ref()
            .ok_or_else(not_registered)?;
        let der = certificate.as_ref();
        let expected = match jwt.thumbprint_header.as_str() {
            "x5t#S256" => URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, der)),
            _ => URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, der)),
        };
        if jwt.thumbprint != expected {
            return Err(not_registered());
        }
        let algorithm = match jwt.alg.as_str() {
            "PS256" => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            "RS256" => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            _ => {
                return Err(Refusal::invalid_client(
                    5002738,
                    "The client assertion's signing algorithm is not supported.",
                ));
            }
        };
        let cert = webpki::EndEntityCert::try_from(certificate).map_err(|_| not_registered())?;
        cert.verify_signature(algorithm, jwt.signing_input.as_bytes(), &jwt.signature)
            .map_err(|_| {
                Refusal::invalid_client(700027, "Client assertion contains an invalid signature.")
            })?;
        self.check_claims(tenant, &registration.client_id, jwt)
    }

    fn check_claims(&self, tenant: &str, client_id: &str, jwt: &ParsedJwt) -> Result<(), Refusal> {
        let claims = &jwt.claims;
        let audience = format!("https://{}/{tenant}/oauth2/v2.0/token", self.addr);
        if claims["aud"].as_str() != Some(audience.as_str()) {
            return Err(Refusal::invalid_client(
                700212,
                "The audience claim of the client assertion is not this token endpoint.",
            ));
        }
        if claims["iss"].as_str() != Some(client_id) || claims["sub"].as_str() != Some(client_id) {
            return Err(Refusal::invalid_client(
                50048,
                "Subject or issuer of the client assertion does not match the client id.",
            ));
        }
        let now = (clock::unix_millis() / 1000) as i64;
        let (Some(nbf), Some(exp)) = (claims["nbf"].as_i64(), claims["exp"].as_i64()) else {
            return Err(Refusal::invalid_client(
                700024,
                "Client assertion is not within its valid time range (nbf or exp missing).",
            ));
        };
        if exp <= now || nbf > now + SKEW || exp - nbf > MAX_ASSERTION_LIFETIME {
            return Err(Refusal::invalid_client(
                700024,
                "Client assertion is not within its valid time range.",
            ));
        }
        let jti = claims["jti"].as_str().unwrap_or_default();
        if jti.is_empty() || !lock(&self.assertion_ids).insert(jti.to_string()) {
            return Err(Refusal::invalid_client(
                700232,
                "The client assertion was already used (jti replay) or has no jti.",
            ));
        }
        Ok(())
    }
}

struct ParsedJwt {
    alg: String,
    thumbprint_header: String,
    thumbprint: String,
    claims: serde_json::Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl ParsedJwt {
    fn seen(&self) -> AssertionSeen {
        let lifetime =
            self.claims["exp"].as_i64().unwrap_or(0) - self.claims["nbf"].as_i64().unwrap_or(0);
        AssertionSeen {
            alg: self.alg.clone(),
            thumbprint_header: self.thumbprint_header.clone(),
            lifetime_secs: lifetime,
            valid: false,
        }
    }
}

fn parse_jwt(jwt: &str) -> Result<ParsedJwt, Refusal> {
    let malformed = || Refusal {
        status: 400,
        error: "invalid_request",
        code: 50027,
        message: "JWT token is invalid or malformed.".into(),
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err(malformed());
    };
    let json = |part: &str| -> Result<serde_json::Value, Refusal> {
        let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| malformed())?;
        serde_json::from_slice(&bytes).map_err(|_| malformed())
    };
    let header_json = json(header)?;
    let (thumbprint_header, thumbprint) = ["x5t#S256", "x5t"]
        .iter()
        .find_map(|name| {
            header_json[*name]
                .as_str()
                .map(|v| (name.to_string(), v.to_string()))
        })
        .ok_or_else(|| {
            Refusal::invalid_client(
                700027,
                "The client assertion header names no certificate (x5t#S256 or x5t).",
            )
        })?;
    Ok(ParsedJwt {
        alg: printable(header_json["alg"].as_str().unwrap_or(""), 16),
        thumbprint_header,
        thumbprint,
        claims: json(claims)?,
        signing_input: format!("{header}.{claims}"),
        signature: URL_SAFE_NO_PAD.decode(signature).map_err(|_| malformed())?,
    })
}

pub(super) fn check_secret(
    registration: &ClientRegistration,
    presented: Option<&[String]>,
) -> Result<(), HttpResponse> {
    let Some(presented) = presented else {
        return Err(entra_error(
            401,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or \
             'client_secret'.",
        ));
    };
    let expected = registration.client_secret.as_bytes();
    let mut matched = false;
    for candidate in presented {
        matched |= !expected.is_empty() && secrets_equal(candidate.as_bytes(), expected);
    }
    if matched {
        return Ok(());
    }
    let message = format!(
        "Invalid client secret provided. Ensure the secret being sent in the request is the \
         client secret value, not the client secret ID, for a secret added to app '{}'.",
        registration.client_id
    );
    Err(entra_error(401, "invalid_client", 7000215, &message))
}

/// Compare two secrets without stopping at the first difference, so answer timing does not
/// reveal how much of a guessed secret was right. Lengths are not hidden.
fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_comparison() {
        assert!(secrets_equal(b"abc", b"abc"));
        assert!(!secrets_equal(b"abc", b"abd"));
        assert!(!secrets_equal(b"abc", b"abcd"));
        assert!(secrets_equal(b"", b""));
        // An application without a secret accepts none, not even an empty one.
        let registration = ClientRegistration::new("id", "");
        assert!(check_secret(&registration, Some(&[String::new()])).is_err());
    }

    #[test]
    fn malformed_assertions_are_refused() {
        for jwt in ["", "a.b", "a.b.c.d", "!!.??.##"] {
            assert!(parse_jwt(jwt).is_err(), "{jwt}");
        }
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"PS256"}"#);
        let claims = URL_SAFE_NO_PAD.encode("{}");
        assert!(
            parse_jwt(&format!("{header}.{claims}.AA")).is_err(),
            "no thumbprint"
        );
    }
}
