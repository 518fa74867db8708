//! A device that ran this service on Mbed TLS 3.0.0 (psa-crypto-sys's own copy, before
//! issue 26), upgraded to the build on Mbed TLS 3.6: its key store and `.psa_its` key files,
//! exactly as the 3.0 build left them (`tests/fixtures/mbedtls-3.0`, made by
//! `scripts/make-mbedtls30-fixture.sh`), serve every key as before, and new keys are made
//! beside them with other ids.
//!
//! Needs openssl (CI installs it).
#![cfg(feature = "mbed-crypto-provider")]

mod common;

use common::recorded::{assert_served, copy_fixture, Recorded};
use common::Daemon;
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::core::interface::requests::ProviderId;
use std::collections::BTreeSet;
use std::process::Command;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mbedtls-3.0");

fn key_files(dir: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("store/mbed-crypto"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".psa_its"))
        .collect()
}

#[test]
fn keys_made_on_mbed_tls_3_0_are_served_by_the_3_6_build() {
    let version = Command::new(common::BIN).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(
        version.contains("Mbed TLS 3.6"),
        "this test checks the 3.6 build: {version}"
    );
    let recorded_with = std::fs::read_to_string(format!("{FIXTURE}/VERSION")).unwrap();
    assert!(recorded_with.contains("mbed TLS 3.0.0"), "{recorded_with}");

    let dir = copy_fixture(FIXTURE, "mbedtls-upgrade");
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .replace("@DIR@", &dir.display().to_string());
    let config = dir.join("run.toml");
    std::fs::write(&config, text).unwrap();
    let before = key_files(&dir);
    let keys = Recorded::read(&dir.join("keys.txt"));
    assert_eq!(keys.len(), 3);

    let mut daemon = Daemon::on_config(dir.join("run"), config, dir.join("parsec.sock"), &[]);
    std::fs::create_dir_all(&daemon.dir).unwrap();
    daemon.spawn();
    let mut client = daemon.client("alice");
    assert_served(&dir, &mut client, &keys.iter().collect::<Vec<_>>());

    // A new key beside them: another id, the old files untouched.
    client.set_implicit_provider(ProviderId::MbedCrypto);
    let alg = common::ecdsa(Hash::Sha256);
    let attributes = common::attributes(common::ecc(), 256, alg);
    client.psa_generate_key("made-on-3.6", attributes).unwrap();
    let hash = [7u8; 32];
    let signature = client.psa_sign_hash("made-on-3.6", &hash, alg).unwrap();
    client
        .psa_verify_hash("made-on-3.6", &hash, alg, &signature)
        .unwrap();
    let after = key_files(&dir);
    assert!(before.is_subset(&after), "{before:?} -> {after:?}");
    assert_eq!(after.len(), before.len() + 1, "{after:?}");
    for name in &before {
        assert_eq!(
            std::fs::read(dir.join("store/mbed-crypto").join(name)).unwrap(),
            std::fs::read(format!("{FIXTURE}/store/mbed-crypto/{name}")).unwrap(),
            "{name} must be as the 3.0 build wrote it"
        );
    }
    let listed: Vec<String> = common::key_names(&client);
    let listed: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
    let expected = BTreeSet::from(["ecc-sign", "rsa-sign", "rsa-decrypt", "made-on-3.6"]);
    assert_eq!(listed, expected);

    // The service's log says which Mbed TLS it runs on.
    drop(client);
    let log = daemon.log_text();
    assert!(log.contains("Mbed TLS 3.6"), "{log}");
    assert!(daemon.stop().success());
}
