//! `parsec-stress`: many clients at once, idle connections, the connection cap.
//!
//! usage: parsec-stress [--daemon PATH] [--clients N] [--rounds N] [--no-rsa-generation]
//!
//! 1. N clients (default 64), each its own application, run a fixed number of rounds of
//!    every operation of the software provider and check every answer; meanwhile a checker
//!    pings every 100 ms. Prints the ping latencies and the daemon's RSS before and after.
//! 2. 1,000 connections opened and left idle: a new client is still served, and the idle
//!    ones are closed by the read deadline.
//! 3. Past the connection cap, new clients get a closed socket at once, never a hang.
//!
//! Exits non-zero if any answer is wrong or any connection hangs; latency and RSS are
//! figures to read, against their targets, not pass/fail.

use parsec_bench::{ecdsa, p256, ping_frame, raw_ping, Daemon, HASH};
use parsec_client::core::interface::operations::psa_algorithm::{
    Aead, AeadWithDefaultLengthTag, AsymmetricEncryption, Hash, KeyAgreement, RawKeyAgreement,
};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::BasicClient;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn attributes(
    key_type: Type,
    bits: usize,
    alg: impl Into<parsec_client::core::interface::operations::psa_algorithm::Algorithm>,
    usage: impl Fn(&mut UsageFlags),
) -> Attributes {
    let mut usage_flags = UsageFlags::default();
    usage(&mut usage_flags);
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type,
        bits,
        policy: Policy {
            usage_flags,
            permitted_algorithms: alg.into(),
        },
    }
}

/// One round of every operation, each answer checked. Returns the operations done.
fn round(client: &BasicClient, round: usize) -> Result<usize, String> {
    let e = |what: &'static str| {
        move |err: parsec_client::error::Error| format!("round {round}: {what}: {err}")
    };
    let name = format!("ecc-{round}");
    client
        .psa_generate_key(
            &name,
            p256(|u| {
                u.set_sign_hash().set_verify_hash();
            }),
        )
        .map_err(e("generate"))?;
    let signature = client
        .psa_sign_hash(&name, &HASH, ecdsa())
        .map_err(e("sign"))?;
    client
        .psa_verify_hash(&name, &HASH, ecdsa(), &signature)
        .map_err(e("verify"))?;
    let mut bad = signature.clone();
    bad[0] ^= 1;
    if client.psa_verify_hash(&name, &HASH, ecdsa(), &bad).is_ok() {
        return Err(format!("round {round}: a tampered signature verified"));
    }
    let public = client
        .psa_export_public_key(&name)
        .map_err(e("export public"))?;
    if public.len() != 65 {
        return Err(format!(
            "round {round}: public key of {} bytes",
            public.len()
        ));
    }
    let hash = client
        .psa_hash_compute(Hash::Sha256, b"stress")
        .map_err(e("hash"))?;
    client
        .psa_hash_compare(Hash::Sha256, b"stress", &hash)
        .map_err(e("hash compare"))?;
    let random = client.psa_generate_random(32).map_err(e("random"))?;
    if random.len() != 32 {
        return Err(format!("round {round}: {} random bytes", random.len()));
    }
    let gcm = Aead::AeadWithDefaultLengthTag(AeadWithDefaultLengthTag::Gcm);
    let aes = format!("aes-{round}");
    client
        .psa_import_key(
            &aes,
            &[round as u8; 16],
            attributes(Type::Aes, 128, gcm, |u| {
                u.set_encrypt().set_decrypt();
            }),
        )
        .map_err(e("import aes"))?;
    let ciphertext = client
        .psa_aead_encrypt(&aes, gcm, &[1; 12], b"ad", b"stress payload")
        .map_err(e("aead encrypt"))?;
    let plaintext = client
        .psa_aead_decrypt(&aes, gcm, &[1; 12], b"ad", &ciphertext)
        .map_err(e("aead decrypt"))?;
    if plaintext != b"stress payload" {
        return Err(format!("round {round}: AEAD round trip changed the data"));
    }
    let ecdh = RawKeyAgreement::Ecdh;
    let agree = format!("ecdh-{round}");
    client
        .psa_generate_key(
            &agree,
            attributes(
                Type::EccKeyPair {
                    curve_family: EccFamily::SecpR1,
                },
                256,
                KeyAgreement::Raw(ecdh),
                |u| {
                    u.set_derive();
                },
            ),
        )
        .map_err(e("generate ecdh"))?;
    let secret = client
        .psa_raw_key_agreement(ecdh, &agree, &public)
        .map_err(e("key agreement"))?;
    if secret.len() != 32 {
        return Err(format!(
            "round {round}: shared secret of {} bytes",
            secret.len()
        ));
    }
    let keys = client.list_keys().map_err(e("list keys"))?;
    if keys.len() != 3 {
        return Err(format!(
            "round {round}: {} keys listed, 3 expected",
            keys.len()
        ));
    }
    for key in [&name, &aes, &agree] {
        client.psa_destroy_key(key).map_err(e("destroy"))?;
    }
    Ok(17)
}

/// RSA encryption once per client. The key is generated (slow: it holds the service's
/// thread for ~0.05-0.25 s), or imported from `der` with --no-rsa-generation.
fn rsa_round_trip(client: &BasicClient, der: Option<&[u8]>) -> Result<(), String> {
    let alg = AsymmetricEncryption::RsaOaep {
        hash_alg: Hash::Sha256,
    };
    let usage = attributes(Type::RsaKeyPair, 2048, alg, |u| {
        u.set_encrypt().set_decrypt();
    });
    match der {
        None => client.psa_generate_key("rsa", usage),
        Some(der) => client.psa_import_key("rsa", der, usage),
    }
    .map_err(|e| format!("rsa generate/import: {e}"))?;
    let ciphertext = client
        .psa_asymmetric_encrypt("rsa", alg, b"rsa", None)
        .map_err(|e| format!("rsa encrypt: {e}"))?;
    let plaintext = client
        .psa_asymmetric_decrypt("rsa", alg, &ciphertext, None)
        .map_err(|e| format!("rsa decrypt: {e}"))?;
    client
        .psa_destroy_key("rsa")
        .map_err(|e| format!("rsa destroy: {e}"))?;
    (plaintext == b"rsa")
        .then_some(())
        .ok_or_else(|| "RSA round trip changed the data".into())
}

fn rss_kib(daemon: &Daemon) -> u64 {
    daemon
        .status_field("VmRSS")
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap_or(0)
}

fn raise_fd_limit() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 8192, 8192);
}

fn main() {
    let mut bin = PathBuf::from("target/release/parsec");
    let mut clients = 64usize;
    let mut rounds = 10usize;
    let mut rsa_generation = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--daemon" => bin = PathBuf::from(args.next().expect("--daemon PATH")),
            "--clients" => clients = args.next().expect("--clients N").parse().expect("a number"),
            "--rounds" => rounds = args.next().expect("--rounds N").parse().expect("a number"),
            "--no-rsa-generation" => rsa_generation = false,
            _ => {
                eprintln!("usage: parsec-stress [--daemon PATH] [--clients N] [--rounds N] [--no-rsa-generation]");
                std::process::exit(2);
            }
        }
    }
    let bin =
        std::fs::canonicalize(&bin).unwrap_or_else(|_| panic!("no daemon at {}", bin.display()));
    raise_fd_limit();
    let dir = std::env::temp_dir().join(format!("parsec-stress-{}", std::process::id()));
    let mut failures: Vec<String> = Vec::new();

    // 1. Many clients, every operation, a checker pinging.
    let (daemon, _) = Daemon::start_configured(&bin, &dir, 2000, 2048);
    // Without RSA generation in the mix, the clients import one key made before the load.
    let rsa_der: Option<Vec<u8>> = (!rsa_generation).then(|| {
        let setup = daemon.client("setup");
        let alg = AsymmetricEncryption::RsaOaep {
            hash_alg: Hash::Sha256,
        };
        setup
            .psa_generate_key(
                "template",
                attributes(Type::RsaKeyPair, 2048, alg, |u| {
                    u.set_encrypt().set_decrypt().set_export();
                }),
            )
            .expect("make the RSA key to import");
        let der = setup.psa_export_key("template").expect("export it");
        setup.psa_destroy_key("template").unwrap();
        der
    });
    let rss_start = rss_kib(&daemon);
    let done = AtomicBool::new(false);
    let start = Instant::now();
    let (results, (pings, rss_samples)) = std::thread::scope(|scope| {
        let checker = scope.spawn(|| {
            let client = daemon.client("checker");
            let mut latencies = Vec::new();
            let mut rss = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ok = client.ping().is_ok();
                latencies.push((t.elapsed(), ok));
                rss.push(rss_kib(&daemon));
                std::thread::sleep(Duration::from_millis(100));
            }
            (latencies, rss)
        });
        let workers: Vec<_> = (0..clients)
            .map(|i| {
                let daemon = &daemon;
                let rsa_der = rsa_der.as_deref();
                scope.spawn(move || -> Result<usize, String> {
                    let client = daemon.client(&format!("stress-{i}"));
                    let mut ops = 0;
                    if i % 16 == 0 {
                        rsa_round_trip(&client, rsa_der)?;
                        ops += 4;
                    }
                    for r in 0..rounds {
                        ops += round(&client, r)?;
                    }
                    Ok(ops)
                })
            })
            .collect();
        let results: Vec<Result<usize, String>> =
            workers.into_iter().map(|w| w.join().unwrap()).collect();
        done.store(true, Ordering::Relaxed);
        (results, checker.join().unwrap())
    });
    let elapsed = start.elapsed();
    let ops: usize = results.iter().filter_map(|r| r.as_ref().ok()).sum();
    for r in &results {
        if let Err(e) = r {
            failures.push(e.clone());
        }
    }
    let failed_pings = pings.iter().filter(|(_, ok)| !ok).count();
    if failed_pings > 0 {
        failures.push(format!("{failed_pings} checker pings failed"));
    }
    let mut latencies: Vec<Duration> = pings.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let max = latencies.last().copied().unwrap_or_default();
    let p50 = latencies
        .get(latencies.len() / 2)
        .copied()
        .unwrap_or_default();
    std::thread::sleep(Duration::from_millis(300));
    let rss_end = rss_kib(&daemon);
    println!(
        "parsec-stress: {} ({clients} clients x {rounds} rounds, RSA keys {})",
        bin.display(),
        if rsa_generation {
            "generated in the mix"
        } else {
            "imported"
        }
    );
    println!(
        "operations checked:        {ops} in {:.1} s ({:.0}/s)",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64()
    );
    println!(
        "checker pings:             {} (median {:.2} ms, max {:.2} ms; target: none over 50 ms: {})",
        latencies.len(),
        p50.as_secs_f64() * 1e3,
        max.as_secs_f64() * 1e3,
        if max <= Duration::from_millis(50) { "met" } else { "MISSED" }
    );
    let half = &rss_samples[rss_samples.len() / 2..];
    println!(
        "daemon RSS under load:     {:.2} MiB at the first sample, {:.2}-{:.2} MiB over the second half",
        rss_samples.first().copied().unwrap_or(0) as f64 / 1024.0,
        half.iter().min().copied().unwrap_or(0) as f64 / 1024.0,
        half.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );
    println!(
        "daemon RSS:                {:.2} MiB before, {:.2} MiB after",
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    drop(daemon);

    // 2. 1,000 idle connections do not stop a new client; the deadline closes them.
    let (daemon, _) = Daemon::start_configured(&bin, &dir, 1000, 2048);
    let mut idle: Vec<UnixStream> = (0..1000)
        .map(|_| UnixStream::connect(&daemon.socket).expect("open an idle connection"))
        .collect();
    let t = Instant::now();
    let served = daemon.client("newcomer").ping().is_ok();
    let newcomer = t.elapsed();
    if !served {
        failures.push("a new client was not served beside 1,000 idle connections".into());
    }
    let mut closed = 0;
    for stream in &mut idle {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        if stream.read_to_end(&mut rest).is_ok() {
            closed += 1;
        }
    }
    if closed != idle.len() {
        failures.push(format!(
            "only {closed} of 1000 idle connections were closed by the deadline"
        ));
    }
    println!("beside 1000 idle:          new client served in {:.2} ms; {closed}/1000 idle closed by the 1 s deadline", newcomer.as_secs_f64() * 1e3);
    drop(idle);
    drop(daemon);

    // 3. Past the cap: a closed socket at once.
    let (daemon, _) = Daemon::start_configured(&bin, &dir, 5000, 100);
    let held: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut refused_fast = 0;
    for _ in 0..50 {
        let mut extra = UnixStream::connect(&daemon.socket).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let _ = extra.write_all(&ping_frame());
        let mut response = Vec::new();
        let t = Instant::now();
        let outcome = extra.read_to_end(&mut response);
        // Closed with the request unread: end of stream, or a reset.
        let closed = match outcome {
            Ok(_) => response.is_empty(),
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        if closed && t.elapsed() < Duration::from_secs(1) {
            refused_fast += 1;
        }
    }
    if refused_fast != 50 {
        failures.push(format!(
            "only {refused_fast} of 50 clients past the cap got a closed socket at once"
        ));
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    if !raw_ping(&daemon.socket) {
        failures.push("the service did not recover after the cap".into());
    }
    println!("past the cap of 100:       {refused_fast}/50 extra clients closed at once; served again once below it");
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);

    if failures.is_empty() {
        println!("parsec-stress: every answer correct, no hang");
    } else {
        for f in &failures {
            println!("FAILURE: {f}");
        }
        std::process::exit(1);
    }
}
