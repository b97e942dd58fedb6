//! `AgentInstance`: one agent and its env dir.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{MAX_ENV_DIR_PATH_LENGTH, MAX_NAME_LENGTH, MAX_SHORT_LENGTH};

/// One Claude Code agent whose env dir (`CLAUDE_CONFIG_DIR`) the operator renders.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentenv.io",
    version = "v1alpha1",
    kind = "AgentInstance",
    namespaced,
    status = "AgentInstanceStatus",
    shortname = "agi",
    category = "agentenv",
    derive = "PartialEq",
    doc = "One Claude Code agent whose env dir the operator renders.",
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.agentType"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Plugins",
        type_ = "integer",
        json_path = ".status.rendered.plugins"
    ),
    printcolumn(
        name = "MCP Servers",
        type_ = "integer",
        json_path = ".status.rendered.mcpServers"
    ),
    printcolumn(
        name = "Pods Current",
        type_ = "string",
        json_path = ".status.sidecar.podsCurrent"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentInstanceSpec {
    /// The agent type; PluginBindings, PluginMarketplaces and McpServers with
    /// `target.agentType` equal to this value apply to the instance, as do the
    /// builtin plugins of this type.
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub agent_type: String,
    /// Where the env dir lives under the operator's env root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_dir: Option<EnvDir>,
    /// The workload that runs this agent, restarted when its config changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadRef>,
    /// When and how the workload is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<RestartPolicy>,
    /// What happens to plugins, marketplaces and MCP servers a user adds at
    /// runtime: `Preserve` adopts them so they survive restarts and rebuilds,
    /// `Revert` removes them.
    #[serde(default)]
    pub runtime_installs: RuntimeInstalls,
    /// Stop rendering this instance; its files are left as they are.
    #[serde(default)]
    pub suspend: bool,
    /// How the render reaches the agent: written by the operator into a
    /// volume it mounts (`Volume`, the default), or published for an
    /// `agent-env sidecar` in the agent's pod that writes it into a
    /// pod-local volume (`Sidecar`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

impl AgentInstanceSpec {
    /// The delivery mode, `Volume` when unset.
    pub fn delivery_mode(&self) -> DeliveryMode {
        self.delivery
            .as_ref()
            .map_or(DeliveryMode::Volume, |d| d.mode)
    }
}

/// How the render reaches the agent's env dir.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Sidecar' || has(self.serviceAccountName)").message("serviceAccountName is required with mode Sidecar: it names the only identity allowed to read this instance's render"))]
pub struct Delivery {
    /// `Volume` (default): the operator writes the env dir on the volume it
    /// mounts (ReadWriteMany or hostPath). `Sidecar`: the operator publishes
    /// the render in the Secret `agent-env-render-<instance>` and an
    /// `agent-env sidecar` container in each agent pod writes it into that
    /// pod's own volume.
    #[serde(default)]
    pub mode: DeliveryMode,
    /// With `Sidecar`: the ServiceAccount the agent's pods run as. The
    /// operator grants it reading this instance's render and writing its
    /// report, and nothing else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub service_account_name: Option<String>,
}

/// Where the env dir is written.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeliveryMode {
    /// The operator writes the env dir on a volume it mounts.
    #[default]
    Volume,
    /// A sidecar in each agent pod writes the env dir into a pod-local volume.
    Sidecar,
}

/// The env dir of an instance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EnvDir {
    /// Path relative to the env root. Defaults to `<namespace>/<name>`. Must
    /// lie under `<namespace>/`; never absolute, never with `.` or `..`
    /// segments, never under `.agent-env`, never the env dir of another
    /// instance, inside one or holding one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_ENV_DIR_PATH_LENGTH))]
    #[x_kube(validation = Rule::new("!self.startsWith('/')").message("must be relative to the env root"))]
    #[x_kube(validation = Rule::new("!self.matches('(^|/)[.][.]?(/|$)')").message("must not contain '.' or '..' segments"))]
    #[x_kube(validation = Rule::new("!self.matches('^[.]agent-env(/|$)')").message("must not be under .agent-env, which holds the operator's state"))]
    pub path: Option<String>,
    /// Owner uid given to the files the operator writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Owner gid given to the files the operator writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// What happens to the env dir when the AgentInstance is deleted: `Retain`
    /// (default) leaves it, `Delete` removes it.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What happens to an env dir when its AgentInstance is deleted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeletionPolicy {
    /// Leave the env dir on the volume.
    #[default]
    Retain,
    /// Remove the env dir.
    Delete,
}

/// The workload running an agent.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadRef {
    /// Kind of the workload.
    pub kind: WorkloadKind,
    /// Name of the workload in the instance's namespace.
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub name: String,
}

/// Kinds of workload the operator can restart.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// An apps/v1 Deployment.
    Deployment,
    /// An apps/v1 StatefulSet.
    StatefulSet,
    /// A bare Pod.
    Pod,
}

/// When and how a workload is restarted.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartPolicy {
    /// Restart when the rendered config changed.
    #[serde(default = "super::default_true")]
    pub on_change: bool,
    /// Restart after drift was corrected.
    #[serde(default)]
    pub on_drift: bool,
    /// How to restart: `Evict` the workload's pods or `RolloutRestart` its template.
    #[serde(default)]
    pub strategy: RestartStrategy,
    /// Least time between two restarts of the workload, e.g. `30s` or `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_SHORT_LENGTH))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(ms|s|m|h))+$')").message("must be a duration such as 500ms, 30s, 5m or 1h"))]
    pub min_interval: Option<String>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            on_change: true,
            on_drift: false,
            strategy: RestartStrategy::default(),
            min_interval: None,
        }
    }
}

/// How a workload is restarted.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestartStrategy {
    /// Evict the workload's pods one at a time through the eviction API.
    #[default]
    Evict,
    /// Annotate the pod template, like `kubectl rollout restart`.
    RolloutRestart,
}

/// What happens to entries a user adds at runtime.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RuntimeInstalls {
    /// Adopt runtime installs; they survive restarts and rebuilds.
    #[default]
    Preserve,
    /// Remove runtime installs; only the declared set is rendered.
    Revert,
}

// The records are boxed: every instance object carries its status inline,
// most with none of them (manifests on a host have no status), and the
// objects of a whole fleet are held at once.
/// Observed state of an AgentInstance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentInstanceStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// kstatus conditions: `Ready`, `Reconciling`, `Stalled`, `SecretsResolved`, `InSync`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// What was last rendered into the env dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendered: Option<Box<RenderSummary>>,
    /// The last drift the operator corrected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drift: Option<Box<DriftRecord>>,
    /// The last restart the operator asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_restart: Option<Box<RestartRecord>>,
    /// The `reconcile.fluxcd.io/requestedAt` annotation value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_handled_reconcile_at: Option<String>,
    /// With `delivery.mode: Sidecar`: which pods applied the current render.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sidecar: Option<Box<SidecarStatus>>,
}

/// How far the sidecars of an instance's pods are.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarStatus {
    /// Digest of the render now published.
    pub render_digest: String,
    /// `<pods that applied the current render>/<pods>`, e.g. `2/3`.
    pub pods_current: String,
    /// Each running pod's sidecar, as it last reported.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<SidecarPod>,
}

/// One pod's sidecar, as it last reported.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarPod {
    /// The pod's name.
    pub name: String,
    /// Whether the pod's env dir holds the current render.
    pub current: bool,
    /// What the sidecar last reported (`Rendered`, `UpToDate`,
    /// `WriteFailed`, ...); `NotReported` when it has not yet.
    pub reason: String,
    /// What a human should know.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When it last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// Summary of one render; never holds a secret value.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RenderSummary {
    /// Number of `enabledPlugins` entries written (including `false` ones).
    pub plugins: i32,
    /// Number of `extraKnownMarketplaces` entries written.
    pub marketplaces: i32,
    /// Number of `mcpServers` entries written.
    pub mcp_servers: i32,
    /// SHA-256 over the owned keys as rendered.
    pub content_hash: String,
    /// When this render was checked or written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Where each entry came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entries: Vec<EntrySource>,
    /// Runtime installs that were adopted, as `<key>/<name>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<String>,
}

/// Which scope one rendered entry came from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EntrySource {
    /// `enabledPlugins`, `extraKnownMarketplaces` or `mcpServers`.
    pub key: String,
    /// The entry's name within the key.
    pub name: String,
    /// `builtin`, `type`, `instance` or `installed`.
    pub scope: String,
    /// The object that decided it, `<Kind>/<name>`, when the scope is `type` or `instance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
}

/// A drift correction.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DriftRecord {
    /// When it was corrected.
    pub time: Time,
    /// The entries put back, as `<key>/<name>`.
    pub entries: Vec<String>,
}

/// A restart request.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RestartRecord {
    /// When it was asked for.
    pub time: Time,
    /// Why: `ConfigChanged` or `DriftCorrected`.
    pub reason: String,
}
