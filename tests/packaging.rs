//! The Debian package as `cargo deb` builds it from `[package.metadata.deb]` and `systemd/`,
//! checked without building it. cargo-deb picks up `systemd/<package>.service`, `.socket`,
//! `.tmpfile` and `.sysusers` by name and adds `systemd-sysusers` and `systemd-tmpfiles` calls
//! to the postinst, so those files must agree with each other and with the unit, and the
//! package must depend on what runs them: a postinst calling a missing `systemd-sysusers`
//! fails the installation (minimal containers have no systemd).

use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Format, Toml};

const PACKAGE: &str = "smtp-oauth-bridge";

#[derive(serde::Deserialize)]
struct DebMetadata {
    depends: String,
    assets: Vec<Vec<String>>,
    #[serde(rename = "maintainer-scripts")]
    maintainer_scripts: String,
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn metadata() -> DebMetadata {
    Figment::from(Toml::file(root().join("Cargo.toml")))
        .extract_inner("package.metadata.deb")
        .expect("[package.metadata.deb] in Cargo.toml")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The value of `key=` in the unit.
fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
        .to_string()
}

#[test]
fn the_package_depends_on_what_its_maintainer_scripts_run() {
    let depends = metadata().depends;
    let alternatives: Vec<Vec<&str>> = depends
        .split(',')
        .map(|d| d.split('|').map(str::trim).collect())
        .collect();
    assert!(
        alternatives.iter().any(|a| a.contains(&"$auto")),
        "{depends}"
    );
    assert!(
        alternatives
            .iter()
            .any(|a| a.first() == Some(&"systemd") && a.contains(&"systemd-standalone-sysusers")),
        "the postinst runs systemd-sysusers: {depends}"
    );
}

#[test]
fn the_package_holds_the_binary_the_units_and_the_configuration_as_a_conffile() {
    let deb = metadata();
    let target_of = |source: &str| {
        deb.assets
            .iter()
            .find(|a| a[0] == source)
            .unwrap_or_else(|| panic!("{source} is not packaged"))
            .clone()
    };
    assert_eq!(target_of("target/release/smtp-oauth-bridge")[1], "usr/bin/");
    // cargo-deb makes every file under etc/ a conffile; the bridge's group reads it.
    let config = target_of("proxy.toml");
    assert_eq!(
        (config[1].as_str(), config[2].as_str()),
        ("etc/smtp-oauth-bridge/proxy.toml", "640")
    );
    // The unit's Documentation= points at the packaged README.
    let unit = read(&root().join("systemd/smtp-oauth-bridge.service"));
    let doc = unit_value(&unit, "Documentation");
    let readme = target_of("README.md");
    assert_eq!(doc.strip_prefix("file:///"), Some(readme[1].as_str()));

    let scripts = root().join(&deb.maintainer_scripts);
    for kind in ["service", "socket", "sysusers", "tmpfile"] {
        let file = scripts.join(format!("{PACKAGE}.{kind}"));
        assert!(file.is_file(), "{} is missing", file.display());
    }
    for script in ["postinst", "postrm"] {
        assert!(
            read(&scripts.join(script)).contains("#DEBHELPER#"),
            "{script} needs #DEBHELPER# for cargo-deb's additions"
        );
    }
}

#[test]
fn the_system_user_credentials_and_configuration_agree_with_the_unit() {
    let dir = root().join("systemd");
    let unit = read(&dir.join("smtp-oauth-bridge.service"));
    let user = unit_value(&unit, "User");
    assert_eq!(unit_value(&unit, "Group"), user);

    // sysusers.d: `u NAME ID GECOS HOME SHELL`.
    let sysusers = read(&dir.join("smtp-oauth-bridge.sysusers"));
    let entry: Vec<&str> = sysusers
        .lines()
        .find(|l| l.starts_with("u "))
        .expect("a u line")
        .split_whitespace()
        .collect();
    assert_eq!(entry[1], user);
    assert_eq!(
        entry.iter().rev().nth(1).copied(),
        Some(format!("/var/lib/{}", unit_value(&unit, "StateDirectory")).as_str())
    );

    // tmpfiles.d: the credentials directory the unit loads, root only, and the
    // configuration readable by the bridge's group.
    let tmpfiles = read(&dir.join("smtp-oauth-bridge.tmpfile"));
    let lines: Vec<Vec<&str>> = tmpfiles
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    let credentials = unit_value(&unit, "LoadCredential");
    let credentials = credentials.split_once(':').unwrap().1;
    assert!(
        lines.contains(&vec!["d", credentials, "0700", "root", "root", "-"]),
        "{tmpfiles}"
    );
    let config = unit_value(&unit, "ExecStart")
        .split_whitespace()
        .skip_while(|w| *w != "--config")
        .nth(1)
        .unwrap()
        .to_string();
    assert!(
        lines.contains(&vec!["z", &config, "0640", "root", &user, "-"]),
        "{tmpfiles}"
    );
}
