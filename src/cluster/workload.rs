//! Restarting a workload in a cluster: `Evict` goes through the eviction
//! API one pod at a time (PodDisruptionBudgets decide, and no spec that
//! GitOps owns changes); `RolloutRestart` stamps the pod template like
//! `kubectl rollout restart`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, EvictParams, Patch, PatchParams};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::cluster::catalog::Catalog;
use crate::crd::{RestartStrategy, WorkloadKind};
use crate::engine::restart::{RestartAction, Target};

/// The pod-template annotation `kubectl rollout restart` sets.
pub const RESTARTED_AT: &str = "kubectl.kubernetes.io/restartedAt";
/// How long an evicted pod may take to go before the next one is evicted.
pub const EVICTION_WAIT: Duration = Duration::from_secs(120);

/// Restarts through the API.
pub struct KubeRestart {
    /// The client.
    pub client: kube::Client,
    /// The client for evictions (no built-in retry of 429).
    pub eviction_client: kube::Client,
    /// Where the instance's pods are known from.
    pub catalog: Arc<Catalog>,
    /// Field manager of the rollout patch.
    pub manager: String,
}

#[async_trait]
impl RestartAction for KubeRestart {
    async fn restart(&self, target: &Target, why: &str) -> bool {
        let Some(workload) = &target.workload else {
            return true;
        };
        let ns = &target.key.namespace;
        let rollout = target.strategy == RestartStrategy::RolloutRestart
            && workload.kind != WorkloadKind::Pod;
        if rollout {
            return self.rollout(ns, workload.kind, &workload.name, why).await;
        }
        self.evict_all(target, why).await
    }
}

impl KubeRestart {
    async fn rollout(&self, ns: &str, kind: WorkloadKind, name: &str, why: &str) -> bool {
        let patch = serde_json::json!({
            "spec": {"template": {"metadata": {"annotations": {
                RESTARTED_AT: crate::time::now().to_string()
            }}}}
        });
        let pp = PatchParams {
            field_manager: Some(self.manager.clone()),
            ..PatchParams::default()
        };
        let result = match kind {
            WorkloadKind::Deployment => Api::<Deployment>::namespaced(self.client.clone(), ns)
                .patch(name, &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ()),
            _ => Api::<StatefulSet>::namespaced(self.client.clone(), ns)
                .patch(name, &pp, &Patch::Merge(&patch))
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => {
                info!(
                    namespace = ns,
                    workload = name,
                    ?kind,
                    why,
                    "rollout restart requested"
                );
                true
            }
            Err(e) => {
                warn!(namespace = ns, workload = name, error = %e, "rollout restart failed");
                false
            }
        }
    }

    /// Evicts the instance's running pods one at a time, each only after
    /// the previous one is gone.
    async fn evict_all(&self, target: &Target, why: &str) -> bool {
        let ns = &target.key.namespace;
        let workload = target.workload.as_ref().expect("checked by the caller");
        let pods: Vec<String> = self
            .catalog
            .pods_of(&target.key)
            .into_iter()
            .filter(|p| p.running && !p.terminating)
            .filter(|p| workload.kind != WorkloadKind::Pod || p.name == workload.name)
            .map(|p| p.name)
            .collect();
        let api = Api::<Pod>::namespaced(self.eviction_client.clone(), ns);
        for name in pods {
            match api.evict(&name, &EvictParams::default()).await {
                Ok(_) => info!(namespace = ns, pod = %name, why, "pod evicted"),
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => {
                    // 429: a PodDisruptionBudget says not now; the restarter retries.
                    warn!(namespace = ns, pod = %name, error = %e, "eviction refused");
                    return false;
                }
            }
            let deadline = Instant::now() + EVICTION_WAIT;
            while self
                .catalog
                .pods_of(&target.key)
                .iter()
                .any(|p| p.name == name)
            {
                if Instant::now() > deadline {
                    warn!(namespace = ns, pod = %name, "evicted pod is still there");
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        true
    }
}
