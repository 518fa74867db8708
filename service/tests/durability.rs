//! No key is ever lost: the software provider destroys key material only on positive
//! evidence (its journal's intent records and tombstones), so a damaged, unreadable or
//! unknown-version entry leaves its key file alone and restoring the entry restores the
//! key; and a crash at each step of a create or a destroy leaves the store consistent:
//! acknowledged keys work, unacknowledged creates leave no key file behind, acknowledged
//! destroys stay destroyed.
//!
//! The crashes are the service aborting itself at a named step (`PARSEC_CRASH_AT`, built
//! with the `crash-points` feature): no clean-up runs, as with `kill -9`. Power cuts (lost
//! page cache) are not covered here.
#![cfg(all(feature = "mbed-crypto-provider", feature = "crash-points"))]

mod common;

use common::{ecdsa, p256_signing, service_error, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::core::interface::requests::ResponseStatus;
use std::path::{Path, PathBuf};

fn entry_path(daemon: &Daemon, app: &str, name: &str) -> PathBuf {
    common::entry_path(&daemon.dir.join("store"), app, 1, name)
}

fn storage(daemon: &Daemon) -> PathBuf {
    daemon.dir.join("store").join("mbed-crypto")
}

fn key_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".psa_its"))
        .collect();
    names.sort();
    names
}

fn journal_records(daemon: &Daemon) -> Vec<String> {
    std::fs::read_dir(storage(daemon).join("journal"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn listed(daemon: &Daemon, app: &str, name: &str) -> bool {
    daemon
        .client(app)
        .list_keys()
        .unwrap()
        .iter()
        .any(|k| k.name == name)
}

/// Damages the entry with `damage`, checks that the key is skipped but its file kept, then
/// puts the original back and checks that the key works as before.
fn damaged_entry_keeps_its_key(name: &str, damage: impl Fn(&Path), what: &str) {
    let mut daemon = Daemon::start(name);
    let client = daemon.client("alice");
    client.psa_generate_key("k", p256_signing()).unwrap();
    let public = client.psa_export_public_key("k").unwrap();
    let files = key_files(&storage(&daemon));
    daemon.stop();

    let path = entry_path(&daemon, "alice", "k");
    let original = std::fs::read(&path).unwrap();
    damage(&path);
    daemon.spawn();
    assert!(
        !listed(&daemon, "alice", "k"),
        "a {what} entry is not served"
    );
    let log = daemon.log_text();
    assert!(log.contains("skipping damaged entry"), "{log}");
    assert!(!log.contains("destroying key file"), "{log}");
    assert_eq!(key_files(&storage(&daemon)), files, "the key file is kept");
    daemon.stop();

    if path.is_dir() {
        std::fs::remove_dir(&path).unwrap();
    }
    std::fs::write(&path, original).unwrap();
    daemon.spawn();
    let client = daemon.client("alice");
    assert_eq!(client.psa_export_public_key("k").unwrap(), public);
    client
        .psa_sign_hash("k", &[3; 32], ecdsa(Hash::Sha256))
        .unwrap();
}

#[test]
fn a_damaged_entry_keeps_its_key() {
    damaged_entry_keeps_its_key(
        "durable-damaged",
        |path| {
            let mut bytes = std::fs::read(path).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0x40;
            std::fs::write(path, bytes).unwrap();
        },
        "damaged",
    );
}

/// Unreadable: the entry's name is a directory (read fails with EISDIR; chmod 000 would not
/// stop the tests, which run as root).
#[test]
fn an_unreadable_entry_keeps_its_key() {
    damaged_entry_keeps_its_key(
        "durable-unreadable",
        |path| {
            std::fs::remove_file(path).unwrap();
            std::fs::create_dir(path).unwrap();
        },
        "unreadable",
    );
}

#[test]
fn an_entry_of_another_version_keeps_its_key() {
    damaged_entry_keeps_its_key(
        "durable-version",
        |path| {
            let mut bytes = std::fs::read(path).unwrap();
            bytes[3] = b'2';
            std::fs::write(path, bytes).unwrap();
        },
        "unknown-version",
    );
}

/// Starts the service so that it aborts at `point` and runs `request`; it is left stopped.
fn abort_at(daemon: &mut Daemon, point: &str, request: impl FnOnce(&Daemon)) {
    daemon.stop();
    daemon.env = vec![("PARSEC_CRASH_AT".into(), point.into())];
    daemon.spawn();
    request(daemon);
    let status = daemon.wait();
    assert!(
        !status.success(),
        "the service should have aborted at {point}"
    );
    daemon.env.clear();
}

/// As `abort_at`, then restarts the service cleanly.
fn crash_at(daemon: &mut Daemon, point: &str, request: impl FnOnce(&Daemon)) {
    abort_at(daemon, point, request);
    daemon.spawn();
}

#[test]
fn a_crash_during_a_create_leaves_nothing_unacknowledged_behind() {
    let mut daemon = Daemon::start("durable-create");
    // One key made before, which every crash must leave alone.
    daemon
        .client("alice")
        .psa_generate_key("kept", p256_signing())
        .unwrap();
    let baseline = key_files(&storage(&daemon));
    for point in [
        "create:after-intent",
        "create:after-material",
        "create:after-sync",
    ] {
        crash_at(&mut daemon, point, |d| {
            assert!(d
                .client("alice")
                .psa_generate_key("k", p256_signing())
                .is_err());
        });
        assert!(!listed(&daemon, "alice", "k"), "{point}: no key");
        assert_eq!(
            key_files(&storage(&daemon)),
            baseline,
            "{point}: no key file left"
        );
        assert!(
            journal_records(&daemon).is_empty(),
            "{point}: journal empty"
        );
        assert!(listed(&daemon, "alice", "kept"));
    }
    // After the entry is durable the key exists in full, though the client was not told.
    crash_at(&mut daemon, "create:after-entry", |d| {
        assert!(d
            .client("alice")
            .psa_generate_key("k", p256_signing())
            .is_err());
    });
    let client = daemon.client("alice");
    client
        .psa_sign_hash("k", &[5; 32], ecdsa(Hash::Sha256))
        .unwrap();
    assert!(journal_records(&daemon).is_empty());
    client
        .psa_sign_hash("kept", &[5; 32], ecdsa(Hash::Sha256))
        .unwrap();
}

/// A destroy cut short after its tombstone (never acknowledged), and then the key's entry
/// damaged: the next start cannot tell this from an acknowledged destroy whose file removal
/// was cut short, so it keeps the file (and the record); once the entry is restored, the
/// key is back and signs. Before, the start destroyed the key file: a key lost though its
/// client was never told it was destroyed.
#[test]
fn a_leftover_destroy_record_and_a_damaged_entry_keep_the_key() {
    let mut daemon = Daemon::start("durable-tombstone-damaged");
    daemon
        .client("alice")
        .psa_generate_key("d", p256_signing())
        .unwrap();
    let before = key_files(&storage(&daemon));
    abort_at(&mut daemon, "destroy:after-tombstone", |d| {
        assert!(d.client("alice").psa_destroy_key("d").is_err());
    });
    assert_eq!(
        journal_records(&daemon).len(),
        1,
        "the destroy record is left"
    );
    let path = entry_path(&daemon, "alice", "d");
    let good = std::fs::read(&path).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    std::fs::write(&path, &bad).unwrap();
    daemon.spawn();
    assert!(
        !listed(&daemon, "alice", "d"),
        "a damaged entry is not served"
    );
    daemon.stop();
    assert_eq!(
        key_files(&storage(&daemon)),
        before,
        "the key file was destroyed"
    );
    assert_eq!(journal_records(&daemon).len(), 1, "the record is kept");
    std::fs::write(&path, &good).unwrap();
    daemon.spawn();
    assert!(listed(&daemon, "alice", "d"));
    daemon
        .client("alice")
        .psa_sign_hash("d", &[9; 32], ecdsa(Hash::Sha256))
        .unwrap();
    assert!(journal_records(&daemon).is_empty());
}

#[test]
fn a_crash_during_a_destroy_keeps_or_destroys_the_key_entirely() {
    let mut daemon = Daemon::start("durable-destroy");
    // (where it crashes, whether the key is gone after, whether the client was told): the
    // material goes after the entry's removal is durable and the client answered.
    for (point, destroyed, acknowledged) in [
        ("destroy:after-tombstone", false, false),
        ("destroy:after-entry", true, false),
        ("destroy:after-material", true, true),
    ] {
        let client = daemon.client("alice");
        if !listed(&daemon, "alice", "d") {
            client.psa_generate_key("d", p256_signing()).unwrap();
        }
        let before = key_files(&storage(&daemon));
        crash_at(&mut daemon, point, |d| {
            assert_eq!(
                d.client("alice").psa_destroy_key("d").is_ok(),
                acknowledged,
                "{point}: acknowledged"
            );
        });
        let after = key_files(&storage(&daemon));
        if destroyed {
            assert!(!listed(&daemon, "alice", "d"), "{point}: the key is gone");
            assert_eq!(after.len() + 1, before.len(), "{point}: and so is its file");
        } else {
            assert!(listed(&daemon, "alice", "d"), "{point}: the key stays");
            daemon
                .client("alice")
                .psa_sign_hash("d", &[9; 32], ecdsa(Hash::Sha256))
                .unwrap();
            assert_eq!(after, before, "{point}: with its file");
        }
        assert!(
            journal_records(&daemon).is_empty(),
            "{point}: journal empty"
        );
    }
}

/// One bit of a software key file flipped on disk (the last byte of the P-256 private
/// scalar: still a valid key, another one): the key is refused with PsaErrorDataCorrupt and
/// a log line that names the file, rather than signing with another key and exporting
/// another public key (what it did before). Restoring the file restores the key.
#[test]
fn a_flipped_bit_in_a_key_file_is_refused_not_served() {
    let mut daemon = Daemon::start("durable-bitflip");
    let client = daemon.client("alice");
    client.psa_generate_key("k", p256_signing()).unwrap();
    let public = client.psa_export_public_key("k").unwrap();
    daemon.stop();
    let files = key_files(&storage(&daemon));
    assert_eq!(files.len(), 1);
    let path = storage(&daemon).join(&files[0]);
    let original = std::fs::read(&path).unwrap();
    let mut flipped = original.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x01;
    std::fs::write(&path, &flipped).unwrap();

    daemon.spawn();
    let client = daemon.client("alice");
    for result in [
        client.psa_export_public_key("k").map(|_| ()),
        client
            .psa_sign_hash("k", &[3; 32], ecdsa(Hash::Sha256))
            .map(|_| ()),
    ] {
        assert_eq!(
            service_error(result.unwrap_err()),
            ResponseStatus::PsaErrorDataCorrupt
        );
    }
    assert!(daemon
        .log_text()
        .contains("does not match the digest recorded in its key store entry"));
    daemon.stop();

    std::fs::write(&path, &original).unwrap();
    daemon.spawn();
    let client = daemon.client("alice");
    assert_eq!(client.psa_export_public_key("k").unwrap(), public);
    client
        .psa_sign_hash("k", &[3; 32], ecdsa(Hash::Sha256))
        .unwrap();
}
