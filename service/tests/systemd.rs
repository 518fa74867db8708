//! Running under systemd: socket activation (the socket comes in as fd 3) and sd_notify
//! readiness, with systemd's own `systemd-socket-activate` passing the socket.

mod common;

use common::{config_text, ping_frame, status_of, BIN};
use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn next_state(notify: &UnixDatagram) -> String {
    let mut buf = [0u8; 256];
    let n = notify
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[test]
fn socket_activation_and_readiness_notification() {
    let activate = Command::new("systemd-socket-activate")
        .arg("--help")
        .output();
    if activate.map(|o| !o.status.success()).unwrap_or(true) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI installs systemd: this test must run there"
        );
        eprintln!("systemd-socket-activate not installed (package systemd): test not run");
        return;
    }
    let dir = common::fresh_dir("systemd");
    let socket = dir.join("parsec.sock");
    let config = dir.join("config.toml");
    // The config names another path: under activation the passed socket wins.
    std::fs::write(
        &config,
        config_text(&dir.join("unused.sock"), &dir.join("store"), "Direct", &[]),
    )
    .unwrap();
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        // It gives the service a fresh environment: pass NOTIFY_SOCKET explicitly.
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notify_path.display()))
        .arg(BIN)
        .arg("--config")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .unwrap();
    struct Reap(u32);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let _reap = Reap(child.id());
    // systemd-socket-activate starts the service on the first connection, as systemd does.
    let start = std::time::Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "systemd-socket-activate made no socket"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // The path appears at bind(), a moment before listen(): retry a refused connection.
    let mut stream = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                assert!(start.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("connecting to {}: {e}", socket.display()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&ping_frame()).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert_eq!(
        status_of(&response),
        0,
        "the first client, which woke the service, is served"
    );
    assert_eq!(next_state(&notify), "READY=1");
    assert!(
        !dir.join("unused.sock").exists(),
        "the service bound its own socket"
    );

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    assert_eq!(next_state(&notify), "RELOADING=1");
    assert_eq!(next_state(&notify), "READY=1");

    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(next_state(&notify), "STOPPING=1");
    assert!(child.wait().unwrap().success());
    assert!(
        socket.exists(),
        "a socket systemd passed is systemd's to remove"
    );
    let log = std::fs::read_to_string(dir.join("log")).unwrap();
    assert!(log.contains("socket activation: serving"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}
