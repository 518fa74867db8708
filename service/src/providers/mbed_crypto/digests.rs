//! What identifies each software key's material: the SHA-256 of its Mbed TLS key file,
//! recorded in the key's entry when the key is made, checked the first time the key is used
//! in a run.
//!
//! Mbed TLS's `.psa_its` files carry no checksum: one flipped bit in the key data gives
//! another valid key, which signs (signatures nobody can verify) and exports another public
//! key. The digest turns that into a refusal that says what happened. The entry's key id is
//! the PSA key id (4 bytes, little-endian) followed by the digest (32 bytes); entries of
//! keys made before digests (and upstream's) hold the id alone, and are not checked.
//!
//! The digest travels with the entry (written and synced with it, removed with it): no file
//! of its own, nothing more to sync or unlink.

use super::psa_error;
use crate::error::OpError;
use parsec_interface::operations::psa_algorithm::Hash;
use parsec_interface::requests::ResponseStatus;
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

pub(super) const DIGEST_LEN: usize = 32;

/// The SHA-256 of a key file.
pub(super) fn of_file(key_file: &Path) -> Result<[u8; DIGEST_LEN], OpError> {
    let data = zeroize::Zeroizing::new(
        std::fs::read(key_file)
            .map_err(|e| OpError::storage(&format!("reading {}", key_file.display()), &e))?,
    );
    let mut digest = [0u8; DIGEST_LEN];
    psa_crypto::operations::hash::hash_compute(Hash::Sha256, &data, &mut digest)
        .map_err(|e| psa_error("hashing a key file", e))?;
    Ok(digest)
}

/// Keys whose file matched its digest in this run (checked once per key and run), shared
/// by the provider's two crypto threads.
#[derive(Default)]
pub(super) struct Verified(Mutex<HashSet<u32>>);

impl Verified {
    fn ids(&self) -> MutexGuard<'_, HashSet<u32>> {
        // A set of ids is whole whatever panicked while it was held.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn insert(&self, id: u32) {
        self.ids().insert(id);
    }

    pub(super) fn forget(&self, id: u32) {
        self.ids().remove(&id);
    }

    /// Checks a key file against the digest its entry recorded.
    pub(super) fn check(&self, id: u32, key_file: &Path, recorded: &[u8]) -> Result<(), OpError> {
        if self.ids().contains(&id) {
            return Ok(());
        }
        if !key_file.exists() {
            // Mbed TLS reports a missing file, with its own hint.
            return Ok(());
        }
        if of_file(key_file)?.as_slice() != recorded {
            return Err(OpError::new(
                ResponseStatus::PsaErrorDataCorrupt,
                format!(
                    "the key file {} does not match the digest recorded in its key store entry when the key was made: it changed on disk",
                    key_file.display()
                ),
                "the key's material is damaged (a flipped bit gives another key): restore the key file from a backup; the service will not use it as it is",
            ));
        }
        self.insert(id);
        Ok(())
    }
}
