//! Every operation of the core and the software provider, through the real parsec-client.

mod common;

use common::{p256_signing as ecc_p256_signing, Daemon};
use parsec_client::auth::Authentication;
use parsec_client::core::interface::operations::can_do_crypto::CheckType;
use parsec_client::core::interface::operations::psa_algorithm::*;
use parsec_client::core::interface::operations::psa_key_attributes::*;
use parsec_client::core::interface::requests::{AuthType, Opcode, ProviderId, ResponseStatus};
use parsec_client::error::Error;

fn service_error<T: std::fmt::Debug>(result: Result<T, Error>) -> ResponseStatus {
    match result {
        Err(Error::Service(status)) => status,
        other => panic!("expected a service error, got {other:?}"),
    }
}

fn rsa_encryption(alg: AsymmetricEncryption) -> Attributes {
    let mut usage_flags = UsageFlags::default();
    usage_flags.set_encrypt().set_decrypt();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::RsaKeyPair,
        bits: 2048,
        policy: Policy {
            usage_flags,
            permitted_algorithms: alg.into(),
        },
    }
}

const SHA256_OF_HELLO: [u8; 32] = [
    0x2c, 0xf2, 0x4d, 0xba, 0x5f, 0xb0, 0xa3, 0x0e, 0x26, 0xe8, 0x3b, 0x2a, 0xc5, 0xb9, 0xe2, 0x9e,
    0x1b, 0x16, 0x1e, 0x5c, 0x1f, 0xa7, 0x42, 0x5e, 0x73, 0x04, 0x33, 0x62, 0x93, 0x8b, 0x98, 0x24,
];

#[test]
fn core_operations_describe_the_service() {
    let daemon = Daemon::start("core");
    let client = daemon.client("app");
    assert_eq!(client.ping().unwrap(), (1, 0));
    let providers = client.list_providers().unwrap();
    let ids: Vec<ProviderId> = providers.iter().map(|p| p.id).collect();
    assert_eq!(ids, vec![ProviderId::MbedCrypto, ProviderId::Core]);
    assert_eq!(client.implicit_provider(), ProviderId::MbedCrypto);
    let opcodes = client.list_opcodes(ProviderId::MbedCrypto).unwrap();
    for opcode in [
        Opcode::PsaGenerateKey,
        Opcode::PsaSignHash,
        Opcode::PsaAeadEncrypt,
        Opcode::PsaRawKeyAgreement,
        Opcode::CanDoCrypto,
    ] {
        assert!(opcodes.contains(&opcode), "{opcode:?} missing");
    }
    // Exactly upstream Parsec 1.5.0's list (ListClients and DeleteClient are served, not
    // listed, as upstream does).
    let core = client.list_opcodes(ProviderId::Core).unwrap();
    let expected: std::collections::HashSet<Opcode> = [
        Opcode::Ping,
        Opcode::ListProviders,
        Opcode::ListAuthenticators,
        Opcode::ListOpcodes,
        Opcode::ListKeys,
    ]
    .into_iter()
    .collect();
    assert_eq!(core, expected);
    assert_eq!(
        service_error(client.list_opcodes(ProviderId::Tpm)),
        ResponseStatus::ProviderNotRegistered
    );
    let authenticators = client.list_authenticators().unwrap();
    assert_eq!(authenticators.len(), 1);
    assert_eq!(authenticators[0].id, AuthType::Direct);
    // A client configuring itself as applications do.
    let auto = daemon.default_client(Some("auto"));
    assert_eq!(auto.auth_data(), Authentication::Direct("auto".into()));
}

#[test]
fn ecc_keys_sign_verify_export_and_destroy() {
    let daemon = Daemon::start("ecc");
    let client = daemon.client("app");
    client.psa_generate_key("ecc", ecc_p256_signing()).unwrap();
    assert_eq!(
        service_error(client.psa_generate_key("ecc", ecc_p256_signing())),
        ResponseStatus::PsaErrorAlreadyExists
    );
    let alg = AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    };
    let signature = client.psa_sign_hash("ecc", &SHA256_OF_HELLO, alg).unwrap();
    assert_eq!(signature.len(), 64);
    client
        .psa_verify_hash("ecc", &SHA256_OF_HELLO, alg, &signature)
        .unwrap();
    let mut tampered = signature.clone();
    tampered[10] ^= 1;
    assert_eq!(
        service_error(client.psa_verify_hash("ecc", &SHA256_OF_HELLO, alg, &tampered)),
        ResponseStatus::PsaErrorInvalidSignature
    );
    let public = client.psa_export_public_key("ecc").unwrap();
    assert_eq!(public.len(), 65);
    assert_eq!(public[0], 0x04);
    // The exported public key verifies the signature once imported as a public key.
    let mut verify_only = UsageFlags::default();
    verify_only.set_verify_hash();
    let public_attributes = Attributes {
        key_type: Type::EccPublicKey {
            curve_family: EccFamily::SecpR1,
        },
        policy: Policy {
            usage_flags: verify_only,
            permitted_algorithms: alg.into(),
        },
        ..ecc_p256_signing()
    };
    client
        .psa_import_key("ecc-pub", &public, public_attributes)
        .unwrap();
    client
        .psa_verify_hash("ecc-pub", &SHA256_OF_HELLO, alg, &signature)
        .unwrap();
    // The private key exports because its policy says so.
    assert_eq!(client.psa_export_key("ecc").unwrap().len(), 32);
    // A policy without the sign flag refuses to sign.
    assert_eq!(
        service_error(client.psa_sign_hash("ecc-pub", &SHA256_OF_HELLO, alg)),
        ResponseStatus::PsaErrorNotPermitted
    );
    assert_eq!(
        common::key_names(&client),
        vec!["ecc".to_string(), "ecc-pub".to_string()]
    );
    client.psa_destroy_key("ecc").unwrap();
    assert_eq!(
        service_error(client.psa_destroy_key("ecc")),
        ResponseStatus::PsaErrorDoesNotExist
    );
    assert_eq!(
        service_error(client.psa_sign_hash("ecc", &SHA256_OF_HELLO, alg)),
        ResponseStatus::PsaErrorDoesNotExist
    );
    assert_eq!(client.list_keys().unwrap().len(), 1);
}

#[test]
fn rsa_encrypts_decrypts_and_signs() {
    let daemon = Daemon::start("rsa");
    let client = daemon.client("app");
    for (name, alg) in [
        ("pkcs1", AsymmetricEncryption::RsaPkcs1v15Crypt),
        (
            "oaep",
            AsymmetricEncryption::RsaOaep {
                hash_alg: Hash::Sha256,
            },
        ),
    ] {
        client.psa_generate_key(name, rsa_encryption(alg)).unwrap();
        let ciphertext = client
            .psa_asymmetric_encrypt(name, alg, b"secret", None)
            .unwrap();
        assert_eq!(ciphertext.len(), 256);
        let plaintext = client
            .psa_asymmetric_decrypt(name, alg, &ciphertext, None)
            .unwrap();
        assert_eq!(plaintext, b"secret");
        let mut bad = ciphertext.clone();
        bad[0] ^= 0xff;
        assert!(client
            .psa_asymmetric_decrypt(name, alg, &bad, None)
            .is_err());
    }
    let mut usage_flags = UsageFlags::default();
    usage_flags.set_sign_hash().set_verify_hash();
    let sign = AsymmetricSignature::RsaPkcs1v15Sign {
        hash_alg: Hash::Sha256.into(),
    };
    client
        .psa_generate_key(
            "rsa-sign",
            Attributes {
                lifetime: Lifetime::Persistent,
                key_type: Type::RsaKeyPair,
                bits: 2048,
                policy: Policy {
                    usage_flags,
                    permitted_algorithms: sign.into(),
                },
            },
        )
        .unwrap();
    let signature = client
        .psa_sign_hash("rsa-sign", &SHA256_OF_HELLO, sign)
        .unwrap();
    client
        .psa_verify_hash("rsa-sign", &SHA256_OF_HELLO, sign, &signature)
        .unwrap();
    let public = client.psa_export_public_key("rsa-sign").unwrap();
    assert_eq!(public[0], 0x30, "DER RSAPublicKey");
}

#[test]
fn aead_hash_random_agreement_and_capabilities() {
    let daemon = Daemon::start("symmetric");
    let client = daemon.client("app");
    // AEAD with an imported AES key.
    let gcm = Aead::AeadWithDefaultLengthTag(AeadWithDefaultLengthTag::Gcm);
    let mut usage_flags = UsageFlags::default();
    usage_flags.set_encrypt().set_decrypt();
    let aes = Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::Aes,
        bits: 128,
        policy: Policy {
            usage_flags,
            permitted_algorithms: gcm.into(),
        },
    };
    client.psa_import_key("aes", &[7u8; 16], aes).unwrap();
    let nonce = [1u8; 12];
    let ciphertext = client
        .psa_aead_encrypt("aes", gcm, &nonce, b"header", b"payload")
        .unwrap();
    assert_eq!(ciphertext.len(), 7 + 16);
    let plaintext = client
        .psa_aead_decrypt("aes", gcm, &nonce, b"header", &ciphertext)
        .unwrap();
    assert_eq!(plaintext, b"payload");
    assert_eq!(
        service_error(client.psa_aead_decrypt("aes", gcm, &nonce, b"other header", &ciphertext)),
        ResponseStatus::PsaErrorInvalidSignature
    );
    // Hashes.
    let hash = client.psa_hash_compute(Hash::Sha256, b"hello").unwrap();
    assert_eq!(hash, SHA256_OF_HELLO);
    client
        .psa_hash_compare(Hash::Sha256, b"hello", &SHA256_OF_HELLO)
        .unwrap();
    assert_eq!(
        service_error(client.psa_hash_compare(Hash::Sha256, b"hellO", &SHA256_OF_HELLO)),
        ResponseStatus::PsaErrorInvalidSignature
    );
    // Random bytes, and a request over the output limit.
    let random = client.psa_generate_random(64).unwrap();
    assert_eq!(random.len(), 64);
    assert_ne!(random, vec![0u8; 64]);
    assert_eq!(
        service_error(client.psa_generate_random(2 << 20)),
        ResponseStatus::ResponseTooLarge
    );
    // Raw ECDH between two keys gives the same secret both ways.
    let ecdh = RawKeyAgreement::Ecdh;
    let agreement = common::attributes(common::ecc(), 256, KeyAgreement::Raw(ecdh));
    client.psa_generate_key("alice", agreement).unwrap();
    client.psa_generate_key("bob", agreement).unwrap();
    let alice_public = client.psa_export_public_key("alice").unwrap();
    let bob_public = client.psa_export_public_key("bob").unwrap();
    let ab = client
        .psa_raw_key_agreement(ecdh, "alice", &bob_public)
        .unwrap();
    let ba = client
        .psa_raw_key_agreement(ecdh, "bob", &alice_public)
        .unwrap();
    assert_eq!(ab.len(), 32);
    assert_eq!(ab, ba);
    // CanDoCrypto.
    client
        .can_do_crypto(CheckType::Generate, common_p256())
        .unwrap();
    let odd = Attributes {
        bits: 255,
        ..common_p256()
    };
    assert_eq!(
        service_error(client.can_do_crypto(CheckType::Generate, odd)),
        ResponseStatus::PsaErrorNotSupported
    );
}

fn common_p256() -> Attributes {
    ecc_p256_signing()
}

/// SignMessage and VerifyMessage, beyond upstream 1.5.0: ECDSA P-256 and RSA PSS.
#[test]
fn messages_are_signed_and_verified() {
    let daemon = Daemon::start("messages");
    let client = daemon.client("alice");
    common::assert_messages_signed_and_verified(&client);
}

#[test]
fn can_do_crypto_follows_upstreams_rules() {
    let daemon = Daemon::start("can-do");
    common::assert_can_do_crypto_rules(&daemon.client("alice"));
}

#[test]
fn applications_cannot_reach_each_others_keys() {
    let daemon = Daemon::start("isolation");
    let alice = daemon.client("alice");
    let mallory = daemon.client("mallory");
    let alg = AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    };
    alice
        .psa_generate_key("shared-name", ecc_p256_signing())
        .unwrap();
    // Mallory sees nothing, can use nothing, destroy nothing, export nothing.
    assert!(mallory.list_keys().unwrap().is_empty());
    assert_eq!(
        service_error(mallory.psa_sign_hash("shared-name", &SHA256_OF_HELLO, alg)),
        ResponseStatus::PsaErrorDoesNotExist
    );
    assert_eq!(
        service_error(mallory.psa_export_public_key("shared-name")),
        ResponseStatus::PsaErrorDoesNotExist
    );
    assert_eq!(
        service_error(mallory.psa_export_key("shared-name")),
        ResponseStatus::PsaErrorDoesNotExist
    );
    assert_eq!(
        service_error(mallory.psa_destroy_key("shared-name")),
        ResponseStatus::PsaErrorDoesNotExist
    );
    // Creating the same name makes Mallory's own key, not an overwrite of Alice's.
    mallory
        .psa_generate_key("shared-name", ecc_p256_signing())
        .unwrap();
    let alice_public = alice.psa_export_public_key("shared-name").unwrap();
    let mallory_public = mallory.psa_export_public_key("shared-name").unwrap();
    assert_ne!(alice_public, mallory_public);
    mallory.psa_destroy_key("shared-name").unwrap();
    let signature = alice
        .psa_sign_hash("shared-name", &SHA256_OF_HELLO, alg)
        .unwrap();
    alice
        .psa_verify_hash("shared-name", &SHA256_OF_HELLO, alg, &signature)
        .unwrap();
    // UTF-8 names work and stay separate.
    alice
        .psa_generate_key("clé-🔑", ecc_p256_signing())
        .unwrap();
    assert!(alice
        .list_keys()
        .unwrap()
        .iter()
        .any(|k| k.name == "clé-🔑"));
}

#[test]
fn admins_list_and_delete_clients_and_others_cannot() {
    let daemon = Daemon::start("admin");
    let admin = daemon.client("admin");
    let alice = daemon.client("alice");
    let bob = daemon.client("bob");
    alice.psa_generate_key("a1", ecc_p256_signing()).unwrap();
    alice.psa_generate_key("a2", ecc_p256_signing()).unwrap();
    bob.psa_generate_key("b1", ecc_p256_signing()).unwrap();
    assert_eq!(
        service_error(alice.list_clients()),
        ResponseStatus::AdminOperation
    );
    assert_eq!(
        service_error(alice.delete_client("bob")),
        ResponseStatus::AdminOperation
    );
    let mut clients = admin.list_clients().unwrap();
    clients.sort();
    assert_eq!(clients, vec!["alice".to_string(), "bob".to_string()]);
    admin.delete_client("alice").unwrap();
    assert!(alice.list_keys().unwrap().is_empty());
    assert_eq!(bob.list_keys().unwrap().len(), 1);
    assert_eq!(admin.list_clients().unwrap(), vec!["bob".to_string()]);
    // Alice can start again with the same names.
    alice.psa_generate_key("a1", ecc_p256_signing()).unwrap();
    // Unauthenticated callers may ping but not list keys or use keys.
    let mut anonymous = daemon.client("x");
    anonymous.set_auth_data(Authentication::None);
    assert_eq!(anonymous.ping().unwrap(), (1, 0));
    assert_eq!(
        service_error(anonymous.list_keys()),
        ResponseStatus::NotAuthenticated
    );
    assert_eq!(
        service_error(anonymous.list_clients()),
        ResponseStatus::NotAuthenticated
    );
    assert_eq!(
        service_error(anonymous.psa_generate_key("k", ecc_p256_signing())),
        ResponseStatus::NotAuthenticated
    );
    // A client using an authenticator the service does not run.
    let mut wrong = daemon.client("x");
    wrong.set_auth_data(Authentication::UnixPeerCredentials);
    assert_eq!(
        service_error(wrong.list_keys()),
        ResponseStatus::AuthenticatorNotRegistered
    );
    // Failed requests are logged with application, provider, opcode, cause and hint.
    let log = daemon.log_text();
    assert!(
        log.contains(
            "request failed: app=alice provider=Core opcode=ListClients status=AdminOperation"
        ),
        "{log}"
    );
    assert!(log.contains("hint="), "{log}");
}

#[test]
fn keys_the_provider_cannot_make_promptly_are_refused_before_trying() {
    let daemon = Daemon::start("refused");
    let client = daemon.client("app");
    let start = std::time::Instant::now();
    let huge = Attributes {
        bits: 8192,
        ..rsa_encryption(AsymmetricEncryption::RsaPkcs1v15Crypt)
    };
    assert_eq!(
        service_error(client.psa_generate_key("huge", huge)),
        ResponseStatus::PsaErrorNotSupported
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "the service tried to generate it"
    );
    let odd_curve = Attributes {
        bits: 200,
        ..ecc_p256_signing()
    };
    assert_eq!(
        service_error(client.psa_generate_key("odd", odd_curve)),
        ResponseStatus::PsaErrorNotSupported
    );
    assert!(client.list_keys().unwrap().is_empty());
}

/// RSA key generation runs in a child process: the loop keeps answering meanwhile, and
/// each child draws fresh randomness (two children forked from the same state must not
/// make the same key).
#[test]
fn rsa_generation_does_not_hold_the_loop_and_keys_differ() {
    let daemon = Daemon::start("rsa-child");
    let alg = AsymmetricEncryption::RsaPkcs1v15Crypt;
    let generator = daemon.client("slow");
    let big = Attributes {
        bits: 4096,
        ..rsa_encryption(alg)
    };
    let generation = std::thread::spawn(move || {
        generator.psa_generate_key("big", big).unwrap();
        std::time::Instant::now()
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    let pinger = daemon.client("pinger");
    let mut last_ping = std::time::Instant::now();
    // A handful of quick requests: they take milliseconds, an RSA-4096 generation far longer.
    for _ in 0..5 {
        assert_eq!(pinger.ping().unwrap(), (1, 0));
        pinger.psa_hash_compute(Hash::Sha256, b"x").unwrap();
        last_ping = std::time::Instant::now();
    }
    let generated_at = generation.join().unwrap();
    assert!(
        last_ping < generated_at,
        "the pings waited for the RSA-4096 generation to finish"
    );
    assert!(
        daemon.log_text().contains("deferred PsaGenerateKey"),
        "{}",
        daemon.log_text()
    );

    let client = daemon.client("app");
    client.psa_generate_key("one", rsa_encryption(alg)).unwrap();
    client.psa_generate_key("two", rsa_encryption(alg)).unwrap();
    let one = client.psa_export_public_key("one").unwrap();
    let two = client.psa_export_public_key("two").unwrap();
    assert_ne!(
        one, two,
        "two generation processes made the same key: not reseeded"
    );
    // The generated key works and survives as any other.
    let ciphertext = client
        .psa_asymmetric_encrypt("one", alg, b"m", None)
        .unwrap();
    assert_eq!(
        client
            .psa_asymmetric_decrypt("one", alg, &ciphertext, None)
            .unwrap(),
        b"m"
    );
    assert_eq!(
        service_error(client.psa_generate_key("one", rsa_encryption(alg))),
        ResponseStatus::PsaErrorAlreadyExists
    );
}

/// A client that reads until end-of-file is not kept waiting by a key generation process
/// holding a copy of its socket.
#[test]
fn a_key_generation_process_holds_no_client_socket() {
    use std::io::{Read, Write};
    let daemon = Daemon::start("rsa-fds");
    // Connected (and accepted by the service) before the generation process is forked.
    let mut stream = std::os::unix::net::UnixStream::connect(&daemon.socket).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let generator = daemon.client("slow");
    let big = Attributes {
        bits: 4096,
        ..rsa_encryption(AsymmetricEncryption::RsaPkcs1v15Crypt)
    };
    let generation = std::thread::spawn(move || {
        generator.psa_generate_key("big", big).unwrap();
        std::time::Instant::now()
    });
    std::thread::sleep(std::time::Duration::from_millis(20));
    // A raw ping, read to the end of the stream, while the child runs.
    stream.write_all(&common::ping_frame()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    // The generation process must still be running: end-of-file did not wait for it.
    let children = daemon.children();
    assert_eq!(common::status_of(&response), 0);
    let running = children.iter().any(|child| {
        // Field 3 of stat is the state; an ended child is a zombie (Z) until it is reaped.
        std::fs::read_to_string(format!("/proc/{child}/stat"))
            .map(|stat| {
                stat.rsplit(") ")
                    .next()
                    .is_some_and(|rest| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    });
    assert!(
        running,
        "end-of-file came only when the generation process ended"
    );
    generation.join().unwrap();
}

/// Raw ECDH on every curve the software provider lists, checked against openssl.
#[test]
fn raw_key_agreement_on_every_curve_matches_openssl() {
    let daemon = Daemon::start("ecdh-curves");
    let client = daemon.client("alice");
    common::assert_raw_ecdh_matches_openssl(
        &client,
        &daemon,
        &[
            (EccFamily::SecpR1, 256, "prime256v1"),
            (EccFamily::SecpR1, 521, "secp521r1"),
            (EccFamily::SecpK1, 256, "secp256k1"),
            (EccFamily::BrainpoolPR1, 256, "brainpoolP256r1"),
            (EccFamily::BrainpoolPR1, 384, "brainpoolP384r1"),
            (EccFamily::BrainpoolPR1, 512, "brainpoolP512r1"),
        ],
    );
    // Curve448 is not in this Mbed TLS: CanDoCrypto says so rather than Ok.
    let x448 = common::attributes(
        Type::EccKeyPair {
            curve_family: EccFamily::Montgomery,
        },
        448,
        KeyAgreement::Raw(RawKeyAgreement::Ecdh),
    );
    assert_eq!(
        service_error(client.can_do_crypto(CheckType::Generate, x448)),
        ResponseStatus::PsaErrorNotSupported
    );
}

/// RFC 7027's brainpoolP256r1 ECDH test vector (section A.1): A's private key imported, B's
/// public point, the x coordinate of the shared point. Upstream Parsec 1.5.0 passes it.
#[test]
fn brainpool_p256_agreement_matches_rfc_7027() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let d_a = hex("81DB1EE100150FF2EA338D708271BE38300CB54241D79950F77B063039804F1D");
    let q_b = hex(concat!(
        "04",
        "8D2D688C6CF93E1160AD04CC4429117DC2C41825E1E9FCA0ADDD34E6F1B39F7B",
        "990C57520812BE512641E47034832106BC7D3E8DD0E4C7F1136D7006547CEC6A"
    ));
    let z = hex("89AFC39D41D3B327814B80940B042590F96556EC91E6AE7939BCE31F3A18BF2B");
    let daemon = Daemon::start("ecdh-rfc7027");
    let client = daemon.client("alice");
    // As upstream's own e2e client asks: size 0 (taken from the data), volatile.
    let attributes = Attributes {
        lifetime: Lifetime::Volatile,
        ..common::attributes(
            Type::EccKeyPair {
                curve_family: EccFamily::BrainpoolPR1,
            },
            0,
            KeyAgreement::Raw(RawKeyAgreement::Ecdh),
        )
    };
    client
        .psa_import_key("a", &d_a, attributes)
        .unwrap_or_else(|e| panic!("import: {e:?}\n{}", daemon.log_text()));
    let secret = client
        .psa_raw_key_agreement(RawKeyAgreement::Ecdh, "a", &q_b)
        .unwrap_or_else(|e| panic!("agreement: {e:?}\n{}", daemon.log_text()));
    assert_eq!(secret, z);
}

/// Upstream's e2e `check_format_import3`: an RSA public key of 8192 bits declared as 1023 is
/// an invalid argument (the data is not what the attributes say), though the software
/// provider holds neither size; declared as what it is, it is not supported.
#[test]
fn an_import_declared_with_another_size_than_its_data_is_invalid() {
    let daemon = Daemon::start("import-size");
    let client = daemon.client("alice");
    // RSAPublicKey { modulus: 1024 bytes of 0xDE (a leading 0: it is positive), 65537 }.
    let mut der = vec![0x30, 0x82, 0x04, 0x0A, 0x02, 0x82, 0x04, 0x01, 0x00];
    der.extend([0xDE; 1024]);
    der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
    let mut verify = UsageFlags::default();
    verify.set_verify_hash();
    let attributes = |bits| Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::RsaPublicKey,
        bits,
        policy: Policy {
            usage_flags: verify,
            permitted_algorithms: AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
        },
    };
    assert_eq!(
        service_error(client.psa_import_key("rsa", &der, attributes(1023))),
        ResponseStatus::PsaErrorInvalidArgument
    );
    assert_eq!(
        service_error(client.psa_import_key("rsa", &der, attributes(8192))),
        ResponseStatus::PsaErrorNotSupported
    );
    assert!(client.list_keys().unwrap().is_empty());
}
