//! Isolation benchmark: how long a second client waits for a ping and for a software-provider
//! sign while a first client loops RSA-2048 generate + destroy on a hardware provider:
//!   - the TPM provider on swtpm (~0.35 s of TPM work per generation);
//!   - the TPM provider on swtpm behind `slow_tpm`'s proxy with the delays of a discrete SPI
//!     TPM (`REAL_TPM`: 3 s per Create/CreatePrimary, 80 ms per Sign, 5 ms for the rest);
//!   - the PKCS#11 provider on a SoftHSM2 token.
//!
//! Prints median, p99 and max latency, idle and under each load, and the daemon's threads and
//! RSS before and after. Targets (docs/benchmark.md): under load, p99 <= 5 ms, max <= 50 ms.
//!
//! Needs a daemon built with every provider:
//!     cargo build --release -p parsec-service --features tpm-provider,pkcs11-provider
//!     ./target/release/parsec-bench-isolation [--daemon PATH] [--seconds S] [--all-cpus]

use parsec_bench::slow_tpm::{SlowTpm, REAL_TPM, REAL_TPM_OTHER_MS};
use parsec_bench::{
    ecdsa, init_softhsm_token, p256, pin_to_cpu0, Daemon, DeviceBenchOptions, Swtpm,
};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::interface::requests::ProviderId;
use parsec_client::BasicClient;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rsa_2048() -> Attributes {
    let mut usage = UsageFlags::default();
    let _ = usage.set_sign_hash().set_verify_hash();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::RsaKeyPair,
        bits: 2048,
        policy: Policy {
            usage_flags: usage,
            permitted_algorithms: AsymmetricSignature::RsaPkcs1v15Sign {
                hash_alg: Hash::Sha256.into(),
            }
            .into(),
        },
    }
}

struct Latencies {
    ping: Vec<Duration>,
    sign: Vec<Duration>,
}

/// Pings and signs, one after the other, for `seconds`.
fn measure(client: &BasicClient, seconds: f64) -> Latencies {
    let mut result = Latencies {
        ping: Vec::new(),
        sign: Vec::new(),
    };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        let start = Instant::now();
        client.ping().unwrap();
        result.ping.push(start.elapsed());
        let start = Instant::now();
        client.psa_sign_hash("sw", &[0x5a; 32], ecdsa()).unwrap();
        result.sign.push(start.elapsed());
    }
    result
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:7.3} ms  p99 {:7.3} ms  max {:7.3} ms  ({} samples)",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

/// One load: a daemon with the software provider and `hardware`, a first client looping RSA
/// generate + destroy on it, a second client measured.
fn scenario(options: &DeviceBenchOptions, label: &str, hardware: &str, provider: ProviderId) {
    let providers = format!(
        "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n{hardware}"
    );
    let dir = std::env::temp_dir().join("parsec-bench-isolation");
    let (daemon, _) = Daemon::start_with_providers(&options.bin, &dir, 5000, 256, &providers);
    let mut software = daemon.client("second");
    software.set_implicit_provider(ProviderId::MbedCrypto);
    software
        .psa_generate_key(
            "sw",
            p256(|u| {
                let _ = u.set_sign_hash();
            }),
        )
        .unwrap();
    let (threads, rss) = (daemon.status_field("Threads"), daemon.status_field("VmRSS"));
    println!("== {label}");
    println!("daemon: {threads} threads, RSS {rss} before the load");
    let mut idle = measure(&software, options.seconds / 2.0);
    println!("idle        ping: {}", summary(&mut idle.ping));
    println!("idle        sign: {}", summary(&mut idle.sign));

    let stop = Arc::new(AtomicBool::new(false));
    let generated = Arc::new(AtomicUsize::new(0));
    let mut first = daemon.client("first");
    first.set_implicit_provider(provider);
    let load = {
        let (stop, generated) = (Arc::clone(&stop), Arc::clone(&generated));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                first.psa_generate_key("rsa", rsa_2048()).unwrap();
                first.psa_destroy_key("rsa").unwrap();
                generated.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Let the first generation start.
    std::thread::sleep(Duration::from_millis(100));
    let mut loaded = measure(&software, options.seconds);
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    println!("under load  ping: {}", summary(&mut loaded.ping));
    println!("under load  sign: {}", summary(&mut loaded.sign));
    println!(
        "load: {} RSA-2048 generate+destroy by the first client meanwhile",
        generated.load(Ordering::Relaxed)
    );
    let (threads, rss) = (daemon.status_field("Threads"), daemon.status_field("VmRSS"));
    println!("daemon: {threads} threads, RSS {rss} after the load");
}

fn main() {
    let options = DeviceBenchOptions::parse("parsec-bench-isolation", 10.0);
    if options.pin {
        pin_to_cpu0();
    }
    let base = std::env::temp_dir().join(format!("parsec-bench-isolation-{}", std::process::id()));
    let tpm = Swtpm::start(&base.join("tpm"));
    let tpm_table = |tcti: String| {
        format!(
            "[[provider]]\nprovider_type = \"Tpm\"\nkey_info_manager = \"m\"\ntcti = \"{tcti}\"\n"
        )
    };
    scenario(
        &options,
        "TPM provider, swtpm",
        &tpm_table(tpm.tcti()),
        ProviderId::Tpm,
    );
    let slow = SlowTpm::start(tpm.port, REAL_TPM, REAL_TPM_OTHER_MS);
    scenario(
        &options,
        "TPM provider, swtpm behind the delays of a discrete SPI TPM",
        &tpm_table(slow.tcti()),
        ProviderId::Tpm,
    );
    init_softhsm_token(&base.join("hsm"), "parsec-isolation", "1234");
    scenario(
        &options,
        "PKCS#11 provider, SoftHSM2",
        "[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"m\"\nlibrary_path = \"/usr/lib/softhsm/libsofthsm2.so\"\ntoken_label = \"parsec-isolation\"\nuser_pin = \"1234\"\n",
        ProviderId::Pkcs11,
    );
    drop(tpm);
    let _ = std::fs::remove_dir_all(&base);
}
