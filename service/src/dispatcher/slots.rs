//! The providers as the dispatcher holds them: each behind its worker thread, with a bounded
//! queue of waiting requests.

use crate::error::OpError;
use crate::key_store::KeyEntry;
use crate::providers::worker::{Instance, Work, Worker};
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::NativeOperation;
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Instances are numbered across the whole run, reloads included.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

pub(super) fn next_instance() -> Instance {
    NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
}

/// A request waiting for its provider.
pub(super) struct Waiting {
    pub ticket: u64,
    pub app: String,
    pub work: Work,
}

pub(super) struct Remote {
    pub worker: Worker,
    pub name: String,
    pub id: ProviderId,
    pub info: ProviderInfo,
    pub opcodes: &'static [Opcode],
    /// Requests with the worker (one batch at a time).
    pub in_flight: usize,
    /// The most requests one batch may hold (`providers::batch_limit`).
    pub batch_limit: usize,
    pub queue: VecDeque<Waiting>,
    pub queue_limit: usize,
}

/// One provider, behind its worker.
pub(super) type Slot = Box<Remote>;

impl Remote {
    pub fn id(&self) -> ProviderId {
        self.id
    }

    pub fn info(&self) -> &ProviderInfo {
        &self.info
    }

    pub fn opcodes(&self) -> &'static [Opcode] {
        self.opcodes
    }

    pub fn instance(&self) -> Instance {
        self.worker.instance
    }

    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Records that a key's material is about to be forgotten (a tombstone), queued like
    /// any request, before the entry goes.
    pub fn before_forget(&mut self, entry: &KeyEntry) -> Result<(), OpError> {
        self.worker.before_forget(entry.clone())
    }

    /// Destroys a key's material, queued behind the worker's batch.
    pub fn destroy_material(&mut self, entry: KeyEntry) {
        self.worker.destroy(entry);
    }

    /// A key the provider made is durable in the store now.
    pub fn committed(&mut self, entry: KeyEntry) {
        self.worker.committed(entry);
    }

    pub fn release_device(&mut self) {
        // A busy worker holds its device until its job ends; the new provider may then fail
        // to open a device that takes one client (a simulator), and the reload is refused
        // with that reason.
        if self.busy() {
            log::warn!(
                "SIGHUP: provider \"{}\" is busy with a request: its device stays open",
                self.name
            );
        } else if !self.worker.release(Duration::from_secs(2)) {
            log::warn!(
                "SIGHUP: provider \"{}\" did not release its device",
                self.name
            );
        }
    }

    /// Takes a request into the queue, or refuses it when the queue is full.
    pub fn admit(&mut self, waiting: Waiting) -> Result<(), OpError> {
        if self.queue.len() >= self.queue_limit {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInsufficientMemory,
                format!(
                    "provider \"{}\" has {} requests waiting (core_settings.provider_queue_limit = {})",
                    self.name,
                    self.queue.len(),
                    self.queue_limit
                ),
                "the provider is slower than its clients: retry later, or raise core_settings.provider_queue_limit",
            ));
        }
        self.queue.push_back(waiting);
        Ok(())
    }

    /// The next batch: from the front of the queue, in order, up to `batch_limit` requests
    /// that touch different keys (a second request on a key of the batch waits for the next
    /// one, so that it sees what the first did).
    pub fn next_batch(&mut self) -> Vec<Waiting> {
        let mut batch = Vec::new();
        let mut keys: HashSet<(String, String)> = HashSet::new();
        while batch.len() < self.batch_limit {
            let Some(front) = self.queue.front() else {
                break;
            };
            if let Some(name) = key_name(&front.work) {
                if !keys.insert((front.app.clone(), name.to_string())) {
                    break;
                }
            }
            batch.extend(self.queue.pop_front());
        }
        batch
    }
}

/// The key a request names, if any.
fn key_name(work: &Work) -> Option<&str> {
    use NativeOperation as Op;
    let Work::Op(op) = work else {
        // A deferred generation's completion names its key in its state; should another
        // request have taken the name meanwhile, the key store refuses the second entry.
        return None;
    };
    Some(match op {
        Op::PsaGenerateKey(o) => &o.key_name,
        Op::PsaImportKey(o) => &o.key_name,
        Op::PsaExportPublicKey(o) => &o.key_name,
        Op::PsaExportKey(o) => &o.key_name,
        Op::PsaDestroyKey(o) => &o.key_name,
        Op::PsaSignHash(o) => &o.key_name,
        Op::PsaVerifyHash(o) => &o.key_name,
        Op::PsaSignMessage(o) => &o.key_name,
        Op::PsaVerifyMessage(o) => &o.key_name,
        Op::PsaAsymmetricEncrypt(o) => &o.key_name,
        Op::PsaAsymmetricDecrypt(o) => &o.key_name,
        Op::PsaAeadEncrypt(o) => &o.key_name,
        Op::PsaAeadDecrypt(o) => &o.key_name,
        Op::PsaCipherEncrypt(o) => &o.key_name,
        Op::PsaCipherDecrypt(o) => &o.key_name,
        Op::PsaRawKeyAgreement(o) => &o.private_key_name,
        _ => return None,
    })
}
