//! HTTP to OAuth endpoints: one form POST, one answer, parsed into a token, a device
//! authorization, or an error that keeps what decides the next step (the `error` field,
//! Entra's AADSTS numbers, the HTTP status and `Retry-After`).
//!
//! Hand-written over reqwest rather than through the `oauth2` crate, because the refresh
//! logic needs exactly those fields, device-code polling needs one request at a time, and
//! client assertions are extra form fields anyway. Token endpoints get no redirects (a
//! redirected POST could carry the client secret elsewhere) and no cookies.

use std::sync::Arc;
use std::time::Duration;

use secrecy::SecretString;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Answers larger than this are refused, and read no further: token answers are a few
/// kilobytes.
const MAX_ANSWER: usize = 256 * 1024;

/// The longest an access token is kept, whatever `expires_in` says. Real ones live an hour
/// (a day at most, where a tenant configured it); a lifetime beyond the clock's range would
/// make every deadline computed from it overflow.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest a device code is waited for (Entra gives 15 minutes, Google 30).
const MAX_DEVICE_CODE_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The longest first wait between two polls of a device code; `slow_down` may add to it.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);

/// The HTTP client for every OAuth endpoint, with the TLS trust of the SMTP side.
#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Http")
    }
}

/// Why an endpoint exchange failed.
#[derive(Debug, Clone)]
pub enum EndpointError {
    /// An OAuth error answer (RFC 6749 §5.2, with Entra's extra fields).
    OAuth {
        status: u16,
        error: String,
        description: String,
        aadsts: Option<u32>,
        retry_after: Option<Duration>,
    },
    /// A status without a readable OAuth error (a proxy's 502 page, a bare 429).
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// The request did not complete: connect, TLS, timeout.
    Transport(String),
    /// A 2xx answer that is not what was asked for. Only its size is kept: it may hold a
    /// token.
    Unreadable { status: u16, len: usize },
}

/// A successful token answer.
pub struct TokenAnswer {
    pub access_token: SecretString,
    /// As the server said, but at most [`MAX_TOKEN_LIFETIME`].
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<SecretString>,
}

/// A device authorization answer (RFC 8628 §3.2; Entra names the URL `verification_uri`,
/// Google's older form `verification_url`).
#[derive(Clone)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    /// As the server said, but at most a day.
    pub expires_in: Duration,
    /// As the server said, but at most a minute.
    pub interval: Duration,
    /// Entra's ready-made sentence for the user, when present.
    pub message: Option<String>,
}

// Hand-written: the device code is redeemable for tokens once the user has signed in. The
// user code is shown to the user anyway.
impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &"[redacted]")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// A raw answer: status, `Retry-After`, body.
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Zeroizing<Vec<u8>>,
}

impl Http {
    /// `tls` is the client config the SMTP upstream uses; `timeout` bounds each request.
    pub fn new(tls: &Arc<rustls::ClientConfig>, timeout: Duration) -> Result<Http, String> {
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured((**tls).clone())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .user_agent(concat!("smtp-oauth-bridge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Http { client })
    }

    /// POSTs a token request and reads a token answer.
    pub async fn token(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<TokenAnswer, EndpointError> {
        let answer = self.post(url, form).await?;
        parse_token(&answer)
    }

    /// POSTs a device authorization request.
    pub async fn device_authorization(
        &self,
        url: &str,
        form: &[(&str, &str)],
    ) -> Result<DeviceAuthorization, EndpointError> {
        let answer = self.post(url, form).await?;
        parse_device(&answer)
    }

    async fn post(&self, url: &str, form: &[(&str, &str)]) -> Result<Answer, EndpointError> {
        let response = self
            .client
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(form)
            .send()
            .await
            .map_err(|e| EndpointError::Transport(describe_reqwest_error(&e)))?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let too_large = |len: usize| EndpointError::Unreadable { status, len };
        let declared = response.content_length().unwrap_or(0);
        if declared > MAX_ANSWER as u64 {
            return Err(too_large(MAX_ANSWER));
        }
        // Read piece by piece: a chunked or close-delimited answer declares no length, and
        // must not grow without bound either.
        let mut body = Zeroizing::new(Vec::with_capacity(declared as usize));
        let mut response = response;
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| EndpointError::Transport(describe_reqwest_error(&e)))?
        {
            if body.len() + chunk.len() > MAX_ANSWER {
                return Err(too_large(body.len() + chunk.len()));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer {
            status,
            retry_after,
            body,
        })
    }
}

#[derive(Deserialize)]
struct RawToken {
    access_token: Option<SecretString>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    refresh_token: Option<SecretString>,
}

#[derive(Deserialize)]
struct RawError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    error_codes: Option<Vec<u32>>,
}

#[derive(Deserialize)]
struct RawDevice {
    device_code: String,
    user_code: String,
    #[serde(alias = "verification_url")]
    verification_uri: String,
    expires_in: serde_json::Value,
    #[serde(default)]
    interval: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
}

fn parse_token(answer: &Answer) -> Result<TokenAnswer, EndpointError> {
    if !(200..300).contains(&answer.status) {
        return Err(error_of(answer));
    }
    let raw: RawToken = serde_json::from_slice(&answer.body).map_err(|_| unreadable(answer))?;
    let access_token = raw.access_token.ok_or_else(|| unreadable(answer))?;
    Ok(TokenAnswer {
        access_token,
        expires_in: raw
            .expires_in
            .as_ref()
            .and_then(seconds_of)
            .map(|d| d.min(MAX_TOKEN_LIFETIME)),
        refresh_token: raw.refresh_token,
    })
}

fn parse_device(answer: &Answer) -> Result<DeviceAuthorization, EndpointError> {
    if !(200..300).contains(&answer.status) {
        return Err(error_of(answer));
    }
    let raw: RawDevice = serde_json::from_slice(&answer.body).map_err(|_| unreadable(answer))?;
    Ok(DeviceAuthorization {
        device_code: raw.device_code,
        user_code: raw.user_code,
        verification_uri: raw.verification_uri,
        expires_in: seconds_of(&raw.expires_in)
            .unwrap_or(Duration::from_secs(900))
            .min(MAX_DEVICE_CODE_LIFETIME),
        // RFC 8628 §3.2: five seconds when the server names no interval.
        interval: raw
            .interval
            .as_ref()
            .and_then(seconds_of)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(5))
            .min(MAX_POLL_INTERVAL),
        message: raw.message,
    })
}

/// The error an unsuccessful answer carries.
fn error_of(answer: &Answer) -> EndpointError {
    match serde_json::from_slice::<RawError>(&answer.body) {
        Ok(raw) => {
            let description = raw.error_description.unwrap_or_default();
            let aadsts = raw
                .error_codes
                .and_then(|codes| codes.first().copied())
                .or_else(|| aadsts_in(&description));
            EndpointError::OAuth {
                status: answer.status,
                error: printable(&raw.error, 64),
                description: first_sentence(&description),
                aadsts,
                retry_after: answer.retry_after,
            }
        }
        Err(_) => EndpointError::Status {
            status: answer.status,
            retry_after: answer.retry_after,
        },
    }
}

fn unreadable(answer: &Answer) -> EndpointError {
    EndpointError::Unreadable {
        status: answer.status,
        len: answer.body.len(),
    }
}

/// `expires_in` and `interval` are numbers, but some servers send strings.
fn seconds_of(value: &serde_json::Value) -> Option<Duration> {
    match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .map(Duration::from_secs)
}

/// `AADSTS70008: ...` → 70008.
fn aadsts_in(text: &str) -> Option<u32> {
    let rest = &text[text.find("AADSTS")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Entra descriptions run on with trace and correlation ids; the first sentence with the
/// AADSTS code is what an administrator needs.
fn first_sentence(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    let cut = line.find(" Trace ID:").unwrap_or(line.len());
    printable(&line[..cut], 300)
}

fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// reqwest's Display can include the URL, which is fine (no secrets in token URLs), but its
/// chain is what says "connection refused" or "certificate unknown"; keep both.
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            retry_after: None,
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn token_answers_with_numbers_or_strings() {
        let t = parse_token(&answer(
            200,
            r#"{"access_token":"a","expires_in":"3599","refresh_token":"r"}"#,
        ))
        .unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(3599)));
        assert!(t.refresh_token.is_some());
        assert!(matches!(
            parse_token(&answer(200, "<html>oops")),
            Err(EndpointError::Unreadable { len: 10, .. })
        ));
        assert!(matches!(
            parse_token(&answer(200, r#"{"token_type":"Bearer"}"#)),
            Err(EndpointError::Unreadable { .. })
        ));
    }

    #[test]
    fn entra_errors_keep_code_and_first_sentence() {
        let body = r#"{"error":"invalid_grant","error_description":"AADSTS70008: The refresh token has expired due to inactivity. Trace ID: 1 Correlation ID: 2","error_codes":[70008]}"#;
        match parse_token(&answer(400, body)) {
            Err(EndpointError::OAuth {
                error,
                description,
                aadsts,
                ..
            }) => {
                assert_eq!(error, "invalid_grant");
                assert_eq!(aadsts, Some(70008));
                assert_eq!(
                    description,
                    "AADSTS70008: The refresh token has expired due to inactivity."
                );
            }
            _ => panic!("not an OAuth error"),
        }
        // Without error_codes, the number comes from the text; Google has neither.
        assert_eq!(
            aadsts_in("AADSTS7000215: Invalid client secret"),
            Some(7_000_215)
        );
        assert_eq!(aadsts_in("Token has been expired or revoked."), None);
        assert!(matches!(
            parse_token(&answer(502, "<html>Bad gateway</html>")),
            Err(EndpointError::Status { status: 502, .. })
        ));
    }

    #[test]
    fn device_answers_from_entra_and_google() {
        let entra = r#"{"device_code":"d","user_code":"ABC-DEF","verification_uri":"https://microsoft.com/devicelogin","expires_in":900,"interval":7,"message":"To sign in..."}"#;
        let d = parse_device(&answer(200, entra)).unwrap();
        assert_eq!(d.interval, Duration::from_secs(7), "the server's interval");
        assert_eq!(d.expires_in, Duration::from_secs(900));
        assert_eq!(d.message.as_deref(), Some("To sign in..."));
        let google = r#"{"device_code":"d","user_code":"X","verification_url":"https://www.google.com/device","expires_in":"1800"}"#;
        let d = parse_device(&answer(200, google)).unwrap();
        assert_eq!(d.verification_uri, "https://www.google.com/device");
        assert_eq!(d.expires_in, Duration::from_secs(1800));
        assert_eq!(d.interval, Duration::from_secs(5));

        let secret = r#"{"device_code":"GmRhmhcxhw-device-marker","user_code":"X","verification_uri":"https://microsoft.com/devicelogin","expires_in":900}"#;
        let shown = format!("{:?}", parse_device(&answer(200, secret)).unwrap());
        assert!(!shown.contains("device-marker"), "{shown}");
    }
}
