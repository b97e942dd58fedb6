//! The double against a real kube-apiserver, request by request.
//!
//! Each scenario below is one kind of request the controller makes
//! (`src/cluster/`, `src/engine/restart.rs`), sent the way the controller sends it.
//! The harness runs every scenario twice, on a fresh double and on a real
//! kube-apiserver (`kube-envtest`), each in a namespace of its own, and
//! compares what the two servers answered: status codes, the reason,
//! message and causes of every `Status`, and the fields the controller
//! reads. Values the server makes up (uids, resourceVersions, creation and
//! deletion times) are compared by presence, or by whether they changed.
//! Every difference of every scenario is listed before the test fails.
//!
//! A new kind of request is one more `async fn` and one more line in
//! [`scenarios`]. `DIFFERENTIAL_TRACE=1` prints what kube-apiserver answered
//! at every step. Without `KUBEBUILDER_ASSETS` the test prints SKIPPED.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, EvictParams, GetParams, ListParams, Patch,
    PatchParams, PostParams, WatchParams,
};
use kube::core::WatchEvent;
use kube_double::ApiServer;
use kube_envtest::{ControlPlane, Options};
use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;

const CRDS: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../crds/crds.yaml"));

/// The controller's field manager (`src/cluster/mod.rs`).
const FIELD_MANAGER: &str = "agent-env";
/// The label of Secrets the controller watches.
const SECRETS_LABEL: &str = "agentenv.io/secrets";
/// The label naming a pod's instance.
const INSTANCE_LABEL: &str = "agentenv.io/instance";
/// The finalizer of instances whose env dir goes with them.
const FINALIZER: &str = "agentenv.io/env-dir";
/// The builtin ConfigMap, watched by name.
const BUILTIN: &str = "agent-env-builtin";
/// Fixed client-side times: the servers must hand them back as sent.
const T0: &str = "2030-01-02T03:04:05.123456Z";
const T1: &str = "2030-01-02T03:04:10.654321Z";
const T2: &str = "2030-01-02T03:04:15.000001Z";

// ---------------------------------------------------------------------------
// The scenarios
// ---------------------------------------------------------------------------

type Run = for<'a> fn(&'a Side) -> Pin<Box<dyn Future<Output = Trace> + 'a>>;

struct Scenario {
    name: &'static str,
    /// Needs a server whose old resourceVersions can be made to expire: the
    /// real one then runs without its watch cache, so that an etcd
    /// compaction reaches watches as it does once the cache has moved on.
    expires_history: bool,
    run: Run,
}

macro_rules! scenario {
    ($f:ident) => {
        Scenario {
            name: stringify!($f),
            expires_history: false,
            run: |s| Box::pin($f(s)),
        }
    };
    ($f:ident, expires_history) => {
        Scenario {
            name: stringify!($f),
            expires_history: true,
            run: |s| Box::pin($f(s)),
        }
    };
}

fn scenarios() -> Vec<Scenario> {
    vec![
        scenario!(the_four_kinds_are_listed_in_pages),
        scenario!(an_instance_watch_sees_every_change_in_order),
        scenario!(a_watch_from_a_compacted_version_expires, expires_history),
        scenario!(labelled_secrets_are_listed_and_watched_by_selector),
        scenario!(the_builtin_config_map_is_watched_by_name),
        scenario!(agent_pods_are_listed_and_watched_by_label),
        scenario!(a_lease_is_taken_renewed_and_released),
        scenario!(status_is_written_by_server_side_apply),
        scenario!(status_falls_back_to_a_json_patch),
        scenario!(objects_are_applied_by_their_field_manager),
        scenario!(events_are_created_then_counted_as_a_series),
        scenario!(the_finalizer_is_added_and_removed_by_merge_patch),
        scenario!(a_pod_is_evicted_without_a_budget),
        scenario!(a_disruption_budget_decides_evictions),
        scenario!(a_rollout_restart_stamps_the_pod_template),
    ]
}

/// A difference the double keeps on purpose or cannot yet lose; each must
/// still show, or the entry goes.
struct Accepted {
    scenario: &'static str,
    /// The end of the differing field's path.
    field: &'static str,
    double: Value,
    real: Value,
}

fn accepted() -> Vec<Accepted> {
    vec![
        // A real server makes every new pod Pending; the double leaves the
        // phase to the test (README, "Where it differs"), and its own
        // eviction tests count such pods as running. The controller
        // evicts only running pods, so a test on the double must set the
        // phase to see what a cluster would do.
        Accepted {
            scenario: "agent_pods_are_listed_and_watched_by_label",
            field: "/status/phase",
            double: Value::Null,
            real: json!("Pending"),
        },
    ]
}

/// What the controller reads of its own kinds.
const CUSTOM: &[&str] = &[
    "/apiVersion",
    "/kind",
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/uid?",
    "/metadata/resourceVersion?",
    "/metadata/creationTimestamp?",
    "/metadata/generation",
    "/metadata/finalizers",
    "/metadata/deletionTimestamp?",
    "/spec",
    "/status",
];

async fn the_four_kinds_are_listed_in_pages(s: &Side) -> Trace {
    let mut t = Trace::default();
    for (kind, name, spec) in [
        (
            INSTANCE,
            "alice",
            json!({"agentType": "coder", "envDir": {"path": "team/alice"}}),
        ),
        (INSTANCE, "bob", json!({"agentType": "coder"})),
        (
            BINDING,
            "coders",
            json!({"target": {"agentType": "coder"}, "plugins": [{"name": "lint@tools"}]}),
        ),
        (
            MARKETPLACE,
            "tools",
            json!({"target": {"agentType": "coder"}, "source": {"github": {"repo": "example/tools"}}}),
        ),
        (
            MCP,
            "forgejo",
            json!({"target": {"instance": "alice"}, "http": {"url": "https://forgejo.example/mcp"}}),
        ),
    ] {
        let created = s
            .create(kind, &object(kind, name, json!({"spec": spec})))
            .await;
        t.see(
            &format!("create {} {name}", kind.kind),
            answer(&created, CUSTOM),
        );
    }
    // kube-runtime's watcher lists in pages of 500, at the most recent version.
    for kind in [INSTANCE, BINDING, MARKETPLACE, MCP] {
        let listed = s.list(kind, &ListParams::default().limit(500)).await;
        t.see(&format!("list {}", kind.plural), listing(&listed, CUSTOM));
    }
    let first = s.list(INSTANCE, &ListParams::default().limit(1)).await;
    t.see("a page of one", listing(&first, &["/metadata/name"]));
    let token = first.body["metadata"]["continue"]
        .as_str()
        .unwrap_or_default();
    let rest = s
        .list(
            INSTANCE,
            &ListParams::default().limit(1).continue_token(token),
        )
        .await;
    t.see("the page after it", listing(&rest, &["/metadata/name"]));
    let whole = s.list(INSTANCE, &ListParams::default()).await;
    t.see("a list without pages", listing(&whole, &["/metadata/name"]));
    t
}

async fn an_instance_watch_sees_every_change_in_order(s: &Side) -> Trace {
    let mut t = Trace::default();
    let listed = s.list(INSTANCE, &ListParams::default().limit(500)).await;
    let alice = object(INSTANCE, "alice", json!({"spec": {"agentType": "coder"}}));
    s.create(INSTANCE, &alice).await.succeeded();
    let spec = json!({"spec": {"agentType": "reviewer"}});
    let changed = s
        .merge(INSTANCE, "alice", &PatchParams::default(), &spec)
        .await;
    t.see("a spec change", answer(&changed, &["/metadata/generation"]));
    let status = typed(INSTANCE, json!({"status": {"observedGeneration": 2}}));
    s.apply_status(INSTANCE, "alice", &status).await.succeeded();
    // Flux's "reconcile now": metadata only, so no new generation.
    let requested =
        json!({"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": "now"}}});
    let annotated = s
        .merge(INSTANCE, "alice", &PatchParams::default(), &requested)
        .await;
    t.see(
        "an annotation",
        answer(&annotated, &["/metadata/generation"]),
    );
    s.delete(INSTANCE, "alice", &DeleteParams::default())
        .await
        .succeeded();
    let end = object(INSTANCE, "end", json!({"spec": {"agentType": "coder"}}));
    s.create(INSTANCE, &end).await.succeeded();

    let events = s.watch(INSTANCE, &watch_params(), version(&listed)).await;
    let fields = [
        "/apiVersion",
        "/kind",
        "/metadata/name",
        "/metadata/generation",
        "/metadata/resourceVersion?",
        "/metadata/annotations",
        "/spec",
        "/status",
    ];
    let seen = follow(events, &fields, added("end")).await;
    t.see("watch from the list's resourceVersion", seen);
    t
}

async fn a_watch_from_a_compacted_version_expires(s: &Side) -> Trace {
    let mut t = Trace::default();
    let before = s.list(INSTANCE, &ListParams::default().limit(500)).await;
    let alice = object(INSTANCE, "alice", json!({"spec": {"agentType": "coder"}}));
    s.create(INSTANCE, &alice).await.succeeded();
    let spec = json!({"spec": {"agentType": "reviewer"}});
    s.merge(INSTANCE, "alice", &PatchParams::default(), &spec)
        .await
        .succeeded();
    s.expire_history().await;

    // kube-runtime's watcher relists on any 410; the message depends on
    // whether the watch cache or etcd answered, so only the code and reason
    // are compared.
    let events = s.watch(INSTANCE, &watch_params(), version(&before)).await;
    let seen = follow(events, &["/metadata/name"], |events| !events.is_empty()).await;
    t.see("watch from before the compaction", seen);

    let relisted = s.list(INSTANCE, &ListParams::default().limit(500)).await;
    t.see(
        "the relist",
        listing(
            &relisted,
            &["/metadata/name", "/metadata/generation", "/spec"],
        ),
    );
    let bob = object(INSTANCE, "bob", json!({"spec": {"agentType": "coder"}}));
    s.create(INSTANCE, &bob).await.succeeded();
    let events = s.watch(INSTANCE, &watch_params(), version(&relisted)).await;
    let seen = follow(events, &["/metadata/name"], added("bob")).await;
    t.see("watch from the relist", seen);
    t
}

async fn labelled_secrets_are_listed_and_watched_by_selector(s: &Side) -> Trace {
    let mut t = Trace::default();
    let secret = |name: &str, labels: Value, body: Value| {
        let mut o = object(SECRET, name, body);
        o["metadata"]["labels"] = labels;
        o
    };
    let on = json!({SECRETS_LABEL: "true"});
    let off = json!({SECRETS_LABEL: "false"});
    s.create(
        SECRET,
        &secret("creds", on.clone(), json!({"stringData": {"TOKEN": "t0"}})),
    )
    .await
    .succeeded();
    s.create(
        SECRET,
        &secret("plain", json!({}), json!({"data": {"TOKEN": "cDA="}})),
    )
    .await
    .succeeded();
    s.create(
        SECRET,
        &secret("off", off.clone(), json!({"stringData": {"TOKEN": "x"}})),
    )
    .await
    .succeeded();

    let fields = ["/metadata/name", "/metadata/labels", "/data", "/stringData"];
    let selector = format!("{SECRETS_LABEL}=true");
    let listed = s
        .list(SECRET, &ListParams::default().labels(&selector).limit(500))
        .await;
    t.see("list by label", listing(&listed, &fields));

    let pp = PatchParams::default();
    s.merge(SECRET, "plain", &pp, &json!({"metadata": {"labels": on}}))
        .await
        .succeeded();
    s.merge(SECRET, "creds", &pp, &json!({"metadata": {"labels": off}}))
        .await
        .succeeded();
    let rotated = s
        .merge(
            SECRET,
            "plain",
            &pp,
            &json!({"stringData": {"TOKEN": "p1"}}),
        )
        .await;
    t.see("stringData folded into data", answer(&rotated, &fields));
    s.delete(SECRET, "plain", &DeleteParams::default())
        .await
        .succeeded();
    s.create(
        SECRET,
        &secret(
            "end",
            json!({SECRETS_LABEL: "true"}),
            json!({"data": {"K": "dg=="}}),
        ),
    )
    .await
    .succeeded();
    let wp = watch_params().labels(&selector);
    let events = s.watch(SECRET, &wp, version(&listed)).await;
    t.see(
        "watch by label",
        follow(events, &fields, added("end")).await,
    );
    t
}

async fn the_builtin_config_map_is_watched_by_name(s: &Side) -> Trace {
    let mut t = Trace::default();
    let by_name = format!("metadata.name={BUILTIN}");
    let fields = ["/metadata/name", "/data"];
    let listed = s
        .list(
            CONFIG_MAP,
            &ListParams::default().fields(&by_name).limit(500),
        )
        .await;
    t.see("list by name while absent", listing(&listed, &fields));
    let builtin = |agents: &str| {
        object(
            CONFIG_MAP,
            BUILTIN,
            json!({"data": {"agents.json": agents}}),
        )
    };
    s.create(
        CONFIG_MAP,
        &object(CONFIG_MAP, "other", json!({"data": {"k": "v"}})),
    )
    .await
    .succeeded();
    s.create(CONFIG_MAP, &builtin("{}")).await.succeeded();
    let data = json!({"data": {"agents.json": "{\"types\": []}"}});
    s.merge(CONFIG_MAP, BUILTIN, &PatchParams::default(), &data)
        .await
        .succeeded();
    s.delete(CONFIG_MAP, BUILTIN, &DeleteParams::default())
        .await
        .succeeded();
    s.create(CONFIG_MAP, &builtin("{\"types\": [{\"name\": \"coder\"}]}"))
        .await
        .succeeded();
    let events = s
        .watch(
            CONFIG_MAP,
            &watch_params().fields(&by_name),
            version(&listed),
        )
        .await;
    let seen = follow(events, &fields, |events| {
        events.iter().filter(|(kind, _)| kind == "ADDED").count() == 2
    })
    .await;
    t.see("watch by name", seen);
    t
}

async fn agent_pods_are_listed_and_watched_by_label(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = [
        "/metadata/name",
        "/metadata/uid?",
        "/metadata/labels",
        "/metadata/deletionTimestamp?",
        "/status/phase",
    ];
    let created = s
        .create(
            POD,
            &pod("agent-alice-1", json!({INSTANCE_LABEL: "alice"}), None),
        )
        .await;
    t.see("a new pod, before any kubelet", answer(&created, &fields));
    s.create(POD, &pod("web-1", json!({"app": "web"}), None))
        .await
        .succeeded();
    for name in ["agent-alice-1", "web-1"] {
        s.run_pod(name, true).await;
    }
    let listed = s
        .list(
            POD,
            &ListParams::default().labels(INSTANCE_LABEL).limit(500),
        )
        .await;
    t.see("list by label key", listing(&listed, &fields));
    let labelled = json!({"metadata": {"labels": {INSTANCE_LABEL: "bob"}}});
    s.merge(POD, "web-1", &PatchParams::default(), &labelled)
        .await
        .succeeded();
    let deleted = s
        .delete(POD, "agent-alice-1", &DeleteParams::default())
        .await;
    t.see("delete a pod on no node", answer(&deleted, &fields));
    let gone = s.get(POD, "agent-alice-1").await;
    t.see("the deleted pod", answer(&gone, &fields));
    s.create(POD, &pod("agent-end", json!({INSTANCE_LABEL: "end"}), None))
        .await
        .succeeded();
    let events = s
        .watch(
            POD,
            &watch_params().labels(INSTANCE_LABEL),
            version(&listed),
        )
        .await;
    t.see(
        "watch by label key",
        follow(events, &fields, added("agent-end")).await,
    );
    t
}

async fn a_lease_is_taken_renewed_and_released(s: &Side) -> Trace {
    let mut t = Trace::default();
    let name = "agent-env-operator";
    let fields = ["/metadata/name", "/metadata/resourceVersion?", "/spec"];
    let lease = |spec: Value| object(LEASE, name, json!({"spec": spec}));
    let held = |renew: &str| {
        json!({"holderIdentity": "replica-a", "leaseDurationSeconds": 15,
               "acquireTime": T0, "renewTime": renew, "leaseTransitions": 1})
    };

    let missing = s.get(LEASE, name).await;
    t.see("get before anyone holds it", answer(&missing, &fields));
    let created = s.create(LEASE, &lease(held(T0))).await;
    t.see("create", answer(&created, &fields));
    let again = s.create(LEASE, &lease(held(T0))).await;
    t.see("create by a second replica", answer(&again, &fields));

    let mut renewal = created.body.clone();
    renewal["spec"] = held(T1);
    let renewed = s.replace(LEASE, name, &renewal).await;
    t.see("renew", answer(&renewed, &fields));
    t.see("renewing changed the version", changed(&created, &renewed));
    let stale = s.replace(LEASE, name, &renewal).await;
    t.see("renew from a stale read", answer(&stale, &fields));

    let mut release = renewed.body.clone();
    release["spec"] = json!({"leaseDurationSeconds": 1, "acquireTime": T0,
                             "renewTime": T2, "leaseTransitions": 1});
    let released = s.replace(LEASE, name, &release).await;
    t.see("release", answer(&released, &fields));
    let read = s.get(LEASE, name).await;
    t.see("read by a standby", answer(&read, &fields));
    t
}

/// An instance status as the controller writes it (`src/cluster/status.rs`).
fn instance_status(ready: bool) -> Value {
    let condition = |type_: &str, status: &str, reason: &str| {
        json!({"type": type_, "status": status, "reason": reason,
               "message": format!("{type_} is {status}"), "lastTransitionTime": "2030-01-02T03:04:05Z",
               "observedGeneration": 1})
    };
    if ready {
        json!({
            "observedGeneration": 1,
            "conditions": [condition("Ready", "True", "Rendered"), condition("Reconciling", "False", "Rendered"),
                           condition("Stalled", "False", "Rendered")],
            "rendered": {"plugins": 2, "marketplaces": 1, "mcpServers": 0, "contentHash": "abc",
                         "time": "2030-01-02T03:04:05Z",
                         "entries": [{"key": "enabledPlugins", "name": "lint@tools", "scope": "type",
                                      "object": "PluginBinding/coders"}]},
            "lastHandledReconcileAt": "now",
        })
    } else {
        json!({
            "observedGeneration": 1,
            "conditions": [condition("Ready", "False", "MissingSecret"),
                           condition("Stalled", "True", "MissingSecret")],
        })
    }
}

async fn status_is_written_by_server_side_apply(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = [
        "/metadata/generation",
        "/metadata/resourceVersion?",
        "/spec",
        "/status",
    ];
    let created = s
        .create(
            INSTANCE,
            &object(INSTANCE, "alice", json!({"spec": {"agentType": "coder"}})),
        )
        .await;
    let ready = s
        .apply_status(
            INSTANCE,
            "alice",
            &typed(INSTANCE, json!({"status": instance_status(true)})),
        )
        .await;
    t.see("apply a ready status", answer(&ready, &fields));
    t.see("applying changed the version", changed(&created, &ready));
    let same = s
        .apply_status(
            INSTANCE,
            "alice",
            &typed(INSTANCE, json!({"status": instance_status(true)})),
        )
        .await;
    t.see("apply the same status again", answer(&same, &fields));
    t.see("the same status keeps the version", changed(&ready, &same));
    let stalled = s
        .apply_status(
            INSTANCE,
            "alice",
            &typed(INSTANCE, json!({"status": instance_status(false)})),
        )
        .await;
    t.see(
        "apply a stalled status without the rendered summary",
        answer(&stalled, &fields),
    );
    let missing = s
        .apply_status(
            INSTANCE,
            "nobody",
            &typed(INSTANCE, json!({"status": instance_status(true)})),
        )
        .await;
    t.see(
        "apply the status of a missing instance",
        answer(&missing, &fields),
    );

    // Bindings, marketplaces and MCP servers share one status shape.
    for (kind, spec) in [
        (
            BINDING,
            json!({"target": {"agentType": "coder"}, "plugins": [{"name": "lint@tools"}]}),
        ),
        (
            MARKETPLACE,
            json!({"target": {"agentType": "coder"}, "source": {"git": {"url": "https://git.example/tools"}}}),
        ),
        (
            MCP,
            json!({"target": {"agentType": "coder"}, "stdio": {"command": "forgejo-mcp"}}),
        ),
    ] {
        s.create(kind, &object(kind, "shared", json!({"spec": spec})))
            .await
            .succeeded();
        let object_status = json!({"status": {
            "observedGeneration": 1,
            "conditions": [{"type": "Ready", "status": "True", "reason": "Applied",
                            "message": "applies to 2 instances", "lastTransitionTime": "2030-01-02T03:04:05Z"}],
            "instances": 2,
            "conflicts": ["enabledPlugins/lint@tools: PluginBinding/other says false"],
        }});
        let applied = s
            .apply_status(kind, "shared", &typed(kind, object_status))
            .await;
        t.see(
            &format!("apply a {}'s status", kind.kind),
            answer(&applied, &fields),
        );
        let quiet = json!({"status": {"observedGeneration": 1, "instances": 0}});
        let applied = s.apply_status(kind, "shared", &typed(kind, quiet)).await;
        t.see(
            &format!("apply a {}'s status without conditions", kind.kind),
            answer(&applied, &fields),
        );
    }
    t
}

/// Not a request of the controller's: the tests' own `apply` helpers
/// (`tests/common/`) set up objects on either server by server-side apply,
/// and must see the same objects on both.
async fn objects_are_applied_by_their_field_manager(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = [
        "/metadata/generation",
        "/metadata/labels",
        "/metadata/annotations",
        "/spec",
    ];
    let apply = |labels: Value, spec: Value| {
        let mut o = object(INSTANCE, "alice", json!({"spec": spec}));
        o["metadata"]["labels"] = labels;
        o
    };
    let pp = PatchParams::apply("tests").force();
    let first = apply(
        json!({"team": "a", "tier": "gold"}),
        json!({"agentType": "coder", "suspend": true}),
    );
    let created = s.apply(INSTANCE, "alice", &pp, &first).await;
    t.see("apply an absent object", answer(&created, &fields));
    let marked =
        json!({"metadata": {"annotations": {"note": "by hand"}, "labels": {"owner": "ops"}}});
    s.merge(INSTANCE, "alice", &PatchParams::default(), &marked)
        .await
        .succeeded();
    let second = apply(json!({"team": "a"}), json!({"agentType": "coder"}));
    let reapplied = s.apply(INSTANCE, "alice", &pp, &second).await;
    t.see(
        "apply again, leaving out a label and a field",
        answer(&reapplied, &fields),
    );
    t
}

async fn status_falls_back_to_a_json_patch(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = ["/metadata/generation", "/spec", "/status"];
    s.create(
        INSTANCE,
        &object(INSTANCE, "alice", json!({"spec": {"agentType": "coder"}})),
    )
    .await
    .succeeded();
    let replace = |status: Value| json!([{"op": "add", "path": "/status", "value": status}]);
    let first = s
        .json_patch_status(INSTANCE, "alice", &replace(instance_status(true)))
        .await;
    t.see("add a status where there is none", answer(&first, &fields));
    let second = s
        .json_patch_status(INSTANCE, "alice", &replace(instance_status(false)))
        .await;
    t.see("replace the status as a whole", answer(&second, &fields));
    // Once the object can be typed again the controller applies once more.
    let patched = s
        .json_patch_status(INSTANCE, "alice", &replace(instance_status(true)))
        .await;
    t.see("the ready status by JSON patch", answer(&patched, &fields));
    let applied = s
        .apply_status(
            INSTANCE,
            "alice",
            &typed(INSTANCE, json!({"status": instance_status(false)})),
        )
        .await;
    t.see(
        "then a stalled status by server-side apply",
        answer(&applied, &fields),
    );
    let missing = s
        .json_patch_status(INSTANCE, "nobody", &replace(instance_status(false)))
        .await;
    t.see("patch a missing instance", answer(&missing, &fields));
    t
}

async fn events_are_created_then_counted_as_a_series(s: &Side) -> Trace {
    let mut t = Trace::default();
    let created = s
        .create(
            INSTANCE,
            &object(INSTANCE, "alice", json!({"spec": {"agentType": "coder"}})),
        )
        .await;
    let meta = &created.body["metadata"];
    // As kube-runtime's Recorder builds it for `instance.object_ref()`.
    let regarding = json!({"apiVersion": INSTANCE.api_version, "kind": INSTANCE.kind,
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]});
    let event = |name: &str, type_: &str, reason: &str, note: &str| {
        object(
            EVENT,
            name,
            json!({"action": "Reconcile", "reason": reason, "note": note, "type": type_,
                   "eventTime": T0, "regarding": regarding,
                   "reportingController": FIELD_MANAGER, "reportingInstance": "replica-a"}),
        )
    };
    let fields = [
        "/metadata/name",
        "/action",
        "/reason",
        "/note",
        "/type",
        "/eventTime",
        "/regarding/apiVersion",
        "/regarding/kind",
        "/regarding/name",
        "/regarding/namespace",
        "/regarding/uid?",
        "/reportingController",
        "/reportingInstance",
        "/series",
    ];
    let rendered = event(
        "alice.18a2b3c4d5e6f708",
        "Normal",
        "Rendered",
        "rendered 2 plugins",
    );
    let first = s.create(EVENT, &rendered).await;
    t.see("a Normal event", answer(&first, &fields));
    let mut repeat = rendered.clone();
    repeat["series"] = json!({"count": 2, "lastObservedTime": T1});
    let series = s
        .merge(
            EVENT,
            "alice.18a2b3c4d5e6f708",
            &PatchParams::default(),
            &repeat,
        )
        .await;
    t.see(
        "the same event again, as a series",
        answer(&series, &fields),
    );
    // The controller cuts notes at 1,000 bytes and adds an ellipsis.
    let long = format!("{}…", "x".repeat(1000));
    let warning = event("alice.18a2b3c4d5e6f709", "Warning", "MissingSecret", &long);
    let warned = s.create(EVENT, &warning).await;
    t.see("a Warning with the longest note", answer(&warned, &fields));
    t
}

async fn the_finalizer_is_added_and_removed_by_merge_patch(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = [
        "/metadata/name",
        "/metadata/generation",
        "/metadata/finalizers",
        "/metadata/deletionTimestamp?",
        "/metadata/deletionGracePeriodSeconds",
    ];
    let listed = s.list(INSTANCE, &ListParams::default().limit(500)).await;
    let spec = json!({"spec": {"agentType": "coder", "envDir": {"deletionPolicy": "Delete"}}});
    let created = s.create(INSTANCE, &object(INSTANCE, "alice", spec)).await;
    // As `Ctx::patch_finalizers`: the list, and the version it was read at.
    let finalizers = |list: &[&str], read: &Reply| json!({"metadata": {"finalizers": list, "resourceVersion": read.body["metadata"]["resourceVersion"]}});
    let pp = PatchParams::default();
    let finalized = s
        .merge(INSTANCE, "alice", &pp, &finalizers(&[FINALIZER], &created))
        .await;
    t.see("add the finalizer", answer(&finalized, &fields));
    let stale = s
        .merge(INSTANCE, "alice", &pp, &finalizers(&[], &created))
        .await;
    t.see("drop it from a stale read", answer(&stale, &fields));

    let deleted = s.delete(INSTANCE, "alice", &DeleteParams::default()).await;
    t.see("delete while finalized", answer(&deleted, &fields));
    let deleting = s.get(INSTANCE, "alice").await;
    t.see("the instance being deleted", answer(&deleting, &fields));
    let another = s
        .merge(
            INSTANCE,
            "alice",
            &pp,
            &finalizers(&[FINALIZER, "example.com/other"], &deleting),
        )
        .await;
    t.see("add a finalizer while deleting", answer(&another, &fields));
    let released = s
        .merge(INSTANCE, "alice", &pp, &finalizers(&[], &deleting))
        .await;
    t.see("drop the last finalizer", answer(&released, &fields));
    let gone = s.get(INSTANCE, "alice").await;
    t.see("the instance afterwards", answer(&gone, &fields));
    let missing = s
        .merge(INSTANCE, "alice", &pp, &finalizers(&[], &deleting))
        .await;
    t.see(
        "patch the finalizers of a missing instance",
        answer(&missing, &fields),
    );

    // deletionPolicy back to Retain: the finalizer goes, the instance stays.
    let spec = json!({"spec": {"agentType": "coder", "envDir": {"deletionPolicy": "Delete"}}});
    let bob = s.create(INSTANCE, &object(INSTANCE, "bob", spec)).await;
    let with = s
        .merge(INSTANCE, "bob", &pp, &finalizers(&[FINALIZER], &bob))
        .await;
    let without = s.merge(INSTANCE, "bob", &pp, &finalizers(&[], &with)).await;
    t.see(
        "drop the finalizer of a live instance",
        answer(&without, &fields),
    );
    let kept = s.get(INSTANCE, "bob").await;
    t.see("the live instance afterwards", answer(&kept, &fields));

    s.create(
        INSTANCE,
        &object(INSTANCE, "end", json!({"spec": {"agentType": "coder"}})),
    )
    .await
    .succeeded();
    let events = s.watch(INSTANCE, &watch_params(), version(&listed)).await;
    t.see(
        "watch across the deletion",
        follow(events, &fields, added("end")).await,
    );
    t
}

/// What the controller reads of a pod, and what an eviction leaves.
const POD_FIELDS: &[&str] = &[
    "/metadata/name",
    "/metadata/uid?",
    "/metadata/deletionTimestamp?",
    "/metadata/deletionGracePeriodSeconds",
    "/status/phase",
];

/// Conditions with the times the server stamps on them reduced to whether
/// they are set.
fn conditions(conditions: &Value) -> Value {
    let mut conditions = conditions.clone();
    for c in conditions.as_array_mut().into_iter().flatten() {
        for time in ["lastTransitionTime", "lastProbeTime"] {
            c[time] = json!(c.get(time).is_some_and(|v| !v.is_null()));
        }
    }
    conditions
}

async fn a_pod_is_evicted_without_a_budget(s: &Side) -> Trace {
    let mut t = Trace::default();
    let labels = json!({INSTANCE_LABEL: "alice"});
    s.create(POD, &pod("unplaced", labels.clone(), None))
        .await
        .succeeded();
    s.create(POD, &pod("placed", labels.clone(), Some("node-a")))
        .await
        .succeeded();
    s.create(POD, &pod("placed-too", labels.clone(), Some("node-a")))
        .await
        .succeeded();
    s.create(POD, &pod("starting", labels, Some("node-a")))
        .await
        .succeeded();
    for name in ["unplaced", "placed", "placed-too"] {
        s.run_pod(name, true).await;
    }
    s.merge_status(POD, "starting", json!({"phase": "Pending"}))
        .await;

    let evicted = s.evict("unplaced").await;
    t.see("evict a pod on no node", answer(&evicted, &[]));
    let gone = s.get(POD, "unplaced").await;
    t.see("that pod afterwards", answer(&gone, POD_FIELDS));

    let evicted = s.evict("placed").await;
    t.see("evict a pod on a node", answer(&evicted, &[]));
    let terminating = s.get(POD, "placed").await;
    t.see("that pod afterwards", answer(&terminating, POD_FIELDS));
    t.see(
        "its conditions",
        conditions(&terminating.body["status"]["conditions"]),
    );
    let again = s.evict("placed").await;
    t.see("evict it again while it terminates", answer(&again, &[]));
    let still = s.get(POD, "placed").await;
    t.see("still terminating", answer(&still, POD_FIELDS));
    // What the kubelet does once the containers have stopped.
    let confirmed = s
        .delete(POD, "placed", &DeleteParams::default().grace_period(0))
        .await;
    t.see("the kubelet's final delete", answer(&confirmed, POD_FIELDS));
    let gone = s.get(POD, "placed").await;
    t.see("the pod after the kubelet", answer(&gone, POD_FIELDS));

    // kube-client 5 sends EvictParams' delete options as `delete_options`,
    // a field the API does not have: the pod still gets its full grace.
    let asked = EvictParams {
        delete_options: Some(DeleteParams::default().grace_period(0)),
        ..EvictParams::default()
    };
    let evicted = s.send(s.request(POD).evict("placed-too", &asked)).await;
    t.see("evict asking for no grace period", answer(&evicted, &[]));
    let terminating = s.get(POD, "placed-too").await;
    t.see("that pod afterwards", answer(&terminating, POD_FIELDS));

    let evicted = s.evict("starting").await;
    t.see("evict a pending pod on a node", answer(&evicted, &[]));
    let pending = s.get(POD, "starting").await;
    t.see("the pending pod afterwards", answer(&pending, POD_FIELDS));

    let missing = s.evict("nobody").await;
    t.see("evict a missing pod", answer(&missing, &[]));
    t
}

async fn a_disruption_budget_decides_evictions(s: &Side) -> Trace {
    let mut t = Trace::default();
    let labels = json!({INSTANCE_LABEL: "alice"});
    for name in ["alice-1", "alice-2", "alice-3"] {
        s.create(POD, &pod(name, labels.clone(), None))
            .await
            .succeeded();
    }
    s.run_pod("alice-1", true).await;
    s.run_pod("alice-2", true).await;
    s.run_pod("alice-3", false).await;
    let budget = object(
        PDB,
        "alice",
        json!({"spec": {"minAvailable": 1, "selector": {"matchLabels": labels}}}),
    );
    let created = s.create(PDB, &budget).await;
    // What the disruption controller would report: two of the three pods
    // ready, one of them needed.
    let observed = |generation: &Value| {
        json!({"observedGeneration": generation, "disruptionsAllowed": 1, "currentHealthy": 2,
               "desiredHealthy": 1, "expectedPods": 3})
    };
    s.merge_status(
        PDB,
        "alice",
        observed(&created.body["metadata"]["generation"]),
    )
    .await;
    let pdb_status = |reply: &Reply| {
        let status = &reply.body["status"];
        let disrupted: Vec<&String> = status["disruptedPods"]
            .as_object()
            .map(|m| m.keys().collect())
            .unwrap_or_default();
        json!({"disruptionsAllowed": status["disruptionsAllowed"], "currentHealthy": status["currentHealthy"],
               "desiredHealthy": status["desiredHealthy"], "disruptedPods": disrupted,
               "conditions": conditions(&status["conditions"])})
    };

    let first = s.evict("alice-1").await;
    t.see("evict while the budget allows one", answer(&first, &[]));
    let gone = s.get(POD, "alice-1").await;
    t.see("the evicted pod", answer(&gone, POD_FIELDS));
    let spent = s.get(PDB, "alice").await;
    t.see("the budget afterwards", pdb_status(&spent));

    let refused = s.evict("alice-2").await;
    t.see("evict once the budget is spent", answer(&refused, &[]));
    let kept = s.get(POD, "alice-2").await;
    t.see("the pod the budget kept", answer(&kept, POD_FIELDS));

    let unready = s.evict("alice-3").await;
    t.see(
        "evict a running pod that is not ready",
        answer(&unready, &[]),
    );
    let gone = s.get(POD, "alice-3").await;
    t.see("the unready pod", answer(&gone, POD_FIELDS));

    // A budget changed since the disruption controller last looked.
    let stricter = json!({"spec": {"minAvailable": 2}});
    let changed = s
        .merge(PDB, "alice", &PatchParams::default(), &stricter)
        .await;
    t.see(
        "the budget tightened",
        answer(&changed, &["/metadata/generation"]),
    );
    let unobserved = s.evict("alice-2").await;
    t.see(
        "evict under a budget not yet observed",
        answer(&unobserved, &[]),
    );

    let second = object(
        PDB,
        "alice-too",
        json!({"spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}}),
    );
    s.create(PDB, &second).await.succeeded();
    let ambiguous = s.evict("alice-2").await;
    t.see("evict under two budgets", answer(&ambiguous, &[]));
    t
}

async fn a_rollout_restart_stamps_the_pod_template(s: &Side) -> Trace {
    let mut t = Trace::default();
    let fields = [
        "/metadata/name",
        "/metadata/generation",
        "/metadata/resourceVersion?",
        "/spec/template/metadata/annotations",
    ];
    for (kind, name) in [(DEPLOYMENT, "agent-alice"), (STATEFUL_SET, "agent-bob")] {
        let created = s.create(kind, &workload(kind, name)).await;
        t.see(&format!("create {}", kind.kind), answer(&created, &fields));
        // As `KubeRestart::rollout`: a merge patch under the field manager.
        let pp = PatchParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..PatchParams::default()
        };
        for stamp in [T0, T1] {
            let patch = json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": stamp}}}}});
            let restarted = s.merge(kind, name, &pp, &patch).await;
            t.see(
                &format!("restart {} at {stamp}", kind.kind),
                answer(&restarted, &fields),
            );
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            "kubectl.kubernetes.io/restartedAt": T2}}}}});
        let missing = s.merge(kind, "missing", &pp, &patch).await;
        t.see(
            &format!("restart a missing {}", kind.kind),
            answer(&missing, &fields),
        );
    }
    t
}

// ---------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------

/// A served resource.
#[derive(Clone, Copy)]
struct Kind {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
}

impl Kind {
    fn resource(self) -> ApiResource {
        let (group, version) = self
            .api_version
            .split_once('/')
            .unwrap_or(("", self.api_version));
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: self.api_version.into(),
            kind: self.kind.into(),
            plural: self.plural.into(),
        }
    }
}

const fn kind(api_version: &'static str, kind: &'static str, plural: &'static str) -> Kind {
    Kind {
        api_version,
        kind,
        plural,
    }
}

const INSTANCE: Kind = kind("agentenv.io/v1alpha1", "AgentInstance", "agentinstances");
const BINDING: Kind = kind("agentenv.io/v1alpha1", "PluginBinding", "pluginbindings");
const MARKETPLACE: Kind = kind(
    "agentenv.io/v1alpha1",
    "PluginMarketplace",
    "pluginmarketplaces",
);
const MCP: Kind = kind("agentenv.io/v1alpha1", "McpServer", "mcpservers");
const SECRET: Kind = kind("v1", "Secret", "secrets");
const CONFIG_MAP: Kind = kind("v1", "ConfigMap", "configmaps");
const POD: Kind = kind("v1", "Pod", "pods");
const NAMESPACE: Kind = kind("v1", "Namespace", "namespaces");
const SERVICE_ACCOUNT: Kind = kind("v1", "ServiceAccount", "serviceaccounts");
const LEASE: Kind = kind("coordination.k8s.io/v1", "Lease", "leases");
const EVENT: Kind = kind("events.k8s.io/v1", "Event", "events");
const DEPLOYMENT: Kind = kind("apps/v1", "Deployment", "deployments");
const STATEFUL_SET: Kind = kind("apps/v1", "StatefulSet", "statefulsets");
const PDB: Kind = kind("policy/v1", "PodDisruptionBudget", "poddisruptionbudgets");

/// `rest` (spec, status, data, ...) under an object's type and name.
fn object(kind: Kind, name: &str, rest: Value) -> Value {
    let mut o = typed(kind, rest);
    o["metadata"] = json!({"name": name});
    o
}

/// `rest` with `apiVersion` and `kind`, as the controller's apply bodies.
fn typed(kind: Kind, rest: Value) -> Value {
    let mut o = json!({"apiVersion": kind.api_version, "kind": kind.kind});
    if let (Some(o), Value::Object(rest)) = (o.as_object_mut(), rest) {
        o.extend(rest);
    }
    o
}

fn pod(name: &str, labels: Value, node: Option<&str>) -> Value {
    let mut spec = json!({"containers": [{"name": "agent", "image": "registry.example/agent:1"}]});
    if let Some(node) = node {
        spec["nodeName"] = json!(node);
    }
    let mut o = object(POD, name, json!({"spec": spec}));
    o["metadata"]["labels"] = labels;
    o
}

fn workload(kind: Kind, name: &str) -> Value {
    let labels = json!({"app": name});
    let mut spec = json!({
        "replicas": 1,
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels},
                     "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]}},
    });
    if kind.kind == "StatefulSet" {
        spec["serviceName"] = json!(name);
    }
    object(kind, name, json!({"spec": spec}))
}

fn watch_params() -> WatchParams {
    // kube-runtime's watcher: bookmarks, and a timeout under five minutes.
    WatchParams::default().timeout(290)
}

// ---------------------------------------------------------------------------
// Observing answers
// ---------------------------------------------------------------------------

/// What one server answered, step by step.
#[derive(Default)]
struct Trace {
    steps: Vec<(String, Value)>,
}

impl Trace {
    fn see(&mut self, step: &str, seen: Value) {
        self.steps.push((step.to_owned(), seen));
    }
}

/// The fields named by JSON pointer; one ending in `?` only says whether the
/// field is there (for values the server makes up).
fn pick(obj: &Value, fields: &[&str]) -> Value {
    let mut out = Map::new();
    for field in fields {
        let (pointer, presence) = match field.strip_suffix('?') {
            Some(p) => (p, true),
            None => (*field, false),
        };
        let value = obj.pointer(pointer).filter(|v| !v.is_null());
        let seen = if presence {
            json!(value.is_some())
        } else {
            value.cloned().unwrap_or(Value::Null)
        };
        out.insert((*field).to_owned(), seen);
    }
    Value::Object(out)
}

/// A reply as the controller sees it: the code, then the reason, message
/// and causes of a `Status`, or the named fields of an object.
fn answer(reply: &Reply, fields: &[&str]) -> Value {
    if reply.body["kind"] == "Status" {
        let status = pick(
            &reply.body,
            &[
                "/status",
                "/code",
                "/reason",
                "/message",
                "/details/causes",
                "/details/retryAfterSeconds",
            ],
        );
        json!({"code": reply.code, "status": status})
    } else {
        json!({"code": reply.code, "object": pick(&reply.body, fields)})
    }
}

/// A list reply: the list's own type and version, and each item's fields.
fn listing(reply: &Reply, fields: &[&str]) -> Value {
    if reply.body["kind"] == "Status" {
        return answer(reply, fields);
    }
    let list = pick(
        &reply.body,
        &["/apiVersion", "/kind", "/metadata/resourceVersion?"],
    );
    // Absent, empty (a custom resource list says so) or a token to go on with.
    let mut list = list;
    list["continue"] = match reply.body["metadata"]["continue"].as_str() {
        None => Value::Null,
        Some("") => json!(""),
        Some(_) => json!("a token"),
    };
    let items: Vec<Value> = reply.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|item| pick(item, fields))
        .collect();
    json!({"code": reply.code, "list": list, "items": items})
}

fn version(reply: &Reply) -> &str {
    reply.body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
}

/// Whether the resourceVersion moved from one reply to the next.
fn changed(before: &Reply, after: &Reply) -> Value {
    json!(version(before) != version(after))
}

type Events = Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<Value>>> + Send>>;

/// True once the events seen include the ADDED of `name`.
fn added(name: &'static str) -> impl Fn(&[(String, Value)]) -> bool {
    move |events: &[(String, Value)]| {
        events
            .iter()
            .any(|(kind, o)| kind == "ADDED" && o["metadata"]["name"] == name)
    }
}

/// Reads a watch, bookmarks left out, until `done` holds for the events so
/// far, the stream ends or 20 s pass; each event as its type and the named
/// fields (an ERROR as its code and reason).
async fn follow(
    mut events: Events,
    fields: &[&str],
    done: impl Fn(&[(String, Value)]) -> bool,
) -> Value {
    let mut seen: Vec<(String, Value)> = Vec::new();
    let mut out = Vec::new();
    let read = async {
        while let Some(event) = events.next().await {
            let (kind, object) = match event {
                Ok(WatchEvent::Added(o)) => ("ADDED", o),
                Ok(WatchEvent::Modified(o)) => ("MODIFIED", o),
                Ok(WatchEvent::Deleted(o)) => ("DELETED", o),
                Ok(WatchEvent::Bookmark(_)) => continue,
                Ok(WatchEvent::Error(status)) => {
                    out.push(
                        json!({"type": "ERROR", "code": status.code, "reason": status.reason}),
                    );
                    return;
                }
                Err(e) => {
                    out.push(json!({"type": "stream error", "error": e.to_string()}));
                    return;
                }
            };
            let mut line = pick(&object, fields);
            line["type"] = json!(kind);
            out.push(line);
            seen.push((kind.to_owned(), object));
            if done(&seen) {
                return;
            }
        }
        out.push(json!({"type": "stream ended"}));
    };
    if tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .is_err()
    {
        out.push(json!({"type": "no more events within 20 s"}));
    }
    Value::Array(out)
}

// ---------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------

/// One server under test, with a namespace of the scenario's own.
struct Side {
    server: Server,
    client: kube::Client,
    ns: String,
}

enum Server {
    Double(ApiServer),
    Real(&'static ControlPlane),
}

/// An answer: the HTTP status and the body.
#[must_use]
struct Reply {
    code: u16,
    body: Value,
}

impl Reply {
    /// For the writes that set a scenario up: they must work, or the
    /// steps after them would compare two servers' identical refusals.
    fn succeeded(&self) {
        assert!(
            (200..300).contains(&self.code),
            "a setup write failed: {} {}",
            self.code,
            self.body
        );
    }
}

fn crds() -> Vec<Value> {
    kube_envtest::apply::documents(CRDS)
}

impl Side {
    async fn double(ns: &str) -> Side {
        let server = ApiServer::start(crds()).await;
        let mut config = kube::Config::new(server.url().parse().expect("the double's URL"));
        // Every answer as the server gave it: no retried 429s.
        config.default_retry = false;
        let client = kube::Client::try_from(config).expect("a client");
        Side::with_namespace(Server::Double(server), client, ns).await
    }

    async fn real(cp: &'static ControlPlane, ns: &str) -> Side {
        let mut config = kube_envtest::config(&cp.kubeconfig()).await;
        config.default_retry = false;
        let client = kube::Client::try_from(config).expect("a client");
        Side::with_namespace(Server::Real(cp), client, ns).await
    }

    /// The namespace and its `default` service account, which a pod needs
    /// and no controller-manager makes here.
    async fn with_namespace(server: Server, client: kube::Client, ns: &str) -> Side {
        let side = Side {
            server,
            client,
            ns: ns.to_owned(),
        };
        let namespace = side
            .send(
                kube::core::Request::new(DynamicObject::url_path(&NAMESPACE.resource(), None))
                    .create(
                        &PostParams::default(),
                        body(&object(NAMESPACE, ns, json!({}))),
                    ),
            )
            .await;
        assert_eq!(namespace.code, 201, "namespace {ns}: {}", namespace.body);
        let account = side
            .create(
                SERVICE_ACCOUNT,
                &object(SERVICE_ACCOUNT, "default", json!({})),
            )
            .await;
        assert_eq!(account.code, 201, "service account: {}", account.body);
        side
    }

    fn name(&self) -> &'static str {
        match self.server {
            Server::Double(_) => "double",
            Server::Real(_) => "kube-apiserver",
        }
    }

    fn request(&self, kind: Kind) -> kube::core::Request {
        kube::core::Request::new(DynamicObject::url_path(&kind.resource(), Some(&self.ns)))
    }

    async fn send<E: std::fmt::Debug>(&self, request: Result<http::Request<Vec<u8>>, E>) -> Reply {
        let request = request.expect("a well-formed request");
        let what = format!("{} {}", request.method(), request.uri());
        let response = self
            .client
            .send(request.map(kube::client::Body::from))
            .await
            .unwrap_or_else(|e| panic!("{}: {what}: {e}", self.name()));
        let code = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect_bytes()
            .await
            .unwrap_or_else(|e| panic!("{}: {what}: {e}", self.name()));
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Reply { code, body }
    }

    async fn get(&self, kind: Kind, name: &str) -> Reply {
        self.send(self.request(kind).get(name, &GetParams::default()))
            .await
    }

    async fn list(&self, kind: Kind, lp: &ListParams) -> Reply {
        self.send(self.request(kind).list(lp)).await
    }

    async fn create(&self, kind: Kind, obj: &Value) -> Reply {
        self.send(self.request(kind).create(&PostParams::default(), body(obj)))
            .await
    }

    async fn replace(&self, kind: Kind, name: &str, obj: &Value) -> Reply {
        self.send(
            self.request(kind)
                .replace(name, &PostParams::default(), body(obj)),
        )
        .await
    }

    async fn merge(&self, kind: Kind, name: &str, pp: &PatchParams, patch: &Value) -> Reply {
        self.send(self.request(kind).patch(name, pp, &Patch::Merge(patch)))
            .await
    }

    async fn apply(&self, kind: Kind, name: &str, pp: &PatchParams, obj: &Value) -> Reply {
        self.send(self.request(kind).patch(name, pp, &Patch::Apply(obj)))
            .await
    }

    /// A status write as `Ctx::patch_status` makes it.
    async fn apply_status(&self, kind: Kind, name: &str, obj: &Value) -> Reply {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        self.send(
            self.request(kind)
                .patch_subresource("status", name, &pp, &Patch::Apply(obj)),
        )
        .await
    }

    /// The fallback of `Ctx::patch_status`: a JSON patch without a field
    /// manager.
    async fn json_patch_status(&self, kind: Kind, name: &str, ops: &Value) -> Reply {
        let url = format!(
            "{}/{name}/status",
            DynamicObject::url_path(&kind.resource(), Some(&self.ns))
        );
        let request = http::Request::patch(url)
            .header(http::header::CONTENT_TYPE, "application/json-patch+json")
            .body(body(ops));
        self.send(request).await
    }

    /// Writes a status as the component that owns it would (a kubelet, the
    /// disruption controller); the harness's own setup.
    async fn merge_status(&self, kind: Kind, name: &str, status: Value) {
        let patch = json!({"status": status});
        self.send(self.request(kind).patch_subresource(
            "status",
            name,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))
        .await
        .succeeded();
    }

    /// A pod as its kubelet reports it: running, ready or not.
    async fn run_pod(&self, name: &str, ready: bool) {
        let ready = if ready { "True" } else { "False" };
        self.merge_status(
            POD,
            name,
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]}),
        )
        .await;
    }

    async fn delete(&self, kind: Kind, name: &str, dp: &DeleteParams) -> Reply {
        self.send(self.request(kind).delete(name, dp)).await
    }

    /// An eviction as `KubeRestart::evict_all` asks for it.
    async fn evict(&self, name: &str) -> Reply {
        self.send(self.request(POD).evict(name, &EvictParams::default()))
            .await
    }

    async fn watch(&self, kind: Kind, wp: &WatchParams, from: &str) -> Events {
        let request = self.request(kind).watch(wp, from).expect("a watch request");
        let events = self
            .client
            .request_events::<Value>(request)
            .await
            .unwrap_or_else(|e| panic!("{}: watch {}: {e}", self.name(), kind.plural));
        Box::pin(events)
    }

    /// Makes every resourceVersion seen so far too old to watch from.
    async fn expire_history(&self) {
        match &self.server {
            Server::Double(server) => server.compact(),
            Server::Real(cp) => {
                cp.compact().await;
            }
        }
    }
}

fn body(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("JSON")
}

// ---------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------

static SHARED_READY: OnceCell<()> = OnceCell::const_new();
static WITHOUT_WATCH_CACHE: OnceCell<Option<ControlPlane>> = OnceCell::const_new();

/// Applies the CRDs and waits until their kinds can be watched from a
/// fresh list. In the first moments after a CRD is established,
/// kube-apiserver can answer 410 to a watch from a version it just listed;
/// kube-runtime's watcher relists, but a comparison would only see noise.
async fn install_crds(cp: &ControlPlane) {
    let client = cp.client().await;
    kube_envtest::apply::apply_yaml(&client, CRDS, "differential")
        .await
        .unwrap_or_else(|e| panic!("the CRDs apply: {e}"));
    let settled = [INSTANCE, BINDING, MARKETPLACE, MCP].map(|kind| {
        let client = client.clone();
        async move {
            let request =
                || kube::core::Request::new(DynamicObject::url_path(&kind.resource(), None));
            for _ in 0..100 {
                let listed: Value = client
                    .request(
                        request()
                            .list(&ListParams::default().limit(1))
                            .expect("a list"),
                    )
                    .await
                    .expect("the kind is served");
                let from = listed["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                let watch = request()
                    .watch(&WatchParams::default().timeout(1), from)
                    .expect("a watch");
                let events: Vec<_> = client
                    .request_events::<Value>(watch)
                    .await
                    .expect("the watch starts")
                    .collect()
                    .await;
                if !events.iter().any(|e| matches!(e, Ok(WatchEvent::Error(_)))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            panic!("{} could not be watched from a fresh list", kind.plural);
        }
    });
    futures::future::join_all(settled).await;
}

async fn without_watch_cache() -> &'static ControlPlane {
    WITHOUT_WATCH_CACHE
        .get_or_init(|| async {
            let options = Options::default().apiserver_arg("--watch-cache=false");
            let cp = ControlPlane::start_with("differential, without a watch cache", options).await;
            if let Some(cp) = &cp {
                install_crds(cp).await;
            }
            cp
        })
        .await
        .as_ref()
        .expect("the assets were found once already")
}

/// Runs one scenario on both servers; every difference.
async fn compare(shared: &'static ControlPlane, scenario: &Scenario) -> Vec<Difference> {
    let ns = scenario.name.replace('_', "-");
    let ns = ns[..ns.len().min(63)].trim_end_matches('-').to_owned();
    let cp = if scenario.expires_history {
        without_watch_cache().await
    } else {
        shared
    };
    let double = Side::double(&ns).await;
    let real = Side::real(cp, &ns).await;
    let (on_double, on_real) = tokio::join!((scenario.run)(&double), (scenario.run)(&real));
    if std::env::var_os("DIFFERENTIAL_TRACE").is_some() {
        for (step, seen) in &on_real.steps {
            eprintln!("{} / {step}:\n  {seen}", scenario.name);
        }
    }
    let mut out = Vec::new();
    for i in 0..on_double.steps.len().max(on_real.steps.len()) {
        let (step, d, r) = match (on_double.steps.get(i), on_real.steps.get(i)) {
            (Some((step, d)), Some((_, r))) => (step, d, r),
            (Some((step, d)), None) => (step, d, &Value::Null),
            (None, Some((step, r))) => (step, &Value::Null, r),
            (None, None) => continue,
        };
        let mut found = Vec::new();
        differences("", d, r, &mut found);
        out.extend(found.into_iter().map(|(at, double, real)| Difference {
            scenario: scenario.name,
            step: step.clone(),
            at,
            double,
            real,
        }));
    }
    out
}

fn differences(at: &str, double: &Value, real: &Value, out: &mut Vec<(String, Value, Value)>) {
    match (double, real) {
        (Value::Object(d), Value::Object(r)) => {
            let keys = d.keys().chain(r.keys().filter(|k| !d.contains_key(*k)));
            for k in keys {
                let null = Value::Null;
                let at = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at} {k}")
                };
                differences(
                    &at,
                    d.get(k).unwrap_or(&null),
                    r.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(d), Value::Array(r)) if d.len() == r.len() => {
            for (i, (d, r)) in d.iter().zip(r).enumerate() {
                differences(&format!("{at}[{i}]"), d, r, out);
            }
        }
        _ if double == real => {}
        _ => out.push((at.to_owned(), double.clone(), real.clone())),
    }
}

/// One difference: the scenario, the step, where, and both answers.
struct Difference {
    scenario: &'static str,
    step: String,
    at: String,
    double: Value,
    real: Value,
}

impl Difference {
    fn is(&self, a: &Accepted) -> bool {
        self.scenario == a.scenario
            && self.at.ends_with(a.field)
            && self.double == a.double
            && self.real == a.real
    }
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {}: {}\n      double:         {}\n      kube-apiserver: {}",
            self.scenario, self.step, self.at, self.double, self.real
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_double_answers_every_controller_request_as_kube_apiserver_does() {
    let Some(shared) =
        ControlPlane::shared("differential: the double against kube-apiserver").await
    else {
        return;
    };
    SHARED_READY.get_or_init(|| install_crds(shared)).await;
    let scenarios = scenarios();
    let runs = scenarios.iter().map(|s| compare(shared, s));
    let found: Vec<Difference> = futures::future::join_all(runs)
        .await
        .into_iter()
        .flatten()
        .collect();
    let accepted = accepted();
    let mut problems: Vec<String> = found
        .iter()
        .filter(|d| !accepted.iter().any(|a| d.is(a)))
        .map(ToString::to_string)
        .collect();
    for a in &accepted {
        if !found.iter().any(|d| d.is(a)) {
            problems.push(format!(
                "{}: {} no longer differs; drop it from accepted()",
                a.scenario, a.field
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "the double and kube-apiserver answered {} things differently:\n\n{}",
        problems.len(),
        problems.join("\n")
    );
}
