//! The software provider's operations that change nothing it keeps: signatures,
//! verifications, encryption and decryption, exports, hashes, random bytes, CanDoCrypto.
//!
//! They need only the key's entry (from the request's snapshot), the key file's digest check
//! and Mbed TLS. On a thread-safe Mbed TLS (3.6 with MBEDTLS_THREADING_C, `version.rs`) a
//! [`Reader`] is shared with a second thread: the worker's thread and that one take these
//! operations from one queue (`providers::pool`), while everything that makes, destroys or
//! records keys runs on the worker's own thread with the second one idle.

use super::{
    actual_bits, capabilities, digests, key_file, key_id_of, message, psa_error, recorded_digest,
};
use crate::error::OpError;
use crate::providers::{AppKeys, Limits, Shared};
use parsec_interface::operations::{
    can_do_crypto, psa_aead_decrypt, psa_aead_encrypt, psa_asymmetric_decrypt,
    psa_asymmetric_encrypt, psa_export_key, psa_export_public_key, psa_generate_random,
    psa_hash_compare, psa_hash_compute, psa_raw_key_agreement, psa_sign_hash, psa_sign_message,
    psa_verify_hash, psa_verify_message, NativeOperation, NativeResult,
};
use parsec_interface::requests::ResponseStatus;
use parsec_interface::secrecy::Secret;
use psa_crypto::operations::{
    aead, asym_encryption, asym_signature, hash, key_agreement, key_management, other,
};
use psa_crypto::types::key::{Attributes, Id};
use psa_crypto::types::status::Error as PsaError;
use std::path::PathBuf;
use zeroize::Zeroizing;

pub(super) struct Reader {
    /// Absolute: the working directory, where Mbed TLS keeps its key files.
    pub(super) storage_dir: PathBuf,
    pub(super) limits: Limits,
    /// Keys whose file matched its entry's digest in this run (`digests.rs`).
    pub(super) verified: digests::Verified,
}

impl Reader {
    pub(super) fn open(&self, keys: &AppKeys<'_>, name: &str) -> Result<(Id, Attributes), OpError> {
        let entry = keys.get(name)?;
        let id = key_id_of(entry)?;
        if let Some(recorded) = recorded_digest(entry) {
            self.verified
                .check(id, &self.storage_dir.join(key_file(id)), recorded)?;
        }
        let id = Id::from_persistent_key_id(id).map_err(|e| {
            let mut error = psa_error("opening the key", e);
            if e == PsaError::DoesNotExist {
                error.status = ResponseStatus::PsaErrorStorageFailure;
                error.hint = "the key's file is missing from storage_dir: restore it from a backup or destroy the key";
            }
            error
        })?;
        let mut attributes = entry.attributes;
        if attributes.bits == 0 {
            // Imported with size 0 before the size was recorded at import: Mbed TLS knows it.
            attributes.bits = actual_bits(id).unwrap_or(0);
        }
        Ok((id, attributes))
    }

    /// Runs a PSA call writing into a buffer of `size` bytes and returns the bytes written.
    pub(super) fn output(
        &self,
        size: usize,
        what: &str,
        call: impl FnOnce(&mut [u8]) -> Result<usize, PsaError>,
    ) -> Result<Zeroizing<Vec<u8>>, OpError> {
        self.limits.check_output(size)?;
        let mut buffer = Zeroizing::new(vec![0u8; size]);
        let written = call(&mut buffer).map_err(|e| psa_error(what, e))?;
        buffer.truncate(written);
        Ok(buffer)
    }
}

impl Shared for Reader {
    fn execute(&self, op: NativeOperation, keys: AppKeys<'_>) -> Result<NativeResult, OpError> {
        match op {
            NativeOperation::PsaExportPublicKey(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                let size = attributes
                    .export_public_key_output_size()
                    .map_err(|e| psa_error("sizing the public key", e))?;
                let data = self.output(size, "psa_export_public_key", |buf| {
                    key_management::export_public(id, buf)
                })?;
                Ok(NativeResult::PsaExportPublicKey(
                    psa_export_public_key::Result { data },
                ))
            }
            NativeOperation::PsaExportKey(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                let size = attributes
                    .export_key_output_size()
                    .map_err(|e| psa_error("sizing the key", e))?;
                let data = self.output(size, "psa_export_key", |buf| {
                    key_management::export(id, buf)
                })?;
                Ok(NativeResult::PsaExportKey(psa_export_key::Result {
                    data: Secret::new(data.to_vec()),
                }))
            }
            NativeOperation::PsaSignHash(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .sign_output_size(op.alg)
                    .map_err(|e| psa_error("sizing the signature", e))?;
                let signature = self.output(size, "psa_sign_hash", |buf| {
                    asym_signature::sign_hash(id, op.alg, &op.hash, buf)
                })?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature,
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                asym_signature::verify_hash(id, op.alg, &op.hash, &op.signature)
                    .map_err(|e| psa_error("psa_verify_hash", e))?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
            }
            NativeOperation::PsaSignMessage(op) => {
                let (_, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let key_id = key_id_of(keys.get(&op.key_name)?)?;
                let size = attributes
                    .sign_output_size(op.alg)
                    .map_err(|e| psa_error("sizing the signature", e))?;
                let signature = self.output(size, "psa_sign_message", |buf| {
                    message::sign(key_id, op.alg, &op.message, buf)
                })?;
                Ok(NativeResult::PsaSignMessage(psa_sign_message::Result {
                    signature,
                }))
            }
            NativeOperation::PsaVerifyMessage(op) => {
                let (_, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let key_id = key_id_of(keys.get(&op.key_name)?)?;
                message::verify(key_id, op.alg, &op.message, &op.signature)
                    .map_err(|e| psa_error("psa_verify_message", e))?;
                Ok(NativeResult::PsaVerifyMessage(
                    psa_verify_message::Result {},
                ))
            }
            NativeOperation::PsaAsymmetricEncrypt(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .asymmetric_encrypt_output_size(op.alg)
                    .map_err(|e| psa_error("sizing the ciphertext", e))?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let ciphertext = self.output(size, "psa_asymmetric_encrypt", |buf| {
                    asym_encryption::encrypt(id, op.alg, &op.plaintext, salt, buf)
                })?;
                Ok(NativeResult::PsaAsymmetricEncrypt(
                    psa_asymmetric_encrypt::Result { ciphertext },
                ))
            }
            NativeOperation::PsaAsymmetricDecrypt(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .asymmetric_decrypt_output_size(op.alg)
                    .map_err(|e| psa_error("sizing the plaintext", e))?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let plaintext = self.output(size, "psa_asymmetric_decrypt", |buf| {
                    asym_encryption::decrypt(id, op.alg, &op.ciphertext, salt, buf)
                })?;
                Ok(NativeResult::PsaAsymmetricDecrypt(
                    psa_asymmetric_decrypt::Result { plaintext },
                ))
            }
            NativeOperation::PsaAeadEncrypt(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .aead_encrypt_output_size(op.alg, op.plaintext.len())
                    .map_err(|e| psa_error("sizing the ciphertext", e))?;
                let ciphertext = self.output(size, "psa_aead_encrypt", |buf| {
                    aead::encrypt(
                        id,
                        op.alg,
                        &op.nonce,
                        &op.additional_data,
                        &op.plaintext,
                        buf,
                    )
                })?;
                Ok(NativeResult::PsaAeadEncrypt(psa_aead_encrypt::Result {
                    ciphertext,
                }))
            }
            NativeOperation::PsaAeadDecrypt(op) => {
                let (id, attributes) = self.open(&keys, &op.key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .aead_decrypt_output_size(op.alg, op.ciphertext.len())
                    .map_err(|e| psa_error("sizing the plaintext", e))?;
                let plaintext = self.output(size, "psa_aead_decrypt", |buf| {
                    aead::decrypt(
                        id,
                        op.alg,
                        &op.nonce,
                        &op.additional_data,
                        &op.ciphertext,
                        buf,
                    )
                })?;
                Ok(NativeResult::PsaAeadDecrypt(psa_aead_decrypt::Result {
                    plaintext,
                }))
            }
            NativeOperation::PsaHashCompute(op) => {
                let hash = self.output(op.alg.hash_length(), "psa_hash_compute", |buf| {
                    hash::hash_compute(op.alg, &op.input, buf)
                })?;
                Ok(NativeResult::PsaHashCompute(psa_hash_compute::Result {
                    hash,
                }))
            }
            NativeOperation::PsaHashCompare(op) => {
                hash::hash_compare(op.alg, &op.input, &op.hash)
                    .map_err(|e| psa_error("psa_hash_compare", e))?;
                Ok(NativeResult::PsaHashCompare(psa_hash_compare::Result {}))
            }
            NativeOperation::PsaRawKeyAgreement(op) => {
                let (id, attributes) = self.open(&keys, &op.private_key_name)?;
                op.validate(attributes)?;
                let size = attributes
                    .raw_key_agreement_output_size(op.alg)
                    .map_err(|e| psa_error("sizing the shared secret", e))?;
                let secret = self.output(size, "psa_raw_key_agreement", |buf| {
                    key_agreement::raw_key_agreement(op.alg, id, &op.peer_key, buf)
                })?;
                Ok(NativeResult::PsaRawKeyAgreement(
                    psa_raw_key_agreement::Result {
                        shared_secret: Secret::new(secret.to_vec()),
                    },
                ))
            }
            NativeOperation::PsaGenerateRandom(op) => {
                let random_bytes = self.output(op.size, "psa_generate_random", |buf| {
                    other::generate_random(buf).map(|()| buf.len())
                })?;
                Ok(NativeResult::PsaGenerateRandom(
                    psa_generate_random::Result { random_bytes },
                ))
            }
            NativeOperation::CanDoCrypto(op) => {
                crate::providers::can_do::common_rules(op.check_type, &op.attributes)?;
                capabilities::check(op.check_type, op.attributes)?;
                Ok(NativeResult::CanDoCrypto(can_do_crypto::Result {}))
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!(
                    "{:?} is not implemented by the Mbed Crypto provider",
                    other.opcode()
                ),
                "see ListOpcodes for what this provider serves",
            )),
        }
    }
}
