//! Front end 3, `agent-env sidecar`: runs in an agent's pod (a native
//! sidecar) and keeps that pod's env dir, on a pod-local volume, at the
//! render the controller published for its instance.
//!
//! It resolves nothing: the controller resolved the layers and filled the
//! secrets. It watches its render Secret through the API, applies it with
//! the engine's apply step (the merge, the atomic writes, the hostile
//! directory refusals, the drift and runtime-install rules of every mode),
//! corrects drift as soon as the local filesystem watch reports a write,
//! and reports what it applied and which runtime installs it adopted into
//! its instance's report Secret. `/readyz` answers 200 once the first render
//! is on disk: the pod's startup probe, so the agent starts on a current config.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::cluster::delivery::{render_secret, report_secret};
use crate::engine::fswatch::{Change, FsWatch, WatchError};
use crate::engine::published::{self, DATA_KEY, PodReport, Published};
use crate::engine::retry::{BUSY_ATTEMPTS, BUSY_RETRY, io_retry_delay};
use crate::engine::snapshot::ObjectKey;
use crate::engine::{Engine, EngineError, Mode, Outcome, PassOptions, reason};
use crate::metrics::Metrics;

/// Reason reported while the render Secret does not exist.
pub const RENDER_MISSING: &str = "RenderMissing";
/// Reason reported while the render Secret cannot be used.
pub const INVALID_RENDER: &str = "InvalidRender";

/// How the sidecar runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The instance (namespace: the pod's).
    pub instance: ObjectKey,
    /// This pod's name: its key in the report Secret.
    pub pod_name: String,
    /// This pod's UID.
    pub pod_uid: String,
    /// The env dir, relative to the engine's env root (the pod-local volume).
    pub env_dir: String,
    /// The env root, for the filesystem watch.
    pub env_root: PathBuf,
    /// A full pass this often, besides the watch.
    pub resync: Duration,
    /// Where `/readyz`, `/healthz` and `/metrics` are served.
    pub probe_addr: Option<SocketAddr>,
}

/// The sidecar could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The probe endpoint could not bind.
    #[error("cannot serve the probes on {addr}")]
    Probe {
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
    /// The state store failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The render Secret as the watch last showed it.
enum RenderEvent {
    Present(Box<Secret>),
    Absent,
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(
    settings: Settings,
    engine: Engine,
    client: kube::Client,
    metrics: Arc<Metrics>,
) -> Result<(), SidecarError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(SidecarError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(SidecarError::Signals)?;
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = settings.probe_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| SidecarError::Probe { addr, source })?;
        let mut rx = stop_rx.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics.clone(),
            ready.clone(),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
    }

    let (render_tx, mut render_rx) = mpsc::unbounded_channel();
    tokio::spawn(watch_render(
        client.clone(),
        settings.instance.clone(),
        render_tx,
    ));
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel();
    let _fswatch = FsWatch::start(&[], None, &settings.env_root, fs_tx)?;

    let reports = Api::<Secret>::namespaced(client, &settings.instance.namespace);
    let mut sidecar = Sidecar {
        settings,
        engine,
        reports,
        metrics,
        ready,
        render: None,
        applied: None,
        sent: None,
        attempts: 0,
    };
    info!(instance = %sidecar.settings.instance, env_dir = %sidecar.settings.env_dir, "sidecar started; waiting for the render");
    let far = Duration::from_secs(3600 * 24 * 365);
    let mut next_full = Instant::now() + far;
    let mut retry_at: Option<Instant> = None;
    loop {
        let retry_sleep = tokio::time::sleep_until(retry_at.unwrap_or(Instant::now() + far));
        let full_sleep = tokio::time::sleep_until(next_full);
        let full = tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            event = render_rx.recv() => {
                let Some(event) = event else { break };
                sidecar.take_render(event);
                true
            }
            change = fs_rx.recv() => {
                let Some(change) = change else { break };
                if !matches!(change, Change::EnvPath(_)) {
                    continue;
                }
                // Everything else the watch sees: whatever is queued comes along.
                while fs_rx.try_recv().is_ok() {}
                false
            }
            () = retry_sleep => false,
            () = full_sleep => true,
        };
        retry_at = sidecar.pass(full).await?.map(|d| Instant::now() + d);
        if full {
            next_full = Instant::now() + sidecar.settings.resync;
        }
    }
    let _ = stop_tx.send(true);
    Ok(())
}

/// Watches the one render Secret of the instance, by name: the only Secret
/// this pod's ServiceAccount may read.
async fn watch_render(
    client: kube::Client,
    instance: ObjectKey,
    tx: mpsc::UnboundedSender<RenderEvent>,
) {
    let name = render_secret(&instance.name);
    let api = Api::<Secret>::namespaced(client, &instance.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = std::pin::pin!(watcher(api, config).default_backoff());
    let mut seen = false;
    while let Some(event) = stream.next().await {
        let sent = match event {
            Ok(watcher::Event::Init) => {
                seen = false;
                Ok(())
            }
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => {
                seen = true;
                tx.send(RenderEvent::Present(Box::new(s)))
            }
            Ok(watcher::Event::Delete(_)) => tx.send(RenderEvent::Absent),
            Ok(watcher::Event::InitDone) if !seen => tx.send(RenderEvent::Absent),
            Ok(watcher::Event::InitDone) => Ok(()),
            Err(e) => {
                warn!(secret = %name, error = %crate::error_chain(&e),
                    "cannot watch the render Secret (is spec.delivery.serviceAccountName this pod's ServiceAccount?); retrying");
                Ok(())
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// Why there is no render to apply: a reason and a message.
type Unusable = (&'static str, String);

struct Sidecar {
    settings: Settings,
    engine: Engine,
    reports: Api<Secret>,
    metrics: Arc<Metrics>,
    /// First-render readiness (`/readyz`).
    ready: Arc<AtomicBool>,
    /// The render to apply and its digest, or why there is none.
    render: Option<Result<(Published, String), Unusable>>,
    /// Digest of the render the env dir holds.
    applied: Option<String>,
    /// The report last written.
    sent: Option<PodReport>,
    /// Consecutive passes that are retried.
    attempts: u32,
}

impl Sidecar {
    fn take_render(&mut self, event: RenderEvent) {
        let name = render_secret(&self.settings.instance.name);
        let render = match event {
            RenderEvent::Absent => Err((
                RENDER_MISSING,
                format!(
                    "Secret {}/{name} does not exist: the controller publishes it for an \
                     AgentInstance with delivery.mode Sidecar; the env dir keeps what it holds",
                    self.settings.instance.namespace
                ),
            )),
            RenderEvent::Present(secret) => {
                let bytes = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(DATA_KEY))
                    .map(|b| b.0.as_slice());
                let parsed = bytes
                    .ok_or(published::PublishedError::Missing)
                    .and_then(|b| Ok((Published::parse(b)?, published::digest(b))))
                    .and_then(|(p, digest)| {
                        if p.key() == self.settings.instance {
                            Ok((p, digest))
                        } else {
                            Err(published::PublishedError::Instance {
                                expected: self.settings.instance.clone(),
                                found: p.key(),
                            })
                        }
                    });
                parsed.map_err(|e| {
                    (
                        INVALID_RENDER,
                        format!(
                            "Secret {}/{name}: {}; the env dir keeps what it holds",
                            self.settings.instance.namespace,
                            crate::error_chain(&e)
                        ),
                    )
                })
            }
        };
        match &render {
            Ok((_, digest)) => info!(digest = %digest, "render received"),
            Err((why, message)) => error!(reason = why, "{message}"),
        }
        self.render = Some(render);
    }

    /// Applies the render (when there is one) and reports; returns when to
    /// try again if the pass must be retried.
    async fn pass(&mut self, full: bool) -> Result<Option<Duration>, SidecarError> {
        let outcome = match &self.render {
            None => return Ok(None),
            Some(Err((why, message))) => {
                let mut o =
                    Outcome::new(&self.settings.instance, "", self.settings.env_dir.clone());
                o.reason = why;
                o.message = message.clone();
                o
            }
            Some(Ok((published, digest))) => {
                let opts = PassOptions {
                    mode: Mode::Apply,
                    // Only full passes sweep temp files a killed write left.
                    only: (!full).then(HashSet::new),
                    defer_corrupt: self.attempts < BUSY_ATTEMPTS,
                    progress: None,
                    publish_sidecars: false,
                    entry_sources: true,
                };
                let o = self
                    .engine
                    .apply_published(published, &self.settings.env_dir, &opts)
                    .await?;
                if o.ready {
                    self.applied = Some(digest.clone());
                    if !self.ready.swap(true, Ordering::AcqRel) {
                        info!(digest = %digest, "first render on disk: ready");
                    }
                }
                o
            }
        };
        self.metrics.record(&outcome);
        let retry = match outcome.reason {
            reason::FILE_BUSY => Some(BUSY_RETRY),
            reason::WRITE_FAILED | reason::STATE_FAILED => Some(io_retry_delay(self.attempts + 1)),
            _ => None,
        };
        self.attempts = if retry.is_some() {
            self.attempts + 1
        } else {
            0
        };
        if outcome.reason == reason::RENDERED || !outcome.ready {
            info!(reason = outcome.reason, message = %outcome.message, "pass");
        }
        let report_retry = self.report(&outcome).await;
        Ok(retry.or(report_retry))
    }

    /// Writes this pod's report when it says something new; returns when to
    /// try again if it could not be written.
    async fn report(&mut self, outcome: &Outcome) -> Option<Duration> {
        let installed = match self.engine.store().load(&self.settings.instance).await {
            Ok(s) => s.installed,
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "cannot read the installed set to report it");
                return Some(io_retry_delay(1));
            }
        };
        let mut report = PodReport {
            pod_uid: self.settings.pod_uid.clone(),
            render_digest: self.applied.clone(),
            ready: outcome.ready,
            reason: outcome.reason.to_owned(),
            message: outcome.message.clone(),
            installed,
            drift: outcome.drift.clone(),
            at: crate::time::now(),
        };
        if let Some(sent) = &self.sent {
            // Only what the controller acts on is worth an API write: which
            // render the files hold, whether they are fine (and if not, why),
            // and the installed set. A drift correction is none of these: a
            // storm of hand edits must not become a storm of writes (and of
            // status passes) while the files are put back in milliseconds.
            let fine = |r: &PodReport| {
                r.ready && matches!(r.reason.as_str(), reason::RENDERED | reason::UP_TO_DATE)
            };
            let same = sent.render_digest == report.render_digest
                && sent.installed == report.installed
                && ((fine(sent) && fine(&report))
                    || (sent.ready == report.ready
                        && sent.reason == report.reason
                        && sent.message == report.message));
            if same {
                return None;
            }
            if report.drift.is_empty() {
                report.drift = sent.drift.clone();
            }
        }
        let bytes = serde_json::to_vec(&report).expect("a report serializes");
        let patch = serde_json::json!({"data": {
            self.settings.pod_name.clone(): base64::engine::general_purpose::STANDARD.encode(bytes),
        }});
        let name = report_secret(&self.settings.instance.name);
        match self
            .reports
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.sent = Some(report);
                None
            }
            Err(e) => {
                warn!(secret = %name, error = %crate::error_chain(&e),
                    "cannot write this pod's report (the controller creates the Secret; is spec.delivery.serviceAccountName this pod's ServiceAccount?); retrying");
                Some(Duration::from_secs(2))
            }
        }
    }
}
