//! `agent-env run`, the real binary, against a real kube-apiserver and etcd
//! (`KUBEBUILDER_ASSETS`; skipped without), as the operator's own service
//! account with exactly the RBAC of `deploy/`: rendering and status, every
//! watch mapping, Secrets, drift, the boot marker, restarts, suspend, the
//! finalizer, leader election, API server restarts, `410 Gone`, a poison
//! pill, and how many writes all of it costs. Each test has a control plane
//! of its own, so request counts are its own.

#[path = "common/real.rs"]
mod real;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use real::*;
use serde_json::json;

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
    assert!(!c.events("team-a", "Rendered").await.is_empty());
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
