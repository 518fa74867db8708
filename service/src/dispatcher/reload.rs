//! A provider instance's life, and reloads: the one place where instances start, retire,
//! drain and stop.
//!
//! A reload (SIGHUP) compares each configured provider with the running one:
//! - the same settings: the running instance stays as it is, its device untouched (what
//!   config-management tools send most: a SIGHUP with nothing changed);
//! - new settings: the running instance *retires*: it takes no new requests, finishes those
//!   in hand (their keys are stored, their destroys done), waits for their commits, then
//!   stops on its own thread (closing its device, finalising its module). Only then does the
//!   successor start, with the store's entries for it read again, so that its start-up
//!   recovery and the key ids it hands out see everything its predecessor did. Requests that
//!   arrive meanwhile wait in the provider's queue;
//! - removed: as a retiring one, but a key it makes now is undone by it (nobody would serve
//!   it) and its client hears so; requests still waiting are answered at once;
//! - added: started at once (or after a retiring instance of the same provider stops).
//!
//! A successor that cannot start leaves its provider `Down`: its requests are refused with
//! the cause, the other providers serve on, and it is tried again with backoff (1 s doubling
//! to 60 s) or at the next SIGHUP.

use super::*;

/// The longest wait between two tries at starting a provider that failed.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// A slot for a configured provider, not started yet.
pub(super) fn new_slot(
    config: &Config,
    settings: &crate::config::ProviderSettings,
    limits: Limits,
) -> Slot {
    Slot {
        settings: settings.clone(),
        limits,
        id: providers::id_of(&settings.kind),
        state: State::Waiting,
        known: None,
        batch_limit: providers::batch_limit(&settings.kind),
        queue: Default::default(),
        queue_limit: queue_limit(config, settings),
    }
}

/// A device's queue is bounded by provider_queue_limit; the software provider answers in
/// well under a millisecond per request, so its queue is bounded by the connections alone
/// (one request in hand per connection), as it was when it ran on the event loop.
fn queue_limit(config: &Config, settings: &crate::config::ProviderSettings) -> usize {
    if settings.kind.is_software() {
        config.max_connections.max(config.provider_queue_limit)
    } else {
        config.provider_queue_limit
    }
}

impl Dispatcher {
    /// Switches to a new configuration (already checked). Never waits on a device: instances
    /// whose settings changed drain and stop on their own threads, and their successors
    /// start when they have. Returns the responses to send at once.
    pub fn reload(&mut self, config: &Config) -> Vec<(u64, Dispatched)> {
        self.authenticator = Authenticator::new(config.authenticator, config.admins.clone());
        self.limiter = RateLimiter::new(config.client_rate_limit, config.client_rate_burst);
        let limits = Limits {
            buffer_size_limit: config.buffer_size_limit,
            max_keygen_processes: config.max_keygen_processes,
        };
        self.limits = limits;
        let mut old = std::mem::take(&mut self.slots);
        let mut answers = Vec::new();
        for settings in &config.providers {
            let id = providers::id_of(&settings.kind);
            let Some(at) = old.iter().position(|s| s.id == id) else {
                let mut slot = new_slot(config, settings, limits);
                slot.known = self
                    .retiring
                    .iter()
                    .rev()
                    .find(|r| r.id == id)
                    .map(|r| (r.running.info.clone(), r.running.opcodes));
                // A removed instance still draining serves a configured provider again: what
                // it makes now is stored.
                for retiring in self.retiring.iter_mut().filter(|r| r.id == id) {
                    retiring.removed = false;
                }
                log::info!("SIGHUP: provider \"{}\" added", settings.name);
                self.slots.push(slot);
                continue;
            };
            let mut slot = old.remove(at);
            slot.queue_limit = queue_limit(config, settings);
            if slot.settings == *settings && slot.limits == limits {
                if let State::Down { retry_at, .. } = &mut slot.state {
                    // Asked again: try again now.
                    *retry_at = Instant::now();
                }
                self.slots.push(slot);
                continue;
            }
            log::info!(
                "SIGHUP: provider \"{}\" has new settings: its running instance finishes what it has in hand, then its successor starts",
                settings.name
            );
            slot.settings = settings.clone();
            slot.limits = limits;
            slot.batch_limit = providers::batch_limit(&settings.kind);
            if let State::Serving(running) = std::mem::replace(&mut slot.state, State::Waiting) {
                self.retire(running, id, &settings.name, false);
            }
            self.slots.push(slot);
        }
        for mut slot in old {
            log::info!(
                "SIGHUP: provider \"{}\" removed: it finishes what it has in hand, then stops",
                slot.name()
            );
            for waiting in slot.queue.drain(..) {
                let error = removed_by_reload(slot.id, "before the request ran");
                answers.extend(self.answer_now(waiting.ticket, error));
            }
            let name = slot.settings.name.clone();
            if let State::Serving(running) = slot.state {
                self.retire(running, slot.id, &name, true);
            } else if !self.retiring.iter().any(|r| r.id == slot.id) {
                self.store.unload(slot.id);
            }
        }
        answers.extend(self.advance());
        self.fold_chunks(answers)
    }

    fn retire(&mut self, running: Running, id: ProviderId, name: &str, removed: bool) {
        self.retiring.push(Retiring {
            running,
            id,
            name: name.to_string(),
            removed,
            stopping: false,
        });
    }

    /// Answers a request that never reached a worker.
    fn answer_now(&mut self, ticket: u64, error: OpError) -> Option<(u64, Dispatched)> {
        let t = self.tickets.remove(&ticket)?;
        let response = self.respond(t.header, Some(&t.app), Err(error));
        Some((ticket, Dispatched::Done(response)))
    }

    /// Moves every transition on: retiring instances with nothing in hand are told to stop;
    /// waiting providers with no instance of theirs left alive start.
    pub(super) fn advance(&mut self) -> Vec<(u64, Dispatched)> {
        let drained: Vec<usize> = (0..self.retiring.len())
            .filter(|&r| !self.retiring[r].stopping && self.drained(r))
            .collect();
        for r in drained {
            let retiring = &mut self.retiring[r];
            log::info!(
                "provider \"{}\": its retiring instance {} has finished its requests and stops",
                retiring.name,
                retiring.running.instance()
            );
            retiring.stopping = true;
            retiring.running.worker.close();
        }
        let mut answers = Vec::new();
        for i in 0..self.slots.len() {
            let id = self.slots[i].id;
            let waiting = matches!(self.slots[i].state, State::Waiting);
            if waiting && !self.retiring.iter().any(|r| r.id == id) {
                answers.extend(self.start_slot(i));
            }
        }
        answers
    }

    /// Whether a retiring instance has nothing left in hand: no job with its worker, no
    /// child process of its, no job pinned to it, no commit of its changes in flight.
    fn drained(&self, r: usize) -> bool {
        let running = &self.retiring[r].running;
        let instance = running.instance();
        running.in_flight == 0
            && running.deferred == 0
            && running.pinned.is_empty()
            && !self
                .committing
                .values()
                .flatten()
                .any(|s| s.instance == instance)
    }

    /// A retiring instance's thread has let its provider go.
    pub(super) fn stopped(&mut self, instance: Instance) -> Vec<(u64, Dispatched)> {
        let Some(at) = self
            .retiring
            .iter()
            .position(|r| r.running.instance() == instance)
        else {
            return Vec::new();
        };
        let retiring = self.retiring.remove(at);
        log::info!(
            "provider \"{}\": instance {instance} stopped",
            retiring.name
        );
        // Its thread has sent its last event and returns (dropped, it is detached).
        let id = retiring.id;
        let configured = self.slots.iter().any(|s| s.id == id);
        if !configured && !self.retiring.iter().any(|r| r.id == id) {
            // Removed for good: its entries stay on disk for when it comes back.
            self.store.unload(id);
        }
        self.advance()
    }

    /// Starts a waiting (or down) provider's instance: its entries are read from its key
    /// store directory again, then it is built and its queue served. A failure leaves it
    /// down, its waiting requests answered with the cause.
    fn start_slot(&mut self, i: usize) -> Vec<(u64, Dispatched)> {
        let settings = self.slots[i].settings.clone();
        let (id, limits) = (self.slots[i].id, self.slots[i].limits);
        let started = self
            .store
            .load(id, &settings.key_store_dir)
            .map_err(|e| {
                format!(
                    "cannot read its key store directory {}: {e}",
                    settings.key_store_dir.display()
                )
            })
            .and_then(|damaged| {
                log_damaged(&damaged);
                self.start_instance(&settings, limits)
            });
        match started {
            Ok(Some(running)) => {
                log::info!(
                    "provider \"{}\" started (instance {}), {} requests waiting",
                    settings.name,
                    running.instance(),
                    self.slots[i].queue.len()
                );
                let slot = &mut self.slots[i];
                slot.known = Some((running.info.clone(), running.opcodes));
                slot.state = State::Serving(running);
                self.pump(i);
                Vec::new()
            }
            Ok(None) => {
                // skip_if_no_tpm and no TPM: as at start-up, the service runs without it.
                let slot = self.slots.remove(i);
                self.store.unload(id);
                let mut answers = Vec::new();
                for waiting in slot.queue {
                    let error = removed_by_reload(id, "before the request ran");
                    answers.extend(self.answer_now(waiting.ticket, error));
                }
                answers
            }
            Err(error) => {
                let backoff = match &self.slots[i].state {
                    State::Down { backoff, .. } => (*backoff * 2).min(MAX_BACKOFF),
                    _ => Duration::from_secs(1),
                };
                log::error!(
                    "provider \"{}\" failed to start: {error}; the other providers serve on, and it is tried again in {} s (or at the next SIGHUP)",
                    settings.name,
                    backoff.as_secs()
                );
                self.slots[i].state = State::Down {
                    error,
                    retry_at: Instant::now() + backoff,
                    backoff,
                };
                let queue = std::mem::take(&mut self.slots[i].queue);
                let mut answers = Vec::new();
                for waiting in queue {
                    if let Some(error) = self.slots[i].refusal() {
                        answers.extend(self.answer_now(waiting.ticket, error));
                    }
                }
                answers
            }
        }
    }

    /// When a provider that failed to start is next tried.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                State::Down { retry_at, .. } => Some(retry_at),
                _ => None,
            })
            .min()
    }

    /// Tries again to start the providers whose time has come.
    pub fn tick(&mut self) -> Vec<(u64, Dispatched)> {
        let now = Instant::now();
        let mut answers = Vec::new();
        let mut i = 0;
        while i < self.slots.len() {
            let due =
                matches!(self.slots[i].state, State::Down { retry_at, .. } if retry_at <= now);
            let count = self.slots.len();
            if due {
                answers.extend(self.start_slot(i));
            }
            // A slot removed by `start_slot` (no TPM after all) shifts the rest.
            if self.slots.len() == count {
                i += 1;
            }
        }
        self.fold_chunks(answers)
    }

    /// The live instance with this number, serving or retiring.
    pub(super) fn running_mut(&mut self, instance: Instance) -> Option<&mut Running> {
        let serving = self
            .slots
            .iter_mut()
            .filter_map(Slot::running_mut)
            .find(|r| r.instance() == instance);
        match serving {
            Some(running) => Some(running),
            None => self
                .retiring
                .iter_mut()
                .map(|r| &mut r.running)
                .find(|r| r.instance() == instance),
        }
    }

    /// The slot this instance serves, if it is still serving.
    pub(super) fn serving(&self, instance: Instance) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.running().is_some_and(|r| r.instance() == instance))
    }

    /// Whether this instance's provider was removed by a reload (or the instance is gone).
    pub(super) fn is_removed(&self, instance: Instance) -> bool {
        if self.serving(instance).is_some() {
            return false;
        }
        self.retiring
            .iter()
            .find(|r| r.running.instance() == instance)
            .map_or(true, |r| r.removed)
    }

    /// Whether every instance of this provider is serving (none starting, down or retiring).
    pub(super) fn settled(&self, id: ProviderId) -> bool {
        !self.retiring.iter().any(|r| r.id == id)
            && self
                .slots
                .iter()
                .filter(|s| s.id == id)
                .all(|s| s.running().is_some())
    }
}
