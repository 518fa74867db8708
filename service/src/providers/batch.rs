//! How a worker runs one batch of requests (each on a different key), in order, on its own
//! thread: each request, then, once, the sync of what the batch wrote (`Provider::flush`),
//! before any result leaves. For a provider with a second crypto thread (`pool.rs`), the
//! batch holds only what changes its keys (creates, destroys, DeleteClient's chunks, key
//! generations that start a child process); the rest goes to the pool, through
//! [`run_shared`].

use super::worker::{Done, Instance, Job, Outcome, Work};
use super::{AppKeys, Change, Provider, Shared, Snapshot, Start};
use crate::error::OpError;
use crate::key_store::AppId;
use parsec_interface::operations::NativeResult;
use parsec_interface::requests::{ProviderId, ResponseStatus};

/// Runs a batch; the results come back in the order of `jobs`.
pub(super) fn run(
    instance: Instance,
    provider: &mut (dyn Provider + Send),
    jobs: Vec<Job>,
) -> Vec<Done> {
    let mut batch: Vec<Done> = jobs
        .into_iter()
        .map(|job| run_job(instance, provider, job))
        .collect();
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

/// An operation that changes nothing, on either of the pool's threads.
pub(super) fn run_shared(
    instance: Instance,
    id: ProviderId,
    shared: &dyn Shared,
    mut job: Job,
) -> Done {
    let keys = AppKeys::in_snapshot(&mut job.snapshot, &job.app.name);
    let result = match job.work {
        Work::Op(op) => shared.execute(op, keys),
        _ => Err(OpError::new(
            ResponseStatus::PsaErrorGenericError,
            "a request that changes keys reached the second crypto thread's queue",
            "report this as a bug",
        )),
    };
    let outcome = Outcome::Finished(result);
    done(
        instance,
        id,
        job.ticket,
        job.app,
        &mut job.snapshot,
        outcome,
    )
}

/// How a job ended, with the key changes it made if it finished well (a failed or deferred
/// operation changes nothing, yet).
fn done(
    instance: Instance,
    provider: ProviderId,
    ticket: u64,
    app: AppId,
    snapshot: &mut Snapshot,
    outcome: Outcome,
) -> Done {
    let changes = match outcome {
        Outcome::Finished(Ok(_)) => std::mem::take(&mut snapshot.changes),
        _ => Vec::new(),
    };
    Done {
        instance,
        provider,
        ticket,
        app,
        outcome,
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
    done(
        instance,
        id,
        job.ticket,
        job.app,
        &mut job.snapshot,
        outcome,
    )
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
