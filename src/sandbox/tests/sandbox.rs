//! `Sandbox::start` as the product's sandbox mode uses it: a token from the endpoint,
//! accepted by the Office365 stand-in, and the message written to the mail folder.

use std::path::PathBuf;

use super::{SmtpClient, client_config, xoauth2};
use crate::sandbox::Sandbox;

const USER: &str = "printer@sandbox.onmicrosoft.test";

fn scratch_dir() -> PathBuf {
    std::env::temp_dir().join(format!("sandbox-test-{}", crate::sandbox::random::hex(8)))
}

#[tokio::test]
async fn end_to_end_with_mail_dir() {
    let dir = scratch_dir();
    let mail_dir = dir.join("nested").join("mail");
    let sandbox = Sandbox::start(Some(mail_dir.clone())).await.unwrap();
    assert!(!format!("{sandbox:?}").contains(&sandbox.client_secret));
    assert_eq!(sandbox.client_secret.len(), 40);

    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(client_config(&sandbox.ca))
        .build()
        .unwrap();
    let body: serde_json::Value = http
        .post(sandbox.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", sandbox.client_id.as_str()),
            ("client_secret", sandbox.client_secret.as_str()),
            ("scope", "https://outlook.office365.com/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = body["access_token"].as_str().unwrap();

    let mut plain = SmtpClient::connect(sandbox.office365.addr()).await;
    plain.read_reply().await;
    plain.command("EHLO printer").await;
    plain.command("STARTTLS").await;
    let mut tls = plain.starttls(&sandbox.ca).await;
    tls.command("EHLO printer").await;
    tls.command("AUTH XOAUTH2").await;
    assert!(tls.command(&xoauth2(USER, token)).await.starts_with("235 "));
    tls.command(&format!("MAIL FROM:<{USER}>")).await;
    tls.command("RCPT TO:<desk@example.test>").await;
    tls.command("DATA").await;
    assert!(
        tls.command("Subject: scan\r\n\r\n..page 1\r\n.")
            .await
            .starts_with("250 ")
    );

    let message = &sandbox.office365.messages()[0];
    let mut names: Vec<String> = std::fs::read_dir(&mail_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names[0].ends_with(&format!("-{}.eml", message.queue_id)));
    assert_eq!(names[1], names[0].replace(".eml", ".json"));
    assert_eq!(
        std::fs::read(mail_dir.join(&names[0])).unwrap(),
        b"Subject: scan\r\n\r\n.page 1\r\n"
    );
    let envelope: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mail_dir.join(&names[1])).unwrap()).unwrap();
    assert_eq!(envelope["mail_from"], USER);
    assert_eq!(
        envelope["rcpt_to"],
        serde_json::json!(["desk@example.test"])
    );
    assert_eq!(envelope["auth_user"], USER);
    assert_eq!(envelope["mail_params"], "");
    assert_eq!(envelope["size"], 26);
    assert!(envelope["received_at"].as_str().unwrap().ends_with('Z'));

    std::fs::remove_dir_all(&dir).unwrap();
}
