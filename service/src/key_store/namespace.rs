//! Whose key: an application is a name *and* the authenticator that vouched for it, as in
//! upstream Parsec's SQLite store. A Direct application called "1000" and the process of
//! UID 1000 (UnixPeerCredentials) are two applications, so an operator who changes the
//! authenticator never hands one the other's keys. Each authenticator has its own directory
//! in the store:
//!
//! ```text
//! <root>/namespaces                        which authenticator the older entries belong to
//! <root>/@<authenticator>/<hex(app)>/<provider id>/<hex(key name)>.key
//! ```
//!
//! Stores written before (application directories straight under `<root>`) are upgraded in
//! place at the first start of this version: the authenticator configured then is written to
//! `namespaces` (crash-safely, before anything moves), and each application directory is
//! renamed into that authenticator's directory, one atomic rename each. A kill -9 or a power
//! cut anywhere leaves every application directory whole, in its old place or its new one;
//! the next start reads `namespaces` (never the config, which may have changed since) and
//! moves the rest. Upstream's OnDisk store, which has no authenticator in it, belongs to the
//! same recorded authenticator (the overlay's `namespaces`), as upstream's OnDisk store
//! belongs to whichever authenticator upstream is configured with.

use super::{create_private_dir, read_dir_sorted, replace_file, sync_dir, DamagedEntry};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file recording the authenticator of the entries older than namespaces.
pub const RECORD: &str = "namespaces";
const RECORD_HEADER: &str = "parsec key store namespaces 1";

/// Upstream's AuthType numbers (the wire's), and the directory names this store gives them.
const NAMES: [(u8, &str); 5] = [
    (0, "no-auth"),
    (1, "direct"),
    (2, "jwt"),
    (3, "unix-peer-credentials"),
    (4, "jwt-svid"),
];

/// An authenticator's readable name (for directories, the record and logs).
pub fn auth_name(auth: u8) -> String {
    NAMES
        .iter()
        .find(|(id, _)| *id == auth)
        .map(|(_, name)| name.to_string())
        .unwrap_or_else(|| format!("auth-{auth}"))
}

fn auth_of_name(name: &str) -> Option<u8> {
    NAMES
        .iter()
        .find(|(_, n)| *n == name)
        .map(|(id, _)| *id)
        .or_else(|| name.strip_prefix("auth-")?.parse().ok())
}

/// The directory of one authenticator's applications. `@` is neither a hex digit (this
/// store's application directories) nor base64url (upstream's).
pub fn dir_name(auth: u8) -> String {
    format!("@{}", auth_name(auth))
}

/// The authenticator a directory of the store is for, if it is one.
pub fn auth_of_dir(name: &str) -> Option<u8> {
    auth_of_name(name.strip_prefix('@')?)
}

/// An application directory of the layout before namespaces (a hex name).
fn is_unnamespaced_app_dir(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !name.is_empty()
        && name.len() % 2 == 0
        && name.bytes().all(|b| b.is_ascii_hexdigit())
        && path.is_dir()
}

/// The authenticator `root`'s record names, read without writing anything: None if the
/// store has no record yet; an error if the record is unreadable (nothing is guessed).
pub fn recorded(root: &Path) -> io::Result<Option<u8>> {
    let text = match fs::read_to_string(root.join(RECORD)) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut lines = text.lines();
    let auth = (lines.next() == Some(RECORD_HEADER))
        .then(|| {
            lines
                .next()?
                .strip_prefix("unnamespaced = ")
                .and_then(auth_of_name)
        })
        .flatten();
    match auth {
        Some(auth) => Ok(Some(auth)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is not a namespaces record this version reads (restore it from a backup; its second line is `unnamespaced = <authenticator>`, e.g. `unnamespaced = direct`)",
                root.join(RECORD).display()
            ),
        )),
    }
}

/// Brings `root` to the namespaced layout and returns the authenticator its older entries
/// (and an upstream OnDisk store beside it) belong to: the recorded one, or, at the first
/// start of this version on the store, `configured`, recorded before anything moves.
/// Application directories that cannot be moved whole are reported and left where they are.
pub fn upgrade(root: &Path, configured: u8, damaged: &mut Vec<DamagedEntry>) -> io::Result<u8> {
    // Providers sharing one store directory start on threads of their own: one upgrades it,
    // the others then find it upgraded.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    create_private_dir(root)?;
    let auth = match recorded(root)? {
        Some(auth) => auth,
        None => {
            write_record(root, configured)?;
            crate::crash_point("namespace:after-record");
            configured
        }
    };
    let legacy: Vec<PathBuf> = read_dir_sorted(root)?
        .into_iter()
        .filter(|p| is_unnamespaced_app_dir(p))
        .collect();
    if legacy.is_empty() {
        return Ok(auth);
    }
    let target = root.join(dir_name(auth));
    create_private_dir(&target)?;
    log::info!(
        "key store {}: moving {} application directories into {} (the authenticator recorded in {RECORD})",
        root.display(),
        legacy.len(),
        target.display()
    );
    for (i, app_dir) in legacy.iter().enumerate() {
        let to = target.join(app_dir.file_name().unwrap_or_default());
        if to.exists() {
            merge(app_dir, &to, damaged)?;
        } else {
            fs::rename(app_dir, &to)?;
        }
        crate::crash_point(&format!("namespace:after-move-{i}"));
    }
    sync_dir(&target)?;
    sync_dir(root)?;
    Ok(auth)
}

/// Moves what an application directory holds into its namespaced twin, file by file (a
/// backup of the older layout restored beside an upgraded store). A file both have with
/// other contents stays where it is and is reported: neither copy is lost.
fn merge(from: &Path, to: &Path, damaged: &mut Vec<DamagedEntry>) -> io::Result<()> {
    for provider_dir in read_dir_sorted(from)? {
        let into = to.join(provider_dir.file_name().unwrap_or_default());
        if !provider_dir.is_dir() {
            continue;
        }
        create_private_dir(&into)?;
        for file in read_dir_sorted(&provider_dir)? {
            let dest = into.join(file.file_name().unwrap_or_default());
            if !dest.exists() {
                fs::rename(&file, &dest)?;
            } else if fs::read(&file)? == fs::read(&dest)? {
                fs::remove_file(&file)?;
            } else {
                damaged.push(DamagedEntry {
                    reason: format!(
                        "it is an entry of the layout before namespaces, and {} has another entry of that name: it is left where it is; keep the right one and remove the other",
                        dest.display()
                    ),
                    path: file,
                });
            }
        }
        sync_dir(&into)?;
        let _ = fs::remove_dir(&provider_dir);
    }
    let _ = fs::remove_dir(from);
    Ok(())
}

/// Writes the record crash-safely: a temporary file, synced, renamed over the name, the
/// directory synced.
fn write_record(root: &Path, auth: u8) -> io::Result<()> {
    let text = format!(
        "{RECORD_HEADER}\nunnamespaced = {}\n# the authenticator of entries written before the store had namespaces (docs/key-store.md)\n",
        auth_name(auth)
    );
    let tmp = root.join(format!(".{RECORD}.tmp"));
    replace_file(&root.join(RECORD), &tmp, text.as_bytes())?;
    sync_dir(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_names_round_trip() {
        for auth in [0u8, 1, 2, 3, 4, 9] {
            assert_eq!(auth_of_dir(&dir_name(auth)), Some(auth));
        }
        assert_eq!(dir_name(1), "@direct");
        assert_eq!(dir_name(3), "@unix-peer-credentials");
        assert_eq!(auth_of_dir("616c696365"), None);
        assert_eq!(auth_of_dir("@nobody"), None);
    }

    #[test]
    fn an_unreadable_record_is_an_error_not_a_guess() {
        let dir = std::env::temp_dir().join(format!("pks-{}-ns", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        assert_eq!(recorded(&dir).unwrap(), None);
        write_record(&dir, 3).unwrap();
        assert_eq!(recorded(&dir).unwrap(), Some(3));
        fs::write(dir.join(RECORD), "garbage\n").unwrap();
        assert!(recorded(&dir).is_err());
        let mut damaged = Vec::new();
        assert!(upgrade(&dir, 1, &mut damaged).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
