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

/// Which instances of the namespace an object applies to: every instance of one
/// agent type, or one named instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.agentType) != has(self.instance)").message("set exactly one of agentType or instance"))]
pub struct Target {
    /// Applies to every AgentInstance in this namespace whose `spec.agentType` is this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub agent_type: Option<String>,
    /// Applies to the AgentInstance of this name in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
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
