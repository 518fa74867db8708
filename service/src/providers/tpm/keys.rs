//! Translation between PSA and the TPM: key templates from PSA attributes, PSA key formats
//! from TPM public areas, and signatures both ways. Pure functions, no TPM calls.

use crate::error::OpError;
use crate::providers::{der, ecc};
use parsec_interface::operations::psa_algorithm::{
    AsymmetricEncryption, AsymmetricSignature, Hash, SignHash,
};
use parsec_interface::operations::psa_key_attributes::{Attributes, EccFamily, Type};
use parsec_interface::requests::ResponseStatus;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Auth, Digest, EccParameter, EccPoint, EccScheme, EccSignature, HashScheme,
    KeyDerivationFunctionScheme, PrivateKeyRsa, Public, PublicBuilder, PublicEccParameters,
    PublicKeyRsa, PublicRsaParametersBuilder, RsaDecryptionScheme, RsaExponent, RsaScheme,
    RsaSignature, Sensitive, Signature, SignatureScheme, SymmetricDefinitionObject,
};

pub fn not_supported(cause: String) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        cause,
        "the TPM provider supports RSA 1024-4096 (usually 2048) and ECC secp-r1 256/384 keys for signing (PKCS#1 v1.5, PSS, ECDSA) and RSA encryption (PKCS#1 v1.5, OAEP)",
    )
}

fn invalid(cause: impl Into<String>, hint: &'static str) -> OpError {
    OpError::new(ResponseStatus::PsaErrorInvalidArgument, cause, hint)
}

// SHA-1 is deprecated in PSA but still a TPM hash; the key's policy decides whether it is used.
#[allow(deprecated)]
pub fn tpm_hash(hash: Hash) -> Result<HashingAlgorithm, OpError> {
    match hash {
        Hash::Sha1 => Ok(HashingAlgorithm::Sha1),
        Hash::Sha256 => Ok(HashingAlgorithm::Sha256),
        Hash::Sha384 => Ok(HashingAlgorithm::Sha384),
        Hash::Sha512 => Ok(HashingAlgorithm::Sha512),
        other => Err(not_supported(format!(
            "hash {other:?} is not offered by TPMs"
        ))),
    }
}

fn sign_hash(hash: SignHash) -> Result<HashingAlgorithm, OpError> {
    match hash {
        SignHash::Specific(hash) => tpm_hash(hash),
        SignHash::Any => Err(invalid(
            "the operation names SignHash::Any",
            "a signature names one hash algorithm; Any only belongs in a key policy",
        )),
    }
}

pub fn curve(family: EccFamily, bits: usize) -> Result<EccCurve, OpError> {
    match (family, bits) {
        (EccFamily::SecpR1, 256) => Ok(EccCurve::NistP256),
        (EccFamily::SecpR1, 384) => Ok(EccCurve::NistP384),
        (EccFamily::SecpR1, 521) => Ok(EccCurve::NistP521),
        _ => Err(not_supported(format!(
            "ECC curve {family:?} with {bits} bits is not offered by this provider"
        ))),
    }
}

pub fn rsa_bits(bits: usize) -> Result<RsaKeyBits, OpError> {
    match bits {
        1024 => Ok(RsaKeyBits::Rsa1024),
        2048 => Ok(RsaKeyBits::Rsa2048),
        3072 => Ok(RsaKeyBits::Rsa3072),
        4096 => Ok(RsaKeyBits::Rsa4096),
        _ => Err(not_supported(format!("RSA keys of {bits} bits"))),
    }
}

/// The byte length of one coordinate (or scalar) on a curve.
pub fn field_len(bits: usize) -> usize {
    bits.div_ceil(8)
}

/// What a key may do in the TPM, from its PSA usage flags.
struct Uses {
    sign: bool,
    decrypt: bool,
    /// Raw ECDH (TPM2_ECDH_ZGen needs a decryption key).
    derive: bool,
}

fn uses(attributes: &Attributes) -> Uses {
    let flags = attributes.policy.usage_flags;
    let sign =
        flags.sign_hash() || flags.verify_hash() || flags.sign_message() || flags.verify_message();
    let derive = flags.derive();
    let decrypt = flags.encrypt() || flags.decrypt() || derive;
    // A key with no use at all is still created as a signing key, as an inert object.
    Uses {
        sign: sign || !decrypt,
        decrypt,
        derive,
    }
}

/// Where the private part of a key came from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Generated inside the TPM: it can never leave it.
    Generated,
    /// Imported: the TPM requires such objects not to claim they were made inside it.
    Imported,
    /// A public key only.
    PublicOnly,
}

/// The public area (template) of a key with these attributes; `unique` is the public key
/// for imports, empty for generation.
pub fn template(
    attributes: &Attributes,
    origin: Origin,
    unique: Unique,
) -> Result<Public, OpError> {
    let uses = uses(attributes);
    let inside = origin == Origin::Generated;
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(inside)
        .with_fixed_parent(inside)
        .with_sensitive_data_origin(inside)
        .with_user_with_auth(true)
        // Keys have an empty authorisation (the service alone reaches them): dictionary-
        // attack protection guards nothing, and would lock every key out after a few power
        // cuts (each unorderly shutdown counts as a failed try). Found by the power-cut test.
        .with_no_da(true)
        .with_sign_encrypt(uses.sign)
        .with_decrypt(uses.decrypt)
        .with_restricted(false)
        .build()
        .map_err(|e| tss_wrapper("building the key's attributes", e))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(object_attributes);
    let built = match attributes.key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            let (modulus, exponent) = match unique {
                Unique::Rsa { modulus, exponent } => (modulus, exponent),
                Unique::None => (Vec::new(), 0),
                Unique::Ecc { .. } => {
                    return Err(invalid("an ECC point for an RSA key", "check the key data"))
                }
            };
            let exponent = if exponent == 65537 { 0 } else { exponent };
            let parameters = PublicRsaParametersBuilder::new()
                .with_scheme(RsaScheme::Null)
                .with_key_bits(rsa_bits(attributes.bits)?)
                .with_exponent(
                    RsaExponent::create(exponent).map_err(|e| tss_wrapper("RSA exponent", e))?,
                )
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_is_signing_key(uses.sign)
                .with_is_decryption_key(uses.decrypt)
                .with_restricted(false)
                .build()
                .map_err(|e| tss_wrapper("building the RSA parameters", e))?;
            builder
                .with_public_algorithm(PublicAlgorithm::Rsa)
                .with_rsa_parameters(parameters)
                .with_rsa_unique_identifier(
                    PublicKeyRsa::try_from(modulus).map_err(|e| tss_wrapper("RSA modulus", e))?,
                )
                .build()
        }
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            if uses.decrypt && !uses.derive {
                return Err(not_supported("ECC keys for encryption".into()));
            }
            let point = match unique {
                Unique::Ecc { x, y } => EccPoint::new(
                    EccParameter::try_from(x).map_err(|e| tss_wrapper("ECC x", e))?,
                    EccParameter::try_from(y).map_err(|e| tss_wrapper("ECC y", e))?,
                ),
                Unique::None => EccPoint::default(),
                Unique::Rsa { .. } => {
                    return Err(invalid(
                        "an RSA modulus for an ECC key",
                        "check the key data",
                    ))
                }
            };
            // Built directly: tss-esapi's builder insists on a signing scheme, while the TPM
            // accepts TPM_ALG_NULL, which lets each signature name its hash.
            let parameters = PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::Null,
                curve(curve_family, attributes.bits)?,
                KeyDerivationFunctionScheme::Null,
            );
            builder
                .with_public_algorithm(PublicAlgorithm::Ecc)
                .with_ecc_parameters(parameters)
                .with_ecc_unique_identifier(point)
                .build()
        }
        other => return Err(not_supported(format!("key type {other:?}"))),
    };
    built.map_err(|e| tss_wrapper("building the key template", e))
}

/// The public key of a template.
pub enum Unique {
    None,
    Rsa { modulus: Vec<u8>, exponent: u32 },
    Ecc { x: Vec<u8>, y: Vec<u8> },
}

/// An imported key: its public area and, for key pairs, its sensitive area.
pub struct Imported {
    pub public: Public,
    pub sensitive: Option<Sensitive>,
}

const BAD_DATA: &str = "PSA formats: RSA key pairs as PKCS#1 RSAPrivateKey DER, RSA public keys as PKCS#1 RSAPublicKey DER, ECC public keys as 0x04||x||y, ECC key pairs as the private scalar";

/// Reads key data in the PSA import formats.
pub fn import(attributes: &Attributes, data: &[u8]) -> Result<Imported, OpError> {
    let bad = |what: &str| invalid(format!("the key data is not {what}"), BAD_DATA);
    let bits_match = |actual: usize| attributes.bits == 0 || attributes.bits == actual;
    match attributes.key_type {
        Type::RsaPublicKey => {
            let key = der::parse_rsa_public(data).ok_or_else(|| bad("a DER RSAPublicKey"))?;
            let mut attributes = *attributes;
            if !bits_match(key.modulus.len() * 8) {
                return Err(invalid(
                    format!(
                        "the attributes say {} bits, the key has {}",
                        attributes.bits,
                        key.modulus.len() * 8
                    ),
                    "set bits to the key's size, or to 0",
                ));
            }
            attributes.bits = key.modulus.len() * 8;
            let unique = Unique::Rsa {
                modulus: key.modulus.to_vec(),
                exponent: key.exponent,
            };
            Ok(Imported {
                public: template(&attributes, Origin::PublicOnly, unique)?,
                sensitive: None,
            })
        }
        Type::RsaKeyPair => {
            let key =
                der::parse_rsa_private(data).ok_or_else(|| bad("a two-prime DER RSAPrivateKey"))?;
            let bits = key.modulus.len() * 8;
            if !bits_match(bits) {
                return Err(invalid(
                    format!(
                        "the attributes say {} bits, the key has {bits}",
                        attributes.bits
                    ),
                    "set bits to the key's size, or to 0",
                ));
            }
            let mut attributes = *attributes;
            attributes.bits = bits;
            let unique = Unique::Rsa {
                modulus: key.modulus.to_vec(),
                exponent: key.exponent,
            };
            let public = template(&attributes, Origin::Imported, unique)?;
            let sensitive = Sensitive::Rsa {
                auth_value: Auth::default(),
                seed_value: Digest::default(),
                sensitive: PrivateKeyRsa::try_from(key.prime1.to_vec())
                    .map_err(|e| tss_wrapper("RSA prime", e))?,
            };
            Ok(Imported {
                public,
                sensitive: Some(sensitive),
            })
        }
        Type::EccPublicKey { .. } => {
            let len = field_len(attributes.bits);
            if attributes.bits == 0 || data.len() != 1 + 2 * len || data[0] != 0x04 {
                return Err(invalid(
                    format!("{} bytes of ECC public key data for {} bits", data.len(), attributes.bits),
                    "an ECC public key is imported as the uncompressed point 0x04||x||y with bits set to the curve size",
                ));
            }
            let unique = Unique::Ecc {
                x: data[1..1 + len].to_vec(),
                y: data[1 + len..].to_vec(),
            };
            Ok(Imported {
                public: template(attributes, Origin::PublicOnly, unique)?,
                sensitive: None,
            })
        }
        Type::EccKeyPair { curve_family } => {
            // PSA gives the private scalar only; the TPM needs the public point too and will
            // not compute it (TPM_RC_BINDING), so it is computed here.
            curve(curve_family, attributes.bits)?;
            let (x, y) = ecc::public_point(attributes.bits, data)?;
            let unique = Unique::Ecc { x, y };
            let public = template(attributes, Origin::Imported, unique)?;
            let sensitive = Sensitive::Ecc {
                auth_value: Auth::default(),
                seed_value: Digest::default(),
                sensitive: EccParameter::try_from(data.to_vec())
                    .map_err(|e| tss_wrapper("ECC private key", e))?,
            };
            Ok(Imported {
                public,
                sensitive: Some(sensitive),
            })
        }
        other => Err(not_supported(format!("key type {other:?}"))),
    }
}

/// A key's public part in the PSA export format.
pub fn export_public(public: &Public) -> Result<Vec<u8>, OpError> {
    match public {
        Public::Rsa {
            unique, parameters, ..
        } => {
            let exponent = match parameters.exponent().value() {
                0 => 65537,
                e => e,
            };
            Ok(der::rsa_public(unique.value(), exponent))
        }
        Public::Ecc {
            unique, parameters, ..
        } => {
            let len = match parameters.ecc_curve() {
                EccCurve::NistP256 => 32,
                EccCurve::NistP384 => 48,
                EccCurve::NistP521 => 66,
                other => return Err(not_supported(format!("curve {other:?}"))),
            };
            let mut out = Vec::with_capacity(1 + 2 * len);
            out.push(0x04);
            out.extend_from_slice(&left_pad(unique.x().value(), len)?);
            out.extend_from_slice(&left_pad(unique.y().value(), len)?);
            Ok(out)
        }
        _ => Err(not_supported(
            "a public area that is neither RSA nor ECC".into(),
        )),
    }
}

fn left_pad(value: &[u8], len: usize) -> Result<Vec<u8>, OpError> {
    if value.len() > len {
        return Err(OpError::new(
            ResponseStatus::PsaErrorCorruptionDetected,
            format!("a {}-byte coordinate for a {len}-byte field", value.len()),
            "the TPM returned a malformed value",
        ));
    }
    let mut out = vec![0; len - value.len()];
    out.extend_from_slice(value);
    Ok(out)
}

/// The coordinate length of an ECC key's curve, from its public area.
pub fn ecc_field_len(public: &Public) -> Option<usize> {
    match public {
        Public::Ecc { parameters, .. } => match parameters.ecc_curve() {
            EccCurve::NistP256 => Some(32),
            EccCurve::NistP384 => Some(48),
            EccCurve::NistP521 => Some(66),
            _ => None,
        },
        _ => None,
    }
}

pub fn signature_scheme(alg: AsymmetricSignature) -> Result<SignatureScheme, OpError> {
    match alg {
        AsymmetricSignature::RsaPkcs1v15Sign { hash_alg } => Ok(SignatureScheme::RsaSsa {
            hash_scheme: HashScheme::new(sign_hash(hash_alg)?),
        }),
        AsymmetricSignature::RsaPss { hash_alg } => Ok(SignatureScheme::RsaPss {
            hash_scheme: HashScheme::new(sign_hash(hash_alg)?),
        }),
        AsymmetricSignature::Ecdsa { hash_alg } => Ok(SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(sign_hash(hash_alg)?),
        }),
        other => Err(not_supported(format!("signature algorithm {other:?}"))),
    }
}

/// A TPM signature in PSA's format: the RSA signature, or r||s for ECDSA.
pub fn signature_bytes(signature: Signature, field: Option<usize>) -> Result<Vec<u8>, OpError> {
    match signature {
        Signature::RsaSsa(sig) | Signature::RsaPss(sig) => Ok(sig.signature().value().to_vec()),
        Signature::EcDsa(sig) => {
            let len = field.unwrap_or(0);
            let mut out = left_pad(sig.signature_r().value(), len)?;
            out.extend_from_slice(&left_pad(sig.signature_s().value(), len)?);
            Ok(out)
        }
        other => Err(OpError::new(
            ResponseStatus::PsaErrorGenericError,
            format!("the TPM returned a {:?} signature", other.algorithm()),
            "report this as a bug",
        )),
    }
}

/// A PSA signature as a TPM structure, for TPM2_VerifySignature.
pub fn signature_from(
    alg: AsymmetricSignature,
    bytes: &[u8],
    field: Option<usize>,
) -> Result<Signature, OpError> {
    let bad_size = || {
        OpError::new(
            ResponseStatus::PsaErrorInvalidSignature,
            format!(
                "a {}-byte signature cannot be one of this key's",
                bytes.len()
            ),
            "the signature does not match the key's size",
        )
    };
    match signature_scheme(alg)? {
        SignatureScheme::RsaSsa { hash_scheme } | SignatureScheme::RsaPss { hash_scheme } => {
            let sig = RsaSignature::create(
                hash_scheme.hashing_algorithm(),
                PublicKeyRsa::try_from(bytes.to_vec()).map_err(|_| bad_size())?,
            )
            .map_err(|_| bad_size())?;
            Ok(if matches!(alg, AsymmetricSignature::RsaPss { .. }) {
                Signature::RsaPss(sig)
            } else {
                Signature::RsaSsa(sig)
            })
        }
        SignatureScheme::EcDsa { hash_scheme } => {
            let len = field.unwrap_or(0);
            if len == 0 || bytes.len() != 2 * len {
                return Err(bad_size());
            }
            let (r, s) = bytes.split_at(len);
            let sig = EccSignature::create(
                hash_scheme.hashing_algorithm(),
                EccParameter::try_from(r.to_vec()).map_err(|_| bad_size())?,
                EccParameter::try_from(s.to_vec()).map_err(|_| bad_size())?,
            )
            .map_err(|_| bad_size())?;
            Ok(Signature::EcDsa(sig))
        }
        _ => Err(not_supported(format!("signature algorithm {alg:?}"))),
    }
}

pub fn decryption_scheme(alg: AsymmetricEncryption) -> Result<RsaDecryptionScheme, OpError> {
    match alg {
        AsymmetricEncryption::RsaPkcs1v15Crypt => Ok(RsaDecryptionScheme::RsaEs),
        AsymmetricEncryption::RsaOaep { hash_alg } => Ok(RsaDecryptionScheme::Oaep(
            HashScheme::new(tpm_hash(hash_alg)?),
        )),
    }
}

/// Errors of tss-esapi's own checks (sizes of buffers, builder rules): the input was wrong.
pub fn tss_wrapper(context: &str, err: tss_esapi::Error) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorInvalidArgument,
        format!("{context}: {err}"),
        "a value does not fit the TPM's structures: check key sizes and data lengths",
    )
}
