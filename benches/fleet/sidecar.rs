//! Sidecar delivery on a real kube-apiserver (`KUBEBUILDER_ASSETS`): one
//! sidecar instance with a realistic render (the fleet's type bindings and
//! MCP servers), `PODS` pods each with its own `agent-env sidecar` process
//! and volume, then `DRIFT_EDITS` hand edits spread over the pods, each
//! timed from the edit's rename to the declared value being back. Reports
//! drift p50/p99/max and every sidecar's peak RSS.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cluster::real::{Cluster, agent_pod, eventually, read_json};
use crate::{DRIFT_EDITS, ms, probe, round2};

/// Sidecar processes measured at once.
const PODS: usize = 8;
const NS: &str = "bench";

struct Sidecars(Vec<Child>);

impl Drop for Sidecars {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `Value::Null` without a control plane.
pub fn measure(base: &Path) -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(measure_async(base)).unwrap_or(Value::Null)
}

async fn measure_async(base: &Path) -> Option<Value> {
    let c = Cluster::start("bench: sidecar").await?;
    let _op = c.operator("bench", &[]);
    let sa = c.cp.service_account(NS, "agent").await;
    let plugins: Vec<Value> = (0..20)
        .map(|i| json!({"name": format!("p{i:02}@tools")}))
        .collect();
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
        "metadata": {"name": "coders", "namespace": NS},
        "spec": {"target": {"agentType": "coder"}, "plugins": plugins},
    }))
    .await;
    for i in 0..5 {
        c.apply(json!({
            "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
            "metadata": {"name": format!("mcp-{i}"), "namespace": NS},
            "spec": {"target": {"agentType": "coder"},
                     "http": {"url": format!("https://mcp{i}.example/mcp")}},
        }))
        .await;
    }
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
        "metadata": {"name": "agent", "namespace": NS},
        "spec": {"agentType": "coder",
                 "delivery": {"mode": "Sidecar", "serviceAccountName": "agent"}},
    }))
    .await;

    let mut children = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for p in 0..PODS {
        let pod = format!("agent-{p}");
        c.apply(agent_pod(NS, &pod, "agent")).await;
        let uid = c.get("v1", "Pod", NS, &pod).await.unwrap()["metadata"]["uid"]
            .as_str()
            .unwrap()
            .to_owned();
        let volume = base.join(format!("sidecar-{p}"));
        std::fs::create_dir_all(&volume).unwrap();
        let child = Command::new(crate::BIN)
            .arg("sidecar")
            .arg("--env-root")
            .arg(&volume)
            .args(["--probe-addr", "127.0.0.1:0"])
            .env("KUBECONFIG", &sa)
            .env("AGENT_ENV_INSTANCE", "agent")
            .env("AGENT_ENV_POD_NAMESPACE", NS)
            .env("AGENT_ENV_POD_NAME", &pod)
            .env("AGENT_ENV_POD_UID", uid)
            .env("AGENT_ENV_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        children.push(child);
        dirs.push(volume.join("claude"));
    }
    let sidecars = Sidecars(children);
    for d in &dirs {
        let settings = d.join("settings.json");
        eventually("every sidecar rendered", || async {
            read_json(&settings)["enabledPlugins"]
                .as_object()
                .is_some_and(|m| m.len() == 20)
        })
        .await;
    }

    let mut samples = Vec::with_capacity(DRIFT_EDITS);
    for e in 0..DRIFT_EDITS {
        let path = dirs[e % PODS].join("settings.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let on = "\"p05@tools\": true";
        let edited = text.replace(on, "\"p05@tools\": false");
        assert_ne!(text, edited);
        let tmp = path.with_extension("bench");
        std::fs::write(&tmp, &edited).unwrap();
        let t0 = Instant::now();
        std::fs::rename(&tmp, &path).unwrap();
        loop {
            if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(on)) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "drift never corrected"
            );
            std::hint::spin_loop();
        }
        samples.push(t0.elapsed());
    }
    samples.sort();
    let q = |p: f64| ms(samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)]);
    let (p50, p99, max) = (q(0.50), q(0.99), ms(*samples.last().unwrap()));
    let rss: Vec<u64> = sidecars
        .0
        .iter()
        .filter_map(|c| probe::peak_rss(c.id()))
        .collect();
    let max_rss = *rss.iter().max()?;
    let mean_rss = rss.iter().sum::<u64>() / rss.len() as u64;
    eprintln!(
        "sidecar: {DRIFT_EDITS} edits over {PODS} pods, p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; peak RSS max {} MB",
        max_rss / 1_000_000
    );
    Some(json!({
        "pods": PODS,
        "plugins": 20,
        "mcp_servers": 5,
        "drift": {"edits": DRIFT_EDITS, "p50_ms": round2(p50), "p99_ms": round2(p99), "max_ms": round2(max)},
        "peak_rss_mb": {"max": round2(max_rss as f64 / 1e6), "mean": round2(mean_rss as f64 / 1e6)},
    }))
}

/// The results as a table.
pub fn markdown(r: &Value) -> String {
    let s = &r["sidecar"];
    format!(
        "# Sidecar delivery\n\n{} on {}.\n\nOne instance with sidecar delivery ({} plugins, {} MCP servers), {} pods each \
         with its own `agent-env sidecar` (release build) and volume, on a real kube-apiserver; \
         {} hand edits spread over the pods, each timed from its rename to the declared value \
         being back.\n\n| measure | result | target |\n|---|---|---|\n\
         | drift correction: p50 / p99 / max | {} / {} / {} ms | p99 < 10 ms |\n\
         | peak RSS per sidecar: max / mean | {} / {} MB | < 20 MB |\n",
        r["date"].as_str().unwrap_or_default(),
        r["machine"],
        s["plugins"],
        s["mcp_servers"],
        s["pods"],
        s["drift"]["edits"],
        s["drift"]["p50_ms"],
        s["drift"]["p99_ms"],
        s["drift"]["max_ms"],
        s["peak_rss_mb"]["max"],
        s["peak_rss_mb"]["mean"],
    )
}
