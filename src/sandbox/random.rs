//! Random values for the sandbox: token bodies, GUID-shaped ids, queue ids and secrets.
//!
//! Everything comes from ring's `SystemRandom`. Should the OS generator ever fail, the values
//! fall back to a SHA-256 chain over a counter and the clock instead of panicking: a sandbox
//! token protects nothing real, and a stand-in server must not die in the middle of a session.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};

/// `len` random bytes.
pub(crate) fn bytes(len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    if SystemRandom::new().fill(&mut out).is_err() {
        fallback_fill(&mut out);
    }
    out
}

/// Base64url text (no padding) of `len` random bytes.
pub(crate) fn base64url(len: usize) -> String {
    URL_SAFE_NO_PAD.encode(bytes(len))
}

/// Lower-case hex of `len` random bytes.
pub(crate) fn hex(len: usize) -> String {
    bytes(len).iter().map(|b| format!("{b:02x}")).collect()
}

/// A GUID-shaped id such as Entra uses for client ids, trace ids and tenant ids.
pub(crate) fn guid() -> String {
    let h = hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A uniform-enough number in `low..=high` (modulo bias is irrelevant here).
pub(crate) fn in_range(low: usize, high: usize) -> usize {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes(8));
    let span = (high - low + 1) as u64;
    low + (u64::from_le_bytes(raw) % span) as usize
}

fn fallback_fill(out: &mut [u8]) {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut seed = Vec::with_capacity(24);
    seed.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    seed.extend_from_slice(&crate::sandbox::clock::unix_millis().to_le_bytes());
    let mut block = digest::digest(&digest::SHA256, &seed);
    for chunk in out.chunks_mut(32) {
        chunk.copy_from_slice(&block.as_ref()[..chunk.len()]);
        block = digest::digest(&digest::SHA256, block.as_ref());
    }
}
