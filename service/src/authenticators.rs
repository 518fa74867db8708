//! Who is asking: turns a request's auth field (and the socket's peer credentials) into an
//! application name, the namespace its keys live in.

use crate::config::AuthenticatorKind;
use crate::error::OpError;
use crate::key_store::AppId;
use parsec_interface::operations::list_authenticators::AuthenticatorInfo;
use parsec_interface::requests::request::RequestAuth;
use parsec_interface::requests::{AuthType, ResponseStatus};
use parsec_interface::secrecy::ExposeSecret;

/// The credentials the kernel vouches for, read from the socket when it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCredentials {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    /// The authenticator that vouched for the name: part of whose keys are whose.
    pub auth: AuthType,
    pub is_admin: bool,
}

impl Application {
    /// The key store's name for the application (its keys' namespace).
    pub fn id(&self) -> AppId {
        AppId::new(self.auth, &self.name)
    }
}

pub struct Authenticator {
    kind: AuthenticatorKind,
    admins: Vec<String>,
}

impl Authenticator {
    pub fn new(kind: AuthenticatorKind, admins: Vec<String>) -> Self {
        Authenticator { kind, admins }
    }

    pub fn auth_type(&self) -> AuthType {
        self.kind.auth_type()
    }

    pub fn info(&self) -> AuthenticatorInfo {
        let description = match self.kind {
            AuthenticatorKind::Direct => {
                "Direct authenticator: the application name is taken from the request, without verification"
            }
            _ => "Unix peer credentials authenticator: the application is the UID the kernel reports for the socket's peer",
        };
        AuthenticatorInfo {
            description: description.into(),
            version_maj: 0,
            version_min: 1,
            version_rev: 0,
            id: self.auth_type(),
        }
    }

    /// Authenticates a request that names this authenticator in its header.
    pub fn authenticate(
        &self,
        auth: &RequestAuth,
        peer: Option<PeerCredentials>,
    ) -> Result<Application, OpError> {
        let bytes = auth.buffer.expose_secret();
        let name = match self.kind {
            AuthenticatorKind::Direct => {
                if bytes.is_empty() {
                    return Err(OpError::new(
                        ResponseStatus::AuthenticationError,
                        "empty application name",
                        "with Direct authentication the auth field carries the application name",
                    ));
                }
                std::str::from_utf8(bytes)
                    .map_err(|_| {
                        OpError::new(
                            ResponseStatus::AuthenticationError,
                            "application name is not UTF-8",
                            "application names must be UTF-8",
                        )
                    })?
                    .to_string()
            }
            AuthenticatorKind::UnixPeerCredentials | AuthenticatorKind::JwtSvid => {
                let claimed: [u8; 4] = bytes.as_slice().try_into().map_err(|_| {
                    OpError::new(
                        ResponseStatus::AuthenticationError,
                        format!("auth field of {} bytes", bytes.len()),
                        "UnixPeerCredentials expects the caller's UID as 4 little-endian bytes",
                    )
                })?;
                let claimed = u32::from_le_bytes(claimed);
                let peer = peer.ok_or_else(|| {
                    OpError::new(
                        ResponseStatus::AuthenticationError,
                        "the socket's peer credentials could not be read",
                        "SO_PEERCRED failed on this connection",
                    )
                })?;
                if claimed != peer.uid {
                    return Err(OpError::new(
                        ResponseStatus::AuthenticationError,
                        format!(
                            "claimed UID {claimed}, socket peer is UID {} (pid {})",
                            peer.uid, peer.pid
                        ),
                        "a client may only speak for its own UID",
                    ));
                }
                claimed.to_string()
            }
        };
        let is_admin = self.admins.contains(&name);
        Ok(Application {
            name,
            auth: self.auth_type(),
            is_admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32) -> Option<PeerCredentials> {
        Some(PeerCredentials {
            uid,
            gid: uid,
            pid: 1,
        })
    }

    #[test]
    fn direct_takes_the_name_and_knows_admins() {
        let auth = Authenticator::new(AuthenticatorKind::Direct, vec!["boss".into()]);
        let app = auth
            .authenticate(&RequestAuth::new(b"boss".to_vec()), None)
            .unwrap();
        assert_eq!(
            app,
            Application {
                name: "boss".into(),
                auth: AuthType::Direct,
                is_admin: true
            }
        );
        let app = auth
            .authenticate(&RequestAuth::new(b"worker".to_vec()), None)
            .unwrap();
        assert!(!app.is_admin);
        assert!(auth.authenticate(&RequestAuth::new(vec![]), None).is_err());
        assert!(auth
            .authenticate(&RequestAuth::new(vec![0xff, 0xfe]), None)
            .is_err());
    }

    #[test]
    fn peer_credentials_must_match_the_claim() {
        let auth = Authenticator::new(AuthenticatorKind::UnixPeerCredentials, vec!["0".into()]);
        let uid_1000 = RequestAuth::new(1000u32.to_le_bytes().to_vec());
        assert_eq!(
            auth.authenticate(&uid_1000, peer(1000)).unwrap().name,
            "1000"
        );
        let err = auth.authenticate(&uid_1000, peer(1001)).unwrap_err();
        assert_eq!(err.status, ResponseStatus::AuthenticationError);
        assert!(auth
            .authenticate(&RequestAuth::new(vec![1, 2]), peer(1))
            .is_err());
        assert!(auth.authenticate(&uid_1000, None).is_err());
        let root = RequestAuth::new(0u32.to_le_bytes().to_vec());
        assert!(auth.authenticate(&root, peer(0)).unwrap().is_admin);
    }
}
