//! The server side of AUTH PLAIN and AUTH LOGIN as a state machine: the session sends the
//! challenges and reads the lines, [`Exchange`] decides what they mean and which reply each
//! failure gets (RFC 4954 section 6).

use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use super::{
    LOGIN_PASSWORD_PROMPT, LOGIN_USERNAME_PROMPT, SaslError, decode_login_field, decode_plain,
    is_cancel, is_empty_response, trim_response,
};

/// The local mechanisms the bridge offers clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    Plain,
    Login,
}

/// A username and password a client sent; the password is a secret.
pub struct Credentials {
    pub username: String,
    pub password: SecretString,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// Why an exchange ended without credentials; each has its reply (RFC 4954 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The client answered a challenge with "*".
    Cancelled,
    /// An empty response where credentials were needed.
    Empty,
    Invalid(SaslError),
}

impl Failure {
    /// Code, enhanced code and text of the reply this failure gets.
    pub fn reply(self) -> (u16, &'static str, &'static str) {
        match self {
            Failure::Cancelled => (501, "5.7.0", "Authentication cancelled"),
            Failure::Empty | Failure::Invalid(SaslError::EmptyUsername) => (
                535,
                "5.7.8",
                "Authentication credentials invalid (empty username)",
            ),
            Failure::Invalid(SaslError::AuthzidMismatch) => (
                535,
                "5.7.8",
                "Authentication credentials invalid (authorization identity must match the username)",
            ),
            Failure::Invalid(SaslError::InvalidBase64) => {
                (501, "5.5.2", "Cannot decode base64 response")
            }
            Failure::Invalid(SaslError::NotUtf8) => {
                (501, "5.5.2", "Credentials must be UTF-8 text")
            }
            Failure::Invalid(SaslError::Malformed) => {
                (501, "5.5.2", "Malformed authentication response")
            }
            Failure::Invalid(SaslError::TooLong) => {
                (500, "5.5.6", "Authentication exchange line is too long")
            }
        }
    }
}

/// What the server does next in an exchange.
#[derive(Debug)]
pub enum Step {
    /// Send `334 <challenge>` and pass the client's next line to [`Exchange::respond`].
    Challenge(&'static str),
    Done(Credentials),
    Failed(Failure),
}

/// The server side of AUTH PLAIN and AUTH LOGIN, sans-I/O: the session sends challenges and
/// reads lines, this decides what they mean. Lines are passed with or without their line end.
#[derive(Debug)]
pub struct Exchange {
    state: ExchangeState,
}

#[derive(Debug)]
enum ExchangeState {
    PlainResponse,
    LoginUsername,
    LoginPassword { username: String },
    Finished,
}

impl Exchange {
    /// Starts an exchange from the AUTH command's mechanism and initial response (as sent,
    /// `=` meaning an empty one).
    pub fn start(mechanism: Mechanism, initial: Option<&[u8]>) -> (Exchange, Step) {
        let initial = initial.map(trim_response).filter(|r| !r.is_empty());
        let mut exchange = Exchange {
            state: match mechanism {
                Mechanism::Plain => ExchangeState::PlainResponse,
                Mechanism::Login => ExchangeState::LoginUsername,
            },
        };
        let step = match (mechanism, initial) {
            (Mechanism::Plain, None) => Step::Challenge(""),
            (Mechanism::Login, None) => Step::Challenge(LOGIN_USERNAME_PROMPT),
            (_, Some(response)) => exchange.respond(response),
        };
        (exchange, step)
    }

    /// The client's answer to the last challenge.
    pub fn respond(&mut self, line: &[u8]) -> Step {
        let state = std::mem::replace(&mut self.state, ExchangeState::Finished);
        if is_cancel(line) {
            return Step::Failed(Failure::Cancelled);
        }
        match state {
            ExchangeState::Finished => Step::Failed(Failure::Invalid(SaslError::Malformed)),
            ExchangeState::PlainResponse => {
                if is_empty_response(line) || trim_response(line).is_empty() {
                    return Step::Failed(Failure::Empty);
                }
                match decode_plain(line) {
                    Ok(c) => Step::Done(Credentials {
                        username: c.username,
                        password: c.password,
                    }),
                    Err(e) => Step::Failed(Failure::Invalid(e)),
                }
            }
            ExchangeState::LoginUsername => {
                if is_empty_response(line) {
                    return Step::Failed(Failure::Empty);
                }
                let username = match decode_login_field(line) {
                    Ok(u) if u.expose_secret().is_empty() => return Step::Failed(Failure::Empty),
                    Ok(u) => u.expose_secret().to_owned(),
                    Err(e) => return Step::Failed(Failure::Invalid(e)),
                };
                self.state = ExchangeState::LoginPassword { username };
                Step::Challenge(LOGIN_PASSWORD_PROMPT)
            }
            ExchangeState::LoginPassword { username } => {
                let password = if is_empty_response(line) {
                    Ok(SecretString::from(String::new()))
                } else {
                    decode_login_field(line)
                };
                match password {
                    Ok(password) => Step::Done(Credentials { username, password }),
                    Err(e) => Step::Failed(Failure::Invalid(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::command::{LineReader, Next};
    use base64::Engine;

    fn b64(data: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    /// How an exchange ended, in comparable form.
    #[derive(Debug, PartialEq, Eq)]
    enum Outcome {
        /// The challenges sent, then the username and password obtained.
        Done(Vec<&'static str>, String, String),
        Failed(Vec<&'static str>, Failure),
        /// The script ran out of lines while the exchange still wanted one.
        Waiting(Vec<&'static str>),
    }

    /// Runs an exchange with the client's lines arriving as `chunks` through the same line
    /// reader the session uses.
    fn exchange<'a>(
        mechanism: Mechanism,
        initial: Option<&[u8]>,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> Outcome {
        let (mut exchange, mut step) = Exchange::start(mechanism, initial);
        let mut challenges = Vec::new();
        let mut reader = LineReader::new();
        let mut chunks = chunks.into_iter();
        loop {
            match step {
                Step::Done(c) => {
                    return Outcome::Done(
                        challenges,
                        c.username,
                        c.password.expose_secret().to_owned(),
                    );
                }
                Step::Failed(f) => return Outcome::Failed(challenges, f),
                Step::Challenge(c) => challenges.push(c),
            }
            let line = loop {
                match reader.next_line(12_290, 12_290) {
                    Next::Line(line) => break line,
                    Next::TooLong { .. } => {
                        return Outcome::Failed(challenges, Failure::Invalid(SaslError::TooLong));
                    }
                    Next::NeedMore => match chunks.next() {
                        Some(chunk) => reader.push(chunk),
                        None => return Outcome::Waiting(challenges),
                    },
                }
            };
            step = exchange.respond(&line);
        }
    }

    #[test]
    fn exchange_table_whole_bytewise_and_split_everywhere() {
        use Failure::*;
        use Mechanism::*;
        let plain_alice = b64(b"\0alice\0secret");
        let login_user = b64(b"alice");
        let login_pass = b64(b"secret");
        let done = |c: &[&'static str]| Outcome::Done(c.to_vec(), "alice".into(), "secret".into());
        let cases: Vec<(Mechanism, Option<String>, String, Outcome)> = vec![
            (Plain, Some(plain_alice.clone()), String::new(), done(&[])),
            (Plain, None, format!("{plain_alice}\r\n"), done(&[""])),
            (Plain, None, format!("{plain_alice}\n"), done(&[""])),
            (
                Plain,
                Some("=".into()),
                String::new(),
                Outcome::Failed(vec![], Empty),
            ),
            (
                Plain,
                None,
                "*\r\n".into(),
                Outcome::Failed(vec![""], Cancelled),
            ),
            (Plain, None, "\r\n".into(), Outcome::Failed(vec![""], Empty)),
            (
                Plain,
                None,
                "not base64!\r\n".into(),
                Outcome::Failed(vec![""], Invalid(SaslError::InvalidBase64)),
            ),
            (
                Plain,
                Some(b64(b"\0\0pw")),
                String::new(),
                Outcome::Failed(vec![], Invalid(SaslError::EmptyUsername)),
            ),
            (
                Plain,
                Some(b64(b"boss\0alice\0pw")),
                String::new(),
                Outcome::Failed(vec![], Invalid(SaslError::AuthzidMismatch)),
            ),
            (
                Plain,
                Some(b64(b"\0al\xffice\0pw")),
                String::new(),
                Outcome::Failed(vec![], Invalid(SaslError::NotUtf8)),
            ),
            (
                Plain,
                Some(b64(b"\0alice\0pw\0extra")),
                String::new(),
                Outcome::Failed(vec![], Invalid(SaslError::Malformed)),
            ),
            (Plain, None, String::new(), Outcome::Waiting(vec![""])),
            (
                Login,
                None,
                format!("{login_user}\r\n{login_pass}\r\n"),
                done(&[LOGIN_USERNAME_PROMPT, LOGIN_PASSWORD_PROMPT]),
            ),
            (
                Login,
                Some(login_user.clone()),
                format!("{login_pass}\r\n"),
                done(&[LOGIN_PASSWORD_PROMPT]),
            ),
            (
                Login,
                None,
                format!("{login_user}\r\n*\r\n"),
                Outcome::Failed(
                    vec![LOGIN_USERNAME_PROMPT, LOGIN_PASSWORD_PROMPT],
                    Cancelled,
                ),
            ),
            (
                Login,
                None,
                "\r\n".into(),
                Outcome::Failed(vec![LOGIN_USERNAME_PROMPT], Empty),
            ),
            (
                Login,
                Some("=".into()),
                String::new(),
                Outcome::Failed(vec![], Empty),
            ),
            (
                Login,
                None,
                format!("{login_user}\r\n=\r\n"),
                Outcome::Done(
                    vec![LOGIN_USERNAME_PROMPT, LOGIN_PASSWORD_PROMPT],
                    "alice".into(),
                    String::new(),
                ),
            ),
            (
                Login,
                None,
                format!("{}\r\n", b64(b"\xff")),
                Outcome::Failed(vec![LOGIN_USERNAME_PROMPT], Invalid(SaslError::NotUtf8)),
            ),
            (
                Login,
                None,
                format!("{}\r\n", "A".repeat(13_000)),
                Outcome::Failed(vec![LOGIN_USERNAME_PROMPT], Invalid(SaslError::TooLong)),
            ),
        ];
        for (mechanism, initial, input, want) in cases {
            let initial = initial.as_deref().map(str::as_bytes);
            let input = input.as_bytes();
            let whole = exchange(mechanism, initial, [input]);
            assert_eq!(whole, want, "{mechanism:?} {input:?}");
            assert_eq!(
                exchange(mechanism, initial, input.chunks(1)),
                want,
                "bytewise"
            );
            // Every split point of inputs short enough to make that cheap.
            if input.len() < 200 {
                for cut in 0..=input.len() {
                    let (a, b) = input.split_at(cut);
                    assert_eq!(exchange(mechanism, initial, [a, b]), want, "split at {cut}");
                }
            }
        }
    }

    #[test]
    fn every_failure_has_a_reply_of_the_right_class() {
        for e in [
            Failure::Cancelled,
            Failure::Empty,
            Failure::Invalid(SaslError::InvalidBase64),
            Failure::Invalid(SaslError::NotUtf8),
            Failure::Invalid(SaslError::Malformed),
            Failure::Invalid(SaslError::EmptyUsername),
            Failure::Invalid(SaslError::AuthzidMismatch),
            Failure::Invalid(SaslError::TooLong),
        ] {
            let (code, enhanced, _) = e.reply();
            assert!((500..600).contains(&code), "{e:?}");
            assert!(enhanced.starts_with("5."), "{e:?}");
        }
    }
}
