//! The store on a real directory: round trips, what lies on disk, damaged and moved files,
//! the first format, and the key that must never be silently replaced.

use super::*;

fn secret(s: &str) -> SecretString {
    SecretString::from(s.to_string())
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
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
fn the_whole_record_is_sealed_access_token_included() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let record = TokenRecord {
        refresh_token: Some(secret("0.Arefresh-clear-text-marker")),
        authority: Some("https://login.example.test/t/oauth2/v2.0/token".into()),
        refresh_token_received: Some(100),
        refresh_token_used: Some(200),
        access_token: Some(secret("eyJaccess-clear-text-marker")),
        access_token_expires: Some(4000),
        last_refresh: Some(300),
    };
    store.save("printer", &record).unwrap();
    for path in files(dir.path()) {
        let bytes = fs::read(&path).unwrap();
        for marker in [&b"clear-text-marker"[..], b"login.example.test"] {
            assert!(
                !bytes.windows(marker.len()).any(|w| w == marker),
                "clear text in {path:?}"
            );
        }
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{path:?} is private");
    }
    let loaded = store.load("printer").unwrap().unwrap();
    assert_eq!(
        loaded.access_token.as_ref().unwrap().expose_secret(),
        "eyJaccess-clear-text-marker"
    );
    assert_eq!(loaded.authority, record.authority);
    assert_eq!(
        (
            loaded.refresh_token_used,
            loaded.access_token_expires,
            loaded.last_refresh
        ),
        (Some(200), Some(4000), Some(300))
    );
    assert!(!format!("{loaded:?}").contains("marker"));
}

#[test]
fn a_file_moved_to_another_identity_does_not_decrypt() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.save_refresh_token("a", &secret("token-a")).unwrap();
    fs::copy(store.token_path("a"), store.token_path("b")).unwrap();
    assert!(matches!(
        store.load_refresh_token("b"),
        Err(StoreError::Undecryptable { .. })
    ));
    // A damaged file is reported, not mistaken for "no token".
    let mut bytes = fs::read(store.token_path("a")).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(store.token_path("a"), bytes).unwrap();
    assert!(matches!(
        store.load("a"),
        Err(StoreError::Undecryptable { .. })
    ));
}

/// ring's ChaCha20-Poly1305 under the key in `store.key`: what earlier builds sealed with.
fn ring_key(dir: &Path) -> ring::aead::LessSafeKey {
    use ring::aead::{CHACHA20_POLY1305, LessSafeKey, UnboundKey};
    let key_bytes = fs::read(dir.join(KEY_FILE)).unwrap();
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key_bytes).unwrap())
}

/// Seals `plain` the way earlier builds did, so the tests show such files still open after
/// the switch of AEAD crate.
fn seal_with_ring(dir: &Path, magic: &[u8; 4], identity: &str, plain: &[u8]) -> Vec<u8> {
    use ring::aead::{Aad, Nonce};
    let key = ring_key(dir);
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).unwrap();
    let mut buf = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(identity.as_bytes()),
        &mut buf,
    )
    .unwrap();
    let mut sealed = magic.to_vec();
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&buf);
    sealed
}

#[test]
fn files_of_the_first_format_are_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let sealed = seal_with_ring(dir.path(), MAGIC_V1, "printer", b"0.Aold-format-token");
    fs::write(store.token_path("printer"), sealed).unwrap();
    let token = store.load_refresh_token("printer").unwrap().unwrap();
    assert_eq!(token.expose_secret(), "0.Aold-format-token");
}

#[test]
fn records_sealed_by_earlier_builds_open_and_new_ones_open_with_ring() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let old = TokenRecord {
        refresh_token: Some(secret("0.Afrom-an-earlier-build")),
        access_token_expires: Some(4000),
        ..TokenRecord::default()
    };
    let sealed = seal_with_ring(dir.path(), MAGIC, "printer", &old.to_json());
    fs::write(store.token_path("printer"), sealed).unwrap();
    let loaded = store.load("printer").unwrap().unwrap();
    assert_eq!(
        loaded.refresh_token.unwrap().expose_secret(),
        "0.Afrom-an-earlier-build"
    );
    assert_eq!(loaded.access_token_expires, Some(4000));

    // And the other way round: what this build writes is plain RFC 8439, which ring opens.
    store
        .save_refresh_token("scanner", &secret("0.Awritten-now"))
        .unwrap();
    let on_disk = fs::read(store.token_path("scanner")).unwrap();
    let (nonce, body) = on_disk[MAGIC.len()..].split_at(NONCE_LEN);
    use ring::aead::{Aad, Nonce as RingNonce};
    let mut body = body.to_vec();
    let plain = ring_key(dir.path())
        .open_in_place(
            RingNonce::try_assume_unique_for_key(nonce).unwrap(),
            Aad::from(&b"scanner"[..]),
            &mut body,
        )
        .unwrap();
    let record = TokenRecord::from_json(plain).unwrap();
    assert_eq!(
        record.refresh_token.unwrap().expose_secret(),
        "0.Awritten-now"
    );
}

#[test]
fn a_store_with_tokens_never_gets_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.save_refresh_token("a", &secret("token-a")).unwrap();
    // The key lived elsewhere (a systemd credential this process was not given).
    fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::KeyMissing { .. })
    ));
    assert!(!dir.path().join(KEY_FILE).exists());
}

#[test]
fn the_version_changes_when_another_process_replaces_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.version("a"), None);
    store.save_refresh_token("a", &secret("one")).unwrap();
    let first = store.version("a").unwrap();
    store.save_refresh_token("a", &secret("two")).unwrap();
    assert_ne!(
        store.version("a").unwrap(),
        first,
        "rename gives a new inode"
    );
}

#[test]
fn identity_names_cannot_escape_the_directory() {
    assert_eq!(file_name("printer@contoso.com"), "printer@contoso.com");
    assert_eq!(file_name("../x"), "_2e./x".replace("/", "_2f"));
    assert!(!file_name("../../etc/passwd").contains('/'));
    assert!(!file_name(".hidden").starts_with('.'));
}
