//! The error a failed request carries from the provider back to the front end.
//!
//! The client only ever sees `status`. The operator sees all three fields in one log line:
//! the status, the native cause (a PSA error name, an errno, a CKR_* name...) and a hint
//! of what to do about it.

use parsec_interface::requests::ResponseStatus;
use std::fmt;

#[derive(Debug, Clone)]
pub struct OpError {
    /// The most precise status the client can be given.
    pub status: ResponseStatus,
    /// What the layer below said, decoded for a human.
    pub cause: String,
    /// What an operator (or the client's developer) can do about it.
    pub hint: &'static str,
}

impl OpError {
    pub fn new(status: ResponseStatus, cause: impl Into<String>, hint: &'static str) -> Self {
        OpError {
            status,
            cause: cause.into(),
            hint,
        }
    }

    /// An error that needs no explanation beyond its status.
    pub fn status(status: ResponseStatus) -> Self {
        OpError {
            status,
            cause: status.to_string(),
            hint: hint_for(status),
        }
    }

    /// A failure of the key store's files: full disks and permissions get their own status.
    pub fn storage(context: &str, err: &std::io::Error) -> Self {
        let (status, hint) = match err.raw_os_error() {
            Some(code) if code == nix::errno::Errno::ENOSPC as i32 => (
                ResponseStatus::PsaErrorInsufficientStorage,
                "the key store's file system is full: free space or move the store",
            ),
            Some(code) if code == nix::errno::Errno::EDQUOT as i32 => (
                ResponseStatus::PsaErrorInsufficientStorage,
                "the service user's disk quota is exhausted",
            ),
            Some(code) if code == nix::errno::Errno::EACCES as i32 => (
                ResponseStatus::PsaErrorStorageFailure,
                "the service user cannot write the key store: check its owner and mode",
            ),
            Some(code) if code == nix::errno::Errno::EROFS as i32 => (
                ResponseStatus::PsaErrorStorageFailure,
                "the key store is on a read-only file system",
            ),
            _ => (
                ResponseStatus::PsaErrorStorageFailure,
                "check the key store's file system (dmesg, df)",
            ),
        };
        OpError::new(status, format!("{context}: {err}"), hint)
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "status={:?} cause=\"{}\" hint=\"{}\"",
            self.status, self.cause, self.hint
        )
    }
}

impl From<ResponseStatus> for OpError {
    fn from(status: ResponseStatus) -> Self {
        OpError::status(status)
    }
}

/// A default hint for statuses that arise from the request itself.
pub fn hint_for(status: ResponseStatus) -> &'static str {
    use ResponseStatus::*;
    match status {
        PsaErrorDoesNotExist => "no key of that name for this application in this provider: see ListKeys",
        PsaErrorAlreadyExists => "a key of that name exists already: destroy it or choose another name",
        PsaErrorNotPermitted => "the key's policy does not allow this use: check its usage flags and permitted algorithm",
        PsaErrorNotSupported => "this provider does not support that operation or algorithm: see ListOpcodes and CanDoCrypto",
        PsaErrorInvalidArgument => "the request's parameters do not fit the key or the algorithm",
        PsaErrorInvalidSignature => "the signature does not match the hash and the key",
        PsaErrorBufferTooSmall => "the output would exceed the service's buffer limit",
        PsaErrorInsufficientStorage => "free space on the key store's file system",
        PsaErrorInvalidPadding => "the ciphertext was not made with this key and algorithm",
        NotAuthenticated => "send the request with the service's authenticator (see ListAuthenticators)",
        AuthenticationError => "the authentication field does not match the caller",
        AdminOperation => "only applications listed in [authenticator] admins may do this",
        ProviderNotRegistered => "that provider is not enabled in the service's config: see ListProviders",
        AuthenticatorNotRegistered => "the service uses another authenticator: see ListAuthenticators",
        BodySizeExceedsLimit => "raise core_settings.body_len_limit or send less data",
        InvalidEncoding | DeserializingBodyFailed => "the request body is not a valid protobuf for this opcode",
        _ => "see the service log for details",
    }
}

/// A name a client chose, made safe for one log line: control characters, quotes and
/// backslashes escaped (no forged lines), at most 128 characters kept.
pub fn escape(name: &str) -> String {
    escape_capped(name, 128)
}

/// As `escape`, for longer text that embeds client-chosen names (a failure's cause).
pub fn escape_capped(text: &str, cap: usize) -> String {
    let mut out: String = text
        .chars()
        .take(cap)
        .flat_map(|c| c.escape_debug())
        .collect();
    if text.chars().nth(cap).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_insufficient_storage() {
        let err = std::io::Error::from_raw_os_error(nix::errno::Errno::ENOSPC as i32);
        let op = OpError::storage("writing key", &err);
        assert_eq!(op.status, ResponseStatus::PsaErrorInsufficientStorage);
        assert!(op.cause.contains("writing key"));
    }

    #[test]
    fn other_io_errors_are_storage_failures() {
        let err = std::io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32);
        assert_eq!(
            OpError::storage("x", &err).status,
            ResponseStatus::PsaErrorStorageFailure
        );
    }

    #[test]
    fn escape_keeps_one_line_and_caps_the_length() {
        let forged = "nokey\"\n[ERROR parsec] forged line";
        let escaped = super::escape(forged);
        assert!(!escaped.contains('\n'));
        assert_eq!(escaped, "nokey\\\"\\n[ERROR parsec] forged line");
        let long = "a".repeat(1 << 20);
        assert_eq!(super::escape(&long).len(), 128 + 3);
    }
}
