//! DeleteClient: every key of one application, destroyed without the event loop waiting.
//!
//! The keys are split by provider into chunks of [`CHUNK`]; each chunk is a job on its
//! provider's worker (`Work::Forget`: a tombstone per key, made durable once for the chunk),
//! whose removals are then made durable as one group commit by the store's writer, and whose
//! material the worker destroys after that. One chunk per provider is in hand at a time, the
//! next going to the back of the queue, so other clients' requests interleave. The request
//! is answered when every chunk is done; a chunk that fails stops its provider's part, and
//! the answer says how many keys were deleted (sending DeleteClient again deletes the rest).

use super::*;
use std::collections::VecDeque;

/// Keys per job.
pub(super) const CHUNK: usize = 256;

/// A DeleteClient in progress, by its ticket.
pub(super) struct Deletion {
    client: AppId,
    /// The chunks still to send, by provider.
    todo: Vec<(ProviderId, VecDeque<Vec<String>>)>,
    /// Chunks with a worker, by their own ticket: provider and key count.
    in_hand: HashMap<u64, (ProviderId, usize)>,
    total: usize,
    deleted: usize,
    failure: Option<ResponseStatus>,
}

impl Dispatcher {
    /// Starts deleting every key of `client` (an admin's request): refused whole, before
    /// anything is forgotten, while a provider holding some of its keys is being replaced by
    /// a reload or is down.
    pub(super) fn start_delete_client(
        &mut self,
        header: RequestHeader,
        admin: &Application,
        client: &str,
    ) -> Result<Step, OpError> {
        let mut by_provider: Vec<(ProviderId, Vec<String>)> = Vec::new();
        let client = AppId::new(admin.auth, client);
        for (triple, _) in self.store.keys_of(&client) {
            let Some(slot) = self.slots.iter().find(|s| s.id as u8 == triple.provider) else {
                continue;
            };
            match by_provider.iter_mut().find(|(id, _)| *id == slot.id) {
                Some((_, names)) => names.push(triple.name.clone()),
                None => by_provider.push((slot.id, vec![triple.name.clone()])),
            }
        }
        for (id, _) in &by_provider {
            if !self.settled(*id) {
                let name = self
                    .slots
                    .iter()
                    .find(|s| s.id == *id)
                    .map_or("?", |s| s.name());
                return Err(OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    format!("provider \"{name}\" is being restarted by a reload or is down"),
                    "nothing was deleted: send DeleteClient again in a moment",
                ));
            }
        }
        let total = by_provider.iter().map(|(_, names)| names.len()).sum();
        if total == 0 {
            log::info!(
                "DeleteClient: \"{}\" has no keys",
                crate::error::escape_capped(&client.name, 128)
            );
            return Ok(Step::Result(NativeResult::DeleteClient(
                parsec_interface::operations::delete_client::Result {},
            )));
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.tickets
            .insert(ticket, Ticket::new(header, admin.id(), None));
        let todo = by_provider
            .into_iter()
            .map(|(id, names)| (id, names.chunks(CHUNK).map(<[String]>::to_vec).collect()))
            .collect();
        self.deletions.insert(
            ticket,
            Deletion {
                client,
                todo,
                in_hand: HashMap::new(),
                total,
                deleted: 0,
                failure: None,
            },
        );
        let providers: Vec<ProviderId> = self.deletions[&ticket]
            .todo
            .iter()
            .map(|(id, _)| *id)
            .collect();
        for id in providers {
            self.send_chunk(ticket, id);
        }
        if self.deletions[&ticket].in_hand.is_empty() {
            // No part could be queued: nothing was deleted.
            let deletion = self.deletions.remove(&ticket).expect("inserted above");
            self.tickets.remove(&ticket);
            return Err(OpError::new(
                deletion
                    .failure
                    .unwrap_or(ResponseStatus::PsaErrorCommunicationFailure),
                "no part of the DeleteClient could be queued",
                "nothing was deleted: send DeleteClient again in a moment",
            ));
        }
        Ok(Step::Queued(ticket))
    }

    /// Queues the next chunk of one provider's part, if there is one.
    fn send_chunk(&mut self, parent: u64, id: ProviderId) {
        let Some(deletion) = self.deletions.get_mut(&parent) else {
            return;
        };
        let Some(names) = deletion
            .todo
            .iter_mut()
            .find(|(p, _)| *p == id)
            .and_then(|(_, chunks)| chunks.pop_front())
        else {
            return;
        };
        let client = deletion.client.clone();
        let count = names.len();
        let Some(index) = self.slots.iter().position(|s| s.id == id) else {
            deletion.failure = Some(ResponseStatus::PsaErrorCommunicationFailure);
            return;
        };
        let sub = self.next_ticket;
        let header = self.tickets[&parent].header;
        let admitted = self.slots[index].admit(Waiting {
            ticket: sub,
            app: client.clone(),
            work: Work::Forget(names),
        });
        let deletion = self.deletions.get_mut(&parent).expect("looked up above");
        match admitted {
            Ok(()) => {
                self.next_ticket += 1;
                deletion.in_hand.insert(sub, (id, count));
                let deadline = Some(Instant::now() + self.request_timeout);
                self.tickets
                    .insert(sub, Ticket::new(header, client, deadline));
                self.pump(index);
            }
            Err(error) => {
                log::warn!(
                    "DeleteClient of \"{}\": {}",
                    crate::error::escape_capped(&deletion.client.name, 128),
                    error.cause
                );
                deletion.failure = Some(error.status);
            }
        }
    }

    /// Takes the answers of DeleteClient chunks out of `answers`: each counts towards its
    /// request, which is answered (in their place) once its last chunk is done.
    pub(super) fn fold_chunks(
        &mut self,
        answers: Vec<(u64, Dispatched)>,
    ) -> Vec<(u64, Dispatched)> {
        if self.deletions.is_empty() {
            return answers;
        }
        let mut out = Vec::with_capacity(answers.len());
        let mut finished = Vec::new();
        for (ticket, dispatched) in answers {
            let parent = self
                .deletions
                .iter()
                .find(|(_, d)| d.in_hand.contains_key(&ticket))
                .map(|(p, _)| *p);
            let (Some(parent), Dispatched::Done(response)) = (parent, &dispatched) else {
                out.push((ticket, dispatched));
                continue;
            };
            let deletion = self.deletions.get_mut(&parent).expect("found above");
            let (id, count) = deletion.in_hand.remove(&ticket).expect("found above");
            if response.header.status == ResponseStatus::Success {
                deletion.deleted += count;
                if deletion.failure.is_none() {
                    self.send_chunk(parent, id);
                }
            } else {
                deletion.failure = Some(response.header.status);
            }
            finished.push(parent);
        }
        for parent in finished {
            if self
                .deletions
                .get(&parent)
                .is_some_and(|d| d.in_hand.is_empty())
            {
                out.extend(self.finish_deletion(parent));
            }
        }
        out
    }

    fn finish_deletion(&mut self, parent: u64) -> Option<(u64, Dispatched)> {
        let deletion = self.deletions.remove(&parent)?;
        let ticket = self.tickets.remove(&parent)?;
        let client = crate::error::escape_capped(&deletion.client.name, 128);
        let outcome = match deletion.failure {
            None => {
                log::info!(
                    "DeleteClient: every key of \"{client}\" destroyed ({} keys)",
                    deletion.deleted
                );
                Ok(NativeResult::DeleteClient(
                    parsec_interface::operations::delete_client::Result {},
                ))
            }
            Some(status) => Err(OpError::new(
                status,
                format!(
                    "{} of the {} keys of \"{client}\" deleted; a part failed: {status}",
                    deletion.deleted, deletion.total
                ),
                "the rest of its keys are intact: send DeleteClient again to delete them (the failed part's cause is logged above)",
            )),
        };
        let response = self.respond(ticket.header, Some(&ticket.app.name), outcome);
        Some((parent, Dispatched::Done(response)))
    }
}
