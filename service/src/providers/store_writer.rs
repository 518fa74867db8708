//! The key store's writer: a thread of its own that makes the group commits durable
//! (`key_store::durable_all`) while the event loop serves on, and reports each commit back
//! through the workers' outbox (`Event::Committed`).

use super::worker::{Event, Outbox};
use crate::key_store::Batch;
use std::sync::mpsc;

/// The most batches one group commit of the store's writer takes (the rest wait for the
/// next): bounds the work, and the latency, of one round of syncs.
const GROUP_LIMIT: usize = 256;

/// The thread that makes the key store's group commits durable.
pub struct StoreWriter {
    sender: Option<mpsc::Sender<(u64, Batch)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoreWriter {
    pub fn spawn(outbox: Outbox) -> Result<StoreWriter, String> {
        let (sender, receiver) = mpsc::channel::<(u64, Batch)>();
        let thread = std::thread::Builder::new()
            .name("parsec-store".into())
            // File system calls only.
            .stack_size(64 * 1024)
            .spawn(move || {
                // Ends when the dispatcher drops its handle, after the commits in hand.
                // Every batch that arrived while the last group was syncing goes into the
                // next one: they share its syncs (group commit across turns of the loop).
                while let Ok(first) = receiver.recv() {
                    let mut group = vec![first];
                    while group.len() < GROUP_LIMIT {
                        match receiver.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    let (ids, batches): (Vec<u64>, Vec<Batch>) = group.into_iter().unzip();
                    let done = crate::key_store::durable_all(batches);
                    outbox.deliver(
                        ids.into_iter()
                            .zip(done)
                            .map(|(id, committed)| Event::Committed(id, committed)),
                    );
                }
            })
            .map_err(|e| format!("cannot start the key store's writer thread: {e}"))?;
        Ok(StoreWriter {
            sender: Some(sender),
            thread: Some(thread),
        })
    }

    /// Hands a batch to the writer; gives it back if the thread is gone.
    pub fn commit(&self, id: u64, batch: Batch) -> Result<(), Batch> {
        match &self.sender {
            Some(sender) => sender.send((id, batch)).map_err(|e| e.0 .1),
            None => Err(batch),
        }
    }

    /// Lets the thread end after the commit in hand; its handle, to wait for it.
    pub fn stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.sender = None;
        self.thread.take()
    }
}
