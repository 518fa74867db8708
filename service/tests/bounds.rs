//! Every resource has a bound, and hitting it loses nothing: the software provider's key
//! generation processes (`max_keygen_processes`) and the request bytes held across all
//! connections (`connection_buffer_budget`). Each bound is hit, logged with its key, and
//! the service recovers.
#![cfg(feature = "mbed-crypto-provider")]

mod common;

use common::{attributes, header, ping_frame, service_error, status_of, Daemon};
use parsec_client::core::interface::operations::psa_algorithm::{AsymmetricSignature, Hash};
use parsec_client::core::interface::operations::psa_key_attributes::Type;
use parsec_client::core::interface::requests::ResponseStatus;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn rsa(bits: usize) -> parsec_client::core::interface::operations::psa_key_attributes::Attributes {
    attributes(
        Type::RsaKeyPair,
        bits,
        AsymmetricSignature::RsaPkcs1v15Sign {
            hash_alg: Hash::Sha256.into(),
        },
    )
}

fn with_core(text: String, lines: &str) -> String {
    text.replace("[core_settings]\n", &format!("[core_settings]\n{lines}"))
}

#[test]
fn key_generation_processes_are_bounded() {
    let daemon = Daemon::start_edited("bounds-keygen", "Direct", &["admin"], |text| {
        with_core(text, "max_keygen_processes = 1\n")
    });
    let first = daemon.client("alice");
    // RSA-4096 in a child process: seconds with this (unoptimised) build's Mbed TLS.
    let running = std::thread::spawn(move || first.psa_generate_key("big", rsa(4096)));
    let until = Instant::now() + Duration::from_secs(20);
    while daemon.children().is_empty() {
        assert!(Instant::now() < until, "no key generation process appeared");
        std::thread::sleep(Duration::from_millis(2));
    }
    let second = daemon.client("bob");
    let refused = second.psa_generate_key("other", rsa(2048));
    if running.is_finished() {
        // The child ended before the second request was dispatched: nothing to conclude.
        panic!("the RSA-4096 generation ended too soon to test the bound");
    }
    assert_eq!(
        service_error(refused.unwrap_err()),
        ResponseStatus::PsaErrorInsufficientMemory
    );
    assert!(daemon
        .log_text()
        .contains("core_settings.max_keygen_processes = 1"));
    running.join().unwrap().unwrap();
    // Recovered: the place is free again.
    second.psa_generate_key("other", rsa(2048)).unwrap();
    assert!(daemon.children().is_empty());
}

#[test]
fn past_the_buffer_budget_reading_waits_and_nothing_is_dropped() {
    const BODY: u32 = 60 * 1024;
    let daemon = Daemon::start_edited("bounds-budget", "Direct", &["admin"], |text| {
        with_core(
            text,
            "body_len_limit = 65536\nconnection_buffer_budget = 65536\n",
        )
    });
    // X announces a 60 KiB body and sends none of it: its payload is reserved.
    let mut x = UnixStream::connect(&daemon.socket).unwrap();
    x.write_all(&header(0, 1, BODY, 0, 0)).unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // Y sends a whole 60 KiB request: there is no room for it while X holds its share.
    let mut y = UnixStream::connect(&daemon.socket).unwrap();
    y.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut request = header(0, 1, BODY, 0, 0).to_vec();
    request.resize(36 + BODY as usize, 0x55);
    y.write_all(&request).unwrap();

    // A small request is answered at once meanwhile (it needs no room).
    assert_eq!(status_of(&daemon.raw(&ping_frame())), 0);

    let mut response = Vec::new();
    let early = y.read_to_end(&mut response);
    assert!(
        early.is_err() && response.is_empty(),
        "Y was read and answered while the budget was spent: {early:?} {} bytes",
        response.len()
    );
    assert!(daemon
        .log_text()
        .contains("core_settings.connection_buffer_budget = 65536"));

    // X's deadline (listener.timeout, 1 s) closes it and frees its share: Y is read and
    // answered, not dropped.
    y.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    y.read_to_end(&mut response).unwrap();
    assert!(response.len() >= 36, "Y got no answer");
    drop(x);
    assert_eq!(status_of(&daemon.raw(&ping_frame())), 0);
}
