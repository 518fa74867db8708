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
    pub(super) session: Session,
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

impl Connection {
    pub(super) fn open(settings: &Pkcs11Settings) -> Result<Connection, String> {
        let module = settings.library_path.display().to_string();
        let pkcs11 = Pkcs11::new(&settings.library_path)
            .map_err(|e| format!("cannot load the PKCS#11 module {module}: {e}"))?;
        pkcs11
            .initialize(CInitializeArgs::OsThreads)
            .map_err(|e| format!("{}", ckr::error("C_Initialize", &module, e)))?;
        let slots = pkcs11
            .get_slots_with_token()
            .map_err(|e| format!("{}", ckr::error("C_GetSlotList", &module, e)))?;
        let mut seen = Vec::new();
        let mut chosen = None;
        for slot in slots {
            let Ok(info) = pkcs11.get_token_info(slot) else {
                continue;
            };
            let line = token_line(info.label(), info.serial_number(), slot);
            let matches = match &settings.token {
                TokenSelector::Slot(id) => slot.id() == *id,
                TokenSelector::Serial(serial) => info.serial_number().trim() == serial.trim(),
                TokenSelector::Label(label) => info.label().trim() == label.trim(),
                TokenSelector::Only => true,
            };
            if matches && info.token_initialized() {
                chosen = match chosen {
                    None => Some((slot, line.clone())),
                    Some(_) if settings.token == TokenSelector::Only => {
                        return Err(format!(
                            "{module} has several tokens and the config names none: set slot_number, serial_number or token_label (tokens seen: {})",
                            std::iter::once(line).chain(seen).collect::<Vec<_>>().join(", ")
                        ))
                    }
                    other => other,
                };
            }
            seen.push(line);
        }
        let Some((slot, token)) = chosen else {
            return Err(format!(
                "no initialised token matches {:?} in {module}; tokens seen: {}",
                settings.token,
                if seen.is_empty() {
                    "none".to_string()
                } else {
                    seen.join(", ")
                }
            ));
        };
        let session = pkcs11
            .open_rw_session(slot)
            .map_err(|e| format!("{}", ckr::error("opening a session", &token, e)))?;
        if !settings.user_pin.bytes().is_empty() {
            let pin = String::from_utf8_lossy(settings.user_pin.bytes()).to_string();
            match session.login(UserType::User, Some(&Secret::new(pin))) {
                Ok(())
                | Err(cryptoki::error::Error::Pkcs11(
                    cryptoki::error::RvError::UserAlreadyLoggedIn,
                    _,
                )) => {}
                Err(e) => return Err(format!("{}", ckr::error("logging in", &token, e))),
            }
        }
        Ok(Connection {
            _pkcs11: pkcs11,
            session,
            token,
            objects: HashMap::new(),
            broken: false,
        })
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
