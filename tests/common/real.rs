//! The harness for running the real `agent-env run` binary against a real
//! kube-apiserver (`testkit/kube-envtest`): a control plane of the test's
//! own with the operator's install from `deploy/`, the operator running as
//! its own service account (so RBAC is enforced as in a cluster), an env
//! root, and async getters. Include with `#[path = "common/real.rs"] mod real;`.
#![allow(dead_code, unused_imports)]

#[path = "controller.rs"]
mod controller;
#[path = "envtest.rs"]
mod envtest;
pub use controller::*;
pub use envtest::{ControlPlane, Options, kubectl, operator_access, repo, warnings};

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::{Value, json};

/// A real control plane, an env root and the operators running against them.
pub struct Cluster {
    pub cp: ControlPlane,
    pub dir: tempfile::TempDir,
    /// The operator's service account, with `deploy/`'s RBAC.
    pub operator_kubeconfig: PathBuf,
    admin: kube::Client,
    resources: std::sync::Mutex<BTreeMap<(String, String), (ApiResource, bool)>>,
}

/// The service account name the operator authenticates as.
pub const OPERATOR_USER: &str = "system:serviceaccount:agent-env-system:agent-env";

impl Cluster {
    /// `None` (after printing SKIPPED) without `KUBEBUILDER_ASSETS`.
    pub async fn start(what: &str) -> Option<Cluster> {
        Self::start_with(what, Options::default()).await
    }

    /// With options for the control plane; the audit log is always on.
    pub async fn start_with(what: &str, options: Options) -> Option<Cluster> {
        let cp = ControlPlane::start_with(what, options.audit()).await?;
        let operator_kubeconfig = operator_access(&cp).await;
        let admin = cp.client().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        Some(Cluster {
            cp,
            dir,
            operator_kubeconfig,
            admin,
            resources: Default::default(),
        })
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn operator(&self, identity: &str, extra: &[&str]) -> Operator {
        self.operator_with_env(identity, extra, &[])
    }

    pub fn operator_with_env(
        &self,
        identity: &str,
        extra: &[&str],
        envs: &[(&str, &Path)],
    ) -> Operator {
        spawn_operator(
            self.dir.path(),
            &self.root(),
            &self.operator_kubeconfig,
            identity,
            extra,
            envs,
        )
    }

    /// The admin client.
    pub fn client(&self) -> kube::Client {
        self.admin.clone()
    }

    /// The served resource of an `apiVersion` and `kind`, and whether it is namespaced.
    async fn resource(&self, api_version: &str, kind: &str) -> (ApiResource, bool) {
        let key = (api_version.to_owned(), kind.to_owned());
        if let Some(r) = self.resources.lock().unwrap().get(&key) {
            return r.clone();
        }
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let (ar, caps) =
            kube::discovery::pinned_kind(&self.admin, &GroupVersionKind::gvk(group, version, kind))
                .await
                .unwrap_or_else(|e| panic!("{api_version} {kind} is not served: {e}"));
        let r = (ar, caps.scope == kube::discovery::Scope::Namespaced);
        self.resources.lock().unwrap().insert(key, r.clone());
        r
    }

    async fn api(&self, api_version: &str, kind: &str, ns: Option<&str>) -> Api<DynamicObject> {
        let (ar, namespaced) = self.resource(api_version, kind).await;
        match ns {
            Some(ns) if namespaced => Api::namespaced_with(self.admin.clone(), ns, &ar),
            _ => Api::all_with(self.admin.clone(), &ar),
        }
    }

    /// A namespace and its `default` service account (which a pod needs
    /// and no controller-manager creates here), when missing.
    pub async fn namespace(&self, ns: &str) {
        for (api_version, kind, doc) in [
            ("v1", "Namespace", json!({"metadata": {"name": ns}})),
            (
                "v1",
                "ServiceAccount",
                json!({"metadata": {"name": "default", "namespace": ns}}),
            ),
        ] {
            let api = self.api(api_version, kind, Some(ns)).await;
            let obj: DynamicObject = serde_json::from_value(json!({
                "apiVersion": api_version, "kind": kind, "metadata": doc["metadata"],
            }))
            .unwrap();
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => panic!("{kind} {ns}: {e}"),
            }
        }
    }

    /// Server-side applies `doc` as the tests' field manager, creating its
    /// namespace first.
    pub async fn apply(&self, doc: Value) {
        self.try_apply(doc.clone())
            .await
            .unwrap_or_else(|e| panic!("apply {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    }

    /// [`apply`](Self::apply), returning the API's refusal.
    pub async fn try_apply(&self, doc: Value) -> Result<DynamicObject, kube::Error> {
        let ns = doc["metadata"]["namespace"].as_str().map(str::to_owned);
        if let Some(ns) = &ns {
            self.namespace(ns).await;
        }
        let api = self
            .api(
                doc["apiVersion"].as_str().unwrap(),
                doc["kind"].as_str().unwrap(),
                ns.as_deref(),
            )
            .await;
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        api.patch(
            &name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&doc),
        )
        .await
    }

    /// Merge-patches the status subresource of an object.
    pub async fn patch_status(
        &self,
        api_version: &str,
        kind: &str,
        ns: &str,
        name: &str,
        status: Value,
    ) {
        let api = self.api(api_version, kind, Some(ns)).await;
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .unwrap_or_else(|e| panic!("status of {kind} {ns}/{name}: {e}"));
    }

    /// A pod as the kubelet would report it running (there is no kubelet).
    pub async fn run_pod(&self, ns: &str, name: &str) {
        self.patch_status("v1", "Pod", ns, name, json!({"phase": "Running"}))
            .await;
    }

    pub async fn delete(&self, api_version: &str, kind: &str, ns: &str, name: &str) {
        let api = self.api(api_version, kind, Some(ns)).await;
        api.delete(name, &DeleteParams::default())
            .await
            .unwrap_or_else(|e| panic!("delete {kind} {ns}/{name}: {e}"));
    }

    pub async fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let api = self.api(api_version, kind, Some(ns)).await;
        api.get_opt(name)
            .await
            .unwrap_or_else(|e| panic!("get {kind} {ns}/{name}: {e}"))
            .map(|o| serde_json::to_value(o).unwrap())
    }

    pub async fn list(&self, api_version: &str, kind: &str, ns: &str) -> Vec<Value> {
        let api = self.api(api_version, kind, Some(ns)).await;
        api.list(&ListParams::default())
            .await
            .unwrap_or_else(|e| panic!("list {kind} {ns}: {e}"))
            .items
            .into_iter()
            .map(|o| serde_json::to_value(o).unwrap())
            .collect()
    }

    pub async fn custom(&self, kind: &str, ns: &str, name: &str) -> Option<Value> {
        self.get("agentenv.io/v1alpha1", kind, ns, name).await
    }

    pub async fn instance_json(&self, ns: &str, name: &str) -> Option<Value> {
        self.custom("AgentInstance", ns, name).await
    }

    pub async fn condition(&self, ns: &str, name: &str, type_: &str) -> Option<Value> {
        condition_of(&self.instance_json(ns, name).await?, type_)
    }

    pub fn settings(&self, rel: &str) -> Value {
        read_json(&self.root().join(rel).join("settings.json"))
    }

    pub fn claude(&self, rel: &str) -> Value {
        read_json(&self.root().join(rel).join(".claude.json"))
    }

    pub fn plugins(&self, rel: &str) -> BTreeSet<String> {
        self.settings(rel)["enabledPlugins"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// `events.k8s.io` events of a reason in a namespace.
    pub async fn events(&self, ns: &str, reason: &str) -> Vec<Value> {
        self.list("events.k8s.io/v1", "Event", ns)
            .await
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    /// Waits until the instance is `Ready=True` at its current generation.
    pub async fn ready(&self, ns: &str, name: &str) {
        eventually(&format!("{ns}/{name} Ready=True"), || async {
            self.instance_json(ns, name).await.is_some_and(|o| {
                condition_of(&o, "Ready").is_some_and(|c| c["status"] == "True")
                    && o["status"]["observedGeneration"] == o["metadata"]["generation"]
            })
        })
        .await;
    }

    /// How many requests the API server counted (`apiserver_request_total`)
    /// whose labels include all of `labels`, e.g.
    /// `[("resource", "agentinstances"), ("subresource", "status"), ("verb", "APPLY")]`.
    pub async fn requests(&self, labels: &[(&str, &str)]) -> u64 {
        requests_in(&self.cp.metrics().await, labels)
    }

    /// What the operator's service account called, as RBAC sees it:
    /// (API group, resource[/subresource], verb), from the audit log.
    pub fn operator_calls(&self) -> BTreeSet<(String, String, String)> {
        self.cp
            .audit()
            .into_iter()
            .filter(|e| e["user"]["username"] == OPERATOR_USER)
            .filter(|e| e["objectRef"]["resource"].is_string())
            .filter(|e| {
                e["responseStatus"]["code"]
                    .as_u64()
                    .is_some_and(|c| c < 500)
            })
            .flat_map(|e| {
                let r = &e["objectRef"];
                let resource = match r["subresource"].as_str() {
                    Some(s) => format!("{}/{s}", r["resource"].as_str().unwrap()),
                    None => r["resource"].as_str().unwrap().to_owned(),
                };
                let group = r["apiGroup"].as_str().unwrap_or_default().to_owned();
                let verb = e["verb"].as_str().unwrap().to_owned();
                // A server-side apply that creates its object is audited as
                // a patch, but RBAC also asks for create.
                let created = (verb == "patch" && e["responseStatus"]["code"] == 201)
                    .then(|| (group.clone(), resource.clone(), "create".to_owned()));
                std::iter::once((group, resource, verb)).chain(created)
            })
            .collect()
    }

    /// The audit events of requests the operator made that RBAC refused.
    pub fn operator_refusals(&self) -> Vec<Value> {
        self.cp
            .audit()
            .into_iter()
            .filter(|e| e["user"]["username"] == OPERATOR_USER)
            .filter(|e| e["responseStatus"]["code"] == 403)
            .collect()
    }
}

pub fn condition_of(obj: &Value, type_: &str) -> Option<Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .cloned()
}

/// The sum of `apiserver_request_total` samples carrying all of `labels`.
pub fn requests_in(metrics: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A pod as a Deployment would make it: a valid spec the real server takes.
pub fn agent_pod(ns: &str, name: &str, instance: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"agentenv.io/instance": instance}},
        "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]},
    })
}

/// Waits, up to `limit`, until `check` holds.
pub async fn within<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
