//! The shipped systemd units as systemd itself judges them: `systemd-analyze verify` (with the
//! built binary installed in a scratch root, so the ExecStart= paths resolve) must print no
//! warning, and `systemd-analyze security --offline=true` must rate the service's exposure at
//! 1.5 or lower. `scripts/test` installs systemd-analyze (Debian package `systemd`); a missing
//! tool fails these tests rather than skipping them.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 2] = ["smtp-oauth-bridge.service", "smtp-oauth-bridge.socket"];

fn systemd_analyze() -> PathBuf {
    for dir in ["/usr/bin", "/bin", "/usr/local/bin"] {
        let path = Path::new(dir).join("systemd-analyze");
        if path.exists() {
            return path;
        }
    }
    panic!("systemd-analyze is missing: apt-get install systemd (scripts/test does this)");
}

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

/// A root directory with systemd's own units, the units under test, the built binary at
/// /usr/bin/smtp-oauth-bridge and kill at /bin/kill; `service` replaces the shipped service.
fn scratch_root(service: Option<&str>) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for dir in ["usr/lib/systemd", "usr/bin", "bin", "etc/systemd/system"] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
    }
    let status = Command::new("cp")
        .arg("-a")
        .arg("/usr/lib/systemd/system")
        .arg(r.join("usr/lib/systemd/"))
        .status()
        .unwrap();
    assert!(status.success(), "copying systemd's units");
    std::fs::copy(
        env!("CARGO_BIN_EXE_smtp-oauth-bridge"),
        r.join("usr/bin/smtp-oauth-bridge"),
    )
    .unwrap();
    let kill = ["/bin/kill", "/usr/bin/kill"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("kill (procps) is installed");
    std::fs::copy(kill, r.join("bin/kill")).unwrap();
    for unit in UNITS {
        std::fs::copy(
            unit_dir().join(unit),
            r.join("etc/systemd/system").join(unit),
        )
        .unwrap();
    }
    if let Some(text) = service {
        std::fs::write(r.join("etc/systemd/system").join(UNITS[0]), text).unwrap();
    }
    root
}

fn verify(root: &Path) -> (bool, String) {
    let out = Command::new(systemd_analyze())
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(UNITS)
        .current_dir(root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_a_warning() {
    let root = scratch_root(None);
    let (ok, text) = verify(root.path());
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify:\n{text}"
    );

    // The check can fail: a misspelt value is reported.
    let broken = std::fs::read_to_string(unit_dir().join(UNITS[0]))
        .unwrap()
        .replace("Type=notify", "Type=notifyy");
    let root = scratch_root(Some(&broken));
    let (_, text) = verify(root.path());
    assert!(text.contains("notifyy"), "{text}");
}

#[test]
fn the_service_is_hardened_to_an_exposure_of_at_most_1_5() {
    let out = Command::new(systemd_analyze())
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit_dir().join(UNITS[0]))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{text}"));
    let level: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable: {line}"));
    assert!(level <= 1.5, "{line}\n{text}");
}

#[test]
fn the_service_speaks_the_notify_protocol_and_reloads_with_sighup() {
    let unit = std::fs::read_to_string(unit_dir().join(UNITS[0])).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for wanted in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "StateDirectory=smtp-oauth-bridge",
        "ConfigurationDirectory=smtp-oauth-bridge",
        "LoadCredential=smtp-oauth-bridge:/etc/smtp-oauth-bridge/credentials",
        "DynamicUser=yes",
        "RestartPreventExitStatus=64",
    ] {
        assert!(lines.contains(&wanted), "{wanted} missing from the unit");
    }
    // The credential prefix systemd gives files loaded from a directory is what the bridge
    // looks for.
    assert_eq!(
        smtp_oauth_bridge::credentials::DIRECTORY_PREFIX,
        "smtp-oauth-bridge_"
    );
    let socket = std::fs::read_to_string(unit_dir().join(UNITS[1])).unwrap();
    assert!(socket.contains("ListenStream=127.0.0.1:587"));
}
