//! The blob the key store keeps for a TPM key: a version byte, then the key's public area
//! and its wrapped private area (empty for a public key), each with a 16-bit length.

use super::*;

/// Version byte of the blobs this provider writes into the key store.
pub(super) const BLOB_VERSION: u8 = 1;

/// A stored key: its public area and, unless it is a public key, its wrapped private area.
pub(super) struct Blob {
    pub(super) public: Public,
    pub(super) private: Option<Private>,
    /// A key upstream Parsec made: wrapped by upstream's primary, with an authorisation
    /// value of its own (`upstream`).
    pub(super) upstream_auth: Option<Auth>,
}

impl Blob {
    pub(super) fn encode(public: &Public, private: Option<&Private>) -> Result<Vec<u8>, OpError> {
        let public = public
            .marshall()
            .map_err(|e| keys::tss_wrapper("marshalling the public area", e))?;
        let private = private.map(|p| p.value()).unwrap_or(&[]);
        let mut out = Vec::with_capacity(5 + public.len() + private.len());
        out.push(BLOB_VERSION);
        out.extend_from_slice(&(public.len() as u16).to_be_bytes());
        out.extend_from_slice(&public);
        out.extend_from_slice(&(private.len() as u16).to_be_bytes());
        out.extend_from_slice(private);
        Ok(out)
    }

    /// Reads a key store entry's key id; `attributes` are the entry's (an upstream key's
    /// public area is rebuilt from them).
    pub(super) fn decode(bytes: &[u8], attributes: &Attributes) -> Result<Blob, OpError> {
        let damaged = |what: &str| {
            OpError::new(
                ResponseStatus::PsaErrorCorruptionDetected,
                format!("the key store entry's TPM blob is damaged: {what}"),
                "restore the key store entry from a backup, or destroy the key",
            )
        };
        let (&version, rest) = bytes.split_first().ok_or_else(|| damaged("empty"))?;
        if version == crate::key_store::upstream::UPSTREAM_TPM_CONTEXT {
            let key = super::upstream::decode(rest, attributes)?;
            return Ok(Blob {
                public: key.public,
                private: Some(key.private),
                upstream_auth: Some(key.auth),
            });
        }
        if version != BLOB_VERSION {
            return Err(damaged("unknown version"));
        }
        let take = |input: &[u8]| -> Option<(Vec<u8>, usize)> {
            let len = u16::from_be_bytes(input.get(..2)?.try_into().ok()?) as usize;
            Some((input.get(2..2 + len)?.to_vec(), 2 + len))
        };
        let (public, used) = take(rest).ok_or_else(|| damaged("short public area"))?;
        let (private, used2) = take(&rest[used..]).ok_or_else(|| damaged("short private area"))?;
        if used + used2 != rest.len() {
            return Err(damaged("trailing bytes"));
        }
        let public = Public::unmarshall(&public).map_err(|_| damaged("public area"))?;
        let private = if private.is_empty() {
            None
        } else {
            Some(Private::try_from(private).map_err(|_| damaged("private area"))?)
        };
        Ok(Blob {
            public,
            private,
            upstream_auth: None,
        })
    }
}
