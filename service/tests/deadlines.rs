//! Every provider request is answered within `core_settings.provider_request_timeout`, and
//! what a device does after its client was told "timed out" is kept, never thrown away.
//!
//! Through the real daemon on its real socket, with the timeout at its minimum (1 s):
//! - a software-provider worker held in the middle of a create (`PARSEC_HOLD_AT`, the
//!   `crash-points` feature) past the timeout: the client is answered CommunicationFailure at
//!   the deadline, the provider refuses at once while it is held, and the key it made is
//!   then listed and signs;
//! - a software RSA generation whose client is gone before its child process is watched
//!   (answered at its deadline, or hung up): the key is still stored, and a reload that
//!   replaces the provider still completes (the old instance drains);
//! - a hung TPM (swtpm behind `common::slow_tpm`, which holds TPM2_Create for 8 s): the
//!   generation's client and the request queued behind it are answered, new TPM requests are
//!   refused at once, the software provider serves meanwhile, and once the TPM answers its
//!   key is listed and the TPM serves again.
//!
//! The tests decide from the service's log and the proxy's counters, not from the clock.
#![cfg(all(feature = "mbed-crypto-provider", feature = "crash-points"))]

mod common;

use common::{ecdsa, p256_signing, service_error, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::{Attributes, Type};
use parsec_client::core::interface::requests::{ProviderId, ResponseStatus};
use parsec_client::BasicClient;
use std::time::{Duration, Instant};

/// The shortest timeout the config takes.
const TIMEOUT: &str = "provider_request_timeout = 1\n";

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn with_core(text: String, core: &str) -> String {
    text.replace("[core_settings]\n", &format!("[core_settings]\n{core}"))
}

fn held_daemon(name: &str, point: &str, ms: &str) -> Daemon {
    Daemon::start_in_env(
        name,
        "Direct",
        &["admin"],
        |text| with_core(text, TIMEOUT),
        &[("PARSEC_HOLD_AT", point), ("PARSEC_HOLD_MS", ms)],
    )
}

fn client_of(daemon: &Daemon, app: &str, provider: ProviderId) -> BasicClient {
    let mut client = daemon.client(app);
    client.set_implicit_provider(provider);
    client
}

fn rsa_2048() -> Attributes {
    common::attributes(
        Type::RsaKeyPair,
        2048,
        AsymmetricSignature::RsaPkcs1v15Sign {
            hash_alg: Hash::Sha256.into(),
        },
    )
}

fn listed(client: &BasicClient, name: &str) -> bool {
    client
        .list_keys()
        .is_ok_and(|keys| keys.iter().any(|k| k.name == name))
}

#[test]
fn a_create_held_past_the_timeout_is_answered_then_kept() {
    let daemon = held_daemon("deadline-held", "create:after-material", "3000");
    let alice = daemon.client("alice");
    let started = Instant::now();
    let status = service_error(alice.psa_generate_key("late", p256_signing()).unwrap_err());
    let waited = started.elapsed();
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    let log = daemon.log_text();
    assert!(log.contains("did not answer within 1 s"), "{log}");
    // Answered at the deadline, not when the worker came back (it is still held).
    assert!(
        !log.contains("late answer"),
        "answered only after the worker finished ({waited:?}):\n{log}"
    );

    // While it is held, the provider is not answering: refused at once, with that cause.
    wait_until("the provider is marked as not answering", || {
        daemon
            .log_text()
            .contains("has not answered a request for 1 s")
    });
    let bob = daemon.client("bob");
    let status = service_error(bob.psa_generate_key("other", p256_signing()).unwrap_err());
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    bob.ping().expect("the core still answers");

    // The worker comes back: what it made is stored, logged, and works; the provider serves.
    wait_until("the late answer is logged", || {
        daemon.log_text().contains("late answer: app=alice")
    });
    assert!(daemon.log_text().contains("answered again after"));
    wait_until("the late key is listed", || listed(&alice, "late"));
    let hash = common::sha(Hash::Sha256, b"late");
    let signature = alice
        .psa_sign_hash("late", &hash, ecdsa(Hash::Sha256))
        .expect("the late key signs");
    alice
        .psa_verify_hash("late", &hash, ecdsa(Hash::Sha256), &signature)
        .unwrap();
    assert!(!listed(&bob, "late"), "the key is alice's only");
}

/// Renames the software provider in the daemon's config and reloads; waits until the new
/// instance has started, which needs the old one to have drained.
fn rename_and_wait(daemon: &Daemon) {
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let renamed = text.replacen(
        "provider_type = \"MbedCrypto\"\n",
        "provider_type = \"MbedCrypto\"\nname = \"sw-b\"\n",
        1,
    );
    assert_ne!(text, renamed);
    std::fs::write(&daemon.config, renamed).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the renamed provider has started", || {
        daemon.log_text().contains("provider \"sw-b\" started")
    });
}

/// An RSA generation whose client no longer waits when its child process is handed back to
/// the loop (the worker is held just after the fork).
fn generation_without_its_client(name: &str, client: impl FnOnce(&Daemon)) {
    let daemon = held_daemon(name, "keygen:spawned", "2500");
    client(&daemon);
    let alice = daemon.client("alice");
    wait_until("the generated key is stored", || listed(&alice, "rsa"));
    let hash = common::sha(Hash::Sha256, b"rsa");
    alice
        .psa_sign_hash(
            "rsa",
            &hash,
            AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            },
        )
        .expect("the key generated for a gone client signs");
    rename_and_wait(&daemon);
    assert!(listed(&alice, "rsa"), "kept across the reload");
}

#[test]
fn a_software_rsa_generation_answered_at_its_deadline_is_stored() {
    generation_without_its_client("deadline-keygen", |daemon| {
        let alice = daemon.client("alice");
        let status = service_error(alice.psa_generate_key("rsa", rsa_2048()).unwrap_err());
        assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
        assert!(daemon.log_text().contains("did not answer within 1 s"));
    });
}

#[test]
fn a_software_rsa_generation_whose_client_hung_up_is_stored() {
    generation_without_its_client("deadline-hangup", |daemon| {
        let mut alice = daemon.client("alice");
        alice.set_timeout(Some(Duration::from_millis(300)));
        let err = alice.psa_generate_key("rsa", rsa_2048()).unwrap_err();
        assert!(
            matches!(err, parsec_client::error::Error::Client(_)),
            "the client gave up: {err:?}"
        );
    });
}

#[cfg(feature = "tpm-provider")]
#[test]
fn a_hung_tpm_is_answered_for_and_serves_again_when_it_answers() {
    use common::slow_tpm::{SlowTpm, TPM2_CC_CREATE};
    use common::{with_tpm_first, Swtpm};
    const HUNG_CREATE: &[(u32, u64)] = &[(TPM2_CC_CREATE, 8000)];

    let tpm = Swtpm::start("deadline-tpm");
    let slow = SlowTpm::start(tpm.port, HUNG_CREATE, 0);
    let tcti = slow.tcti();
    let daemon = Daemon::start_edited("deadline-tpm", "Direct", &["admin"], |text| {
        with_core(with_tpm_first(text, &tcti), TIMEOUT)
    });
    let software = client_of(&daemon, "bob", ProviderId::MbedCrypto);
    software.psa_generate_key("sw", p256_signing()).unwrap();

    let first = client_of(&daemon, "alice", ProviderId::Tpm);
    let generation = std::thread::spawn(move || first.psa_generate_key("rsa", rsa_2048()));
    wait_until("the TPM holds the Create", || slow.slow_in_flight());
    let second = client_of(&daemon, "alice", ProviderId::Tpm);
    let queued = std::thread::spawn(move || second.psa_generate_key("queued", rsa_2048()));

    let status = service_error(generation.join().unwrap().unwrap_err());
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    let status = service_error(queued.join().unwrap().unwrap_err());
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    assert!(
        slow.slow_in_flight() && slow.slow_done() == 0,
        "the TPM answered before its clients were: they waited for it"
    );
    // Refused at once while hung; the software provider serves.
    let tpm_client = client_of(&daemon, "alice", ProviderId::Tpm);
    let status = service_error(
        tpm_client
            .psa_generate_key("third", rsa_2048())
            .unwrap_err(),
    );
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    assert!(slow.slow_in_flight(), "refused while the TPM is still hung");
    let log = daemon.log_text();
    assert!(log.contains("has not answered a request for 1 s"), "{log}");
    software
        .psa_sign_hash("sw", &[7; 32], ecdsa(Hash::Sha256))
        .expect("the software provider serves while the TPM hangs");

    wait_until("the TPM answers", || slow.slow_done() >= 1);
    wait_until("the late answer is logged", || {
        daemon.log_text().contains("late answer: app=alice")
    });
    assert!(daemon.log_text().contains("answered again after"));
    wait_until("the key the TPM made is kept", || {
        listed(&tpm_client, "rsa")
    });
    assert!(
        !listed(&tpm_client, "queued"),
        "the request answered in the queue never ran"
    );
    tpm_client
        .psa_sign_hash(
            "rsa",
            &common::sha(Hash::Sha256, b"rsa"),
            AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            },
        )
        .expect("the TPM serves again, with the late key");
}
