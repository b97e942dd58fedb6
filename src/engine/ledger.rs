//! What the operator last wrote per instance, as hashes: enough to tell a
//! runtime install from drift without keeping any rendered value (which may
//! hold a secret).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::engine::envdir::Seen;
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
    /// The files as a full pass last found them holding exactly this render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<Seen>,
}

/// Salted SHA-256 over canonical JSON. The salt is per database, so a hash
/// cannot be looked up in a precomputed table.
#[derive(Clone, Debug)]
pub struct Hasher {
    salt: Vec<u8>,
    /// SHA-256 having taken the salt: every hash starts from a copy.
    salted: Sha256,
}

impl Hasher {
    /// A hasher with the database's salt.
    pub fn new(salt: Vec<u8>) -> Hasher {
        let mut salted = Sha256::new();
        salted.update(&salt);
        Hasher { salt, salted }
    }

    /// The salt, to be sealed again when the master key rotates.
    pub fn salt(&self) -> &[u8] {
        &self.salt
    }

    /// Hash of one entry's value.
    pub fn entry(&self, value: &Value) -> String {
        let mut h = self.salted.clone();
        h.update(canonical(value));
        hex_digest(h)
    }

    /// Hash over all owned keys as rendered, each given as its entries in
    /// name order (what a `BTreeMap` yields): the same hash as of each key's
    /// object, without building the object.
    pub fn content<'a, E>(&self, sections: impl IntoIterator<Item = (Section, E)>) -> String
    where
        E: IntoIterator<Item = (&'a String, &'a Value)>,
    {
        const WRITES: &str = "writing to memory does not fail";
        // Made whole, then hashed at once: the hasher's cost is per write,
        // and canonical JSON is written a token at a time.
        let mut text = Vec::with_capacity(4096);
        for (s, entries) in sections {
            text.extend_from_slice(s.key().as_bytes());
            text.push(b'{');
            for (i, (name, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    text.push(b',');
                }
                serde_json::to_writer(&mut text, name).expect(WRITES);
                text.push(b':');
                canonical_to(value, &mut text);
            }
            text.push(b'}');
        }
        let mut h = self.salted.clone();
        h.update(&text);
        hex_digest(h)
    }
}

/// The digest in lowercase hex, without going through a char iterator
/// (a pass hashes every entry of every instance).
fn hex_digest(h: Sha256) -> String {
    let mut out = [0u8; 64];
    hex::encode_to_slice(h.finalize(), &mut out).expect("64 hex digits for 32 bytes");
    String::from_utf8(out.to_vec()).expect("hex digits are ASCII")
}

/// Compact JSON with object keys sorted, so a value hashes the same however
/// its keys were ordered.
pub fn canonical(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    canonical_to(v, &mut out);
    out
}

/// [`canonical`], appended to `out`.
fn canonical_to(v: &Value, out: &mut Vec<u8>) {
    const WRITES: &str = "writing to memory does not fail";
    match v {
        Value::Object(m) => {
            // Pairs, not keys looked up again after sorting: an object's
            // keys are hashed, and every entry of every render passes here.
            let mut pairs: Vec<(&String, &Value)> = m.iter().collect();
            if !pairs.is_sorted_by_key(|(k, _)| *k) {
                pairs.sort_unstable_by_key(|(k, _)| *k);
            }
            out.push(b'{');
            for (i, (k, v)) in pairs.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect(WRITES);
                out.push(b':');
                canonical_to(v, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_to(x, out);
            }
            out.push(b']');
        }
        other => serde_json::to_writer(&mut *out, other).expect(WRITES),
    }
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
