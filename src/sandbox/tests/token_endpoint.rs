//! The token endpoint against a reqwest client: grants, client authentication, rotation,
//! errors in Entra's shape and scripted failures.

use std::time::Duration;

use super::{APP_SCOPE, CLIENT_ID, CLIENT_SECRET, DELEGATED_SCOPE, TENANT, entra};
use crate::sandbox::TokenFailure;

const USER: &str = "alice@sandbox.onmicrosoft.test";

fn assert_entra_error(answer: &super::Answer, status: u16, error: &str, code: u64) {
    assert_eq!(answer.status, status, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["error"], error);
    assert_eq!(body["error_codes"], serde_json::json!([code]));
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.starts_with(&format!("AADSTS{code}: ")),
        "{description}"
    );
    let trace_id = body["trace_id"].as_str().unwrap();
    let correlation_id = body["correlation_id"].as_str().unwrap();
    assert_eq!(trace_id.len(), 36);
    assert!(description.contains(&format!("Trace ID: {trace_id}")));
    assert!(description.contains(&format!("Correlation ID: {correlation_id}")));
    let timestamp = body["timestamp"].as_str().unwrap();
    assert!(
        timestamp.ends_with('Z') && timestamp.len() == 20,
        "{timestamp}"
    );
    assert!(description.ends_with(&format!("Timestamp: {timestamp}")));
}

#[tokio::test]
async fn client_credentials_with_secret_in_body() {
    let entra = entra(|_| {}).await;
    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", APP_SCOPE),
        ])
        .await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(
        answer.headers["content-type"],
        "application/json; charset=utf-8"
    );
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["ext_expires_in"], 3599);
    assert!(body.get("refresh_token").is_none());
    let token = body["access_token"].as_str().unwrap();
    assert!((1_750..=2_250).contains(&token.len()), "{}", token.len());
    assert_eq!(token.split('.').count(), 3);

    let issued = entra.registry.lookup(token).expect("registered");
    assert_eq!(issued.subject, None);
    assert_eq!(issued.client_id, CLIENT_ID);
    assert_eq!(issued.scope, APP_SCOPE);

    let requests = entra.endpoint.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.tenant, TENANT);
    assert_eq!(request.grant_type.as_deref(), Some("client_credentials"));
    assert_eq!(request.client_id.as_deref(), Some(CLIENT_ID));
    assert_eq!(request.scope.as_deref(), Some(APP_SCOPE));
    assert!(request.secret_sent && !request.basic_auth);
    assert_eq!(request.status, 200);
    assert!(!format!("{requests:?}").contains(CLIENT_SECRET));
}

#[tokio::test]
async fn client_credentials_with_basic_header() {
    let entra = entra(|_| {}).await;
    // reqwest does not form-encode Basic credentials, so this also covers the raw spelling.
    let request = entra
        .http
        .post(entra.endpoint.token_url(TENANT))
        .basic_auth(CLIENT_ID, Some(CLIENT_SECRET))
        .form(&[("grant_type", "client_credentials"), ("scope", APP_SCOPE)]);
    let answer = entra.send(request).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let request = &entra.endpoint.requests()[0];
    assert!(request.basic_auth && request.secret_sent);
    assert_eq!(request.client_id.as_deref(), Some(CLIENT_ID));

    // The RFC 6749 spelling, form-encoded before base64, is accepted as well.
    let encoded: String = url::form_urlencoded::byte_serialize(CLIENT_SECRET.as_bytes()).collect();
    let request = entra
        .http
        .post(entra.endpoint.token_url(TENANT))
        .basic_auth(CLIENT_ID, Some(encoded))
        .form(&[("grant_type", "client_credentials"), ("scope", APP_SCOPE)]);
    assert_eq!(entra.send(request).await.status, 200);
}

#[tokio::test]
async fn wrong_secret_is_invalid_client() {
    let entra = entra(|_| {}).await;
    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", "sbx8Q~wrong"),
            ("scope", APP_SCOPE),
        ])
        .await;
    assert_entra_error(&answer, 401, "invalid_client", 7000215);
    assert!(!answer.text.contains("sbx8Q~wrong"));

    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("scope", APP_SCOPE),
        ])
        .await;
    assert_entra_error(&answer, 401, "invalid_client", 7000218);

    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", "unknown-app"),
            ("client_secret", CLIENT_SECRET),
            ("scope", APP_SCOPE),
        ])
        .await;
    assert_entra_error(&answer, 400, "unauthorized_client", 700016);
    assert_eq!(entra.endpoint.request_count(), 3);
    assert!(entra.registry.is_empty());
}

#[tokio::test]
async fn missing_or_bad_scope() {
    let entra = entra(|_| {}).await;
    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
        ])
        .await;
    assert_entra_error(&answer, 400, "invalid_request", 900144);
    assert!(
        answer.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("'scope'")
    );

    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", "https://outlook.office.com/SMTP.Send"),
        ])
        .await;
    assert_entra_error(&answer, 400, "invalid_scope", 1002012);

    let refresh_token = entra
        .endpoint
        .issue_refresh_token(CLIENT_ID, USER, DELEGATED_SCOPE);
    let answer = entra
        .post(&[
            ("grant_type", "refresh_token"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("refresh_token", &refresh_token),
        ])
        .await;
    assert_entra_error(&answer, 400, "invalid_request", 900144);
}

#[tokio::test]
async fn refresh_rotates_and_old_token_dies_after_grace() {
    let grace = Duration::from_millis(300);
    let entra = entra(|c| c.used_refresh_token_grace = grace).await;
    let first = entra
        .endpoint
        .issue_refresh_token(CLIENT_ID, USER, DELEGATED_SCOPE);
    assert!(
        first.starts_with("0.A") && (750..=850).contains(&first.len()),
        "{}",
        first.len()
    );

    let refresh = |token: String| {
        let entra = &entra;
        async move {
            entra
                .post(&[
                    ("grant_type", "refresh_token"),
                    ("client_id", CLIENT_ID),
                    ("client_secret", CLIENT_SECRET),
                    ("refresh_token", &token),
                    ("scope", DELEGATED_SCOPE),
                ])
                .await
        }
    };

    let answer = refresh(first.clone()).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "https://outlook.office.com/SMTP.Send");
    assert_eq!(body["expires_in"], 3599);
    let second = body["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    let issued = entra
        .registry
        .lookup(body["access_token"].as_str().unwrap())
        .unwrap();
    assert_eq!(issued.subject.as_deref(), Some(USER));

    // Within the grace period the used token still works (a crash before saving the new
    // one must be survivable), and it does not restart its own clock.
    assert_eq!(refresh(first.clone()).await.status, 200);
    tokio::time::sleep(grace + Duration::from_millis(100)).await;
    assert_entra_error(&refresh(first).await, 400, "invalid_grant", 70008);

    // The rotated token is fresh.
    let answer = refresh(second).await;
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert!(answer.json()["refresh_token"].is_string());
}

#[tokio::test]
async fn refresh_without_rotation_keeps_the_token() {
    let entra = entra(|c| {
        c.rotate_refresh_tokens = false;
        c.used_refresh_token_grace = Duration::ZERO;
    })
    .await;
    let token = entra
        .endpoint
        .issue_refresh_token(CLIENT_ID, USER, DELEGATED_SCOPE);
    for _ in 0..2 {
        let answer = entra
            .post(&[
                ("grant_type", "refresh_token"),
                ("client_id", CLIENT_ID),
                ("client_secret", CLIENT_SECRET),
                ("refresh_token", &token),
                ("scope", DELEGATED_SCOPE),
            ])
            .await;
        assert_eq!(answer.status, 200, "{}", answer.text);
        assert!(answer.json().get("refresh_token").is_none());
    }
}

#[tokio::test]
async fn refresh_client_rules() {
    let entra = entra(|_| {}).await;
    const PUBLIC: &str = "99999999-8888-7777-6666-555555555555";
    let public_token = entra
        .endpoint
        .issue_refresh_token(PUBLIC, USER, DELEGATED_SCOPE);

    // A public client needs no secret for its own token...
    let form = |client: &'static str, token: &str| {
        vec![
            ("grant_type", "refresh_token".to_string()),
            ("client_id", client.to_string()),
            ("refresh_token", token.to_string()),
            ("scope", DELEGATED_SCOPE.to_string()),
        ]
    };
    let post = |fields: Vec<(&'static str, String)>| {
        let entra = &entra;
        async move {
            let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            entra.post(&pairs).await
        }
    };
    assert_eq!(post(form(PUBLIC, &public_token)).await.status, 200);
    // ...but must not present one.
    let mut with_secret = form(PUBLIC, &public_token);
    with_secret.push(("client_secret", "x".to_string()));
    assert_entra_error(&post(with_secret).await, 401, "invalid_client", 700025);
    // A confidential client must authenticate.
    let confidential_token = entra
        .endpoint
        .issue_refresh_token(CLIENT_ID, USER, DELEGATED_SCOPE);
    assert_entra_error(
        &post(form(CLIENT_ID, &confidential_token)).await,
        401,
        "invalid_client",
        7000218,
    );
    // A token belongs to the client it was issued to.
    let mut other = form(CLIENT_ID, &public_token);
    other.push(("client_secret", CLIENT_SECRET.to_string()));
    assert_entra_error(&post(other).await, 400, "invalid_grant", 70000);
    // Unknown and revoked tokens are expired grants.
    assert_entra_error(
        &post(form(PUBLIC, "0.Aunknown")).await,
        400,
        "invalid_grant",
        70008,
    );
    assert!(entra.endpoint.revoke_refresh_token(&public_token));
    assert_entra_error(
        &post(form(PUBLIC, &public_token)).await,
        400,
        "invalid_grant",
        70008,
    );
}

#[tokio::test]
async fn unsupported_grant_and_bad_requests() {
    let entra = entra(|_| {}).await;
    let answer = entra
        .post(&[("grant_type", "password"), ("client_id", CLIENT_ID)])
        .await;
    assert_entra_error(&answer, 400, "unsupported_grant_type", 70003);

    let answer = entra.post(&[("client_id", CLIENT_ID)]).await;
    assert_entra_error(&answer, 400, "invalid_request", 900144);

    let answer = entra
        .send(entra.http.get(entra.endpoint.token_url(TENANT)))
        .await;
    assert_entra_error(&answer, 400, "invalid_request", 900561);

    let answer = entra
        .send(
            entra
                .http
                .post(format!("{}/other", entra.endpoint.authority_url())),
        )
        .await;
    assert_eq!(answer.status, 404);

    // App-only grants need a tenant-specific authority.
    let answer = entra
        .send(entra.http.post(entra.endpoint.token_url("common")).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", APP_SCOPE),
        ]))
        .await;
    assert_entra_error(&answer, 400, "invalid_request", 9001023);
    // GET and 404 are not token POSTs.
    assert_eq!(entra.endpoint.request_count(), 3);
}

#[tokio::test]
async fn scripted_failures_then_normal_service() {
    let entra = entra(|_| {}).await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", CLIENT_ID),
        ("client_secret", CLIENT_SECRET),
        ("scope", APP_SCOPE),
    ];
    entra.endpoint.fail_next(2, TokenFailure::Status500);
    entra.endpoint.fail_next(
        1,
        TokenFailure::TooManyRequests {
            retry_after_secs: 7,
        },
    );
    entra.endpoint.fail_next(1, TokenFailure::Garbage);
    entra.endpoint.fail_next(1, TokenFailure::InvalidGrant);
    entra
        .endpoint
        .fail_next(1, TokenFailure::TemporarilyUnavailable);

    for _ in 0..2 {
        let answer = entra.post(&form).await;
        assert_entra_error(&answer, 500, "server_error", 50000);
    }
    let answer = entra.post(&form).await;
    assert_entra_error(&answer, 429, "temporarily_unavailable", 90055);
    assert_eq!(answer.headers["retry-after"], "7");

    let answer = entra.post(&form).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["content-type"], "text/html");
    assert_eq!(answer.text, "<html>oops");

    assert_entra_error(&entra.post(&form).await, 400, "invalid_grant", 70008);
    assert_entra_error(
        &entra.post(&form).await,
        503,
        "temporarily_unavailable",
        90033,
    );

    let answer = entra.post(&form).await;
    assert_eq!(answer.status, 200);
    assert!(answer.json()["access_token"].is_string());
    assert_eq!(entra.endpoint.request_count(), 7);
    let statuses: Vec<u16> = entra.endpoint.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [500, 500, 429, 200, 400, 503, 200]);
    // Only the last request minted a token.
    assert_eq!(entra.registry.len(), 1);
}

#[tokio::test]
async fn delay_slows_answers() {
    let entra = entra(|_| {}).await;
    entra.endpoint.set_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let answer = entra
        .post(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", CLIENT_SECRET),
            ("scope", APP_SCOPE),
        ])
        .await;
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn malformed_http_gets_an_error_and_the_server_lives_on() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let ca = crate::sandbox::SandboxCa::generate().unwrap();
    let tls = ca.server_config(&["localhost"]).unwrap();
    let registry = std::sync::Arc::new(crate::sandbox::TokenRegistry::new());
    let endpoint = crate::sandbox::TokenEndpoint::start(tls, registry, Default::default())
        .await
        .unwrap();

    let cases: [(&[u8], &str); 3] = [
        (b"NONSENSE\r\n\r\n", "HTTP/1.1 400 "),
        (
            b"POST /t/oauth2/v2.0/token HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            "HTTP/1.1 413 ",
        ),
        (
            b"POST /t/oauth2/v2.0/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 411 ",
        ),
    ];
    for (raw, want) in cases {
        let tcp = tokio::net::TcpStream::connect(endpoint.addr())
            .await
            .unwrap();
        let mut tls = super::tls_connect(tcp, &ca).await;
        tls.write_all(raw).await.unwrap();
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply).await;
        assert!(String::from_utf8_lossy(&reply).starts_with(want), "{want}");
    }

    // A client that waits for 100 Continue is told to go on.
    let tcp = tokio::net::TcpStream::connect(endpoint.addr())
        .await
        .unwrap();
    let mut tls = super::tls_connect(tcp, &ca).await;
    tls.write_all(
        b"POST /t/oauth2/v2.0/token HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await
    .unwrap();
    let mut interim = [0u8; 25];
    tls.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    tls.write_all(b"x=1&y").await.unwrap();
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    assert!(String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400 "));

    // Raw bytes that are not TLS at all just end the connection.
    let mut tcp = tokio::net::TcpStream::connect(endpoint.addr())
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tcp.read_to_end(&mut sink).await;
    assert_eq!(endpoint.request_count(), 1);
}
