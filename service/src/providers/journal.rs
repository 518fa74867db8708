//! Intent records and tombstones: the positive evidence a provider needs before it destroys
//! key material at start-up. Used by the software provider (key files, in
//! `<storage_dir>/journal/`) and the PKCS#11 provider (token objects, in
//! `<key store dir>/pkcs11-journal/`). Each record is named by its key's material: the PSA key
//! id (8 hex digits) or the CKA_ID (hex).
//!
//! Before it makes key material, the provider writes `create-KEY` durably; once the key's
//! entry is in the key store, the record goes (the software provider removes it at once; the
//! PKCS#11 provider, whose entries the event loop stores after its worker returns, when the
//! loop tells it the entry is durable). Before it forgets a key, it writes `destroy-XXXXXXXX`; once the material is
//! gone (durably), it removes that. At start-up a record left behind says exactly what was
//! interrupted:
//!
//! | record | the key's entry | meaning | action |
//! |---|---|---|---|
//! | create | present | the create finished; the record's removal did not | drop the record |
//! | create | absent | the client was never told the key exists | destroy the material |
//! | destroy | present | the destroy was never acknowledged | keep the key, drop the record |
//! | destroy | absent | the entry's removal was durable: nobody needs the key | destroy the material |
//!
//! A create record whose entry is absent while some entries of the provider are damaged or
//! unreadable could be a finished create whose entry was damaged since: it is kept, and so is
//! the material, until the damaged entries are restored or removed. Key files no entry and no
//! record names are never destroyed: they are reported, and their ids are never reused.

use crate::error::OpError;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Create,
    Destroy,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Create => "create-",
            Kind::Destroy => "destroy-",
        }
    }
}

/// A record on disk, removed with `Journal::done`.
#[must_use = "a record must be marked done once the change is complete"]
pub struct Record {
    path: PathBuf,
}

pub struct Journal {
    dir: PathBuf,
    /// Records made by `begin_unsynced` since the last `sync`.
    unsynced: bool,
}

pub use crate::key_store::sync_dir;

impl Journal {
    /// The journal in `parent/name`, created (durably) if it is not there.
    pub fn open(parent: &Path, name: &str) -> io::Result<Journal> {
        let dir = parent.join(name);
        crate::key_store::create_private_dir(&dir)?;
        sync_dir(parent)?;
        Ok(Journal {
            dir,
            unsynced: false,
        })
    }

    fn path(&self, kind: Kind, key: &str) -> PathBuf {
        self.dir.join(format!("{}{key}", kind.prefix()))
    }

    /// Makes a record: an empty file, since a record is its name.
    fn create(&self, kind: Kind, key: &str) -> Result<(Record, File), OpError> {
        let path = self.path(kind, key);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| OpError::storage(&format!("writing {}", path.display()), &e))?;
        Ok((Record { path }, file))
    }

    /// Makes a record durably (the file and the directory entry).
    pub fn begin(&self, kind: Kind, key: &str) -> Result<Record, OpError> {
        let (record, file) = self.create(kind, key)?;
        file.sync_all()
            .and_then(|()| sync_dir(&self.dir))
            .map_err(|e| OpError::storage(&format!("writing {}", record.path.display()), &e))?;
        Ok(record)
    }

    /// Makes a record that `sync` makes durable, with every other record made since: the
    /// software provider's worker makes one per request of a batch, then syncs them all at
    /// once, before any of the batch's results (and so any entry) leaves it. A record is its
    /// name, so making it durable is making the directory entry durable: one fsync of the
    /// journal directory for the whole batch.
    pub fn begin_unsynced(&mut self, kind: Kind, key: &str) -> Result<Record, OpError> {
        let (record, _) = self.create(kind, key)?;
        self.unsynced = true;
        Ok(record)
    }

    /// Where the records are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The caller made the records durable itself (a syncfs of their file system).
    pub fn synced(&mut self) {
        self.unsynced = false;
    }

    /// Makes the records `begin_unsynced` made durable (one fsync of the directory).
    pub fn sync(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.unsynced) {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// The change is complete: the record goes. Its removal need not be durable: a record
    /// that comes back after a power cut is resolved at the next start as above.
    pub fn done(&self, record: Record) {
        if let Err(e) = fs::remove_file(&record.path) {
            log::warn!(
                "cannot remove {}: {e} (resolved at the next start)",
                record.path.display()
            );
        }
    }

    /// Leaves a record in place until the change is complete (the PKCS#11 provider's create
    /// records: their entries are stored by the event loop, after the worker returns).
    pub fn leave(&self, record: Record) {
        drop(record);
    }

    /// A record found at start-up, to resolve and then mark done (or keep).
    pub fn found(&self, kind: Kind, key: &str) -> Record {
        Record {
            path: self.path(kind, key),
        }
    }

    /// Every record left by changes that did not complete, in key order: the key (hex) of
    /// each, whose length the caller checks.
    pub fn pending(&self) -> io::Result<Vec<(Kind, String)>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            for kind in [Kind::Create, Kind::Destroy] {
                if let Some(hex) = name.strip_prefix(kind.prefix()) {
                    if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        found.push((kind, hex.to_string()));
                    } else {
                        log::warn!(
                            "ignoring {}: not a journal record",
                            self.dir.join(name).display()
                        );
                    }
                }
            }
        }
        found.sort_by(|(ka, a), (kb, b)| (a, *ka == Kind::Destroy).cmp(&(b, *kb == Kind::Destroy)));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_until_done() {
        let dir = std::env::temp_dir().join(format!("parsec-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let journal = Journal::open(&dir, "journal").unwrap();
        let create = journal.begin(Kind::Create, "00000007").unwrap();
        let destroy = journal.begin(Kind::Destroy, "1234abcd").unwrap();
        assert_eq!(
            journal.pending().unwrap(),
            vec![
                (Kind::Create, "00000007".to_string()),
                (Kind::Destroy, "1234abcd".to_string())
            ]
        );
        journal.done(create);
        assert_eq!(
            journal.pending().unwrap(),
            vec![(Kind::Destroy, "1234abcd".to_string())]
        );
        journal.done(destroy);
        assert!(journal.pending().unwrap().is_empty());
        fs::write(dir.join("journal/create-xyz"), b"").unwrap();
        assert!(journal.pending().unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }
}
