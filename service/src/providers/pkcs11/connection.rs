//! The open token: the module loaded, the token found by its selector, a logged-in session, the objects of each key looked up by CKA_ID.

use super::*;

/// The objects of one key on the token.
#[derive(Clone, Copy)]
pub(super) struct Objects {
    pub(super) private: Option<ObjectHandle>,
    pub(super) public: Option<ObjectHandle>,
}

/// The module loaded, the token found, a logged-in session.
pub(super) struct Connection {
    /// Kept so that the module stays initialised while the session lives.
    pub(super) _pkcs11: Pkcs11,
    pub(super) slot: Slot,
    pub(super) session: Session,
    /// What the token says it can do (C_GetMechanismInfo), read when it is opened.
    pub(super) caps: TokenCaps,
    /// Whether the session was logged in as the user (a user_pin is set).
    pub(super) logged_in: bool,
    /// For log lines: `token "label" (serial ..., slot N)`.
    pub(super) token: String,
    pub(super) objects: HashMap<Vec<u8>, Objects>,
    pub(super) broken: bool,
}

impl Link for Connection {
    fn broken(&self) -> bool {
        self.broken
    }
}

pub(super) fn token_line(label: &str, serial: &str, slot: Slot) -> String {
    format!(
        "token \"{}\" (serial {}, slot {})",
        label.trim(),
        serial.trim(),
        slot.id()
    )
}

/// A read-write session on the token, logged in as the user when a PIN is set. A wrong or
/// locked PIN fails here, with what the token says of its retry counter.
fn open_session(
    pkcs11: &Pkcs11,
    slot: Slot,
    settings: &Pkcs11Settings,
    token: &str,
) -> Result<Session, String> {
    let session = pkcs11
        .open_rw_session(slot)
        .map_err(|e| format!("{}", ckr::error("opening a session", token, e)))?;
    if settings.user_pin.bytes().is_empty() {
        return Ok(session);
    }
    let pin = String::from_utf8_lossy(settings.user_pin.bytes()).to_string();
    match session.login(UserType::User, Some(&Secret::new(pin))) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {
            Ok(session)
        }
        Err(e) => {
            let mut line = format!("{}", ckr::error("logging in", token, e));
            if let Some(state) = module::pin_state(pkcs11, slot) {
                line.push_str("; ");
                line.push_str(state);
            }
            Err(line)
        }
    }
}

impl Connection {
    pub(super) fn open(settings: &Pkcs11Settings) -> Result<Connection, String> {
        let pkcs11 = module::load(settings)?;
        let (slot, token) = module::select(&pkcs11, settings)?;
        let caps = TokenCaps::read(&pkcs11, slot);
        let session = open_session(&pkcs11, slot, settings, &token)?;
        Ok(Connection {
            _pkcs11: pkcs11,
            slot,
            session,
            token,
            caps,
            logged_in: !settings.user_pin.bytes().is_empty(),
            objects: HashMap::new(),
            broken: false,
        })
    }

    /// Logs out, closes the session and opens a new one, logged in again: what frees the
    /// objects a module keeps loaded for a login (tpm2-pkcs11 keeps each key it used in one
    /// of the TPM's few object slots until C_Logout), without reloading the module.
    pub(super) fn renew_session(&mut self, settings: &Pkcs11Settings) -> Result<(), OpError> {
        // The login belongs to the application, not the session: logged out first, or the
        // new session would share the old login state (and tpm2-pkcs11 its loaded objects).
        if self.logged_in {
            let _ = self.session.logout();
        }
        let fresh = open_session(&self._pkcs11, self.slot, settings, &self.token).map_err(|e| {
            OpError::new(
                ResponseStatus::PsaErrorCommunicationFailure,
                e,
                "the token refused a new session: see the module's documentation",
            )
        })?;
        // The old session closes when it is dropped here; handles of token objects are
        // kept by most modules across sessions, but not by all: found again.
        self.session = fresh;
        self.objects.clear();
        Ok(())
    }

    /// Decodes a failed call, and notes when the token is gone.
    pub(super) fn fail(&mut self, operation: &str, err: cryptoki::error::Error) -> OpError {
        if ckr::token_lost(&err) {
            self.broken = true;
        }
        ckr::error(operation, &self.token, err)
    }

    /// The objects of a key, found on the token once and then remembered.
    pub(super) fn objects(&mut self, key_id: &[u8]) -> Result<Objects, OpError> {
        if let Some(objects) = self.objects.get(key_id) {
            return Ok(*objects);
        }
        let key = KeyRef::decode(key_id)?;
        let mut found = Objects {
            private: None,
            public: None,
        };
        // A secret (AES) key is one object, kept where a key pair keeps its private one.
        for class in [
            ObjectClass::PRIVATE_KEY,
            ObjectClass::PUBLIC_KEY,
            ObjectClass::SECRET_KEY,
        ] {
            let handles = self
                .session
                .find_objects(&key.template(class))
                .map_err(|e| self.fail("finding the key", e))?;
            if handles.len() > 1 {
                // Using the first would be a guess, possibly at another application's key.
                return Err(OpError::new(
                    ResponseStatus::PsaErrorStorageFailure,
                    format!(
                        "{} {} objects on {} match this key's CKA_ID/label {:?}: ambiguous",
                        handles.len(),
                        match class {
                            ObjectClass::PRIVATE_KEY => "private key",
                            ObjectClass::PUBLIC_KEY => "public key",
                            _ => "secret key",
                        },
                        self.token,
                        key.label.as_deref().unwrap_or("-")
                    ),
                    "give the key a CKA_ID (and label) that only it has on the token, e.g. in [[provider.existing_keys]] name both id and label",
                ));
            }
            let first = handles.first().copied();
            match class {
                ObjectClass::PUBLIC_KEY => found.public = first,
                _ => found.private = found.private.or(first),
            }
        }
        if found.private.is_none() && found.public.is_none() {
            return Err(OpError::new(
                ResponseStatus::PsaErrorStorageFailure,
                format!("no object with this key's CKA_ID/label on {}", self.token),
                "the key was deleted from the token by another program, or this is another token",
            ));
        }
        self.objects.insert(key_id.to_vec(), found);
        Ok(found)
    }

    /// Whether a failed C_Decrypt was the module refusing the ciphertext, not a broken
    /// session: SoftHSM2 (and other modules) answer input that does not decrypt with
    /// CKR_GENERAL_ERROR or CKR_FUNCTION_FAILED, or one of `also`, and the session is still
    /// healthy afterwards.
    pub(super) fn refused_ciphertext(&mut self, error: &OpError, also: &[&str]) -> bool {
        ["CKR_GENERAL_ERROR", "CKR_FUNCTION_FAILED"]
            .iter()
            .chain(also)
            .any(|ckr| error.cause.contains(ckr))
            && self.session.get_session_info().is_ok()
    }

    pub(super) fn private(&mut self, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
        self.objects(key_id)?.private.ok_or_else(|| {
            OpError::new(
                ResponseStatus::PsaErrorNotPermitted,
                format!("the key has no private key object on {}", self.token),
                "this is a public key: it can verify and encrypt only",
            )
        })
    }

    /// The public key object, or the private one for tokens that keep no public object
    /// (a private key object answers verify and encrypt on most tokens).
    pub(super) fn public(&mut self, key_id: &[u8]) -> Result<ObjectHandle, OpError> {
        let objects = self.objects(key_id)?;
        Ok(objects
            .public
            .or(objects.private)
            .expect("objects() found one"))
    }
}
