//! `PluginBinding`: enables or disables plugins for a type or an instance.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{MAX_PLUGIN_ID_LENGTH, MAX_PLUGINS_PER_BINDING, ObjectStatus, Target};

/// Enables or disables Claude Code plugins for every instance of an agent type
/// or for one instance.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentenv.io",
    version = "v1alpha1",
    kind = "PluginBinding",
    namespaced,
    status = "ObjectStatus",
    shortname = "pb",
    category = "agentenv",
    derive = "PartialEq",
    doc = "Enables or disables Claude Code plugins for an agent type or one instance.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.target.agentType"),
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.target.instance"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PluginBindingSpec {
    /// The instances this binding applies to.
    pub target: Target,
    /// Plugins to enable or disable; each name at most once.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    #[schemars(length(max = MAX_PLUGINS_PER_BINDING))]
    pub plugins: Vec<PluginRef>,
}

/// One plugin of a binding.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PluginRef {
    /// Plugin id, `<plugin>@<marketplace>`.
    #[schemars(length(max = MAX_PLUGIN_ID_LENGTH))]
    #[x_kube(validation = Rule::new(r"self.matches('^[^@\\s]+@[^@\\s]+$')").message("must be <plugin>@<marketplace> with no spaces and exactly one @"))]
    pub name: String,
    /// `true` renders `"<id>": true`, `false` renders `"<id>": false`.
    #[serde(default = "super::default_true")]
    pub enabled: bool,
}
