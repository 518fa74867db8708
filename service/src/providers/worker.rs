//! One thread per provider: a TPM or a token may take seconds per command, and the event loop
//! must keep answering every other client meanwhile; the software provider's cryptography
//! runs on another core than the loop's IPC.
//!
//! The event loop keeps everything else: sockets, framing, authentication, the key store and
//! the queue of requests waiting for each provider (bounded by
//! `core_settings.provider_queue_limit`). It hands a worker a batch of requests (one for a
//! device, up to `providers::batch_limit` on different keys for the software provider), each
//! with a [`Snapshot`] of its application's keys taken just before; the worker runs them,
//! makes what they wrote durable once for the whole batch (`Provider::flush`), and sends back
//! each result with its key changes, then wakes the loop through a `mio::Waker`. The loop
//! stores the changes (durably, one group commit for all it received) and only then answers,
//! so a client is never told of a key that is not in the store.
//!
//! The key store's group commits run on a thread of their own too (`StoreWriter`): the loop
//! writes a batch's temporary files, the writer makes them durable (syncs, renames), and the
//! loop answers the batch's clients when it reports back; meanwhile it serves everyone else.
//!
//! Threads: the event loop, the store's writer, plus one per provider configured; the
//! software provider's worker on a thread-safe Mbed TLS has a second crypto thread for the
//! operations that change nothing (`pool.rs`).

pub use super::store_writer::StoreWriter;
use super::{Change, Deferred, Limits, Provider, Snapshot};
use crate::config::ProviderSettings;
use crate::error::OpError;
use crate::key_store::{AppId, Committed, KeyEntry, KeyStore};
use parsec_interface::operations::{NativeOperation, NativeResult};
use parsec_interface::requests::{ProviderId, ResponseStatus};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Identifies one provider instance across reloads: a reload builds new instances, and a
/// result that comes back from an old one is matched by this, never by a position.
pub type Instance = u64;

/// What a request asks of its provider.
pub enum Work {
    Op(NativeOperation),
    /// Finish a deferred operation with what its child process wrote (`Provider::complete`).
    Complete(Box<dyn std::any::Any + Send>, Vec<u8>),
    /// Forget these keys of the job's application, their material to be destroyed once the
    /// entries' removal is durable (one chunk of a DeleteClient): a tombstone for each
    /// (`Provider::before_forget`), made durable with the batch, then the removals.
    Forget(Vec<String>),
}

impl Work {
    /// Whether it changes nothing its provider keeps (`providers::changes_nothing`): what a
    /// provider's second crypto thread runs, and what the loop may hand a busy one.
    pub fn changes_nothing(&self) -> bool {
        matches!(self, Work::Op(op) if super::changes_nothing(op))
    }
}

/// A request handed to a worker.
pub struct Job {
    pub ticket: u64,
    pub app: AppId,
    pub work: Work,
    pub snapshot: Snapshot,
}

/// How a job ended.
pub enum Outcome {
    Finished(Result<NativeResult, OpError>),
    /// It runs in a child process now: the event loop watches it, then sends
    /// `Work::Complete`.
    Deferred(Deferred),
}

/// What a worker sends back for a job.
pub struct Done {
    pub instance: Instance,
    pub provider: ProviderId,
    pub ticket: u64,
    pub app: AppId,
    pub outcome: Outcome,
    pub changes: Vec<Change>,
}

enum Message {
    Run(Vec<Job>),
    /// Destroy the material of a key whose entry is gone (durably), or that the store could
    /// not record (its entry never existed).
    Destroy(KeyEntry),
    /// A key this worker made is now durable in the store.
    Committed(KeyEntry),
}

/// What comes back to the event loop.
pub enum Event {
    /// A provider's request is done.
    Done(Done),
    /// A group commit (by its number) is durable, or failed.
    Committed(u64, Committed),
    /// A worker told to stop has finished everything it was sent and let its provider go
    /// (closed its device, finalised its module): a successor may start now.
    Stopped(Instance),
    /// A worker built its provider (`Worker::start`): it serves now, with these entries of
    /// the key store; or its hardware is absent and its config says to run without it
    /// (`None`); or it could not start, and its thread has ended.
    Started(Instance, Result<Option<Built>, String>),
}

/// What a worker that built its provider reports.
pub struct Built {
    /// The provider's entries, read from its key store directory on the worker (and the
    /// in-memory ones it mounted from its config).
    pub store: KeyStore,
    /// What the instance serves, if its device says less than its provider's table.
    pub opcodes: Option<Vec<parsec_interface::requests::Opcode>>,
    /// It runs operations that change nothing on two threads (`Provider::shared`): the loop
    /// may hand it a second batch of those while the first runs, and it merges them.
    pub shares: bool,
}

/// A provider as built, with its entries of the key store.
type BuiltProvider = (Box<dyn Provider + Send>, KeyStore);

/// Building a provider runs code the service does not control (a PKCS#11 module's
/// C_Initialize, tpm2-tss's TCTI loader, Mbed TLS's init) and needs more stack than serving
/// does: it runs on a short-lived thread with a large stack, and the provider moves to the
/// worker's thread when built.
fn build_on_a_large_stack(
    settings: &ProviderSettings,
    limits: Limits,
) -> Result<Option<BuiltProvider>, String> {
    std::thread::scope(|scope| {
        let builder = std::thread::Builder::new()
            .name("parsec-start".into())
            .stack_size(4 << 20)
            .spawn_scoped(scope, || {
                let id = super::id_of(&settings.kind);
                let root = &settings.key_store_dir;
                if root.is_file() && !crate::key_store::sqlite::is_sqlite_file(root) {
                    return Err(format!(
                        "its key store {} is a file, and not an SQLite database (upstream Parsec's SQLite store): point the key manager at a directory, or at upstream's database (docs/migration.md)",
                        root.display()
                    ));
                }
                let layout = crate::key_store::upstream::layout(root);
                let mut store = KeyStore::new();
                let damaged = store.load_layout(id, &layout, settings.authenticator).map_err(|e| {
                    format!(
                        "cannot read its key store directory {}: {e}",
                        layout.own.display()
                    )
                })?;
                for entry in &damaged {
                    log::error!(
                        "key store: skipping damaged entry {}: {}; its key material is kept (never swept): restore the file from a backup and the key works again",
                        entry.path.display(),
                        entry.reason
                    );
                }
                if let Some(upstream) = &layout.upstream {
                    log::info!(
                        "provider \"{}\": {} holds upstream Parsec's key store: its keys are served and it is never written; this service's own entries go to {}",
                        settings.name,
                        upstream.display(),
                        layout.own.display()
                    );
                }
                let settings = &super::in_own_dirs(settings, &layout);
                let provider = super::build(settings, &mut store, limits)?;
                Ok(provider.map(|p| (p, store)))
            })
            .map_err(|e| format!("cannot start a thread to build it: {e}"))?;
        builder
            .join()
            .unwrap_or_else(|_| Err("building it panicked (a bug: report it)".to_string()))
    })
}

/// Where workers send results: a channel the event loop drains when its waker fires. It
/// outlives reloads, so results of a provider a reload replaced still reach their client.
pub struct Outbox {
    sender: mpsc::Sender<Event>,
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
    /// Sends events (a batch's results, a commit), then wakes the loop once.
    pub(super) fn deliver(&self, events: impl IntoIterator<Item = Event>) {
        for event in events {
            // The receiver goes away only when the service stops.
            let _ = self.sender.send(event);
        }
        self.wake();
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            if let Err(e) = waker.wake() {
                log::error!("cannot wake the event loop for a finished request: {e}");
            }
        }
    }
}

/// The receiving side, owned by the dispatcher (and handed from one to the next on reload).
pub struct Inbox {
    receiver: mpsc::Receiver<Event>,
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

    /// Wakes the loop (for answers the dispatcher has ready without a worker).
    pub fn wake(&self) {
        self.outbox.wake();
    }

    pub fn try_next(&self) -> Option<Event> {
        self.receiver.try_recv().ok()
    }

    /// Waits for the next result (in-process use, reloads, and shutdown).
    pub fn wait(&self, timeout: Duration) -> Option<Event> {
        self.receiver.recv_timeout(timeout).ok()
    }
}

/// The event loop's handle on one worker thread.
pub struct Worker {
    /// None once told to stop.
    sender: Option<mpsc::Sender<Message>>,
    thread: std::thread::JoinHandle<()>,
    pub instance: Instance,
    name: String,
}

impl Worker {
    /// Starts an instance of a provider on a thread of its own: the thread reads the
    /// provider's entries from its key store directory, builds the provider there (opening
    /// its device, initialising its module, its start-up recovery: nothing of it runs on the
    /// event loop), reports `Event::Started`, then serves. Fails only if no thread can start.
    pub fn start(
        settings: &ProviderSettings,
        instance: Instance,
        limits: Limits,
        outbox: Outbox,
    ) -> Result<Worker, String> {
        let id = super::id_of(&settings.kind);
        // Provider calls need little stack; the default 2 MiB would be most of the RSS. Mbed
        // TLS's RSA and the key generation child (forked from this thread) get more.
        let stack = if id == ProviderId::MbedCrypto {
            512 * 1024
        } else {
            256 * 1024
        };
        let (sender, receiver) = mpsc::channel::<Message>();
        let name = settings.name.clone();
        let settings = settings.clone();
        let thread = std::thread::Builder::new()
            .name(format!(
                "parsec-{}",
                name.chars().take(8).collect::<String>()
            ))
            .stack_size(stack)
            .spawn(move || {
                let built = build_on_a_large_stack(&settings, limits);
                match built {
                    Ok(Some((provider, store))) => {
                        crate::crash_point("start:built");
                        let started = Built {
                            store,
                            opcodes: provider.opcodes(),
                            shares: provider.shared().is_some(),
                        };
                        outbox.deliver([Event::Started(instance, Ok(Some(started)))]);
                        run(instance, provider, receiver, outbox);
                    }
                    Ok(None) => outbox.deliver([Event::Started(instance, Ok(None))]),
                    Err(error) => outbox.deliver([Event::Started(instance, Err(error))]),
                }
            })
            .map_err(|e| format!("cannot start its worker thread: {e}"))?;
        Ok(Worker {
            sender: Some(sender),
            thread,
            instance,
            name,
        })
    }

    /// Hands the worker a batch of jobs. Fails only if the thread is gone.
    pub fn run(&self, jobs: Vec<Job>) -> Result<(), OpError> {
        self.send(Message::Run(jobs)).map_err(|_| {
            OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                format!("the worker of provider \"{}\" has stopped", self.name),
                "restart the service; report this as a bug",
            )
        })
    }

    fn send(&self, message: Message) -> Result<(), ()> {
        match &self.sender {
            Some(sender) => sender.send(message).map_err(|_| ()),
            None => Err(()),
        }
    }

    pub fn destroy(&self, entry: KeyEntry) {
        if self.send(Message::Destroy(entry)).is_err() {
            log::error!(
                "provider \"{}\": a key's material could not be handed to its stopped worker for destruction (resolved at the next start)",
                self.name
            );
        }
    }

    pub fn committed(&self, entry: KeyEntry) {
        let _ = self.send(Message::Committed(entry));
    }

    /// Tells the thread to end once it has done everything already sent (it then drops the
    /// provider, which closes the device or finalizes the module, and reports
    /// `Event::Stopped`). Nothing more can be sent to it.
    pub fn close(&mut self) {
        self.sender = None;
    }

    /// Whether its thread has ended.
    pub fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// As `close`; its handle, to wait for the end.
    pub fn stop(mut self) -> std::thread::JoinHandle<()> {
        self.close();
        self.thread
    }
}

fn run(
    instance: Instance,
    mut provider: Box<dyn Provider + Send>,
    receiver: mpsc::Receiver<Message>,
    outbox: Outbox,
) {
    let id = provider.id();
    let pool = provider
        .shared()
        .and_then(|shared| super::pool::Pool::start(shared, instance, id, outbox.clone()));
    // Ends when the dispatcher drops its handle (a reload or shutdown), after every job it
    // was sent (the pool's queue included).
    loop {
        // With the pool's jobs waiting, this thread takes one between messages.
        let message = match &pool {
            Some(pool) if !pool.is_empty() => match receiver.try_recv() {
                Ok(message) => message,
                Err(mpsc::TryRecvError::Empty) => {
                    pool.run_one();
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
            },
            _ => match receiver.recv() {
                Ok(message) => message,
                Err(_) => break,
            },
        };
        match message {
            Message::Run(jobs) => {
                let Some(pool) = &pool else {
                    let batch = super::batch::run(instance, provider.as_mut(), jobs);
                    outbox.deliver(batch.into_iter().map(Event::Done));
                    continue;
                };
                let (reads, changes): (Vec<Job>, Vec<Job>) =
                    jobs.into_iter().partition(|job| job.work.changes_nothing());
                if !changes.is_empty() {
                    let _paused = pool.pause();
                    let batch = super::batch::run(instance, provider.as_mut(), changes);
                    outbox.deliver(batch.into_iter().map(Event::Done));
                }
                pool.push(reads);
            }
            Message::Destroy(entry) => {
                let _paused = pool.as_ref().map(|pool| pool.pause());
                if let Err(e) = provider.destroy_material(&entry) {
                    log::warn!(
                        "{id:?}: cannot destroy the material of a forgotten key: {e} (resolved at the next start)"
                    );
                }
            }
            Message::Committed(entry) => provider.committed(&entry),
        }
    }
    // What is queued runs, then the second thread ends.
    drop(pool);
    // The provider goes here, on this thread: its device closes, its module is finalised,
    // after every job it was sent. Only then may a successor open the same device.
    drop(provider);
    outbox.deliver([Event::Stopped(instance)]);
}
