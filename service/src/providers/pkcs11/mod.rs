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
//! again without a restart (`providers::device`, shared with the TPM provider). The provider
//! runs on a worker thread of its own (`providers::worker`): a slow token (a YubiKey's ~1 s
//! RSA sign, an RSA-4096 generation) never holds the event loop.
//!
//! Files: `connection` (the open token), `templates` (CKA_ID scheme, attribute templates),
//! `mechanisms` (PSA algorithms as mechanisms), `capabilities` (CanDoCrypto), `export`
//! (keys and attributes read back), `existing` (keys that were on the token already), `ckr`
//! (CKR_* names and statuses), this file (the operations).

mod aead;
pub(crate) mod capabilities;
mod ckr;
mod connection;
mod existing;
mod export;
mod mechanisms;
mod module;
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

    /// C_Sign of a digest the caller has checked the key may sign (SignHash, SignMessage).
    fn sign_digest(
        &mut self,
        entry: &KeyEntry,
        alg: AsymmetricSignature,
        hash: &[u8],
    ) -> Result<Vec<u8>, OpError> {
        let (mechanism, data) = signature_mechanism(alg, hash)?;
        let conn = self.connection()?;
        let handle = conn.private(&entry.key_id)?;
        conn.session
            .sign(&mechanism, handle, &data)
            .map_err(|e| conn.fail("C_Sign", e))
    }

    /// C_Digest on the token (beyond upstream 1.5.0): HashCompute and HashCompare where the
    /// token offers the mechanism (CKR_MECHANISM_INVALID answers NotSupported).
    fn digest(&mut self, hash: Hash, input: &[u8]) -> Result<Vec<u8>, OpError> {
        // SHA-1 stays available for hashing (legacy protocols), as on the software provider.
        #[allow(deprecated)]
        let mechanism = match hash {
            Hash::Sha1 => Mechanism::Sha1,
            Hash::Sha224 => Mechanism::Sha224,
            Hash::Sha256 => Mechanism::Sha256,
            Hash::Sha384 => Mechanism::Sha384,
            Hash::Sha512 => Mechanism::Sha512,
            other => return Err(not_supported(format!("hashing with {other:?}"))),
        };
        let conn = self.connection()?;
        conn.session
            .digest(&mechanism, input)
            .map_err(|e| conn.fail("C_Digest", e))
    }

    /// Raw ECDH (beyond upstream 1.5.0): CKM_ECDH1_DERIVE with no KDF into a session secret
    /// of the field's size, read, then destroyed. The peer key is PSA's uncompressed point.
    fn ecdh(&mut self, entry: &KeyEntry, peer: &[u8]) -> Result<Vec<u8>, OpError> {
        use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
        let len = entry.attributes.bits.div_ceil(8);
        ecc::peer_point(entry.attributes.bits, peer)?;
        let conn = self.connection()?;
        let handle = conn.private(&entry.key_id)?;
        let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen((len as std::os::raw::c_ulong).into()),
        ];
        let secret = conn
            .session
            .derive_key(&mechanism, handle, &template)
            .map_err(|e| conn.fail("C_DeriveKey", e))?;
        let value = conn
            .session
            .get_attributes(secret, &[AttributeType::Value])
            .map_err(|e| conn.fail("C_GetAttributeValue", e));
        if let Err(e) = conn.session.destroy_object(secret) {
            log::warn!("pkcs11: cannot destroy the session object of a key agreement: {e} (it goes with the session)");
        }
        match value?.into_iter().next() {
            Some(Attribute::Value(bytes)) => Ok(bytes),
            _ => Err(OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                format!("{} gave no CKA_VALUE for the shared secret", conn.token),
                "the token derives but does not release the secret: see its documentation",
            )),
        }
    }

    /// C_Verify of a digest (VerifyHash, VerifyMessage).
    fn verify_digest(
        &mut self,
        entry: &KeyEntry,
        alg: AsymmetricSignature,
        hash: &[u8],
        signature: &[u8],
    ) -> Result<(), OpError> {
        let (mechanism, data) = signature_mechanism(alg, hash)?;
        let conn = self.connection()?;
        let handle = conn.public(&entry.key_id)?;
        conn.session
            .verify(&mechanism, handle, &data, signature)
            .map_err(|e| conn.fail("C_Verify", e))
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

    fn run_once(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        let allow_export = self.settings.allow_export;
        match op {
            NativeOperation::PsaGenerateKey(op) => {
                super::refuse_public_key_generation(&op.attributes)?;
                check(CheckType::Generate, op.attributes, allow_export)?;
                self.token_check(CheckType::Generate, &op.attributes)?;
                keys.ensure_free(&op.key_name)?;
                let key = new_key_ref(self.connection()?, keys.app(), &op.key_name)?;
                self.intend(&key)?;
                let conn = self.connection()?;
                if op.attributes.key_type == Type::Aes {
                    let template = secret_template(&key, &op.attributes, None);
                    let handle = conn
                        .session
                        .generate_key(&Mechanism::AesKeyGen, &template)
                        .map_err(|e| conn.fail("C_GenerateKey", e))?;
                    ensure_exportable(conn, &op.attributes, handle, &[handle])?;
                    crate::crash_point("pkcs11:after-objects");
                    record(conn, keys, &op.key_name, key, op.attributes, &[handle])?;
                    return Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}));
                }
                let (public, private) = templates(&key, &op.attributes)?;
                let mechanism = match op.attributes.key_type {
                    Type::RsaKeyPair => Mechanism::RsaPkcsKeyPairGen,
                    _ => Mechanism::EccKeyPairGen,
                };
                let (public_handle, private_handle) = conn
                    .session
                    .generate_key_pair(&mechanism, &public, &private)
                    .map_err(|e| conn.fail("C_GenerateKeyPair", e))
                    .map_err(|e| refused_export(conn, e, &mechanism, &key, &op.attributes))
                    .map_err(|e| name_refused_attribute(conn, e, &mechanism, &public, &private))?;
                let pair = [public_handle, private_handle];
                ensure_exportable(conn, &op.attributes, private_handle, &pair)?;
                crate::crash_point("pkcs11:after-objects");
                record(
                    conn,
                    keys,
                    &op.key_name,
                    key,
                    op.attributes,
                    &[public_handle, private_handle],
                )?;
                Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}))
            }
            NativeOperation::PsaImportKey(op) => {
                let attributes = import::sized(&op.attributes, op.data.expose_secret())?;
                let supported = capabilities::size_ok(CheckType::Import, attributes);
                import::supported_size(supported, &attributes, "the PKCS#11 provider")?;
                check(CheckType::Import, attributes, allow_export)?;
                self.token_check(CheckType::Import, &attributes)?;
                keys.ensure_free(&op.key_name)?;
                let key = new_key_ref(self.connection()?, keys.app(), &op.key_name)?;
                self.intend(&key)?;
                let conn = self.connection()?;
                let (attributes, objects) =
                    import_templates(&key, &attributes, op.data.expose_secret())?;
                let mut handles = Vec::new();
                for template in &objects {
                    match conn.session.create_object(template) {
                        Ok(handle) => handles.push(handle),
                        Err(e) => {
                            let err = conn.fail("C_CreateObject", e);
                            for handle in handles {
                                let _ = conn.session.destroy_object(handle);
                            }
                            return Err(err);
                        }
                    }
                }
                if let Some(first) = handles.first() {
                    ensure_exportable(conn, &attributes, *first, &handles)?;
                }
                record(conn, keys, &op.key_name, key, attributes, &handles)?;
                Ok(NativeResult::PsaImportKey(psa_import_key::Result {}))
            }
            NativeOperation::PsaExportPublicKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                if entry.attributes.key_type == Type::Aes {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorInvalidArgument,
                        format!("a {:?} key has no public key", entry.attributes.key_type),
                        "export a symmetric key with ExportKey (if it is exportable)",
                    ));
                }
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                let data = export_public(conn, handle, &entry.attributes)?;
                Ok(NativeResult::PsaExportPublicKey(
                    psa_export_public_key::Result { data: data.into() },
                ))
            }
            NativeOperation::PsaExportKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                // A public key needs no export flag (PSA; Mbed TLS and upstream Parsec).
                if !entry.attributes.key_type.is_public_key() {
                    entry.attributes.can_export().map_err(|e| {
                        OpError::new(
                            ResponseStatus::from(e),
                            "the key's policy has no export usage flag",
                            "only keys created with the export flag can be exported",
                        )
                    })?;
                }
                let conn = self.connection()?;
                let data = if entry.attributes.key_type.is_public_key() {
                    let handle = conn.public(&entry.key_id)?;
                    Zeroizing::new(export_public(conn, handle, &entry.attributes)?)
                } else {
                    let handle = conn.private(&entry.key_id)?;
                    export_private(conn, handle, &entry.attributes)?
                };
                Ok(NativeResult::PsaExportKey(psa_export_key::Result {
                    data: Secret::new(data.to_vec()),
                }))
            }
            NativeOperation::PsaDestroyKey(op) => {
                if keys.is_mounted(&op.key_name)
                    && !self
                        .existing(keys.app(), &op.key_name)
                        .is_some_and(|k| k.owned)
                {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorNotPermitted,
                        format!("\"{}\" is a key that was on the token before the service (an existing key mapping)", op.key_name),
                        "the service destroys such keys only if their [[provider.existing_keys]] entry says owned = true",
                    ));
                }
                // As the software provider: a destroy record, the entry's removal made
                // durable by the event loop, and only then are the token objects destroyed
                // (`destroy_material`). A crash in between never leaves a listed key whose
                // objects are gone; the record lets the next start finish the destroy.
                let entry = keys.get(&op.key_name)?.clone();
                self.record_destroy(&entry)?;
                crate::crash_point("pkcs11:destroy-after-record");
                keys.remove_then_destroy(&op.key_name)?;
                Ok(NativeResult::PsaDestroyKey(psa_destroy_key::Result {}))
            }
            NativeOperation::PsaSignHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let signature = self.sign_digest(&entry, op.alg, &op.hash)?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                self.verify_digest(&entry, op.alg, &op.hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
            }
            NativeOperation::PsaSignMessage(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let hash = super::message::digest(op.alg, &op.message)?;
                let signature = self.sign_digest(&entry, op.alg, &hash)?;
                Ok(NativeResult::PsaSignMessage(psa_sign_message::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyMessage(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let hash = super::message::digest(op.alg, &op.message)?;
                self.verify_digest(&entry, op.alg, &hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyMessage(
                    psa_verify_message::Result {},
                ))
            }
            NativeOperation::PsaAeadEncrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                self.limits.check_output(op.plaintext.len() + 16)?;
                let conn = self.connection()?;
                let ciphertext = aead::encrypt(
                    conn,
                    &entry,
                    op.alg,
                    &op.nonce,
                    &op.additional_data,
                    &op.plaintext,
                )?;
                Ok(NativeResult::PsaAeadEncrypt(psa_aead_encrypt::Result {
                    ciphertext: ciphertext.into(),
                }))
            }
            NativeOperation::PsaAeadDecrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let conn = self.connection()?;
                let plaintext = aead::decrypt(
                    conn,
                    &entry,
                    op.alg,
                    &op.nonce,
                    &op.additional_data,
                    &op.ciphertext,
                )?;
                Ok(NativeResult::PsaAeadDecrypt(psa_aead_decrypt::Result {
                    plaintext: plaintext.to_vec().into(),
                }))
            }
            NativeOperation::PsaHashCompute(op) => {
                self.limits.check_output(64)?;
                let hash = self.digest(op.alg, &op.input)?;
                Ok(NativeResult::PsaHashCompute(psa_hash_compute::Result {
                    hash: hash.into(),
                }))
            }
            NativeOperation::PsaHashCompare(op) => {
                let hash = self.digest(op.alg, &op.input)?;
                // Constant time: the comparison says nothing about where the hashes differ.
                let same = hash.len() == op.hash.len()
                    && hash
                        .iter()
                        .zip(op.hash.iter())
                        .fold(0u8, |d, (a, b)| d | (a ^ b))
                        == 0;
                if !same {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorInvalidSignature,
                        format!("the {:?} hash of the input is not the one given", op.alg),
                        "the input or the hash changed: compare what was hashed",
                    ));
                }
                Ok(NativeResult::PsaHashCompare(psa_hash_compare::Result {}))
            }
            NativeOperation::PsaRawKeyAgreement(op) => {
                let entry = keys.get(&op.private_key_name)?.clone();
                op.validate(entry.attributes)?;
                let shared_secret = self.ecdh(&entry, &op.peer_key)?;
                Ok(NativeResult::PsaRawKeyAgreement(
                    psa_raw_key_agreement::Result {
                        shared_secret: shared_secret.into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricEncrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let mechanism = encryption_mechanism(op.alg, salt)?;
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                let ciphertext = conn
                    .session
                    .encrypt(&mechanism, handle, &op.plaintext)
                    .map_err(|e| conn.fail("C_Encrypt", e))?;
                Ok(NativeResult::PsaAsymmetricEncrypt(
                    psa_asymmetric_encrypt::Result {
                        ciphertext: ciphertext.into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricDecrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let mechanism = encryption_mechanism(op.alg, salt)?;
                let conn = self.connection()?;
                let handle = conn.private(&entry.key_id)?;
                let plaintext = conn
                    .session
                    .decrypt(&mechanism, handle, &op.ciphertext)
                    .map_err(|e| {
                        let mut err = conn.fail("C_Decrypt", e);
                        // A padding that does not check: the input was at fault.
                        if conn.refused_ciphertext(&err, &[]) {
                            err.status = ResponseStatus::PsaErrorInvalidPadding;
                            err.cause.push_str("; the session is healthy, so this is the module's answer to a ciphertext that does not decrypt");
                            err.hint = "the ciphertext was not made with this key and algorithm";
                        }
                        err
                    })?;
                Ok(NativeResult::PsaAsymmetricDecrypt(
                    psa_asymmetric_decrypt::Result {
                        plaintext: plaintext.into(),
                    },
                ))
            }
            NativeOperation::PsaGenerateRandom(op) => {
                self.limits.check_output(op.size)?;
                let conn = self.connection()?;
                let mut out = Zeroizing::new(vec![0u8; op.size]);
                if op.size > 0 {
                    conn.session
                        .generate_random_slice(&mut out)
                        .map_err(|e| conn.fail("C_GenerateRandom", e))?;
                }
                Ok(NativeResult::PsaGenerateRandom(
                    psa_generate_random::Result { random_bytes: out },
                ))
            }
            NativeOperation::CanDoCrypto(op) => {
                super::can_do::common_rules(op.check_type, &op.attributes)?;
                check(op.check_type, op.attributes, allow_export)?;
                self.token_check(op.check_type, &op.attributes)?;
                Ok(NativeResult::CanDoCrypto(can_do_crypto::Result))
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} is not served by the PKCS#11 provider", other.opcode()),
                "see ListOpcodes for what this provider serves",
            )),
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

/// A fresh CKA_ID from the token's random number generator, and the key's label.
fn new_key_ref(conn: &mut Connection, app: &str, name: &str) -> Result<KeyRef, OpError> {
    let id = conn
        .session
        .generate_random_vec(ID_LEN as u32)
        .map_err(|e| conn.fail("C_GenerateRandom (key id)", e))?;
    Ok(KeyRef {
        id: Some(id),
        label: Some(service_label(app, name)),
    })
}

/// Records a new key in the store; destroys its objects if that fails.
fn record(
    conn: &mut Connection,
    keys: &mut AppKeys<'_>,
    name: &str,
    key: KeyRef,
    attributes: Attributes,
    handles: &[ObjectHandle],
) -> Result<(), OpError> {
    if let Err(e) = keys.create(
        name,
        KeyEntry {
            key_id: key.encode(),
            attributes,
        },
    ) {
        for handle in handles {
            let _ = conn.session.destroy_object(*handle);
        }
        return Err(e);
    }
    Ok(())
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
