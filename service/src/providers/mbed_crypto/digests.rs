//! What identifies each software key's material: the SHA-256 of its Mbed TLS key file,
//! recorded when the key is made, checked the first time the key is used in a run.
//!
//! Mbed TLS's `.psa_its` files carry no checksum: one flipped bit in the key data gives
//! another valid key, which signs (signatures nobody can verify) and exports another public
//! key. The digest turns that into a refusal that says what happened. It lives beside the
//! key file, `storage_dir/<key id, 16 hex digits>.psa_digest` (32 bytes); a key made by
//! an earlier version has none, and gets one at its first use (trust on first use: the file
//! is as it was then).
//!
//! Digests are written without fsync of their own: the provider's `flush` syncs the
//! directory (the rename, or the removal, is durable with the key file's), and a digest's
//! bytes lost or cut short by a power cut (not 32 bytes) only cost the check for that key,
//! which records it again at its next use: a sound key is never refused.

use super::psa_error;
use crate::error::OpError;
use parsec_interface::operations::psa_algorithm::Hash;
use parsec_interface::requests::ResponseStatus;
use std::cell::RefCell;
use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

pub(super) struct Digests {
    dir: PathBuf,
    /// Keys whose file matched its digest in this run.
    verified: RefCell<HashSet<u32>>,
}

fn sha256(data: &[u8]) -> Result<[u8; 32], OpError> {
    let mut digest = [0u8; 32];
    psa_crypto::operations::hash::hash_compute(Hash::Sha256, data, &mut digest)
        .map_err(|e| psa_error("hashing a key file", e))?;
    Ok(digest)
}

fn storage(what: &str, path: &Path, e: std::io::Error) -> OpError {
    OpError::storage(&format!("{what} {}", path.display()), &e)
}

impl Digests {
    pub(super) fn new(storage_dir: &Path) -> Digests {
        Digests {
            dir: storage_dir.to_path_buf(),
            verified: RefCell::new(HashSet::new()),
        }
    }

    fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id:016x}.psa_digest"))
    }

    /// Records the digest of a key file just made.
    pub(super) fn record(&mut self, id: u32, key_file: &Path) -> Result<(), OpError> {
        let data = zeroize::Zeroizing::new(
            fs::read(key_file).map_err(|e| storage("reading", key_file, e))?,
        );
        self.write(id, &sha256(&data)?)?;
        self.verified.borrow_mut().insert(id);
        Ok(())
    }

    fn write(&self, id: u32, digest: &[u8; 32]) -> Result<PathBuf, OpError> {
        let path = self.path(id);
        let tmp = self.dir.join(format!("{id:016x}.psa_digest.tmp"));
        fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(digest))
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| storage("writing", &path, e))?;
        Ok(path)
    }

    /// Forgets the digest of a key whose material is gone.
    pub(super) fn forget(&mut self, id: u32) {
        self.verified.borrow_mut().remove(&id);
        let _ = fs::remove_file(self.path(id));
    }

    /// Checks a key file against its digest, once per key and run. A file without a digest
    /// (made by an earlier version) gets one now.
    pub(super) fn check(&self, id: u32, key_file: &Path) -> Result<(), OpError> {
        if self.verified.borrow().contains(&id) {
            return Ok(());
        }
        let data = match fs::read(key_file) {
            Ok(data) => zeroize::Zeroizing::new(data),
            // A missing file is Mbed TLS's to report (with its own hint).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(storage("reading", key_file, e)),
        };
        let actual = sha256(&data)?;
        let recorded = match fs::read(self.path(id)) {
            Ok(recorded) if recorded.len() == actual.len() => Some(recorded),
            // Cut short by a power cut (written without fsync): recorded again below.
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(storage("reading", &self.path(id), e)),
        };
        match recorded {
            Some(recorded) if recorded == actual => {}
            Some(_) => {
                return Err(OpError::new(
                    ResponseStatus::PsaErrorDataCorrupt,
                    format!(
                        "the key file {} does not match the digest recorded when the key was made ({}): it changed on disk",
                        key_file.display(),
                        self.path(id).display(),
                    ),
                    "the key's material is damaged (a flipped bit gives another key): restore the key file from a backup; the service will not use it as it is",
                ));
            }
            None => {
                self.write(id, &actual)?;
                log::info!(
                    "mbed-crypto: recorded the digest of {} (a key made before digests, or its digest was lost), checked from now on",
                    key_file.display()
                );
            }
        }
        self.verified.borrow_mut().insert(id);
        Ok(())
    }
}
