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

/// What the token says it can do: the mechanisms it lists, with their key sizes
/// (C_GetMechanismList, C_GetMechanismInfo), read once when the token is opened. A module
/// that answers neither is taken at this provider's own table (`known: false`).
#[derive(Clone, Default)]
pub(super) struct TokenCaps {
    known: bool,
    mechanisms: Vec<(MechanismType, (usize, usize))>,
}

/// The mechanisms the provider uses, by what their key sizes count (RSA and EC: bits; AES:
/// bytes, as the standard says).
const USED: &[MechanismType] = &[
    MechanismType::RSA_PKCS_KEY_PAIR_GEN,
    MechanismType::RSA_PKCS,
    MechanismType::RSA_PKCS_PSS,
    MechanismType::RSA_PKCS_OAEP,
    MechanismType::ECC_KEY_PAIR_GEN,
    MechanismType::ECDSA,
    MechanismType::ECDH1_DERIVE,
    MechanismType::AES_KEY_GEN,
    MechanismType::AES_GCM,
    MechanismType::SHA256,
];

impl TokenCaps {
    pub(super) fn read(pkcs11: &Pkcs11, slot: Slot) -> TokenCaps {
        // Only the mechanisms the token lists are asked about: tpm2-pkcs11 prints an error
        // on stderr for each one it is asked about and lacks.
        let Ok(list) = pkcs11.get_mechanism_list(slot) else {
            return TokenCaps::default();
        };
        let mut caps = TokenCaps {
            known: true,
            mechanisms: Vec::new(),
        };
        for mechanism in USED.iter().filter(|m| list.contains(m)) {
            let sizes = match pkcs11.get_mechanism_info(slot, *mechanism) {
                Ok(info) => (info.min_key_size(), info.max_key_size()),
                // Listed but not described: no size limit known.
                Err(_) => (0, 0),
            };
            caps.mechanisms.push((*mechanism, sizes));
        }
        caps
    }

    /// Whether the token lists the mechanism for a key of `bits` (None: it answered no list).
    fn offers(&self, mechanism: MechanismType, bits: usize) -> Result<(), String> {
        if !self.known {
            return Ok(());
        }
        let name = mechanism_name(mechanism);
        let Some(&(_, (min, max))) = self.mechanisms.iter().find(|(m, _)| *m == mechanism) else {
            return Err(format!(
                "the token does not list {name} (C_GetMechanismList)"
            ));
        };
        // AES sizes are in bytes; 0..0 means the module states no range.
        let size = if mechanism == MechanismType::AES_KEY_GEN || mechanism == MechanismType::AES_GCM
        {
            bits / 8
        } else {
            bits
        };
        if bits == 0 || (min == 0 && max == 0) || (min..=max).contains(&size) {
            return Ok(());
        }
        let unit = if size == bits { "bits" } else { "bytes" };
        Err(format!(
            "the token supports {name} with keys of {min}-{max} {unit} (C_GetMechanismInfo), not {size}"
        ))
    }

    /// The token's own answer to a check this provider's table passed: the mechanisms the
    /// key's generation and its algorithm need, at its size.
    pub(super) fn check(
        &self,
        check_type: CheckType,
        attributes: &Attributes,
    ) -> Result<(), OpError> {
        let bits = attributes.bits;
        let mut needed = Vec::new();
        if check_type == CheckType::Generate {
            needed.push(match attributes.key_type {
                Type::RsaKeyPair => MechanismType::RSA_PKCS_KEY_PAIR_GEN,
                Type::EccKeyPair { .. } => MechanismType::ECC_KEY_PAIR_GEN,
                Type::Aes => MechanismType::AES_KEY_GEN,
                _ => return Ok(()),
            });
        }
        if check_type != CheckType::Derive {
            needed.extend(match attributes.policy.permitted_algorithms {
                Algorithm::AsymmetricSignature(AsymmetricSignature::RsaPkcs1v15Sign { .. })
                | Algorithm::AsymmetricEncryption(AsymmetricEncryption::RsaPkcs1v15Crypt) => {
                    Some(MechanismType::RSA_PKCS)
                }
                Algorithm::AsymmetricSignature(AsymmetricSignature::RsaPss { .. }) => {
                    Some(MechanismType::RSA_PKCS_PSS)
                }
                Algorithm::AsymmetricEncryption(AsymmetricEncryption::RsaOaep { .. }) => {
                    Some(MechanismType::RSA_PKCS_OAEP)
                }
                Algorithm::AsymmetricSignature(AsymmetricSignature::Ecdsa { .. }) => {
                    Some(MechanismType::ECDSA)
                }
                Algorithm::KeyAgreement(_) => Some(MechanismType::ECDH1_DERIVE),
                Algorithm::Aead(_) => Some(MechanismType::AES_GCM),
                _ => None,
            });
        }
        for mechanism in needed {
            self.offers(mechanism, bits).map_err(|cause| {
                OpError::new(
                    ResponseStatus::PsaErrorNotSupported,
                    format!("{:?} of {bits} bits: {cause}", attributes.key_type),
                    "choose a key size and algorithm the token lists (pkcs11-tool --list-mechanisms shows them)",
                )
            })?;
        }
        Ok(())
    }
}

impl TokenCaps {
    fn lists(&self, mechanism: MechanismType) -> bool {
        self.mechanisms.iter().any(|(m, _)| *m == mechanism)
    }

    /// The requests of `OPCODES` the token has the mechanisms for (None: it listed none, so
    /// the table stands): AEAD needs CKM_AES_GCM, a key agreement CKM_ECDH1_DERIVE, hashing
    /// CKM_SHA256, asymmetric encryption CKM_RSA_PKCS or CKM_RSA_PKCS_OAEP.
    pub(super) fn opcodes(&self) -> Option<Vec<Opcode>> {
        if !self.known {
            return None;
        }
        let rsa_crypt =
            self.lists(MechanismType::RSA_PKCS) || self.lists(MechanismType::RSA_PKCS_OAEP);
        Some(
            OPCODES
                .iter()
                .copied()
                .filter(|opcode| match opcode {
                    Opcode::PsaAeadEncrypt | Opcode::PsaAeadDecrypt => {
                        self.lists(MechanismType::AES_GCM)
                    }
                    Opcode::PsaRawKeyAgreement => self.lists(MechanismType::ECDH1_DERIVE),
                    Opcode::PsaHashCompute | Opcode::PsaHashCompare => {
                        self.lists(MechanismType::SHA256)
                    }
                    Opcode::PsaAsymmetricEncrypt | Opcode::PsaAsymmetricDecrypt => rsa_crypt,
                    _ => true,
                })
                .collect(),
        )
    }
}

/// `CKM_RSA_PKCS_KEY_PAIR_GEN`: cryptoki prints the standard's names.
pub(super) fn mechanism_name(mechanism: MechanismType) -> String {
    mechanism.to_string()
}
