//! Keys recorded when a fixture was made (`service/examples/upstream_fixture.rs` writes
//! `keys.txt`: `app provider name public-key-hex [ciphertext-hex]`), and the check that a
//! service serves each of them as it was: the same public key, signatures openssl verifies
//! with it, the recorded ciphertext decrypted.

use super::{ecdsa_der, shell};
use parsec_client::core::interface::operations::psa_algorithm::{
    AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::BasicClient;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What upstream_fixture encrypted into each recorded ciphertext.
const PLAINTEXT: &[u8] = b"recorded by upstream Parsec 1.5.0";
pub const MESSAGE: &[u8] = b"signed after the switch";

pub struct Recorded {
    pub app: String,
    pub provider: u8,
    pub name: String,
    pub public: Vec<u8>,
    pub ciphertext: Option<Vec<u8>>,
}

/// A fresh copy of a fixture directory (`cp -a`: modes and times kept), named `name`.
pub fn copy_fixture(fixture: &str, name: &str) -> PathBuf {
    let dir = super::fresh_dir(name);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{fixture}/."))
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success(), "copying {fixture}");
    dir
}

impl Recorded {
    /// The keys of a fixture's keys.txt.
    pub fn read(path: &Path) -> Vec<Recorded> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| {
                let f: Vec<&str> = line.split(' ').collect();
                Recorded {
                    app: f[0].to_string(),
                    provider: f[1].parse().unwrap(),
                    name: f[2].to_string(),
                    public: unhex(f[3]),
                    ciphertext: f.get(4).map(|c| unhex(c)),
                }
            })
            .collect()
    }
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
        .collect()
}

/// A P-256 point or a PKCS#1 RSA public key as a SubjectPublicKeyInfo PEM file, for openssl.
fn public_pem(dir: &Path, key: &Recorded) -> PathBuf {
    let der = dir.join(format!("{}-{}-{}.der", key.app, key.provider, key.name));
    let pem = der.with_extension("pem");
    if kind(key).starts_with("ecc") {
        let mut spki = unhex("3059301306072a8648ce3d020106082a8648ce3d030107034200");
        spki.extend_from_slice(&key.public);
        std::fs::write(&der, spki).unwrap();
        shell(
            dir,
            &format!(
                "openssl pkey -pubin -inform DER -in {} -out {}",
                der.display(),
                pem.display()
            ),
        );
    } else {
        std::fs::write(&der, &key.public).unwrap();
        shell(
            dir,
            &format!(
                "openssl rsa -RSAPublicKey_in -inform DER -in {} -pubout -out {} 2>/dev/null",
                der.display(),
                pem.display()
            ),
        );
    }
    pem
}

/// Uses every recorded key of `keys` as upstream's clients did: export, sign (verified by
/// openssl against the public key upstream exported), decrypt (upstream's ciphertext).
pub fn assert_served(dir: &Path, client: &mut BasicClient, keys: &[&Recorded]) {
    let work = dir.join("openssl");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("message"), MESSAGE).unwrap();
    let hash = Sha256::digest(MESSAGE).to_vec();
    for key in keys {
        let what = format!("{} of {} on provider {}", key.name, key.app, key.provider);
        client.set_implicit_provider(ProviderId::try_from(key.provider).unwrap());
        let public = client
            .psa_export_public_key(&key.name)
            .unwrap_or_else(|e| panic!("export {what}: {e}"));
        assert_eq!(
            public, key.public,
            "{what}: another public key than upstream's"
        );
        match kind(key) {
            "rsa-decrypt" => {
                let plain = client
                    .psa_asymmetric_decrypt(
                        &key.name,
                        AsymmetricEncryption::RsaPkcs1v15Crypt,
                        key.ciphertext.as_ref().unwrap(),
                        None,
                    )
                    .unwrap_or_else(|e| panic!("decrypt {what}: {e}"));
                assert_eq!(plain, PLAINTEXT, "{what}");
            }
            name => {
                let alg = if name == "ecc-sign" {
                    AsymmetricSignature::Ecdsa {
                        hash_alg: Hash::Sha256.into(),
                    }
                } else {
                    AsymmetricSignature::RsaPkcs1v15Sign {
                        hash_alg: Hash::Sha256.into(),
                    }
                };
                let mut signature = client
                    .psa_sign_hash(&key.name, &hash, alg)
                    .unwrap_or_else(|e| panic!("sign with {what}: {e}"));
                if name == "ecc-sign" {
                    signature = ecdsa_der(&signature);
                }
                let sig = work.join("sig");
                std::fs::write(&sig, signature).unwrap();
                let pem = public_pem(&work, key);
                shell(
                    &work,
                    &format!(
                        "openssl dgst -sha256 -verify {} -signature {} message",
                        pem.display(),
                        sig.display()
                    ),
                );
            }
        }
    }
}

/// What a recorded key is (`ecc-sign`, `rsa-sign`, `rsa-decrypt`): SQLite fixtures' names
/// end in `-p<provider>`, as upstream's SQLite store has one key of a name per application.
pub fn kind(key: &Recorded) -> &str {
    let suffix = format!("-p{}", key.provider);
    key.name.strip_suffix(&suffix).unwrap_or(&key.name)
}
