//! What the software provider can do: the requests it serves (ListOpcodes) and which key
//! types, sizes and algorithms it can generate, import and use (CanDoCrypto, up-front checks).

use crate::error::OpError;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::psa_algorithm::{Algorithm, KeyAgreement};
use parsec_interface::operations::psa_key_attributes::{Attributes, EccFamily, Type};
use parsec_interface::requests::{Opcode, ResponseStatus};

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
    Opcode::PsaAsymmetricEncrypt,
    Opcode::PsaAsymmetricDecrypt,
    Opcode::PsaAeadEncrypt,
    Opcode::PsaAeadDecrypt,
    Opcode::PsaHashCompute,
    Opcode::PsaHashCompare,
    Opcode::PsaRawKeyAgreement,
    Opcode::PsaGenerateRandom,
    Opcode::CanDoCrypto,
];

fn unsupported(cause: String) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        cause,
        "the Mbed Crypto provider supports RSA 1024-4096, ECC secp-r1 (not 384)/secp-k1/brainpool/Curve25519, AES and ChaCha20 keys for signing, encryption, AEAD and raw key agreement",
    )
}

/// Whether the key type and size are ones this provider handles.
fn type_supported(key_type: Type, bits: usize) -> bool {
    match key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => (1024..=4096).contains(&bits) && bits % 8 == 0,
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            matches!(
                (curve_family, bits),
                // secp384r1 is absent: the Mbed TLS that psa-crypto-sys 0.12 builds answers
                // psa_generate_key for it with PSA_ERROR_INVALID_ARGUMENT (checked for every
                // curve and size: only secp-r1 384 and secp-k1 384 fail so).
                (EccFamily::SecpR1, 192 | 224 | 256 | 521)
                    | (EccFamily::SecpK1, 192 | 256)
                    | (EccFamily::BrainpoolPR1, 256 | 384 | 512)
                    // Curve448 is not built into this Mbed TLS (generate: NotSupported).
                    | (EccFamily::Montgomery, 255)
            )
        }
        Type::Aes => matches!(bits, 128 | 192 | 256),
        Type::Chacha20 => bits == 256,
        _ => false,
    }
}

pub fn check(check_type: CheckType, attributes: Attributes) -> Result<(), OpError> {
    let key_type = attributes.key_type;
    match check_type {
        CheckType::Derive => {
            return Err(unsupported(
                "key derivation is not offered by this provider".into(),
            ))
        }
        CheckType::Generate if key_type.is_public_key() => {
            return Err(unsupported(format!(
                "a public key ({key_type:?}) cannot be generated: generate the key pair"
            )))
        }
        _ => {}
    }
    // An import may leave the size to be read from the key data.
    let size_from_data = check_type == CheckType::Import && attributes.bits == 0;
    if !size_from_data && !type_supported(key_type, attributes.bits) {
        return Err(unsupported(format!(
            "{key_type:?} of {} bits is not supported",
            attributes.bits
        )));
    }
    if size_from_data && !type_supported(key_type, default_bits(key_type)) {
        return Err(unsupported(format!("{key_type:?} is not supported")));
    }
    let alg = attributes.policy.permitted_algorithms;
    match alg {
        Algorithm::None => Ok(()),
        Algorithm::AsymmetricSignature(_)
        | Algorithm::AsymmetricEncryption(_)
        | Algorithm::Aead(_)
        | Algorithm::KeyAgreement(KeyAgreement::Raw(_)) => {
            if attributes.is_compatible_with_alg(alg) {
                Ok(())
            } else {
                Err(unsupported(format!(
                    "{alg:?} cannot be used with {key_type:?}"
                )))
            }
        }
        _ => Err(unsupported(format!(
            "keys for {alg:?} are not supported by this provider"
        ))),
    }
}

/// A size valid for the type, used when an import leaves the size to the key data.
fn default_bits(key_type: Type) -> usize {
    match key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => 2048,
        Type::EccKeyPair { curve_family } | Type::EccPublicKey { curve_family } => {
            match curve_family {
                EccFamily::Montgomery => 255,
                _ => 256,
            }
        }
        _ => 256,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parsec_interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
    use parsec_interface::operations::psa_key_attributes::{Lifetime, Policy, UsageFlags};

    fn attrs(key_type: Type, bits: usize, alg: Algorithm) -> Attributes {
        Attributes {
            lifetime: Lifetime::Persistent,
            key_type,
            bits,
            policy: Policy {
                usage_flags: UsageFlags::default(),
                permitted_algorithms: alg,
            },
        }
    }

    #[test]
    fn ecdsa_p256_is_supported_and_p255_is_not() {
        let ecdsa = AsymmetricSignature::Ecdsa {
            hash_alg: Hash::Sha256.into(),
        }
        .into();
        let p = Type::EccKeyPair {
            curve_family: EccFamily::SecpR1,
        };
        assert!(check(CheckType::Generate, attrs(p, 256, ecdsa)).is_ok());
        assert!(check(CheckType::Generate, attrs(p, 255, ecdsa)).is_err());
        assert!(check(CheckType::Derive, attrs(p, 256, ecdsa)).is_err());
        // Mbed TLS (psa-crypto-sys 0.12) cannot generate secp384r1 keys: not offered.
        assert!(check(CheckType::Generate, attrs(p, 384, ecdsa)).is_err());
    }

    #[test]
    fn public_keys_cannot_be_generated_but_can_be_imported() {
        let t = Type::EccPublicKey {
            curve_family: EccFamily::SecpR1,
        };
        assert!(check(CheckType::Generate, attrs(t, 256, Algorithm::None)).is_err());
        assert!(check(CheckType::Import, attrs(t, 256, Algorithm::None)).is_ok());
    }

    #[test]
    fn algorithms_must_fit_the_key() {
        let rsa_sig = AsymmetricSignature::RsaPkcs1v15Sign {
            hash_alg: Hash::Sha256.into(),
        }
        .into();
        let ecc = Type::EccKeyPair {
            curve_family: EccFamily::SecpR1,
        };
        let err = check(CheckType::Use, attrs(ecc, 256, rsa_sig)).unwrap_err();
        assert_eq!(err.status, ResponseStatus::PsaErrorNotSupported);
        assert!(check(CheckType::Use, attrs(Type::RsaKeyPair, 2048, rsa_sig)).is_ok());
    }
}
