//! Slow key generation in a child process, so that the software provider's worker keeps
//! serving.
//!
//! The service forks; the child re-initialises Mbed TLS (so that it draws from a freshly
//! seeded random generator, not from a copy of the parent's, which the parent goes on
//! using), generates a volatile key, writes it to a pipe and exits. The parent imports it as
//! a persistent key once the pipe reaches its end. Pipe protocol: `0` then the key in PSA
//! export format, or `1` then the PSA status (i32 LE).

use super::psa_error;
use crate::error::OpError;
use nix::unistd::{fork, ForkResult, Pid};
use parsec_interface::requests::ResponseStatus;
use psa_crypto::operations::key_management;
use psa_crypto::types::key::{Attributes, Lifetime};
use psa_crypto::types::status::{Error as PsaError, Status};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use zeroize::Zeroizing;

extern "C" {
    /// Mbed TLS's PSA teardown (psa_crypto.c), linked in with the rest of libmbedcrypto;
    /// psa-crypto does not expose it.
    pub(super) fn mbedtls_psa_crypto_free();
}

/// What the parent needs to finish the generation.
pub struct Job {
    pub name: String,
    pub attributes: Attributes,
}

/// Starts generating a key like `attributes` in a child; returns the pipe and the child.
pub fn spawn(attributes: Attributes) -> Result<(File, Pid), OpError> {
    let (read, write) = nix::unistd::pipe().map_err(|e| {
        OpError::new(
            ResponseStatus::PsaErrorInsufficientMemory,
            format!("pipe: {e}"),
            "the service is out of file descriptors",
        )
    })?;
    // SAFETY: the child has only this thread, the software provider's worker, which is the
    // only one that uses Mbed TLS now (the event loop and the device workers never do; the
    // second crypto thread is paused while a generation starts, done with its job and
    // waiting, `providers::pool`; and this one is between two calls), so
    // Mbed TLS's state, its mutexes included, is a consistent copy; glibc's malloc is made usable in a forked child by its own fork
    // handlers. The child only uses Mbed TLS, the allocator and its end of the pipe, takes no
    // lock another thread may hold (no logging), and leaves with _exit, never returning into
    // the parent's code.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            drop(read);
            close_inherited_descriptors(write.as_raw_fd());
            let code = std::panic::catch_unwind(|| generate(attributes, File::from(write)))
                .unwrap_or(70);
            // SAFETY: _exit ends the child at once, without running the parent's exit handlers
            // or destructors on its copy of the parent's state.
            unsafe { nix::libc::_exit(code) }
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            Ok((File::from(read), child))
        }
        Err(e) => Err(OpError::new(
            ResponseStatus::PsaErrorInsufficientMemory,
            format!("fork: {e}"),
            "the system cannot create the process that generates the key: check memory and process limits",
        )),
    }
}

/// Closes the copies of the service's sockets the child inherited, so that a connection the
/// service closes meanwhile really ends for its client (who may be waiting for end-of-file).
fn close_inherited_descriptors(keep: RawFd) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .filter(|&fd| fd > 2 && fd != keep)
        .collect();
    for fd in fds {
        // The directory's own descriptor is among them and may already be gone: errors are fine.
        let _ = nix::unistd::close(fd);
    }
}

/// The child's work; returns its exit code.
fn generate(attributes: Attributes, mut pipe: File) -> i32 {
    // SAFETY: nothing else runs in the child; Mbed TLS is freed and set up again before use,
    // which reseeds its random generator from the system's entropy.
    unsafe { mbedtls_psa_crypto_free() };
    let outcome = psa_crypto::init().and_then(|()| {
        let mut volatile = attributes;
        volatile.lifetime = Lifetime::Volatile;
        volatile.policy.usage_flags.set_export();
        let key = key_management::generate(volatile, None)?;
        let mut buffer = Zeroizing::new(vec![0u8; volatile.export_key_output_size()?]);
        let written = key_management::export(key, &mut buffer)?;
        buffer.truncate(written);
        Ok(buffer)
    });
    let message = match outcome {
        Ok(key) => {
            let mut message = Zeroizing::new(Vec::with_capacity(key.len() + 1));
            message.push(0);
            message.extend_from_slice(&key);
            message
        }
        Err(e) => {
            let status: i32 = Status::Error(e).into();
            let mut message = Zeroizing::new(vec![1]);
            message.extend_from_slice(&status.to_le_bytes());
            message
        }
    };
    if pipe.write_all(&message).is_err() {
        return 1;
    }
    0
}

/// The key the child wrote, or the error it reported.
pub fn parse(output: Vec<u8>) -> Result<Zeroizing<Vec<u8>>, OpError> {
    let output = Zeroizing::new(output);
    match output.split_first() {
        Some((0, key)) if !key.is_empty() => Ok(Zeroizing::new(key.to_vec())),
        Some((1, status)) if status.len() == 4 => {
            let status = i32::from_le_bytes([status[0], status[1], status[2], status[3]]);
            let error = Status::from(status)
                .to_result()
                .err()
                .unwrap_or(PsaError::GenericError);
            Err(psa_error(
                "psa_generate_key (in the key generation process)",
                error,
            ))
        }
        _ => Err(OpError::new(
            ResponseStatus::PsaErrorInsufficientMemory,
            format!(
                "the key generation process ended with {} bytes of output",
                output.len()
            ),
            "it may have been killed (out of memory?): see the kernel log",
        )),
    }
}
