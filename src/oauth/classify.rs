//! Sorting endpoint failures: by the `error` field first (Microsoft asks clients to branch on
//! it), then by HTTP status. Grants the provider refuses for good become
//! [`TokenError::NeedsLogin`] with the AADSTS code and a one-line hint; everything that may
//! pass (5xx, timeouts, network, `temporarily_unavailable`, throttling) becomes
//! [`TokenError::Transient`], with `Retry-After` kept for a 429.

use crate::config::Flow;
use crate::oauth::TokenError;
use crate::oauth::endpoint::EndpointError;

/// Entra's throttling of user flows, which arrives dressed as `invalid_grant` (AADSTS50196,
/// "loop detected") or as tenant throttling (AADSTS90055): wait, do not ask for a login.
const THROTTLING_AADSTS: [u32; 2] = [50196, 90055];

/// Turns an endpoint failure into what the refresh logic and sessions act on. `login` names
/// the command an administrator would run to fix a refused grant.
pub fn classify(error: EndpointError, flow: Flow, login: &str) -> TokenError {
    match error {
        EndpointError::OAuth {
            status,
            error,
            description,
            aadsts,
            retry_after,
        } => {
            let reason = if description.is_empty() {
                error.clone()
            } else {
                format!("{error}: {description}")
            };
            if status == 429 || aadsts.is_some_and(|c| THROTTLING_AADSTS.contains(&c)) {
                return TokenError::Transient {
                    reason: format!("throttled (HTTP {status}): {reason}"),
                    retry_after,
                };
            }
            if status >= 500 || matches!(error.as_str(), "temporarily_unavailable" | "server_error")
            {
                return TokenError::Transient {
                    reason: format!("HTTP {status}: {reason}"),
                    retry_after,
                };
            }
            if is_permanent(&error) {
                let hint = hint(&error, aadsts, flow, login);
                return TokenError::NeedsLogin {
                    reason,
                    code: Some(error),
                    aadsts,
                    hint,
                };
            }
            // An error this bridge does not know: retrying with back-off costs little, and
            // giving up on an account for good because of a new word would cost more.
            TokenError::Transient {
                reason: format!("HTTP {status}: {reason}"),
                retry_after,
            }
        }
        EndpointError::Status {
            status,
            retry_after,
        } => TokenError::Transient {
            reason: if status == 429 {
                "throttled (HTTP 429)".into()
            } else {
                format!("unexpected answer (HTTP {status})")
            },
            retry_after: if status == 429 || status == 503 {
                retry_after
            } else {
                None
            },
        },
        EndpointError::Transport(reason) => TokenError::transient(reason),
        EndpointError::Unreadable { status, len } => {
            TokenError::transient(format!("unreadable answer (HTTP {status}, {len} bytes)"))
        }
    }
}

fn is_permanent(error: &str) -> bool {
    matches!(
        error,
        "invalid_grant"
            | "interaction_required"
            | "consent_required"
            | "login_required"
            | "invalid_client"
            | "unauthorized_client"
            | "invalid_scope"
            | "invalid_request"
            | "unsupported_grant_type"
            | "access_denied"
    )
}

/// What an administrator should do, in one line: the fix from the table of known AADSTS
/// codes (shared with `doctor`), else one by the `error` field and the flow.
pub fn hint(error: &str, aadsts: Option<u32>, flow: Flow, login: &str) -> String {
    let identity = login.rsplit(' ').next().unwrap_or("NAME");
    if let Some(known) = aadsts.and_then(crate::hints::for_aadsts) {
        return known.fix.replace("NAME", identity);
    }
    match (error, flow) {
        ("invalid_client", _) => {
            "the application's credential is refused: check the client secret or certificate".into()
        }
        ("unauthorized_client", _) => {
            "the application may not use this grant: check the app registration".into()
        }
        ("invalid_scope", _) => "a scope is refused: check the identity's scopes".into(),
        (_, Flow::RefreshToken) => format!("run `{login}` to sign in again"),
        (_, Flow::ClientCredentials) => {
            "the token endpoint refuses the application: check its registration and permissions"
                .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn oauth(status: u16, error: &str, aadsts: Option<u32>) -> EndpointError {
        EndpointError::OAuth {
            status,
            error: error.into(),
            description: format!("AADSTS{}: something", aadsts.unwrap_or(0)),
            aadsts,
            retry_after: Some(Duration::from_secs(60)),
        }
    }

    fn permanent(e: EndpointError) -> bool {
        classify(e, Flow::RefreshToken, "login x").is_permanent()
    }

    #[test]
    fn refused_grants_need_an_administrator() {
        for (error, code) in [
            ("invalid_grant", 70008),
            ("interaction_required", 50076),
            ("invalid_client", 7000215),
            ("unauthorized_client", 700016),
        ] {
            assert!(permanent(oauth(400, error, Some(code))), "{error}");
        }
        match classify(
            oauth(400, "invalid_grant", Some(700082)),
            Flow::RefreshToken,
            "L",
        ) {
            TokenError::NeedsLogin {
                code, aadsts, hint, ..
            } => {
                assert_eq!(code.as_deref(), Some("invalid_grant"));
                assert_eq!(aadsts, Some(700082));
                assert!(hint.contains("smtp-oauth-bridge login"), "{hint}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn transient_failures_and_throttling_retry() {
        for e in [
            oauth(503, "temporarily_unavailable", Some(90033)),
            oauth(500, "server_error", Some(50000)),
            oauth(400, "temporarily_unavailable", None),
            oauth(400, "invalid_grant", Some(50196)),
            oauth(400, "some_new_error", None),
            EndpointError::Status {
                status: 502,
                retry_after: None,
            },
            EndpointError::Transport("timed out".into()),
            EndpointError::Unreadable {
                status: 200,
                len: 10,
            },
        ] {
            assert!(!permanent(e.clone()), "{e:?}");
        }
        match classify(
            oauth(429, "temporarily_unavailable", Some(90055)),
            Flow::ClientCredentials,
            "L",
        ) {
            TokenError::Transient { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(60)))
            }
            other => panic!("{other:?}"),
        }
        match classify(
            EndpointError::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(7)),
            },
            Flow::ClientCredentials,
            "L",
        ) {
            TokenError::Transient { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)))
            }
            other => panic!("{other:?}"),
        }
    }
}
