//! What the TPM provider can do: the requests it serves (ListOpcodes) and one table of key
//! types, sizes and algorithms (CanDoCrypto and the up-front checks).

use super::*;

/// What ListOpcodes answers for this provider: the requests it serves.
pub(crate) const OPCODES: &[Opcode] = &[
    Opcode::PsaGenerateKey,
    Opcode::PsaImportKey,
    Opcode::PsaExportPublicKey,
    Opcode::PsaDestroyKey,
    Opcode::PsaSignHash,
    Opcode::PsaVerifyHash,
    Opcode::PsaSignMessage,
    Opcode::PsaVerifyMessage,
    Opcode::PsaRawKeyAgreement,
    Opcode::PsaAsymmetricEncrypt,
    Opcode::PsaAsymmetricDecrypt,
    Opcode::PsaGenerateRandom,
    Opcode::CanDoCrypto,
    Opcode::PrepareKeyAttestation,
    Opcode::AttestKey,
];

/// The key types and sizes the TPM holds (0 bits: an import's size comes from its data).
pub(super) fn size_ok(check_type: CheckType, attributes: Attributes) -> bool {
    match attributes.key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            (check_type == CheckType::Import && attributes.bits == 0)
                || keys::rsa_bits(attributes.bits).is_ok()
        }
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            keys::curve(curve_family, attributes.bits).is_ok()
        }
        _ => false,
    }
}

/// What this provider can generate, import and use (CanDoCrypto and up-front checks).
pub(super) fn check(check_type: CheckType, attributes: Attributes) -> Result<(), OpError> {
    let key_type = attributes.key_type;
    if !size_ok(check_type, attributes) {
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
    let flags = attributes.policy.usage_flags;
    if flags.sign_hash()
        || flags.verify_hash()
        || flags.sign_message()
        || flags.verify_message()
        || flags.encrypt()
        || flags.decrypt()
        || flags.derive()
    {
        use parsec_interface::operations::psa_algorithm::{
            Algorithm, KeyAgreement, RawKeyAgreement,
        };
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
            // TPM2_ECDH_ZGen, on ECC key pairs (compatible_with_alg below).
            Algorithm::KeyAgreement(KeyAgreement::Raw(RawKeyAgreement::Ecdh)) => {}
            other => return Err(keys::not_supported(format!("algorithm {other:?}"))),
        }
        // No algorithm yet (PSA allows it): nothing to fit.
        if alg != Algorithm::None {
            attributes.compatible_with_alg(alg).map_err(|e| {
                OpError::new(
                    ResponseStatus::from(e),
                    format!("{alg:?} does not fit a {key_type:?}"),
                    "choose an algorithm for this key type",
                )
            })?;
        }
    }
    Ok(())
}
