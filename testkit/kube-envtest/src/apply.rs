//! Applying manifests from Rust as `kubectl apply --server-side` does: each
//! document's kind found by discovery, applied with a field manager, CRDs
//! waited for until they are served.

use std::time::{Duration, Instant};

use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::Scope;
use serde_json::Value;

/// Why a manifest could not be applied.
#[derive(Debug)]
pub enum ApplyError {
    /// The document is not an object with `apiVersion`, `kind` and `metadata.name`.
    Document(String),
    /// The API server refused it (or its kind is not served).
    Api(kube::Error),
}

impl std::fmt::Display for ApplyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ApplyError::Document(why) => write!(f, "{why}"),
            ApplyError::Api(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Every document of a YAML stream, empty ones left out.
pub fn documents(text: &str) -> Vec<Value> {
    // A generated fleet holds thousands of documents per file; the parser's
    // default budget stops at 1,024.
    let mut budget = serde_saphyr::budget::Budget::default();
    budget.max_documents = 1_000_000;
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    let docs: Vec<Value> =
        serde_saphyr::from_multiple_with_options(text, options).expect("the manifests are YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// Server-side applies every document of `text`, in order, forcing
/// conflicts, with `manager` as field manager.
pub async fn apply_yaml(
    client: &kube::Client,
    text: &str,
    manager: &str,
) -> Result<Vec<DynamicObject>, ApplyError> {
    let mut out = Vec::new();
    for doc in documents(text) {
        out.push(apply(client, &doc, &PatchParams::apply(manager).force()).await?);
    }
    Ok(out)
}

/// Server-side applies one object with `params` (`dry_run` for a server
/// dry run); a CRD is waited for until it is established.
pub async fn apply(
    client: &kube::Client,
    doc: &Value,
    params: &PatchParams,
) -> Result<DynamicObject, ApplyError> {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let (Some(api_version), Some(kind), Some(name)) = (
        text(&doc["apiVersion"]),
        text(&doc["kind"]),
        text(&doc["metadata"]["name"]),
    ) else {
        return Err(ApplyError::Document(format!(
            "not an object with apiVersion, kind and metadata.name: {doc}"
        )));
    };
    let (group, version) = api_version
        .split_once('/')
        .unwrap_or(("", api_version.as_str()));
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .map_err(ApplyError::Api)?;
    let api: Api<DynamicObject> = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            doc["metadata"]["namespace"].as_str().unwrap_or("default"),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let applied = api
        .patch(&name, params, &Patch::Apply(doc))
        .await
        .map_err(ApplyError::Api)?;
    if kind == "CustomResourceDefinition" && !params.dry_run {
        established(client, &name).await;
    }
    Ok(applied)
}

/// Waits until the CRD `name` is `Established` and its objects are served.
///
/// The API server makes a custom resource's storage (and its watch cache)
/// on the first request for its objects. A watch that is among the first
/// requests, racing writes, was seen to miss an object created moments
/// later; a cluster's CRDs are served long before an operator starts, so a
/// list here makes the storage first, as it would be.
pub async fn established(client: &kube::Client, name: &str) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let crd = api.get(name).await.ok().filter(|crd| {
            crd.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        });
        if let Some(crd) = crd
            && served(client, &crd).await
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "CRD {name} was not established within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the objects of `crd` (its first served version) can be listed.
async fn served(
    client: &kube::Client,
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> bool {
    let Some(version) = crd.spec.versions.iter().find(|v| v.served) else {
        return false;
    };
    let resource = kube::api::ApiResource {
        group: crd.spec.group.clone(),
        version: version.name.clone(),
        api_version: format!("{}/{}", crd.spec.group, version.name),
        kind: crd.spec.names.kind.clone(),
        plural: crd.spec.names.plural.clone(),
    };
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    api.list(&kube::api::ListParams::default().limit(1))
        .await
        .is_ok()
}
