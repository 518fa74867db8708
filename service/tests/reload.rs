//! Reloads (SIGHUP) at the worst moments, through the real daemon on its real socket: while a
//! worker is held in the middle of a create or a destroy (`PARSEC_HOLD_AT`, built with the
//! `crash-points` feature), with the config unchanged, with a provider's settings changed,
//! with a provider removed, and removed then restored; and a storm of them during a load on
//! all three providers. After each: the service is alive, every acknowledged key works and
//! belongs to exactly one application, every acknowledged destroy is gone.
#![cfg(all(feature = "mbed-crypto-provider", feature = "crash-points"))]

mod common;

use common::{ecdsa, p256_signing, service_error, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::core::interface::requests::{ProviderId, ResponseStatus};
use parsec_client::BasicClient;
use std::time::{Duration, Instant};

const SOFTWARE_TABLE: &str =
    "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"on-disk\"\n";

fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let until = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count(daemon: &Daemon, text: &str) -> usize {
    daemon.log_text().matches(text).count()
}

/// Writes `text` as the config, sends SIGHUP and waits until the reload is read.
fn reload(daemon: &Daemon, text: &str) {
    let before = count(daemon, "reloaded, listening on");
    std::fs::write(&daemon.config, text).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until("the reload is done", || {
        count(daemon, "reloaded, listening on") > before
    });
}

/// Waits until a worker has reached `point` `n` times in all.
fn held(daemon: &Daemon, point: &str, n: usize) {
    let text = format!("held at {point}");
    wait_until(&format!("a worker is held at {point}"), || {
        count(daemon, &text) >= n
    });
}

fn held_daemon(name: &str, points: &str, edit: impl Fn(String) -> String) -> Daemon {
    Daemon::start_in_env(
        name,
        "Direct",
        &["admin"],
        edit,
        &[("PARSEC_HOLD_AT", points), ("PARSEC_HOLD_MS", "1500")],
    )
}

fn alive(daemon: &Daemon) {
    daemon.client("anyone").ping().expect("the service answers");
}

fn signs(client: &BasicClient, name: &str) -> Vec<u8> {
    let hash = common::sha(Hash::Sha256, name.as_bytes());
    let signature = client
        .psa_sign_hash(name, &hash, ecdsa(Hash::Sha256))
        .unwrap_or_else(|e| panic!("sign with {name}: {e:?}"));
    client
        .psa_verify_hash(name, &hash, ecdsa(Hash::Sha256), &signature)
        .unwrap_or_else(|e| panic!("verify with {name}: {e:?}"));
    signature
}

/// Two quick reloads (software provider removed, then restored) while its worker is inside
/// a create: the create is stored (the provider is there again) or undone, and no two
/// applications' keys ever share material. Before instances owned their lifetime, the
/// restored instance's start-up recovery ran while the old worker was still creating: it
/// deleted the new key's file, and gave the next application the same key id.
#[test]
fn software_removed_then_restored_during_a_create_shares_no_key() {
    let daemon = held_daemon("reload-shared", "create:after-material", |t| t);
    let full = std::fs::read_to_string(&daemon.config).unwrap();
    let without = full.replace(SOFTWARE_TABLE, "");
    assert_ne!(full, without);

    let alice = daemon.client("alice");
    let creating = std::thread::spawn(move || alice.psa_generate_key("a", p256_signing()));
    held(&daemon, "create:after-material", 1);
    reload(&daemon, &without);
    reload(&daemon, &full);
    let outcome = creating.join().unwrap();
    alive(&daemon);

    let alice = daemon.client("alice");
    let bob = daemon.client("bob");
    bob.psa_generate_key("b", p256_signing()).unwrap();
    let listed = |c: &BasicClient| -> Vec<String> {
        c.list_keys().unwrap().into_iter().map(|k| k.name).collect()
    };
    match outcome {
        Ok(()) => {
            assert_eq!(listed(&alice), ["a"]);
            let (pa, pb) = (
                alice.psa_export_public_key("a").unwrap(),
                bob.psa_export_public_key("b").unwrap(),
            );
            assert_ne!(pa, pb, "alice's and bob's keys are one key");
            let hash = common::sha(Hash::Sha256, b"a");
            let signature = signs(&alice, "a");
            assert!(
                bob.psa_verify_hash("b", &hash, ecdsa(Hash::Sha256), &signature)
                    .is_err(),
                "alice's signature verifies under bob's key"
            );
            bob.psa_destroy_key("b").unwrap();
            signs(&alice, "a");
        }
        Err(e) => {
            assert_eq!(
                service_error(e),
                ResponseStatus::PsaErrorCommunicationFailure
            );
            assert!(listed(&alice).is_empty());
        }
    }
    assert!(!daemon
        .log_text()
        .contains("was being created when the service stopped"));
}

/// A DestroyKey in hand when a reload removes the provider: it answers Success only once the
/// key is gone, and the key is still gone when the provider comes back and after a restart.
/// Before, the reopened store no longer had the entry: the removal was skipped, the client
/// told Success, and the key came back with the provider.
#[test]
fn a_destroy_acknowledged_during_a_removal_is_destroyed() {
    let mut daemon = held_daemon("reload-destroy", "destroy:after-tombstone", |t| t);
    let full = std::fs::read_to_string(&daemon.config).unwrap();
    let without = full.replace(SOFTWARE_TABLE, "");
    let alice = daemon.client("alice");
    alice.psa_generate_key("gone", p256_signing()).unwrap();
    alice.psa_generate_key("kept", p256_signing()).unwrap();
    let storage = daemon.dir.join("store").join("mbed-crypto");
    let key_files = || {
        std::fs::read_dir(&storage)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".psa_its"))
            .count()
    };
    assert_eq!(key_files(), 2);

    let destroying = std::thread::spawn(move || alice.psa_destroy_key("gone"));
    held(&daemon, "destroy:after-tombstone", 1);
    reload(&daemon, &without);
    let outcome = destroying.join().unwrap();
    alive(&daemon);
    reload(&daemon, &full);
    let alice = daemon.client("alice");
    let names: Vec<String> = alice
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    match outcome {
        Ok(()) => {
            assert_eq!(names, ["kept"], "an acknowledged destroy came back");
            assert_eq!(key_files(), 1, "the destroyed key's file is still there");
        }
        Err(e) => panic!("the destroy in hand failed: {e:?}"),
    }
    signs(&alice, "kept");
    daemon.stop();
    daemon.spawn();
    let names: Vec<String> = daemon
        .client("alice")
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, ["kept"]);
}

/// A create in hand when a reload removes the provider for good: the client hears it failed
/// and nothing of the key is left.
#[test]
fn a_create_in_hand_when_its_provider_is_removed_is_undone() {
    let daemon = held_daemon("reload-undone", "create:after-material", |t| t);
    let full = std::fs::read_to_string(&daemon.config).unwrap();
    let without = full.replace(SOFTWARE_TABLE, "");
    let alice = daemon.client("alice");
    let creating = std::thread::spawn(move || alice.psa_generate_key("k", p256_signing()));
    held(&daemon, "create:after-material", 1);
    reload(&daemon, &without);
    let status = service_error(creating.join().unwrap().unwrap_err());
    assert_eq!(status, ResponseStatus::PsaErrorCommunicationFailure);
    reload(&daemon, &full);
    assert!(daemon.client("alice").list_keys().unwrap().is_empty());
    let storage = daemon.dir.join("store").join("mbed-crypto");
    let files: Vec<_> = std::fs::read_dir(&storage)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".psa_its"))
        .collect();
    assert!(files.is_empty(), "left behind: {files:?}");
}

/// A name the store cannot hold is refused before any device or file is touched.
#[test]
fn names_are_checked_before_the_provider_works() {
    let daemon = held_daemon("reload-names", "create:after-intent", |t| t);
    let alice = daemon.client("alice");
    for name in [String::new(), "n".repeat(121)] {
        let status = service_error(alice.psa_generate_key(&name, p256_signing()).unwrap_err());
        assert_eq!(status, ResponseStatus::PsaErrorInvalidArgument);
    }
    assert_eq!(
        count(&daemon, "held at create:after-intent"),
        0,
        "the provider started a create for a name the store refuses"
    );
    let journal = daemon.dir.join("store").join("mbed-crypto").join("journal");
    let records = std::fs::read_dir(&journal).map_or(0, |d| d.count());
    assert_eq!(records, 0);
}

#[cfg(feature = "pkcs11-provider")]
mod pkcs11 {
    use super::*;
    use common::{pkcs11_provider_table, with_provider_first, SoftHsm};

    fn hsm_daemon(name: &str, hsm: &SoftHsm) -> Daemon {
        hsm_daemon_held(name, hsm, "pkcs11:after-objects")
    }

    fn hsm_daemon_held(name: &str, hsm: &SoftHsm, points: &str) -> Daemon {
        let table = pkcs11_provider_table(hsm, "");
        let (key, value) = hsm.env();
        Daemon::start_in_env(
            name,
            "Direct",
            &["admin"],
            |text| with_provider_first(text, &table),
            &[
                (key, &value),
                ("PARSEC_HOLD_AT", points),
                ("PARSEC_HOLD_MS", "1500"),
            ],
        )
    }

    fn renamed(text: &str, name: &str) -> String {
        let renamed = text.replacen(
            "provider_type = \"Pkcs11\"\n",
            &format!("provider_type = \"Pkcs11\"\nname = \"{name}\"\n"),
            1,
        );
        assert_ne!(text, renamed);
        renamed
    }

    /// The number in "provider \"NAME\": starting instance N".
    fn instance_started(log: &str, name: &str) -> u64 {
        let marker = format!("provider \"{name}\": starting instance ");
        let at = log.find(&marker).expect(&marker) + marker.len();
        log[at..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A second reload while the first one's successor is still starting (its worker inside
    /// the module's C_Initialize and login, held here after it): that instance is stopped
    /// once it has started, unused, and only then does the next one start. Before, the
    /// starting instance was dropped and the next one started beside it: two instances
    /// initialising one module in one process (the crash a reload storm found).
    #[test]
    fn a_reload_while_the_successor_starts_waits_for_it_to_stop() {
        let hsm = SoftHsm::new("reload-p11-starting");
        let daemon = hsm_daemon_held("reload-p11-starting", &hsm, "start:built");
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let alice = daemon.client("alice");
        alice.psa_generate_key("k", p256_signing()).unwrap();
        held(&daemon, "start:built", 2); // the software provider and the token, at start-up
        reload(&daemon, &renamed(&text, "token-b"));
        wait_until("the first successor is starting", || {
            daemon
                .log_text()
                .contains("provider \"token-b\": starting instance")
        });
        held(&daemon, "start:built", 3);
        reload(&daemon, &renamed(&text, "token-c"));
        let bob = daemon.client("bob");
        let queued = bob.psa_generate_random(16).unwrap();
        assert_eq!(queued.len(), 16);
        wait_until("the last successor starts", || {
            daemon.log_text().contains("provider \"token-c\" started")
        });
        let log = daemon.log_text();
        let abandoned = instance_started(&log, "token-b");
        assert!(
            log.contains(&format!(
                "instance {abandoned} is still starting; it stops unused"
            )),
            "{log}"
        );
        let stopped = log
            .find(&format!(": instance {abandoned} stopped"))
            .unwrap_or_else(|| panic!("instance {abandoned} never stopped:\n{log}"));
        let next = log.find("provider \"token-c\": starting instance").unwrap();
        assert!(
            stopped < next,
            "the next instance started while instance {abandoned} was alive:\n{log}"
        );
        assert!(!log.contains("ALREADY_INITIALIZED"), "{log}");
        let alice = daemon.client("alice");
        signs(&alice, "k");
    }

    /// SIGHUP with nothing changed while the PKCS#11 worker is in the middle of a create:
    /// the module is left alone (before, the reload initialised it again, failed with
    /// CKR_CRYPTOKI_ALREADY_INITIALIZED and finalised it under the worker: SIGSEGV).
    #[test]
    fn unchanged_reloads_during_a_create_leave_the_module_alone() {
        let hsm = SoftHsm::new("reload-p11-same");
        let daemon = hsm_daemon("reload-p11-same", &hsm);
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let alice = daemon.client("alice");
        let creating = std::thread::spawn(move || alice.psa_generate_key("k", p256_signing()));
        held(&daemon, "pkcs11:after-objects", 1);
        for _ in 0..3 {
            reload(&daemon, &text);
        }
        creating.join().unwrap().unwrap();
        let alice = daemon.client("alice");
        assert_eq!(
            alice.list_keys().unwrap()[0].provider_id,
            ProviderId::Pkcs11
        );
        signs(&alice, "k");
        let log = daemon.log_text();
        assert!(!log.contains("ALREADY_INITIALIZED"), "{log}");
        assert!(!log.contains("has new settings"), "{log}");
    }

    /// New settings for the PKCS#11 provider (here: its name) while its worker creates: the
    /// create finishes on the old instance and is stored, the old instance finalises the
    /// module and stops, then its successor initialises it and serves the key.
    #[test]
    fn changed_settings_during_a_create_hand_over_after_it() {
        let hsm = SoftHsm::new("reload-p11-new");
        let daemon = hsm_daemon("reload-p11-new", &hsm);
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let renamed = text.replacen(
            "provider_type = \"Pkcs11\"\n",
            "provider_type = \"Pkcs11\"\nname = \"token-b\"\n",
            1,
        );
        assert_ne!(text, renamed);
        let alice = daemon.client("alice");
        let creating = std::thread::spawn(move || alice.psa_generate_key("k", p256_signing()));
        held(&daemon, "pkcs11:after-objects", 1);
        reload(&daemon, &renamed);
        // Requests sent while the successor waits are queued, then served by it.
        let bob = daemon.client("bob");
        let queued = std::thread::spawn(move || bob.psa_generate_random(16).map(|r| r.len()));
        creating.join().unwrap().unwrap();
        assert_eq!(queued.join().unwrap().unwrap(), 16);
        wait_until("the successor starts", || {
            daemon.log_text().contains("provider \"token-b\" started")
        });
        let alice = daemon.client("alice");
        signs(&alice, "k");
        let log = daemon.log_text();
        let stopped = log.find("stopped").expect("the old instance stopped");
        let started = log.find("provider \"token-b\" started").unwrap();
        assert!(
            stopped < started,
            "the successor started before the old instance stopped"
        );
        assert!(!log.contains("ALREADY_INITIALIZED"), "{log}");
    }

    fn failures(daemon: &Daemon) -> usize {
        count(daemon, "] provider \"pkcs11-provider\" failed to start")
    }

    /// A reload that gives the token a wrong PIN: the PKCS#11 provider is down alone (its
    /// requests refused with the cause, the software provider serves on), the PIN is never
    /// tried again unasked (each try counts against the token's lockout), and a reload with
    /// the right PIN brings it and its keys back. Before, the wrong PIN was tried again with
    /// each backoff retry, a lockout count each time.
    #[test]
    fn a_wrong_pin_at_a_reload_is_not_retried_and_the_rest_serves_on() {
        let hsm = SoftHsm::new("reload-p11-pin");
        let daemon = hsm_daemon_held("reload-p11-pin", &hsm, "none");
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let alice = daemon.client("alice");
        alice.psa_generate_key("k", p256_signing()).unwrap();
        let mut software = daemon.client("alice");
        software.set_implicit_provider(ProviderId::MbedCrypto);
        software.psa_generate_key("s", p256_signing()).unwrap();

        let wrong = text.replacen(
            &format!("user_pin = \"{}\"", common::USER_PIN),
            "user_pin = \"999999\"",
            1,
        );
        assert_ne!(text, wrong);
        reload(&daemon, &wrong);
        wait_until("the token refuses the PIN", || failures(&daemon) == 1);
        assert!(daemon.log_text().contains("CKR_PIN_INCORRECT"));
        signs(&software, "s");
        let refused = alice
            .psa_sign_hash("k", &[1; 32], ecdsa(Hash::Sha256))
            .unwrap_err();
        assert_eq!(
            service_error(refused),
            ResponseStatus::PsaErrorCommunicationFailure
        );
        // Longer than the first backoff (1 s): a PIN is not retried.
        std::thread::sleep(Duration::from_millis(2500));
        assert_eq!(failures(&daemon), 1, "the wrong PIN was tried again");

        reload(&daemon, &text);
        wait_until("the provider starts with the right PIN", || {
            count(&daemon, "provider \"pkcs11-provider\" started") >= 1
        });
        signs(&alice, "k");
        signs(&software, "s");
    }

    /// A reload naming a PKCS#11 module that is not there yet (a package still installing):
    /// the new settings cannot start, so the provider goes back to the settings it ran with
    /// and its keys are served again at once, as upstream keeps its running configuration
    /// when a reload fails; the next SIGHUP, once the module is there, switches to it.
    /// Before, the provider stayed down (its keys refused) until the module appeared.
    #[test]
    fn a_module_missing_at_a_reload_keeps_the_previous_settings() {
        let hsm = SoftHsm::new("reload-p11-late");
        let daemon = hsm_daemon_held("reload-p11-late", &hsm, "none");
        let text = std::fs::read_to_string(&daemon.config).unwrap();
        let alice = daemon.client("alice");
        alice.psa_generate_key("k", p256_signing()).unwrap();
        let started = || count(&daemon, "provider \"pkcs11-provider\" started");
        let first = started();
        let late = daemon.dir.join("late");
        std::fs::create_dir_all(&late).unwrap();
        let module = late.join("libsofthsm2.so");
        let moved = text.replacen(
            &format!("library_path = \"{}\"", common::SOFTHSM),
            &format!("library_path = \"{}\"", module.display()),
            1,
        );
        assert_ne!(text, moved);

        // No file there: seen before anything stops; the running instance is untouched.
        reload(&daemon, &moved);
        wait_until("the missing module is reported", || {
            count(&daemon, "its new settings cannot start") == 1
        });
        assert!(daemon.log_text().contains("No such file"));
        signs(&alice, "k");
        assert_eq!(started(), first, "the running instance was not restarted");

        // A file that is no PKCS#11 module: only its start can tell, and the provider goes
        // back to the settings it ran with.
        std::fs::write(&module, b"").unwrap();
        reload(&daemon, &moved);
        wait_until("the provider is back on its previous settings", || {
            count(&daemon, "goes back to the settings it ran with") == 1 && started() > first
        });
        signs(&alice, "k");

        std::fs::copy(common::SOFTHSM, &module).unwrap();
        let before = started();
        reload(&daemon, &moved);
        wait_until("the new module serves", || started() > before);
        assert_eq!(count(&daemon, "goes back to the settings it ran with"), 1);
        assert!(daemon.log_text().contains(&module.display().to_string()));
        signs(&alice, "k");
    }
}

/// At least 100 SIGHUPs (providers removed, restored, renamed) during a load of 8 clients on
/// all three providers (TPM on swtpm, PKCS#11 on SoftHSM2, software). Each client keeps the
/// keys it was told exist; at the end every one of them is listed, signs, and has a public
/// key no other key has; no key it was not told of exists; the service never died.
#[cfg(all(feature = "tpm-provider", feature = "pkcs11-provider"))]
mod storm {
    use super::*;
    use common::{pkcs11_provider_table, tpm_provider_table, with_provider_first, SoftHsm, Swtpm};
    use std::collections::{BTreeSet, HashSet};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const PROVIDERS: [ProviderId; 3] =
        [ProviderId::MbedCrypto, ProviderId::Pkcs11, ProviderId::Tpm];

    /// What one client was told: the keys that exist, and how many requests failed.
    struct Told {
        keys: BTreeSet<(u8, String)>,
        refused: usize,
        done: usize,
    }

    fn churn(daemon_socket: BasicClient, stop: Arc<AtomicBool>) -> Told {
        let mut client = daemon_socket;
        let mut told = Told {
            keys: BTreeSet::new(),
            refused: 0,
            done: 0,
        };
        let mut j = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let provider = PROVIDERS[j % 3];
            client.set_implicit_provider(provider);
            let name = format!("k{j}");
            match client.psa_generate_key(&name, p256_signing()) {
                Ok(()) => {
                    told.keys.insert((provider as u8, name.clone()));
                    told.done += 1;
                }
                Err(e) => {
                    // A service error (the provider was being replaced or removed): the key
                    // must not exist. Anything else (a broken connection) is a failure.
                    let _ = service_error(e);
                    told.refused += 1;
                }
            }
            if j % 2 == 0 && told.keys.contains(&(provider as u8, name.clone())) {
                match client.psa_destroy_key(&name) {
                    Ok(()) => {
                        told.keys.remove(&(provider as u8, name));
                        told.done += 1;
                    }
                    Err(e) => {
                        let _ = service_error(e);
                        told.refused += 1;
                    }
                }
            }
            j += 1;
        }
        told
    }

    fn replace_atomically(path: &std::path::Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn a_reload_storm_during_a_load_on_every_provider_loses_and_shares_nothing() {
        let tpm = Swtpm::start("reload-storm");
        let hsm = SoftHsm::new("reload-storm");
        let (tpm_table, p11_table) = (
            tpm_provider_table(&tpm.tcti()),
            pkcs11_provider_table(&hsm, ""),
        );
        let (key, value) = hsm.env();
        let daemon = Daemon::start_in_env(
            "reload-storm",
            "Direct",
            &["admin"],
            |text| with_provider_first(with_provider_first(text, &tpm_table), &p11_table),
            &[(key, &value)],
        );
        let full = std::fs::read_to_string(&daemon.config).unwrap();
        let variants = [
            full.replace(SOFTWARE_TABLE, ""),
            full.replace(&p11_table, ""),
            full.replace(&tpm_table, ""),
            full.replacen(
                "provider_type = \"Pkcs11\"\n",
                "provider_type = \"Pkcs11\"\nname = \"p11-b\"\n",
                1,
            ),
            full.replacen(
                "provider_type = \"Tpm\"\n",
                "provider_type = \"Tpm\"\nname = \"tpm-b\"\n",
                1,
            ),
        ];
        for v in &variants {
            assert_ne!(v, &full);
        }

        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let client = daemon.client(&format!("app{i}"));
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || churn(client, stop))
            })
            .collect();
        let mut sent = 0;
        for round in 0..10 {
            for (v, variant) in variants.iter().enumerate() {
                // A removal or a rename, then the full config again, at varying intervals.
                replace_atomically(&daemon.config, variant);
                daemon.signal(nix::sys::signal::Signal::SIGHUP);
                std::thread::sleep(Duration::from_millis(
                    20 + ((round * 7 + v * 13) % 60) as u64,
                ));
                replace_atomically(&daemon.config, &full);
                daemon.signal(nix::sys::signal::Signal::SIGHUP);
                std::thread::sleep(Duration::from_millis(
                    20 + ((round * 11 + v * 5) % 60) as u64,
                ));
                sent += 2;
            }
        }
        // The last reload is the full config; let the clients run on it a moment.
        reload(&daemon, &full);
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let told: Vec<Told> = clients.into_iter().map(|c| c.join().unwrap()).collect();
        alive(&daemon);

        let mut publics = HashSet::new();
        let mut keys = 0;
        for (i, told) in told.iter().enumerate() {
            let app = format!("app{i}");
            let mut client = daemon.client(&app);
            let listed: BTreeSet<(u8, String)> = client
                .list_keys()
                .unwrap()
                .into_iter()
                .map(|k| (k.provider_id as u8, k.name))
                .collect();
            assert_eq!(
                listed, told.keys,
                "{app}: the keys listed are not the keys it was told of"
            );
            for (provider, name) in &told.keys {
                client.set_implicit_provider(ProviderId::try_from(*provider).unwrap());
                signs(&client, name);
                let public = client.psa_export_public_key(name).unwrap();
                assert!(
                    publics.insert(public),
                    "{app}/{name}: another key has its public key"
                );
                keys += 1;
            }
        }
        let log = daemon.log_text();
        let reloads = log.matches("reloaded, listening on").count();
        let done: usize = told.iter().map(|t| t.done).sum();
        let refused: usize = told.iter().map(|t| t.refused).sum();
        eprintln!(
            "{sent} SIGHUPs sent, {reloads} reloads; {done} creates and destroys acknowledged, {refused} refused; {keys} keys checked"
        );
        assert!(sent >= 100);
        assert!(done > 0, "no request got through the storm");
        assert!(!log.contains("ALREADY_INITIALIZED"));
    }
}

/// The software provider's key files move with its key store (its storage_dir): a reload
/// onto another store (upstream's e2e configs switch between ./mappings and
/// ./kim-mappings) serves that store's keys, and never a key Mbed TLS still holds in memory
/// from the store before (a new instance starts Mbed TLS afresh), whether the provider's
/// settings change in one reload or it is removed and added back on the other store.
#[test]
fn a_software_provider_moved_to_another_store_serves_that_stores_keys_only() {
    let daemon = Daemon::start("reload-other-store");
    let first = daemon.config.clone();
    let text = std::fs::read_to_string(&first).unwrap();
    let alice = daemon.client("alice");
    alice.psa_generate_key("k", p256_signing()).unwrap();
    let alices = alice.psa_export_public_key("k").unwrap();
    signs(&alice, "k");
    drop(alice);

    let second = daemon.dir.join("store2");
    let on_second = text.replace(
        &format!("store_path = \"{}\"", daemon.dir.join("store").display()),
        &format!("store_path = \"{}\"", second.display()),
    );
    assert_ne!(on_second, text);
    // Removed, then added back on another store.
    reload(&daemon, &text.replace(SOFTWARE_TABLE, ""));
    reload(&daemon, &on_second);
    let bob = daemon.client("bob");
    wait_until("the software provider serves", || {
        bob.list_keys().is_ok_and(|k| k.is_empty())
    });
    bob.psa_generate_key("k", p256_signing()).unwrap();
    let bobs = bob.psa_export_public_key("k").unwrap();
    assert_ne!(
        bobs, alices,
        "bob was handed alice's key from the other store"
    );
    signs(&bob, "k");
    assert!(daemon.client("alice").list_keys().unwrap().is_empty());

    // Moved back in one reload: alice's key is hers again, bob's is not seen.
    reload(&daemon, &text);
    let alice = daemon.client("alice");
    wait_until("alice's key is back", || {
        alice.list_keys().is_ok_and(|k| k.len() == 1)
    });
    assert_eq!(alice.psa_export_public_key("k").unwrap(), alices);
    signs(&alice, "k");
    assert!(daemon.client("bob").list_keys().unwrap().is_empty());
    alive(&daemon);
}
