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
use parsec_client::core::interface::operations::psa_algorithm::RawKeyAgreement;
use parsec_client::core::interface::operations::psa_algorithm::{
    AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::Type;
use parsec_client::core::interface::requests::{Opcode, ProviderId, ResponseStatus};
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

    /// The table with no user_pin line: a service that never logs in.
    fn table_without_pin(&self, extra: &str) -> String {
        self.table(extra)
            .replace(&format!("user_pin = \"{USER_PIN}\"\n"), "")
    }

    fn daemon(&self, name: &str, extra: &str) -> Daemon {
        self.daemon_on(name, &self.table(extra), &self.env())
    }

    /// A daemon with this provider `table` first, in `env`.
    fn daemon_on(&self, name: &str, table: &str, env: &[(String, String)]) -> Daemon {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Daemon::start_in_env(
            name,
            "Direct",
            &["admin"],
            |text| with_provider_first(text, table),
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

    let log = daemon.log_text();
    assert!(
        !log.contains("C_GenerateKeyPair") && !log.contains("CKR_TEMPLATE"),
        "{module}: no template was refused:\n{log}"
    );

    // An exportable key comes out as it went in where the module makes such keys; where it
    // does not, the generation is NotSupported and says why (never a key that cannot be
    // exported after the client was told it could).
    let mut exportable = attributes(ecc(), 256, ecdsa(Hash::Sha256));
    exportable.policy.usage_flags.set_export();
    let made = alice.psa_generate_key("exportable", exportable);
    match token {
        Token::SoftHsm(_) => {
            made.unwrap();
            assert_eq!(alice.psa_export_key("exportable").unwrap().len(), 32);
        }
        Token::Tpm2(_) | Token::Nss(_) => {
            assert_eq!(
                service_error(made.unwrap_err()),
                ResponseStatus::PsaErrorNotSupported
            );
            let log = daemon.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("does not make exportable private keys"))
                .unwrap_or_else(|| panic!("{module}:\n{log}"));
            assert!(line.contains("drop the export flag"), "{line}");
            if let Token::Tpm2(_) = token {
                // The module's own reason, from its stderr, in the request's line.
                assert!(
                    line.contains("stderr meanwhile")
                        && line.contains("Cannot mark object both extractable AND sensitive"),
                    "{line}"
                );
            }
            assert_eq!(
                service_error(alice.psa_export_public_key("exportable").unwrap_err()),
                ResponseStatus::PsaErrorDoesNotExist
            );
        }
    }

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

/// Sizes and mechanisms come from the token: tpm2-pkcs11 lists RSA 1024-3072, so RSA-4096 is
/// NotSupported up front (CanDoCrypto and generation), with the token's range in the log,
/// where the provider's own table (1024-4096) would have sent it to the module; and
/// ListOpcodes leaves out what it has no mechanism for.
#[test]
fn capabilities_come_from_the_token() {
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

    // tpm2-pkcs11 lists neither CKM_AES_GCM nor CKM_ECDH1_DERIVE: ListOpcodes leaves AEAD
    // and key agreement out, and such a request is NotSupported before the token sees it.
    let opcodes = alice.list_opcodes(ProviderId::Pkcs11).unwrap();
    assert!(opcodes.contains(&Opcode::PsaSignHash), "{opcodes:?}");
    for missing in [
        Opcode::PsaAeadEncrypt,
        Opcode::PsaAeadDecrypt,
        Opcode::PsaRawKeyAgreement,
    ] {
        assert!(
            !opcodes.contains(&missing),
            "{missing:?} listed: {opcodes:?}"
        );
    }
    assert_eq!(
        service_error(
            alice
                .psa_raw_key_agreement(RawKeyAgreement::Ecdh, "none", &[4; 65])
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotSupported
    );
    assert!(
        log.contains("lists no mechanism for PsaRawKeyAgreement, PsaAeadEncrypt, PsaAeadDecrypt"),
        "{log}"
    );
    // SoftHSM2 lists them all: the provider's whole table.
    let hsm = Token::SoftHsm(SoftHsm::new("opcodes"));
    let daemon = hsm.daemon("modules-opcodes", "");
    let all = client(&daemon, "alice")
        .list_opcodes(ProviderId::Pkcs11)
        .unwrap();
    assert!(
        all.contains(&Opcode::PsaAeadEncrypt) && all.contains(&Opcode::PsaRawKeyAgreement),
        "{all:?}"
    );
}

/// What `parsec --config` prints when it does not start with this provider `table`.
fn start_fails(token: &Token, name: &str, table: &str) -> String {
    let dir = common::fresh_dir(name);
    let config = dir.join("config.toml");
    let text = with_provider_first(
        common::config_text(&dir.join("parsec.sock"), &dir.join("store"), "Direct", &[]),
        table,
    );
    std::fs::write(&config, text).unwrap();
    let output = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&config)
        .envs(token.env())
        .output()
        .unwrap();
    assert!(!output.status.success(), "{}: started", token.name());
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// A key made by tpm2_ptool with `--id=1011` has the text's bytes as CKA_ID: `id = "1011"`
/// (hex) finds nothing and says what to write; `id = "str:1011"` finds it; it signs (openssl
/// verifies) and survives a restart. With no user_pin it is mounted public only, with a
/// warning.
#[test]
fn existing_keys_made_by_tpm2_ptool() {
    let tpm2 = Tpm2Token::new("existing");
    tpm2.ptool(&[
        "addkey",
        &format!("--label={}", tpm2.label),
        "--key-label=factory",
        "--id=1011",
        &format!("--userpin={USER_PIN}"),
        "--algorithm=ecc256",
    ]);
    let token = Token::Tpm2(tpm2);
    let mapping = |id: &str| {
        format!("[[provider.existing_keys]]\nid = \"{id}\"\napplication = \"carol\"\nname = \"identity\"\n")
    };
    let stderr = start_fails(&token, "existing-hex", &token.table(&mapping("1011")));
    let line = stderr
        .lines()
        .find(|l| l.contains("existing key \"identity\""))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("id = \\\"str:1011\\\"") || line.contains("id = \"str:1011\""),
        "{line}"
    );
    assert!(line.contains("31303131"), "{line}");

    let mut daemon = token.daemon("existing-text", &mapping("str:1011"));
    let carol = client(&daemon, "carol");
    let digest = sha(Hash::Sha256, b"factory key");
    let signature = carol
        .psa_sign_hash("identity", &digest, ecdsa(Hash::Sha256))
        .unwrap();
    let public = carol.psa_export_public_key("identity").unwrap();
    common::openssl_verify_p256(&public, b"factory key", &signature);
    drop(carol);
    assert!(daemon.stop().success());
    daemon.spawn();
    let carol = client(&daemon, "carol");
    assert_eq!(carol.psa_export_public_key("identity").unwrap(), public);
    drop(carol);
    assert!(daemon.stop().success());

    let no_pin = token.table_without_pin(&mapping("str:1011"));
    let daemon = token.daemon_on("existing-no-pin", &no_pin, &token.env());
    let log = daemon.log_text();
    assert!(
        log.contains("mounted as a public key only: user_pin is empty"),
        "{log}"
    );
}

/// tpm2-pkcs11 gives every token serial 0000000000000000: selecting by that serial is
/// refused at start-up with both tokens listed (taking the first tried its PIN on the other
/// token, a count on the TPM's lockout counter each start).
#[test]
fn a_selector_two_tokens_match_is_refused() {
    let tpm2 = Tpm2Token::new("twins");
    tpm2.add_token("parsec-twin");
    let token = Token::Tpm2(tpm2);
    let table = token.table("").replace(
        "token_label = \"parsec-twins\"",
        "serial_number = \"0000000000000000\"",
    );
    let stderr = start_fails(&token, "twins", &table);
    let line = stderr
        .lines()
        .find(|l| l.contains("2 tokens of"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("\"parsec-twins\"") && line.contains("\"parsec-twin\""),
        "both listed: {line}"
    );
    assert!(!stderr.contains("CKR_PIN"), "no PIN tried: {stderr}");
}

/// A PIN the token refuses when the service reconnects (the token was away, and its PIN
/// changed meanwhile) is tried once, with what the token says of its retry counter
/// (SoftHSM2 sets CKF_USER_PIN_COUNT_LOW), and never again until a reload gives the right
/// one: each try costs a count towards the token's lockout.
#[test]
fn a_refused_pin_is_not_tried_again() {
    let hsm = SoftHsm::new("repin");
    let token = Token::SoftHsm(hsm);
    let daemon = token.daemon("repin", "");
    let alice = client(&daemon, "alice");
    let alg = ecdsa(Hash::Sha256);
    alice
        .psa_generate_key("k", attributes(ecc(), 256, alg))
        .unwrap();
    let digest = sha(Hash::Sha256, b"x");
    alice.psa_sign_hash("k", &digest, alg).unwrap();

    // The token goes away; its PIN is changed elsewhere; it comes back.
    let Token::SoftHsm(hsm) = &token else {
        unreachable!()
    };
    let token_dir = hsm.token_dir();
    let away = hsm.dir.join("away");
    std::fs::create_dir_all(&away).unwrap();
    let moved = away.join(token_dir.file_name().unwrap());
    std::fs::rename(&token_dir, &moved).unwrap();
    assert_eq!(
        service_error(alice.psa_sign_hash("k", &digest, alg).unwrap_err()),
        ResponseStatus::PsaErrorCommunicationFailure
    );
    let conf = hsm.dir.join("away.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\n",
            away.display()
        ),
    )
    .unwrap();
    let changed = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &conf)
        .args([
            "--module",
            SOFTHSM,
            "--login",
            "--pin",
            USER_PIN,
            "--change-pin",
            "--new-pin",
            "4321",
        ])
        .output()
        .unwrap();
    assert!(
        changed.status.success(),
        "{}",
        String::from_utf8_lossy(&changed.stderr)
    );
    std::fs::rename(&moved, &token_dir).unwrap();

    for _ in 0..4 {
        assert_eq!(
            service_error(alice.psa_sign_hash("k", &digest, alg).unwrap_err()),
            ResponseStatus::PsaErrorNotPermitted
        );
    }
    let log = daemon.log_text();
    let tries = log
        .lines()
        .filter(|l| l.contains("CKR_PIN_INCORRECT") && !l.contains("(not tried again:"))
        .count();
    assert_eq!(tries, 1, "the wrong PIN was tried {tries} times:\n{log}");
    assert!(log.contains("CKF_USER_PIN_COUNT_LOW"), "{log}");
    assert!(log.contains("not tried again"), "{log}");

    // The right PIN, by a reload: the key signs again.
    daemon.reload_edited(|text| {
        text.replace(&format!("user_pin = \"{USER_PIN}\""), "user_pin = \"4321\"")
    });
    let signature = alice.psa_sign_hash("k", &digest, alg).unwrap();
    alice
        .psa_verify_hash("k", &digest, alg, &signature)
        .unwrap();
}

/// On a bare TPM (no resource manager: three object slots), tpm2-pkcs11 keeps every key its
/// session used loaded: the third key used fails. The service opens a new session (logged
/// in again) and the request succeeds; it never needs a restart.
#[test]
fn tpm2_pkcs11_out_of_object_space_is_recovered() {
    let mut tpm2 = Tpm2Token::new("bare");
    tpm2.stop_abrmd();
    let env = tpm2.bare_env();
    let token = Token::Tpm2(tpm2);
    let daemon = token.daemon_on("bare", &token.table(""), &env);
    let alice = client(&daemon, "alice");
    let alg = ecdsa(Hash::Sha256);
    let names = ["k1", "k2", "k3", "k4", "k5"];
    for name in names {
        alice
            .psa_generate_key(name, attributes(ecc(), 256, alg))
            .unwrap_or_else(|e| panic!("generating {name}: {e}\n{}", daemon.log_text()));
    }
    let digest = sha(Hash::Sha256, b"slots");
    for round in 0..3 {
        for name in names {
            let signature = alice
                .psa_sign_hash(name, &digest, alg)
                .unwrap_or_else(|e| panic!("round {round}, {name}: {e}\n{}", daemon.log_text()));
            alice
                .psa_verify_hash(name, &digest, alg, &signature)
                .unwrap();
        }
    }
    let log = daemon.log_text();
    assert!(log.contains("the new session cured it"), "{log}");
}

/// A key made by NSS's certutil (CKA_ID: the SHA-1 of its public value, no label) mapped by
/// its id as `certutil -K` shows it: it signs (openssl verifies) and survives a restart.
#[test]
fn existing_keys_made_by_certutil() {
    let nss = NssToken::new("existing");
    let noise = nss.dir.join("noise");
    std::fs::write(
        &noise,
        (0..64u8).map(|i| i.wrapping_mul(37)).collect::<Vec<_>>(),
    )
    .unwrap();
    nss.certutil(&[
        "-G",
        "-k",
        "ec",
        "-q",
        "nistp256",
        "-z",
        noise.to_str().unwrap(),
    ]);
    // "< 0> ec       aca7ee87e4d4e8ea1b7890437576fef801ac8522   (orphan)"
    let listing = nss.certutil(&["-K"]);
    let id = listing
        .lines()
        .find_map(|l| {
            l.split_whitespace()
                .find(|w| w.len() == 40 && w.chars().all(|c| c.is_ascii_hexdigit()))
        })
        .unwrap_or_else(|| panic!("{listing}"))
        .to_string();
    let token = Token::Nss(nss);
    let mapping = format!(
        "[[provider.existing_keys]]\nid = \"{id}\"\napplication = \"carol\"\nname = \"identity\"\n"
    );
    let mut daemon = token.daemon("certutil-key", &mapping);
    let carol = client(&daemon, "carol");
    let digest = sha(Hash::Sha256, b"certutil key");
    let signature = carol
        .psa_sign_hash("identity", &digest, ecdsa(Hash::Sha256))
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    let public = carol
        .psa_export_public_key("identity")
        .unwrap_or_else(|e| panic!("{e}\n{}", daemon.log_text()));
    common::openssl_verify_p256(&public, b"certutil key", &signature);
    drop(carol);
    assert!(daemon.stop().success());
    daemon.spawn();
    let carol = client(&daemon, "carol");
    assert_eq!(carol.psa_export_public_key("identity").unwrap(), public);
    assert_eq!(
        service_error(carol.psa_destroy_key("identity").unwrap_err()),
        ResponseStatus::PsaErrorNotPermitted,
        "not owned: left on the token"
    );
}

/// No user_pin: generating a key the token wants a login for is NotPermitted with "set
/// user_pin", and the module is not reloaded for it (a lost login is not a lost token: it
/// was reloaded twice a request).
#[test]
fn no_pin_is_not_a_lost_token() {
    let token = Token::SoftHsm(SoftHsm::new("nopin"));
    let daemon = token.daemon_on("nopin", &token.table_without_pin(""), &token.env());
    let alice = client(&daemon, "alice");
    for _ in 0..2 {
        assert_eq!(
            service_error(
                alice
                    .psa_generate_key("k", attributes(ecc(), 256, ecdsa(Hash::Sha256)))
                    .unwrap_err()
            ),
            ResponseStatus::PsaErrorNotPermitted
        );
    }
    let log = daemon.log_text();
    assert!(
        log.contains("CKR_USER_NOT_LOGGED_IN") && log.contains("set user_pin"),
        "{log}"
    );
    assert!(
        !log.contains("reconnecting"),
        "the module was reloaded:\n{log}"
    );
}
