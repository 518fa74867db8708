//! A device that ran upstream Parsec 1.5.0, switched to this service: upstream's key store,
//! its Mbed TLS key files, its SoftHSM2 token and its TPM's state, exactly as a real
//! upstream 1.5.0 daemon left them (`tests/fixtures/upstream-1.5.0`, made by
//! `scripts/make-upstream-fixtures.sh`; docs/migration.md), run with upstream's config.
//!
//! Needs swtpm, softhsm2 and openssl (CI installs them).
#![cfg(all(
    feature = "mbed-crypto-provider",
    feature = "tpm-provider",
    feature = "pkcs11-provider"
))]

mod common;

use common::recorded::{assert_served, copy_fixture, Recorded, MESSAGE};
use common::{Daemon, Swtpm};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::BasicClient;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream-1.5.0");
/// A copy of one fixture, with its TPM running.
struct Device {
    dir: PathBuf,
    config: PathBuf,
    keys: Vec<Recorded>,
    /// SHA-256 of every file of upstream's (its key store and working directory).
    upstream_files: BTreeMap<PathBuf, Vec<u8>>,
    // Dropped last: the daemon talks to it.
    _tpm: Swtpm,
}

fn files_under(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "overlay") {
            // This service's, beside upstream's SQLite database.
            continue;
        }
        if path.is_dir() {
            files_under(&path, out);
        } else {
            out.insert(
                path.clone(),
                Sha256::digest(std::fs::read(&path).unwrap()).to_vec(),
            );
        }
    }
}

fn upstream_files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    files_under(&dir.join("mappings"), &mut files);
    files_under(&dir.join("kim-mappings"), &mut files);
    files_under(&dir.join("workdir"), &mut files);
    files
}

fn device(variant: &str, name: &str) -> Device {
    let dir = copy_fixture(&format!("{FIXTURES}/{variant}"), name);
    std::fs::write(
        dir.join("softhsm2.conf"),
        format!(
            "directories.tokendir = {}/softhsm/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.display()
        ),
    )
    .unwrap();
    let tpm = Swtpm::start_with_state(dir.join("tpm"));
    let text = std::fs::read_to_string(dir.join("config.toml"))
        .unwrap()
        .replace("@DIR@", &dir.display().to_string())
        .replace("@TCTI@", &tpm.tcti());
    let config = dir.join("run.toml");
    std::fs::write(&config, text).unwrap();
    let keys = Recorded::read(&dir.join("keys.txt"));
    let upstream_files = upstream_files(&dir);
    Device {
        dir,
        config,
        keys,
        upstream_files,
        _tpm: tpm,
    }
}

impl Device {
    fn daemon(&self) -> Daemon {
        let mut daemon = Daemon::on_config(
            self.dir.join("run"),
            self.config.clone(),
            self.dir.join("parsec.sock"),
            &[(
                "SOFTHSM2_CONF",
                self.dir.join("softhsm2.conf").display().to_string(),
            )],
        );
        std::fs::create_dir_all(&daemon.dir).unwrap();
        // Upstream ran in its working directory, where Mbed TLS kept its key files.
        daemon.cwd = Some(self.dir.join("workdir"));
        daemon.spawn();
        daemon
    }

    fn migrate_check(&self) -> (bool, String) {
        let out = Command::new(common::BIN)
            .args(["migrate", "--check", "--config"])
            .arg(&self.config)
            .current_dir(self.dir.join("workdir"))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    }

    fn assert_upstream_files_unchanged(&self) {
        assert_eq!(
            upstream_files(&self.dir),
            self.upstream_files,
            "upstream's store and key files must stay byte-identical"
        );
    }
}

fn provider(id: u8) -> ProviderId {
    ProviderId::try_from(id).unwrap()
}

fn listed(client: &mut BasicClient) -> BTreeSet<(u8, String)> {
    client
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| (k.provider_id as u8, k.name))
        .collect()
}

fn recorded_of<'a>(device: &'a Device, app: &str) -> Vec<&'a Recorded> {
    device.keys.iter().filter(|k| k.app == app).collect()
}

#[test]
fn a_direct_device_keeps_every_key_and_upstream_files_stay_as_they_were() {
    let device = device("ondisk-direct", "upstream-direct");
    assert_eq!(
        device.keys.len(),
        18,
        "the fixture holds 2 apps x 3 providers x 3 keys"
    );

    // Before anything runs: the report names every key, and writes nothing.
    let (all_served, report) = device.migrate_check();
    assert!(all_served, "{report}");
    assert_eq!(report.matches(": served: ").count(), 18, "{report}");
    assert_eq!(
        report
            .matches("served: loaded under upstream's primary key")
            .count(),
        6,
        "{report}"
    );
    assert!(
        !device.dir.join("mappings.overlay").exists(),
        "migrate --check wrote:\n{report}"
    );
    device.assert_upstream_files_unchanged();

    let mut daemon = device.daemon();
    for app in ["alice", "bob"] {
        let mut client = daemon.client(app);
        let expected: BTreeSet<(u8, String)> = recorded_of(&device, app)
            .iter()
            .map(|k| (k.provider, k.name.clone()))
            .collect();
        assert_eq!(listed(&mut client), expected, "{app}'s keys");
        assert_served(&device.dir, &mut client, &recorded_of(&device, app));
    }

    // Keys made after the switch do not disturb upstream's; destroys of upstream keys stick.
    let mut alice = daemon.client("alice");
    for id in [1u8, 2] {
        alice.set_implicit_provider(provider(id));
        alice
            .psa_generate_key("made-here", common::p256_signing())
            .unwrap_or_else(|e| panic!("a new key on provider {id}: {e}"));
    }
    // Its id is far above upstream's (which gives out its highest + 1): upstream, if the
    // device goes back to it, never makes a key of the same id.
    assert!(
        device
            .dir
            .join("mappings.overlay/mbed-crypto/0000000020000000.psa_its")
            .is_file(),
        "the first software key made beside upstream's store has id 0x20000000"
    );
    let mut bob = daemon.client("bob");
    bob.set_implicit_provider(ProviderId::MbedCrypto);
    bob.psa_destroy_key("rsa-sign").unwrap();
    alice.set_implicit_provider(ProviderId::Pkcs11);
    alice.psa_destroy_key("ecc-sign").unwrap();
    device.assert_upstream_files_unchanged();

    daemon.stop();
    drop(daemon);
    let daemon = device.daemon();
    let gone = |k: &&Recorded| {
        !((k.app == "bob" && k.provider == 1 && k.name == "rsa-sign")
            || (k.app == "alice" && k.provider == 2 && k.name == "ecc-sign"))
    };
    for app in ["alice", "bob"] {
        let mut client = daemon.client(app);
        let keys: Vec<&Recorded> = recorded_of(&device, app).into_iter().filter(gone).collect();
        let mut expected: BTreeSet<(u8, String)> =
            keys.iter().map(|k| (k.provider, k.name.clone())).collect();
        if app == "alice" {
            expected.insert((1, "made-here".into()));
            expected.insert((2, "made-here".into()));
        }
        assert_eq!(
            listed(&mut client),
            expected,
            "{app}'s keys after the restart"
        );
        assert_served(&device.dir, &mut client, &keys);
    }
    let mut alice = daemon.client("alice");
    for id in [1u8, 2] {
        alice.set_implicit_provider(provider(id));
        alice
            .psa_sign_hash(
                "made-here",
                &Sha256::digest(MESSAGE),
                common::ecdsa_sha256(),
            )
            .unwrap_or_else(|e| panic!("the new key on provider {id}: {e}"));
    }
    // A destroyed upstream name can be taken again, by a new key.
    let mut bob = daemon.client("bob");
    bob.set_implicit_provider(ProviderId::MbedCrypto);
    bob.psa_generate_key("rsa-sign", common::p256_signing())
        .unwrap();
    assert_ne!(
        bob.psa_export_public_key("rsa-sign").unwrap(),
        recorded_of(&device, "bob")
            .iter()
            .find(|k| k.provider == 1 && k.name == "rsa-sign")
            .unwrap()
            .public
    );
    device.assert_upstream_files_unchanged();
    let (_, report) = device.migrate_check();
    assert_eq!(
        report.matches("destroyed through this service").count(),
        2,
        "{report}"
    );
}

#[test]
fn a_peer_credentials_device_serves_its_uid_its_keys() {
    let device = device("ondisk-peer", "upstream-peer");
    let daemon = device.daemon();
    // The fixture's keys belong to UID 0 (the daemon that made them ran as root): a test
    // run as another user sees none of them, as upstream would.
    let uid = nix::unistd::getuid().as_raw().to_string();
    let mine = recorded_of(&device, &uid);
    let mut client = daemon.default_client(None);
    let expected: BTreeSet<(u8, String)> =
        mine.iter().map(|k| (k.provider, k.name.clone())).collect();
    assert_eq!(listed(&mut client), expected);
    if !mine.is_empty() {
        assert_eq!(mine.len(), 9);
        assert_served(&device.dir, &mut client, &mine);
    } else {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
    }
    device.assert_upstream_files_unchanged();
}

/// Upstream's SQLite store, as Debian's parsec-service uses by default, on a device whose
/// operator switched the authenticator: upstream 1.5.0 made keys for the Direct
/// applications "alice" and "0", then, switched to UnixPeerCredentials, for UID 0. Each of
/// the two "0"s gets its own keys, never the other's.
#[test]
fn an_sqlite_device_keeps_every_key_of_each_authenticator() {
    let device = device("sqlite-mixed", "upstream-sqlite");
    assert_eq!(device.keys.len(), 27, "3 apps x 3 providers x 3 keys");
    let db = device
        .dir
        .join("kim-mappings/sqlite/sqlite-key-info-manager.sqlite3");
    let overlay = db.with_file_name("sqlite-key-info-manager.sqlite3.overlay");

    let (all_served, report) = device.migrate_check();
    assert!(all_served, "{report}");
    assert_eq!(report.matches(": served: ").count(), 27, "{report}");
    assert_eq!(
        report
            .matches("of unix-peer-credentials application \"0\"")
            .count(),
        9,
        "{report}"
    );
    assert!(!overlay.exists(), "migrate --check wrote:\n{report}");

    // As upstream last ran: UnixPeerCredentials. UID 0 sees its keys, not Direct "0"'s.
    let mut daemon = device.daemon();
    let uid = nix::unistd::getuid().as_raw().to_string();
    let peer_keys = recorded_of(&device, &format!("uid:{uid}"));
    let mut client = daemon.default_client(None);
    let expected: BTreeSet<(u8, String)> = peer_keys
        .iter()
        .map(|k| (k.provider, k.name.clone()))
        .collect();
    assert_eq!(listed(&mut client), expected, "UID {uid}'s keys");
    if peer_keys.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
    } else {
        assert_served(&device.dir, &mut client, &peer_keys);
        // A destroy of one of its keys does not touch Direct "0"'s key of that name.
        client.set_implicit_provider(ProviderId::MbedCrypto);
        client.psa_destroy_key("ecc-sign-p1").unwrap();
    }
    drop(client);
    daemon.stop();
    drop(daemon);

    // Back to Direct, as the operator had it first.
    let text = std::fs::read_to_string(&device.config).unwrap();
    std::fs::write(
        &device.config,
        text.replace(
            "auth_type = \"UnixPeerCredentials\"",
            "auth_type = \"Direct\"",
        ),
    )
    .unwrap();
    let daemon = device.daemon();
    for app in ["alice", "0"] {
        let mut client = daemon.client(app);
        let keys = recorded_of(&device, app);
        assert_eq!(keys.len(), 9);
        let expected: BTreeSet<(u8, String)> =
            keys.iter().map(|k| (k.provider, k.name.clone())).collect();
        assert_eq!(listed(&mut client), expected, "Direct {app}'s keys");
        assert_served(&device.dir, &mut client, &keys);
    }
    let mut alice = daemon.client("alice");
    alice.set_implicit_provider(ProviderId::Pkcs11);
    alice
        .psa_generate_key("made-here", common::p256_signing())
        .unwrap();
    alice.psa_destroy_key("rsa-sign-p2").unwrap();
    alice.set_implicit_provider(ProviderId::Tpm);
    alice.psa_destroy_key("ecc-sign-p3").unwrap();
    assert!(alice.psa_export_public_key("ecc-sign-p3").is_err());
    device.assert_upstream_files_unchanged();
    assert!(
        overlay.is_dir(),
        "this service's entries go beside the database"
    );
    let (_, report) = device.migrate_check();
    let destroyed = if peer_keys.is_empty() { 2 } else { 3 };
    assert_eq!(
        report.matches("destroyed through this service").count(),
        destroyed,
        "{report}"
    );
}
