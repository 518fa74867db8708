//! What the C libraries in the process print to stderr, kept so that a failed request's log
//! line can carry it: a PKCS#11 module often says why only there (tpm2-pkcs11: "Cannot mark
//! object both extractable AND sensitive", "out of memory for object contexts") and returns
//! a bare CKR_GENERAL_ERROR.
//!
//! Once started, fd 2 is a pipe. A thread forwards every byte to the original stderr
//! unchanged (the operator sees what they saw before) and keeps the last lines, escaped and
//! capped, in a bounded ring (the request's log line escapes them, as every cause). The service's own log lines are written to the original stderr
//! directly (`write_log`), so the ring holds only what libraries printed. A request marks the
//! ring when it starts (`mark`) and, when it fails, takes what was printed since (`since`).
//! `since` first drains the pipe itself, under the same lock the thread reads with, so a
//! line the module wrote before returning is never missed. The lines are whatever any
//! library of the process printed meanwhile, which the log says.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Mutex, OnceLock};

/// Lines kept, and the length kept of each (the rest is cut, with a mark).
const LINES: usize = 64;
const LINE_CHARS: usize = 160;

struct Capture {
    /// The original stderr (a duplicate of fd 2 from before the swap).
    original: Mutex<File>,
    /// The pipe's read end, non-blocking; the lock is the one every reader takes.
    pipe: Mutex<Reader>,
}

struct Reader {
    file: File,
    partial: Vec<u8>,
    next: u64,
    lines: VecDeque<(u64, String)>,
}

static CAPTURE: OnceLock<Capture> = OnceLock::new();

/// Swaps fd 2 for the pipe (once per process; later calls do nothing).
pub fn start() -> Result<(), String> {
    if CAPTURE.get().is_some() {
        return Ok(());
    }
    let (read, write) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
    let flags = nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| format!("fcntl: {e}"))?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(read.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))
        .map_err(|e| format!("fcntl: {e}"))?;
    let original = nix::unistd::dup(2).map_err(|e| format!("dup of stderr: {e}"))?;
    // SAFETY: `dup` just returned this descriptor; nothing else owns it.
    let original = unsafe { File::from_raw_fd(original) };
    let capture = Capture {
        original: Mutex::new(original),
        pipe: Mutex::new(Reader {
            file: File::from(read),
            partial: Vec::new(),
            next: 0,
            lines: VecDeque::new(),
        }),
    };
    if CAPTURE.set(capture).is_err() {
        return Ok(());
    }
    nix::unistd::dup2(write.as_raw_fd(), 2).map_err(|e| format!("dup2 onto stderr: {e}"))?;
    drop::<OwnedFd>(write);
    std::thread::Builder::new()
        .name("stderr".into())
        .spawn(forward)
        .map_err(|e| format!("cannot start the stderr thread: {e}"))?;
    Ok(())
}

/// The thread: waits for bytes, then drains them under the lock.
fn forward() {
    let Some(capture) = CAPTURE.get() else {
        return;
    };
    let fd = {
        let reader = capture.pipe.lock().unwrap_or_else(|e| e.into_inner());
        reader.file.as_raw_fd()
    };
    loop {
        // SAFETY: the pipe's read end lives in CAPTURE, a static that is never dropped.
        let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let mut fds = [nix::poll::PollFd::new(
            borrowed.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, nix::poll::PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        if !drain(capture) {
            return;
        }
    }
}

/// Reads what the pipe holds, forwards it and keeps its lines; false once the pipe is gone.
fn drain(capture: &Capture) -> bool {
    let mut reader = capture.pipe.lock().unwrap_or_else(|e| e.into_inner());
    let mut buffer = [0u8; 4096];
    loop {
        match reader.file.read(&mut buffer) {
            Ok(0) => return false,
            Ok(n) => {
                if let Ok(mut original) = capture.original.lock() {
                    let _ = original.write_all(&buffer[..n]);
                }
                reader.keep(&buffer[..n]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
}

impl Reader {
    fn keep(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.partial);
                self.push(&line);
            } else if self.partial.len() < LINE_CHARS * 4 {
                self.partial.push(b);
            }
        }
    }

    fn push(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        // Control characters dropped here; the request's log line escapes the rest.
        let mut kept: String = text
            .chars()
            .filter(|c| !c.is_control())
            .take(LINE_CHARS)
            .collect();
        if text.chars().count() > LINE_CHARS {
            kept.push_str("...");
        }
        self.next += 1;
        self.lines.push_back((self.next, kept));
        while self.lines.len() > LINES {
            self.lines.pop_front();
        }
    }
}

/// Where the ring is now (0 before `start`).
pub fn mark() -> u64 {
    match CAPTURE.get() {
        Some(capture) => {
            drain(capture);
            capture.pipe.lock().unwrap_or_else(|e| e.into_inner()).next
        }
        None => 0,
    }
}

/// The lines printed since `mark`, at most `max`, the last ones.
pub fn since(mark: u64, max: usize) -> Vec<String> {
    let Some(capture) = CAPTURE.get() else {
        return Vec::new();
    };
    drain(capture);
    let reader = capture.pipe.lock().unwrap_or_else(|e| e.into_inner());
    let new: Vec<String> = reader
        .lines
        .iter()
        .filter(|(seq, _)| *seq > mark)
        .map(|(_, line)| line.clone())
        .collect();
    new[new.len().saturating_sub(max)..].to_vec()
}

/// Writes one of the service's own log lines: to the original stderr once the capture has
/// started (so the ring holds only what libraries print), else to stderr.
pub fn write_log(line: &[u8]) {
    match CAPTURE.get() {
        Some(capture) => {
            if let Ok(mut original) = capture.original.lock() {
                let _ = original.write_all(line);
            }
        }
        None => {
            let _ = std::io::stderr().lock().write_all(line);
        }
    }
}
