//! From a decoded request to a response: authenticate, decode the body, run the operation
//! (core operations in `core`, the rest in the provider the header names), encode the result.
//!
//! Each provider runs on a worker thread of its own behind a bounded queue (`slots`,
//! `providers::worker`): its requests are `Queued`, and their responses come out of
//! `completed` once the worker is done (or a `Deferred` request, to watch until its child
//! process is done, then `complete`).
//!
//! Every failure is logged once, here, with the application, provider, opcode, the native
//! cause and a hint; the client gets the status alone.

mod completion;
mod core;
mod deadlines;
mod delete_client;
mod deprecated;
mod reload;
mod slots;

pub use self::core::is_cheap_opcode;

use crate::authenticators::{Application, Authenticator, PeerCredentials};
use crate::config::Config;
use crate::error::OpError;
use crate::key_store::{AppId, KeyStore, KeyTriple};
use crate::providers::worker::{
    Built, Done, Event, Inbox, Instance, Job, Outcome, StoreWriter, Work, Worker,
};
use crate::providers::{self, Change, Deferred, Limits, Snapshot};
use crate::rate_limit::RateLimiter;
use parsec_interface::operations::{psa_generate_random, Convert, NativeOperation, NativeResult};
use parsec_interface::operations_protobuf::ProtobufConverter;
use parsec_interface::requests::request::RequestHeader;
use parsec_interface::requests::{AuthType, Opcode, ProviderId, Request, Response, ResponseStatus};
use slots::{Abandoned, Retiring, Running, Slot, State, Waiting};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What became of a request.
pub enum Dispatched {
    Done(Response),
    /// Running in a child process (out of `completed` only): watch `job.output`, then call
    /// `Dispatcher::complete`.
    Deferred(PendingRequest),
    /// Waiting for, or running on, its provider's worker: its response (or `Deferred`)
    /// comes out of `Dispatcher::completed` under this ticket.
    Queued(u64),
}

pub struct PendingRequest {
    pub ticket: u64,
    provider: ProviderId,
    /// The instance that started it, and the only one that may finish it (a reload may
    /// replace or remove the provider meanwhile; that instance waits for it).
    instance: Instance,
    pub job: Deferred,
}

enum Step {
    Result(NativeResult),
    Queued(u64),
}

/// Who answers a request.
enum Route {
    Core,
    /// The index of the provider in config order (valid for this dispatch only).
    Provider(usize),
}

/// A request in the hands of a worker (queued or running): what its response needs.
struct Ticket {
    header: RequestHeader,
    app: AppId,
    /// A large random request, served in chunks (see `RANDOM_CHUNK`).
    random: Option<RandomParts>,
    /// Its client hung up while it ran (`cancel`).
    cancelled: bool,
    /// When it must be answered by, whatever its provider does (`deadlines.rs`); none for
    /// a request in a child process or a DeleteClient (each of its chunks has one).
    deadline: Option<Instant>,
    /// Its deadline passed while its provider ran it: its client was told so, and what the
    /// provider does when it answers is stored, but nobody is answered again.
    expired: bool,
}

impl Ticket {
    fn new(header: RequestHeader, app: AppId, deadline: Option<Instant>) -> Ticket {
        Ticket {
            header,
            app,
            random: None,
            cancelled: false,
            deadline,
            expired: false,
        }
    }
}

/// Random bytes asked of a device beyond this are fetched this many at a time, each chunk a
/// job of its own that goes to the back of the queue: a megabyte of TPM2_GetRandom (32,768
/// commands) no longer holds the device from every other client.
const RANDOM_CHUNK: usize = 1024;

struct RandomParts {
    remaining: usize,
    collected: zeroize::Zeroizing<Vec<u8>>,
}

/// Everything that answers requests: the authenticator, the providers and the key store.
pub struct Dispatcher {
    authenticator: Authenticator,
    /// The configured providers, in config order.
    slots: Vec<Slot>,
    /// Instances a reload took out of service, finishing what they have in hand.
    retiring: Vec<Retiring>,
    /// Instances a reload replaced or removed before they had started.
    abandoned: Vec<Abandoned>,
    store: KeyStore,
    converter: ProtobufConverter,
    limiter: Option<RateLimiter>,
    /// Results of the workers and the store's writer, for the whole run.
    inbox: Inbox,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    /// Tickets answered without their worker (refused before it ran, or the worker is
    /// gone), answered by `completed`.
    failed: Vec<(u64, OpError)>,
    /// Key material to destroy once the answers of the commit that removed its entries are
    /// written (`answers_sent`): a crash in between leaves a tombstone, resolved at the next
    /// start, and never a client that was not told its key is gone.
    destroy_after_answers: Vec<(providers::worker::Instance, crate::key_store::KeyEntry)>,
    limits: Limits,
    /// Makes the key store's group commits durable, off the loop.
    writer: StoreWriter,
    /// Finished requests waiting for their group commit, by commit number.
    committing: HashMap<u64, Vec<completion::Settling>>,
    next_commit: u64,
    /// DeleteClient requests in progress, by ticket.
    deletions: HashMap<u64, delete_client::Deletion>,
    /// How long a request may wait for its provider (`core_settings.provider_request_timeout`).
    request_timeout: Duration,
    /// `core_settings.allow_deprecated` (`deprecated.rs`).
    allow_deprecated: bool,
}

impl Dispatcher {
    /// Starts every configured provider, in config order, each on its worker (which reads
    /// its entries and builds it), and waits for each. A provider that cannot start stops
    /// the service here, as upstream's does (at a reload it fails alone).
    pub fn new(config: &Config) -> Result<Dispatcher, String> {
        #[cfg(feature = "tpm-provider")]
        providers::tpm::quiet_tss_logs();
        let inbox = Inbox::new();
        let outbox = inbox.outbox();
        let store = KeyStore::new();
        let limits = Limits {
            buffer_size_limit: config.buffer_size_limit,
            max_keygen_processes: config.max_keygen_processes,
        };
        let writer = StoreWriter::spawn(outbox)?;
        let mut dispatcher = Dispatcher {
            authenticator: Authenticator::new(config.authenticator, config.admins.clone()),
            slots: Vec::new(),
            retiring: Vec::new(),
            abandoned: Vec::new(),
            store,
            converter: ProtobufConverter {},
            limiter: RateLimiter::new(config.client_rate_limit, config.client_rate_burst),
            inbox,
            tickets: HashMap::new(),
            next_ticket: 1,
            failed: Vec::new(),
            destroy_after_answers: Vec::new(),
            limits,
            writer,
            committing: HashMap::new(),
            next_commit: 1,
            deletions: HashMap::new(),
            request_timeout: config.provider_request_timeout,
            allow_deprecated: config.allow_deprecated,
        };
        for settings in &config.providers {
            let failed = |e: String| format!("provider \"{}\" failed to start: {e}", settings.name);
            let instance = slots::next_instance();
            let worker = Worker::start(settings, instance, limits, dispatcher.inbox.outbox())
                .map_err(failed)?;
            // Nothing else runs yet: the only event to come is this worker's.
            let outcome = loop {
                match dispatcher.inbox.wait(Duration::from_secs(3600)) {
                    Some(Event::Started(i, outcome)) if i == instance => break outcome,
                    Some(_) => continue,
                    None => break Err("it did not report back within an hour".to_string()),
                }
            };
            let Some(built) = outcome.map_err(failed)? else {
                continue;
            };
            let mut slot = reload::new_slot(config, settings, limits);
            slot.state = State::Serving(dispatcher.adopt(slot.id, worker, built));
            dispatcher.slots.push(slot);
        }
        log::info!(
            "key store: {} keys loaded, {} damaged entries skipped; threads: 1 event loop + 1 key store writer + {} provider workers (+1 crypto thread for a thread-safe software provider)",
            dispatcher.store.len(),
            dispatcher.store.damaged_total(),
            dispatcher.slots.len()
        );
        Ok(dispatcher)
    }

    /// A worker has built its provider: its entries join the store, and it serves.
    fn adopt(&mut self, id: ProviderId, worker: Worker, built: Built) -> Running {
        self.store.adopt(id, built.store);
        Running {
            opcodes: built.opcodes,
            shares: built.shares,
            worker,
            busy_since: None,
            in_flight: 0,
            deferred: 0,
            pinned: Default::default(),
        }
    }

    /// The waker the workers wake when a result is ready (the event loop's).
    pub fn set_waker(&self, waker: mio::Waker) {
        self.inbox.set_waker(waker);
    }

    /// Requests in the hands of workers (queued or running) or waiting for their commit.
    pub fn outstanding(&self) -> usize {
        self.tickets.len() + self.committing.values().map(Vec::len).sum::<usize>()
    }

    /// The service stops: every worker ends (dropping its provider closes the device or
    /// finalizes the PKCS#11 module) and the key store's writer finishes its commit, and
    /// this waits for them, up to `timeout`. The process must not exit while a worker is
    /// still unloading a module: exit would run the module's destructors (SoftHSM2's) on
    /// the main thread while the worker's `C_Finalize` and `dlclose` run them too, and the
    /// main thread then waits forever on a lock in unmapped code (seen: one stop in ten).
    pub fn stop(&mut self, timeout: Duration) {
        // The last answers are out: what they removed goes before the workers end.
        self.answers_sent();
        let mut workers = Vec::new();
        for slot in self.slots.drain(..) {
            let name = format!("provider \"{}\"", slot.settings.name);
            match slot.state {
                State::Serving(running) => workers.push((name, running.worker)),
                State::Starting(worker) => workers.push((name, worker)),
                State::Waiting | State::Down { .. } => {}
            }
        }
        for abandoned in self.abandoned.drain(..) {
            let name = format!("provider \"{}\" (replaced while starting)", abandoned.name);
            workers.push((name, abandoned.worker));
        }
        for retiring in self.retiring.drain(..) {
            let name = format!("provider \"{}\" (retiring)", retiring.name);
            workers.push((name, retiring.running.worker));
        }
        let mut threads: Vec<(String, std::thread::JoinHandle<()>)> = workers
            .into_iter()
            .map(|(name, worker)| (name, worker.stop()))
            .collect();
        threads.extend(
            self.writer
                .stop()
                .map(|thread| ("the key store writer".to_string(), thread)),
        );
        let until = Instant::now() + timeout;
        while threads.iter().any(|(_, t)| !t.is_finished()) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
        for (name, thread) in threads {
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                log::warn!(
                    "{name} did not finish within {} s (a device command in hand?): exiting without it",
                    timeout.as_secs()
                );
            }
        }
    }

    /// Answers one request (core operations, errors), or queues it for its provider's
    /// worker. Never fails: errors become a response status.
    pub fn dispatch(&mut self, request: Request, peer: Option<PeerCredentials>) -> Dispatched {
        let header = request.header;
        let mut app_name = None;
        let outcome = self.authenticate(&request, peer).and_then(|app| {
            app_name = app.as_ref().map(|a| a.name.clone());
            self.throttle(app.as_ref(), peer)?;
            let route = self.route(&header, app.as_ref())?;
            let operation = self
                .converter
                .body_to_operation(request.body, header.opcode)
                .map_err(|status| {
                    OpError::new(
                        status,
                        format!("decoding the {:?} body: {status}", header.opcode),
                        crate::error::hint_for(status),
                    )
                })?;
            match (route, app) {
                (Route::Core, Some(admin)) if header.opcode == Opcode::DeleteClient => {
                    match operation {
                        NativeOperation::DeleteClient(op) => {
                            self.start_delete_client(header, &admin, &op.client)
                        }
                        _ => Err(OpError::status(ResponseStatus::PsaErrorGenericError)),
                    }
                }
                (Route::Core, app) => Ok(Step::Result(self.execute_core(operation, app.as_ref())?)),
                (Route::Provider(index), Some(app)) => {
                    self.run_on(index, header, app.id(), operation)
                }
                (Route::Provider(_), None) => {
                    Err(OpError::status(ResponseStatus::NotAuthenticated))
                }
            }
        });
        match outcome {
            Ok(Step::Queued(ticket)) => Dispatched::Queued(ticket),
            Ok(Step::Result(result)) => {
                Dispatched::Done(self.respond(header, app_name.as_deref(), Ok(result)))
            }
            Err(error) => Dispatched::Done(self.respond(header, app_name.as_deref(), Err(error))),
        }
    }

    fn run_on(
        &mut self,
        index: usize,
        header: RequestHeader,
        app: AppId,
        operation: NativeOperation,
    ) -> Result<Step, OpError> {
        // What the client chose is checked before any device or file is touched.
        if let Some(name) = slots::name_created_by(&operation) {
            crate::key_store::check_name("application name", &app.name)?;
            crate::key_store::check_name("key name", name)?;
        }
        deprecated::check(&operation, &app.name, self.allow_deprecated)?;
        let ticket = self.next_ticket;
        let (operation, random) = match operation {
            NativeOperation::PsaGenerateRandom(op) if op.size > RANDOM_CHUNK => {
                self.limits.check_output(op.size)?;
                let parts = RandomParts {
                    remaining: op.size - RANDOM_CHUNK,
                    collected: zeroize::Zeroizing::new(Vec::with_capacity(op.size)),
                };
                (random_chunk(RANDOM_CHUNK), Some(parts))
            }
            operation => (operation, None),
        };
        self.slots[index].admit(Waiting {
            ticket,
            app: app.clone(),
            work: Work::Op(operation),
        })?;
        self.next_ticket += 1;
        let mut t = Ticket::new(header, app, Some(Instant::now() + self.request_timeout));
        t.random = random;
        self.tickets.insert(ticket, t);
        self.pump(index);
        Ok(Step::Queued(ticket))
    }

    /// The client of a request in hand hung up. A request still waiting for its provider
    /// is dropped (nothing of it has run); one running finishes as if the client were there
    /// (its key is stored, its destroy done), except that a large random request stops at
    /// its next chunk. A DeleteClient goes on to the end (each chunk is durable).
    pub fn cancel(&mut self, ticket: u64) {
        if self.deletions.contains_key(&ticket) {
            return;
        }
        let Some(t) = self.tickets.get_mut(&ticket) else {
            return;
        };
        t.cancelled = true;
        let opcode = t.header.opcode;
        let app = crate::error::escape_capped(&t.app.name, 64);
        for slot in &mut self.slots {
            if let Some(at) = slot.queue.iter().position(|w| w.ticket == ticket) {
                slot.queue.remove(at);
                self.tickets.remove(&ticket);
                log::info!(
                    "request dropped: app={app} provider=\"{}\" opcode={opcode:?}: its client hung up while it waited",
                    slot.name()
                );
                return;
            }
        }
    }

    /// Hands an idle serving instance its next batch: the jobs pinned to it first, then
    /// from its slot's queue.
    fn pump(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let limit = slot.batch_limit;
        let State::Serving(running) = &mut slot.state else {
            return;
        };
        if running.takes_more_reads(limit) {
            // Its second crypto thread serves reads as they come; what changes keys waits
            // until everything in flight is back (one batch of those at a time, as before),
            // and no read queued behind it overtakes it.
            let batch = slots::next_read_batch(&mut slot.queue, limit - running.in_flight);
            if !batch.is_empty() {
                let id = slot.id;
                self.hand_over(Some(index), None, id, batch);
            }
            return;
        }
        if running.busy() {
            return;
        }
        let mut batch = slots::next_batch(&mut running.pinned, limit);
        if batch.is_empty() {
            batch = slots::next_batch(&mut slot.queue, limit);
        }
        let id = slot.id;
        self.hand_over(Some(index), None, id, batch);
    }

    /// Runs a retiring instance's pinned jobs (the completions of its deferred requests).
    fn pump_retiring(&mut self, at: usize) {
        let retiring = &mut self.retiring[at];
        if retiring.running.busy() {
            return;
        }
        let batch = slots::next_batch(&mut retiring.running.pinned, usize::MAX);
        let id = retiring.id;
        self.hand_over(None, Some(at), id, batch);
    }

    /// Sends a batch to the worker of a slot's (or a retiring) instance, each request with a
    /// snapshot of its application's keys taken now (after every change the requests before
    /// it made). A request creating a name that is already taken (stored, or in a commit in
    /// flight) is refused here, before the device does any work.
    fn hand_over(
        &mut self,
        slot: Option<usize>,
        retiring: Option<usize>,
        id: ProviderId,
        batch: Vec<Waiting>,
    ) {
        let mut jobs = Vec::with_capacity(batch.len());
        let mut refused = false;
        for waiting in batch {
            if let Some(name) = slots::created_name(&waiting.work) {
                if self.store.is_taken(&KeyTriple::new(&waiting.app, id, name)) {
                    self.failed
                        .push((waiting.ticket, providers::name_taken(name)));
                    refused = true;
                    continue;
                }
            }
            let work = match waiting.work {
                // Keys in a commit in flight (being destroyed) are another request's.
                Work::Forget(names) => Work::Forget(
                    names
                        .into_iter()
                        .filter(|n| !self.store.is_held(&KeyTriple::new(&waiting.app, id, n)))
                        .collect(),
                ),
                work => work,
            };
            let snapshot = match &work {
                Work::Forget(names) => Snapshot::of_names(&self.store, &waiting.app, id, names),
                _ => Snapshot::of(&self.store, &waiting.app, id),
            };
            jobs.push(Job {
                snapshot,
                ticket: waiting.ticket,
                app: waiting.app,
                work,
            });
        }
        if refused {
            self.inbox.wake();
        }
        if jobs.is_empty() {
            return;
        }
        let tickets: Vec<u64> = jobs.iter().map(|j| j.ticket).collect();
        let count = jobs.len();
        let running = match (slot, retiring) {
            (Some(i), _) => self.slots[i].running_mut(),
            (None, Some(r)) => Some(&mut self.retiring[r].running),
            (None, None) => None,
        };
        let Some(running) = running else {
            return;
        };
        match running.worker.run(jobs) {
            Ok(()) => {
                if running.in_flight == 0 {
                    running.busy_since = Some(Instant::now());
                }
                running.in_flight += count;
            }
            // The worker is gone: answered with the next results.
            Err(error) => {
                for ticket in tickets {
                    self.failed.push((
                        ticket,
                        OpError::new(error.status, error.cause.clone(), error.hint),
                    ));
                }
                self.inbox.wake();
            }
        }
    }

    /// Finishes a request whose child process is done, with everything it wrote: the
    /// instance that started it completes it (its response comes out of `completed`).
    pub fn complete(&mut self, pending: PendingRequest, output: Vec<u8>) -> Dispatched {
        let PendingRequest {
            ticket,
            provider,
            instance,
            job,
        } = pending;
        // The child has closed its end of the pipe: collect it.
        let exit = nix::sys::wait::waitpid(job.child, None);
        let Some(t) = self.tickets.get(&ticket) else {
            return Dispatched::Done(Response::from_status(
                ResponseStatus::PsaErrorCommunicationFailure,
            ));
        };
        log::debug!(
            "deferred {:?} for \"{}\": child {} ended: {exit:?}",
            t.header.opcode,
            crate::error::escape(&t.app.name),
            job.child
        );
        let waiting = Waiting {
            ticket,
            app: t.app.clone(),
            // The child's slot is given back once the result is in the provider's hands.
            work: Work::Complete(job.state, output),
        };
        let serving = self
            .slots
            .iter()
            .position(|s| s.running().is_some_and(|r| r.instance() == instance));
        let retiring = self
            .retiring
            .iter()
            .position(|r| r.running.instance() == instance);
        match (serving, retiring) {
            (Some(i), _) => {
                let running = self.slots[i].running_mut().expect("found serving above");
                running.deferred = running.deferred.saturating_sub(1);
                running.pinned.push_back(waiting);
                self.pump(i);
                Dispatched::Queued(ticket)
            }
            (None, Some(r)) => {
                let running = &mut self.retiring[r].running;
                running.deferred = running.deferred.saturating_sub(1);
                running.pinned.push_back(waiting);
                self.pump_retiring(r);
                Dispatched::Queued(ticket)
            }
            (None, None) => {
                // Cannot happen: an instance waits for its deferred requests before it stops.
                let t = self.tickets.remove(&ticket).expect("looked up above");
                let error = removed_by_reload(provider, "while the request ran");
                Dispatched::Done(self.respond(t.header, Some(&t.app.name), Err(error)))
            }
        }
    }

    /// Encodes a result, or logs a failure, into the response for `header`.
    fn respond(
        &self,
        header: RequestHeader,
        app_name: Option<&str>,
        outcome: Result<NativeResult, OpError>,
    ) -> Response {
        let outcome = outcome.and_then(|result| {
            self.converter.result_to_body(result).map_err(|status| {
                OpError::new(
                    status,
                    format!("encoding the result: {status}"),
                    "report this as a bug",
                )
            })
        });
        match outcome {
            Ok(body) => {
                let mut response = Response::from_request_header(header, ResponseStatus::Success);
                response.body = body;
                response
            }
            Err(error) => {
                log::warn!(
                    "request failed: app={} provider={:?} opcode={:?} status={:?} cause=\"{}\" hint=\"{}\"",
                    // Names a client chose: escaped (one record per line) and capped.
                    crate::error::escape(app_name.unwrap_or("(unauthenticated)")),
                    header.provider,
                    header.opcode,
                    error.status,
                    crate::error::escape_capped(&error.cause, 1024),
                    error.hint
                );
                Response::from_request_header(header, error.status)
            }
        }
    }

    /// Refuses the request if its application is over its rate. Unauthenticated callers are
    /// counted by UID.
    fn throttle(
        &mut self,
        app: Option<&Application>,
        peer: Option<PeerCredentials>,
    ) -> Result<(), OpError> {
        let Some(limiter) = self.limiter.as_mut() else {
            return Ok(());
        };
        let client = match (app, peer) {
            (Some(app), _) => app.name.clone(),
            (None, Some(peer)) => format!("(unauthenticated uid {})", peer.uid),
            (None, None) => "(unauthenticated)".to_string(),
        };
        if limiter.admit(&client, std::time::Instant::now()) {
            return Ok(());
        }
        Err(OpError::new(
            ResponseStatus::PsaErrorInsufficientMemory,
            format!("over its rate limit of {} requests/s", limiter.per_second()),
            "the application sends more than core_settings.client_rate_limit allows: slow it down or raise the limit",
        ))
    }

    fn authenticate(
        &self,
        request: &Request,
        peer: Option<PeerCredentials>,
    ) -> Result<Option<Application>, OpError> {
        let auth_type = request.header.auth_type;
        if auth_type == AuthType::NoAuth {
            return Ok(None);
        }
        if auth_type != self.authenticator.auth_type() {
            return Err(OpError::new(
                ResponseStatus::AuthenticatorNotRegistered,
                format!(
                    "request uses {auth_type:?}, the service uses {:?}",
                    self.authenticator.auth_type()
                ),
                "the client must use the authenticator ListAuthenticators reports",
            ));
        }
        self.authenticator
            .authenticate(&request.auth, peer)
            .map(Some)
    }

    /// Decides who answers, before the body is decoded: the core, or an enabled provider
    /// that implements the opcode; and whether the caller may ask.
    fn route(&self, header: &RequestHeader, app: Option<&Application>) -> Result<Route, OpError> {
        let opcode = header.opcode;
        // As upstream Parsec: a provider that is not there first, then an operation its
        // provider does not implement (a core one sent to a crypto provider, or the reverse).
        let index = if header.provider == ProviderId::Core {
            None
        } else {
            Some(
                self.slots
                    .iter()
                    .position(|p| p.id == header.provider)
                    .ok_or_else(|| {
                        OpError::new(
                            ResponseStatus::ProviderNotRegistered,
                            format!("{:?} is not enabled", header.provider),
                            crate::error::hint_for(ResponseStatus::ProviderNotRegistered),
                        )
                    })?,
            )
        };
        if (header.provider == ProviderId::Core) != opcode.is_core() {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{opcode:?} sent to {:?}", header.provider),
                "core operations go to the core provider (0), cryptographic ones to a crypto provider",
            ));
        }
        let public = matches!(
            opcode,
            Opcode::Ping | Opcode::ListProviders | Opcode::ListOpcodes | Opcode::ListAuthenticators
        );
        if !public && app.is_none() {
            return Err(OpError::status(ResponseStatus::NotAuthenticated));
        }
        if opcode.is_admin() && !app.is_some_and(|a| a.is_admin) {
            return Err(OpError::status(ResponseStatus::AdminOperation));
        }
        let Some(index) = index else {
            return Ok(Route::Core);
        };
        if let Some(error) = self.slots[index].refusal() {
            return Err(error);
        }
        // From the running instance's list (its device's answer), else from the provider's
        // capability table: a provider that is starting (or waiting for its predecessor to
        // stop) takes requests into its queue.
        let serves = self.slots[index].serves(opcode);
        if !serves {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} does not implement {opcode:?}", header.provider),
                "see ListOpcodes for what this provider serves",
            ));
        }
        Ok(Route::Provider(index))
    }
}

fn random_chunk(size: usize) -> NativeOperation {
    NativeOperation::PsaGenerateRandom(psa_generate_random::Operation { size })
}

/// A request whose provider a reload removed (before or while it ran).
fn removed_by_reload(provider: ProviderId, when: &str) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorCommunicationFailure,
        format!("{provider:?} was removed by a reload {when}"),
        "the configuration changed: send the request again",
    )
}
