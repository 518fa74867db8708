//! The wire protocol's framing: a fixed 36-byte header announcing how many body and auth
//! bytes follow. The header is checked as soon as it is complete, before any body byte is
//! read, so an oversized or malformed request is answered without buffering its body.
//! Decoding itself is parsec-interface's.

use parsec_interface::requests::common::wire_header_1_0::WireHeader;
use parsec_interface::requests::{Request, Response, ResponseStatus};

/// Length of a request header on the wire, magic number included.
pub const HEADER_LEN: usize = 36;
const MAGIC: u32 = 0x5EC0_A710;
/// The header size field counts the bytes after itself.
const HEADER_SIZE_FIELD: u16 = 30;

/// Checks a complete header and returns how many bytes (body and auth) follow it.
///
/// Each malformation gets the status upstream clients expect: a bad magic number, header
/// size or non-zero reserved bytes give `InvalidHeader`, an unknown version
/// `WireProtocolVersionNotSupported`, a body over the limit `BodySizeExceedsLimit`.
pub fn payload_len(
    header: &[u8; HEADER_LEN],
    body_len_limit: usize,
) -> Result<usize, ResponseStatus> {
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if magic != MAGIC {
        log::debug!("framing: bad magic number {magic:#010x}");
        return Err(ResponseStatus::InvalidHeader);
    }
    let size = u16::from_le_bytes([header[4], header[5]]);
    if size != HEADER_SIZE_FIELD {
        log::debug!("framing: header size {size}, expected {HEADER_SIZE_FIELD}");
        return Err(ResponseStatus::InvalidHeader);
    }
    // Version and reserved bytes are checked by the reference implementation.
    let raw = WireHeader::read_from_stream(&mut &header[..])?;
    let body_len = raw.body_len as usize;
    if body_len > body_len_limit {
        log::debug!("framing: body of {body_len} bytes over the limit of {body_len_limit}");
        return Err(ResponseStatus::BodySizeExceedsLimit);
    }
    Ok(body_len + raw.auth_len as usize)
}

/// Whether a complete frame asks for a cheap core operation (ping, the listings), which the
/// event loop answers before queued cryptographic work.
pub fn is_cheap(frame: &[u8]) -> bool {
    let Some(opcode) = frame.get(28..32) else {
        return false;
    };
    // The core provider's table says which.
    crate::dispatcher::is_cheap_opcode(u32::from_le_bytes([
        opcode[0], opcode[1], opcode[2], opcode[3],
    ]))
}

/// Decodes a complete frame (header, body and auth) whose header `payload_len` accepted.
pub fn decode(frame: &[u8], body_len_limit: usize) -> Result<Request, ResponseStatus> {
    Request::read_from_stream(&mut &frame[..], body_len_limit)
}

/// Encodes a response, header and body, ready to write to the socket.
pub fn encode(response: Response) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_LEN + response.body.len());
    if let Err(status) = response.write_to_stream(&mut bytes) {
        // Only a body over 4 GiB can fail to encode; answer with the status alone.
        bytes.clear();
        let _ = Response::from_status(status).write_to_stream(&mut bytes);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A valid Ping header with the given body and auth lengths.
    pub fn header(body_len: u32, auth_len: u16) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4..6].copy_from_slice(&30u16.to_le_bytes());
        h[6] = 1; // version 1.0
        h[22..26].copy_from_slice(&body_len.to_le_bytes());
        h[26..28].copy_from_slice(&auth_len.to_le_bytes());
        h[28..32].copy_from_slice(&1u32.to_le_bytes()); // Ping
        h
    }

    #[test]
    fn a_valid_header_announces_its_payload() {
        assert_eq!(payload_len(&header(10, 4), 100), Ok(14));
    }

    #[test]
    fn each_malformation_has_its_status() {
        let mut h = header(0, 0);
        h[0] = 0;
        assert_eq!(payload_len(&h, 100), Err(ResponseStatus::InvalidHeader));
        let mut h = header(0, 0);
        h[4] = 31;
        assert_eq!(payload_len(&h, 100), Err(ResponseStatus::InvalidHeader));
        let mut h = header(0, 0);
        h[6] = 2;
        assert_eq!(
            payload_len(&h, 100),
            Err(ResponseStatus::WireProtocolVersionNotSupported)
        );
        let mut h = header(0, 0);
        h[35] = 1;
        assert_eq!(payload_len(&h, 100), Err(ResponseStatus::InvalidHeader));
        assert_eq!(
            payload_len(&header(101, 0), 100),
            Err(ResponseStatus::BodySizeExceedsLimit)
        );
    }

    #[test]
    fn unknown_opcode_is_found_when_decoding() {
        let mut h = header(0, 0);
        h[28..32].copy_from_slice(&0xFFFFu32.to_le_bytes());
        assert_eq!(payload_len(&h, 100), Ok(0));
        assert_eq!(
            decode(&h, 100).unwrap_err(),
            ResponseStatus::OpcodeDoesNotExist
        );
    }
}
