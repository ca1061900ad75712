//! The command line as an administrator meets it: exit codes, one-line configuration errors
//! that name the key and never the secret, `hash-password`, `import-token`, and the shipped
//! `proxy.toml` passing its own check.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn bridge() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_smtp-oauth-bridge"));
    cmd.env_remove("SMTP_OAUTH_BRIDGE_CONFIG")
        .env_remove("STATE_DIRECTORY")
        .env_remove("CREDENTIALS_DIRECTORY");
    cmd
}

/// `check-config` on the file at `path`.
fn check_config(path: &std::path::Path) -> Output {
    bridge()
        .arg("--config")
        .arg(path)
        .arg("check-config")
        .output()
        .unwrap()
}

fn run_with_stdin(mut cmd: Command, stdin: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn shipped_proxy_toml_is_valid() {
    let out = bridge()
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
            "check-config",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (1 account(s))"));
}

#[test]
fn a_bad_config_prints_one_line_naming_the_key_and_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    std::fs::write(
        &path,
        format!(
            "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = 12345678\n"
        ),
    )
    .unwrap();
    for sub in ["check-config", "run"] {
        let out = bridge()
            .arg("--config")
            .arg(&path)
            .arg(sub)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{sub}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("accounts[0].client_secret"), "{stderr}");
        assert!(
            !stderr.contains("12345678"),
            "the value may be a secret: {stderr}"
        );
    }

    let out = bridge()
        .args(["--config", "/nonexistent/proxy.toml", "check-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn a_timeout_meant_as_never_is_a_config_error_not_a_crash_per_connection() {
    // Deadlines are the clock plus the timeout: these overflowed it at every connection,
    // every pool wait, or at shutdown.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    let account = format!(
        "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
         tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n"
    );
    for (table, key) in [
        ("timeouts", "session"),
        ("timeouts", "client_idle"),
        ("timeouts", "tls_handshake"),
        ("timeouts", "upstream_command"),
        ("timeouts", "token_request"),
        ("pool", "wait"),
    ] {
        let text = format!("[{table}]\n{key} = 9223372036854775807\n{account}");
        std::fs::write(&path, text).unwrap();
        let out = check_config(&path);
        assert_eq!(out.status.code(), Some(64), "{table}.{key}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{table}.{key}: must be at most 31622400 seconds")),
            "{stderr}"
        );
    }
    // A year is still allowed.
    let text = format!("[timeouts]\nsession = 31622400\n{account}");
    std::fs::write(&path, text).unwrap();
    let out = check_config(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_hash_asking_argon2_for_terabytes_is_a_config_error_not_an_abort() {
    // m= is in KiB: one digit too many, or a damaged file, and every check of the hash
    // (the first one at load, to refuse the demo password) asked the allocator for 4 TiB.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    let (_, rest) = hash.split_once(",t=").unwrap();
    let damaged = format!("$argon2id$v=19$m=4294967295,t={rest}");
    std::fs::write(
        &path,
        format!(
            "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{damaged}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n"
        ),
    )
    .unwrap();
    let out = check_config(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("accounts[0].password_hash"), "{stderr}");
    assert!(stderr.contains("2 GiB"), "{stderr}");
}

#[test]
fn a_login_timeout_out_of_range_is_a_usage_error() {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    for minutes in ["0", "1441", "18446744073709551615"] {
        let out = bridge()
            .args(["--config", config, "login", "printer", "--timeout", minutes])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "--timeout {minutes}: {stderr}");
        assert!(stderr.contains("--timeout"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn hash_password_reads_stdin_and_prints_a_verifiable_hash() {
    let mut cmd = bridge();
    cmd.arg("hash-password");
    let out = run_with_stdin(cmd, "s3cret-local\n");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(smtp_oauth_bridge::users::check_hash(hash).is_ok());

    // The hash works in a configuration and the config refuses nothing about it.
    let toml = format!(
        "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
         tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"y\"\n"
    );
    assert!(smtp_oauth_bridge::config::Config::from_toml_str(&toml).is_ok());

    let mut cmd = bridge();
    cmd.arg("hash-password");
    assert!(
        !run_with_stdin(cmd, "\n").status.success(),
        "empty password refused"
    );
}

#[test]
fn import_token_stores_the_refresh_token_encrypted() {
    let dir = tempfile::tempdir().unwrap();
    let (path, state) = delegated_config(dir.path());
    let token = "0.AXYZ-refresh-token-made-for-this-test";
    let mut cmd = bridge();
    cmd.arg("--config")
        .arg(&path)
        .args(["import-token", "alerts"]);
    let out = run_with_stdin(cmd, &format!("{token}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(token));

    let store = smtp_oauth_bridge::store::Store::open(&state).unwrap();
    use secrecy::ExposeSecret;
    assert_eq!(
        store
            .load_refresh_token("alerts")
            .unwrap()
            .unwrap()
            .expose_secret(),
        token
    );
    for entry in walk(&state) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
            "clear text in {entry:?}"
        );
    }

    let mut cmd = bridge();
    cmd.arg("--config")
        .arg(&path)
        .args(["import-token", "nobody"]);
    assert_eq!(run_with_stdin(cmd, "x\n").status.code(), Some(64));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn environment_overrides_keys_and_secrets_come_from_env_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let secret_file = dir.path().join("client-secret");
    std::fs::write(&secret_file, "made-at-test-time\n").unwrap();
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    let account = |secret_line: &str| {
        format!(
            "[[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\n{secret_line}\n"
        )
    };
    let check = |env: &[(&str, &str)]| {
        let mut cmd = bridge();
        cmd.arg("--config").arg(&path).arg("check-config");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    std::fs::write(
        &path,
        account(&format!(
            "client_secret_file = \"{}\"",
            secret_file.display()
        )),
    )
    .unwrap();
    assert!(check(&[]).status.success());
    // SMTP_OAUTH_BRIDGE_SECTION__KEY reaches the configuration (and is checked like it).
    let out = check(&[("SMTP_OAUTH_BRIDGE_SERVER__MAX_ERRORS", "many")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("server.max_errors"));
    assert!(
        check(&[("SMTP_OAUTH_BRIDGE_SERVER__MAX_ERRORS", "3")])
            .status
            .success()
    );

    std::fs::write(&path, account("client_secret_env = \"TEST_O365_SECRET\"")).unwrap();
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TEST_O365_SECRET is not set"));
    assert!(
        check(&[("TEST_O365_SECRET", "from-the-environment")])
            .status
            .success()
    );

    std::fs::write(&path, account("")).unwrap();
    let out = check(&[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts[0].client_secret"));
}

#[test]
fn accounts_says_when_the_daemon_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let path = dir.path().join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    std::fs::write(
        &path,
        format!(
            "[store]\ndirectory = \"{}\"\n[[identities]]\nname = \"contoso-app\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"hunter2-secret\"\n\
             [[accounts]]\nname = \"everyone\"\nusername = \"*@contoso.com\"\npassword_hash = \"{hash}\"\n\
             identity = \"contoso-app\"\n",
            state.display()
        ),
    )
    .unwrap();
    let accounts = || {
        let out = bridge()
            .arg("--config")
            .arg(&path)
            .arg("accounts")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let text = accounts();
    assert!(
        text.contains("the daemon has not run with this store yet"),
        "{text}"
    );
    let line = text.lines().find(|l| l.starts_with("everyone")).unwrap();
    assert!(
        line.contains("*@contoso.com") && line.contains("contoso-app"),
        "{line}"
    );
    assert!(!text.contains("hunter2"));

    // A status left by a daemon that is gone.
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(
        state.join("status.json"),
        r#"{"pid":4000000000,"started":1,"written":1,"identities":[{"name":"contoso-app",
        "flow":"client_credentials","state":"backing-off","access_token_expires":null,
        "last_refresh":null,"refresh_token_received":null,"refresh_token_used":null,
        "retry_at":null,"last_error":"token endpoint temporarily unavailable: HTTP 503",
        "hint":null,"requests":3}]}"#,
    )
    .unwrap();
    let text = accounts();
    assert!(text.contains("daemon NOT running"), "{text}");
    assert!(text.contains("backing-off"), "{text}");
    assert!(text.contains("temporarily unavailable: HTTP 503"), "{text}");
}

#[test]
fn a_store_whose_key_is_elsewhere_is_refused_not_rekeyed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, state) = delegated_config(dir.path());
    let import = |token: &str| {
        let mut cmd = bridge();
        cmd.arg("--config")
            .arg(&path)
            .args(["import-token", "alerts"]);
        run_with_stdin(cmd, token)
    };
    assert!(import("0.Afirst-token\n").status.success());
    // The key lived in a systemd credential this shell was not given.
    std::fs::remove_file(state.join("store.key")).unwrap();
    let out = import("0.Asecond-token\n");
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CREDENTIALS_DIRECTORY"), "{stderr}");
    assert!(!state.join("store.key").exists(), "no new key was made");
}

#[test]
fn the_store_key_can_be_a_systemd_credential() {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use ring::rand::SecureRandom;

    // The token file, opened with `key` as the store seals it: magic, nonce, then the
    // record under ChaCha20-Poly1305 with the identity as associated data.
    let refresh_token_in = |file: &std::path::Path, key: &[u8]| {
        let sealed = std::fs::read(file).unwrap();
        let (nonce, body) = sealed[4..].split_at(12);
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).unwrap());
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).unwrap(),
                Aad::from(&b"alerts"[..]),
                &mut body,
            )
            .expect("sealed under the credential");
        let record: serde_json::Value = serde_json::from_slice(plain).unwrap();
        record["refresh_token"].as_str().unwrap().to_string()
    };
    // systemd names a credential by its own name, or prefixed when the unit loads a directory.
    for name in ["store-key", "smtp-oauth-bridge_store-key"] {
        let dir = tempfile::tempdir().unwrap();
        let (path, state) = delegated_config(dir.path());
        let credentials = dir.path().join("credentials");
        std::fs::create_dir_all(&credentials).unwrap();
        let mut key = [0u8; 32];
        ring::rand::SystemRandom::new().fill(&mut key).unwrap();
        std::fs::write(credentials.join(name), key).unwrap();
        let import = |credentials: Option<&std::path::Path>, token: &str| {
            let mut cmd = bridge();
            cmd.arg("--config")
                .arg(&path)
                .args(["import-token", "alerts"]);
            if let Some(dir) = credentials {
                cmd.env("CREDENTIALS_DIRECTORY", dir);
            }
            run_with_stdin(cmd, token)
        };

        let out = import(Some(credentials.as_path()), "0.Afrom-the-credential\n");
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !state.join("store.key").exists(),
            "{name}: no key file made"
        );
        let file = state.join("tokens/alerts.token");
        assert_eq!(refresh_token_in(&file, &key), "0.Afrom-the-credential");
        // Without the credential the store is refused rather than given a new key.
        assert_eq!(import(None, "0.Aother\n").status.code(), Some(69), "{name}");
        assert_eq!(refresh_token_in(&file, &key), "0.Afrom-the-credential");
    }
}

#[test]
fn generate_certificate_writes_a_private_key_and_never_overwrites_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = bridge()
        .args([
            "generate-certificate",
            "--name",
            "relay.lan.test",
            "--name",
            "192.0.2.7",
            "--dir",
        ])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("SHA-256 fingerprint:"), "{stdout}");
    assert!(stdout.contains("relay.lan.test, 192.0.2.7"), "{stdout}");
    let key = certs.join("bridge.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let key_before = std::fs::read(&key).unwrap();
    assert!(!stdout.contains("PRIVATE KEY"), "the key is never printed");

    // A second run keeps the existing pair unless told otherwise.
    let again = bridge()
        .args(["generate-certificate", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read(&key).unwrap(), key_before);

    // The pair is what check-config expects for a listener beyond loopback.
    let config = dir.path().join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"0.0.0.0:1587\"]\nallow_non_loopback = true\n\
             [tls]\ncertificate_file = \"{}\"\nkey_file = \"{}\"\n\
             [[accounts]]\nusername = \"a@contoso.com\"\npassword_hash = \"{hash}\"\n\
             tenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\nclient_secret = \"s\"\n",
            certs.join("bridge.crt").display(),
            key.display()
        ),
    )
    .unwrap();
    let out = check_config(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn accounts_cannot_come_from_the_environment_and_say_so() {
    let out = bridge()
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
            "check-config",
        ])
        .env("SMTP_OAUTH_BRIDGE_ACCOUNTS__0__CLIENT_SECRET", "from-env")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use client_secret_env"), "{stderr}");
    assert!(!stderr.contains("from-env"));

    // Arrays outside [[accounts]] take TOML syntax in the variable.
    let out = bridge()
        .args([
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
            "check-config",
        ])
        .env("SMTP_OAUTH_BRIDGE_SERVER__LISTEN", "[\"127.0.0.1:2525\"]")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A configuration with one delegated account, `alerts`, whose store is `dir/state`.
fn delegated_config(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let state = dir.join("state");
    let path = dir.join("proxy.toml");
    let hash = smtp_oauth_bridge::users::hash_password("pw").unwrap();
    std::fs::write(
        &path,
        format!(
            "[store]\ndirectory = \"{}\"\n[[accounts]]\nname = \"alerts\"\nusername = \"a@contoso.com\"\n\
             password_hash = \"{hash}\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\n\
             flow = \"refresh_token\"\n",
            state.display()
        ),
    )
    .unwrap();
    (path, state)
}
