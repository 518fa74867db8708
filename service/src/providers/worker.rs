//! One thread per hardware provider: a TPM or a token may take seconds per command, and the
//! event loop must keep answering every other client meanwhile.
//!
//! The event loop keeps everything else: sockets, framing, authentication, the key store and
//! the queue of requests waiting for each device (bounded by
//! `core_settings.provider_queue_limit`). It hands a worker one request at a time, with a
//! [`Snapshot`] of the application's keys taken just before; the worker runs the provider's
//! `execute` on it and sends back the result and the key changes, then wakes the loop
//! through a `mio::Waker`. The loop stores the changes (durably) and only then answers, so a
//! client is never told of a key that is not in the store. The device serializes commands
//! anyway: one request in flight per device loses nothing, and each request sees every
//! change the one before it made.
//!
//! Threads: the event loop, plus one per hardware provider configured.

use super::{AppKeys, Change, Provider, Snapshot};
use crate::error::OpError;
use crate::key_store::KeyEntry;
use parsec_interface::operations::{NativeOperation, NativeResult};
use parsec_interface::requests::{ProviderId, ResponseStatus};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Identifies one provider instance across reloads: a reload builds new instances, and a
/// result that comes back from an old one is matched by this, never by a position.
pub type Instance = u64;

/// A request handed to a worker.
pub struct Job {
    pub ticket: u64,
    pub app: String,
    pub op: NativeOperation,
    pub snapshot: Snapshot,
}

/// What a worker sends back for a job.
pub struct Done {
    pub instance: Instance,
    pub provider: ProviderId,
    pub ticket: u64,
    pub app: String,
    pub result: Result<NativeResult, OpError>,
    pub changes: Vec<Change>,
}

enum Message {
    Run(Job),
    /// Destroy the material of a key the store could not record (its entry never existed).
    Destroy(KeyEntry),
    /// A key this worker made is now durable in the store.
    Committed(KeyEntry),
    /// Close the device connection (a reload is about to open it again); reopened on use.
    Release(mpsc::Sender<()>),
}

/// Where workers send results: a channel the event loop drains when its waker fires. It
/// outlives reloads, so results of a provider a reload replaced still reach their client.
pub struct Outbox {
    sender: mpsc::Sender<Done>,
    waker: Arc<OnceLock<mio::Waker>>,
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        Outbox {
            sender: self.sender.clone(),
            waker: Arc::clone(&self.waker),
        }
    }
}

impl Outbox {
    fn deliver(&self, done: Done) {
        // The receiver goes away only when the service stops.
        let _ = self.sender.send(done);
        if let Some(waker) = self.waker.get() {
            if let Err(e) = waker.wake() {
                log::error!("cannot wake the event loop for a finished request: {e}");
            }
        }
    }
}

/// The receiving side, owned by the dispatcher (and handed from one to the next on reload).
pub struct Inbox {
    receiver: mpsc::Receiver<Done>,
    outbox: Outbox,
}

impl Default for Inbox {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbox {
    pub fn new() -> Inbox {
        let (sender, receiver) = mpsc::channel();
        Inbox {
            receiver,
            outbox: Outbox {
                sender,
                waker: Arc::new(OnceLock::new()),
            },
        }
    }

    pub fn outbox(&self) -> Outbox {
        self.outbox.clone()
    }

    /// Results will wake this waker (the event loop's); without one (in-process use) the
    /// caller waits with `wait`.
    pub fn set_waker(&self, waker: mio::Waker) {
        let _ = self.outbox.waker.set(waker);
    }

    pub fn try_next(&self) -> Option<Done> {
        self.receiver.try_recv().ok()
    }

    /// Waits for the next result (in-process use, and shutdown).
    pub fn wait(&self, timeout: Duration) -> Option<Done> {
        self.receiver.recv_timeout(timeout).ok()
    }
}

/// The event loop's handle on one worker thread.
pub struct Worker {
    sender: mpsc::Sender<Message>,
    pub instance: Instance,
    name: String,
}

impl Worker {
    /// Moves the provider onto a thread of its own.
    pub fn spawn(
        name: &str,
        instance: Instance,
        provider: Box<dyn Provider + Send>,
        outbox: Outbox,
    ) -> Result<Worker, String> {
        let (sender, receiver) = mpsc::channel::<Message>();
        std::thread::Builder::new()
            .name(format!(
                "parsec-{}",
                name.chars().take(8).collect::<String>()
            ))
            // Provider calls need little stack; the default 2 MiB would be most of the RSS.
            .stack_size(256 * 1024)
            .spawn(move || run(instance, provider, receiver, outbox))
            .map_err(|e| format!("cannot start its worker thread: {e}"))?;
        Ok(Worker {
            sender,
            instance,
            name: name.to_string(),
        })
    }

    /// Hands the worker one job. Fails only if the thread is gone.
    pub fn run(&self, job: Job) -> Result<(), OpError> {
        self.sender.send(Message::Run(job)).map_err(|_| {
            OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                format!("the worker of provider \"{}\" has stopped", self.name),
                "restart the service; report this as a bug",
            )
        })
    }

    pub fn destroy(&self, entry: KeyEntry) {
        let _ = self.sender.send(Message::Destroy(entry));
    }

    pub fn committed(&self, entry: KeyEntry) {
        let _ = self.sender.send(Message::Committed(entry));
    }

    /// Asks an idle worker to close its device and waits (briefly) until it has.
    pub fn release(&self, timeout: Duration) -> bool {
        let (ack, acked) = mpsc::channel();
        if self.sender.send(Message::Release(ack)).is_err() {
            return false;
        }
        acked.recv_timeout(timeout).is_ok()
    }
}

fn run(
    instance: Instance,
    mut provider: Box<dyn Provider + Send>,
    receiver: mpsc::Receiver<Message>,
    outbox: Outbox,
) {
    let id = provider.id();
    // Ends when the dispatcher drops its handle (a reload or shutdown), after the job in hand.
    while let Ok(message) = receiver.recv() {
        match message {
            Message::Run(mut job) => {
                let keys = AppKeys::in_snapshot(&mut job.snapshot, &job.app, id);
                let result = provider.execute(job.op, keys);
                // A failed operation changes nothing.
                let changes = match result {
                    Ok(_) => std::mem::take(&mut job.snapshot.changes),
                    Err(_) => Vec::new(),
                };
                outbox.deliver(Done {
                    instance,
                    provider: id,
                    ticket: job.ticket,
                    app: job.app,
                    result,
                    changes,
                });
            }
            Message::Destroy(entry) => {
                if let Err(e) = provider.destroy_material(&entry) {
                    log::warn!(
                        "{id:?}: cannot destroy the material of a key that was never stored: {e}"
                    );
                }
            }
            Message::Committed(entry) => provider.committed(&entry),
            Message::Release(ack) => {
                provider.release_device();
                let _ = ack.send(());
            }
        }
    }
}
