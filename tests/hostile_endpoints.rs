//! Token and device-authorization answers no sane provider sends, from a fake endpoint on
//! loopback that answers whatever the test scripts: lifetimes and intervals beyond any
//! clock, bodies that never end. The bridge must take them as a bounded token, a failed
//! login or an unreadable answer, never a panic; and a token file an earlier release wrote
//! after such an answer must not stop the bridge from starting.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_bridge::config::Config;
use smtp_oauth_bridge::oauth::TokenManager;
use smtp_oauth_bridge::oauth::endpoint::{EndpointError, Http};
use smtp_oauth_bridge::oauth::grants::HttpTokenSource;
use smtp_oauth_bridge::oauth::login::{self, LoginError, Method, Request};
use smtp_oauth_bridge::store::{Store, TokenRecord, unix_now};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DAY: u64 = 24 * 3600;
/// `expires_in` and `interval` values past what a clock can add.
const ABSURD: [&str; 3] = [
    "18446744073709551615",
    "\"18446744073709551615\"",
    "9223372036854775807",
];

/// What the fake answers on one path.
#[derive(Clone)]
enum Answer {
    Json(u16, String),
    /// A chunked 200 whose body is `prefix` and then spaces, up to 64 MiB.
    Endless(String),
}

/// An HTTP endpoint on loopback answering each path with its scripted answer.
struct Fake {
    addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    requests: Arc<AtomicU64>,
    /// Body bytes of `Endless` answers the client took.
    streamed: Arc<AtomicU64>,
}

impl Fake {
    async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            addr: listener.local_addr().unwrap(),
            answers: Arc::default(),
            requests: Arc::default(),
            streamed: Arc::default(),
        };
        let (answers, requests, streamed) = (
            fake.answers.clone(),
            fake.requests.clone(),
            fake.streamed.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                requests.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, answers.clone(), streamed.clone()));
            }
        });
        fake
    }

    fn answer(&self, path: &str, answer: Answer) {
        self.answers.lock().unwrap().insert(path.into(), answer);
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

async fn serve(
    mut stream: TcpStream,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    streamed: Arc<AtomicU64>,
) {
    // The request: head, then a form body of Content-Length bytes.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    let answer = answers.lock().unwrap().get(&path).cloned();
    match answer {
        None => {
            let _ = stream
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
        }
        Some(Answer::Json(status, body)) => {
            let text = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(text.as_bytes()).await;
        }
        Some(Answer::Endless(prefix)) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut piece = format!("{:x}\r\n{prefix}\r\n", prefix.len()).into_bytes();
            let spaces = [b' '; 64 * 1024];
            for _ in 0..1024 {
                if stream.write_all(&piece).await.is_err() {
                    return;
                }
                streamed.fetch_add(piece.len() as u64, Ordering::SeqCst);
                piece = format!("{:x}\r\n", spaces.len()).into_bytes();
                piece.extend_from_slice(&spaces);
                piece.extend_from_slice(b"\r\n");
            }
            let _ = stream.write_all(b"1\r\n}\r\n0\r\n\r\n").await;
        }
    }
    let _ = stream.shutdown().await;
}

fn http() -> Http {
    let tls = smtp_oauth_bridge::tls::client_config(None, Vec::new()).unwrap();
    Http::new(&tls, Duration::from_secs(20)).unwrap()
}

/// One account, its own identity of `flow`, talking to `fake`.
fn config(fake: &Fake, flow: &str) -> Config {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| smtp_oauth_bridge::users::hash_password("pw").unwrap());
    let credential = match flow {
        "client_credentials" => "client_secret = \"s\"\n".to_string(),
        _ => format!("device_code_url = \"{}\"\n", fake.url("/device")),
    };
    Config::from_toml_str(&format!(
        "[[accounts]]\nname = \"printer\"\nusername = \"p@example.test\"\n\
         password_hash = \"{hash}\"\nprovider = \"generic\"\nflow = \"{flow}\"\n\
         client_id = \"app\"\n{credential}token_url = \"{}\"\nscopes = [\"smtp\"]\n\
         upstream = \"smtp.example.test:587\"\n",
        fake.url("/token")
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

fn manager(config: &Config, store: Option<Arc<Store>>) -> TokenManager {
    TokenManager::new(
        &config.identities,
        &config.accounts,
        Arc::new(HttpTokenSource::new(http())),
        store,
        config.tokens.clone(),
    )
}

fn token_answer(expires_in: &str) -> Answer {
    Answer::Json(
        200,
        format!(
            r#"{{"access_token":"at-1","token_type":"Bearer","expires_in":{expires_in},"refresh_token":"rt-1"}}"#
        ),
    )
}

fn request() -> Request<'static> {
    Request {
        method: Method::Device,
        timeout: Duration::from_secs(60),
        pasted: None,
        login_hint: None,
    }
}

#[tokio::test]
async fn an_endless_expires_in_gives_a_token_held_for_a_day_at_most() {
    let odd = ["1e30", "-5", "null", "\"soon\""];
    for expires_in in ABSURD.iter().chain(&odd) {
        let fake = Fake::start().await;
        fake.answer("/token", token_answer(expires_in));
        let config = config(&fake, "client_credentials");

        // The daemon: a session asks for the token; it is used, and replaced within a day.
        let tokens = manager(&config, None);
        let token = tokens
            .token("printer")
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires_in}: {e}"));
        assert_eq!(token.secret.expose_secret(), "at-1");
        let left = token.expires_at - tokio::time::Instant::now();
        assert!(left <= Duration::from_secs(DAY), "{expires_in}: {left:?}");
        let expires = tokens.status()[0].access_token_expires.unwrap();
        assert!(expires <= unix_now() + DAY, "{expires_in}: {expires}");

        // `login` of an app-only identity caches the token it checked.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut out = Vec::new();
        login::login(&config.identities[0], &http(), &store, request(), &mut out)
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires_in}: {e}"));
        let record = store.load("printer").unwrap().unwrap();
        let expires = record.access_token_expires.unwrap();
        assert!(expires <= unix_now() + DAY, "{expires_in}: {expires}");
    }
}

#[tokio::test]
async fn a_token_file_with_an_endless_expiry_still_lets_the_bridge_start() {
    // What an earlier release stored after an endpoint promised a token for ever.
    let fake = Fake::start().await;
    let config = config(&fake, "client_credentials");
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = TokenRecord {
        access_token: Some(SecretString::from("at-cached".to_string())),
        access_token_expires: Some(u64::MAX),
        last_refresh: Some(unix_now()),
        ..TokenRecord::default()
    };
    store.save("printer", &record).unwrap();

    let tokens = manager(&config, Some(Arc::new(store)));
    let token = tokens.token("printer").await.unwrap();
    assert_eq!(token.secret.expose_secret(), "at-cached");
    let left = token.expires_at - tokio::time::Instant::now();
    assert!(left <= Duration::from_secs(DAY), "{left:?}");
    assert_eq!(
        fake.requests.load(Ordering::SeqCst),
        0,
        "the cached token is used"
    );
}

#[tokio::test]
async fn a_device_code_valid_for_ever_still_signs_in() {
    for expires_in in ABSURD {
        let fake = Fake::start().await;
        fake.answer(
            "/device",
            Answer::Json(
                200,
                format!(
                    r#"{{"device_code":"dc","user_code":"ABC","verification_uri":"https://example.test/device","expires_in":{expires_in},"interval":1}}"#
                ),
            ),
        );
        fake.answer("/token", token_answer("3600"));
        let config = config(&fake, "refresh_token");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut out = Vec::new();
        login::login(&config.identities[0], &http(), &store, request(), &mut out)
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires_in}: {e}"));
        let shown = String::from_utf8_lossy(&out);
        assert!(shown.contains("valid for 1d 0h"), "{shown}");
        let record = store.load("printer").unwrap().unwrap();
        assert_eq!(record.refresh_token.unwrap().expose_secret(), "rt-1");
    }
}

#[tokio::test]
async fn an_endless_polling_interval_ends_with_the_code_expired() {
    // The poll answers that make the interval grow: slow_down, and a server error.
    let slow_down = Answer::Json(400, r#"{"error":"slow_down"}"#.into());
    let failure = Answer::Json(500, r#"{"error":"server_error"}"#.into());
    for (interval, poll) in [
        (ABSURD[0], &slow_down),
        (ABSURD[1], &failure),
        (ABSURD[2], &failure),
    ] {
        let fake = Fake::start().await;
        fake.answer(
            "/device",
            Answer::Json(
                200,
                format!(
                    r#"{{"device_code":"dc","user_code":"ABC","verification_uri":"https://example.test/device","expires_in":2,"interval":{interval}}}"#
                ),
            ),
        );
        fake.answer("/token", poll.clone());
        let config = config(&fake, "refresh_token");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut out = Vec::new();
        let result =
            login::login(&config.identities[0], &http(), &store, request(), &mut out).await;
        assert!(
            matches!(result, Err(LoginError::Expired)),
            "interval {interval}: {result:?}"
        );
        assert!(store.load("printer").unwrap().is_none(), "nothing stored");
    }
}

#[tokio::test]
async fn a_token_answer_that_never_ends_is_refused_after_256_kib() {
    let fake = Fake::start().await;
    fake.answer(
        "/token",
        Answer::Endless(r#"{"access_token":"at-1","expires_in":3600"#.into()),
    );
    let form = [("grant_type", "client_credentials")];
    let result = http().token(&fake.url("/token"), &form).await;
    match result {
        Err(EndpointError::Unreadable { status: 200, len }) => assert!(len >= 256 * 1024),
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a 64 MiB answer was read whole and taken"),
    }
    // Kernel buffers hold a few megabytes; the rest is never sent.
    let streamed = fake.streamed.load(Ordering::SeqCst);
    assert!(streamed < 16 << 20, "{streamed} bytes taken");
}
