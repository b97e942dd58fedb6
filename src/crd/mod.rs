//! The custom resources: Rust types are the source of truth for the CRD YAML in `crds/`.

// Each `printcolumn(...)` repeats `type_ = "string"` and the like; clippy takes
// these derive arguments for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

mod binding;
mod common;
mod instance;
mod marketplace;
mod mcp;

pub use binding::{PluginBinding, PluginBindingSpec, PluginRef};
pub use common::{
    CATEGORY, GROUP, ObjectStatus, SECRETS_LABEL, Scope, Target, VERSION, is_dns_label,
    is_dns_subdomain,
};
pub use instance::{
    AgentInstance, AgentInstanceSpec, AgentInstanceStatus, DeletionPolicy, DriftRecord,
    EntrySource, EnvDir, RenderSummary, RestartPolicy, RestartRecord, RestartStrategy,
    RuntimeInstalls, WorkloadKind, WorkloadRef,
};
pub use marketplace::{
    GitSource, GithubSource, MarketplaceSource, PathSource, PluginMarketplace,
    PluginMarketplaceSpec, UrlSource,
};
pub use mcp::{McpServer, McpServerSpec, RemoteServer, StdioServer};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

fn default_true() -> bool {
    true
}

/// The four CRDs, in the order `agent-env crd` prints them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        AgentInstance::crd(),
        PluginBinding::crd(),
        PluginMarketplace::crd(),
        McpServer::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, as committed in `crds/`.
pub fn to_yaml() -> String {
    all()
        .iter()
        .map(|crd| {
            let yaml = serde_saphyr::to_string(crd).expect("a CRD always serializes");
            format!("---\n{yaml}")
        })
        .collect()
}
