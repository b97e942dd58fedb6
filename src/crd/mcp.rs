//! `McpServer`: an MCP server made available to the agents.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::common::{
    MAX_ARGS, MAX_HEADERS, MAX_NAME_LENGTH, MAX_PATH_LENGTH, MAX_TIMEOUT_MS, MAX_URL_LENGTH,
    MAX_VALUE_LENGTH, MapBounds, ObjectStatus, Target,
};

/// An MCP server (`mcpServers` in `.claude.json`) for every instance of an
/// agent type or for one instance. `${SECRET:NAME}` placeholders in `args`,
/// `env` values, `url` and `headers` values are filled from labelled Secrets.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "agentenv.io",
    version = "v1alpha1",
    kind = "McpServer",
    namespaced,
    status = "ObjectStatus",
    shortname = "mcps",
    category = "agentenv",
    derive = "PartialEq",
    doc = "An MCP server made available to an agent type or one instance.",
    validation = Rule::new("(has(self.spec.name) ? self.spec.name : self.metadata.name) != 'workspace'").message("the MCP server name 'workspace' is reserved by Claude Code"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.target.agentType"),
    printcolumn(name = "Instance", type_ = "string", json_path = ".spec.target.instance"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Instances", type_ = "integer", json_path = ".status.instances"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.stdio), has(self.http), has(self.sse)].filter(x, x).size() == 1").message("set exactly one of stdio, http or sse"))]
pub struct McpServerSpec {
    /// The instances this server applies to.
    pub target: Target,
    /// Server name in `mcpServers`. Defaults to `metadata.name`; `workspace` is reserved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_NAME_LENGTH))]
    pub name: Option<String>,
    /// A server the agent starts as a child process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdio: Option<StdioServer>,
    /// A streamable HTTP server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<RemoteServer>,
    /// A server-sent events server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sse: Option<RemoteServer>,
    /// Timeout in milliseconds, rendered as `"timeout": <ms>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = MAX_TIMEOUT_MS))]
    pub timeout: Option<u64>,
    /// `false` removes the server from the instances this object applies to.
    #[serde(default = "super::default_true")]
    pub enabled: bool,
}

/// A stdio MCP server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StdioServer {
    /// Program to run. Secret placeholders are not allowed here.
    #[schemars(length(min = 1, max = MAX_PATH_LENGTH))]
    #[x_kube(validation = Rule::new("!self.contains('${SECRET:')").message("secret placeholders are not allowed in command; pass secrets in args or env"))]
    pub command: String,
    /// Arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ARGS), inner(length(max = MAX_VALUE_LENGTH)))]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = MapBounds { entries: MAX_ARGS, value_length: MAX_VALUE_LENGTH })]
    pub env: BTreeMap<String, String>,
}

/// An HTTP or SSE MCP server.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemoteServer {
    /// Server URL.
    #[schemars(length(min = 1, max = MAX_URL_LENGTH))]
    pub url: String,
    /// HTTP headers sent with every request.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = MapBounds { entries: MAX_HEADERS, value_length: MAX_VALUE_LENGTH })]
    pub headers: BTreeMap<String, String>,
}
