//! A TPM as slow as a real one: a TCP proxy between the service and swtpm that holds each
//! TPM command for a time chosen by its command code before passing it on.
//!
//! swtpm answers in microseconds to milliseconds (an RSA-2048 Create in ~0.35 s); a discrete
//! SPI TPM (Infineon SLB 9670 class, the Raspberry Pi board config) takes seconds for an RSA
//! key, tens of milliseconds for an ECDSA sign. [`REAL_TPM`] is such a table: RSA key
//! creation ~3 s (datasheets give typical 2-5 s and worst cases beyond 20 s for RSA-2048
//! generation), Sign ~80 ms, everything else ~5 ms (SPI transfer and command overhead).
//!
//! The proxy speaks what tpm2-tss's swtpm TCTI speaks: raw TPM commands on the server port
//! (header: tag u16, size u32, command code u32, big-endian), and swtpm's control protocol on
//! the next port, passed through untouched. It counts commands begun and finished, so a
//! test can tell "the device is busy" without guessing from the clock.
//!
//! Used by `parsec-bench-isolation` and, through a `#[path]` module, by the service's tests.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const TPM2_CC_CREATE_PRIMARY: u32 = 0x131;
pub const TPM2_CC_CREATE: u32 = 0x153;
pub const TPM2_CC_SIGN: u32 = 0x15D;
pub const TPM2_CC_GET_RANDOM: u32 = 0x17B;

/// Delays of a discrete SPI TPM (see the module's notes), in milliseconds.
pub const REAL_TPM: &[(u32, u64)] = &[
    (TPM2_CC_CREATE, 3000),
    (TPM2_CC_CREATE_PRIMARY, 3000),
    (TPM2_CC_SIGN, 80),
];
pub const REAL_TPM_OTHER_MS: u64 = 5;

#[derive(Default)]
pub struct Counters {
    /// Delayed commands (those in the table) begun and answered.
    pub slow_begun: AtomicUsize,
    pub slow_done: AtomicUsize,
    /// Commands passed on, by command code.
    pub by_code: std::sync::Mutex<std::collections::HashMap<u32, usize>>,
}

pub struct SlowTpm {
    pub port: u16,
    pub counters: Arc<Counters>,
}

impl SlowTpm {
    /// A proxy in front of the swtpm on `upstream` (its server port; control on the next).
    pub fn start(upstream: u16, table: &'static [(u32, u64)], other_ms: u64) -> SlowTpm {
        let port = free_port_pair();
        let counters = Arc::new(Counters::default());
        let commands = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let control = TcpListener::bind(("127.0.0.1", port + 1)).unwrap();
        let c = Arc::clone(&counters);
        std::thread::spawn(move || {
            for client in commands.incoming().flatten() {
                let c = Arc::clone(&c);
                std::thread::spawn(move || {
                    let _ = relay_commands(client, upstream, table, other_ms, &c);
                });
            }
        });
        std::thread::spawn(move || {
            for client in control.incoming().flatten() {
                std::thread::spawn(move || {
                    let _ = pass_through(client, upstream + 1);
                });
            }
        });
        SlowTpm { port, counters }
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn slow_in_flight(&self) -> bool {
        self.counters.slow_begun.load(Ordering::SeqCst)
            > self.counters.slow_done.load(Ordering::SeqCst)
    }

    /// How many commands of this code the service has sent.
    pub fn count(&self, code: u32) -> usize {
        self.counters
            .by_code
            .lock()
            .unwrap()
            .get(&code)
            .copied()
            .unwrap_or(0)
    }

    pub fn slow_done(&self) -> usize {
        self.counters.slow_done.load(Ordering::SeqCst)
    }
}

/// Two consecutive free TCP ports on loopback (the proxy's command and control ports).
fn free_port_pair() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// One TPM message: a 10-byte header whose bytes 2..6 are the whole size, then the rest.
fn read_message(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut message = vec![0u8; 10];
    stream.read_exact(&mut message)?;
    let size = u32::from_be_bytes(message[2..6].try_into().unwrap()) as usize;
    if !(10..=64 * 1024).contains(&size) {
        return Err(std::io::Error::other(format!("TPM message size {size}")));
    }
    message.resize(size, 0);
    stream.read_exact(&mut message[10..])?;
    Ok(message)
}

fn relay_commands(
    mut client: TcpStream,
    upstream: u16,
    table: &[(u32, u64)],
    other_ms: u64,
    counters: &Counters,
) -> std::io::Result<()> {
    let mut tpm = TcpStream::connect(("127.0.0.1", upstream))?;
    loop {
        let command = read_message(&mut client)?;
        let code = u32::from_be_bytes(command[6..10].try_into().unwrap());
        *counters.by_code.lock().unwrap().entry(code).or_default() += 1;
        let slow = table.iter().find(|(c, _)| *c == code).map(|(_, ms)| *ms);
        if slow.is_some() {
            counters.slow_begun.fetch_add(1, Ordering::SeqCst);
        }
        std::thread::sleep(Duration::from_millis(slow.unwrap_or(other_ms)));
        tpm.write_all(&command)?;
        let response = read_message(&mut tpm)?;
        client.write_all(&response)?;
        if slow.is_some() {
            counters.slow_done.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn pass_through(client: TcpStream, upstream: u16) -> std::io::Result<()> {
    let tpm = TcpStream::connect(("127.0.0.1", upstream))?;
    let (mut from_client, mut to_tpm) = (client.try_clone()?, tpm.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_tpm);
        // swtpm serves one control connection at a time and does not close it when the
        // client half-closes: close it here, or the next client's control connection (a
        // provider instance started after a reload) waits forever.
        let _ = to_tpm.shutdown(std::net::Shutdown::Both);
    });
    let (mut from_tpm, mut to_client) = (tpm, client);
    let _ = std::io::copy(&mut from_tpm, &mut to_client);
    let _ = up.join();
    Ok(())
}
