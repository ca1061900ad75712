//! Authenticated upstream sessions kept between client sessions, per account, and the cap on
//! how many sessions one mailbox may have open at once.
//!
//! Legacy clients open one connection per message; without a pool every message pays for TCP,
//! TLS, two EHLOs, STARTTLS and AUTH (about six round trips). Here a session that finished a
//! transaction cleanly goes back to its account's idle stack and the next transaction takes it.
//!
//! Every open session, idle or lent out, holds one of the account's `max_sessions` permits, so
//! the bridge never asks the provider for more (Office365 answers a fourth concurrent session
//! with `432 4.3.2`). A transaction that finds no idle session and no permit waits, up to
//! `pool.wait`, for one to come back.
//!
//! Sessions leave the pool when they are older than `max_age`, have carried `max_messages`
//! (then a replacement is opened in the background right away, so a busy account keeps a warm
//! session), or sat idle for `max_idle`; an idle one that the provider has since spoken on or closed is
//! dropped unused, and one idle longer than `noop_after` must answer NOOP first. A session that
//! failed, got a 421, or was abandoned mid-message is never returned: dropping its [`Lease`]
//! closes it. The pool does not know how sessions are opened (tokens, TLS): callers pass the
//! opener, so sessions opened after a token refresh use the new token while pooled ones,
//! already authenticated, carry on.

use std::collections::HashMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::Upstream;
use crate::config::{Account, Config, PoolSettings, UpstreamTls};
use crate::ops::Metrics;

/// The pool's settings: `[pool]`, and `timeouts.upstream_max_age` as the longest a session
/// may live.
#[derive(Debug, Clone, Copy)]
struct Settings {
    pool: PoolSettings,
    max_age: Duration,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        Settings {
            pool: config.pool,
            max_age: config.timeouts.upstream_max_age,
        }
    }
}

/// How long a pooled session may take to answer NOOP before it is given up for a new one.
const NOOP_LIMIT: Duration = Duration::from_secs(10);

/// Which provider sessions a pool holds: the identity whose token logged them in, the mailbox
/// they logged in as (the provider counts sessions per mailbox), and the provider. Accounts
/// that share an identity and mailbox share a pool; a `*@domain` account has one per
/// mailbox. A reload that changes any of these for an account makes a new pool, because
/// sessions opened for the old values must not serve the new ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    mailbox: String,
    host: String,
    port: u16,
    implicit_tls: bool,
}

impl Key {
    fn of(account: &Account, mailbox: &str) -> Key {
        Key {
            identity: account.identity.clone(),
            mailbox: mailbox.to_ascii_lowercase(),
            host: account.upstream.host.clone(),
            port: account.upstream.port,
            implicit_tls: account.upstream.tls == UpstreamTls::Implicit,
        }
    }

    /// Whether `account` may still use sessions of this pool.
    fn serves(&self, account: &Account) -> bool {
        let mailbox_fits = match &account.mailbox {
            Some(mailbox) => mailbox.eq_ignore_ascii_case(&self.mailbox),
            None => account.mailbox_for(&self.mailbox).is_some(),
        };
        mailbox_fits && *self == Key::of(account, &self.mailbox)
    }
}

/// The pools of every account; lives as long as the process, across reloads, so the cap holds
/// for sessions started before and after a reload alike.
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Mutex<Settings>,
    accounts: Mutex<HashMap<Key, Arc<Slot>>>,
    metrics: Option<Arc<Metrics>>,
}

/// One account's sessions.
struct Slot {
    account: String,
    max_sessions: usize,
    settings: Mutex<Settings>,
    permits: Arc<Semaphore>,
    /// Most recently returned last: reuse takes the warmest, the rest age out.
    idle: Mutex<Vec<Idle>>,
    /// Signalled when a session goes back to the idle stack.
    returned: Notify,
    /// Sessions lent out now.
    lent: AtomicUsize,
    /// Replaced by a reload: returned sessions are closed instead of kept.
    retired: AtomicBool,
    /// How to open a replacement; set by the first transaction after start or a reload.
    opener: Mutex<Option<Opener>>,
    metrics: Option<Arc<Metrics>>,
}

struct Idle {
    session: Pooled,
    since: Instant,
}

/// An open, authenticated session and its bookkeeping.
struct Pooled {
    upstream: Upstream,
    messages: u32,
    /// Released when the connection is closed, never earlier: the provider still counts the
    /// session until then.
    _permit: OwnedSemaphorePermit,
}

/// Opens a new session for a pool without a client waiting: the replacement of one that wore
/// out (`max_messages`, `upstream_max_age`) right after it served a transaction. `None` when it
/// could not (the failure is logged by the opener).
pub type Opener =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Option<Upstream>> + Send>> + Send + Sync>;

/// Why no session could be lent.
#[derive(Debug)]
pub enum AcquireError<E> {
    /// Every session the account may have is busy and none came back within `pool.wait`.
    Busy,
    /// Opening a new session failed; the opener's error.
    Open(E),
}

/// One account's pool, as a session uses it.
#[derive(Clone)]
pub struct AccountPool {
    slot: Arc<Slot>,
}

/// A session lent to one client transaction. It derefs to the [`Upstream`]. Give it back with
/// [`Lease::release`] when the transaction ended cleanly; dropping it closes the connection
/// without a goodbye, which is what a failed or abandoned transaction needs (the provider
/// discards a message whose final dot never came).
pub struct Lease {
    session: Option<Pooled>,
    slot: Arc<Slot>,
    reused: bool,
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("account", &self.slot.account)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// An empty pool; starts the task that closes sessions idle too long.
    pub fn new(config: &Config, metrics: Option<Arc<Metrics>>) -> Pool {
        let inner = Arc::new(Inner {
            settings: Mutex::new(Settings::of(config)),
            accounts: Mutex::new(HashMap::new()),
            metrics,
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// The pool `account` uses when it sends as `mailbox`, made on first use.
    pub fn account(&self, account: &Account, mailbox: &str) -> AccountPool {
        let key = Key::of(account, mailbox);
        let settings = *lock(&self.inner.settings);
        let mut accounts = lock(&self.inner.accounts);
        let slot = accounts
            .entry(key)
            .or_insert_with(|| Slot::new(&account.name, settings, self.inner.metrics.clone()));
        AccountPool { slot: slot.clone() }
    }

    /// Applies a reloaded configuration. Idle sessions are closed: they were opened under the
    /// old settings (TLS trust, EHLO name). A pool no account uses any more (its identity,
    /// mailbox or provider changed), or whose `max_sessions` changed, is retired: sessions lent
    /// from it finish their transaction and are then closed, so for that moment the old and
    /// new caps add up.
    pub fn reconfigure(&self, config: &Config) {
        let settings = Settings::of(config);
        *lock(&self.inner.settings) = settings;
        let mut map = lock(&self.inner.accounts);
        map.retain(|key, slot| {
            let stays = config.accounts.iter().any(|a| key.serves(a))
                && slot.max_sessions == settings.pool.max_sessions;
            if !stays {
                slot.retired.store(true, Ordering::Relaxed);
            }
            *lock(&slot.settings) = settings;
            // The opener belongs to the old configuration; the next transaction sets a new one.
            *lock(&slot.opener) = None;
            slot.close_idle(|_| true);
            stays
        });
    }

    /// Closes every idle session with QUIT, waiting at most `limit` for the goodbyes: at
    /// shutdown, so the provider does not count sessions that are gone.
    pub async fn close_all(&self, limit: Duration) {
        let slots: Vec<Arc<Slot>> = lock(&self.inner.accounts).values().cloned().collect();
        let mut quits = tokio::task::JoinSet::new();
        for slot in slots {
            slot.retired.store(true, Ordering::Relaxed);
            *lock(&slot.opener) = None;
            let idle: Vec<Idle> = lock(&slot.idle).drain(..).collect();
            for entry in idle {
                slot.event("closed");
                quits.spawn(entry.session.upstream.quit());
            }
        }
        let _ = tokio::time::timeout(limit, quits.join_all()).await;
    }

    /// Idle sessions across all accounts (for tests and metrics).
    pub fn idle_count(&self) -> usize {
        lock(&self.inner.accounts)
            .values()
            .map(|slot| lock(&slot.idle).len())
            .sum()
    }
}

impl Slot {
    fn new(account: &str, settings: Settings, metrics: Option<Arc<Metrics>>) -> Arc<Slot> {
        Arc::new(Slot {
            account: account.to_string(),
            max_sessions: settings.pool.max_sessions,
            settings: Mutex::new(settings),
            permits: Arc::new(Semaphore::new(settings.pool.max_sessions)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
            lent: AtomicUsize::new(0),
            retired: AtomicBool::new(false),
            opener: Mutex::new(None),
            metrics,
        })
    }

    fn settings(&self) -> Settings {
        *lock(&self.settings)
    }

    fn event(&self, event: &'static str) {
        if let Some(metrics) = &self.metrics {
            metrics.pool_event(&self.account, event);
        }
    }

    /// Whether this session may not carry another transaction.
    fn worn_out(&self, session: &Pooled, settings: &Settings) -> bool {
        session.upstream.age() >= settings.max_age || session.messages >= settings.pool.max_messages
    }

    /// Takes the warmest usable idle session, closing those that are too old or too long
    /// idle, and checking with NOOP one that idled past `noop_after`.
    async fn take_idle(self: &Arc<Self>) -> Option<Lease> {
        let settings = self.settings();
        loop {
            let idle = lock(&self.idle).pop()?;
            let idle_for = idle.since.elapsed();
            let mut session = idle.session;
            if self.worn_out(&session, &settings) || idle_for >= settings.pool.max_idle {
                self.close(session);
                continue;
            }
            if !session.upstream.is_quiet() {
                // The provider timed it out (a 421 waits unread) or closed it.
                tracing::debug!(account = %self.account, "pooled upstream session closed by the provider");
                self.event("lost");
                continue;
            }
            if idle_for >= settings.pool.noop_after {
                match session.upstream.noop(NOOP_LIMIT).await {
                    Ok(reply) if reply.code() == 250 => {}
                    outcome => {
                        tracing::debug!(account = %self.account, ok = outcome.is_ok(), "pooled upstream session failed NOOP");
                        self.event("lost");
                        continue;
                    }
                }
            }
            self.event("reused");
            return Some(Lease::new(session, self, true));
        }
    }

    /// Keeps a session that ended its transaction cleanly. One that is worn out is closed and,
    /// since its account is evidently busy, replaced in the background, so the next client
    /// finds a warm session instead of waiting for TLS and AUTH.
    fn put_back(self: &Arc<Self>, session: Pooled) {
        let settings = self.settings();
        if self.retired.load(Ordering::Relaxed) {
            self.close(session);
            return;
        }
        if self.worn_out(&session, &settings) {
            self.replace(session);
            return;
        }
        lock(&self.idle).push(Idle {
            session,
            since: Instant::now(),
        });
        self.returned.notify_one();
    }

    /// Says QUIT, then opens a replacement (after the old session is gone, so the provider
    /// never counts one more than the cap).
    fn replace(self: &Arc<Self>, session: Pooled) {
        self.event("closed");
        let slot = self.clone();
        tokio::spawn(async move {
            let Pooled {
                upstream, _permit, ..
            } = session;
            upstream.quit().await;
            drop(_permit);
            slot.refill().await;
        });
    }

    async fn refill(self: &Arc<Self>) {
        let opener = lock(&self.opener).clone();
        let Some(opener) = opener else {
            return;
        };
        if self.retired.load(Ordering::Relaxed) {
            return;
        }
        // At the cap, the sessions there are serve the next clients.
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return;
        };
        if let Some(upstream) = opener().await {
            self.event("opened");
            self.put_back(Pooled {
                upstream,
                messages: 0,
                _permit: permit,
            });
        }
    }

    /// Says QUIT in the background; the permit is released once the connection is closed.
    fn close(&self, session: Pooled) {
        self.event("closed");
        tokio::spawn(async move {
            let Pooled {
                upstream, _permit, ..
            } = session;
            upstream.quit().await;
            drop(_permit);
        });
    }

    /// Closes idle sessions past `max_idle` or `max_age`, and drops those the provider gave
    /// up on.
    fn prune(&self) {
        let settings = self.settings();
        self.close_idle(|idle| {
            idle.since.elapsed() >= settings.pool.max_idle
                || idle.session.upstream.age() >= settings.max_age
        });
    }

    /// Closes the idle sessions `expired` picks, and those the provider gave up on.
    fn close_idle(&self, expired: impl Fn(&Idle) -> bool) {
        let mut idle = lock(&self.idle);
        let mut kept = Vec::with_capacity(idle.len());
        for mut entry in idle.drain(..) {
            if expired(&entry) {
                self.close(entry.session);
            } else if !entry.session.upstream.is_quiet() {
                self.event("lost");
            } else {
                kept.push(entry);
            }
        }
        *idle = kept;
    }
}

impl AccountPool {
    /// Lends a session: an idle one if a usable one is there, else a new one from `open` when
    /// the account is under its cap, else whichever of the two comes first within
    /// `pool.wait`.
    pub async fn acquire<E>(
        &self,
        open: impl AsyncFnOnce() -> Result<Upstream, E>,
    ) -> Result<Lease, AcquireError<E>> {
        let slot = &self.slot;
        let deadline = Instant::now() + slot.settings().pool.wait;
        let permit = loop {
            // Registered before looking, so a session returned in between is not missed.
            let returned = slot.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some(lease) = slot.take_idle().await {
                return Ok(lease);
            }
            if let Ok(permit) = slot.permits.clone().try_acquire_owned() {
                break permit;
            }
            tokio::select! {
                permit = slot.permits.clone().acquire_owned() => match permit {
                    Ok(permit) => break permit,
                    Err(_) => return Err(AcquireError::Busy),
                },
                _ = &mut returned => continue,
                _ = tokio::time::sleep_until(deadline) => {
                    slot.event("wait_timeout");
                    return Err(AcquireError::Busy);
                }
            }
        };
        match open().await {
            Ok(upstream) => {
                slot.event("opened");
                let session = Pooled {
                    upstream,
                    messages: 0,
                    _permit: permit,
                };
                Ok(Lease::new(session, slot, false))
            }
            Err(e) => Err(AcquireError::Open(e)),
        }
    }

    /// Sets how this pool opens replacements, unless it knows already.
    pub fn set_opener_if_missing(&self, make: impl FnOnce() -> Opener) {
        let mut opener = lock(&self.slot.opener);
        if opener.is_none() {
            *opener = Some(make());
        }
    }

    /// Whether the account has a session open now, idle or lent out: proof enough, at AUTH,
    /// that the provider takes its token, without a round trip.
    pub fn is_warm(&self) -> bool {
        let slot = &self.slot;
        slot.prune();
        !lock(&slot.idle).is_empty() || slot.lent.load(Ordering::Relaxed) > 0
    }

    pub fn idle_count(&self) -> usize {
        lock(&self.slot.idle).len()
    }
}

impl Lease {
    fn new(session: Pooled, slot: &Arc<Slot>, reused: bool) -> Lease {
        slot.lent.fetch_add(1, Ordering::Relaxed);
        Lease {
            session: Some(session),
            slot: slot.clone(),
            reused,
        }
    }

    /// Whether the session came from the idle stack: if it fails at once, the provider had
    /// dropped it while it waited, and a new one may be opened without the client noticing.
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Counts a message sent on this session (its final dot written), for `max_messages`.
    pub fn count_message(&mut self) {
        if let Some(session) = self.session.as_mut() {
            session.messages += 1;
        }
    }

    /// Gives the session back for the next transaction. Only for a session whose last
    /// exchange ended cleanly, with no transaction open at the provider.
    pub fn release(mut self) {
        if let Some(session) = self.session.take() {
            self.slot.put_back(session);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.lent.fetch_sub(1, Ordering::Relaxed);
        if self.session.is_some() {
            self.slot.event("discarded");
        }
    }
}

impl Deref for Lease {
    type Target = Upstream;

    fn deref(&self) -> &Upstream {
        match &self.session {
            Some(session) => &session.upstream,
            None => unreachable!("a lease holds its session until released or dropped"),
        }
    }
}

impl DerefMut for Lease {
    fn deref_mut(&mut self) -> &mut Upstream {
        match &mut self.session {
            Some(session) => &mut session.upstream,
            None => unreachable!("a lease holds its session until released or dropped"),
        }
    }
}

/// Closes sessions that idled past `max_idle` or aged past `max_age`, so they neither hold a
/// slot of the mailbox nor wait to be cut by the provider. Ends with the pool.
async fn reap(inner: Weak<Inner>) {
    loop {
        let tick = match inner.upgrade() {
            Some(inner) => {
                let slots: Vec<Arc<Slot>> = lock(&inner.accounts).values().cloned().collect();
                for slot in slots {
                    slot.prune();
                }
                reap_interval(&lock(&inner.settings))
            }
            None => return,
        };
        tokio::time::sleep(tick).await;
    }
}

/// Often enough that a session outlives `max_idle` by at most a quarter of it.
fn reap_interval(settings: &Settings) -> Duration {
    (settings.pool.max_idle.min(settings.max_age) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(5))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can leave the guarded values half-changed, so a poisoned lock is usable.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaping_keeps_up_with_short_and_long_settings() {
        let mut s = Settings {
            pool: PoolSettings::default(),
            max_age: Duration::from_secs(600),
        };
        assert_eq!(reap_interval(&s), Duration::from_secs(5));
        s.pool.max_idle = Duration::from_millis(200);
        assert_eq!(reap_interval(&s), Duration::from_millis(50));
        s.max_age = Duration::from_millis(100);
        assert_eq!(reap_interval(&s), Duration::from_millis(25));
        s.pool.max_idle = Duration::from_millis(1);
        assert_eq!(reap_interval(&s), Duration::from_millis(10));
    }
}
