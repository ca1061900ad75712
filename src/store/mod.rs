//! The state directory: each identity's tokens, encrypted at rest and written atomically,
//! plus a status file without secrets for `smtp-oauth-bridge accounts`.
//!
//! Each identity's [`TokenRecord`] (refresh token, the authority that issued it, the cached
//! access token and their times) lives in its own file, sealed with ChaCha20-Poly1305 (RFC
//! 8439, RustCrypto's `chacha20poly1305`, which wipes its key when dropped) under a 32-byte
//! key, with the identity name as associated data so a file cannot be passed off as another
//! identity's. The key comes from a systemd credential (`$CREDENTIALS_DIRECTORY/store-key`)
//! or from `store.key` in the directory, created with mode 0600 on first use. A write goes to
//! a temporary file that is synced and renamed over the old one, then the directory is
//! synced, so a crash leaves either the old record or the new one, never a torn file and
//! never nothing.

mod record;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{AeadInOut, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use ring::rand::{SecureRandom, SystemRandom};
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

pub use record::{TokenRecord, unix_now};

/// A sealed record: JSON inside.
const MAGIC: &[u8; 4] = b"SOB2";
/// The first format: the bare refresh token inside. Still read, never written.
const MAGIC_V1: &[u8; 4] = b"SOB1";
/// RFC 8439's nonce: 96 bits, random per write (a handful of writes per identity per hour
/// is far from the birthday bound).
const NONCE_LEN: usize = 12;
const KEY_FILE: &str = "store.key";
const CREDENTIAL_NAME: &str = "store-key";
/// The status `accounts` reads; the daemon rewrites it as states change.
pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("store key {path} must be exactly 32 bytes")]
    BadKey { path: String },
    #[error(
        "the store {path} holds tokens but its key is not here: neither the credential \
         store-key (in $CREDENTIALS_DIRECTORY, or /etc/smtp-oauth-bridge/credentials) nor \
         {path}/store.key; a new key would make every token unreadable"
    )]
    KeyMissing { path: String },
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
    key: ChaCha20Poly1305,
    rng: SystemRandom,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Identifies one version of a token file, to notice that another process (`login`,
/// `import-token`) replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVersion {
    inode: u64,
    modified_ns: i128,
    len: u64,
}

impl Store {
    /// Opens (creating if needed) the directory and loads or creates the key.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        fs::create_dir_all(dir.join("tokens")).map_err(io_err(dir))?;
        let rng = SystemRandom::new();
        let key_bytes = load_or_create_key(dir, &rng)?;
        let key =
            ChaCha20Poly1305::new_from_slice(&key_bytes[..]).map_err(|_| StoreError::BadKey {
                path: dir.join(KEY_FILE).display().to_string(),
            })?;
        Ok(Store {
            dir: dir.to_path_buf(),
            key,
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
        let key =
            ChaCha20Poly1305::new_from_slice(&key_bytes[..]).map_err(|_| StoreError::BadKey {
                path: path.display().to_string(),
            })?;
        let store = Store {
            dir: dir.to_path_buf(),
            key,
            rng: SystemRandom::new(),
        };
        Ok((store, path))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn token_path(&self, identity: &str) -> PathBuf {
        self.dir
            .join("tokens")
            .join(format!("{}.token", file_name(identity)))
    }

    /// The stored record of `identity`, if there is one.
    pub fn load(&self, identity: &str) -> Result<Option<TokenRecord>, StoreError> {
        let path = self.token_path(identity);
        let sealed = match fs::read(&path) {
            Ok(bytes) => Zeroizing::new(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let undecryptable = || StoreError::Undecryptable {
            path: path.display().to_string(),
        };
        if sealed.len() < MAGIC.len() + NONCE_LEN {
            return Err(undecryptable());
        }
        let (magic, rest) = sealed.split_at(MAGIC.len());
        let nonce_bytes: [u8; NONCE_LEN] =
            rest[..NONCE_LEN].try_into().map_err(|_| undecryptable())?;
        let mut buf = Zeroizing::new(rest[NONCE_LEN..].to_vec());
        self.key
            .decrypt_in_place(&Nonce::from(nonce_bytes), identity.as_bytes(), &mut *buf)
            .map_err(|_| undecryptable())?;
        let plain = &buf[..];
        let record = match magic {
            m if m == MAGIC => TokenRecord::from_json(plain),
            m if m == MAGIC_V1 => std::str::from_utf8(plain).ok().map(|text| TokenRecord {
                refresh_token: Some(SecretString::from(text.to_owned())),
                ..TokenRecord::default()
            }),
            _ => None,
        };
        record.map(Some).ok_or_else(undecryptable)
    }

    /// Durably replaces the record of `identity`. Returns only once the new record is on
    /// disk: file synced, renamed, directory synced.
    pub fn save(&self, identity: &str, record: &TokenRecord) -> Result<(), StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| StoreError::Random)?;
        let mut buf = record.to_json();
        // Fails only for a plaintext beyond 256 GiB.
        self.key
            .encrypt_in_place(&Nonce::from(nonce), identity.as_bytes(), &mut *buf)
            .map_err(|_| StoreError::Random)?;
        let mut sealed = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        sealed.extend_from_slice(MAGIC);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&buf);
        write_atomically(&self.token_path(identity), &sealed, true)
    }

    /// The stored refresh token of `identity`, if one was imported or obtained.
    pub fn load_refresh_token(&self, identity: &str) -> Result<Option<SecretString>, StoreError> {
        Ok(self.load(identity)?.and_then(|r| r.refresh_token))
    }

    /// Stores a refresh token obtained outside the refresh cycle (`login`, `import-token`):
    /// it starts a new grant, so the cached access token of the old one is dropped.
    /// `authority` is the token endpoint that issued it.
    pub fn save_refresh_token(
        &self,
        identity: &str,
        token: &SecretString,
    ) -> Result<(), StoreError> {
        self.save_grant(identity, token, None)
    }

    /// Like [`Store::save_refresh_token`], recording the issuing token endpoint.
    pub fn save_grant(
        &self,
        identity: &str,
        token: &SecretString,
        authority: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = unix_now();
        let record = TokenRecord {
            refresh_token: Some(SecretString::from(token.expose_secret().to_owned())),
            authority: authority.map(str::to_owned),
            refresh_token_received: Some(now),
            refresh_token_used: Some(now),
            ..TokenRecord::default()
        };
        self.save(identity, &record)
    }

    /// The current version of `identity`'s token file (`None` when there is none).
    pub fn version(&self, identity: &str) -> Option<FileVersion> {
        let meta = fs::metadata(self.token_path(identity)).ok()?;
        Some(FileVersion {
            inode: meta.ino(),
            modified_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            len: meta.len(),
        })
    }

    /// Replaces the status file. It holds no secrets and is rewritten often, so it is
    /// renamed into place but not synced.
    pub fn write_status(&self, bytes: &[u8]) -> Result<(), StoreError> {
        write_atomically(&self.dir.join(STATUS_FILE), bytes, false)
    }
}

/// Writes `bytes` to `path` so that a crash at any point leaves the old or the new content;
/// `durable` also syncs the file and the directory before returning.
fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // Written by root (`login`, `import-token`, `doctor`) into a directory the service
        // owns, the file must still be readable by the service: give it the directory's
        // owner. Without privilege this fails harmlessly, and the file is ours anyway.
        if let Ok(meta) = fs::metadata(dir) {
            let _ = std::os::unix::fs::fchown(&file, Some(meta.uid()), Some(meta.gid()));
        }
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        if durable {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
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
    // A new key for a store that already holds tokens would make them unreadable; that
    // happens when the key is a systemd credential and this process was not given it.
    if holds_tokens(dir) {
        return Err(StoreError::KeyMissing {
            path: dir.display().to_string(),
        });
    }
    let mut key = Zeroizing::new(vec![0u8; 32]);
    rng.fill(&mut key).map_err(|_| StoreError::Random)?;
    write_atomically(&path, &key, true)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_err(&path))?;
    Ok(key)
}

fn holds_tokens(dir: &Path) -> bool {
    fs::read_dir(dir.join("tokens")).is_ok_and(|entries| {
        entries
            .filter_map(Result::ok)
            .any(|e| e.path().extension().is_some_and(|x| x == "token"))
    })
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

/// Identity names become file names; anything outside a safe set is hex-escaped so a name
/// can never climb out of the directory.
fn file_name(identity: &str) -> String {
    let mut out = String::with_capacity(identity.len());
    for b in identity.bytes() {
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
mod tests;
