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
pub mod providers;
pub mod rate_limit;
