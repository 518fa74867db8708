//! Reading keys back from the token: public keys (and exportable private keys) in PSA formats, and the PSA attributes of a key that was on the token already.

use super::*;

pub(super) fn rsa_exponent(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0u32, |acc, &b| (acc << 8) | b as u32)
}

/// The PSA attributes of a key found on the token (existing keys).
pub(super) fn attributes_of(
    conn: &mut Connection,
    objects: Objects,
) -> Result<Attributes, OpError> {
    let handle = objects.private.or(objects.public).expect("one object");
    let asked = [
        AttributeType::KeyType,
        AttributeType::Sign,
        AttributeType::Decrypt,
        AttributeType::Modulus,
        AttributeType::EcParams,
    ];
    let values = conn
        .session
        .get_attributes(handle, &asked)
        .map_err(|e| conn.fail("reading the key's attributes", e))?;
    let (mut key_type, mut sign, mut decrypt, mut bits, mut family) = (None, false, false, 0, None);
    for value in values {
        match value {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::Sign(s) => sign = s,
            Attribute::Decrypt(d) => decrypt = d,
            Attribute::Modulus(m) => bits = m.len() * 8,
            Attribute::EcParams(p) => {
                bits = curve_bits(&p).unwrap_or(0);
                family = Some(EccFamily::SecpR1);
            }
            _ => {}
        }
    }
    let private = objects.private.is_some();
    let mut usage_flags = UsageFlags::default();
    let (key_type, alg): (Type, Algorithm) = match key_type {
        Some(KeyType::RSA) if decrypt && !sign => {
            usage_flags.set_encrypt();
            if private {
                usage_flags.set_decrypt();
            }
            let t = if private {
                Type::RsaKeyPair
            } else {
                Type::RsaPublicKey
            };
            (t, AsymmetricEncryption::RsaPkcs1v15Crypt.into())
        }
        Some(KeyType::RSA) => {
            usage_flags.set_verify_hash();
            if private {
                usage_flags.set_sign_hash();
            }
            let t = if private {
                Type::RsaKeyPair
            } else {
                Type::RsaPublicKey
            };
            (
                t,
                AsymmetricSignature::RsaPkcs1v15Sign {
                    hash_alg: Hash::Sha256.into(),
                }
                .into(),
            )
        }
        Some(KeyType::EC) if bits != 0 => {
            usage_flags.set_verify_hash();
            if private {
                usage_flags.set_sign_hash();
            }
            let curve_family = family.unwrap_or(EccFamily::SecpR1);
            let t = if private {
                Type::EccKeyPair { curve_family }
            } else {
                Type::EccPublicKey { curve_family }
            };
            (
                t,
                AsymmetricSignature::Ecdsa {
                    hash_alg: Hash::Sha256.into(),
                }
                .into(),
            )
        }
        other => {
            return Err(not_supported(format!(
            "an existing key of type {other:?} (RSA, and ECC on P-256/P-384/P-521, can be mapped)"
        )))
        }
    };
    Ok(Attributes {
        lifetime: Lifetime::Persistent,
        key_type,
        bits,
        policy: Policy {
            usage_flags,
            permitted_algorithms: alg,
        },
    })
}

pub(super) fn export_public(
    conn: &mut Connection,
    handle: ObjectHandle,
    attributes: &Attributes,
) -> Result<Vec<u8>, OpError> {
    match attributes.key_type {
        Type::RsaKeyPair | Type::RsaPublicKey => {
            let values = conn
                .session
                .get_attributes(
                    handle,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(|e| conn.fail("reading the public key", e))?;
            let (mut modulus, mut exponent) = (Vec::new(), 65537);
            for value in values {
                match value {
                    Attribute::Modulus(m) => modulus = m,
                    Attribute::PublicExponent(e) => exponent = rsa_exponent(&e),
                    _ => {}
                }
            }
            Ok(der::rsa_public(&modulus, exponent))
        }
        _ => {
            let values = conn
                .session
                .get_attributes(handle, &[AttributeType::EcPoint])
                .map_err(|e| conn.fail("reading the public key", e))?;
            let raw_len = 1 + 2 * attributes.bits.div_ceil(8);
            for value in values {
                if let Attribute::EcPoint(point) = value {
                    if point.len() == raw_len && point[0] == 0x04 {
                        return Ok(point);
                    }
                    if let Some(inner) = der::octet_string(&point) {
                        return Ok(inner.to_vec());
                    }
                }
            }
            // A token that keeps no public object: the private object cannot give the point.
            Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{} gives no CKA_EC_POINT for this key", conn.token),
                "the token keeps no public key object for it: map the public key object (same label or CKA_ID) as well",
            ))
        }
    }
}

pub(super) fn export_private(
    conn: &mut Connection,
    handle: ObjectHandle,
    attributes: &Attributes,
) -> Result<Zeroizing<Vec<u8>>, OpError> {
    match attributes.key_type {
        Type::RsaKeyPair => {
            let asked = [
                AttributeType::Modulus,
                AttributeType::PublicExponent,
                AttributeType::PrivateExponent,
                AttributeType::Prime1,
                AttributeType::Prime2,
                AttributeType::Exponent1,
                AttributeType::Exponent2,
                AttributeType::Coefficient,
            ];
            let values = conn
                .session
                .get_attributes(handle, &asked)
                .map_err(|e| conn.fail("reading the private key", e))?;
            let mut parts: HashMap<AttributeType, Zeroizing<Vec<u8>>> = HashMap::new();
            let mut exponent = 65537;
            for value in values {
                let kind = value.attribute_type();
                match value {
                    Attribute::PublicExponent(e) => exponent = rsa_exponent(&e),
                    Attribute::Modulus(v)
                    | Attribute::PrivateExponent(v)
                    | Attribute::Prime1(v)
                    | Attribute::Prime2(v)
                    | Attribute::Exponent1(v)
                    | Attribute::Exponent2(v)
                    | Attribute::Coefficient(v) => {
                        parts.insert(kind, Zeroizing::new(v));
                    }
                    _ => {}
                }
            }
            let part = |t: AttributeType| parts.get(&t).map(|v| v.as_slice()).unwrap_or(&[]);
            Ok(Zeroizing::new(der::rsa_private(&der::RsaPrivate {
                modulus: part(AttributeType::Modulus),
                exponent,
                private_exponent: part(AttributeType::PrivateExponent),
                prime1: part(AttributeType::Prime1),
                prime2: part(AttributeType::Prime2),
                exponent1: part(AttributeType::Exponent1),
                exponent2: part(AttributeType::Exponent2),
                coefficient: part(AttributeType::Coefficient),
            })))
        }
        _ => {
            let values = conn
                .session
                .get_attributes(handle, &[AttributeType::Value])
                .map_err(|e| conn.fail("reading the private key", e))?;
            let len = attributes.bits.div_ceil(8);
            for value in values {
                if let Attribute::Value(scalar) = value {
                    let scalar = Zeroizing::new(scalar);
                    let mut out = Zeroizing::new(vec![0u8; len.saturating_sub(scalar.len())]);
                    out.extend_from_slice(&scalar);
                    return Ok(out);
                }
            }
            Err(OpError::new(
                ResponseStatus::PsaErrorNotPermitted,
                format!("{} does not reveal this key's value", conn.token),
                "the key is sensitive on the token",
            ))
        }
    }
}
