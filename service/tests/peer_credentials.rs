//! UnixPeerCredentials with two real Unix users: each is its own application, and neither
//! can reach the other's keys or speak for the other.
//!
//! Needs root (to create the users and to run clients as them). Each client is this test
//! binary run again as that user, in the `client_role` test, so the kernel's SO_PEERCRED is
//! the real thing.

mod common;

use common::{header, p256_signing as p256, status_of, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::*;
use parsec_client::core::interface::requests::ResponseStatus;
use parsec_client::error::Error;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

const USERS: [&str; 2] = ["parsec-test-a", "parsec-test-b"];

/// Runs `role` as `user` in a child process; returns its stdout.
fn run_as(user: &nix::unistd::User, socket: &PathBuf, role: &str) -> String {
    let output = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "client_role", "--nocapture", "--test-threads=1"])
        .env("PARSEC_TEST_ROLE", role)
        .env("PARSEC_TEST_SOCKET", socket)
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .output()
        .expect("run the client as another user");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "role {role} as {} failed:\n{stdout}\n{}",
        user.name,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn marker(stdout: &str, key: &str) -> String {
    stdout
        .lines()
        .find_map(|line| line.split_once(&format!("{key}=")).map(|(_, value)| value))
        .unwrap_or_else(|| panic!("no {key}= in\n{stdout}"))
        .to_string()
}

#[test]
fn two_unix_users_are_two_applications() {
    if !common::running_as_root("create users") {
        return;
    }
    let users = USERS.map(|name| common::ensure_user(name, None));
    let daemon = Daemon::start_with("peercred", "UnixPeerCredentials", &["0"]);
    // The test directory must be reachable by the two users.
    let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
    std::fs::set_permissions(&daemon.dir, mode).unwrap();

    let a = run_as(&users[0], &daemon.socket, "create");
    let b = run_as(&users[1], &daemon.socket, "intrude");
    assert_eq!(marker(&b, "saw_keys"), "0");
    assert_eq!(marker(&b, "sign_status"), "PsaErrorDoesNotExist");
    assert_eq!(
        marker(&b, "spoof_status"),
        format!("{}", ResponseStatus::AuthenticationError as u16)
    );
    let a_again = run_as(&users[0], &daemon.socket, "check");
    assert_eq!(
        marker(&a, "public"),
        marker(&a_again, "public"),
        "A's key was changed by B"
    );
    assert_ne!(
        marker(&a, "public"),
        marker(&b, "public"),
        "B's same-named key must be its own"
    );

    // Root is the admin here: it sees both users as clients, by UID.
    let admin = daemon.default_client(None);
    let mut clients = admin.list_clients().unwrap();
    clients.sort();
    let mut expected: Vec<String> = users.iter().map(|u| u.uid.to_string()).collect();
    expected.sort();
    assert_eq!(clients, expected);
    admin.delete_client(&users[1].uid.to_string()).unwrap();
    assert_eq!(
        admin.list_clients().unwrap(),
        vec![users[0].uid.to_string()]
    );
}

/// The client side, run as another user by `run_as`; does nothing in a normal test run.
#[test]
fn client_role() {
    let Ok(role) = std::env::var("PARSEC_TEST_ROLE") else {
        return;
    };
    let socket = PathBuf::from(std::env::var("PARSEC_TEST_SOCKET").unwrap());
    std::env::set_var(
        "PARSEC_SERVICE_ENDPOINT",
        format!("unix:{}", socket.display()),
    );
    // As a deployed application would: the client picks UnixPeerCredentials itself.
    let client = parsec_client::BasicClient::new(None).expect("client");
    let alg = AsymmetricSignature::Ecdsa {
        hash_alg: Hash::Sha256.into(),
    };
    match role.as_str() {
        "create" => {
            client.psa_generate_key("shared", p256()).unwrap();
            client.psa_sign_hash("shared", &[1u8; 32], alg).unwrap();
        }
        "intrude" => {
            println!("saw_keys={}", client.list_keys().unwrap().len());
            let status = match client.psa_sign_hash("shared", &[1u8; 32], alg) {
                Err(Error::Service(status)) => format!("{status:?}"),
                other => format!("{other:?}"),
            };
            println!("sign_status={status}");
            client.psa_generate_key("shared", p256()).unwrap();
            // Claim to be UID 0 on the wire: the kernel says otherwise.
            let mut stream = UnixStream::connect(&socket).unwrap();
            let frame = [
                header(0, 0x1A, 0, 3, 4).to_vec(),
                0u32.to_le_bytes().to_vec(),
            ]
            .concat();
            stream.write_all(&frame).unwrap();
            let mut response = Vec::new();
            stream.read_to_end(&mut response).unwrap();
            println!("spoof_status={}", status_of(&response));
        }
        "check" => {}
        other => panic!("unknown role {other}"),
    }
    println!(
        "public={:02x?}",
        client.psa_export_public_key("shared").unwrap()
    );
}
