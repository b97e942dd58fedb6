//! `agent-env run` against a real cluster (kind, k3d, ...) when
//! `AGENT_ENV_TEST_KUBECONFIG` names its kubeconfig; skipped with a visible
//! message otherwise. The operator runs on this machine with a local env
//! root, as it would with a hostPath volume on a one-node cluster.
//!
//! It installs the CRDs (server-side apply), works in a fresh namespace and
//! deletes that namespace at the end.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;

fn kubeconfig() -> Option<String> {
    std::env::var("AGENT_ENV_TEST_KUBECONFIG")
        .ok()
        .filter(|s| !s.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_an_instance_in_a_real_cluster() {
    let Some(path) = kubeconfig() else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED cluster_real: set AGENT_ENV_TEST_KUBECONFIG to a kind or k3d kubeconfig to run it"
        );
        return;
    };
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(&path).expect("the kubeconfig reads"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("the kubeconfig is usable");
    let client = kube::Client::try_from(config).unwrap();

    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for crd in agent_env_operator::crd::all() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("agent-env-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("the CRDs install");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    let ns = format!("agent-env-test-{}", std::process::id());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let mut op = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .args([
            "run",
            "--namespace",
            &ns,
            "--operator-namespace",
            &ns,
            "--env-root",
        ])
        .arg(root.path())
        .args(["--identity", "cluster-test", "--no-fsync"])
        .env("KUBECONFIG", &path)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    let gvk = |kind: &str| {
        kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "agentenv.io",
            "v1alpha1",
            kind,
        ))
    };
    let apply = |kind: &str, doc: serde_json::Value| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &gvk(kind));
        let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
        let obj: DynamicObject = serde_json::from_value(doc).unwrap();
        async move {
            api.patch(
                &name,
                &PatchParams::apply("agent-env-tests").force(),
                &Patch::Apply(&obj),
            )
            .await
            .unwrap();
        }
    };
    apply(
        "AgentInstance",
        json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
               "metadata": {"name": "alice"}, "spec": {"agentType": "coder"}}),
    )
    .await;
    apply(
        "PluginBinding",
        json!({"apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
               "metadata": {"name": "coders"},
               "spec": {"target": {"agentType": "coder"}, "plugins": [{"name": "lint@tools"}]}}),
    )
    .await;

    let instances: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &gvk("AgentInstance"));
    let started = Instant::now();
    let settings = root.path().join(&ns).join("alice/settings.json");
    loop {
        let obj = instances.get("alice").await.unwrap();
        let ready = obj.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            });
        let text = std::fs::read_to_string(&settings).unwrap_or_default();
        if ready && text.contains("lint@tools") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "alice did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let _ = op.kill();
    let _ = op.wait();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
