//! The harness for running the real `agent-env run` binary against the
//! in-process API double (`testkit/kube-double`): a cluster with an env root
//! and the operators running against it; operator processes, waiting and
//! object builders come from `common/controller.rs`.
//! Include with `#[path = "common/kube.rs"] mod kit;`.
#![allow(dead_code)]

#[path = "controller.rs"]
mod controller;
pub use controller::*;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube_double::ApiServer;
use serde_json::Value;

/// An API double, an env root and the operators running against them.
pub struct Cluster {
    pub server: ApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub async fn start() -> Cluster {
        let crds = agent_env_operator::crd::all()
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap())
            .collect();
        let server = ApiServer::start(crds).await;
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = server.write_kubeconfig(dir.path());
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        Cluster {
            server,
            dir,
            kubeconfig,
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn operator(&self, identity: &str, extra: &[&str]) -> Operator {
        self.operator_with_env(identity, extra, &[])
    }

    /// An operator with extra environment variables; its stdout goes to
    /// `<identity>.out` beside the log (`<identity>.log`, its stderr).
    pub fn operator_with_env(
        &self,
        identity: &str,
        extra: &[&str],
        envs: &[(&str, &Path)],
    ) -> Operator {
        spawn_operator(
            self.dir.path(),
            &self.root(),
            &self.kubeconfig,
            identity,
            extra,
            envs,
        )
    }

    pub fn client(&self) -> kube::Client {
        self.server.client()
    }

    pub async fn apply(&self, doc: Value) {
        let kind = doc["kind"].as_str().unwrap().to_owned();
        let ns = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let (group, version) = match doc["apiVersion"].as_str().unwrap().split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (
                String::new(),
                doc["apiVersion"].as_str().unwrap().to_owned(),
            ),
        };
        let plural = format!("{}s", kind.to_lowercase());
        let ar = kube::api::ApiResource {
            group: group.clone(),
            version: version.clone(),
            api_version: doc["apiVersion"].as_str().unwrap().to_owned(),
            kind: kind.clone(),
            plural,
        };
        let api: Api<DynamicObject> = Api::namespaced_with(self.client(), &ns, &ar);
        let obj: DynamicObject = serde_json::from_value(doc).unwrap();
        api.patch(
            &name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {kind} {ns}/{name}: {e}"));
    }

    pub fn instance_json(&self, ns: &str, name: &str) -> Option<Value> {
        self.server
            .get("agentenv.io", "agentinstances", Some(ns), name)
    }

    pub fn condition(&self, ns: &str, name: &str, type_: &str) -> Option<Value> {
        let obj = self.instance_json(ns, name)?;
        obj["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    pub fn settings(&self, rel: &str) -> Value {
        read_json(&self.root().join(rel).join("settings.json"))
    }

    pub fn plugins(&self, rel: &str) -> BTreeSet<String> {
        self.settings(rel)["enabledPlugins"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    pub fn events(&self, ns: &str, reason: &str) -> Vec<Value> {
        self.server
            .list("events.k8s.io", "events", Some(ns))
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    pub async fn ready(&self, ns: &str, name: &str) {
        eventually(&format!("{ns}/{name} Ready=True"), || async {
            self.condition(ns, name, "Ready")
                .is_some_and(|c| c["status"] == "True")
        })
        .await;
    }
}
