//! ECC points for the device providers: the public point of an imported private key (PSA's
//! key pair format is the private scalar alone, devices want both halves), and the peer's
//! point of a raw key agreement.

use crate::error::OpError;
use parsec_interface::requests::ResponseStatus;

/// d·G on NIST P-256 or P-384 (by `bits`), as big-endian x and y.
pub fn public_point(bits: usize, scalar: &[u8]) -> Result<(Vec<u8>, Vec<u8>), OpError> {
    let bad = || {
        OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("{} bytes are not a private key of a {bits}-bit curve", scalar.len()),
            "an ECC key pair is imported as its private scalar: exactly the curve's size in bytes (32 for P-256, 48 for P-384), between 1 and the group order",
        )
    };
    let point = match bits {
        256 => {
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            let key = p256::SecretKey::from_slice(scalar).map_err(|_| bad())?;
            key.public_key().to_encoded_point(false).as_bytes().to_vec()
        }
        384 => {
            use p384::elliptic_curve::sec1::ToEncodedPoint;
            let key = p384::SecretKey::from_slice(scalar).map_err(|_| bad())?;
            key.public_key().to_encoded_point(false).as_bytes().to_vec()
        }
        _ => {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("importing an ECC private key of {bits} bits"),
                "ECC private keys can be imported on P-256 and P-384",
            ))
        }
    };
    // 0x04 || x || y
    let len = (point.len() - 1) / 2;
    if scalar.len() != len {
        return Err(bad());
    }
    Ok((point[1..1 + len].to_vec(), point[1 + len..].to_vec()))
}

/// The x and y of a raw key agreement's peer key, PSA's uncompressed point 0x04||x||y on a
/// curve of `bits`; anything else is an invalid argument.
pub fn peer_point(bits: usize, peer: &[u8]) -> Result<(&[u8], &[u8]), OpError> {
    let len = bits.div_ceil(8);
    if peer.len() != 1 + 2 * len || peer[0] != 0x04 {
        return Err(OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("a {}-byte peer key for a {bits}-bit curve", peer.len()),
            "the peer key is the uncompressed point 0x04||x||y on the key's curve",
        ));
    }
    Ok((&peer[1..1 + len], &peer[1 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generator_times_one_and_bad_scalars() {
        let mut one = [0u8; 32];
        one[31] = 1;
        let (x, _) = public_point(256, &one).unwrap();
        // The x coordinate of P-256's generator.
        assert_eq!(x[..4], [0x6b, 0x17, 0xd1, 0xf2]);
        assert!(public_point(256, &[0u8; 32]).is_err());
        assert!(public_point(256, &one[1..]).is_err());
        assert!(public_point(384, &one).is_err());
        assert_eq!(
            public_point(521, &one).unwrap_err().status,
            ResponseStatus::PsaErrorNotSupported
        );
    }
}
