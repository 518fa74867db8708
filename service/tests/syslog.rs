//! log_target = "syslog": records reach /dev/log as RFC 3164 datagrams, facility daemon.
//!
//! The test plays syslog itself: it binds /dev/log, which needs root and a machine where no
//! syslog daemon owns that path (CI machines have none).

mod common;

use common::{p256_signing, Daemon};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn failed_requests_are_logged_to_syslog() {
    let dev_log = Path::new("/dev/log");
    if !nix::unistd::geteuid().is_root() || dev_log.exists() {
        assert!(
            std::env::var_os("CI").is_none() || dev_log.exists(),
            "CI runs as root without a syslog daemon: this test must run there"
        );
        eprintln!("cannot play syslog here (not root, or /dev/log is taken): test not run");
        return;
    }
    let receiver = UnixDatagram::bind(dev_log).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    struct Cleanup;
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file("/dev/log");
        }
    }
    let _cleanup = Cleanup;

    let daemon = Daemon::start_edited("syslog", "Direct", &[], |text| {
        text.replace(
            "log_level = \"debug\"",
            "log_level = \"info\"\nlog_target = \"syslog\"",
        )
    });
    let client = daemon.client("syslogged-app");
    client.psa_generate_key("k", p256_signing()).unwrap();
    assert!(client.psa_generate_key("k", p256_signing()).is_err());

    let mut records = Vec::new();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(5) {
        if let Ok(n) = receiver.recv(&mut buf) {
            records.push(String::from_utf8_lossy(&buf[..n]).to_string());
            if records.iter().any(|r| r.contains("request failed")) {
                break;
            }
        }
    }
    let failure = records
        .iter()
        .find(|r| r.contains("request failed"))
        .unwrap_or_else(|| panic!("no failure record in {records:#?}"));
    // <28> is facility daemon (3 << 3) with severity warning (4).
    assert!(failure.starts_with("<28>"), "{failure}");
    assert!(failure.contains("parsec["), "{failure}");
    assert!(failure.contains("app=syslogged-app provider=MbedCrypto opcode=PsaGenerateKey status=PsaErrorAlreadyExists"), "{failure}");
    assert!(
        daemon.log_text().is_empty(),
        "nothing should go to stderr: {}",
        daemon.log_text()
    );
}
