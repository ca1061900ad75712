//! smtp-oauth-bridge: a local SMTP submission server for legacy clients that only know
//! `AUTH PLAIN`/`AUTH LOGIN`, relaying their mail to Office365 or Gmail with `AUTH XOAUTH2`
//! and OAuth2 access tokens the bridge obtains and keeps fresh.
//!
//! The module list is the map (see ARCHITECTURE.md for the path of a message):

pub mod cli;
pub mod config;
pub mod credentials;
pub mod hints;
pub mod io;
pub mod oauth;
pub mod ops;
pub mod sandbox;
pub mod server;
pub mod smtp;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod users;
