//! The TPM 2.0 provider: keys live in the TPM, through `tss-esapi` (tpm2-tss's ESAPI).
//!
//! A TPM stores almost nothing itself. At start-up (and after losing the TPM) the provider
//! re-creates one primary key in the owner hierarchy, an ECC P-256 storage key from a fixed
//! template: the TPM derives it from its owner seed, so it is the same key every time until
//! the owner hierarchy is cleared. Every client key is created (or imported) under it, and
//! the TPM hands back the key's public area and its private area encrypted ("wrapped") with
//! the primary key. The key store keeps that blob; to use a key the provider loads the blob
//! into the TPM. So keys survive restarts of the service and resets of the TPM, and the key
//! store holds nothing usable without this very TPM.
//!
//! Commands are authorised through one salted HMAC session (salted with the primary key),
//! which also encrypts the first parameter of commands and responses on the way to the TPM.
//! The one key used last stays loaded, so repeated operations with a key cost one TPM
//! command each.
//!
//! TPM commands are synchronous, and an RSA key generation can take seconds on a discrete
//! TPM: the provider runs on a worker thread of its own (`providers::worker`), never on the
//! event loop, so other clients are answered meanwhile. If the TPM connection breaks (a
//! simulator restarted, a resource manager gone), the request reconnects once and retries
//! (`providers::device`, shared with the PKCS#11 provider).
//!
//! Files: `connection` (the open TPM: context, primary key, session, loaded key, EK;
//! decoded failures), `blob` (the key store's bytes for a key), `keys` (templates and
//! conversions), `capabilities` (CanDoCrypto), `attestation` (ActivateCredential), this file
//! (the operations).

mod attestation;
mod blob;
pub(crate) mod capabilities;
mod connection;
mod keys;
pub mod response_code;
mod upstream;

use blob::*;
use capabilities::*;
use connection::*;

use super::device::{Device, Link};
use super::{import, AppKeys, Limits, Provider};
use crate::config::TpmSettings;
use crate::error::OpError;
use crate::key_store::{KeyEntry, KeyStore};
use keys::Origin;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::psa_algorithm::AsymmetricSignature;
use parsec_interface::operations::psa_key_attributes::{Attributes, Type};
use parsec_interface::operations::{
    can_do_crypto, psa_asymmetric_decrypt, psa_asymmetric_encrypt, psa_destroy_key,
    psa_export_public_key, psa_generate_key, psa_generate_random, psa_import_key,
    psa_raw_key_agreement, psa_sign_hash, psa_sign_message, psa_verify_hash, psa_verify_message,
    NativeOperation, NativeResult,
};
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use parsec_interface::secrecy::ExposeSecret;
use std::str::FromStr;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::{SessionType, StartupType};
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Auth, Data, Digest, EccParameter, EccPoint, EccScheme, EncryptedSecret, HashcheckTicket,
    KeyDerivationFunctionScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyRsa, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;
use zeroize::Zeroizing;

const UUID: &str = "1e4954a4-ff21-46d3-ab0c-661eeb667e1d";
/// Most bytes TPM2_GetRandom returns per call (the size of the TPM's largest digest).
const RANDOM_CHUNK: usize = 32;

pub struct TpmProvider {
    settings: TpmSettings,
    tcti: TctiNameConf,
    conn: Device<Connection>,
    limits: Limits,
}

/// tpm2-tss logs its own view of every failure to stderr; the provider logs each one
/// decoded, with the client and a hint. Keeps the library quiet unless asked for. Called
/// once at start-up, before any other thread runs: the environment is not changed later.
pub fn quiet_tss_logs() {
    if std::env::var_os("TSS2_LOG").is_none() {
        let level = if log::max_level() >= log::LevelFilter::Debug {
            "all+warning"
        } else {
            "all+none"
        };
        std::env::set_var("TSS2_LOG", level);
    }
}

impl TpmProvider {
    /// Connects to the TPM. `None`: there is none, and `skip_if_no_tpm` says to go on
    /// without this provider.
    pub fn start(
        settings: &TpmSettings,
        store: &KeyStore,
        limits: Limits,
    ) -> Result<Option<TpmProvider>, String> {
        let tcti = TctiNameConf::from_str(&settings.tcti).map_err(|e| {
            format!(
                "tcti \"{}\" is not a TCTI this TSS knows: {e}",
                settings.tcti
            )
        })?;
        let conn = match Connection::open(settings, &tcti) {
            Ok(conn) => conn,
            Err(e) if settings.skip_if_no_tpm => {
                log::warn!(
                    "tpm: {e}; skip_if_no_tpm is set, so the service runs without the TPM provider"
                );
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let keys = store.keys_in(ProviderId::Tpm).count();
        log::info!(
            "tpm: connected through \"{}\", {keys} keys in the store",
            settings.tcti
        );
        Ok(Some(TpmProvider {
            settings: settings.clone(),
            tcti,
            conn: Device::new(
                format!("tpm: the TPM through \"{}\"", settings.tcti),
                Some(conn),
            ),
            limits,
        }))
    }

    /// The connection, reopened if it was lost.
    fn connection(&mut self) -> Result<&mut Connection, OpError> {
        let (settings, tcti) = (&self.settings, &self.tcti);
        self.conn.get(|| {
            Connection::open(settings, tcti).map_err(|e| {
                OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    e,
                    "the TPM cannot be reached: check the tcti setting, the device or the simulator",
                )
            })
        })
    }

    fn blob_of<'k>(keys: &'k AppKeys<'_>, name: &str) -> Result<(&'k [u8], Attributes), OpError> {
        let entry = keys.get(name)?;
        Ok((entry.key_id.as_slice(), entry.attributes))
    }

    /// TPM2_Sign of a digest the caller has checked the key may sign (SignHash, SignMessage).
    fn sign_digest(
        &mut self,
        keys: &AppKeys<'_>,
        name: &str,
        alg: AsymmetricSignature,
        hash: Vec<u8>,
    ) -> Result<Vec<u8>, OpError> {
        let (blob, attributes) = Self::blob_of(keys, name)?;
        let scheme = keys::signature_scheme(alg)?;
        let digest = Digest::try_from(hash).map_err(|e| keys::tss_wrapper("the hash", e))?;
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .map_err(|e| keys::tss_wrapper("the hash check ticket", e))?;
        let blob = blob.to_vec();
        let conn = self.connection()?;
        let (handle, field_len) = conn.load(&blob, &attributes)?;
        let signature = conn.call("TPM2_Sign", |ctx| {
            ctx.sign(handle, digest, scheme, validation)
        })?;
        keys::signature_bytes(signature, field_len)
    }

    /// TPM2_VerifySignature of a digest (VerifyHash, VerifyMessage).
    fn verify_digest(
        &mut self,
        keys: &AppKeys<'_>,
        name: &str,
        alg: AsymmetricSignature,
        hash: Vec<u8>,
        signature: &[u8],
    ) -> Result<(), OpError> {
        let (blob, attributes) = Self::blob_of(keys, name)?;
        let digest = Digest::try_from(hash).map_err(|e| keys::tss_wrapper("the hash", e))?;
        let blob = blob.to_vec();
        let conn = self.connection()?;
        let (handle, field_len) = conn.load(&blob, &attributes)?;
        let signature = keys::signature_from(alg, signature, field_len)?;
        conn.call("TPM2_VerifySignature", |ctx| {
            ctx.verify_signature(handle, digest, signature)
        })?;
        Ok(())
    }

    /// Runs an operation; if the TPM connection turns out to be gone, reconnects and runs it
    /// once more.
    fn run(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        super::device::retry_once(
            self,
            |p| p.conn.is_broken(),
            |p| p.conn.name().to_string(),
            |p| p.run_once(op, keys),
        )
    }

    fn run_once(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        match op {
            NativeOperation::PsaGenerateKey(op) => {
                super::refuse_public_key_generation(&op.attributes)?;
                check(CheckType::Generate, op.attributes)?;
                keys.ensure_free(&op.key_name)?;
                let template =
                    keys::template(&op.attributes, Origin::Generated, keys::Unique::None)?;
                let conn = self.connection()?;
                let primary = conn.primary;
                let created = conn.call("TPM2_Create", |ctx| {
                    ctx.create(primary, template, None, None, None, None)
                })?;
                let blob = Blob::encode(&created.out_public, Some(&created.out_private))?;
                keys.create(
                    &op.key_name,
                    KeyEntry {
                        key_id: blob,
                        attributes: op.attributes,
                    },
                )?;
                Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}))
            }
            NativeOperation::PsaImportKey(op) => {
                let attributes = import::sized(&op.attributes, op.data.expose_secret())?;
                let supported = capabilities::size_ok(CheckType::Import, attributes);
                import::supported_size(supported, &attributes, "the TPM provider")?;
                check(CheckType::Import, attributes)?;
                keys.ensure_free(&op.key_name)?;
                let imported = keys::import(&attributes, op.data.expose_secret())?;
                let mut attributes = attributes;
                attributes.bits = match &imported.public {
                    Public::Rsa { unique, .. } => unique.value().len() * 8,
                    _ => attributes.bits,
                };
                let blob = match imported.sensitive {
                    None => Blob::encode(&imported.public, None)?,
                    Some(sensitive) => {
                        let conn = self.connection()?;
                        let primary = conn.primary;
                        let public = imported.public.clone();
                        // An unwrapped duplicate: the TPM2B_SENSITIVE itself, no inner or
                        // outer wrapper (TPM 2.0 Part 1, 23.3.2.3), which the TPM then
                        // wraps with the primary key.
                        let marshalled =
                            Zeroizing::new(sensitive.marshall().map_err(|e| {
                                keys::tss_wrapper("marshalling the private key", e)
                            })?);
                        let mut duplicate =
                            Zeroizing::new(Vec::with_capacity(marshalled.len() + 2));
                        duplicate.extend_from_slice(&(marshalled.len() as u16).to_be_bytes());
                        duplicate.extend_from_slice(&marshalled);
                        let duplicate = Private::try_from(duplicate.to_vec())
                            .map_err(|e| keys::tss_wrapper("the private key", e))?;
                        let private = conn.call("TPM2_Import", |ctx| {
                            ctx.import(
                                primary.into(),
                                None,
                                public,
                                duplicate,
                                EncryptedSecret::default(),
                                SymmetricDefinitionObject::Null,
                            )
                        })?;
                        Blob::encode(&imported.public, Some(&private))?
                    }
                };
                keys.create(
                    &op.key_name,
                    KeyEntry {
                        key_id: blob,
                        attributes,
                    },
                )?;
                Ok(NativeResult::PsaImportKey(psa_import_key::Result {}))
            }
            NativeOperation::PsaExportPublicKey(op) => {
                let (blob, attributes) = Self::blob_of(keys, &op.key_name)?;
                let data = keys::export_public(&Blob::decode(blob, &attributes)?.public)?;
                Ok(NativeResult::PsaExportPublicKey(
                    psa_export_public_key::Result { data: data.into() },
                ))
            }
            NativeOperation::PsaDestroyKey(op) => {
                let entry = keys.remove(&op.key_name)?;
                self.forget_loaded(&entry);
                Ok(NativeResult::PsaDestroyKey(psa_destroy_key::Result {}))
            }
            NativeOperation::PsaSignHash(op) => {
                let (_, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let signature = self.sign_digest(keys, &op.key_name, op.alg, op.hash.to_vec())?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let (_, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let hash = op.hash.to_vec();
                self.verify_digest(keys, &op.key_name, op.alg, hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
            }
            NativeOperation::PsaSignMessage(op) => {
                let (_, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let hash = super::message::digest(op.alg, &op.message)?;
                let signature = self.sign_digest(keys, &op.key_name, op.alg, hash)?;
                Ok(NativeResult::PsaSignMessage(psa_sign_message::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyMessage(op) => {
                let (_, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let hash = super::message::digest(op.alg, &op.message)?;
                self.verify_digest(keys, &op.key_name, op.alg, hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyMessage(
                    psa_verify_message::Result {},
                ))
            }
            NativeOperation::PsaRawKeyAgreement(op) => {
                let (blob, attributes) = Self::blob_of(keys, &op.private_key_name)?;
                op.validate(attributes)?;
                let len = attributes.bits.div_ceil(8);
                let (x, y) = super::ecc::peer_point(attributes.bits, &op.peer_key)?;
                let point = EccPoint::new(
                    EccParameter::try_from(x.to_vec())
                        .map_err(|e| keys::tss_wrapper("the peer key's x", e))?,
                    EccParameter::try_from(y.to_vec())
                        .map_err(|e| keys::tss_wrapper("the peer key's y", e))?,
                );
                let blob = blob.to_vec();
                let conn = self.connection()?;
                let (handle, _) = conn.load(&blob, &attributes)?;
                let z = conn.call("TPM2_ECDH_ZGen", |ctx| ctx.ecdh_z_gen(handle, point))?;
                // The shared secret is the x coordinate of Z, at the field's full length.
                let x = z.x().value();
                let mut shared_secret = Zeroizing::new(vec![0u8; len.saturating_sub(x.len())]);
                shared_secret.extend_from_slice(x);
                Ok(NativeResult::PsaRawKeyAgreement(
                    psa_raw_key_agreement::Result {
                        shared_secret: shared_secret.to_vec().into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricEncrypt(op) => {
                let (blob, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let scheme = keys::decryption_scheme(op.alg)?;
                let label = oaep_label(op.salt.as_deref().map(|s| s.as_slice()))?;
                let message = PublicKeyRsa::try_from(op.plaintext.to_vec())
                    .map_err(|e| keys::tss_wrapper("the plaintext", e))?;
                let blob = blob.to_vec();
                let conn = self.connection()?;
                let (handle, _) = conn.load(&blob, &attributes)?;
                let ciphertext = conn.call("TPM2_RSA_Encrypt", |ctx| {
                    ctx.rsa_encrypt(handle, message, scheme, label)
                })?;
                Ok(NativeResult::PsaAsymmetricEncrypt(
                    psa_asymmetric_encrypt::Result {
                        ciphertext: ciphertext.value().to_vec().into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricDecrypt(op) => {
                let (blob, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let scheme = keys::decryption_scheme(op.alg)?;
                let label = oaep_label(op.salt.as_deref().map(|s| s.as_slice()))?;
                let ciphertext = PublicKeyRsa::try_from(op.ciphertext.to_vec())
                    .map_err(|e| keys::tss_wrapper("the ciphertext", e))?;
                let blob = blob.to_vec();
                let conn = self.connection()?;
                let (handle, _) = conn.load(&blob, &attributes)?;
                let plaintext = conn
                    .call("TPM2_RSA_Decrypt", |ctx| {
                        ctx.rsa_decrypt(handle, ciphertext, scheme, label)
                    })
                    .map_err(|e| {
                        bad_input_failure(
                            conn,
                            e,
                            ResponseStatus::PsaErrorInvalidPadding,
                            "the ciphertext was not made with this key and algorithm",
                        )
                    })?;
                Ok(NativeResult::PsaAsymmetricDecrypt(
                    psa_asymmetric_decrypt::Result {
                        plaintext: plaintext.value().to_vec().into(),
                    },
                ))
            }
            NativeOperation::PsaGenerateRandom(op) => {
                self.limits.check_output(op.size)?;
                let conn = self.connection()?;
                let mut out = Zeroizing::new(Vec::with_capacity(op.size));
                while out.len() < op.size {
                    let want = (op.size - out.len()).min(RANDOM_CHUNK);
                    let bytes = conn.call("TPM2_GetRandom", |ctx| ctx.get_random(want))?;
                    if bytes.value().is_empty() {
                        return Err(OpError::new(
                            ResponseStatus::PsaErrorInsufficientEntropy,
                            "TPM2_GetRandom returned no bytes",
                            "the TPM's random number generator is not answering",
                        ));
                    }
                    out.extend_from_slice(bytes.value());
                }
                out.truncate(op.size);
                Ok(NativeResult::PsaGenerateRandom(
                    psa_generate_random::Result { random_bytes: out },
                ))
            }
            NativeOperation::CanDoCrypto(op) => {
                super::can_do::common_rules(op.check_type, &op.attributes)?;
                check(op.check_type, op.attributes)?;
                Ok(NativeResult::CanDoCrypto(can_do_crypto::Result))
            }
            NativeOperation::PrepareKeyAttestation(op) => {
                let settings = self.settings.clone();
                let conn = self.connection()?;
                attestation::prepare(conn, &settings, keys, op)
            }
            NativeOperation::AttestKey(op) => {
                let settings = self.settings.clone();
                let conn = self.connection()?;
                attestation::attest(conn, &settings, keys, op)
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} is not served by the TPM provider", other.opcode()),
                "see ListOpcodes for what this provider serves",
            )),
        }
    }

    /// A key that is destroyed must not stay loaded.
    fn forget_loaded(&mut self, entry: &KeyEntry) {
        if let Some(conn) = self.conn.open_now() {
            if conn
                .loaded
                .as_ref()
                .is_some_and(|loaded| loaded.blob == entry.key_id)
            {
                conn.unload();
            }
        }
    }
}

/// PSA's OAEP "salt" is the label. The TPM hashes its label with the terminating zero byte
/// (TPM 2.0 Part 1, B.4) and refuses a label that does not end with one, so a label is
/// only accepted when the client already ends it with a zero byte.
fn oaep_label(salt: Option<&[u8]>) -> Result<Data, OpError> {
    match salt {
        None | Some([]) => Ok(Data::default()),
        Some(label) if label.last() == Some(&0) => {
            Data::try_from(label.to_vec()).map_err(|e| keys::tss_wrapper("the OAEP label", e))
        }
        Some(_) => Err(OpError::new(
            ResponseStatus::PsaErrorNotSupported,
            "an OAEP label that does not end with a zero byte",
            "a TPM includes the label's terminating zero byte in the OAEP hash: end the label (salt) with 0x00, or use no label",
        )),
    }
}

/// libtpms answers some malformed inputs (a bad RSA ciphertext, a bad credential secret) with
/// TPM_RC_FAILURE, the code for a TPM in failure mode. When the TPM reports itself healthy
/// right after, the input was at fault: give the client the status for that.
fn bad_input_failure(
    conn: &mut Connection,
    mut err: OpError,
    status: ResponseStatus,
    hint: &'static str,
) -> OpError {
    if err.cause.contains("TPM_RC_FAILURE") && conn.healthy() {
        err.status = status;
        err.cause.push_str(
            "; the TPM's self-test result is fine, so this is its answer to a malformed input",
        );
        err.hint = hint;
    } else if err.status == ResponseStatus::PsaErrorInvalidArgument
        || err.status == ResponseStatus::PsaErrorGenericError && err.cause.contains("NO_RESULT")
    {
        err.status = status;
        err.hint = hint;
    }
    err
}

impl Provider for TpmProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Tpm
    }

    fn execute(
        &mut self,
        op: NativeOperation,
        mut keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        self.run(&op, &mut keys)
    }

    fn destroy_material(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        // The TPM holds nothing of a key but while it is loaded: the blob was the key.
        self.forget_loaded(entry);
        Ok(())
    }
}

/// What ListProviders says of this provider (the same for every instance).
pub(crate) fn info() -> ProviderInfo {
    ProviderInfo {
        uuid: uuid::Uuid::parse_str(UUID).expect("constant UUID"),
        description: "TPM 2.0 provider: keys wrapped by the TPM, through tpm2-tss ESAPI".into(),
        vendor: "Trusted Computing Group (TCG)".into(),
        version_maj: 0,
        version_min: 1,
        version_rev: 0,
        id: ProviderId::Tpm,
    }
}
