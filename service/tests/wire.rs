//! Raw-socket tests of the front end: malformed headers, oversized and truncated requests,
//! silent clients.

mod common;

use common::{header, ping_frame, status_of, Daemon};
use parsec_client::core::interface::requests::ResponseStatus;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn expect(daemon: &Daemon, frame: &[u8], status: ResponseStatus) {
    let response = daemon.raw(frame);
    assert_eq!(status_of(&response), status as u16, "frame {frame:02x?}");
}

#[test]
fn each_malformed_header_gets_its_own_status() {
    let daemon = Daemon::start("malformed");
    let ping = header(0, 1, 0, 0, 0);

    let mut bad_magic = ping;
    bad_magic[0] ^= 0xff;
    expect(&daemon, &bad_magic, ResponseStatus::InvalidHeader);

    let mut bad_size = ping;
    bad_size[4] = 28;
    expect(&daemon, &bad_size, ResponseStatus::InvalidHeader);

    let mut bad_version = ping;
    bad_version[6] = 2;
    expect(
        &daemon,
        &bad_version,
        ResponseStatus::WireProtocolVersionNotSupported,
    );
    let mut bad_minor = ping;
    bad_minor[7] = 1;
    expect(
        &daemon,
        &bad_minor,
        ResponseStatus::WireProtocolVersionNotSupported,
    );

    let mut reserved = ping;
    reserved[34] = 1;
    expect(&daemon, &reserved, ResponseStatus::InvalidHeader);
    let mut reserved = ping;
    reserved[35] = 1;
    expect(&daemon, &reserved, ResponseStatus::InvalidHeader);

    expect(
        &daemon,
        &header(200, 1, 0, 0, 0),
        ResponseStatus::ProviderDoesNotExist,
    );
    expect(
        &daemon,
        &header(0, 0xABCD, 0, 0, 0),
        ResponseStatus::OpcodeDoesNotExist,
    );
    expect(
        &daemon,
        &header(0, 1, 0, 9, 0),
        ResponseStatus::AuthenticatorDoesNotExist,
    );
    let mut content = ping;
    content[19] = 7;
    expect(&daemon, &content, ResponseStatus::ContentTypeNotSupported);
    let mut accept = ping;
    accept[20] = 7;
    expect(&daemon, &accept, ResponseStatus::AcceptTypeNotSupported);

    // A provider that exists in the protocol but is not enabled here.
    expect(
        &daemon,
        &header(3, 2, 0, 1, 1)
            .iter()
            .copied()
            .chain(*b"a")
            .collect::<Vec<_>>(),
        ResponseStatus::ProviderNotRegistered,
    );
    // As upstream Parsec 1.5.0: a crypto operation sent to the core provider, and a core one
    // (ListKeys, ListClients) sent to a crypto provider, are not supported there; a Ping to
    // a provider that is not enabled finds no provider.
    expect(
        &daemon,
        &[header(0, 2, 0, 1, 1).to_vec(), b"a".to_vec()].concat(),
        ResponseStatus::PsaErrorNotSupported,
    );
    for opcode in [0x1A_u32, 0x1B] {
        expect(
            &daemon,
            &[header(1, opcode, 0, 1, 1).to_vec(), b"a".to_vec()].concat(),
            ResponseStatus::PsaErrorNotSupported,
        );
    }
    expect(
        &daemon,
        &header(2, 1, 0, 0, 0),
        ResponseStatus::ProviderNotRegistered,
    );
    // A body that is not the protobuf of its opcode.
    expect(
        &daemon,
        &[
            header(1, 2, 3, 1, 1).to_vec(),
            vec![0xff, 0xff, 0xff],
            b"a".to_vec(),
        ]
        .concat(),
        ResponseStatus::DeserializingBodyFailed,
    );

    // Flags and status in a request are ignored.
    let mut noisy = ping;
    noisy[8] = 0xff;
    noisy[9] = 0xff;
    noisy[32] = 0x12;
    noisy[33] = 0x34;
    expect(&daemon, &noisy, ResponseStatus::Success);

    // After all that, the service still serves.
    expect(&daemon, &ping_frame(), ResponseStatus::Success);
}

#[test]
fn an_oversized_body_is_refused_before_it_is_sent() {
    let daemon = Daemon::start("oversized");
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // 1 MiB + 1 announced, nothing sent after the header: the answer must not wait for it.
    stream
        .write_all(&header(1, 2, (1 << 20) + 1, 1, 1))
        .unwrap();
    let start = Instant::now();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert_eq!(
        status_of(&response),
        ResponseStatus::BodySizeExceedsLimit as u16
    );
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "answered only after the read deadline"
    );
    expect(&daemon, &ping_frame(), ResponseStatus::Success);
}

#[test]
fn a_truncated_request_is_dropped_and_costs_nothing() {
    let daemon = Daemon::start("truncated");
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&header(1, 2, 100, 1, 1)).unwrap();
    stream.write_all(&[0u8; 40]).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert!(
        response.is_empty(),
        "no response to half a request: {response:?}"
    );
    // Half a header, then silence until the deadline: the client is told and closed.
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(&ping_frame()[..20]).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert_eq!(status_of(&response), ResponseStatus::ConnectionError as u16);
    expect(&daemon, &ping_frame(), ResponseStatus::Success);
}

#[test]
fn a_silent_client_does_not_delay_others() {
    let daemon = Daemon::start("silent");
    let client = daemon.client("app");
    // Several clients connect and say nothing (or half a header).
    let mut silent: Vec<UnixStream> = (0..8)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    silent[0].write_all(&ping_frame()[..10]).unwrap();
    let start = Instant::now();
    for _ in 0..50 {
        assert_eq!(client.ping().unwrap(), (1, 0));
    }
    let elapsed = start.elapsed();
    // 50 pings while 8 connections hang: far less than one read deadline (1 s).
    assert!(
        elapsed < Duration::from_millis(800),
        "50 pings took {elapsed:?}"
    );
    // The silent connections are closed by the read deadline.
    for stream in &mut silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let closed_at = Instant::now();
        stream.read_to_end(&mut rest).unwrap();
        assert!(closed_at.elapsed() < Duration::from_secs(3));
    }
    assert!(daemon
        .log_text()
        .contains("sent no complete request within 1000 ms"));
}

#[test]
fn the_connection_cap_closes_extra_clients_at_once_and_recovers() {
    let daemon = Daemon::start_edited("cap", "Direct", &[], |text| {
        text.replace("timeout = 1000", "timeout = 1000\nmax_connections = 4")
    });
    let held: Vec<UnixStream> = (0..4)
        .map(|_| UnixStream::connect(&daemon.socket).unwrap())
        .collect();
    // Let the service accept the four before the fifth arrives.
    std::thread::sleep(Duration::from_millis(100));
    let mut extra = UnixStream::connect(&daemon.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let start = Instant::now();
    let _ = extra.write_all(&ping_frame());
    let mut response = Vec::new();
    let _ = extra.read_to_end(&mut response);
    assert!(response.is_empty(), "a refused client gets a closed socket");
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "refusal took {:?}",
        start.elapsed()
    );
    assert!(daemon.log_text().contains("listener.max_connections = 4"));
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    expect(&daemon, &ping_frame(), ResponseStatus::Success);
}

/// Under a descriptor limit too low for `listener.max_connections` (64 descriptors, 256
/// connections configured), the service serves what fits, says so, and closes the clients
/// beyond at once: each gets end-of-stream, none waits unanswered. Before, accept failed
/// with EMFILE and every later client hung until its own timeout (31.9 s measured).
#[test]
fn a_descriptor_limit_below_max_connections_lowers_the_cap_and_answers_everyone() {
    let mut daemon = Daemon::start("wire-nofile");
    daemon.stop();
    daemon.nofile = Some(64);
    daemon.spawn();
    let log = daemon.log_text();
    assert!(
        log.contains("leaves room for") && log.contains("not listener.max_connections = 256"),
        "{log}"
    );
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..80 {
        let stream = UnixStream::connect(&daemon.socket).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        held.push(stream);
    }
    std::thread::sleep(Duration::from_millis(200));
    for stream in &mut held {
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => closed += 1,
            // Its deadline passed: answered (ConnectionError), not left waiting.
            Ok(_) => {}
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{e}"
            ),
        }
    }
    // The connections beyond the cap were closed; the others are open and served.
    assert!(
        closed >= 80 - 64,
        "only {closed} of 80 connections were closed"
    );
    assert!(closed < 80, "every connection was closed");
    for stream in held.iter_mut().take(4) {
        let _ = stream.write_all(&ping_frame());
    }
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    expect(&daemon, &ping_frame(), ResponseStatus::Success);
}

/// A client that shuts down its writing side after its request (as some socket tools do)
/// still waits for the answer: it is served, not taken for a client that hung up.
#[test]
fn a_client_that_half_closes_still_gets_its_answer() {
    let daemon = Daemon::start("wire-half-close");
    let mut stream = UnixStream::connect(&daemon.socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&ping_frame()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    assert_eq!(status_of(&response), ResponseStatus::Success as u16);
}
