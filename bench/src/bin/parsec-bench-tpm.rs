//! The TPM provider's benchmark: ECDSA P-256 sign_hash/s through the service (one client,
//! parsec-client) against the same TPM2_Sign made in-process with tss-esapi, both on one swtpm. The in-process side sets the TPM up as the provider does (primary key, salted
//! session with parameter encryption, the key loaded once), so the difference is what the
//! service adds: the socket, the framing, authentication, the key store lookup.
//!
//! Needs a daemon built with the TPM provider:
//!     cargo build --release -p parsec-service --features tpm-provider
//!     ./target/release/parsec-bench-tpm [--daemon PATH] [--seconds S] [--all-cpus]

use parsec_bench::{compare, ecdsa, p256, pin_to_cpu0, Daemon, DeviceBenchOptions, Swtpm};
use parsec_client::core::interface::requests::ProviderId;
use std::str::FromStr;

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::tss::{TPM2_RH_NULL, TPM2_ST_HASHCHECK};
use tss_esapi::constants::SessionType;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Digest, EccPoint, EccScheme, HashScheme, HashcheckTicket, KeyDerivationFunctionScheme,
    PublicBuilder, PublicEccParameters, PublicEccParametersBuilder, SignatureScheme,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::tss2_esys::TPMT_TK_HASHCHECK;
use tss_esapi::Context;

const HASH: [u8; 32] = [0x5a; 32];

/// A TPM set up in-process as the provider sets it up, with one P-256 key loaded.
struct InProcess {
    ctx: Context,
    session: AuthSession,
    key: tss_esapi::handles::KeyHandle,
}

impl InProcess {
    fn new(tcti: &str) -> InProcess {
        let mut ctx = Context::new(TctiNameConf::from_str(tcti).unwrap()).unwrap();
        let storage = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_no_da(true)
            .with_restricted(true)
            .with_decrypt(true)
            .build()
            .unwrap();
        let primary_template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(storage)
            .with_ecc_parameters(
                PublicEccParametersBuilder::new()
                    .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                    .with_ecc_scheme(EccScheme::Null)
                    .with_curve(EccCurve::NistP256)
                    .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                    .with_is_decryption_key(true)
                    .with_restricted(true)
                    .build()
                    .unwrap(),
            )
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .unwrap();
        let primary = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, primary_template, None, None, None, None)
            })
            .unwrap()
            .key_handle;
        let session = ctx
            .start_auth_session(
                Some(primary),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .unwrap()
            .unwrap();
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let signing = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_sign_encrypt(true)
            .build()
            .unwrap();
        let key_template = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(signing)
            .with_ecc_parameters(PublicEccParameters::new(
                SymmetricDefinitionObject::Null,
                EccScheme::Null,
                EccCurve::NistP256,
                KeyDerivationFunctionScheme::Null,
            ))
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .unwrap();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .unwrap();
        let created = ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.create(primary, key_template, None, None, None, None)
            })
            .unwrap();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .unwrap();
        let key = ctx
            .execute_with_session(Some(session), |ctx| {
                ctx.load(primary, created.out_private, created.out_public)
            })
            .unwrap();
        // The primary is not needed to sign: flushing it leaves the TPM's object slots (three
        // in swtpm) for the service's primary and key, so both sides share one TPM.
        ctx.flush_context(primary.into()).unwrap();
        InProcess { ctx, session, key }
    }

    /// One TPM2_Sign, as the provider makes it.
    fn sign(&mut self) {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let (session, key) = (self.session, self.key);
        let scheme = SignatureScheme::EcDsa {
            hash_scheme: HashScheme::new(HashingAlgorithm::Sha256),
        };
        let ctx = &mut self.ctx;
        let validation = HashcheckTicket::try_from(TPMT_TK_HASHCHECK {
            tag: TPM2_ST_HASHCHECK,
            hierarchy: TPM2_RH_NULL,
            digest: Default::default(),
        })
        .unwrap();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .unwrap();
        ctx.execute_with_session(Some(session), |ctx| {
            ctx.sign(
                key,
                Digest::try_from(HASH.to_vec()).unwrap(),
                scheme,
                validation,
            )
        })
        .unwrap();
    }
}

fn main() {
    let DeviceBenchOptions {
        bin, seconds, pin, ..
    } = DeviceBenchOptions::parse("parsec-bench-tpm", 48.0);
    if pin {
        pin_to_cpu0();
    }
    let base = std::env::temp_dir().join(format!("parsec-bench-tpm-{}", std::process::id()));

    // One swtpm for both sides (each TPM command is its own connection), so that neither
    // gets a faster TPM instance: the in-process side loads its key first.
    let tpm = Swtpm::start(&base.join("tpm"));
    let mut in_process = InProcess::new(&tpm.tcti());
    let providers = format!(
        "[[provider]]\nprovider_type = \"Tpm\"\nkey_info_manager = \"m\"\ntcti = \"{}\"\n",
        tpm.tcti()
    );
    let (daemon, startup) =
        Daemon::start_with_providers(&bin, &base.join("service"), 5000, 256, &providers);
    let setup = |_: usize| {
        let mut client = daemon.client("bench-tpm");
        client.set_implicit_provider(ProviderId::Tpm);
        let _ = client.psa_destroy_key("tpm-bench");
        client
            .psa_generate_key(
                "tpm-bench",
                p256(|u| {
                    u.set_sign_hash();
                }),
            )
            .expect("a daemon built with --features tpm-provider");
        client.psa_sign_hash("tpm-bench", &HASH, ecdsa()).unwrap();
        client
    };
    let client = setup(0);
    let result = compare(
        16,
        seconds,
        || {
            client.psa_sign_hash("tpm-bench", &HASH, ecdsa()).unwrap();
        },
        || in_process.sign(),
    );
    drop(in_process); // before its TPM goes
    drop(daemon);
    drop(tpm);
    let _ = std::fs::remove_dir_all(&base);

    println!(
        "parsec-bench-tpm: {} ({seconds} s, swtpm, {})",
        bin.display(),
        if pin { "all on CPU 0" } else { "all CPUs" }
    );
    println!(
        "start-up with the TPM provider:        {:>8.1} ms",
        startup.as_secs_f64() * 1e3
    );
    println!(
        "ECDSA P-256 sign_hash/s, service:      {:>8.0}",
        result.service
    );
    println!(
        "ECDSA P-256 sign_hash/s, in-process:   {:>8.0}",
        result.in_process
    );
    println!(
        "service vs in-process (median round):  {:>7.1}%  (target >= 95%: {})",
        100.0 * result.ratio,
        if result.ratio >= 0.95 {
            "met"
        } else {
            "NOT met"
        }
    );
}
