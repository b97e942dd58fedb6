//! What the cluster tests share whichever API server they run against (the
//! in-process double, `common/kube.rs`, or a real one, `common/real.rs`):
//! `agent-env run` processes, waiting, and builders for the objects the
//! tests apply.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Namespace of the operator (its builtin ConfigMap and its Lease), as in `deploy/base`.
pub const OPERATOR_NS: &str = "agent-env-system";

/// Starts `agent-env run` as replica `identity` on the env root `root`,
/// talking to the API through `kubeconfig`. Its stderr (the log) goes to
/// `<dir>/<identity>.log`, its stdout to `<dir>/<identity>.out`.
pub fn spawn_operator(
    dir: &Path,
    root: &Path,
    kubeconfig: &Path,
    identity: &str,
    extra: &[&str],
    envs: &[(&str, &Path)],
) -> Operator {
    let log = dir.join(format!("{identity}.log"));
    let out = dir.join(format!("{identity}.out"));
    // Defaults for tests; a flag given in `extra` replaces its default.
    let defaults = [
        ("--operator-namespace", OPERATOR_NS),
        ("--identity", identity),
        ("--lease-duration", "3s"),
        ("--resync-interval", "1h"),
    ];
    let mut args: Vec<&str> = vec!["run", "--no-fsync"];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    let child = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args(args)
        .arg("--env-root")
        .arg(root)
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("AGENT_ENV_LOG", "info,agent_env_operator=debug,kube=warn")
        .envs(envs.iter().copied())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Operator { child, log }
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

    /// SIGKILL: the replica dies without releasing anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The exit code, once it exited by itself within `limit`.
    pub fn exits_within(&mut self, limit: Duration) -> Option<i32> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
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
