//! The install, on a real kube-apiserver (`KUBEBUILDER_ASSETS`; skipped
//! without): `crds/` applies with no warning, `deploy/` and
//! `examples/kubernetes/` apply with the real kubectl, and every manifest
//! under `examples/` passes a server-side dry run with strict field
//! validation.

#[path = "common/envtest.rs"]
mod envtest;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use envtest::{ControlPlane, kubectl, repo, warnings};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PatchParams, PostParams, ValidationDirective};
use serde_json::{Value, json};

async fn control_plane(what: &str) -> Option<&'static ControlPlane> {
    ControlPlane::shared(what).await
}

#[tokio::test]
async fn crds_install_without_a_warning_and_are_served() {
    // A control plane of its own: the first apply below must meet CRDs no
    // other test applied (a client-side apply over server-side applied
    // objects warns of the missing last-applied annotation).
    let Some(own) = ControlPlane::start("install: crds/").await else {
        return;
    };
    let cp = &own;
    // Client-side apply first (what most people type), then server-side
    // (what Argo CD and Flux do), each of the committed file and of what
    // `agent-env crd` prints.
    let generated = std::env::temp_dir().join(format!("agent-env-crd-{}.yaml", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .arg("crd")
        .output()
        .unwrap();
    std::fs::write(&generated, &out.stdout).unwrap();
    for args in [
        vec!["apply", "-f", "crds/crds.yaml"],
        vec!["apply", "--server-side", "-f", "crds/crds.yaml"],
        vec!["apply", "--server-side", "-f", generated.to_str().unwrap()],
        vec!["apply", "--server-side", "-k", "crds"],
    ] {
        let out = kubectl(cp, &args);
        assert_eq!(
            warnings(&out),
            Vec::<String>::new(),
            "kubectl {}",
            args.join(" ")
        );
    }
    let _ = std::fs::remove_file(&generated);
    let out = kubectl(
        cp,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/agentinstances.agentenv.io",
            "crd/pluginbindings.agentenv.io",
            "crd/pluginmarketplaces.agentenv.io",
            "crd/mcpservers.agentenv.io",
        ],
    );
    assert_eq!(warnings(&out), Vec::<String>::new());
    // The category and short names work as documented, once discovery
    // (which the server updates a moment after the CRDs) lists them.
    let started = std::time::Instant::now();
    while !cp
        .kubectl()
        .args(["get", "agentenv", "-A"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "`kubectl get agentenv` never worked"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    kubectl(cp, &["get", "agi,pb,pmk,mcps", "-A"]);
}

#[tokio::test]
async fn deploy_and_the_kubernetes_example_apply_with_kubectl() {
    let Some(cp) = control_plane("install: deploy/ and examples/kubernetes/").await else {
        return;
    };
    for dir in [
        "deploy",
        "examples/kubernetes/operator",
        "examples/kubernetes/team-a",
        "examples/kubernetes/sidecar",
    ] {
        let out = kubectl(cp, &["apply", "--server-side", "-k", dir]);
        assert_eq!(
            warnings(&out),
            Vec::<String>::new(),
            "kubectl apply -k {dir}"
        );
    }
    // What was applied is there, as the operator and the agents expect it.
    let out = kubectl(
        cp,
        &[
            "get",
            "-n",
            "agent-env-system",
            "deployment/agent-env-operator",
            "serviceaccount/agent-env",
            "configmap/agent-env-builtin",
            "role/agent-env-operator",
            "service/agent-env-operator-metrics",
            "-o",
            "name",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 5);
    let out = kubectl(
        cp,
        &[
            "auth",
            "can-i",
            "create",
            "pods",
            "--subresource=eviction",
            "-n",
            "team-a",
            "--as=system:serviceaccount:agent-env-system:agent-env",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "yes");
    let out = kubectl(
        cp,
        &[
            "get",
            "agi",
            "alice",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.spec.agentType}",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "coder");
}

/// The directories under `dir` that are kustomizations, and the manifest
/// files outside them.
fn roots_and_files(dir: &Path, roots: &mut Vec<PathBuf>, files: &mut Vec<PathBuf>) {
    if dir.join("kustomization.yaml").is_file() {
        roots.push(dir.to_owned());
        return;
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            roots_and_files(&p, roots, files);
        } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(p);
        }
    }
}

#[tokio::test]
async fn every_example_manifest_passes_a_server_dry_run() {
    let Some(cp) = control_plane("install: examples/ dry run").await else {
        return;
    };
    let admin = cp.client().await;
    kube_envtest::apply::apply_yaml(
        &admin,
        &std::fs::read_to_string(repo().join("crds/crds.yaml")).unwrap(),
        "agent-env-tests",
    )
    .await
    .unwrap();
    let (mut roots, mut files) = (Vec::new(), Vec::new());
    roots_and_files(&repo().join("examples"), &mut roots, &mut files);
    assert!(!files.is_empty() && !roots.is_empty());
    let mut docs: Vec<(String, Value)> = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let what = file.strip_prefix(repo()).unwrap().display().to_string();
        docs.extend(
            kube_envtest::apply::documents(&text)
                .into_iter()
                .map(|d| (what.clone(), d)),
        );
    }
    for root in &roots {
        let rel = root.strip_prefix(repo()).unwrap().display().to_string();
        let out = kubectl(cp, &["kustomize", &rel]);
        docs.extend(
            kube_envtest::apply::documents(&String::from_utf8_lossy(&out.stdout))
                .into_iter()
                .map(|d| (format!("{rel} (kustomize)"), d)),
        );
    }
    // A dry run creates nothing, not even the namespaces later documents
    // need: those are made for real first.
    let namespaces: BTreeSet<String> = docs
        .iter()
        .filter_map(|(_, d)| d["metadata"]["namespace"].as_str().map(str::to_owned))
        .collect();
    let api: Api<Namespace> = Api::all(admin.clone());
    for ns in &namespaces {
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        match api.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("{e}"),
        }
    }
    let mut params = PatchParams::apply("agent-env-tests").force();
    params.dry_run = true;
    params.field_validation = Some(ValidationDirective::Strict);
    let mut refused = Vec::new();
    for (what, doc) in &docs {
        if let Err(e) = kube_envtest::apply::apply(&admin, doc, &params).await {
            refused.push(format!(
                "{what}: {} {}: {e}",
                doc["kind"], doc["metadata"]["name"]
            ));
        }
    }
    assert!(refused.is_empty(), "refused:\n{}", refused.join("\n"));
    assert!(docs.len() > 20, "only {} documents checked", docs.len());
}
