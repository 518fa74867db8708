//! Requests that run in a child process (a software RSA generation): the loop watches the
//! pipe each child writes its result to, and hands the result back to the dispatcher when
//! the child is done. A job is seen to its end even when nobody waits for its answer any
//! more, so that the key it makes is stored and its provider instance can drain.

use super::*;

/// A request running in a child process.
pub(super) struct Job {
    /// The connection to answer; none when its client is gone (hung up, or told the
    /// request timed out): the job is still seen to its end, so that what it makes is
    /// stored and its provider instance may drain.
    connection: Option<Token>,
    pending: PendingRequest,
    output: Vec<u8>,
}

impl Server {
    /// Watches the pipe of a request that runs in a child process.
    pub(super) fn watch_job(&mut self, connection: Option<Token>, pending: PendingRequest) {
        let job_token = Token(self.next_token);
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_CONNECTION);
        let fd = pending.job.output.as_raw_fd();
        let watched = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(io::Error::from)
        .and_then(|_| {
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), job_token, Interest::READABLE)
        });
        if let Err(e) = watched {
            // Cannot wait in the loop: wait here instead, which only delays other clients.
            log::warn!("cannot watch a key generation process ({e}): waiting for it");
            let dispatched = crate::front_end::finish_blocking(&mut self.dispatcher, pending);
            self.answer_job(connection, dispatched);
            return;
        }
        self.jobs.insert(
            job_token,
            Job {
                connection,
                pending,
                output: Vec::new(),
            },
        );
    }

    /// Reads what a child wrote; at the end of its output, finishes its request.
    pub(super) fn job_output(&mut self, token: Token) {
        let Some(job) = self.jobs.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; 4096];
        loop {
            match job.pending.job.output.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => job.output.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("reading a key generation process's output: {e}");
                    break;
                }
            }
        }
        let Job {
            connection,
            pending,
            output,
        } = self.jobs.remove(&token).expect("looked up above");
        let fd = pending.job.output.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let dispatched = self.dispatcher.complete(pending, output);
        self.answer_job(connection, dispatched);
    }

    /// What a finished child's request became goes to its connection, if it has one.
    fn answer_job(&mut self, connection: Option<Token>, dispatched: Dispatched) {
        // Without one, `complete` has handed the result to the worker; its answer comes
        // out of `completed` under a ticket nobody waits for, and is dropped there.
        if let Some(token) = connection {
            self.handle(token, dispatched);
        }
    }
}
