//! The software provider: PSA Crypto as implemented by Mbed TLS, through `psa-crypto`.
//!
//! Keys are PSA persistent keys. Mbed TLS stores each in a file `00000000XXXXXXXX.psa_its`
//! (XXXXXXXX = the key id in hex) in the process's working directory, so the provider makes
//! `storage_dir` the working directory at start-up; every other path the service uses is
//! absolute by then. The key store maps (application, name) to the key id.
//!
//! The provider runs on a worker thread of its own, in batches of requests on different keys.
//! On Mbed TLS 3.6 built thread-safe (`version::thread_safe`), the operations that change
//! nothing (`reader.rs`: signatures, decryptions, exports) run on that thread and a second
//! one (`providers::pool`); creates and destroys stay on the worker's thread, with the
//! second one paused. On an older or unthreaded Mbed TLS the worker's thread is the only
//! one that calls it.
//!
//! Key files are destroyed only on positive evidence (`journal`): an intent record is
//! written before a key file is made, a tombstone before a key is forgotten; start-up
//! resolves what an interrupted create or destroy left, and keeps (and reports) every other
//! key file no entry names. What a batch wrote (records, new key files, the directory) is
//! fsynced once, in `flush`, before any of its results leaves the worker; so a new key file
//! is durable before the event loop stores the entry that names it, and a tombstone before
//! the entry's removal. A destroyed key's material goes only after the entry's removal is
//! durable: the event loop then asks for it (`destroy_material`). (A record and the key
//! file made after it become durable in that order on a journalling file system; where they
//! might not, a key file left without its record is only ever reported, never destroyed.)

pub(crate) mod capabilities;
mod digests;
mod inherited;
mod keygen;
mod message;
mod reader;
pub mod version;

use super::journal;
use super::{AppKeys, Deferred, Limits, Provider, Shared, Start};
use crate::error::OpError;
use crate::key_store::{KeyEntry, KeyStore};
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::{
    psa_destroy_key, psa_generate_key, psa_import_key, NativeOperation, NativeResult,
};
use parsec_interface::requests::{ProviderId, ResponseStatus};
use parsec_interface::secrecy::ExposeSecret;
use psa_crypto::operations::key_management;
use psa_crypto::types::key::{Attributes, Id, Type};
use psa_crypto::types::status::Error as PsaError;
use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

const UUID: &str = "1c1139dc-ad7c-47dc-ad6b-db6fdb466552";
/// PSA's range of key ids an application may choose.
const FIRST_KEY_ID: u32 = 1;
const LAST_KEY_ID: u32 = 0x3FFF_FFFF;
/// Where new key ids start beside upstream Parsec's store. Upstream gives its next key the
/// highest id it holds + 1: a device that goes back to upstream and then forward again
/// brings keys upstream made meanwhile, whose ids must not be ones this service gave out.
const OVERLAY_FIRST_KEY_ID: u32 = 0x2000_0000;

pub struct MbedCryptoProvider {
    /// Key ids in use, by the store or by Mbed TLS.
    used_ids: BTreeSet<u32>,
    next_id: u32,
    /// The lowest id this provider gives out (`OVERLAY_FIRST_KEY_ID` beside upstream's store).
    first_id: u32,
    /// What the operations that change nothing need, shared with a second thread when
    /// Mbed TLS is thread-safe (`shared`).
    reader: Arc<reader::Reader>,
    /// Whether `reader` runs on two threads (a thread-safe Mbed TLS, two cores or more).
    two_threads: bool,
    journal: journal::Journal,
    /// Tombstones written by destroys and `before_forget` (DeleteClient), done once the
    /// material is gone.
    tombstones: Vec<(u32, journal::Record)>,
    /// Create records, done once the event loop has stored the key's entry (`committed`).
    creates: Vec<(u32, journal::Record)>,
    /// Key files made since the last `flush`.
    unsynced: Vec<u32>,
    /// The storage directory changed (a key file made or removed) since the last `flush`.
    dir_unsynced: bool,
    /// Records of keys whose material is gone, done once that is durable (`flush`).
    gone: Vec<journal::Record>,
}

/// Mbed TLS's file for a persistent key (owner 0, the key id), in the working directory.
fn key_file(id: u32) -> String {
    format!("{id:016x}.psa_its")
}

/// Decodes a PSA error for the operator's log.
fn psa_error(operation: &str, err: PsaError) -> OpError {
    let hint = match err {
        PsaError::InsufficientStorage => "the file system holding the Mbed TLS key files is full",
        PsaError::StorageFailure | PsaError::DataCorrupt | PsaError::DataInvalid => {
            "a key file in the provider's storage_dir is unreadable or damaged"
        }
        PsaError::InsufficientMemory => "Mbed TLS ran out of key slots or heap",
        PsaError::InvalidSignature => "the signature does not match the hash and the key",
        PsaError::NotPermitted => "the key's policy does not allow this use: check its usage flags and permitted algorithm",
        PsaError::NotSupported => "Mbed TLS does not support this key type, size or algorithm",
        PsaError::InvalidArgument => "the parameters do not fit the key or the algorithm (sizes, salt, nonce, key data)",
        PsaError::InvalidPadding => "the ciphertext was not made with this key and algorithm",
        _ => "see the Mbed TLS documentation for this status",
    };
    OpError::new(
        ResponseStatus::from(err),
        format!("{operation}: PSA_ERROR_{err:?}"),
        hint,
    )
}

/// Mbed TLS 2.28 reports any failure to write a new key's file as PSA_ERROR_DATA_INVALID
/// (psa_crypto_storage_store), so a full disk looks like bad data. Creating a key reads no
/// stored data, so look at the file system to give the real cause.
// statvfs's field types are 32-bit on some targets (armv7): the casts are needed there.
#[allow(clippy::unnecessary_cast)]
fn storage_write_error(operation: &str, err: PsaError) -> OpError {
    let free = nix::sys::statvfs::statvfs(".").map(|s| {
        (
            s.blocks_available() as u64 * s.fragment_size() as u64,
            s.files_available() as u64,
        )
    });
    match free {
        Ok((bytes, inodes)) if bytes < 64 * 1024 || inodes < 16 => OpError::new(
            ResponseStatus::PsaErrorInsufficientStorage,
            format!("{operation}: Mbed TLS could not write the key file (PSA_ERROR_{err:?}); {bytes} bytes and {inodes} inodes free in storage_dir"),
            "the file system holding the Mbed TLS key files is full: free space or move storage_dir",
        ),
        Ok((bytes, _)) => OpError::new(
            ResponseStatus::PsaErrorStorageFailure,
            format!("{operation}: Mbed TLS could not write the key file (PSA_ERROR_{err:?}); {bytes} bytes free"),
            "check that the service user may write storage_dir, and the file system's health",
        ),
        Err(e) => OpError::new(
            ResponseStatus::PsaErrorStorageFailure,
            format!("{operation}: Mbed TLS could not write the key file (PSA_ERROR_{err:?}); statvfs: {e}"),
            "check storage_dir",
        ),
    }
}

/// The attributes Mbed TLS is given for a new key. psa-crypto 0.12 drops the sign_message and
/// verify_message flags on the way to Mbed TLS (Mbed TLS 3.0 derives them from sign_hash and
/// verify_hash), so a key made for messages only would refuse psa_sign_message: Mbed TLS's key
/// gets the hash flags too. What a client may do is the policy this service stores and checks
/// on every request (`validate`), not Mbed TLS's copy: a messages-only key still cannot SignHash.
fn mbed_policy(mut attributes: Attributes) -> Attributes {
    let flags = &mut attributes.policy.usage_flags;
    if flags.sign_message() && !flags.sign_hash() {
        flags.set_sign_hash();
    }
    if flags.verify_message() && !flags.verify_hash() {
        flags.set_verify_hash();
    }
    attributes
}

/// The size of a key as Mbed TLS holds it.
fn actual_bits(id: Id) -> Option<usize> {
    match Attributes::from_key_id(id) {
        Ok(attributes) => Some(attributes.bits),
        Err(e) => {
            log::warn!("mbed-crypto: cannot read the attributes of key {id:?}: {e:?}");
            None
        }
    }
}

fn key_id_of(entry: &KeyEntry) -> Result<u32, OpError> {
    let id = match entry.key_id.len() {
        4 => entry.key_id.as_slice(),
        n if n == 4 + digests::DIGEST_LEN => &entry.key_id[..4],
        _ => &[],
    };
    let bytes: [u8; 4] = id.try_into().map_err(|_| {
        OpError::new(
            ResponseStatus::PsaErrorCorruptionDetected,
            format!("key store entry holds a {}-byte key id", entry.key_id.len()),
            "the key store entry is not an Mbed Crypto entry: remove it",
        )
    })?;
    Ok(u32::from_le_bytes(bytes))
}

/// The digest of the key file an entry recorded, if it recorded one (`digests.rs`).
fn recorded_digest(entry: &KeyEntry) -> Option<&[u8]> {
    (entry.key_id.len() == 4 + digests::DIGEST_LEN).then(|| &entry.key_id[4..])
}

/// Ids of the key files Mbed TLS has in the working directory.
fn key_files_on_disk() -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(".") {
        for entry in dir.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".psa_its") else {
                continue;
            };
            if stem.len() == 16 && stem.starts_with("00000000") {
                if let Ok(id) = u32::from_str_radix(&stem[8..], 16) {
                    if (FIRST_KEY_ID..=LAST_KEY_ID).contains(&id) {
                        ids.insert(id);
                    }
                }
            }
        }
    }
    ids
}

impl MbedCryptoProvider {
    pub fn new(
        storage_dir: &Path,
        upstream_key_dir: &Path,
        store: &KeyStore,
        limits: Limits,
    ) -> Result<Self, String> {
        crate::key_store::create_private_dir(storage_dir)
            .map_err(|e| format!("cannot create storage_dir {}: {e}", storage_dir.display()))?;
        let storage_dir = storage_dir
            .canonicalize()
            .map_err(|e| format!("cannot find storage_dir {}: {e}", storage_dir.display()))?;
        std::env::set_current_dir(&storage_dir)
            .map_err(|e| format!("cannot enter storage_dir {}: {e}", storage_dir.display()))?;
        let journal = journal::Journal::open(&storage_dir, "journal")
            .map_err(|e| format!("cannot open the journal in {}: {e}", storage_dir.display()))?;
        inherited::copy_key_files(&storage_dir, upstream_key_dir, store);
        if psa_crypto::initialized().is_ok() {
            // Mbed TLS keeps the persistent keys it used in memory (its key slots), by key
            // id, and this instance may serve another store than the one before (a reload
            // moved storage_dir, or the provider was removed and added back on another
            // store), where those ids name other keys: it starts Mbed TLS afresh, so that
            // nothing the instance before loaded is ever served.
            // SAFETY: an instance of this provider started Mbed TLS before, and it has
            // stopped (two instances of one provider are never alive at once); nothing else
            // in this process calls Mbed TLS, so no key or operation of it is in use.
            unsafe { keygen::mbedtls_psa_crypto_free() };
        }
        psa_crypto::init()
            .map_err(|e| format!("Mbed TLS PSA Crypto failed to start: PSA_ERROR_{e:?}"))?;

        let mut referenced = BTreeSet::new();
        for (triple, entry) in store.keys_in(ProviderId::MbedCrypto) {
            match key_id_of(entry) {
                Ok(id) => {
                    referenced.insert(id);
                }
                Err(e) => log::error!(
                    "mbed-crypto: key \"{}\" of \"{}\": {e}",
                    crate::error::escape(&triple.name),
                    crate::error::escape(&triple.app)
                ),
            }
        }
        let mut provider = MbedCryptoProvider {
            used_ids: BTreeSet::new(),
            next_id: FIRST_KEY_ID,
            first_id: if store.reads_upstream(ProviderId::MbedCrypto) {
                OVERLAY_FIRST_KEY_ID
            } else {
                FIRST_KEY_ID
            },
            reader: Arc::new(reader::Reader {
                storage_dir,
                limits,
                verified: digests::Verified::default(),
            }),
            two_threads: version::thread_safe() && two_cores(),
            journal,
            tombstones: Vec::new(),
            creates: Vec::new(),
            unsynced: Vec::new(),
            dir_unsynced: false,
            gone: Vec::new(),
        };
        let damaged = store.damaged_in(ProviderId::MbedCrypto);
        let kept = provider.resolve_journal(&referenced, damaged)?;
        let on_disk = key_files_on_disk();
        for unnamed in on_disk
            .difference(&referenced)
            .filter(|id| !kept.contains(id))
        {
            log::warn!(
                "mbed-crypto: key file {} names no key store entry{}: kept, never reused. {}",
                provider
                    .reader
                    .storage_dir
                    .join(key_file(*unnamed))
                    .display(),
                if damaged > 0 {
                    format!(" (and {damaged} entries of this provider are damaged or unreadable)")
                } else {
                    String::new()
                },
                if damaged > 0 {
                    "Restore the damaged entries (then their keys work again) before removing anything."
                } else {
                    "It was left by an earlier version or an interrupted operation; if nothing needs it, remove the file while the service is stopped."
                }
            );
        }
        for (triple, entry) in store.keys_in(ProviderId::MbedCrypto) {
            if let Ok(id) = key_id_of(entry) {
                if !on_disk.contains(&id) {
                    log::error!(
                        "mbed-crypto: key \"{}\" of \"{}\" has no key file {} in {}: requests for it will fail",
                        crate::error::escape(&triple.name),
                        crate::error::escape(&triple.app),
                        key_file(id),
                        provider.reader.storage_dir.display()
                    );
                }
            }
        }
        // Every id in use by an entry, a kept record or a file is off limits for new keys.
        provider.used_ids = referenced
            .iter()
            .chain(on_disk.iter())
            .chain(kept.iter())
            .copied()
            .collect();
        provider.next_id = referenced
            .iter()
            .next_back()
            .map_or(FIRST_KEY_ID, |id| id + 1)
            .max(provider.first_id);
        log::info!(
            "mbed-crypto: {} keys, key files in {}; {}",
            referenced.len(),
            provider.reader.storage_dir.display(),
            if provider.two_threads {
                "signatures, decryptions and exports on 2 threads"
            } else if version::thread_safe() {
                "1 crypto thread (1 core)"
            } else {
                "1 crypto thread (this Mbed TLS is not thread-safe: 3.6 with MBEDTLS_THREADING_C runs 2)"
            }
        );
        Ok(provider)
    }

    /// Finishes or undoes what interrupted creates and destroys left (see `journal`).
    /// Returns the ids of create records kept because damaged entries might name them.
    fn resolve_journal(
        &mut self,
        referenced: &BTreeSet<u32>,
        damaged: usize,
    ) -> Result<BTreeSet<u32>, String> {
        let mut kept = BTreeSet::new();
        let pending = self.journal.pending().map_err(|e| {
            format!(
                "cannot read the journal in {}: {e}",
                self.reader.storage_dir.display()
            )
        })?;
        for (kind, key) in pending {
            let Ok(id) = u32::from_str_radix(&key, 16) else {
                log::warn!("mbed-crypto: ignoring journal record {key}: not a key id");
                continue;
            };
            let record = self.journal.found(kind, &key);
            let file = self.reader.storage_dir.join(key_file(id));
            match (kind, referenced.contains(&id)) {
                (_, true) => {
                    // A finished create, or a destroy that never removed the entry (and was
                    // never acknowledged): the key stays.
                    self.journal.done(record);
                }
                (journal::Kind::Create, false) if damaged > 0 => {
                    log::error!(
                        "mbed-crypto: key file {} was being created when the service stopped, and {damaged} entries of this provider are damaged or unreadable: it may be one of theirs, so it is kept (and its record). Restore or remove the damaged entries and restart",
                        file.display()
                    );
                    kept.insert(id);
                }
                (journal::Kind::Destroy, false) if damaged > 0 && file.exists() => {
                    // The entry's removal may have been durable (an acknowledged destroy
                    // whose file removal was cut short), or the entry may be among the
                    // damaged ones (a destroy never acknowledged): nothing proves the key is
                    // not needed. An acknowledged destroy's key has no entry, so keeping its
                    // file serves it to nobody.
                    log::error!(
                        "mbed-crypto: key file {} has a destroy record and no readable entry, and {damaged} entries of this provider are damaged or unreadable: its destroy may never have been acknowledged, so the file is kept (and its record). Restore or remove the damaged entries and restart; a key whose DestroyKey was answered Success is then destroyed",
                        file.display()
                    );
                    kept.insert(id);
                }
                (kind, false) => {
                    if file.exists() {
                        log::warn!(
                            "mbed-crypto: destroying key file {}: {}",
                            file.display(),
                            if kind == journal::Kind::Create {
                                "its creation was interrupted before any client was told the key exists"
                            } else {
                                "its key was destroyed (the entry's removal was durable) but the file was not"
                            }
                        );
                        if let Err(e) = self.destroy_id(id) {
                            log::error!(
                                "mbed-crypto: cannot destroy {}: {e}; kept for the next start",
                                file.display()
                            );
                            kept.insert(id);
                            continue;
                        }
                    }
                    self.journal.done(record);
                }
            }
        }
        Ok(kept)
    }

    /// A key id no key uses.
    fn allocate_id(&mut self) -> Result<u32, OpError> {
        for _ in 0..=(LAST_KEY_ID - self.first_id) {
            let id = self.next_id;
            self.next_id = if id >= LAST_KEY_ID {
                self.first_id
            } else {
                id + 1
            };
            if !self.used_ids.contains(&id) {
                return Ok(id);
            }
        }
        Err(OpError::new(
            ResponseStatus::PsaErrorInsufficientStorage,
            "every PSA key id is in use",
            "destroy keys that are no longer needed",
        ))
    }

    /// Creates a key with `make`, then records it; undoes the key if it cannot be recorded.
    /// The intent record is written before the key file exists; both are durable (`flush`)
    /// before the entry that names the key can be stored; the record goes once it is.
    fn create_key(
        &mut self,
        keys: &mut AppKeys<'_>,
        name: &str,
        attributes: Attributes,
        what: &str,
        make: impl FnOnce(Attributes, u32) -> Result<Id, PsaError>,
    ) -> Result<(), OpError> {
        keys.ensure_free(name)?;
        let id = self.allocate_id()?;
        let record = self
            .journal
            .begin_unsynced(journal::Kind::Create, &format!("{id:08x}"))?;
        crate::crash_point("create:after-intent");
        let key = match make(mbed_policy(attributes), id) {
            Ok(key) => key,
            Err(e) => {
                self.journal.done(record);
                return Err(match e {
                    PsaError::DataInvalid | PsaError::InsufficientStorage => {
                        storage_write_error(what, e)
                    }
                    e => psa_error(what, e),
                });
            }
        };
        self.used_ids.insert(id);
        self.reader.verified.insert(id);
        self.unsynced.push(id);
        self.dir_unsynced = true;
        crate::crash_point("create:after-material");
        // An import may leave the size at 0 (PSA takes it from the data): record the size
        // Mbed TLS found, which every output is sized by (a raw key agreement with bits 0
        // had a 0-byte buffer: PSA_ERROR_INVALID_ARGUMENT) and ListKeys reports.
        let mut attributes = attributes;
        if attributes.bits == 0 {
            attributes.bits = actual_bits(key).unwrap_or(0);
        }
        let digest = digests::of_file(&self.reader.storage_dir.join(key_file(id)));
        let stored = digest.and_then(|digest| {
            let mut key_id = id.to_le_bytes().to_vec();
            key_id.extend_from_slice(&digest);
            keys.create(name, KeyEntry { key_id, attributes })
        });
        if let Err(e) = stored {
            // SAFETY: nothing else uses the key being undone: it was made just now and no
            // entry names it (creates run on this thread with the second crypto thread
            // paused, `providers::pool`).
            if unsafe { key_management::destroy(key) }.is_ok() {
                self.unsynced.retain(|&u| u != id);
                self.used_ids.remove(&id);
                self.journal.done(record);
            }
            // Otherwise the record stays: the next start destroys the file.
            return Err(e);
        }
        self.creates.push((id, record));
        Ok(())
    }

    /// Destroys a key's material (its entry is gone already, durably, or never existed).
    fn destroy_id(&mut self, id: u32) -> Result<(), OpError> {
        let key = Id::from_persistent_key_id(id).map_err(|e| psa_error("opening the key", e))?;
        // SAFETY: no operation on this key can be in flight: its entry is gone, and this runs
        // at start-up, before the second crypto thread exists.
        unsafe { key_management::destroy(key) }.map_err(|e| psa_error("psa_destroy_key", e))?;
        self.reader.verified.forget(id);
        journal::sync_dir(&self.reader.storage_dir).map_err(|e| {
            OpError::storage(
                &format!("syncing {}", self.reader.storage_dir.display()),
                &e,
            )
        })?;
        self.used_ids.remove(&id);
        Ok(())
    }

    /// Destroys a key: a tombstone and the entry's removal now; the material once the event
    /// loop has removed the entry durably (`destroy_material`).
    fn destroy_key(&mut self, keys: &mut AppKeys<'_>, name: &str) -> Result<(), OpError> {
        let id = key_id_of(keys.get(name)?)?;
        let record = self
            .journal
            .begin_unsynced(journal::Kind::Destroy, &format!("{id:08x}"))?;
        crate::crash_point("destroy:after-tombstone");
        if let Err(e) = keys.remove_then_destroy(name) {
            self.journal.done(record);
            return Err(e);
        }
        self.tombstones.push((id, record));
        Ok(())
    }
}

/// Whether this machine has two cores or more for the second crypto thread.
fn two_cores() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2)
}

impl Provider for MbedCryptoProvider {
    fn id(&self) -> ProviderId {
        ProviderId::MbedCrypto
    }

    fn shared(&self) -> Option<Arc<dyn Shared>> {
        if self.two_threads {
            Some(Arc::clone(&self.reader) as Arc<dyn Shared>)
        } else {
            None
        }
    }

    fn execute(
        &mut self,
        op: NativeOperation,
        mut keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        match op {
            NativeOperation::PsaGenerateKey(op) => {
                // Refuse what Mbed TLS cannot do, or could only do by stalling every client
                // for seconds (RSA beyond 4096 bits), before trying.
                capabilities::check(CheckType::Generate, op.attributes)?;
                self.create_key(
                    &mut keys,
                    &op.key_name,
                    op.attributes,
                    "psa_generate_key",
                    |attributes, id| key_management::generate(attributes, Some(id)),
                )?;
                Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}))
            }
            NativeOperation::PsaImportKey(op) => {
                if let Err(unsupported) = capabilities::check(CheckType::Import, op.attributes) {
                    // Data of another size than declared is an invalid argument first (as
                    // upstream: an 8192-bit RSA key declared as 1023 bits), whatever the size.
                    super::import::sized(&op.attributes, op.data.expose_secret())?;
                    return Err(unsupported);
                }
                let data = op.data;
                self.create_key(
                    &mut keys,
                    &op.key_name,
                    op.attributes,
                    "psa_import_key",
                    |attributes, id| {
                        key_management::import(attributes, Some(id), data.expose_secret())
                    },
                )?;
                Ok(NativeResult::PsaImportKey(psa_import_key::Result {}))
            }
            NativeOperation::PsaDestroyKey(op) => {
                self.destroy_key(&mut keys, &op.key_name)?;
                Ok(NativeResult::PsaDestroyKey(psa_destroy_key::Result {}))
            }
            op => self.reader.execute(op, keys),
        }
    }

    fn before_forget(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        let id = key_id_of(entry)?;
        // Durable with the batch (`flush`), before its results leave the worker.
        let record = self
            .journal
            .begin_unsynced(journal::Kind::Destroy, &format!("{id:08x}"))?;
        self.tombstones.push((id, record));
        Ok(())
    }

    /// The entry is gone (durably): the key file goes. Its removal becomes durable with the
    /// next batch's `flush`, and only then does its tombstone (or the record of a create
    /// whose entry could not be stored) go; one left behind by a crash is resolved at the
    /// next start.
    fn destroy_material(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        let id = key_id_of(entry)?;
        let key = Id::from_persistent_key_id(id).map_err(|e| psa_error("opening the key", e))?;
        // SAFETY: no operation on this key can be in flight: its entry is gone (durably, and
        // its removal answered), and this runs on the worker's thread with the second crypto
        // thread paused (`providers::pool`).
        unsafe { key_management::destroy(key) }.map_err(|e| psa_error("psa_destroy_key", e))?;
        self.reader.verified.forget(id);
        self.used_ids.remove(&id);
        self.dir_unsynced = true;
        crate::crash_point("destroy:after-material");
        for records in [&mut self.tombstones, &mut self.creates] {
            if let Some(i) = records.iter().position(|(t, _)| *t == id) {
                let (_, record) = records.swap_remove(i);
                self.gone.push(record);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), OpError> {
        let storage =
            |e: std::io::Error| OpError::storage("syncing the software provider's key files", &e);
        let new_files = std::mem::take(&mut self.unsynced);
        let created = !new_files.is_empty();
        if new_files.len() > 1 {
            // A batch: one syncfs for the records, the key files and the directories.
            let dirs = [self.reader.storage_dir.as_path(), self.journal.dir()];
            crate::key_store::sync_file_systems(dirs.into_iter()).map_err(storage)?;
            self.journal.synced();
            self.dir_unsynced = false;
        } else {
            self.journal.sync().map_err(storage)?;
            for id in new_files {
                // Mbed TLS writes a temporary file and renames it, without fsync.
                let path = self.reader.storage_dir.join(key_file(id));
                File::open(&path)
                    .and_then(|file| file.sync_all())
                    .map_err(|e| OpError::storage(&format!("syncing {}", path.display()), &e))?;
            }
        }
        if std::mem::take(&mut self.dir_unsynced) {
            journal::sync_dir(&self.reader.storage_dir).map_err(storage)?;
        }
        if created {
            crate::crash_point("create:after-sync");
        }
        for record in std::mem::take(&mut self.gone) {
            self.journal.done(record);
        }
        Ok(())
    }

    fn committed(&mut self, entry: &KeyEntry) {
        let Ok(id) = key_id_of(entry) else { return };
        if let Some(i) = self.creates.iter().position(|(c, _)| *c == id) {
            let (_, record) = self.creates.swap_remove(i);
            self.journal.done(record);
        }
    }

    /// RSA key pairs take 0.05 s (2048 bits) to seconds (4096) to generate: that runs in a
    /// child process while this worker serves everyone else.
    fn start(&mut self, op: NativeOperation, keys: AppKeys<'_>) -> Result<Start, OpError> {
        match op {
            NativeOperation::PsaGenerateKey(op) if op.attributes.key_type == Type::RsaKeyPair => {
                capabilities::check(CheckType::Generate, op.attributes)?;
                keys.ensure_free(&op.key_name)?;
                let slot = super::ChildSlot::take(&self.reader.limits)?;
                let (output, child) = keygen::spawn(op.attributes)?;
                crate::crash_point("keygen:spawned");
                Ok(Start::Deferred(Deferred {
                    output,
                    child,
                    slot,
                    state: Box::new(keygen::Job {
                        name: op.key_name,
                        attributes: op.attributes,
                    }),
                }))
            }
            op => Ok(Start::Now(op)),
        }
    }

    fn complete(
        &mut self,
        state: Box<dyn std::any::Any + Send>,
        output: Vec<u8>,
        mut keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        let job = state.downcast::<keygen::Job>().map_err(|_| {
            OpError::new(
                ResponseStatus::PsaErrorGenericError,
                "a deferred operation that is not a key generation",
                "report this as a bug",
            )
        })?;
        let key = keygen::parse(output)?;
        // The child made the key; it becomes a persistent key here, recorded as any other.
        self.create_key(
            &mut keys,
            &job.name,
            job.attributes,
            "psa_import_key (of the key generated in a child process)",
            |attributes, id| key_management::import(attributes, Some(id), &key),
        )?;
        Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}))
    }
}

/// What ListProviders says of this provider (the same for every instance).
pub(crate) fn info() -> ProviderInfo {
    ProviderInfo {
        uuid: uuid::Uuid::parse_str(UUID).expect("constant UUID"),
        description: "User space software provider, based on Mbed TLS PSA Crypto".into(),
        vendor: "Arm".into(),
        version_maj: 0,
        version_min: 1,
        version_rev: 0,
        id: ProviderId::MbedCrypto,
    }
}
