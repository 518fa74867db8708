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
//! New settings that the file system already shows cannot start (a module or device that is
//! not there: `providers::preflight`) are not taken: the running instance stays untouched.
//! A successor that cannot start leaves its provider `Down`: its requests are refused with
//! the cause, the other providers serve on, and it is tried again with backoff (1 s doubling
//! to 60 s) or at the next SIGHUP.

use super::*;

/// Whether a start-up failure may be retried without the operator: not a refused PIN or
/// authorisation (the decoded cause names it), as every try counts against a lockout.
fn retry_is_safe(error: &str) -> bool {
    const REFUSED: &[&str] = &[
        "CKR_PIN_INCORRECT",
        "CKR_PIN_LOCKED",
        "CKR_PIN_EXPIRED",
        "CKR_PIN_INVALID",
        "CKR_PIN_LEN_RANGE",
        "TPM_RC_BAD_AUTH",
        "TPM_RC_AUTH_FAIL",
        "TPM_RC_LOCKOUT",
    ];
    !REFUSED.iter().any(|code| error.contains(code))
}

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
        batch_limit: providers::batch_limit(&settings.kind),
        queue: Default::default(),
        queue_limit: queue_limit(config, settings),
        previous: None,
        not_answering: None,
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
        self.request_timeout = config.provider_request_timeout;
        self.allow_deprecated = config.allow_deprecated;
        let mut old = std::mem::take(&mut self.slots);
        let mut answers = Vec::new();
        for settings in &config.providers {
            let id = providers::id_of(&settings.kind);
            let Some(at) = old.iter().position(|s| s.id == id) else {
                let slot = new_slot(config, settings, limits);
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
                    *retry_at = Some(Instant::now());
                }
                self.slots.push(slot);
                continue;
            }
            let live = matches!(slot.state, State::Serving(_) | State::Starting(_));
            if let (true, Err(cause)) = (live, providers::preflight::check(&settings.kind)) {
                log::error!(
                    "SIGHUP: provider \"{}\": its new settings cannot start ({}): it keeps running on the settings it has; correct the config and send SIGHUP again",
                    slot.name(),
                    crate::error::escape_capped(&cause, 256)
                );
                self.slots.push(slot);
                continue;
            }
            log::info!(
                "SIGHUP: provider \"{}\" has new settings: its running instance finishes what it has in hand, then its successor starts",
                settings.name
            );
            let old = (
                std::mem::replace(&mut slot.settings, settings.clone()),
                slot.limits,
            );
            slot.limits = limits;
            slot.batch_limit = providers::batch_limit(&settings.kind);
            match std::mem::replace(&mut slot.state, State::Waiting) {
                State::Serving(running) => {
                    slot.previous = Some(old);
                    self.retire(running, id, &settings.name, false)
                }
                State::Starting(worker) => self.abandon(worker, id, &settings.name),
                State::Waiting | State::Down { .. } => {}
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
            match slot.state {
                State::Serving(running) => self.retire(running, slot.id, &name, true),
                State::Starting(worker) => self.abandon(worker, slot.id, &name),
                State::Waiting | State::Down { .. } => {}
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

    /// A reload replaced or removed an instance still being built: it is stopped as soon as
    /// it has started (`started`), and its provider's next instance waits for that.
    fn abandon(&mut self, worker: Worker, id: ProviderId, name: &str) {
        log::info!(
            "provider \"{name}\": instance {} is still starting; it stops unused when it has started",
            worker.instance
        );
        self.abandoned.push(Abandoned {
            worker,
            id,
            name: name.to_string(),
        });
    }

    /// Whether an instance of this provider is still alive out of service: retiring, or
    /// replaced while starting.
    fn instance_alive(&self, id: ProviderId) -> bool {
        self.retiring.iter().any(|r| r.id == id) || self.abandoned.iter().any(|a| a.id == id)
    }

    /// Answers a request that never reached a worker.
    pub(super) fn answer_now(&mut self, ticket: u64, error: OpError) -> Option<(u64, Dispatched)> {
        let t = self.tickets.remove(&ticket)?;
        let response = self.respond(t.header, Some(&t.app.name), Err(error));
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
            if waiting && !self.instance_alive(id) {
                answers.extend(self.start_slot(i));
            }
        }
        answers
    }

    /// Whether a retiring instance has nothing left in hand: no job with its worker, no
    /// child process of its, no job pinned to it, no commit of its changes in flight, no key
    /// material waiting for an answer to be sent before it goes.
    fn drained(&self, r: usize) -> bool {
        let running = &self.retiring[r].running;
        let instance = running.instance();
        running.in_flight == 0
            && running.deferred == 0
            && running.pinned.is_empty()
            && !self
                .destroy_after_answers
                .iter()
                .any(|(i, _)| *i == instance)
            && !self
                .committing
                .values()
                .flatten()
                .any(|s| s.instance == instance)
    }

    /// A retiring instance's thread has let its provider go.
    pub(super) fn stopped(&mut self, instance: Instance) -> Vec<(u64, Dispatched)> {
        let name = if let Some(at) = self
            .retiring
            .iter()
            .position(|r| r.running.instance() == instance)
        {
            self.retiring.remove(at).name
        } else if let Some(at) = self
            .abandoned
            .iter()
            .position(|a| a.worker.instance == instance)
        {
            self.abandoned.remove(at).name
        } else {
            return Vec::new();
        };
        log::info!("provider \"{name}\": instance {instance} stopped");
        // Its thread has sent its last event and returns (dropped, it is detached). A
        // removed provider's entries stay in memory (not listed while it is not configured):
        // when a reload enables it again, ListKeys lists its keys at once, while its new
        // instance starts.
        self.advance()
    }

    /// Starts a waiting (or down) provider's instance on its worker, which reads the
    /// provider's entries from its key store directory and builds it off the loop; requests
    /// queue until it reports `Event::Started` (`started`).
    fn start_slot(&mut self, i: usize) -> Vec<(u64, Dispatched)> {
        let slot = &mut self.slots[i];
        let instance = slots::next_instance();
        match Worker::start(&slot.settings, instance, slot.limits, self.inbox.outbox()) {
            Ok(worker) => {
                log::info!("provider \"{}\": starting instance {instance}", slot.name());
                slot.state = State::Starting(worker);
                Vec::new()
            }
            Err(error) => self.failed_to_start(i, error),
        }
    }

    /// A worker has built its provider, or could not.
    pub(super) fn started(
        &mut self,
        instance: Instance,
        outcome: Result<Option<Built>, String>,
    ) -> Vec<(u64, Dispatched)> {
        let Some(i) = self
            .slots
            .iter()
            .position(|s| matches!(&s.state, State::Starting(w) if w.instance == instance))
        else {
            return self.abandoned_started(instance, outcome);
        };
        let id = self.slots[i].id;
        let State::Starting(worker) = std::mem::replace(&mut self.slots[i].state, State::Waiting)
        else {
            unreachable!("matched above");
        };
        match outcome {
            Ok(Some(built)) => {
                let running = self.adopt(id, worker, built);
                let slot = &mut self.slots[i];
                log::info!(
                    "provider \"{}\" started (instance {instance}), {} requests waiting",
                    slot.name(),
                    slot.queue.len()
                );
                slot.state = State::Serving(running);
                slot.previous = None;
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
            Err(error) => self.failed_to_start(i, error),
        }
    }

    /// An instance replaced while it was starting has started (it stops now, unused: its
    /// entries were read for it alone and are dropped) or could not (its thread has ended).
    fn abandoned_started(
        &mut self,
        instance: Instance,
        outcome: Result<Option<Built>, String>,
    ) -> Vec<(u64, Dispatched)> {
        let Some(at) = self
            .abandoned
            .iter()
            .position(|a| a.worker.instance == instance)
        else {
            return Vec::new();
        };
        match outcome {
            Ok(Some(_)) => {
                log::info!(
                    "provider \"{}\": instance {instance} started after a reload replaced it: it stops unused",
                    self.abandoned[at].name
                );
                // `Event::Stopped` follows when its thread has let the provider go.
                self.abandoned[at].worker.close();
                Vec::new()
            }
            Ok(None) | Err(_) => {
                let abandoned = self.abandoned.remove(at);
                if let Err(error) = outcome {
                    log::info!(
                        "provider \"{}\": instance {instance}, replaced while it started, did not start: {error}",
                        abandoned.name
                    );
                }
                self.advance()
            }
        }
    }

    /// Leaves a provider down, its waiting requests answered with the cause. It is tried
    /// again with backoff unless the cause is a refused PIN or authorisation, which is
    /// never retried unasked (each try would count against the token's or the TPM's
    /// lockout): then it waits for the next SIGHUP.
    fn failed_to_start(&mut self, i: usize, error: String) -> Vec<(u64, Dispatched)> {
        let name = self.slots[i].name().to_string();
        if retry_is_safe(&error) {
            if let Some((settings, limits)) = self.slots[i].previous.take() {
                log::error!(
                    "provider \"{name}\" failed to start with the settings SIGHUP gave it: {error}; it goes back to the settings it ran with (its keys are served again); the new ones are tried at the next SIGHUP"
                );
                let slot = &mut self.slots[i];
                slot.batch_limit = providers::batch_limit(&settings.kind);
                slot.settings = settings;
                slot.limits = limits;
                slot.state = State::Waiting;
                return self.advance();
            }
        }
        let backoff = match &self.slots[i].state {
            State::Down { backoff, .. } => (*backoff * 2).min(MAX_BACKOFF),
            _ => Duration::from_secs(1),
        };
        let retry = retry_is_safe(&error);
        if retry {
            log::error!(
                "provider \"{name}\" failed to start: {error}; the other providers serve on, and it is tried again in {} s (or at the next SIGHUP)",
                backoff.as_secs()
            );
        } else {
            log::error!(
                "provider \"{name}\" failed to start: {error}; the other providers serve on; a refused PIN or authorisation is not retried: correct the config and send SIGHUP"
            );
        }
        self.slots[i].state = State::Down {
            error,
            retry_at: retry.then(|| Instant::now() + backoff),
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

    /// When a provider that failed to start is next tried.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let retry = self
            .slots
            .iter()
            .filter_map(|s| match s.state {
                State::Down { retry_at, .. } => retry_at,
                _ => None,
            })
            .min();
        match (retry, self.next_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Tries again to start the providers whose time has come; answers the requests whose
    /// deadline has passed (`deadlines.rs`).
    pub fn tick(&mut self) -> Vec<(u64, Dispatched)> {
        let now = Instant::now();
        let mut answers = Vec::new();
        let mut i = 0;
        while i < self.slots.len() {
            let due = matches!(
                self.slots[i].state,
                State::Down { retry_at: Some(at), .. } if at <= now
            );
            let count = self.slots.len();
            if due {
                answers.extend(self.start_slot(i));
            }
            // A slot removed by `start_slot` (no TPM after all) shifts the rest.
            if self.slots.len() == count {
                i += 1;
            }
        }
        answers.extend(self.expire(now));
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
        !self.instance_alive(id)
            && self
                .slots
                .iter()
                .filter(|s| s.id == id)
                .all(|s| s.running().is_some())
    }
}
