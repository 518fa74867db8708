//! The little DER the PSA key formats need: PKCS#1 `RSAPublicKey` and `RSAPrivateKey`,
//! both a SEQUENCE of INTEGERs. Anything else is refused; nothing here can panic on
//! client data.

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

pub struct RsaPrivate<'a> {
    pub modulus: &'a [u8],
    pub exponent: u32,
    pub prime1: &'a [u8],
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
        [version, modulus, exponent, _d, prime1, _q, _dp, _dq, _qinv] if *version == [0] => {
            Some(RsaPrivate {
                modulus,
                exponent: to_u32(exponent)?,
                prime1,
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
