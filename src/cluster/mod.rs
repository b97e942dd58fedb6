//! `agent-env run`: the engine as a Kubernetes controller.
//!
//! Watches feed one indexed [`Catalog`](catalog::Catalog) (the four kinds,
//! labelled Secrets, agent pods); each change queues exactly the instances
//! it affects into a kube-runtime `Controller` on AgentInstance, which
//! reconciles them with bounded concurrency through the same engine as
//! `reconcile`. The builtin layer comes from a ConfigMap, env dir drift from
//! a filesystem watch on the env root. Only the holder of the Lease writes.

pub mod catalog;
pub mod delivery;
pub mod events;
pub mod lease;
pub mod status;
pub mod workload;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, future};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, instrument, warn};

use crate::crd::{
    AgentInstance, DeletionPolicy, DeliveryMode, McpServer, PluginBinding, PluginMarketplace,
};
use crate::engine::builtin::Builtin;
use crate::engine::envdir::{BOOT_MARKER, Owner};
use crate::engine::fswatch::{Change, FsWatch, WatchError};
use crate::engine::restart::{self, Restarter, Target};
use crate::engine::retry::{BUSY_ATTEMPTS, BUSY_RETRY, io_retry_delay};
use crate::engine::secrets::{Chain, SecretProvider};
use crate::engine::snapshot::ObjectKey;
use crate::engine::{Engine, Mode, Outcome, PassOptions, reason};
use crate::handshake::Marker;
use crate::metrics::Metrics;
use crate::state::StoreSecrets;
use catalog::{Catalog, Kind};
use status::InstanceReport;

/// The one field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "agent-env";
/// Finalizer on instances whose env dir is removed with them.
pub const FINALIZER: &str = "agentenv.io/env-dir";
/// Flux's "reconcile now" annotation.
pub const REQUESTED_AT: &str = "reconcile.fluxcd.io/requestedAt";

/// How the controller runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Where the builtin ConfigMap and the Lease live.
    pub operator_namespace: String,
    /// Name of the builtin ConfigMap.
    pub config_map: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's name in the Lease and in events.
    pub identity: String,
    /// Lease duration.
    pub lease_duration: Duration,
    /// Instances reconciled at once.
    pub concurrency: usize,
    /// Every instance is checked again this often (drift on filesystems
    /// that send no events).
    pub resync: Duration,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: Option<SocketAddr>,
    /// The env root as mounted.
    pub env_root: PathBuf,
}

/// The controller could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The metrics endpoint could not bind.
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The env root watch could not be set up.
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// Another replica holds the lease now; this one stops writing.
    #[error("lost the lease {0}; stopping so that only the new leader writes")]
    LeaseLost(String),
}

/// A reconcile failed before it could report.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The engine could not run the pass.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Publishing for the sidecars failed.
    #[error(transparent)]
    Delivery(#[from] delivery::DeliveryError),
    /// An API call failed.
    #[error("{action} of AgentInstance {key} failed")]
    Api {
        /// The instance.
        key: ObjectKey,
        /// What was tried.
        action: &'static str,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// The four custom kinds as served.
#[derive(Clone)]
struct Resources {
    instance: ApiResource,
    binding: ApiResource,
    marketplace: ApiResource,
    mcp: ApiResource,
}

impl Resources {
    fn new() -> Resources {
        Resources {
            instance: ApiResource::erase::<AgentInstance>(&()),
            binding: ApiResource::erase::<PluginBinding>(&()),
            marketplace: ApiResource::erase::<PluginMarketplace>(&()),
            mcp: ApiResource::erase::<McpServer>(&()),
        }
    }

    fn of(&self, kind: Kind) -> &ApiResource {
        match kind {
            Kind::Binding => &self.binding,
            Kind::Marketplace => &self.marketplace,
            Kind::Mcp => &self.mcp,
            _ => &self.instance,
        }
    }
}

struct Ctx {
    client: Client,
    settings: Settings,
    resources: Resources,
    catalog: Arc<Catalog>,
    engine: RwLock<Arc<Engine>>,
    /// Why the builtin ConfigMap cannot be used (instances are held back
    /// until it can, unless an earlier good version is in use).
    builtin_error: RwLock<Option<String>>,
    builtin_loaded: AtomicBool,
    events: events::EventSink,
    restarter: Restarter,
    metrics: Arc<Metrics>,
    /// Consecutive retried passes per instance (busy files, IO errors).
    retries: Mutex<HashMap<ObjectKey, u32>>,
    /// The render and report Secrets of sidecar instances.
    delivery: delivery::Tracker,
    queue: mpsc::UnboundedSender<ObjectKey>,
}

fn api<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn dyn_api(client: &Client, ns: Option<&str>, ar: &ApiResource) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// The API clients the controller uses.
#[derive(Clone)]
pub struct Clients {
    /// Everything but evictions.
    pub main: Client,
    /// Evictions: built without retrying 429, so a PodDisruptionBudget's
    /// refusal comes back at once.
    pub eviction: Client,
}

/// Runs until SIGTERM or SIGINT, or until the lease is lost.
pub async fn run(
    settings: Settings,
    engine: Engine,
    clients: Clients,
    metrics: Arc<Metrics>,
) -> Result<(), RunError> {
    let client = clients.main.clone();
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(RunError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(RunError::Signals)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let ready = Arc::new(AtomicBool::new(false));
    let server = match settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Metrics { addr, source })?;
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                ready.clone(),
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };

    let catalog = Arc::new(Catalog::default());
    let (queue, queued) = mpsc::unbounded_channel::<ObjectKey>();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let restarter = Restarter::spawn(
        Arc::new(workload::KubeRestart {
            client: client.clone(),
            eviction_client: clients.eviction.clone(),
            catalog: catalog.clone(),
            manager: FIELD_MANAGER.into(),
        }),
        metrics.clone(),
    );
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        resources: Resources::new(),
        catalog: catalog.clone(),
        engine: RwLock::new(Arc::new(engine)),
        builtin_error: RwLock::new(None),
        builtin_loaded: AtomicBool::new(false),
        events: events::EventSink::spawn(recorder, metrics.clone()),
        restarter,
        metrics: metrics.clone(),
        retries: Mutex::new(HashMap::new()),
        delivery: delivery::Tracker::default(),
        queue: queue.clone(),
        settings: settings.clone(),
    });

    // Every watch reports its first full listing; nothing is reconciled
    // before all have, or a pass could render without objects not yet seen.
    let mut synced = Vec::new();
    let ns = settings.namespace.as_deref();
    let instance_store = {
        let ar = ctx.resources.instance.clone();
        let writer = Writer::new(ar.clone());
        let reader = writer.as_reader();
        let statuses = catalog.clone();
        let stream = reflector::reflector(
            writer,
            watcher(dyn_api(&client, ns, &ar), watcher::Config::default())
                .default_backoff()
                .map_ok(move |event| event.modify(|o| statuses.take_instance_status(o))),
        );
        synced.push(feed(stream, Kind::Instance, &ctx, catalog::custom_item));
        reader
    };
    for kind in [Kind::Binding, Kind::Marketplace, Kind::Mcp] {
        let api = dyn_api(&client, ns, ctx.resources.of(kind));
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .map_ok(|event| event.modify(catalog::slim));
        synced.push(feed(stream, kind, &ctx, catalog::custom_item));
    }
    let secrets = watcher(
        api::<Secret>(&client, ns),
        watcher::Config::default().labels(&format!("{}=true", crate::crd::SECRETS_LABEL)),
    )
    .default_backoff();
    synced.push(feed(secrets, Kind::Secret, &ctx, catalog::secret_item));
    let pods = watcher(
        api::<Pod>(&client, ns),
        watcher::Config::default().labels(catalog::INSTANCE_LABEL),
    )
    .default_backoff();
    synced.push(feed(pods, Kind::Pod, &ctx, catalog::pod_item));
    synced.push(watch_sidecar_secrets(&ctx));
    synced.push(watch_builtin(&ctx));

    let mut stop = stop_rx.clone();
    tokio::select! {
        _ = future::join_all(synced) => {}
        _ = stop.wait_for(|s| *s) => return finish(server).await,
    }
    ready.store(true, Ordering::Release);
    info!(
        instances = catalog.instances().len(),
        "every watch has synced"
    );

    let mut elector = lease::Elector::new(
        client.clone(),
        &settings.operator_namespace,
        &settings.lease_name,
        &settings.identity,
        lease::Timings::from_duration(settings.lease_duration),
    );
    info!(lease = %settings.lease_name, identity = %settings.identity, "waiting to lead");
    if !elector.acquire(&mut stop).await {
        return finish(server).await;
    }
    info!(lease = %settings.lease_name, "leading: reconciling");

    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel();
    let _fswatch = FsWatch::start(&[], None, &settings.env_root, fs_tx)?;
    {
        let catalog = catalog.clone();
        let queue = queue.clone();
        tokio::spawn(async move {
            while let Some(change) = fs_rx.recv().await {
                if let Change::EnvPath(rel) = change {
                    for key in catalog.instances_at(&rel) {
                        let _ = queue.send(key);
                    }
                }
            }
        });
    }
    for key in catalog.instances() {
        let _ = queue.send(key);
    }
    tokio::spawn(object_status_loop(ctx.clone(), stop_rx.clone()));

    let ar = ctx.resources.instance.clone();
    let refs = tokio_stream_from(queued).map(move |key: ObjectKey| {
        ObjectRef::new_with(&key.name, ar.clone()).within(&key.namespace)
    });
    let controller = Controller::for_stream_with(
        futures::stream::pending(),
        instance_store,
        ctx.resources.instance.clone(),
    )
    .with_config(ControllerConfig::default().concurrency(settings.concurrency as u16))
    .reconcile_on(refs)
    .graceful_shutdown_on(stopped(stop_rx.clone()))
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|r| {
        if let Err(e) = r {
            match e {
                kube::runtime::controller::Error::ObjectNotFound(r) => {
                    debug!(object = %r, "a reconcile was asked for an instance the controller's store does not hold");
                }
                e => warn!(error = %crate::error_chain(&e), "reconcile failed"),
            }
        }
        future::ready(())
    });
    let lost = tokio::select! {
        () = controller => false,
        () = elector.hold() => true,
    };
    if lost {
        return Err(RunError::LeaseLost(settings.lease_name.clone()));
    }
    elector.release().await;
    finish(server).await
}

async fn finish(
    server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
) -> Result<(), RunError> {
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Feeds one watch into the catalog and queues what it affects; the
/// returned receiver fires at the first complete listing.
fn feed<K, S>(
    stream: S,
    kind: Kind,
    ctx: &Arc<Ctx>,
    convert: fn(&K) -> Option<(ObjectKey, catalog::Item)>,
) -> oneshot::Receiver<()>
where
    K: Send + 'static,
    S: futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut stream = std::pin::pin!(stream);
        let mut handoff = Handoff::default();
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    let done = matches!(event, watcher::Event::InitDone);
                    let affected = ctx.catalog.on_event(kind, &event, convert);
                    let queued = handoff.pass(kind, &event, affected);
                    if !queued.is_empty() {
                        let keys: Vec<String> = queued.iter().map(ToString::to_string).collect();
                        debug!(kind = kind.name(), instances = %keys.join(","), "queued by a watch event");
                    } else if let watcher::Event::Apply(obj) | watcher::Event::Delete(obj) = &event
                        && tracing::enabled!(tracing::Level::DEBUG)
                        && let Some((key, _)) = convert(obj)
                    {
                        // Says the event came: an object whose instances the
                        // catalog does not know (yet) queues nothing.
                        debug!(kind = kind.name(), object = %key, "a watch event affects no instance");
                    }
                    for key in queued {
                        let _ = ctx.queue.send(key);
                    }
                    if done && let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Err(e) => warn!(kind = kind.name(), error = %e, "watch error; retrying"),
            }
        }
    });
    rx
}

/// Hands on the instances a watch event affects when the controller can
/// act on them. While the instances are listed again (after a watch broke),
/// the controller's store keeps the old listing until the new one is
/// complete, and a reconcile asked for an instance it does not hold yet is
/// dropped: what a relisting of instances affects waits for its end.
#[derive(Default)]
struct Handoff {
    held: Option<Vec<ObjectKey>>,
}

impl Handoff {
    fn pass<K>(
        &mut self,
        kind: Kind,
        event: &watcher::Event<K>,
        affected: Vec<ObjectKey>,
    ) -> Vec<ObjectKey> {
        // A listing broken off and started again keeps what it held: the
        // catalog took those objects already and will not report them twice.
        if kind == Kind::Instance && matches!(event, watcher::Event::Init) {
            self.held.get_or_insert_with(Vec::new);
        }
        match &mut self.held {
            Some(keys) if !matches!(event, watcher::Event::InitDone) => {
                keys.extend(affected);
                Vec::new()
            }
            _ => {
                let mut keys = self.held.take().unwrap_or_default();
                keys.extend(affected);
                keys
            }
        }
    }
}

/// Watches the render and report Secrets of sidecar instances: a report
/// changes an instance's status (and maybe its installed set), a render
/// edited or deleted by hand is published again.
fn watch_sidecar_secrets(ctx: &Arc<Ctx>) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let ctx = ctx.clone();
    let stream = watcher(
        api::<Secret>(&ctx.client, ctx.settings.namespace.as_deref()),
        watcher::Config::default().labels(delivery::SIDECAR_LABEL),
    )
    .default_backoff();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    for key in ctx.delivery.on_event(&event) {
                        let _ = ctx.queue.send(key);
                    }
                    if matches!(event, watcher::Event::InitDone)
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(());
                    }
                }
                Err(e) => warn!(error = %e, "sidecar Secret watch error; retrying"),
            }
        }
    });
    rx
}

/// Watches the builtin ConfigMap; a change re-renders every instance.
fn watch_builtin(ctx: &Arc<Ctx>) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let ctx = ctx.clone();
    let s = &ctx.settings;
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), &s.operator_namespace);
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", s.config_map));
    let stream = watcher(api, wc).default_backoff();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut stream = std::pin::pin!(stream);
        let mut seen = false;
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, "builtin ConfigMap watch error; retrying");
                    continue;
                }
            };
            match event {
                watcher::Event::Init => seen = false,
                watcher::Event::Apply(cm) | watcher::Event::InitApply(cm) => {
                    seen = true;
                    ctx.set_builtin(Some(&cm));
                }
                watcher::Event::Delete(_) => ctx.set_builtin(None),
                watcher::Event::InitDone => {
                    if !seen {
                        ctx.set_builtin(None);
                    }
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        }
    });
    rx
}

impl Ctx {
    fn engine(&self) -> Arc<Engine> {
        self.engine.read().expect("engine lock").clone()
    }

    /// Takes a new builtin layer (an absent ConfigMap is an empty layer).
    /// A broken one keeps the last good layer in use; with none yet,
    /// instances are held back rather than rendered without their builtins.
    fn set_builtin(&self, cm: Option<&ConfigMap>) {
        let name = format!(
            "ConfigMap {}/{}",
            self.settings.operator_namespace, self.settings.config_map
        );
        let parsed = match cm {
            None => Ok(Builtin::default()),
            Some(cm) => {
                let data = cm.data.clone().unwrap_or_default();
                Builtin::from_files(data.iter().map(|(k, v)| (k.as_str(), v.as_bytes())))
                    .map_err(|e| format!("{name}: {}", crate::error_chain(&e)))
            }
        };
        match parsed {
            Ok(b) => {
                let engine = self.engine().with_builtin(b);
                *self.engine.write().expect("engine lock") = Arc::new(engine);
                *self.builtin_error.write().expect("builtin lock") = None;
                self.builtin_loaded.store(true, Ordering::Release);
                info!(configmap = %name, present = cm.is_some(), "builtin layer loaded");
            }
            Err(e) => {
                error!(error = %e, "builtin layer not usable");
                if !self.builtin_loaded.load(Ordering::Acquire) {
                    *self.builtin_error.write().expect("builtin lock") = Some(e);
                } else {
                    return;
                }
            }
        }
        for key in self.catalog.instances() {
            let _ = self.queue.send(key);
        }
    }

    fn api_err(
        key: &ObjectKey,
        action: &'static str,
    ) -> impl FnOnce(kube::Error) -> ReconcileError {
        let key = key.clone();
        move |source| ReconcileError::Api {
            key,
            action,
            source,
        }
    }

    fn instances(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &self.resources.instance)
    }

    /// Adds or drops the finalizer so it is there exactly when the env dir
    /// must be removed with the instance.
    async fn sync_finalizer(
        &self,
        obj: &DynamicObject,
        key: &ObjectKey,
        inst: &AgentInstance,
    ) -> Result<(), ReconcileError> {
        let want = inst
            .spec
            .env_dir
            .as_ref()
            .is_some_and(|e| e.deletion_policy == DeletionPolicy::Delete);
        let has = obj.finalizers().iter().any(|f| f == FINALIZER);
        if want == has {
            return Ok(());
        }
        let mut finalizers: Vec<String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        if want {
            finalizers.push(FINALIZER.to_owned());
        }
        self.patch_finalizers(obj, key, finalizers).await
    }

    async fn patch_finalizers(
        &self,
        obj: &DynamicObject,
        key: &ObjectKey,
        finalizers: Vec<String>,
    ) -> Result<(), ReconcileError> {
        // The resourceVersion makes this fail rather than drop a finalizer
        // someone else added meanwhile.
        let patch = serde_json::json!({"metadata": {
            "finalizers": finalizers,
            "resourceVersion": obj.resource_version(),
        }});
        self.instances(&key.namespace)
            .patch(&key.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(Self::api_err(key, "updating the finalizers"))?;
        Ok(())
    }

    /// The instance is being deleted: with `deletionPolicy: Delete`, its env
    /// dir and state go, then the finalizer.
    async fn finalize(
        &self,
        obj: &DynamicObject,
        key: &ObjectKey,
    ) -> Result<Action, ReconcileError> {
        if !obj.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        let engine = self.engine();
        let snapshot = self.catalog.snapshot_for(key).map(|(s, _)| s);
        let inst = snapshot.as_ref().and_then(|s| s.instances.get(key));
        let path = inst
            .filter(|i| i.spec.delivery_mode() == DeliveryMode::Volume)
            .map(|i| crate::engine::snapshot::env_path(key, i));
        let shared = snapshot.as_ref().is_some_and(|s| s.instances.len() > 1);
        match path {
            Some(rel) if !shared => {
                let removed = engine.root().remove_instance(&rel);
                match removed {
                    Ok(_) => {
                        if let Err(e) = engine.store().forget_instance(key).await {
                            warn!(instance = %key, error = %crate::error_chain(&e), "cannot forget the instance's state");
                        }
                        info!(instance = %key, env_dir = %rel, "env dir removed (deletionPolicy Delete)");
                    }
                    Err(e) => {
                        warn!(instance = %key, error = %crate::error_chain(&e), "cannot remove the env dir; retrying");
                        return Ok(Action::requeue(Duration::from_secs(5)));
                    }
                }
            }
            // Unreadable, or another instance uses the same dir: the dir
            // stays; deleting the object must not hang on it.
            _ => {
                warn!(instance = %key, "env dir kept: the instance cannot be read or its dir is shared")
            }
        }
        let rest: Vec<String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        self.patch_finalizers(obj, key, rest).await?;
        Ok(Action::await_change())
    }

    /// Writes the boot marker naming the instance's current pods, when it
    /// does not already say exactly that.
    fn mark_booted(&self, inst: &AgentInstance, key: &ObjectKey, outcome: &Outcome) {
        let mut pods: Vec<String> = self
            .catalog
            .pods_of(key)
            .into_iter()
            .filter(|p| !p.terminating)
            .map(|p| p.uid)
            .collect();
        pods.sort();
        let marker = Marker {
            pods,
            content_hash: outcome.content_hash.clone().unwrap_or_default(),
        };
        let engine = self.engine();
        let rel = crate::engine::snapshot::env_path(key, inst);
        let owner = inst
            .spec
            .env_dir
            .as_ref()
            .map_or(Owner::default(), |e| Owner {
                uid: e.uid,
                gid: e.gid,
            });
        // Read and written through the env dir's handle: the agent can put a
        // symlink, a FIFO or a huge file where the marker belongs.
        let written = engine
            .root()
            .instance(&rel, false, owner)
            .and_then(|d| match d {
                Some(d) => {
                    let current = crate::handshake::read_in(&d);
                    if current.as_ref() == Some(&marker)
                        || (current.is_none() && marker.pods.is_empty())
                    {
                        return Ok(false);
                    }
                    d.put(BOOT_MARKER, &marker.to_bytes(), 0o644, owner)
                        .map(|()| true)
                }
                None => Ok(false),
            });
        match written {
            Ok(false) => {}
            Ok(true) => info!(instance = %key, pods = marker.pods.len(), "boot marker written"),
            Err(e) => {
                warn!(instance = %key, error = %crate::error_chain(&e), "cannot write the boot marker")
            }
        }
    }

    /// Takes the installed set the instance's sidecars reported last into
    /// the store, so the render published next carries it.
    async fn take_reported_installs(
        &self,
        engine: &Engine,
        key: &ObjectKey,
    ) -> Result<(), ReconcileError> {
        let seen = self.delivery.seen(key);
        let Some((at, installed)) = delivery::newest_installed(&seen.reports, seen.ingested) else {
            return Ok(());
        };
        let store = engine.store();
        let mut state = store
            .load(key)
            .await
            .map_err(crate::engine::EngineError::from)?;
        if state.installed != installed {
            state.installed = installed;
            let audit = crate::state::AuditRecord {
                at: crate::time::now(),
                outcome: "InstallsReported".into(),
                content_hash: None,
                changed: Vec::new(),
                drift: Vec::new(),
                adopted: Vec::new(),
                message: "installed set taken from the sidecars' newest report".into(),
                repeats: 1,
                last_at: None,
            };
            store
                .save(key, &state, &audit)
                .await
                .map_err(crate::engine::EngineError::from)?;
            info!(instance = %key, "installed set taken from the sidecars' report");
        }
        self.delivery.update(key, |s| s.ingested = Some(at));
        Ok(())
    }

    /// Publishes a sidecar instance's render and sums up its pods; restarts
    /// the workload when the declared config changed (`restart.onChange`).
    async fn deliver(
        &self,
        obj: &DynamicObject,
        key: &ObjectKey,
        inst: &AgentInstance,
        outcome: &Outcome,
    ) -> Result<(crate::crd::SidecarStatus, Option<&'static str>), ReconcileError> {
        let owner = obj
            .controller_owner_ref(&self.resources.instance)
            .expect("a served object has a name and UID");
        let sa = inst
            .spec
            .delivery
            .as_ref()
            .and_then(|d| d.service_account_name.clone())
            .unwrap_or_default();
        let suspended;
        let render = match (&outcome.published, outcome.reason) {
            (Some(render), _) => Some(render),
            (None, reason::SUSPENDED) => {
                // The sidecars stop writing too.
                let p = crate::engine::published::Published::new(
                    key,
                    &Default::default(),
                    Default::default(),
                    inst.spec.runtime_installs,
                    true,
                    Owner::default(),
                );
                let bytes = p.to_bytes();
                suspended = crate::engine::PublishedRender {
                    digest: crate::engine::published::digest(&bytes),
                    bytes,
                    // Not a config change: nothing to restart for.
                    declared_digest: self.delivery.seen(key).declared_digest.unwrap_or_default(),
                };
                Some(&suspended)
            }
            // Not published (held back): the last good render stays.
            (None, _) => None,
        };
        let mut restart = None;
        if let Some(render) = render {
            let done =
                delivery::publish(&self.client, &self.delivery, key, &owner, &sa, render).await?;
            if done.written {
                info!(instance = %key, digest = %render.digest, "render published for the sidecars");
            }
            // The sidecars rewrite the files in place; what the agent loaded
            // at start (its MCP servers) needs a restart, as with a volume.
            let policy = inst.spec.restart.clone().unwrap_or_default();
            if done.declared_changed && policy.on_change {
                restart = self.request_restart(inst, outcome, restart::Why::ConfigChanged);
            }
        }
        let seen = self.delivery.seen(key);
        let pods = self.catalog.pods_of(key);
        let stale = delivery::stale_reports(&pods, &seen.reports, crate::time::now());
        if !stale.is_empty() {
            delivery::prune(&self.client, key, &stale).await?;
        }
        let digest = seen.render_digest.unwrap_or_default();
        Ok((delivery::status(&digest, &pods, &seen.reports), restart))
    }

    /// Asks for a restart when the pass changed what the agent runs with
    /// (`onChange`) or put drift back (`onDrift`). Not on the first render:
    /// a new agent boots with it.
    fn restart(&self, inst: &AgentInstance, outcome: &Outcome) -> Option<&'static str> {
        if outcome.first_render {
            return None;
        }
        let policy = inst.spec.restart.clone().unwrap_or_default();
        let why = restart::decide(&policy, outcome)?;
        self.request_restart(inst, outcome, why)
    }

    /// Asks the restarter to restart the instance's workload, if it names one.
    fn request_restart(
        &self,
        inst: &AgentInstance,
        outcome: &Outcome,
        why: restart::Why,
    ) -> Option<&'static str> {
        let workload = inst.spec.workload.clone()?;
        let policy = inst.spec.restart.clone().unwrap_or_default();
        let why = why.reason();
        let target = Target {
            key: outcome.key.clone(),
            agent_type: outcome.agent_type.clone(),
            env_dir: self
                .settings
                .env_root
                .join(&outcome.env_dir)
                .display()
                .to_string(),
            workload: Some(workload),
            strategy: policy.strategy,
        };
        self.restarter
            .request(target, restart::min_interval(&policy), why.to_owned());
        Some(why)
    }

    /// When to pass the instance again, counting retries.
    fn next_pass(&self, outcome: &Outcome) -> Action {
        let mut retries = self.retries.lock().expect("retries lock");
        match outcome.reason {
            reason::FILE_BUSY => {
                *retries.entry(outcome.key.clone()).or_default() += 1;
                Action::requeue(BUSY_RETRY)
            }
            reason::WRITE_FAILED | reason::STATE_FAILED => {
                let n = retries.entry(outcome.key.clone()).or_default();
                *n += 1;
                Action::requeue(io_retry_delay(*n))
            }
            _ => {
                retries.remove(&outcome.key);
                Action::requeue(self.settings.resync)
            }
        }
    }

    /// Writes an object's status: by server-side apply, or, where that
    /// cannot do it, by replacing the status as a whole with a JSON patch.
    async fn patch_status<S: serde::Serialize>(
        &self,
        ar: &ApiResource,
        key: &ObjectKey,
        previous: &S,
        status: &S,
    ) -> Result<(), kube::Error> {
        let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &key.namespace, ar);
        let status = serde_json::to_value(status).expect("statuses serialize");
        if !leaves_behind(
            &serde_json::to_value(previous).expect("statuses serialize"),
            &status,
        ) {
            let body = serde_json::json!({
                "apiVersion": ar.api_version,
                "kind": ar.kind,
                "status": status,
            });
            let applied = api
                .patch_status(
                    &key.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await;
            match applied {
                // Server-side apply types the stored object first. One
                // stored under an older or looser CRD, whose spec no longer
                // fits the schema, cannot be typed, and its status could
                // never say why it is refused.
                Err(kube::Error::Api(e))
                    if e.code == 500 && e.message.contains("typed live object") => {}
                other => return other.map(|_| ()),
            }
        }
        // A JSON patch needs no typing and owns nothing: it replaces the
        // status as a whole, which is what the apply would have done.
        let replace: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "add", "path": "/status", "value": status}
        ]))
        .expect("a JSON patch");
        api.patch_status(
            &key.name,
            &PatchParams::default(),
            &Patch::<()>::Json(replace),
        )
        .await
        .map(|_| ())
    }
}

/// Whether server-side apply of `new` could leave a field of `previous` in
/// place: apply removes only fields its own manager set, and a status once
/// written by the JSON patch above is owned by no apply. Then the status is
/// replaced instead, or the stale field would make every later pass see a
/// status that differs from its own and write it again.
fn leaves_behind(previous: &serde_json::Value, new: &serde_json::Value) -> bool {
    previous
        .as_object()
        .is_some_and(|p| p.keys().any(|k| new.get(k).is_none()))
}

#[instrument(skip_all, fields(instance = %ObjectKey::new(obj.namespace().unwrap_or_default(), obj.name_any())))]
async fn reconcile(obj: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, ReconcileError> {
    let key = ObjectKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
    if obj.metadata.deletion_timestamp.is_some() {
        return ctx.finalize(&obj, &key).await;
    }
    let Some((snapshot, secrets_seen)) = ctx.catalog.snapshot_for(&key) else {
        return Ok(Action::await_change());
    };
    debug!(
        objects =
            snapshot.bindings.len() + snapshot.marketplaces.len() + snapshot.mcp_servers.len(),
        "reconciling"
    );
    let inst = snapshot.instances.get(&key).cloned();
    if let Some(inst) = &inst {
        ctx.sync_finalizer(&obj, &key, inst).await?;
    }
    let engine = ctx.engine();
    let sidecar = inst
        .as_ref()
        .is_some_and(|i| i.spec.delivery_mode() == DeliveryMode::Sidecar);
    if sidecar {
        ctx.take_reported_installs(&engine, &key).await?;
    } else if ctx.delivery.seen(&key).any() {
        delivery::retract(&ctx.client, &ctx.delivery, &key).await?;
        info!(instance = %key, "sidecar delivery ended: render, report and grant removed");
    }
    let builtin_error = ctx.builtin_error.read().expect("builtin lock").clone();
    let outcome = match builtin_error {
        Some(e) => {
            let agent_type = inst.as_ref().map_or("", |i| i.spec.agent_type.as_str());
            Outcome::new(&key, agent_type, String::new()).fail(
                reason::INVALID_OBJECT,
                format!("held back until the builtin layer can be read: {e}"),
            )
        }
        None => {
            let attempts = ctx
                .retries
                .lock()
                .expect("retries lock")
                .get(&key)
                .copied()
                .unwrap_or(0);
            let opts = PassOptions {
                mode: Mode::Apply,
                only: Some(HashSet::from([key.clone()])),
                defer_corrupt: attempts < BUSY_ATTEMPTS,
                progress: None,
                publish_sidecars: true,
                entry_sources: true,
            };
            let secrets: Arc<dyn SecretProvider> = Arc::new(Chain(vec![
                Arc::new(snapshot.secrets.clone()),
                Arc::new(StoreSecrets::new(engine.store().clone())),
            ]));
            let snapshot = Arc::new(snapshot);
            let outcomes = engine.pass_with(&snapshot, &secrets, &opts).await?;
            let Some(o) = outcomes.into_iter().find(|o| o.key == key) else {
                return Ok(Action::await_change());
            };
            o
        }
    };
    ctx.metrics.record(&outcome);
    if ctx
        .catalog
        .record_secret_refs(&key, outcome.secret_refs.clone(), secrets_seen)
    {
        let _ = ctx.queue.send(key.clone());
    }
    let action = ctx.next_pass(&outcome);

    let (seen_version, previous) = ctx.catalog.instance_status(&key);
    let (sidecar_status, mut restart) = match &inst {
        Some(inst) if sidecar => {
            let (status, restart) = ctx.deliver(&obj, &key, inst, &outcome).await?;
            (Some(status), restart)
        }
        _ => (None, None),
    };
    if let Some(inst) = &inst
        && outcome.ready
        && outcome.reason != reason::SUSPENDED
        && !sidecar
    {
        ctx.mark_booted(inst, &key, &outcome);
        restart = ctx.restart(inst, &outcome);
    }
    if !outcome.ready || outcome.reason == reason::RENDERED {
        info!(reason = outcome.reason, message = %outcome.used_secrets.mask(&outcome.message), "reconciled");
    } else {
        debug!(reason = outcome.reason, "reconciled");
    }
    let report = InstanceReport {
        generation: obj.metadata.generation,
        previous: &previous,
        outcome: &outcome,
        restart,
        requested_at: obj.annotations().get(REQUESTED_AT).map(String::as_str),
        now: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::time::now()),
        sidecar: sidecar_status.as_ref(),
    };
    let new = status::instance_status(&report);
    if new != previous {
        ctx.patch_status(&ctx.resources.instance, &key, &previous, &new)
            .await
            .map_err(Ctx::api_err(&key, "patching the status"))?;
        ctx.catalog
            .wrote_instance_status(&key, seen_version.as_deref(), &new);
    }
    let reference = obj.object_ref(&ctx.resources.instance);
    for note in status::instance_events(&report) {
        let event = Event {
            type_: note.event_type(),
            reason: note.reason.clone(),
            note: Some(truncate(&note.note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        ctx.events.send(event, reference.clone());
    }
    Ok(action)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn error_policy(_obj: Arc<DynamicObject>, e: &ReconcileError, _ctx: Arc<Ctx>) -> Action {
    warn!(error = %crate::error_chain(e), "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Longest an object's status waits while changes go on.
pub const OBJECT_STATUS_MAX_DELAY: Duration = Duration::from_secs(10);

/// Keeps the status of bindings, marketplaces and MCP servers current: how
/// many instances each applies to, conflicts, validity. Runs once changes
/// pause for a second, at least every [`OBJECT_STATUS_MAX_DELAY`] while they
/// go on (a fleet being created changes every type-scope object's count
/// with each instance: written every second, that is a status write per
/// object per second for as long as the creation lasts), and at every resync.
async fn object_status_loop(ctx: Arc<Ctx>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut last_full = tokio::time::Instant::now();
    // The change count written up to, and the one seen at the last tick.
    let (mut written, mut last_tick) = (u64::MAX, u64::MAX);
    let mut pending_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let changes = ctx.catalog.changes();
        if changes == written {
            pending_since = tokio::time::Instant::now();
        }
        let quiet = changes == last_tick;
        last_tick = changes;
        let due = last_full.elapsed() >= ctx.settings.resync;
        let pending =
            changes != written && (quiet || pending_since.elapsed() >= OBJECT_STATUS_MAX_DELAY);
        if !pending && !due {
            continue;
        }
        last_full = tokio::time::Instant::now();
        written = changes;
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(crate::time::now());
        for report in ctx.catalog.object_statuses() {
            let new = status::object_status(&report, &report.status, &now);
            if new == report.status {
                continue;
            }
            let ar = ctx.resources.of(report.kind);
            if let Err(e) = ctx
                .patch_status(ar, &report.key, &report.status, &new)
                .await
            {
                warn!(kind = report.kind.name(), object = %report.key, error = %e, "cannot patch the status");
                // Tried again at the next tick.
                written = u64::MAX;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<ObjectKey> {
        names.iter().map(|n| ObjectKey::new("team-a", *n)).collect()
    }

    #[test]
    fn what_a_relisting_of_instances_affects_waits_for_its_end() {
        type E = watcher::Event<()>;
        let mut h = Handoff::default();
        assert_eq!(
            h.pass(Kind::Instance, &E::Apply(()), keys(&["a"])),
            keys(&["a"])
        );
        assert!(h.pass(Kind::Instance, &E::Init, vec![]).is_empty());
        assert!(
            h.pass(Kind::Instance, &E::InitApply(()), keys(&["b"]))
                .is_empty()
        );
        // The listing breaks off and starts again.
        assert!(h.pass(Kind::Instance, &E::Init, vec![]).is_empty());
        assert!(
            h.pass(Kind::Instance, &E::InitApply(()), keys(&["c"]))
                .is_empty()
        );
        assert_eq!(
            h.pass(Kind::Instance, &E::InitDone, keys(&["d"])),
            keys(&["b", "c", "d"])
        );
        assert_eq!(
            h.pass(Kind::Instance, &E::Apply(()), keys(&["e"])),
            keys(&["e"])
        );
        // The other kinds' listings hold nothing back: the instances they
        // affect are in the controller's store already.
        let mut h = Handoff::default();
        assert!(h.pass(Kind::Mcp, &E::Init, vec![]).is_empty());
        assert_eq!(
            h.pass(Kind::Mcp, &E::InitApply(()), keys(&["f"])),
            keys(&["f"])
        );
    }
}
