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
//! again without a restart.

mod ckr;

use super::{der, ecc, AppKeys, Limits, Provider};
use crate::config::{ExistingKey, Pkcs11Settings, TokenSelector};
use crate::error::OpError;
use crate::key_store::{KeyEntry, KeyStore, KeyTriple};
use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::rsa::{PkcsMgfType, PkcsOaepParams, PkcsOaepSource, PkcsPssParams};
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash, SignHash,
};
use parsec_interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_interface::operations::{
    can_do_crypto, psa_asymmetric_decrypt, psa_asymmetric_encrypt, psa_destroy_key, psa_export_key,
    psa_export_public_key, psa_generate_key, psa_generate_random, psa_import_key, psa_sign_hash,
    psa_verify_hash, NativeOperation, NativeResult,
};
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use parsec_interface::secrecy::{ExposeSecret, Secret};
use std::collections::HashMap;
use zeroize::Zeroizing;

const UUID: &str = "30e39502-eba6-4d60-a4af-c518b7f5e38f";
const ID_LEN: usize = 16;

const OPCODES: &[Opcode] = &[
    Opcode::PsaGenerateKey,
    Opcode::PsaImportKey,
    Opcode::PsaExportKey,
    Opcode::PsaExportPublicKey,
    Opcode::PsaDestroyKey,
    Opcode::PsaSignHash,
    Opcode::PsaVerifyHash,
    Opcode::PsaAsymmetricEncrypt,
    Opcode::PsaAsymmetricDecrypt,
    Opcode::PsaGenerateRandom,
    Opcode::CanDoCrypto,
];

/// How the key store names a token object (the entry's `key_id`, bincode).
#[derive(serde::Serialize, serde::Deserialize, Clone, PartialEq, Eq, Hash)]
struct KeyRef {
    id: Option<Vec<u8>>,
    label: Option<String>,
}

impl KeyRef {
    fn decode(bytes: &[u8]) -> Result<KeyRef, OpError> {
        bincode::deserialize(bytes).map_err(|e| {
            OpError::new(
                ResponseStatus::PsaErrorCorruptionDetected,
                format!("the key store entry is not a PKCS#11 key reference: {e}"),
                "restore the entry from a backup, or remove it",
            )
        })
    }

    fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("a struct of vectors serializes")
    }

    /// The attributes that find this key's objects of one class.
    fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(id) = &self.id {
            template.push(Attribute::Id(id.clone()));
        }
        if let Some(label) = &self.label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        template
    }
}

/// The objects of one key on the token.
#[derive(Clone, Copy)]
struct Objects {
    private: Option<ObjectHandle>,
    public: Option<ObjectHandle>,
}

/// The module loaded, the token found, a logged-in session.
struct Connection {
    /// Kept so that the module stays initialised while the session lives.
    _pkcs11: Pkcs11,
    session: Session,
    /// For log lines: `token "label" (serial ..., slot N)`.
    token: String,
    objects: HashMap<Vec<u8>, Objects>,
    broken: bool,
}

fn token_line(label: &str, serial: &str, slot: Slot) -> String {
    format!(
        "token \"{}\" (serial {}, slot {})",
        label.trim(),
        serial.trim(),
        slot.id()
    )
}

impl Connection {
    fn open(settings: &Pkcs11Settings) -> Result<Connection, String> {
        let module = settings.library_path.display().to_string();
        let pkcs11 = Pkcs11::new(&settings.library_path)
            .map_err(|e| format!("cannot load the PKCS#11 module {module}: {e}"))?;
        pkcs11
            .initialize(CInitializeArgs::OsThreads)
            .map_err(|e| format!("{}", ckr::error("C_Initialize", &module, e)))?;
        let slots = pkcs11
            .get_slots_with_token()
            .map_err(|e| format!("{}", ckr::error("C_GetSlotList", &module, e)))?;
        let mut seen = Vec::new();
        let mut chosen = None;
        for slot in slots {
            let Ok(info) = pkcs11.get_token_info(slot) else {
                continue;
            };
            let line = token_line(info.label(), info.serial_number(), slot);
            let matches = match &settings.token {
                TokenSelector::Slot(id) => slot.id() == *id,
                TokenSelector::Serial(serial) => info.serial_number().trim() == serial.trim(),
                TokenSelector::Label(label) => info.label().trim() == label.trim(),
                TokenSelector::Only => true,
            };
            if matches && info.token_initialized() {
                chosen = match chosen {
                    None => Some((slot, line.clone())),
                    Some(_) if settings.token == TokenSelector::Only => {
                        return Err(format!(
                            "{module} has several tokens and the config names none: set slot_number, serial_number or token_label (tokens seen: {})",
                            std::iter::once(line).chain(seen).collect::<Vec<_>>().join(", ")
                        ))
                    }
                    other => other,
                };
            }
            seen.push(line);
        }
        let Some((slot, token)) = chosen else {
            return Err(format!(
                "no initialised token matches {:?} in {module}; tokens seen: {}",
                settings.token,
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join(", ")
                }
            ));
        };
        let session = pkcs11
            .open_rw_session(slot)
            .map_err(|e| format!("{}", ckr::error("opening a session", &token, e)))?;
        if !settings.user_pin.bytes().is_empty() {
            let pin = String::from_utf8_lossy(settings.user_pin.bytes()).to_string();
            match session.login(UserType::User, Some(&Secret::new(pin))) {
                Ok(())
                | Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::UserAlreadyLoggedIn,
                    _,
                )) => {}
                Err(e) => return Err(format!("{}", ckr::error("logging in", &token, e))),
            }
        }
        Ok(Connection {
            _pkcs11: pkcs11,
            session,
            token,
            objects: HashMap::new(),
            broken: false,
        })
    }

    /// Decodes a failed call, and notes when the token is gone.
    fn fail(&mut self, operation: &str, err: cryptoki::error::Error) -> OpError {
        if ckr::token_lost(&err) {
            self.broken = true;
        }
        ckr::error(operation, &self.token, err)
    }

    /// The objects of a key, found on the token once and then remembered.
    fn objects(&mut self, key_id: &[u8]) -> Result<Objects, OpError> {
        if let Some(objects) = self.objects.get(key_id) {
            return Ok(*objects);
        }
        let key = KeyRef::decode(key_id)?;
        let mut found = Objects {
            private: None,
            public: None,
        };
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            let handles = self
                .session
                .find_objects(&key.template(class))
                .map_err(|e| self.fail("finding the key", e))?;
            let first = handles.first().copied();
            if class == ObjectClass::PRIVATE_KEY {
                found.private = first;
            } else {
                found.public = first;
            }
        }
        if found.private.is_none() && found.public.is_none() {
            return Err(OpError::new(
                ResponseStatus::PsaErrorStorageFailure,
                format!("no object with this key's CKA_ID/label on {}", self.token),
                "the key was deleted from the token by another program, or this is another token",
            ));
        }
        self.objects.insert(key_id.to_vec(), found);
        Ok(found)
    }

    fn private(&mut self, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
        self.objects(key_id)?.private.ok_or_else(|| {
            OpError::new(
                ResponseStatus::PsaErrorNotPermitted,
                format!("the key has no private key object on {}", self.token),
                "this is a public key: it can verify and encrypt only",
            )
        })
    }

    /// The public key object, or the private one for tokens that keep no public object
    /// (a private key object answers verify and encrypt on most tokens).
    fn public(&mut self, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
        let objects = self.objects(key_id)?;
        Ok(objects
            .public
            .or(objects.private)
            .expect("objects() found one"))
    }
}

pub struct Pkcs11Provider {
    settings: Pkcs11Settings,
    conn: Option<Connection>,
    limits: Limits,
}

/// DigestInfo prefixes (RFC 8017, 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || hash.
fn digest_info(hash: Hash) -> Option<&'static [u8]> {
    #[allow(deprecated)]
    match hash {
        Hash::Sha1 => Some(&[
            0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
            0x14,
        ]),
        Hash::Sha224 => Some(&[
            0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x04, 0x05, 0x00, 0x04, 0x1c,
        ]),
        Hash::Sha256 => Some(&[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ]),
        Hash::Sha384 => Some(&[
            0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x02, 0x05, 0x00, 0x04, 0x30,
        ]),
        Hash::Sha512 => Some(&[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ]),
        _ => None,
    }
}

#[allow(deprecated)]
fn hash_mechanism(hash: Hash) -> Result<(MechanismType, PkcsMgfType), OpError> {
    match hash {
        Hash::Sha1 => Ok((MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)),
        Hash::Sha224 => Ok((MechanismType::SHA224, PkcsMgfType::MGF1_SHA224)),
        Hash::Sha256 => Ok((MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)),
        Hash::Sha384 => Ok((MechanismType::SHA384, PkcsMgfType::MGF1_SHA384)),
        Hash::Sha512 => Ok((MechanismType::SHA512, PkcsMgfType::MGF1_SHA512)),
        other => Err(not_supported(format!("hash {other:?}"))),
    }
}

fn not_supported(cause: String) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        cause,
        "the PKCS#11 provider supports RSA 1024-4096 and ECC secp-r1 256/384/521 keys for signing (PKCS#1 v1.5, PSS, ECDSA) and RSA encryption (PKCS#1 v1.5, OAEP), as far as the token does",
    )
}

fn specific(hash: SignHash) -> Result<Hash, OpError> {
    match hash {
        SignHash::Specific(hash) => Ok(hash),
        SignHash::Any => Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            "the operation names SignHash::Any",
            "a signature names one hash algorithm; Any only belongs in a key policy",
        )),
    }
}

/// The mechanism and the data to sign or verify for a PSA signature of a hash.
fn signature_mechanism(
    alg: AsymmetricSignature,
    hash: &[u8],
) -> Result<(Mechanism<'static>, Vec<u8>), OpError> {
    match alg {
        AsymmetricSignature::Ecdsa { .. } => Ok((Mechanism::Ecdsa, hash.to_vec())),
        AsymmetricSignature::RsaPkcs1v15Sign { hash_alg } => {
            let prefix = digest_info(specific(hash_alg)?)
                .ok_or_else(|| not_supported(format!("{alg:?}")))?;
            Ok((Mechanism::RsaPkcs, [prefix, hash].concat()))
        }
        AsymmetricSignature::RsaPss { hash_alg } => {
            let hash_alg = specific(hash_alg)?;
            let (mechanism, mgf) = hash_mechanism(hash_alg)?;
            let params = PkcsPssParams {
                hash_alg: mechanism,
                mgf,
                s_len: (hash_alg.hash_length() as std::os::raw::c_ulong).into(),
            };
            Ok((Mechanism::RsaPkcsPss(params), hash.to_vec()))
        }
        other => Err(not_supported(format!("signature algorithm {other:?}"))),
    }
}

fn encryption_mechanism<'a>(
    alg: AsymmetricEncryption,
    label: Option<&'a [u8]>,
) -> Result<Mechanism<'a>, OpError> {
    match alg {
        AsymmetricEncryption::RsaPkcs1v15Crypt => Ok(Mechanism::RsaPkcs),
        AsymmetricEncryption::RsaOaep { hash_alg } => {
            let (hash, mgf) = hash_mechanism(hash_alg)?;
            let source = match label {
                Some(label) if !label.is_empty() => PkcsOaepSource::data_specified(label),
                _ => PkcsOaepSource::empty(),
            };
            Ok(Mechanism::RsaPkcsOaep(PkcsOaepParams::new(
                hash, mgf, source,
            )))
        }
    }
}

/// DER OIDs of the curves, as CKA_EC_PARAMS.
fn ec_params(family: EccFamily, bits: usize) -> Result<&'static [u8], OpError> {
    match (family, bits) {
        (EccFamily::SecpR1, 256) => {
            Ok(&[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07])
        }
        (EccFamily::SecpR1, 384) => Ok(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22]),
        (EccFamily::SecpR1, 521) => Ok(&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x23]),
        _ => Err(not_supported(format!(
            "ECC curve {family:?} with {bits} bits"
        ))),
    }
}

fn curve_bits(params: &[u8]) -> Option<usize> {
    [256, 384, 521]
        .into_iter()
        .find(|&bits| ec_params(EccFamily::SecpR1, bits).ok() == Some(params))
}

/// What this provider can generate, import and use (CanDoCrypto and up-front checks).
fn check(check_type: CheckType, attributes: Attributes, allow_export: bool) -> Result<(), OpError> {
    let key_type = attributes.key_type;
    let size_ok = match key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            (check_type == CheckType::Import && attributes.bits == 0)
                || ((1024..=4096).contains(&attributes.bits) && attributes.bits % 8 == 0)
        }
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            ec_params(curve_family, attributes.bits).is_ok()
        }
        _ => false,
    };
    if !size_ok {
        return Err(not_supported(format!(
            "{key_type:?} of {} bits",
            attributes.bits
        )));
    }
    match check_type {
        CheckType::Generate if key_type.is_public_key() => {
            return Err(not_supported(format!(
                "generating a public key ({key_type:?}): generate the key pair"
            )))
        }
        CheckType::Derive => return Err(not_supported("key derivation".into())),
        _ => {}
    }
    if attributes.policy.usage_flags.export() && !key_type.is_public_key() && !allow_export {
        return Err(OpError::new(
            ResponseStatus::PsaErrorNotPermitted,
            "a private key with the export usage flag, and allow_export = false",
            "the config forbids exportable keys on this token: drop the export flag, or set allow_export = true",
        ));
    }
    match attributes.policy.permitted_algorithms {
        Algorithm::AsymmetricSignature(sig) => {
            if !matches!(
                sig,
                AsymmetricSignature::RsaPkcs1v15Sign { .. }
                    | AsymmetricSignature::RsaPss { .. }
                    | AsymmetricSignature::Ecdsa { .. }
            ) {
                return Err(not_supported(format!("signature algorithm {sig:?}")));
            }
        }
        Algorithm::AsymmetricEncryption(AsymmetricEncryption::RsaOaep { hash_alg }) => {
            hash_mechanism(hash_alg)?;
        }
        Algorithm::AsymmetricEncryption(_) | Algorithm::None => {}
        other => return Err(not_supported(format!("algorithm {other:?}"))),
    }
    if attributes.policy.permitted_algorithms != Algorithm::None {
        attributes
            .compatible_with_alg(attributes.policy.permitted_algorithms)
            .map_err(|e| {
                OpError::new(
                    ResponseStatus::from(e),
                    format!(
                        "{:?} does not fit a {key_type:?}",
                        attributes.policy.permitted_algorithms
                    ),
                    "choose an algorithm for this key type",
                )
            })?;
    }
    Ok(())
}

fn rsa_exponent(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32)
}

/// The PSA attributes of a key found on the token (existing keys).
fn attributes_of(conn: &mut Connection, objects: Objects) -> Result<Attributes, OpError> {
    let handle = objects.private.or(objects.public).expect("one object");
    let asked = [
        AttributeType::KeyType,
        AttributeType::Sign,
        AttributeType::Decrypt,
        AttributeType::Modulus,
        AttributeType::EcParams,
    ];
    let values = conn
        .session
        .get_attributes(handle, &asked)
        .map_err(|e| conn.fail("reading the key's attributes", e))?;
    let (mut key_type, mut sign, mut decrypt, mut bits, mut family) = (None, false, false, 0, None);
    for value in values {
        match value {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Sign(s) => sign = s,
            Attribute::Decrypt(d) => decrypt = d,
            Attribute::Modulus(m) => bits = m.len() * 8,
            Attribute::EcParams(p) => {
                bits = curve_bits(&p).unwrap_or(0);
                family = Some(EccFamily::SecpR1);
            }
            _ => {}
        }
    }
    let private = objects.private.is_some();
    let mut usage_flags = UsageFlags::default();
    let (key_type, alg): (Type, Algorithm) = match key_type {
        Some(KeyType::RSA) if decrypt && !sign => {
            usage_flags.set_encrypt();
            if private {
                usage_flags.set_decrypt();
            }
            let t = if private {
                Type::RsaKeyPair
            } else {
                Type::RsaPublicKey
            };
            (t, AsymmetricEncryption::RsaPkcs1v15Crypt.into())
        }
        Some(KeyType::RSA) => {
            usage_flags.set_verify_hash();
            if private {
                usage_flags.set_sign_hash();
            }
            let t = if private {
                Type::RsaKeyPair
            } else {
                Type::RsaPublicKey
            };
            (
                t,
                AsymmetricSignature::RsaPkcs1v15Sign {
                    hash_alg: Hash::Sha256.into(),
                }
                .into(),
            )
        }
        Some(KeyType::EC) if bits != 0 => {
            usage_flags.set_verify_hash();
            if private {
                usage_flags.set_sign_hash();
            }
            let curve_family = family.unwrap_or(EccFamily::SecpR1);
            let t = if private {
                Type::EccKeyPair { curve_family }
            } else {
                Type::EccPublicKey { curve_family }
            };
            (
                t,
                AsymmetricSignature::Ecdsa {
                    hash_alg: Hash::Sha256.into(),
                }
                .into(),
            )
        }
        other => {
            return Err(not_supported(format!(
            "an existing key of type {other:?} (RSA, and ECC on P-256/P-384/P-521, can be mapped)"
        )))
        }
    };
    Ok(Attributes {
        lifetime: Lifetime::Persistent,
        key_type,
        bits,
        policy: Policy {
            usage_flags,
            permitted_algorithms: alg,
        },
    })
}

impl Pkcs11Provider {
    pub fn start(
        settings: &Pkcs11Settings,
        store: &mut KeyStore,
        limits: Limits,
    ) -> Result<Pkcs11Provider, String> {
        let mut conn = Connection::open(settings)?;
        let stored = store.keys_in(ProviderId::Pkcs11).count();
        for existing in &settings.existing_keys {
            mount(&mut conn, store, existing)?;
        }
        log::info!(
            "pkcs11: using {} through {}, {stored} keys in the store, {} existing keys mapped",
            conn.token,
            settings.library_path.display(),
            settings.existing_keys.len()
        );
        if settings.software_public_operations {
            log::warn!("pkcs11: software_public_operations = true is accepted for upstream configs, but this service verifies and encrypts on the token too");
        }
        Ok(Pkcs11Provider {
            settings: settings.clone(),
            conn: Some(conn),
            limits,
        })
    }

    /// The connection, reopened if the token went away.
    fn connection(&mut self) -> Result<&mut Connection, OpError> {
        if self.conn.as_ref().is_some_and(|c| c.broken) {
            log::warn!(
                "pkcs11: lost the token; opening {} again",
                self.settings.library_path.display()
            );
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = Connection::open(&self.settings).map_err(|e| {
                OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    e,
                    "the token is not there: insert it (the service finds it again by itself)",
                )
            })?;
            log::info!("pkcs11: {} is back", conn.token);
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn existing(&self, app: &str, name: &str) -> Option<&ExistingKey> {
        self.settings
            .existing_keys
            .iter()
            .find(|k| k.application == app && k.name == name)
    }

    /// Runs an operation; if the token turns out to be gone, reopens it and runs it once more.
    fn run(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        match self.run_once(op, keys) {
            Err(e) if self.conn.as_ref().is_some_and(|c| c.broken) => {
                log::warn!("pkcs11: {e}; opening the token again and trying once more");
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
        let allow_export = self.settings.allow_export;
        match op {
            NativeOperation::PsaGenerateKey(op) => {
                check(CheckType::Generate, op.attributes, allow_export)?;
                keys.ensure_free(&op.key_name)?;
                let conn = self.connection()?;
                let key = new_key_ref(conn, &op.key_name)?;
                let (public, private) = templates(&key, &op.attributes)?;
                let mechanism = match op.attributes.key_type {
                    Type::RsaKeyPair => Mechanism::RsaPkcsKeyPairGen,
                    _ => Mechanism::EccKeyPairGen,
                };
                let (public_handle, private_handle) = conn
                    .session
                    .generate_key_pair(&mechanism, &public, &private)
                    .map_err(|e| conn.fail("C_GenerateKeyPair", e))
                    .map_err(|e| name_refused_attribute(conn, e, &mechanism, &public, &private))?;
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
                check(CheckType::Import, op.attributes, allow_export)?;
                keys.ensure_free(&op.key_name)?;
                let conn = self.connection()?;
                let key = new_key_ref(conn, &op.key_name)?;
                let (attributes, objects) =
                    import_templates(&key, &op.attributes, op.data.expose_secret())?;
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
                record(conn, keys, &op.key_name, key, attributes, &handles)?;
                Ok(NativeResult::PsaImportKey(psa_import_key::Result {}))
            }
            NativeOperation::PsaExportPublicKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                let data = export_public(conn, handle, &entry.attributes)?;
                Ok(NativeResult::PsaExportPublicKey(
                    psa_export_public_key::Result { data: data.into() },
                ))
            }
            NativeOperation::PsaExportKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                entry.attributes.can_export().map_err(|e| {
                    OpError::new(
                        ResponseStatus::from(e),
                        "the key's policy has no export usage flag",
                        "only keys created with the export flag can be exported",
                    )
                })?;
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
                let entry = keys.remove(&op.key_name)?;
                if let Err(e) = self.destroy_material(&entry) {
                    log::warn!("pkcs11: key \"{}\" of \"{}\" forgotten but not destroyed on the token: {e}", op.key_name, keys.app());
                }
                Ok(NativeResult::PsaDestroyKey(psa_destroy_key::Result {}))
            }
            NativeOperation::PsaSignHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let (mechanism, data) = signature_mechanism(op.alg, &op.hash)?;
                let conn = self.connection()?;
                let handle = conn.private(&entry.key_id)?;
                let signature = conn
                    .session
                    .sign(&mechanism, handle, &data)
                    .map_err(|e| conn.fail("C_Sign", e))?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let (mechanism, data) = signature_mechanism(op.alg, &op.hash)?;
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                conn.session
                    .verify(&mechanism, handle, &data, &op.signature)
                    .map_err(|e| conn.fail("C_Verify", e))?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
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
                        // SoftHSM (and other modules) answer a ciphertext whose padding does
                        // not check with CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED. If the
                        // session is still healthy, the input was at fault.
                        if (err.cause.contains("CKR_GENERAL_ERROR")
                            || err.cause.contains("CKR_FUNCTION_FAILED"))
                            && conn.session.get_session_info().is_ok()
                        {
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
                check(op.check_type, op.attributes, allow_export)?;
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

/// Finds an existing key on the token and mounts it into the key store.
fn mount(
    conn: &mut Connection,
    store: &mut KeyStore,
    existing: &ExistingKey,
) -> Result<(), String> {
    let key = KeyRef {
        id: existing.id.clone(),
        label: existing.label.clone(),
    };
    let key_id = key.encode();
    let describe = || {
        format!(
            "existing key \"{}\" of \"{}\" (label {:?}, id {})",
            existing.name,
            existing.application,
            existing.label.as_deref().unwrap_or("-"),
            existing
                .id
                .as_ref()
                .map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .unwrap_or_else(|| "-".into())
        )
    };
    let objects = conn
        .objects(&key_id)
        .map_err(|e| format!("{}: {}", describe(), e.cause))?;
    let attributes =
        attributes_of(conn, objects).map_err(|e| format!("{}: {}", describe(), e.cause))?;
    store
        .mount(
            KeyTriple::new(&existing.application, ProviderId::Pkcs11, &existing.name),
            KeyEntry { key_id, attributes },
        )
        .map_err(|e| format!("{}: {e}", describe()))?;
    log::info!(
        "pkcs11: {} mapped: {:?} of {} bits{}",
        describe(),
        attributes.key_type,
        attributes.bits,
        if existing.owned { ", owned" } else { "" }
    );
    Ok(())
}

/// A fresh CKA_ID from the token's random number generator, and the key's label.
fn new_key_ref(conn: &mut Connection, name: &str) -> Result<KeyRef, OpError> {
    let id = conn
        .session
        .generate_random_vec(ID_LEN as u32)
        .map_err(|e| conn.fail("C_GenerateRandom (key id)", e))?;
    Ok(KeyRef {
        id: Some(id),
        label: Some(name.to_string()),
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

/// The common attributes of a new key's objects.
fn common(key: &KeyRef, class: ObjectClass, key_type: KeyType) -> Vec<Attribute> {
    let mut template = key.template(class);
    template.extend([Attribute::Token(true), Attribute::KeyType(key_type)]);
    template
}

fn uses(attributes: &Attributes) -> (bool, bool) {
    let flags = attributes.policy.usage_flags;
    let sign =
        flags.sign_hash() || flags.verify_hash() || flags.sign_message() || flags.verify_message();
    let crypt = flags.encrypt() || flags.decrypt();
    (sign || !crypt, crypt)
}

fn private_common(key: &KeyRef, attributes: &Attributes, key_type: KeyType) -> Vec<Attribute> {
    let (sign, crypt) = uses(attributes);
    let exportable = attributes.policy.usage_flags.export();
    let mut template = common(key, ObjectClass::PRIVATE_KEY, key_type);
    template.extend([
        Attribute::Private(true),
        Attribute::Sensitive(!exportable),
        Attribute::Extractable(exportable),
        Attribute::Sign(sign),
        Attribute::Decrypt(crypt),
    ]);
    template
}

fn public_common(key: &KeyRef, attributes: &Attributes, key_type: KeyType) -> Vec<Attribute> {
    let (sign, crypt) = uses(attributes);
    let mut template = common(key, ObjectClass::PUBLIC_KEY, key_type);
    template.extend([
        Attribute::Private(false),
        Attribute::Verify(sign),
        Attribute::Encrypt(crypt),
    ]);
    template
}

/// Public and private templates for C_GenerateKeyPair.
fn templates(
    key: &KeyRef,
    attributes: &Attributes,
) -> Result<(Vec<Attribute>, Vec<Attribute>), OpError> {
    match attributes.key_type {
        Type::RsaKeyPair => {
            let mut public = public_common(key, attributes, KeyType::RSA);
            public.extend([
                Attribute::ModulusBits((attributes.bits as std::os::raw::c_ulong).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ]);
            Ok((public, private_common(key, attributes, KeyType::RSA)))
        }
        Type::EccKeyPair { curve_family } => {
            let (_, crypt) = uses(attributes);
            if crypt {
                return Err(not_supported("ECC keys for encryption".into()));
            }
            let mut public = public_common(key, attributes, KeyType::EC);
            public.push(Attribute::EcParams(
                ec_params(curve_family, attributes.bits)?.to_vec(),
            ));
            Ok((public, private_common(key, attributes, KeyType::EC)))
        }
        other => Err(not_supported(format!("generating {other:?}"))),
    }
}

/// Object templates for an import, and the attributes to record (bits read from the data).
fn import_templates(
    key: &KeyRef,
    attributes: &Attributes,
    data: &[u8],
) -> Result<(Attributes, Vec<Vec<Attribute>>), OpError> {
    let invalid = |what: &str| {
        OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("the key data is not {what}"),
            "PSA formats: RSA key pairs as PKCS#1 RSAPrivateKey DER, RSA public keys as RSAPublicKey DER, ECC key pairs as the private scalar, ECC public keys as 0x04||x||y",
        )
    };
    let mut attributes = *attributes;
    let check_bits = |attributes: &mut Attributes, bits: usize| {
        if attributes.bits != 0 && attributes.bits != bits {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInvalidArgument,
                format!(
                    "the attributes say {} bits, the key has {bits}",
                    attributes.bits
                ),
                "set bits to the key's size, or to 0",
            ));
        }
        attributes.bits = bits;
        Ok(())
    };
    match attributes.key_type {
        Type::RsaKeyPair => {
            let k = der::parse_rsa_private(data)
                .ok_or_else(|| invalid("a two-prime DER RSAPrivateKey"))?;
            check_bits(&mut attributes, k.modulus.len() * 8)?;
            let exponent = k.exponent.to_be_bytes().to_vec();
            let mut private = private_common(key, &attributes, KeyType::RSA);
            private.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(exponent.clone()),
                Attribute::PrivateExponent(k.private_exponent.to_vec()),
                Attribute::Prime1(k.prime1.to_vec()),
                Attribute::Prime2(k.prime2.to_vec()),
                Attribute::Exponent1(k.exponent1.to_vec()),
                Attribute::Exponent2(k.exponent2.to_vec()),
                Attribute::Coefficient(k.coefficient.to_vec()),
            ]);
            let mut public = public_common(key, &attributes, KeyType::RSA);
            public.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(exponent),
            ]);
            Ok((attributes, vec![private, public]))
        }
        Type::RsaPublicKey => {
            let k = der::parse_rsa_public(data).ok_or_else(|| invalid("a DER RSAPublicKey"))?;
            check_bits(&mut attributes, k.modulus.len() * 8)?;
            let mut public = public_common(key, &attributes, KeyType::RSA);
            public.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(k.exponent.to_be_bytes().to_vec()),
            ]);
            Ok((attributes, vec![public]))
        }
        Type::EccKeyPair { curve_family } => {
            let params = ec_params(curve_family, attributes.bits)?.to_vec();
            let (x, y) = ecc::public_point(attributes.bits, data)?;
            let mut private = private_common(key, &attributes, KeyType::EC);
            private.extend([
                Attribute::EcParams(params.clone()),
                Attribute::Value(data.to_vec()),
            ]);
            let mut public = public_common(key, &attributes, KeyType::EC);
            let point = [&[0x04][..], &x, &y].concat();
            public.extend([
                Attribute::EcParams(params),
                Attribute::EcPoint(der::to_octet_string(&point)),
            ]);
            Ok((attributes, vec![private, public]))
        }
        Type::EccPublicKey { curve_family } => {
            let params = ec_params(curve_family, attributes.bits)?.to_vec();
            let len = attributes.bits.div_ceil(8);
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return Err(invalid("an uncompressed point 0x04||x||y of this curve"));
            }
            let mut public = public_common(key, &attributes, KeyType::EC);
            public.extend([
                Attribute::EcParams(params),
                Attribute::EcPoint(der::to_octet_string(data)),
            ]);
            Ok((attributes, vec![public]))
        }
        other => Err(not_supported(format!("importing {other:?}"))),
    }
}

/// CKR_TEMPLATE_INCONSISTENT and friends do not say which attribute the token refuses: find
/// it by generating again without each optional attribute in turn (keys made while probing
/// are destroyed), and name it in the error.
fn name_refused_attribute(
    conn: &mut Connection,
    mut err: OpError,
    mechanism: &Mechanism,
    public: &[Attribute],
    private: &[Attribute],
) -> OpError {
    if !err.cause.contains("CKR_TEMPLATE_") && !err.cause.contains("CKR_ATTRIBUTE_") {
        return err;
    }
    let optional = |a: &Attribute| {
        matches!(
            a,
            Attribute::Sensitive(_)
                | Attribute::Extractable(_)
                | Attribute::Private(_)
                | Attribute::Sign(_)
                | Attribute::Decrypt(_)
                | Attribute::Verify(_)
                | Attribute::Encrypt(_)
                | Attribute::Label(_)
        )
    };
    for (which, template) in [("private", private), ("public", public)] {
        for (index, attribute) in template.iter().enumerate() {
            if !optional(attribute) {
                continue;
            }
            let without: Vec<Attribute> = template
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, a)| a.clone())
                .collect();
            let (pub_t, priv_t) = if which == "private" {
                (public, &without[..])
            } else {
                (&without[..], private)
            };
            if let Ok((a, b)) = conn.session.generate_key_pair(mechanism, pub_t, priv_t) {
                let _ = conn.session.destroy_object(a);
                let _ = conn.session.destroy_object(b);
                err.cause.push_str(&format!("; the token accepts the key without the {which} key's {:?}: that is the attribute it refuses", attribute.attribute_type()));
                return err;
            }
        }
    }
    err
}

fn export_public(
    conn: &mut Connection,
    handle: ObjectHandle,
    attributes: &Attributes,
) -> Result<Vec<u8>, OpError> {
    match attributes.key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            let values = conn
                .session
                .get_attributes(
                    handle,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(|e| conn.fail("reading the public key", e))?;
            let (mut modulus, mut exponent) = (Vec::new(), 65537);
            for value in values {
                match value {
                    Attribute::Modulus(m) => modulus = m,
                    Attribute::PublicExponent(e) => exponent = rsa_exponent(&e),
                    _ => {}
                }
            }
            Ok(der::rsa_public(&modulus, exponent))
        }
        _ => {
            let values = conn
                .session
                .get_attributes(handle, &[AttributeType::EcPoint])
                .map_err(|e| conn.fail("reading the public key", e))?;
            let raw_len = 1 + 2 * attributes.bits.div_ceil(8);
            for value in values {
                if let Attribute::EcPoint(point) = value {
                    if point.len() == raw_len && point[0] == 0x04 {
                        return Ok(point);
                    }
                    if let Some(inner) = der::octet_string(&point) {
                        return Ok(inner.to_vec());
                    }
                }
            }
            // A token that keeps no public object: the private object cannot give the point.
            Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{} gives no CKA_EC_POINT for this key", conn.token),
                "the token keeps no public key object for it: map the public key object (same label or CKA_ID) as well",
            ))
        }
    }
}

fn export_private(
    conn: &mut Connection,
    handle: ObjectHandle,
    attributes: &Attributes,
) -> Result<Zeroizing<Vec<u8>>, OpError> {
    match attributes.key_type {
        Type::RsaKeyPair => {
            let asked = [
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
                AttributeType::Prime2,
                AttributeType::Exponent1,
                AttributeType::Exponent2,
                AttributeType::Coefficient,
            ];
            let values = conn
                .session
                .get_attributes(handle, &asked)
                .map_err(|e| conn.fail("reading the private key", e))?;
            let mut parts: HashMap<AttributeType, Zeroizing<Vec<u8>>> = HashMap::new();
            let mut exponent = 65537;
            for value in values {
                let kind = value.attribute_type();
                match value {
                    Attribute::PublicExponent(e) => exponent = rsa_exponent(&e),
                    Attribute::Modulus(v)
                    | Attribute::PrivateExponent(v)
                    | Attribute::Prime1(v)
                    | Attribute::Prime2(v)
                    | Attribute::Exponent1(v)
                    | Attribute::Exponent2(v)
                    | Attribute::Coefficient(v) => {
                        parts.insert(kind, Zeroizing::new(v));
                    }
                    _ => {}
                }
            }
            let part = |t: AttributeType| parts.get(&t).map(|v| v.as_slice()).unwrap_or(&[]);
            Ok(Zeroizing::new(der::rsa_private(&der::RsaPrivate {
                modulus: part(AttributeType::Modulus),
                exponent,
                private_exponent: part(AttributeType::PrivateExponent),
                prime1: part(AttributeType::Prime1),
                prime2: part(AttributeType::Prime2),
                exponent1: part(AttributeType::Exponent1),
                exponent2: part(AttributeType::Exponent2),
                coefficient: part(AttributeType::Coefficient),
            })))
        }
        _ => {
            let values = conn
                .session
                .get_attributes(handle, &[AttributeType::Value])
                .map_err(|e| conn.fail("reading the private key", e))?;
            let len = attributes.bits.div_ceil(8);
            for value in values {
                if let Attribute::Value(scalar) = value {
                    let scalar = Zeroizing::new(scalar);
                    let mut out = Zeroizing::new(vec![0u8; len.saturating_sub(scalar.len())]);
                    out.extend_from_slice(&scalar);
                    return Ok(out);
                }
            }
            Err(OpError::new(
                ResponseStatus::PsaErrorNotPermitted,
                format!("{} does not reveal this key's value", conn.token),
                "the key is sensitive on the token",
            ))
        }
    }
}

impl Provider for Pkcs11Provider {
    fn id(&self) -> ProviderId {
        ProviderId::Pkcs11
    }

    fn info(&self) -> ProviderInfo {
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
        for handle in [objects.private, objects.public].into_iter().flatten() {
            conn.session
                .destroy_object(handle)
                .map_err(|e| conn.fail("C_DestroyObject", e))?;
        }
        Ok(())
    }
}
