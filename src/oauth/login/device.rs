//! The device authorization grant (RFC 8628; Entra's "device code flow"): show a URL and a
//! code, then poll the token endpoint every `interval` until the user has signed in
//! elsewhere. `authorization_pending` means "ask again", `slow_down` adds five seconds to the
//! interval, `authorization_declined` (Entra) or `access_denied` (RFC) and `expired_token`
//! end the login. The time left is shown while it waits.

use std::future::Future;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Identity;
use crate::oauth::classify::classify;
use crate::oauth::endpoint::{DeviceAuthorization, EndpointError, Http, TokenAnswer};
use crate::oauth::grants::{Form, login_command};
use crate::oauth::login::{LoginError, say};
use crate::oauth::{TokenError, status};

const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 §3.5: each `slow_down` adds this to the polling interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// What one poll of the token endpoint said.
pub enum Poll {
    Granted(TokenAnswer),
    Pending,
    SlowDown,
    Declined(String),
    Expired,
    Failed(TokenError),
}

/// Asks for a device code, shows it, and polls until the user signs in.
pub async fn sign_in(
    identity: &Identity,
    http: &Http,
    out: &mut (dyn Write + Send),
) -> Result<TokenAnswer, LoginError> {
    let oauth = &identity.oauth;
    let Some(device_url) = &oauth.device_code_url else {
        return Err(LoginError::Unsupported(format!(
            "identity {} has no device_code_url (Google allows no mail scope in its device \
             flow); use --browser or --paste",
            identity.name
        )));
    };
    let scopes = oauth.scopes.join(" ");
    let request = [("client_id", oauth.client_id.as_str()), ("scope", &scopes)];
    let authorization = http
        .device_authorization(device_url, &request)
        .await
        .map_err(|e| {
            LoginError::Refused(classify(e, oauth.flow, &login_command(&identity.name)))
        })?;
    show(&authorization, out);
    let tty = std::io::stdout().is_terminal();
    let mut shown_minute = u64::MAX;
    let progress = |left: Duration| {
        let minute = left.as_secs() / 60;
        // A terminal gets a live countdown; a log gets a line a minute.
        if tty {
            print!(
                "\rwaiting for sign-in: {} left   ",
                status::age(left.as_secs())
            );
            let _ = std::io::stdout().flush();
        } else if minute != shown_minute {
            shown_minute = minute;
            println!("waiting for sign-in: {} left", status::age(left.as_secs()));
        }
    };
    let result = poll_until_done(
        &authorization,
        || poll(identity, http, &authorization),
        progress,
    )
    .await;
    if tty {
        println!();
    }
    result
}

fn show(authorization: &DeviceAuthorization, out: &mut (dyn Write + Send)) {
    let message = authorization.message.clone().unwrap_or_else(|| {
        format!(
            "To sign in, open {} in a browser on any device and enter the code {}.",
            authorization.verification_uri, authorization.user_code
        )
    });
    say(out, &message);
    say(out, &format!("URL: {}", authorization.verification_uri));
    say(out, &format!("Code: {}", authorization.user_code));
    say(
        out,
        &format!(
            "Sign in as the user whose mailbox the bridge sends from. The code is valid for {}.",
            status::age(authorization.expires_in.as_secs())
        ),
    );
}

/// One poll of the token endpoint with the device code.
async fn poll(identity: &Identity, http: &Http, authorization: &DeviceAuthorization) -> Poll {
    let oauth = &identity.oauth;
    let mut form = Form::new()
        .with("grant_type", DEVICE_GRANT)
        .with("device_code", &authorization.device_code);
    if let Err(e) = form.client(oauth, &oauth.token_url) {
        return Poll::Failed(e);
    }
    match http.token(&oauth.token_url, &form.pairs()).await {
        Ok(answer) => Poll::Granted(answer),
        Err(e) => device_outcome(&e).unwrap_or_else(|| {
            Poll::Failed(classify(e, oauth.flow, &login_command(&identity.name)))
        }),
    }
}

/// What an error answer to a poll means for the device flow; `None` for errors that are not
/// the flow's own (they are classified like any token endpoint failure).
fn device_outcome(error: &EndpointError) -> Option<Poll> {
    let EndpointError::OAuth {
        error, description, ..
    } = error
    else {
        return None;
    };
    Some(match error.as_str() {
        "authorization_pending" => Poll::Pending,
        "slow_down" => Poll::SlowDown,
        "expired_token" | "code_expired" => Poll::Expired,
        "authorization_declined" | "access_denied" => Poll::Declined(if description.is_empty() {
            error.clone()
        } else {
            description.clone()
        }),
        _ => return None,
    })
}

/// The polling loop, apart from HTTP so its timing is tested with a paused clock. `progress`
/// gets the time left before each wait.
pub async fn poll_until_done<P, F>(
    authorization: &DeviceAuthorization,
    mut poll: P,
    mut progress: impl FnMut(Duration),
) -> Result<TokenAnswer, LoginError>
where
    P: FnMut() -> F,
    F: Future<Output = Poll>,
{
    let deadline = Instant::now() + authorization.expires_in;
    let mut interval = authorization.interval;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Err(LoginError::Expired);
        }
        progress(deadline - now);
        tokio::time::sleep(interval.min(deadline - now)).await;
        match poll().await {
            Poll::Granted(answer) => return Ok(answer),
            Poll::Pending => {}
            Poll::SlowDown => interval += SLOW_DOWN_STEP,
            Poll::Declined(why) => return Err(LoginError::Declined(why)),
            Poll::Expired => return Err(LoginError::Expired),
            // A network blip while the user is signing in must not waste the code; RFC 8628
            // asks clients to back off on such errors.
            Poll::Failed(e) if !e.is_permanent() => {
                interval = (interval * 2).min(interval + Duration::from_secs(30))
            }
            Poll::Failed(e) => return Err(LoginError::Refused(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use secrecy::SecretString;

    use super::*;

    fn authorization(interval: u64, expires: u64) -> DeviceAuthorization {
        DeviceAuthorization {
            device_code: "d".into(),
            user_code: "U".into(),
            verification_uri: "https://example.test/device".into(),
            expires_in: Duration::from_secs(expires),
            interval: Duration::from_secs(interval),
            message: None,
        }
    }

    fn answer() -> TokenAnswer {
        TokenAnswer {
            access_token: SecretString::from("at".to_string()),
            expires_in: None,
            refresh_token: Some(SecretString::from("rt".to_string())),
        }
    }

    /// Runs the loop against scripted polls; returns the result and when each poll came.
    async fn run(
        auth: &DeviceAuthorization,
        script: Vec<fn() -> Poll>,
    ) -> (
        Result<TokenAnswer, LoginError>,
        Vec<Duration>,
        Vec<Duration>,
    ) {
        let start = Instant::now();
        let script = Mutex::new(script.into_iter());
        let polls = Mutex::new(Vec::new());
        let mut shown = Vec::new();
        let result = poll_until_done(
            auth,
            || {
                polls.lock().unwrap().push(Instant::now() - start);
                let next = script.lock().unwrap().next().unwrap_or(|| Poll::Pending);
                async move { next() }
            },
            |left| shown.push(left),
        )
        .await;
        (result, polls.into_inner().unwrap(), shown)
    }

    #[tokio::test(start_paused = true)]
    async fn polls_at_the_interval_and_slows_down_by_five_seconds() {
        let auth = authorization(5, 900);
        let (result, polls, shown) = run(
            &auth,
            vec![
                || Poll::Pending,
                || Poll::SlowDown,
                || Poll::Pending,
                || Poll::Granted(answer()),
            ],
        )
        .await;
        assert!(result.is_ok());
        let secs: Vec<u64> = polls.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, vec![5, 10, 20, 30], "slow_down adds 5 s for good");
        assert_eq!(shown[0], Duration::from_secs(900), "time left is shown");
        assert_eq!(shown[3], Duration::from_secs(880));
    }

    #[tokio::test(start_paused = true)]
    async fn declined_expired_and_refused_end_the_login() {
        let auth = authorization(5, 900);
        let (result, _, _) = run(&auth, vec![|| Poll::Declined("The user said no".into())]).await;
        assert!(matches!(result, Err(LoginError::Declined(why)) if why == "The user said no"));
        let (result, _, _) = run(&auth, vec![|| Poll::Expired]).await;
        assert!(matches!(result, Err(LoginError::Expired)));
        let refused = || {
            Poll::Failed(TokenError::NeedsLogin {
                reason: "invalid_client".into(),
                code: Some("invalid_client".into()),
                aadsts: Some(700016),
                hint: String::new(),
            })
        };
        let (result, polls, _) = run(&auth, vec![refused]).await;
        assert!(matches!(result, Err(LoginError::Refused(_))));
        assert_eq!(polls.len(), 1);
    }

    fn oauth_error(status: u16, error: &str, description: &str) -> EndpointError {
        EndpointError::OAuth {
            status,
            error: error.into(),
            description: description.into(),
            aadsts: None,
            retry_after: None,
        }
    }

    #[test]
    fn answers_to_a_poll_are_read_by_their_error_field() {
        let read =
            |error: &str, description: &str| device_outcome(&oauth_error(400, error, description));
        assert!(matches!(
            read("authorization_pending", "AADSTS70016: pending"),
            Some(Poll::Pending)
        ));
        assert!(matches!(read("slow_down", ""), Some(Poll::SlowDown)));
        assert!(matches!(read("expired_token", ""), Some(Poll::Expired)));
        assert!(matches!(read("code_expired", ""), Some(Poll::Expired)));
        assert!(matches!(
            read("authorization_declined", "AADSTS70000: the user said no"),
            Some(Poll::Declined(why)) if why == "AADSTS70000: the user said no"
        ));
        assert!(matches!(
            read("access_denied", ""),
            Some(Poll::Declined(why)) if why == "access_denied"
        ));
        // Anything else is a token endpoint failure like any other.
        assert!(read("invalid_client", "").is_none());
        assert!(read("temporarily_unavailable", "").is_none());
        assert!(
            device_outcome(&EndpointError::Status {
                status: 502,
                retry_after: None
            })
            .is_none()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_code_nobody_uses_runs_out_and_network_blips_are_survived() {
        let auth = authorization(5, 60);
        let blip = || Poll::Failed(TokenError::transient("timed out"));
        let (result, polls, _) = run(&auth, vec![blip, blip]).await;
        assert!(matches!(result, Err(LoginError::Expired)));
        let secs: Vec<u64> = polls.iter().map(Duration::as_secs).collect();
        // After each blip the interval doubles; the last wait is cut at the expiry.
        assert_eq!(secs, vec![5, 15, 35, 55, 60]);
    }
}
