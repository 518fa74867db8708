//! The PKCS#11 provider on three real modules, not only SoftHSM2: tpm2-pkcs11 on a software
//! TPM and NSS's softoken, each with the same suite (create, sign, verify, encrypt,
//! decrypt, export, destroy, restart, a key made by the module's own tool, the error
//! cases), and each module's quirks with a test of their own.
#![cfg(feature = "pkcs11-provider")]

mod common;

use common::tokens::{NssToken, Tpm2Token, NSS_TOKEN, SOFTOKN, TPM2_PKCS11};
use common::{
    attributes, ecc, ecdsa, generate_encrypt_decrypt, generate_sign_verify, service_error, sha,
    with_provider_first, Daemon, SoftHsm, SOFTHSM, USER_PIN,
};
use parsec_client::core::interface::operations::can_do_crypto::CheckType;
use parsec_client::core::interface::operations::psa_algorithm::{
    AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::Type;
use parsec_client::core::interface::requests::{ProviderId, ResponseStatus};
use parsec_client::BasicClient;

/// One token of one module.
enum Token {
    SoftHsm(SoftHsm),
    Tpm2(Tpm2Token),
    Nss(NssToken),
}

impl Token {
    fn name(&self) -> &'static str {
        match self {
            Token::SoftHsm(_) => "softhsm2",
            Token::Tpm2(_) => "tpm2-pkcs11",
            Token::Nss(_) => "nss-softoken",
        }
    }

    /// The `[[provider]]` table for this token, with `extra` lines.
    fn table(&self, extra: &str) -> String {
        let (library, label, more) = match self {
            Token::SoftHsm(hsm) => (SOFTHSM, hsm.label.clone(), String::new()),
            Token::Tpm2(token) => (TPM2_PKCS11, token.label.clone(), String::new()),
            Token::Nss(nss) => (
                SOFTOKN,
                NSS_TOKEN.to_string(),
                format!("library_parameters = \"{}\"\n", nss.parameters()),
            ),
        };
        format!(
            "[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"on-disk\"\nlibrary_path = \"{library}\"\ntoken_label = \"{label}\"\nuser_pin = \"{USER_PIN}\"\n{more}{extra}"
        )
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            Token::SoftHsm(hsm) => {
                let (k, v) = hsm.env();
                vec![(k.to_string(), v)]
            }
            Token::Tpm2(token) => token.tools_env(),
            Token::Nss(_) => vec![],
        }
    }

    fn daemon(&self, name: &str, extra: &str) -> Daemon {
        self.daemon_in(name, extra, &self.env())
    }

    fn daemon_in(&self, name: &str, extra: &str, env: &[(String, String)]) -> Daemon {
        let table = self.table(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Daemon::start_in_env(
            name,
            "Direct",
            &["admin"],
            |text| with_provider_first(text, &table),
            &env,
        )
    }
}

fn client(daemon: &Daemon, app: &str) -> BasicClient {
    let mut client = daemon.client(app);
    client.set_implicit_provider(ProviderId::Pkcs11);
    client
}

fn pkcs1() -> AsymmetricSignature {
    AsymmetricSignature::RsaPkcs1v15Sign {
        hash_alg: Hash::Sha256.into(),
    }
}

fn pss() -> AsymmetricSignature {
    AsymmetricSignature::RsaPss {
        hash_alg: Hash::Sha256.into(),
    }
}

/// The suite every module passes: what a client does with keys, and a restart.
fn suite(token: &Token) {
    let module = token.name();
    let mut daemon = token.daemon(&format!("modules-{module}"), "");
    let alice = client(&daemon, "alice");
    let signing = [
        ("p256", ecc(), 256, ecdsa(Hash::Sha256), Hash::Sha256),
        ("p384", ecc(), 384, ecdsa(Hash::Sha384), Hash::Sha384),
        (
            "rsa2048-pkcs1",
            Type::RsaKeyPair,
            2048,
            pkcs1(),
            Hash::Sha256,
        ),
        ("rsa2048-pss", Type::RsaKeyPair, 2048, pss(), Hash::Sha256),
    ];
    for (name, key_type, bits, alg, hash) in signing {
        generate_sign_verify(&alice, name, key_type, bits, alg, hash);
    }
    match token {
        // NSS rejects a PKCS#1 v1.5 ciphertext that does not decrypt implicitly (the
        // Marvin attack's countermeasure): a plaintext derived from the key and the
        // ciphertext, never the real one, and no error an attacker could time.
        Token::Nss(_) => {
            let alg = AsymmetricEncryption::RsaPkcs1v15Crypt;
            alice
                .psa_generate_key("rsa-v15", attributes(Type::RsaKeyPair, 2048, alg))
                .unwrap();
            let mut ciphertext = alice
                .psa_asymmetric_encrypt("rsa-v15", alg, b"a secret", None)
                .unwrap();
            let plain = alice
                .psa_asymmetric_decrypt("rsa-v15", alg, &ciphertext, None)
                .unwrap();
            assert_eq!(plain, b"a secret");
            ciphertext[10] ^= 0x40;
            let other = alice.psa_asymmetric_decrypt("rsa-v15", alg, &ciphertext, None);
            assert!(other.map_or(true, |p| p != b"a secret"), "{module}");
        }
        _ => generate_encrypt_decrypt(&alice, "rsa-v15", AsymmetricEncryption::RsaPkcs1v15Crypt),
    }

    // The public key verifies outside the token too (openssl).
    let digest = sha(Hash::Sha256, b"checked by openssl");
    let signature = alice
        .psa_sign_hash("p256", &digest, ecdsa(Hash::Sha256))
        .unwrap();
    let public = alice.psa_export_public_key("p256").unwrap();
    common::openssl_verify_p256(&public, b"checked by openssl", &signature);

    // Another application sees none of it.
    assert_eq!(
        service_error(
            client(&daemon, "bob")
                .psa_export_public_key("p256")
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorDoesNotExist
    );

    // Destroyed on the token; the rest found again after a restart.
    alice.psa_destroy_key("rsa2048-pss").unwrap();
    drop(alice);
    assert!(daemon.stop().success());
    daemon.spawn();
    let alice = client(&daemon, "alice");
    assert_eq!(alice.psa_export_public_key("p256").unwrap(), public);
    let digest = sha(Hash::Sha256, b"after restart");
    let signature = alice
        .psa_sign_hash("rsa2048-pkcs1", &digest, pkcs1())
        .unwrap();
    alice
        .psa_verify_hash("rsa2048-pkcs1", &digest, pkcs1(), &signature)
        .unwrap();
    assert_eq!(
        service_error(alice.psa_export_public_key("rsa2048-pss").unwrap_err()),
        ResponseStatus::PsaErrorDoesNotExist
    );
    let log = daemon.log_text();
    assert!(
        !log.contains("C_GenerateKeyPair") && !log.contains("CKR_TEMPLATE"),
        "{module}: no template was refused:\n{log}"
    );
}

#[test]
fn softhsm2_passes_the_suite() {
    suite(&Token::SoftHsm(SoftHsm::new("suite")));
}

#[test]
fn tpm2_pkcs11_passes_the_suite() {
    suite(&Token::Tpm2(Tpm2Token::new("suite")));
}

#[test]
fn nss_softoken_passes_the_suite() {
    suite(&Token::Nss(NssToken::new("suite")));
}

/// Sizes come from the token: tpm2-pkcs11 lists RSA 1024-3072, so RSA-4096 is NotSupported
/// up front (CanDoCrypto and generation), with the token's range in the log, where the
/// provider's own table (1024-4096) would have sent it to the module.
#[test]
fn key_sizes_come_from_the_token() {
    let token = Token::Tpm2(Tpm2Token::new("sizes"));
    let daemon = token.daemon("modules-sizes", "");
    let alice = client(&daemon, "alice");
    let rsa4096 = attributes(Type::RsaKeyPair, 4096, pkcs1());
    assert_eq!(
        service_error(
            alice
                .can_do_crypto(CheckType::Generate, rsa4096)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );
    assert_eq!(
        service_error(alice.psa_generate_key("big", rsa4096).unwrap_err()),
        ResponseStatus::PsaErrorNotSupported
    );
    alice
        .can_do_crypto(
            CheckType::Generate,
            attributes(Type::RsaKeyPair, 3072, pkcs1()),
        )
        .unwrap();
    let log = daemon.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("PsaGenerateKey") && l.contains("CKM_RSA_PKCS_KEY_PAIR_GEN"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("1024-3072 bits"), "{line}");
    assert!(
        !log.contains("C_GenerateKeyPair"),
        "never sent to the module:\n{log}"
    );
}
