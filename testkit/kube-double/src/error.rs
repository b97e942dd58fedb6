//! Errors as the `meta/v1 Status` objects a real API server answers with, so
//! kube-client turns them into `kube::Error::Api` with the usual reason.

use serde_json::{Value, json};

use crate::kinds::Kind;
use crate::schema::FieldError;

#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Value>,
}

/// `pods` or `agentinstances.agentenv.io`, as real messages name resources.
pub(crate) fn qualified_resource(group: &str, plural: &str) -> String {
    if group.is_empty() {
        plural.to_owned()
    } else {
        format!("{plural}.{group}")
    }
}

/// `Pod` or `AgentInstance.agentenv.io`, as real validation messages name kinds.
pub(crate) fn qualified_kind(kind: &Kind) -> String {
    if kind.group.is_empty() {
        kind.kind.clone()
    } else {
        format!("{}.{}", kind.kind, kind.group)
    }
}

fn name_details(kind: &Kind, name: &str) -> Value {
    json!({"name": name, "group": kind.group, "kind": kind.plural})
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", message)
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(415, "UnsupportedMediaType", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(500, "InternalError", message)
    }

    /// A path the server has no handler for at all.
    pub fn path_not_found() -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        )
    }

    pub fn not_found(kind: &Kind, name: &str) -> Self {
        ApiError {
            details: Some(name_details(kind, name)),
            ..Self::new(
                404,
                "NotFound",
                format!(
                    "{} \"{name}\" not found",
                    qualified_resource(&kind.group, &kind.plural)
                ),
            )
        }
    }

    pub fn already_exists(kind: &Kind, name: &str) -> Self {
        ApiError {
            details: Some(name_details(kind, name)),
            ..Self::new(
                409,
                "AlreadyExists",
                format!(
                    "{} \"{name}\" already exists",
                    qualified_resource(&kind.group, &kind.plural)
                ),
            )
        }
    }

    pub fn conflict(kind: &Kind, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(name_details(kind, name)),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": {why}",
                    qualified_resource(&kind.group, &kind.plural)
                ),
            )
        }
    }

    pub fn modified(kind: &Kind, name: &str) -> Self {
        Self::conflict(
            kind,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// 422 naming every field error, joined the way the real server joins
    /// them (`[a, b]` when there are several, each message once; the causes
    /// keep every error).
    pub fn invalid(kind: &Kind, name: &str, errors: &[FieldError]) -> Self {
        let mut all: Vec<String> = Vec::new();
        for e in errors {
            let e = e.to_string();
            if !all.contains(&e) {
                all.push(e);
            }
        }
        let joined = if all.len() == 1 {
            all.remove(0)
        } else {
            format!("[{}]", all.join(", "))
        };
        let causes: Vec<Value> = errors
            .iter()
            .map(|e| json!({"reason": e.reason(), "message": e.body(), "field": e.path}))
            .collect();
        ApiError {
            details: Some(json!({
                "name": name,
                "group": kind.group,
                "kind": kind.kind,
                "causes": causes,
            })),
            ..Self::new(
                422,
                "Invalid",
                format!("{} \"{name}\" is invalid: {joined}", qualified_kind(kind)),
            )
        }
    }

    /// 403 for a request the object's state forbids.
    pub fn forbidden(group: &str, plural: &str, name: &str, why: &str) -> Self {
        ApiError {
            details: Some(json!({"name": name, "group": group, "kind": plural})),
            ..Self::new(
                403,
                "Forbidden",
                format!(
                    "{} \"{name}\" is forbidden: {why}",
                    qualified_resource(group, plural)
                ),
            )
        }
    }

    /// What a watch from a compacted resourceVersion gets.
    pub fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        // A Status a handler built by hand may carry no reason at all.
        if self.reason.is_empty()
            && let Some(m) = status.as_object_mut()
        {
            m.shift_remove("reason");
        }
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// The Status a successful eviction (or a Status-returning delete) answers.
pub(crate) fn success_status(code: u16) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": code,
    })
}
