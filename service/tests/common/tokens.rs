//! PKCS#11 modules other than SoftHSM2, each on a token of its own for one test:
//! tpm2-pkcs11 on a software TPM (swtpm, through tpm2-abrmd on a private D-Bus, or bare),
//! and NSS's softoken on a database of its own. CI installs them (scripts/install-deps.sh);
//! a machine without them fails these tests rather than skipping them.

use super::{fresh_dir, stdout_of, Swtpm, USER_PIN};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TPM2_PKCS11: &str = "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so";
pub const SOFTOKN: &str = "/usr/lib/x86_64-linux-gnu/libsoftokn3.so";
/// The label NSS's softoken gives its key database's token.
pub const NSS_TOKEN: &str = "NSS Certificate DB";

/// A tpm2-pkcs11 token: its store (tpm2_ptool's SQLite file), a swtpm, and the resource
/// manager the tools (and, by default, the service) reach it through.
pub struct Tpm2Token {
    pub dir: PathBuf,
    pub store: PathBuf,
    pub label: String,
    swtpm: Option<Swtpm>,
    bus: Option<Child>,
    abrmd: Option<Child>,
}

impl Tpm2Token {
    /// A new token labelled `parsec-<name>` (user PIN 1234, SO PIN 5678).
    pub fn new(name: &str) -> Tpm2Token {
        let dir = fresh_dir(&format!("{name}-tpm2pkcs11"));
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let mut token = Tpm2Token {
            store,
            label: format!("parsec-{name}"),
            swtpm: Some(Swtpm::start(name)),
            bus: None,
            abrmd: None,
            dir,
        };
        token.start_abrmd();
        token.ptool(&["init"]);
        token.add_token(&token.label.clone());
        token
    }

    /// A second token of the same module (same store, same TPM).
    pub fn add_token(&self, label: &str) {
        self.ptool(&[
            "addtoken",
            "--pid=1",
            "--sopin=5678",
            &format!("--userpin={USER_PIN}"),
            &format!("--label={label}"),
        ]);
    }

    fn bus_path(&self) -> PathBuf {
        self.dir.join("bus")
    }

    /// A D-Bus daemon of this test's own, and tpm2-abrmd on it in front of the swtpm.
    fn start_abrmd(&mut self) {
        let conf = self.dir.join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>session</type><listen>unix:path={}</listen><policy context=\"default\"><allow send_destination=\"*\" eavesdrop=\"true\"/><allow eavesdrop=\"true\"/><allow own=\"*\"/><allow user=\"*\"/></policy></busconfig>\n",
                self.bus_path().display()
            ),
        )
        .unwrap();
        let _ = std::fs::remove_file(self.bus_path());
        self.bus = Some(
            Command::new("dbus-daemon")
                .arg(format!("--config-file={}", conf.display()))
                .arg("--nofork")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("dbus-daemon (apt-get install dbus)"),
        );
        wait_for(|| self.bus_path().exists(), "dbus-daemon's socket");
        let tcti = self.swtpm.as_ref().unwrap().tcti();
        self.abrmd = Some(
            Command::new("tpm2-abrmd")
                .args(["--session", "--allow-root", "--flush-all"])
                .arg(format!("--tcti={tcti}"))
                .env("DBUS_SESSION_BUS_ADDRESS", self.bus_address())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("tpm2-abrmd (apt-get install tpm2-abrmd)"),
        );
        wait_for(
            || {
                Command::new("tpm2_getrandom")
                    .arg("4")
                    .envs(self.tools_env())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
            "tpm2-abrmd",
        );
    }

    /// Stops tpm2-abrmd: the TPM is then reached bare (`bare_env`), as on a device with
    /// /dev/tpm0 and no resource manager: three object slots for everything.
    pub fn stop_abrmd(&mut self) {
        for child in [self.abrmd.take(), self.bus.take()].into_iter().flatten() {
            stop(child);
        }
    }

    fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_path().display())
    }

    /// The environment of the tools (tpm2_ptool, tpm2-tools) and of a service through abrmd.
    pub fn tools_env(&self) -> Vec<(String, String)> {
        vec![
            ("DBUS_SESSION_BUS_ADDRESS".into(), self.bus_address()),
            ("TPM2TOOLS_TCTI".into(), "tabrmd:bus_type=session".into()),
            ("TPM2_PKCS11_TCTI".into(), "tabrmd:bus_type=session".into()),
            ("TPM2_PKCS11_STORE".into(), self.store.display().to_string()),
        ]
    }

    /// The environment of a service reaching the swtpm directly (after `stop_abrmd`).
    pub fn bare_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "TPM2_PKCS11_TCTI".into(),
                self.swtpm.as_ref().unwrap().tcti(),
            ),
            ("TPM2_PKCS11_STORE".into(), self.store.display().to_string()),
        ]
    }

    /// Runs tpm2_ptool on this token's store; returns its stdout.
    pub fn ptool(&self, args: &[&str]) -> String {
        stdout_of(
            Command::new("tpm2_ptool")
                .args(args)
                .arg(format!("--path={}", self.store.display()))
                .envs(self.tools_env()),
            &format!("tpm2_ptool {args:?}"),
            "apt-get install libtpm2-pkcs11-tools",
        )
    }
}

impl Drop for Tpm2Token {
    fn drop(&mut self) {
        self.stop_abrmd();
        drop(self.swtpm.take());
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// NSS's softoken on a key database of its own (`certutil -N`, password 1234).
pub struct NssToken {
    pub dir: PathBuf,
}

impl NssToken {
    pub fn new(name: &str) -> NssToken {
        let dir = fresh_dir(&format!("{name}-nss"));
        let token = NssToken { dir };
        std::fs::write(token.password_file(), format!("{USER_PIN}\n")).unwrap();
        token.certutil(&["-N"]);
        token
    }

    fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    /// What C_Initialize is given (`library_parameters`).
    pub fn parameters(&self) -> String {
        format!(
            "configdir='sql:{}' certPrefix='' keyPrefix='' secmod='secmod.db' flags=optimizeSpace",
            self.dir.display()
        )
    }

    /// Runs certutil (libnss3-tools) on this database; returns its stdout.
    pub fn certutil(&self, args: &[&str]) -> String {
        stdout_of(
            Command::new("certutil")
                .args(args)
                .arg("-d")
                .arg(format!("sql:{}", self.dir.display()))
                .arg("-f")
                .arg(self.password_file()),
            &format!("certutil {args:?}"),
            "apt-get install libnss3-tools",
        )
    }
}

impl Drop for NssToken {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn stop(mut child: Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for(ready: impl Fn() -> bool, what: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if ready() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what} did not come up");
}
