//! parsec-service: a small, single-threaded Parsec daemon.
//!
//! A tour, in the order a request travels:
//! - [`front_end`]: the Unix socket, the `mio` event loop and the wire framing;
//! - [`dispatcher`]: authentication, core operations and routing to a provider;
//! - [`authenticators`]: who the caller is (Direct, UnixPeerCredentials);
//! - [`providers`]: the cryptography, one folder per provider behind one trait;
//! - [`key_store`]: the crash-safe map from (application, provider, key name) to key;
//! - [`rate_limit`]: one application cannot monopolise the thread;
//! - [`config`] and [`logging`]: how it is set up.

pub mod authenticators;
pub mod config;
pub mod dispatcher;
pub mod error;
pub mod front_end;
pub mod key_store;
pub mod logging;
pub mod migrate;
#[cfg_attr(not(feature = "pkcs11-provider"), allow(dead_code))]
pub mod module_output;
pub mod providers;
pub mod rate_limit;

/// Test builds only (cargo feature `crash-points`, never in a package): the process dies here,
/// with no clean-up (as a `kill -9` would), when `PARSEC_CRASH_AT` names this point. The
/// crash-safety tests stop the service at each step of a key's creation and destruction.
///
/// When `PARSEC_HOLD_AT` names this point (a comma-separated list), the thread that reaches
/// it waits `PARSEC_HOLD_MS` milliseconds (default 1500) there instead: the reload tests
/// send SIGHUP while a worker is held in the middle of a create or a destroy.
#[inline]
pub fn crash_point(name: &str) {
    #[cfg(feature = "crash-points")]
    {
        if std::env::var("PARSEC_CRASH_AT").is_ok_and(|at| at == name) {
            std::process::abort();
        }
        if std::env::var("PARSEC_HOLD_AT").is_ok_and(|at| at.split(',').any(|p| p == name)) {
            let ms = std::env::var("PARSEC_HOLD_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1500);
            log::debug!("held at {name} for {ms} ms (PARSEC_HOLD_AT)");
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = name;
}
