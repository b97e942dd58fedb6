//! The env root on disk. Every access goes through a directory handle of the
//! root (cap-std), so no path or symlink can lead a read or write outside it.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, DirBuilder, DirBuilderExt, MetadataExt, OpenOptions, OpenOptionsExt};

use crate::section::EnvFile;

/// The directory under the env root holding the operator's own state.
pub const STATE_DIR: &str = ".agent-env";
/// In an env dir: the pods the operator checked the env dir for, read by
/// `agent-env wait` in the pod's init container.
pub const BOOT_MARKER: &str = ".agent-env-ready";

/// An env dir operation failed. Paths are shown relative to the env root.
#[derive(Debug, thiserror::Error)]
pub enum EnvDirError {
    /// The env root itself cannot be opened or created.
    #[error("cannot open env root {}", .path.display())]
    Root {
        /// The root.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// An operation on a path under the root failed; cap-std reports a path
    /// that leads outside the root (through `..` or a symlink) this way too.
    #[error("{op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path, relative to the env root.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file did not parse and was left alone (see `defer_corrupt`).
    #[error("{path} does not parse ({reason}); left alone for now")]
    Unparsable {
        /// The path, relative to the env root.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file kept changing under us while we tried to write it.
    #[error("{path} kept changing while it was being written; gave up after {attempts} attempts")]
    Contended {
        /// The path, relative to the env root.
        path: String,
        /// How often we tried.
        attempts: u32,
    },
}

impl EnvDirError {
    fn io(op: &'static str, path: impl Into<String>, source: io::Error) -> Self {
        EnvDirError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether the error comes from a path leading outside the env root.
    pub fn is_escape(&self) -> bool {
        match self {
            EnvDirError::Io { source, .. } => {
                source.kind() == io::ErrorKind::PermissionDenied
                    && source.to_string().contains("outside")
            }
            _ => false,
        }
    }
}

/// What identifies one version of a file, to notice a write by someone else.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
}

impl Stamp {
    fn of(m: &cap_std::fs::Metadata) -> Stamp {
        Stamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        }
    }
}

/// A file as read.
#[derive(Debug)]
pub struct FileRead {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Its identity when read.
    pub stamp: Stamp,
    /// Its permission bits.
    pub mode: u32,
}

/// Owner to give written files and created dirs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    /// uid, if set.
    pub uid: Option<u32>,
    /// gid, if set.
    pub gid: Option<u32>,
}

/// How a write ended.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The new content is in place.
    Written,
    /// The file changed since it was read; nothing was written.
    Raced,
}

/// Suffix of the lock Claude Code (through `proper-lockfile`) takes on a config file.
pub const LOCK_SUFFIX: &str = ".lock";
/// A lock older than this is abandoned (`proper-lockfile`'s default).
pub const LOCK_STALE: std::time::Duration = std::time::Duration::from_secs(10);
/// How long a write waits for a lock before it reads and merges again.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Releases a lock when dropped.
struct LockGuard<'a> {
    dir: &'a Dir,
    name: String,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        let _ = self.dir.remove_dir(&self.name);
    }
}

/// The env root.
#[derive(Debug)]
pub struct EnvRoot {
    /// `None`: the root does not exist (a dry run over a fresh host).
    dir: Option<Dir>,
    path: PathBuf,
    fsync: bool,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl EnvRoot {
    /// Opens the env root, creating it when `create` is set. Without
    /// `create`, a missing root is a root with nothing in it.
    pub fn open(path: &Path, create: bool) -> Result<EnvRoot, EnvDirError> {
        let root_err = |source| EnvDirError::Root {
            path: path.to_owned(),
            source,
        };
        if create {
            std::fs::create_dir_all(path).map_err(root_err)?;
        }
        let dir = match Dir::open_ambient_dir(path, ambient_authority()) {
            Ok(dir) => Some(dir),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => None,
            Err(e) => return Err(root_err(e)),
        };
        Ok(EnvRoot {
            dir,
            path: path.to_owned(),
            fsync: true,
        })
    }

    /// Turns fsync of written files off (for throwaway roots and benchmarks).
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        self.fsync = fsync;
        self
    }

    /// The root's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens an instance's env dir at `rel` (already validated as relative).
    /// `Ok(None)` when it does not exist and `create` is off.
    pub fn instance(
        &self,
        rel: &str,
        create: bool,
        owner: Owner,
    ) -> Result<Option<InstanceDir>, EnvDirError> {
        let Some(root) = &self.dir else {
            return Ok(None);
        };
        let dir = match root.open_dir(rel) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let mut b = DirBuilder::new();
                b.recursive(true).mode(0o755);
                root.create_dir_with(rel, &b)
                    .map_err(|e| EnvDirError::io("cannot create env dir", rel, e))?;
                let dir = root
                    .open_dir(rel)
                    .map_err(|e| EnvDirError::io("cannot open env dir", rel, e))?;
                if owner.uid.is_some() || owner.gid.is_some() {
                    chown_dir(root, rel, owner)
                        .map_err(|e| EnvDirError::io("cannot chown env dir", rel, e))?;
                }
                dir
            }
            Err(e) => return Err(EnvDirError::io("cannot open env dir", rel, e)),
        };
        Ok(Some(InstanceDir {
            dir,
            rel: rel.to_owned(),
            fsync: self.fsync,
        }))
    }
}

fn temp_name(name: &str) -> String {
    format!(
        ".{name}.agent-env-{}-{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

impl EnvRoot {
    /// Removes an instance's env dir and everything in it (deletion policy
    /// `Delete`). Symlinks inside are removed, never followed. False when
    /// there was nothing to remove.
    pub fn remove_instance(&self, rel: &str) -> Result<bool, EnvDirError> {
        let Some(root) = &self.dir else {
            return Ok(false);
        };
        match root.remove_dir_all(rel) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(EnvDirError::io("cannot remove env dir", rel, e)),
        }
    }
}

/// Directory handles are `O_PATH`, which `fchown` refuses: change the leaf
/// through its parent's handle instead, never following a symlink.
fn chown_dir(root: &Dir, rel: &str, owner: Owner) -> io::Result<()> {
    let rel = rel.trim_end_matches('/');
    let (parent, leaf) = match rel.rsplit_once('/') {
        Some((p, l)) => (root.open_dir(p)?, l),
        None => (root.try_clone()?, rel),
    };
    rustix::fs::chownat(
        &parent,
        leaf,
        owner.uid.map(rustix::fs::Uid::from_raw),
        owner.gid.map(rustix::fs::Gid::from_raw),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn chown(fd: impl rustix::fd::AsFd, owner: Owner) -> io::Result<()> {
    rustix::fs::fchown(
        fd,
        owner.uid.map(rustix::fs::Uid::from_raw),
        owner.gid.map(rustix::fs::Gid::from_raw),
    )?;
    Ok(())
}

/// One instance's env dir.
#[derive(Debug)]
pub struct InstanceDir {
    dir: Dir,
    rel: String,
    fsync: bool,
}

impl InstanceDir {
    /// The path of a file relative to the env root, for messages.
    pub fn display(&self, name: &str) -> String {
        format!("{}/{}", self.rel, name)
    }

    /// Reads a file; `Ok(None)` when it does not exist. Never follows a symlink.
    pub fn read(&self, file: EnvFile) -> Result<Option<FileRead>, EnvDirError> {
        let name = file.file_name();
        let mut opts = OpenOptions::new();
        opts.read(true).follow(FollowSymlinks::No);
        let mut f = match self.dir.open_with(name, &opts) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(EnvDirError::io("cannot open", self.display(name), e)),
        };
        let meta = f
            .metadata()
            .map_err(|e| EnvDirError::io("cannot stat", self.display(name), e))?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        f.read_to_end(&mut bytes)
            .map_err(|e| EnvDirError::io("cannot read", self.display(name), e))?;
        Ok(Some(FileRead {
            bytes,
            stamp: Stamp::of(&meta),
            mode: meta.mode() & 0o7777,
        }))
    }

    /// Removes temp files a killed writer of ours left behind (the rename
    /// never happened, so they hold nothing the files need). Best effort.
    pub fn sweep_temp_files(&self) -> usize {
        let Ok(entries) = self.dir.entries() else {
            return 0;
        };
        let mut removed = 0;
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            let names = EnvFile::ALL.iter().map(|f| f.file_name());
            let ours = names.chain([BOOT_MARKER]).any(|f| {
                name.strip_prefix('.')
                    .and_then(|n| n.strip_prefix(f))
                    .is_some_and(|rest| rest.starts_with(".agent-env-") && rest.ends_with(".tmp"))
            });
            if ours && self.dir.remove_file(name).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    fn current_stamp(&self, name: &str) -> Result<Option<Stamp>, EnvDirError> {
        match self.dir.symlink_metadata(name) {
            Ok(m) => Ok(Some(Stamp::of(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EnvDirError::io("cannot stat", self.display(name), e)),
        }
    }

    /// Replaces a file atomically: temp file in the same dir, fsync, rename.
    /// `expected` is the stamp of the version the new content was computed
    /// from (`None`: the file did not exist); when the file no longer matches
    /// it, nothing is written and [`WriteOutcome::Raced`] tells the caller to
    /// read and merge again, so a concurrent writer's change is not lost.
    pub fn write(
        &self,
        file: EnvFile,
        bytes: &[u8],
        expected: Option<Stamp>,
        mode: u32,
        owner: Owner,
    ) -> Result<WriteOutcome, EnvDirError> {
        let name = file.file_name();
        let tmp = temp_name(name);
        let result = self.write_temp_and_rename(name, &tmp, bytes, expected, mode, owner);
        if !matches!(result, Ok(WriteOutcome::Written)) {
            let _ = self.dir.remove_file(&tmp);
        }
        result
    }

    /// Replaces a file the operator alone writes (the boot marker)
    /// atomically, with no lock or race check.
    pub fn put(
        &self,
        name: &str,
        bytes: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<(), EnvDirError> {
        let tmp = temp_name(name);
        let result = self
            .write_temp(name, &tmp, bytes, mode, owner)
            .and_then(|()| {
                self.dir
                    .rename(&tmp, &self.dir, name)
                    .map_err(|e| EnvDirError::io("cannot rename into place", self.display(name), e))
            });
        if result.is_err() {
            let _ = self.dir.remove_file(&tmp);
        }
        result
    }

    fn write_temp_and_rename(
        &self,
        name: &str,
        tmp: &str,
        bytes: &[u8],
        expected: Option<Stamp>,
        mode: u32,
        owner: Owner,
    ) -> Result<WriteOutcome, EnvDirError> {
        self.write_temp(name, tmp, bytes, mode, owner)?;
        // Claude Code saves its config holding `<file>.lock`; holding it too
        // from the stamp check to the rename means neither side overwrites a
        // write the other has not seen.
        let Some(_lock) = self.lock(name)? else {
            return Ok(WriteOutcome::Raced);
        };
        if self.current_stamp(name)? != expected {
            return Ok(WriteOutcome::Raced);
        }
        self.dir
            .rename(tmp, &self.dir, name)
            .map_err(|e| EnvDirError::io("cannot rename into place", self.display(name), e))?;
        Ok(WriteOutcome::Written)
    }

    fn write_temp(
        &self,
        name: &str,
        tmp: &str,
        bytes: &[u8],
        mode: u32,
        owner: Owner,
    ) -> Result<(), EnvDirError> {
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create_new(true)
            .mode(mode)
            .follow(FollowSymlinks::No);
        let mut f = self
            .dir
            .open_with(tmp, &opts)
            .map_err(|e| EnvDirError::io("cannot create", self.display(tmp), e))?;
        let io_err = |op, e| EnvDirError::io(op, self.display(name), e);
        // The umask may have narrowed the mode given at creation.
        f.set_permissions(cap_std::fs::Permissions::from_std(
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        ))
        .map_err(|e| io_err("cannot set the mode of", e))?;
        if owner.uid.is_some() || owner.gid.is_some() {
            chown(&f, owner).map_err(|e| io_err("cannot chown", e))?;
        }
        f.write_all(bytes).map_err(|e| io_err("cannot write", e))?;
        if self.fsync {
            f.sync_all().map_err(|e| io_err("cannot fsync", e))?;
        }
        Ok(())
    }

    /// Takes `<name>.lock` the way `proper-lockfile` does (an atomic mkdir; a
    /// lock not refreshed for [`LOCK_STALE`] is abandoned and taken over).
    /// `None` when another writer kept it for [`LOCK_WAIT`]: the caller
    /// retries as after a race.
    fn lock(&self, name: &str) -> Result<Option<LockGuard<'_>>, EnvDirError> {
        let lock = format!("{name}{LOCK_SUFFIX}");
        let started = std::time::Instant::now();
        loop {
            match self.dir.create_dir(&lock) {
                Ok(()) => {
                    return Ok(Some(LockGuard {
                        dir: &self.dir,
                        name: lock,
                    }));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = self
                        .dir
                        .symlink_metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.into_std().elapsed().ok())
                        .is_some_and(|age| age > LOCK_STALE);
                    if stale {
                        let _ = self.dir.remove_dir(&lock);
                        continue;
                    }
                    if started.elapsed() > LOCK_WAIT {
                        return Ok(None);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(EnvDirError::io("cannot lock", self.display(&lock), e)),
            }
        }
    }

    /// Moves a file that cannot be merged into aside (never deletes it) and
    /// returns its new name.
    pub fn move_aside(&self, file: EnvFile) -> Result<String, EnvDirError> {
        let name = file.file_name();
        let aside = self.aside_name(name)?;
        self.dir
            .rename(name, &self.dir, &aside)
            .map_err(|e| EnvDirError::io("cannot move aside", self.display(name), e))?;
        Ok(self.display(&aside))
    }

    /// Keeps a copy of a file before a damaged owned key in it is replaced.
    pub fn copy_aside(&self, file: EnvFile, bytes: &[u8]) -> Result<String, EnvDirError> {
        let name = file.file_name();
        let aside = self.aside_name(name)?;
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create_new(true)
            .mode(0o600)
            .follow(FollowSymlinks::No);
        let mut f = self
            .dir
            .open_with(&aside, &opts)
            .map_err(|e| EnvDirError::io("cannot create", self.display(&aside), e))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .map_err(|e| EnvDirError::io("cannot write", self.display(&aside), e))?;
        Ok(self.display(&aside))
    }

    fn aside_name(&self, name: &str) -> Result<String, EnvDirError> {
        let stamp = crate::time::now().strftime("%Y%m%dT%H%M%SZ").to_string();
        for n in 0..1000 {
            let candidate = if n == 0 {
                format!("{name}.corrupt-{stamp}")
            } else {
                format!("{name}.corrupt-{stamp}-{n}")
            };
            if self.current_stamp(&candidate)?.is_none() {
                return Ok(candidate);
            }
        }
        Err(EnvDirError::io(
            "cannot find a free name to move aside",
            self.display(name),
            io::Error::from(io::ErrorKind::AlreadyExists),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_and_race() {
        let tmp = tempfile::tempdir().unwrap();
        let root = EnvRoot::open(tmp.path(), true).unwrap();
        let d = root
            .instance("ns/a", true, Owner::default())
            .unwrap()
            .unwrap();
        assert!(d.read(EnvFile::ClaudeJson).unwrap().is_none());
        let w = d.write(EnvFile::ClaudeJson, b"{}\n", None, 0o600, Owner::default());
        assert_eq!(w.unwrap(), WriteOutcome::Written);
        let r = d.read(EnvFile::ClaudeJson).unwrap().unwrap();
        assert_eq!(r.bytes, b"{}\n");
        assert_eq!(r.mode, 0o600);
        // Someone else writes between our read and our rename.
        std::fs::write(tmp.path().join("ns/a/.claude.json"), b"{\"x\":1}").unwrap();
        let w = d.write(
            EnvFile::ClaudeJson,
            b"{}\n",
            Some(r.stamp),
            0o600,
            Owner::default(),
        );
        assert_eq!(w.unwrap(), WriteOutcome::Raced);
        assert_eq!(
            std::fs::read(tmp.path().join("ns/a/.claude.json")).unwrap(),
            b"{\"x\":1}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("ns/a"))
            .unwrap()
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp file is left behind");
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("root/ns")).unwrap();
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("root/ns/evil")).unwrap();
        let root = EnvRoot::open(&tmp.path().join("root"), false).unwrap();
        let err = root
            .instance("ns/evil", true, Owner::default())
            .unwrap_err();
        assert!(err.is_escape(), "{err:?}");
        std::fs::create_dir_all(tmp.path().join("root/ns/ok")).unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("x.json"),
            tmp.path().join("root/ns/ok/settings.json"),
        )
        .unwrap();
        let d = root
            .instance("ns/ok", false, Owner::default())
            .unwrap()
            .unwrap();
        assert!(d.read(EnvFile::Settings).is_err());
    }
}
