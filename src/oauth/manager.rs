//! [`TokenManager`]: one slot per identity holding its access token and its state, the path
//! sessions take to get a token, and the single flight that makes one request per identity
//! however many sessions need a token at once.
//!
//! A session never waits when a valid token is held, even while a refresh is in flight or
//! failing. Without one it waits for the request in flight at most `session_wait` (two
//! seconds by default), then hears "temporarily unavailable" while the request carries on in
//! the background. An identity that needs a login answers at once, without a request, until
//! its refresh token changes on disk (`login` or `import-token` ran). The background side
//! (scheduling, back-off, keep-alive, the status file) is in [`super::refresher`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Flow, Identity, Provider, TokenSettings};
use crate::oauth::grants::{Grant, Granted, TokenSource, login_command};
use crate::oauth::status::{IdentityStatus, State};
use crate::oauth::{AccessToken, TokenError, refresher};
use crate::store::{FileVersion, Store, TokenRecord, unix_now};

/// A session may retry an identity that is backing off after a transient failure, but not
/// sooner than this after the last attempt: a crowd of clients cannot turn the back-off into
/// a request storm, and a client that retries a moment later still gets a fresh attempt.
pub(super) const DEMAND_FLOOR: Duration = Duration::from_secs(1);
/// A cached token is handed to sessions while it has at least this much life left (or a
/// quarter of its lifetime, for short-lived tokens). The refresh task replaces it long before.
const USABLE_FLOOR: Duration = Duration::from_secs(60);
/// Token requests the background task runs at once (a start with many identities).
const BACKGROUND_REQUESTS: usize = 4;

/// Hands out access tokens for every configured identity and keeps them fresh.
pub struct TokenManager {
    inner: Arc<Inner>,
    refresher: JoinHandle<()>,
}

impl Drop for TokenManager {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

impl std::fmt::Debug for TokenManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenManager")
            .field("identities", &self.inner.by_name.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    pub(super) slots: Vec<Arc<Slot>>,
    by_name: HashMap<String, usize>,
    source: Arc<dyn TokenSource>,
    pub(super) store: Option<Arc<Store>>,
    pub(super) settings: TokenSettings,
    /// Wakes the refresh task: a state changed, so its schedule may have.
    pub(super) wake: Notify,
    pub(super) permits: Semaphore,
    pub(super) status_dirty: AtomicBool,
    pub(super) started: u64,
}

/// One identity.
pub(super) struct Slot {
    pub(super) identity: Arc<Identity>,
    state: Mutex<SlotState>,
    /// Bumped when an attempt ends; sessions waiting for a token watch it.
    done: watch::Sender<u64>,
    requests: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) enum Phase {
    /// Nothing asked yet.
    Idle,
    Ok,
    /// Refused for good: no request until an administrator acts.
    NeedsLogin,
    /// A transient failure; the next attempt is due at `until`. `throttled` (a 429 or a
    /// `Retry-After`) holds sessions back too.
    BackingOff {
        until: Instant,
        throttled: bool,
    },
}

pub(super) struct SlotState {
    pub(super) token: Option<Held>,
    pub(super) phase: Phase,
    pub(super) in_flight: bool,
    pub(super) last_error: Option<TokenError>,
    pub(super) last_attempt: Option<Instant>,
    pub(super) failures: u32,
    /// When the refresh token must be redeemed at the latest, however idle the identity
    /// (`keepalive` after its last use).
    pub(super) keepalive_due: Option<Instant>,
    /// The token file as it was when the identity started needing a login.
    pub(super) login_version: Option<FileVersion>,
    authority_warned: bool,
    // Wall-clock times for the status file.
    last_refresh_unix: Option<u64>,
    refresh_token_received_unix: Option<u64>,
    refresh_token_used_unix: Option<u64>,
}

/// A cached access token with its schedule.
#[derive(Clone)]
pub(super) struct Held {
    pub(super) token: AccessToken,
    /// When the refresh task replaces it.
    pub(super) refresh_at: Instant,
    /// When sessions stop using it.
    stale_at: Instant,
    expires_unix: u64,
}

impl Held {
    /// A token just received, valid for `lifetime` from `now`.
    fn new(secret: SecretString, lifetime: Duration, now: Instant, margin: Duration) -> Held {
        Held::restored(secret, lifetime, lifetime, now, margin)
    }

    /// A token of `lifetime` with `left` of it remaining at `now` (one read from the store).
    fn restored(
        secret: SecretString,
        lifetime: Duration,
        left: Duration,
        now: Instant,
        margin: Duration,
    ) -> Held {
        let expires_at = now + left;
        // Never less than half the lifetime in use: a short-lived token must not be
        // refreshed in a loop.
        let before = |d: Duration| if d >= left { now } else { expires_at - d };
        Held {
            token: AccessToken { secret, expires_at },
            refresh_at: before(margin.min(lifetime / 2)),
            stale_at: before(USABLE_FLOOR.min(lifetime / 4)),
            expires_unix: unix_now().saturating_add(left.as_secs()),
        }
    }
}

impl SlotState {
    fn new() -> SlotState {
        SlotState {
            token: None,
            phase: Phase::Idle,
            in_flight: false,
            last_error: None,
            last_attempt: None,
            failures: 0,
            keepalive_due: None,
            login_version: None,
            authority_warned: false,
            last_refresh_unix: None,
            refresh_token_received_unix: None,
            refresh_token_used_unix: None,
        }
    }

    fn usable(&self, now: Instant) -> Option<AccessToken> {
        self.token
            .as_ref()
            .filter(|h| now < h.stale_at)
            .map(|h| h.token.clone())
    }
}

/// What a session does next.
enum Gate {
    Start,
    Wait,
    SleepUntil(Instant),
    Fail(TokenError),
}

/// An attempt's result as the slot records it.
pub(super) struct Obtained {
    granted: Granted,
    redeemed_refresh_token: bool,
    rotated: bool,
}

impl TokenManager {
    /// Builds the manager, loads cached tokens from the store, and starts the one refresh
    /// task. Must be called inside a tokio runtime.
    pub fn new(
        identities: &[Arc<Identity>],
        source: Arc<dyn TokenSource>,
        store: Option<Arc<Store>>,
        settings: TokenSettings,
    ) -> TokenManager {
        let now = Instant::now();
        let slots: Vec<Arc<Slot>> = identities
            .iter()
            .map(|identity| {
                let state = initial_state(identity, store.as_deref(), &settings, now);
                Arc::new(Slot {
                    identity: Arc::clone(identity),
                    state: Mutex::new(state),
                    done: watch::Sender::new(0),
                    requests: AtomicU64::new(0),
                })
            })
            .collect();
        let by_name = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.identity.name.clone(), i))
            .collect();
        let inner = Arc::new(Inner {
            slots,
            by_name,
            source,
            store,
            settings,
            wake: Notify::new(),
            permits: Semaphore::new(BACKGROUND_REQUESTS),
            status_dirty: AtomicBool::new(true),
            started: unix_now(),
        });
        let refresher = tokio::spawn(refresher::run(Arc::clone(&inner)));
        TokenManager { inner, refresher }
    }

    /// A valid access token for `identity`: the cached one when it has life left, otherwise
    /// the result of the request in flight, waited for at most `session_wait`.
    pub async fn token(&self, identity: &str) -> Result<AccessToken, TokenError> {
        self.get(identity, None).await
    }

    /// The upstream refused `refused`: drop it and get a new one (one request, however many
    /// sessions report the same token), unless another session already replaced it.
    pub async fn replace(
        &self,
        identity: &str,
        refused: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        self.get(identity, Some(refused)).await
    }

    /// How many token requests were made for `identity` (all outcomes).
    pub fn request_count(&self, identity: &str) -> u64 {
        self.slot(identity)
            .map(|s| s.requests.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Every identity's state, as the status file and `accounts` show it.
    pub fn status(&self) -> Vec<IdentityStatus> {
        self.inner.status()
    }

    /// Stops the refresh task and lets requests in flight finish (at most `grace`), so a
    /// rotated refresh token the endpoint already issued is stored rather than lost.
    pub async fn shutdown(&self, grace: Duration) {
        self.refresher.abort();
        let deadline = Instant::now() + grace;
        while self.inner.slots.iter().any(|s| s.lock().in_flight) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, TokenError> {
        self.inner
            .by_name
            .get(name)
            .map(|&i| Arc::clone(&self.inner.slots[i]))
            .ok_or_else(|| TokenError::Setup {
                reason: format!("no identity named {name}"),
            })
    }

    async fn get(
        &self,
        name: &str,
        refused: Option<&AccessToken>,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        let deadline = Instant::now() + self.inner.settings.session_wait;
        loop {
            let mut done = slot.done.subscribe();
            let gate = {
                let mut st = slot.lock();
                if let Some(refused) = refused
                    && st.token.as_ref().is_some_and(|h| {
                        h.token.secret.expose_secret() == refused.secret.expose_secret()
                    })
                {
                    st.token = None;
                }
                let now = Instant::now();
                if let Some(token) = st.usable(now) {
                    return Ok(token);
                }
                self.inner
                    .gate(&slot, &mut st, now, deadline, refused.is_some())
            };
            match gate {
                Gate::Fail(e) => return Err(e),
                Gate::SleepUntil(at) => {
                    tokio::time::sleep_until(at).await;
                    continue;
                }
                Gate::Start => Arc::clone(&self.inner).spawn_attempt(Arc::clone(&slot), false),
                Gate::Wait => {}
            }
            if tokio::time::timeout_at(deadline, done.changed())
                .await
                .is_err()
            {
                return Err(TokenError::transient(format!(
                    "the token request is taking longer than {}s; it goes on in the background",
                    self.inner.settings.session_wait.as_secs()
                )));
            }
            let st = slot.lock();
            if let Some(token) = st.usable(Instant::now()) {
                return Ok(token);
            }
            return Err(st
                .last_error
                .clone()
                .unwrap_or_else(|| TokenError::transient("no token was obtained")));
        }
    }
}

impl Slot {
    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn name(&self) -> &str {
        &self.identity.name
    }
}

impl Inner {
    /// Decides whether a session starts a request, waits for one, or gets an answer now.
    fn gate(
        &self,
        slot: &Slot,
        st: &mut SlotState,
        now: Instant,
        deadline: Instant,
        forced: bool,
    ) -> Gate {
        if st.in_flight {
            return Gate::Wait;
        }
        let earliest = match st.phase {
            Phase::Idle | Phase::Ok => now,
            Phase::NeedsLogin if self.store_changed(slot, st) => now,
            Phase::NeedsLogin => {
                return Gate::Fail(st.last_error.clone().unwrap_or_else(|| TokenError::Setup {
                    reason: "the identity needs a login".into(),
                }));
            }
            Phase::BackingOff { until, throttled } => {
                let floor = st.last_attempt.map_or(now, |t| t + DEMAND_FLOOR);
                match (throttled, forced) {
                    (true, _) => until,
                    (false, true) => now,
                    (false, false) => until.min(floor),
                }
            }
        };
        if earliest <= now {
            st.in_flight = true;
            return Gate::Start;
        }
        if earliest <= deadline {
            return Gate::SleepUntil(earliest);
        }
        let wait = earliest - now;
        let reason = st
            .last_error
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "backing off".into());
        Gate::Fail(TokenError::Transient {
            reason: format!("{reason}; next attempt in {}s", wait.as_secs().max(1)),
            retry_after: Some(wait),
        })
    }

    /// Whether the identity's token file changed since it started needing a login.
    pub(super) fn store_changed(&self, slot: &Slot, st: &SlotState) -> bool {
        match &self.store {
            Some(store) if slot.identity.oauth.flow == Flow::RefreshToken => {
                store.version(slot.name()) != st.login_version
            }
            _ => false,
        }
    }

    /// Runs one attempt in its own task, so it completes even when every session waiting for
    /// it has given up. `in_flight` must already be set.
    pub(super) fn spawn_attempt(self: Arc<Self>, slot: Arc<Slot>, background: bool) {
        tokio::spawn(async move {
            let _permit = if background {
                self.permits.acquire().await.ok()
            } else {
                None
            };
            let result = self.obtain(&slot).await;
            refresher::finish(&self, &slot, result);
            slot.done.send_modify(|g| *g = g.wrapping_add(1));
        });
    }

    /// The store, unless the identity's tokens are not worth keeping (the sandbox forgets
    /// them when it stops).
    fn persistent(&self, identity: &Identity) -> Option<&Store> {
        self.store
            .as_deref()
            .filter(|_| identity.provider != Provider::Sandbox)
    }

    async fn obtain(&self, slot: &Slot) -> Result<Obtained, TokenError> {
        let identity = &slot.identity;
        if identity.oauth.flow == Flow::RefreshToken {
            return self.redeem(slot).await;
        }
        slot.requests.fetch_add(1, Ordering::Relaxed);
        let granted = self
            .source
            .request(identity, Grant::ClientCredentials)
            .await?;
        if let Some(store) = self.persistent(identity) {
            let mut record = store.load(slot.name()).ok().flatten().unwrap_or_default();
            cache_access_token(&mut record, &granted);
            if let Err(e) = store.save(slot.name(), &record) {
                tracing::warn!(identity = %slot.name(), error = %e, "cannot cache the access token");
            }
        }
        Ok(Obtained {
            granted,
            redeemed_refresh_token: false,
            rotated: false,
        })
    }

    /// Redeems the stored refresh token at the authority that issued it, and stores the
    /// rotated one durably before the new access token is handed out.
    async fn redeem(&self, slot: &Slot) -> Result<Obtained, TokenError> {
        let name = slot.name();
        let store = self.store.as_deref().ok_or_else(|| TokenError::Setup {
            reason: "no token store is open".into(),
        })?;
        let version = store.version(name);
        let mut record = store
            .load(name)
            .map_err(|e| TokenError::Setup {
                reason: e.to_string(),
            })?
            .unwrap_or_default();
        let refresh_token = record.refresh_token.clone().ok_or_else(|| {
            let login = login_command(name);
            TokenError::NeedsLogin {
                reason: "no refresh token stored".into(),
                code: None,
                aadsts: None,
                hint: format!("run `{login}`"),
            }
        })?;
        let configured = &slot.identity.oauth.token_url;
        let token_url = record
            .authority
            .clone()
            .unwrap_or_else(|| configured.clone());
        if &token_url != configured && !std::mem::replace(&mut slot.lock().authority_warned, true) {
            tracing::warn!(
                identity = %name,
                issuer = %token_url,
                configured = %configured,
                "refreshing at the endpoint that issued the refresh token, not the configured \
                 one; run login again to move the grant"
            );
        }
        slot.requests.fetch_add(1, Ordering::Relaxed);
        let granted = self
            .source
            .request(
                &slot.identity,
                Grant::Refresh {
                    refresh_token: &refresh_token,
                    token_url: &token_url,
                },
            )
            .await?;
        let rotated = granted.refresh_token.is_some();
        if store.version(name) != version {
            // `login` or `import-token` stored a new grant while this request ran: theirs is
            // newer, so it stays; the access token in hand is still good to use.
            tracing::info!(identity = %name, "the store was updated meanwhile; keeping its grant");
            return Ok(Obtained {
                granted,
                redeemed_refresh_token: true,
                rotated: false,
            });
        }
        let now = unix_now();
        if let Some(new) = &granted.refresh_token {
            record.refresh_token = Some(new.clone());
            record.refresh_token_received = Some(now);
        }
        record.refresh_token_used = Some(now);
        record.authority = Some(token_url);
        cache_access_token(&mut record, &granted);
        if let Err(e) = store.save(name, &record) {
            if rotated {
                // Not used unless kept: the old refresh token still works a while, the new
                // one would be lost with the next restart.
                return Err(TokenError::transient(format!(
                    "cannot save the rotated refresh token: {e}"
                )));
            }
            tracing::warn!(identity = %name, error = %e, "cannot cache the access token");
        }
        Ok(Obtained {
            granted,
            redeemed_refresh_token: true,
            rotated,
        })
    }

    pub(super) fn record_success(&self, st: &mut SlotState, obtained: Obtained, now: Instant) {
        let Obtained {
            granted,
            redeemed_refresh_token,
            rotated,
        } = obtained;
        let unix = unix_now();
        st.token = Some(Held::new(
            granted.access_token,
            granted.lifetime,
            now,
            self.settings.refresh_margin,
        ));
        st.phase = Phase::Ok;
        st.failures = 0;
        st.last_error = None;
        st.last_refresh_unix = Some(unix);
        if redeemed_refresh_token {
            st.keepalive_due = Some(now + self.settings.keepalive);
            st.refresh_token_used_unix = Some(unix);
        }
        if rotated {
            st.refresh_token_received_unix = Some(unix);
        }
    }

    pub(super) fn status(&self) -> Vec<IdentityStatus> {
        self.slots
            .iter()
            .map(|slot| {
                let st = slot.lock();
                let now = Instant::now();
                let state = match st.phase {
                    _ if st.in_flight => State::Refreshing,
                    Phase::Idle => State::Idle,
                    Phase::Ok => State::Ok,
                    Phase::NeedsLogin => State::NeedsLogin,
                    Phase::BackingOff { .. } => State::BackingOff,
                };
                let retry_at = match st.phase {
                    Phase::BackingOff { until, .. } => {
                        Some(unix_now() + until.saturating_duration_since(now).as_secs())
                    }
                    _ => None,
                };
                let hint = match &st.last_error {
                    Some(TokenError::NeedsLogin { hint, .. }) => Some(hint.clone()),
                    _ => None,
                };
                IdentityStatus {
                    name: slot.name().to_string(),
                    flow: slot.identity.oauth.flow.to_string(),
                    state,
                    access_token_expires: st.token.as_ref().map(|h| h.expires_unix),
                    last_refresh: st.last_refresh_unix,
                    refresh_token_received: st.refresh_token_received_unix,
                    refresh_token_used: st.refresh_token_used_unix,
                    retry_at,
                    last_error: st.last_error.as_ref().map(|e| e.to_string()),
                    hint,
                    requests: slot.requests.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

fn cache_access_token(record: &mut TokenRecord, granted: &Granted) {
    let now = unix_now();
    record.access_token = Some(granted.access_token.clone());
    record.access_token_expires = Some(now.saturating_add(granted.lifetime.as_secs()));
    record.last_refresh = Some(now);
}

/// What a restarted bridge knows: the cached access token (still good for sessions) and the
/// refresh token's times, from the store.
fn initial_state(
    identity: &Identity,
    store: Option<&Store>,
    settings: &TokenSettings,
    now: Instant,
) -> SlotState {
    let mut st = SlotState::new();
    let Some(store) = store.filter(|_| identity.provider != Provider::Sandbox) else {
        return st;
    };
    // An unreadable record is reported by the first attempt, which reads it again.
    let Ok(Some(record)) = store.load(&identity.name) else {
        return st;
    };
    let unix = unix_now();
    // Ages, not past instants: a monotonic clock cannot reach back before the boot.
    st.keepalive_due = record.refresh_token_used.map(|used| {
        now + settings
            .keepalive
            .saturating_sub(Duration::from_secs(unix.saturating_sub(used)))
    });
    st.refresh_token_used_unix = record.refresh_token_used;
    st.refresh_token_received_unix = record.refresh_token_received;
    st.last_refresh_unix = record.last_refresh;
    if let (Some(secret), Some(expires)) = (record.access_token, record.access_token_expires)
        && expires > unix
    {
        let obtained = record.last_refresh.unwrap_or(unix).min(unix);
        let lifetime = Duration::from_secs(expires - obtained);
        let left = Duration::from_secs(expires - unix);
        st.token = Some(Held::restored(
            secret,
            lifetime,
            left,
            now,
            settings.refresh_margin,
        ));
        st.phase = Phase::Ok;
    }
    st
}
