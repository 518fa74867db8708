//! What the benchmark and the stress test share: a daemon started from its release or debug
//! binary on a private socket, parsec-client connections to it, and a rate meter.

pub mod slow_tpm;

use parsec_client::auth::Authentication;
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::ipc_handler::unix_socket::Handler;
use parsec_client::BasicClient;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const HASH: [u8; 32] = [0x42; 32];

pub fn p256(usage: impl Fn(&mut UsageFlags)) -> Attributes {
    let mut usage_flags = UsageFlags::default();
    usage(&mut usage_flags);
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::EccKeyPair {
            curve_family: EccFamily::SecpR1,
        },
        bits: 256,
        policy: Policy {
            usage_flags,
            permitted_algorithms: ecdsa().into(),
        },
    }
}

pub fn ecdsa() -> AsymmetricSignature {
    AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    }
}

pub fn ping_frame() -> [u8; 36] {
    let mut h = [0u8; 36];
    h[0..4].copy_from_slice(&0x5EC0_A710u32.to_le_bytes());
    h[4..6].copy_from_slice(&30u16.to_le_bytes());
    h[6] = 1;
    h[28..32].copy_from_slice(&1u32.to_le_bytes());
    h
}

pub fn raw_ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    if stream.write_all(&ping_frame()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).is_ok() && response.len() >= 36 && response[32..34] == [0, 0]
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
}

impl Daemon {
    /// Starts the daemon and returns it with the time to its first answered ping.
    pub fn start(bin: &Path, dir: &Path) -> (Daemon, Duration) {
        Daemon::start_configured(bin, dir, 5000, 256)
    }

    /// As `start`, with a read deadline (ms) and a connection cap of one's choosing.
    pub fn start_configured(
        bin: &Path,
        dir: &Path,
        timeout_ms: u64,
        max_connections: usize,
    ) -> (Daemon, Duration) {
        let software = "[[provider]]\nprovider_type = \"MbedCrypto\"\nkey_info_manager = \"m\"\n";
        Daemon::start_with_providers(bin, dir, timeout_ms, max_connections, software)
    }

    /// As `start_configured`, with these `[[provider]]` tables (key_info_manager "m").
    pub fn start_with_providers(
        bin: &Path,
        dir: &Path,
        timeout_ms: u64,
        max_connections: usize,
        providers: &str,
    ) -> (Daemon, Duration) {
        let listener = format!("timeout = {timeout_ms}\nmax_connections = {max_connections}\n");
        Daemon::start_with_config(bin, dir, "", &listener, "", providers)
    }

    /// As `start_with_providers`, with extra lines for `[core_settings]`, `[listener]` and
    /// `[authenticator]` (admins, say).
    pub fn start_with_config(
        bin: &Path,
        dir: &Path,
        core: &str,
        listener: &str,
        authenticator: &str,
        providers: &str,
    ) -> (Daemon, Duration) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("parsec.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[core_settings]\nlog_level = \"error\"\nallow_root = true\n{core}\
                 [listener]\nlistener_type = \"DomainSocket\"\n{listener}socket_path = \"{}\"\n\
                 [authenticator]\nauth_type = \"Direct\"\n{authenticator}\
                 [[key_manager]]\nname = \"m\"\nmanager_type = \"OnDisk\"\nstore_path = \"{}\"\n{providers}",
                socket.display(),
                dir.join("store").display()
            ),
        )
        .unwrap();
        let start = Instant::now();
        let child = Command::new(bin)
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the daemon");
        while !raw_ping(&socket) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "daemon did not start"
            );
            std::hint::spin_loop();
        }
        let startup = start.elapsed();
        (
            Daemon {
                child,
                socket,
                dir: dir.to_path_buf(),
            },
            startup,
        )
    }

    pub fn client(&self, app: &str) -> BasicClient {
        client_on(&self.socket, app)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn status_field(&self, field: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    }
}

/// A client of the service on `socket`, as application `app` (Direct authentication), on
/// the service's first provider.
pub fn client_on(socket: &Path, app: &str) -> BasicClient {
    std::env::set_var(
        "PARSEC_SERVICE_ENDPOINT",
        format!("unix:{}", socket.display()),
    );
    let mut client = BasicClient::new_naked().unwrap();
    client.set_ipc_handler(Box::new(
        Handler::new(socket.to_path_buf(), Some(Duration::from_secs(30))).unwrap(),
    ));
    client.set_auth_data(Authentication::Direct(app.into()));
    client.set_default_provider().unwrap();
    client
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `op` on `clients` threads and returns operations per second: the best of three
/// rounds of `seconds / 3` each, so that a hiccup of the machine does not decide a figure.
pub fn rate<S: Send + 'static>(
    clients: usize,
    seconds: f64,
    setup: impl Fn(usize) -> S + Sync,
    op: impl Fn(&mut S) + Sync,
) -> f64 {
    (0..3)
        .map(|_| rate_once(clients, seconds / 3.0, &setup, &op))
        .fold(0.0, f64::max)
}

fn rate_once<S: Send + 'static>(
    clients: usize,
    seconds: f64,
    setup: impl Fn(usize) -> S + Sync,
    op: impl Fn(&mut S) + Sync,
) -> f64 {
    let states: Vec<S> = (0..clients).map(&setup).collect();
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let handles: Vec<_> = states
            .into_iter()
            .map(|mut state| {
                let op = &op;
                scope.spawn(move || {
                    let mut count = 0u64;
                    while start.elapsed() < deadline {
                        op(&mut state);
                        count += 1;
                    }
                    count
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// A software TPM on a free loopback port, stopped when dropped.
pub struct Swtpm {
    child: Child,
    pub port: u16,
    state: PathBuf,
}

impl Swtpm {
    pub fn start(state: &Path) -> Swtpm {
        let _ = std::fs::remove_dir_all(state);
        std::fs::create_dir_all(state).unwrap();
        loop {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2", "--tpmstate"])
                .arg(format!("dir={}", state.display()))
                .args([
                    "--server",
                    &format!("type=tcp,port={port},bindaddr=127.0.0.1"),
                ])
                .args([
                    "--ctrl",
                    &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1),
                ])
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (apt-get install swtpm)");
            let start = Instant::now();
            while child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(5) {
                if std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    return Swtpm {
                        child,
                        port,
                        state: state.to_path_buf(),
                    };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// Calls per second of `op` over `seconds`, on this thread.
pub fn rate_of(seconds: f64, mut op: impl FnMut()) -> f64 {
    let deadline = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < deadline {
        op();
        count += 1;
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// Service against in-process, measured in alternating rounds.
pub struct Comparison {
    /// Best round of each side, operations per second.
    pub service: f64,
    pub in_process: f64,
    /// Median over rounds of service / in-process, each pair measured back to back.
    pub ratio: f64,
}

/// Alternates `rounds` rounds of `service` and `in_process` over `seconds` in all, so that
/// the machine's drifts touch both alike.
pub fn compare(
    rounds: usize,
    seconds: f64,
    mut service: impl FnMut(),
    mut in_process: impl FnMut(),
) -> Comparison {
    let round = seconds / (2 * rounds) as f64;
    let (mut best_service, mut best_direct) = (0f64, 0f64);
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let s = rate_of(round, &mut service);
        let d = rate_of(round, &mut in_process);
        ratios.push(s / d);
        best_service = best_service.max(s);
        best_direct = best_direct.max(d);
    }
    ratios.sort_by(f64::total_cmp);
    let ratio = if rounds % 2 == 0 {
        (ratios[rounds / 2 - 1] + ratios[rounds / 2]) / 2.0
    } else {
        ratios[rounds / 2]
    };
    Comparison {
        service: best_service,
        in_process: best_direct,
        ratio,
    }
}

/// Pins this process (and the daemon and devices it starts afterwards) to CPU 0: on a small
/// VM, which core each process lands on swings single runs by ±10%; on one core both sides
/// of a comparison pay the same.
pub fn pin_to_cpu0() {
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("CPU 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("pin to CPU 0");
}

/// The command line of the device benchmarks: `[--daemon PATH] [--seconds S] [--all-cpus]`.
pub struct DeviceBenchOptions {
    /// The daemon binary, canonicalised.
    pub bin: PathBuf,
    pub seconds: f64,
    /// Pin everything to CPU 0 (the default; `--all-cpus` turns it off).
    pub pin: bool,
    /// `--only NAME`: run one of the bench's scenarios alone (where it has several).
    pub only: Option<String>,
}

impl DeviceBenchOptions {
    pub fn parse(name: &str, default_seconds: f64) -> DeviceBenchOptions {
        let mut bin = PathBuf::from("target/release/parsec");
        let mut seconds = default_seconds;
        let mut pin = true;
        let mut only = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--daemon" => bin = PathBuf::from(args.next().expect("--daemon PATH")),
                "--seconds" => {
                    seconds = args.next().expect("--seconds S").parse().expect("a number")
                }
                "--all-cpus" => pin = false,
                "--only" => only = Some(args.next().expect("--only NAME")),
                _ => {
                    eprintln!(
                        "usage: {name} [--daemon PATH] [--seconds S] [--all-cpus] [--only NAME]"
                    );
                    std::process::exit(2);
                }
            }
        }
        let bin = std::fs::canonicalize(&bin)
            .unwrap_or_else(|_| panic!("no daemon binary at {}", bin.display()));
        DeviceBenchOptions {
            bin,
            seconds,
            pin,
            only,
        }
    }
}

/// A fresh SoftHSM2 token in `dir`, selected for this process (and the daemon it starts)
/// through SOFTHSM2_CONF.
pub fn init_softhsm_token(dir: &Path, label: &str, pin: &str) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("tokens")).unwrap();
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )
    .unwrap();
    // Set before any thread exists.
    std::env::set_var("SOFTHSM2_CONF", &conf);
    let status = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin,
            "--so-pin",
            "5678",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("softhsm2-util (apt-get install softhsm2)");
    assert!(status.success());
}
