//! Logging setup: one subscriber for the whole process, its level from the configuration and
//! `RUST_LOG`, its output chosen by where stderr goes.
//!
//! When stderr is the journal (`JOURNAL_STREAM` names the same socket), each line starts with
//! a syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug) that journald turns
//! into the entry's priority and strips, so `journalctl -p warning` works; timestamps and
//! colours are left to journald. Lines keep their fields (session id, client, account) because
//! that is what an administrator reads in `journalctl -u`. Elsewhere the output is plain text
//! with timestamps, or JSON when configured.

use std::fmt;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Dependencies stay at `warn` unless asked for.
pub fn init_logging(settings: &LogSettings) {
    let filter = filter(&settings.level);
    let journal = stderr_is_journal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match (settings.format, journal) {
        (LogFormat::Json, true) => builder
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format().json().without_time(),
            ))
            .try_init(),
        (LogFormat::Json, false) => builder.json().try_init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .event_format(SyslogPriority(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .with_level(false)
                    .with_ansi(false)
                    .without_time(),
            ))
            .try_init(),
        (LogFormat::Text, false) => builder
            .with_target(false)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}

fn filter(level: &str) -> EnvFilter {
    let default = format!("warn,smtp_oauth_bridge={level}");
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .unwrap_or_else(|_| EnvFilter::new("warn,smtp_oauth_bridge=info"))
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for the stream it connected to stdout/stderr; a
/// child whose stderr was redirected inherits the variable but not the stream, so compare.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(parse_journal_stream) else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => meta.dev() == dev && meta.ino() == ino,
        Err(_) => false,
    }
}

fn parse_journal_stream(text: &str) -> Option<(u64, u64)> {
    let (dev, ino) = text.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

/// The syslog priority journald reads from a `<N>` line prefix.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Wraps an event format with the `<N>` priority prefix.
struct SyslogPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for SyslogPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_values_parse_and_levels_map_to_syslog_priorities() {
        assert_eq!(parse_journal_stream("8:12345"), Some((8, 12345)));
        assert_eq!(parse_journal_stream("8"), None);
        assert_eq!(parse_journal_stream("x:1"), None);
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
    }
}
