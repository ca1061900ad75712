//! One identity's slot: its cached access token with the schedule derived from it, its state
//! (idle, ok, needs-login, backing off, a request in flight), and what a restarted bridge
//! recovers from the store. [`super::manager`] decides what to do with slots; this file only
//! keeps them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Identity, Provider, TokenSettings};
use crate::oauth::endpoint::MAX_TOKEN_LIFETIME;
use crate::oauth::grants::Granted;
use crate::oauth::status::{IdentityStatus, State};
use crate::oauth::{AccessToken, TokenError};
use crate::store::{FileVersion, Store, unix_now};

/// A cached token is handed to sessions while it has at least this much life left (or a
/// quarter of its lifetime, for short-lived tokens). The refresh task replaces it long before.
const USABLE_FLOOR: Duration = Duration::from_secs(60);

/// One identity.
pub(super) struct Slot {
    pub(super) identity: Arc<Identity>,
    pub(super) state: Mutex<SlotState>,
    /// Bumped when an attempt ends; sessions waiting for a token watch it.
    pub(super) done: watch::Sender<u64>,
    pub(super) requests: AtomicU64,
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
    pub(super) authority_warned: bool,
    // Wall-clock times for the status file.
    pub(super) last_refresh_unix: Option<u64>,
    pub(super) refresh_token_received_unix: Option<u64>,
    pub(super) refresh_token_used_unix: Option<u64>,
}

/// A cached access token with its schedule.
#[derive(Clone)]
pub(super) struct Held {
    pub(super) token: AccessToken,
    /// When the refresh task replaces it.
    pub(super) refresh_at: Instant,
    /// When sessions stop using it.
    pub(super) stale_at: Instant,
    pub(super) expires_unix: u64,
}

impl Held {
    /// A token just received, valid for `lifetime` from `now`.
    pub(super) fn new(
        secret: SecretString,
        lifetime: Duration,
        now: Instant,
        margin: Duration,
    ) -> Held {
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
    pub(super) fn record_success(
        &mut self,
        obtained: Obtained,
        now: Instant,
        settings: &TokenSettings,
    ) {
        let Obtained {
            granted,
            redeemed_refresh_token,
            rotated,
        } = obtained;
        let unix = unix_now();
        self.token = Some(Held::new(
            granted.access_token,
            granted.lifetime,
            now,
            settings.refresh_margin,
        ));
        self.phase = Phase::Ok;
        self.failures = 0;
        self.last_error = None;
        self.last_refresh_unix = Some(unix);
        if redeemed_refresh_token {
            self.keepalive_due = Some(now + settings.keepalive);
            self.refresh_token_used_unix = Some(unix);
        }
        if rotated {
            self.refresh_token_received_unix = Some(unix);
        }
    }

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

    pub(super) fn usable(&self, now: Instant) -> Option<AccessToken> {
        self.token
            .as_ref()
            .filter(|h| now < h.stale_at)
            .map(|h| h.token.clone())
    }
}

/// An attempt's result as the slot records it.
pub(super) struct Obtained {
    pub(super) granted: Granted,
    pub(super) redeemed_refresh_token: bool,
    pub(super) rotated: bool,
}

impl Slot {
    pub(super) fn lock(&self) -> MutexGuard<'_, SlotState> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn name(&self) -> &str {
        &self.identity.name
    }

    /// A slot for `identity` with what the store remembers of it.
    pub(super) fn new(
        identity: &Arc<Identity>,
        store: Option<&Store>,
        settings: &TokenSettings,
    ) -> Slot {
        Slot {
            identity: Arc::clone(identity),
            state: Mutex::new(initial_state(identity, store, settings, Instant::now())),
            done: watch::Sender::new(0),
            requests: AtomicU64::new(0),
        }
    }

    /// The slot as the status file shows it.
    pub(super) fn status(&self) -> IdentityStatus {
        let st = self.lock();
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
            name: self.name().to_string(),
            flow: self.identity.oauth.flow.to_string(),
            state,
            access_token_expires: st.token.as_ref().map(|h| h.expires_unix),
            last_refresh: st.last_refresh_unix,
            refresh_token_received: st.refresh_token_received_unix,
            refresh_token_used: st.refresh_token_used_unix,
            retry_at,
            last_error: st.last_error.as_ref().map(|e| e.to_string()),
            hint,
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
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
        // Bounded like a lifetime just received: a record written before answers were
        // bounded may hold an expiry no clock can reach.
        let lifetime = Duration::from_secs(expires - obtained).min(MAX_TOKEN_LIFETIME);
        let left = Duration::from_secs(expires - unix).min(MAX_TOKEN_LIFETIME);
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
