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
//! TPM commands are synchronous: while one runs (an RSA key generation can take seconds on
//! a slow TPM) the event loop waits for it. Requests that arrive meanwhile are read when it
//! ends, and the cheap ones (ping, list operations) are answered first, before any further
//! TPM work: see `front_end::server`. If the TPM connection breaks (a simulator restarted, a
//! resource manager gone), the next request reconnects once and retries.

mod attestation;
mod keys;
pub mod response_code;

use super::{AppKeys, Limits, Provider};
use crate::config::TpmSettings;
use crate::error::OpError;
use crate::key_store::{KeyEntry, KeyStore};
use keys::Origin;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::psa_key_attributes::{Attributes, Type};
use parsec_interface::operations::{
    can_do_crypto, psa_asymmetric_decrypt, psa_asymmetric_encrypt, psa_destroy_key,
    psa_export_public_key, psa_generate_key, psa_generate_random, psa_import_key, psa_sign_hash,
    psa_verify_hash, NativeOperation, NativeResult,
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
    Auth, Data, Digest, EccPoint, EccScheme, EncryptedSecret, HashcheckTicket,
    KeyDerivationFunctionScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyRsa, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;
use zeroize::Zeroizing;

const UUID: &str = "1e4954a4-ff21-46d3-ab0c-661eeb667e1d";
/// Version byte of the blobs this provider writes into the key store.
const BLOB_VERSION: u8 = 1;
/// Most bytes TPM2_GetRandom returns per call (the size of the TPM's largest digest).
const RANDOM_CHUNK: usize = 32;

const OPCODES: &[Opcode] = &[
    Opcode::PsaGenerateKey,
    Opcode::PsaImportKey,
    Opcode::PsaExportPublicKey,
    Opcode::PsaDestroyKey,
    Opcode::PsaSignHash,
    Opcode::PsaVerifyHash,
    Opcode::PsaAsymmetricEncrypt,
    Opcode::PsaAsymmetricDecrypt,
    Opcode::PsaGenerateRandom,
    Opcode::CanDoCrypto,
    Opcode::PrepareKeyAttestation,
    Opcode::AttestKey,
];

/// The raw `TSS2_RC` behind a tss-esapi error, if it came from the TSS or the TPM.
fn raw_code(err: &tss_esapi::Error) -> Option<u32> {
    use bitfield::BitRange;
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    match err {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => Some(rc.bit_range(31, 0)),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => Some(rc.bit_range(31, 0)),
        _ => None,
    }
}

/// A failed TPM call, decoded for the log and mapped to a PSA status.
pub fn tpm_error(operation: &str, err: tss_esapi::Error) -> OpError {
    let Some(raw) = raw_code(&err) else {
        return keys::tss_wrapper(operation, err);
    };
    let decoded = response_code::decode(raw);
    let hint = match (decoded.layer, decoded.name) {
        ("TCTI", _) => "the TPM cannot be reached: check the tcti setting, that the device exists and the service user may open it, or that the simulator runs",
        (_, "LOCKOUT") => "the TPM is in dictionary-attack lockout: wait for recovery or reset the lockout with the lockout authorisation (tpm2_dictionarylockout -c)",
        (_, "AUTH_FAIL" | "BAD_AUTH") => "wrong authorisation value: check owner_hierarchy_auth / endorsement_hierarchy_auth",
        (_, "HIERARCHY") => "the hierarchy is disabled in this TPM (firmware setting or TPM2_HierarchyControl)",
        (_, "INITIALIZE" | "REBOOT") => "the TPM was not started: the service sends TPM2_Startup when it connects; restart the service",
        (_, "FAILURE") => "the TPM is in failure mode: a reset (power cycle) is needed",
        (_, "OBJECT_MEMORY" | "SESSION_MEMORY" | "MEMORY" | "OBJECT_HANDLES" | "SESSION_HANDLES") => "the TPM ran out of slots: use the in-kernel resource manager (device:/dev/tpmrm0) or tabrmd rather than the raw device",
        (_, "KEY_SIZE" | "CURVE" | "SCHEME" | "HASH" | "ASYMMETRIC" | "SYMMETRIC") => "this TPM does not implement that algorithm or size: see its capabilities (tpm2_getcap algorithms)",
        (_, "SIGNATURE") => "the signature does not match the hash and the key",
        (_, "RETRY" | "YIELDED" | "TESTING" | "NV_RATE") => "the TPM is busy: retry the request",
        _ => "see the TPM 2.0 specification, Part 2, section 6.6 (response codes)",
    };
    OpError::new(
        decoded.status,
        format!("{operation}: {}", decoded.describe()),
        hint,
    )
}

/// Whether an error means the TPM connection (or the TPM's state) is gone, so that the
/// provider should reconnect.
fn connection_lost(err: &tss_esapi::Error) -> bool {
    raw_code(err).is_some_and(|raw| {
        let decoded = response_code::decode(raw);
        matches!(
            (decoded.layer, decoded.name),
            (
                "TCTI",
                "IO_ERROR" | "NO_CONNECTION" | "MALFORMED_RESPONSE" | "INSUFFICIENT_RESPONSE"
            ) | (_, "INITIALIZE" | "REFERENCE_H" | "REFERENCE_S")
        )
    })
}

/// The template of the primary key all client keys are wrapped with. It must never change:
/// a different template is a different key, and every blob in the store would be lost.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A stored key: its public area and, unless it is a public key, its wrapped private area.
struct Blob {
    public: Public,
    private: Option<Private>,
}

impl Blob {
    fn encode(public: &Public, private: Option<&Private>) -> Result<Vec<u8>, OpError> {
        let public = public
            .marshall()
            .map_err(|e| keys::tss_wrapper("marshalling the public area", e))?;
        let private = private.map(|p| p.value()).unwrap_or(&[]);
        let mut out = Vec::with_capacity(5 + public.len() + private.len());
        out.push(BLOB_VERSION);
        out.extend_from_slice(&(public.len() as u16).to_be_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&(private.len() as u16).to_be_bytes());
        out.extend_from_slice(private);
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<Blob, OpError> {
        let damaged = |what: &str| {
            OpError::new(
                ResponseStatus::PsaErrorCorruptionDetected,
                format!("the key store entry's TPM blob is damaged: {what}"),
                "restore the key store entry from a backup, or destroy the key",
            )
        };
        let (&version, rest) = bytes.split_first().ok_or_else(|| damaged("empty"))?;
        if version != BLOB_VERSION {
            return Err(damaged("unknown version"));
        }
        let take = |input: &[u8]| -> Option<(Vec<u8>, usize)> {
            let len = u16::from_be_bytes(input.get(..2)?.try_into().ok()?) as usize;
            Some((input.get(2..2 + len)?.to_vec(), 2 + len))
        };
        let (public, used) = take(rest).ok_or_else(|| damaged("short public area"))?;
        let (private, used2) = take(&rest[used..]).ok_or_else(|| damaged("short private area"))?;
        if used + used2 != rest.len() {
            return Err(damaged("trailing bytes"));
        }
        let public = Public::unmarshall(&public).map_err(|_| damaged("public area"))?;
        let private = if private.is_empty() {
            None
        } else {
            Some(Private::try_from(private).map_err(|_| damaged("private area"))?)
        };
        Ok(Blob { public, private })
    }
}

/// A key kept loaded in the TPM between requests.
struct Loaded {
    blob: Vec<u8>,
    handle: KeyHandle,
    /// The coordinate length of an ECC key's curve (signature sizes).
    ecc_field_len: Option<usize>,
}

/// An open connection to the TPM with the provider's primary key and session.
struct Connection {
    ctx: Context,
    primary: KeyHandle,
    session: AuthSession,
    /// The key used last, still loaded.
    loaded: Option<Loaded>,
    /// The endorsement key's saved context and public area, made on the first attestation
    /// and reused for the connection's life: creating the EK is an RSA key derivation
    /// (seconds on a discrete TPM), loading its saved context is not. It is not kept loaded:
    /// a TPM without a resource manager has only three transient object slots.
    ek: Option<(tss_esapi::utils::TpmsContext, tss_esapi::structures::Public)>,
    /// Set when a call fails in a way that means the connection is gone.
    broken: bool,
}

impl Connection {
    fn open(settings: &TpmSettings, tcti: &TctiNameConf) -> Result<Connection, String> {
        let mut ctx = Context::new(tcti.clone()).map_err(|e| {
            let decoded = raw_code(&e).map(|raw| response_code::decode(raw).describe());
            format!(
                "cannot open the TPM through tcti \"{}\": {}{}",
                settings.tcti,
                probe_tcti(&settings.tcti),
                decoded.map(|d| format!(" (TSS: {d})")).unwrap_or_default()
            )
        })?;
        // A TPM started by firmware or the kernel answers TPM_RC_INITIALIZE: that is fine.
        if let Err(e) = ctx.startup(StartupType::Clear) {
            if raw_code(&e).map(|raw| response_code::decode(raw).name) != Some("INITIALIZE") {
                return Err(format!(
                    "TPM2_Startup failed: {}",
                    tpm_error("TPM2_Startup", e)
                ));
            }
        }
        let owner_auth = Auth::try_from(settings.owner_hierarchy_auth.bytes().to_vec())
            .map_err(|e| format!("owner_hierarchy_auth is too long for the TPM: {e}"))?;
        ctx.tr_set_auth(ObjectHandle::Owner, owner_auth)
            .map_err(|e| format!("setting the owner authorisation: {e}"))?;
        let template = primary_template().map_err(|e| format!("primary key template: {e}"))?;
        let primary = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| {
                format!(
                    "creating the primary key: {}",
                    tpm_error("TPM2_CreatePrimary", e)
                )
            })?
            .key_handle;
        let session = ctx
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    Some(primary),
                    None,
                    None,
                    SessionType::Hmac,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| {
                format!(
                    "starting the session: {}",
                    tpm_error("TPM2_StartAuthSession", e)
                )
            })?
            .ok_or("the TPM returned no session handle")?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| format!("setting the session's attributes: {e}"))?;
        Ok(Connection {
            ctx,
            primary,
            session,
            loaded: None,
            ek: None,
            broken: false,
        })
    }

    /// Runs one TPM call with the provider's session, decoding a failure.
    fn call<T>(
        &mut self,
        operation: &str,
        f: impl FnOnce(&mut Context) -> Result<T, tss_esapi::Error>,
    ) -> Result<T, OpError> {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let session = self.session;
        let result = self
            .ctx
            .tr_sess_set_attributes(session, attributes, mask)
            .and_then(|()| self.ctx.execute_with_session(Some(session), f));
        result.map_err(|e| {
            if connection_lost(&e) {
                self.broken = true;
            }
            tpm_error(operation, e)
        })
    }

    /// Runs one TPM call that needs no authorisation, without a session.
    fn call_plain<T>(
        &mut self,
        operation: &str,
        f: impl FnOnce(&mut Context) -> Result<T, tss_esapi::Error>,
    ) -> Result<T, OpError> {
        self.ctx.execute_without_session(f).map_err(|e| {
            if connection_lost(&e) {
                self.broken = true;
            }
            tpm_error(operation, e)
        })
    }

    /// Loads a stored key (or finds it loaded already) and returns its handle.
    /// Returns the handle and, for ECC keys, the curve's coordinate length.
    fn load(&mut self, blob: &[u8]) -> Result<(KeyHandle, Option<usize>), OpError> {
        if let Some(loaded) = &self.loaded {
            if loaded.blob.as_slice() == blob {
                return Ok((loaded.handle, loaded.ecc_field_len));
            }
        }
        let stored = Blob::decode(blob)?;
        self.unload();
        let primary = self.primary;
        let public = stored.public.clone();
        let handle = match stored.private {
            Some(private) => self
                .call("TPM2_Load", |ctx| ctx.load(primary, private, public))
                .map_err(|mut e| {
                    if e.cause.contains("INTEGRITY") {
                        e.status = ResponseStatus::PsaErrorStorageFailure;
                        e.hint = "the TPM cannot unwrap this key: the owner hierarchy was cleared (tpm2_clear), the owner seed changed, or the key store comes from another TPM; the key is lost";
                    }
                    e
                })?,
            None => self.call_plain("TPM2_LoadExternal", |ctx| {
                ctx.load_external_public(public, Hierarchy::Null)
            })?,
        };
        let ecc_field_len = keys::ecc_field_len(&stored.public);
        self.loaded = Some(Loaded {
            blob: blob.to_vec(),
            handle,
            ecc_field_len,
        });
        Ok((handle, ecc_field_len))
    }

    /// Flushes the key kept loaded, to free its slot.
    fn unload(&mut self) {
        if let Some(loaded) = self.loaded.take() {
            if let Err(e) = self.ctx.flush_context(loaded.handle.into()) {
                log::warn!(
                    "tpm: flushing a loaded key: {}",
                    tpm_error("TPM2_FlushContext", e)
                );
            }
        }
    }

    /// Whether the TPM says it is healthy (not in failure mode).
    fn healthy(&mut self) -> bool {
        matches!(
            self.ctx
                .execute_without_session(|ctx| ctx.get_test_result()),
            Ok((_, Ok(())))
        )
    }
}

/// Looks at what a TCTI string names, to give the errno the TSS does not pass on.
fn probe_tcti(tcti: &str) -> String {
    let (kind, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match kind {
        "device" => {
            let path = if conf.is_empty() { "/dev/tpm0" } else { conf };
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                Ok(_) => format!("{path} opens, but the TSS could not use it"),
                Err(e) => format!("{path}: {e} (errno {})", e.raw_os_error().unwrap_or(0)),
            }
        }
        "swtpm" | "mssim" => {
            let mut host = "127.0.0.1".to_string();
            let mut port = 2321;
            for part in conf.split(',') {
                match part.split_once('=') {
                    Some(("host", h)) => host = h.to_string(),
                    Some(("port", p)) => port = p.parse().unwrap_or(port),
                    _ => {}
                }
            }
            match std::net::TcpStream::connect((host.as_str(), port)) {
                Ok(_) => format!("{host}:{port} accepts connections, but the TSS could not use it"),
                Err(e) => format!(
                    "connecting to {host}:{port}: {e} (errno {})",
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
        _ => "the TSS could not open it".into(),
    }
}

pub struct TpmProvider {
    settings: TpmSettings,
    tcti: TctiNameConf,
    conn: Option<Connection>,
    limits: Limits,
}

impl TpmProvider {
    /// Connects to the TPM. `None`: there is none, and `skip_if_no_tpm` says to go on
    /// without this provider.
    pub fn start(
        settings: &TpmSettings,
        store: &KeyStore,
        limits: Limits,
    ) -> Result<Option<TpmProvider>, String> {
        // tpm2-tss logs its own view of every failure to stderr; the provider logs each one
        // decoded, with the client and a hint. Keep the library quiet unless asked for.
        if std::env::var_os("TSS2_LOG").is_none() {
            let level = if log::max_level() >= log::LevelFilter::Debug {
                "all+warning"
            } else {
                "all+none"
            };
            std::env::set_var("TSS2_LOG", level);
        }
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
            conn: Some(conn),
            limits,
        }))
    }

    /// The connection, reopened if it was lost.
    fn connection(&mut self) -> Result<&mut Connection, OpError> {
        if self.conn.as_ref().is_some_and(|c| c.broken) {
            log::warn!(
                "tpm: the connection to the TPM was lost; reconnecting through \"{}\"",
                self.settings.tcti
            );
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = Connection::open(&self.settings, &self.tcti).map_err(|e| {
                OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    e,
                    "the TPM cannot be reached: check the tcti setting, the device or the simulator",
                )
            })?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn blob_of<'k>(keys: &'k AppKeys<'_>, name: &str) -> Result<(&'k [u8], Attributes), OpError> {
        let entry = keys.get(name)?;
        Ok((entry.key_id.as_slice(), entry.attributes))
    }

    /// Runs an operation; if the TPM connection turns out to be gone, reconnects and runs it
    /// once more.
    fn run(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        match self.run_once(op, keys) {
            Err(e) if self.conn.as_ref().is_some_and(|c| c.broken) => {
                log::warn!("tpm: {e}; reconnecting and trying once more");
                self.run_once(op, keys)
            }
            other => other,
        }
    }

    fn run_once(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        match op {
            NativeOperation::PsaGenerateKey(op) => {
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
                check(CheckType::Import, op.attributes)?;
                keys.ensure_free(&op.key_name)?;
                let imported = keys::import(&op.attributes, op.data.expose_secret())?;
                let mut attributes = op.attributes;
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
                let (blob, _) = Self::blob_of(keys, &op.key_name)?;
                let data = keys::export_public(&Blob::decode(blob)?.public)?;
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
                let (blob, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let scheme = keys::signature_scheme(op.alg)?;
                let digest = Digest::try_from(op.hash.to_vec())
                    .map_err(|e| keys::tss_wrapper("the hash", e))?;
                let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
                    tag: TPM2_ST_HASHCHECK,
                    hierarchy: TPM2_RH_NULL,
                    digest: Default::default(),
                })
                .map_err(|e| keys::tss_wrapper("the hash check ticket", e))?;
                let blob = blob.to_vec();
                let conn = self.connection()?;
                let (handle, field_len) = conn.load(&blob)?;
                let signature = conn.call("TPM2_Sign", |ctx| {
                    ctx.sign(handle, digest, scheme, validation)
                })?;
                let signature = keys::signature_bytes(signature, field_len)?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let (blob, attributes) = Self::blob_of(keys, &op.key_name)?;
                op.validate(attributes)?;
                let digest = Digest::try_from(op.hash.to_vec())
                    .map_err(|e| keys::tss_wrapper("the hash", e))?;
                let blob = blob.to_vec();
                let conn = self.connection()?;
                let (handle, field_len) = conn.load(&blob)?;
                let signature = keys::signature_from(op.alg, &op.signature, field_len)?;
                conn.call("TPM2_VerifySignature", |ctx| {
                    ctx.verify_signature(handle, digest, signature)
                })?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
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
                let (handle, _) = conn.load(&blob)?;
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
                let (handle, _) = conn.load(&blob)?;
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
        if let Some(conn) = self.conn.as_mut() {
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

/// What this provider can generate, import and use (CanDoCrypto and up-front checks).
fn check(check_type: CheckType, attributes: Attributes) -> Result<(), OpError> {
    let key_type = attributes.key_type;
    let size_ok = match key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            (check_type == CheckType::Import && attributes.bits == 0)
                || keys::rsa_bits(attributes.bits).is_ok()
        }
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            keys::curve(curve_family, attributes.bits).is_ok()
        }
        _ => false,
    };
    if !size_ok {
        return Err(keys::not_supported(format!(
            "{key_type:?} of {} bits",
            attributes.bits
        )));
    }
    match check_type {
        CheckType::Generate if key_type.is_public_key() => {
            return Err(keys::not_supported(format!(
                "generating a public key ({key_type:?}): generate the key pair"
            )))
        }
        CheckType::Derive => return Err(keys::not_supported("key derivation".into())),
        _ => {}
    }
    if !key_type.is_public_key() && attributes.policy.usage_flags.export() {
        return Err(OpError::new(
            ResponseStatus::PsaErrorNotSupported,
            "a TPM private key with the export usage flag",
            "a key in the TPM never leaves it: drop the export flag, or use the software provider for keys that must be exported",
        ));
    }
    let alg = attributes.policy.permitted_algorithms;
    if attributes.policy.usage_flags.sign_hash()
        || attributes.policy.usage_flags.verify_hash()
        || attributes.policy.usage_flags.encrypt()
        || attributes.policy.usage_flags.decrypt()
    {
        use parsec_interface::operations::psa_algorithm::{Algorithm, AsymmetricSignature};
        match alg {
            Algorithm::AsymmetricSignature(sig) => {
                let hash_ok = match sig {
                    AsymmetricSignature::RsaPkcs1v15Sign { hash_alg }
                    | AsymmetricSignature::RsaPss { hash_alg }
                    | AsymmetricSignature::Ecdsa { hash_alg } => match hash_alg {
                        parsec_interface::operations::psa_algorithm::SignHash::Specific(h) => {
                            keys::tpm_hash(h).is_ok()
                        }
                        parsec_interface::operations::psa_algorithm::SignHash::Any => true,
                    },
                    _ => false,
                };
                if !hash_ok {
                    return Err(keys::not_supported(format!("signature algorithm {sig:?}")));
                }
            }
            Algorithm::AsymmetricEncryption(enc) => {
                keys::decryption_scheme(enc)?;
            }
            Algorithm::None => {}
            other => return Err(keys::not_supported(format!("algorithm {other:?}"))),
        }
        attributes.compatible_with_alg(alg).map_err(|e| {
            OpError::new(
                ResponseStatus::from(e),
                format!("{alg:?} does not fit a {key_type:?}"),
                "choose an algorithm for this key type",
            )
        })?;
    }
    Ok(())
}

impl Provider for TpmProvider {
    fn id(&self) -> ProviderId {
        ProviderId::Tpm
    }

    fn info(&self) -> ProviderInfo {
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

    fn opcodes(&self) -> &'static [Opcode] {
        OPCODES
    }

    fn execute(
        &mut self,
        op: NativeOperation,
        mut keys: AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        self.run(&op, &mut keys)
    }

    fn release_device(&mut self) {
        self.conn = None;
    }

    fn destroy_material(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        // The TPM holds nothing of a key but while it is loaded: the blob was the key.
        self.forget_loaded(entry);
        Ok(())
    }
}
