//! The controller on a real kube-apiserver (`KUBEBUILDER_ASSETS`): the same
//! synthetic fleet created through the API. Per fleet size, in one control
//! plane:
//!
//! 1. live: the operator running, `n` AgentInstances created (16 at a time);
//!    the time from the last create to every instance Ready;
//! 2. cold start: the operator stopped, its env root and state wiped and
//!    every instance's status removed; a new operator started; the time
//!    until every instance is Ready again;
//! 3. the floor: the statuses removed again, and a minimal client applying
//!    the same statuses (the operator's own, as written in step 2) at the
//!    operator's concurrency, as the operator's service account; then the
//!    same again with the one event per instance the operator also sends.
//!
//! Each step reports the operator's API requests per instance (from the
//! audit log) and its peak RSS. `FLEET_CLUSTER_OPERATOR_ARGS` adds flags to
//! `agent-env run` (for experiments, e.g. `--no-fsync`).

#[path = "../../tests/common/real.rs"]
pub mod real;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::Resource as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

use crate::fleet_gen::{self, NS};
use crate::{probe, secs};
use real::{Cluster, OPERATOR_NS, OPERATOR_USER};

/// Instances the operator and the floor work on at once (`run`'s default).
const CONCURRENCY: usize = 16;

/// Runs the three steps for each size; `Value::Null` without a control plane.
pub fn measure(base: &Path, sizes: &[usize]) -> Value {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for &n in sizes {
        let dir = base.join(format!("cluster-n{n}"));
        fleet_gen::generate(&dir, n);
        eprintln!("== cluster, {n} instances");
        match rt.block_on(measure_one(&dir, n)) {
            Some(r) => out.push(r),
            None => return Value::Null,
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    json!(out)
}

async fn measure_one(dir: &Path, n: usize) -> Option<Value> {
    let c = Cluster::start("cluster bench").await?;
    let (types, instances, overrides) = fleet_docs(dir);
    c.namespace(NS).await;
    builtin_config_map(&c, &dir.join("config")).await;
    // Types first (their Secrets before anything renders), then the
    // instance-scope objects, many at a time.
    for d in &types {
        c.apply(d.clone()).await;
    }
    futures::stream::iter(overrides.iter().cloned())
        .map(|d| c.apply(d))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "agentenv.io",
        "v1alpha1",
        "AgentInstance",
    ));
    let instances_api: Api<DynamicObject> = Api::namespaced_with(c.client(), NS, &ar);
    let ready = Readiness::watch(instances_api.clone());

    // 1. Live: instances created while the operator runs.
    let op = Op::start(&c, "live");
    op.wait_leading().await;
    let mut audit = Audit::new(&c);
    let requests_before = audit.read();
    let started = Instant::now();
    futures::stream::iter(instances.iter().cloned())
        .map(|d| {
            let api = instances_api.clone();
            async move {
                let name = d["metadata"]["name"].as_str().unwrap().to_owned();
                api.patch(&name, &PatchParams::apply("bench"), &Patch::Apply(&d))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let last_create = Instant::now();
    let all_ready = ready.until(n, Duration::from_secs(600)).await;
    // Counted once the operator is done: bindings' and servers' statuses
    // (how many instances each applies to) follow the instances.
    audit.settle().await;
    let live = json!({
        "create_s": secs(last_create - started),
        "ready_after_last_create_s": secs(all_ready.saturating_duration_since(last_create)),
        "requests_per_instance": per(audit.read() - requests_before, n),
        "peak_rss_mb": op.peak_rss_mb(),
    });
    eprintln!("live: {live}");
    op.stop();

    // 2. Cold start: nothing on disk, no state, no status.
    let _ = std::fs::remove_dir_all(c.root());
    std::fs::create_dir_all(c.root()).unwrap();
    let statuses = strip_statuses(&instances_api).await;
    ready.until_none(Duration::from_secs(300)).await;
    let requests_before = audit.read();
    let op = Op::start(&c, "cold");
    let started = op.started;
    let leading = op.wait_leading().await;
    let all_ready = ready.until(n, Duration::from_secs(900)).await;
    let cold = all_ready - started;
    audit.settle().await;
    let cold_requests = audit.read() - requests_before;
    let cold_rss = op.peak_rss_mb();
    op.stop();
    eprintln!("cold start: {cold:?}");

    // 3. The floor: the same status applies, nothing else; then the same
    // with the one event per instance the operator also sends.
    let as_operator = kube_envtest::ControlPlane::client_for(&c.cp, &c.operator_kubeconfig).await;
    let floor_status = floor(&instances_api, &as_operator, &ar, &ready, n, false).await;
    let floor_events = floor(&instances_api, &as_operator, &ar, &ready, n, true).await;
    drop(statuses);
    Some(json!({
        "instances": n,
        "objects": n + types.len() + overrides.len(),
        "live": live,
        "cold": {
            "all_ready_s": secs(cold),
            "leading_s": secs(leading),
            "requests_per_instance": per(cold_requests, n),
            "peak_rss_mb": cold_rss,
        },
        "floor_s": secs(floor_status),
        "cold_over_floor": crate::ratio(cold, floor_status),
        "floor_with_events_s": secs(floor_events),
        "cold_over_floor_with_events": crate::ratio(cold, floor_events),
    }))
}

/// The floor of a cold start: every instance's status removed, then the
/// statuses the operator wrote applied again by a minimal client as the
/// operator's service account, at the operator's concurrency; with
/// `events`, each followed by the one event the operator sends per render.
async fn floor(
    instances: &Api<DynamicObject>,
    client: &kube::Client,
    ar: &ApiResource,
    ready: &Readiness,
    n: usize,
    events: bool,
) -> Duration {
    let statuses = strip_statuses(instances).await;
    ready.until_none(Duration::from_secs(300)).await;
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), NS, ar);
    let recorder = kube::runtime::events::Recorder::new(
        client.clone(),
        kube::runtime::events::Reporter {
            controller: "floor".into(),
            instance: None,
        },
    );
    let started = Instant::now();
    futures::stream::iter(statuses)
        .map(|(name, status)| {
            let (api, recorder, ar) = (api.clone(), recorder.clone(), ar.clone());
            async move {
                let body = json!({
                    "apiVersion": "agentenv.io/v1alpha1", "kind": "AgentInstance",
                    "status": status,
                });
                let applied = api
                    .patch_status(
                        &name,
                        &PatchParams::apply("floor").force(),
                        &Patch::Apply(&body),
                    )
                    .await
                    .unwrap();
                if events {
                    let event = kube::runtime::events::Event {
                        type_: kube::runtime::events::EventType::Normal,
                        reason: "Rendered".into(),
                        note: Some("wrote .claude.json, settings.json".into()),
                        action: "Reconcile".into(),
                        secondary: None,
                    };
                    let reference = applied.object_ref(&ar);
                    recorder.publish(&event, &reference).await.unwrap();
                }
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    let took = started.elapsed();
    ready.until(n, Duration::from_secs(120)).await;
    took
}

/// The fleet's documents: type-scope objects and Secrets, the
/// AgentInstances, and the instance-scope objects.
fn fleet_docs(dir: &Path) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let read = |sub: &str| -> Vec<Value> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("manifests").join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| kube_envtest::apply::documents(&std::fs::read_to_string(f).unwrap()))
            .collect()
    };
    let (instances, overrides) = read("instances")
        .into_iter()
        .partition(|d| d["kind"] == "AgentInstance");
    (read("types"), instances, overrides)
}

/// The builtin layer as `deploy/` ships it: a ConfigMap of the config files.
async fn builtin_config_map(c: &Cluster, config: &Path) {
    c.namespace(OPERATOR_NS).await;
    let mut data = BTreeMap::new();
    for f in [
        "agents.json",
        "marketplaces-builtin.json",
        "mcp-builtin.json",
    ] {
        data.insert(f, std::fs::read_to_string(config.join(f)).unwrap());
    }
    c.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "agent-env-builtin", "namespace": OPERATOR_NS},
        "data": data,
    }))
    .await;
}

/// Removes every instance's status; returns what each held.
async fn strip_statuses(api: &Api<DynamicObject>) -> Vec<(String, Value)> {
    let list = api.list(&Default::default()).await.unwrap();
    let statuses: Vec<(String, Value)> = list
        .items
        .into_iter()
        .map(|o| (o.metadata.name.unwrap(), o.data["status"].clone()))
        .collect();
    futures::stream::iter(statuses.iter().map(|(name, _)| name.clone()))
        .map(|name| {
            let api = api.clone();
            async move {
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": null})),
                )
                .await
                .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
    statuses
}

/// The operator's requests, read from the audit log as it grows.
struct Audit {
    log: PathBuf,
    offset: u64,
    seen: HashSet<String>,
    requests: Requests,
    /// When the operator last wrote something other than its lease.
    last_write: Instant,
}

impl Audit {
    fn new(c: &Cluster) -> Audit {
        Audit {
            log: c.cp.dir().join("audit.log"),
            offset: 0,
            seen: HashSet::new(),
            requests: Requests {
                total: 0,
                by: BTreeMap::new(),
            },
            last_write: Instant::now(),
        }
    }

    /// Reads what was logged since the last call; the operator's requests so far.
    fn read(&mut self) -> Requests {
        use std::io::{Read, Seek};
        let mut f = std::fs::File::open(&self.log).unwrap();
        assert!(
            f.metadata().unwrap().len() >= self.offset,
            "the audit log was rotated: requests would be lost"
        );
        f.seek(std::io::SeekFrom::Start(self.offset)).unwrap();
        let mut text = String::new();
        f.read_to_string(&mut text).unwrap();
        // Only whole lines; a line being written is read next time.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        self.offset += whole as u64;
        for line in text[..whole].lines() {
            let Ok(e) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if e["user"]["username"] != OPERATOR_USER {
                continue;
            }
            let Some(id) = e["auditID"].as_str() else {
                continue;
            };
            if !self.seen.insert(id.to_owned()) {
                continue;
            }
            let (verb, r) = (e["verb"].as_str().unwrap_or(""), &e["objectRef"]);
            let resource = r["resource"].as_str().unwrap_or("");
            let what = match r["subresource"].as_str() {
                Some(sub) => format!("{verb} {resource}/{sub}"),
                None => format!("{verb} {resource}"),
            };
            if matches!(verb, "create" | "update" | "patch" | "delete") && resource != "leases" {
                self.last_write = Instant::now();
            }
            *self.requests.by.entry(what).or_insert(0) += 1;
            self.requests.total += 1;
        }
        self.requests.clone()
    }

    /// Waits until the operator has written nothing but its lease for 3 s:
    /// it has nothing left to do.
    async fn settle(&mut self) {
        let started = Instant::now();
        loop {
            self.read();
            if self.last_write.elapsed() >= Duration::from_secs(3) {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the operator kept writing for 10 minutes: {:?}",
                self.requests.by
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[derive(Clone)]
struct Requests {
    total: usize,
    by: BTreeMap<String, usize>,
}

impl std::ops::Sub for Requests {
    type Output = Requests;
    fn sub(self, before: Requests) -> Requests {
        let by = self
            .by
            .into_iter()
            .map(|(k, v)| {
                let was = before.by.get(&k).copied().unwrap_or(0);
                (k, v - was)
            })
            .filter(|(_, v)| *v > 0)
            .collect();
        Requests {
            total: self.total - before.total,
            by,
        }
    }
}

/// Requests per instance, in all and of each verb and resource.
fn per(r: Requests, n: usize) -> Value {
    let each = |count: usize| json!(crate::round2(count as f64 / n as f64));
    let by: serde_json::Map<String, Value> = r.by.into_iter().map(|(k, v)| (k, each(v))).collect();
    json!({"total": each(r.total), "by": by})
}

/// Which instances are Ready for their current generation, kept by a watch.
struct Readiness {
    state: Arc<Mutex<(HashSet<String>, Instant)>>,
}

impl Readiness {
    fn watch(api: Api<DynamicObject>) -> Readiness {
        let state = Arc::new(Mutex::new((HashSet::new(), Instant::now())));
        let s = state.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(e) = events.try_next().await.unwrap_or(None) {
                let (obj, deleted) = match e {
                    watcher::Event::Apply(o) | watcher::Event::InitApply(o) => (o, false),
                    watcher::Event::Delete(o) => (o, true),
                    _ => continue,
                };
                let name = obj.metadata.name.clone().unwrap();
                let ok = !deleted && is_ready(&obj);
                let mut g = s.lock().unwrap();
                let changed = if ok {
                    g.0.insert(name)
                } else {
                    g.0.remove(&name)
                };
                if changed {
                    g.1 = Instant::now();
                }
            }
        });
        Readiness { state }
    }

    /// When the `n`th instance became Ready.
    async fn until(&self, n: usize, limit: Duration) -> Instant {
        let started = Instant::now();
        loop {
            {
                let g = self.state.lock().unwrap();
                if g.0.len() >= n {
                    return g.1;
                }
                assert!(
                    started.elapsed() < limit,
                    "only {} of {n} instances Ready after {limit:?}",
                    g.0.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_none(&self, limit: Duration) {
        let started = Instant::now();
        while !self.state.lock().unwrap().0.is_empty() {
            assert!(started.elapsed() < limit, "statuses were not removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn is_ready(o: &DynamicObject) -> bool {
    let status = &o.data["status"];
    status["observedGeneration"].as_i64() == o.metadata.generation
        && status["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// One `agent-env run`, as deployed: fsync on, default concurrency and resync.
struct Op {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Op {
    fn start(c: &Cluster, identity: &str) -> Op {
        let log = c.dir.path().join(format!("{identity}.log"));
        let started = Instant::now();
        let child = Command::new(crate::BIN)
            .args([
                "run",
                "--operator-namespace",
                OPERATOR_NS,
                "--identity",
                identity,
            ])
            .arg("--env-root")
            .arg(c.root())
            .args(
                std::env::var("FLEET_CLUSTER_OPERATOR_ARGS")
                    .unwrap_or_default()
                    .split_whitespace(),
            )
            .env("KUBECONFIG", &c.operator_kubeconfig)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Op {
            child,
            log,
            started,
        }
    }

    /// Waits until this replica holds the lease (a new one waits out the
    /// last holder's); returns how long after its start that was.
    async fn wait_leading(&self) -> Duration {
        let lease = Duration::from_secs(60);
        while self.started.elapsed() < lease {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.contains("leading") {
                return self.started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the operator did not lead within {lease:?}");
    }

    fn peak_rss_mb(&self) -> Value {
        json!(probe::peak_rss(self.child.id()).map(|b| b / (1024 * 1024)))
    }

    /// SIGTERM, as a rollout would.
    fn stop(self) {}
}

impl Drop for Op {
    fn drop(&mut self) {
        crate::stop(&mut self.child);
    }
}
