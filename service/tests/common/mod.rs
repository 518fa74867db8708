//! A real daemon on a real socket, for the end-to-end tests.
#![allow(dead_code)]

use parsec_client::auth::Authentication;
use parsec_client::core::interface::operations::psa_algorithm::{
    Algorithm, AsymmetricEncryption, AsymmetricSignature, Hash,
};
use parsec_client::core::interface::operations::psa_key_attributes::{
    Attributes, EccFamily, Lifetime, Policy, Type, UsageFlags,
};
use parsec_client::core::ipc_handler::unix_socket::Handler;
use parsec_client::BasicClient;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_parsec");

/// Serialises the one moment parsec-client reads the socket path from the environment.
static ENV: Mutex<()> = Mutex::new(());

pub mod recorded;
#[path = "../../../bench/src/slow_tpm.rs"]
pub mod slow_tpm;
pub mod tokens;

pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Extra environment for the daemon (SOFTHSM2_CONF...).
    pub env: Vec<(String, String)>,
    /// Start it in `dir` with `--config config.toml`, a relative path.
    pub relative_config: bool,
    /// Start it under this descriptor limit (soft and hard), through util-linux's prlimit.
    pub nofile: Option<u64>,
    /// Start it in this working directory (with `--config` absolute).
    pub cwd: Option<PathBuf>,
    child: Option<Child>,
}

/// The config the tests run with; `auth` is "Direct" or "UnixPeerCredentials".
pub fn config_text(socket: &Path, store: &Path, auth: &str, admins: &[&str]) -> String {
    let admins = admins
        .iter()
        .map(|a| format!("{{ name = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        r#"
[core_settings]
log_level = "debug"
allow_root = true

[listener]
listener_type = "DomainSocket"
timeout = 1000
socket_path = "{}"

[authenticator]
auth_type = "{auth}"
admins = [ {admins} ]

[[key_manager]]
name = "on-disk"
manager_type = "OnDisk"
store_path = "{}"

[[provider]]
provider_type = "MbedCrypto"
key_info_manager = "on-disk"
"#,
        socket.display(),
        store.display()
    )
}

impl Daemon {
    /// A daemon with Direct authentication and "admin" as its admin.
    pub fn start(name: &str) -> Daemon {
        Daemon::start_with(name, "Direct", &["admin"])
    }

    pub fn start_with(name: &str, auth: &str, admins: &[&str]) -> Daemon {
        Daemon::start_edited(name, auth, admins, |text| text)
    }

    /// A daemon whose config text is first passed through `edit`.
    pub fn start_edited(
        name: &str,
        auth: &str,
        admins: &[&str],
        edit: impl Fn(String) -> String,
    ) -> Daemon {
        Daemon::start_in_env(name, auth, admins, edit, &[])
    }

    /// As `start_edited`, with extra environment variables for the daemon.
    pub fn start_in_env(
        name: &str,
        auth: &str,
        admins: &[&str],
        edit: impl Fn(String) -> String,
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = fresh_dir(name);
        let socket = dir.join("parsec.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            edit(config_text(&socket, &dir.join("store"), auth, admins)),
        )
        .unwrap();
        let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
        let mut daemon = Daemon::on_config(dir, config, socket, &env);
        daemon.spawn();
        daemon
    }

    /// A daemon on a config file of the caller's (not started: `spawn` it).
    pub fn on_config(
        dir: PathBuf,
        config: PathBuf,
        socket: PathBuf,
        env: &[(&str, String)],
    ) -> Daemon {
        Daemon {
            log: dir.join("parsec.log"),
            dir,
            socket,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            relative_config: false,
            nofile: None,
            cwd: None,
            child: None,
        }
    }

    /// Starts the process and waits until it answers a ping.
    pub fn spawn(&mut self) {
        self.start_process();
        let start = Instant::now();
        loop {
            if self.raw_ping_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "daemon exited with {status} during start-up; log:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "daemon did not start; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the process and waits (up to 20 s) for it to exit on its own: a start that
    /// aborts at a crash point, whether or not it listened first.
    pub fn run_to_exit(&mut self) -> ExitStatus {
        self.start_process();
        self.wait()
    }

    fn start_process(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.nofile {
            // prlimit sets the limit and executes the daemon in its own process.
            Some(limit) => {
                let mut command = Command::new("prlimit");
                command.arg(format!("--nofile={limit}:{limit}")).arg(BIN);
                command
            }
            None => Command::new(BIN),
        };
        if self.relative_config {
            command
                .current_dir(&self.dir)
                .args(["--config", "config.toml"]);
        } else {
            if let Some(cwd) = &self.cwd {
                command.current_dir(cwd);
            }
            command.arg("--config").arg(&self.config);
        }
        let child = command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        self.child = Some(child);
    }

    fn raw_ping_ok(&self) -> bool {
        raw_ping(&self.socket)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// The service's child processes (key generations), forked by any of its threads (the
    /// software provider's worker forks them).
    #[allow(dead_code)]
    pub fn children(&self) -> Vec<String> {
        let pid = self.pid();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|dir| dir.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        tasks
            .iter()
            .flat_map(|task| {
                std::fs::read_to_string(task.join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Rewrites the config with `edit`, sends SIGHUP and waits (up to 10 s) until the
    /// service has reloaded it.
    #[allow(dead_code)]
    pub fn reload_edited(&self, edit: impl Fn(String) -> String) {
        let done = |log: String| log.matches("reloaded, listening on").count();
        let before = done(self.log_text());
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, edit(text)).unwrap();
        self.signal(nix::sys::signal::Signal::SIGHUP);
        let start = Instant::now();
        while done(self.log_text()) == before {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the reload:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait()
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        self.wait();
    }

    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                panic!("daemon did not exit; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 10 s) until the log contains `text`, and returns the log.
    #[allow(dead_code)]
    pub fn wait_for_log(&self, text: &str, what: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log_text();
            if log.contains(text) {
                return log;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{what}:\n{log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A parsec-client for `app` with Direct authentication.
    pub fn client(&self, app: &str) -> BasicClient {
        let mut client = self.naked_client();
        client.set_auth_data(Authentication::Direct(app.to_string()));
        client.set_default_provider().expect("default provider");
        client
    }

    /// A parsec-client that configures itself as a real application would
    /// (ListAuthenticators, ListProviders).
    pub fn default_client(&self, app: Option<&str>) -> BasicClient {
        let mut client = self.naked_client();
        client
            .set_default_auth(app.map(str::to_string))
            .expect("default auth");
        client.set_default_provider().expect("default provider");
        client
    }

    pub fn naked_client(&self) -> BasicClient {
        naked_client_on(&self.socket)
    }

    /// Sends raw bytes and returns the raw response (until the service closes).
    pub fn raw(&self, bytes: &[u8]) -> Vec<u8> {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(bytes).unwrap();
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        response
    }
}

/// A parsec-client on a socket, with no authentication or provider set.
pub fn naked_client_on(socket: &Path) -> BasicClient {
    let guard = ENV.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var(
        "PARSEC_SERVICE_ENDPOINT",
        format!("unix:{}", socket.display()),
    );
    let mut client = BasicClient::new_naked().expect("client");
    drop(guard);
    client.set_ipc_handler(Box::new(
        Handler::new(socket.to_path_buf(), Some(Duration::from_secs(30))).expect("socket exists"),
    ));
    client
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A request header: magic, size 30, version 1.0, then the fields given.
pub fn header(provider: u8, opcode: u32, body_len: u32, auth_type: u8, auth_len: u16) -> [u8; 36] {
    let mut h = [0u8; 36];
    h[0..4].copy_from_slice(&0x5EC0_A710u32.to_le_bytes());
    h[4..6].copy_from_slice(&30u16.to_le_bytes());
    h[6] = 1;
    h[7] = 0;
    h[10] = provider;
    h[21] = auth_type;
    h[22..26].copy_from_slice(&body_len.to_le_bytes());
    h[26..28].copy_from_slice(&auth_len.to_le_bytes());
    h[28..32].copy_from_slice(&opcode.to_le_bytes());
    h
}

/// A complete, valid Ping request (empty body, no authentication).
/// A ping on a raw socket, answered with success.
pub fn raw_ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream.write_all(&ping_frame()).is_err() {
        return false;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).is_ok() && response.len() >= 36 && response[32..34] == [0, 0]
}

pub fn ping_frame() -> Vec<u8> {
    header(0, 1, 0, 0, 0).to_vec()
}

/// The status field of a raw response.
pub fn status_of(response: &[u8]) -> u16 {
    assert!(response.len() >= 36, "short response: {response:?}");
    u16::from_le_bytes([response[32], response[33]])
}

/// ECDSA with SHA-256, the algorithm the tests sign with.
pub fn ecdsa_sha256() -> AsymmetricSignature {
    AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    }
}

/// A persistent ECC P-256 key that signs and verifies hashes and may be exported.
pub fn p256_signing() -> Attributes {
    let mut usage_flags = UsageFlags::default();
    usage_flags.set_sign_hash().set_verify_hash().set_export();
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type: Type::EccKeyPair {
            curve_family: EccFamily::SecpR1,
        },
        bits: 256,
        policy: Policy {
            usage_flags,
            permitted_algorithms: ecdsa_sha256().into(),
        },
    }
}

/// A system user for tests that run clients or the service as someone else (needs root);
/// created once, in `group` if given.
pub fn ensure_user(name: &str, group: Option<&str>) -> nix::unistd::User {
    if let Some(user) = nix::unistd::User::from_name(name).unwrap() {
        return user;
    }
    let mut useradd = Command::new("useradd");
    useradd.args([
        "--system",
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
    ]);
    if let Some(group) = group {
        useradd.args(["--gid", group]);
    }
    assert!(
        useradd.arg(name).status().expect("run useradd").success(),
        "useradd {name}"
    );
    nix::unistd::User::from_name(name)
        .unwrap()
        .expect("user just created")
}

/// A new, empty directory for one test (named after the test and this process).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parsec-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether the test can run: it needs root for `what`. CI runs as root, so there a
/// missing root fails the test instead of skipping it.
pub fn running_as_root(what: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI runs as root: this test must run there"
    );
    eprintln!("not root: cannot {what}; run the tests as root to include this test");
    false
}

/// Config text with its key store moved to `store`.
pub fn with_store_path(text: &str, store: &Path) -> String {
    text.lines()
        .map(|line| {
            if line.starts_with("store_path = ") {
                format!("store_path = \"{}\"", store.display())
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A software TPM (swtpm) on loopback TCP, with its own state directory, for one test.
/// CI installs swtpm; a machine without it fails these tests rather than skipping them.
pub struct Swtpm {
    pub state: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

impl Swtpm {
    /// A new TPM: empty state, manufactured on first start.
    pub fn start(name: &str) -> Swtpm {
        let state = fresh_dir(&format!("{name}-tpm"));
        Swtpm::start_with_state(state)
    }

    /// A TPM started on existing state: after a stop, this is a TPM reset (power cycle).
    pub fn start_with_state(state: PathBuf) -> Swtpm {
        for _ in 0..20 {
            if let Some(swtpm) = Swtpm::start_on_port(state.clone(), free_port_pair()) {
                return swtpm;
            }
        }
        panic!("swtpm did not start");
    }

    /// One attempt on a given port (and the next one, for control); `None` if swtpm exits
    /// (the port is taken) or does not answer.
    pub fn start_on_port(state: PathBuf, port: u16) -> Option<Swtpm> {
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start swtpm (apt-get install swtpm)");
        let mut swtpm = Swtpm {
            state,
            port,
            child: Some(child),
        };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if swtpm.child.as_mut().unwrap().try_wait().unwrap().is_some() {
                swtpm.child = None;
                return None;
            }
            // Both ports: swtpm opens them one after the other.
            if std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Some(swtpm);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Stops the TPM (its state stays on disk) and returns the state directory.
    pub fn stop(mut self) -> PathBuf {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        std::mem::take(&mut self.state)
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            if !std::thread::panicking() {
                let _ = std::fs::remove_dir_all(&self.state);
            }
        }
    }
}

/// Two consecutive free TCP ports on loopback (swtpm's server and control ports).
pub fn free_port_pair() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// The `[[provider]]` table of a TPM provider.
pub fn tpm_provider_table(tcti: &str) -> String {
    format!(
        "[[provider]]\nprovider_type = \"Tpm\"\nkey_info_manager = \"on-disk\"\ntcti = \"{tcti}\"\n"
    )
}

/// Config text with a TPM provider added before the software provider (so it is the
/// clients' default).
pub fn with_tpm_first(text: String, tcti: &str) -> String {
    with_provider_first(text, &tpm_provider_table(tcti))
}

/// The SoftHSM2 module Debian installs.
pub const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const USER_PIN: &str = "1234";

/// A SoftHSM2 token of its own (its own SOFTHSM2_CONF and token directory) for one test.
/// CI installs softhsm2 and opensc; a machine without them fails these tests.
pub struct SoftHsm {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub label: String,
}

impl SoftHsm {
    pub fn new(name: &str) -> SoftHsm {
        let dir = fresh_dir(&format!("{name}-hsm"));
        let tokens = dir.join("tokens");
        std::fs::create_dir_all(&tokens).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let hsm = SoftHsm {
            dir,
            conf,
            label: format!("parsec-{name}"),
        };
        let status = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &hsm.conf)
            .args([
                "--init-token",
                "--free",
                "--label",
                &hsm.label,
                "--pin",
                USER_PIN,
                "--so-pin",
                "5678",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("softhsm2-util (apt-get install softhsm2)");
        assert!(status.success(), "softhsm2-util --init-token");
        hsm
    }

    pub fn env(&self) -> (&'static str, String) {
        ("SOFTHSM2_CONF", self.conf.display().to_string())
    }

    /// Runs pkcs11-tool (opensc) on this token, logged in; returns its stdout.
    pub fn tool(&self, args: &[&str]) -> String {
        stdout_of(
            Command::new("pkcs11-tool")
                .env("SOFTHSM2_CONF", &self.conf)
                .args([
                    "--module",
                    SOFTHSM,
                    "--token-label",
                    &self.label,
                    "--login",
                    "--pin",
                    USER_PIN,
                ])
                .args(args),
            &format!("pkcs11-tool {args:?}"),
            "apt-get install opensc",
        )
    }

    /// The directory of the token's files (moving it away "removes" the token).
    pub fn token_dir(&self) -> PathBuf {
        std::fs::read_dir(self.dir.join("tokens"))
            .unwrap()
            .next()
            .expect("one token")
            .unwrap()
            .path()
    }
}

impl Drop for SoftHsm {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The `[[provider]]` table of a PKCS#11 provider on a SoftHSM token, with `extra` lines.
pub fn pkcs11_provider_table(hsm: &SoftHsm, extra: &str) -> String {
    format!(
        "[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"on-disk\"\nlibrary_path = \"{SOFTHSM}\"\ntoken_label = \"{}\"\nuser_pin = \"{USER_PIN}\"\n{extra}",
        hsm.label
    )
}

/// Config text with a provider table added before the software provider.
pub fn with_provider_first(text: String, table: &str) -> String {
    text.replacen(
        "[[provider]]\nprovider_type = \"MbedCrypto\"",
        &format!("{table}\n[[provider]]\nprovider_type = \"MbedCrypto\""),
        1,
    )
}

/// The status of a request the service refused.
pub fn service_error(
    err: parsec_client::error::Error,
) -> parsec_client::core::interface::requests::ResponseStatus {
    match err {
        parsec_client::error::Error::Service(status) => status,
        other => panic!("expected a service error, got {other:?}"),
    }
}

/// A persistent key of this type for this algorithm, with the usage flags the algorithm needs
/// (encrypt and decrypt, derive for a key agreement, or sign and verify hashes).
pub fn attributes(key_type: Type, bits: usize, alg: impl Into<Algorithm>) -> Attributes {
    let alg = alg.into();
    let mut usage_flags = UsageFlags::default();
    match alg {
        Algorithm::AsymmetricEncryption(_) => usage_flags.set_encrypt().set_decrypt(),
        Algorithm::KeyAgreement(_) => usage_flags.set_derive(),
        _ => usage_flags.set_sign_hash().set_verify_hash(),
    };
    Attributes {
        lifetime: Lifetime::Persistent,
        key_type,
        bits,
        policy: Policy {
            usage_flags,
            permitted_algorithms: alg,
        },
    }
}

/// A secp-r1 (NIST) key pair type; the size goes in `attributes`.
pub fn ecc() -> Type {
    Type::EccKeyPair {
        curve_family: EccFamily::SecpR1,
    }
}

pub fn ecdsa(hash: Hash) -> AsymmetricSignature {
    AsymmetricSignature::Ecdsa {
        hash_alg: hash.into(),
    }
}

/// SHA-384 of `data` for Hash::Sha384, SHA-256 otherwise.
pub fn sha(hash: Hash, data: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    match hash {
        Hash::Sha384 => sha2::Sha384::digest(data).to_vec(),
        _ => sha2::Sha256::digest(data).to_vec(),
    }
}

/// Generates a signing key `name`, signs a hash, verifies it, and checks that a damaged
/// signature is refused as InvalidSignature; returns the signature.
pub fn generate_sign_verify(
    client: &BasicClient,
    name: &str,
    key_type: Type,
    bits: usize,
    alg: AsymmetricSignature,
    hash: Hash,
) -> Vec<u8> {
    client
        .psa_generate_key(name, attributes(key_type, bits, alg))
        .unwrap_or_else(|e| panic!("generating {name}: {e:?}"));
    let digest = sha(hash, name.as_bytes());
    let signature = client.psa_sign_hash(name, &digest, alg).unwrap();
    client
        .psa_verify_hash(name, &digest, alg, &signature)
        .unwrap();
    let mut wrong = signature.clone();
    wrong[4] ^= 1;
    let status = service_error(
        client
            .psa_verify_hash(name, &digest, alg, &wrong)
            .unwrap_err(),
    );
    assert_eq!(
        status,
        parsec_client::core::interface::requests::ResponseStatus::PsaErrorInvalidSignature,
        "{name}"
    );
    assert!(!client.psa_export_public_key(name).unwrap().is_empty());
    signature
}

/// Generates an RSA-2048 encryption key `name`, encrypts and decrypts, and checks that a
/// damaged ciphertext is refused as InvalidPadding (or InvalidArgument).
pub fn generate_encrypt_decrypt(client: &BasicClient, name: &str, alg: AsymmetricEncryption) {
    use parsec_client::core::interface::requests::ResponseStatus;
    client
        .psa_generate_key(name, attributes(Type::RsaKeyPair, 2048, alg))
        .unwrap_or_else(|e| panic!("generating {name}: {e:?}"));
    let ciphertext = client
        .psa_asymmetric_encrypt(name, alg, b"a secret", None)
        .unwrap();
    assert_eq!(ciphertext.len(), 256);
    let plaintext = client
        .psa_asymmetric_decrypt(name, alg, &ciphertext, None)
        .unwrap();
    assert_eq!(plaintext, b"a secret");
    let mut bad = ciphertext.clone();
    bad[10] ^= 0x40;
    let status = service_error(
        client
            .psa_asymmetric_decrypt(name, alg, &bad, None)
            .unwrap_err(),
    );
    assert!(
        status == ResponseStatus::PsaErrorInvalidPadding
            || status == ResponseStatus::PsaErrorInvalidArgument,
        "{name}: a damaged ciphertext gives {status:?}"
    );
}

/// As upstream Parsec 1.5.0: generating a public-key type is an invalid argument.
#[allow(dead_code)]
pub fn assert_public_key_generation_refused(client: &BasicClient) {
    let public = attributes(
        Type::RsaPublicKey,
        2048,
        AsymmetricSignature::RsaPkcs1v15Sign {
            hash_alg: Hash::Sha256.into(),
        },
    );
    assert_eq!(
        service_error(client.psa_generate_key("p", public).unwrap_err()),
        parsec_client::core::interface::requests::ResponseStatus::PsaErrorInvalidArgument
    );
}

/// Runs a tool that must succeed; its stdout, or a panic with its stderr (`what` names the
/// call, `install` how to get the tool).
pub fn stdout_of(command: &mut Command, what: &str, install: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e} ({install})"));
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Runs `script` with sh in `dir` (openssl pipelines); its stdout, or a panic with its stderr.
#[allow(dead_code)]
pub fn shell(dir: &Path, script: &str) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Public key data made by openssl: (PKCS#1 RSAPublicKey DER of an RSA-1024 key, the
/// uncompressed point of a P-256 key, the uncompressed point of a P-224 key).
#[allow(dead_code)]
pub fn openssl_public_keys(dir: &Path) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let run = |script: &str| shell(dir, script);
    let rsa = run(
        "openssl genrsa 1024 2>/dev/null | openssl rsa -RSAPublicKey_out -outform DER 2>/dev/null",
    );
    // The point is the last 1 + 2 * field bytes of the SubjectPublicKeyInfo.
    let point = |curve: &str, bytes: usize| {
        let spki = run(&format!(
            "openssl ecparam -name {curve} -genkey -noout 2>/dev/null | openssl ec -pubout -outform DER 2>/dev/null"
        ));
        spki[spki.len() - (1 + 2 * bytes)..].to_vec()
    };
    (rsa, point("prime256v1", 32), point("secp224r1", 28))
}

/// As upstream Parsec 1.5.0 on the TPM and PKCS#11 providers: an import whose declared size
/// is not the data's, or of a size the provider cannot hold, is an invalid argument; size 0
/// takes the data's.
#[allow(dead_code)]
pub fn assert_import_size_rules(client: &BasicClient, dir: &Path) {
    use parsec_client::core::interface::requests::ResponseStatus;
    let (rsa, p256, p224) = openssl_public_keys(dir);
    let verify_rsa = attributes(
        Type::RsaPublicKey,
        1023,
        AsymmetricSignature::RsaPkcs1v15Sign {
            hash_alg: Hash::Sha256.into(),
        },
    );
    let status = service_error(
        client
            .psa_import_key("rsa-1023", &rsa, verify_rsa)
            .unwrap_err(),
    );
    assert_eq!(
        status,
        ResponseStatus::PsaErrorInvalidArgument,
        "RSA-1024 data declared 1023 bits"
    );
    let mut any_size = verify_rsa;
    any_size.bits = 0;
    client
        .psa_import_key("rsa-0", &rsa, any_size)
        .expect("RSA public key, bits 0");
    assert_eq!(client.psa_export_public_key("rsa-0").unwrap(), rsa);

    let ecc_public = |bits| {
        let mut a = attributes(ecc(), bits, ecdsa(Hash::Sha256));
        a.key_type = Type::EccPublicKey {
            curve_family: EccFamily::SecpR1,
        };
        a.policy.usage_flags = UsageFlags::default();
        a.policy.usage_flags.set_verify_hash();
        a
    };
    let status = service_error(
        client
            .psa_import_key("p224", &p224, ecc_public(224))
            .unwrap_err(),
    );
    assert_eq!(
        status,
        ResponseStatus::PsaErrorInvalidArgument,
        "P-224 public key"
    );
    client
        .psa_import_key("p256-0", &p256, ecc_public(0))
        .expect("P-256 public key, bits 0");
    assert_eq!(client.psa_export_public_key("p256-0").unwrap(), p256);
    let listed = client.list_keys().unwrap();
    let entry = listed.iter().find(|k| k.name == "p256-0").expect("listed");
    assert_eq!(entry.attributes.bits, 256, "the size taken from the data");
}

/// Upstream Parsec 1.5.0's CanDoCrypto rules, common to its providers: a use check needs an
/// algorithm and a usage flag that uses it (else NotSupported); a generate check without an
/// algorithm asks only whether the key can be made.
#[allow(dead_code)]
pub fn assert_can_do_crypto_rules(client: &BasicClient) {
    use parsec_client::core::interface::operations::can_do_crypto::CheckType;
    use parsec_client::core::interface::requests::ResponseStatus;
    let signing = attributes(ecc(), 256, ecdsa(Hash::Sha256));
    client
        .can_do_crypto(CheckType::Use, signing)
        .expect("a P-256 ECDSA signing key");

    let mut no_flags = signing;
    no_flags.policy.usage_flags = UsageFlags::default();
    let status = service_error(client.can_do_crypto(CheckType::Use, no_flags).unwrap_err());
    assert_eq!(
        status,
        ResponseStatus::PsaErrorNotSupported,
        "use check, no usage flags"
    );

    let mut no_alg = signing;
    no_alg.policy.permitted_algorithms = Algorithm::None;
    let status = service_error(client.can_do_crypto(CheckType::Use, no_alg).unwrap_err());
    assert_eq!(
        status,
        ResponseStatus::PsaErrorNotSupported,
        "use check, no algorithm"
    );
    client
        .can_do_crypto(CheckType::Generate, no_alg)
        .expect("generate check, no algorithm: the key can be made");
}

/// SignMessage and VerifyMessage with ECDSA P-256 (SHA-256) and RSA-2048 PSS (SHA-384).
#[allow(dead_code)]
pub fn assert_messages_signed_and_verified(client: &BasicClient) {
    assert_sign_verify_message(client, ecc(), 256, ecdsa(Hash::Sha256), Hash::Sha256);
    let pss = AsymmetricSignature::RsaPss {
        hash_alg: Hash::Sha384.into(),
    };
    assert_sign_verify_message(client, Type::RsaKeyPair, 2048, pss, Hash::Sha384);
}

/// The NIST curves every provider offers ECDH on, with openssl's names.
#[allow(dead_code)]
pub const SECP_R1_256_384: &[(EccFamily, usize, &str)] = &[
    (EccFamily::SecpR1, 256, "prime256v1"),
    (EccFamily::SecpR1, 384, "secp384r1"),
];

/// SignMessage and VerifyMessage (beyond upstream 1.5.0): a message signature is the
/// signature of the message's hash (VerifyHash accepts it); a damaged one is refused; a key
/// made for messages only signs messages and not hashes.
#[allow(dead_code)]
pub fn assert_sign_verify_message(
    client: &BasicClient,
    key_type: Type,
    bits: usize,
    alg: AsymmetricSignature,
    hash: Hash,
) {
    use parsec_client::core::interface::requests::ResponseStatus;
    let message = b"a message, signed whole";
    let name = format!("msg-{key_type:?}-{bits}");
    client
        .psa_generate_key(&name, attributes(key_type, bits, alg))
        .unwrap_or_else(|e| panic!("generating {name}: {e:?}"));
    let signature = client
        .psa_sign_message(&name, message, alg)
        .expect("SignMessage");
    client
        .psa_verify_message(&name, message, alg, &signature)
        .expect("VerifyMessage of its own signature");
    client
        .psa_verify_hash(&name, &sha(hash, message), alg, &signature)
        .expect("VerifyHash of the message's hash accepts the message signature");
    let mut wrong = signature.clone();
    wrong[4] ^= 1;
    assert_eq!(
        service_error(
            client
                .psa_verify_message(&name, message, alg, &wrong)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorInvalidSignature
    );
    assert_eq!(
        service_error(
            client
                .psa_verify_message(&name, b"another message", alg, &signature)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorInvalidSignature
    );

    let mut messages_only = attributes(key_type, bits, alg);
    messages_only.policy.usage_flags = UsageFlags::default();
    messages_only
        .policy
        .usage_flags
        .set_sign_message()
        .set_verify_message();
    let only = format!("{name}-messages-only");
    client
        .psa_generate_key(&only, messages_only)
        .expect("a key for messages only");
    let signature = client
        .psa_sign_message(&only, message, alg)
        .expect("SignMessage, messages-only key");
    client
        .psa_verify_message(&only, message, alg, &signature)
        .expect("VerifyMessage, messages-only key");
    assert_eq!(
        service_error(
            client
                .psa_sign_hash(&only, &sha(hash, message), alg)
                .unwrap_err()
        ),
        ResponseStatus::PsaErrorNotPermitted,
        "SignHash with a messages-only key"
    );
}

/// Raw ECDH checked against openssl on each curve: the service's key with an openssl key's
/// public point gives the secret openssl derives from the other side.
#[allow(dead_code)]
pub fn assert_raw_ecdh_matches_openssl(
    client: &BasicClient,
    daemon: &Daemon,
    curves: &[(EccFamily, usize, &str)],
) {
    use parsec_client::core::interface::operations::psa_algorithm::{
        KeyAgreement, RawKeyAgreement,
    };
    let dir = &daemon.dir;
    let ecdh = RawKeyAgreement::Ecdh;
    let sh = |script: String| shell(dir, &script);
    let mut failures = Vec::new();
    for &(family, bits, curve) in curves {
        let agreement = attributes(
            Type::EccKeyPair {
                curve_family: family,
            },
            bits,
            KeyAgreement::Raw(ecdh),
        );
        let name = format!("ecdh-{curve}");
        if let Err(e) = client.psa_generate_key(&name, agreement) {
            failures.push(format!("{curve}: generate: {e:?}"));
            continue;
        }
        let ours = client.psa_export_public_key(&name).unwrap();
        let peer_spki = sh(format!(
            "openssl ecparam -name {curve} -genkey -noout -out {curve}.pem && openssl ec -in {curve}.pem -pubout -outform DER 2>/dev/null"
        ));
        let peer_point = &peer_spki[peer_spki.len() - ours.len()..];
        // Our point in the same SubjectPublicKeyInfo wrapping, for openssl.
        let our_spki = [&peer_spki[..peer_spki.len() - ours.len()], &ours[..]].concat();
        std::fs::write(dir.join(format!("{curve}-ours.der")), &our_spki).unwrap();
        let expected = sh(format!(
            "openssl pkeyutl -derive -inkey {curve}.pem -peerkey {curve}-ours.der -peerform DER"
        ));
        match client.psa_raw_key_agreement(ecdh, &name, peer_point) {
            Ok(secret) if secret == expected => {}
            Ok(secret) => failures.push(format!("{curve}: {} bytes, not openssl's", secret.len())),
            Err(e) => failures.push(format!("{curve}: agreement: {e:?}")),
        }
        // A point that is not on the curve is refused.
        let mut off_curve = peer_point.to_vec();
        let last = off_curve.len() - 1;
        off_curve[last] ^= 1;
        if client
            .psa_raw_key_agreement(ecdh, &name, &off_curve)
            .is_ok()
        {
            failures.push(format!("{curve}: a point off the curve was accepted"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", daemon.log_text());
}

/// The names ListKeys gives this client.
pub fn key_names(client: &BasicClient) -> Vec<String> {
    client
        .list_keys()
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect()
}

/// Where the key store keeps one Direct application's key entry (docs/key-store.md: hex
/// names under the authenticator's directory).
pub fn entry_path(store: &Path, app: &str, provider: u8, name: &str) -> PathBuf {
    let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
    store
        .join("@direct")
        .join(hex(app))
        .join(provider.to_string())
        .join(format!("{}.key", hex(name)))
}

/// A raw r||s ECDSA signature as DER (what openssl reads).
#[allow(dead_code)]
pub fn ecdsa_der(raw: &[u8]) -> Vec<u8> {
    let int = |bytes: &[u8]| {
        let mut v: Vec<u8> = bytes.iter().copied().skip_while(|b| *b == 0).collect();
        if v.first().map_or(true, |b| b & 0x80 != 0) {
            v.insert(0, 0);
        }
        let mut out = vec![0x02, v.len() as u8];
        out.extend(v);
        out
    };
    let (r, s) = raw.split_at(raw.len() / 2);
    let body = [int(r), int(s)].concat();
    let mut out = vec![0x30, body.len() as u8];
    out.extend(body);
    out
}

/// openssl verifies an ECDSA P-256 SHA-256 signature (PSA's r||s) of `message` with the
/// PSA public key (the uncompressed point).
#[allow(dead_code)]
pub fn openssl_verify_p256(public: &[u8], message: &[u8], signature: &[u8]) {
    let dir = fresh_dir("openssl-verify");
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(public);
    std::fs::write(dir.join("public.der"), spki).unwrap();
    std::fs::write(dir.join("message"), message).unwrap();
    std::fs::write(dir.join("sig"), ecdsa_der(signature)).unwrap();
    shell(
        &dir,
        "openssl dgst -sha256 -verify public.der -keyform DER -signature sig message",
    );
    let _ = std::fs::remove_dir_all(&dir);
}
