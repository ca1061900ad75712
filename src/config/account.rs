//! Local users (`[[accounts]]`): the username and password a legacy client sends, the mailbox
//! it sends as, and the identity whose tokens it uses.
//!
//! Several accounts may share one identity (one device each, each with its own password). An
//! account whose username is `*@example.com` admits every mailbox of that domain with one
//! password, each sending as itself; it must use an app-only identity, since a delegated token
//! only speaks for its own user.

use std::fmt;

use crate::config::identity::{Flow, Identity, Provider, UpstreamSettings};
use crate::config::policy::{AccountPolicy, check_account_policy};
use crate::config::raw::RawAccount;
use crate::config::{ConfigError, err};

/// A local user.
pub struct Account {
    /// Short name for logs (default: the username).
    pub name: String,
    /// Lower-cased; either an address matched exactly (case-insensitively) or `*@domain`.
    pub username: String,
    /// PHC string of the argon2 hash of the local password.
    pub password_hash: String,
    /// The address put in XOAUTH2's `user=`; `None` for a `*@domain` account, which sends
    /// as whichever mailbox the client named.
    pub mailbox: Option<String>,
    /// The identity whose tokens this account uses.
    pub identity: String,
    /// The identity's provider and upstream, copied here for the session.
    pub provider: Provider,
    pub upstream: UpstreamSettings,
    /// Which senders it may use, and which networks may send as it without logging in.
    pub policy: AccountPolicy,
}

impl Account {
    /// Whether this is a `*@domain` account.
    pub fn is_pattern(&self) -> bool {
        self.username.starts_with("*@")
    }

    /// The mailbox a client logging in as `username` sends as, if this account admits it.
    /// `username` must already be lower-cased.
    pub fn mailbox_for(&self, username: &str) -> Option<String> {
        match &self.mailbox {
            Some(mailbox) if self.username == username => Some(mailbox.clone()),
            Some(_) => None,
            None => {
                let domain = &self.username[1..];
                let local = username.strip_suffix(domain)?;
                is_local_part(local).then(|| username.to_string())
            }
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("username", &self.username)
            .field("mailbox", &self.mailbox)
            .field("identity", &self.identity)
            .field("provider", &self.provider)
            .field("upstream", &self.upstream)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} via {})", self.name, self.username, self.identity)
    }
}

/// An unquoted RFC 5322 local part: atext and single dots, nothing that could change the
/// meaning of the XOAUTH2 string (no control bytes, no spaces) and nothing empty.
fn is_local_part(local: &str) -> bool {
    const SPECIALS: &[u8] = b"!#$%&'*+-/=?^_`{|}~";
    !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || SPECIALS.contains(&b))
}

/// The checked account, and the identity it declares inline (an account that carries its own
/// OAuth settings is its own identity, named after the account).
pub(super) fn check_account(
    i: usize,
    mut raw: RawAccount,
    sandbox_on: bool,
) -> Result<(PendingAccount, Option<Identity>), ConfigError> {
    let key = |field: &str| format!("accounts[{i}].{field}");
    let oauth = raw.take_oauth();

    let username = raw
        .username
        .take()
        .ok_or_else(|| err(key("username"), "missing"))?
        .trim()
        .to_ascii_lowercase();
    if username.is_empty() {
        return Err(err(key("username"), "must not be empty"));
    }
    let pattern = username.starts_with('*');
    if pattern && !is_domain_pattern(&username) {
        return Err(err(
            key("username"),
            "a pattern must be \"*@domain\" (every mailbox of one domain)",
        ));
    }
    if !pattern && username.contains('*') {
        return Err(err(
            key("username"),
            "\"*\" is only allowed as \"*@domain\"",
        ));
    }
    let name = raw.name.take().unwrap_or_else(|| username.clone());
    let password_hash = raw.password_hash.take().ok_or_else(|| {
        err(
            key("password_hash"),
            "missing (make one with `smtp-oauth-bridge hash-password`)",
        )
    })?;
    crate::users::check_hash(&password_hash).map_err(|problem| {
        err(
            key("password_hash"),
            format!("{problem} (make one with `smtp-oauth-bridge hash-password`)"),
        )
    })?;
    let mailbox = match (raw.mailbox.take(), pattern) {
        (Some(_), true) => {
            return Err(err(
                key("mailbox"),
                "a \"*@domain\" account sends as the mailbox the client names; remove mailbox",
            ));
        }
        (Some(m), false) => Some(m),
        (None, false) => Some(username.clone()),
        (None, true) => None,
    };
    if let Some(m) = &mailbox
        && (!m.contains('@') || m.bytes().any(|b| b.is_ascii_control() || b == b' '))
    {
        return Err(err(key("mailbox"), "must be an e-mail address"));
    }

    let policy = check_account_policy(
        &key,
        raw.allowed_senders.take(),
        raw.check_from_header.take(),
        raw.no_auth_sources.take(),
    )?;
    if pattern && !policy.no_auth_sources.is_empty() {
        return Err(err(
            key("no_auth_sources"),
            "a \"*@domain\" account has no single mailbox to send as without a login",
        ));
    }

    let (identity_name, inline) = match raw.identity.take() {
        Some(identity) => {
            if let Some(first) = oauth.given_keys().first() {
                return Err(err(
                    key(first),
                    format!(
                        "belongs in [[identities]] \"{identity}\": an account that names an \
                         identity carries no OAuth settings"
                    ),
                ));
            }
            (identity, None)
        }
        None => {
            let identity =
                crate::config::identity::check_identity(name.clone(), oauth, &key, sandbox_on)?;
            (name.clone(), Some(identity))
        }
    };
    Ok((
        PendingAccount {
            index: i,
            name,
            username,
            password_hash,
            mailbox,
            identity: identity_name,
            policy,
        },
        inline,
    ))
}

/// An account whose identity is not resolved yet (identities may come later in the file).
pub(super) struct PendingAccount {
    pub(super) index: usize,
    name: String,
    username: String,
    password_hash: String,
    mailbox: Option<String>,
    pub(super) identity: String,
    policy: AccountPolicy,
}

impl PendingAccount {
    /// Completes the account with its identity, checking that they fit together.
    pub(super) fn resolve(self, identity: &Identity) -> Result<Account, ConfigError> {
        let key = |field: &str| format!("accounts[{}].{field}", self.index);
        if self.mailbox.is_none() && identity.oauth.flow != Flow::ClientCredentials {
            return Err(err(
                key("username"),
                "a \"*@domain\" account needs an app-only identity (flow = \
                 \"client_credentials\"): a delegated token sends only as its own user",
            ));
        }
        if identity.provider != Provider::Sandbox && crate::users::is_demo_hash(&self.password_hash)
        {
            return Err(err(
                key("password_hash"),
                "is the sandbox demo password, which only sandbox accounts may use \
                 (make a new one with `smtp-oauth-bridge hash-password`)",
            ));
        }
        Ok(Account {
            name: self.name,
            username: self.username,
            password_hash: self.password_hash,
            mailbox: self.mailbox,
            identity: identity.name.clone(),
            provider: identity.provider,
            upstream: identity.upstream.clone(),
            policy: self.policy,
        })
    }
}

fn is_domain_pattern(username: &str) -> bool {
    let Some(domain) = username.strip_prefix("*@") else {
        return false;
    };
    !domain.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern_account() -> Account {
        Account {
            name: "all".into(),
            username: "*@contoso.com".into(),
            password_hash: String::new(),
            mailbox: None,
            identity: "app".into(),
            provider: Provider::Office365,
            upstream: UpstreamSettings {
                host: "smtp.office365.com".into(),
                port: 587,
                tls: crate::config::UpstreamTls::Starttls,
            },
            policy: AccountPolicy::default(),
        }
    }

    #[test]
    fn a_domain_pattern_admits_plain_mailboxes_of_that_domain_only() {
        let a = pattern_account();
        assert_eq!(
            a.mailbox_for("scanner@contoso.com").as_deref(),
            Some("scanner@contoso.com")
        );
        assert_eq!(
            a.mailbox_for("first.last+tag@contoso.com").as_deref(),
            Some("first.last+tag@contoso.com")
        );
        for refused in [
            "@contoso.com",
            "a@sub.contoso.com",
            "a@contoso.com.evil",
            "a@evilcontoso.com",
            "a b@contoso.com",
            "a\u{1}auth=Bearer x@contoso.com",
            ".a@contoso.com",
            "a..b@contoso.com",
            "a@b@contoso.com",
        ] {
            assert_eq!(a.mailbox_for(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn domain_patterns_are_checked() {
        assert!(is_domain_pattern("*@contoso.com"));
        assert!(!is_domain_pattern("*@"));
        assert!(!is_domain_pattern("*contoso.com"));
        assert!(!is_domain_pattern("*@*.com"));
        assert!(!is_domain_pattern("*@localhost"));
    }
}
