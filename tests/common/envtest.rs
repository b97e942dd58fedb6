//! The real API server (`testkit/kube-envtest`) as this repository's tests
//! use it: the operator's install applied from `deploy/`, the operator's own
//! service account, and the real kubectl. Include with
//! `#[path = "common/envtest.rs"] mod envtest;`.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Output;

pub use kube_envtest::{ControlPlane, Options};

/// Namespace the operator runs in, as in `deploy/base`.
pub const OPERATOR_NS: &str = "agent-env-system";
/// The operator's ServiceAccount, as in `deploy/base`.
pub const OPERATOR_SA: &str = "agent-env";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The files of `deploy/base` that give the operator its identity and
/// rights, and the CRDs: what `agent-env run` needs to find in a cluster.
const ACCESS: [&str; 4] = [
    "crds/crds.yaml",
    "deploy/base/namespace.yaml",
    "deploy/base/serviceaccount.yaml",
    "deploy/base/rbac.yaml",
];

/// Applies the CRDs and the operator's namespace, service account and RBAC
/// exactly as committed, and returns a kubeconfig for that service account:
/// a missing grant in `deploy/` fails the test that needs it.
pub async fn operator_access(cp: &ControlPlane) -> PathBuf {
    let admin = cp.client().await;
    for file in ACCESS {
        let text = std::fs::read_to_string(repo().join(file)).unwrap();
        kube_envtest::apply::apply_yaml(&admin, &text, "agent-env-tests")
            .await
            .unwrap_or_else(|e| panic!("{file} does not apply: {e}"));
    }
    cp.service_account(OPERATOR_NS, OPERATOR_SA).await
}

/// Runs kubectl; panics with its stderr unless it succeeds.
pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> Output {
    kubectl_in(cp, &repo(), args)
}

/// [`kubectl`] from `dir`.
pub fn kubectl_in(cp: &ControlPlane, dir: &Path, args: &[&str]) -> Output {
    let out = cp
        .kubectl()
        .current_dir(dir)
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `Warning:` lines kubectl printed (the API server's warnings).
pub fn warnings(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.starts_with("Warning"))
        .map(str::to_owned)
        .collect()
}
