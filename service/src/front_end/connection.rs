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

enum State {
    Header {
        buf: [u8; HEADER_LEN],
        filled: usize,
    },
    Payload {
        frame: Vec<u8>,
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
}

/// One connection, over a Unix socket in the service, over any byte stream in tests and
/// fuzzing: the same code reads, frames and writes.
pub struct Connection<S = UnixStream> {
    pub stream: S,
    pub peer: Option<PeerCredentials>,
    /// When the client must have sent its request (and read its response) by.
    pub deadline: Instant,
    state: State,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S, peer: Option<PeerCredentials>, deadline: Instant) -> Self {
        Connection {
            stream,
            peer,
            deadline,
            state: State::Header {
                buf: [0; HEADER_LEN],
                filled: 0,
            },
        }
    }

    pub fn is_writing(&self) -> bool {
        matches!(self.state, State::Writing { .. })
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
    pub fn read(&mut self, body_len_limit: usize) -> io::Result<Progress> {
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
                    let total = HEADER_LEN + payload;
                    let mut frame = Vec::with_capacity(total.min(HEADER_LEN + CHUNK));
                    frame.extend_from_slice(buf);
                    self.state = State::Payload { frame, total };
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
