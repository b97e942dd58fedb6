//! Filesystem notifications for the continuous loop: manifest paths, the
//! builtin config dir and the env root, sorted into what changed.
//!
//! Only completed writes count: a file closed after writing, moved into
//! place, or removed. A file being written (opened, partly written) is not
//! an event, so a half-written file is never read because of one.
//!
//! The env root is watched one directory at a time, not with `notify`'s
//! recursive mode: that mode watches every directory made under it, lock
//! directories included (every update of a config file makes and removes
//! one), and forgetting a watch costs it a scan of all its watches, so on a
//! fleet of 10,000 env dirs each write cost a 10,000-path scan. Lock
//! directories and the operator's own state directory are not watched;
//! every other directory made or moved in is, by a thread of its own
//! (`notify` cannot be asked for a watch from its event handler).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{AccessKind, AccessMode, CreateKind, ModifyKind, RemoveKind};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::engine::envdir::{LOCK_SUFFIX, STATE_DIR};
use crate::engine::section::EnvFile;

/// What a notification means to the loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A manifest file or directory changed.
    Manifests,
    /// The builtin config changed.
    Config,
    /// An env file changed, or a directory under the env root went away:
    /// the path relative to the env root.
    EnvPath(String),
}

/// Watch could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {}", .path.display())]
pub struct WatchError {
    /// The path.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: notify::Error,
}

/// Keeps the watches alive; dropping it stops them.
pub struct FsWatch {
    _watcher: Arc<Mutex<RecommendedWatcher>>,
}

struct Roots {
    manifests: Vec<PathBuf>,
    config: Option<PathBuf>,
    env_root: PathBuf,
}

impl FsWatch {
    /// Watches `manifests` (files or directories), `config` and `env_root`
    /// (all made absolute), sending changes to `tx`.
    pub fn start(
        manifests: &[PathBuf],
        config: Option<&Path>,
        env_root: &Path,
        tx: mpsc::UnboundedSender<Change>,
    ) -> Result<FsWatch, WatchError> {
        let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
        let roots = Roots {
            manifests: manifests.iter().map(|p| abs(p)).collect(),
            config: config.map(abs),
            env_root: abs(env_root),
        };
        let mut targets: Vec<(PathBuf, RecursiveMode)> = Vec::new();
        for m in roots.manifests.iter().chain(roots.config.iter()) {
            if m.is_dir() {
                targets.push((m.clone(), RecursiveMode::Recursive));
            } else {
                // Editors and GitOps tools replace files: watch the directory.
                let parent = m.parent().unwrap_or(Path::new("/")).to_owned();
                targets.push((parent, RecursiveMode::NonRecursive));
            }
        }
        let env_root = roots.env_root.clone();
        let (dirs_tx, dirs_rx) = std::sync::mpsc::channel::<PathBuf>();
        let watcher = notify::recommended_watcher(move |res: notify::Result<Event>| match res {
            Ok(event) => {
                if let Some(dir) = new_dir(&roots, &event) {
                    let _ = dirs_tx.send(dir);
                }
                for change in classify(&roots, &event) {
                    let _ = tx.send(change);
                }
            }
            Err(e) => tracing::warn!(error = %e, "filesystem watch error"),
        })
        .map_err(|source| WatchError {
            path: env_root.clone(),
            source,
        })?;
        let watcher = Arc::new(Mutex::new(watcher));
        {
            let mut w = watcher.lock().expect("watcher lock");
            for (path, mode) in targets {
                w.watch(&path, mode)
                    .map_err(|source| WatchError { path, source })?;
            }
            (w.watch(&env_root, RecursiveMode::NonRecursive)).map_err(|source| WatchError {
                path: env_root.clone(),
                source,
            })?;
            watch_tree(&mut w, &env_root, true);
        }
        // Holds the watcher weakly: dropping `FsWatch` drops the watcher,
        // its handler and the sender, which ends this thread.
        let weak = Arc::downgrade(&watcher);
        std::thread::Builder::new()
            .name("agent-env-watch-dirs".into())
            .spawn(move || {
                for dir in dirs_rx {
                    let Some(watcher) = weak.upgrade() else { break };
                    watch_tree(&mut watcher.lock().expect("watcher lock"), &dir, false);
                }
            })
            .map_err(|e| WatchError {
                path: env_root,
                source: notify::Error::io(e),
            })?;
        Ok(FsWatch { _watcher: watcher })
    }
}

/// Whether a directory under the env root is left unwatched: the
/// operator's state and lock directories hold no env file.
fn unwatched(name: &str, top: bool) -> bool {
    name.ends_with(LOCK_SUFFIX) || (top && name == STATE_DIR)
}

/// A directory the event made (or moved in) under the env root, to watch.
fn new_dir(roots: &Roots, event: &Event) -> Option<PathBuf> {
    if !matches!(
        event.kind,
        EventKind::Create(CreateKind::Folder | CreateKind::Any)
            | EventKind::Modify(ModifyKind::Name(_))
    ) {
        return None;
    }
    let path = event.paths.last()?;
    let rel = path.strip_prefix(&roots.env_root).ok()?;
    let name = rel.file_name()?.to_str()?;
    let top = rel.parent().is_none_or(|p| p.as_os_str().is_empty());
    // Every write renames an env file into place: those are not looked at.
    let env_file = EnvFile::ALL.iter().any(|f| f.file_name() == name);
    (!env_file
        && !unwatched(name, top)
        && std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()))
    .then(|| path.clone())
}

/// Watches `dir` (unless `skip_self`: already watched) and every directory
/// under it, without following symlinks. A directory gone meanwhile is
/// passed over: its removal is an event of its own.
fn watch_tree(watcher: &mut RecommendedWatcher, dir: &Path, skip_self: bool) {
    let mut stack = vec![(dir.to_owned(), skip_self)];
    while let Some((d, watched)) = stack.pop() {
        if !watched && watcher.watch(&d, RecursiveMode::NonRecursive).is_err() {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let top = d == dir && skip_self;
        for e in entries.flatten() {
            let name = e.file_name();
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if is_dir && name.to_str().is_some_and(|n| !unwatched(n, top)) {
                stack.push((e.path(), false));
            }
        }
    }
}

/// Whether the event is a completed change.
fn completed(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
            | EventKind::Modify(ModifyKind::Name(_))
            | EventKind::Remove(_)
            | EventKind::Create(CreateKind::Folder)
    )
}

fn classify(roots: &Roots, event: &Event) -> Vec<Change> {
    if !completed(&event.kind) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for path in &event.paths {
        if let Ok(rel) = path.strip_prefix(&roots.env_root) {
            let Some(rel) = rel.to_str() else { continue };
            if rel.is_empty() || rel == STATE_DIR || rel.starts_with(&format!("{STATE_DIR}/")) {
                continue;
            }
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let env_file = EnvFile::ALL.iter().any(|f| f.file_name() == name);
            // Locks and temp files (ours and other writers') come and go with
            // every write; the rename that ends a write is what counts.
            let transient = name.ends_with(LOCK_SUFFIX) || name.ends_with(".tmp");
            // A directory removed or moved away may be an env dir (or hold some).
            let dir_gone = !transient
                && matches!(
                    event.kind,
                    EventKind::Remove(RemoveKind::Folder | RemoveKind::Any)
                        | EventKind::Modify(ModifyKind::Name(_))
                );
            if env_file || dir_gone {
                out.push(Change::EnvPath(rel.to_owned()));
            }
            continue;
        }
        if roots.config.as_ref().is_some_and(|c| path.starts_with(c)) {
            out.push(Change::Config);
        } else if roots
            .manifests
            .iter()
            .any(|m| path.starts_with(m) || path == m)
        {
            out.push(Change::Manifests);
        }
    }
    out
}
