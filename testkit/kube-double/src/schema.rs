//! What a real server does to a custom resource on every write, against the
//! CRD's `openAPIV3Schema`: prune unknown fields, apply defaults, validate the
//! structure and values, then run the CEL `x-kubernetes-validations` rules.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex};

use kube::core::cel::{RootContext, Validator};
use regex::Regex;
use serde_json::{Map, Value};

use crate::kinds::{Kind, VersionSchema};
use crate::meta::OBJECT_META_FIELDS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorType {
    Required,
    Invalid,
    NotSupported,
    Duplicate,
    TooMany,
    TooLong,
    Forbidden,
}

/// One field error, rendered like apimachinery's `field.Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FieldError {
    pub path: String,
    kind: ErrorType,
    value: Option<String>,
    detail: String,
}

/// A value the way error messages quote it: strings in quotes, the rest as JSON.
fn render(v: &Value) -> String {
    match v {
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Null => "\"null\"".to_owned(),
        other => other.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

impl FieldError {
    fn new(path: &str, kind: ErrorType, value: Option<String>, detail: impl Into<String>) -> Self {
        FieldError {
            path: path.to_owned(),
            kind,
            value,
            detail: detail.into(),
        }
    }

    pub fn required(path: &str, detail: &str) -> Self {
        Self::new(path, ErrorType::Required, None, detail)
    }

    pub fn invalid(path: &str, value: &Value, detail: &str) -> Self {
        Self::new(path, ErrorType::Invalid, Some(render(value)), detail)
    }

    /// An invalid value already rendered the way the message should show it.
    pub fn invalid_rendered(path: &str, rendered: &str, detail: &str) -> Self {
        Self::new(path, ErrorType::Invalid, Some(rendered.to_owned()), detail)
    }

    pub fn forbidden(path: &str, detail: &str) -> Self {
        Self::new(path, ErrorType::Forbidden, None, detail)
    }

    /// `Invalid value: "string": spec.x in body must be of type integer: "string"`
    pub fn type_mismatch(path: &str, value: &Value, expected: &str) -> Self {
        let actual = type_name(value);
        Self::new(
            path,
            ErrorType::Invalid,
            Some(format!("\"{actual}\"")),
            format!("{path} in body must be of type {expected}: \"{actual}\""),
        )
    }

    pub fn reason(&self) -> &'static str {
        match self.kind {
            ErrorType::Required => "FieldValueRequired",
            ErrorType::Invalid => "FieldValueInvalid",
            ErrorType::NotSupported => "FieldValueNotSupported",
            ErrorType::Duplicate => "FieldValueDuplicate",
            ErrorType::TooMany => "FieldValueTooMany",
            ErrorType::TooLong => "FieldValueTooLong",
            ErrorType::Forbidden => "FieldValueForbidden",
        }
    }

    /// The message without the field path.
    pub fn body(&self) -> String {
        let label = match self.kind {
            ErrorType::Required => "Required value",
            ErrorType::Invalid => "Invalid value",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Duplicate => "Duplicate value",
            ErrorType::TooMany => "Too many",
            ErrorType::TooLong => "Too long",
            ErrorType::Forbidden => "Forbidden",
        };
        let mut s = label.to_owned();
        if let Some(v) = &self.value {
            s.push_str(": ");
            s.push_str(v);
        }
        if !self.detail.is_empty() {
            s.push_str(": ");
            s.push_str(&self.detail);
        }
        s
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = if self.path.is_empty() {
            "<nil>"
        } else {
            &self.path
        };
        write!(f, "{path}: {}", self.body())
    }
}

fn child(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

/// Prunes, defaults and validates a custom resource in place for `version`;
/// `old` is the stored object on updates (for CEL transition rules).
pub(crate) fn admit(
    validator: &Validator,
    kind: &Kind,
    version: &str,
    obj: &mut Value,
    old: Option<&Value>,
) -> Vec<FieldError> {
    let Some(schema) = kind.schemas.get(version) else {
        return Vec::new();
    };
    prune_root(&schema.openapi, obj);
    apply_defaults(&schema.openapi, obj, true);
    let mut errs = Vec::new();
    validate(&schema.openapi, obj, "", &mut errs);
    if errs.is_empty() {
        errs.extend(run_cel(validator, kind, version, schema, obj, old));
    }
    errs
}

// ---------------------------------------------------------------- pruning

fn prune_root(schema: &Value, obj: &mut Value) {
    prune(schema, obj, true);
}

fn prune_metadata(meta: &mut Value) {
    if let Some(m) = meta.as_object_mut() {
        m.retain(|k, _| OBJECT_META_FIELDS.contains(&k.as_str()));
    }
}

fn prune(schema: &Value, v: &mut Value, keep_type_meta: bool) {
    let preserve = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let embedded = keep_type_meta || flag(schema, "x-kubernetes-embedded-resource");
    match v {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties");
            let mut drop = Vec::new();
            for (k, child) in map.iter_mut() {
                if embedded && (k == "apiVersion" || k == "kind") {
                    continue;
                }
                if embedded && k == "metadata" {
                    prune_metadata(child);
                    continue;
                }
                if let Some(prop) = props.and_then(|p| p.get(k)) {
                    // Real servers drop nulls of non-nullable fields before
                    // defaulting, so a default can then fill them in.
                    if child.is_null() && !flag(prop, "nullable") {
                        drop.push(k.clone());
                    } else {
                        prune(prop, child, false);
                    }
                } else if let Some(add) = additional.filter(|a| a.is_object()) {
                    if child.is_null() && !flag(add, "nullable") {
                        drop.push(k.clone());
                    } else {
                        prune(add, child, false);
                    }
                } else if !preserve && additional != Some(&Value::Bool(true)) {
                    drop.push(k.clone());
                }
            }
            for k in drop {
                map.shift_remove(&k);
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------- defaulting

fn apply_defaults(schema: &Value, v: &mut Value, root: bool) {
    match v {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, prop) in props {
                    if root && k == "metadata" {
                        continue;
                    }
                    if !map.contains_key(k)
                        && let Some(d) = prop.get("default")
                    {
                        map.insert(k.clone(), d.clone());
                    }
                    if let Some(child) = map.get_mut(k) {
                        apply_defaults(prop, child, false);
                    }
                }
            }
            if let Some(add) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let known = schema.get("properties").and_then(Value::as_object);
                for (k, child) in map.iter_mut() {
                    if known.is_none_or(|p| !p.contains_key(k)) {
                        apply_defaults(add, child, false);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

// ---------------------------------------------------------------- validation

static PATTERNS: LazyLock<Mutex<HashMap<String, Option<Regex>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

fn pattern_matches(pattern: &str, s: &str) -> bool {
    let mut cache = PATTERNS.lock().unwrap_or_else(|e| e.into_inner());
    let re = cache
        .entry(pattern.to_owned())
        .or_insert_with(|| Regex::new(pattern).ok());
    // An uncompilable pattern would have been refused with the CRD; letting
    // values through is kinder than failing every write.
    re.as_ref().is_none_or(|re| re.is_match(s))
}

fn num(schema: &Value, name: &str) -> Option<f64> {
    schema.get(name).and_then(Value::as_f64)
}

fn count(schema: &Value, name: &str) -> Option<usize> {
    schema
        .get(name)
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
}

fn type_matches(expected: &str, v: &Value) -> bool {
    match expected {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => true,
    }
}

fn validate(schema: &Value, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let declared = schema.get("type").and_then(Value::as_str);
    if v.is_null() {
        if !flag(schema, "nullable")
            && let Some(t) = declared
        {
            errs.push(FieldError::type_mismatch(path, v, t));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(v.is_string() || v.is_i64() || v.is_u64()) {
            errs.push(FieldError::type_mismatch(path, v, "integer,string"));
            return;
        }
    } else if let Some(t) = declared
        && !type_matches(t, v)
    {
        errs.push(FieldError::type_mismatch(path, v, t));
        return;
    }

    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.iter().any(|a| a == v)
    {
        let supported: Vec<String> = allowed.iter().map(render).collect();
        errs.push(FieldError::new(
            path,
            ErrorType::NotSupported,
            Some(render(v)),
            format!("supported values: {}", supported.join(", ")),
        ));
    }

    match v {
        Value::String(s) => validate_string(schema, s, v, path, errs),
        Value::Number(_) => validate_number(schema, v, path, errs),
        Value::Array(items) => validate_array(schema, items, path, errs),
        Value::Object(map) => validate_object(schema, map, path, errs),
        _ => {}
    }
    validate_junctors(schema, v, path, errs);
}

fn validate_string(schema: &Value, s: &str, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let chars = s.chars().count();
    if let Some(min) = count(schema, "minLength")
        && chars < min
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body should be at least {min} chars long"),
        ));
    }
    if let Some(max) = count(schema, "maxLength")
        && chars > max
    {
        errs.push(FieldError::new(
            path,
            ErrorType::TooLong,
            None,
            format!("may not be more than {max} bytes"),
        ));
    }
    if let Some(p) = schema.get("pattern").and_then(Value::as_str)
        && !pattern_matches(p, s)
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body should match '{p}'"),
        ));
    }
}

fn validate_number(schema: &Value, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    let Some(x) = v.as_f64() else { return };
    let exclusive_min = flag(schema, "exclusiveMinimum");
    let exclusive_max = flag(schema, "exclusiveMaximum");
    if let Some(min) = num(schema, "minimum") {
        let (bad, word) = if exclusive_min {
            (x <= min, "greater than")
        } else {
            (x < min, "greater than or equal to")
        };
        if bad {
            errs.push(FieldError::invalid(
                path,
                v,
                &format!("{path} in body should be {word} {}", fmt_num(min)),
            ));
        }
    }
    if let Some(max) = num(schema, "maximum") {
        let (bad, word) = if exclusive_max {
            (x >= max, "less than")
        } else {
            (x > max, "less than or equal to")
        };
        if bad {
            errs.push(FieldError::invalid(
                path,
                v,
                &format!("{path} in body should be {word} {}", fmt_num(max)),
            ));
        }
    }
    if let Some(m) = num(schema, "multipleOf")
        && m != 0.0
        && (x / m).fract() != 0.0
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body should be a multiple of {}", fmt_num(m)),
        ));
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}

fn validate_array(schema: &Value, items: &[Value], path: &str, errs: &mut Vec<FieldError>) {
    if let Some(min) = count(schema, "minItems")
        && items.len() < min
    {
        errs.push(FieldError::invalid(
            path,
            &Value::from(items.len()),
            &format!("{path} in body should have at least {min} items"),
        ));
    }
    if let Some(max) = count(schema, "maxItems")
        && items.len() > max
    {
        errs.push(FieldError::new(
            path,
            ErrorType::TooMany,
            Some(items.len().to_string()),
            format!("must have at most {max} items"),
        ));
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            validate(item_schema, item, &index(path, i), errs);
        }
    }
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    errs.push(FieldError::new(
                        &index(path, i),
                        ErrorType::Duplicate,
                        Some(render(item)),
                        "",
                    ));
                }
            }
        }
        Some("map") => {
            let keys: Vec<&str> = schema
                .get("x-kubernetes-list-map-keys")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let key_of = |item: &Value| -> Value {
                let mut m = Map::new();
                for k in &keys {
                    if let Some(x) = item.get(*k) {
                        m.insert((*k).to_owned(), x.clone());
                    }
                }
                Value::Object(m)
            };
            for (i, item) in items.iter().enumerate() {
                let k = key_of(item);
                if items[..i].iter().any(|prev| key_of(prev) == k) {
                    errs.push(FieldError::new(
                        &index(path, i),
                        ErrorType::Duplicate,
                        Some(render(&k)),
                        "",
                    ));
                }
            }
        }
        _ => {}
    }
}

fn validate_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errs: &mut Vec<FieldError>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for r in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(r) {
                errs.push(FieldError::required(&child(path, r), ""));
            }
        }
    }
    if let Some(min) = count(schema, "minProperties")
        && map.len() < min
    {
        errs.push(FieldError::invalid(
            path,
            &Value::from(map.len()),
            &format!("{path} in body should have at least {min} properties"),
        ));
    }
    if let Some(max) = count(schema, "maxProperties")
        && map.len() > max
    {
        errs.push(FieldError::new(
            path,
            ErrorType::TooMany,
            Some(map.len().to_string()),
            format!("must have at most {max} items"),
        ));
    }
    let props = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties").filter(|a| a.is_object());
    for (k, child_value) in map {
        if path.is_empty() && (k == "apiVersion" || k == "kind" || k == "metadata") {
            // Type metadata and ObjectMeta are the server's, not the schema's
            // (a root `metadata` schema may only constrain the name).
            if k == "metadata"
                && let Some(name_schema) = props
                    .and_then(|p| p.get("metadata"))
                    .and_then(|m| m.pointer("/properties/name"))
                && let Some(name) = child_value.get("name")
            {
                validate(name_schema, name, "metadata.name", errs);
            }
            continue;
        }
        if let Some(prop) = props.and_then(|p| p.get(k)) {
            validate(prop, child_value, &child(path, k), errs);
        } else if let Some(add) = additional {
            validate(add, child_value, &child(path, k), errs);
        }
    }
}

fn passes(schema: &Value, v: &Value, path: &str) -> bool {
    let mut scratch = Vec::new();
    validate(schema, v, path, &mut scratch);
    scratch.is_empty()
}

fn validate_junctors(schema: &Value, v: &Value, path: &str, errs: &mut Vec<FieldError>) {
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(s, v, path, errs);
        }
    }
    if let Some(any) = schema.get("anyOf").and_then(Value::as_array)
        && !any.is_empty()
        && !any.iter().any(|s| passes(s, v, path))
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body must validate at least one schema (anyOf)"),
        ));
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array)
        && !one.is_empty()
        && one.iter().filter(|s| passes(s, v, path)).count() != 1
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body must validate one and only one schema (oneOf)"),
        ));
    }
    if let Some(not) = schema.get("not")
        && passes(not, v, path)
    {
        errs.push(FieldError::invalid(
            path,
            v,
            &format!("{path} in body must not validate the schema (not)"),
        ));
    }
}

// ---------------------------------------------------------------- CEL

/// The value at a `spec.items[2].name` style path, for naming its type.
fn value_at<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let mut cur = obj;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (name, rest) = match seg.find('[') {
            Some(i) => (&seg[..i], &seg[i..]),
            None => (seg, ""),
        };
        if !name.is_empty() {
            cur = cur.get(name)?;
        }
        for idx in rest.split('[').filter(|s| !s.is_empty()) {
            let idx = idx.trim_end_matches(']');
            cur = match idx.parse::<usize>() {
                Ok(i) if cur.is_array() => cur.get(i)?,
                _ => cur.get(idx.trim_matches('"'))?,
            };
        }
    }
    Some(cur)
}

fn run_cel(
    validator: &Validator,
    kind: &Kind,
    version: &str,
    schema: &VersionSchema,
    obj: &Value,
    old: Option<&Value>,
) -> Vec<FieldError> {
    let context = RootContext {
        api_version: kind.api_version(version),
        api_group: kind.group.clone(),
        kind: kind.kind.clone(),
    };
    let Err(errors) =
        validator.validate_compiled_with_context(&schema.cel, obj, old, Some(&context))
    else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            let path = e.field_path.trim_start_matches('.');
            match e.reason.as_deref() {
                Some("FieldValueForbidden") => FieldError::forbidden(path, &e.message),
                Some("FieldValueRequired") => FieldError::required(path, &e.message),
                Some("FieldValueDuplicate") => {
                    FieldError::new(path, ErrorType::Duplicate, None, e.message.clone())
                }
                _ => {
                    let t = value_at(obj, path).map(type_name).unwrap_or("object");
                    FieldError::new(
                        path,
                        ErrorType::Invalid,
                        Some(format!("\"{t}\"")),
                        e.message.clone(),
                    )
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["spec"],
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1, "pattern": "^[a-z]+$"},
                        "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                        "count": {"type": "integer", "minimum": 0, "maximum": 5},
                        "opt": {"type": "string", "nullable": true},
                        "nested": {
                            "type": "object",
                            "properties": {"flag": {"type": "boolean", "default": true}}
                        },
                        "tags": {"type": "array", "items": {"type": "string"}, "x-kubernetes-list-type": "set"},
                        "env": {"type": "object", "additionalProperties": {"type": "string"}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "port": {"x-kubernetes-int-or-string": true}
                    }
                }
            }
        })
    }

    fn run(mut obj: Value) -> (Value, Vec<String>) {
        let s = schema();
        prune_root(&s, &mut obj);
        apply_defaults(&s, &mut obj, true);
        let mut errs = Vec::new();
        validate(&s, &obj, "", &mut errs);
        (obj, errs.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn prunes_defaults_and_keeps_type_meta() {
        let (obj, errs) = run(json!({
            "apiVersion": "x/v1", "kind": "X",
            "metadata": {"name": "a", "bogus": 1},
            "spec": {"name": "abc", "unknown": 1, "opt": null, "count": null,
                     "nested": {}, "env": {"A": "b"}, "free": {"any": {"thing": 1}}},
            "extra": true
        }));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            obj,
            json!({
                "apiVersion": "x/v1", "kind": "X",
                "metadata": {"name": "a"},
                "spec": {"name": "abc", "opt": null, "nested": {"flag": true},
                         "env": {"A": "b"}, "free": {"any": {"thing": 1}}, "mode": "A"}
            })
        );
    }

    #[test]
    fn reports_errors_like_the_real_server() {
        let (_, errs) = run(
            json!({"spec": {"name": "", "mode": "C", "count": 9, "tags": ["a", "a"], "port": true}}),
        );
        assert_eq!(
            errs,
            vec![
                "spec.name: Invalid value: \"\": spec.name in body should be at least 1 chars long",
                "spec.name: Invalid value: \"\": spec.name in body should match '^[a-z]+$'",
                "spec.mode: Unsupported value: \"C\": supported values: \"A\", \"B\"",
                "spec.count: Invalid value: 9: spec.count in body should be less than or equal to 5",
                "spec.tags[1]: Duplicate value: \"a\"",
                "spec.port: Invalid value: \"boolean\": spec.port in body must be of type integer,string: \"boolean\"",
            ]
        );
        let (_, errs) = run(json!({"spec": {"count": "x"}}));
        assert_eq!(
            errs,
            vec![
                "spec.name: Required value",
                "spec.count: Invalid value: \"string\": spec.count in body must be of type integer: \"string\"",
            ]
        );
        let (_, errs) = run(json!({}));
        assert_eq!(errs, vec!["spec: Required value"]);
    }

    #[test]
    fn junctors() {
        let s = json!({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]});
        let mut errs = Vec::new();
        validate(&s, &json!({"a": 1}), "spec", &mut errs);
        assert!(errs.is_empty());
        validate(&s, &json!({"a": 1, "b": 2}), "spec", &mut errs);
        assert_eq!(errs.len(), 1);
    }

    #[test]
    fn value_lookup_by_error_path() {
        let obj = json!({"spec": {"list": [{"n": "x"}], "m": {"k": 1}}});
        assert_eq!(value_at(&obj, "spec.list[0].n"), Some(&json!("x")));
        assert_eq!(value_at(&obj, "spec.m[k]"), Some(&json!(1)));
        assert_eq!(value_at(&obj, "spec.missing"), None);
    }
}
