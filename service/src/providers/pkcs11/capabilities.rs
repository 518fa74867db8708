//! What the PKCS#11 provider can do: the requests it serves (ListOpcodes) and what it can
//! generate, import and use (CanDoCrypto and the up-front checks).

use super::*;

/// What ListOpcodes answers for this provider: the requests it serves.
pub(crate) const OPCODES: &[Opcode] = &[
    Opcode::PsaGenerateKey,
    Opcode::PsaImportKey,
    Opcode::PsaExportKey,
    Opcode::PsaExportPublicKey,
    Opcode::PsaDestroyKey,
    Opcode::PsaSignHash,
    Opcode::PsaVerifyHash,
    Opcode::PsaSignMessage,
    Opcode::PsaVerifyMessage,
    Opcode::PsaRawKeyAgreement,
    Opcode::PsaHashCompute,
    Opcode::PsaHashCompare,
    Opcode::PsaAeadEncrypt,
    Opcode::PsaAeadDecrypt,
    Opcode::PsaAsymmetricEncrypt,
    Opcode::PsaAsymmetricDecrypt,
    Opcode::PsaGenerateRandom,
    Opcode::CanDoCrypto,
];

/// The key types and sizes the provider asks tokens for (0 bits: an import's size comes
/// from its data).
pub(super) fn size_ok(check_type: CheckType, attributes: Attributes) -> bool {
    match attributes.key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            (check_type == CheckType::Import && attributes.bits == 0)
                || ((1024..=4096).contains(&attributes.bits) && attributes.bits % 8 == 0)
        }
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            ec_params(curve_family, attributes.bits).is_ok()
        }
        // AES for AEAD (CKM_AES_GCM), beyond upstream 1.5.0.
        Type::Aes => matches!(attributes.bits, 128 | 192 | 256),
        _ => false,
    }
}

/// What this provider can generate, import and use (CanDoCrypto and up-front checks).
pub(super) fn check(
    check_type: CheckType,
    attributes: Attributes,
    allow_export: bool,
) -> Result<(), OpError> {
    let key_type = attributes.key_type;
    if !size_ok(check_type, attributes) {
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
            // The hash must be one the signature can be made with: a DigestInfo prefix for
            // PKCS#1 v1.5 (SHA-1, SHA-2; not RIPEMD-160 or SHA-3), a PKCS#11 hash and MGF for
            // PSS; ECDSA signs whatever digest it is given.
            let hash_ok = |hash: SignHash, ok: &dyn Fn(Hash) -> bool| match hash {
                SignHash::Specific(h) => ok(h),
                SignHash::Any => true,
            };
            let supported = match sig {
                AsymmetricSignature::RsaPkcs1v15Sign { hash_alg } => {
                    hash_ok(hash_alg, &|h| digest_info(h).is_some())
                }
                AsymmetricSignature::RsaPss { hash_alg } => {
                    hash_ok(hash_alg, &|h| hash_mechanism(h).is_ok())
                }
                AsymmetricSignature::Ecdsa { .. } => true,
                _ => false,
            };
            if !supported {
                return Err(not_supported(format!("signature algorithm {sig:?}")));
            }
        }
        Algorithm::AsymmetricEncryption(AsymmetricEncryption::RsaOaep { hash_alg }) => {
            hash_mechanism(hash_alg)?;
        }
        Algorithm::AsymmetricEncryption(_) | Algorithm::None => {}
        // Raw ECDH (CKM_ECDH1_DERIVE), on ECC key pairs (compatible_with_alg below).
        Algorithm::KeyAgreement(KeyAgreement::Raw(RawKeyAgreement::Ecdh)) => {}
        // AES-GCM; CCM has no mechanism parameters in this cryptoki (0.8).
        Algorithm::Aead(aead) => {
            aead::gcm_tag_len(aead)?;
        }
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
