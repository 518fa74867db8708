//! The PKCS#11 provider's benchmark: sign_hash/s through the service (one parsec-client)
//! against the same C_Sign made in-process with cryptoki, on one SoftHSM2 token, for ECDSA
//! P-256 and RSA-2048 PKCS#1 v1.5. The in-process side opens the module, logs in, and signs
//! with a key whose object handle it keeps, as the provider does.
//!
//!     cargo build --release -p parsec-bench -p parsec-service --features parsec-service/pkcs11-provider
//!     ./target/release/parsec-bench-pkcs11 [--daemon PATH] [--seconds S] [--all-cpus]

use cryptoki::context::{CInitializeArgs, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::{Session, UserType};
use parsec_bench::{
    compare, ecdsa, init_softhsm_token, p256, pin_to_cpu0, Daemon, DeviceBenchOptions,
};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::core::interface::secrecy::Secret;

const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const LABEL: &str = "parsec-bench";
const PIN: &str = "1234";
const HASH: [u8; 32] = [0x5a; 32];
/// DigestInfo for SHA-256, which CKM_RSA_PKCS signs in front of the hash.
const SHA256_INFO: [u8; 19] = [
    0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05,
    0x00, 0x04, 0x20,
];

fn rsa_pkcs1() -> AsymmetricSignature {
    AsymmetricSignature::RsaPkcs1v15Sign {
        hash_alg: Hash::Sha256.into(),
    }
}

fn open_session() -> (Pkcs11, Session) {
    let pkcs11 = Pkcs11::new(MODULE).unwrap();
    pkcs11.initialize(CInitializeArgs::OsThreads).unwrap();
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| pkcs11.get_token_info(*s).unwrap().label().trim() == LABEL)
        .unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session
        .login(UserType::User, Some(&Secret::new(PIN.to_string())))
        .unwrap();
    (pkcs11, session)
}

fn main() {
    let DeviceBenchOptions {
        bin, seconds, pin, ..
    } = DeviceBenchOptions::parse("parsec-bench-pkcs11", 24.0);
    if pin {
        pin_to_cpu0();
    }
    let base = std::env::temp_dir().join(format!("parsec-bench-pkcs11-{}", std::process::id()));
    init_softhsm_token(&base.join("hsm"), LABEL, PIN);

    let providers = format!(
        "[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"m\"\nlibrary_path = \"{MODULE}\"\ntoken_label = \"{LABEL}\"\nuser_pin = \"{PIN}\"\n"
    );
    let (daemon, startup) =
        Daemon::start_with_providers(&bin, &base.join("service"), 5000, 256, &providers);
    let mut client = daemon.client("bench-pkcs11");
    client.set_implicit_provider(ProviderId::Pkcs11);
    client
        .psa_generate_key(
            "ecc",
            p256(|u| {
                u.set_sign_hash();
            }),
        )
        .expect("a daemon built with --features pkcs11-provider");
    let mut usage_flags = UsageFlags::default();
    usage_flags.set_sign_hash();
    let rsa_attributes = Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::RsaKeyPair,
        bits: 2048,
        policy: Policy {
            usage_flags,
            permitted_algorithms: rsa_pkcs1().into(),
        },
    };
    client.psa_generate_key("rsa", rsa_attributes).unwrap();

    // In-process: the same token, keys of its own, handles kept.
    let (_pkcs11, session) = open_session();
    let common = |class, key_type| {
        vec![
            Attribute::Class(class),
            Attribute::Token(true),
            Attribute::KeyType(key_type),
            Attribute::Label(b"in-process".to_vec()),
        ]
    };
    let mut ec_public = common(ObjectClass::PUBLIC_KEY, KeyType::EC);
    ec_public.extend([
        Attribute::Verify(true),
        Attribute::EcParams(vec![
            0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
        ]),
    ]);
    let mut ec_private = common(ObjectClass::PRIVATE_KEY, KeyType::EC);
    ec_private.extend([
        Attribute::Sign(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ]);
    let (_, ec_key) = session
        .generate_key_pair(&Mechanism::EccKeyPairGen, &ec_public, &ec_private)
        .unwrap();
    let mut rsa_public = common(ObjectClass::PUBLIC_KEY, KeyType::RSA);
    rsa_public.extend([
        Attribute::Verify(true),
        Attribute::ModulusBits(2048u64.into()),
        Attribute::PublicExponent(vec![1, 0, 1]),
    ]);
    let mut rsa_private = common(ObjectClass::PRIVATE_KEY, KeyType::RSA);
    rsa_private.extend([
        Attribute::Sign(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
    ]);
    let (_, rsa_key) = session
        .generate_key_pair(&Mechanism::RsaPkcsKeyPairGen, &rsa_public, &rsa_private)
        .unwrap();
    let rsa_data = [&SHA256_INFO[..], &HASH].concat();

    let ecc = compare(
        10,
        seconds / 2.0,
        || {
            client.psa_sign_hash("ecc", &HASH, ecdsa()).unwrap();
        },
        || {
            session.sign(&Mechanism::Ecdsa, ec_key, &HASH).unwrap();
        },
    );
    let rsa = compare(
        10,
        seconds / 2.0,
        || {
            client.psa_sign_hash("rsa", &HASH, rsa_pkcs1()).unwrap();
        },
        || {
            session
                .sign(&Mechanism::RsaPkcs, rsa_key, &rsa_data)
                .unwrap();
        },
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&base);

    println!(
        "parsec-bench-pkcs11: {} ({seconds} s, SoftHSM2, {})",
        bin.display(),
        if pin { "all on CPU 0" } else { "all CPUs" }
    );
    println!(
        "start-up with the PKCS#11 provider:     {:>8.1} ms",
        startup.as_secs_f64() * 1e3
    );
    println!(
        "{:<40} {:>10} {:>12} {:>8}",
        "sign_hash/s (best round)", "service", "in-process", "median"
    );
    for (name, c) in [("ECDSA P-256", &ecc), ("RSA-2048 PKCS#1 v1.5", &rsa)] {
        println!(
            "{:<40} {:>10.0} {:>12.0} {:>7.1}%  (target >= 90%: {})",
            name,
            c.service,
            c.in_process,
            100.0 * c.ratio,
            if c.ratio >= 0.90 { "met" } else { "NOT met" }
        );
    }
}
