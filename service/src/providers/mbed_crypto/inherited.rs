//! Keys inherited from upstream Parsec's store: their Mbed TLS key files.
//!
//! Upstream keeps Mbed TLS's key files (`00000000XXXXXXXX.psa_its`) in its working
//! directory. This service reads nothing of upstream's in place that Mbed TLS could write
//! (a destroy removes the file): each inherited key's file is copied into `storage_dir`, once,
//! crash-safely (a temporary file, synced, renamed, the directory synced), and upstream's
//! stays as it was, so the device can go back to upstream. New keys' ids start at
//! `OVERLAY_FIRST_KEY_ID`, far above the ids upstream hands out (its highest + 1), so they
//! never take an upstream key's file name, not even one upstream makes after a way back.

use super::{key_file, key_id_of};
use crate::key_store::KeyStore;
use parsec_interface::requests::ProviderId;
use std::fs;
use std::path::Path;

/// Copies the key file of every inherited key that `storage_dir` does not have yet.
pub(super) fn copy_key_files(storage_dir: &Path, upstream_dir: &Path, store: &KeyStore) {
    let mut copied = 0;
    for (triple, entry) in store.keys_in(ProviderId::MbedCrypto) {
        if !store.is_inherited(triple) {
            continue;
        }
        let Ok(id) = key_id_of(entry) else { continue };
        let target = storage_dir.join(key_file(id));
        let source = upstream_dir.join(key_file(id));
        if target.exists() {
            // Mbed TLS never rewrites a key file: a copy that differs from upstream's file
            // is of an older key with this id (the device went back to upstream, which
            // destroyed that key and gave its id to a new one): upstream's is the key.
            match (fs::read(&target), fs::read(&source)) {
                (Ok(ours), Ok(theirs)) if ours != theirs => {
                    log::warn!(
                        "mbed-crypto: key \"{}\" of \"{}\": upstream's key file {} is not the one copied before (upstream made a new key with this id after the device went back to it): copying it again",
                        crate::error::escape(&triple.name),
                        crate::error::escape(&triple.app),
                        source.display()
                    );
                }
                _ => continue,
            }
        }
        match copy(&source, &target) {
            Ok(()) => copied += 1,
            Err(e) => log::error!(
                "mbed-crypto: key \"{}\" of \"{}\" from upstream Parsec's store: cannot copy its key file {}: {e}; requests for it will fail. Upstream keeps key files in its working directory: set upstream_key_dir in this provider's [[provider]] table to that directory (docs/migration.md)",
                crate::error::escape(&triple.name),
                crate::error::escape(&triple.app),
                source.display()
            ),
        }
    }
    if copied > 0 {
        match crate::key_store::sync_dir(storage_dir) {
            Ok(()) => log::info!(
                "mbed-crypto: copied {copied} key files of upstream Parsec's keys from {} (left as they were)",
                upstream_dir.display()
            ),
            Err(e) => log::error!(
                "mbed-crypto: syncing {} after copying upstream key files: {e}",
                storage_dir.display()
            ),
        }
    }
}

fn copy(source: &Path, target: &Path) -> std::io::Result<()> {
    let bytes = fs::read(source)?;
    crate::key_store::replace_file(target, &target.with_extension("psa_its.tmp"), &bytes)
}
