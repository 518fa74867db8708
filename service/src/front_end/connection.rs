//! One client connection: read exactly one request without blocking, then write one
//! response. Reads never go past the bytes the header announced, and the body buffer grows
//! only as bytes arrive, so a client announcing a large body and sending nothing costs
//! nothing.

use super::framing::{self, HEADER_LEN};
use crate::authenticators::PeerCredentials;
use mio::net::UnixStream;
use parsec_interface::requests::ResponseStatus;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::Instant;

/// How much of the payload is read per `read` call at most.
const CHUNK: usize = 16 * 1024;

/// The bytes of requests the service may hold across all its connections
/// (`core_settings.connection_buffer_budget`). A connection reserves its whole payload when
/// its header is in, before reading any of it, and holds it until its response is sent;
/// when the budget cannot take it, the connection waits (nothing more is read from it)
/// until others give theirs back. The rules, so that no client can stall another:
/// - a payload of at most [`SMALL_PAYLOAD`] bytes (a ping, a listing, a sign, most requests)
///   is always admitted: the budget bounds the large ones (and small ones add at most
///   `max_connections` x `SMALL_PAYLOAD`);
/// - one client (a process, by its peer credentials) may hold at most half the budget, so
///   that a client whose requests queue behind a busy device leaves room for the others; its
///   first request is admitted whatever its size if the budget has room for it;
/// - one request is always admitted when nothing else is held, so a full-size request is
///   never stuck.
#[derive(Debug)]
pub struct Budget {
    pub limit: usize,
    pub used: usize,
    /// Bytes held, by client.
    held: HashMap<u64, usize>,
}

/// Payloads this small never wait for the budget.
pub const SMALL_PAYLOAD: usize = 4096;

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget {
            limit,
            used: 0,
            held: HashMap::new(),
        }
    }

    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX)
    }

    /// The most one client may hold.
    pub fn share(&self) -> usize {
        self.limit / 2
    }

    fn try_reserve(&mut self, client: u64, bytes: usize) -> bool {
        let mine = self.held.get(&client).copied().unwrap_or(0);
        let fits = self.used.saturating_add(bytes) <= self.limit;
        let within_share = mine == 0 || mine.saturating_add(bytes) <= self.share();
        if bytes <= SMALL_PAYLOAD || self.used == 0 || (fits && within_share) {
            self.used = self.used.saturating_add(bytes);
            *self.held.entry(client).or_default() += bytes;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, client: u64, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
        if let Some(mine) = self.held.get_mut(&client) {
            *mine = mine.saturating_sub(bytes);
            if *mine == 0 {
                self.held.remove(&client);
            }
        }
    }
}

enum State {
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    Payload {
        frame: Vec<u8>,
        total: usize,
    },
    /// The header is in; the payload waits for room in the budget.
    Stalled {
        header: [u8; HEADER_LEN],
        total: usize,
    },
    /// The whole request is in; it waits in the server's queue for its turn.
    Queued,
    Writing {
        out: Vec<u8>,
        written: usize,
    },
}

/// What reading produced so far.
pub enum Progress {
    /// The request is not complete yet; wait for the socket to be readable again.
    Pending,
    /// A complete frame: header, body and auth.
    Frame(Vec<u8>),
    /// The header is unacceptable: answer with this status, read nothing more.
    Reject(ResponseStatus),
    /// The client closed the connection before sending a whole request.
    Closed,
    /// The buffer budget is spent: read again once other connections have closed.
    Stalled,
}

/// One connection, over a Unix socket in the service, over any byte stream in tests and
/// fuzzing: the same code reads, frames and writes.
pub struct Connection<S = UnixStream> {
    pub stream: S,
    pub peer: Option<PeerCredentials>,
    /// When the client must have sent its request (and read its response) by.
    pub deadline: Instant,
    /// Payload bytes reserved in the budget (given back when the connection closes).
    pub reserved: usize,
    state: State,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S, peer: Option<PeerCredentials>, deadline: Instant) -> Self {
        Connection {
            stream,
            peer,
            deadline,
            reserved: 0,
            state: State::Header {
                buf: [0; HEADER_LEN],
                filled: 0,
            },
        }
    }

    pub fn is_writing(&self) -> bool {
        matches!(self.state, State::Writing { .. })
    }

    /// Who the budget counts this connection's bytes against: its process (by peer
    /// credentials), or its user when the pid is unknown.
    pub fn client(&self) -> u64 {
        match self.peer {
            Some(peer) if peer.pid > 0 => peer.pid as u64,
            Some(peer) => (1 << 32) | u64::from(peer.uid),
            None => 1 << 33,
        }
    }

    /// True while the connection waits for room in the buffer budget.
    pub fn is_stalled(&self) -> bool {
        matches!(self.state, State::Stalled { .. })
    }

    /// True once the request is complete and waiting to be answered.
    pub fn is_queued(&self) -> bool {
        matches!(self.state, State::Queued)
    }

    /// Marks the request as handed to the server's queue: nothing more is read.
    pub fn queue(&mut self) {
        self.state = State::Queued;
    }

    /// Reads what the socket has, up to the end of the request.
    pub fn read(&mut self, body_len_limit: usize, budget: &mut Budget) -> io::Result<Progress> {
        let client = self.client();
        loop {
            match &mut self.state {
                State::Header { buf, filled } => {
                    let n = match read_some(&mut self.stream, &mut buf[*filled..])? {
                        Some(0) => return Ok(Progress::Closed),
                        Some(n) => n,
                        None => return Ok(Progress::Pending),
                    };
                    *filled += n;
                    if *filled < HEADER_LEN {
                        continue;
                    }
                    let payload = match framing::payload_len(buf, body_len_limit) {
                        Ok(len) => len,
                        Err(status) => return Ok(Progress::Reject(status)),
                    };
                    self.state = State::Stalled {
                        header: *buf,
                        total: HEADER_LEN + payload,
                    };
                }
                State::Stalled { header, total } => {
                    let payload = *total - HEADER_LEN;
                    if !budget.try_reserve(client, payload) {
                        return Ok(Progress::Stalled);
                    }
                    self.reserved = payload;
                    let mut frame = Vec::with_capacity((*total).min(HEADER_LEN + CHUNK));
                    frame.extend_from_slice(header);
                    self.state = State::Payload {
                        frame,
                        total: *total,
                    };
                }
                State::Payload { frame, total } => {
                    if frame.len() == *total {
                        return Ok(Progress::Frame(std::mem::take(frame)));
                    }
                    let want = (*total - frame.len()).min(CHUNK);
                    let start = frame.len();
                    frame.resize(start + want, 0);
                    let result = read_some(&mut self.stream, &mut frame[start..]);
                    let n = match result {
                        Ok(Some(n)) => n,
                        Ok(None) => 0,
                        Err(e) => {
                            frame.truncate(start);
                            return Err(e);
                        }
                    };
                    frame.truncate(start + n);
                    match result {
                        Ok(Some(0)) => return Ok(Progress::Closed),
                        Ok(None) => return Ok(Progress::Pending),
                        _ => {}
                    }
                }
                State::Queued | State::Writing { .. } => return Ok(Progress::Pending),
            }
        }
    }

    /// Queues the response; `write` sends it.
    pub fn respond(&mut self, out: Vec<u8>) {
        self.state = State::Writing { out, written: 0 };
    }

    /// Writes what the socket accepts; `Ok(true)` once the whole response is sent.
    pub fn write(&mut self) -> io::Result<bool> {
        let State::Writing { out, written } = &mut self.state else {
            return Ok(false);
        };
        while *written < out.len() {
            match self.stream.write(&out[*written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => *written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// One non-blocking read: `None` when nothing is available yet.
fn read_some(stream: &mut impl Read, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        match stream.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_are_admitted_when_the_budget_is_full() {
        let mut budget = Budget::new(10_000);
        assert!(budget.try_reserve(1, 9_000));
        assert!(!budget.try_reserve(2, 5_000), "a large one waits");
        assert!(
            budget.try_reserve(2, SMALL_PAYLOAD),
            "a small one never waits"
        );
    }

    #[test]
    fn one_client_holds_at_most_half_and_others_get_the_rest() {
        let mut budget = Budget::new(10_000);
        assert!(budget.try_reserve(1, 4_500));
        assert!(!budget.try_reserve(1, 4_500), "over its share");
        assert!(budget.try_reserve(2, 4_500), "another client's room");
        assert!(!budget.try_reserve(3, 4_500), "the budget is full");
        budget.release(1, 4_500);
        assert!(budget.try_reserve(3, 4_500));
        assert_eq!(budget.used, 9_000);
    }

    #[test]
    fn one_request_of_any_size_is_admitted_when_nothing_is_held() {
        let mut budget = Budget::new(10_000);
        assert!(budget.try_reserve(1, 50_000));
        budget.release(1, 50_000);
        assert_eq!(budget.used, 0);
        assert!(budget.held.is_empty());
    }
}
