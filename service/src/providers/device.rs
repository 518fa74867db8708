//! The connection to a device that can go away (a TPM simulator restarted, a resource manager
//! gone, a token pulled out) and come back: one piece of code for the TPM and PKCS#11
//! providers. A call that finds the connection lost marks it broken; the request then
//! reopens it and runs once more, and a later request reopens it if that failed too.

use crate::error::OpError;

/// What a device connection tells about itself.
pub trait Link {
    /// A call found the device gone: the connection must be opened again.
    fn broken(&self) -> bool;
}

/// A provider's connection to its device: opened on first use, reopened when broken,
/// dropped on request (a reload).
pub struct Device<C> {
    conn: Option<C>,
    /// How the log names the device ("tpm: the TPM through \"device:/dev/tpmrm0\"").
    name: String,
}

impl<C: Link> Device<C> {
    pub fn new(name: String, conn: Option<C>) -> Device<C> {
        Device { conn, name }
    }

    /// The open connection, reopened with `open` if it was lost or closed.
    pub fn get(&mut self, open: impl FnOnce() -> Result<C, OpError>) -> Result<&mut C, OpError> {
        if self.conn.as_ref().is_some_and(Link::broken) {
            log::warn!("{}: the connection was lost; reconnecting", self.name);
            self.conn = None;
        }
        if self.conn.is_none() {
            let conn = open()?;
            self.conn = Some(conn);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    pub fn is_broken(&self) -> bool {
        self.conn.as_ref().is_some_and(Link::broken)
    }

    /// The connection if it is open, without reopening it.
    #[cfg_attr(not(feature = "tpm-provider"), allow(dead_code))]
    pub fn open_now(&mut self) -> Option<&mut C> {
        self.conn.as_mut()
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Runs `f`; if it failed because the device's connection was lost, runs it once more (the
/// second run reopens the connection).
pub fn retry_once<P, T>(
    provider: &mut P,
    lost: impl Fn(&P) -> bool,
    name: impl Fn(&P) -> String,
    mut f: impl FnMut(&mut P) -> Result<T, OpError>,
) -> Result<T, OpError> {
    match f(provider) {
        Err(e) if lost(provider) => {
            log::warn!("{}: {e}; reconnecting and trying once more", name(provider));
            f(provider)
        }
        other => other,
    }
}
