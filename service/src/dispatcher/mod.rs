//! From a decoded request to a response: authenticate, decode the body, run the operation
//! (core operations in `core`, the rest in the provider the header names), encode the result.
//!
//! The software provider runs on the event loop; each hardware provider runs on a worker
//! thread of its own behind a bounded queue (`slots`, `providers::worker`): its requests are
//! `Queued`, and their responses come out of `completed` once the worker is done.
//!
//! Every failure is logged once, here, with the application, provider, opcode, the native
//! cause and a hint; the client gets the status alone.

mod completion;
mod core;
mod slots;

use crate::authenticators::{Application, Authenticator, PeerCredentials};
use crate::config::Config;
use crate::error::OpError;
use crate::key_store::{KeyStore, KeyTriple};
use crate::providers::worker::{Done, Inbox, Job, Outbox, Worker};
use crate::providers::{self, AppKeys, Change, Deferred, Limits, Snapshot, Start};
use crate::rate_limit::RateLimiter;
use parsec_interface::operations::{psa_generate_random, Convert, NativeOperation, NativeResult};
use parsec_interface::operations_protobuf::ProtobufConverter;
use parsec_interface::requests::request::RequestHeader;
use parsec_interface::requests::{AuthType, Opcode, ProviderId, Request, Response, ResponseStatus};
use slots::{Remote, Slot, Waiting};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// What `dispatch` did with a request.
pub enum Dispatched {
    Done(Response),
    /// Running in a child process: watch `job.output`, then call `Dispatcher::complete`.
    Deferred(PendingRequest),
    /// Waiting for, or running on, a hardware provider's worker: its response comes out of
    /// `Dispatcher::completed` under this ticket.
    Queued(u64),
}

pub struct PendingRequest {
    header: RequestHeader,
    app: String,
    /// By identity: a reload may remove or reorder providers meanwhile.
    provider: ProviderId,
    pub job: Deferred,
}

enum Step {
    Result(NativeResult),
    Deferred(String, Deferred),
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
    app: String,
    /// A large random request, served in chunks (see `RANDOM_CHUNK`).
    random: Option<RandomParts>,
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
    slots: Vec<Slot>,
    store: KeyStore,
    converter: ProtobufConverter,
    limiter: Option<RateLimiter>,
    /// Results of the workers; handed from one dispatcher to the next on reload.
    inbox: Inbox,
    tickets: HashMap<u64, Ticket>,
    next_ticket: u64,
    /// Tickets that could not be handed to their worker, answered by `completed`.
    failed: Vec<(u64, OpError)>,
    limits: Limits,
}

impl Dispatcher {
    /// Opens the key store and starts every configured provider, in config order.
    pub fn new(config: &Config) -> Result<Dispatcher, String> {
        let inbox = Inbox::new();
        let outbox = inbox.outbox();
        Self::build(config, inbox, outbox)
    }

    /// A dispatcher for a new configuration whose workers report to this one's inbox, so
    /// that `adopt` can hand it the requests still in hand.
    pub fn successor(&self, config: &Config) -> Result<Dispatcher, String> {
        Self::build(config, Inbox::new(), self.inbox.outbox())
    }

    fn build(config: &Config, inbox: Inbox, outbox: Outbox) -> Result<Dispatcher, String> {
        let roots: Vec<(ProviderId, std::path::PathBuf)> = config
            .providers
            .iter()
            .map(|p| (providers::id_of(&p.kind), p.key_store_dir.clone()))
            .collect();
        let (mut store, damaged) =
            KeyStore::open(&roots).map_err(|e| format!("cannot open the key store: {e}"))?;
        for entry in &damaged {
            log::error!(
                "key store: skipping damaged entry {}: {}; its key material is kept (never swept): restore the file from a backup and the key works again",
                entry.path.display(),
                entry.reason
            );
        }
        let limits = Limits {
            buffer_size_limit: config.buffer_size_limit,
            max_keygen_processes: config.max_keygen_processes,
        };
        let mut slots = Vec::new();
        for settings in &config.providers {
            let failed = |e: String| format!("provider \"{}\" failed to start: {e}", settings.name);
            let Some(provider) = providers::build(settings, &mut store, limits).map_err(failed)?
            else {
                continue;
            };
            if !providers::is_hardware(&settings.kind) {
                slots.push(Slot::local(provider));
                continue;
            }
            let (id, info, opcodes) = (provider.id(), provider.info(), provider.opcodes());
            let worker = Worker::spawn(
                &settings.name,
                slots::next_instance(),
                provider,
                outbox.clone(),
            )
            .map_err(failed)?;
            slots.push(Slot::Remote(Box::new(Remote {
                worker,
                name: settings.name.clone(),
                id,
                info,
                opcodes,
                busy: false,
                queue: VecDeque::new(),
                queue_limit: config.provider_queue_limit,
            })));
        }
        let workers = slots.iter().filter(|s| s.instance().is_some()).count();
        log::info!(
            "key store: {} keys loaded, {} damaged entries skipped; threads: 1 event loop + {workers} provider workers",
            store.len(),
            damaged.len()
        );
        Ok(Dispatcher {
            authenticator: Authenticator::new(config.authenticator, config.admins.clone()),
            slots,
            store,
            converter: ProtobufConverter {},
            limiter: RateLimiter::new(config.client_rate_limit, config.client_rate_burst),
            inbox,
            tickets: HashMap::new(),
            next_ticket: 1,
            failed: Vec::new(),
            limits,
        })
    }

    /// The waker the workers wake when a result is ready (the event loop's).
    pub fn set_waker(&self, waker: mio::Waker) {
        self.inbox.set_waker(waker);
    }

    /// Requests in the hands of workers, queued or running.
    pub fn outstanding(&self) -> usize {
        self.tickets.len()
    }

    /// Lets every provider close its device connection (before a reload builds new ones).
    pub fn release_devices(&mut self) {
        for slot in &mut self.slots {
            slot.release_device();
        }
    }

    /// Answers one request, starts it in a child process, or queues it for a hardware
    /// provider's worker. Never fails: errors become a response status.
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
                (Route::Core, app) => Ok(Step::Result(self.execute_core(operation, app.as_ref())?)),
                (Route::Provider(index), Some(app)) => {
                    self.run_on(index, header, app.name, operation)
                }
                (Route::Provider(_), None) => {
                    Err(OpError::status(ResponseStatus::NotAuthenticated))
                }
            }
        });
        match outcome {
            Ok(Step::Deferred(app, job)) => Dispatched::Deferred(PendingRequest {
                header,
                app,
                provider: header.provider,
                job,
            }),
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
        app: String,
        operation: NativeOperation,
    ) -> Result<Step, OpError> {
        match &mut self.slots[index] {
            Slot::Local { provider, .. } => {
                let keys = AppKeys::new(&mut self.store, &app, header.provider);
                match provider.start(operation, keys)? {
                    Start::Deferred(job) => Ok(Step::Deferred(app, job)),
                    Start::Now(operation) => {
                        let keys = AppKeys::new(&mut self.store, &app, header.provider);
                        Ok(Step::Result(provider.execute(operation, keys)?))
                    }
                }
            }
            Slot::Remote(remote) => {
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
                remote.admit(Waiting {
                    ticket,
                    app: app.clone(),
                    op: operation,
                })?;
                self.next_ticket += 1;
                self.tickets.insert(
                    ticket,
                    Ticket {
                        header,
                        app,
                        random,
                    },
                );
                self.pump(index);
                Ok(Step::Queued(ticket))
            }
        }
    }

    /// Hands an idle worker the next request of its queue, with a snapshot of its
    /// application's keys taken now (after every change the requests before it made).
    fn pump(&mut self, index: usize) {
        let Slot::Remote(remote) = &mut self.slots[index] else {
            return;
        };
        while !remote.busy {
            let Some(waiting) = remote.queue.pop_front() else {
                return;
            };
            let snapshot = Snapshot::of(&self.store, &waiting.app, remote.id);
            let ticket = waiting.ticket;
            let sent = remote.worker.run(Job {
                ticket,
                app: waiting.app,
                op: waiting.op,
                snapshot,
            });
            match sent {
                Ok(()) => remote.busy = true,
                // The worker is gone: answered with the next results.
                Err(error) => self.failed.push((ticket, error)),
            }
        }
    }

    /// Finishes a request `dispatch` deferred, with everything its child process wrote.
    pub fn complete(&mut self, pending: PendingRequest, output: Vec<u8>) -> Response {
        let PendingRequest {
            header,
            app,
            provider,
            job,
        } = pending;
        // The child has closed its end of the pipe: collect it.
        let exit = nix::sys::wait::waitpid(job.child, None);
        log::debug!(
            "deferred {:?} for \"{}\": child {} ended: {exit:?}",
            header.opcode,
            crate::error::escape(&app),
            job.child
        );
        let result = match self.slots.iter_mut().find(|s| s.id() == provider) {
            Some(Slot::Local { provider, .. }) => {
                let keys = AppKeys::new(&mut self.store, &app, header.provider);
                provider.complete(job.state, output, keys)
            }
            _ => Err(removed_by_reload(provider, "while the request ran")),
        };
        self.respond(header, Some(&app), result)
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
                    crate::error::escape_capped(&error.cause, 512),
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
        if (header.provider == ProviderId::Core) != opcode.is_core() {
            return Err(OpError::new(
                ResponseStatus::InvalidHeader,
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
        if header.provider == ProviderId::Core {
            return Ok(Route::Core);
        }
        let index = self
            .slots
            .iter()
            .position(|p| p.id() == header.provider)
            .ok_or_else(|| {
                OpError::new(
                    ResponseStatus::ProviderNotRegistered,
                    format!("{:?} is not enabled", header.provider),
                    crate::error::hint_for(ResponseStatus::ProviderNotRegistered),
                )
            })?;
        if !self.slots[index].opcodes().contains(&opcode) {
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
