//! How ledger entries are kept in a row: compact text, so that an
//! instance's ledger row fits on one database page.
//!
//! An entry whose hash is a SHA-256 in hex (every hash the engine makes) is
//! stored as one string, `d` (declared) or `i` (installed) followed by the
//! 32 bytes in unpadded URL-safe base64: 44 characters where the object
//! `{"installed":false,"hash":"<64 hex digits>"}` took 92. Any other hash
//! keeps that object form, and rows written before the compact form read
//! as they always did, so no migration rewrites a database: a row takes
//! the compact form the next time its instance is written.
//!
//! At a few dozen entries per instance the object form made a row of about
//! 4 KB, just past what SQLite keeps on a row's own page: every ledger read
//! followed an overflow page, and every save logged two.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use super::LedgerEntries;
use crate::engine::ledger::LedgerEntry;
use crate::engine::section::Section;

/// `entries` as the text of a row.
pub(super) fn to_text(entries: &LedgerEntries) -> String {
    serde_json::to_string(&Stored(entries)).expect("ledger entries serialize")
}

/// Entries from the text of a row, in either form.
pub(super) fn from_text(text: &str) -> Result<LedgerEntries, serde_json::Error> {
    serde_json::from_str::<Loaded>(text).map(|l| l.0)
}

/// A SHA-256 in hex, as its 32 bytes.
fn digest_bytes(hash: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    let lowercase = hash.bytes().all(|b| !b.is_ascii_uppercase());
    (lowercase && hex::decode_to_slice(hash, &mut bytes).is_ok()).then_some(bytes)
}

struct Stored<'a>(&'a LedgerEntries);

impl Serialize for Stored<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(Section::ALL.len()))?;
        for (section, entries) in self.0.iter() {
            map.serialize_entry(section.key(), &StoredSection(entries))?;
        }
        map.end()
    }
}

struct StoredSection<'a>(&'a BTreeMap<String, LedgerEntry>);

impl Serialize for StoredSection<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, entry) in self.0 {
            map.serialize_entry(name, &StoredEntry(entry))?;
        }
        map.end()
    }
}

struct StoredEntry<'a>(&'a LedgerEntry);

impl Serialize for StoredEntry<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some(bytes) = digest_bytes(&self.0.hash) else {
            return self.0.serialize(s);
        };
        let mut text = String::with_capacity(44);
        text.push(if self.0.installed { 'i' } else { 'd' });
        URL_SAFE_NO_PAD.encode_string(bytes, &mut text);
        s.serialize_str(&text)
    }
}

struct Loaded(LedgerEntries);

impl<'de> Deserialize<'de> for Loaded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Sections;
        impl<'de> Visitor<'de> for Sections {
            type Value = LedgerEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("ledger entries per owned key")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = LedgerEntries::default();
                while let Some(key) = map.next_key::<String>()? {
                    // Keys it does not know are skipped, as they always were.
                    match Section::from_key(&key) {
                        Some(section) => out[section] = map.next_value::<LoadedSection>()?.0,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(Sections).map(Loaded)
    }
}

struct LoadedSection(BTreeMap<String, LedgerEntry>);

impl<'de> Deserialize<'de> for LoadedSection {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = BTreeMap<String, LedgerEntry>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("ledger entries by name")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // Rows hold names in order: gathered, then built in one go
                // rather than inserted one by one.
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(name) = map.next_key::<String>()? {
                    let LoadedEntry(entry) = map.next_value()?;
                    out.push((name, entry));
                }
                Ok(BTreeMap::from_iter(out))
            }
        }
        d.deserialize_map(Entries).map(LoadedSection)
    }
}

struct LoadedEntry(LedgerEntry);

impl<'de> Deserialize<'de> for LoadedEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> Visitor<'de> for Entry {
            type Value = LedgerEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a ledger entry: `d` or `i` and a base64 digest, or an object")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LedgerEntry, E> {
                let bad = || E::invalid_value(de::Unexpected::Str(v), &self);
                let installed = match v.as_bytes().first() {
                    Some(b'd') => false,
                    Some(b'i') => true,
                    _ => return Err(bad()),
                };
                let mut bytes = [0u8; 32];
                match URL_SAFE_NO_PAD.decode_slice(&v[1..], &mut bytes) {
                    Ok(32) => {}
                    _ => return Err(bad()),
                }
                // Into a buffer, not through `hex::encode`'s char iterator:
                // a pass reads every entry of every instance.
                let mut digits = [0u8; 64];
                hex::encode_to_slice(bytes, &mut digits).expect("64 digits for 32 bytes");
                let hash = std::str::from_utf8(&digits).expect("hex digits are ASCII");
                Ok(LedgerEntry {
                    installed,
                    hash: hash.to_owned(),
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<LedgerEntry, A::Error> {
                LedgerEntry::deserialize(de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_any(Entry).map(LoadedEntry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ledger::Hasher;
    use serde_json::{Value, json};

    fn entry(installed: bool, hash: &str) -> LedgerEntry {
        LedgerEntry {
            installed,
            hash: hash.into(),
        }
    }

    #[test]
    fn engine_hashes_are_stored_compact_and_read_back_the_same() {
        let h = Hasher::new(b"salt".to_vec());
        let mut entries = LedgerEntries::default();
        entries
            .plugins
            .insert("a@m".into(), entry(false, &h.entry(&json!(true))));
        entries
            .mcp_servers
            .insert("docs".into(), entry(true, &h.entry(&json!({"url": "u"}))));
        let text = to_text(&entries);
        let stored: Value = serde_json::from_str(&text).unwrap();
        let plugin = stored["enabledPlugins"]["a@m"].as_str().unwrap();
        assert!(plugin.starts_with('d') && plugin.len() == 44, "{plugin}");
        assert!(
            stored["mcpServers"]["docs"]
                .as_str()
                .unwrap()
                .starts_with('i')
        );
        assert_eq!(from_text(&text).unwrap(), entries);
        // Little more than half of the object form, names included.
        let old = serde_json::to_string(&entries).unwrap();
        let empty = to_text(&LedgerEntries::default()).len();
        assert_eq!(
            empty,
            serde_json::to_string(&LedgerEntries::default())
                .unwrap()
                .len()
        );
        assert!(
            (text.len() - empty) * 5 < (old.len() - empty) * 3,
            "{text} vs {old}"
        );
    }

    #[test]
    fn rows_in_the_object_form_and_hashes_of_any_other_shape_read_as_written() {
        let mut entries = LedgerEntries::default();
        let hex = "ab".repeat(32);
        entries.plugins.insert("a@m".into(), entry(false, &hex));
        entries
            .plugins
            .insert("b@m".into(), entry(true, "not-a-digest"));
        entries
            .marketplaces
            .insert("m".into(), entry(false, &"AB".repeat(32)));
        // Rows as they were written before the compact form.
        let old = serde_json::to_string(&entries).unwrap();
        assert_eq!(from_text(&old).unwrap(), entries);
        // A hash that is not lowercase hex keeps the object form.
        let text = to_text(&entries);
        let stored: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(stored["enabledPlugins"]["b@m"]["hash"], "not-a-digest");
        assert_eq!(
            stored["extraKnownMarketplaces"]["m"]["hash"],
            "AB".repeat(32)
        );
        assert!(stored["enabledPlugins"]["a@m"].is_string());
        assert_eq!(from_text(&text).unwrap(), entries);
        // Keys of no owned key are skipped; a missing key is empty.
        let partial = r#"{"enabledPlugins":{},"later":{"x":1}}"#;
        assert_eq!(from_text(partial).unwrap(), LedgerEntries::default());
    }

    #[test]
    fn a_damaged_compact_entry_is_an_error() {
        let digest = URL_SAFE_NO_PAD.encode([7u8; 32]);
        for bad in [
            format!("x{digest}"),
            format!("d{}", &digest[..40]),
            format!("d{digest}AAAA"),
            "d!!!".to_owned(),
            String::new(),
        ] {
            let text = json!({"enabledPlugins": {"a@m": bad}}).to_string();
            assert!(from_text(&text).is_err(), "{text}");
        }
        let good = json!({"enabledPlugins": {"a@m": format!("d{digest}")}}).to_string();
        assert_eq!(
            from_text(&good).unwrap().plugins["a@m"].hash,
            "07".repeat(32)
        );
    }
}
