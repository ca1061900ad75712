//! The state directory: refresh tokens, encrypted at rest and written atomically.
//!
//! Each account's refresh token lives in its own file, sealed with ChaCha20-Poly1305 (ring,
//! already in the tree for TLS) under a 32-byte key. The key comes from a systemd credential
//! (`$CREDENTIALS_DIRECTORY/store-key`) or from `store.key` in the directory, created with mode
//! 0600 on first use. A write goes to a temporary file that is synced and renamed over the old
//! one, then the directory is synced, so a crash leaves either the old token or the new one,
//! never a torn file and never nothing.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

const MAGIC: &[u8; 4] = b"SOB1";
const KEY_FILE: &str = "store.key";
const CREDENTIAL_NAME: &str = "store-key";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("store key {path} must be exactly 32 bytes")]
    BadKey { path: String },
    #[error("token file {path} cannot be decrypted (wrong store key, or the file was damaged)")]
    Undecryptable { path: String },
    #[error("system random number generator failed")]
    Random,
    #[error(
        "no store key: neither the credential store-key nor {path} exists (the bridge creates {path} at its first start)"
    )]
    NoKey { path: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// An opened state directory with its key loaded.
pub struct Store {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if needed) the directory and loads or creates the key.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir.join("tokens")).map_err(io_err(dir))?;
        let rng = SystemRandom::new();
        let key_bytes = load_or_create_key(dir, &rng)?;
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key_bytes[..]).map_err(|_| {
            StoreError::BadKey {
                path: dir.join(KEY_FILE).display().to_string(),
            }
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            key: LessSafeKey::new(unbound),
            rng,
        })
    }

    /// Opens an existing store without creating anything, and says where its key came from.
    /// For `doctor`, which may run as root beside a service that owns the directory.
    pub fn open_existing(dir: &Path) -> Result<(Store, PathBuf), StoreError> {
        let path = match crate::credentials::find(CREDENTIAL_NAME) {
            Some(path) => path,
            None if dir.join(KEY_FILE).exists() => dir.join(KEY_FILE),
            None => {
                return Err(StoreError::NoKey {
                    path: dir.join(KEY_FILE).display().to_string(),
                });
            }
        };
        let key_bytes = read_key(&path)?;
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key_bytes[..]).map_err(|_| {
            StoreError::BadKey {
                path: path.display().to_string(),
            }
        })?;
        let store = Store {
            dir: dir.to_path_buf(),
            key: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        };
        Ok((store, path))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn token_path(&self, account: &str) -> PathBuf {
        self.dir
            .join("tokens")
            .join(format!("{}.token", file_name(account)))
    }

    /// The stored refresh token of `account`, if one was imported.
    pub fn load_refresh_token(&self, account: &str) -> Result<Option<SecretString>, StoreError> {
        let path = self.token_path(account);
        let sealed = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let undecryptable = || StoreError::Undecryptable {
            path: path.display().to_string(),
        };
        if sealed.len() < MAGIC.len() + NONCE_LEN || &sealed[..MAGIC.len()] != MAGIC {
            return Err(undecryptable());
        }
        let nonce_bytes: [u8; NONCE_LEN] = sealed[MAGIC.len()..MAGIC.len() + NONCE_LEN]
            .try_into()
            .map_err(|_| undecryptable())?;
        let mut buf = Zeroizing::new(sealed[MAGIC.len() + NONCE_LEN..].to_vec());
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(account.as_bytes()),
                &mut buf,
            )
            .map_err(|_| undecryptable())?;
        let text = std::str::from_utf8(plain).map_err(|_| undecryptable())?;
        Ok(Some(SecretString::from(text.to_owned())))
    }

    /// Durably replaces the refresh token of `account`. Returns only once the new token is on
    /// disk: file synced, renamed, directory synced.
    pub fn save_refresh_token(
        &self,
        account: &str,
        token: &SecretString,
    ) -> Result<(), StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Random)?;
        let mut buf = Zeroizing::new(token.expose_secret().as_bytes().to_vec());
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(account.as_bytes()),
                &mut *buf,
            )
            .map_err(|_| StoreError::Random)?;
        let mut sealed = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        sealed.extend_from_slice(MAGIC);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&buf);
        write_atomically(&self.token_path(account), &sealed)
    }
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old or the new content.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // Written by root (`import-token`, `doctor`) into a directory the service owns, the
        // file must still be readable by the service: give it the directory's owner. Without
        // privilege this fails harmlessly, and the file is ours anyway.
        if let Ok(meta) = fs::metadata(dir) {
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn load_or_create_key(dir: &Path, rng: &SystemRandom) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    if let Some(path) = crate::credentials::find(CREDENTIAL_NAME) {
        return read_key(&path);
    }
    let path = dir.join(KEY_FILE);
    if path.exists() {
        return read_key(&path);
    }
    let mut key = Zeroizing::new(vec![0u8; 32]);
    rng.fill(&mut key).map_err(|_| StoreError::Random)?;
    write_atomically(&path, &key)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
    Ok(key)
}

fn read_key(path: &Path) -> Result<Zeroizing<Vec<u8>>, StoreError> {
    let key = Zeroizing::new(fs::read(path).map_err(io_err(path))?);
    if key.len() != 32 {
        return Err(StoreError::BadKey {
            path: path.display().to_string(),
        });
    }
    Ok(key)
}

/// Account names become file names; anything outside a safe set is hex-escaped so a name can
/// never climb out of the directory.
fn file_name(account: &str) -> String {
    let mut out = String::with_capacity(account.len());
    for b in account.bytes() {
        if b.is_ascii_alphanumeric() || (matches!(b, b'@' | b'-' | b'.' | b'+') && !out.is_empty())
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[test]
    fn tokens_round_trip_encrypted_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load_refresh_token("printer").unwrap().is_none());
        store
            .save_refresh_token("printer", &secret("0.Arefresh-one"))
            .unwrap();
        store
            .save_refresh_token("printer", &secret("0.Arefresh-two"))
            .unwrap();

        let reopened = Store::open(dir.path()).unwrap();
        let token = reopened.load_refresh_token("printer").unwrap().unwrap();
        assert_eq!(token.expose_secret(), "0.Arefresh-two");

        let on_disk = fs::read(store.token_path("printer")).unwrap();
        assert!(!on_disk.windows(7).any(|w| w == b"refresh"));
        let mode = fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("tokens")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary files left behind");
    }

    #[test]
    fn a_file_moved_to_another_account_does_not_decrypt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save_refresh_token("a", &secret("token-a")).unwrap();
        fs::copy(store.token_path("a"), store.token_path("b")).unwrap();
        assert!(matches!(
            store.load_refresh_token("b"),
            Err(StoreError::Undecryptable { .. })
        ));
    }

    #[test]
    fn account_names_cannot_escape_the_directory() {
        assert_eq!(file_name("printer@contoso.com"), "printer@contoso.com");
        assert_eq!(file_name("../x"), "_2e./x".replace("/", "_2f"));
        assert!(!file_name("../../etc/passwd").contains('/'));
        assert!(!file_name(".hidden").starts_with('.'));
    }
}
