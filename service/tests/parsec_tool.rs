//! The real parsec-tool against the real daemon; openssl checks what it produced.
//!
//! parsec-tool and openssl must be on PATH (`.ci/run` installs them). Outside CI the test
//! says so and passes only when they are missing; in CI (CI=true) their absence fails it.

mod common;

use common::Daemon;
use std::process::Command;

fn available(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
        || Command::new(tool)
            .arg("version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

fn tool(daemon: &Daemon, args: &[&str]) -> String {
    let output = Command::new("parsec-tool")
        .args(args)
        .env(
            "PARSEC_SERVICE_ENDPOINT",
            format!("unix:{}", daemon.socket.display()),
        )
        .output()
        .expect("run parsec-tool");
    assert!(
        output.status.success(),
        "parsec-tool {args:?} failed: {}\nservice log:\n{}",
        String::from_utf8_lossy(&output.stderr),
        daemon.log_text()
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn parsec_tool_creates_signs_exports_lists_and_deletes() {
    if !(available("parsec-tool") && available("openssl")) {
        assert!(
            std::env::var_os("CI").is_none(),
            "parsec-tool and openssl must be installed in CI"
        );
        eprintln!(
            "parsec-tool or openssl not installed: install them (see .ci/run) to run this test"
        );
        return;
    }
    // parsec-tool picks the authenticator the service offers, as a deployed client would.
    let daemon = Daemon::start_with("parsec-tool", "UnixPeerCredentials", &[]);
    tool(&daemon, &["ping"]);
    tool(&daemon, &["create-ecc-key", "-k", "tool-key"]);
    let signature = tool(
        &daemon,
        &["sign", "-k", "tool-key", "signed by parsec-tool"],
    );
    let public = tool(&daemon, &["export-public-key", "-k", "tool-key"]);
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"), "{public}");
    let listed = tool(&daemon, &["list-keys"]);
    assert!(listed.contains("tool-key"), "{listed}");

    let dir = &daemon.dir;
    std::fs::write(dir.join("message"), "signed by parsec-tool").unwrap();
    std::fs::write(dir.join("public.pem"), &public).unwrap();
    let der = Command::new("base64")
        .arg("-d")
        .stdin(
            std::fs::File::open({
                std::fs::write(dir.join("signature.b64"), signature.trim()).unwrap();
                dir.join("signature.b64")
            })
            .unwrap(),
        )
        .output()
        .unwrap();
    assert!(der.status.success());
    std::fs::write(dir.join("signature.der"), &der.stdout).unwrap();
    let verify = |message: &str| {
        std::fs::write(dir.join("checked"), message).unwrap();
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(dir.join("public.pem"))
            .arg("-signature")
            .arg(dir.join("signature.der"))
            .arg(dir.join("checked"))
            .output()
            .unwrap()
    };
    let good = verify("signed by parsec-tool");
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stdout)
    );
    assert!(String::from_utf8_lossy(&good.stdout).contains("Verified OK"));
    assert!(!verify("signed by someone else").status.success());

    tool(&daemon, &["delete-key", "-k", "tool-key"]);
    let listed = tool(&daemon, &["list-keys"]);
    assert!(!listed.contains("tool-key"), "{listed}");
}
