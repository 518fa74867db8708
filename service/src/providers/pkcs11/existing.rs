//! Keys that were on the token before the service (`[[provider.existing_keys]]`): found and mounted into the key store at start-up.

use super::*;

/// Finds an existing key on the token and mounts it into the key store.
pub(super) fn mount(
    conn: &mut Connection,
    store: &mut KeyStore,
    existing: &ExistingKey,
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
    let objects = conn
        .objects(&key_id)
        .map_err(|e| format!("{}: {}", describe(), e.cause))?;
    let attributes =
        attributes_of(conn, objects).map_err(|e| format!("{}: {}", describe(), e.cause))?;
    store
        .mount(
            KeyTriple::new(&existing.application, ProviderId::Pkcs11, &existing.name),
            KeyEntry { key_id, attributes },
        )
        .map_err(|e| format!("{}: {e}", describe()))?;
    log::info!(
        "pkcs11: {} mapped: {:?} of {} bits{}",
        describe(),
        attributes.key_type,
        attributes.bits,
        if existing.owned { ", owned" } else { "" }
    );
    Ok(())
}
