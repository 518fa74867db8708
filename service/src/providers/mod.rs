//! Providers: where keys live and cryptography happens.
//!
//! Every provider implements [`Provider`]. A provider is built in by its cargo feature and
//! enabled by a `[[provider]]` table in the config; adding one touches its own folder, one
//! feature, and the match in [`build`].
//!
//! A provider never sees the key store directly: it is handed an [`AppKeys`], a view of the
//! store restricted to the calling application and to itself, so one application cannot
//! name, use, overwrite or destroy another's keys whatever the provider does.

use crate::config::{ProviderKind, ProviderSettings};
use crate::error::OpError;
use crate::key_store::{AppId, KeyEntry, KeyStore, KeyTriple};
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::{NativeOperation, NativeResult};
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};

mod batch;
pub mod can_do;
#[cfg(any(
    feature = "tpm-provider",
    feature = "pkcs11-provider",
    feature = "mbed-crypto-provider"
))]
mod der;
#[cfg(any(feature = "tpm-provider", feature = "pkcs11-provider"))]
mod device;
#[cfg(any(feature = "tpm-provider", feature = "pkcs11-provider"))]
mod ecc;
#[cfg(any(
    feature = "tpm-provider",
    feature = "pkcs11-provider",
    feature = "mbed-crypto-provider"
))]
mod import;
#[cfg(any(feature = "mbed-crypto-provider", feature = "pkcs11-provider"))]
pub mod journal;
#[cfg(feature = "mbed-crypto-provider")]
pub mod mbed_crypto;
#[cfg(any(feature = "tpm-provider", feature = "pkcs11-provider"))]
mod message;
#[cfg(feature = "pkcs11-provider")]
pub mod pkcs11;
mod pool;
pub mod preflight;
pub mod store_writer;
#[cfg(feature = "tpm-provider")]
pub mod tpm;
pub mod worker;

/// Limits every provider applies to what it produces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Largest output buffer one operation may produce, in bytes.
    pub buffer_size_limit: usize,
    /// Child processes (slow key generations) that may run at once, service-wide.
    pub max_keygen_processes: usize,
}

/// Child processes running deferred operations, across every provider and reload.
static CHILDREN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the `max_keygen_processes` places for a child process, held by its `Deferred`
/// until the request is finished (whatever happens to it), then given back.
pub struct ChildSlot(());

impl ChildSlot {
    pub fn take(limits: &Limits) -> Result<ChildSlot, OpError> {
        use std::sync::atomic::Ordering;
        let taken = CHILDREN.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < limits.max_keygen_processes).then_some(n + 1)
        });
        match taken {
            Ok(_) => Ok(ChildSlot(())),
            Err(running) => Err(OpError::new(
                ResponseStatus::PsaErrorInsufficientMemory,
                format!(
                    "{running} key generation processes are running (core_settings.max_keygen_processes = {})",
                    limits.max_keygen_processes
                ),
                "retry when one has finished, or raise core_settings.max_keygen_processes",
            )),
        }
    }

    pub fn running() -> usize {
        CHILDREN.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for ChildSlot {
    fn drop(&mut self) {
        CHILDREN.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Limits {
    /// Refuses an output larger than `buffer_size_limit` before it is produced.
    pub fn check_output(&self, size: usize) -> Result<(), OpError> {
        if size > self.buffer_size_limit {
            return Err(OpError::new(
                ResponseStatus::ResponseTooLarge,
                format!("{size} bytes asked for, limit {}", self.buffer_size_limit),
                "raise core_settings.buffer_size_limit or ask for less",
            ));
        }
        Ok(())
    }
}

/// How a provider takes on an operation.
pub enum Start {
    /// Run it now, on the provider's worker thread: `execute`.
    Now(NativeOperation),
    /// Work that would hold the worker too long (an RSA key generation on the software
    /// provider) runs in a child process; the worker goes on with other requests, the event
    /// loop watches the child, and `complete` runs (on the worker) with what it wrote.
    Deferred(Deferred),
}

pub struct Deferred {
    /// The read end of the pipe the child writes its result to; end of file when done.
    pub output: std::fs::File,
    pub child: nix::unistd::Pid,
    /// Its place among `max_keygen_processes`, given back when the request is finished.
    pub slot: ChildSlot,
    /// What the provider needs to finish the operation.
    pub state: Box<dyn std::any::Any + Send>,
}

pub trait Provider {
    /// Which provider this is on the wire.
    fn id(&self) -> ProviderId;

    /// The part of the provider a second thread may run at the same time as this one, for
    /// the operations that change nothing it keeps (`changes_nothing`), when its library is
    /// thread-safe: the worker runs them on two threads (`pool.rs`). `None`: everything runs
    /// on the worker's thread.
    fn shared(&self) -> Option<std::sync::Arc<dyn Shared>> {
        None
    }

    /// Runs one operation for one application.
    fn execute(&mut self, op: NativeOperation, keys: AppKeys<'_>) -> Result<NativeResult, OpError>;

    /// Decides whether an operation runs now or in a child process (see `Start`).
    fn start(&mut self, op: NativeOperation, _keys: AppKeys<'_>) -> Result<Start, OpError> {
        Ok(Start::Now(op))
    }

    /// Finishes a deferred operation with what its child process wrote.
    fn complete(
        &mut self,
        _state: Box<dyn std::any::Any + Send>,
        _output: Vec<u8>,
        _keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        Err(OpError::new(
            ResponseStatus::PsaErrorGenericError,
            "a deferred operation reached a provider that defers none",
            "report this as a bug",
        ))
    }

    /// Makes durable what the operations since the last call wrote (files, directory
    /// entries), before their results leave the worker: the worker runs a batch of requests,
    /// then calls this once, so that they share their fsyncs. An error fails every request of
    /// the batch that changed a key.
    fn flush(&mut self) -> Result<(), OpError> {
        Ok(())
    }

    /// The entry of a key this provider made (on its worker) is now durable in the store: a
    /// create record kept for it can go.
    fn committed(&mut self, _entry: &KeyEntry) {}

    /// What this instance serves, when its device says less than the provider's capability
    /// table (`opcodes_of`): a PKCS#11 token without AES-GCM serves no AEAD requests. Read
    /// once when it is built; `None`: the table.
    fn opcodes(&self) -> Option<Vec<Opcode>> {
        None
    }

    /// Called on the worker before an entry leaves the key store for good (DeleteClient), so
    /// that the provider can record that its material is to be destroyed (a tombstone), made
    /// durable by the batch's `flush`: a crash after the entry's removal then still lets the
    /// next start destroy it. An error keeps the key.
    fn before_forget(&mut self, _entry: &KeyEntry) -> Result<(), OpError> {
        Ok(())
    }

    /// Destroys the key material behind an entry that has already left the key store
    /// (DeleteClient). Failures are logged by the caller; the name is gone either way.
    fn destroy_material(&mut self, entry: &KeyEntry) -> Result<(), OpError>;
}

/// Whether an operation leaves what a provider keeps as it was (no key made, destroyed or
/// recorded): what a provider's shared part runs (`Shared`), and what the event loop may
/// hand such a provider while it is busy (`worker::Work::changes_nothing`).
pub fn changes_nothing(op: &NativeOperation) -> bool {
    !matches!(
        op,
        NativeOperation::PsaGenerateKey(_)
            | NativeOperation::PsaImportKey(_)
            | NativeOperation::PsaDestroyKey(_)
    )
}

/// Operations of a provider that may run on two threads at once (`Provider::shared`).
pub trait Shared: Send + Sync {
    /// Runs one operation that changes nothing (`changes_nothing`), for one application, on
    /// any thread.
    fn execute(&self, op: NativeOperation, keys: AppKeys<'_>) -> Result<NativeResult, OpError>;
}

/// Builds the provider a config table describes, and tidies up what a crash may have left
/// behind (key material that no store entry refers to). `None`: the provider's hardware is
/// absent and its config says to start without it.
#[cfg_attr(
    not(any(
        feature = "mbed-crypto-provider",
        feature = "tpm-provider",
        feature = "pkcs11-provider"
    )),
    allow(unused_variables)
)]
pub fn build(
    settings: &ProviderSettings,
    store: &mut KeyStore,
    limits: Limits,
) -> Result<Option<Box<dyn Provider + Send>>, String> {
    match &settings.kind {
        #[cfg(feature = "mbed-crypto-provider")]
        ProviderKind::MbedCrypto {
            storage_dir,
            upstream_key_dir,
        } => {
            let provider =
                mbed_crypto::MbedCryptoProvider::new(storage_dir, upstream_key_dir, store, limits)?;
            Ok(Some(Box::new(provider)))
        }
        #[cfg(feature = "pkcs11-provider")]
        ProviderKind::Pkcs11(pkcs11_settings) => {
            let provider = pkcs11::Pkcs11Provider::start(
                pkcs11_settings,
                &settings.key_store_dir,
                settings.authenticator,
                store,
                limits,
            )?;
            Ok(Some(Box::new(provider)))
        }
        #[cfg(feature = "tpm-provider")]
        ProviderKind::Tpm(tpm_settings) => {
            let provider = tpm::TpmProvider::start(tpm_settings, store, limits)?;
            Ok(provider.map(|p| Box::new(p) as Box<dyn Provider + Send>))
        }
        // Config checking never yields a provider that is not built in.
        #[allow(unreachable_patterns)]
        other => Err(format!("{other:?} is not built into this binary")),
    }
}

/// How many waiting requests a provider's worker takes at once (each on a different key).
/// The software provider computes: a batch of requests shares its fsyncs (`Provider::flush`,
/// then the key store's group commit); with a second crypto thread it is also the most
/// requests it has in flight while reads stream in (`Running::takes_more_reads`). A device
/// serializes its commands anyway: one at a time, so that each request sees every change the
/// one before it made.
pub fn batch_limit(kind: &ProviderKind) -> usize {
    match kind {
        ProviderKind::MbedCrypto { .. } => 32,
        _ => 1,
    }
}

/// PSA generates key pairs only: asking to generate a public key is an invalid argument
/// (upstream Parsec's and Mbed TLS's answer), whatever the device could do.
#[cfg(any(feature = "tpm-provider", feature = "pkcs11-provider"))]
pub fn refuse_public_key_generation(
    attributes: &parsec_interface::operations::psa_key_attributes::Attributes,
) -> Result<(), OpError> {
    if attributes.key_type.is_public_key() {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("generating a public key ({:?})", attributes.key_type),
            "generate the key pair; its public key is exported from it",
        ));
    }
    Ok(())
}

/// The operations a configured provider serves, known before it is built (each provider's
/// capability table): requests are taken while it starts, and routed by this.
pub fn opcodes_of(kind: &ProviderKind) -> &'static [Opcode] {
    match kind {
        #[cfg(feature = "mbed-crypto-provider")]
        ProviderKind::MbedCrypto { .. } => mbed_crypto::capabilities::OPCODES,
        #[cfg(feature = "pkcs11-provider")]
        ProviderKind::Pkcs11(_) => pkcs11::capabilities::OPCODES,
        #[cfg(feature = "tpm-provider")]
        ProviderKind::Tpm(_) => tpm::capabilities::OPCODES,
        // Config checking never yields a provider that is not built in.
        #[allow(unreachable_patterns)]
        _ => &[],
    }
}

/// What ListProviders says of a configured provider, known before it is built.
pub fn info_of(kind: &ProviderKind) -> Option<ProviderInfo> {
    match kind {
        #[cfg(feature = "mbed-crypto-provider")]
        ProviderKind::MbedCrypto { .. } => Some(mbed_crypto::info()),
        #[cfg(feature = "pkcs11-provider")]
        ProviderKind::Pkcs11(_) => Some(pkcs11::info()),
        #[cfg(feature = "tpm-provider")]
        ProviderKind::Tpm(_) => Some(tpm::info()),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// The settings with every directory the provider writes moved out of upstream Parsec's key
/// store, when `layout` says the configured one holds it: the key store directory becomes
/// the overlay beside it, and a `storage_dir` inside it moves into the overlay too.
pub fn in_own_dirs(
    settings: &ProviderSettings,
    layout: &crate::key_store::upstream::Layout,
) -> ProviderSettings {
    let mut settings = settings.clone();
    if let Some(upstream) = &layout.upstream {
        if let ProviderKind::MbedCrypto { storage_dir, .. } = &mut settings.kind {
            if let Ok(inside) = storage_dir.strip_prefix(upstream) {
                *storage_dir = layout.own.join(inside);
            }
        }
        settings.key_store_dir = layout.own.clone();
    }
    settings
}

/// The wire id of a configured provider, known before it is built.
pub fn id_of(kind: &ProviderKind) -> ProviderId {
    match kind {
        ProviderKind::MbedCrypto { .. } => ProviderId::MbedCrypto,
        ProviderKind::Tpm(_) => ProviderId::Tpm,
        ProviderKind::Pkcs11(_) => ProviderId::Pkcs11,
    }
}

/// The key store as one application sees it through one provider, on the provider's worker
/// thread: a [`Snapshot`] of it, and the changes the operation makes.
pub struct AppKeys<'a> {
    snapshot: &'a mut Snapshot,
    app: &'a str,
}

/// One application's keys in one provider, copied out of the store for a worker thread, and
/// the changes the operation makes, applied to the store by the event loop when the worker
/// is done (only then is the client answered).
pub struct Snapshot {
    entries: std::collections::HashMap<String, KeyEntry>,
    mounted: std::collections::HashSet<String>,
    pub changes: Vec<Change>,
}

/// A change an operation made to its application's keys.
pub enum Change {
    Create(String, KeyEntry),
    /// The entry goes; with `then_destroy`, the event loop then asks the provider to destroy
    /// the material (`destroy_material`), once the entry's removal is durable.
    Remove {
        name: String,
        then_destroy: bool,
    },
}

impl Snapshot {
    /// Only the named keys of one application (a DeleteClient chunk: not all its keys).
    pub fn of_names(
        store: &KeyStore,
        app: &AppId,
        provider: ProviderId,
        names: &[String],
    ) -> Snapshot {
        let mut entries = std::collections::HashMap::new();
        let mut mounted = std::collections::HashSet::new();
        for name in names {
            let triple = KeyTriple::new(app, provider, name);
            if let Some(entry) = store.get(&triple) {
                if store.is_mounted(&triple) {
                    mounted.insert(name.clone());
                }
                entries.insert(name.clone(), entry.clone());
            }
        }
        Snapshot {
            entries,
            mounted,
            changes: Vec::new(),
        }
    }

    pub fn of(store: &KeyStore, app: &AppId, provider: ProviderId) -> Snapshot {
        let mut entries = std::collections::HashMap::new();
        let mut mounted = std::collections::HashSet::new();
        for (triple, entry) in store.keys_of(app) {
            if triple.provider == provider as u8 {
                if store.is_mounted(triple) {
                    mounted.insert(triple.name.clone());
                }
                entries.insert(triple.name.clone(), entry.clone());
            }
        }
        Snapshot {
            entries,
            mounted,
            changes: Vec::new(),
        }
    }
}

fn no_such_key(name: &str) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorDoesNotExist,
        format!("no key named \"{name}\""),
        "the application has no key of that name in this provider: see ListKeys",
    )
}

pub(crate) fn name_taken(name: &str) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorAlreadyExists,
        format!("a key named \"{name}\" exists already"),
        "destroy it first or choose another name",
    )
}

impl<'a> AppKeys<'a> {
    pub fn in_snapshot(snapshot: &'a mut Snapshot, app: &'a str) -> Self {
        AppKeys { snapshot, app }
    }

    pub fn app(&self) -> &str {
        self.app
    }

    /// The entry of an existing key.
    pub fn get(&self, name: &str) -> Result<&KeyEntry, OpError> {
        self.snapshot
            .entries
            .get(name)
            .ok_or_else(|| no_such_key(name))
    }

    /// Fails with PsaErrorAlreadyExists if the name is taken.
    pub fn ensure_free(&self, name: &str) -> Result<(), OpError> {
        if self.snapshot.entries.contains_key(name) {
            return Err(name_taken(name));
        }
        Ok(())
    }

    /// Whether the key was mapped from the config (a key that was on the device already).
    pub fn is_mounted(&self, name: &str) -> bool {
        self.snapshot.mounted.contains(name)
    }

    /// Records a new key; the event loop stores it before it answers, so the client is told
    /// it exists only once it is in the store.
    pub fn create(&mut self, name: &str, entry: KeyEntry) -> Result<(), OpError> {
        self.ensure_free(name)?;
        self.snapshot
            .entries
            .insert(name.to_string(), entry.clone());
        self.snapshot
            .changes
            .push(Change::Create(name.to_string(), entry));
        Ok(())
    }

    /// Forgets a key and returns its entry, so that the provider can destroy the material.
    pub fn remove(&mut self, name: &str) -> Result<KeyEntry, OpError> {
        self.take(name, false)
    }

    /// Forgets a key whose material the provider destroys only once the entry's removal is
    /// durable (`Provider::destroy_material`, called by the event loop then).
    pub fn remove_then_destroy(&mut self, name: &str) -> Result<KeyEntry, OpError> {
        self.take(name, true)
    }

    fn take(&mut self, name: &str, then_destroy: bool) -> Result<KeyEntry, OpError> {
        let entry = self
            .snapshot
            .entries
            .remove(name)
            .ok_or_else(|| no_such_key(name))?;
        self.snapshot.mounted.remove(name);
        self.snapshot.changes.push(Change::Remove {
            name: name.to_string(),
            then_destroy,
        });
        Ok(entry)
    }
}
