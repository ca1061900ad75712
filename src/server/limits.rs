//! What one client, or all of them, may take: connection slots (globally and per source
//! address) and failed logins per source address.
//!
//! Slots are held by a [`Permit`] that gives them back when the session ends, however it
//! ends. Failed logins are remembered per source for a sliding window; once a source reaches
//! the limit its logins are refused unchecked until the oldest failure leaves the window, and
//! a successful login forgets its failures. Password checks from one source take turns, and
//! each re-reads the failure count when its turn comes: otherwise a burst of simultaneous
//! guesses would all be checked before the first failure was counted. Both tables are bounded
//! so a flood of addresses cannot grow them without limit.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::time::Instant;

use crate::config::Limits;

/// Source addresses tracked for failed logins; beyond this the stalest are dropped.
const MAX_TRACKED_SOURCES: usize = 10_000;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Global,
    /// This source address holds all the slots it may.
    PerSource,
}

impl Refused {
    /// The limit's name in metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Global => "global",
            Refused::PerSource => "per_source",
        }
    }

    /// The one line the client hears before the connection is closed.
    pub fn reply(self) -> &'static [u8] {
        match self {
            Refused::Global => b"421 4.3.2 Too many connections, try again later\r\n",
            Refused::PerSource => {
                b"421 4.7.0 Too many connections from your address, try again later\r\n"
            }
        }
    }
}

/// Connection slots and login failures, shared by every listener and kept across reloads
/// (a reload changes the limits, not the counts).
pub struct Guard {
    limits: std::sync::RwLock<Limits>,
    slots: Mutex<Slots>,
    failures: Mutex<HashMap<IpAddr, VecDeque<Instant>>>,
    /// One lock per source with a password check waiting or running.
    turns: Mutex<HashMap<IpAddr, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Default)]
struct Slots {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// One admitted connection's slot; released on drop.
pub struct Permit {
    guard: Arc<Guard>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut slots = lock(&self.guard.slots);
        slots.total = slots.total.saturating_sub(1);
        if let Some(n) = slots.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                slots.per_source.remove(&self.source);
            }
        }
    }
}

impl Guard {
    pub fn new(limits: Limits) -> Arc<Guard> {
        Arc::new(Guard {
            limits: std::sync::RwLock::new(limits),
            slots: Mutex::new(Slots::default()),
            failures: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
        })
    }

    /// Takes a slot for a connection from `source`, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refused> {
        let source = crate::config::canonical_ip(source);
        let limits = self.limits();
        let mut slots = lock(&self.slots);
        if slots.total >= limits.max_connections {
            return Err(Refused::Global);
        }
        let mine = slots.per_source.entry(source).or_insert(0);
        if *mine >= limits.max_connections_per_source {
            return Err(Refused::PerSource);
        }
        *mine += 1;
        slots.total += 1;
        Ok(Permit {
            guard: Arc::clone(self),
            source,
        })
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        lock(&self.slots).total
    }

    /// Waits until no other password check from `source` is running, then holds the turn
    /// until the returned guard is dropped. Check [`Guard::login_allowed`] after this, not
    /// before: the failures of the checks that went first count.
    pub async fn login_turn(&self, source: IpAddr) -> tokio::sync::OwnedMutexGuard<()> {
        let source = crate::config::canonical_ip(source);
        let lock = {
            let mut turns = lock(&self.turns);
            // Sources nobody is waiting for are forgotten, so the table stays small.
            if turns.len() >= MAX_TRACKED_SOURCES {
                turns.retain(|_, l| Arc::strong_count(l) > 1);
            }
            Arc::clone(turns.entry(source).or_default())
        };
        lock.lock_owned().await
    }

    /// Whether `source` may try to log in now.
    pub fn login_allowed(&self, source: IpAddr) -> bool {
        let source = crate::config::canonical_ip(source);
        let mut failures = lock(&self.failures);
        let Some(times) = failures.get_mut(&source) else {
            return true;
        };
        self.forget_old(times);
        let allowed = times.len() < self.limits().auth_failures as usize;
        if times.is_empty() {
            failures.remove(&source);
        }
        allowed
    }

    /// Records a failed login; true when this failure made the source reach the limit (the
    /// moment to log it).
    pub fn login_failed(&self, source: IpAddr) -> bool {
        let source = crate::config::canonical_ip(source);
        let mut failures = lock(&self.failures);
        if failures.len() >= MAX_TRACKED_SOURCES && !failures.contains_key(&source) {
            self.make_room(&mut failures);
        }
        let times = failures.entry(source).or_default();
        self.forget_old(times);
        times.push_back(Instant::now());
        times.len() == self.limits().auth_failures as usize
    }

    /// A successful login forgets the source's failures.
    pub fn login_succeeded(&self, source: IpAddr) {
        let source = crate::config::canonical_ip(source);
        lock(&self.failures).remove(&source);
    }

    pub fn limits(&self) -> Limits {
        *self.limits.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// New limits (a reload); connections beyond a lowered limit are not cut, new ones wait.
    pub fn set_limits(&self, limits: Limits) {
        *self.limits.write().unwrap_or_else(PoisonError::into_inner) = limits;
    }

    fn forget_old(&self, times: &mut VecDeque<Instant>) {
        let window = self.limits().auth_failure_window;
        while times.front().is_some_and(|t| t.elapsed() >= window) {
            times.pop_front();
        }
    }

    /// Drops expired entries, and if that is not enough, the source whose last failure is
    /// oldest.
    fn make_room(&self, failures: &mut HashMap<IpAddr, VecDeque<Instant>>) {
        failures.retain(|_, times| {
            self.forget_old(times);
            !times.is_empty()
        });
        if failures.len() >= MAX_TRACKED_SOURCES
            && let Some(stalest) = failures
                .iter()
                .min_by_key(|(_, times)| times.back().copied())
                .map(|(ip, _)| *ip)
        {
            failures.remove(&stalest);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The counters stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn guard(global: usize, per_source: usize) -> Arc<Guard> {
        Guard::new(Limits {
            max_connections: global,
            max_connections_per_source: per_source,
            auth_failures: 3,
            auth_failure_window: Duration::from_secs(60),
        })
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn slots_per_source_and_global() {
        let g = guard(3, 2);
        let a1 = g.admit(ip("10.0.0.1")).unwrap();
        let _a2 = g.admit(ip("::ffff:10.0.0.1")).unwrap();
        assert_eq!(
            g.admit(ip("10.0.0.1")).err(),
            Some(Refused::PerSource),
            "mapped IPv4 counts as the same source"
        );
        let _b1 = g.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(g.admit(ip("10.0.0.3")).err(), Some(Refused::Global));
        assert_eq!(g.connections(), 3);
        drop(a1);
        assert_eq!(g.connections(), 2);
        assert!(g.admit(ip("10.0.0.3")).is_ok(), "a slot came back");
        assert_eq!(g.connections(), 2, "the temporary permit was dropped too");
        assert!(
            std::str::from_utf8(Refused::Global.reply())
                .unwrap()
                .starts_with("421 4.3.2")
        );
        assert!(
            std::str::from_utf8(Refused::PerSource.reply())
                .unwrap()
                .starts_with("421 4.7.0")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_logins_throttle_one_source_for_the_window() {
        let g = guard(10, 10);
        let attacker = ip("10.0.0.9");
        let other = ip("10.0.0.10");
        assert!(!g.login_failed(attacker));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(!g.login_failed(attacker));
        assert!(g.login_allowed(attacker));
        assert!(
            g.login_failed(attacker),
            "the third failure reaches the limit"
        );
        assert!(!g.login_allowed(attacker));
        assert!(g.login_allowed(other), "other sources are not affected");
        // The first failure leaves the window 60 s after it happened.
        tokio::time::advance(Duration::from_secs(39)).await;
        assert!(!g.login_allowed(attacker));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(g.login_allowed(attacker));
        // A success forgets everything.
        g.login_failed(attacker);
        g.login_succeeded(attacker);
        assert!(g.login_allowed(attacker));
        assert!(!g.login_failed(attacker));
    }

    #[tokio::test]
    async fn simultaneous_checks_from_one_source_take_turns() {
        let g = guard(10, 10);
        let source = ip("10.0.0.9");
        let first = g.login_turn(source).await;
        let g2 = Arc::clone(&g);
        let mut second = tokio::spawn(async move { g2.login_turn(source).await });
        tokio::task::yield_now().await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut second)
                .await
                .is_err(),
            "the second check waits for the first"
        );
        // Another source is not held up.
        drop(g.login_turn(ip("10.0.0.10")).await);
        drop(first);
        let _second = second.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_table_stays_bounded() {
        let g = guard(10, 10);
        for i in 0..(MAX_TRACKED_SOURCES as u32 + 50) {
            g.login_failed(IpAddr::from(i.to_be_bytes()));
        }
        assert!(lock(&g.failures).len() <= MAX_TRACKED_SOURCES);
    }
}
