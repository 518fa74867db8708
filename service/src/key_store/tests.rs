//! The key store's own unit tests.

use super::*;
use parsec_interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_interface::operations::psa_key_attributes::{
    EccFamily, Lifetime, Policy, Type, UsageFlags,
};

fn attributes() -> Attributes {
    let mut usage = UsageFlags::default();
    usage.set_sign_hash();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::EccKeyPair {
            curve_family: EccFamily::SecpR1,
        },
        bits: 256,
        policy: Policy {
            usage_flags: usage,
            permitted_algorithms: AsymmetricSignature::Ecdsa {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
        },
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pks-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    dir
}

/// A software-provider key of a Direct application.
fn mbed_key(app: &str, name: &str) -> KeyTriple {
    KeyTriple::new(
        &AppId::new(AuthType::Direct, app),
        ProviderId::MbedCrypto,
        name,
    )
}

fn entry(id: u8) -> KeyEntry {
    KeyEntry {
        key_id: vec![id, 0, 0, 0],
        attributes: attributes(),
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn entries_survive_reopening() {
    let dir = temp_dir("reopen");
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, damaged) = KeyStore::open(&roots).unwrap();
    assert!(damaged.is_empty());
    let a = mbed_key("app/with/slashes", "clé ✓");
    let b = mbed_key("other", "k");
    store.insert(a.clone(), entry(1)).unwrap();
    store.insert(b.clone(), entry(2)).unwrap();
    assert_eq!(
        store.insert(a.clone(), entry(3)).unwrap_err().status,
        ResponseStatus::PsaErrorAlreadyExists
    );
    store.remove(&b).unwrap();
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert!(damaged.is_empty());
    assert_eq!(store.get(&a), Some(&entry(1)));
    assert!(!store.contains(&b));
    assert_eq!(
        store.applications(AuthType::Direct),
        vec!["app/with/slashes".to_string()]
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// Two entries naming one provider key (a file rewritten to another key's id): neither
/// is served, both are reported damaged (so recovery keeps the material), the others load.
#[test]
fn entries_that_share_a_key_id_are_all_set_aside() {
    let dir = temp_dir("shared-id");
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, _) = KeyStore::open(&roots).unwrap();
    let alice = mbed_key("alice", "k");
    let bob = mbed_key("bob", "k");
    let carol = mbed_key("carol", "k");
    store.insert(alice.clone(), entry(1)).unwrap();
    store.insert(bob.clone(), entry(1)).unwrap();
    store.insert(carol.clone(), entry(2)).unwrap();
    // The software provider's ids carry the key file's digest after the 4-byte id: two
    // entries naming one file with different digests share the key all the same.
    let dave = mbed_key("dave", "k");
    let erin = mbed_key("erin", "k");
    let with_digest = |digest: u8| KeyEntry {
        key_id: [&[7, 0, 0, 0][..], &[digest; 32]].concat(),
        attributes: attributes(),
    };
    store.insert(dave.clone(), with_digest(1)).unwrap();
    store.insert(erin.clone(), with_digest(2)).unwrap();
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert!(!store.contains(&alice) && !store.contains(&bob));
    assert!(!store.contains(&dave) && !store.contains(&erin));
    assert_eq!(store.get(&carol), Some(&entry(2)));
    assert_eq!(damaged.len(), 4);
    assert!(damaged
        .iter()
        .all(|d| d.reason.contains("names the same key as")));
    assert_eq!(store.damaged_in(ProviderId::MbedCrypto), 4);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_batch_is_invisible_until_committed_then_durable_together() {
    let (dir, roots, mut store, old) = store_with_one_key("batch");
    let mut batch = Batch::default();
    let keys: Vec<KeyTriple> = (0..8).map(|i| mbed_key(&format!("app{i}"), "k")).collect();
    for (i, key) in keys.iter().enumerate() {
        store
            .stage_insert(&mut batch, key.clone(), entry(i as u8))
            .unwrap();
    }
    // One change per key in a batch, and none visible yet.
    assert_eq!(
        store
            .stage_insert(&mut batch, keys[0].clone(), entry(0))
            .unwrap_err()
            .status,
        ResponseStatus::PsaErrorAlreadyExists
    );
    assert_eq!(store.stage_remove(&mut batch, &old).unwrap(), entry(9));
    assert!(keys.iter().all(|k| !store.contains(k)) && store.contains(&old));
    // A request's changes taken back: its temporary file goes.
    let mark = batch.mark();
    let extra = mbed_key("z", "k");
    store
        .stage_insert(&mut batch, extra.clone(), entry(1))
        .unwrap();
    batch.discard_from(mark);
    store.commit(batch).unwrap();
    assert!(keys.iter().all(|k| store.contains(k)));
    assert!(!store.contains(&old) && !store.contains(&extra));
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert!(damaged.is_empty());
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(store.get(key), Some(&entry(i as u8)));
    }
    assert!(!store.contains(&old) && !store.contains(&extra));
    assert_no_temporary_files(&dir);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn batches_committed_together_share_a_group_and_fail_alone() {
    let (dir, roots, mut store, old) = store_with_one_key("group");
    // Three batches, as three turns of the loop hand them to the writer: one removes a
    // key, one adds two, one adds a key whose rename will fail.
    let mut batches = vec![Batch::default(), Batch::default(), Batch::default()];
    store.stage_remove(&mut batches[0], &old).unwrap();
    let new: Vec<KeyTriple> = (0..2).map(|i| mbed_key("b", &format!("k{i}"))).collect();
    for (i, key) in new.iter().enumerate() {
        store
            .stage_insert(&mut batches[1], key.clone(), entry(i as u8))
            .unwrap();
    }
    let doomed = mbed_key("c", "k");
    store
        .stage_insert(&mut batches[2], doomed.clone(), entry(7))
        .unwrap();
    // Its final name is taken by a directory: the rename cannot replace it.
    let in_the_way = store.path_of(&doomed).unwrap();
    fs::create_dir(&in_the_way).unwrap();
    fs::write(in_the_way.join("x"), b"x").unwrap();
    for batch in &batches {
        store.hold(batch);
    }
    let done = durable_all(batches);
    assert_eq!(done.len(), 3);
    let outcomes: Vec<Result<(), OpError>> = done.into_iter().map(|c| store.apply(c)).collect();
    assert!(outcomes[0].is_ok() && outcomes[1].is_ok(), "{outcomes:?}");
    assert_eq!(
        outcomes[2].as_ref().unwrap_err().status,
        ResponseStatus::PsaErrorStorageFailure
    );
    assert!(!store.contains(&old) && !store.contains(&doomed));
    assert!(new.iter().all(|k| store.contains(k)));
    fs::remove_dir_all(&in_the_way).unwrap();
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert!(damaged.is_empty(), "{damaged:?}");
    assert!(!store.contains(&old) && !store.contains(&doomed));
    for (i, key) in new.iter().enumerate() {
        assert_eq!(store.get(key), Some(&entry(i as u8)));
    }
    assert_no_temporary_files(&dir);
    fs::remove_dir_all(&dir).unwrap();
}

/// A new store in its own directory holding one key, `a`/`old` (entry 9).
fn store_with_one_key(name: &str) -> (PathBuf, [(ProviderId, PathBuf); 1], KeyStore, KeyTriple) {
    let dir = temp_dir(name);
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, _) = KeyStore::open(&roots).unwrap();
    let old = mbed_key("a", "old");
    store.insert(old.clone(), entry(9)).unwrap();
    (dir, roots, store, old)
}

fn assert_no_temporary_files(dir: &Path) {
    let leftovers: Vec<_> = walk(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

#[test]
fn damaged_and_half_written_entries_are_skipped() {
    let dir = temp_dir("damaged");
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, _) = KeyStore::open(&roots).unwrap();
    let good = mbed_key("a", "good");
    let bad = mbed_key("a", "bad");
    store.insert(good.clone(), entry(1)).unwrap();
    store.insert(bad.clone(), entry(2)).unwrap();
    let bad_path = store.path_of(&bad).unwrap();
    let mut bytes = fs::read(&bad_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    fs::write(&bad_path, bytes).unwrap();
    let tmp = bad_path.parent().unwrap().join(".x.key.tmp");
    fs::write(&tmp, b"PKS1").unwrap();
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert_eq!(damaged.len(), 1);
    assert_eq!(damaged[0].path, bad_path);
    assert!(damaged[0].reason.contains("checksum"));
    assert!(store.contains(&good));
    assert!(!tmp.exists());
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_entry_moved_to_another_application_is_refused() {
    let dir = temp_dir("moved");
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, _) = KeyStore::open(&roots).unwrap();
    let victim = mbed_key("victim", "k");
    store.insert(victim.clone(), entry(1)).unwrap();
    let src = store.path_of(&victim).unwrap();
    let thief = mbed_key("thief", "k");
    let dst = store.path_of(&thief).unwrap();
    fs::create_dir_all(dst.parent().unwrap()).unwrap();
    fs::copy(&src, &dst).unwrap();
    drop(store);
    let (store, damaged) = KeyStore::open(&roots).unwrap();
    assert_eq!(damaged.len(), 1);
    assert!(!store.contains(&thief));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_store_is_private_to_the_service_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("modes");
    let (mut store, _) = KeyStore::open(&[(ProviderId::MbedCrypto, dir.clone())]).unwrap();
    let key = mbed_key("a", "k");
    store.insert(key.clone(), entry(1)).unwrap();
    let path = store.path_of(&key).unwrap();
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(path.parent().unwrap()), 0o700);
    assert_eq!(mode(&path), 0o600);
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn overlong_names_are_invalid_arguments() {
    let dir = temp_dir("long");
    let (mut store, _) = KeyStore::open(&[(ProviderId::MbedCrypto, dir.clone())]).unwrap();
    let long = "x".repeat(MAX_NAME_LEN + 1);
    let err = store.insert(mbed_key("a", &long), entry(1)).unwrap_err();
    assert_eq!(err.status, ResponseStatus::PsaErrorInvalidArgument);
    fs::remove_dir_all(&dir).unwrap();
}

/// An upstream OnDisk store as upstream 1.5.0 lays it out: base64url names, bincode
/// `KeyInfo` files, its `parsec/` directory.
fn upstream_store(dir: &Path) {
    fs::create_dir_all(dir.join("parsec")).unwrap();
    // "alice" and "k1", "k2" in base64url with padding; provider 1.
    let keys = dir.join("YWxpY2U=").join("1");
    fs::create_dir_all(&keys).unwrap();
    fs::write(keys.join("azE="), bincode::serialize(&entry(7)).unwrap()).unwrap();
    fs::write(keys.join("azI="), bincode::serialize(&entry(8)).unwrap()).unwrap();
    // Not a KeyInfo: reported, never served.
    fs::write(keys.join("azM="), b"\x01\x02").unwrap();
}

#[test]
fn an_upstream_store_is_served_and_never_written() {
    let dir = temp_dir("upstream");
    upstream_store(&dir);
    let snapshot = |dir: &Path| -> BTreeMap<PathBuf, Vec<u8>> {
        walk(dir)
            .into_iter()
            .map(|f| {
                let bytes = fs::read(&f).unwrap();
                (f, bytes)
            })
            .collect()
    };
    let before = snapshot(&dir);
    let roots = [(ProviderId::MbedCrypto, dir.clone())];
    let (mut store, damaged) = KeyStore::open(&roots).unwrap();
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    let k1 = mbed_key("alice", "k1");
    let k2 = mbed_key("alice", "k2");
    assert_eq!(store.get(&k1), Some(&entry(7)));
    assert!(store.is_inherited(&k1));
    assert_eq!(
        store.own_dir(ProviderId::MbedCrypto),
        Some(upstream::overlay_of(&dir).as_path())
    );
    // A new key and a destroyed upstream key go to the overlay.
    let new = mbed_key("alice", "new");
    store.insert(new.clone(), entry(9)).unwrap();
    assert_eq!(store.remove(&k1).unwrap(), entry(7));
    assert!(!store.contains(&k1));
    drop(store);
    assert_eq!(snapshot(&dir), before, "upstream's store was written");
    let (mut store, _) = KeyStore::open(&roots).unwrap();
    assert!(!store.contains(&k1), "a destroyed upstream key came back");
    assert_eq!(store.get(&k2), Some(&entry(8)));
    assert_eq!(store.get(&new), Some(&entry(9)));
    assert!(!store.is_inherited(&new));
    // The name is free again: a new key takes it, and outlives a reopening.
    store.insert(k1.clone(), entry(10)).unwrap();
    drop(store);
    let (store, _) = KeyStore::open(&roots).unwrap();
    assert_eq!(store.get(&k1), Some(&entry(10)));
    assert!(!store.is_inherited(&k1));
    assert_eq!(snapshot(&dir), before);
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(upstream::overlay_of(&dir)).unwrap();
}

/// Moves a namespaced store back to the layout before namespaces (application directories
/// straight under the root, no record): entries' files are the same in both layouts.
fn to_unnamespaced_layout(root: &Path) {
    for ns in fs::read_dir(root).unwrap().flatten() {
        if namespace::auth_of_dir(&ns.file_name().to_string_lossy()).is_some() {
            for app in fs::read_dir(ns.path()).unwrap().flatten() {
                fs::rename(app.path(), root.join(app.file_name())).unwrap();
            }
            fs::remove_dir(ns.path()).unwrap();
        }
    }
    fs::remove_file(root.join(namespace::RECORD)).unwrap();
}

#[test]
fn a_store_from_before_namespaces_is_upgraded_and_keeps_its_authenticator() {
    let dir = temp_dir("namespaces");
    let direct = |app| AppId::new(AuthType::Direct, app);
    let peer = |app| AppId::new(AuthType::UnixPeerCredentials, app);
    let key = |app: &AppId| KeyTriple::new(app, ProviderId::MbedCrypto, "k");
    let mut store = KeyStore::new();
    store
        .load(ProviderId::MbedCrypto, &dir, AuthType::Direct)
        .unwrap();
    store.insert(key(&direct("1000")), entry(1)).unwrap();
    store.insert(key(&direct("alice")), entry(2)).unwrap();
    drop(store);
    to_unnamespaced_layout(&dir);

    // First start of this version, configured for Direct: the older entries are Direct's.
    let mut store = KeyStore::new();
    let damaged = store
        .load(ProviderId::MbedCrypto, &dir, AuthType::Direct)
        .unwrap();
    assert!(damaged.is_empty(), "{damaged:?}");
    assert_eq!(
        namespace::recorded(&dir).unwrap(),
        Some(AuthType::Direct as u8)
    );
    assert_eq!(store.get(&key(&direct("1000"))), Some(&entry(1)));
    assert!(walk(&dir)
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "key"))
        .all(|p| p.starts_with(dir.join("@direct"))));
    drop(store);

    // The operator switches to UnixPeerCredentials: UID 1000 is not Direct's "1000".
    let mut store = KeyStore::new();
    store
        .load(ProviderId::MbedCrypto, &dir, AuthType::UnixPeerCredentials)
        .unwrap();
    assert!(store.keys_of(&peer("1000")).next().is_none());
    assert_eq!(
        store.applications(AuthType::UnixPeerCredentials),
        Vec::<String>::new()
    );
    store.insert(key(&peer("1000")), entry(3)).unwrap();
    drop(store);
    let mut store = KeyStore::new();
    store
        .load(ProviderId::MbedCrypto, &dir, AuthType::UnixPeerCredentials)
        .unwrap();
    assert_eq!(store.get(&key(&direct("1000"))), Some(&entry(1)));
    assert_eq!(store.get(&key(&peer("1000"))), Some(&entry(3)));
    assert_eq!(store.applications(AuthType::Direct), vec!["1000", "alice"]);
    assert_eq!(
        store.applications(AuthType::UnixPeerCredentials),
        vec!["1000"]
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_older_layout_restored_beside_an_upgraded_store_is_merged_without_loss() {
    let dir = temp_dir("ns-merge");
    let alice = AppId::new(AuthType::Direct, "alice");
    let k = |name| KeyTriple::new(&alice, ProviderId::MbedCrypto, name);
    let (mut store, _) = KeyStore::open(&[(ProviderId::MbedCrypto, dir.clone())]).unwrap();
    store.insert(k("same"), entry(1)).unwrap();
    store.insert(k("moved"), entry(2)).unwrap();
    store.insert(k("clash"), entry(3)).unwrap();
    drop(store);
    // A backup of alice's directory in the older layout, with one entry changed since.
    let app_dir = dir.join("@direct").join(hex("alice"));
    let backup = dir.join(hex("alice"));
    fs::create_dir_all(backup.join("1")).unwrap();
    for file in fs::read_dir(app_dir.join("1")).unwrap().flatten() {
        fs::copy(file.path(), backup.join("1").join(file.file_name())).unwrap();
    }
    fs::remove_file(app_dir.join("1").join(format!("{}.key", hex("moved")))).unwrap();
    let clash = format!("{}.key", hex("clash"));
    let mut other = KeyStore::new();
    let other_dir = temp_dir("ns-merge-other");
    other
        .load(ProviderId::MbedCrypto, &other_dir, AuthType::Direct)
        .unwrap();
    other.insert(k("clash"), entry(9)).unwrap();
    fs::copy(
        other_dir
            .join("@direct")
            .join(hex("alice"))
            .join("1")
            .join(&clash),
        backup.join("1").join(&clash),
    )
    .unwrap();

    let mut store = KeyStore::new();
    let damaged = store
        .load(ProviderId::MbedCrypto, &dir, AuthType::Direct)
        .unwrap();
    assert_eq!(store.get(&k("same")), Some(&entry(1)));
    assert_eq!(store.get(&k("moved")), Some(&entry(2)));
    assert_eq!(store.get(&k("clash")), Some(&entry(3)));
    assert_eq!(damaged.len(), 1, "{damaged:?}");
    assert_eq!(damaged[0].path, backup.join("1").join(&clash));
    assert!(
        backup.join("1").join(&clash).is_file(),
        "neither copy is lost"
    );
    fs::remove_dir_all(&dir).unwrap();
    fs::remove_dir_all(&other_dir).unwrap();
}
