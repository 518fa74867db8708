//! The verifier's side of TPM 2.0 key attestation with ActivateCredential, in pure Rust.
//!
//! A verifier that wants proof that a key lives in a given TPM asks the Parsec service
//! (PrepareKeyAttestation) for the key's TPM *name* and the TPM's endorsement key (EK). It
//! then makes a challenge with [`make_credential`]: a random secret (the credential) that
//! only that TPM can recover, and only while the named key is loaded in it. The service's
//! AttestKey returns the credential; if it matches, the key is in that TPM.
//!
//! What [`make_credential`] computes is TPM2_MakeCredential (TPM 2.0 Library, Part 1,
//! section 24 "Credential Protection", and Part 3, 12.6), for an RSA endorsement key whose
//! name algorithm is SHA-256 and whose symmetric algorithm is AES-128-CFB: the TCG default
//! EK template (the "L-1" RSA 2048 template) that Parsec's TPM provider uses.
//!
//! 1. seed: 32 random bytes, encrypted to the EK with RSA-OAEP(SHA-256), label "IDENTITY\0"
//!    — this is the `secret`.
//! 2. symKey = KDFa(SHA-256, seed, "STORAGE", name, "", 128 bits); the credential, as a
//!    TPM2B_DIGEST (2-byte big-endian size, then the bytes), is encrypted with AES-128-CFB,
//!    IV zero.
//! 3. hmacKey = KDFa(SHA-256, seed, "INTEGRITY", "", "", 256 bits);
//!    outerHMAC = HMAC-SHA-256(hmacKey, encIdentity || name).
//! 4. The credential blob (the contents of a TPM2B_ID_OBJECT) is outerHMAC as a TPM2B_DIGEST
//!    followed by encIdentity.
//!
//! The crate's tests check the bytes against a TPM's own TPM2_MakeCredential (swtpm).

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use rsa::{Oaep, RsaPublicKey};
use sha2::{Digest, Sha256};
use std::fmt;

type HmacSha256 = Hmac<Sha256>;
type Aes128CfbEnc = cfb_mode::Encryptor<aes::Aes128>;

/// TPM_ALG_SHA256, the first two bytes of a SHA-256 name.
const TPM_ALG_SHA256: [u8; 2] = [0x00, 0x0B];
const DIGEST_LEN: usize = 32;
const SYM_KEY_BITS: u32 = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The endorsement key is not a DER PKCS#1 RSAPublicKey, or is unusable.
    BadEndorsementKey(String),
    /// The credential is empty or longer than the name algorithm's digest (32 bytes).
    BadCredential(usize),
    /// The name is not a SHA-256 TPM name (0x000B then 32 bytes).
    BadName(usize),
    /// RSA-OAEP encryption failed.
    Encryption(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::BadEndorsementKey(e) => write!(f, "the endorsement key is not usable: {e}"),
            Error::BadCredential(len) => {
                write!(f, "a credential of {len} bytes: 1 to 32 bytes are allowed")
            }
            Error::BadName(len) => write!(
                f,
                "a {len}-byte name: expected 34 bytes, 0x000B then a SHA-256 digest"
            ),
            Error::Encryption(e) => write!(f, "RSA-OAEP encryption of the seed failed: {e}"),
        }
    }
}

impl std::error::Error for Error {}

/// The challenge for one ActivateCredential: the two blobs the service's AttestKey takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The contents of the TPM2B_ID_OBJECT (AttestKey's `credential_blob`).
    pub credential_blob: Vec<u8>,
    /// The contents of the TPM2B_ENCRYPTED_SECRET (AttestKey's `secret`).
    pub secret: Vec<u8>,
}

/// KDFa of TPM 2.0 Part 1, 11.4.10.2 (SP 800-108 counter mode with HMAC-SHA-256):
/// `bits` bits of HMAC(key, [i]32 || label || 0x00 || context_u || context_v || [bits]32)
/// for i = 1, 2... A label that already ends with its zero byte is used as it is.
pub fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let label = label.as_bytes();
    let label = label.strip_suffix(&[0]).unwrap_or(label);
    let bytes = bits.div_ceil(8) as usize;
    let mut out = Vec::with_capacity(bytes + DIGEST_LEN);
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        mac.update(&counter.to_be_bytes());
        mac.update(label);
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bytes);
    if bits % 8 != 0 {
        out[0] &= (1u8 << (bits % 8)) - 1;
    }
    out
}

/// Reads the endorsement key as the service gives it: a DER PKCS#1 RSAPublicKey.
pub fn endorsement_key_from_der(der: &[u8]) -> Result<RsaPublicKey, Error> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    RsaPublicKey::from_pkcs1_der(der).map_err(|e| Error::BadEndorsementKey(e.to_string()))
}

/// Whether `name` is the SHA-256 TPM name of the public area `public` (a marshalled
/// TPMT_PUBLIC, as PrepareKeyAttestation returns it): a verifier checks this before
/// trusting that the name stands for that key.
pub fn name_matches_public(name: &[u8], public: &[u8]) -> bool {
    name.len() == 2 + DIGEST_LEN
        && name[..2] == TPM_ALG_SHA256
        && name[2..] == Sha256::digest(public)[..]
}

/// TPM2_MakeCredential without a TPM: a challenge that only the TPM holding `endorsement_key`
/// (DER RSAPublicKey) can open, and only for the key whose TPM name is `name`.
pub fn make_credential(
    endorsement_key: &[u8],
    name: &[u8],
    credential: &[u8],
) -> Result<Challenge, Error> {
    let ek = endorsement_key_from_der(endorsement_key)?;
    let mut seed = [0u8; DIGEST_LEN];
    OsRng.fill_bytes(&mut seed);
    let secret = encrypt_seed(&ek, &seed)?;
    let credential_blob = credential_blob(&seed, name, credential)?;
    Ok(Challenge {
        credential_blob,
        secret,
    })
}

/// The `secret` half: the seed encrypted to the EK with RSA-OAEP(SHA-256), label
/// "IDENTITY" with its zero byte.
pub fn encrypt_seed(ek: &RsaPublicKey, seed: &[u8]) -> Result<Vec<u8>, Error> {
    let padding = Oaep::new_with_label::<Sha256, _>("IDENTITY\0");
    ek.encrypt(&mut OsRng, padding, seed)
        .map_err(|e| Error::Encryption(e.to_string()))
}

/// The `credential_blob` half, from a known seed (deterministic: what the tests compare
/// with the TPM's answer).
pub fn credential_blob(seed: &[u8], name: &[u8], credential: &[u8]) -> Result<Vec<u8>, Error> {
    if credential.is_empty() || credential.len() > DIGEST_LEN {
        return Err(Error::BadCredential(credential.len()));
    }
    if name.len() != 2 + DIGEST_LEN || name[..2] != TPM_ALG_SHA256 {
        return Err(Error::BadName(name.len()));
    }
    let sym_key = kdfa_sha256(seed, "STORAGE", name, &[], SYM_KEY_BITS);
    let mut enc_identity = Vec::with_capacity(2 + credential.len());
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    Aes128CfbEnc::new_from_slices(&sym_key, &[0u8; 16])
        .expect("a 16-byte key and IV")
        .encrypt(&mut enc_identity);

    let hmac_key = kdfa_sha256(seed, "INTEGRITY", &[], &[], (DIGEST_LEN * 8) as u32);
    let mut mac = HmacSha256::new_from_slice(&hmac_key).expect("HMAC takes keys of any length");
    mac.update(&enc_identity);
    mac.update(name);
    let outer_hmac = mac.finalize().into_bytes();

    let mut blob = Vec::with_capacity(2 + DIGEST_LEN + enc_identity.len());
    blob.extend_from_slice(&(DIGEST_LEN as u16).to_be_bytes());
    blob.extend_from_slice(&outer_hmac);
    blob.extend_from_slice(&enc_identity);
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_lengths_and_label_zero() {
        let key = [7u8; 32];
        assert_eq!(kdfa_sha256(&key, "STORAGE", b"u", b"", 128).len(), 16);
        assert_eq!(kdfa_sha256(&key, "INTEGRITY", b"", b"", 512).len(), 64);
        // The terminating zero is part of the label whether or not the caller wrote it.
        assert_eq!(
            kdfa_sha256(&key, "STORAGE", b"u", b"", 256),
            kdfa_sha256(&key, "STORAGE\0", b"u", b"", 256)
        );
        // A longer output starts with the shorter one (same counter blocks), except that
        // the requested length is hashed in: different lengths give different keys.
        assert_ne!(
            kdfa_sha256(&key, "STORAGE", b"u", b"", 128)[..],
            kdfa_sha256(&key, "STORAGE", b"u", b"", 256)[..16]
        );
        assert_eq!(kdfa_sha256(&key, "X", b"", b"", 12)[0] & 0xf0, 0);
    }

    #[test]
    fn kdfa_first_block_is_the_spec_formula() {
        let key = b"seed";
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(&[0, 0, 0, 1]);
        mac.update(b"INTEGRITY\0");
        mac.update(&[0, 0, 1, 0]);
        assert_eq!(
            kdfa_sha256(key, "INTEGRITY", b"", b"", 256),
            mac.finalize().into_bytes().to_vec()
        );
    }

    #[test]
    fn blob_layout_and_input_checks() {
        let name: Vec<u8> = [0x00, 0x0B].into_iter().chain([9u8; 32]).collect();
        let blob = credential_blob(&[1u8; 32], &name, b"sixteen byte cre").unwrap();
        assert_eq!(&blob[..2], &[0x00, 0x20]);
        assert_eq!(blob.len(), 2 + 32 + 2 + 16);
        assert_eq!(
            credential_blob(&[1u8; 32], &name, &[0; 33]),
            Err(Error::BadCredential(33))
        );
        assert_eq!(
            credential_blob(&[1u8; 32], &name, &[]),
            Err(Error::BadCredential(0))
        );
        assert_eq!(
            credential_blob(&[1u8; 32], &name[..20], b"x"),
            Err(Error::BadName(20))
        );
        assert!(matches!(
            make_credential(b"not der", &name, b"x"),
            Err(Error::BadEndorsementKey(_))
        ));
    }

    #[test]
    fn name_check() {
        let public = b"a marshalled public area";
        let mut name = vec![0x00, 0x0B];
        name.extend_from_slice(&Sha256::digest(public));
        assert!(name_matches_public(&name, public));
        name[5] ^= 1;
        assert!(!name_matches_public(&name, public));
    }
}
