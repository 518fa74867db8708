//! The front end: the socket, the event loop and the wire framing.
//!
//! Data flows one way: `server` accepts a connection, `connection` reads one frame without
//! blocking, `framing` checks and decodes it, the dispatcher answers, and `connection`
//! writes the response back before the socket is closed.

pub mod connection;
pub mod fd_limit;
pub mod framing;
pub mod server;
pub mod systemd;

use crate::authenticators::PeerCredentials;
use crate::dispatcher::{Dispatched, Dispatcher, PendingRequest};
use connection::{Connection, Progress};
use parsec_interface::requests::Response;
use std::io::{self, Read, Write};

/// Answers one complete frame: decode it, dispatch it, or say why it cannot be decoded.
pub fn answer_frame(
    dispatcher: &mut Dispatcher,
    frame: &[u8],
    peer: Option<PeerCredentials>,
    body_len_limit: usize,
) -> Dispatched {
    match framing::decode(frame, body_len_limit) {
        Ok(request) => dispatcher.dispatch(request, peer),
        Err(status) => {
            log::warn!("request rejected: status={status:?} ({status})");
            Dispatched::Done(Response::from_status(status))
        }
    }
}

/// Waits for a deferred request's child and finishes it (for in-process use: the server
/// watches the pipe in its event loop instead).
pub fn finish_blocking(dispatcher: &mut Dispatcher, mut pending: PendingRequest) -> Dispatched {
    let mut output = Vec::new();
    let _ = pending.job.output.read_to_end(&mut output);
    dispatcher.complete(pending, output)
}

/// Waits until a request is answered, whatever it went through (in-process use).
pub fn wait_blocking(dispatcher: &mut Dispatcher, dispatched: Dispatched) -> Response {
    match dispatched {
        Dispatched::Done(response) => response,
        Dispatched::Queued(ticket) => dispatcher.wait_for(ticket),
        Dispatched::Deferred(pending) => match finish_blocking(dispatcher, pending) {
            Dispatched::Done(response) => response,
            Dispatched::Queued(ticket) => dispatcher.wait_for(ticket),
            // `complete` hands the result to a worker; it never defers again.
            Dispatched::Deferred(_) => Response::from_status(
                parsec_interface::requests::ResponseStatus::PsaErrorGenericError,
            ),
        },
    }
}

/// A connection's bytes as a stream: reads hand out at most `chunk` bytes at a time (so
/// requests arrive in pieces, as they may on a socket), writes are collected.
struct ByteStream<'a> {
    input: &'a [u8],
    chunk: usize,
    output: Vec<u8>,
}

impl Read for ByteStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for ByteStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs the bytes a client sends on one connection through the front end in-process,
/// exactly as the server would (connection state machine, framing, decoding,
/// authentication, dispatch), and returns what the client would read back. Empty when
/// the bytes end before a whole request, as a closed connection gets no answer.
pub fn answer_stream(
    dispatcher: &mut Dispatcher,
    input: &[u8],
    chunk: usize,
    peer: Option<PeerCredentials>,
    body_len_limit: usize,
) -> Vec<u8> {
    let stream = ByteStream {
        input,
        chunk: chunk.max(1),
        output: Vec::new(),
    };
    let mut connection = Connection::new(stream, peer, std::time::Instant::now());
    let response = match connection.read(body_len_limit, &mut connection::Budget::unlimited()) {
        Ok(Progress::Frame(frame)) => {
            let dispatched = answer_frame(dispatcher, &frame, peer, body_len_limit);
            wait_blocking(dispatcher, dispatched)
        }
        Ok(Progress::Reject(status)) => Response::from_status(status),
        Ok(Progress::Pending | Progress::Closed | Progress::Stalled) | Err(_) => return Vec::new(),
    };
    connection.respond(framing::encode(response));
    let _ = connection.write();
    connection.stream.output
}
