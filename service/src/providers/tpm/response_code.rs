//! TPM and TSS response codes, decoded for the operator and mapped to PSA statuses.
//!
//! A `TSS2_RC` is 32 bits: bits 16-23 name the layer that answered (0 = the TPM itself,
//! 7 = ESAPI, 8 = SAPI, 10 = the TCTI, 11/12 = a resource manager...), the low 16 bits the
//! code. TPM codes come in two formats (TPM 2.0 Part 2, 6.6): format one (bit 7 set) names
//! an error and the handle, session or parameter it concerns; format zero is either a
//! version-1 error (bit 8) or a warning (bit 11). Every log line the provider writes for a
//! failed TPM call carries [`Decoded::describe`]: layer, format, name and meaning.

use parsec_interface::requests::ResponseStatus;

/// A response code taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub raw: u32,
    pub layer: &'static str,
    /// `TPM_RC_*` or `TSS2_BASE_RC_*` name, without the prefix.
    pub name: &'static str,
    pub meaning: &'static str,
    /// What the code refers to: "handle 1", "parameter 2", "session 1", or "".
    pub subject: String,
    pub format: &'static str,
    pub status: ResponseStatus,
}

impl Decoded {
    /// One phrase for a log line, e.g.
    /// `TPM_RC_SIGNATURE (0x2db, TPM layer, format one, parameter 2): the signature is not valid`.
    pub fn describe(&self) -> String {
        let prefix = if self.layer == "TPM" || self.layer == "resource manager (TPM code)" {
            "TPM_RC_"
        } else {
            "TSS2_BASE_RC_"
        };
        let mut where_ = format!("{:#x}, {} layer, {}", self.raw, self.layer, self.format);
        if !self.subject.is_empty() {
            where_.push_str(", ");
            where_.push_str(&self.subject);
        }
        format!("{prefix}{} ({where_}): {}", self.name, self.meaning)
    }

    /// A TPM code (from the TPM itself or passed on by a resource manager).
    pub fn is_tpm(&self) -> bool {
        self.layer == "TPM" || self.layer == "resource manager (TPM code)"
    }
}

fn layer_name(layer: u32) -> &'static str {
    match layer {
        0 => "TPM",
        1..=5 => "vendor",
        6 => "feature API",
        7 => "ESAPI",
        8 => "SAPI",
        9 => "marshalling",
        10 => "TCTI",
        11 => "resource manager",
        12 => "resource manager (TPM code)",
        _ => "unknown",
    }
}

use ResponseStatus as S;

/// Decodes any `TSS2_RC`.
pub fn decode(raw: u32) -> Decoded {
    let layer = (raw >> 16) & 0xff;
    let code = raw & 0xffff;
    match layer {
        0 | 12 => decode_tpm(raw, layer_name(layer), code),
        _ => {
            let (name, meaning, status) = tss_base(code);
            Decoded {
                raw,
                layer: layer_name(layer),
                name,
                meaning,
                subject: String::new(),
                format: "TSS base code",
                status,
            }
        }
    }
}

fn decode_tpm(raw: u32, layer: &'static str, code: u32) -> Decoded {
    if code & 0x80 != 0 {
        let number = (code >> 8) & 0xf;
        let subject = if code & 0x40 != 0 {
            format!("parameter {number}")
        } else if number & 0x8 != 0 {
            format!("session {}", number & 0x7)
        } else if number != 0 {
            format!("handle {number}")
        } else {
            String::new()
        };
        let (name, meaning, status) = format_one(code & 0x3f);
        return Decoded {
            raw,
            layer,
            name,
            meaning,
            subject,
            format: "format one",
            status,
        };
    }
    if code & 0x400 != 0 {
        return Decoded {
            raw,
            layer,
            name: "VENDOR",
            meaning: "a code defined by the TPM's vendor",
            subject: String::new(),
            format: "format zero, vendor",
            status: S::PsaErrorHardwareFailure,
        };
    }
    let (format, (name, meaning, status)) = if code & 0x800 != 0 {
        ("format zero, warning", warning(code & 0x7f))
    } else if code & 0x100 != 0 {
        ("format zero, version 1", version_one(code & 0x7f))
    } else {
        (
            "format zero, TPM 1.2",
            (
                "TPM12",
                "a TPM 1.2 response code: is this a TPM 2.0?",
                S::PsaErrorCommunicationFailure,
            ),
        )
    };
    Decoded {
        raw,
        layer,
        name,
        meaning,
        subject: String::new(),
        format,
        status,
    }
}

type Entry = (&'static str, &'static str, ResponseStatus);

fn format_one(number: u32) -> Entry {
    match number {
        0x01 => (
            "ASYMMETRIC",
            "the asymmetric algorithm is not supported or not correct",
            S::PsaErrorNotSupported,
        ),
        0x02 => (
            "ATTRIBUTES",
            "inconsistent attributes",
            S::PsaErrorInvalidArgument,
        ),
        0x03 => (
            "HASH",
            "the hash algorithm is not supported or not appropriate",
            S::PsaErrorNotSupported,
        ),
        0x04 => (
            "VALUE",
            "a value is out of range or not correct for the context",
            S::PsaErrorInvalidArgument,
        ),
        0x05 => (
            "HIERARCHY",
            "the hierarchy is not enabled or not correct for the use",
            S::PsaErrorNotPermitted,
        ),
        0x07 => (
            "KEY_SIZE",
            "the key size is not supported",
            S::PsaErrorNotSupported,
        ),
        0x08 => (
            "MGF",
            "the mask generation function is not supported",
            S::PsaErrorNotSupported,
        ),
        0x09 => (
            "MODE",
            "the mode of operation is not supported",
            S::PsaErrorNotSupported,
        ),
        0x0A => (
            "TYPE",
            "the type of the value is not appropriate for the use",
            S::PsaErrorInvalidArgument,
        ),
        0x0B => (
            "HANDLE",
            "the handle is not correct for the use",
            S::PsaErrorInvalidArgument,
        ),
        0x0C => (
            "KDF",
            "the key derivation function is not supported",
            S::PsaErrorNotSupported,
        ),
        0x0D => (
            "RANGE",
            "a value is out of range",
            S::PsaErrorInvalidArgument,
        ),
        0x0E => (
            "AUTH_FAIL",
            "the authorization HMAC check failed and the dictionary-attack counter was incremented",
            S::PsaErrorNotPermitted,
        ),
        0x0F => (
            "NONCE",
            "an invalid nonce size or nonce value",
            S::PsaErrorNotPermitted,
        ),
        0x10 => (
            "PP",
            "authorization requires assertion of physical presence",
            S::PsaErrorNotPermitted,
        ),
        0x12 => (
            "SCHEME",
            "the scheme is not supported",
            S::PsaErrorNotSupported,
        ),
        0x15 => (
            "SIZE",
            "a structure is the wrong size",
            S::PsaErrorInvalidArgument,
        ),
        0x16 => (
            "SYMMETRIC",
            "the symmetric algorithm is not supported",
            S::PsaErrorNotSupported,
        ),
        0x17 => (
            "TAG",
            "an incorrect structure tag",
            S::PsaErrorInvalidArgument,
        ),
        0x18 => (
            "SELECTOR",
            "the union selector is incorrect",
            S::PsaErrorInvalidArgument,
        ),
        0x1A => (
            "INSUFFICIENT",
            "the TPM could not unmarshal a value: the input is too short",
            S::PsaErrorInvalidArgument,
        ),
        0x1B => (
            "SIGNATURE",
            "the signature is not valid",
            S::PsaErrorInvalidSignature,
        ),
        0x1C => (
            "KEY",
            "the key fields are not compatible with the selected use",
            S::PsaErrorInvalidArgument,
        ),
        0x1D => (
            "POLICY_FAIL",
            "a policy check failed",
            S::PsaErrorNotPermitted,
        ),
        0x1F => (
            "INTEGRITY",
            "an integrity check failed",
            S::PsaErrorInvalidArgument,
        ),
        0x20 => ("TICKET", "an invalid ticket", S::PsaErrorInvalidArgument),
        0x21 => (
            "RESERVED_BITS",
            "reserved bits are not set to zero as required",
            S::PsaErrorInvalidArgument,
        ),
        0x22 => (
            "BAD_AUTH",
            "the authorization failed without dictionary-attack implications",
            S::PsaErrorNotPermitted,
        ),
        0x23 => ("EXPIRED", "the policy has expired", S::PsaErrorNotPermitted),
        0x24 => (
            "POLICY_CC",
            "the command code in the policy is not the command's",
            S::PsaErrorNotPermitted,
        ),
        0x25 => (
            "BINDING",
            "the public and sensitive parts of an object are not cryptographically bound",
            S::PsaErrorInvalidArgument,
        ),
        0x26 => (
            "CURVE",
            "the curve is not supported",
            S::PsaErrorNotSupported,
        ),
        0x27 => (
            "ECC_POINT",
            "the point is not on the required curve",
            S::PsaErrorInvalidArgument,
        ),
        _ => (
            "UNKNOWN",
            "a format-one code this service does not know",
            S::PsaErrorGenericError,
        ),
    }
}

fn version_one(number: u32) -> Entry {
    match number {
        0x00 => (
            "INITIALIZE",
            "the TPM has not been started (TPM2_Startup not sent)",
            S::PsaErrorHardwareFailure,
        ),
        0x01 => (
            "FAILURE",
            "commands are not being accepted because of a TPM failure",
            S::PsaErrorHardwareFailure,
        ),
        0x03 => (
            "SEQUENCE",
            "an improper use of a sequence handle",
            S::PsaErrorBadState,
        ),
        0x0B => ("PRIVATE", "not currently used", S::PsaErrorGenericError),
        0x19 => ("HMAC", "not currently used", S::PsaErrorGenericError),
        0x20 => (
            "DISABLED",
            "the command is disabled",
            S::PsaErrorNotPermitted,
        ),
        0x21 => (
            "EXCLUSIVE",
            "the command failed because audit sequence required exclusivity",
            S::PsaErrorBadState,
        ),
        0x24 => (
            "AUTH_TYPE",
            "an authorization handle is not correct for the command",
            S::PsaErrorNotPermitted,
        ),
        0x25 => (
            "AUTH_MISSING",
            "the command requires an authorization session for a handle and it is not present",
            S::PsaErrorNotPermitted,
        ),
        0x26 => (
            "POLICY",
            "the policy failure in math operation or an invalid authPolicy value",
            S::PsaErrorNotPermitted,
        ),
        0x27 => ("PCR", "the PCR check failed", S::PsaErrorNotPermitted),
        0x28 => (
            "PCR_CHANGED",
            "the PCRs have changed since the policy was evaluated",
            S::PsaErrorNotPermitted,
        ),
        0x2D => (
            "UPGRADE",
            "the TPM is in field upgrade mode",
            S::PsaErrorHardwareFailure,
        ),
        0x2E => (
            "TOO_MANY_CONTEXTS",
            "the context ID counter is at its maximum",
            S::PsaErrorInsufficientMemory,
        ),
        0x2F => (
            "AUTH_UNAVAILABLE",
            "the authValue or authPolicy is not available for the selected entity",
            S::PsaErrorNotPermitted,
        ),
        0x30 => (
            "REBOOT",
            "a _TPM_Init and Startup(CLEAR) is required before the TPM can resume operation",
            S::PsaErrorHardwareFailure,
        ),
        0x31 => (
            "UNBALANCED",
            "the protection algorithms (hash and symmetric) are not reasonably balanced",
            S::PsaErrorNotSupported,
        ),
        0x42 => (
            "COMMAND_SIZE",
            "the command size value is inconsistent with the contents",
            S::PsaErrorInvalidArgument,
        ),
        0x43 => (
            "COMMAND_CODE",
            "the command code is not supported by this TPM",
            S::PsaErrorNotSupported,
        ),
        0x44 => (
            "AUTHSIZE",
            "the authorization size is out of range",
            S::PsaErrorInvalidArgument,
        ),
        0x45 => (
            "AUTH_CONTEXT",
            "the command cannot have an authorization session",
            S::PsaErrorInvalidArgument,
        ),
        0x46 => (
            "NV_RANGE",
            "the NV offset and size are out of range",
            S::PsaErrorInvalidArgument,
        ),
        0x47 => (
            "NV_SIZE",
            "the requested NV allocation size is larger than allowed",
            S::PsaErrorInsufficientStorage,
        ),
        0x48 => (
            "NV_LOCKED",
            "the NV index is locked",
            S::PsaErrorNotPermitted,
        ),
        0x49 => (
            "NV_AUTHORIZATION",
            "NV access authorization failed",
            S::PsaErrorNotPermitted,
        ),
        0x4A => (
            "NV_UNINITIALIZED",
            "an NV index is used before being initialized",
            S::PsaErrorBadState,
        ),
        0x4B => (
            "NV_SPACE",
            "insufficient space for NV allocation",
            S::PsaErrorInsufficientStorage,
        ),
        0x4C => (
            "NV_DEFINED",
            "the NV index or persistent object is already defined",
            S::PsaErrorAlreadyExists,
        ),
        0x50 => (
            "BAD_CONTEXT",
            "the context in TPM2_ContextLoad is not valid",
            S::PsaErrorCorruptionDetected,
        ),
        0x51 => (
            "CPHASH",
            "cpHash value already set or not correct for use",
            S::PsaErrorNotPermitted,
        ),
        0x52 => (
            "PARENT",
            "the handle for the parent is not a valid parent",
            S::PsaErrorInvalidArgument,
        ),
        0x53 => (
            "NEEDS_TEST",
            "some function needs testing",
            S::PsaErrorHardwareFailure,
        ),
        0x54 => (
            "NO_RESULT",
            "an internal function cannot process a request due to an unspecified problem",
            S::PsaErrorInvalidArgument,
        ),
        0x55 => (
            "SENSITIVE",
            "the sensitive area did not unmarshal correctly after decryption",
            S::PsaErrorInvalidArgument,
        ),
        _ => (
            "UNKNOWN",
            "a version-1 code this service does not know",
            S::PsaErrorGenericError,
        ),
    }
}

fn warning(number: u32) -> Entry {
    match number {
        0x01 => ("CONTEXT_GAP", "the gap for context IDs is too large", S::PsaErrorInsufficientMemory),
        0x02 => ("OBJECT_MEMORY", "out of memory for object contexts", S::PsaErrorInsufficientMemory),
        0x03 => ("SESSION_MEMORY", "out of memory for session contexts", S::PsaErrorInsufficientMemory),
        0x04 => ("MEMORY", "out of shared object/session memory or need space for internal operations", S::PsaErrorInsufficientMemory),
        0x05 => ("SESSION_HANDLES", "out of session handles", S::PsaErrorInsufficientMemory),
        0x06 => ("OBJECT_HANDLES", "out of object handles", S::PsaErrorInsufficientMemory),
        0x07 => ("LOCALITY", "bad locality", S::PsaErrorNotPermitted),
        0x08 => ("YIELDED", "the TPM has suspended operation on the command", S::PsaErrorHardwareFailure),
        0x09 => ("CANCELED", "the command was canceled", S::PsaErrorHardwareFailure),
        0x0A => ("TESTING", "the TPM is performing self-tests", S::PsaErrorHardwareFailure),
        0x10..=0x16 => ("REFERENCE_H", "a handle refers to a transient object that is not loaded", S::PsaErrorGenericError),
        0x18..=0x1E => ("REFERENCE_S", "a session handle refers to a session that is not loaded", S::PsaErrorGenericError),
        0x20 => ("NV_RATE", "the TPM is rate-limiting accesses to prevent wearout of NV", S::PsaErrorHardwareFailure),
        0x21 => ("LOCKOUT", "authorizations for objects subject to dictionary-attack protection are not allowed: the TPM is in lockout mode", S::PsaErrorNotPermitted),
        0x22 => ("RETRY", "the TPM was not able to start the command", S::PsaErrorHardwareFailure),
        0x23 => ("NV_UNAVAILABLE", "the command may require writing of NV and NV is not accessible", S::PsaErrorHardwareFailure),
        _ => ("UNKNOWN", "a warning this service does not know", S::PsaErrorGenericError),
    }
}

fn tss_base(code: u32) -> Entry {
    match code {
        1 => (
            "GENERAL_FAILURE",
            "a catch-all failure in the TSS",
            S::PsaErrorGenericError,
        ),
        2 => (
            "NOT_IMPLEMENTED",
            "the TSS does not implement this",
            S::PsaErrorNotSupported,
        ),
        3 => (
            "BAD_CONTEXT",
            "a context structure is bad",
            S::PsaErrorGenericError,
        ),
        4 => (
            "ABI_MISMATCH",
            "the TSS library versions do not match",
            S::PsaErrorGenericError,
        ),
        5 => (
            "BAD_REFERENCE",
            "a pointer is NULL that is not allowed to be",
            S::PsaErrorGenericError,
        ),
        6 => (
            "INSUFFICIENT_BUFFER",
            "a buffer is not large enough",
            S::PsaErrorInvalidArgument,
        ),
        7 => (
            "BAD_SEQUENCE",
            "function called in the wrong order",
            S::PsaErrorBadState,
        ),
        8 => (
            "NO_CONNECTION",
            "no connection to the TPM (device or simulator)",
            S::PsaErrorCommunicationFailure,
        ),
        9 => (
            "TRY_AGAIN",
            "the operation timed out; try again",
            S::PsaErrorCommunicationFailure,
        ),
        10 => (
            "IO_ERROR",
            "input/output to the TPM failed",
            S::PsaErrorCommunicationFailure,
        ),
        11 => (
            "BAD_VALUE",
            "a parameter has a bad value",
            S::PsaErrorInvalidArgument,
        ),
        12 => (
            "NOT_PERMITTED",
            "the operation is not permitted",
            S::PsaErrorNotPermitted,
        ),
        13 => (
            "INVALID_SESSIONS",
            "the session structures are invalid or the number of sessions is wrong",
            S::PsaErrorGenericError,
        ),
        14 => (
            "NO_DECRYPT_PARAM",
            "a decrypt session is present but the command has no parameter to decrypt",
            S::PsaErrorGenericError,
        ),
        15 => (
            "NO_ENCRYPT_PARAM",
            "an encrypt session is present but the command has no parameter to encrypt",
            S::PsaErrorGenericError,
        ),
        16 => (
            "BAD_SIZE",
            "a size parameter is bad",
            S::PsaErrorInvalidArgument,
        ),
        17 => (
            "MALFORMED_RESPONSE",
            "the TPM's response is malformed",
            S::PsaErrorCommunicationFailure,
        ),
        18 => (
            "INSUFFICIENT_CONTEXT",
            "the context is too small",
            S::PsaErrorGenericError,
        ),
        19 => (
            "INSUFFICIENT_RESPONSE",
            "the TPM's response is too short",
            S::PsaErrorCommunicationFailure,
        ),
        20 => (
            "INCOMPATIBLE_TCTI",
            "the TCTI is of the wrong kind or version",
            S::PsaErrorCommunicationFailure,
        ),
        21 => (
            "NOT_SUPPORTED",
            "the operation is not supported",
            S::PsaErrorNotSupported,
        ),
        22 => (
            "BAD_TCTI_STRUCTURE",
            "the TCTI structure is not valid",
            S::PsaErrorCommunicationFailure,
        ),
        23 => (
            "MEMORY",
            "the TSS could not allocate memory",
            S::PsaErrorInsufficientMemory,
        ),
        24 => (
            "BAD_TR",
            "an ESYS_TR handle is invalid",
            S::PsaErrorGenericError,
        ),
        25 => (
            "MULTIPLE_DECRYPT_SESSIONS",
            "more than one session with decrypt set",
            S::PsaErrorGenericError,
        ),
        26 => (
            "MULTIPLE_ENCRYPT_SESSIONS",
            "more than one session with encrypt set",
            S::PsaErrorGenericError,
        ),
        27 => (
            "RSP_AUTH_FAILED",
            "the TPM's response HMAC did not verify",
            S::PsaErrorCommunicationFailure,
        ),
        _ => (
            "UNKNOWN",
            "a TSS code this service does not know",
            S::PsaErrorGenericError,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_one_with_parameter() {
        // TPM_RC_SIGNATURE on parameter 2: 0x080 | 0x040 | (2 << 8) | 0x1B.
        let d = decode(0x2db);
        assert_eq!(d.name, "SIGNATURE");
        assert_eq!(d.subject, "parameter 2");
        assert_eq!(d.status, S::PsaErrorInvalidSignature);
        assert!(d
            .describe()
            .starts_with("TPM_RC_SIGNATURE (0x2db, TPM layer, format one, parameter 2)"));
    }

    #[test]
    fn format_one_with_handle_and_session() {
        assert_eq!(decode(0x18b).subject, "handle 1");
        assert_eq!(decode(0x18b).name, "HANDLE");
        // TPM_RC_BAD_AUTH on session 1: 0x080 | (0x9 << 8) | 0x22.
        let d = decode(0x9a2);
        assert_eq!((d.name, d.subject.as_str()), ("BAD_AUTH", "session 1"));
        assert_eq!(d.status, S::PsaErrorNotPermitted);
    }

    #[test]
    fn format_zero_errors_and_warnings() {
        assert_eq!(decode(0x100).name, "INITIALIZE");
        assert_eq!(decode(0x101).name, "FAILURE");
        assert_eq!(decode(0x14b).status, S::PsaErrorInsufficientStorage);
        let lockout = decode(0x921);
        assert_eq!(lockout.name, "LOCKOUT");
        assert_eq!(lockout.format, "format zero, warning");
        assert_eq!(decode(0x902).status, S::PsaErrorInsufficientMemory);
    }

    #[test]
    fn tss_layers() {
        let d = decode(0xa000a);
        assert_eq!((d.layer, d.name), ("TCTI", "IO_ERROR"));
        assert_eq!(d.status, S::PsaErrorCommunicationFailure);
        assert!(d
            .describe()
            .starts_with("TSS2_BASE_RC_IO_ERROR (0xa000a, TCTI layer"));
        assert_eq!(decode(0x7000b).layer, "ESAPI");
        // A resource manager passing on a TPM code decodes it as the TPM's.
        assert_eq!(decode(0xc0921).name, "LOCKOUT");
    }
}
