//! Where secrets handed over by systemd are found: `LoadCredential=` puts each one in
//! `$CREDENTIALS_DIRECTORY`. The shipped unit loads the whole directory
//! `/etc/smtp-oauth-bridge/credentials`, which systemd names `smtp-oauth-bridge_FILE`, so both
//! spellings are tried. Outside systemd (an administrator running `doctor` or `check-config` as
//! root) that directory itself is read.

use std::path::{Path, PathBuf};

/// The directory the shipped unit loads credentials from.
pub const CREDENTIALS_DIR: &str = "/etc/smtp-oauth-bridge/credentials";
/// The prefix systemd gives credentials loaded from a directory (the unit's credential id).
pub const DIRECTORY_PREFIX: &str = "smtp-oauth-bridge_";

/// The file holding credential `name`, if there is one.
pub fn find(name: &str) -> Option<PathBuf> {
    find_in(
        std::env::var_os("CREDENTIALS_DIRECTORY").map(PathBuf::from),
        Path::new(CREDENTIALS_DIR),
        name,
    )
}

fn find_in(systemd: Option<PathBuf>, fallback: &Path, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return None;
    }
    let candidates = match systemd {
        Some(dir) => vec![
            dir.join(name),
            dir.join(format!("{DIRECTORY_PREFIX}{name}")),
        ],
        None => vec![fallback.join(name)],
    };
    candidates.into_iter().find(|p| p.is_file())
}

/// A configured secret path: a relative name that is a credential resolves to it; anything
/// else is used as given.
pub fn resolve(path: &Path) -> PathBuf {
    if path.is_relative()
        && let Some(name) = path.to_str()
        && let Some(found) = find(name)
    {
        return found;
    }
    path.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_under_either_name_and_never_outside() {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        let fallback = dir.path().join("etc");
        std::fs::create_dir_all(&creds).unwrap();
        std::fs::create_dir_all(&fallback).unwrap();
        std::fs::write(creds.join("direct"), "x").unwrap();
        std::fs::write(creds.join("smtp-oauth-bridge_from-dir"), "x").unwrap();
        std::fs::write(fallback.join("local"), "x").unwrap();

        let some = Some(creds.clone());
        assert_eq!(
            find_in(some.clone(), &fallback, "direct"),
            Some(creds.join("direct"))
        );
        assert_eq!(
            find_in(some.clone(), &fallback, "from-dir"),
            Some(creds.join("smtp-oauth-bridge_from-dir"))
        );
        // Under systemd only what the unit handed over counts.
        assert_eq!(find_in(some.clone(), &fallback, "local"), None);
        assert_eq!(
            find_in(None, &fallback, "local"),
            Some(fallback.join("local"))
        );
        assert_eq!(find_in(some, &fallback, "../creds/direct"), None);
        assert_eq!(find_in(None, &fallback, ""), None);
    }
}
