//! The other half of a worker's request: its result comes back (`completed`), its key
//! changes are stored (one group commit for everything that came back in the same turn of the
//! loop), then the client is answered; large random requests are put back in the queue chunk
//! by chunk; on reload, a new dispatcher `adopt`s the requests in hand.

use super::*;
use crate::key_store::Batch;

/// A finished request whose key changes are in this turn's batch, until it is durable.
pub(super) struct Settling {
    ticket: u64,
    header: RequestHeader,
    app: String,
    /// The provider instance that made the changes.
    instance: Option<crate::providers::worker::Instance>,
    result: NativeResult,
    created: Vec<crate::key_store::KeyEntry>,
    /// Removed entries whose material the provider destroys once the removal is durable.
    to_destroy: Vec<crate::key_store::KeyEntry>,
}

impl Dispatcher {
    /// Takes over from the dispatcher this one succeeds (`successor`): its inbox, the
    /// requests running on its workers (their results are matched by ticket, and their key
    /// changes stored here if a provider of the same kind is still configured), and the
    /// requests still waiting in its queues, which move to this dispatcher's provider of the
    /// same kind or are answered with an error. Returns the responses to send at once.
    pub fn adopt(&mut self, old: &mut Dispatcher) -> Vec<(u64, Dispatched)> {
        std::mem::swap(&mut self.inbox, &mut old.inbox);
        self.tickets.extend(old.tickets.drain());
        self.next_ticket = self.next_ticket.max(old.next_ticket);
        let mut answers = Vec::new();
        let waiting: Vec<Waiting> = old
            .slots
            .iter_mut()
            .flat_map(|slot| slot.queue.drain(..))
            .collect();
        for waiting in waiting {
            let ticket = waiting.ticket;
            let Some(provider) = self.tickets.get(&ticket).map(|t| t.header.provider) else {
                continue;
            };
            let index = self.slots.iter().position(|s| s.id == provider);
            let queued = match index {
                Some(i) => self.slots[i].admit(waiting).map(|()| i),
                None => Err(removed_by_reload(provider, "before the request ran")),
            };
            match queued {
                Ok(index) => self.pump(index),
                Err(error) => {
                    if let Some(t) = self.tickets.remove(&ticket) {
                        let response = self.respond(t.header, Some(&t.app), Err(error));
                        answers.push((ticket, Dispatched::Done(response)));
                    }
                }
            }
        }
        // The inherited software provider's queue, held while the old one drained.
        self.pump_all();
        answers
    }

    /// Before a reload opens the key store again: no new batches, and every group commit in
    /// flight finished (waited for, here), so that the disk is what the store says. Returns
    /// the responses to send. `resume` undoes it if the reload is abandoned.
    pub fn finish_commits(&mut self) -> Vec<(u64, Dispatched)> {
        self.draining = true;
        let mut answers = Vec::new();
        while !self.committing.is_empty() {
            let Some(event) = self.inbox.wait(Duration::from_secs(60)) else {
                log::error!("SIGHUP: the key store's writer did not report back in 60 s");
                break;
            };
            answers.extend(self.handle(vec![event]));
        }
        answers
    }

    /// The reload did not happen: batches go on.
    pub fn resume(&mut self) {
        self.draining = false;
        self.pump_all();
    }

    /// What became of every request a worker has finished since the last call, by ticket: a
    /// response, or a request now running in a child process. The key changes of all of them
    /// are stored first, together: a client hears of a key only once it is in the store.
    pub fn completed(&mut self) -> Vec<(u64, Dispatched)> {
        let mut answers = Vec::new();
        for (ticket, error) in std::mem::take(&mut self.failed) {
            if let Some(t) = self.tickets.remove(&ticket) {
                let response = self.respond(t.header, Some(&t.app), Err(error));
                answers.push((ticket, Dispatched::Done(response)));
            }
        }
        let mut events = Vec::new();
        while let Some(event) = self.inbox.try_next() {
            events.push(event);
        }
        answers.extend(self.handle(events));
        answers
    }

    /// Finished requests go into one group commit; finished commits answer their requests.
    fn handle(&mut self, events: Vec<Event>) -> Vec<(u64, Dispatched)> {
        let mut answers = Vec::new();
        let mut done = Vec::new();
        for event in events {
            match event {
                Event::Done(d) => done.push(d),
                Event::Committed(id, committed) => {
                    let result = self.store.apply(committed);
                    if let Some(settling) = self.committing.remove(&id) {
                        answers.extend(self.answer_settled(settling, result));
                    }
                }
            }
        }
        if !done.is_empty() {
            answers.extend(self.settle(done));
        }
        answers
    }

    /// Whether a request is still in hand (queued, running, or waiting for its commit).
    fn in_hand(&self, ticket: u64) -> bool {
        self.tickets.contains_key(&ticket)
            || self
                .committing
                .values()
                .any(|s| s.iter().any(|s| s.ticket == ticket))
    }

    /// Waits for the response to one queued request (in-process use: tests, the fuzzer).
    /// A request that goes to a child process is waited for here too.
    pub fn wait_for(&mut self, ticket: u64) -> Response {
        let mut answers = self.completed();
        loop {
            match answers.into_iter().find(|(t, _)| *t == ticket) {
                Some((_, Dispatched::Done(response))) => return response,
                Some((_, Dispatched::Deferred(pending))) => {
                    if let Dispatched::Done(response) =
                        crate::front_end::finish_blocking(self, pending)
                    {
                        return response;
                    }
                }
                Some((_, Dispatched::Queued(_))) | None => {}
            }
            if !self.in_hand(ticket) {
                return Response::from_status(ResponseStatus::PsaErrorCommunicationFailure);
            }
            answers = self.completed();
            if answers.iter().all(|(t, _)| *t != ticket) && self.in_hand(ticket) {
                if let Some(event) = self.inbox.wait(Duration::from_secs(600)) {
                    answers.extend(self.handle(vec![event]));
                }
            }
        }
    }

    /// Stages the key changes of a set of finished requests as one group commit and hands it
    /// to the store's writer (their answers come with `Event::Committed`); answers at once
    /// those that changed nothing; starts the freed workers' next batches.
    fn settle(&mut self, done: Vec<Done>) -> Vec<(u64, Dispatched)> {
        let mut answers = Vec::new();
        let mut batch = Batch::default();
        let mut settling = Vec::new();
        let mut freed = Vec::new();
        for d in done {
            let index = self.slots.iter().position(|s| s.instance() == d.instance);
            if let Some(i) = index {
                let remote = &mut self.slots[i];
                remote.in_flight = remote.in_flight.saturating_sub(1);
                if !remote.busy() {
                    freed.push(i);
                }
            }
            if let Some(answer) = self.take(d, index, &mut batch, &mut settling) {
                answers.push(answer);
            }
        }
        // The freed workers start their next batches first, so that their work (and their
        // fsyncs) overlaps this commit's. Their snapshots do not have this batch's changes:
        // a request that depends on one can only be sent once its answer is, after the
        // commit; what is queued now was sent concurrently with these requests, and either
        // order is a correct one (the store refuses a name taken twice).
        for i in freed {
            self.pump(i);
        }
        if batch.is_empty() {
            answers.extend(self.answer_settled(settling, Ok(())));
            return answers;
        }
        // The temporary files are written; the writer makes them durable while the loop
        // serves on, and the requests are answered when it reports back.
        self.store.hold(&batch);
        let id = self.next_commit;
        self.next_commit += 1;
        match self.writer.commit(id, batch) {
            Ok(()) => {
                self.committing.insert(id, settling);
            }
            Err(batch) => {
                let result = self.store.apply(crate::key_store::durable(batch));
                answers.extend(self.answer_settled(settling, result));
            }
        }
        answers
    }

    /// Answers the requests of a group commit: their key changes are durable (or the commit
    /// failed, and so do they).
    fn answer_settled(
        &mut self,
        settling: Vec<Settling>,
        committed: Result<(), OpError>,
    ) -> Vec<(u64, Dispatched)> {
        let mut answers = Vec::new();
        let any_created = settling.iter().any(|s| !s.created.is_empty());
        let any_removed = settling.iter().any(|s| !s.to_destroy.is_empty());
        if committed.is_ok() && any_created {
            crate::crash_point("create:after-entry");
        }
        if committed.is_ok() && any_removed {
            crate::crash_point("destroy:after-entry");
        }
        for s in settling {
            let changed = !s.created.is_empty() || !s.to_destroy.is_empty();
            // A reload may have replaced the provider meanwhile: by identity.
            let index = s.instance.and_then(|instance| {
                self.slots
                    .iter()
                    .position(|slot| slot.instance() == instance)
            });
            let outcome = match &committed {
                Err(error) if changed => {
                    for entry in s.created {
                        if let Some(i) = index {
                            self.slots[i].destroy_material(entry);
                        }
                    }
                    Err(OpError::new(error.status, error.cause.clone(), error.hint))
                }
                _ => {
                    if let Some(i) = index {
                        for entry in s.created {
                            self.slots[i].committed(entry);
                        }
                        for entry in s.to_destroy {
                            self.slots[i].destroy_material(entry);
                        }
                    }
                    Ok(s.result)
                }
            };
            let response = self.respond(s.header, Some(&s.app), outcome);
            answers.push((s.ticket, Dispatched::Done(response)));
        }
        answers
    }

    /// One finished request: answered at once (a failure, a deferral, a chunk of random
    /// bytes to continue) or staged in `batch` with its key changes.
    fn take(
        &mut self,
        done: Done,
        index: Option<usize>,
        batch: &mut Batch,
        settling: &mut Vec<Settling>,
    ) -> Option<(u64, Dispatched)> {
        let mut ticket = self.tickets.remove(&done.ticket)?;
        let result = match done.outcome {
            Outcome::Deferred(job) => {
                // Its child runs; the ticket stays until `complete` hands the result back.
                self.tickets.insert(done.ticket, ticket);
                let pending = PendingRequest {
                    ticket: done.ticket,
                    provider: done.provider,
                    job,
                };
                return Some((done.ticket, Dispatched::Deferred(pending)));
            }
            Outcome::Finished(result) => result,
        };
        // One chunk of a large random request: collect it; the next goes to the back of the
        // queue, behind whatever other clients asked meanwhile.
        if let (Some(parts), Ok(NativeResult::PsaGenerateRandom(chunk))) =
            (ticket.random.as_mut(), &result)
        {
            parts.collected.extend_from_slice(&chunk.random_bytes);
            if parts.remaining > 0 {
                let size = parts.remaining.min(RANDOM_CHUNK);
                parts.remaining -= size;
                if let Some(i) = index {
                    self.slots[i].queue.push_back(Waiting {
                        ticket: done.ticket,
                        app: ticket.app.clone(),
                        work: Work::Op(random_chunk(size)),
                    });
                    self.tickets.insert(done.ticket, ticket);
                    return None;
                }
            }
        }
        let result = match ticket.random.take() {
            Some(parts) if result.is_ok() && parts.remaining == 0 => Ok(
                NativeResult::PsaGenerateRandom(psa_generate_random::Result {
                    random_bytes: parts.collected,
                }),
            ),
            Some(_) if result.is_ok() => {
                Err(removed_by_reload(done.provider, "while the request ran"))
            }
            _ => result,
        };
        let staged = result.and_then(|result| {
            let mark = batch.mark();
            match self.stage_changes(&done.app, done.provider, done.changes, index, batch) {
                Ok((created, to_destroy)) => Ok((result, created, to_destroy)),
                Err(error) => {
                    batch.discard_from(mark);
                    Err(error)
                }
            }
        });
        match staged {
            Ok((result, created, to_destroy)) => {
                settling.push(Settling {
                    ticket: done.ticket,
                    header: ticket.header,
                    app: ticket.app,
                    instance: index.map(|i| self.slots[i].instance()),
                    result,
                    created,
                    to_destroy,
                });
                None
            }
            Err(error) => {
                let response = self.respond(ticket.header, Some(&ticket.app), Err(error));
                Some((done.ticket, Dispatched::Done(response)))
            }
        }
    }

    /// Stages what a worker's operation changed. A request that ran on a provider a reload
    /// has since removed has nowhere to store a new key: it fails (a TPM key's material is
    /// only its blob, which is dropped; a token object or a key file is destroyed when the
    /// provider is still there to do it, and resolved at its next start otherwise). A key
    /// that cannot be staged has its material destroyed.
    #[allow(clippy::type_complexity)]
    fn stage_changes(
        &mut self,
        app: &str,
        provider: ProviderId,
        changes: Vec<Change>,
        index: Option<usize>,
        batch: &mut Batch,
    ) -> Result<
        (
            Vec<crate::key_store::KeyEntry>,
            Vec<crate::key_store::KeyEntry>,
        ),
        OpError,
    > {
        let configured = self.slots.iter().any(|s| s.id == provider);
        let (mut created, mut to_destroy) = (Vec::new(), Vec::new());
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
                    if let Err(error) = self.store.stage_insert(batch, triple, entry.clone()) {
                        if let Some(i) = index {
                            self.slots[i].destroy_material(entry);
                        }
                        return Err(error);
                    }
                    created.push(entry);
                }
                Change::Remove { name, then_destroy } => {
                    let triple = KeyTriple::new(app, provider, &name);
                    if self.store.contains(&triple) {
                        let entry = self.store.stage_remove(batch, &triple)?;
                        if then_destroy {
                            to_destroy.push(entry);
                        }
                    }
                }
            }
        }
        Ok((created, to_destroy))
    }
}
