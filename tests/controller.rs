//! `agent-env run`, the real binary, against a real kube-apiserver and etcd
//! (`KUBEBUILDER_ASSETS`; skipped without), as the operator's own service
//! account with exactly the RBAC of `deploy/`: rendering and status, every
//! watch mapping, Secrets, drift, the boot marker, restarts, suspend, the
//! finalizer, leader election, API server restarts, `410 Gone`, a poison
//! pill, and how many writes all of it costs. Each test has a control plane
//! of its own, so request counts are its own.

#[path = "common/rbac.rs"]
mod rbac;
#[path = "common/real.rs"]
mod real;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use real::*;
use serde_json::{Value, json};

fn stamp(p: &Path) -> (u64, i64, i64) {
    let m = std::fs::metadata(p).unwrap();
    (m.ino(), m.mtime(), m.mtime_nsec())
}

/// Status applies of AgentInstances so far.
async fn instance_status_writes(c: &Cluster) -> u64 {
    c.requests(&[
        ("resource", "agentinstances"),
        ("subresource", "status"),
        ("verb", "APPLY"),
    ])
    .await
}

/// Every write counted by the API server but those to Leases (leader
/// election renews the operator's every second, and the API server its own).
async fn writes(c: &Cluster) -> u64 {
    let m = c.cp.metrics().await;
    let kept: String = m
        .lines()
        .filter(|l| !l.contains("resource=\"leases\""))
        .collect::<Vec<_>>()
        .join("\n");
    ["APPLY", "PATCH", "POST", "PUT", "DELETE"]
        .iter()
        .map(|v| requests_in(&kept, &[("verb", v)]))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renders_reports_ready_and_fans_out_to_exactly_one_type() {
    let Some(c) = Cluster::start("controller: render and fan-out").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    for (name, t) in [
        ("alice", "coder"),
        ("bob", "coder"),
        ("carol", "researcher"),
    ] {
        c.apply(instance("team-a", name, t, json!({}))).await;
    }
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(binding(
        "team-a",
        "researchers",
        json!({"agentType": "researcher"}),
        &["papers@science"],
    ))
    .await;
    for name in ["alice", "bob", "carol"] {
        c.ready("team-a", name).await;
    }
    eventually("alice's status counts lint", || async {
        c.instance_json("team-a", "alice")
            .await
            .is_some_and(|a| a["status"]["rendered"]["plugins"] == 1)
    })
    .await;
    assert!(c.plugins("team-a/alice").contains("lint@tools"));
    let alice = c.instance_json("team-a", "alice").await.unwrap();
    assert_eq!(alice["status"]["observedGeneration"], 1);
    assert_eq!(condition_of(&alice, "Stalled").unwrap()["status"], "False");
    // Events are sent apart from the status: they may land a moment later.
    eventually("a Rendered event", || async {
        !c.events("team-a", "Rendered").await.is_empty()
    })
    .await;
    eventually("the coder binding reports 2 instances", || async {
        c.custom("PluginBinding", "team-a", "coders")
            .await
            .is_some_and(|b| b["status"]["instances"] == 2)
    })
    .await;

    // A type-scope change re-renders every coder and nothing else.
    let carol_before = stamp(&c.root().join("team-a/carol/settings.json"));
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    for name in ["alice", "bob"] {
        eventually(&format!("{name} gets fmt"), || async {
            c.plugins(&format!("team-a/{name}")).contains("fmt@tools")
        })
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        stamp(&c.root().join("team-a/carol/settings.json")),
        carol_before,
        "a researcher's files are not touched by a coder binding"
    );

    // A spec change is observed at its generation.
    c.apply(instance(
        "team-a",
        "alice",
        "coder",
        json!({"runtimeInstalls": "Revert"}),
    ))
    .await;
    eventually("observedGeneration 2", || async {
        c.instance_json("team-a", "alice")
            .await
            .is_some_and(|o| o["status"]["observedGeneration"] == 2)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_status_write_per_instance_per_change_and_none_on_a_quiet_resync() {
    let Some(c) = Cluster::start("controller: status writes").await else {
        return;
    };
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    let names: Vec<String> = (0..20).map(|i| format!("agent-{i}")).collect();
    for name in &names {
        c.apply(instance("team-a", name, "coder", json!({}))).await;
    }
    let _op = c.operator("a", &["--resync-interval", "2s"]);
    for name in &names {
        c.ready("team-a", name).await;
    }
    // Let the echo of each status write come back and be reconciled.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        instance_status_writes(&c).await,
        names.len() as u64,
        "one status write per new instance"
    );

    // Quiet resyncs: every instance checked again, nothing written.
    let before = writes(&c).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(writes(&c).await, before, "a quiet resync writes nothing");

    // One change that affects every instance: one status write each.
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    for name in &names {
        eventually(&format!("{name} counts 2 plugins"), || async {
            c.instance_json("team-a", name)
                .await
                .is_some_and(|o| o["status"]["rendered"]["plugins"] == 2)
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        instance_status_writes(&c).await,
        2 * names.len() as u64,
        "one status write per instance for one change"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_secret_stalls_and_recovers_and_a_secret_change_renders_only_its_users() {
    let Some(c) = Cluster::start("controller: secrets").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.apply(instance("team-a", "carol", "researcher", json!({})))
        .await;
    c.apply(mcp(
        "team-a",
        "forgejo",
        json!({"agentType": "coder"}),
        "${SECRET:FORGEJO_TOKEN}",
    ))
    .await;
    // Without the label the Secret is not the owner's consent: still missing.
    c.apply(labelled_secret(
        "team-a",
        "plain",
        "FORGEJO_TOKEN",
        "nope",
        false,
    ))
    .await;
    eventually("alice stalls on MissingSecret", || async {
        c.condition("team-a", "alice", "Stalled")
            .await
            .is_some_and(|s| s["status"] == "True" && s["reason"] == "MissingSecret")
    })
    .await;
    let ready = c.condition("team-a", "alice", "Ready").await.unwrap();
    assert_eq!(ready["status"], "False");
    assert!(
        ready["message"].to_string().contains("FORGEJO_TOKEN"),
        "{ready}"
    );
    eventually("a MissingSecret event", || async {
        !c.events("team-a", "MissingSecret").await.is_empty()
    })
    .await;
    c.ready("team-a", "carol").await;

    c.apply(labelled_secret(
        "team-a",
        "tokens",
        "FORGEJO_TOKEN",
        "tok-1",
        true,
    ))
    .await;
    c.ready("team-a", "alice").await;
    let token =
        || c.claude("team-a/alice")["mcpServers"]["forgejo"]["headers"]["Authorization"].clone();
    assert_eq!(token(), "Bearer tok-1");
    let carol_before = stamp(&c.root().join("team-a/carol/.claude.json"));
    c.apply(labelled_secret(
        "team-a",
        "tokens",
        "FORGEJO_TOKEN",
        "tok-2",
        true,
    ))
    .await;
    eventually("alice gets the new token", || async {
        token() == "Bearer tok-2"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        stamp(&c.root().join("team-a/carol/.claude.json")),
        carol_before
    );
    let status = c.instance_json("team-a", "alice").await.unwrap()["status"].to_string();
    assert!(!status.contains("tok-"), "status holds no secret value");
    for e in c.list("events.k8s.io/v1", "Event", "team-a").await {
        assert!(
            !e.to_string().contains("tok-"),
            "an event holds a secret value: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_and_secrets_of_one_namespace_never_reach_another() {
    let Some(c) = Cluster::start("controller: namespaces").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    for ns in ["team-a", "team-b"] {
        c.apply(instance(ns, "alice", "coder", json!({}))).await;
        c.apply(mcp(
            ns,
            "forgejo",
            json!({"agentType": "coder"}),
            "${SECRET:FORGEJO_TOKEN}",
        ))
        .await;
    }
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(labelled_secret(
        "team-a",
        "tokens",
        "FORGEJO_TOKEN",
        "a-token",
        true,
    ))
    .await;
    c.ready("team-a", "alice").await;
    eventually("team-b/alice misses its own secret", || async {
        c.condition("team-b", "alice", "Ready")
            .await
            .is_some_and(|r| r["reason"] == "MissingSecret")
    })
    .await;
    assert!(c.plugins("team-a/alice").contains("lint@tools"));
    let b_dir = c.root().join("team-b/alice");
    for f in ["settings.json", ".claude.json"] {
        let text = std::fs::read_to_string(b_dir.join(f)).unwrap_or_default();
        assert!(
            !text.contains("lint@tools") && !text.contains("a-token"),
            "{f}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_put_back_the_pod_evicted_once_and_new_pods_get_their_marker() {
    let Some(c) = Cluster::start("controller: drift, eviction, boot marker").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(instance(
        "team-a",
        "alice",
        "coder",
        json!({
            "workload": {"kind": "Deployment", "name": "agent-alice"},
            "restart": {"onDrift": true, "minInterval": "1s"},
        }),
    ))
    .await;
    c.apply(agent_pod("team-a", "agent-alice-1", "alice")).await;
    c.run_pod("team-a", "agent-alice-1").await;
    c.ready("team-a", "alice").await;
    let uid = |name: &'static str| {
        let c = &c;
        async move {
            c.get("v1", "Pod", "team-a", name).await.unwrap()["metadata"]["uid"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let first = uid("agent-alice-1").await;
    let env_dir = c.root().join("team-a/alice");
    eventually("the marker names the first pod", || async {
        agent_env_operator::handshake::read(&env_dir).is_some_and(|m| m.pods.contains(&first))
    })
    .await;

    // A burst of edits to a declared entry: each put back, one eviction after the burst.
    let file = env_dir.join("settings.json");
    let lint = || c.settings("team-a/alice")["enabledPlugins"]["lint@tools"].clone();
    for _ in 0..3 {
        let mut s = read_json(&file);
        s["enabledPlugins"]["lint@tools"] = json!(false);
        std::fs::write(&file, serde_json::to_vec(&s).unwrap()).unwrap();
        eventually("drift put back", || async { lint() == json!(true) }).await;
    }
    eventually("the pod is evicted", || async {
        c.get("v1", "Pod", "team-a", "agent-alice-1")
            .await
            .is_none()
    })
    .await;
    // The Deployment's controller would start a replacement.
    c.apply(agent_pod("team-a", "agent-alice-2", "alice")).await;
    c.run_pod("team-a", "agent-alice-2").await;
    let second = uid("agent-alice-2").await;
    eventually("the marker names the new pod", || async {
        agent_env_operator::handshake::read(&env_dir).is_some_and(|m| m.pods == [second.clone()])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let evictions = c
        .requests(&[
            ("resource", "pods"),
            ("subresource", "eviction"),
            ("code", "201"),
        ])
        .await;
    assert_eq!(evictions, 1, "one eviction for a burst of drift");
    let alice = c.instance_json("team-a", "alice").await.unwrap();
    assert_eq!(alice["status"]["lastRestart"]["reason"], "DriftCorrected");
    assert!(
        !alice["status"]["lastDrift"]["entries"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert!(!c.events("team-a", "DriftCorrected").await.is_empty());
    assert!(!c.events("team-a", "RestartRequested").await.is_empty());

    // The init container's side of the handshake.
    let wait = |uid: &str, timeout: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_agent-env"))
            .args(["wait", "--env-dir"])
            .arg(&env_dir)
            .args(["--pod-uid", uid, "--timeout", timeout])
            .output()
            .unwrap()
    };
    let ok = wait(&second, "5s");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let late = wait("no-such-pod", "500ms");
    assert_eq!(late.status.code(), Some(1));
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(
        err.contains("timed out") && err.contains("no-such-pod"),
        "{err}"
    );
}

async fn lease_holder(c: &Cluster) -> Option<Value> {
    c.get(
        "coordination.k8s.io/v1",
        "Lease",
        OPERATOR_NS,
        "agent-env-operator",
    )
    .await
    .map(|l| l["spec"]["holderIdentity"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_writes_and_a_standby_takes_over_when_it_stops_or_dies() {
    let Some(c) = Cluster::start("controller: two replicas").await else {
        return;
    };
    let mut a = c.operator("a", &[]);
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.ready("team-a", "alice").await;
    let mut b = c.operator("b", &[]);
    assert_eq!(lease_holder(&c).await, Some(json!("a")));
    eventually("b is waiting", || async {
        b.log().contains("waiting to lead")
    })
    .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    eventually("a renders the change", || async {
        c.plugins("team-a/alice").contains("fmt@tools")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !b.log().contains("reconciled") && !b.log().contains("leading"),
        "the standby wrote:\n{}",
        b.log()
    );

    // A clean stop hands the lease over at once.
    assert_eq!(a.stop(), 0, "{}", a.log());
    assert!(a.log().contains("released the lease"), "{}", a.log());
    within("b leads", Duration::from_secs(3), || async {
        lease_holder(&c).await == Some(json!("b"))
    })
    .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["fmt@tools"],
    ))
    .await;
    eventually("b renders the next change", || async {
        !c.plugins("team-a/alice").contains("lint@tools")
    })
    .await;

    // A leader that dies keeps the lease until it expires (3 s here); then
    // the standby takes over.
    let mut a2 = c.operator("a2", &[]);
    eventually("a2 is waiting", || async {
        a2.log().contains("waiting to lead")
    })
    .await;
    b.kill();
    within(
        "a2 leads after the lease expired",
        Duration::from_secs(15),
        || async { lease_holder(&c).await == Some(json!("a2")) },
    )
    .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["papers@science"],
    ))
    .await;
    eventually("a2 renders", || async {
        c.plugins("team-a/alice").contains("papers@science")
    })
    .await;
    let _ = a2.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_grants_exactly_what_the_operator_calls() {
    // With the admission plugin some distributions turn on, which guards
    // owner references: the grants must hold there too.
    let options = Options::default()
        .apiserver_arg("--enable-admission-plugins=OwnerReferencesPermissionEnforcement");
    let Some(c) = Cluster::start_with("controller: RBAC", options).await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "agent-env-builtin", "namespace": OPERATOR_NS},
        "data": {"agents.json": "{\"types\": [{\"name\": \"coder\", \"plugins\": [\"base@tools\"]}]}"},
    }))
    .await;
    c.apply(workload("team-a", "Deployment", "bob")).await;
    c.apply(instance(
        "team-a",
        "alice",
        "coder",
        json!({
            "workload": {"kind": "Deployment", "name": "agent-alice"},
            "restart": {"minInterval": "1s"},
            "envDir": {"deletionPolicy": "Delete"},
        }),
    ))
    .await;
    c.apply(rolled_out("team-a", "bob", "Deployment")).await;
    c.apply(workload("team-a", "StatefulSet", "carol")).await;
    c.apply(rolled_out("team-a", "carol", "StatefulSet")).await;
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "PluginMarketplace",
        "metadata": {"name": "tools", "namespace": "team-a"},
        "spec": {"target": {"agentType": "coder"}, "source": {"github": {"repo": "example/tools"}}},
    }))
    .await;
    c.apply(agent_pod("team-a", "agent-alice-1", "alice")).await;
    c.run_pod("team-a", "agent-alice-1").await;
    c.apply(mcp(
        "team-a",
        "forgejo",
        json!({"agentType": "coder"}),
        "${SECRET:FORGEJO_TOKEN}",
    ))
    .await;
    c.apply(labelled_secret(
        "team-a",
        "tokens",
        "FORGEJO_TOKEN",
        "t",
        true,
    ))
    .await;
    // Sidecar delivery: a render, a report and a grant are written, a
    // report of a pod long gone is pruned, and all of it is removed when
    // the instance goes back to Volume delivery.
    c.cp.service_account("team-a", "agent-dave").await;
    c.apply(instance(
        "team-a",
        "dave",
        "coder",
        json!({"delivery": {"mode": "Sidecar", "serviceAccountName": "agent-dave"}}),
    ))
    .await;
    for name in ["alice", "bob", "carol", "dave"] {
        c.ready("team-a", name).await;
    }
    eventually("dave's report Secret exists", || async {
        c.get("v1", "Secret", "team-a", "agent-env-report-dave")
            .await
            .is_some()
    })
    .await;
    let gone = serde_json::to_vec(&json!({
        "podUid": "u", "ready": true, "reason": "UpToDate", "installed": {},
        "at": "2020-01-01T00:00:00Z",
    }))
    .unwrap();
    c.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "agent-env-report-dave", "namespace": "team-a"},
        "data": {"dave-gone": base64_encode(&gone)},
    }))
    .await;
    eventually("the report of a pod long gone is pruned", || async {
        c.get("v1", "Secret", "team-a", "agent-env-report-dave")
            .await
            .is_some_and(|s| s["data"]["dave-gone"].is_null())
    })
    .await;
    c.apply(instance("team-a", "dave", "coder", json!({})))
        .await;
    eventually("dave's sidecar objects are removed", || async {
        c.get("v1", "Secret", "team-a", "agent-env-render-dave")
            .await
            .is_none()
            && c.get(
                "rbac.authorization.k8s.io/v1",
                "Role",
                "team-a",
                "agent-env-sidecar-dave",
            )
            .await
            .is_none()
    })
    .await;
    eventually("alice carries the finalizer", || async {
        c.instance_json("team-a", "alice").await.is_some_and(|o| {
            o["metadata"]["finalizers"]
                .to_string()
                .contains("agentenv.io/env-dir")
        })
    })
    .await;
    // A config change restarts both workloads, each its own way.
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    eventually("alice's pod is evicted", || async {
        c.get("v1", "Pod", "team-a", "agent-alice-1")
            .await
            .is_none()
    })
    .await;
    for (kind, name) in [("Deployment", "agent-bob"), ("StatefulSet", "agent-carol")] {
        eventually(&format!("{name}'s template is stamped"), || async {
            c.get("apps/v1", kind, "team-a", name).await.is_some_and(|d| {
                d["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
                    .is_string()
            })
        })
        .await;
    }
    eventually("the marketplace reports its instances", || async {
        c.custom("PluginMarketplace", "team-a", "tools")
            .await
            .is_some_and(|m| m["status"]["instances"] == 4)
    })
    .await;
    // Deleting with deletionPolicy Delete removes the env dir, then the object.
    c.delete("agentenv.io/v1alpha1", "AgentInstance", "team-a", "alice")
        .await;
    eventually("alice is gone with her env dir", || async {
        c.instance_json("team-a", "alice").await.is_none()
            && !c.root().join("team-a/alice").exists()
    })
    .await;

    assert!(
        c.operator_refusals().is_empty(),
        "RBAC refused the operator: {:#?}",
        c.operator_refusals()
    );
    let called = c.operator_calls();
    let granted: BTreeSet<(String, String, String)> = rbac::granted()
        .into_iter()
        .map(|g| (g.group, g.resource, g.verb))
        .collect();
    let unused: Vec<_> = granted.difference(&called).collect();
    let missing: Vec<_> = called.difference(&granted).collect();
    assert!(
        unused.is_empty(),
        "granted but never called by the operator: {unused:?}"
    );
    assert!(missing.is_empty(), "called but not granted: {missing:?}");
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `agent-<instance>`, a Deployment or StatefulSet whose pods carry the instance label.
fn workload(ns: &str, kind: &str, instance: &str) -> Value {
    let name = format!("agent-{instance}");
    let mut spec = json!({"selector": {"matchLabels": {"app": instance}}, "template": {
        "metadata": {"labels": {"app": instance, "agentenv.io/instance": instance}},
        "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]}}});
    if kind == "StatefulSet" {
        spec["serviceName"] = json!(name);
    }
    json!({
        "apiVersion": "apps/v1", "kind": kind,
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    })
}

/// A coder instance restarted by stamping its workload's template.
fn rolled_out(ns: &str, name: &str, kind: &str) -> Value {
    instance(
        ns,
        name,
        "coder",
        json!({
            "workload": {"kind": kind, "name": format!("agent-{name}")},
            "restart": {"strategy": "RolloutRestart", "minInterval": "1s"},
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_env_dirs_meet_the_same_refusals_under_the_controller() {
    let Some(c) = Cluster::start("controller: hostile env dirs").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    for name in ["alice", "bob"] {
        c.apply(instance("team-a", name, "coder", json!({}))).await;
        c.ready("team-a", name).await;
    }
    let not_ready = |name: &'static str, says: &'static str| {
        let c = &c;
        async move {
            c.condition("team-a", name, "Ready").await.is_some_and(|r| {
                r["status"] == "False" && r["message"].as_str().is_some_and(|m| m.contains(says))
            })
        }
    };

    // A FIFO where bob's boot marker belongs: reading it would block the
    // controller for good. It is refused unread and replaced by the marker.
    let marker = c.root().join("team-a/bob/.agent-env-ready");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &marker,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    c.apply(agent_pod("team-a", "agent-bob-1", "bob")).await;
    let env_dir = c.root().join("team-a/bob");
    eventually("the FIFO replaced by bob's marker", || async {
        std::fs::symlink_metadata(&marker).is_ok_and(|m| m.is_file())
            && agent_env_operator::handshake::read(&env_dir).is_some_and(|m| m.pods.len() == 1)
    })
    .await;

    // An oversized .claude.json for alice: not ready, retrying, the file
    // left as it is; bob is unaffected.
    let claude = c.root().join("team-a/alice/.claude.json");
    std::fs::File::options()
        .write(true)
        .open(&claude)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    eventually("alice refused for the file size", || {
        not_ready(
            "alice",
            "team-a/alice/.claude.json is 8589934592 bytes, over the limit of 16777216 bytes (16 MiB)",
        )
    })
    .await;
    assert_eq!(
        c.condition("team-a", "alice", "Reconciling").await.unwrap()["status"],
        "True"
    );
    assert_eq!(std::fs::metadata(&claude).unwrap().len(), 8 << 30);
    assert_eq!(
        c.condition("team-a", "bob", "Ready").await.unwrap()["status"],
        "True"
    );
    std::fs::write(&claude, "{}").unwrap();
    c.ready("team-a", "alice").await;
    assert_eq!(read_json(&claude)["mcpServers"], json!({}));

    // bob's settings.json swapped for a symlink out of the root: refused,
    // stalled, the outside file untouched.
    let outside = c.dir.path().join("outside.json");
    std::fs::write(&outside, "{\"outside\": true}\n").unwrap();
    let settings = c.root().join("team-a/bob/settings.json");
    let link = c.root().join("team-a/bob/link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    std::fs::rename(&link, &settings).unwrap();
    eventually("bob refused for the symlink", || {
        not_ready("bob", "team-a/bob/settings.json is a symbolic link")
    })
    .await;
    assert_eq!(
        c.condition("team-a", "bob", "Stalled").await.unwrap()["reason"],
        "UnsafePath"
    );
    assert_eq!(std::fs::read(&outside).unwrap(), b"{\"outside\": true}\n");
    std::fs::remove_file(&settings).unwrap();
    c.ready("team-a", "bob").await;
    // Seen once on a loaded machine: Ready before the file read back with
    // its plugin. The render must arrive; waiting for it keeps the check.
    eventually("bob's settings.json rendered again", || async {
        c.plugins("team-a/bob") == BTreeSet::from(["lint@tools".to_owned()])
    })
    .await;
}

/// Settings and `.claude.json` stamps of the instances named, for showing
/// that a change reached no one else.
fn stamps(c: &Cluster, names: &[&str]) -> Vec<(u64, i64, i64)> {
    names
        .iter()
        .flat_map(|n| {
            ["settings.json", ".claude.json"]
                .map(|f| stamp(&c.root().join(format!("team-a/{n}/{f}"))))
        })
        .collect()
}

fn builtin(data: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "agent-env-builtin", "namespace": OPERATOR_NS},
        "data": data,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watched_kind_reaches_exactly_the_instances_it_affects() {
    let Some(c) = Cluster::start("controller: watch mappings").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    for (name, t) in [
        ("alice", "coder"),
        ("bob", "coder"),
        ("carol", "researcher"),
    ] {
        c.apply(instance("team-a", name, t, json!({}))).await;
        c.ready("team-a", name).await;
    }
    let mcp_names = |n: &str| -> BTreeSet<String> {
        c.claude(&format!("team-a/{n}"))["mcpServers"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let marketplaces = |n: &str| -> BTreeSet<String> {
        c.settings(&format!("team-a/{n}"))["extraKnownMarketplaces"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    let settle = || tokio::time::sleep(Duration::from_millis(700));

    // An instance-scope PluginBinding: bob only.
    let others = stamps(&c, &["alice", "carol"]);
    c.apply(binding(
        "team-a",
        "bob-extra",
        json!({"instance": "bob"}),
        &["solo@tools"],
    ))
    .await;
    eventually("bob gets solo", || async {
        c.plugins("team-a/bob").contains("solo@tools")
    })
    .await;
    settle().await;
    assert_eq!(stamps(&c, &["alice", "carol"]), others);

    // A type-scope PluginMarketplace: the coders only.
    let others = stamps(&c, &["carol"]);
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "PluginMarketplace",
        "metadata": {"name": "tools", "namespace": "team-a"},
        "spec": {"target": {"agentType": "coder"}, "source": {"github": {"repo": "example/tools"}}},
    }))
    .await;
    for n in ["alice", "bob"] {
        eventually(&format!("{n} knows the marketplace"), || async {
            marketplaces(n).contains("tools")
        })
        .await;
    }
    settle().await;
    assert_eq!(stamps(&c, &["carol"]), others);

    // An instance-scope McpServer: carol only.
    let others = stamps(&c, &["alice", "bob"]);
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "McpServer",
        "metadata": {"name": "papers", "namespace": "team-a"},
        "spec": {"target": {"instance": "carol"}, "http": {"url": "https://papers.example/mcp"}},
    }))
    .await;
    eventually("carol gets papers", || async {
        mcp_names("carol").contains("papers")
    })
    .await;
    settle().await;
    assert_eq!(stamps(&c, &["alice", "bob"]), others);

    // The builtin ConfigMap: created, its coder plugins reach the coders and
    // its marketplaces everyone.
    c.apply(builtin(json!({
        "agents.json": "{\"types\": [{\"name\": \"coder\", \"plugins\": [\"base@acme\"]}]}",
        "marketplaces-builtin.json": "{\"extraKnownMarketplaces\": {\"acme\": {\"source\": {\"source\": \"github\", \"repo\": \"acme/tools\"}}}}",
    })))
    .await;
    for n in ["alice", "bob", "carol"] {
        eventually(&format!("{n} knows acme"), || async {
            marketplaces(n).contains("acme")
        })
        .await;
    }
    assert!(c.plugins("team-a/alice").contains("base@acme"));
    assert!(!c.plugins("team-a/carol").contains("base@acme"));

    // A broken edit keeps the last good layer and says so in the log.
    c.apply(builtin(json!({"agents.json": "{not json"}))).await;
    eventually("the broken ConfigMap is logged", || async {
        _op.log().contains("builtin layer not usable")
    })
    .await;
    settle().await;
    assert!(c.plugins("team-a/alice").contains("base@acme"));
    c.ready("team-a", "alice").await;

    // Deleted: the builtin layer is empty.
    c.delete("v1", "ConfigMap", OPERATOR_NS, "agent-env-builtin")
        .await;
    for n in ["alice", "bob", "carol"] {
        eventually(&format!("{n} forgets acme"), || async {
            !marketplaces(n).contains("acme")
        })
        .await;
    }
    assert!(!c.plugins("team-a/alice").contains("base@acme"));
    assert!(c.plugins("team-a/bob").contains("solo@tools"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_instance_is_left_alone_until_resumed() {
    let Some(c) = Cluster::start("controller: suspend").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.ready("team-a", "alice").await;
    c.apply(instance(
        "team-a",
        "alice",
        "coder",
        json!({"suspend": true}),
    ))
    .await;
    eventually("alice reports Suspended", || async {
        c.condition("team-a", "alice", "Ready")
            .await
            .is_some_and(|r| r["status"] == "True" && r["reason"] == "Suspended")
    })
    .await;
    let before = stamps(&c, &["alice"]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    // Drift is not corrected either.
    let file = c.root().join("team-a/alice/settings.json");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        stamps(&c, &["alice"]),
        before,
        "a suspended env dir is not written"
    );
    let mut s = read_json(&file);
    s["enabledPlugins"]["lint@tools"] = json!(false);
    std::fs::write(&file, serde_json::to_vec(&s).unwrap()).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        c.settings("team-a/alice")["enabledPlugins"]["lint@tools"],
        false
    );

    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    eventually(
        "alice resumes with both plugins, drift put back",
        || async {
            let p = &c.settings("team-a/alice")["enabledPlugins"];
            p["fmt@tools"] == true && p["lint@tools"] == true
        },
    )
    .await;
    c.ready("team-a", "alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_finalizer_is_there_exactly_while_the_env_dir_must_go_with_the_instance() {
    let Some(c) = Cluster::start("controller: finalizer").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let finalizers = |name: &'static str| {
        let c = &c;
        async move {
            c.instance_json("team-a", name)
                .await
                .map(|o| o["metadata"]["finalizers"].clone())
        }
    };
    let delete = json!({"envDir": {"deletionPolicy": "Delete"}});
    c.apply(instance("team-a", "alice", "coder", delete.clone()))
        .await;
    c.apply(instance("team-a", "bob", "coder", json!({}))).await;
    c.ready("team-a", "alice").await;
    c.ready("team-a", "bob").await;
    eventually("alice has the finalizer", || async {
        finalizers("alice").await == Some(json!(["agentenv.io/env-dir"]))
    })
    .await;
    assert_eq!(finalizers("bob").await, Some(Value::Null));

    // Switched to Retain: the finalizer goes; switched back: it returns.
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    eventually("alice loses the finalizer", || async {
        finalizers("alice").await == Some(Value::Null)
    })
    .await;
    c.apply(instance("team-a", "alice", "coder", delete)).await;
    eventually("alice has it again", || async {
        finalizers("alice").await == Some(json!(["agentenv.io/env-dir"]))
    })
    .await;

    // Retain keeps the env dir; Delete removes it and the state with it.
    for name in ["bob", "alice"] {
        c.delete("agentenv.io/v1alpha1", "AgentInstance", "team-a", name)
            .await;
        eventually(&format!("{name} is gone"), || async {
            c.instance_json("team-a", name).await.is_none()
        })
        .await;
    }
    assert!(c.root().join("team-a/bob/settings.json").is_file());
    assert!(!c.root().join("team-a/alice").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_refused_by_a_disruption_budget_is_retried_until_it_allows() {
    let Some(c) = Cluster::start("controller: PodDisruptionBudget").await else {
        return;
    };
    let op = c.operator("a", &[]);
    c.apply(instance(
        "team-a",
        "alice",
        "coder",
        json!({
            "workload": {"kind": "Deployment", "name": "agent-alice"},
            "restart": {"minInterval": "1s"},
        }),
    ))
    .await;
    c.apply(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "agent-alice", "namespace": "team-a"},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {"agentenv.io/instance": "alice"}}},
    }))
    .await;
    c.apply(agent_pod("team-a", "agent-alice-1", "alice")).await;
    c.run_pod("team-a", "agent-alice-1").await;
    c.ready("team-a", "alice").await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    // No disruption controller runs here, so the budget's status says
    // nothing is allowed yet: the API refuses with 429.
    eventually("the eviction is refused", || async {
        op.log().contains("eviction refused")
    })
    .await;
    eventually("and retried", || async {
        op.log().matches("eviction refused").count() >= 2
    })
    .await;
    assert!(
        c.get("v1", "Pod", "team-a", "agent-alice-1")
            .await
            .is_some(),
        "the budget held"
    );
    assert!(
        op.log().contains("restart failed; retrying") && !op.log().contains("why=\"\""),
        "{}",
        op.log()
    );
    // What the disruption controller would report: one disruption allowed.
    let pdb = c
        .get("policy/v1", "PodDisruptionBudget", "team-a", "agent-alice")
        .await
        .unwrap();
    c.patch_status(
        "policy/v1",
        "PodDisruptionBudget",
        "team-a",
        "agent-alice",
        json!({
            "observedGeneration": pdb["metadata"]["generation"],
            "disruptionsAllowed": 1, "currentHealthy": 1, "desiredHealthy": 0, "expectedPods": 1,
        }),
    )
    .await;
    within(
        "the retry evicts the pod",
        Duration::from_secs(30),
        || async {
            c.get("v1", "Pod", "team-a", "agent-alice-1")
                .await
                .is_none()
        },
    )
    .await;
    // The pod can be gone before the operator has logged the call's answer.
    eventually("the eviction is logged", || async {
        op.log().contains("pod evicted")
    })
    .await;
    let refused = c
        .requests(&[
            ("resource", "pods"),
            ("subresource", "eviction"),
            ("code", "429"),
        ])
        .await;
    assert!(refused >= 2, "{refused} refusals");
}

fn signal(op: &Operator, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &op.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_is_ridden_out_and_a_long_outage_ends_the_lease() {
    let Some(c) = Cluster::start("controller: API server restart").await else {
        return;
    };
    // A restart shorter than the lease: the replica keeps leading and its
    // watches resume.
    let mut op = c.operator("a", &["--lease-duration", "30s"]);
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.ready("team-a", "alice").await;
    c.cp.restart_apiserver().await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    eventually("the change after the restart renders", || async {
        c.plugins("team-a/alice").contains("fmt@tools")
    })
    .await;
    c.ready("team-a", "alice").await;
    assert!(op.child.try_wait().unwrap().is_none(), "{}", op.log());
    assert_eq!(lease_holder(&c).await, Some(json!("a")));
    assert_eq!(op.stop(), 0);

    // An outage longer than the lease: the replica cannot prove it still
    // leads, so it stops (exit 1) rather than write alongside a new leader;
    // its Deployment starts it again, and the new process takes over.
    let mut op = c.operator("b", &["--lease-duration", "3s"]);
    eventually("b leads", || async { op.log().contains("leading") }).await;
    c.cp.stop_apiserver().await;
    let code = op.exits_within(Duration::from_secs(20));
    assert_eq!(code, Some(1), "{}", op.log());
    assert!(op.log().contains("lost the lease"), "{}", op.log());
    c.cp.start_apiserver().await;
    let _op = c.operator("c", &["--lease-duration", "3s"]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["fmt@tools"],
    ))
    .await;
    eventually("the new replica renders", || async {
        !c.plugins("team-a/alice").contains("lint@tools")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_expired_by_compaction_relists_and_misses_no_change() {
    // Watches are served by etcd itself, so a compaction expires what the
    // operator last saw, as on a server whose watch cache has moved on.
    let options = Options::default().apiserver_arg("--watch-cache=false");
    let Some(c) = Cluster::start_with("controller: 410 Gone", options).await else {
        return;
    };
    let op = c.operator("a", &["--lease-duration", "60s"]);
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(mcp(
        "team-a",
        "forgejo",
        json!({"agentType": "coder"}),
        "static",
    ))
    .await;
    c.ready("team-a", "alice").await;
    eventually("alice has forgejo", || async {
        c.claude("team-a/alice")["mcpServers"]["forgejo"].is_object()
    })
    .await;

    // The operator is frozen while its connections are cut, objects change
    // and etcd compacts every version it saw.
    signal(&op, "-STOP");
    c.cp.restart_apiserver().await;
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    c.delete("agentenv.io/v1alpha1", "McpServer", "team-a", "forgejo")
        .await;
    // New while the watches are down, of a type nothing else touches: only
    // the relisting of instances, before the controller's store holds it,
    // can ask for its first pass.
    c.apply(instance("team-a", "bob", "reviewer", json!({})))
        .await;
    c.cp.compact().await;
    let lists_before =
        c.cp.audit()
            .iter()
            .filter(|e| e["user"]["username"] == OPERATOR_USER && e["verb"] == "list")
            .count();
    signal(&op, "-CONT");

    eventually("the change and the deletion are both seen", || async {
        c.plugins("team-a/alice").contains("fmt@tools")
            && c.claude("team-a/alice")["mcpServers"]
                .as_object()
                .is_some_and(|m| m.is_empty())
    })
    .await;
    assert!(
        op.log().contains("watch is too old"),
        "the watch was expired: {}",
        op.log()
    );
    let lists_after =
        c.cp.audit()
            .iter()
            .filter(|e| e["user"]["username"] == OPERATOR_USER && e["verb"] == "list")
            .count();
    assert!(lists_after > lists_before, "the watches relisted");
    c.ready("team-a", "alice").await;
    c.ready("team-a", "bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_pill_holds_back_only_what_it_targets() {
    let Some(c) = Cluster::start("controller: poison pill").await else {
        return;
    };
    let admin = c.client();
    // A PluginBinding stored while its CRD took anything (an old or
    // hand-edited CRD): its spec is not even the right shape.
    let crds = kube_envtest::apply::documents(
        &std::fs::read_to_string(repo().join("crds/crds.yaml")).unwrap(),
    );
    let mut loose = crds
        .iter()
        .find(|d| d["spec"]["names"]["kind"] == "PluginBinding")
        .unwrap()
        .clone();
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"] =
        json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    kube_envtest::apply::apply(
        &admin,
        &loose,
        &kube::api::PatchParams::apply("tests").force(),
    )
    .await
    .unwrap();
    c.apply(json!({
        "apiVersion": "agentenv.io/v1alpha1", "kind": "PluginBinding",
        "metadata": {"name": "poison", "namespace": "team-a"},
        "spec": {"target": {"agentType": "researcher"}, "plugins": "everything"},
    }))
    .await;
    for crd in &crds {
        kube_envtest::apply::apply(&admin, crd, &kube::api::PatchParams::apply("tests").force())
            .await
            .unwrap();
    }

    let _op = c.operator("a", &[]);
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(instance("team-a", "alice", "coder", json!({})))
        .await;
    c.apply(instance("team-a", "bob", "researcher", json!({})))
        .await;
    // Accepted by the server (CEL cannot see the namespace), refused by the
    // operator: an env dir in another namespace's part of the root.
    c.apply(instance(
        "team-a",
        "carol",
        "coder",
        json!({"envDir": {"path": "team-b/carol"}}),
    ))
    .await;

    c.ready("team-a", "alice").await;
    assert!(c.plugins("team-a/alice").contains("lint@tools"));
    for (name, says) in [
        ("bob", "PluginBinding team-a/poison"),
        ("carol", "spec.envDir.path"),
    ] {
        eventually(&format!("{name} is held back"), || async {
            c.condition("team-a", name, "Stalled")
                .await
                .is_some_and(|s| {
                    s["status"] == "True"
                        && s["reason"] == "InvalidObject"
                        && s["message"].as_str().is_some_and(|m| m.contains(says))
                })
        })
        .await;
    }
    eventually("the poison binding reports why", || async {
        c.custom("PluginBinding", "team-a", "poison")
            .await
            .is_some_and(|b| {
                condition_of(&b, "Stalled").is_some_and(|s| {
                    s["reason"] == "InvalidObject"
                        && s["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("spec.plugins"))
                })
            })
    })
    .await;
    assert!(!c.root().join("team-a/bob").exists(), "bob is not rendered");
    assert!(
        !c.root().join("team-b").exists(),
        "nothing is written for carol"
    );

    // The others keep going.
    c.apply(binding(
        "team-a",
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    eventually("alice renders the next change", || async {
        c.plugins("team-a/alice").contains("fmt@tools")
    })
    .await;
    // Deleting the pill releases bob.
    c.delete("agentenv.io/v1alpha1", "PluginBinding", "team-a", "poison")
        .await;
    c.ready("team-a", "bob").await;
}
