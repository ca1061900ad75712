//! Running as a service: logging setup, the systemd protocol (readiness, watchdog, inherited
//! sockets), metrics and health with their loopback HTTP listener, and `doctor`.

pub mod admin;
pub mod doctor;
pub mod logging;
pub mod metrics;
pub mod systemd;

pub use logging::init_logging;
pub use metrics::Metrics;
