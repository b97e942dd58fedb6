//! Custom resources are pruned, defaulted and validated against their CRD
//! schema and CEL rules, with the real server's messages.

mod common;

use common::{NS, api, crds, instance, object, status};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube_double::ApiServer;
use serde_json::{Value, json};

/// A small cluster-scoped CRD with a transition rule, next to the operator's.
fn widget_crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "scope": "Cluster",
            "versions": [{
                "name": "v1",
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "properties": {
                                "size": {
                                    "type": "integer",
                                    "minimum": 1,
                                    "x-kubernetes-validations": [
                                        {"rule": "self == oldSelf", "message": "size is immutable"}
                                    ]
                                },
                                "port": {"x-kubernetes-int-or-string": true},
                                "choice": {
                                    "type": "object",
                                    "properties": {"a": {"type": "string"}, "b": {"type": "string"}},
                                    "oneOf": [{"required": ["a"]}, {"required": ["b"]}]
                                },
                                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                            }
                        },
                        "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}}
                    }
                }}
            }]
        }
    })
}

async fn server() -> ApiServer {
    let mut all = crds();
    all.push(widget_crd());
    ApiServer::start(all).await
}

fn widgets(server: &ApiServer) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    Api::all_with(server.client(), &ar)
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let mut w = DynamicObject::new(name, &ar);
    w.data = json!({"spec": spec});
    w
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_required_field_is_invalid() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let err = status(
        api.create(
            &PostParams::default(),
            &object("AgentInstance", "alice", json!({})),
        )
        .await,
    );
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        err.message,
        "AgentInstance.agentenv.io \"alice\" is invalid: spec.agentType: Required value"
    );
    let causes = err.details.expect("details").causes;
    assert_eq!(causes[0].field, "spec.agentType");
    assert_eq!(causes[0].reason, "FieldValueRequired");

    let err = status(
        api.create(
            &PostParams::default(),
            &object(
                "AgentInstance",
                "bob",
                json!({"agentType": "", "runtimeInstalls": "Keep"}),
            ),
        )
        .await,
    );
    assert_eq!(
        err.message,
        "AgentInstance.agentenv.io \"bob\" is invalid: [spec.agentType: Invalid value: \"\": spec.agentType in body should be at least 1 chars long, spec.runtimeInstalls: Unsupported value: \"Keep\": supported values: \"Preserve\", \"Revert\"]"
    );

    let err = status(
        api.create(
            &PostParams::default(),
            &object(
                "AgentInstance",
                "carol",
                json!({"agentType": "x", "suspend": "yes"}),
            ),
        )
        .await,
    );
    assert_eq!(
        err.message,
        "AgentInstance.agentenv.io \"carol\" is invalid: spec.suspend: Invalid value: \"string\": spec.suspend in body must be of type boolean: \"string\""
    );
    assert!(
        server
            .list("agentenv.io", "agentinstances", Some(NS))
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cel_rules_are_enforced() {
    let server = server().await;
    let bindings = api(&server, "PluginBinding");
    let both = object(
        "PluginBinding",
        "both",
        json!({
            "target": {"agentType": "coder", "instance": "alice"},
            "plugins": [{"name": "fmt@tools"}]
        }),
    );
    let err = status(bindings.create(&PostParams::default(), &both).await);
    assert_eq!((err.code, err.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        err.message,
        "PluginBinding.agentenv.io \"both\" is invalid: spec.target: Invalid value: \"object\": set exactly one of agentType or instance"
    );

    let bad_name = object(
        "PluginBinding",
        "bad-name",
        json!({"target": {"agentType": "coder"}, "plugins": [{"name": "no-marketplace"}]}),
    );
    let err = status(bindings.create(&PostParams::default(), &bad_name).await);
    assert!(
        err.message.contains(
            "spec.plugins[0].name: Invalid value: \"string\": must be <plugin>@<marketplace>"
        ),
        "{}",
        err.message
    );

    let twice = object(
        "PluginBinding",
        "twice",
        json!({"target": {"agentType": "coder"}, "plugins": [{"name": "a@m"}, {"name": "a@m", "enabled": false}]}),
    );
    let err = status(bindings.create(&PostParams::default(), &twice).await);
    assert_eq!(
        err.message,
        "PluginBinding.agentenv.io \"twice\" is invalid: spec.plugins[1]: Duplicate value: {\"name\":\"a@m\"}"
    );

    // A rule on the root names no field.
    let servers = api(&server, "McpServer");
    let reserved = object(
        "McpServer",
        "workspace",
        json!({"target": {"agentType": "coder"}, "stdio": {"command": "srv"}}),
    );
    let err = status(servers.create(&PostParams::default(), &reserved).await);
    assert_eq!(
        err.message,
        "McpServer.agentenv.io \"workspace\" is invalid: <nil>: Invalid value: \"object\": the MCP server name 'workspace' is reserved by Claude Code"
    );

    let ok = object(
        "PluginBinding",
        "ok",
        json!({"target": {"instance": "alice"}, "plugins": [{"name": "fmt@tools"}]}),
    );
    bindings
        .create(&PostParams::default(), &ok)
        .await
        .expect("valid binding");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_fields_are_pruned_and_defaults_applied() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    let mut alice = object(
        "AgentInstance",
        "alice",
        json!({"agentType": "coder", "bogus": 1, "envDir": {}, "restart": {"minInterval": "30s"}}),
    );
    alice.data["topLevelBogus"] = json!(true);
    let created = api
        .create(&PostParams::default(), &alice)
        .await
        .expect("create");
    let spec = &created.data["spec"];
    assert!(spec.get("bogus").is_none(), "pruned: {spec}");
    assert!(created.data.get("topLevelBogus").is_none());
    assert_eq!(spec["runtimeInstalls"], "Preserve");
    assert_eq!(spec["suspend"], false);
    assert_eq!(spec["envDir"]["deletionPolicy"], "Retain");
    assert_eq!(
        spec["restart"],
        json!({"minInterval": "30s", "onChange": true, "onDrift": false, "strategy": "Evict"})
    );
    assert!(spec.get("workload").is_none(), "no default, stays absent");

    let stored = server
        .get("agentenv.io", "agentinstances", Some(NS), "alice")
        .expect("stored");
    assert_eq!(stored["spec"], *spec);

    let bindings = api_binding(&server);
    let created = bindings
        .create(
            &PostParams::default(),
            &object(
                "PluginBinding",
                "b",
                json!({"target": {"agentType": "x"}, "plugins": [{"name": "a@m"}]}),
            ),
        )
        .await
        .expect("create");
    assert_eq!(
        created.data["spec"]["plugins"][0]["enabled"], true,
        "defaults inside list items"
    );
}

fn api_binding(server: &ApiServer) -> Api<DynamicObject> {
    api(server, "PluginBinding")
}

#[tokio::test(flavor = "multi_thread")]
async fn patches_and_status_writes_are_validated_too() {
    let server = server().await;
    let api = api(&server, "AgentInstance");
    api.create(&PostParams::default(), &instance("alice", "coder"))
        .await
        .expect("create");
    let err = status(
        api.patch(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"envDir": {"path": "/abs"}}})),
        )
        .await,
    );
    assert!(
        err.message.ends_with(
            "spec.envDir.path: Invalid value: \"string\": must be relative to the env root"
        ),
        "{}",
        err.message
    );
    let err = status(
        api.patch_status(
            "alice",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": "one"}})),
        )
        .await,
    );
    assert_eq!(err.code, 422);
    assert!(
        err.message.contains("status.observedGeneration"),
        "{}",
        err.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transition_rules_see_the_old_object() {
    let server = server().await;
    let widgets = widgets(&server);
    let created = widgets
        .create(
            &PostParams::default(),
            &widget(
                "w",
                json!({"size": 2, "port": "http", "choice": {"a": "x"}}),
            ),
        )
        .await
        .expect("create");
    assert!(created.metadata.namespace.is_none(), "cluster-scoped");
    assert!(server.get("example.com", "widgets", None, "w").is_some());

    let err = status(
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"size": 3}})),
            )
            .await,
    );
    assert_eq!(
        err.message,
        "Widget.example.com \"w\" is invalid: spec.size: Invalid value: \"integer\": size is immutable"
    );
    widgets
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"port": 8080, "free": {"x": {"y": 1}}}})),
        )
        .await
        .expect("other fields may change");
    let stored = server
        .get("example.com", "widgets", None, "w")
        .expect("stored");
    assert_eq!(
        stored["spec"]["free"],
        json!({"x": {"y": 1}}),
        "preserved unknown fields"
    );

    let err = status(
        widgets
            .create(
                &PostParams::default(),
                &widget(
                    "v",
                    json!({"size": 0, "choice": {"a": "x", "b": "y"}, "port": 1.5}),
                ),
            )
            .await,
    );
    assert_eq!(
        err.message,
        "Widget.example.com \"v\" is invalid: [spec.size: Invalid value: 0: spec.size in body should be greater than or equal to 1, spec.choice: Invalid value: {\"a\":\"x\",\"b\":\"y\"}: spec.choice in body must validate one and only one schema (oneOf), spec.port: Invalid value: \"number\": spec.port in body must be of type integer,string: \"number\"]"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn built_in_kinds_get_object_meta_checks_only() {
    let server = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(server.client(), NS);
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("Bad_Name".to_owned());
    let err = status(cms.create(&PostParams::default(), &cm).await);
    assert_eq!(err.code, 422);
    assert!(
        err.message.starts_with("ConfigMap \"Bad_Name\" is invalid: metadata.name: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"),
        "{}",
        err.message
    );
    let mut cm = ConfigMap::default();
    cm.metadata.name = Some("ok".to_owned());
    cm.metadata.labels = Some([("app".to_owned(), "not valid!".to_owned())].into());
    let err = status(cms.create(&PostParams::default(), &cm).await);
    assert!(
        err.message
            .contains("metadata.labels: Invalid value: \"not valid!\""),
        "{}",
        err.message
    );
}
