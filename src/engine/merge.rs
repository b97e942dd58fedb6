//! Merging owned keys into an existing JSON file (pure).
//!
//! Top-level values are kept as raw text: keys the operator does not own keep
//! their bytes, position and formatting, and are never parsed further, which
//! also keeps large `.claude.json` files cheap to rewrite. Skipping over raw
//! values does not recurse, so foreign keys may nest to any depth; only the
//! owned keys are parsed into trees, and only up to [`MAX_OWNED_DEPTH`].

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

/// Deepest nesting of arrays and objects in an owned key's value (the
/// value itself is level 1). Real entries nest a few levels; the limit keeps
/// well below serde_json's recursion limit (128), so a deep value is reported
/// as too deep, never as a parse error that would get the file treated as
/// damaged.
pub const MAX_OWNED_DEPTH: usize = 64;

/// An owned key cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum OwnedError {
    /// It holds something other than an object: replaced, old file kept aside.
    #[error("key {key} is not a JSON object")]
    WrongType {
        /// The key.
        key: &'static str,
    },
    /// Valid JSON nested deeper than [`MAX_OWNED_DEPTH`]: left alone.
    #[error("key {key} nests deeper than {limit} levels")]
    TooDeep {
        /// The key.
        key: &'static str,
        /// The limit.
        limit: usize,
    },
}

impl Document {
    /// Parses a file. Empty or blank content is an empty object (a freshly
    /// created file), not corruption.
    pub fn parse(bytes: &[u8]) -> Result<Document, CorruptReason> {
        let Some(first) = bytes.iter().find(|b| !b.is_ascii_whitespace()) else {
            return Ok(Document::empty());
        };
        if *first != b'{' {
            return Err(
                match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
                    Ok(_) => CorruptReason::NotAnObject,
                    Err(e) => CorruptReason::Syntax(e),
                },
            );
        }
        // Straight into the map: no second copy of a large file.
        let entries = serde_json::from_slice(bytes).map_err(CorruptReason::Syntax)?;
        Ok(Document { entries })
    }

    /// A document with no keys.
    pub fn empty() -> Document {
        Document {
            entries: IndexMap::new(),
        }
    }

    /// The value of an owned key: `Ok(None)` when absent.
    pub fn owned(&self, key: &'static str) -> Result<Option<Map<String, Value>>, OwnedError> {
        let Some(raw) = self.entries.get(key) else {
            return Ok(None);
        };
        if depth(raw.get()) > MAX_OWNED_DEPTH {
            return Err(OwnedError::TooDeep {
                key,
                limit: MAX_OWNED_DEPTH,
            });
        }
        match parse_value(raw.get().as_bytes()) {
            Ok(Value::Object(m)) => Ok(Some(m)),
            _ => Err(OwnedError::WrongType { key }),
        }
    }

    /// The file with `owned` keys replaced (or appended, in the given order),
    /// every other key untouched and in place. Formatted like Claude Code
    /// writes it (two-space indent).
    pub fn render(&self, owned: &[(&'static str, &Map<String, Value>)]) -> Vec<u8> {
        let owned: Vec<(&str, String)> = owned
            .iter()
            .map(|(key, map)| (*key, pretty_nested(map)))
            .collect();
        // Borrowed: a large file is not copied once more before it is written.
        let mut rendered: IndexMap<&str, &str> = self
            .entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.get()))
            .collect();
        for (key, text) in &owned {
            rendered.insert(key, text);
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

/// The deepest nesting of arrays and objects in valid JSON text, counted in
/// one pass without recursion.
fn depth(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
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

    fn nested(levels: usize) -> String {
        format!("{}{}", "[".repeat(levels), "]".repeat(levels))
    }

    #[test]
    fn foreign_keys_nest_to_any_depth_and_keep_their_bytes() {
        for levels in [10_000, 1_000_000] {
            let deep = nested(levels);
            let src = format!("{{\"projects\": {deep}, \"mcpServers\": {{}}}}");
            let doc = Document::parse(src.as_bytes()).unwrap();
            assert!(doc.owned("mcpServers").unwrap().unwrap().is_empty());
            let out = String::from_utf8(doc.render(&[("mcpServers", &Map::new())])).unwrap();
            assert!(out.contains(&format!("\"projects\": {deep},")), "{levels}");
        }
    }

    #[test]
    fn owned_keys_deeper_than_the_limit_are_too_deep_not_damaged() {
        // The value of the key is level 1.
        let at = |levels: usize| format!("{{\"mcpServers\": {{\"x\": {}}}}}", nested(levels - 1));
        let doc = Document::parse(at(MAX_OWNED_DEPTH).as_bytes()).unwrap();
        assert!(doc.owned("mcpServers").unwrap().is_some());
        for levels in [MAX_OWNED_DEPTH + 1, 200, 10_000] {
            let doc = Document::parse(at(levels).as_bytes()).unwrap();
            assert!(
                matches!(
                    doc.owned("mcpServers"),
                    Err(OwnedError::TooDeep {
                        key: "mcpServers",
                        limit: MAX_OWNED_DEPTH
                    })
                ),
                "{levels}"
            );
        }
    }

    #[test]
    fn depth_skips_brackets_in_strings() {
        assert_eq!(depth(r#"{"a": "[[[\"{{", "b": [{}]}"#), 3);
        assert_eq!(depth(r#""\\""#), 0);
        assert_eq!(depth(r#"["\\", [1]]"#), 2);
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
