//! Reads and writes through kube-client: metadata, selectors, pagination,
//! generation, the status subresource, patches, conflicts and finalizers.

mod common;

use std::collections::BTreeMap;

use common::{NS, api, instance, server, status};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube_double::Request;
use serde_json::json;

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some(name.to_owned());
    cm.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
    );
    cm.data = Some(BTreeMap::from([("k".to_owned(), "v".to_owned())]));
    cm
}

fn names(list: &kube::api::ObjectList<ConfigMap>) -> Vec<String> {
    list.items
        .iter()
        .map(|c| c.metadata.name.clone().unwrap_or_default())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn create_sets_server_metadata_and_get_returns_it() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let created = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .expect("create");
    let meta = &created.metadata;
    assert_eq!(meta.namespace.as_deref(), Some(NS));
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    let rv: u64 = meta
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .expect("numeric resourceVersion");

    let other = cms
        .create(&PostParams::default(), &config_map("b", &[]))
        .await
        .expect("create");
    assert_ne!(other.metadata.uid, created.metadata.uid);
    let rv2: u64 = other
        .metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .expect("numeric resourceVersion");
    assert!(rv2 > rv, "resourceVersion must increase");

    let got = cms.get("a").await.expect("get");
    assert_eq!(got.metadata.uid, created.metadata.uid);
    assert_eq!(got.data, created.data);
    let stored = server.get("", "configmaps", Some(NS), "a").expect("stored");
    assert_eq!(stored["kind"], "ConfigMap");

    let again = status(
        cms.create(&PostParams::default(), &config_map("a", &[]))
            .await,
    );
    assert_eq!((again.code, again.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(again.message, "configmaps \"a\" already exists");

    let missing = status(api(&server, "AgentInstance").get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(
        missing.message,
        "agentinstances.agentenv.io \"nope\" not found"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generate_name_and_dry_run() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let mut cm = config_map("", &[]);
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("gen-".to_owned());
    let created = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect("create");
    let name = created.metadata.name.expect("named");
    assert!(name.starts_with("gen-") && name.len() == 9, "{name}");

    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    cms.create(&dry, &config_map("dry", &[]))
        .await
        .expect("dry run");
    assert!(server.get("", "configmaps", Some(NS), "dry").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_by_label_and_field_selectors() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    for (name, labels) in [
        ("web-1", vec![("app", "web"), ("tier", "front")]),
        ("web-2", vec![("app", "web")]),
        ("db-1", vec![("app", "db"), ("tier", "back")]),
        ("bare", vec![]),
    ] {
        cms.create(&PostParams::default(), &config_map(name, &labels))
            .await
            .expect("create");
    }
    let list = |sel: &'static str| {
        let cms = cms.clone();
        async move {
            names(
                &cms.list(&ListParams::default().labels(sel))
                    .await
                    .expect("list"),
            )
        }
    };
    assert_eq!(list("app=web").await, ["web-1", "web-2"]);
    assert_eq!(list("app==db").await, ["db-1"]);
    assert_eq!(list("app!=web").await, ["bare", "db-1"]);
    assert_eq!(list("app in (web,db),tier").await, ["db-1", "web-1"]);
    assert_eq!(list("app notin (web)").await, ["bare", "db-1"]);
    assert_eq!(list("!tier").await, ["bare", "web-2"]);
    assert_eq!(list("app=web,!tier").await, ["web-2"]);

    let by_name = cms
        .list(&ListParams::default().fields("metadata.name=db-1"))
        .await
        .expect("list");
    assert_eq!(names(&by_name), ["db-1"]);
    let not_name = cms
        .list(&ListParams::default().fields("metadata.name!=db-1,metadata.namespace=default"))
        .await
        .expect("list");
    assert_eq!(names(&not_name), ["bare", "web-1", "web-2"]);

    let bad = status(cms.list(&ListParams::default().labels("app in (web")).await);
    assert_eq!((bad.code, bad.reason.as_str()), (400, "BadRequest"));

    // Other namespaces are separate; the cluster-wide list sees all.
    let elsewhere: Api<ConfigMap> = Api::namespaced(server.client(), "other");
    elsewhere
        .create(
            &PostParams::default(),
            &config_map("web-1", &[("app", "web")]),
        )
        .await
        .expect("namespaces need not exist");
    let all: Api<ConfigMap> = Api::all(server.client());
    let everywhere = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .expect("list");
    let keys: Vec<_> = everywhere
        .items
        .iter()
        .map(|c| {
            (
                c.metadata.namespace.clone().unwrap_or_default(),
                c.metadata.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("default".to_owned(), "web-1".to_owned()),
            ("default".to_owned(), "web-2".to_owned()),
            ("other".to_owned(), "web-1".to_owned())
        ]
    );
    let list_rv: u64 = everywhere
        .metadata
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
        .expect("list resourceVersion");
    assert!(list_rv >= 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_returns_every_object_in_pages() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    for i in 0..1200 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("cm-{i:04}"), &[]),
        )
        .await
        .expect("create");
    }
    let mut seen = Vec::new();
    let mut lp = ListParams::default().limit(500);
    let mut pages = 0;
    loop {
        let page = cms.list(&lp).await.expect("list page");
        pages += 1;
        assert!(page.items.len() <= 500);
        seen.extend(names(&page));
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => lp = lp.continue_token(&token),
            _ => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..1200).map(|i| format!("cm-{i:04}")).collect();
    assert_eq!(seen, expected);

    // A continue token from before a compaction is expired.
    let first = cms
        .list(&ListParams::default().limit(10))
        .await
        .expect("list");
    let token = first.metadata.continue_.expect("more pages");
    cms.create(&PostParams::default(), &config_map("late", &[]))
        .await
        .expect("create");
    server.compact();
    let expired = status(
        cms.list(&ListParams::default().limit(10).continue_token(&token))
            .await,
    );
    assert_eq!((expired.code, expired.reason.as_str()), (410, "Expired"));
}

#[tokio::test(flavor = "multi_thread")]
async fn generation_counts_spec_changes_only() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let created = api
        .create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    assert_eq!(created.metadata.generation, Some(1));
    let pp = PatchParams::default();

    let labelled = api
        .patch(
            "alice",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("label");
    assert_eq!(labelled.metadata.generation, Some(1));

    let with_status = api
        .patch_status(
            "alice",
            &pp,
            &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
        )
        .await
        .expect("status");
    assert_eq!(with_status.metadata.generation, Some(1));

    let respecced = api
        .patch(
            "alice",
            &pp,
            &Patch::Merge(json!({"spec": {"agentType": "reviewer"}})),
        )
        .await
        .expect("spec");
    assert_eq!(respecced.metadata.generation, Some(2));

    // A no-op write keeps the resourceVersion and sends no event.
    let same = api
        .patch(
            "alice",
            &pp,
            &Patch::Merge(json!({"spec": {"agentType": "reviewer"}})),
        )
        .await
        .expect("no-op");
    assert_eq!(
        same.metadata.resource_version,
        respecced.metadata.resource_version
    );
    assert_eq!(same.metadata.generation, Some(2));

    // Without a status subresource, any change outside metadata counts.
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    cms.create(&PostParams::default(), &config_map("c", &[]))
        .await
        .expect("create");
    let changed = cms
        .patch("c", &pp, &Patch::Merge(json!({"data": {"k": "w"}})))
        .await
        .expect("patch");
    assert_eq!(changed.metadata.generation, Some(2));
}

#[tokio::test(flavor = "multi_thread")]
async fn status_is_written_only_through_its_subresource() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let mut alice = instance("alice", "coder");
    alice.data["status"] = json!({"observedGeneration": 7});
    let created = api
        .create(&PostParams::default(), &alice)
        .await
        .expect("create");
    assert!(
        created.data.get("status").is_none(),
        "status is reset on create"
    );

    let pp = PatchParams::default();
    api.patch_status(
        "alice",
        &pp,
        &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
    )
    .await
    .expect("status patch");

    // The main resource ignores status...
    let patched = api
        .patch(
            "alice",
            &pp,
            &Patch::Merge(
                json!({"spec": {"agentType": "x"}, "status": {"observedGeneration": 99}}),
            ),
        )
        .await
        .expect("patch");
    assert_eq!(patched.data["status"]["observedGeneration"], 1);
    assert_eq!(patched.data["spec"]["agentType"], "x");

    let mut current = api.get("alice").await.expect("get");
    current.data["status"]["observedGeneration"] = json!(50);
    current.data["spec"]["agentType"] = json!("y");
    let replaced = api
        .replace("alice", &PostParams::default(), &current)
        .await
        .expect("replace");
    assert_eq!(replaced.data["status"]["observedGeneration"], 1);
    assert_eq!(replaced.data["spec"]["agentType"], "y");

    // ...and the status subresource ignores everything else.
    let mut current = api.get("alice").await.expect("get");
    current.data["status"]["observedGeneration"] = json!(3);
    current.data["spec"]["agentType"] = json!("ignored");
    current.metadata.labels = Some(BTreeMap::from([("ignored".to_owned(), "yes".to_owned())]));
    let replaced = api
        .replace_status("alice", &PostParams::default(), &current)
        .await
        .expect("replace status");
    assert_eq!(replaced.data["status"]["observedGeneration"], 3);
    assert_eq!(replaced.data["spec"]["agentType"], "y");
    assert!(replaced.metadata.labels.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_with_a_field_manager() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let apply = PatchParams::apply("double-test").force();
    let body = json!({
        "apiVersion": "agentenv.io/v1alpha1",
        "kind": "AgentInstance",
        "metadata": {"name": "alice"},
        "spec": {"agentType": "coder"}
    });
    // Applying an absent object creates it.
    let created = api
        .patch("alice", &apply, &Patch::Apply(&body))
        .await
        .expect("apply create");
    assert_eq!(created.data["spec"]["agentType"], "coder");

    api.patch_status(
        "alice",
        &apply,
        &Patch::Apply(json!({
            "apiVersion": "agentenv.io/v1alpha1",
            "kind": "AgentInstance",
            "status": {"observedGeneration": 1, "conditions": []}
        })),
    )
    .await
    .expect("apply status");
    // A status apply replaces the whole status.
    let applied = api
        .patch_status(
            "alice",
            &apply,
            &Patch::Apply(json!({
                "apiVersion": "agentenv.io/v1alpha1",
                "kind": "AgentInstance",
                "status": {"observedGeneration": 2}
            })),
        )
        .await
        .expect("apply status");
    assert_eq!(applied.data["status"], json!({"observedGeneration": 2}));
    assert_eq!(applied.data["spec"]["agentType"], "coder");

    let no_manager = status(
        api.patch_status("alice", &PatchParams::default(), &Patch::Apply(&body))
            .await,
    );
    assert_eq!(
        (no_manager.code, no_manager.reason.as_str()),
        (400, "BadRequest")
    );
    assert!(
        no_manager.message.contains("fieldManager"),
        "{}",
        no_manager.message
    );

    let strategic = status(
        api.patch(
            "alice",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {}})),
        )
        .await,
    );
    assert_eq!(
        strategic.code, 415,
        "custom resources refuse strategic merge patches"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_resource_versions_conflict() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let created = api
        .create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    let stale = created.metadata.resource_version.clone().expect("rv");
    api.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"agentType": "b"}})),
    )
    .await
    .expect("patch");

    let conflict = status(
        api.patch(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": stale}, "spec": {"agentType": "c"}}),
            ),
        )
        .await,
    );
    assert_eq!((conflict.code, conflict.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        conflict.message,
        "Operation cannot be fulfilled on agentinstances.agentenv.io \"alice\": the object has been modified; please apply your changes to the latest version and try again"
    );

    let conflict = status(api.replace("alice", &PostParams::default(), &created).await);
    assert_eq!(conflict.code, 409);

    let mut unversioned = created.clone();
    unversioned.metadata.resource_version = None;
    let invalid = status(
        api.replace("alice", &PostParams::default(), &unversioned)
            .await,
    );
    assert_eq!(
        invalid.code, 422,
        "custom resources need a resourceVersion on PUT"
    );

    let current = api.get("alice").await.expect("get");
    assert_eq!(current.data["spec"]["agentType"], "b");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_patches_apply_rfc6902() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    api.create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    let req = http_patch(
        "/apis/agentenv.io/v1alpha1/namespaces/default/agentinstances/alice",
        json!([
            {"op": "test", "path": "/spec/agentType", "value": "coder"},
            {"op": "replace", "path": "/spec/agentType", "value": "reviewer"}
        ]),
    );
    let patched: serde_json::Value = server.client().request(req).await.expect("json patch");
    assert_eq!(patched["spec"]["agentType"], "reviewer");

    let req = http_patch(
        "/apis/agentenv.io/v1alpha1/namespaces/default/agentinstances/alice",
        json!([{"op": "test", "path": "/spec/agentType", "value": "coder"}]),
    );
    let failed = status(server.client().request::<serde_json::Value>(req).await);
    assert_eq!(failed.code, 422);
}

fn http_patch(path: &str, body: serde_json::Value) -> axum::http::Request<Vec<u8>> {
    axum::http::Request::patch(path)
        .header("content-type", "application/json-patch+json")
        .body(serde_json::to_vec(&body).expect("json"))
        .expect("request")
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_hold_deletion_until_removed() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let mut alice = instance("alice", "coder");
    alice.metadata.finalizers = Some(vec!["agentenv.io/cleanup".to_owned()]);
    api.create(&PostParams::default(), &alice)
        .await
        .expect("create");

    let deleted = api
        .delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    let marked = deleted
        .left()
        .expect("the object comes back while finalizers remain");
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.deletion_grace_period_seconds, Some(0));
    assert_eq!(marked.metadata.generation, Some(2));
    assert!(api.get("alice").await.is_ok(), "still there");

    let refused = status(
        api.patch(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["agentenv.io/cleanup", "agentenv.io/more"]}}),
            ),
        )
        .await,
    );
    assert_eq!((refused.code, refused.reason.as_str()), (422, "Invalid"));
    assert!(
        refused.message.contains("no new finalizers"),
        "{}",
        refused.message
    );

    api.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("remove finalizer");
    assert!(
        server
            .get("agentenv.io", "agentinstances", Some(NS), "alice")
            .is_none()
    );
    let gone = status(api.get("alice").await);
    assert_eq!(gone.code, 404);

    // Without finalizers the object goes at once.
    api.create(&PostParams::default(), &instance("bob", "coder"))
        .await
        .expect("create");
    let deleted = api
        .delete("bob", &DeleteParams::default())
        .await
        .expect("delete");
    assert!(deleted.is_left());
    assert!(
        server
            .get("agentenv.io", "agentinstances", Some(NS), "bob")
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_collection_and_preconditions() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    for name in ["a", "b", "c"] {
        let labels: &[(&str, &str)] = if name == "c" { &[] } else { &[("x", "y")] };
        cms.create(&PostParams::default(), &config_map(name, labels))
            .await
            .expect("create");
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("x=y"),
    )
    .await
    .expect("delete collection");
    assert_eq!(server.list("", "configmaps", Some(NS)).len(), 1);

    let wrong_uid = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("not-the-uid".to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let conflict = status(cms.delete("c", &wrong_uid).await);
    assert_eq!(conflict.code, 409);
    assert!(server.get("", "configmaps", Some(NS), "c").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_fold_string_data_into_data() {
    use k8s_openapi::api::core::v1::Secret;
    let server = server().await;
    let secrets: Api<Secret> = Api::namespaced(server.client(), NS);
    let mut s = Secret::default();
    s.metadata.name = Some("token".to_owned());
    s.string_data = Some(BTreeMap::from([("key".to_owned(), "hello".to_owned())]));
    let created = secrets
        .create(&PostParams::default(), &s)
        .await
        .expect("create");
    assert!(created.string_data.is_none());
    let data = created.data.expect("data");
    assert_eq!(data["key"].0, b"hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_log_names_verbs_and_subresources() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let mut alice = instance("alice", "coder");
    alice.metadata.finalizers = Some(vec!["agentenv.io/cleanup".to_owned()]);
    api.create(&PostParams::default(), &alice)
        .await
        .expect("create");
    api.get("alice").await.expect("get");
    api.list(&ListParams::default()).await.expect("list");
    api.patch_status(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
    )
    .await
    .expect("status");
    api.patch(
        "alice",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("drop finalizer");
    api.delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    let _ = api.get("alice").await;
    kube::Discovery::new(server.client())
        .run()
        .await
        .expect("discovery");

    let req = |verb: &str, sub: Option<&str>, name: Option<&str>, status: u16| Request {
        user: String::new(),
        verb: verb.to_owned(),
        group: "agentenv.io".to_owned(),
        version: "v1alpha1".to_owned(),
        resource: "agentinstances".to_owned(),
        subresource: sub.map(str::to_owned),
        namespace: Some(NS.to_owned()),
        name: name.map(str::to_owned),
        status,
    };
    assert_eq!(
        server.requests(),
        vec![
            req("create", None, None, 201),
            req("get", None, Some("alice"), 200),
            req("list", None, None, 200),
            req("patch", Some("status"), Some("alice"), 200),
            req("patch", None, Some("alice"), 200),
            req("delete", None, Some("alice"), 200),
            req("get", None, Some("alice"), 404),
        ],
        "discovery is not logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kubeconfig_points_at_the_server() {
    let server = server().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = server.write_kubeconfig(dir.path());
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    assert_eq!(config.default_namespace, "default");
    let client = kube::Client::try_from(config).expect("client");
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    cms.create(&PostParams::default(), &config_map("via-kubeconfig", &[]))
        .await
        .expect("create through kubeconfig");
    assert!(
        server
            .get("", "configmaps", Some("default"), "via-kubeconfig")
            .is_some()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kube_runtimes_finalizer_helper_works_end_to_end() {
    use kube::runtime::controller::Action;
    use kube::runtime::finalizer::{Event as Finalizer, finalizer};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const NAME: &str = "agentenv.io/cleanup";
    let server = server().await;
    let api = api(&server, "AgentInstance");
    api.create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    let cleanups = Arc::new(AtomicUsize::new(0));
    let reconcile = |api: Api<kube::api::DynamicObject>, cleanups: Arc<AtomicUsize>| async move {
        let obj = Arc::new(api.get("alice").await.expect("get"));
        finalizer(&api, NAME, obj, |event| async move {
            if let Finalizer::Cleanup(_) = event {
                cleanups.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<_, std::convert::Infallible>(Action::await_change())
        })
        .await
        .map_err(|e| e.to_string())
    };

    // First pass adds the finalizer (a JSON patch testing for null).
    reconcile(api.clone(), cleanups.clone())
        .await
        .expect("add finalizer");
    let stored = server
        .get("agentenv.io", "agentinstances", Some(NS), "alice")
        .expect("stored");
    assert_eq!(stored["metadata"]["finalizers"], json!([NAME]));

    api.delete("alice", &DeleteParams::default())
        .await
        .expect("delete");
    // Second pass sees the deletion, cleans up and removes the finalizer.
    reconcile(api.clone(), cleanups.clone())
        .await
        .expect("cleanup");
    assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    assert!(
        server
            .get("agentenv.io", "agentinstances", Some(NS), "alice")
            .is_none()
    );
    // Added and removed by two JSON patches of the object.
    let finalizer_patches = server
        .requests()
        .iter()
        .filter(|r| r.verb == "patch" && r.subresource.is_none())
        .count();
    assert_eq!(finalizer_patches, 2);
}
