//! The refresh logic on tokio's paused clock, against a scripted token source (no sockets):
//! days of schedule run in milliseconds, and every wait a session sees is measured exactly.
//!
//! Stories: tokens are refreshed ahead of expiry without anyone asking; sessions never wait
//! while a valid token exists and wait at most `session_wait` otherwise; one request per
//! identity however many sessions ask; idle refresh tokens are redeemed anyway (keep-alive);
//! transient failures back off with jitter and keep the token; a 429 waits its Retry-After;
//! a refused grant stops the requests until `login` writes a new one; a refused access token
//! is replaced once; a restarted manager uses the token it cached on disk; a refresh goes to
//! the endpoint that issued the grant.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use smtp_oauth_bridge::config::{Config, Identity, TokenSettings};
use smtp_oauth_bridge::oauth::grants::BoxFuture;
use smtp_oauth_bridge::oauth::{Grant, Granted, State, TokenError, TokenManager, TokenSource};
use smtp_oauth_bridge::store::{Store, TokenRecord, unix_now};
use tokio::time::{Instant, sleep};

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

/// One scripted answer: after `delay`, a token of `lifetime` (rotating the refresh token),
/// or an error.
#[derive(Clone)]
struct Step {
    delay: Duration,
    outcome: Result<Duration, TokenError>,
}

fn ok(lifetime: Duration) -> Step {
    Step {
        delay: Duration::ZERO,
        outcome: Ok(lifetime),
    }
}

fn slow(delay: Duration, lifetime: Duration) -> Step {
    Step {
        delay,
        outcome: Ok(lifetime),
    }
}

fn fail(error: TokenError) -> Step {
    Step {
        delay: Duration::ZERO,
        outcome: Err(error),
    }
}

fn transient() -> TokenError {
    TokenError::Transient {
        reason: "HTTP 503: temporarily_unavailable".into(),
        retry_after: None,
    }
}

fn throttled(after: Duration) -> TokenError {
    TokenError::Transient {
        reason: "throttled (HTTP 429)".into(),
        retry_after: Some(after),
    }
}

fn refused() -> TokenError {
    TokenError::NeedsLogin {
        reason: "invalid_grant: AADSTS70008: expired".into(),
        code: Some("invalid_grant".into()),
        aadsts: Some(70008),
        hint: "run `smtp-oauth-bridge login printer` to sign in again".into(),
    }
}

/// Answers from a script, then (when it runs out) with `fallback`; records each call.
struct Script {
    steps: Mutex<VecDeque<Step>>,
    fallback: Step,
    calls: Mutex<Vec<Call>>,
    issued: AtomicU64,
}

#[derive(Clone, Debug)]
struct Call {
    at: Instant,
    refresh_token: Option<String>,
    /// Where a refresh was sent.
    token_url: Option<String>,
}

impl Script {
    fn new(steps: Vec<Step>, fallback: Step) -> Arc<Script> {
        Arc::new(Script {
            steps: Mutex::new(steps.into()),
            fallback,
            calls: Mutex::new(Vec::new()),
            issued: AtomicU64::new(0),
        })
    }

    fn push(&self, step: Step) {
        self.steps.lock().unwrap().push_back(step);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl TokenSource for Script {
    fn request<'a>(
        &'a self,
        _identity: &'a Identity,
        grant: Grant<'a>,
    ) -> BoxFuture<'a, Result<Granted, TokenError>> {
        let step = self
            .steps
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.fallback.clone());
        let (refresh_token, token_url) = match grant {
            Grant::Refresh {
                refresh_token,
                token_url,
            } => (
                Some(refresh_token.expose_secret().to_owned()),
                Some(token_url.to_owned()),
            ),
            Grant::ClientCredentials => (None, None),
        };
        self.calls.lock().unwrap().push(Call {
            at: Instant::now(),
            refresh_token: refresh_token.clone(),
            token_url,
        });
        Box::pin(async move {
            sleep(step.delay).await;
            let lifetime = step.outcome?;
            let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(Granted {
                access_token: SecretString::from(format!("at-{n}")),
                lifetime,
                refresh_token: refresh_token.map(|_| SecretString::from(format!("rt-{n}"))),
            })
        })
    }
}

fn identity(flow: &str) -> Arc<Identity> {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let hash = HASH.get_or_init(|| smtp_oauth_bridge::users::hash_password("pw").unwrap());
    let config = Config::from_toml_str(&format!(
        "[[accounts]]\nname = \"printer\"\nusername = \"p@sandbox.test\"\n\
         password_hash = \"{hash}\"\nprovider = \"generic\"\nflow = \"{flow}\"\nclient_id = \"app\"\n\
         client_secret = \"s\"\ntoken_url = \"https://login.example.test/t/oauth2/v2.0/token\"\n\
         scopes = [\"smtp\"]\nupstream = \"smtp.example.test:587\"\n"
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    Arc::clone(&config.identities[0])
}

fn settings(prefetch: bool) -> TokenSettings {
    TokenSettings {
        refresh_margin: Duration::from_secs(15 * 60),
        keepalive: DAY,
        session_wait: Duration::from_secs(2),
        prefetch,
        backoff_max: Duration::from_secs(60),
        notify_command: None,
    }
}

fn manager(
    flow: &str,
    script: &Arc<Script>,
    store: Option<Arc<Store>>,
    prefetch: bool,
) -> TokenManager {
    TokenManager::new(
        &[identity(flow)],
        &[],
        Arc::clone(script) as Arc<dyn TokenSource>,
        store,
        settings(prefetch),
    )
}

/// A store holding a refresh token for "printer", as `login` leaves it.
fn store_with_grant(dir: &tempfile::TempDir) -> Arc<Store> {
    let store = Store::open(dir.path()).unwrap();
    store
        .save_grant("printer", &SecretString::from("rt-login".to_string()), None)
        .unwrap();
    Arc::new(store)
}

/// Lets spawned tasks run without moving the clock.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

fn secret(t: &smtp_oauth_bridge::oauth::AccessToken) -> &str {
    t.secret.expose_secret()
}

fn state(tokens: &TokenManager) -> State {
    tokens.status()[0].state
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_of_expiry_and_sessions_never_wait_for_it() {
    let script = Script::new(vec![], ok(HOUR));
    let tokens = manager("client_credentials", &script, None, true);
    settle().await;
    assert_eq!(script.calls().len(), 1, "prefetched at start");
    let start = script.calls()[0].at;

    sleep(Duration::from_secs(2000)).await;
    let asked = Instant::now();
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-1");
    assert_eq!(Instant::now(), asked, "a cached token costs no wait");
    assert_eq!(script.calls().len(), 1);

    // Fifteen minutes before expiry, counted from expires_in at receipt.
    sleep(Duration::from_secs(3000) - Duration::from_secs(2000)).await;
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].at - start, HOUR - Duration::from_secs(15 * 60));
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-2");

    // And so on, every 45 minutes, with no session at all.
    sleep(3 * HOUR).await;
    assert_eq!(script.calls().len(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_slow_refresh_never_holds_a_session_that_has_a_valid_token() {
    let script = Script::new(
        vec![ok(HOUR), slow(Duration::from_secs(30), HOUR)],
        ok(HOUR),
    );
    let tokens = manager("client_credentials", &script, None, true);
    settle().await;
    sleep(HOUR - Duration::from_secs(15 * 60) + Duration::from_secs(5)).await;
    assert_eq!(state(&tokens), State::Refreshing);
    let asked = Instant::now();
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-1");
    assert_eq!(Instant::now(), asked);
    sleep(Duration::from_secs(30)).await;
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-2");
    assert_eq!(state(&tokens), State::Ok);
}

#[tokio::test(start_paused = true)]
async fn one_request_for_many_sessions_and_no_session_waits_more_than_two_seconds() {
    let script = Script::new(vec![slow(Duration::from_secs(10), HOUR)], ok(HOUR));
    let tokens = Arc::new(manager("client_credentials", &script, None, false));
    let asked = Instant::now();
    let mut sessions = Vec::new();
    for _ in 0..50 {
        let tokens = Arc::clone(&tokens);
        sessions.push(tokio::spawn(async move { tokens.token("printer").await }));
    }
    for session in sessions {
        let answer = session.await.unwrap();
        assert!(
            matches!(answer, Err(TokenError::Transient { .. })),
            "{answer:?}"
        );
    }
    assert_eq!(
        Instant::now() - asked,
        Duration::from_secs(2),
        "bounded wait"
    );
    assert_eq!(script.calls().len(), 1, "single flight");

    // The request went on without them; the next session finds its token at once.
    sleep(Duration::from_secs(8)).await;
    let asked = Instant::now();
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-1");
    assert_eq!(Instant::now(), asked);
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_idle_refresh_token_is_redeemed_before_it_can_expire() {
    // A provider with long access tokens: only the keep-alive makes the bridge redeem the
    // refresh token within a day.
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_grant(&dir);
    let script = Script::new(vec![], ok(3 * DAY));
    let _tokens = manager("refresh_token", &script, Some(Arc::clone(&store)), false);
    settle().await;
    let start = Instant::now();
    // The store keeps the last use in whole seconds of wall clock, which may have ticked
    // between saving the grant and loading it: the redemption may come up to a second early.
    sleep(DAY - Duration::from_secs(2)).await;
    assert!(script.calls().is_empty(), "nothing before a day");
    sleep(Duration::from_secs(3)).await;
    let calls = script.calls();
    assert_eq!(calls.len(), 1);
    let after = calls[0].at - start;
    assert!(
        (DAY - Duration::from_secs(1)..=DAY).contains(&after),
        "redeemed after {after:?}"
    );
    assert_eq!(calls[0].refresh_token.as_deref(), Some("rt-login"));
    sleep(DAY).await;
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[1].refresh_token.as_deref(),
        Some("rt-1"),
        "the rotated one"
    );
    let stored = store.load_refresh_token("printer").unwrap().unwrap();
    assert_eq!(stored.expose_secret(), "rt-2");
}

#[tokio::test(start_paused = true)]
async fn a_refresh_goes_to_the_endpoint_that_issued_the_grant() {
    // A grant from another cloud's authority than the one configured now (the configuration
    // was edited after login): only its issuer honours it.
    let issuer = "https://login.partner.microsoftonline.cn/t/oauth2/v2.0/token";
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .save_grant(
            "printer",
            &SecretString::from("rt-login".to_string()),
            Some(issuer),
        )
        .unwrap();
    let store = Arc::new(store);
    let script = Script::new(vec![], ok(HOUR));
    let _tokens = manager("refresh_token", &script, Some(Arc::clone(&store)), true);
    settle().await;
    sleep(2 * HOUR).await;
    let calls = script.calls();
    assert!(calls.len() >= 3, "{calls:?}");
    for call in &calls {
        assert_eq!(call.token_url.as_deref(), Some(issuer), "{calls:?}");
    }
    let record = store.load("printer").unwrap().unwrap();
    assert_eq!(
        record.authority.as_deref(),
        Some(issuer),
        "kept with the rotated token"
    );

    // A grant stored without its issuer (by an earlier build) goes to the configured endpoint,
    // which is then recorded with the rotated token.
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_grant(&dir);
    let script = Script::new(vec![], ok(HOUR));
    let _tokens = manager("refresh_token", &script, Some(Arc::clone(&store)), true);
    settle().await;
    let configured = "https://login.example.test/t/oauth2/v2.0/token";
    assert_eq!(script.calls()[0].token_url.as_deref(), Some(configured));
    let record = store.load("printer").unwrap().unwrap();
    assert_eq!(record.authority.as_deref(), Some(configured));
}

#[tokio::test(start_paused = true)]
async fn a_restarted_bridge_keeps_the_keepalive_clock_and_the_cached_token() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let now = unix_now();
    store
        .save(
            "printer",
            &TokenRecord {
                refresh_token: Some(SecretString::from("rt-old".to_string())),
                refresh_token_received: Some(now - 12 * 3600),
                refresh_token_used: Some(now - 12 * 3600),
                access_token: Some(SecretString::from("at-cached".to_string())),
                // A day-long token (the longest kept), obtained four hours ago: it outlives
                // the keep-alive.
                access_token_expires: Some(now + 20 * 3600),
                last_refresh: Some(now - 4 * 3600),
                ..TokenRecord::default()
            },
        )
        .unwrap();
    let script = Script::new(vec![], ok(3 * DAY));
    let tokens = manager("refresh_token", &script, Some(Arc::new(store)), true);
    settle().await;
    // Prefetch has nothing to do: the cached token is good.
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-cached");
    assert!(script.calls().is_empty());
    assert_eq!(state(&tokens), State::Ok);
    // Used twelve hours before the restart: redeemed a day after that use (give or take the
    // second the wall clock may have ticked since the record was written).
    sleep(DAY / 2 - Duration::from_secs(2)).await;
    assert!(script.calls().is_empty());
    sleep(Duration::from_secs(3)).await;
    assert_eq!(script.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_with_jitter_and_the_token_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_grant(&dir);
    let script = Script::new(vec![ok(HOUR)], fail(transient()));
    let tokens = manager("refresh_token", &script, Some(Arc::clone(&store)), true);
    settle().await;
    // The refresh at 45 minutes fails, and every retry after it.
    sleep(HOUR - Duration::from_secs(120)).await;
    assert_eq!(state(&tokens), State::BackingOff);
    let status = &tokens.status()[0];
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("temporarily_unavailable")
    );
    assert!(status.retry_at.is_some());
    // Sessions keep using the token while it is valid.
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-1");

    let calls = script.calls();
    let gaps: Vec<Duration> = calls
        .windows(2)
        .skip(1)
        .map(|w| w[1].at - w[0].at)
        .collect();
    assert!(gaps.len() >= 6, "{gaps:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let ceiling = (Duration::from_secs(5) * (1 << i)).min(Duration::from_secs(60));
        assert!(
            *gap >= ceiling / 2 && *gap <= ceiling,
            "retry {i} after {gap:?}, expected within {:?}..{ceiling:?}",
            ceiling / 2
        );
    }
    // The refresh token was never dropped.
    let stored = store.load_refresh_token("printer").unwrap().unwrap();
    assert_eq!(stored.expose_secret(), "rt-1");

    // Once the token has expired, a session hears "try later" within two seconds.
    sleep(Duration::from_secs(180)).await;
    let asked = Instant::now();
    assert!(matches!(
        tokens.token("printer").await,
        Err(TokenError::Transient { .. })
    ));
    assert!(Instant::now() - asked <= Duration::from_secs(2));

    // The endpoint comes back: the next retry recovers.
    script.push(ok(HOUR));
    sleep(Duration::from_secs(61)).await;
    assert_eq!(state(&tokens), State::Ok);
    assert!(tokens.token("printer").await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn throttling_waits_for_retry_after_and_sessions_do_not_pile_on() {
    let script = Script::new(vec![fail(throttled(Duration::from_secs(120)))], ok(HOUR));
    let tokens = manager("client_credentials", &script, None, true);
    settle().await;
    assert_eq!(script.calls().len(), 1);
    for _ in 0..5 {
        let asked = Instant::now();
        match tokens.token("printer").await {
            Err(TokenError::Transient { retry_after, .. }) => assert!(retry_after.is_some()),
            other => panic!("{other:?}"),
        }
        assert_eq!(Instant::now(), asked, "answered at once");
        sleep(Duration::from_secs(10)).await;
    }
    assert_eq!(
        script.calls().len(),
        1,
        "nobody asked during the Retry-After"
    );
    sleep(Duration::from_secs(71)).await;
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].at - calls[0].at, Duration::from_secs(120));
    assert!(tokens.token("printer").await.is_ok());
}

/// Log lines written while it lives, as text.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// Captures this thread's log (the test runtime is single-threaded) at debug level.
    fn capture() -> (Log, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    fn lines_at(&self, level: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(level))
            .map(String::from)
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_refused_grant_stops_all_requests_until_login_stores_a_new_one() {
    let (log, _guard) = Log::capture();
    let dir = tempfile::tempdir().unwrap();
    let store = store_with_grant(&dir);
    let script = Script::new(vec![fail(refused())], ok(HOUR));
    let tokens = manager("refresh_token", &script, Some(Arc::clone(&store)), true);
    settle().await;
    assert_eq!(state(&tokens), State::NeedsLogin);
    let status = &tokens.status()[0];
    assert!(
        status
            .hint
            .as_deref()
            .unwrap()
            .contains("smtp-oauth-bridge login printer")
    );
    for _ in 0..3 {
        let asked = Instant::now();
        match tokens.token("printer").await {
            Err(TokenError::NeedsLogin { aadsts, .. }) => assert_eq!(aadsts, Some(70008)),
            other => panic!("{other:?}"),
        }
        assert_eq!(Instant::now(), asked);
    }
    sleep(7 * DAY).await;
    assert_eq!(script.calls().len(), 1, "no request while refused");
    // The refresh token is still there: refusal is recorded, nothing is deleted.
    assert!(store.load_refresh_token("printer").unwrap().is_some());
    // Said once, at error level, with the AADSTS code and what to do.
    let errors = log.lines_at("ERROR");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("AADSTS70008")
            && errors[0].contains("run `smtp-oauth-bridge login printer`"),
        "{}",
        errors[0]
    );

    // An administrator runs login: the next session (or the task, within 30 s) uses it.
    store
        .save_grant(
            "printer",
            &SecretString::from("rt-new-login".to_string()),
            None,
        )
        .unwrap();
    sleep(Duration::from_secs(31)).await;
    let calls = script.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].refresh_token.as_deref(), Some("rt-new-login"));
    assert_eq!(state(&tokens), State::Ok);
}

#[tokio::test(start_paused = true)]
async fn a_refused_access_token_is_replaced_once_for_everyone() {
    let script = Script::new(vec![], ok(HOUR));
    let tokens = Arc::new(manager("client_credentials", &script, None, true));
    settle().await;
    let first = tokens.token("printer").await.unwrap();
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let tokens = Arc::clone(&tokens);
        let refused = first.clone();
        sessions.push(tokio::spawn(async move {
            tokens.replace("printer", &refused).await
        }));
    }
    for session in sessions {
        assert_eq!(secret(&session.await.unwrap().unwrap()), "at-2");
    }
    assert_eq!(script.calls().len(), 2, "one forced refresh");
    // A late report of the same refused token finds the replacement.
    assert_eq!(
        secret(&tokens.replace("printer", &first).await.unwrap()),
        "at-2"
    );
    assert_eq!(script.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn after_a_transient_failure_the_next_session_retries_without_hammering() {
    let script = Script::new(vec![fail(transient())], ok(HOUR));
    let tokens = manager("client_credentials", &script, None, false);
    assert!(matches!(
        tokens.token("printer").await,
        Err(TokenError::Transient { .. })
    ));
    // A client retrying at once waits at most a second for its attempt, then succeeds.
    let asked = Instant::now();
    assert_eq!(secret(&tokens.token("printer").await.unwrap()), "at-1");
    assert!(Instant::now() - asked <= Duration::from_secs(1));
    assert_eq!(script.calls().len(), 2);
}

#[tokio::test]
async fn the_notify_command_runs_once_with_the_identity_and_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("notified");
    let script = Script::new(vec![fail(refused())], fail(refused()));
    let mut settings = settings(true);
    // No shell parsing of the reason: it arrives as one argument.
    settings.notify_command = Some(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("printf '%s|%s\\n' \"$0\" \"$1\" >> '{}'", out.display()),
    ]);
    let tokens = TokenManager::new(
        &[identity("client_credentials")],
        &[],
        Arc::clone(&script) as Arc<dyn TokenSource>,
        None,
        settings,
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !out.exists() && std::time::Instant::now() < deadline {
        sleep(Duration::from_millis(20)).await;
    }
    // A second refusal (a session arriving) would not notify again.
    assert!(tokens.token("printer").await.is_err());
    sleep(Duration::from_millis(300)).await;
    let text = std::fs::read_to_string(&out).expect("the notify command ran");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let (name, reason) = lines[0].split_once('|').unwrap();
    assert_eq!(name, "printer");
    assert!(reason.contains("AADSTS70008"), "{reason}");
    assert!(
        reason.contains("hint: run `smtp-oauth-bridge login printer`"),
        "{reason}"
    );
}
