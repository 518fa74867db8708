//! PSA's size rules for an import, as upstream Parsec applies them on the TPM and PKCS#11
//! providers before the device sees the key (the software provider leaves them to Mbed TLS,
//! which applies the same, except for a declared size it cannot hold: that the data has
//! another size is said first, as upstream does): `bits` may be 0 (the size is the data's), and a declared size
//! the data does not have, or one the provider cannot hold, is an invalid argument.

// The software provider uses only the size checks: the rest serves the device providers.
#![cfg_attr(
    not(any(feature = "tpm-provider", feature = "pkcs11-provider")),
    allow(dead_code)
)]

use super::der;
use crate::error::OpError;
use parsec_interface::operations::psa_key_attributes::{Attributes, Type};
use parsec_interface::requests::ResponseStatus;

/// The size of the key in `data`, in bits, if the data is in a PSA import format; `None`
/// leaves the judgement of the data to the provider (its own, more precise, message).
fn data_bits(key_type: Type, data: &[u8]) -> Option<usize> {
    let ecc_bits = |bytes: usize| if bytes == 66 { 521 } else { bytes * 8 };
    match key_type {
        Type::RsaPublicKey => der::parse_rsa_public(data).map(|k| k.modulus.len() * 8),
        Type::RsaKeyPair => der::parse_rsa_private(data).map(|k| k.modulus.len() * 8),
        Type::EccPublicKey { .. } => {
            (data.len() % 2 == 1 && data.first() == Some(&0x04)).then(|| ecc_bits(data.len() / 2))
        }
        Type::EccKeyPair { .. } => (!data.is_empty()).then(|| ecc_bits(data.len())),
        Type::Aes => Some(data.len() * 8),
        _ => None,
    }
}

/// The attributes with `bits` taken from the data when they say 0; a mismatch is refused.
pub fn sized(attributes: &Attributes, data: &[u8]) -> Result<Attributes, OpError> {
    let mut attributes = *attributes;
    let Some(bits) = data_bits(attributes.key_type, data) else {
        return Ok(attributes);
    };
    if attributes.bits == 0 {
        attributes.bits = bits;
    } else if attributes.bits != bits {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!(
                "the attributes say {} bits, the {:?} data has {bits}",
                attributes.bits, attributes.key_type
            ),
            "set bits to the key's size, or to 0",
        ));
    }
    Ok(attributes)
}

/// An import of a size the provider cannot hold (an ECC P-224 key on a TPM): upstream's
/// answer is an invalid argument, where CanDoCrypto says "not supported".
pub fn supported_size(supported: bool, attributes: &Attributes, what: &str) -> Result<(), OpError> {
    if supported {
        return Ok(());
    }
    Err(OpError::new(
        ResponseStatus::PsaErrorInvalidArgument,
        format!(
            "importing a {:?} of {} bits: {what} holds no key of that size",
            attributes.key_type, attributes.bits
        ),
        "RSA 1024-4096 bits and ECC secp-r1 256/384 (521 where the device has it); other sizes on the software provider",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use parsec_interface::operations::psa_key_attributes::{
        EccFamily, Lifetime, Policy, UsageFlags,
    };

    fn attrs(key_type: Type, bits: usize) -> Attributes {
        Attributes {
            lifetime: Lifetime::Persistent,
            key_type,
            bits,
            policy: Policy {
                usage_flags: UsageFlags::default(),
                permitted_algorithms: parsec_interface::operations::psa_algorithm::Algorithm::None,
            },
        }
    }

    #[test]
    fn ecc_public_sizes_come_from_the_point() {
        let p256 = [&[4u8][..], &[1; 64]].concat();
        let ecc = Type::EccPublicKey {
            curve_family: EccFamily::SecpR1,
        };
        assert_eq!(sized(&attrs(ecc, 0), &p256).unwrap().bits, 256);
        assert_eq!(sized(&attrs(ecc, 256), &p256).unwrap().bits, 256);
        assert_eq!(
            sized(&attrs(ecc, 384), &p256).unwrap_err().status,
            ResponseStatus::PsaErrorInvalidArgument
        );
        let p521 = [&[4u8][..], &[1; 132]].concat();
        assert_eq!(sized(&attrs(ecc, 0), &p521).unwrap().bits, 521);
        // Not a point: left to the provider.
        assert_eq!(sized(&attrs(ecc, 0), &[1, 2]).unwrap().bits, 0);
    }
}
