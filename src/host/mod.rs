//! The continuous loop on a host (`agent-env reconcile` without `--once`):
//! a full pass at start, then passes over exactly the instances a change
//! affects (a manifest edit, an env file written by someone else, an env dir
//! removed), a full pass every resync interval, restarts, and a clean stop
//! on SIGTERM/SIGINT.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::engine::builtin::Builtin;
use crate::engine::fswatch::{Change, FsWatch, WatchError};
use crate::engine::restart::{self, RestartCommand, Restarter, Target, sleep_until};
use crate::engine::retry::{BUSY_ATTEMPTS, BUSY_RETRY, io_retry_delay};
use crate::engine::secrets::{Chain, SecretProvider};
use crate::engine::snapshot::{DigestMemo, InputDigest, ObjectKey, Snapshot};
use crate::engine::{Engine, Mode, Outcome, PassOptions, reason};
use crate::metrics::Metrics;
use crate::state::StoreSecrets;

pub mod kustomize;
pub mod manifest;
pub mod schema;
pub mod yaml;

/// Corrections of one instance within this window that count as a fight.
pub const FIGHT_WINDOW: Duration = Duration::from_secs(60);
/// Corrections within the window before the loop backs off.
pub const FIGHT_THRESHOLD: usize = 3;
/// First and longest wait before correcting a fought-over instance again.
pub const FIGHT_BACKOFF: (Duration, Duration) = (Duration::from_secs(2), Duration::from_secs(300));

/// How the loop runs.
pub struct Settings {
    /// Where the manifests are, and how strictly they are read.
    pub inputs: crate::host::manifest::Inputs,
    /// Builtin config dir.
    pub config: Option<PathBuf>,
    /// The env root (for the watch and `{envDir}`).
    pub env_root: PathBuf,
    /// Full pass period.
    pub resync: Duration,
    /// Restart command and its timeout.
    pub restart: Option<(RestartCommand, Duration)>,
    /// Where to serve `/metrics`.
    pub metrics_addr: Option<SocketAddr>,
}

/// The loop could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The first read of the inputs failed.
    #[error("{0}")]
    Input(String),
    /// The watch could not be set up.
    #[error(transparent)]
    Watch(#[from] WatchError),
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
}

/// Reads the builtin layer and the manifests.
pub fn read_inputs(
    inputs: &crate::host::manifest::Inputs,
    config: Option<&PathBuf>,
    cache: &mut crate::host::manifest::ManifestCache,
) -> Result<(Builtin, Snapshot), String> {
    let builtin =
        Builtin::load(config.map(PathBuf::as_path)).map_err(|e| crate::error_chain(&e))?;
    let snapshot =
        crate::host::manifest::load_cached(inputs, cache).map_err(|e| crate::error_chain(&e))?;
    Ok((builtin, snapshot))
}

/// Someone keeps rewriting an instance's declared entries.
#[derive(Default)]
struct Fight {
    corrections: VecDeque<Instant>,
    backoff: Duration,
    until: Option<Instant>,
}

struct Loop {
    settings: Settings,
    engine: Engine,
    snapshot: Arc<Snapshot>,
    /// Checked documents per manifest file: a reload re-checks changed files only.
    manifests: crate::host::manifest::ManifestCache,
    digests: HashMap<ObjectKey, InputDigest>,
    /// Digests of the current snapshot's objects, for the next reload.
    digest_memo: DigestMemo,
    env_dirs: std::collections::BTreeMap<String, ObjectKey>,
    metrics: Arc<Metrics>,
    restarter: Option<Restarter>,
    /// Instances to pass again at a time: files that did not parse, fights.
    retry: HashMap<ObjectKey, (Instant, u32)>,
    fights: HashMap<ObjectKey, Fight>,
    /// The skipped summary as last logged: logged when it changes, not on
    /// every reload.
    said_skipped: Option<String>,
}

/// Runs until SIGTERM or SIGINT. The pass in flight when a signal arrives
/// is finished (its writes complete or never start), so no temp file stays.
pub async fn run(
    settings: Settings,
    engine: Engine,
    metrics: Arc<Metrics>,
) -> Result<(), LoopError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(LoopError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(LoopError::Signals)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let mut manifests = crate::host::manifest::ManifestCache::default();
    let (builtin, snapshot) =
        read_inputs(&settings.inputs, settings.config.as_ref(), &mut manifests)
            .map_err(LoopError::Input)?;
    let engine = engine.with_builtin(builtin);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _watch = FsWatch::start(
        &settings.inputs.watched(),
        settings.config.as_deref(),
        &settings.env_root,
        tx,
    )?;

    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = match settings.metrics_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| LoopError::Metrics { addr, source })?;
            let mut stop = stop_rx.clone();
            let shutdown = async move {
                let _ = stop.changed().await;
            };
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                ready.clone(),
                shutdown,
            )))
        }
        None => None,
    };
    let restarter = settings.restart.clone().map(|(command, timeout)| {
        Restarter::spawn(
            Arc::new(restart::CommandAction { command, timeout }),
            metrics.clone(),
        )
    });

    let mut lp = Loop {
        engine,
        snapshot: Arc::new(Snapshot::default()),
        manifests,
        digests: HashMap::new(),
        digest_memo: DigestMemo::default(),
        env_dirs: Default::default(),
        metrics,
        restarter,
        retry: HashMap::new(),
        fights: HashMap::new(),
        said_skipped: None,
        settings,
    };
    lp.install(snapshot);
    lp.pass(None, false).await;
    ready.store(true, std::sync::atomic::Ordering::Release);
    info!(instances = lp.snapshot.instances.len(), resync = ?lp.settings.resync, "watching for changes");

    let mut resync =
        tokio::time::interval_at(Instant::now() + lp.settings.resync, lp.settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_retry = lp.retry.values().map(|(at, _)| *at).min();
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            _ = resync.tick() => {
                lp.reload(true);
                lp.pass(None, false).await;
            }
            Some(first) = rx.recv() => {
                let mut changes = vec![first];
                while let Ok(c) = rx.try_recv() {
                    changes.push(c);
                }
                lp.changes(changes).await;
            }
            () = sleep_until(next_retry) => {
                let now = Instant::now();
                let due: HashSet<ObjectKey> = lp.retry.iter().filter(|(_, (at, _))| *at <= now).map(|(k, _)| k.clone()).collect();
                lp.pass(Some(due), true).await;
            }
        }
    }
    let _ = stop_tx.send(true);
    drop(lp.restarter.take());
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(())
}

impl Loop {
    /// Makes `snapshot` current; returns the instances whose inputs changed.
    fn install(&mut self, snapshot: Snapshot) -> HashSet<ObjectKey> {
        self.say_what_was_skipped(&snapshot);
        let digests = snapshot.input_digests(&mut self.digest_memo);
        let changed = digests
            .iter()
            .filter(|(k, d)| self.digests.get(*k) != Some(*d))
            .map(|(k, _)| k.clone())
            .collect();
        self.env_dirs = snapshot
            .instances
            .iter()
            .map(|(k, i)| (crate::engine::snapshot::env_dir_key(k, i), k.clone()))
            .collect();
        self.metrics.instances.set(snapshot.instances.len() as i64);
        self.digests = digests;
        self.snapshot = Arc::new(snapshot);
        changed
    }

    /// Logs what `snapshot` skipped as not for agent-env, when that changes.
    /// (Invalid objects are logged as their file is read: once per change.)
    fn say_what_was_skipped(&mut self, snapshot: &Snapshot) {
        let skipped = snapshot.skipped_summary();
        if skipped != self.said_skipped
            && let Some(summary) = &skipped
        {
            info!("{summary}");
        }
        self.said_skipped = skipped;
    }

    /// Reads the inputs again; on failure keeps the last good ones (and says so).
    fn reload(&mut self, config_too: bool) -> Option<HashSet<ObjectKey>> {
        match read_inputs(
            &self.settings.inputs,
            self.settings.config.as_ref(),
            &mut self.manifests,
        ) {
            Ok((builtin, snapshot)) => {
                if config_too {
                    self.engine = self.engine.with_builtin(builtin);
                }
                Some(self.install(snapshot))
            }
            Err(e) => {
                error!(error = %e, "cannot read the manifests; keeping the last good ones");
                None
            }
        }
    }

    async fn changes(&mut self, changes: Vec<Change>) {
        let config = changes.contains(&Change::Config);
        let manifests = config || changes.contains(&Change::Manifests);
        let mut affected: HashSet<ObjectKey> = HashSet::new();
        if manifests && let Some(changed) = self.reload(config) {
            if config {
                affected.extend(self.snapshot.instances.keys().cloned());
            } else {
                affected.extend(changed);
            }
        }
        let now = Instant::now();
        for c in &changes {
            let Change::EnvPath(rel) = c else { continue };
            for key in self.instances_at(rel) {
                // While an instance is fought over, its correction waits.
                if let Some(until) = self.fights.get(&key).and_then(|f| f.until)
                    && until > now
                {
                    self.retry.insert(key, (until, 0));
                    continue;
                }
                affected.insert(key);
            }
        }
        if !affected.is_empty() {
            self.pass(Some(affected), true).await;
        }
    }

    /// Instances whose env dir a change at `rel` touches.
    fn instances_at(&self, rel: &str) -> Vec<ObjectKey> {
        crate::engine::snapshot::touched(&self.env_dirs, rel)
            .into_iter()
            .cloned()
            .collect()
    }

    async fn pass(&mut self, only: Option<HashSet<ObjectKey>>, after_event: bool) {
        let snapshot = self.snapshot.clone();
        let secrets: Arc<dyn SecretProvider> = Arc::new(Chain(vec![
            Arc::new(snapshot.secrets.clone()),
            Arc::new(StoreSecrets::new(self.engine.store().clone())),
        ]));
        let mut opts = PassOptions::new(Mode::Apply);
        // Outcomes are counted and logged here, never listed entry by entry.
        opts.entry_sources = false;
        opts.defer_corrupt = after_event;
        if let Some(keys) = &only {
            // Files that stayed unparsable through every retry are treated as corrupt.
            opts.defer_corrupt = after_event
                && keys
                    .iter()
                    .all(|k| self.retry.get(k).is_none_or(|(_, n)| *n < BUSY_ATTEMPTS));
            for k in keys {
                if self
                    .retry
                    .get(k)
                    .is_some_and(|(at, _)| *at <= Instant::now())
                {
                    self.retry.remove(k);
                }
            }
        }
        opts.only = only;
        let started = Instant::now();
        // Outcomes are taken as they come, not held for the whole pass: a
        // fleet's worth of them is most of what a full pass would hold.
        let engine = self.engine.clone();
        let (mut instances, mut written) = (0, 0);
        let result = engine
            .pass_each(&snapshot, &secrets, &opts, &mut |o| {
                instances += 1;
                written += usize::from(o.wrote());
                self.metrics.record_instance(&o);
                self.after(&o);
            })
            .await;
        if let Err(e) = result {
            error!(error = %crate::error_chain(&e), "pass failed; retrying at the next change or resync");
            return;
        }
        self.metrics.record_pass();
        if written > 0 || opts.only.is_none() {
            info!(
                instances,
                written,
                pass_ms = started.elapsed().as_millis() as u64,
                full = opts.only.is_none(),
                "pass done"
            );
        }
    }

    /// Restarts, retries and fight tracking after one instance's pass.
    fn after(&mut self, o: &Outcome) {
        let now = Instant::now();
        if o.reason == reason::FILE_BUSY {
            self.retry_later(&o.key, |_| BUSY_RETRY);
            return;
        }
        if !o.ready {
            warn!(instance = %o.key, reason = o.reason, message = %o.message, "instance not ready");
            // IO can succeed next time (a busy file, a full disk freed): retry with
            // backoff. Input problems wait for the input to change.
            if matches!(o.reason, reason::WRITE_FAILED | reason::STATE_FAILED) {
                self.retry_later(&o.key, io_retry_delay);
            }
            return;
        }
        if o.reason == reason::RENDERED || !o.adopted.is_empty() {
            info!(
                instance = %o.key,
                reason = o.reason,
                changes = o.changes.len(),
                drift = o.drift.len(),
                adopted = o.adopted.len(),
                message = %o.message,
                "reconciled"
            );
        }
        if !o.drift.is_empty() {
            let fight = self.fights.entry(o.key.clone()).or_default();
            fight.corrections.push_back(now);
            while fight
                .corrections
                .front()
                .is_some_and(|t| now.duration_since(*t) > FIGHT_WINDOW)
            {
                fight.corrections.pop_front();
            }
            if fight.corrections.len() >= FIGHT_THRESHOLD {
                fight.backoff = (fight.backoff * 2).clamp(FIGHT_BACKOFF.0, FIGHT_BACKOFF.1);
                fight.until = Some(now + fight.backoff);
                warn!(
                    instance = %o.key,
                    reason = "DriftFight",
                    entries = %o.drift.join(", "),
                    corrections = fight.corrections.len(),
                    next_correction_in = ?fight.backoff,
                    "something keeps rewriting declared entries; backing off"
                );
            }
        } else if let Some(f) = self.fights.get(&o.key)
            && f.corrections
                .back()
                .is_none_or(|t| now.duration_since(*t) > FIGHT_WINDOW)
        {
            self.fights.remove(&o.key);
        }
        self.restart(o);
    }

    /// Schedules another pass over `key`; `wait` gets the attempt number (from 1).
    fn retry_later(&mut self, key: &ObjectKey, wait: impl FnOnce(u32) -> Duration) {
        let n = self.retry.get(key).map_or(0, |(_, n)| *n) + 1;
        self.retry
            .insert(key.clone(), (Instant::now() + wait(n), n));
    }

    fn restart(&self, o: &Outcome) {
        let Some(restarter) = &self.restarter else {
            return;
        };
        let Some(inst) = self.snapshot.instances.get(&o.key) else {
            return;
        };
        let policy = inst.spec.restart.clone().unwrap_or_default();
        let Some(why) = restart::decide(&policy, o) else {
            return;
        };
        let target = Target {
            key: o.key.clone(),
            agent_type: o.agent_type.clone(),
            env_dir: std::path::absolute(self.settings.env_root.join(&o.env_dir))
                .unwrap_or_else(|_| self.settings.env_root.join(&o.env_dir))
                .display()
                .to_string(),
            workload: inst.spec.workload.clone(),
            strategy: policy.strategy,
        };
        restarter.request(
            target,
            restart::min_interval(&policy),
            why.label().to_owned(),
        );
    }
}
