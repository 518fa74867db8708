//! The front end: the socket, the event loop and the wire framing.
//!
//! Data flows one way: `server` accepts a connection, `connection` reads one frame without
//! blocking, `framing` checks and decodes it, the dispatcher answers, and `connection`
//! writes the response back before the socket is closed.

pub mod connection;
pub mod framing;
pub mod server;
pub mod systemd;
