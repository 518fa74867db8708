//! `parsec-seeds DIR`: writes one real, complete request (header, protobuf body, Direct
//! authentication) per opcode into DIR, the fuzzer's seed corpus.

use parsec_client::core::interface::operations::psa_algorithm::*;
use parsec_client::core::interface::operations::psa_key_attributes::*;
use parsec_client::core::interface::operations::*;
use parsec_client::core::interface::operations_protobuf::ProtobufConverter;
use parsec_client::core::interface::requests::request::{RequestAuth, RequestHeader};
use parsec_client::core::interface::requests::{AuthType, BodyType, Opcode, ProviderId, Request};
use parsec_client::core::interface::secrecy::Secret;
use zeroize::Zeroizing;

fn bytes(b: &[u8]) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(b.to_vec())
}

fn p256() -> Attributes {
    parsec_bench::p256(|u| {
        u.set_sign_hash().set_verify_hash().set_export();
    })
}

fn operations() -> Vec<(ProviderId, NativeOperation)> {
    let ecdsa = parsec_bench::ecdsa();
    let key = || "seed-key".to_string();
    let gcm = Aead::AeadWithDefaultLengthTag(AeadWithDefaultLengthTag::Gcm);
    let oaep = AsymmetricEncryption::RsaOaep {
        hash_alg: Hash::Sha256,
    };
    let core = ProviderId::Core;
    let mbed = ProviderId::MbedCrypto;
    vec![
        (core, NativeOperation::Ping(ping::Operation {})),
        (
            core,
            NativeOperation::ListProviders(list_providers::Operation {}),
        ),
        (
            core,
            NativeOperation::ListOpcodes(list_opcodes::Operation { provider_id: mbed }),
        ),
        (
            core,
            NativeOperation::ListAuthenticators(list_authenticators::Operation {}),
        ),
        (core, NativeOperation::ListKeys(list_keys::Operation {})),
        (
            core,
            NativeOperation::ListClients(list_clients::Operation {}),
        ),
        (
            core,
            NativeOperation::DeleteClient(delete_client::Operation {
                client: "someone".into(),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaGenerateKey(psa_generate_key::Operation {
                key_name: key(),
                attributes: p256(),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaImportKey(psa_import_key::Operation {
                key_name: "seed-aes".into(),
                attributes: Attributes {
                    key_type: Type::Aes,
                    bits: 128,
                    policy: Policy {
                        usage_flags: UsageFlags::default(),
                        permitted_algorithms: gcm.into(),
                    },
                    ..p256()
                },
                data: Secret::new(vec![7; 16]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaExportPublicKey(psa_export_public_key::Operation {
                key_name: key(),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaExportKey(psa_export_key::Operation { key_name: key() }),
        ),
        (
            mbed,
            NativeOperation::PsaDestroyKey(psa_destroy_key::Operation { key_name: key() }),
        ),
        (
            mbed,
            NativeOperation::PsaSignHash(psa_sign_hash::Operation {
                key_name: key(),
                alg: ecdsa,
                hash: bytes(&[1; 32]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaVerifyHash(psa_verify_hash::Operation {
                key_name: key(),
                alg: ecdsa,
                hash: bytes(&[1; 32]),
                signature: bytes(&[2; 64]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaSignMessage(psa_sign_message::Operation {
                key_name: key(),
                alg: ecdsa,
                message: bytes(b"m"),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaVerifyMessage(psa_verify_message::Operation {
                key_name: key(),
                alg: ecdsa,
                message: bytes(b"m"),
                signature: bytes(&[2; 64]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaAsymmetricEncrypt(psa_asymmetric_encrypt::Operation {
                key_name: key(),
                alg: oaep,
                plaintext: bytes(b"p"),
                salt: None,
            }),
        ),
        (
            mbed,
            NativeOperation::PsaAsymmetricDecrypt(psa_asymmetric_decrypt::Operation {
                key_name: key(),
                alg: oaep,
                ciphertext: bytes(&[3; 256]),
                salt: Some(bytes(b"salt")),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaAeadEncrypt(psa_aead_encrypt::Operation {
                key_name: "seed-aes".into(),
                alg: gcm,
                nonce: bytes(&[1; 12]),
                additional_data: bytes(b"ad"),
                plaintext: bytes(b"p"),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaAeadDecrypt(psa_aead_decrypt::Operation {
                key_name: "seed-aes".into(),
                alg: gcm,
                nonce: bytes(&[1; 12]),
                additional_data: bytes(b"ad"),
                ciphertext: bytes(&[4; 17]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaCipherEncrypt(psa_cipher_encrypt::Operation {
                key_name: "seed-aes".into(),
                alg: Cipher::Ctr,
                plaintext: bytes(b"p"),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaCipherDecrypt(psa_cipher_decrypt::Operation {
                key_name: "seed-aes".into(),
                alg: Cipher::Ctr,
                ciphertext: bytes(&[5; 17]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaHashCompute(psa_hash_compute::Operation {
                alg: Hash::Sha256,
                input: bytes(b"i"),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaHashCompare(psa_hash_compare::Operation {
                alg: Hash::Sha256,
                input: bytes(b"i"),
                hash: bytes(&[6; 32]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaRawKeyAgreement(psa_raw_key_agreement::Operation {
                alg: RawKeyAgreement::Ecdh,
                private_key_name: key(),
                peer_key: bytes(&[4; 65]),
            }),
        ),
        (
            mbed,
            NativeOperation::PsaGenerateRandom(psa_generate_random::Operation { size: 32 }),
        ),
        (
            mbed,
            NativeOperation::CanDoCrypto(can_do_crypto::Operation {
                check_type: can_do_crypto::CheckType::Generate,
                attributes: p256(),
            }),
        ),
        (
            mbed,
            NativeOperation::PrepareKeyAttestation(
                prepare_key_attestation::Operation::ActivateCredential {
                    attested_key_name: key(),
                    attesting_key_name: None,
                },
            ),
        ),
        (
            mbed,
            NativeOperation::AttestKey(attest_key::Operation::ActivateCredential {
                attested_key_name: key(),
                credential_blob: bytes(&[8; 32]),
                secret: bytes(&[9; 32]),
                attesting_key_name: None,
            }),
        ),
    ]
}

fn main() {
    let dir = std::env::args().nth(1).expect("usage: parsec-seeds DIR");
    std::fs::create_dir_all(&dir).unwrap();
    let converter = ProtobufConverter {};
    let mut opcodes = std::collections::HashSet::new();
    for (provider, operation) in operations() {
        let opcode: Opcode = operation.opcode();
        opcodes.insert(opcode);
        let body = converter
            .operation_to_body(operation)
            .expect("encode the seed");
        let request = Request {
            header: RequestHeader {
                provider,
                session: 0,
                content_type: BodyType::Protobuf,
                accept_type: BodyType::Protobuf,
                auth_type: AuthType::Direct,
                opcode,
            },
            body,
            auth: RequestAuth::new(b"fuzz-app".to_vec()),
        };
        let mut frame = Vec::new();
        request.write_to_stream(&mut frame).unwrap();
        // The fuzz target reads its first byte as the read chunk size.
        let mut seed = vec![35u8];
        seed.extend_from_slice(&frame);
        std::fs::write(format!("{dir}/{opcode:?}"), seed).unwrap();
    }
    println!(
        "parsec-seeds: {} requests, one per opcode, in {dir}",
        opcodes.len()
    );
}
