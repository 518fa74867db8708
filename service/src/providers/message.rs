//! SignMessage and VerifyMessage on the device providers (beyond upstream Parsec 1.5.0, which
//! offers neither): PSA defines signing a message as signing the hash of it with the
//! algorithm's hash, so the message is hashed here (SHA-2) and the provider signs or
//! verifies that hash as SignHash and VerifyHash do. The key's policy is checked by the
//! caller with the message operation's own rules (the sign_message / verify_message flags).

use crate::error::OpError;
use parsec_interface::operations::psa_algorithm::{AsymmetricSignature, Hash, SignHash};
use parsec_interface::requests::ResponseStatus;
use sha2::Digest;

/// The hash of `message` that `alg` signs.
pub fn digest(alg: AsymmetricSignature, message: &[u8]) -> Result<Vec<u8>, OpError> {
    let hash = match alg {
        AsymmetricSignature::RsaPkcs1v15Sign { hash_alg }
        | AsymmetricSignature::RsaPss { hash_alg }
        | AsymmetricSignature::Ecdsa { hash_alg }
        | AsymmetricSignature::DeterministicEcdsa { hash_alg } => hash_alg,
        other => {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInvalidArgument,
                format!("{other:?} has no hash to sign a message with"),
                "sign the hash itself (SignHash), or choose an algorithm with a hash",
            ))
        }
    };
    let SignHash::Specific(hash) = hash else {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            "a message signature with the wildcard hash (SignHash::Any)",
            "name the hash in the algorithm",
        ));
    };
    Ok(match hash {
        Hash::Sha224 => sha2::Sha224::digest(message).to_vec(),
        Hash::Sha256 => sha2::Sha256::digest(message).to_vec(),
        Hash::Sha384 => sha2::Sha384::digest(message).to_vec(),
        Hash::Sha512 => sha2::Sha512::digest(message).to_vec(),
        other => {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("hashing a message with {other:?}"),
                "SHA-224, SHA-256, SHA-384 or SHA-512",
            ))
        }
    })
}
