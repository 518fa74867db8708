//! The two systemd protocols the service speaks, without libsystemd:
//! socket activation (`LISTEN_PID`, `LISTEN_FDS`: the listening socket arrives as fd 3) and
//! readiness notification (`NOTIFY_SOCKET`: `READY=1`, `RELOADING=1`, `STOPPING=1`).

use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};

/// The first descriptor systemd passes (SD_LISTEN_FDS_START).
const FIRST_FD: RawFd = 3;

/// Takes the listening socket systemd passed, if it passed one to this process.
///
/// The variables are removed so that nothing else (a child, a second call) takes the
/// descriptor again.
pub fn inherited_listener() -> Option<Result<UnixListener, String>> {
    let pid = std::env::var("LISTEN_PID").ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return None; // meant for another process
    }
    match fds.parse::<u32>() {
        Ok(1) => {}
        Ok(n) => {
            return Some(Err(format!(
                "systemd passed {n} sockets: expected exactly one (ListenStream= once in the .socket unit)"
            )))
        }
        Err(_) => return Some(Err(format!("LISTEN_FDS={fds} is not a number"))),
    }
    // The descriptor must be a listening Unix stream socket.
    use nix::sys::socket::{getsockopt, sockopt, SockType};
    // SAFETY: per the socket activation protocol, fd 3 is open and handed to this process
    // (LISTEN_PID matched), and the variables were removed above, so this is the only owner.
    let listener = unsafe { UnixListener::from_raw_fd(FIRST_FD) };
    let checks = (|| -> Result<(), String> {
        let kind = getsockopt(&listener, sockopt::SockType).map_err(|e| e.to_string())?;
        let listening = getsockopt(&listener, sockopt::AcceptConn).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        if kind != SockType::Stream || !listening || addr.as_pathname().is_none() {
            return Err("expected a listening Unix stream socket with a path (ListenStream=/run/parsec/parsec.sock)".into());
        }
        Ok(())
    })();
    Some(
        checks
            .map_err(|e| format!("the socket systemd passed is unusable: {e}"))
            .and_then(|()| {
                listener
                    .set_nonblocking(true)
                    .map_err(|e| format!("cannot make the passed socket non-blocking: {e}"))?;
                Ok(listener)
            }),
    )
}

/// Tells systemd (if it is listening) the service's state; a no-op elsewhere.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
    } else {
        socket.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        log::warn!("sd_notify {state}: {e}");
    }
}
