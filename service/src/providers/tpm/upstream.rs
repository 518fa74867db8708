//! Keys upstream Parsec 1.4/1.5 made in the TPM, read from its key store.
//!
//! Upstream's TPM provider keeps each key as bincode of `{ context: TpmsContext, auth_value,
//! key_material: { public, private } }` (tss-esapi's transient key context): the wrapped
//! private area, the bare public key (an RSA modulus or an ECC point) and a 32-byte
//! authorisation value. Its parent is upstream's root key, an RSA-2048 restricted decryption
//! primary of the owner hierarchy whose symmetric scheme is AES-256-CFB, or AES-128-CFB on a
//! TPM without AES-256 (what upstream tests with TPM2_TestParms). A primary is derived from
//! the hierarchy's seed and its template alone, so making the same template again gives the
//! same key on the same TPM, under which upstream's private areas load (they are fixedTPM:
//! they cannot be wrapped anew). The key's public area is rebuilt from its PSA attributes,
//! as upstream's transient context builds it, with the stored public key as its unique field.

use super::keys;
use crate::error::OpError;
use parsec_interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, SignHash,
};
use parsec_interface::operations::psa_key_attributes::{Attributes, Type};
use parsec_interface::requests::ResponseStatus;
use serde::Deserialize;
use tss_esapi::abstraction::transient::KeyMaterial;
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::structures::{
    Auth, EccPoint, EccScheme, HashScheme, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent, RsaScheme,
    SymmetricDefinitionObject,
};
use tss_esapi::utils::{PublicKey, TpmsContext};

/// Upstream's key store entry for a TPM key, as its TPM provider serialises it.
#[derive(Deserialize)]
struct PasswordContext {
    /// Kept by upstream for its own older entries; not needed to load the key.
    _context: TpmsContext,
    auth_value: Vec<u8>,
    key_material: KeyMaterial,
}

/// An upstream key, ready to load under upstream's primary.
pub(super) struct UpstreamKey {
    pub(super) public: Public,
    pub(super) private: Private,
    pub(super) auth: Auth,
}

fn damaged(what: impl std::fmt::Display) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorCorruptionDetected,
        format!("upstream Parsec's TPM key entry cannot be read: {what}"),
        "the entry in upstream's key store is damaged or of another version: restore it from a backup",
    )
}

/// Reads an upstream entry's key id (after this store's one-byte marker) with the key's
/// attributes.
pub(super) fn decode(bytes: &[u8], attributes: &Attributes) -> Result<UpstreamKey, OpError> {
    let entry: PasswordContext = bincode::deserialize(bytes).map_err(damaged)?;
    let auth = Auth::try_from(entry.auth_value.clone()).map_err(damaged)?;
    let private = Private::try_from(entry.key_material.private().to_vec()).map_err(damaged)?;
    let public = public_area(attributes, entry.key_material.public())?;
    Ok(UpstreamKey {
        public,
        private,
        auth,
    })
}

/// Upstream's parent key, made again: its template (tss-esapi's restricted decryption RSA
/// key) with the cipher upstream picked for this TPM.
pub(super) fn primary_template(cipher: SymmetricDefinitionObject) -> Result<Public, OpError> {
    tss_esapi::utils::create_restricted_decryption_rsa_public(
        cipher,
        RsaKeyBits::Rsa2048,
        RsaExponent::ZERO_EXPONENT,
    )
    .map_err(|e| keys::tss_wrapper("upstream's primary key template", e))
}

/// The ciphers upstream tries for its primary, in its order.
pub(super) const CIPHERS: [SymmetricDefinitionObject; 2] = [
    SymmetricDefinitionObject::AES_256_CFB,
    SymmetricDefinitionObject::AES_128_CFB,
];

fn hash_of(hash: SignHash) -> Result<HashingAlgorithm, OpError> {
    match hash {
        SignHash::Specific(hash) => keys::tpm_hash(hash),
        SignHash::Any => Err(keys::not_supported(
            "an upstream TPM key with a wildcard hash, which upstream could not make".into(),
        )),
    }
}

/// The key's public area as upstream's transient context builds it from the key's
/// parameters (its attributes), with the stored public key as the unique field.
fn public_area(attributes: &Attributes, key: &PublicKey) -> Result<Public, OpError> {
    let wrapper = |e| keys::tss_wrapper("rebuilding upstream's public area", e);
    let alg = attributes.policy.permitted_algorithms;
    let (algorithm, decrypt) = match (attributes.key_type, alg) {
        (Type::RsaKeyPair, Algorithm::AsymmetricEncryption(_)) => (PublicAlgorithm::Rsa, true),
        (Type::RsaKeyPair, _) => (PublicAlgorithm::Rsa, false),
        (Type::EccKeyPair { .. }, _) => (PublicAlgorithm::Ecc, false),
        (other, _) => {
            return Err(keys::not_supported(format!(
                "an upstream TPM key of type {other:?}"
            )))
        }
    };
    let object_attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_decrypt(decrypt)
        .with_sign_encrypt(true)
        .with_restricted(false)
        .build()
        .map_err(wrapper)?;
    let builder = PublicBuilder::new()
        .with_public_algorithm(algorithm)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(object_attributes);
    let builder = match (attributes.key_type, key) {
        (Type::RsaKeyPair, PublicKey::Rsa(modulus)) => {
            // Only a signing scheme goes into the public area; decryption schemes are
            // given with each TPM2_RSA_Decrypt (upstream's RsaEs and Oaep: Null here).
            let scheme = match alg {
                Algorithm::AsymmetricSignature(AsymmetricSignature::RsaPkcs1v15Sign {
                    hash_alg,
                }) => RsaScheme::RsaSsa(HashScheme::new(hash_of(hash_alg)?)),
                Algorithm::AsymmetricSignature(AsymmetricSignature::RsaPss { hash_alg }) => {
                    RsaScheme::RsaPss(HashScheme::new(hash_of(hash_alg)?))
                }
                Algorithm::AsymmetricEncryption(
                    AsymmetricEncryption::RsaPkcs1v15Crypt | AsymmetricEncryption::RsaOaep { .. },
                ) => RsaScheme::Null,
                other => {
                    return Err(keys::not_supported(format!(
                        "an upstream RSA TPM key for {other:?}"
                    )))
                }
            };
            builder
                .with_rsa_parameters(
                    PublicRsaParametersBuilder::new()
                        .with_scheme(scheme)
                        .with_key_bits(keys::rsa_bits(attributes.bits)?)
                        .with_exponent(RsaExponent::ZERO_EXPONENT)
                        .with_is_signing_key(true)
                        .with_is_decryption_key(decrypt)
                        .with_restricted(false)
                        .build()
                        .map_err(wrapper)?,
                )
                .with_rsa_unique_identifier(
                    PublicKeyRsa::try_from(modulus.clone()).map_err(wrapper)?,
                )
        }
        (Type::EccKeyPair { curve_family }, PublicKey::Ecc { x, y }) => {
            let scheme = match alg {
                Algorithm::AsymmetricSignature(AsymmetricSignature::Ecdsa { hash_alg }) => {
                    EccScheme::EcDsa(HashScheme::new(hash_of(hash_alg)?))
                }
                other => {
                    return Err(keys::not_supported(format!(
                        "an upstream ECC TPM key for {other:?}"
                    )))
                }
            };
            let curve = keys::curve(curve_family, attributes.bits)?;
            let point = EccPoint::new(
                x.clone().try_into().map_err(wrapper)?,
                y.clone().try_into().map_err(wrapper)?,
            );
            builder
                .with_ecc_parameters(
                    PublicEccParametersBuilder::new_unrestricted_signing_key(scheme, curve)
                        .build()
                        .map_err(wrapper)?,
                )
                .with_ecc_unique_identifier(point)
        }
        _ => return Err(damaged("its public key is not of its attributes' type")),
    };
    builder.build().map_err(wrapper)
}
