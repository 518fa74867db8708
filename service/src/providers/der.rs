//! The little DER the PSA key formats and PKCS#11 need: PKCS#1 `RSAPublicKey` and
//! `RSAPrivateKey` (a SEQUENCE of INTEGERs) and OCTET STRINGs. Anything else is refused; nothing here can panic on
//! client data.

// The software provider uses only the size checks: the rest serves the device providers.
#![cfg_attr(
    not(any(feature = "tpm-provider", feature = "pkcs11-provider")),
    allow(dead_code)
)]

/// A DER element's contents, and what follows it.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len0, rest) = rest.split_first()?;
    let (len, rest) = if len0 < 0x80 {
        (len0 as usize, rest)
    } else {
        let count = (len0 & 0x7f) as usize;
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let len = rest[..count]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, &rest[count..])
    };
    if rest.len() < len {
        return None;
    }
    Some(rest.split_at(len))
}

/// The INTEGERs of a SEQUENCE that fills `input` exactly, as unsigned big-endian bytes.
fn integers(input: &[u8]) -> Option<Vec<&[u8]>> {
    let (mut body, trailing) = element(input, 0x30)?;
    if !trailing.is_empty() {
        return None;
    }
    let mut out = Vec::new();
    while !body.is_empty() {
        let (value, rest) = element(body, 0x02)?;
        if value.is_empty() || value[0] & 0x80 != 0 {
            return None; // empty or negative
        }
        let stripped = match value.iter().position(|&b| b != 0) {
            Some(first) => &value[first..],
            None => &value[value.len() - 1..],
        };
        out.push(stripped);
        body = rest;
    }
    Some(out)
}

fn to_u32(bytes: &[u8]) -> Option<u32> {
    if bytes.len() > 4 {
        return None;
    }
    Some(bytes.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32))
}

pub struct RsaPublic<'a> {
    pub modulus: &'a [u8],
    pub exponent: u32,
}

// The TPM takes one prime; PKCS#11 tokens take (and give back) every component.
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
pub struct RsaPrivate<'a> {
    pub modulus: &'a [u8],
    pub exponent: u32,
    pub private_exponent: &'a [u8],
    pub prime1: &'a [u8],
    pub prime2: &'a [u8],
    pub exponent1: &'a [u8],
    pub exponent2: &'a [u8],
    pub coefficient: &'a [u8],
}

pub fn parse_rsa_public(der: &[u8]) -> Option<RsaPublic<'_>> {
    match integers(der)?.as_slice() {
        [modulus, exponent] => Some(RsaPublic {
            modulus,
            exponent: to_u32(exponent)?,
        }),
        _ => None,
    }
}

pub fn parse_rsa_private(der: &[u8]) -> Option<RsaPrivate<'_>> {
    // version, n, e, d, p, q, dP, dQ, qInv (two-prime keys only: version 0).
    match integers(der)?.as_slice() {
        [version, modulus, exponent, private_exponent, prime1, prime2, exponent1, exponent2, coefficient]
            if *version == [0] =>
        {
            Some(RsaPrivate {
                modulus,
                exponent: to_u32(exponent)?,
                private_exponent,
                prime1,
                prime2,
                exponent1,
                exponent2,
                coefficient,
            })
        }
        _ => None,
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
}

fn push_integer(out: &mut Vec<u8>, unsigned: &[u8]) {
    let first = unsigned
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(unsigned.len());
    let value = &unsigned[first..];
    let pad = value.first().map_or(true, |&b| b & 0x80 != 0);
    out.push(0x02);
    push_len(out, value.len() + pad as usize);
    if pad {
        out.push(0);
    }
    out.extend_from_slice(value);
}

/// PKCS#1 `RSAPrivateKey` (two primes), the PSA export format of RSA key pairs.
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
pub fn rsa_private(key: &RsaPrivate<'_>) -> Vec<u8> {
    let mut body = Vec::with_capacity(key.modulus.len() * 5);
    push_integer(&mut body, &[0]);
    push_integer(&mut body, key.modulus);
    push_integer(&mut body, &key.exponent.to_be_bytes());
    for part in [
        key.private_exponent,
        key.prime1,
        key.prime2,
        key.exponent1,
        key.exponent2,
        key.coefficient,
    ] {
        push_integer(&mut body, part);
    }
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

/// The contents of a DER OCTET STRING that fills `input` (how PKCS#11 wraps CKA_EC_POINT).
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
pub fn octet_string(input: &[u8]) -> Option<&[u8]> {
    match element(input, 0x04)? {
        (value, []) => Some(value),
        _ => None,
    }
}

/// `value` as a DER OCTET STRING.
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
pub fn to_octet_string(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 4);
    out.push(0x04);
    push_len(&mut out, value.len());
    out.extend_from_slice(value);
    out
}

/// PKCS#1 `RSAPublicKey`, the PSA export format of RSA public keys.
pub fn rsa_public(modulus: &[u8], exponent: u32) -> Vec<u8> {
    let mut body = Vec::with_capacity(modulus.len() + 16);
    push_integer(&mut body, modulus);
    push_integer(&mut body, &exponent.to_be_bytes());
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_round_trip() {
        let modulus: Vec<u8> = (0..256).map(|i| (i as u8) | 0x80).collect();
        let der = rsa_public(&modulus, 65537);
        let parsed = parse_rsa_public(&der).unwrap();
        assert_eq!(parsed.modulus, &modulus[..]);
        assert_eq!(parsed.exponent, 65537);
    }

    #[test]
    fn private_round_trip_and_octet_strings() {
        let key = RsaPrivate {
            modulus: &[0xc1; 256],
            exponent: 65537,
            private_exponent: &[0x11; 256],
            prime1: &[0xe1; 128],
            prime2: &[0xd3; 128],
            exponent1: &[0x21; 128],
            exponent2: &[0x31; 128],
            coefficient: &[0x41; 127],
        };
        let der = rsa_private(&key);
        let parsed = parse_rsa_private(&der).unwrap();
        assert_eq!(parsed.modulus, key.modulus);
        assert_eq!(parsed.coefficient, key.coefficient);
        assert_eq!(parsed.exponent, 65537);
        let point = [4u8; 97];
        assert_eq!(octet_string(&to_octet_string(&point)).unwrap(), &point[..]);
        assert!(octet_string(&point).is_none());
    }

    #[test]
    fn malformed_input_is_refused() {
        let der = rsa_public(&[0xc5; 128], 3);
        for cut in 0..der.len() {
            assert!(parse_rsa_public(&der[..cut]).is_none());
        }
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(parse_rsa_public(&trailing).is_none());
        assert!(parse_rsa_private(&der).is_none());
        assert!(parse_rsa_public(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
