//! Shared setup: the operator's CRDs, a server, and API handles.

#![allow(dead_code)] // each test binary uses a different subset

use kube::api::{Api, ApiResource, DynamicObject};
use kube::core::GroupVersionKind;
use kube_double::ApiServer;
use serde_json::Value;

pub const NS: &str = "default";

/// The CRDs the operator installs, as committed in crds/crds.yaml.
pub fn crds() -> Vec<Value> {
    let text = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/crds.yaml"));
    serde_saphyr::from_multiple::<Value>(text).expect("crds.yaml parses")
}

pub async fn server() -> ApiServer {
    ApiServer::start(crds()).await
}

/// A client that does not retry 429s: the default client retries them up
/// to 15 times, which would turn a PDB refusal into minutes of waiting.
pub fn client_without_retries(server: &ApiServer) -> kube::Client {
    let mut config = kube::Config::new(server.url().parse().expect("valid URL"));
    config.default_retry = false;
    kube::Client::try_from(config).expect("client")
}

pub fn resource(kind: &str) -> ApiResource {
    let plural = format!("{}s", kind.to_ascii_lowercase());
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("agentenv.io", "v1alpha1", kind),
        &plural,
    )
}

pub fn api(server: &ApiServer, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(server.client(), NS, &resource(kind))
}

/// A typed-enough object for `Api<DynamicObject>` writes.
pub fn object(kind: &str, name: &str, spec: Value) -> DynamicObject {
    let mut obj = DynamicObject::new(name, &resource(kind)).within(NS);
    obj.data = serde_json::json!({ "spec": spec });
    obj
}

pub fn instance(name: &str, agent_type: &str) -> DynamicObject {
    object(
        "AgentInstance",
        name,
        serde_json::json!({ "agentType": agent_type }),
    )
}

/// The Status of a failed call, or a panic naming what happened instead.
pub fn status<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
