//! The TPM provider against a real software TPM (swtpm), through the real parsec-client.
#![cfg(feature = "tpm-provider")]

mod common;

use common::{
    attributes, ecc, ecdsa, fresh_dir, generate_encrypt_decrypt, generate_sign_verify,
    service_error, sha, with_tpm_first, Daemon, Swtpm, BIN,
};
use parsec_client::core::interface::operations::can_do_crypto::CheckType;
use parsec_client::core::interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::{EccFamily, Type, UsageFlags};
use parsec_client::core::interface::requests::{ProviderId, ResponseStatus};
use parsec_client::BasicClient;
use std::process::Command;
use std::time::{Duration, Instant};

fn tpm_daemon(name: &str, tpm: &Swtpm) -> Daemon {
    let tcti = tpm.tcti();
    Daemon::start_edited(name, "Direct", &["admin"], |text| {
        with_tpm_first(text, &tcti)
    })
}

fn tpm_client(daemon: &Daemon, app: &str) -> BasicClient {
    let mut client = daemon.client(app);
    client.set_implicit_provider(ProviderId::Tpm);
    client
}

/// As upstream Parsec 1.5.0: generating a public-key type is an invalid argument.
#[test]
fn generating_a_public_key_is_an_invalid_argument() {
    let tpm = Swtpm::start("public-gen");
    let daemon = tpm_daemon("tpm-public-gen", &tpm);
    let client = tpm_client(&daemon, "alice");
    common::assert_public_key_generation_refused(&client);
}

/// Raw ECDH (beyond upstream 1.5.0) on P-256 and P-384, checked against openssl.
#[test]
fn raw_key_agreement_matches_openssl() {
    let tpm = Swtpm::start("ecdh");
    let daemon = tpm_daemon("tpm-ecdh", &tpm);
    let client = tpm_client(&daemon, "alice");
    common::assert_raw_ecdh_matches_openssl(&client, &daemon, common::SECP_R1_256_384);
}

/// SignMessage and VerifyMessage, beyond upstream 1.5.0: ECDSA P-256 and RSA PSS.
#[test]
fn messages_are_signed_and_verified() {
    let tpm = Swtpm::start("messages");
    let daemon = tpm_daemon("tpm-messages", &tpm);
    let client = tpm_client(&daemon, "alice");
    common::assert_messages_signed_and_verified(&client);
}

#[test]
fn can_do_crypto_follows_upstreams_rules() {
    let tpm = Swtpm::start("can-do");
    let daemon = tpm_daemon("tpm-can-do", &tpm);
    common::assert_can_do_crypto_rules(&tpm_client(&daemon, "alice"));
}

#[test]
fn imports_follow_upstreams_size_rules() {
    let tpm = Swtpm::start("import-sizes");
    let daemon = tpm_daemon("tpm-import-sizes", &tpm);
    let client = tpm_client(&daemon, "alice");
    common::assert_import_size_rules(&client, &daemon.dir);
}

/// Every operation the provider serves, for every key kind the issue names.
#[test]
fn every_operation_through_parsec_client() {
    let tpm = Swtpm::start("ops");
    let daemon = tpm_daemon("tpm-ops", &tpm);
    let client = tpm_client(&daemon, "alice");

    // Signing keys: ECDSA P-256 and P-384, RSA 2048 PKCS#1 v1.5 and PSS.
    let signing = [
        ("p256", ecc(), 256, ecdsa(Hash::Sha256), Hash::Sha256),
        ("p384", ecc(), 384, ecdsa(Hash::Sha384), Hash::Sha384),
        (
            "rsa-pkcs1",
            Type::RsaKeyPair,
            2048,
            AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            },
            Hash::Sha256,
        ),
        (
            "rsa-pss",
            Type::RsaKeyPair,
            2048,
            AsymmetricSignature::RsaPss {
                hash_alg: Hash::Sha256.into(),
            },
            Hash::Sha256,
        ),
    ];
    for (name, key_type, bits, alg, hash) in signing {
        let signature = generate_sign_verify(&client, name, key_type, bits, alg, hash);
        if let Type::EccKeyPair { .. } = key_type {
            assert_eq!(
                client.psa_export_public_key(name).unwrap().len(),
                1 + 2 * bits / 8
            );
            assert_eq!(signature.len(), 2 * bits / 8);
        }
    }
    let log = daemon.log_text();
    assert!(
        log.contains("TPM_RC_SIGNATURE (0x"),
        "decoded response code in the log:\n{log}"
    );
    assert!(log.contains("format one, parameter"), "{log}");

    // Encryption keys: OAEP (SHA-256) and PKCS#1 v1.5.
    for (name, alg) in [
        (
            "rsa-oaep",
            AsymmetricEncryption::RsaOaep {
                hash_alg: Hash::Sha256,
            },
        ),
        ("rsa-v15", AsymmetricEncryption::RsaPkcs1v15Crypt),
    ] {
        generate_encrypt_decrypt(&client, name, alg);
    }
    // OAEP labels: the TPM needs the terminating zero, and says so.
    let oaep = AsymmetricEncryption::RsaOaep {
        hash_alg: Hash::Sha256,
    };
    let labelled = client
        .psa_asymmetric_encrypt("rsa-oaep", oaep, b"x", Some(b"label\0"))
        .unwrap();
    assert_eq!(
        client
            .psa_asymmetric_decrypt("rsa-oaep", oaep, &labelled, Some(b"label\0"))
            .unwrap(),
        b"x"
    );
    assert_eq!(
        service_error(
            client
                .psa_asymmetric_encrypt("rsa-oaep", oaep, b"x", Some(b"label"))
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );

    // Random bytes, more than one TPM2_GetRandom gives.
    let random = client.psa_generate_random(100).unwrap();
    assert_eq!(random.len(), 100);
    assert_ne!(random, client.psa_generate_random(100).unwrap());

    // CanDoCrypto: what the TPM can and cannot do.
    client
        .can_do_crypto(
            CheckType::Generate,
            attributes(ecc(), 256, ecdsa(Hash::Sha256)),
        )
        .unwrap();
    assert_eq!(
        service_error(
            client
                .can_do_crypto(
                    CheckType::Generate,
                    attributes(
                        Type::EccKeyPair {
                            curve_family: EccFamily::SecpK1
                        },
                        256,
                        ecdsa(Hash::Sha256)
                    )
                )
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );
    let mut exportable = attributes(ecc(), 256, ecdsa(Hash::Sha256));
    exportable.policy.usage_flags.set_export();
    assert_eq!(
        service_error(
            client
                .psa_generate_key("exportable", exportable)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );

    // Keys are the application's own, listed under the TPM provider, and destroyable.
    let listed = client.list_keys().unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|k| k.provider_id == ProviderId::Tpm)
            .count(),
        6
    );
    let bob = tpm_client(&daemon, "bob");
    assert_eq!(
        service_error(bob.psa_export_public_key("p256").unwrap_err()),
        ResponseStatus::PsaErrorDoesNotExist
    );
    client.psa_destroy_key("p256").unwrap();
    assert_eq!(
        service_error(
            client
                .psa_sign_hash("p256", &[0; 32], ecdsa(Hash::Sha256))
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorDoesNotExist
    );
}

/// Software and TPM providers side by side: keys and data move between them.
#[test]
fn two_providers_exchange_public_keys_and_private_keys() {
    let tpm = Swtpm::start("two");
    let daemon = tpm_daemon("tpm-two", &tpm);
    let tpm_side = tpm_client(&daemon, "carol");
    let mut soft = daemon.client("carol");
    soft.set_implicit_provider(ProviderId::MbedCrypto);
    let providers: Vec<ProviderId> = soft
        .list_providers()
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(
        providers,
        [ProviderId::Tpm, ProviderId::MbedCrypto, ProviderId::Core]
    );

    // TPM signs, software verifies with the imported public key (ECC P-256).
    let alg = ecdsa(Hash::Sha256);
    let mut sign_only = attributes(ecc(), 256, alg);
    sign_only.policy.usage_flags = UsageFlags::default();
    sign_only
        .policy
        .usage_flags
        .set_sign_hash()
        .set_verify_hash();
    tpm_side.psa_generate_key("tpm-ecc", sign_only).unwrap();
    let public = tpm_side.psa_export_public_key("tpm-ecc").unwrap();
    let mut public_attrs = sign_only;
    public_attrs.key_type = Type::EccPublicKey {
        curve_family: EccFamily::SecpR1,
    };
    public_attrs.policy.usage_flags = UsageFlags::default();
    public_attrs.policy.usage_flags.set_verify_hash();
    soft.psa_import_key("tpm-ecc-pub", &public, public_attrs)
        .unwrap();
    let digest = sha(Hash::Sha256, b"made in the TPM");
    let signature = tpm_side.psa_sign_hash("tpm-ecc", &digest, alg).unwrap();
    soft.psa_verify_hash("tpm-ecc-pub", &digest, alg, &signature)
        .unwrap();

    // Software signs (RSA), the TPM verifies with the imported public key.
    let rsa_alg = AsymmetricSignature::RsaPkcs1v15Sign {
        hash_alg: Hash::Sha256.into(),
    };
    let mut soft_rsa = attributes(Type::RsaKeyPair, 2048, rsa_alg);
    soft_rsa.policy.usage_flags = UsageFlags::default();
    soft_rsa
        .policy
        .usage_flags
        .set_sign_hash()
        .set_verify_hash()
        .set_export();
    soft.psa_generate_key("soft-rsa", soft_rsa).unwrap();
    let soft_public = soft.psa_export_public_key("soft-rsa").unwrap();
    let mut rsa_public = soft_rsa;
    rsa_public.key_type = Type::RsaPublicKey;
    rsa_public.policy.usage_flags = UsageFlags::default();
    rsa_public.policy.usage_flags.set_verify_hash();
    tpm_side
        .psa_import_key("soft-rsa-pub", &soft_public, rsa_public)
        .unwrap();
    let digest = sha(Hash::Sha256, b"made in software");
    let signature = soft.psa_sign_hash("soft-rsa", &digest, rsa_alg).unwrap();
    tpm_side
        .psa_verify_hash("soft-rsa-pub", &digest, rsa_alg, &signature)
        .unwrap();
    assert_eq!(
        tpm_side.psa_export_public_key("soft-rsa-pub").unwrap(),
        soft_public
    );

    // A private key moves into the TPM: exported from software, imported, signs there.
    let private = soft.psa_export_key("soft-rsa").unwrap();
    let mut imported = soft_rsa;
    imported.policy.usage_flags = UsageFlags::default();
    imported
        .policy
        .usage_flags
        .set_sign_hash()
        .set_verify_hash();
    tpm_side
        .psa_import_key("imported-rsa", &private, imported)
        .unwrap();
    let signature = tpm_side
        .psa_sign_hash("imported-rsa", &digest, rsa_alg)
        .unwrap();
    soft.psa_verify_hash("soft-rsa", &digest, rsa_alg, &signature)
        .unwrap();
    // An ECC private key too: PSA gives the scalar, the TPM needs the point as well.
    let alg = ecdsa(Hash::Sha256);
    let mut soft_ecc = attributes(ecc(), 256, alg);
    soft_ecc.policy.usage_flags.set_export();
    soft.psa_generate_key("soft-ecc", soft_ecc).unwrap();
    let scalar = soft.psa_export_key("soft-ecc").unwrap();
    tpm_side
        .psa_import_key("imported-ecc", &scalar, attributes(ecc(), 256, alg))
        .unwrap();
    assert_eq!(
        tpm_side.psa_export_public_key("imported-ecc").unwrap(),
        soft.psa_export_public_key("soft-ecc").unwrap()
    );
    let digest = sha(Hash::Sha256, b"imported ECC");
    let signature = tpm_side
        .psa_sign_hash("imported-ecc", &digest, alg)
        .unwrap();
    soft.psa_verify_hash("soft-ecc", &digest, alg, &signature)
        .unwrap();
    // P-384 (which this build's Mbed TLS cannot generate): a scalar from the TPM's random
    // numbers, its point computed independently; the TPM checks the two are bound.
    let alg = ecdsa(Hash::Sha384);
    let (scalar, point) = loop {
        let bytes = tpm_side.psa_generate_random(48).unwrap();
        if let Ok(key) = p384::SecretKey::from_slice(&bytes) {
            use p384::elliptic_curve::sec1::ToEncodedPoint;
            break (
                bytes,
                key.public_key().to_encoded_point(false).as_bytes().to_vec(),
            );
        }
    };
    tpm_side
        .psa_import_key("imported-p384", &scalar, attributes(ecc(), 384, alg))
        .unwrap();
    assert_eq!(
        tpm_side.psa_export_public_key("imported-p384").unwrap(),
        point
    );
    let digest = sha(Hash::Sha384, b"imported P-384");
    let signature = tpm_side
        .psa_sign_hash("imported-p384", &digest, alg)
        .unwrap();
    tpm_side
        .psa_verify_hash("imported-p384", &digest, alg, &signature)
        .unwrap();
    assert_eq!(
        service_error(
            tpm_side
                .psa_import_key(
                    "zero",
                    &[0u8; 32],
                    attributes(ecc(), 256, ecdsa(Hash::Sha256))
                )
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorInvalidArgument
    );
    // Malformed key data is refused as such.
    assert_eq!(
        service_error(
            tpm_side
                .psa_import_key("junk", &private[..40], imported)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorInvalidArgument
    );
}

/// Keys are wrapped blobs in the key store: they survive the service restarting, and the
/// TPM being reset (swtpm stopped and started on its state).
/// `kill -9` twice while a key is loaded, on a TPM without a resource manager (swtpm, with
/// libtpms's three transient object slots): each start flushes what the killed process left
/// (its primary key, the loaded key, its session), so the service starts and signs after
/// both. Before, one kill left every TPM sign failing for want of an object slot, and two
/// left too few slots for the primary key: the service exited at start-up.
#[test]
fn a_killed_service_leaves_nothing_in_a_tpm_without_resource_manager() {
    let tpm = Swtpm::start("leftovers");
    let mut daemon = tpm_daemon("tpm-leftovers", &tpm);
    let alg = ecdsa(Hash::Sha256);
    tpm_client(&daemon, "erin")
        .psa_generate_key("k", attributes(ecc(), 256, alg))
        .unwrap();
    for round in 0..2 {
        let client = tpm_client(&daemon, "erin");
        let hash = common::sha(Hash::Sha256, b"loaded");
        let signature = client
            .psa_sign_hash("k", &hash, alg)
            .unwrap_or_else(|e| panic!("sign in round {round}: {e:?}"));
        client.psa_verify_hash("k", &hash, alg, &signature).unwrap();
        daemon.kill9();
        daemon.spawn();
        assert!(
            daemon.log_text().contains("tpm: flushed"),
            "round {round}: nothing flushed:\n{}",
            daemon.log_text()
        );
    }
    let client = tpm_client(&daemon, "erin");
    let hash = common::sha(Hash::Sha256, b"after");
    let signature = client.psa_sign_hash("k", &hash, alg).unwrap();
    client.psa_verify_hash("k", &hash, alg, &signature).unwrap();
}

#[test]
fn keys_survive_service_restart_and_tpm_reset() {
    let tpm = Swtpm::start("persist");
    let mut daemon = tpm_daemon("tpm-persist", &tpm);
    let client = tpm_client(&daemon, "dave");
    let alg = ecdsa(Hash::Sha256);
    client
        .psa_generate_key("kept", attributes(ecc(), 256, alg))
        .unwrap();
    let oaep = AsymmetricEncryption::RsaOaep {
        hash_alg: Hash::Sha256,
    };
    client
        .psa_generate_key("kept-rsa", attributes(Type::RsaKeyPair, 2048, oaep))
        .unwrap();
    let ciphertext = client
        .psa_asymmetric_encrypt("kept-rsa", oaep, b"before", None)
        .unwrap();
    let public = client.psa_export_public_key("kept").unwrap();
    drop(client);
    assert!(daemon.stop().success());

    // TPM reset: swtpm restarts on the same state with Startup(CLEAR).
    let state = tpm.stop();
    let tpm = Swtpm::start_with_state(state);
    let tcti = tpm.tcti();
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let config: String = config
        .lines()
        .map(|l| {
            if l.starts_with("tcti = ") {
                format!("tcti = \"{tcti}\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.spawn();
    let client = tpm_client(&daemon, "dave");
    assert_eq!(client.psa_export_public_key("kept").unwrap(), public);
    let digest = sha(Hash::Sha256, b"after the reset");
    let signature = client.psa_sign_hash("kept", &digest, alg).unwrap();
    client
        .psa_verify_hash("kept", &digest, alg, &signature)
        .unwrap();
    assert_eq!(
        client
            .psa_asymmetric_decrypt("kept-rsa", oaep, &ciphertext, None)
            .unwrap(),
        b"before"
    );

    // The TPM restarts under the running service: the next request reconnects.
    let state = tpm.stop();
    let restarted = Swtpm::start_with_state(state);
    // Same ports are not guaranteed, so point the config at the new ones and reload.
    let config = std::fs::read_to_string(&daemon.config).unwrap();
    let config = config.replace(&tcti, &restarted.tcti());
    std::fs::write(&daemon.config, config).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let start = Instant::now();
    loop {
        match client.psa_sign_hash("kept", &digest, alg) {
            Ok(signature) => {
                client
                    .psa_verify_hash("kept", &digest, alg, &signature)
                    .unwrap();
                break;
            }
            Err(e) => assert!(
                start.elapsed() < Duration::from_secs(10),
                "{e:?}\n{}",
                daemon.log_text()
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The same swtpm port, stopped and started under a running service: the provider notices
/// the broken connection and reconnects without a restart or reload.
#[test]
fn reconnects_when_the_tpm_comes_back() {
    let tpm = Swtpm::start("reconnect");
    let port = tpm.port;
    let daemon = tpm_daemon("tpm-reconnect", &tpm);
    let client = tpm_client(&daemon, "erin");
    let alg = ecdsa(Hash::Sha256);
    client
        .psa_generate_key("k", attributes(ecc(), 256, alg))
        .unwrap();
    let digest = sha(Hash::Sha256, b"x");
    client.psa_sign_hash("k", &digest, alg).unwrap();

    let state = tpm.stop();
    // While the TPM is away: a clear failure, and core operations still answered.
    let status = service_error(client.psa_sign_hash("k", &digest, alg).unwrap_err());
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    client.ping().unwrap();
    let log = daemon.log_text();
    assert!(
        log.contains("TCTI layer") || log.contains("cannot open the TPM"),
        "{log}"
    );

    // Back on the same port (retried: the port may be briefly unavailable).
    let start = Instant::now();
    let _tpm = loop {
        if let Some(tpm) = Swtpm::start_on_port(state.clone(), port) {
            break tpm;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "swtpm could not get its port back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let signature = client.psa_sign_hash("k", &digest, alg).unwrap();
    client
        .psa_verify_hash("k", &digest, alg, &signature)
        .unwrap();
    assert!(
        daemon.log_text().contains("reconnecting"),
        "{}",
        daemon.log_text()
    );
}

/// Attestation end to end: the verifier's MakeCredential in Rust (no TPM), the service's
/// ActivateCredential in swtpm, the same secret back; altered challenges refused.
#[test]
fn attestation_round_trip_with_rust_make_credential() {
    let tpm = Swtpm::start("attest");
    let daemon = tpm_daemon("tpm-attest", &tpm);
    let client = tpm_client(&daemon, "frank");
    for (name, key_type, bits, alg) in [
        (
            "attested-ecc",
            ecc(),
            256,
            Algorithm::from(ecdsa(Hash::Sha256)),
        ),
        (
            "attested-rsa",
            Type::RsaKeyPair,
            2048,
            AsymmetricSignature::RsaPss {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
        ),
    ] {
        client
            .psa_generate_key(name, attributes(key_type, bits, alg))
            .unwrap();
        let prepared = client
            .prepare_activate_credential(name.to_string(), None)
            .unwrap();
        assert!(
            tpm_credential::name_matches_public(&prepared.name, &prepared.public),
            "{name}: the name is the hash of the public area"
        );

        let credential = b"the verifier's nonce, 32 bytes!!";
        let challenge = tpm_credential::make_credential(
            &prepared.attesting_key_pub,
            &prepared.name,
            credential,
        )
        .unwrap();
        let answer = client
            .activate_credential_attestation(
                name.to_string(),
                None,
                challenge.credential_blob.clone(),
                challenge.secret.clone(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e:?}\n{}", daemon.log_text()));
        assert_eq!(answer, credential);

        // Tampered credential blob (the HMAC no longer matches).
        let mut blob = challenge.credential_blob.clone();
        let last = blob.len() - 1;
        blob[last] ^= 1;
        let status = service_error(
            client
                .activate_credential_attestation(
                    name.to_string(),
                    None,
                    blob,
                    challenge.secret.clone(),
                )
                .unwrap_err(),
        );
        assert_eq!(
            status,
            ResponseStatus::PsaErrorInvalidArgument,
            "{name}: tampered blob\n{}",
            daemon.log_text()
        );
        // Tampered secret (the seed does not decrypt).
        let mut secret = challenge.secret.clone();
        secret[7] ^= 1;
        let status = service_error(
            client
                .activate_credential_attestation(
                    name.to_string(),
                    None,
                    challenge.credential_blob.clone(),
                    secret,
                )
                .unwrap_err(),
        );
        assert_eq!(
            status,
            ResponseStatus::PsaErrorInvalidArgument,
            "{name}: tampered secret"
        );
        // A challenge for another key's name is refused too.
        let mut other_name = prepared.name.clone();
        other_name[10] ^= 1;
        let other =
            tpm_credential::make_credential(&prepared.attesting_key_pub, &other_name, credential)
                .unwrap();
        let status = service_error(
            client
                .activate_credential_attestation(
                    name.to_string(),
                    None,
                    other.credential_blob,
                    other.secret,
                )
                .unwrap_err(),
        );
        assert_eq!(
            status,
            ResponseStatus::PsaErrorInvalidArgument,
            "{name}: wrong name"
        );
    }
    // Attesting with a key other than the EK is not offered.
    assert_eq!(
        service_error(
            client
                .prepare_activate_credential("attested-ecc".into(), Some("attested-rsa".into()))
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );
    // The service still works after all those refusals.
    let digest = sha(Hash::Sha256, b"still fine");
    client
        .psa_sign_hash("attested-ecc", &digest, ecdsa(Hash::Sha256))
        .unwrap();
}

/// The Rust MakeCredential byte for byte against the TPM's own: the TPM makes a credential
/// for a key whose private part the test knows, the test recovers the TPM's random seed
/// from the secret, and the Rust code, given that seed, must produce the same blob.
#[test]
fn rust_make_credential_matches_the_tpm_byte_for_byte() {
    use rsa::traits::PublicKeyParts;
    use tss_esapi::attributes::ObjectAttributesBuilder;
    use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
    use tss_esapi::interface_types::key_bits::RsaKeyBits;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::structures::{
        Digest, Name, PublicBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaExponent,
        RsaScheme, SymmetricDefinitionObject,
    };

    let tpm = Swtpm::start("kdfa");
    let mut ctx = tss_esapi::Context::new(tpm.tcti().parse().unwrap()).unwrap();
    let private = rsa::RsaPrivateKey::new(&mut rand_core_os(), 2048).unwrap();
    let public = private.to_public_key();
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_admin_with_policy(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .unwrap();
    let ek_like = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Rsa)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_rsa_parameters(
            PublicRsaParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                RsaKeyBits::Rsa2048,
                RsaExponent::default(),
            )
            .with_scheme(RsaScheme::Null)
            .build()
            .unwrap(),
        )
        .with_rsa_unique_identifier(PublicKeyRsa::try_from(public.n().to_bytes_be()).unwrap())
        .build()
        .unwrap();
    let handle = ctx
        .execute_without_session(|ctx| ctx.load_external_public(ek_like, Hierarchy::Owner))
        .unwrap();

    for round in 0..4u8 {
        let mut name = vec![0x00, 0x0B];
        name.extend((0..32).map(|i| i * 7 + round));
        let credential: Vec<u8> = (0..(8 + round as usize * 8))
            .map(|i| i as u8 ^ 0x5a)
            .collect();
        let (blob, secret) = ctx
            .execute_without_session(|ctx| {
                ctx.make_credential(
                    handle,
                    Digest::try_from(credential.clone()).unwrap(),
                    Name::try_from(name.clone()).unwrap(),
                )
            })
            .unwrap();
        let seed = private
            .decrypt(
                rsa::Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
                secret.value(),
            )
            .expect("the TPM's secret is RSA-OAEP(SHA-256, \"IDENTITY\\0\") of the seed");
        assert_eq!(seed.len(), 32);
        let ours = tpm_credential::credential_blob(&seed, &name, &credential).unwrap();
        assert_eq!(
            ours,
            blob.value(),
            "round {round}: KDFa, AES-CFB and HMAC agree with the TPM"
        );
        // And our secret is one the same private key opens to our seed.
        let our_secret = tpm_credential::encrypt_seed(&public, &seed).unwrap();
        let opened = private
            .decrypt(
                rsa::Oaep::new_with_label::<sha2::Sha256, _>("IDENTITY\0"),
                &our_secret,
            )
            .unwrap();
        assert_eq!(opened, seed);
    }
}

fn rand_core_os() -> impl rsa::rand_core::CryptoRngCore {
    rsa::rand_core::OsRng
}

/// No TPM at start-up: one clear line naming the TCTI and the errno, and a non-zero exit;
/// with skip_if_no_tpm the service starts without the provider.
#[test]
fn absent_tpm_is_named_clearly() {
    let dir = fresh_dir("tpm-absent");
    let socket = dir.join("parsec.sock");
    let base = common::config_text(&socket, &dir.join("store"), "Direct", &[]);
    // A closed port on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (tcti, expected) in [
        (
            format!("swtpm:host=127.0.0.1,port={port}"),
            "Connection refused (os error 111) (errno 111)".to_string(),
        ),
        (
            "device:/dev/no-such-tpm".to_string(),
            "/dev/no-such-tpm: No such file or directory (os error 2) (errno 2)".to_string(),
        ),
    ] {
        let config = dir.join("config.toml");
        std::fs::write(&config, with_tpm_first(base.clone(), &tcti)).unwrap();
        let output = Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|l| l.contains("cannot open the TPM"))
            .unwrap_or_else(|| panic!("no TPM line in:\n{stderr}"));
        assert!(line.contains(&format!("tcti \"{tcti}\"")), "{line}");
        assert!(line.contains(&expected), "{line}");
        assert_eq!(
            stderr
                .lines()
                .filter(|l| l.contains("cannot open the TPM"))
                .count(),
            1,
            "{stderr}"
        );
    }
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let daemon = Daemon::start_edited("tpm-skip", "Direct", &[], |text| {
        with_tpm_first(text, &tcti).replace(
            &format!("tcti = \"{tcti}\""),
            &format!("tcti = \"{tcti}\"\nskip_if_no_tpm = true"),
        )
    });
    let client = daemon.client("gina");
    let providers: Vec<ProviderId> = client
        .list_providers()
        .unwrap()
        .iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(providers, [ProviderId::MbedCrypto, ProviderId::Core]);
    assert!(daemon.log_text().contains("skip_if_no_tpm is set"));
}

/// A wrong owner authorisation: the start-up error decodes the TPM's answer.
#[test]
fn wrong_owner_auth_is_decoded() {
    let tpm = Swtpm::start("auth");
    let dir = fresh_dir("tpm-auth");
    let base = common::config_text(&dir.join("parsec.sock"), &dir.join("store"), "Direct", &[]);
    let config = dir.join("config.toml");
    let text = with_tpm_first(base, &tpm.tcti()).replace(
        &format!("tcti = \"{}\"", tpm.tcti()),
        &format!(
            "tcti = \"{}\"\nowner_hierarchy_auth = \"hex:00ff00ff\"",
            tpm.tcti()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let output = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TPM_RC_BAD_AUTH") || stderr.contains("TPM_RC_AUTH_FAIL"),
        "{stderr}"
    );
    assert!(
        stderr.contains("TPM layer, format one, session 1"),
        "{stderr}"
    );
    assert!(stderr.contains("owner_hierarchy_auth"), "{stderr}");
    assert!(
        !stderr.contains("00ff00ff"),
        "the authorisation value is never logged"
    );
}

/// The loop during long TPM commands: a ping sent while RSA key generations run (one in the
/// TPM, the others queued) is answered when the running one ends, not after the queue: at
/// most one generation finishes between the ping being sent and being answered.
#[test]
fn ping_waits_for_one_generation_at_most() {
    let tpm = Swtpm::start("busy");
    let daemon = tpm_daemon("tpm-busy", &tpm);
    let oaep = AsymmetricEncryption::RsaOaep {
        hash_alg: Hash::Sha256,
    };
    let pinger = daemon.client("ivy");
    // Every client is set up (ListProviders) before the first generation starts.
    let clients: Vec<BasicClient> = (0..12).map(|_| tpm_client(&daemon, "henry")).collect();
    let generations: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            std::thread::spawn(move || {
                client
                    .psa_generate_key(
                        &format!("rsa-{i}"),
                        attributes(Type::RsaKeyPair, 3072, oaep),
                    )
                    .unwrap();
                Instant::now()
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(10));
    let ping_sent = Instant::now();
    pinger.ping().unwrap();
    let ping_done = Instant::now();
    let ends: Vec<Instant> = generations.into_iter().map(|g| g.join().unwrap()).collect();
    let during = ends
        .iter()
        .filter(|&&t| t > ping_sent && t <= ping_done)
        .count();
    let after = ends.iter().filter(|&&t| t > ping_done).count();
    eprintln!(
        "ping answered in {:?}; generations ending while it waited: {during}, after it: {after}",
        ping_done - ping_sent
    );
    assert!(
        after >= 2,
        "the generations were too quick to test anything (after = {after})"
    );
    assert!(during <= 1, "the ping waited for {during} generations");
}
