//! The second crypto thread of a provider whose operations that change nothing may run on
//! two threads at once (`Provider::shared`: the software provider on a thread-safe Mbed TLS).
//!
//! The worker puts a batch's such operations (signatures, decryptions, exports) into the
//! pool's queue; the second thread and the worker's own thread, whenever it has no message
//! to handle, each take the next one and send its result back at once (they change nothing,
//! so nothing needs syncing first). Whatever does change the provider's keys (a create, a
//! destroy, a key generation's fork, the destruction of a forgotten key's material) runs on
//! the worker's thread while the pool is paused: the second thread has finished the
//! operation in its hands and takes no other until the pause ends, so nothing of it meets
//! another thread inside the library (a fork copies no lock held by another thread). Two
//! reads of one key at once are what a thread-safe Mbed TLS allows.
//!
//! Bounds: the queue holds what the event loop handed over, at most `providers::batch_limit`
//! requests in flight (the loop's count); one thread.

use super::worker::{Done, Event, Instance, Job, Outbox, Outcome};
use super::Shared;
use crate::error::OpError;
use parsec_interface::requests::{ProviderId, ResponseStatus};
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// The second thread's stack: as the software provider's worker's (Mbed TLS's RSA).
const STACK: usize = 512 * 1024;

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// The worker's thread is changing keys: take nothing.
    paused: bool,
    /// The second thread is running a job.
    running: bool,
    /// No more jobs will come: the second thread ends once the queue is empty.
    stopping: bool,
    /// Jobs each thread ran (the worker's, the second), for the log when the pool stops.
    ran: [u64; 2],
}

struct Inner {
    state: Mutex<State>,
    /// A job was queued, the pause ended, or the pool stops.
    wake: Condvar,
    /// The second thread finished a job.
    finished: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is whole whatever panicked while it was held.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) struct Pool {
    inner: Arc<Inner>,
    shared: Arc<dyn Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    instance: Instance,
    provider: ProviderId,
    outbox: Outbox,
}

/// While it lives, the second thread runs nothing (`Pool::pause`).
pub(super) struct Paused<'a>(&'a Inner);

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.0.lock().paused = false;
        self.0.wake.notify_all();
    }
}

impl Pool {
    /// Starts the second thread; `None` if it cannot start (everything then runs on the
    /// worker's thread, as on an unthreaded library).
    pub(super) fn start(
        shared: Arc<dyn Shared>,
        instance: Instance,
        provider: ProviderId,
        outbox: Outbox,
    ) -> Option<Pool> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            finished: Condvar::new(),
        });
        let thread = {
            let (inner, shared, outbox) = (Arc::clone(&inner), Arc::clone(&shared), outbox.clone());
            std::thread::Builder::new()
                .name("parsec-crypto-2".into())
                .stack_size(STACK)
                .spawn(move || second_thread(&inner, shared.as_ref(), instance, provider, &outbox))
        };
        match thread {
            Ok(thread) => Some(Pool {
                inner,
                shared,
                thread: Some(thread),
                instance,
                provider,
                outbox,
            }),
            Err(e) => {
                log::warn!("{provider:?}: cannot start the second crypto thread ({e}): one thread runs everything");
                None
            }
        }
    }

    pub(super) fn shared(&self) -> &dyn Shared {
        self.shared.as_ref()
    }

    /// Queues jobs for either thread.
    pub(super) fn push(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        self.inner.lock().jobs.extend(jobs);
        self.inner.wake.notify_one();
    }

    pub(super) fn is_empty(&self) -> bool {
        self.inner.lock().jobs.is_empty()
    }

    /// Runs the next queued job on the calling thread (the worker's) and sends its result;
    /// false if there was none.
    pub(super) fn run_one(&self) -> bool {
        let job = {
            let mut state = self.inner.lock();
            let Some(job) = state.jobs.pop_front() else {
                return false;
            };
            state.ran[0] += 1;
            job
        };
        let done = super::batch::run_shared(self.instance, self.provider, self.shared(), job);
        self.outbox.deliver([Event::Done(done)]);
        true
    }

    /// Waits until the second thread has finished the job in its hands, and keeps it from
    /// taking another while the result lives.
    pub(super) fn pause(&self) -> Paused<'_> {
        let mut state = self.inner.lock();
        state.paused = true;
        while state.running {
            state = self
                .inner
                .finished
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        Paused(&self.inner)
    }
}

impl Drop for Pool {
    /// Runs what is still queued (a stopping worker finishes what it was sent), then ends
    /// the second thread.
    fn drop(&mut self) {
        while self.run_one() {}
        self.inner.lock().stopping = true;
        self.inner.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let [worker, second] = self.inner.lock().ran;
        log::info!(
            "{:?}: of {} operations that change nothing, the worker's thread ran {worker}, the second crypto thread {second}",
            self.provider,
            worker + second
        );
    }
}

fn second_thread(
    inner: &Inner,
    shared: &dyn Shared,
    instance: Instance,
    provider: ProviderId,
    outbox: &Outbox,
) {
    let mut state = inner.lock();
    loop {
        if !state.paused {
            if let Some(job) = state.jobs.pop_front() {
                state.running = true;
                drop(state);
                let (ticket, app) = (job.ticket, job.app.clone());
                // A bug must not leave a client unanswered and the provider busy for good.
                let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    super::batch::run_shared(instance, provider, shared, job)
                }))
                .unwrap_or_else(|_| Done {
                    instance,
                    provider,
                    ticket,
                    app,
                    outcome: Outcome::Finished(Err(OpError::new(
                        ResponseStatus::PsaErrorGenericError,
                        "the software provider's second crypto thread panicked",
                        "a bug: report it with the log",
                    ))),
                    changes: Vec::new(),
                });
                outbox.deliver([Event::Done(done)]);
                state = inner.lock();
                state.running = false;
                state.ran[1] += 1;
                inner.finished.notify_all();
                continue;
            }
        }
        if state.stopping && state.jobs.is_empty() {
            return;
        }
        state = inner.wake.wait(state).unwrap_or_else(|p| p.into_inner());
    }
}
