//! File descriptors: each connection is one, so `listener.max_connections` is only true if
//! the process may open that many (plus what the service itself needs).
//!
//! At start-up and at every reload the soft limit is raised to the hard one; if that is
//! still too low, the service serves fewer connections than configured and says so, rather
//! than failing `accept` with EMFILE (a client left unanswered until its own timeout). And
//! should descriptors run out anyway (a PKCS#11 module opening files, a burst of key
//! generation pipes), one spare descriptor is kept: it is closed to accept the waiting
//! client and close it at once (the client sees end-of-stream and can retry), then opened
//! again.

use mio::net::UnixListener;
use std::fs::File;

/// Descriptors the service needs besides connections: the listener, epoll, the signal
/// pipe, the waker, the log, the spare, key store files in a commit, a device's socket or a
/// module's files; and two pipes' ends per key generation child.
fn reserved(max_keygen_processes: usize) -> u64 {
    32 + 2 * max_keygen_processes as u64
}

/// Raises the soft descriptor limit to the hard one and returns how many connections fit
/// (the configured number, or fewer with a warning).
// rlim_t is 32 bits on some targets (armv7): the casts are needed there.
#[allow(clippy::unnecessary_cast)]
pub fn connection_cap(max_connections: usize, max_keygen_processes: usize) -> usize {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return max_connections;
    };
    let mut limit = soft as u64;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        limit = hard as u64;
    }
    let reserved = reserved(max_keygen_processes);
    let fits = limit.saturating_sub(reserved).max(1);
    if (max_connections as u64) <= fits {
        return max_connections;
    }
    log::warn!(
        "the file descriptor limit ({limit}) leaves room for {fits} connections, not listener.max_connections = {max_connections} (the service needs {reserved} descriptors of its own): serving at most {fits}; raise LimitNOFILE (or ulimit -n) to serve more"
    );
    usize::try_from(fits).unwrap_or(max_connections)
}

/// One descriptor held back for the moment the others run out.
pub struct Spare(Option<File>);

impl Spare {
    pub fn reserve() -> Spare {
        Spare(File::open("/dev/null").ok())
    }

    /// With no descriptor left to accept a waiting client: frees the spare, accepts the
    /// client and closes it at once, then takes the spare again. Returns whether a client
    /// was turned away (false: there was no spare, or nobody waiting).
    pub fn turn_away(&mut self, listener: &UnixListener) -> bool {
        if self.0.take().is_none() {
            self.0 = File::open("/dev/null").ok();
            return false;
        }
        let turned = listener.accept().is_ok();
        self.0 = File::open("/dev/null").ok();
        turned
    }
}

/// Whether an accept failed for want of a descriptor (the process's or the system's).
pub fn out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == nix::errno::Errno::EMFILE as i32 || code == nix::errno::Errno::ENFILE as i32
    )
}
