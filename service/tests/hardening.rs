//! Bad luck and bad neighbours: rate limits, a full disk, a damaged key store entry.

mod common;

use common::{ecdsa_sha256, p256_signing, Daemon};
use parsec_client::core::interface::requests::ResponseStatus;
use parsec_client::error::Error;
use std::process::Command;

#[test]
fn one_application_over_its_rate_does_not_starve_another() {
    let daemon = Daemon::start_edited("rate", "Direct", &[], |text| {
        text.replace(
            "allow_root = true",
            "allow_root = true\nclient_rate_limit = 20\nclient_rate_burst = 20",
        )
    });
    let flood = daemon.client("flood");
    let polite = daemon.client("polite");
    let (mut admitted, mut throttled) = (0, 0);
    let start = std::time::Instant::now();
    for i in 0..300 {
        match flood.list_keys() {
            Ok(_) => admitted += 1,
            Err(Error::Service(ResponseStatus::PsaErrorInsufficientMemory)) => throttled += 1,
            Err(e) => panic!("unexpected {e}"),
        }
        if i % 30 == 0 {
            // The polite application is served in the middle of the flood.
            polite
                .list_keys()
                .expect("a polite client is not throttled by another's flood");
        }
    }
    assert!(
        throttled > 0,
        "300 requests in a burst of 20 at 20/s must be throttled"
    );
    let elapsed = start.elapsed().as_secs_f64();
    // The burst (less the one request the client's own set-up spent) plus the rate.
    assert!(admitted >= 19, "the burst is admitted: {admitted}");
    assert!(
        admitted as f64 <= 20.0 + 20.0 * elapsed + 1.0,
        "{admitted} admitted in {elapsed:.2} s at 20/s with a burst of 20"
    );
    let log = daemon.log_text();
    assert!(
        log.contains("app=flood") && log.contains("over its rate limit of 20 requests/s"),
        "{log}"
    );
    assert!(!log.contains("app=polite"), "{log}");
    // After a pause the flooding application is served again.
    std::thread::sleep(std::time::Duration::from_millis(200));
    flood.list_keys().unwrap();
}

#[test]
fn a_damaged_entry_is_named_at_start_up_and_the_other_keys_still_work() {
    let mut daemon = Daemon::start("damaged");
    let client = daemon.client("app");
    client.psa_generate_key("good", p256_signing()).unwrap();
    client.psa_generate_key("bad", p256_signing()).unwrap();
    assert!(daemon.stop().success());
    let entry = common::entry_path(&daemon.dir.join("store"), "app", 1, "bad");
    assert!(entry.exists(), "the entry of key \"bad\"");
    let mut bytes = std::fs::read(&entry).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x55;
    std::fs::write(&entry, bytes).unwrap();
    daemon.spawn();
    let log = daemon.log_text();
    assert!(
        log.contains(&format!(
            "skipping damaged entry {}: checksum mismatch",
            entry.display()
        )),
        "{log}"
    );
    let client = daemon.client("app");
    assert_eq!(common::key_names(&client), vec!["good".to_string()]);
    let signature = client
        .psa_sign_hash("good", &[3u8; 32], ecdsa_sha256())
        .unwrap();
    client
        .psa_verify_hash("good", &[3u8; 32], ecdsa_sha256(), &signature)
        .unwrap();
}

/// A key store on a tiny tmpfs: when it fills up the client is told InsufficientStorage,
/// every key stored before still works, and the service keeps serving.
#[test]
fn a_full_disk_refuses_new_keys_and_loses_none() {
    if !common::running_as_root("mount a tmpfs") {
        return;
    }
    let mnt = std::env::temp_dir().join(format!("parsec-full-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=192k,nr_inodes=4096", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(mnt.clone());
    let store = mnt.join("store");
    let daemon = Daemon::start_edited("full", "Direct", &[], |text| {
        common::with_store_path(&text, &store)
    });
    let client = daemon.client("app");
    let mut stored = Vec::new();
    let status = loop {
        let name = format!("k{}", stored.len());
        match client.psa_generate_key(&name, p256_signing()) {
            Ok(()) => stored.push(name),
            Err(Error::Service(status)) => break status,
            Err(e) => panic!("{e}"),
        }
        assert!(stored.len() < 10_000, "the tmpfs never filled up");
    };
    assert_eq!(
        status,
        ResponseStatus::PsaErrorInsufficientStorage,
        "after {} keys",
        stored.len()
    );
    assert!(
        stored.len() > 5,
        "only {} keys fit: the test proves little",
        stored.len()
    );
    // Nothing stored before is lost, and the service still serves.
    let listed: Vec<String> = common::key_names(&client);
    assert_eq!(listed.len(), stored.len());
    for name in &stored {
        client
            .psa_sign_hash(name, &[7u8; 32], ecdsa_sha256())
            .unwrap();
    }
    assert_eq!(client.ping().unwrap(), (1, 0));
    // Space freed, keys can be made again.
    client.psa_destroy_key(&stored[0]).unwrap();
    client.psa_destroy_key(&stored[1]).unwrap();
    client.psa_generate_key("after", p256_signing()).unwrap();
    let log = daemon.log_text();
    assert!(log.contains("status=PsaErrorInsufficientStorage"), "{log}");
}

/// A name a client chose cannot forge a log record, and a huge one is capped.
#[test]
fn client_names_cannot_forge_log_lines() {
    let daemon = common::Daemon::start("hardening-forge");
    let client = daemon.client("mallory");
    let forged = "nokey\"\n[ERROR parsec] forged line";
    let _ = client.psa_destroy_key(forged);
    let long = "x".repeat(100_000);
    let _ = client.psa_destroy_key(&long);
    let log = daemon.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("[ERROR parsec] forged line")),
        "{log}"
    );
    assert!(
        log.contains("forged line"),
        "the name is logged, escaped: {log}"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
}
