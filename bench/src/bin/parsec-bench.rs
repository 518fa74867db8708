//! `parsec-bench`: drives a real daemon through parsec-client and prints rates and footprint.
//!
//! usage: parsec-bench [--daemon PATH] [--seconds S] [--core 'KEY = VALUE']...
//!
//! Figures: ping/s, ECDSA P-256 sign_hash/s, verify/s and generate+destroy/s for 1 and 8
//! concurrent clients, and how the 8-client rates scale on the 1-client ones; the same sign
//! done in-process with psa-crypto on one thread and on two (the limits for the daemon's one
//! and two crypto threads); a bare Unix-socket echo of a 36-byte frame
//! (the floor any daemon pays per connection); the stripped binary size, idle RSS, thread
//! count and start-up time to the first ping.
//! Each rate is the best of three rounds.

use parsec_bench::{ecdsa, p256, ping_frame, rate, Daemon, HASH};
use parsec_client::core::interface::operations::psa_key_attributes::Lifetime;
use parsec_client::BasicClient;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The floor: a blocking Unix-socket server that echoes one 36-byte frame per connection.
fn echo_rate(dir: &Path, clients: usize, seconds: f64) -> f64 {
    let path = dir.join("echo.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut frame = [0u8; 36];
            if stream.read_exact(&mut frame).is_ok() {
                let _ = stream.write_all(&frame);
            }
        }
    });
    let frame = ping_frame();
    rate(
        clients,
        seconds,
        |_| (),
        |_| {
            let mut stream = UnixStream::connect(&path).unwrap();
            stream.write_all(&frame).unwrap();
            let mut back = [0u8; 36];
            stream.read_exact(&mut back).unwrap();
        },
    )
}

/// ECDSA P-256 signatures made in this process with psa-crypto on `threads` threads (one key,
/// Mbed TLS's thread-safe PSA core on 3.6): what the daemon's one or two crypto threads
/// could do at best.
fn in_process_sign_rate(threads: usize, seconds: f64) -> f64 {
    psa_crypto::init().unwrap();
    let attributes = p256(|u| {
        u.set_sign_hash();
    });
    let mut volatile = attributes;
    volatile.lifetime = Lifetime::Volatile;
    let key = psa_crypto::operations::key_management::generate(volatile, None).unwrap();
    rate(
        threads,
        seconds,
        |_| [0u8; 64],
        |signature| {
            psa_crypto::operations::asym_signature::sign_hash(key, ecdsa(), &HASH, signature)
                .unwrap();
        },
    )
}

/// P-256 volatile keys generated and destroyed in this process on 1 and 2 threads: the
/// cryptography of generate+destroy, without files, syncs or IPC.
fn in_process_generate_rate(seconds: f64) -> [f64; 2] {
    psa_crypto::init().unwrap();
    let mut attributes = p256(|u| {
        u.set_sign_hash();
    });
    attributes.lifetime = Lifetime::Volatile;
    [1, 2].map(|threads| {
        rate(
            threads,
            seconds,
            |_| (),
            |_| {
                let key =
                    psa_crypto::operations::key_management::generate(attributes, None).unwrap();
                // SAFETY: the key was made just now on this thread; no operation uses it.
                unsafe { psa_crypto::operations::key_management::destroy(key) }.unwrap();
            },
        )
    })
}

/// Each signing client's own key, and a signature to verify.
fn setup_signer(daemon: &Daemon) -> impl Fn(usize) -> (BasicClient, Vec<u8>) + '_ {
    move |i: usize| {
        let client = daemon.client(&format!("sign-{i}"));
        let _ = client.psa_destroy_key("bench");
        client
            .psa_generate_key(
                "bench",
                p256(|u| {
                    u.set_sign_hash().set_verify_hash();
                }),
            )
            .unwrap();
        let signature = client.psa_sign_hash("bench", &HASH, ecdsa()).unwrap();
        (client, signature)
    }
}

fn generate_destroy(c: &mut BasicClient) {
    c.psa_generate_key(
        "k",
        p256(|u| {
            u.set_sign_hash();
        }),
    )
    .unwrap();
    c.psa_destroy_key("k").unwrap();
}

fn main() {
    let mut bin = PathBuf::from("target/release/parsec");
    let mut seconds = 2.0;
    let mut only: Option<String> = None;
    // Extra [core_settings] lines: upstream Parsec's idle_listener_sleep_duration, say, for
    // the side-by-side in docs/benchmark.md.
    let mut core = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--daemon" => bin = PathBuf::from(args.next().expect("--daemon PATH")),
            "--seconds" => seconds = args.next().expect("--seconds S").parse().expect("a number"),
            // One figure alone, against a running daemon, for profiling (strace, perf).
            "--only" => only = Some(args.next().expect("--only sign|generate")),
            "--core" => {
                core.push_str(&args.next().expect("--core 'KEY = VALUE'"));
                core.push('\n');
            }
            _ => {
                eprintln!(
                    "usage: parsec-bench [--daemon PATH] [--seconds S] [--only sign|generate] [--core 'KEY = VALUE']..."
                );
                std::process::exit(2);
            }
        }
    }
    let bin = std::fs::canonicalize(&bin).unwrap_or_else(|_| {
        panic!(
            "no daemon binary at {}: cargo build --release first",
            bin.display()
        )
    });
    let dir = std::env::temp_dir().join(format!("parsec-bench-{}", std::process::id()));

    // Start-up: the median of several cold starts.
    let start = || {
        let software = "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n";
        let listener = "timeout = 5000\nmax_connections = 256\n";
        Daemon::start_with_config(&bin, &dir, &core, listener, "", software)
    };
    let mut startups: Vec<Duration> = (0..7).map(|_| start().1).collect();
    startups.sort();
    let (daemon, _) = start();
    std::thread::sleep(Duration::from_millis(200));
    let idle_rss = daemon.status_field("VmRSS");
    let threads = daemon.status_field("Threads");
    let size = std::fs::metadata(&bin).unwrap().len();

    if let Some(figure) = only {
        println!(
            "parsec-bench: daemon pid {}; {figure} for {seconds} s per round",
            daemon.pid()
        );
        for clients in [1, 8] {
            let r = match figure.as_str() {
                "sign" => rate(clients, seconds, setup_signer(&daemon), |(c, _)| {
                    c.psa_sign_hash("bench", &HASH, ecdsa()).unwrap();
                }),
                _ => rate(
                    clients,
                    seconds,
                    |i| daemon.client(&format!("gen-{i}")),
                    generate_destroy,
                ),
            };
            println!("{figure}, {clients} clients: {r:.0}/s");
        }
        return;
    }
    println!("parsec-bench: {} ({seconds} s per figure)", bin.display());
    println!("{:<34} {:>12} {:>12}", "figure", "1 client", "8 clients");
    let echo = [echo_rate(&dir, 1, seconds), echo_rate(&dir, 8, seconds)];
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "bare echo (connections/s)", echo[0], echo[1]
    );

    let ping = [1, 8].map(|n| {
        rate(
            n,
            seconds,
            |i| daemon.client(&format!("ping-{i}")),
            |c| {
                c.ping().unwrap();
            },
        )
    });
    println!("{:<34} {:>12.0} {:>12.0}", "ping/s", ping[0], ping[1]);

    let setup_signer = &setup_signer(&daemon);
    let sign = [1, 8].map(|n| {
        rate(n, seconds, setup_signer, |(c, _)| {
            c.psa_sign_hash("bench", &HASH, ecdsa()).unwrap();
        })
    });
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "ECDSA P-256 sign_hash/s", sign[0], sign[1]
    );
    let verify = [1, 8].map(|n| {
        rate(n, seconds, setup_signer, |(c, signature)| {
            c.psa_verify_hash("bench", &HASH, ecdsa(), signature)
                .unwrap();
        })
    });
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "ECDSA P-256 verify_hash/s", verify[0], verify[1]
    );
    let lifecycle = [1, 8].map(|n| {
        rate(
            n,
            seconds,
            |i| daemon.client(&format!("gen-{i}")),
            generate_destroy,
        )
    });
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "generate+destroy/s", lifecycle[0], lifecycle[1]
    );
    // Where generate+destroy's time goes: the same figure with the store on tmpfs (its
    // fsyncs cost nothing), and the cryptography alone in this process.
    let tmpfs = Path::new("/dev/shm");
    let lifecycle_tmpfs = tmpfs.is_dir().then(|| {
        let dir = tmpfs.join(format!("parsec-bench-{}", std::process::id()));
        let software = "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n";
        let listener = "timeout = 5000\nmax_connections = 256\n";
        let (on_tmpfs, _) = Daemon::start_with_config(&bin, &dir, &core, listener, "", software);
        let rates = [1, 8].map(|n| {
            rate(
                n,
                seconds,
                |i| on_tmpfs.client(&format!("gen-{i}")),
                generate_destroy,
            )
        });
        drop(on_tmpfs);
        let _ = std::fs::remove_dir_all(&dir);
        rates
    });
    if let Some(r) = lifecycle_tmpfs {
        println!(
            "{:<34} {:>12.0} {:>12.0}",
            "generate+destroy/s, store on tmpfs", r[0], r[1]
        );
    }
    let in_process_lifecycle = in_process_generate_rate(seconds);
    println!(
        "{:<34} {:>12.0} {:>12.0}",
        "in-process generate+destroy/s", in_process_lifecycle[0], in_process_lifecycle[1]
    );
    let in_process = in_process_sign_rate(1, seconds);
    println!(
        "{:<34} {:>12.0} {:>12}",
        "in-process psa-crypto sign/s", in_process, "-"
    );
    let in_process_2 = in_process_sign_rate(2, seconds);
    println!(
        "{:<34} {:>12} {:>12.0}",
        "in-process sign, 2 threads/s", "-", in_process_2
    );

    println!();
    let check = |ok: bool| if ok { "meets target" } else { "MISSES target" };
    let ping_ratio = ping[0] / echo[0];
    let sign_ratio = sign[0] / in_process;
    println!(
        "single-client ping vs bare echo:   {:>5.1}%  (target >= 80%: {})",
        100.0 * ping_ratio,
        check(ping_ratio >= 0.80)
    );
    println!(
        "single-client sign vs in-process:  {:>5.1}%  (target >= 85%: {})",
        100.0 * sign_ratio,
        check(sign_ratio >= 0.85)
    );
    let sign_scaling = sign[1] / sign[0];
    let lifecycle_scaling = lifecycle[1] / lifecycle[0];
    println!(
        "sign, 8 clients vs 1:              {sign_scaling:>5.2} x  (target >= 1.5 x: {})",
        check(sign_scaling >= 1.5)
    );
    let sign_vs_two = sign[1] / in_process_2;
    println!(
        "sign, 8 clients vs 2 threads:      {:>5.1}%  (target >= 90%: {})",
        100.0 * sign_vs_two,
        check(sign_vs_two >= 0.90)
    );
    println!(
        "generate+destroy, 8 clients vs 1:  {lifecycle_scaling:>5.2} x  (target >= 2.5 x: {})",
        check(lifecycle_scaling >= 2.5)
    );
    println!(
        "generate+destroy, 8 clients:       {:>5.0}/s (target >= 1500/s with a durable store: {})",
        lifecycle[1],
        check(lifecycle[1] >= 1500.0)
    );
    if let Some(r) = lifecycle_tmpfs {
        println!(
            "  where its time goes, 8 clients:   {:.0} us per key with syncs, {:.0} us without (tmpfs), {:.0} us of it cryptography on 2 threads",
            1e6 / lifecycle[1],
            1e6 / r[1],
            1e6 / in_process_lifecycle[1]
        );
    }
    println!(
        "threads:                           {threads}  (the event loop, the key store writer, the software provider's worker and its second crypto thread; target 4: {})",
        check(threads == "4")
    );
    let rss_kib: f64 = idle_rss
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    println!(
        "idle RSS:                          {:.2} MiB  (target < 3 MiB: {})",
        rss_kib / 1024.0,
        check(rss_kib < 3072.0)
    );
    let startup = startups[startups.len() / 2];
    println!(
        "start-up to first ping (median):   {:.2} ms  (target < 5 ms: {})",
        startup.as_secs_f64() * 1e3,
        check(startup < Duration::from_millis(5))
    );
    println!(
        "stripped binary:                   {:.2} MiB  (target < 2.5 MiB: {})",
        size as f64 / 1048576.0,
        check(size < 2_621_440)
    );
}
