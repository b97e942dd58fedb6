//! Sealing values at rest: XChaCha20-Poly1305 under a master key that never
//! enters the database.
//!
//! Every sealed value carries the id of the key that sealed it and is bound to
//! where it lives (associated data), so a row copied under another name or
//! namespace fails to open instead of yielding someone else's secret.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Bytes in a master key.
pub const KEY_LEN: usize = 32;
/// Bytes in an XChaCha20 nonce.
pub const NONCE_LEN: usize = 24;
/// Bytes in a Poly1305 tag: the shortest valid ciphertext (empty plaintext).
pub const TAG_LEN: usize = 16;

/// A master key. Never printed: `Debug` shows only its id.
#[derive(Clone)]
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MasterKey({})", self.id)
    }
}

/// A master key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Unreadable.
    #[error("cannot read master key file {}", .path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a key.
    #[error(
        "master key file {} does not hold a key: expected 32 bytes as base64 (what `agent-env secret keygen` prints), 64 hex digits, or 32 raw bytes",
        .path.display()
    )]
    Format {
        /// The file.
        path: std::path::PathBuf,
    },
}

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> MasterKey {
        MasterKey::from_bytes(XChaCha20Poly1305::generate_key(&mut OsRng).into())
    }

    /// A key from its bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> MasterKey {
        // The id names the key in rows and messages without revealing it.
        let mut h = Sha256::new();
        h.update(b"agent-env master key id v1\0");
        h.update(bytes);
        let id = hex::encode(&h.finalize()[..8]);
        MasterKey {
            bytes: Zeroizing::new(bytes),
            id,
        }
    }

    /// Parses a key file's contents: base64 or hex text (surrounding
    /// whitespace ignored), or exactly 32 raw bytes.
    pub fn parse(contents: &[u8]) -> Option<MasterKey> {
        let text = std::str::from_utf8(contents).ok().map(str::trim);
        let decoded = text.and_then(|t| {
            let t = t.as_bytes();
            if t.len() == 2 * KEY_LEN {
                hex::decode(t).ok()
            } else {
                base64::engine::general_purpose::STANDARD.decode(t).ok()
            }
        });
        let bytes = Zeroizing::new(match decoded {
            Some(d) if d.len() == KEY_LEN => d,
            _ if contents.len() == KEY_LEN => contents.to_vec(),
            _ => return None,
        });
        let mut key = [0u8; KEY_LEN];
        key.copy_from_slice(&bytes);
        let key = MasterKey::from_bytes(key);
        Some(key)
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<MasterKey, KeyError> {
        let contents = Zeroizing::new(std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?);
        MasterKey::parse(&contents).ok_or_else(|| KeyError::Format {
            path: path.to_owned(),
        })
    }

    /// The key as base64 text, for a key file.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(*self.bytes))
    }

    /// The key's id: a short hash, safe to show and store.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&*self.bytes).into())
    }
}

/// A sealed value as stored: key id, nonce, ciphertext with tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sealed {
    /// Id of the key that sealed it.
    pub key_id: String,
    /// The random nonce used.
    pub nonce: Vec<u8>,
    /// Ciphertext followed by the tag.
    pub ciphertext: Vec<u8>,
}

/// A sealed value could not be opened. Never yields partial plaintext.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// Sealed under a key that was not given.
    #[error(
        "sealed with master key {row_key}, but the key(s) given are {}: pass the right --master-key-file (or the old one as --previous-master-key-file while rotating)",
        .have.join(", ")
    )]
    UnknownKey {
        /// The row's key id.
        row_key: String,
        /// Ids of the keys given.
        have: Vec<String>,
    },
    /// Nonce or ciphertext too short: the row was cut.
    #[error("sealed value is truncated ({what} is {len} bytes)")]
    Truncated {
        /// Which part.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// Authentication failed: altered, or moved to another name or namespace.
    #[error(
        "sealed value failed authentication: it was altered or copied from another name or namespace"
    )]
    Tampered,
}

/// The keys in use: the first seals, all of them open (by key id), so values
/// sealed with a previous key stay readable while a rotation is under way.
#[derive(Clone, Debug)]
pub struct Keyring {
    keys: Vec<MasterKey>,
}

impl Keyring {
    /// A keyring sealing with `current` and also opening with `previous`.
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Keyring {
        let mut keys = vec![current];
        keys.extend(previous);
        Keyring { keys }
    }

    /// The same keyring, also opening values sealed with `key`.
    pub fn also_opening(mut self, key: &MasterKey) -> Keyring {
        if !self.keys.iter().any(|k| k.id == key.id) {
            self.keys.push(key.clone());
        }
        self
    }

    /// The key that seals.
    pub fn current(&self) -> &MasterKey {
        &self.keys[0]
    }

    /// Seals `plaintext` for the place `aad` names, with a fresh random nonce.
    pub fn seal(&self, aad: &Aad, plaintext: &[u8]) -> Sealed {
        let key = self.current();
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = key
            .cipher()
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad.0,
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length this store holds");
        Sealed {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        }
    }

    /// Opens a sealed value stored at the place `aad` names.
    pub fn open(&self, aad: &Aad, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| CryptoError::UnknownKey {
                row_key: sealed.key_id.clone(),
                have: self.keys.iter().map(|k| k.id.clone()).collect(),
            })?;
        if sealed.nonce.len() != NONCE_LEN {
            return Err(CryptoError::Truncated {
                what: "nonce",
                len: sealed.nonce.len(),
            });
        }
        if sealed.ciphertext.len() < TAG_LEN {
            return Err(CryptoError::Truncated {
                what: "ciphertext",
                len: sealed.ciphertext.len(),
            });
        }
        let nonce: [u8; NONCE_LEN] = sealed.nonce[..].try_into().expect("length checked");
        key.cipher()
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad: &aad.0,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Tampered)
    }
}

/// Associated data: where a sealed value lives. Each part is length-prefixed
/// so no two different places encode the same.
pub struct Aad(Vec<u8>);

impl Aad {
    fn new(kind: &str, parts: &[&str]) -> Aad {
        let mut out = Vec::new();
        for p in std::iter::once(&kind).chain(parts) {
            out.extend_from_slice(&(p.len() as u64).to_be_bytes());
            out.extend_from_slice(p.as_bytes());
        }
        Aad(out)
    }

    /// A secret of the encrypted store.
    pub fn secret(namespace: &str, name: &str) -> Aad {
        Aad::new("agent-env secret v1", &[namespace, name])
    }

    /// A per-database value of the `meta` table.
    pub fn meta(key: &str) -> Aad {
        Aad::new("agent-env meta v1", &[key])
    }

    /// A runtime-installed entry of an instance.
    pub fn installed(namespace: &str, name: &str, section: &str, entry: &str) -> Aad {
        Aad::new("agent-env installed v1", &[namespace, name, section, entry])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> Keyring {
        Keyring::new(MasterKey::generate(), None)
    }

    #[test]
    fn round_trip_with_a_fresh_nonce_each_time() {
        let r = ring();
        let aad = Aad::secret("dev", "TOKEN");
        let a = r.seal(&aad, b"hunter2");
        let b = r.seal(&aad, b"hunter2");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(&**r.open(&aad, &a).unwrap(), b"hunter2");
        assert_eq!(a.key_id, r.current().id());
    }

    #[test]
    fn tampering_moving_and_cutting_are_refused() {
        let r = ring();
        let sealed = r.seal(&Aad::secret("dev", "TOKEN"), b"hunter2");
        let mut flipped = sealed.clone();
        flipped.ciphertext[0] ^= 1;
        assert_eq!(
            r.open(&Aad::secret("dev", "TOKEN"), &flipped),
            Err(CryptoError::Tampered)
        );
        for other in [Aad::secret("prod", "TOKEN"), Aad::secret("dev", "OTHER")] {
            assert_eq!(r.open(&other, &sealed), Err(CryptoError::Tampered));
        }
        // Same bytes under another kind of row.
        assert_eq!(
            r.open(&Aad::installed("dev", "TOKEN", "", ""), &sealed),
            Err(CryptoError::Tampered)
        );
        let mut cut = sealed.clone();
        cut.ciphertext.truncate(TAG_LEN - 1);
        assert!(matches!(
            r.open(&Aad::secret("dev", "TOKEN"), &cut),
            Err(CryptoError::Truncated {
                what: "ciphertext",
                ..
            })
        ));
        let mut cut = sealed;
        cut.nonce.pop();
        assert!(matches!(
            r.open(&Aad::secret("dev", "TOKEN"), &cut),
            Err(CryptoError::Truncated { what: "nonce", .. })
        ));
    }

    #[test]
    fn wrong_key_names_both_ids_and_previous_key_opens() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let aad = Aad::secret("dev", "TOKEN");
        let sealed = Keyring::new(old.clone(), None).seal(&aad, b"v");
        let err = Keyring::new(new.clone(), None)
            .open(&aad, &sealed)
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains(old.id()) && text.contains(new.id()), "{text}");
        // A key with the same id but other bytes cannot exist, but a forged id
        // must still fail authentication rather than decrypt garbage.
        let mut forged = sealed.clone();
        forged.key_id = new.id().to_owned();
        assert_eq!(
            Keyring::new(new.clone(), None).open(&aad, &forged),
            Err(CryptoError::Tampered)
        );
        let both = Keyring::new(new, Some(old));
        assert_eq!(&**both.open(&aad, &sealed).unwrap(), b"v");
    }

    #[test]
    fn key_files_in_every_documented_form() {
        let k = MasterKey::generate();
        let b64 = format!("{}\n", &*k.encode());
        assert_eq!(MasterKey::parse(b64.as_bytes()).unwrap().id(), k.id());
        let hex_text = hex::encode(*k.bytes);
        assert_eq!(MasterKey::parse(hex_text.as_bytes()).unwrap().id(), k.id());
        assert_eq!(MasterKey::parse(&*k.bytes).unwrap().id(), k.id());
        assert!(MasterKey::parse(b"too short").is_none());
        assert!(MasterKey::parse(b"").is_none());
        assert!(!format!("{k:?}").contains(&*k.encode()));
    }
}
