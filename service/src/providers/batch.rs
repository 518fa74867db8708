//! How a worker runs one batch of requests (each on a different key): first, in order, on
//! the worker's thread, every request that may change what the provider keeps (creates,
//! destroys, DeleteClient's chunks, key generations that start a child process); then the
//! ones that change nothing (signatures, decryptions, exports), on two threads when the
//! provider has a thread-safe part (`Provider::shared`): the worker's and a second one,
//! alternately; then, once, the sync of what the batch wrote (`Provider::flush`), before
//! any result leaves.
//!
//! The order is the safety argument: the second thread exists only while the batch's
//! shared part runs, so a create, a destroy or a fork (RSA key generation) never meets
//! another thread inside Mbed TLS; and a batch holds one request per key, so the two
//! threads never use the same key.

use super::worker::{Done, Instance, Job, Outcome, Work};
use super::{AppKeys, Change, Provider, Shared, Start};
use crate::error::OpError;
use crate::key_store::AppId;
use parsec_interface::operations::NativeResult;
use parsec_interface::requests::ResponseStatus;

/// The second thread's stack: as the software provider's worker's (Mbed TLS's RSA).
const SECOND_THREAD_STACK: usize = 512 * 1024;

/// Runs a batch; the results come back in the order of `jobs`.
pub(super) fn run(
    instance: Instance,
    provider: &mut (dyn Provider + Send),
    shared: Option<&dyn Shared>,
    jobs: Vec<Job>,
) -> Vec<Done> {
    let takes = |job: &Job| match (&job.work, shared) {
        (Work::Op(op), Some(shared)) => shared.takes(op),
        _ => false,
    };
    let parallel = jobs.iter().filter(|job| takes(job)).count();
    let mut results: Vec<Option<Done>> = Vec::with_capacity(jobs.len());
    let mut shared_jobs = Vec::new();
    for (i, job) in jobs.into_iter().enumerate() {
        if parallel >= 2 && takes(&job) {
            shared_jobs.push((i, job));
            results.push(None);
        } else {
            results.push(Some(run_job(instance, provider, job)));
        }
    }
    if let (Some(shared), false) = (shared, shared_jobs.is_empty()) {
        let id = provider.id();
        log::debug!(
            "{id:?}: a batch of {}: {} of them on two threads",
            results.len(),
            shared_jobs.len()
        );
        let (mine, theirs): (Vec<_>, Vec<_>) = shared_jobs
            .into_iter()
            .enumerate()
            .partition(|(n, _)| n % 2 == 0);
        let run_all = |jobs: Vec<(usize, (usize, Job))>| -> Vec<(usize, Done)> {
            jobs.into_iter()
                .map(|(_, (i, job))| (i, run_shared(instance, id, shared, job)))
                .collect()
        };
        // Who asked what on the second thread, to answer them should it fail.
        let asked: Vec<(usize, u64, AppId)> = theirs
            .iter()
            .map(|(_, (i, job))| (*i, job.ticket, job.app.clone()))
            .collect();
        let theirs = std::sync::Mutex::new(Some(theirs));
        let take = || {
            theirs
                .lock()
                .ok()
                .and_then(|mut t| t.take())
                .unwrap_or_default()
        };
        let done = std::thread::scope(|scope| {
            let second = std::thread::Builder::new()
                .name("parsec-crypto-2".into())
                .stack_size(SECOND_THREAD_STACK)
                .spawn_scoped(scope, || run_all(take()));
            let mut done = run_all(mine);
            match second {
                Ok(second) => match second.join() {
                    Ok(theirs) => done.extend(theirs),
                    Err(_) => {
                        let failed = OpError::new(
                            ResponseStatus::PsaErrorGenericError,
                            "the software provider's second crypto thread panicked",
                            "a bug: report it with the log",
                        );
                        done.extend(asked.into_iter().map(|(i, ticket, app)| {
                            let outcome = Outcome::Finished(Err(failed.clone()));
                            (
                                i,
                                Done {
                                    instance,
                                    provider: id,
                                    ticket,
                                    app,
                                    outcome,
                                    changes: Vec::new(),
                                },
                            )
                        }));
                    }
                },
                Err(e) => {
                    log::warn!("{id:?}: cannot start the second crypto thread ({e}): this batch runs on one");
                    done.extend(run_all(take()));
                }
            }
            done
        });
        for (i, d) in done {
            results[i] = Some(d);
        }
    }
    let mut batch: Vec<Done> = results.into_iter().flatten().collect();
    // What the batch wrote becomes durable once, before any result leaves.
    let changed = |d: &Done| !d.changes.is_empty();
    if batch.iter().any(changed) {
        if let Err(error) = provider.flush() {
            for done in batch.iter_mut().filter(|d| changed(d)) {
                undo(provider, done, &error);
            }
        }
    }
    batch
}

/// A request of the batch's shared part, on either thread.
fn run_shared(
    instance: Instance,
    id: parsec_interface::requests::ProviderId,
    shared: &dyn Shared,
    mut job: Job,
) -> Done {
    let keys = AppKeys::in_snapshot(&mut job.snapshot, &job.app.name);
    let result = match job.work {
        Work::Op(op) => shared.execute(op, keys),
        _ => Err(OpError::new(
            ResponseStatus::PsaErrorGenericError,
            "a request that changes keys reached the shared part of a batch",
            "report this as a bug",
        )),
    };
    let changes = match result {
        Ok(_) => std::mem::take(&mut job.snapshot.changes),
        Err(_) => Vec::new(),
    };
    Done {
        instance,
        provider: id,
        ticket: job.ticket,
        app: job.app,
        outcome: Outcome::Finished(result),
        changes,
    }
}

fn run_job(instance: Instance, provider: &mut (dyn Provider + Send), mut job: Job) -> Done {
    let id = provider.id();
    let keys = AppKeys::in_snapshot(&mut job.snapshot, &job.app.name);
    let outcome = match job.work {
        Work::Op(op) => match provider.start(op, keys) {
            Ok(Start::Now(op)) => {
                let keys = AppKeys::in_snapshot(&mut job.snapshot, &job.app.name);
                Outcome::Finished(provider.execute(op, keys))
            }
            Ok(Start::Deferred(deferred)) => Outcome::Deferred(deferred),
            Err(error) => Outcome::Finished(Err(error)),
        },
        Work::Complete(state, output) => Outcome::Finished(provider.complete(state, output, keys)),
        Work::Forget(names) => Outcome::Finished(forget(provider, keys, &names)),
    };
    // A failed or deferred operation changes nothing (yet).
    let changes = match outcome {
        Outcome::Finished(Ok(_)) => std::mem::take(&mut job.snapshot.changes),
        _ => Vec::new(),
    };
    Done {
        instance,
        provider: id,
        ticket: job.ticket,
        app: job.app,
        outcome,
        changes,
    }
}

/// One chunk of a DeleteClient: a tombstone for each key (durable with the batch's `flush`,
/// before the results leave), then its entry's removal. Keys already gone are skipped.
fn forget(
    provider: &mut (dyn Provider + Send),
    mut keys: AppKeys<'_>,
    names: &[String],
) -> Result<NativeResult, OpError> {
    for name in names {
        let Ok(entry) = keys.get(name).cloned() else {
            continue;
        };
        provider.before_forget(&entry)?;
        keys.remove_then_destroy(name)?;
    }
    Ok(NativeResult::DeleteClient(
        parsec_interface::operations::delete_client::Result {},
    ))
}

/// The batch could not be made durable: a request that changed a key fails, and the keys it
/// made are destroyed again (their create records stay until that is done).
fn undo(provider: &mut (dyn Provider + Send), done: &mut Done, error: &OpError) {
    for change in std::mem::take(&mut done.changes) {
        if let Change::Create(name, entry) = change {
            if let Err(e) = provider.destroy_material(&entry) {
                log::warn!(
                    "{:?}: cannot undo key \"{}\" after a failed sync: {e} (resolved at the next start)",
                    done.provider,
                    crate::error::escape(&name)
                );
            }
        }
    }
    done.outcome = Outcome::Finished(Err(OpError::new(
        error.status,
        error.cause.clone(),
        error.hint,
    )));
}
