//! The key store: which key, of which application, in which provider, is which provider key.
//!
//! Every key is one small file, written crash-safely (write a temporary file, fsync it,
//! rename it over the final name, fsync the directory; for a batch of changes, one syncfs
//! in place of each round of fsyncs: `Batch`, `durable`), so that after a `kill -9` or a
//! power cut at any moment a key is either wholly there or wholly absent. The layout is
//!
//! ```text
//! <root>/@<authenticator>/<hex(application)>/<provider id>/<hex(key name)>.key
//! ```
//!
//! and each file holds `PKS1`, the payload length (u32 LE), the payload's CRC-32 (u32 LE)
//! and the payload: a bincode-encoded [`StoredEntry`]. A file whose checksum, length or
//! names do not match is reported by path at start-up and skipped; temporary files left by
//! an interrupted write are removed. Directories the store creates are mode 0700 and entries
//! 0600. An application is its name and the authenticator that vouched for it (`AppId`,
//! `namespace`). See docs/key-store.md.

use crate::error::OpError;
use parsec_interface::operations::psa_key_attributes::Attributes;
use parsec_interface::requests::{AuthType, ProviderId, ResponseStatus};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub mod namespace;
pub mod sqlite;
pub mod upstream;

const MAGIC: &[u8; 4] = b"PKS1";
/// The file ending of a record that hides an upstream entry this service destroyed.
const GONE: &str = ".gone";
const HEADER_LEN: usize = 12;
/// Longest application or key name, in bytes: the hex file name must fit in 255 bytes.
pub const MAX_NAME_LEN: usize = 120;

/// An application: a name, as one authenticator vouched for it. The same name from another
/// authenticator (a Direct application called "1000", the process of UID 1000) is another
/// application, with other keys (`namespace`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AppId {
    /// The authenticator's wire id (upstream's AuthType).
    pub auth: u8,
    pub name: String,
}

impl AppId {
    pub fn new(auth: AuthType, name: &str) -> Self {
        AppId {
            auth: auth as u8,
            name: name.to_string(),
        }
    }
}

/// The full name of a key: nobody but `app` (of that authenticator) can reach it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyTriple {
    pub auth: u8,
    pub app: String,
    pub provider: u8,
    pub name: String,
}

impl KeyTriple {
    pub fn new(app: &AppId, provider: ProviderId, name: &str) -> Self {
        KeyTriple {
            auth: app.auth,
            app: app.name.clone(),
            provider: provider as u8,
            name: name.to_string(),
        }
    }

    /// The application that owns the key.
    pub fn owner(&self) -> AppId {
        AppId {
            auth: self.auth,
            name: self.app.clone(),
        }
    }
}

/// What the store remembers about a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyEntry {
    /// The provider's own handle for the key (a PSA key id, a TPM blob, a CKA_ID...).
    pub key_id: Vec<u8>,
    pub attributes: Attributes,
}

#[derive(Serialize, Deserialize)]
struct StoredEntry {
    app: String,
    provider: u8,
    name: String,
    entry: KeyEntry,
}

/// Two entries that name one key (the same provider key id) cannot both be right, and
/// serving either could hand one application another's key (or let its DestroyKey destroy
/// the other's material): every entry of such a group is set aside as damaged, so its key
/// material is kept and never swept, and the operator is told which files to look at.
fn quarantine_shared_ids(
    entries: Vec<(KeyTriple, KeyEntry, PathBuf)>,
    damaged: &mut Vec<DamagedEntry>,
) -> Vec<(KeyTriple, KeyEntry)> {
    let mut by_id: BTreeMap<&[u8], Vec<&Path>> = BTreeMap::new();
    for (key, entry, path) in &entries {
        by_id
            .entry(identity(key.provider, &entry.key_id))
            .or_default()
            .push(path);
    }
    let shared: BTreeMap<Vec<u8>, Vec<PathBuf>> = by_id
        .into_iter()
        .filter(|(_, paths)| paths.len() > 1)
        .map(|(id, paths)| {
            (
                id.to_vec(),
                paths.into_iter().map(Path::to_path_buf).collect(),
            )
        })
        .collect();
    let mut kept = Vec::with_capacity(entries.len());
    for (key, entry, path) in entries {
        let Some(paths) = shared.get(identity(key.provider, &entry.key_id)) else {
            kept.push((key, entry));
            continue;
        };
        let others: Vec<String> = paths
            .iter()
            .filter(|p| **p != path)
            .map(|p| p.display().to_string())
            .collect();
        damaged.push(DamagedEntry {
            path,
            reason: format!(
                "it names the same key as {} (one file was copied or rewritten over another): none of them is served until the wrong ones are removed or restored from a backup",
                others.join(", ")
            ),
        });
    }
    kept
}

/// The part of a key id that names the material: the software provider's entries follow
/// their 4-byte PSA key id with the key file's digest, which two entries naming one file
/// need not share.
fn identity(provider: u8, key_id: &[u8]) -> &[u8] {
    if provider == ProviderId::MbedCrypto as u8 && key_id.len() > 4 {
        &key_id[..4]
    } else {
        key_id
    }
}

/// An entry that could not be read at start-up.
#[derive(Debug)]
pub struct DamagedEntry {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Default)]
pub struct KeyStore {
    /// The directory each provider's entries live in.
    roots: BTreeMap<u8, PathBuf>,
    entries: BTreeMap<KeyTriple, KeyEntry>,
    /// Entries a provider made from its config (keys that were on a token before the
    /// service): in memory only, never written or removed on disk.
    mounted: BTreeSet<KeyTriple>,
    /// Entries that could not be read at start-up, by provider: their keys' material must not
    /// be taken for unneeded.
    damaged: BTreeMap<u8, usize>,
    /// Keys of batches being made durable (`hold`, until `apply`).
    held: BTreeSet<KeyTriple>,
    /// Entries read from upstream Parsec's store (read only): a removal records a `.gone`
    /// file in this store's own directory instead.
    inherited: BTreeSet<KeyTriple>,
    /// Providers whose configured directory holds upstream's store (served beside it).
    upstream: BTreeSet<u8>,
}

/// Changes to the store that become durable together (a group commit): staged with
/// `stage_insert` and `stage_remove`, made durable and visible by `commit`.
#[derive(Default)]
pub struct Batch {
    inserts: Vec<Staged>,
    removes: Vec<(KeyTriple, PathBuf)>,
    /// Every key the batch touches: one change per key.
    names: BTreeSet<KeyTriple>,
}

struct Staged {
    key: KeyTriple,
    entry: KeyEntry,
    tmp: PathBuf,
    path: PathBuf,
    /// A `.gone` record hiding an inherited (upstream) entry, not a new entry.
    hide: bool,
}

/// A point in a batch to go back to (`Batch::discard_from`).
pub struct Mark(usize, usize);

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.removes.is_empty()
    }

    pub fn mark(&self) -> Mark {
        Mark(self.inserts.len(), self.removes.len())
    }

    /// Takes back what was staged since `mark` (one request's changes, when one of them
    /// cannot be staged).
    pub fn discard_from(&mut self, mark: Mark) {
        for staged in self.inserts.drain(mark.0..) {
            let _ = fs::remove_file(&staged.tmp);
            self.names.remove(&staged.key);
        }
        for (key, _) in self.removes.drain(mark.1..) {
            self.names.remove(&key);
        }
    }
}

impl KeyStore {
    /// An empty store: providers' entries come in with `load_layout` (or `adopt`).
    pub fn new() -> KeyStore {
        KeyStore::default()
    }

    /// Opens the store for the given providers, loading every entry found (entries older
    /// than namespaces taken for Direct's). Entries of providers not listed stay on disk
    /// untouched, so that disabling a provider in the config and enabling it again loses
    /// nothing.
    pub fn open(roots: &[(ProviderId, PathBuf)]) -> io::Result<(KeyStore, Vec<DamagedEntry>)> {
        let mut store = KeyStore::new();
        let mut damaged = Vec::new();
        for (provider, root) in roots {
            damaged.extend(store.load(*provider, root, AuthType::Direct)?);
        }
        Ok((store, damaged))
    }

    /// Reads one provider's entries from `root` (its key store directory), in place of any
    /// it had in memory (a reload that starts a new instance of the provider: what is on
    /// disk is exactly what was committed, as its previous instance has drained). If `root`
    /// holds upstream Parsec's store, its entries are read from there (never written) and
    /// this store's own from the overlay beside it (`upstream::layout`). `auth` is the
    /// configured authenticator, which entries older than namespaces belong to if the store
    /// has no record of its own yet (`namespace::upgrade`).
    pub fn load(
        &mut self,
        provider: ProviderId,
        root: &Path,
        auth: AuthType,
    ) -> io::Result<Vec<DamagedEntry>> {
        self.load_layout(provider, &upstream::layout(root), auth)
    }

    /// `load`, with where the entries are already known (`upstream::layout`).
    pub fn load_layout(
        &mut self,
        provider: ProviderId,
        layout: &upstream::Layout,
        auth: AuthType,
    ) -> io::Result<Vec<DamagedEntry>> {
        let provider = provider as u8;
        let root = layout.own.as_path();
        let mut damaged = Vec::new();
        let unnamespaced = namespace::upgrade(root, auth as u8, &mut damaged)?;
        let mut entries = Vec::new();
        let mut hidden = BTreeSet::new();
        for ns_dir in read_dir_sorted(root)? {
            let ns_name = ns_dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let Some(auth) = namespace::auth_of_dir(ns_name) else {
                continue;
            };
            for app_dir in read_dir_sorted(&ns_dir)? {
                let provider_dir = app_dir.join(provider.to_string());
                if !provider_dir.is_dir() {
                    continue;
                }
                for path in read_dir_sorted(&provider_dir)? {
                    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                    if file_name.ends_with(".tmp") {
                        log::warn!(
                            "key store: removing {}, left by a write that did not finish",
                            path.display()
                        );
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    let gone = file_name.ends_with(GONE);
                    match read_entry(&path, provider) {
                        Ok(stored) => {
                            let key = KeyTriple {
                                auth,
                                app: stored.app,
                                provider,
                                name: stored.name,
                            };
                            if gone {
                                hidden.insert(key);
                            } else {
                                entries.push((key, stored.entry, path));
                            }
                        }
                        Err(reason) => damaged.push(DamagedEntry { path, reason }),
                    }
                }
            }
        }
        let mut inherited = BTreeSet::new();
        if let Some(upstream_root) = &layout.upstream {
            let own: BTreeSet<KeyTriple> = entries.iter().map(|(k, _, _)| k.clone()).collect();
            let (theirs, unreadable) = upstream::read(upstream_root, provider, unnamespaced)?;
            damaged.extend(unreadable);
            for (key, entry, path) in theirs {
                if hidden.contains(&key) || own.contains(&key) {
                    continue;
                }
                inherited.insert(key.clone());
                entries.push((key, entry, path));
            }
        }
        let entries = quarantine_shared_ids(entries, &mut damaged);
        self.forget_provider(provider);
        self.roots.insert(provider, root.to_path_buf());
        self.entries.extend(entries);
        // Those the quarantine set aside are not served, so not inherited either.
        self.inherited.extend(
            inherited
                .into_iter()
                .filter(|key| self.entries.contains_key(key)),
        );
        if layout.upstream.is_some() {
            self.upstream.insert(provider);
        }
        if !damaged.is_empty() {
            self.damaged.insert(provider, damaged.len());
        }
        Ok(damaged)
    }

    /// Whether an entry was read from upstream Parsec's store (and is still served).
    pub fn is_inherited(&self, key: &KeyTriple) -> bool {
        self.inherited.contains(key)
    }

    /// Whether a provider's configured directory holds upstream Parsec's store.
    pub fn reads_upstream(&self, provider: ProviderId) -> bool {
        self.upstream.contains(&(provider as u8))
    }

    /// The directory a provider's own entries are written to.
    pub fn own_dir(&self, provider: ProviderId) -> Option<&Path> {
        self.roots.get(&(provider as u8)).map(PathBuf::as_path)
    }

    /// Takes one provider's entries from a store that holds that provider alone (read and
    /// recovered by the provider's worker as it started), in place of any this one had.
    pub fn adopt(&mut self, provider: ProviderId, mut other: KeyStore) {
        let id = provider as u8;
        self.forget_provider(id);
        if let Some(root) = other.roots.remove(&id) {
            self.roots.insert(id, root);
        }
        let entries = std::mem::take(&mut other.entries);
        self.entries
            .extend(entries.into_iter().filter(|(k, _)| k.provider == id));
        self.mounted
            .extend(other.mounted.into_iter().filter(|k| k.provider == id));
        self.inherited
            .extend(other.inherited.into_iter().filter(|k| k.provider == id));
        if let Some(count) = other.damaged.remove(&id) {
            self.damaged.insert(id, count);
        }
        if other.upstream.contains(&id) {
            self.upstream.insert(id);
        }
    }

    /// How many entries could not be read, over every provider.
    pub fn damaged_total(&self) -> usize {
        self.damaged.values().sum()
    }

    /// Drops one provider's entries from memory (a reload removed it); its files stay on
    /// disk untouched, so enabling it again loses nothing.
    pub fn unload(&mut self, provider: ProviderId) {
        let provider = provider as u8;
        self.forget_provider(provider);
        self.roots.remove(&provider);
    }

    fn forget_provider(&mut self, provider: u8) {
        self.entries.retain(|k, _| k.provider != provider);
        self.mounted.retain(|k| k.provider != provider);
        self.inherited.retain(|k| k.provider != provider);
        self.upstream.remove(&provider);
        self.damaged.remove(&provider);
    }

    /// How many entries of a provider could not be read at start-up.
    pub fn damaged_in(&self, provider: ProviderId) -> usize {
        self.damaged.get(&(provider as u8)).copied().unwrap_or(0)
    }

    pub fn get(&self, key: &KeyTriple) -> Option<&KeyEntry> {
        self.entries.get(key)
    }

    pub fn contains(&self, key: &KeyTriple) -> bool {
        self.entries.contains_key(key)
    }

    /// Whether a key is in a batch being made durable.
    pub fn is_held(&self, key: &KeyTriple) -> bool {
        self.held.contains(key)
    }

    /// Whether another change of this key is being made durable, in `batch` or in a commit
    /// in flight.
    pub fn is_changing(&self, batch: &Batch, key: &KeyTriple) -> bool {
        batch.names.contains(key) || self.held.contains(key)
    }

    /// Whether a name is taken: stored, or in a batch being made durable.
    pub fn is_taken(&self, key: &KeyTriple) -> bool {
        self.entries.contains_key(key) || self.held.contains(key)
    }

    /// Stores a new entry durably; it is only visible once it is on disk.
    pub fn insert(&mut self, key: KeyTriple, entry: KeyEntry) -> Result<(), OpError> {
        let mut batch = Batch::default();
        self.stage_insert(&mut batch, key, entry)?;
        self.commit(batch)
    }

    /// Writes a new entry into a batch (a temporary file, not yet durable, not yet visible).
    /// Refuses a name the store or the batch already has.
    pub fn stage_insert(
        &mut self,
        batch: &mut Batch,
        key: KeyTriple,
        entry: KeyEntry,
    ) -> Result<(), OpError> {
        if self.entries.contains_key(&key) || batch.names.contains(&key) || self.held.contains(&key)
        {
            return Err(OpError::status(ResponseStatus::PsaErrorAlreadyExists));
        }
        let path = self.path_of(&key)?;
        let stored = StoredEntry {
            app: key.app.clone(),
            provider: key.provider,
            name: key.name.clone(),
            entry,
        };
        let tmp = write_temporary(&path, &stored)
            .map_err(|e| OpError::storage(&format!("writing {}", path.display()), &e))?;
        batch.names.insert(key.clone());
        batch.inserts.push(Staged {
            key,
            entry: stored.entry,
            tmp,
            path,
            hide: false,
        });
        Ok(())
    }

    /// Adds an entry's removal to a batch and returns the entry (it stays in the store until
    /// the batch is committed). A mounted entry has no file: it goes at once.
    pub fn stage_remove(
        &mut self,
        batch: &mut Batch,
        key: &KeyTriple,
    ) -> Result<KeyEntry, OpError> {
        let Some(entry) = self.entries.get(key).cloned() else {
            return Err(OpError::status(ResponseStatus::PsaErrorDoesNotExist));
        };
        if batch.names.contains(key) || self.held.contains(key) {
            return Err(OpError::status(ResponseStatus::PsaErrorDoesNotExist));
        }
        if self.mounted.remove(key) {
            self.entries.remove(key);
            return Ok(entry);
        }
        if self.inherited.contains(key) {
            // Upstream's file stays as it is: a `.gone` record in this store's directory
            // hides it from now on.
            let path = self.path_of(key)?.with_extension(&GONE[1..]);
            let stored = StoredEntry {
                app: key.app.clone(),
                provider: key.provider,
                name: key.name.clone(),
                entry: entry.clone(),
            };
            let tmp = write_temporary(&path, &stored)
                .map_err(|e| OpError::storage(&format!("writing {}", path.display()), &e))?;
            batch.names.insert(key.clone());
            batch.inserts.push(Staged {
                key: key.clone(),
                entry: entry.clone(),
                tmp,
                path,
                hide: true,
            });
            return Ok(entry);
        }
        let path = self.path_of(key)?;
        batch.names.insert(key.clone());
        batch.removes.push((key.clone(), path));
        Ok(entry)
    }

    /// Makes every change of a batch durable, then puts them in the store (`durable`, then
    /// `apply`, on this thread).
    pub fn commit(&mut self, batch: Batch) -> Result<(), OpError> {
        self.hold(&batch);
        let done = durable(batch);
        self.apply(done)
    }

    /// The keys of a batch that is being made durable elsewhere (`durable` on the store's
    /// writer thread): no other batch may take them until it is `apply`d.
    pub fn hold(&mut self, batch: &Batch) {
        self.held.extend(batch.names.iter().cloned());
    }

    /// Puts a durable batch in the store: its new entries become visible, its removed ones
    /// are gone. On an error no new entry is stored (their files were taken away again); a
    /// removal whose file was unlinked stays done, as the file is gone.
    pub fn apply(&mut self, done: Committed) -> Result<(), OpError> {
        let Committed {
            batch,
            outcome,
            unlinked,
        } = done;
        for key in &batch.names {
            self.held.remove(key);
        }
        for key in unlinked {
            self.entries.remove(&key);
        }
        outcome?;
        for staged in batch.inserts {
            if staged.hide {
                self.entries.remove(&staged.key);
                self.inherited.remove(&staged.key);
            } else {
                self.entries.insert(staged.key, staged.entry);
            }
        }
        Ok(())
    }

    /// Adds an entry that lives in memory only (a key the config maps from a token).
    /// Fails if a stored key already has that name.
    pub fn mount(&mut self, key: KeyTriple, entry: KeyEntry) -> Result<(), String> {
        if self.entries.contains_key(&key) {
            return Err(format!(
                "application \"{}\" already has a key named \"{}\" in the key store",
                key.app, key.name
            ));
        }
        self.entries.insert(key.clone(), entry);
        self.mounted.insert(key);
        Ok(())
    }

    /// Whether an entry was mounted from the config rather than stored.
    pub fn is_mounted(&self, key: &KeyTriple) -> bool {
        self.mounted.contains(key)
    }

    /// Removes an entry durably and returns it.
    pub fn remove(&mut self, key: &KeyTriple) -> Result<KeyEntry, OpError> {
        let mut batch = Batch::default();
        let entry = self.stage_remove(&mut batch, key)?;
        self.commit(batch)?;
        Ok(entry)
    }

    /// Every key of one application, in provider then name order. Entries are ordered by
    /// authenticator and application first, so this reads only that application's range.
    pub fn keys_of<'a>(
        &'a self,
        app: &'a AppId,
    ) -> impl Iterator<Item = (&'a KeyTriple, &'a KeyEntry)> + 'a {
        let first = KeyTriple {
            auth: app.auth,
            app: app.name.clone(),
            provider: 0,
            name: String::new(),
        };
        self.entries
            .range(first..)
            .take_while(move |(k, _)| k.auth == app.auth && k.app == app.name)
    }

    /// Every key held by one provider.
    pub fn keys_in(&self, provider: ProviderId) -> impl Iterator<Item = (&KeyTriple, &KeyEntry)> {
        let provider = provider as u8;
        self.entries
            .iter()
            .filter(move |(k, _)| k.provider == provider)
    }

    /// The applications of one authenticator that own at least one key.
    pub fn applications(&self, auth: AuthType) -> Vec<String> {
        let auth = auth as u8;
        let mut apps: Vec<String> = Vec::new();
        for key in self.entries.keys().filter(|k| k.auth == auth) {
            if apps.last() != Some(&key.app) {
                apps.push(key.app.clone());
            }
        }
        apps
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn path_of(&self, key: &KeyTriple) -> Result<PathBuf, OpError> {
        check_name("application name", &key.app)?;
        check_name("key name", &key.name)?;
        let root = self.roots.get(&key.provider).ok_or_else(|| {
            OpError::new(
                ResponseStatus::ProviderNotRegistered,
                format!("no key store directory for provider {}", key.provider),
                "enable the provider in the config",
            )
        })?;
        Ok(root
            .join(namespace::dir_name(key.auth))
            .join(hex(&key.app))
            .join(key.provider.to_string())
            .join(format!("{}.key", hex(&key.name))))
    }
}

/// Refuses a name the store cannot hold (checked before any device or file is touched).
pub fn check_name(what: &str, name: &str) -> Result<(), OpError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("{what} of {} bytes", name.len()),
            "names must be 1 to 120 bytes of UTF-8",
        ));
    }
    Ok(())
}

fn read_dir_sorted(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    Ok(paths)
}

fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Encodes an entry as it is stored on disk.
fn encode(stored: &StoredEntry) -> Vec<u8> {
    let payload = bincode::serialize(stored).expect("serialising plain data cannot fail");
    frame_payload(&payload)
}

/// A payload with the header an entry file has (magic, length, CRC-32): how entries are
/// written, and how the fuzzer reaches the payload decoder.
pub fn frame_payload(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    bytes.extend_from_slice(&crc32(payload).to_le_bytes());
    bytes.extend_from_slice(payload);
    bytes
}

/// Decodes an entry's bytes as the store reads them at start-up (for the fuzzer: any bytes
/// must give an entry or a reason, never a panic).
pub fn check_entry(bytes: &[u8]) -> Result<(), String> {
    decode(bytes).map(|_| ())
}

fn decode(bytes: &[u8]) -> Result<StoredEntry, String> {
    if bytes.len() >= 4 && &bytes[..3] == b"PKS" && bytes[3] != MAGIC[3] {
        return Err(format!(
            "entry format version {:?} (this service reads version \"1\"): written by another version of the service; it is kept as it is, and so is its key",
            bytes[3].escape_ascii().to_string()
        ));
    }
    if bytes.len() < HEADER_LEN || &bytes[..4] != MAGIC {
        return Err("not a key store entry (bad magic)".into());
    }
    let len = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let payload = &bytes[HEADER_LEN..];
    if payload.len() != len {
        return Err(format!(
            "truncated: {} payload bytes, header says {len}",
            payload.len()
        ));
    }
    if crc32(payload) != crc {
        return Err("checksum mismatch".into());
    }
    bincode::deserialize(payload).map_err(|e| format!("undecodable payload: {e}"))
}

fn read_entry(path: &Path, provider: u8) -> Result<StoredEntry, String> {
    let bytes = fs::read(path).map_err(|e| format!("unreadable: {e}"))?;
    let stored = decode(&bytes)?;
    // The names inside must be the ones the path claims: a file copied into another
    // application's directory must not hand that application the key.
    let expected = path
        .parent()
        .and_then(Path::parent)
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .map(str::to_string);
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if stored.provider != provider
        || expected != Some(hex(&stored.app))
        || (file != format!("{}.key", hex(&stored.name))
            && file != format!("{}{GONE}", hex(&stored.name)))
    {
        return Err("its contents name another application, provider or key than its path".into());
    }
    Ok(stored)
}

/// The key a `.gone` record (an upstream entry this service destroyed) hides, if `path` is
/// a readable one, of the authenticator `auth`.
pub fn read_gone(path: &Path, provider: u8, auth: u8) -> Option<KeyTriple> {
    if !path.file_name()?.to_str()?.ends_with(GONE) {
        return None;
    }
    let stored = read_entry(path, provider).ok()?;
    Some(KeyTriple {
        auth,
        app: stored.app,
        provider,
        name: stored.name,
    })
}

/// A batch on its way from `durable` (any thread) back to `KeyStore::apply`.
pub struct Committed {
    batch: Batch,
    outcome: Result<(), OpError>,
    /// Removed entries whose files are gone (whatever the outcome).
    unlinked: Vec<KeyTriple>,
}

/// Makes every change of a batch durable (`durable_all` of one batch).
pub fn durable(batch: Batch) -> Committed {
    durable_all(vec![batch])
        .pop()
        .expect("one committed batch per batch")
}

/// Makes every change of several batches durable, sharing the syncs (group commit): the new
/// files' contents first, then their names and the removals, batch by batch in the order
/// given, then the directories. A set of several changes syncs the file system once per
/// phase (`sync_file_systems`) instead of each file and directory, however many batches
/// they came in. Touches only the files, never the store's maps: it runs on the store's
/// writer thread while the event loop serves on. A batch whose rename fails fails alone; a
/// failed sync fails every batch (none of their new entries is kept).
pub fn durable_all(batches: Vec<Batch>) -> Vec<Committed> {
    let changes: usize = batches
        .iter()
        .map(|b| b.inserts.len() + b.removes.len())
        .sum();
    let group = changes > 1;
    let inserts = || batches.iter().flat_map(|b| b.inserts.iter());
    // Phase 1: the new files' contents.
    let mut shared: Result<(), OpError> = Ok(());
    if group {
        if inserts().next().is_some() {
            if let Err(e) = sync_file_systems(inserts().filter_map(|s| s.tmp.parent())) {
                shared = Err(OpError::storage("syncing the key store", &e));
            }
        }
    } else if let Some(staged) = inserts().next() {
        if let Err(e) = File::open(&staged.tmp).and_then(|f| f.sync_all()) {
            shared = Err(OpError::storage(
                &format!("syncing {}", staged.tmp.display()),
                &e,
            ));
        }
    }
    // Phase 2, batch by batch: renames, then removals (a removal is done whatever the
    // outcome: `apply` forgets what was unlinked).
    let mut dirs: BTreeSet<PathBuf> = BTreeSet::new();
    let mut outcomes = Vec::with_capacity(batches.len());
    for batch in &batches {
        let mut outcome = shared.clone();
        let mut renamed = 0;
        if outcome.is_ok() {
            for staged in &batch.inserts {
                if let Err(e) = fs::rename(&staged.tmp, &staged.path) {
                    outcome = Err(OpError::storage(
                        &format!("writing {}", staged.path.display()),
                        &e,
                    ));
                    break;
                }
                renamed += 1;
                dirs.extend(staged.path.parent().map(Path::to_path_buf));
            }
        }
        let mut unlinked = Vec::new();
        for (key, path) in &batch.removes {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    if outcome.is_ok() {
                        outcome = Err(OpError::storage(
                            &format!("removing {}", path.display()),
                            &e,
                        ));
                    }
                    continue;
                }
            }
            unlinked.push(key.clone());
            dirs.extend(path.parent().map(Path::to_path_buf));
        }
        outcomes.push((outcome, renamed, unlinked));
    }
    // Phase 3: the directories, once.
    let synced = if group {
        sync_file_systems(dirs.iter().map(PathBuf::as_path))
            .map_err(|e| ("the key store".to_string(), e))
    } else {
        dirs.iter()
            .try_for_each(|dir| sync_dir(dir).map_err(|e| (dir.display().to_string(), e)))
    };
    let synced = synced.map_err(|(what, e)| OpError::storage(&format!("syncing {what}"), &e));
    batches
        .into_iter()
        .zip(outcomes)
        .map(|(batch, (mut outcome, renamed, unlinked))| {
            if let (Ok(()), Err(e)) = (&outcome, &synced) {
                outcome = Err(e.clone());
            }
            if outcome.is_err() {
                for (i, staged) in batch.inserts.iter().enumerate() {
                    let _ = fs::remove_file(if i < renamed {
                        &staged.path
                    } else {
                        &staged.tmp
                    });
                }
            }
            Committed {
                outcome,
                unlinked,
                batch,
            }
        })
        .collect()
}

/// Writes an entry's temporary file beside its final name (not synced) and returns its path.
fn write_temporary(path: &Path, stored: &StoredEntry) -> io::Result<PathBuf> {
    let dir = path.parent().expect("entry paths have a parent");
    if !dir.is_dir() {
        // <root>/@<auth>/<app>/<provider>: the directories the store creates become durable
        // in their parents (`create_private_dir`).
        create_private_dir(dir)?;
    }
    let file_name = path.file_name().expect("entry paths have a file name");
    let tmp = dir.join(format!(".{}.tmp", file_name.to_string_lossy()));
    write_private(&tmp, &encode(stored))?;
    Ok(tmp)
}

/// Writes `bytes` to `tmp` (mode 0600, truncated), not synced; `tmp` is removed if that
/// fails.
fn write_private(tmp: &Path, bytes: &[u8]) -> io::Result<fs::File> {
    let result = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(tmp)
        .and_then(|mut file| file.write_all(bytes).map(|()| file));
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Puts `bytes` at `path` whole or not at all: written to `tmp` (mode 0600), synced, then
/// renamed over `path`; `tmp` is removed if any step fails. The directory is not synced:
/// the caller does, once for all it wrote.
pub fn replace_file(path: &Path, tmp: &Path, bytes: &[u8]) -> io::Result<()> {
    let file = write_private(tmp, bytes)?;
    let result = file.sync_all().and_then(|()| fs::rename(tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Creates a directory (and missing parents) that only the service user can read: key
/// names and attributes are nobody else's business. Existing directories keep their mode.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // Each directory created here becomes durable in its parent: a store made at first
    // start and filled with keys must not vanish at a power cut because its own directory
    // entry (or its parent's) never reached the disk (not every file system commits a
    // parent's entry with a child's fsync, as ext4's journal does).
    let missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Makes a directory's entries (a new or removed file) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes everything written to the file systems holding `dirs` durable: one syncfs(2) per
/// file system for a whole batch of files and directories, where fsyncing each costs a
/// journal commit and a cache flush apiece. (syncfs reports write-back errors since Linux
/// 5.8.)
pub fn sync_file_systems<'a>(dirs: impl Iterator<Item = &'a Path>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let mut synced = BTreeSet::new();
    for dir in dirs {
        let dir = File::open(dir)?;
        if synced.insert(dir.metadata()?.dev()) {
            nix::unistd::syncfs(dir.as_raw_fd()).map_err(io::Error::from)?;
        }
    }
    Ok(())
}

/// CRC-32 (IEEE 802.3), bitwise: entries are small and written rarely.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests;
