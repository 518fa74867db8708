//! The operations: one request run on the token (`run_once`, called by `run` in mod.rs,
//! which retries what a reconnect or a new session cures), and the Cryptoki calls they share.

use super::*;

impl Pkcs11Provider {
    /// C_Sign of a digest the caller has checked the key may sign (SignHash, SignMessage).
    fn sign_digest(
        &mut self,
        entry: &KeyEntry,
        alg: AsymmetricSignature,
        hash: &[u8],
    ) -> Result<Vec<u8>, OpError> {
        let (mechanism, data) = signature_mechanism(alg, hash)?;
        let conn = self.connection()?;
        let handle = conn.private(&entry.key_id)?;
        conn.session
            .sign(&mechanism, handle, &data)
            .map_err(|e| conn.fail("C_Sign", e))
    }

    /// C_Digest on the token (beyond upstream 1.5.0): HashCompute and HashCompare where the
    /// token offers the mechanism (CKR_MECHANISM_INVALID answers NotSupported).
    fn digest(&mut self, hash: Hash, input: &[u8]) -> Result<Vec<u8>, OpError> {
        // SHA-1 stays available for hashing (legacy protocols), as on the software provider.
        #[allow(deprecated)]
        let mechanism = match hash {
            Hash::Sha1 => Mechanism::Sha1,
            Hash::Sha224 => Mechanism::Sha224,
            Hash::Sha256 => Mechanism::Sha256,
            Hash::Sha384 => Mechanism::Sha384,
            Hash::Sha512 => Mechanism::Sha512,
            other => return Err(not_supported(format!("hashing with {other:?}"))),
        };
        let conn = self.connection()?;
        conn.session
            .digest(&mechanism, input)
            .map_err(|e| conn.fail("C_Digest", e))
    }

    /// Raw ECDH (beyond upstream 1.5.0): CKM_ECDH1_DERIVE with no KDF into a session secret
    /// of the field's size, read, then destroyed. The peer key is PSA's uncompressed point.
    fn ecdh(&mut self, entry: &KeyEntry, peer: &[u8]) -> Result<Vec<u8>, OpError> {
        use cryptoki::mechanism::elliptic_curve::{EcKdf, Ecdh1DeriveParams};
        let len = entry.attributes.bits.div_ceil(8);
        ecc::peer_point(entry.attributes.bits, peer)?;
        let conn = self.connection()?;
        let handle = conn.private(&entry.key_id)?;
        let mechanism = Mechanism::Ecdh1Derive(Ecdh1DeriveParams::new(EcKdf::null(), peer));
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::GENERIC_SECRET),
            Attribute::Token(false),
            Attribute::Sensitive(false),
            Attribute::Extractable(true),
            Attribute::ValueLen((len as std::os::raw::c_ulong).into()),
        ];
        let secret = conn
            .session
            .derive_key(&mechanism, handle, &template)
            .map_err(|e| conn.fail("C_DeriveKey", e))?;
        let value = conn
            .session
            .get_attributes(secret, &[AttributeType::Value])
            .map_err(|e| conn.fail("C_GetAttributeValue", e));
        if let Err(e) = conn.session.destroy_object(secret) {
            log::warn!("pkcs11: cannot destroy the session object of a key agreement: {e} (it goes with the session)");
        }
        match value?.into_iter().next() {
            Some(Attribute::Value(bytes)) => Ok(bytes),
            _ => Err(OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                format!("{} gave no CKA_VALUE for the shared secret", conn.token),
                "the token derives but does not release the secret: see its documentation",
            )),
        }
    }

    /// C_Verify of a digest (VerifyHash, VerifyMessage).
    fn verify_digest(
        &mut self,
        entry: &KeyEntry,
        alg: AsymmetricSignature,
        hash: &[u8],
        signature: &[u8],
    ) -> Result<(), OpError> {
        let (mechanism, data) = signature_mechanism(alg, hash)?;
        let conn = self.connection()?;
        let handle = conn.public(&entry.key_id)?;
        conn.session
            .verify(&mechanism, handle, &data, signature)
            .map_err(|e| conn.fail("C_Verify", e))
    }

    pub(super) fn run_once(
        &mut self,
        op: &NativeOperation,
        keys: &mut AppKeys<'_>,
    ) -> Result<NativeResult, OpError> {
        let allow_export = self.settings.allow_export;
        match op {
            NativeOperation::PsaGenerateKey(op) => {
                crate::providers::refuse_public_key_generation(&op.attributes)?;
                check(CheckType::Generate, op.attributes, allow_export)?;
                self.token_check(CheckType::Generate, &op.attributes)?;
                keys.ensure_free(&op.key_name)?;
                let key = new_key_ref(self.connection()?, keys.app(), &op.key_name)?;
                self.intend(&key)?;
                let conn = self.connection()?;
                if op.attributes.key_type == Type::Aes {
                    let template = secret_template(&key, &op.attributes, None);
                    let handle = conn
                        .session
                        .generate_key(&Mechanism::AesKeyGen, &template)
                        .map_err(|e| conn.fail("C_GenerateKey", e))?;
                    ensure_exportable(conn, &op.attributes, handle, &[handle])?;
                    crate::crash_point("pkcs11:after-objects");
                    record(conn, keys, &op.key_name, key, op.attributes, &[handle])?;
                    return Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}));
                }
                let (public, private) = templates(&key, &op.attributes)?;
                let mechanism = match op.attributes.key_type {
                    Type::RsaKeyPair => Mechanism::RsaPkcsKeyPairGen,
                    _ => Mechanism::EccKeyPairGen,
                };
                let (public_handle, private_handle) = conn
                    .session
                    .generate_key_pair(&mechanism, &public, &private)
                    .map_err(|e| conn.fail("C_GenerateKeyPair", e))
                    .map_err(|e| {
                        refused_export(conn, e, &mechanism, &public, &private, &op.attributes)
                    })
                    .map_err(|e| name_refused_attribute(conn, e, &mechanism, &public, &private))?;
                let pair = [public_handle, private_handle];
                ensure_exportable(conn, &op.attributes, private_handle, &pair)?;
                crate::crash_point("pkcs11:after-objects");
                record(
                    conn,
                    keys,
                    &op.key_name,
                    key,
                    op.attributes,
                    &[public_handle, private_handle],
                )?;
                Ok(NativeResult::PsaGenerateKey(psa_generate_key::Result {}))
            }
            NativeOperation::PsaImportKey(op) => {
                let attributes = import::sized(&op.attributes, op.data.expose_secret())?;
                let supported = capabilities::size_ok(CheckType::Import, attributes);
                import::supported_size(supported, &attributes, "the PKCS#11 provider")?;
                check(CheckType::Import, attributes, allow_export)?;
                self.token_check(CheckType::Import, &attributes)?;
                keys.ensure_free(&op.key_name)?;
                let key = new_key_ref(self.connection()?, keys.app(), &op.key_name)?;
                self.intend(&key)?;
                let conn = self.connection()?;
                let (attributes, objects) =
                    import_templates(&key, &attributes, op.data.expose_secret())?;
                let mut handles = Vec::new();
                for template in &objects {
                    match conn.session.create_object(template) {
                        Ok(handle) => handles.push(handle),
                        Err(e) => {
                            let err = conn.fail("C_CreateObject", e);
                            for handle in handles {
                                let _ = conn.session.destroy_object(handle);
                            }
                            return Err(err);
                        }
                    }
                }
                if let Some(first) = handles.first() {
                    ensure_exportable(conn, &attributes, *first, &handles)?;
                }
                record(conn, keys, &op.key_name, key, attributes, &handles)?;
                Ok(NativeResult::PsaImportKey(psa_import_key::Result {}))
            }
            NativeOperation::PsaExportPublicKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                if entry.attributes.key_type == Type::Aes {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorInvalidArgument,
                        format!("a {:?} key has no public key", entry.attributes.key_type),
                        "export a symmetric key with ExportKey (if it is exportable)",
                    ));
                }
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                let data = export_public(conn, handle, &entry.attributes)?;
                Ok(NativeResult::PsaExportPublicKey(
                    psa_export_public_key::Result { data: data.into() },
                ))
            }
            NativeOperation::PsaExportKey(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                // A public key needs no export flag (PSA; Mbed TLS and upstream Parsec).
                if !entry.attributes.key_type.is_public_key() {
                    entry.attributes.can_export().map_err(|e| {
                        OpError::new(
                            ResponseStatus::from(e),
                            "the key's policy has no export usage flag",
                            "only keys created with the export flag can be exported",
                        )
                    })?;
                }
                let conn = self.connection()?;
                let data = if entry.attributes.key_type.is_public_key() {
                    let handle = conn.public(&entry.key_id)?;
                    Zeroizing::new(export_public(conn, handle, &entry.attributes)?)
                } else {
                    let handle = conn.private(&entry.key_id)?;
                    export_private(conn, handle, &entry.attributes)?
                };
                Ok(NativeResult::PsaExportKey(psa_export_key::Result {
                    data: Secret::new(data.to_vec()),
                }))
            }
            NativeOperation::PsaDestroyKey(op) => {
                if keys.is_mounted(&op.key_name)
                    && !self
                        .existing(keys.app(), &op.key_name)
                        .is_some_and(|k| k.owned)
                {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorNotPermitted,
                        format!("\"{}\" is a key that was on the token before the service (an existing key mapping)", op.key_name),
                        "the service destroys such keys only if their [[provider.existing_keys]] entry says owned = true",
                    ));
                }
                // As the software provider: a destroy record, the entry's removal made
                // durable by the event loop, and only then are the token objects destroyed
                // (`destroy_material`). A crash in between never leaves a listed key whose
                // objects are gone; the record lets the next start finish the destroy.
                let entry = keys.get(&op.key_name)?.clone();
                self.record_destroy(&entry)?;
                crate::crash_point("pkcs11:destroy-after-record");
                keys.remove_then_destroy(&op.key_name)?;
                Ok(NativeResult::PsaDestroyKey(psa_destroy_key::Result {}))
            }
            NativeOperation::PsaSignHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let signature = self.sign_digest(&entry, op.alg, &op.hash)?;
                Ok(NativeResult::PsaSignHash(psa_sign_hash::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyHash(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                self.verify_digest(&entry, op.alg, &op.hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyHash(psa_verify_hash::Result {}))
            }
            NativeOperation::PsaSignMessage(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let hash = crate::providers::message::digest(op.alg, &op.message)?;
                let signature = self.sign_digest(&entry, op.alg, &hash)?;
                Ok(NativeResult::PsaSignMessage(psa_sign_message::Result {
                    signature: signature.into(),
                }))
            }
            NativeOperation::PsaVerifyMessage(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let hash = crate::providers::message::digest(op.alg, &op.message)?;
                self.verify_digest(&entry, op.alg, &hash, &op.signature)?;
                Ok(NativeResult::PsaVerifyMessage(
                    psa_verify_message::Result {},
                ))
            }
            NativeOperation::PsaAeadEncrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                self.limits.check_output(op.plaintext.len() + 16)?;
                let conn = self.connection()?;
                let ciphertext = aead::encrypt(
                    conn,
                    &entry,
                    op.alg,
                    &op.nonce,
                    &op.additional_data,
                    &op.plaintext,
                )?;
                Ok(NativeResult::PsaAeadEncrypt(psa_aead_encrypt::Result {
                    ciphertext: ciphertext.into(),
                }))
            }
            NativeOperation::PsaAeadDecrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let conn = self.connection()?;
                let plaintext = aead::decrypt(
                    conn,
                    &entry,
                    op.alg,
                    &op.nonce,
                    &op.additional_data,
                    &op.ciphertext,
                )?;
                Ok(NativeResult::PsaAeadDecrypt(psa_aead_decrypt::Result {
                    plaintext: plaintext.to_vec().into(),
                }))
            }
            NativeOperation::PsaHashCompute(op) => {
                self.limits.check_output(64)?;
                let hash = self.digest(op.alg, &op.input)?;
                Ok(NativeResult::PsaHashCompute(psa_hash_compute::Result {
                    hash: hash.into(),
                }))
            }
            NativeOperation::PsaHashCompare(op) => {
                let hash = self.digest(op.alg, &op.input)?;
                // Constant time: the comparison says nothing about where the hashes differ.
                let same = hash.len() == op.hash.len()
                    && hash
                        .iter()
                        .zip(op.hash.iter())
                        .fold(0u8, |d, (a, b)| d | (a ^ b))
                        == 0;
                if !same {
                    return Err(OpError::new(
                        ResponseStatus::PsaErrorInvalidSignature,
                        format!("the {:?} hash of the input is not the one given", op.alg),
                        "the input or the hash changed: compare what was hashed",
                    ));
                }
                Ok(NativeResult::PsaHashCompare(psa_hash_compare::Result {}))
            }
            NativeOperation::PsaRawKeyAgreement(op) => {
                let entry = keys.get(&op.private_key_name)?.clone();
                op.validate(entry.attributes)?;
                let shared_secret = self.ecdh(&entry, &op.peer_key)?;
                Ok(NativeResult::PsaRawKeyAgreement(
                    psa_raw_key_agreement::Result {
                        shared_secret: shared_secret.into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricEncrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let mechanism = encryption_mechanism(op.alg, salt)?;
                let conn = self.connection()?;
                let handle = conn.public(&entry.key_id)?;
                let ciphertext = conn
                    .session
                    .encrypt(&mechanism, handle, &op.plaintext)
                    .map_err(|e| conn.fail("C_Encrypt", e))?;
                Ok(NativeResult::PsaAsymmetricEncrypt(
                    psa_asymmetric_encrypt::Result {
                        ciphertext: ciphertext.into(),
                    },
                ))
            }
            NativeOperation::PsaAsymmetricDecrypt(op) => {
                let entry = keys.get(&op.key_name)?.clone();
                op.validate(entry.attributes)?;
                let salt = op.salt.as_deref().map(|s| s.as_slice());
                let mechanism = encryption_mechanism(op.alg, salt)?;
                let conn = self.connection()?;
                let handle = conn.private(&entry.key_id)?;
                let plaintext = conn
                    .session
                    .decrypt(&mechanism, handle, &op.ciphertext)
                    .map_err(|e| {
                        let mut err = conn.fail("C_Decrypt", e);
                        // A padding that does not check: the input was at fault.
                        if conn.refused_ciphertext(&err, &[]) {
                            err.status = ResponseStatus::PsaErrorInvalidPadding;
                            err.cause.push_str("; the session is healthy, so this is the module's answer to a ciphertext that does not decrypt");
                            err.hint = "the ciphertext was not made with this key and algorithm";
                        }
                        err
                    })?;
                Ok(NativeResult::PsaAsymmetricDecrypt(
                    psa_asymmetric_decrypt::Result {
                        plaintext: plaintext.into(),
                    },
                ))
            }
            NativeOperation::PsaGenerateRandom(op) => {
                self.limits.check_output(op.size)?;
                let conn = self.connection()?;
                let mut out = Zeroizing::new(vec![0u8; op.size]);
                if op.size > 0 {
                    conn.session
                        .generate_random_slice(&mut out)
                        .map_err(|e| conn.fail("C_GenerateRandom", e))?;
                }
                Ok(NativeResult::PsaGenerateRandom(
                    psa_generate_random::Result { random_bytes: out },
                ))
            }
            NativeOperation::CanDoCrypto(op) => {
                crate::providers::can_do::common_rules(op.check_type, &op.attributes)?;
                check(op.check_type, op.attributes, allow_export)?;
                self.token_check(op.check_type, &op.attributes)?;
                Ok(NativeResult::CanDoCrypto(can_do_crypto::Result))
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} is not served by the PKCS#11 provider", other.opcode()),
                "see ListOpcodes for what this provider serves",
            )),
        }
    }
}

/// A fresh CKA_ID from the token's random number generator, and the key's label.
fn new_key_ref(conn: &mut Connection, app: &str, name: &str) -> Result<KeyRef, OpError> {
    let id = conn
        .session
        .generate_random_vec(ID_LEN as u32)
        .map_err(|e| conn.fail("C_GenerateRandom (key id)", e))?;
    Ok(KeyRef {
        id: Some(id),
        label: Some(service_label(app, name)),
    })
}

/// Records a new key in the store; destroys its objects if that fails.
fn record(
    conn: &mut Connection,
    keys: &mut AppKeys<'_>,
    name: &str,
    key: KeyRef,
    attributes: Attributes,
    handles: &[ObjectHandle],
) -> Result<(), OpError> {
    if let Err(e) = keys.create(
        name,
        KeyEntry {
            key_id: key.encode(),
            attributes,
        },
    ) {
        for handle in handles {
            let _ = conn.session.destroy_object(*handle);
        }
        return Err(e);
    }
    Ok(())
}
