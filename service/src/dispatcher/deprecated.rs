//! Primitives PSA Crypto 1.0 deprecates (MD2, MD4, MD5 and SHA-1 in any algorithm, DES,
//! ARC4, the small and the r2 ECC curves), as upstream Parsec 1.5.0 treats them: a key for
//! one is not generated unless `core_settings.allow_deprecated = true`
//! (`PsaGenerateKey` answers `DeprecatedPrimitive`), and an imported one is served with a
//! warning in the log. The list is parsec-interface's, the one upstream uses.

use crate::error::{escape_capped, OpError};
use parsec_interface::operations::utils_deprecated_primitives::CheckDeprecated;
use parsec_interface::operations::NativeOperation;
use parsec_interface::requests::ResponseStatus;

/// Refuses a generation of a deprecated key unless the config allows it; warns of an import.
pub(super) fn check(operation: &NativeOperation, app: &str, allowed: bool) -> Result<(), OpError> {
    let (name, deprecated, generating) = match operation {
        NativeOperation::PsaGenerateKey(op) => (&op.key_name, op.check_deprecated().is_err(), true),
        NativeOperation::PsaImportKey(op) => (&op.key_name, op.check_deprecated().is_err(), false),
        _ => return Ok(()),
    };
    if !deprecated {
        return Ok(());
    }
    if generating && !allowed {
        return Err(OpError::new(
            ResponseStatus::DeprecatedPrimitive,
            format!(
                "key \"{}\": its type, size or algorithm is deprecated by PSA Crypto 1.0 (MD5, SHA-1, DES, a 163-bit curve, ...)",
                escape_capped(name, 128)
            ),
            "choose SHA-256 or stronger and a current key type; core_settings.allow_deprecated = true allows such keys, as in upstream Parsec",
        ));
    }
    log::warn!(
        "app={} key \"{}\": {} a key whose type, size or algorithm PSA Crypto 1.0 deprecates",
        escape_capped(app, 64),
        escape_capped(name, 128),
        if generating {
            "generating (core_settings.allow_deprecated)"
        } else {
            "importing"
        }
    );
    Ok(())
}
