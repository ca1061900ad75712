//! Sans-I/O SMTP core: pure functions and small state machines over bytes.
//!
//! Nothing in this module performs I/O, reads a clock or logs. Callers own the
//! sockets and feed bytes in; these types only decide what the bytes mean and
//! what bytes to send back. That keeps every protocol decision unit-testable
//! and makes the security-relevant parts (reply framing, DATA framing, SASL
//! decoding) independent of the async runtime.

pub mod command;
pub mod data;
pub mod ehlo;
#[doc(hidden)]
pub mod fuzz;
pub mod headers;
pub mod line;
pub mod reply;
pub mod sasl;

pub use crate::smtp::data::{DataFramer, Feed};
pub use crate::smtp::ehlo::{Capabilities, parse_ehlo};
pub use crate::smtp::line::{LineStatus, find_line};
pub use crate::smtp::reply::{MAX_WIRE_REPLY_LINE, Reply, ReplyError, parse_reply};
