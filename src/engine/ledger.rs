//! What the operator last wrote per instance, as hashes: enough to tell a
//! runtime install from drift without keeping any rendered value (which may
//! hold a secret).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::engine::section::{PerSection, Section};
use crate::time::Timestamp;

/// One written entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Written from the installed set rather than a declared layer.
    pub installed: bool,
    /// Salted hash of the value as written.
    pub hash: String,
}

/// The last render of one instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    /// Entries per owned key.
    pub entries: PerSection<BTreeMap<String, LedgerEntry>>,
    /// Hash over every owned key as written.
    pub content_hash: String,
    /// When it was written or last confirmed.
    pub written_at: Timestamp,
}

/// Salted SHA-256 over canonical JSON. The salt is per database, so a hash
/// cannot be looked up in a precomputed table.
#[derive(Clone, Debug)]
pub struct Hasher {
    salt: Vec<u8>,
}

impl Hasher {
    /// A hasher with the database's salt.
    pub fn new(salt: Vec<u8>) -> Hasher {
        Hasher { salt }
    }

    /// The salt, to be sealed again when the master key rotates.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Hash of one entry's value.
    pub fn entry(&self, value: &Value) -> String {
        let mut h = Sha256::new();
        h.update(&self.salt);
        h.update(canonical(value));
        hex::encode(h.finalize())
    }

    /// Hash over all owned keys as rendered.
    pub fn content<'a>(&self, sections: impl IntoIterator<Item = (Section, &'a Value)>) -> String {
        let mut h = Sha256::new();
        h.update(&self.salt);
        for (s, v) in sections {
            h.update(s.key().as_bytes());
            h.update(canonical(v));
        }
        hex::encode(h.finalize())
    }
}

/// JSON with object keys sorted at every level, so equal values hash equally
/// whatever order their keys were written in.
pub fn canonical(v: &Value) -> Vec<u8> {
    fn write(v: &Value, out: &mut Vec<u8>) {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push(b'{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    serde_json::to_writer(&mut *out, k).expect("strings serialize");
                    out.push(b':');
                    write(&m[k], out);
                }
                out.push(b'}');
            }
            Value::Array(a) => {
                out.push(b'[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write(x, out);
                }
                out.push(b']');
            }
            other => serde_json::to_writer(&mut *out, other).expect("scalars serialize"),
        }
    }
    let mut out = Vec::new();
    write(v, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_change_the_hash_but_the_salt_does() {
        let h = Hasher::new(b"salt".to_vec());
        let a: Value =
            serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":[1,{"x":1,"y":2}]}}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"b":{"d":[1,{"y":2,"x":1}],"c":2},"a":1}"#).unwrap();
        assert_eq!(h.entry(&a), h.entry(&b));
        assert_ne!(h.entry(&a), Hasher::new(b"other".to_vec()).entry(&a));
        assert_ne!(h.entry(&json!(true)), h.entry(&json!(false)));
    }
}
