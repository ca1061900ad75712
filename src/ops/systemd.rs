//! The systemd side of the service protocol: readiness and state notifications
//! (`Type=notify`), watchdog keep-alives sent from the async runtime, and listening sockets
//! inherited through socket activation (`LISTEN_FDS`).
//!
//! Every function is a no-op outside systemd, so the daemon runs the same from a shell.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the bridge is serving (listeners bound, configuration checked).
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd a configuration reload has begun; `ready` ends it. The monotonic time goes
/// with it, as systemd (v253 and later) wants, so it can tell this reload from an earlier one.
pub fn reloading() {
    let mut states = vec![
        NotifyState::Reloading,
        NotifyState::Status("reloading the configuration"),
    ];
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => tracing::debug!(error = %e, "cannot read the monotonic clock"),
    }
    notify(&states);
}

/// Tells systemd the bridge is draining and will exit.
pub fn stopping() {
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("draining: finishing sessions in flight"),
    ]);
}

pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Pings systemd's watchdog at half its interval from a task on the runtime, so a runtime that
/// stops scheduling tasks stops the pings and systemd restarts the bridge. `None` when the
/// unit has no `WatchdogSec=`.
pub fn spawn_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let interval = sd_notify::watchdog_enabled()?;
    let period = (interval / 2).max(Duration::from_millis(10));
    tracing::debug!(
        interval_ms = interval.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    }))
}

/// Takes the listening TCP sockets systemd passed (socket activation). Must run before any
/// thread is started: it reads and clears `LISTEN_FDS`/`LISTEN_PID`.
pub fn inherited_listeners() -> Result<Vec<std::net::TcpListener>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::with_capacity(fds.len());
    for i in 0..fds.len() {
        match fds.take_tcp_listener(i) {
            Ok(Some(listener)) => listeners.push(listener),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "socket {i} passed by systemd is not a listening TCP socket: {e} \
                     (smtp-oauth-bridge.socket needs ListenStream= lines only)"
                ));
            }
        }
    }
    Ok(listeners)
}
