//! Which Mbed TLS the software provider is linked with, as the library itself says
//! (`mbedtls_version_get_string_full`, in libmbedcrypto since Mbed TLS 2.x): for
//! `parsec --version` and the start-up log, so that an operator can tell whether a device
//! has a release with the security fixes it needs.

use std::ffi::{c_char, c_int, c_uint, CStr};

extern "C" {
    /// Writes "Mbed TLS x.y.z" and a NUL into `string` (at least 18 bytes, says version.h).
    fn mbedtls_version_get_string_full(string: *mut c_char);
    /// 0xMMNNPP00: major, minor, patch.
    fn mbedtls_version_get_number() -> c_uint;
    /// 0 if the library was built with this compile-time option (MBEDTLS_VERSION_FEATURES,
    /// on by default), -1 if not, -2 if it cannot say.
    fn mbedtls_version_check_feature(feature: *const c_char) -> c_int;
}

/// Mbed TLS's PSA core is thread-safe from 3.6.0 on, when built with MBEDTLS_THREADING_C
/// and MBEDTLS_THREADING_PTHREAD (3.6's docs/architecture/psa-thread-safety): only then do
/// two threads call it at once. A library that cannot say is taken as not thread-safe.
pub fn thread_safe() -> bool {
    // SAFETY: returns a constant; no arguments.
    let number = unsafe { mbedtls_version_get_number() };
    let feature = |name: &[u8]| {
        let Ok(name) = CStr::from_bytes_with_nul(name) else {
            return false;
        };
        // SAFETY: `name` is NUL-terminated and outlives the call, which only reads it.
        unsafe { mbedtls_version_check_feature(name.as_ptr()) == 0 }
    };
    number >= 0x0306_0000
        && feature(b"MBEDTLS_THREADING_C\0")
        && feature(b"MBEDTLS_THREADING_PTHREAD\0")
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

    #[test]
    fn the_3_6_build_is_thread_safe() {
        // The build scripts/mbedtls.sh makes; psa-crypto-sys's own 3.0.0 is not.
        let version = super::mbedtls_version();
        assert_eq!(
            super::thread_safe(),
            version.starts_with("Mbed TLS 3.6"),
            "{version}"
        );
    }
}
