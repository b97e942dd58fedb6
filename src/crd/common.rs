//! Types shared by the four custom resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// API group of every custom resource.
pub const GROUP: &str = "agentenv.io";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";
/// The `kubectl get agentenv` category shared by all four kinds.
pub const CATEGORY: &str = "agentenv";
/// Label a Secret must carry before its values may be rendered into an agent.
pub const SECRETS_LABEL: &str = "agentenv.io/secrets";

// Bounds of the spec fields. The API server needs them to price the CEL
// rules (without them it assumes strings and lists as long as a whole
// request and refuses the CRD), and they are real limits: the CRDs carry them
// as `maxLength`, `maxItems`, `maxProperties` and `maximum`, and local
// manifests are checked against the same schema.

/// Longest name: object names, agent types, targets, MCP server and marketplace names.
pub const MAX_NAME_LENGTH: u64 = 253;
/// Longest plugin id, `<plugin>@<marketplace>`.
pub const MAX_PLUGIN_ID_LENGTH: u64 = 512;
/// Most plugins one PluginBinding lists.
pub const MAX_PLUGINS_PER_BINDING: u64 = 1024;
/// Longest env dir path (relative to the env root).
pub const MAX_ENV_DIR_PATH_LENGTH: u64 = 1024;
/// Longest absolute path on the agent's filesystem (Linux `PATH_MAX`).
pub const MAX_PATH_LENGTH: u64 = 4096;
/// Longest URL.
pub const MAX_URL_LENGTH: u64 = 8192;
/// Longest short token: a git ref, a duration, a GitHub `<owner>/<repo>`.
pub const MAX_SHORT_LENGTH: u64 = 256;
/// Most headers of one server or marketplace.
pub const MAX_HEADERS: u64 = 64;
/// Most arguments and most environment variables of one stdio server.
pub const MAX_ARGS: u64 = 256;
/// Longest header value, argument or environment value.
pub const MAX_VALUE_LENGTH: u64 = 32 * 1024;
/// Longest MCP timeout, in milliseconds (one day).
pub const MAX_TIMEOUT_MS: u64 = 86_400_000;

/// Bounds a map field: how many entries and how long each value may be.
/// (schemars' `length` and `inner` reach strings and list items, not map
/// values.)
pub(crate) struct MapBounds {
    pub entries: u64,
    pub value_length: u64,
}

impl schemars::transform::Transform for MapBounds {
    fn transform(&mut self, schema: &mut schemars::Schema) {
        schema.insert("maxProperties".into(), self.entries.into());
        if let Some(values) = schema
            .get_mut("additionalProperties")
            .and_then(serde_json::Value::as_object_mut)
        {
            values.insert("maxLength".into(), self.value_length.into());
        }
    }
}

/// Which instances of the namespace an object applies to: every instance of one
/// agent type, or one named instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.agentType) != has(self.instance)").message("set exactly one of agentType or instance"))]
pub struct Target {
    /// Applies to every AgentInstance in this namespace whose `spec.agentType` is this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub agent_type: Option<String>,
    /// Applies to the AgentInstance of this name in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub instance: Option<String>,
}

/// The scope a declared object applies at, derived from a valid [`Target`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// `target.agentType`
    Type(String),
    /// `target.instance`
    Instance(String),
}

impl Target {
    /// The scope this target names, or `None` when it does not name exactly one.
    pub fn scope(&self) -> Option<Scope> {
        match (&self.agent_type, &self.instance) {
            (Some(t), None) if !t.is_empty() => Some(Scope::Type(t.clone())),
            (None, Some(i)) if !i.is_empty() => Some(Scope::Instance(i.clone())),
            _ => None,
        }
    }
}

/// Status shared by PluginBinding, PluginMarketplace and McpServer.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many AgentInstances this object currently applies to.
    #[serde(default)]
    pub instances: i32,
    /// Same-layer conflicts this object takes part in, one line each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conflicts: Vec<String>,
}

/// An RFC 1123 label, as Kubernetes requires of a namespace.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An RFC 1123 subdomain, as Kubernetes requires of most object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}
