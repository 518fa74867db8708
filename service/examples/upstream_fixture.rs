//! Makes the keys of an upstream-store fixture through a running Parsec service (upstream's
//! 1.5.0 daemon, when `scripts/make-upstream-fixtures.sh` runs it), and records what a
//! later check compares with: each key's public key and, for the decryption key, a
//! ciphertext the service made.
//!
//! ```text
//! upstream_fixture SOCKET AUTH OUT PROVIDER...
//!   AUTH: direct:NAME (Direct authentication as NAME) or peer (UnixPeerCredentials)
//!   PROVIDER: 1 (Mbed Crypto), 2 (PKCS#11) or 3 (TPM)
//! ```
//!
//! For each provider it makes `ecc-sign` (ECDSA P-256, SHA-256), `rsa-sign` (RSA-2048
//! PKCS#1 v1.5, SHA-256) and `rsa-decrypt` (RSA-2048 PKCS#1 v1.5 encryption), and appends
//! one line per key to `OUT/keys.txt`: `app provider name public-key-hex [ciphertext-hex]`,
//! app being `uid:UID` for UnixPeerCredentials (fixtures made before say the UID alone).
//! The plaintext of every ciphertext is [`PLAINTEXT`].

use parsec_client::auth::Authentication;
use parsec_client::core::interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::core::ipc_handler::unix_socket::Handler;
use parsec_client::BasicClient;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

const PLAINTEXT: &[u8] = b"recorded by upstream Parsec 1.5.0";

fn attributes(name: &str) -> Attributes {
    let mut usage = UsageFlags::default();
    let (key_type, bits, alg) = match name {
        "ecc-sign" => {
            usage.set_sign_hash().set_verify_hash();
            (
                Type::EccKeyPair {
                    curve_family: EccFamily::SecpR1,
                },
                256,
                Algorithm::AsymmetricSignature(AsymmetricSignature::Ecdsa {
                    hash_alg: Hash::Sha256.into(),
                }),
            )
        }
        "rsa-sign" => {
            usage.set_sign_hash().set_verify_hash();
            (
                Type::RsaKeyPair,
                2048,
                Algorithm::AsymmetricSignature(AsymmetricSignature::RsaPkcs1v15Sign {
                    hash_alg: Hash::Sha256.into(),
                }),
            )
        }
        _ => {
            usage.set_encrypt().set_decrypt();
            (
                Type::RsaKeyPair,
                2048,
                Algorithm::AsymmetricEncryption(AsymmetricEncryption::RsaPkcs1v15Crypt),
            )
        }
    };
    usage.set_export();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type,
        bits,
        policy: Policy {
            usage_flags: usage,
            permitted_algorithms: alg,
        },
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 4 {
        eprintln!("usage: upstream_fixture SOCKET direct:NAME|peer OUT PROVIDER...");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&args[0]);
    let out = PathBuf::from(&args[2]);
    // parsec-client checks the endpoint it reads from the environment as it is made.
    std::env::set_var(
        "PARSEC_SERVICE_ENDPOINT",
        format!("unix:{}", socket.display()),
    );
    let mut client = BasicClient::new_naked().expect("a client");
    client.set_ipc_handler(Box::new(
        Handler::new(socket, Some(Duration::from_secs(120))).expect("the socket exists"),
    ));
    let app = match args[1].strip_prefix("direct:") {
        Some(name) => {
            client.set_auth_data(Authentication::Direct(name.to_string()));
            name.to_string()
        }
        None => {
            client.set_auth_data(Authentication::UnixPeerCredentials);
            format!("uid:{}", nix_uid())
        }
    };
    let mut lines = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join("keys.txt"))
        .expect("OUT/keys.txt");
    for provider in &args[3..] {
        let id: u8 = provider.parse().expect("a provider id");
        let provider = ProviderId::try_from(id).expect("a provider id");
        client.set_implicit_provider(provider);
        for kind in ["ecc-sign", "rsa-sign", "rsa-decrypt"] {
            // Upstream's SQLite store holds one key of a name per application, whatever
            // the provider (its key is authenticator, application, key name).
            let name = &match std::env::var_os("FIXTURE_NAME_PER_PROVIDER") {
                Some(_) => format!("{kind}-p{id}"),
                None => kind.to_string(),
            };
            let name = name.as_str();
            client
                .psa_generate_key(name, attributes(kind))
                .unwrap_or_else(|e| panic!("generate {name} on provider {id}: {e}"));
            let public = client
                .psa_export_public_key(name)
                .unwrap_or_else(|e| panic!("export {name} on provider {id}: {e}"));
            let mut line = format!("{app} {id} {name} {}", hex(&public));
            if kind == "rsa-decrypt" {
                let ct = client
                    .psa_asymmetric_encrypt(
                        name,
                        AsymmetricEncryption::RsaPkcs1v15Crypt,
                        PLAINTEXT,
                        None,
                    )
                    .unwrap_or_else(|e| panic!("encrypt with {name} on provider {id}: {e}"));
                line.push(' ');
                line.push_str(&hex(&ct));
            }
            writeln!(lines, "{line}").expect("write keys.txt");
            println!("made {name} for {app} on provider {id}");
        }
    }
}

/// With UnixPeerCredentials an application's name is its UID.
fn nix_uid() -> String {
    nix::unistd::getuid().as_raw().to_string()
}
