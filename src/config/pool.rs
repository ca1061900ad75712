//! The `[pool]` table: how authenticated upstream sessions are kept between client sessions,
//! and how many one mailbox may have open at once.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, err};

/// Office365 refuses a fourth concurrent session per mailbox with `432 4.3.2`.
pub const DEFAULT_MAX_SESSIONS: usize = 3;

/// Checked `[pool]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    /// Upstream sessions one account may have open at once, idle or busy.
    pub max_sessions: usize,
    /// How long a client transaction waits for a free session before it gets `451 4.3.2`.
    pub wait: Duration,
    /// A session that carried this many messages is closed instead of reused.
    pub max_messages: u32,
    /// A session idle longer than this is checked with NOOP before it is reused.
    pub noop_after: Duration,
    /// An idle session is closed (QUIT) after this long without use, before the provider's
    /// own idle timeout cuts it and while it still holds one of the mailbox's slots.
    pub max_idle: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_sessions: DEFAULT_MAX_SESSIONS,
            wait: Duration::from_secs(60),
            max_messages: 100,
            noop_after: Duration::from_secs(20),
            max_idle: Duration::from_secs(45),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    max_sessions: Option<usize>,
    wait: Option<u64>,
    max_messages: Option<u32>,
    noop_after: Option<u64>,
    max_idle: Option<u64>,
}

/// Checks `[pool]`. A session's maximum age is `timeouts.upstream_max_age`, which predates
/// the pool; it is checked here because only pooled sessions live long enough to matter.
pub(super) fn check_pool(raw: &RawPool, max_age: Duration) -> Result<PoolSettings, ConfigError> {
    let d = PoolSettings::default();
    let seconds = |key: &str, value: Option<u64>, default: Duration| {
        super::timeout(format!("pool.{key}"), value, default)
    };
    let max_sessions = match raw.max_sessions {
        Some(0) => return Err(err("pool.max_sessions", "must be at least 1")),
        Some(n) if n > 1000 => return Err(err("pool.max_sessions", "must be at most 1000")),
        Some(n) => n,
        None => d.max_sessions,
    };
    let max_messages = match raw.max_messages {
        Some(0) => return Err(err("pool.max_messages", "must be at least 1")),
        Some(n) => n,
        None => d.max_messages,
    };
    let settings = PoolSettings {
        max_sessions,
        wait: seconds("wait", raw.wait, d.wait)?,
        max_messages,
        noop_after: seconds("noop_after", raw.noop_after, d.noop_after)?,
        max_idle: seconds("max_idle", raw.max_idle, d.max_idle)?,
    };
    if max_age > Duration::from_secs(20 * 60) {
        // Office365 cuts sessions after about 20 minutes; one cut mid-transaction costs the
        // client a retry.
        return Err(err(
            "timeouts.upstream_max_age",
            "must be at most 1200 seconds (20 minutes)",
        ));
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawPool {
        use figment::providers::{Format, Toml};
        figment::Figment::from(Toml::string(text))
            .extract()
            .expect("valid test TOML")
    }

    #[test]
    fn defaults_and_overrides() {
        let ten_minutes = Duration::from_secs(600);
        assert_eq!(
            check_pool(&raw(""), ten_minutes).unwrap(),
            PoolSettings::default()
        );
        let s = check_pool(
            &raw("max_sessions = 5\nwait = 2\nmax_messages = 7\nnoop_after = 3\nmax_idle = 9"),
            Duration::from_secs(300),
        )
        .unwrap();
        assert_eq!(s.max_sessions, 5);
        assert_eq!(s.wait, Duration::from_secs(2));
        assert_eq!(s.max_messages, 7);
        assert_eq!(s.noop_after, Duration::from_secs(3));
        assert_eq!(s.max_idle, Duration::from_secs(9));
    }

    #[test]
    fn bad_values_name_the_key() {
        let ten_minutes = Duration::from_secs(600);
        for (text, key) in [
            ("max_sessions = 0", "pool.max_sessions"),
            ("max_sessions = 5000", "pool.max_sessions"),
            ("wait = 0", "pool.wait"),
            ("max_messages = 0", "pool.max_messages"),
            ("noop_after = 0", "pool.noop_after"),
            ("max_idle = 0", "pool.max_idle"),
        ] {
            let e = check_pool(&raw(text), ten_minutes).unwrap_err();
            assert_eq!(e.key, key, "{text}");
        }
        let e = check_pool(&raw(""), Duration::from_secs(1201)).unwrap_err();
        assert_eq!(e.key, "timeouts.upstream_max_age");
    }
}
