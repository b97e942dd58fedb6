//! ObjectMeta: the fields the server owns, and the syntax checks the real
//! server applies to names, labels, annotations and finalizers of every kind.

use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

use regex::Regex;
use serde_json::{Map, Value};

use crate::schema::FieldError;

/// The ObjectMeta fields a client may send; pruning keeps only these.
pub(crate) const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

pub(crate) fn metadata(obj: &Value) -> Option<&Map<String, Value>> {
    obj.get("metadata").and_then(Value::as_object)
}

/// The object's metadata map, created if missing or not an object.
pub(crate) fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = Value::Object(Map::new());
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata was just made an object")
}

pub(crate) fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    metadata(obj)?.get(field)?.as_str()
}

pub(crate) fn finalizers(obj: &Value) -> Vec<String> {
    metadata(obj)
        .and_then(|m| m.get("finalizers"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn is_deleting(obj: &Value) -> bool {
    metadata(obj).is_some_and(|m| m.get("deletionTimestamp").is_some_and(|t| !t.is_null()))
}

pub(crate) fn resource_version(obj: &Value) -> Option<&str> {
    meta_str(obj, "resourceVersion").filter(|s| !s.is_empty())
}

/// RFC 3339 in whole seconds, as Kubernetes timestamps are.
pub(crate) fn now() -> String {
    seconds_from_now(0)
}

/// [`now`] moved by `secs` (a graceful deletion's deadline).
pub(crate) fn seconds_from_now(secs: i64) -> String {
    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(secs);
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// A timestamp moved by `secs`; None if it is not RFC 3339.
pub(crate) fn shift_time(time: &str, secs: i64) -> Option<String> {
    let at: jiff::Timestamp = time.parse().ok()?;
    let at = at + jiff::SignedDuration::from_secs(secs);
    Some(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// ObjectMeta's lists and maps are `omitempty` on a real server: an empty
/// one written is not stored, so `finalizers: []` reads back as absent.
pub(crate) fn drop_empty_meta(obj: &mut Value) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    for field in [
        "labels",
        "annotations",
        "finalizers",
        "ownerReferences",
        "managedFields",
    ] {
        let empty = match meta.get(field) {
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(m)) => m.is_empty(),
            Some(Value::Null) => true,
            _ => false,
        };
        if empty {
            meta.shift_remove(field);
        }
    }
}

/// An object as a client sees it at `api_version`, or only its metadata when
/// the client asked for `PartialObjectMetadata`.
pub(crate) fn present(obj: &Value, api_version: &str, meta_only: bool) -> Value {
    if meta_only {
        return serde_json::json!({
            "apiVersion": "meta.k8s.io/v1",
            "kind": "PartialObjectMetadata",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Object(Map::new())),
        });
    }
    let mut out = obj.clone();
    if let Some(m) = out.as_object_mut() {
        m.insert("apiVersion".into(), Value::String(api_version.to_owned()));
    }
    out
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn random_u64() -> u64 {
    // RandomState is seeded per process; hashing a sequence number gives
    // distinct, unpredictable-enough values without a rand dependency.
    RandomState::new().hash_one(SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

/// A version-4-shaped UUID.
pub(crate) fn new_uid() -> String {
    let a = random_u64();
    let b = random_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48 & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// The 5-character suffix `generateName` gets, from the same alphabet the
/// real server uses (no vowels, no confusable digits).
pub(crate) fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = random_u64();
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
            n /= ALPHABET.len() as u64;
            c
        })
        .collect()
}

static DNS_SUBDOMAIN: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
        .expect("valid regex")
});
static DNS_LABEL: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$").expect("valid regex"));
static QUALIFIED_NAME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$").expect("valid regex")
});
static LABEL_VALUE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$").expect("valid regex")
});

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() > 253 {
        return Err("must be no more than 253 characters".into());
    }
    if !DNS_SUBDOMAIN.is_match(s) {
        return Err("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')".into());
    }
    Ok(())
}

fn check_dns_label(s: &str) -> Result<(), String> {
    if s.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !DNS_LABEL.is_match(s) {
        return Err("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')".into());
    }
    Ok(())
}

/// A label or annotation key: optional DNS-subdomain prefix and a name.
pub(crate) fn check_qualified_name(key: &str) -> Result<(), String> {
    let name = match key.split_once('/') {
        Some((prefix, name)) => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty".into());
            }
            check_dns_subdomain(prefix).map_err(|e| format!("prefix part {e}"))?;
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !QUALIFIED_NAME.is_match(name) {
        return Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')".into());
    }
    Ok(())
}

pub(crate) fn check_label_value(value: &str) -> Result<(), String> {
    if value.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !LABEL_VALUE.is_match(value) {
        return Err("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')".into());
    }
    Ok(())
}

/// The ObjectMeta checks every kind gets: name syntax, label and annotation
/// syntax, finalizer syntax.
pub(crate) fn validate(obj: &Value, cluster_namespace: bool) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let Some(meta) = metadata(obj) else {
        errs.push(FieldError::required("metadata", ""));
        return errs;
    };
    match meta.get("name").and_then(Value::as_str) {
        None | Some("") => errs.push(FieldError::required(
            "metadata.name",
            "name or generateName is required",
        )),
        Some(name) => {
            let check = if cluster_namespace {
                check_dns_label(name)
            } else {
                check_dns_subdomain(name)
            };
            if let Err(e) = check {
                errs.push(FieldError::invalid(
                    "metadata.name",
                    &Value::String(name.to_owned()),
                    &e,
                ));
            }
        }
    }
    match meta.get("labels") {
        None | Some(Value::Null) => {}
        Some(Value::Object(labels)) => {
            for (k, v) in labels {
                if let Err(e) = check_qualified_name(k) {
                    errs.push(FieldError::invalid(
                        "metadata.labels",
                        &Value::String(k.clone()),
                        &e,
                    ));
                }
                match v.as_str() {
                    Some(s) => {
                        if let Err(e) = check_label_value(s) {
                            errs.push(FieldError::invalid("metadata.labels", v, &e));
                        }
                    }
                    None => errs.push(FieldError::type_mismatch(
                        &format!("metadata.labels.{k}"),
                        v,
                        "string",
                    )),
                }
            }
        }
        Some(other) => errs.push(FieldError::type_mismatch(
            "metadata.labels",
            other,
            "object",
        )),
    }
    match meta.get("annotations") {
        None | Some(Value::Null) => {}
        Some(Value::Object(annotations)) => {
            for (k, v) in annotations {
                if let Err(e) = check_qualified_name(&k.to_ascii_lowercase()) {
                    errs.push(FieldError::invalid(
                        "metadata.annotations",
                        &Value::String(k.clone()),
                        &e,
                    ));
                }
                if !v.is_string() {
                    errs.push(FieldError::type_mismatch(
                        &format!("metadata.annotations.{k}"),
                        v,
                        "string",
                    ));
                }
            }
        }
        Some(other) => errs.push(FieldError::type_mismatch(
            "metadata.annotations",
            other,
            "object",
        )),
    }
    match meta.get("finalizers") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, f) in list.iter().enumerate() {
                let path = format!("metadata.finalizers[{i}]");
                match f.as_str() {
                    Some(s) => {
                        if let Err(e) = check_qualified_name(s) {
                            errs.push(FieldError::invalid(&path, f, &e));
                        }
                    }
                    None => errs.push(FieldError::type_mismatch(&path, f, "string")),
                }
            }
        }
        Some(other) => errs.push(FieldError::type_mismatch(
            "metadata.finalizers",
            other,
            "array",
        )),
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_distinct_and_uuid_shaped() {
        let a = new_uid();
        let b = new_uid();
        assert_ne!(a, b);
        assert_eq!(a.len(), 36);
        assert_eq!(a.matches('-').count(), 4);
    }

    #[test]
    fn names_and_labels() {
        assert!(check_dns_subdomain("my-app.example").is_ok());
        assert!(check_dns_subdomain("My_App").is_err());
        assert!(check_qualified_name("app.kubernetes.io/name").is_ok());
        assert!(check_qualified_name("/name").is_err());
        assert!(check_label_value("").is_ok());
        assert!(check_label_value("-bad").is_err());
        assert_eq!(name_suffix().len(), 5);
    }
}
