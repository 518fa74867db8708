//! Loading the PKCS#11 module: C_Initialize, with the module's own parameters where it needs
//! them, and the token picked by the config's selector, refusing to guess.
//!
//! Most modules take C_Initialize with no parameters. NSS's softoken refuses that
//! (CKR_ARGUMENTS_BAD): it reads where its database is from the string in the arguments'
//! `pReserved` (`configdir='sql:/etc/pki/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db'`),
//! which cryptoki 0.8 (the newest that builds with Rust 1.75) cannot pass. With
//! `library_parameters` set, the module is initialised here through its function list, and
//! cryptoki's own C_Initialize then answers CKR_CRYPTOKI_ALREADY_INITIALIZED, which is taken
//! as done: the module is loaded once per process (dlopen returns the same instance), and
//! cryptoki finalises it when the connection goes, as for every other module.

use super::*;
use cryptoki_sys::{CKF_OS_LOCKING_OK, CKR_OK, CK_C_INITIALIZE_ARGS, CK_FUNCTION_LIST, CK_RV};
use std::ffi::{c_void, CString};
use std::path::Path;

/// The module loaded and initialised.
pub(super) fn load(settings: &Pkcs11Settings) -> Result<Pkcs11, String> {
    let module = settings.library_path.display().to_string();
    // Kept loaded until cryptoki holds the module too (its own dlopen of the same file).
    let initialised_here = match &settings.library_parameters {
        Some(parameters) => Some(initialize_with(&settings.library_path, parameters)?),
        None => None,
    };
    let pkcs11 = Pkcs11::new(&settings.library_path)
        .map_err(|e| format!("cannot load the PKCS#11 module {module}: {e}"))?;
    match pkcs11.initialize(CInitializeArgs::OsThreads) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) if initialised_here.is_some() => {}
        Err(e @ cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::ArgumentsBad, _)) => {
            return Err(format!(
                "{}; this module wants parameters in C_Initialize: set library_parameters (NSS's softoken: \"configdir='sql:/path/to/nssdb' certPrefix='' keyPrefix='' secmod='secmod.db'\")",
                ckr::error("C_Initialize", &module, e)
            ))
        }
        Err(e) => return Err(format!("{}", ckr::error("C_Initialize", &module, e))),
    }
    Ok(pkcs11)
}

/// C_Initialize with `parameters` in `pReserved`, through the module's C_GetFunctionList.
fn initialize_with(path: &Path, parameters: &str) -> Result<libloading::Library, String> {
    let module = path.display();
    let text =
        CString::new(parameters).map_err(|_| "library_parameters holds a NUL byte".to_string())?;
    // SAFETY: loading a shared object runs its initialisers; the module is the one the
    // operator configured, and cryptoki loads the same file the same way right after.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| format!("cannot load the PKCS#11 module {module}: {e}"))?;
    type GetFunctionList = unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV;
    // SAFETY: C_GetFunctionList has this signature in every PKCS#11 version (the standard's
    // CK_C_GetFunctionList); the symbol is not used after `library` is dropped.
    let get: libloading::Symbol<GetFunctionList> =
        unsafe { library.get(b"C_GetFunctionList\0") }
            .map_err(|e| format!("{module} is not a PKCS#11 module: {e}"))?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: `list` is a valid place for the module to write its function list's address.
    let rv = unsafe { get(&mut list) };
    if rv != CKR_OK || list.is_null() {
        return Err(format!("{module}: C_GetFunctionList failed (CKR 0x{rv:x})"));
    }
    // SAFETY: the module returned CKR_OK and a non-null pointer to its static function list,
    // which lives as long as the module is loaded (`library` is alive here).
    let Some(initialize) = (unsafe { (*list).C_Initialize }) else {
        return Err(format!("{module} has no C_Initialize"));
    };
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: text.as_ptr() as *mut c_void,
    };
    // SAFETY: `args` is a CK_C_INITIALIZE_ARGS as the standard defines it, with OS locking
    // and no mutex callbacks; `pReserved` points at a NUL-terminated string that outlives the
    // call (modules parse it during C_Initialize: NSS copies what it keeps).
    let rv = unsafe { initialize(&mut args as *mut CK_C_INITIALIZE_ARGS as *mut c_void) };
    if rv != CKR_OK {
        let code = match cryptoki::error::Rv::from(rv) {
            cryptoki::error::Rv::Error(rv) => format!("{} ({rv})", ckr::name(rv)),
            cryptoki::error::Rv::Ok => "CKR_OK".into(),
        };
        return Err(format!(
            "C_Initialize of {module} with library_parameters: {code}; check library_parameters (for NSS: the configdir exists and holds key4.db)"
        ));
    }
    Ok(library)
}

/// The token the selector names: exactly one, or an error listing what was seen.
pub(super) fn select(pkcs11: &Pkcs11, settings: &Pkcs11Settings) -> Result<(Slot, String), String> {
    let module = settings.library_path.display().to_string();
    let slots = pkcs11
        .get_slots_with_token()
        .map_err(|e| format!("{}", ckr::error("C_GetSlotList", &module, e)))?;
    let mut seen = Vec::new();
    let mut matching = Vec::new();
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
            matching.push((slot, line.clone()));
        }
        seen.push(line);
    }
    if matching.len() > 1 {
        // Taking the first would try this token's PIN on another token (a lockout count
        // each start, on a TPM its dictionary-attack counter).
        let lines: Vec<&str> = matching.iter().map(|(_, l)| l.as_str()).collect();
        return Err(match &settings.token {
            TokenSelector::Only => format!(
                "{module} has several tokens and the config names none: set slot_number, serial_number or token_label (tokens: {})",
                lines.join(", ")
            ),
            selector => format!(
                "{} tokens of {module} match {selector:?}: {}; select one by a value only it has (slot_number, or a unique token_label)",
                matching.len(),
                lines.join(", ")
            ),
        });
    }
    matching.pop().ok_or_else(|| {
        format!(
            "no initialised token matches {:?} in {module}; tokens seen: {}",
            settings.token,
            if seen.is_empty() {
                "none".to_string()
            } else {
                seen.join(", ")
            }
        )
    })
}

/// What the token says of its user PIN's retry counter, for the log (None: nothing to say).
pub(super) fn pin_state(pkcs11: &Pkcs11, slot: Slot) -> Option<&'static str> {
    let info = pkcs11.get_token_info(slot).ok()?;
    if info.user_pin_locked() {
        Some("the token says the user PIN is locked (CKF_USER_PIN_LOCKED): unlock it with the SO PIN")
    } else if info.user_pin_final_try() {
        Some("the token says one try is left before the user PIN locks (CKF_USER_PIN_FINAL_TRY)")
    } else if info.user_pin_count_low() {
        Some("the token says a wrong user PIN was given since the last right one (CKF_USER_PIN_COUNT_LOW)")
    } else {
        None
    }
}
