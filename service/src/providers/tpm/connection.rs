//! One open connection to the TPM: the context, the primary key and the salted session,
//! the key loaded last and the endorsement key's saved context; decoding of TPM and TSS
//! failures; what a TCTI string names, for errors that carry no errno.

use super::*;

/// The raw `TSS2_RC` behind a tss-esapi error, if it came from the TSS or the TPM.
pub(super) fn raw_code(err: &tss_esapi::Error) -> Option<u32> {
    use bitfield::BitRange;
    use tss_esapi::constants::response_code::Tss2ResponseCode;
    match err {
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatZero(rc)) => Some(rc.bit_range(31, 0)),
        tss_esapi::Error::Tss2Error(Tss2ResponseCode::FormatOne(rc)) => Some(rc.bit_range(31, 0)),
        _ => None,
    }
}

/// A failed TPM call, decoded for the log and mapped to a PSA status.
pub fn tpm_error(operation: &str, err: tss_esapi::Error) -> OpError {
    let Some(raw) = raw_code(&err) else {
        return keys::tss_wrapper(operation, err);
    };
    let decoded = response_code::decode(raw);
    let hint = match (decoded.layer, decoded.name) {
        ("TCTI", _) => "the TPM cannot be reached: check the tcti setting, that the device exists and the service user may open it, or that the simulator runs",
        (_, "LOCKOUT") => "the TPM is in dictionary-attack lockout: wait for recovery or reset the lockout with the lockout authorisation (tpm2_dictionarylockout -c)",
        (_, "AUTH_FAIL" | "BAD_AUTH") => "wrong authorisation value: check owner_hierarchy_auth / endorsement_hierarchy_auth",
        (_, "HIERARCHY") => "the hierarchy is disabled in this TPM (firmware setting or TPM2_HierarchyControl)",
        (_, "INITIALIZE" | "REBOOT") => "the TPM was not started: the service sends TPM2_Startup when it connects; restart the service",
        (_, "FAILURE") => "the TPM is in failure mode: a reset (power cycle) is needed",
        (_, "OBJECT_MEMORY" | "SESSION_MEMORY" | "MEMORY" | "OBJECT_HANDLES" | "SESSION_HANDLES") => "the TPM ran out of slots: use the in-kernel resource manager (device:/dev/tpmrm0) or tabrmd rather than the raw device",
        (_, "KEY_SIZE" | "CURVE" | "SCHEME" | "HASH" | "ASYMMETRIC" | "SYMMETRIC") => "this TPM does not implement that algorithm or size: see its capabilities (tpm2_getcap algorithms)",
        (_, "SIGNATURE") => "the signature does not match the hash and the key",
        (_, "RETRY" | "YIELDED" | "TESTING" | "NV_RATE") => "the TPM is busy: retry the request",
        _ => "see the TPM 2.0 specification, Part 2, section 6.6 (response codes)",
    };
    OpError::new(
        decoded.status,
        format!("{operation}: {}", decoded.describe()),
        hint,
    )
}

/// Whether an error means the TPM connection (or the TPM's state) is gone, so that the
/// provider should reconnect.
pub(super) fn connection_lost(err: &tss_esapi::Error) -> bool {
    raw_code(err).is_some_and(|raw| {
        let decoded = response_code::decode(raw);
        matches!(
            (decoded.layer, decoded.name),
            (
                "TCTI",
                "IO_ERROR" | "NO_CONNECTION" | "MALFORMED_RESPONSE" | "INSUFFICIENT_RESPONSE"
            ) | (_, "INITIALIZE" | "REFERENCE_H" | "REFERENCE_S")
        )
    })
}

/// Handle ranges of what a connection leaves in the TPM: transient objects, loaded sessions,
/// saved sessions (TPM 2.0 Part 2, 7.2: TPM_HT_TRANSIENT, TPM_HT_LOADED_SESSION,
/// TPM_HT_SAVED_SESSION).
const LEFTOVER_RANGES: [(u32, &str); 3] = [
    (0x8000_0000, "transient objects"),
    (0x0200_0000, "loaded sessions"),
    (0x0300_0000, "saved sessions"),
];

/// A TPM without a resource manager (swtpm, /dev/tpm0) keeps the transient objects and
/// sessions of a process that was killed: with three object slots, one `kill -9` in the
/// middle of a sign leaves too few for the next start. Nobody else can hold them (the raw
/// device and swtpm take one connection at a time), so they are flushed before the primary
/// key is made. Through a resource manager (tpmrm0, tabrmd) a new connection sees none of
/// anyone's, and this finds nothing. Persistent handles are never touched.
fn flush_leftovers(ctx: &mut Context, tcti: &str) {
    use tss_esapi::constants::CapabilityType;
    use tss_esapi::handles::TpmHandle;
    use tss_esapi::structures::CapabilityData;
    let mut flushed = Vec::new();
    for (first, what) in LEFTOVER_RANGES {
        let handles = match ctx.get_capability(CapabilityType::Handles, first, 64) {
            Ok((CapabilityData::Handles(list), _)) => list,
            Ok(_) => continue,
            Err(e) => {
                log::warn!(
                    "tpm: cannot list the {what} left in the TPM: {}",
                    tpm_error("TPM2_GetCapability", e)
                );
                continue;
            }
        };
        let mut count = 0;
        for handle in handles.iter() {
            let raw = u32::from(*handle);
            // A list starting at `first` may run into the next range: keep to this one.
            if raw >> 24 != first >> 24 {
                continue;
            }
            let flushed_one = TpmHandle::try_from(raw)
                .map_err(|e| e.to_string())
                .and_then(|h| {
                    ctx.tr_from_tpm_public(h)
                        .map_err(|e| tpm_error("Esys_TR_FromTPMPublic", e).to_string())
                })
                .and_then(|object| {
                    ctx.flush_context(object)
                        .map_err(|e| tpm_error("TPM2_FlushContext", e).to_string())
                });
            match flushed_one {
                Ok(()) => count += 1,
                Err(e) => log::warn!("tpm: cannot flush {raw:#010x}, left in the TPM: {e}"),
            }
        }
        if count > 0 {
            flushed.push(format!("{count} {what}"));
        }
    }
    if !flushed.is_empty() {
        log::warn!(
            "tpm: flushed {} left in the TPM by a process that ended without flushing them (\"{tcti}\" has no resource manager: device:/dev/tpmrm0 or tabrmd keep processes apart)",
            flushed.join(", ")
        );
    }
}

/// The template of the primary key all client keys are wrapped with. It must never change:
/// a different template is a different key, and every blob in the store would be lost.
pub(super) fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// A TPM2_Load the TPM refused as not its parent's (TPM_RC_INTEGRITY): the key is lost, as
/// `hint` says why; other failures stay as they are.
fn unwrap_failure(mut e: OpError, hint: &'static str) -> OpError {
    if e.cause.contains("INTEGRITY") {
        e.status = ResponseStatus::PsaErrorStorageFailure;
        e.hint = hint;
    }
    e
}

/// A key kept loaded in the TPM between requests.
pub(super) struct Loaded {
    pub(super) blob: Vec<u8>,
    pub(super) handle: KeyHandle,
    /// The coordinate length of an ECC key's curve (signature sizes).
    pub(super) ecc_field_len: Option<usize>,
}

/// An open connection to the TPM with the provider's primary key and session.
pub(super) struct Connection {
    pub(super) ctx: Context,
    pub(super) primary: KeyHandle,
    pub(super) session: AuthSession,
    /// The key used last, still loaded.
    pub(super) loaded: Option<Loaded>,
    /// The endorsement key's saved context and public area, made on the first attestation
    /// and reused for the connection's life: creating the EK is an RSA key derivation
    /// (seconds on a discrete TPM), loading its saved context is not. It is not kept loaded:
    /// a TPM without a resource manager has only three transient object slots.
    pub(super) ek: Option<(tss_esapi::utils::TpmsContext, tss_esapi::structures::Public)>,
    /// Upstream Parsec's primary key, made again the first time one of upstream's keys is
    /// used, as a saved context (loaded for each of its keys' loads, then flushed: a TPM
    /// without a resource manager has three object slots).
    pub(super) upstream_primary: Option<tss_esapi::utils::TpmsContext>,
    /// Set when a call fails in a way that means the connection is gone.
    pub(super) broken: bool,
}

impl Connection {
    pub(super) fn open(settings: &TpmSettings, tcti: &TctiNameConf) -> Result<Connection, String> {
        let mut ctx = Context::new(tcti.clone()).map_err(|e| {
            let decoded = raw_code(&e).map(|raw| response_code::decode(raw).describe());
            format!(
                "cannot open the TPM through tcti \"{}\": {}{}",
                settings.tcti,
                probe_tcti(&settings.tcti),
                decoded.map(|d| format!(" (TSS: {d})")).unwrap_or_default()
            )
        })?;
        // A TPM started by firmware or the kernel answers TPM_RC_INITIALIZE: that is fine.
        if let Err(e) = ctx.startup(StartupType::Clear) {
            if raw_code(&e).map(|raw| response_code::decode(raw).name) != Some("INITIALIZE") {
                return Err(format!(
                    "TPM2_Startup failed: {}",
                    tpm_error("TPM2_Startup", e)
                ));
            }
        }
        flush_leftovers(&mut ctx, &settings.tcti);
        let owner_auth = Auth::try_from(settings.owner_hierarchy_auth.bytes().to_vec())
            .map_err(|e| format!("owner_hierarchy_auth is too long for the TPM: {e}"))?;
        ctx.tr_set_auth(ObjectHandle::Owner, owner_auth)
            .map_err(|e| format!("setting the owner authorisation: {e}"))?;
        let template = primary_template().map_err(|e| format!("primary key template: {e}"))?;
        let primary = ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| {
                format!(
                    "creating the primary key: {}",
                    tpm_error("TPM2_CreatePrimary", e)
                )
            })?
            .key_handle;
        let session = ctx
            .execute_without_session(|ctx| {
                ctx.start_auth_session(
                    Some(primary),
                    None,
                    None,
                    SessionType::Hmac,
                    SymmetricDefinition::AES_128_CFB,
                    HashingAlgorithm::Sha256,
                )
            })
            .map_err(|e| {
                format!(
                    "starting the session: {}",
                    tpm_error("TPM2_StartAuthSession", e)
                )
            })?
            .ok_or("the TPM returned no session handle")?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        ctx.tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| format!("setting the session's attributes: {e}"))?;
        Ok(Connection {
            ctx,
            primary,
            session,
            loaded: None,
            ek: None,
            upstream_primary: None,
            broken: false,
        })
    }

    /// Runs one TPM call with the provider's session, decoding a failure.
    pub(super) fn call<T>(
        &mut self,
        operation: &str,
        f: impl FnOnce(&mut Context) -> Result<T, tss_esapi::Error>,
    ) -> Result<T, OpError> {
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        let session = self.session;
        let result = self
            .ctx
            .tr_sess_set_attributes(session, attributes, mask)
            .and_then(|()| self.ctx.execute_with_session(Some(session), f));
        result.map_err(|e| {
            if connection_lost(&e) {
                self.broken = true;
            }
            tpm_error(operation, e)
        })
    }

    /// Runs one TPM call that needs no authorisation, without a session.
    pub(super) fn call_plain<T>(
        &mut self,
        operation: &str,
        f: impl FnOnce(&mut Context) -> Result<T, tss_esapi::Error>,
    ) -> Result<T, OpError> {
        self.ctx.execute_without_session(f).map_err(|e| {
            if connection_lost(&e) {
                self.broken = true;
            }
            tpm_error(operation, e)
        })
    }

    /// Loads a stored key (or finds it loaded already) and returns its handle.
    /// Returns the handle and, for ECC keys, the curve's coordinate length.
    pub(super) fn load(
        &mut self,
        blob: &[u8],
        attributes: &Attributes,
    ) -> Result<(KeyHandle, Option<usize>), OpError> {
        if let Some(loaded) = &self.loaded {
            if loaded.blob.as_slice() == blob {
                return Ok((loaded.handle, loaded.ecc_field_len));
            }
        }
        let stored = Blob::decode(blob, attributes)?;
        self.unload();
        let primary = self.primary;
        let public = stored.public.clone();
        let handle = match stored.private {
            Some(private) if stored.upstream_auth.is_some() => {
                let handle = self.load_upstream(private, public)?;
                let auth = stored.upstream_auth.clone().unwrap_or_default();
                if let Err(e) = self.ctx.tr_set_auth(handle.into(), auth) {
                    let _ = self.ctx.flush_context(handle.into());
                    return Err(tpm_error("setting the key's authorisation", e));
                }
                handle
            }
            Some(private) => self
                .call("TPM2_Load", |ctx| ctx.load(primary, private, public))
                .map_err(|e| unwrap_failure(e, "the TPM cannot unwrap this key: the owner hierarchy was cleared (tpm2_clear), the owner seed changed, or the key store comes from another TPM; the key is lost"))?,
            None => self.call_plain("TPM2_LoadExternal", |ctx| {
                ctx.load_external_public(public, Hierarchy::Null)
            })?,
        };
        let ecc_field_len = keys::ecc_field_len(&stored.public);
        self.loaded = Some(Loaded {
            blob: blob.to_vec(),
            handle,
            ecc_field_len,
        });
        Ok((handle, ecc_field_len))
    }

    /// Loads one of upstream Parsec's keys under upstream's primary, made again (or its
    /// saved context loaded), then flushed: the key stays loaded without its parent.
    fn load_upstream(&mut self, private: Private, public: Public) -> Result<KeyHandle, OpError> {
        let parent = self.upstream_primary()?;
        let loaded = self
            .call("TPM2_Load", |ctx| ctx.load(parent, private, public))
            .map_err(|e| unwrap_failure(e, "the TPM cannot unwrap upstream Parsec's key under its primary made again: the owner hierarchy was cleared, or upstream's store comes from another TPM; the key is lost"));
        if let Err(e) = self.ctx.flush_context(parent.into()) {
            log::warn!(
                "tpm: flushing upstream's primary key: {}",
                tpm_error("TPM2_FlushContext", e)
            );
        }
        loaded
    }

    /// Upstream's primary key, loaded: from its saved context, or made from its template
    /// (with the cipher upstream chose for this TPM: AES-256-CFB where the TPM has it).
    fn upstream_primary(&mut self) -> Result<KeyHandle, OpError> {
        if let Some(saved) = self.upstream_primary.clone() {
            match self.call_plain("TPM2_ContextLoad", |ctx| ctx.context_load(saved)) {
                Ok(handle) => return Ok(handle.into()),
                Err(e) => log::debug!("tpm: upstream's primary key made again: {}", e.cause),
            }
        }
        let cipher = super::upstream::CIPHERS
            .into_iter()
            .find(|cipher| {
                self.ctx
                    .execute_without_session(|ctx| {
                        ctx.test_parms(tss_esapi::structures::PublicParameters::SymCipher(tss_esapi::structures::SymmetricCipherParameters::new(
                            *cipher,
                        )))
                    })
                    .is_ok()
            })
            .ok_or_else(|| {
                keys::not_supported("the TPM has neither AES-256-CFB nor AES-128-CFB, one of which upstream's primary key used".into())
            })?;
        let template = super::upstream::primary_template(cipher)?;
        let handle = self
            .ctx
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            })
            .map_err(|e| tpm_error("TPM2_CreatePrimary (upstream's primary key)", e))?
            .key_handle;
        match self.ctx.context_save(handle.into()) {
            Ok(saved) => self.upstream_primary = Some(saved),
            Err(e) => log::debug!("tpm: saving upstream's primary key's context: {e}"),
        }
        Ok(handle)
    }

    /// Flushes the key kept loaded, to free its slot.
    pub(super) fn unload(&mut self) {
        if let Some(loaded) = self.loaded.take() {
            if let Err(e) = self.ctx.flush_context(loaded.handle.into()) {
                log::warn!(
                    "tpm: flushing a loaded key: {}",
                    tpm_error("TPM2_FlushContext", e)
                );
            }
        }
    }

    /// Whether the TPM says it is healthy (not in failure mode).
    pub(super) fn healthy(&mut self) -> bool {
        matches!(
            self.ctx
                .execute_without_session(|ctx| ctx.get_test_result()),
            Ok((_, Ok(())))
        )
    }
}

impl Link for Connection {
    fn broken(&self) -> bool {
        self.broken
    }
}

/// Looks at what a TCTI string names, to give the errno the TSS does not pass on.
pub(super) fn probe_tcti(tcti: &str) -> String {
    let (kind, conf) = tcti.split_once(':').unwrap_or((tcti, ""));
    match kind {
        "device" => {
            let path = if conf.is_empty() { "/dev/tpm0" } else { conf };
            match std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
            {
                Ok(_) => format!("{path} opens, but the TSS could not use it"),
                Err(e) => format!("{path}: {e} (errno {})", e.raw_os_error().unwrap_or(0)),
            }
        }
        "swtpm" | "mssim" => {
            let mut host = "127.0.0.1".to_string();
            let mut port = 2321;
            for part in conf.split(',') {
                match part.split_once('=') {
                    Some(("host", h)) => host = h.to_string(),
                    Some(("port", p)) => port = p.parse().unwrap_or(port),
                    _ => {}
                }
            }
            match std::net::TcpStream::connect((host.as_str(), port)) {
                Ok(_) => format!("{host}:{port} accepts connections, but the TSS could not use it"),
                Err(e) => format!(
                    "connecting to {host}:{port}: {e} (errno {})",
                    e.raw_os_error().unwrap_or(0)
                ),
            }
        }
        _ => "the TSS could not open it".into(),
    }
}
