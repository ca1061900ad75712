//! Known failures and their fixes: Entra's AADSTS error codes and the provider's SMTP replies,
//! each mapped to what it means and the one thing an administrator should do about it.
//!
//! `doctor` prints these under a failed check, and the daemon adds them to its warning and
//! error lines when the same failures happen at run time, so the journal says why mail stopped
//! and what to do in one place. Meanings follow Microsoft's published error reference and the
//! replies observed from Office365 and Gmail (see ARCHITECTURE.md).

use crate::smtp::Reply;

/// What a failure means and how to fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hint {
    /// The code the hint is keyed by, as it appears in the error (`AADSTS70008`, `5.7.139`).
    pub code: &'static str,
    pub meaning: &'static str,
    pub fix: &'static str,
}

impl std::fmt::Display for Hint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.meaning, self.fix)
    }
}

const fn hint(code: &'static str, meaning: &'static str, fix: &'static str) -> Hint {
    Hint { code, meaning, fix }
}

/// Entra ID (Microsoft identity platform) error codes, by number.
pub const AADSTS: &[(u32, Hint)] = &[
    (
        700082,
        hint(
            "AADSTS700082",
            "the refresh token expired after 90 days without use",
            "sign in again: `smtp-oauth-bridge login NAME`",
        ),
    ),
    (
        70008,
        hint(
            "AADSTS70008",
            "the refresh token expired or was revoked",
            "sign in again: `smtp-oauth-bridge login NAME`",
        ),
    ),
    (
        50173,
        hint(
            "AADSTS50173",
            "the grant was revoked (password change or sessions revoked)",
            "sign in again: `smtp-oauth-bridge login NAME`",
        ),
    ),
    (
        70043,
        hint(
            "AADSTS70043",
            "a Conditional Access sign-in frequency policy expired the refresh token",
            "exclude this mailbox or app from the sign-in frequency policy, or switch the account to flow = \"client_credentials\"",
        ),
    ),
    (
        50076,
        hint(
            "AADSTS50076",
            "multi-factor authentication is required for this sign-in",
            "use flow = \"client_credentials\" (app-only), or sign in again with MFA: `smtp-oauth-bridge login NAME`",
        ),
    ),
    (
        50079,
        hint(
            "AADSTS50079",
            "the user must enrol in multi-factor authentication",
            "complete MFA enrolment for the mailbox, then sign in again: `smtp-oauth-bridge login NAME`",
        ),
    ),
    (
        53003,
        hint(
            "AADSTS53003",
            "blocked by a Conditional Access policy",
            "check the Entra sign-in log for the policy that blocked it and exempt this app or the bridge's address",
        ),
    ),
    (
        65001,
        hint(
            "AADSTS65001",
            "the application has no consent for the requested permission",
            "grant admin consent for SMTP.SendAsApp (app-only) or SMTP.Send (delegated) under API permissions",
        ),
    ),
    (
        7000215,
        hint(
            "AADSTS7000215",
            "the client secret is wrong",
            "put the secret's Value (not its Secret ID) in client_secret_file, then reload",
        ),
    ),
    (
        7000222,
        hint(
            "AADSTS7000222",
            "the client secret has expired",
            "create a new secret under Certificates & secrets, store it in client_secret_file, then reload",
        ),
    ),
    (
        7000218,
        hint(
            "AADSTS7000218",
            "the request carried no client secret or assertion",
            "set client_secret_file (or client_secret_env) for this account",
        ),
    ),
    (
        700016,
        hint(
            "AADSTS700016",
            "no application with this client id exists in the tenant",
            "check client_id (Application (client) ID) and tenant (Directory (tenant) ID) against the app registration",
        ),
    ),
    (
        900144,
        hint(
            "AADSTS900144",
            "the token request lacks a required parameter (usually scope)",
            "remove any empty `scopes` override so the bridge sends its default scopes",
        ),
    ),
    (
        500133,
        hint(
            "AADSTS500133",
            "the client assertion is outside its validity time: the clock is wrong",
            "synchronise this host's clock (timedatectl set-ntp true)",
        ),
    ),
    (
        700027,
        hint(
            "AADSTS700027",
            "the client assertion's signature did not verify",
            "upload the certificate matching the configured key to the app registration",
        ),
    ),
    (
        9001023,
        hint(
            "AADSTS9001023",
            "this grant type is not allowed on the common or consumers endpoint",
            "set tenant to the tenant id or domain (e.g. contoso.onmicrosoft.com), not common",
        ),
    ),
    (
        7000012,
        hint(
            "AADSTS7000012",
            "the refresh token was issued for a different tenant",
            "sign in again (`smtp-oauth-bridge login NAME`); the grant is refreshed where it was issued",
        ),
    ),
    (
        90002,
        hint(
            "AADSTS90002",
            "the tenant does not exist",
            "check tenant: the Directory (tenant) ID or a verified domain",
        ),
    ),
    (
        50057,
        hint(
            "AADSTS50057",
            "the user account is disabled",
            "enable the mailbox's account in Entra ID",
        ),
    ),
    (
        700025,
        hint(
            "AADSTS700025",
            "a public client sent a client secret",
            "remove client_secret from this account, or register the app as a confidential client",
        ),
    ),
    (
        50196,
        hint(
            "AADSTS50196",
            "Entra detected a request loop and is throttling",
            "wait; the bridge backs off by itself. If it repeats, check that only one bridge uses this account",
        ),
    ),
];

/// Provider SMTP replies, by enhanced status code. `text` narrows codes that Office365 uses
/// for several causes (554 5.2.0).
struct ReplyHint {
    code: u16,
    enhanced: &'static str,
    text: Option<&'static str>,
    hint: Hint,
}

const REPLIES: &[ReplyHint] = &[
    ReplyHint {
        code: 535,
        enhanced: "5.7.3",
        text: None,
        hint: hint(
            "535 5.7.3",
            "the provider refused the access token for this mailbox",
            "grant the app SMTP.SendAsApp with admin consent, register it with New-ServicePrincipal, and give it Add-MailboxPermission on the mailbox",
        ),
    },
    ReplyHint {
        code: 535,
        enhanced: "5.7.139",
        text: None,
        hint: hint(
            "535 5.7.139",
            "SMTP AUTH is disabled for the tenant or mailbox (or security defaults block it)",
            "run Set-CASMailbox -Identity MAILBOX -SmtpClientAuthenticationDisabled $false (or Set-TransportConfig for the tenant)",
        ),
    },
    ReplyHint {
        code: 530,
        enhanced: "5.7.57",
        text: None,
        hint: hint(
            "530 5.7.57",
            "the provider saw MAIL before a successful AUTH",
            "the upstream session lost its login; check earlier AUTH errors for this account",
        ),
    },
    ReplyHint {
        code: 554,
        enhanced: "5.2.252",
        text: None,
        hint: hint(
            "554 5.2.252",
            "SendAsDenied: the mailbox may not send as this From address",
            "send as the mailbox itself, or grant Add-RecipientPermission -AccessRights SendAs for the other address",
        ),
    },
    ReplyHint {
        code: 554,
        enhanced: "5.2.0",
        text: Some("SubmissionQuotaExceeded"),
        hint: hint(
            "554 5.2.0",
            "the mailbox reached its daily limit of 10,000 recipients",
            "wait for the 24-hour window to pass, or spread the mail over more mailboxes",
        ),
    },
    ReplyHint {
        code: 554,
        enhanced: "5.2.0",
        text: Some("SendAsDenied"),
        hint: hint(
            "554 5.2.0",
            "SendAsDenied: the mailbox may not send as this From address",
            "send as the mailbox itself, or grant Add-RecipientPermission -AccessRights SendAs for the other address",
        ),
    },
    ReplyHint {
        code: 554,
        enhanced: "5.2.0",
        text: None,
        hint: hint(
            "554 5.2.0",
            "the provider's store refused the submission",
            "read the STOREDRV exception named in the reply; quota and SendAs are the usual causes",
        ),
    },
    ReplyHint {
        code: 432,
        enhanced: "4.3.2",
        text: None,
        hint: hint(
            "432 4.3.2",
            "more than 3 concurrent connections for this mailbox",
            "lower how many clients send through this account at once; the client's retry will succeed",
        ),
    },
    ReplyHint {
        code: 421,
        enhanced: "4.7.66",
        text: None,
        hint: hint(
            "421 4.7.66",
            "the provider saw TLS 1.0 or 1.1",
            "the bridge speaks TLS 1.2+; a TLS-inspecting proxy between it and the provider is downgrading the connection",
        ),
    },
    ReplyHint {
        code: 501,
        enhanced: "5.5.127",
        text: None,
        hint: hint(
            "501 5.5.127",
            "the access token was about to expire",
            "nothing to do: the bridge fetches a fresh token and retries once; if it repeats, check the host clock",
        ),
    },
    ReplyHint {
        code: 550,
        enhanced: "5.7.30",
        text: None,
        hint: hint(
            "550 5.7.30",
            "basic authentication (a password) reached the provider",
            "point the client at the bridge instead of the provider; the bridge only ever sends tokens",
        ),
    },
    ReplyHint {
        code: 554,
        enhanced: "5.2.2",
        text: None,
        hint: hint(
            "554 5.2.2",
            "the sending mailbox is full (sent mail is copied to Sent Items)",
            "free space in the mailbox or raise its quota",
        ),
    },
    ReplyHint {
        code: 550,
        enhanced: "5.7.60",
        text: None,
        hint: hint(
            "550 5.7.60",
            "the client may not send as this sender",
            "use the mailbox's own address as envelope sender and From, or grant SendAs",
        ),
    },
    ReplyHint {
        code: 535,
        enhanced: "5.7.8",
        text: None,
        hint: hint(
            "535 5.7.8",
            "Gmail refused the access token",
            "check the account's scopes include https://mail.google.com/ and that the token belongs to this address",
        ),
    },
];

/// Office365's continuous-error throttling replies (550 5.2.251 to 5.2.255).
const THROTTLED: Hint = hint(
    "550 5.2.25x",
    "the mailbox is throttled after continuous submission errors",
    "fix the underlying error named in the reply and wait; Microsoft lifts the block itself",
);

/// The hint for an AADSTS number.
pub fn for_aadsts(code: u32) -> Option<&'static Hint> {
    AADSTS.iter().find(|(c, _)| *c == code).map(|(_, h)| h)
}

/// The hint for the first `AADSTSnnnn` found in `text` (a token endpoint's error description).
pub fn for_text(text: &str) -> Option<&'static Hint> {
    let mut rest = text;
    while let Some(at) = rest.find("AADSTS") {
        let digits: String = rest[at + 6..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if let Some(hint) = digits.parse().ok().and_then(for_aadsts) {
            return Some(hint);
        }
        rest = &rest[at + 6..];
    }
    None
}

/// The hint for a provider's SMTP reply.
pub fn for_reply(reply: &Reply) -> Option<&'static Hint> {
    let enhanced = reply.enhanced()?;
    if reply.code() == 550 && matches!(enhanced, "5.2.251" | "5.2.253" | "5.2.254" | "5.2.255") {
        return Some(&THROTTLED);
    }
    let text = reply.text();
    REPLIES
        .iter()
        .filter(|r| r.code == reply.code() && r.enhanced == enhanced)
        .find(|r| r.text.is_none_or(|t| text.contains(t)))
        .map(|r| &r.hint)
}

/// The one-line fix for a reply, for a log field.
pub fn fix_for_reply(reply: &Reply) -> Option<&'static str> {
    for_reply(reply).map(|h| h.fix)
}

/// The one-line fix for an error text holding an AADSTS code, for a log field.
pub fn fix_for_text(text: &str) -> Option<&'static str> {
    for_text(text).map(|h| h.fix)
}

/// How many failures the table knows.
pub fn known_failures() -> usize {
    AADSTS.len() + REPLIES.len() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_the_failures_administrators_meet() {
        for code in [
            700082, 70008, 50173, 70043, 50076, 53003, 65001, 7000215, 7000222, 700016, 900144,
            500133, 700027, 9001023,
        ] {
            let hint = for_aadsts(code).unwrap_or_else(|| panic!("AADSTS{code} missing"));
            assert_eq!(hint.code, format!("AADSTS{code}"));
            assert!(!hint.fix.is_empty());
        }
        for (line, expected) in [
            (
                "535 5.7.3 Authentication unsuccessful [AM0P190CA0001]",
                "535 5.7.3",
            ),
            (
                "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.",
                "535 5.7.139",
            ),
            (
                "530 5.7.57 Client not authenticated to send mail",
                "530 5.7.57",
            ),
            (
                "554 5.2.252 SendAsDenied; a@contoso.com not allowed to send as b@contoso.com",
                "554 5.2.252",
            ),
            (
                "432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded",
                "432 4.3.2",
            ),
            (
                "421 4.7.66 TLS 1.0 and 1.1 are not supported.",
                "421 4.7.66",
            ),
            (
                "501 5.5.127 Invalid XOAUTH2 auth data - Token will expire soon",
                "501 5.5.127",
            ),
            (
                "550 5.7.30 Basic authentication is not supported for Client Submission.",
                "550 5.7.30",
            ),
            (
                "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
                "554 5.2.0",
            ),
        ] {
            let (reply, _) = crate::smtp::parse_reply(format!("{line}\r\n").as_bytes())
                .unwrap()
                .unwrap();
            let hint = for_reply(&reply).unwrap_or_else(|| panic!("no hint for {line}"));
            assert_eq!(hint.code, expected, "{line}");
        }
        assert!(known_failures() >= 20);
    }

    #[test]
    fn the_same_code_gets_the_hint_its_text_calls_for() {
        let parse = |line: &str| {
            crate::smtp::parse_reply(format!("{line}\r\n").as_bytes())
                .unwrap()
                .unwrap()
                .0
        };
        let quota = for_reply(&parse(
            "554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException",
        ))
        .unwrap();
        assert!(quota.meaning.contains("10,000"));
        let send_as = for_reply(&parse(
            "554 5.2.0 STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied",
        ))
        .unwrap();
        assert!(send_as.meaning.contains("SendAsDenied"));
        let throttled = for_reply(&parse(
            "550 5.2.253 Sender throttled due to continuous invalid license errors",
        ))
        .unwrap();
        assert_eq!(throttled.code, "550 5.2.25x");
        assert!(for_reply(&parse("250 2.0.0 OK")).is_none());
        assert!(for_reply(&parse("550 5.1.1 User unknown")).is_none());
    }

    #[test]
    fn aadsts_codes_are_found_inside_error_descriptions() {
        let text = "account needs an administrator: invalid_client: AADSTS7000222: The provided client secret keys for app '...' are expired.";
        assert_eq!(for_text(text).unwrap().code, "AADSTS7000222");
        // The longest number wins: AADSTS700082 is not AADSTS70008.
        assert_eq!(
            for_text("invalid_grant: AADSTS700082: expired due to inactivity")
                .unwrap()
                .code,
            "AADSTS700082"
        );
        assert!(for_text("AADSTS1 unknown, then AADSTS50173: revoked").is_some());
        assert!(for_text("throttled (HTTP 429)").is_none());
        assert!(for_text("AADSTS").is_none());
    }
}
