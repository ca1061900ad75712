//! The sign-in side of the sandbox: the authorize endpoint (authorization code with PKCE)
//! and the device code endpoint with its polling rules (PROTOCOL.md §2.8, RFC 8628).
//!
//! There is no login page: a GET of the authorize URL signs in at once as `login_hint` (or
//! the configured interactive user) and redirects to the loopback redirect URI, so a test
//! plays the browser with one HTTP request. Device codes wait until the test approves or
//! declines them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use serde_json::json;

use crate::sandbox::http::{HttpRequest, HttpResponse};
use crate::sandbox::random;
use crate::sandbox::token_endpoint::EndpointState;
use crate::sandbox::token_endpoint::errors::{entra_error, lock, missing_parameter, printable};

/// Entra's authorization codes are good for ten minutes and one redemption.
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// Letters of a user code: no vowels or look-alikes, so no words and no misreading.
const USER_CODE_ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ23456789";

/// An issued authorization code.
pub(super) struct AuthCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: String,
    subject: String,
    expires_at: Instant,
}

/// A device login waiting for (or settled by) its user.
pub(super) struct DeviceGrant {
    client_id: String,
    user_code: String,
    scope: String,
    expires_at: Instant,
    interval: Duration,
    last_poll: Option<Instant>,
    /// `None` while pending; `Some(Some(user))` approved; `Some(None)` declined.
    outcome: Option<Option<String>>,
}

impl EndpointState {
    /// `GET /{tenant}/oauth2/v2.0/authorize`: checks the request, "signs in", and redirects
    /// with a code (or with `access_denied` when declining is switched on).
    pub(super) fn authorize(&self, _tenant: &str, request: &HttpRequest) -> HttpResponse {
        if request.method != "GET" {
            return HttpResponse::text(405, "Method Not Allowed");
        }
        let query: HashMap<String, String> = url::form_urlencoded::parse(
            request
                .target
                .split_once('?')
                .map_or("", |(_, q)| q)
                .as_bytes(),
        )
        .into_owned()
        .collect();
        let param = |name: &str| query.get(name).map(String::as_str).unwrap_or("");
        let Ok(redirect) = url::Url::parse(param("redirect_uri")) else {
            return bad_request("AADSTS50011: the redirect URI is missing or not a URL.");
        };
        let loopback = matches!(
            redirect.host_str(),
            Some("localhost" | "127.0.0.1" | "[::1]")
        );
        if redirect.scheme() != "http" || !loopback {
            return bad_request("AADSTS50011: the redirect URI must be a loopback http address.");
        }
        if param("client_id").is_empty() || param("response_type") != "code" {
            return bad_request("AADSTS900144: client_id and response_type=code are required.");
        }
        if param("code_challenge").is_empty() || param("code_challenge_method") != "S256" {
            return bad_request(
                "AADSTS501491: a PKCE code_challenge with method S256 is required.",
            );
        }
        let mut target = redirect;
        {
            let mut pairs = target.query_pairs_mut();
            if self.decline.load(std::sync::atomic::Ordering::SeqCst) {
                pairs.append_pair("error", "access_denied").append_pair(
                    "error_description",
                    "AADSTS65004: User declined to consent.",
                );
            } else {
                let subject = match param("login_hint") {
                    "" => self.config.interactive_user.clone(),
                    hint => hint.to_string(),
                };
                let code = random::base64url(48);
                lock(&self.codes).insert(
                    code.clone(),
                    AuthCode {
                        client_id: param("client_id").to_string(),
                        redirect_uri: param("redirect_uri").to_string(),
                        challenge: param("code_challenge").to_string(),
                        scope: param("scope").to_string(),
                        subject,
                        expires_at: Instant::now() + CODE_LIFETIME,
                    },
                );
                pairs.append_pair("code", &code);
            }
            pairs.append_pair("state", param("state"));
        }
        HttpResponse::text(302, "Found").header("Location", target.into())
    }

    /// The `authorization_code` grant: the code must be this client's, unused, sent to the
    /// same redirect URI, and `code_verifier` must hash to the challenge (S256).
    pub(super) fn redeem_code(
        &self,
        client_id: &str,
        form: &HashMap<String, String>,
    ) -> HttpResponse {
        let Some(code) = form.get("code") else {
            return missing_parameter("code");
        };
        let Some(verifier) = form.get("code_verifier") else {
            return missing_parameter("code_verifier");
        };
        // One redemption only: the code is gone whatever happens next (AADSTS54005).
        let Some(grant) = lock(&self.codes).remove(code) else {
            return entra_error(
                400,
                "invalid_grant",
                54005,
                "OAuth2 Authorization code was already redeemed or is unknown.",
            );
        };
        if grant.expires_at <= Instant::now() {
            return entra_error(
                400,
                "invalid_grant",
                70008,
                "The provided authorization code has expired.",
            );
        }
        if grant.client_id != client_id {
            return entra_error(
                400,
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed.",
            );
        }
        if form.get("redirect_uri") != Some(&grant.redirect_uri) {
            return entra_error(
                400,
                "invalid_grant",
                50148,
                "The redirect_uri does not match the one the code was issued to.",
            );
        }
        let computed = URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, verifier.as_bytes()));
        if computed != grant.challenge {
            return entra_error(
                400,
                "invalid_grant",
                501481,
                "The Code_Verifier does not match the code_challenge supplied in the authorization request.",
            );
        }
        self.delegated_tokens(client_id, &grant.subject, &grant.scope, &grant.scope)
    }

    /// `POST /{tenant}/oauth2/v2.0/devicecode`.
    pub(super) fn device_authorization(
        &self,
        _tenant: &str,
        request: &HttpRequest,
    ) -> HttpResponse {
        if request.method != "POST" {
            return HttpResponse::text(405, "Method Not Allowed");
        }
        let form: HashMap<String, String> = url::form_urlencoded::parse(&request.body)
            .into_owned()
            .collect();
        let (Some(client_id), Some(scope)) = (form.get("client_id"), form.get("scope")) else {
            return missing_parameter("client_id and scope");
        };
        let device_code = random::base64url(48);
        let user_code = user_code();
        let lifetime = self.config.device_code_lifetime;
        let interval = self.config.device_interval;
        let verification_uri = format!("https://{}/devicelogin", self.addr);
        lock(&self.devices).insert(
            device_code.clone(),
            DeviceGrant {
                client_id: client_id.clone(),
                user_code: user_code.clone(),
                scope: scope.clone(),
                expires_at: Instant::now() + lifetime,
                interval,
                last_poll: None,
                outcome: None,
            },
        );
        HttpResponse::json(
            200,
            &json!({
                "device_code": device_code,
                "user_code": user_code,
                "verification_uri": verification_uri,
                "expires_in": lifetime.as_secs(),
                "interval": interval.as_secs(),
                "message": format!("To sign in, use a web browser to open the page {verification_uri} and enter the code {user_code} to authenticate."),
            }),
        )
    }

    /// The device-code grant: pending until the user acts; polling faster than the
    /// interval gets `slow_down`.
    pub(super) fn poll_device(
        &self,
        client_id: &str,
        form: &HashMap<String, String>,
    ) -> HttpResponse {
        let Some(device_code) = form.get("device_code") else {
            return missing_parameter("device_code");
        };
        let now = Instant::now();
        let mut devices = lock(&self.devices);
        let Some(grant) = devices.get_mut(device_code.as_str()) else {
            return entra_error(
                400,
                "bad_verification_code",
                70000,
                "The device code is unknown.",
            );
        };
        if grant.client_id != client_id {
            return entra_error(
                400,
                "invalid_grant",
                70000,
                "Provided grant is invalid or malformed.",
            );
        }
        if now >= grant.expires_at {
            devices.remove(device_code.as_str());
            return entra_error(400, "expired_token", 70019, "Verification code expired.");
        }
        let too_soon = grant
            .last_poll
            .is_some_and(|last| now < last + grant.interval);
        grant.last_poll = Some(now);
        if too_soon {
            return entra_error(
                400,
                "slow_down",
                70016,
                "The client is polling too often; slow down.",
            );
        }
        match grant.outcome.clone() {
            None => entra_error(
                400,
                "authorization_pending",
                70016,
                "OAuth 2.0 device flow error. Authorization is pending. Continue polling.",
            ),
            Some(None) => {
                devices.remove(device_code.as_str());
                entra_error(
                    400,
                    "authorization_declined",
                    70000,
                    "The end user denied the authorization request.",
                )
            }
            Some(Some(subject)) => {
                let scope = grant.scope.clone();
                devices.remove(device_code.as_str());
                drop(devices);
                self.delegated_tokens(client_id, &subject, &scope, &scope)
            }
        }
    }

    pub(super) fn pending_device_codes(&self) -> Vec<String> {
        lock(&self.devices)
            .values()
            .filter(|g| g.outcome.is_none())
            .map(|g| g.user_code.clone())
            .collect()
    }

    /// Approves (`Some(user)`) or declines (`None`) the pending login with `user_code`.
    pub(super) fn settle_device(&self, user_code: &str, subject: Option<&str>) -> bool {
        let mut devices = lock(&self.devices);
        let wanted = user_code.trim().to_ascii_uppercase();
        match devices
            .values_mut()
            .find(|g| g.user_code == wanted && g.outcome.is_none())
        {
            Some(grant) => {
                grant.outcome = Some(subject.map(str::to_string));
                true
            }
            None => false,
        }
    }
}

fn bad_request(message: &str) -> HttpResponse {
    HttpResponse::text(400, &printable(message, 300))
}

/// Nine characters like Entra's, e.g. `FG7K2XQZ9`.
fn user_code() -> String {
    random::bytes(9)
        .iter()
        .map(|b| USER_CODE_ALPHABET[*b as usize % USER_CODE_ALPHABET.len()] as char)
        .collect()
}
