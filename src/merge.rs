//! Merging owned keys into an existing JSON file (pure).
//!
//! Top-level values are kept as raw text: keys the operator does not own keep
//! their bytes, position and formatting, and are never parsed further, which
//! also keeps large `.claude.json` files cheap to rewrite.

use indexmap::IndexMap;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON object file split into top-level keys with raw values.
#[derive(Debug)]
pub struct Document {
    entries: IndexMap<String, Box<RawValue>>,
}

/// Why a file cannot be merged into; such a file is moved aside, not overwritten.
#[derive(Debug, thiserror::Error)]
pub enum CorruptReason {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    /// JSON, but the top level is not an object.
    #[error("the top level is not a JSON object")]
    NotAnObject,
}

/// An owned key holds something other than an object.
#[derive(Debug, thiserror::Error)]
#[error("key {key} is not a JSON object")]
pub struct WrongType {
    /// The key.
    pub key: &'static str,
}

impl Document {
    /// Parses a file. Empty or blank content is an empty object (a freshly
    /// created file), not corruption.
    pub fn parse(bytes: &[u8]) -> Result<Document, CorruptReason> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Document::empty());
        }
        let value: Box<RawValue> = serde_json::from_slice(bytes).map_err(CorruptReason::Syntax)?;
        if !value.get().starts_with('{') {
            return Err(CorruptReason::NotAnObject);
        }
        let entries = serde_json::from_str(value.get()).map_err(CorruptReason::Syntax)?;
        Ok(Document { entries })
    }

    /// A document with no keys.
    pub fn empty() -> Document {
        Document {
            entries: IndexMap::new(),
        }
    }

    /// The value of an owned key: `Ok(None)` when absent.
    pub fn owned(&self, key: &'static str) -> Result<Option<Map<String, Value>>, WrongType> {
        match self.entries.get(key) {
            None => Ok(None),
            Some(raw) => match parse_value(raw.get().as_bytes()) {
                Ok(Value::Object(m)) => Ok(Some(m)),
                _ => Err(WrongType { key }),
            },
        }
    }

    /// The file with `owned` keys replaced (or appended, in the given order),
    /// every other key untouched and in place. Formatted like Claude Code
    /// writes it (two-space indent).
    pub fn render(&self, owned: &[(&'static str, &Map<String, Value>)]) -> Vec<u8> {
        let mut rendered: IndexMap<&str, String> = self
            .entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.get().to_owned()))
            .collect();
        for (key, map) in owned {
            rendered.insert(key, pretty_nested(map));
        }
        let mut out = String::with_capacity(rendered.values().map(|v| v.len() + 16).sum());
        if rendered.is_empty() {
            out.push_str("{}");
        } else {
            out.push_str("{\n");
            for (i, (k, v)) in rendered.iter().enumerate() {
                out.push_str("  ");
                out.push_str(&serde_json::to_string(k).expect("a string always serializes"));
                out.push_str(": ");
                out.push_str(v);
                out.push_str(if i + 1 < rendered.len() { ",\n" } else { "\n" });
            }
            out.push('}');
        }
        out.push('\n');
        out.into_bytes()
    }
}

/// Parses JSON into a [`Value`] taking every object key as plain text.
///
/// With serde_json's `raw_value` feature on (this crate needs it for
/// [`Document`]), `Value`'s own deserializer takes an object whose first key
/// is `$serde_json::private::RawValue` as a raw value and fails on it. Files
/// and runtime installs are written by others, so such a key must read as
/// any other: otherwise one crafted entry makes a whole owned key unreadable.
pub fn parse_value(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    serde_json::from_slice::<PlainValue>(bytes).map(|v| v.0)
}

struct PlainValue(Value);

impl<'de> serde::Deserialize<'de> for PlainValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PlainVisitor).map(PlainValue)
    }
}

struct PlainVisitor;

impl<'de> serde::de::Visitor<'de> for PlainVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(PlainVisitor)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(PlainValue(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some((k, PlainValue(v))) = map.next_entry::<String, PlainValue>()? {
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// Pretty JSON whose continuation lines sit one level in, for a value at the top level.
fn pretty_nested(map: &Map<String, Value>) -> String {
    let text = serde_json::to_string_pretty(map).expect("a JSON map always serializes");
    // JSON strings never hold a raw newline, so every newline is structure.
    text.replace('\n', "\n  ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn keeps_foreign_keys_bytes_and_order() {
        let src = br#"{"numStartups": 3, "projects": {"/a":{"x":[1,2]}},
 "mcpServers": {"old": {"command": "x"}}, "zz": "last"}"#;
        let doc = Document::parse(src).unwrap();
        let out = doc.render(&[(
            "mcpServers",
            &map(json!({"new": {"type": "stdio", "command": "y"}})),
        )]);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "{\n  \"numStartups\": 3,\n  \"projects\": {\"/a\":{\"x\":[1,2]}},\n  \"mcpServers\": {\n    \"new\": {\n      \"type\": \"stdio\",\n      \"command\": \"y\"\n    }\n  },\n  \"zz\": \"last\"\n}\n"
        );
        let back: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back["projects"], json!({"/a": {"x": [1, 2]}}));
    }

    #[test]
    fn appends_missing_keys_and_renders_empty_maps() {
        let doc = Document::parse(b"").unwrap();
        let out = doc.render(&[
            ("enabledPlugins", &Map::new()),
            ("extraKnownMarketplaces", &Map::new()),
        ]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\n  \"enabledPlugins\": {},\n  \"extraKnownMarketplaces\": {}\n}\n"
        );
    }

    #[test]
    fn rendering_is_a_fixed_point() {
        let doc = Document::parse(br#"{"a": 1, "enabledPlugins": {"p@m": true}}"#).unwrap();
        let owned = map(json!({"p@m": false, "q@m": ["1.0"]}));
        let once = doc.render(&[("enabledPlugins", &owned)]);
        let twice = Document::parse(&once)
            .unwrap()
            .render(&[("enabledPlugins", &owned)]);
        assert_eq!(once, twice);
    }

    #[test]
    fn a_key_named_like_serde_json_internals_is_a_key_like_any_other() {
        let src = br#"{"mcpServers": {"$serde_json::private::RawValue": {"command": "x"}, "b": {"env": {"$serde_json::private::RawValue": 1}}}}"#;
        let doc = Document::parse(src).unwrap();
        let m = doc.owned("mcpServers").unwrap().unwrap();
        assert_eq!(m["$serde_json::private::RawValue"], json!({"command": "x"}));
        assert_eq!(m["b"]["env"]["$serde_json::private::RawValue"], json!(1));
        let out = doc.render(&[("mcpServers", &m)]);
        assert_eq!(
            Document::parse(&out).unwrap().owned("mcpServers").unwrap(),
            Some(m)
        );
        assert_eq!(
            parse_value(br#"[1, -2, 0.5, "s", null, true, {"a": {}}]"#).unwrap(),
            json!([1, -2, 0.5, "s", null, true, {"a": {}}])
        );
    }

    #[test]
    fn corrupt_and_wrong_types() {
        assert!(matches!(
            Document::parse(b"{\"a\": "),
            Err(CorruptReason::Syntax(_))
        ));
        assert!(matches!(
            Document::parse(b"[1]"),
            Err(CorruptReason::NotAnObject)
        ));
        let doc = Document::parse(br#"{"enabledPlugins": []}"#).unwrap();
        assert!(doc.owned("enabledPlugins").is_err());
        assert!(doc.owned("mcpServers").unwrap().is_none());
    }
}
