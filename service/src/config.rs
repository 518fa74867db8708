//! The service's configuration: upstream Parsec's `config.toml` layout, checked strictly.
//!
//! Parsing happens in two steps. `serde` turns the TOML text into the `File*` structs below,
//! which mirror upstream's layout; unknown keys and ill-typed values fail there, and the TOML
//! library reports the line and column. `Config::from_file_text` then checks what types alone
//! cannot (names that refer to each other, providers built into this binary, limits) and
//! resolves everything into the `Config` the service runs on. Its errors name the line of the
//! table they are about.

use log::LevelFilter;
use parsec_interface::requests::AuthType;
use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration used when no file is given and `/etc/parsec/config.toml` does not exist.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config/default.toml");
/// Requests that may wait for one provider by default: with the 1 MiB body limit,
/// at most 32 MiB of queued bodies per device, and a client waits behind at most 32 others.
pub const DEFAULT_PROVIDER_QUEUE_LIMIT: u64 = 32;
/// Software-provider RSA generations in child processes at once, by default: each is a
/// copy-on-write fork that keeps a core busy for up to seconds (RSA-4096).
pub const DEFAULT_MAX_KEYGEN_PROCESSES: u64 = 4;
/// Seconds a provider has to answer a request (`core_settings.provider_request_timeout`):
/// long enough for an RSA key generation on a slow token, short enough that a hung device
/// does not hold its clients forever.
pub const DEFAULT_PROVIDER_REQUEST_TIMEOUT: u64 = 300;
/// Request bytes held across all connections by default: 16 MiB (at most 16 full-size
/// requests in memory at once on a 512 MiB device); raised to body_len_limit if smaller.
pub const DEFAULT_CONNECTION_BUFFER_BUDGET: u64 = 16 << 20;
/// Where the service looks for its configuration when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/parsec/config.toml";

/// Everything the service needs to run, resolved and checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub log_level: LevelFilter,
    pub log_target: LogTarget,
    pub log_timestamp: bool,
    pub allow_root: bool,
    pub body_len_limit: usize,
    pub buffer_size_limit: usize,
    pub socket_path: PathBuf,
    pub read_timeout: Duration,
    pub max_connections: usize,
    /// Requests per second each application may make (0: no limit), and its burst.
    pub client_rate_limit: u32,
    pub client_rate_burst: u32,
    /// Requests that may wait for each provider (beyond the batch running).
    pub provider_queue_limit: usize,
    /// Software-provider key generations running in child processes at once.
    pub max_keygen_processes: usize,
    /// How long a request may wait for its provider, queued and running, before it is
    /// answered PsaErrorCommunicationFailure (`dispatcher/deadlines.rs`).
    pub provider_request_timeout: Duration,
    /// Keys for primitives PSA Crypto 1.0 deprecates (MD5, SHA-1, DES, ...) may be generated
    /// (`core_settings.allow_deprecated`, upstream's key and meaning).
    pub allow_deprecated: bool,
    /// Bytes of requests the service holds across all connections before it stops reading.
    pub connection_buffer_budget: usize,
    pub authenticator: AuthenticatorKind,
    pub admins: Vec<String>,
    /// What is accepted but probably not meant, logged once logging is up (start-up, reload).
    pub warnings: Vec<String>,
    pub providers: Vec<ProviderSettings>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum LogTarget {
    #[serde(rename = "stderr")]
    Stderr,
    #[serde(rename = "syslog")]
    Syslog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthenticatorKind {
    Direct,
    UnixPeerCredentials,
    /// Accepted by the parser so that the error can say it is not supported.
    JwtSvid,
}

impl AuthenticatorKind {
    /// The authenticator's wire id.
    pub fn auth_type(self) -> AuthType {
        match self {
            AuthenticatorKind::Direct => AuthType::Direct,
            AuthenticatorKind::UnixPeerCredentials => AuthType::UnixPeerCredentials,
            AuthenticatorKind::JwtSvid => AuthType::JwtSvid,
        }
    }
}

/// The directory the service started in: where upstream Parsec, which keeps Mbed TLS's key
/// files in its working directory, kept them (read at the first config load, before the
/// software provider makes `storage_dir` the working directory).
pub fn start_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")))
}

/// One enabled provider, in config order (the first is the clients' default).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderSettings {
    pub name: String,
    /// Where the key store keeps this provider's name-to-key mappings.
    pub key_store_dir: PathBuf,
    /// The configured authenticator: the namespace of `existing_keys`, and of the entries
    /// a store holds from before it had namespaces, at its first start (`key_store::namespace`).
    pub authenticator: AuthType,
    pub kind: ProviderKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProviderKind {
    MbedCrypto {
        /// Where Mbed TLS keeps its key files.
        storage_dir: PathBuf,
        /// Where upstream Parsec kept its Mbed TLS key files (its working directory), read
        /// when the key store is upstream's (docs/migration.md).
        upstream_key_dir: PathBuf,
    },
    Tpm(TpmSettings),
    Pkcs11(Pkcs11Settings),
}

impl ProviderKind {
    /// The software provider (Mbed TLS), as opposed to a device.
    pub fn is_software(&self) -> bool {
        matches!(self, ProviderKind::MbedCrypto { .. })
    }
}

/// How the PKCS#11 provider reaches its token.
#[derive(Debug, Clone, PartialEq)]
pub struct Pkcs11Settings {
    pub library_path: PathBuf,
    pub token: TokenSelector,
    pub user_pin: HierarchyAuth,
    /// Passed to the module's C_Initialize (`pReserved`): NSS's softoken needs it.
    pub library_parameters: Option<String>,
    pub software_public_operations: bool,
    pub allow_export: bool,
    pub existing_keys: Vec<ExistingKey>,
}

/// Which token: the first key the config gives, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSelector {
    Slot(u64),
    Serial(String),
    Label(String),
    /// The only token present (start-up fails if there are several).
    Only,
}

/// A key already on the token, shown to `application` as `name`.
#[derive(Debug, Clone, PartialEq)]
pub struct ExistingKey {
    pub label: Option<String>,
    pub id: Option<Vec<u8>>,
    pub application: String,
    pub name: String,
    /// Whether the service may destroy it (DestroyKey, DeleteClient).
    pub owned: bool,
}

/// An existing key's CKA_ID as the config writes it: hex digits (what pkcs11-tool and
/// p11tool show), optionally after `hex:`, or `str:` then text (what `tpm2_ptool addkey
/// --id` was given: it stores the text's bytes).
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
fn existing_key_id(value: &str) -> Result<Vec<u8>, String> {
    if let Some(text) = value.strip_prefix("str:") {
        if text.is_empty() {
            return Err("str: with no text".into());
        }
        return Ok(text.as_bytes().to_vec());
    }
    let hex = value.strip_prefix("hex:").unwrap_or(value);
    if hex.is_empty() {
        return Err("empty: give the CKA_ID in hex, or str: then its text".into());
    }
    HierarchyAuth::parse(&format!("hex:{hex}"))
        .map(|id| id.bytes().to_vec())
        .map_err(|e| format!("{e} (the CKA_ID in hex, as pkcs11-tool shows it, or str: then the text tpm2_ptool was given)"))
}

/// How the TPM provider reaches its TPM.
#[derive(Debug, Clone, PartialEq)]
pub struct TpmSettings {
    /// A TCTI string: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, `tabrmd`...
    pub tcti: String,
    pub owner_hierarchy_auth: HierarchyAuth,
    pub endorsement_hierarchy_auth: HierarchyAuth,
    /// Start without the provider (rather than fail) when no TPM answers.
    pub skip_if_no_tpm: bool,
}

/// A secret from the config (a TPM hierarchy's authorisation, a PIN); never printed.
#[derive(Clone, PartialEq, Default)]
pub struct HierarchyAuth(Vec<u8>);

impl HierarchyAuth {
    /// Reads upstream's format: `str:` then text, `hex:` then hex digits, or plain text.
    pub fn parse(value: &str) -> Result<HierarchyAuth, String> {
        if let Some(hex) = value.strip_prefix("hex:") {
            if hex.len() % 2 != 0 {
                return Err("a hex: value needs an even number of hex digits".into());
            }
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err("a hex: value may only hold hex digits".into());
            }
            (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("x"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .map(HierarchyAuth)
                .map_err(|_| "a hex: value may only hold hex digits".into())
        } else {
            Ok(HierarchyAuth(
                value
                    .strip_prefix("str:")
                    .unwrap_or(value)
                    .as_bytes()
                    .to_vec(),
            ))
        }
    }

    /// A PKCS#11 user PIN as upstream 1.5.0 reads it: `hex:` then hex digits is those bytes
    /// (as text: bytes that are not UTF-8 become U+FFFD, as upstream's do), `hex:` followed
    /// by anything else is taken whole, `str:` then text is the text, anything else itself.
    pub fn parse_pin(value: &str) -> HierarchyAuth {
        if value.starts_with("hex:") {
            return match HierarchyAuth::parse(value) {
                Ok(raw) => HierarchyAuth(
                    String::from_utf8_lossy(raw.bytes())
                        .into_owned()
                        .into_bytes(),
                ),
                Err(_) => HierarchyAuth(value.as_bytes().to_vec()),
            };
        }
        HierarchyAuth::parse(value).unwrap_or_default()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for HierarchyAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            f.write_str("(empty)")
        } else {
            f.write_str("(set, not shown)")
        }
    }
}

impl Drop for HierarchyAuth {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// Values given on the command line that replace the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket_path: Option<PathBuf>,
    pub store_dir: Option<PathBuf>,
    /// `--allow-root`: run as root this once, whatever core_settings.allow_root says.
    pub allow_root: bool,
}

/// A configuration error, ready to print: `FILE[:LINE]: what is wrong and what is expected`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{}: {}", self.file, line, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where the configuration comes from, kept so that SIGHUP can read it again.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The file, or `None` for the embedded default.
    pub path: Option<PathBuf>,
    pub overrides: Overrides,
    /// Relative paths are resolved against the directory the service was started in, even
    /// after a provider changed the working directory.
    pub base_dir: PathBuf,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.path {
            // Relative to where the service started (a reload comes after a provider may
            // have changed the working directory).
            Some(path) if path.is_relative() => {
                Config::load(&self.base_dir.join(path), &self.overrides)?
            }
            Some(path) => Config::load(path, &self.overrides)?,
            None => {
                Config::from_file_text("(embedded default)", EMBEDDED_DEFAULT, &self.overrides)?
            }
        };
        let base = |p: &mut PathBuf| {
            if p.is_relative() {
                // Joined and rid of `.` components, for tidy log lines.
                *p = self.base_dir.join(&*p).components().collect();
            }
        };
        base(&mut config.socket_path);
        for provider in &mut config.providers {
            base(&mut provider.key_store_dir);
            match &mut provider.kind {
                ProviderKind::MbedCrypto {
                    storage_dir,
                    upstream_key_dir,
                } => {
                    base(storage_dir);
                    base(upstream_key_dir);
                }
                ProviderKind::Tpm(_) => {}
                ProviderKind::Pkcs11(_) => {}
            }
        }
        Ok(config)
    }

    /// A name for log lines.
    pub fn describe(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => "(embedded default)".into(),
        }
    }
}

// ---- The file's layout (upstream's names) ----

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    core_settings: FileCoreSettings,
    listener: Option<FileListener>,
    authenticator: Option<FileAuthenticator>,
    #[serde(default)]
    key_manager: Vec<FileKeyManager>,
    #[serde(default)]
    provider: Vec<FileProvider>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileCoreSettings {
    log_level: Option<FileLogLevel>,
    log_target: Option<LogTarget>,
    log_timestamp: Option<bool>,
    log_error_details: Option<bool>,
    allow_root: Option<bool>,
    body_len_limit: Option<u64>,
    buffer_size_limit: Option<u64>,
    allow_deprecated: Option<bool>,
    client_rate_limit: Option<u32>,
    client_rate_burst: Option<u32>,
    provider_queue_limit: Option<u64>,
    provider_request_timeout: Option<u64>,
    max_keygen_processes: Option<u64>,
    connection_buffer_budget: Option<u64>,
    /// Upstream's worker pool; this service has one thread by design.
    thread_pool_size: Option<u64>,
    /// Upstream's polling interval; this service blocks in the event loop instead.
    idle_listener_sleep_duration: Option<u64>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum FileLogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListener {
    listener_type: FileListenerType,
    /// Milliseconds a client has to send its whole request.
    timeout: u64,
    socket_path: Option<String>,
    max_connections: Option<u64>,
}

#[derive(Deserialize)]
enum FileListenerType {
    DomainSocket,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuthenticator {
    auth_type: AuthenticatorKind,
    admins: Option<Vec<FileAdmin>>,
    workload_endpoint: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileKeyManager {
    name: String,
    manager_type: FileManagerType,
    store_path: Option<String>,
    sqlite_db_path: Option<String>,
    /// Not a key of upstream 1.5.0 (its own test configs still carry it): it ignores it.
    database_path: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
enum FileManagerType {
    OnDisk,
    SQLite,
}

/// Every provider type upstream knows, so that a config written for upstream parses and a
/// provider missing from this build is named as such rather than as a syntax error.
#[derive(Deserialize)]
#[serde(tag = "provider_type", deny_unknown_fields)]
// The TPM and PKCS#11 keys are parsed (so upstream configs are checked) before those
// providers are built in; they are read once their features exist.
#[allow(dead_code)]
enum FileProvider {
    MbedCrypto {
        name: Option<String>,
        key_info_manager: String,
        storage_dir: Option<String>,
        upstream_key_dir: Option<String>,
    },
    Tpm {
        name: Option<String>,
        key_info_manager: String,
        tcti: Option<String>,
        owner_hierarchy_auth: Option<String>,
        endorsement_hierarchy_auth: Option<String>,
        skip_if_no_tpm: Option<bool>,
    },
    Pkcs11 {
        name: Option<String>,
        key_info_manager: String,
        library_path: Option<String>,
        slot_number: Option<u64>,
        serial_number: Option<String>,
        user_pin: Option<String>,
        software_public_operations: Option<bool>,
        allow_export: Option<bool>,
        /// Ours: a third way to find the token.
        token_label: Option<String>,
        /// Ours: the string C_Initialize passes the module (NSS's softoken: its database).
        library_parameters: Option<String>,
        /// Ours: keys already on the token, made visible to an application.
        existing_keys: Option<Vec<FileExistingKey>>,
    },
    TrustedService {
        name: Option<String>,
        key_info_manager: String,
    },
    /// Upstream's keys, so that its configs for this provider are named as not built in.
    CryptoAuthLib {
        name: Option<String>,
        key_info_manager: String,
        device_type: Option<String>,
        iface_type: Option<String>,
        wake_delay: Option<u16>,
        rx_retries: Option<i32>,
        slave_address: Option<u8>,
        bus: Option<u8>,
        baud: Option<u32>,
        access_key_file_name: Option<String>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
// Read only when the PKCS#11 provider is built in.
#[allow(dead_code)]
struct FileExistingKey {
    label: Option<String>,
    /// CKA_ID in hex.
    id: Option<String>,
    application: String,
    name: String,
    owned: Option<bool>,
}

impl FileProvider {
    fn type_name(&self) -> &'static str {
        match self {
            FileProvider::MbedCrypto { .. } => "MbedCrypto",
            FileProvider::Tpm { .. } => "Tpm",
            FileProvider::Pkcs11 { .. } => "Pkcs11",
            FileProvider::TrustedService { .. } => "TrustedService",
            FileProvider::CryptoAuthLib { .. } => "CryptoAuthLib",
        }
    }

    fn common(&self) -> (&Option<String>, &String) {
        match self {
            FileProvider::MbedCrypto {
                name,
                key_info_manager,
                ..
            }
            | FileProvider::Tpm {
                name,
                key_info_manager,
                ..
            }
            | FileProvider::Pkcs11 {
                name,
                key_info_manager,
                ..
            }
            | FileProvider::TrustedService {
                name,
                key_info_manager,
            }
            | FileProvider::CryptoAuthLib {
                name,
                key_info_manager,
                ..
            } => (name, key_info_manager),
        }
    }
}

/// Finds the line of the `index`-th occurrence of a table header such as `[[provider]]`,
/// so that errors found after parsing can still point at the right place.
fn line_of_table(text: &str, header: &str, index: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| line.trim_start().starts_with(header))
        .nth(index)
        .map(|(number, _)| number + 1)
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            line: None,
            message: format!("cannot read the config file: {e}"),
        })?;
        Config::from_file_text(&file, &text, overrides)
    }

    /// Parses and checks config text; `file` is only used in error messages.
    #[cfg_attr(
        not(feature = "mbed-crypto-provider"),
        allow(unused_variables, unused_mut, unreachable_code)
    )]
    pub fn from_file_text(
        file: &str,
        text: &str,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let error = |line: Option<usize>, message: String| ConfigError {
            file: file.to_string(),
            line,
            message,
        };
        let parsed: FileConfig = toml::from_str(text).map_err(|e| {
            // The TOML library's message already carries line, column and the expected values.
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let message = e.message().trim().to_string();
            error(line, message)
        })?;

        let core = &parsed.core_settings;
        let core_line = line_of_table(text, "[core_settings]", 0);
        for (key, set) in [
            ("thread_pool_size", core.thread_pool_size.is_some()),
            (
                "idle_listener_sleep_duration",
                core.idle_listener_sleep_duration.is_some(),
            ),
            ("log_error_details", core.log_error_details.is_some()),
        ] {
            if set {
                log::info!("{file}: core_settings.{key} is accepted for compatibility with upstream Parsec and has no effect here");
            }
        }
        let body_len_limit = core.body_len_limit.unwrap_or(1 << 20);
        let buffer_size_limit = core.buffer_size_limit.unwrap_or(1 << 20);
        for (key, value) in [
            ("body_len_limit", body_len_limit),
            ("buffer_size_limit", buffer_size_limit),
        ] {
            if value == 0 || value > u32::MAX as u64 {
                return Err(error(
                    core_line,
                    format!("core_settings.{key} = {value} is out of range: expected a number of bytes from 1 to 4294967295"),
                ));
            }
        }

        let provider_queue_limit = core
            .provider_queue_limit
            .unwrap_or(DEFAULT_PROVIDER_QUEUE_LIMIT);
        if provider_queue_limit == 0 || provider_queue_limit > 65_536 {
            return Err(error(
                core_line,
                format!("core_settings.provider_queue_limit = {provider_queue_limit} is out of range: expected a number of requests from 1 to 65536"),
            ));
        }

        let provider_request_timeout = core
            .provider_request_timeout
            .unwrap_or(DEFAULT_PROVIDER_REQUEST_TIMEOUT);
        if provider_request_timeout == 0 || provider_request_timeout > 86_400 {
            return Err(error(
                core_line,
                format!("core_settings.provider_request_timeout = {provider_request_timeout} is out of range: expected seconds from 1 to 86400"),
            ));
        }

        let max_keygen_processes = core
            .max_keygen_processes
            .unwrap_or(DEFAULT_MAX_KEYGEN_PROCESSES);
        if max_keygen_processes == 0 || max_keygen_processes > 1024 {
            return Err(error(
                core_line,
                format!("core_settings.max_keygen_processes = {max_keygen_processes} is out of range: expected a number of processes from 1 to 1024"),
            ));
        }
        let connection_buffer_budget = core
            .connection_buffer_budget
            .unwrap_or(DEFAULT_CONNECTION_BUFFER_BUDGET.max(body_len_limit));
        if connection_buffer_budget < body_len_limit || connection_buffer_budget > 1 << 40 {
            return Err(error(
                core_line,
                format!("core_settings.connection_buffer_budget = {connection_buffer_budget} is out of range: expected a number of bytes from body_len_limit ({body_len_limit}) to 1099511627776"),
            ));
        }

        let listener = parsed.listener.as_ref().ok_or_else(|| {
            error(
                None,
                "the [listener] table is missing: expected listener_type = \"DomainSocket\", timeout (ms) and socket_path".into(),
            )
        })?;
        let listener_line = line_of_table(text, "[listener]", 0);
        let FileListenerType::DomainSocket = listener.listener_type;
        if listener.timeout == 0 || listener.timeout > 3_600_000 {
            return Err(error(
                listener_line,
                format!(
                    "listener.timeout = {} is out of range: expected milliseconds from 1 to 3600000",
                    listener.timeout
                ),
            ));
        }
        let max_connections = listener.max_connections.unwrap_or(256);
        if max_connections == 0 || max_connections > 65_536 {
            return Err(error(
                listener_line,
                format!("listener.max_connections = {max_connections} is out of range: expected 1 to 65536"),
            ));
        }
        let socket_path = match (&overrides.socket_path, &listener.socket_path) {
            (Some(path), _) => path.clone(),
            (None, Some(path)) if !path.is_empty() => PathBuf::from(path),
            (None, Some(_)) => {
                return Err(error(
                    listener_line,
                    "listener.socket_path is empty: expected the path of the Unix socket".into(),
                ))
            }
            (None, None) => PathBuf::from("/run/parsec/parsec.sock"),
        };

        let authenticator = parsed.authenticator.as_ref().ok_or_else(|| {
            error(
                None,
                "the [authenticator] table is missing: expected auth_type = \"Direct\" or \"UnixPeerCredentials\"".into(),
            )
        })?;
        let auth_line = line_of_table(text, "[authenticator]", 0);
        if authenticator.auth_type == AuthenticatorKind::JwtSvid {
            return Err(error(
                auth_line,
                "auth_type = \"JwtSvid\" is not supported by this service: expected \"Direct\" or \"UnixPeerCredentials\"".into(),
            ));
        }
        if authenticator.workload_endpoint.is_some() {
            return Err(error(
                auth_line,
                "workload_endpoint only applies to auth_type = \"JwtSvid\", which this service does not support".into(),
            ));
        }
        let admins: Vec<String> = authenticator
            .admins
            .iter()
            .flatten()
            .map(|admin| admin.name.clone())
            .collect();
        if let Some(empty) = admins.iter().position(|name| name.is_empty()) {
            return Err(error(
                auth_line,
                format!("admins entry {} has an empty name: expected an application name (a UID for UnixPeerCredentials)", empty + 1),
            ));
        }
        let mut warnings = Vec::new();
        if authenticator.auth_type == AuthenticatorKind::UnixPeerCredentials {
            // Upstream accepts them (its own CI config has "list_clients test"); they can
            // never match a client, whose application name is its UID.
            for bad in admins.iter().filter(|name| name.parse::<u32>().is_err()) {
                let at = auth_line.map(|l| format!(":{l}")).unwrap_or_default();
                warnings.push(format!(
                    "{file}{at}: admin \"{}\" is not a UID: with UnixPeerCredentials an application's name is its UID, so this admin matches no client",
                    crate::error::escape_capped(bad, 64)
                ));
            }
        }

        let mut managers = Vec::new();
        for (index, manager) in parsed.key_manager.iter().enumerate() {
            let line = line_of_table(text, "[[key_manager]]", index);
            if managers
                .iter()
                .any(|(name, _): &(String, PathBuf)| *name == manager.name)
            {
                return Err(error(
                    line,
                    format!(
                        "a second [[key_manager]] is named \"{}\": names must be unique",
                        manager.name
                    ),
                ));
            }
            if manager.database_path.is_some() {
                let at = line.map(|l| format!(":{l}")).unwrap_or_default();
                warnings.push(format!(
                    "{file}{at}: key_manager \"{}\": database_path is not read, as upstream Parsec 1.5.0 does not read it (it uses the file sqlite_db_path names, or its default): write sqlite_db_path to choose the file",
                    crate::error::escape_capped(&manager.name, 64)
                ));
            }
            let path = match (manager.manager_type, &manager.store_path, &manager.sqlite_db_path) {
                (FileManagerType::OnDisk, Some(path), None) => path.clone(),
                (FileManagerType::OnDisk, None, None) => "/var/lib/parsec/mappings".to_string(),
                (FileManagerType::SQLite, None, Some(path)) => path.clone(),
                (FileManagerType::SQLite, None, None) => {
                    "/var/lib/parsec/kim-mappings/sqlite/sqlite-key-info-manager.sqlite3".to_string()
                }
                (FileManagerType::OnDisk, _, Some(_)) => {
                    return Err(error(line, "sqlite_db_path belongs to manager_type = \"SQLite\": use store_path for \"OnDisk\"".into()))
                }
                (FileManagerType::SQLite, Some(_), _) => {
                    return Err(error(line, "store_path belongs to manager_type = \"OnDisk\": use sqlite_db_path for \"SQLite\"".into()))
                }
            };
            let path = match &overrides.store_dir {
                Some(dir) => dir.clone(),
                None => PathBuf::from(path),
            };
            managers.push((manager.name.clone(), path));
        }

        let mut providers: Vec<ProviderSettings> = Vec::new();
        for (index, provider) in parsed.provider.iter().enumerate() {
            let line = line_of_table(text, "[[provider]]", index);
            let (name, manager) = provider.common();
            let type_name = provider.type_name();
            let Some((_, key_store_dir)) = managers.iter().find(|(n, _)| n == manager) else {
                return Err(error(
                    line,
                    format!("key_info_manager = \"{manager}\" names no [[key_manager]]: expected one of {:?}",
                        managers.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>()),
                ));
            };
            let name = name
                .clone()
                .unwrap_or_else(|| default_provider_name(type_name));
            let kind = match provider {
                #[cfg(feature = "mbed-crypto-provider")]
                FileProvider::MbedCrypto {
                    storage_dir,
                    upstream_key_dir,
                    ..
                } => ProviderKind::MbedCrypto {
                    storage_dir: storage_dir
                        .as_ref()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| key_store_dir.join("mbed-crypto")),
                    upstream_key_dir: upstream_key_dir
                        .as_ref()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| start_dir().to_path_buf()),
                },
                #[cfg(feature = "tpm-provider")]
                FileProvider::Tpm {
                    tcti,
                    owner_hierarchy_auth,
                    endorsement_hierarchy_auth,
                    skip_if_no_tpm,
                    ..
                } => {
                    let auth = |key: &str, value: &Option<String>| {
                        HierarchyAuth::parse(value.as_deref().unwrap_or(""))
                            .map_err(|e| error(line, format!("{key}: {e}")))
                    };
                    ProviderKind::Tpm(TpmSettings {
                        tcti: tcti
                            .clone()
                            .unwrap_or_else(|| "device:/dev/tpmrm0".to_string()),
                        owner_hierarchy_auth: auth("owner_hierarchy_auth", owner_hierarchy_auth)?,
                        endorsement_hierarchy_auth: auth(
                            "endorsement_hierarchy_auth",
                            endorsement_hierarchy_auth,
                        )?,
                        skip_if_no_tpm: skip_if_no_tpm.unwrap_or(false),
                    })
                }
                #[cfg(feature = "pkcs11-provider")]
                FileProvider::Pkcs11 {
                    library_path,
                    slot_number,
                    serial_number,
                    user_pin,
                    software_public_operations,
                    allow_export,
                    token_label,
                    library_parameters,
                    existing_keys,
                    ..
                } => {
                    let Some(library_path) = library_path else {
                        return Err(error(line, "library_path is missing: the PKCS#11 module to load, e.g. \"/usr/lib/softhsm/libsofthsm2.so\"".into()));
                    };
                    // As upstream: a serial number wins over a slot number (which changes
                    // when a token is plugged elsewhere); the label is this service's.
                    let token = match (serial_number, slot_number, token_label) {
                        (Some(serial), slot, _) => {
                            if let Some(slot) = slot {
                                let at = line.map(|l| format!(":{l}")).unwrap_or_default();
                                warnings.push(format!("{file}{at}: both serial_number and slot_number are set: the token is found by serial_number, as upstream Parsec does, and slot_number = {slot} is not used"));
                            }
                            TokenSelector::Serial(serial.clone())
                        }
                        (None, Some(slot), _) => TokenSelector::Slot(*slot),
                        (None, None, Some(label)) => TokenSelector::Label(label.clone()),
                        (None, None, None) => TokenSelector::Only,
                    };
                    let mut keys = Vec::new();
                    for key in existing_keys.iter().flatten() {
                        let id = match &key.id {
                            None => None,
                            Some(id) => Some(existing_key_id(id).map_err(|e| {
                                error(line, format!("existing key \"{}\": id: {e}", key.name))
                            })?),
                        };
                        if id.is_none() && key.label.is_none() {
                            return Err(error(line, format!("existing key \"{}\": give its label, its id (CKA_ID in hex) or both", key.name)));
                        }
                        if keys.iter().any(|k: &ExistingKey| k.application == key.application && k.name == key.name) {
                            return Err(error(line, format!("existing key \"{}\" of \"{}\" is mapped twice", key.name, key.application)));
                        }
                        keys.push(ExistingKey {
                            label: key.label.clone(),
                            id,
                            application: key.application.clone(),
                            name: key.name.clone(),
                            owned: key.owned.unwrap_or(false),
                        });
                    }
                    ProviderKind::Pkcs11(Pkcs11Settings {
                        library_path: PathBuf::from(library_path),
                        token,
                        user_pin: HierarchyAuth::parse_pin(user_pin.as_deref().unwrap_or("")),
                        library_parameters: library_parameters.clone(),
                        software_public_operations: software_public_operations.unwrap_or(false),
                        allow_export: allow_export.unwrap_or(true),
                        existing_keys: keys,
                    })
                }
                _ => {
                    return Err(error(
                        line,
                        format!(
                            "provider_type = \"{type_name}\" is not built into this binary: expected one of {:?}, or rebuild with cargo feature {}",
                            built_in_providers(),
                            feature_of(type_name)
                        ),
                    ))
                }
            };
            if providers
                .iter()
                .any(|p| std::mem::discriminant(&p.kind) == std::mem::discriminant(&kind))
            {
                return Err(error(
                    line,
                    format!("a second provider of type \"{type_name}\": each provider type may be configured once"),
                ));
            }
            if providers.iter().any(|p| p.name == name) {
                return Err(error(
                    line,
                    format!("a second provider is named \"{name}\": names must be unique"),
                ));
            }
            providers.push(ProviderSettings {
                name,
                key_store_dir: key_store_dir.clone(),
                authenticator: authenticator.auth_type.auth_type(),
                kind,
            });
        }
        if providers.is_empty() {
            warnings.push(format!(
                "{file}: no [[provider]] is configured: only core operations will be served"
            ));
        }

        Ok(Config {
            warnings,
            log_level: match core.log_level.unwrap_or(FileLogLevel::Warn) {
                FileLogLevel::Off => LevelFilter::Off,
                FileLogLevel::Error => LevelFilter::Error,
                FileLogLevel::Warn => LevelFilter::Warn,
                FileLogLevel::Info => LevelFilter::Info,
                FileLogLevel::Debug => LevelFilter::Debug,
                FileLogLevel::Trace => LevelFilter::Trace,
            },
            log_target: core.log_target.unwrap_or(LogTarget::Stderr),
            log_timestamp: core.log_timestamp.unwrap_or(false),
            allow_root: core.allow_root.unwrap_or(false) || overrides.allow_root,
            body_len_limit: body_len_limit as usize,
            buffer_size_limit: buffer_size_limit as usize,
            socket_path,
            read_timeout: Duration::from_millis(listener.timeout),
            max_connections: max_connections as usize,
            client_rate_limit: core.client_rate_limit.unwrap_or(0),
            client_rate_burst: core
                .client_rate_burst
                .unwrap_or_else(|| core.client_rate_limit.unwrap_or(0).max(1)),
            provider_queue_limit: provider_queue_limit as usize,
            max_keygen_processes: max_keygen_processes as usize,
            provider_request_timeout: Duration::from_secs(provider_request_timeout),
            allow_deprecated: core.allow_deprecated.unwrap_or(false),
            connection_buffer_budget: connection_buffer_budget as usize,
            authenticator: authenticator.auth_type,
            admins,
            providers,
        })
    }
}

fn default_provider_name(type_name: &str) -> String {
    match type_name {
        "MbedCrypto" => "mbed-crypto-provider".into(),
        "Tpm" => "tpm-provider".into(),
        "Pkcs11" => "pkcs11-provider".into(),
        other => format!("{}-provider", other.to_lowercase()),
    }
}

fn feature_of(type_name: &str) -> &'static str {
    match type_name {
        "MbedCrypto" => "mbed-crypto-provider",
        "Tpm" => "tpm-provider",
        "Pkcs11" => "pkcs11-provider",
        _ => "(none: this service does not implement it)",
    }
}

/// The provider types compiled into this binary.
pub fn built_in_providers() -> Vec<&'static str> {
    [
        #[cfg(feature = "mbed-crypto-provider")]
        "MbedCrypto",
        #[cfg(feature = "tpm-provider")]
        "Tpm",
        #[cfg(feature = "pkcs11-provider")]
        "Pkcs11",
    ]
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_file_text("test.toml", text, &Overrides::default())
    }

    const GOOD: &str = r#"
[core_settings]
log_level = "info"
thread_pool_size = 8

[listener]
listener_type = "DomainSocket"
timeout = 200
socket_path = "/tmp/p.sock"

[authenticator]
auth_type = "Direct"
admins = [ { name = "root-app" } ]

[[key_manager]]
name = "sqlite-manager"
manager_type = "SQLite"
sqlite_db_path = "/tmp/kim.sqlite3"

[[provider]]
provider_type = "MbedCrypto"
key_info_manager = "sqlite-manager"
"#;

    #[test]
    fn upstream_layout_is_accepted() {
        let config = parse(GOOD).unwrap();
        assert_eq!(config.log_level, LevelFilter::Info);
        assert_eq!(config.socket_path, PathBuf::from("/tmp/p.sock"));
        assert_eq!(config.admins, vec!["root-app".to_string()]);
        assert_eq!(config.providers.len(), 1);
        assert_eq!(
            config.providers[0].key_store_dir,
            PathBuf::from("/tmp/kim.sqlite3")
        );
    }

    #[test]
    fn embedded_default_is_valid() {
        parse(EMBEDDED_DEFAULT).unwrap();
    }

    #[test]
    fn unknown_key_names_its_line() {
        let text = GOOD.replace("timeout = 200", "timeout = 200\ncolour = \"blue\"");
        let err = parse(&text).unwrap_err();
        assert_eq!(err.line, Some(9), "{err}");
        assert!(err.message.contains("colour"), "{err}");
        assert!(err.to_string().starts_with("test.toml:9: "), "{err}");
    }

    #[test]
    fn bad_value_says_what_is_expected() {
        let err = parse(&GOOD.replace("\"info\"", "\"loud\"")).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
        assert!(err.message.contains("expected one of"), "{err}");
    }

    #[test]
    fn dangling_key_manager_is_rejected_at_the_provider_line() {
        let err = parse(&GOOD.replace(
            "key_info_manager = \"sqlite-manager\"",
            "key_info_manager = \"nope\"",
        ))
        .unwrap_err();
        assert_eq!(err.line, Some(20), "{err}");
        assert!(err.message.contains("names no [[key_manager]]"), "{err}");
    }

    #[test]
    fn provider_missing_from_build_is_named() {
        // Upstream's Trusted Services provider parses but is never built here.
        let text = GOOD.replace(
            "provider_type = \"MbedCrypto\"",
            "provider_type = \"TrustedService\"",
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("not built into this binary"), "{err}");
        assert!(err.message.contains("does not implement it"), "{err}");
        #[cfg(not(feature = "pkcs11-provider"))]
        {
            let text = GOOD.replace(
                "provider_type = \"MbedCrypto\"",
                "provider_type = \"Pkcs11\"\nlibrary_path = \"/usr/lib/softhsm/libsofthsm2.so\"",
            );
            let err = parse(&text).unwrap_err();
            assert!(err.message.contains("pkcs11-provider"), "{err}");
        }
    }

    #[cfg(feature = "tpm-provider")]
    #[test]
    fn tpm_settings_and_auth_formats() {
        let text = GOOD.replace(
            "provider_type = \"MbedCrypto\"",
            "provider_type = \"Tpm\"\ntcti = \"swtpm:port=2321\"\nowner_hierarchy_auth = \"hex:00ff\"\nendorsement_hierarchy_auth = \"str:tpm\"\nskip_if_no_tpm = true",
        );
        let config = parse(&text).unwrap();
        let ProviderKind::Tpm(tpm) = &config.providers[0].kind else {
            panic!("not a TPM provider: {:?}", config.providers[0].kind);
        };
        assert_eq!(tpm.tcti, "swtpm:port=2321");
        assert_eq!(tpm.owner_hierarchy_auth.bytes(), &[0x00, 0xff]);
        assert_eq!(tpm.endorsement_hierarchy_auth.bytes(), b"tpm");
        assert!(tpm.skip_if_no_tpm);
        // Never printed, even in debug output.
        assert!(!format!("{:?}", config.providers[0]).contains("tpm\""));
        let bad = text.replace("hex:00ff", "hex:0g");
        let err = parse(&bad).unwrap_err();
        assert!(err.message.contains("owner_hierarchy_auth"), "{err}");
        assert!(err.line.is_some(), "{err}");
        let default = GOOD.replace("provider_type = \"MbedCrypto\"", "provider_type = \"Tpm\"");
        let ProviderKind::Tpm(tpm) = &parse(&default).unwrap().providers[0].kind else {
            panic!()
        };
        assert_eq!(tpm.tcti, "device:/dev/tpmrm0");
        assert!(tpm.owner_hierarchy_auth.bytes().is_empty());
    }

    #[test]
    fn non_numeric_admin_with_peer_credentials_is_accepted_with_a_warning() {
        let text = GOOD.replace(
            "auth_type = \"Direct\"",
            "auth_type = \"UnixPeerCredentials\"",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.admins, vec!["root-app".to_string()]);
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        assert!(config.warnings[0].contains("\"root-app\" is not a UID"));
    }

    #[test]
    fn overrides_replace_paths() {
        let overrides = Overrides {
            socket_path: Some("/x/s.sock".into()),
            store_dir: Some("/x/store".into()),
            allow_root: false,
        };
        let config = Config::from_file_text("t", GOOD, &overrides).unwrap();
        assert_eq!(config.socket_path, PathBuf::from("/x/s.sock"));
        assert_eq!(config.providers[0].key_store_dir, PathBuf::from("/x/store"));
        assert_eq!(
            config.providers[0].kind,
            ProviderKind::MbedCrypto {
                storage_dir: "/x/store/mbed-crypto".into(),
                upstream_key_dir: start_dir().to_path_buf(),
            }
        );
    }

    #[test]
    fn zero_timeout_is_rejected() {
        let err = parse(&GOOD.replace("timeout = 200", "timeout = 0")).unwrap_err();
        assert!(err.message.contains("listener.timeout"), "{err}");
    }

    #[test]
    fn provider_request_timeout_is_seconds_from_1_to_a_day() {
        let core = "[core_settings]\nlog_level = \"info\"\n";
        let with = |v: &str| GOOD.replace(core, &format!("{core}provider_request_timeout = {v}\n"));
        assert_eq!(
            parse(&with("7")).unwrap().provider_request_timeout,
            Duration::from_secs(7)
        );
        assert_eq!(
            parse(GOOD).unwrap().provider_request_timeout,
            Duration::from_secs(DEFAULT_PROVIDER_REQUEST_TIMEOUT)
        );
        for bad in ["0", "86401"] {
            let err = parse(&with(bad)).unwrap_err();
            assert!(err.message.contains("provider_request_timeout"), "{err}");
        }
    }

    #[test]
    fn pins_are_read_as_upstream_reads_them() {
        let pin = |v: &str| HierarchyAuth::parse_pin(v).bytes().to_vec();
        assert_eq!(pin("123456"), b"123456");
        assert_eq!(pin("hex:31323334"), b"1234");
        assert_eq!(pin("str:hex:1100220033"), b"hex:1100220033");
        // Not hex: taken whole, prefix included, as upstream does.
        assert_eq!(pin("hex:12zz"), b"hex:12zz");
        assert_eq!(pin("hex:+1"), b"hex:+1");
        // Bytes that are not UTF-8 become U+FFFD, as upstream's String::from_utf8_lossy.
        assert_eq!(pin("hex:ff"), "\u{FFFD}".as_bytes());
        assert_eq!(pin(""), b"");
    }

    #[test]
    fn allow_deprecated_is_read_and_off_by_default() {
        assert!(!parse(GOOD).unwrap().allow_deprecated);
        let on = GOOD.replace(
            "thread_pool_size = 8\n",
            "thread_pool_size = 8\nallow_deprecated = true\n",
        );
        assert!(parse(&on).unwrap().allow_deprecated);
    }

    #[test]
    fn database_path_is_accepted_and_not_read_as_upstream() {
        let text = GOOD.replace(
            "sqlite_db_path = \"/tmp/kim.sqlite3\"\n",
            "database_path = \"./kim-mappings/sqlite/sqlite-key-info-manager.sqlite3\"\n",
        );
        let config = parse(&text).unwrap();
        assert_eq!(
            config.providers[0].key_store_dir,
            PathBuf::from("/var/lib/parsec/kim-mappings/sqlite/sqlite-key-info-manager.sqlite3")
        );
        assert!(
            config
                .warnings
                .iter()
                .any(|w| w.contains("database_path is not read")),
            "{:?}",
            config.warnings
        );
    }

    #[cfg(feature = "pkcs11-provider")]
    #[test]
    fn a_serial_number_wins_over_a_slot_number_as_upstream() {
        let table = "[[provider]]\nprovider_type = \"Pkcs11\"\nkey_info_manager = \"sqlite-manager\"\nlibrary_path = \"/usr/lib/softhsm/libsofthsm2.so\"\nuser_pin = \"hex:31323334\"\n";
        let token_of = |extra: &str| {
            let config = parse(&format!("{GOOD}\n{table}{extra}")).unwrap();
            let ProviderKind::Pkcs11(p) = &config.providers[1].kind else {
                panic!("not PKCS#11");
            };
            assert_eq!(p.user_pin.bytes(), b"1234");
            (p.token.clone(), config.warnings)
        };
        let (token, warnings) = token_of("slot_number = 12345678\nserial_number = \"abc\"\n");
        assert_eq!(token, TokenSelector::Serial("abc".into()));
        assert!(warnings
            .iter()
            .any(|w| w.contains("slot_number = 12345678 is not used")));
        assert_eq!(token_of("slot_number = 7\n").0, TokenSelector::Slot(7));
        assert_eq!(token_of("").0, TokenSelector::Only);
    }
}
