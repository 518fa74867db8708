//! The PKCS#11 provider: keys on an HSM, smart card or secure element, through a PKCS#11
//! module loaded at run time (`cryptoki`).
//!
//! Keys the service creates are token objects: a private key and a public key sharing a
//! random 16-byte CKA_ID (the label is the key's name). The key store maps (application,
//! name) to that CKA_ID. Keys that were on the token before the service — provisioned at the
//! factory, or a YubiKey's PIV slots — are made visible by `[[provider.existing_keys]]`
//! entries (label and/or CKA_ID, application, name): they are mounted into the key store at
//! start-up (in memory only) and can be listed, used and have their public key exported;
//! they are destroyed only if the config says `owned = true`.
//!
//! One session, logged in as the user. Object handles are cached per key. When the token
//! goes away (CKR_TOKEN_NOT_PRESENT, CKR_DEVICE_REMOVED, a closed session...) the request
//! fails with CommunicationFailure and the next one opens the module again, finds the token
//! by the same selector, logs in and retries once, so a token pulled out and put back works
//! again without a restart (`providers::device`, shared with the TPM provider). A failure a
//! new session cures (a module out of object space, a dropped login, an operation a module
//! left active) gets a new logged-in session and one more try. The provider runs on a worker
//! thread of its own (`providers::worker`): a slow token (a YubiKey's ~1 s RSA sign, an
//! RSA-4096 generation) never holds the event loop.
//!
//! Files: `module` (C_Initialize, with a module's parameters; the token picked), `connection`
//! (the open token, its session), `templates` (CKA_ID scheme, attribute templates, why a
//! module refuses one), `mechanisms` (PSA algorithms as mechanisms), `capabilities` (what
//! the provider and the token can do: CanDoCrypto, ListOpcodes), `operations` (one request
//! on the token), `export` (keys and attributes read back), `existing` (keys that were on
//! the token already), `ckr` (CKR_* names and statuses), this file (start-up, retries, the
//! provider's lifecycle).

mod aead;
pub(crate) mod capabilities;
mod ckr;
mod connection;
mod existing;
mod export;
mod mechanisms;
mod module;
mod operations;
mod templates;

use capabilities::*;
use connection::*;
use existing::*;
use export::*;
use mechanisms::*;
use templates::*;

use super::device::{Device, Link};
use super::journal::{Journal, Kind};
use super::{der, ecc, import, AppKeys, Limits, Provider};
use crate::config::{ExistingKey, Pkcs11Settings, TokenSelector};
use crate::error::OpError;
use crate::key_store::{AppId, KeyEntry, KeyStore, KeyTriple};
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash, KeyAgreement, RawKeyAgreement,
    SignHash,
};
use parsec_interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_interface::operations::{
    can_do_crypto, psa_aead_decrypt, psa_aead_encrypt, psa_asymmetric_decrypt,
    psa_asymmetric_encrypt, psa_destroy_key, psa_export_key, psa_export_public_key,
    psa_generate_key, psa_generate_random, psa_hash_compare, psa_hash_compute, psa_import_key,
    psa_raw_key_agreement, psa_sign_hash, psa_sign_message, psa_verify_hash, psa_verify_message,
    NativeOperation, NativeResult,
};
use parsec_interface::requests::{AuthType, Opcode, ProviderId, ResponseStatus};
use parsec_interface::secrecy::{ExposeSecret, Secret};
use std::collections::HashMap;
use zeroize::Zeroizing;

const UUID: &str = "30e39502-eba6-4d60-a4af-c518b7f5e38f";
const ID_LEN: usize = 16;

pub struct Pkcs11Provider {
    settings: Pkcs11Settings,
    conn: Device<Connection>,
    limits: Limits,
    /// Set when the token refused the PIN on a reconnect: it is not tried again (each try
    /// costs a count of the token's lockout counter) until a reload gives a new provider.
    pin_refused: Option<String>,
    /// What the token has the mechanisms for, read at start (ListOpcodes).
    opcodes: Option<Vec<Opcode>>,
    /// Create records: made durable before a key's objects are; removed once the key's entry
    /// is durable (`committed`), or resolved at the next start after a crash.
    journal: Journal,
}

impl Pkcs11Provider {
    pub fn start(
        settings: &Pkcs11Settings,
        key_store_dir: &std::path::Path,
        auth: AuthType,
        store: &mut KeyStore,
        limits: Limits,
    ) -> Result<Pkcs11Provider, String> {
        // Modules say why on stderr: kept for the failed request's log line.
        if let Err(e) = crate::module_output::start() {
            log::warn!("pkcs11: the module's stderr is not captured ({e}): its messages stay on stderr only");
        }
        let mut conn = Connection::open(settings)?;
        let stored = store.keys_in(ProviderId::Pkcs11).count();
        for existing in &settings.existing_keys {
            mount(&mut conn, store, existing, auth)?;
        }
        let journal = Journal::open(key_store_dir, "pkcs11-journal").map_err(|e| {
            format!(
                "cannot open the journal in {}: {e}",
                key_store_dir.display()
            )
        })?;
        let damaged = store.damaged_in(ProviderId::Pkcs11);
        resolve_journal(&mut conn, store, &journal, damaged);
        report_unnamed(&mut conn, store, damaged);
        log::info!(
            "pkcs11: using {} through {}, {stored} keys in the store, {} existing keys mapped",
            conn.token,
            settings.library_path.display(),
            settings.existing_keys.len()
        );
        if settings.software_public_operations {
            log::warn!("pkcs11: software_public_operations = true is accepted for upstream configs, but this service verifies and encrypts on the token too");
        }
        let opcodes = conn.caps.opcodes();
        if let Some(served) = &opcodes {
            let left: Vec<String> = OPCODES
                .iter()
                .filter(|o| !served.contains(o))
                .map(|o| format!("{o:?}"))
                .collect();
            if !left.is_empty() {
                log::info!(
                    "pkcs11: {} lists no mechanism for {}: not served (ListOpcodes leaves them out)",
                    conn.token,
                    left.join(", ")
                );
            }
        }
        Ok(Pkcs11Provider {
            opcodes,
            settings: settings.clone(),
            conn: Device::new(
                format!("pkcs11: the token of {}", settings.library_path.display()),
                Some(conn),
            ),
            limits,
            pin_refused: None,
            journal,
        })
    }

    /// Makes a create record for a key's objects durable before they exist: a crash before
    /// the key's entry is stored then lets the next start destroy them (`resolve_journal`).
    /// The record stays until the event loop has stored the entry (`committed`).
    fn intend(&self, key: &KeyRef) -> Result<(), OpError> {
        let id = key.id.as_deref().unwrap_or_default();
        let record = self.journal.begin(Kind::Create, &hex(id))?;
        self.journal.leave(record);
        Ok(())
    }

    /// The connection, reopened if the token went away. A PIN the token refused is never
    /// tried again by itself.
    fn connection(&mut self) -> Result<&mut Connection, OpError> {
        if let Some(refused) = &self.pin_refused {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotPermitted,
                format!("{refused} (not tried again: each wrong try counts towards the token's lockout)"),
                "correct user_pin in the config and reload (SIGHUP)",
            ));
        }
        let settings = &self.settings;
        let refused = &mut self.pin_refused;
        self.conn.get(|| {
            let conn = Connection::open(settings).map_err(|e| {
                if e.contains("CKR_PIN_INCORRECT") || e.contains("CKR_PIN_LOCKED") {
                    *refused = Some(e.clone());
                    return OpError::new(
                        ResponseStatus::PsaErrorNotPermitted,
                        e,
                        "the token refused user_pin: correct it and reload (SIGHUP); it is not tried again before",
                    );
                }
                OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    e,
                    "the token is not there: insert it (the service finds it again by itself)",
                )
            })?;
            log::info!("pkcs11: {} is back", conn.token);
            Ok(conn)
        })
    }

    /// The token's own answer to what this provider's table allows (key sizes, curves,
    /// mechanisms it lists); nothing more to say while it is away.
    fn token_check(
        &mut self,
        check_type: CheckType,
        attributes: &Attributes,
    ) -> Result<(), OpError> {
        match self.conn.open_now() {
            Some(conn) => conn.caps.check(check_type, attributes),
            None => Ok(()),
        }
    }

    fn existing(&self, app: &str, name: &str) -> Option<&ExistingKey> {
        self.settings
            .existing_keys
            .iter()
            .find(|k| k.application == app && k.name == name)
    }

    /// Runs an operation; if the token turns out to be gone, reopens it and runs it once
    /// more. A failure that a new session cures (a module out of object space, a login the
    /// token dropped) gets a new logged-in session and one more try, without reloading the
    /// module.
    fn run(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        let mark = crate::module_output::mark();
        self.run_cured(op, keys).map_err(|mut err| {
            // What the module printed while it failed (its reason, often: tpm2-pkcs11's
            // "Cannot mark object both extractable AND sensitive" comes with a bare
            // CKR_ATTRIBUTE_VALUE_INVALID), for a failure that came from the module.
            if err.cause.contains("CKR_") {
                let lines = crate::module_output::since(mark, 3);
                if !lines.is_empty() {
                    err.cause.push_str(&format!(
                        "; stderr meanwhile (the module's, or another library's): {}",
                        lines.join(" | ")
                    ));
                }
            }
            err
        })
    }

    fn run_cured(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        let result = super::device::retry_once(
            self,
            |p| p.conn.is_broken(),
            |p| p.conn.name().to_string(),
            |p| p.run_once(op, keys),
        );
        let Err(err) = &result else {
            return result;
        };
        if !session_may_cure(err) || self.conn.is_broken() {
            return result;
        }
        let Some(conn) = self.conn.open_now() else {
            return result;
        };
        if err.cause.contains("CKR_USER_NOT_LOGGED_IN") && !conn.logged_in {
            return result;
        }
        log::warn!(
            "pkcs11: {}; opening a new session on {} (logged in again) and trying once more",
            err.cause,
            conn.token
        );
        if let Err(e) = conn.renew_session(&self.settings) {
            log::error!("pkcs11: {e}");
            return result;
        }
        match self.run_once(op, keys) {
            Ok(done) => {
                log::info!("pkcs11: the new session cured it");
                Ok(done)
            }
            Err(again) => Err(again),
        }
    }
}

/// Whether a failure may be the session's state rather than the request: the module ran
/// out of room for loaded objects (tpm2-pkcs11 on a TPM with three object slots answers
/// CKR_GENERAL_ERROR, others CKR_DEVICE_MEMORY or CKR_HOST_MEMORY), or the token dropped the
/// session's login, or an operation a module left active after it failed (tpm2-pkcs11
/// keeps a C_Decrypt that failed active, and the session's next C_SignInit answers
/// CKR_OPERATION_ACTIVE). A ciphertext that does not decrypt (CKR_GENERAL_ERROR too, on
/// SoftHSM2) is already told apart (InvalidPadding).
fn session_may_cure(err: &OpError) -> bool {
    err.status != ResponseStatus::PsaErrorInvalidPadding
        && [
            "CKR_GENERAL_ERROR",
            "CKR_DEVICE_MEMORY",
            "CKR_HOST_MEMORY",
            "CKR_USER_NOT_LOGGED_IN",
            "CKR_OPERATION_ACTIVE",
        ]
        .iter()
        .any(|ckr| err.cause.contains(ckr))
}

impl Provider for Pkcs11Provider {
    fn id(&self) -> ProviderId {
        ProviderId::Pkcs11
    }

    fn execute(
        &mut self,
        op: NativeOperation,
        mut keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        self.run(&op, &mut keys)
    }

    fn opcodes(&self) -> Option<Vec<Opcode>> {
        self.opcodes.clone()
    }

    fn committed(&mut self, entry: &KeyEntry) {
        if let Some(id) = KeyRef::decode(&entry.key_id).ok().and_then(|k| k.id) {
            self.journal
                .done(self.journal.found(Kind::Create, &hex(&id)));
        }
    }

    fn before_forget(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        self.record_destroy(entry)
    }

    fn flush(&mut self) -> Result<(), OpError> {
        self.journal
            .sync()
            .map_err(|e| OpError::storage("syncing the PKCS#11 provider's journal", &e))
    }

    fn destroy_material(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        let key = KeyRef::decode(&entry.key_id)?;
        if let Some(existing) = self
            .settings
            .existing_keys
            .iter()
            .find(|k| k.id == key.id && k.label == key.label)
        {
            if !existing.owned {
                log::info!(
                    "pkcs11: existing key \"{}\" of \"{}\" left on the token (not owned)",
                    existing.name,
                    existing.application
                );
                return Ok(());
            }
        }
        let conn = self.connection()?;
        let objects = conn.objects(&entry.key_id)?;
        conn.objects.remove(&entry.key_id);
        for (i, handle) in [objects.private, objects.public]
            .into_iter()
            .flatten()
            .enumerate()
        {
            if i == 1 {
                crate::crash_point("pkcs11:destroy-between-objects");
            }
            conn.session.destroy_object(handle).map_err(|e| {
                let mut error = conn.fail("C_DestroyObject", e);
                error.hint = "the key is gone from the service (its entry is removed) and its destroy record kept: the next start destroys its token objects again";
                error
            })?;
        }
        if let Some(id) = &key.id {
            self.journal
                .done(self.journal.found(Kind::Destroy, &hex(id)));
        }
        Ok(())
    }
}

impl Pkcs11Provider {
    /// Records, before a key's entry goes, that its token objects are to be destroyed (made
    /// durable by `flush`, before the entry's removal is): a key the service made, or an
    /// existing key its mapping says the service owns. A key found by label alone is
    /// destroyed without a record (nothing would find it again).
    fn record_destroy(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        let key = KeyRef::decode(&entry.key_id)?;
        let not_owned = self
            .settings
            .existing_keys
            .iter()
            .any(|k| k.id == key.id && k.label == key.label && !k.owned);
        if let (Some(id), false) = (&key.id, not_owned) {
            // Found again by its name when the objects are gone (`destroy_material`).
            let _record = self.journal.begin_unsynced(Kind::Destroy, &hex(id))?;
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What ListProviders says of this provider (the same for every instance).
pub(crate) fn info() -> ProviderInfo {
    ProviderInfo {
        uuid: uuid::Uuid::parse_str(UUID).expect("constant UUID"),
        description: "PKCS #11 provider, interfacing with a PKCS #11 library".into(),
        vendor: "OASIS Standard".into(),
        version_maj: 0,
        version_min: 1,
        version_rev: 0,
        id: ProviderId::Pkcs11,
    }
}
