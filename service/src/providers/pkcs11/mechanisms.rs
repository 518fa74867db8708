//! PSA algorithms as PKCS#11 mechanisms: signatures (with DigestInfo for CKM_RSA_PKCS), OAEP and PKCS#1 encryption, curve OIDs.

use super::*;

/// DigestInfo prefixes (RFC 8017, 9.2 note 1): CKM_RSA_PKCS signs DigestInfo || hash.
pub(super) fn digest_info(hash: Hash) -> Option<&'static [u8]> {
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
pub(super) fn hash_mechanism(hash: Hash) -> Result<(MechanismType, PkcsMgfType), OpError> {
    match hash {
        Hash::Sha1 => Ok((MechanismType::SHA1, PkcsMgfType::MGF1_SHA1)),
        Hash::Sha224 => Ok((MechanismType::SHA224, PkcsMgfType::MGF1_SHA224)),
        Hash::Sha256 => Ok((MechanismType::SHA256, PkcsMgfType::MGF1_SHA256)),
        Hash::Sha384 => Ok((MechanismType::SHA384, PkcsMgfType::MGF1_SHA384)),
        Hash::Sha512 => Ok((MechanismType::SHA512, PkcsMgfType::MGF1_SHA512)),
        other => Err(not_supported(format!("hash {other:?}"))),
    }
}

pub(super) fn not_supported(cause: String) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        cause,
        "the PKCS#11 provider supports RSA 1024-4096 and ECC secp-r1 256/384/521 keys for signing (PKCS#1 v1.5, PSS, ECDSA) and RSA encryption (PKCS#1 v1.5, OAEP), as far as the token does",
    )
}

pub(super) fn specific(hash: SignHash) -> Result<Hash, OpError> {
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
pub(super) fn signature_mechanism(
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

pub(super) fn encryption_mechanism<'a>(
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
pub(super) fn ec_params(family: EccFamily, bits: usize) -> Result<&'static [u8], OpError> {
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

pub(super) fn curve_bits(params: &[u8]) -> Option<usize> {
    [256, 384, 521]
        .into_iter()
        .find(|&bits| ec_params(EccFamily::SecpR1, bits).ok() == Some(params))
}
