//! Answers in Entra's error shape (PROTOCOL.md §2.7): `error`, an `error_description` that
//! starts with the AADSTS code and ends with trace and correlation ids, `error_codes`, and
//! the scripted failures tests ask for.

use std::sync::{Mutex, MutexGuard, PoisonError};

use serde_json::json;

use crate::sandbox::http::HttpResponse;
use crate::sandbox::token_endpoint::TokenFailure;
use crate::sandbox::{clock, random};

pub(super) fn scripted_failure(failure: &TokenFailure) -> HttpResponse {
    match failure {
        TokenFailure::Status500 => entra_error(
            500,
            "server_error",
            50000,
            "There was an error issuing a token or an issue with our sign-in service.",
        ),
        TokenFailure::TooManyRequests { retry_after_secs } => entra_error(
            429,
            "temporarily_unavailable",
            90055,
            "Too many requests have been received. Please try again later.",
        )
        .header("Retry-After", retry_after_secs.to_string()),
        TokenFailure::Garbage => HttpResponse::with_body(200, "text/html", b"<html>oops".to_vec()),
        TokenFailure::InvalidGrant => expired_grant(),
        TokenFailure::TemporarilyUnavailable => entra_error(
            503,
            "temporarily_unavailable",
            90033,
            "A transient error has occurred. Please try again.",
        ),
        TokenFailure::ExpiredSecret => entra_error(
            401,
            "invalid_client",
            7000222,
            "The provided client secret keys for app are expired.",
        ),
        TokenFailure::SlowDown => entra_error(
            400,
            "slow_down",
            70016,
            "The client is polling too often; slow down.",
        ),
    }
}

pub(super) fn expired_grant() -> HttpResponse {
    entra_error(
        400,
        "invalid_grant",
        70008,
        "The provided authorization code or refresh token has expired due to inactivity. Send \
         a new interactive authorization request for this user and resource.",
    )
}

pub(super) fn missing_parameter(name: &str) -> HttpResponse {
    let message = format!("The request body must contain the following parameter: '{name}'.");
    entra_error(400, "invalid_request", 900144, &message)
}

pub(super) fn unknown_application(client_id: &str, tenant: &str) -> HttpResponse {
    let message = format!(
        "Application with identifier '{}' was not found in the directory '{}'.",
        printable(client_id, 64),
        printable(tenant, 64)
    );
    entra_error(400, "unauthorized_client", 700016, &message)
}

/// An error body in Entra's shape (PROTOCOL.md §2.7).
pub(super) fn entra_error(status: u16, error: &str, code: u32, message: &str) -> HttpResponse {
    let (trace_id, correlation_id, timestamp) = trace();
    let description = format!(
        "AADSTS{code}: {message} Trace ID: {trace_id} Correlation ID: {correlation_id} \
         Timestamp: {timestamp}"
    );
    HttpResponse::json(
        status,
        &json!({
            "error": error,
            "error_description": description,
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

/// Trace id, correlation id and timestamp, as Entra attaches to every error.
pub(super) fn trace() -> (String, String, String) {
    (
        random::guid(),
        random::guid(),
        clock::UtcDateTime::now().entra(),
    )
}

/// Peer text echoed in an error: printable ASCII only, bounded.
pub(super) fn printable(text: &str, max: usize) -> String {
    text.chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect()
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values stay consistent even if a holder panicked.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
