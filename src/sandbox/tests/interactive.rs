//! The sign-in endpoints: device codes (pending, slow_down, approval, decline, expiry) and
//! the authorize endpoint with PKCE (redirect, one redemption, verifier and redirect checks).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::{DELEGATED_SCOPE, TENANT, entra};

const PUBLIC_CLIENT: &str = "99999999-8888-7777-6666-555555555555";
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

async fn device_code(entra: &super::Entra) -> (String, String) {
    let url = entra
        .endpoint
        .token_url(TENANT)
        .replace("/token", "/devicecode");
    let answer = entra
        .send(
            entra
                .http
                .post(url)
                .form(&[("client_id", PUBLIC_CLIENT), ("scope", DELEGATED_SCOPE)]),
        )
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let user_code = body["user_code"].as_str().unwrap().to_string();
    assert_eq!(user_code.len(), 9);
    assert!(body["message"].as_str().unwrap().contains(&user_code));
    assert_eq!(body["interval"], 1);
    (body["device_code"].as_str().unwrap().to_string(), user_code)
}

async fn poll(entra: &super::Entra, device_code: &str) -> super::Answer {
    entra
        .post(&[
            ("grant_type", DEVICE_GRANT),
            ("client_id", PUBLIC_CLIENT),
            ("device_code", device_code),
        ])
        .await
}

#[tokio::test]
async fn device_codes_wait_for_their_user() {
    let entra = entra(|c| c.device_interval = Duration::from_secs(1)).await;
    let (device, user_code) = device_code(&entra).await;
    assert_eq!(
        entra.endpoint.pending_device_codes(),
        vec![user_code.clone()]
    );
    assert_eq!(
        poll(&entra, &device).await.json()["error"],
        "authorization_pending"
    );
    // Polling again at once is too fast.
    assert_eq!(poll(&entra, &device).await.json()["error"], "slow_down");

    assert!(
        entra
            .endpoint
            .approve_device(&user_code.to_lowercase(), "alice@contoso.test")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let answer = poll(&entra, &device).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let issued = entra
        .registry
        .lookup(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject.as_deref(), Some("alice@contoso.test"));
    assert!(
        entra
            .endpoint
            .refresh_token_valid(body["refresh_token"].as_str().unwrap())
    );
    // The code is spent.
    assert_eq!(
        poll(&entra, &device).await.json()["error"],
        "bad_verification_code"
    );

    let (device, user_code) = device_code(&entra).await;
    assert!(entra.endpoint.decline_device(&user_code));
    assert!(
        !entra
            .endpoint
            .approve_device(&user_code, "late@contoso.test")
    );
    assert_eq!(
        poll(&entra, &device).await.json()["error"],
        "authorization_declined"
    );
}

#[tokio::test]
async fn device_codes_expire() {
    let entra = entra(|c| {
        c.device_interval = Duration::from_secs(1);
        c.device_code_lifetime = Duration::from_millis(300);
    })
    .await;
    let (device, _) = device_code(&entra).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(poll(&entra, &device).await.json()["error"], "expired_token");
}

fn authorize_url(entra: &super::Entra, challenge: &str, redirect: &str) -> String {
    let base = entra
        .endpoint
        .token_url(TENANT)
        .replace("/token", "/authorize");
    let mut url = url::Url::parse(&base).unwrap();
    url.query_pairs_mut()
        .append_pair("client_id", PUBLIC_CLIENT)
        .append_pair("response_type", "code")
        .append_pair("redirect_uri", redirect)
        .append_pair("scope", DELEGATED_SCOPE)
        .append_pair("state", "st-1")
        .append_pair("code_challenge", challenge)
        .append_pair("code_challenge_method", "S256")
        .append_pair("login_hint", "bob@contoso.test");
    url.into()
}

/// Plays the browser: GET the authorize URL and read where it redirects.
async fn sign_in(entra: &super::Entra, url: &str) -> url::Url {
    let answer = entra.send(entra.http.get(url)).await;
    assert_eq!(answer.status, 302, "{}", answer.text);
    url::Url::parse(answer.headers["location"].to_str().unwrap()).unwrap()
}

fn param(url: &url::Url, name: &str) -> Option<String> {
    url.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn authorization_codes_need_the_pkce_verifier_and_are_redeemed_once() {
    let entra = entra(|_| {}).await;
    let verifier = "a-verifier-of-at-least-forty-three-characters-0123456789";
    let challenge = URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        verifier.as_bytes(),
    ));
    let redirect = "http://localhost:8400/";
    let exchange = |code: String, verifier: &'static str, redirect: &'static str| {
        let entra = &entra;
        async move {
            entra
                .post(&[
                    ("grant_type", "authorization_code"),
                    ("client_id", PUBLIC_CLIENT),
                    ("code", &code),
                    ("redirect_uri", redirect),
                    ("code_verifier", verifier),
                    ("scope", DELEGATED_SCOPE),
                ])
                .await
        }
    };

    let back = sign_in(&entra, &authorize_url(&entra, &challenge, redirect)).await;
    assert_eq!(
        (back.host_str(), back.port()),
        (Some("localhost"), Some(8400))
    );
    assert_eq!(param(&back, "state").as_deref(), Some("st-1"));
    let code = param(&back, "code").unwrap();
    let answer = exchange(code.clone(), verifier, redirect).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    let issued = entra
        .registry
        .lookup(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject.as_deref(), Some("bob@contoso.test"));
    assert!(body["refresh_token"].as_str().unwrap().starts_with("0.A"));
    assert_eq!(
        exchange(code, verifier, redirect).await.json()["error_codes"][0],
        54005
    );
    assert!(
        entra
            .endpoint
            .requests()
            .iter()
            .all(|r| r.code_verifier_sent)
    );

    let back = sign_in(&entra, &authorize_url(&entra, &challenge, redirect)).await;
    let answer = exchange(
        param(&back, "code").unwrap(),
        "another-verifier-entirely-xxxxxxxxxxxxxxxxxxx",
        redirect,
    )
    .await;
    assert_eq!(answer.json()["error_codes"][0], 501481);
    let back = sign_in(&entra, &authorize_url(&entra, &challenge, redirect)).await;
    let answer = exchange(
        param(&back, "code").unwrap(),
        verifier,
        "http://localhost:9999/",
    )
    .await;
    assert_eq!(answer.json()["error_codes"][0], 50148);

    // Only loopback redirects, only S256.
    let answer = entra
        .send(
            entra
                .http
                .get(authorize_url(&entra, &challenge, "https://evil.example/")),
        )
        .await;
    assert_eq!(answer.status, 400);
    let plain = authorize_url(&entra, &challenge, redirect).replace("S256", "plain");
    assert_eq!(entra.send(entra.http.get(plain)).await.status, 400);

    entra.endpoint.decline_authorizations(true);
    let back = sign_in(&entra, &authorize_url(&entra, &challenge, redirect)).await;
    assert_eq!(param(&back, "error").as_deref(), Some("access_denied"));
    assert_eq!(param(&back, "state").as_deref(), Some("st-1"));
    assert!(param(&back, "code").is_none());
}
