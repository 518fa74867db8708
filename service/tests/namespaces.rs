//! An application is its name and the authenticator that vouched for it: after the operator
//! changes the authenticator, a Direct application called "1000" and the process of UID 1000
//! have their own keys, never each other's. A store written before namespaces (application
//! directories straight under the store) is upgraded in place at the first start, and a
//! kill -9 at every step of that upgrade loses nothing.
//!
//! The crashes are the service aborting itself at a named step (`PARSEC_CRASH_AT`, built
//! with the `crash-points` feature): no clean-up runs, as with `kill -9`.
#![cfg(all(feature = "mbed-crypto-provider", feature = "crash-points"))]

mod common;

use common::{ecdsa, p256_signing, Daemon};
use parsec_client::auth::Authentication;
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::BasicClient;
use std::collections::BTreeMap;
use std::path::Path;

fn uid() -> String {
    nix::unistd::getuid().as_raw().to_string()
}

/// A client that authenticates with its socket's peer credentials (its own UID).
fn peer_client(daemon: &Daemon) -> BasicClient {
    let mut client = daemon.naked_client();
    client.set_auth_data(Authentication::UnixPeerCredentials);
    client.set_default_provider().expect("default provider");
    client
}

fn switch_authenticator(daemon: &mut Daemon, from: &str, to: &str) {
    daemon.stop();
    let text = std::fs::read_to_string(&daemon.config).unwrap();
    let text = text.replace(
        &format!("auth_type = \"{from}\""),
        &format!("auth_type = \"{to}\""),
    );
    std::fs::write(&daemon.config, text).unwrap();
    daemon.spawn();
}

#[test]
fn a_direct_application_and_the_process_of_that_uid_never_share_keys() {
    let me = uid();
    let mut daemon = Daemon::start_with("ns-switch", "Direct", &[]);
    let direct = daemon.client(&me);
    direct.psa_generate_key("k", p256_signing()).unwrap();
    direct
        .psa_generate_key("only-direct", p256_signing())
        .unwrap();
    let direct_k = direct.psa_export_public_key("k").unwrap();
    drop(direct);

    switch_authenticator(&mut daemon, "Direct", "UnixPeerCredentials");
    let peer = peer_client(&daemon);
    assert!(
        peer.list_keys().unwrap().is_empty(),
        "UID {me} must not see the keys of the Direct application \"{me}\""
    );
    assert!(peer.psa_export_public_key("k").is_err());
    assert!(peer.psa_destroy_key("only-direct").is_err());
    peer.psa_generate_key("k", p256_signing()).unwrap();
    let peer_k = peer.psa_export_public_key("k").unwrap();
    assert_ne!(peer_k, direct_k);
    drop(peer);

    switch_authenticator(&mut daemon, "UnixPeerCredentials", "Direct");
    let direct = daemon.client(&me);
    let names: Vec<String> = direct
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(direct.psa_export_public_key("k").unwrap(), direct_k);
    direct
        .psa_sign_hash("only-direct", &[7; 32], ecdsa(Hash::Sha256))
        .unwrap();
}

/// Moves a namespaced store back to the layout before namespaces: the entries' files are the
/// same in both, one directory up, and the store has no `namespaces` record.
fn to_unnamespaced_layout(store: &Path) {
    for ns in std::fs::read_dir(store).unwrap().flatten() {
        if ns.file_name().to_string_lossy().starts_with('@') {
            for app in std::fs::read_dir(ns.path()).unwrap().flatten() {
                std::fs::rename(app.path(), store.join(app.file_name())).unwrap();
            }
            std::fs::remove_dir(ns.path()).unwrap();
        }
    }
    std::fs::remove_file(store.join("namespaces")).unwrap();
}

/// Every application's key names and public keys.
fn public_keys(daemon: &Daemon, apps: &[String]) -> BTreeMap<(String, String), Vec<u8>> {
    let mut keys = BTreeMap::new();
    for app in apps {
        let client = daemon.client(app);
        for key in client.list_keys().unwrap() {
            let public = client.psa_export_public_key(&key.name).unwrap();
            keys.insert((app.clone(), key.name), public);
        }
    }
    keys
}

#[test]
fn a_kill_at_every_step_of_the_namespace_upgrade_loses_nothing() {
    let mut daemon = Daemon::start_with("ns-upgrade", "Direct", &[]);
    let apps: Vec<String> = ["alice", "bob", "carol"].map(String::from).to_vec();
    for app in &apps {
        let client = daemon.client(app);
        for name in ["k1", "k2"] {
            client.psa_generate_key(name, p256_signing()).unwrap();
        }
    }
    let before = public_keys(&daemon, &apps);
    assert_eq!(before.len(), 6);
    daemon.stop();
    let store = daemon.dir.join("store");
    to_unnamespaced_layout(&store);

    // Each start goes one step further, then aborts; the next start goes on from there.
    // The authenticator is changed after the record is written: the record decides whose
    // the older entries are, not the config of the moment.
    let steps = [
        "namespace:after-record",
        "namespace:after-move-0",
        "namespace:after-move-0",
        "namespace:after-move-0",
    ];
    for (i, point) in steps.iter().enumerate() {
        daemon.env = vec![("PARSEC_CRASH_AT".into(), point.to_string())];
        assert!(
            !daemon.run_to_exit().success(),
            "step {i}: aborted at {point}"
        );
        let moved = std::fs::read_dir(store.join("@direct"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(moved, i, "step {i}: application directories moved so far");
        if i == 1 {
            let text = std::fs::read_to_string(&daemon.config).unwrap();
            std::fs::write(
                &daemon.config,
                text.replace(
                    "auth_type = \"Direct\"",
                    "auth_type = \"UnixPeerCredentials\"",
                ),
            )
            .unwrap();
        }
    }
    daemon.env.clear();
    daemon.spawn();
    let peer = peer_client(&daemon);
    assert!(peer.list_keys().unwrap().is_empty(), "not the UID's keys");
    drop(peer);
    switch_authenticator(&mut daemon, "UnixPeerCredentials", "Direct");
    assert_eq!(public_keys(&daemon, &apps), before);
    for app in &apps {
        daemon
            .client(app)
            .psa_sign_hash("k1", &[1; 32], ecdsa(Hash::Sha256))
            .unwrap();
    }
    let record = std::fs::read_to_string(store.join("namespaces")).unwrap();
    assert!(record.contains("unnamespaced = direct"), "{record}");
    let left: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    assert!(left.is_empty(), "not moved: {left:?}");
}
