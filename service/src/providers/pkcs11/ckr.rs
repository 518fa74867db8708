//! PKCS#11 return values (CKR_*), decoded for the operator and mapped to PSA statuses.
//!
//! Every failed Cryptoki call becomes one [`OpError`] whose cause names the function, the
//! CKR_* code, what it means and the token, and whose hint says what to do. The status is the
//! most precise PSA one: a wrong PIN is NotPermitted, a removed token CommunicationFailure, a
//! bad signature InvalidSignature — never a blanket CommunicationFailure.

use crate::error::OpError;
use cryptoki::error::{Error, RvError};
use parsec_interface::requests::ResponseStatus as S;

/// `PinIncorrect` -> `CKR_PIN_INCORRECT`: cryptoki's variant names are the CKR names in
/// camel case.
pub fn name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    let mut out = String::from("CKR_");
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// The first sentence of the standard's description.
fn meaning(rv: RvError) -> String {
    let text = rv.to_string();
    match text.find(". ") {
        Some(end) => text[..end].to_string(),
        None => text.trim_end_matches('.').to_string(),
    }
}

/// Whether the code means the token (or the session on it) is gone, so that the provider
/// should open the library and find the token again. A login lost (CKR_USER_NOT_LOGGED_IN)
/// is not: the session is there, and a new one logged in again cures it (or, with no
/// user_pin, nothing does).
pub fn token_lost(err: &Error) -> bool {
    matches!(
        err,
        Error::Pkcs11(
            RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SlotIdInvalid
                | RvError::CryptokiNotInitialized
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid,
            _
        )
    )
}

/// The status and hint for a code.
fn classify(rv: RvError) -> (S, &'static str) {
    use RvError as R;
    match rv {
        R::PinIncorrect => (S::PsaErrorNotPermitted, "wrong user PIN: check user_pin (several wrong PINs lock the token)"),
        R::PinLocked => (S::PsaErrorNotPermitted, "the user PIN is locked after too many wrong tries: unlock it with the SO PIN"),
        R::PinExpired | R::PinInvalid | R::PinLenRange | R::PinTooWeak => (S::PsaErrorNotPermitted, "the user PIN is not usable as given: check user_pin"),
        R::UserPinNotInitialized => (S::PsaErrorNotPermitted, "the token has no user PIN yet: initialise it (softhsm2-util --init-token, pkcs11-tool --init-pin)"),
        R::UserNotLoggedIn => (S::PsaErrorNotPermitted, "the token wants a login for this (private keys, creating keys): set user_pin"),
        R::TokenNotPresent | R::DeviceRemoved | R::TokenNotRecognized => (S::PsaErrorCommunicationFailure, "the token is not in its slot: insert it; the service finds it again by itself"),
        R::SessionHandleInvalid | R::SessionClosed => (S::PsaErrorCommunicationFailure, "the token's session was closed (the token was removed or reset): the service reopens it"),
        R::SlotIdInvalid => (S::PsaErrorCommunicationFailure, "the slot is gone: check slot_number, or select the token by serial_number or token_label"),
        R::DeviceError => (S::PsaErrorHardwareFailure, "the token reported a device error: check it (and dmesg)"),
        R::DeviceMemory => (S::PsaErrorInsufficientStorage, "the token is full: destroy keys that are no longer needed"),
        R::HostMemory => (S::PsaErrorInsufficientMemory, "the PKCS#11 module ran out of memory"),
        R::TemplateInconsistent | R::TemplateIncomplete | R::AttributeValueInvalid | R::AttributeTypeInvalid | R::AttributeReadOnly => (S::PsaErrorInvalidArgument, "the token refuses an attribute of the key's template: see the attribute named in the cause, and the token's documentation"),
        R::AttributeSensitive | R::KeyUnextractable => (S::PsaErrorNotPermitted, "the key is sensitive or not extractable on the token: it cannot be exported"),
        R::MechanismInvalid | R::FunctionNotSupported | R::CurveNotSupported | R::DomainParamsInvalid => (S::PsaErrorNotSupported, "the token does not implement this algorithm, curve or function (pkcs11-tool --list-mechanisms)"),
        R::MechanismParamInvalid => (S::PsaErrorNotSupported, "the token refuses the algorithm's parameters (hash, MGF, salt or label)"),
        R::KeySizeRange => (S::PsaErrorNotSupported, "the token does not support keys of this size"),
        R::KeyTypeInconsistent | R::KeyFunctionNotPermitted => (S::PsaErrorNotPermitted, "the key on the token does not allow this use (its CKA_SIGN / CKA_DECRYPT / ... attributes)"),
        R::KeyHandleInvalid | R::ObjectHandleInvalid => (S::PsaErrorStorageFailure, "the key's object is no longer on the token"),
        R::SignatureInvalid | R::SignatureLenRange => (S::PsaErrorInvalidSignature, "the signature does not match the hash and the key"),
        R::EncryptedDataInvalid | R::EncryptedDataLenRange => (S::PsaErrorInvalidPadding, "the ciphertext was not made with this key and algorithm"),
        R::DataInvalid | R::DataLenRange | R::ArgumentsBad => (S::PsaErrorInvalidArgument, "the input does not fit the key or the algorithm (its length, mostly)"),
        R::BufferTooSmall => (S::PsaErrorBufferTooSmall, "the output buffer is too small"),
        R::TokenWriteProtected | R::SessionReadOnly => (S::PsaErrorNotPermitted, "the token is write-protected: keys cannot be created or destroyed on it"),
        R::RandomNoRng => (S::PsaErrorInsufficientEntropy, "the token has no random number generator"),
        R::FipsSelfTestFailed => (S::PsaErrorHardwareFailure, "the token failed its self-test"),
        R::ActionProhibited | R::FunctionRejected => (S::PsaErrorNotPermitted, "the token's policy forbids this"),
        R::PublicKeyInvalid => (S::PsaErrorInvalidArgument, "the public key is not valid"),
        R::SessionCount => (S::PsaErrorInsufficientMemory, "the token has no more sessions"),
        R::GeneralError | R::FunctionFailed => (S::PsaErrorGenericError, "the module gives no reason in its return value: its stderr, if it printed one, follows as \"stderr meanwhile\"; raise its own log level for more (tpm2-pkcs11: TPM2_PKCS11_LOG_LEVEL=2, SoftHSM2: log.level in softhsm2.conf)"),
        R::OperationActive => (S::PsaErrorBadState, "the module kept an earlier operation open on the session (tpm2-pkcs11 does after a failed C_Decrypt): the service opens a new session and tries once more"),
        _ => (S::PsaErrorGenericError, "see the PKCS#11 specification for this return value"),
    }
}

/// A failed Cryptoki call as an error for the client and the log.
pub fn error(operation: &str, token: &str, err: Error) -> OpError {
    match err {
        Error::Pkcs11(rv, function) => {
            let function = format!("{function}").replace("Function::", "C_");
            let (mut status, mut hint) = classify(rv);
            // Refused when an operation starts: the token does not take the mechanism with
            // these parameters (SoftHSM 2.6 answers OAEP with SHA-256 so).
            if function.ends_with("Init") && matches!(rv, RvError::ArgumentsBad) {
                status = S::PsaErrorNotSupported;
                hint = "the token refuses the algorithm with these parameters (hash, MGF, salt or label): see its documentation; SoftHSM 2.6 does OAEP with SHA-1 only";
            }
            OpError::new(
                status,
                format!(
                    "{operation}: {function} on {token}: {} ({})",
                    name(rv),
                    meaning(rv)
                ),
                hint,
            )
        }
        Error::LibraryLoading(e) => OpError::new(
            S::PsaErrorCommunicationFailure,
            format!("{operation}: loading the PKCS#11 module: {e}"),
            "check library_path",
        ),
        Error::NotSupported => OpError::new(
            S::PsaErrorNotSupported,
            format!("{operation}: the PKCS#11 module lacks a function it needs"),
            "the module implements an older Cryptoki interface",
        ),
        other => OpError::new(
            S::PsaErrorGenericError,
            format!("{operation} on {token}: {other}"),
            "a value from the token could not be read",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    #[test]
    fn names_are_the_standards() {
        assert_eq!(name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
        assert_eq!(name(RvError::SlotIdInvalid), "CKR_SLOT_ID_INVALID");
        assert_eq!(
            name(RvError::TemplateInconsistent),
            "CKR_TEMPLATE_INCONSISTENT"
        );
        assert_eq!(name(RvError::UserNotLoggedIn), "CKR_USER_NOT_LOGGED_IN");
    }

    #[test]
    fn statuses_are_precise() {
        let e = error(
            "login",
            "token \"t\"",
            Error::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert_eq!(e.status, S::PsaErrorNotPermitted);
        assert!(e.cause.contains("CKR_PIN_INCORRECT"), "{}", e.cause);
        assert!(e.cause.contains("token \"t\""), "{}", e.cause);
        assert!(e.hint.contains("user_pin"));
        let e = error(
            "sign",
            "t",
            Error::Pkcs11(RvError::TokenNotPresent, Function::Sign),
        );
        assert_eq!(e.status, S::PsaErrorCommunicationFailure);
        let e = error(
            "verify",
            "t",
            Error::Pkcs11(RvError::SignatureInvalid, Function::Verify),
        );
        assert_eq!(e.status, S::PsaErrorInvalidSignature);
        assert!(token_lost(&Error::Pkcs11(
            RvError::SessionHandleInvalid,
            Function::Sign
        )));
        let e = error(
            "encrypt",
            "t",
            Error::Pkcs11(RvError::ArgumentsBad, Function::EncryptInit),
        );
        assert_eq!(e.status, S::PsaErrorNotSupported);
        assert!(e.cause.contains("C_EncryptInit"), "{}", e.cause);
        assert!(!token_lost(&Error::Pkcs11(
            RvError::PinIncorrect,
            Function::Login
        )));
    }
}
