//! The key store's entry decoder on any bytes: a damaged entry is bad input too. Each input is
//! tried as a whole file and, framed with a correct header (magic, length, CRC-32), as a
//! payload, so that the fuzzer reaches the payload decoder past the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use parsec_service::key_store::{check_entry, frame_payload};

fuzz_target!(|data: &[u8]| {
    let _ = check_entry(data);
    let _ = check_entry(&frame_payload(data));
});
