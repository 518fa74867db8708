//! The providers as the dispatcher holds them.
//!
//! A [`Slot`] is a provider the configuration names: its settings, its bounded queue of
//! waiting requests and its state. A [`Running`] is one *instance* of a provider: its worker
//! thread (which owns the provider object: the Mbed TLS key files, the TPM connection, the
//! PKCS#11 session and module), the jobs it has in hand and the jobs that only it may finish.
//!
//! A slot is `Starting` while its worker builds the provider (off the loop), `Serving` with
//! its running instance, `Waiting` for the previous instance of its provider to stop (a
//! reload replaced it: see `reload.rs`), or `Down` after its instance failed to start. A reload never has two instances of one provider
//! alive at once: the old one drains and stops first, so the successor's start-up recovery
//! and id choice see everything the old one did, and a PKCS#11 module is never initialised
//! twice or finalised under a worker that still uses it.

use crate::config::ProviderSettings;
use crate::error::OpError;
use crate::key_store::{AppId, KeyEntry};
use crate::providers::worker::{Instance, Work, Worker};
use crate::providers::Limits;
use parsec_interface::operations::list_providers::ProviderInfo;
use parsec_interface::operations::NativeOperation;
use parsec_interface::requests::{Opcode, ProviderId, ResponseStatus};
use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Instances are numbered across the whole run, reloads included.
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

pub(super) fn next_instance() -> Instance {
    NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed)
}

/// A request waiting for its provider.
pub(super) struct Waiting {
    pub ticket: u64,
    pub app: AppId,
    pub work: Work,
}

/// One live instance of a provider, on its worker thread.
pub(super) struct Running {
    pub worker: Worker,
    /// When the batch it runs now was handed to its worker.
    pub busy_since: Option<Instant>,
    /// Jobs handed to the worker whose results have not come back yet.
    pub in_flight: usize,
    /// Its requests running in child processes: only this instance may finish them.
    pub deferred: usize,
    /// Jobs only this instance may run (a deferred request's completion), ahead of the
    /// slot's queue.
    pub pinned: VecDeque<Waiting>,
    /// What it serves, where its device says less than the provider's table.
    pub opcodes: Option<Vec<Opcode>>,
    /// It runs operations that change nothing on two threads (`Built::shares`): it may be
    /// handed more of those while it runs others.
    pub shares: bool,
}

impl Running {
    pub fn instance(&self) -> Instance {
        self.worker.instance
    }

    pub fn busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Whether, busy, it may take more operations that change nothing now (`limit`: the
    /// most it may have in flight).
    pub fn takes_more_reads(&self, limit: usize) -> bool {
        self.shares && self.busy() && self.in_flight < limit && self.pinned.is_empty()
    }

    /// Destroys a key's material, queued behind the worker's batch.
    pub fn destroy_material(&mut self, entry: KeyEntry) {
        self.worker.destroy(entry);
    }

    /// A key the instance made is durable in the store now.
    pub fn committed(&mut self, entry: KeyEntry) {
        self.worker.committed(entry);
    }
}

/// What a configured provider is doing.
pub(super) enum State {
    /// Its worker is building it (`Worker::start`); requests queue meanwhile.
    Starting(Worker),
    Serving(Running),
    /// A reload replaced its instance: the previous one is draining (`Retiring`); this
    /// one starts when it has stopped. Requests queue meanwhile.
    Waiting,
    /// Its instance failed to start; it is tried again at `retry_at` (never unasked when
    /// `None`: a refused PIN).
    Down {
        error: String,
        retry_at: Option<Instant>,
        backoff: Duration,
    },
}

/// A provider the configuration names.
pub(super) struct Slot {
    pub settings: ProviderSettings,
    pub limits: Limits,
    pub id: ProviderId,
    pub state: State,
    /// The most requests one batch may hold (`providers::batch_limit`).
    pub batch_limit: usize,
    pub queue: VecDeque<Waiting>,
    pub queue_limit: usize,
    /// The settings its last serving instance ran with, while a reload's new ones are being
    /// tried: if the new ones cannot start (not for a refused PIN), the provider goes back
    /// to these, as upstream keeps its running configuration when a reload fails.
    pub previous: Option<(ProviderSettings, Limits)>,
    /// Since when its device has not answered a batch within the request timeout: requests
    /// are refused at once until it answers (`deadlines.rs`).
    pub not_answering: Option<Instant>,
}

/// An instance a reload took out of service: it finishes what it has in hand (its results
/// are stored, or undone when its provider was removed), then stops.
pub(super) struct Retiring {
    pub running: Running,
    pub id: ProviderId,
    pub name: String,
    /// The reload removed its provider (rather than replacing it): keys it makes now are
    /// undone, as nobody serves them.
    pub removed: bool,
    /// Told to stop; `Event::Stopped` comes when its thread has let its provider go.
    pub stopping: bool,
}

/// An instance a reload replaced or removed while its worker was still building it: when
/// it has started it is stopped unused (it never served), and its provider's next instance
/// waits for that, so that no two instances of a provider are ever alive at once.
pub(super) struct Abandoned {
    pub worker: Worker,
    pub id: ProviderId,
    pub name: String,
}

impl Slot {
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn running(&self) -> Option<&Running> {
        match &self.state {
            State::Serving(running) => Some(running),
            _ => None,
        }
    }

    pub fn running_mut(&mut self) -> Option<&mut Running> {
        match &mut self.state {
            State::Serving(running) => Some(running),
            _ => None,
        }
    }

    /// Its instance failed to start (requests are refused).
    pub fn is_down(&self) -> bool {
        matches!(self.state, State::Down { .. })
    }

    /// Serving or about to (requests are taken, also while it starts after a reload): what
    /// ListProviders and ListOpcodes say of it: the running instance's list where its device
    /// said less than the provider's table, else the table.
    pub fn listed(&self) -> Option<(ProviderInfo, &[Opcode])> {
        match &self.state {
            State::Down { .. } => None,
            state => crate::providers::info_of(&self.settings.kind).map(|info| {
                let opcodes = match state {
                    State::Serving(Running {
                        opcodes: Some(opcodes),
                        ..
                    }) => opcodes.as_slice(),
                    _ => crate::providers::opcodes_of(&self.settings.kind),
                };
                (info, opcodes)
            }),
        }
    }

    /// Whether it takes requests of this opcode (as `listed` says; the table while it is
    /// down, when `refusal` answers first).
    pub fn serves(&self, opcode: Opcode) -> bool {
        match self.listed() {
            Some((_, opcodes)) => opcodes.contains(&opcode),
            None => crate::providers::opcodes_of(&self.settings.kind).contains(&opcode),
        }
    }

    /// Why requests cannot be taken, if they cannot.
    pub fn refusal(&self) -> Option<OpError> {
        match &self.state {
            State::Down {
                error, retry_at, ..
            } => Some(OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                format!(
                    "provider \"{}\" failed to start: {error}; {}",
                    self.name(),
                    match retry_at {
                        Some(at) => format!(
                            "tried again in {} s",
                            at.saturating_duration_since(Instant::now()).as_secs()
                        ),
                        None => "not tried again until the next SIGHUP".to_string(),
                    }
                ),
                "see the service's log for the cause; fix it and send SIGHUP, or wait for the retry",
            )),
            _ => self.not_answering.map(|since| super::deadlines::not_answering(self.name(), since)),
        }
    }

    /// Takes a request into the queue, or refuses it when the queue is full or its device
    /// does not answer.
    pub fn admit(&mut self, waiting: Waiting) -> Result<(), OpError> {
        if let Some(since) = self.not_answering {
            return Err(super::deadlines::not_answering(self.name(), since));
        }
        if self.queue.len() >= self.queue_limit {
            return Err(OpError::new(
                ResponseStatus::PsaErrorInsufficientMemory,
                format!(
                    "provider \"{}\" has {} requests waiting (core_settings.provider_queue_limit = {})",
                    self.name(),
                    self.queue.len(),
                    self.queue_limit
                ),
                "the provider is slower than its clients: retry later, or raise core_settings.provider_queue_limit",
            ));
        }
        self.queue.push_back(waiting);
        Ok(())
    }
}

/// The next batch: from the front of the queue, in order, up to `limit` requests that touch
/// different keys (a second request on a key of the batch waits for the next one, so that it
/// sees what the first did).
pub(super) fn next_batch(queue: &mut VecDeque<Waiting>, limit: usize) -> Vec<Waiting> {
    let mut batch = Vec::new();
    let mut keys: HashSet<(AppId, String)> = HashSet::new();
    while batch.len() < limit {
        let Some(front) = queue.front() else {
            break;
        };
        if let Some(name) = key_name(&front.work) {
            if !keys.insert((front.app.clone(), name.to_string())) {
                break;
            }
        }
        batch.extend(queue.pop_front());
    }
    batch
}

/// More work for a busy instance that shares (`Running::takes_more_reads`): up to `limit`
/// requests that change nothing, from the front of the queue, in order. It stops at the
/// first request that changes keys: that one waits until everything in flight is back
/// (then it goes in the next batch), so a steady stream of reads never starves a create or
/// a destroy queued among them.
pub(super) fn next_read_batch(queue: &mut VecDeque<Waiting>, limit: usize) -> Vec<Waiting> {
    let mut batch = Vec::new();
    while batch.len() < limit {
        if !queue.front().is_some_and(|w| w.work.changes_nothing()) {
            break;
        }
        batch.extend(queue.pop_front());
    }
    batch
}

/// The key a request names, if any.
pub(super) fn key_name(work: &Work) -> Option<&str> {
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

/// The name a request creates a key under, if it creates one.
pub(super) fn created_name(work: &Work) -> Option<&str> {
    match work {
        Work::Op(op) => name_created_by(op),
        Work::Complete(..) | Work::Forget(_) => None,
    }
}

pub(super) fn name_created_by(op: &NativeOperation) -> Option<&str> {
    match op {
        NativeOperation::PsaGenerateKey(o) => Some(&o.key_name),
        NativeOperation::PsaImportKey(o) => Some(&o.key_name),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{next_read_batch, Waiting};
    use crate::key_store::AppId;
    use crate::providers::worker::Work;
    use parsec_interface::operations::{psa_destroy_key, psa_export_public_key, NativeOperation};
    use parsec_interface::requests::AuthType;
    use std::collections::VecDeque;

    fn waiting(ticket: u64, op: NativeOperation) -> Waiting {
        Waiting {
            ticket,
            app: AppId::new(AuthType::Direct, "app"),
            work: Work::Op(op),
        }
    }

    fn read(ticket: u64) -> Waiting {
        let key_name = format!("k{ticket}");
        waiting(
            ticket,
            NativeOperation::PsaExportPublicKey(psa_export_public_key::Operation { key_name }),
        )
    }

    #[test]
    fn reads_handed_to_a_busy_provider_never_overtake_a_change() {
        let destroy = NativeOperation::PsaDestroyKey(psa_destroy_key::Operation {
            key_name: "k3".into(),
        });
        let mut queue: VecDeque<Waiting> =
            VecDeque::from([read(1), read(2), waiting(3, destroy), read(4), read(5)]);
        let batch = next_read_batch(&mut queue, 32);
        let tickets = |w: &[Waiting]| w.iter().map(|w| w.ticket).collect::<Vec<_>>();
        assert_eq!(tickets(&batch), [1, 2]);
        // The destroy waits for everything in flight, with the reads behind it.
        assert_eq!(tickets(queue.make_contiguous()), [3, 4, 5]);
        assert!(next_read_batch(&mut queue, 32).is_empty());
        // The limit counts what may still go in flight.
        let mut queue = VecDeque::from([read(6), read(7), read(8)]);
        assert_eq!(tickets(&next_read_batch(&mut queue, 2)), [6, 7]);
    }
}
