//! Lifecycle benchmark: how long another application waits for a ping while the service
//! does something big for someone else:
//!   - DeleteClient of 10,000 software keys (chunks on the provider's worker, one group
//!     commit each; before, 1,000 keys held the event loop 0.67 s);
//!   - one application's 16 HashCompute requests of ~1 MB queued on the PKCS#11 provider
//!     behind RSA-4096 generations on a SoftHSM2 token (before, they held the whole request
//!     budget: another application's ping waited 3.13 s);
//!   - a SIGHUP every 20 ms with the config unchanged, then one every 50 ms that replaces the
//!     software provider (its instance drains and stops, its successor starts), while 4
//!     clients sign;
//!   - the daemon's RSS over 30 x S seconds of PKCS#11 P-256 create, sign, destroy by 4
//!     clients (issue 23 measured 10.6 -> 17.7 MiB over 2 minutes).
//!
//! Prints median, p99 and max ping latency for each, and the counts. Figures in
//! docs/benchmark.md; targets: ping p99 < 10 ms in every scenario. Needs a daemon built with
//! the PKCS#11 provider:
//!     cargo build --release -p parsec-service --features pkcs11-provider
//!     ./target/release/parsec-bench-lifecycle [--daemon PATH] [--seconds S] [--all-cpus]
//!         [--only delete-client|budget|reloads|churn]

use parsec_bench::{ecdsa, init_softhsm_token, p256, pin_to_cpu0, Daemon, DeviceBenchOptions};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::BasicClient;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SOFTWARE: &str = "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n";

fn summary(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:7.3} ms  p99 {:7.3} ms  max {:7.3} ms  ({} pings)",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// Pings until `stop`, returning each latency.
fn pinger(client: BasicClient, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Duration>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            client.ping().unwrap();
            samples.push(start.elapsed());
        }
        samples
    })
}

fn idle_pings(client: &BasicClient, seconds: f64) -> Vec<Duration> {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut samples = Vec::new();
    while Instant::now() < until {
        let start = Instant::now();
        client.ping().unwrap();
        samples.push(start.elapsed());
    }
    samples
}

fn delete_client(options: &DeviceBenchOptions) {
    const KEYS: usize = 10_000;
    let dir = std::env::temp_dir().join(format!("parsec-bench-lifecycle-{}", std::process::id()));
    let (daemon, _) = Daemon::start_with_config(
        &options.bin,
        &dir,
        "",
        "timeout = 5000\n",
        "admins = [ { name = \"admin\" } ]\n",
        SOFTWARE,
    );
    let start = Instant::now();
    let makers: Vec<_> = (0..8)
        .map(|t| {
            let client = daemon.client("tenant");
            std::thread::spawn(move || {
                for i in (t..KEYS).step_by(8) {
                    client
                        .psa_generate_key(
                            &format!("k{i}"),
                            p256(|u| {
                                let _ = u.set_sign_hash();
                            }),
                        )
                        .unwrap();
                }
            })
        })
        .collect();
    for m in makers {
        m.join().unwrap();
    }
    println!(
        "DeleteClient: {KEYS} keys made in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let other = daemon.client("other");
    let mut idle = idle_pings(&other, 1.0);
    println!("  ping, idle:                    {}", summary(&mut idle));
    let stop = Arc::new(AtomicBool::new(false));
    let pings = pinger(other, Arc::clone(&stop));
    let admin = daemon.client("admin");
    let start = Instant::now();
    admin.delete_client("tenant").unwrap();
    let took = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut during = pings.join().unwrap();
    println!(
        "  DeleteClient of {KEYS} keys took {:.3} s",
        took.as_secs_f64()
    );
    println!("  ping, during the DeleteClient: {}", summary(&mut during));
    assert!(admin.list_clients().unwrap().is_empty());
}

fn rsa_4096() -> Attributes {
    let mut usage = UsageFlags::default();
    let _ = usage.set_sign_hash().set_verify_hash();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::RsaKeyPair,
        bits: 4096,
        policy: Policy {
            usage_flags: usage,
            permitted_algorithms: AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
        },
    }
}

/// The budget scenario's hog, run as a process of its own (`--hog SOCKET`): 16 HashCompute
/// requests of ~1 MB to the PKCS#11 provider at once, again and again.
fn hog(socket: &str, seconds: f64) {
    let daemon_socket = std::path::PathBuf::from(socket);
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let socket = daemon_socket.clone();
            std::thread::spawn(move || {
                let mut client = parsec_bench::client_on(&socket, "hog");
                client.set_implicit_provider(ProviderId::Pkcs11);
                let data = vec![0x5a; 1_000_000];
                while Instant::now() < until {
                    let _ = client.psa_hash_compute(Hash::Sha256, &data);
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// A daemon whose first provider is PKCS#11 on a fresh SoftHSM2 token labelled `label`,
/// then `more` provider tables; in a directory of its own (returned, to remove after).
fn softhsm_daemon(
    options: &DeviceBenchOptions,
    label: &str,
    more: &str,
) -> (Daemon, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("parsec-bench-{label}-{}", std::process::id()));
    init_softhsm_token(&dir.join("hsm"), label, "1234");
    let pkcs11 = format!("[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"m\"\nlibrary_path = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"{label}\"\nuser_pin = \"1234\"\n");
    let (daemon, _) = Daemon::start_with_config(
        &options.bin,
        &dir.join("service"),
        "",
        "timeout = 60000\n",
        "",
        &format!("{pkcs11}{more}"),
    );
    (daemon, dir)
}

fn budget(options: &DeviceBenchOptions) {
    let (daemon, dir) = softhsm_daemon(options, "budget", SOFTWARE);
    let other = daemon.client("other");
    let mut idle = idle_pings(&other, 1.0);
    println!("Budget: 16 x 1 MB HashCompute queued on PKCS#11 behind RSA-4096 generations");
    println!("  ping, idle:                    {}", summary(&mut idle));
    let stop = Arc::new(AtomicBool::new(false));
    let generations = Arc::new(AtomicUsize::new(0));
    let generator = {
        let mut client = daemon.client("generator");
        client.set_implicit_provider(ProviderId::Pkcs11);
        let (stop, generations) = (Arc::clone(&stop), Arc::clone(&generations));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                client.psa_generate_key("rsa", rsa_4096()).unwrap();
                client.psa_destroy_key("rsa").unwrap();
                generations.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut hog = std::process::Command::new(std::env::current_exe().unwrap())
        .arg("--hog")
        .arg(&daemon.socket)
        .arg(options.seconds.to_string())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pings = pinger(other, Arc::clone(&stop));
    std::thread::sleep(Duration::from_secs_f64(options.seconds));
    stop.store(true, Ordering::Relaxed);
    let mut during = pings.join().unwrap();
    let _ = hog.wait();
    generator.join().unwrap();
    println!(
        "  ping, budget held by the hog:  {}  ({} RSA-4096 generations)",
        summary(&mut during),
        generations.load(Ordering::Relaxed)
    );
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

fn reloads(options: &DeviceBenchOptions) {
    let dir = std::env::temp_dir().join(format!("parsec-bench-reload-{}", std::process::id()));
    let (daemon, _) =
        Daemon::start_with_config(&options.bin, &dir, "", "timeout = 5000\n", "", SOFTWARE);
    let config = dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let renamed = text.replacen(
        "provider_type = \"MbedCrypto\"\n",
        "provider_type = \"MbedCrypto\"\nname = \"renamed\"\n",
        1,
    );
    let signer = daemon.client("signer");
    signer
        .psa_generate_key(
            "k",
            p256(|u| {
                let _ = u.set_sign_hash();
            }),
        )
        .unwrap();
    for (what, every, replace) in [
        ("unchanged config, SIGHUP every 20 ms", 20, false),
        ("software provider replaced, SIGHUP every 50 ms", 50, true),
    ] {
        let stop = Arc::new(AtomicBool::new(false));
        let (signed, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let signers: Vec<_> = (0..4)
            .map(|_| {
                let client = daemon.client("signer");
                let (stop, signed, failed) =
                    (Arc::clone(&stop), Arc::clone(&signed), Arc::clone(&failed));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match client.psa_sign_hash("k", &[0x5a; 32], ecdsa()) {
                            Ok(_) => signed.fetch_add(1, Ordering::Relaxed),
                            Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        let pings = pinger(daemon.client("other"), Arc::clone(&stop));
        let until = Instant::now() + Duration::from_secs_f64(options.seconds);
        let mut sent = 0;
        while Instant::now() < until {
            if replace {
                let next = if sent % 2 == 0 { &renamed } else { &text };
                std::fs::write(&config, next).unwrap();
            }
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(daemon.pid() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
            .unwrap();
            sent += 1;
            std::thread::sleep(Duration::from_millis(every));
        }
        stop.store(true, Ordering::Relaxed);
        let mut during = pings.join().unwrap();
        for s in signers {
            s.join().unwrap();
        }
        println!("Reloads: {what}: {sent} SIGHUPs");
        println!(
            "  ping:                          {}  ({} signs, {} refused)",
            summary(&mut during),
            signed.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        std::fs::write(&config, &text).unwrap();
    }
    assert!(
        daemon.client("other").ping().is_ok(),
        "the service died in the storm"
    );
}

/// One of the bench's scenarios, by the name `--only` takes.
type Scenario = fn(&DeviceBenchOptions);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--hog") {
        hog(&args[2], args[3].parse().unwrap());
        return;
    }
    let options = DeviceBenchOptions::parse("parsec-bench-lifecycle", 5.0);
    if options.pin {
        pin_to_cpu0();
    }
    let scenarios: [(&str, Scenario); 4] = [
        ("delete-client", delete_client),
        ("budget", budget),
        ("reloads", reloads),
        ("churn", pkcs11_churn_rss),
    ];
    for (name, scenario) in scenarios {
        if options.only.as_deref().map_or(true, |only| only == name) {
            scenario(&options);
        }
    }
}

/// RSS of the daemon (VmRSS, KiB) sampled while 4 clients create, sign and destroy P-256
/// keys on a SoftHSM2 token: does the service (or the module under it) keep what it frees?
fn pkcs11_churn_rss(options: &DeviceBenchOptions) {
    let (daemon, dir) = softhsm_daemon(options, "churn", "");
    let total = Duration::from_secs_f64(options.seconds * 30.0);
    let stop = Arc::new(AtomicBool::new(false));
    let cycles = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let mut client = daemon.client(&format!("churn{w}"));
            client.set_implicit_provider(ProviderId::Pkcs11);
            let (stop, cycles) = (Arc::clone(&stop), Arc::clone(&cycles));
            std::thread::spawn(move || {
                let attributes = p256(|u| {
                    u.set_sign_hash();
                });
                while !stop.load(Ordering::Relaxed) {
                    client.psa_generate_key("k", attributes).unwrap();
                    client.psa_sign_hash("k", &[1; 32], ecdsa()).unwrap();
                    client.psa_destroy_key("k").unwrap();
                    cycles.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    println!(
        "PKCS#11 churn: 4 clients create, sign, destroy P-256 keys for {:.0} s; daemon VmRSS",
        total.as_secs_f64()
    );
    let start = Instant::now();
    let step = total / 6;
    let mut samples = Vec::new();
    for i in 0..=6 {
        let at = step * i;
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        let rss = daemon.status_field("VmRSS");
        samples.push(format!(
            "{:.0} s: {rss} ({} cycles)",
            start.elapsed().as_secs_f64(),
            cycles.load(Ordering::Relaxed)
        ));
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    for sample in samples {
        println!("  {sample}");
    }
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}
