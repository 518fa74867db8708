//! What can be known of a provider's new settings without touching its device: checked at a
//! reload before the running instance is stopped for them.
//!
//! A reload replaces an instance by stopping it first (a token or a TPM is opened by one
//! instance at a time), so a successor that then fails to start costs its provider a
//! restart on the old settings. The commonest operator mistakes are seen on the file
//! system: a PKCS#11 module path with a typo, a TPM device node that is not there, a
//! software key directory that is a file. Those leave the running instance untouched.
//! Only metadata is read (a `stat`, and opening a module file for reading): no device node
//! is opened, so nothing here can wait on a device or take a TPM from its user.

use crate::config::ProviderKind;
use std::path::Path;

/// Why these settings cannot start, if the file system already says so.
pub fn check(kind: &ProviderKind) -> Result<(), String> {
    match kind {
        ProviderKind::MbedCrypto { storage_dir, .. } => match std::fs::metadata(storage_dir) {
            Ok(meta) if !meta.is_dir() => Err(format!(
                "storage_dir {} is not a directory",
                storage_dir.display()
            )),
            _ => Ok(()),
        },
        ProviderKind::Pkcs11(settings) => readable_file(&settings.library_path, "library_path"),
        ProviderKind::Tpm(settings) => tpm_device(&settings.tcti),
    }
}

fn readable_file(path: &Path, key: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{key} {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{key} {} is not a file", path.display()));
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("{key} {} cannot be read: {e}", path.display()))
}

/// A `device:` TCTI names a character device; other TCTIs (a simulator's socket, tabrmd's
/// D-Bus name) are only known when they are tried.
fn tpm_device(tcti: &str) -> Result<(), String> {
    let Some(path) = tcti.strip_prefix("device:") else {
        return Ok(());
    };
    let path = if path.is_empty() { "/dev/tpm0" } else { path };
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_char_device() => Ok(()),
        Ok(_) => Err(format!("tcti \"{tcti}\": {path} is not a device")),
        Err(e) => Err(format!("tcti \"{tcti}\": {path}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tpm_device_must_be_a_character_device() {
        assert!(tpm_device("device:/dev/null").is_ok());
        let err = tpm_device("device:/dev/tpmrm9").unwrap_err();
        assert!(err.contains("/dev/tpmrm9"), "{err}");
        let this = std::env::current_exe().unwrap();
        assert!(tpm_device(&format!("device:{}", this.display())).is_err());
        assert!(tpm_device("swtpm:host=127.0.0.1,port=2321").is_ok());
    }

    #[test]
    fn a_module_must_be_a_readable_file() {
        let this = std::env::current_exe().unwrap();
        assert!(readable_file(&this, "library_path").is_ok());
        let err = readable_file(Path::new("/nonexistent/lib.so"), "library_path").unwrap_err();
        assert!(err.starts_with("library_path /nonexistent/lib.so"), "{err}");
        assert!(readable_file(this.parent().unwrap(), "library_path").is_err());
    }
}
