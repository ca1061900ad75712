//! The one background task that keeps every identity's tokens fresh: it refreshes an access
//! token `refresh_margin` before it expires (at most half its lifetime before, counted from
//! `expires_in` at receipt), redeems a refresh token that has not been used for `keepalive`
//! so it never dies of inactivity, retries transient failures with jittered exponential
//! back-off (a 429 waits its `Retry-After`), and stops asking for an identity the provider
//! refused until its token file changes. It also writes the status file `accounts` reads.
//!
//! Every clock here is tokio's, so the tests drive days of schedule with a paused clock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use crate::config::Flow;
use crate::oauth::AccessToken;
use crate::oauth::TokenError;
use crate::oauth::manager::Inner;
use crate::oauth::slot::{Obtained, Phase, Slot, SlotState};
use crate::oauth::status::StatusFile;
use crate::store::unix_now;

/// The first retry after a transient failure waits about this long; each further failure
/// doubles it, up to `backoff_max`.
const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// A `Retry-After` longer than this is capped: an hour is already a long silence.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);
/// How often the task looks at identities that need a login (has `login` run?), at most.
const STORE_POLL: Duration = Duration::from_secs(30);
/// How long a notify command may run before it is killed.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(60);

pub(super) async fn run(inner: Arc<Inner>) {
    loop {
        let now = Instant::now();
        let mut next = now + STORE_POLL;
        for slot in &inner.slots() {
            let start = {
                let mut st = slot.lock();
                match due(&inner, slot, &st, now) {
                    Some(at) if at <= now => {
                        st.in_flight = true;
                        true
                    }
                    Some(at) => {
                        next = next.min(at);
                        false
                    }
                    None => false,
                }
            };
            if start {
                Arc::clone(&inner).spawn_attempt(Arc::clone(slot), true);
            }
        }
        if inner.status_dirty.swap(false, Ordering::AcqRel) {
            write_status(&inner);
        }
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = inner.wake.notified() => {}
        }
    }
}

/// When the identity's next background attempt is due; `None` while one runs or while it
/// waits for an administrator.
fn due(inner: &Inner, slot: &Slot, st: &SlotState, now: Instant) -> Option<Instant> {
    if st.in_flight {
        return None;
    }
    let keepalive = match slot.identity.oauth.flow {
        Flow::RefreshToken => st.keepalive_due,
        Flow::ClientCredentials => None,
    };
    let earliest = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    match st.phase {
        Phase::NeedsLogin => inner.store_changed(slot, st).then_some(now),
        Phase::BackingOff { until, .. } => Some(until),
        Phase::Idle => earliest(inner.settings.prefetch.then_some(now), keepalive),
        Phase::Ok => {
            let access = st.token.as_ref().map_or(now, |h| h.refresh_at);
            earliest(Some(access), keepalive)
        }
    }
}

/// Records an attempt's outcome in the slot, then logs it and wakes the task. Returns the
/// outcome as sessions see it (for the metrics).
pub(super) fn finish(
    inner: &Inner,
    slot: &Slot,
    result: Result<Obtained, TokenError>,
) -> Result<AccessToken, TokenError> {
    let name = &slot.identity.name;
    let now = Instant::now();
    let event = {
        let mut st = slot.lock();
        st.in_flight = false;
        st.last_attempt = Some(now);
        let before = st.phase;
        match result {
            Ok(obtained) => {
                st.record_success(obtained, now, &inner.settings);
                let left = st
                    .token
                    .as_ref()
                    .map_or(Duration::ZERO, |h| h.token.expires_at - now);
                Event::Obtained {
                    left,
                    recovered: matches!(before, Phase::NeedsLogin | Phase::BackingOff { .. }),
                }
            }
            Err(error) if error.is_permanent() => {
                st.phase = Phase::NeedsLogin;
                st.failures += 1;
                st.login_version = inner.store.as_ref().and_then(|s| s.version(name));
                st.last_error = Some(error.clone());
                Event::Refused {
                    error,
                    first: before != Phase::NeedsLogin,
                }
            }
            Err(error) => {
                st.failures += 1;
                let (wait, throttled) = match &error {
                    TokenError::Transient {
                        retry_after: Some(after),
                        ..
                    } => ((*after).min(MAX_RETRY_AFTER), true),
                    _ => (backoff(st.failures, inner.settings.backoff_max), false),
                };
                st.phase = Phase::BackingOff {
                    until: now + wait,
                    throttled,
                };
                st.last_error = Some(error.clone());
                Event::Failed { error, wait }
            }
        }
    };
    let outcome = {
        let st = slot.lock();
        match (&st.token, &st.last_error) {
            (_, Some(error)) => Err(error.clone()),
            (Some(held), None) => Ok(held.token.clone()),
            (None, None) => Err(TokenError::transient("no token was obtained")),
        }
    };
    inner.status_dirty.store(true, Ordering::Release);
    inner.wake.notify_one();
    event.log(name, inner.settings.notify_command.as_deref());
    outcome
}

enum Event {
    Obtained { left: Duration, recovered: bool },
    Refused { error: TokenError, first: bool },
    Failed { error: TokenError, wait: Duration },
}

impl Event {
    fn log(self, name: &str, notify: Option<&[String]>) {
        match self {
            Event::Obtained { left, recovered } => {
                tracing::info!(
                    identity = %name,
                    expires_in_s = left.as_secs(),
                    "access token obtained{}",
                    if recovered { " (identity works again)" } else { "" }
                );
            }
            Event::Refused { error, first: true } => {
                let (code, aadsts, hint) = match &error {
                    TokenError::NeedsLogin {
                        code, aadsts, hint, ..
                    } => (
                        code.clone().unwrap_or_else(|| "-".into()),
                        aadsts
                            .map(|c| format!("AADSTS{c}"))
                            .unwrap_or_else(|| "-".into()),
                        hint.clone(),
                    ),
                    _ => ("-".into(), "-".into(), "see the reason".into()),
                };
                tracing::error!(
                    identity = %name,
                    error = %code,
                    aadsts = %aadsts,
                    hint = %hint,
                    reason = %error,
                    "identity needs an administrator; no more token requests until then"
                );
                if let Some(argv) = notify {
                    run_notify(argv, name, &format!("{error} (hint: {hint})"));
                }
            }
            Event::Refused {
                error,
                first: false,
            } => {
                tracing::debug!(identity = %name, reason = %error, "still refused");
            }
            Event::Failed { error, wait } => {
                tracing::warn!(
                    identity = %name,
                    reason = %error,
                    retry_in_s = wait.as_secs(),
                    "cannot obtain an access token; retrying later"
                );
            }
        }
    }
}

/// Exponential back-off with jitter: about 5 s, 10 s, 20 s… up to `max`, each drawn
/// uniformly from the upper half of its range so many bridges do not retry in step.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << doublings).min(max);
    let mut bytes = [0u8; 4];
    let fraction = if SystemRandom::new().fill(&mut bytes).is_ok() {
        f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX)
    } else {
        0.5
    };
    ceiling / 2 + ceiling.mul_f64(fraction / 2.0)
}

/// Runs the administrator's notify command with the identity and the reason as arguments
/// (and in `SMTP_OAUTH_BRIDGE_IDENTITY` / `SMTP_OAUTH_BRIDGE_REASON`). No shell is involved.
fn run_notify(argv: &[String], identity: &str, reason: &str) {
    let Some((program, args)) = argv.split_first() else {
        return;
    };
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(500)
        .collect();
    let spawned = tokio::process::Command::new(program)
        .args(args)
        .arg(identity)
        .arg(&reason)
        .env("SMTP_OAUTH_BRIDGE_IDENTITY", identity)
        .env("SMTP_OAUTH_BRIDGE_REASON", &reason)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(command = %program, error = %e, "cannot run the notify command");
            return;
        }
    };
    let program = program.clone();
    tokio::spawn(async move {
        match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) if status.success() => {
                tracing::debug!(command = %program, "notify command done");
            }
            Ok(Ok(status)) => {
                tracing::warn!(command = %program, %status, "notify command failed");
            }
            Ok(Err(e)) => tracing::warn!(command = %program, error = %e, "notify command failed"),
            Err(_) => {
                tracing::warn!(command = %program, "notify command still running after 60 s; killed");
            }
        }
    });
}

fn write_status(inner: &Inner) {
    let Some(store) = inner.store.as_ref().filter(|_| !inner.probe) else {
        return;
    };
    let file = StatusFile {
        pid: std::process::id(),
        started: inner.started,
        written: unix_now(),
        identities: inner.status(),
    };
    let bytes = match serde_json::to_vec_pretty(&file) {
        Ok(b) => b,
        Err(_) => return,
    };
    if let Err(e) = store.write_status(&bytes) {
        tracing::warn!(error = %e, "cannot write the status file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_stops_at_the_cap() {
        let max = Duration::from_secs(600);
        for _ in 0..50 {
            let first = backoff(1, max);
            assert!((Duration::from_millis(2500)..=Duration::from_secs(5)).contains(&first));
            let third = backoff(3, max);
            assert!((Duration::from_secs(10)..=Duration::from_secs(20)).contains(&third));
            let late = backoff(40, max);
            assert!((Duration::from_secs(300)..=max).contains(&late), "{late:?}");
        }
    }
}
