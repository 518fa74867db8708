//! CanDoCrypto's rules common to every provider, as upstream Parsec 1.5.0 applies them before
//! a provider's own table (`capabilities.rs` of each provider): a use check needs a permitted
//! algorithm and a usage flag that uses it, and the algorithm must fit the key type; a
//! generate or import check that names an algorithm is a use check too. Every "no" here is
//! PsaErrorNotSupported (the question was "can you?", not "may I?").

use crate::error::OpError;
use parsec_interface::operations::can_do_crypto::CheckType;
use parsec_interface::operations::psa_algorithm::Algorithm;
use parsec_interface::operations::psa_key_attributes::Attributes;
use parsec_interface::requests::ResponseStatus;

fn no(cause: String, hint: &'static str) -> OpError {
    OpError::new(ResponseStatus::PsaErrorNotSupported, cause, hint)
}

pub fn common_rules(check_type: CheckType, attributes: &Attributes) -> Result<(), OpError> {
    let alg = attributes.policy.permitted_algorithms;
    let is_use = match check_type {
        CheckType::Use => true,
        CheckType::Generate | CheckType::Import => alg != Algorithm::None,
        CheckType::Derive => false,
    };
    if !is_use {
        return Ok(());
    }
    if alg == Algorithm::None {
        return Err(no(
            "a use check without a permitted algorithm".into(),
            "set policy.permitted_algorithms to the algorithm the key is for",
        ));
    }
    let flags = attributes.policy.usage_flags;
    if !(flags.decrypt()
        || flags.encrypt()
        || flags.sign_hash()
        || flags.sign_message()
        || flags.verify_hash()
        || flags.verify_message())
    {
        return Err(no(
            format!("a check of {alg:?} without a usage flag that uses it"),
            "set the usage flags the key is for (sign, verify, encrypt, decrypt)",
        ));
    }
    attributes.compatible_with_alg(alg).map_err(|_| {
        no(
            format!("{alg:?} does not fit a {:?}", attributes.key_type),
            "choose an algorithm for this key type",
        )
    })
}
