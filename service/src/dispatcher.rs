//! From a decoded request to a response: authenticate, decode the body, run the operation
//! (core operations here, the rest in the provider the header names), encode the result.
//!
//! Every failure is logged once, here, with the application, provider, opcode, the native
//! cause and a hint; the client gets the status alone.

use crate::authenticators::{Application, Authenticator, PeerCredentials};
use crate::config::Config;
use crate::error::OpError;
use crate::key_store::KeyStore;
use crate::providers::{self, AppKeys, Deferred, Limits, Provider, Start};
use crate::rate_limit::RateLimiter;
use parsec_interface::operations::list_keys::KeyInfo;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::{
    delete_client, list_authenticators, list_clients, list_keys, list_opcodes, list_providers,
    ping, Convert, NativeOperation, NativeResult,
};
use parsec_interface::operations_protobuf::ProtobufConverter;
use parsec_interface::requests::request::RequestHeader;
use parsec_interface::requests::{AuthType, Opcode, ProviderId, Request, Response, ResponseStatus};
use std::collections::HashSet;

const CORE_UUID: &str = "47049873-2a43-4845-9d72-831eab668784";
const CORE_OPCODES: &[Opcode] = &[
    Opcode::Ping,
    Opcode::ListProviders,
    Opcode::ListOpcodes,
    Opcode::ListAuthenticators,
    Opcode::ListKeys,
    Opcode::ListClients,
    Opcode::DeleteClient,
];

/// What `dispatch` did with a request.
pub enum Dispatched {
    Done(Response),
    /// Running in a child process: watch `job.output`, then call `Dispatcher::complete`.
    Deferred(PendingRequest),
}

pub struct PendingRequest {
    header: RequestHeader,
    app: String,
    provider: usize,
    pub job: Deferred,
}

enum Step {
    Result(NativeResult),
    Deferred(usize, String, Deferred),
}

/// Who answers a request.
enum Route {
    Core,
    /// The index of the provider in config order.
    Provider(usize),
}

/// Everything that answers requests: the authenticator, the providers and the key store.
pub struct Dispatcher {
    authenticator: Authenticator,
    providers: Vec<Box<dyn Provider>>,
    store: KeyStore,
    converter: ProtobufConverter,
    limiter: Option<RateLimiter>,
}

impl Dispatcher {
    /// Opens the key store and starts every configured provider, in config order.
    pub fn new(config: &Config) -> Result<Dispatcher, String> {
        let roots: Vec<(ProviderId, std::path::PathBuf)> = config
            .providers
            .iter()
            .map(|p| (providers::id_of(&p.kind), p.key_store_dir.clone()))
            .collect();
        let (mut store, damaged) =
            KeyStore::open(&roots).map_err(|e| format!("cannot open the key store: {e}"))?;
        for entry in &damaged {
            log::error!(
                "key store: skipping damaged entry {}: {}; its key is unusable until the file is restored or removed",
                entry.path.display(),
                entry.reason
            );
        }
        let limits = Limits {
            buffer_size_limit: config.buffer_size_limit,
        };
        let mut built = Vec::new();
        for settings in &config.providers {
            let provider = providers::build(settings, &mut store, limits)
                .map_err(|e| format!("provider \"{}\" failed to start: {e}", settings.name))?;
            built.extend(provider);
        }
        log::info!(
            "key store: {} keys loaded, {} damaged entries skipped",
            store.len(),
            damaged.len()
        );
        Ok(Dispatcher {
            authenticator: Authenticator::new(config.authenticator, config.admins.clone()),
            providers: built,
            store,
            converter: ProtobufConverter {},
            limiter: RateLimiter::new(config.client_rate_limit, config.client_rate_burst),
        })
    }

    /// Lets every provider close its device connection (before a reload builds new ones).
    pub fn release_devices(&mut self) {
        for provider in &mut self.providers {
            provider.release_device();
        }
    }

    /// Answers one request, or starts it in a child process when it would hold the event
    /// loop too long (see `complete`). Never fails: errors become a response status.
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
                    let keys = AppKeys::new(&mut self.store, &app.name, header.provider);
                    match self.providers[index].start(operation, keys)? {
                        Start::Deferred(job) => Ok(Step::Deferred(index, app.name, job)),
                        Start::Now(operation) => {
                            let keys = AppKeys::new(&mut self.store, &app.name, header.provider);
                            Ok(Step::Result(
                                self.providers[index].execute(operation, keys)?,
                            ))
                        }
                    }
                }
                (Route::Provider(_), None) => {
                    Err(OpError::status(ResponseStatus::NotAuthenticated))
                }
            }
        });
        match outcome {
            Ok(Step::Deferred(provider, app, job)) => Dispatched::Deferred(PendingRequest {
                header,
                app,
                provider,
                job,
            }),
            Ok(Step::Result(result)) => {
                Dispatched::Done(self.respond(header, app_name.as_deref(), Ok(result)))
            }
            Err(error) => Dispatched::Done(self.respond(header, app_name.as_deref(), Err(error))),
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
            "deferred {:?} for \"{app}\": child {} ended: {exit:?}",
            header.opcode,
            job.child
        );
        let keys = AppKeys::new(&mut self.store, &app, header.provider);
        let result = self.providers[provider].complete(job.state, output, keys);
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
                    app_name.unwrap_or("(unauthenticated)"),
                    header.provider,
                    header.opcode,
                    error.status,
                    error.cause,
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
            .providers
            .iter()
            .position(|p| p.id() == header.provider)
            .ok_or_else(|| {
                OpError::new(
                    ResponseStatus::ProviderNotRegistered,
                    format!("{:?} is not enabled", header.provider),
                    crate::error::hint_for(ResponseStatus::ProviderNotRegistered),
                )
            })?;
        if !self.providers[index].opcodes().contains(&opcode) {
            return Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} does not implement {opcode:?}", header.provider),
                "see ListOpcodes for what this provider serves",
            ));
        }
        Ok(Route::Provider(index))
    }

    fn execute_core(
        &mut self,
        operation: NativeOperation,
        app: Option<&Application>,
    ) -> Result<NativeResult, OpError> {
        match operation {
            NativeOperation::Ping(_) => Ok(NativeResult::Ping(ping::Result {
                wire_protocol_version_maj: 1,
                wire_protocol_version_min: 0,
            })),
            NativeOperation::ListProviders(_) => {
                let mut providers: Vec<ProviderInfo> =
                    self.providers.iter().map(|p| p.info()).collect();
                providers.push(core_info());
                Ok(NativeResult::ListProviders(list_providers::Result {
                    providers,
                }))
            }
            NativeOperation::ListOpcodes(op) => {
                let opcodes: &[Opcode] = if op.provider_id == ProviderId::Core {
                    CORE_OPCODES
                } else {
                    self.providers
                        .iter()
                        .find(|p| p.id() == op.provider_id)
                        .map(|p| p.opcodes())
                        .ok_or_else(|| {
                            OpError::new(
                                ResponseStatus::ProviderNotRegistered,
                                format!(
                                    "ListOpcodes for {:?}, which is not enabled",
                                    op.provider_id
                                ),
                                crate::error::hint_for(ResponseStatus::ProviderNotRegistered),
                            )
                        })?
                };
                Ok(NativeResult::ListOpcodes(list_opcodes::Result {
                    opcodes: opcodes.iter().copied().collect::<HashSet<_>>(),
                }))
            }
            NativeOperation::ListAuthenticators(_) => Ok(NativeResult::ListAuthenticators(
                list_authenticators::Result {
                    authenticators: vec![self.authenticator.info()],
                },
            )),
            NativeOperation::ListKeys(_) => {
                let app = app.ok_or_else(|| OpError::status(ResponseStatus::NotAuthenticated))?;
                let enabled: Vec<u8> = self.providers.iter().map(|p| p.id() as u8).collect();
                let keys = self
                    .store
                    .keys_of(&app.name)
                    .filter(|(k, _)| enabled.contains(&k.provider))
                    .filter_map(|(k, e)| {
                        let provider_id = ProviderId::try_from(k.provider).ok()?;
                        Some(KeyInfo {
                            provider_id,
                            name: k.name.clone(),
                            attributes: e.attributes,
                        })
                    })
                    .collect();
                Ok(NativeResult::ListKeys(list_keys::Result { keys }))
            }
            NativeOperation::ListClients(_) => {
                Ok(NativeResult::ListClients(list_clients::Result {
                    clients: self.store.applications(),
                }))
            }
            NativeOperation::DeleteClient(op) => {
                self.delete_client(&op.client)?;
                Ok(NativeResult::DeleteClient(delete_client::Result {}))
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} is not a core operation", other.opcode()),
                "send it to a crypto provider",
            )),
        }
    }

    /// Destroys every key of one application in every enabled provider.
    fn delete_client(&mut self, client: &str) -> Result<(), OpError> {
        let triples: Vec<_> = self
            .store
            .keys_of(client)
            .map(|(k, _)| k.clone())
            .filter(|k| self.providers.iter().any(|p| p.id() as u8 == k.provider))
            .collect();
        for triple in triples {
            let entry = self.store.remove(&triple)?;
            if let Some(provider) = self
                .providers
                .iter_mut()
                .find(|p| p.id() as u8 == triple.provider)
            {
                if let Err(e) = provider.destroy_material(&entry) {
                    log::warn!(
                        "DeleteClient: key \"{}\" of \"{client}\" forgotten, its material not destroyed: {e}",
                        triple.name
                    );
                }
            }
        }
        log::info!("DeleteClient: every key of \"{client}\" destroyed");
        Ok(())
    }
}

fn core_info() -> ProviderInfo {
    ProviderInfo {
        uuid: uuid::Uuid::parse_str(CORE_UUID).expect("constant UUID"),
        description: "Software provider that implements only administrative (i.e. no cryptographic) operations".into(),
        vendor: String::new(),
        version_maj: 0,
        version_min: 1,
        version_rev: 0,
        id: ProviderId::Core,
    }
}
