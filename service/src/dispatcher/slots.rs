//! The providers as the dispatcher holds them: the software provider on the event loop, each
//! hardware provider behind its worker thread with a bounded queue of waiting requests.

use crate::error::OpError;
use crate::key_store::KeyEntry;
use crate::providers::worker::{Instance, Worker};
use crate::providers::Provider;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::NativeOperation;
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Instances are numbered across the whole run, reloads included.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

pub(super) fn next_instance() -> Instance {
    NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
}

/// A request waiting for a hardware provider's device.
pub(super) struct Waiting {
    pub ticket: u64,
    pub app: String,
    pub op: NativeOperation,
}

pub(super) struct Remote {
    pub worker: Worker,
    pub name: String,
    pub id: ProviderId,
    pub info: ProviderInfo,
    pub opcodes: &'static [Opcode],
    /// A job is with the worker.
    pub busy: bool,
    pub queue: VecDeque<Waiting>,
    pub queue_limit: usize,
}

pub(super) enum Slot {
    Local {
        provider: Box<dyn Provider + Send>,
        info: ProviderInfo,
    },
    Remote(Box<Remote>),
}

impl Slot {
    pub fn local(provider: Box<dyn Provider + Send>) -> Slot {
        let info = provider.info();
        Slot::Local { provider, info }
    }

    pub fn id(&self) -> ProviderId {
        match self {
            Slot::Local { provider, .. } => provider.id(),
            Slot::Remote(remote) => remote.id,
        }
    }

    pub fn info(&self) -> &ProviderInfo {
        match self {
            Slot::Local { info, .. } => info,
            Slot::Remote(remote) => &remote.info,
        }
    }

    pub fn opcodes(&self) -> &'static [Opcode] {
        match self {
            Slot::Local { provider, .. } => provider.opcodes(),
            Slot::Remote(remote) => remote.opcodes,
        }
    }

    pub fn instance(&self) -> Option<Instance> {
        match self {
            Slot::Local { .. } => None,
            Slot::Remote(remote) => Some(remote.worker.instance),
        }
    }

    /// Records that a key's material is about to be forgotten (software provider: a
    /// tombstone). Hardware providers' workers record nothing.
    pub fn before_forget(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        match self {
            Slot::Local { provider, .. } => provider.before_forget(entry),
            Slot::Remote(_) => Ok(()),
        }
    }

    /// Destroys a key's material: at once on the loop, or queued behind the worker's job.
    pub fn destroy_material(&mut self, entry: KeyEntry) -> Result<(), OpError> {
        match self {
            Slot::Local { provider, .. } => provider.destroy_material(&entry),
            Slot::Remote(remote) => {
                remote.worker.destroy(entry);
                Ok(())
            }
        }
    }

    /// A key the provider made is durable in the store now.
    pub fn committed(&mut self, entry: KeyEntry) {
        match self {
            Slot::Local { provider, .. } => provider.committed(&entry),
            Slot::Remote(remote) => remote.worker.committed(entry),
        }
    }

    pub fn release_device(&mut self) {
        match self {
            Slot::Local { provider, .. } => provider.release_device(),
            Slot::Remote(remote) => {
                // A busy worker holds its device until its job ends; the new provider may
                // then fail to open a device that takes one client (a simulator), and the
                // reload is refused with that reason.
                if remote.busy {
                    log::warn!(
                        "SIGHUP: provider \"{}\" is busy with a request: its device stays open",
                        remote.name
                    );
                } else if !remote.worker.release(Duration::from_secs(2)) {
                    log::warn!(
                        "SIGHUP: provider \"{}\" did not release its device",
                        remote.name
                    );
                }
            }
        }
    }
}

impl Remote {
    /// Takes a request into the queue, or refuses it when the queue is full.
    pub fn admit(&mut self, waiting: Waiting) -> Result<(), OpError> {
        if self.queue.len() >= self.queue_limit {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInsufficientMemory,
                format!(
                    "provider \"{}\" has {} requests waiting for its device (core_settings.provider_queue_limit = {})",
                    self.name,
                    self.queue.len(),
                    self.queue_limit
                ),
                "the device is slower than its clients: retry later, or raise core_settings.provider_queue_limit",
            ));
        }
        self.queue.push_back(waiting);
        Ok(())
    }
}
