//! The other half of a worker's request: its result comes back (`completed`), its key
//! changes are stored, then the client is answered; large random requests are put back in
//! the queue chunk by chunk; on reload, a new dispatcher `adopt`s the requests in hand.

use super::*;

impl Dispatcher {
    /// Takes over from the dispatcher this one succeeds (`successor`): its inbox, the
    /// requests running on its workers (their results are matched by ticket, and their key
    /// changes stored here if a provider of the same kind is still configured), and the
    /// requests still waiting in its queues, which move to this dispatcher's provider of the
    /// same kind or are answered with an error. Returns the responses to send at once.
    pub fn adopt(&mut self, old: &mut Dispatcher) -> Vec<(u64, Response)> {
        std::mem::swap(&mut self.inbox, &mut old.inbox);
        self.tickets.extend(old.tickets.drain());
        self.next_ticket = self.next_ticket.max(old.next_ticket);
        let mut answers = Vec::new();
        let waiting: Vec<Waiting> = old
            .slots
            .iter_mut()
            .filter_map(|slot| match slot {
                Slot::Remote(remote) => Some(remote.queue.drain(..)),
                Slot::Local { .. } => None,
            })
            .flatten()
            .collect();
        for waiting in waiting {
            let ticket = waiting.ticket;
            let Some(provider) = self.tickets.get(&ticket).map(|t| t.header.provider) else {
                continue;
            };
            let index = self.slots.iter().position(|s| s.id() == provider);
            let queued = match index.map(|i| &mut self.slots[i]) {
                Some(Slot::Remote(new)) => new.admit(waiting).map(|()| index),
                _ => Err(removed_by_reload(provider, "before the request ran")),
            };
            match queued {
                Ok(Some(index)) => self.pump(index),
                Ok(None) => {}
                Err(error) => {
                    if let Some(t) = self.tickets.remove(&ticket) {
                        answers.push((ticket, self.respond(t.header, Some(&t.app), Err(error))));
                    }
                }
            }
        }
        answers
    }

    /// The responses of every request a worker has finished since the last call, by ticket.
    /// Each one's key changes are stored first: a client hears of a key only once it is in
    /// the store.
    pub fn completed(&mut self) -> Vec<(u64, Response)> {
        let mut answers = Vec::new();
        for (ticket, error) in std::mem::take(&mut self.failed) {
            if let Some(t) = self.tickets.remove(&ticket) {
                answers.push((ticket, self.respond(t.header, Some(&t.app), Err(error))));
            }
        }
        while let Some(done) = self.inbox.try_next() {
            answers.extend(self.finish(done));
        }
        answers
    }

    /// Waits for the response to one queued request (in-process use: tests, the fuzzer).
    pub fn wait_for(&mut self, ticket: u64) -> Response {
        loop {
            let answers = self.completed();
            if let Some((_, response)) = answers.into_iter().find(|(t, _)| *t == ticket) {
                return response;
            }
            if !self.tickets.contains_key(&ticket) {
                return Response::from_status(ResponseStatus::PsaErrorCommunicationFailure);
            }
            if let Some(done) = self.inbox.wait(Duration::from_secs(600)) {
                if let Some((t, response)) = self.finish(done) {
                    if t == ticket {
                        return response;
                    }
                }
            }
        }
    }

    pub(super) fn finish(&mut self, done: Done) -> Option<(u64, Response)> {
        // The worker is free for the next request, if it still belongs to this dispatcher.
        let index = self
            .slots
            .iter()
            .position(|s| s.instance() == Some(done.instance));
        if let Some(Slot::Remote(remote)) = index.map(|i| &mut self.slots[i]) {
            remote.busy = false;
        }
        let mut ticket = self.tickets.remove(&done.ticket)?;
        // One chunk of a large random request: collect it; the next goes to the back of the
        // queue, behind whatever other clients asked meanwhile.
        if let (Some(parts), Ok(NativeResult::PsaGenerateRandom(chunk))) =
            (ticket.random.as_mut(), &done.result)
        {
            parts.collected.extend_from_slice(&chunk.random_bytes);
            if parts.remaining > 0 {
                let size = parts.remaining.min(RANDOM_CHUNK);
                parts.remaining -= size;
                if let Some(Slot::Remote(remote)) = index.map(|i| &mut self.slots[i]) {
                    remote.queue.push_back(Waiting {
                        ticket: done.ticket,
                        app: ticket.app.clone(),
                        op: random_chunk(size),
                    });
                    self.tickets.insert(done.ticket, ticket);
                    if let Some(index) = index {
                        self.pump(index);
                    }
                    return None;
                }
            }
        }
        let result = match ticket.random.take() {
            Some(parts) if done.result.is_ok() && parts.remaining == 0 => Ok(
                NativeResult::PsaGenerateRandom(psa_generate_random::Result {
                    random_bytes: parts.collected,
                }),
            ),
            Some(_) if done.result.is_ok() => {
                Err(removed_by_reload(done.provider, "while the request ran"))
            }
            _ => done.result,
        };
        let outcome = result.and_then(|result| {
            self.store_changes(&done.app, done.provider, done.changes, index)?;
            Ok(result)
        });
        let response = self.respond(ticket.header, Some(&ticket.app), outcome);
        if let Some(index) = index {
            self.pump(index);
        }
        Some((done.ticket, response))
    }

    /// Stores what a worker's operation changed. A request that ran on a provider a reload
    /// has since removed has nowhere to store a new key: it fails (a TPM key's material is
    /// only its blob, which is dropped; a token object is destroyed when the provider is
    /// still there to do it, and named in the log otherwise).
    fn store_changes(
        &mut self,
        app: &str,
        provider: ProviderId,
        changes: Vec<Change>,
        index: Option<usize>,
    ) -> Result<(), OpError> {
        let configured = self.slots.iter().any(|s| s.id() == provider);
        for change in changes {
            match change {
                Change::Create(name, entry) => {
                    if !configured {
                        log::warn!(
                            "{provider:?}: key \"{}\" of \"{}\" was made by a provider a reload removed; it is not stored",
                            crate::error::escape(&name),
                            crate::error::escape(app)
                        );
                        return Err(removed_by_reload(provider, "while the request ran"));
                    }
                    let triple = KeyTriple::new(app, provider, &name);
                    if let Err(error) = self.store.insert(triple, entry.clone()) {
                        if let Some(slot) = index.map(|i| &mut self.slots[i]) {
                            let _ = slot.destroy_material(entry);
                        }
                        return Err(error);
                    }
                    if let Some(slot) = index.map(|i| &mut self.slots[i]) {
                        slot.committed(entry);
                    }
                }
                Change::Remove(name) => {
                    let triple = KeyTriple::new(app, provider, &name);
                    if self.store.contains(&triple) {
                        self.store.remove(&triple)?;
                    }
                }
            }
        }
        Ok(())
    }
}
