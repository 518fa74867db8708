//! The software provider's two crypto threads (Mbed TLS 3.6, thread-safe): many clients at
//! once get correct answers, each from its own key, while others make and destroy keys
//! (RSA generation forks a child process) in the same batches.
#![cfg(feature = "mbed-crypto-provider")]

mod common;

use common::{attributes, ecc, ecdsa, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricEncryption, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::Type;

const SIGNERS: usize = 6;
const ROUNDS: usize = 60;

#[test]
fn signers_and_key_makers_at_once_each_get_their_own_answers() {
    let daemon = Daemon::start("crypto-threads");
    let alg = ecdsa(Hash::Sha256);
    std::thread::scope(|scope| {
        for i in 0..SIGNERS {
            let daemon = &daemon;
            scope.spawn(move || {
                let client = daemon.client(&format!("signer-{i}"));
                client
                    .psa_generate_key("key", attributes(ecc(), 256, alg))
                    .unwrap();
                let public = client.psa_export_public_key("key").unwrap();
                for round in 0..ROUNDS {
                    let hash = common::sha(Hash::Sha256, format!("{i}/{round}").as_bytes());
                    let signature = client.psa_sign_hash("key", &hash, alg).unwrap();
                    // Each signature verifies against this client's key, not another's.
                    client
                        .psa_verify_hash("key", &hash, alg, &signature)
                        .unwrap_or_else(|e| panic!("signer {i}, round {round}: {e}"));
                    assert_eq!(client.psa_export_public_key("key").unwrap(), public);
                }
            });
        }
        // Key makers in the same batches: ECC keys made and destroyed, RSA keys generated
        // in a child process, then used.
        let daemon = &daemon;
        scope.spawn(move || {
            let client = daemon.client("maker");
            for round in 0..ROUNDS {
                let name = format!("ecc-{round}");
                client
                    .psa_generate_key(&name, attributes(ecc(), 256, alg))
                    .unwrap();
                client.psa_destroy_key(&name).unwrap();
            }
        });
        scope.spawn(move || {
            let client = daemon.client("rsa");
            let crypt = AsymmetricEncryption::RsaPkcs1v15Crypt;
            for round in 0..4 {
                let name = format!("rsa-{round}");
                client
                    .psa_generate_key(&name, attributes(Type::RsaKeyPair, 2048, crypt))
                    .unwrap();
                let ciphertext = client
                    .psa_asymmetric_encrypt(&name, crypt, b"two threads", None)
                    .unwrap();
                let plain = client
                    .psa_asymmetric_decrypt(&name, crypt, &ciphertext, None)
                    .unwrap();
                assert_eq!(plain, b"two threads");
            }
        });
    });
    let mut daemon = daemon;
    assert!(daemon.stop().success());
    let log = daemon.log_text();
    assert!(
        log.contains("signatures, decryptions and exports on 2 threads"),
        "{log}"
    );
    // The pool's count, logged as the provider stops: both threads ran some.
    let line = log
        .lines()
        .find(|l| l.contains("operations that change nothing"))
        .unwrap_or_else(|| panic!("no count of the two threads' work:\n{log}"));
    let count = |after: &str| -> u64 {
        let rest = &line[line.find(after).unwrap() + after.len()..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (worker, second) = (count("worker's thread ran"), count("second crypto thread"));
    assert!(worker > 0 && second > 0, "{line}");
    assert!(worker + second >= (SIGNERS * ROUNDS * 3) as u64, "{line}");
}
