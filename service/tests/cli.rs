//! The command line: --check-config, --version, and the refusal to run as root.

mod common;

use common::{config_text, BIN};
use std::process::Command;

#[test]
fn check_config_accepts_good_files_and_explains_bad_ones() {
    let dir = common::fresh_dir("cli-check");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        config_text(&dir.join("s.sock"), &dir.join("store"), "Direct", &["a"]),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("valid; providers in order: [mbed-crypto-provider]"));

    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml");
    let out = Command::new(BIN)
        .args(["--check-config", shipped])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("allow_root = true", "allow_root = true\nallow_rooot = true");
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:5: unknown field `allow_rooot`"),
        "{stderr}"
    );
    assert!(stderr.contains("expected one of"), "{stderr}");

    let missing = Command::new(BIN)
        .args(["--check-config", "/nonexistent/parsec.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn version_names_the_built_in_providers_and_mbed_tls() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("providers: MbedCrypto"), "{text}");
    // The crypto library as it names itself: what a device's security updates are judged by.
    assert!(
        text.to_lowercase()
            .contains("software provider on mbed tls 3."),
        "{text}"
    );
    let out = Command::new(BIN).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn root_is_refused_unless_allowed() {
    if !common::running_as_root("observe the refusal to run as root") {
        return;
    }
    let dir = common::fresh_dir("cli-root");
    let config = dir.join("config.toml");
    let text = config_text(&dir.join("s.sock"), &dir.join("store"), "Direct", &[])
        .replace("allow_root = true", "allow_root = false");
    std::fs::write(&config, text).unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to run as root"));
    assert!(
        !dir.join("s.sock").exists(),
        "nothing may be opened before the refusal"
    );
    // The README's command: --allow-root, explicitly, lets it run as root this once.
    let mut daemon = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("--allow-root")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !common::raw_ping(&dir.join("s.sock")) {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "it exited although --allow-root was given"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no answer"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = daemon.kill();
    let _ = daemon.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}
