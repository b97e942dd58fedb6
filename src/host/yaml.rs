//! YAML manifest text into JSON values, within a budget.
//!
//! Parsing is libyaml's (through `serde_norway`), which reads a fleet's
//! manifests at about twice the speed of the pure Rust parser used before;
//! building the values is this module's, because three rules `kubectl`
//! users rely on live there and not in the parser:
//!
//! - a mapping that repeats a key is refused, as `kubectl apply` refuses it
//!   (taking the last value would hide the typo);
//! - a merge key (`<<: *base`) merges the aliased mapping, the mapping's own
//!   keys winning;
//! - parsed nodes and scalar bytes are bounded by the text's length
//!   ([`Budget`]): a few hundred bytes of nested aliases cannot expand to
//!   millions of nodes. The parser's own guard counts alias jumps against
//!   its event count, which a large file makes loose.
//!
//! Errors give line and column and never quote the text: the offending
//! line may hold a Secret's value.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use serde_json::{Map, Value};

/// How much parsed YAML a text may make.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Most documents.
    pub documents: usize,
    /// Most nodes (mappings, sequences and scalars, keys included).
    pub nodes: usize,
    /// Most bytes of scalars (keys included).
    pub scalar_bytes: usize,
}

/// A text that is not usable YAML.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    /// More documents than the budget allows.
    #[error("more than {limit} documents")]
    TooManyDocuments {
        /// The budget's documents.
        limit: usize,
    },
    /// Not YAML, or not within the budget: the parser's message, with line
    /// and column.
    #[error("{0}")]
    Invalid(String),
}

/// Every document of `text`, in order; an empty document is `null`.
pub fn documents(text: &str, budget: Budget) -> Result<Vec<Value>, YamlError> {
    let left = Left::new(budget);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        if docs.len() == budget.documents {
            return Err(YamlError::TooManyDocuments {
                limit: budget.documents,
            });
        }
        // The first error ends the read: past a syntax error the parser's
        // document iterator repeats it without end.
        let value = Node(&left)
            .deserialize(doc)
            .map_err(|e| YamlError::Invalid(unquoted(&e.to_string())))?;
        docs.push(value);
    }
    Ok(docs)
}

/// A parser message with every scalar it quotes left out: a type tag the
/// scalar does not fit (`!!int s3cr3t`) makes serde say `invalid value:
/// string "s3cr3t"`, and the scalar may be a Secret's value.
fn unquoted(message: &str) -> String {
    const QUOTED: &str = "string \"";
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find(QUOTED) {
        out.push_str(&rest[..at]);
        out.push_str("a string");
        // The scalar is Debug-escaped: it ends at the first unescaped quote.
        let quoted = &rest[at + QUOTED.len()..];
        let mut chars = quoted.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                _ => {}
            }
        }
        match end {
            Some(end) => rest = &quoted[end..],
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

/// What is left of a budget while a text is read.
struct Left {
    nodes: Cell<usize>,
    scalar_bytes: Cell<usize>,
    budget: Budget,
}

impl Left {
    fn new(budget: Budget) -> Self {
        Left {
            nodes: Cell::new(budget.nodes),
            scalar_bytes: Cell::new(budget.scalar_bytes),
            budget,
        }
    }

    fn node<E: de::Error>(&self) -> Result<(), E> {
        match self.nodes.get().checked_sub(1) {
            Some(n) => {
                self.nodes.set(n);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "more than {} parsed nodes (aliases expanding far beyond the text?)",
                self.budget.nodes
            ))),
        }
    }

    fn scalar<E: de::Error>(&self, s: &str) -> Result<(), E> {
        self.node()?;
        match self.scalar_bytes.get().checked_sub(s.len()) {
            Some(n) => {
                self.scalar_bytes.set(n);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "more than {} bytes of parsed scalars (aliases expanding far beyond the text?)",
                self.budget.scalar_bytes
            ))),
        }
    }
}

/// One value, built within the budget.
struct Node<'a>(&'a Left);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a YAML value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.node()?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        self.deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.node()?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.node()?;
        Ok(Value::from(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.node()?;
        Ok(Value::from(v))
    }

    // Integers past 64 bits: a number, as serde_json reads them in JSON
    // (and never an error quoting the digits, which may be a secret's).
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.visit_f64(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.node()?;
        // JSON has no infinity or NaN; the API server refuses them too.
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a non-finite number (.inf or .nan) has no JSON value"))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.scalar(v)?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.0.scalar(&v)?;
        Ok(Value::String(v))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.node()?;
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(Node(self.0))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.node()?;
        let mut own = Map::new();
        let mut merged: Vec<Value> = Vec::new();
        while let Some(key) = map.next_key_seed(Key(self.0))? {
            let value = map.next_value_seed(Node(self.0))?;
            if key == MERGE_KEY {
                merged.push(value);
                continue;
            }
            if own.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "duplicate mapping key {key:?}"
                )));
            }
            own.insert(key, value);
        }
        for source in merged {
            merge_into(&mut own, source).map_err(de::Error::custom)?;
        }
        Ok(Value::Object(own))
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        // A local tag (`!ref x`) means nothing to a manifest; the value is
        // kept as if untagged, as the parser used before did.
        let (de::IgnoredAny, value) = data.variant()?;
        value.newtype_variant_seed(self)
    }
}

/// The YAML merge key.
const MERGE_KEY: &str = "<<";

/// Adds what a merge key names to a mapping: a mapping, or a list of them
/// where the earlier wins; keys the mapping has keep its values.
fn merge_into(own: &mut Map<String, Value>, source: Value) -> Result<(), &'static str> {
    const NOT_A_MAPPING: &str = "a merge key (<<) takes a mapping or a list of mappings";
    match source {
        Value::Object(from) => {
            for (k, v) in from {
                own.entry(k).or_insert(v);
            }
            Ok(())
        }
        Value::Array(list) => list.into_iter().try_for_each(|item| match item {
            Value::Object(_) => merge_into(own, item),
            _ => Err(NOT_A_MAPPING),
        }),
        _ => Err(NOT_A_MAPPING),
    }
}

/// A mapping's key: a scalar, as text (`1: a` has the key `"1"`).
struct Key<'a>(&'a Left);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_string(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a scalar mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        self.0.scalar(v)?;
        Ok(v.to_owned())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<String, E> {
        self.0.scalar(&v)?;
        Ok(v)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
        self.visit_string(v.to_string())
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        self.visit_string("null".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ROOMY: Budget = Budget {
        documents: 100,
        nodes: 100_000,
        scalar_bytes: 100_000,
    };

    fn one(text: &str) -> Result<Value, YamlError> {
        documents(text, ROOMY).map(|mut d| d.remove(0))
    }

    #[test]
    fn documents_come_in_order_with_empty_ones_as_null() {
        let docs = documents("a: 1\n---\n---\n- x\n- 2\n", ROOMY).unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), Value::Null, json!(["x", 2])]);
    }

    #[test]
    fn content_after_an_explicit_end_needs_a_marker() {
        // libyaml's rule (the Go parser kubectl uses is a port of libyaml).
        assert!(documents("a: 1\n...\n---\nb: 2\n", ROOMY).is_ok());
        let e = documents("a: 1\n...\nb: 2\n", ROOMY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn scalars_resolve_as_in_yaml_1_2() {
        let v = one("a: yes\nb: 017\nc: 0x1F\nd: ~\ne: 1.5\nf: '1'\ng: true\nh: -3\n").unwrap();
        assert_eq!(
            v,
            json!({"a": "yes", "b": "017", "c": 31, "d": null, "e": 1.5, "f": "1", "g": true, "h": -3})
        );
        let e = one("a: .inf\n").unwrap_err().to_string();
        assert!(e.contains("non-finite"), "{e}");
        // Past 64 bits an integer is a float, as in JSON; a key stays text.
        let v = one("a: 123456789012345678901234567890\nb: -99999999999999999999\n99999999999999999999: k\n")
            .unwrap();
        assert_eq!(v["a"], json!(1.2345678901234568e29));
        assert_eq!(v["b"], json!(-1e20));
        assert_eq!(v["99999999999999999999"], json!("k"));
    }

    #[test]
    fn a_repeated_key_is_refused_with_its_line() {
        let e = one("a: 1\nb:\n  c: 1\n  c: 2\n").unwrap_err().to_string();
        assert!(e.contains("duplicate mapping key \"c\""), "{e}");
        assert!(e.contains("line 3") || e.contains("line 4"), "{e}");
    }

    #[test]
    fn merge_keys_merge_and_own_keys_win() {
        let v = one("base: &b {x: 1, y: 1}\nother: &o {y: 2, z: 2}\nm:\n  <<: [*b, *o]\n  x: 0\n")
            .unwrap();
        assert_eq!(v["m"], json!({"x": 0, "y": 1, "z": 2}));
        let e = one("m:\n  <<: 3\n").unwrap_err().to_string();
        assert!(e.contains("merge key"), "{e}");
    }

    #[test]
    fn tags_are_ignored_and_keys_are_text() {
        let v = one("a: !ref x\n1: one\ntrue: t\n").unwrap();
        assert_eq!(v, json!({"a": "x", "1": "one", "true": "t"}));
    }

    #[test]
    fn nodes_scalar_bytes_and_documents_are_bounded() {
        let tight = |nodes, scalar_bytes, documents| Budget {
            documents,
            nodes,
            scalar_bytes,
        };
        // `{a: xyz}` is a mapping, a key and a value: 3 nodes, 4 bytes.
        assert!(documents("{a: xyz}", tight(3, 4, 1)).is_ok());
        let e = documents("{a: xyz}", tight(2, 4, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 parsed nodes"), "{e}");
        let e = documents("{a: xyz}", tight(3, 3, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 3 bytes"), "{e}");
        // Aliases count each time they are expanded.
        let e = documents("x: &x [a, a]\ny: [*x, *x, *x]\n", tight(10, 100, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("parsed nodes"), "{e}");
        assert!(matches!(
            documents("a\n---\nb\n", tight(10, 10, 1)),
            Err(YamlError::TooManyDocuments { limit: 1 })
        ));
    }

    #[test]
    fn errors_name_the_place_and_quote_nothing() {
        let e = one("token: s3cr3t-value\nx: [1, 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        for tagged in ["!!int", "!!float", "!!bool", "!!null"] {
            let text = format!("a: {tagged} 's3cr3t \" \\ x'\n");
            let e = one(&text).unwrap_err().to_string();
            assert!(e.contains("invalid value: a string, expected"), "{e}");
            assert!(e.contains("line 1"), "{e}");
            assert!(!e.contains("s3cr3t") && !e.contains(" x"), "{e}");
        }
        assert_eq!(
            unquoted(r#"string "a\"b" and string "c""#),
            "a string and a string"
        );
    }
}
