//! The eviction subresource against PodDisruptionBudgets.

mod common;

use std::collections::BTreeMap;

use common::{NS, client_without_retries, server, status};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, EvictParams, Patch, PatchParams, PostParams};
use serde_json::json;

fn pod(name: &str) -> Pod {
    let mut p = Pod::default();
    p.metadata.name = Some(name.to_owned());
    p.metadata.labels = Some(BTreeMap::from([("app".to_owned(), "web".to_owned())]));
    p
}

/// A pod of StatefulSet "web", whose replicas budgets by percentage or by
/// maxUnavailable are reckoned against.
fn owned_pod(name: &str) -> Pod {
    let mut p = pod(name);
    p.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "apps/v1".to_owned(),
        kind: "StatefulSet".to_owned(),
        name: "web".to_owned(),
        uid: "0".to_owned(),
        controller: Some(true),
        ..OwnerReference::default()
    }]);
    p
}

async fn stateful_set(client: &kube::Client, replicas: i32) {
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}}
        }
    }))
    .expect("a StatefulSet");
    Api::<StatefulSet>::namespaced(client.clone(), NS)
        .create(&PostParams::default(), &sts)
        .await
        .expect("create StatefulSet");
}

async fn pdb(api: &Api<PodDisruptionBudget>, spec: serde_json::Value) {
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": spec,
    }))
    .expect("a PDB");
    api.create(&PostParams::default(), &pdb)
        .await
        .expect("create PDB");
}

#[tokio::test(flavor = "multi_thread")]
async fn evictions_respect_disruption_budgets() {
    let server = server().await;
    let client = client_without_retries(&server);
    stateful_set(&client, 3).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client, NS);
    for name in ["web-0", "web-1", "web-2"] {
        pods.create(&PostParams::default(), &owned_pod(name))
            .await
            .expect("create pod");
    }
    pdb(
        &pdbs,
        json!({"selector": {"matchLabels": {"app": "web"}}, "maxUnavailable": 1}),
    )
    .await;

    let evicted = pods
        .evict("web-0", &EvictParams::default())
        .await
        .expect("evict");
    assert_eq!(evicted.code, 201);
    assert!(server.get("", "pods", Some(NS), "web-0").is_none());

    // Two of three left: one more may not go.
    let refused = status(pods.evict("web-1", &EvictParams::default()).await);
    assert_eq!(
        (refused.code, refused.reason.as_str()),
        (429, "TooManyRequests")
    );
    assert_eq!(
        refused.message,
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    let cause = &refused.details.expect("details").causes[0];
    assert_eq!(cause.reason, "DisruptionBudget");
    assert_eq!(
        cause.message,
        "The disruption budget web needs 2 healthy pods and has 2 currently"
    );
    assert!(server.get("", "pods", Some(NS), "web-1").is_some());

    // A pod that is not running is not counted and may always go.
    pods.patch_status(
        "web-2",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Pending"}})),
    )
    .await
    .expect("status");
    pods.evict("web-2", &EvictParams::default())
        .await
        .expect("evict pending pod");

    let missing = status(pods.evict("nope", &EvictParams::default()).await);
    assert_eq!(missing.code, 404);

    let logged: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.subresource.as_deref() == Some("eviction"))
        .map(|r| (r.verb, r.name.unwrap_or_default(), r.status))
        .collect();
    assert_eq!(
        logged,
        [
            ("create".to_owned(), "web-0".to_owned(), 201),
            ("create".to_owned(), "web-1".to_owned(), 429),
            ("create".to_owned(), "web-2".to_owned(), 201),
            ("create".to_owned(), "nope".to_owned(), 404),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn min_available_counts_pods_or_a_share_of_replicas() {
    let server = server().await;
    let client = client_without_retries(&server);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    for name in ["web-0", "web-1"] {
        pods.create(&PostParams::default(), &pod(name))
            .await
            .expect("create pod");
    }
    // A plain number counts the pods there are.
    pdb(
        &pdbs,
        json!({"selector": {"matchLabels": {"app": "web"}}, "minAvailable": 2}),
    )
    .await;
    let refused = status(pods.evict("web-0", &EvictParams::default()).await);
    assert_eq!(refused.code, 429);
    pdbs.delete("web", &Default::default())
        .await
        .expect("delete PDB");
    pods.delete_collection(&Default::default(), &Default::default())
        .await
        .expect("delete pods");

    stateful_set(&client, 3).await;
    for name in ["web-0", "web-1", "web-2"] {
        pods.create(&PostParams::default(), &owned_pod(name))
            .await
            .expect("create pod");
    }
    // 50% of 3 rounds up to 2 that must stay: one eviction, then no more.
    pdb(
        &pdbs,
        json!({"selector": {"matchLabels": {"app": "web"}}, "minAvailable": "50%"}),
    )
    .await;
    pods.evict("web-0", &EvictParams::default())
        .await
        .expect("first eviction");
    let refused = status(pods.evict("web-1", &EvictParams::default()).await);
    assert_eq!(refused.code, 429);

    // Pods no budget selects are evicted freely.
    let mut other = pod("other");
    other.metadata.labels = None;
    pods.create(&PostParams::default(), &other)
        .await
        .expect("create");
    pods.evict("other", &EvictParams::default())
        .await
        .expect("unbudgeted eviction");
}
