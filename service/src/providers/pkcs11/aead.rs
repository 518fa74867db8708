//! AEAD on the token (beyond upstream Parsec 1.5.0): AES-GCM through CKM_AES_GCM, with the
//! key's secret object. PSA's ciphertext is the encrypted data followed by the tag, which is
//! also what C_Encrypt gives and C_Decrypt takes for GCM. CCM has no mechanism parameters in
//! cryptoki 0.8 and answers NotSupported; ChaCha20-Poly1305 is the software provider's.

use super::*;
use cryptoki::mechanism::aead::GcmParams;
use parsec_interface::operations::psa_algorithm::{Aead, AeadWithDefaultLengthTag};

/// The tag length, in bytes, of an AES-GCM algorithm; any other AEAD is not supported here.
pub(super) fn gcm_tag_len(alg: Aead) -> Result<usize, OpError> {
    let (base, tag) = match alg {
        Aead::AeadWithDefaultLengthTag(base) => (base, 16),
        Aead::AeadWithShortenedTag {
            aead_alg,
            tag_length,
        } => (aead_alg, tag_length),
    };
    if base != AeadWithDefaultLengthTag::Gcm {
        return Err(not_supported(format!(
            "{base:?} on a PKCS#11 token (AES-GCM only; CCM and ChaCha20-Poly1305 on the software provider)"
        )));
    }
    // GCM tags: 4, 8 and 12 to 16 bytes (NIST SP 800-38D).
    if !matches!(tag, 4 | 8 | 12..=16) {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("a {tag}-byte GCM tag"),
            "GCM tags are 4, 8 or 12 to 16 bytes",
        ));
    }
    Ok(tag)
}

fn mechanism<'a>(
    alg: Aead,
    nonce: &'a [u8],
    additional_data: &'a [u8],
) -> Result<Mechanism<'a>, OpError> {
    let tag = gcm_tag_len(alg)?;
    if nonce.is_empty() {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            "an empty GCM nonce",
            "use a fresh 12-byte nonce for every message",
        ));
    }
    Ok(Mechanism::AesGcm(GcmParams::new(
        nonce,
        additional_data,
        ((tag * 8) as std::os::raw::c_ulong).into(),
    )))
}

pub(super) fn encrypt(
    conn: &mut Connection,
    entry: &KeyEntry,
    alg: Aead,
    nonce: &[u8],
    additional_data: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, OpError> {
    let mechanism = mechanism(alg, nonce, additional_data)?;
    let handle = conn.private(&entry.key_id)?;
    conn.session
        .encrypt(&mechanism, handle, plaintext)
        .map_err(|e| conn.fail("C_Encrypt", e))
}

/// A ciphertext whose tag does not check is PSA_ERROR_INVALID_SIGNATURE, whatever return
/// value the module chose for it (CKR_ENCRYPTED_DATA_INVALID, or CKR_GENERAL_ERROR and
/// CKR_FUNCTION_FAILED with the session still healthy).
pub(super) fn decrypt(
    conn: &mut Connection,
    entry: &KeyEntry,
    alg: Aead,
    nonce: &[u8],
    additional_data: &[u8],
    ciphertext: &[u8],
) -> Result<Zeroizing<Vec<u8>>, OpError> {
    let tag = gcm_tag_len(alg)?;
    let mechanism = mechanism(alg, nonce, additional_data)?;
    if ciphertext.len() < tag {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!(
                "{} bytes of ciphertext, shorter than the {tag}-byte tag",
                ciphertext.len()
            ),
            "the ciphertext is the encrypted data followed by the tag",
        ));
    }
    let handle = conn.private(&entry.key_id)?;
    match conn.session.decrypt(&mechanism, handle, ciphertext) {
        Ok(plaintext) => Ok(Zeroizing::new(plaintext)),
        Err(e) => {
            let mut error = conn.fail("C_Decrypt", e);
            if conn.refused_ciphertext(&error, &["CKR_ENCRYPTED_DATA_INVALID"]) {
                error.status = ResponseStatus::PsaErrorInvalidSignature;
                error.hint = "the ciphertext, nonce or additional data is not what was encrypted with this key";
            }
            Err(error)
        }
    }
}
