//! Which Mbed TLS the software provider is linked with, as the library itself says
//! (`mbedtls_version_get_string_full`, in libmbedcrypto since Mbed TLS 2.x): for
//! `parsec --version` and the start-up log, so that an operator can tell whether a device
//! has a release with the security fixes it needs.

use std::ffi::{c_char, CStr};

extern "C" {
    /// Writes "Mbed TLS x.y.z" and a NUL into `string` (at least 18 bytes, says version.h).
    fn mbedtls_version_get_string_full(string: *mut c_char);
}

/// "mbed TLS 3.0.0" (Mbed TLS 3.6 writes "Mbed TLS 3.6.6").
pub fn mbedtls_version() -> String {
    let mut buffer = [0 as c_char; 64];
    // SAFETY: the function writes at most 18 bytes, NUL included ("Mbed TLS " and a version
    // of up to 8 characters, version.h), into a buffer of 64; it reads nothing else and keeps
    // no pointer.
    unsafe { mbedtls_version_get_string_full(buffer.as_mut_ptr()) };
    // SAFETY: the buffer was zeroed and the function NUL-terminates what it writes, within it.
    let text = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    text.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_the_linked_library() {
        let version = super::mbedtls_version();
        // "mbed TLS 3.0.0" (3.0 spells it so), "Mbed TLS 3.6.6".
        assert!(
            version.to_lowercase().starts_with("mbed tls 3."),
            "{version}"
        );
    }
}
