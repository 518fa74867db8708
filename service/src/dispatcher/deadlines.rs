//! Every request to a provider is answered within `core_settings.provider_request_timeout`
//! of its arrival, whatever its device does.
//!
//! A TPM, a token or an HSM can hang (a wedged bus, a token pulled half-way, a resource
//! manager that died): its worker's call into the C library does not return, and nothing
//! can take that call back. What the loop bounds is what the clients see:
//! - a request still in its provider's queue at its deadline is taken out and answered
//!   PsaErrorCommunicationFailure: nothing of it ran;
//! - a request its device is running at its deadline is answered
//!   PsaErrorCommunicationFailure too, which PSA leaves as "the outcome is unknown": when the
//!   device does answer, what it did is stored as usual (a key it made is kept, a destroy it
//!   did is recorded: nothing it made is thrown away unasked) and logged, and its client is
//!   not answered again;
//! - a provider whose device has held one batch for the whole timeout is *not answering*:
//!   its queue is answered at once and new requests for it are refused at once with that
//!   cause until the device answers; the other providers and the core are not affected.
//!
//! A request running in a child process (a software RSA generation) has no deadline: it is
//! the CPU's work, not a device's, and it ends with its child. A DeleteClient has none of its
//! own: each of its chunks has one.

use super::*;

/// The cause given while a provider's device is not answering.
pub(super) fn not_answering(name: &str, since: Instant) -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorCommunicationFailure,
        format!(
            "provider \"{name}\" has not answered its current request for {} s: refused until it answers",
            since.elapsed().as_secs()
        ),
        "its device (TPM, token, resource manager) is hung or far slower than core_settings.provider_request_timeout: check it; the provider serves again as soon as it answers",
    )
}

impl Dispatcher {
    /// The next time a request's deadline passes, or a busy device's batch reaches the
    /// timeout. (A scan of the requests in hand: at most one per connection, plus chunks.)
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let requests = self
            .tickets
            .values()
            .filter(|t| !t.expired)
            .filter_map(|t| t.deadline)
            .min();
        let devices = self
            .slots
            .iter()
            .filter(|s| s.not_answering.is_none())
            .filter_map(|s| self.busy_since(s.id))
            .map(|since| since + self.request_timeout)
            .min();
        match (requests, devices) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the batch the live instance of this provider (serving or retiring) runs was
    /// handed to it.
    fn busy_since(&self, id: ProviderId) -> Option<Instant> {
        let serving = self
            .slots
            .iter()
            .filter(|s| s.id == id)
            .filter_map(Slot::running);
        let retiring = self
            .retiring
            .iter()
            .filter(|r| r.id == id)
            .map(|r| &r.running);
        serving.chain(retiring).filter_map(|r| r.busy_since).min()
    }

    /// Providers whose device has held a batch for the whole timeout stop taking requests;
    /// requests whose deadline has passed are answered.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<(u64, Dispatched)> {
        let mut answers = Vec::new();
        for i in 0..self.slots.len() {
            if self.slots[i].not_answering.is_some() {
                continue;
            }
            let Some(since) = self.busy_since(self.slots[i].id) else {
                continue;
            };
            if since + self.request_timeout > now {
                continue;
            }
            let slot = &mut self.slots[i];
            slot.not_answering = Some(since);
            let queued: Vec<u64> = slot.queue.drain(..).map(|w| w.ticket).collect();
            log::error!(
                "provider \"{}\" has not answered a request for {} s (core_settings.provider_request_timeout): its device is hung or very slow; {} waiting requests are answered now and new ones refused until it answers",
                slot.name(),
                self.request_timeout.as_secs(),
                queued.len()
            );
            let name = slot.name().to_string();
            for ticket in queued {
                answers.extend(self.answer_now(ticket, not_answering(&name, since)));
            }
        }
        let due: Vec<u64> = self
            .tickets
            .iter()
            .filter(|(_, t)| !t.expired && t.deadline.is_some_and(|at| at <= now))
            .map(|(ticket, _)| *ticket)
            .collect();
        for ticket in due {
            answers.extend(self.expire_one(ticket));
        }
        answers
    }

    /// Answers a request whose deadline has passed: taken out of its queue if it waits
    /// there, marked expired if its device is running it.
    fn expire_one(&mut self, ticket: u64) -> Option<(u64, Dispatched)> {
        let timeout = self.request_timeout.as_secs();
        for slot in &mut self.slots {
            if let Some(at) = slot.queue.iter().position(|w| w.ticket == ticket) {
                slot.queue.remove(at);
                let error = OpError::new(
                    ResponseStatus::PsaErrorCommunicationFailure,
                    format!(
                        "waited {timeout} s for provider \"{}\" (core_settings.provider_request_timeout), busy with other requests; nothing of it ran",
                        slot.name()
                    ),
                    "the device is slower than its clients ask: send the request again later, or raise core_settings.provider_request_timeout",
                );
                return self.answer_now(ticket, error);
            }
        }
        let t = self.tickets.get_mut(&ticket)?;
        t.expired = true;
        let (header, app) = (t.header, t.app.clone());
        let name = self
            .slots
            .iter()
            .find(|s| s.id == header.provider)
            .map_or_else(
                || format!("{:?}", header.provider),
                |s| s.name().to_string(),
            );
        let error = OpError::new(
            ResponseStatus::PsaErrorCommunicationFailure,
            format!(
                "provider \"{name}\" did not answer within {timeout} s (core_settings.provider_request_timeout)"
            ),
            "its device is hung or very slow; it may still carry the request out, and what it does then is kept: see ListKeys before making or destroying the key again, or raise the timeout for a slow device",
        );
        Some((
            ticket,
            Dispatched::Done(self.respond(header, Some(&app.name), Err(error))),
        ))
    }

    /// A device answered: its provider takes requests again (if it had stopped), and a
    /// request whose client was told it timed out is logged with what it did.
    pub(super) fn answered(&mut self, provider: ProviderId, late: Option<(&Ticket, bool)>) {
        for slot in self.slots.iter_mut().filter(|s| s.id == provider) {
            if let Some(since) = slot.not_answering.take() {
                log::warn!(
                    "provider \"{}\" answered again after {} s: it takes requests again",
                    slot.name(),
                    since.elapsed().as_secs()
                );
            }
        }
        if let Some((ticket, succeeded)) = late {
            log::warn!(
                "late answer: app={} provider={provider:?} opcode={:?}: the device {} after its client was told the request timed out; {}",
                crate::error::escape_capped(&ticket.app.name, 64),
                ticket.header.opcode,
                if succeeded { "carried it out" } else { "failed it" },
                if succeeded {
                    "what it made or removed is stored as for any request"
                } else {
                    "nothing changed"
                }
            );
        }
    }
}
