//! The authorization code grant with PKCE (RFC 7636, S256) for a browser sign-in.
//!
//! The redirect goes to `http://localhost:PORT/`, where a one-shot listener of this process
//! catches it. On a machine without a browser, the administrator signs in anywhere and pastes
//! the address the browser was sent to (the page itself need not load); both ways are open
//! at once in the listener mode, and `--paste` skips the listener. `state` ties the redirect
//! to this login: a redirect with another state is refused and nothing is stored.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::config::{Identity, Provider};
use crate::oauth::classify::classify;
use crate::oauth::endpoint::{Http, TokenAnswer};
use crate::oauth::grants::{Form, login_command};
use crate::oauth::login::{LoginError, Method, say};

/// A redirect request is one GET line plus headers; anything longer is not a browser.
const MAX_REQUEST: usize = 16 * 1024;
/// A connection to the listener that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the redirect carried.
#[derive(Default, PartialEq, Eq)]
pub struct Redirect {
    pub code: Option<String>,
    pub state: Option<String>,
    pub error: Option<String>,
    pub error_description: Option<String>,
}

// Hand-written: the code is redeemable for tokens (with the verifier) until it is used.
impl fmt::Debug for Redirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redirect")
            .field("code", &self.code.as_ref().map(|_| "[redacted]"))
            .field("state", &self.state)
            .field("error", &self.error)
            .field("error_description", &self.error_description)
            .finish()
    }
}

impl Redirect {
    /// Reads the query of a redirect address or request target.
    pub fn parse(target: &str) -> Redirect {
        let query = target.split_once('?').map_or("", |(_, q)| q);
        let query = query.split('#').next().unwrap_or("");
        let mut redirect = Redirect::default();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            let slot = match key.as_ref() {
                "code" => &mut redirect.code,
                "state" => &mut redirect.state,
                "error" => &mut redirect.error,
                "error_description" => &mut redirect.error_description,
                _ => continue,
            };
            slot.get_or_insert_with(|| value.into_owned());
        }
        redirect
    }
}

/// Signs the user in through a browser and redeems the code.
pub async fn sign_in(
    identity: &Identity,
    http: &Http,
    method: Method,
    out: &mut (dyn Write + Send),
    timeout: Duration,
    pasted: Option<mpsc::Receiver<String>>,
    login_hint: Option<&str>,
) -> Result<TokenAnswer, LoginError> {
    let oauth = &identity.oauth;
    let Some(authorize_url) = &oauth.authorize_url else {
        return Err(LoginError::Unsupported(format!(
            "identity {} has no authorize_url; use --device",
            identity.name
        )));
    };
    let verifier = Zeroizing::new(random_text(32)?);
    let challenge = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, verifier.as_bytes()));
    let state = random_text(16)?;
    let (listeners, redirect_uri) = redirect_target(identity, method).await?;
    let url = authorization_url(
        identity,
        authorize_url,
        &redirect_uri,
        &challenge,
        &state,
        login_hint,
    )?;
    say(
        out,
        "Open this address in a browser and sign in as the user whose mailbox the bridge sends from:",
    );
    say(out, "");
    say(out, &format!("  {url}"));
    say(out, "");
    if listeners.is_empty() {
        say(
            out,
            &format!(
                "After signing in, the browser is sent to an address starting with {redirect_uri} (the page may not load). Paste that whole address here and press Enter."
            ),
        );
    } else {
        say(
            out,
            &format!(
                "Waiting for the browser to come back to {redirect_uri}. Without a browser on this machine, sign in elsewhere and paste here the address the browser ends up on."
            ),
        );
    }
    let redirect = tokio::time::timeout(timeout, wait(listeners, pasted, &redirect_uri, &state))
        .await
        .map_err(|_| LoginError::TimedOut(timeout))??;
    let code = check(redirect, &state)?;

    let mut form = Form::new()
        .with("grant_type", "authorization_code")
        .with("code", &code)
        .with("redirect_uri", &redirect_uri)
        .with("code_verifier", &verifier);
    if identity.provider != Provider::Gmail {
        form = form.with("scope", &oauth.scopes.join(" "));
    }
    form.client(oauth, &oauth.token_url)
        .map_err(LoginError::Refused)?;
    http.token(&oauth.token_url, &form.pairs())
        .await
        .map_err(|e| LoginError::Refused(classify(e, oauth.flow, &login_command(&identity.name))))
}

/// The code from a redirect that belongs to this login.
fn check(redirect: Redirect, state: &str) -> Result<String, LoginError> {
    if redirect.state.as_deref() != Some(state) {
        return Err(LoginError::StateMismatch);
    }
    if let Some(error) = redirect.error {
        return Err(LoginError::Declined(
            redirect.error_description.unwrap_or(error),
        ));
    }
    redirect
        .code
        .filter(|c| !c.is_empty())
        .ok_or_else(|| LoginError::BadRedirect("the redirect carries no code".into()))
}

fn authorization_url(
    identity: &Identity,
    authorize_url: &str,
    redirect_uri: &str,
    challenge: &str,
    state: &str,
    login_hint: Option<&str>,
) -> Result<String, LoginError> {
    let mut url = url::Url::parse(authorize_url)
        .map_err(|_| LoginError::Unsupported("authorize_url is not a URL".into()))?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("client_id", &identity.oauth.client_id)
            .append_pair("response_type", "code")
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &identity.oauth.scopes.join(" "))
            .append_pair("state", state)
            .append_pair("code_challenge", challenge)
            .append_pair("code_challenge_method", "S256");
        match identity.provider {
            // Google returns a refresh token only for offline access, and again only when
            // consent is asked anew.
            Provider::Gmail => {
                query
                    .append_pair("access_type", "offline")
                    .append_pair("prompt", "consent");
            }
            // Let the administrator pick the mailbox's user rather than their own session.
            Provider::Office365 => {
                query
                    .append_pair("response_mode", "query")
                    .append_pair("prompt", "select_account");
            }
            Provider::Generic | Provider::Sandbox => {}
        }
        if let Some(hint) = login_hint {
            query.append_pair("login_hint", hint);
        }
    }
    Ok(url.into())
}

/// The listeners (none for `--paste`) and the redirect URI they serve.
async fn redirect_target(
    identity: &Identity,
    method: Method,
) -> Result<(Vec<TcpListener>, String), LoginError> {
    let configured = identity
        .oauth
        .redirect_uri
        .as_deref()
        .unwrap_or("http://localhost/");
    let mut uri = url::Url::parse(configured)
        .map_err(|_| LoginError::Unsupported("redirect_uri is not a URL".into()))?;
    let io = |e: std::io::Error| LoginError::Io(format!("cannot listen for the redirect: {e}"));
    let v4 = SocketAddr::from(([127, 0, 0, 1], uri.port().unwrap_or(0)));
    let first = TcpListener::bind(v4).await.map_err(io)?;
    let port = first.local_addr().map_err(io)?.port();
    let _ = uri.set_port(Some(port));
    if method == Method::Paste {
        // Only the port was wanted: nothing listens, the address is pasted.
        return Ok((Vec::new(), uri.into()));
    }
    let mut listeners = vec![first];
    // "localhost" may resolve to ::1 first in the browser.
    if let Ok(v6) = TcpListener::bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port))).await
    {
        listeners.push(v6);
    }
    Ok((listeners, uri.into()))
}

/// Waits for the redirect on the listeners or on pasted lines, whichever comes first. A
/// stray request to the listener (favicon, wrong state) gets an error page and the wait goes
/// on; a pasted address is final.
async fn wait(
    listeners: Vec<TcpListener>,
    mut pasted: Option<mpsc::Receiver<String>>,
    redirect_uri: &str,
    state: &str,
) -> Result<Redirect, LoginError> {
    let path = url::Url::parse(redirect_uri)
        .map(|u| u.path().to_string())
        .unwrap_or_else(|_| "/".into());
    let (found_tx, mut found_rx) = mpsc::channel::<Redirect>(1);
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let found = found_tx.clone();
        let path = path.clone();
        let state = state.to_string();
        tasks.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                if let Some(redirect) = serve(stream, &path, &state).await {
                    let _ = found.send(redirect).await;
                    return;
                }
            }
        });
    }
    drop(found_tx);
    loop {
        tokio::select! {
            Some(redirect) = found_rx.recv() => return Ok(redirect),
            line = next_line(&mut pasted) => match line {
                Some(line) if line.trim().is_empty() => continue,
                Some(line) => return Ok(Redirect::parse(line.trim())),
                // Standard input closed: only the listener can still deliver.
                None if tasks.is_empty() => {
                    return Err(LoginError::BadRedirect("no redirect address was pasted".into()));
                }
                None => pasted = None,
            },
        }
    }
}

async fn next_line(pasted: &mut Option<mpsc::Receiver<String>>) -> Option<String> {
    match pasted {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers one connection to the listener; the redirect when it is this login's.
async fn serve(mut stream: TcpStream, path: &str, state: &str) -> Option<Redirect> {
    let mut buf = Vec::with_capacity(2048);
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 2048];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        Some(())
    })
    .await;
    if !matches!(read, Ok(Some(()))) {
        return None;
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or("").split(' ');
    let (Some("GET"), Some(target)) = (parts.next(), parts.next()) else {
        respond(
            &mut stream,
            405,
            "This address only takes the sign-in redirect.",
        )
        .await;
        return None;
    };
    if target.split('?').next() != Some(path) {
        respond(&mut stream, 404, "Not found.").await;
        return None;
    }
    let redirect = Redirect::parse(target);
    if redirect.state.as_deref() != Some(state) {
        respond(&mut stream, 400, "This redirect does not belong to the running login (state mismatch); nothing was stored.").await;
        return None;
    }
    match &redirect.error {
        Some(_) => {
            respond(
                &mut stream,
                200,
                "The sign-in did not succeed; see the terminal.",
            )
            .await
        }
        None => {
            respond(
                &mut stream,
                200,
                "Signed in. You can close this window and return to the terminal.",
            )
            .await
        }
    }
    Some(redirect)
}

async fn respond(stream: &mut TcpStream, status: u16, text: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Method Not Allowed",
    };
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>smtp-oauth-bridge</title></head>\
         <body><p>smtp-oauth-bridge: {text}</p></body></html>"
    );
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Random base64url text from `bytes` random bytes (32 bytes make a 43-character PKCE
/// verifier, RFC 7636 §4.1).
fn random_text(bytes: usize) -> Result<String, LoginError> {
    let mut raw = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| LoginError::Io("system random number generator failed".into()))?;
    Ok(URL_SAFE_NO_PAD.encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(provider: &str) -> std::sync::Arc<Identity> {
        let hash = crate::users::hash_password("pw").unwrap();
        let text = format!(
            "[[accounts]]\nname = \"x\"\nusername = \"x@example.com\"\npassword_hash = \"{hash}\"\n\
             provider = \"{provider}\"\nclient_id = \"app\"\nflow = \"refresh_token\"\n\
             tenant = \"contoso.onmicrosoft.com\"\n"
        );
        let text = if provider == "gmail" {
            text.replace("tenant = \"contoso.onmicrosoft.com\"\n", "")
        } else {
            text
        };
        let config = crate::config::Config::from_toml_str(&text).unwrap();
        config.identities[0].clone()
    }

    fn query(url: &str) -> std::collections::HashMap<String, String> {
        url::Url::parse(url)
            .unwrap()
            .query_pairs()
            .into_owned()
            .collect()
    }

    #[test]
    fn authorization_urls_ask_each_provider_for_a_refresh_token() {
        let office = identity("office365");
        let url = authorization_url(
            &office,
            office.oauth.authorize_url.as_deref().unwrap(),
            "http://localhost:8400/",
            "challenge",
            "state",
            Some("x@example.com"),
        )
        .unwrap();
        let q = query(&url);
        assert!(url.starts_with(
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize?"
        ));
        assert_eq!(
            q["scope"],
            "https://outlook.office.com/SMTP.Send offline_access"
        );
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["prompt"], "select_account");
        assert_eq!(q["login_hint"], "x@example.com");

        let gmail = identity("gmail");
        let url = authorization_url(
            &gmail,
            gmail.oauth.authorize_url.as_deref().unwrap(),
            "http://localhost:8400/",
            "challenge",
            "state",
            None,
        )
        .unwrap();
        let q = query(&url);
        assert!(url.starts_with("https://accounts.google.com/o/oauth2/v2/auth?"));
        assert_eq!(
            (q["access_type"].as_str(), q["prompt"].as_str()),
            ("offline", "consent")
        );
        assert_eq!(q["scope"], "https://mail.google.com/");
        assert_eq!(crate::oauth::login::default_method(&gmail), Method::Browser);
        assert_eq!(crate::oauth::login::default_method(&office), Method::Device);
    }

    #[test]
    fn redirects_are_read_from_addresses_and_targets() {
        let r = Redirect::parse("http://localhost:8400/?code=abc%2Bd&state=s1&session_state=x");
        assert_eq!(r.code.as_deref(), Some("abc+d"));
        assert_eq!(r.state.as_deref(), Some("s1"));
        let r =
            Redirect::parse("/?error=access_denied&error_description=The+user+declined&state=s1");
        assert_eq!(r.error.as_deref(), Some("access_denied"));
        assert!(matches!(check(r, "s1"), Err(LoginError::Declined(d)) if d == "The user declined"));
        let r = Redirect::parse("/?code=abc&state=other");
        assert!(matches!(check(r, "s1"), Err(LoginError::StateMismatch)));
        let r = Redirect::parse("/?code=abc");
        assert!(matches!(check(r, "s1"), Err(LoginError::StateMismatch)));
    }

    #[test]
    fn debug_output_hides_the_code() {
        let r = Redirect::parse("/?code=M.C507_code-marker&state=s1");
        let shown = format!("{r:?}");
        assert!(
            shown.contains("s1") && shown.contains("[redacted]"),
            "{shown}"
        );
        assert!(!shown.contains("code-marker"), "{shown}");
    }
}
