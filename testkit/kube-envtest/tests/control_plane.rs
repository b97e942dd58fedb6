//! The harness itself: it starts a working control plane, gives clients as
//! admin and as a service account (whose RBAC is enforced), restarts the API
//! server keeping what etcd stores, compacts etcd into `410 Gone`, and
//! leaves no server behind however the test process ends.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use kube_envtest::{ControlPlane, Options};
use serde_json::json;

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).unwrap()
}

#[tokio::test]
async fn admin_and_service_account_clients_with_rbac_enforced() {
    let Some(cp) = ControlPlane::shared("kube-envtest clients").await else {
        return;
    };
    let admin = cp.client().await;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), "default");
    cms.create(&PostParams::default(), &config_map("from-admin"))
        .await
        .unwrap();

    let sa = cp.service_account("envtest-rbac", "reader").await;
    let as_sa: Api<ConfigMap> = Api::namespaced(cp.client_for(&sa).await, "default");
    match as_sa.get("from-admin").await {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message
                    .contains("system:serviceaccount:envtest-rbac:reader"),
                "{}",
                s.message
            );
        }
        other => panic!("an account with no grants read a ConfigMap: {other:?}"),
    }

    let out = cp
        .kubectl()
        .args(["get", "configmap", "from-admin", "-o", "jsonpath={.data.k}"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "v",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cp.metrics().await.contains("apiserver_request_total"));
}

#[tokio::test]
async fn a_restart_keeps_the_data_and_a_compaction_expires_old_versions() {
    let Some(cp) = ControlPlane::start_with(
        "kube-envtest restart and compaction",
        // Watches go to etcd itself, so compaction decides what is too old.
        Options::default().apiserver_arg("--watch-cache=false"),
    )
    .await
    else {
        return;
    };
    let cms: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    let first = cms
        .create(&PostParams::default(), &config_map("kept"))
        .await
        .unwrap();
    cp.restart_apiserver().await;
    let cms: Api<ConfigMap> = Api::namespaced(cp.client().await, "default");
    assert_eq!(cms.get("kept").await.unwrap().data, first.data);

    cms.create(&PostParams::default(), &config_map("later"))
        .await
        .unwrap();
    cp.compact().await;
    let old = first.metadata.resource_version.unwrap();
    let mut stream = Box::pin(
        cms.watch(&WatchParams::default(), &old)
            .await
            .expect("the watch request is taken"),
    );
    use futures::StreamExt;
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
        Some(Err(kube::Error::Api(e))) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("a watch from a compacted version was answered with {other:?}"),
    }
}

fn pids_alive(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        .filter(|p| {
            // A zombie is dead; only its parent has not reaped it yet.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

/// Run by `no_server_outlives_a_killed_test_process` in a child process:
/// starts the shared control plane, reports the servers' pids, then waits
/// to be killed.
#[tokio::test]
#[ignore = "run by no_server_outlives_a_killed_test_process"]
async fn child_holding_a_control_plane() {
    let out = std::env::var("ENVTEST_CHILD_PIDS").unwrap();
    let cp = ControlPlane::shared("child").await.unwrap();
    let pids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains(&cp.dir().display().to_string()))
        })
        .map(|p| p.to_string())
        .collect();
    std::fs::write(&out, pids.join(" ")).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[test]
fn no_server_outlives_a_killed_test_process() {
    if kube_envtest::assets_or_skip("kube-envtest process cleanup").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("envtest-child-{}", std::process::id()));
    let _ = std::fs::remove_file(&dir);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holding_a_control_plane",
            "--ignored",
            "--nocapture",
        ])
        .env("ENVTEST_CHILD_PIDS", &dir)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let pids: Vec<u32> = loop {
        if let Ok(text) = std::fs::read_to_string(&dir)
            && !text.is_empty()
        {
            break text.split(' ').map(|p| p.parse().unwrap()).collect();
        }
        assert!(
            child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(90),
            "the child never came up"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&dir);
    assert_eq!(pids.len(), 2, "etcd and kube-apiserver: {pids:?}");
    assert_eq!(pids_alive(&pids).len(), 2);
    // SIGKILL: no destructor, no panic hook, nothing of the child runs.
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    while !pids_alive(&pids).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "servers outlived their test process: {:?}",
            pids_alive(&pids)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn dropping_a_control_plane_stops_its_servers_even_in_a_panic() {
    let Some(cp) = ControlPlane::start("kube-envtest drop").await else {
        return;
    };
    let dir = cp.dir().to_owned();
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains(&dir.display().to_string()))
        })
        .collect();
    assert_eq!(pids.len(), 2);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _held = cp;
        panic!("a failing test");
    }));
    assert!(panicked.is_err());
    assert!(pids_alive(&pids).is_empty(), "{:?}", pids_alive(&pids));
}
