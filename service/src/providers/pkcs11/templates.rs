//! How keys look on the token: the CKA_ID scheme (`KeyRef`), the attribute templates for generation and import, and finding which attribute a token refuses.

use super::*;

/// What every label of an object the service creates starts with: `parsec/` then the
/// application's name, `/`, the key's name (hex-escaped where they are not printable ASCII
/// or contain `/`). So the service's objects cannot be taken for a key that was on the
/// token before (found by label in `existing_keys`), and one application's names cannot
/// collide with another's. Keys made by earlier versions keep their label (the key's name):
/// the entry records the label it was made with.
pub(super) const LABEL_PREFIX: &str = "parsec/";

pub(super) fn service_label(app: &str, name: &str) -> String {
    let part = |text: &str| -> String {
        text.bytes()
            .map(|b| {
                if b.is_ascii_graphic() && b != b'/' && b != b'%' {
                    (b as char).to_string()
                } else {
                    format!("%{b:02x}")
                }
            })
            .collect()
    };
    format!("{LABEL_PREFIX}{}/{}", part(app), part(name))
}

/// How the key store names a token object (the entry's `key_id`, bincode).
#[derive(serde::Serialize, serde::Deserialize, Clone, PartialEq, Eq, Hash)]
pub(super) struct KeyRef {
    pub(super) id: Option<Vec<u8>>,
    pub(super) label: Option<String>,
}

impl KeyRef {
    pub(super) fn decode(bytes: &[u8]) -> Result<KeyRef, OpError> {
        // Upstream Parsec's entries hold its u32 key id (bincode: 4 bytes, little-endian),
        // and its objects carry that id big-endian as CKA_ID, with no label. No KeyRef
        // encodes to 4 bytes (two option tags, and a present field adds a u64 length).
        if let Ok(upstream) = <[u8; 4]>::try_from(bytes) {
            return Ok(KeyRef {
                id: Some(u32::from_le_bytes(upstream).to_be_bytes().to_vec()),
                label: None,
            });
        }
        bincode::deserialize(bytes).map_err(|e| {
            OpError::new(
                ResponseStatus::PsaErrorCorruptionDetected,
                format!("the key store entry is not a PKCS#11 key reference: {e}"),
                "restore the entry from a backup, or remove it",
            )
        })
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).expect("a struct of vectors serializes")
    }

    /// The attributes that find this key's objects of one class.
    pub(super) fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class)];
        if let Some(id) = &self.id {
            template.push(Attribute::Id(id.clone()));
        }
        if let Some(label) = &self.label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        template
    }
}

/// The common attributes of a new key's objects.
pub(super) fn common(key: &KeyRef, class: ObjectClass, key_type: KeyType) -> Vec<Attribute> {
    let mut template = key.template(class);
    template.extend([Attribute::Token(true), Attribute::KeyType(key_type)]);
    template
}

pub(super) fn uses(attributes: &Attributes) -> (bool, bool) {
    let flags = attributes.policy.usage_flags;
    let sign =
        flags.sign_hash() || flags.verify_hash() || flags.sign_message() || flags.verify_message();
    let crypt = flags.encrypt() || flags.decrypt();
    // A key with no use at all is still made as a signing key (an inert object).
    (sign || !(crypt || flags.derive()), crypt)
}

/// The private key's attributes. Only the uses the key has are named (CKA_SIGN, CKA_DECRYPT,
/// CKA_DERIVE set to true), never a use it lacks set to false: tpm2-pkcs11 maps the usage
/// attributes of both halves onto one TPM object, and a false on one half clears what the
/// other half set (CKR_GENERAL_ERROR, "User specified and TPM specified attr mismatch").
/// The service checks every use against the key's PSA policy before the token sees it, so
/// a module's default for an unnamed use does not widen what a client can do.
pub(super) fn private_common(
    key: &KeyRef,
    attributes: &Attributes,
    key_type: KeyType,
) -> Vec<Attribute> {
    let (sign, crypt) = uses(attributes);
    let mut template = common(key, ObjectClass::PRIVATE_KEY, key_type);
    template.push(Attribute::Private(true));
    template.extend(protection(attributes.policy.usage_flags.export()));
    template.extend(
        [
            (sign, Attribute::Sign(true)),
            (crypt, Attribute::Decrypt(true)),
            // Raw ECDH (CKM_ECDH1_DERIVE) needs CKA_DERIVE.
            (
                attributes.policy.usage_flags.derive(),
                Attribute::Derive(true),
            ),
        ]
        .into_iter()
        .filter_map(|(wanted, a)| wanted.then_some(a)),
    );
    template
}

/// CKA_SENSITIVE and CKA_EXTRACTABLE: a key without the export flag is both sensitive and
/// not extractable (never left to a module's default); an exportable one neither.
fn protection(exportable: bool) -> [Attribute; 2] {
    [
        Attribute::Sensitive(!exportable),
        Attribute::Extractable(exportable),
    ]
}

pub(super) fn public_common(
    key: &KeyRef,
    attributes: &Attributes,
    key_type: KeyType,
) -> Vec<Attribute> {
    let (sign, crypt) = uses(attributes);
    let mut template = common(key, ObjectClass::PUBLIC_KEY, key_type);
    template.push(Attribute::Private(false));
    template.extend(
        [
            (sign, Attribute::Verify(true)),
            (crypt, Attribute::Encrypt(true)),
        ]
        .into_iter()
        .filter_map(|(wanted, a)| wanted.then_some(a)),
    );
    template
}

/// The secret-key object of an AES key: `value` for an import, the size for C_GenerateKey.
pub(super) fn secret_template(
    key: &KeyRef,
    attributes: &Attributes,
    value: Option<&[u8]>,
) -> Vec<Attribute> {
    let flags = attributes.policy.usage_flags;
    let mut template = common(key, ObjectClass::SECRET_KEY, KeyType::AES);
    template.push(Attribute::Private(true));
    template.extend(protection(attributes.policy.usage_flags.export()));
    template.extend(
        [
            (flags.encrypt(), Attribute::Encrypt(true)),
            (flags.decrypt(), Attribute::Decrypt(true)),
        ]
        .into_iter()
        .filter_map(|(wanted, a)| wanted.then_some(a)),
    );
    match value {
        Some(value) => template.push(Attribute::Value(value.to_vec())),
        None => template.push(Attribute::ValueLen(
            ((attributes.bits / 8) as std::os::raw::c_ulong).into(),
        )),
    }
    template
}

/// Public and private templates for C_GenerateKeyPair.
pub(super) fn templates(
    key: &KeyRef,
    attributes: &Attributes,
) -> Result<(Vec<Attribute>, Vec<Attribute>), OpError> {
    match attributes.key_type {
        Type::RsaKeyPair => {
            let mut public = public_common(key, attributes, KeyType::RSA);
            public.extend([
                Attribute::ModulusBits((attributes.bits as std::os::raw::c_ulong).into()),
                Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
            ]);
            Ok((public, private_common(key, attributes, KeyType::RSA)))
        }
        Type::EccKeyPair { curve_family } => {
            let (_, crypt) = uses(attributes);
            if crypt {
                return Err(not_supported("ECC keys for encryption".into()));
            }
            let mut public = public_common(key, attributes, KeyType::EC);
            public.push(Attribute::EcParams(
                ec_params(curve_family, attributes.bits)?.to_vec(),
            ));
            Ok((public, private_common(key, attributes, KeyType::EC)))
        }
        other => Err(not_supported(format!("generating {other:?}"))),
    }
}

/// Object templates for an import, and the attributes to record (bits read from the data).
pub(super) fn import_templates(
    key: &KeyRef,
    attributes: &Attributes,
    data: &[u8],
) -> Result<(Attributes, Vec<Vec<Attribute>>), OpError> {
    let invalid = |what: &str| {
        OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("the key data is not {what}"),
            "PSA formats: RSA key pairs as PKCS#1 RSAPrivateKey DER, RSA public keys as RSAPublicKey DER, ECC key pairs as the private scalar, ECC public keys as 0x04||x||y",
        )
    };
    let mut attributes = *attributes;
    let check_bits = |attributes: &mut Attributes, bits: usize| {
        if attributes.bits != 0 && attributes.bits != bits {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInvalidArgument,
                format!(
                    "the attributes say {} bits, the key has {bits}",
                    attributes.bits
                ),
                "set bits to the key's size, or to 0",
            ));
        }
        attributes.bits = bits;
        Ok(())
    };
    match attributes.key_type {
        Type::RsaKeyPair => {
            let k = der::parse_rsa_private(data)
                .ok_or_else(|| invalid("a two-prime DER RSAPrivateKey"))?;
            check_bits(&mut attributes, k.modulus.len() * 8)?;
            let exponent = k.exponent.to_be_bytes().to_vec();
            let mut private = private_common(key, &attributes, KeyType::RSA);
            private.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(exponent.clone()),
                Attribute::PrivateExponent(k.private_exponent.to_vec()),
                Attribute::Prime1(k.prime1.to_vec()),
                Attribute::Prime2(k.prime2.to_vec()),
                Attribute::Exponent1(k.exponent1.to_vec()),
                Attribute::Exponent2(k.exponent2.to_vec()),
                Attribute::Coefficient(k.coefficient.to_vec()),
            ]);
            let mut public = public_common(key, &attributes, KeyType::RSA);
            public.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(exponent),
            ]);
            Ok((attributes, vec![private, public]))
        }
        Type::RsaPublicKey => {
            let k = der::parse_rsa_public(data).ok_or_else(|| invalid("a DER RSAPublicKey"))?;
            check_bits(&mut attributes, k.modulus.len() * 8)?;
            let mut public = public_common(key, &attributes, KeyType::RSA);
            public.extend([
                Attribute::Modulus(k.modulus.to_vec()),
                Attribute::PublicExponent(k.exponent.to_be_bytes().to_vec()),
            ]);
            Ok((attributes, vec![public]))
        }
        Type::EccKeyPair { curve_family } => {
            let params = ec_params(curve_family, attributes.bits)?.to_vec();
            let (x, y) = ecc::public_point(attributes.bits, data)?;
            let mut private = private_common(key, &attributes, KeyType::EC);
            private.extend([
                Attribute::EcParams(params.clone()),
                Attribute::Value(data.to_vec()),
            ]);
            let mut public = public_common(key, &attributes, KeyType::EC);
            let point = [&[0x04][..], &x, &y].concat();
            public.extend([
                Attribute::EcParams(params),
                Attribute::EcPoint(der::to_octet_string(&point)),
            ]);
            Ok((attributes, vec![private, public]))
        }
        Type::EccPublicKey { curve_family } => {
            let params = ec_params(curve_family, attributes.bits)?.to_vec();
            let len = attributes.bits.div_ceil(8);
            if data.len() != 1 + 2 * len || data[0] != 0x04 {
                return Err(invalid("an uncompressed point 0x04||x||y of this curve"));
            }
            let mut public = public_common(key, &attributes, KeyType::EC);
            public.extend([
                Attribute::EcParams(params),
                Attribute::EcPoint(der::to_octet_string(data)),
            ]);
            Ok((attributes, vec![public]))
        }
        Type::Aes => {
            check_bits(&mut attributes, data.len() * 8)?;
            Ok((
                attributes,
                vec![secret_template(key, &attributes, Some(data))],
            ))
        }
        other => Err(not_supported(format!("importing {other:?}"))),
    }
}

/// CKR_TEMPLATE_INCONSISTENT and friends do not say which attribute the token refuses: find
/// it by generating again without each optional attribute in turn (keys made while probing
/// are destroyed), and name it in the error.
pub(super) fn name_refused_attribute(
    conn: &mut Connection,
    mut err: OpError,
    mechanism: &Mechanism,
    public: &[Attribute],
    private: &[Attribute],
) -> OpError {
    if !err.cause.contains("CKR_TEMPLATE_") && !err.cause.contains("CKR_ATTRIBUTE_") {
        return err;
    }
    let optional = |a: &Attribute| {
        matches!(
            a,
            Attribute::Sensitive(_)
                | Attribute::Extractable(_)
                | Attribute::Private(_)
                | Attribute::Sign(_)
                | Attribute::Decrypt(_)
                | Attribute::Verify(_)
                | Attribute::Encrypt(_)
                | Attribute::Label(_)
        )
    };
    for (which, template) in [("private", private), ("public", public)] {
        for (index, attribute) in template.iter().enumerate() {
            if !optional(attribute) {
                continue;
            }
            let without: Vec<Attribute> = template
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index)
                .map(|(_, a)| a.clone())
                .collect();
            let (pub_t, priv_t) = if which == "private" {
                (public, &without[..])
            } else {
                (&without[..], private)
            };
            if let Ok((a, b)) = conn.session.generate_key_pair(mechanism, pub_t, priv_t) {
                let _ = conn.session.destroy_object(a);
                let _ = conn.session.destroy_object(b);
                err.cause.push_str(&format!("; the token accepts the key without the {which} key's {:?}: that is the attribute it refuses", attribute.attribute_type()));
                return err;
            }
        }
    }
    err
}

/// A generation refused for an exportable key: generated again without the export flag (and
/// destroyed at once); if the token takes that, the refusal was of exportability, said so as
/// NotSupported. tpm2-pkcs11 refuses CKA_EXTRACTABLE private keys ("Cannot mark object both
/// extractable AND sensitive", CKR_ATTRIBUTE_VALUE_INVALID).
pub(super) fn refused_export(
    conn: &mut Connection,
    err: OpError,
    mechanism: &Mechanism,
    public: &[Attribute],
    private: &[Attribute],
    attributes: &Attributes,
) -> OpError {
    if !attributes.policy.usage_flags.export()
        || !(err.cause.contains("CKR_TEMPLATE_") || err.cause.contains("CKR_ATTRIBUTE_"))
    {
        return err;
    }
    // The same private template, not exportable (sensitive, not extractable).
    let private: Vec<Attribute> = private
        .iter()
        .filter(|a| !matches!(a, Attribute::Sensitive(_) | Attribute::Extractable(_)))
        .cloned()
        .chain(protection(false))
        .collect();
    match conn.session.generate_key_pair(mechanism, public, &private) {
        Ok((a, b)) => {
            let _ = conn.session.destroy_object(a);
            let _ = conn.session.destroy_object(b);
            not_exportable(format!(
                "{}; the same key without the export flag is accepted",
                err.cause
            ))
        }
        Err(_) => err,
    }
}

/// Checks that a key made exportable is so on the token (its secret value can be read):
/// NSS's softoken keeps the value of its token keys to itself whatever the template says,
/// and a key the client was told is exportable must be. If not, its objects are destroyed
/// and the request refused.
pub(super) fn ensure_exportable(
    conn: &mut Connection,
    attributes: &Attributes,
    secret: ObjectHandle,
    all: &[ObjectHandle],
) -> Result<(), OpError> {
    if !attributes.policy.usage_flags.export() || attributes.key_type.is_public_key() {
        return Ok(());
    }
    // The value itself, not CKA_SENSITIVE: NSS's softoken reports a token key
    // non-sensitive and still gives no CKA_VALUE.
    let part = match attributes.key_type {
        Type::RsaKeyPair => AttributeType::PrivateExponent,
        _ => AttributeType::Value,
    };
    let readable = conn
        .session
        .get_attributes(secret, &[part])
        .map(|values| {
            values.into_iter().any(|v| {
                let found = matches!(v, Attribute::Value(_) | Attribute::PrivateExponent(_));
                // The secret read is dropped here; zeroed as every exported value is.
                if let Attribute::Value(bytes) | Attribute::PrivateExponent(bytes) = v {
                    drop(Zeroizing::new(bytes));
                }
                found
            })
        })
        .unwrap_or(false);
    if readable {
        return Ok(());
    }
    for handle in all {
        let _ = conn.session.destroy_object(*handle);
    }
    Err(not_exportable(format!(
            "{} does not give the new key's secret value although CKA_SENSITIVE false and CKA_EXTRACTABLE true were asked; the key is destroyed",
            conn.token
        ),
    ))
}

fn not_exportable(cause: String) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        format!("{cause}: this token does not make exportable private keys"),
        "drop the export flag (keys on a token are meant to stay there), or keep exportable keys in the software provider",
    )
}
