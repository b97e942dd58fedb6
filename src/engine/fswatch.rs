//! Filesystem notifications for the continuous loop: manifest paths, the
//! builtin config dir and the env root, sorted into what changed.
//!
//! Only completed writes count: a file closed after writing, moved into
//! place, or removed. A file being written (opened, partly written) is not
//! an event, so a half-written file is never read because of one.

use std::path::{Path, PathBuf};

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
    _watcher: RecommendedWatcher,
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
        targets.push((roots.env_root.clone(), RecursiveMode::Recursive));

        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<Event>| match res {
                Ok(event) => {
                    for change in classify(&roots, &event) {
                        let _ = tx.send(change);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "filesystem watch error"),
            })
            .map_err(|source| WatchError {
                path: env_root.to_owned(),
                source,
            })?;
        for (path, mode) in targets {
            watcher
                .watch(&path, mode)
                .map_err(|source| WatchError { path, source })?;
        }
        Ok(FsWatch { _watcher: watcher })
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
