//! The daemon's life: restarts, SIGTERM, SIGHUP, and SIGKILL at random moments.

mod common;

use common::{config_text, p256_signing as p256, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::*;
use parsec_client::core::interface::requests::ResponseStatus;
use parsec_client::error::Error;
use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ECDSA: AsymmetricSignature = AsymmetricSignature::Ecdsa {
    hash_alg: SignHash::Specific(Hash::Sha256),
};

fn signs(client: &parsec_client::BasicClient, name: &str) {
    let hash = [0x5au8; 32];
    let signature = client
        .psa_sign_hash(name, &hash, ECDSA)
        .unwrap_or_else(|e| panic!("key {name} does not sign: {e}"));
    client
        .psa_verify_hash(name, &hash, ECDSA, &signature)
        .unwrap();
}

#[test]
fn keys_survive_a_restart_and_sigterm_exits_cleanly() {
    let mut daemon = Daemon::start("restart");
    let client = daemon.client("app");
    client.psa_generate_key("kept", p256()).unwrap();
    let public = client.psa_export_public_key("kept").unwrap();
    let status = daemon.stop();
    assert!(status.success(), "SIGTERM exit status {status}");
    assert!(!daemon.socket.exists(), "socket left behind after SIGTERM");
    daemon.spawn();
    let client = daemon.client("app");
    assert_eq!(client.psa_export_public_key("kept").unwrap(), public);
    signs(&client, "kept");
    assert_eq!(client.list_keys().unwrap().len(), 1);
    // SIGINT behaves as SIGTERM.
    daemon.signal(nix::sys::signal::Signal::SIGINT);
    assert!(daemon.wait().success());
}

#[test]
fn sighup_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one() {
    let mut daemon = Daemon::start("reload");
    let alice = daemon.client("alice");
    alice.psa_generate_key("k", p256()).unwrap();
    assert!(matches!(
        alice.list_clients(),
        Err(Error::Service(ResponseStatus::AdminOperation))
    ));

    // A good change: alice becomes an admin; her keys stay.
    let store = daemon.dir.join("store");
    std::fs::write(
        &daemon.config,
        config_text(&daemon.socket, &store, "Direct", &["alice"]),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let start = std::time::Instant::now();
    while alice.list_clients().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "reload not applied:\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(alice.list_clients().unwrap(), vec!["alice".to_string()]);
    signs(&alice, "k");

    // A broken config: the service says why and keeps running as it was.
    let broken = config_text(&daemon.socket, &store, "Direct", &[])
        .replace("timeout = 1000", "timeout = \"soon\"");
    std::fs::write(&daemon.config, broken).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let log = daemon.wait_for_log(
        "keeping the running configuration",
        "no reload error logged",
    );
    assert!(
        log.contains("config.toml:8: invalid type"),
        "the error names file and line:\n{log}"
    );
    assert_eq!(
        alice.list_clients().unwrap(),
        vec!["alice".to_string()],
        "old admins still apply"
    );
    signs(&alice, "k");
    assert!(daemon.stop().success());
}

/// Started with a relative `--config` (the software provider changes the working directory
/// into its storage directory), a SIGHUP still reads the file; and, as upstream Parsec does,
/// a config whose UnixPeerCredentials admins are not UIDs is accepted with a warning.
#[test]
fn sighup_after_a_relative_config_path_and_non_numeric_admins() {
    let mut daemon = Daemon::start("reload-relative");
    daemon.stop();
    daemon.relative_config = true;
    let store = daemon.dir.join("store");
    std::fs::write(
        &daemon.config,
        config_text(&daemon.socket, &store, "UnixPeerCredentials", &[]),
    )
    .unwrap();
    daemon.spawn();
    std::fs::write(
        &daemon.config,
        config_text(
            &daemon.socket,
            &store,
            "UnixPeerCredentials",
            &["list_clients test"],
        ),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let log = daemon.wait_for_log("reloaded, listening on", "reload not applied");
    assert!(
        log.contains("admin \"list_clients test\" is not a UID"),
        "the odd admin is warned about:\n{log}"
    );
    assert!(!log.contains("cannot read the config file"), "{log}");
    assert!(daemon.naked_client().ping().is_ok());
    assert!(daemon.stop().success());
}

/// A cheap pseudo-random source: no extra dependency for a test's timing jitter.
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        Jitter(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1,
        )
    }
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// One client's run until the kill: creates (mostly) and destroys (the oldest key), keeping
/// `believed` as what it was told; returns the name whose operation was in flight.
fn churn_until_killed(
    client: &parsec_client::BasicClient,
    believed: &mut BTreeSet<String>,
    counter: &mut u32,
    jitter: &mut Jitter,
) -> String {
    loop {
        let destroy = believed.len() > 3 && jitter.next(3) == 0;
        let name = if destroy {
            believed.iter().next().cloned().unwrap()
        } else {
            *counter += 1;
            format!("key-{counter}")
        };
        let result = if destroy {
            client.psa_destroy_key(&name)
        } else {
            client.psa_generate_key(&name, p256())
        };
        match result {
            Ok(()) => {
                if destroy {
                    believed.remove(&name);
                } else {
                    believed.insert(name);
                }
            }
            Err(Error::Service(status)) => panic!("{name}: service error {status}"),
            Err(Error::Client(_)) => return name,
        }
    }
}

/// SIGKILL at random moments while `clients` applications create and destroy keys at once
/// (with several, the software provider's batches and the key store's group commits carry
/// several of them each): after every restart each application lists exactly the keys it
/// was told exist (its one in-flight operation may have gone either way), and they sign.
fn sigkill_at_random_moments(name: &str, clients: usize, rounds: usize) {
    let mut daemon = Daemon::start(name);
    let mut jitter = Jitter::new();
    let apps: Vec<String> = (0..clients).map(|i| format!("crash-app-{i}")).collect();
    let mut believed: Vec<BTreeSet<String>> = vec![BTreeSet::new(); clients];
    let mut counters = vec![0u32; clients];
    for round in 0..rounds {
        // Every client set up (ListProviders) before the kill can come.
        let ready: Vec<_> = apps.iter().map(|app| daemon.client(app)).collect();
        let pid = daemon.pid();
        let delay = Duration::from_millis(5 + jitter.next(60));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let runs: Vec<_> = ready
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let mut mine = std::mem::take(&mut believed[i]);
                let mut counter = counters[i];
                let mut jitter = Jitter(jitter.next(u64::MAX) | 1);
                std::thread::spawn(move || {
                    let in_flight =
                        churn_until_killed(&client, &mut mine, &mut counter, &mut jitter);
                    (mine, counter, in_flight)
                })
            })
            .collect();
        let mut in_flight = Vec::new();
        for (i, run) in runs.into_iter().enumerate() {
            let (mine, counter, name) = run.join().unwrap();
            believed[i] = mine;
            counters[i] = counter;
            in_flight.push(name);
        }
        killer.join().unwrap();
        daemon.wait();
        daemon.spawn();
        for i in 0..clients {
            let client = daemon.client(&apps[i]);
            let listed: BTreeSet<String> = common::key_names(&client).into_iter().collect();
            // The in-flight operation may or may not have happened; settle it from the listing.
            if listed.contains(&in_flight[i]) {
                believed[i].insert(in_flight[i].clone());
            } else {
                believed[i].remove(&in_flight[i]);
            }
            assert_eq!(
                listed, believed[i],
                "round {round}, {}: ListKeys differs from what the client was told",
                apps[i]
            );
            for name in &believed[i] {
                signs(&client, name);
            }
        }
    }
    let made: u32 = counters.iter().sum();
    assert!(
        made as usize > rounds * clients,
        "the clients made too few keys to mean anything: {made}"
    );
    let log = daemon.log_text();
    assert!(
        !log.contains("damaged entry"),
        "a crash left a damaged entry:\n{log}"
    );
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_key() {
    sigkill_at_random_moments("crash", 1, 24);
}

#[test]
fn sigkill_during_group_commits_loses_no_acknowledged_key() {
    sigkill_at_random_moments("crash-group", 8, 16);
}

#[test]
fn sigterm_during_a_long_request_finishes_it_first() {
    let mut daemon = Daemon::start("term-in-flight");
    let client = daemon.client("app");
    let mut usage_flags =
        parsec_client::core::interface::operations::psa_key_attributes::UsageFlags::default();
    usage_flags.set_sign_hash();
    let mut rsa_4096 = p256();
    rsa_4096.key_type =
        parsec_client::core::interface::operations::psa_key_attributes::Type::RsaKeyPair;
    rsa_4096.bits = 4096;
    rsa_4096.policy.usage_flags = usage_flags;
    rsa_4096.policy.permitted_algorithms = AsymmetricSignature::RsaPkcs1v15Sign {
        hash_alg: Hash::Sha256.into(),
    }
    .into();
    // RSA 4096 generation takes long enough that the signal lands while it runs.
    let generation = std::thread::spawn(move || client.psa_generate_key("slow", rsa_4096));
    std::thread::sleep(Duration::from_millis(50));
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = daemon.wait();
    assert!(status.success(), "exit status {status}");
    generation
        .join()
        .unwrap()
        .expect("the request in hand is answered before the service stops");
    daemon.spawn();
    let names: Vec<String> = daemon
        .client("app")
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(names, vec!["slow".to_string()]);
}
