//! One client connection: read exactly one request without blocking, then write one
//! response. Reads never go past the bytes the header announced, and the body buffer grows
//! only as bytes arrive, so a client announcing a large body and sending nothing costs
//! nothing.

use super::framing::{self, HEADER_LEN};
use crate::authenticators::PeerCredentials;
use mio::net::UnixStream;
use parsec_interface::requests::ResponseStatus;
use std::io::{self, Read, Write};
use std::time::Instant;

/// How much of the payload is read per `read` call at most.
const CHUNK: usize = 16 * 1024;

/// The bytes of requests the service may hold across all its connections
/// (`core_settings.connection_buffer_budget`). A connection reserves its whole payload when
/// its header is in, before reading any of it; when the budget cannot take it, the
/// connection waits (nothing more is read from it) until others close. One request is
/// always admitted when nothing else is held, so a full-size request is never stuck.
#[derive(Debug)]
pub struct Budget {
    pub limit: usize,
    pub used: usize,
}

impl Budget {
    pub fn new(limit: usize) -> Budget {
        Budget { limit, used: 0 }
    }

    pub fn unlimited() -> Budget {
        Budget::new(usize::MAX)
    }

    fn try_reserve(&mut self, bytes: usize) -> bool {
        if self.used == 0 || self.used.saturating_add(bytes) <= self.limit {
            self.used += bytes;
            true
        } else {
            false
        }
    }

    pub fn release(&mut self, bytes: usize) {
        self.used = self.used.saturating_sub(bytes);
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
                    if !budget.try_reserve(payload) {
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
