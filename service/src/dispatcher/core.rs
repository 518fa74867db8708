//! The core provider (id 0): pings, listings and DeleteClient, answered on the event loop
//! from the dispatcher's own state.

use super::Dispatcher;
use crate::authenticators::Application;
use crate::error::OpError;
use parsec_interface::operations::list_keys::KeyInfo;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::{
    list_authenticators, list_clients, list_keys, list_opcodes, list_providers, ping,
    NativeOperation, NativeResult,
};
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use std::collections::HashSet;

const CORE_UUID: &str = "47049873-2a43-4845-9d72-831eab668784";
/// What ListOpcodes says of the core provider: exactly upstream Parsec's list. ListClients
/// and DeleteClient (admin operations) are served too; upstream does not list them either.
pub(super) const CORE_OPCODES: &[Opcode] = &[
    Opcode::Ping,
    Opcode::ListProviders,
    Opcode::ListOpcodes,
    Opcode::ListAuthenticators,
    Opcode::ListKeys,
];

/// Whether a header's raw opcode is one the event loop answers ahead of queued cryptographic
/// work: every core request answered from memory, which is the listed ones and ListClients
/// (DeleteClient writes the key store and waits its turn).
pub fn is_cheap_opcode(raw: u32) -> bool {
    CORE_OPCODES
        .iter()
        .chain(&[Opcode::ListClients])
        .any(|&op| op as u32 == raw)
}

impl Dispatcher {
    pub(super) fn execute_core(
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
                let mut providers: Vec<ProviderInfo> = self
                    .slots
                    .iter()
                    .filter_map(|p| p.listed().map(|(info, _)| info))
                    .collect();
                providers.push(core_info());
                Ok(NativeResult::ListProviders(list_providers::Result {
                    providers,
                }))
            }
            NativeOperation::ListOpcodes(op) => {
                let opcodes: &[Opcode] = if op.provider_id == ProviderId::Core {
                    CORE_OPCODES
                } else {
                    self.slots
                        .iter()
                        .filter(|p| p.id == op.provider_id)
                        .find_map(|p| p.listed().map(|(_, opcodes)| opcodes))
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
                let enabled: Vec<u8> = self
                    .slots
                    .iter()
                    // Serving, or starting (after a reload): its entries are in memory;
                    // not a provider that failed to start, as upstream lists none of those.
                    .filter(|p| !p.is_down())
                    .map(|p| p.id as u8)
                    .collect();
                let keys = self
                    .store
                    .keys_of(&app.id())
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
                    clients: self.store.applications(self.authenticator.auth_type()),
                }))
            }
            other => Err(OpError::new(
                ResponseStatus::PsaErrorNotSupported,
                format!("{:?} is not a core operation", other.opcode()),
                "send it to a crypto provider",
            )),
        }
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
