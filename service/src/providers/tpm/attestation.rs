//! Key attestation with TPM2_ActivateCredential, as upstream Parsec does it.
//!
//! A verifier wants proof that a key lives in this very TPM. PrepareKeyAttestation gives it
//! the key's TPM name (a hash of its public area), the public area itself (so the verifier
//! can check the name) and the public key of the endorsement key (EK, RSA 2048, from the
//! TCG default template; the verifier should check it against the EK certificate). The
//! verifier runs MakeCredential with those: a secret sealed to the EK and bound to the
//! key's name. AttestKey asks the TPM to ActivateCredential: the TPM only releases the
//! secret if it holds the EK's private key and the named key is loaded in it. The
//! `tpm-credential` crate of this workspace does MakeCredential in Rust, without a TPM.

use super::{bad_input_failure, keys, tpm_error, Connection};
use crate::config::TpmSettings;
use crate::error::OpError;
use crate::providers::der;
use crate::providers::AppKeys;
use parsec_interface::operations::{attest_key, prepare_key_attestation, NativeResult};
use parsec_interface::requests::ResponseStatus;
use tss_esapi::abstraction::{ek, AsymmetricAlgorithmSelection};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{Auth, EncryptedSecret, IdObject, Public, SymmetricDefinition};
use tss_esapi::traits::Marshall;
use zeroize::Zeroizing;

fn only_the_ek() -> OpError {
    OpError::new(
        ResponseStatus::PsaErrorNotSupported,
        "an attesting key other than the endorsement key was named",
        "leave attesting_key_name empty: this provider attests with the TPM's endorsement key",
    )
}

/// The EK (the TPM derives the same key from its endorsement seed every time), loaded, with
/// its public area. The first call creates it in the endorsement hierarchy and saves its
/// context; later calls load that context, skipping the RSA key derivation. The caller
/// flushes the handle when done.
fn load_ek(conn: &mut Connection, settings: &TpmSettings) -> Result<(KeyHandle, Public), OpError> {
    if let Some((saved, public)) = conn.ek.clone() {
        match conn.ctx.context_load(saved) {
            Ok(handle) => return Ok((KeyHandle::from(handle), public)),
            // After a TPM reset a saved context is void: make the EK again.
            Err(e) => {
                log::info!(
                    "tpm: the saved endorsement key context did not load ({}); creating it again",
                    tpm_error("TPM2_ContextLoad", e)
                );
                conn.ek = None;
            }
        }
    }
    let handle = create_ek(conn, settings)?;
    let public = conn.call_plain("TPM2_ReadPublic (endorsement key)", |ctx| {
        ctx.read_public(handle)
    });
    let public = match public {
        Ok((public, _, _)) => public,
        Err(e) => {
            flush(conn, handle.into(), "endorsement key");
            return Err(e);
        }
    };
    match conn.ctx.context_save(handle.into()) {
        Ok(saved) => conn.ek = Some((saved, public.clone())),
        Err(e) => log::warn!(
            "tpm: cannot save the endorsement key's context ({}): it will be created for each attestation",
            tpm_error("TPM2_ContextSave", e)
        ),
    }
    Ok((handle, public))
}

fn create_ek(conn: &mut Connection, settings: &TpmSettings) -> Result<KeyHandle, OpError> {
    let auth = Auth::try_from(settings.endorsement_hierarchy_auth.bytes().to_vec())
        .map_err(|e| keys::tss_wrapper("endorsement_hierarchy_auth", e))?;
    conn.ctx
        .tr_set_auth(ObjectHandle::Endorsement, auth)
        .map_err(|e| tpm_error("setting the endorsement authorisation", e))?;
    conn.call("TPM2_CreatePrimary (endorsement key)", |ctx| {
        ek::create_ek_object_2(ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048), None)
    })
    .map_err(|mut e| {
        e.hint = "the endorsement key could not be created: check endorsement_hierarchy_auth and that the endorsement hierarchy is enabled";
        e
    })
}

fn flush(conn: &mut Connection, handle: ObjectHandle, what: &str) {
    if let Err(e) = conn.ctx.flush_context(handle) {
        log::warn!(
            "tpm: flushing the {what}: {}",
            tpm_error("TPM2_FlushContext", e)
        );
    }
}

pub(super) fn prepare(
    conn: &mut Connection,
    settings: &TpmSettings,
    keys: &mut AppKeys<'_>,
    op: &prepare_key_attestation::Operation,
) -> Result<NativeResult, OpError> {
    let prepare_key_attestation::Operation::ActivateCredential {
        attested_key_name,
        attesting_key_name,
    } = op
    else {
        return Err(OpError::status(ResponseStatus::PsaErrorNotSupported));
    };
    if attesting_key_name.is_some() {
        return Err(only_the_ek());
    }
    let entry = keys.get(attested_key_name)?;
    let (blob, attributes) = (entry.key_id.clone(), entry.attributes);
    let (handle, _) = conn.load(&blob, &attributes)?;
    let (public, name, _) = conn.call_plain("TPM2_ReadPublic", |ctx| ctx.read_public(handle))?;
    let public = public
        .marshall()
        .map_err(|e| keys::tss_wrapper("marshalling the public area", e))?;

    // Only the public area is needed: from the cache when the EK was made before.
    let ek_public = match conn.ek.as_ref() {
        Some((_, public)) => public.clone(),
        None => {
            let (ek_handle, public) = load_ek(conn, settings)?;
            flush(conn, ek_handle.into(), "endorsement key");
            public
        }
    };
    let Public::Rsa {
        unique, parameters, ..
    } = ek_public
    else {
        return Err(OpError::status(ResponseStatus::PsaErrorGenericError));
    };
    let exponent = match parameters.exponent().value() {
        0 => 65537,
        e => e,
    };
    Ok(NativeResult::PrepareKeyAttestation(
        prepare_key_attestation::Result::ActivateCredential {
            name: Zeroizing::new(name.value().to_vec()),
            public: Zeroizing::new(public),
            attesting_key_pub: Zeroizing::new(der::rsa_public(unique.value(), exponent)),
        },
    ))
}

pub(super) fn attest(
    conn: &mut Connection,
    settings: &TpmSettings,
    keys: &mut AppKeys<'_>,
    op: &attest_key::Operation,
) -> Result<NativeResult, OpError> {
    let attest_key::Operation::ActivateCredential {
        attested_key_name,
        credential_blob,
        secret,
        attesting_key_name,
    } = op
    else {
        return Err(OpError::status(ResponseStatus::PsaErrorNotSupported));
    };
    if attesting_key_name.is_some() {
        return Err(only_the_ek());
    }
    let bad = |what: &str| {
        OpError::new(
            ResponseStatus::PsaErrorInvalidArgument,
            format!("the {what} does not fit the TPM's structure"),
            "pass the credential blob (TPM2B_ID_OBJECT contents) and secret (TPM2B_ENCRYPTED_SECRET contents) that MakeCredential produced",
        )
    };
    let credential_blob =
        IdObject::try_from(credential_blob.to_vec()).map_err(|_| bad("credential blob"))?;
    let secret = EncryptedSecret::try_from(secret.to_vec()).map_err(|_| bad("secret"))?;
    let entry = keys.get(attested_key_name)?;
    let (blob, attributes) = (entry.key_id.clone(), entry.attributes);
    let (handle, _) = conn.load(&blob, &attributes)?;
    let (ek_handle, _) = load_ek(conn, settings)?;

    let policy = conn.call_plain("TPM2_StartAuthSession (policy)", |ctx| {
        ctx.start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
    });
    let policy = match policy {
        Ok(Some(session)) => session,
        Ok(None) | Err(_) => {
            flush(conn, ek_handle.into(), "endorsement key");
            return Err(policy
                .err()
                .unwrap_or_else(|| OpError::status(ResponseStatus::PsaErrorGenericError)));
        }
    };
    let result = activate(conn, handle, ek_handle, policy, credential_blob, secret);
    flush(conn, ek_handle.into(), "endorsement key");
    flush(conn, SessionHandle::from(policy).into(), "policy session");
    let credential = result.map_err(|e| {
        bad_input_failure(
            conn,
            e,
            ResponseStatus::PsaErrorInvalidArgument,
            "the credential was not made for this key and this TPM's endorsement key, or was altered",
        )
    })?;
    Ok(NativeResult::AttestKey(
        attest_key::Result::ActivateCredential {
            credential: Zeroizing::new(credential),
        },
    ))
}

fn activate(
    conn: &mut Connection,
    handle: KeyHandle,
    ek_handle: KeyHandle,
    policy: AuthSession,
    credential_blob: IdObject,
    secret: EncryptedSecret,
) -> Result<Vec<u8>, OpError> {
    let policy_session =
        PolicySession::try_from(policy).map_err(|e| tpm_error("the policy session", e))?;
    // The EK's policy: PolicySecret with the endorsement hierarchy's authorisation.
    conn.call("TPM2_PolicySecret", |ctx| {
        ctx.policy_secret(
            policy_session,
            AuthHandle::Endorsement,
            Default::default(),
            Default::default(),
            Default::default(),
            None,
        )
    })?;
    let session = conn.session;
    let credential = conn
        .ctx
        .execute_with_sessions((Some(session), Some(policy), None), |ctx| {
            ctx.activate_credential(handle, ek_handle, credential_blob, secret)
        })
        .map_err(|e| tpm_error("TPM2_ActivateCredential", e))?;
    Ok(credential.value().to_vec())
}
