//! The harness for running the real `agent-env run` binary against the
//! in-process API double (`testkit/kube-double`): a cluster with an env root,
//! operator processes, waiting, and builders for the objects the tests apply.
//! Include with `#[path = "common/kube.rs"] mod kit;`.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube_double::ApiServer;
use serde_json::{Value, json};

pub const OPERATOR_NS: &str = "agent-env-system";

/// An API double, an env root and the operators running against them.
pub struct Cluster {
    pub server: ApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
}

/// One `agent-env run` process; killed when dropped.
pub struct Operator {
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!(
                "--- {} (last lines) ---\n{}",
                self.log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

impl Operator {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> i32 {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let started = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no exit after SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
        let log = self.dir.path().join(format!("{identity}.log"));
        let out = self.dir.path().join(format!("{identity}.out"));
        let child = Command::new(env!("CARGO_BIN_EXE_agent-env"))
            .args(["run", "--env-root"])
            .arg(self.root())
            .args([
                "--operator-namespace",
                OPERATOR_NS,
                "--identity",
                identity,
                "--lease-duration",
                "3s",
                "--resync-interval",
                "1h",
                "--no-fsync",
            ])
            .args(extra)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("AGENT_ENV_LOG", "info,agent_env_operator=debug,kube=warn")
            .envs(envs.iter().copied())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Operator { child, log }
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

pub fn read_json(p: &Path) -> Value {
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

pub fn instance(ns: &str, name: &str, agent_type: &str, extra: Value) -> Value {
    let mut spec = json!({"agentType": agent_type});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    })
}

pub fn binding(ns: &str, name: &str, target: Value, plugins: &[&str]) -> Value {
    let plugins: Vec<Value> = plugins.iter().map(|p| json!({"name": p})).collect();
    json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"target": target, "plugins": plugins},
    })
}

pub fn mcp(ns: &str, name: &str, target: Value, token: &str) -> Value {
    json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"target": target, "http": {
            "url": "https://forgejo.example/mcp",
            "headers": {"Authorization": format!("Bearer {token}")}
        }},
    })
}

pub fn labelled_secret(ns: &str, name: &str, key: &str, value: &str, labelled: bool) -> Value {
    let labels = if labelled {
        json!({"agentenv.io/secrets": "true"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "stringData": {key: value},
    })
}

pub fn pod(ns: &str, name: &str, instance: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"agentenv.io/instance": instance}},
        "spec": {"containers": [{"name": "agent", "image": "agent"}]},
        "status": {"phase": "Running"},
    })
}
