//! Upstream Parsec 1.5.0's own e2e configuration files (tests/fixtures/upstream-1.5.0/
//! e2e-configs, copied unchanged): each loads as it is, and a running service reloads into
//! each (SIGHUP) without an error and serves the providers it names, as upstream's e2e
//! config tests expect of upstream. The only changes are those upstream's CI makes itself
//! (`ci.sh`: the token's slot and serial number for the `# slot_number` / `# serial_number`
//! lines; `serial_number_padding`'s padded serial, the PIN tests' tokens and serial numbers)
//! and this machine's paths: the socket, SoftHSM2's module, the TPM simulator's address.
//!
//! Needs swtpm, tpm2-tools and softhsm2 (CI installs them).
#![cfg(all(
    feature = "mbed-crypto-provider",
    feature = "tpm-provider",
    feature = "pkcs11-provider"
))]

mod common;

use common::{fresh_dir, Daemon, Swtpm};
use parsec_client::core::interface::operations::psa_algorithm::Hash;
use parsec_client::core::interface::requests::ProviderId;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const CONFIGS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/upstream-1.5.0/e2e-configs"
);
const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The PIN upstream's e2e configs give the token.
const PIN: &str = "123456";

fn configs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "toml") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(CONFIGS), &mut files);
    files.sort();
    assert_eq!(files.len(), 33, "upstream 1.5.0 has 33 e2e config files");
    files
}

fn name(path: &Path) -> String {
    path.strip_prefix(CONFIGS).unwrap().display().to_string()
}

/// Why this service refuses a file of upstream's, if it does: the providers it does not
/// implement (CryptoAuthLib, Trusted Services), and a file that is not a service config.
fn refusal(path: &Path) -> Option<&'static str> {
    let text = std::fs::read_to_string(path).unwrap();
    if text.contains("[[access_keys]]") {
        return Some("unknown field `access_keys`");
    }
    text.lines()
        .any(|l| {
            l == "provider_type = \"CryptoAuthLib\"" || l == "provider_type = \"TrustedService\""
        })
        .then_some("(none: this service does not implement it)")
}

#[test]
fn every_upstream_e2e_config_loads_as_it_is() {
    for path in configs() {
        let out = Command::new(common::BIN)
            .arg("--check-config")
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        match refusal(&path) {
            None => assert!(out.status.success(), "{}: refused:\n{stderr}", name(&path)),
            Some(why) => {
                assert!(!out.status.success(), "{}: accepted", name(&path));
                assert!(stderr.contains(why), "{}: {stderr}", name(&path));
            }
        }
    }
}

/// A new SoftHSM2 token with this PIN (any bytes, through PKCS#11 as upstream's e2e test
/// initialises its PIN tokens): its slot number and serial number.
fn init_token(conf: &Path, label: &str, pin: &str) -> (u64, String) {
    use cryptoki::context::{CInitializeArgs, Pkcs11};
    use cryptoki::session::UserType;
    use cryptoki::types::AuthPin;
    std::env::set_var("SOFTHSM2_CONF", conf);
    let pkcs11 = Pkcs11::new(SOFTHSM).unwrap();
    pkcs11.initialize(CInitializeArgs::OsThreads).unwrap();
    let slot = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| !pkcs11.get_token_info(*s).unwrap().token_initialized())
        .expect("SoftHSM2 always has one free slot");
    let so = AuthPin::new("5678".into());
    pkcs11.init_token(slot, &so, label).unwrap();
    let session = pkcs11.open_rw_session(slot).unwrap();
    session.login(UserType::So, Some(&so)).unwrap();
    session.init_pin(&AuthPin::new(pin.into())).unwrap();
    drop(session);
    pkcs11.finalize();
    // SoftHSM2 gives an initialised token a slot number of its own: look it up again.
    let pkcs11 = Pkcs11::new(SOFTHSM).unwrap();
    pkcs11.initialize(CInitializeArgs::OsThreads).unwrap();
    let (slot, serial) = pkcs11
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find_map(|s| {
            let info = pkcs11.get_token_info(s).ok()?;
            (info.label().trim() == label).then(|| (s, info.serial_number().trim().to_string()))
        })
        .expect("the token just made");
    pkcs11.finalize();
    (slot.id(), serial)
}

/// A P-256 signing key every provider makes (not exportable: the TPM's are not, and
/// upstream's allow_export.toml forbids it).
fn signing_key() -> parsec_client::core::interface::operations::psa_key_attributes::Attributes {
    let mut key = common::p256_signing();
    key.policy.usage_flags = Default::default();
    key.policy.usage_flags.set_sign_hash().set_verify_hash();
    key
}

/// The provider ids a config names, in its order.
fn providers_named(text: &str) -> Vec<ProviderId> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("provider_type = "))
        .map(|t| match t.trim_matches('"') {
            "MbedCrypto" => ProviderId::MbedCrypto,
            "Pkcs11" => ProviderId::Pkcs11,
            "Tpm" => ProviderId::Tpm,
            other => panic!("provider type {other}"),
        })
        .collect()
}

struct Machine {
    socket: PathBuf,
    tcti: String,
    /// The token upstream's CI finds first (its slot and serial go into the configs).
    slot: u64,
    serial: String,
    /// Tokens whose PINs are those of upstream's PIN-format tests.
    hex_pin_serial: String,
    str_pin_serial: String,
}

/// Upstream's file as upstream's CI would use it, on this machine.
fn as_upstream_ci_runs_it(path: &Path, m: &Machine) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let file = path.file_name().unwrap().to_string_lossy().to_string();
    let mut out = String::new();
    for line in text.lines() {
        let line = if line.starts_with("# slot_number") {
            format!("slot_number = {}", m.slot)
        } else if line.starts_with("# serial_number") {
            if file == "serial_number_padding.toml" {
                format!("serial_number = \"   {}   \"", m.serial)
            } else {
                format!("serial_number = \"{}\"", m.serial)
            }
        } else if line.starts_with("socket_path = ") {
            format!("socket_path = \"{}\"", m.socket.display())
        } else if line.starts_with("library_path = ") {
            format!("library_path = \"{SOFTHSM}\"")
        } else if line.starts_with("tcti = \"mssim") {
            format!("tcti = \"{}\"", m.tcti)
        } else {
            line.to_string()
        };
        out.push_str(&line);
        out.push('\n');
    }
    // Upstream's PIN tests append the serial number of a token made with that PIN.
    match file.as_str() {
        "pkcs11_pin_hex_fmt.toml" => {
            out.push_str(&format!("serial_number = \"{}\"\n", m.hex_pin_serial))
        }
        "pkcs11_pin_str_fmt_with_hex_word.toml" => {
            out.push_str(&format!("serial_number = \"{}\"\n", m.str_pin_serial))
        }
        _ => {}
    }
    out
}

fn tpm2(tcti: &str, args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .env("TPM2TOOLS_TCTI", tcti)
        .status()
        .unwrap_or_else(|e| panic!("{} (apt-get install tpm2-tools): {e}", args[0]));
    assert!(status.success(), "{args:?}");
}

#[test]
fn every_upstream_e2e_config_reloads_and_serves_what_it_names() {
    let dir = fresh_dir("upstream-configs");
    let hsm = dir.join("softhsm");
    std::fs::create_dir_all(hsm.join("tokens")).unwrap();
    let conf = hsm.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n",
            hsm.display()
        ),
    )
    .unwrap();
    let (slot, serial) = init_token(&conf, "upstream-e2e", PIN);
    // Upstream's CI takes the TPM's ownership with "tpm_pass" and sets the endorsement
    // hierarchy's to what its configs say.
    let tpm = Swtpm::start("upstream-configs");
    tpm2(&tpm.tcti(), &["tpm2_changeauth", "-c", "owner", "tpm_pass"]);
    tpm2(
        &tpm.tcti(),
        &["tpm2_changeauth", "-c", "endorsement", "endorsement_pass"],
    );
    let mut machine = Machine {
        socket: dir.join("parsec.sock"),
        tcti: tpm.tcti(),
        slot,
        serial,
        hex_pin_serial: String::new(),
        str_pin_serial: String::new(),
    };

    // The PIN-format files last: their tokens are made just before them, as upstream's
    // tests make theirs, so that the files naming no token see one (this service refuses
    // to guess between several, where upstream takes the first: docs/compatibility.md).
    let mut files: Vec<PathBuf> = configs()
        .into_iter()
        .filter(|p| refusal(p).is_none())
        .collect();
    files.sort_by_key(|p| p.to_string_lossy().contains("pkcs11_pin_"));
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        as_upstream_ci_runs_it(
            &Path::new(CONFIGS).join("provider_cfg/mbed-crypto/config.toml"),
            &machine,
        ),
    )
    .unwrap();
    let mut daemon = Daemon::on_config(
        dir.clone(),
        config.clone(),
        machine.socket.clone(),
        &[("SOFTHSM2_CONF", conf.display().to_string())],
    );
    // Upstream's relative store paths (./mappings, ./kim-mappings/...) are the e2e
    // directory's: here the test's.
    daemon.cwd = Some(dir.clone());
    daemon.spawn();
    let mut failures = Vec::new();
    for path in &files {
        let file = name(path);
        if file.ends_with("pkcs11_pin_hex_fmt.toml") {
            machine.hex_pin_serial = init_token(&conf, "hex-pin", "\x11\x00\x22\x00\x33").1;
        } else if file.ends_with("pkcs11_pin_str_fmt_with_hex_word.toml") {
            machine.str_pin_serial = init_token(&conf, "str-pin", "hex:1100220033").1;
        }
        let text = as_upstream_ci_runs_it(path, &machine);
        let before = daemon.log_text().len();
        reload(&daemon, &config, &text);
        let mut expected = providers_named(&text);
        if text.contains("skip_if_no_tpm = true") && text.contains("tcti = \"device\"") {
            // No TPM device here: skipped, as upstream's no_tpm_support expects.
            expected.retain(|p| *p != ProviderId::Tpm);
        }
        expected.push(ProviderId::Core);
        let client = daemon.client("upstream-e2e");
        let start = Instant::now();
        let listed = loop {
            let listed: Vec<ProviderId> = client
                .list_providers()
                .map(|ps| ps.into_iter().map(|p| p.id).collect())
                .unwrap_or_default();
            if listed == expected || start.elapsed() > Duration::from_secs(30) {
                break listed;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = daemon.log_text()[before..].to_string();
        let errors: Vec<&str> = log.lines().filter(|l| l.contains("[ERROR ")).collect();
        if listed != expected || !errors.is_empty() {
            failures.push(format!(
                "{file}: providers {listed:?}, expected {expected:?}; errors: {errors:#?}"
            ));
            continue;
        }
        // Each provider it names serves: a hash on the software one, a key made and
        // destroyed on the devices (the PIN-format tests' own check); with no PIN, the
        // service answers (upstream's no_user_pin asks no more: no key can be made).
        for id in &expected[..expected.len() - 1] {
            if *id == ProviderId::Pkcs11 && file.ends_with("no_user_pin.toml") {
                continue;
            }
            let mut client = daemon.client("upstream-e2e");
            client.set_implicit_provider(*id);
            let result = match id {
                ProviderId::MbedCrypto => client.psa_hash_compute(Hash::Sha256, b"e2e").map(drop),
                _ => client
                    .psa_generate_key("e2e-config", signing_key())
                    .and_then(|()| client.psa_destroy_key("e2e-config")),
            };
            if let Err(e) = result {
                failures.push(format!("{file}: provider {id:?} does not serve: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{:#?}\n{}",
        failures,
        daemon.log_text()
    );
    daemon.stop();
}

/// Writes the config, sends SIGHUP and waits until the service has taken it in: upstream's
/// files log at warn, so the service's "reloaded" line is not there to wait for. The event
/// loop reads the signal, at the latest, in the round that answers the first ping after it;
/// a second ping is answered after that round, so after the reload was decided (the
/// providers it starts may still be starting: the caller waits for them).
fn reload(daemon: &Daemon, config: &Path, text: &str) {
    std::fs::write(config, text).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    std::thread::sleep(Duration::from_millis(20));
    for _ in 0..2 {
        let start = Instant::now();
        while !common::raw_ping(&daemon.socket) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no answer after the reload:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
