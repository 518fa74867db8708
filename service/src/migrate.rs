//! `parsec migrate --check`: what this service will serve of the key stores a config names,
//! key by key, before it runs on them. It reads and never writes (not even the overlay it
//! would make), so an operator can run it on a device still running upstream Parsec.

use crate::config::{Config, ProviderKind, ProviderSettings};
use crate::error::escape;
use crate::key_store::namespace;
use crate::key_store::upstream::{self, UPSTREAM_TPM_CONTEXT};
use crate::key_store::{KeyEntry, KeyTriple};
use std::collections::BTreeSet;
use std::fmt::Write;
use std::path::Path;

/// The report, and whether every key found will be served.
pub struct Report {
    pub text: String,
    pub all_served: bool,
}

pub fn check(config: &Config) -> Report {
    let mut report = Report {
        text: String::new(),
        all_served: true,
    };
    let mut stores = BTreeSet::new();
    for settings in &config.providers {
        check_provider(settings, &mut report);
        stores.insert(settings.key_store_dir.clone());
    }
    for dir in &stores {
        if upstream::layout(dir).upstream.is_some() {
            other_providers(dir, config, &mut report);
        }
    }
    let _ = writeln!(
        report.text,
        "summary: {}",
        if report.all_served {
            "every key found will be served"
        } else {
            "some keys will not be served (lines marked NOT SERVED); see docs/migration.md"
        }
    );
    report
}

fn check_provider(settings: &ProviderSettings, report: &mut Report) {
    let dir = &settings.key_store_dir;
    let out = &mut report.text;
    let name = escape(&settings.name);
    if dir.is_file() && !crate::key_store::sqlite::is_sqlite_file(dir) {
        let _ = writeln!(
            out,
            "provider \"{name}\": {} is a file, and not an SQLite database: the provider will not start",
            dir.display()
        );
        report.all_served = false;
        return;
    }
    let layout = upstream::layout(dir);
    let Some(upstream_dir) = &layout.upstream else {
        let _ = writeln!(
            out,
            "provider \"{name}\": {} is this service's own key store: nothing to migrate",
            dir.display()
        );
        return;
    };
    let id = crate::providers::id_of(&settings.kind) as u8;
    let _ = writeln!(
        out,
        "provider \"{name}\": {} holds upstream Parsec's key store: read, never written; this service's own entries will go to {}",
        upstream_dir.display(),
        layout.own.display()
    );
    let own_settings = crate::providers::in_own_dirs(settings, &layout);
    // Upstream's OnDisk store has no authenticator: its keys belong to the one the overlay
    // recorded at this service's first start, or will record (the configured one).
    let auth = match namespace::recorded(&layout.own) {
        Ok(recorded) => recorded.unwrap_or(settings.authenticator as u8),
        Err(e) => {
            let _ = writeln!(out, "  NOT SERVED: {e}; the provider will not start");
            report.all_served = false;
            return;
        }
    };
    if !upstream_dir.is_file() {
        let _ = writeln!(
            out,
            "  its keys belong to applications of the {} authenticator",
            namespace::auth_name(auth)
        );
    }
    let (entries, damaged) = match upstream::read(upstream_dir, id, auth) {
        Ok(read) => read,
        Err(e) => {
            let _ = writeln!(out, "  NOT SERVED: {e}; the provider will not start");
            report.all_served = false;
            return;
        }
    };
    let hidden = hidden_in(&layout.own, id, auth);
    for (key, entry, path) in &entries {
        let what = format!(
            "  key \"{}\" of {} application \"{}\" ({})",
            escape(&key.name),
            namespace::auth_name(key.auth),
            escape(&key.app),
            path.display()
        );
        if hidden.contains(key) {
            let _ = writeln!(
                out,
                "{what}: destroyed through this service (recorded in {}); not served",
                layout.own.display()
            );
            continue;
        }
        match verdict(&own_settings, entry) {
            Ok(why) => {
                let _ = writeln!(out, "{what}: served: {why}");
            }
            Err(why) => {
                let _ = writeln!(out, "{what}: NOT SERVED: {why}");
                report.all_served = false;
            }
        }
    }
    for entry in &damaged {
        let _ = writeln!(
            out,
            "  {}: NOT SERVED: {}",
            entry.path.display(),
            entry.reason
        );
        report.all_served = false;
    }
    let _ = writeln!(
        out,
        "  {} keys of upstream's for this provider, {} unreadable",
        entries.len(),
        damaged.len()
    );
}

/// Why a readable upstream entry will or will not work, under the settings the provider
/// will run with (`in_own_dirs`).
fn verdict(settings: &ProviderSettings, entry: &KeyEntry) -> Result<String, String> {
    match &settings.kind {
        ProviderKind::MbedCrypto {
            storage_dir,
            upstream_key_dir,
        } => {
            let id = <[u8; 4]>::try_from(entry.key_id.as_slice())
                .map(u32::from_le_bytes)
                .map_err(|_| format!("a {}-byte key id, not upstream's 4", entry.key_id.len()))?;
            let file = format!("{id:016x}.psa_its");
            if storage_dir.join(&file).is_file() {
                return Ok(format!("its key file is in {}", storage_dir.display()));
            }
            let source = upstream_key_dir.join(&file);
            if source.is_file() {
                Ok(format!(
                    "its key file {} will be copied into {}",
                    source.display(),
                    storage_dir.display()
                ))
            } else {
                Err(format!(
                    "its key file {file} is not in {} (upstream's working directory): set upstream_key_dir in the [[provider]] table",
                    upstream_key_dir.display()
                ))
            }
        }
        ProviderKind::Pkcs11(_) => {
            let id = <[u8; 4]>::try_from(entry.key_id.as_slice())
                .map_err(|_| format!("a {}-byte key id, not upstream's 4", entry.key_id.len()))?;
            Ok(format!(
                "its objects on the token are the ones with CKA_ID {}",
                u32::from_le_bytes(id)
                    .to_be_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ))
        }
        ProviderKind::Tpm(_) => {
            debug_assert_eq!(entry.key_id.first(), Some(&UPSTREAM_TPM_CONTEXT));
            Ok("loaded under upstream's primary key, made again from its template (the TPM must be the one upstream used, its owner hierarchy not cleared)".into())
        }
    }
}

/// Keys this service destroyed (its `.gone` records), read without creating anything: in
/// each authenticator's directory, and in application directories not yet moved into one
/// (`namespace::upgrade`), which are `unnamespaced`'s.
fn hidden_in(own: &Path, provider: u8, unnamespaced: u8) -> BTreeSet<KeyTriple> {
    let mut hidden = BTreeSet::new();
    let Ok(top) = std::fs::read_dir(own) else {
        return hidden;
    };
    let mut app_dirs = Vec::new();
    for dir in top.flatten() {
        match namespace::auth_of_dir(&dir.file_name().to_string_lossy()) {
            Some(auth) => {
                let Ok(apps) = std::fs::read_dir(dir.path()) else {
                    continue;
                };
                app_dirs.extend(apps.flatten().map(|app| (auth, app.path())));
            }
            None => app_dirs.push((unnamespaced, dir.path())),
        }
    }
    for (auth, app) in app_dirs {
        let Ok(files) = std::fs::read_dir(app.join(provider.to_string())) else {
            continue;
        };
        for file in files.flatten() {
            if let Some(key) = crate::key_store::read_gone(&file.path(), provider, auth) {
                hidden.insert(key);
            }
        }
    }
    hidden
}

/// Upstream keys of providers this config does not enable.
fn other_providers(dir: &Path, config: &Config, report: &mut Report) {
    let enabled: BTreeSet<u8> = config
        .providers
        .iter()
        .filter(|p| p.key_store_dir == dir)
        .map(|p| crate::providers::id_of(&p.kind) as u8)
        .collect();
    for id in 1..=5u8 {
        if enabled.contains(&id) {
            continue;
        }
        let Ok((entries, _)) = upstream::read(dir, id, 0) else {
            continue;
        };
        if !entries.is_empty() {
            let _ = writeln!(
                report.text,
                "{}: {} keys of provider {id}, which this config does not enable: NOT SERVED (kept as they are)",
                dir.display(),
                entries.len()
            );
            report.all_served = false;
        }
    }
}
