//! A least-privilege deployment without systemd: the service runs as its own user and group,
//! creates its socket directory 0750 (only its group, the clients', may enter) and its key
//! store 0700 with entries 0600; a user outside the group cannot even connect.
//!
//! Needs root (users, and running as them).

mod common;

use common::{config_text, p256_signing, BIN};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn ensure_group(name: &str) -> nix::unistd::Group {
    if let Some(group) = nix::unistd::Group::from_name(name).unwrap() {
        return group;
    }
    assert!(Command::new("groupadd")
        .args(["--system", name])
        .status()
        .unwrap()
        .success());
    nix::unistd::Group::from_name(name).unwrap().unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn the_service_runs_as_its_own_user_with_private_state() {
    if !common::running_as_root("create users") {
        return;
    }
    let clients = ensure_group("parsec-clients");
    let service = common::ensure_user("parsec-svc", None);
    let member = common::ensure_user("parsec-member", Some("parsec-clients"));
    let outsider = common::ensure_user("parsec-outsider", None);

    let base = common::fresh_dir("least-privilege");
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    // What a package would install: /var/lib/parsec owned by the service user.
    let state = base.join("lib");
    std::fs::create_dir(&state).unwrap();
    nix::unistd::chown(&state, Some(service.uid), Some(service.gid)).unwrap();
    // A runtime directory the service may write to (what /run is to an init script running
    // as root); the service itself creates its socket directory inside it.
    let runtime = base.join("run");
    std::fs::create_dir(&runtime).unwrap();
    nix::unistd::chown(&runtime, Some(service.uid), Some(service.gid)).unwrap();
    let socket = runtime.join("parsec/parsec.sock");
    let config = base.join("config.toml");
    let text = config_text(&socket, &state.join("mappings"), "UnixPeerCredentials", &[])
        .replace("allow_root = true", "allow_root = false");
    std::fs::write(&config, text).unwrap();

    let mut daemon = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .uid(service.uid.as_raw())
        .gid(clients.gid.as_raw())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(base.join("log")).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !socket.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no socket: {}",
            std::fs::read_to_string(base.join("log")).unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    // A member of parsec-clients creates a key.
    let as_member = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "client_role", "--nocapture"])
        .env("PARSEC_LP_SOCKET", &socket)
        .uid(member.uid.as_raw())
        .gid(clients.gid.as_raw())
        .output()
        .unwrap();
    assert!(
        as_member.status.success(),
        "{}",
        String::from_utf8_lossy(&as_member.stdout)
    );
    // Someone outside the group cannot reach the socket at all.
    let as_outsider = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "client_role", "--nocapture"])
        .env("PARSEC_LP_SOCKET", &socket)
        .env("PARSEC_LP_EXPECT_DENIED", "1")
        .uid(outsider.uid.as_raw())
        .gid(outsider.gid.as_raw())
        .output()
        .unwrap();
    assert!(
        as_outsider.status.success(),
        "{}",
        String::from_utf8_lossy(&as_outsider.stdout)
    );

    // The modes the threat model asks for.
    let run_dir = socket.parent().unwrap();
    assert_eq!(mode(run_dir), 0o750);
    let meta = std::fs::metadata(run_dir).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.gid()),
        (service.uid.as_raw(), clients.gid.as_raw())
    );
    let store = state.join("mappings");
    assert_eq!(mode(&store), 0o700);
    assert_eq!(mode(&store.join("mbed-crypto")), 0o700);
    assert_eq!(mode(&store.join("namespaces")), 0o600);
    let namespace = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with('@'))
        .unwrap();
    assert_eq!(mode(&namespace), 0o700);
    let app_dir = std::fs::read_dir(&namespace)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(mode(&app_dir), 0o700);
    let entry = std::fs::read_dir(app_dir.join("1"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    assert_eq!(mode(&entry), 0o600);
    assert_eq!(
        std::fs::metadata(&entry).unwrap().uid(),
        service.uid.as_raw()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(daemon.wait().unwrap().success());
    std::fs::remove_dir_all(&base).unwrap();
}

/// The client side, run as another user; does nothing in a normal test run.
#[test]
fn client_role() {
    let Ok(socket) = std::env::var("PARSEC_LP_SOCKET") else {
        return;
    };
    if std::env::var_os("PARSEC_LP_EXPECT_DENIED").is_some() {
        let err = std::os::unix::net::UnixStream::connect(&socket).expect_err("outsider connected");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
        return;
    }
    std::env::set_var("PARSEC_SERVICE_ENDPOINT", format!("unix:{socket}"));
    let client = parsec_client::BasicClient::new(None).expect("client");
    client
        .psa_generate_key("member-key", p256_signing())
        .unwrap();
    assert_eq!(client.list_keys().unwrap().len(), 1);
}
