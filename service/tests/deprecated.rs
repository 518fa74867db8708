//! Deprecated primitives (SHA-1, MD5, DES, 163-bit curves: PSA Crypto 1.0's list) are
//! treated as upstream Parsec 1.5.0 treats them, through the real daemon: a key for one is
//! not generated (`DeprecatedPrimitive`) unless `core_settings.allow_deprecated = true`,
//! which a reload applies; an imported one is accepted with a warning in the log.
#![cfg(feature = "mbed-crypto-provider")]

mod common;

use common::{attributes, ecc, ecdsa, service_error, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::core::interface::operations::psa_key_attributes::{EccFamily, Type, UsageFlags};
use parsec_client::core::interface::requests::ResponseStatus;

#[test]
#[allow(deprecated)] // SHA-1 on purpose: the deprecated primitive under test
fn deprecated_keys_are_refused_until_the_config_allows_them() {
    let daemon = Daemon::start("deprecated");
    let client = daemon.client("alice");
    let sha1 = attributes(ecc(), 256, ecdsa(Hash::Sha1));
    let status = service_error(client.psa_generate_key("sha1", sha1).unwrap_err());
    assert_eq!(status, ResponseStatus::DeprecatedPrimitive);
    let log = daemon.log_text();
    assert!(log.contains("deprecated by PSA Crypto 1.0"), "{log}");
    assert!(
        log.contains("core_settings.allow_deprecated = true"),
        "{log}"
    );
    assert!(client.list_keys().unwrap().is_empty(), "nothing was made");

    // An import is served (as upstream: it only warns).
    client
        .psa_generate_key("current", attributes(ecc(), 256, ecdsa(Hash::Sha256)))
        .unwrap();
    let public = client.psa_export_public_key("current").unwrap();
    let mut imported = attributes(ecc(), 256, ecdsa(Hash::Sha1));
    imported.key_type = Type::EccPublicKey {
        curve_family: EccFamily::SecpR1,
    };
    let mut verify = UsageFlags::default();
    verify.set_verify_hash();
    imported.policy.usage_flags = verify;
    client
        .psa_import_key("sha1-public", &public, imported)
        .expect("a deprecated key is imported, with a warning");
    daemon.wait_for_log("importing a key whose", "the import's warning");

    // Allowed by a reload: generated (with a warning), and it signs.
    daemon.reload_edited(|text| {
        text.replace(
            "[core_settings]\n",
            "[core_settings]\nallow_deprecated = true\n",
        )
    });
    client
        .psa_generate_key("sha1", sha1)
        .expect("allowed by core_settings.allow_deprecated");
    // (This Mbed TLS build signs no SHA-1 hash: the key is made, and listed.)
    assert!(common::key_names(&client).contains(&"sha1".to_string()));
    assert!(daemon
        .log_text()
        .contains("generating (core_settings.allow_deprecated)"));
}
