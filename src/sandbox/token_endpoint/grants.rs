//! The grants of the token path: client credentials (PROTOCOL.md §2.2–2.3), refresh token
//! with Entra's rotation (§2.6), authorization code with PKCE, and device code (§2.8).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::sandbox::http::HttpResponse;
use crate::sandbox::random;
use crate::sandbox::token_endpoint::EndpointState;
use crate::sandbox::token_endpoint::client_auth::{Assertion, ClientAuth};
use crate::sandbox::token_endpoint::errors::{
    entra_error, expired_grant, lock, missing_parameter, printable, unknown_application,
};

/// Entra's default refresh-token lifetime (PROTOCOL.md §2.6).
const REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Entra refresh tokens are opaque, about 800 characters, and start with "0.A".
const REFRESH_TOKEN_RANDOM_BYTES: usize = 597;
/// Scopes that ask for sign-in artefacts rather than an API permission; Entra leaves them
/// out of the `scope` it returns with the access token.
const NON_RESOURCE_SCOPES: [&str; 4] = ["offline_access", "openid", "profile", "email"];
/// Tenants on which Entra refuses app-only grants (PROTOCOL.md §2.1).
const MULTI_TENANT_ALIASES: [&str; 2] = ["common", "consumers"];
pub(super) const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// What a refresh token stands for.
pub(super) struct RefreshGrant {
    client_id: String,
    subject: String,
    scope: String,
    expires_at: Instant,
    /// Set on first redemption when rotating; the token dies a grace period later.
    used_at: Option<Instant>,
}

impl EndpointState {
    pub(super) fn grant(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        auth: &ClientAuth,
        assertion: Option<&Assertion>,
    ) -> HttpResponse {
        let grant_type = form.get("grant_type").map(String::as_str);
        if grant_type == Some("client_credentials") {
            return self.client_credentials(tenant, form, auth, assertion);
        }
        let Some(client_id) = auth.client_id.as_deref() else {
            return missing_parameter(if grant_type.is_none() {
                "grant_type"
            } else {
                "client_id"
            });
        };
        let delegated = matches!(
            grant_type,
            Some("refresh_token" | "authorization_code" | DEVICE_GRANT)
        );
        if delegated && let Err(response) = self.authenticate(client_id, auth, form, assertion) {
            return response;
        }
        match grant_type {
            None => missing_parameter("grant_type"),
            Some("refresh_token") => self.refresh(client_id, form),
            Some("authorization_code") => self.redeem_code(client_id, form),
            Some(DEVICE_GRANT) => self.poll_device(client_id, form),
            Some(other) => entra_error(
                400,
                "unsupported_grant_type",
                70003,
                &format!(
                    "The app requested an unsupported grant type '{}'.",
                    printable(other, 64)
                ),
            ),
        }
    }

    /// App-only tokens (PROTOCOL.md §2.2, §2.3).
    fn client_credentials(
        &self,
        tenant: &str,
        form: &HashMap<String, String>,
        auth: &ClientAuth,
        assertion: Option<&Assertion>,
    ) -> HttpResponse {
        if MULTI_TENANT_ALIASES.contains(&tenant.to_ascii_lowercase().as_str()) {
            return entra_error(
                400,
                "invalid_request",
                9001023,
                "The grant type isn't supported over the /common or /consumers endpoints. \
                 Please use the /organizations or tenant-specific endpoint.",
            );
        }
        let Some(client_id) = auth.client_id.as_deref() else {
            return missing_parameter("client_id");
        };
        let Some(scope) = form.get("scope") else {
            return missing_parameter("scope");
        };
        if self.registration(client_id).is_none() {
            return unknown_application(client_id, tenant);
        }
        if let Err(response) = self.authenticate(client_id, auth, form, assertion) {
            return response;
        }
        let scope = scope.trim();
        if scope.is_empty() || scope.contains(char::is_whitespace) || !scope.ends_with("/.default")
        {
            let message = format!(
                "The provided value for scope {} is not valid. Client credential flows must have \
                 a scope value with /.default suffixed to the resource identifier (application \
                 ID URI).",
                printable(scope, 200)
            );
            return entra_error(400, "invalid_scope", 1002012, &message);
        }

        let lifetime = self.config.access_token_lifetime;
        let issued = self.registry.issue(client_id, None, scope, lifetime);
        HttpResponse::json(
            200,
            &json!({
                "token_type": "Bearer",
                "expires_in": lifetime.as_secs(),
                "ext_expires_in": lifetime.as_secs(),
                "access_token": issued.access_token,
            }),
        )
    }

    /// Delegated tokens from a refresh token, with Entra's rotation (PROTOCOL.md §2.6).
    fn refresh(&self, client_id: &str, form: &HashMap<String, String>) -> HttpResponse {
        let Some(refresh_token) = form.get("refresh_token") else {
            return missing_parameter("refresh_token");
        };
        // Entra insists on scope even for a refresh (§2.2, tarickb/sasl-xoauth2#89).
        let Some(scope) = form.get("scope") else {
            return missing_parameter("scope");
        };
        let now = Instant::now();
        let grace = self.config.used_refresh_token_grace;
        let (subject, granted_scope) = {
            let mut grants = lock(&self.refresh_grants);
            // Drop grants that can never be redeemed again, so rotation does not pile them up.
            grants.retain(|_, g| {
                now < g.expires_at && g.used_at.is_none_or(|used| still_valid(used, grace, now))
            });
            let Some(grant) = grants.get_mut(refresh_token.as_str()) else {
                return expired_grant();
            };
            if grant.client_id != client_id {
                return entra_error(
                    400,
                    "invalid_grant",
                    70000,
                    "Provided grant is invalid or malformed.",
                );
            }
            if self.config.rotate_refresh_tokens && grant.used_at.is_none() {
                grant.used_at = Some(now);
            }
            (grant.subject.clone(), grant.scope.clone())
        };
        self.delegated_tokens(client_id, &subject, scope, &granted_scope)
    }

    /// An access token for a user, and (when rotating, or when offline access was granted)
    /// a new refresh token.
    pub(super) fn delegated_tokens(
        &self,
        client_id: &str,
        subject: &str,
        requested_scope: &str,
        granted_scope: &str,
    ) -> HttpResponse {
        let returned_scope = resource_scopes(requested_scope);
        let lifetime = self.config.access_token_lifetime;
        let issued = self
            .registry
            .issue(client_id, Some(subject), &returned_scope, lifetime);
        let mut body = json!({
            "token_type": "Bearer",
            "scope": returned_scope,
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": issued.access_token,
        });
        if self.config.rotate_refresh_tokens
            && granted_scope
                .split_whitespace()
                .any(|s| s == "offline_access")
        {
            body["refresh_token"] =
                json!(self.new_refresh_token(client_id, subject, granted_scope));
        }
        HttpResponse::json(200, &body)
    }

    pub(super) fn new_refresh_token(&self, client_id: &str, subject: &str, scope: &str) -> String {
        let token = format!("0.A{}", random::base64url(REFRESH_TOKEN_RANDOM_BYTES));
        let grant = RefreshGrant {
            client_id: client_id.to_string(),
            subject: subject.to_string(),
            scope: scope.to_string(),
            expires_at: Instant::now() + REFRESH_TOKEN_LIFETIME,
            used_at: None,
        };
        lock(&self.refresh_grants).insert(token.clone(), grant);
        token
    }

    pub(super) fn refresh_token_valid(&self, refresh_token: &str) -> bool {
        let now = Instant::now();
        let grace = self.config.used_refresh_token_grace;
        lock(&self.refresh_grants)
            .get(refresh_token)
            .is_some_and(|g| {
                now < g.expires_at && g.used_at.is_none_or(|used| still_valid(used, grace, now))
            })
    }
}

/// Whether a token used at `used` is inside its grace period at `now`. A grace too large to
/// add to an `Instant` never runs out.
fn still_valid(used: Instant, grace: Duration, now: Instant) -> bool {
    used.checked_add(grace)
        .is_none_or(|deadline| now < deadline)
}

/// The requested scopes minus sign-in-only ones, as Entra echoes them.
fn resource_scopes(scope: &str) -> String {
    let kept: Vec<&str> = scope
        .split_whitespace()
        .filter(|s| !NON_RESOURCE_SCOPES.contains(&s.to_ascii_lowercase().as_str()))
        .collect();
    if kept.is_empty() {
        scope.trim().to_string()
    } else {
        kept.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_echoed_without_sign_in_scopes() {
        assert_eq!(
            resource_scopes("https://outlook.office.com/SMTP.Send offline_access openid"),
            "https://outlook.office.com/SMTP.Send"
        );
        assert_eq!(resource_scopes("offline_access"), "offline_access");
    }
}
