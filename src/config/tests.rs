//! Checks of the configuration layer: defaults, presets, identities shared by accounts,
//! `*@domain` accounts, and errors that name the key but never the value.

use super::*;
use secrecy::ExposeSecret;

fn hash() -> String {
    crate::users::hash_password("pw").unwrap()
}

fn office365(extra: &str) -> String {
    office365_with_hash(&hash(), extra)
}

fn office365_with_hash(hash: &str, extra: &str) -> String {
    format!(
        "[[accounts]]\nusername = \"Printer@Contoso.com\"\npassword_hash = \"{hash}\"\n\
         tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"app\"\nclient_secret = \"hunter2-secret\"\n{extra}"
    )
}

#[test]
fn office365_defaults() {
    let config = Config::from_toml_str(&office365("")).unwrap();
    let account = &config.accounts[0];
    assert_eq!(account.username, "printer@contoso.com");
    assert_eq!(account.mailbox.as_deref(), Some("printer@contoso.com"));
    let identity = config.identity(&account.identity).unwrap();
    assert_eq!(identity.oauth.flow, Flow::ClientCredentials);
    assert_eq!(
        identity.oauth.token_url,
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(
        identity.oauth.scopes,
        vec!["https://outlook.office365.com/.default"]
    );
    assert_eq!(account.upstream.host, "smtp.office365.com");
    assert_eq!(account.upstream.port, 587);
    assert_eq!(account.upstream.tls, UpstreamTls::Starttls);
    assert_eq!(config.server.max_message_size, OFFICE365_MAX_SIZE);
    let loopback: Vec<SocketAddr> = vec![
        "127.0.0.1:1587".parse().unwrap(),
        "[::1]:1587".parse().unwrap(),
    ];
    assert_eq!(
        config.server.listen, loopback,
        "both loopback families by default"
    );
    assert!(config.account_by_username("PRINTER@contoso.COM").is_some());
    // State apart from the configuration: systemd's StateDirectory= when it sets one.
    if std::env::var_os("STATE_DIRECTORY").is_none() {
        assert_eq!(
            config.store.directory,
            PathBuf::from("/var/lib/smtp-oauth-bridge")
        );
    }
}

#[test]
fn errors_name_the_key_never_the_value() {
    let text = office365("").replace(
        "client_secret = \"hunter2-secret\"",
        "client_secret = [\"hunter2-secret\"]",
    );
    let e = Config::from_toml_str(&text).err().unwrap();
    assert_eq!(e.key, "accounts[0].client_secret");
    assert!(!e.to_string().contains("hunter2"), "{e}");

    let text = office365("").replace("tenant", "tennant");
    let e = Config::from_toml_str(&text).err().unwrap();
    assert_eq!(e.key, "accounts[0].tennant");
    assert!(e.problem.contains("unknown key"));

    let e = Config::from_toml_str(&office365("").replace("client_id = \"app\"\n", ""))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].client_id");

    let e = Config::from_toml_str(&format!(
        "[server]\nlisten = [\"0.0.0.0:25\"]\n{}",
        office365("")
    ))
    .err()
    .unwrap();
    assert_eq!(e.key, "server.listen[0]");
}

#[test]
fn debug_output_hides_the_client_secret() {
    let config = Config::from_toml_str(&office365("")).unwrap();
    let text = format!("{config:?}");
    assert!(text.contains("printer@contoso.com"));
    assert!(!text.contains("hunter2"));
}

#[test]
fn demo_password_is_refused_outside_the_sandbox() {
    let text = office365_with_hash(crate::users::DEMO_PASSWORD_HASH, "");
    let e = Config::from_toml_str(&text).err().unwrap();
    assert_eq!(e.key, "accounts[0].password_hash");
}

#[test]
fn gmail_defaults_and_upstream_override() {
    let text = format!(
        "[[accounts]]\nusername = \"a@gmail.com\"\npassword_hash = \"{}\"\nprovider = \"gmail\"\nclient_id = \"x\"\n",
        hash()
    );
    let config = Config::from_toml_str(&text).unwrap();
    let a = &config.accounts[0];
    assert_eq!(config.identities[0].oauth.flow, Flow::RefreshToken);
    assert_eq!(
        (a.upstream.host.as_str(), a.upstream.port),
        ("smtp.gmail.com", 465)
    );
    assert_eq!(a.upstream.tls, UpstreamTls::Implicit);
    assert_eq!(config.server.max_message_size, GMAIL_MAX_SIZE);

    let config = Config::from_toml_str(&office365("upstream = \"[::1]:2525\"\n")).unwrap();
    let u = &config.accounts[0].upstream;
    assert_eq!(
        (u.host.as_str(), u.port, u.tls),
        ("::1", 2525, UpstreamTls::Starttls)
    );
}

fn shared_identity_config(extra_accounts: &str) -> String {
    format!(
        r#"
[[identities]]
name = "contoso-app"
tenant = "contoso.onmicrosoft.com"
client_id = "app"
client_secret = "hunter2-secret"

[[accounts]]
name = "printer-1"
username = "printer1"
password_hash = "{h}"
mailbox = "printer@contoso.com"
identity = "contoso-app"

[[accounts]]
name = "printer-2"
username = "printer2"
password_hash = "{h}"
mailbox = "printer@contoso.com"
identity = "contoso-app"

[[accounts]]
name = "everyone"
username = "*@Contoso.com"
password_hash = "{h}"
identity = "contoso-app"
{extra_accounts}
"#,
        h = hash()
    )
}

#[test]
fn several_accounts_share_one_identity_and_a_domain_pattern_sends_as_each_mailbox() {
    let config = Config::from_toml_str(&shared_identity_config("")).unwrap();
    assert_eq!(config.identities.len(), 1);
    assert!(config.accounts.iter().all(|a| a.identity == "contoso-app"));
    assert_eq!(config.accounts_of("contoso-app").count(), 3);

    let (i, mailbox) = config.find_account("PRINTER2").unwrap();
    assert_eq!(
        (config.accounts[i].name.as_str(), mailbox.as_str()),
        ("printer-2", "printer@contoso.com")
    );
    let (i, mailbox) = config.find_account("Scanner@Contoso.com").unwrap();
    assert_eq!(config.accounts[i].name, "everyone");
    assert_eq!(mailbox, "scanner@contoso.com");
    assert!(config.find_account("scanner@fabrikam.com").is_none());
    assert!(config.find_account("x\u{1}y@contoso.com").is_none());
    // `login` and `import-token` find the identity through any of its accounts.
    assert_eq!(
        config.identity_for("printer-1").map(|i| i.name.as_str()),
        Some("contoso-app")
    );
}

#[test]
fn an_exact_account_wins_over_the_domain_pattern() {
    let extra = format!(
        "[[accounts]]\nname = \"ceo\"\nusername = \"ceo@contoso.com\"\npassword_hash = \"{}\"\n\
         identity = \"contoso-app\"\n",
        hash()
    );
    let config = Config::from_toml_str(&shared_identity_config(&extra)).unwrap();
    let (i, _) = config.find_account("ceo@contoso.com").unwrap();
    assert_eq!(config.accounts[i].name, "ceo");
}

#[test]
fn identity_errors_name_the_key() {
    let cases: Vec<(String, &str, &str)> = vec![
        (
            shared_identity_config("").replacen(
                "identity = \"contoso-app\"",
                "identity = \"nope\"",
                1,
            ),
            "accounts[0].identity",
            "names no [[identities]] entry",
        ),
        (
            shared_identity_config("").replacen(
                "identity = \"contoso-app\"",
                "identity = \"contoso-app\"\ntenant = \"x\"",
                1,
            ),
            "accounts[0].tenant",
            "belongs in [[identities]]",
        ),
        (
            shared_identity_config("").replace("mailbox = \"printer@contoso.com\"\nidentity = \"contoso-app\"\n\n[[accounts]]\nname = \"everyone\"", "mailbox = \"printer@contoso.com\"\nidentity = \"contoso-app\"\n\n[[accounts]]\nname = \"everyone\"\nmailbox = \"x@contoso.com\""),
            "accounts[2].mailbox",
            "remove mailbox",
        ),
        (
            shared_identity_config("").replace("*@Contoso.com", "*contoso.com"),
            "accounts[2].username",
            "*@domain",
        ),
        (
            shared_identity_config("").replace(
                "client_secret = \"hunter2-secret\"",
                "client_secret = \"hunter2-secret\"\nflow = \"refresh_token\"",
            ),
            "accounts[2].username",
            "app-only identity",
        ),
        (
            shared_identity_config("").replace("name = \"contoso-app\"", "name = \"printer-1\""),
            "accounts[0].identity",
            "names no",
        ),
    ];
    for (text, key, problem) in cases {
        let e = Config::from_toml_str(&text).err().unwrap();
        assert_eq!(e.key, key, "{e}");
        assert!(e.problem.contains(problem), "{e}");
        assert!(!e.to_string().contains("hunter2"));
    }
    // An account with its own OAuth settings may not take the name of an explicit identity.
    let text = format!(
        "{}\n{}",
        shared_identity_config(""),
        office365("name = \"contoso-app\"\n").replace("Printer@Contoso.com", "other@contoso.com")
    );
    let e = Config::from_toml_str(&text).err().unwrap();
    assert_eq!(e.key, "accounts[3].name");
}

#[test]
fn provider_presets_and_overrides() {
    let config = Config::from_toml_str(&office365("flow = \"refresh_token\"\n")).unwrap();
    let oauth = &config.identities[0].oauth;
    let base = "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0";
    assert_eq!(
        oauth.authorize_url.as_deref(),
        Some(&*format!("{base}/authorize"))
    );
    assert_eq!(
        oauth.device_code_url.as_deref(),
        Some(&*format!("{base}/devicecode"))
    );
    assert_eq!(
        oauth.scopes,
        vec!["https://outlook.office.com/SMTP.Send", "offline_access"]
    );

    // Consumer Outlook: the consumers authority and Outlook.com's submission host.
    let text = office365("flow = \"refresh_token\"\n")
        .replace("contoso.onmicrosoft.com", "consumers")
        .replace("client_secret = \"hunter2-secret\"\n", "");
    let config = Config::from_toml_str(&text).unwrap();
    let identity = &config.identities[0];
    assert_eq!(identity.upstream.host, "smtp-mail.outlook.com");
    assert!(
        identity
            .oauth
            .token_url
            .contains("/consumers/oauth2/v2.0/token")
    );
    assert!(matches!(identity.oauth.credential, ClientCredential::None));

    // GCC High: every endpoint, scope and the upstream by configuration.
    let config = Config::from_toml_str(&office365(
        "authority = \"https://login.microsoftonline.us\"\n\
         scopes = [\"https://outlook.office365.us/.default\"]\n\
         upstream = \"smtp.office365.us:587\"\n",
    ))
    .unwrap();
    let identity = &config.identities[0];
    assert_eq!(
        identity.oauth.token_url,
        "https://login.microsoftonline.us/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert_eq!(
        identity.oauth.scopes,
        vec!["https://outlook.office365.us/.default"]
    );
    assert_eq!(identity.upstream.host, "smtp.office365.us");

    // Gmail: PKCE login only (Google's device flow refuses the mail scope).
    let text = format!(
        "[[accounts]]\nusername = \"a@gmail.com\"\npassword_hash = \"{}\"\nprovider = \"gmail\"\nclient_id = \"x\"\n",
        hash()
    );
    let config = Config::from_toml_str(&text).unwrap();
    let oauth = &config.identities[0].oauth;
    assert!(
        oauth
            .authorize_url
            .as_deref()
            .unwrap()
            .starts_with("https://accounts.google.com/")
    );
    assert!(oauth.device_code_url.is_none());

    // Generic: nothing is assumed.
    let generic = |extra: &str| {
        format!(
            "[[accounts]]\nusername = \"a@example.org\"\npassword_hash = \"{}\"\nprovider = \"generic\"\n\
             client_id = \"x\"\n{extra}",
            hash()
        )
    };
    let e = Config::from_toml_str(&generic("")).err().unwrap();
    assert_eq!(e.key, "accounts[0].token_url");
    let e = Config::from_toml_str(&generic("token_url = \"https://idp.example.org/token\"\n"))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].scopes");
    let e = Config::from_toml_str(&generic(
        "token_url = \"https://idp.example.org/token\"\nscopes = [\"mail\"]\n",
    ))
    .err()
    .unwrap();
    assert_eq!(e.key, "accounts[0].upstream");
    let config = Config::from_toml_str(&generic(
        "token_url = \"https://idp.example.org/token\"\nscopes = [\"mail\"]\n\
         upstream = \"mail.example.org:465\"\nauthorize_url = \"https://idp.example.org/auth\"\n",
    ))
    .unwrap();
    assert_eq!(config.identities[0].upstream.tls, UpstreamTls::Implicit);

    let e = Config::from_toml_str(&office365("token_url = \"http://idp.example.org/token\"\n"))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].token_url");
    let e = Config::from_toml_str(&office365("redirect_uri = \"https://example.org/cb\"\n"))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].redirect_uri");
}

#[test]
fn token_settings_defaults_and_bounds() {
    let config = Config::from_toml_str(&office365("")).unwrap();
    assert!(config.tokens.refresh_margin >= Duration::from_secs(600));
    assert_eq!(config.tokens.keepalive, Duration::from_secs(86_400));
    assert_eq!(config.tokens.session_wait, Duration::from_secs(2));
    assert!(config.tokens.prefetch);

    let e = Config::from_toml_str(&format!("[tokens]\nsession_wait = 300\n{}", office365("")))
        .err()
        .unwrap();
    assert_eq!(e.key, "tokens.session_wait");
    let e = Config::from_toml_str(&format!("[tokens]\nnotify_command = []\n{}", office365("")))
        .err()
        .unwrap();
    assert_eq!(e.key, "tokens.notify_command");
    let config = Config::from_toml_str(&format!(
        "[tokens]\nrefresh_margin = 1200\nkeepalive = 3600\nprefetch = false\n\
         notify_command = [\"/bin/echo\", \"--\"]\n{}",
        office365("")
    ))
    .unwrap();
    assert_eq!(config.tokens.refresh_margin, Duration::from_secs(1200));
    assert_eq!(config.tokens.keepalive, Duration::from_secs(3600));
    assert!(!config.tokens.prefetch);
    assert_eq!(config.tokens.notify_command.as_ref().unwrap().len(), 2);
}

#[test]
fn certificate_settings_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    // An ECDSA key (what rcgen makes with ring) is refused: Entra wants RSA.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bridge".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let pem = dir.path().join("ec.pem");
    std::fs::write(&pem, format!("{}{}", cert.pem(), key.serialize_pem())).unwrap();
    let with = |lines: &str| office365(lines).replace("client_secret = \"hunter2-secret\"\n", "");
    let e = Config::from_toml_str(&with(&format!(
        "client_certificate = \"{}\"\n",
        pem.display()
    )))
    .err()
    .unwrap();
    assert_eq!(e.key, "accounts[0].client_certificate");
    assert!(e.problem.contains("RSA"), "{e}");

    let e = Config::from_toml_str(&with("client_certificate = \"/nonexistent/cert.pem\"\n"))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].client_certificate");
    let e = Config::from_toml_str(&with("certificate_thumbprint = \"x5t\"\n"))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].certificate_thumbprint");
    let e = Config::from_toml_str(&office365(&format!(
        "client_certificate = \"{}\"\n",
        pem.display()
    )))
    .err()
    .unwrap();
    assert!(e.problem.contains("not both"), "{e}");
    let secret = match &Config::from_toml_str(&office365("")).unwrap().identities[0]
        .oauth
        .credential
    {
        ClientCredential::Secret(s) => s.expose_secret().to_string(),
        other => panic!("{other:?}"),
    };
    assert_eq!(secret, "hunter2-secret");
}

#[test]
fn a_sandbox_config_keeps_its_state_in_the_working_directory() {
    let text = format!(
        "[sandbox]\n[[accounts]]\nusername = \"p@sandbox.test\"\npassword_hash = \"{}\"\nprovider = \"sandbox\"\n",
        crate::users::DEMO_PASSWORD_HASH
    );
    let config = Config::from_toml_str(&text).unwrap();
    if std::env::var_os("STATE_DIRECTORY").is_none() {
        assert_eq!(config.store.directory, PathBuf::from("sandbox-state"));
    }
    let e = Config::from_toml_str(&text.replace("[sandbox]\n", ""))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].provider");
}

#[test]
fn max_message_size_may_be_lowered_but_never_raised_above_the_providers() {
    let with_size = |size: u64, accounts: &str| {
        Config::from_toml_str(&format!("[server]\nmax_message_size = {size}\n{accounts}"))
    };
    let config = with_size(10_485_760, &office365("")).unwrap();
    assert_eq!(config.server.max_message_size, 10_485_760);
    let config = with_size(OFFICE365_MAX_SIZE, &office365("")).unwrap();
    assert_eq!(config.server.max_message_size, OFFICE365_MAX_SIZE);

    let e = with_size(OFFICE365_MAX_SIZE + 1, &office365(""))
        .err()
        .unwrap();
    assert_eq!(e.key, "server.max_message_size");
    assert!(e.problem.contains("157286400"), "{e}");

    // With a Gmail account beside the Office365 one, Gmail's lower limit is the ceiling.
    let gmail = format!(
        "[[accounts]]\nusername = \"a@gmail.com\"\npassword_hash = \"{}\"\n\
         provider = \"gmail\"\nclient_id = \"x\"\n",
        hash()
    );
    let both = format!("{}{gmail}", office365(""));
    let e = with_size(GMAIL_MAX_SIZE + 1, &both).err().unwrap();
    assert_eq!(e.key, "server.max_message_size");
    assert!(with_size(GMAIL_MAX_SIZE, &both).is_ok());

    // A generic provider's limit is unknown: the administrator's figure stands.
    let generic = format!(
        "[[accounts]]\nusername = \"a@example.org\"\npassword_hash = \"{}\"\n\
         provider = \"generic\"\nclient_id = \"x\"\n\
         token_url = \"https://idp.example.org/token\"\nscopes = [\"mail\"]\n\
         upstream = \"mail.example.org:587\"\n\
         authorize_url = \"https://idp.example.org/auth\"\n",
        hash()
    );
    let config = with_size(500_000_000, &generic).unwrap();
    assert_eq!(config.server.max_message_size, 500_000_000);
}

#[test]
fn broken_toml_never_echoes_the_line_it_broke_on() {
    let secret = "SuperSecretValue123";
    for broken in [
        format!("client_secret = \"{secret}~abc"),
        format!("client_secret = {secret}"),
        "client_secret = 12345678901234567890123".to_string(),
        format!("client_secret = \"{secret}\"\nclient_secret = \"{secret}\""),
    ] {
        let text = office365("").replace("client_secret = \"hunter2-secret\"", &broken);
        let e = Config::from_toml_str(&text).expect_err(&broken);
        let shown = e.to_string();
        assert!(
            !shown.contains(secret) && !shown.contains("1234567890"),
            "{shown}"
        );
        assert!(!shown.contains('\n'), "one line: {shown}");
        assert!(shown.contains("line"), "says where: {shown}");
    }
    let e = Config::from_toml_str(&office365("").replace("hunter2-secret", " "))
        .err()
        .unwrap();
    assert_eq!(e.key, "accounts[0].client_secret");
}

/// The keys a table accepts, as serde lists them when it meets one it does not know: the
/// list follows the code, so a key added later is checked without touching this test.
fn accepted_keys(toml: &str) -> &'static [&'static str] {
    let error = Figment::new()
        .merge(Toml::string(toml))
        .extract::<raw::RawConfig>()
        .err()
        .unwrap_or_else(|| panic!("{toml}: an unknown key was accepted"));
    match error.kind {
        figment::error::Kind::UnknownField(_, expected) => expected,
        other => panic!("{toml}: {other}"),
    }
}

/// Whether the shipped file explains `key`: as `key = value` (commented out or not), or at
/// the head of a line of the key lists, `#   key   what it does` (three spaces after `#`;
/// continuation lines are indented further), where several keys may share a line, separated
/// by commas.
fn documented(shipped: &str, key: &str) -> bool {
    shipped.lines().any(|line| {
        let text = line.trim_start_matches(['#', ' ']);
        let assigned = text.match_indices(key).any(|(at, _)| {
            let starts_word = text[..at]
                .chars()
                .next_back()
                .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
            starts_word && text[at + key.len()..].trim_start().starts_with('=')
        });
        let described = line
            .strip_prefix("#   ")
            .filter(|rest| !rest.starts_with(' '))
            .is_some_and(|rest| {
                let mut heads = Vec::new();
                for word in rest.split_whitespace() {
                    match word.strip_suffix(',') {
                        Some(listed) => heads.push(listed),
                        None => {
                            heads.push(word);
                            break;
                        }
                    }
                }
                heads.contains(&key)
            });
        assigned || described
    })
}

/// proxy.toml promises (and the unknown-key error says) that every key is documented there.
#[test]
fn every_key_is_documented_in_the_shipped_proxy_toml() {
    let shipped = include_str!("../../proxy.toml");
    let mut missing = Vec::new();
    for table in accepted_keys("zz_not_a_key = 1\n") {
        if !shipped.contains(&format!("[{table}]")) {
            missing.push(format!("[{table}]"));
        }
        let header = if matches!(*table, "accounts" | "identities") {
            format!("[[{table}]]")
        } else {
            format!("[{table}]")
        };
        for key in accepted_keys(&format!("{header}\nzz_not_a_key = 1\n")) {
            if !documented(shipped, key) {
                missing.push(format!("{table}.{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not documented in proxy.toml: {missing:?}"
    );
    // The check itself can fail.
    assert!(!documented(shipped, "zz_not_a_key"));
    assert!(accepted_keys("[server]\nzz_not_a_key = 1\n").contains(&"listen"));
}

#[test]
fn the_admin_listener_stays_on_loopback() {
    let with = |admin: &str| Config::from_toml_str(&format!("[admin]\n{admin}\n{}", office365("")));
    let config = with("listen = \"127.0.0.1:9725\"").unwrap();
    let admin = config.admin.unwrap();
    assert_eq!(admin.listen, "127.0.0.1:9725".parse().unwrap());
    assert_eq!(admin.upstream_failures_unhealthy, 3);
    assert!(with("listen = \"[::1]:9725\"").is_ok());
    // Metrics name every account: never on an address others can reach.
    for outside in ["0.0.0.0:9725", "[::]:9725", "192.0.2.10:9725"] {
        let e = with(&format!("listen = \"{outside}\"")).err().unwrap();
        assert_eq!(e.key, "admin.listen", "{outside}");
    }
    assert_eq!(with("").err().unwrap().key, "admin.listen");
    let e = with("listen = \"127.0.0.1:9725\"\nupstream_failures_unhealthy = 0")
        .err()
        .unwrap();
    assert_eq!(e.key, "admin.upstream_failures_unhealthy");
    assert!(
        Config::from_toml_str(&office365(""))
            .unwrap()
            .admin
            .is_none()
    );
}
