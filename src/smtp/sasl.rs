//! SASL helpers for the client-facing side (PLAIN per RFC 4616, LOGIN) and
//! the upstream side (XOAUTH2).
//!
//! Decoded credentials only ever live in buffers that are zeroized on drop
//! or inside `SecretString`, and errors never carry decoded data, so nothing
//! secret can leak into logs or linger in freed memory.

use std::fmt;

use base64::Engine;
use base64::alphabet;
use base64::engine::general_purpose::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use secrecy::SecretString;
use thiserror::Error;
use zeroize::Zeroizing;

use crate::smtp::line::trim_line_end;

mod exchange;
pub use exchange::{Credentials, Exchange, Failure, Mechanism, Step};

/// Base64 of "Username:", the first AUTH LOGIN challenge.
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// Base64 of "Password:", the second AUTH LOGIN challenge.
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Largest decoded SASL response accepted, in bytes. Far above any real
/// credential; bounds the work and memory a client can demand.
pub const MAX_SASL_DECODED: usize = 12_288;

/// Strict alphabet and no trailing garbage bits, but padding optional:
/// some clients omit it, and accepting that costs nothing.
const DECODER: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a SASL response was rejected. Messages never include the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SaslError {
    #[error("invalid base64 in sasl response")]
    InvalidBase64,
    #[error("sasl response is not utf-8")]
    NotUtf8,
    #[error("malformed sasl response")]
    Malformed,
    #[error("empty username in sasl response")]
    EmptyUsername,
    #[error("authorization identity differs from authentication identity")]
    AuthzidMismatch,
    #[error("sasl response too long")]
    TooLong,
}

/// Credentials from an AUTH PLAIN response.
pub struct PlainCredentials {
    /// Authorization identity as sent; empty, or equal to `username` up to
    /// ASCII case.
    pub authzid: String,
    pub username: String,
    pub password: SecretString,
}

// Hand-written so the password can never reach a log via `{:?}`.
impl fmt::Debug for PlainCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainCredentials")
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Strips a trailing line end and any trailing spaces.
fn trim_response(response: &[u8]) -> &[u8] {
    let mut r = response;
    while let [rest @ .., b'\r' | b'\n' | b' '] = r {
        r = rest;
    }
    r
}

/// Decodes base64 into a zeroizing buffer sized up front, so decoding never
/// reallocates and leaves a stray copy behind.
fn decode_base64(response: &[u8]) -> Result<Zeroizing<Vec<u8>>, SaslError> {
    let encoded = trim_response(response);
    // Reject before allocating: longer input cannot decode to an
    // acceptable size.
    if encoded.len() > MAX_SASL_DECODED.div_ceil(3) * 4 {
        return Err(SaslError::TooLong);
    }
    let mut buf = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(encoded.len())]);
    let n = DECODER
        .decode_slice(encoded, &mut buf[..])
        .map_err(|_| SaslError::InvalidBase64)?;
    buf.truncate(n);
    if n > MAX_SASL_DECODED {
        return Err(SaslError::TooLong);
    }
    Ok(buf)
}

/// Decodes the base64 client response of SASL PLAIN:
/// `[authzid] NUL authcid NUL passwd`.
///
/// An authzid is accepted only if it names the user itself: the bridge has
/// no notion of acting on behalf of another user, so anything else must be
/// refused rather than silently ignored.
pub fn decode_plain(response: &[u8]) -> Result<PlainCredentials, SaslError> {
    let decoded = decode_base64(response)?;
    let mut fields = decoded.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(passwd), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(SaslError::Malformed);
    };
    let utf8 = |b| std::str::from_utf8(b).map_err(|_| SaslError::NotUtf8);
    let (authzid, authcid, passwd) = (utf8(authzid)?, utf8(authcid)?, utf8(passwd)?);
    if authcid.is_empty() {
        return Err(SaslError::EmptyUsername);
    }
    if !authzid.is_empty() && !authzid.eq_ignore_ascii_case(authcid) {
        return Err(SaslError::AuthzidMismatch);
    }
    Ok(PlainCredentials {
        authzid: authzid.to_owned(),
        username: authcid.to_owned(),
        password: SecretString::from(passwd),
    })
}

/// Decodes one AUTH LOGIN answer (username or password). An empty answer
/// decodes to an empty string; whether that is acceptable is the caller's
/// call, as it depends on which prompt was answered.
pub fn decode_login_field(response: &[u8]) -> Result<SecretString, SaslError> {
    let decoded = decode_base64(response)?;
    let text = std::str::from_utf8(&decoded).map_err(|_| SaslError::NotUtf8)?;
    Ok(SecretString::from(text))
}

/// The client cancelled the exchange (RFC 4954: a line of just "*").
pub fn is_cancel(response: &[u8]) -> bool {
    trim_line_end(response) == b"*"
}

/// The client sent an empty initial response (RFC 4954: a lone "=").
pub fn is_empty_response(response: &[u8]) -> bool {
    trim_line_end(response) == b"="
}

/// The initial client response for AUTH XOAUTH2: base64 (standard, padded)
/// of `user={user}\x01auth=Bearer {token}\x01\x01`.
pub fn xoauth2_response(user: &str, token: &str) -> SecretString {
    const AUTH: &[u8] = b"\x01auth=Bearer ";
    let len = b"user=".len() + user.len() + AUTH.len() + token.len() + 2;
    // Exact capacities: a reallocation would leave an unzeroized copy.
    let mut plain = Zeroizing::new(Vec::with_capacity(len));
    plain.extend_from_slice(b"user=");
    plain.extend_from_slice(user.as_bytes());
    plain.extend_from_slice(AUTH);
    plain.extend_from_slice(token.as_bytes());
    plain.extend_from_slice(b"\x01\x01");
    let encoded_len = base64::encoded_len(plain.len(), true).unwrap_or(0);
    let mut encoded = Zeroizing::new(String::with_capacity(encoded_len));
    STANDARD.encode_string(&plain[..], &mut encoded);
    SecretString::from(encoded.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn b64(data: &[u8]) -> String {
        STANDARD.encode(data)
    }

    #[test]
    fn plain_table() {
        /// (authzid, username, password)
        type Fields = (&'static str, &'static str, &'static str);
        let ok: &[(&[u8], Fields)] = &[
            (b"\0alice\0secret", ("", "alice", "secret")),
            (b"alice\0alice\0secret", ("alice", "alice", "secret")),
            (
                b"ALICE@x.com\0alice@X.com\0pw",
                ("ALICE@x.com", "alice@X.com", "pw"),
            ),
            (b"\0alice\0", ("", "alice", "")),
            (
                b"\0b\xc3\xb6b\0p\xc3\xa4ss w",
                ("", "b\u{f6}b", "p\u{e4}ss w"),
            ),
        ];
        for (payload, (authzid, user, pass)) in ok {
            let enc = b64(payload);
            for input in [enc.clone(), format!("{enc}\r\n"), format!("{enc}  \n")] {
                let c = decode_plain(input.as_bytes()).unwrap();
                assert_eq!(
                    (
                        c.authzid.as_str(),
                        c.username.as_str(),
                        c.password.expose_secret()
                    ),
                    (*authzid, *user, *pass)
                );
            }
        }

        let bad: &[(&[u8], SaslError)] = &[
            (b"", SaslError::Malformed),
            (b"alice", SaslError::Malformed),
            (b"\0alice", SaslError::Malformed),
            (b"\0alice\0pw\0", SaslError::Malformed),
            (b"\0\0pw", SaslError::EmptyUsername),
            (b"\0\0", SaslError::EmptyUsername),
            (b"bob\0alice\0pw", SaslError::AuthzidMismatch),
            (b"\0al\xffice\0pw", SaslError::NotUtf8),
            (b"\0alice\0p\xc3", SaslError::NotUtf8),
            (b"\xff\0alice\0pw", SaslError::NotUtf8),
        ];
        for (payload, want) in bad {
            let err = decode_plain(b64(payload).as_bytes()).unwrap_err();
            assert_eq!(err, *want, "payload {payload:?}");
        }
    }

    #[test]
    fn base64_strictness_table() {
        // "\0a\0b" is AGEAYg== in padded base64.
        let cases: &[(&[u8], Result<(), SaslError>)] = &[
            (b"AGEAYg==", Ok(())),
            (b"AGEAYg", Ok(())),
            (b"AGEAYg==\r\n", Ok(())),
            (b"AGEA Yg==", Err(SaslError::InvalidBase64)),
            (b"AGEAYg==x", Err(SaslError::InvalidBase64)),
            (b"AGEAYg===", Err(SaslError::InvalidBase64)),
            (b"AGE*Yg==", Err(SaslError::InvalidBase64)),
            (b"AGEAY", Err(SaslError::InvalidBase64)),
            // URL-safe alphabet is not base64 as SASL uses it.
            (b"AGEA-g==", Err(SaslError::InvalidBase64)),
            // Non-zero trailing bits.
            (b"AGEAYh==", Err(SaslError::InvalidBase64)),
            (b"=", Err(SaslError::InvalidBase64)),
        ];
        for (input, want) in cases {
            let got = decode_plain(input).map(|_| ());
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn size_limit() {
        let mut payload = b"\0u\0".to_vec();
        payload.resize(MAX_SASL_DECODED, b'p');
        assert!(decode_plain(b64(&payload).as_bytes()).is_ok());
        payload.push(b'p');
        assert_eq!(
            decode_plain(b64(&payload).as_bytes()).unwrap_err(),
            SaslError::TooLong
        );
        // Huge input is refused before it is decoded.
        let huge = vec![b'A'; 1 << 20];
        assert_eq!(decode_plain(&huge).unwrap_err(), SaslError::TooLong);
        assert_eq!(decode_login_field(&huge).unwrap_err(), SaslError::TooLong);
    }

    #[test]
    fn login_field_table() {
        let cases: &[(&[u8], Result<&str, SaslError>)] = &[
            (b"YWxpY2U=\r\n", Ok("alice")),
            (b"YWxpY2U", Ok("alice")),
            (b"", Ok("")),
            (b"cMOkc3M=", Ok("p\u{e4}ss")),
            (b"/w==", Err(SaslError::NotUtf8)),
            (b"YWxp!2U=", Err(SaslError::InvalidBase64)),
        ];
        for (input, want) in cases {
            let got = decode_login_field(input);
            let got = got.as_ref().map(|s| s.expose_secret()).map_err(|e| *e);
            assert_eq!(got, *want, "input {input:?}");
        }
    }

    #[test]
    fn prompts_decode_to_their_text() {
        assert_eq!(
            STANDARD.decode(LOGIN_USERNAME_PROMPT).unwrap(),
            b"Username:"
        );
        assert_eq!(
            STANDARD.decode(LOGIN_PASSWORD_PROMPT).unwrap(),
            b"Password:"
        );
    }

    #[test]
    fn cancel_and_empty_table() {
        let cases: &[(&[u8], bool, bool)] = &[
            (b"*", true, false),
            (b"*\r\n", true, false),
            (b"*\n", true, false),
            (b"=", false, true),
            (b"=\r\n", false, true),
            (b"", false, false),
            (b"**\r\n", false, false),
            (b" *\r\n", false, false),
            (b"==\r\n", false, false),
            (b"YQ==\r\n", false, false),
        ];
        for (input, cancel, empty) in cases {
            assert_eq!(is_cancel(input), *cancel, "{input:?}");
            assert_eq!(is_empty_response(input), *empty, "{input:?}");
        }
    }

    #[test]
    fn xoauth2_known_answer() {
        // Example from Google's XOAUTH2 protocol documentation.
        let got = xoauth2_response(
            "someuser@example.com",
            "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg",
        );
        assert_eq!(
            got.expose_secret(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn xoauth2_round_trip_table() {
        let cases = [("u@x.com", "tok"), ("", ""), ("\u{e9}@x", "a.b-c_d")];
        for (user, token) in cases {
            let got = xoauth2_response(user, token);
            let decoded = STANDARD.decode(got.expose_secret()).unwrap();
            let want = format!("user={user}\x01auth=Bearer {token}\x01\x01");
            assert_eq!(decoded, want.as_bytes());
        }
    }

    #[test]
    fn debug_redacts_password() {
        let c = decode_plain(b64(b"\0alice\0hunter2").as_bytes()).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn error_messages_are_fixed_lowercase_text() {
        let all = [
            SaslError::InvalidBase64,
            SaslError::NotUtf8,
            SaslError::Malformed,
            SaslError::EmptyUsername,
            SaslError::AuthzidMismatch,
            SaslError::TooLong,
        ];
        for e in all {
            let msg = e.to_string();
            assert_eq!(msg, msg.to_lowercase());
        }
    }
}
