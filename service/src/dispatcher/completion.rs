//! The other half of a worker's request: its result comes back (`completed`), its key
//! changes are stored (one group commit for everything that came back in the same turn of the
//! loop), then the client is answered; large random requests are put back in the queue chunk
//! by chunk. Everything is matched by provider instance: a result, a staged change and a
//! commit belong to the instance that made them, serving or retiring (`reload.rs`).

use super::*;
use crate::key_store::Batch;

/// A finished request whose key changes are in this turn's batch, until it is durable.
pub(super) struct Settling {
    ticket: u64,
    header: RequestHeader,
    app: AppId,
    /// The provider instance that made the changes.
    pub(super) instance: Instance,
    result: NativeResult,
    created: Vec<crate::key_store::KeyEntry>,
    /// Removed entries whose material the provider destroys once the removal is durable.
    to_destroy: Vec<crate::key_store::KeyEntry>,
}

impl Dispatcher {
    /// What became of every request a worker has finished since the last call, by ticket: a
    /// response, or a request now running in a child process. The key changes of all of them
    /// are stored first, together: a client hears of a key only once it is in the store.
    pub fn completed(&mut self) -> Vec<(u64, Dispatched)> {
        // The answers of the last call have been sent by now, whoever called.
        self.answers_sent();
        let mut answers = Vec::new();
        for (ticket, error) in std::mem::take(&mut self.failed) {
            if let Some(t) = self.tickets.remove(&ticket) {
                let response = self.respond(t.header, Some(&t.app.name), Err(error));
                answers.push((ticket, Dispatched::Done(response)));
            }
        }
        let mut events = Vec::new();
        while let Some(event) = self.inbox.try_next() {
            events.push(event);
        }
        answers.extend(self.handle(events));
        self.fold_chunks(answers)
    }

    /// The answers `completed` returned are written to their clients: the key material of
    /// the entries their commits removed goes now (on each key's worker, behind its jobs).
    pub fn answers_sent(&mut self) {
        for (instance, entry) in std::mem::take(&mut self.destroy_after_answers) {
            match self.running_mut(instance) {
                Some(running) => running.destroy_material(entry),
                None => log::error!(
                    "provider instance {instance} stopped before a removed key's material was destroyed (resolved at the next start); report this as a bug"
                ),
            }
        }
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
                Event::Stopped(instance) => answers.extend(self.stopped(instance)),
                Event::Started(instance, outcome) => {
                    answers.extend(self.started(instance, outcome));
                }
            }
        }
        if !done.is_empty() {
            answers.extend(self.settle(done));
        }
        // Retiring instances that have drained stop; providers waiting for them start.
        answers.extend(self.advance());
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
                Some((_, Dispatched::Done(response))) => {
                    self.answers_sent();
                    return response;
                }
                Some((_, Dispatched::Deferred(mut pending))) => {
                    let mut output = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut pending.job.output, &mut output);
                    if let Dispatched::Done(response) = self.complete(pending, output) {
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
                    let handled = self.handle(vec![event]);
                    answers.extend(self.fold_chunks(handled));
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
            if let Some(running) = self.running_mut(d.instance) {
                running.in_flight = running.in_flight.saturating_sub(1);
                // The device answered: the clock of "not answering" starts again for
                // the rest of its batch.
                running.busy_since = (running.in_flight > 0).then(Instant::now);
            }
            if let Some(i) = self.serving(d.instance) {
                let limit = self.slots[i].batch_limit;
                let takes = |r: &Running| !r.busy() || r.takes_more_reads(limit);
                if self.slots[i].running().is_some_and(takes) && !freed.contains(&i) {
                    freed.push(i);
                }
            }
            if let Some(answer) = self.take(d, &mut batch, &mut settling) {
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
        for r in 0..self.retiring.len() {
            self.pump_retiring(r);
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
        let mut deferred = Vec::new();
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
            // The instance that made the changes is alive (serving or retiring): an
            // instance stops only once none of its commits is in flight.
            let running = self.running_mut(s.instance);
            let outcome = match (&committed, running) {
                (Err(error), running) if changed => {
                    if let Some(running) = running {
                        for entry in s.created {
                            running.destroy_material(entry);
                        }
                    }
                    Err(OpError::new(error.status, error.cause.clone(), error.hint))
                }
                (_, Some(running)) => {
                    for entry in s.created {
                        running.committed(entry);
                    }
                    // After the answer is written (`answers_sent`).
                    let instance = s.instance;
                    deferred.extend(s.to_destroy.into_iter().map(|e| (instance, e)));
                    Ok(s.result)
                }
                (_, None) if changed => {
                    log::error!(
                        "provider instance {} stopped before its commit was answered: key material of {} removed keys not destroyed (resolved at the next start); report this as a bug",
                        s.instance,
                        s.to_destroy.len()
                    );
                    Ok(s.result)
                }
                (_, None) => Ok(s.result),
            };
            let response = self.respond(s.header, Some(&s.app.name), outcome);
            answers.push((s.ticket, Dispatched::Done(response)));
        }
        self.destroy_after_answers.extend(deferred);
        answers
    }

    /// One finished request: answered at once (a failure, a deferral, a chunk of random
    /// bytes to continue) or staged in `batch` with its key changes.
    fn take(
        &mut self,
        done: Done,
        batch: &mut Batch,
        settling: &mut Vec<Settling>,
    ) -> Option<(u64, Dispatched)> {
        let Some(mut ticket) = self.tickets.remove(&done.ticket) else {
            // Nobody to answer (cannot happen): what the request made must not stay.
            self.undo_created(done.instance, done.changes);
            return None;
        };
        let result = match done.outcome {
            Outcome::Deferred(job) => {
                // Its child runs; the ticket stays until `complete` hands the result back
                // to this same instance, which waits for it before it may stop. It has no
                // deadline now (it is the CPU's work, and ends with its child).
                self.answered(done.provider, None);
                ticket.deadline = None;
                self.tickets.insert(done.ticket, ticket);
                if let Some(running) = self.running_mut(done.instance) {
                    running.deferred += 1;
                }
                let pending = PendingRequest {
                    ticket: done.ticket,
                    provider: done.provider,
                    instance: done.instance,
                    job,
                };
                return Some((done.ticket, Dispatched::Deferred(pending)));
            }
            Outcome::Finished(result) => result,
        };
        let late = ticket.expired.then_some((&ticket, result.is_ok()));
        self.answered(done.provider, late);
        // One chunk of a large random request: collect it; the next goes to the back of the
        // queue (any instance of the provider may serve it), behind whatever other clients
        // asked meanwhile.
        if let (Some(parts), Ok(NativeResult::PsaGenerateRandom(chunk))) =
            (ticket.random.as_mut(), &result)
        {
            if ticket.expired {
                // Its client was told it timed out (and `answered` logged the rest).
                return None;
            }
            if ticket.cancelled {
                log::info!(
                    "request stopped: app={} provider={:?} opcode=PsaGenerateRandom: its client hung up, {} of {} bytes fetched",
                    crate::error::escape_capped(&ticket.app.name, 64),
                    done.provider,
                    parts.collected.len() + chunk.random_bytes.len(),
                    parts.collected.len() + chunk.random_bytes.len() + parts.remaining
                );
                return None;
            }
            parts.collected.extend_from_slice(&chunk.random_bytes);
            if parts.remaining > 0 {
                let size = parts.remaining.min(RANDOM_CHUNK);
                parts.remaining -= size;
                if let Some(slot) = self.slots.iter_mut().find(|s| s.id == done.provider) {
                    slot.queue.push_back(Waiting {
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
        let staged = match result {
            Ok(result) => {
                let mark = batch.mark();
                // A DeleteClient chunk (also one whose deadline passed: it is no longer
                // counted in its request, but it changed what it changed).
                let forgetting = matches!(result, NativeResult::DeleteClient(_));
                match self.stage_changes(
                    forgetting,
                    done.instance,
                    &done.app,
                    done.provider,
                    &done.changes,
                    batch,
                ) {
                    Ok((created, to_destroy)) => Ok((result, created, to_destroy)),
                    Err(error) => {
                        batch.discard_from(mark);
                        Err(error)
                    }
                }
            }
            Err(error) => Err(error),
        };
        match staged {
            Ok((result, created, to_destroy)) => {
                settling.push(Settling {
                    ticket: done.ticket,
                    header: ticket.header,
                    app: ticket.app,
                    instance: done.instance,
                    result,
                    created,
                    to_destroy,
                });
                None
            }
            Err(error) => {
                let response = self.respond(ticket.header, Some(&ticket.app.name), Err(error));
                Some((done.ticket, Dispatched::Done(response)))
            }
        }
    }

    /// Stages what a worker's operation changed. A key made by an instance whose provider a
    /// reload removed has nobody to serve it: it is undone by that same instance (still
    /// alive: it stops only once drained) and the request fails. A key that cannot be staged
    /// has its material destroyed, and so has every key the request made before it.
    #[allow(clippy::type_complexity)]
    fn stage_changes(
        &mut self,
        forgetting: bool,
        instance: Instance,
        app: &AppId,
        provider: ProviderId,
        changes: &[Change],
        batch: &mut Batch,
    ) -> Result<
        (
            Vec<crate::key_store::KeyEntry>,
            Vec<crate::key_store::KeyEntry>,
        ),
        OpError,
    > {
        let removed = self.is_removed(instance);
        let (mut created, mut to_destroy) = (Vec::new(), Vec::new());
        let mut failure = None;
        for change in changes {
            match change {
                Change::Create(name, entry) => {
                    created.push(entry.clone());
                    if removed {
                        log::warn!(
                            "{provider:?}: key \"{}\" of \"{}\" was made by a provider a reload removed; it is undone",
                            crate::error::escape(name),
                            crate::error::escape(&app.name)
                        );
                        failure = Some(removed_by_reload(provider, "while the request ran"));
                        break;
                    }
                    let triple = KeyTriple::new(app, provider, name);
                    if let Err(error) = self.store.stage_insert(batch, triple, entry.clone()) {
                        failure = Some(error);
                        break;
                    }
                }
                Change::Remove { name, then_destroy } => {
                    let triple = KeyTriple::new(app, provider, name);
                    if forgetting && self.store.is_changing(batch, &triple) {
                        // A DeleteClient chunk, and the application's own DestroyKey of this
                        // key (or a create of it again, after a destroy) is being committed:
                        // the key goes (or is a new one), so the chunk goes on without it
                        // rather than failing whole.
                        continue;
                    }
                    if self.store.contains(&triple) {
                        match self.store.stage_remove(batch, &triple) {
                            Ok(entry) if *then_destroy => to_destroy.push(entry),
                            Ok(_) => {}
                            Err(error) => {
                                failure = Some(error);
                                break;
                            }
                        }
                    }
                }
            }
        }
        match failure {
            None => Ok((created, to_destroy)),
            Some(error) => {
                if let Some(running) = self.running_mut(instance) {
                    for entry in created {
                        running.destroy_material(entry);
                    }
                }
                Err(error)
            }
        }
    }

    /// Destroys what a request that nobody can be answered for created.
    fn undo_created(&mut self, instance: Instance, changes: Vec<Change>) {
        if let Some(running) = self.running_mut(instance) {
            for change in changes {
                if let Change::Create(_, entry) = change {
                    running.destroy_material(entry);
                }
            }
        }
    }
}
