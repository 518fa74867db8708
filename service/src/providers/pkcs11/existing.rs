//! The token's objects at start-up: keys that were on the token before the service
//! (`[[provider.existing_keys]]`), found and mounted into the key store; the service's own
//! objects reconciled with the key store (interrupted creates undone on positive evidence,
//! objects no entry names reported).

use super::*;

/// Finds an existing key on the token and mounts it into the key store.
pub(super) fn mount(
    conn: &mut Connection,
    store: &mut KeyStore,
    existing: &ExistingKey,
    auth: AuthType,
) -> Result<(), String> {
    let key = KeyRef {
        id: existing.id.clone(),
        label: existing.label.clone(),
    };
    let key_id = key.encode();
    let describe = || {
        format!(
            "existing key \"{}\" of \"{}\" (label {:?}, id {})",
            existing.name,
            existing.application,
            existing.label.as_deref().unwrap_or("-"),
            existing
                .id
                .as_ref()
                .map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>())
                .unwrap_or_else(|| "-".into())
        )
    };
    let objects = conn.objects(&key_id).map_err(|e| {
        format!(
            "{}: {}{}",
            describe(),
            e.cause,
            text_id_hint(conn, existing).unwrap_or_default()
        )
    })?;
    let attributes =
        attributes_of(conn, objects).map_err(|e| format!("{}: {}", describe(), e.cause))?;
    store
        .mount(
            KeyTriple::new(
                &AppId::new(auth, &existing.application),
                ProviderId::Pkcs11,
                &existing.name,
            ),
            KeyEntry { key_id, attributes },
        )
        .map_err(|e| format!("{}: {e}", describe()))?;
    if objects.private.is_none() && !conn.logged_in {
        log::warn!(
            "pkcs11: {} is mounted as a public key only: user_pin is empty, and tokens show private keys only to a logged-in session (set user_pin to sign or decrypt with it)",
            describe()
        );
    }
    log::info!(
        "pkcs11: {} mapped: {:?} of {} bits{}",
        describe(),
        attributes.key_type,
        attributes.bits,
        if existing.owned { ", owned" } else { "" }
    );
    Ok(())
}

/// When no object has the configured CKA_ID but one has its hex digits as text (what
/// `tpm2_ptool addkey --id=1011` stores: the bytes of "1011"), what to write instead.
fn text_id_hint(conn: &mut Connection, existing: &ExistingKey) -> Option<String> {
    let id = existing.id.as_ref()?;
    let digits = super::hex(id);
    let as_text = digits.as_bytes().to_vec();
    let found = conn
        .session
        .find_objects(&[Attribute::Id(as_text.clone())])
        .ok()?;
    if found.is_empty() {
        return None;
    }
    Some(format!(
        "; but {} objects have the text \"{digits}\" as CKA_ID (hex {}), as tpm2_ptool --id stores it: write id = \"str:{digits}\" (or id = \"{}\")",
        found.len(),
        super::hex(&as_text),
        super::hex(&as_text)
    ))
}

/// Reports the service's objects on the token (labels starting with `parsec/`) that no key
/// store entry names: left by a crash between C_GenerateKeyPair and the entry, or named by
/// a damaged entry. They are never destroyed here (nothing proves nobody needs them): the
/// log names each, with what to do.
pub(super) fn report_unnamed(conn: &mut Connection, store: &KeyStore, damaged: usize) {
    let referenced: std::collections::HashSet<Vec<u8>> = store
        .keys_in(ProviderId::Pkcs11)
        .filter_map(|(_, entry)| KeyRef::decode(&entry.key_id).ok()?.id)
        .collect();
    let Ok(handles) = conn
        .session
        .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
    else {
        return;
    };
    let mut unnamed = 0;
    for handle in handles {
        let Ok(values) = conn
            .session
            .get_attributes(handle, &[AttributeType::Label, AttributeType::Id])
        else {
            continue;
        };
        let (mut label, mut id) = (None, None);
        for value in values {
            match value {
                Attribute::Label(bytes) => {
                    label = Some(String::from_utf8_lossy(&bytes).to_string())
                }
                Attribute::Id(bytes) => id = Some(bytes),
                _ => {}
            }
        }
        let (Some(label), Some(id)) = (label, id) else {
            continue;
        };
        if !label.starts_with(LABEL_PREFIX) || referenced.contains(&id) {
            continue;
        }
        unnamed += 1;
        log::warn!(
            "pkcs11: the service's key \"{}\" (CKA_ID {}) on {} is named by no key store entry{}: kept. {}",
            crate::error::escape(&label),
            id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            conn.token,
            if damaged > 0 { format!(" ({damaged} entries of this provider are damaged or unreadable)") } else { String::new() },
            if damaged > 0 { "Restore the damaged entries first: this may be one of their keys." } else { "A crash between its creation and its entry leaves such a key; if nothing needs it, delete it with pkcs11-tool --delete-object --type privkey --id <CKA_ID> (and --type pubkey)." }
        );
    }
    if unnamed > 0 {
        log::warn!(
            "pkcs11: {unnamed} of the service's keys on {} are named by no entry (see above)",
            conn.token
        );
    }
}

/// Resolves the records left since the last start: a record whose CKA_ID an entry names is
/// a finished create or a destroy never acknowledged (dropped: the objects are whole); one
/// no entry names is a create no client was told of, or a destroy whose entry's removal was
/// durable: its objects are destroyed, unless damaged entries exist (then it may be one of
/// theirs: kept, with the record, and reported).
pub(super) fn resolve_journal(
    conn: &mut Connection,
    store: &KeyStore,
    journal: &super::Journal,
    damaged: usize,
) {
    let referenced: std::collections::HashSet<String> = store
        .keys_in(ProviderId::Pkcs11)
        .filter_map(|(_, entry)| KeyRef::decode(&entry.key_id).ok()?.id)
        .map(|id| super::hex(&id))
        .collect();
    let pending = match journal.pending() {
        Ok(pending) => pending,
        Err(e) => {
            log::error!("pkcs11: cannot read the journal: {e}; nothing is undone");
            return;
        }
    };
    for (kind, key) in pending {
        let record = journal.found(kind, &key);
        if referenced.contains(&key) {
            // A finished create; or a destroy whose entry's removal never became durable
            // (never acknowledged): its objects are destroyed only after that, so the key
            // is whole.
            journal.done(record);
            continue;
        }
        let what = match kind {
            super::Kind::Create => "were being created when the service stopped",
            super::Kind::Destroy => "have a destroy record and no readable entry",
        };
        if damaged > 0 {
            log::error!(
                "pkcs11: the objects with CKA_ID {key} on {} {what}, and {damaged} entries of this provider are damaged or unreadable: kept (they may be one of theirs). Restore or remove the damaged entries and restart",
                conn.token
            );
            continue;
        }
        let id: Vec<u8> = (0..key.len() / 2)
            .filter_map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).ok())
            .collect();
        let handles = conn
            .session
            .find_objects(&[Attribute::Id(id)])
            .unwrap_or_default();
        let mut destroyed = 0;
        for handle in &handles {
            if conn.session.destroy_object(*handle).is_ok() {
                destroyed += 1;
            }
        }
        if destroyed < handles.len() {
            log::error!(
                "pkcs11: could destroy only {destroyed} of the {} objects with CKA_ID {key} on {}: kept for the next start",
                handles.len(),
                conn.token
            );
            continue;
        }
        if destroyed > 0 {
            log::warn!(
                "pkcs11: destroyed {destroyed} objects with CKA_ID {key} on {}: {}",
                conn.token,
                match kind {
                    super::Kind::Create =>
                        "their creation was interrupted before any client was told the key exists",
                    super::Kind::Destroy =>
                        "their key was destroyed (its entry's removal was durable) but the objects were not",
                }
            );
        }
        journal.done(record);
    }
}
