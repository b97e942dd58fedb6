//! `delivery.mode: Sidecar` on a real kube-apiserver (`KUBEBUILDER_ASSETS`;
//! skipped without): `agent-env run` as the operator's service account
//! publishes each instance's render, and `agent-env sidecar` processes, each
//! as its agent's own ServiceAccount, keep "pod-local" env dirs at it. There
//! is no kubelet: a pod is an API object whose name and UID the sidecar is
//! given, and its volume is a directory a restart starts empty.

#[path = "common/real.rs"]
mod real;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use real::*;
use serde_json::{Value, json};

const NS: &str = "team-a";

/// One `agent-env sidecar` process; killed when dropped.
struct Sidecar {
    child: Child,
    log: PathBuf,
    port: u16,
    volume: PathBuf,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Sidecar {
    fn env_dir(&self) -> PathBuf {
        self.volume.join("claude")
    }

    fn settings(&self) -> Value {
        read_json(&self.env_dir().join("settings.json"))
    }

    fn claude(&self) -> Value {
        read_json(&self.env_dir().join(".claude.json"))
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What `/readyz` answers: the startup probe.
    fn ready(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Creates the pod object and starts its sidecar on `volume`, as the
/// ServiceAccount `kubeconfig` authenticates.
async fn start_pod(
    c: &Cluster,
    kubeconfig: &Path,
    instance: &str,
    pod: &str,
    volume: &Path,
) -> Sidecar {
    c.apply(agent_pod(NS, pod, instance)).await;
    let uid = c.get("v1", "Pod", NS, pod).await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::create_dir_all(volume).unwrap();
    let port = free_port();
    let log = c.dir.path().join(format!("sidecar-{pod}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_agent-env"))
        .arg("sidecar")
        .arg("--env-root")
        .arg(volume)
        .args(["--probe-addr", &format!("127.0.0.1:{port}"), "--no-fsync"])
        .env("KUBECONFIG", kubeconfig)
        .env("AGENT_ENV_INSTANCE", instance)
        .env("AGENT_ENV_POD_NAMESPACE", NS)
        .env("AGENT_ENV_POD_NAME", pod)
        .env("AGENT_ENV_POD_UID", uid)
        .env("AGENT_ENV_LOG", "info,agent_env_operator=debug,kube=warn")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Sidecar {
        child,
        log,
        port,
        volume: volume.to_owned(),
    }
}

fn sidecar_instance(name: &str, sa: &str) -> Value {
    instance(
        NS,
        name,
        "coder",
        json!({"delivery": {"mode": "Sidecar", "serviceAccountName": sa}}),
    )
}

fn plugins(v: &Value) -> Vec<String> {
    v["enabledPlugins"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

async fn pods_current(c: &Cluster, name: &str) -> Option<String> {
    let o = c.instance_json(NS, name).await?;
    o["status"]["sidecar"]["podsCurrent"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_renders_corrects_drift_keeps_installs_across_a_restart_and_follows_secrets() {
    let Some(c) = Cluster::start("sidecar: render, drift, installs, secrets").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let alice_sa = c.cp.service_account(NS, "agent-alice").await;
    c.apply(sidecar_instance("alice", "agent-alice")).await;
    c.apply(binding(
        NS,
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    c.apply(mcp(
        NS,
        "forgejo",
        json!({"agentType": "coder"}),
        "${SECRET:FORGEJO_TOKEN}",
    ))
    .await;
    c.apply(labelled_secret(
        NS,
        "tokens",
        "FORGEJO_TOKEN",
        "first-token",
        true,
    ))
    .await;
    c.ready(NS, "alice").await;

    let pod0 = c.dir.path().join("pod-alice-0");
    let mut sidecar = start_pod(&c, &alice_sa, "alice", "alice-0", &pod0).await;
    // The instance may be Ready on a render made before the McpServer and its
    // Secret reached the operator: wait for the render that holds all three.
    eventually(
        "the first render is on disk and the startup probe passes",
        || async {
            sidecar.ready()
                && plugins(&sidecar.settings()) == ["lint@tools"]
                && sidecar.claude()["mcpServers"]["forgejo"]["headers"]["Authorization"]
                    == "Bearer first-token"
        },
    )
    .await;
    eventually("the status counts the pod as current", || async {
        pods_current(&c, "alice").await.as_deref() == Some("1/1")
            && c.condition(NS, "alice", "InSync")
                .await
                .is_some_and(|s| s["status"] == "True")
    })
    .await;
    // The controller wrote no env dir of its own.
    assert!(!c.root().join(NS).join("alice").exists());

    // Drift: a hand edit that drops the declared plugin is put back at once
    // from the pod's own filesystem watch; foreign keys stay byte for byte.
    let settings = sidecar.env_dir().join("settings.json");
    let mut edited = sidecar.settings();
    edited["enabledPlugins"] = json!({});
    edited["theme"] = json!("dark");
    std::fs::write(&settings, serde_json::to_vec_pretty(&edited).unwrap()).unwrap();
    let started = Instant::now();
    within("drift put back", Duration::from_secs(5), || async {
        plugins(&sidecar.settings()) == ["lint@tools"]
    })
    .await;
    let took = started.elapsed();
    assert_eq!(sidecar.settings()["theme"], "dark");
    assert!(took < Duration::from_secs(2), "drift took {took:?}");

    // A runtime install is adopted, reported, and taken into the
    // controller's store and the next render.
    let mut installed = sidecar.settings();
    installed["enabledPlugins"]["mine@market"] = json!(true);
    std::fs::write(&settings, serde_json::to_vec_pretty(&installed).unwrap()).unwrap();
    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    eventually("the render carries the install", || async {
        let Ok(s) = secrets.get("agent-env-render-alice").await else {
            return false;
        };
        let bytes = &s.data.unwrap()["render.json"].0;
        let render: Value = serde_json::from_slice(bytes).unwrap();
        render["installed"]["enabledPlugins"]["mine@market"] == true
    })
    .await;

    // A pod restart: a new pod, and its volume starts empty.
    sidecar.kill();
    c.delete("v1", "Pod", NS, "alice-0").await;
    let pod1 = c.dir.path().join("pod-alice-1");
    let sidecar = start_pod(&c, &alice_sa, "alice", "alice-1", &pod1).await;
    eventually("the restarted pod gets the install back", || async {
        sidecar.ready() && plugins(&sidecar.settings()) == ["lint@tools", "mine@market"]
    })
    .await;

    // A secret value change reaches the pod's files.
    c.apply(labelled_secret(
        NS,
        "tokens",
        "FORGEJO_TOKEN",
        "second-token",
        true,
    ))
    .await;
    eventually("the new token is in the pod's .claude.json", || async {
        sidecar.claude()["mcpServers"]["forgejo"]["headers"]["Authorization"]
            == "Bearer second-token"
    })
    .await;
    eventually("the status counts the new pod only", || async {
        pods_current(&c, "alice").await.as_deref() == Some("1/1")
    })
    .await;

    // No secret value in the status.
    let status = c.instance_json(NS, "alice").await.unwrap()["status"].to_string();
    assert!(!status.contains("second-token"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reads_only_its_own_instances_render() {
    let Some(c) = Cluster::start("sidecar: isolation").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let alice_sa = c.cp.service_account(NS, "agent-alice").await;
    c.cp.service_account(NS, "agent-bob").await;
    c.apply(sidecar_instance("alice", "agent-alice")).await;
    c.apply(sidecar_instance("bob", "agent-bob")).await;
    c.apply(mcp(
        NS,
        "forgejo",
        json!({"instance": "bob"}),
        "${SECRET:BOB_TOKEN}",
    ))
    .await;
    c.apply(labelled_secret(
        NS,
        "bob-tokens",
        "BOB_TOKEN",
        "bobs-secret",
        true,
    ))
    .await;
    c.ready(NS, "alice").await;
    c.ready(NS, "bob").await;
    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    eventually("both renders are published", || async {
        secrets
            .get_opt("agent-env-render-alice")
            .await
            .unwrap()
            .is_some()
            && secrets
                .get_opt("agent-env-render-bob")
                .await
                .unwrap()
                .is_some()
    })
    .await;

    let as_alice: Api<Secret> = Api::namespaced(c.cp.client_for(&alice_sa).await, NS);
    let own = ListParams::default().fields("metadata.name=agent-env-render-alice");
    assert_eq!(as_alice.list(&own).await.unwrap().items.len(), 1);
    let forbidden =
        |r: Result<(), kube::Error>| matches!(r, Err(kube::Error::Api(e)) if e.code == 403);
    let other = ListParams::default().fields("metadata.name=agent-env-render-bob");
    assert!(forbidden(as_alice.list(&other).await.map(|_| ())));
    assert!(forbidden(
        as_alice.get("agent-env-render-bob").await.map(|_| ())
    ));
    assert!(forbidden(
        as_alice.get("agent-env-render-alice").await.map(|_| ())
    ));
    assert!(forbidden(
        as_alice.list(&ListParams::default()).await.map(|_| ())
    ));
    assert!(forbidden(as_alice.get("bob-tokens").await.map(|_| ())));
    let report = json!({"data": {"x": "e30="}});
    assert!(forbidden(
        as_alice
            .patch(
                "agent-env-report-bob",
                &PatchParams::default(),
                &Patch::Merge(&report)
            )
            .await
            .map(|_| ())
    ));

    // A sidecar started for bob under alice's account gets nothing and says why.
    let volume = c.dir.path().join("pod-bob-as-alice");
    let sidecar = start_pod(&c, &alice_sa, "bob", "bob-0", &volume).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!sidecar.ready());
    assert!(!sidecar.env_dir().join(".claude.json").exists());
    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    assert!(log.contains("serviceAccountName"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_render_edited_or_deleted_by_hand_is_published_again_and_loses_nothing() {
    let Some(c) = Cluster::start("sidecar: bad render").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let alice_sa = c.cp.service_account(NS, "agent-alice").await;
    c.apply(sidecar_instance("alice", "agent-alice")).await;
    c.apply(binding(
        NS,
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    let sidecar = start_pod(&c, &alice_sa, "alice", "alice-0", &c.dir.path().join("pod")).await;
    eventually("rendered", || async {
        sidecar.ready() && plugins(&sidecar.settings()) == ["lint@tools"]
    })
    .await;
    let before = std::fs::read(sidecar.env_dir().join("settings.json")).unwrap();

    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    let garbage =
        base64::engine::general_purpose::STANDARD.encode(b"{\"format\": 1, \"oops\": true}");
    secrets
        .patch(
            "agent-env-render-alice",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"render.json": garbage}})),
        )
        .await
        .unwrap();
    eventually("the controller publishes the render again", || async {
        let s = secrets.get("agent-env-render-alice").await.unwrap();
        s.data.unwrap()["render.json"]
            .0
            .starts_with(b"{\"format\":1,\"namespace\"")
    })
    .await;
    secrets
        .delete("agent-env-render-alice", &Default::default())
        .await
        .unwrap();
    eventually("a deleted render is published again", || async {
        secrets
            .get_opt("agent-env-render-alice")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    eventually("the pod is current again", || async {
        pods_current(&c, "alice").await.as_deref() == Some("1/1")
    })
    .await;
    // Whatever the sidecar saw meanwhile, the files were never emptied.
    assert_eq!(
        std::fs::read(sidecar.env_dir().join("settings.json")).unwrap(),
        before
    );
    let log = std::fs::read_to_string(&sidecar.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_mid_write_leaves_no_corrupt_file_and_resumes() {
    let Some(c) = Cluster::start("sidecar: killed mid-write").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let alice_sa = c.cp.service_account(NS, "agent-alice").await;
    c.apply(sidecar_instance("alice", "agent-alice")).await;
    let volume = c.dir.path().join("pod");
    let mut sidecar = start_pod(&c, &alice_sa, "alice", "alice-0", &volume).await;
    let uid = c.get("v1", "Pod", NS, "alice-0").await.unwrap()["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    // The container restarts with the same volume: the kubelet's doing when
    // a sidecar dies.
    let restart = |old: &mut Sidecar| {
        old.kill();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_agent-env"))
            .arg("sidecar")
            .arg("--env-root")
            .arg(&volume)
            .args(["--probe-addr", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", &alice_sa)
            .env("AGENT_ENV_INSTANCE", "alice")
            .env("AGENT_ENV_POD_NAMESPACE", NS)
            .env("AGENT_ENV_POD_NAME", "alice-0")
            .env("AGENT_ENV_POD_UID", &uid)
            .stderr(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&old.log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        old.child = child;
        old.port = port;
    };
    let mut last = Vec::new();
    for round in 0..12 {
        last = (0..=round)
            .map(|i| format!("p{i:02}@tools"))
            .collect::<Vec<_>>();
        let names: Vec<&str> = last.iter().map(String::as_str).collect();
        c.apply(binding(NS, "coders", json!({"agentType": "coder"}), &names))
            .await;
        // Kill at a different moment of each round's write.
        tokio::time::sleep(Duration::from_millis(40 * (round % 5))).await;
        restart(&mut sidecar);
        for file in ["settings.json", ".claude.json"] {
            let p = sidecar.env_dir().join(file);
            if let Ok(bytes) = std::fs::read(&p) {
                serde_json::from_slice::<Value>(&bytes)
                    .unwrap_or_else(|e| panic!("round {round}: {file} is corrupt: {e}"));
            }
        }
    }
    eventually("the last render is on disk", || async {
        sidecar.ready() && plugins(&sidecar.settings()) == last
    })
    .await;
    // Nothing moved aside (no file was ever corrupt) and no temp file left.
    // A lock directory may be: a kill between an update's rename and the
    // lock's release leaves `<file>.lock`, which Claude Code and the next
    // write take over once stale (10 s, the lock protocol both follow;
    // `envdir` unit tests cover the take-over). No other kind of entry may.
    let left: Vec<String> = std::fs::read_dir(sidecar.env_dir())
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let lock = ["settings.json.lock", ".claude.json.lock"].contains(&name.as_str())
                && e.file_type().unwrap().is_dir();
            name != "settings.json" && name != ".claude.json" && !lock
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_change_restarts_the_workload_and_a_reported_install_does_not() {
    let Some(c) = Cluster::start("sidecar: restarts").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    c.cp.service_account(NS, "agent-carol").await;
    c.apply(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "agent-carol", "namespace": NS},
        "spec": {"selector": {"matchLabels": {"agentenv.io/instance": "carol"}}, "template": {
            "metadata": {"labels": {"agentenv.io/instance": "carol"}},
            "spec": {"containers": [{"name": "agent", "image": "registry.example/agent:1"}]}}},
    }))
    .await;
    c.apply(instance(
        NS,
        "carol",
        "coder",
        json!({
            "delivery": {"mode": "Sidecar", "serviceAccountName": "agent-carol"},
            "workload": {"kind": "Deployment", "name": "agent-carol"},
            "restart": {"strategy": "RolloutRestart", "minInterval": "1s"},
        }),
    ))
    .await;
    c.apply(binding(
        NS,
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    let secrets: Api<Secret> = Api::namespaced(c.client(), NS);
    let render = || async {
        secrets
            .get_opt("agent-env-render-carol")
            .await
            .unwrap()
            .map(|s| serde_json::from_slice::<Value>(&s.data.unwrap()["render.json"].0).unwrap())
    };
    eventually("carol's render holds the binding", || async {
        render()
            .await
            .is_some_and(|r| r["declared"]["enabledPlugins"]["lint@tools"]["value"] == true)
    })
    .await;
    let stamped = || async {
        c.get("apps/v1", "Deployment", NS, "agent-carol")
            .await
            .unwrap()["spec"]["template"]["metadata"]["annotations"]["kubectl.kubernetes.io/restartedAt"]
            .as_str()
            .map(str::to_owned)
    };

    // The binding may have reached the operator after the instance's first render, which is a
    // declared change and restarts the workload once (after minInterval): let that settle, and
    // take whatever stamp it left as the baseline.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = stamped().await;

    // A pod reports a runtime install: the render carries it, nothing restarts.
    let report = serde_json::to_vec(&json!({
        "podUid": "u1", "renderDigest": "x", "ready": true, "reason": "Rendered",
        "installed": {"enabledPlugins": {"mine@market": true}},
        "at": "2030-01-01T00:00:00Z",
    }))
    .unwrap();
    secrets
        .patch(
            "agent-env-report-carol",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"carol-0": base64::engine::general_purpose::STANDARD.encode(report)}})),
        )
        .await
        .unwrap();
    eventually("the render carries the reported install", || async {
        render()
            .await
            .is_some_and(|r| r["installed"]["enabledPlugins"]["mine@market"] == true)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stamped().await,
        baseline,
        "a reported install restarted the agent"
    );

    // A declared change does.
    c.apply(binding(
        NS,
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools", "fmt@tools"],
    ))
    .await;
    eventually("the workload is restarted", || async {
        stamped()
            .await
            .is_some_and(|s| Some(&s) != baseline.as_ref())
    })
    .await;
    let status = c.instance_json(NS, "carol").await.unwrap()["status"].clone();
    assert_eq!(status["lastRestart"]["reason"], "ConfigChanged", "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_pod_volume_is_refused_and_the_status_names_the_pod() {
    let Some(c) = Cluster::start("sidecar: hostile volume").await else {
        return;
    };
    let _op = c.operator("a", &[]);
    let alice_sa = c.cp.service_account(NS, "agent-alice").await;
    c.apply(sidecar_instance("alice", "agent-alice")).await;
    c.apply(binding(
        NS,
        "coders",
        json!({"agentType": "coder"}),
        &["lint@tools"],
    ))
    .await;
    // The agent replaced its env dir with a symlink out of the volume.
    let volume = c.dir.path().join("pod");
    let outside = c.dir.path().join("outside");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, volume.join("claude")).unwrap();
    let sidecar = start_pod(&c, &alice_sa, "alice", "alice-0", &volume).await;
    eventually("the status names the pod and why", || async {
        c.condition(NS, "alice", "InSync").await.is_some_and(|s| {
            s["status"] == "False"
                && s["reason"] == "PodsBehind"
                && s["message"]
                    .as_str()
                    .unwrap()
                    .contains("alice-0 (UnsafePath")
        })
    })
    .await;
    assert_eq!(pods_current(&c, "alice").await.as_deref(), Some("0/1"));
    assert!(!sidecar.ready(), "the agent must not start on no config");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}
