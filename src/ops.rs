//! Process-level plumbing: logging setup.
//!
//! Under systemd (`JOURNAL_STREAM` set) lines go to stderr without colours or timestamps,
//! because journald adds its own. `RUST_LOG` overrides the configured level.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Dependencies stay at `warn` unless asked for.
pub fn init_logging(settings: &LogSettings) {
    let default = format!("warn,smtp_oauth_bridge={}", settings.level);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("warn,smtp_oauth_bridge=info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    // Colours only on a terminal: redirected logs (files, pipes, the journal) stay plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false);
    let result = match (settings.format, under_journald) {
        (LogFormat::Json, _) => builder.json().try_init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().try_init(),
        (LogFormat::Text, false) => builder.try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
