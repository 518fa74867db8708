//! Upstream Parsec's key stores (1.4, 1.5), read as they are and never written: its OnDisk
//! directory (here) and its SQLite database (`sqlite`).
//!
//! A device that ran upstream Parsec keeps its store where its config says (`store_path`):
//!
//! ```text
//! <store_path>/<base64url(application)>/<provider id>/<base64url(key name)>
//! <store_path>/parsec/...           (upstream's internal keys)
//! ```
//!
//! each file a bincode `KeyInfo { id, attributes }`: the same payload as this store's
//! `KeyEntry`. When `store_path` holds such a store, this service serves its keys and
//! writes nothing into it, so that the device can go back to upstream: its own entries and
//! journals go to the *overlay* beside it (`<store_path>.overlay`), and a destroyed upstream
//! key is recorded there (a `.gone` file, see `KeyStore::stage_remove`), hiding it from
//! this service; upstream, if the device goes back to it, still lists it
//! (docs/migration.md).

use super::{DamagedEntry, KeyEntry, KeyTriple, MAX_NAME_LEN};
use std::fs;
use std::path::{Path, PathBuf};

/// Where a provider's entries are read and written.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// This service's own entries and journals (written).
    pub own: PathBuf,
    /// Upstream's store (read only), when the configured directory holds one.
    pub upstream: Option<PathBuf>,
}

/// The first byte of a TPM entry's key id read from upstream's store (the TPM provider's own
/// blobs start with their version, 1): the TPM provider loads such a key under upstream's
/// primary key, made again (`providers::tpm::upstream`).
pub const UPSTREAM_TPM_CONTEXT: u8 = 0xFF;
const TPM: u8 = 3;

/// Upstream's directory of internal keys; this store names application directories in hex,
/// so it never makes one of that name.
const INTERNAL_DIR: &str = "parsec";

/// Whether `dir` holds upstream Parsec's OnDisk store: upstream makes `parsec/` in it at
/// every start, and names applications in base64, which this store's hex names never are
/// (beside the directories this store makes itself).
pub fn is_upstream_store(dir: &Path) -> bool {
    if dir.join(INTERNAL_DIR).is_dir() {
        return true;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return false;
    };
    // Without `parsec/` (removed by hand), an application directory laid out as upstream's:
    // a base64 name (never one of this store's hex names), a provider-id directory, and a
    // key file with a base64 name in it.
    entries.filter_map(Result::ok).any(|entry| {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        entry.path().is_dir()
            && !name.bytes().all(|b| b.is_ascii_hexdigit())
            && decode_name(&name).is_some()
            && (1..=6u8).any(|id| {
                fs::read_dir(entry.path().join(id.to_string())).is_ok_and(|files| {
                    files.filter_map(Result::ok).any(|f| {
                        f.path().is_file()
                            && decode_name(&f.file_name().to_string_lossy()).is_some()
                    })
                })
            })
    })
}

/// The overlay that takes this service's writes beside an upstream store.
pub fn overlay_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".overlay");
    dir.with_file_name(name)
}

/// Where the entries of a key store directory go: the directory itself, or, if it holds
/// upstream's store (its OnDisk directory, or its SQLite database file), the overlay beside
/// it.
pub fn layout(dir: &Path) -> Layout {
    if is_upstream_store(dir) || super::sqlite::is_sqlite_file(dir) {
        Layout {
            own: overlay_of(dir),
            upstream: Some(dir.to_path_buf()),
        }
    } else {
        Layout {
            own: dir.to_path_buf(),
            upstream: None,
        }
    }
}

/// Entries read from upstream's store, each with the file it came from, and those that could
/// not be read.
pub type Read = (Vec<(KeyTriple, KeyEntry, PathBuf)>, Vec<DamagedEntry>);

/// Reads one provider's entries from upstream's store: its SQLite database, whose rows name
/// their authenticator, or its OnDisk directory, whose keys are taken as the authenticator
/// `auth`'s (it does not record one: `namespace`). An entry that cannot be read, or whose
/// names this store cannot hold, is reported (never served, never touched); a database this
/// service cannot read as it is fails whole, with the reason.
pub fn read(root: &Path, provider: u8, auth: u8) -> std::io::Result<Read> {
    if root.is_file() {
        return read_sqlite(root, provider)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    }
    Ok(read_on_disk(root, provider, auth))
}

/// Upstream's provider UUIDs (its `key_mapping.provider_uuid`), by provider id.
const PROVIDER_UUIDS: [(u8, &str); 3] = [
    (1, "1c1139dc-ad7c-47dc-ad6b-db6fdb466552"),
    (2, "30e39502-eba6-4d60-a4af-c518b7f5e38f"),
    (3, "1e4954a4-ff21-46d3-ab0c-661eeb667e1d"),
];

/// Upstream's authenticator id of its own internal keys (the TPM root key's name).
const INTERNAL_AUTH_ID: i64 = 255;

fn read_sqlite(db: &Path, provider: u8) -> Result<Read, String> {
    let rows = super::sqlite::read_key_mapping(db)
        .map_err(|e| format!("upstream Parsec's SQLite key store {}: {e}", db.display()))?;
    let uuid = PROVIDER_UUIDS
        .iter()
        .find(|(id, _)| *id == provider)
        .map(|(_, uuid)| *uuid);
    let mut entries = Vec::new();
    let mut damaged = Vec::new();
    for row in rows {
        if Some(row.provider_uuid.as_str()) != uuid || row.authenticator_id == INTERNAL_AUTH_ID {
            continue;
        }
        let result = (|| {
            let auth = u8::try_from(row.authenticator_id)
                .map_err(|_| format!("authenticator id {}", row.authenticator_id))?;
            if row.key_id_version != 1 || row.key_attributes_version != 1 {
                return Err(format!(
                    "key id version {} and attributes version {} (upstream 1.4 and 1.5 write 1 and 1)",
                    row.key_id_version, row.key_attributes_version
                ));
            }
            check_names(&row.application_name, &row.key_name)?;
            let attributes = bincode::deserialize(&row.key_attributes)
                .map_err(|e| format!("undecodable key attributes: {e}"))?;
            let mut entry = KeyEntry {
                key_id: row.key_id.clone(),
                attributes,
            };
            if provider == TPM {
                entry.key_id.insert(0, UPSTREAM_TPM_CONTEXT);
            }
            Ok((
                KeyTriple {
                    auth,
                    app: row.application_name.clone(),
                    provider,
                    name: row.key_name.clone(),
                },
                entry,
            ))
        })();
        match result {
            Ok((key, entry)) => entries.push((key, entry, db.to_path_buf())),
            Err(reason) => damaged.push(DamagedEntry {
                path: db.to_path_buf(),
                reason: format!(
                    "its row for key \"{}\" of \"{}\": {reason}",
                    crate::error::escape_capped(&row.key_name, 64),
                    crate::error::escape_capped(&row.application_name, 64)
                ),
            }),
        }
    }
    Ok((entries, damaged))
}

/// Refuses names this store cannot hold.
fn check_names(app: &str, name: &str) -> Result<(), String> {
    if app.is_empty() || app.len() > MAX_NAME_LEN || name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "an upstream entry with an application name of {} bytes and a key name of {} bytes: this service holds names of 1 to {MAX_NAME_LEN} bytes",
            app.len(),
            name.len()
        ));
    }
    Ok(())
}

fn read_on_disk(root: &Path, provider: u8, auth: u8) -> Read {
    let mut entries = Vec::new();
    let mut damaged = Vec::new();
    let Ok(apps) = super::read_dir_sorted(root) else {
        return (entries, damaged);
    };
    for app_dir in apps {
        let dir_name = app_dir.file_name().unwrap_or_default().to_string_lossy();
        if dir_name == INTERNAL_DIR || !app_dir.is_dir() {
            continue;
        }
        let provider_dir = app_dir.join(provider.to_string());
        if !provider_dir.is_dir() {
            continue;
        }
        let app = decode_name(&dir_name);
        let files = match super::read_dir_sorted(&provider_dir) {
            Ok(files) => files,
            Err(e) => {
                damaged.push(DamagedEntry {
                    path: provider_dir,
                    reason: format!("upstream store directory unreadable: {e}"),
                });
                continue;
            }
        };
        for path in files {
            let file_name = path.file_name().unwrap_or_default().to_string_lossy();
            let result = (|| {
                let app = app
                    .clone()
                    .ok_or("its application directory's name is not base64url UTF-8")?;
                let name = decode_name(&file_name).ok_or("its file name is not base64url UTF-8")?;
                check_names(&app, &name)?;
                let bytes = fs::read(&path).map_err(|e| format!("unreadable: {e}"))?;
                let mut entry: KeyEntry = bincode::deserialize(&bytes)
                    .map_err(|e| format!("not an upstream Parsec key info file: {e}"))?;
                if provider == TPM {
                    // Upstream's TPM context (its key under upstream's primary), which the
                    // TPM provider tells from its own blobs by this first byte.
                    entry.key_id.insert(0, UPSTREAM_TPM_CONTEXT);
                }
                Ok((
                    KeyTriple {
                        auth,
                        app,
                        provider,
                        name,
                    },
                    entry,
                ))
            })();
            match result {
                Ok((key, entry)) => entries.push((key, entry, path)),
                Err(reason) => damaged.push(DamagedEntry { path, reason }),
            }
        }
    }
    (entries, damaged)
}

/// A name as upstream stores it: base64url (with padding) of its UTF-8 bytes.
pub fn decode_name(text: &str) -> Option<String> {
    String::from_utf8(decode_base64url(text)?).ok()
}

/// Base64 with the URL-safe alphabet, padded to a multiple of 4 (as upstream writes it);
/// unpadded input is accepted too.
fn decode_base64url(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        } as u32)
    };
    let body = text.trim_end_matches('=');
    if text.len() - body.len() > 2 || body.len() % 4 == 1 || body.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    for chunk in body.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decode_as_upstream_encodes_them() {
        // base64::engine::general_purpose::URL_SAFE, as upstream 1.5.0 writes file names.
        assert_eq!(decode_name("YWxpY2U=").as_deref(), Some("alice"));
        assert_eq!(decode_name("ZWNjLXNpZ24=").as_deref(), Some("ecc-sign"));
        assert_eq!(decode_name("MA==").as_deref(), Some("0"));
        assert_eq!(
            decode_name("cnNhLWRlY3J5cHQ=").as_deref(),
            Some("rsa-decrypt")
        );
        assert_eq!(decode_name("_-8=").map(|s| s.into_bytes()), None); // not UTF-8
        assert_eq!(decode_base64url("_-8="), Some(vec![0xff, 0xef]));
        assert_eq!(decode_name("a"), None);
        assert_eq!(decode_name(""), None);
        assert_eq!(decode_name("ab+c"), None);
    }

    #[test]
    fn only_upstreams_layout_is_taken_for_upstreams_store() {
        let dir = std::env::temp_dir().join(format!("pks-{}-detect", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        // This store's own: hex application names, and a directory an operator added whose
        // name happens to be base64 ("abc").
        fs::create_dir_all(dir.join("616c696365/1")).unwrap();
        fs::create_dir_all(dir.join("YWJj/backup")).unwrap();
        assert!(!is_upstream_store(&dir));
        // Upstream's layout: application, provider id, key file, all base64.
        fs::create_dir_all(dir.join("YWxpY2U=/1")).unwrap();
        assert!(!is_upstream_store(&dir), "no key file yet");
        fs::write(dir.join("YWxpY2U=/1/azE="), b"").unwrap();
        assert!(is_upstream_store(&dir));
        fs::remove_dir_all(dir.join("YWxpY2U=")).unwrap();
        // Upstream makes parsec/ at every start, keys or not.
        fs::create_dir_all(dir.join("parsec")).unwrap();
        assert!(is_upstream_store(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_overlay_sits_beside_the_store() {
        assert_eq!(
            overlay_of(Path::new("/var/lib/parsec/mappings")),
            Path::new("/var/lib/parsec/mappings.overlay")
        );
    }
}
