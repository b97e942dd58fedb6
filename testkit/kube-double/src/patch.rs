//! The PATCH body formats, by Content-Type.

use serde_json::Value;

use crate::error::ApiError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PatchType {
    /// RFC 7386.
    Merge,
    /// Applied as a merge patch: no patch strategies or directives.
    Strategic,
    /// RFC 6902.
    Json,
    /// Server-side apply; merged like a merge patch, without field ownership.
    Apply,
}

impl PatchType {
    pub fn from_content_type(ct: &str) -> Option<PatchType> {
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime {
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::Strategic),
            "application/json-patch+json" => Some(PatchType::Json),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                Some(PatchType::Apply)
            }
            _ => None,
        }
    }
}

pub(crate) const SUPPORTED: &str =
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml";

/// Parses a JSON body; server-side apply bodies may also be YAML.
pub(crate) fn parse_body(body: &[u8], patch_type: PatchType) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(json_err) if patch_type == PatchType::Apply => {
            let text = std::str::from_utf8(body).map_err(|_| {
                ApiError::bad_request("the apply body is neither JSON nor UTF-8 YAML")
            })?;
            serde_saphyr::from_str::<Value>(text).map_err(|yaml_err| {
                ApiError::bad_request(format!(
                    "error decoding YAML: {yaml_err} (as JSON: {json_err})"
                ))
            })
        }
        Err(e) => Err(ApiError::bad_request(format!("error decoding patch: {e}"))),
    }
}

/// Applies a merge, strategic or JSON patch to a copy of `target`.
pub(crate) fn apply(
    target: &Value,
    patch_type: PatchType,
    patch: &Value,
) -> Result<Value, ApiError> {
    let mut doc = target.clone();
    match patch_type {
        PatchType::Merge | PatchType::Strategic | PatchType::Apply => {
            if !patch.is_object() {
                return Err(ApiError::bad_request(
                    "a merge patch body must be a JSON object",
                ));
            }
            json_patch::merge(&mut doc, patch);
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("error decoding JSON patch: {e}")))?;
            for op in &ops.0 {
                // The real server's JSON patch library lets `test` of a null
                // value pass on a missing path; kube-runtime's finalizer
                // helper relies on that when an object has no finalizers yet.
                if let json_patch::PatchOperation::Test(t) = op
                    && t.value.is_null()
                    && doc.pointer(t.path.as_str()).is_none_or(Value::is_null)
                {
                    continue;
                }
                json_patch::patch(&mut doc, std::slice::from_ref(op)).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch could not be applied: {e}"),
                    )
                })?;
            }
        }
    }
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn content_types() {
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8"),
            Some(PatchType::Merge)
        );
        assert_eq!(PatchType::from_content_type("application/json"), None);
    }

    #[test]
    fn merge_and_json_patches() {
        let doc = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        let merged = apply(
            &doc,
            PatchType::Merge,
            &json!({"a": {"b": null, "d": 3}, "l": [3]}),
        )
        .expect("merge applies");
        assert_eq!(merged, json!({"a": {"c": 2, "d": 3}, "l": [3]}));
        let patched = apply(
            &doc,
            PatchType::Json,
            &json!([{"op": "replace", "path": "/a/b", "value": 5}, {"op": "add", "path": "/l/-", "value": 9}]),
        )
        .expect("json patch applies");
        assert_eq!(patched, json!({"a": {"b": 5, "c": 2}, "l": [1, 2, 9]}));
        let failed = apply(
            &doc,
            PatchType::Json,
            &json!([{"op": "test", "path": "/a/b", "value": 7}]),
        );
        assert_eq!(failed.map_err(|e| e.code), Err(422));
        let missing_is_null = apply(
            &doc,
            PatchType::Json,
            &json!([{"op": "test", "path": "/x", "value": null}, {"op": "add", "path": "/x", "value": [1]}]),
        )
        .expect("a missing path tests as null");
        assert_eq!(missing_is_null["x"], json!([1]));
        let missing_is_not_a_value = apply(
            &doc,
            PatchType::Json,
            &json!([{"op": "test", "path": "/x", "value": 1}]),
        );
        assert!(missing_is_not_a_value.is_err());
    }

    #[test]
    fn apply_bodies_may_be_yaml() {
        let v = parse_body(b"apiVersion: v1\nkind: ConfigMap\n", PatchType::Apply)
            .expect("yaml parses");
        assert_eq!(v, json!({"apiVersion": "v1", "kind": "ConfigMap"}));
        assert!(parse_body(b"a: b", PatchType::Merge).is_err());
    }
}
