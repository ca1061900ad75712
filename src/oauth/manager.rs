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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use secrecy::ExposeSecret;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::config::{Account, Flow, Identity, Provider, TokenSettings};
use crate::oauth::grants::{Grant, Granted, TokenSource, login_command};
use crate::oauth::slot::{Obtained, Phase, Slot, SlotState};
use crate::oauth::status::IdentityStatus;
use crate::oauth::{AccessToken, TokenError, refresher};
use crate::ops::Metrics;
use crate::store::{Store, TokenRecord, unix_now};

/// A session may retry an identity that is backing off after a transient failure, but not
/// sooner than this after the last attempt: a crowd of clients cannot turn the back-off into
/// a request storm, and a client that retries a moment later still gets a fresh attempt.
pub(super) const DEMAND_FLOOR: Duration = Duration::from_secs(1);
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
            .field(
                "identities",
                &self
                    .inner
                    .slots()
                    .iter()
                    .map(|s| s.name().to_string())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

pub(super) struct Inner {
    table: RwLock<Table>,
    source: RwLock<Arc<dyn TokenSource>>,
    pub(super) store: Option<Arc<Store>>,
    pub(super) settings: TokenSettings,
    /// Wakes the refresh task: a state changed, so its schedule may have.
    pub(super) wake: Notify,
    pub(super) permits: Semaphore,
    pub(super) status_dirty: AtomicBool,
    pub(super) started: u64,
    /// A manager for one-off checks (`doctor`): it writes no status file and caches no
    /// app-only token on disk (a rotated refresh token is still stored, or it would be lost).
    pub(super) probe: bool,
    metrics: OnceLock<Arc<Metrics>>,
}

/// The identities as configured now; a reload replaces it.
#[derive(Default)]
struct Table {
    slots: Vec<Arc<Slot>>,
    by_name: HashMap<String, usize>,
    /// The accounts of each identity, which the metrics report by.
    accounts: HashMap<String, Vec<String>>,
}

impl Table {
    fn new(slots: Vec<Arc<Slot>>, accounts: &[Account]) -> Table {
        let by_name = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name().to_string(), i))
            .collect();
        let mut by_identity: HashMap<String, Vec<String>> = HashMap::new();
        for account in accounts {
            by_identity
                .entry(account.identity.clone())
                .or_default()
                .push(account.name.clone());
        }
        Table {
            slots,
            by_name,
            accounts: by_identity,
        }
    }
}

/// What a session does next.
enum Gate {
    Start,
    Wait,
    SleepUntil(Instant),
    Fail(TokenError),
}

impl TokenManager {
    /// Builds the manager, loads cached tokens from the store, and starts the one refresh
    /// task. `accounts` name the accounts each identity's metrics are reported for. Must be
    /// called inside a tokio runtime.
    pub fn new(
        identities: &[Arc<Identity>],
        accounts: &[Account],
        source: Arc<dyn TokenSource>,
        store: Option<Arc<Store>>,
        settings: TokenSettings,
    ) -> TokenManager {
        let inner = Inner::new(identities, accounts, source, store, settings, false);
        let refresher = tokio::spawn(refresher::run(Arc::clone(&inner)));
        TokenManager { inner, refresher }
    }

    /// A manager for one-off checks (`doctor`): tokens on request only, no background
    /// refresh, and the running daemon's status file left alone.
    pub fn probe(
        identities: &[Arc<Identity>],
        source: Arc<dyn TokenSource>,
        store: Option<Arc<Store>>,
        settings: TokenSettings,
    ) -> TokenManager {
        let inner = Inner::new(identities, &[], source, store, settings, true);
        TokenManager {
            inner,
            refresher: tokio::spawn(async {}),
        }
    }

    /// Reports token requests and their outcomes to `metrics`, for every account of the
    /// identity concerned.
    pub fn with_metrics(self, metrics: Arc<Metrics>) -> TokenManager {
        let _ = self.inner.metrics.set(metrics);
        self
    }

    /// Applies a reloaded configuration: an identity whose grant is unchanged keeps its
    /// tokens and state; a new or changed one starts over from the store (so a fixed client
    /// secret is tried at once); a removed one is dropped. `source` replaces how endpoints are
    /// reached (new TLS trust). Returns what changed.
    pub fn reconfigure(
        &self,
        identities: &[Arc<Identity>],
        accounts: &[Account],
        source: Option<Arc<dyn TokenSource>>,
    ) -> Vec<String> {
        if let Some(source) = source {
            *self
                .inner
                .source
                .write()
                .unwrap_or_else(PoisonError::into_inner) = source;
        }
        let mut changes = Vec::new();
        {
            let mut table = self
                .inner
                .table
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let old = std::mem::take(&mut *table);
            let slots = identities
                .iter()
                .map(|identity| match old.by_name.get(&identity.name) {
                    Some(&i) if old.slots[i].identity.oauth.same_grant(&identity.oauth) => {
                        Arc::clone(&old.slots[i])
                    }
                    found => {
                        let what = if found.is_some() { "changed" } else { "added" };
                        changes.push(format!("identity {} {what}", identity.name));
                        Arc::new(Slot::new(
                            identity,
                            self.inner.store.as_deref(),
                            &self.inner.settings,
                        ))
                    }
                })
                .collect();
            for slot in &old.slots {
                if !identities.iter().any(|i| i.name == slot.name()) {
                    changes.push(format!("identity {} removed", slot.name()));
                }
            }
            *table = Table::new(slots, accounts);
        }
        self.inner.status_dirty.store(true, Ordering::Release);
        self.inner.wake.notify_one();
        changes
    }

    /// A valid access token for `identity`: the cached one when it has life left, otherwise
    /// the result of the request in flight, waited for at most `session_wait`.
    pub async fn token(&self, identity: &str) -> Result<AccessToken, TokenError> {
        self.token_by(identity, Instant::now() + self.inner.settings.session_wait)
            .await
    }

    /// Like [`token`](Self::token), but waits only until `deadline`: a client's AUTH has
    /// already spent part of its `session_wait` on the password check.
    pub async fn token_by(
        &self,
        identity: &str,
        deadline: Instant,
    ) -> Result<AccessToken, TokenError> {
        self.get(identity, None, deadline).await
    }

    /// The upstream refused `refused`: drop it and get a new one (one request, however many
    /// sessions report the same token), unless another session already replaced it.
    pub async fn replace(
        &self,
        identity: &str,
        refused: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let deadline = Instant::now() + self.inner.settings.session_wait;
        self.get(identity, Some(refused), deadline).await
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
        while self.inner.slots().iter().any(|s| s.lock().in_flight) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn slot(&self, name: &str) -> Result<Arc<Slot>, TokenError> {
        self.inner.slot(name).ok_or_else(|| TokenError::Setup {
            reason: format!("no identity named {name}"),
        })
    }

    async fn get(
        &self,
        name: &str,
        refused: Option<&AccessToken>,
        deadline: Instant,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
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

impl Inner {
    fn new(
        identities: &[Arc<Identity>],
        accounts: &[Account],
        source: Arc<dyn TokenSource>,
        store: Option<Arc<Store>>,
        settings: TokenSettings,
        probe: bool,
    ) -> Arc<Inner> {
        let slots = identities
            .iter()
            .map(|identity| Arc::new(Slot::new(identity, store.as_deref(), &settings)))
            .collect();
        Arc::new(Inner {
            table: RwLock::new(Table::new(slots, accounts)),
            source: RwLock::new(source),
            store,
            settings,
            wake: Notify::new(),
            permits: Semaphore::new(BACKGROUND_REQUESTS),
            status_dirty: AtomicBool::new(true),
            started: unix_now(),
            probe,
            metrics: OnceLock::new(),
        })
    }

    /// The identities now, in configuration order.
    pub(super) fn slots(&self) -> Vec<Arc<Slot>> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .clone()
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table
            .by_name
            .get(name)
            .map(|&i| Arc::clone(&table.slots[i]))
    }

    fn source(&self) -> Arc<dyn TokenSource> {
        Arc::clone(&self.source.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Tells the metrics about an attempt (`None`: about to start) for every account of the
    /// identity.
    fn report(&self, slot: &Slot, outcome: Option<&Result<AccessToken, TokenError>>) {
        let Some(metrics) = self.metrics.get() else {
            return;
        };
        let accounts = self
            .table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .accounts
            .get(slot.name())
            .cloned()
            .unwrap_or_default();
        for account in &accounts {
            match outcome {
                None => metrics.token_refreshing(account),
                Some(result) => metrics.token_result(account, result),
            }
        }
    }

    pub(super) fn status(&self) -> Vec<IdentityStatus> {
        self.slots().iter().map(|slot| slot.status()).collect()
    }

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
            self.report(&slot, None);
            let result = self.obtain(&slot).await;
            let outcome = refresher::finish(&self, &slot, result);
            self.report(&slot, Some(&outcome));
            slot.done.send_modify(|g| *g = g.wrapping_add(1));
        });
    }

    /// The store, unless the identity's tokens are not worth keeping (the sandbox forgets
    /// them when it stops).
    fn persistent(&self, identity: &Identity) -> Option<&Store> {
        self.store
            .as_deref()
            .filter(|_| identity.provider != Provider::Sandbox && !self.probe)
    }

    async fn obtain(&self, slot: &Slot) -> Result<Obtained, TokenError> {
        let identity = &slot.identity;
        if identity.oauth.flow == Flow::RefreshToken {
            return self.redeem(slot).await;
        }
        slot.requests.fetch_add(1, Ordering::Relaxed);
        let granted = self
            .source()
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
            .source()
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
}

fn cache_access_token(record: &mut TokenRecord, granted: &Granted) {
    let now = unix_now();
    record.access_token = Some(granted.access_token.clone());
    record.access_token_expires = Some(now.saturating_add(granted.lifetime.as_secs()));
    record.last_refresh = Some(now);
}
