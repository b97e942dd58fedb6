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
    CATEGORY, GROUP, MAX_ARGS, MAX_ENV_DIR_PATH_LENGTH, MAX_HEADERS, MAX_NAME_LENGTH,
    MAX_PATH_LENGTH, MAX_PLUGIN_ID_LENGTH, MAX_PLUGINS_PER_BINDING, MAX_SHORT_LENGTH,
    MAX_TIMEOUT_MS, MAX_URL_LENGTH, MAX_VALUE_LENGTH, ObjectStatus, SECRETS_LABEL, Scope, Target,
    VERSION, is_dns_label, is_dns_subdomain,
};
pub use instance::{
    AgentInstance, AgentInstanceSpec, AgentInstanceStatus, DeletionPolicy, Delivery, DeliveryMode,
    DriftRecord, EntrySource, EnvDir, RenderSummary, RestartPolicy, RestartRecord, RestartStrategy,
    RuntimeInstalls, SidecarPod, SidecarStatus, WorkloadKind, WorkloadRef,
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
        definition::<AgentInstance>(),
        definition::<PluginBinding>(),
        definition::<PluginMarketplace>(),
        definition::<McpServer>(),
    ]
}

/// The CRD of one kind as the API server takes it: the derived one with
/// integer formats Kubernetes does not know (`uint32`, `uint64`, ...)
/// replaced by the bounds they stand for. The server ignores such a format
/// with a warning, so `envDir.uid: 4294967296` would be stored and only the
/// operator would refuse it.
pub fn definition<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut crd = K::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut value = serde_json::to_value(&*schema).expect("schemas serialize");
            integer_bounds(&mut value);
            *schema = serde_json::from_value(value).expect("bounds keep the schema valid");
        }
    }
    crd
}

/// Replaces each integer `format` the API server does not know with
/// `minimum`/`maximum`, keeping bounds that are already tighter.
fn integer_bounds(schema: &mut serde_json::Value) {
    use serde_json::Value;
    match schema {
        Value::Object(map) => {
            // Integers are int64 on the server, so an unsigned 64-bit field
            // ends at i64::MAX there.
            let range = match map.get("format").and_then(Value::as_str) {
                Some("uint8") => Some((0, i64::from(u8::MAX))),
                Some("uint16") => Some((0, i64::from(u16::MAX))),
                Some("uint32") => Some((0, i64::from(u32::MAX))),
                Some("uint64" | "uint") => Some((0, i64::MAX)),
                Some("int8") => Some((i64::from(i8::MIN), i64::from(i8::MAX))),
                Some("int16") => Some((i64::from(i16::MIN), i64::from(i16::MAX))),
                _ => None,
            };
            if let Some((min, max)) = range {
                map.remove("format");
                let (min, max) = (min as f64, max as f64);
                let bound = |v: Option<&Value>| v.and_then(Value::as_f64);
                let lo = bound(map.get("minimum")).map_or(min, |b| b.max(min));
                let hi = bound(map.get("maximum")).map_or(max, |b| b.min(max));
                map.insert("minimum".into(), lo.into());
                map.insert("maximum".into(), hi.into());
            }
            map.values_mut().for_each(integer_bounds);
        }
        Value::Array(items) => items.iter_mut().for_each(integer_bounds),
        _ => {}
    }
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
