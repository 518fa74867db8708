//! SignMessage and VerifyMessage on the software provider (beyond upstream Parsec 1.5.0):
//! Mbed TLS's own psa_sign_message / psa_verify_message, which neither psa-crypto 0.12 nor
//! psa-crypto-sys 0.12 exports (the functions are in the Mbed TLS library psa-crypto-sys
//! builds and links; only their Rust declarations are missing).
//! Mbed TLS hashes the message and checks the key's own sign_message / verify_message
//! policy, so a key made for messages only is served too.

use psa_crypto::ffi::{psa_algorithm_t, psa_key_id_t, psa_status_t};
use psa_crypto::types::algorithm::AsymmetricSignature;
use psa_crypto::types::status::{Error as PsaError, Status};

// The prototypes of Mbed TLS 3.0's include/psa/crypto.h, with the types psa-crypto-sys
// generated from that header: a key is an mbedtls_svc_key_id_t, which is psa_key_id_t in
// this build (psa-crypto's own psa_sign_hash passes a psa_key_id_t).
extern "C" {
    fn psa_sign_message(
        key: psa_key_id_t,
        alg: psa_algorithm_t,
        input: *const u8,
        input_length: usize,
        signature: *mut u8,
        signature_size: usize,
        signature_length: *mut usize,
    ) -> psa_status_t;
    fn psa_verify_message(
        key: psa_key_id_t,
        alg: psa_algorithm_t,
        input: *const u8,
        input_length: usize,
        signature: *const u8,
        signature_length: usize,
    ) -> psa_status_t;
}

/// psa_sign_message into `signature`; the signature's length.
pub fn sign(
    key_id: u32,
    alg: AsymmetricSignature,
    message: &[u8],
    signature: &mut [u8],
) -> Result<usize, PsaError> {
    let mut length = 0;
    // SAFETY: the declaration above is Mbed TLS's prototype; the pointers and lengths describe live Rust slices for the whole call (the input
    // is only read, the output is written within signature.len() bytes and its length stored
    // in `length`); Mbed TLS keeps none of them. Mbed TLS is called from two threads at once only when it is
    // thread-safe (`version::thread_safe`), and psa_crypto::init ran when the provider was built.
    Status::from(unsafe {
        psa_sign_message(
            key_id,
            alg.into(),
            message.as_ptr(),
            message.len(),
            signature.as_mut_ptr(),
            signature.len(),
            &mut length,
        )
    })
    .to_result()?;
    Ok(length)
}

/// psa_verify_message: Ok if `signature` is the key's signature of `message`.
pub fn verify(
    key_id: u32,
    alg: AsymmetricSignature,
    message: &[u8],
    signature: &[u8],
) -> Result<(), PsaError> {
    // SAFETY: the declaration above is Mbed TLS's prototype; both pointers and lengths describe live Rust slices that Mbed TLS only reads,
    // for this call only; one thread calls Mbed TLS, after psa_crypto::init.
    Status::from(unsafe {
        psa_verify_message(
            key_id,
            alg.into(),
            message.as_ptr(),
            message.len(),
            signature.as_ptr(),
            signature.len(),
        )
    })
    .to_result()
}
