//! Discovery as kube-client runs it.

mod common;

use common::server;
use kube::core::GroupVersionKind;
use kube::discovery::{Discovery, Scope};

#[tokio::test(flavor = "multi_thread")]
async fn discovery_finds_built_in_and_custom_kinds() {
    let server = server().await;
    let client = server.client();
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "33")
    );
    assert_eq!(version.git_version, "v1.33.0-double");

    for discovery in [
        Discovery::new(client.clone())
            .run()
            .await
            .expect("discovery"),
        Discovery::new(client.clone())
            .run_aggregated()
            .await
            .expect("aggregated discovery"),
    ] {
        let (ar, caps) = discovery
            .resolve_gvk(&GroupVersionKind::gvk(
                "agentenv.io",
                "v1alpha1",
                "AgentInstance",
            ))
            .expect("AgentInstance is served");
        assert_eq!(ar.plural, "agentinstances");
        assert_eq!(caps.scope, Scope::Namespaced);
        assert!(caps.subresources.iter().any(|(r, _)| r.plural == "status"));
        assert!(caps.supports_operation("watch"));

        let (pods, caps) = discovery
            .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Pod"))
            .expect("pods are served");
        assert_eq!(pods.plural, "pods");
        let subs: Vec<_> = caps
            .subresources
            .iter()
            .map(|(r, _)| r.plural.as_str())
            .collect();
        assert!(
            subs.contains(&"eviction") && subs.contains(&"status"),
            "{subs:?}"
        );

        let (ns, caps) = discovery
            .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Namespace"))
            .expect("namespaces are served");
        assert_eq!(
            (ns.plural.as_str(), caps.scope),
            ("namespaces", Scope::Cluster)
        );

        for (group, kind) in [
            ("apps", "Deployment"),
            ("apps", "StatefulSet"),
            ("policy", "PodDisruptionBudget"),
            ("coordination.k8s.io", "Lease"),
            ("events.k8s.io", "Event"),
        ] {
            assert!(
                discovery
                    .resolve_gvk(&GroupVersionKind::gvk(group, "v1", kind))
                    .is_some(),
                "{group}/{kind}"
            );
        }
    }
    assert!(server.requests().is_empty(), "discovery is not logged");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_resources_are_404_statuses() {
    let server = server().await;
    let req = axum::http::Request::get("/apis/example.com/v1/namespaces/default/gizmos")
        .body(Vec::new())
        .expect("request");
    match server.client().request::<serde_json::Value>(req).await {
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (404, "NotFound"));
        }
        other => panic!("expected a 404 Status, got {other:?}"),
    }
}
