//! One pass over a snapshot: collect → resolve → fill secrets → apply →
//! report, per instance, with bounded concurrency. Used by `reconcile` and
//! `diff` alike.

pub mod apply;
pub mod builtin;
pub mod drift;
pub mod envdir;
pub mod fswatch;
pub mod ledger;
pub mod merge;
pub mod published;
pub mod resolve;
pub mod restart;
pub mod retry;
pub mod secrets;
pub mod section;
pub mod shape;
pub mod snapshot;
mod type_bases;

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use tracing::{Instrument, info, instrument, warn};

use crate::crd::{AgentInstance, EntrySource, Scope};
use crate::engine::builtin::Builtin;
use crate::engine::envdir::{EnvDirError, EnvRoot, Owner};
use crate::engine::section::PerSection;
use crate::state::{AuditRecord, InstanceState, StateStore, StoreError};
use apply::{Applied, ApplyInput, Change};
use resolve::Declared;
use secrets::{SecretProvider, SecretRef, UsedSecrets};
use snapshot::{ObjectKey, Snapshot};
use type_bases::TypeBases;

/// Whether a pass writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write files and state.
    Apply,
    /// Change nothing; report what would change.
    DryRun,
}

/// What a pass covers and how it treats unreadable files.
#[derive(Clone, Debug)]
pub struct PassOptions {
    /// Write, or only report.
    pub mode: Mode,
    /// Only these instances (all when `None`).
    pub only: Option<HashSet<ObjectKey>>,
    /// A file that does not parse is reported as [`reason::FILE_BUSY`] and
    /// left alone, instead of being moved aside: right after a file event it
    /// may be a write in progress by a writer that does not write atomically.
    pub defer_corrupt: bool,
    /// Told each time an instance is done (a progress bar).
    pub progress: Option<Progress>,
    /// Instances with `delivery.mode: Sidecar` are resolved and filled but
    /// not written: the outcome carries the render for their sidecars (the
    /// controller publishes it). Elsewhere `delivery` is not looked at: on a
    /// host there are no pods, and the env root is written as for `Volume`.
    pub publish_sidecars: bool,
    /// Outcomes list the rendered entries and where each came from (what a
    /// report or a status shows). A loop that shows neither turns this off:
    /// building them is a twentieth of a no-op pass.
    pub entry_sources: bool,
}

impl PassOptions {
    /// Every instance, corrupt files moved aside.
    pub fn new(mode: Mode) -> PassOptions {
        PassOptions {
            mode,
            only: None,
            defer_corrupt: false,
            progress: None,
            publish_sidecars: false,
            entry_sources: true,
        }
    }
}

/// Called once per instance a pass finishes, from whichever task finished it.
#[derive(Clone)]
pub struct Progress(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Progress")
    }
}

/// Reasons an instance reports.
pub mod reason {
    /// Files written.
    pub const RENDERED: &str = "Rendered";
    /// Nothing needed writing.
    pub const UP_TO_DATE: &str = "UpToDate";
    /// `spec.suspend` is set.
    pub const SUSPENDED: &str = "Suspended";
    /// An object it depends on (or the instance itself) is invalid.
    pub const INVALID_OBJECT: &str = "InvalidObject";
    /// Writing the env dir failed.
    pub const WRITE_FAILED: &str = "WriteFailed";
    /// The env dir leads outside the env root.
    pub const UNSAFE_PATH: &str = "UnsafePath";
    /// The state database failed for this instance.
    pub const STATE_FAILED: &str = "StateFailed";
    /// A file did not parse right after it changed; retried shortly.
    pub const FILE_BUSY: &str = "FileBusy";
    /// The render was published for the instance's sidecars.
    pub const PUBLISHED: &str = "Published";
}

/// The result of one instance in one pass.
#[derive(Debug)]
pub struct Outcome {
    /// The instance.
    pub key: ObjectKey,
    /// `spec.agentType` (empty for an invalid instance).
    pub agent_type: String,
    /// Env dir relative to the env root.
    pub env_dir: String,
    /// Ready condition.
    pub ready: bool,
    /// CamelCase reason.
    pub reason: &'static str,
    /// What a human should know.
    pub message: String,
    /// Keys rendered per owned key (plugins include `false` ones).
    pub rendered: PerSection<Vec<String>>,
    /// Which scope (and object) each rendered entry came from.
    pub sources: Vec<EntrySource>,
    /// Entry changes written (or, dry-running, that would be).
    pub changes: Vec<Change>,
    /// Declared entries put back.
    pub drift: Vec<String>,
    /// Runtime installs adopted.
    pub adopted: Vec<String>,
    /// Conflicts and damaged files.
    pub warnings: Vec<String>,
    /// Secret values used, to mask them in output.
    pub used_secrets: UsedSecrets,
    /// Every secret the declared entries refer to, found or not: a change
    /// to one of them is a reason to pass this instance again.
    pub secret_refs: BTreeSet<SecretRef>,
    /// Hash of the owned keys as they are on disk now, when rendered.
    pub content_hash: Option<String>,
    /// Nothing was rendered for this instance before this pass (its agent
    /// boots with this render: no restart is due).
    pub first_render: bool,
    /// With [`PassOptions::publish_sidecars`], the render of a sidecar instance.
    pub published: Option<PublishedRender>,
    /// The audit record was stored with the state (otherwise the pass
    /// appends it with the others at the end).
    audited: bool,
    /// Stamps to keep for the ledger with this content hash (stored by the
    /// pass in batches, as audit records are).
    seen: Option<(String, envdir::Seen)>,
}

impl Outcome {
    /// Whether the pass wrote files for the instance.
    pub fn wrote(&self) -> bool {
        self.reason == reason::RENDERED
    }

    pub(crate) fn new(key: &ObjectKey, agent_type: &str, env_dir: String) -> Outcome {
        Outcome {
            key: key.clone(),
            agent_type: agent_type.to_owned(),
            env_dir,
            ready: false,
            reason: reason::INVALID_OBJECT,
            message: String::new(),
            rendered: PerSection::default(),
            sources: Vec::new(),
            changes: Vec::new(),
            drift: Vec::new(),
            adopted: Vec::new(),
            warnings: Vec::new(),
            used_secrets: UsedSecrets::default(),
            secret_refs: BTreeSet::new(),
            content_hash: None,
            first_render: false,
            published: None,
            audited: false,
            seen: None,
        }
    }

    pub(crate) fn fail(mut self, reason: &'static str, message: String) -> Outcome {
        self.ready = false;
        self.reason = reason;
        self.message = message;
        self
    }
}

/// A render for sidecars, as the bytes of its Secret. Its `Debug` shows
/// the digest only: the bytes hold filled secret values.
#[derive(Clone, PartialEq)]
pub struct PublishedRender {
    /// The Secret's [`published::DATA_KEY`] value.
    pub bytes: Vec<u8>,
    /// [`published::digest`] of the bytes.
    pub digest: String,
    /// Digest of the declared entries alone: what the agent is configured
    /// with, apart from the installs its own pods reported (a change here,
    /// not there, is a reason to restart it).
    pub declared_digest: String,
}

impl std::fmt::Debug for PublishedRender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublishedRender({})", self.digest)
    }
}

/// What a pass stores for many instances at once.
#[derive(Default)]
struct Batch {
    audit: Vec<(ObjectKey, AuditRecord)>,
    seen: Vec<(ObjectKey, String, envdir::Seen)>,
}

impl Batch {
    /// What of `o` is still to be stored: its audit record (unless stored
    /// with its state) and new stamps.
    fn take_from(&mut self, o: &mut Outcome, mode: Mode) {
        if mode == Mode::Apply && !o.audited {
            self.audit.push((o.key.clone(), audit_record(o)));
        }
        if let Some((hash, seen)) = o.seen.take() {
            self.seen.push((o.key.clone(), hash, seen));
        }
    }

    fn len(&self) -> usize {
        self.audit.len() + self.seen.len()
    }
}

/// Where and how the apply step writes one instance.
struct Target {
    rel: String,
    owner: Owner,
    runtime_installs: crate::crd::RuntimeInstalls,
}

/// A pass could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The state store failed before anything was written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The engine: env root, state and builtin layer. A clone shares them.
#[derive(Clone)]
pub struct Engine {
    root: Arc<EnvRoot>,
    store: Arc<dyn StateStore>,
    builtin: Arc<Builtin>,
    concurrency: usize,
}

impl Engine {
    /// Builds an engine.
    pub fn new(root: EnvRoot, store: Arc<dyn StateStore>, builtin: Builtin) -> Engine {
        Engine {
            root: Arc::new(root),
            store,
            builtin: Arc::new(builtin),
            concurrency: 16,
        }
    }

    /// The same engine with another builtin layer (the config changed).
    pub fn with_builtin(&self, builtin: Builtin) -> Engine {
        Engine {
            root: self.root.clone(),
            store: self.store.clone(),
            builtin: Arc::new(builtin),
            concurrency: self.concurrency,
        }
    }

    /// The env root.
    pub fn root(&self) -> &EnvRoot {
        &self.root
    }

    /// The state store.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// How many instances are worked on at once.
    pub fn with_concurrency(mut self, n: usize) -> Engine {
        self.concurrency = n.max(1);
        self
    }

    /// One pass over every instance of the snapshot, in key order.
    pub async fn pass(
        &self,
        snapshot: &Arc<Snapshot>,
        secrets: &Arc<dyn SecretProvider>,
        mode: Mode,
    ) -> Result<Vec<Outcome>, EngineError> {
        self.pass_with(snapshot, secrets, &PassOptions::new(mode))
            .await
    }

    /// A pass over the instances `opts` selects: every outcome, by key.
    pub async fn pass_with(
        &self,
        snapshot: &Arc<Snapshot>,
        secrets: &Arc<dyn SecretProvider>,
        opts: &PassOptions,
    ) -> Result<Vec<Outcome>, EngineError> {
        let mut outcomes = Vec::new();
        self.pass_each(snapshot, secrets, opts, &mut |o| outcomes.push(o))
            .await?;
        Ok(outcomes)
    }

    /// A pass that hands each outcome to `sink`, by key, as soon as it and
    /// those before it are done, and keeps none: what a report of a large
    /// fleet needs, without holding every instance's outcome to the end.
    ///
    /// Each instance is a task of its own, so resolving, filling and hashing
    /// run on every worker thread rather than on the one awaiting the pass.
    /// Dropping the pass aborts the instances not done yet (at their next
    /// await: a write under way finishes, and the ledger's pending entries
    /// cover it).
    #[instrument(skip_all, fields(instances = opts.only.as_ref().map_or(snapshot.instances.len(), HashSet::len)))]
    pub async fn pass_each(
        &self,
        snapshot: &Arc<Snapshot>,
        secrets: &Arc<dyn SecretProvider>,
        opts: &PassOptions,
        sink: &mut (dyn FnMut(Outcome) + Send),
    ) -> Result<(), EngineError> {
        /// Audit records and stamps are stored in batches of this many.
        const BATCH: usize = 1000;
        /// Instances whose states are loaded at once.
        const CHUNK: usize = 256;
        let mode = opts.mode;
        let shared = Arc::new(PassShared {
            snapshot: snapshot.clone(),
            secrets: secrets.clone(),
            opts: opts.clone(),
            bases: TypeBases::default(),
        });

        // A pass over a few instances (an edit seen in one env dir) looks
        // them up instead of walking the whole fleet.
        let selected: Vec<(&ObjectKey, &Arc<AgentInstance>)> = match &opts.only {
            None => snapshot.instances.iter().collect(),
            Some(only) => {
                let mut selected: Vec<_> = only
                    .iter()
                    .filter_map(|k| snapshot.instances.get_key_value(k))
                    .collect();
                selected.sort_unstable_by(|a, b| a.0.cmp(b.0));
                selected
            }
        };
        // Instances whose object is invalid, merged in by key.
        let mut invalid: Vec<Outcome> = snapshot
            .invalid
            .iter()
            .filter(|i| {
                i.kind == "AgentInstance" && opts.only.as_ref().is_none_or(|o| o.contains(&i.key))
            })
            .map(|inv| {
                let mut o = Outcome::new(&inv.key, "", String::new());
                o.message = format!("invalid AgentInstance ({}): {}", inv.source, inv.message);
                o
            })
            .collect();
        invalid.sort_by(|a, b| a.key.cmp(&b.key));
        let mut invalid = invalid.into_iter().peekable();
        let mut batch = Batch::default();
        let mut emit = |mut o: Outcome, batch: &mut Batch| {
            batch.take_from(&mut o, mode);
            sink(o);
        };
        // Instances go in a chunk at a time, their states loaded for the
        // chunk: a task made up front holds its state and a few kilobytes
        // of its own, which 100,000 of them waiting would add up to. The
        // next chunk's states load while this chunk runs, and its first
        // instances start as this one's last are still running, so the
        // cores are not left waiting at the seam.
        let mut chunks = selected.chunks(CHUNK);
        let load = |chunk: &[(&ObjectKey, &Arc<AgentInstance>)]| {
            let keys: Vec<ObjectKey> = chunk.iter().map(|(k, _)| (*k).clone()).collect();
            let store = self.store.clone();
            let mut loading = tokio::task::JoinSet::new();
            loading.spawn(async move { store.load_many(&keys).await }.in_current_span());
            loading
        };
        let mut loading = chunks.next().map(|c| (c, load(c)));
        let mut queued = Vec::new().into_iter();
        let mut started = 0;
        // Unordered, so an instance waiting on a lock holds up no other;
        // what finishes early waits here until those before it are out.
        // No instance starts more than a chunk past the first one not out:
        // one slow instance holds at most a chunk of outcomes waiting.
        let mut running = tokio::task::JoinSet::new();
        let mut early = std::collections::BTreeMap::new();
        let mut next = 0;
        loop {
            while running.len() < self.concurrency && started - next < CHUNK {
                let Some((key, inst, state)) = queued.next() else {
                    let Some((chunk, mut states)) = loading.take() else {
                        break;
                    };
                    let mut states = states
                        .join_next()
                        .await
                        .expect("one load per chunk")
                        .unwrap_or_else(|e| match e.try_into_panic() {
                            Ok(panic) => std::panic::resume_unwind(panic),
                            Err(e) => unreachable!("a load is aborted only with the pass: {e}"),
                        })?;
                    loading = chunks.next().map(|c| (c, load(c)));
                    queued = chunk
                        .iter()
                        .map(|&(key, inst)| {
                            let state = states.remove(key).unwrap_or_default();
                            (key, inst, state)
                        })
                        .collect::<Vec<_>>()
                        .into_iter();
                    continue;
                };
                let at = started;
                started += 1;
                let task = self
                    .clone()
                    .instance(key.clone(), inst.clone(), state, shared.clone());
                running.spawn(async move { (at, task.await) }.in_current_span());
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (at, o) = done.unwrap_or_else(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => unreachable!("instance tasks are aborted only with the pass: {e}"),
            });
            if let Some(Progress(tick)) = &opts.progress {
                tick();
            }
            early.insert(at, o);
            while let Some(o) = early.remove(&next) {
                next += 1;
                while let Some(inv) = invalid.next_if(|i| i.key < o.key) {
                    emit(inv, &mut batch);
                }
                emit(o, &mut batch);
            }
            if batch.len() >= BATCH {
                self.flush(std::mem::take(&mut batch)).await;
            }
        }
        for inv in invalid {
            emit(inv, &mut batch);
        }
        self.flush(batch).await;
        Ok(())
    }

    /// Stores a batch; a failure is logged and costs nothing but a read
    /// (stamps) or a line of history (audit).
    async fn flush(&self, batch: Batch) {
        if !batch.audit.is_empty() {
            self.audit(&batch.audit).await;
        }
        if !batch.seen.is_empty()
            && let Err(e) = self.store.save_seen(&batch.seen).await
        {
            warn!(error = %crate::error_chain(&e), "cannot keep the stamps of unchanged files; they are read again next pass");
        }
    }

    /// One instance's work, owning what it needs so it can run as a task.
    #[instrument(skip_all, fields(instance = %key))]
    async fn instance(
        self,
        key: ObjectKey,
        inst: Arc<AgentInstance>,
        state: InstanceState,
        pass: Arc<PassShared>,
    ) -> Outcome {
        let (key, inst) = (&key, &*inst);
        let PassShared {
            secrets,
            opts,
            bases,
            ..
        } = &*pass;
        let index = pass.snapshot.index();
        let spec = &inst.spec;
        let rel = snapshot::env_path(key, inst);
        let out = Outcome::new(key, &spec.agent_type, rel.clone());
        if spec.suspend {
            return Outcome {
                ready: true,
                reason: reason::SUSPENDED,
                message: "spec.suspend is set; the env dir is left as it is".into(),
                ..out
            };
        }
        if let Some(clash) = pass.snapshot.clashes().get(key) {
            return out.fail(
                reason::INVALID_OBJECT,
                format!("field spec.envDir.path: env dir {rel} {clash}"),
            );
        }
        let blockers = index.blockers(&key.namespace, &spec.agent_type, &key.name);
        if !blockers.is_empty() {
            let lines: Vec<String> = blockers.iter().map(ToString::to_string).collect();
            let o = out.fail(
                reason::INVALID_OBJECT,
                format!(
                    "held back by invalid objects; last good render kept: {}",
                    lines.join("; ")
                ),
            );
            return o;
        }

        let namespace = &key.namespace;
        let base = bases.get(namespace, &spec.agent_type, || {
            let type_layer = index.layer(namespace, &Scope::Type(spec.agent_type.clone()));
            resolve::resolve_type(&self.builtin, &spec.agent_type, &type_layer)
        });
        let own_layer = index.layer(namespace, &Scope::Instance(key.name.clone()));
        // With the type's entries filled, only the instance's own are left
        // to fill; otherwise every entry is filled over the instance's layer.
        let filled_base = base.filled(namespace, secrets.as_ref()).await;
        let start = filled_base.map_or(&base.declared, |f| &f.declared);
        let mut declared = resolve::with_instance_layer(Declared::clone(start), &own_layer);
        let to_fill = (declared.sections.mcp_servers.values_mut())
            .filter(|e| filled_base.is_none() || matches!(e.origin, resolve::Origin::Instance(_)))
            .map(|e| Arc::make_mut(&mut e.value));
        let filled = secrets::fill_all(namespace, to_fill, secrets.as_ref()).await;
        let filled = match filled_base {
            Some(base) => base.with(filled),
            None => filled,
        };
        let mut out = out;
        out.warnings
            .extend(declared.conflicts.iter().map(|c| format!("Conflict: {c}")));
        let Declared { sections, .. } = declared;
        out.secret_refs = filled.refs;
        let used = match filled.result {
            Ok(used) => used,
            Err(e) => {
                warn!(reason = e.reason(), error = %e, "secrets not resolved; nothing written");
                let message = format!("{e}; nothing written, last good render kept");
                return out.fail(e.reason(), message);
            }
        };
        out.used_secrets = used;

        let owner = spec.env_dir.as_ref().map_or(Owner::default(), |e| Owner {
            uid: e.uid,
            gid: e.gid,
        });
        if opts.publish_sidecars && spec.delivery_mode() == crate::crd::DeliveryMode::Sidecar {
            return publish(out, &sections, state, spec.runtime_installs, owner);
        }
        let target = Target {
            rel,
            owner,
            runtime_installs: spec.runtime_installs,
        };
        self.apply_filled(out, sections, state, target, opts).await
    }

    /// Applies a render a controller published, for a sidecar: the same
    /// apply and report as a pass, into `rel` under this engine's root. A
    /// store that knows nothing of the instance (a pod whose volume started
    /// empty) starts from the render's installed set.
    #[instrument(skip_all, fields(instance = %published.key()))]
    pub async fn apply_published(
        &self,
        published: &published::Published,
        rel: &str,
        opts: &PassOptions,
    ) -> Result<Outcome, EngineError> {
        let key = published.key();
        let mut out = Outcome::new(&key, "", rel.to_owned());
        if published.suspend {
            out.ready = true;
            out.reason = reason::SUSPENDED;
            out.message = "spec.suspend is set; the env dir is left as it is".into();
            return Ok(out);
        }
        let declared = match published.declared() {
            Ok(d) => d,
            Err(e) => return Ok(out.fail(reason::INVALID_OBJECT, crate::error_chain(&e))),
        };
        let mut state = self.store.load(&key).await?;
        if state == InstanceState::default() {
            state.installed = published.installed.clone();
        }
        let target = Target {
            rel: rel.to_owned(),
            owner: published.owner(),
            runtime_installs: published.runtime_installs,
        };
        let mut outcome = self.apply_filled(out, declared, state, target, opts).await;
        let mut batch = Batch::default();
        batch.take_from(&mut outcome, opts.mode);
        self.flush(batch).await;
        Ok(outcome)
    }

    /// The IO half of an instance: records what it may write, applies, reports.
    async fn apply_filled(
        &self,
        out: Outcome,
        sections: PerSection<resolve::Entries>,
        state: InstanceState,
        target: Target,
        opts: &PassOptions,
    ) -> Outcome {
        let mode = opts.mode;
        let defer_corrupt = opts.defer_corrupt;
        // Full passes (start, resync) clean up after a killed run.
        let sweep_temp_files = opts.only.is_none();
        let key = out.key.clone();
        // Usually nothing is installed and the render is the declared
        // entries: those are then used as they are instead of copied.
        let united = (!resolve::desired_is_declared(&state.installed, target.runtime_installs))
            .then(|| resolve::desired(&sections, &state.installed, target.runtime_installs));
        let desired = united.as_ref().unwrap_or(&sections);
        let ledger_current = state.pending.is_none()
            && (state.ledger.as_ref()).is_some_and(|l| renders(l, desired, self.store.hasher()));
        if mode == Mode::Apply
            && !ledger_current
            && let Err(e) = self.record_pending(&key, desired, &state).await
        {
            return out.fail(reason::STATE_FAILED, crate::error_chain(&e));
        }
        if ledger_current && self.files_unchanged(&state, &target).await {
            return kept(out, desired, &state, opts);
        }
        drop(united);

        let root = self.root.clone();
        let store = self.store.clone();
        let Target {
            rel,
            owner,
            runtime_installs,
        } = target;
        let old_state = state.clone();
        let io = tokio::task::spawn_blocking(move || {
            apply::apply(
                &root,
                &ApplyInput {
                    rel: &rel,
                    owner,
                    mode: runtime_installs,
                    dry_run: mode == Mode::DryRun,
                    defer_corrupt,
                    sweep_temp_files,
                    declared: &sections,
                    state: &state,
                    hasher: store.hasher(),
                },
            )
        })
        .await
        .expect("the apply step does not panic");
        let applied = match io {
            Ok(a) => a,
            Err(e) => {
                let reason = if e.is_escape() {
                    reason::UNSAFE_PATH
                } else if matches!(e, EnvDirError::Unparsable { .. }) {
                    reason::FILE_BUSY
                } else {
                    reason::WRITE_FAILED
                };
                warn!(reason, error = %crate::error_chain(&e), "env dir not written");
                return out.fail(reason, crate::error_chain(&e));
            }
        };
        self.report(out, applied, old_state, opts).await
    }

    /// Whether the env dir's files are still those the ledger of `state`
    /// last found current. Where a stat is cheap and final (a local
    /// filesystem) it is asked here; elsewhere (each file is also opened,
    /// which may wait on a server) on a blocking thread.
    async fn files_unchanged(&self, state: &InstanceState, target: &Target) -> bool {
        let Some(seen) = state.ledger.as_ref().and_then(|l| l.seen.clone()) else {
            return false;
        };
        let (root, rel, owner) = (self.root.clone(), target.rel.clone(), target.owner);
        let check = move || {
            matches!(root.instance(&rel, false, owner),
                Ok(Some(dir)) if apply::still_as_seen(&dir, &seen, &rel))
        };
        if self.root.attrs_authoritative() {
            check()
        } else {
            tokio::task::spawn_blocking(check)
                .await
                .expect("a stat does not panic")
        }
    }

    /// Records what this pass may write before it writes: `desired`, and
    /// entries an earlier interrupted pass recorded, in case it wrote them.
    async fn record_pending(
        &self,
        key: &ObjectKey,
        desired: &PerSection<resolve::Entries>,
        state: &InstanceState,
    ) -> Result<(), StoreError> {
        let mut pending = apply::ledger_entries(self.store.hasher(), desired);
        if let Some(old) = &state.pending {
            for (section, entries) in old.iter() {
                for (name, e) in entries {
                    pending[section]
                        .entry(name.clone())
                        .or_insert_with(|| e.clone());
                }
            }
        }
        if state.pending.as_ref() == Some(&pending) {
            return Ok(());
        }
        self.store.save_pending(key, &pending).await
    }

    async fn report(
        &self,
        mut out: Outcome,
        applied: Applied,
        old: InstanceState,
        opts: &PassOptions,
    ) -> Outcome {
        let mode = opts.mode;
        out.changes = applied.changes;
        describe(
            &mut out,
            &applied.rendered,
            &applied.findings,
            &applied.corrupt,
            &applied.written,
            opts,
        );
        if mode == Mode::DryRun {
            return out;
        }
        let mut ledger = applied.ledger;
        let unchanged_ledger = old
            .ledger
            .as_ref()
            .is_some_and(|l| l.entries == ledger.entries && l.content_hash == ledger.content_hash);
        if unchanged_ledger && let Some(l) = &old.ledger {
            ledger.written_at = l.written_at;
        }
        // New stamps of files otherwise as they were are stored apart, in
        // batches: the first pass after a render stamps every instance.
        // (No stamps after a write: those are stored with the save.)
        let old_seen = old.ledger.as_ref().and_then(|l| l.seen.as_ref());
        let fresh_seen = match &ledger.seen {
            Some(seen) if Some(seen) != old_seen => {
                std::mem::replace(&mut ledger.seen, old_seen.cloned())
            }
            _ => None,
        };
        let new = InstanceState {
            ledger: Some(ledger),
            installed: applied.installed,
            pending: None,
        };
        out.content_hash = new.ledger.as_ref().map(|l| l.content_hash.clone());
        // A row holding only pending entries is not a render.
        out.first_render = old
            .ledger
            .as_ref()
            .is_none_or(|l| l.content_hash.is_empty());
        if new == old && out.changes.is_empty() && applied.written.is_empty() {
            out.seen = fresh_seen.map(|seen| {
                let content_hash = out.content_hash.clone().unwrap_or_default();
                (content_hash, seen)
            });
            return out;
        }
        let mut new = new;
        if let (Some(l), Some(seen)) = (new.ledger.as_mut(), fresh_seen) {
            l.seen = Some(seen);
        }
        let audit = audit_record(&out);
        if let Err(e) = self.store.save(&out.key, &new, &audit).await {
            // The files are written; the next pass sees them as ours or adopts them.
            return out.fail(reason::STATE_FAILED, crate::error_chain(&e));
        }
        out.audited = true;
        for w in &out.warnings {
            warn!(warning = %w, "rendered with a warning");
        }
        info!(
            reason = out.reason,
            changes = out.changes.len(),
            drift = out.drift.len(),
            adopted = out.adopted.len(),
            "instance reconciled"
        );
        out
    }

    /// Appends audit records not stored with a state change (failures and
    /// passes that changed nothing), in one transaction.
    async fn audit(&self, records: &[(ObjectKey, AuditRecord)]) {
        if let Err(e) = self.store.audit(records).await {
            warn!(error = %crate::error_chain(&e), "cannot append to the audit trail");
        }
    }
}

/// What every instance task of one pass shares.
struct PassShared {
    snapshot: Arc<Snapshot>,
    secrets: Arc<dyn SecretProvider>,
    opts: PassOptions,
    bases: TypeBases,
}

/// Fills in what an outcome says of a render: the entries and where each
/// came from, what disk said, and the message (which names the files of
/// `out.changes`, set before).
fn describe(
    out: &mut Outcome,
    rendered: &PerSection<resolve::Entries>,
    findings: &PerSection<drift::Findings>,
    corrupt: &[String],
    written: &[section::EnvFile],
    opts: &PassOptions,
) {
    if opts.entry_sources {
        out.rendered = rendered.map(|_, e| e.keys().cloned().collect());
        out.sources = sources(rendered);
    }
    for (section, f) in findings.iter() {
        out.drift
            .extend(f.drift.iter().map(|n| format!("{section}.{n}")));
        out.adopted
            .extend(f.adopted.iter().map(|n| format!("{section}.{n}")));
    }
    out.warnings
        .extend(corrupt.iter().map(|c| format!("CorruptFile: {c}")));
    out.ready = true;
    let counts = format!(
        "{} plugins, {} marketplaces, {} MCP servers",
        rendered.plugins.len(),
        rendered.marketplaces.len(),
        rendered.mcp_servers.len()
    );
    let verb = if opts.mode == Mode::DryRun {
        "would write"
    } else {
        "wrote"
    };
    let mut message = if out.changes.is_empty() && written.is_empty() {
        out.reason = reason::UP_TO_DATE;
        format!("up to date ({counts})")
    } else {
        out.reason = reason::RENDERED;
        let files: Vec<&str> = {
            let mut f: Vec<&str> = out
                .changes
                .iter()
                .map(|c| c.section.file().file_name())
                .collect();
            f.extend(written.iter().map(|f| f.file_name()));
            f.sort();
            f.dedup();
            f
        };
        format!("{verb} {} ({counts})", files.join(", "))
    };
    if !out.drift.is_empty() {
        message.push_str(&format!("; drift put back: {}", out.drift.join(", ")));
    }
    if !out.adopted.is_empty() {
        message.push_str(&format!(
            "; runtime installs adopted: {}",
            out.adopted.join(", ")
        ));
    }
    if !out.warnings.is_empty() {
        message.push_str(&format!("; {} warning(s)", out.warnings.len()));
    }
    out.message = message;
}

/// The outcome of an instance whose files are as the ledger last found
/// them and whose render is the ledger's: nothing to write or to store.
/// (What [`Engine::report`] makes of an unchanged render, without copying
/// the state to compare it with itself.)
fn kept(
    mut out: Outcome,
    rendered: &PerSection<resolve::Entries>,
    state: &InstanceState,
    opts: &PassOptions,
) -> Outcome {
    describe(&mut out, rendered, &PerSection::default(), &[], &[], opts);
    if opts.mode == Mode::DryRun {
        return out;
    }
    let ledger = state.ledger.as_ref().expect("a current ledger is kept");
    out.content_hash = Some(ledger.content_hash.clone());
    out.first_render = ledger.content_hash.is_empty();
    out
}

/// Whether `ledger` records exactly the render `desired`: the same names,
/// each from the same place (declared or installed), and the same content.
/// One hash over everything instead of one per entry: the usual answer is
/// yes, and a no costs the per-entry hashes of the pending record anyway.
fn renders(
    ledger: &ledger::Ledger,
    desired: &PerSection<resolve::Entries>,
    hasher: &ledger::Hasher,
) -> bool {
    let same_names = desired.iter().all(|(s, entries)| {
        let recorded = &ledger.entries[s];
        recorded.len() == entries.len()
            && (recorded.iter().zip(entries)).all(|((n, l), (name, e))| {
                n == name && l.installed == (e.origin == resolve::Origin::Installed)
            })
    });
    same_names && apply::content_hash(hasher, desired) == ledger.content_hash
}

/// Which scope (and object) each entry came from, for the status.
fn sources(entries: &PerSection<resolve::Entries>) -> Vec<EntrySource> {
    entries
        .iter()
        .flat_map(|(section, entries)| {
            entries.iter().map(move |(name, e)| EntrySource {
                key: section.key().to_owned(),
                name: name.clone(),
                scope: e.origin.scope().to_owned(),
                object: e.origin.object().map(resolve::ObjectId::label),
            })
        })
        .collect()
}

/// The outcome of a sidecar instance: resolved and filled, described as
/// the sidecars will render it, and carried out for the controller to
/// publish. Nothing is written and no state is stored here.
fn publish(
    mut out: Outcome,
    declared: &PerSection<resolve::Entries>,
    state: InstanceState,
    runtime_installs: crate::crd::RuntimeInstalls,
    owner: Owner,
) -> Outcome {
    let desired = PerSection::from_fn(|s| {
        resolve::desired_section(s, &declared[s], &state.installed[s], runtime_installs)
    });
    out.rendered = desired.map(|_, e| e.keys().cloned().collect());
    out.sources = sources(&desired);
    let render = published::Published::new(
        &out.key,
        declared,
        state.installed,
        runtime_installs,
        false,
        owner,
    );
    let bytes = render.to_bytes();
    let digest = published::digest(&bytes);
    let declared_digest =
        published::digest(&serde_json::to_vec(&render.declared).expect("entries serialize"));
    out.ready = true;
    out.reason = reason::PUBLISHED;
    out.message = format!(
        "render published for the sidecars ({} plugins, {} marketplaces, {} MCP servers)",
        out.rendered.plugins.len(),
        out.rendered.marketplaces.len(),
        out.rendered.mcp_servers.len()
    );
    out.content_hash = Some(digest.clone());
    out.published = Some(PublishedRender {
        bytes,
        digest,
        declared_digest,
    });
    out
}

fn audit_record(out: &Outcome) -> AuditRecord {
    AuditRecord {
        at: crate::time::now(),
        outcome: out.reason.to_owned(),
        content_hash: out.content_hash.clone(),
        changed: out.changes.iter().map(Change::label).collect(),
        drift: out.drift.clone(),
        adopted: out.adopted.clone(),
        message: out.used_secrets.mask(&out.message),
        repeats: 1,
        last_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_without_entry_sources_says_the_same_without_the_lists() {
        let key = ObjectKey {
            namespace: "dev".into(),
            name: "alice".into(),
        };
        let rendered = resolve::sample_render();
        let described = |entry_sources| {
            let mut opts = PassOptions::new(Mode::Apply);
            opts.entry_sources = entry_sources;
            let mut out = Outcome::new(&key, "coder", "dev/alice".into());
            describe(&mut out, &rendered, &PerSection::default(), &[], &[], &opts);
            out
        };
        let (full, bare) = (described(true), described(false));
        assert_eq!(full.rendered.plugins, ["lint@tools"]);
        assert_eq!(full.sources.len(), 2);
        let lint = full.sources.iter().find(|s| s.name == "lint@tools");
        assert_eq!(
            lint.and_then(|s| s.object.as_deref()),
            Some("PluginBinding/coders")
        );
        assert!(bare.rendered.plugins.is_empty() && bare.rendered.mcp_servers.is_empty());
        assert!(bare.sources.is_empty());
        assert_eq!(
            (bare.ready, bare.reason, &bare.message),
            (full.ready, full.reason, &full.message)
        );
        assert_eq!(
            bare.message,
            "up to date (1 plugins, 0 marketplaces, 1 MCP servers)"
        );
    }
}
